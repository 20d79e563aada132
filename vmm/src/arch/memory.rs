//! Guest RAM: the ranges around the MMIO hole, and their allocation.

use std::io;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use super::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Errors while sizing or allocating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {0} MiB is invalid: it must be at least 16 MiB")]
    TooSmall(u64),
    #[error("guest memory size {0} MiB is not a multiple of 2 MiB, required with hugepages")]
    NotHugepageAligned(u64),
    #[error("cannot allocate {size_mib} MiB of guest memory{hint}: {source}")]
    Allocate {
        size_mib: u64,
        hint: &'static str,
        source: io::Error,
    },
    #[error("cannot build the guest memory map: {0}")]
    Collection(String),
}

/// Smallest guest we accept: the kernel needs room for itself and its early allocations.
pub const MIN_MEMORY_MIB: u64 = 16;

/// The guest-physical RAM ranges for `size` bytes: RAM up to the MMIO hole, the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// Allocates anonymous guest memory of `size_mib` MiB, optionally backed by hugepages.
///
/// Memory is reserved lazily (MAP_NORESERVE): pages cost host RAM only once the guest
/// touches them, which keeps the VMM's footprint small.
pub fn allocate(size_mib: u64, hugepages: bool) -> Result<GuestMemoryMmap, MemoryError> {
    if size_mib < MIN_MEMORY_MIB {
        return Err(MemoryError::TooSmall(size_mib));
    }
    if hugepages && !size_mib.is_multiple_of(2) {
        return Err(MemoryError::NotHugepageAligned(size_mib));
    }
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    if hugepages {
        flags |= libc::MAP_HUGETLB;
    }
    let hint = if hugepages {
        " (are enough 2 MiB hugepages reserved in /proc/sys/vm/nr_hugepages?)"
    } else {
        ""
    };
    let regions = ram_ranges(size_mib << 20)
        .into_iter()
        .map(|(base, len)| {
            let mapping = vm_memory::mmap::MmapRegionBuilder::new(len as usize)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .with_hugetlbfs(hugepages)
                .build()
                .map_err(|e| MemoryError::Allocate {
                    size_mib,
                    hint,
                    source: io::Error::other(e.to_string()),
                })?;
            GuestRegionMmap::new(mapping, base)
                .ok_or_else(|| MemoryError::Collection(format!("region at {base:?} overflows")))
        })
        .collect::<Result<Vec<GuestRegionMmap>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Collection(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(
            r[1],
            (GuestAddress(MMIO_GAP_END), (4 << 30) - MMIO_GAP_START)
        );
        let total: u64 = r.iter().map(|(_, l)| l).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn guest_of_exactly_the_hole_start_is_one_range() {
        assert_eq!(ram_ranges(MMIO_GAP_START).len(), 1);
    }

    #[test]
    fn allocate_rejects_tiny_and_unaligned() {
        assert!(matches!(allocate(4, false), Err(MemoryError::TooSmall(4))));
        assert!(matches!(
            allocate(17, true),
            Err(MemoryError::NotHugepageAligned(17))
        ));
    }

    #[test]
    fn allocate_maps_both_sides_of_the_hole() {
        let mem = allocate(3 * 1024 + 512, false).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let last = mem.iter().last().unwrap();
        assert_eq!(last.start_addr(), GuestAddress(MMIO_GAP_END));
        assert_eq!(last.len(), 512 << 20);
    }
}
