//! What the user asks for: the VM's configuration, apart from any live object.

use std::io::Write;
use std::path::PathBuf;

use devices::rate_limit::{Rate, RateLimit, RateLimitError};

use crate::arch::cpuid::CpuFeature;
pub use crate::legacy::SerialInputSource;
pub use devices::block::BlockConfig;
pub use devices::net::{NetConfig, TapSource};
pub use devices::vsock::VsockConfig;

/// Errors in device options given as `key=value` lists.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{option} {value:?}: {reason}")]
    Invalid {
        option: &'static str,
        value: String,
        reason: String,
    },
}

fn invalid(option: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        option,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// `PATH[,ro][,id=NAME][,bw=RATE][,iops=RATE]`: a disk, optionally held to bytes and
/// requests per second (RATE as `20Mi`, `500`, see [`Rate`]).
pub fn parse_disk(value: &str) -> Result<BlockConfig, ConfigError> {
    let mut parts = value.split(',');
    let path = parts.next().filter(|p| !p.is_empty());
    let path = path.ok_or_else(|| {
        invalid(
            "--disk",
            value,
            "expected PATH[,ro][,id=NAME][,bw=RATE][,iops=RATE]",
        )
    })?;
    let mut cfg = BlockConfig {
        path: path.into(),
        read_only: false,
        id: None,
        slot: None,
        rate: RateLimit::default(),
    };
    for part in parts {
        match part.split_once('=') {
            None if part == "ro" => cfg.read_only = true,
            Some(("id", id)) if !id.is_empty() => cfg.id = Some(id.to_string()),
            Some(("bw", v)) => cfg.rate.bytes_per_sec = parse_rate("--disk", value, v)?,
            Some(("iops", v)) => cfg.rate.ops_per_sec = parse_rate("--disk", value, v)?,
            _ => return Err(invalid("--disk", value, format!("unknown option {part:?}"))),
        }
    }
    Ok(cfg)
}

/// A per-second rate inside option `option`'s `value`.
fn parse_rate(option: &'static str, value: &str, v: &str) -> Result<Option<u64>, ConfigError> {
    let r: Rate = v
        .parse()
        .map_err(|e: RateLimitError| invalid(option, value, e.to_string()))?;
    Ok(Some(r.0))
}

/// A MAC address written `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    (bytes.len() == 6 && s.split(':').all(|b| b.len() == 2)).then(|| bytes.try_into().ok())?
}

/// `tap=NAME[,mac=MAC][,netns=PATH][,rx_bw=RATE][,rx_pps=RATE][,tx_bw=RATE][,tx_pps=RATE]`:
/// a network interface on a tap, optionally held to bytes and frames per second each way.
pub fn parse_net(value: &str) -> Result<NetConfig, ConfigError> {
    let (mut tap, mut mac, mut netns) = (None, None, None);
    let (mut rx, mut tx) = (RateLimit::default(), RateLimit::default());
    for part in value.split(',') {
        match part.split_once('=') {
            Some(("tap", n)) if !n.is_empty() => tap = Some(n.to_string()),
            Some(("rx_bw", v)) => rx.bytes_per_sec = parse_rate("--net", value, v)?,
            Some(("rx_pps", v)) => rx.ops_per_sec = parse_rate("--net", value, v)?,
            Some(("tx_bw", v)) => tx.bytes_per_sec = parse_rate("--net", value, v)?,
            Some(("tx_pps", v)) => tx.ops_per_sec = parse_rate("--net", value, v)?,
            Some(("mac", m)) => {
                mac = Some(
                    parse_mac(m)
                        .ok_or_else(|| invalid("--net", value, format!("bad MAC {m:?}")))?,
                )
            }
            Some(("netns", p)) if !p.is_empty() => netns = Some(p.into()),
            _ => return Err(invalid("--net", value, format!("unknown option {part:?}"))),
        }
    }
    let name = tap.ok_or_else(|| invalid("--net", value, "tap=NAME is required"))?;
    Ok(NetConfig {
        tap: TapSource::Name { name, netns },
        mac,
        rx_rate: rx,
        tx_rate: tx,
    })
}

/// `cid=N,uds=PATH`: the vsock device.
pub fn parse_vsock(value: &str) -> Result<VsockConfig, ConfigError> {
    let (mut cid, mut uds) = (None, None);
    for part in value.split(',') {
        match part.split_once('=') {
            Some(("cid", c)) => {
                cid = Some(
                    c.parse()
                        .map_err(|_| invalid("--vsock", value, format!("bad cid {c:?}")))?,
                )
            }
            Some(("uds", p)) if !p.is_empty() => uds = Some(p.into()),
            _ => {
                return Err(invalid(
                    "--vsock",
                    value,
                    format!("unknown option {part:?}"),
                ))
            }
        }
    }
    match (cid, uds) {
        (Some(guest_cid), Some(uds_path)) => Ok(VsockConfig {
            guest_cid,
            uds_path,
        }),
        _ => Err(invalid("--vsock", value, "expected cid=N,uds=PATH")),
    }
}

/// Command line used when none is given: serial console, keyboard-controller reboot (which
/// ends the VM), panic reboots at once.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Command line of a pod's guest kernel (the shim's, and the tests' that boot that guest):
/// a panic halts (the VM's end is then seen by the shim), and `no_timer_check` because the
/// IO-APIC timer probe counts ticks against a busy loop, which a vCPU starved by a loaded
/// host (20 pods under TCG) failed: "IO-APIC + timer doesn't work!", a panic at boot. The
/// timer is KVM's or QEMU's: there is nothing to check.
pub const GUEST_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 no_timer_check quiet";

/// Where the guest's console output goes.
pub enum SerialOutput {
    Stdout,
    File(PathBuf),
    /// Bytes handed to a writer in the VMM's process (on the qemu back end, by a thread
    /// that reads QEMU's output).
    Writer(Box<dyn Write + Send>),
    /// A descriptor the console is written to directly: the builtin VMM's serial writes
    /// into it, and QEMU gets it as its output, so the bytes take no extra hop. A pipe
    /// that is full and non-blocking makes the builtin VMM drop what does not fit and
    /// QEMU's UART wait until there is room.
    Fd(std::os::fd::OwnedFd),
    Sink,
}

impl std::fmt::Debug for SerialOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stdout => f.write_str("Stdout"),
            Self::File(p) => write!(f, "File({})", p.display()),
            Self::Writer(_) => f.write_str("Writer"),
            Self::Fd(fd) => write!(f, "Fd({fd:?})"),
            Self::Sink => f.write_str("Sink"),
        }
    }
}

/// Called once right before the VM first touches its guest memory (builtin) or its process
/// starts (qemu): an embedder still moving itself into the cgroup the VM is to be charged to
/// waits for that here, so that the wait overlaps the devices' set-up.
pub struct StartGate(pub Box<dyn FnOnce() -> std::io::Result<()> + Send>);

impl std::fmt::Debug for StartGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StartGate")
    }
}

impl StartGate {
    pub(crate) fn pass(gate: Option<StartGate>) -> std::io::Result<()> {
        gate.map_or(Ok(()), |g| (g.0)())
    }
}

/// A microVM to build.
#[derive(Debug)]
pub struct VmConfig {
    /// What the VM is called where a process shows it (QEMU's `-name`, so `ps` tells whose
    /// VM a QEMU process is).
    pub name: String,
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
    /// Attach a virtio-balloon that only takes back the memory the guest reports free (ours
    /// on the builtin machine, QEMU's on the qemu machine).
    pub free_page_reporting: bool,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<BlockConfig>,
    /// virtio-net interfaces on taps.
    pub nets: Vec<NetConfig>,
    /// The virtio-vsock device (hybrid vsock on Unix sockets).
    pub vsock: Option<VsockConfig>,
    /// Confine every VMM thread with its seccomp filter before the guest runs.
    pub seccomp: bool,
    /// Run right before the VM starts (see [`StartGate`]).
    pub start_gate: Option<StartGate>,
    /// A file that keeps KVM's supported CPUID for the next VM of this host boot
    /// ([`crate::supported_cpuid`]); `None` asks KVM for every VM.
    pub cpuid_cache: Option<PathBuf>,
}

impl VmConfig {
    /// A 1-vCPU, 128 MiB VM for `kernel` with the default command line and console on stdout.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            name: "kubevirt".into(),
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
            free_page_reporting: false,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            seccomp: true,
            start_gate: None,
            cpuid_cache: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options() {
        let d = parse_disk("/x/disk.img,ro,id=data").unwrap();
        assert_eq!(
            (d.path.to_str(), d.read_only, d.id.as_deref()),
            (Some("/x/disk.img"), true, Some("data"))
        );
        assert!(!parse_disk("/d").unwrap().read_only);
        let e = parse_disk("/d,rw").unwrap_err().to_string();
        assert_eq!(e, "--disk \"/d,rw\": unknown option \"rw\"");
        assert!(parse_disk(",ro").is_err());
        let d = parse_disk("/d,bw=20Mi,iops=500").unwrap();
        assert_eq!(d.rate.bytes_per_sec, Some(20 << 20));
        assert_eq!(d.rate.ops_per_sec, Some(500));
        let e = parse_disk("/d,bw=0").unwrap_err().to_string();
        assert!(
            e.contains("--disk \"/d,bw=0\"") && e.contains("more than zero"),
            "{e}"
        );
    }

    #[test]
    fn net_options() {
        let n = parse_net("tap=tap0,mac=02:00:00:aa:bb:cc,netns=/var/run/netns/p").unwrap();
        assert_eq!(n.mac, Some([2, 0, 0, 0xaa, 0xbb, 0xcc]));
        match n.tap {
            TapSource::Name { name, netns } => {
                assert_eq!(name, "tap0");
                assert_eq!(netns.unwrap().to_str(), Some("/var/run/netns/p"));
            }
            TapSource::Fd(_) => panic!("expected a tap name"),
        }
        assert!(parse_net("mac=02:00:00:aa:bb:cc")
            .unwrap_err()
            .to_string()
            .contains("tap=NAME is required"));
        assert!(parse_net("tap=t,mac=02:00:00:aa:bb")
            .unwrap_err()
            .to_string()
            .contains("bad MAC"));
        assert!(parse_net("tap=t,mac=2:0:0:a:b:c").is_err());
        let n = parse_net("tap=t,rx_bw=1M,tx_bw=2Mi,tx_pps=100").unwrap();
        assert_eq!(n.rx_rate.bytes_per_sec, Some(1_000_000));
        assert_eq!(n.rx_rate.ops_per_sec, None);
        assert_eq!(n.tx_rate.bytes_per_sec, Some(2 << 20));
        assert_eq!(n.tx_rate.ops_per_sec, Some(100));
        let e = parse_net("tap=t,rx_pps=lots").unwrap_err().to_string();
        assert!(e.contains("\"lots\""), "{e}");
    }

    #[test]
    fn vsock_options() {
        let v = parse_vsock("cid=3,uds=/run/v.sock").unwrap();
        assert_eq!((v.guest_cid, v.uds_path.to_str()), (3, Some("/run/v.sock")));
        assert!(parse_vsock("cid=x,uds=/a")
            .unwrap_err()
            .to_string()
            .contains("bad cid"));
        assert!(parse_vsock("cid=3")
            .unwrap_err()
            .to_string()
            .contains("expected cid=N,uds=PATH"));
    }
}
