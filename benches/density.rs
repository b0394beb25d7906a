//! Density: N idle busybox sandboxes started through containerd (`ctr run -d … sleep`), then
//! host memory per sandbox — PSS summed over each sandbox's processes (smaps_rollup), plus the
//! host memory no process accounts for (kernel: page tables, KVM, slab) — and how long the N
//! starts took; then everything is deleted and checked gone. Side by side with runc in the
//! same run. Prints figures, asserts only that nothing is left behind.
//!
//! `scripts/density N` runs it (in the lab where guests cannot boot natively: memory figures
//! hold there, times are EMULATED). Needs what `shim/tests/ctr_e2e.rs` needs.
#[path = "../shim/tests/support/containerd.rs"]
mod containerd;

use std::time::{Duration, Instant};

use containerd::{env, stdout, text, Containerd, IMAGE, RUNTIME};

const RUNC: &str = "io.containerd.runc.v2";

fn meminfo_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn pss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// (pid, parent pid, command name) of every process.
fn processes() -> Vec<(i32, i32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        out.push((pid, ppid, comm));
    }
    out
}

/// The processes a runtime's sandboxes consist of: its shims and everything below them.
fn sandbox_pids(shim_comm_prefix: &str) -> Vec<i32> {
    let all = processes();
    let mut pids: Vec<i32> = all
        .iter()
        .filter(|(_, _, c)| c.starts_with(shim_comm_prefix))
        .map(|(p, _, _)| *p)
        .collect();
    let mut i = 0;
    while i < pids.len() {
        let parent = pids[i];
        pids.extend(
            all.iter()
                .filter(|(_, pp, _)| *pp == parent)
                .map(|(p, _, _)| *p),
        );
        i += 1;
    }
    pids
}

struct Figures {
    start_s: f64,
    pss_mib: f64,
    unattributed_mib: f64,
}

fn measure(c: &Containerd, runtime: &str, shim_comm: &str, n: usize) -> Figures {
    let before = meminfo_kib("MemAvailable:");
    let started = Instant::now();
    let ids: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "density-{}-{i}",
                if runtime == RUNC { "runc" } else { "shoal" }
            )
        })
        .collect();
    for id in &ids {
        let out = c.ctr(&[
            "run",
            "-d",
            "--runtime",
            runtime,
            IMAGE,
            id,
            "sleep",
            "1000000",
        ]);
        assert!(
            out.status.success(),
            "{runtime} {id}: {}\n{}",
            text(&out),
            c.log()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let listed = stdout(&c.ctr(&["task", "ls"]));
        let running = listed.lines().filter(|l| l.contains("RUNNING")).count();
        if running >= n {
            break;
        }
        assert!(Instant::now() < deadline, "only {running} of {n} running");
        std::thread::sleep(Duration::from_millis(200));
    }
    let start_s = started.elapsed().as_secs_f64();
    // Let the guests go idle before measuring.
    std::thread::sleep(Duration::from_secs(5));
    let pids = sandbox_pids(shim_comm);
    let pss: u64 = pids.iter().map(|p| pss_kib(*p)).sum();
    let used = before.saturating_sub(meminfo_kib("MemAvailable:"));
    let figures = Figures {
        start_s,
        pss_mib: pss as f64 / 1024.0 / n as f64,
        unattributed_mib: used.saturating_sub(pss) as f64 / 1024.0 / n as f64,
    };
    for id in &ids {
        let _ = c.ctr(&["task", "kill", "-s", "KILL", id]);
    }
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !c.ctr(&["task", "delete", id]).status.success() {
            assert!(Instant::now() < deadline, "{id} could not be deleted");
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = c.ctr(&["container", "delete", id]);
    }
    figures
}

fn main() {
    let Some(env) = env() else {
        std::process::exit(2);
    };
    let n: usize = std::env::var("SHOAL_DENSITY_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let c = Containerd::start(&env, "density", "log_level = \"warn\"\n");
    let shoal = measure(&c, RUNTIME, "containerd-shim", n);
    c.assert_clean();
    let runc = measure(&c, RUNC, "containerd-shim", n);
    let label = if std::env::var_os("SHOAL_IN_LAB").is_some() {
        "nested lab: memory figures hold, times EMULATED"
    } else {
        "native"
    };
    let config = shoal_vmm_size(&c);
    println!("density: {n} idle busybox sandboxes ({label}; shoal VM {config}):");
    println!("{:<44} {:>12} {:>12}", "", "shoal", "runc");
    println!(
        "{:<44} {:>9.1} MiB {:>9.1} MiB",
        "PSS per sandbox (shim + VM / shim + container)", shoal.pss_mib, runc.pss_mib
    );
    println!(
        "{:<44} {:>9.1} MiB {:>9.1} MiB",
        "host memory not in any process, per sandbox",
        shoal.unattributed_mib,
        runc.unattributed_mib
    );
    println!(
        "{:<44} {:>9.1} MiB {:>9.1} MiB",
        "total per sandbox",
        shoal.pss_mib + shoal.unattributed_mib,
        runc.pss_mib + runc.unattributed_mib
    );
    println!(
        "{:<44} {:>10.1} s {:>10.1} s",
        format!("time to start all {n} (sequential)"),
        shoal.start_s,
        runc.start_s
    );
    println!("left behind after deleting all: nothing (checked)");
}

/// The VM size the shim used (from the config the fixture wrote).
fn shoal_vmm_size(c: &Containerd) -> String {
    let text = std::fs::read_to_string(c.root.join("shoal.toml")).unwrap_or_default();
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k} = ")).map(str::to_string))
    };
    format!(
        "{} vCPU, {} MiB",
        get("vcpus").unwrap_or_else(|| "1".into()),
        get("memory_mib").unwrap_or_else(|| "256".into())
    )
}
