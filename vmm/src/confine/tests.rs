//! Each thread class, confined, is made to try what a turned thread would: run a program,
//! open a host file outside what it serves, trace another process. Each attempt runs in a
//! child process (this test binary run again, the `child` entry below), because a denied
//! call ends the whole process by design. The same attempts with confinement off succeed,
//! which shows the attempts themselves work and it is the confinement that stops them.
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

use super::*;

const ENV: &str = "SHOAL_CONFINE_CHILD";

#[derive(Debug, Clone, Copy)]
enum Attempt {
    Exec,
    OpenHostFile,
    /// `openat` through a descriptor of the host's `/` held from before the thread was
    /// confined (the fs worker's case: chroot alone does not stop this, Landlock does).
    OpenThroughHeldRoot,
    Ptrace,
    /// `O_ASYNC` on a socket, after which the kernel would signal its owner (`F_SETOWN`, any
    /// process) on every write.
    AsyncSignal,
    /// Connecting to an abstract unix socket of the host (outside any chroot).
    AbstractSocket,
}

fn class_named(name: &str, dir: &Path) -> ThreadClass {
    match name {
        "vcpu" => ThreadClass::Vcpu {
            jail: Some(dir.into()),
        },
        "devices" => ThreadClass::Devices {
            jail: Some(dir.into()),
        },
        "fs" => ThreadClass::FsWorker {
            share: dir.into(),
            root: None,
            proc_fd: None,
        },
        other => panic!("no class {other}"),
    }
}

/// Runs in the child: confines a thread of the class named in the environment and makes
/// the attempt; prints ALLOWED, or DENIED with the error, or (for a call seccomp refuses)
/// is ended by the SIGSYS handler.
#[test]
#[ignore = "the child half of the confinement tests; they run it, with its arguments in the environment"]
fn child() {
    let spec = std::env::var(ENV).expect("run by the confinement tests");
    let mut parts = spec.split(',');
    let (mode, class, attempt, dir) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    set_mode(mode.parse().unwrap());
    let class = class_named(class, Path::new(dir));
    let attempt = match attempt {
        "exec" => Attempt::Exec,
        "open" => Attempt::OpenHostFile,
        "held-root" => Attempt::OpenThroughHeldRoot,
        "ptrace" => Attempt::Ptrace,
        "async" => Attempt::AsyncSignal,
        "abstract" => Attempt::AbstractSocket,
        other => panic!("no attempt {other}"),
    };
    let root = std::fs::File::open("/").unwrap();
    // Not holding the test's pipes, so an ended child is seen at once.
    let mut target = Command::new("sleep")
        .arg("30")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let target_pid = target.id() as i32;
    let root_fd = root.as_raw_fd();
    let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let sock_fd = sock.as_raw_fd();
    let abstract_name = format!("shoal-confine-test-{}", std::process::id());
    let _listener = {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&abstract_name).unwrap();
        std::os::unix::net::UnixListener::bind_addr(&addr).unwrap()
    };
    let handle = spawn("shoal-test", 256 * 1024, class, move || {
        let outcome: std::io::Result<()> = match attempt {
            Attempt::Exec => {
                let argv = [
                    c"/bin/sh".as_ptr(),
                    c"-c".as_ptr(),
                    c"echo EXECUTED".as_ptr(),
                    std::ptr::null(),
                ];
                let envp = [std::ptr::null()];
                // SAFETY: NULL-terminated arrays of NUL-terminated literals.
                unsafe { libc::execve(argv[0], argv.as_ptr(), envp.as_ptr()) };
                Err(std::io::Error::last_os_error())
            }
            Attempt::OpenHostFile => std::fs::read("/etc/passwd").map(drop),
            Attempt::OpenThroughHeldRoot => {
                // SAFETY: openat on a descriptor this process holds, with a literal path.
                let fd = unsafe { libc::openat(root_fd, c"etc/passwd".as_ptr(), libc::O_RDONLY) };
                if fd < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    // SAFETY: `fd` was just opened here.
                    unsafe { libc::close(fd) };
                    Ok(())
                }
            }
            Attempt::AsyncSignal => {
                // SAFETY: fcntl on a socket this process holds.
                let rc = unsafe { libc::fcntl(sock_fd, libc::F_SETFL, libc::O_ASYNC) };
                if rc != 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            }
            Attempt::AbstractSocket => {
                use std::os::linux::net::SocketAddrExt;
                let addr =
                    std::os::unix::net::SocketAddr::from_abstract_name(&abstract_name).unwrap();
                std::os::unix::net::UnixStream::connect_addr(&addr).map(drop)
            }
            Attempt::Ptrace => {
                // SAFETY: PTRACE_ATTACH to a process this one started; detached at once.
                let rc = unsafe { libc::ptrace(libc::PTRACE_ATTACH, target_pid, 0usize, 0usize) };
                if rc != 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            }
        };
        match outcome {
            Ok(()) => println!("ALLOWED"),
            Err(e) => println!("DENIED {e}"),
        }
        std::io::stdout().flush().unwrap();
    })
    .expect("confining the test thread");
    handle.join().unwrap();
    drop(sock);
    let _ = target.kill();
    let _ = target.wait();
    drop(root);
}

struct Run {
    status: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run(mode: &str, class: &str, attempt: &str) -> Run {
    let dir = std::env::temp_dir().join(format!(
        "shoal-confine-{}-{class}-{attempt}-{mode}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "confine::tests::child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV, format!("{mode},{class},{attempt},{}", dir.display()))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    Run {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// Confined, the attempt fails: either seccomp ends the process naming the thread and the
/// call, or the call returns an error. With confinement off the same attempt succeeds.
fn check(class: &str, attempt: &str, denied_call: Option<i64>) {
    if std::env::var_os(ENV).is_some() {
        return;
    }
    let off = run("off", class, attempt);
    assert!(
        off.stdout.contains("ALLOWED") || off.stdout.contains("EXECUTED"),
        "{class}/{attempt} with confinement off should succeed: status {:?}\n{}\n{}",
        off.status,
        off.stdout,
        off.stderr
    );
    let on = run("enforce", class, attempt);
    match denied_call {
        Some(nr) => {
            let line =
                format!("thread shoal-test made system call {nr}, which its allowlist denies");
            assert_eq!(
                on.status,
                Some(DENIED_EXIT_STATUS),
                "{class}/{attempt}: seccomp should end the process\n{}\n{}",
                on.stdout,
                on.stderr
            );
            assert!(
                on.stderr.contains(&line),
                "{class}/{attempt}: no line {line:?} in\n{}",
                on.stderr
            );
            assert_eq!(
                on.stderr.matches("allowlist denies").count(),
                1,
                "the denied call is reported once"
            );
        }
        None => {
            assert!(
                on.stdout.contains("DENIED"),
                "{class}/{attempt} confined should fail: status {:?}\n{}\n{}",
                on.status,
                on.stdout,
                on.stderr
            );
        }
    }
    assert!(!on.stdout.contains("EXECUTED") && !on.stdout.contains("ALLOWED"));
}

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! attempts {
    ($($name:ident: $class:literal, $attempt:literal, $denied:expr;)*) => {$(
        #[test]
        fn $name() {
            if !root() {
                eprintln!("skipped: chroot and the capability sets need root");
                return;
            }
            check($class, $attempt, $denied);
        }
    )*};
}

attempts! {
    vcpu_thread_cannot_exec: "vcpu", "exec", Some(libc::SYS_execve);
    vcpu_thread_cannot_open_host_files: "vcpu", "open", None;
    vcpu_thread_cannot_ptrace: "vcpu", "ptrace", Some(libc::SYS_ptrace);
    device_thread_cannot_exec: "devices", "exec", Some(libc::SYS_execve);
    device_thread_cannot_open_host_files: "devices", "open", None;
    vcpu_thread_cannot_open_through_a_held_host_descriptor: "vcpu", "held-root", None;
    device_thread_cannot_open_through_a_held_host_descriptor: "devices", "held-root", None;
    device_thread_cannot_ptrace: "devices", "ptrace", Some(libc::SYS_ptrace);
    fs_worker_cannot_exec: "fs", "exec", Some(libc::SYS_execve);
    fs_worker_cannot_open_host_files: "fs", "open", None;
    fs_worker_cannot_open_through_a_held_host_descriptor: "fs", "held-root", None;
    fs_worker_cannot_ptrace: "fs", "ptrace", Some(libc::SYS_ptrace);
    device_thread_cannot_arm_a_signal_to_any_process: "devices", "async", Some(libc::SYS_fcntl);
    fs_worker_cannot_arm_a_signal_to_any_process: "fs", "async", Some(libc::SYS_fcntl);
    // Abstract unix sockets are outside every chroot: vCPU and device threads live in an
    // empty network namespace of the process's, where the host's have no name (Landlock
    // also scopes them, from ABI 6, Linux 6.12).
    device_thread_cannot_reach_an_abstract_socket_of_the_host: "devices", "abstract", None;
    vcpu_thread_cannot_reach_an_abstract_socket_of_the_host: "vcpu", "abstract", None;
}

/// The empty network namespace alone, whatever Landlock this kernel has: a thread in it
/// finds no abstract socket of the host, a thread beside it does, and a second thread joins
/// the same namespace rather than making another.
#[test]
fn the_empty_network_namespace_hides_the_hosts_abstract_sockets() {
    if !root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    use std::os::linux::net::SocketAddrExt;
    let name = format!("shoal-netns-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    let inside = || {
        let addr = addr.clone();
        std::thread::spawn(move || {
            super::enter_empty_netns().unwrap();
            let ns = std::fs::metadata("/proc/thread-self/ns/net").unwrap();
            let reached = std::os::unix::net::UnixStream::connect_addr(&addr).is_ok();
            (std::os::unix::fs::MetadataExt::ino(&ns), reached)
        })
        .join()
        .unwrap()
    };
    let (first, reached_first) = inside();
    let (second, reached_second) = inside();
    assert!(
        !reached_first && !reached_second,
        "reached from the empty namespace"
    );
    assert_eq!(
        first, second,
        "the second thread made a namespace of its own"
    );
    let host = std::fs::metadata("/proc/thread-self/ns/net").unwrap();
    assert_ne!(std::os::unix::fs::MetadataExt::ino(&host), first);
    assert!(
        std::os::unix::net::UnixStream::connect_addr(&addr).is_ok(),
        "the host's own thread should reach it"
    );
}

/// What each class's thread holds after confinement, as `/proc/self/task/TID/status` shows
/// it (the README's way to check a running sandbox).
#[test]
fn confined_threads_show_seccomp_and_their_capabilities_in_proc() {
    if !root() {
        eprintln!("skipped: chroot and the capability sets need root");
        return;
    }
    if std::env::var_os(ENV).is_some() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("shoal-confine-proc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Reads its status before confinement (the file is outside every jail) and after, via a
    // descriptor opened before.
    for (class, cap_eff) in [
        ("vcpu", "0000000000000000"),
        ("devices", "0000000000000000"),
        ("fs", "00000000000000df"),
    ] {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done) = std::sync::mpsc::channel::<()>();
        let handle = spawn(
            "shoal-test",
            256 * 1024,
            class_named(class, &dir),
            move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                tx.send(tid).unwrap();
                // Alive until its status has been read.
                let _ = done.recv();
            },
        )
        .unwrap();
        let tid = rx.recv().unwrap();
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        done_tx.send(()).unwrap();
        handle.join().unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        assert_eq!(field("Seccomp:"), "2", "{class}: {status}");
        assert_eq!(field("NoNewPrivs:"), "1", "{class}");
        assert_eq!(field("CapEff:"), cap_eff, "{class}");
        assert_eq!(field("CapPrm:"), cap_eff, "{class}");
        assert_eq!(field("CapBnd:"), cap_eff, "{class}");
        assert_eq!(field("CapInh:"), "0000000000000000", "{class}");
        assert_eq!(field("CapAmb:"), "0000000000000000", "{class}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_list_compiles_to_a_filter_and_denies_what_no_class_needs() {
    let dir = PathBuf::from("/nonexistent");
    for class in [
        ThreadClass::Vcpu { jail: None },
        ThreadClass::Devices { jail: None },
        ThreadClass::Vcpu {
            jail: Some(dir.clone()),
        },
        ThreadClass::Devices {
            jail: Some(dir.clone()),
        },
        ThreadClass::FsWorker {
            share: dir.clone(),
            root: None,
            proc_fd: None,
        },
    ] {
        program(&class, Mode::Enforce).unwrap();
        let list = allowlist(&class);
        // `connect` only for a thread chrooted to a vsock socket directory.
        let jailed = matches!(
            class,
            ThreadClass::Vcpu { jail: Some(_) } | ThreadClass::Devices { jail: Some(_) }
        );
        assert_eq!(list.contains_key(&libc::SYS_connect), jailed, "{class:?}");
        assert_eq!(list.contains_key(&libc::SYS_socket), jailed, "{class:?}");
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_ptrace,
            libc::SYS_process_vm_writev,
            libc::SYS_mount,
            libc::SYS_init_module,
            libc::SYS_bpf,
            libc::SYS_setns,
            libc::SYS_unshare,
            libc::SYS_chroot,
            libc::SYS_kill,
            libc::SYS_tkill,
            libc::SYS_rt_sigqueueinfo,
            libc::SYS_pidfd_send_signal,
        ] {
            assert!(!list.contains_key(&nr), "{class:?} allows syscall {nr}");
        }
        // Allowed only with the arguments their rules name.
        for nr in [
            libc::SYS_fcntl,
            libc::SYS_tgkill,
            libc::SYS_mmap,
            libc::SYS_mprotect,
        ] {
            assert!(
                list.get(&nr).is_some_and(|rules| !rules.is_empty()),
                "{class:?} allows syscall {nr} with any arguments"
            );
        }
    }
}

#[test]
fn host_paths_map_into_a_jail_and_nowhere_else() {
    assert_eq!(
        host_path(Path::new("/run/x/v.sock_5")),
        Path::new("/run/x/v.sock_5")
    );
    JAIL.with(|j| *j.borrow_mut() = Some(PathBuf::from("/run/x")));
    assert_eq!(
        host_path(Path::new("/run/x/v.sock_5")),
        Path::new("/v.sock_5")
    );
    assert_eq!(
        host_path(Path::new("/etc/passwd")),
        Path::new("/etc/passwd")
    );
    JAIL.with(|j| *j.borrow_mut() = None);
}

#[test]
fn modes_parse_and_name_what_is_wrong() {
    assert_eq!("enforce".parse::<Mode>().unwrap(), Mode::Enforce);
    assert_eq!("log".parse::<Mode>().unwrap(), Mode::Log);
    assert_eq!("off".parse::<Mode>().unwrap(), Mode::Off);
    let e = "strict".parse::<Mode>().unwrap_err();
    assert!(e.contains("\"strict\"") && e.contains("enforce"), "{e}");
}
