//! Our virtio devices served over vhost-user, so that an external QEMU (the `qemu` machine
//! back end) drives the very same device code with the real Linux drivers.
//!
//! `vhost-user-backend` runs the protocol, maps the frontend's memory and owns the vrings;
//! [`VhostUserDevice`] adapts one [`VirtioDevice`] to it.

mod backend;
mod proxy;

pub use backend::{serve, VhostUserDevice, VhostUserError, VhostUserServer};
