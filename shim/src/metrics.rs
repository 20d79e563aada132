//! Container stats from the agent as containerd's cgroup v2 `Metrics` (what `ctr task metrics`
//! and the CRI stats decode).

use containerd_shim::protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use protocol::agent::StatsResponse;

pub const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

pub fn metrics(s: &StatsResponse) -> Metrics {
    Metrics {
        pids: Some(PidsStat {
            current: s.pids_current,
            ..Default::default()
        })
        .into(),
        cpu: Some(CPUStat {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            ..Default::default()
        })
        .into(),
        memory: Some(MemoryStat {
            usage: s.memory_usage_bytes,
            usage_limit: s.memory_limit_bytes,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

pub fn to_any(s: &StatsResponse) -> Result<Any, String> {
    Ok(Any {
        type_url: METRICS_TYPE_URL.into(),
        value: metrics(s).write_to_bytes().map_err(|e| e.to_string())?,
        ..Default::default()
    })
}
