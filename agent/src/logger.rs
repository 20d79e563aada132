//! Agent logs go to the serial console (PID 1's stderr is /dev/console) and, when the host
//! listens, to vsock port [`LOG_PORT`] so the shim can collect them without a console.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};

/// Host vsock port the agent streams its log lines to.
pub const LOG_PORT: u32 = 1025;
/// The host's CID.
const HOST_CID: u32 = 2;

struct AgentLog {
    vsock: Mutex<Option<File>>,
}

static LOGGER: AgentLog = AgentLog {
    vsock: Mutex::new(None),
};

impl log::Log for AgentLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level() && m.target().starts_with("kubevirt_agent")
    }

    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        // One write per line so lines from several threads do not interleave.
        let line = format!("kubevirt-agent: {}: {}\n", r.level(), r.args());
        let _ = std::io::stderr().write_all(line.as_bytes());
        let mut vsock = self.vsock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = vsock.as_mut() {
            if f.write_all(line.as_bytes()).is_err() {
                *vsock = None; // the host went away: console only from now on
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the logger (console only until [`connect_vsock`]).
pub fn init(level: log::LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Mirrors log lines to the host's vsock log port if something listens there.
pub fn connect_vsock() {
    let sock: nix::Result<OwnedFd> = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    );
    let Ok(sock) = sock else {
        return;
    };
    use std::os::fd::AsRawFd;
    if connect(sock.as_raw_fd(), &VsockAddr::new(HOST_CID, LOG_PORT)).is_ok() {
        *LOGGER.vsock.lock().unwrap_or_else(|e| e.into_inner()) = Some(File::from(sock));
    }
}

/// libcontainer reports through `tracing`: send its events to the console as well, so a
/// failing container says which step failed.
pub fn init_tracing(level: log::LevelFilter) {
    let level = match level {
        log::LevelFilter::Off | log::LevelFilter::Error => tracing::Level::ERROR,
        log::LevelFilter::Warn | log::LevelFilter::Info => tracing::Level::WARN,
        log::LevelFilter::Debug => tracing::Level::DEBUG,
        log::LevelFilter::Trace => tracing::Level::TRACE,
    };
    // Not stderr: libcontainer also logs from the forked container process, whose stderr is
    // already the container's. The console file is close-on-exec, so it never leaks further.
    let Ok(console) = std::fs::OpenOptions::new().write(true).open("/dev/console") else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(Mutex::new(console))
        .with_ansi(false)
        .without_time()
        .try_init();
}
