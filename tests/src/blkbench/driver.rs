//! The driver side of one virtio-blk queue over vhost-user: what a guest kernel's
//! virtio-blk driver and QEMU's vhost-user-blk front end do together, in one thread.
//!
//! Memory is a memfd shared with the back end. Request slot `i` owns descriptors `3i`
//! (header), `3i + 1` (data) and `3i + 2` (status), so the descriptor table is written once
//! per workload and a request costs a header, an avail entry and (maybe) a kick.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};

use devices::virtio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Entries of the ring (the most our device offers; QEMU's guests use 256 too).
pub const QUEUE_SIZE: u16 = 256;
/// Requests that fit the ring at three descriptors each.
pub const MAX_DEPTH: usize = QUEUE_SIZE as usize / 3;
/// Bytes of shared memory: rings, headers, then data buffers.
pub const MEM_SIZE: usize = 48 << 20;

const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HEADERS: u64 = 0x4000;
/// Header (16 bytes) and status byte of a slot.
const HEADER_STRIDE: u64 = 32;
const DATA: u64 = 0x10_0000;

/// Errors of the driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("vhost-user {step} failed: {source}")]
    Vhost {
        step: &'static str,
        source: vhost::Error,
    },
    #[error("the back end does not offer {0}")]
    Feature(&'static str),
    #[error("cannot set up shared memory: {0}")]
    Memory(String),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("{0} bytes of data at depth {1} do not fit the shared memory")]
    TooLarge(u32, usize),
    #[error("request on slot {slot} failed with status {status}")]
    Status { slot: usize, status: u8 },
    #[error("the back end returned descriptor {0}, which is no request head")]
    BadId(u32),
    #[error("cannot set the CPU affinity of the driver or the back end: {0}")]
    Affinity(std::io::Error),
}

fn vhost(step: &'static str) -> impl FnOnce(vhost::Error) -> DriverError {
    move |source| DriverError::Vhost { step, source }
}

/// What one pass of a workload asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub write: bool,
    /// Bytes per request, a multiple of 512.
    pub block: u32,
    /// Requests in flight.
    pub depth: usize,
}

/// A connected and configured vhost-user-blk queue.
pub struct Driver {
    // Dropping it closes the connection, which ends the back end's session.
    _frontend: Frontend,
    mem: GuestMemoryMmap,
    kick: EventFd,
    call: EventFd,
    event_idx: bool,
    /// Size of the disk in bytes.
    pub capacity: u64,
    next_avail: u16,
    last_used: u16,
    /// Next avail index as last published to the device.
    published: u16,
    shape: Shape,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("capacity", &self.capacity)
            .field("event_idx", &self.event_idx)
            .field("shape", &self.shape)
            .finish()
    }
}

fn memfd(size: usize) -> Result<File, DriverError> {
    // SAFETY: the name is a NUL-terminated literal; memfd_create takes no other pointer.
    let fd = unsafe { libc::memfd_create(c"blkbench".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(DriverError::Memory(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64)
        .map_err(|e| DriverError::Memory(e.to_string()))?;
    Ok(file)
}

impl Driver {
    /// Connects to the back end at `socket` and brings queue 0 up; `event_idx` negotiates
    /// VIRTIO_RING_F_EVENT_IDX when the back end offers it (as a Linux guest does).
    pub fn connect(socket: &Path, event_idx: bool) -> Result<Driver, DriverError> {
        let mut fe = Frontend::connect(socket, 1).map_err(vhost("connect"))?;
        fe.set_owner().map_err(vhost("SET_OWNER"))?;
        let offered = fe.get_features().map_err(vhost("GET_FEATURES"))?;
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err(DriverError::Feature("VIRTIO_F_VERSION_1"));
        }
        if offered & protocol == 0 {
            return Err(DriverError::Feature("VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        let event_idx = event_idx && offered & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut acked = VIRTIO_F_VERSION_1 | protocol;
        if event_idx {
            acked |= VIRTIO_RING_F_EVENT_IDX;
        }
        fe.set_features(acked).map_err(vhost("SET_FEATURES"))?;
        let pf = fe
            .get_protocol_features()
            .map_err(vhost("GET_PROTOCOL_FEATURES"))?;
        if !pf.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(DriverError::Feature("VHOST_USER_PROTOCOL_F_CONFIG"));
        }
        fe.set_protocol_features(VhostUserProtocolFeatures::CONFIG)
            .map_err(vhost("SET_PROTOCOL_FEATURES"))?;
        let (_, cfg) = fe
            .get_config(0, 8, VhostUserConfigFlags::empty(), &[0u8; 8])
            .map_err(vhost("GET_CONFIG"))?;
        let sectors = u64::from_le_bytes(cfg[..8].try_into().unwrap_or([0; 8]));

        let file = memfd(MEM_SIZE)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| DriverError::Memory(e.to_string()))?;
        let region = mem
            .find_region(GuestAddress(0))
            .ok_or_else(|| DriverError::Memory("no region".into()))?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(region)
            .map_err(|e| DriverError::Memory(e.to_string()))?;
        fe.set_mem_table(&[info]).map_err(vhost("SET_MEM_TABLE"))?;

        // Vring addresses are the front end's virtual addresses, as QEMU sends them.
        let va = |gpa: u64| info.userspace_addr + gpa;
        let kick = EventFd::new(0).map_err(DriverError::EventFd)?;
        let call = EventFd::new(0).map_err(DriverError::EventFd)?;
        fe.set_vring_num(0, QUEUE_SIZE)
            .map_err(vhost("SET_VRING_NUM"))?;
        fe.set_vring_base(0, 0).map_err(vhost("SET_VRING_BASE"))?;
        let ring = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: va(DESC),
            used_ring_addr: va(USED),
            avail_ring_addr: va(AVAIL),
            log_addr: None,
        };
        fe.set_vring_addr(0, &ring)
            .map_err(vhost("SET_VRING_ADDR"))?;
        fe.set_vring_call(0, &call)
            .map_err(vhost("SET_VRING_CALL"))?;
        fe.set_vring_kick(0, &kick)
            .map_err(vhost("SET_VRING_KICK"))?;
        fe.set_vring_enable(0, true)
            .map_err(vhost("SET_VRING_ENABLE"))?;
        Ok(Driver {
            _frontend: fe,
            mem,
            kick,
            call,
            event_idx,
            capacity: sectors * 512,
            next_avail: 0,
            last_used: 0,
            published: 0,
            shape: Shape {
                write: false,
                block: 0,
                depth: 0,
            },
        })
    }

    /// Whether EVENT_IDX was negotiated.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    fn header_addr(slot: usize) -> GuestAddress {
        GuestAddress(HEADERS + slot as u64 * HEADER_STRIDE)
    }

    fn data_addr(&self, slot: usize) -> GuestAddress {
        GuestAddress(DATA + slot as u64 * u64::from(self.shape.block))
    }

    /// Writes the descriptor chains for `shape` (the queue must be idle) and fills the
    /// write buffers with a non-zero pattern.
    pub fn prepare(&mut self, shape: Shape) -> Result<(), DriverError> {
        let end = DATA + shape.depth as u64 * u64::from(shape.block);
        if shape.depth == 0 || shape.depth > MAX_DEPTH || end > MEM_SIZE as u64 {
            return Err(DriverError::TooLarge(shape.block, shape.depth));
        }
        self.shape = shape;
        let next = VRING_DESC_F_NEXT as u16;
        let data_flags = if shape.write {
            next
        } else {
            next | VRING_DESC_F_WRITE as u16
        };
        for slot in 0..shape.depth {
            let d = (slot * 3) as u16;
            let hdr = Self::header_addr(slot);
            let descs = [
                Descriptor::new(hdr.0, 16, next, d + 1),
                Descriptor::new(self.data_addr(slot).0, shape.block, data_flags, d + 2),
                Descriptor::new(hdr.0 + 16, 1, VRING_DESC_F_WRITE as u16, 0),
            ];
            for (i, desc) in descs.iter().enumerate() {
                self.mem
                    .write_obj(*desc, GuestAddress(DESC + (u64::from(d) + i as u64) * 16))
                    .map_err(|e| DriverError::Memory(e.to_string()))?;
            }
            if shape.write {
                let pattern = vec![0x5a ^ slot as u8; shape.block as usize];
                self.mem
                    .write_slice(&pattern, self.data_addr(slot))
                    .map_err(|e| DriverError::Memory(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// The data buffer of `slot` (what the last read of that slot returned).
    pub fn data(&self, slot: usize) -> Vec<u8> {
        let mut buf = vec![0u8; self.shape.block as usize];
        let _ = self.mem.read_slice(&mut buf, self.data_addr(slot));
        buf
    }

    /// Puts the request of `slot` at byte `offset` on the avail ring (not yet published).
    pub fn queue(&mut self, slot: usize, offset: u64) {
        let kind = if self.shape.write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        let mut hdr = [0u8; 17];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&(offset / 512).to_le_bytes());
        hdr[16] = 0xff;
        let _ = self.mem.write_slice(&hdr, Self::header_addr(slot));
        let at = AVAIL + 4 + 2 * u64::from(self.next_avail % QUEUE_SIZE);
        let _ = self.mem.write_obj((slot * 3) as u16, GuestAddress(at));
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Publishes what `queue` added and kicks the back end unless it asked not to be.
    pub fn publish(&mut self) {
        if self.publish_quietly() {
            self.kick();
        }
    }

    /// Notifies the back end.
    pub fn kick(&self) {
        let _ = self.kick.write(1);
    }

    /// Publishes what `queue` added without a kick, which only a back end reading the ring
    /// of its own accord sees; returns whether the back end asked for one.
    pub fn publish_quietly(&mut self) -> bool {
        let (old, new) = (self.published, self.next_avail);
        if old == new {
            return false;
        }
        self.published = new;
        let _ = self
            .mem
            .store(new, GuestAddress(AVAIL + 2), Ordering::Release);
        // The index must be visible before the back end's suppression state is read.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let at = USED + 4 + 8 * u64::from(QUEUE_SIZE);
            let event: u16 = self
                .mem
                .load(GuestAddress(at), Ordering::Acquire)
                .unwrap_or(0);
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags: u16 = self
                .mem
                .load(GuestAddress(USED), Ordering::Acquire)
                .unwrap_or(0);
            flags & VRING_USED_F_NO_NOTIFY as u16 == 0
        }
    }

    /// Waits for the back end's call; a stale count only costs one more look at the ring.
    fn wait_call(&self) -> Result<(), DriverError> {
        loop {
            match self.call.read() {
                Ok(_) => return Ok(()),
                // A back end may make the descriptor non-blocking (the open file is shared).
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut pfd = libc::pollfd {
                        fd: self.call.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one pollfd, alive for the call.
                    unsafe { libc::poll(&mut pfd, 1, -1) };
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(DriverError::EventFd(e)),
            }
        }
    }

    /// Waits until at least one request completed and calls `done(slot)` for each, in
    /// used-ring order.
    pub fn complete(&mut self, mut done: impl FnMut(usize)) -> Result<(), DriverError> {
        loop {
            let used = self.used_idx()?;
            if used != self.last_used {
                return self.reap(used, &mut done);
            }
            if self.event_idx {
                // Ask for a call on the next completion, then look again: one may have
                // landed before the back end could see the request.
                let at = AVAIL + 4 + 2 * u64::from(QUEUE_SIZE);
                let _ = self
                    .mem
                    .store(self.last_used, GuestAddress(at), Ordering::Release);
                fence(Ordering::SeqCst);
                let again: u16 = self
                    .mem
                    .load(GuestAddress(USED + 2), Ordering::Acquire)
                    .unwrap_or(used);
                if again != used {
                    continue;
                }
            }
            self.wait_call()?;
        }
    }

    /// Calls `done(slot)` for each request completed by now, without waiting; returns how
    /// many there were.
    pub fn try_complete(&mut self, mut done: impl FnMut(usize)) -> Result<usize, DriverError> {
        let before = self.last_used;
        let used = self.used_idx()?;
        self.reap(used, &mut done)?;
        Ok(usize::from(self.last_used.wrapping_sub(before)))
    }

    fn used_idx(&self) -> Result<u16, DriverError> {
        self.mem
            .load(GuestAddress(USED + 2), Ordering::Acquire)
            .map_err(|e| DriverError::Memory(e.to_string()))
    }

    /// Takes the used entries up to index `used`, checking each request's status.
    fn reap(&mut self, used: u16, done: &mut impl FnMut(usize)) -> Result<(), DriverError> {
        while self.last_used != used {
            let at = USED + 4 + 8 * u64::from(self.last_used % QUEUE_SIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap_or(u32::MAX);
            let slot = id as usize / 3;
            if !id.is_multiple_of(3) || slot >= self.shape.depth {
                return Err(DriverError::BadId(id));
            }
            let status: u8 = self
                .mem
                .read_obj(Self::header_addr(slot).unchecked_add(16))
                .unwrap_or(u8::MAX);
            if status != VIRTIO_BLK_S_OK as u8 {
                return Err(DriverError::Status { slot, status });
            }
            self.last_used = self.last_used.wrapping_add(1);
            done(slot);
        }
        Ok(())
    }
}
