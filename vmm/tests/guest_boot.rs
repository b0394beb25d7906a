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

use shoal_vmm::{Console, ExitReason, Vm, VmConfig, VsockConfig};

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
    Scratch::new("guest", name)
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
        console: Console::File(dir.path("console")),
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
    let (conn, _) = host_listener.accept().unwrap();
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--memory-mib", "96", "--vcpus", "1"])
        .arg("--vsock-uds")
        .arg(&uds)
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

/// Sends one command line to the test init and returns its one-line answer.
fn ask(uds: &Path, line: &str, deadline: Instant) -> String {
    let (mut s, mut r) = connect_guest(uds, GUEST_PORT, deadline);
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    r.read_line(&mut reply).unwrap();
    reply.trim_end().to_string()
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
    let uds = dir.path("disk.sock");
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
        disks: vec![shoal_vmm::DiskConfig {
            path: disk.into(),
            read_only,
        }],
        console: Console::File(dir.path("console")),
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
    let _ = hello.accept().unwrap();
    let answers = commands.iter().map(|c| ask(&uds, c, deadline)).collect();
    let (mut s, _) = connect_guest(&uds, GUEST_PORT, deadline);
    s.write_all(b"reboot\n").unwrap();
    assert_eq!(vm.wait(), ExitReason::Reboot);
    drop(watchdog);
    let _ = std::fs::remove_file(format!("{}_{HOST_PORT}", uds.display()));
    answers
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
