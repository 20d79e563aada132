//! The host's TSC rate, for guests under TCG. QEMU's TCG gives a guest the host's own TSC,
//! but on a busy host the guest loses it in two ways, and then runs on refined-jiffies with
//! no high-resolution timers and a periodic tick that costs an idle pod ~30 ms of
//! host CPU every second for its whole life:
//! - calibrating the TSC against the emulated PIT fails when the vCPU thread is descheduled
//!   mid-measure ("Unable to calibrate against PIT");
//! - the clocksource watchdog compares the TSC with jiffies, which fall behind whenever the
//!   vCPU thread waits for a host CPU, and marks the TSC unstable ("skew is too large").
//!
//! Where the host's TSC ticks at one rate (then the guest's does too), the guest is told the
//! rate (`tsc_early_khz=`) and that the TSC is reliable (`tsc=reliable`: no watchdog).

use std::sync::OnceLock;
use std::time::Duration;

/// How long the rate is measured: with each reading paired within ~100 ns, ~5 ppm, close to
/// what the guest's own calibration achieves on an idle host.
const WINDOW: Duration = Duration::from_millis(20);

/// Where the host kernel lists the clocksources it still trusts (an unstable TSC drops out).
const CLOCKSOURCES: &str = "/sys/devices/system/clocksource/clocksource0/available_clocksource";

/// The host TSC's rate in kHz, measured once per process; `None` where the TSC does not tick
/// at a constant rate through sleep states or the host kernel does not trust it (then the
/// guest is better off calibrating and watching it).
pub fn host_tsc_khz() -> Option<u32> {
    static KHZ: OnceLock<Option<u32>> = OnceLock::new();
    *KHZ.get_or_init(|| {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        let clocksources = std::fs::read_to_string(CLOCKSOURCES).ok()?;
        reliable(&cpuinfo, &clocksources).then(measure).flatten()
    })
}

/// Whether `/proc/cpuinfo` says the TSC ticks at one rate, also in deep idle, and the host
/// kernel still offers it as a clocksource.
fn reliable(cpuinfo: &str, clocksources: &str) -> bool {
    let constant = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| {
            let flags: Vec<&str> = l.split_whitespace().collect();
            flags.contains(&"constant_tsc") && flags.contains(&"nonstop_tsc")
        });
    constant && clocksources.split_whitespace().any(|c| c == "tsc")
}

fn monotonic_raw_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_RAW, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A TSC reading and the clock's time at it: of 16 tries (a few microseconds), the one whose
/// clock readings around it were closest, so that a preemption or interrupt in one try
/// cannot skew the rate the shim keeps for the host's whole uptime.
#[cfg(target_arch = "x86_64")]
fn paired() -> (u64, u64) {
    (0..16)
        .map(|_| {
            let before = monotonic_raw_ns();
            // SAFETY: RDTSC reads a counter; it has no memory effects.
            let tsc = unsafe { core::arch::x86_64::_rdtsc() };
            let after = monotonic_raw_ns();
            (after - before, (before + after) / 2, tsc)
        })
        .min()
        .map(|(_, ns, tsc)| (ns, tsc))
        .unwrap_or_default()
}

#[cfg(target_arch = "x86_64")]
fn measure() -> Option<u32> {
    let (ns0, tsc0) = paired();
    std::thread::sleep(WINDOW);
    let (ns1, tsc1) = paired();
    let khz = u128::from(tsc1.checked_sub(tsc0)?) * 1_000_000 / u128::from(ns1.checked_sub(ns0)?);
    u32::try_from(khz).ok().filter(|&k| k > 0)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure() -> Option<u32> {
    None
}

/// The guest command line options for a guest whose TSC is the host's, ticking at `khz`.
pub fn guest_options(khz: u32) -> String {
    format!("tsc_early_khz={khz} tsc=reliable")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_constant_nonstop_trusted_tsc_counts() {
        let flags = "processor: 0\nflags\t\t: fpu tsc constant_tsc nonstop_tsc\n";
        assert!(reliable(flags, "tsc kvm-clock \n"));
        assert!(!reliable(flags, "kvm-clock hpet\n"));
        assert!(!reliable("flags\t\t: fpu tsc constant_tsc\n", "tsc\n"));
        assert!(!reliable("processor: 0\n", "tsc\n"));
        assert_eq!(
            guest_options(2_100_000),
            "tsc_early_khz=2100000 tsc=reliable"
        );
    }

    #[test]
    fn two_measurements_agree() {
        let Some(first) = host_tsc_khz() else {
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
            let sources = std::fs::read_to_string(CLOCKSOURCES).unwrap();
            assert!(
                !reliable(&cpuinfo, &sources),
                "a reliable TSC was not measured"
            );
            eprintln!("skipped: this host's TSC is not constant or not trusted by its kernel");
            return;
        };
        assert!((100_000..20_000_000).contains(&first), "{first} kHz");
        let again = measure().unwrap();
        let ppm = (i64::from(again) - i64::from(first)).abs() * 1_000_000 / i64::from(first);
        assert!(ppm < 100, "{first} kHz, then {again} kHz");
    }
}
