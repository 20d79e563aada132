//! Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI learns its CPUs,
//! its IOAPIC and the ISA interrupt routing.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_START, EBDA_START, HIMEM_START, IOAPIC_PINS, IOAPIC_START};

/// Most vCPUs the table can describe: APIC ids are 8 bits and the IOAPIC takes the next id.
pub const MAX_VCPUS: u8 = 254;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Family 6 signature and FPU|APIC feature bits: informational, Linux reads CPUID instead.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs requested: the MP table describes 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
    #[error("MP table of {0} bytes does not fit below 1 MiB")]
    TooLarge(usize),
    #[error("cannot write the MP table into guest memory")]
    Write,
}

/// Builds the floating pointer and configuration table for `vcpus` CPUs as placed at `base`.
pub fn build(vcpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MptableError::VcpuCount(vcpus));
    }
    let ioapic_id = vcpus;
    let mut t = Vec::with_capacity(2048);
    // Configuration table header; length, count and checksum are patched below.
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&0u16.to_le_bytes()); // base table length
    t.push(4); // spec revision 1.4
    t.push(0); // checksum
    t.extend_from_slice(b"KUBEVIRT");
    t.extend_from_slice(b"MICROVM     ");
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    t.extend_from_slice(&0u16.to_le_bytes()); // entry count
    t.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    debug_assert_eq!(t.len(), HEADER_LEN);

    let mut entries: u16 = 0;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        t.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        t.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        t.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        t.extend_from_slice(&[0; 8]);
        entries += 1;
    }
    t.extend_from_slice(&[ENTRY_BUS, 0]);
    t.extend_from_slice(b"ISA   ");
    t.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    t.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries += 2;
    // ISA IRQ n -> IOAPIC pin n, except the timer: KVM routes GSI 0 to pin 2, as PCs do.
    // Pin 0 carries the 8259's ExtINT, pin 2 IRQ 0, so IRQ 2 (the cascade) has no pin.
    let mut io_int = |kind: u8, irq: u8, pin: u8| {
        t.extend_from_slice(&[ENTRY_IO_INTERRUPT, kind, 0, 0, 0, irq, ioapic_id, pin]);
    };
    io_int(INT_TYPE_EXTINT, 0, 0);
    io_int(INT_TYPE_INT, 0, 2);
    entries += 2;
    for pin in 1..IOAPIC_PINS as u8 {
        if pin != 2 {
            io_int(INT_TYPE_INT, pin, pin);
            entries += 1;
        }
    }
    // Every LAPIC: LINT0 is the 8259's ExtINT (virtual wire mode), LINT1 the NMI.
    t.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    t.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    entries += 2;

    let len = t.len();
    t[4..6].copy_from_slice(&(len as u16).to_le_bytes());
    t[34..36].copy_from_slice(&entries.to_le_bytes());
    t[7] = checksum(&t);

    // The floating pointer, found by the guest's scan of the EBDA, points at the table.
    let mut out = Vec::with_capacity(FLOATING_LEN + len);
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&((base + FLOATING_LEN as u64) as u32).to_le_bytes());
    out.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 1 paragraph, rev 1.4
    out[10] = checksum(&out);
    out.extend_from_slice(&t);
    if base + out.len() as u64 > HIMEM_START {
        return Err(MptableError::TooLarge(out.len()));
    }
    Ok(out)
}

/// Writes the MP table for `vcpus` CPUs at the start of the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MptableError> {
    let table = build(vcpus, EBDA_START)?;
    mem.write_slice(&table, GuestAddress(EBDA_START))
        .map_err(|_| MptableError::Write)
}

/// The byte that makes the sum of `bytes` zero (its own slot must be zero when computed).
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPU_ENTRY_LEN: usize = 20;
    const SMALL_ENTRY_LEN: usize = 8;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// (cpu ids, bsp, ioapic id, io interrupts as (kind, irq, pin)).
    type Parsed = (Vec<u8>, u8, u8, Vec<(u8, u8, u8)>);

    /// Parses the table the way a guest does.
    fn parse(t: &[u8], base: u64) -> Parsed {
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[..FLOATING_LEN]), 0, "floating pointer checksum");
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        let h = &t[(ptr - base) as usize..];
        assert_eq!(&h[0..4], b"PCMP");
        let len = u16::from_le_bytes(h[4..6].try_into().unwrap()) as usize;
        assert_eq!(sum(&h[..len]), 0, "config table checksum");
        let count = u16::from_le_bytes(h[34..36].try_into().unwrap());
        assert_eq!(
            u32::from_le_bytes(h[36..40].try_into().unwrap()),
            0xfee0_0000
        );
        let (mut cpus, mut bsp, mut ioapic, mut ints) = (vec![], 0xff, 0xff, vec![]);
        let mut off = HEADER_LEN;
        for _ in 0..count {
            match h[off] {
                ENTRY_PROCESSOR => {
                    cpus.push(h[off + 1]);
                    if h[off + 3] & CPU_BOOTSTRAP != 0 {
                        bsp = h[off + 1];
                    }
                    off += CPU_ENTRY_LEN;
                }
                ENTRY_IOAPIC => {
                    ioapic = h[off + 1];
                    off += SMALL_ENTRY_LEN;
                }
                ENTRY_IO_INTERRUPT => {
                    ints.push((h[off + 1], h[off + 5], h[off + 7]));
                    off += SMALL_ENTRY_LEN;
                }
                ENTRY_BUS | ENTRY_LOCAL_INTERRUPT => off += SMALL_ENTRY_LEN,
                other => panic!("unknown entry type {other}"),
            }
        }
        assert_eq!(off, len, "entries fill the table exactly");
        (cpus, bsp, ioapic, ints)
    }

    #[test]
    fn describes_every_vcpu_and_the_ioapic() {
        let t = build(4, EBDA_START).unwrap();
        let (cpus, bsp, ioapic, ints) = parse(&t, EBDA_START);
        assert_eq!(cpus, vec![0, 1, 2, 3]);
        assert_eq!(bsp, 0);
        assert_eq!(ioapic, 4);
        assert!(ints.contains(&(INT_TYPE_INT, 0, 2)), "timer on pin 2");
        assert!(ints.contains(&(INT_TYPE_INT, 4, 4)), "serial on pin 4");
        assert!(!ints
            .iter()
            .any(|&(k, irq, _)| k == INT_TYPE_INT && irq == 2));
    }

    #[test]
    fn rejects_bad_vcpu_counts() {
        assert!(matches!(
            build(0, EBDA_START),
            Err(MptableError::VcpuCount(0))
        ));
        assert!(matches!(
            build(255, EBDA_START),
            Err(MptableError::VcpuCount(255))
        ));
    }

    #[test]
    fn largest_table_fits_below_1m() {
        let t = build(MAX_VCPUS, EBDA_START).unwrap();
        let (cpus, _, ioapic, _) = parse(&t, EBDA_START);
        assert_eq!(cpus.len(), MAX_VCPUS as usize);
        assert_eq!(ioapic, MAX_VCPUS);
    }

    #[test]
    fn writes_into_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        setup_mptable(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
