//! `shoal-vmm`: boot one micro-VM from the command line.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use shoal_vmm::{Console, ExitReason, Vm, VmConfig, VsockConfig};

/// Boot a Linux guest in a KVM micro-VM. Exits 0 after a clean guest reboot or power-off.
#[derive(Parser, Debug)]
#[command(name = "shoal-vmm", version)]
struct Args {
    /// Uncompressed ELF kernel (vmlinux).
    #[arg(long)]
    kernel: PathBuf,
    /// Initramfs to load.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (the VMM appends its virtio-mmio devices).
    #[arg(long, default_value = shoal_vmm::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Host unix socket for hybrid vsock (must not exist yet).
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// Guest CID for vsock.
    #[arg(long, default_value_t = 3)]
    vsock_cid: u64,
    /// A virtio-blk disk: `PATH` or `PATH,ro` (repeat for more; the guest sees vda, vdb, ...).
    #[arg(long = "blk", value_name = "PATH[,ro]")]
    disks: Vec<shoal_vmm::DiskConfig>,
    /// A shared directory (virtio-fs): `TAG=DIR[,cache=never|auto|always]`; the guest mounts it
    /// with `mount -t virtiofs TAG DIR`. Repeat for more.
    #[arg(long = "fs", value_name = "TAG=DIR[,cache=MODE]")]
    shares: Vec<shoal_vmm::FsConfig>,
    /// A network card on a host tap: `TAP[,mac=MAC][,mtu=N][,netns=PATH]` (the tap is created
    /// if missing, in the given network namespace; repeat for more; the guest sees eth0, ...).
    #[arg(long = "net", value_name = "TAP[,mac=MAC][,mtu=N][,netns=PATH]")]
    nets: Vec<shoal_vmm::NetConfig>,
    /// Give pages the guest frees back to the host (virtio-balloon free page reporting).
    #[arg(long)]
    free_page_reporting: bool,
    /// Write the serial console to this file instead of stdout.
    #[arg(long)]
    console: Option<PathBuf>,
    /// How the VMM's threads are confined: enforce (seccomp, capabilities, Landlock), log
    /// (calls outside a thread's list are allowed and logged by the kernel) or off.
    /// Default: $SHOAL_VMM_CONFINE, else enforce.
    #[arg(long, value_parser = |s: &str| s.parse::<shoal_vmm::confine::Mode>())]
    confine: Option<shoal_vmm::confine::Mode>,
}

fn main() -> ExitCode {
    let main_entered = monotonic_ns();
    tracing_subscriber::fmt()
        .with_env_filter(shoal_vmm::ratelimit::log_filter("warn"))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Args::parse(), main_entered) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shoal-vmm: {}", shoal_vmm::report::one_line(e.as_ref()));
            ExitCode::from(1)
        }
    }
}

fn run(args: Args, main_entered: u64) -> anyhow::Result<ExitCode> {
    if let Some(mode) = args.confine {
        shoal_vmm::confine::set_mode(mode);
    }
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        memory_mib: args.memory_mib,
        vcpus: args.vcpus,
        vsock: args.vsock_uds.map(|uds_path| VsockConfig {
            uds_path,
            cid: args.vsock_cid,
        }),
        disks: args.disks,
        shares: args.shares,
        nets: args.nets,
        free_page_reporting: args.free_page_reporting,
        console: args.console.map(Console::File).unwrap_or(Console::Stdout),
        limits: Default::default(),
    };
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("cannot install signal handlers")?;
    let boot_called = monotonic_ns();
    let vm = Vm::boot(&config)?;
    if std::env::var_os("SHOAL_VMM_TIMING").is_some() {
        report_first_run(&vm, main_entered, boot_called);
    }
    let stopper = vm.stopper();
    let signal_handle = signals.handle();
    let waiter = std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            stopper.stop();
        }
    });
    let reason = vm.wait();
    signal_handle.close();
    let _ = waiter.join();
    Ok(match reason {
        ExitReason::Reboot | ExitReason::PowerOff => ExitCode::SUCCESS,
        ExitReason::Stopped => {
            eprintln!("shoal-vmm: stopped by signal");
            ExitCode::from(130)
        }
        ExitReason::TripleFault(at) => anyhow::bail!("guest triple fault: {at}"),
        ExitReason::Error(e) => anyhow::bail!("VM failed: {e}"),
    })
}

/// For the boot-setup benchmark: prints when `main` started, when `Vm::boot` was called and
/// when vCPU 0 first entered KVM_RUN, as CLOCK_MONOTONIC nanoseconds, so a parent can
/// subtract its own spawn time.
fn report_first_run(vm: &Vm, main_entered: u64, boot_called: u64) {
    eprintln!("shoal-vmm: main at monotonic {main_entered} ns");
    eprintln!("shoal-vmm: boot at monotonic {boot_called} ns");
    for _ in 0..5000 {
        if let Some(at) = vm.first_run_at() {
            let now_mono = monotonic_ns();
            let ago = at.elapsed().as_nanos() as u64;
            eprintln!(
                "shoal-vmm: first KVM_RUN at monotonic {} ns",
                now_mono - ago
            );
            return;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}
