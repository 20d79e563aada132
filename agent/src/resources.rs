//! Applies an OCI `linux.resources` update (CRI UpdateContainerResources) to a container's
//! cgroup v2 directory, with runc's conversions (shares -> weight).

use std::fs;
use std::path::Path;

use oci_spec::runtime::LinuxResources;

use crate::error::{AgentError, Result};

fn write(dir: &Path, file: &str, value: &str) -> Result<()> {
    fs::write(dir.join(file), value).map_err(AgentError::io(format!("write {value:?} to {file}")))
}

fn limit(v: i64) -> String {
    if v < 0 {
        "max".into()
    } else {
        v.to_string()
    }
}

/// cgroup v1 cpu.shares (2..262144) to v2 cpu.weight (1..10000), as runc converts it.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142
}

pub fn apply(dir: &Path, json: &[u8]) -> Result<()> {
    let r: LinuxResources = serde_json::from_slice(json)
        .map_err(|e| AgentError::invalid("linux.resources", e.to_string()))?;
    if let Some(m) = r.memory() {
        if let Some(l) = m.limit() {
            write(dir, "memory.max", &limit(l))?;
        }
        if let Some(s) = m.reservation() {
            write(dir, "memory.low", &limit(s))?;
        }
    }
    if let Some(c) = r.cpu() {
        if c.quota().is_some() || c.period().is_some() {
            let quota = c.quota().map(limit).unwrap_or_else(|| "max".into());
            let period = c.period().unwrap_or(100_000);
            write(dir, "cpu.max", &format!("{quota} {period}"))?;
        }
        if let Some(shares) = c.shares() {
            let w = shares_to_weight(shares);
            if w > 0 {
                write(dir, "cpu.weight", &w.to_string())?;
            }
        }
        if let Some(cpus) = c.cpus().as_deref().filter(|s| !s.is_empty()) {
            write(dir, "cpuset.cpus", cpus)?;
        }
        if let Some(mems) = c.mems().as_deref().filter(|s| !s.is_empty()) {
            write(dir, "cpuset.mems", mems)?;
        }
    }
    if let Some(p) = r.pids() {
        write(dir, "pids.max", &limit(p.limit()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_convert_like_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(0), 0);
    }

    #[test]
    fn update_writes_the_cgroup_files() {
        let dir = std::env::temp_dir().join(format!("agent-res-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let json = br#"{"memory":{"limit":268435456},"cpu":{"quota":50000,"period":100000,"shares":512},"pids":{"limit":64}}"#;
        apply(&dir, json).unwrap();
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("memory.max"), "268435456");
        assert_eq!(read("cpu.max"), "50000 100000");
        assert_eq!(read("cpu.weight"), "20");
        assert_eq!(read("pids.max"), "64");
        assert!(apply(&dir, b"{\"memory\":7}")
            .unwrap_err()
            .to_string()
            .contains("linux.resources"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
