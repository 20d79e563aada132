//! Guest NICs, addresses and routes over rtnetlink, from what the shim read in the pod's netns.

use std::net::IpAddr;

use futures::TryStreamExt;
use protocol::agent::{ConfigureNetworkRequest, Interface, Route};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::error::{AgentError, Result};

fn err(what: impl std::fmt::Display) -> impl FnOnce(rtnetlink::Error) -> AgentError {
    let what = what.to_string();
    move |e| AgentError::Network(format!("{what}: {e}"))
}

/// Runs `f` with an rtnetlink handle on a private single-threaded runtime.
fn with_netlink<T>(f: impl AsyncFnOnce(Handle) -> Result<T>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(AgentError::io("start the netlink runtime"))?;
    rt.block_on(async move {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(AgentError::io("open a netlink socket"))?;
        tokio::spawn(conn);
        f(handle).await
    })
}

#[derive(Debug)]
struct Link {
    index: u32,
    name: String,
    mac: Vec<u8>,
}

fn link_of(m: LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        mac: Vec::new(),
    };
    for a in m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n,
            LinkAttribute::Address(a) => l.mac = a,
            _ => {}
        }
    }
    l
}

async fn links(h: &Handle) -> Result<Vec<Link>> {
    let msgs: Vec<LinkMessage> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(err("list links"))?;
    Ok(msgs.into_iter().map(link_of).collect())
}

pub fn parse_mac(s: &str) -> Result<Vec<u8>> {
    let bytes: Vec<u8> = s
        .split(':')
        .filter_map(|b| u8::from_str_radix(b, 16).ok())
        .collect();
    if bytes.len() != 6 || s.split(':').count() != 6 {
        return Err(AgentError::invalid("MAC address", format!("{s:?}")));
    }
    Ok(bytes)
}

fn parse_ip(s: &str, what: &str) -> Result<IpAddr> {
    s.parse()
        .map_err(|_| AgentError::invalid(what, format!("{s:?} is not an IP address")))
}

/// (address, prefix) of a CIDR; "" and "default" are the default route of `family_of`'s family.
fn parse_cidr(s: &str, family_of: Option<IpAddr>) -> Result<(IpAddr, u8)> {
    if s.is_empty() || s == "default" {
        return Ok(match family_of {
            Some(IpAddr::V6(_)) => (
                "::".parse()
                    .unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)),
                0,
            ),
            _ => (IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0),
        });
    }
    let (a, p) = s.split_once('/').unwrap_or((s, ""));
    let addr = parse_ip(a, "route destination")?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = if p.is_empty() {
        max
    } else {
        p.parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| AgentError::invalid("route destination", format!("{s:?}")))?
    };
    Ok((addr, prefix))
}

async fn configure_interface(h: &Handle, all: &[Link], want: &Interface) -> Result<()> {
    let mac = parse_mac(&want.mac)?;
    let link = all
        .iter()
        .find(|l| l.mac == mac)
        .ok_or_else(|| AgentError::Network(format!("no guest NIC has MAC {}", want.mac)))?;
    let mut msg = LinkUnspec::new_with_index(link.index).up();
    if !want.name.is_empty() && want.name != link.name {
        // A link can only be renamed while down.
        h.link()
            .set(LinkUnspec::new_with_index(link.index).down().build())
            .execute()
            .await
            .map_err(err(format!("bring {} down", link.name)))?;
        msg = msg.name(want.name.clone());
    }
    if want.mtu > 0 {
        msg = msg.mtu(want.mtu);
    }
    h.link()
        .set(msg.build())
        .execute()
        .await
        .map_err(err(format!("set up {}", want.mac)))?;
    for a in &want.addresses {
        let ip = parse_ip(&a.address, "interface address")?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if a.prefix_len > max {
            return Err(AgentError::invalid(
                "prefix length",
                format!("{} for {ip}", a.prefix_len),
            ));
        }
        h.address()
            .add(link.index, ip, a.prefix_len as u8)
            .execute()
            .await
            .map_err(err(format!("add {ip}/{}", a.prefix_len)))?;
    }
    Ok(())
}

async fn add_route(h: &Handle, r: &Route) -> Result<()> {
    let gateway = (!r.gateway.is_empty())
        .then(|| parse_ip(&r.gateway, "route gateway"))
        .transpose()?;
    let (dest, prefix) = parse_cidr(&r.destination, gateway)?;
    let invalid = |e: &dyn std::fmt::Debug| AgentError::invalid("route", format!("{r:?}: {e:?}"));
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dest, prefix)
        .map_err(|e| invalid(&e))?;
    if let Some(gw) = gateway {
        b = b.gateway(gw).map_err(|e| invalid(&e))?;
    }
    if !r.device.is_empty() {
        let l = links(h).await?;
        let link = l.iter().find(|l| l.name == r.device).ok_or_else(|| {
            AgentError::Network(format!("route via unknown device {:?}", r.device))
        })?;
        b = b.output_interface(link.index);
    }
    h.route()
        .add(b.build())
        .execute()
        .await
        .map_err(err(format!(
            "add route {} via {}",
            r.destination, r.gateway
        )))
}

/// Applies interfaces first (routes need their links and addresses), then routes.
pub fn configure(req: &ConfigureNetworkRequest) -> Result<()> {
    with_netlink(async |h| {
        let all = links(&h).await?;
        for i in &req.interfaces {
            configure_interface(&h, &all, i).await?;
        }
        for r in &req.routes {
            add_route(&h, r).await?;
        }
        Ok(())
    })
}

/// Brings `lo` up: containers share the VM's network namespace, and localhost must work.
pub fn loopback_up() -> Result<()> {
    with_netlink(async |h| {
        let all = links(&h).await?;
        let lo = all
            .iter()
            .find(|l| l.name == "lo")
            .ok_or_else(|| AgentError::Network("no lo".into()))?;
        h.link()
            .set(LinkUnspec::new_with_index(lo.index).up().build())
            .execute()
            .await
            .map_err(err("bring lo up"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_cidrs_parse_strictly() {
        assert_eq!(
            parse_mac("02:00:00:aa:bb:0c").unwrap(),
            [2, 0, 0, 0xaa, 0xbb, 0x0c]
        );
        for bad in [
            "",
            "02:00:00:aa:bb",
            "02:00:00:aa:bb:0c:01",
            "zz:00:00:00:00:00",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_cidr("10.88.0.0/16", None).unwrap(),
            ("10.88.0.0".parse().unwrap(), 16)
        );
        assert_eq!(
            parse_cidr("default", Some("fd00::1".parse().unwrap())).unwrap(),
            ("::".parse().unwrap(), 0)
        );
        assert_eq!(
            parse_cidr("", None).unwrap(),
            ("0.0.0.0".parse().unwrap(), 0)
        );
        assert!(parse_cidr("10.0.0.0/33", None).is_err());
    }
}
