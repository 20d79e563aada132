//! PC legacy devices every microVM has: the 16550 console and the i8042 reset line.

mod i8042;
mod serial;

pub use i8042::I8042;
pub use serial::{Serial, SerialInput, SerialInputSource};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// An EventFd as a vm-superio interrupt or reset trigger.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The guest's reset line. Only a vCPU's port write can pull it, so that vCPU sees it pulled
/// as its write returns, leaves the guest at once and reports the reset to the VMM.
#[derive(Debug, Clone, Default)]
pub struct ResetLine(pub Arc<AtomicBool>);

impl ResetLine {
    pub fn pulled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

impl vm_superio::Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::Release);
        Ok(())
    }
}
