use std::os::fd::FromRawFd;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, FileOffset};

use super::*;
use crate::virtio::testing::{desc, refs, Driver, N, W};

/// A device that negotiated free page reporting, a driver with its three queues.
fn set_up() -> (Balloon, Driver, Vec<Queue>) {
    let mut b = Balloon::new();
    b.ack_features(VIRTIO_F_VERSION_1 | F_REPORTING);
    let d = Driver::new(3);
    let qs = d.queues();
    (b, d, qs)
}

fn fill(mem: &GuestMemoryMmap, at: u64, len: usize) {
    mem.write_slice(&vec![0xa5; len], GuestAddress(at)).unwrap();
}

fn is_zero(mem: &GuestMemoryMmap, at: u64, len: usize) -> bool {
    let mut buf = vec![0xffu8; len];
    mem.read_slice(&mut buf, GuestAddress(at)).unwrap();
    buf.iter().all(|&b| b == 0)
}

#[test]
fn reported_pages_go_back_to_the_host_and_read_as_zeros() {
    let (mut b, mut d, mut qs) = set_up();
    fill(&d.mem, 0x40000, 0x20000);
    // Two ranges in one chain (as the driver reports a scatterlist), one in another.
    d.add_chain(REPORTING, &[(0x40000, 0x8000, W), (0x50000, 0x4000, W)]);
    d.add_chain(REPORTING, &[(0x58000, 0x1000, W)]);
    let used = b.process_queue(REPORTING, &mut refs(&mut qs), &d.mem);
    assert_eq!(used, 1 << REPORTING);
    assert_eq!(
        d.used(REPORTING),
        [(0, 0), (2, 0)],
        "both chains back, nothing written"
    );
    assert!(is_zero(&d.mem, 0x40000, 0x8000));
    assert!(is_zero(&d.mem, 0x50000, 0x4000));
    assert!(is_zero(&d.mem, 0x58000, 0x1000));
    assert!(
        !is_zero(&d.mem, 0x48000, 0x8000),
        "what was not reported is kept"
    );
    assert!(!is_zero(&d.mem, 0x54000, 0x4000));
    assert_eq!(b.reported_bytes(), 0xd000);
    assert_eq!(b.counters(), [("reported_bytes", 0xd000)]);
}

#[test]
fn only_whole_pages_inside_guest_memory_are_discarded() {
    let (mut b, mut d, mut qs) = set_up();
    fill(&d.mem, 0x60000, 0x4000);
    // Half pages at both ends: only the page in between goes.
    d.add_chain(REPORTING, &[(0x60800, 0x2000, W)]);
    // Less than a page, past the end of memory, and across it.
    d.add_chain(REPORTING, &[(0x63000, 0x800, W)]);
    d.add_chain(REPORTING, &[(0x20_0000, 0x1000, W)]);
    d.add_chain(REPORTING, &[(0xff000, 0x2000, W)]);
    // At the top of the address space, where rounding up would overflow.
    d.add_chain(REPORTING, &[(u64::MAX - 0x800, 0x100, W)]);
    b.process_queue(REPORTING, &mut refs(&mut qs), &d.mem);
    assert_eq!(d.used(REPORTING).len(), 5, "every chain comes back");
    assert!(!is_zero(&d.mem, 0x60000, 0x1000));
    assert!(is_zero(&d.mem, 0x61000, 0x1000));
    assert!(!is_zero(&d.mem, 0x62000, 0x2000));
    assert_eq!(b.reported_bytes(), 0x1000);
}

#[test]
fn a_descriptor_loop_ends_and_the_chain_comes_back() {
    let (mut b, mut d, mut qs) = set_up();
    fill(&d.mem, 0x40000, 0x2000);
    d.add_raw(
        REPORTING,
        &[
            desc(0x40000, 0x1000, W | N, 1),
            desc(0x41000, 0x1000, W | N, 0),
        ],
    );
    b.process_queue(REPORTING, &mut refs(&mut qs), &d.mem);
    assert_eq!(d.used(REPORTING).len(), 1);
}

#[test]
fn inflate_and_deflate_buffers_come_back_untouched() {
    let (mut b, mut d, mut qs) = set_up();
    fill(&d.mem, 0x40000, 0x1000);
    // A page frame number list, as the driver would inflate with.
    d.mem.write_obj(0x40u32, GuestAddress(0x30000)).unwrap();
    d.add_chain(INFLATE, &[(0x30000, 4, 0)]);
    d.add_chain(DEFLATE, &[(0x30000, 4, 0)]);
    let mut used = b.process_queue(INFLATE, &mut refs(&mut qs), &d.mem);
    used |= b.process_queue(DEFLATE, &mut refs(&mut qs), &d.mem);
    assert_eq!(used, 0b11);
    assert_eq!((d.used(INFLATE).len(), d.used(DEFLATE).len()), (1, 1));
    assert!(!is_zero(&d.mem, 0x40000, 0x1000));
    assert_eq!(b.reported_bytes(), 0);
}

#[test]
fn nothing_is_discarded_unless_reporting_was_negotiated() {
    let mut b = Balloon::new();
    b.ack_features(VIRTIO_F_VERSION_1);
    let mut d = Driver::new(3);
    let mut qs = d.queues();
    fill(&d.mem, 0x40000, 0x1000);
    d.add_chain(REPORTING, &[(0x40000, 0x1000, W)]);
    assert_eq!(b.process_queue(REPORTING, &mut refs(&mut qs), &d.mem), 0);
    assert!(!is_zero(&d.mem, 0x40000, 0x1000));
    assert_eq!(b.process_queue(7, &mut refs(&mut qs), &d.mem), 0);
}

#[test]
fn config_space_asks_for_nothing_and_keeps_actual() {
    let mut b = Balloon::new();
    assert_eq!(b.device_type(), 5);
    assert_eq!(b.queue_max_sizes().len(), 3);
    assert_eq!(b.features(), VIRTIO_F_VERSION_1 | (1 << 5));
    let mut c = [0xffu8; CONFIG_LEN];
    b.read_config(0, &mut c);
    assert_eq!(c, [0; CONFIG_LEN], "num_pages 0: never inflate");
    b.write_config(4, &7u32.to_le_bytes());
    b.write_config(0, &9u32.to_le_bytes()); // num_pages is the device's
    let mut c = [0u8; 8];
    b.read_config(0, &mut c);
    assert_eq!(c, [0, 0, 0, 0, 7, 0, 0, 0]);
    b.reset();
    b.read_config(4, &mut c[..4]);
    assert_eq!(c[..4], [0; 4]);
}

#[test]
fn memory_of_a_shared_memfd_is_freed_in_the_file() {
    use std::os::unix::fs::MetadataExt;
    let len = 0x10_0000usize;
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"balloon-test".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len as u64).unwrap();
    let region = MmapRegionBuilder::new(len)
        .with_file_offset(FileOffset::new(file.try_clone().unwrap(), 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .build()
        .unwrap();
    let mem =
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap();
    fill(&mem, 0x80000, 0x40000);
    let held = || file.metadata().unwrap().blocks() * 512;
    assert!(held() >= 0x40000);
    assert_eq!(discard(&mem, GuestAddress(0x80000), 0x40000), 0x40000);
    assert!(
        held() < 0x40000,
        "the memfd gave the pages back: {}",
        held()
    );
    assert!(is_zero(&mem, 0x80000, 0x40000));
}
