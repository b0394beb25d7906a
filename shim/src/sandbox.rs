//! A sandbox: one micro-VM booted in the shim's own process, its agent, and its state
//! directory (`<state_dir>/<sandbox id>/`: the virtio-fs shared tree, the hybrid-vsock socket,
//! the guest console log).
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use shoal_agent_api::agent::{CheckRequest, CreateSandboxRequest, Empty};
use shoal_agent_api::agent_ttrpc::AgentClient;
use shoal_agent_api::client::connect_agent;
use shoal_agent_api::AGENT_PORT;
use shoal_vmm::{CpuReporter, ExitReason, RingReporter, Stopper, Vm};
use tokio::sync::watch;

use crate::admission::{self, host_available_mib, AdmissionError};
use crate::agent::is_timeout;
pub use crate::agent::{broke, ctx};
use crate::config::Config;
use crate::console::last_lines;
pub use crate::console::{console_tail, CONSOLE_TAIL_LINES};
use crate::host_cgroups::{Claim, Limits, Pool, PoolError};
use crate::mounts;
use crate::network::{Connected, NetworkError, PodNetwork};
use crate::template::{self, Template, TemplateError};
pub use crate::vm_spec::{guest_container_dir, vm_config, vsock_socket, SHARE_TAG};

/// Errors starting or stopping a sandbox; each says what to look at.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("guest {what} {path} not found; set `{key}` in the shoal config (/etc/shoal/config.toml) or run scripts/install")]
    MissingArtifact {
        what: &'static str,
        key: &'static str,
        path: PathBuf,
    },
    #[error("cannot prepare the sandbox's directory: {0}")]
    Share(mounts::MountError),
    #[error("the sandbox VM failed to start: {0}")]
    Boot(shoal_vmm::Error),
    /// `console` holds the guest console's last lines: the sandbox directory, and the log
    /// with it, is gone by the time the error is reported.
    #[error("the guest agent did not answer within {secs} s: {message}; the guest console's last lines:\n{console}")]
    AgentTimeout {
        secs: u64,
        message: String,
        console: String,
    },
    #[error("the sandbox VM ended ({reason}) before its guest agent answered; the guest console's last lines:\n{console}")]
    VmEnded { reason: String, console: String },
    #[error("{0}")]
    AgentLost(String),
    #[error("the guest agent refused to set up the sandbox: {0}")]
    Agent(ttrpc::Error),
    /// The agent took the connection but did not answer `step` in time. `devices` says
    /// where each virtio device stood (`Vm::ring_report`).
    #[error("the guest agent did not answer {step} within {secs} s (the sandbox VM still runs); its devices:\n{devices}\nthe guest console's last lines:\n{console}")]
    SetupTimeout {
        step: &'static str,
        secs: u64,
        devices: String,
        console: String,
    },
    #[error("cannot give the sandbox a host cgroup (see [cgroups] in the shoal config): {0}")]
    Cgroup(PoolError),
    #[error("cannot carry the pod's network into the VM: {0}")]
    Network(NetworkError),
    #[error("cannot start the sandbox from its VM template: {0}")]
    Template(TemplateError),
    #[error(transparent)]
    Admission(#[from] AdmissionError),
}

// By hand, not `#[from]`: the messages carry the cause, so it is not also a `source()`
// (printed once, not twice, by a walk of the chain).
impl From<shoal_vmm::Error> for SandboxError {
    fn from(e: shoal_vmm::Error) -> Self {
        SandboxError::Boot(e)
    }
}

impl From<PoolError> for SandboxError {
    fn from(e: PoolError) -> Self {
        SandboxError::Cgroup(e)
    }
}

impl From<NetworkError> for SandboxError {
    fn from(e: NetworkError) -> Self {
        SandboxError::Network(e)
    }
}

impl From<TemplateError> for SandboxError {
    fn from(e: TemplateError) -> Self {
        SandboxError::Template(e)
    }
}

/// 64 random bytes from the host for the guest's random pool (none if /dev/urandom cannot
/// be read; the guest then relies on its own).
fn host_entropy() -> Vec<u8> {
    let mut bytes = vec![0u8; 64];
    match std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
    {
        Ok(()) => bytes,
        Err(e) => {
            tracing::warn!("no host entropy for the guest: {e}");
            Vec::new()
        }
    }
}

/// For agent call `call` that failed with `e`: when the connection broke (the agent died,
/// or the VM with it, or the connection was reset), a message saying so, whether the VM
/// has ended, where its devices stood (`devices`, a [`RingReporter::report`]: the vsock
/// device's part tells what happened to each connection) and the console's last lines
/// (`console`, a [`console_tail`]); None for any other error.
fn lost_agent(
    call: &str,
    e: &ttrpc::Error,
    ended: Option<&ExitReason>,
    devices: &str,
    console: &str,
) -> Option<String> {
    if !broke(e) {
        return None;
    }
    let vm = match ended {
        Some(reason) => format!("the sandbox VM has ended ({reason})"),
        None => "the sandbox VM is still running".into(),
    };
    let when = match e {
        ttrpc::Error::LocalClosed => format!("before {call} was sent"),
        e => format!("during {call} ({e})"),
    };
    Some(format!(
        "the connection to the guest agent broke {when}; {vm}; its devices:\n{devices}\nthe guest console's last lines:\n{console}"
    ))
}

/// For agent call `call` that timed out in a running VM: a message saying so, with where
/// the VM's devices and vCPUs stood (`report`, from [`vm_report`]) and the console's last
/// lines. With `record` (the state directory and the sandbox's id), a report is also left in
/// the flight recorder and the message names it.
fn stalled_agent(
    call: &str,
    report: &str,
    console: &Path,
    record: Option<(&Path, &str)>,
) -> String {
    let what = format!("the guest agent did not answer {call} within its deadline");
    let tail = console_tail(console, crate::crashes::CONSOLE_LINES);
    let kept = match record {
        None => String::new(),
        Some((state_dir, id)) => {
            let reason = format!("{what}; its devices:\n{report}");
            match crate::crashes::record(state_dir, id, &reason, &tail) {
                Ok(path) => format!(" (report {})", path.display()),
                Err(e) => format!(" (no report kept: {e})"),
            }
        }
    };
    format!(
        "{what}; the sandbox VM is still running{kept}; its devices:\n{report}\nthe guest console's last lines:\n{}",
        last_lines(&tail, CONSOLE_TAIL_LINES)
    )
}

/// Whether a VM's end with `reason` is one the shim asked for (`ending`: it had begun to end
/// the VM). The shim stops a VM, or asks its guest to power off, which the agent does by
/// rebooting (the VMM ends the VM on the guest's reset: `Reboot`). A triple fault or a VMM
/// error is a crash even while the shim was ending the VM, and the flight recorder keeps it.
fn asked_end(ending: bool, reason: &ExitReason) -> bool {
    ending
        && matches!(
            reason,
            ExitReason::Stopped | ExitReason::PowerOff | ExitReason::Reboot
        )
}

/// How long an agent call whose connection broke waits to learn whether the VM has ended.
const EXIT_KNOWN_WAIT: Duration = Duration::from_secs(2);

/// After an agent connection broke: waits up to [`EXIT_KNOWN_WAIT`] for the VM's end to
/// be known. A VM that ended broke the connection a moment before that (the VMM first takes
/// its devices down), and the error should say it ended.
async fn learn_end(exited: &VmExit) {
    let mut exited = exited.clone();
    let known = exited.wait_for(Option::is_some);
    let _ = tokio::time::timeout(EXIT_KNOWN_WAIT, known).await;
}

/// A sandbox VM that ended without the shim asking: a report in the flight recorder
/// ([`crate::crashes`]) and a log line naming it, with the console's last lines.
fn record_crash(state_dir: &Path, id: &str, reason: &ExitReason, console: &Path) {
    let tail = console_tail(console, crate::crashes::CONSOLE_LINES);
    let kept = match crate::crashes::record(state_dir, id, &reason.to_string(), &tail) {
        Ok(path) => format!("report {}", path.display()),
        Err(e) => format!("no report kept ({e})"),
    };
    let last = last_lines(&tail, CONSOLE_TAIL_LINES);
    tracing::warn!(
        "sandbox {id}: the VM ended unasked: {reason}; {kept}; the guest console's last lines:\n{last}"
    );
}

/// A sandbox whose guest agent never got ready (it did not answer, or its connection
/// broke): a report in the flight recorder, as for a crash, kept before the VM is stopped
/// and its directory, console log included, removed. `what` says what failed, `devices`
/// where the VM's devices stood ([`RingReporter::report`]), `tail` the console's last
/// [`crate::crashes::CONSOLE_LINES`] lines ([`console_tail`]).
fn record_failed_start(state_dir: &Path, id: &str, what: &str, devices: &str, tail: &str) {
    let reason = format!("the sandbox did not start: {what}; its devices:\n{devices}");
    match crate::crashes::record(state_dir, id, &reason, tail) {
        Ok(path) => tracing::warn!("sandbox {id}: {what}; report {}", path.display()),
        Err(e) => tracing::warn!("sandbox {id}: {what}; no report kept ({e})"),
    }
}

/// Where the VM's devices ([`RingReporter`]) and vCPUs ([`CpuReporter`]: running or
/// halted, where, and their timers) stand, for a report on a guest that stopped answering.
async fn vm_report(rings: &RingReporter, cpus: &CpuReporter) -> String {
    let cpus = cpus.clone();
    let cpu = tokio::task::spawn_blocking(move || cpus.report(Duration::from_secs(10)))
        .await
        .unwrap_or_else(|e| format!("vCPUs: (no report: {e})"));
    format!("{}\n{cpu}", rings.report())
}

/// A sandbox's host cgroup, claimed from the pool with the shim (and so the VM's threads and
/// guest RAM) moved into it. Dropping it moves the shim back where it came from and returns
/// the cgroup to the pool, on every path: setup failure, shutdown, or the shim exiting.
pub struct HostCgroup {
    pool: Pool,
    claim: Claim,
    previous: Vec<PathBuf>,
    limits: Limits,
}

impl HostCgroup {
    /// Claims a cgroup for sandbox `id` with `limits` and moves this process into it.
    pub fn enter(id: &str, config: &Config, limits: &Limits) -> Result<HostCgroup, PoolError> {
        let pool = Pool::open(config.cgroups.pool_config())?;
        let pid = std::process::id();
        let previous = pool.cgroups_of(pid)?;
        let claim = pool.claim(id, limits)?;
        let cgroup = HostCgroup {
            pool,
            claim,
            previous,
            limits: limits.clone(),
        };
        // On error the drop returns the claim.
        cgroup.pool.add_process(&cgroup.claim, pid)?;
        tracing::info!(
            "sandbox {id}: host cgroup {}",
            cgroup.claim.dirs[0].display()
        );
        Ok(cgroup)
    }

    /// The claimed cgroup's directories (one per hierarchy).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.claim.dirs
    }

    /// Sets the cgroup's CPU quota (microseconds per 100 ms; None: unlimited).
    fn set_cpu_quota(&mut self, quota_us: Option<u64>) -> Result<(), PoolError> {
        let mut limits = self.limits.clone();
        limits.cpu_quota_us = quota_us;
        limits.cpu_period_us = Some(CPU_PERIOD_US);
        if limits == self.limits {
            return Ok(());
        }
        // Kept only once written, so that a failed write is tried again next time.
        self.pool.set_limits(&self.claim, &limits)?;
        self.limits = limits;
        Ok(())
    }
}

/// The period a pod's summed CPU quota is expressed in.
const CPU_PERIOD_US: u64 = 100_000;

/// A container's CPU quota per [`CPU_PERIOD_US`] (None: no quota).
pub fn quota_per_period(quota_us: Option<u64>, period_us: Option<u64>) -> Option<u64> {
    let quota = quota_us.filter(|q| *q > 0)?;
    let period = period_us.filter(|p| *p > 0).unwrap_or(CPU_PERIOD_US);
    // The kernel refuses quotas under 1 ms.
    Some((quota as u128 * CPU_PERIOD_US as u128 / period as u128).max(1000) as u64)
}

/// The pod's CPU quota from its containers' (`first` is the container the sandbox started
/// with): the sum of their quotas, or unlimited when a container has none. The first
/// container without a quota is a pod's sandbox (pause) container once others exist, and
/// then does not count, as in Kubernetes; alone, it is the workload and leaves the pod
/// unlimited.
pub fn pod_cpu_quota(first: &str, containers: &HashMap<String, Option<u64>>) -> Option<u64> {
    let alone = containers.keys().all(|id| id == first);
    let mut sum = 0u64;
    for (id, quota) in containers {
        match quota {
            Some(q) => sum = sum.saturating_add(*q),
            None if id == first && !alone => {}
            None => return None,
        }
    }
    (sum > 0).then_some(sum)
}

impl Drop for HostCgroup {
    fn drop(&mut self) {
        let pid = std::process::id();
        if let Err(e) = self.pool.move_back(pid, &self.previous) {
            tracing::warn!("cannot move the shim out of its sandbox cgroup: {e}");
        }
        if let Err(e) = self.pool.release(&self.claim) {
            // Recovered once this process has exited: by `shim delete` if it dies, or by a
            // claim that finds the pool full.
            tracing::warn!("cannot release the sandbox cgroup now: {e}");
        }
    }
}

/// Host limits of a sandbox: its VM's RAM plus the configured overhead, the container's
/// CPU quota if it has one, and `limits.pids_max` tasks (the shim's and VMM's threads, and
/// anything they start: what a guest could make the host create is bounded here).
pub fn host_limits(
    config: &Config,
    cpu_quota_us: Option<u64>,
    cpu_period_us: Option<u64>,
) -> Limits {
    Limits {
        // Both are bounded by the config's checks (1 TiB each); saturating all the same.
        memory_max: Some(
            config
                .memory_mib
                .saturating_add(config.cgroups.overhead_mib)
                .saturating_mul(1 << 20),
        ),
        cpu_quota_us,
        cpu_period_us,
        pids_max: Some(config.limits.pids_max),
    }
}

/// How the VM ended, once it has.
pub type VmExit = watch::Receiver<Option<ExitReason>>;

pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    /// Held until the sandbox is gone: a sweep takes the directory only once this shim is
    /// dead ([`crate::sweep`]).
    _owner: mounts::Owner,
    pub shared: PathBuf,
    pub uds: PathBuf,
    pub agent: AgentClient,
    /// Set before the shim ends the VM: an end without it is a crash, recorded.
    ending: Arc<AtomicBool>,
    stopper: Stopper,
    vm_thread: Mutex<Option<JoinHandle<()>>>,
    cgroup: Mutex<Option<HostCgroup>>,
    /// Each container's CPU quota per 100 ms, which size the host cgroup together.
    cpu_quotas: Mutex<HashMap<String, Option<u64>>>,
    network: Mutex<Option<Connected>>,
    pub exited: VmExit,
    /// Where the VM's devices stand, for an error on a broken agent connection.
    rings: RingReporter,
    /// Where the VM's vCPUs stand, for an error on an agent call that timed out.
    cpus: CpuReporter,
    /// Set once a timed-out agent call has read the vCPUs and left a report in the flight
    /// recorder: once per sandbox, so that a guest that never answers cannot push other
    /// sandboxes' reports out nor have its vCPUs paused on every call.
    stall_recorded: AtomicBool,
}

/// CLOCK_BOOTTIME in milliseconds: one clock for the shim's phase marks and for benchmarks
/// that compare them with their own.
pub fn boottime_ms() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as f64 * 1e3 + t.tv_nsec() as f64 / 1e6)
        .unwrap_or(0.0)
}

/// The id this shim serves (containerd's `-id`), set once at start-up; phase marks carry it
/// so that marks of concurrent sandboxes can be told apart.
pub static SHIM_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Logs one start-up phase mark (`benches/ctr_run.rs` and `benches/storm.rs` read them from
/// containerd's log): `shoal-phase NAME sandbox=ID boottime_ms=T`.
pub fn mark(phase: &str) {
    mark_at(phase, boottime_ms());
}

/// A phase mark at `ms` (CLOCK_BOOTTIME milliseconds).
pub fn mark_at(phase: &str, ms: f64) {
    let id = SHIM_ID.get().map(String::as_str).unwrap_or("-");
    tracing::info!("shoal-phase {phase} sandbox={id} boottime_ms={ms:.1}");
}

impl Sandbox {
    /// Boots the VM for sandbox `id` (in a host cgroup with `limits` when the config enables
    /// them, with the pod's network when given) and waits for its agent.
    pub async fn start(
        id: &str,
        hostname: &str,
        config: &Config,
        limits: &Limits,
        network: Option<PodNetwork>,
    ) -> Result<Sandbox, SandboxError> {
        for (what, key, path) in [
            ("kernel", "kernel", &config.kernel),
            ("image", "initrd", &config.initrd),
        ] {
            if !path.is_file() {
                return Err(SandboxError::MissingArtifact {
                    what,
                    key,
                    path: path.clone(),
                });
            }
        }
        // Admission: a storm beyond what the host holds gets errors, not an OOM killer.
        // Held until this start returns (its memory then shows in MemAvailable).
        let _ticket = admission::admit(
            &config.cgroups.state_dir,
            config.host_reserve_mib,
            host_available_mib,
        )?;
        let (dir, owner) =
            crate::sweep::new_sandbox_dir(&config.state_dir, id).map_err(SandboxError::Share)?;
        let shared = dir.join(mounts::SHARED_DIR);
        let uds = match vsock_socket(&dir) {
            Ok(uds) => uds,
            Err(e) => {
                let _ = mounts::remove_tree(&dir);
                return Err(SandboxError::Share(mounts::MountError::Io {
                    what: "cannot make the vsock directory in",
                    path: dir.clone(),
                    cause: e,
                }));
            }
        };
        let console = dir.join("console.log");
        // Before the VM exists, so that its guest RAM is charged to the sandbox's cgroup.
        let cgroup = match config.cgroups.enabled {
            true => match HostCgroup::enter(id, config, limits) {
                Ok(c) => Some(c),
                Err(e) => {
                    let _ = mounts::remove_tree(&dir);
                    return Err(e.into());
                }
            },
            false => None,
        };
        mark("cgroup_claimed");
        let cid = template::sandbox_cid(id);
        let nets = network
            .as_ref()
            .map(PodNetwork::vm_nets)
            .unwrap_or_default();
        // A template VM has no network cards, and virtio-mmio cannot add any later: a
        // sandbox with the pod's network boots.
        let template = match (config.template, nets.is_empty()) {
            (true, true) => match Template::find(config) {
                Ok(t) => Some(t),
                Err(e) => {
                    let _ = mounts::remove_tree(&dir);
                    return Err(e.into());
                }
            },
            (true, false) => {
                tracing::info!("sandbox {id}: booting, not restoring the template: the pod has network interfaces, which templates do not carry");
                None
            }
            (false, _) => None,
        };
        let fs_root = dir.join(mounts::FS_ROOT_DIR);
        let vm_config = vm_config(config, &uds, cid, &shared, Some(&fs_root), &console, nets);
        let started = match template {
            Some(t) => {
                tracing::info!(
                    "sandbox {id}: restoring the VM template {}",
                    t.dir.display()
                );
                let restore = t.restore_config(vm_config);
                tokio::task::spawn_blocking(move || Vm::restore(&restore)).await
            }
            None => tokio::task::spawn_blocking(move || Vm::boot(&vm_config)).await,
        };
        let vm = match started.expect("VM start task") {
            Ok(vm) => vm,
            Err(e) => {
                let _ = mounts::remove_tree(&dir);
                return Err(e.into());
            }
        };
        mark("vm_created");
        let stopper = vm.stopper();
        let rings = vm.ring_reporter();
        let cpus = vm.cpu_reporter();
        let (tx, exited) = watch::channel(None);
        let ending = Arc::new(AtomicBool::new(false));
        let vm_thread = {
            let (ending, state_dir, console) =
                (ending.clone(), config.state_dir.clone(), console.clone());
            let id = id.to_string();
            std::thread::Builder::new()
                .name("shoal-vm-wait".into())
                .spawn(move || {
                    let reason = vm.wait();
                    if asked_end(ending.load(Ordering::Acquire), &reason) {
                        tracing::info!("sandbox VM ended: {reason:?}");
                    } else {
                        // Read before anything removes the sandbox's directory.
                        record_crash(&state_dir, &id, &reason, &console);
                    }
                    let _ = tx.send(Some(reason));
                })
                .expect("spawning the VM wait thread")
        };
        let mut sandbox = SandboxParts {
            ending: ending.clone(),
            stopper,
            vm_thread: Some(vm_thread),
            dir: dir.clone(),
            cgroup,
            network: None,
        };
        let (interfaces, routes) = network
            .as_ref()
            .map(PodNetwork::agent_config)
            .unwrap_or_default();
        if let Some(net) = network.clone() {
            let connected = tokio::task::spawn_blocking(move || net.connect())
                .await
                .expect("network connect task");
            match connected {
                Ok(c) => {
                    // For `shim delete`, should this shim be killed.
                    let _ = std::fs::write(dir.join(crate::network::RECORD_FILE), c.record());
                    sandbox.network = Some(c);
                }
                Err(e) => {
                    sandbox.stop();
                    return Err(e.into());
                }
            }
            mark("network_connected");
        }
        let timeout = Duration::from_secs(config.agent_timeout_secs);
        // A guest that dies while booting (kernel panic, no init) ends the wait at once.
        let mut vm_ended = exited.clone();
        let connected = tokio::select! {
            r = connect_agent(&uds, AGENT_PORT, timeout) => r.map_err(|e| e.to_string()),
            _ = vm_ended.wait_for(Option::is_some) => Err(String::new()),
        };
        let agent = match connected {
            Ok(agent) => agent,
            Err(message) => {
                // Read before stop() removes the directory the log is in.
                let ended = exited.borrow().clone();
                let report = match ended {
                    None => Some(vm_report(&rings, &cpus).await),
                    Some(_) => None,
                };
                // Read once, after the report: the flight recorder's lines and the error's.
                let tail = console_tail(&console, crate::crashes::CONSOLE_LINES);
                if let Some(report) = report {
                    let what = format!("the guest agent did not answer: {message}");
                    record_failed_start(&config.state_dir, id, &what, &report, &tail);
                }
                let console = last_lines(&tail, CONSOLE_TAIL_LINES);
                sandbox.stop();
                tracing::error!("guest agent never answered; guest console:\n{console}");
                return Err(match ended {
                    Some(reason) => SandboxError::VmEnded {
                        reason: reason.to_string(),
                        console,
                    },
                    None => SandboxError::AgentTimeout {
                        secs: config.agent_timeout_secs,
                        message,
                        console,
                    },
                });
            }
        };
        let setup = async {
            agent
                .check(ctx(timeout), &CheckRequest::new())
                .await
                .map_err(|e| ("Check", e))?;
            let req = CreateSandboxRequest {
                hostname: hostname.into(),
                sandbox_id: id.into(),
                shared_fs_tag: SHARE_TAG.into(),
                interfaces,
                routes,
                host_time_unix_ns: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0),
                entropy: host_entropy(),
                ..Default::default()
            };
            agent
                .create_sandbox(ctx(timeout), &req)
                .await
                .map_err(|e| ("CreateSandbox", e))
        };
        if let Err((step, e)) = setup.await {
            let broken = broke(&e);
            if broken {
                learn_end(&exited).await;
            }
            // Read while the VM still runs, before it is stopped.
            let running = exited.borrow().is_none();
            let report = match running && (is_timeout(&e) || broken) {
                true => Some(vm_report(&rings, &cpus).await),
                false => None,
            };
            // Read once, where the error shows it (a broken connection or a timeout, which
            // every report is for): the flight recorder's lines and the error's.
            let tail = match broken || is_timeout(&e) {
                true => console_tail(&console, crate::crashes::CONSOLE_LINES),
                false => String::new(),
            };
            if let Some(report) = &report {
                let what = format!("the guest agent's {step} failed: {e}");
                record_failed_start(&config.state_dir, id, &what, report, &tail);
            }
            // Read once: the report taken while the VM ran, or where the devices stand now.
            let devices = report.unwrap_or_else(|| rings.report());
            let console = last_lines(&tail, CONSOLE_TAIL_LINES);
            let lost = lost_agent(step, &e, exited.borrow().as_ref(), &devices, &console);
            let error = match lost {
                Some(message) => SandboxError::AgentLost(message),
                None if is_timeout(&e) => SandboxError::SetupTimeout {
                    step,
                    secs: config.agent_timeout_secs,
                    devices,
                    console,
                },
                None => SandboxError::Agent(e),
            };
            sandbox.stop();
            return Err(error);
        }
        mark("agent_ready");
        sweep_in_background(config);
        let (stopper, vm_thread, cgroup, connected) = sandbox.disarm();
        Ok(Sandbox {
            id: id.into(),
            dir,
            _owner: owner,
            shared,
            uds,
            agent,
            ending,
            stopper,
            vm_thread: Mutex::new(vm_thread),
            cgroup: Mutex::new(cgroup),
            cpu_quotas: Mutex::new(HashMap::from([(
                id.to_string(),
                quota_per_period(limits.cpu_quota_us, limits.cpu_period_us),
            )])),
            network: Mutex::new(connected),
            exited,
            rings,
            cpus,
            stall_recorded: AtomicBool::new(false),
        })
    }

    /// Records container `cid`'s CPU quota (None in `quota`: it has none; `gone`: it was
    /// deleted) and sizes the host cgroup to the pod's (see [`pod_cpu_quota`]).
    pub fn container_cpu(
        &self,
        cid: &str,
        quota: Option<u64>,
        gone: bool,
    ) -> Result<(), PoolError> {
        let pod = {
            let mut quotas = self.cpu_quotas.lock().unwrap_or_else(|e| e.into_inner());
            if gone {
                quotas.remove(cid);
            } else {
                quotas.insert(cid.to_string(), quota);
            }
            pod_cpu_quota(&self.id, &quotas)
        };
        let mut cgroup = self.cgroup.lock().unwrap_or_else(|e| e.into_inner());
        match cgroup.as_mut() {
            Some(c) => c.set_cpu_quota(pod),
            None => Ok(()),
        }
    }

    /// Whether the VM carries the pod's network namespace (its containers use the guest's
    /// network).
    pub fn carries_network(&self) -> bool {
        self.network
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Creates container `cid`'s directory in the sandbox's tree; returns it and the guest
    /// path of the same place.
    pub fn container_files(
        &self,
        cid: &str,
    ) -> Result<(mounts::ContainerFiles, String), mounts::MountError> {
        let files = mounts::ContainerFiles::create(&self.dir, cid)?;
        Ok((files, guest_container_dir(cid)))
    }

    /// Unmounts and removes container `cid`'s files.
    pub fn remove_container_files(&self, cid: &str) -> Result<(), mounts::MountError> {
        mounts::remove_container(&self.dir, cid)
    }

    /// For agent call `call` that failed: a broken connection (the guest agent died, or
    /// the VM with it) becomes an UNAVAILABLE error that says whether the VM still runs,
    /// where its devices stood and what its console last showed; a call that timed out
    /// becomes a DEADLINE_EXCEEDED error with where the VM's devices and vCPUs stood and the
    /// console's last lines, and the first such in a sandbox leaves a report in the flight
    /// recorder. Any other error is returned as it is.
    pub async fn explain_agent_error(&self, call: &str, e: ttrpc::Error) -> ttrpc::Error {
        let console = self.dir.join("console.log");
        if broke(&e) {
            learn_end(&self.exited).await;
        }
        let ended = self.exited.borrow().clone();
        if ended.is_none() && is_timeout(&e) {
            // The vCPUs are paused to read them, so only the first stall in a sandbox reads
            // them (with a report kept): a guest that never answers costs each later call
            // no more than its devices' report.
            let first = !self.stall_recorded.swap(true, Ordering::AcqRel);
            let report = match first {
                true => vm_report(&self.rings, &self.cpus).await,
                false => format!(
                    "{}\nvCPUs: read at this sandbox's first stall (its report)",
                    self.rings.report()
                ),
            };
            // The sandbox's directory is `<state_dir>/<id>`.
            let state_dir = self.dir.parent().unwrap_or(&self.dir);
            let message = stalled_agent(
                call,
                &report,
                &console,
                first.then_some((state_dir, &self.id)),
            );
            tracing::error!("sandbox {}: {message}", self.id);
            return ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::DEADLINE_EXCEEDED,
                message,
            ));
        }
        if !broke(&e) {
            return e;
        }
        let devices = self.rings.report();
        let tail = console_tail(&console, CONSOLE_TAIL_LINES);
        let Some(message) = lost_agent(call, &e, ended.as_ref(), &devices, &tail) else {
            return e;
        };
        tracing::error!("{message}");
        ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::UNAVAILABLE, message))
    }

    /// Awaits agent call `call` (`reply`), its error explained as
    /// [`Self::explain_agent_error`] does.
    pub async fn agent_call<T>(
        &self,
        call: &str,
        reply: impl std::future::Future<Output = ttrpc::Result<T>>,
    ) -> ttrpc::Result<T> {
        match reply.await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.explain_agent_error(call, e).await),
        }
    }

    /// Asks the guest to power off, stops the VM if it does not, and removes the state dir.
    pub async fn shut_down(&self) {
        self.ending.store(true, Ordering::Release);
        // The agent may power off before its answer leaves the guest: wait for whichever of
        // the answer and the VM's end comes first, then for the VM's end.
        let mut exited = self.exited.clone();
        let empty = Empty::new();
        let shutdown = self.agent.shutdown(ctx(Duration::from_secs(2)), &empty);
        tokio::select! {
            _ = shutdown => {}
            _ = exited.wait_for(Option::is_some) => {}
        }
        let ended = tokio::time::timeout(Duration::from_secs(3), exited.wait_for(Option::is_some));
        if ended.await.is_err() {
            tracing::warn!(
                "sandbox {}: guest did not power off; stopping the VM",
                self.id
            );
            self.stopper.stop();
        }
        let handle = self
            .vm_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        if let Err(e) = mounts::remove_tree(&self.dir) {
            tracing::warn!("sandbox {}: {e}", self.id);
        }
        let connected = self
            .network
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(c) = connected {
            let _ = tokio::task::spawn_blocking(move || drop(c)).await;
        }
        drop(self.cgroup.lock().unwrap_or_else(|e| e.into_inner()).take());
        mark("sandbox_stopped");
    }
}

/// The VM while the sandbox is still being set up: stopped and cleaned if setup fails.
struct SandboxParts {
    ending: Arc<AtomicBool>,
    stopper: Stopper,
    vm_thread: Option<JoinHandle<()>>,
    dir: PathBuf,
    cgroup: Option<HostCgroup>,
    network: Option<Connected>,
}

impl SandboxParts {
    fn stop(&mut self) {
        self.ending.store(true, Ordering::Release);
        self.stopper.stop();
        if let Some(h) = self.vm_thread.take() {
            let _ = h.join();
        }
        self.network = None;
        let _ = mounts::remove_tree(&self.dir);
        self.cgroup = None;
    }

    /// Setup succeeded: hand the VM over to the sandbox.
    fn disarm(
        mut self,
    ) -> (
        Stopper,
        Option<JoinHandle<()>>,
        Option<HostCgroup>,
        Option<Connected>,
    ) {
        (
            self.stopper.clone(),
            self.vm_thread.take(),
            self.cgroup.take(),
            self.network.take(),
        )
    }
}

impl Drop for SandboxParts {
    fn drop(&mut self) {
        if self.vm_thread.is_some() {
            self.stop();
        }
    }
}

/// Cleans, on a thread of its own, the sandbox directories of shims that died (if no shim
/// did in the last `sweep_secs`), then gives their host cgroups back to the pool.
fn sweep_in_background(config: &Config) {
    let state_dir = config.state_dir.clone();
    let every = Duration::from_secs(config.sweep_secs);
    let pool = config.cgroups.enabled.then(|| config.cgroups.pool_config());
    tokio::task::spawn_blocking(move || match crate::sweep::sweep(&state_dir, every) {
        Ok(cleaned) if !cleaned.is_empty() => {
            if let Some(pool) = pool {
                if let Err(e) = crate::host_cgroups::Pool::open(pool).and_then(|p| p.recover()) {
                    tracing::warn!("cannot recover dead shims' host cgroups: {e}");
                }
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot sweep for dead shims' sandboxes: {e}"),
    });
}

/// The sandbox directory for `id` under `state_dir`, if it exists.
pub fn existing_dir(state_dir: &Path, id: &str) -> Option<PathBuf> {
    let d = state_dir.join(id);
    d.is_dir().then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_limits_carry_the_configured_pids_limit() {
        let mut config = Config::default();
        config.limits.pids_max = 77;
        let limits = host_limits(&config, Some(50_000), None);
        assert_eq!(limits.pids_max, Some(77));
        assert_eq!(limits.cpu_quota_us, Some(50_000));
    }

    #[test]
    fn a_pods_cpu_quota_is_its_containers_together() {
        let pod = |entries: &[(&str, Option<u64>)]| {
            let map = entries
                .iter()
                .map(|(id, q)| (id.to_string(), *q))
                .collect::<HashMap<_, _>>();
            pod_cpu_quota("pause", &map)
        };
        assert_eq!(
            pod(&[("pause", None)]),
            None,
            "a lone workload without quota"
        );
        assert_eq!(pod(&[("pause", Some(50_000))]), Some(50_000));
        // The pause container without a quota does not make a pod unlimited...
        assert_eq!(
            pod(&[("pause", None), ("a", Some(50_000)), ("b", Some(25_000))]),
            Some(75_000)
        );
        // ...a workload container without one does.
        assert_eq!(
            pod(&[("pause", None), ("a", Some(50_000)), ("b", None)]),
            None
        );
        assert_eq!(
            pod(&[("pause", Some(10_000)), ("a", Some(20_000))]),
            Some(30_000)
        );
        assert_eq!(quota_per_period(Some(25_000), Some(50_000)), Some(50_000));
        assert_eq!(quota_per_period(Some(50_000), None), Some(50_000));
        assert_eq!(quota_per_period(Some(0), Some(100_000)), None);
        assert_eq!(quota_per_period(None, Some(100_000)), None);
        assert_eq!(quota_per_period(Some(1), Some(1_000_000)), Some(1000));
    }

    #[test]
    fn only_an_end_the_shim_asked_for_is_not_a_crash() {
        assert!(asked_end(true, &ExitReason::Stopped));
        assert!(asked_end(true, &ExitReason::PowerOff));
        // The agent powers off by rebooting: how every pod stop ends.
        assert!(asked_end(true, &ExitReason::Reboot));
        assert!(!asked_end(false, &ExitReason::PowerOff));
        assert!(!asked_end(false, &ExitReason::Reboot));
        assert!(!asked_end(true, &ExitReason::TripleFault("vCPU 0".into())));
        assert!(!asked_end(true, &ExitReason::Error("KVM_RUN".into())));
    }

    #[test]
    fn console_tail_keeps_the_last_lines_and_says_when_there_are_none() {
        let dir = std::env::temp_dir().join(format!("shoal-console-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        let text: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text).unwrap();
        let tail = console_tail(&log, 20);
        assert_eq!(tail.lines().count(), 20);
        assert!(tail.starts_with("  line 11\n"), "{tail}");
        assert!(tail.ends_with("  line 30"), "{tail}");

        std::fs::write(&log, b"\n \n").unwrap();
        assert_eq!(console_tail(&log, 20), "  (the guest printed nothing)");

        // Bytes that are not UTF-8 (a guest writing garbage) are shown, not refused.
        std::fs::write(&log, b"ok\n\xff\xfe tail\n").unwrap();
        assert!(console_tail(&log, 20).ends_with("\u{fffd}\u{fffd} tail"));

        // A log bigger than what is read: its last lines still, the line the cut fell in
        // left out, one that starts right at the cut kept.
        let text: String = (1..=10_000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text).unwrap();
        let tail = console_tail(&log, 20);
        assert!(tail.starts_with("  line 9981\n"), "{tail}");
        assert!(tail.ends_with("  line 10000"), "{tail}");
        // What is read once for a report gives the error's lines as a read of its own does.
        let long = console_tail(&log, crate::crashes::CONSOLE_LINES);
        assert_eq!(last_lines(&long, 20), tail);
        let mut big = vec![b'x'; 100_000];
        big.extend_from_slice(b"\na\nb\n");
        std::fs::write(&log, &big).unwrap();
        assert_eq!(console_tail(&log, 20), "  a\n  b");
        let mut exact = b"cut here\n".to_vec();
        let row = [&[b'w'; 1023][..], b"\n"].concat();
        exact.extend(row.repeat(64)); // 64 KiB of whole lines after the cut
        std::fs::write(&log, &exact).unwrap();
        let tail = console_tail(&log, 100);
        assert_eq!(tail.lines().count(), 64, "{tail}");
        assert!(tail.lines().all(|l| l.len() == 2 + 1023), "{tail}");

        std::fs::write(&log, "booting\nKernel panic - not syncing: test\n").unwrap();
        let e = ttrpc::Error::Socket("early eof".into());
        let gone = RingReporter::default().report();
        let tail = console_tail(&log, CONSOLE_TAIL_LINES);
        let msg = lost_agent("Check", &e, Some(&ExitReason::Reboot), &gone, &tail).unwrap();
        assert!(
            msg.contains("broke during Check (")
                && msg.contains("its devices:\n(the VM has ended)")
                && msg.contains("early eof")
                && msg.contains("has ended (the guest reset itself"),
            "{msg}"
        );
        assert!(msg.ends_with("  Kernel panic - not syncing: test"), "{msg}");
        let msg = lost_agent("Check", &e, None, &gone, &tail).unwrap();
        assert!(msg.contains("the sandbox VM is still running"), "{msg}");
        let msg = lost_agent("Start", &ttrpc::Error::LocalClosed, None, &gone, &tail).unwrap();
        assert!(msg.contains("broke before Start was sent;"), "{msg}");
        let refused = ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::NOT_FOUND, "no"));
        assert!(lost_agent("Start", &refused, None, &gone, &tail).is_none());

        // A call that timed out: the first leaves a report in the flight recorder.
        let report = "vsock: 1 connection\nvCPU 0: running at rip 0xffffffff81000000";
        let state = dir.join("state");
        let msg = stalled_agent("CreateContainer", report, &log, Some((&state, "pod")));
        assert!(
            msg.starts_with("the guest agent did not answer CreateContainer within its deadline; the sandbox VM is still running (report ")
                && msg.contains(&format!("its devices:\n{report}\n"))
                && msg.ends_with("  Kernel panic - not syncing: test"),
            "{msg}"
        );
        let kept: Vec<_> = std::fs::read_dir(state.join(crate::crashes::DIR))
            .unwrap()
            .collect();
        assert_eq!(kept.len(), 1);
        let text = std::fs::read_to_string(kept[0].as_ref().unwrap().path()).unwrap();
        assert!(
            text.contains("sandbox: pod\n")
                && text.contains("did not answer CreateContainer")
                && text.contains("vCPU 0: running")
                && text.contains("Kernel panic - not syncing: test"),
            "{text}"
        );
        let msg = stalled_agent("StartContainer", report, &log, None);
        assert!(
            msg.contains(
                "StartContainer within its deadline; the sandbox VM is still running; its devices:"
            ),
            "{msg}"
        );
        assert_eq!(
            std::fs::read_dir(state.join(crate::crashes::DIR))
                .unwrap()
                .count(),
            1
        );

        std::fs::remove_dir_all(&dir).unwrap();
        let missing = console_tail(&log, 20);
        assert!(
            missing.contains("cannot read") && missing.contains("console.log"),
            "{missing}"
        );
    }
}
