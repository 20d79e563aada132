//! The flat GDT for 64-bit entry and its conversion into KVM segment registers.

use kvm_bindings::kvm_segment;

/// Null, 64-bit code, data, TSS: the same selectors Linux's boot protocol expects
/// (`__BOOT_CS` = 0x10 is not required for the 64-bit entry; any flat code segment works).
pub const GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),            // null
    gdt_entry(0xa09b, 0, 0xfffff), // code: present, DPL 0, executable, long mode (L)
    gdt_entry(0xc093, 0, 0xfffff), // data: present, writable, 4 KiB granular, 32-bit
    gdt_entry(0x808b, 0, 0xfffff), // TSS: present, busy 64-bit TSS
];
pub const CODE_SELECTOR: u16 = 1 << 3;
pub const DATA_SELECTOR: u16 = 2 << 3;
pub const TSS_SELECTOR: u16 = 3 << 3;

/// Packs flags (access byte in bits 0..8, flags nibble in 12..16), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let raw = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff)) as u32;
    // With the granularity bit set the limit counts 4 KiB pages.
    if (entry >> 55) & 1 == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The KVM view of GDT entry `index`, as the CPU would cache it after loading the selector.
pub fn segment(index: usize) -> kvm_segment {
    let e = GDT[index];
    kvm_segment {
        base: base(e),
        limit: limit(e),
        selector: (index as u16) << 3,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g: ((e >> 55) & 1) as u8,
        avl: ((e >> 52) & 1) as u8,
        unusable: if (e >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_long_mode_ring0() {
        let cs = segment(1);
        assert_eq!(cs.selector, CODE_SELECTOR);
        assert_eq!((cs.l, cs.db, cs.dpl, cs.present, cs.s), (1, 0, 0, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.base, 0);
    }

    #[test]
    fn data_and_tss_segments() {
        let ds = segment(2);
        assert_eq!(ds.selector, DATA_SELECTOR);
        assert_eq!((ds.type_, ds.db, ds.g, ds.l), (3, 1, 1, 0));
        let tss = segment(3);
        assert_eq!(tss.selector, TSS_SELECTOR);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
    }

    #[test]
    fn null_segment_is_unusable() {
        assert_eq!(segment(0).unusable, 1);
        assert_eq!(segment(0).present, 0);
    }

    #[test]
    fn entry_round_trips_base_and_limit() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        assert_eq!(base(e), 0x1234_5678);
        assert_eq!(limit(e), 0xabcde);
    }
}
