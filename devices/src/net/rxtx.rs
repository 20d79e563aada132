//! Frame and queue logic: guest tx chains to back-end writes, back-end frames to guest rx
//! chains. Nothing here knows about taps or epoll; it works on any frame descriptor.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryMmap};

use super::NetStats;
use crate::rate_limit::Limiter;

/// Size of `virtio_net_hdr_v1`, in front of every frame both ways.
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
const ETH_HLEN: usize = 14;
/// Largest frame either way, header included: a 64 KiB GSO packet behind an Ethernet and a
/// VLAN header.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + ETH_HLEN + 4 + 65_535;
/// Shortest frame worth handing on: a header and an Ethernet header.
const MIN_FRAME_LEN: usize = VNET_HDR_LEN + ETH_HLEN;

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

fn add_used(q: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) {
    if let Err(e) = q.add_used(mem, head, len) {
        log::warn!("virtio-net: cannot return descriptor {head}: {e}");
    }
}

/// The transmit side: gathers each chain into an iovec list that points into guest memory
/// and writes it in one `writev`, so frames are never copied.
pub(super) struct Tx {
    /// Reused for every frame (no allocation per frame); empty between frames.
    iov: Vec<libc::iovec>,
    /// A write would have blocked; the chain is back on the ring, waiting for EPOLLOUT.
    pub stalled: bool,
    /// The rate limit held a chain back; it is back on the ring, waiting for the timer.
    pub limited: bool,
}

// SAFETY: `iov` holds pointers into guest memory only while one frame is being written,
// within a call that borrows that memory; it is cleared before the call returns, so no
// pointer ever crosses threads.
unsafe impl Send for Tx {}

impl std::fmt::Debug for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("stalled", &self.stalled)
            .field("limited", &self.limited)
            .finish()
    }
}

impl Tx {
    pub fn new() -> Self {
        Self {
            iov: Vec::with_capacity(64),
            stalled: false,
            limited: false,
        }
    }

    /// Fills `iov` with the chain's buffers; returns the frame length, or `None` for a
    /// malformed chain: a device-writable buffer, memory outside the guest, a chain cut
    /// short (bad index or loop), or a frame too short or too long.
    fn gather(&mut self, mem: &GuestMemoryMmap, chain: Chain<'_>) -> Option<usize> {
        self.iov.clear();
        let mut total = 0usize;
        // Whether the last descriptor promised another one: true at the end means the
        // chain iterator stopped on an error.
        let mut more = true;
        for desc in chain {
            more = desc.has_next();
            if desc.is_write_only() {
                return None;
            }
            total += desc.len() as usize;
            if total > MAX_FRAME_LEN {
                return None;
            }
            for slice in mem.get_slices(desc.addr(), desc.len() as usize) {
                let slice = slice.ok()?;
                self.iov.push(libc::iovec {
                    // GuestMemoryMmap maps memory for its whole life, so the pointer
                    // outlives the guard while `mem` is borrowed.
                    iov_base: slice.ptr_guard().as_ptr() as *mut libc::c_void,
                    iov_len: slice.len(),
                });
            }
        }
        (!more && total >= MIN_FRAME_LEN).then_some(total)
    }

    /// Sends every available chain; returns whether the used ring changed. On a write that
    /// would block, the chain goes back on the ring and `stalled` is set; on a frame `limit`
    /// refuses, it goes back and `limited` is set.
    pub fn send_all(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        fd: BorrowedFd<'_>,
        stats: &mut NetStats,
        mut limit: Option<&mut Limiter>,
    ) -> bool {
        self.stalled = false;
        self.limited = false;
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = self.gather(mem, chain);
            if let (Some(len), Some(l)) = (len, limit.as_deref_mut()) {
                if !l.admit((len - VNET_HDR_LEN) as u64) {
                    self.iov.clear();
                    q.go_to_previous_position();
                    self.limited = true;
                    break;
                }
            }
            let sent = match len {
                Some(len) => writev(fd, &self.iov).map(|_| len),
                None => Err(io::Error::from(io::ErrorKind::InvalidInput)),
            };
            self.iov.clear();
            match sent {
                Ok(len) => {
                    stats.tx_frames += 1;
                    stats.tx_bytes += (len - VNET_HDR_LEN) as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    q.go_to_previous_position();
                    self.stalled = true;
                    break;
                }
                Err(e) => {
                    log::debug!("virtio-net: tx chain {head} dropped: {e}");
                    stats.tx_dropped += 1;
                }
            }
            // Transmit buffers are only read: the used length is 0.
            add_used(q, mem, head, 0);
            used = true;
        }
        used
    }
}

fn writev(fd: BorrowedFd<'_>, iov: &[libc::iovec]) -> io::Result<usize> {
    loop {
        // SAFETY: every iovec describes guest memory that the caller's borrow of the guest
        // memory keeps mapped; the kernel only reads it.
        let n = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// How the driver takes received frames.
#[derive(Debug, Clone, Copy)]
pub(super) struct RxMode {
    /// VIRTIO_NET_F_MRG_RXBUF: a frame may span several chains.
    pub mergeable: bool,
    /// VIRTIO_NET_F_GUEST_CSUM: the header's flags may be passed on.
    pub guest_csum: bool,
}

/// What became of the pending frame.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Delivery {
    Delivered,
    /// Dropped: it can never fit the driver's buffers.
    Dropped,
    /// Not enough buffers; notifications are on and the frame stays pending.
    NoBuffers,
    /// Not enough buffers, but the driver added some meanwhile: try again.
    Retry,
}

/// The receive side: one frame read from the back end at a time, held until the guest has
/// room for it.
pub(super) struct Rx {
    buf: Box<[u8]>,
    /// Length of the frame in `buf` that waits for guest buffers.
    pending: Option<usize>,
    /// Chains holding the frame being delivered: (head, bytes written). Reused.
    chains: Vec<(u16, u32)>,
    /// Malformed chains met on the way, returned empty. Reused.
    junk: Vec<u16>,
    /// Driver notifications on the rx queue are on (we asked to hear about new buffers).
    notify: bool,
}

impl std::fmt::Debug for Rx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rx")
            .field("pending", &self.pending)
            .field("notify", &self.notify)
            .finish()
    }
}

impl Rx {
    pub fn new() -> Self {
        Self {
            buf: vec![0u8; MAX_FRAME_LEN].into_boxed_slice(),
            pending: None,
            chains: Vec::with_capacity(32),
            junk: Vec::new(),
            notify: true,
        }
    }

    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Bytes of the pending frame, its header left out.
    pub fn pending_len(&self) -> Option<usize> {
        self.pending.map(|n| n.saturating_sub(VNET_HDR_LEN))
    }

    /// Forgets the pending frame; returns whether there was one.
    pub fn clear_pending(&mut self) -> bool {
        self.pending.take().is_some()
    }

    /// After a device reset the rings start with notifications on.
    pub fn reset(&mut self) {
        self.notify = true;
    }

    /// Reads the next frame into the pending slot; `Ok(false)` when the back end has none.
    /// Errors (end of file included) mean the back end is unusable.
    pub fn fill(&mut self, fd: BorrowedFd<'_>, stats: &mut NetStats) -> io::Result<bool> {
        loop {
            // SAFETY: the pointer and length describe `buf`, a live, writable buffer.
            let n =
                unsafe { libc::read(fd.as_raw_fd(), self.buf.as_mut_ptr().cast(), self.buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return Ok(false),
                    _ => return Err(e),
                }
            }
            match n as usize {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n if n < MIN_FRAME_LEN => stats.rx_dropped += 1,
                n => {
                    self.pending = Some(n);
                    return Ok(true);
                }
            }
        }
    }

    /// Copies the pending frame into the driver's rx chains: one chain, or as many as it
    /// takes with mergeable buffers (`num_buffers` set to their count). Chains are marked
    /// used only once the whole frame has found room, so a frame is never cut.
    /// Returns what happened and whether the used ring changed.
    pub fn deliver(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        mode: RxMode,
        stats: &mut NetStats,
    ) -> (Delivery, bool) {
        let Some(len) = self.pending else {
            return (Delivery::Delivered, false);
        };
        if !q.ready() {
            return (Delivery::NoBuffers, false);
        }
        let frame = &mut self.buf[..len];
        frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
        if !mode.guest_csum {
            frame[0] = 0; // spec 5.1.6.4.1: flags are zero without GUEST_CSUM
        }
        let start = q.next_avail();
        self.chains.clear();
        self.junk.clear();
        let mut first: Option<Chain<'_>> = None;
        let mut popped = 0u16;
        let mut done = 0usize;
        while done < len {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                if popped >= q.size() {
                    // Every entry of the ring is available and still too small.
                    q.set_next_avail(start);
                    return self.drop_frame(stats, false);
                }
                // Ask for a notification past everything the driver has offered so far
                // (next_avail is there now), then give the chains back.
                let more = q.enable_notification(mem).unwrap_or(false);
                self.notify = true;
                q.set_next_avail(start);
                let d = if more {
                    Delivery::Retry
                } else {
                    Delivery::NoBuffers
                };
                return (d, false);
            };
            popped += 1;
            let head = chain.head_index();
            match write_chain(mem, chain.clone(), 0, &frame[done..]) {
                Some(n) if !mode.mergeable && n < len => {
                    // Well formed but sized for smaller frames: keep it for the next one.
                    q.go_to_previous_position();
                    let changed = self.commit(q, mem);
                    let (d, _) = self.drop_frame(stats, changed);
                    return (d, changed);
                }
                // The first chain must hold the whole header.
                Some(n) if n > 0 && (done > 0 || n >= VNET_HDR_LEN) => {
                    first.get_or_insert(chain);
                    self.chains.push((head, n as u32));
                    done += n;
                }
                _ => self.junk.push(head),
            }
        }
        if self.chains.len() > 1 {
            let count = (self.chains.len() as u16).to_le_bytes();
            if let Some(first) = first {
                write_chain(mem, first, NUM_BUFFERS_OFFSET, &count);
            }
        }
        let changed = self.commit(q, mem);
        if self.notify {
            // Buffers are flowing again: driver kicks are not needed until we run out.
            let _ = q.disable_notification(mem);
            self.notify = false;
        }
        stats.rx_frames += 1;
        stats.rx_bytes += (len - VNET_HDR_LEN) as u64;
        self.pending = None;
        (Delivery::Delivered, changed)
    }

    fn drop_frame(&mut self, stats: &mut NetStats, changed: bool) -> (Delivery, bool) {
        log::debug!("virtio-net: rx frame of {:?} bytes dropped", self.pending);
        stats.rx_dropped += 1;
        self.pending = None;
        (Delivery::Dropped, changed)
    }

    /// Returns the junk chains empty, then the frame's chains, to the used ring.
    fn commit(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        for &head in &self.junk {
            add_used(q, mem, head, 0);
        }
        for &(head, n) in &self.chains {
            add_used(q, mem, head, n);
        }
        !self.junk.is_empty() || !self.chains.is_empty()
    }
}

/// Writes `data` into the chain's buffers from byte `skip` of the chain on; returns the
/// bytes written, or `None` if the chain is malformed (a device-readable buffer, memory
/// outside the guest, or cut short) before all of `data` found room.
fn write_chain(
    mem: &GuestMemoryMmap,
    chain: Chain<'_>,
    mut skip: usize,
    data: &[u8],
) -> Option<usize> {
    let mut done = 0;
    let mut more = true;
    for desc in chain {
        if done == data.len() {
            return Some(done);
        }
        more = desc.has_next();
        if !desc.is_write_only() {
            return None;
        }
        let len = desc.len() as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(data.len() - done);
        let addr = desc.addr().checked_add(skip as u64)?;
        mem.write_slice(&data[done..done + n], addr).ok()?;
        skip = 0;
        done += n;
    }
    (done == data.len() || !more).then_some(done)
}
