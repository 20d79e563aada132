//! PC legacy devices every microVM has: the 16550 console and the i8042 reset line.

mod i8042;
mod serial;

pub use i8042::I8042;
pub use serial::{Serial, SerialInput, SerialInputSource};

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
