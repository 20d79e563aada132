//! The streaming protocol of `kubectl exec` / `attach` as containerd's CRI streaming server
//! speaks it: a WebSocket with subprotocol `v4.channel.k8s.io`, each binary message led by
//! its channel byte (0 stdin, 1 stdout, 2 stderr, 3 the final status, 4 terminal size); and
//! that of `kubectl port-forward` (see [`PortForward`]).

use std::net::TcpStream;
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

pub const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STATUS: u8 = 3;
const RESIZE: u8 = 4;

/// What came back so far.
#[derive(Debug, Default)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    /// The status object the server sends when the process ends (JSON).
    pub status: String,
    pub closed: bool,
}

#[derive(Debug)]
pub struct Stream {
    ws: WebSocket<TcpStream>,
    pub out: Output,
}

/// A WebSocket to `url` with subprotocol `v4.channel.k8s.io`; reads time out after 200 ms.
fn open(url: &str) -> Result<WebSocket<TcpStream>, String> {
    let ws_url = url.replacen("http://", "ws://", 1);
    let mut req = ws_url
        .as_str()
        .into_client_request()
        .map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "v4.channel.k8s.io".parse().map_err(|_| "header")?,
    );
    let host = req
        .uri()
        .authority()
        .ok_or("no host in the URL")?
        .to_string();
    let tcp = TcpStream::connect(host).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let (ws, _) = tungstenite::client(req, tcp).map_err(|e| e.to_string())?;
    Ok(ws)
}

/// Sends `data` on `channel`: one binary message led by the channel byte.
fn send_on(ws: &mut WebSocket<TcpStream>, channel: u8, data: &[u8]) {
    let mut m = vec![channel];
    m.extend_from_slice(data);
    ws.send(Message::binary(m)).expect("send on the stream");
}

/// What one read of a channel WebSocket gave.
enum Incoming {
    /// A channel's message: the channel byte and what follows it.
    Message(u8, Vec<u8>),
    /// Nothing within the read timeout, or a message of no channel.
    Quiet,
    /// The server closed, or the connection failed.
    Closed,
}

fn next(ws: &mut WebSocket<TcpStream>) -> Incoming {
    match ws.read() {
        Ok(Message::Binary(b)) if !b.is_empty() => Incoming::Message(b[0], b[1..].to_vec()),
        Ok(Message::Close(_)) => Incoming::Closed,
        Ok(_) => Incoming::Quiet,
        Err(tungstenite::Error::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Incoming::Quiet
        }
        Err(_) => Incoming::Closed,
    }
}

impl Stream {
    /// Opens the stream at `url` (what Exec or Attach returned).
    pub fn connect(url: &str) -> Result<Stream, String> {
        Ok(Stream {
            ws: open(url)?,
            out: Output::default(),
        })
    }

    pub fn send(&mut self, channel: u8, data: &[u8]) {
        send_on(&mut self.ws, channel, data);
    }

    /// Tells the terminal's new size, as kubectl does on SIGWINCH.
    pub fn resize(&mut self, width: u16, height: u16) {
        let size = format!(r#"{{"Width":{width},"Height":{height}}}"#);
        self.send(RESIZE, size.as_bytes());
    }

    /// Reads until `done` holds for what came back, or the stream closes, or `timeout`.
    pub fn read_until(&mut self, timeout: Duration, done: impl Fn(&Output) -> bool) -> &Output {
        let t0 = Instant::now();
        while !done(&self.out) && !self.out.closed && t0.elapsed() < timeout {
            match next(&mut self.ws) {
                Incoming::Message(ch, body) => {
                    let text = String::from_utf8_lossy(&body).into_owned();
                    match ch {
                        STDOUT => self.out.stdout += &text,
                        STDERR => self.out.stderr += &text,
                        STATUS => self.out.status += &text,
                        _ => {}
                    }
                }
                Incoming::Quiet => {}
                Incoming::Closed => self.out.closed = true,
            }
        }
        &self.out
    }
}

/// `kubectl port-forward` as containerd's streaming server speaks it over a WebSocket: the
/// ports of the PortForward request (one here; kubelet's proxy also passes `?port=N`), channel 0 the data both ways, channel 1 the server's
/// error text; the server opens each channel with the port, two bytes little-endian.
#[derive(Debug)]
pub struct PortForward {
    ws: WebSocket<TcpStream>,
    /// The port's bytes so far.
    pub data: Vec<u8>,
    /// What the server said went wrong.
    pub error: String,
    pub closed: bool,
    /// Whether each channel's port prefix has come.
    opened: [bool; 2],
}

impl PortForward {
    /// Forwards to `port` of the pod through `url` (what PortForward returned).
    pub fn connect(url: &str, port: u16) -> Result<PortForward, String> {
        Ok(PortForward {
            ws: open(&format!("{url}?port={port}"))?,
            data: Vec::new(),
            error: String::new(),
            closed: false,
            opened: [false; 2],
        })
    }

    pub fn send(&mut self, data: &[u8]) {
        send_on(&mut self.ws, 0, data);
    }

    /// Reads until `done` holds, or the stream closes, or `timeout`.
    pub fn read_until(&mut self, timeout: Duration, done: impl Fn(&PortForward) -> bool) {
        let t0 = Instant::now();
        while !done(self) && !self.closed && t0.elapsed() < timeout {
            match next(&mut self.ws) {
                Incoming::Message(ch, body) if ch < 2 => {
                    let ch = usize::from(ch);
                    let mut body = &body[..];
                    if !self.opened[ch] {
                        self.opened[ch] = true;
                        body = body.get(2..).unwrap_or_default();
                    }
                    match ch {
                        0 => self.data.extend_from_slice(body),
                        _ => self.error += &String::from_utf8_lossy(body),
                    }
                }
                Incoming::Message(..) | Incoming::Quiet => {}
                Incoming::Closed => self.closed = true,
            }
        }
    }
}
