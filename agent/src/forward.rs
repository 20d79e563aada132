//! Port-forwarded connections into the guest: the shim connects to vsock port
//! [`protocol::FORWARD_PORT`] and writes "<port>\n"; the agent dials the port on the guest's
//! localhost (127.0.0.1, then ::1, as containerd does for a runc pod), answers "OK\n" or
//! "ERR <reason>\n", and copies bytes both ways until each side has ended.

use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{
    accept4, bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    VsockAddr,
};
use nix::sys::time::TimeVal;

use crate::error::{AgentError, Result};

/// Connections relayed at once; more are refused (each holds two threads).
const MAX_CONNECTIONS: usize = 256;
/// The shim names the port straight after connecting.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a dial on the guest's localhost may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Listens on the forward port and serves each connection on a thread of its own.
pub fn spawn() -> Result<()> {
    let listener = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(AgentError::sys("vsock socket for port forwarding"))?;
    let addr = VsockAddr::new(libc::VMADDR_CID_ANY, protocol::FORWARD_PORT);
    bind(listener.as_raw_fd(), &addr).map_err(AgentError::sys(format!(
        "bind vsock port {}",
        protocol::FORWARD_PORT
    )))?;
    listen(&listener, Backlog::new(64).unwrap_or(Backlog::MAXCONN))
        .map_err(AgentError::sys("listen for port forwarding"))?;
    let live = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("forward".into())
        .spawn(move || loop {
            let fd = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(fd) => fd,
                Err(e) => {
                    log::warn!("port forwarding: accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            let conn = File::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            let live = live.clone();
            if live.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                live.fetch_sub(1, Ordering::SeqCst);
                let _ = (&conn).write_all(b"ERR too many forwarded connections\n");
                continue;
            }
            let spawned = std::thread::Builder::new()
                .name("forward-conn".into())
                .spawn({
                    let live = live.clone();
                    move || {
                        serve(conn);
                        live.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            if let Err(e) = spawned {
                live.fetch_sub(1, Ordering::SeqCst);
                log::warn!("port forwarding: no thread for a connection: {e}");
            }
        })
        .map_err(AgentError::io("spawn the port forwarder"))?;
    Ok(())
}

/// Reads "<port>\n" from the shim.
fn read_port(conn: &File) -> std::result::Result<u16, String> {
    // A port has at most 5 digits; one more byte shows a longer line.
    match protocol::read_line(conn, 7) {
        Ok(Some(text)) => match text.parse::<u16>() {
            Ok(p) if p != 0 => Ok(p),
            _ => Err(format!("bad port {text:?}")),
        },
        Ok(None) => Err("no port line (closed, or longer than a port)".into()),
        Err(e) => Err(format!("reading the port: {e}")),
    }
}

/// 127.0.0.1:`port`, else [::1]:`port`.
fn dial(port: u16) -> std::result::Result<TcpStream, String> {
    let v4 = SocketAddr::from(([127, 0, 0, 1], port));
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&v4, DIAL_TIMEOUT).or_else(|e4| {
        TcpStream::connect_timeout(&v6, DIAL_TIMEOUT)
            .map_err(|e6| format!("localhost:{port}: IPv4: {e4}; IPv6: {e6}"))
    })
}

fn serve(conn: File) {
    let timeout = TimeVal::new(HEADER_TIMEOUT.as_secs() as i64, 0);
    let _ = setsockopt(&conn.as_fd(), sockopt::ReceiveTimeout, &timeout);
    let tcp = read_port(&conn).and_then(dial);
    let _ = setsockopt(&conn.as_fd(), sockopt::ReceiveTimeout, &TimeVal::new(0, 0));
    let tcp = match tcp {
        Ok(t) => t,
        Err(why) => {
            log::debug!("port forwarding refused: {why}");
            let _ = (&conn).write_all(format!("ERR {why}\n").as_bytes());
            return;
        }
    };
    if (&conn).write_all(b"OK\n").is_err() {
        return;
    }
    protocol::relay(conn.into(), tcp.into());
}
