//! The kubevirt-shim microVMM: a small KVM virtual machine monitor, used as a library by the
//! shim (one VM per pod) and by the `kubevirt-vmm` debugging and benchmark binary.
//!
//! ```text
//! VmConfig --build_microvm--> Vmm --start--> VmHandle (pause / resume / stop / wait -> VmExit)
//! ```

pub mod arch;
pub mod boot;
pub mod builder;
pub mod bus;
pub mod config;
pub mod confine;
pub mod doctor;
pub mod guests;
pub mod jail;
pub mod legacy;
pub mod qemu;
pub mod seccomp;
pub mod spawn;
pub mod supported_cpuid;
pub mod tsc;
pub mod vcpu;
pub mod vhost_user;
pub mod virtio_mmio;
pub mod vm;
pub mod vmm;
pub mod wait;

pub use builder::{build_microvm, BuildError};
pub use config::{
    SerialInputSource, SerialOutput, StartGate, VmConfig, DEFAULT_CMDLINE, GUEST_CMDLINE,
};
pub use vmm::{VmExit, VmHandle, Vmm, VmmError};
