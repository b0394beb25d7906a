//! VMM start-up benchmark (run by `scripts/bench`; prints figures, asserts nothing).
//!
//! * `setup`: time from `shoal-vmm` process start (fork+exec by this harness) to vCPU 0's
//!   first KVM_RUN, for a 128 MiB, 1-vCPU guest with the real guest kernel and initramfs:
//!   create the VM, map memory, load kernel and initramfs, set up vCPUs and devices. Also the
//!   VMM's own RSS beside guest memory at that point. Meaningful natively on any /dev/kvm.
//! * `boot`: time from process start to the guest's init printing its marker, and the RSS
//!   split after boot. Through the nested lab this is emulated time: label it so.
//!
//! * `restore`: in this process, `Vm::boot` to vCPU 0's first KVM_RUN for the same guest
//!   with a sandbox's devices (vsock, virtio-fs share, balloon), side by side with
//!   `Vm::restore` to first KVM_RUN from a snapshot of that guest taken at its first KVM_RUN
//!   (kernel and initramfs in its RAM), each restore with its own vsock socket and CID: the
//!   host-side part of starting from a template instead of booting. Also the memory file's size on disk. Native on any
//!   /dev/kvm.
//!
//! * `template`: N guests (the test init counting on its console, `shoal.test=count`) booted
//!   in this process, then N restored from a snapshot of one such guest: time from
//!   `Vm::boot` to the first count vs from `Vm::restore` to the next count, and host memory
//!   per guest (the process's PSS growth over N): restored guests share the snapshot's
//!   pages. Needs a guest that boots, so the lab here (latency EMULATED there; memory valid).
//!
//! Environment: SHOAL_GUEST_KERNEL, SHOAL_TEST_INITRD (required), SHOAL_BENCH_MODE
//! (`setup`, default, `boot`, `restore` or `template`), SHOAL_BENCH_RUNS (default 20; the
//! number of guests N for `template`, default 10 there).
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MEMORY_MIB: u64 = 128;

fn monotonic_ns() -> u64 {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

fn spawn_vmm(kernel: &Path, initrd: &Path, console: &Path, uds: Option<&Path>) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal-vmm"));
    cmd.arg("--kernel").arg(kernel).arg("--initrd").arg(initrd);
    cmd.args([
        "--memory-mib",
        &MEMORY_MIB.to_string(),
        "--vcpus",
        "1",
        "--cmdline",
        shoal_vmm::DEFAULT_CMDLINE,
    ]);
    cmd.arg("--console").arg(console);
    if let Some(uds) = uds {
        cmd.arg("--vsock-uds").arg(uds);
    }
    cmd.env("SHOAL_VMM_TIMING", "1")
        .env("SHOAL_LOG", "shoal_vmm=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd.spawn().expect("spawn shoal-vmm")
}

/// (total RSS, RSS of the guest-RAM mapping) in KiB, from /proc/PID/smaps.
fn rss_split(pid: u32) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let (mut total, mut guest) = (0u64, 0u64);
    let mut in_guest = false;
    for line in smaps.lines() {
        if let Some(size) = line.strip_prefix("Size:") {
            let kib: u64 = size
                .trim()
                .trim_end_matches(" kB")
                .trim()
                .parse()
                .unwrap_or(0);
            in_guest = kib == MEMORY_MIB * 1024;
        } else if let Some(rss) = line.strip_prefix("Rss:") {
            let kib: u64 = rss
                .trim()
                .trim_end_matches(" kB")
                .trim()
                .parse()
                .unwrap_or(0);
            total += kib;
            if in_guest {
                guest += kib;
            }
        }
    }
    (total, guest)
}

fn stop(mut child: Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Parses the VMM's debug line "boot: STEP done elapsed_us=N".
fn boot_step(line: &str) -> Option<(String, u64)> {
    let rest = &line[line.find("boot: ")? + 6..];
    let (step, us) = rest.split_once(" done elapsed_us=")?;
    Some((step.to_string(), us.trim().parse().ok()?))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn report(name: &str, unit: &str, mut v: Vec<f64>) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{name:<44} median {:>9.2} {unit}  p99 {:>9.2} {unit}  min {:>9.2} {unit}  (n={})",
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v[0],
        v.len()
    );
}

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn bench_setup(kernel: &Path, initrd: &Path, runs: usize) {
    let dir = scratch();
    let (mut setup_ms, mut vmm_rss, mut guest_rss) = (Vec::new(), Vec::new(), Vec::new());
    let (mut exec_ms, mut init_ms, mut vm_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mut steps: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for i in 0..runs {
        let console = dir.join(format!("console-{i}"));
        let t0 = monotonic_ns();
        let mut child = spawn_vmm(kernel, initrd, &console, None);
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let (mut main_at, mut boot_at) = (0, 0);
        let first_run = loop {
            line.clear();
            if stderr.read_line(&mut line).unwrap_or(0) == 0 {
                panic!("shoal-vmm exited before its first KVM_RUN");
            }
            let stamp = |prefix: &str| {
                let rest = line.trim().strip_prefix(prefix)?;
                rest.trim_end_matches(" ns").parse::<u64>().ok()
            };
            if let Some((step, us)) = boot_step(&line) {
                steps.entry(step).or_default().push(us as f64 / 1e3);
            } else if let Some(t) = stamp("shoal-vmm: main at monotonic ") {
                main_at = t;
            } else if let Some(t) = stamp("shoal-vmm: boot at monotonic ") {
                boot_at = t;
            } else if let Some(t) = stamp("shoal-vmm: first KVM_RUN at monotonic ") {
                break t;
            }
        };
        exec_ms.push((main_at - t0) as f64 / 1e6);
        init_ms.push((boot_at - main_at) as f64 / 1e6);
        vm_ms.push((first_run - boot_at) as f64 / 1e6);
        let (total, guest) = rss_split(child.id());
        setup_ms.push((first_run - t0) as f64 / 1e6);
        vmm_rss.push((total - guest) as f64 / 1024.0);
        guest_rss.push(guest as f64 / 1024.0);
        stop(child);
        // Let the kernel finish tearing down the previous VM before the next start.
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("native, {MEMORY_MIB} MiB / 1 vCPU guest, real kernel + initramfs:");
    report("process start -> first KVM_RUN", "ms", setup_ms);
    report("  of which: spawn + exec + dynamic loading", "ms", exec_ms);
    report("  of which: logging, arguments, signals", "ms", init_ms);
    report("  of which: Vm::boot -> first KVM_RUN", "ms", vm_ms);
    let mut steps: Vec<_> = steps.into_iter().collect();
    steps.sort_by(|a, b| a.1[0].partial_cmp(&b.1[0]).unwrap());
    for (step, v) in steps {
        report(&format!("    Vm::boot: {step} (done at)"), "ms", v);
    }
    report("VMM RSS beside guest RAM (at first run)", "MiB", vmm_rss);
    report(
        "guest RAM resident (kernel+initrd loaded)",
        "MiB",
        guest_rss,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn bench_boot(kernel: &Path, initrd: &Path, runs: usize) {
    let dir = scratch();
    let (mut boot_ms, mut vmm_rss, mut guest_rss) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let console = dir.join(format!("console-{i}"));
        let uds = dir.join(format!("v-{i}.sock"));
        let t0 = Instant::now();
        let child = spawn_vmm(kernel, initrd, &console, Some(&uds));
        let deadline = t0 + Duration::from_secs(120);
        loop {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            if text.contains("SHOAL-TEST-INIT: up") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "guest did not reach init:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        boot_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        let (total, guest) = rss_split(child.id());
        vmm_rss.push((total - guest) as f64 / 1024.0);
        guest_rss.push(guest as f64 / 1024.0);
        stop(child);
    }
    let label = if std::env::var_os("SHOAL_IN_LAB").is_some() {
        "EMULATED (nested lab, QEMU TCG)"
    } else {
        "native"
    };
    println!("{label}, {MEMORY_MIB} MiB / 1 vCPU guest:");
    report("process start -> guest init running", "ms", boot_ms);
    report("VMM RSS beside guest RAM (after boot)", "MiB", vmm_rss);
    report("guest RAM resident (after boot)", "MiB", guest_rss);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits for vCPU 0's first KVM_RUN; the time from `t0`.
fn until_first_run(vm: &shoal_vmm::Vm, t0: Instant) -> f64 {
    loop {
        if let Some(at) = vm.first_run_at() {
            return (at - t0).as_secs_f64() * 1e3;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn bench_restore(kernel: &Path, initrd: &Path, runs: usize) {
    use shoal_vmm::{
        CacheMode, Console, FsConfig, RestoreConfig, SnapshotFiles, Vm, VmConfig, VsockConfig,
    };
    let dir = scratch();
    // A sandbox's devices: vsock, the virtio-fs share, the balloon.
    let share = FsConfig {
        tag: "shoal".into(),
        dir: dir.join("share"),
        cache: CacheMode::Auto,
        root: None,
    };
    std::fs::create_dir_all(&share.dir).unwrap();
    let mut config = VmConfig::new(kernel.to_path_buf());
    config.initrd = Some(initrd.into());
    config.memory_mib = MEMORY_MIB;
    config.console = Console::Sink;
    config.vsock = Some(VsockConfig {
        uds_path: dir.join("boot.sock"),
        cid: 3,
    });
    config.shares = vec![share.clone()];
    config.free_page_reporting = true;
    let mut boot_ms = Vec::new();
    for _ in 0..runs {
        let t0 = Instant::now();
        let vm = Vm::boot(&config).expect("boot");
        boot_ms.push(until_first_run(&vm, t0));
    }
    let files = SnapshotFiles {
        state: dir.join("bench.state"),
        memory: dir.join("bench.mem"),
    };
    {
        let vm = Vm::boot(&config).expect("boot");
        until_first_run(&vm, Instant::now());
        vm.pause().expect("pause");
        vm.snapshot(&files).expect("snapshot");
    }
    let restore = RestoreConfig {
        files: files.clone(),
        console: Console::Sink,
        memory_mib: Some(MEMORY_MIB),
        vcpus: Some(1),
        vsock: Some(VsockConfig {
            uds_path: dir.join("restored.sock"),
            cid: 4,
        }),
        shares: vec![share],
        free_page_reporting: true,
        limits: Default::default(),
    };
    // Confined (the default) and not, alternating in one run: what the VMM threads'
    // seccomp filters, capability drops, chroots and Landlock add to a start.
    use shoal_vmm::confine::{set_mode, Mode};
    let (mut restore_ms, mut unconfined_ms) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        for (mode, out) in [
            (Mode::Enforce, &mut restore_ms),
            (Mode::Off, &mut unconfined_ms),
        ] {
            set_mode(mode);
            let t0 = Instant::now();
            let vm = Vm::restore(&restore).expect("restore");
            out.push(until_first_run(&vm, t0));
        }
    }
    set_mode(Mode::Enforce);
    // Each thread class alone: starting a thread that confines itself, to its confirmation.
    for (name, class) in [
        (
            "vCPU",
            shoal_vmm::confine::ThreadClass::Vcpu {
                jail: Some(dir.clone()),
            },
        ),
        (
            "device",
            shoal_vmm::confine::ThreadClass::Devices {
                jail: Some(dir.clone()),
            },
        ),
        (
            "fs worker",
            shoal_vmm::confine::ThreadClass::FsWorker {
                share: dir.join("share"),
                root: None,
                proc_fd: None,
            },
        ),
    ] {
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            for (mode, out) in [(Mode::Enforce, &mut on), (Mode::Off, &mut off)] {
                set_mode(mode);
                let t0 = Instant::now();
                let handle = shoal_vmm::confine::spawn("bench", 256 * 1024, class.clone(), || {})
                    .expect("confine");
                out.push(t0.elapsed().as_secs_f64() * 1e3);
                handle.join().unwrap();
            }
        }
        set_mode(Mode::Enforce);
        println!(
            "{name} thread's seccomp program: {} BPF instructions ({} bytes in the kernel)",
            shoal_vmm::confine::program_len(&class),
            8 * shoal_vmm::confine::program_len(&class)
        );
        report(&format!("{name} thread start, confined"), "ms", on);
        report(&format!("{name} thread start, not confined"), "ms", off);
    }
    // What each sandbox's shim pays once for its vCPU and device threads' empty network
    // namespace (confine::prepare_empty_netns makes it while guest memory is set up, so it
    // is not on the path to the first KVM_RUN): a fresh thread's unshare(CLONE_NEWNET).
    let netns: Vec<f64> = (0..runs)
        .map(|_| {
            std::thread::spawn(|| {
                let t0 = Instant::now();
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
                t0.elapsed().as_secs_f64() * 1e3
            })
            .join()
            .unwrap()
        })
        .collect();
    report(
        "empty network namespace made (once per sandbox)",
        "ms",
        netns,
    );
    report("Vm::boot to first KVM_RUN", "ms", boot_ms);
    report("Vm::restore to first KVM_RUN", "ms", restore_ms);
    report(
        "Vm::restore to first KVM_RUN, confinement off",
        "ms",
        unconfined_ms,
    );
    let on_disk =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&files.memory).unwrap()) * 512;
    println!(
        "memory file: {} MiB of RAM, {:.1} MiB on disk (zero pages are holes)",
        MEMORY_MIB,
        on_disk as f64 / (1 << 20) as f64
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// This process's proportional set size in KiB (/proc/self/smaps_rollup).
fn pss_kib() -> f64 {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").expect("smaps_rollup");
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("a Pss line")
}

/// The highest `count N` a counting guest has printed on `console`.
fn last_count(console: &Path) -> Option<u64> {
    let text = std::fs::read(console).ok()?;
    String::from_utf8_lossy(&text)
        .lines()
        .filter_map(|l| l.strip_prefix("SHOAL-TEST-INIT: count "))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .max()
}

/// Waits until `console` shows a count above `above`; the time from `t0` in ms.
fn until_count(console: &Path, above: u64, t0: Instant) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(300);
    while last_count(console).is_none_or(|n| n <= above) {
        assert!(
            Instant::now() < deadline,
            "{} never counted past {above}",
            console.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    t0.elapsed().as_secs_f64() * 1e3
}

fn bench_template(kernel: &Path, initrd: &Path) {
    use shoal_vmm::{Console, RestoreConfig, SnapshotFiles, Vm, VmConfig};
    let n: usize = std::env::var("SHOAL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let dir = scratch();
    let config = |console: PathBuf| {
        let mut c = VmConfig::new(kernel.to_path_buf());
        c.initrd = Some(initrd.into());
        c.cmdline = format!("{} shoal.test=count", shoal_vmm::DEFAULT_CMDLINE);
        c.memory_mib = MEMORY_MIB;
        c.console = Console::File(console);
        c
    };
    let base = pss_kib();
    let mut boot_ms = Vec::new();
    let mut booted = Vec::new();
    for i in 0..n {
        let console = dir.join(format!("boot{i}"));
        let t0 = Instant::now();
        booted.push(Vm::boot(&config(console.clone())).expect("boot"));
        boot_ms.push(until_count(&console, 0, t0));
    }
    let boot_pss = (pss_kib() - base) / n as f64;
    drop(booted);

    let files = SnapshotFiles {
        state: dir.join("template.state"),
        memory: dir.join("template.mem"),
    };
    {
        let console = dir.join("template");
        let vm = Vm::boot(&config(console.clone())).expect("boot");
        until_count(&console, 2, Instant::now());
        vm.pause().expect("pause");
        vm.snapshot(&files).expect("snapshot");
    }
    let at_snapshot = last_count(&dir.join("template")).unwrap_or(0);
    let base = pss_kib();
    let mut restore_ms = Vec::new();
    let mut restored = Vec::new();
    for i in 0..n {
        let console = dir.join(format!("restored{i}"));
        let t0 = Instant::now();
        restored.push(
            Vm::restore(&RestoreConfig {
                files: files.clone(),
                console: Console::File(console.clone()),
                memory_mib: Some(MEMORY_MIB),
                vcpus: Some(1),
                vsock: None,
                shares: Vec::new(),
                free_page_reporting: false,
                limits: Default::default(),
            })
            .expect("restore"),
        );
        restore_ms.push(until_count(&console, at_snapshot, t0));
    }
    let restore_pss = (pss_kib() - base) / n as f64;
    drop(restored);
    report("boot → first count (EMULATED in the lab)", "ms", boot_ms);
    report(
        "restore → first new count (EMULATED in the lab)",
        "ms",
        restore_ms,
    );
    println!(
        "host memory per guest, {n} guests of {MEMORY_MIB} MiB (PSS growth / N): booted {:.1} MiB, restored from one snapshot {:.1} MiB ({:.0}% less)",
        boot_pss / 1024.0,
        restore_pss / 1024.0,
        100.0 * (1.0 - restore_pss / boot_pss)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let (Some(kernel), Some(initrd)) = (
        std::env::var_os("SHOAL_GUEST_KERNEL"),
        std::env::var_os("SHOAL_TEST_INITRD"),
    ) else {
        eprintln!("boot_setup: set SHOAL_GUEST_KERNEL and SHOAL_TEST_INITRD (scripts/bench does)");
        std::process::exit(2);
    };
    let runs: usize = std::env::var("SHOAL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    match std::env::var("SHOAL_BENCH_MODE")
        .as_deref()
        .unwrap_or("setup")
    {
        "setup" => bench_setup(Path::new(&kernel), Path::new(&initrd), runs),
        "boot" => bench_boot(Path::new(&kernel), Path::new(&initrd), runs),
        "restore" => bench_restore(Path::new(&kernel), Path::new(&initrd), runs),
        "template" => bench_template(Path::new(&kernel), Path::new(&initrd)),
        other => {
            eprintln!("boot_setup: unknown SHOAL_BENCH_MODE {other}");
            std::process::exit(2);
        }
    }
}
