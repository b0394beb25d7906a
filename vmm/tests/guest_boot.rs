//! Whole-VM tests with the real guest kernel and the test initramfs (see
//! `vmm/guest-test-init`). `scripts/test` builds both, passes them in `SHOAL_GUEST_KERNEL` and
//! `SHOAL_TEST_INITRD`, and runs this file natively when the host's KVM can boot Linux, or
//! inside the nested lab (`scripts/lab`) when it cannot.
mod support;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::Scratch;

use shoal_vmm::{Console, ExitReason, SnapshotFiles, Vm, VmConfig, VsockConfig};

const GUEST_PORT: u32 = 1024;
const HOST_PORT: u32 = 1234;
const DEADLINE: Duration = Duration::from_secs(300);

/// The kernel and initramfs to boot, or a printed reason why these tests cannot run here.
fn artifacts() -> Option<(PathBuf, PathBuf)> {
    let (Some(kernel), Some(initrd)) = (
        std::env::var_os("SHOAL_GUEST_KERNEL"),
        std::env::var_os("SHOAL_TEST_INITRD"),
    ) else {
        eprintln!("SKIP: SHOAL_GUEST_KERNEL / SHOAL_TEST_INITRD not set; scripts/test sets them where a guest can boot");
        return None;
    };
    if Path::new("/sys/module/kvm_pvm").exists() && std::env::var_os("SHOAL_IN_LAB").is_none() {
        eprintln!("SKIP: /dev/kvm is nested PVM, which cannot boot a Linux guest; run through scripts/lab");
        return None;
    }
    Some((kernel.into(), initrd.into()))
}

fn scratch(name: &str) -> Scratch {
    let dir = Scratch::new("guest", name);
    watch_for_hang(dir.0.clone());
    dir
}

/// Whether the file system of `dir` keeps `user.*` xattrs.
fn keeps_user_xattrs(dir: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let probe = dir.join(".xattr-probe");
    if std::fs::write(&probe, b"").is_err() {
        return false;
    }
    let path = std::ffi::CString::new(probe.as_os_str().as_bytes()).unwrap();
    // SAFETY: both strings are NUL-terminated and live across the call; the value is one
    // byte long, as the length says.
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            c"user.shoal-probe".as_ptr(),
            b"1".as_ptr().cast(),
            1,
            0,
        )
    };
    let _ = std::fs::remove_file(&probe);
    rc == 0
}

/// A scratch directory on a file system that keeps `user.*` xattrs, where a guest overlay
/// with its upper layer on a share keeps its own (`userxattr`: the share refuses
/// `trusted.*`). tmpfs has none before Linux 6.6, so in the lab, whose /tmp is a tmpfs, this
/// is /var/tmp (ext4).
fn scratch_with_user_xattrs(name: &str) -> Scratch {
    let dir = scratch(name);
    if keeps_user_xattrs(&dir.0) {
        return dir;
    }
    let other =
        PathBuf::from("/var/tmp").join(format!("shoal-guest-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&other);
    std::fs::create_dir_all(&other).unwrap();
    assert!(
        keeps_user_xattrs(&other),
        "neither {} nor /var/tmp keeps user.* xattrs, which this test's guest overlay needs",
        dir.0.display()
    );
    drop(dir);
    watch_for_hang(other.clone());
    Scratch(other)
}

/// A test still running two minutes past its deadline is stuck in a call without a timeout:
/// print the guest console and what each thread of this process and its VMM children is
/// doing, then end the test process, so that CI reports a failure rather than waiting for
/// ever. (The test's scratch directory goes when it ends, pass or fail; that disarms this.)
fn watch_for_hang(dir: PathBuf) {
    std::thread::spawn(move || {
        let limit = DEADLINE + Duration::from_secs(120);
        std::thread::sleep(limit);
        if !dir.exists() {
            return;
        }
        eprintln!("HANG: {} still running after {limit:?}", dir.display());
        let console = std::fs::read_to_string(dir.join("console")).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(30).collect();
        eprintln!("guest console (last lines):");
        for line in tail.iter().rev() {
            eprintln!("  {line}");
        }
        let me = std::process::id();
        let mut pids = vec![me];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().nth(1));
            if ppid == Some(me.to_string().as_str()) {
                pids.extend(
                    entry
                        .file_name()
                        .to_str()
                        .and_then(|p| p.parse::<u32>().ok()),
                );
            }
        }
        for pid in pids {
            for task in std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let t = task.path();
                let read = |f: &str| std::fs::read_to_string(t.join(f)).unwrap_or_default();
                let state = read("stat")
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next())
                    .unwrap_or("?")
                    .to_string();
                eprintln!(
                    "pid {pid} task {} {} state {state} wchan {}",
                    t.display(),
                    read("comm").trim(),
                    read("wchan")
                );
                for frame in read("stack").lines().take(8) {
                    eprintln!("    {frame}");
                }
            }
        }
        std::process::exit(1);
    });
}

/// Connects to guest port `port` through the hybrid-vsock socket, retrying while the guest
/// is still booting (the guest kernel resets connections to ports nobody listens on).
fn connect_guest(uds: &Path, port: u32, deadline: Instant) -> (UnixStream, BufReader<UnixStream>) {
    loop {
        assert!(
            Instant::now() < deadline,
            "guest never accepted a vsock connection on port {port}"
        );
        if let Ok(mut s) = UnixStream::connect(uds) {
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
            let mut reader = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_ok() && line.starts_with("OK ") {
                let local: u32 = line[3..].trim().parse().expect("OK carries a port number");
                assert!(
                    local >= 1 << 30,
                    "host-side port {local} comes from the local range"
                );
                return (s, reader);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Accepts the guest's connection, failing the test (instead of hanging) at `deadline`.
fn accept_until(listener: &UnixListener, deadline: Instant, console: &Path) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "the guest never connected to the host; guest console:\n{}",
                    std::fs::read_to_string(console).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

#[test]
fn boot_guest_linux_and_vsock_both_ways() {
    let Some((kernel, initrd)) = artifacts() else {
        return;
    };
    let dir = scratch("vsock");
    let uds = dir.path("vm.sock");
    let host_listener = UnixListener::bind(format!("{}_{HOST_PORT}", uds.display())).unwrap();

    let config = VmConfig {
        kernel,
        initrd: Some(initrd),
        cmdline: "console=ttyS0 reboot=k panic=1".into(),
        memory_mib: 128,
        vcpus: 2,
        vsock: Some(VsockConfig {
            uds_path: uds.clone(),
            cid: 3,
        }),
        disks: Vec::new(),
        shares: Vec::new(),
        nets: Vec::new(),
        free_page_reporting: false,
        console: Console::File(dir.path("console")),
        limits: Default::default(),
    };
    let started = Instant::now();
    let deadline = started + DEADLINE;
    let vm = Vm::boot(&config).expect("boot");
    let stopper = vm.stopper();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(DEADLINE);
        stopper.stop();
    });

    // Guest → host: the guest connects to host port 1234 and sends one line.
    let conn = accept_until(&host_listener, deadline, &dir.path("console"));
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).unwrap();
    assert_eq!(line, "hello from the guest over vsock\n");
    eprintln!("guest reached host vsock after {:?}", started.elapsed());

    // Host → guest: CONNECT, OK, then a byte stream.
    let (mut s, mut r) = connect_guest(&uds, GUEST_PORT, deadline);
    s.write_all(b"echo ping over vsock\n").unwrap();
    let mut reply = String::new();
    r.read_line(&mut reply).unwrap();
    assert_eq!(reply, "ping over vsock\n");

    // Bulk both ways: several times the per-connection credit, so flow control must work.
    const BULK: usize = 3 * 1024 * 1024;
    let (mut s, mut r) = connect_guest(&uds, GUEST_PORT, deadline);
    s.write_all(format!("sink {BULK}\n").as_bytes()).unwrap();
    let data = pattern(BULK);
    s.write_all(&data).unwrap();
    let mut reply = String::new();
    r.read_line(&mut reply).unwrap();
    let sum: u64 = data.iter().map(|b| u64::from(*b)).sum();
    assert_eq!(reply, format!("got {BULK} {sum}\n"));

    let (mut s, mut r) = connect_guest(&uds, GUEST_PORT, deadline);
    s.write_all(format!("source {BULK}\n").as_bytes()).unwrap();
    let mut got = Vec::new();
    r.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), BULK, "guest→host stream length");
    assert!(got == pattern(BULK), "guest→host stream content");
    eprintln!("bulk transfers done after {:?}", started.elapsed());

    // A guest reboot ends the VM cleanly.
    let (mut s, _) = connect_guest(&uds, GUEST_PORT, deadline);
    s.write_all(b"reboot\n").unwrap();
    let reason = vm.wait();
    drop(watchdog);
    assert_eq!(reason, ExitReason::Reboot);
    let console = std::fs::read_to_string(dir.path("console")).unwrap();
    assert!(
        console.contains("SHOAL-TEST-INIT: up cpus=2 "),
        "console:\n{console}"
    );
    assert!(
        console.contains("SHOAL-TEST-INIT: rebooting"),
        "console:\n{console}"
    );
    let mem_kib: u64 = console
        .split("mem_kib=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("memory figure on the console");
    assert!(
        (90_000..=131_072).contains(&mem_kib),
        "guest sees {mem_kib} KiB of a 128 MiB VM"
    );
    assert!(
        !uds.exists(),
        "the vsock socket is removed when the VM ends"
    );
}

#[test]
fn boot_guest_cli_exits_zero_after_reboot() {
    let Some((kernel, initrd)) = artifacts() else {
        return;
    };
    let dir = scratch("cli");
    let uds = dir.path("cli.sock");
    let (mut child, deadline) = spawn_cli_vm(&kernel, &initrd, &dir, &uds, &["--memory-mib", "96"]);
    let (mut s, _) = connect_guest(&uds, GUEST_PORT, deadline);
    s.write_all(b"reboot\n").unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "shoal-vmm exited with {status}");
    let console = std::fs::read_to_string(dir.path("console")).unwrap();
    assert!(
        console.contains("SHOAL-TEST-INIT: up cpus=1 "),
        "console:\n{console}"
    );
    assert!(!uds.exists());
}

/// Starts `shoal-vmm` (1 vCPU, console to the scratch dir) with `args` and waits until its
/// vsock socket exists; returns the child and the test's deadline.
fn spawn_cli_vm(
    kernel: &Path,
    initrd: &Path,
    dir: &Scratch,
    uds: &Path,
    args: &[&str],
) -> (std::process::Child, Instant) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal-vmm"))
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--vcpus", "1"])
        .args(args)
        .arg("--vsock-uds")
        .arg(uds)
        .arg("--console")
        .arg(dir.path("console"))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + DEADLINE;
    while !uds.exists() {
        assert!(
            Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "shoal-vmm did not create its vsock socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, deadline)
}

/// Resident KiB of a VMM process's guest RAM: its anonymous mappings of at least 16 MiB (the
/// guest's RAM is one mapping cut in pieces where the kernel's pages are mapped from its
/// file; the VMM's own anonymous mappings are far smaller).
fn guest_rss_kib(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut total, mut counting) = (0, false);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if let Some((lo, hi)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let len = u64::from_str_radix(hi, 16).unwrap() - u64::from_str_radix(lo, 16).unwrap();
            counting = len >= 16 << 20 && words.nth(3) == Some("0");
        } else if counting && first == "Rss:" {
            total += words.next().unwrap().parse::<u64>().unwrap();
        }
    }
    total
}

#[test]
fn boot_guest_free_page_reporting_gives_freed_memory_back() {
    let Some((kernel, initrd)) = artifacts() else {
        return;
    };
    let dir = scratch("balloon");
    let uds = dir.path("balloon.sock");
    let (mut child, deadline) = spawn_cli_vm(
        &kernel,
        &initrd,
        &dir,
        &uds,
        &["--memory-mib", "256", "--free-page-reporting"],
    );
    let rss = || guest_rss_kib(child.id());
    // 96 MiB of file data in the guest's RAM-backed root: the host backs it.
    let (out, status) = sh(
        &uds,
        "dd if=/dev/zero of=/fill bs=1M count=96 2>&1 && grep MemFree /proc/meminfo",
        deadline,
    );
    assert_eq!(status, 0, "{out}");
    let filled = rss();
    assert!(
        filled > 96 << 10,
        "guest RAM resident after the fill: {filled} KiB"
    );
    // Deleted, the pages are free in the guest; the balloon reports them and the VMM drops
    // them (the guest reports in batches, about two seconds after pages are freed).
    let (out, status) = sh(&uds, "rm /fill", deadline);
    assert_eq!(status, 0, "{out}");
    let wait_until = Instant::now() + Duration::from_secs(90);
    let mut now = rss();
    while now + (64 << 10) > filled && Instant::now() < wait_until {
        std::thread::sleep(Duration::from_millis(500));
        now = rss();
    }
    assert!(
        now + (64 << 10) <= filled,
        "guest RAM resident went from {filled} KiB to only {now} KiB after the guest freed 96 MiB"
    );
    // Pages given back are usable again: data written into them reads back intact.
    let (out, status) = sh(
        &uds,
        "dd if=/dev/urandom of=/a bs=1M count=48 2>/dev/null && cp /a /b && md5sum /a /b",
        deadline,
    );
    assert_eq!(status, 0, "{out}");
    let sums: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(sums.len(), 2, "{out}");
    assert_eq!(
        sums[0], sums[1],
        "data differs after reuse of reported pages: {out}"
    );
    eprintln!("guest RAM resident: {filled} KiB filled, {now} KiB after the free");
    let (mut s, _) = connect_guest(&uds, GUEST_PORT, deadline);
    s.write_all(b"reboot\n").unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "shoal-vmm exited with {status}");
}

/// Sends one command line to the test init and returns its one-line answer.
fn ask(uds: &Path, line: &str, deadline: Instant) -> String {
    let (mut s, mut r) = connect_guest(uds, GUEST_PORT, deadline);
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    r.read_line(&mut reply).unwrap();
    reply.trim_end().to_string()
}

/// Runs one shell line in the guest (busybox); returns its output and exit status.
fn sh(uds: &Path, line: &str, deadline: Instant) -> (String, i32) {
    let (mut s, mut r) = connect_guest(uds, GUEST_PORT, deadline);
    s.write_all(format!("sh {line}\n").as_bytes()).unwrap();
    let mut out = String::new();
    r.read_to_string(&mut out).unwrap();
    let (text, status) = out
        .trim_end()
        .rsplit_once("exit=")
        .unwrap_or_else(|| panic!("no exit status from the guest for {line:?}: {out:?}"));
    (text.to_string(), status.parse().unwrap())
}

/// Boots a VM with `disks` and `shares`, runs `body` against its vsock socket, reboots.
fn with_vm<T>(
    kernel: &Path,
    initrd: &Path,
    dir: &Scratch,
    disks: Vec<shoal_vmm::DiskConfig>,
    shares: Vec<shoal_vmm::FsConfig>,
    body: impl FnOnce(&Path, Instant) -> T,
) -> T {
    let uds = dir.path("vm.sock");
    let config = VmConfig {
        kernel: kernel.into(),
        initrd: Some(initrd.into()),
        cmdline: "console=ttyS0 reboot=k panic=1".into(),
        memory_mib: 128,
        vcpus: 1,
        vsock: Some(VsockConfig {
            uds_path: uds.clone(),
            cid: 3,
        }),
        disks,
        shares,
        nets: Vec::new(),
        free_page_reporting: false,
        console: Console::File(dir.path("console")),
        limits: Default::default(),
    };
    // The guest's first connection goes to host port 1234; answer it so it moves on.
    let hello = UnixListener::bind(format!("{}_{HOST_PORT}", uds.display())).unwrap();
    let vm = Vm::boot(&config).expect("boot");
    let stopper = vm.stopper();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(DEADLINE);
        stopper.stop();
    });
    let deadline = Instant::now() + DEADLINE;
    let _ = accept_until(&hello, deadline, &dir.path("console"));
    let result = body(&uds, deadline);
    let (mut s, _) = connect_guest(&uds, GUEST_PORT, deadline);
    s.write_all(b"reboot\n").unwrap();
    assert_eq!(vm.wait(), ExitReason::Reboot);
    drop(watchdog);
    let _ = std::fs::remove_file(format!("{}_{HOST_PORT}", uds.display()));
    result
}

/// Boots a VM with `disk` as vda, runs `commands`, reboots; returns the answers.
fn with_disk(
    kernel: &Path,
    initrd: &Path,
    dir: &Scratch,
    disk: &Path,
    read_only: bool,
    commands: &[&str],
) -> Vec<String> {
    let disks = vec![shoal_vmm::DiskConfig {
        path: disk.into(),
        read_only,
    }];
    with_vm(kernel, initrd, dir, disks, Vec::new(), |uds, deadline| {
        commands.iter().map(|c| ask(uds, c, deadline)).collect()
    })
}

#[test]
fn boot_guest_virtio_blk_ext4_survives_a_restart() {
    let Some((kernel, initrd)) = artifacts() else {
        return;
    };
    let dir = scratch("blk");
    // Not on tmpfs, so the disk really uses O_DIRECT.
    let image = PathBuf::from(format!(
        "/var/tmp/shoal-blk-test-{}.img",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&image);
    std::fs::File::create(&image)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&image)
        .status()
        .expect("mkfs.ext4 (Debian e2fsprogs)");
    assert!(mkfs.success());

    let answers = with_disk(
        &kernel,
        &initrd,
        &dir,
        &image,
        false,
        &[
            "mount /dev/vda /mnt ext4",
            "write /mnt/hello.txt written through virtio-blk",
            "sync",
            "read /mnt/hello.txt",
            "umount /mnt",
        ],
    );
    let console = std::fs::read_to_string(dir.path("console")).unwrap_or_default();
    assert_eq!(
        answers,
        ["ok", "ok", "ok", "written through virtio-blk", "ok"],
        "console:\n{console}"
    );

    // A new VM over the same image sees the file; read-only disks refuse writes.
    let answers = with_disk(
        &kernel,
        &initrd,
        &dir,
        &image,
        true,
        &[
            "mount /dev/vda /mnt ext4",
            "read /mnt/hello.txt",
            "write /mnt/other.txt x",
        ],
    );
    assert_eq!(
        answers[0], "ok read-only",
        "the guest sees a write-protected disk"
    );
    assert_eq!(answers[1], "written through virtio-blk");
    assert!(
        answers[2].starts_with("error"),
        "read-only disk accepted a write: {answers:?}"
    );
    let _ = std::fs::remove_file(&image);
}

#[test]
fn boot_guest_virtio_fs_share_overlay_and_no_escape() {
    let Some((kernel, initrd)) = artifacts() else {
        return;
    };
    let dir = scratch_with_user_xattrs("fs");
    let share = dir.path("share");
    std::fs::create_dir_all(share.join("lower")).unwrap();
    std::fs::write(share.join("hello"), "from the host").unwrap();
    std::fs::write(share.join("lower/a"), "lower a").unwrap();
    std::fs::write(share.join("lower/gone"), "to be hidden").unwrap();
    // Outside the share, and two links in the share that point at it.
    std::fs::write(dir.path("secret"), "host secret").unwrap();
    std::os::unix::fs::symlink(dir.path("secret"), share.join("abs")).unwrap();
    std::os::unix::fs::symlink("../secret", share.join("up")).unwrap();
    let shares = vec![shoal_vmm::FsConfig {
        tag: "shared".into(),
        dir: share.clone(),
        cache: shoal_vmm::CacheMode::Auto,
        root: None,
    }];

    let steps = [
        // Mount the tag and read what the host put there.
        "mkdir -p /mnt && mount -t virtiofs shared /mnt && cat /mnt/hello",
        // Create, write, rename, delete, symlink.
        "echo from the guest > /mnt/new && mv /mnt/new /mnt/renamed && mkdir /mnt/d \
         && echo x > /mnt/d/f && rm /mnt/d/f && rmdir /mnt/d && ln -s renamed /mnt/sl \
         && cat /mnt/sl && sync",
        // Escape attempts: links out of the tree and `..` resolve in the guest, not the host.
        "cat /mnt/abs /mnt/up /mnt/../secret /mnt/lower/../../secret; ls -a /mnt/..; true",
        // A read-only overlay lower on the share, upper on guest tmpfs.
        "mkdir -p /run/u /run/w /ov && mount -t tmpfs tmpfs /run/u && mkdir /run/u/up /run/u/wk \
         && mount -t overlay overlay -o lowerdir=/mnt/lower,upperdir=/run/u/up,workdir=/run/u/wk /ov \
         && echo new > /ov/b && rm /ov/gone && cat /ov/a && echo && ls /ov",
        // An overlay whose upper layer lives on the share too (whiteouts on the host; its
        // xattrs in user.*, since the share refuses trusted.*).
        "mkdir -p /mnt/upper /mnt/work /ov2 \
         && mount -t overlay overlay -o lowerdir=/mnt/lower,upperdir=/mnt/upper,workdir=/mnt/work,userxattr /ov2 \
         && echo changed > /ov2/a && rm /ov2/gone && ls /ov2 && sync",
        "umount /ov2 && umount /ov && umount /mnt",
    ];
    let answers = with_vm(
        &kernel,
        &initrd,
        &dir,
        Vec::new(),
        shares,
        |uds, deadline| {
            steps
                .iter()
                .map(|line| sh(uds, line, deadline))
                .collect::<Vec<_>>()
        },
    );
    let console = std::fs::read_to_string(dir.path("console")).unwrap_or_default();
    let ok = |i: usize| {
        assert_eq!(
            answers[i].1, 0,
            "step {i} failed: {}\n{}\nconsole:\n{console}",
            steps[i], answers[i].0
        );
        answers[i].0.as_str()
    };
    assert_eq!(ok(0), "from the host");
    assert_eq!(ok(1).trim(), "from the guest");
    let escape = ok(2);
    assert!(
        !escape.contains("host secret"),
        "the guest read a file outside the share: {escape}"
    );
    assert!(escape.contains("No such file"), "{escape}");
    let overlay = ok(3);
    assert!(overlay.starts_with("lower a"), "{overlay}");
    assert!(
        overlay.contains('b') && !overlay.contains("gone"),
        "{overlay}"
    );
    let overlay2 = ok(4);
    assert!(!overlay2.contains("gone"), "{overlay2}");
    ok(5);

    // What the guest did is on the host; the overlay lower layers were not touched.
    assert_eq!(
        std::fs::read_to_string(share.join("renamed")).unwrap(),
        "from the guest\n"
    );
    assert!(!share.join("new").exists() && !share.join("d").exists());
    assert_eq!(
        std::fs::read_link(share.join("sl")).unwrap(),
        PathBuf::from("renamed")
    );
    assert_eq!(
        std::fs::read_to_string(share.join("lower/a")).unwrap(),
        "lower a"
    );
    assert!(share.join("lower/gone").exists());
    assert_eq!(
        std::fs::read_to_string(share.join("upper/a")).unwrap(),
        "changed\n"
    );
    use std::os::unix::fs::FileTypeExt;
    let whiteout = std::fs::symlink_metadata(share.join("upper/gone")).unwrap();
    assert!(
        whiteout.file_type().is_char_device(),
        "overlayfs whiteout on the host: {whiteout:?}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path("secret")).unwrap(),
        "host secret"
    );
}

/// The `count N uptime_ms=T` lines of a counting guest's console (see guest-test-init), in
/// order; a line cut by a pause or a restore is left out.
fn counts(console: &Path) -> Vec<(u64, u64)> {
    let text = String::from_utf8_lossy(&std::fs::read(console).unwrap_or_default()).into_owned();
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("SHOAL-TEST-INIT: count ")?;
            let (n, t) = rest.split_once(" uptime_ms=")?;
            Some((n.parse().ok()?, t.trim().parse().ok()?))
        })
        .collect()
}

/// Waits until the counting guest's console shows count `n` or more; returns its counts.
fn wait_for_count(console: &Path, n: u64, deadline: Instant) -> Vec<(u64, u64)> {
    loop {
        let seen = counts(console);
        if seen.last().is_some_and(|(k, _)| *k >= n) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "no count {n} on {}; console:\n{}",
            console.display(),
            std::fs::read_to_string(console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Counts go up by one, and the guest's clock never goes back.
fn assert_counting_on(seen: &[(u64, u64)], what: &str) {
    for pair in seen.windows(2) {
        let ((n0, t0), (n1, t1)) = (pair[0], pair[1]);
        assert_eq!(n1, n0 + 1, "{what}: count {n0} is followed by {n1}");
        assert!(
            t1 >= t0,
            "{what}: the guest clock went back from {t0} to {t1} ms"
        );
    }
}

#[test]
fn boot_guest_snapshot_restores_twice_and_each_copy_goes_on_alone() {
    let Some((kernel, initrd)) = artifacts() else {
        return;
    };
    let dir = scratch("snapshot");
    let deadline = Instant::now() + DEADLINE;
    let mut config = VmConfig::new(kernel);
    config.initrd = Some(initrd);
    config.cmdline = format!("{} shoal.test=count", shoal_vmm::DEFAULT_CMDLINE);
    config.memory_mib = 96;
    config.vcpus = 2;
    config.console = Console::File(dir.path("console"));
    let vm = Vm::boot(&config).expect("boot");
    wait_for_count(&dir.path("console"), 5, deadline);

    vm.pause().expect("pause");
    let at_pause = counts(&dir.path("console"));
    let (last, last_uptime) = *at_pause.last().unwrap();
    let files = SnapshotFiles {
        state: dir.path("vm.state"),
        memory: dir.path("vm.mem"),
    };
    vm.snapshot(&files).expect("snapshot");
    vm.resume();
    let original = wait_for_count(&dir.path("console"), last + 5, deadline);
    assert_counting_on(&original, "the original");

    // Two restores at once; each goes on from the snapshot's count with its own timers and
    // clock, the original still running beside them.
    let restored = support::restore_side_by_side(&files, &dir, &["r1", "r2"], 96, 2);
    for name in ["r1", "r2"] {
        let seen = wait_for_count(&dir.path(name), last + 10, deadline);
        // The first whole line is the next count, or the one after if the pause cut a line.
        let (first, first_uptime) = seen[0];
        assert!(
            first == last + 1 || first == last + 2,
            "{name} starts at count {first}; the snapshot was taken after {last}"
        );
        assert!(first_uptime >= last_uptime, "{name}: the clock went back");
        assert_counting_on(&seen, name);
    }
    for vm in restored.into_iter().chain([vm]) {
        vm.stopper().stop();
        assert_eq!(vm.wait(), ExitReason::Stopped);
    }
}
