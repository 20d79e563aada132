//! A pod's I/O rate limits, from its annotations (containerd passes `kubevirt.io/*` pod
//! annotations on, see deploy/containerd): each of the pod's disks and its NIC are held to
//! them by token buckets in the devices (`devices::rate_limit`). Rates are per second, in
//! Kubernetes quantity form (`20Mi`, `500`).

use devices::rate_limit::{Rate, RateLimit};

use crate::error::{Result, ShimError};

pub const DISK_BANDWIDTH: &str = "kubevirt.io/disk-bandwidth";
pub const DISK_IOPS: &str = "kubevirt.io/disk-iops";
pub const NET_RX_BANDWIDTH: &str = "kubevirt.io/net-rx-bandwidth";
pub const NET_RX_PPS: &str = "kubevirt.io/net-rx-pps";
pub const NET_TX_BANDWIDTH: &str = "kubevirt.io/net-tx-bandwidth";
pub const NET_TX_PPS: &str = "kubevirt.io/net-tx-pps";

/// Limits of each disk of the pod (images, scratch, volumes) and of each NIC direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodRates {
    pub disk: RateLimit,
    /// Into the pod.
    pub net_rx: RateLimit,
    /// Out of the pod.
    pub net_tx: RateLimit,
}

/// The limits a sandbox's OCI spec asks for through its annotations.
pub fn from_spec(spec: &serde_json::Value) -> Result<PodRates> {
    let get = |key: &str| -> Result<Option<u64>> {
        match &spec["annotations"][key] {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::String(v) => v
                .parse::<Rate>()
                .map(|r| Some(r.0))
                .map_err(|e| ShimError::invalid(format!("pod annotation {key}"), e.to_string())),
            other => Err(ShimError::invalid(
                format!("pod annotation {key}"),
                format!("{other} is not a string"),
            )),
        }
    };
    let pair = |bytes, ops| -> Result<RateLimit> {
        Ok(RateLimit {
            bytes_per_sec: get(bytes)?,
            ops_per_sec: get(ops)?,
        })
    };
    Ok(PodRates {
        disk: pair(DISK_BANDWIDTH, DISK_IOPS)?,
        net_rx: pair(NET_RX_BANDWIDTH, NET_RX_PPS)?,
        net_tx: pair(NET_TX_BANDWIDTH, NET_TX_PPS)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_become_limits() {
        let spec = serde_json::json!({"annotations": {
            DISK_BANDWIDTH: "20Mi", DISK_IOPS: "500", NET_TX_BANDWIDTH: "1M",
            "kubevirt.io/other": "ignored"
        }});
        let r = from_spec(&spec).unwrap();
        assert_eq!(r.disk.bytes_per_sec, Some(20 << 20));
        assert_eq!(r.disk.ops_per_sec, Some(500));
        assert!(r.net_rx.is_unlimited());
        assert_eq!(r.net_tx.bytes_per_sec, Some(1_000_000));
        assert_eq!(r.net_tx.ops_per_sec, None);
        assert_eq!(
            from_spec(&serde_json::json!({})).unwrap(),
            PodRates::default()
        );
    }

    #[test]
    fn a_bad_rate_names_its_annotation() {
        for bad in [
            serde_json::json!("fast"),
            serde_json::json!("0"),
            serde_json::json!(5),
        ] {
            let spec = serde_json::json!({"annotations": {NET_RX_PPS: bad}});
            let e = from_spec(&spec).unwrap_err().to_string();
            assert!(e.contains(NET_RX_PPS), "{e}");
        }
    }
}
