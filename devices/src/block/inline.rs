//! Which requests the queue's own thread answers itself instead of handing them to the
//! I/O threads. A hand-off and its answer cost two thread wake-ups, more than a small
//! page-cache copy, so a request a driver waits on alone (nothing in flight, nothing else
//! queued) is served where it was read from the ring when that cannot hold up others:
//! - a read the page cache holds all of (RWF_NOWAIT, which never waits for the disk);
//! - where the transport gives the device a thread of its own (vhost-user), a write of
//!   whole pages, which the page cache takes without reading the disk first. Such a write
//!   may still wait (dirty-page throttling, the journal); one that takes longer than
//!   [`SLOW_WRITE`] sends the writes back to the I/O threads for [`BACK_OFF`].

use std::time::{Duration, Instant};

/// Largest request served inline: the copy of 128 KiB (~10 us) still costs less than
/// the two wake-ups it saves; larger ones gain more from the I/O threads copying in
/// parallel.
pub(super) const MAX_BYTES: u64 = 128 << 10;
/// Host page size: writes of whole, aligned pages need no read of the rest of a page.
const PAGE: u64 = 4096;
/// An inline write that took longer than this blocked on something.
pub(super) const SLOW_WRITE: Duration = Duration::from_millis(1);
/// How long writes go back to the I/O threads after a slow one.
pub(super) const BACK_OFF: Duration = Duration::from_secs(1);

/// The inline-write policy of one disk.
#[derive(Debug, Default)]
pub(super) struct InlineWrites {
    /// The transport serves the device on a thread no other device shares.
    own_thread: bool,
    /// Writes go to the I/O threads until then (after a slow inline write).
    paused_until: Option<Instant>,
}

impl InlineWrites {
    pub fn set_own_thread(&mut self) {
        self.own_thread = true;
    }

    /// Whether a lone write of `len` bytes at byte `offset` may run inline at `now`.
    pub fn allows(&mut self, offset: u64, len: u64, now: Instant) -> bool {
        let whole_pages = offset.is_multiple_of(PAGE) && len.is_multiple_of(PAGE);
        if !self.own_thread || len == 0 || len > MAX_BYTES || !whole_pages {
            return false;
        }
        match self.paused_until {
            Some(until) if now < until => false,
            _ => {
                self.paused_until = None;
                true
            }
        }
    }

    /// Records that an inline write finished at `now`, `took` after it started.
    pub fn finished(&mut self, took: Duration, now: Instant) {
        if took > SLOW_WRITE {
            log::debug!("virtio-blk: an inline write took {took:?}: writes go to the I/O threads for {BACK_OFF:?}");
            self.paused_until = Some(now + BACK_OFF);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_small_pages_on_a_thread_of_its_own_are_written_inline() {
        let now = Instant::now();
        let mut shared = InlineWrites::default();
        assert!(!shared.allows(0, PAGE, now), "the event loop is shared");
        let mut own = InlineWrites::default();
        own.set_own_thread();
        assert!(own.allows(0, PAGE, now));
        assert!(own.allows(3 * PAGE, MAX_BYTES, now));
        assert!(!own.allows(0, MAX_BYTES + PAGE, now), "too large");
        assert!(!own.allows(512, PAGE, now), "not page aligned");
        assert!(!own.allows(0, 512, now), "part of a page");
        assert!(!own.allows(0, 0, now));
    }

    #[test]
    fn a_slow_write_sends_writes_to_the_io_threads_for_a_while() {
        let now = Instant::now();
        let mut w = InlineWrites::default();
        w.set_own_thread();
        w.finished(SLOW_WRITE / 2, now);
        assert!(w.allows(0, PAGE, now), "a fast write changes nothing");
        w.finished(SLOW_WRITE * 3, now);
        assert!(!w.allows(0, PAGE, now));
        assert!(!w.allows(0, PAGE, now + BACK_OFF - Duration::from_millis(1)));
        assert!(w.allows(0, PAGE, now + BACK_OFF));
        assert!(
            w.allows(0, PAGE, now),
            "the pause is over once it has run out"
        );
    }
}
