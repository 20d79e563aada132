//! virtio-balloon with free page reporting only: the guest reports memory it freed, and the
//! device gives it back to the host (the pages read as zeros if the guest uses them again).
//! It never asks the guest to inflate: the pod's memory is what its limits say, and the point
//! is that a pod's host footprint follows what its guest uses now, not the most it ever
//! touched.

use virtio_queue::Queue;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::virtio::{
    device_type, read_config_bytes, serve_each, UsedQueues, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// VIRTIO_BALLOON_F_REPORTING (virtio 1.2, 5.5.3).
pub const F_REPORTING: u64 = 1 << 5;
/// With neither the statistics nor the free page hint queue negotiated, the reporting queue
/// comes right after the inflate and deflate queues.
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const REPORTING: usize = 2;
const QUEUE_SIZES: [u16; 3] = [64, 64, 64];
const PAGE: u64 = 4096;
/// `struct virtio_balloon_config`: num_pages, actual, free_page_hint_cmd_id, poison_val.
const CONFIG_LEN: usize = 16;

/// The balloon device.
#[derive(Debug, Default)]
pub struct Balloon {
    acked: u64,
    /// The driver's `actual` field: pages it holds in the balloon (always 0 from us).
    actual: u32,
    reported_bytes: u64,
}

impl Balloon {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of guest memory the guest reported free and the host took back so far.
    pub fn reported_bytes(&self) -> u64 {
        self.reported_bytes
    }
}

/// Gives the whole pages of `[addr, addr + len)` back to the host; how many bytes. A range
/// outside guest memory or across two regions is ignored.
fn discard(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> u64 {
    let (Some(start), Some(end)) = (
        addr.0.checked_next_multiple_of(PAGE),
        addr.0.checked_add(len).map(|e| e - e % PAGE),
    ) else {
        return 0;
    };
    if end <= start {
        return 0;
    }
    let Some((region, at)) = mem.to_region_addr(GuestAddress(start)) else {
        return 0;
    };
    if region
        .check_address(at.unchecked_add(end - start - 1))
        .is_none()
    {
        return 0;
    }
    let Ok(host) = region.get_host_address(at) else {
        return 0;
    };
    match release(region, host, (end - start) as usize) {
        Ok(()) => end - start,
        Err(e) => {
            log::debug!("balloon: cannot discard {len:#x} bytes at {addr:?}: {e}");
            0
        }
    }
}

/// Drops the host pages behind `len` bytes at `host` in `region`: for private anonymous
/// memory (the builtin VMM's) MADV_DONTNEED; for a shared file such as a memfd MADV_REMOVE,
/// which also frees the file's pages that other processes map.
fn release(region: &GuestRegionMmap, host: *mut u8, len: usize) -> std::io::Result<()> {
    let advice = if region.file_offset().is_some() {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    // SAFETY: `host..host + len` lies inside the region's mapping (checked by the caller),
    // page-aligned; the guest gave these pages up, so no Rust reference points into them,
    // and the mapping stays valid (the pages only read as zeros from now on).
    let ret = unsafe { libc::madvise(host.cast(), len, advice) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl VirtioDevice for Balloon {
    fn name(&self) -> &'static str {
        "virtio-balloon"
    }
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_REPORTING
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("reported_bytes", self.reported_bytes)]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; CONFIG_LEN];
        // num_pages (0: nothing asked of the guest), then actual.
        c[4..8].copy_from_slice(&self.actual.to_le_bytes());
        read_config_bytes(&c, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is the driver's to write.
        if offset == 4 && data.len() == 4 {
            self.actual = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        }
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [&mut Queue],
        mem: &GuestMemoryMmap,
    ) -> UsedQueues {
        // Inflate and deflate buffers only come back: the device never asks for pages.
        let report = match index {
            INFLATE | DEFLATE => false,
            REPORTING if self.acked & F_REPORTING != 0 => true,
            _ => return 0,
        };
        let Some(q) = queues.get_mut(index) else {
            return 0;
        };
        let mut bytes = 0;
        let used = serve_each("balloon", q, mem, |chain| {
            if report {
                // The iterator stops at a malformed descriptor (a loop, out of the table).
                for d in chain {
                    bytes += discard(mem, d.addr(), u64::from(d.len()));
                }
            }
            0
        });
        self.reported_bytes += bytes;
        UsedQueues::from(used) << index
    }

    fn reset(&mut self) {
        self.acked = 0;
        self.actual = 0;
    }
}

#[cfg(test)]
mod tests;
