//! The i8042 keyboard controller, present so that the guest's `reboot` (command 0xfe on port
//! 0x64, used by `reboot=k`) ends the VM.

use vm_superio::I8042Device;

use super::ResetLine;
use crate::bus::BusDevice;

/// i8042 on ports 0x60-0x64; a CPU reset command pulls the VM's reset line.
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
            // Pulling the reset line cannot fail (`ResetLine` only sets a flag).
            let _ = self.0.write(offset as u8, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_pulls_the_reset_line() {
        let line = ResetLine::default();
        let mut dev = I8042::new(line.clone());
        dev.write(4, &[0x01]);
        assert!(!line.pulled(), "other commands do nothing");
        dev.write(4, &[0xfe]);
        assert!(line.pulled());
    }
}
