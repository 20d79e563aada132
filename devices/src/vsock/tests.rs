//! The test's `Driver` plays the guest driver; headers are encoded here by hand (44 bytes,
//! little-endian), independently of the crate the device parses them with. Host programs
//! are plain Unix sockets in a temporary directory per test.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::{op, SHUTDOWN_BOTH, SHUTDOWN_SEND};
use super::*;
use crate::virtio::testing::{desc, refs, Driver, N, QUEUE_SIZE, W};

const CID: u64 = 42;
/// Rx buffers: one descriptor each (Linux >= 6.2 layout), `RX_BUF_LEN` apart.
const RX_BUF: u64 = 0x20000;
const RX_BUF_LEN: u32 = 0x2000;
/// Tx headers, 0x100 apart, and one payload area (the device takes it synchronously).
const TX_HDR: u64 = 0x60000;
const TX_DATA: u64 = 0x80000;
const GUEST_BUF_ALLOC: u32 = 1 << 20;
const HDR: usize = 44;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    /// A guest packet from guest port `src_port` to host port `dst_port`.
    fn guest(op: u16, src_port: u32, dst_port: u32) -> Self {
        Self {
            src_cid: CID,
            dst_cid: 2,
            src_port,
            dst_port,
            type_: 1,
            op,
            buf_alloc: GUEST_BUF_ALLOC,
            ..Default::default()
        }
    }

    fn encode(&self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// A directory removed with everything in it when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("kvs-vsock-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Debug)]
struct Pkt {
    hdr: Hdr,
    data: Vec<u8>,
}

/// A device with the guest side of its queues; every packet the device puts on the rx ring
/// lands in `inbox`.
struct Harness {
    dev: Vsock,
    drv: Driver,
    qs: Vec<Queue>,
    rx_posted: u64,
    rx_seen: u64,
    /// Read used rx buffers as `post_rx`'s one-descriptor layout.
    collect_rx: bool,
    tx_posted: u64,
    /// Descriptor index the next tx chain starts at.
    tx_desc_next: u16,
    inbox: Vec<Pkt>,
    /// Tells whether the device's backend fd is readable, as the transport would see it.
    watch: Epoll,
    // Last, so that the device (and its socket file) goes first.
    _dir: TempDir,
}

impl Harness {
    fn inactive() -> Self {
        let dir = TempDir::new();
        let uds_path = dir.0.join("v.sock");
        let dev = Vsock::new(VsockConfig {
            guest_cid: CID,
            uds_path,
        })
        .unwrap();
        let drv = Driver::new(3);
        let qs = drv.queues();
        let watch = Epoll::new().unwrap();
        let ev = EpollEvent::new(EventSet::IN, 0);
        watch
            .ctl(ControlOperation::Add, dev.backend_fd().unwrap(), ev)
            .unwrap();
        Self {
            dev,
            drv,
            qs,
            rx_posted: 0,
            rx_seen: 0,
            collect_rx: true,
            tx_posted: 0,
            tx_desc_next: 0,
            inbox: Vec::new(),
            watch,
            _dir: dir,
        }
    }

    fn new() -> Self {
        let mut h = Self::inactive();
        h.dev.activate().unwrap();
        h
    }

    fn uds(&self) -> PathBuf {
        self.dev.uds_path().to_path_buf()
    }

    /// Keeps all 16 rx descriptors available.
    fn post_rx(&mut self) {
        let room = QUEUE_SIZE as u64 - (self.rx_posted - self.rx_seen);
        self.post_rx_n(room);
    }

    fn post_rx_n(&mut self, n: u64) {
        for _ in 0..n {
            let slot = self.rx_posted % QUEUE_SIZE as u64;
            let addr = RX_BUF + slot * RX_BUF_LEN as u64;
            self.drv.add_chain(0, &[(addr, RX_BUF_LEN, W)]);
            self.rx_posted += 1;
        }
    }

    /// Reads the rx buffers the device used since the last call.
    fn collect(&mut self) {
        if !self.collect_rx {
            return;
        }
        let used = self.drv.used(0);
        for &(head, len) in &used[self.rx_seen as usize..] {
            assert!(len as usize >= HDR, "short rx packet: {len}");
            let raw = self
                .drv
                .read(RX_BUF + head as u64 * RX_BUF_LEN as u64, len as usize);
            let hdr = Hdr::decode(&raw[..HDR]);
            assert_eq!((hdr.src_cid, hdr.dst_cid, hdr.type_), (2, CID, 1));
            assert_eq!(hdr.len as usize, raw.len() - HDR);
            let data = raw[HDR..].to_vec();
            self.inbox.push(Pkt { hdr, data });
        }
        self.rx_seen = used.len() as u64;
    }

    fn call(
        &mut self,
        f: impl FnOnce(&mut Vsock, &mut [&mut Queue], &GuestMemoryMmap) -> UsedQueues,
    ) -> UsedQueues {
        let mut q = refs(&mut self.qs);
        let used = f(&mut self.dev, &mut q, &self.drv.mem);
        drop(q);
        self.collect();
        used
    }

    fn rx_ready(&mut self) -> UsedQueues {
        self.post_rx();
        self.call(|d, q, m| d.process_queue(RX_QUEUE, q, m))
    }

    fn backend_ready(&self) -> bool {
        let mut ev = [EpollEvent::default()];
        self.watch.wait(0, &mut ev).unwrap() > 0
    }

    /// Runs the device as the transport would until its backend fd goes quiet; it must.
    fn pump(&mut self) {
        for _ in 0..200 {
            let used = self.rx_ready();
            if !self.backend_ready() {
                if used & 1 == 0 {
                    return;
                }
                continue;
            }
            self.call(|d, q, m| d.process_backend(q, m));
        }
        panic!("the backend fd stays readable: the transport would spin");
    }

    fn add_tx(&mut self, descs: &[(u64, u32, u16)]) -> UsedQueues {
        self.drv.add_chain(TX_QUEUE, descs);
        self.tx_posted += 1;
        self.tx_desc_next = (self.tx_desc_next + descs.len() as u16) % QUEUE_SIZE;
        self.call(|d, q, m| d.process_queue(TX_QUEUE, q, m))
    }

    /// Descriptors as they are, `next` fields included (for malformed chains).
    fn add_tx_raw(&mut self, raw: &[virtio_queue::desc::RawDescriptor]) -> UsedQueues {
        self.drv.add_raw(TX_QUEUE, raw);
        self.tx_posted += 1;
        self.tx_desc_next = (self.tx_desc_next + raw.len() as u16) % QUEUE_SIZE;
        self.call(|d, q, m| d.process_queue(TX_QUEUE, q, m))
    }

    fn hdr_addr(&self) -> u64 {
        TX_HDR + (self.tx_posted % QUEUE_SIZE as u64) * 0x100
    }

    /// Sends one packet: header and payload in two descriptors.
    fn send(&mut self, mut h: Hdr, data: &[u8]) -> UsedQueues {
        h.len = data.len() as u32;
        let addr = self.hdr_addr();
        self.drv.write(addr, &h.encode());
        if data.is_empty() {
            self.add_tx(&[(addr, HDR as u32, 0)])
        } else {
            self.drv.write(TX_DATA, data);
            self.add_tx(&[(addr, HDR as u32, 0), (TX_DATA, data.len() as u32, 0)])
        }
    }

    fn tx_used(&self) -> Vec<(u32, u32)> {
        self.drv.used(TX_QUEUE)
    }

    fn take(&mut self, pred: impl Fn(&Hdr) -> bool) -> Vec<Pkt> {
        let (hit, rest) = std::mem::take(&mut self.inbox)
            .into_iter()
            .partition(|p| pred(&p.hdr));
        self.inbox = rest;
        hit
    }

    fn take_one(&mut self, pred: impl Fn(&Hdr) -> bool) -> Pkt {
        let mut hit = self.take(pred);
        assert_eq!(hit.len(), 1, "packets: {hit:?}, rest: {:?}", self.inbox);
        hit.remove(0)
    }

    /// A host client's `CONNECT` to `guest_port`, accepted by the guest with `buf_alloc` of
    /// credit. Returns the client and the host-side port.
    fn host_connect_with(&mut self, guest_port: u32, buf_alloc: u32) -> (UnixStream, u32) {
        let mut c = client(&self.uds());
        c.write_all(format!("CONNECT {guest_port}\n").as_bytes())
            .unwrap();
        self.pump();
        let req = self.take_one(|h| h.op == op::REQUEST && h.dst_port == guest_port);
        assert!(req.hdr.src_port >= 1 << 30, "ephemeral host port");
        assert_eq!(req.hdr.buf_alloc, CONN_BUF_SIZE);
        let mut resp = Hdr::guest(op::RESPONSE, guest_port, req.hdr.src_port);
        resp.buf_alloc = buf_alloc;
        self.send(resp, &[]);
        assert_eq!(read_line(&mut c), format!("OK {}\n", req.hdr.src_port));
        (c, req.hdr.src_port)
    }

    fn host_connect(&mut self, guest_port: u32) -> (UnixStream, u32) {
        self.host_connect_with(guest_port, GUEST_BUF_ALLOC)
    }

    /// Bytes the device sent as OP_RW on `local -> guest_port`, in order.
    fn take_data(&mut self, local: u32, guest_port: u32) -> Vec<u8> {
        let pkts = self.take(|h| h.op == op::RW && h.src_port == local && h.dst_port == guest_port);
        pkts.into_iter().flat_map(|p| p.data).collect()
    }
}

fn client(path: &Path) -> UnixStream {
    let c = UnixStream::connect(path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c
}

fn read_line(c: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8];
    while line.last() != Some(&b'\n') {
        assert_eq!(c.read(&mut b).unwrap(), 1, "stream closed after {line:?}");
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

/// The peer closed: reads end with EOF (or a reset), never a timeout.
fn assert_closed(c: &mut UnixStream) {
    let mut buf = [0u8; 64];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
            Err(e) => panic!("stream still open: {e}"),
        }
    }
}

#[test]
fn device_identity_and_config() {
    let h = Harness::inactive();
    assert_eq!(h.dev.device_type(), 19);
    assert_eq!(h.dev.queue_max_sizes().len(), 3);
    assert_eq!(
        h.dev.features() & crate::virtio::VIRTIO_F_VERSION_1,
        1 << 32
    );
    let mut cfg = [0u8; 8];
    h.dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), CID);
    let mut hi = [0u8; 4];
    h.dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
}

#[test]
fn reserved_cids_are_rejected() {
    let dir = TempDir::new();
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let cfg = VsockConfig {
            guest_cid: cid,
            uds_path: dir.0.join("v.sock"),
        };
        assert!(matches!(Vsock::new(cfg), Err(VsockError::InvalidCid(c)) if c == cid));
    }
    assert!(!dir.0.join("v.sock").exists());
}

#[test]
fn bind_errors_name_the_path() {
    let dir = TempDir::new();
    let path = dir.0.join("missing-dir").join("v.sock");
    let err = Vsock::new(VsockConfig {
        guest_cid: 3,
        uds_path: path.clone(),
    })
    .unwrap_err();
    assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");

    // A regular file is not a stale socket: refuse and leave it alone.
    let file = dir.0.join("file");
    std::fs::write(&file, b"keep").unwrap();
    let err = Vsock::new(VsockConfig {
        guest_cid: 3,
        uds_path: file.clone(),
    })
    .unwrap_err();
    assert!(matches!(err, VsockError::NotASocket { .. }), "{err}");
    assert!(err.to_string().contains(file.to_str().unwrap()));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
}

#[test]
fn stale_socket_is_replaced_and_socket_file_removed_on_drop() {
    let dir = TempDir::new();
    let path = dir.0.join("v.sock");
    drop(UnixListener::bind(&path).unwrap()); // leaves the file behind
    assert!(path.exists());
    let cfg = VsockConfig {
        guest_cid: 3,
        uds_path: path.clone(),
    };
    let dev = Vsock::new(cfg.clone()).unwrap();
    assert!(UnixStream::connect(&path).is_ok(), "listening");
    drop(dev);
    assert!(!path.exists(), "socket file removed on drop");
    // And a second device can take the path again.
    drop(Vsock::new(cfg).unwrap());
}

#[test]
fn nothing_is_accepted_before_activation() {
    let mut h = Harness::inactive();
    let mut c = client(&h.uds());
    c.write_all(b"CONNECT 5\n").unwrap();
    assert!(
        !h.backend_ready(),
        "inactive device must not wake the transport"
    );
    h.dev.activate().unwrap();
    h.pump();
    let req = h.take_one(|h| h.op == op::REQUEST);
    assert_eq!(req.hdr.dst_port, 5);
}

#[test]
fn host_connect_relays_both_ways() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(1234);

    c.write_all(b"hello from the host").unwrap();
    h.pump();
    let rw = h.take_one(|x| x.op == op::RW);
    assert_eq!((rw.hdr.src_port, rw.hdr.dst_port), (local, 1234));
    assert_eq!(rw.hdr.buf_alloc, CONN_BUF_SIZE);
    assert_eq!(rw.data, b"hello from the host");

    h.send(Hdr::guest(op::RW, 1234, local), b"hello from the guest");
    let mut buf = [0u8; 20];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello from the guest");
    h.pump();
    assert_eq!(h.dev.connections(), 1);
}

#[test]
fn bytes_right_after_the_connect_line_are_relayed() {
    let mut h = Harness::new();
    let mut c = client(&h.uds());
    c.write_all(b"CONNECT 77\nearly bytes").unwrap();
    h.pump();
    let req = h.take_one(|x| x.op == op::REQUEST);
    h.send(Hdr::guest(op::RESPONSE, 77, req.hdr.src_port), &[]);
    assert_eq!(read_line(&mut c), format!("OK {}\n", req.hdr.src_port));
    h.pump();
    assert_eq!(h.take_data(req.hdr.src_port, 77), b"early bytes");
}

#[test]
fn guest_refusal_closes_the_client() {
    let mut h = Harness::new();
    let mut c = client(&h.uds());
    c.write_all(b"CONNECT 99\n").unwrap();
    h.pump();
    let req = h.take_one(|x| x.op == op::REQUEST);
    // Nobody listens on guest port 99.
    h.send(Hdr::guest(op::RST, 99, req.hdr.src_port), &[]);
    assert_closed(&mut c);
    h.pump();
    assert_eq!(h.dev.connections(), 0);
    assert!(h.inbox.is_empty(), "no answer to an RST: {:?}", h.inbox);
}

#[test]
fn malformed_connect_lines_close_the_client() {
    let mut h = Harness::new();
    let long = format!("CONNECT {}", "1".repeat(40));
    let lines: [&[u8]; 6] = [
        b"HELLO 5\n",
        b"CONNECT x\n",
        b"CONNECT 1 2\n",
        b"CONNECT 99999999999\n",
        b"\xff\xfe\n",
        long.as_bytes(),
    ];
    let mut clients = Vec::new();
    for line in lines {
        let mut c = client(&h.uds());
        c.write_all(line).unwrap();
        clients.push(c);
    }
    h.pump();
    for c in &mut clients {
        assert_closed(c);
    }
    assert_eq!(h.dev.connections(), 0);
    assert!(h.inbox.is_empty(), "{:?}", h.inbox);
    // A client that closes half-way through its line is dropped too.
    let mut c = client(&h.uds());
    c.write_all(b"CONN").unwrap();
    h.pump();
    assert_eq!(h.dev.connections(), 1);
    drop(c);
    h.pump();
    assert_eq!(h.dev.connections(), 0);
}

#[test]
fn guest_connect_reaches_the_port_listener() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(port_path(&h.uds(), 5000)).unwrap();
    h.pump();
    h.send(Hdr::guest(op::REQUEST, 4000, 5000), &[]);
    let resp = h.take_one(|x| x.op == op::RESPONSE);
    assert_eq!((resp.hdr.src_port, resp.hdr.dst_port), (5000, 4000));
    assert_eq!(resp.hdr.buf_alloc, CONN_BUF_SIZE);

    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"ping").unwrap();
    h.pump();
    assert_eq!(h.take_data(5000, 4000), b"ping");
    h.send(Hdr::guest(op::RW, 4000, 5000), b"pong");
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let mut h = Harness::new();
    h.pump();
    h.send(Hdr::guest(op::REQUEST, 4001, 5001), &[]);
    let rst = h.take_one(|x| x.op == op::RST);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (5001, 4001));
    assert_eq!(h.dev.connections(), 0);
    assert!(h.inbox.is_empty());
}

#[test]
fn device_sends_no_more_than_the_guest_credit() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect_with(600, 10);
    c.write_all(b"0123456789abcdefghijKLMNO").unwrap();
    // pump() also checks the backend fd goes quiet while the guest has no credit.
    h.pump();
    assert_eq!(h.take_data(local, 600), b"0123456789");
    h.pump();
    assert!(h.inbox.is_empty(), "{:?}", h.inbox);

    let mut upd = Hdr::guest(op::CREDIT_UPDATE, 600, local);
    upd.buf_alloc = 10;
    upd.fwd_cnt = 10;
    h.send(upd, &[]);
    h.pump();
    assert_eq!(h.take_data(local, 600), b"abcdefghij");

    // Credit carried by any packet counts too, here an RW toward the host.
    let mut rw = Hdr::guest(op::RW, 600, local);
    rw.buf_alloc = 10;
    rw.fwd_cnt = 20;
    h.send(rw, b"x");
    h.pump();
    assert_eq!(h.take_data(local, 600), b"KLMNO");
    let mut x = [0u8];
    c.read_exact(&mut x).unwrap();
    assert_eq!(&x, b"x");
}

#[test]
fn credit_request_gets_credit_update() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(601);
    h.send(Hdr::guest(op::RW, 601, local), &[7u8; 100]);
    let mut buf = [0u8; 100];
    c.read_exact(&mut buf).unwrap();
    h.send(Hdr::guest(op::CREDIT_REQUEST, 601, local), &[]);
    let upd = h.take_one(|x| x.op == op::CREDIT_UPDATE);
    assert_eq!((upd.hdr.buf_alloc, upd.hdr.fwd_cnt), (CONN_BUF_SIZE, 100));
}

#[test]
fn credit_updates_keep_a_streaming_guest_going() {
    // The guest sends 2 MiB respecting the device's credit, while the host reads slowly.
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(602);
    c.set_nonblocking(true).unwrap();
    let total = 2 << 20;
    let payload: Vec<u8> = (0..total).map(|i| (i * 7 % 251) as u8).collect();
    let (mut sent, mut fwd_cnt, mut got) = (0usize, 0u32, Vec::new());
    let mut buf = vec![0u8; 48 * 1024];
    let mut rounds = 0;
    while got.len() < total {
        rounds += 1;
        assert!(rounds < 10_000, "stalled at {} of {total}", got.len());
        let credit = CONN_BUF_SIZE as usize - (sent - fwd_cnt as usize);
        let n = credit.min(32 * 1024).min(total - sent);
        if n > 0 {
            h.send(Hdr::guest(op::RW, 602, local), &payload[sent..sent + n]);
            sent += n;
        }
        // The host takes a little at a time.
        match c.read(&mut buf) {
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        h.pump();
        for p in h.take(|x| x.src_port == local) {
            assert_eq!(p.hdr.op, op::CREDIT_UPDATE, "{p:?}");
            assert!(p.hdr.fwd_cnt >= fwd_cnt);
            fwd_cnt = p.hdr.fwd_cnt;
        }
        assert!(sent - fwd_cnt as usize <= CONN_BUF_SIZE as usize);
    }
    assert!(got == payload, "bytes arrive intact and in order");
}

#[test]
fn guest_overrunning_credit_is_reset_and_memory_stays_bounded() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(603);
    // The host never reads: the socket buffer fills, then the device's buffer, then the
    // guest (ignoring its credit) gets an RST instead of more host memory.
    let chunk = vec![1u8; MAX_PKT_DATA as usize];
    let mut sent = 0usize;
    loop {
        h.send(Hdr::guest(op::RW, 603, local), &chunk);
        sent += chunk.len();
        h.rx_ready();
        if !h.take(|x| x.op == op::RST).is_empty() {
            break;
        }
        assert!(sent < 64 << 20, "no reset after {sent} bytes");
    }
    // What was accepted fits in the socket buffer plus the device's bound.
    let mut buf = vec![0u8; 1 << 16];
    let mut read = 0;
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(read < sent);
    assert!(
        sent - read <= CONN_BUF_SIZE as usize + 2 * chunk.len(),
        "sent {sent}, read {read}"
    );
    h.pump();
    assert_eq!(h.dev.connections(), 0);
}

#[test]
fn guest_rst_closes_the_host_side() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(700);
    h.send(Hdr::guest(op::RST, 700, local), &[]);
    assert_closed(&mut c);
    h.pump();
    assert_eq!(h.dev.connections(), 0);
    assert!(h.inbox.is_empty(), "{:?}", h.inbox);
}

#[test]
fn guest_shutdown_closes_the_host_side_and_resets() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(701);
    let mut sd = Hdr::guest(op::SHUTDOWN, 701, local);
    sd.flags = SHUTDOWN_BOTH;
    h.send(sd, &[]);
    assert_closed(&mut c);
    h.pump();
    let rst = h.take_one(|x| x.op == op::RST);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (local, 701));
    assert_eq!(h.dev.connections(), 0);
    // Packets after the end get an RST of their own.
    h.send(Hdr::guest(op::RW, 701, local), b"late");
    h.take_one(|x| x.op == op::RST);
}

#[test]
fn host_close_sends_shutdown_then_rst() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(702);
    c.write_all(b"last words").unwrap();
    drop(c);
    h.pump();
    let ops: Vec<(u16, u32)> = h.inbox.iter().map(|p| (p.hdr.op, p.hdr.flags)).collect();
    assert_eq!(
        ops,
        [(op::RW, 0), (op::SHUTDOWN, SHUTDOWN_BOTH), (op::RST, 0)]
    );
    assert_eq!(h.take_data(local, 702), b"last words");
    assert_eq!(h.dev.connections(), 0);
}

#[test]
fn host_half_close_leaves_the_guest_direction_open() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(703);
    c.write_all(b"request").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    h.pump();
    let ops: Vec<(u16, u32)> = h.inbox.iter().map(|p| (p.hdr.op, p.hdr.flags)).collect();
    assert_eq!(ops, [(op::RW, 0), (op::SHUTDOWN, SHUTDOWN_SEND)]);
    h.inbox.clear();
    h.send(Hdr::guest(op::RW, 703, local), b"response");
    let mut buf = [0u8; 8];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"response");
    let mut sd = Hdr::guest(op::SHUTDOWN, 703, local);
    sd.flags = SHUTDOWN_BOTH;
    h.send(sd, &[]);
    assert_closed(&mut c);
    h.pump();
    h.take_one(|x| x.op == op::RST);
    assert_eq!(h.dev.connections(), 0);
}

#[test]
fn guest_half_close_shuts_the_host_write_side() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(704);
    h.send(Hdr::guest(op::RW, 704, local), b"all of it");
    let mut sd = Hdr::guest(op::SHUTDOWN, 704, local);
    sd.flags = SHUTDOWN_SEND;
    h.send(sd, &[]);
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"all of it");
    // The host can still answer.
    c.write_all(b"ack").unwrap();
    h.pump();
    assert_eq!(h.take_data(local, 704), b"ack");
    assert_eq!(h.dev.connections(), 1);
}

#[test]
fn packets_for_unknown_connections_get_rst() {
    let mut h = Harness::new();
    h.pump();
    h.send(Hdr::guest(op::RW, 6666, 5555), b"who?");
    let rst = h.take_one(|_| true);
    assert_eq!(rst.hdr.op, op::RST);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (5555, 6666));
    // An RST is never answered.
    h.send(Hdr::guest(op::RST, 6666, 5555), &[]);
    h.pump();
    assert!(h.inbox.is_empty());
}

#[test]
fn malformed_tx_packets_are_dropped() {
    let mut h = Harness::new();
    h.pump();
    let good = Hdr::guest(op::RW, 1, 2);
    let write = |h: &mut Harness, hdr: Hdr| {
        let a = h.hdr_addr();
        h.drv.write(a, &hdr.encode());
        a
    };
    // Header descriptor too short.
    let a = write(&mut h, good);
    h.add_tx(&[(a, 20, 0)]);
    // Length beyond the data descriptor.
    let a = write(&mut h, Hdr { len: 100, ..good });
    h.add_tx(&[(a, HDR as u32, 0), (TX_DATA, 10, 0)]);
    // Length beyond the single descriptor holding header and data.
    let a = write(&mut h, Hdr { len: 100, ..good });
    h.add_tx(&[(a, HDR as u32 + 10, 0)]);
    // Header out of guest memory; data out of guest memory.
    h.add_tx(&[(0x20_0000, HDR as u32, 0)]);
    let a = write(&mut h, Hdr { len: 16, ..good });
    h.add_tx(&[(a, HDR as u32, 0), (0xffff_fff0, 16, 0)]);
    // Device-writable header; payload larger than the device takes.
    let a = write(&mut h, good);
    h.add_tx(&[(a, HDR as u32, W)]);
    let a = write(
        &mut h,
        Hdr {
            len: MAX_PKT_DATA + 1,
            ..good
        },
    );
    h.add_tx(&[(a, HDR as u32, 0), (TX_DATA, MAX_PKT_DATA + 1, 0)]);
    // Wrong type, a spoofed source CID, a wrong destination CID.
    let a = write(&mut h, Hdr { type_: 2, ..good });
    h.add_tx(&[(a, HDR as u32, 0)]);
    let a = write(&mut h, Hdr { src_cid: 7, ..good });
    h.add_tx(&[(a, HDR as u32, 0)]);
    let a = write(&mut h, Hdr { dst_cid: 1, ..good });
    h.add_tx(&[(a, HDR as u32, 0)]);
    // A descriptor chain that loops, and one whose `next` is out of the table.
    let a = write(&mut h, Hdr { len: 8, ..good });
    let s = h.tx_desc_next;
    let next = (s + 1) % QUEUE_SIZE;
    h.add_tx_raw(&[desc(a, HDR as u32, N, next), desc(TX_DATA, 4, N, s)]);
    let a = write(&mut h, Hdr { len: 8, ..good });
    h.add_tx_raw(&[desc(a, HDR as u32, N, 200)]);

    let used = h.tx_used();
    assert_eq!(used.len(), 12, "every chain is returned");
    assert!(used.iter().all(|&(_, len)| len == 0));
    h.pump();
    assert!(h.inbox.is_empty(), "dropped, not answered: {:?}", h.inbox);

    // Still working.
    let (mut c, local) = h.host_connect(9);
    h.send(Hdr::guest(op::RW, 9, local), b"fine");
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"fine");
}

#[test]
fn fifty_connections_carry_their_own_bytes() {
    let mut h = Harness::new();
    let mut clients = Vec::new();
    for i in 0..50u32 {
        let port = 8000 + i % 5; // several connections per guest port
        let (c, local) = h.host_connect(port);
        clients.push((c, local, port));
    }
    assert_eq!(h.dev.connections(), 50);
    for (i, (c, _, _)) in clients.iter_mut().enumerate() {
        c.write_all(format!("from host client {i}").as_bytes())
            .unwrap();
    }
    h.pump();
    for (i, (_, local, port)) in clients.iter().enumerate() {
        let got = h.take_data(*local, *port);
        assert_eq!(got, format!("from host client {i}").as_bytes());
    }
    for (i, (_, local, port)) in clients.iter().enumerate() {
        h.send(
            Hdr::guest(op::RW, *port, *local),
            format!("to host client {i}").as_bytes(),
        );
    }
    for (i, (c, _, _)) in clients.iter_mut().enumerate() {
        let want = format!("to host client {i}");
        let mut buf = vec![0u8; want.len()];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(buf, want.as_bytes());
    }
    drop(clients);
    h.pump();
    assert_eq!(h.dev.connections(), 0);
}

#[test]
fn connection_count_is_bounded() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(port_path(&h.uds(), 6000)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut accepted = Vec::new();
    for src in 0..MAX_CONNECTIONS as u32 + 4 {
        h.send(Hdr::guest(op::REQUEST, 10_000 + src, 6000), &[]);
        h.pump();
        while let Ok((s, _)) = listener.accept() {
            accepted.push(s);
        }
    }
    assert_eq!(h.take(|x| x.op == op::RESPONSE).len(), MAX_CONNECTIONS);
    assert_eq!(h.take(|x| x.op == op::RST).len(), 4);
    assert_eq!(h.dev.connections(), MAX_CONNECTIONS);
    // A host client waits in the backlog rather than being accepted.
    let mut c = client(&h.uds());
    c.write_all(b"CONNECT 1\n").unwrap();
    h.pump();
    assert!(h.inbox.is_empty());
    // One closes: the waiting client gets its turn.
    h.send(Hdr::guest(op::RST, 10_000, 6000), &[]);
    h.pump();
    h.take_one(|x| x.op == op::REQUEST && x.dst_port == 1);
}

#[test]
fn full_rst_queue_pauses_tx_until_rx_buffers_come() {
    let mut h = Harness::new();
    // No rx buffers: each packet for an unknown connection queues an RST.
    for i in 0..MAX_PENDING_RESETS as u32 + 1 {
        h.send(Hdr::guest(op::RW, 100 + i, 200), b"x");
    }
    assert_eq!(h.tx_used().len(), MAX_PENDING_RESETS, "the last one waits");
    // Rx buffers: RSTs flow and the waiting packet is taken.
    let used = h.rx_ready();
    assert_eq!(used, 0b11);
    assert_eq!(h.tx_used().len(), MAX_PENDING_RESETS + 1);
    for _ in 0..10 {
        h.rx_ready();
    }
    let rsts = h.take(|x| x.op == op::RST);
    assert_eq!(rsts.len(), MAX_PENDING_RESETS + 1);
    for (i, p) in rsts.iter().enumerate() {
        assert_eq!((p.hdr.src_port, p.hdr.dst_port), (200, 100 + i as u32));
    }
}

#[test]
fn two_descriptor_rx_buffers_work() {
    // The pre-6.2 Linux layout: header and data in separate descriptors.
    let mut h = Harness::new();
    h.collect_rx = false;
    let mut c = client(&h.uds());
    c.write_all(b"CONNECT 31\n").unwrap();
    h.call(|d, q, m| d.process_backend(q, m));
    h.call(|d, q, m| d.process_backend(q, m));
    h.drv
        .add_chain(0, &[(0x40000, HDR as u32, W), (0x41000, 4096, W)]);
    h.call(|d, q, m| d.process_queue(RX_QUEUE, q, m));
    let used = h.drv.used(0);
    assert_eq!(used, [(0, HDR as u32)]);
    let req = Hdr::decode(&h.drv.read(0x40000, HDR));
    assert_eq!((req.op, req.dst_port), (op::REQUEST, 31));
    h.send(Hdr::guest(op::RESPONSE, 31, req.src_port), &[]);
    assert_eq!(read_line(&mut c), format!("OK {}\n", req.src_port));
    c.write_all(b"split").unwrap();
    h.call(|d, q, m| d.process_backend(q, m));
    h.drv
        .add_chain(0, &[(0x40000, HDR as u32, W), (0x41000, 4096, W)]);
    h.call(|d, q, m| d.process_queue(RX_QUEUE, q, m));
    let used = h.drv.used(0);
    assert_eq!(used[1], (2, HDR as u32 + 5));
    assert_eq!(Hdr::decode(&h.drv.read(0x40000, HDR)).op, op::RW);
    assert_eq!(h.drv.read(0x41000, 5), b"split");
}

#[test]
fn reset_closes_every_connection() {
    let mut h = Harness::new();
    let (mut c1, _) = h.host_connect(1);
    let listener = UnixListener::bind(port_path(&h.uds(), 6001)).unwrap();
    h.send(Hdr::guest(op::REQUEST, 3000, 6001), &[]);
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    h.dev.reset();
    assert_eq!(h.dev.connections(), 0);
    assert_closed(&mut c1);
    assert_closed(&mut s);
    // Clients wait for the next activation without waking the transport.
    let _c2 = client(&h.uds());
    assert!(!h.backend_ready());
}

/// `avail_event` of queue `q`: where the driver's next kick is due (EVENT_IDX).
fn avail_event(h: &Harness, q: u64) -> u16 {
    let used_ring = 0x1800 + q * 0x1000;
    let raw = h.drv.read(used_ring + 4 + 8 * QUEUE_SIZE as u64, 2);
    u16::from_le_bytes([raw[0], raw[1]])
}

#[test]
fn event_idx_is_rearmed_when_rings_run_dry() {
    let mut h = Harness::new();
    for q in &mut h.qs {
        q.set_event_idx(true);
    }
    let mut clients = Vec::new();
    for port in 40..43 {
        let mut c = client(&h.uds());
        c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        clients.push(c);
    }
    for _ in 0..3 {
        h.call(|d, q, m| d.process_backend(q, m));
    }
    // Three REQUESTs wait, two buffers come: the device asks for a kick at the third.
    h.post_rx_n(2);
    h.call(|d, q, m| d.process_queue(RX_QUEUE, q, m));
    assert_eq!(h.take(|x| x.op == op::REQUEST).len(), 2);
    assert_eq!(avail_event(&h, 0), 2);
    h.post_rx_n(1);
    h.call(|d, q, m| d.process_queue(RX_QUEUE, q, m));
    assert_eq!(h.take(|x| x.op == op::REQUEST).len(), 1);
    // The tx ring is drained and re-armed after every batch.
    h.send(Hdr::guest(op::RST, 1, 2), &[]);
    h.send(Hdr::guest(op::RST, 1, 2), &[]);
    assert_eq!(avail_event(&h, 1), 2);
}
