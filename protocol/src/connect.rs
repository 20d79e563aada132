//! Reaching the agent from the host through the hybrid vsock device: connect to the device's
//! Unix socket, ask for the guest port, then speak ttrpc on the same stream.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
#[cfg(feature = "client")]
use std::time::Instant;

#[cfg(feature = "client")]
use crate::blocking::AgentClient;

/// Why the agent could not be reached.
#[derive(Debug)]
pub enum ConnectError {
    /// The vsock Unix socket could not be opened or used.
    Socket(std::path::PathBuf, std::io::Error),
    /// The device refused the port (nothing listens there yet) or answered garbage.
    Refused(String),
    /// The ttrpc client could not take over the stream.
    Client(std::io::Error),
    /// Nothing answered before the deadline.
    Timeout(Duration, Box<ConnectError>),
    /// The VM ended while we waited (how it ended).
    VmEnded(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Socket(p, e) => write!(f, "vsock socket {}: {e}", p.display()),
            ConnectError::Refused(m) => write!(f, "vsock connect refused: {m}"),
            ConnectError::Client(e) => write!(f, "ttrpc client: {e}"),
            ConnectError::Timeout(d, last) => write!(f, "agent not reachable within {d:?}: {last}"),
            ConnectError::VmEnded(how) => {
                write!(f, "the VM ended before its agent answered: {how}")
            }
        }
    }
}

impl std::error::Error for ConnectError {}

/// How long the device may take to answer `CONNECT`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// One connection to guest `port` through the hybrid vsock socket `uds`.
pub fn connect_stream(uds: &Path, port: u32) -> Result<UnixStream, ConnectError> {
    let sock_err = |e| ConnectError::Socket(uds.to_path_buf(), e);
    let mut s = UnixStream::connect(uds).map_err(sock_err)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(sock_err)?;
    // A live guest answers in milliseconds; one that died never does, and the caller must
    // get to check whether it did.
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(sock_err)?;
    match crate::read_line(&s, 256).map_err(sock_err)? {
        Some(line) if line.starts_with("OK ") => {}
        Some(line) => return Err(ConnectError::Refused(line)),
        None => return Err(ConnectError::Refused("connection closed".into())),
    }
    s.set_read_timeout(None).map_err(sock_err)?;
    Ok(s)
}

/// A client of the agent, retrying until it listens or `timeout` passes.
#[cfg(feature = "client")]
pub fn connect_agent(uds: &Path, timeout: Duration) -> Result<AgentClient, ConnectError> {
    connect_agent_while(uds, timeout, || None)
}

/// [`connect_agent`] that gives up as soon as `ended` says how the VM ended: a guest that
/// panicked at boot fails at once instead of after the whole timeout.
#[cfg(feature = "client")]
pub fn connect_agent_while(
    uds: &Path,
    timeout: Duration,
    mut ended: impl FnMut() -> Option<String>,
) -> Result<AgentClient, ConnectError> {
    let start = Instant::now();
    loop {
        match connect_stream(uds, crate::AGENT_PORT) {
            Ok(s) => {
                return AgentClient::new(s).map_err(ConnectError::Client);
            }
            Err(e) if start.elapsed() >= timeout => {
                return Err(ConnectError::Timeout(timeout, Box::new(e)));
            }
            Err(_) => {
                if let Some(how) = ended() {
                    return Err(ConnectError::VmEnded(how));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
