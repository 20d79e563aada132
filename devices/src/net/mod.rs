//! virtio-net (virtio spec 1.2, section 5.1) over a tap.
//!
//! Frames cross between guest and tap with the 12-byte `virtio_net_hdr_v1` in front,
//! unchanged: the tap is opened with `IFF_VNET_HDR` and a header size of 12, so checksum and
//! segmentation offloads pass straight through. The device keeps an internal epoll holding
//! the tap; that epoll is its `backend_fd`, and the tap is in it only while the device can
//! make progress (rx: no frame waiting for guest buffers; tx: a write would have blocked).
//! That gives back pressure both ways instead of drops, without spinning the level-triggered
//! outer event loop.

mod rxtx;
pub mod tap;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use virtio_bindings::virtio_net as vn;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::rate_limit::{Limiter, RateLimit, RateLimitError};
use crate::virtio::{
    device_type, read_config_bytes, ActivateError, UsedQueues, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use rxtx::{Delivery, Rx, RxMode, Tx};
pub use rxtx::{MAX_FRAME_LEN, VNET_HDR_LEN};
pub use tap::Tap;

/// Receive queue index.
pub const RX_QUEUE: usize = 0;
/// Transmit queue index.
pub const TX_QUEUE: usize = 1;
const QUEUE_SIZES: [u16; 2] = [256, 256];
/// Frames moved from the back end per call, so one busy device cannot hold the event loop;
/// the level-triggered epoll brings us back for the rest.
const RX_BURST: usize = 256;

/// Epoll data of the limiters' timers in the device epoll (the back end's is 0).
const TOKEN_RX_TIMER: u64 = 1;
const TOKEN_TX_TIMER: u64 = 2;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Every feature the device offers.
const OFFERED_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(vn::VIRTIO_NET_F_MAC)
    | bit(vn::VIRTIO_NET_F_STATUS)
    | bit(vn::VIRTIO_NET_F_MRG_RXBUF)
    | bit(vn::VIRTIO_NET_F_CSUM)
    | bit(vn::VIRTIO_NET_F_HOST_TSO4)
    | bit(vn::VIRTIO_NET_F_HOST_TSO6)
    | bit(vn::VIRTIO_NET_F_HOST_ECN)
    | bit(vn::VIRTIO_NET_F_GUEST_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO4)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO6)
    | bit(vn::VIRTIO_NET_F_GUEST_ECN);

/// Where the tap comes from.
#[derive(Debug)]
pub enum TapSource {
    /// Open the tap `name` (creating it if absent) inside the network namespace at `netns`
    /// (for example `/var/run/netns/X`; `None`: the caller's own namespace) and bring it up.
    Name {
        name: String,
        netns: Option<PathBuf>,
    },
    /// An already open tap queue, created with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`. Its
    /// link state is left to the caller; the device makes it non-blocking.
    Fd(OwnedFd),
}

/// What the user asked for; [`Net::new`] turns it into a live device.
#[derive(Debug)]
pub struct NetConfig {
    pub tap: TapSource,
    /// The guest NIC's MAC; a random locally administered one when `None`.
    pub mac: Option<[u8; 6]>,
    /// Bytes and frames per second the guest may receive.
    pub rx_rate: RateLimit,
    /// Bytes and frames per second the guest may send.
    pub tx_rate: RateLimit,
}

/// Errors while setting up a net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid tap name {0:?}: it must have 1 to 15 bytes, without NUL, '/' or spaces")]
    TapName(String),
    #[error("tap {tap}: cannot enter {netns}: {source}")]
    EnterNetns {
        tap: String,
        netns: String,
        source: io::Error,
    },
    #[error("tap {tap}: cannot start the helper thread that enters {netns}: {source}")]
    HelperThread {
        tap: String,
        netns: String,
        source: io::Error,
    },
    #[error("tap {tap}: the helper thread in {netns} panicked")]
    HelperPanicked { tap: String, netns: String },
    #[error("tap {tap} in {netns}: cannot {what}: {source}")]
    Tap {
        tap: String,
        netns: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("tap {tap}: not a tap opened with IFF_NO_PI and IFF_VNET_HDR (flags {flags:#x})")]
    NotVnetTap { tap: String, flags: u32 },
    #[error("net back end {backend}: cannot {what}: {source}")]
    Backend {
        backend: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("cannot make a random MAC address: {0}")]
    RandomMac(io::Error),
    #[error("net back end {backend}: {source}")]
    RateLimit {
        backend: String,
        source: RateLimitError,
    },
}

/// The host side of a net device: a descriptor that carries one frame, with a 12-byte
/// `virtio_net_hdr_v1` in front, per read or write. A tap in production; tests use a
/// `SOCK_SEQPACKET` socket pair.
pub trait NetBackend: AsFd + Send + std::fmt::Debug {
    /// Name for logs and errors (the tap's interface name).
    fn name(&self) -> &str;
    /// Tells the back end which offloads (`TUN_F_*`) the guest accepts on receive.
    fn set_offloads(&self, tun_flags: u32) -> io::Result<()>;
}

/// Traffic counters. Bytes count Ethernet frames, without the virtio-net header.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub rx_bytes: u64,
    pub rx_frames: u64,
    /// Frames read from the back end that never reached the guest (runts, frames larger
    /// than every buffer the guest could offer, frames pending at a reset).
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_frames: u64,
    /// Guest frames not sent: malformed chains and back-end write errors.
    pub tx_dropped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before DRIVER_OK or after a reset: the back end is not watched.
    Inactive,
    Active,
    /// The back end failed for good (the tap went away); tx chains are dropped, rx is off.
    Failed,
}

/// The virtio-net device.
#[derive(Debug)]
pub struct Net {
    backend: Box<dyn NetBackend>,
    /// The device's `backend_fd`: holds the back end while it can make progress.
    epoll: Epoll,
    /// What the back end is registered for in `epoll` (empty: not registered).
    watching: EventSet,
    mac: [u8; 6],
    acked: u64,
    state: State,
    rx: Rx,
    tx: Tx,
    /// Rate limits of each direction, where set.
    rx_limit: Option<Limiter>,
    tx_limit: Option<Limiter>,
    /// The rx limit admitted the pending frame already.
    rx_admitted: bool,
    stats: NetStats,
}

/// TUN_F_* receive offloads matching the guest features `acked`. The tap refuses TSO
/// without checksum offload, and so does the spec.
fn tun_offloads(acked: u64) -> u32 {
    let has = |b: u32| acked & bit(b) != 0;
    if !has(vn::VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(vn::VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(vn::VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(vn::VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        flags |= libc::TUN_F_TSO_ECN;
    }
    flags
}

fn random_mac() -> Result<[u8; 6], NetError> {
    let mut mac = [0u8; 6];
    // SAFETY: the pointer and length describe `mac`, a live, writable array.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != mac.len() as isize {
        return Err(NetError::RandomMac(io::Error::last_os_error()));
    }
    mac[0] = (mac[0] & !0x01) | 0x02; // unicast, locally administered
    Ok(mac)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL only read and set the status flags of a descriptor we hold.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Net {
    /// Opens the tap the configuration names and builds the device around it.
    pub fn new(config: NetConfig) -> Result<Self, NetError> {
        let tap = match config.tap {
            TapSource::Name { name, netns } => Tap::open(&name, netns.as_deref())?,
            TapSource::Fd(fd) => Tap::from_fd(fd)?,
        };
        let mut net = Self::with_backend(Box::new(tap), config.mac)?;
        net.set_rate_limits(config.rx_rate, config.tx_rate)?;
        Ok(net)
    }

    /// Holds each direction to its limit; the limiters' timers join the device epoll.
    pub fn set_rate_limits(&mut self, rx: RateLimit, tx: RateLimit) -> Result<(), NetError> {
        let backend = self.backend.name().to_owned();
        let make = |limit| {
            Limiter::new(limit).map_err(|source| NetError::RateLimit {
                backend: backend.clone(),
                source,
            })
        };
        let (rx, tx) = (make(rx)?, make(tx)?);
        for (l, token) in [(&rx, TOKEN_RX_TIMER), (&tx, TOKEN_TX_TIMER)] {
            if let Some(l) = l {
                self.epoll
                    .ctl(
                        ControlOperation::Add,
                        l.timer_fd(),
                        EpollEvent::new(EventSet::IN, token),
                    )
                    .map_err(|source| NetError::Backend {
                        backend: backend.clone(),
                        what: "watch the rate limiter's timer",
                        source,
                    })?;
            }
        }
        self.rx_limit = rx;
        self.tx_limit = tx;
        Ok(())
    }

    /// Builds the device around any frame back end (a tap, or a test's socket pair).
    pub fn with_backend(
        backend: Box<dyn NetBackend>,
        mac: Option<[u8; 6]>,
    ) -> Result<Self, NetError> {
        let fail = |what, source| NetError::Backend {
            backend: backend.name().to_owned(),
            what,
            source,
        };
        set_nonblocking(backend.as_fd().as_raw_fd())
            .map_err(|e| fail("make it non-blocking", e))?;
        // A reused tap may carry offloads from its previous user; none until the guest acks.
        backend
            .set_offloads(0)
            .map_err(|e| fail("clear its offloads", e))?;
        let epoll = Epoll::new().map_err(|e| fail("create the device epoll", e))?;
        let mac = match mac {
            Some(m) => m,
            None => random_mac()?,
        };
        Ok(Self {
            backend,
            epoll,
            watching: EventSet::empty(),
            mac,
            acked: 0,
            state: State::Inactive,
            rx: Rx::new(),
            tx: Tx::new(),
            rx_limit: None,
            tx_limit: None,
            rx_admitted: false,
            stats: NetStats::default(),
        })
    }

    /// The guest NIC's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The back end's name (the tap's interface name).
    pub fn backend_name(&self) -> &str {
        self.backend.name()
    }

    /// Traffic counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    fn has(&self, b: u32) -> bool {
        self.acked & bit(b) != 0
    }

    fn rx_mode(&self) -> RxMode {
        RxMode {
            mergeable: self.has(vn::VIRTIO_NET_F_MRG_RXBUF),
            guest_csum: self.has(vn::VIRTIO_NET_F_GUEST_CSUM),
        }
    }

    /// Registers the back end in the device epoll for exactly what can make progress now.
    fn sync_interest(&mut self) {
        let mut want = EventSet::empty();
        if self.state == State::Active {
            if !self.rx.has_pending() {
                want |= EventSet::IN;
            }
            if self.tx.stalled {
                want |= EventSet::OUT;
            }
        }
        if want == self.watching {
            return;
        }
        let op = if self.watching.is_empty() {
            ControlOperation::Add
        } else if want.is_empty() {
            ControlOperation::Delete
        } else {
            ControlOperation::Modify
        };
        let fd = self.backend.as_fd().as_raw_fd();
        match self.epoll.ctl(op, fd, EpollEvent::new(want, 0)) {
            Ok(()) => self.watching = want,
            Err(e) => log::error!("{}: cannot watch the back end: {e}", self.backend.name()),
        }
    }

    /// The back end is gone: stop watching it; tx keeps draining (and dropping).
    fn fail(&mut self, what: &str, e: io::Error) {
        log::error!(
            "{}: cannot {what}: {e}; the device stops receiving",
            self.backend.name()
        );
        self.state = State::Failed;
        if self.rx.clear_pending() {
            self.stats.rx_dropped += 1;
        }
        self.sync_interest();
    }

    fn process_rx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        if self.state != State::Active {
            return false;
        }
        let mode = self.rx_mode();
        let mut used = false;
        for _ in 0..RX_BURST {
            if !self.rx.has_pending() {
                match self.rx.fill(self.backend.as_fd(), &mut self.stats) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        self.fail("read a frame", e);
                        return used;
                    }
                }
            }
            if let (Some(l), Some(len)) = (&mut self.rx_limit, self.rx.pending_len()) {
                // The frame stays pending (the tap out of the epoll) until the timer fires.
                if !self.rx_admitted && !l.admit(len as u64) {
                    break;
                }
                self.rx_admitted = true;
            }
            let (delivery, changed) = self.rx.deliver(q, mem, mode, &mut self.stats);
            used |= changed;
            if !self.rx.has_pending() {
                self.rx_admitted = false;
            }
            match delivery {
                Delivery::Delivered | Delivery::Dropped | Delivery::Retry => {}
                // The frame waits in the pending slot; the tap leaves the epoll until the
                // driver adds buffers (process_queue(RX_QUEUE)).
                Delivery::NoBuffers => break,
            }
        }
        self.sync_interest();
        used
    }

    fn process_tx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        if self.state == State::Inactive {
            return false;
        }
        let mut used = false;
        let mut first = true;
        loop {
            let _ = q.disable_notification(mem);
            let sent = self.tx.send_all(
                q,
                mem,
                self.backend.as_fd(),
                &mut self.stats,
                self.tx_limit.as_mut(),
            );
            used |= sent;
            // Stalled: notifications stay off; EPOLLOUT on the back end brings us back.
            // Limited: the limiter's timer does.
            if self.tx.stalled || self.tx.limited || !q.enable_notification(mem).unwrap_or(false) {
                break;
            }
            // The driver added chains meanwhile. A pass after that which pops nothing means
            // an avail index no pop accepts (corrupt): stop instead of spinning.
            if !sent && !first {
                break;
            }
            first = false;
        }
        self.sync_interest();
        used
    }

    /// Queues keep the event-index flag the transport may not set itself.
    fn sync_event_idx(&self, queues: &mut [&mut Queue]) {
        let on = self.acked & VIRTIO_RING_F_EVENT_IDX != 0;
        for q in queues.iter_mut() {
            q.set_event_idx(on);
        }
    }
}

/// Splits the transport's queues into (rx, tx).
fn rx_tx<'a>(queues: &'a mut [&mut Queue]) -> Option<(&'a mut Queue, &'a mut Queue)> {
    match queues {
        [rx, tx, ..] => Some((&mut **rx, &mut **tx)),
        _ => None,
    }
}

const fn used_bit(index: usize) -> UsedQueues {
    1 << index
}

impl VirtioDevice for Net {
    fn name(&self) -> &'static str {
        "virtio-net"
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = self.stats;
        vec![
            ("receive_bytes", s.rx_bytes),
            ("receive_packets", s.rx_frames),
            ("receive_dropped", s.rx_dropped),
            ("transmit_bytes", s.tx_bytes),
            ("transmit_packets", s.tx_frames),
            ("transmit_dropped", s.tx_dropped),
            (
                "receive_rate_limited",
                self.rx_limit.as_ref().map_or(0, |l| l.throttled),
            ),
            (
                "transmit_rate_limited",
                self.tx_limit.as_ref().map_or(0, |l| l.throttled),
            ),
        ]
    }
    fn device_type(&self) -> u32 {
        device_type::NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        OFFERED_FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & OFFERED_FEATURES;
        let offloads = tun_offloads(self.acked);
        if let Err(e) = self.backend.set_offloads(offloads) {
            // The tap keeps no offloads: frames arrive fully segmented and checksummed,
            // which every guest accepts.
            log::warn!(
                "{}: cannot set offloads {offloads:#x}: {e}",
                self.backend.name()
            );
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // virtio_net_config: mac[6], status (le16); the rest needs features we do not offer.
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&(vn::VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    /// Version 1 drivers never write the net configuration (spec 5.1.4.2).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self) -> Result<(), ActivateError> {
        if self.state == State::Failed {
            return Err(ActivateError::Backend {
                device: "virtio-net",
                reason: format!("back end {} failed earlier", self.backend.name()),
            });
        }
        self.state = State::Active;
        self.sync_interest();
        Ok(())
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [&mut Queue],
        mem: &GuestMemoryMmap,
    ) -> UsedQueues {
        self.sync_event_idx(queues);
        let Some((rx, tx)) = rx_tx(queues) else {
            return 0;
        };
        match index {
            RX_QUEUE => self.process_rx(rx, mem) as UsedQueues * used_bit(RX_QUEUE),
            TX_QUEUE => self.process_tx(tx, mem) as UsedQueues * used_bit(TX_QUEUE),
            _ => 0,
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_backend(&mut self, queues: &mut [&mut Queue], mem: &GuestMemoryMmap) -> UsedQueues {
        self.sync_event_idx(queues);
        let Some((rx, tx)) = rx_tx(queues) else {
            return 0;
        };
        let mut used = 0;
        // Consume fired timers, or the level-triggered epoll would report them forever.
        let tx_fired = self.tx_limit.as_mut().is_some_and(Limiter::timer_fired);
        if let Some(l) = &mut self.rx_limit {
            l.timer_fired();
        }
        // The epoll says which it was only through readiness, so try each that waits.
        if self.tx.stalled || (self.tx.limited && tx_fired) {
            self.tx.stalled = false;
            used |= self.process_tx(tx, mem) as UsedQueues * used_bit(TX_QUEUE);
        }
        used |= self.process_rx(rx, mem) as UsedQueues * used_bit(RX_QUEUE);
        used
    }

    fn reset(&mut self) {
        if self.rx.clear_pending() {
            self.stats.rx_dropped += 1;
        }
        self.rx_admitted = false;
        self.tx.stalled = false;
        self.tx.limited = false;
        self.rx.reset();
        self.acked = 0;
        if self.state == State::Active {
            self.state = State::Inactive;
        }
        if let Err(e) = self.backend.set_offloads(0) {
            log::warn!("{}: cannot clear offloads: {e}", self.backend.name());
        }
        self.sync_interest();
    }
}
