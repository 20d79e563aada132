//! Network namespaces made by a test, and code run inside them. Test traffic stays there.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;

/// `ip netns add NAME` for the life of the value; deleted on drop, also when a test fails.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    /// A fresh namespace with IPv6 off, so that no interface in it sends frames on its own.
    pub fn new(prefix: &str) -> Self {
        let name = format!("{prefix}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        for key in [
            "net.ipv6.conf.default.disable_ipv6",
            "net.ipv6.conf.all.disable_ipv6",
        ] {
            ns.exec(&["sysctl", "-qw", &format!("{key}=1")]);
        }
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// Runs a command inside the namespace and asserts it succeeded.
    pub fn exec(&self, args: &[&str]) {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// Runs `f` on a thread that joined the namespace (the caller's thread stays put).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            // SAFETY: setns on this short-lived thread only, with a namespace fd we own.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread")
    }
}

impl NetNs {
    /// `GET /` over HTTP/1.0 from inside the namespace; the body, or `None` if nothing
    /// answered (busybox wget segfaults on some hosts, so the tests speak HTTP themselves).
    pub fn http_get(&self, addr: std::net::SocketAddr) -> Option<String> {
        self.run(move || {
            use std::io::{Read, Write};
            use std::time::Duration;
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
            let mut resp = String::new();
            s.read_to_string(&mut resp).ok()?;
            resp.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
