//! What the user asks for: the VM's configuration, apart from any live object.

use std::io::Write;
use std::path::PathBuf;

use crate::arch::cpuid::CpuFeature;
pub use crate::legacy::SerialInputSource;

/// Command line used when none is given: serial console, keyboard-controller reboot (which
/// ends the VM), panic reboots at once.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Where the guest's console output goes.
pub enum SerialOutput {
    Stdout,
    File(PathBuf),
    Writer(Box<dyn Write + Send>),
    Sink,
}

impl std::fmt::Debug for SerialOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stdout => f.write_str("Stdout"),
            Self::File(p) => write!(f, "File({})", p.display()),
            Self::Writer(_) => f.write_str("Writer"),
            Self::Sink => f.write_str("Sink"),
        }
    }
}

/// A microVM to build.
#[derive(Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub hugepages: bool,
    pub hidden_cpu_features: Vec<CpuFeature>,
    pub serial_output: SerialOutput,
    pub serial_input: Option<SerialInputSource>,
    /// Attach a virtio-rng device.
    pub rng: bool,
}

impl VmConfig {
    /// A 1-vCPU, 128 MiB VM for `kernel` with the default command line and console on stdout.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            memory_mib: 128,
            vcpus: 1,
            hugepages: false,
            hidden_cpu_features: Vec::new(),
            serial_output: SerialOutput::Stdout,
            serial_input: None,
            rng: false,
        }
    }
}
