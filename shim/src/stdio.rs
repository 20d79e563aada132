//! Copies a process's stdio between containerd's FIFOs and the agent's stream calls. Output is
//! always drained, also without a reader, so a container never blocks on a full pipe.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use protocol::agent::ReadStreamRequest;
use protocol::blocking::AgentClient;
use protocol::ttrpc::context;

use crate::stdin::Stdin;

/// Largest chunk moved per call.
pub(crate) const CHUNK: u32 = 64 * 1024;

/// Where containerd wants a process's stdio (empty = not wanted).
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The copying threads of one process; the output ones end at the process's end of stream.
#[derive(Debug, Default)]
pub struct Pumps {
    outputs: Vec<JoinHandle<()>>,
}

/// Opens a FIFO for writing only where it has a reader (ENXIO otherwise, never waiting);
/// writes block from then on: a slow reader slows the process, as with runc.
fn open_where_read(path: &str) -> std::io::Result<File> {
    let writer = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)?;
    fcntl(writer.as_raw_fd(), FcntlArg::F_SETFL(OFlag::empty()))?;
    Ok(writer)
}

/// Opens containerd's output FIFO on the caller's thread, while the client that asked for the
/// process waits on the request (`ctr run -d` reads only until it detaches: a writer opened
/// after that would wait forever for a reader). A reader of our own lets the open return at
/// once; it is closed straight after, so once containerd's reader has gone writes fail
/// (EPIPE) and the output is drained and dropped instead of filling the FIFO.
fn open_fifo_for_writing(path: &str) -> Option<File> {
    if path.is_empty() {
        return None;
    }
    let open = || -> std::io::Result<File> {
        let _reader = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(path)?;
        open_where_read(path)
    };
    match open() {
        Ok(f) => Some(f),
        Err(e) => {
            log::warn!("open {path}: {e}; output is discarded");
            None
        }
    }
}

/// Where a process's output goes. When containerd's reader goes away (a containerd restart)
/// output is dropped, not queued, and the FIFO is reopened once a reader is back: the
/// restarted containerd's, which picks up the logs of running containers.
struct Sink {
    path: String,
    file: Option<File>,
    retry_at: Instant,
}

impl Sink {
    fn write(&mut self, data: &[u8]) {
        if self.file.is_none() && !self.path.is_empty() && Instant::now() >= self.retry_at {
            // Opens only where a reader is (ENXIO otherwise); a second between tries.
            self.retry_at = Instant::now() + Duration::from_secs(1);
            self.file = open_where_read(&self.path).ok();
        }
        if let Some(f) = self.file.as_mut() {
            if f.write_all(data).is_err() {
                self.file = None; // the reader went away: keep draining
            }
        }
    }
}

fn pump_output(
    agent: AgentClient,
    container: String,
    exec_id: String,
    path: String,
    stderr: bool,
) -> JoinHandle<()> {
    let mut sink = Sink {
        file: open_fifo_for_writing(&path),
        path,
        retry_at: Instant::now(),
    };
    std::thread::spawn(move || {
        let req = ReadStreamRequest {
            container_id: container,
            exec_id,
            max_len: CHUNK,
            ..Default::default()
        };
        loop {
            let r = if stderr {
                agent.read_stderr(context::Context::default(), &req)
            } else {
                agent.read_stdout(context::Context::default(), &req)
            };
            let data = match r {
                Ok(r) if !r.data.is_empty() => r.data,
                Ok(_) => return,
                Err(e) => {
                    log::warn!("{}/{}: output stream: {e}", req.container_id, req.exec_id);
                    return;
                }
            };
            sink.write(&data);
        }
    })
}

impl Pumps {
    pub fn start(
        agent: &AgentClient,
        container: &str,
        exec_id: &str,
        io: &StdioPaths,
        stdin: &Arc<Stdin>,
    ) -> Pumps {
        let mut outputs = vec![pump_output(
            agent.clone(),
            container.into(),
            exec_id.into(),
            io.stdout.clone(),
            false,
        )];
        if !io.terminal {
            outputs.push(pump_output(
                agent.clone(),
                container.into(),
                exec_id.into(),
                io.stderr.clone(),
                true,
            ));
        }
        crate::stdin::pump(
            agent.clone(),
            container.into(),
            exec_id.into(),
            stdin.clone(),
        );
        Pumps { outputs }
    }

    /// Waits until all output has reached containerd.
    pub fn finish(self) {
        for t in self.outputs {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use nix::sys::stat::Mode;
    use nix::unistd::mkfifo;

    use super::*;

    fn fifo(name: &str) -> (std::path::PathBuf, String) {
        let dir = std::env::temp_dir().join(format!("shim-stdio-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out");
        mkfifo(&path, Mode::from_bits_truncate(0o600)).unwrap();
        (dir, path.to_string_lossy().into_owned())
    }

    #[test]
    fn an_output_fifo_nobody_reads_opens_at_once_and_refuses_writes() {
        let (dir, path) = fifo("gone");
        let mut w = open_fifo_for_writing(&path).expect("opened without a reader");
        let e = w.write_all(b"lost").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn output_resumes_once_a_reader_is_back() {
        let (dir, path) = fifo("back");
        let mut sink = Sink {
            file: open_fifo_for_writing(&path),
            path: path.clone(),
            retry_at: Instant::now(),
        };
        sink.write(b"lost");
        assert!(sink.file.is_none(), "no reader: the FIFO is let go");
        let mut r = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        sink.retry_at = Instant::now();
        sink.write(b"again");
        drop(sink);
        let mut got = String::new();
        r.read_to_string(&mut got).unwrap();
        assert_eq!(got, "again");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_output_fifo_with_a_reader_delivers() {
        let (dir, path) = fifo("read");
        let mut r = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let mut w = open_fifo_for_writing(&path).unwrap();
        w.write_all(b"hello").unwrap();
        drop(w);
        let mut got = String::new();
        r.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello");
        assert!(open_fifo_for_writing("").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
