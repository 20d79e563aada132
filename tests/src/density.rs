//! Many pods at once through the CRI: started concurrently, each with a container that
//! prints its pod's name, then removed concurrently; and what the host pays for them in memory
//! (RSS and PSS of every shim and VM process of a containerd). The load test and the
//! benchmark's density and memory rows share it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::containerd::Containerd;
use crate::cri::{container_config, log_file, pod_config, Cri};

/// One started pod.
#[derive(Debug)]
pub struct Started {
    pub name: String,
    pub pod: String,
    /// RunPodSandbox to the container's first output.
    pub took: Duration,
}

/// `n` pods started together: those that ran, the errors of those that did not, the wall time.
#[derive(Debug)]
pub struct Batch {
    pub started: Vec<Started>,
    pub failed: Vec<String>,
    pub wall: Duration,
}

/// Starts pod `name` with a container that prints `<name>-ok` and sleeps.
fn start_one(
    socket: PathBuf,
    logs: PathBuf,
    name: String,
    image: String,
) -> Result<Started, String> {
    let t0 = Instant::now();
    let mut cri = Cri::connect(&socket).map_err(|e| format!("{name}: connect: {e}"))?;
    let cfg = pod_config(&name, &logs);
    let pod = cri
        .run_pod(cfg.clone())
        .map_err(|e| format!("{name}: RunPodSandbox: {}", e.message()))?;
    let script = format!("echo {name}-ok; exec sleep 100000");
    let ctr = cri
        .create_container(
            &pod,
            container_config("c", &image, &["sh", "-c", &script], vec![]),
            &cfg,
        )
        .map_err(|e| format!("{name}: CreateContainer: {}", e.message()))?;
    cri.start_container(&ctr)
        .map_err(|e| format!("{name}: StartContainer: {}", e.message()))?;
    let log = log_file(&logs, "c");
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains(&format!("{name}-ok"))
    {
        if t0.elapsed() > Duration::from_secs(300) {
            return Err(format!("{name}: no output after 300 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Started {
        name,
        pod,
        took: t0.elapsed(),
    })
}

/// Starts `n` pods named `<prefix>-<i>` at once, each on its own CRI connection.
pub fn start_pods(c: &Containerd, prefix: &str, n: usize, image: &str) -> Batch {
    let t0 = Instant::now();
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let name = format!("{prefix}-{i}");
            let logs = c.dir.join("density-logs").join(&name);
            std::fs::create_dir_all(&logs).expect("log dir");
            let (socket, image) = (c.socket(), image.to_owned());
            std::thread::spawn(move || start_one(socket, logs, name, image))
        })
        .collect();
    let mut batch = Batch {
        started: Vec::new(),
        failed: Vec::new(),
        wall: Duration::ZERO,
    };
    for t in threads {
        match t.join().expect("pod thread") {
            Ok(s) => batch.started.push(s),
            Err(e) => batch.failed.push(e),
        }
    }
    batch.wall = t0.elapsed();
    batch
}

/// Stops and removes `pods` at once; the errors of those that failed.
pub fn remove_pods(c: &Containerd, pods: &[String]) -> Vec<String> {
    let threads: Vec<_> = pods
        .iter()
        .map(|pod| {
            let (socket, pod) = (c.socket(), pod.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let mut cri = Cri::connect(&socket).map_err(|e| e.to_string())?;
                cri.stop_pod(&pod)
                    .map_err(|e| format!("StopPodSandbox {pod}: {}", e.message()))?;
                cri.remove_pod(&pod)
                    .map_err(|e| format!("RemovePodSandbox {pod}: {}", e.message()))
            })
        })
        .collect();
    threads
        .into_iter()
        .filter_map(|t| t.join().expect("remove thread").err())
        .collect()
}

/// Resident and proportional set sizes, in bytes, summed over some processes.
#[derive(Debug, Default, Clone, Copy)]
pub struct Memory {
    pub processes: usize,
    pub rss: u64,
    pub pss: u64,
}

/// The memory of every shim process, and of every VM process, of `c`'s pods.
pub fn pod_processes_memory(c: &Containerd) -> (Memory, Memory) {
    let sum = |pids: Vec<u32>| {
        let mut m = Memory::default();
        for pid in pids {
            let Ok(rollup) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
                continue;
            };
            let kib = |key: &str| -> u64 {
                rollup
                    .lines()
                    .find(|l| l.starts_with(key))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            m.processes += 1;
            m.rss += kib("Rss:") << 10;
            m.pss += kib("Pss:") << 10;
        }
        m
    };
    let (shims, vms) = c.pod_pids();
    (sum(shims), sum(vms))
}

/// CPU time so far of each shim and each VM process (QEMU) of `c`'s pods, by pid.
fn pod_processes_cpu(c: &Containerd) -> (CpuByPid, CpuByPid) {
    let each = |pids: Vec<u32>| {
        pids.into_iter()
            .map(|p| (p, crate::blkbench::process_cpu(p)))
            .collect()
    };
    let (shims, vms) = c.pod_pids();
    (each(shims), each(vms))
}

type CpuByPid = std::collections::BTreeMap<u32, Duration>;

/// Mean and largest CPU per process between two samples, in ms per second of `window`.
fn cpu_rate(before: &CpuByPid, after: &CpuByPid, window: Duration) -> (f64, f64) {
    let rates: Vec<f64> = after
        .iter()
        .filter_map(|(pid, t)| Some(t.saturating_sub(*before.get(pid)?)))
        .map(|d| d.as_secs_f64() * 1e3 / window.as_secs_f64())
        .collect();
    let mean = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    (mean, rates.iter().copied().fold(0.0, f64::max))
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// How long the density pods' idle CPU is measured.
const IDLE_WINDOW: Duration = Duration::from_secs(10);

/// Appends the memory-per-pod and density sections to the benchmark report.
pub fn density_section(r: &mut String, pods: usize, image: &str, progress: &dyn Fn(&str)) {
    use std::fmt::Write as _;
    let ns = crate::netns::NetNs::new("kvdensity");
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    let c = Containerd::start_cri_with_images("density", &ns.name, image);
    let cfg_path = c.dir.join("shim.toml");
    let base = std::fs::read_to_string(&cfg_path).expect("shim config");
    let _ = writeln!(
        r,
        "## Memory per idle pod (busybox, `sleep`; qemu back end here)\n"
    );
    let _ = writeln!(
        r,
        "| guest memory | shim RSS / PSS | VM process (QEMU) RSS / PSS | host PSS per pod | shim threads |"
    );
    let _ = writeln!(r, "| --- | --- | --- | --- | --- |");
    let mut shim_threads = String::new();
    for guest_mib in [128u64, 512] {
        progress(&format!("memory of an idle pod with {guest_mib} MiB ..."));
        std::fs::write(
            &cfg_path,
            format!("{base}default_memory_mib = {guest_mib}\n"),
        )
        .expect("shim config");
        let batch = start_pods(&c, &format!("mem{guest_mib}"), 1, image);
        if let Some(e) = batch.failed.first() {
            let _ = writeln!(r, "| {guest_mib} MiB | failed: {e} | - | - | - |");
            continue;
        }
        // Idle: the guest has booted and the container sleeps.
        std::thread::sleep(Duration::from_secs(3));
        let (shim, vm) = pod_processes_memory(&c);
        let threads = c.pod_pids().0.first().map_or_else(Default::default, |p| {
            crate::threads::once_calls_left(*p, Duration::from_secs(10))
                .unwrap_or_else(|still_calling| still_calling)
        });
        let _ = writeln!(
            r,
            "| {guest_mib} MiB | {} / {} | {} / {} | {} | {} |",
            mib(shim.rss),
            mib(shim.pss),
            mib(vm.rss),
            mib(vm.pss),
            mib(shim.pss + vm.pss),
            threads.values().sum::<usize>()
        );
        shim_threads = crate::threads::summary(&threads);
        let pods: Vec<String> = batch.started.iter().map(|s| s.pod.clone()).collect();
        remove_pods(&c, &pods);
    }
    std::fs::write(&cfg_path, &base).expect("shim config");
    let _ = writeln!(
        r,
        "\nThe shim is our code (its device back ends serve QEMU over vhost-user); the VM \
         process is QEMU with TCG here, whose RSS includes the guest memory the guest touched \
         and has not reported free (free page reporting gives that back) and TCG's \
         translation cache. On a native-KVM host the builtin VMM runs inside the shim \
         (see the VMM section for its own overhead).\n"
    );
    let _ = writeln!(r, "The idle shim's threads, by name: {shim_threads}.\n");

    progress(&format!("density: {pods} pods at once ..."));
    let batch = start_pods(&c, "dense", pods, image);
    let (shim, vm) = pod_processes_memory(&c);
    // Idle once all have started: guests that booted on the busy host must still idle
    // tickless (vmm/src/tsc.rs).
    progress(&format!(
        "density: CPU of {pods} idle pods over {IDLE_WINDOW:?} ..."
    ));
    std::thread::sleep(Duration::from_secs(2));
    let (shim0, vm0) = pod_processes_cpu(&c);
    std::thread::sleep(IDLE_WINDOW);
    let (shim1, vm1) = pod_processes_cpu(&c);
    let shim_cpu = cpu_rate(&shim0, &shim1, IDLE_WINDOW);
    let vm_cpu = cpu_rate(&vm0, &vm1, IDLE_WINDOW);
    let mut took: Vec<Duration> = batch.started.iter().map(|s| s.took).collect();
    took.sort();
    let ids: Vec<String> = batch.started.iter().map(|s| s.pod.clone()).collect();
    let t0 = Instant::now();
    let remove_errors = remove_pods(&c, &ids);
    let removal = t0.elapsed();
    let _ = writeln!(
        r,
        "## Density: {pods} pods started at once through the CRI\n"
    );
    let _ = writeln!(
        r,
        "| pods running | wall time to all outputs | fastest / slowest pod | host PSS per pod (shim + VM) | idle host CPU per pod (shim + VM) | removal of all |"
    );
    let _ = writeln!(r, "| --- | --- | --- | --- | --- | --- |");
    let n = batch.started.len().max(1) as u64;
    let _ = writeln!(
        r,
        "| {} of {pods} | {:.1} s | {:.1} s / {:.1} s | {} + {} | {:.1} + {:.1} ms/s (most {:.1} + {:.1}) | {:.1} s{} |",
        batch.started.len(),
        batch.wall.as_secs_f64(),
        took.first().map_or(0.0, |d| d.as_secs_f64()),
        took.last().map_or(0.0, |d| d.as_secs_f64()),
        mib(shim.pss / n),
        mib(vm.pss / n),
        shim_cpu.0,
        vm_cpu.0,
        shim_cpu.1,
        vm_cpu.1,
        removal.as_secs_f64(),
        if remove_errors.is_empty() {
            String::new()
        } else {
            format!(" ({} failed)", remove_errors.len())
        }
    );
    for e in batch.failed.iter().chain(&remove_errors) {
        let _ = writeln!(r, "\n- {e}");
    }
    let _ = writeln!(
        r,
        "\n{pods} TCG guests boot on this host's CPUs at once, so the wall time is CPU-bound \
         here; on a native-KVM host guest boot is a small part of it. Idle CPU is the pods' \
         processes' over {IDLE_WINDOW:?} once all have started: a guest that lost its TSC \
         or LAPIC timer while booting on the busy host keeps a periodic tick, ~30 ms/s (`most` \
         is the busiest single pod).\n"
    );
}
