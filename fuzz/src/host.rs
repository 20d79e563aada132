//! Host resources for the devices under test: in-memory disks and socket pairs, so nothing
//! is left on the host file system by a fuzzing run.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

/// An anonymous file of `len` zero bytes, and a path that opens it (`/proc/self/fd/N`).
pub fn memfd(len: u64) -> io::Result<(OwnedFd, PathBuf)> {
    const NAME: &CStr = c"fuzz-disk";
    // SAFETY: `NAME` is a NUL-terminated string; the call returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(NAME.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on a descriptor we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    Ok((fd, path))
}

/// A connected pair of non-blocking sockets of `kind` (`SOCK_SEQPACKET` keeps frame
/// boundaries like a tap).
pub fn socket_pair(kind: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    let flags = kind | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
    // SAFETY: socketpair writes two descriptors into `fds`, which lives for the call.
    if unsafe { libc::socketpair(libc::AF_UNIX, flags, 0, fds.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reads and discards everything waiting on non-blocking `fd`.
pub fn drain(fd: &OwnedFd) {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: the pointer and length describe `buf`, a live, writable buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return;
        }
    }
}

/// Sends `data` as one datagram (or stream write) on non-blocking `fd`; a full buffer is
/// ignored, as a busy host would drop it.
pub fn send(fd: &OwnedFd, data: &[u8]) {
    // SAFETY: the pointer and length describe `data`, a live slice.
    unsafe {
        libc::send(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_NOSIGNAL,
        )
    };
}
