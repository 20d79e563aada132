//! The pod's shared PID namespace (shareProcessNamespace). On runc a pod's containers then
//! share the pause container's namespace, with `pause` as PID 1; here they share one of its
//! own whose PID 1 is this agent binary run as `pause`: it reaps what the containers orphan
//! and nothing else. The containers see each other and `pause`, not the agent, which stays
//! out of their reach. (hostPID containers get the VM's namespace, the agent's.)

use std::ffi::CString;
use std::path::PathBuf;
use std::sync::Mutex;

use nix::sched::CloneFlags;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use crate::error::Result;
use crate::reexec::{self, Layout};

/// The name the agent binary answers to as the pod's init (its argv[0]).
pub const NAME: &str = "pause";

/// The pod's init, started on first use.
#[derive(Debug, Default)]
pub struct PodInit {
    pid: Mutex<Option<i32>>,
}

impl PodInit {
    /// The pod's PID namespace, as a path a runtime can join; starts its init if needed.
    pub fn pid_namespace(&self) -> Result<PathBuf> {
        let mut pid = self.pid.lock().unwrap_or_else(|e| e.into_inner());
        let pid = match *pid {
            Some(p) => p,
            None => *pid.insert(start()?),
        };
        Ok(PathBuf::from(format!("/proc/{pid}/ns/pid")))
    }
}

/// Starts this binary as `pause`, PID 1 of a new PID namespace; returns its PID here. The
/// agent's descriptors are not pause's business: a container's pipe held open there would
/// never see its end, so it gets none.
fn start() -> Result<i32> {
    let pid = reexec::spawn(NAME, &[], &[], CloneFlags::CLONE_NEWPID, Layout::Random)?;
    log::info!("pod PID namespace: pause is pid {pid}");
    Ok(pid.as_raw())
}

/// Runs as the pod's PID 1: never ends, and leaves no zombie of the containers' orphans.
pub fn serve() -> ! {
    // Exec'd through /proc/self/exe, the process would be called `exe`.
    let _ = nix::sys::prctl::set_name(&CString::new(NAME).unwrap_or_default());
    // The last process the OOM killer picks: the namespace ends with it.
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    // Children of a process that ignores SIGCHLD are reaped by the kernel as they end.
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: ignoring a signal installs no handler code.
    let _ = unsafe { sigaction(Signal::SIGCHLD, &ignore) };
    loop {
        nix::unistd::pause();
    }
}
