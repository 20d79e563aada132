//! Guest physical memory layout of an x86_64 microVM.
//!
//! Low memory holds the boot structures the VMM writes before the first instruction; the
//! kernel loads at 1 MiB or above; a 1 GiB hole below 4 GiB holds the MMIO devices, the
//! IOAPIC and the LAPIC, so RAM beyond 3 GiB continues at 4 GiB.

/// Global descriptor table used for the 64-bit entry.
pub const GDT_START: u64 = 0x500;
/// Empty interrupt descriptor table (the kernel installs its own).
pub const IDT_START: u64 = 0x520;
/// `struct boot_params`, the Linux "zero page"; `rsi` points here at entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer (grows down, below the zero page's page).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, one PDPT, then one PD per GiB.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// GiBs identity-mapped with 2 MiB pages: all of the low 4 GiB, MMIO hole included.
pub const IDENTITY_MAPPED_GIB: u64 = 4;
/// Kernel command line (NUL-terminated).
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line the x86 kernel accepts (COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area; the MP table lives here and the e820 map
/// marks it reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte past the legacy BIOS area: the kernel, initrd and free RAM live above.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit hole for MMIO devices, IOAPIC and LAPIC.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Virtio-mmio devices are placed from here, one page each.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// KVM needs three pages for the TSS and one for the identity map, inside the gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;

/// Legacy IRQs: serial COM1 is 4; virtio devices take the lines from 5 on.
pub const SERIAL_IRQ: u32 = 4;
pub const VIRTIO_IRQ_START: u32 = 5;
/// The IOAPIC has 24 pins.
pub const IOAPIC_PINS: u32 = 24;

/// Legacy port I/O devices.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u16 = 8;
pub const I8042_PORT: u16 = 0x60;
pub const I8042_PORT_LEN: u16 = 5;
