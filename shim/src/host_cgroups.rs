//! Host cgroups for sandboxes, from a pool.
//!
//! Creating and removing cgroups serializes in the kernel, so under a start storm mkdir/rmdir
//! per sandbox becomes the bottleneck. The pool creates its cgroups once; a sandbox *claims*
//! a free one (writing those of its limits the slot does not already have) and *releases* it
//! when done (the limits stay for the next claim to compare with). Claims are files
//! in a state directory holding the claimer's pid and the sandbox id, linked into place whole
//! (the link fails if the claim exists): claiming is atomic across processes (one shim per
//! sandbox). After a crash a claim whose process is gone is released by `recover`:
//! containerd's `shim delete` for the dead shim runs it, and so does a claim that finds
//! every slot taken.
//!
//! Every shim opens the pool in its own process, so opening is kept to a few stats: the
//! slots are created (and, on v2, the controllers delegated) only while the pool's last
//! slot does not exist yet, and dead claims are not looked for on the way. Both used to be
//! done on every open, which under a storm made each start walk the whole pool, partly
//! under the pool's lock (see docs/benchmarks.md, "Start storms"). A slot found missing when a claim
//! writes its limits (removed by hand, or v2 controllers no longer delegated) makes the
//! claim create the pool's missing parts once and try again.
//!
//! Works on cgroup v2 and on v1 (one directory per controller hierarchy), with cgroupfs or
//! systemd naming. Written against the cgroup files directly: the few files the pool touches
//! did not justify cgroups-rs and its systemd/D-Bus dependencies.
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Errors naming the cgroup, file or limit that was wrong.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{0} is not a cgroup v1 or v2 mount")]
    NoCgroupFs(PathBuf),
    #[error("cannot create or use the pool's parent cgroup {path}: {cause}")]
    Parent {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot use the pool state directory {path}: {cause}")]
    State {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("all {size} pooled cgroups are claimed")]
    Exhausted { size: usize },
    #[error("memory limit {limit} bytes is below the sandbox overhead of {overhead} bytes")]
    BelowOverhead { limit: u64, overhead: u64 },
    #[error("cgroup {path} still has processes; kill them before releasing it")]
    Busy { path: PathBuf },
    #[error("cannot write {value} to {path}: {cause}")]
    Write {
        path: PathBuf,
        value: String,
        cause: std::io::Error,
    },
    #[error("invalid sandbox id {0:?}")]
    InvalidId(String),
    #[error("cannot tell which cgroups process {pid} is in: {message}")]
    ProcCgroup { pid: u32, message: String },
}

type Result<T> = std::result::Result<T, PoolError>;

/// Which cgroup layout the host has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// One unified tree.
    V2,
    /// One tree per controller; the pool uses these.
    V1 { controllers: Vec<&'static str> },
}

/// How cgroups are named (as the container runtimes' drivers do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// `<parent>/slot-0007`
    Cgroupfs,
    /// `<parent>.slice/<parent>-slot-0007.scope`
    Systemd,
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Where cgroup file systems are mounted (default /sys/fs/cgroup).
    pub root: PathBuf,
    /// Name of the parent cgroup (default `shoal`).
    pub parent: String,
    pub driver: Driver,
    /// Number of pooled cgroups.
    pub size: usize,
    /// Where claim files live (default /run/shoal/cgroup-pool).
    pub state_dir: PathBuf,
    /// The VMM's own memory beyond guest RAM; a limit below it cannot work.
    pub memory_overhead: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            root: "/sys/fs/cgroup".into(),
            parent: "shoal".into(),
            driver: Driver::Cgroupfs,
            size: 64,
            state_dir: "/run/shoal/cgroup-pool".into(),
            memory_overhead: 16 << 20,
        }
    }
}

/// Resource limits of one sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_max: Option<u64>,
    /// CPU time per period, microseconds.
    pub cpu_quota_us: Option<u64>,
    pub cpu_period_us: Option<u64>,
    /// Tasks (processes and threads) the cgroup may hold: `pids.max`, on v1 in the pids
    /// hierarchy. A fork or thread creation past it fails with EAGAIN. None: no limit.
    pub pids_max: Option<u64>,
}

/// A claimed cgroup (one directory per hierarchy).
#[derive(Debug)]
pub struct Claim {
    pub slot: usize,
    pub sandbox_id: String,
    pub dirs: Vec<PathBuf>,
    claim_file: PathBuf,
}

/// The pool.
pub struct Pool {
    cfg: PoolConfig,
    hierarchy: Hierarchy,
    /// Parent directory in each hierarchy.
    parents: Vec<PathBuf>,
}

const V1_CONTROLLERS: [&str; 4] = ["cpu", "cpuacct", "memory", "pids"];

/// Detects the cgroup layout under `root`.
pub fn detect(root: &Path) -> Result<Hierarchy> {
    if root.join("cgroup.controllers").exists() {
        return Ok(Hierarchy::V2);
    }
    let controllers: Vec<&'static str> = V1_CONTROLLERS
        .into_iter()
        .filter(|c| root.join(c).join("tasks").exists())
        .collect();
    if controllers.is_empty() {
        return Err(PoolError::NoCgroupFs(root.into()));
    }
    Ok(Hierarchy::V1 { controllers })
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|source| PoolError::Write {
        path: path.into(),
        value: value.into(),
        cause: source,
    })
}

/// Writes `value` unless the file already reads as it. Some limit writes take a lock of the
/// whole host and walk every cgroup: the CPU bandwidth ones (`cpu.max`, `cpu.cfs_*_us`) hold
/// the kernel's one bandwidth mutex while they check the whole tree of CPU cgroups, which
/// with a pool of 2048 slots made them most of a claim's time and serialized claims under a
/// storm (see docs/benchmarks.md, "Start storms"). A slot reused by a sandbox of the same size needs none.
fn write_if_changed(path: &Path, value: &str) -> Result<()> {
    match std::fs::read_to_string(path) {
        Ok(now) if reads_as(now.trim(), value) => Ok(()),
        _ => write(path, value),
    }
}

/// Whether a limit file reading `now` holds `value`. v1's "no memory limit" (-1) reads back
/// as the largest page-aligned byte count.
fn reads_as(now: &str, value: &str) -> bool {
    now == value || (value == "-1" && now.parse::<u64>().is_ok_and(|n| n >= 1 << 62))
}

/// An exclusive `flock` on `path` (created if missing), held until the value is dropped.
pub(crate) fn lock_file(path: &Path) -> std::io::Result<nix::fcntl::Flock<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e.into())
}

/// A new name `PREFIX<pid>-<n>` in `dir`, unique within this process, for a file that
/// `sweep_pid_files` removes once this process is gone.
pub(crate) fn pid_file(dir: &Path, prefix: &str) -> PathBuf {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    dir.join(format!(
        "{prefix}{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Files `PREFIX<pid>-<n>` in `dir`: removes those of processes that are gone and returns
/// how many belong to live ones.
pub(crate) fn sweep_pid_files(dir: &Path, prefix: &str) -> std::io::Result<u64> {
    let mut live = 0;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid_alive(pid) {
            live += 1;
        } else {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(live)
}

/// Name prefix of a claim's content before it is linked to a slot's claim file.
const PENDING: &str = ".pending-";

/// Slots a claim tries at random before it lists the state directory.
const RANDOM_PROBES: usize = 8;

/// Slot picks for one claim: not for cryptography, only to keep shims that start side by
/// side apart. Seeded from std's per-process random hash keys and a per-claim counter.
struct Random(u64);

impl Random {
    fn new() -> Random {
        use std::hash::{BuildHasher, Hasher};
        static CLAIMS: AtomicUsize = AtomicUsize::new(0);
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(CLAIMS.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        Random(h.finish())
    }

    /// The next pick in `0..n` (splitmix64).
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

/// Whether `pid` is a live process (a zombie is not: it holds no cgroup any more).
fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state letter follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

impl Pool {
    /// Opens the pool, creating it unless its last slot exists. Claims left by dead processes
    /// are not looked at here: `recover` releases them.
    pub fn open(cfg: PoolConfig) -> Result<Pool> {
        let hierarchy = detect(&cfg.root)?;
        let parent_name = match cfg.driver {
            Driver::Cgroupfs => cfg.parent.clone(),
            Driver::Systemd => format!("{}.slice", cfg.parent),
        };
        let parents: Vec<PathBuf> = match &hierarchy {
            Hierarchy::V2 => vec![cfg.root.join(&parent_name)],
            Hierarchy::V1 { controllers } => controllers
                .iter()
                .map(|c| cfg.root.join(c).join(&parent_name))
                .collect(),
        };
        std::fs::create_dir_all(&cfg.state_dir).map_err(|source| PoolError::State {
            path: cfg.state_dir.clone(),
            cause: source,
        })?;
        let pool = Pool {
            cfg,
            hierarchy,
            parents,
        };
        if !pool.created() {
            pool.create()?;
        }
        Ok(pool)
    }

    /// Whether the pool's cgroups all exist. Slots are created in order by whoever creates
    /// them, so the last slot existing means some opener created them all.
    fn created(&self) -> bool {
        match self.cfg.size.checked_sub(1) {
            Some(last) => self.slot_dirs(last).iter().all(|d| d.is_dir()),
            None => self.parents.iter().all(|d| d.is_dir()),
        }
    }

    /// Creates the parents (on v2 delegating the controllers the limits need) and the slots.
    fn create(&self) -> Result<()> {
        for p in &self.parents {
            std::fs::create_dir_all(p).map_err(|source| PoolError::Parent {
                path: p.clone(),
                cause: source,
            })?;
        }
        if self.hierarchy == Hierarchy::V2 {
            // Delegate the controllers the limits need, down to the pooled cgroups.
            for dir in [self.cfg.root.clone(), self.parents[0].clone()] {
                let file = dir.join("cgroup.subtree_control");
                std::fs::write(&file, "+cpu +memory +pids").map_err(|source| {
                    PoolError::Parent {
                        path: file,
                        cause: source,
                    }
                })?;
            }
        }
        for slot in 0..self.cfg.size {
            for dir in self.slot_dirs(slot) {
                // Shims starting side by side may create the same slot: that is fine.
                match std::fs::create_dir(&dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                        return Err(PoolError::Parent {
                            path: dir.clone(),
                            cause: e,
                        });
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    fn slot_name(&self, slot: usize) -> String {
        match self.cfg.driver {
            Driver::Cgroupfs => format!("slot-{slot:04}"),
            Driver::Systemd => format!("{}-slot-{slot:04}.scope", self.cfg.parent),
        }
    }

    fn slot_dirs(&self, slot: usize) -> Vec<PathBuf> {
        let name = self.slot_name(slot);
        self.parents.iter().map(|p| p.join(&name)).collect()
    }

    fn claim_file(&self, slot: usize) -> PathBuf {
        self.cfg
            .state_dir
            .join(format!("{}.claim", self.slot_name(slot)))
    }

    /// Serializes recoveries: two of them must not both release one dead claim (the second
    /// could remove the claim a live shim made in between).
    fn lock(&self) -> Result<nix::fcntl::Flock<File>> {
        let path = self.cfg.state_dir.join(".lock");
        lock_file(&path).map_err(|source| PoolError::State {
            path,
            cause: source,
        })
    }

    /// Releases claims whose owning process has exited (a crashed shim).
    pub fn recover(&self) -> Result<()> {
        let _lock = self.lock()?;
        self.recover_locked()
    }

    /// `recover`, with the pool's lock held by the caller.
    fn recover_locked(&self) -> Result<()> {
        // Claim contents a shim died before linking: `.pending-PID-N`.
        let _ = sweep_pid_files(&self.cfg.state_dir, PENDING);
        for slot in 0..self.cfg.size {
            let file = self.claim_file(slot);
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            let pid: i32 = text
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if !pid_alive(pid) {
                tracing::info!(
                    slot,
                    "releasing a cgroup left claimed by exited process {pid}"
                );
                let _ = std::fs::remove_file(&file);
            }
        }
        Ok(())
    }

    /// Number of slots nobody claims.
    pub fn free_count(&self) -> usize {
        (0..self.cfg.size)
            .filter(|s| !self.claim_file(*s).exists())
            .count()
    }

    /// Claims a free cgroup for `sandbox_id` and writes `limits` to it.
    pub fn claim(&self, sandbox_id: &str, limits: &Limits) -> Result<Claim> {
        if sandbox_id.is_empty()
            || sandbox_id.len() > 128
            || sandbox_id.contains(char::is_whitespace)
        {
            return Err(PoolError::InvalidId(sandbox_id.into()));
        }
        if let Some(limit) = limits.memory_max {
            if limit < self.cfg.memory_overhead {
                return Err(PoolError::BelowOverhead {
                    limit,
                    overhead: self.cfg.memory_overhead,
                });
            }
        }
        // The claim's content is written first and linked to a slot's claim name, which
        // fails if the name exists: no claim file is ever seen half written, so taking a
        // slot needs no lock (only recovery, which removes other processes' claims, holds
        // it, so that two recoveries cannot both act on one claim).
        let pending = pid_file(&self.cfg.state_dir, PENDING);
        if let Err(source) =
            std::fs::write(&pending, format!("{} {sandbox_id}\n", std::process::id()))
        {
            let _ = std::fs::remove_file(&pending);
            return Err(PoolError::State {
                path: pending,
                cause: source,
            });
        }
        let taken = self.find_free_slot(&pending);
        let _ = std::fs::remove_file(&pending);
        let slot = taken?;
        let claim = Claim {
            slot,
            sandbox_id: sandbox_id.into(),
            dirs: self.slot_dirs(slot),
            claim_file: self.claim_file(slot),
        };
        let mut applied = self.apply(&claim, limits);
        if matches!(&applied, Err(PoolError::Write { cause: source, .. }) if source.kind() == std::io::ErrorKind::NotFound)
        {
            // The slot, or on v2 a controller's files, went missing after the pool was
            // made: make what is missing again, once.
            tracing::warn!(
                "{}: recreating the pool's missing cgroups",
                applied.unwrap_err()
            );
            applied = self.create().and_then(|()| self.apply(&claim, limits));
        }
        if let Err(e) = applied {
            let _ = std::fs::remove_file(&claim.claim_file);
            return Err(e);
        }
        Ok(claim)
    }

    /// Links `pending` to the claim name of a free slot and returns the slot.
    ///
    /// First a few slots picked at random are tried: linking to a taken slot fails at once,
    /// so in a pool up to about three quarters full a claim makes a handful of links and
    /// never reads the state directory, whose listing costs in proportion to the pool
    /// (with 2048 slots it was most of a claim's time, and what kept claims from scaling
    /// with cores; see docs/benchmarks.md, "Start storms"). Random picks spread shims that start side
    /// by side over the pool instead of sending them all to the same slot. Failing that,
    /// the slots with a claim are known from one listing and the others are tried in turn
    /// from a random one. A full pool is recovered once (it may hold claims of shims that
    /// died) and tried again.
    fn find_free_slot(&self, pending: &Path) -> Result<usize> {
        let size = self.cfg.size.max(1);
        let state_err = |source| PoolError::State {
            path: self.cfg.state_dir.clone(),
            cause: source,
        };
        // Ok(false): another claim holds the slot (or took it since the listing).
        let take = |slot: usize| match std::fs::hard_link(pending, self.claim_file(slot)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(state_err(e)),
        };
        let mut random = Random::new();
        for _ in 0..RANDOM_PROBES.min(self.cfg.size) {
            let slot = random.below(size);
            if take(slot)? {
                return Ok(slot);
            }
        }
        for attempt in 0..2 {
            if attempt == 1 {
                let _lock = self.lock()?;
                self.recover_locked()?;
            }
            let claimed: std::collections::HashSet<std::ffi::OsString> =
                std::fs::read_dir(&self.cfg.state_dir)
                    .map_err(state_err)?
                    .filter_map(|e| e.ok().map(|e| e.file_name()))
                    .collect();
            let start = random.below(size);
            for slot in (0..self.cfg.size).map(|i| (start + i) % size) {
                let file = self.claim_file(slot);
                if file.file_name().is_some_and(|n| claimed.contains(n)) {
                    continue;
                }
                if take(slot)? {
                    return Ok(slot);
                }
            }
        }
        Err(PoolError::Exhausted {
            size: self.cfg.size,
        })
    }

    /// The (file, value) writes for `limits` in this hierarchy, one batch per directory.
    fn writes(&self, limits: &Limits) -> Vec<(&'static str, &'static str, String)> {
        let mut w = Vec::new();
        let v2 = self.hierarchy == Hierarchy::V2;
        let mem = limits.memory_max.map(|m| m.to_string());
        let pids = limits
            .pids_max
            .map(|p| p.to_string())
            .unwrap_or_else(|| "max".into());
        let period = limits.cpu_period_us.unwrap_or(100_000);
        if v2 {
            w.push(("", "memory.max", mem.unwrap_or_else(|| "max".into())));
            let quota = limits
                .cpu_quota_us
                .map(|q| q.to_string())
                .unwrap_or_else(|| "max".into());
            w.push(("", "cpu.max", format!("{quota} {period}")));
            w.push(("", "pids.max", pids));
        } else {
            w.push((
                "memory",
                "memory.limit_in_bytes",
                mem.unwrap_or_else(|| "-1".into()),
            ));
            w.push(("cpu", "cpu.cfs_period_us", period.to_string()));
            w.push((
                "cpu",
                "cpu.cfs_quota_us",
                limits
                    .cpu_quota_us
                    .map(|q| q.to_string())
                    .unwrap_or_else(|| "-1".into()),
            ));
            w.push(("pids", "pids.max", pids));
        }
        w
    }

    fn dir_for(&self, dirs: &[PathBuf], controller: &str) -> Option<PathBuf> {
        match &self.hierarchy {
            Hierarchy::V2 => dirs.first().cloned(),
            Hierarchy::V1 { controllers } => controllers
                .iter()
                .position(|c| *c == controller)
                .map(|i| dirs[i].clone()),
        }
    }

    fn apply(&self, claim: &Claim, limits: &Limits) -> Result<()> {
        let writes = self.writes(limits);
        // v1 checks each CPU bandwidth write against the other file's current value: a new
        // period under the slot's old quota can be refused when the parent has a quota of
        // its own (and is, for a moment, more CPU than either limit). So when the period
        // changes, the quota is lifted first; it is written after the period. If a write
        // then fails, the CPU limit the cgroup had is put back (an Update that fails must
        // not leave a sandbox without its quota).
        let mut lifted = None;
        if let (Hierarchy::V1 { .. }, Some(dir)) =
            (&self.hierarchy, self.dir_for(&claim.dirs, "cpu"))
        {
            let read = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap_or_default();
            let period = writes
                .iter()
                .find(|(_, file, _)| *file == "cpu.cfs_period_us");
            let old_period = read("cpu.cfs_period_us");
            if period.is_some_and(|(_, _, value)| !reads_as(old_period.trim(), value)) {
                let old_quota = read("cpu.cfs_quota_us");
                write_if_changed(&dir.join("cpu.cfs_quota_us"), "-1")?;
                lifted = Some((dir, old_period, old_quota));
            }
        }
        let written = writes
            .into_iter()
            .try_for_each(|(controller, file, value)| {
                match self.dir_for(&claim.dirs, controller) {
                    Some(dir) => write_if_changed(&dir.join(file), &value),
                    None => {
                        // A v1 host without this controller mounted: the limit cannot be
                        // held, which is worth saying when one was asked for (the CPU
                        // period alone limits nothing).
                        if !matches!(value.as_str(), "max" | "-1") && file != "cpu.cfs_period_us" {
                            tracing::warn!(
                                "no {controller} cgroup controller on this host: {file} {value} is not applied"
                            );
                        }
                        Ok(())
                    }
                }
            });
        if let (Err(_), Some((dir, period, quota))) = (&written, lifted) {
            let _ = write_if_changed(&dir.join("cpu.cfs_period_us"), period.trim());
            let _ = write_if_changed(&dir.join("cpu.cfs_quota_us"), quota.trim());
        }
        written
    }

    /// Writes new limits to a claimed cgroup (the pod's containers changed).
    pub fn set_limits(&self, claim: &Claim, limits: &Limits) -> Result<()> {
        self.apply(claim, limits)
    }

    /// Moves process `pid` (the sandbox's VMM) into the claimed cgroup.
    pub fn add_process(&self, claim: &Claim, pid: u32) -> Result<()> {
        for dir in &claim.dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The cgroups process `pid` is in now, one per directory of a claim (same order), so
    /// that it can be moved back before its claim is released.
    pub fn cgroups_of(&self, pid: u32) -> Result<Vec<PathBuf>> {
        let err = |message: String| PoolError::ProcCgroup { pid, message };
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map_err(|e| err(e.to_string()))?;
        // Lines are `ID:CONTROLLERS:PATH`; v2's is `0::PATH`.
        let path_for = |wanted: Option<&str>| {
            text.lines().find_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                let hit = match wanted {
                    None => controllers.is_empty(),
                    Some(c) => controllers.split(',').any(|x| x == c),
                };
                hit.then(|| path.trim_start_matches('/').to_string())
            })
        };
        match &self.hierarchy {
            Hierarchy::V2 => path_for(None)
                .map(|p| vec![self.cfg.root.join(p)])
                .ok_or_else(|| err("no cgroup v2 entry".into())),
            Hierarchy::V1 { controllers } => controllers
                .iter()
                .map(|c| {
                    path_for(Some(c))
                        .map(|p| self.cfg.root.join(c).join(p))
                        .ok_or_else(|| err(format!("no entry for controller {c}")))
                })
                .collect(),
        }
    }

    /// Moves process `pid` back to the cgroups `cgroups_of` named.
    pub fn move_back(&self, pid: u32, previous: &[PathBuf]) -> Result<()> {
        for dir in previous {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Returns a claimed cgroup to the pool; it must have no processes left (on `Busy` the
    /// claim stays valid: kill the processes and release again).
    pub fn release(&self, claim: &Claim) -> Result<()> {
        for dir in &claim.dirs {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            if !procs.trim().is_empty() {
                return Err(PoolError::Busy { path: dir.clone() });
            }
        }
        // The limits stay: a free slot has no processes for them to hold back, and the next
        // claim writes each limit that is not already what it asks for.
        let _ = std::fs::remove_file(&claim.claim_file);
        Ok(())
    }

    /// Removes every pooled cgroup and the parent (for uninstall and tests).
    pub fn destroy(self) -> Result<()> {
        // Last slot first: while any slot is left, the pool does not read as created.
        for slot in (0..self.cfg.size).rev() {
            let left = self
                .slot_dirs(slot)
                .iter()
                .filter(|dir| std::fs::remove_dir(dir).is_err() && dir.exists())
                .count();
            // A slot still in use keeps its claim.
            if left == 0 {
                let _ = std::fs::remove_file(self.claim_file(slot));
            }
        }
        for p in &self.parents {
            let _ = std::fs::remove_dir(p);
        }
        Ok(())
    }
}
