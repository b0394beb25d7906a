//! Native KVM tests with tiny guest payloads: they run on any /dev/kvm, including nested-PVM
//! hosts where a full Linux guest cannot boot. Each payload is a minimal 64-bit ELF built
//! here, loaded through the same path as a kernel.
mod support;
use std::time::Duration;
use support::Scratch;

use std::os::unix::fs::MetadataExt;

use shoal_vmm::snapshot::peek_memory;
use shoal_vmm::{Console, ExitReason, RestoreConfig, SnapshotFiles, Vm, VmConfig, VsockConfig};
use vm_memory::GuestAddress;

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

/// A guest whose CPU triple-faults (an exception it cannot deliver: an empty IDT) ends
/// the VM with the fault and where it happened, not as an ordinary reset.
#[test]
fn a_triple_fault_is_told_from_a_reset() {
    let _serial = serial();
    if !kvm_available() {
        return;
    }
    let dir = scratch("triple");
    let mut code = print(b"breaking\n");
    // xor eax, eax; push rax; push rax; lidt [rsp] (limit 0); ud2
    code.extend_from_slice(&[0x31, 0xc0, 0x50, 0x50, 0x0f, 0x01, 0x1c, 0x24, 0x0f, 0x0b]);
    let vm = Vm::boot(&config(&dir, &code)).expect("boot");
    // A report asked for once the VM has ended says how it ended.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let report = loop {
        let report = vm.cpu_report();
        if report.starts_with("vCPUs: none to look at") || std::time::Instant::now() > deadline {
            break report;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        report.starts_with("vCPUs: none to look at, the VM has ended: the guest triple-faulted"),
        "{report}"
    );
    match wait_with_timeout(vm, Duration::from_secs(20)) {
        ExitReason::TripleFault(at) => assert!(at.contains("vCPU 0 at rip 0x"), "{at}"),
        other => panic!("ended with {other:?}"),
    }
}

/// The vCPU report reads a running guest where it stands, from another thread, while the
/// VM is waited on: a guest spinning is running, with its LAPIC timer read; the VM is
/// resumed after each report (a second one reads it the same), and one that ended says so.
#[test]
fn the_cpu_report_tells_where_a_running_guest_stands() {
    let _serial = serial();
    if !kvm_available() {
        return;
    }
    let dir = scratch("cpureport");
    let mut code = print(b"spinning\n");
    code.extend_from_slice(&[0xeb, 0xfe]); // jmp $
    let vm = Vm::boot(&config(&dir, &code)).expect("boot");
    let (reporter, stopper) = (vm.cpu_reporter(), vm.stopper());
    let console = dir.path("console");
    let asker = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::fs::read_to_string(&console).unwrap_or_default() != "spinning\n" {
            assert!(std::time::Instant::now() < deadline, "the guest never spun");
            std::thread::sleep(Duration::from_millis(10));
        }
        let first = reporter.report(Duration::from_secs(10));
        let second = reporter.report(Duration::from_secs(10));
        stopper.stop();
        (first, second, reporter)
    });
    let reason = vm.wait();
    let (first, second, reporter) = asker.join().unwrap();
    assert_eq!(reason, ExitReason::Stopped);
    for report in [&first, &second] {
        assert!(
            report.starts_with("vCPU 0: running at rip 0x") && report.contains("LAPIC timer"),
            "{report}"
        );
    }
    // Both caught the guest on its two-byte spin loop.
    assert_eq!(first, second);
    println!("{first}");
    assert_eq!(
        reporter.report(Duration::from_secs(1)),
        "vCPUs: (the VM has ended)"
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
    assert_eq!(
        err.matches("No such file").count(),
        1,
        "cause printed once: {err}"
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

/// Guest address of the counter the snapshot payload keeps in RAM.
const COUNTER: u64 = 0x20_0000;

/// Code that counts up from 1 in RAM at [`COUNTER`] and prints each value's low byte on
/// COM1, with a delay between: the console holds byte `i + 1` at offset `i`, so anyone can
/// check that a guest went on exactly where it was.
fn counter() -> Vec<u8> {
    let addr = COUNTER.to_le_bytes();
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    c.extend_from_slice(&[0x48, 0xa1]); // loop: mov rax, [COUNTER]
    c.extend_from_slice(&addr);
    c.extend_from_slice(&[0x48, 0xff, 0xc0]); // inc rax
    c.extend_from_slice(&[0x48, 0xa3]); // mov [COUNTER], rax
    c.extend_from_slice(&addr);
    c.push(0xee); // out dx, al
    c.extend_from_slice(&[0xb9, 0x00, 0x01, 0x00, 0x00]); // mov ecx, 0x100
    c.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfc]); // delay: dec ecx; jnz delay
    c.extend_from_slice(&[0xeb, 0xdd]); // jmp loop
    c
}

/// Waits until the file at `path` holds at least `len` bytes, then returns them.
fn wait_for_console(path: &std::path::Path, len: usize) -> Vec<u8> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let bytes = std::fs::read(path).unwrap_or_default();
        if bytes.len() >= len {
            return bytes;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} holds {} bytes after 30 s, {len} expected",
            path.display(),
            bytes.len()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Asserts the console shows the counter going on without a gap from value `first`.
fn assert_counts_from(console: &[u8], first: u64, what: &str) {
    for (i, b) in console.iter().enumerate() {
        assert_eq!(
            *b,
            (first + i as u64) as u8,
            "{what}: byte {i} breaks the count that starts at {first}"
        );
    }
}

fn counter_value(memory_file: &std::path::Path) -> u64 {
    let bytes = peek_memory(memory_file, GuestAddress(COUNTER), 8).unwrap();
    u64::from_le_bytes(bytes.try_into().unwrap())
}

#[test]
fn snapshot_restores_twice_and_each_copy_goes_on_alone() {
    let _serial = serial();
    if !kvm_available() {
        return;
    }
    let dir = scratch("snapshot");
    let mut cfg = config(&dir, &counter());
    cfg.vcpus = 2;
    cfg.memory_mib = 40; // a size nothing else in this process maps
    let threads_before = thread_names();
    let fds = fd_count();

    let vm = Vm::boot(&cfg).expect("boot");
    wait_for_console(&dir.path("console"), 200);
    vm.pause().expect("pause");
    let before = std::fs::read(dir.path("console")).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        std::fs::read(dir.path("console")).unwrap(),
        before,
        "a paused guest prints nothing"
    );
    assert_counts_from(&before, 1, "before the snapshot");
    let files = SnapshotFiles {
        state: dir.path("vm.state"),
        memory: dir.path("vm.mem"),
    };
    vm.snapshot(&files).expect("snapshot");
    // Paused between storing the counter and printing it, or after printing it.
    let saved = counter_value(&files.memory);
    let printed = before.len() as u64;
    assert!(
        saved == printed || saved == printed + 1,
        "counter {saved} in the memory file, {printed} printed"
    );
    // Zero pages are holes: the file takes far less disk than the guest's 40 MiB.
    let on_disk = std::fs::metadata(&files.memory).unwrap().blocks() * 512;
    assert!(
        on_disk < 4 << 20,
        "{on_disk} bytes on disk for a memory file"
    );

    // The original goes on where it paused.
    vm.resume();
    let after = wait_for_console(&dir.path("console"), before.len() + 100);
    assert_counts_from(&after, 1, "the original after resume");

    // Two VMs restored at once, each with its own console, both go on from the snapshot
    // while the original keeps running.
    let restored = support::restore_side_by_side(&files, &dir, &["r1", "r2"], 40, 2);
    for name in ["r1", "r2"] {
        let console = wait_for_console(&dir.path(name), 300);
        assert_counts_from(&console, printed + 1, name);
    }
    // MAP_PRIVATE: what the restored guests wrote did not reach the file.
    assert_eq!(counter_value(&files.memory), saved);
    assert!(
        thread_names()
            .iter()
            .filter(|n| *n == "shoal-vcpu1")
            .count()
            == 3,
        "three VMs with two vCPUs each: {:?}",
        thread_names()
    );

    // A restored VM pauses, snapshots and resumes like a booted one.
    let again = SnapshotFiles {
        state: dir.path("again.state"),
        memory: dir.path("again.mem"),
    };
    restored[0].pause().unwrap();
    restored[0].snapshot(&again).unwrap();
    restored[0].resume();
    assert!(counter_value(&again.memory) > saved);

    // Pauses right after resumes (vCPUs still leaving the last pause) park every vCPU anew.
    for _ in 0..20 {
        vm.pause().expect("pause right after a resume");
        vm.resume();
    }
    let seen = std::fs::read(dir.path("console")).unwrap().len();
    let after = wait_for_console(&dir.path("console"), seen + 50);
    assert_counts_from(&after, 1, "the original after pause/resume cycles");

    for vm in restored.into_iter().chain([vm]) {
        vm.stopper().stop();
        assert_eq!(vm.wait(), ExitReason::Stopped);
    }
    assert_eq!(thread_names(), threads_before, "VMM threads left");
    assert_eq!(fd_count(), fds, "file descriptors leaked");
    assert_eq!(mappings_of_size(40 << 20), 0, "guest RAM mapping leaked");
}

#[test]
fn snapshot_bad_input_is_named_and_half_started_vms_leave_nothing() {
    let _serial = serial();
    if !kvm_available() {
        return;
    }
    let dir = scratch("snapshot-bad");
    let mut cfg = config(&dir, &counter());
    cfg.memory_mib = 24;
    let files = SnapshotFiles {
        state: dir.path("vm.state"),
        memory: dir.path("vm.mem"),
    };
    let vm = Vm::boot(&cfg).expect("boot");
    let e = vm.snapshot(&files).unwrap_err().to_string();
    assert!(e.contains("must be paused"), "{e}");
    vm.pause().unwrap();
    vm.snapshot(&files).unwrap();
    let other = SnapshotFiles {
        state: dir.path("other.state"),
        memory: dir.path("other.mem"),
    };
    vm.snapshot(&other).unwrap();
    drop(vm);

    // A guest that has reset itself cannot be paused. (Its own directory: `config` writes
    // the payload to a fixed name, which the counting guests below boot from.)
    let reset_dir = scratch("snapshot-reset");
    let vm = Vm::boot(&config(&reset_dir, &reset())).expect("boot");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match vm.pause() {
            Err(e) => {
                assert!(e.to_string().contains("has ended"), "{e}");
                break;
            }
            Ok(()) => vm.resume(),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never reset"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(vm);

    // A VM with a disk, whose state snapshots do not hold: refused, and nothing written.
    let mut with_disk = cfg.clone();
    std::fs::write(dir.path("disk.img"), vec![0u8; 1 << 20]).unwrap();
    with_disk.disks = vec![shoal_vmm::DiskConfig {
        path: dir.path("disk.img"),
        read_only: true,
    }];
    let vm = Vm::boot(&with_disk).expect("boot");
    vm.pause().unwrap();
    let partial = SnapshotFiles {
        state: dir.path("disk.state"),
        memory: dir.path("disk.mem"),
    };
    let e = vm.snapshot(&partial).unwrap_err().to_string();
    assert!(e.contains("block") && e.contains("cannot be saved"), "{e}");
    drop(vm);
    let left: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("disk.") && n != "disk.img" || n.ends_with(".partial"))
        .collect();
    assert!(
        left.is_empty(),
        "files left by a refused snapshot: {left:?}"
    );

    // A VM with a vsock device the guest never set up: saved, and restored with a new
    // socket and CID (below).
    let mut with_vsock = cfg.clone();
    with_vsock.vsock = Some(VsockConfig {
        uds_path: dir.path("v.sock"),
        cid: 3,
    });
    let vsock_files = SnapshotFiles {
        state: dir.path("vsock.state"),
        memory: dir.path("vsock.mem"),
    };
    let vm = Vm::boot(&with_vsock).expect("boot");
    vm.pause().unwrap();
    vm.snapshot(&vsock_files).unwrap();
    drop(vm);

    let threads = thread_names();
    let fds = fd_count();

    let restore = |state: &std::path::Path, memory: &std::path::Path, mib: Option<u64>| {
        Vm::restore(&RestoreConfig {
            files: SnapshotFiles {
                state: state.into(),
                memory: memory.into(),
            },
            console: Console::File(dir.path("restored")),
            memory_mib: mib,
            vcpus: None,
            vsock: None,
            shares: Vec::new(),
            free_page_reporting: false,
            limits: Default::default(),
        })
        .err()
        .expect("restore must fail")
        .to_string()
    };
    let state = std::fs::read(&files.state).unwrap();
    let bad = dir.path("bad.state");

    let e = restore(&dir.path("missing.state"), &files.memory, None);
    assert!(e.contains("missing.state"), "{e}");

    std::fs::write(&bad, &state[..state.len() - 100]).unwrap();
    let e = restore(&bad, &files.memory, None);
    assert!(e.contains("bad.state is truncated"), "{e}");

    let mut flipped = state.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x40;
    std::fs::write(&bad, &flipped).unwrap();
    let e = restore(&bad, &files.memory, None);
    assert!(e.contains("corrupted") && e.contains("checksum"), "{e}");

    let mut newer = state.clone();
    newer[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&bad, &newer).unwrap();
    let e = restore(&bad, &files.memory, None);
    assert!(e.contains("format version 99"), "{e}");

    std::fs::write(&bad, b"#!/bin/sh\necho not a snapshot\n").unwrap();
    let e = restore(&bad, &files.memory, None);
    assert!(e.contains("not a shoal snapshot state file"), "{e}");

    let e = restore(&files.state, &files.state, None);
    assert!(e.contains("not a shoal snapshot memory file"), "{e}");

    let e = restore(&files.state, &other.memory, None);
    assert!(e.contains("does not belong"), "{e}");

    let short = dir.path("short.mem");
    std::fs::copy(&files.memory, &short).unwrap();
    let len = std::fs::metadata(&short).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&short)
        .unwrap()
        .set_len(len - 4096)
        .unwrap();
    let e = restore(&files.state, &short, None);
    assert!(e.contains("short.mem is truncated"), "{e}");

    let e = restore(&files.state, &files.memory, Some(64));
    assert!(
        e.contains("24 MiB and 1 vCPUs") && e.contains("64 MiB and 1 vCPUs was asked for"),
        "{e}"
    );

    // A snapshot of a VM with a vsock device restores only with one.
    let e = restore(&vsock_files.state, &vsock_files.memory, None);
    assert!(
        e.contains("has the devices [vsock]") && e.contains("asks for []"),
        "{e}"
    );

    assert_eq!(thread_names(), threads, "a failed restore left threads");
    assert_eq!(fd_count(), fds, "a failed restore leaked file descriptors");
    assert_eq!(
        mappings_of_size(24 << 20),
        0,
        "a failed restore left guest RAM mapped"
    );

    // The good pair still restores.
    let vm = Vm::restore(&RestoreConfig {
        files: files.clone(),
        console: Console::File(dir.path("restored")),
        memory_mib: Some(24),
        vcpus: Some(1),
        vsock: None,
        shares: Vec::new(),
        free_page_reporting: false,
        limits: Default::default(),
    })
    .expect("restore");
    wait_for_console(&dir.path("restored"), 20);
    drop(vm);
    let vm = Vm::restore(&RestoreConfig {
        files: vsock_files,
        console: Console::File(dir.path("restored-vsock")),
        memory_mib: Some(24),
        vcpus: Some(1),
        vsock: Some(VsockConfig {
            uds_path: dir.path("new.sock"),
            cid: 77,
        }),
        shares: Vec::new(),
        free_page_reporting: false,
        limits: Default::default(),
    })
    .expect("restore with a vsock device");
    assert!(
        dir.path("new.sock").exists(),
        "the new vsock socket listens"
    );
    wait_for_console(&dir.path("restored-vsock"), 20);
    drop(vm);
}
