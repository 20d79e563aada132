//! A virtio-net device on a socket pair (`SOCK_SEQPACKET` keeps frame boundaries like a
//! tap); the fuzz target holds the far end.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use devices::net::{Net, NetBackend};
use devices::virtio::{VirtioDevice, VIRTIO_RING_F_EVENT_IDX};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF};

use crate::host::socket_pair;

#[derive(Debug)]
struct Peer(OwnedFd);

impl AsFd for Peer {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl NetBackend for Peer {
    fn name(&self) -> &str {
        "fuzz0"
    }
    fn set_offloads(&self, _tun_flags: u32) -> io::Result<()> {
        Ok(())
    }
}

/// An activated device and the far end of its back end. `config` picks the features the
/// driver accepts: bit 0 MRG_RXBUF, bit 1 GUEST_CSUM, bit 2 EVENT_IDX.
pub fn device(config: u8) -> (Net, OwnedFd) {
    let (ours, peer) = socket_pair(libc::SOCK_SEQPACKET).expect("socketpair");
    let mut net = Net::with_backend(Box::new(Peer(ours)), Some([2, 0, 0, 0, 0, 1]))
        .expect("net device on a socket pair");
    let mut features = net.features();
    for (bit, feature) in [
        (1, 1 << VIRTIO_NET_F_MRG_RXBUF),
        (2, 1 << VIRTIO_NET_F_GUEST_CSUM),
        (4, VIRTIO_RING_F_EVENT_IDX),
    ] {
        if config & bit == 0 {
            features &= !feature;
        }
    }
    net.ack_features(features);
    net.activate().expect("activate");
    (net, peer)
}
