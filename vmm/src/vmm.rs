//! A built microVM and its life: start, pause/resume/stop from the embedding program, and
//! the exit status once the guest resets or fails.

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::lock;
use crate::vcpu::{Vcpu, VcpuError, VcpuExitReason, VcpuHandle, VcpuRequest, VcpuState};
use crate::vm::Vm;

/// Errors of a running VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("event loop failed: {0}")]
    EventLoop(event_manager::Error),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot start the vmm thread: {0}")]
    Spawn(std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset itself (i8042 or KVM reset event): a clean end.
    Reset,
    /// The guest powered off.
    Poweroff,
    /// The embedding program stopped the VM.
    Stopped,
    /// A vCPU failed: triple fault, emulation failure, entry failure, KVM error.
    Fault { vcpu: u8, reason: VcpuExitReason },
    /// The VMM itself failed.
    Error(String),
}

impl VmExit {
    /// True for the clean ends (reset, poweroff, stop).
    pub fn is_clean(&self) -> bool {
        matches!(self, Self::Reset | Self::Poweroff | Self::Stopped)
    }

    /// Process exit code for `kubevirt-vmm run`: 0 for clean ends.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Reset | Self::Poweroff | Self::Stopped => 0,
            Self::Fault {
                reason: VcpuExitReason::TripleFault { .. },
                ..
            } => 2,
            Self::Fault {
                reason: VcpuExitReason::InternalError { .. },
                ..
            } => 3,
            Self::Fault { .. } => 4,
            Self::Error(_) => 5,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reset => f.write_str("guest reset"),
            Self::Poweroff => f.write_str("guest powered off"),
            Self::Stopped => f.write_str("stopped by the VMM"),
            Self::Fault { vcpu, reason } => match reason {
                VcpuExitReason::TripleFault { rip } => {
                    write!(
                        f,
                        "vcpu{vcpu}: triple fault (KVM_EXIT_SHUTDOWN) at rip {rip:#x}"
                    )
                }
                VcpuExitReason::InternalError { suberror: 1, rip } => write!(
                    f,
                    "vcpu{vcpu}: KVM could not emulate an instruction at rip {rip:#x} \
                     (KVM_EXIT_INTERNAL_ERROR, emulation failure)"
                ),
                VcpuExitReason::InternalError { suberror, rip } => {
                    write!(
                        f,
                        "vcpu{vcpu}: KVM internal error {suberror} at rip {rip:#x}"
                    )
                }
                VcpuExitReason::FailEntry { reason } => {
                    write!(
                        f,
                        "vcpu{vcpu}: VM entry failed, hardware reason {reason:#x}"
                    )
                }
                VcpuExitReason::Kvm(e) => write!(f, "vcpu{vcpu}: KVM_RUN failed: {e}"),
                VcpuExitReason::Unhandled(e) => write!(f, "vcpu{vcpu}: unhandled exit {e}"),
                other => write!(f, "vcpu{vcpu}: {other:?}"),
            },
            Self::Error(e) => write!(f, "VMM error: {e}"),
        }
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A built VM, ready to run.
pub struct Vmm {
    pub(crate) vm: Vm,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) event_manager: EventManager<Subscriber>,
    /// Confine the vCPU and VMM threads (see `seccomp`).
    pub(crate) seccomp: bool,
    pub(crate) counters: crate::builder::DeviceCounters,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus.len())
            .finish()
    }
}

/// Shared by the embedding program's handle and the VMM thread.
#[derive(Debug)]
struct Control {
    vcpus: Vec<VcpuHandle>,
    stop_evt: EventFd,
    /// Written once every vCPU has stopped: readable for good from then on.
    ended_evt: EventFd,
}

impl Control {
    fn request_all(&self, req: VcpuRequest) -> Result<Vec<VcpuState>, VcpuError> {
        self.vcpus.iter().map(|v| v.request(req)).collect()
    }
}

/// Wakes the event loop when a vCPU ends (a guest reset is one: see `legacy::ResetLine`) or
/// on stop, and records the VM's end.
struct ExitWatcher {
    vcpu_exit_evt: EventFd,
    stop_evt: EventFd,
    exits: Receiver<(u8, VcpuExitReason)>,
    result: Arc<Mutex<Option<VmExit>>>,
}

const VCPU_EXIT: u32 = 1;
const STOP: u32 = 2;

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, data) in [(&self.vcpu_exit_evt, VCPU_EXIT), (&self.stop_evt, STOP)] {
            if let Err(e) = ops.add(Events::with_data(fd, data, EventSet::IN)) {
                *lock(&self.result) = Some(VmExit::Error(format!("cannot watch exit events: {e}")));
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let exit = match events.data() {
            VCPU_EXIT => {
                let _ = self.vcpu_exit_evt.read();
                match self.exits.try_recv() {
                    Ok((_, VcpuExitReason::Reset)) => VmExit::Reset,
                    Ok((_, VcpuExitReason::Poweroff)) => VmExit::Poweroff,
                    Ok((vcpu, reason)) => VmExit::Fault { vcpu, reason },
                    Err(_) => return,
                }
            }
            _ => {
                let _ = self.stop_evt.read();
                VmExit::Stopped
            }
        };
        let mut r = lock(&self.result);
        if r.is_none() {
            *r = Some(exit);
        }
    }
}

/// The embedding program's handle on a running VM.
#[derive(Debug)]
pub struct VmHandle {
    control: Arc<Control>,
    /// The VM's end, sent as soon as every vCPU has stopped; the `vmm` thread then tears
    /// the VM down, which in a long-lived process waits ~15 ms for KVM's MMU-notifier SRCU
    /// grace period, off the caller's path.
    done: Receiver<VmExit>,
    thread: Option<JoinHandle<()>>,
    counters: crate::builder::DeviceCounters,
}

impl VmHandle {
    /// The devices' counters.
    pub fn counters(&self) -> &crate::builder::DeviceCounters {
        &self.counters
    }

    /// Each vCPU's VM exits so far (live counters).
    pub fn exit_counters(&self) -> Vec<Arc<std::sync::atomic::AtomicU64>> {
        self.control.vcpus.iter().map(|v| v.exits.clone()).collect()
    }

    /// Pauses every vCPU; returns once all are out of the guest.
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.control.request_all(VcpuRequest::Pause).map(|_| ())
    }

    /// Resumes every vCPU.
    pub fn resume(&self) -> Result<(), VcpuError> {
        self.control.request_all(VcpuRequest::Resume).map(|_| ())
    }

    /// Asks the VM to stop; `wait` then returns `VmExit::Stopped` (unless it had already ended).
    pub fn stop(&self) {
        let _ = self.control.stop_evt.write(1);
    }

    /// A descriptor that becomes readable when the VM has ended (`wait_timeout` then has its
    /// end): for a watcher that sleeps until then.
    pub fn end_fd(&self) -> std::io::Result<OwnedFd> {
        let evt = self.control.ended_evt.try_clone()?;
        // SAFETY: the clone is a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(evt.into_raw_fd()) })
    }

    /// Waits up to `timeout` for the VM to end; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: std::time::Duration) -> Option<VmExit> {
        match self.done.recv_timeout(timeout) {
            Ok(exit) => Some(exit),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(self.vmm_thread_gone()),
        }
    }

    /// Waits for the VM to end and returns how it ended.
    pub fn wait(mut self) -> VmExit {
        match self.done.recv() {
            Ok(exit) => exit,
            Err(_) => self.vmm_thread_gone(),
        }
    }

    /// Waits for the VM's teardown too (its memory unmapped, its KVM objects freed).
    pub fn wait_teardown(mut self) -> VmExit {
        let exit = match self.done.recv() {
            Ok(exit) => exit,
            Err(_) => self.vmm_thread_gone(),
        };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        exit
    }

    fn vmm_thread_gone(&mut self) -> VmExit {
        match self.thread.take().map(JoinHandle::join) {
            Some(Err(_)) => VmExit::Error("the vmm thread panicked".into()),
            _ => VmExit::Error("the VM was already waited for".into()),
        }
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        // A handle dropped while its VM runs stops the VM; the teardown finishes in the
        // background on the vmm thread.
        if self.thread.is_some() {
            self.stop();
        }
    }
}

impl Vmm {
    /// Guest memory, for embedding programs and tests that inspect the guest.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The KVM VM, for device attachment by embedding programs.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Starts the vCPUs; returns the control block and the event loop to run, which sends
    /// the VM's end to `done` before tearing the VM down.
    fn launch(
        self,
        done: Sender<VmExit>,
    ) -> Result<(Arc<Control>, impl FnOnce() -> VmExit), VmmError> {
        let stop_evt = EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        let vcpu_exit_evt = EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        // Made before any vCPU starts, so that a failure leaves no thread behind.
        let control_stop_evt = stop_evt.try_clone().map_err(VmmError::EventFd)?;
        let ended_evt = EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        let (exit_tx, exit_rx) = std::sync::mpsc::channel();
        let Vmm {
            vm,
            mem,
            vcpus,
            mut event_manager,
            seccomp,
            counters: _,
        } = self;
        let mut handles = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let started = vcpu_exit_evt
                .try_clone()
                .map_err(VmmError::EventFd)
                .and_then(|evt| Ok(vcpu.start(exit_tx.clone(), evt, seccomp)?));
            match started {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // Leave no vCPU thread behind.
                    for h in &handles {
                        let _ = h.request(VcpuRequest::Stop);
                        h.join();
                    }
                    return Err(e);
                }
            }
        }
        let control = Arc::new(Control {
            vcpus: handles,
            stop_evt: control_stop_evt,
            ended_evt,
        });
        let result = Arc::new(Mutex::new(None));
        event_manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher {
            vcpu_exit_evt,
            stop_evt,
            exits: exit_rx,
            result: result.clone(),
        })));
        let ctl = control.clone();
        let run = move || {
            // The loop's own thread is confined before it handles any guest-driven event;
            // running unconfined is not an option, so a failure ends the VM.
            if seccomp {
                if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vmm) {
                    *lock(&result) = Some(VmExit::Error(e.to_string()));
                }
            }
            let exit = loop {
                if let Some(exit) = lock(&result).take() {
                    break exit;
                }
                if let Err(e) = event_manager.run() {
                    break VmExit::Error(VmmError::EventLoop(e).to_string());
                }
            };
            let _ = ctl.request_all(VcpuRequest::Stop);
            ctl.vcpus.iter().for_each(VcpuHandle::join);
            let _ = done.send(exit.clone());
            let _ = ctl.ended_evt.write(1);
            // The VM and its memory outlive every vCPU thread.
            drop((vm, mem));
            exit
        };
        Ok((control, run))
    }

    /// Starts the vCPUs and runs the event loop on the calling thread until the VM ends.
    ///
    /// With seccomp on, the calling thread gets the VMM thread's filter first, for good.
    pub fn run(self) -> Result<VmExit, VmmError> {
        let (done, _) = std::sync::mpsc::channel();
        let (_control, run) = self.launch(done)?;
        Ok(run())
    }

    /// Starts the vCPUs and a `vmm` thread for the event loop; returns a handle.
    pub fn start(self) -> Result<VmHandle, VmmError> {
        let (done_tx, done) = std::sync::mpsc::channel();
        let counters = self.counters.clone();
        let (control, run) = self.launch(done_tx)?;
        let thread = std::thread::Builder::new()
            .name("vmm".into())
            .spawn(move || {
                run();
            })
            .map_err(VmmError::Spawn)?;
        Ok(VmHandle {
            control,
            done,
            thread: Some(thread),
            counters,
        })
    }
}
