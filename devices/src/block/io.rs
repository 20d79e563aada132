//! The disk back end and its worker threads: requests arrive over a channel, file I/O runs
//! with pread/pwrite straight between the file and guest memory (no bounce buffer), and
//! each finished request is sent back and announced on an eventfd the transport watches
//! (once per batch: the eventfd is written only when the device has drained the previous
//! announcement, which saves a syscall and a wake-up per request under load).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::request::{Op, Request, Segment, ID_LEN, SECTOR_SIZE};
use super::BlockError;

// linux/fs.h
vmm_sys_util::ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, u64);
vmm_sys_util::ioctl_io_nr!(BLKDISCARD, 0x12, 119);

/// Most iovecs per preadv/pwritev call (the kernel's UIO_MAXIOV is 1024).
const MAX_IOVECS: usize = 256;
/// Largest zero buffer written when the file system cannot zero a range itself.
const ZERO_CHUNK: u64 = 1 << 20;

/// An open disk: a regular file or a host block device.
#[derive(Debug)]
pub(crate) struct Disk {
    file: File,
    block_device: bool,
    /// Size in bytes, a multiple of 512.
    pub size: u64,
    /// The host's preferred I/O size for the file, in bytes.
    pub block_size: u64,
    /// A medium in a slot may be smaller than the slot: reads past its end are zeros.
    pub zero_past_end: bool,
    /// Reads may ask the page cache alone (RWF_NOWAIT); cleared the first time the file
    /// system refuses the flag.
    nowait_reads: AtomicBool,
}

impl Disk {
    /// Opens `path`; `read_only` opens it without write access, so even a request that
    /// slipped past parsing could not change it.
    pub fn open(path: &Path, read_only: bool) -> Result<Disk, BlockError> {
        let open_err = |source| BlockError::Open {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(open_err)?;
        let ft = meta.file_type();
        if ft.is_dir() {
            return Err(BlockError::NotADisk {
                path: path.to_owned(),
                kind: "a directory",
            });
        }
        if !ft.is_file() && !ft.is_block_device() {
            return Err(BlockError::NotADisk {
                path: path.to_owned(),
                kind: "neither a regular file nor a block device",
            });
        }
        // Root may open a file without write bits for writing; a disk marked read-only on
        // the host is still refused, so a mistake in the config cannot change it.
        if !read_only && ft.is_file() && meta.permissions().readonly() {
            return Err(BlockError::ReadOnlyFile {
                path: path.to_owned(),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let size = if ft.is_block_device() {
            block_device_size(&file).map_err(open_err)?
        } else {
            meta.len()
        };
        if size & (SECTOR_SIZE - 1) != 0 {
            return Err(BlockError::Size {
                path: path.to_owned(),
                size,
            });
        }
        Ok(Disk {
            file,
            block_device: ft.is_block_device(),
            size,
            block_size: meta.blksize().clamp(SECTOR_SIZE, 1 << 20),
            zero_past_end: false,
            nowait_reads: AtomicBool::new(true),
        })
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is a live, exclusive
    // reference for the duration of the call.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(file, BLKGETSIZE64(), &mut size) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// One request handed to the worker, with the guest memory it refers to.
#[derive(Debug)]
pub(crate) struct Job {
    pub head: u16,
    pub req: Request,
    pub mem: GuestMemoryMmap,
}

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Done {
    pub head: u16,
    pub op: Op,
    /// Bytes written into device-writable buffers, status byte included.
    pub used_len: u32,
    /// Bytes moved between the disk and the guest (read or written data).
    pub bytes: u64,
    pub status: u8,
}

/// What the worker threads serve: one disk, or whatever medium a slot holds.
#[derive(Debug, Clone)]
pub(crate) enum DiskSource {
    Fixed(Arc<Disk>),
    Slot(super::media::MediaSlot),
}

impl DiskSource {
    pub(crate) fn current(&self) -> Option<Arc<Disk>> {
        match self {
            DiskSource::Fixed(d) => Some(d.clone()),
            DiskSource::Slot(s) => s.current(),
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
}

#[derive(Debug, Default)]
struct Queued {
    jobs: VecDeque<Job>,
    /// The device is done with the queue: the threads end once it is empty.
    closed: bool,
    /// Changes of the disk the threads are making.
    changes: usize,
    /// One of them is a long one (see [`Change`]).
    long_change: bool,
}

/// Writes, discards and write-zeroes hold the file's inode lock for all of their work.
/// Small writes still gain from a second thread (their work outside the lock overlaps), but
/// beside a long change a second thread only spins on the lock (a core lost, not a write
/// gained): a long change runs alone among changes, while reads go on.
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

impl Queued {
    fn may_start(&self, change: Change) -> bool {
        match change {
            Change::None => true,
            Change::Short => !self.long_change,
            Change::Long => self.changes == 0,
        }
    }
}

impl JobQueue {
    fn lock(&self) -> MutexGuard<'_, Queued> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job`; gives it back once the queue is closed.
    fn push(&self, job: Job) -> Result<(), Job> {
        let mut q = self.lock();
        if q.closed {
            return Err(job);
        }
        q.jobs.push_back(job);
        drop(q);
        self.ready.notify_one();
        Ok(())
    }

    /// The next job in arrival order that may start beside the changes under way (see
    /// [`Change`]), waiting for one; `None` once the queue is closed and empty. The
    /// caller of a change reports its end with [`JobQueue::changed`].
    fn pop(&self) -> Option<Job> {
        let mut q = self.lock();
        loop {
            let next = q.jobs.iter().position(|j| q.may_start(j.change()));
            if let Some(job) = next.and_then(|i| q.jobs.remove(i)) {
                match job.change() {
                    Change::None => {}
                    Change::Short => q.changes += 1,
                    Change::Long => (q.changes, q.long_change) = (1, true),
                }
                return Some(job);
            }
            if q.closed && q.jobs.is_empty() {
                return None;
            }
            q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// A change taken by `pop` is done: those it held back may start.
    fn changed(&self, change: Change) {
        let mut q = self.lock();
        q.changes = q.changes.saturating_sub(1);
        q.long_change &= change != Change::Long;
        let waiting = !q.jobs.is_empty();
        drop(q);
        if waiting {
            self.ready.notify_one();
        }
    }

    /// Lets the threads finish what is queued, then end.
    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

/// The worker threads of one disk; dropping it ends and joins them.
#[derive(Debug)]
pub(crate) struct Worker {
    jobs: Option<Arc<JobQueue>>,
    done: Receiver<Done>,
    /// Set by a worker when it writes the eventfd, cleared by [`Worker::rearm`]: while
    /// set, the device has yet to drain `done` and further completions need no signal.
    announced: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Worker {
    /// Starts `threads` threads named after `name` serving `disk`, taking jobs in
    /// arrival order; each finished request is announced on `notify`.
    pub fn spawn(
        name: String,
        disk: DiskSource,
        id: [u8; ID_LEN],
        notify: EventFd,
        threads: usize,
        setup: Option<fn() -> Result<(), String>>,
    ) -> io::Result<Worker> {
        let jobs = Arc::new(JobQueue::default());
        let (done_tx, done) = channel();
        let announced = Arc::new(AtomicBool::new(false));
        let mut worker = Worker {
            jobs: Some(jobs.clone()),
            done,
            announced,
            threads: Vec::new(),
        };
        for i in 0..threads.max(1) {
            let (queue, done_tx, flag) = (jobs.clone(), done_tx.clone(), worker.announced.clone());
            let (disk, notify) = (disk.clone(), notify.try_clone()?);
            let thread_name = if i == 0 {
                name.clone()
            } else {
                format!("{name}.{i}")
            };
            let thread = std::thread::Builder::new()
                .name(thread_name)
                .spawn(move || {
                    // A thread that cannot be confined does no I/O, but it still answers
                    // (with an error), so no request waits forever.
                    let set_up = setup.map_or(Ok(()), |f| f());
                    if let Err(e) = &set_up {
                        log::error!("virtio-blk: I/O thread not set up, failing its requests: {e}");
                    }
                    // Ends when the device closes the queue.
                    while let Some(job) = queue.pop() {
                        let change = job.change();
                        let done = match &set_up {
                            Ok(()) => execute(disk.current().as_deref(), &id, job),
                            Err(_) => refuse(job),
                        };
                        if change != Change::None {
                            queue.changed(change);
                        }
                        if done_tx.send(done).is_err() {
                            break;
                        }
                        // Pairs with `rearm`: the send is visible before the flag is read.
                        if !flag.swap(true, Ordering::SeqCst) {
                            if let Err(e) = notify.write(1) {
                                log::warn!("virtio-blk: cannot signal completion: {e}");
                            }
                        }
                    }
                });
            // On an error, dropping `worker` ends and joins the threads already started.
            worker.threads.push(thread?);
        }
        Ok(worker)
    }

    /// Called after consuming the eventfd and before draining [`Worker::try_done`]: a
    /// request finished from now on signals again.
    pub fn rearm(&self) {
        self.announced.store(false, Ordering::SeqCst);
    }

    /// Queues `job`; gives it back if the worker is gone.
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        match &self.jobs {
            Some(q) => q.push(job),
            None => Err(job),
        }
    }

    /// A finished request, if one is waiting.
    pub fn try_done(&self) -> Option<Done> {
        self.done.try_recv().ok()
    }

    /// Waits for the next finished request; `None` if the worker is gone.
    pub fn wait_done(&self) -> Option<Done> {
        self.done.recv().ok()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(q) = self.jobs.take() {
            q.close();
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("virtio-blk: worker thread panicked");
            }
        }
    }
}

/// Runs one request and writes its status byte; `disk` is `None` for an empty slot, which
/// reads as zeros and refuses writes.
pub(crate) fn execute(disk: Option<&Disk>, id: &[u8; ID_LEN], job: Job) -> Done {
    let Job { head, req, mem } = job;
    let result = match (req.op, disk) {
        (Op::GetId, _) => write_id(&mem, &req.data, id),
        (Op::Read { .. }, None) => zero_fill(&mem, &req.data),
        (Op::Flush, None) => Ok(0),
        (_, None) => Err(io::Error::other("no medium in the slot")),
        (Op::Read { sector }, Some(disk)) => {
            transfer(disk, &mem, &req.data, sector * SECTOR_SIZE, Dir::Read)
        }
        (Op::Write { sector }, Some(disk)) => {
            transfer(disk, &mem, &req.data, sector * SECTOR_SIZE, Dir::Write)
        }
        (Op::Flush, Some(disk)) => disk.file.sync_data().map(|()| 0),
        (Op::Discard { sector, sectors }, Some(disk)) => discard(disk, sector, sectors).map(|()| 0),
        (
            Op::WriteZeroes {
                sector,
                sectors,
                unmap,
            },
            Some(disk),
        ) => write_zeroes(disk, sector, sectors, unmap).map(|()| 0),
    };
    finish(head, &req, &mem, result)
}

/// Serves a read on the caller's thread where the page cache holds all of its data
/// (RWF_NOWAIT never waits for the disk); gives the job back, for an I/O thread, where any
/// of it would have to wait, or where the file system cannot answer from the cache alone.
pub(crate) fn read_cached(disk: &Disk, job: Job) -> Result<Done, Job> {
    let Op::Read { sector } = job.req.op else {
        return Err(job);
    };
    if !disk.nowait_reads.load(Ordering::Relaxed) {
        return Err(job);
    }
    let offset = sector * SECTOR_SIZE;
    match transfer(disk, &job.mem, &job.req.data, offset, Dir::CachedRead) {
        Ok(n) => Ok(finish(job.head, &job.req, &job.mem, Ok(n))),
        Err(e) => {
            if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) {
                disk.nowait_reads.store(false, Ordering::Relaxed);
            }
            Err(job)
        }
    }
}

/// Answers `job` with an I/O error, doing nothing else.
fn refuse(job: Job) -> Done {
    let refused = Err(io::Error::other("the I/O thread is not set up"));
    finish(job.head, &job.req, &job.mem, refused)
}

/// Writes the status byte of a request that ended with `result` and describes it.
fn finish(head: u16, req: &Request, mem: &GuestMemoryMmap, result: io::Result<u64>) -> Done {
    let (status, bytes) = match result {
        Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
        Err(e) => {
            log::warn!("virtio-blk: {:?} failed: {e}", req.op);
            (VIRTIO_BLK_S_IOERR as u8, 0)
        }
    };
    // The address was checked when the request was parsed; memory never shrinks under it.
    if let Err(e) = mem.write_obj(status, req.status) {
        log::warn!("virtio-blk: cannot write the status byte: {e}");
    }
    let data_in = match req.op {
        Op::Read { .. } | Op::GetId => bytes,
        _ => 0,
    };
    Done {
        head,
        op: req.op,
        used_len: u32::try_from(data_in + 1).unwrap_or(u32::MAX),
        bytes,
        status,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
    /// A read from the page cache only: anything short of all of it is `WouldBlock`.
    CachedRead,
}

/// Moves the data of `segs` at byte `offset` of the disk, in batches of iovecs pointing
/// into guest memory; returns the bytes moved.
fn transfer(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    offset: u64,
    dir: Dir,
) -> io::Result<u64> {
    let mut iovs: Vec<libc::iovec> = Vec::with_capacity(MAX_IOVECS.min(segs.len() + 1));
    let mut guards = Vec::with_capacity(iovs.capacity());
    let mut pos = offset;
    let mut moved = 0;
    for s in segs {
        for slice in mem.get_slices(s.addr, s.len as usize) {
            let slice = slice.map_err(io::Error::other)?;
            // The guard keeps the mapping valid while the pointer is in use (a no-op for
            // plain mmap regions, which live as long as `mem`).
            let guard = slice.ptr_guard_mut();
            iovs.push(libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: guard.len(),
            });
            guards.push(guard);
            if iovs.len() == MAX_IOVECS {
                let n = transfer_iovs(disk, &mut iovs, pos, dir)?;
                pos += n;
                moved += n;
                iovs.clear();
                guards.clear();
            }
        }
    }
    if !iovs.is_empty() {
        moved += transfer_iovs(disk, &mut iovs, pos, dir)?;
    }
    Ok(moved)
}

/// One preadv/pwritev of the whole batch, repeated over short transfers.
fn transfer_iovs(disk: &Disk, iovs: &mut [libc::iovec], offset: u64, dir: Dir) -> io::Result<u64> {
    let fd = disk.file.as_raw_fd();
    let mut first = 0;
    let mut done: u64 = 0;
    while first < iovs.len() {
        let rest = &iovs[first..];
        let off = libc::off_t::try_from(offset + done).map_err(io::Error::other)?;
        let n = match dir {
            // SAFETY: every iovec points into guest memory that `transfer` checked and
            // holds a guard for; the kernel writes at most `iov_len` bytes into each.
            Dir::Read => unsafe { libc::preadv(fd, rest.as_ptr(), rest.len() as i32, off) },
            // SAFETY: as above; the kernel only reads from the buffers.
            Dir::Write => unsafe { libc::pwritev(fd, rest.as_ptr(), rest.len() as i32, off) },
            // SAFETY: as for `Read`; the flag only makes the call fail instead of waiting.
            Dir::CachedRead => unsafe {
                let (iovs, count) = (rest.as_ptr(), rest.len() as i32);
                libc::preadv2(fd, iovs, count, off, libc::RWF_NOWAIT)
            },
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if dir == Dir::CachedRead && (n as usize) < rest.iter().map(|v| v.iov_len).sum() {
            // Part of it is not cached (or the end of the file is near): the I/O thread
            // reads it all again, the normal way.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if n == 0 {
            if disk.zero_past_end && matches!(dir, Dir::Read) {
                for iov in rest {
                    // SAFETY: each iovec points into checked, guarded guest memory of
                    // `iov_len` bytes (see `transfer`).
                    unsafe { std::ptr::write_bytes(iov.iov_base.cast::<u8>(), 0, iov.iov_len) };
                    done += iov.iov_len as u64;
                }
                return Ok(done);
            }
            // The file shrank under us.
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut n = n as usize;
        done += n as u64;
        while first < iovs.len() && n >= iovs[first].iov_len {
            n -= iovs[first].iov_len;
            first += 1;
        }
        if n > 0 {
            let iov = &mut iovs[first];
            // SAFETY: `n` is less than this iovec's length, so the pointer stays inside it.
            iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n).cast() };
            iov.iov_len -= n;
        }
    }
    Ok(done)
}

/// Zeroes the guest buffers of a read from an empty slot.
fn zero_fill(mem: &GuestMemoryMmap, segs: &[Segment]) -> io::Result<u64> {
    let zeroes = [0u8; 4096];
    let mut n = 0;
    for s in segs {
        let mut done = 0u64;
        while done < u64::from(s.len) {
            let len = (u64::from(s.len) - done).min(zeroes.len() as u64) as usize;
            mem.write_slice(&zeroes[..len], s.addr.unchecked_add(done))
                .map_err(io::Error::other)?;
            done += len as u64;
        }
        n += done;
    }
    Ok(n)
}

/// Writes the serial, NUL padded, into the first `ID_LEN` bytes of `segs`.
fn write_id(mem: &GuestMemoryMmap, segs: &[Segment], id: &[u8; ID_LEN]) -> io::Result<u64> {
    let mut written = 0;
    for s in segs {
        let n = (ID_LEN - written).min(s.len as usize);
        mem.write_slice(&id[written..written + n], s.addr)
            .map_err(io::Error::other)?;
        written += n;
        if written == ID_LEN {
            break;
        }
    }
    Ok(written as u64)
}

fn fallocate(disk: &Disk, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
    let len = libc::off_t::try_from(len).map_err(io::Error::other)?;
    loop {
        // SAFETY: fallocate takes only integers; the descriptor is owned by `disk`.
        let ret = unsafe { libc::fallocate(disk.file.as_raw_fd(), mode, off, len) };
        if ret == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL | libc::ENOSYS)
    )
}

/// Deallocates a range. Discard is a hint: where the host cannot deallocate, the data
/// stays and the request still succeeds.
fn discard(disk: &Disk, sector: u64, sectors: u32) -> io::Result<()> {
    let (offset, len) = (sector * SECTOR_SIZE, u64::from(sectors) * SECTOR_SIZE);
    if len == 0 {
        return Ok(());
    }
    let result = if disk.block_device {
        let range = [offset, len];
        // SAFETY: BLKDISCARD reads two u64s (start, length) through the pointer, which
        // points at `range`, alive for the call.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&disk.file, BLKDISCARD(), &range) };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    } else {
        fallocate(
            disk,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    match result {
        Err(e) if unsupported(&e) => Ok(()),
        other => other,
    }
}

/// Zeroes a range: by deallocating it where the driver allows, else by asking the file
/// system (or block device) to zero it, else by writing zeroes.
fn write_zeroes(disk: &Disk, sector: u64, sectors: u32, unmap: bool) -> io::Result<()> {
    let (offset, len) = (sector * SECTOR_SIZE, u64::from(sectors) * SECTOR_SIZE);
    if len == 0 {
        return Ok(());
    }
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    if unmap {
        // Reads of a punched range return zeroes, on files and block devices alike.
        match fallocate(disk, libc::FALLOC_FL_PUNCH_HOLE | keep, offset, len) {
            Err(e) if unsupported(&e) => {}
            other => return other,
        }
    }
    match fallocate(disk, libc::FALLOC_FL_ZERO_RANGE | keep, offset, len) {
        Err(e) if unsupported(&e) => {}
        other => return other,
    }
    let zeroes = vec![0u8; ZERO_CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64) as usize;
        disk.file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::block::tests::TempDir;

    fn segs(start: u64, stride: u64, n: u64, len: u32) -> Vec<Segment> {
        (0..n)
            .map(|i| Segment {
                addr: GuestAddress(start + i * stride),
                len,
            })
            .collect()
    }

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

    #[test]
    fn a_long_change_runs_alone_among_changes_while_reads_go_on() {
        let q = JobQueue::default();
        let (read, write) = (Op::Read { sector: 0 }, Op::Write { sector: 0 });
        let discard = Op::Discard {
            sector: 0,
            sectors: 8,
        };
        for (head, op, len) in [
            (0, write, LONG_WRITE + 512),
            (1, write, 4096),
            (2, read, 4096),
            (3, discard, 0),
            (4, read, 1 << 20),
        ] {
            q.push(job(head, op, len)).unwrap();
        }
        let pop = || q.pop().unwrap().head;
        // The long write starts; the short write waits for it, reads do not.
        assert_eq!(pop(), 0);
        assert_eq!(pop(), 2);
        assert_eq!(pop(), 4);
        q.changed(Change::Long);
        // Short changes may run side by side, but not beside a long one.
        assert_eq!(q.pop().unwrap().head, 1);
        q.push(job(5, write, 512)).unwrap();
        assert_eq!(
            q.pop().unwrap().head,
            5,
            "the discard waits for both writes"
        );
        q.changed(Change::Short);
        q.changed(Change::Short);
        assert_eq!(q.pop().unwrap().head, 3);
        q.changed(Change::Long);
        q.close();
        assert!(q.pop().is_none());
    }

    #[test]
    fn transfers_span_iovec_batches_and_memory_regions() {
        let dir = TempDir::new();
        let path = dir.disk("disk.img", 1 << 20);
        let disk = Disk::open(&path, false).unwrap();
        // Two adjacent regions, so a buffer across 0x80000 maps to two host slices.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x8_0000),
            (GuestAddress(0x8_0000), 0x8_0000),
        ])
        .unwrap();
        // 600 buffers of 512 bytes 1 KiB apart: more than two preadv/pwritev batches.
        let out = segs(0, 1024, 600, 512);
        for (i, s) in out.iter().enumerate() {
            mem.write_slice(&[i as u8; 512], s.addr).unwrap();
        }
        assert_eq!(
            transfer(&disk, &mem, &out, 4096, Dir::Write).unwrap(),
            600 * 512
        );
        let file = std::fs::read(&path).unwrap();
        for i in 0..600 {
            let at = 4096 + i * 512;
            assert_eq!(&file[at..at + 512], &[i as u8; 512][..], "sector {i}");
        }

        let across = [Segment {
            addr: GuestAddress(0x7_ff00),
            len: 1024,
        }];
        assert_eq!(
            transfer(&disk, &mem, &across, 4096, Dir::Read).unwrap(),
            1024
        );
        let mut back = vec![0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(0x7_ff00)).unwrap();
        assert_eq!(back, file[4096..5120]);
    }

    #[test]
    fn a_file_that_shrank_is_an_error_not_a_hang() {
        let dir = TempDir::new();
        let path = dir.disk("disk.img", 8192);
        let disk = Disk::open(&path, false).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(1024)
            .unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let e = transfer(&disk, &mem, &segs(0, 0, 1, 4096), 0, Dir::Read).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
