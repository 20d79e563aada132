//! Copies a process's stdio between containerd's FIFOs and the agent's stream calls. Output is
//! always drained, also without a reader, so a container never blocks on a full pipe.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use protocol::agent::ReadStreamRequest;
use protocol::agent_ttrpc_async::AgentClient as AsyncAgentClient;
use protocol::blocking::AgentClient;
use protocol::ttrpc::context;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;

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

/// The copying tasks of one process's output; they end at the process's end of stream.
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
/// restarted containerd's, which picks up the logs of running containers. Writes wait for
/// the reader (a slow one slows the process) without holding a thread.
struct Sink {
    path: String,
    pipe: Option<pipe::Sender>,
    retry_at: Instant,
}

impl Sink {
    /// Must run in the runtime's context (the FIFO is registered with it).
    fn new(path: String, file: Option<File>) -> Sink {
        Sink {
            pipe: file.and_then(|f| pipe::Sender::from_file(f).ok()),
            path,
            retry_at: Instant::now(),
        }
    }

    async fn write(&mut self, data: &[u8]) {
        if self.pipe.is_none() && !self.path.is_empty() && Instant::now() >= self.retry_at {
            // Opens only where a reader is (ENXIO otherwise); a second between tries.
            self.retry_at = Instant::now() + Duration::from_secs(1);
            self.pipe = open_where_read(&self.path)
                .ok()
                .and_then(|f| pipe::Sender::from_file(f).ok());
        }
        if let Some(p) = self.pipe.as_mut() {
            if p.write_all(data).await.is_err() {
                self.pipe = None; // the reader went away: keep draining
            }
        }
    }
}

async fn pump_output(
    agent: AsyncAgentClient,
    req: ReadStreamRequest,
    mut sink: Sink,
    stderr: bool,
) {
    loop {
        let r = if stderr {
            agent.read_stderr(context::Context::default(), &req).await
        } else {
            agent.read_stdout(context::Context::default(), &req).await
        };
        let data = match r {
            Ok(r) if !r.data.is_empty() => r.data,
            Ok(_) => return,
            Err(e) => {
                log::warn!("{}/{}: output stream: {e}", req.container_id, req.exec_id);
                return;
            }
        };
        sink.write(&data).await;
    }
}

impl Pumps {
    /// Output is copied by tasks on the agent connection's runtime; stdin by a thread of
    /// its own (see `stdin.rs`).
    pub fn start(
        agent: &AgentClient,
        container: &str,
        exec_id: &str,
        io: &StdioPaths,
        stdin: &Arc<Stdin>,
    ) -> std::io::Result<Pumps> {
        let rt = protocol::blocking::handle()?;
        let mut outputs = Vec::new();
        let mut streams = vec![(io.stdout.clone(), false)];
        if !io.terminal {
            streams.push((io.stderr.clone(), true));
        }
        for (path, stderr) in streams {
            // Opened here, while containerd waits on the request (see open_fifo_for_writing).
            let file = open_fifo_for_writing(&path);
            let req = ReadStreamRequest {
                container_id: container.into(),
                exec_id: exec_id.into(),
                max_len: CHUNK,
                ..Default::default()
            };
            let agent = agent.asynchronous();
            outputs.push(rt.spawn(async move {
                pump_output(agent, req, Sink::new(path, file), stderr).await
            }));
        }
        crate::stdin::pump(
            agent.clone(),
            container.into(),
            exec_id.into(),
            stdin.clone(),
        );
        Ok(Pumps { outputs })
    }

    /// Waits until all output has reached containerd.
    pub async fn finish(self) {
        for t in self.outputs {
            let _ = t.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

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
        let rt = protocol::blocking::handle().unwrap();
        let mut sink = rt.block_on(async { Sink::new(path.clone(), open_fifo_for_writing(&path)) });
        rt.block_on(sink.write(b"lost"));
        assert!(sink.pipe.is_none(), "no reader: the FIFO is let go");
        let mut r = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        sink.retry_at = Instant::now();
        rt.block_on(sink.write(b"again"));
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
