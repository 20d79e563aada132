//! Sleeping until a descriptor is readable: how watchers of a VM's end (a pidfd, an
//! eventfd) wait without waking up to check.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// Waits until `fd` is readable or `timeout` (`None`: no limit) has passed: Ok(true) if
/// readable, Ok(false) at the timeout, an error if `fd` cannot be waited on (so that a
/// watcher does not take a failed wait for the end it waits for).
pub fn readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> std::io::Result<bool> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let ms = match deadline {
            None => -1,
            // Rounded up, so that a short wait does not turn into a busy loop.
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .as_nanos()
                .div_ceil(1_000_000)
                .min(i32::MAX as u128) as i32,
        };
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n > 0 {
            // A closed or invalid descriptor is "ready" too, with POLLNVAL or POLLERR alone.
            if p.revents & (libc::POLLIN | libc::POLLHUP) != 0 {
                return Ok(true);
            }
            return Err(std::io::Error::other(format!(
                "descriptor {} cannot be waited on (poll events {:#x})",
                fd.as_raw_fd(),
                p.revents
            )));
        }
        if n == 0 {
            return Ok(false);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn waits_for_the_timeout_or_until_readable() {
        let evt = EventFd::new(0).unwrap();
        // SAFETY: the eventfd outlives every borrow below.
        let fd = unsafe { BorrowedFd::borrow_raw(evt.as_raw_fd()) };
        let t0 = Instant::now();
        assert!(!readable(fd, Some(Duration::from_millis(30))).unwrap());
        assert!(t0.elapsed() >= Duration::from_millis(30));
        assert!(!readable(fd, Some(Duration::ZERO)).unwrap());
        let writer = evt.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            writer.write(1).unwrap();
        });
        assert!(readable(fd, None).unwrap());
        t.join().unwrap();
        // It stays readable until read.
        assert!(readable(fd, Some(Duration::ZERO)).unwrap());
    }

    #[test]
    fn a_descriptor_that_cannot_be_waited_on_is_an_error_not_readable() {
        // Far above any descriptor a test process opens (and no lower limit on its number).
        let raw = 0x3fff_fff0;
        // SAFETY: nothing is open under this number; poll only reports it invalid, nothing
        // reads, writes or closes through it.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        let e = readable(fd, Some(Duration::from_secs(5))).unwrap_err();
        assert!(e.to_string().contains("cannot be waited on"), "{e}");
    }
}
