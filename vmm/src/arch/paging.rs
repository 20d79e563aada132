//! Identity page tables for the 64-bit entry: the low 4 GiB mapped with 2 MiB pages.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{IDENTITY_MAPPED_GIB, PDE_START, PDPTE_START, PML4_START};

const PRESENT_WRITABLE: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// Errors while writing page tables.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    #[error("cannot write page table at {0:#x}: guest memory too small")]
    Write(u64),
}

/// Writes PML4 -> PDPT -> PDs and returns the value for CR3.
///
/// Mapping the whole 4 GiB (not just the first GiB) lets early code reach MMIO devices,
/// the IOAPIC and the LAPIC before it builds its own tables.
pub fn setup_identity_map(mem: &GuestMemoryMmap) -> Result<u64, PagingError> {
    write_table(
        mem,
        PML4_START,
        [PDPTE_START | PRESENT_WRITABLE].into_iter(),
    )?;
    let pds = (0..IDENTITY_MAPPED_GIB).map(|gib| (PDE_START + gib * 0x1000) | PRESENT_WRITABLE);
    write_table(mem, PDPTE_START, pds)?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pages = (0..512).map(|i| (gib << 30) | (i << 21) | PRESENT_WRITABLE | PAGE_SIZE_2M);
        write_table(mem, PDE_START + gib * 0x1000, pages)?;
    }
    Ok(PML4_START)
}

/// One table page at `at`, its first entries from `entries` and the rest zero. Built on
/// the stack: a VM's start-up makes no heap pages (each a page fault) for it.
fn write_table(
    mem: &GuestMemoryMmap,
    at: u64,
    entries: impl Iterator<Item = u64>,
) -> Result<(), PagingError> {
    let mut page = [0u8; 4096];
    for (slot, entry) in page.chunks_exact_mut(8).zip(entries) {
        slot.copy_from_slice(&entry.to_le_bytes());
    }
    mem.write_slice(&page, GuestAddress(at))
        .map_err(|_| PagingError::Write(at))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables like the MMU would for a 2 MiB mapping.
    fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
        let read = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        let pml4e = read(cr3 + ((va >> 39) & 0x1ff) * 8);
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte = read((pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8);
        if pdpte & 1 == 0 {
            return None;
        }
        let pde = read((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8);
        if pde & 1 == 0 || pde & PAGE_SIZE_2M == 0 {
            return None;
        }
        Some((pde & !0x1f_ffff & 0x000f_ffff_ffff_ffff) | (va & 0x1f_ffff))
    }

    #[test]
    fn identity_maps_low_4g() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let cr3 = setup_identity_map(&mem).unwrap();
        for va in [
            0u64,
            0x7000,
            0x100_0000,
            0x3fff_ffff,
            0xd000_0000,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&mem, cr3, va), Some(va), "va {va:#x}");
        }
        assert_eq!(translate(&mem, cr3, 0x1_0000_0000), None);
    }

    #[test]
    fn fails_cleanly_without_memory() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x10_0000), 1 << 20)]).unwrap();
        assert!(matches!(
            setup_identity_map(&mem),
            Err(PagingError::Write(PML4_START))
        ));
    }
}
