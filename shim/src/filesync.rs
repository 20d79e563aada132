//! Keeps the files copied into the pod VM (ConfigMaps, Secrets, hosts, resolv.conf) current.
//! One thread per pod sleeps on inotify watches of their host sources' directories and,
//! when something there changes, copies again each source whose files did. kubelet updates
//! a ConfigMap volume by renaming a new `..data` link into its directory, which that
//! directory's watch sees. Where inotify is not to be had (the per-user limits of instances
//! or watches reached) the thread looks every few seconds instead, and says so once.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::error::{Result, ShimError};
use crate::mounts::{Copy, MAX_DEPTH};

/// How often sources are looked at where inotify is not to be had.
const FALLBACK_EVERY: Duration = Duration::from_secs(2);
/// Events closer together than this are one change (a writer's write, rename, chmod).
const SETTLE: Duration = Duration::from_millis(50);
/// The longest a stream of events delays a copy.
const SETTLE_AT_MOST: Duration = Duration::from_millis(500);

/// (path, size, mtime) of every file under a source: what changes when the host updates it.
type Signature = Vec<(PathBuf, u64, SystemTime)>;

type CopyFn = dyn Fn(&Copy) -> Result<()> + Send + Sync;

/// The copies of one pod, by the container that has them.
pub struct FileSync {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    state: Mutex<State>,
    /// Written when the sources change or the thread must stop.
    wake: EventFd,
    copy: Box<CopyFn>,
    inotify: bool,
}

#[derive(Default)]
struct State {
    sources: HashMap<String, Vec<(Copy, Signature)>>,
    stop: bool,
}

impl std::fmt::Debug for FileSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSync").finish_non_exhaustive()
    }
}

impl FileSync {
    /// `copy` puts one source into the VM.
    pub fn new(copy: impl Fn(&Copy) -> Result<()> + Send + Sync + 'static) -> Result<Self> {
        Self::build(copy, true)
    }

    /// `inotify` false: look periodically, as where inotify is not to be had.
    fn build(
        copy: impl Fn(&Copy) -> Result<()> + Send + Sync + 'static,
        inotify: bool,
    ) -> Result<Self> {
        let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)
            .map_err(|e| ShimError::io("create the file sync's eventfd")(e.into()))?;
        Ok(FileSync {
            shared: Arc::new(Shared {
                state: Mutex::default(),
                wake,
                copy: Box::new(copy),
                inotify,
            }),
            thread: Mutex::default(),
        })
    }

    /// Copies `copies` in now and keeps them current until [`FileSync::remove`].
    pub fn add(&self, owner: &str, copies: Vec<Copy>) -> Result<()> {
        if copies.is_empty() {
            return Ok(());
        }
        let mut kept = Vec::with_capacity(copies.len());
        for c in copies {
            // Before the copy: a change during it is then seen as one.
            let seen = signature(&c.host);
            (self.shared.copy)(&c)?;
            kept.push((c, seen));
        }
        self.shared
            .lock()
            .sources
            .entry(owner.to_owned())
            .or_default()
            .extend(kept);
        let mut thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if thread.is_none() && !self.shared.lock().stop {
            let shared = self.shared.clone();
            *thread = Some(
                std::thread::Builder::new()
                    .name("file-sync".into())
                    .spawn(move || shared.run())
                    .map_err(ShimError::io("start the file sync thread"))?,
            );
        }
        self.shared.wake();
        Ok(())
    }

    /// Stops keeping `owner`'s copies current.
    pub fn remove(&self, owner: &str) {
        if self.shared.lock().sources.remove(owner).is_some() {
            self.shared.wake();
        }
    }

    /// Tells the thread to end (for good: later sources are copied once, not kept current)
    /// without waiting for it: a copy in flight to a hung guest may take its whole deadline.
    pub fn stop(&self) {
        self.shared.lock().stop = true;
        self.shared.wake();
    }
}

impl Drop for FileSync {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        let _ = self.wake.write(1);
    }

    fn run(&self) {
        let mut watches = Watches::new(self.inotify);
        loop {
            if self.lock().stop {
                return;
            }
            // Watches first, then the look: a change in between is both seen and woken for.
            let dirs: HashSet<PathBuf> = self
                .lock()
                .sources
                .values()
                .flatten()
                .flat_map(|(c, _)| watched_dirs(&c.host))
                .collect();
            let periodic = !watches.set(&dirs);
            self.refresh();
            let timeout = if periodic {
                PollTimeout::try_from(FALLBACK_EVERY).unwrap_or(PollTimeout::MAX)
            } else {
                PollTimeout::NONE
            };
            let (woken, changed) = watches.wait(&self.wake, timeout);
            if woken {
                let _ = self.wake.read();
            }
            if changed {
                watches.settle();
            }
        }
    }

    /// Copies again every source whose files changed since they were last copied.
    fn refresh(&self) {
        let stale: Vec<(String, Copy, Signature)> = self
            .lock()
            .sources
            .iter()
            .flat_map(|(owner, list)| list.iter().map(move |(c, seen)| (owner, c, seen)))
            .filter_map(|(owner, c, seen)| {
                let now = signature(&c.host);
                (now != *seen).then(|| (owner.clone(), c.clone(), now))
            })
            .collect();
        // The copies go through the agent without the lock held.
        for (owner, c, now) in stale {
            if self.lock().stop {
                return;
            }
            match (self.copy)(&c) {
                Ok(()) => log::info!("updated {} in the VM", c.host.display()),
                Err(e) => log::warn!("update {} in the VM: {e}", c.host.display()),
            }
            let mut state = self.lock();
            if let Some((_, seen)) = state
                .sources
                .get_mut(&owner)
                .and_then(|l| l.iter_mut().find(|(k, _)| k.rel == c.rel))
            {
                *seen = now;
            }
        }
    }
}

/// The directories whose events mean that `source` may have changed: a directory source's
/// whole tree, a file's parent (kubelet and editors replace files by renaming).
fn watched_dirs(source: &Path) -> Vec<PathBuf> {
    fn walk(p: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        if depth >= MAX_DEPTH || !p.is_dir() {
            return;
        }
        out.push(p.to_owned());
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            walk(&e.path(), depth + 1, out);
        }
    }
    let mut out = Vec::new();
    if source.is_dir() {
        walk(source, 0, &mut out);
    } else if let Some(parent) = source.parent() {
        out.push(parent.to_owned());
    }
    out
}

/// What changes when the host updates `source` (symbolic links followed).
fn signature(source: &Path) -> Signature {
    fn walk(p: &Path, depth: usize, out: &mut Signature) {
        let Ok(m) = std::fs::metadata(p) else { return };
        if !m.is_dir() {
            out.push((
                p.to_owned(),
                m.len(),
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            ));
            return;
        }
        if depth >= MAX_DEPTH {
            return;
        }
        let mut entries: Vec<_> = std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        entries.iter().for_each(|e| walk(e, depth + 1, out));
    }
    let mut out = Vec::new();
    walk(source, 0, &mut out);
    out
}

/// The inotify watches of the sources' directories; none where inotify is not to be had.
struct Watches {
    inotify: Option<Inotify>,
    by_dir: HashMap<PathBuf, WatchDescriptor>,
    warned: bool,
}

impl Watches {
    fn new(wanted: bool) -> Self {
        let inotify = wanted
            .then(|| Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC))
            .transpose()
            .inspect_err(|e| {
                log::warn!("inotify: {e}; files copied into the VM are looked at every {FALLBACK_EVERY:?} (raise fs.inotify.max_user_instances)")
            })
            .ok()
            .flatten();
        Watches {
            warned: inotify.is_none(),
            inotify,
            by_dir: HashMap::new(),
        }
    }

    /// Watches exactly `dirs`; false if some cannot be watched.
    fn set(&mut self, dirs: &HashSet<PathBuf>) -> bool {
        let Some(inotify) = &self.inotify else {
            return false;
        };
        self.by_dir.retain(|dir, wd| {
            let keep = dirs.contains(dir);
            if !keep {
                // Fails harmlessly for a directory that is gone (its watch went with it).
                let _ = inotify.rm_watch(*wd);
            }
            keep
        });
        let mask = AddWatchFlags::IN_MODIFY
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_ONLYDIR;
        let mut all = true;
        for dir in dirs {
            // Added again each time: a directory replaced under the same name gets a new
            // watch (for one still there this returns the same descriptor).
            match inotify.add_watch(dir, mask) {
                Ok(wd) => {
                    self.by_dir.insert(dir.clone(), wd);
                }
                // Gone since it was listed: the next look sees what replaced it.
                Err(nix::errno::Errno::ENOENT) => {}
                Err(e) => {
                    if !self.warned {
                        log::warn!("inotify watch of {}: {e}; files copied into the VM are looked at every {FALLBACK_EVERY:?} (raise fs.inotify.max_user_watches)", dir.display());
                        self.warned = true;
                    }
                    all = false;
                }
            }
        }
        all
    }

    /// Sleeps until `wake` is written, a watched directory changes or `timeout` passes;
    /// returns (woken, changed).
    fn wait(&self, wake: &EventFd, timeout: PollTimeout) -> (bool, bool) {
        let mut fds = vec![PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
        if let Some(i) = &self.inotify {
            fds.push(PollFd::new(i.as_fd(), PollFlags::POLLIN));
        }
        if poll(&mut fds, timeout).unwrap_or(0) <= 0 {
            return (false, false);
        }
        let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
        (ready(&fds[0]), fds.get(1).is_some_and(ready))
    }

    /// Reads events until none came for [`SETTLE`] (at most [`SETTLE_AT_MOST`]).
    fn settle(&self) {
        let Some(inotify) = &self.inotify else { return };
        let end = Instant::now() + SETTLE_AT_MOST;
        while inotify.read_events().is_ok_and(|e| !e.is_empty()) && Instant::now() < end {
            let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
            let wait = PollTimeout::try_from(SETTLE).unwrap_or(PollTimeout::MAX);
            if poll(&mut fds, wait).unwrap_or(0) <= 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests;
