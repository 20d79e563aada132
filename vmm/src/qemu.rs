//! The `qemu` machine back end: the same guest kernel and our own virtio devices, served
//! over vhost-user to an external QEMU microvm (KVM where native, TCG otherwise). It exists
//! for hosts whose KVM emulates guest code, where a Linux guest cannot reach user space
//! under any KVM VMM.

use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use devices::virtio::device_type;

use crate::builder::{create_devices, BuildError, DeviceCounters};
use crate::config::{SerialOutput, VmConfig};
use crate::jail::Jail;
use crate::vhost_user::{serve_all, Served, VhostUserError, VhostUserServer};
use crate::vmm::VmExit;

/// Errors of the qemu machine.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error(transparent)]
    Devices(#[from] BuildError),
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
    #[error("cannot create the socket directory {path}: {source}")]
    SocketDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {binary}: {source} (install qemu-system-x86)")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("the VM's start was refused: {0}")]
    StartGate(std::io::Error),
    #[error("cannot open a pidfd for {QEMU} (Linux 5.3 or later is needed): {0}")]
    Pidfd(std::io::Error),
    #[error("cannot start the thread that reads {QEMU}'s console: {0}")]
    ConsoleThread(std::io::Error),
    #[error("device {name} (virtio type {kind}) has no vhost-user front in QEMU")]
    Unsupported { name: String, kind: u32 },
    #[error("cannot prepare QEMU's mount namespace (with {path}): {source}")]
    Jail {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How QEMU runs guest code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    /// QEMU's emulator, where the guest's TSC is the host's: the guest is told its rate
    /// where the host's TSC is reliable (see tsc.rs).
    Tcg {
        host_tsc_khz: Option<u32>,
    },
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Kvm => "KVM",
            Self::Tcg { .. } => "TCG",
        })
    }
}

/// The QEMU binary used for the qemu machine.
pub const QEMU: &str = "qemu-system-x86_64";

/// Input clock of TCG's local APIC timer, which counts nanoseconds of QEMU's virtual clock.
/// Given to our guest kernel (`lapic_timer_khz=`, guest-kernel/patches/lapic-timer-khz.patch)
/// it skips the timer's calibration and check against the PIT: a quarter second of every
/// TCG boot, and a check that a vCPU waiting for a host CPU can fail, which leaves the
/// guest a periodic tick.
const TCG_LAPIC_KHZ: u32 = 1_000_000;

/// What QEMU's standard output is.
enum Stdout {
    Inherit,
    /// A pipe whose bytes a thread copies to the writer.
    Copied(Box<dyn Write + Send>),
    Fd(OwnedFd),
}

/// A running QEMU with its device servers.
#[derive(Debug)]
pub struct QemuVm {
    child: Child,
    /// Readable once QEMU has ended.
    pidfd: OwnedFd,
    counters: DeviceCounters,
    server: Option<VhostUserServer>,
    dir: PathBuf,
    console: Option<std::thread::JoinHandle<()>>,
}

/// Directory prefix of the vhost-user sockets of process `pid`'s QEMU machines.
fn socket_dir_prefix(pid: u32) -> String {
    format!("kubevirt-vmm-{pid}-")
}

/// The vhost-user socket directories of process `pid` (each QEMU machine removes its own
/// when it ends; a process killed first leaves them).
pub fn socket_dirs(pid: u32) -> Vec<PathBuf> {
    let prefix = socket_dir_prefix(pid);
    std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// Removes what [`socket_dirs`] finds: cleanup after a killed embedder.
pub fn remove_socket_dirs(pid: u32) {
    for d in socket_dirs(pid) {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// The jail of one QEMU, rooted in its socket directory, holding `files` (writable or not).
fn jail(dir: &Path, files: &[(&Path, bool)]) -> Result<Jail, QemuError> {
    let root = dir.join("root");
    let fail = |path: &Path| {
        let path = path.to_owned();
        move |source| QemuError::Jail { path, source }
    };
    std::fs::create_dir_all(&root).map_err(fail(&root))?;
    let mut jail = Jail::new(&root).map_err(fail(&root))?;
    for (path, writable) in files {
        jail.bind(path, *writable).map_err(fail(path))?;
    }
    Ok(jail)
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn socket_dir() -> Result<PathBuf, QemuError> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "{}{}",
        socket_dir_prefix(std::process::id()),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|source| QemuError::SocketDir {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

impl QemuVm {
    /// Starts the device servers, then QEMU connected to them.
    pub fn start(mut config: VmConfig, accel: Accel) -> Result<Self, QemuError> {
        let devices = create_devices(&mut config)?;
        let counters = DeviceCounters::from(devices.as_slice());
        let dir = socket_dir()?;
        // A machine that does not start leaves no socket directory behind.
        Self::launch(config, accel, devices, counters, dir.clone()).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&dir);
        })
    }

    fn launch(
        mut config: VmConfig,
        accel: Accel,
        devices: Vec<crate::builder::NamedDevice>,
        counters: DeviceCounters,
        dir: PathBuf,
    ) -> Result<Self, QemuError> {
        let mut args: Vec<String> = Vec::new();
        let mem = config.memory_mib;
        let (accel_name, cpu) = match accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg { .. } => ("tcg", "max"),
        };
        // The RTC gives the guest the wall clock at boot: without one Linux spends a second
        // (1.7 s under TCG) waiting for the CMOS update-in-progress bit of an open bus, then
        // starts in 1970. (On native KVM, kvm-clock supplies the time instead.)
        args.extend(
            [
                "-M",
                "microvm,acpi=off,x-option-roms=off,rtc=on,memory-backend=mem",
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
                "-accel",
                accel_name,
                "-cpu",
                cpu,
                "-m",
                &format!("{mem}M"),
                "-smp",
                &config.vcpus.to_string(),
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
                // Modern virtio-mmio (version 2): our devices are virtio 1.x only.
                "-global",
                "virtio-mmio.force-legacy=false",
            ]
            .map(String::from),
        );
        // vCPU threads named `CPU <n>/TCG` (or /KVM), so that they can be pinned.
        args.push("-name".into());
        args.push(format!(
            "{},debug-threads=on",
            config.name.replace(',', ",,")
        ));
        // Absolute paths: in its jail QEMU starts in the root directory.
        let absolute = |p: &Path| {
            std::fs::canonicalize(p).map_err(|source| QemuError::Jail {
                path: p.to_owned(),
                source,
            })
        };
        let kernel = absolute(&config.kernel)?;
        let initrd = config.initrd.as_deref().map(absolute).transpose()?;
        args.push("-kernel".into());
        args.push(kernel.display().to_string());
        if let Some(initrd) = &initrd {
            args.push("-initrd".into());
            args.push(initrd.display().to_string());
        }
        // First, so that the caller's options win.
        let timers = match accel {
            Accel::Tcg { host_tsc_khz } => {
                let tsc = host_tsc_khz
                    .map(|khz| format!("{} ", crate::tsc::guest_options(khz)))
                    .unwrap_or_default();
                format!("{tsc}lapic_timer_khz={TCG_LAPIC_KHZ} ")
            }
            Accel::Kvm => String::new(),
        };
        // microvm has no i8042, so `reboot=k` falls through to a BIOS restart that can spin
        // in the firmware; a triple fault resets at once, and `-no-reboot` ends QEMU. The
        // last `reboot=` wins.
        args.push("-append".into());
        args.push(format!("{timers}{} reboot=t", config.cmdline));
        let mut served = Vec::new();
        for (i, (name, device)) in devices.into_iter().enumerate() {
            let kind = crate::bus::lock(&device).device_type();
            let socket = dir.join(format!("{name}.sock"));
            let chardev = format!("vu{i}");
            let front = match kind {
                device_type::RNG => format!("vhost-user-rng,chardev={chardev}"),
                device_type::BLOCK => format!("vhost-user-blk,chardev={chardev},num-queues=1"),
                device_type::VSOCK => format!("vhost-user-vsock-device,chardev={chardev}"),
                device_type::NET => {
                    args.push("-netdev".into());
                    args.push(format!("vhost-user,id=net{i},chardev={chardev}"));
                    // QEMU keeps the config space of vhost-user-net itself: hand it our MAC.
                    let mut mac = [0u8; 6];
                    crate::bus::lock(&device).read_config(0, &mut mac);
                    let mac = mac.map(|b| format!("{b:02x}")).join(":");
                    format!("virtio-net-device,netdev=net{i},mac={mac}")
                }
                kind => return Err(QemuError::Unsupported { name, kind }),
            };
            served.push(Served {
                name,
                device,
                socket: socket.clone(),
            });
            args.push("-chardev".into());
            args.push(format!("socket,id={chardev},path={}", socket.display()));
            args.push("-device".into());
            args.push(front);
        }
        // One thread serves them all (`vu-devices`); a machine without devices needs none.
        let server = match served.is_empty() {
            true => None,
            false => Some(serve_all("devices", served, config.seccomp)?),
        };
        // Free page reporting: the guest reports memory it freed (in 2 MiB blocks, a couple of
        // seconds after) and QEMU punches it out of the memfd. Our device servers map the
        // same memfd and fault zero pages there if the guest reuses the memory.
        if config.free_page_reporting {
            args.push("-device".into());
            args.push("virtio-balloon-device,free-page-reporting=on".into());
        }
        let output = std::mem::replace(&mut config.serial_output, SerialOutput::Sink);
        let mut output_file = SerialOutput::Sink;
        let (serial, stdout) = match output {
            SerialOutput::Stdout => ("stdio".to_string(), Stdout::Inherit),
            SerialOutput::Sink => ("null".to_string(), Stdout::Inherit),
            SerialOutput::File(p) => {
                // Made here, so that the jail can hold this one file.
                std::fs::File::create(&p).map_err(|source| QemuError::Jail {
                    path: p.clone(),
                    source,
                })?;
                let p = absolute(&p)?;
                let serial = format!("file:{}", p.display());
                output_file = SerialOutput::File(p);
                (serial, Stdout::Inherit)
            }
            SerialOutput::Writer(w) => ("stdio".to_string(), Stdout::Copied(w)),
            SerialOutput::Fd(fd) => ("stdio".to_string(), Stdout::Fd(fd)),
        };
        args.push("-serial".into());
        args.push(serial);
        args.push("-sandbox".into());
        args.push(crate::confine::QEMU_SANDBOX.into());
        // A private mount namespace needs CAP_SYS_ADMIN: the shim has it, a user's
        // `kubevirt-vmm run` may not.
        // SAFETY: geteuid has no preconditions.
        let jail = if unsafe { libc::geteuid() } == 0 {
            let mut files: Vec<(&Path, bool)> = vec![(&kernel, false), (&dir, true)];
            if let Some(i) = &initrd {
                files.push((i, false));
            }
            if let SerialOutput::File(p) = &output_file {
                files.push((p, true));
            }
            files.push((Path::new("/dev/null"), true));
            if accel == Accel::Kvm {
                files.push((Path::new("/dev/kvm"), true));
            }
            Some(jail(&dir, &files)?)
        } else {
            None
        };
        let mut cmd = Command::new(QEMU);
        cmd.args(&args).stdin(Stdio::null());
        // SAFETY: prctl, Jail::enter and drop_all_capabilities make raw system calls only (no
        // allocation, no lock), as the child of a threaded process must until it execs.
        unsafe {
            cmd.pre_exec(move || {
                // QEMU ends with the process that started it (the spawner thread lives as
                // long as the process): a killed VMM or shim leaves no VM behind.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(j) = &jail {
                    j.enter()?;
                }
                crate::confine::drop_all_capabilities()
            })
        };
        let writer = match stdout {
            Stdout::Inherit => None,
            Stdout::Copied(w) => {
                cmd.stdout(Stdio::piped());
                Some(w)
            }
            Stdout::Fd(fd) => {
                cmd.stdout(Stdio::from(fd));
                None
            }
        };
        log::debug!("starting {QEMU} {}", args.join(" "));
        crate::config::StartGate::pass(config.start_gate.take()).map_err(QemuError::StartGate)?;
        let mut child = crate::spawn::spawn(cmd).map_err(|source| QemuError::Spawn {
            binary: QEMU.into(),
            source,
        })?;
        // Opened before anyone can reap QEMU, so that it names this process.
        let pidfd = match pidfd_open(child.id()) {
            Ok(fd) => fd,
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(QemuError::Pidfd(source));
            }
        };
        // Console bytes go to the caller's writer as they arrive.
        let console = match (writer, child.stdout.take()) {
            (Some(mut w), Some(mut out)) => {
                let reader = std::thread::Builder::new()
                    .name("qemu-console".into())
                    .spawn(move || {
                        let mut buf = [0u8; 4096];
                        while let Ok(n @ 1..) = out.read(&mut buf) {
                            let _ = w.write_all(&buf[..n]);
                        }
                    });
                match reader {
                    Ok(t) => Some(t),
                    Err(e) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(QemuError::ConsoleThread(e));
                    }
                }
            }
            _ => None,
        };
        Ok(Self {
            child,
            pidfd,
            counters,
            server,
            dir,
            console,
        })
    }

    /// Waits for QEMU to end: a guest reset (`-no-reboot`) is a clean end.
    pub fn wait(mut self) -> VmExit {
        let status = self.child.wait();
        self.finish();
        match status {
            Ok(s) if s.success() => VmExit::Reset,
            Ok(s) => VmExit::Error(format!("{QEMU} exited with {s}")),
            Err(e) => VmExit::Error(format!("cannot wait for {QEMU}: {e}")),
        }
    }

    /// The devices' counters.
    pub fn counters(&self) -> &DeviceCounters {
        &self.counters
    }

    /// The QEMU process (for a pid file: a crashed embedder's cleanup kills it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout`; `None` if QEMU still runs.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        // Whether or not the wait worked, the child's state is what counts.
        let _ = crate::wait::readable(self.pidfd.as_fd(), Some(timeout));
        self.child.try_wait().ok().flatten()
    }

    /// A descriptor that becomes readable when QEMU has ended (a pidfd): for a watcher
    /// that sleeps until then.
    pub fn end_fd(&self) -> std::io::Result<OwnedFd> {
        self.pidfd.try_clone()
    }

    /// Ends QEMU at once.
    pub fn kill(mut self) -> VmExit {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.finish();
        VmExit::Stopped
    }

    fn finish(&mut self) {
        if let Some(s) = self.server.take() {
            s.finish();
        }
        if let Some(c) = self.console.take() {
            let _ = c.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine that fails after its device servers started (here: a console file that
    /// cannot be made) stops them: no thread, no socket directory left.
    #[test]
    fn a_start_that_fails_after_the_servers_leaves_no_thread_or_directory() {
        let _one_at_a_time = crate::vhost_user::TEST_SERVERS.lock();
        let mut config = VmConfig::new("/proc/self/exe");
        config.rng = true;
        config.serial_output = SerialOutput::File("/nonexistent/kubevirt/console.log".into());
        let before = socket_dirs(std::process::id()).len();
        let e = QemuVm::start(config, Accel::Tcg { host_tsc_khz: None }).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/kubevirt"), "{e}");
        let left = crate::vhost_user::device_threads();
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(socket_dirs(std::process::id()).len(), before);
    }

    /// The start gate runs once the devices are served, right before QEMU would start; a
    /// gate that refuses ends the start with its reason and leaves nothing.
    #[test]
    fn the_start_gate_comes_after_the_device_set_up_and_can_refuse() {
        let _one_at_a_time = crate::vhost_user::TEST_SERVERS.lock();
        let mut config = VmConfig::new("/proc/self/exe");
        config.rng = true;
        config.serial_output = SerialOutput::Sink;
        let before = socket_dirs(std::process::id()).len();
        let (tx, rx) = std::sync::mpsc::channel();
        config.start_gate = Some(crate::config::StartGate(Box::new(move || {
            let served: Vec<bool> = socket_dirs(std::process::id())
                .iter()
                .map(|d| d.join("rng.sock").exists())
                .collect();
            tx.send(served).unwrap();
            Err(std::io::Error::other("the cgroup is not ready"))
        })));
        let e = QemuVm::start(config, Accel::Tcg { host_tsc_khz: None }).unwrap_err();
        assert!(matches!(e, QemuError::StartGate(_)), "{e}");
        assert!(e.to_string().contains("the cgroup is not ready"), "{e}");
        let served = rx.try_recv().expect("the gate was called");
        assert!(served.contains(&true), "rng served at the gate: {served:?}");
        let left = crate::vhost_user::device_threads();
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(socket_dirs(std::process::id()).len(), before);
    }

    /// A descriptor given as the console becomes QEMU's own output: the tiny guest's byte
    /// arrives in the pipe with no thread of ours copying it, while QEMU runs.
    #[test]
    fn a_console_descriptor_is_written_by_qemu_itself() {
        let (mut read, write) = std::io::pipe().unwrap();
        let mut config = VmConfig::new(crate::guests::test_guest("hello"));
        config.serial_output = SerialOutput::Fd(write.into());
        let vm = QemuVm::start(config, Accel::Tcg { host_tsc_khz: None }).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            let _ = tx.send(read.read_exact(&mut byte).map(|()| byte[0]));
        });
        let got = rx.recv_timeout(Duration::from_secs(30));
        let copier = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
            .any(|c| c.trim() == "qemu-console");
        // The PVH entry halts after its byte where QEMU's microvm has no i8042 to reset.
        vm.kill();
        assert_eq!(got.expect("the guest's byte").unwrap(), b'K');
        assert!(!copier, "a qemu-console thread copies the output");
    }
}
