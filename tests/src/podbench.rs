//! Pod start through a real containerd's CRI, ours (handler `kubevirt`) next to runc in the
//! same run: RunPodSandbox, CreateContainer + StartContainer, and the container's first output
//! in its CRI log. For ours, RunPodSandbox minus the VM's start to an answering agent (which
//! the shim logs): containerd and the shim on the host plus the pause container's creation
//! in the guest.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::containerd::Containerd;
use crate::cri::{container_config, pod_config, Cri};
use crate::measure::median;
use crate::netns::NetNs;

const IMAGE: &str = "localhost/busybox:bench";

#[derive(Debug, Default)]
struct Times {
    sandbox: Vec<Duration>,
    container: Vec<Duration>,
    output: Vec<Duration>,
    shim_share: Vec<Duration>,
}

fn agent_ready_ms(log: &str, pod: &str) -> Option<u64> {
    let line = log
        .lines()
        .find(|l| l.contains(&format!("pod {pod}: agent ready")))?;
    line.split("agent ready ")
        .nth(1)?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// One pod to its first output; an error if the runtime cannot start pods here at all.
fn one_pod(
    c: &Containerd,
    cri: &mut Cri,
    handler: &str,
    name: &str,
    times: &mut Times,
) -> Result<(), String> {
    let logs = c.dir.join("logs").join(name);
    std::fs::create_dir_all(&logs).expect("log dir");
    let cfg = pod_config(name, &logs);
    let t0 = Instant::now();
    let pod = cri
        .run_pod_with(cfg.clone(), handler)
        .map_err(|e| e.message().to_owned())?;
    let sandbox = t0.elapsed();
    let t1 = Instant::now();
    let id = cri
        .create_container(
            &pod,
            container_config("c", IMAGE, &["sh", "-c", "echo ready; sleep 1000"], vec![]),
            &cfg,
        )
        .expect("CreateContainer");
    cri.start_container(&id).expect("StartContainer");
    let container = t1.elapsed();
    let log = logs.join("c.log");
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("ready")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no output from pod {name}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    times.output.push(t0.elapsed());
    times.sandbox.push(sandbox);
    times.container.push(container);
    if let Some(ms) = agent_ready_ms(&c.log(), &pod) {
        times
            .shim_share
            .push(sandbox.saturating_sub(Duration::from_millis(ms)));
    }
    cri.stop_pod(&pod).expect("StopPodSandbox");
    cri.remove_pod(&pod).expect("RemovePodSandbox");
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// Appends the pod-start section to the report.
pub fn pod_section(r: &mut String, runs: usize, progress: &dyn Fn(&str)) {
    let ns = NetNs::new("kvbench");
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    let c = Containerd::start_cri_with_images("bench", &ns.name, IMAGE);
    let mut cri = Cri::connect(&c.socket()).expect("CRI");
    let mut rows = Vec::new();
    for (label, handler) in [
        ("kubevirt (ours, qemu back end here)", "kubevirt"),
        ("runc", ""),
    ] {
        progress(&format!("pod start, {label} x {runs} ..."));
        let mut t = Times::default();
        let mut failed = None;
        for i in 0..runs {
            let name = format!(
                "bench-{}-{i}",
                if handler.is_empty() { "runc" } else { handler }
            );
            if let Err(e) = one_pod(&c, &mut cri, handler, &name, &mut t) {
                progress(&format!("{label}: RunPodSandbox failed: {e}"));
                failed = Some(e);
                break;
            }
        }
        rows.push((label, t, failed));
    }
    let _ = writeln!(
        r,
        "## Pod start through containerd's CRI (median of {runs})\n"
    );
    let _ = writeln!(r, "| runtime | RunPodSandbox | Create+Start container | to first output | RunPodSandbox minus VM start to agent |");
    let _ = writeln!(r, "| --- | --- | --- | --- | --- |");
    for (label, t, failed) in &rows {
        if let Some(e) = failed {
            let _ = writeln!(r, "| {label} | failed on this host: {e} | - | - | - |");
            continue;
        }
        let _ = writeln!(
            r,
            "| {label} | {} | {} | {} | {} |",
            ms(median(&t.sandbox)),
            ms(median(&t.container)),
            ms(median(&t.output)),
            if t.shim_share.is_empty() {
                "-".into()
            } else {
                ms(median(&t.shim_share))
            },
        );
    }
    let _ = writeln!(
        r,
        "\nHere KVM emulates guest code, so our pods boot under QEMU TCG and the guest's boot \
         dominates. The last column is RunPodSandbox minus the VM's start to an answering agent \
         (as the shim logs it): containerd and the shim on the host (shim start, image \
         conversion, cached after the first pod; the machine calibration; scratch disk; QEMU \
         and network set-up) plus the pause container's creation in the TCG guest. Target on a \
         native-KVM host: under 150 ms to a running container.\n"
    );
}
