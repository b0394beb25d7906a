//! Against the real kernel, in a network namespace of the test's own (root needed; skips,
//! saying so, otherwise). `ip` and `tc` from iproute2 check what the client did.
use std::net::IpAddr;
use std::process::Command;

use super::*;

fn run(cmd: &str) -> String {
    let mut words = cmd.split(' ');
    let out = Command::new(words.next().unwrap())
        .args(words)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `body` on a thread in a new, empty network namespace.
fn in_new_netns(body: impl FnOnce() + Send) {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP: netlink tests need root (they create a network namespace)");
        return;
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            body()
        })
        .join()
        .unwrap()
    })
}

#[test]
fn reads_and_configures_links_addresses_and_routes() {
    in_new_netns(|| {
        run("ip link add shoal-v0 mtu 1400 type veth peer name shoal-v1");
        let mut nl = Netlink::open().unwrap();
        let links = nl.links().unwrap();
        let lo = links.iter().find(|l| l.name == "lo").unwrap();
        assert!(lo.is_loopback() && lo.mac.is_none());
        let v0 = links.iter().find(|l| l.name == "shoal-v0").unwrap().clone();
        assert_eq!(
            (v0.mtu, v0.kind.as_deref(), v0.up),
            (1400, Some("veth"), false)
        );
        let mac = run("ip -br link show shoal-v0");
        let mac = mac.split_whitespace().nth(2).unwrap();
        let ours = v0.mac.unwrap().map(|b| format!("{b:02x}")).join(":");
        assert_eq!(ours, mac);

        nl.set_link(v0.index, Some("shoal-eth"), Some(1450), Some(true))
            .unwrap();
        nl.add_address(v0.index, "10.214.0.5".parse().unwrap(), 24)
            .unwrap();
        nl.add_address(v0.index, "fd00:214::5".parse().unwrap(), 64)
            .unwrap();
        nl.set_link(1, None, None, Some(true)).unwrap();
        let shown = run("ip -br addr show shoal-eth");
        assert!(
            shown.contains("10.214.0.5/24") && shown.contains("fd00:214::5/64"),
            "{shown}"
        );
        assert!(run("ip link show shoal-eth").contains("mtu 1450"));
        let addrs = nl.addresses().unwrap();
        assert!(addrs.iter().any(|a| a.index == v0.index
            && a.ip == "10.214.0.5".parse::<IpAddr>().unwrap()
            && a.prefix_len == 24
            && !a.link_scope));

        // Routes: a default via a gateway on the link, and one more network.
        let default = Route {
            destination: "0.0.0.0".parse().unwrap(),
            prefix_len: 0,
            gateway: Some("10.214.0.1".parse().unwrap()),
            oif: Some(v0.index),
            source: None,
            metric: None,
            kernel: false,
        };
        nl.add_route(&default).unwrap();
        let net = Route {
            destination: "192.168.77.0".parse().unwrap(),
            prefix_len: 24,
            gateway: None,
            oif: Some(v0.index),
            source: Some("10.214.0.5".parse().unwrap()),
            metric: Some(20),
            kernel: false,
        };
        nl.add_route(&net).unwrap();
        let shown = run("ip route show");
        assert!(
            shown.contains("default via 10.214.0.1 dev shoal-eth"),
            "{shown}"
        );
        assert!(shown.contains("192.168.77.0/24 dev shoal-eth"), "{shown}");
        let routes = nl.routes().unwrap();
        let read = |dest: &str| {
            routes
                .iter()
                .find(|r| r.destination == dest.parse::<IpAddr>().unwrap() && !r.kernel)
                .unwrap_or_else(|| panic!("no route to {dest} in {routes:?}"))
                .clone()
        };
        assert_eq!(read("0.0.0.0"), default);
        let r = read("192.168.77.0");
        assert_eq!(
            (r.prefix_len, r.source, r.metric),
            (24, net.source, Some(20))
        );
        // The kernel's own route for the address is marked as such.
        assert!(routes
            .iter()
            .any(|r| r.kernel && r.destination == "10.214.0.0".parse::<IpAddr>().unwrap()));

        // Errors name the request and carry the kernel's reason.
        let e = nl
            .add_address(v0.index, "10.214.0.5".parse().unwrap(), 24)
            .unwrap_err()
            .to_string();
        assert!(e.contains("10.214.0.5/24") && e.contains("exists"), "{e}");
        let e = nl
            .set_link(9999, None, Some(1000), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("9999"), "{e}");
    });
}

#[test]
fn redirects_ingress_both_ways_and_removes_them() {
    in_new_netns(|| {
        run("ip link add shoal-v0 type veth peer name shoal-v1");
        run("ip tuntap add shoal-tap mode tap");
        let mut nl = Netlink::open().unwrap();
        let links = nl.links().unwrap();
        let index = |n: &str| links.iter().find(|l| l.name == n).unwrap().index;
        let (veth, tap) = (index("shoal-v0"), index("shoal-tap"));
        for (from, to) in [(veth, tap), (tap, veth)] {
            nl.add_ingress_qdisc(from).unwrap();
            nl.redirect_ingress(from, to).unwrap();
        }
        let shown = run("tc filter show dev shoal-v0 ingress");
        assert!(
            shown.contains("Egress Redirect to device shoal-tap"),
            "{shown}"
        );
        let shown = run("tc filter show dev shoal-tap ingress");
        assert!(
            shown.contains("Egress Redirect to device shoal-v0"),
            "{shown}"
        );
        assert_eq!(nl.ingress_redirects(veth).unwrap(), [tap]);
        nl.del_ingress_qdisc(veth).unwrap();
        assert!(nl.ingress_redirects(veth).unwrap().is_empty());
        assert!(!run("tc qdisc show dev shoal-v0").contains("ingress"));
        let e = nl.del_ingress_qdisc(veth).unwrap_err().to_string();
        assert!(e.contains("ingress qdisc"), "{e}");
    });
}

#[test]
fn a_missing_namespace_is_named() {
    let e = in_netns(Path::new("/nonexistent/netns/x"), || ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/netns/x"), "{e}");
}
