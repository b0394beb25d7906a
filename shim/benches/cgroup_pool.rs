//! Sandbox cgroup set-up for 500 sandboxes: the pool (claim + limits + release) vs mkdir +
//! limits + rmdir per sandbox, on this host's cgroups (prints figures; needs root).
use std::path::Path;
use std::time::Instant;

use containerd_shim_shoal_v2::host_cgroups::{detect, Driver, Hierarchy, Limits, Pool, PoolConfig};

const SANDBOXES: usize = 500;

fn report(name: &str, mut v: Vec<f64>) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pick = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    let total: f64 = v.iter().sum();
    println!(
        "{name:<34} median {:>8.1} µs  p99 {:>8.1} µs  total {:>8.1} ms",
        pick(0.5),
        pick(0.99),
        total / 1e3
    );
}

fn main() {
    let root = Path::new("/sys/fs/cgroup");
    let Ok(hierarchy) = detect(root) else {
        eprintln!("cgroup_pool: no cgroup file system at /sys/fs/cgroup");
        std::process::exit(2);
    };
    let limits = Limits {
        memory_max: Some(256 << 20),
        cpu_quota_us: Some(100_000),
        cpu_period_us: Some(100_000),
        pids_max: Some(1024),
    };
    let cfg = PoolConfig {
        parent: format!("shoal-bench-{}", std::process::id()),
        driver: Driver::Cgroupfs,
        size: SANDBOXES,
        state_dir: std::env::temp_dir().join(format!("shoal-bench-pool-{}", std::process::id())),
        ..Default::default()
    };
    let t = Instant::now();
    let pool = Pool::open(cfg.clone()).expect("open the pool (root needed)");
    let prefill_ms = t.elapsed().as_secs_f64() * 1e3;

    // Pool: all sandboxes claimed (as in a storm), then all released.
    let mut claim_us = Vec::new();
    let mut claims = Vec::new();
    for i in 0..SANDBOXES {
        let t = Instant::now();
        claims.push(pool.claim(&format!("sb-{i}"), &limits).unwrap());
        claim_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let mut release_us = Vec::new();
    for c in &claims {
        let t = Instant::now();
        pool.release(c).unwrap();
        release_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    pool.destroy().unwrap();

    // Direct: mkdir + the same limit files per sandbox, then rmdir.
    let dirs_for = |name: &str| -> Vec<std::path::PathBuf> {
        match &hierarchy {
            Hierarchy::V2 => vec![root.join(&cfg.parent).join(name)],
            Hierarchy::V1 { controllers } => controllers
                .iter()
                .map(|c| root.join(c).join(&cfg.parent).join(name))
                .collect(),
        }
    };
    for d in dirs_for("") {
        std::fs::create_dir_all(&d).unwrap();
    }
    if hierarchy == Hierarchy::V2 {
        std::fs::write(
            root.join(&cfg.parent).join("cgroup.subtree_control"),
            "+cpu +memory +pids",
        )
        .unwrap();
    }
    let mut mkdir_us = Vec::new();
    for i in 0..SANDBOXES {
        let t = Instant::now();
        for d in dirs_for(&format!("sb-{i}")) {
            std::fs::create_dir(&d).unwrap();
            for (file, value) in [
                ("memory.max", "268435456"),
                ("memory.limit_in_bytes", "268435456"),
                ("cpu.max", "100000 100000"),
                ("cpu.cfs_quota_us", "100000"),
                ("pids.max", "1024"),
            ] {
                let p = d.join(file);
                if p.exists() {
                    std::fs::write(p, value).unwrap();
                }
            }
        }
        mkdir_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let mut rmdir_us = Vec::new();
    for i in 0..SANDBOXES {
        let t = Instant::now();
        for d in dirs_for(&format!("sb-{i}")) {
            std::fs::remove_dir(&d).unwrap();
        }
        rmdir_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    for d in dirs_for("") {
        let _ = std::fs::remove_dir(&d);
    }

    let label = if std::env::var_os("SHOAL_IN_LAB").is_some() {
        "EMULATED (nested lab)"
    } else {
        "native"
    };
    println!("cgroup set-up for {SANDBOXES} sandboxes, {hierarchy:?}, {label}:");
    println!(
        "{:<34} {prefill_ms:.1} ms once, ahead of time",
        "pool: creating 500 cgroups"
    );
    report("pool: claim + limits", claim_us);
    report("pool: release", release_us);
    report("direct: mkdir + limits", mkdir_us);
    report("direct: rmdir", rmdir_us);
}
