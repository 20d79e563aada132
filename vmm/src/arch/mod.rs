//! x86_64 platform: memory layout, boot structures and vCPU state.

pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod paging;
pub mod regs;
