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
//! Then the shim spawn, the first phase of a start, exactly as containerd runs it: the shim
//! binary's `start` in a bundle directory (which execs the serving shim, which connects to
//! containerd's event socket, listens and answers), timed until the serving shim answers a
//! ttrpc call; then Shutdown. Against a real containerd (its ttrpc socket takes the events).
//!
//! Before both, the cgroup claim as each shim makes it: open the pool afresh, claim a slot
//! with limits (timed to here), release it, against pools of 256 (the default) and 2048
//! slots (RunD's 2000 sandboxes a host), half of the slots held by live sandboxes (one
//! contiguous run, as a pool that filled in order has). The claims run on threads of this
//! one process, which share its process id and hash keys, as shims do not: the slots they
//! try are still apart, each claim has its own random picks.
//!
//! Then a container's rootfs: mounted as containerd's overlayfs snapshotter hands it over,
//! where the shim shares it with the guest, and unmounted as container delete and sandbox
//! stop do it, with 0 and with 2000 other mounts on the host (other sandboxes'). Then the pod
//! network: a CNI-style namespace (made ahead, untimed) read, the VM's tap opened in it and
//! the tc redirects added, as a start does; the stop's half is timed on its own.
//!
//! Needs root, /dev/kvm and SHOAL_GUEST_KERNEL + SHOAL_AGENT_IMAGE (`scripts/bench` sets
//! them); the spawn rows also containerd and SHOAL_BUSYBOX_IMAGE (they are skipped, saying
//! so, without). SHOAL_STORM_HOST_N sets N (default 64).
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "../tests/support/containerd.rs"]
mod containerd;

use containerd::{env_usize, in_flight, percentile, Containerd, Env};
use containerd_shim_protos::{api, shim_async::TaskClient};
use containerd_shim_shoal_v2::host_cgroups::{Driver, Limits, Pool, PoolConfig};
use containerd_shim_shoal_v2::{mounts, network::PodNetwork};
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
    let claim = pool.claim(&format!("storm-{i}"), &LIMITS).expect("claim");
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
            limits: Default::default(),
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
        root: None,
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
        limits: Default::default(),
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

/// One shim spawn as containerd does it: `start` in the bundle, the address it prints, then
/// a ttrpc call answered by the serving shim (NOT_FOUND: it holds no container yet). Returns
/// milliseconds; the shim is then shut down and its exit awaited.
fn one_spawn(c: &Containerd, rt: &tokio::runtime::Runtime, dir: &Path, i: usize) -> f64 {
    let id = format!("spawn-{i}");
    let bundle = dir.join(&id);
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("config.json"), SPEC).unwrap();
    let sock = c.run.join("containerd.sock");
    let t = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_containerd-shim-shoal-v2"))
        .args(["-namespace", "storm", "-address"])
        .arg(&sock)
        .args(["-publish-binary", "containerd", "-id", &id, "start"])
        .current_dir(&bundle)
        .env("TTRPC_ADDRESS", format!("{}.ttrpc", sock.display()))
        .env("SHOAL_CONFIG", c.root.join("shoal.toml"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("shim start");
    assert!(
        out.status.success(),
        "shim start: {}",
        containerd::text(&out)
    );
    let address = String::from_utf8(out.stdout).unwrap();
    // containerd keeps the address beside the bundle; the shim removes its socket by it.
    std::fs::write(bundle.join("address"), &address).unwrap();
    let ms = rt.block_on(async {
        let client = ttrpc::asynchronous::Client::connect(&address)
            .await
            .expect("connect to the shim");
        let task = TaskClient::new(client);
        let ctx = || ttrpc::context::with_timeout(10_000_000_000);
        let req = api::ConnectRequest {
            id: id.clone(),
            ..Default::default()
        };
        match task.connect(ctx(), &req).await {
            Err(ttrpc::Error::RpcStatus(s)) if s.code() == ttrpc::Code::NOT_FOUND => {}
            other => panic!("the new shim answered Connect with {other:?}"),
        }
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let _ = task.shutdown(ctx(), &api::ShutdownRequest::default()).await;
        ms
    });
    // Gone once its socket is (it removes it last).
    let path = address.trim_start_matches("unix://").to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&path).exists() {
        assert!(Instant::now() < deadline, "shim {id} did not exit");
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = std::fs::remove_dir_all(&bundle);
    ms
}

/// The OCI spec of the spawn rows' bundles (`start` reads it to group containers into pods).
const SPEC: &str = r#"{"ociVersion":"1.0.2","process":{"args":["sleep","3600"],"cwd":"/","env":["PATH=/bin"]},"root":{"path":"rootfs"},"hostname":"storm","linux":{"namespaces":[{"type":"pid"},{"type":"mount"}]}}"#;

/// Runs `start` N times at each C in flight and prints a row per C and the scaling ratio.
fn rows(n: usize, cores: usize, start: impl Fn(usize) -> f64 + Sync) {
    rows_then(n, cores, start, || {})
}

/// `rows`, running `after` (untimed) after each row.
fn rows_then(n: usize, cores: usize, start: impl Fn(usize) -> f64 + Sync, after: impl Fn()) {
    println!(
        "{:>3} {:>10} {:>10} {:>10} {:>10}",
        "C", "starts/s", "p50 ms", "p99 ms", "max ms"
    );
    let mut base = 0.0;
    let mut last = 0.0;
    for c in [1usize, 2, 4, 8, 16] {
        let wall = Instant::now();
        let mut t = in_flight(n, c, &start);
        let rate = n as f64 / wall.elapsed().as_secs_f64();
        t.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "{c:>3} {rate:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            percentile(&t, 0.5),
            percentile(&t, 0.99),
            t[t.len() - 1]
        );
        after();
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

/// The shim spawn rows, against a private containerd.
fn spawns(n: usize, cores: usize, (kernel, image): (&Path, &Path)) {
    println!("== shim spawn (containerd's `start` until the serving shim answers, then Shutdown), {n} per row, {cores} host cores");
    let Some(busybox) = std::env::var_os("SHOAL_BUSYBOX_IMAGE").map(PathBuf::from) else {
        println!("SKIP: shim spawn rows: SHOAL_BUSYBOX_IMAGE is not set (scripts/bench sets it)");
        return;
    };
    if std::process::Command::new("containerd")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIP: shim spawn rows: containerd is not installed (scripts/deps containerd)");
        return;
    }
    let env = Env {
        kernel: kernel.into(),
        agent: image.into(),
        image: busybox,
    };
    let c = Containerd::start(&env, "spawn", "log_level = \"info\"\n");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = c.root.join("bundles");
    rows(n, cores, |i| one_spawn(&c, &rt, &dir, i));
    let left = containerd::shim_pids();
    println!(
        "left behind: {}",
        if left.is_empty() {
            "nothing".to_string()
        } else {
            format!("shims {left:?}")
        }
    );
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
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    // SHOAL_STORM_HOST_PARTS=spawn runs only the shim spawn rows (=vm only the VM rows).
    let parts = std::env::var("SHOAL_STORM_HOST_PARTS")
        .unwrap_or_else(|_| "claim,mount,net,vm,spawn".into());
    if parts.contains("claim") {
        for size in [256, 2048] {
            claims(n, cores, size);
        }
    }
    if parts.contains("mount") {
        for others in [0, 2000] {
            // Side by side in one run: the layout before issue 18, then today's.
            for served_tree in [true, false] {
                rootfs_mounts(n, cores, others, served_tree);
            }
        }
    }
    if parts.contains("net") {
        pod_networks(n, cores);
    }
    if parts.contains("vm") {
        vm_starts(n, cores, (&kernel, &image));
    }
    if parts.contains("spawn") {
        spawns(n, cores, (&kernel, &image));
    }
}

/// The claim rows: each start opens the pool afresh, as a new shim process does.
fn claims(n: usize, cores: usize, size: usize) {
    let pid = std::process::id();
    let cfg = PoolConfig {
        parent: format!("shoal-storm-claim-{pid}"),
        driver: Driver::Cgroupfs,
        size,
        state_dir: tmpfs_dir().join(format!("shoal-storm-claim-{pid}")),
        ..Default::default()
    };
    let pool = Pool::open(cfg.clone()).expect("cgroup pool");
    // Half the pool is taken by sandboxes that are still running (this process).
    let held: Vec<_> = (0..size / 2)
        .map(|i| {
            pool.claim(&format!("held-{i}"), &Limits::default())
                .unwrap()
        })
        .collect();
    println!("== cgroup claim as a shim makes it (open the pool + claim with limits, timed; then release), pool of {size}, {} held, {n} per row, {cores} host cores", held.len());
    rows(n, cores, |i| {
        let t = Instant::now();
        let pool = Pool::open(cfg.clone()).expect("open");
        let claim = pool.claim(&format!("storm-{i}"), &LIMITS).expect("claim");
        let ms = t.elapsed().as_secs_f64() * 1e3;
        pool.release(&claim).expect("release");
        ms
    });
    for c in &held {
        pool.release(c).unwrap();
    }
    let _ = pool.destroy();
    let _ = std::fs::remove_dir_all(&cfg.state_dir);
}

/// Where the claim rows keep the pool's state: /dev/shm, a tmpfs as /run (the default
/// state directory's home) is on production hosts (not on every test machine), else the
/// temporary directory.
fn tmpfs_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.into()
    } else {
        std::env::temp_dir()
    }
}

/// A sandbox's limits: its VM's 256 MiB plus the overhead.
const LIMITS: Limits = Limits {
    memory_max: Some(320 << 20),
    cpu_quota_us: None,
    cpu_period_us: None,
    pids_max: None,
};

/// The VM rows: booted, then restored from a snapshot.
fn vm_starts(n: usize, cores: usize, (kernel, image): (&Path, &Path)) {
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
    let template = make_template(kernel, image, &dir);
    for (what, from) in [
        ("VM boot", None),
        ("restore from a template", Some(&template)),
    ] {
        println!(
            "== host-side start (cgroup claim + {what} to first KVM_RUN + stop + release), {n} starts per row, {cores} host cores"
        );
        rows(n, cores, |i| {
            one_start(&pool, (kernel, image), from, &dir, i)
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = pool.destroy();
}

/// The mount rows: a container's rootfs as containerd's overlayfs snapshotter hands it over,
/// mounted where the shim shares it with the guest; then unmounted as the container's delete
/// and the sandbox's stop do it. `others` mounts are held meanwhile, as other sandboxes on
/// the host hold theirs (the shim mounts in the host's mount namespace).
fn rootfs_mounts(n: usize, cores: usize, others: usize, served_tree: bool) {
    let dir = std::env::temp_dir().join(format!("shoal-storm-mount-{}", std::process::id()));
    let lower = dir.join("lower");
    std::fs::create_dir_all(lower.join("bin")).unwrap();
    std::fs::write(lower.join("bin/sh"), "not a shell").unwrap();
    mounts::prepare_state_dir(&dir).expect("state directory");
    let held: Vec<PathBuf> = (0..others)
        .map(|i| {
            let p = dir.join(format!("other-{i}"));
            std::fs::create_dir_all(&p).unwrap();
            let flags = nix::mount::MsFlags::MS_BIND;
            nix::mount::mount(Some(&lower), &p, None::<&str>, flags, None::<&str>)
                .expect("bind mount");
            p
        })
        .collect();
    let layout = match served_tree {
        true => "built in the served tree (before issue 18)",
        false => "staged, nosuid/nodev, moved into the read-only share",
    };
    println!("== container rootfs mount (overlay), {layout}, + unmount as container delete and sandbox stop do it, {others} other mounts held, {n} per row, {cores} host cores");
    let seq = std::sync::atomic::AtomicUsize::new(0);
    rows(n, cores, |_| {
        let i = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The snapshot's directories are containerd's, made before the shim is asked.
        let snap = dir.join(format!("snap-{i}"));
        for d in ["fs", "work"] {
            std::fs::create_dir_all(snap.join(d)).unwrap();
        }
        let rootfs = mounts::RootfsMount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                "index=off".into(),
                format!("workdir={}", snap.join("work").display()),
                format!("upperdir={}", snap.join("fs").display()),
                format!("lowerdir={}", lower.display()),
            ],
        };
        let sandbox = dir.join(format!("sandbox-{i}"));
        let t = Instant::now();
        if served_tree {
            // Before issue 18: the mount point made in the tree the guest is served, the
            // overlay mounted on it by path, no nosuid/nodev.
            let target = sandbox.join("shared/c/rootfs");
            std::fs::create_dir_all(&target).unwrap();
            containerd_shim::mount::mount_rootfs(
                Some(&rootfs.kind),
                Some(&rootfs.source),
                &rootfs.options,
                &target,
            )
            .expect("mount");
            mounts::remove_tree(&sandbox.join("shared/c")).expect("container delete");
        } else {
            mounts::prepare_sandbox_dir(&sandbox).expect("sandbox directory");
            let files = mounts::ContainerFiles::create(&sandbox, "c").expect("container directory");
            files.mount_rootfs(&[rootfs], &dir).expect("mount");
            mounts::remove_container(&sandbox, "c").expect("container delete");
        }
        mounts::remove_tree(&sandbox).expect("sandbox stop");
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let _ = std::fs::remove_dir_all(&snap);
        ms
    });
    for p in &held {
        let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
    }
    let _ = mounts::remove_tree(&dir);
}

/// The network rows: a pod namespace made as a CNI plugin makes it (a veth with an address
/// and a route; made before the row, not timed), then what a sandbox start does with it,
/// timed: read it, open the VM's tap in it, redirect both ways. What a stop does (the
/// redirects removed, the tap closed) is timed apart: first each row's sandboxes stop
/// after the row, then, in a second set of rows, while the row's later starts run (one at
/// a time on another thread, as pods stopping elsewhere on a busy host). One namespace per
/// start.
fn pod_networks(n: usize, cores: usize) {
    let names: Vec<String> = (0..n * 10)
        .map(|i| format!("shoal-storm-{}-{i}", std::process::id()))
        .collect();
    for name in &names {
        cni_namespace(name);
    }
    let seq = std::sync::atomic::AtomicUsize::new(0);
    let start = || {
        let i = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = PathBuf::from(format!("/var/run/netns/{}", names[i]));
        let t = Instant::now();
        let net = PodNetwork::inspect(&path).expect("inspect");
        let taps: Vec<_> = net
            .vm_nets()
            .iter()
            .map(|c| shoal_vmm::virtio::net::Tap::open(&c.tap, c.netns.as_deref()).expect("tap"))
            .collect();
        let connected = net.connect().expect("connect");
        // Fields drop in order: the redirects go first, then the taps (the VM's end).
        (t.elapsed().as_secs_f64() * 1e3, (connected, taps))
    };
    let timed_stop = |sandbox| {
        let t = Instant::now();
        drop(sandbox);
        t.elapsed().as_secs_f64() * 1e3
    };
    let print_stops = |mut stops: Vec<f64>| {
        stops.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "their stops (redirects removed, tap closed): p50 {:.1} ms, p99 {:.1} ms",
            percentile(&stops, 0.5),
            percentile(&stops, 0.99)
        );
    };

    println!("== pod network at sandbox start (read the namespace, open the tap in it, tc redirects both ways), the row's sandboxes stopped after it, {n} per row, {cores} host cores");
    let running = std::sync::Mutex::new(Vec::new());
    let stops = std::sync::Mutex::new(Vec::new());
    rows_then(
        n,
        cores,
        |_| {
            let (ms, sandbox) = start();
            running.lock().unwrap().push(sandbox);
            ms
        },
        || {
            let ended: Vec<_> = running.lock().unwrap().drain(..).collect();
            stops
                .lock()
                .unwrap()
                .extend(ended.into_iter().map(timed_stop));
        },
    );
    print_stops(stops.into_inner().unwrap());

    println!("== the same, the sandboxes stopped meanwhile, one at a time on another thread");
    let (stop, started) = std::sync::mpsc::channel();
    let stopper = std::thread::spawn(move || started.into_iter().map(timed_stop).collect());
    let stop = std::sync::Mutex::new(stop);
    rows(n, cores, |_| {
        let (ms, sandbox) = start();
        let _ = stop.lock().unwrap().send(sandbox);
        ms
    });
    drop(stop);
    print_stops(stopper.join().unwrap());
    for name in &names {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", name])
            .status();
    }
}

/// Namespace `name` with `eth0` (a veth, 10.215.0.2/24, a default route), as CNI leaves it.
fn cni_namespace(name: &str) {
    let ip = |args: &[&str], input: Option<&str>| {
        let mut child = std::process::Command::new("ip")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("ip");
        if let Some(text) = input {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success(), "ip {args:?}");
    };
    ip(&["netns", "add", name], None);
    ip(
        &["-n", name, "-batch", "-"],
        Some(
            "link add eth0 type veth peer name peer0\n\
             addr add 10.215.0.2/24 dev eth0\n\
             link set eth0 up\n\
             link set peer0 up\n\
             route add default via 10.215.0.1\n",
        ),
    );
}
