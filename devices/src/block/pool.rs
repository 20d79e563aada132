//! The I/O threads behind the disks: one pool may serve every disk of a VM, so a pod with a
//! scratch disk and four image slots holds a few threads rather than two per disk. Each
//! disk is a lane of the pool: its jobs keep their arrival order and its own rule on
//! changes (see [`Change`]), and its finished requests go back to it alone, announced on
//! its eventfd once per batch (the eventfd is written only when the device has drained the
//! previous announcement, which saves a syscall and a wake-up per request under load).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::io::{execute, refuse, DiskSource, Done, Job};
use super::request::{Op, ID_LEN};

/// I/O threads per disk: two let a large transfer proceed while another one copies (the
/// page-cache copy of a 1 MiB request takes ~100 us of one core).
pub const THREADS_PER_DISK: usize = 2;
/// The most threads [`IoPool::for_disks`] gives one VM's disks.
pub const MAX_THREADS: usize = 4;

/// Run first on each I/O thread (the embedding program's seccomp filter); a thread whose
/// set-up fails answers its requests with an error, so no request waits forever.
pub type IoSetup = fn() -> Result<(), String>;

/// Writes, discards and write-zeroes hold the file's inode lock for all of their work.
/// Small writes still gain from a second thread (their work outside the lock overlaps), but
/// beside a long change a second thread only spins on the lock (a core lost, not a write
/// gained): a long change runs alone among the changes of its disk, while reads go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    None,
    Short,
    Long,
}

/// Writes larger than this are long changes.
const LONG_WRITE: u64 = 64 << 10;

impl Job {
    fn change(&self) -> Change {
        match self.req.op {
            Op::Write { .. } if self.req.len <= LONG_WRITE => Change::Short,
            Op::Write { .. } | Op::Discard { .. } | Op::WriteZeroes { .. } => Change::Long,
            Op::Read { .. } | Op::Flush | Op::GetId => Change::None,
        }
    }
}

/// One disk served by the pool.
#[derive(Debug)]
struct Lane {
    key: u64,
    disk: DiskSource,
    /// The serial, for GET_ID.
    id: [u8; ID_LEN],
    done: Sender<Done>,
    notify: EventFd,
    /// Set by a thread when it writes `notify`, cleared by [`Worker::rearm`]: while set,
    /// the device has yet to drain `done` and further completions need no signal.
    announced: AtomicBool,
}

impl Lane {
    fn complete(&self, done: Done) {
        // The receiver outlives every job of the lane (see `JobQueue::forget`).
        let _ = self.done.send(done);
        // Pairs with `rearm`: the send is visible before the flag is read.
        if !self.announced.swap(true, Ordering::SeqCst) {
            if let Err(e) = self.notify.write(1) {
                log::warn!("virtio-blk: cannot signal completion: {e}");
            }
        }
    }
}

/// What a lane has queued or running, and its changes under way.
#[derive(Debug, Default)]
struct LaneState {
    outstanding: usize,
    running: usize,
    changes: usize,
    long_change: bool,
}

impl LaneState {
    /// A disk runs at most [`THREADS_PER_DISK`] jobs at once, as with threads of its own:
    /// a busy disk leaves the rest of the pool to the others.
    fn may_start(&self, change: Change) -> bool {
        self.running < THREADS_PER_DISK
            && match change {
                Change::None => true,
                Change::Short => !self.long_change,
                Change::Long => self.changes == 0,
            }
    }
}

/// Jobs waiting for an I/O thread. An idle thread parks on the condvar at once and a job
/// wakes one: a shared channel receiver behind a mutex woke the second idle thread on
/// every job only for it to block again, and a channel whose receivers spin and yield
/// before parking kept a CPU busy just when the thread serving the queue was woken onto
/// it (its wake-up to run delay doubled, `perf sched latency`).
#[derive(Debug, Default)]
struct JobQueue {
    state: Mutex<Queued>,
    ready: Condvar,
    /// A lane's last outstanding job finished.
    settled: Condvar,
}

#[derive(Debug, Default)]
struct Queued {
    jobs: VecDeque<(Arc<Lane>, Job)>,
    lanes: HashMap<u64, LaneState>,
    /// Every lane is gone: the threads end once the queue is empty.
    closed: bool,
}

impl JobQueue {
    fn lock(&self) -> MutexGuard<'_, Queued> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job` on `lane`; gives it back once the queue is closed.
    fn push(&self, lane: &Arc<Lane>, job: Job) -> Result<(), Job> {
        let mut q = self.lock();
        if q.closed {
            return Err(job);
        }
        q.lanes.entry(lane.key).or_default().outstanding += 1;
        q.jobs.push_back((lane.clone(), job));
        drop(q);
        self.ready.notify_one();
        Ok(())
    }

    /// The next job in arrival order that may start beside what its lane runs, waiting
    /// for one; `None` once the queue is closed and empty. The caller reports
    /// the job's end with [`JobQueue::finished`].
    fn pop(&self) -> Option<(Arc<Lane>, Job)> {
        let mut q = self.lock();
        loop {
            let Queued { jobs, lanes, .. } = &mut *q;
            let next = jobs.iter().position(|(lane, job)| {
                lanes
                    .get(&lane.key)
                    .is_some_and(|l| l.may_start(job.change()))
            });
            if let Some((lane, job)) = next.and_then(|i| jobs.remove(i)) {
                if let Some(l) = lanes.get_mut(&lane.key) {
                    l.running += 1;
                    match job.change() {
                        Change::None => {}
                        Change::Short => l.changes += 1,
                        Change::Long => (l.changes, l.long_change) = (1, true),
                    }
                }
                return Some((lane, job));
            }
            if q.closed && q.jobs.is_empty() {
                return None;
            }
            q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// A job taken by `pop` is done: the jobs of its lane it held back may start.
    fn finished(&self, key: u64, change: Change) {
        let mut q = self.lock();
        let Some(l) = q.lanes.get_mut(&key) else {
            return;
        };
        l.outstanding = l.outstanding.saturating_sub(1);
        l.running = l.running.saturating_sub(1);
        if change != Change::None {
            l.changes = l.changes.saturating_sub(1);
            l.long_change &= change != Change::Long;
        }
        let settled = l.outstanding == 0;
        let waiting = !q.jobs.is_empty();
        drop(q);
        if waiting {
            self.ready.notify_one();
        }
        if settled {
            self.settled.notify_all();
        }
    }

    /// Waits for the lane's queued and running jobs to finish, then forgets the lane.
    fn forget(&self, key: u64) {
        let mut q = self.lock();
        while q.lanes.get(&key).is_some_and(|l| l.outstanding > 0) {
            q = self.settled.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        q.lanes.remove(&key);
    }

    /// Lets the threads finish what is queued, then end.
    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

/// A pool of I/O threads that disks share; cloning it shares it. The threads end once the
/// last clone and the last disk using it are gone.
#[derive(Clone, Debug)]
pub struct IoPool(Arc<Threads>);

#[derive(Debug)]
struct Threads {
    queue: Arc<JobQueue>,
    handles: Vec<JoinHandle<()>>,
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.queue.close();
        for t in self.handles.drain(..) {
            if t.join().is_err() {
                log::error!("virtio-blk: I/O thread panicked");
            }
        }
    }
}

static NEXT_LANE: AtomicU64 = AtomicU64::new(0);

impl IoPool {
    /// Starts `threads` (at least one) I/O threads named `name`, `name.1`, ...; each runs
    /// `setup` first.
    pub fn new(name: &str, threads: usize, setup: Option<IoSetup>) -> io::Result<IoPool> {
        let queue = Arc::new(JobQueue::default());
        let mut pool = Threads {
            queue: queue.clone(),
            handles: Vec::new(),
        };
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            let thread_name = match i {
                0 => name.to_owned(),
                _ => format!("{name}.{i}"),
            };
            let thread = std::thread::Builder::new()
                .name(thread_name)
                .spawn(move || serve(&queue, setup));
            // On an error, dropping `pool` ends and joins the threads already started.
            pool.handles.push(thread?);
        }
        Ok(IoPool(Arc::new(pool)))
    }

    /// The pool for a VM with `disks` disks: [`THREADS_PER_DISK`] each, at most
    /// [`MAX_THREADS`], named `blk-io`.
    pub fn for_disks(disks: usize, setup: Option<IoSetup>) -> io::Result<IoPool> {
        Self::new("blk-io", (disks * THREADS_PER_DISK).min(MAX_THREADS), setup)
    }

    /// The threads' share of this pool: a new lane for one disk.
    pub(crate) fn lane(&self, disk: DiskSource, id: [u8; ID_LEN], notify: EventFd) -> Worker {
        let (done_tx, done) = channel();
        let lane = Arc::new(Lane {
            key: NEXT_LANE.fetch_add(1, Ordering::Relaxed),
            disk,
            id,
            done: done_tx,
            notify,
            announced: AtomicBool::new(false),
        });
        Worker {
            pool: self.clone(),
            lane,
            done,
        }
    }
}

/// An I/O thread: runs jobs until the pool closes.
fn serve(queue: &JobQueue, setup: Option<IoSetup>) {
    let set_up = setup.map_or(Ok(()), |f| f());
    if let Err(e) = &set_up {
        log::error!("virtio-blk: I/O thread not set up, failing its requests: {e}");
    }
    while let Some((lane, job)) = queue.pop() {
        let change = job.change();
        let done = match &set_up {
            Ok(()) => execute(lane.disk.current().as_deref(), &lane.id, job),
            Err(_) => refuse(job),
        };
        lane.complete(done);
        queue.finished(lane.key, change);
    }
}

/// One disk's share of an [`IoPool`]; dropping it waits for the disk's requests to finish.
#[derive(Debug)]
pub(crate) struct Worker {
    pool: IoPool,
    lane: Arc<Lane>,
    done: Receiver<Done>,
}

impl Worker {
    /// Called after consuming the eventfd and before draining [`Worker::try_done`]: a
    /// request finished from now on signals again.
    pub fn rearm(&self) {
        self.lane.announced.store(false, Ordering::SeqCst);
    }

    /// Queues `job`; gives it back if the pool is gone.
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        self.pool.0.queue.push(&self.lane, job)
    }

    /// A finished request, if one is waiting.
    pub fn try_done(&self) -> Option<Done> {
        self.done.try_recv().ok()
    }

    /// Waits for the next finished request.
    pub fn wait_done(&self) -> Option<Done> {
        self.done.recv().ok()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.pool.0.queue.forget(self.lane.key);
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;
    use crate::block::request::Request;
    use crate::block::MediaSlot;

    /// Job `head` doing `op` on `len` bytes.
    fn job(head: u16, op: Op, len: u64) -> Job {
        Job {
            head,
            req: Request {
                op,
                data: Vec::new(),
                len,
                status: GuestAddress(0),
            },
            mem: GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap(),
        }
    }

    fn lane() -> Arc<Lane> {
        Arc::new(Lane {
            key: NEXT_LANE.fetch_add(1, Ordering::Relaxed),
            disk: DiskSource::Slot(MediaSlot::new()),
            id: [0; ID_LEN],
            done: channel().0,
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            announced: AtomicBool::new(false),
        })
    }

    const READ: Op = Op::Read { sector: 0 };
    const WRITE: Op = Op::Write { sector: 0 };

    #[test]
    fn a_long_change_runs_alone_among_changes_while_reads_go_on() {
        let (q, a) = (JobQueue::default(), lane());
        let discard = Op::Discard {
            sector: 0,
            sectors: 8,
        };
        for (head, op, len) in [
            (0, WRITE, LONG_WRITE + 512),
            (1, WRITE, 4096),
            (2, READ, 4096),
            (3, discard, 0),
        ] {
            q.push(&a, job(head, op, len)).unwrap();
        }
        let pop = || q.pop().unwrap().1.head;
        // The long write starts; the short write waits for it, reads do not.
        assert_eq!(pop(), 0);
        assert_eq!(pop(), 2);
        q.finished(a.key, Change::None);
        q.push(&a, job(4, READ, 1 << 20)).unwrap();
        assert_eq!(pop(), 4);
        q.finished(a.key, Change::None);
        q.finished(a.key, Change::Long);
        // Short changes may run side by side, but not beside a long one.
        assert_eq!(pop(), 1);
        q.push(&a, job(5, WRITE, 512)).unwrap();
        assert_eq!(pop(), 5, "the discard waits for both writes");
        q.finished(a.key, Change::Short);
        q.finished(a.key, Change::Short);
        assert_eq!(pop(), 3);
        q.finished(a.key, Change::Long);
        q.close();
        assert!(q.pop().is_none());
    }

    #[test]
    fn a_long_change_holds_back_only_the_changes_of_its_own_disk() {
        let (q, a, b) = (JobQueue::default(), lane(), lane());
        q.push(&a, job(0, WRITE, LONG_WRITE + 512)).unwrap();
        q.push(&a, job(1, WRITE, 512)).unwrap();
        q.push(&b, job(2, WRITE, LONG_WRITE + 512)).unwrap();
        q.push(&b, job(3, READ, 512)).unwrap();
        let pop = || {
            let (lane, job) = q.pop().unwrap();
            (lane.key, job.head)
        };
        assert_eq!(pop(), (a.key, 0));
        assert_eq!(pop(), (b.key, 2), "b's long write starts beside a's");
        assert_eq!(pop(), (b.key, 3));
        q.finished(a.key, Change::Long);
        assert_eq!(pop(), (a.key, 1));
    }

    #[test]
    fn a_busy_disk_runs_no_more_jobs_at_once_than_with_threads_of_its_own() {
        let (q, a, b) = (JobQueue::default(), lane(), lane());
        for head in 0..3 {
            q.push(&a, job(head, READ, 512)).unwrap();
        }
        q.push(&b, job(3, READ, 512)).unwrap();
        let pop = || {
            let (lane, job) = q.pop().unwrap();
            (lane.key, job.head)
        };
        assert_eq!(THREADS_PER_DISK, 2);
        assert_eq!(pop(), (a.key, 0));
        assert_eq!(pop(), (a.key, 1));
        assert_eq!(pop(), (b.key, 3), "a's third read waits for one of its two");
        q.finished(a.key, Change::None);
        assert_eq!(pop(), (a.key, 2));
    }

    #[test]
    fn forgetting_a_lane_waits_for_its_jobs_and_not_for_the_others() {
        let (q, a, b) = (Arc::new(JobQueue::default()), lane(), lane());
        q.push(&a, job(0, READ, 512)).unwrap();
        q.push(&b, job(1, READ, 512)).unwrap();
        // b has nothing running: forgetting it waits for nothing.
        let (_, first) = q.pop().unwrap();
        let (_, second) = q.pop().unwrap();
        q.finished(b.key, Change::None);
        q.forget(b.key);
        assert_eq!((first.head, second.head), (0, 1));
        let forgetting = {
            let q = q.clone();
            let key = a.key;
            std::thread::spawn(move || q.forget(key))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!forgetting.is_finished(), "a's job still runs");
        q.finished(a.key, Change::None);
        forgetting.join().unwrap();
        assert!(q.lock().lanes.is_empty());
    }
}
