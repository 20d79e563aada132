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

/// The memory of every shim and VM process of `c`'s pods.
pub fn pod_processes_memory(c: &Containerd) -> Memory {
    let dir = c.dir.display().to_string();
    let mut m = Memory::default();
    for pattern in [
        format!("containerd-shim-kubevirt-v1 .*{dir}"),
        format!("qemu-system.*{dir}"),
    ] {
        let out = std::process::Command::new("pgrep")
            .args(["-f", &pattern])
            .output()
            .expect("pgrep");
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
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
    }
    m
}
