//! Per-thread seccomp filters: each VMM thread may make only the system calls its job
//! needs, installed before the guest runs. Any other call kills the whole VMM process (a
//! guest that subverts a device cannot reach the rest of the kernel's surface).

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

pub mod tree;

/// Errors while building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {thread} seccomp filter: {source}")]
    Build {
        thread: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot lay the {thread} seccomp filter out: {source}")]
    Layout {
        thread: &'static str,
        source: tree::TreeError,
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
    /// A device served over vhost-user (qemu machine): the frontend's messages (guest
    /// memory and eventfds arrive as descriptors), the library's vring workers it starts,
    /// the device back ends, and the relay in front of it.
    Device,
    /// A disk's I/O thread: reads, writes, syncs and discards on the disk's descriptor.
    DiskIo,
    /// The shim's control plane (containerd's requests, pod set-up and tear-down): every
    /// thread of the shim but the spawner. A superset of the lists above, since the device
    /// and VMM threads it starts stack their filters on it. No exec (children start on the
    /// unconfined spawner thread), no ptrace, BPF, perf, module, key, kexec, io_uring,
    /// userfaultfd, file-handle, pivot_root or identity calls.
    Control,
    /// The node's metrics exporter (`containerd-shim-kubevirt-v1 metrics`), whose clients
    /// come from the network: a thread per client, the pods' metrics sockets, the state
    /// directory read.
    Exporter,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::Vmm => "vmm",
            Self::Device => "vhost-user device",
            Self::DiskIo => "disk I/O",
            Self::Control => "shim control",
            Self::Exporter => "metrics exporter",
        }
    }
}

// KVM and tap ioctls the threads issue after start-up.
const KVM_RUN: u64 = 0xae80;
const KVM_GET_REGS: u64 = 0x8090_ae81;
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
// Discard on a host block device (the disk I/O threads).
const BLKDISCARD: u64 = 0x1277;
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
    // glibc's malloc grows a thread arena's heap by unprotecting more of it.
    libc::SYS_mprotect,
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
    // The kernel's own restart of a sleep a signal interrupted.
    libc::SYS_restart_syscall,
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
    // Rate limiters arm their timers.
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

/// A vhost-user device thread also maps the guest memory QEMU sends, makes the eventfds and
/// epolls of each session, and starts the library's vring worker threads (which inherit
/// this filter): thread creation, but no exec.
const DEVICE_EXTRA: &[i64] = &[
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_dup,
    libc::SYS_dup3,
];

/// A disk I/O thread: vectored reads and writes at an offset, syncs, hole punching.
const DISK_IO_EXTRA: &[i64] = &[
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_pwritev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_lseek,
];

/// The shim's control plane: files and directories of pod state, images and volumes,
/// mounts, namespaces, sockets (containerd, the agent, netlink), threads, children's ends.
const CONTROL_EXTRA: &[i64] = &[
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rmdir,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_link,
    libc::SYS_linkat,
    libc::SYS_symlink,
    libc::SYS_symlinkat,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_chown,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_lchown,
    libc::SYS_utimensat,
    libc::SYS_truncate,
    libc::SYS_ftruncate,
    libc::SYS_getdents64,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_sendfile,
    libc::SYS_copy_file_range,
    libc::SYS_splice,
    libc::SYS_mknodat,
    libc::SYS_flock,
    libc::SYS_dup2,
    libc::SYS_pipe2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_timerfd_create,
    libc::SYS_memfd_create,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_kill,
    libc::SYS_tkill,
    libc::SYS_pidfd_open,
    // The shim's file sync watches the sources of files it copied into the VM.
    libc::SYS_inotify_init1,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_rm_watch,
    libc::SYS_pidfd_send_signal,
    libc::SYS_sched_setaffinity,
    libc::SYS_rt_sigaction,
    libc::SYS_set_tid_address,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getppid,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_getrusage,
    libc::SYS_prlimit64,
    libc::SYS_capget,
    libc::SYS_chdir,
    libc::SYS_fchdir,
    libc::SYS_close_range,
    libc::SYS_clock_getres,
    libc::SYS_fadvise64,
    // The device and disk threads it starts install their own, narrower filters.
    libc::SYS_seccomp,
];

/// `openat` flags that write, create or truncate: none may be set (`__O_TMPFILE` alone:
/// `O_TMPFILE` also holds the bit of `O_DIRECTORY`, which a read-only open may use).
const OPEN_WRITE_FLAGS: u64 =
    (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND | 0o2000_0000) as u64;

/// glibc looks things up lazily on whichever thread first needs them (the malloc arena
/// limit from /sys/devices/system/cpu/online is one seen here, under load, even after
/// `settle_process`): every thread may open files read-only, none may write or create one.
fn read_only_open() -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(OPEN_WRITE_FLAGS),
        0,
    )?])
}

fn ioctl_rule(request: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        request,
    )?])
}

/// The metrics exporter lists the state directory and starts a thread per client (glibc
/// sets its cancellation handler up as it makes the first).
const EXPORTER_EXTRA: &[i64] = &[libc::SYS_getdents64, libc::SYS_rt_sigaction];

/// The system calls a kind of thread may make with any arguments (`ioctl` and `openat`
/// come on top, with conditions).
fn allowed(kind: ThreadKind) -> impl Iterator<Item = i64> {
    let extra: &[&[i64]] = match kind {
        ThreadKind::Vcpu => &[],
        // The event loop and the device threads also do file I/O of their own.
        ThreadKind::Vmm => &[VMM_EXTRA, DISK_IO_EXTRA],
        ThreadKind::Device => &[VMM_EXTRA, DISK_IO_EXTRA, DEVICE_EXTRA],
        ThreadKind::DiskIo => &[DISK_IO_EXTRA],
        ThreadKind::Control => &[VMM_EXTRA, DISK_IO_EXTRA, DEVICE_EXTRA, CONTROL_EXTRA],
        ThreadKind::Exporter => &[VMM_EXTRA, DEVICE_EXTRA, EXPORTER_EXTRA],
    };
    COMMON
        .iter()
        .chain(extra.iter().copied().flatten())
        .copied()
}

/// The BPF program for one kind of thread: seccompiler's rules in our search tree.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    tree::compile(rules(kind)?).map_err(|source| SeccompError::Layout {
        thread: kind.name(),
        source,
    })
}

/// What one kind of thread may call: numbers with the rules on their arguments (none: any).
fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let build = |source| SeccompError::Build {
        thread: kind.name(),
        source,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in allowed(kind) {
        rules.insert(nr, vec![]);
    }
    let ioctls = match kind {
        ThreadKind::Vcpu => vec![KVM_RUN, KVM_GET_REGS, TUNSETOFFLOAD, FIONBIO],
        ThreadKind::Vmm | ThreadKind::Device => vec![TUNSETOFFLOAD, FIONBIO],
        ThreadKind::Exporter => vec![FIONBIO],
        ThreadKind::DiskIo => vec![BLKDISCARD],
        ThreadKind::Control => vec![],
    };
    if kind == ThreadKind::Control {
        // Files are the control plane's job; its ioctls are KVM's, tap's, block's and tty's.
        rules.insert(libc::SYS_ioctl, vec![]);
        rules.insert(libc::SYS_openat, vec![]);
    } else {
        let ioctl_rules = ioctls
            .into_iter()
            .map(ioctl_rule)
            .collect::<Result<Vec<_>, _>>();
        rules.insert(libc::SYS_ioctl, ioctl_rules.map_err(build)?);
        rules.insert(libc::SYS_openat, vec![read_only_open().map_err(build)?]);
    }
    Ok(rules)
}

/// For `devices::block::IoPool`: confines a disk I/O thread as it starts.
pub fn confine_disk_io() -> Result<(), String> {
    install(ThreadKind::DiskIo).map_err(|e| e.to_string())
}

/// Settles, once per process and before any filter, what glibc would otherwise look up
/// lazily on a confined thread: the malloc arena limit, which it computes from
/// /sys/devices/system/cpu/online when a ninth thread first allocates (an `openat` no filter
/// allows). The limit set is glibc's own default, eight arenas per CPU this process may run
/// on (one sched_getaffinity, where `available_parallelism` would also read cgroup files).
fn settle_process() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: cpu_set_t is plain data, and sched_getaffinity writes at most its size.
        let cpus = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            match libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) {
                0 => libc::CPU_COUNT(&set).max(1) as usize,
                _ => 1,
            }
        };
        // SAFETY: mallopt only sets an allocator parameter.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, (8 * cpus).min(i32::MAX as usize) as i32) };
    });
}

/// Installs the filter for `kind` on the calling thread (irrevocably).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    apply(kind, &filter(kind)?)
}

/// Installs `program`, made by `filter(kind)` (before the thread starts, say, so that a
/// filter that cannot be built is the starter's error), on the calling thread.
pub fn apply(kind: ThreadKind, program: &BpfProgram) -> Result<(), SeccompError> {
    settle_process();
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
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

    const ALL: [ThreadKind; 6] = [
        ThreadKind::Vcpu,
        ThreadKind::Vmm,
        ThreadKind::Device,
        ThreadKind::DiskIo,
        ThreadKind::Control,
        ThreadKind::Exporter,
    ];

    #[test]
    fn the_control_filter_allows_what_the_threads_it_starts_need() {
        let control: std::collections::BTreeSet<i64> = allowed(ThreadKind::Control).collect();
        for kind in ALL {
            let missing: Vec<i64> = allowed(kind).filter(|nr| !control.contains(nr)).collect();
            assert!(missing.is_empty(), "{kind:?} needs {missing:?}");
        }
    }

    #[test]
    fn a_control_thread_may_not_trace_load_bpf_or_change_identity() {
        let forbidden: [fn(); 4] = [
            // SAFETY: each call is harmless if it ran; the filter stops it first.
            || unsafe {
                libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
            },
            // SAFETY: as above (an invalid BPF command).
            || unsafe {
                libc::syscall(libc::SYS_bpf, -1, 0, 0);
            },
            // SAFETY: as above (setuid to the current uid).
            || unsafe {
                libc::setuid(libc::getuid());
            },
            // SAFETY: as above (io_uring_setup with no params).
            || unsafe {
                libc::syscall(libc::SYS_io_uring_setup, 0, 0);
            },
        ];
        for f in forbidden {
            let status = in_child(ThreadKind::Control, f);
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                "status {status}"
            );
        }
        let status = in_child(ThreadKind::Control, || {
            let path = c"/tmp/kubevirt-seccomp-control";
            // SAFETY: creating, then removing, a file of our own: the control plane may.
            unsafe {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CREAT, 0o600);
                libc::close(fd);
                libc::unlink(path.as_ptr());
            }
        });
        assert!(libc::WIFEXITED(status), "status {status}");
    }

    /// Every number (x32's and another architecture's too) and the arguments the rules look
    /// at: our tree must decide as seccompiler's own chain of the same rules would.
    #[test]
    fn every_filter_decides_as_seccompilers_chain_in_a_few_steps() {
        let requests = [KVM_RUN, KVM_GET_REGS, TUNSETOFFLOAD, FIONBIO, BLKDISCARD];
        let requests = requests
            .into_iter()
            .chain([libc::TIOCGWINSZ, 0, 1 << 32 | KVM_RUN]);
        let flags = [libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR, libc::O_CREAT];
        let flags = flags
            .into_iter()
            .chain([libc::O_DIRECTORY, libc::O_TRUNC, libc::O_TMPFILE]);
        let argsets: Vec<[u64; 6]> = requests
            .map(|r| [0, r, 0, 0, 0, 0])
            .chain(flags.map(|f| [0, 0, f as u64, 0, 0, 0]))
            .collect();
        let audit_x86_64 = 0xc000_003e;
        for kind in ALL {
            let (tree, chain) = (filter(kind).unwrap(), tree::chain(rules(kind).unwrap()));
            let mut most = 0;
            for arch in [audit_x86_64, 0x4000_0003] {
                for nr in (0..512).chain([0x4000_0000, 0x4000_0001, u32::MAX]) {
                    for args in &argsets {
                        let (verdict, steps) = tree::run(&tree, arch, nr, *args);
                        let want = tree::run(&chain, arch, nr, *args).0;
                        assert_eq!(verdict, want, "{kind:?}: nr {nr:#x} {args:?}");
                        most = most.max(steps);
                    }
                }
            }
            // The kernel runs each new filter once per number: this is what it costs.
            assert!(
                most <= 40,
                "{kind:?}: {most} steps (the chain: {})",
                chain.len()
            );
        }
    }

    #[test]
    fn filters_build_for_every_thread_kind() {
        for kind in ALL {
            assert!(!filter(kind).unwrap().is_empty(), "{kind:?}");
        }
    }

    #[test]
    fn a_device_thread_may_start_threads_that_inherit_its_filter() {
        let status = in_child(ThreadKind::Device, || {
            let t = std::thread::spawn(|| {
                // SAFETY: opening /dev/null for writing is harmless; no filter allows it.
                unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY) };
            });
            let _ = t.join();
        });
        assert!(libc::WIFSIGNALED(status), "status {status}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    #[test]
    fn files_open_read_only_or_not_at_all() {
        for kind in ALL.into_iter().filter(|k| *k != ThreadKind::Control) {
            let status = in_child(kind, || {
                // SAFETY: a read-only open of /dev/null, then closing it.
                let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
                // SAFETY: closing the descriptor just opened.
                unsafe { libc::close(fd) };
            });
            assert!(libc::WIFEXITED(status), "{kind:?}: status {status}");
            let status = in_child(kind, || {
                let path = c"/tmp/kubevirt-seccomp-never-made";
                let flags = libc::O_WRONLY | libc::O_CREAT;
                // SAFETY: creating a file is forbidden by the filter; the call never returns.
                unsafe { libc::open(path.as_ptr(), flags, 0o600) };
            });
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                "{kind:?}: status {status}"
            );
        }
        assert!(!std::path::Path::new("/tmp/kubevirt-seccomp-never-made").exists());
    }

    #[test]
    fn a_disk_io_thread_may_not_open_sockets() {
        let status = in_child(ThreadKind::DiskIo, || {
            // SAFETY: opening a socket is harmless; the filter forbids it on disk threads.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        });
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS);
    }

    #[test]
    fn the_exporter_may_not_signal_mount_or_enter_namespaces() {
        let forbidden: [fn(); 3] = [
            // SAFETY: each call is harmless if it ran; the filter stops it first.
            || unsafe {
                libc::kill(std::process::id() as i32, 0);
            },
            // SAFETY: as above (an unshare of nothing).
            || unsafe {
                libc::unshare(0);
            },
            // SAFETY: as above (an invalid descriptor).
            || unsafe {
                libc::setns(-1, 0);
            },
        ];
        for f in forbidden {
            let status = in_child(ThreadKind::Exporter, f);
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                "status {status}"
            );
        }
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
        for kind in ALL {
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
