//! Virtio device models for kubevirt-shim microVMs.
//!
//! Each device is written once against `virtio-queue` queues, guest memory and the narrow
//! [`virtio::Interrupt`] trait, and never learns its transport: the builtin VMM serves it over
//! virtio-mmio, and the `qemu` back end over vhost-user.

pub mod balloon;
pub mod block;
pub mod net;
pub mod rate_limit;
pub mod rng;
pub mod virtio;
pub mod vsock;
