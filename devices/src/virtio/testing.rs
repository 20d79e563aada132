//! Test-side virtqueue driver: writes descriptor chains into guest memory the way a guest
//! driver would, runs the device, and reads back the used ring. Unit tests use it, and so do
//! the fuzz targets (through the `fuzzing` feature), which lay out arbitrary tables and rings.

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

/// Device-writable flag as u16.
pub const W: u16 = VRING_DESC_F_WRITE as u16;
/// Next flag as u16.
pub const N: u16 = VRING_DESC_F_NEXT as u16;
/// Entries per test queue.
pub const QUEUE_SIZE: u16 = 16;

/// One descriptor.
pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// Split-ring addresses of one queue: descriptor table, avail ring, used ring.
#[derive(Clone, Copy, Debug)]
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
}

/// 1 MiB of guest memory with rings from 0x1000 (0x1000 apart); buffers go from 0x20000 on.
#[derive(Debug)]
pub struct Driver {
    pub mem: GuestMemoryMmap,
    rings: Vec<Ring>,
    next_desc: Vec<u16>,
    avail_idx: Vec<u16>,
}

impl Driver {
    /// `queues` queues of `QUEUE_SIZE` entries each.
    pub fn new(queues: usize) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let rings = (0..queues as u64)
            .map(|i| {
                let desc = 0x1000 + i * 0x1000;
                Ring {
                    desc,
                    avail: desc + 0x400,
                    used: desc + 0x800,
                }
            })
            .collect();
        Self {
            mem,
            rings,
            next_desc: vec![0; queues],
            avail_idx: vec![0; queues],
        }
    }

    /// Fresh, ready queues as a transport would hand them over.
    pub fn queues(&self) -> Vec<Queue> {
        self.rings
            .iter()
            .map(|r| {
                let mut q = Queue::new(QUEUE_SIZE).unwrap();
                q.set_size(QUEUE_SIZE);
                q.set_desc_table_address(Some(r.desc as u32), Some(0));
                q.set_avail_ring_address(Some(r.avail as u32), Some(0));
                q.set_used_ring_address(Some(r.used as u32), Some(0));
                q.set_ready(true);
                q
            })
            .collect()
    }

    /// Adds one chain (descriptor `next` fields are filled in) to queue `q`'s avail ring.
    pub fn add_chain(&mut self, q: usize, descs: &[(u64, u32, u16)]) {
        let start = self.next_desc[q];
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == descs.len();
                let flags = if last { flags & !N } else { flags | N };
                desc(addr, len, flags, (start + i as u16 + 1) % QUEUE_SIZE)
            })
            .collect();
        self.add_raw(q, &raw);
    }

    /// Writes raw descriptors as they are (for malformed chains: loops, bad `next`) and
    /// makes the first one available.
    pub fn add_raw(&mut self, q: usize, raw: &[RawDescriptor]) {
        let start = self.next_desc[q];
        for (i, d) in raw.iter().enumerate() {
            self.set_desc(q, (start as usize + i) % QUEUE_SIZE as usize, *d);
        }
        self.push_avail(q, start % QUEUE_SIZE);
        self.next_desc[q] = (start + raw.len() as u16) % QUEUE_SIZE;
    }

    /// Writes descriptor `slot` (taken modulo the queue size) of queue `q`'s table.
    pub fn set_desc(&mut self, q: usize, slot: usize, d: RawDescriptor) {
        let at = self.rings[q].desc + (slot % QUEUE_SIZE as usize) as u64 * 16;
        self.mem.write_obj(d, GuestAddress(at)).unwrap();
    }

    /// Makes `head` available on queue `q` as it is, even outside the table.
    pub fn push_avail(&mut self, q: usize, head: u16) {
        let avail = self.rings[q].avail;
        let idx = self.avail_idx[q];
        let entry = avail + 4 + (idx % QUEUE_SIZE) as u64 * 2;
        self.mem.write_obj(head, GuestAddress(entry)).unwrap();
        self.avail_idx[q] = idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(avail + 2))
            .unwrap();
    }

    /// (head, len) of every used element of queue `q` so far.
    pub fn used(&self, q: usize) -> Vec<(u32, u32)> {
        let used = self.rings[q].used;
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        (0..idx as u64)
            .map(|i| {
                let e = used + 4 + (i % QUEUE_SIZE as u64) * 8;
                let id = self.mem.read_obj(GuestAddress(e)).unwrap();
                (id, self.mem.read_obj(GuestAddress(e + 4)).unwrap())
            })
            .collect()
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

/// Borrows every queue mutably, the shape devices take them in.
pub fn refs(queues: &mut [Queue]) -> Vec<&mut Queue> {
    queues.iter_mut().collect()
}
