//! Is this host fit to run microVMs, and does KVM run guest code natively or through its
//! instruction emulator? A calibration guest measures it; `auto` picks a back end from it.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{Cap, Kvm};

use crate::config::{SerialOutput, VmConfig};
use crate::qemu::Accel;
use crate::vm::REQUIRED_CAPS;

/// Instructions the calibration guest runs between its two marks (2 per loop iteration).
pub const CALIBRATION_INSTRUCTIONS: u64 = 2 * 100_000;
/// Below this rate guest code is emulated: hardware virtualization runs ~1e9/s, KVM's
/// emulator ~1e6/s, so the threshold sits far from both.
pub const NATIVE_THRESHOLD_IPS: f64 = 50e6;

/// Errors of the host checks.
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error("cannot create the calibration guest image: {0}")]
    Image(std::io::Error),
    #[error("calibration guest failed to build: {0}")]
    Build(#[from] crate::builder::BuildError),
    #[error("calibration guest failed to run: {0}")]
    Run(#[from] crate::vmm::VmmError),
    #[error("calibration guest ended with {0} before printing both marks")]
    NoMarks(String),
}

/// How fast KVM runs guest code here, and the host TSC's rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Calibration {
    pub elapsed: Duration,
    pub instructions_per_sec: f64,
    /// See [`crate::tsc::host_tsc_khz`]; measured only where guest code is emulated.
    pub tsc_khz: Option<u32>,
}

impl Calibration {
    pub fn native(&self) -> bool {
        self.instructions_per_sec >= NATIVE_THRESHOLD_IPS
    }

    /// How the qemu back end runs guest code here.
    pub fn accel(&self) -> Accel {
        if self.native() {
            Accel::Kvm
        } else {
            Accel::Tcg {
                host_tsc_khz: self.tsc_khz,
            }
        }
    }
}

/// Machine back end that `auto` resolves to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Builtin,
    Qemu,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Builtin => "builtin",
            Self::Qemu => "qemu",
        })
    }
}

/// Records when each console byte arrived.
#[derive(Clone, Default)]
struct Stamps(Arc<Mutex<Vec<(Instant, u8)>>>);

impl Write for Stamps {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let now = Instant::now();
        crate::bus::lock(&self.0).extend(buf.iter().map(|&b| (now, b)));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The calibration guest as a file KVM's loader can read (an anonymous memfd).
fn guest_image() -> Result<File, DoctorError> {
    let name = CString::new("kubevirt-calibrate").expect("no NUL in name");
    // SAFETY: `name` is a valid C string; the returned fd is checked and then owned by File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(DoctorError::Image(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(crate::guests::CALIBRATE)
        .map_err(DoctorError::Image)?;
    Ok(file)
}

/// Runs the calibration guest and measures the time between its two console marks.
pub fn calibrate() -> Result<Calibration, DoctorError> {
    let image = guest_image()?;
    let stamps = Stamps::default();
    let mut config = VmConfig::new(format!("/proc/self/fd/{}", image.as_raw_fd()));
    config.memory_mib = 16;
    // The calibration loop runs on the caller's thread, which must stay unconfined.
    config.seccomp = false;
    config.serial_output = SerialOutput::Writer(Box::new(stamps.clone()));
    let exit = crate::build_microvm(config)?.run()?;
    let marks = crate::bus::lock(&stamps.0).clone();
    let at = |m: u8| marks.iter().find(|(_, b)| *b == m).map(|(t, _)| *t);
    match (at(b'S'), at(b'E')) {
        (Some(s), Some(e)) if exit.is_clean() => {
            let elapsed = e - s;
            let secs = elapsed.as_secs_f64().max(1e-9);
            let mut cal = Calibration {
                elapsed,
                instructions_per_sec: CALIBRATION_INSTRUCTIONS as f64 / secs,
                tsc_khz: None,
            };
            // Only TCG guests are told the rate: native hosts skip the 20 ms measurement.
            if !cal.native() {
                cal.tsc_khz = crate::tsc::host_tsc_khz();
            }
            Ok(cal)
        }
        _ => Err(DoctorError::NoMarks(exit.to_string())),
    }
}

/// The back end `auto` chooses, with the reason in words.
pub fn choose_backend(cal: &Calibration) -> (Backend, String) {
    let rate = format!(
        "{:.1} M guest instructions/s",
        cal.instructions_per_sec / 1e6
    );
    if cal.native() {
        (
            Backend::Builtin,
            format!("KVM runs guest code natively ({rate})"),
        )
    } else {
        (
            Backend::Qemu,
            format!(
                "KVM here runs guest code through its instruction emulator ({rate}; native is \
                 ~1000 M/s), where a Linux guest cannot reach user space; QEMU's TCG boots it"
            ),
        )
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// Static checks of /dev/kvm: API version and capabilities.
pub fn kvm_checks() -> Vec<Check> {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            return vec![Check {
                name: "/dev/kvm".into(),
                ok: false,
                detail: format!("cannot open: {e}"),
            }]
        }
    };
    let api = kvm.get_api_version();
    let mut out = vec![Check {
        name: "/dev/kvm".into(),
        ok: api == 12,
        detail: format!("API version {api}"),
    }];
    for (cap, name) in REQUIRED_CAPS {
        let ok = kvm.check_extension(*cap);
        out.push(Check {
            name: format!("KVM_CAP_{name}"),
            ok,
            detail: if ok {
                "present".into()
            } else {
                "missing (required)".into()
            },
        });
    }
    let tsc = kvm.check_extension(Cap::TscDeadlineTimer);
    out.push(Check {
        name: "KVM_CAP_TSC_DEADLINE_TIMER".into(),
        ok: true,
        detail: if tsc {
            "present".into()
        } else {
            "missing (optional)".into()
        },
    });
    out.push(Check {
        name: "max vCPUs".into(),
        ok: true,
        detail: kvm.get_max_vcpus().to_string(),
    });
    out
}
