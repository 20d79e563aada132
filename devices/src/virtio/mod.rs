//! What every device implements, and what the transport gives it on activation.

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// Virtio device type ids (virtio spec 1.2, section 5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const RNG: u32 = 4;
    pub const VSOCK: u32 = 19;
}

/// VIRTIO_F_VERSION_1: every device here is a modern (non-legacy) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Errors when a driver activates a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("{device}: driver set up {got} queues, the device needs {want}")]
    QueueCount {
        device: &'static str,
        got: usize,
        want: usize,
    },
    #[error("{device}: queue {index} is not valid in guest memory")]
    InvalidQueue { device: &'static str, index: usize },
    #[error("{device}: back end failed on activation: {reason}")]
    Backend {
        device: &'static str,
        reason: String,
    },
}

/// How a device tells the driver that it used buffers or changed its configuration.
/// Implemented by each transport (virtio-mmio interrupt status + irqfd, vhost-user call fd).
pub trait Interrupt: Send + Sync {
    fn signal_used_queue(&self, queue: u16) -> std::io::Result<()>;
    fn signal_config_change(&self) -> std::io::Result<()>;
}

/// A virtio device model, independent of its transport.
pub trait VirtioDevice: Send {
    /// Short name for logs and errors.
    fn name(&self) -> &'static str;
    /// Virtio device type id.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn features(&self) -> u64;
    /// Feature bits the driver accepted (a subset of `features`).
    fn ack_features(&mut self, features: u64);
    /// Reads the device-specific configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space at `offset` (ignored where read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Hands the device its memory, queues and interrupt when the driver sets DRIVER_OK.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;
    /// Processes available buffers of queue `index` after the driver notified it.
    fn process_queue(&mut self, index: usize);
    /// Returns the device to its initial state after a driver reset.
    fn reset(&mut self);
}

/// Reads `data.len()` bytes of a little-endian config structure `config` at `offset`;
/// out-of-range reads return zeroes, as the spec asks of reserved space.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let start = offset as usize;
    if start < config.len() {
        let end = (start + data.len()).min(config.len());
        data[..end - start].copy_from_slice(&config[start..end]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_clip_and_zero_fill() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
