//! A small synchronous rtnetlink client for what shoal does to networks: read a namespace's
//! links, addresses and routes (the shim, in the pod's namespace on the host), connect two
//! links with tc redirects (the shim: CNI's veth to the VM's tap), and configure links,
//! addresses and routes (the agent, in the guest).
//!
//! Requests are sent one at a time and their answer (acknowledgement or dump) read before
//! the next; errors carry the kernel's errno and say which request failed.
use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute,
    TcFilterU32Option, TcHandle, TcMessage, TcMirror, TcMirrorActionType, TcOption, TcU32Key,
    TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// The main routing table.
const RT_TABLE_MAIN: u8 = 254;
/// `htons(ETH_P_ALL)`: a tc filter for every protocol.
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();
/// The ingress qdisc's handle (`ffff:`).
const INGRESS_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};

/// Errors from netlink requests.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("netlink: cannot {what}: {cause}")]
    Request { what: String, cause: std::io::Error },
    #[error("netlink: unreadable answer to {what}: {message}")]
    Decode { what: String, message: String },
    #[error("cannot enter network namespace {path}: {cause}")]
    Netns {
        path: PathBuf,
        cause: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, NetlinkError>;

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// Hardware address; `None` for links without one (loopback aside, such links cannot be
    /// bridged to a VM).
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    /// `ARPHRD_*` link layer type (1: Ethernet, 772: loopback, 65534: none).
    pub link_type: u16,
    /// The driver kind (`veth`, `tun`, `bridge`, ...), when the kernel names one.
    pub kind: Option<String>,
    pub up: bool,
}

impl Link {
    pub fn is_loopback(&self) -> bool {
        self.link_type == u16::from(LinkLayerType::Loopback)
    }

    pub fn is_ethernet(&self) -> bool {
        self.link_type == u16::from(LinkLayerType::Ether)
    }
}

/// An address on an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub ip: IpAddr,
    pub prefix_len: u8,
    /// Link-local (fe80::/10, 169.254/16) or host-scope addresses are the kernel's own.
    pub link_scope: bool,
}

/// A route in the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination network; `0.0.0.0/0` or `::/0` for a default route.
    pub destination: IpAddr,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
    /// Outgoing interface index.
    pub oif: Option<u32>,
    pub source: Option<IpAddr>,
    pub metric: Option<u32>,
    /// Added by the kernel for an address (recreated wherever the address is added).
    pub kernel: bool,
}

/// One rtnetlink socket in the namespace it was opened in.
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        Ok(Netlink { socket, seq: 0 })
    }

    /// Sends `msg` and collects what comes back until the acknowledgement or the end of the
    /// dump. A dump the kernel marks inconsistent (the table changed while it was read) is
    /// read again, up to three times.
    fn request(
        &mut self,
        what: &dyn Fn() -> String,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        let mut tries = 0;
        loop {
            match self.request_once(what, msg.clone(), flags)? {
                (out, false) => return Ok(out),
                (_, true) if tries < 3 => tries += 1,
                (_, true) => {
                    return Err(NetlinkError::Request {
                        what: what(),
                        cause: std::io::Error::other("the dump kept changing while it was read"),
                    })
                }
            }
        }
    }

    /// One request; also says whether a dump came back marked inconsistent.
    fn request_once(
        &mut self,
        what: &dyn Fn() -> String,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(Vec<RouteNetlinkMessage>, bool)> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        let fail = |source| NetlinkError::Request {
            what: what(),
            cause: source,
        };
        self.socket.send(&buf, 0).map_err(fail)?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        let mut interrupted = false;
        loop {
            let (data, _) = self.socket.recv_from_full().map_err(fail)?;
            let mut offset = 0;
            while offset < data.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| NetlinkError::Decode {
                        what: what(),
                        message: e.to_string(),
                    })?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += (len + 3) & !3;
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                interrupted |= msg.header.flags & NLM_F_DUMP_INTR != 0;
                match msg.payload {
                    NetlinkPayload::Done(d) if d.code < 0 => {
                        return Err(fail(std::io::Error::from_raw_os_error(-d.code)))
                    }
                    NetlinkPayload::Done(_) => return Ok((out, interrupted)),
                    NetlinkPayload::Error(e) => match e.code {
                        None if !dump => return Ok((out, false)),
                        None => {}
                        Some(_) => return Err(fail(e.to_io())),
                    },
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }

    /// Every interface in the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>> {
        let answers = self.request(
            &|| "list interfaces".into(),
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from(l)),
                _ => None,
            })
            .collect())
    }

    /// Every address in the namespace.
    pub fn addresses(&mut self) -> Result<Vec<Address>> {
        let answers = self.request(
            &|| "list addresses".into(),
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        let mut out = Vec::new();
        for m in answers {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            // IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS
            // otherwise (and then the two are the same).
            let local = a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let address = a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            let Some(ip) = local.or(address) else {
                continue;
            };
            let link_scope = match ip {
                IpAddr::V4(v4) => v4.is_link_local() || v4.is_loopback(),
                IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80 || v6.is_loopback(),
            };
            out.push(Address {
                index: a.header.index,
                ip,
                prefix_len: a.header.prefix_len,
                link_scope,
            });
        }
        Ok(out)
    }

    /// The unicast routes of the main table, IPv4 and IPv6.
    pub fn routes(&mut self) -> Result<Vec<Route>> {
        let answers = self.request(
            &|| "list routes".into(),
            RouteNetlinkMessage::GetRoute(RouteMessage::default()),
            NLM_F_DUMP,
        )?;
        let mut out = Vec::new();
        for m in answers {
            let RouteNetlinkMessage::NewRoute(r) = m else {
                continue;
            };
            let table = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(r.header.table));
            if table != u32::from(RT_TABLE_MAIN) || r.header.kind != RouteType::Unicast {
                continue;
            }
            let ip = |a: &RouteAddress| match a {
                RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
                RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
                _ => None,
            };
            let unspecified = match r.header.address_family {
                AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            };
            let mut route = Route {
                destination: unspecified,
                prefix_len: r.header.destination_prefix_length,
                gateway: None,
                oif: None,
                source: None,
                metric: None,
                kernel: r.header.protocol == RouteProtocol::Kernel,
            };
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(d) => {
                        route.destination = ip(d).unwrap_or(unspecified)
                    }
                    RouteAttribute::Gateway(g) => route.gateway = ip(g),
                    RouteAttribute::PrefSource(s) => route.source = ip(s),
                    RouteAttribute::Oif(i) => route.oif = Some(*i),
                    RouteAttribute::Priority(p) => route.metric = Some(*p),
                    _ => {}
                }
            }
            out.push(route);
        }
        Ok(out)
    }

    /// Changes an interface: its name, MTU, and whether it is up (each when given).
    pub fn set_link(
        &mut self,
        index: u32,
        name: Option<&str>,
        mtu: Option<u32>,
        up: Option<bool>,
    ) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        if let Some(up) = up {
            msg.header.change_mask = LinkFlags::Up;
            if up {
                msg.header.flags = LinkFlags::Up;
            }
        }
        if let Some(name) = name {
            msg.attributes.push(LinkAttribute::IfName(name.into()));
        }
        if let Some(mtu) = mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        self.request(
            &|| format!("change interface {index} (name {name:?}, MTU {mtu:?}, up {up:?})"),
            RouteNetlinkMessage::SetLink(msg),
            NLM_F_ACK,
        )?;
        Ok(())
    }

    /// Adds `ip/prefix_len` to interface `index`.
    pub fn add_address(&mut self, index: u32, ip: IpAddr, prefix_len: u8) -> Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.index = index;
        msg.header.prefix_len = prefix_len;
        msg.header.family = family(ip);
        msg.attributes.push(AddressAttribute::Local(ip));
        msg.attributes.push(AddressAttribute::Address(ip));
        self.request(
            &|| format!("add address {ip}/{prefix_len} to interface {index}"),
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Adds a route to the main table.
    pub fn add_route(&mut self, route: &Route) -> Result<()> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(route.destination);
        msg.header.destination_prefix_length = route.prefix_len;
        msg.header.table = RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.kind = RouteType::Unicast;
        msg.header.scope = match route.gateway {
            Some(_) => RouteScope::Universe,
            None => RouteScope::Link,
        };
        if route.prefix_len > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(route.destination.into()));
        }
        if let Some(gw) = route.gateway {
            msg.attributes.push(RouteAttribute::Gateway(gw.into()));
        }
        if let Some(oif) = route.oif {
            msg.attributes.push(RouteAttribute::Oif(oif));
        }
        if let Some(src) = route.source {
            msg.attributes.push(RouteAttribute::PrefSource(src.into()));
        }
        if let Some(metric) = route.metric {
            msg.attributes.push(RouteAttribute::Priority(metric));
        }
        self.request(
            &|| format!("add route {route:?}"),
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Adds an ingress qdisc to interface `index` (where ingress filters hang).
    pub fn add_ingress_qdisc(&mut self, index: u32) -> Result<()> {
        self.request(
            &|| format!("add an ingress qdisc to interface {index}"),
            RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc(index)),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Removes interface `index`'s ingress qdisc and the filters on it.
    pub fn del_ingress_qdisc(&mut self, index: u32) -> Result<()> {
        self.request(
            &|| format!("remove the ingress qdisc of interface {index}"),
            RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(index)),
            NLM_F_ACK,
        )?;
        Ok(())
    }

    /// Redirects every frame arriving on interface `from` to the egress of interface `to`
    /// (`tc filter add dev FROM ingress u32 match u32 0 0 action mirred egress redirect dev
    /// TO`). `from` needs an ingress qdisc.
    pub fn redirect_ingress(&mut self, from: u32, to: u32) -> Result<()> {
        let mut msg = TcMessage::default();
        msg.header.index = from as i32;
        msg.header.parent = INGRESS_HANDLE;
        msg.header.info = u32::from(ETH_P_ALL_BE);
        let mut key = TcU32Key::default();
        key.mask = 0;
        key.val = 0;
        let mut selector = TcU32Selector::default();
        selector.flags = TcU32SelectorFlags::Terminal;
        selector.nkeys = 1;
        selector.keys = vec![key];
        let mut mirror = TcMirror::default();
        mirror.generic.action = TcActionType::Stolen;
        mirror.eaction = TcMirrorActionType::EgressRedir;
        mirror.ifindex = to;
        let mut action = TcAction::default();
        action.tab = 1;
        action.attributes = vec![
            TcActionAttribute::Kind("mirred".into()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
                mirror,
            ))]),
        ];
        msg.attributes = vec![
            TcAttribute::Kind("u32".into()),
            TcAttribute::Options(vec![
                TcOption::U32(TcFilterU32Option::Selector(selector)),
                TcOption::U32(TcFilterU32Option::Action(vec![action])),
            ]),
        ];
        self.request(
            &|| format!("redirect interface {from}'s ingress to interface {to}"),
            RouteNetlinkMessage::NewTrafficFilter(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// The redirect targets of the u32 filters on interface `index`'s ingress.
    pub fn ingress_redirects(&mut self, index: u32) -> Result<Vec<u32>> {
        let mut msg = TcMessage::default();
        msg.header.index = index as i32;
        msg.header.parent = INGRESS_HANDLE;
        let answers = self.request(
            &|| format!("list the ingress filters of interface {index}"),
            RouteNetlinkMessage::GetTrafficFilter(msg),
            NLM_F_DUMP,
        )?;
        // filter → options → u32 actions → action options → mirred parameters.
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewTrafficFilter(f) => Some(f.attributes),
                _ => None,
            })
            .flatten()
            .filter_map(|a| match a {
                TcAttribute::Options(opts) => Some(opts),
                _ => None,
            })
            .flatten()
            .filter_map(|o| match o {
                TcOption::U32(TcFilterU32Option::Action(actions)) => Some(actions),
                _ => None,
            })
            .flatten()
            .flat_map(|act| act.attributes)
            .filter_map(|a| match a {
                TcActionAttribute::Options(opts) => Some(opts),
                _ => None,
            })
            .flatten()
            .filter_map(|o| match o {
                TcActionOption::Mirror(TcActionMirrorOption::Parms(p)) => Some(p.ifindex),
                _ => None,
            })
            .collect())
    }
}

fn ingress_qdisc(index: u32) -> TcMessage {
    let mut msg = TcMessage::default();
    msg.header.index = index as i32;
    msg.header.handle = INGRESS_HANDLE;
    msg.header.parent = TcHandle::INGRESS;
    msg.attributes = vec![TcAttribute::Kind("ingress".into())];
    msg
}

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn link_from(l: LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        link_type: u16::from(l.header.link_layer_type),
        kind: None,
        up: l.header.flags.contains(LinkFlags::Up),
    };
    for a in l.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Mtu(m) => link.mtu = m,
            LinkAttribute::Address(bytes) if bytes.len() == 6 => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&bytes);
                link.mac = Some(mac);
            }
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        link.kind = Some(match kind {
                            InfoKind::Other(s) => s,
                            k => k.to_string(),
                        });
                    }
                }
            }
            _ => {}
        }
    }
    if !link.is_ethernet() {
        link.mac = None;
    }
    link
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> std::result::Result<[u8; 6], String> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| format!("invalid MAC address {s:?}"))?;
    <[u8; 6]>::try_from(bytes).map_err(|_| format!("invalid MAC address {s:?}: six bytes expected"))
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Runs `f` on a thread inside network namespace `path` (a bind mount such as
/// /var/run/netns/NAME, or /proc/PID/ns/net); sockets it opens stay in that namespace.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let err = |source| NetlinkError::Netns {
        path: path.into(),
        cause: source,
    };
    let ns = File::open(path).map_err(err)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| err(e.into()))?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[cfg(test)]
mod tests;
