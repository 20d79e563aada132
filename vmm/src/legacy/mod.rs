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

/// The guest's reset line: marks the VM as ending, then wakes the VMM through `evt`. The
/// vCPU whose write pulled it sees the mark and leaves at once, instead of entering the
/// guest again only to be kicked out.
#[derive(Debug)]
pub struct ResetLine {
    pub evt: EventFd,
    pub pulled: Arc<AtomicBool>,
}

impl vm_superio::Trigger for ResetLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.pulled.store(true, Ordering::Release);
        self.evt.write(1)
    }
}
