//! The i8042 keyboard controller, present so that the guest's `reboot` (command 0xfe on port
//! 0x64, used by `reboot=k`) ends the VM.

use vm_superio::I8042Device;

use super::ResetLine;
use crate::bus::BusDevice;

/// i8042 on ports 0x60-0x64; a CPU reset command triggers the VM's reset event.
#[derive(Debug)]
pub struct I8042(I8042Device<ResetLine>);

impl I8042 {
    pub fn new(reset: ResetLine) -> Self {
        Self(I8042Device::new(reset))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.0.read(offset as u8);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            if let Err(e) = self.0.write(offset as u8, b) {
                log::error!("i8042: cannot signal the reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn reset_command_pulls_the_reset_line() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let pulled = Arc::new(AtomicBool::new(false));
        let mut dev = I8042::new(ResetLine {
            evt: evt.try_clone().unwrap(),
            pulled: pulled.clone(),
        });
        dev.write(4, &[0x01]);
        assert!(evt.read().is_err(), "other commands do nothing");
        assert!(!pulled.load(Ordering::Acquire));
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
        assert!(pulled.load(Ordering::Acquire));
    }
}
