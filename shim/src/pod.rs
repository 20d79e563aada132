//! The pod VM: boots it with the container's disks and the vsock, connects to the agent, and
//! shuts it down cleanly (or kills it).

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use devices::block::{BlockConfig, MediaSlot};
use devices::net::{NetConfig, TapSource};
use devices::vsock::VsockConfig;
use protocol::agent::{Empty, MountVolumeRequest, SetupSandboxRequest};
use protocol::blocking::AgentClient;
use protocol::ttrpc::context;
use vmm::{SerialOutput, VmConfig};

use crate::cgroup::{self, PodCgroup};
use crate::config::ShimConfig;
use crate::console;
use crate::error::{Result, ShimError};
use crate::filesync::FileSync;
use crate::machine::{self, Machine};
use crate::network::{self, PodNetwork};
use crate::phases::Phases;
use crate::portfwd::PortForward;
use crate::rates::PodRates;

/// Host vsock port the agent streams its log to.
const AGENT_LOG_PORT: u32 = 1025;
/// Guest CID: each VM has its own vsock device, so one number serves every pod.
const GUEST_CID: u64 = 3;

/// What a pod VM is booted with.
#[derive(Debug)]
pub struct PodSpec {
    pub id: String,
    pub dir: PathBuf,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub hostname: String,
    /// The CNI network of the pod, when it has one.
    pub network: Option<PodNetwork>,
    /// The host cgroup the VM runs in (this process is moving into it; `boot` waits).
    pub cgroup: Option<PodCgroup>,
    /// Prometheus labels of the pod's metrics.
    pub labels: String,
    /// I/O limits of the pod's disks and NIC.
    pub rates: PodRates,
    /// hostPID: the pod's containers that share a PID namespace get the VM's.
    pub host_pid: bool,
}

/// Serial of the pod's shared scratch disk (every container's writable layer).
pub const SCRATCH_ID: &str = "scratch";

/// One media slot: which image it holds and how many containers use it.
#[derive(Debug)]
struct Slot {
    id: String,
    media: MediaSlot,
    image: Option<PathBuf>,
    /// A pod volume (a host block device) holds the slot until the VM ends.
    volume: Option<PathBuf>,
    users: usize,
}

pub struct Pod {
    pub agent: AgentClient,
    /// The files copied into the VM, kept current.
    pub files: FileSync,
    pub vm_pid: u32,
    pub dir: PathBuf,
    /// The task whose deletion ends the VM (the CRI sandbox, or a lone container).
    pub owner: String,
    /// Taken by a clean shutdown, or by the watcher when the VM ends by itself.
    machine: Arc<Mutex<Option<Machine>>>,
    slots: Mutex<Vec<Slot>>,
    cgroup: Mutex<Option<PodCgroup>>,
    /// The CPU sets of the pod's containers; the VM runs on their union.
    cpus: Mutex<HashMap<String, BTreeSet<u32>>>,
    /// Memory-backed emptyDirs mounted in the guest.
    tmpfs: Mutex<BTreeSet<String>>,
    /// See [`PodSpec::host_pid`].
    pub host_pid: bool,
    /// `kubectl port-forward` into the guest, for a pod with a network.
    ports: Mutex<Option<PortForward>>,
}

/// A slot neither an image nor a volume uses; `none` says what found none.
fn free_slot<'a>(slots: &'a mut [Slot], none: &str) -> Result<&'a mut Slot> {
    slots
        .iter_mut()
        .find(|s| s.users == 0 && s.volume.is_none())
        .ok_or_else(|| {
            ShimError::Unsupported(format!(
                "{none}; raise disk_slots in {}",
                crate::config::DEFAULT_PATH
            ))
        })
}

pub fn ctx() -> context::Context {
    context::with_timeout(Duration::from_secs(30).as_nanos() as i64)
}

/// The longest agent log line passed on whole.
const MAX_LOG_LINE: u64 = 16 << 10;

/// Forwards the agent's log lines into the shim's log (containerd's log).
fn forward_agent_log(uds: &Path, pod: String) -> Result<()> {
    let path = format!("{}_{AGENT_LOG_PORT}", uds.display());
    let listener = UnixListener::bind(&path).map_err(ShimError::io(format!("bind {path}")))?;
    let spawned = std::thread::Builder::new()
        .name("agent-log".into())
        .spawn(move || {
            if let Ok((s, _)) = listener.accept() {
                // Lines are cut at MAX_LOG_LINE: a guest that never sends a newline must not
                // grow our memory.
                let mut r = BufReader::new(s);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match (&mut r).take(MAX_LOG_LINE).read_until(b'\n', &mut line) {
                        Ok(1..) => log::info!(
                            "pod {pod}: guest: {}",
                            String::from_utf8_lossy(&line).trim_end()
                        ),
                        _ => break,
                    }
                }
            }
        });
    spawned
        .map(drop)
        .map_err(ShimError::io("start the agent log thread"))
}

/// The guest's console, capped (see console.rs).
const CONSOLE_LOG: &str = "console.log";

/// The last `n` lines the guest wrote on its console.
fn console_tail(dir: &Path, n: usize) -> Vec<String> {
    console::tail(&dir.join(CONSOLE_LOG), n)
}

/// Says in containerd's log how a VM that was not asked to end did, and what the guest said.
fn log_unexpected_end(pod: &str, how: &str, dir: &Path) {
    log::error!(
        "pod {pod}: the VM ended unexpectedly ({how}); console tail: {:?}",
        console_tail(dir, 8)
    );
}

impl Pod {
    pub fn boot(cfg: &ShimConfig, p: PodSpec, phases: &mut Phases) -> Result<Pod> {
        cfg.check_guest()?;
        let uds = p.dir.join("vsock.sock");
        forward_agent_log(&uds, p.id.clone())?;
        let (backend, accel, why) =
            machine::choose(cfg.machine, &machine::calibration_cache(&cfg.state_dir))?;
        phases.mark("machine choice");
        let mut vm = VmConfig::new(&cfg.kernel);
        vm.cpuid_cache = Some(cfg.state_dir.with_extension("cpuid"));
        vm.initrd = Some(cfg.initramfs.clone());
        // `ps` shows which pod a QEMU serves.
        vm.name = format!("kubevirt-pod:{}", p.dir.display());
        vm.cmdline = format!("{} {}", vmm::GUEST_CMDLINE, cfg.extra_cmdline)
            .trim_end()
            .to_owned();
        vm.memory_mib = p.memory_mib;
        vm.vcpus = p.vcpus;
        // Memory the guest frees goes back to the node (a virtio-balloon that never inflates).
        vm.free_page_reporting = true;
        let console = console::start(&p.dir.join(CONSOLE_LOG), cfg.console_log_kib << 10)?;
        vm.serial_output = match backend {
            // QEMU writes into the console's pipe itself (no thread to copy its output),
            // waiting while the pipe is full.
            vmm::doctor::Backend::Qemu => SerialOutput::Fd(console.into_fd()),
            vmm::doctor::Backend::Builtin => SerialOutput::Writer(Box::new(console)),
        };
        // Image slots (sparse placeholders fix their capacity) and the shared scratch disk.
        let mut slots = Vec::new();
        for i in 0..cfg.disk_slots {
            let placeholder = p.dir.join(format!("slot{i}.empty"));
            let f = std::fs::File::create(&placeholder)
                .map_err(ShimError::io(format!("create {}", placeholder.display())))?;
            f.set_len(cfg.slot_gib << 30)
                .map_err(ShimError::io(format!("size {}", placeholder.display())))?;
            let media = MediaSlot::new();
            vm.disks.push(BlockConfig {
                path: placeholder,
                read_only: false,
                id: Some(format!("slot{i}")),
                slot: Some(media.clone()),
                rate: p.rates.disk,
            });
            slots.push(Slot {
                id: format!("slot{i}"),
                media,
                image: None,
                volume: None,
                users: 0,
            });
        }
        if let Some(n) = &p.network {
            vm.nets.push(NetConfig {
                tap: TapSource::Name {
                    name: network::TAP.into(),
                    netns: Some(n.netns.clone()),
                },
                mac: Some(n.mac),
                rx_rate: p.rates.net_rx,
                tx_rate: p.rates.net_tx,
            });
        }
        let scratch = p.dir.join("scratch.ext4");
        crate::scratch::disk(&scratch, cfg.scratch_mib, &cfg.image_cache)?;
        vm.disks.push(BlockConfig {
            path: scratch,
            read_only: false,
            id: Some(SCRATCH_ID.into()),
            slot: None,
            rate: p.rates.disk,
        });
        phases.mark("disks");
        vm.vsock = Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds.clone(),
        });
        log::info!(
            "pod {}: machine {backend} ({why}); {} MiB, {} vCPUs",
            p.id,
            p.memory_mib,
            p.vcpus
        );
        if let Some(cg) = &p.cgroup {
            let entry = cg.entry();
            vm.start_gate = Some(vmm::StartGate(Box::new(move || {
                entry.wait().map_err(std::io::Error::other)
            })));
        }
        let start = Instant::now();
        let mut m = Machine::start(vm, backend, accel)?;
        phases.mark("VM start");
        let vm_pid = m.pid();
        // For `delete` after a crash of this shim: the VM to kill, the sockets to remove.
        std::fs::write(p.dir.join("vm.pid"), vm_pid.to_string())
            .map_err(ShimError::io("write vm.pid"))?;
        std::fs::write(p.dir.join("shim.pid"), std::process::id().to_string())
            .map_err(ShimError::io("write shim.pid"))?;
        let timeout = Duration::from_secs(cfg.agent_timeout_secs);
        let agent = match protocol::connect_agent_while(&uds, timeout, || m.ended()) {
            Ok(a) => a,
            Err(e) => {
                m.stop();
                return Err(ShimError::Vm(format!(
                    "the guest agent did not answer: {e}; console tail: {:?}",
                    console_tail(&p.dir, 8)
                )));
            }
        };
        let boot = start.elapsed();
        phases.mark("guest boot to agent");
        log::info!(
            "pod {}: agent ready {} ms after VM start",
            p.id,
            boot.as_millis()
        );
        let info = crate::exporter::VmInfo {
            labels: p.labels.clone(),
            machine: backend.to_string(),
            boot_seconds: boot.as_secs_f64(),
            memory_mib: p.memory_mib,
            vcpus: p.vcpus,
            pids: vec![std::process::id(), vm_pid],
            netns: p.network.as_ref().map(|n| n.netns.clone()),
            devices: m.counters(),
            exits: m.exit_counters(),
        };
        if let Err(e) = crate::exporter::serve(&p.dir, info) {
            log::warn!("pod {}: no metrics: {e}", p.id);
        }
        let copier = agent.clone();
        let files = FileSync::new(move |c| crate::mounts::copy_tree(&copier, &c.host, &c.rel))?;
        let pod = Pod {
            agent,
            files,
            vm_pid,
            dir: p.dir,
            owner: p.id,
            machine: Arc::new(Mutex::new(Some(m))),
            slots: Mutex::new(slots),
            cgroup: Mutex::new(p.cgroup),
            cpus: Mutex::default(),
            tmpfs: Mutex::default(),
            host_pid: p.host_pid,
            ports: Mutex::default(),
        };
        pod.watch_vm()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let setup = SetupSandboxRequest {
            hostname: p.hostname,
            host_time_unix_ns: now,
            ..Default::default()
        };
        if let Err(e) = pod.agent.setup_sandbox(ctx(), &setup) {
            pod.shutdown();
            return Err(ShimError::agent("sandbox setup")(e));
        }
        phases.mark("sandbox setup");
        if let Some(n) = &p.network {
            let wired = network::connect_tap(n).and_then(|()| {
                phases.mark("tap wiring");
                pod.agent
                    .configure_network(ctx(), &network::guest_config(n))
                    .map(drop)
                    .map_err(ShimError::agent("configure the guest network"))
            });
            if let Err(e) = wired {
                pod.shutdown();
                return Err(e);
            }
            phases.mark("guest network");
            match PortForward::start(pod.agent.clone(), &uds, &n.netns, &pod.owner) {
                Ok(f) => *pod.ports.lock().unwrap_or_else(|e| e.into_inner()) = Some(f),
                Err(e) => {
                    pod.shutdown();
                    return Err(e);
                }
            }
            log::info!(
                "pod {}: network {:?} via {} and {}",
                pod.owner,
                n.addresses,
                n.veth,
                network::TAP
            );
        }
        Ok(pod)
    }

    /// Puts `image` in a slot (sharing one that already holds it) and returns the slot's id.
    pub fn attach_image(&self, image: &Path) -> Result<String> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slots.iter_mut().find(|s| s.image.as_deref() == Some(image)) {
            s.users += 1;
            return Ok(s.id.clone());
        }
        let s = free_slot(
            &mut slots,
            "every disk slot of the pod VM holds an image in use",
        )?;
        s.media
            .insert(image, true)
            .map_err(|e| ShimError::Vm(format!("insert {} in {}: {e}", image.display(), s.id)))?;
        s.image = Some(image.to_owned());
        s.users = 1;
        Ok(s.id.clone())
    }

    /// Attaches the host block device `dev` to the VM (once per pod) and has the agent mount
    /// it; returns the slot, whose guest mount is `mounts::volume_path(slot)`.
    pub fn attach_volume(&self, dev: &Path, read_only: bool) -> Result<String> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slots.iter().find(|s| s.volume.as_deref() == Some(dev)) {
            return Ok(s.id.clone());
        }
        let s = free_slot(
            &mut slots,
            &format!("no free disk slot for volume {}", dev.display()),
        )?;
        s.media
            .insert(dev, read_only)
            .map_err(|e| ShimError::Vm(format!("attach {} in {}: {e}", dev.display(), s.id)))?;
        let req = MountVolumeRequest {
            name: s.id.clone(),
            device_id: s.id.clone(),
            fstype: crate::mounts::fstype(dev),
            read_only,
            ..Default::default()
        };
        if let Err(e) = self.agent.mount_volume(ctx(), &req) {
            s.media.eject();
            return Err(ShimError::agent("mount a volume")(e));
        }
        s.volume = Some(dev.to_owned());
        Ok(s.id.clone())
    }

    /// Mounts memory-backed emptyDir `name` (`bytes` big) in the guest, once per pod.
    pub fn mount_tmpfs(&self, name: &str, bytes: u64) -> Result<()> {
        let mut mounted = self.tmpfs.lock().unwrap_or_else(|e| e.into_inner());
        if mounted.contains(name) {
            return Ok(());
        }
        let req = MountVolumeRequest {
            name: crate::mounts::tmpfs_volume(name),
            fstype: "tmpfs".into(),
            options: vec![format!("size={bytes}")],
            ..Default::default()
        };
        self.agent
            .mount_volume(ctx(), &req)
            .map_err(ShimError::agent("mount a memory-backed emptyDir"))?;
        mounted.insert(name.to_owned());
        Ok(())
    }

    /// A container no longer uses the image in slot `id`; an unused slot is emptied.
    pub fn detach_image(&self, id: &str) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slots.iter_mut().find(|s| s.id == id) {
            s.users = s.users.saturating_sub(1);
            if s.users == 0 {
                s.media.eject();
                s.image = None;
            }
        }
    }

    /// Records container `id`'s CPU set (`None`: it has none, or it is gone) and confines
    /// the VM's threads to the union of the containers' sets.
    pub fn set_container_cpus(&self, id: &str, cpus: Option<&str>) -> Result<()> {
        let mut all = self.cpus.lock().unwrap_or_else(|e| e.into_inner());
        let before = all.clone();
        match cpus {
            Some(list) => {
                all.insert(id.to_owned(), cgroup::parse_cpus(list)?);
            }
            None => {
                all.remove(id);
            }
        }
        if *all == before {
            return Ok(());
        }
        let cg = self.cgroup.lock().unwrap_or_else(|e| e.into_inner());
        let Some(cg) = cg.as_ref() else {
            return Ok(());
        };
        let union: BTreeSet<u32> = all.values().flatten().copied().collect();
        let spread = !union.is_empty();
        let list = if spread {
            cgroup::format_cpus(&union)
        } else {
            cg.parent_cpus()
        };
        cg.set_cpus(&list)?;
        // After the cpuset: writing it resets every thread's affinity.
        let set = if spread {
            union
        } else {
            cgroup::parse_cpus(&list)?
        };
        let pinned = crate::affinity::pin(&[std::process::id(), self.vm_pid], &set, spread);
        log::info!(
            "pod {}: VM runs on CPUs {list}, {pinned} vCPU threads pinned",
            self.owner
        );
        Ok(())
    }

    /// Asks the agent to power off, then makes sure the VM is gone and leaves its cgroup.
    /// Tears the VM down when it ends by itself (guest panic, VMM killed): its devices go
    /// with it, so every agent call fails and each container's wait reports an exit.
    ///
    /// The watcher sleeps on the VM's end descriptor; `shutdown` takes the machine first,
    /// so a watcher that wakes to find none has nothing to do.
    fn watch_vm(&self) -> Result<()> {
        let end = match self
            .machine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(m) => m.end_fd()?,
            None => return Ok(()),
        };
        let machine = self.machine.clone();
        let dir = self.dir.clone();
        let pod = self.owner.clone();
        std::thread::Builder::new()
            .name("vm-watch".into())
            .spawn(move || {
                if let Err(e) = vmm::wait::readable(end.as_fd(), None) {
                    // Not an end: the VM is left running, its exit still reported by Wait.
                    log::error!("pod {pod}: cannot watch the VM for its end: {e}");
                    return;
                }
                let mut guard = machine.lock().unwrap_or_else(|e| e.into_inner());
                let Some(m) = guard.as_mut() else { return };
                // Readable: it has ended (the wait reaps QEMU).
                let how = m.ended_within(Duration::from_secs(1));
                let m = guard.take();
                drop(guard);
                log_unexpected_end(
                    &pod,
                    how.as_deref().unwrap_or("its end was not reported"),
                    &dir,
                );
                if let Some(m) = m {
                    m.stop();
                }
            })
            .map_err(ShimError::io("start the VM watcher"))?;
        Ok(())
    }

    pub fn shutdown(&self) {
        self.files.stop();
        // Listeners and forwarded connections in the pod's namespace go first.
        drop(self.ports.lock().unwrap_or_else(|e| e.into_inner()).take());
        let machine = self
            .machine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut m) = machine {
            if let Some(how) = m.ended() {
                log_unexpected_end(&self.owner, &how, &self.dir);
            } else if self.agent.shutdown(ctx(), &Empty::new()).is_ok()
                && m.ended_within(Duration::from_secs(10)).is_some()
            {
                log::info!("pod VM shut down cleanly");
            } else if let Some(how) = m.ended_within(Duration::from_secs(2)) {
                // No agent to ask: it crashed (as the guest's PID 1 that panics the kernel,
                // which resets the VM) or the guest is dying; say how it went.
                log_unexpected_end(&self.owner, &how, &self.dir);
            } else {
                log::warn!(
                    "pod VM did not shut down by itself; stopping it; console tail: {:?}",
                    console_tail(&self.dir, 8)
                );
            }
            m.stop();
        }
        drop(self.cgroup.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pod")
            .field("vm_pid", &self.vm_pid)
            .field("dir", &self.dir)
            .finish()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.shutdown();
    }
}
