//! `make bench`: how fast and how lean the VMM is, side by side with peers measured in the
//! same run. Prints a table and writes target/bench/report.md.
//!
//! usage: kubevirt-bench [--runs N] [--only vmm|blk|pod] [--blk-rounds N] [--blk-secs S]
//!                       [--blk-workloads TEXT] [--pod-runs N]
//!        kubevirt-bench --serve-blk IMAGE SOCKET   (our vhost-user-blk back end, for the bench)

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::blkbench::{self, Backend, Image, Outcome, Workload, WORKLOADS};
use tests::chart::Ratio;
use tests::measure::{self, median, Sample};
use vmm::{SerialOutput, VmConfig};

struct Subject {
    name: &'static str,
    cmd: Box<dyn Fn() -> Command>,
    /// Exit code that means the guest ran and ended as intended.
    ok_code: i32,
}

struct Row {
    name: String,
    wall: Duration,
    /// Exec to the guest's byte on stdout.
    first_output: Option<Duration>,
    cpu: Duration,
    rss_kib: Option<u64>,
}

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().join(name);
    assert!(p.exists(), "{} missing: run `make build`", p.display());
    p
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

/// Runs every subject `runs` times for time, then `runs` times (traced) for peak RSS, one
/// subject after the other in each round: a host whose load drifts over seconds (a shared,
/// nested one) weighs on every subject alike, so their ratios hold from run to run.
fn measure_subjects(subjects: &[Subject], runs: usize) -> Vec<Row> {
    let names: Vec<&str> = subjects.iter().map(|s| s.name).collect();
    progress(&format!("{} x {runs}, in turn ...", names.join(", ")));
    let mut timing: Vec<Vec<Sample>> = subjects.iter().map(|_| Vec::new()).collect();
    let mut rss: Vec<Vec<u64>> = subjects.iter().map(|_| Vec::new()).collect();
    for traced in [false, true] {
        for _ in 0..runs {
            for (i, s) in subjects.iter().enumerate() {
                let (sample, code, out) = measure::run((s.cmd)(), traced).expect("run subject");
                assert_eq!(code, s.ok_code, "{}: exit code {code}", s.name);
                assert_eq!(out, b"K", "{}: the guest's byte", s.name);
                if traced {
                    rss[i].push(sample.peak_rss_kib);
                } else {
                    timing[i].push(sample);
                }
            }
        }
    }
    subjects
        .iter()
        .zip(timing.iter().zip(&rss))
        .map(|(s, (timing, rss))| Row {
            name: s.name.to_string(),
            wall: median(&timing.iter().map(|t| t.wall).collect::<Vec<_>>()),
            first_output: timing
                .iter()
                .map(|t| t.first_output)
                .collect::<Option<Vec<_>>>()
                .map(|f| median(&f)),
            cpu: median(&timing.iter().map(|t| t.cpu).collect::<Vec<_>>()),
            rss_kib: Some(median(rss)),
        })
        .collect()
}

/// The shim's case: a VM built and run inside an already running process.
fn measure_embedded(guest: &Path, runs: usize) -> Row {
    progress(&format!("embedded x {runs} ..."));
    let mut walls = Vec::new();
    let mut cpus = Vec::new();
    for _ in 0..runs {
        let console = tests::Console::default();
        let mut cfg = VmConfig::new(guest);
        cfg.serial_output = SerialOutput::Writer(Box::new(console.clone()));
        let (c0, t0) = (measure::self_cpu(), Instant::now());
        let exit = vmm::build_microvm(cfg).unwrap().start().unwrap().wait();
        walls.push(t0.elapsed());
        cpus.push(measure::self_cpu() - c0);
        // Let the previous VM's teardown finish outside the next measurement.
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            exit.is_clean() && console.text() == "K",
            "embedded run: {exit}"
        );
    }
    Row {
        name: "kubevirt-vmm embedded (in-process)".into(),
        wall: median(&walls),
        first_output: None,
        cpu: median(&cpus),
        rss_kib: None,
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

fn flag<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    let i = args.iter().position(|a| a == name)?;
    let v = args
        .get(i + 1)
        .unwrap_or_else(|| panic!("{name} needs a value"));
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}: bad value {v:?}")),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--serve-blk") {
        let (image, socket) = (&args[i + 1], &args[i + 2]);
        blkbench::serve_ours(Path::new(image), Path::new(socket));
        return;
    }
    let only: Option<String> = flag(&args, "--only");
    let mut r = String::new();
    let mut chart: Vec<Ratio> = Vec::new();
    let _ = writeln!(r, "# kubevirt-shim benchmark report\n");
    let want = |s: &str| only.as_deref().is_none_or(|o| o == s);
    if want("vmm") {
        vmm_section(&mut r, flag(&args, "--runs").unwrap_or(40), &mut chart);
    }
    if want("kernel") {
        let doctor = Command::new(bin("kubevirt-vmm"))
            .args(["doctor", "--verdict"])
            .output()
            .unwrap();
        let native = String::from_utf8_lossy(&doctor.stdout).trim() == "builtin";
        progress("real kernel early boot ...");
        tests::bootbench::kernel_section(
            &mut r,
            flag(&args, "--kernel-runs").unwrap_or(3),
            native,
            &mut chart,
        );
    }
    if want("pod") {
        tests::podbench::pod_section(&mut r, flag(&args, "--pod-runs").unwrap_or(5), &progress);
    }
    if want("net") {
        tests::netbench::throughput_section(
            &mut r,
            flag(&args, "--net-rounds").unwrap_or(3),
            "localhost/busybox:bench",
            &progress,
        );
    }
    if want("density") {
        tests::density::density_section(
            &mut r,
            flag(&args, "--pods").unwrap_or(20),
            "localhost/busybox:bench",
            &progress,
        );
    }
    if want("blk") {
        let only: Option<String> = flag(&args, "--blk-workloads");
        let workloads: Vec<_> = WORKLOADS
            .into_iter()
            .filter(|w| only.as_deref().is_none_or(|o| w.name.contains(o)))
            .collect();
        blk_section(
            &mut r,
            &workloads,
            flag(&args, "--blk-rounds").unwrap_or(5),
            Duration::from_secs_f64(flag(&args, "--blk-secs").unwrap_or(2.0)),
            &mut chart,
        );
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    if !chart.is_empty() {
        match tests::chart::write(&chart, &dir, "chart") {
            Ok(()) => {
                let _ = writeln!(
                    r,
                    "## Chart\n\n![ours vs the peers](chart.png)\n\nEach bar: how many times \
                     better ours is than the peer in this run (green where it meets its target).\n"
                );
            }
            Err(e) => {
                let _ = writeln!(r, "## Chart\n\nnot drawn: {e}\n");
            }
        }
    }
    println!("{r}");
    std::fs::write(dir.join("report.md"), &r).unwrap();
    progress(&format!(
        "report written to {}",
        dir.join("report.md").display()
    ));
}

/// `kubevirt-min-vmm` running `guest` with `options` (see its doc) set.
fn floor_subject(
    name: &'static str,
    floor: &Path,
    guest: &Path,
    options: &'static [&'static str],
) -> Subject {
    let (floor, guest) = (floor.to_owned(), guest.to_owned());
    Subject {
        name,
        cmd: Box::new(move || {
            let mut c = Command::new(&floor);
            c.arg(&guest).arg("128");
            c.envs(options.iter().map(|o| (o, "1")));
            c
        }),
        ok_code: 0,
    }
}

/// Exec-to-exit time, CPU and peak RSS of our VMM next to QEMU and a minimal floor VMM.
fn vmm_section(r: &mut String, runs: usize, chart: &mut Vec<Ratio>) {
    let guest = vmm::guests::test_guest("hello");
    let (vmm_bin, floor_bin) = (bin("kubevirt-vmm"), bin("kubevirt-min-vmm"));
    let doctor = Command::new(&vmm_bin)
        .args(["doctor", "--verdict"])
        .output()
        .unwrap();
    let native = String::from_utf8_lossy(&doctor.stdout).trim() == "builtin";
    let qemu_version = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        });
    let g = guest.clone();
    let g2 = guest.clone();
    let subjects = [
        Subject {
            name: "kubevirt-vmm run (builtin)",
            cmd: Box::new(move || {
                let mut c = Command::new(&vmm_bin);
                c.arg("run")
                    .arg("--kernel")
                    .arg(&g)
                    .args(["--memory", "128"]);
                c
            }),
            ok_code: 0,
        },
        Subject {
            name: "QEMU -M microvm -accel kvm",
            cmd: Box::new(move || {
                let mut c = Command::new("qemu-system-x86_64");
                // Without IA32_ARCH_CAPABILITIES: some nested KVMs (AMD hosts under PVM)
                // list the MSR but refuse the value QEMU 7.2 sets, and QEMU aborts. The
                // tiny guest never reads it.
                c.args([
                    "-M",
                    "microvm,x-option-roms=off,rtc=off",
                    "-accel",
                    "kvm",
                    "-cpu",
                    "host,arch-capabilities=off",
                ])
                .args(["-m", "128", "-smp", "1", "-nodefaults", "-no-user-config"])
                .args(["-display", "none", "-no-reboot", "-serial", "stdio"])
                .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel"])
                .arg(&g2);
                c
            }),
            // isa-debug-exit: QEMU exits with (value << 1) | 1.
            ok_code: 1,
        },
        floor_subject(
            "floor: minimal VMM (KVM, 1 slot, 1 vCPU)",
            &floor_bin,
            &guest,
            &[],
        ),
        floor_subject(
            "floor + in-kernel irqchip and PIT",
            &floor_bin,
            &guest,
            &["MIN_VMM_IRQCHIP"],
        ),
        floor_subject(
            "floor + irqchip, PIT, 64-bit entry, vCPU thread",
            &floor_bin,
            &guest,
            &["MIN_VMM_IRQCHIP", "MIN_VMM_LONG", "MIN_VMM_THREAD"],
        ),
    ];
    let mut rows = measure_subjects(&subjects, runs);
    rows.push(measure_embedded(&guest, runs));
    let (ours, qemu, floor, floor_irq) = (&rows[0], &rows[1], &rows[2], &rows[3]);
    let (skeleton, embedded) = (&rows[4], &rows[5]);
    let cpu_ratio = ours.cpu.as_secs_f64() / floor.cpu.as_secs_f64().max(1e-6);
    let rss_mib = ours.rss_kib.unwrap_or(0) as f64 / 1024.0;

    let _ = writeln!(
        r,
        "Host KVM: {} (doctor). QEMU: {}.\n",
        if native {
            "runs guest code natively"
        } else {
            "emulates guest code (PVM-style nested host): absolute times include KVM's emulator"
        },
        qemu_version.unwrap_or_else(|_| "not found".into())
    );
    let _ = writeln!(r, "## VMM start-up: exec -> guest ran -> exit\n");
    let _ = writeln!(
        r,
        "Tiny guest (`vmm/guests/hello.S`: one byte to COM1, then reset), 128 MiB guest memory, \
         1 vCPU, median of {runs} runs each, all subjects in this run and in turn.\n"
    );
    let _ = writeln!(
        r,
        "| subject | exec -> guest's byte | exec -> exit | CPU time | peak RSS |"
    );
    let _ = writeln!(r, "|---|---:|---:|---:|---:|");
    for row in &rows {
        let rss = row.rss_kib.map_or("n/a".into(), |k| format!("{k} KiB"));
        let first = row.first_output.map_or("n/a".into(), ms);
        let _ = writeln!(
            r,
            "| {} | {first} | {} | {} | {} |",
            row.name,
            ms(row.wall),
            ms(row.cpu),
            rss
        );
    }
    let _ = writeln!(
        r,
        "\nexec -> exit includes the VM's teardown, where KVM waits for grace periods \
         (wall time, little CPU) as it unregisters the PIT: compare the floor with one."
    );
    let _ = writeln!(r, "\n### Against the targets\n");
    if let Some(first) = ours.first_output {
        let _ = writeln!(
            r,
            "- exec -> the guest's byte (the guest ran): {} (DESIGN.md: VMM start to first \
             guest instruction under 5 ms): {}",
            ms(first),
            verdict(first < Duration::from_millis(5))
        );
    }
    let _ = writeln!(
        r,
        "- CPU time vs the floor: {cpu_ratio:.2}x (target <= 1.2x): {}",
        verdict(cpu_ratio <= 1.2)
    );
    let _ = writeln!(
        r,
        "  - breakdown: the floor plus KVM's in-kernel irqchip and PIT (which every Linux \
         guest needs) takes {} (where that is less than the floor alone: a vCPU without \
         KVM's local APIC makes the kernel patch its code on every CPU as the VM is made \
         and again as it goes). With the rest of what issue 2 asks of the VMM's skeleton, \
         the 64-bit entry on page tables and the vCPU on a thread of its own, the floor \
         takes {} ({:.2}x the floor alone). The other {} are ours: the two seccomp \
         filters (vCPU and VMM thread; the kernel compiles each and runs it once per call \
         number), CPUID, MSR, FPU and LAPIC state, the boot structures (zero page, e820, MP table, command line), eventfds \
         and epoll, and the larger program's start (KVM's supported CPUID, whose host \
         CPUIDs each trap to the outer hypervisor on a nested host, comes from the file \
         kept per host boot). Embedded in a running process (the shim's case) a VM costs \
         {} CPU from build to exit, {:.2}x the floor's whole process.",
        ms(floor_irq.cpu),
        ms(skeleton.cpu),
        skeleton.cpu.as_secs_f64() / floor.cpu.as_secs_f64().max(1e-6),
        ms(ours.cpu.saturating_sub(skeleton.cpu)),
        ms(embedded.cpu),
        embedded.cpu.as_secs_f64() / floor.cpu.as_secs_f64().max(1e-6)
    );
    let _ = writeln!(
        r,
        "- peak RSS: {rss_mib:.2} MiB (target <= 2.5 MiB): {}",
        verdict(rss_mib <= 2.5)
    );
    chart.extend([
        Ratio::new(
            "VMM exec -> exit, vs QEMU microvm",
            qemu.wall.as_secs_f64() / ours.wall.as_secs_f64(),
            1.0,
        ),
        Ratio::new(
            "VMM CPU time, vs QEMU microvm",
            qemu.cpu.as_secs_f64() / ours.cpu.as_secs_f64().max(1e-6),
            1.0,
        ),
        Ratio::new(
            "VMM peak RSS, vs QEMU microvm",
            qemu.rss_kib.unwrap_or(0) as f64 / ours.rss_kib.unwrap_or(1).max(1) as f64,
            1.0,
        ),
        Ratio::new(
            "VMM CPU time, vs the minimal VMM (floor)",
            1.0 / cpu_ratio,
            1.0 / 1.2,
        ),
    ]);
    let _ = writeln!(
        r,
        "- vs QEMU microvm: {:.1}x less wall time, {:.1}x less CPU, {:.1}x less peak RSS",
        qemu.wall.as_secs_f64() / ours.wall.as_secs_f64(),
        qemu.cpu.as_secs_f64() / ours.cpu.as_secs_f64().max(1e-6),
        qemu.rss_kib.unwrap_or(0) as f64 / ours.rss_kib.unwrap_or(1).max(1) as f64
    );
}

/// Median of each workload's IOPS, MB/s and CPU per request over its runs.
fn median_outcomes(workloads: &[Vec<Outcome>]) -> Vec<Outcome> {
    workloads
        .iter()
        .map(|runs| {
            let pick = |f: fn(&Outcome) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
            Outcome {
                iops: pick(|o| o.iops),
                mbps: pick(|o| o.mbps),
                cpu_us_per_io: pick(|o| o.cpu_us_per_io),
            }
        })
        .collect()
}

/// Our vhost-user-blk back end next to qemu-storage-daemon's, driven by the same harness.
/// `workloads`: those of [`WORKLOADS`] to run (`--blk-workloads` picks by name).
fn blk_section(
    r: &mut String,
    workloads: &[Workload],
    rounds: usize,
    secs: Duration,
    chart: &mut Vec<Ratio>,
) {
    const IMAGE_MIB: u64 = 256;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    progress(&format!("block: writing a {IMAGE_MIB} MiB test image ..."));
    let image = Image::create(dir.join("blk-test.img"), IMAGE_MIB << 20).expect("test image");
    let qsd_version = Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .map(|o| {
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            out.lines().next().unwrap_or("").to_string()
        })
        .unwrap_or_else(|_| "not found".into());
    let warmup = Duration::from_millis(500);
    // Both back ends are up at once and each workload alternates between them (ours first
    // in even rounds, second in odd ones), so a slow spell of this shared host falls on
    // both rather than on whichever ran through all its workloads then.
    let pid = std::process::id();
    let mut sessions = [Backend::Ours, Backend::QemuStorageDaemon].map(|b| {
        let socket = dir.join(format!("blk-{pid}-{}.sock", b.name()));
        blkbench::Session::start(b, &image.path, socket, true)
            .unwrap_or_else(|e| panic!("{}: {e}", b.name()))
    });
    // results[back end][workload]: that workload's runs.
    let mut results: [Vec<Vec<Outcome>>; 2] = Default::default();
    for w in workloads {
        let mut runs: [Vec<Outcome>; 2] = Default::default();
        progress(&format!("block: {}, {rounds} rounds ...", w.name));
        for round in 0..rounds {
            for k in 0..sessions.len() {
                let b = if round % 2 == 0 {
                    k
                } else {
                    sessions.len() - 1 - k
                };
                let s = &mut sessions[b];
                let o = s
                    .run(w, warmup, secs)
                    .unwrap_or_else(|e| panic!("{}: {e}", s.backend.name()));
                progress(&format!(
                    "  {} {}: {:.0} IOPS, {:.1} MB/s, {:.1} us CPU/IO",
                    s.backend.name(),
                    w.name,
                    o.iops,
                    o.mbps,
                    o.cpu_us_per_io
                ));
                runs[b].push(o);
            }
        }
        for (r, runs) in results.iter_mut().zip(runs) {
            r.push(runs);
        }
    }
    drop(sessions);
    drop(image);
    let ours = median_outcomes(&results[0]);
    let qsd = median_outcomes(&results[1]);

    let _ = writeln!(
        r,
        "\n## virtio-blk over vhost-user: ours vs qemu-storage-daemon\n"
    );
    let _ = writeln!(
        r,
        "One host-side driver (tests/src/blkbench: vhost-user front end, one split virtqueue \
         of {} entries in a shared memfd, EVENT_IDX negotiated, requests written and reaped \
         by one thread) drives each back end over its unix socket. Ours: \
         `vmm::vhost_user::serve` on `devices::block::Block` in a process of its own \
         (`kubevirt-bench --serve-blk`); a small request the driver waits on alone (a read \
         the page cache holds, a write of whole pages) is answered on the queue's thread, \
         every other one by the disk's two I/O threads (devices/src/block/inline.rs), and \
         after answering, the queue's thread keeps reading the ring for an adaptive window \
         of up to {} us before it sleeps (vmm/src/vhost_user/poll.rs), so a driver that \
         comes straight back needs no wake-up. Peer: {qsd_version}, `--blockdev \
         driver=file,cache.direct=off --export type=vhost-user-blk` (its vhost-user export \
         does not poll the ring; with an `iothread`, which polls its own AIO events, it \
         measured the same here). Both serve the same \
         {IMAGE_MIB} MiB raw file (fully written first) with buffered I/O, so the page \
         cache is in play for both: reads are served from memory and writes land in the \
         cache (no flush is sent). Both back ends run side by side and each workload \
         alternates between them, {rounds} runs each (ours first in every other round); \
         each run starts from clean cached pages (the image is written back before it) and \
         measures {:.1} s after a {} ms warm-up. Figures are medians of the runs. CPU/IO is \
         the back-end process's user+system time per request. At queue depth 1 every request \
         wakes the driver, and the back end too unless it is still polling the ring; on this \
         nested host waking an idle CPU (an IPI through the outer hypervisor) costs more than \
         the request itself, and where the scheduler puts the threads varies from run to run \
         (and with it ours' share of requests seen by polling), so the QD1 workloads also run \
         with the driver and every back-end thread on one CPU (`one CPU` rows), which \
         measures the back end's own path.\n",
        blkbench::driver::QUEUE_SIZE,
        vmm::vhost_user::MAX_POLL_WINDOW.as_micros(),
        secs.as_secs_f64(),
        warmup.as_millis()
    );
    let _ = writeln!(
        r,
        "| workload | ours | qemu-storage-daemon | ours / qsd | ours CPU/IO | qsd CPU/IO |"
    );
    let _ = writeln!(r, "|---|---:|---:|---:|---:|---:|");
    let mut worst = f64::INFINITY;
    let mut behind = Vec::new();
    let mut why = Vec::new();
    // The reference copy's time, per size, timed once (it allocates 128 MiB).
    let mut copies = std::collections::HashMap::new();
    for (i, w) in workloads.iter().enumerate() {
        let (o, q) = (&ours[i], &qsd[i]);
        let ratio = o.iops / q.iops.max(1e-9);
        chart.push(Ratio::new(
            format!("blk {}, vs qemu-storage-daemon", w.name),
            ratio,
            1.0,
        ));
        worst = worst.min(ratio);
        if ratio < 1.0 {
            behind.push(format!("{} ({ratio:.2}x)", w.name));
            why.push(if w.shape.block >= 1 << 20 {
                let copy = *copies
                    .entry(w.shape.block)
                    .or_insert_with(|| copy_us(w.shape.block as usize));
                format!(
                    "{}: each request is one {} KiB copy between the page cache and guest memory \
                     in either back end, and a plain copy of that size takes {copy:.0} us on \
                     this host: {:.0}% of ours' {:.1} us CPU per request ({:.1} us for \
                     qemu-storage-daemon), so the copy bounds both and ours spends {} CPU \
                     per request",
                    w.name,
                    w.shape.block >> 10,
                    100.0 * copy / o.cpu_us_per_io.max(1e-9),
                    o.cpu_us_per_io,
                    q.cpu_us_per_io,
                    if o.cpu_us_per_io <= q.cpu_us_per_io {
                        "less"
                    } else {
                        "more"
                    }
                )
            } else if let Some(p) = pinned_twin(workloads, w) {
                format!(
                    "{}: ours {:.1} us CPU per request, qemu-storage-daemon {:.1} us; one \
                     request at a time is bound by the two wake-ups of idle CPUs each \
                     request takes here, and with everything on one CPU ours does {:.2}x \
                     qemu-storage-daemon's IOPS at {:.1} us CPU per request ({:.1} us)",
                    w.name,
                    o.cpu_us_per_io,
                    q.cpu_us_per_io,
                    ours[p].iops / qsd[p].iops.max(1e-9),
                    ours[p].cpu_us_per_io,
                    qsd[p].cpu_us_per_io
                )
            } else {
                format!(
                    "{}: ours {:.1} us CPU per request, qemu-storage-daemon {:.1} us",
                    w.name, o.cpu_us_per_io, q.cpu_us_per_io
                )
            });
        }
        let fmt = |x: &Outcome| {
            if w.shape.block >= 1 << 20 {
                format!("{:.0} MB/s", x.mbps)
            } else {
                format!("{:.0} IOPS", x.iops)
            }
        };
        let _ = writeln!(
            r,
            "| {} | {} | {} | {ratio:.2}x | {:.1} us | {:.1} us |",
            w.name,
            fmt(o),
            fmt(q),
            o.cpu_us_per_io,
            q.cpu_us_per_io
        );
    }
    let _ = writeln!(
        r,
        "\n- target (ours >= 1.0x qemu-storage-daemon on every workload, aim 1.5x): {} \
         (lowest ratio {worst:.2}x)",
        verdict(worst >= 1.0)
    );
    if !behind.is_empty() {
        let _ = writeln!(
            r,
            "  - behind on: {}. Where the time goes: {}. Differences within ~10% are inside \
             this host's run-to-run noise; see the per-round lines on stderr.",
            behind.join(", "),
            why.join("; ")
        );
    }
}

/// The index in `workloads` of the one-CPU run of unpinned workload `w`, if it has one.
fn pinned_twin(workloads: &[Workload], w: &Workload) -> Option<usize> {
    if w.one_cpu {
        return None;
    }
    workloads
        .iter()
        .position(|p| p.one_cpu && p.shape == w.shape && p.random == w.random)
}

/// Microseconds one `len`-byte memory copy takes here (median of 64, buffers larger than
/// the caches, as guest memory and the page cache are).
fn copy_us(len: usize) -> f64 {
    let span = 64 << 20;
    let src = vec![1u8; span];
    // Not zeroed: calloc's untouched pages would fault inside the timed copies.
    let mut dst = vec![2u8; span];
    let mut times = Vec::new();
    for i in 0..64 {
        let at = (i * len) % (span - len);
        let t = std::time::Instant::now();
        dst[at..at + len].copy_from_slice(std::hint::black_box(&src[at..at + len]));
        times.push(t.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box(&dst);
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}
