//! `make guest`'s kernel cache: a second build is a cache hit that takes seconds, and a changed
//! config fragment maps to a new cache key (so it rebuilds). Runs after `make guest`.

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::workspace_root;

fn build_sh() -> Command {
    Command::new(workspace_root().join("guest-kernel/build.sh"))
}

fn key(fragment: Option<&std::path::Path>) -> (String, String) {
    let mut cmd = build_sh();
    cmd.arg("--key");
    if let Some(f) = fragment {
        cmd.env("KUBEVIRT_FRAGMENT", f);
    }
    let out = cmd.output().expect("run build.sh --key");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let words: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(words.len(), 4, "{text}");
    (words[2].to_owned(), words[3].to_owned())
}

#[test]
fn a_second_guest_build_is_a_cache_hit_in_seconds() {
    let (_, state) = key(None);
    assert_eq!(state, "cached", "run `make guest` first");
    let out_dir = std::env::temp_dir().join(format!("kvguest-{}", std::process::id()));
    fs::create_dir_all(&out_dir).unwrap();
    let start = Instant::now();
    let out = build_sh().arg(&out_dir).output().expect("run build.sh");
    let took = start.elapsed();
    let log = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{log}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(log.contains("kernel: cache hit"), "{log}");
    assert!(took < Duration::from_secs(30), "cache hit took {took:?}");
    println!("  cached guest build: {:.2} s", took.as_secs_f64());
    let ours = fs::read_link(out_dir.join("vmlinux")).unwrap();
    let make_guest = fs::read_link(workspace_root().join("target/guest/vmlinux")).unwrap();
    assert_eq!(ours, make_guest, "both builds link the same cached kernel");
    fs::remove_dir_all(&out_dir).unwrap();
}

#[test]
fn a_changed_fragment_needs_a_new_kernel() {
    let (default_key, _) = key(None);
    let frag = std::env::temp_dir().join(format!("kvfragment-{}", std::process::id()));
    let mut text =
        fs::read_to_string(workspace_root().join("guest-kernel/config.fragment")).unwrap();
    text.push_str("CONFIG_IKCONFIG=y\n");
    fs::write(&frag, text).unwrap();
    let (changed_key, state) = key(Some(&frag));
    fs::remove_file(&frag).unwrap();
    assert_ne!(changed_key, default_key);
    assert_eq!(state, "missing", "a fragment nobody built cannot be cached");
}
