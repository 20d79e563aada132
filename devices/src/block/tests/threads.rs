//! The I/O threads: shared by the disks of a pool, gone with the last of them.

use super::*;

/// Names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|s| s.trim_end().to_owned())
        .collect()
}

/// Threads named `name` or `name.N` in this process.
fn threads_named(name: &str) -> usize {
    thread_names()
        .iter()
        .filter(|n| *n == name || n.strip_prefix(name).is_some_and(|r| r.starts_with('.')))
        .count()
}

/// Waits (two seconds at most) until `n` threads are named `name`: a thread names itself
/// once it runs, and /proc may lag a thread's exit by a moment.
fn wait_for_threads(name: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while threads_named(name) != n {
        assert!(
            Instant::now() < deadline,
            "not {n} {name} threads: {:?}",
            thread_names()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn worker_threads_end_on_drop() {
    let dir = TempDir::new();
    let path = dir.disk("disk.img", 4096);
    let blk = Block::new(config(&path, false, Some("leakcheck"))).unwrap();
    wait_for_threads("blk-leakcheck", THREADS_PER_DISK);
    let mut h = Harness::new(blk);
    assert_eq!(h.read(0, 512).0, OK);
    drop(h);
    // Drop joins the threads.
    wait_for_threads("blk-leakcheck", 0);
}

#[test]
fn disks_of_one_pool_share_its_threads_and_keep_their_own_completions() {
    let dir = TempDir::new();
    let pool = IoPool::new("blk-shared", 2, None).unwrap();
    let paths = [dir.disk("a.img", 8192), dir.disk("b.img", 8192)];
    let mut disks: Vec<Harness> = paths
        .iter()
        .map(|p| Harness::new(Block::with_pool(config(p, false, None), &pool).unwrap()))
        .collect();
    drop(pool);
    // Writes go to the I/O threads (a lone write is answered at once only by a device
    // with a thread of its own).
    for (i, h) in disks.iter_mut().enumerate() {
        assert_eq!(h.write(1, &[i as u8 + 1; 512]).0, OK);
    }
    wait_for_threads("blk-shared", 2);
    // Each disk got its own data and its own answer.
    for (i, p) in paths.iter().enumerate() {
        assert_eq!(std::fs::read(p).unwrap()[512..1024], [i as u8 + 1; 512]);
    }
    // The threads stay while a disk uses them, and go with the last one.
    let mut b = disks.pop().unwrap();
    drop(disks);
    assert_eq!(b.write(2, &[9; 512]).0, OK);
    assert_eq!(threads_named("blk-shared"), 2);
    drop(b);
    wait_for_threads("blk-shared", 0);
}
