//! PID 1 reaps every child and orphan. Exit statuses of processes the agent started are kept
//! until a waiter collects them; libcontainer tolerates its helper processes being reaped here.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use signal_hook::consts::SIGCHLD;
use signal_hook::iterator::Signals;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128 + signal for a process killed by a signal.
    pub status: i32,
    pub at_unix_ns: i64,
}

/// Exits reaped but not yet collected. Bounded: statuses of helper processes nobody waits
/// for are dropped oldest first.
#[derive(Debug, Default)]
pub struct Exits {
    done: Mutex<HashMap<i32, (u64, Exit)>>,
    cond: Condvar,
    /// Order of reaping, to drop the oldest unclaimed exits first.
    seq: std::sync::atomic::AtomicU64,
}

const KEEP: usize = 4096;

impl Exits {
    fn record(&self, pid: i32, status: i32) {
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        done.insert(
            pid,
            (
                seq,
                Exit {
                    status,
                    at_unix_ns: at,
                },
            ),
        );
        if done.len() > KEEP {
            if let Some(oldest) = done.iter().min_by_key(|(_, (s, _))| *s).map(|(p, _)| *p) {
                done.remove(&oldest);
            }
        }
        self.cond.notify_all();
    }

    /// Blocks until `pid` has exited, and returns its exit without consuming it (several
    /// waiters may ask; [`Exits::forget`] drops it).
    pub fn wait(&self, pid: i32) -> Exit {
        // Only a deadline ends the wait without an exit.
        self.wait_until(pid, None).unwrap_or_else(|| unreachable!())
    }

    /// As [`Exits::wait`], giving up after `limit`.
    pub fn wait_for(&self, pid: i32, limit: Duration) -> Option<Exit> {
        self.wait_until(pid, Some(Instant::now() + limit))
    }

    fn wait_until(&self, pid: i32, deadline: Option<Instant>) -> Option<Exit> {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some((_, exit)) = done.get(&pid) {
                return Some(*exit);
            }
            done = match deadline {
                None => self.cond.wait(done).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.checked_duration_since(Instant::now())?;
                    self.cond
                        .wait_timeout(done, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// The exit of `pid` if it has ended.
    pub fn try_get(&self, pid: i32) -> Option<Exit> {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&pid)
            .map(|(_, e)| *e)
    }

    pub fn forget(&self, pid: i32) {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
    }
}

fn reap_all(exits: &Exits) {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => exits.record(pid.as_raw(), code),
            Ok(WaitStatus::Signaled(pid, sig, _)) => exits.record(pid.as_raw(), 128 + sig as i32),
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Starts the reaper thread.
pub fn spawn() -> std::io::Result<Arc<Exits>> {
    let exits = Arc::new(Exits::default());
    let mut signals = Signals::new([SIGCHLD])?;
    let e = exits.clone();
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || {
            reap_all(&e);
            for _ in signals.forever() {
                reap_all(&e);
            }
        })?;
    Ok(exits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_for_gives_up_at_its_limit_and_sees_a_later_exit() {
        let exits = Arc::new(Exits::default());
        let started = Instant::now();
        assert_eq!(exits.wait_for(7, Duration::from_millis(50)), None);
        assert!(started.elapsed() >= Duration::from_millis(50));
        let e = exits.clone();
        let t = std::thread::spawn(move || e.wait_for(7, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        exits.record(7, 3);
        assert_eq!(t.join().unwrap().map(|e| e.status), Some(3));
        assert_eq!(exits.wait_for(7, Duration::ZERO).map(|e| e.status), Some(3));
    }
}
