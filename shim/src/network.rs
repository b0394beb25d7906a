//! The pod's network, carried into the VM.
//!
//! A CNI plugin sets up the pod's network namespace (a veth with addresses and routes) and
//! the OCI spec names it. For each interface there the VM gets a virtio-net card on a tap in
//! that namespace, and tc joins the two: whatever arrives on the interface is redirected out
//! of the tap (into the guest), and whatever the guest sends arrives on the tap and is
//! redirected out of the interface. This works with any CNI plugin, since the interface keeps
//! its configuration; the guest card gets the interface's MAC, and the agent gives it the
//! interface's name, MTU, addresses and routes.
//!
//! The taps are not persistent: they vanish with the VM, whatever ends it. The ingress qdiscs
//! added to the pod's interfaces are removed when the sandbox stops ([`Connected`]'s drop), or,
//! if the shim was killed, by `shim delete` ([`cleanup`]).
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use shoal_agent_api::agent::{Interface, IpAddress, Route as RouteSpec};
use shoal_netlink::{in_netns, Link, Netlink, NetlinkError, Route};
use shoal_vmm::NetConfig;

/// Most interfaces one sandbox carries (each is a virtio device).
pub const MAX_INTERFACES: usize = 8;
/// Taps are named `shoal-tap0`, `shoal-tap1`, ... in the pod's namespace.
const TAP_PREFIX: &str = "shoal-tap";

/// Errors carrying a pod network into the VM.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("pod network namespace {netns}: {cause}")]
    Netlink { netns: PathBuf, cause: NetlinkError },
    #[error("pod network namespace {netns}: interface {name} ({kind}) cannot be carried into the VM: only Ethernet-like interfaces (veth, macvlan, ...) can")]
    Unsupported {
        netns: PathBuf,
        name: String,
        kind: String,
    },
    #[error("pod network namespace {netns} has {count} interfaces; a sandbox carries at most {MAX_INTERFACES}")]
    TooMany { netns: PathBuf, count: usize },
    #[error("host networking is not supported: a VM cannot share the host's network stack; give the container a network namespace")]
    HostNetwork,
}

/// One interface of the pod's namespace and what the VM makes of it.
#[derive(Debug, Clone)]
pub struct Carried {
    pub link: Link,
    pub mac: [u8; 6],
    pub addresses: Vec<(IpAddr, u8)>,
    pub tap: String,
}

/// What the pod's network namespace holds, read before the VM boots.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    pub netns: PathBuf,
    pub interfaces: Vec<Carried>,
    pub routes: Vec<Route>,
}

fn netlink_err(netns: &Path) -> impl Fn(NetlinkError) -> NetworkError + '_ {
    move |source| NetworkError::Netlink {
        netns: netns.into(),
        cause: source,
    }
}

/// Runs `f` with a netlink socket in `netns`.
fn with_netlink<T: Send>(
    netns: &Path,
    f: impl FnOnce(&mut Netlink) -> Result<T, NetlinkError> + Send,
) -> Result<T, NetworkError> {
    in_netns(netns, || Netlink::open().and_then(|mut nl| f(&mut nl)))
        .and_then(|r| r)
        .map_err(netlink_err(netns))
}

impl PodNetwork {
    /// Reads the interfaces, addresses and routes of `netns`.
    pub fn inspect(netns: &Path) -> Result<PodNetwork, NetworkError> {
        let (links, addresses, routes) =
            with_netlink(netns, |nl| Ok((nl.links()?, nl.addresses()?, nl.routes()?)))?;
        let mut interfaces = Vec::new();
        for link in links.into_iter().filter(|l| !l.is_loopback()) {
            if link.name.starts_with(TAP_PREFIX) && link.kind.as_deref() == Some("tun") {
                // A tap of ours: another sandbox's VM in this namespace still holds it.
                tracing::warn!(
                    "{}: {} is a shoal tap; not carried",
                    netns.display(),
                    link.name
                );
                continue;
            }
            let addrs: Vec<(IpAddr, u8)> = addresses
                .iter()
                .filter(|a| a.index == link.index && !a.link_scope)
                .map(|a| (a.ip, a.prefix_len))
                .collect();
            // What the pod uses: interfaces that are up and have an address or a route.
            // Others (the fallback tunnels the kernel adds to every namespace when the ipip
            // or gre modules are loaded, interfaces left down) are not the pod's network.
            let routed = routes
                .iter()
                .any(|r| !r.kernel && r.oif == Some(link.index));
            if !link.up || (addrs.is_empty() && !routed) {
                tracing::debug!(
                    "{}: {} is down or unused; not carried",
                    netns.display(),
                    link.name
                );
                continue;
            }
            let Some(mac) = link.mac.filter(|m| m != &[0; 6] && m[0] & 1 == 0) else {
                return Err(NetworkError::Unsupported {
                    netns: netns.into(),
                    name: link.name.clone(),
                    kind: link
                        .kind
                        .clone()
                        .unwrap_or_else(|| format!("link type {}", link.link_type)),
                });
            };
            let tap = format!("{TAP_PREFIX}{}", interfaces.len());
            interfaces.push(Carried {
                link,
                mac,
                addresses: addrs,
                tap,
            });
        }
        if interfaces.len() > MAX_INTERFACES {
            return Err(NetworkError::TooMany {
                netns: netns.into(),
                count: interfaces.len(),
            });
        }
        // The kernel adds the on-link route of each address itself; the rest is the CNI's.
        let carried: Vec<u32> = interfaces.iter().map(|c| c.link.index).collect();
        let routes = routes
            .into_iter()
            .filter(|r| !r.kernel && r.oif.is_some_and(|i| carried.contains(&i)))
            .collect();
        Ok(PodNetwork {
            netns: netns.into(),
            interfaces,
            routes,
        })
    }

    /// The VM's network cards: one per interface, on its tap in the pod's namespace.
    pub fn vm_nets(&self) -> Vec<NetConfig> {
        self.interfaces
            .iter()
            .map(|c| NetConfig {
                tap: c.tap.clone(),
                netns: Some(self.netns.clone()),
                mac: c.mac,
                mtu: u16::try_from(c.link.mtu).unwrap_or(u16::MAX),
            })
            .collect()
    }

    /// Joins each interface to its tap (the VM has opened them) with tc redirects both ways.
    pub fn connect(&self) -> Result<Connected, NetworkError> {
        let mut connected = Connected {
            netns: self.netns.clone(),
            links: Vec::new(),
            taps: Vec::new(),
        };
        let added = &mut connected;
        // On error, `connected` is dropped and removes whatever was added so far.
        with_netlink(&self.netns, |nl| {
            for c in &self.interfaces {
                let (index, tap) = (c.link.index, &c.tap);
                // By name (SIOCGIFINDEX, in this thread's namespace), not from a dump of
                // every link: dumps take the kernel's networking lock, which every step of
                // every sandbox's network set-up on the host contends for (docs/benchmarks.md, "Start
                // storms").
                let tap_index = nix::net::if_::if_nametoindex(tap.as_str()).map_err(|e| {
                    NetlinkError::Request {
                        what: format!("find tap {tap}"),
                        cause: e.into(),
                    }
                })?;
                nl.set_link(tap_index, None, Some(c.link.mtu), Some(true))?;
                nl.add_ingress_qdisc(index)?;
                added.links.push(index);
                nl.redirect_ingress(index, tap_index)?;
                nl.add_ingress_qdisc(tap_index)?;
                added.taps.push(tap_index);
                nl.redirect_ingress(tap_index, index)?;
            }
            Ok(())
        })?;
        Ok(connected)
    }

    /// The interfaces and routes as the agent takes them.
    pub fn agent_config(&self) -> (Vec<Interface>, Vec<RouteSpec>) {
        let name_of = |index: u32| {
            self.interfaces
                .iter()
                .find(|c| c.link.index == index)
                .map(|c| c.link.name.clone())
                .unwrap_or_default()
        };
        let interfaces = self
            .interfaces
            .iter()
            .map(|c| Interface {
                name: c.link.name.clone(),
                mac: shoal_netlink::format_mac(&c.mac),
                mtu: c.link.mtu,
                addresses: c
                    .addresses
                    .iter()
                    .map(|(ip, len)| IpAddress {
                        ip: ip.to_string(),
                        prefix_len: u32::from(*len),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect();
        let routes = self
            .routes
            .iter()
            .map(|r| RouteSpec {
                destination: format!("{}/{}", r.destination, r.prefix_len),
                gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                device: r.oif.map(name_of).unwrap_or_default(),
                source: r.source.map(|s| s.to_string()).unwrap_or_default(),
                metric: r.metric.unwrap_or(0),
                ..Default::default()
            })
            .collect();
        (interfaces, routes)
    }
}

/// The redirects from the pod's interfaces to the VM's taps; dropping it removes them (the
/// taps themselves go with the VM).
pub struct Connected {
    netns: PathBuf,
    links: Vec<u32>,
    taps: Vec<u32>,
}

impl Drop for Connected {
    fn drop(&mut self) {
        if self.links.is_empty() {
            return;
        }
        let links = std::mem::take(&mut self.links);
        let taps = std::mem::take(&mut self.taps);
        let removed = with_netlink(&self.netns, |nl| {
            for index in &links {
                if let Err(e) = nl.del_ingress_qdisc(*index) {
                    tracing::warn!("{}: {e}", self.netns.display());
                }
            }
            // Normally gone with the VM already.
            for index in &taps {
                let _ = nl.del_ingress_qdisc(*index);
            }
            Ok(())
        });
        if let Err(e) = removed {
            // The namespace is gone, and everything in it with it.
            tracing::debug!("pod network already gone: {e}");
        }
    }
}

/// Where a sandbox records what `connect` added, for `shim delete` after a killed shim.
pub const RECORD_FILE: &str = "network";

impl Connected {
    /// The record `cleanup` reads: the namespace path, then one interface index per line.
    pub fn record(&self) -> String {
        let mut text = format!("{}\n", self.netns.display());
        for index in &self.links {
            text.push_str(&format!("{index}\n"));
        }
        text
    }
}

/// After a shim died: for the interfaces its record names, removes ingress qdiscs whose
/// redirects all point at interfaces that no longer exist (the taps of its VM, gone with
/// it). Qdiscs that still redirect somewhere, and every other interface, are left alone.
/// Returns how many were removed.
pub fn cleanup(record: &str) -> Result<usize, NetworkError> {
    let mut lines = record.lines();
    let Some(netns) = lines.next().map(PathBuf::from) else {
        return Ok(0);
    };
    let recorded: Vec<u32> = lines.filter_map(|l| l.trim().parse().ok()).collect();
    if recorded.is_empty() || !netns.exists() {
        return Ok(0);
    }
    with_netlink(&netns, |nl| {
        let links = nl.links()?;
        let mut removed = 0;
        for index in recorded {
            if !links.iter().any(|l| l.index == index) {
                continue;
            }
            let targets = nl.ingress_redirects(index)?;
            let dangling =
                !targets.is_empty() && targets.iter().all(|t| !links.iter().any(|l| l.index == *t));
            if dangling {
                nl.del_ingress_qdisc(index)?;
                removed += 1;
            }
        }
        Ok(removed)
    })
}

/// The network namespace the spec asks for: `Ok(Some(path))` to carry, `Ok(None)` for a
/// fresh namespace (loopback only, made in the guest), an error for host networking.
pub fn spec_netns(spec: &oci_spec::runtime::Spec) -> Result<Option<PathBuf>, NetworkError> {
    use oci_spec::runtime::LinuxNamespaceType;
    let ns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|nss| {
            nss.iter()
                .find(|n| n.typ() == LinuxNamespaceType::Network)
                .cloned()
        });
    match ns {
        None => Err(NetworkError::HostNetwork),
        Some(n) => Ok(n.path().clone()),
    }
}

/// The spec as the guest runs it when the VM carries the pod's network: the container uses
/// the guest's own network (where the pod's interfaces are), so its network namespace entry
/// goes.
pub fn use_vm_network(spec: &mut oci_spec::runtime::Spec) {
    use oci_spec::runtime::LinuxNamespaceType;
    if let Some(linux) = spec.linux_mut() {
        if let Some(nss) = linux.namespaces_mut() {
            nss.retain(|n| n.typ() != LinuxNamespaceType::Network);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against the kernel, in a named network namespace built like a CNI plugin would (root
    //! needed; skips, saying so, otherwise). The VM's side is played by opening the taps the
    //! way the VMM does.
    use super::*;
    use std::process::Command;

    fn ip(args: &str) {
        let out = Command::new("ip").args(args.split(' ')).output().unwrap();
        assert!(
            out.status.success(),
            "ip {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn tc_show(ns: &str, dev: &str) -> String {
        let out = Command::new("ip")
            .args([
                "netns", "exec", ns, "tc", "filter", "show", "dev", dev, "ingress",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A namespace `shoal-nt-<tag>-<pid>` with a veth (`eth0`, 10.215.0.2/24, MTU 1400, a
    /// default route via 10.215.0.1 and one more route); deleted on drop.
    struct Netns(String);
    impl Netns {
        fn new(tag: &str) -> Option<Netns> {
            if !nix::unistd::geteuid().is_root() {
                println!("SKIP: pod network tests need root (they create network namespaces)");
                return None;
            }
            let name = format!("shoal-nt-{tag}-{}", std::process::id());
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
            ip(&format!("netns add {name}"));
            let ns = Netns(name);
            let n = &ns.0;
            ip(&format!(
                "-n {n} link add eth0 mtu 1400 type veth peer name peer0"
            ));
            ip(&format!("-n {n} addr add 10.215.0.2/24 dev eth0"));
            ip(&format!("-n {n} link set eth0 up"));
            ip(&format!("-n {n} link set peer0 up"));
            ip(&format!("-n {n} route add default via 10.215.0.1"));
            ip(&format!(
                "-n {n} route add 172.31.0.0/16 via 10.215.0.1 metric 7"
            ));
            Some(ns)
        }
        fn path(&self) -> PathBuf {
            PathBuf::from(format!("/var/run/netns/{}", self.0))
        }
    }
    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    #[test]
    fn a_cni_style_namespace_is_read_connected_and_cleaned() {
        let Some(ns) = Netns::new("ok") else { return };
        // Left down and without addresses, like the fallback tunnels the kernel adds to
        // every namespace: not the pod's network, not carried.
        ip(&format!(
            "-n {} link add idle0 type veth peer name idle1",
            ns.0
        ));
        let net = PodNetwork::inspect(&ns.path()).unwrap();
        // Both veth ends live in this namespace here (a CNI plugin moves one out); the peer
        // is up but has no address or route, so only eth0 is carried.
        let names: Vec<_> = net
            .interfaces
            .iter()
            .map(|c| c.link.name.as_str())
            .collect();
        assert_eq!(names, ["eth0"]);
        let eth0 = net
            .interfaces
            .iter()
            .find(|c| c.link.name == "eth0")
            .unwrap();
        assert_eq!(eth0.addresses, [("10.215.0.2".parse().unwrap(), 24)]);
        assert_eq!(eth0.link.mtu, 1400);
        let (ifaces, routes) = net.agent_config();
        let i = ifaces.iter().find(|i| i.name == "eth0").unwrap();
        assert_eq!(i.mac, shoal_netlink::format_mac(&eth0.mac));
        assert_eq!((i.mtu, i.addresses[0].ip.as_str()), (1400, "10.215.0.2"));
        let mut got: Vec<_> = routes
            .iter()
            .map(|r| {
                (
                    r.destination.as_str(),
                    r.gateway.as_str(),
                    r.device.as_str(),
                    r.metric,
                )
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("0.0.0.0/0", "10.215.0.1", "eth0", 0),
                ("172.31.0.0/16", "10.215.0.1", "eth0", 7)
            ]
        );
        let nets = net.vm_nets();
        assert_eq!(nets.len(), net.interfaces.len());

        // The VM opens its taps; then the redirects go in, both ways.
        let taps: Vec<_> = nets
            .iter()
            .map(|n| shoal_vmm::virtio::net::Tap::open(&n.tap, n.netns.as_deref()).unwrap())
            .collect();
        let connected = net.connect().unwrap();
        let tap = &eth0.tap;
        assert!(tc_show(&ns.0, "eth0").contains(&format!("Egress Redirect to device {tap}")));
        assert!(tc_show(&ns.0, tap).contains("Egress Redirect to device eth0"));
        drop(connected);
        assert!(tc_show(&ns.0, "eth0").is_empty(), "redirects left behind");

        // A shim killed while connected: its VM's taps are gone, `shim delete` cleans up.
        let connected = net.connect().unwrap();
        let record = connected.record();
        std::mem::forget(connected);
        // While the VM (its taps) lives, nothing is removed.
        assert_eq!(cleanup(&record).unwrap(), 0);
        drop(taps);
        // The kernel unregisters a closed tap shortly after, not at once (under load it
        // was still there in one run): wait for it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut removed = cleanup(&record).unwrap();
        while removed == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            removed = cleanup(&record).unwrap();
        }
        assert_eq!(removed, net.interfaces.len());
        assert!(tc_show(&ns.0, "eth0").is_empty());
        assert_eq!(cleanup(&record).unwrap(), 0);
        assert_eq!(cleanup("").unwrap(), 0);
    }

    #[test]
    fn interfaces_that_cannot_be_carried_are_named() {
        let Some(ns) = Netns::new("l3") else { return };
        // A layer-3 tun device has no MAC: nothing to bridge a virtio-net card to.
        ip(&format!("-n {} tuntap add l3tun mode tun", ns.0));
        ip(&format!("-n {} addr add 10.215.9.1/24 dev l3tun", ns.0));
        ip(&format!("-n {} link set l3tun up", ns.0));
        let e = PodNetwork::inspect(&ns.path()).unwrap_err().to_string();
        assert!(e.contains("l3tun") && e.contains(&ns.0), "{e}");
        let e = PodNetwork::inspect(Path::new("/var/run/netns/shoal-no-such-ns"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("shoal-no-such-ns"), "{e}");
    }

    #[test]
    fn too_many_interfaces_are_refused() {
        let Some(ns) = Netns::new("many") else { return };
        for i in 0..MAX_INTERFACES / 2 {
            let n = &ns.0;
            ip(&format!("-n {n} link add a{i} type veth peer name b{i}"));
            for (end, host) in [("a", 1), ("b", 2)] {
                ip(&format!(
                    "-n {n} addr add 10.216.{i}.{host}/24 dev {end}{i}"
                ));
                ip(&format!("-n {n} link set {end}{i} up"));
            }
        }
        let e = PodNetwork::inspect(&ns.path()).unwrap_err();
        assert!(matches!(e, NetworkError::TooMany { .. }), "{e}");
    }

    #[test]
    fn the_spec_decides_what_network_the_container_gets() {
        use oci_spec::runtime::{LinuxBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, Spec};
        let spec_with = |path: Option<&str>| {
            let mut ns = LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network);
            if let Some(p) = path {
                ns = ns.path(p);
            }
            let pid = LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Pid)
                .build()
                .unwrap();
            let linux = LinuxBuilder::default()
                .namespaces(vec![ns.build().unwrap(), pid])
                .build()
                .unwrap();
            let mut spec = Spec::default();
            spec.set_linux(Some(linux));
            spec
        };
        assert_eq!(spec_netns(&spec_with(None)).unwrap(), None);
        let mut spec = spec_with(Some("/var/run/netns/pod"));
        assert_eq!(
            spec_netns(&spec).unwrap(),
            Some(PathBuf::from("/var/run/netns/pod"))
        );
        use_vm_network(&mut spec);
        let left = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].typ(), LinuxNamespaceType::Pid);
        // No network namespace at all: the host's network, which a VM cannot share.
        let e = spec_netns(&spec).unwrap_err().to_string();
        assert!(e.contains("host networking is not supported"), "{e}");
    }
}
