//! shoal-vmm: a small KVM virtual machine monitor for shoal's micro-VMs.
//!
//! [`Vm::boot`] reads top to bottom as the boot sequence; each step is one module:
//! `memory` (guest RAM), `vm` (the KVM VM), `boot` and `mptable` (what the kernel finds in
//! memory), `devices` and `virtio` (the device model), `vcpu` (CPU state and run loop),
//! `event_loop` (the device thread). `layout` is the guest address space at a glance.
pub mod boot;
pub mod confine;
pub mod cpuid;
pub mod devices;
pub mod event_loop;
pub mod exit;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod ratelimit;
pub mod report;
pub mod snapshot;
#[cfg(test)]
mod test_support;
pub mod vcpu;
pub mod virtio;
pub mod vm;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::IoEventAddress;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

pub use devices::Console;
pub use exit::ExitReason;
pub use snapshot::{SnapshotError, SnapshotFiles};
pub use virtio::fs::{CacheMode, FsConfig};
pub use virtio::net::NetConfig;

use devices::{Bus, Legacy, MmioSlot};
use event_loop::{EventLoop, LoopDevice};
use virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use virtio::{Interrupt, VirtioDevice};

/// How to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Uncompressed ELF kernel (`vmlinux`).
    pub kernel: PathBuf,
    /// Initramfs (cpio, optionally compressed).
    pub initrd: Option<PathBuf>,
    /// Kernel command line; the VMM appends its `virtio_mmio.device=` entries.
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Hybrid vsock: the host unix socket and the guest's CID.
    pub vsock: Option<VsockConfig>,
    /// Disks, in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// Shared directories (virtio-fs), each mounted in the guest by its tag.
    pub shares: Vec<FsConfig>,
    /// Network cards (virtio-net on host taps), in the order the guest sees them.
    pub nets: Vec<NetConfig>,
    /// A virtio-balloon through which the guest reports its free pages, which the VMM then
    /// gives back to the host.
    pub free_page_reporting: bool,
    /// Where the serial console goes.
    pub console: Console,
    /// What the guest may make the host hold (console bytes, vsock connections, ...).
    pub limits: GuestLimits,
}

/// Bounds on what one guest can make the host hold or do. The guest is not trusted: each
/// is a host resource it could otherwise grow without end. The shim sets them from its
/// config (`[limits]`); these defaults are what a VM gets otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestLimits {
    /// Bytes of serial console output kept in a console file; past it, output is dropped
    /// (a line in the file says so).
    pub console_max_bytes: u64,
    /// Open vsock connections at once, both directions; one more is refused (RST).
    pub vsock_max_connections: usize,
    /// RST packets queued for the guest at once; past it, stray packets are dropped
    /// without an answer.
    pub vsock_max_pending_rsts: usize,
    /// How long a connection the host has shut down may wait for the guest's RST before
    /// the host ends it.
    pub vsock_shutdown_timeout: std::time::Duration,
}

impl Default for GuestLimits {
    fn default() -> Self {
        GuestLimits {
            console_max_bytes: 1 << 20,
            vsock_max_connections: 1023,
            vsock_max_pending_rsts: 256,
            vsock_shutdown_timeout: std::time::Duration::from_secs(2),
        }
    }
}

/// A virtio-blk disk backed by a host file or block device.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;
    /// `PATH` or `PATH,ro`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.rsplit_once(',') {
            Some((path, "ro")) => Ok(DiskConfig {
                path: path.into(),
                read_only: true,
            }),
            Some((path, "rw")) => Ok(DiskConfig {
                path: path.into(),
                read_only: false,
            }),
            Some((_, opt)) => Err(format!("unknown disk option {opt:?} (use ro or rw)")),
            None if s.is_empty() => Err("empty disk path".into()),
            None => Ok(DiskConfig {
                path: s.into(),
                read_only: false,
            }),
        }
    }
}

/// Hybrid vsock settings.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    pub uds_path: PathBuf,
    pub cid: u64,
}

impl VmConfig {
    /// Checks what can be checked without touching the host beyond reading its memory
    /// size: the vCPU count, the guest memory size, the vsock CID, the number of virtio
    /// devices (each takes one MMIO slot) and the command line's length with the devices'
    /// entries the VMM adds. [`Vm::boot`] runs it first, before any memory is mapped or a
    /// KVM VM made.
    pub fn validate(&self) -> std::result::Result<(), ValidationError> {
        if self.vcpus == 0 || self.vcpus > mptable::MAX_VCPUS {
            return Err(ValidationError::VcpuCount {
                got: self.vcpus,
                max: mptable::MAX_VCPUS,
            });
        }
        match memory::validate_size(self.memory_mib) {
            Ok(()) => {}
            Err(memory::MemoryError::LargerThanHost {
                requested_mib,
                host_mib,
            }) => {
                return Err(ValidationError::MemoryLargerThanHost {
                    got: requested_mib,
                    host: host_mib,
                })
            }
            Err(_) => {
                return Err(ValidationError::MemoryTooSmall {
                    got: self.memory_mib,
                    min: memory::MIN_MEMORY_MIB,
                })
            }
        }
        let devices = DeviceSet::of(self).validate()?;
        // Each device adds one `virtio_mmio.device=4K@ADDR:GSI` entry and a space: the
        // addresses have 8 hex digits, the GSIs at most 2 decimal ones.
        const DEVICE_ENTRY: usize = "virtio_mmio.device=4K@0xd0000000:32 ".len();
        let len = self.cmdline.len() + devices * DEVICE_ENTRY;
        if len >= layout::CMDLINE_MAX_SIZE {
            return Err(ValidationError::CmdlineTooLong {
                len,
                max: layout::CMDLINE_MAX_SIZE - 1,
            });
        }
        Ok(())
    }

    /// A config with shoal's defaults: 128 MiB, 1 vCPU, console discarded, no vsock.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.into(),
            memory_mib: 128,
            vcpus: 1,
            vsock: None,
            disks: Vec::new(),
            shares: Vec::new(),
            nets: Vec::new(),
            free_page_reporting: false,
            console: Console::Sink,
            limits: GuestLimits::default(),
        }
    }
}

/// Command line used when none is given. `noreplace-smp` keeps a one-vCPU guest from
/// rewriting every `lock` prefix in its kernel text at boot: those pages stay shared with
/// the host's page cache copy of the kernel (see `boot::load_kernel`), 2.2 MiB less private
/// memory per VM.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 quiet noreplace-smp";

/// What is wrong with a [`VmConfig`], found by [`VmConfig::validate`] before anything is
/// allocated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidationError {
    #[error("vCPU count must be between 1 and {max}, got {got}")]
    VcpuCount { got: u8, max: u8 },
    #[error("guest memory size must be at least {min} MiB, got {got} MiB")]
    MemoryTooSmall { got: u64, min: u64 },
    #[error("guest memory of {got} MiB is larger than this host's {host} MiB of RAM")]
    MemoryLargerThanHost { got: u64, host: u64 },
    #[error("vsock CID must be 3 or more (0-2 are reserved), got {0}")]
    VsockCid(u64),
    #[error("{0} virtio devices requested; at most {max} fit", max = layout::VIRTIO_MMIO_MAX_DEVICES)]
    TooManyDevices(usize),
    #[error("kernel command line of {len} bytes is too long (at most {max})")]
    CmdlineTooLong { len: usize, max: usize },
}

/// Errors from booting a VM. Each names the step and the thing that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Confine(#[from] confine::ConfineError),
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error(transparent)]
    Legacy(#[from] devices::legacy::LegacyError),
    #[error(transparent)]
    Vsock(#[from] virtio::vsock::MuxerError),
    #[error(transparent)]
    Fs(#[from] virtio::fs::FsError),
    #[error(transparent)]
    EventLoop(#[from] event_loop::EventLoopError),
    #[error(transparent)]
    Block(#[from] virtio::block::BlockError),
    #[error(transparent)]
    Net(#[from] virtio::net::TapError),
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("cannot {what}: {cause}")]
    Setup {
        what: &'static str,
        cause: std::io::Error,
    },
    #[error("cannot register {what} with KVM: {cause}")]
    Kvm {
        what: &'static str,
        cause: kvm_ioctls::Error,
    },
}

type Result<T> = std::result::Result<T, Error>;

/// Asks a running VM to stop; cheap to clone and usable from any thread.
#[derive(Clone)]
pub struct Stopper(Arc<exit::ExitSignal>);

impl Stopper {
    pub fn stop(&self) {
        self.0.signal(ExitReason::Stopped);
    }
}

/// Reads where a VM's virtio devices stand ([`Vm::ring_report`]) from anywhere, without
/// keeping the VM's devices alive.
///
/// A default one reports on no VM, as for one that has ended.
#[derive(Clone, Default)]
pub struct RingReporter(std::sync::Weak<Bus>);

impl RingReporter {
    pub fn report(&self) -> String {
        match self.0.upgrade() {
            Some(bus) => bus.ring_report(),
            None => "(the VM has ended)".into(),
        }
    }
}

/// Asks a VM for its vCPU report ([`Vm::cpu_report`]) from any thread, without keeping the
/// VM alive: the VM's [`Vm::wait`] loop answers. A default one reports on no VM.
#[derive(Clone, Default)]
pub struct CpuReporter(std::sync::Weak<ReportDesk>);

/// Where [`CpuReporter`]s leave their requests for [`Vm::wait`].
struct ReportDesk {
    wake: EventFd,
    waiting: Mutex<Vec<std::sync::mpsc::Sender<String>>>,
}

impl CpuReporter {
    /// The VM's [`Vm::cpu_report`], or why there is none after waiting `limit` for it.
    pub fn report(&self, limit: Duration) -> String {
        let Some(desk) = self.0.upgrade() else {
            return "vCPUs: (the VM has ended)".into();
        };
        let (tx, rx) = std::sync::mpsc::channel();
        desk.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
        let _ = desk.wake.write(1);
        drop(desk);
        rx.recv_timeout(limit).unwrap_or_else(|_| {
            format!("vCPUs: (no report within {limit:?}: nothing waits on the VM, or it ended)")
        })
    }
}

/// A running VM. Dropping it stops it; [`Vm::wait`] waits for the guest to end it.
pub struct Vm {
    exit: Arc<exit::ExitSignal>,
    stop_vcpus: Arc<AtomicBool>,
    vcpu_threads: Vec<JoinHandle<()>>,
    stop_devices: EventFd,
    device_thread: Option<JoinHandle<()>>,
    first_run: Arc<OnceLock<Instant>>,
    balloon: Option<Arc<virtio::balloon::BalloonStats>>,
    pause: Arc<vcpu::Pause>,
    /// Whether the vCPUs are parked (between `pause` and `resume`).
    paused: Mutex<bool>,
    /// Requests for a vCPU report, answered by [`Vm::wait`].
    desk: Arc<ReportDesk>,
    // Dropped last, after every thread using them has been joined.
    bus: Arc<Bus>,
    kvm_vm: vm::KvmVm,
    mem: GuestMemoryMmap,
}

/// How long [`Vm::pause`] waits for the vCPUs to park.
const PAUSE_LIMIT: Duration = Duration::from_secs(5);

/// What [`Vm::start`] starts.
struct Parts {
    kvm_vm: vm::KvmVm,
    mem: GuestMemoryMmap,
    exit: Arc<exit::ExitSignal>,
    bus: Bus,
    loop_devices: Vec<LoopDevice>,
    balloon: Option<Arc<virtio::balloon::BalloonStats>>,
    vcpus: Vec<vcpu::Vcpu>,
    /// The directory of the VM's vsock sockets: the chroot of its vCPU and device threads.
    jail: Option<PathBuf>,
}

/// How to restore a VM from a snapshot.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    pub files: SnapshotFiles,
    /// Where the restored guest's serial console goes.
    pub console: Console,
    /// The VM size asked for; a snapshot of another size is refused. None: any.
    pub memory_mib: Option<u64>,
    pub vcpus: Option<u8>,
    /// The restored VM's devices: the same kinds, in the same order, as the snapshot's VM
    /// had, each with its new host side (vsock socket and CID, shared directory).
    pub vsock: Option<VsockConfig>,
    pub shares: Vec<FsConfig>,
    pub free_page_reporting: bool,
    /// What the restored guest may make the host hold.
    pub limits: GuestLimits,
}

/// The virtio devices of a VM, in the order the guest finds them.
struct DeviceSet<'a> {
    vsock: Option<&'a VsockConfig>,
    disks: &'a [DiskConfig],
    shares: &'a [FsConfig],
    nets: &'a [NetConfig],
    free_page_reporting: bool,
    limits: GuestLimits,
}

impl<'a> DeviceSet<'a> {
    /// The vsock CID is not a reserved one and the devices fit the MMIO slots; returns how
    /// many devices there are. Before any is made, on boot and on restore.
    fn validate(&self) -> std::result::Result<usize, ValidationError> {
        if let Some(vsock) = self.vsock.filter(|v| v.cid < 3) {
            return Err(ValidationError::VsockCid(vsock.cid));
        }
        let devices = usize::from(self.vsock.is_some())
            + self.disks.len()
            + self.shares.len()
            + self.nets.len()
            + usize::from(self.free_page_reporting);
        if devices > layout::VIRTIO_MMIO_MAX_DEVICES as usize {
            return Err(ValidationError::TooManyDevices(devices));
        }
        Ok(devices)
    }

    fn of(config: &'a VmConfig) -> Self {
        DeviceSet {
            vsock: config.vsock.as_ref(),
            disks: &config.disks,
            shares: &config.shares,
            nets: &config.nets,
            free_page_reporting: config.free_page_reporting,
            limits: config.limits,
        }
    }
}

fn vcpu_kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_signal_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl Vm {
    /// Builds and starts a VM. On error nothing is left behind: every resource taken so far
    /// is owned by a value that is dropped on the way out.
    pub fn boot(config: &VmConfig) -> Result<Vm> {
        config.validate()?;
        let t0 = Instant::now();
        let step = |name: &str| {
            tracing::debug!(
                elapsed_us = t0.elapsed().as_micros() as u64,
                "boot: {name} done"
            )
        };
        // First, so that the virtio-fs workers confine themselves (and the vCPU and device
        // threads' network namespace is made) while the rest is set up.
        if config.vsock.is_some() {
            confine::prepare_empty_netns();
        }
        let (devices, balloon) = create_devices(&DeviceSet::of(config))?;
        let mem = memory::create_guest_memory(config.memory_mib)?;
        // Creating the KVM VM (mostly memory-slot setup in the kernel) and copying the kernel
        // and initramfs into guest RAM are independent; doing them side by side takes the
        // shorter of the two off the start-up time.
        let (kvm_vm, images) = std::thread::scope(|scope| {
            let vm_thread = scope.spawn(|| {
                let vm = vm::KvmVm::create(&mem, config.vcpus);
                step("KVM VM (in parallel)");
                vm
            });
            let images = load_images(&mem, config);
            step("kernel and initramfs (in parallel)");
            (
                vm_thread
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                images,
            )
        });
        let kvm_vm = kvm_vm?;
        let (kernel, initrd) = images?;
        step("KVM VM, kernel and initramfs");

        let exit = Arc::new(exit::ExitSignal::new().map_err(|source| Error::Setup {
            what: "create the exit eventfd",
            cause: source,
        })?);
        let legacy = legacy_devices(&kvm_vm, &config.console, &config.limits, exit.clone(), None)?;
        let (mmio_slots, loop_devices, cmdline_devices) =
            attach_devices(&kvm_vm, &mem, devices, None)?;

        let cmdline = boot::build_cmdline(&config.cmdline, &cmdline_devices)?;
        let cmdline_len = boot::write_cmdline(&mem, &cmdline)?;
        boot::write_boot_params(
            &mem,
            &boot::boot_params(config.memory_mib << 20, cmdline_len, initrd),
        )?;
        boot::write_gdt(&mem)?;
        boot::write_page_tables(&mem)?;
        mptable::write(&mem, config.vcpus)?;
        step("devices and boot data");

        let cpuid = vcpu::supported_cpuid(&kvm_vm.kvm)?;
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for index in 0..config.vcpus {
            let vcpu = vcpu::Vcpu::new(&kvm_vm.fd, index)?;
            vcpu.configure(&cpuid, config.vcpus, kernel.entry.0)?;
            vcpus.push(vcpu);
        }
        step("vCPUs");
        Vm::start(Parts {
            kvm_vm,
            mem,
            exit,
            bus: Bus::new(legacy, mmio_slots),
            loop_devices,
            balloon,
            vcpus,
            jail: jail_of(config.vsock.as_ref()),
        })
    }

    /// Starts the device thread and one thread per vCPU on a VM whose state is all set.
    fn start(parts: Parts) -> Result<Vm> {
        let Parts {
            kvm_vm,
            mem,
            exit,
            bus,
            loop_devices,
            balloon,
            vcpus,
            jail,
        } = parts;
        let stop_devices = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::Setup {
            what: "create the stop eventfd",
            cause: source,
        })?;
        let event_loop = EventLoop::new(
            loop_devices,
            stop_devices.try_clone().map_err(|source| Error::Setup {
                what: "clone the stop eventfd",
                cause: source,
            })?,
        )?;
        register_signal_handler(vcpu_kick_signal(), noop_signal_handler).map_err(|e| {
            Error::Setup {
                what: "install the vCPU kick signal handler",
                cause: e.into(),
            }
        })?;

        let mut vm = Vm {
            exit,
            stop_vcpus: Arc::new(AtomicBool::new(false)),
            vcpu_threads: Vec::new(),
            stop_devices,
            device_thread: None,
            first_run: Arc::new(OnceLock::new()),
            balloon,
            pause: Arc::new(vcpu::Pause::default()),
            paused: Mutex::new(false),
            desk: Arc::new(ReportDesk {
                wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
                    Error::Setup {
                        what: "create the report eventfd",
                        cause: source,
                    }
                })?,
                waiting: Mutex::new(Vec::new()),
            }),
            bus: Arc::new(bus),
            kvm_vm,
            mem,
        };
        // The threads confine themselves side by side; each runs (a vCPU, the guest) only
        // once it is confined. One that cannot be fails the start; every thread started is
        // the VM's before that error returns, so that dropping `vm` stops and joins it.
        let devices = confine::ThreadClass::Devices { jail: jail.clone() };
        let mut failed = None;
        let device_thread = confine::start("shoal-devices", THREAD_STACK, devices, move || {
            event_loop.run()
        });
        let mut starting = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let (bus, exit, stop) = (vm.bus.clone(), vm.exit.clone(), vm.stop_vcpus.clone());
            let pause = vm.pause.clone();
            let first_run = (vcpu.index == 0).then(|| vm.first_run.clone());
            let name = format!("shoal-vcpu{}", vcpu.index);
            let class = confine::ThreadClass::Vcpu { jail: jail.clone() };
            match confine::start(&name, THREAD_STACK, class, move || {
                vcpu.run(bus, exit, stop, pause, first_run)
            }) {
                Ok(thread) => starting.push(thread),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        match device_thread.and_then(confine::Starting::confined) {
            Ok(handle) => vm.device_thread = Some(handle),
            Err(e) => failed = failed.or(Some(e)),
        }
        for vcpu in starting {
            match vcpu.confined() {
                Ok(handle) => vm.vcpu_threads.push(handle),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            return Err(e.into());
        }
        Ok(vm)
    }

    /// Restores a VM from a snapshot: RAM mapped `MAP_PRIVATE` from the memory file (shared
    /// with every other VM restored from it until written), VM-wide and vCPU state loaded,
    /// COM1 resumed onto `config.console`. Checks the files (format, version, checksum, that
    /// they belong together) and, where given, the size asked for, before creating anything.
    pub fn restore(config: &RestoreConfig) -> Result<Vm> {
        let t0 = Instant::now();
        let step = |name: &str| {
            tracing::debug!(
                elapsed_us = t0.elapsed().as_micros() as u64,
                "restore: {name} done"
            )
        };
        let snap = snapshot::read_state(&config.files.state)?;
        memory::validate_size(snap.memory_mib)?;
        step("state file");
        let found_vcpus = snap.vcpus.len() as u8;
        if config.memory_mib.is_some_and(|m| m != snap.memory_mib)
            || config.vcpus.is_some_and(|v| v != found_vcpus)
        {
            let wanted = format!(
                "{} MiB and {} vCPUs",
                config.memory_mib.unwrap_or(snap.memory_mib),
                config.vcpus.unwrap_or(found_vcpus)
            );
            return Err(snapshot::SnapshotError::SizeMismatch {
                found: format!("{} MiB and {found_vcpus} vCPUs", snap.memory_mib),
                wanted,
            }
            .into());
        }
        if config.vsock.is_some() {
            confine::prepare_empty_netns();
        }
        let set = DeviceSet {
            vsock: config.vsock.as_ref(),
            disks: &[],
            shares: &config.shares,
            nets: &[],
            free_page_reporting: config.free_page_reporting,
            limits: config.limits,
        };
        set.validate()?;
        let (devices, balloon) = create_devices(&set)?;
        let found: Vec<String> = snap
            .devices
            .iter()
            .map(|d| virtio::device_type_name(d.device_type))
            .collect();
        let wanted: Vec<String> = devices
            .iter()
            .map(|d| virtio::device_type_name(d.device_type()))
            .collect();
        if found != wanted {
            return Err(snapshot::SnapshotError::DeviceMismatch {
                found: found.join(", "),
                wanted: wanted.join(", "),
            }
            .into());
        }
        let mem = snapshot::map_memory(&config.files.memory, &snap)?;
        step("memory");
        let kvm_vm = vm::KvmVm::create(&mem, found_vcpus)?;
        step("KVM VM");
        kvm_vm.restore_state(&snap.vm)?;
        step("VM state");
        let exit = Arc::new(exit::ExitSignal::new().map_err(|source| Error::Setup {
            what: "create the exit eventfd",
            cause: source,
        })?);
        let legacy = legacy_devices(
            &kvm_vm,
            &config.console,
            &config.limits,
            exit.clone(),
            Some(&snap.serial),
        )?;
        let xsave_size = kvm_vm.xsave_size();
        let mut vcpus = Vec::with_capacity(snap.vcpus.len());
        for (index, state) in snap.vcpus.iter().enumerate() {
            let vcpu = vcpu::Vcpu::new(&kvm_vm.fd, index as u8)?;
            vcpu.restore_state(state, xsave_size)?;
            vcpus.push(vcpu);
        }
        // Last, when a tick it fires at once reaches loaded controllers (see restore_pit).
        kvm_vm.restore_pit(&snap.vm)?;
        step("vCPUs");
        let (mmio_slots, loop_devices, _) =
            attach_devices(&kvm_vm, &mem, devices, Some(&snap.devices))?;
        step("devices");
        Vm::start(Parts {
            kvm_vm,
            mem,
            exit,
            bus: Bus::new(legacy, mmio_slots),
            loop_devices,
            balloon,
            vcpus,
            jail: jail_of(config.vsock.as_ref()),
        })
    }

    /// Where each virtio device stands (interrupt status, ring indexes), a line each: for
    /// a report on a guest that stopped answering.
    pub fn ring_report(&self) -> String {
        self.bus.ring_report()
    }

    /// Parks every vCPU between two KVM_RUN calls; the VM stays paused until
    /// [`Vm::resume`]. Pausing a paused VM does nothing.
    pub fn pause(&self) -> std::result::Result<(), snapshot::SnapshotError> {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        self.pause_locked(&mut paused)
    }

    /// [`Vm::pause`] with the `paused` lock held by the caller.
    fn pause_locked(&self, paused: &mut bool) -> std::result::Result<(), snapshot::SnapshotError> {
        if *paused {
            return Ok(());
        }
        if self.exit.is_signalled() {
            return Err(snapshot::SnapshotError::Ended);
        }
        let msrs = vcpu::msrs_to_save(&self.kvm_vm.kvm)?;
        let n = self.vcpu_threads.len();
        self.pause.request(msrs.into());
        let deadline = Instant::now() + PAUSE_LIMIT;
        // A vCPU inside KVM_RUN leaves it when a signal arrives; kick until all have parked.
        while !self.pause.wait_parked(n, Duration::from_millis(1)) {
            if self.exit.is_signalled() {
                self.pause.resume();
                return Err(snapshot::SnapshotError::Ended);
            }
            if Instant::now() > deadline {
                self.pause.resume();
                return Err(snapshot::SnapshotError::PauseTimeout(PAUSE_LIMIT));
            }
            for handle in &self.vcpu_threads {
                let _ = handle.kill(vcpu_kick_signal());
            }
        }
        *paused = true;
        // A reader of a paused VM's console sees all it printed, partial line included.
        self.bus.flush_console();
        Ok(())
    }

    /// Lets a paused VM run again.
    pub fn resume(&self) {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        if std::mem::take(&mut *paused) {
            self.pause.resume();
        }
    }

    /// Saves a paused VM to `files`: state file and memory file, each written under a
    /// temporary name and renamed into place. The VM stays paused.
    pub fn snapshot(
        &self,
        files: &SnapshotFiles,
    ) -> std::result::Result<(), snapshot::SnapshotError> {
        let paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        if !*paused {
            return Err(snapshot::SnapshotError::NotPaused);
        }
        let xsave_size = self.kvm_vm.xsave_size();
        if xsave_size > vcpu::XSAVE_SIZE {
            return Err(snapshot::SnapshotError::Unsupported(
                "this host's xsave area (AMX) is larger than KVM_GET_XSAVE returns",
            ));
        }
        let id = snapshot::new_id().map_err(|source| snapshot::SnapshotError::Io {
            what: "read",
            path: "/dev/urandom".into(),
            cause: source,
        })?;
        // The devices stay locked until the memory is written: the device thread must not
        // move a queue (a vsock packet arriving from the host) after its position is saved.
        let transports = self.bus.lock_transports();
        let devices = transports
            .iter()
            .map(|t| t.save_state())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(snapshot::SnapshotError::Device)?;
        // Every vCPU reads its state now, all of them parked, then the VM-wide state.
        let mut vcpus = Vec::new();
        for state in self.pause.save(self.vcpu_threads.len(), PAUSE_LIMIT) {
            match state {
                Some(state) => vcpus.push(state?),
                None => return Err(snapshot::SnapshotError::PauseTimeout(PAUSE_LIMIT)),
            }
        }
        let vm = self.kvm_vm.save_state()?;
        let snap = snapshot::Snapshot {
            memory_mib: snapshot::ram_bytes(&self.mem) >> 20,
            id,
            vm,
            serial: self.bus.serial_state(),
            vcpus,
            devices,
        };
        // Memory first: a state file only ever names memory that is complete.
        snapshot::write_memory(&files.memory, &self.mem, &id)?;
        if transports.iter().any(|t| t.device().changed_since_save()) {
            let _ = std::fs::remove_file(&files.memory);
            return Err(snapshot::SnapshotError::Unsupported(
                "a device served a request while the snapshot was taken (a virtio-fs share the guest has started to use)",
            ));
        }
        snapshot::write_state(&files.state, &snap)
    }

    /// A handle that stops this VM from another thread.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.exit.clone())
    }

    /// A [`CpuReporter`] for this VM (answered while something waits in [`Vm::wait`]).
    pub fn cpu_reporter(&self) -> CpuReporter {
        CpuReporter(Arc::downgrade(&self.desk))
    }

    /// One line per vCPU on where it stands, for a report on a guest that stopped
    /// answering: running or halted, where (rip, cr3, whether interrupts are on), and its
    /// local APIC timer (mode, masked or not, counts; in TSC-deadline mode the deadline
    /// against the TSC, in ms). A halted vCPU whose timer is neither counting nor armed
    /// waits for a device interrupt alone. The vCPUs are paused to be read, then resumed
    /// (a VM already paused stays so). Kicking a vCPU out of KVM_RUN can deliver a timer
    /// interrupt that was due: the report can set going the guest it describes.
    pub fn cpu_report(&self) -> String {
        // The lock is held throughout, as `snapshot` holds it: the two never read the
        // vCPUs' states at once, and a VM paused by someone else stays paused.
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        let was_paused = *paused;
        if let Some(reason) = self.exit.reason() {
            return format!("vCPUs: none to look at, the VM has ended: {reason}");
        }
        if let Err(e) = self.pause_locked(&mut paused) {
            return format!("vCPUs: cannot pause them to look ({e})");
        }
        let states = self.pause.save(self.vcpu_threads.len(), PAUSE_LIMIT);
        if !was_paused {
            *paused = false;
            self.pause.resume();
        }
        drop(paused);
        let mut lines: Vec<String> = states
            .iter()
            .enumerate()
            .map(|(i, state)| match state {
                Some(Ok(state)) => format!("vCPU {i}: {}", vcpu::describe(state)),
                Some(Err(e)) => format!("vCPU {i}: cannot read its state ({e})"),
                None => format!("vCPU {i}: did not park within {PAUSE_LIMIT:?}"),
            })
            .collect();
        // The other timer a guest may tick from.
        lines.push(match self.kvm_vm.fd.get_pit2() {
            Ok(pit) => {
                let c = &pit.channels[0];
                format!(
                    "PIT channel 0: mode {}, count {}, gate {}",
                    c.mode, c.count, c.gate
                )
            }
            Err(e) => format!("PIT: cannot read it ({e})"),
        });
        lines.join("\n")
    }

    /// A [`RingReporter`] for this VM.
    pub fn ring_reporter(&self) -> RingReporter {
        RingReporter(Arc::downgrade(&self.bus))
    }

    /// When vCPU 0 first entered KVM_RUN, once it has.
    pub fn first_run_at(&self) -> Option<Instant> {
        self.first_run.get().copied()
    }

    /// What free page reporting has given back so far (None without a balloon).
    pub fn balloon_stats(&self) -> Option<&virtio::balloon::BalloonStats> {
        self.balloon.as_deref()
    }

    /// Waits until the guest reboots or powers off, the host stops the VM, or something
    /// fails; then tears the VM down and returns why it ended.
    pub fn wait(mut self) -> ExitReason {
        use std::os::unix::io::AsRawFd;
        use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
        let evt_fd = self.exit.eventfd().as_raw_fd();
        let desk_fd = self.desk.wake.as_raw_fd();
        let epoll = Epoll::new().and_then(|e| {
            for (fd, data) in [(evt_fd, 0), (desk_fd, 1)] {
                e.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, data),
                )?;
            }
            Ok(e)
        });
        let mut events = [EpollEvent::default(); 2];
        while !self.exit.is_signalled() {
            match &epoll {
                Ok(epoll) => {
                    let _ = epoll.wait(1000, &mut events);
                }
                // Without an epoll set, poll the flag; slower to notice, never stuck.
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
            self.answer_reports();
        }
        self.shutdown();
        self.exit.reason().expect("signalled")
    }

    /// Answers the [`CpuReporter`]s waiting, if any.
    fn answer_reports(&self) {
        let _ = self.desk.wake.read();
        let waiting =
            std::mem::take(&mut *self.desk.waiting.lock().unwrap_or_else(|e| e.into_inner()));
        if waiting.is_empty() {
            return;
        }
        let report = self.cpu_report();
        for tx in waiting {
            let _ = tx.send(report.clone());
        }
    }

    fn shutdown(&mut self) {
        self.exit.signal(ExitReason::Stopped);
        self.stop_vcpus.store(true, Ordering::Release);
        for handle in self.vcpu_threads.drain(..) {
            // A vCPU inside KVM_RUN leaves it when a signal arrives; kick until it has gone.
            while !handle.is_finished() {
                let _ = handle.kill(vcpu_kick_signal());
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = handle.join();
        }
        let _ = self.stop_devices.write(1);
        if let Some(handle) = self.device_thread.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Loads the kernel and, if configured, the initramfs into guest memory.
fn load_images(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
) -> Result<(boot::LoadedKernel, Option<boot::LoadedInitrd>)> {
    let kernel = boot::load_kernel(mem, &config.kernel)?;
    let initrd = config
        .initrd
        .as_deref()
        .map(|p| boot::load_initrd(mem, p, kernel.end))
        .transpose()?;
    Ok((kernel, initrd))
}

/// Stack of each VMM thread.
const THREAD_STACK: usize = 256 * 1024;

/// The chroot of a VM's vCPU and device threads: the directory its vsock sockets are in
/// (the only paths those threads name, connecting to a host port's socket).
fn jail_of(vsock: Option<&VsockConfig>) -> Option<PathBuf> {
    let path = std::path::absolute(&vsock?.uds_path).ok()?;
    path.parent().map(Path::to_path_buf)
}

fn legacy_devices(
    kvm_vm: &vm::KvmVm,
    console: &Console,
    limits: &GuestLimits,
    exit: Arc<exit::ExitSignal>,
    serial_state: Option<&vm_superio::serial::SerialState>,
) -> Result<Legacy> {
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::Setup {
        what: "create the serial irqfd",
        cause: source,
    })?;
    kvm_vm
        .fd
        .register_irqfd(&serial_irq, layout::SERIAL_IRQ)
        .map_err(|source| Error::Kvm {
            what: "the serial interrupt",
            cause: source,
        })?;
    Ok(Legacy::new(
        console,
        limits.console_max_bytes,
        serial_irq,
        exit,
        serial_state,
    )?)
}

type Devices = (
    Vec<Box<dyn VirtioDevice>>,
    Option<Arc<virtio::balloon::BalloonStats>>,
);

/// Creates the virtio devices of `set` (checked by [`DeviceSet::validate`]), in bus order.
fn create_devices(set: &DeviceSet) -> Result<Devices> {
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    if let Some(vsock) = set.vsock {
        devices.push(Box::new(virtio::vsock::Vsock::new(
            vsock.cid,
            &vsock.uds_path,
            &set.limits,
        )?));
    }
    for disk in set.disks {
        devices.push(Box::new(virtio::block::Block::open(
            &disk.path,
            disk.read_only,
        )?));
    }
    for share in set.shares {
        devices.push(Box::new(virtio::fs::Fs::new(share)?));
    }
    for net in set.nets {
        devices.push(Box::new(virtio::net::Net::new(net)?));
    }
    let mut balloon = None;
    if set.free_page_reporting {
        let device = virtio::balloon::Balloon::new();
        balloon = Some(device.stats());
        devices.push(Box::new(device));
    }
    Ok((devices, balloon))
}

type Attached = (Vec<MmioSlot>, Vec<LoopDevice>, Vec<String>);

/// Puts each device behind its MMIO window with its irqfd and one ioeventfd per queue, in a
/// fresh transport or, from a snapshot, in the transport state `saved` holds for it. Also
/// returns the `virtio_mmio.device=` entries that announce the devices to a booting guest.
fn attach_devices(
    kvm_vm: &vm::KvmVm,
    mem: &GuestMemoryMmap,
    devices: Vec<Box<dyn VirtioDevice>>,
    saved: Option<&[virtio::mmio::TransportState]>,
) -> Result<Attached> {
    let (mut slots, mut loop_devices, mut cmdline) = (Vec::new(), Vec::new(), Vec::new());
    for (index, mut device) in devices.into_iter().enumerate() {
        device.ready()?;
        let (base, size) = layout::virtio_mmio_window(index as u32);
        let gsi = layout::VIRTIO_IRQ_BASE + index as u32;
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::Setup {
            what: "create a virtio irqfd",
            cause: source,
        })?;
        kvm_vm
            .fd
            .register_irqfd(&irqfd, gsi)
            .map_err(|source| Error::Kvm {
                what: "a virtio interrupt",
                cause: source,
            })?;
        let mut queue_evts = Vec::new();
        for q in 0..device.queue_max_sizes().len() {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::Setup {
                what: "create a queue eventfd",
                cause: source,
            })?;
            kvm_vm
                .fd
                .register_ioevent(
                    &evt,
                    &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                    q as u32,
                )
                .map_err(|source| Error::Kvm {
                    what: "a queue notification",
                    cause: source,
                })?;
            queue_evts.push(evt);
        }
        let interrupt = Interrupt::new(irqfd);
        let transport = match saved.and_then(|s| s.get(index)) {
            Some(state) => {
                let name = device.name();
                MmioTransport::restore(device, mem.clone(), interrupt, state).map_err(|source| {
                    snapshot::SnapshotError::DeviceRestore {
                        device: name,
                        cause: source,
                    }
                })?
            }
            None => MmioTransport::new(device, mem.clone(), interrupt),
        };
        let transport = Arc::new(Mutex::new(transport));
        slots.push(MmioSlot {
            base,
            size,
            transport: transport.clone(),
        });
        loop_devices.push(LoopDevice {
            transport,
            queue_evts,
        });
        cmdline.push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
    }
    Ok((slots, loop_devices, cmdline))
}

#[cfg(test)]
mod tests {

    /// Each check of `validate` refuses what it is for, with a message naming the value,
    /// and a config at the edge of each bound passes.
    #[test]
    fn validate_refuses_each_bad_value_before_anything_is_made() {
        let ok = || VmConfig::new("/nonexistent/vmlinux");
        assert_eq!(
            ok().validate(),
            Ok(()),
            "the defaults are valid (no file is opened)"
        );
        let mut c = ok();
        c.vcpus = 0;
        assert!(matches!(
            c.validate(),
            Err(ValidationError::VcpuCount { got: 0, .. })
        ));
        c.vcpus = mptable::MAX_VCPUS + 1;
        assert!(matches!(
            c.validate(),
            Err(ValidationError::VcpuCount { .. })
        ));
        c.vcpus = mptable::MAX_VCPUS;
        assert_eq!(c.validate(), Ok(()));
        let mut c = ok();
        c.memory_mib = memory::MIN_MEMORY_MIB - 1;
        let e = c.validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "guest memory size must be at least 16 MiB, got 15 MiB"
        );
        c.memory_mib = u64::MAX >> 20;
        assert!(matches!(
            c.validate(),
            Err(ValidationError::MemoryLargerThanHost { .. })
        ));
        let mut c = ok();
        c.vsock = Some(VsockConfig {
            uds_path: "/nonexistent/v.sock".into(),
            cid: 2,
        });
        assert_eq!(c.validate(), Err(ValidationError::VsockCid(2)));
        let mut c = ok();
        let max = layout::VIRTIO_MMIO_MAX_DEVICES as usize;
        c.disks = (0..max)
            .map(|_| DiskConfig {
                path: "/nonexistent/disk".into(),
                read_only: true,
            })
            .collect();
        assert_eq!(c.validate(), Ok(()));
        c.free_page_reporting = true;
        assert_eq!(c.validate(), Err(ValidationError::TooManyDevices(max + 1)));
        let mut c = ok();
        c.cmdline = "x".repeat(layout::CMDLINE_MAX_SIZE);
        assert!(matches!(
            c.validate(),
            Err(ValidationError::CmdlineTooLong { .. })
        ));
    }

    /// `Vm::boot` validates first: a bad config fails with the validation's error even
    /// where nothing else of it could be used (no kernel file, no KVM needed).
    #[test]
    fn boot_validates_before_it_opens_or_maps_anything() {
        let mut c = VmConfig::new("/nonexistent/vmlinux");
        c.vcpus = 0;
        let e = Vm::boot(&c).err().expect("a VM with no vCPU booted");
        assert!(
            matches!(e, Error::Invalid(ValidationError::VcpuCount { .. })),
            "{e}"
        );
    }
    use super::*;

    #[test]
    fn disk_arguments() {
        let d: DiskConfig = "/img/a.ext4".parse().unwrap();
        assert_eq!(
            (d.path.to_str().unwrap(), d.read_only),
            ("/img/a.ext4", false)
        );
        let d: DiskConfig = "/img/b,ro".parse().unwrap();
        assert_eq!((d.path.to_str().unwrap(), d.read_only), ("/img/b", true));
        assert!("/img/c,rx".parse::<DiskConfig>().is_err());
        assert!("".parse::<DiskConfig>().is_err());
    }
}
