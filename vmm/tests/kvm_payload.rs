//! Native KVM tests with tiny guest payloads: they run on any /dev/kvm, including nested-PVM
//! hosts where a full Linux guest cannot boot. Each payload is a minimal 64-bit ELF built
//! here, loaded through the same path as a kernel.
mod support;
use std::time::Duration;
use support::Scratch;

use shoal_vmm::{Console, ExitReason, Vm, VmConfig, VsockConfig};

/// Tests count the process's fds, mappings and threads, so they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Skips (with a printed reason) when /dev/kvm cannot be opened.
fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIP: /dev/kvm is not usable here ({e}); native KVM payload tests not run");
            false
        }
    }
}

/// An ELF64 executable with one PT_LOAD segment holding `code` at physical 1 MiB.
fn tiny_elf(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    let mut elf = Vec::new();
    // ELF header
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD.to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // flags
    elf.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // phnum
    elf.extend_from_slice(&64u16.to_le_bytes()); // shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // shstrndx
                                                // Program header
    let offset = 64 + 56u64;
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    elf.extend_from_slice(&offset.to_le_bytes());
    elf.extend_from_slice(&LOAD.to_le_bytes()); // vaddr
    elf.extend_from_slice(&LOAD.to_le_bytes()); // paddr
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    elf.extend_from_slice(code);
    elf
}

/// Code that prints `text` on COM1.
fn print(text: &[u8]) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in text {
        c.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    c
}

/// Code that resets the machine through the i8042, then halts.
fn reset() -> Vec<u8> {
    vec![0xb0, 0xfe, 0xe6, 0x64, 0xf4] // mov al, 0xfe; out 0x64, al; hlt
}

fn scratch(name: &str) -> Scratch {
    Scratch::new("payload", name)
}

fn config(dir: &Scratch, code: &[u8]) -> VmConfig {
    let kernel = dir.path("payload.elf");
    std::fs::write(&kernel, tiny_elf(code)).unwrap();
    let mut c = VmConfig::new(kernel);
    c.memory_mib = 32;
    c.console = Console::File(dir.path("console"));
    c
}

fn wait_with_timeout(vm: Vm, limit: Duration) -> ExitReason {
    let stopper = vm.stopper();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(limit);
        stopper.stop();
    });
    let reason = vm.wait();
    drop(watchdog);
    reason
}

#[test]
fn serial_output_and_i8042_reset() {
    let _serial = serial();
    if !kvm_available() {
        return;
    }
    let dir = scratch("serial");
    let mut code = print(b"hello from a tiny guest\n");
    code.extend(reset());
    let vm = Vm::boot(&config(&dir, &code)).expect("boot");
    let reason = wait_with_timeout(vm, Duration::from_secs(20));
    assert_eq!(reason, ExitReason::Reboot);
    assert_eq!(
        std::fs::read_to_string(dir.path("console")).unwrap(),
        "hello from a tiny guest\n"
    );
}

#[test]
fn mmio_exits_reach_the_virtio_transport() {
    let _serial = serial();
    if !kvm_available() {
        return;
    }
    let dir = scratch("mmio");
    // mov rcx, 0xd0000000; mov eax, [rcx]; cmp eax, "virt"; jne +3; print 'M'
    let mut code = vec![0x48, 0xb9, 0x00, 0x00, 0x00, 0xd0, 0, 0, 0, 0];
    code.extend_from_slice(&[0x8b, 0x01]);
    code.extend_from_slice(&[0x3d, 0x76, 0x69, 0x72, 0x74]);
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8 (flags unaffected)
    code.extend_from_slice(&[0x75, 0x03, 0xb0, b'M', 0xee]);
    // Device id register (offset 8) must read 19 (vsock): print it as a byte + '0'... 19 -> 'C'.
    code.extend_from_slice(&[0x8b, 0x41, 0x08]); // mov eax, [rcx+8]
    code.extend_from_slice(&[0x04, 0x30, 0xee]); // add al, '0'; out dx, al
    code.extend(print(b"\n"));
    code.extend(reset());
    let mut cfg = config(&dir, &code);
    cfg.vsock = Some(VsockConfig {
        uds_path: dir.path("vsock.sock"),
        cid: 3,
    });
    let vm = Vm::boot(&cfg).expect("boot");
    assert!(
        dir.path("vsock.sock").exists(),
        "vsock socket is created at boot"
    );
    let reason = wait_with_timeout(vm, Duration::from_secs(20));
    assert_eq!(reason, ExitReason::Reboot);
    assert_eq!(
        std::fs::read_to_string(dir.path("console")).unwrap(),
        "MC\n"
    );
    assert!(
        !dir.path("vsock.sock").exists(),
        "vsock socket is removed when the VM ends"
    );
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Mappings of exactly `bytes` bytes (guest RAM is recognisable by its size; counting all
/// mappings would also count the test harness's own thread stacks, which come and go).
fn mappings_of_size(bytes: u64) -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| {
            let range = l.split_whitespace().next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            u64::from_str_radix(b, 16).unwrap() - u64::from_str_radix(a, 16).unwrap() == bytes
        })
        .count()
}

fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .filter(|n| n.starts_with("shoal-"))
        .collect()
}

#[test]
fn host_stop_of_a_spinning_guest_leaves_nothing_behind() {
    let _serial = serial();
    if !kvm_available() {
        return;
    }
    let dir = scratch("stop");
    let mut code = print(b"spin\n");
    code.extend_from_slice(&[0xeb, 0xfe]); // jmp $
    let mut cfg = config(&dir, &code);
    cfg.vcpus = 2;
    cfg.memory_mib = 48; // a size nothing else in this process maps
    cfg.vsock = Some(VsockConfig {
        uds_path: dir.path("v.sock"),
        cid: 7,
    });
    // Warm up lazily-initialised process state (thread-locals, signal handler) once.
    drop(Vm::boot(&cfg).expect("boot"));
    let fds = fd_count();
    assert_eq!(mappings_of_size(48 << 20), 0);
    for _ in 0..3 {
        let vm = Vm::boot(&cfg).expect("boot");
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            thread_names().iter().any(|n| n == "shoal-vcpu1"),
            "vCPU threads are running"
        );
        vm.stopper().stop();
        assert_eq!(vm.wait(), ExitReason::Stopped);
    }
    assert!(
        thread_names().is_empty(),
        "threads left: {:?}",
        thread_names()
    );
    assert_eq!(fd_count(), fds, "file descriptors leaked");
    assert_eq!(mappings_of_size(48 << 20), 0, "guest RAM mapping leaked");
    assert!(!dir.path("v.sock").exists());
}

#[test]
fn bad_input_is_named_and_leaves_nothing() {
    let _serial = serial();
    if !kvm_available() {
        return;
    }
    let dir = scratch("bad");
    let good = config(&dir, &reset());
    let fds = fd_count();

    let mut c = good.clone();
    c.kernel = dir.path("missing-vmlinux");
    let e = Vm::boot(&c).err().unwrap().to_string();
    assert!(e.contains("missing-vmlinux"), "{e}");

    let mut c = good.clone();
    std::fs::write(dir.path("truncated"), &tiny_elf(&reset())[..40]).unwrap();
    c.kernel = dir.path("truncated");
    let e = Vm::boot(&c).err().unwrap().to_string();
    assert!(e.contains("truncated") && e.contains("ELF"), "{e}");

    let mut c = good.clone();
    c.initrd = Some(dir.path("missing-initrd"));
    let e = Vm::boot(&c).err().unwrap().to_string();
    assert!(
        e.contains("initramfs") && e.contains("missing-initrd"),
        "{e}"
    );

    let mut c = good.clone();
    c.memory_mib = 0;
    let e = Vm::boot(&c).err().unwrap().to_string();
    assert!(e.contains("memory"), "{e}");
    c.memory_mib = 1 << 30;
    let e = Vm::boot(&c).err().unwrap().to_string();
    assert!(e.contains("larger than this host"), "{e}");

    let mut c = good.clone();
    c.cmdline = "a".repeat(3000);
    let e = Vm::boot(&c).err().unwrap().to_string();
    assert!(e.contains("command line"), "{e}");

    let mut c = good.clone();
    std::fs::write(dir.path("taken.sock"), b"").unwrap();
    c.vsock = Some(VsockConfig {
        uds_path: dir.path("taken.sock"),
        cid: 3,
    });
    let e = Vm::boot(&c).err().unwrap().to_string();
    assert!(e.contains("taken.sock") && e.contains("exists"), "{e}");
    assert!(
        dir.path("taken.sock").exists(),
        "an existing path is not removed"
    );

    c.vsock = Some(VsockConfig {
        uds_path: dir.path("no-such-dir/v.sock"),
        cid: 3,
    });
    let e = Vm::boot(&c).err().unwrap().to_string();
    assert!(e.contains("no-such-dir/v.sock"), "{e}");

    let mut c = good.clone();
    c.disks = vec![shoal_vmm::DiskConfig {
        path: dir.path("missing.img"),
        read_only: false,
    }];
    let e = Vm::boot(&c).err().unwrap().to_string();
    assert!(e.contains("missing.img") && e.contains("disk image"), "{e}");

    let mut c = good.clone();
    c.vcpus = 0;
    assert!(Vm::boot(&c)
        .err()
        .unwrap()
        .to_string()
        .contains("vCPU count"));

    assert_eq!(fd_count(), fds, "a failed boot leaked file descriptors");
}

#[test]
fn cli_exit_status_follows_the_guest() {
    let _serial = serial();
    if !kvm_available() {
        return;
    }
    let dir = scratch("cli");
    let kernel = dir.path("payload.elf");
    let mut code = print(b"cli\n");
    code.extend(reset());
    std::fs::write(&kernel, tiny_elf(&code)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shoal-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory-mib", "32"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"cli\n", "console goes to stdout by default");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shoal-vmm"))
        .arg("--kernel")
        .arg(dir.path("nope"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot open kernel image") && err.contains("nope"),
        "{err}"
    );
}

#[test]
fn a_vcpu_failure_ends_the_vm_with_an_error() {
    let _serial = serial();
    if !kvm_available() {
        return;
    }
    let dir = scratch("error");
    // Jump into the MMIO gap where no device and no RAM is: KVM cannot fetch instructions
    // there and stops the vCPU with an internal error.
    let mut code = print(b"jumping\n");
    code.extend_from_slice(&[0x48, 0xb8, 0x00, 0x20, 0x00, 0xd0, 0, 0, 0, 0]); // mov rax, 0xd0002000
    code.extend_from_slice(&[0xff, 0xe0]); // jmp rax
    let vm = Vm::boot(&config(&dir, &code)).expect("boot");
    let reason = wait_with_timeout(vm, Duration::from_secs(20));
    match reason {
        ExitReason::Error(text) => assert!(text.contains("vCPU 0"), "{text}"),
        other => panic!("expected an error exit, got {other:?}"),
    }
    assert_eq!(
        std::fs::read_to_string(dir.path("console")).unwrap(),
        "jumping\n"
    );
    assert!(
        thread_names().is_empty(),
        "threads left: {:?}",
        thread_names()
    );
}
