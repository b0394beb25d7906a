//! A pod network namespace built the way a CNI plugin leaves one, for the network tests and
//! benchmark.
#![allow(dead_code)]
use std::process::{Command, Stdio};

use super::containerd::text;

/// A pod network namespace as a CNI plugin leaves it: a veth whose host end has
/// 10.216.N.1/24 and whose pod end, `eth0`, has 10.216.N.2/24 and a default route via the
/// host end. Deleted (with the host end) on drop.
pub struct PodNetns {
    pub name: String,
    pub host_if: String,
    pub subnet: u8,
}

impl PodNetns {
    pub fn new(tag: &str, subnet: u8) -> PodNetns {
        let name = format!("shoal-e2e-{tag}-{}", std::process::id());
        let host_if = format!("sh{subnet}-{}", std::process::id() % 100000);
        for args in [["netns", "del", &name], ["link", "del", &host_if]] {
            let _ = Command::new("ip").args(args).stderr(Stdio::null()).status();
        }
        let ns = PodNetns {
            name,
            host_if,
            subnet,
        };
        let (n, h) = (&ns.name, &ns.host_if);
        for cmd in [
            format!("netns add {n}"),
            format!("link add {h} type veth peer name eth0 netns {n}"),
            format!("addr add 10.216.{subnet}.1/24 dev {h}"),
            format!("link set {h} up"),
            format!("-n {n} link set eth0 mtu 1400"),
            format!("-n {n} addr add 10.216.{subnet}.2/24 dev eth0"),
            format!("-n {n} link set eth0 up"),
            format!("-n {n} link set lo up"),
            format!("-n {n} route add default via 10.216.{subnet}.1"),
        ] {
            let out = Command::new("ip").args(cmd.split(' ')).output().unwrap();
            assert!(out.status.success(), "ip {cmd}: {}", text(&out));
        }
        ns
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    pub fn guest_ip(&self) -> String {
        format!("10.216.{}.2", self.subnet)
    }

    pub fn host_ip(&self) -> String {
        format!("10.216.{}.1", self.subnet)
    }

    /// Runs `ip -n NAME ARGS`, failing the caller if it fails.
    pub fn ip(&self, args: &str) {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args.split(' '))
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args}: {}", text(&out));
    }

    /// `ip`/`tc` output inside the namespace.
    pub fn show(&self, cmd: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd.split(' '))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Nothing of a sandbox is left in the namespace: no tap, no ingress qdisc.
    pub fn assert_clean(&self) {
        let links = self.show("ip -br link");
        assert!(!links.contains("shoal-tap"), "tap left behind: {links}");
        let qdiscs = self.show("tc qdisc show dev eth0");
        assert!(
            !qdiscs.contains("ingress"),
            "redirect left behind: {qdiscs}"
        );
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        // The host end goes with the namespace (its peer is in there).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Connects to `addr` until it answers or `patience` runs out (the container's server may
/// still be starting).
pub fn connect_retrying(addr: &str, patience: std::time::Duration) -> std::net::TcpStream {
    let deadline = std::time::Instant::now() + patience;
    loop {
        let timeout = std::time::Duration::from_secs(5);
        match std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), timeout) {
            Ok(s) => return s,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "cannot reach {addr}: {e}"
                );
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
    }
}
