//! Confinement of the VMM's own threads: what each may still do if a guest turns it.
//!
//! Every thread the VMM starts that touches guest input confines itself before it runs guest
//! code or reads a queue, and keeps that for the rest of its life:
//!
//! | thread                | seccomp list | capabilities kept  | file system                             |
//! |-----------------------|--------------|--------------------|-----------------------------------------|
//! | `shoal-vcpuN`         | [`VCPU`]     | none               | chroot to the vsock socket's directory; an empty network namespace (`enter_empty_netns`); Landlock: no path access |
//! | `shoal-devices`       | [`DEVICES`]  | none               | the same                                |
//! | `shoal-fs-TAG` worker | [`FS_WORKER`]| [`FS_WORKER_CAPS`] | chroot to its root (holding only the share and `proc/self/fd`), where it has one; Landlock: every access beneath its share, none elsewhere |
//!
//! The steps, in order (each needs what the next one takes away): vCPU and device threads
//! get a file system context of their own (`unshare(CLONE_FS)`) and `chroot` to the vsock
//! socket's directory, the fs worker to its root (`FsConfig::root`); every thread takes a
//! Landlock ruleset (which also keeps it from abstract unix sockets and from signalling
//! other processes, where the kernel has Landlock ABI 6); its capability bounding set is
//! cut to its class's, its inheritable and ambient sets emptied and its permitted and
//! effective sets cut to its class's; `no_new_privs` is set and the seccomp filter
//! installed. All of it is per thread: the shim's own threads
//! (mounts, cgroups, netlink, containerd's socket) keep theirs.
//!
//! A call outside the list raises SIGSYS; the handler writes one line naming the thread and
//! the call number to stderr and to the shim's log, and ends the process (`exit_group`), so
//! containerd sees the task die. [`Mode::Log`] lets such calls through and leaves the kernel
//! to log them (audit type 1326, in `dmesg`): the way to find what a list lacks.
//! [`Mode::Off`] confines nothing (the "protection off" half of the adversarial tests, and
//! measuring what confinement costs).
//!
//! The lists are the data below: one `const` per thread class, reviewed like code. The vCPU
//! list includes the device list, because a guest's MMIO write runs device code (activation,
//! reset, a queue notification the ioeventfd did not catch) on the vCPU thread.
use std::cell::Cell;
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::sync::{Once, OnceLock};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors from confining a thread. Any of them stops the VM from starting: a VMM thread
/// runs confined or not at all.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("thread {thread}: cannot {what}: {cause}")]
    Sys {
        thread: String,
        what: &'static str,
        cause: std::io::Error,
    },
    #[error("thread {thread}: cannot build its seccomp filter: {reason}")]
    Filter { thread: String, reason: String },
    #[error("thread {thread}: cannot confine it with Landlock{}: {reason} (a kernel without Landlock ABI 2, Linux 5.19, cannot confine virtio-fs; confine = \"log\" runs without)", if share.as_os_str().is_empty() { String::new() } else { format!(" to {}", share.display()) })]
    Landlock {
        thread: String,
        share: PathBuf,
        reason: String,
    },
}

/// How strictly VMM threads are confined (process-wide; the shim sets it from its config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Everything in the module doc; a call outside a list ends the process.
    Enforce,
    /// Calls outside a list are allowed and logged by the kernel; the rest as `Enforce`.
    Log,
    /// Nothing is confined.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "enforce" => Ok(Mode::Enforce),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            other => Err(format!(
                "confinement mode {other:?} is not one of enforce, log, off"
            )),
        }
    }
}

/// 0 enforce, 1 log, 2 off; `UNSET` until [`set_mode`] or the first [`mode`].
static MODE: AtomicU8 = AtomicU8::new(UNSET);
const UNSET: u8 = u8::MAX;

/// Environment variable giving the mode where nothing set it (tests, the lab's search for
/// a list's missing calls); the shim's config and `shoal-vmm --confine` set it explicitly.
pub const MODE_ENV: &str = "SHOAL_VMM_CONFINE";

/// Sets how VMM threads started from now on are confined.
pub fn set_mode(mode: Mode) {
    MODE.store(encode(mode), Ordering::Relaxed);
}

/// The mode VMM threads are confined in: as set, else as `SHOAL_VMM_CONFINE` says, else
/// `Enforce`.
pub fn mode() -> Mode {
    match MODE.load(Ordering::Relaxed) {
        0 => Mode::Enforce,
        1 => Mode::Log,
        2 => Mode::Off,
        _ => {
            let mode = std::env::var(MODE_ENV)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(Mode::Enforce);
            let _ =
                MODE.compare_exchange(UNSET, encode(mode), Ordering::Relaxed, Ordering::Relaxed);
            self::mode()
        }
    }
}

fn encode(mode: Mode) -> u8 {
    match mode {
        Mode::Enforce => 0,
        Mode::Log => 1,
        Mode::Off => 2,
    }
}

/// Where the SIGSYS handler writes its line besides stderr (the shim's log fifo), or -1.
static LOG_FD: AtomicI32 = AtomicI32::new(-1);

/// Also writes the line of a denied call to `fd` (kept open for the life of the process).
pub fn set_log_fd(fd: i32) {
    LOG_FD.store(fd, Ordering::Relaxed);
}

/// The kinds of VMM thread, each with its own lists.
#[derive(Debug, Clone)]
pub enum ThreadClass {
    /// A vCPU thread; `jail` is the directory of the VM's vsock sockets, if it has any.
    Vcpu { jail: Option<PathBuf> },
    /// The device thread (epoll over queues and backends).
    Devices { jail: Option<PathBuf> },
    /// A virtio-fs worker, confined to its share; `root` (canonical, above the share, with
    /// nothing else in it but `proc/self/fd`) is where it `chroot`s, if it has one.
    /// `proc_fd` is a descriptor of `/proc/self/fd` its code opened before (the
    /// passthrough's): in the root it is pointed at the root's own `proc/self/fd`, so that
    /// `..` from it stays inside.
    FsWorker {
        share: PathBuf,
        root: Option<PathBuf>,
        proc_fd: Option<std::os::fd::RawFd>,
    },
}

impl ThreadClass {
    fn name(&self) -> &'static str {
        match self {
            ThreadClass::Vcpu { .. } => "vcpu",
            ThreadClass::Devices { .. } => "devices",
            ThreadClass::FsWorker { .. } => "fs-worker",
        }
    }

    fn jail(&self) -> Option<&Path> {
        match self {
            ThreadClass::Vcpu { jail } | ThreadClass::Devices { jail } => jail.as_deref(),
            // Its root, if any, is entered with the share (`enter_root`).
            ThreadClass::FsWorker { .. } => None,
        }
    }
}

/// Calls every confined thread makes: the Rust and glibc runtime (allocation, locks,
/// signals, time, logging to descriptors it already holds) and reading and writing the
/// eventfds and sockets it was handed.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_munmap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_mremap,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// Reading and writing file data by descriptor, and syncing it: the device thread's disks
/// and the virtio-fs worker's open files.
const FILE_IO: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
];

/// The device thread: its epoll, the backends (vsock sockets, disk files, with
/// [`FILE_IO`], taps, eventfds, timers), and giving guest pages back (`madvise`, in
/// `COMMON`). `openat` because glibc's malloc opens `/proc/sys/vm/overcommit_memory` the
/// first time any thread's arena shrinks (once per process, from whichever thread frees):
/// were it not allowed, a vCPU or device thread freeing memory could end the shim. These
/// threads have no path to open: chrooted to the vsock socket directory, and held by
/// Landlock (no file access at all), so the call fails (EACCES) and glibc carries on.
pub const DEVICES: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_shutdown,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_getsockopt,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

/// A vCPU thread: `KVM_RUN` and the other KVM calls on its vCPU (see `vcpu_ioctl_rules`),
/// and everything in [`DEVICES`].
pub const VCPU: &[i64] = &[libc::SYS_ioctl];

/// The virtio-fs worker: the passthrough file system's calls, all relative to descriptors of
/// the share (Landlock keeps path access there; it has no chroot, as the passthrough names
/// `/proc/self/fd/N` for xattrs), [`FILE_IO`] on its open files, and the per-request switch
/// of its file-system uid and gid and of `CAP_FSETID`.
pub const FS_WORKER: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_ftruncate,
    libc::SYS_copy_file_range,
    libc::SYS_fgetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    libc::SYS_getxattr,
    libc::SYS_setxattr,
    libc::SYS_listxattr,
    libc::SYS_removexattr,
    libc::SYS_lgetxattr,
    libc::SYS_lsetxattr,
    libc::SYS_llistxattr,
    libc::SYS_lremovexattr,
    libc::SYS_fchdir,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_dup,
    libc::SYS_umask,
];

/// Capabilities the virtio-fs worker keeps, and why. The guest's root owns its files: the
/// worker creates and changes files for any guest uid, as root would.
/// - `CAP_CHOWN`: set the owner of new files to the guest caller's, and `chown`.
/// - `CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH`: open and search files whatever their mode,
///   as the guest's root may.
/// - `CAP_FOWNER`: `chmod`, `utimes` and xattrs on files the worker's uid does not own.
/// - `CAP_FSETID`: keep set-id bits on write and `chmod` (raised per request, as the
///   guest's kernel asks).
/// - `CAP_SETUID`, `CAP_SETGID`: switch the thread's uid and gid to the caller's while it
///   creates a file, so the file gets the right owner and the caller's permissions apply.
///
/// Not kept, among others: `CAP_MKNOD` (device nodes are refused, `tuned.rs`),
/// `CAP_SYS_ADMIN` (`trusted.*` xattrs are refused).
pub const FS_WORKER_CAPS: &[caps::Capability] = &[
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_DAC_READ_SEARCH,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_FSETID,
    caps::Capability::CAP_SETUID,
    caps::Capability::CAP_SETGID,
];

/// `mmap` and `mprotect` only without `PROT_EXEC`: a turned thread cannot make new code.
fn no_exec_rule() -> SeccompRule {
    SeccompRule::new(vec![SeccompCondition::new(
        2,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )
    .expect("valid condition")])
    .expect("valid rule")
}

fn ioctl_cond(op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(1, SeccompCmpArgLen::Dword, op, value).expect("valid condition")
}

/// The device thread's only `ioctl`: `FIONBIO`, making an accepted vsock host connection
/// non-blocking.
fn devices_ioctl_rules() -> Vec<SeccompRule> {
    vec![SeccompRule::new(vec![ioctl_cond(SeccompCmpOp::Eq, libc::FIONBIO)]).expect("rule")]
}

/// A vCPU's `ioctl`s: KVM's request type (0xAE, bits 8-15), `TUNSETOFFLOAD` (a net card's
/// activation sets the tap's offloads), and the device thread's.
fn vcpu_ioctl_rules() -> Vec<SeccompRule> {
    let mut rules = devices_ioctl_rules();
    rules.push(
        SeccompRule::new(vec![ioctl_cond(SeccompCmpOp::MaskedEq(0xff00), 0xae00)]).expect("rule"),
    );
    rules.push(SeccompRule::new(vec![ioctl_cond(SeccompCmpOp::Eq, TUNSETOFFLOAD)]).expect("rule"));
    rules
}

/// `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: u64 = 0x4004_54d0;

/// `socket` only for `AF_UNIX` (connecting to a vsock port's host socket).
fn unix_socket_rule() -> SeccompRule {
    SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_UNIX as u64,
    )
    .expect("valid condition")])
    .expect("valid rule")
}

/// `fcntl` only to read and set descriptor and status flags (never `O_ASYNC`, whose
/// `F_SETOWN`/`F_SETSIG` would let a thread have the kernel signal any process) and to copy a
/// descriptor close-on-exec.
fn fcntl_rules() -> Vec<SeccompRule> {
    let cmd = |c: i32| {
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, c as u64)
            .expect("valid condition")
    };
    let mut rules: Vec<SeccompRule> = [
        libc::F_GETFD,
        libc::F_SETFD,
        libc::F_GETFL,
        libc::F_DUPFD_CLOEXEC,
    ]
    .into_iter()
    .map(|c| SeccompRule::new(vec![cmd(c)]).expect("valid rule"))
    .collect();
    rules.push(
        SeccompRule::new(vec![
            cmd(libc::F_SETFL),
            SeccompCondition::new(
                2,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(libc::O_ASYNC as u64),
                0,
            )
            .expect("valid condition"),
        ])
        .expect("valid rule"),
    );
    rules
}

/// `tgkill` only to send `SIGABRT` to a thread of this process (`abort()`, a panic while
/// panicking), so that such an end reads as itself and not as a denied call.
fn abort_rule() -> SeccompRule {
    SeccompRule::new(vec![
        SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            std::process::id() as u64,
        )
        .expect("valid condition"),
        SeccompCondition::new(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::SIGABRT as u64,
        )
        .expect("valid condition"),
    ])
    .expect("valid rule")
}

/// The syscalls (with their argument rules; empty means any arguments) a class may make.
pub fn allowlist(class: &ThreadClass) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut add = |list: &[i64]| {
        for &nr in list {
            rules.insert(nr, Vec::new());
        }
    };
    add(COMMON);
    add(FILE_IO);
    match class {
        ThreadClass::Vcpu { .. } => {
            add(DEVICES);
            add(VCPU);
        }
        ThreadClass::Devices { .. } => add(DEVICES),
        ThreadClass::FsWorker { .. } => add(FS_WORKER),
    }
    rules.insert(libc::SYS_mmap, vec![no_exec_rule()]);
    rules.insert(libc::SYS_mprotect, vec![no_exec_rule()]);
    rules.insert(libc::SYS_fcntl, fcntl_rules());
    rules.insert(libc::SYS_tgkill, vec![abort_rule()]);
    match class {
        ThreadClass::Vcpu { .. } => {
            rules.insert(libc::SYS_ioctl, vcpu_ioctl_rules());
        }
        ThreadClass::Devices { .. } => {
            rules.insert(libc::SYS_ioctl, devices_ioctl_rules());
        }
        ThreadClass::FsWorker { .. } => {}
    }
    // Connecting to a vsock port's host socket, only for a VM that has vsock (and then a
    // chroot to its socket directory).
    if matches!(
        class,
        ThreadClass::Vcpu { jail: Some(_) } | ThreadClass::Devices { jail: Some(_) }
    ) {
        rules.insert(libc::SYS_socket, vec![unix_socket_rule()]);
        rules.insert(libc::SYS_connect, Vec::new());
    }
    rules
}

fn program(class: &ThreadClass, mode: Mode) -> Result<BpfProgram, String> {
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(
        allowlist(class),
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| e.to_string())?;
    BpfProgram::try_from(filter).map_err(|e| e.to_string())
}

/// The length of `class`'s seccomp program in BPF instructions (8 bytes each in the kernel,
/// per thread that installs it), for the benchmark's memory figure.
pub fn program_len(class: &ThreadClass) -> usize {
    cached_program(class, Mode::Enforce).map_or(0, |p| p.len())
}

/// Each class's filter, compiled once per process and mode (the lists do not change).
fn cached_program(class: &ThreadClass, mode: Mode) -> Result<&'static BpfProgram, String> {
    type Slot = OnceLock<Result<BpfProgram, String>>;
    static PROGRAMS: [[Slot; 5]; 2] = [
        [
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
        ],
        [
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
        ],
    ];
    let kind = match class {
        ThreadClass::Vcpu { jail } => usize::from(jail.is_some()),
        ThreadClass::Devices { jail } => 2 + usize::from(jail.is_some()),
        ThreadClass::FsWorker { .. } => 4,
    };
    let slot = &PROGRAMS[usize::from(mode == Mode::Log)][kind];
    slot.get_or_init(|| program(class, mode))
        .as_ref()
        .map_err(Clone::clone)
}

thread_local! {
    /// This thread's name, for the SIGSYS handler (which may not allocate or lock).
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
    /// The directory this thread is chrooted to, if any (see [`host_path`]).
    static JAIL: std::cell::RefCell<Option<PathBuf>> = const { std::cell::RefCell::new(None) };
}

/// The path by which this thread reaches `path`, a host path: under its chroot, the part
/// below the jail directory; elsewhere `path` itself (which then names nothing outside).
pub fn host_path(path: &Path) -> PathBuf {
    JAIL.with(|jail| match &*jail.borrow() {
        Some(dir) => match path.strip_prefix(dir) {
            Ok(rest) => Path::new("/").join(rest),
            Err(_) => path.to_path_buf(),
        },
        None => path.to_path_buf(),
    })
}

/// Confines the calling thread as `class` (per the current [`mode`]). Call it first thing in
/// the thread, before it touches guest memory or queues.
pub fn enter(class: &ThreadClass) -> Result<(), ConfineError> {
    let mode = mode();
    // In every mode the worker serves its share as its working directory; confined, from
    // inside its root where it has one.
    let share_dir = match class {
        ThreadClass::FsWorker {
            share,
            root,
            proc_fd,
        } => Some(
            match root {
                Some(root) if mode != Mode::Off => enter_root(root, share, *proc_fd),
                _ => settle_in(share),
            }
            .map_err(|(what, source)| ConfineError::Sys {
                thread: thread_name(class),
                what,
                cause: source,
            })?,
        ),
        _ => None,
    };
    if mode == Mode::Off {
        return Ok(());
    }
    install_sigsys_handler();
    let thread = thread_name(class);
    let mut name = [0u8; 16];
    let n = thread.len().min(15);
    name[..n].copy_from_slice(&thread.as_bytes()[..n]);
    THREAD_NAME.with(|c| c.set(name));
    let sys = |what, source| ConfineError::Sys {
        thread: thread.clone(),
        what,
        cause: source,
    };

    if let Some(dir) = class.jail() {
        settle_in(dir).map_err(|(what, e)| sys(what, e))?;
        enter_empty_netns().map_err(|(what, e)| sys(what, e))?;
        // SAFETY: chroot only changes this thread's root (its fs context is its own, from
        // settle_in); "." is the jail directory, its working directory.
        if unsafe { libc::chroot(c".".as_ptr()) } != 0 {
            return Err(sys("chroot to its jail", last_error()));
        }
        JAIL.with(|j| *j.borrow_mut() = Some(dir.to_path_buf()));
    }
    landlock(&thread, class, share_dir.as_ref(), mode)?;
    drop_capabilities(class).map_err(|e| sys("drop capabilities", e))?;
    let prog = cached_program(class, mode).map_err(|reason| ConfineError::Filter {
        thread: thread.clone(),
        reason,
    })?;
    // Sets no_new_privs, then installs the filter on this thread only.
    seccompiler::apply_filter(prog).map_err(|e| ConfineError::Filter {
        thread: thread.clone(),
        reason: e.to_string(),
    })?;
    Ok(())
}

/// Starts a thread that confines itself as `class` before it runs `f`, and waits until it
/// has: a thread that cannot be confined ends without running `f`, and its error is
/// returned here.
pub fn spawn<F: FnOnce() + Send + 'static>(
    name: &str,
    stack: usize,
    class: ThreadClass,
    f: F,
) -> Result<std::thread::JoinHandle<()>, ConfineError> {
    start(name, stack, class, f)?.confined()
}

/// A thread started by [`start`] that has not yet said whether it is confined.
pub struct Starting {
    name: String,
    handle: std::thread::JoinHandle<()>,
    told: std::sync::mpsc::Receiver<Result<(), ConfineError>>,
}

impl Starting {
    /// Waits until the thread is confined (and runs its work), or has ended on an error.
    pub fn confined(self) -> Result<std::thread::JoinHandle<()>, ConfineError> {
        match self.told.recv() {
            Ok(Ok(())) => Ok(self.handle),
            Ok(Err(e)) => {
                let _ = self.handle.join();
                Err(e)
            }
            Err(_) => {
                let _ = self.handle.join();
                Err(ConfineError::Sys {
                    thread: self.name,
                    what: "confine itself",
                    cause: std::io::Error::other("the thread ended before it said"),
                })
            }
        }
    }
}

/// Starts a thread that confines itself as `class`, then runs `f`; several can be started
/// before waiting on any (`Starting::confined`), so that they confine themselves side by side.
pub fn start<F: FnOnce() + Send + 'static>(
    name: &str,
    stack: usize,
    class: ThreadClass,
    f: F,
) -> Result<Starting, ConfineError> {
    let (tx, told) = std::sync::mpsc::sync_channel(1);
    let handle = std::thread::Builder::new()
        .name(name.into())
        .stack_size(stack)
        .spawn(move || {
            let confined = enter(&class);
            let ok = confined.is_ok();
            let _ = tx.send(confined);
            if ok {
                f()
            }
        })
        .map_err(|source| ConfineError::Sys {
            thread: name.into(),
            what: "start",
            cause: source,
        })?;
    Ok(Starting {
        name: name.into(),
        handle,
        told,
    })
}

fn thread_name(class: &ThreadClass) -> String {
    std::thread::current()
        .name()
        .unwrap_or(class.name())
        .to_string()
}

/// Gives this thread a root and working directory of its own (`unshare(CLONE_FS)`), and
/// makes `dir` its working directory ([`enter_dir`]).
fn settle_in(dir: &Path) -> Result<OwnedFd, (&'static str, std::io::Error)> {
    // SAFETY: unshare(2) with CLONE_FS only gives this thread its own root and cwd.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(("unshare its file system context", last_error()));
    }
    enter_dir(dir, ("open its directory", "enter its directory"))
}

/// Makes `dir` (not a symlink) this thread's working directory; returns the descriptor it
/// was resolved to, once, for what else is set up on it. `what` names the two steps in an
/// error.
fn enter_dir(
    dir: &Path,
    what: (&'static str, &'static str),
) -> Result<OwnedFd, (&'static str, std::io::Error)> {
    let dir = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(|e| (what.0, e))?;
    // SAFETY: fchdir(2) on a directory descriptor this function holds.
    if unsafe { libc::fchdir(dir.as_raw_fd()) } != 0 {
        return Err((what.1, last_error()));
    }
    Ok(dir.into())
}

/// Gives this thread a file system context of its own, `chroot`s it to `root` and makes
/// `share` (beneath `root`) its working directory; returns the share's descriptor as seen
/// from there. `proc_fd`, a descriptor of the host's `/proc/self/fd`, is pointed at the
/// root's. In that root no host path but the share and `proc/self/fd` has a name: a bug
/// in path handling, a symlink the guest planted or `..` reaches nothing else, for every
/// call, including those Landlock does not cover (chmod, chown, xattrs, utimes). What
/// stays open is the process's other descriptors: `/proc/self/fd/N/..` from one of a
/// directory outside the root walks out (docs/architecture.md, "Descriptors").
fn enter_root(
    root: &Path,
    share: &Path,
    proc_fd: Option<std::os::fd::RawFd>,
) -> Result<OwnedFd, (&'static str, std::io::Error)> {
    let inside = share.strip_prefix(root).map_err(|_| {
        (
            "find its share in its root",
            std::io::Error::other("not beneath"),
        )
    })?;
    settle_in(root)?;
    // SAFETY: chroot only changes this thread's root (its fs context is its own, from
    // settle_in); "." is `root`, its working directory.
    if unsafe { libc::chroot(c".".as_ptr()) } != 0 {
        return Err(("chroot to its root", last_error()));
    }
    if let Some(old) = proc_fd {
        let fds = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open("/proc/self/fd")
            .map_err(|e| ("open its root's /proc/self/fd", e))?;
        // SAFETY: dup3(2) onto a descriptor number the caller says is its own descriptor of
        // /proc/self/fd; the number keeps its owner, and now names the root's.
        if unsafe { libc::dup3(fds.as_raw_fd(), old, libc::O_CLOEXEC) } < 0 {
            return Err(("point its /proc/self/fd at its root's", last_error()));
        }
    }
    enter_dir(
        &Path::new("/").join(inside),
        ("open its share in its root", "enter its share"),
    )
}

/// The process's empty network namespace, once made (see [`enter_empty_netns`]).
static EMPTY_NETNS: std::sync::Mutex<Option<OwnedFd>> = std::sync::Mutex::new(None);

/// Makes the process's empty network namespace on a short-lived thread of its own, unless
/// confinement is off or it exists: a VM's set-up calls it first, so that the 0.5-1 ms the
/// kernel takes to build a network namespace passes while guest memory and the KVM VM are
/// set up, and the vCPU and device threads only join it. Without it the first of them makes
/// it. A failure here is left for that thread to meet and report.
pub fn prepare_empty_netns() {
    if mode() == Mode::Off {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("shoal-netns".into())
        .spawn(|| {
            let mut empty = EMPTY_NETNS.lock().unwrap_or_else(|p| p.into_inner());
            if empty.is_none() {
                let _ = make_empty_netns(&mut empty);
            }
        });
}

/// Moves the calling thread into a new, empty network namespace and keeps it in `slot`.
fn make_empty_netns(slot: &mut Option<OwnedFd>) -> Result<(), (&'static str, std::io::Error)> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| ("make an empty network namespace", std::io::Error::from(e)))?;
    let ns = std::fs::File::open("/proc/thread-self/ns/net")
        .map_err(|e| ("open its network namespace", e))?;
    *slot = Some(ns.into());
    Ok(())
}

/// Moves this thread into the process's empty network namespace, made by the first thread
/// that asks (`unshare(CLONE_NEWNET)`) and joined by the others (`setns`). A vCPU or device
/// thread keeps `socket` and `connect` for the VM's vsock sockets, which are named by path
/// (and reached across namespaces); abstract unix sockets belong to a network namespace,
/// so the host's (containerd's, systemd's, D-Bus's) have no name in this one, on every
/// kernel (Landlock scopes them only from ABI 6, Linux 6.12). One namespace per process,
/// not per thread: it holds nothing, and each costs the kernel a network stack.
fn enter_empty_netns() -> Result<(), (&'static str, std::io::Error)> {
    let mut empty = EMPTY_NETNS.lock().unwrap_or_else(|p| p.into_inner());
    match &*empty {
        Some(ns) => nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| ("join the empty network namespace", e.into())),
        None => make_empty_netns(&mut empty),
    }
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn drop_capabilities(class: &ThreadClass) -> std::io::Result<()> {
    use caps::{CapSet, CapsHashSet};
    let keep: CapsHashSet = match class {
        ThreadClass::FsWorker { .. } => FS_WORKER_CAPS.iter().copied().collect(),
        _ => CapsHashSet::new(),
    };
    let io = |e: caps::errors::CapsError| std::io::Error::other(e.to_string());
    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes below. It only
    // limits what an execve could gain, and no list allows execve; emptied all the same.
    for cap in caps::all() {
        if !keep.contains(&cap) {
            // A capability this kernel does not know is not in the set (EINVAL): nothing to drop.
            match caps::drop(None, CapSet::Bounding, cap) {
                Ok(()) => {}
                Err(_) if !caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) => {}
                Err(e) => return Err(io(e)),
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(io)?;
    caps::clear(None, CapSet::Inheritable).map_err(io)?;
    caps::set(None, CapSet::Effective, &keep).map_err(io)?;
    caps::set(None, CapSet::Permitted, &keep).map_err(io)?;
    Ok(())
}

/// Landlock for this thread: no path access at all for vCPU and device threads (they open
/// nothing; their `connect` by path is held by the chroot), every access beneath the share
/// and none elsewhere for the virtio-fs worker; for both, no abstract unix sockets and no
/// signals outside the process where the kernel can scope them (Landlock ABI 6, Linux 6.12).
/// In `Enforce` mode the worker's ruleset must be enforced in full (ABI 2: renames and
/// links across directories, which ABI 1 refuses): a kernel without it fails the start.
fn landlock(
    thread: &str,
    class: &ThreadClass,
    share_dir: Option<&OwnedFd>,
    mode: Mode,
) -> Result<(), ConfineError> {
    use landlock::{
        Access, AccessFs, CompatLevel, Compatible, PathBeneath, Ruleset, RulesetAttr,
        RulesetCreatedAttr, RulesetStatus, Scope, ABI,
    };
    let share = match class {
        ThreadClass::FsWorker { share, .. } => Some(share.as_path()),
        _ => None,
    };
    let err = |reason: String| ConfineError::Landlock {
        thread: thread.to_string(),
        share: share.map(Path::to_path_buf).unwrap_or_default(),
        reason,
    };
    let required = share.is_some() && mode == Mode::Enforce;
    let abi = ABI::V2;
    let mut ruleset = Ruleset::default()
        .set_compatibility(if required {
            CompatLevel::HardRequirement
        } else {
            CompatLevel::BestEffort
        })
        .handle_access(AccessFs::from_all(abi))
        .map_err(|e| err(e.to_string()))?
        .set_compatibility(CompatLevel::BestEffort)
        .scope(Scope::AbstractUnixSocket | Scope::Signal)
        .map_err(|e| err(e.to_string()))?
        .create()
        .map_err(|e| err(e.to_string()))?;
    if let Some(dir) = share_dir {
        ruleset = ruleset
            .set_compatibility(if required {
                CompatLevel::HardRequirement
            } else {
                CompatLevel::BestEffort
            })
            .add_rule(PathBeneath::new(dir.as_fd(), AccessFs::from_all(abi)))
            .map_err(|e| err(e.to_string()))?;
    }
    let status = ruleset.restrict_self().map_err(|e| err(e.to_string()))?;
    // In enforce mode the share's rules are a hard requirement (a kernel short of them
    // fails above); a ruleset only partly enforced there lacks the scopes (ABI 6), not the
    // share. The warning is for log mode, where the share's rules may be missing.
    if share.is_some() && !required && status.ruleset != RulesetStatus::FullyEnforced {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            tracing::warn!(
                "this kernel's Landlock does not hold virtio-fs workers to their share ({:?}); confinement is in log mode, so they run anyway",
                status.ruleset
            )
        });
    }
    Ok(())
}

fn install_sigsys_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a valid handler and SA_SIGINFO is well formed; the
        // handler only reads its arguments and a thread-local, and calls write(2) and
        // exit_group(2), both async-signal-safe and in every list.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigsys as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut());
        }
    });
}

/// Status the process ends with after a denied call (128 + SIGSYS, as if killed by it).
pub const DENIED_EXIT_STATUS: i32 = 128 + libc::SIGSYS;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel hands a valid siginfo; for SIGSYS from seccomp, the syscall number
    // is the int at byte 24 (`_sigsys.si_syscall`, after si_call_addr).
    let nr = unsafe { *((info as *const u8).add(24) as *const i32) };
    let name = THREAD_NAME.with(|c| c.get());
    let mut line = [0u8; 160];
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        let n = bytes.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    push(b"shoal-vmm: seccomp: thread ");
    push(&name[..name.iter().position(|&b| b == 0).unwrap_or(16)]);
    push(b" made system call ");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    push(&digits[i..]);
    push(b", which its allowlist denies (vmm/src/confine.rs); ending the process\n");
    for fd in [2, LOG_FD.load(Ordering::Relaxed)] {
        if fd >= 0 {
            // SAFETY: writes `len` initialised bytes of `line`; a bad fd only fails.
            unsafe { libc::write(fd, line.as_ptr().cast(), len) };
        }
    }
    // SAFETY: exit_group ends the process; nothing after it runs.
    unsafe { libc::syscall(libc::SYS_exit_group, DENIED_EXIT_STATUS) };
}

#[cfg(test)]
mod tests;
