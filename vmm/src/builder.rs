//! Building a microVM is one readable sequence of small steps.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::virtio::VirtioDevice;
use event_manager::{EventManager, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::{cpuid, layout, memory, mptable, paging, regs};
use crate::boot::{self, LoadedKernel};
use crate::bus::Bus;
use crate::config::{SerialOutput, StartGate, VmConfig};
use crate::legacy::{ResetLine, Serial, SerialInput, I8042};
use crate::vcpu::Vcpu;
use crate::virtio_mmio::{regs as mmio_regs, MmioInterrupt, MmioTransport, QueueEvents};
use crate::vm::{Vm, VmError};
use crate::vmm::Vmm;

/// Errors while building a VM, each naming the step and input that failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0} vCPUs requested: 1 to {max} are supported", max = mptable::MAX_VCPUS)]
    VcpuCount(u8),
    #[error("the VM's start was refused: {0}")]
    StartGate(std::io::Error),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Paging(#[from] paging::PagingError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Block(#[from] devices::block::BlockError),
    #[error("cannot start the disks' I/O threads: {0}")]
    IoThreads(std::io::Error),
    #[error(transparent)]
    Net(#[from] devices::net::NetError),
    #[error(transparent)]
    Vsock(#[from] devices::vsock::VsockError),
    #[error("cannot open serial output {path}: {source}")]
    SerialOutput {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot set up the serial console: {0}")]
    Serial(std::io::Error),
    #[error("cannot create the event loop: {0}")]
    EventManager(event_manager::Error),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] crate::bus::BusError),
    #[error("KVM failed to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("no room for more virtio-mmio devices (IRQs {first} to {last} are used)", first = layout::VIRTIO_IRQ_START, last = layout::IOAPIC_PINS - 1)]
    TooManyDevices,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Kvm { what, source }
}

fn eventfd() -> Result<EventFd, BuildError> {
    EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)
}

type Subscriber = Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>;

/// Builds a VM from its configuration; the guest runs once the result is started.
pub fn build_microvm(mut config: VmConfig) -> Result<Vmm, BuildError> {
    if config.vcpus == 0 || config.vcpus > mptable::MAX_VCPUS {
        return Err(BuildError::VcpuCount(config.vcpus));
    }
    StartGate::pass(config.start_gate.take()).map_err(BuildError::StartGate)?;
    let mem = memory::allocate(config.memory_mib, config.hugepages)?;
    let vm = Vm::new(&mem, config.cpuid_cache.as_deref())?;
    let kernel = boot::load_kernel(&mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(&mem, path, kernel.end)?),
        None => None,
    };
    let mut event_manager = EventManager::new().map_err(BuildError::EventManager)?;
    let reset = ResetLine::default();
    let serial_output = std::mem::replace(&mut config.serial_output, SerialOutput::Sink);
    let pio = attach_legacy_devices(&vm, serial_output, &config, &reset, &mut event_manager)?;
    let mut mmio = MmioDevices::default();
    let mut devices = create_devices(&mut config)?;
    if config.free_page_reporting {
        // Builtin only: QEMU has no vhost-user front for it and brings its own.
        let balloon = devices::balloon::Balloon::new();
        devices.push(("balloon".into(), Arc::new(Mutex::new(balloon))));
    }
    let counters = DeviceCounters::from(devices.as_slice());
    for (_, device) in devices {
        mmio.attach(&vm, &mem, &mut event_manager, device)?;
    }
    let cr3 = configure_system_for_boot(&mem, &config, &kernel, initrd, &mmio.cmdline)?;
    let vcpus = create_vcpus(
        &vm,
        &config,
        kernel.entry,
        cr3,
        Arc::new(pio),
        Arc::new(mmio.bus),
        &reset,
    )?;
    Ok(Vmm {
        vm,
        mem,
        vcpus,
        event_manager,
        seccomp: config.seccomp,
        counters,
    })
}

/// A virtio device model with a short name for logs, sockets and threads.
pub type NamedDevice = (String, Arc<Mutex<dyn VirtioDevice>>);

/// A device's name, kind and counters (name, value).
pub type DeviceReading = (String, &'static str, Vec<(&'static str, u64)>);

/// The VM's virtio devices, for their counters (metrics).
#[derive(Clone, Default)]
pub struct DeviceCounters(Vec<NamedDevice>);

impl DeviceCounters {
    /// Each device's name (`blk0`, `net0`, ...), kind (`virtio-blk`, ...) and counters.
    pub fn read(&self) -> Vec<DeviceReading> {
        self.0
            .iter()
            .map(|(name, d)| {
                let d = d.lock().unwrap_or_else(|e| e.into_inner());
                (name.clone(), d.name(), d.counters())
            })
            .collect()
    }
}

impl std::fmt::Debug for DeviceCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(n, _)| n))
            .finish()
    }
}

impl From<&[NamedDevice]> for DeviceCounters {
    fn from(d: &[NamedDevice]) -> Self {
        DeviceCounters(d.to_vec())
    }
}

/// The virtio devices the configuration asks for, in slot order; shared by the builtin
/// machine (virtio-mmio) and the qemu machine (vhost-user).
pub fn create_devices(config: &mut VmConfig) -> Result<Vec<NamedDevice>, BuildError> {
    let mut out: Vec<NamedDevice> = Vec::new();
    if !config.disks.is_empty() {
        // One pool of I/O threads for all the disks: a pod's image slots are idle most of
        // the time, and threads of their own would idle with them.
        let setup = config
            .seccomp
            .then_some(crate::seccomp::confine_disk_io as devices::block::IoSetup);
        let pool = devices::block::IoPool::for_disks(config.disks.len(), setup)
            .map_err(BuildError::IoThreads)?;
        for (i, disk) in config.disks.iter().enumerate() {
            let dev = devices::block::Block::with_pool(disk.clone(), &pool)?;
            out.push((format!("blk{i}"), Arc::new(Mutex::new(dev))));
        }
    }
    for (i, net) in std::mem::take(&mut config.nets).into_iter().enumerate() {
        out.push((
            format!("net{i}"),
            Arc::new(Mutex::new(devices::net::Net::new(net)?)),
        ));
    }
    if let Some(vsock) = &config.vsock {
        let dev = devices::vsock::Vsock::new(vsock.clone())?;
        out.push(("vsock".into(), Arc::new(Mutex::new(dev))));
    }
    if config.rng {
        out.push(("rng".into(), Arc::new(Mutex::new(devices::rng::Rng::new()))));
    }
    Ok(out)
}

/// COM1 (IRQ 4 through an irqfd) and the i8042 reset line on the port I/O bus.
fn attach_legacy_devices(
    vm: &Vm,
    serial_output: SerialOutput,
    config: &VmConfig,
    reset: &ResetLine,
    em: &mut EventManager<Subscriber>,
) -> Result<Bus, BuildError> {
    let out: Box<dyn Write + Send> = match serial_output {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::Sink => Box::new(std::io::sink()),
        SerialOutput::Writer(w) => w,
        SerialOutput::Fd(fd) => Box::new(std::fs::File::from(fd)),
        SerialOutput::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| BuildError::SerialOutput {
                    path: path.display().to_string(),
                    source,
                })?,
        ),
    };
    let irq = eventfd()?;
    vm.fd
        .register_irqfd(&irq, layout::SERIAL_IRQ)
        .map_err(kvm("register the serial irqfd"))?;
    let (serial, drained) = Serial::new(irq, out).map_err(BuildError::Serial)?;
    let serial = Arc::new(Mutex::new(serial));
    if let Some(source) = &config.serial_input {
        let input =
            SerialInput::new(serial.clone(), drained, source).map_err(BuildError::Serial)?;
        em.add_subscriber(Arc::new(Mutex::new(input)));
    }
    let mut pio = Bus::new();
    pio.insert(
        serial,
        layout::SERIAL_PORT as u64,
        layout::SERIAL_PORT_LEN as u64,
    )?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(reset.clone()))),
        layout::I8042_PORT as u64,
        layout::I8042_PORT_LEN as u64,
    )?;
    Ok(pio)
}

/// Virtio-mmio devices: one page and one IRQ each, listed for the kernel command line.
#[derive(Default, Debug)]
pub struct MmioDevices {
    pub bus: Bus,
    pub cmdline: Vec<(u64, u64, u32)>,
}

impl MmioDevices {
    /// Registers one device: its transport on the bus, an irqfd, one ioeventfd per queue
    /// (so notifications skip the vCPU's exit path) and the event glue running its queues.
    pub fn attach(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        em: &mut EventManager<Subscriber>,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<(u64, u32), BuildError> {
        let slot = self.cmdline.len() as u64;
        let irq = layout::VIRTIO_IRQ_START + slot as u32;
        if irq >= layout::IOAPIC_PINS {
            return Err(BuildError::TooManyDevices);
        }
        let base = layout::VIRTIO_MMIO_START + slot * layout::VIRTIO_MMIO_SIZE;
        let irqfd = eventfd()?;
        vm.fd
            .register_irqfd(&irqfd, irq)
            .map_err(kvm("register a virtio irqfd"))?;
        let queues = crate::bus::lock(&device).queue_max_sizes().len();
        let mut queue_evts = Vec::with_capacity(queues);
        for i in 0..queues {
            let evt = eventfd()?;
            let addr = IoEventAddress::Mmio(base + mmio_regs::QUEUE_NOTIFY);
            vm.fd
                .register_ioevent(&evt, &addr, i as u32)
                .map_err(kvm("register a queue ioeventfd"))?;
            queue_evts.push(evt);
        }
        let clones = queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(BuildError::EventFd)?;
        let interrupt = Arc::new(MmioInterrupt::new(irqfd));
        let backend = crate::bus::lock(&device).backend_fd();
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device,
            mem.clone(),
            interrupt,
            clones,
        )));
        self.bus
            .insert(transport.clone(), base, layout::VIRTIO_MMIO_SIZE)?;
        em.add_subscriber(Arc::new(Mutex::new(QueueEvents::new(
            transport, queue_evts, backend,
        ))));
        self.cmdline.push((layout::VIRTIO_MMIO_SIZE, base, irq));
        Ok((base, irq))
    }
}

/// Command line, zero page with the e820 map, MP table, page tables and GDT; returns CR3.
fn configure_system_for_boot(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    kernel: &LoadedKernel,
    initrd: Option<boot::LoadedInitrd>,
    mmio_devices: &[(u64, u64, u32)],
) -> Result<u64, BuildError> {
    let cmdline = boot::build_cmdline(&config.cmdline, mmio_devices)?;
    boot::write_boot_params(mem, config.memory_mib << 20, kernel, &cmdline, initrd)?;
    mptable::setup_mptable(mem, config.vcpus)?;
    regs::write_descriptor_tables(mem)?;
    Ok(paging::setup_identity_map(mem)?)
}

/// Reads CPUID back: some KVM flavours force flags on whatever the VMM set.
fn warn_forced_features(fd: &kvm_ioctls::VcpuFd, hidden: &[cpuid::CpuFeature]) {
    if let Ok(got) = fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES) {
        let forced = cpuid::still_visible(&got, hidden);
        if !forced.is_empty() {
            log::warn!(
                "KVM keeps CPU features {forced:?} visible to the guest although they were hidden"
            );
        }
    }
}

/// Creates every vCPU with its CPUID, MSRs, FPU and LAPIC; the first one at the kernel entry.
fn create_vcpus(
    vm: &Vm,
    config: &VmConfig,
    entry: u64,
    cr3: u64,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    reset: &ResetLine,
) -> Result<Vec<Vcpu>, BuildError> {
    (0..config.vcpus)
        .map(|id| {
            let fd = vm.fd.create_vcpu(id as u64).map_err(kvm("create a vCPU"))?;
            let mut cpuid = vm.supported_cpuid.clone();
            cpuid::normalize(
                &mut cpuid,
                &cpuid::CpuidSpec {
                    vcpu_id: id,
                    vcpus: config.vcpus,
                    tsc_deadline: vm.tsc_deadline,
                    hidden: &config.hidden_cpu_features,
                },
            );
            fd.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
            if id == 0 && !config.hidden_cpu_features.is_empty() {
                warn_forced_features(&fd, &config.hidden_cpu_features);
            }
            regs::setup_common(&fd)?;
            if id == 0 {
                regs::setup_boot_cpu(&fd, entry, cr3)?;
            }
            Ok(Vcpu::new(id, fd, pio.clone(), mmio.clone(), reset.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gate comes before guest memory exists: a refusal allocates nothing.
    #[test]
    fn a_refusing_start_gate_stops_the_build_first() {
        let mut config = VmConfig::new("/nonexistent/kernel");
        // Anything done before the gate would fail with another error (size, kernel).
        config.memory_mib = 1 << 20;
        config.start_gate = Some(StartGate(Box::new(|| {
            Err(std::io::Error::other("not in the cgroup yet"))
        })));
        let Err(e) = build_microvm(config) else {
            panic!("the VM was built")
        };
        assert!(matches!(e, BuildError::StartGate(_)), "{e}");
        assert!(e.to_string().contains("not in the cgroup yet"), "{e}");
    }
}
