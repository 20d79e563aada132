//! The KVM VM: creation, in-kernel interrupt controllers and timer, guest memory slots.

use std::path::Path;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Errors while creating or configuring the KVM VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM enabled and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    #[error("KVM failed to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("guest memory region {index} cannot be registered: {source}")]
    MemorySlot {
        index: usize,
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Capabilities the VMM cannot work without, with a name for error messages.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "IRQCHIP"),
    (Cap::Pit2, "PIT2"),
    (Cap::Ioeventfd, "IOEVENTFD"),
    (Cap::Irqfd, "IRQFD"),
    (Cap::UserMemory, "USER_MEMORY"),
    (Cap::SetTssAddr, "SET_TSS_ADDR"),
    (Cap::ExtCpuid, "EXT_CPUID"),
    (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
];

/// Checks the KVM API version and required capabilities.
pub fn check_kvm(kvm: &Kvm) -> Result<(), VmError> {
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(VmError::ApiVersion(v));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(())
}

/// A KVM VM with its platform devices created in the kernel.
#[derive(Debug)]
pub struct Vm {
    pub fd: VmFd,
    pub supported_cpuid: CpuId,
    pub tsc_deadline: bool,
}

impl Vm {
    /// Creates the VM with its guest memory, in-kernel IOAPIC/PIC/LAPICs and PIT.
    ///
    /// Memory slots go in before the irqchip and PIT: once those exist, every slot change
    /// waits for a KVM SRCU grace period (10 ms measured here, against 0.1 ms before).
    ///
    /// KVM's supported CPUID is read from `cpuid_cache` where it holds this host boot's
    /// (see [`crate::supported_cpuid`]).
    pub fn new(mem: &GuestMemoryMmap, cpuid_cache: Option<&Path>) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        check_kvm(&kvm)?;
        let fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        register_memory(&fd, mem)?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("set the TSS address"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("set the identity map address"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("create the irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
        let supported_cpuid = crate::supported_cpuid::supported_cpuid(&kvm, cpuid_cache)
            .map_err(kvm_err("report supported CPUID"))?;
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        Ok(Self {
            fd,
            supported_cpuid,
            tsc_deadline,
        })
    }
}

/// Gives every guest memory region a KVM slot.
fn register_memory(fd: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (index, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| VmError::MemorySlot {
                index,
                source: kvm_ioctls::Error::new(libc::EFAULT),
            })?;
        let slot = kvm_userspace_memory_region {
            slot: index as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the VMM keeps alive
        // for as long as the VM exists, and slots do not overlap (regions are disjoint).
        unsafe { fd.set_user_memory_region(slot) }
            .map_err(|source| VmError::MemorySlot { index, source })?;
    }
    Ok(())
}
