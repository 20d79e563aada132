//! Reads the page cache holds are served on the queue's own thread; the others go to the
//! I/O threads. Files live under the build's target directory, a disk-backed file system
//! (a tmpfs /tmp keeps every page cached, so a miss could not be made there).

use super::*;
use crate::block::io::INLINE_READ_MAX;

/// A directory under `target/`, removed on drop.
fn disk_dir() -> TempDir {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(format!("blk-cache-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&p).unwrap();
    TempDir(p)
}

/// Writes `path` back and drops its pages from the page cache.
fn evict(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: advice on an open descriptor; no memory is passed.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise");
}

/// Queues a read of `len` bytes at `sector` into DATA2 without running anything.
fn queue_read(h: &mut Harness, sector: u64, len: u32) {
    h.header(VIRTIO_BLK_T_IN, sector);
    h.d.add_chain(0, &[(HDR, 16, 0), (DATA2, len, W), (STATUS, 1, W)]);
}

#[test]
fn a_cached_read_is_answered_without_the_io_threads() {
    let dir = disk_dir();
    let path = dir.disk("disk.img", 256 << 10);
    std::fs::read(&path).unwrap(); // every page cached
    let mut h = Harness::open(&path, false);
    queue_read(&mut h, 16, 8192);
    let used = h.blk.process_queue(0, &mut refs(&mut h.qs), &h.d.mem);
    assert_eq!(used, 1, "the queue is told at once");
    assert_eq!(h.blk.in_flight, 0, "nothing went to the I/O threads");
    assert_eq!(h.d.used(0), vec![(0, 8193)]);
    assert_eq!(h.status(), OK);
    assert_eq!(h.d.read(DATA2, 8192), sector_pattern(16, 8192));
    let st = h.blk.stats();
    assert_eq!((st.read_requests, st.read_bytes, st.errors), (1, 8192, 0));

    // Larger than a cached read may be: the I/O threads copy it, in parallel.
    queue_read(&mut h, 0, (INLINE_READ_MAX + 4096) as u32);
    h.blk.process_queue(0, &mut refs(&mut h.qs), &h.d.mem);
    assert_eq!(h.blk.in_flight, 1, "a large read goes to the I/O threads");
    h.finish();
    let len = (INLINE_READ_MAX + 4096) as usize;
    assert_eq!(h.d.read(DATA2, len), sector_pattern(0, len));
}

#[test]
fn a_read_of_uncached_data_goes_to_the_io_threads() {
    let dir = disk_dir();
    let path = dir.disk("disk.img", 256 << 10);
    evict(&path);
    let mut h = Harness::open(&path, false);
    queue_read(&mut h, 64, 4096);
    h.blk.process_queue(0, &mut refs(&mut h.qs), &h.d.mem);
    assert_eq!(
        h.blk.in_flight, 1,
        "the event loop did not wait for the disk"
    );
    h.finish();
    assert_eq!(h.d.used(0), vec![(0, 4097)]);
    assert_eq!(h.status(), OK);
    assert_eq!(h.d.read(DATA2, 4096), sector_pattern(64, 4096));
    assert_eq!(h.blk.stats().read_requests, 1);
}

#[test]
fn a_cached_read_past_a_slot_medium_ends_in_zeros() {
    // A 4 KiB medium in a 64 KiB slot: the read straddles its end.
    let dir = disk_dir();
    let first = dir.disk("first.img", 64 << 10);
    let medium = dir.disk("medium.img", 4096);
    std::fs::read(&medium).unwrap();
    let slot = MediaSlot::new();
    let mut cfg = config(&first, false, None);
    cfg.slot = Some(slot.clone());
    let mut h = Harness::new(Block::new(cfg).unwrap());
    slot.insert(&medium, true).unwrap();
    h.d.write(DATA2, &[0xee; 8192]);
    queue_read(&mut h, 0, 8192);
    h.blk.process_queue(0, &mut refs(&mut h.qs), &h.d.mem);
    assert_eq!(h.blk.in_flight, 0, "served on the queue's thread");
    assert_eq!(h.d.used(0), vec![(0, 8193)]);
    assert_eq!(h.status(), OK);
    assert_eq!(h.d.read(DATA2, 4096), sector_pattern(0, 4096));
    assert_eq!(h.d.read(DATA2 + 4096, 4096), vec![0; 4096]);
}
