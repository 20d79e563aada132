//! Pod-wide guest state: hostname, DNS, the clock, and files copied in from the host.

use std::fs;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{AgentError, Result};
use crate::init::RUN_DIR;

/// Largest file CopyFile takes (ConfigMaps and Secrets are at most 1 MiB in Kubernetes).
const MAX_FILE: usize = 4 << 20;

pub fn set_hostname(name: &str) -> Result<()> {
    if name.is_empty() {
        return Ok(());
    }
    if name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(AgentError::invalid("hostname", format!("{name:?}")));
    }
    nix::unistd::sethostname(name).map_err(AgentError::sys("sethostname"))?;
    let path = Path::new(RUN_DIR).join("sandbox/hostname");
    fs::write(&path, format!("{name}\n"))
        .map_err(AgentError::io(format!("write {}", path.display())))
}

/// resolv.conf for the pod, at /run/kubevirt/sandbox/resolv.conf and the guest's /etc.
pub fn set_dns(servers: &[String], searches: &[String], options: &[String]) -> Result<()> {
    if servers.is_empty() && searches.is_empty() && options.is_empty() {
        return Ok(());
    }
    let mut text = String::new();
    for s in servers {
        s.parse::<std::net::IpAddr>().map_err(|_| {
            AgentError::invalid("DNS server", format!("{s:?} is not an IP address"))
        })?;
        text.push_str(&format!("nameserver {s}\n"));
    }
    let clean = |w: &String| !w.is_empty() && !w.contains(char::is_whitespace);
    if let Some(bad) = searches.iter().chain(options).find(|w| !clean(w)) {
        return Err(AgentError::invalid(
            "DNS search or option",
            format!("{bad:?}"),
        ));
    }
    if !searches.is_empty() {
        text.push_str(&format!("search {}\n", searches.join(" ")));
    }
    if !options.is_empty() {
        text.push_str(&format!("options {}\n", options.join(" ")));
    }
    for path in [
        Path::new(RUN_DIR).join("sandbox/resolv.conf"),
        PathBuf::from("/etc/resolv.conf"),
    ] {
        fs::write(&path, &text).map_err(AgentError::io(format!("write {}", path.display())))?;
    }
    Ok(())
}

/// Steps CLOCK_REALTIME: a freshly booted guest has no RTC time worth trusting.
pub fn set_time(unix_ns: i64) -> Result<()> {
    if unix_ns <= 0 {
        return Err(AgentError::invalid(
            "time",
            format!("{unix_ns} ns is not after 1970"),
        ));
    }
    let ts = nix::sys::time::TimeSpec::new(unix_ns / 1_000_000_000, unix_ns % 1_000_000_000);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
        .map_err(AgentError::sys("clock_settime"))
}

/// The guest path of a file the shim copies in: relative, no `..`, under /run/kubevirt/files.
pub fn file_path(rel: &str) -> Result<PathBuf> {
    let p = Path::new(rel);
    if rel.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(AgentError::invalid(
            "file path",
            format!("{rel:?} must be relative to {RUN_DIR}/files and stay inside it"),
        ));
    }
    Ok(Path::new(RUN_DIR).join("files").join(p))
}

/// Writes a file atomically (a rename), so containers never see half of an update.
pub fn copy_file(rel: &str, data: &[u8], mode: u32, uid: u32, gid: u32) -> Result<()> {
    let path = file_path(rel)?;
    if data.len() > MAX_FILE {
        return Err(AgentError::invalid(
            "file",
            format!("{rel:?} is {} bytes, more than {MAX_FILE}", data.len()),
        ));
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent).map_err(AgentError::io(format!("create {}", parent.display())))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp"));
    let mode = if mode == 0 { 0o644 } else { mode & 0o7777 };
    let written = fs::write(&tmp, data)
        .and_then(|_| fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)))
        .and_then(|_| chown(&tmp, Some(uid), Some(gid)))
        .and_then(|_| fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(AgentError::io(format!("write {}", path.display()))(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_paths_stay_under_files() {
        assert_eq!(
            file_path("cm/app/key").unwrap(),
            Path::new("/run/kubevirt/files/cm/app/key")
        );
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "./a"] {
            let e = file_path(bad).unwrap_err().to_string();
            assert!(e.contains("stay inside it"), "{bad}: {e}");
        }
    }
}
