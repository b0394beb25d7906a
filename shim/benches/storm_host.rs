//! The host side of a sandbox start, under concurrency, natively (issue #9's "nothing
//! serializes" check): each start claims a cgroup from the pool with its limits, boots the
//! VM the way the shim does (guest RAM, KVM VM, kernel and image, vsock socket, virtio-fs
//! share, balloon, vCPU) until its first KVM_RUN, then stops it and returns the cgroup. N
//! starts at C = 1, 2, 4, 8, 16 in flight; prints throughput and latency per C and the
//! ratio the issue sets (throughput at C = 16 over host cores × throughput at C = 1, target
//! ≥ 0.7). Then the same with each VM restored from a snapshot of that VM (what a start
//! from a VM template does on the host). The guest's own boot is not in it (on nested PVM it cannot run natively; the
//! whole path is `scripts/storm`).
//!
//! Needs root, /dev/kvm and SHOAL_GUEST_KERNEL + SHOAL_AGENT_IMAGE (`scripts/bench` sets
//! them). SHOAL_STORM_HOST_N sets N (default 64).
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "../tests/support/containerd.rs"]
mod containerd;

use containerd::{env_usize, in_flight, percentile};
use containerd_shim_shoal_v2::host_cgroups::{Driver, Limits, Pool, PoolConfig};
use shoal_vmm::{
    CacheMode, Console, FsConfig, RestoreConfig, SnapshotFiles, Vm, VmConfig, VsockConfig,
};

/// One host-side start: claim, boot (or, given a snapshot, restore) to first KVM_RUN, stop,
/// release. Returns milliseconds.
fn one_start(
    pool: &Pool,
    (kernel, image): (&Path, &Path),
    template: Option<&SnapshotFiles>,
    dir: &Path,
    i: usize,
) -> f64 {
    let t = Instant::now();
    let limits = Limits {
        memory_max: Some(320 << 20),
        cpu_quota_us: None,
        cpu_period_us: None,
        pids_max: None,
    };
    let claim = pool.claim(&format!("storm-{i}"), &limits).expect("claim");
    let sdir = dir.join(format!("s{i}"));
    std::fs::create_dir_all(sdir.join("shared")).unwrap();
    let vm = match template {
        Some(files) => Vm::restore(&RestoreConfig {
            files: files.clone(),
            console: Console::Sink,
            memory_mib: Some(256),
            vcpus: Some(1),
            vsock: Some(VsockConfig {
                uds_path: sdir.join("vsock.sock"),
                cid: 4 + i as u64,
            }),
            shares: vec![share(&sdir)],
            free_page_reporting: true,
        })
        .expect("restore"),
        None => Vm::boot(&sandbox_config(kernel, image, &sdir)).expect("boot"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.first_run_at().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    drop(vm);
    pool.release(&claim).expect("release");
    let _ = std::fs::remove_dir_all(&sdir);
    ms
}

fn share(sdir: &Path) -> FsConfig {
    FsConfig {
        tag: "shoal".into(),
        dir: sdir.join("shared"),
        cache: CacheMode::Auto,
    }
}

/// The VM as the shim builds it, its files under `sdir`.
fn sandbox_config(kernel: &Path, image: &Path, sdir: &Path) -> VmConfig {
    VmConfig {
        kernel: kernel.into(),
        initrd: Some(image.into()),
        cmdline: shoal_vmm::DEFAULT_CMDLINE.into(),
        memory_mib: 256,
        vcpus: 1,
        vsock: Some(VsockConfig {
            uds_path: sdir.join("vsock.sock"),
            cid: 3,
        }),
        disks: Vec::new(),
        shares: vec![share(sdir)],
        nets: Vec::new(),
        free_page_reporting: true,
        console: Console::Sink,
    }
}

/// A snapshot of the sandbox VM taken at its first KVM_RUN, standing in for a template
/// (the agent guest cannot run on nested PVM; what a restore does on the host is the same).
fn make_template(kernel: &Path, image: &Path, dir: &Path) -> SnapshotFiles {
    let sdir = dir.join("template");
    std::fs::create_dir_all(sdir.join("shared")).unwrap();
    let vm = Vm::boot(&sandbox_config(kernel, image, &sdir)).expect("boot");
    while vm.first_run_at().is_none() {
        std::thread::sleep(Duration::from_micros(200));
    }
    vm.pause().expect("pause");
    let files = SnapshotFiles {
        state: sdir.join("vm.state"),
        memory: sdir.join("vm.mem"),
    };
    vm.snapshot(&files).expect("snapshot");
    files
}

fn main() {
    let (Some(kernel), Some(image)) = (
        std::env::var_os("SHOAL_GUEST_KERNEL").map(PathBuf::from),
        std::env::var_os("SHOAL_AGENT_IMAGE").map(PathBuf::from),
    ) else {
        eprintln!("storm_host: set SHOAL_GUEST_KERNEL and SHOAL_AGENT_IMAGE");
        std::process::exit(2);
    };
    if !nix::unistd::geteuid().is_root() || !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("storm_host: needs root and /dev/kvm");
        std::process::exit(2);
    }
    let n = env_usize("SHOAL_STORM_HOST_N", 64);
    let pid = std::process::id();
    let pool = Pool::open(PoolConfig {
        parent: format!("shoal-storm-bench-{pid}"),
        driver: Driver::Cgroupfs,
        size: 16,
        state_dir: std::env::temp_dir().join(format!("shoal-storm-pool-{pid}")),
        ..Default::default()
    })
    .expect("cgroup pool");
    let dir = std::env::temp_dir().join(format!("shoal-storm-host-{pid}"));
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let template = make_template(&kernel, &image, &dir);
    for (what, from) in [
        ("VM boot", None),
        ("restore from a template", Some(&template)),
    ] {
        println!(
            "== host-side start (cgroup claim + {what} to first KVM_RUN + stop + release), {n} starts per row, {cores} host cores"
        );
        println!(
            "{:>3} {:>10} {:>10} {:>10} {:>10}",
            "C", "starts/s", "p50 ms", "p99 ms", "max ms"
        );
        let mut base = 0.0;
        let mut last = 0.0;
        for c in [1usize, 2, 4, 8, 16] {
            let wall = Instant::now();
            let mut t = in_flight(n, c, |i| one_start(&pool, (&kernel, &image), from, &dir, i));
            let rate = n as f64 / wall.elapsed().as_secs_f64();
            t.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!(
                "{c:>3} {rate:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                percentile(&t, 0.5),
                percentile(&t, 0.99),
                t[t.len() - 1]
            );
            if c == 1 {
                base = rate;
            }
            last = rate;
        }
        println!(
            "throughput at C=16 / ({cores} cores x C=1): {:.2} (target >= 0.7)",
            last / (cores as f64 * base)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = pool.destroy();
}
