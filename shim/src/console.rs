//! The guest's serial console, kept in `console.log` beside the pod's state with a size cap:
//! a guest that floods its console costs the host at most twice the cap on disk and a pipe's
//! buffer in memory. The VM writes into a non-blocking pipe (a vCPU never waits for the disk,
//! and its seccomp filter allows `write` alone; QEMU, given the pipe as its output, makes its
//! UART wait instead); a thread of the shim moves the bytes into the file and, past the cap,
//! starts a new one, keeping the previous as `console.log.1`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nix::fcntl::OFlag;

use crate::error::{Result, ShimError};

/// The VM's end of the console: bytes that do not fit in the pipe are dropped and counted.
pub struct ConsoleWriter {
    pipe: File,
    dropped: Arc<AtomicU64>,
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.pipe.write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.dropped.fetch_add(buf.len() as u64, Ordering::Relaxed);
                Ok(buf.len())
            }
            r => r,
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ConsoleWriter {
    /// The pipe itself, for a VM process to write into: it waits while the pipe is full
    /// instead of dropping bytes, so none are counted.
    pub fn into_fd(self) -> OwnedFd {
        self.pipe.into()
    }
}

/// Starts the log at `path`, at most `cap` bytes per file; the writer goes to the VM.
pub fn start(path: &Path, cap: u64) -> Result<ConsoleWriter> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| ShimError::io("create the console pipe")(e.into()))?;
    let write = set_nonblocking(write)?;
    let mut file = open(path)?;
    let dropped = Arc::new(AtomicU64::new(0));
    let lost = dropped.clone();
    let path = path.to_owned();
    std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            let mut read = File::from(read);
            let mut buf = [0u8; 4096];
            let mut size = 0u64;
            // Ends when the VM's end of the pipe closes (the VM is gone).
            while let Ok(n @ 1..) = read.read(&mut buf) {
                if size + n as u64 > cap {
                    let old = rotated(&path);
                    if std::fs::rename(&path, &old).is_err() {
                        break;
                    }
                    match open(&path) {
                        Ok(f) => file = f,
                        Err(_) => break,
                    }
                    size = 0;
                }
                if file.write_all(&buf[..n]).is_err() {
                    break;
                }
                size += n as u64;
            }
            let lost = lost.load(Ordering::Relaxed);
            if lost > 0 {
                log::warn!("{}: {lost} console bytes dropped (the guest wrote faster than the disk took them)", path.display());
            }
        })
        .map_err(ShimError::io("start the console thread"))?;
    Ok(ConsoleWriter {
        pipe: write,
        dropped,
    })
}

/// Where the previous file goes when the log passes its cap.
pub fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

fn open(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(ShimError::io(format!("create {}", path.display())))
}

fn set_nonblocking(fd: OwnedFd) -> Result<File> {
    let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| ShimError::io("console pipe flags")(e.into()))?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(|e| ShimError::io("console pipe flags")(e.into()))?;
    Ok(File::from(fd))
}

/// The last `n` lines the guest wrote, across a rotation.
pub fn tail(path: &Path, n: usize) -> Vec<String> {
    let mut text = std::fs::read_to_string(rotated(path)).unwrap_or_default();
    text.push_str(&std::fs::read_to_string(path).unwrap_or_default());
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_flood_is_capped_at_twice_the_limit_and_the_tail_survives() {
        let dir = std::env::temp_dir().join(format!("kvconsole-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let mut w = start(&path, 64 << 10).unwrap();
        // 16 MiB of console output, then the guest's last words.
        let line = [b'x'; 1023];
        for _ in 0..16 << 10 {
            w.write_all(&line).unwrap();
            w.write_all(b"\n").unwrap();
            // Let the reader keep up part of the time, as a disk would.
            std::thread::yield_now();
        }
        let t0 = Instant::now();
        let mut last = "Kernel panic - not syncing: the end\n".as_bytes();
        while !last.is_empty() {
            let n = w.pipe.write(last).unwrap_or(0);
            last = &last[n..];
            assert!(t0.elapsed() < Duration::from_secs(10));
        }
        let dropped = w.dropped.load(Ordering::Relaxed);
        drop(w);
        let t0 = Instant::now();
        while !tail(&path, 1).iter().any(|l| l.contains("the end")) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{:?}",
                tail(&path, 2)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(&path) <= 64 << 10, "{}", size(&path));
        assert!(size(&rotated(&path)) <= 64 << 10);
        assert!(size(&rotated(&path)) > 0, "never rotated");
        println!("dropped {dropped} of {} bytes", 16u64 << 20);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
