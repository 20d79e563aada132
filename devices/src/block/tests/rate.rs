//! Rate limits: requests held back on the ring, none lost, none kept over a reset.

use super::*;

#[test]
fn a_rate_limited_disk_delays_requests_and_loses_none() {
    let dir = TempDir::new();
    let path = dir.disk("disk.img", 64 << 10);
    let mut cfg = config(&path, false, None);
    // 40 KiB/s: a 4 KiB burst, then one 4 KiB read per 100 ms.
    cfg.rate.bytes_per_sec = Some(40 << 10);
    let mut h = Harness::new(Block::new(cfg).unwrap());
    let start = Instant::now();
    for i in 0..5u64 {
        h.header(VIRTIO_BLK_T_IN, i * 8);
        h.d.add_chain(0, &[(HDR, 16, 0), (DATA, 4096, W), (STATUS, 1, W)]);
    }
    h.blk.process_queue(0, &mut refs(&mut h.qs), &h.d.mem);
    assert_eq!(h.blk.in_flight, 1, "only the burst passes at once");
    assert!(h.blk.rate_limited);
    let deadline = start + Duration::from_secs(10);
    while h.d.used(0).len() < 5 {
        assert!(
            Instant::now() < deadline,
            "rate-limited requests never completed"
        );
        h.turn();
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(390),
        "5 x 4 KiB at 40 KiB/s took {took:?}"
    );
    assert_eq!(h.blk.stats().read_requests, 5);
    assert_eq!(h.blk.stats().errors, 0);
    let limited = h
        .blk
        .counters()
        .into_iter()
        .find(|(n, _)| *n == "rate_limited");
    assert!(limited.unwrap().1 >= 4, "{:?}", h.blk.counters());
    assert!(!h.blk.rate_limited);
}

#[test]
fn a_held_back_request_is_forgotten_on_reset() {
    // One request per second: the first passes at once (a full bucket), the second waits.
    let dir = TempDir::new();
    let path = dir.disk("disk.img", 4096);
    let mut cfg = config(&path, false, None);
    cfg.rate.ops_per_sec = Some(1);
    let mut h = Harness::new(Block::new(cfg).unwrap());
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    h.d.add_chain(0, &[(HDR, 16, 0), (STATUS, 1, W)]);
    h.d.add_chain(0, &[(HDR, 16, 0), (STATUS, 1, W)]);
    h.blk.process_queue(0, &mut refs(&mut h.qs), &h.d.mem);
    assert!(h.blk.rate_limited);
    h.finish();
    assert_eq!(h.d.used(0).len(), 1);
    h.blk.reset();
    assert!(!h.blk.rate_limited);
}
