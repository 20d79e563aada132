//! virtio-vsock: arbitrary tx packets (any header fields: CIDs, type, op, ports, len, flags,
//! credit; headers and payloads split across descriptors or outside the guest) through the
//! muxer and its connections, and rx buffers of any shape for what the device answers. The
//! guest may connect to host port 1024, where a listener waits. `Host` steps (argument modulo
//! 4): 0 accept guest connections; 1 every host peer sends `arg` bytes; 2 a host client
//! connects to guest port `arg`; 3 the newest host peer shuts its write side (bit 2 of `arg`
//! clear) or closes. The config byte is unused.

#![no_main]

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;

use devices::virtio::VirtioDevice;
use devices::vsock::{port_path, Vsock, VsockConfig};
use kubevirt_fuzz::script::Script;
use libfuzzer_sys::fuzz_target;

const GUEST_CID: u64 = 3;
/// Host port the guest can reach.
const HOST_PORT: u32 = 1024;

/// The device's socket path, and the listener behind host port `HOST_PORT`.
fn host() -> &'static (PathBuf, UnixListener) {
    static HOST: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    HOST.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kubevirt-fuzz-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("socket directory");
        let uds = dir.join("v.sock");
        let port = port_path(&uds, HOST_PORT);
        let _ = std::fs::remove_file(&port);
        let listener = UnixListener::bind(&port).expect("host listener");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        (uds, listener)
    })
}

fn accept_all(listener: &UnixListener, peers: &mut Vec<UnixStream>) {
    while let Ok((s, _)) = listener.accept() {
        if s.set_nonblocking(true).is_ok() {
            peers.push(s);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(script) = Script::parse(data) else {
        return;
    };
    let (uds, listener) = host();
    // Connections left in the backlog by the previous input.
    accept_all(listener, &mut Vec::new());
    let mut vsock = Vsock::new(VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: uds.clone(),
    })
    .expect("vsock device");
    vsock.activate().expect("activate");
    let mut peers = Vec::new();
    let payload = [0x5au8; 256];
    script.run(&mut vsock, 0, |_, arg| match arg % 4 {
        0 => accept_all(listener, &mut peers),
        1 => {
            for p in &mut peers {
                // A full socket buffer is fine: the guest has not read yet.
                let _ = p.write(&payload[..usize::from(arg)]);
            }
        }
        2 => {
            if let Ok(mut s) = UnixStream::connect(uds) {
                let _ = s.set_nonblocking(true);
                let _ = s.write_all(format!("CONNECT {arg}\n").as_bytes());
                peers.push(s);
            }
        }
        _ => match peers.pop() {
            Some(p) if arg & 4 == 0 => {
                let _ = p.shutdown(Shutdown::Write);
                peers.insert(0, p);
            }
            _ => {}
        },
    });
    vsock.reset();
});
