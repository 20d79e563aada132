//! The pod's network in the VM: CNI configured a veth in the pod's network namespace; the shim
//! adds a tap beside it, redirects all traffic between the two with tc (mirred, as Kata's
//! tcfilter does), gives the guest NIC the veth's MAC, and has the agent apply the veth's
//! addresses and routes. iproute2 does the namespace-side work.

use std::path::{Path, PathBuf};
use std::process::Command;

use protocol::agent::{ConfigureNetworkRequest, Interface, IpAddress, Route};

use crate::error::{Result, ShimError};

/// Name of the tap in the pod's network namespace.
pub const TAP: &str = "tap0_kv";

/// What the guest NIC must look like: the CNI veth's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    pub netns: PathBuf,
    pub veth: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub addresses: Vec<(String, u32)>,
    /// (destination, gateway) of routes through a gateway; "default" for the default route.
    pub routes: Vec<(String, String)>,
}

fn ip_json(netns: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("ip")
        .arg("-j")
        .args(args)
        .output()
        .map_err(ShimError::io("run nsenter ip (util-linux, iproute2)"))?;
    if !out.status.success() {
        return Err(ShimError::Command {
            what: format!("ip {} in {}", args.join(" "), netns.display()),
            why: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| ShimError::invalid("ip -j output", e.to_string()))
}

fn in_netns(netns: &Path, what: &str, cmd: &[&str]) -> Result<()> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(cmd)
        .output()
        .map_err(ShimError::io(format!("run {what}")))?;
    if !out.status.success() {
        return Err(ShimError::Command {
            what: format!("{what} in {}", netns.display()),
            why: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Reads the pod network CNI made: the one non-loopback link, its addresses and routes.
pub fn discover(netns: &Path) -> Result<PodNetwork> {
    let links = ip_json(netns, &["link", "show"])?;
    let veth = links
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["link_type"] == "ether" && l["ifname"] != TAP)
        .ok_or_else(|| {
            ShimError::invalid(
                "pod network",
                format!("no ethernet link in {}", netns.display()),
            )
        })?;
    let name = veth["ifname"].as_str().unwrap_or_default().to_owned();
    let mac = veth["address"]
        .as_str()
        .and_then(vmm::config::parse_mac)
        .ok_or_else(|| ShimError::invalid("pod network", format!("link {name} has no MAC")))?;
    let mtu = veth["mtu"].as_u64().unwrap_or(1500) as u32;
    let addrs = ip_json(netns, &["addr", "show", "dev", &name])?;
    let addresses = addrs[0]["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["scope"] == "global")
        .filter_map(|a| {
            Some((
                a["local"].as_str()?.to_owned(),
                a["prefixlen"].as_u64()? as u32,
            ))
        })
        .collect();
    let mut routes = Vec::new();
    for family in ["-4", "-6"] {
        let r = ip_json(netns, &[family, "route", "show", "dev", &name])?;
        for route in r.as_array().into_iter().flatten() {
            if let (Some(dst), Some(gw)) = (route["dst"].as_str(), route["gateway"].as_str()) {
                routes.push((dst.to_owned(), gw.to_owned()));
            }
        }
    }
    Ok(PodNetwork {
        netns: netns.to_owned(),
        veth: name,
        mac,
        mtu,
        addresses,
        routes,
    })
}

/// Joins tap and veth with tc redirects both ways (the tap exists once the VM runs).
pub fn connect_tap(n: &PodNetwork) -> Result<()> {
    let mtu = n.mtu.to_string();
    in_netns(
        &n.netns,
        "ip link set tap up",
        &["ip", "link", "set", TAP, "mtu", &mtu, "up"],
    )?;
    for (from, to) in [(n.veth.as_str(), TAP), (TAP, n.veth.as_str())] {
        in_netns(
            &n.netns,
            "tc qdisc add ingress",
            &["tc", "qdisc", "add", "dev", from, "ingress"],
        )?;
        in_netns(
            &n.netns,
            "tc filter add mirred",
            &[
                "tc", "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32",
                "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
            ],
        )?;
    }
    Ok(())
}

/// What the agent applies in the guest.
pub fn guest_config(n: &PodNetwork) -> ConfigureNetworkRequest {
    let mac = n.mac.map(|b| format!("{b:02x}")).join(":");
    ConfigureNetworkRequest {
        interfaces: vec![Interface {
            mac,
            name: "eth0".into(),
            mtu: n.mtu,
            addresses: n
                .addresses
                .iter()
                .map(|(a, p)| IpAddress {
                    address: a.clone(),
                    prefix_len: *p,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        routes: n
            .routes
            .iter()
            .map(|(dst, gw)| Route {
                destination: dst.clone(),
                gateway: gw.clone(),
                device: "eth0".into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// The pod's network namespace from the OCI spec: `None` for a new, empty one (ctr run),
/// an error for the host's (hostNetwork), which a VM cannot join.
pub fn netns_of(spec: &serde_json::Value, sandbox: bool) -> Result<Option<PathBuf>> {
    let ns = spec["linux"]["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["type"] == "network");
    match ns {
        Some(n) => Ok(n["path"]
            .as_str()
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)),
        None if sandbox => Err(ShimError::Unsupported(
            "hostNetwork pods cannot run in a VM: the pod has no network namespace of its own"
                .into(),
        )),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_network_is_refused_clearly() {
        let host =
            serde_json::json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}});
        let e = netns_of(&host, true).unwrap_err().to_string();
        assert!(e.contains("hostNetwork"), "{e}");
        assert_eq!(netns_of(&host, false).unwrap(), None);
        let pod = serde_json::json!({"linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"}]}});
        assert_eq!(
            netns_of(&pod, true).unwrap(),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
    }

    #[test]
    fn guest_config_mirrors_the_veth() {
        let n = PodNetwork {
            netns: "/x".into(),
            veth: "eth0".into(),
            mac: [2, 0, 0, 0, 0, 5],
            mtu: 1450,
            addresses: vec![("10.88.0.5".into(), 16)],
            routes: vec![("default".into(), "10.88.0.1".into())],
        };
        let g = guest_config(&n);
        assert_eq!(g.interfaces[0].mac, "02:00:00:00:00:05");
        assert_eq!(g.interfaces[0].addresses[0].address, "10.88.0.5");
        assert_eq!(g.routes[0].gateway, "10.88.0.1");
    }
}
