//! Agent logs go to the serial console: PID 1's stderr is /dev/console.

use std::io::Write;

struct ConsoleLog;

static LOGGER: ConsoleLog = ConsoleLog;

impl log::Log for ConsoleLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level() && m.target().starts_with("kubevirt_agent")
    }

    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            // One write per line so lines from several threads do not interleave.
            let line = format!("kubevirt-agent: {}: {}\n", r.level(), r.args());
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// Installs the console logger; `agent.log=debug` on the kernel command line raises the level.
pub fn init(level: log::LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
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
        .with_writer(std::sync::Mutex::new(console))
        .with_ansi(false)
        .without_time()
        .try_init();
}
