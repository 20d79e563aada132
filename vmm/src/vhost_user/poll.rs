//! How long a device thread keeps looking at a queue after answering it.
//!
//! A driver that waits on each answer (queue depth 1) sends its next request some tens of
//! microseconds after the answer. A device thread that went to sleep meanwhile must be
//! woken for it, and waking a thread on an idle CPU costs more than a small request does
//! (an IPI, and on a nested host a trip through the outer hypervisor), once per request.
//! So after answering, the thread keeps reading the avail index for up to a window that
//! follows the driver, as QEMU's iothread polling does: it grows while the next request
//! comes within [`MAX_WINDOW`] of the last answer and shrinks away while it does not, so a
//! queue used now and then costs no spinning and a busy one at most one window per answer.

use std::time::{Duration, Instant};

/// The longest window: longer than a wake-up of an idle CPU on a nested host (~40-60 us
/// here), short enough that a missed request costs little CPU.
pub const MAX_WINDOW: Duration = Duration::from_micros(100);
/// The shortest window that is not none; a window halved below it ends polling.
const MIN_WINDOW: Duration = Duration::from_micros(4);
/// The longest a thread serves one queue by polling before it returns to its event loop,
/// so the loop's other events (the back end's completions, the exit event) are not starved.
pub(super) const MAX_SESSION: Duration = Duration::from_millis(1);

/// The polling window of one queue.
#[derive(Debug, Default)]
pub(super) struct AdaptivePoll {
    window: Duration,
    /// When the thread last answered before it stopped polling and slept.
    idle_since: Option<Instant>,
}

impl AdaptivePoll {
    /// How long to keep looking after an answer.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// A notification woke the thread at `now` and it answered requests. Had it polled
    /// long enough to see them come, it would have saved that wake-up: grow the window if
    /// that was at most [`MAX_WINDOW`], shrink it otherwise.
    pub fn woke(&mut self, now: Instant) {
        let Some(since) = self.idle_since.take() else {
            return;
        };
        self.window = if now.saturating_duration_since(since) <= MAX_WINDOW {
            (self.window * 2).clamp(MIN_WINDOW, MAX_WINDOW)
        } else if self.window / 2 < MIN_WINDOW {
            Duration::ZERO
        } else {
            self.window / 2
        };
    }

    /// Nothing came within the window after the answer at `last`: the thread sleeps.
    pub fn gave_up(&mut self, last: Instant) {
        self.idle_since = Some(last);
    }

    /// The thread stopped polling with work left (its session ran out, or requests went
    /// to other threads): the next wake-up says nothing about the window.
    pub fn interrupted(&mut self) {
        self.idle_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// The driver comes back `gap` after each answer, `n` times; returns the window after.
    fn drive(p: &mut AdaptivePoll, t: &mut Instant, gap: Duration, n: usize) -> Duration {
        for _ in 0..n {
            if gap <= p.window() {
                // Seen while polling: no wake-up, nothing learnt.
                *t += gap;
                continue;
            }
            p.gave_up(*t);
            *t += gap;
            p.woke(*t);
        }
        p.window()
    }

    #[test]
    fn a_driver_that_comes_back_quickly_grows_the_window_until_it_is_seen() {
        let (mut p, mut t) = (AdaptivePoll::default(), Instant::now());
        assert_eq!(
            p.window(),
            Duration::ZERO,
            "no polling before anything is known"
        );
        assert_eq!(drive(&mut p, &mut t, us(50), 1), MIN_WINDOW);
        assert_eq!(drive(&mut p, &mut t, us(50), 3), us(32));
        assert_eq!(drive(&mut p, &mut t, us(50), 1), us(64));
        assert_eq!(
            drive(&mut p, &mut t, us(50), 100),
            us(64),
            "seen now: stays"
        );
        assert_eq!(
            drive(&mut p, &mut t, us(90), 2),
            MAX_WINDOW,
            "never past the cap"
        );
    }

    #[test]
    fn a_driver_that_comes_back_rarely_ends_the_polling() {
        let (mut p, mut t) = (AdaptivePoll::default(), Instant::now());
        drive(&mut p, &mut t, us(90), 10);
        assert_eq!(p.window(), MAX_WINDOW);
        assert_eq!(drive(&mut p, &mut t, us(5000), 1), us(50));
        assert_eq!(drive(&mut p, &mut t, us(5000), 4), Duration::ZERO);
        assert_eq!(drive(&mut p, &mut t, us(5000), 10), Duration::ZERO);
        assert_eq!(
            drive(&mut p, &mut t, us(20), 1),
            MIN_WINDOW,
            "and it comes back"
        );
    }

    #[test]
    fn a_wake_up_after_an_interruption_teaches_nothing() {
        let (mut p, mut t) = (AdaptivePoll::default(), Instant::now());
        drive(&mut p, &mut t, us(90), 10);
        p.interrupted();
        p.woke(t + us(9000));
        assert_eq!(p.window(), MAX_WINDOW);
        p.woke(t + us(10));
        assert_eq!(
            p.window(),
            MAX_WINDOW,
            "a second wake-up without a sleep neither"
        );
    }
}
