//! Child processes (QEMU, mkfs, blkid) start from one long-lived thread that no seccomp
//! filter confines: a child inherits its forking thread's filter, and QEMU must not run
//! under the shim's. The thread lives as long as the process, so a child that asks for a
//! parent-death signal gets it when the process ends, not when some worker thread does.

use std::io;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};

type Reply = Sender<io::Result<Child>>;

static SPAWNER: OnceLock<Mutex<Sender<(Command, Reply)>>> = OnceLock::new();

/// The name of the spawning thread (tests look for it among a process's threads).
pub const THREAD_NAME: &str = "spawner";

fn spawner() -> &'static Mutex<Sender<(Command, Reply)>> {
    SPAWNER.get_or_init(|| {
        let (tx, rx) = channel::<(Command, Reply)>();
        std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the spawner thread");
        Mutex::new(tx)
    })
}

/// Starts the spawning thread now, from the calling thread: call it before confining that
/// thread, so the spawner (and every child) stays out of the filter.
pub fn start() {
    spawner();
}

/// `cmd.spawn()`, on the spawning thread.
pub fn spawn(cmd: Command) -> io::Result<Child> {
    let (tx, rx) = channel();
    let sent = spawner()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, tx));
    if sent.is_err() {
        return Err(io::Error::other("the spawner thread has gone"));
    }
    rx.recv()
        .unwrap_or_else(|_| Err(io::Error::other("the spawner thread has gone")))
}

/// `cmd.output()` (stdin /dev/null): started on the spawning thread, waited for on the
/// caller's.
pub fn output(mut cmd: Command) -> io::Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn(cmd)?.wait_with_output()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_start_on_the_spawner_thread() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "read x; echo out; echo err >&2; exit 3"]);
        let out = output(cmd).unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
        let names: Vec<String> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
            .map(|c| c.trim().to_owned())
            .collect();
        assert!(names.iter().any(|n| n == THREAD_NAME), "{names:?}");
    }

    #[test]
    fn a_missing_binary_is_an_error_not_a_panic() {
        let e = output(Command::new("/nonexistent/kubevirt-binary")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
