//! Queue tests against a fake back end: an AF_UNIX `SOCK_SEQPACKET` socket pair keeps frame
//! boundaries like a tap does; the test holds the far end.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::testing::{desc, refs, Driver, N, QUEUE_SIZE, W};

const MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// Used rings of the test driver's queues (see `Driver`).
const RX_USED: u64 = 0x1800;
const TX_USED: u64 = 0x2800;
/// `idx` of the tx queue's avail ring.
const TX_AVAIL_IDX: u64 = 0x2402;
const MRG: u64 = 1 << vn::VIRTIO_NET_F_MRG_RXBUF;

#[derive(Debug)]
struct FakeTap {
    fd: OwnedFd,
    offloads: Arc<AtomicU32>,
}

impl AsFd for FakeTap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl NetBackend for FakeTap {
    fn name(&self) -> &str {
        "fake0"
    }
    fn set_offloads(&self, tun_flags: u32) -> io::Result<()> {
        self.offloads.store(tun_flags, Ordering::SeqCst);
        Ok(())
    }
}

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`, which lives for the call.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair: {}", io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nothing else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A device on a socket pair, activated, with the test driver's queues.
struct Rig {
    net: Net,
    peer: OwnedFd,
    offloads: Arc<AtomicU32>,
    d: Driver,
    qs: Vec<Queue>,
}

impl Rig {
    fn new(features: u64) -> Self {
        Self::with_sndbuf(features, None)
    }

    fn with_sndbuf(features: u64, sndbuf: Option<i32>) -> Self {
        let (ours, peer) = seqpacket_pair();
        if let Some(size) = sndbuf {
            // SAFETY: setsockopt reads one int from `size`, which lives for the call.
            let rc = unsafe {
                libc::setsockopt(
                    ours.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&size as *const i32).cast(),
                    4,
                )
            };
            assert_eq!(rc, 0);
        }
        let offloads = Arc::new(AtomicU32::new(0xdead));
        let fake = FakeTap {
            fd: ours,
            offloads: offloads.clone(),
        };
        let mut net = Net::with_backend(Box::new(fake), Some(MAC)).unwrap();
        assert_eq!(offloads.load(Ordering::SeqCst), 0, "cleared at creation");
        net.ack_features(VIRTIO_F_VERSION_1 | features);
        net.activate().unwrap();
        let d = Driver::new(2);
        let qs = d.queues();
        Self {
            net,
            peer,
            offloads,
            d,
            qs,
        }
    }

    fn queue(&mut self, index: usize) -> UsedQueues {
        let mut r = refs(&mut self.qs);
        self.net.process_queue(index, &mut r, &self.d.mem)
    }

    fn backend(&mut self) -> UsedQueues {
        let mut r = refs(&mut self.qs);
        self.net.process_backend(&mut r, &self.d.mem)
    }

    /// The outer event loop would call process_backend now.
    fn backend_ready(&self) -> bool {
        wait_ready(self, 0)
    }

    /// The host side sends a frame to the guest.
    fn send(&self, frame: &[u8]) {
        // SAFETY: the pointer and length describe `frame`, a live slice.
        let n = unsafe { libc::send(self.peer.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize);
    }

    /// The next frame the guest sent, if any.
    fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        // SAFETY: the pointer and length describe `buf`, a live, writable buffer.
        let n = unsafe {
            libc::recv(
                self.peer.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        (n >= 0).then(|| {
            buf.truncate(n as usize);
            buf
        })
    }
}

/// A frame as the tap speaks it: a header (with recognisable fields) and an Ethernet frame
/// of `len` bytes filled from `seed`.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f[0] = vn::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    f[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
    f[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    f.extend((0..len).map(|i| seed.wrapping_add(i as u8)));
    f
}

#[test]
fn features_and_config() {
    let rig = Rig::new(0);
    let f = rig.net.features();
    for b in [
        vn::VIRTIO_NET_F_MAC,
        vn::VIRTIO_NET_F_STATUS,
        vn::VIRTIO_NET_F_MRG_RXBUF,
        vn::VIRTIO_NET_F_CSUM,
        vn::VIRTIO_NET_F_GUEST_CSUM,
        vn::VIRTIO_NET_F_HOST_TSO4,
        vn::VIRTIO_NET_F_GUEST_TSO6,
    ] {
        assert_ne!(f & bit(b), 0, "feature bit {b}");
    }
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_eq!(f & bit(vn::VIRTIO_NET_F_CTRL_VQ), 0);
    let mut cfg = [0xffu8; 10];
    rig.net.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(&cfg[6..8], &[1, 0], "link up");
    assert_eq!(&cfg[8..], &[0, 0]);
    let mut status = [0u8; 2];
    rig.net.read_config(6, &mut status);
    assert_eq!(status, [1, 0]);
    assert_eq!(rig.net.device_type(), device_type::NET);
    assert_eq!(rig.net.queue_max_sizes(), &[256, 256]);
}

#[test]
fn random_mac_is_unicast_and_local() {
    let (ours, _peer) = seqpacket_pair();
    let fake = FakeTap {
        fd: ours,
        offloads: Arc::default(),
    };
    let mac = Net::with_backend(Box::new(fake), None).unwrap().mac();
    assert_eq!(mac[0] & 0x03, 0x02, "{mac:02x?}");
}

#[test]
fn tx_sends_one_frame_per_chain_with_the_header_unchanged() {
    let mut rig = Rig::new(0);
    let f = frame(600, 7);
    rig.d.write(0x20000, &f[..12]);
    rig.d.write(0x21000, &f[12..112]);
    rig.d.write(0x22000, &f[112..]);
    rig.d.add_chain(
        TX_QUEUE,
        &[(0x20000, 12, 0), (0x21000, 100, 0), (0x22000, 500, 0)],
    );
    assert_eq!(rig.queue(TX_QUEUE), 1 << TX_QUEUE);
    assert_eq!(rig.recv().unwrap(), f);
    assert_eq!(rig.recv(), None);
    assert_eq!(rig.d.used(TX_QUEUE), vec![(0, 0)]);
    let s = rig.net.stats();
    assert_eq!((s.tx_frames, s.tx_bytes, s.tx_dropped), (1, 600, 0));
}

#[test]
fn tx_drops_malformed_chains_and_goes_on() {
    let mut rig = Rig::new(0);
    // A loop: descriptor 0 -> 1 -> 0.
    rig.d.add_raw(
        TX_QUEUE,
        &[desc(0x20000, 64, N, 1), desc(0x21000, 64, N, 0)],
    );
    rig.d.add_chain(TX_QUEUE, &[(0x22000, 8, 0)]); // shorter than a header
    rig.d
        .add_chain(TX_QUEUE, &[(0x23000, 12, 0), (0x24000, 100, W)]); // device-writable
    rig.d.add_chain(TX_QUEUE, &[(0xff000, 0x2000, 0)]); // runs past guest memory
    rig.d.add_chain(TX_QUEUE, &[(0x25000, 0x20000, 0)]); // longer than any frame
    let good = frame(60, 1);
    rig.d.write(0x30000, &good);
    rig.d
        .add_chain(TX_QUEUE, &[(0x30000, good.len() as u32, 0)]);
    assert_eq!(rig.queue(TX_QUEUE), 1 << TX_QUEUE);
    assert_eq!(rig.recv().unwrap(), good);
    assert_eq!(rig.recv(), None, "only the good frame went out");
    let used = rig.d.used(TX_QUEUE);
    assert_eq!(used.len(), 6, "every chain is returned");
    assert!(used.iter().all(|&(_, len)| len == 0));
    let s = rig.net.stats();
    assert_eq!((s.tx_frames, s.tx_dropped), (1, 5));
}

/// Found by fuzzing (fuzz/regressions/virtio_net_tx/): an avail index far ahead of the
/// device, which no pop accepts, made the tx loop spin for ever on the VMM thread.
#[test]
fn tx_does_not_spin_on_a_corrupt_avail_index() {
    let mut rig = Rig::new(0);
    // The ring claims 0x200 chains; it holds QUEUE_SIZE.
    rig.d.write(TX_AVAIL_IDX, &0x200u16.to_le_bytes());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let used = rig.queue(TX_QUEUE);
        let _ = tx.send((rig, used));
    });
    let (mut rig, used) = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("process_queue returns");
    assert_eq!(used, 0);
    assert!(rig.d.used(TX_QUEUE).is_empty());
    assert_eq!(rig.recv(), None);
    // Once the driver puts its index right, frames go out again.
    rig.d.write(TX_AVAIL_IDX, &0u16.to_le_bytes());
    let good = frame(60, 1);
    rig.d.write(0x30000, &good);
    rig.d
        .add_chain(TX_QUEUE, &[(0x30000, good.len() as u32, 0)]);
    assert_eq!(rig.queue(TX_QUEUE), 1 << TX_QUEUE);
    assert_eq!(rig.recv().unwrap(), good);
}

#[test]
fn tx_indirect_chain() {
    let mut rig = Rig::new(bit(VIRTIO_RING_F_INDIRECT_DESC));
    let f = frame(200, 3);
    rig.d.write(0x21000, &f[..12]);
    rig.d.write(0x22000, &f[12..]);
    let table = 0x20000;
    rig.d
        .mem
        .write_obj(desc(0x21000, 12, N, 1), GuestAddress(table))
        .unwrap();
    rig.d
        .mem
        .write_obj(desc(0x22000, 200, 0, 0), GuestAddress(table + 16))
        .unwrap();
    rig.d.add_raw(
        TX_QUEUE,
        &[desc(table, 32, VRING_DESC_F_INDIRECT as u16, 0)],
    );
    rig.queue(TX_QUEUE);
    assert_eq!(rig.recv().unwrap(), f);
}

#[test]
fn tx_back_pressure_keeps_frames_until_the_backend_drains() {
    // A small socket buffer fills after a few frames, as a full tap queue would.
    let mut rig = Rig::with_sndbuf(0, Some(4096));
    let count = 15;
    for i in 0..count {
        let f = frame(2000, i as u8);
        let addr = 0x20000 + i * 0x1000;
        rig.d.write(addr, &f);
        rig.d.add_chain(TX_QUEUE, &[(addr, f.len() as u32, 0)]);
    }
    rig.queue(TX_QUEUE);
    let first = rig.d.used(TX_QUEUE).len();
    assert!(first > 0 && first < count as usize, "stalled after {first}");
    assert!(!rig.backend_ready(), "nothing to do until the peer reads");
    let mut got = Vec::new();
    for _ in 0..100 {
        while let Some(f) = rig.recv() {
            got.push(f);
        }
        if got.len() == count as usize {
            break;
        }
        assert!(rig.backend_ready(), "EPOLLOUT wakes the device");
        rig.backend();
    }
    assert_eq!(got.len(), count as usize);
    for (i, f) in got.iter().enumerate() {
        assert_eq!(f, &frame(2000, i as u8), "frame {i} in order");
    }
    assert_eq!(rig.d.used(TX_QUEUE).len(), count as usize);
    assert_eq!(rig.net.stats().tx_dropped, 0);
    assert!(!rig.backend_ready());
}

#[test]
fn rx_frame_into_one_chain() {
    let mut rig = Rig::new(0);
    rig.d
        .add_chain(RX_QUEUE, &[(0x30000, 12, W), (0x31000, 2000, W)]);
    let f = frame(1000, 9);
    rig.send(&f);
    assert!(rig.backend_ready());
    assert_eq!(rig.backend(), 1 << RX_QUEUE);
    assert_eq!(rig.d.used(RX_QUEUE), vec![(0, 1012)]);
    let hdr = rig.d.read(0x30000, 12);
    assert_eq!(hdr[0], 0, "flags cleared without GUEST_CSUM");
    assert_eq!(&hdr[1..10], &f[1..10]);
    assert_eq!(&hdr[10..12], &[1, 0], "num_buffers");
    assert_eq!(rig.d.read(0x31000, 1000), &f[12..]);
    let s = rig.net.stats();
    assert_eq!((s.rx_frames, s.rx_bytes, s.rx_dropped), (1, 1000, 0));
    assert!(!rig.backend_ready());
}

#[test]
fn rx_header_flags_pass_with_guest_csum() {
    let mut rig = Rig::new(bit(vn::VIRTIO_NET_F_GUEST_CSUM));
    rig.d.add_chain(RX_QUEUE, &[(0x30000, 2048, W)]);
    let f = frame(100, 0);
    rig.send(&f);
    rig.backend();
    let got = rig.d.read(0x30000, f.len());
    assert_eq!(&got[..10], &f[..10]);
    assert_eq!(&got[12..], &f[12..]);
}

#[test]
fn rx_too_small_chain_drops_the_frame_and_keeps_the_chain() {
    let mut rig = Rig::new(0);
    rig.d.add_chain(RX_QUEUE, &[(0x30000, 100, W)]);
    rig.send(&frame(500, 0));
    rig.send(&frame(60, 5));
    rig.backend();
    assert_eq!(
        rig.d.used(RX_QUEUE),
        vec![(0, 72)],
        "the small frame used it"
    );
    assert_eq!(rig.d.read(0x30000 + 12, 60), &frame(60, 5)[12..]);
    assert_eq!(rig.net.stats().rx_dropped, 1);
}

#[test]
fn rx_frame_spans_mergeable_buffers() {
    let mut rig = Rig::new(MRG);
    for i in 0..4 {
        rig.d
            .add_chain(RX_QUEUE, &[(0x30000 + i * 0x1000, 1024, W)]);
    }
    let f = frame(2988, 4); // 3000 bytes with the header
    rig.send(&f);
    assert_eq!(rig.backend(), 1 << RX_QUEUE);
    assert_eq!(rig.d.used(RX_QUEUE), vec![(0, 1024), (1, 1024), (2, 952)]);
    let mut got = rig.d.read(0x30000, 1024);
    got.extend(rig.d.read(0x31000, 1024));
    got.extend(rig.d.read(0x32000, 952));
    assert_eq!(&got[10..12], &[3, 0], "num_buffers");
    assert_eq!(&got[12..], &f[12..]);
    // The fourth buffer is still there for the next frame.
    rig.send(&frame(50, 0));
    rig.backend();
    assert_eq!(rig.d.used(RX_QUEUE)[3], (3, 62));
    assert_eq!(rig.d.read(0x33000 + 10, 2), &[1, 0]);
}

#[test]
fn rx_back_pressure_holds_frames_until_buffers_arrive() {
    let mut rig = Rig::new(MRG);
    let (a, b) = (frame(300, 1), frame(400, 2));
    rig.send(&a);
    rig.send(&b);
    assert!(rig.backend_ready());
    assert_eq!(rig.backend(), 0, "no buffers: nothing used");
    assert!(
        !rig.backend_ready(),
        "the device stops watching the back end while a frame waits"
    );
    assert_eq!(rig.d.read(RX_USED, 2), &[0, 0], "driver notifications on");
    assert_eq!(rig.backend(), 0, "a spurious wake-up changes nothing");
    // The driver adds buffers and notifies the rx queue.
    rig.d.add_chain(RX_QUEUE, &[(0x30000, 1024, W)]);
    rig.d.add_chain(RX_QUEUE, &[(0x31000, 1024, W)]);
    assert_eq!(rig.queue(RX_QUEUE), 1 << RX_QUEUE);
    assert_eq!(rig.d.used(RX_QUEUE), vec![(0, 312), (1, 412)]);
    assert_eq!(rig.d.read(0x30000 + 12, 300), &a[12..]);
    assert_eq!(rig.d.read(0x31000 + 12, 400), &b[12..]);
    assert_eq!(rig.d.read(RX_USED, 2), &[1, 0], "notifications off again");
    let s = rig.net.stats();
    assert_eq!((s.rx_frames, s.rx_dropped), (2, 0));
    assert!(!rig.backend_ready(), "back end drained");
    rig.send(&frame(60, 0));
    assert!(rig.backend_ready(), "watched again");
}

#[test]
fn rx_mergeable_frame_waits_for_enough_buffers() {
    let mut rig = Rig::new(MRG);
    rig.d.add_chain(RX_QUEUE, &[(0x30000, 1024, W)]);
    let f = frame(2988, 4);
    rig.send(&f);
    assert_eq!(rig.backend(), 0);
    assert!(rig.d.used(RX_QUEUE).is_empty(), "no partial frame");
    rig.d.add_chain(RX_QUEUE, &[(0x31000, 1024, W)]);
    rig.d.add_chain(RX_QUEUE, &[(0x32000, 1024, W)]);
    assert_eq!(rig.queue(RX_QUEUE), 1 << RX_QUEUE);
    assert_eq!(rig.d.used(RX_QUEUE).len(), 3);
    assert_eq!(rig.d.read(0x30000 + 10, 2), &[3, 0]);
}

#[test]
fn rx_frame_larger_than_the_whole_ring_is_dropped() {
    let mut rig = Rig::new(MRG);
    for i in 0..QUEUE_SIZE as u64 {
        rig.d.add_chain(RX_QUEUE, &[(0x30000 + i * 0x100, 64, W)]);
    }
    rig.send(&frame(2000, 0));
    rig.send(&frame(40, 1));
    rig.backend();
    assert_eq!(rig.net.stats().rx_dropped, 1);
    assert_eq!(rig.d.used(RX_QUEUE), vec![(0, 52)]);
}

#[test]
fn rx_skips_malformed_chains() {
    let mut rig = Rig::new(MRG);
    rig.d.add_chain(RX_QUEUE, &[(0x30000, 64, 0)]); // device-readable
    rig.d.add_chain(RX_QUEUE, &[(0x31000, 8, W)]); // cannot hold the header
    rig.d.add_chain(RX_QUEUE, &[(0x32000, 1024, W)]);
    let f = frame(100, 2);
    rig.send(&f);
    rig.backend();
    // The malformed chains come back empty, ahead of the frame.
    assert_eq!(rig.d.used(RX_QUEUE), vec![(0, 0), (1, 0), (2, 112)]);
    assert_eq!(rig.d.read(0x32000 + 12, 100), &f[12..]);
}

#[test]
fn event_idx_publishes_avail_event() {
    let mut rig = Rig::new(VIRTIO_RING_F_EVENT_IDX);
    for i in 0..2 {
        let f = frame(60, i);
        let addr = 0x20000 + u64::from(i) * 0x1000;
        rig.d.write(addr, &f);
        rig.d.add_chain(TX_QUEUE, &[(addr, f.len() as u32, 0)]);
    }
    rig.queue(TX_QUEUE);
    let avail_event = TX_USED + 4 + 8 * u64::from(QUEUE_SIZE);
    assert_eq!(rig.d.read(avail_event, 2), &[2, 0]);
    assert!(rig.qs[TX_QUEUE].event_idx_enabled());
}

#[test]
fn offloads_follow_the_acked_features() {
    let mut rig = Rig::new(0);
    assert_eq!(rig.offloads.load(Ordering::SeqCst), 0);
    let all = [
        vn::VIRTIO_NET_F_GUEST_CSUM,
        vn::VIRTIO_NET_F_GUEST_TSO4,
        vn::VIRTIO_NET_F_GUEST_TSO6,
        vn::VIRTIO_NET_F_GUEST_ECN,
    ]
    .iter()
    .fold(VIRTIO_F_VERSION_1, |f, &b| f | bit(b));
    rig.net.ack_features(all);
    let want = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
    assert_eq!(rig.offloads.load(Ordering::SeqCst), want);
    // Segmentation without checksum offload is invalid; the tap would refuse it.
    rig.net
        .ack_features(VIRTIO_F_VERSION_1 | bit(vn::VIRTIO_NET_F_GUEST_TSO4));
    assert_eq!(rig.offloads.load(Ordering::SeqCst), 0);
    rig.net.ack_features(all);
    rig.net.reset();
    assert_eq!(rig.offloads.load(Ordering::SeqCst), 0);
}

#[test]
fn backend_is_watched_only_while_active() {
    let (ours, peer) = seqpacket_pair();
    let fake = FakeTap {
        fd: ours,
        offloads: Arc::default(),
    };
    let mut rig = Rig {
        net: Net::with_backend(Box::new(fake), Some(MAC)).unwrap(),
        peer,
        offloads: Arc::default(),
        d: Driver::new(2),
        qs: Vec::new(),
    };
    rig.qs = rig.d.queues();
    rig.send(&frame(60, 0));
    assert!(!rig.backend_ready(), "not before activation");
    rig.net.activate().unwrap();
    assert!(rig.backend_ready());
    rig.backend(); // no buffers: the frame waits
    rig.net.reset();
    assert!(!rig.backend_ready(), "not after a reset");
    assert_eq!(rig.net.stats().rx_dropped, 1, "the waiting frame is gone");
}

#[test]
fn closed_backend_fails_the_device_without_stalling_tx() {
    let mut rig = Rig::new(0);
    // SAFETY: shuts down a socket the rig owns; the descriptor stays valid.
    let rc = unsafe { libc::shutdown(rig.peer.as_raw_fd(), libc::SHUT_RDWR) };
    assert_eq!(rc, 0);
    assert!(rig.backend_ready(), "end of file is readable");
    rig.backend();
    assert!(!rig.backend_ready(), "a failed back end is not watched");
    let f = frame(60, 0);
    rig.d.write(0x20000, &f);
    rig.d.add_chain(TX_QUEUE, &[(0x20000, f.len() as u32, 0)]);
    assert_eq!(rig.queue(TX_QUEUE), 1 << TX_QUEUE, "tx still completes");
    assert_eq!(rig.net.stats().tx_dropped, 1);
    rig.net.reset();
    assert!(rig.net.activate().is_err());
}

#[test]
fn unknown_queue_is_ignored() {
    let mut rig = Rig::new(0);
    assert_eq!(rig.queue(2), 0);
    let mut one = vec![Queue::new(16).unwrap()];
    let mut r = refs(&mut one);
    assert_eq!(rig.net.process_queue(RX_QUEUE, &mut r, &rig.d.mem), 0);
}

/// Polls the device's back-end descriptor for up to `ms` milliseconds.
fn wait_ready(rig: &Rig, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: rig.net.backend_fd().unwrap(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd that lives for the call.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n == 1 && p.revents & libc::POLLIN != 0
}

#[test]
fn tx_rate_limit_delays_frames_and_loses_none() {
    let mut rig = Rig::new(0);
    // 10 frames/s: a burst of one, then one frame per 100 ms.
    let tx = RateLimit {
        bytes_per_sec: None,
        ops_per_sec: Some(10),
    };
    rig.net.set_rate_limits(RateLimit::default(), tx).unwrap();
    let f = frame(100, 3);
    for i in 0..4u64 {
        let at = 0x20000 + i * 0x1000;
        rig.d.write(at, &f);
        rig.d.add_chain(TX_QUEUE, &[(at, f.len() as u32, 0)]);
    }
    let start = std::time::Instant::now();
    rig.queue(TX_QUEUE);
    assert!(rig.recv().is_some(), "the burst goes at once");
    assert_eq!(rig.recv(), None, "the rest waits");
    let mut got = 1;
    while got < 4 {
        assert!(
            start.elapsed().as_secs() < 10,
            "held-back frames never went"
        );
        if wait_ready(&rig, 1000) {
            rig.backend();
        }
        while let Some(r) = rig.recv() {
            assert_eq!(r, f);
            got += 1;
        }
    }
    let took = start.elapsed();
    assert!(took.as_millis() >= 290, "4 frames at 10/s took {took:?}");
    assert_eq!(rig.d.used(TX_QUEUE).len(), 4);
    let c = rig.net.counters();
    let limited = c
        .iter()
        .find(|(n, _)| *n == "transmit_rate_limited")
        .unwrap();
    assert!(limited.1 >= 3, "{c:?}");
    assert_eq!(rig.net.stats().tx_dropped, 0);
}

#[test]
fn rx_rate_limit_holds_the_frame_and_the_tap_until_the_timer() {
    let mut rig = Rig::new(0);
    // 10 KB/s: a 1000-byte burst, so a 1000-byte frame passes and the next waits ~100 ms.
    let rx = RateLimit {
        bytes_per_sec: Some(10_000),
        ops_per_sec: None,
    };
    rig.net.set_rate_limits(rx, RateLimit::default()).unwrap();
    for i in 0..3u64 {
        rig.d
            .add_chain(RX_QUEUE, &[(0x30000 + i * 0x1000, 2000, W)]);
    }
    let start = std::time::Instant::now();
    for seed in 0..3 {
        rig.send(&frame(1000, seed));
    }
    let mut delivered = 0;
    while delivered < 3 {
        assert!(
            start.elapsed().as_secs() < 10,
            "held-back frames never arrived"
        );
        if wait_ready(&rig, 1000) {
            rig.backend();
        }
        delivered = rig.d.used(RX_QUEUE).len();
    }
    let took = start.elapsed();
    assert!(
        took.as_millis() >= 190,
        "3 x 1000 bytes at 10 KB/s took {took:?}"
    );
    for i in 0..3u64 {
        assert_eq!(
            rig.d.read(0x30000 + i * 0x1000 + 12, 1000),
            &frame(1000, i as u8)[12..]
        );
    }
    assert_eq!(rig.net.stats().rx_dropped, 0);
}
