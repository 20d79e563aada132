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

mod connect;
mod flow;
