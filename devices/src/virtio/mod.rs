//! What every device implements. A device never owns its queues or learns its transport:
//! the transport (virtio-mmio in the builtin VMM, vhost-user for the `qemu` back end) owns
//! the queues and guest memory, calls the device when the driver or the host side has
//! work, and signals the driver for every queue the device reports as used.

#[cfg(any(test, feature = "fuzzing"))]
pub mod testing;

use std::os::fd::RawFd;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

/// Virtio device type ids (virtio spec 1.2, section 5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const RNG: u32 = 4;
    pub const BALLOON: u32 = 5;
    pub const VSOCK: u32 = 19;
}

/// VIRTIO_F_VERSION_1: every device here is a modern (non-legacy) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_INDIRECT_DESC: descriptor chains may live in indirect tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_RING_F_EVENT_IDX: used/avail event suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Ring features every transport offers on top of the device's own: virtio-queue walks
/// indirect tables and honours event indices for every device.
pub const TRANSPORT_FEATURES: u64 = VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

/// Errors when a driver activates a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("{device}: back end failed on activation: {reason}")]
    Backend {
        device: &'static str,
        reason: String,
    },
}

/// A set of queues (bit `i` = queue `i`) whose used rings the device changed; the transport
/// signals the driver for each of them where the ring asks for it.
pub type UsedQueues = u64;

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
    /// Counters of the device's work so far (name, value), for metrics; none by default.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// The transport serves this device on a thread that serves no other device (a
    /// vhost-user back end per device): the device may do short blocking work there itself.
    fn set_own_thread(&mut self) {}
    /// Whether a transport serving this device on a thread of its own should keep looking
    /// at queue `index` for a moment after the device answered from it, instead of sleeping
    /// until the driver's next notification: worth it where a driver often waits on each
    /// answer before it sends the next request.
    fn polls(&self, _index: usize) -> bool {
        false
    }
    /// The driver finished setting up (DRIVER_OK); the device may start its back end.
    fn activate(&mut self) -> Result<(), ActivateError> {
        Ok(())
    }
    /// The driver made buffers available on queue `index`.
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [&mut Queue],
        mem: &GuestMemoryMmap,
    ) -> UsedQueues;
    /// A host-side descriptor (tap, socket, completion eventfd, or an epoll fd gathering
    /// several) the transport watches for the device while it is active.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// `backend_fd` is readable.
    fn process_backend(
        &mut self,
        _queues: &mut [&mut Queue],
        _mem: &GuestMemoryMmap,
    ) -> UsedQueues {
        0
    }
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

/// Serves every chain the driver made available, each by `serve_chain` (which returns the
/// used length), for devices that answer each chain at once (rng, balloon). Notifications
/// are re-enabled whenever the ring looks empty: with EVENT_IDX that publishes avail_event,
/// without which the driver stops notifying after its first buffer. A ring that claims
/// buffers that cannot be popped (a corrupt avail index) ends the pass instead of spinning,
/// and so does a used ring that cannot be written. Returns whether any chain went back.
pub fn serve_each(
    name: &str,
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    mut serve_chain: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
) -> bool {
    let mut used = false;
    loop {
        let _ = q.disable_notification(mem);
        let mut popped = 0;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            popped += 1;
            let head = chain.head_index();
            let len = serve_chain(chain);
            if let Err(e) = q.add_used(mem, head, len) {
                log::warn!("{name}: cannot return descriptor {head}: {e}");
                return used;
            }
            used = true;
        }
        match q.enable_notification(mem) {
            Ok(true) if popped > 0 => continue,
            _ => return used,
        }
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
