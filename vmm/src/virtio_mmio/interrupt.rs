//! virtio-mmio interrupts: a status register the driver reads and acks, and an irqfd.

use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

use super::{INT_CONFIG_CHANGE, INT_USED_RING};

/// Shared between the transport (which the driver reads) and the device (which signals).
#[derive(Debug)]
pub struct MmioInterrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl MmioInterrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn raise(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// The device used buffers of a queue.
    pub fn signal_used_queue(&self, _queue: u16) -> std::io::Result<()> {
        self.raise(INT_USED_RING)
    }

    /// The device changed its configuration (or needs a reset).
    pub fn signal_config_change(&self) -> std::io::Result<()> {
        self.raise(INT_CONFIG_CHANGE)
    }
}
