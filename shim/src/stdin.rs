//! A process's stdin: containerd's FIFO copied to the agent until the writer leaves or
//! containerd asks to close it (CloseIO). The close may come before the process starts (ctr
//! closes an empty stdin at once) or while input still waits in the FIFO (`kubectl exec -i`
//! with piped input): whatever was written before the close reaches the process first.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use protocol::agent::{ProcessRequest, WriteStreamRequest};
use protocol::blocking::AgentClient;
use protocol::ttrpc::context;

/// A process's stdin FIFO, opened when containerd creates the process (as runc's shim does):
/// a client that writes, or closes its end, before the start is seen even so. With the close
/// request containerd's CloseIO leaves for the pump.
#[derive(Debug)]
pub struct Stdin {
    fifo: Mutex<Option<File>>,
    close: EventFd,
}

impl Stdin {
    /// Opens the FIFO at `path` (none when empty) without waiting for its writer.
    pub fn open(path: &str) -> std::io::Result<Stdin> {
        let fifo = if path.is_empty() {
            None
        } else {
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("stdin {path}: {e}")))?;
            Some(f)
        };
        Ok(Stdin {
            fifo: Mutex::new(fifo),
            close: EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK)?,
        })
    }

    /// Asks the pump to deliver what is queued in the FIFO, then close the process's stdin.
    pub fn request_close(&self) {
        let _ = self.close.write(1);
    }
}

/// What a wake-up of the pump found.
enum Step {
    More,
    End,
}

/// Forwards what the FIFO holds now; `End` once its writer has gone.
fn forward_ready(fifo: &mut File, buf: &mut [u8], send: &impl Fn(&[u8]) -> bool) -> Step {
    loop {
        match fifo.read(buf) {
            Ok(0) => return Step::End,
            Ok(n) => {
                if !send(&buf[..n]) {
                    return Step::End;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::More,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Step::End,
        }
    }
}

/// Copies until the FIFO's writer leaves or a close is requested. The FIFO is read without
/// blocking: before any writer came, a read says end of file, so only poll's hang-up (a writer
/// came and went) or a close request ends the copy.
fn copy(fifo: &mut File, close: &EventFd, send: impl Fn(&[u8]) -> bool) {
    let mut buf = vec![0u8; crate::stdio::CHUNK as usize];
    loop {
        let mut fds = [
            PollFd::new(fifo.as_fd(), PollFlags::POLLIN),
            PollFd::new(close.as_fd(), PollFlags::POLLIN),
        ];
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue; // EINTR
        }
        let fifo_ev = fds[0].revents().unwrap_or(PollFlags::empty());
        let closing = fds[1]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN));
        if fifo_ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP) || closing {
            if let Step::End = forward_ready(fifo, &mut buf, &send) {
                return;
            }
        }
        if closing || fifo_ev.contains(PollFlags::POLLERR) {
            return;
        }
    }
}

/// Starts the thread that feeds the FIFO to the process and closes its stdin at the end
/// (once: a second call finds no FIFO).
pub fn pump(agent: AgentClient, container: String, exec_id: String, stdin: Arc<Stdin>) {
    let Some(mut fifo) = stdin.fifo.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    let label = format!("{container}/{exec_id}");
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            copy(&mut fifo, &stdin.close, |data| {
                let req = WriteStreamRequest {
                    container_id: container.clone(),
                    exec_id: exec_id.clone(),
                    data: data.to_vec(),
                    ..Default::default()
                };
                agent.write_stdin(context::Context::default(), &req).is_ok()
            });
            let req = ProcessRequest {
                container_id: container,
                exec_id,
                ..Default::default()
            };
            let _ = agent.close_stdin(context::Context::default(), &req);
        });
    if let Err(e) = spawned {
        log::error!("process {label}: cannot start its stdin thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;
    use std::time::Duration;

    use nix::sys::stat::Mode;
    use nix::unistd::mkfifo;

    use super::*;

    struct Fifo {
        dir: std::path::PathBuf,
        path: std::path::PathBuf,
    }

    impl Fifo {
        fn new(name: &str) -> Fifo {
            let dir =
                std::env::temp_dir().join(format!("shim-stdin-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("stdin");
            mkfifo(&path, Mode::from_bits_truncate(0o600)).unwrap();
            Fifo { dir, path }
        }

        fn reader(&self) -> File {
            OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&self.path)
                .unwrap()
        }

        fn writer(&self) -> File {
            OpenOptions::new().write(true).open(&self.path).unwrap()
        }
    }

    impl Drop for Fifo {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Runs `copy` on a thread; returns what it forwarded once it ended.
    fn run_copy(mut fifo: File, close: EventFd) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let got = Mutex::new(Vec::new());
            copy(&mut fifo, &close, |d| {
                got.lock().unwrap().extend_from_slice(d);
                true
            });
            got.into_inner().unwrap()
        })
    }

    #[test]
    fn a_close_before_any_writer_ends_the_copy() {
        let f = Fifo::new("early");
        let close = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).unwrap();
        close.write(1).unwrap();
        let got = run_copy(f.reader(), close).join().unwrap();
        assert!(got.is_empty());
    }

    #[test]
    fn a_copy_waits_for_a_writer_then_ends_when_it_leaves() {
        let f = Fifo::new("hup");
        let close = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).unwrap();
        let t = run_copy(f.reader(), close);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "no writer yet: the copy must wait");
        let mut w = f.writer();
        w.write_all(b"hello\n").unwrap();
        drop(w);
        assert_eq!(t.join().unwrap(), b"hello\n");
    }

    #[test]
    fn a_writer_that_left_before_the_pump_ran_is_seen() {
        let f = Fifo::new("left");
        let stdin = Stdin::open(f.path.to_str().unwrap()).unwrap();
        let mut w = f.writer();
        w.write_all(b"early\n").unwrap();
        drop(w);
        let fifo = stdin.fifo.lock().unwrap().take().unwrap();
        assert_eq!(run_copy(fifo, stdin.close).join().unwrap(), b"early\n");
        assert!(Stdin::open("").unwrap().fifo.lock().unwrap().is_none());
        let err = Stdin::open("/nonexistent/stdin").unwrap_err().to_string();
        assert!(err.contains("/nonexistent/stdin"), "{err}");
    }

    #[test]
    fn input_queued_before_a_close_is_delivered_first() {
        let f = Fifo::new("queued");
        let reader = f.reader();
        let mut w = f.writer();
        let data: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        w.write_all(&data).unwrap();
        // The writer stays open (as containerd's does): only the close request ends it.
        let close = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).unwrap();
        close.write(1).unwrap();
        assert_eq!(run_copy(reader, close).join().unwrap(), data);
        drop(w);
    }
}
