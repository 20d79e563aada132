//! Starts this binary again under another name (argv[0] picks its job, see `main`). The
//! agent has many threads, any of which may hold a lock (malloc's, the logger's) at the
//! moment of the clone; the child, a copy of the agent's memory, would wait on such a lock
//! for ever. So between the clone and the exec it only makes system calls.

use std::ffi::CString;
use std::os::fd::RawFd;

use nix::sched::CloneFlags;
use nix::unistd::Pid;

use crate::error::{AgentError, Result};

/// The most descriptors a child is handed.
const MAX_FDS: usize = 4;
/// personality(2)'s argument that only reads the current persona.
const QUERY: libc::c_ulong = 0xffff_ffff;
const NO_RANDOMIZE: libc::c_ulong = libc::ADDR_NO_RANDOMIZE as libc::c_ulong;

/// How the child is laid out in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Random,
    /// The same addresses every time (ADDR_NO_RANDOMIZE), for a child started often: an
    /// emulator (QEMU's TCG) keys the code it translated by virtual address, so a child at
    /// a new random address translates all its code again, every time. The child must
    /// clear the flag (see [`randomize_from_here`]) so that what it execs is randomized.
    Fixed,
}

/// Runs /proc/self/exe as `name` with `args`, in the namespaces `flags` asks for. The child
/// gets `fds[i]` as descriptor `i` and no other descriptor above 2 (0 to 2 stay the agent's
/// where `fds` does not cover them). Returns the child's PID; PID 1's reaper collects its exit.
pub fn spawn(
    name: &str,
    args: &[&str],
    fds: &[RawFd],
    flags: CloneFlags,
    layout: Layout,
) -> Result<Pid> {
    if fds.len() > MAX_FDS {
        return Err(AgentError::invalid(
            "descriptors",
            format!("{} for {name}, at most {MAX_FDS}", fds.len()),
        ));
    }
    let cstring = |s: &str| {
        CString::new(s).map_err(|_| AgentError::invalid("argument", format!("{s:?} has a NUL")))
    };
    let exe = cstring("/proc/self/exe")?;
    let strings = std::iter::once(name)
        .chain(args.iter().copied())
        .map(cstring)
        .collect::<Result<Vec<_>>>()?;
    let argv: Vec<*const libc::c_char> = strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let keep = fds.len().max(3) as libc::c_uint;
    let mut stack = vec![0u8; 64 << 10];
    let child = Box::new(|| {
        // SAFETY: fcntl, dup2, close_range, execv and _exit take no locks and allocate
        // nothing; every buffer they read was built before the clone and lives in this
        // (copied) memory.
        unsafe {
            // Each source moves above the targets first, as it may sit on a target's number.
            let mut moved = [0; MAX_FDS];
            for (m, &fd) in moved.iter_mut().zip(fds) {
                *m = libc::fcntl(fd, libc::F_DUPFD, MAX_FDS as libc::c_int);
                if *m < 0 {
                    libc::_exit(126);
                }
            }
            for (target, &m) in moved[..fds.len()].iter().enumerate() {
                if libc::dup2(m, target as libc::c_int) < 0 {
                    libc::_exit(126);
                }
            }
            libc::syscall(libc::SYS_close_range, keep, libc::c_uint::MAX, 0);
            if layout == Layout::Fixed {
                let persona = libc::personality(QUERY);
                libc::personality(persona as libc::c_ulong | NO_RANDOMIZE);
            }
            libc::execv(exe.as_ptr(), argv.as_ptr());
            libc::_exit(127)
        }
    });
    // SAFETY: the child only runs the closure above (see there); its stack outlives the
    // call, as the child has a copy of it.
    unsafe { nix::sched::clone(child, &mut stack, flags, Some(libc::SIGCHLD)) }
        .map_err(AgentError::sys(format!("start {name}")))
}

/// Undoes [`Layout::Fixed`] for what this process execs from now on (it is inherited).
pub fn randomize_from_here() -> std::io::Result<()> {
    // SAFETY: personality(2) only reads or sets this process's execution domain flags.
    let persona = unsafe { libc::personality(QUERY) };
    if persona < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let persona = persona as libc::c_ulong;
    if persona & NO_RANDOMIZE != 0 {
        // SAFETY: as above.
        if unsafe { libc::personality(persona & !NO_RANDOMIZE) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
