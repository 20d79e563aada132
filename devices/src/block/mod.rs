//! virtio-blk (virtio 1.2, section 5.2) over a raw file or a host block device.
//!
//! `process_queue` parses each chain ([`request`], pure) and hands checked requests to the
//! I/O threads ([`pool`], shared by the disks of a VM; [`io`] does the I/O), so slow file
//! I/O never stalls the event loop serving other devices. The I/O threads write data and
//! status into guest memory and signal an eventfd ([`VirtioDevice::backend_fd`]);
//! `process_backend` then returns the chains.
//! A small request the driver waits on alone is answered at once where that cannot stall
//! anything ([`inline`]): the hand-off costs more than the work.

mod inline;
mod io;
mod media;
mod pool;
pub mod request;

use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::inline::InlineWrites;
use self::io::{Disk, DiskSource, Done, Job};
pub use self::media::MediaSlot;
use self::pool::Worker;
pub use self::pool::{IoPool, IoSetup, THREADS_PER_DISK};
use self::request::{DiskInfo, Op, Parsed, ID_LEN, MAX_RANGE_SECTORS, SECTOR_SIZE};
use crate::rate_limit::{Limiter, RateLimit, RateLimitError};
use crate::virtio::{
    device_type, read_config_bytes, UsedQueues, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};

/// Entries of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Bytes of `struct virtio_blk_config` served, through `write_zeroes_may_unmap` and its
/// padding; the secure-erase and zoned fields after it read as zero.
pub const CONFIG_LEN: usize = 60;

/// Disks without an id are named `blk-<n>` in thread names, numbered in creation order.
static NEXT_DISK: AtomicUsize = AtomicUsize::new(0);

/// Errors of the block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk {path} is {kind}")]
    NotADisk { path: PathBuf, kind: &'static str },
    #[error("disk {path} is a read-only file but was asked to be writable")]
    ReadOnlyFile { path: PathBuf },
    #[error("disk {path} has {size} bytes, not a multiple of 512")]
    Size { path: PathBuf, size: u64 },
    #[error("disk id {id:?} {reason}")]
    BadId { id: String, reason: &'static str },
    #[error("rate limit of disk {path}: {source}")]
    RateLimit {
        path: PathBuf,
        source: RateLimitError,
    },
    #[error("cannot start the I/O threads of disk {path}: {source}")]
    Thread {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A disk as the user asked for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// A raw image file or a host block device.
    pub path: PathBuf,
    pub read_only: bool,
    /// Serial the guest sees (GET_ID, `/sys/block/vdX/serial`), at most 20 bytes.
    pub id: Option<String>,
    /// Makes the disk a media slot: `path` is its first medium and fixes its capacity; the
    /// embedding program changes the medium through this handle (see [`MediaSlot`]).
    pub slot: Option<MediaSlot>,
    /// Bytes and requests per second the guest may move through this disk.
    pub rate: RateLimit,
}

/// Request counters since the device was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub read_requests: u64,
    pub read_bytes: u64,
    pub write_requests: u64,
    pub write_bytes: u64,
    pub flush_requests: u64,
    /// Discard and write-zeroes requests.
    pub discard_requests: u64,
    /// Requests that failed, were refused or were dropped as malformed.
    pub errors: u64,
}

/// Whose I/O threads serve a disk.
enum Threads<'a> {
    /// Threads of its own, each set up first with the function given.
    Own(Option<IoSetup>),
    Shared(&'a IoPool),
}

/// The live block device.
#[derive(Debug)]
pub struct Block {
    config: BlockConfig,
    disk: DiskInfo,
    features: u64,
    acked: u64,
    config_space: [u8; CONFIG_LEN],
    /// Written by the worker for each finished request.
    completions: EventFd,
    /// The disk the worker serves, for requests answered on the queue's thread.
    source: DiskSource,
    /// The serial, for GET_ID.
    id: [u8; ID_LEN],
    inline_writes: InlineWrites,
    worker: Worker,
    /// Requests handed to the worker and not yet returned to the queue.
    in_flight: usize,
    /// Popping stopped because `in_flight` reached the queue size.
    throttled: bool,
    /// The disk's rate limit, where it has one.
    limiter: Option<Limiter>,
    /// Popping stopped because the limiter refused a request; its timer brings us back.
    rate_limited: bool,
    /// Gathers `completions` and the limiter's timer where there is a limiter.
    events: Option<Epoll>,
    stats: BlockStats,
}

impl Block {
    /// Opens the disk and starts I/O threads of its own.
    pub fn new(config: BlockConfig) -> Result<Block, BlockError> {
        Self::create(config, Threads::Own(None))
    }

    /// [`Block::new`], with `setup` run first on each of its I/O threads (the embedding
    /// program's seccomp filter).
    pub fn with_io_setup(config: BlockConfig, setup: Option<IoSetup>) -> Result<Block, BlockError> {
        Self::create(config, Threads::Own(setup))
    }

    /// Opens the disk, served by the I/O threads of `pool`.
    pub fn with_pool(config: BlockConfig, pool: &IoPool) -> Result<Block, BlockError> {
        Self::create(config, Threads::Shared(pool))
    }

    fn create(config: BlockConfig, threads: Threads) -> Result<Block, BlockError> {
        let mut id = [0u8; ID_LEN];
        if let Some(s) = &config.id {
            let bad = |reason| BlockError::BadId {
                id: s.clone(),
                reason,
            };
            if s.len() > ID_LEN {
                return Err(bad("is longer than 20 bytes"));
            }
            // The guest reads the serial up to the first NUL; a thread name cannot hold one.
            if s.contains('\0') {
                return Err(bad("contains a NUL byte"));
            }
            id[..s.len()].copy_from_slice(s.as_bytes());
        }
        let disk = Disk::open(&config.path, config.read_only)?;
        let info = DiskInfo {
            capacity: disk.size / SECTOR_SIZE,
            read_only: config.read_only,
        };
        let config_space = config_space(info.capacity, disk.block_size);
        let thread_err = |source| BlockError::Thread {
            path: config.path.clone(),
            source,
        };
        let completions = EventFd::new(EFD_NONBLOCK).map_err(thread_err)?;
        let notify = completions.try_clone().map_err(thread_err)?;
        let disk = Arc::new(disk);
        let source = match &config.slot {
            Some(slot) => {
                slot.set(disk);
                DiskSource::Slot(slot.clone())
            }
            None => DiskSource::Fixed(disk),
        };
        let own;
        let pool = match threads {
            Threads::Shared(pool) => pool,
            Threads::Own(setup) => {
                let name = match &config.id {
                    Some(id) => format!("blk-{id}"),
                    None => format!("blk-{}", NEXT_DISK.fetch_add(1, Ordering::Relaxed)),
                };
                own = IoPool::new(&name, THREADS_PER_DISK, setup).map_err(thread_err)?;
                &own
            }
        };
        let worker = pool.lane(source.clone(), id, notify);
        let limiter = Limiter::new(config.rate).map_err(|e| BlockError::RateLimit {
            path: config.path.clone(),
            source: e,
        })?;
        let events = match &limiter {
            Some(l) => Some(watch_both(completions.as_raw_fd(), l.timer_fd()).map_err(thread_err)?),
            None => None,
        };
        Ok(Block {
            features: features(config.read_only),
            config,
            disk: info,
            acked: 0,
            config_space,
            completions,
            source,
            id,
            inline_writes: InlineWrites::default(),
            worker,
            in_flight: 0,
            throttled: false,
            limiter,
            rate_limited: false,
            events,
            stats: BlockStats::default(),
        })
    }

    /// What the device was created from.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// Size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    /// Pops, parses and submits chains until the queue is empty or `in_flight` reaches the
    /// queue size (which bounds what a guest can make the host hold).
    fn serve(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let limit = usize::from(q.size()).max(1);
        let mut used = false;
        let mut first = true;
        loop {
            // With EVENT_IDX, enable_notification also publishes avail_event, without which
            // the driver would stop notifying.
            let _ = q.disable_notification(mem);
            let mut popped = false;
            while self.in_flight < limit {
                let Some(chain) = q.pop_descriptor_chain(mem) else {
                    break;
                };
                popped = true;
                // Nothing in flight and nothing else waiting: a request a driver waits on
                // alone, where latency is all that counts.
                let lone = self.in_flight == 0
                    && q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                        .is_ok_and(|a| a.0 == q.next_avail());
                match self.start(chain, lone, q, mem) {
                    Some(answered) => used |= answered,
                    None => {
                        // Over the rate limit: the chain goes back on the ring, and the
                        // limiter's timer brings us back for it.
                        q.go_to_previous_position();
                        self.rate_limited = true;
                        return used;
                    }
                }
            }
            if self.in_flight >= limit {
                self.throttled = true;
                return used;
            }
            self.throttled = false;
            match q.enable_notification(mem) {
                // The driver added chains meanwhile. A pass after that which pops nothing
                // means an avail index no pop accepts (corrupt): stop instead of spinning.
                Ok(true) if popped || first => first = false,
                _ => return used,
            }
        }
    }

    /// Starts one request; returns whether it was answered (added to the used ring) at once,
    /// or `None` where the rate limit holds it back (nothing was done with it). A `lone`
    /// request may be answered here, without the I/O threads (see [`inline`]).
    fn start(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        lone: bool,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Option<bool> {
        let head = chain.head_index();
        let (descs, terminated) = request::collect(chain);
        let (at, status, used_len) = match request::parse(&descs, terminated, mem, &self.disk) {
            Parsed::Io(req) => {
                let bytes = match req.op {
                    Op::Read { .. } | Op::Write { .. } => req.len,
                    _ => 0,
                };
                if let Some(l) = &mut self.limiter {
                    if !l.admit(bytes) {
                        return None;
                    }
                }
                let at = req.status;
                let mut job = Job {
                    head,
                    req,
                    mem: mem.clone(),
                };
                if lone {
                    match self.answer_here(job) {
                        Ok(done) => {
                            self.count(&done);
                            return Some(add_used(q, mem, done.head, done.used_len));
                        }
                        Err(back) => job = back,
                    }
                }
                match self.worker.submit(job) {
                    Ok(()) => {
                        self.in_flight += 1;
                        return Some(false);
                    }
                    Err(_) => {
                        log::error!("{}: I/O thread is gone", self.name());
                        (Some(at), VIRTIO_BLK_S_IOERR as u8, 1)
                    }
                }
            }
            Parsed::Reply { at, status, why } => {
                log::debug!("{}: request {head} refused: {why:?}", self.name());
                (Some(at), status, 1)
            }
            Parsed::Drop(why) => {
                log::debug!("{}: chain {head} dropped: {why:?}", self.name());
                (None, 0, 0)
            }
        };
        self.stats.errors += 1;
        if let Some(at) = at {
            // `parse` checked the address.
            let _ = mem.write_obj(status, at);
        }
        Some(add_used(q, mem, head, used_len))
    }

    /// Answers a lone request on this thread where [`inline`] allows it; gives it back
    /// for the I/O threads otherwise.
    fn answer_here(&mut self, job: Job) -> Result<Done, Job> {
        if job.req.len > inline::MAX_BYTES {
            return Err(job);
        }
        let Some(disk) = self.source.current() else {
            return Err(job);
        };
        match job.req.op {
            Op::Read { .. } => io::read_cached(&disk, job),
            Op::Write { sector } => {
                let started = Instant::now();
                if !self
                    .inline_writes
                    .allows(sector * SECTOR_SIZE, job.req.len, started)
                {
                    return Err(job);
                }
                let done = io::execute(Some(&disk), &self.id, job);
                let now = Instant::now();
                self.inline_writes.finished(now - started, now);
                Ok(done)
            }
            _ => Err(job),
        }
    }

    /// Queue 0, set to follow the negotiated EVENT_IDX whichever transport set it up
    /// (the transport may not have told the queue).
    fn request_queue<'q>(&self, queues: &'q mut [&mut Queue]) -> Option<&'q mut Queue> {
        let q = queues.get_mut(0)?;
        q.set_event_idx(self.acked & VIRTIO_RING_F_EVENT_IDX != 0);
        Some(&mut **q)
    }

    fn count(&mut self, d: &Done) {
        let s = &mut self.stats;
        match d.op {
            Op::Read { .. } => {
                s.read_requests += 1;
                s.read_bytes += d.bytes;
            }
            Op::Write { .. } => {
                s.write_requests += 1;
                s.write_bytes += d.bytes;
            }
            Op::Flush => s.flush_requests += 1,
            Op::Discard { .. } | Op::WriteZeroes { .. } => s.discard_requests += 1,
            Op::GetId => {}
        }
        if d.status != VIRTIO_BLK_S_OK as u8 {
            s.errors += 1;
        }
    }
}

/// An epoll readable while either descriptor is.
fn watch_both(a: RawFd, b: RawFd) -> std::io::Result<Epoll> {
    let epoll = Epoll::new()?;
    for fd in [a, b] {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, fd as u64),
        )?;
    }
    Ok(epoll)
}

fn add_used(q: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
    match q.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            log::warn!("virtio-blk: cannot return descriptor {head}: {e}");
            false
        }
    }
}

fn features(read_only: bool) -> u64 {
    let bit = |b: u32| 1u64 << b;
    let mut f = VIRTIO_F_VERSION_1
        | VIRTIO_RING_F_EVENT_IDX
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE);
    if read_only {
        f |= bit(VIRTIO_BLK_F_RO);
    } else {
        // Neither can succeed on a read-only disk, so the driver is not told of them.
        f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
    }
    f
}

/// `struct virtio_blk_config`, little-endian.
fn config_space(capacity: u64, host_block_size: u64) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put =
        |offset: usize, bytes: &[u8]| c[offset..offset + bytes.len()].copy_from_slice(bytes);
    put(0, &capacity.to_le_bytes());
    // seg_max: the header and the status byte take a descriptor each.
    put(12, &(u32::from(QUEUE_SIZE) - 2).to_le_bytes());
    put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
    put(36, &MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
    put(40, &1u32.to_le_bytes()); // max_discard_seg
    put(44, &((host_block_size / SECTOR_SIZE) as u32).to_le_bytes()); // discard_sector_alignment
    put(48, &MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn name(&self) -> &'static str {
        "virtio-blk"
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = self.stats;
        vec![
            ("read_requests", s.read_requests),
            ("read_bytes", s.read_bytes),
            ("write_requests", s.write_requests),
            ("write_bytes", s.write_bytes),
            ("flush_requests", s.flush_requests),
            ("discard_requests", s.discard_requests),
            ("errors", s.errors),
            (
                "rate_limited",
                self.limiter.as_ref().map_or(0, |l| l.throttled),
            ),
        ]
    }
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing is writable: the writeback toggle (CONFIG_WCE) is not offered.
    }

    fn set_own_thread(&mut self) {
        self.inline_writes.set_own_thread();
    }

    /// The request queue: a filesystem or database in the guest often waits on each write
    /// or read it sends (a journal commit, a page it needs).
    fn polls(&self, index: usize) -> bool {
        index == 0
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [&mut Queue],
        mem: &GuestMemoryMmap,
    ) -> UsedQueues {
        match self.request_queue(queues) {
            Some(q) if index == 0 => self.serve(q, mem) as UsedQueues,
            _ => 0,
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        match &self.events {
            Some(e) => Some(e.as_raw_fd()),
            None => Some(self.completions.as_raw_fd()),
        }
    }

    fn process_backend(&mut self, queues: &mut [&mut Queue], mem: &GuestMemoryMmap) -> UsedQueues {
        // Clear the counter and rearm before draining: a completion sent after the drain
        // signals again.
        let _ = self.completions.read();
        self.worker.rearm();
        // A request the limiter held back waits for its timer; otherwise one the in-flight
        // bound held back goes as soon as something completed.
        let fired = self.limiter.as_mut().is_some_and(Limiter::timer_fired);
        let retry = if self.rate_limited {
            fired
        } else {
            self.throttled
        };
        let mut used = false;
        while let Some(done) = self.worker.try_done() {
            self.in_flight = self.in_flight.saturating_sub(1);
            self.count(&done);
            if let Some(q) = self.request_queue(queues) {
                used |= add_used(q, mem, done.head, done.used_len);
            }
        }
        if retry {
            self.rate_limited = false;
            if let Some(q) = self.request_queue(queues) {
                used |= self.serve(q, mem);
            }
        }
        used as UsedQueues
    }

    fn reset(&mut self) {
        // Nothing may complete into the queue once the transport resets it: wait for what
        // the worker holds and forget the results (the driver abandoned those requests).
        while self.in_flight > 0 {
            match self.worker.wait_done() {
                Some(done) => self.count(&done),
                None => break,
            }
            self.in_flight -= 1;
        }
        self.in_flight = 0;
        self.throttled = false;
        self.rate_limited = false;
        self.acked = 0;
        let _ = self.completions.read();
        self.worker.rearm();
    }
}

#[cfg(test)]
mod tests;
