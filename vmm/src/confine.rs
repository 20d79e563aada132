//! Confinement of the VMM process the `qemu` back end starts: between fork and exec it loses
//! every capability (bounding, ambient, effective, permitted and inheritable sets) and may
//! never regain one (no_new_privs), so a guest that takes QEMU over holds a plain process of
//! the shim's uid, fenced in further by QEMU's own seccomp sandbox (`-sandbox`).

use std::io;

/// QEMU's seccomp sandbox: no obsolete calls, no privilege changes, no new processes, no
/// scheduling or resource changes.
pub const QEMU_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Linux's `_LINUX_CAPABILITY_VERSION_3` and its two 32-bit data words.
const CAP_V3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn check(r: libc::c_long) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Drops every capability of the calling process for good. Only raw system calls: it runs in
/// a forked child of a threaded process (`Command::pre_exec`), where allocating is unsafe.
pub fn drop_all_capabilities() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } as libc::c_long)?;
    // Ambient first, then the bounding set: an exec as root gets no capability back from it.
    // SAFETY: prctl with integer arguments only.
    check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } as libc::c_long)?;
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only; EINVAL past the kernel's last
        // capability ends the loop.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(io::Error::last_os_error());
        }
    }
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads the header and two data words, which live for the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn a_confined_child_has_no_capabilities_and_cannot_gain_any() {
        let mut cmd = std::process::Command::new("grep");
        cmd.args([
            "-E",
            "^(CapEff|CapPrm|CapBnd|CapAmb|NoNewPrivs)",
            "/proc/self/status",
        ]);
        // SAFETY: drop_all_capabilities makes raw system calls only.
        unsafe { cmd.pre_exec(drop_all_capabilities) };
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        for key in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
            assert!(
                text.contains(&format!("{key}:\t0000000000000000")),
                "{key}: {text}"
            );
        }
        assert!(text.contains("NoNewPrivs:\t1"), "{text}");
    }
}
