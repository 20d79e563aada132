//! Device tests: real files in a temp dir, requests written by the test-side driver.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::Queue;

use super::*;
use crate::virtio::testing::{desc, refs, Driver, N, QUEUE_SIZE, W};

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const HDR: u64 = 0x20000;
const SEG: u64 = 0x20100;
const STATUS: u64 = 0x20200;
const DATA: u64 = 0x30000;
const DATA2: u64 = 0x60000;
/// The avail ring's `idx` of the test driver's queue (see `Driver`).
const AVAIL_IDX: u64 = 0x1402;

/// A directory under the system temp dir, removed on drop.
pub(super) struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("blk-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// A file of `len` bytes, byte `i` = `(i / 512) as u8` so each sector is recognisable.
    pub fn disk(&self, name: &str, len: usize) -> PathBuf {
        let p = self.0.join(name);
        let data: Vec<u8> = (0..len).map(|i| (i / 512) as u8).collect();
        std::fs::write(&p, data).unwrap();
        p
    }
}

impl TempDir {
    /// A file with exactly `data`.
    pub fn join_bytes(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(path: &Path, read_only: bool, id: Option<&str>) -> BlockConfig {
    BlockConfig {
        path: path.to_owned(),
        read_only,
        id: id.map(str::to_owned),
        slot: None,
        rate: Default::default(),
    }
}

/// A device, a driver and its queue, kept together so the queue's state carries over.
struct Harness {
    blk: Block,
    d: Driver,
    qs: Vec<Queue>,
}

impl Harness {
    fn new(blk: Block) -> Harness {
        let d = Driver::new(1);
        let qs = d.queues();
        Harness { blk, d, qs }
    }

    fn open(path: &Path, read_only: bool) -> Harness {
        Harness::new(Block::new(config(path, read_only, None)).unwrap())
    }

    /// Processes what is available and waits for the worker; returns all used elements.
    fn run(&mut self) -> Vec<(u32, u32)> {
        self.blk
            .process_queue(0, &mut refs(&mut self.qs), &self.d.mem);
        self.finish();
        self.d.used(0)
    }

    /// Waits until nothing is in flight, as the event loop would.
    fn finish(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.blk.in_flight > 0 {
            assert!(Instant::now() < deadline, "requests did not complete");
            self.turn();
        }
    }

    /// One turn of the event loop: wait (a second at most) for the back end, then serve it.
    fn turn(&mut self) {
        let mut pfd = libc::pollfd {
            fd: self.blk.backend_fd().unwrap(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 1000) };
        self.blk
            .process_backend(&mut refs(&mut self.qs), &self.d.mem);
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.d.write(HDR, &h);
        self.d.write(STATUS, &[0xff]);
    }

    fn status(&self) -> u8 {
        self.d.read(STATUS, 1)[0]
    }

    /// Runs one request and returns (status, used length).
    fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32, u16)]) -> (u8, u32) {
        self.header(kind, sector);
        let mut chain = vec![(HDR, 16, 0)];
        chain.extend_from_slice(data);
        chain.push((STATUS, 1, W));
        self.d.add_chain(0, &chain);
        let used = self.run();
        (self.status(), used.last().unwrap().1)
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> (u8, u32) {
        self.d.write(DATA, data);
        self.request(VIRTIO_BLK_T_OUT, sector, &[(DATA, data.len() as u32, 0)])
    }

    fn read(&mut self, sector: u64, len: u32) -> (u8, u32, Vec<u8>) {
        self.d.write(DATA2, &vec![0xee; len as usize]);
        let (s, l) = self.request(VIRTIO_BLK_T_IN, sector, &[(DATA2, len, W)]);
        (s, l, self.d.read(DATA2, len as usize))
    }

    /// Adds read number `n` (its own header, buffer and status) of `len` bytes at
    /// `sector` to the ring, without serving the queue.
    fn add_read(&mut self, sector: u64, len: u32, n: u64) {
        let (hdr, data, status) = (HDR + 0x400 + n * 32, DATA + n * 0x8000, STATUS + 0x400 + n);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.d.write(hdr, &h);
        self.d.write(status, &[0xff]);
        self.d.write(data, &vec![0xee; len as usize]);
        self.d
            .add_chain(0, &[(hdr, 16, 0), (data, len, W), (status, 1, W)]);
    }

    fn read_status(&self, n: u64) -> u8 {
        self.d.read(STATUS + 0x400 + n, 1)[0]
    }

    fn read_data(&self, n: u64, len: usize) -> Vec<u8> {
        self.d.read(DATA + n * 0x8000, len)
    }

    /// Serves the queue once; returns whether anything was answered at once.
    fn serve_once(&mut self) -> bool {
        self.blk
            .process_queue(0, &mut refs(&mut self.qs), &self.d.mem)
            != 0
    }

    fn range(&mut self, kind: u32, sector: u64, sectors: u32, flags: u32) -> u8 {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        self.d.write(SEG, &s);
        self.request(kind, sector, &[(SEG, 16, 0)]).0
    }
}

fn sector_pattern(sector: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (sector + (i / 512) as u64) as u8)
        .collect()
}

#[test]
fn write_then_read_round_trip() {
    let dir = TempDir::new();
    let path = dir.disk("disk.img", 64 * 1024);
    let mut h = Harness::open(&path, false);
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(h.write(8, &data), (OK, 1));
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[4096..8192], &data[..], "the file holds the data");
    assert_eq!(
        &file[..4096],
        &sector_pattern(0, 4096)[..],
        "neighbours intact"
    );

    let (s, len, back) = h.read(8, 4096);
    assert_eq!((s, len), (OK, 4097), "used length = data + status");
    assert_eq!(back, data);

    // A read scattered over three buffers, the last one sharing the status descriptor.
    h.header(VIRTIO_BLK_T_IN, 0);
    h.d.add_chain(
        0,
        &[
            (HDR, 16, 0),
            (DATA2, 512, W),
            (DATA2 + 0x1000, 1024, W),
            (DATA2 + 0x2000, 513, W),
        ],
    );
    let used = h.run();
    assert_eq!(used.last().unwrap().1, 2049);
    assert_eq!(h.d.read(DATA2, 512), sector_pattern(0, 512));
    assert_eq!(h.d.read(DATA2 + 0x1000, 1024), sector_pattern(1, 1024));
    assert_eq!(h.d.read(DATA2 + 0x2000, 512), sector_pattern(3, 512));
    assert_eq!(h.d.read(DATA2 + 0x2200, 1), [OK]);

    let st = h.blk.stats();
    assert_eq!((st.write_requests, st.write_bytes), (1, 4096));
    assert_eq!((st.read_requests, st.read_bytes), (2, 4096 + 2048));
    assert_eq!(st.errors, 0);
}

#[test]
fn a_lone_read_the_page_cache_holds_is_answered_at_once() {
    let dir = TempDir::new();
    let path = dir.disk("disk.img", 64 * 1024);
    let mut h = Harness::open(&path, false);
    h.add_read(8, 4096, 0);
    assert!(h.serve_once(), "answered without the I/O threads");
    assert_eq!(h.blk.in_flight, 0);
    assert_eq!(h.d.used(0), vec![(0, 4097)]);
    assert_eq!(h.read_status(0), OK);
    assert_eq!(h.read_data(0, 4096), sector_pattern(8, 4096));
    assert_eq!(h.blk.stats().read_requests, 1);
    assert_eq!(h.blk.stats().read_bytes, 4096);
}

#[test]
fn reads_that_queue_together_or_are_large_go_to_the_io_threads() {
    let dir = TempDir::new();
    let path = dir.disk("disk.img", 64 * 1024);
    let mut h = Harness::open(&path, false);
    // Two at once: the first has another waiting behind it, the second one in flight.
    h.add_read(0, 4096, 0);
    h.add_read(16, 4096, 1);
    assert!(!h.serve_once());
    assert_eq!(h.blk.in_flight, 2);
    h.finish();
    assert_eq!(h.d.used(0).len(), 2);
    assert_eq!(h.read_data(0, 4096), sector_pattern(0, 4096));
    assert_eq!(h.read_data(1, 4096), sector_pattern(16, 4096));

    // Larger than is copied inline: an I/O thread too.
    let dir = TempDir::new();
    let path = dir.disk("big.img", 256 * 1024);
    let mut h = Harness::open(&path, false);
    h.add_read(0, 256 * 1024, 0);
    assert!(!h.serve_once());
    assert_eq!(h.blk.in_flight, 1);
    h.finish();
    assert_eq!(h.read_data(0, 256 * 1024), sector_pattern(0, 256 * 1024));
}

#[test]
fn with_a_thread_of_its_own_a_lone_write_of_whole_pages_is_answered_at_once() {
    let dir = TempDir::new();
    let path = dir.disk("disk.img", 64 * 1024);
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 3) as u8).collect();
    let write = |h: &mut Harness, sector: u64, data: &[u8]| {
        h.header(VIRTIO_BLK_T_OUT, sector);
        h.d.write(DATA, data);
        h.d.add_chain(
            0,
            &[(HDR, 16, 0), (DATA, data.len() as u32, 0), (STATUS, 1, W)],
        );
        let at_once = h.serve_once();
        h.finish();
        assert_eq!(h.status(), OK);
        at_once
    };
    // The builtin machine's event loop serves every device: writes go to the I/O threads.
    let mut shared = Harness::open(&path, false);
    assert!(!write(&mut shared, 8, &page));
    drop(shared);

    let mut h = Harness::open(&path, false);
    h.blk.set_own_thread();
    assert!(write(&mut h, 16, &page), "a page, page aligned: inline");
    assert!(
        !write(&mut h, 25, &page),
        "not page aligned: the pages must be read first"
    );
    assert!(!write(&mut h, 40, &page[..512]), "part of a page");
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[..4096], &sector_pattern(0, 4096)[..]);
    assert_eq!(&file[4096..8192], &page[..]);
    assert_eq!(&file[8192..12288], &page[..]);
    assert_eq!(&file[12288..12800], &sector_pattern(24, 512)[..]);
    assert_eq!(&file[12800..16896], &page[..]);
    assert_eq!(&file[20480..20992], &page[..512]);
    assert_eq!(&file[20992..24576], &sector_pattern(41, 7 * 512)[..]);
    assert_eq!(h.blk.stats().write_requests, 3);
}

#[test]
fn io_threads_that_fail_their_setup_answer_with_errors() {
    let dir = TempDir::new();
    let path = dir.disk("disk.img", 64 * 1024);
    let refuse: fn() -> Result<(), String> = || Err("no filter here".into());
    let mut h =
        Harness::new(Block::with_io_setup(config(&path, false, None), Some(refuse)).unwrap());
    // Each request comes back with an error rather than waiting for ever (two reads at
    // once, as a lone one the page cache holds is answered without the I/O threads).
    h.add_read(0, 4096, 0);
    h.add_read(8, 4096, 1);
    h.run();
    assert_eq!([h.read_status(0), h.read_status(1)], [IOERR, IOERR]);
    assert_eq!(h.write(8, &[7; 512]).0, IOERR);
    assert_eq!(
        &std::fs::read(&path).unwrap()[4096..4608],
        &sector_pattern(8, 512)[..]
    );
    assert_eq!(h.blk.stats().errors, 3);
}

#[test]
fn get_id_returns_the_serial() {
    let dir = TempDir::new();
    let path = dir.disk("disk.img", 4096);
    let blk = Block::new(config(&path, false, Some("pvc-0123"))).unwrap();
    let mut h = Harness::new(blk);
    h.d.write(DATA2, &[0xee; 32]);
    let (s, len) = h.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA2, 20, W)]);
    assert_eq!((s, len), (OK, 21));
    let mut want = b"pvc-0123".to_vec();
    want.resize(20, 0);
    assert_eq!(h.d.read(DATA2, 20), want);
    assert_eq!(h.d.read(DATA2 + 20, 1), [0xee], "nothing past 20 bytes");

    // No id: twenty NULs.
    let mut h = Harness::open(&path, false);
    let (s, _) = h.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA2, 20, W)]);
    assert_eq!(s, OK);
    assert_eq!(h.d.read(DATA2, 20), vec![0; 20]);
}

#[test]
fn flush_succeeds() {
    let dir = TempDir::new();
    let path = dir.disk("disk.img", 4096);
    let mut h = Harness::open(&path, false);
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    assert_eq!(h.blk.stats().flush_requests, 1);
}

#[test]
fn read_only_disk_refuses_changes() {
    let dir = TempDir::new();
    let path = dir.disk("disk.img", 16 * 1024);
    let before = std::fs::read(&path).unwrap();
    let mut h = Harness::open(&path, true);
    let f = h.blk.features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(
        f & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES),
        0
    );

    assert_eq!(h.write(0, &[0x55; 1024]), (IOERR, 1));
    assert_eq!(h.range(VIRTIO_BLK_T_DISCARD, 0, 8, 0), IOERR);
    assert_eq!(h.range(VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 0), IOERR);
    assert_eq!(std::fs::read(&path).unwrap(), before, "file untouched");
    let (s, _, back) = h.read(2, 512);
    assert_eq!((s, back), (OK, sector_pattern(2, 512)));
    assert_eq!(h.blk.stats().errors, 3);
}

#[test]
fn discard_punches_a_hole() {
    let dir = TempDir::new();
    let path = dir.disk("disk.img", 1 << 20);
    std::fs::File::open(&path).unwrap().sync_all().unwrap();
    let blocks = std::fs::metadata(&path).unwrap().blocks();
    let mut h = Harness::open(&path, false);
    // 128 KiB at 128 KiB: aligned to any file system block size.
    assert_eq!(h.range(VIRTIO_BLK_T_DISCARD, 256, 256, 0), OK);
    let after = std::fs::metadata(&path).unwrap().blocks();
    assert!(after + 256 <= blocks, "st_blocks {blocks} -> {after}");
    let file = std::fs::File::open(&path).unwrap();
    // SAFETY: lseek on a descriptor this test owns; no memory is involved.
    let hole = unsafe { libc::lseek(file.as_raw_fd(), 128 * 1024, libc::SEEK_HOLE) };
    assert_eq!(hole, 128 * 1024);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        1 << 20,
        "size kept"
    );

    let (s, _, back) = h.read(256, 0x1000);
    assert_eq!((s, back), (OK, vec![0; 0x1000]));
    let (_, _, back) = h.read(255, 512);
    assert_eq!(
        back,
        sector_pattern(255, 512),
        "the sector before is intact"
    );
    let (_, _, back) = h.read(512, 512);
    assert_eq!(back, sector_pattern(512, 512), "the sector after is intact");
    // Discard may not carry the unmap flag.
    let unsupp = VIRTIO_BLK_S_UNSUPP as u8;
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    assert_eq!(h.range(VIRTIO_BLK_T_DISCARD, 0, 8, unmap), unsupp);
    assert_eq!(h.blk.stats().discard_requests, 1);
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    let dir = TempDir::new();
    let path = dir.disk("disk.img", 64 * 1024);
    let mut h = Harness::open(&path, false);
    assert_eq!(h.range(VIRTIO_BLK_T_WRITE_ZEROES, 3, 5, 0), OK);
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    assert_eq!(h.range(VIRTIO_BLK_T_WRITE_ZEROES, 16, 16, unmap), OK);
    let file = std::fs::read(&path).unwrap();
    for (i, chunk) in file.chunks(512).enumerate() {
        let zero = (3..8).contains(&i) || (16..32).contains(&i);
        let want = if zero {
            vec![0; 512]
        } else {
            sector_pattern(i as u64, 512)
        };
        assert_eq!(chunk, &want[..], "sector {i}");
    }
    assert_eq!(file.len(), 64 * 1024);
    let (s, _, back) = h.read(3, 5 * 512);
    assert_eq!((s, back), (OK, vec![0; 5 * 512]));
}

#[test]
fn sectors_beyond_capacity_are_io_errors() {
    let dir = TempDir::new();
    let path = dir.disk("disk.img", 8 * 512);
    let mut h = Harness::open(&path, false);
    assert_eq!(h.blk.capacity(), 8);
    assert_eq!(h.read(8, 512).0, IOERR);
    assert_eq!(h.read(7, 1024).0, IOERR, "crosses the end");
    assert_eq!(h.write(u64::MAX, &[1; 512]).0, IOERR);
    assert_eq!(h.range(VIRTIO_BLK_T_WRITE_ZEROES, 6, 4, 0), IOERR);
    let (s, _, back) = h.read(7, 512);
    assert_eq!((s, back), (OK, sector_pattern(7, 512)));
}

#[test]
fn open_errors_name_the_path() {
    let dir = TempDir::new();
    let odd = dir.disk("odd.img", 1000);
    let e = Block::new(config(&odd, false, None)).unwrap_err();
    assert!(matches!(e, BlockError::Size { size: 1000, .. }));
    let msg = e.to_string();
    assert!(
        msg.contains(odd.to_str().unwrap()) && msg.contains("1000"),
        "{msg}"
    );

    let missing = dir.0.join("missing.img");
    let msg = Block::new(config(&missing, true, None))
        .unwrap_err()
        .to_string();
    assert!(msg.contains(missing.to_str().unwrap()), "{msg}");

    let msg = Block::new(config(&dir.0, false, None))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(dir.0.to_str().unwrap()) && msg.contains("directory"),
        "{msg}"
    );

    let ro = dir.disk("ro.img", 4096);
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).unwrap();
    let e = Block::new(config(&ro, false, None)).unwrap_err();
    assert!(matches!(e, BlockError::ReadOnlyFile { .. }));
    assert!(e.to_string().contains(ro.to_str().unwrap()));
    Block::new(config(&ro, true, None)).expect("read-only use of a read-only file");

    let ok = dir.disk("ok.img", 4096);
    let long = "x".repeat(21);
    let e = Block::new(config(&ok, false, Some(&long))).unwrap_err();
    assert!(matches!(e, BlockError::BadId { .. }), "{e}");
    let e = Block::new(config(&ok, false, Some("a\0b"))).unwrap_err();
    assert!(matches!(e, BlockError::BadId { .. }), "{e}");
    Block::new(config(&ok, false, Some(&"x".repeat(20)))).expect("20 bytes fit");
}

#[test]
fn malformed_chains_fail_and_the_device_keeps_serving() {
    let dir = TempDir::new();
    let path = dir.disk("disk.img", 16 * 1024);
    let mut h = Harness::open(&path, false);
    let served = |h: &mut Harness| {
        let (s, l, back) = h.read(1, 512);
        assert_eq!((s, l, back), (OK, 513, sector_pattern(1, 512)));
    };
    let last_len = |h: &mut Harness| h.run().last().unwrap().1;

    // Too short: a header and nothing else, so no status byte: dropped.
    h.header(VIRTIO_BLK_T_IN, 0);
    h.d.add_chain(0, &[(HDR, 16, 0)]);
    assert_eq!(last_len(&mut h), 0);
    assert_eq!(h.status(), 0xff, "nothing written");
    served(&mut h);

    // Status byte not device-writable: dropped.
    h.header(VIRTIO_BLK_T_IN, 0);
    h.d.add_chain(0, &[(HDR, 16, 0), (DATA2, 512, W), (STATUS, 1, 0)]);
    assert_eq!(last_len(&mut h), 0);
    assert_eq!(h.status(), 0xff);
    served(&mut h);

    // Header device-writable.
    h.header(VIRTIO_BLK_T_IN, 0);
    h.d.add_chain(0, &[(HDR, 16, W), (DATA2, 512, W), (STATUS, 1, W)]);
    assert_eq!((last_len(&mut h), h.status()), (1, IOERR));
    served(&mut h);

    // A write whose data is device-writable.
    h.header(VIRTIO_BLK_T_OUT, 0);
    h.d.add_chain(0, &[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)]);
    assert_eq!((last_len(&mut h), h.status()), (1, IOERR));
    served(&mut h);

    // Data out of guest memory (1 MiB), partly and wholly.
    for (addr, len) in [(0xff000, 0x2000), (0x4000_0000, 512), (u64::MAX - 511, 512)] {
        h.header(VIRTIO_BLK_T_IN, 0);
        h.d.add_chain(0, &[(HDR, 16, 0), (addr, len, W), (STATUS, 1, W)]);
        assert_eq!((last_len(&mut h), h.status()), (1, IOERR), "{addr:#x}");
        served(&mut h);
    }

    // Absurd lengths: a 4 GiB - 1 buffer, and a chain whose total passes 4 GiB.
    h.header(VIRTIO_BLK_T_IN, 0);
    h.d.add_chain(0, &[(HDR, 16, 0), (DATA2, u32::MAX, W), (STATUS, 1, W)]);
    assert_eq!(
        (last_len(&mut h), h.status()),
        (0, 0xff),
        "chain over 4 GiB is cut"
    );
    served(&mut h);
    h.header(VIRTIO_BLK_T_IN, 0);
    h.d.add_chain(
        0,
        &[(HDR, 16, 0), (DATA2, u32::MAX - 100, W), (STATUS, 1, W)],
    );
    assert_eq!((last_len(&mut h), h.status()), (1, IOERR));
    served(&mut h);

    // A descriptor loop: every slot of the table holds the same descriptor whose `next`
    // is slot 0, so whichever slot is the head, the chain ends up circling on slot 0.
    h.header(VIRTIO_BLK_T_IN, 0);
    let table = vec![desc(STATUS, 1, W | N, 0); QUEUE_SIZE as usize];
    h.d.add_raw(0, &table);
    assert_eq!(last_len(&mut h), 0);
    assert_eq!(h.status(), 0xff);
    served(&mut h);

    // A `next` outside the descriptor table.
    h.header(VIRTIO_BLK_T_IN, 0);
    h.d.add_raw(0, &[desc(HDR, 16, N, QUEUE_SIZE + 5)]);
    assert_eq!(last_len(&mut h), 0);
    served(&mut h);

    // Unknown request type.
    let unsupp = VIRTIO_BLK_S_UNSUPP as u8;
    assert_eq!(h.request(0x77, 0, &[]), (unsupp, 1));
    served(&mut h);

    assert_eq!(h.blk.in_flight, 0);
}

/// Found by fuzzing (fuzz/regressions/virtio_blk/): an avail index far ahead of the device,
/// which no pop accepts, made `serve` spin for ever on the VMM thread.
#[test]
fn a_corrupt_avail_index_is_not_spun_on() {
    let dir = TempDir::new();
    let path = dir.disk("disk.img", 4096);
    let mut h = Harness::open(&path, false);
    // The ring claims 0x200 chains; it holds QUEUE_SIZE.
    h.d.write(AVAIL_IDX, &0x200u16.to_le_bytes());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let used = h.blk.process_queue(0, &mut refs(&mut h.qs), &h.d.mem);
        let _ = tx.send((h, used));
    });
    let (mut h, used) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("process_queue returns");
    assert_eq!(used, 0);
    assert!(h.d.used(0).is_empty());
    // Once the driver puts its index right, requests are served again.
    h.d.write(AVAIL_IDX, &0u16.to_le_bytes());
    let (s, l, back) = h.read(1, 512);
    assert_eq!((s, l, back), (OK, 513, sector_pattern(1, 512)));
}

#[test]
fn config_space_and_features() {
    let dir = TempDir::new();
    let path = dir.disk("disk.img", 3 << 20);
    let blk = Block::new(config(&path, false, None)).unwrap();
    let rd = |off: u64, len: usize| {
        let mut b = vec![0u8; len];
        blk.read_config(off, &mut b);
        let mut v = [0u8; 8];
        v[..len].copy_from_slice(&b);
        u64::from_le_bytes(v)
    };
    assert_eq!(rd(0, 8), 6144, "capacity in sectors");
    assert_eq!(rd(12, 4), u64::from(super::QUEUE_SIZE) - 2, "seg_max");
    assert_eq!(rd(20, 4), 512, "blk_size");
    assert_eq!(
        rd(36, 4),
        u64::from(MAX_RANGE_SECTORS),
        "max_discard_sectors"
    );
    assert_eq!(rd(40, 4), 1, "max_discard_seg");
    assert!(rd(44, 4) >= 1, "discard_sector_alignment");
    assert_eq!(
        rd(48, 4),
        u64::from(MAX_RANGE_SECTORS),
        "max_write_zeroes_sectors"
    );
    assert_eq!(rd(52, 4), 1, "max_write_zeroes_seg");
    assert_eq!(rd(56, 1), 1, "write_zeroes_may_unmap");
    assert_eq!(rd(200, 4), 0, "past the end reads zero");
    let f = blk.features();
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
    }
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(blk.device_type(), device_type::BLOCK);
}

#[test]
fn event_idx_publishes_avail_event() {
    let dir = TempDir::new();
    let path = dir.disk("disk.img", 4096);
    let mut h = Harness::open(&path, false);
    h.blk
        .ack_features(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    assert_eq!(h.read(0, 512).0, OK);
    assert_eq!(h.read(1, 512).0, OK);
    // avail_event sits after the used ring's elements: used + 4 + 8 * size.
    let avail_event = 0x1000 + 0x800 + 4 + 8 * u64::from(QUEUE_SIZE);
    let v = h.d.read(avail_event, 2);
    assert_eq!(
        u16::from_le_bytes([v[0], v[1]]),
        2,
        "the driver is asked to notify next time"
    );
}

#[test]
fn reset_waits_for_requests_in_flight() {
    let dir = TempDir::new();
    let path = dir.disk("disk.img", 1 << 20);
    let mut h = Harness::open(&path, false);
    for i in 0..4u64 {
        h.header(VIRTIO_BLK_T_IN, 0);
        h.d.add_chain(
            0,
            &[
                (HDR, 16, 0),
                (DATA2 + i * 0x20000, 0x20000, W),
                (STATUS, 1, W),
            ],
        );
    }
    h.blk.process_queue(0, &mut refs(&mut h.qs), &h.d.mem);
    assert_eq!(h.blk.in_flight, 4);
    h.blk.reset();
    assert_eq!(h.blk.in_flight, 0);
    assert_eq!(h.status(), OK, "the worker finished before reset returned");
    assert!(
        h.d.used(0).is_empty(),
        "nothing completed into the reset queue"
    );
    assert_eq!(h.blk.process_backend(&mut refs(&mut h.qs), &h.d.mem), 0);
    assert!(h.d.used(0).is_empty());
    assert_eq!(h.blk.stats().read_requests, 4);

    // A fresh queue after the reset works.
    h.d = Driver::new(1);
    h.qs = h.d.queues();
    assert_eq!(h.read(2, 512).2, sector_pattern(2, 512));
}

#[test]
fn requests_in_flight_are_bounded_by_the_queue_size() {
    let dir = TempDir::new();
    let path = dir.disk("disk.img", 4096);
    let mut h = Harness::open(&path, false);
    // A driver that keeps making chains available without waiting: the table wraps and
    // the avail ring fills up with QUEUE_SIZE flushes.
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    for _ in 0..QUEUE_SIZE {
        h.d.add_chain(0, &[(HDR, 16, 0), (STATUS, 1, W)]);
    }
    h.blk.process_queue(0, &mut refs(&mut h.qs), &h.d.mem);
    assert_eq!(h.blk.in_flight, usize::from(QUEUE_SIZE));
    for _ in 0..4 {
        h.d.add_chain(0, &[(HDR, 16, 0), (STATUS, 1, W)]);
    }
    h.blk.process_queue(0, &mut refs(&mut h.qs), &h.d.mem);
    assert_eq!(h.blk.in_flight, usize::from(QUEUE_SIZE), "no more taken");
    assert!(h.blk.throttled);
    // Completions make room; the rest is served from process_backend.
    h.finish();
    assert_eq!(h.d.used(0).len(), usize::from(QUEUE_SIZE) + 4);
    assert!(!h.blk.throttled);
    assert_eq!(h.blk.stats().flush_requests, u64::from(QUEUE_SIZE) + 4);
}

mod host;
mod rate;
mod threads;
