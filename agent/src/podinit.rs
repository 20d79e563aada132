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

use crate::error::{AgentError, Result};

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

/// Starts this binary as `pause`, PID 1 of a new PID namespace; returns its PID here.
fn start() -> Result<i32> {
    let exe = CString::new("/proc/self/exe").unwrap_or_default();
    let name = CString::new(NAME).unwrap_or_default();
    let argv = [name.as_ptr(), std::ptr::null()];
    // The child runs on this stack in its own copy of the agent's memory, and only makes
    // system calls: the agent's other threads may hold locks it must not touch.
    let mut stack = vec![0u8; 64 << 10];
    let child = Box::new(|| {
        // SAFETY: close_range, execv and _exit take no locks and allocate nothing; the
        // strings live in this (copied) frame. The agent's descriptors are not pause's
        // business: a container's pipe held open here would never see its end.
        unsafe {
            libc::syscall(libc::SYS_close_range, 3, u32::MAX, 0);
            libc::execv(exe.as_ptr(), argv.as_ptr());
            libc::_exit(127)
        }
    });
    // SAFETY: the child only runs the closure above (see there); its stack outlives the
    // call, as the child has a copy of it.
    let pid = unsafe {
        nix::sched::clone(
            child,
            &mut stack,
            CloneFlags::CLONE_NEWPID,
            Some(libc::SIGCHLD),
        )
    }
    .map_err(AgentError::sys("start the pod's PID namespace"))?;
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
