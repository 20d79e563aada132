//! Per-container and per-process state the shim keeps for containerd: status, exit, stdio.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::pod::Pod;
use crate::stdin::Stdin;
use crate::stdio::StdioPaths;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitInfo {
    pub status: u32,
    pub at_unix_ns: i64,
}

#[derive(Debug)]
struct ProcState {
    status: Status,
    pid: u32,
    exit: Option<ExitInfo>,
    /// Kill requests for the process not yet answered.
    signals: u32,
}

/// A container's init process (exec id "") or an exec.
#[derive(Debug)]
pub struct Proc {
    pub exec_id: String,
    pub io: StdioPaths,
    /// The OCI process (JSON) of an exec.
    pub spec: Vec<u8>,
    /// The stdin FIFO, open from creation, and containerd's CloseIO for its pump.
    pub stdin: Arc<Stdin>,
    state: Mutex<ProcState>,
    /// Wakes containerd's Waits, which are tasks on the RPC thread (no thread each).
    exited: Notify,
    answered: Condvar,
}

impl Proc {
    pub fn new(exec_id: &str, io: StdioPaths, spec: Vec<u8>) -> std::io::Result<Arc<Proc>> {
        let stdin = Arc::new(Stdin::open(&io.stdin)?);
        Ok(Arc::new(Proc {
            stdin,
            exec_id: exec_id.to_owned(),
            io,
            spec,
            state: Mutex::new(ProcState {
                status: Status::Created,
                pid: 0,
                exit: None,
                signals: 0,
            }),
            exited: Notify::new(),
            answered: Condvar::new(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn started(&self, pid: u32) {
        let mut s = self.lock();
        s.status = Status::Running;
        s.pid = pid;
    }

    pub fn set_paused(&self, paused: bool) {
        let mut s = self.lock();
        if s.status != Status::Stopped {
            s.status = if paused {
                Status::Paused
            } else {
                Status::Running
            };
        }
    }

    pub fn exit(&self, e: ExitInfo) {
        let mut s = self.lock();
        s.status = Status::Stopped;
        s.exit = Some(e);
        drop(s);
        self.exited.notify_waiters();
    }

    pub fn status(&self) -> Status {
        self.lock().status
    }

    pub fn pid(&self) -> u32 {
        self.lock().pid
    }

    pub fn exit_info(&self) -> Option<ExitInfo> {
        self.lock().exit
    }

    /// Marks a kill request for the process in flight until dropped.
    pub fn signalling(&self) -> Signalling<'_> {
        self.lock().signals += 1;
        Signalling(self)
    }

    /// Waits, at most `limit`, until every kill request in flight is answered. containerd
    /// deletes a task when it hears of its exit, which closes that task's connection to the
    /// shim: a kill still unanswered on it fails with "ttrpc: closed" (and StopPodSandbox
    /// with it), so the exit is reported after the answer.
    pub fn signals_answered(&self, limit: Duration) -> bool {
        let s = self.lock();
        let (s, _) = self
            .answered
            .wait_timeout_while(s, limit, |s| s.signals > 0)
            .unwrap_or_else(|e| e.into_inner());
        s.signals == 0
    }

    /// Ends when the process has exited.
    pub async fn wait(&self) -> ExitInfo {
        loop {
            // Registered before the check, so an exit in between still wakes it.
            let mut exited = std::pin::pin!(self.exited.notified());
            exited.as_mut().enable();
            if let Some(e) = self.exit_info() {
                return e;
            }
            exited.await;
        }
    }
}

/// A kill request in flight (see `Proc::signals_answered`).
pub struct Signalling<'a>(&'a Proc);

impl Drop for Signalling<'_> {
    fn drop(&mut self) {
        self.0.lock().signals -= 1;
        self.0.answered.notify_all();
    }
}

/// A container of the pod.
#[derive(Debug)]
pub struct Task {
    pub id: String,
    pub bundle: String,
    pub pod: Arc<Pod>,
    /// The pod VM's disk slot holding this container's image.
    pub slot: String,
    pub init: Arc<Proc>,
    pub execs: Mutex<HashMap<String, Arc<Proc>>>,
}

impl Task {
    pub fn process(&self, exec_id: &str) -> Option<Arc<Proc>> {
        if exec_id.is_empty() {
            return Some(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec_id)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn proc_() -> Arc<Proc> {
        Proc::new("", StdioPaths::default(), Vec::new()).unwrap()
    }

    #[test]
    fn an_exit_waits_for_the_kill_requests_in_flight() {
        let p = proc_();
        assert!(p.signals_answered(Duration::ZERO), "none in flight");
        let (first, second) = (p.signalling(), p.signalling());
        let t0 = Instant::now();
        assert!(!p.signals_answered(Duration::from_millis(30)));
        assert!(t0.elapsed() >= Duration::from_millis(30));
        drop(first);
        assert!(!p.signals_answered(Duration::ZERO), "one is left");
        let waiter = {
            let p = p.clone();
            std::thread::spawn(move || {
                let t0 = Instant::now();
                (p.signals_answered(Duration::from_secs(10)), t0.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        drop(second);
        let (answered, waited) = waiter.join().unwrap();
        assert!(answered);
        assert!(
            (Duration::from_millis(40)..Duration::from_secs(5)).contains(&waited),
            "{waited:?}: woken by the answer, not the limit"
        );
    }

    #[test]
    fn a_wait_ends_at_the_exit_and_a_later_one_at_once() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let p = proc_();
        let waiter = rt.spawn({
            let p = p.clone();
            async move { p.wait().await }
        });
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(30)).await });
        assert!(!waiter.is_finished(), "ended before the exit");
        let exit = ExitInfo {
            status: 3,
            at_unix_ns: 7,
        };
        // From a plain thread, as the shim reports exits.
        let exiting = p.clone();
        std::thread::spawn(move || exiting.exit(exit))
            .join()
            .unwrap();
        assert_eq!(rt.block_on(waiter).unwrap(), exit);
        assert_eq!(rt.block_on(p.wait()), exit);
        assert_eq!(p.status(), Status::Stopped);
    }
}
