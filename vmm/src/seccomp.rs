//! Per-thread seccomp filters: each VMM thread may make only the system calls its job
//! needs, installed before the guest runs. Any other call kills the whole VMM process (a
//! guest that subverts a device cannot reach the rest of the kernel's surface).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors while building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {thread} seccomp filter: {source}")]
    Build {
        thread: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the {thread} seccomp filter: {source}")]
    Install {
        thread: &'static str,
        source: seccompiler::Error,
    },
}

/// The kinds of VMM thread, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs KVM_RUN and emulates port I/O and MMIO (device registers, console output).
    Vcpu,
    /// The event loop: queue notifications, device back ends, console input, exits.
    Vmm,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::Vmm => "vmm",
        }
    }
}

// KVM and tap ioctls the threads issue after start-up.
const KVM_RUN: u64 = 0xae80;
const KVM_GET_REGS: u64 = 0x8090_ae81;
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
// Rust's std sets sockets non-blocking with this ioctl (vsock connections).
const FIONBIO: u64 = 0x5421;

/// What every thread needs: memory management, locks, signals, clocks, its own exit.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_epoll_ctl,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // std's panic hook asks for the working directory to print paths: a panic (say, stdout
    // closed under `kubevirt-vmm run | head`) must print its message, not die of SIGSYS.
    libc::SYS_getcwd,
];

/// The event loop also serves device back ends (sockets, taps) and kicks vCPUs.
const VMM_EXTRA: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_fcntl,
    libc::SYS_tgkill,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_lseek,
];

fn ioctl_rule(request: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        request,
    )?])
}

/// The BPF program for one kind of thread.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build {
        thread: kind.name(),
        source,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let extra: &[i64] = match kind {
        ThreadKind::Vcpu => &[],
        ThreadKind::Vmm => VMM_EXTRA,
    };
    for &nr in COMMON.iter().chain(extra) {
        rules.insert(nr, vec![]);
    }
    let ioctls = match kind {
        ThreadKind::Vcpu => vec![KVM_RUN, KVM_GET_REGS, TUNSETOFFLOAD, FIONBIO],
        ThreadKind::Vmm => vec![TUNSETOFFLOAD, FIONBIO],
    };
    let ioctl_rules = ioctls
        .into_iter()
        .map(ioctl_rule)
        .collect::<Result<Vec<_>, _>>();
    rules.insert(libc::SYS_ioctl, ioctl_rules.map_err(build)?);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    filter.try_into().map_err(build)
}

/// Installs the filter for `kind` on the calling thread (irrevocably).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let program = filter(kind)?;
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install {
        thread: kind.name(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child with the filter installed; returns how the child ended.
    fn in_child(kind: ThreadKind, f: fn()) -> i32 {
        // SAFETY: the child only installs a filter, calls `f` and exits; it touches no
        // lock another thread of the test harness could hold.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if install(kind).is_err() {
                // SAFETY: leaving the child at once.
                unsafe { libc::_exit(3) };
            }
            f();
            // SAFETY: leaving the child at once, without running the parent's atexit code.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        status
    }

    #[test]
    fn filters_build_for_every_thread_kind() {
        assert!(!filter(ThreadKind::Vcpu).unwrap().is_empty());
        assert!(!filter(ThreadKind::Vmm).unwrap().is_empty());
    }

    #[test]
    fn allowed_calls_pass() {
        let status = in_child(ThreadKind::Vcpu, || {
            // SAFETY: plain syscalls on valid arguments.
            unsafe {
                libc::write(2, b"".as_ptr().cast(), 0);
                libc::sched_yield();
            }
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status}"
        );
    }

    #[test]
    fn forbidden_call_from_a_vcpu_thread_kills_the_process() {
        let status = in_child(ThreadKind::Vcpu, || {
            // SAFETY: opening a socket is harmless; the filter forbids it on vCPU threads.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        });
        assert!(libc::WIFSIGNALED(status), "status {status}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    #[test]
    fn forbidden_ioctl_kills_the_process() {
        let status = in_child(ThreadKind::Vmm, || {
            let mut ws = [0u16; 4];
            // SAFETY: TIOCGWINSZ on stdin with a valid buffer; forbidden by the filter.
            unsafe { libc::ioctl(0, libc::TIOCGWINSZ, ws.as_mut_ptr()) };
        });
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS);
    }

    #[test]
    fn exec_is_forbidden_everywhere() {
        for kind in [ThreadKind::Vcpu, ThreadKind::Vmm] {
            let status = in_child(kind, || {
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                // SAFETY: valid NUL-terminated path and argv; the filter forbids execve.
                unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
            });
            assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS);
        }
    }
}
