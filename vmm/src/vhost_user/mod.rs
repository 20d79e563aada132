//! Our virtio devices served over vhost-user, so that an external QEMU (the `qemu` machine
//! back end) drives the very same device code with the real Linux drivers.
//!
//! `vhost-user-backend` runs the protocol, maps the frontend's memory and owns the vrings;
//! [`VhostUserDevice`] adapts one [`VirtioDevice`] to it.

mod backend;
mod poll;
mod proxy;
mod server;

pub use backend::VhostUserDevice;
pub use poll::MAX_WINDOW as MAX_POLL_WINDOW;
pub use server::{serve, serve_all, Served, VhostUserError, VhostUserServer};

/// Tests that count the process's device threads run one at a time.
#[cfg(test)]
pub(crate) static TEST_SERVERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The names of this process's threads that serve devices (`vu-*`), once those that were
/// just joined are gone: a join returns a moment before the kernel drops the thread.
#[cfg(test)]
pub(crate) fn device_threads() -> Vec<String> {
    let list = || -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
            .map(|c| c.trim().to_owned())
            .filter(|c| c.starts_with("vu-"))
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let left = list();
        if left.is_empty() || std::time::Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
