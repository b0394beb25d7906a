//! Pod networking, shoal vs runc in the same run and the same namespace set-up: a CNI-style
//! network namespace (veth, addresses, default route) per runtime, a busybox container in it
//! running `nc` servers, and the host talking to it over the veth. Prints TCP
//! request/response latency (64-byte messages on one connection: median, p99) and bulk
//! throughput both ways (run by `scripts/bench`; asserts nothing but that the data arrived).
//!
//! Needs what `shim/tests/ctr_e2e.rs` needs (root, containerd, SHOAL_GUEST_KERNEL,
//! SHOAL_AGENT_IMAGE, SHOAL_BUSYBOX_IMAGE; the lab where the host cannot boot guests: then the
//! figures are EMULATED). SHOAL_BENCH_RR sets the round trips (default 2000), SHOAL_BENCH_MB
//! the bulk transfer size (default 256).
#[path = "../shim/tests/support/containerd.rs"]
mod containerd;
#[path = "../shim/tests/support/netns.rs"]
mod netns;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use containerd::{env, env_usize, percentile, text, Containerd, IMAGE, RUNTIME};
use netns::{connect_retrying, PodNetns};

fn connect(addr: &str) -> TcpStream {
    let s = connect_retrying(addr, Duration::from_secs(120));
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s
}

struct Figures {
    rr_median_us: f64,
    rr_p99_us: f64,
    to_container_mbs: f64,
    from_container_mbs: f64,
}

fn measure(ip: &str, round_trips: usize, mb: usize) -> Figures {
    // Request/response: one connection, 64 bytes each way per round trip.
    let mut s = connect(&format!("{ip}:7000"));
    s.set_nodelay(true).unwrap();
    let msg = [0x61u8; 64];
    let mut back = [0u8; 64];
    // A few warm-up round trips (ARP, first-packet paths).
    for _ in 0..10 {
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).unwrap();
    }
    let mut rtts = Vec::with_capacity(round_trips);
    for _ in 0..round_trips {
        let t = Instant::now();
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).unwrap();
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    assert_eq!(back, msg);
    drop(s);
    rtts.sort_by(|a, b| a.partial_cmp(b).unwrap());

    // Host → container: write `mb` MiB, then wait for the server to close (it has read all).
    let bytes = mb << 20;
    let chunk = vec![0u8; 1 << 16];
    let mut s = connect(&format!("{ip}:7001"));
    let t = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&chunk).unwrap();
        sent += chunk.len();
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let to_container = bytes as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();

    // Container → host: the server sends `mb` MiB and closes.
    let mut s = connect(&format!("{ip}:7002"));
    let t = Instant::now();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!("reading from the container: {e}"),
        }
    }
    let from_container = got as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();
    assert_eq!(got, bytes, "the container's stream was cut short");
    Figures {
        rr_median_us: percentile(&rtts, 0.5),
        rr_p99_us: percentile(&rtts, 0.99),
        to_container_mbs: to_container,
        from_container_mbs: from_container,
    }
}

fn main() {
    let Some(env) = env() else {
        std::process::exit(2);
    };
    let round_trips = env_usize("SHOAL_BENCH_RR", 2000);
    let mb = env_usize("SHOAL_BENCH_MB", 256);
    let emulated = std::env::var_os("SHOAL_IN_LAB").is_some();
    let c = Containerd::start(&env, "netbench", "");
    // Port 7000 echoes, 7001 swallows, 7002 sends `mb` MiB of zeros.
    let script = format!(
        "mkdir -p /tmp; printf 'cat >/dev/null\\n' >/tmp/sink; \
         printf 'dd if=/dev/zero bs=65536 count={} 2>/dev/null\\n' >/tmp/source; \
         chmod +x /tmp/sink /tmp/source; \
         nc -ll -p 7001 -e /tmp/sink & nc -ll -p 7002 -e /tmp/source & \
         exec nc -ll -p 7000 -e cat",
        mb * 16
    );
    println!(
        "== pod network: host <-> busybox container over a CNI-style veth, {round_trips} round trips of 64 B, {mb} MiB each way{}",
        if emulated {
            " (EMULATED: nested lab under TCG; compare the runtimes, not the absolute figures)"
        } else {
            ""
        }
    );
    println!(
        "{:<8} {:>14} {:>12} {:>18} {:>18}",
        "runtime", "rr median us", "rr p99 us", "host->ctr MiB/s", "ctr->host MiB/s"
    );
    for (i, (name, runtime)) in [("shoal", RUNTIME), ("runc", "io.containerd.runc.v2")]
        .into_iter()
        .enumerate()
    {
        let ns = PodNetns::new(&format!("bench{i}"), 10 + i as u8);
        let id = format!("net-{name}");
        let with_ns = format!("network:{}", ns.path());
        let out = c.ctr(&[
            "run",
            "-d",
            "--runtime",
            runtime,
            "--with-ns",
            &with_ns,
            IMAGE,
            &id,
            "sh",
            "-c",
            &script,
        ]);
        assert!(out.status.success(), "{name}: {}\n{}", text(&out), c.log());
        let f = measure(&ns.guest_ip(), round_trips, mb);
        println!(
            "{name:<8} {:>14.0} {:>12.0} {:>18.1} {:>18.1}",
            f.rr_median_us, f.rr_p99_us, f.to_container_mbs, f.from_container_mbs
        );
        c.remove(&id);
    }
    c.assert_clean();
}
