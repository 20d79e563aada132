//! The floor of the VMM start-up benchmark: the least a KVM VMM does to run a guest. Open
//! KVM, create a VM, one memory slot, one vCPU in 32-bit protected mode at the guest's PVH
//! entry, run; COM1 output to stdout; the i8042 reset ends it.
//!
//! Each of these adds one thing the builtin VMM must do (issue 2), so the benchmark can say
//! what the floor costs with it:
//! - `MIN_VMM_IRQCHIP`: KVM's in-kernel irqchip and PIT;
//! - `MIN_VMM_LONG`: the 64-bit entry at the ELF entry point, with the builtin VMM's GDT
//!   and identity page tables;
//! - `MIN_VMM_THREAD`: the vCPU runs on a thread of its own, which the main thread joins.
//!
//! usage: kubevirt-min-vmm GUEST.elf [MEMORY_MIB]

use std::io::Write;

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use linux_loader::loader::{Elf, KernelLoader, PvhBootCapability};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

fn flat(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .expect("usage: kubevirt-min-vmm GUEST.elf [MEMORY_MIB]");
    let mib: usize = args.get(2).map_or(128, |m| m.parse().expect("MEMORY_MIB"));
    let option = |name| std::env::var_os(name).is_some();
    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().expect("create VM");
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap();
    let region = mem.iter().next().unwrap();
    let slot = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: region.len(),
        userspace_addr: region.as_ptr() as u64,
        flags: 0,
    };
    // SAFETY: the region stays mapped until the process exits.
    unsafe { vm.set_user_memory_region(slot) }.expect("memory slot");
    if option("MIN_VMM_IRQCHIP") {
        vm.create_irq_chip().unwrap();
        vm.create_pit2(Default::default()).unwrap();
    }
    let mut file = std::fs::File::open(path).expect("guest");
    let loaded = Elf::load(&mem, None, &mut file, None).expect("load ELF");
    let entry = if option("MIN_VMM_LONG") {
        Entry::Long(loaded.kernel_load)
    } else {
        let PvhBootCapability::PvhEntryPresent(pvh) = loaded.pvh_boot_cap else {
            panic!("{path} has no PVH entry note");
        };
        Entry::Protected(pvh)
    };
    if option("MIN_VMM_THREAD") {
        let vcpu = std::thread::spawn(move || {
            run(boot_vcpu(&vm, &mem, entry));
            (vm, mem)
        });
        // Kept, like the other way's, until the process goes.
        let _vm = vcpu.join().unwrap();
    } else {
        run(boot_vcpu(&vm, &mem, entry));
    }
    // The kernel tears the VM down as the process goes.
    std::process::exit(0);
}

#[derive(Clone, Copy)]
enum Entry {
    /// 32-bit protected mode without paging (the PVH entry).
    Protected(GuestAddress),
    /// 64-bit mode with identity page tables.
    Long(GuestAddress),
}

fn boot_vcpu(vm: &VmFd, mem: &GuestMemoryMmap, entry: Entry) -> VcpuFd {
    let vcpu = vm.create_vcpu(0).expect("vCPU");
    let mut sregs = vcpu.get_sregs().unwrap();
    let rip = match entry {
        Entry::Protected(at) => {
            sregs.cs = flat(8, 0xb);
            let data = flat(0x10, 0x3);
            (sregs.ds, sregs.es, sregs.ss) = (data, data, data);
            sregs.cr0 |= 1;
            at
        }
        Entry::Long(at) => {
            vmm::arch::regs::write_descriptor_tables(mem).unwrap();
            let cr3 = vmm::arch::paging::setup_identity_map(mem).unwrap();
            sregs = vmm::arch::regs::long_mode_sregs(sregs, cr3);
            at
        }
    };
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    (regs.rip, regs.rflags) = (rip.0, 2);
    vcpu.set_regs(&regs).unwrap();
    vcpu
}

/// Runs until the guest resets.
fn run(mut vcpu: VcpuFd) {
    let mut out = std::io::stdout();
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x3f8, d) => {
                out.write_all(d).unwrap();
                out.flush().unwrap();
            }
            VcpuExit::IoOut(0x64, [0xfe]) => return,
            VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
}
