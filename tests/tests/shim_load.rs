//! Load: 20 pods started at once through the CRI on the qemu back end, each with a running
//! container; all run, all are removed at once, and nothing is left behind.
//!
//! Needs root, containerd, containernetworking-plugins, qemu-system-x86_64, mkfs.erofs,
//! `make build` and `make guest`.

use tests::containerd::tail;
use tests::crienv::{cri_env, IMAGE};
use tests::density::{pod_processes_memory, remove_pods, start_pods};
use tests::leaks::assert_nothing_left;

const PODS: usize = 20;

#[test]
fn twenty_pods_at_once_all_run_and_all_go() {
    let (ns, c, _cri) = cri_env("kvload");
    let batch = start_pods(&c, "load", PODS, IMAGE);
    assert!(
        batch.failed.is_empty(),
        "{} of {PODS} pods failed: {:#?}\n{}",
        batch.failed.len(),
        batch.failed,
        tail(&c.log(), 40)
    );
    let mut took: Vec<_> = batch.started.iter().map(|s| s.took).collect();
    took.sort();
    let (shims, vms) = pod_processes_memory(&c);
    println!(
        "  {PODS} pods in {:.1} s (each to its first output: fastest {:.1} s, slowest {:.1} s); \
         PSS per pod: shim {} MiB, VM {} MiB",
        batch.wall.as_secs_f64(),
        took[0].as_secs_f64(),
        took[PODS - 1].as_secs_f64(),
        (shims.pss / PODS as u64) >> 20,
        (vms.pss / PODS as u64) >> 20
    );
    // One shim and one QEMU per pod, no more.
    assert_eq!((shims.processes, vms.processes), (PODS, PODS));
    let pods: Vec<String> = batch.started.iter().map(|s| s.pod.clone()).collect();
    let errors = remove_pods(&c, &pods);
    assert!(errors.is_empty(), "{errors:#?}");
    assert_nothing_left(&c, Some(&ns));
}
