//! The CRI end-to-end tests' surroundings: a network namespace, a private containerd with the
//! CRI in it and the test images, a connected client; and waiting on what containerd does
//! in the background.

use std::time::{Duration, Instant};

use crate::containerd::{tail, Containerd};
use crate::cri::Cri;
use crate::netns::NetNs;

/// The busybox image the CRI tests run.
pub const IMAGE: &str = "localhost/busybox:test";

/// A netns `name`, containerd with the CRI in it, the images, and a CRI client.
pub fn cri_env(name: &str) -> (NetNs, Containerd, Cri) {
    let ns = NetNs::new(name);
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    let c = Containerd::start_cri_with_images(name, &ns.name, IMAGE);
    let mut cri = Cri::connect(&c.socket()).expect("connect to the CRI");
    let v = cri.version().expect("CRI version");
    println!("  CRI: {} {}", v.runtime_name, v.runtime_version);
    (ns, c, cri)
}

/// Polls `f` until it gives a value (60 s at most; then fails with containerd's log).
pub fn until<T>(what: &str, c: &Containerd, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "waiting for {what}; containerd log:\n{}",
            tail(&c.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
