//! `kubevirt-vmm`: run a microVM from the command line, or check the host (`doctor`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use lexopt::prelude::*;
use vmm::arch::cpuid::parse_features;
use vmm::config;
use vmm::doctor;
use vmm::qemu::QemuVm;
use vmm::{SerialInputSource, SerialOutput, VmConfig};

const USAGE: &str = "\
usage: kubevirt-vmm run --kernel PATH [--initrd PATH] [--cmdline STR] [--memory MIB]
                        [--vcpus N] [--hugepages] [--cpu-hide FEATURES]
                        [--serial-out FILE] [--serial-in stdin|unix:PATH] [--rng]
                        [--free-page-reporting]
                        [--disk PATH[,ro][,id=NAME]]... [--net tap=NAME[,mac=MAC][,netns=PATH]]...
                        [--vsock cid=N,uds=PATH] [--machine builtin|qemu|auto]
       kubevirt-vmm doctor [--verdict]

run     boots the kernel (ELF vmlinux or bzImage) with the console on stdout (or FILE);
        exits 0 when the guest resets or powers off, non-zero with the reason otherwise.
        --cpu-hide takes a comma list of: xsave, cx16, avx, pmu.
        --free-page-reporting adds a virtio-balloon that only gives the memory the guest
        frees back to the host.
        --machine qemu runs the same kernel and devices on QEMU microvm, our devices served
        over vhost-user (KVM where native, TCG otherwise); auto picks as doctor does.
doctor  checks /dev/kvm, runs a calibration guest and says whether guest code runs
        natively or emulated, and which machine back end `auto` chooses.
        --verdict prints only that back end (builtin or qemu).";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Machine {
    Builtin,
    Qemu,
    Auto,
}

fn parse_run(mut p: lexopt::Parser) -> Result<(VmConfig, Machine)> {
    let mut kernel: Option<PathBuf> = None;
    let mut machine = Machine::Builtin;
    let mut cfg = VmConfig::new("");
    cfg.cpuid_cache = Some(vmm::supported_cpuid::DEFAULT_CACHE.into());
    while let Some(arg) = p.next()? {
        match arg {
            Long("kernel") => kernel = Some(p.value()?.into()),
            Long("initrd") => cfg.initrd = Some(p.value()?.into()),
            Long("cmdline") => cfg.cmdline = p.value()?.string()?,
            Long("memory") => cfg.memory_mib = p.value()?.parse().context("--memory takes MiB")?,
            Long("vcpus") => cfg.vcpus = p.value()?.parse().context("--vcpus takes 1 to 254")?,
            Long("hugepages") => cfg.hugepages = true,
            Long("rng") => cfg.rng = true,
            Long("free-page-reporting") => cfg.free_page_reporting = true,
            Long("disk") => cfg.disks.push(config::parse_disk(&p.value()?.string()?)?),
            Long("net") => cfg.nets.push(config::parse_net(&p.value()?.string()?)?),
            Long("vsock") => cfg.vsock = Some(config::parse_vsock(&p.value()?.string()?)?),
            Long("machine") => {
                machine = match p.value()?.string()?.as_str() {
                    "builtin" => Machine::Builtin,
                    "qemu" => Machine::Qemu,
                    "auto" => Machine::Auto,
                    other => bail!("--machine {other:?}: expected builtin, qemu or auto"),
                }
            }
            Long("cpu-hide") => cfg.hidden_cpu_features = parse_features(&p.value()?.string()?)?,
            Long("serial-out") => cfg.serial_output = SerialOutput::File(p.value()?.into()),
            Long("serial-in") => {
                let v = p.value()?.string()?;
                cfg.serial_input = Some(match v.strip_prefix("unix:") {
                    Some(path) => SerialInputSource::Socket(path.into()),
                    None if v == "stdin" => SerialInputSource::Stdin,
                    None => bail!("--serial-in {v:?}: expected stdin or unix:PATH"),
                });
            }
            Long("help") | Short('h') => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(arg.unexpected().into()),
        }
    }
    cfg.kernel = kernel.context("run needs --kernel PATH")?;
    Ok((cfg, machine))
}

fn run(p: lexopt::Parser) -> Result<ExitCode> {
    let (cfg, machine) = parse_run(p)?;
    let exit = match machine {
        Machine::Builtin => vmm::build_microvm(cfg)?.run()?,
        Machine::Qemu | Machine::Auto => {
            let c = doctor::calibrate()?;
            if machine == Machine::Auto && c.native() {
                vmm::build_microvm(cfg)?.run()?
            } else {
                QemuVm::start(cfg, c.accel())?.wait()
            }
        }
    };
    if !exit.is_clean() {
        eprintln!("kubevirt-vmm: {exit}");
    }
    Ok(ExitCode::from(exit.exit_code() as u8))
}

fn doctor_cmd(mut p: lexopt::Parser) -> Result<ExitCode> {
    let mut verdict_only = false;
    while let Some(arg) = p.next()? {
        match arg {
            Long("verdict") => verdict_only = true,
            _ => return Err(arg.unexpected().into()),
        }
    }
    let checks = doctor::kvm_checks();
    let kvm_ok = checks.iter().all(|c| c.ok);
    if !verdict_only {
        for c in &checks {
            println!(
                "{:<28} {:<4} {}",
                c.name,
                if c.ok { "ok" } else { "FAIL" },
                c.detail
            );
        }
    }
    if !kvm_ok {
        if verdict_only {
            println!("qemu");
        }
        println!("verdict: KVM is not usable here; `auto` chooses qemu (TCG)");
        return Ok(ExitCode::from(1));
    }
    let cal = doctor::calibrate().context("calibration guest")?;
    let (backend, why) = doctor::choose_backend(&cal);
    if verdict_only {
        println!("{backend}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<28} {:<4} {} instructions in {:.3} ms = {:.1} M/s",
        "calibration guest",
        "ok",
        doctor::CALIBRATION_INSTRUCTIONS,
        cal.elapsed.as_secs_f64() * 1e3,
        cal.instructions_per_sec / 1e6
    );
    match cal.tsc_khz {
        Some(khz) => println!(
            "{:<28} {:<4} {khz} kHz, constant: TCG guests are told its rate",
            "host TSC", "ok"
        ),
        None if cal.native() => {}
        None => println!(
            "{:<28} {:<4} not constant or not trusted: TCG guests calibrate it",
            "host TSC", "-"
        ),
    }
    println!(
        "guest code:                  {}",
        if cal.native() { "native" } else { "emulated" }
    );
    println!("machine back end (auto):     {backend}: {why}");
    Ok(ExitCode::SUCCESS)
}

/// Log records to stderr; `KUBEVIRT_VMM_LOG=debug|info|warn|error` sets the level.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!(
                "kubevirt-vmm: {}: {}",
                r.level().as_str().to_lowercase(),
                r.args()
            );
        }
    }
    fn flush(&self) {}
}

fn init_log() {
    let level = std::env::var("KUBEVIRT_VMM_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(log::LevelFilter::Warn);
    if log::set_logger(&StderrLog).is_ok() {
        log::set_max_level(level);
    }
}

/// The error and its causes, each cause once: our error messages already name their
/// source, which anyhow's `{:#}` would print a second time.
fn describe(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1).map(ToString::to_string) {
        if !msg.contains(&cause) {
            msg = format!("{msg}: {cause}");
        }
    }
    msg
}

fn main() -> ExitCode {
    init_log();
    let mut p = lexopt::Parser::from_env();
    let result = match p.next() {
        Ok(Some(Value(cmd))) if cmd == "run" => run(p),
        Ok(Some(Value(cmd))) if cmd == "doctor" => doctor_cmd(p),
        Ok(Some(Long("help") | Short('h'))) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(64);
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kubevirt-vmm: {}", describe(&e));
            ExitCode::from(1)
        }
    }
}
