//! The pod's network in the guest: each interface the shim carried in is a virtio-net card
//! with the interface's MAC; it gets the pod namespace's name, MTU and addresses, then the
//! routes go in (on-link ones first, so that gateways are reachable). Loopback is always up.
use std::collections::HashMap;
use std::net::IpAddr;

use shoal_agent_api::agent::{Interface, Route as RouteSpec};
use shoal_netlink::{Link, Netlink, NetlinkError, Route};

use crate::error::{AgentError, Result};

fn invalid(msg: String) -> AgentError {
    AgentError::Network(msg)
}

fn parse_ip(what: &str, s: &str) -> Result<IpAddr> {
    s.parse()
        .map_err(|_| invalid(format!("{what}: {s:?} is not an IP address")))
}

/// Parses `ADDR/LEN`, checking the length against the family.
fn parse_cidr(what: &str, s: &str) -> Result<(IpAddr, u8)> {
    let (ip, len) = s
        .split_once('/')
        .ok_or_else(|| invalid(format!("{what}: {s:?} is not ADDRESS/PREFIX")))?;
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| invalid(format!("{what}: {s:?} is not ADDRESS/PREFIX")))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = len
        .parse::<u8>()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| invalid(format!("{what}: bad prefix length in {s:?}")))?;
    Ok((ip, len))
}

/// Brings loopback up and configures `interfaces` and `routes`.
pub fn configure(interfaces: &[Interface], routes: &[RouteSpec]) -> Result<()> {
    let mut nl = Netlink::open()?;
    let links = nl.links()?;
    loopback_up(&mut nl, &links)?;
    // Which card is which: by MAC.
    let mut plan = Vec::new();
    for iface in interfaces {
        let mac = shoal_netlink::parse_mac(&iface.mac).map_err(invalid)?;
        let link = links.iter().find(|l| l.mac == Some(mac)).ok_or_else(|| {
            invalid(format!(
                "interface {}: the guest has no network card with MAC {}",
                iface.name, iface.mac
            ))
        })?;
        if iface.name.is_empty() || iface.name.len() > 15 || iface.name.contains(['/', ' ']) {
            return Err(invalid(format!("invalid interface name {:?}", iface.name)));
        }
        plan.push((iface, link.index));
    }
    // Renamed in two steps, so that swapping names between cards cannot collide.
    for (i, (iface, index)) in plan.iter().enumerate() {
        if links
            .iter()
            .any(|l| l.index == *index && l.name != iface.name)
        {
            nl.set_link(*index, Some(&format!("shoal-tmp{i}")), None, Some(false))?;
        }
    }
    let mut by_name = HashMap::new();
    for (iface, index) in &plan {
        let mtu = (iface.mtu > 0).then_some(iface.mtu);
        nl.set_link(*index, Some(&iface.name), mtu, Some(true))?;
        for a in &iface.addresses {
            let what = format!("interface {} address", iface.name);
            let ip = parse_ip(&what, &a.ip)?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            if a.prefix_len > max {
                return Err(invalid(format!(
                    "{what} {}/{}: bad prefix",
                    a.ip, a.prefix_len
                )));
            }
            nl.add_address(*index, ip, a.prefix_len as u8)?;
        }
        by_name.insert(iface.name.as_str(), *index);
    }
    let mut parsed = Vec::new();
    for r in routes {
        let (destination, prefix_len) = parse_cidr("route", &r.destination)?;
        let oif = match r.device.as_str() {
            "" => None,
            dev => Some(*by_name.get(dev).ok_or_else(|| {
                invalid(format!("route to {}: no interface {dev:?}", r.destination))
            })?),
        };
        let opt_ip = |s: &str| match s {
            "" => Ok(None),
            s => parse_ip(&format!("route to {}", r.destination), s).map(Some),
        };
        parsed.push(Route {
            destination,
            prefix_len,
            gateway: opt_ip(&r.gateway)?,
            oif,
            source: opt_ip(&r.source)?,
            metric: (r.metric > 0).then_some(r.metric),
            kernel: false,
        });
    }
    parsed.sort_by_key(|r| r.gateway.is_some());
    for r in &parsed {
        nl.add_route(r)?;
    }
    Ok(())
}

/// Brings loopback up in the network namespace of process `pid` (a container given a
/// namespace of its own: loopback only, and up, as runc leaves it).
pub fn loopback_up_in(pid: i32) -> Result<()> {
    let path = std::path::PathBuf::from(format!("/proc/{pid}/ns/net"));
    shoal_netlink::in_netns(&path, || {
        let mut nl = Netlink::open()?;
        let links = nl.links()?;
        loopback_up(&mut nl, &links)
    })??;
    Ok(())
}

fn loopback_up(nl: &mut Netlink, links: &[Link]) -> std::result::Result<(), NetlinkError> {
    match links.iter().find(|l| l.is_loopback()) {
        Some(lo) => nl.set_link(lo.index, None, None, Some(true)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_prefixes_are_checked() {
        assert_eq!(
            parse_cidr("r", "10.1.0.0/16").unwrap(),
            ("10.1.0.0".parse().unwrap(), 16)
        );
        assert_eq!(parse_cidr("r", "::/0").unwrap().1, 0);
        for bad in ["10.1.0.0", "10.1.0.0/33", "fd00::/129", "x/8"] {
            let e = parse_cidr("route", bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
        assert_eq!(
            shoal_netlink::parse_mac("02:00:0a:0b:0c:0d").unwrap(),
            [2, 0, 10, 11, 12, 13]
        );
        assert!(shoal_netlink::parse_mac("02:00:0a").is_err());
    }
}
