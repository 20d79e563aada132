//! Sleeping until a descriptor is readable: how watchers of a VM's end (a pidfd, an
//! eventfd) wait without waking up to check.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// Waits until `fd` is readable or `timeout` (`None`: no limit) has passed; true if readable.
pub fn readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> bool {
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
            return true;
        }
        if n == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
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
        assert!(!readable(fd, Some(Duration::from_millis(30))));
        assert!(t0.elapsed() >= Duration::from_millis(30));
        assert!(!readable(fd, Some(Duration::ZERO)));
        let writer = evt.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            writer.write(1).unwrap();
        });
        assert!(readable(fd, None));
        t.join().unwrap();
        // It stays readable until read.
        assert!(readable(fd, Some(Duration::ZERO)));
    }
}
