//! The pod's network in the VM: CNI configured a veth in the pod's network namespace; the shim
//! adds a tap beside it, redirects all traffic between the two with tc (mirred, as Kata's
//! tcfilter does), gives the guest NIC the veth's MAC, and has the agent apply the veth's
//! addresses and routes. Route netlink (`netlink.rs`) does the namespace-side work.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use netlink_packet_route::address::AddressScope;
use netlink_packet_route::link::{LinkAttribute, LinkLayerType};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use netlink_packet_route::AddressFamily;

use protocol::agent::{ConfigureNetworkRequest, Interface, IpAddress, Route};

use crate::error::{Result, ShimError};
use crate::netlink::{self, Rtnl};

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

/// Reads the pod network CNI made: the one non-loopback link, its addresses and routes.
pub fn discover(netns: &Path) -> Result<PodNetwork> {
    let mut nl = Rtnl::open(netns)?;
    let links = nl.links()?;
    let veth = links
        .iter()
        .find(|l| l.header.link_layer_type == LinkLayerType::Ether && netlink::name(l) != Some(TAP))
        .ok_or_else(|| {
            ShimError::invalid(
                "pod network",
                format!("no ethernet link in {}", netns.display()),
            )
        })?;
    let name = netlink::name(veth).unwrap_or_default().to_owned();
    let mac = veth
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
            _ => None,
        })
        .ok_or_else(|| ShimError::invalid("pod network", format!("link {name} has no MAC")))?;
    let mtu = veth
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(1500);
    let index = veth.header.index;
    let addresses = nl
        .addresses(index)?
        .iter()
        .filter(|a| a.header.scope == AddressScope::Universe)
        .filter_map(|a| Some((netlink::address(a)?.to_string(), a.header.prefix_len.into())))
        .collect();
    let mut routes = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        for r in nl.routes(family)? {
            if let Some(route) = gateway_route(&r, index) {
                routes.push(route);
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

/// (destination, gateway) of a main-table route out of link `index` through a gateway, as
/// `ip route` shows it ("default" or `address/prefix`).
fn gateway_route(r: &RouteMessage, index: u32) -> Option<(String, String)> {
    let mut table = u32::from(r.header.table);
    let (mut oif, mut gateway, mut dst) = (None, None, None);
    for a in &r.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(g) => gateway = ip_of(g),
            RouteAttribute::Destination(d) => dst = ip_of(d),
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || oif != Some(index) {
        return None;
    }
    let len = r.header.destination_prefix_length;
    let dst = match dst {
        Some(d) if len > 0 => format!("{d}/{len}"),
        _ => "default".to_owned(),
    };
    Some((dst, gateway?.to_string()))
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Joins tap and veth with tc redirects both ways (the tap exists once the VM runs).
pub fn connect_tap(n: &PodNetwork) -> Result<()> {
    let mut nl = Rtnl::open(&n.netns)?;
    let links = nl.links()?;
    let index_of = |name: &str| {
        links
            .iter()
            .find(|l| netlink::name(l) == Some(name))
            .map(|l| l.header.index)
            .ok_or_else(|| ShimError::NotFound(format!("link {name} in {}", n.netns.display())))
    };
    let (tap, veth) = (index_of(TAP)?, index_of(&n.veth)?);
    nl.set_up(tap, n.mtu)?;
    for (from, to) in [(veth, tap), (tap, veth)] {
        nl.add_ingress(from)?;
        nl.redirect(from, to)?;
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

    /// A network namespace made with iproute2 for one test, deleted when dropped.
    struct TestNs(String);

    impl TestNs {
        fn new(tag: &str) -> TestNs {
            let name = format!("kvshim-{tag}-{}", std::process::id());
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(std::process::Stdio::null())
                .status();
            ip(&["netns", "add", &name]);
            TestNs(name)
        }

        fn path(&self) -> PathBuf {
            PathBuf::from("/var/run/netns").join(&self.0)
        }

        fn ip(&self, args: &[&str]) -> String {
            ip(&[&["-n", &self.0], args].concat())
        }
    }

    impl Drop for TestNs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }

    fn ip(args: &[&str]) -> String {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn netlink_reads_what_cni_made_and_wires_the_tap_both_ways() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { nix::libc::geteuid() } != 0 {
            eprintln!("skipped: network namespaces need root");
            return;
        }
        let ns = TestNs::new("nl");
        // CNI leaves one ethernet link in the pod's namespace; its peer lives elsewhere.
        let other = TestNs::new("nlpeer");
        ns.ip(&[
            "link", "add", "eth0", "mtu", "1450", "type", "veth", "peer", "name", "peer0", "netns",
            &other.0,
        ]);
        ns.ip(&["link", "set", "eth0", "address", "02:aa:00:00:00:07", "up"]);
        ns.ip(&["addr", "add", "10.77.0.7/24", "dev", "eth0"]);
        ns.ip(&["addr", "add", "fd00:77::7/64", "dev", "eth0", "nodad"]);
        ns.ip(&["route", "add", "default", "via", "10.77.0.1", "dev", "eth0"]);
        ns.ip(&[
            "route",
            "add",
            "10.99.0.0/16",
            "via",
            "10.77.0.2",
            "dev",
            "eth0",
        ]);
        // A route in another table is not the pod's.
        ns.ip(&[
            "route",
            "add",
            "10.98.0.0/16",
            "via",
            "10.77.0.3",
            "dev",
            "eth0",
            "table",
            "7",
        ]);

        let n = discover(&ns.path()).unwrap();
        assert_eq!(n.veth, "eth0");
        assert_eq!(n.mac, [2, 0xaa, 0, 0, 0, 7]);
        assert_eq!(n.mtu, 1450);
        assert!(
            n.addresses.contains(&("10.77.0.7".into(), 24)),
            "{:?}",
            n.addresses
        );
        assert!(
            n.addresses.contains(&("fd00:77::7".into(), 64)),
            "{:?}",
            n.addresses
        );
        assert!(n.addresses.iter().all(|(a, _)| !a.starts_with("fe80")));
        assert_eq!(
            n.routes,
            vec![
                ("default".into(), "10.77.0.1".into()),
                ("10.99.0.0/16".into(), "10.77.0.2".into())
            ]
        );

        // Without the tap the wiring fails naming it.
        let e = connect_tap(&n).unwrap_err().to_string();
        assert!(e.contains(TAP) && e.contains(&ns.0), "{e}");
        ns.ip(&["tuntap", "add", TAP, "mode", "tap"]);
        connect_tap(&n).unwrap();
        let tap = ns.ip(&["-j", "link", "show", TAP]);
        assert!(
            tap.contains("\"UP\"") && tap.contains("\"mtu\":1450"),
            "{tap}"
        );
        for (from, to) in [("eth0", TAP), (TAP, "eth0")] {
            let out = std::process::Command::new("ip")
                .args([
                    "netns", "exec", &ns.0, "tc", "filter", "show", "dev", from, "ingress",
                ])
                .output()
                .unwrap();
            let filters = String::from_utf8_lossy(&out.stdout);
            assert!(
                filters.contains("protocol all") && filters.contains("match 00000000/00000000"),
                "{from}: {filters}"
            );
            assert!(
                filters.contains(&format!("Egress Redirect to device {to}")),
                "{from}: {filters}"
            );
        }
        // A second wiring of the same tap is refused, not doubled.
        assert!(connect_tap(&n).is_err());
        let e = discover(Path::new("/nonexistent/netns"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/netns"), "{e}");
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
