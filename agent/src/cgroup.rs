//! Container usage from the guest's cgroup v2 files, and OOM kills as events.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::error::{AgentError, Result};

const ROOT: &str = "/sys/fs/cgroup";

/// The cgroup directory of a cgroup path such as `/kubevirt/c1`.
pub fn dir(cgroup_path: &str) -> PathBuf {
    Path::new(ROOT).join(cgroup_path.trim_start_matches('/'))
}

/// `key value` lines (cpu.stat, memory.stat, memory.events) as a map.
fn keyed(path: &Path) -> Result<HashMap<String, u64>> {
    let text =
        fs::read_to_string(path).map_err(AgentError::io(format!("read {}", path.display())))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect())
}

fn single(path: &Path) -> Result<u64> {
    let text =
        fs::read_to_string(path).map_err(AgentError::io(format!("read {}", path.display())))?;
    match text.trim() {
        "max" => Ok(0),
        v => v.parse().map_err(|_| {
            AgentError::invalid(path.display().to_string(), format!("{v:?} is not a number"))
        }),
    }
}

/// A snapshot of a container cgroup's usage.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Usage {
    pub cpu_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub memory_bytes: u64,
    /// 0 = no limit.
    pub memory_limit_bytes: u64,
    /// Usage minus inactive file pages: what kubelet evicts on.
    pub working_set_bytes: u64,
    pub pids: u64,
    pub oom_kills: u64,
}

pub fn usage(cgroup_path: &str) -> Result<Usage> {
    let d = dir(cgroup_path);
    let cpu = keyed(&d.join("cpu.stat"))?;
    let mem = keyed(&d.join("memory.stat"))?;
    let events = keyed(&d.join("memory.events"))?;
    let memory_bytes = single(&d.join("memory.current"))?;
    let inactive = mem.get("inactive_file").copied().unwrap_or(0);
    Ok(Usage {
        cpu_usec: cpu.get("usage_usec").copied().unwrap_or(0),
        cpu_user_usec: cpu.get("user_usec").copied().unwrap_or(0),
        cpu_system_usec: cpu.get("system_usec").copied().unwrap_or(0),
        memory_bytes,
        memory_limit_bytes: single(&d.join("memory.max"))?,
        working_set_bytes: memory_bytes.saturating_sub(inactive),
        pids: single(&d.join("pids.current"))?,
        oom_kills: events.get("oom_kill").copied().unwrap_or(0),
    })
}

/// Watches the memory.events of each container's cgroup and queues one event per new OOM kill.
#[derive(Debug)]
pub struct OomWatcher {
    inotify: Inotify,
    watched: Mutex<HashMap<WatchDescriptor, (String, PathBuf, u64)>>,
    queue: Mutex<VecDeque<String>>,
    cond: Condvar,
}

impl OomWatcher {
    pub fn spawn() -> Result<Arc<OomWatcher>> {
        let inotify =
            Inotify::init(InitFlags::IN_CLOEXEC).map_err(AgentError::sys("inotify_init"))?;
        let w = Arc::new(OomWatcher {
            inotify,
            watched: Mutex::default(),
            queue: Mutex::default(),
            cond: Condvar::new(),
        });
        let me = w.clone();
        std::thread::Builder::new()
            .name("oom".into())
            .spawn(move || me.run())
            .map_err(AgentError::io("spawn the OOM watcher"))?;
        Ok(w)
    }

    /// Starts watching the cgroup of `container_id`.
    pub fn watch(&self, container_id: &str, cgroup_path: &str) -> Result<()> {
        let events = dir(cgroup_path).join("memory.events");
        let wd = self
            .inotify
            .add_watch(&events, AddWatchFlags::IN_MODIFY)
            .map_err(AgentError::sys(format!("watch {}", events.display())))?;
        let seen = keyed(&events)?.get("oom_kill").copied().unwrap_or(0);
        self.watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(wd, (container_id.to_owned(), events, seen));
        Ok(())
    }

    pub fn unwatch(&self, container_id: &str) {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<_> = watched
            .iter()
            .filter(|(_, (c, _, _))| c == container_id)
            .map(|(wd, _)| *wd)
            .collect();
        for wd in gone {
            let _ = self.inotify.rm_watch(wd);
            watched.remove(&wd);
        }
    }

    fn run(&self) {
        loop {
            let Ok(events) = self.inotify.read_events() else {
                continue;
            };
            let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
            for ev in events {
                let Some((id, path, seen)) = watched.get_mut(&ev.wd) else {
                    continue;
                };
                let now = keyed(path)
                    .ok()
                    .and_then(|m| m.get("oom_kill").copied())
                    .unwrap_or(*seen);
                if now > *seen {
                    log::info!("container {id}: OOM kill in its cgroup");
                    *seen = now;
                    self.queue
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_back(id.clone());
                    self.cond.notify_all();
                }
            }
        }
    }

    /// Blocks until a container has an OOM kill and returns its id.
    pub fn next(&self) -> String {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(id) = q.pop_front() {
                return id;
            }
            q = self.cond.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }
}
