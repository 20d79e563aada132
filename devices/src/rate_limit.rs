//! Per-device I/O limits: token buckets for bytes and operations per second, as Firecracker
//! offers per drive and per NIC, so that one pod's disk or network traffic cannot starve the
//! node. A device asks [`Limiter::admit`] before it serves a request; a refusal arms the
//! limiter's timer (a non-blocking timerfd the device watches beside its other back-end
//! descriptors), and the device retries when it fires. Requests are delayed, never dropped.
//!
//! Written here rather than taken from a crate: the field's limiters (governor and friends)
//! refuse a request larger than the bucket and own no file descriptor an event loop can wait
//! on; both are what a device needs.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::str::FromStr;
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// A bucket holds this much time's worth of its rate: a burst the device may pass at once.
const BURST: Duration = Duration::from_millis(100);

/// Errors of a rate-limit setting.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    #[error("rate {value:?}: {why}")]
    Parse { value: String, why: &'static str },
    #[error("cannot create the rate limiter's timer: {0}")]
    Timer(io::Error),
}

/// What a device is held to; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    pub bytes_per_sec: Option<u64>,
    pub ops_per_sec: Option<u64>,
}

impl RateLimit {
    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_sec.is_none() && self.ops_per_sec.is_none()
    }
}

/// A per-second rate as Kubernetes writes quantities: a whole number with an optional
/// suffix, binary (`Ki`, `Mi`, `Gi`) or decimal (`k`, `M`, `G`); zero is refused (a device
/// that may never move a byte is a mistake, not a limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub u64);

impl FromStr for Rate {
    type Err = RateLimitError;

    fn from_str(s: &str) -> Result<Rate, RateLimitError> {
        let bad = |why| RateLimitError::Parse {
            value: s.to_owned(),
            why,
        };
        let t = s.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, suffix) = t.split_at(digits);
        let n: u64 = number.parse().map_err(|_| {
            bad("expected a whole number with an optional suffix (Ki, Mi, Gi, k, M, G)")
        })?;
        let unit: u64 = match suffix {
            "" => 1,
            "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            _ => return Err(bad("unknown suffix (Ki, Mi, Gi, k, M, G)")),
        };
        match n.checked_mul(unit) {
            Some(0) => Err(bad("must be more than zero")),
            Some(v) => Ok(Rate(v)),
            None => Err(bad("too large")),
        }
    }
}

/// Tokens refill at `rate` per second up to `capacity`. A request larger than the bucket
/// passes once the bucket is full and leaves it in debt, so large requests are delayed, not
/// refused, and the long-run rate holds.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `rate` per second.
    pub fn new(rate: u64, now: Instant) -> TokenBucket {
        let rate = rate as f64;
        let capacity = (rate * BURST.as_secs_f64()).max(1.0);
        TokenBucket {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = now;
    }

    /// How long until `n` tokens may pass (zero: now).
    pub fn wait(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        let need = (n as f64).min(self.capacity);
        if self.tokens >= need {
            return Duration::ZERO;
        }
        // Round up, so that the timer never fires a hair before the tokens are there.
        Duration::from_secs_f64((need - self.tokens) / self.rate) + Duration::from_micros(1)
    }

    fn take(&mut self, n: u64) {
        self.tokens -= n as f64;
    }
}

/// A device's buckets and the timer that wakes it once a refused request may pass.
#[derive(Debug)]
pub struct Limiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    /// Requests refused (each delayed until the timer fired), for metrics.
    pub throttled: u64,
}

impl Limiter {
    /// A limiter for `limit`, or `None` where it limits nothing.
    pub fn new(limit: RateLimit) -> Result<Option<Limiter>, RateLimitError> {
        if limit.is_unlimited() {
            return Ok(None);
        }
        let timer = TimerFd::new().map_err(|e| RateLimitError::Timer(e.into()))?;
        // SAFETY: fcntl on a descriptor this function owns; only its status flags change.
        let ok = unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        if ok < 0 {
            return Err(RateLimitError::Timer(io::Error::last_os_error()));
        }
        let now = Instant::now();
        Ok(Some(Limiter {
            bytes: limit.bytes_per_sec.map(|r| TokenBucket::new(r, now)),
            ops: limit.ops_per_sec.map(|r| TokenBucket::new(r, now)),
            timer,
            throttled: 0,
        }))
    }

    /// Whether one operation of `bytes` may pass now; if so its tokens are taken. If not,
    /// nothing is taken and the timer is armed for when it may.
    pub fn admit(&mut self, bytes: u64) -> bool {
        self.admit_at(bytes, Instant::now())
    }

    fn admit_at(&mut self, bytes: u64, now: Instant) -> bool {
        let wait_bytes = self
            .bytes
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait(bytes, now));
        let wait_ops = self.ops.as_mut().map_or(Duration::ZERO, |b| b.wait(1, now));
        let wait = wait_bytes.max(wait_ops);
        if wait.is_zero() {
            if let Some(b) = &mut self.bytes {
                b.take(bytes);
            }
            if let Some(b) = &mut self.ops {
                b.take(1);
            }
            return true;
        }
        self.throttled += 1;
        if let Err(e) = self.timer.reset(wait, None) {
            // Without the timer the device would wait for its next event: let this one pass.
            log::error!("rate limiter: cannot arm the timer: {e}; not limiting");
            return true;
        }
        false
    }

    /// The timer's descriptor, to watch for readability.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Consumes a fired timer; returns whether it had fired.
    pub fn timer_fired(&mut self) -> bool {
        self.timer.wait().is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_like_kubernetes_quantities() {
        for (s, v) in [
            ("1", 1),
            ("500", 500),
            ("10k", 10_000),
            ("2M", 2_000_000),
            ("1G", 1_000_000_000),
            ("4Ki", 4096),
            ("20Mi", 20 << 20),
            ("1Gi", 1 << 30),
            (" 3Mi ", 3 << 20),
        ] {
            assert_eq!(s.parse::<Rate>().unwrap(), Rate(v), "{s}");
        }
        for bad in [
            "",
            "0",
            "0Mi",
            "Mi",
            "-1",
            "1.5M",
            "10 Mi",
            "1Ti",
            "1m",
            "99999999999999999999",
        ] {
            let e = bad.parse::<Rate>().unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }

    #[test]
    fn a_bucket_passes_its_burst_then_its_rate() {
        let t0 = Instant::now();
        // 1000 bytes/s: a bucket of 100 bytes.
        let mut b = TokenBucket::new(1000, t0);
        assert_eq!(b.wait(100, t0), Duration::ZERO);
        b.take(100);
        // Empty: 50 bytes need 50 ms.
        let w = b.wait(50, t0);
        assert!(
            w > Duration::from_millis(49) && w < Duration::from_millis(51),
            "{w:?}"
        );
        assert_eq!(b.wait(50, t0 + Duration::from_millis(50)), Duration::ZERO);
        // A request larger than the bucket waits for a full bucket, then leaves a debt.
        let t1 = t0 + Duration::from_millis(50);
        b.take(50);
        let w = b.wait(1000, t1);
        assert!(
            w > Duration::from_millis(99) && w < Duration::from_millis(101),
            "{w:?}"
        );
        let t2 = t1 + w;
        assert_eq!(b.wait(1000, t2), Duration::ZERO);
        b.take(1000);
        // The debt of 900 takes 0.9 s to repay before one more byte passes.
        let w = b.wait(1, t2);
        assert!(
            w > Duration::from_millis(900) && w < Duration::from_millis(902),
            "{w:?}"
        );
    }

    #[test]
    fn a_refusal_takes_nothing_and_arms_the_timer() {
        let limit = RateLimit {
            bytes_per_sec: Some(10_000),
            ops_per_sec: Some(20),
        };
        let mut l = Limiter::new(limit).unwrap().unwrap();
        let t0 = Instant::now();
        // Ops allow a burst of 2 (20/s for 100 ms).
        assert!(l.admit_at(100, t0));
        assert!(l.admit_at(100, t0));
        assert!(!l.timer_fired(), "nothing armed yet");
        assert!(!l.admit_at(100, t0), "the third op waits");
        assert_eq!(l.throttled, 1);
        // Bytes were not taken by the refusal: 800 of the 1000-byte bucket are left.
        assert_eq!(l.bytes.as_mut().unwrap().wait(800, t0), Duration::ZERO);
        // The timer fires within the ops wait (50 ms) and is then consumed.
        let mut fds = [libc::pollfd {
            fd: l.timer_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: polls one descriptor this test owns, with a valid array of length 1.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 1000) };
        assert_eq!(n, 1, "the timer fires");
        assert!(l.timer_fired());
        assert!(!l.timer_fired(), "consumed");
        assert!(l.admit_at(100, t0 + Duration::from_millis(60)));
    }

    #[test]
    fn no_limit_no_limiter() {
        assert!(Limiter::new(RateLimit::default()).unwrap().is_none());
    }
}
