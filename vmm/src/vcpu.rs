//! vCPU threads: an explicit state machine driven by requests from the VMM, KVM_RUN exits
//! dispatched to the port I/O and MMIO buses, and a signal that kicks a vCPU out of the guest.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;

use kvm_bindings::{kvm_run, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::bus::Bus;
use crate::legacy::ResetLine;

/// Errors while starting or controlling vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot start thread vcpu{id}: {source}")]
    Spawn { id: u8, source: std::io::Error },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("vcpu{0} is gone")]
    Gone(u8),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// Where a vCPU is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    Running,
    Paused,
    Exited,
}

/// Requests the VMM sends a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuRequest {
    Pause,
    Resume,
    Stop,
}

/// Why a vCPU stopped running guest code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuExitReason {
    /// Stopped on request from the VMM.
    Stopped,
    /// The guest asked KVM for a reset or shutdown (system event).
    Reset,
    Poweroff,
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    TripleFault {
        rip: u64,
    },
    /// KVM could not emulate an instruction (or another internal error).
    InternalError {
        suberror: u32,
        rip: u64,
    },
    /// VM entry failed.
    FailEntry {
        reason: u64,
    },
    /// KVM_RUN failed outright.
    Kvm(String),
    /// An exit the VMM does not handle.
    Unhandled(String),
}

thread_local! {
    // This thread's kvm_run page, so the kick handler can make KVM_RUN return at once.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    KVM_RUN.with(|r| {
        let p = r.get();
        if !p.is_null() {
            // SAFETY: `p` is this thread's kvm_run mapping, set by the vCPU loop and valid
            // until the thread ends; a volatile byte store is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
        }
    });
}

/// The signal used to kick vCPUs (a real-time signal, unused by the C runtime).
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal);
    });
    result
}

/// A configured vCPU, not yet running.
pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    /// Pulled by the guest's reset command (see `legacy::ResetLine`).
    reset: ResetLine,
    /// KVM_RUN returns so far (VM exits), for metrics.
    exits: Arc<AtomicU64>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Vcpu({})", self.id)
    }
}

/// The VMM's side of a running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    pub id: u8,
    /// KVM_RUN returns so far (VM exits).
    pub exits: Arc<AtomicU64>,
    requests: Sender<VcpuRequest>,
    states: Mutex<Receiver<VcpuState>>,
    /// Set by the thread as it leaves its run loop, for good.
    ended: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl VcpuHandle {
    /// Sends a request, kicks the thread out of KVM_RUN and waits for the resulting state.
    pub fn request(&self, req: VcpuRequest) -> Result<VcpuState, VcpuError> {
        let states = crate::bus::lock(&self.states);
        if self.ended.load(Ordering::Acquire) {
            return Ok(VcpuState::Exited);
        }
        let answer = self.requests.send(req).ok().and_then(|()| {
            self.kick();
            states.recv().ok()
        });
        match answer {
            Some(state) => Ok(state),
            // It ended (and left) while the request was on its way.
            None if self.ended.load(Ordering::Acquire) => Ok(VcpuState::Exited),
            None => Err(VcpuError::Gone(self.id)),
        }
    }

    fn kick(&self) {
        if let Some(t) = crate::bus::lock(&self.thread).as_ref() {
            let _ = t.kill(kick_signal());
        }
    }

    /// Waits for the thread to end.
    pub fn join(&self) {
        if let Some(t) = crate::bus::lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl Vcpu {
    pub fn new(id: u8, fd: VcpuFd, pio: Arc<Bus>, mmio: Arc<Bus>, reset: ResetLine) -> Self {
        Self {
            id,
            fd,
            pio,
            mmio,
            reset,
            exits: Arc::default(),
        }
    }

    /// Starts thread `vcpu<id>`. When the guest ends the vCPU's life (reset, fault, error),
    /// the reason goes to `exits` and `exit_evt` wakes the VMM thread.
    pub fn start(
        self,
        exits: Sender<(u8, VcpuExitReason)>,
        exit_evt: EventFd,
        seccomp: bool,
    ) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let kind = crate::seccomp::ThreadKind::Vcpu;
        let filter = seccomp.then(|| crate::seccomp::filter(kind)).transpose()?;
        let id = self.id;
        let exits_count = self.exits.clone();
        let (req_tx, req_rx) = channel();
        let (state_tx, state_rx) = channel();
        let ended = Arc::new(AtomicBool::new(false));
        let ended_here = ended.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let mut this = self;
                // Confined before the first guest instruction; unconfined is not an option.
                let confined = match &filter {
                    Some(f) => crate::seccomp::apply(kind, f)
                        .map_err(|e| VcpuExitReason::Kvm(e.to_string())),
                    None => Ok(()),
                };
                let reason = match confined {
                    Ok(()) => this.run(&req_rx, &state_tx),
                    Err(reason) => reason,
                };
                KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
                // Requests from now on are answered `Exited` by the handle itself, so
                // the thread leaves at once rather than wait for the VMM's stop.
                ended_here.store(true, Ordering::Release);
                if reason != VcpuExitReason::Stopped {
                    let _ = exits.send((id, reason));
                    let _ = exit_evt.write(1);
                } else {
                    let _ = state_tx.send(VcpuState::Exited);
                }
            })
            .map_err(|source| VcpuError::Spawn { id, source })?;
        Ok(VcpuHandle {
            id,
            exits: exits_count,
            requests: req_tx,
            states: Mutex::new(state_rx),
            ended,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Handles pending requests; returns a reason to leave the run loop on Stop.
    fn handle_requests(
        &mut self,
        req_rx: &Receiver<VcpuRequest>,
        state_tx: &Sender<VcpuState>,
    ) -> Option<VcpuExitReason> {
        while let Ok(req) = req_rx.try_recv() {
            match req {
                VcpuRequest::Stop => return Some(VcpuExitReason::Stopped),
                VcpuRequest::Resume => {
                    let _ = state_tx.send(VcpuState::Running);
                }
                VcpuRequest::Pause => {
                    let _ = state_tx.send(VcpuState::Paused);
                    // Paused: block until resumed or stopped.
                    loop {
                        match req_rx.recv() {
                            Ok(VcpuRequest::Resume) => {
                                let _ = state_tx.send(VcpuState::Running);
                                break;
                            }
                            Ok(VcpuRequest::Pause) => {
                                let _ = state_tx.send(VcpuState::Paused);
                            }
                            Ok(VcpuRequest::Stop) | Err(_) => return Some(VcpuExitReason::Stopped),
                        }
                    }
                }
            }
        }
        None
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    fn run(
        &mut self,
        req_rx: &Receiver<VcpuRequest>,
        state_tx: &Sender<VcpuState>,
    ) -> VcpuExitReason {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|r| r.set(run_ptr));
        loop {
            let ran = self.fd.run();
            self.exits.fetch_add(1, Ordering::Relaxed);
            let exit = match ran {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.pio.read(port as u64, data) {
                        data.fill(0xff); // nothing there: an open bus reads all ones
                    }
                    continue;
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.pio.write(port as u64, data);
                    // A reset (i8042) ends the guest: leave without entering it again.
                    if !self.reset.pulled() {
                        continue;
                    }
                    Some(VcpuExitReason::Reset)
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0);
                    }
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.mmio.write(addr, data);
                    continue;
                }
                Ok(VcpuExit::Intr) => None,
                Ok(VcpuExit::Shutdown) => Some(VcpuExitReason::TripleFault { rip: 0 }),
                Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                    KVM_SYSTEM_EVENT_RESET => VcpuExitReason::Reset,
                    KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExitReason::Poweroff,
                    other => VcpuExitReason::Unhandled(format!("system event {other}")),
                }),
                Ok(VcpuExit::InternalError) => Some(VcpuExitReason::InternalError {
                    // SAFETY: KVM filled the `internal` member of the union for this exit.
                    suberror: unsafe { (*run_ptr).__bindgen_anon_1.internal.suberror },
                    rip: 0,
                }),
                Ok(VcpuExit::FailEntry(reason, _)) => Some(VcpuExitReason::FailEntry { reason }),
                Ok(VcpuExit::Hlt) => Some(VcpuExitReason::Unhandled("hlt".into())),
                Ok(other) => Some(VcpuExitReason::Unhandled(format!("{other:?}"))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(VcpuExitReason::Kvm(e.to_string())),
            };
            match exit {
                Some(VcpuExitReason::TripleFault { .. }) => {
                    return VcpuExitReason::TripleFault { rip: self.rip() }
                }
                Some(VcpuExitReason::InternalError { suberror, .. }) => {
                    return VcpuExitReason::InternalError {
                        suberror,
                        rip: self.rip(),
                    }
                }
                Some(reason) => return reason,
                None => {
                    // Kicked: clear the flag KVM honours, then look at what the VMM wants.
                    // SAFETY: run_ptr is this vCPU's kvm_run mapping, alive with self.fd.
                    unsafe { std::ptr::addr_of_mut!((*run_ptr).immediate_exit).write_volatile(0) };
                    if let Some(r) = self.handle_requests(req_rx, state_tx) {
                        return r;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::config::{SerialOutput, VmConfig};

    /// Needs /dev/kvm, as every KVM test here. Nothing asks the vCPU to stop: it leaves on
    /// its own once the guest reset, and later requests still get their answer.
    #[test]
    fn a_vcpu_the_guest_ended_leaves_without_being_asked() {
        let mut cfg = VmConfig::new(crate::guests::test_guest("hello"));
        cfg.memory_mib = 32;
        cfg.serial_output = SerialOutput::Sink;
        let mut vmm = crate::build_microvm(cfg).unwrap();
        let vcpu = vmm.vcpus.pop().unwrap();
        let (exits_tx, exits) = channel();
        let evt = EventFd::new(0).unwrap();
        let handle = vcpu
            .start(exits_tx, evt.try_clone().unwrap(), true)
            .unwrap();
        assert_eq!(evt.read().unwrap(), 1, "the vCPU reports its end");
        assert_eq!(exits.recv().unwrap(), (0, VcpuExitReason::Reset));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !crate::bus::lock(&handle.thread)
            .as_ref()
            .unwrap()
            .is_finished()
        {
            assert!(Instant::now() < deadline, "vcpu0 still waits for a request");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            handle.request(VcpuRequest::Pause).unwrap(),
            VcpuState::Exited
        );
        assert_eq!(
            handle.request(VcpuRequest::Stop).unwrap(),
            VcpuState::Exited
        );
        handle.join();
    }
}
