//! virtio-vsock (virtio spec 1.2, section 5.10), stream sockets only, with its host side on
//! Unix sockets in Firecracker's hybrid layout:
//! - a host program reaches guest port P by connecting to `uds_path` and writing
//!   `CONNECT P\n`; it reads `OK <host port>\n` once the guest accepted, then bytes flow;
//! - a guest connection to host CID 2, port P reaches the listener at `<uds_path>_P`.
//!
//! `muxer` owns the sockets and the internal epoll that is the device's backend fd,
//! `connection` the per-connection state and credit, `packet` the wire constants.
//!
//! Host memory the device can be made to hold is bounded: at most [`MAX_CONNECTIONS`] host
//! streams, each buffering at most [`CONN_BUF_SIZE`] bytes from the guest for a slow peer
//! (64 MiB in all), nothing buffered toward the guest (host bytes are read straight into rx
//! buffers within the guest's credit), and at most [`MAX_PENDING_RESETS`] queued RSTs.

mod connection;
mod muxer;
mod packet;

#[cfg(test)]
mod tests;

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::virtio::{
    device_type, read_config_bytes, ActivateError, UsedQueues, VirtioDevice, VIRTIO_F_VERSION_1,
};

pub use connection::{CONN_BUF_SIZE, MAX_PKT_DATA};
pub use muxer::{port_path, MAX_CONNECTIONS, MAX_PENDING_RESETS};

use muxer::Muxer;

/// Queue indices.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
const QUEUE_SIZES: [u16; 3] = [256, 256, 256];

/// Lowest CID a guest may have (0-2 are the hypervisor, local and host).
pub const MIN_GUEST_CID: u64 = 3;

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id, at least 3.
    pub guest_cid: u64,
    /// Unix socket for host-initiated connections; guest-initiated ones go to
    /// `<uds_path>_<port>`.
    pub uds_path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved or out of range (use 3 to 2^32 - 2)")]
    InvalidCid(u64),
    #[error("{path} exists and is not a socket")]
    NotASocket { path: PathBuf },
    #[error("cannot remove stale socket {path}: {source}")]
    RemoveStale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the vsock epoll: {0}")]
    Epoll(std::io::Error),
}

/// The vsock device.
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    acked: u64,
    muxer: Muxer,
}

impl Vsock {
    /// Validates `config` and listens on its `uds_path` (the socket file goes on drop).
    pub fn new(config: VsockConfig) -> Result<Self, VsockError> {
        // u32::MAX is VMADDR_CID_ANY; Linux keeps CIDs to 32 bits.
        if config.guest_cid < MIN_GUEST_CID || config.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(config.guest_cid));
        }
        Ok(Self {
            guest_cid: config.guest_cid,
            acked: 0,
            muxer: Muxer::new(config.guest_cid, config.uds_path)?,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    /// Host streams open now (connections and clients still sending `CONNECT`).
    pub fn connections(&self) -> usize {
        self.muxer.live()
    }

    /// Fills rx buffers; if tx processing waited for them, resumes it.
    fn serve_rx(&mut self, queues: &mut [&mut Queue], mem: &GuestMemoryMmap) -> UsedQueues {
        let mut used = 0;
        if let Some(rx) = queues.get_mut(RX_QUEUE) {
            used |= self.muxer.fill_rx(rx, mem) as UsedQueues;
        }
        if self.muxer.tx_stalled() {
            used |= self.serve_tx(queues, mem);
        }
        used
    }

    /// Takes tx packets, then sends what they produced.
    fn serve_tx(&mut self, queues: &mut [&mut Queue], mem: &GuestMemoryMmap) -> UsedQueues {
        let mut used = 0;
        if let Some(tx) = queues.get_mut(TX_QUEUE) {
            used |= (self.muxer.process_tx(tx, mem) as UsedQueues) << TX_QUEUE;
        }
        if let Some(rx) = queues.get_mut(RX_QUEUE) {
            used |= self.muxer.fill_rx(rx, mem) as UsedQueues;
        }
        used
    }
}

impl VirtioDevice for Vsock {
    fn name(&self) -> &'static str {
        "virtio-vsock"
    }
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    /// Ring features (EVENT_IDX, INDIRECT_DESC) come from the transport; the device re-arms
    /// notifications whenever it finds a ring empty, as EVENT_IDX needs.
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self) -> Result<(), ActivateError> {
        self.muxer.activate().map_err(|e| ActivateError::Backend {
            device: "virtio-vsock",
            reason: format!("listening on {}: {e}", self.muxer.uds_path().display()),
        })
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [&mut Queue],
        mem: &GuestMemoryMmap,
    ) -> UsedQueues {
        match index {
            RX_QUEUE => self.serve_rx(queues, mem),
            TX_QUEUE => self.serve_tx(queues, mem),
            // Event buffers stay available: the device sends no events (no migration).
            _ => 0,
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn process_backend(&mut self, queues: &mut [&mut Queue], mem: &GuestMemoryMmap) -> UsedQueues {
        self.muxer.process_events();
        match queues.get_mut(RX_QUEUE) {
            Some(rx) => self.muxer.fill_rx(rx, mem) as UsedQueues,
            None => 0,
        }
    }

    fn reset(&mut self) {
        self.muxer.reset();
        self.acked = 0;
    }
}
