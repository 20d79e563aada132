//! A process's stdio as the agent holds it: pipes (or a pty master) whose far ends the container
//! process gets. The shim's stream RPCs read and write these directly, so a slow reader applies
//! back pressure to the process rather than filling guest memory.

use std::fs::File;
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::unistd::pipe2;

use crate::error::{AgentError, Result};

/// The container side: what libcontainer hands to the process.
#[derive(Debug)]
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The agent side of a process's stdio.
#[derive(Debug, Default)]
pub struct Stdio {
    stdin: Mutex<Option<File>>,
    stdout: Option<File>,
    stderr: Option<File>,
    /// With a terminal, stdout reads and stdin writes the pty master; stderr is merged.
    tty: Option<File>,
}

/// After output arrives, what follows within this long joins the same reply: under load one
/// agent call then carries a lot more than one pipe read, and 2 ms is not seen at a terminal.
const COALESCE: Duration = Duration::from_millis(2);

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    pipe2(OFlag::O_CLOEXEC).map_err(AgentError::sys("create a stdio pipe"))
}

impl Stdio {
    /// Pipes for stdout and stderr, and for stdin when `stdin` (else /dev/null).
    pub fn pipes(stdin: bool) -> Result<(Stdio, ChildStdio)> {
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let (child_in, our_in) = if stdin {
            let (r, w) = pipe()?;
            (r, Some(File::from(w)))
        } else {
            let null = File::open("/dev/null").map_err(AgentError::io("open /dev/null"))?;
            (OwnedFd::from(null), None)
        };
        Ok((
            Stdio {
                stdin: Mutex::new(our_in),
                stdout: Some(File::from(out_r)),
                stderr: Some(File::from(err_r)),
                tty: None,
            },
            ChildStdio {
                stdin: child_in,
                stdout: out_w,
                stderr: err_w,
            },
        ))
    }

    /// Stdio over the pty master the runtime sent through the console socket.
    pub fn terminal(master: OwnedFd) -> Result<Stdio> {
        let tty = File::from(master);
        let writer = tty
            .try_clone()
            .map_err(AgentError::io("duplicate the pty master"))?;
        Ok(Stdio {
            stdin: Mutex::new(Some(writer)),
            stdout: None,
            stderr: None,
            tty: Some(tty),
        })
    }

    fn read_from(f: Option<&File>, max: usize) -> Result<Vec<u8>> {
        let Some(mut f) = f else {
            return Ok(Vec::new());
        };
        let mut buf = vec![0u8; max.clamp(1, 1 << 20)];
        let n = loop {
            match f.read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // A pty master reads EIO once the last slave closed: end of stream.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(Vec::new()),
                Err(e) => return Err(AgentError::io("read process output")(e)),
            }
        };
        let filled = if n == 0 {
            0
        } else {
            n + Self::coalesce(f, &mut buf[n..])
        };
        buf.truncate(filled);
        Ok(buf)
    }

    /// Reads into `buf` what follows within [`COALESCE`], without blocking past it; what it
    /// got (an error or the end of the stream shows on the next call).
    fn coalesce(mut f: &File, buf: &mut [u8]) -> usize {
        let deadline = Instant::now() + COALESCE;
        let mut filled = 0;
        while filled < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = PollTimeout::from(left.as_millis().min(u16::MAX.into()) as u16);
            let mut pfd = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
            let ready = poll(&mut pfd, timeout).is_ok_and(|n| n > 0);
            let readable = pfd[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLIN));
            if !ready || !readable {
                break;
            }
            match f.read(&mut buf[filled..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => filled += n,
            }
        }
        filled
    }

    /// Blocks until output is available; empty = end of stream.
    pub fn read_stdout(&self, max: usize) -> Result<Vec<u8>> {
        Self::read_from(self.tty.as_ref().or(self.stdout.as_ref()), max)
    }

    pub fn read_stderr(&self, max: usize) -> Result<Vec<u8>> {
        Self::read_from(self.stderr.as_ref(), max)
    }

    pub fn write_stdin(&self, data: &[u8]) -> Result<usize> {
        let mut stdin = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        let f = stdin
            .as_mut()
            .ok_or_else(|| AgentError::invalid("stdin", "the process has no open stdin"))?;
        f.write_all(data).map_err(AgentError::io("write stdin"))?;
        Ok(data.len())
    }

    pub fn close_stdin(&self) {
        let mut stdin = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        if self.tty.is_some() {
            // EOF on a terminal is ^D at the start of a line, not a closed fd.
            if let Some(f) = stdin.as_mut() {
                let _ = f.write_all(&[4]);
            }
        }
        stdin.take();
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        let Some(tty) = &self.tty else {
            return Err(AgentError::invalid("resize", "the process has no terminal"));
        };
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives across the call.
        let rc = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc < 0 {
            return Err(AgentError::io("resize the terminal")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

/// A console socket for libcontainer: it connects and sends the pty master of a process
/// created with `terminal: true`.
#[derive(Debug)]
pub struct ConsoleSocket {
    listener: UnixListener,
}

impl ConsoleSocket {
    pub fn bind(path: &Path) -> Result<ConsoleSocket> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(AgentError::io(format!(
            "bind console socket {}",
            path.display()
        )))?;
        Ok(ConsoleSocket { listener })
    }

    /// Receives the pty master (call after the runtime created the process).
    pub fn receive(self) -> Result<OwnedFd> {
        self.listener
            .set_nonblocking(true)
            .map_err(AgentError::io("console socket"))?;
        let (stream, _) = self.listener.accept().map_err(AgentError::io(
            "the runtime sent no terminal on the console socket",
        ))?;
        stream
            .set_nonblocking(false)
            .map_err(AgentError::io("console socket"))?;
        let mut byte = [0u8; 64];
        let mut iov = [IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!(std::os::fd::RawFd);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(AgentError::sys("receive the pty master"))?;
        for cmsg in msg
            .cmsgs()
            .map_err(AgentError::sys("receive the pty master"))?
        {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                if let Some(&fd) = fds.first() {
                    // SAFETY: SCM_RIGHTS just installed this descriptor in our table; we own it.
                    return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        Err(AgentError::invalid(
            "console socket",
            "message carried no file descriptor",
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn coalescing_takes_what_is_ready_up_to_the_buffer_then_stops() {
        let (r, w) = pipe().unwrap();
        let (r, mut w) = (File::from(r), File::from(w));
        w.write_all(b"hello").unwrap();
        let mut buf = [0u8; 3];
        assert_eq!(
            Stdio::coalesce(&r, &mut buf),
            3,
            "filled to the buffer's end"
        );
        assert_eq!(&buf, b"hel");
        let mut buf = [0u8; 16];
        let t = Instant::now();
        assert_eq!(
            Stdio::coalesce(&r, &mut buf),
            2,
            "the rest, then nothing within 2 ms"
        );
        assert_eq!(&buf[..2], b"lo");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        drop(w);
        assert_eq!(
            Stdio::coalesce(&r, &mut buf),
            0,
            "end of stream adds nothing"
        );
    }

    #[test]
    fn a_read_returns_soon_after_output_stops_and_joins_what_followed() {
        let (stdio, child) = Stdio::pipes(false).unwrap();
        let mut w = File::from(child.stdout);
        w.write_all(b"one").unwrap();
        let t = Instant::now();
        assert_eq!(stdio.read_stdout(1024).unwrap(), b"one");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "waited {:?} with nothing more to read",
            t.elapsed()
        );
        // What is queued, up to the caller's limit, comes in one reply.
        let writer = std::thread::spawn(move || {
            w.write_all(&[7u8; 100_000]).unwrap();
        });
        let mut got = 0;
        while got < 100_000 {
            let chunk = stdio.read_stdout(65_536).unwrap();
            assert!(!chunk.is_empty() && chunk.len() <= 65_536);
            got += chunk.len();
        }
        writer.join().unwrap();
        assert_eq!(got, 100_000);
        // The writer is gone: end of stream.
        assert!(stdio.read_stdout(1024).unwrap().is_empty());
    }
}
