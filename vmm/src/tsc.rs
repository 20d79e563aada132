//! The host's TSC rate, for guests under TCG. QEMU's TCG gives a guest the host's own TSC; a
//! guest that has to calibrate it against the emulated PIT fails when its vCPU thread is
//! descheduled mid-measure (a busy host), and then boots without a TSC clocksource: on
//! refined-jiffies, with no high-resolution timers and a periodic 250 Hz tick that costs an
//! idle pod ~30 ms of host CPU every second. Told the rate (`tsc_early_khz=`), the guest
//! skips the calibration.

use std::sync::OnceLock;
use std::time::Duration;

/// How long the rate is measured: with each reading paired within ~100 ns, ~10 ppm.
const WINDOW: Duration = Duration::from_millis(10);

/// The host TSC's rate in kHz, measured once per process; `None` where the TSC does not tick
/// at a constant rate through sleep states (then the guest is better off calibrating).
pub fn host_tsc_khz() -> Option<u32> {
    static KHZ: OnceLock<Option<u32>> = OnceLock::new();
    *KHZ.get_or_init(|| {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        constant_rate(&cpuinfo).then(measure).flatten()
    })
}

/// Whether `/proc/cpuinfo` says the TSC ticks at one rate, also in deep idle.
fn constant_rate(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| {
            let flags: Vec<&str> = l.split_whitespace().collect();
            flags.contains(&"constant_tsc") && flags.contains(&"nonstop_tsc")
        })
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

/// A TSC reading and the clock's time at it: of three tries, the one whose clock readings
/// around it were closest (no preemption in between).
#[cfg(target_arch = "x86_64")]
fn paired() -> (u64, u64) {
    (0..3)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_constant_nonstop_tsc_counts() {
        assert!(constant_rate(
            "processor: 0\nflags\t\t: fpu tsc constant_tsc nonstop_tsc\n"
        ));
        assert!(!constant_rate("flags\t\t: fpu tsc constant_tsc\n"));
        assert!(!constant_rate("processor: 0\n"));
    }

    #[test]
    fn two_measurements_agree() {
        let Some(first) = host_tsc_khz() else {
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
            assert!(!constant_rate(&cpuinfo), "a constant TSC was not measured");
            eprintln!("skipped: this host's TSC does not tick at a constant rate");
            return;
        };
        assert!((100_000..20_000_000).contains(&first), "{first} kHz");
        let again = measure().unwrap();
        let ppm = (i64::from(again) - i64::from(first)).abs() * 1_000_000 / i64::from(first);
        assert!(ppm < 1000, "{first} kHz, then {again} kHz");
    }
}
