//! The data phase of a port-forwarded connection (see `WatchPorts` in proto/agent.proto), the
//! same at both ends: bytes copied both ways until each direction ends, and each end passed on
//! as a half close (the hybrid vsock device carries it both ways), so a client that stops
//! sending still gets its answer.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

/// Copies between stream sockets `a` and `b` until both directions have ended.
pub fn relay(a: OwnedFd, b: OwnedFd) {
    // Plain read and write serve any stream socket (TCP, Unix, vsock).
    let (a, b) = (File::from(a), File::from(b));
    let (Ok(a_out), Ok(b_in)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let back = std::thread::Builder::new()
        .name("relay-back".into())
        .spawn(move || {
            let _ = std::io::copy(&mut &b_in, &mut &a_out);
            close_write(&a_out);
        });
    let _ = std::io::copy(&mut &a, &mut &b);
    close_write(&b);
    if let Ok(t) = back {
        let _ = t.join();
    }
}

fn close_write(socket: &File) {
    // SAFETY: shutdown on a descriptor `socket` owns; it touches no memory of ours.
    unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_WR) };
}
