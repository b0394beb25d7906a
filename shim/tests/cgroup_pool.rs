//! The host cgroup pool on this host's real cgroup file system (v1 here, v2 in the lab and
//! on most production hosts). Needs root.
use std::path::{Path, PathBuf};

use containerd_shim_shoal_v2::host_cgroups::{
    detect, Claim, Driver, Hierarchy, Limits, Pool, PoolConfig, PoolError,
};

fn can_run() -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIP: cgroup pool tests need root");
        return false;
    }
    if detect(Path::new("/sys/fs/cgroup")).is_err() {
        eprintln!("SKIP: no cgroup file system at /sys/fs/cgroup");
        return false;
    }
    true
}

fn config(name: &str, size: usize, driver: Driver) -> PoolConfig {
    PoolConfig {
        parent: format!("shoal-test-{name}-{}", std::process::id()),
        driver,
        size,
        state_dir: std::env::temp_dir().join(format!("shoal-pool-{name}-{}", std::process::id())),
        memory_overhead: 8 << 20,
        ..Default::default()
    }
}

/// The pid of a process that has exited and been reaped (a crashed shim's, in the tests).
fn dead_pid() -> u32 {
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let pid = dead.id();
    dead.wait().unwrap();
    pid
}

fn memory_file(pool: &Pool, dirs: &[PathBuf]) -> PathBuf {
    match pool.hierarchy() {
        Hierarchy::V2 => dirs[0].join("memory.max"),
        Hierarchy::V1 { controllers } => dirs
            [controllers.iter().position(|c| *c == "memory").unwrap()]
        .join("memory.limit_in_bytes"),
    }
}

#[test]
fn claim_apply_release_and_exhaustion() {
    if !can_run() {
        return;
    }
    for driver in [Driver::Cgroupfs, Driver::Systemd] {
        let pool = Pool::open(config(&format!("basic-{driver:?}"), 3, driver)).unwrap();
        assert_eq!(pool.free_count(), 3);
        let limits = Limits {
            memory_max: Some(256 << 20),
            cpu_quota_us: Some(50_000),
            cpu_period_us: Some(100_000),
            pids_max: Some(64),
        };
        let a = pool.claim("sb-a", &limits).unwrap();
        assert!(a.dirs.iter().all(|d| d.exists()));
        if driver == Driver::Systemd {
            assert!(
                a.dirs[0].to_string_lossy().contains(".slice/")
                    && a.dirs[0].to_string_lossy().ends_with(".scope"),
                "{:?}",
                a.dirs
            );
        }
        let mem = std::fs::read_to_string(memory_file(&pool, &a.dirs)).unwrap();
        assert_eq!(mem.trim(), (256u64 << 20).to_string());
        let b = pool.claim("sb-b", &Limits::default()).unwrap();
        let c = pool.claim("sb-c", &Limits::default()).unwrap();
        assert_ne!(a.slot, b.slot);
        assert!(matches!(
            pool.claim("sb-d", &Limits::default()),
            Err(PoolError::Exhausted { size: 3 })
        ));
        pool.release(&a).unwrap();
        assert_eq!(pool.free_count(), 1);
        // The released cgroup is reused, with the new claim's limits: none.
        let d = pool.claim("sb-d", &Limits::default()).unwrap();
        assert_eq!(d.slot, a.slot);
        let mem = std::fs::read_to_string(memory_file(&pool, &d.dirs)).unwrap();
        assert!(
            mem.trim() == "max" || mem.trim().parse::<u64>().unwrap() >= 1 << 62,
            "a claim without a memory limit got {mem:?}"
        );
        for c in [b, c, d] {
            pool.release(&c).unwrap();
        }
        pool.destroy().unwrap();
    }
}

/// What a claim's cgroup holds, as (memory, CPU quota and period, pids), read back in
/// this hierarchy's own words.
fn limits_of(pool: &Pool, dirs: &[PathBuf]) -> (String, String, String) {
    let read = |path: PathBuf| std::fs::read_to_string(path).unwrap().trim().to_string();
    let memory = read(memory_file(pool, dirs));
    match pool.hierarchy() {
        Hierarchy::V2 => (
            memory,
            read(dirs[0].join("cpu.max")),
            read(dirs[0].join("pids.max")),
        ),
        Hierarchy::V1 { controllers } => {
            let dir = |c: &str| &dirs[controllers.iter().position(|x| *x == c).unwrap()];
            let cpu = format!(
                "{} {}",
                read(dir("cpu").join("cpu.cfs_quota_us")),
                read(dir("cpu").join("cpu.cfs_period_us"))
            );
            (memory, cpu, read(dir("pids").join("pids.max")))
        }
    }
}

#[test]
fn a_reused_slot_has_exactly_the_new_claims_limits() {
    if !can_run() {
        return;
    }
    let pool = Pool::open(config("reuse", 1, Driver::Cgroupfs)).unwrap();
    let limited = Limits {
        memory_max: Some(96 << 20),
        cpu_quota_us: Some(20_000),
        cpu_period_us: Some(50_000),
        pids_max: Some(32),
    };
    let none = if pool.hierarchy() == &Hierarchy::V2 {
        "max 100000"
    } else {
        "-1 100000"
    };
    let unlimited = |memory: &str| memory == "max" || memory.parse::<u64>().unwrap() >= 1 << 62;
    // Limited, then the same again (the slot already holds them), then none, then limited.
    for (round, limits) in [&limited, &limited, &Limits::default(), &limited]
        .into_iter()
        .enumerate()
    {
        let claim = pool.claim(&format!("sb-{round}"), limits).unwrap();
        let (memory, got_cpu, pids) = limits_of(&pool, &claim.dirs);
        if limits.memory_max.is_some() {
            assert_eq!(
                (memory.as_str(), got_cpu.as_str(), pids.as_str()),
                ((96u64 << 20).to_string().as_str(), "20000 50000", "32"),
                "round {round}"
            );
        } else {
            assert!(unlimited(&memory), "round {round}: memory {memory}");
            assert_eq!(
                (got_cpu.as_str(), pids.as_str()),
                (none, "max"),
                "round {round}"
            );
        }
        pool.release(&claim).unwrap();
    }
    pool.destroy().unwrap();
}

#[test]
fn a_reused_slot_takes_a_shorter_period_under_a_limited_parent() {
    if !can_run() {
        return;
    }
    let pool = Pool::open(config("period", 1, Driver::Cgroupfs)).unwrap();
    // The parent may use half a CPU.
    let claim = pool.claim("sb-first", &Limits::default()).unwrap();
    let (file, value) = match pool.hierarchy() {
        Hierarchy::V2 => (
            claim.dirs[0].parent().unwrap().join("cpu.max"),
            "50000 100000",
        ),
        Hierarchy::V1 { controllers } => {
            let cpu = &claim.dirs[controllers.iter().position(|c| *c == "cpu").unwrap()];
            (cpu.parent().unwrap().join("cpu.cfs_quota_us"), "50000")
        }
    };
    pool.release(&claim).unwrap();
    std::fs::write(file, value).unwrap();
    // 40 % of a CPU over 100 ms, then 40 % over 50 ms: the period shrinks while the slot
    // still holds the first quota, which over the new period would be 80 %.
    let wide = Limits {
        cpu_quota_us: Some(40_000),
        cpu_period_us: Some(100_000),
        ..Default::default()
    };
    let narrow = Limits {
        cpu_quota_us: Some(20_000),
        cpu_period_us: Some(50_000),
        ..Default::default()
    };
    for (round, limits) in [&wide, &narrow, &wide].into_iter().enumerate() {
        let claim = pool
            .claim(&format!("sb-{round}"), limits)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let (_, cpu, _) = limits_of(&pool, &claim.dirs);
        let want = format!(
            "{} {}",
            limits.cpu_quota_us.unwrap(),
            limits.cpu_period_us.unwrap()
        );
        assert_eq!(cpu, want, "round {round}");
        pool.release(&claim).unwrap();
    }
    // 80 % of a CPU, over the parent's limit. v1 refuses it: the update fails and leaves
    // the limit the sandbox had, not none. v2 takes it (the parent's limit caps it).
    let claim = pool.claim("sb-update", &wide).unwrap();
    let too_much = Limits {
        cpu_quota_us: Some(40_000),
        cpu_period_us: Some(50_000),
        ..Default::default()
    };
    let updated = pool.set_limits(&claim, &too_much);
    if pool.hierarchy() == &Hierarchy::V2 {
        updated.unwrap();
        assert_eq!(limits_of(&pool, &claim.dirs).1, "40000 50000");
    } else {
        assert!(updated.is_err(), "v1 took a quota over its parent's");
        assert_eq!(limits_of(&pool, &claim.dirs).1, "40000 100000");
    }
    pool.release(&claim).unwrap();
    pool.destroy().unwrap();
}

#[test]
fn a_process_moves_in_and_back_out_before_release() {
    if !can_run() {
        return;
    }
    let pool = Pool::open(config("move", 1, Driver::Cgroupfs)).unwrap();
    let claim = pool.claim("sb", &Limits::default()).unwrap();
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let before = pool.cgroups_of(child.id()).unwrap();
    assert_eq!(before.len(), claim.dirs.len());
    assert!(
        before.iter().all(|d| d.join("cgroup.procs").exists()),
        "{before:?}"
    );
    pool.add_process(&claim, child.id()).unwrap();
    assert_eq!(pool.cgroups_of(child.id()).unwrap(), claim.dirs);
    pool.move_back(child.id(), &before).unwrap();
    assert_eq!(pool.cgroups_of(child.id()).unwrap(), before);
    // Out again, the cgroup is empty and goes back to the pool while the process lives on.
    pool.release(&claim).unwrap();
    assert_eq!(pool.free_count(), 1);
    child.kill().unwrap();
    child.wait().unwrap();
    pool.destroy().unwrap();
}

#[test]
fn a_busy_cgroup_is_not_released_and_processes_move_in() {
    if !can_run() {
        return;
    }
    let pool = Pool::open(config("busy", 1, Driver::Cgroupfs)).unwrap();
    let claim = pool.claim("sb", &Limits::default()).unwrap();
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    pool.add_process(&claim, child.id()).unwrap();
    let procs = std::fs::read_to_string(claim.dirs[0].join("cgroup.procs")).unwrap();
    assert!(procs.contains(&child.id().to_string()));
    let e = pool.release(&claim).unwrap_err();
    assert!(matches!(e, PoolError::Busy { .. }), "{e}");
    assert_eq!(pool.free_count(), 0, "a busy cgroup stays claimed");
    child.kill().unwrap();
    child.wait().unwrap();
    // The process is gone; the claim can be released.
    pool.release(&claim).unwrap();
    pool.destroy().unwrap();
}

#[test]
fn claims_of_a_crashed_shim_are_recovered() {
    if !can_run() {
        return;
    }
    let cfg = config("crash", 3, Driver::Cgroupfs);
    let pool = Pool::open(cfg.clone()).unwrap();
    let live = pool.claim("alive", &Limits::default()).unwrap();
    // Claims made by processes that have since died (crashed shims): one reaped, one a
    // zombie nobody has waited for yet. Their claim files are written as they would have.
    let dead_pid = dead_pid();
    let mut zombie = std::process::Command::new("true").spawn().unwrap();
    let zombie_pid = zombie.id();
    while !std::fs::read_to_string(format!("/proc/{zombie_pid}/stat"))
        .unwrap()
        .contains(") Z ")
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let others: Vec<usize> = (0..3).filter(|s| *s != live.slot).collect();
    for (slot, pid) in others.iter().zip([dead_pid, zombie_pid]) {
        std::fs::write(
            cfg.state_dir.join(format!("slot-{slot:04}.claim")),
            format!("{pid} crashed\n"),
        )
        .unwrap();
    }
    assert_eq!(pool.free_count(), 0);
    drop(pool);
    // Opening the pool (each shim does, at every start) leaves claims alone.
    let pool = Pool::open(cfg.clone()).unwrap();
    assert_eq!(pool.free_count(), 0, "opening the pool released claims");
    // A claim that finds the pool full releases the dead claims and takes one of them.
    let taken = pool.claim("after-crash", &Limits::default()).unwrap();
    assert_ne!(taken.slot, live.slot);
    assert_eq!(pool.free_count(), 1, "one dead claim released, one taken");
    pool.release(&taken).unwrap();
    // What containerd's `shim delete` for a dead shim runs.
    std::fs::write(
        cfg.state_dir.join(format!("slot-{:04}.claim", taken.slot)),
        format!("{dead_pid} crashed\n"),
    )
    .unwrap();
    assert_eq!(pool.free_count(), 1);
    pool.recover().unwrap();
    assert_eq!(
        pool.free_count(),
        2,
        "the dead claims were released, the live one kept"
    );
    zombie.wait().unwrap();
    pool.release(&live).unwrap();
    pool.destroy().unwrap();
}

#[test]
fn bad_input_is_refused_without_claiming() {
    if !can_run() {
        return;
    }
    let pool = Pool::open(config("bad", 1, Driver::Cgroupfs)).unwrap();
    let e = pool
        .claim(
            "sb",
            &Limits {
                memory_max: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(matches!(e, PoolError::BelowOverhead { .. }), "{e}");
    assert!(e.to_string().contains("overhead"));
    assert!(matches!(
        pool.claim("two words", &Limits::default()),
        Err(PoolError::InvalidId(_))
    ));
    assert_eq!(pool.free_count(), 1, "failed claims leave the slot free");
    pool.destroy().unwrap();

    let mut cfg = config("noroot", 1, Driver::Cgroupfs);
    cfg.root = PathBuf::from("/nonexistent/cgroup");
    let e = Pool::open(cfg).err().unwrap();
    assert!(e.to_string().contains("/nonexistent/cgroup"), "{e}");
}

#[test]
fn pools_opened_and_claimed_side_by_side() {
    if !can_run() {
        return;
    }
    // A start storm: shims open a pool that does not exist yet and claim from it at once.
    let cfg = config("storm", 8, Driver::Cgroupfs);
    let limits = Limits {
        memory_max: Some(64 << 20),
        ..Default::default()
    };
    let claims: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (cfg, limits) = (cfg.clone(), limits.clone());
                s.spawn(move || {
                    let pool = Pool::open(cfg).expect("open side by side");
                    pool.claim(&format!("sb-{i}"), &limits).expect("claim")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut slots: Vec<_> = claims.iter().map(|c| c.slot).collect();
    slots.sort();
    slots.dedup();
    assert_eq!(slots.len(), 8, "two sandboxes got the same slot");
    let pool = Pool::open(cfg.clone()).unwrap();
    assert_eq!(pool.free_count(), 0);
    for c in &claims {
        pool.release(c).unwrap();
    }
    assert_eq!(pool.free_count(), 8);
    let pending: Vec<_> = std::fs::read_dir(&cfg.state_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with(".pending"))
        .collect();
    assert!(pending.is_empty(), "claims left {pending:?} behind");
    pool.destroy().unwrap();
}

#[test]
fn a_slot_removed_by_hand_is_made_again_by_the_claim_that_meets_it() {
    if !can_run() {
        return;
    }
    let cfg = config("repair", 3, Driver::Cgroupfs);
    let pool = Pool::open(cfg.clone()).unwrap();
    let first = pool.claim("first", &Limits::default()).unwrap();
    pool.release(&first).unwrap();
    // An admin removes every slot but the last: the pool still reads as created.
    let removed: Vec<PathBuf> = [0, 1]
        .into_iter()
        .flat_map(|s| {
            first
                .dirs
                .iter()
                .map(move |d| d.with_file_name(format!("slot-{s:04}")))
        })
        .collect();
    for d in &removed {
        std::fs::remove_dir(d).unwrap();
    }
    drop(pool);
    let pool = Pool::open(cfg.clone()).unwrap();
    let limits = Limits {
        memory_max: Some(64 << 20),
        ..Default::default()
    };
    let claims: Vec<_> = (0..3)
        .map(|i| pool.claim(&format!("sb-{i}"), &limits).expect("claim"))
        .collect();
    for c in &claims {
        let file = memory_file(&pool, &c.dirs);
        let v: u64 = std::fs::read_to_string(&file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(v, 64 << 20, "{} holds no limit", file.display());
        pool.release(c).unwrap();
    }
    // A dead claimer's pending claim content goes with the next recovery.
    let dead_pid = dead_pid();
    let stale = cfg.state_dir.join(format!(".pending-{dead_pid}-0"));
    std::fs::write(&stale, format!("{dead_pid} crashed\n")).unwrap();
    pool.recover().unwrap();
    assert!(!stale.exists(), "a dead shim's pending claim was left");
    pool.destroy().unwrap();
}

#[test]
fn a_destroyed_pool_is_created_again_when_opened() {
    if !can_run() {
        return;
    }
    // Opening skips creation while the last slot exists: after a destroy it must not.
    let cfg = config("again", 4, Driver::Cgroupfs);
    let pool = Pool::open(cfg.clone()).unwrap();
    let claim = pool.claim("first", &Limits::default()).unwrap();
    assert!(claim.dirs.iter().all(|d| d.is_dir()));
    pool.release(&claim).unwrap();
    pool.destroy().unwrap();
    let pool = Pool::open(cfg).unwrap();
    for i in 0..4 {
        let claim = pool.claim(&format!("sb-{i}"), &Limits::default()).unwrap();
        assert!(
            claim.dirs.iter().all(|d| d.is_dir()),
            "slot {} was not created again",
            claim.slot
        );
    }
    assert_eq!(pool.free_count(), 0);
    pool.destroy().unwrap();
}

/// The `pids.max` file of a claim (on v1, in the pids hierarchy).
fn pids_file(pool: &Pool, dirs: &[PathBuf]) -> PathBuf {
    match pool.hierarchy() {
        Hierarchy::V2 => dirs[0].join("pids.max"),
        Hierarchy::V1 { controllers } => {
            dirs[controllers.iter().position(|c| *c == "pids").unwrap()].join("pids.max")
        }
    }
}

/// Most children `fork_until_refused` makes: what a test without a working limit forks.
const FORK_CAP: usize = 64;
/// The forking process's exit codes other than a count of children.
const NO_GO: i32 = 100;
const NEVER_REFUSED: i32 = 101;
const OTHER_ERRNO: i32 = 102;

/// A forked process; dropped, it is killed and reaped, so that a failing test leaves none.
struct Forked(Option<nix::unistd::Pid>);

impl Forked {
    /// Waits for the process and returns its exit code.
    fn exit_code(&mut self) -> i32 {
        let pid = self.0.take().expect("waited for twice");
        match nix::sys::wait::waitpid(pid, None).unwrap() {
            nix::sys::wait::WaitStatus::Exited(_, code) => code,
            other => panic!("the forking process ended with {other:?}"),
        }
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
        }
    }
}

/// A pool destroyed when dropped, a failing test's too: once the processes left in `dirs`
/// have exited (a killed forker's children exit when their pipe closes), its cgroups and
/// state directory are removed.
struct PoolGuard {
    pool: Option<Pool>,
    state_dir: PathBuf,
    dirs: Vec<PathBuf>,
}

impl Drop for PoolGuard {
    fn drop(&mut self) {
        let Some(pool) = self.pool.take() else {
            return;
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let busy = |dirs: &[PathBuf]| {
            dirs.iter().any(|d| {
                std::fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
            })
        };
        while busy(&self.dirs) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = pool.destroy();
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// Forks a process and moves it into `claim`'s cgroups; let go, it forks children (each
/// waits, doing nothing) until a fork fails or it has made [`FORK_CAP`], then kills and
/// reaps them and exits with how many it made if the fork failed with EAGAIN (the kernel's
/// answer at `pids.max`), or with one of the codes above.
fn fork_until_refused(pool: &Pool, claim: &Claim) -> i32 {
    use std::os::fd::AsRawFd;
    let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    // SAFETY: the test binary has other threads; the child makes only async-signal-safe
    // calls before it exits (see below), which is what a forked copy of such a process may.
    let forked = unsafe { nix::unistd::fork() }.unwrap();
    let child = match forked {
        // SAFETY: async-signal-safe calls only (read, close, pipe2, fork, kill, waitpid,
        // _exit), on descriptors this process holds and buffers on its own stack; the block
        // ends in _exit and never returns into the test harness.
        nix::unistd::ForkResult::Child => unsafe {
            libc::close(go_w.as_raw_fd());
            let mut byte = 0u8;
            if libc::read(go_r.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) != 1 {
                // The parent dropped the pipe without letting go: it failed.
                libc::_exit(NO_GO);
            }
            // The children block reading `hold` until its write end closes: when this
            // process exits, however it does, they do too.
            let mut hold = [0; 2];
            if libc::pipe2(hold.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
                libc::_exit(OTHER_ERRNO);
            }
            let mut pids = [0 as libc::pid_t; FORK_CAP];
            let mut made = 0;
            let code = loop {
                if made == FORK_CAP {
                    break NEVER_REFUSED;
                }
                match libc::fork() {
                    0 => {
                        libc::close(hold[1]);
                        libc::read(hold[0], (&mut byte as *mut u8).cast(), 1);
                        libc::_exit(0);
                    }
                    -1 => {
                        break match *libc::__errno_location() {
                            libc::EAGAIN => made as i32,
                            _ => OTHER_ERRNO,
                        };
                    }
                    pid => {
                        pids[made] = pid;
                        made += 1;
                    }
                }
            };
            for &pid in &pids[..made] {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            libc::_exit(code)
        },
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop(go_r);
    let mut forked = Forked(Some(child));
    pool.add_process(claim, child.as_raw() as u32).unwrap();
    nix::unistd::write(&go_w, b"g").unwrap();
    forked.exit_code()
}

#[test]
fn a_claims_pids_limit_holds_its_processes_and_a_reused_slot_gets_its_own() {
    if !can_run() {
        return;
    }
    let cfg = config("pids", 1, Driver::Cgroupfs);
    let mut guard = PoolGuard {
        pool: Some(Pool::open(cfg.clone()).unwrap()),
        state_dir: cfg.state_dir.clone(),
        dirs: Vec::new(),
    };
    // One slot, claimed in turn with a small limit, a larger one and the small one again:
    // each claim holds exactly its own limit, not what the slot had.
    for (round, n) in [8u64, 12, 8].into_iter().enumerate() {
        let pool = guard.pool.as_ref().unwrap();
        let limits = Limits {
            pids_max: Some(n),
            ..Default::default()
        };
        let claim = pool.claim(&format!("sb-{round}"), &limits).unwrap();
        guard.dirs = claim.dirs.clone();
        let written = std::fs::read_to_string(pids_file(pool, &claim.dirs)).unwrap();
        assert_eq!(written.trim(), n.to_string(), "round {round}");
        // The forking process is one of the N tasks: it may make N - 1 children.
        let made = fork_until_refused(pool, &claim);
        assert_eq!(
            made,
            n as i32 - 1,
            "round {round}: pids.max {n}, children made (or code {NO_GO}: no go, \
             {NEVER_REFUSED}: never refused, {OTHER_ERRNO}: refused otherwise)"
        );
        // Everything the test started is gone: the slot goes back to the pool.
        pool.release(&claim).unwrap();
    }
    // And a claim with no limit leaves the slot unlimited.
    let pool = guard.pool.as_ref().unwrap();
    let claim = pool.claim("sb-unlimited", &Limits::default()).unwrap();
    let written = std::fs::read_to_string(pids_file(pool, &claim.dirs)).unwrap();
    assert_eq!(written.trim(), "max");
    pool.release(&claim).unwrap();
}
