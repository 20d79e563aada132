use std::fs;
use std::os::unix::fs::symlink;
use std::sync::mpsc::{channel, Receiver};

use vmm_sys_util::tempdir::TempDir;

use super::*;

/// A source laid out as kubelet's atomic writer does a ConfigMap volume: the keys are links
/// through `..data`, a link to the current timestamped directory.
fn configmap(dir: &Path, version: &str, value: &str) {
    let data = dir.join(format!("..{version}"));
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("greeting"), value).unwrap();
    let tmp = dir.join("..data_tmp");
    symlink(format!("..{version}"), &tmp).unwrap();
    fs::rename(&tmp, dir.join("..data")).unwrap();
    let key = dir.join("greeting");
    if fs::symlink_metadata(&key).is_err() {
        symlink("..data/greeting", &key).unwrap();
    }
}

/// A FileSync whose copies are (rel, the content of the source's file `name` then).
fn recording(inotify: bool) -> (FileSync, Receiver<(String, String)>) {
    let (tx, rx) = channel();
    let tx = Mutex::new(tx);
    let sync = FileSync::build(
        move |c: &Copy| {
            let file = if c.host.is_dir() {
                c.host.join("greeting")
            } else {
                c.host.clone()
            };
            let text = fs::read_to_string(file).unwrap_or_default();
            let _ = tx.lock().unwrap().send((c.rel.clone(), text));
            Ok(())
        },
        inotify,
    )
    .unwrap();
    (sync, rx)
}

fn next(rx: &Receiver<(String, String)>) -> (String, String) {
    rx.recv_timeout(Duration::from_secs(10))
        .expect("a copy within 10 s")
}

/// The voluntary context switches of this process's thread named `name`.
fn switches_of(name: &str) -> Option<u64> {
    fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .find(|t| fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .and_then(|t| {
            let status = fs::read_to_string(t.path().join("status")).ok()?;
            let line = status
                .lines()
                .find(|l| l.starts_with("voluntary_ctxt_switches:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
}

#[test]
fn changed_sources_are_copied_again_and_an_idle_sync_sleeps() {
    let dir = TempDir::new_with_prefix("/tmp/kv-filesync-").unwrap();
    let cm = dir.as_path().join("cm");
    configmap(&cm, "2026_a", "v1");
    let etc = dir.as_path().join("etc");
    fs::create_dir_all(&etc).unwrap();
    let hosts = etc.join("hosts");
    fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    let (sync, rx) = recording(true);
    let copies = vec![
        Copy {
            host: cm.clone(),
            rel: "c1/1/cm".into(),
        },
        Copy {
            host: hosts.clone(),
            rel: "c1/2/hosts".into(),
        },
    ];
    sync.add("c1", copies).unwrap();
    assert_eq!(next(&rx), ("c1/1/cm".into(), "v1".into()));
    assert_eq!(
        next(&rx),
        ("c1/2/hosts".into(), "127.0.0.1 localhost\n".into())
    );

    // Idle: the thread sleeps on its watches.
    std::thread::sleep(Duration::from_millis(300));
    let before = switches_of("file-sync").expect("the file-sync thread");
    std::thread::sleep(Duration::from_millis(2500));
    let after = switches_of("file-sync").unwrap();
    assert_eq!(after, before, "an idle file sync woke up");
    assert!(rx.try_recv().is_err(), "copied again without a change");

    // kubelet's update: a new directory, `..data` renamed over, the old one removed.
    configmap(&cm, "2026_b", "v2");
    fs::remove_dir_all(cm.join("..2026_a")).unwrap();
    assert_eq!(next(&rx), ("c1/1/cm".into(), "v2".into()));
    // A file written in place; the other source is not copied again.
    fs::write(&hosts, "10.0.0.1 web\n").unwrap();
    assert_eq!(next(&rx), ("c1/2/hosts".into(), "10.0.0.1 web\n".into()));
    std::thread::sleep(Duration::from_millis(300));
    assert!(rx.try_recv().is_err(), "a source copied without a change");

    // A removed container's sources are left alone; stopping ends the thread.
    sync.remove("c1");
    fs::write(&hosts, "10.0.0.2 web\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(rx.try_recv().is_err(), "a removed source was copied");
    drop(sync);
    assert!(
        switches_of("file-sync").is_none(),
        "the thread outlived its sync"
    );
}

#[test]
fn without_inotify_sources_are_looked_at_every_few_seconds() {
    let dir = TempDir::new_with_prefix("/tmp/kv-filesync-poll-").unwrap();
    let file = dir.as_path().join("resolv.conf");
    fs::write(&file, "nameserver 10.96.0.10\n").unwrap();
    let (sync, rx) = recording(false);
    let copy = Copy {
        host: file.clone(),
        rel: "c1/0/resolv.conf".into(),
    };
    sync.add("c1", vec![copy]).unwrap();
    assert_eq!(next(&rx).1, "nameserver 10.96.0.10\n");
    fs::write(&file, "nameserver 10.96.0.11\n").unwrap();
    assert_eq!(next(&rx).1, "nameserver 10.96.0.11\n");
}

#[test]
fn a_symbolic_link_loop_ends_the_walks() {
    let dir = TempDir::new_with_prefix("/tmp/kv-filesync-loop-").unwrap();
    let src = dir.as_path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), "x").unwrap();
    symlink(".", src.join("loop")).unwrap();
    // Every level has the file and the loop: the walks stop at the depth limit.
    assert_eq!(signature(&src).len(), MAX_DEPTH);
    assert_eq!(watched_dirs(&src).len(), MAX_DEPTH);
}

#[test]
fn stopping_does_not_wait_for_a_copy_in_flight() {
    let dir = TempDir::new_with_prefix("/tmp/kv-filesync-stop-").unwrap();
    let file = dir.as_path().join("hosts");
    fs::write(&file, "a\n").unwrap();
    let (entered_tx, entered) = channel();
    let (release, release_rx) = channel::<()>();
    let (entered_tx, release_rx) = (Mutex::new(entered_tx), Mutex::new(release_rx));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let sync = FileSync::new(move |_: &Copy| {
        // The first copy (in add) returns at once; a later one hangs like a stuck guest.
        if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
            let _ = entered_tx.lock().unwrap().send(());
            let _ = release_rx.lock().unwrap().recv();
        }
        Ok(())
    })
    .unwrap();
    let copy = Copy {
        host: file.clone(),
        rel: "c1/0/hosts".into(),
    };
    sync.add("c1", vec![copy]).unwrap();
    fs::write(&file, "b\n").unwrap();
    entered
        .recv_timeout(Duration::from_secs(10))
        .expect("the change is being copied");
    let t0 = Instant::now();
    sync.stop();
    assert!(
        t0.elapsed() < Duration::from_millis(100),
        "{:?}",
        t0.elapsed()
    );
    release.send(()).unwrap();
    drop(sync);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
}
