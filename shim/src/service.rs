//! The shim: containerd's `start`/`delete` actions and the Task service, served against the
//! sandbox's guest agent.
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{
    Config as ShimConfig, Context, DeleteResponse, Flags, StartOpts, TtrpcResult,
};
use containerd_shim_protos::api;
use containerd_shim_protos::cgroups_v2::metrics as v2;
use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{EnumOrUnknown, MessageDyn, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::types::task::{ProcessInfo, Status};
use oci_spec::runtime::Spec;
use shoal_agent_api::agent as ag;
use tokio::sync::{watch, Mutex};

use crate::config::Config;
use crate::io::{Fifos, ProcessIo};
use crate::mounts::{self, RootfsMount};
use crate::sandbox::{ctx, quota_per_period, Sandbox};
use shoal_oci::load_spec;
use shoal_oci::{cpu_quota_of, memory_limit_mib, sandbox_id};

/// Exit status reported when the VM dies under a process (as if killed by SIGKILL).
const VM_GONE_STATUS: u32 = 255;
/// How long a process whose agent connection broke waits for its VM to end by itself
/// before it is reported gone (a guest kernel panic reboots after one second, `panic=1`;
/// three leave room for a loaded host).
const LOST_PROCESS_GRACE: Duration = Duration::from_secs(3);
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

fn status(code: ttrpc::Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn not_found(what: &str) -> ttrpc::Error {
    status(ttrpc::Code::NOT_FOUND, format!("{what} not found"))
}

fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

fn timestamp_from_nanos(n: i64) -> Timestamp {
    if n <= 0 {
        return now();
    }
    Timestamp {
        seconds: n / 1_000_000_000,
        nanos: (n % 1_000_000_000) as i32,
        ..Default::default()
    }
}

/// Exit status and time, once a process has ended.
type Exit = Option<(u32, Timestamp)>;

/// One process: a container's init (exec id "") or an exec.
struct Process {
    fifos: Fifos,
    spec_json: Vec<u8>,
    status: Status,
    guest_pid: u32,
    exit: watch::Receiver<Exit>,
    exit_tx: Arc<watch::Sender<Exit>>,
    io: SharedIo,
    /// Set while the agent starts the process, with no lock held: a second start, or a
    /// delete, is refused meanwhile.
    starting: bool,
    /// Whether a waiter records this process's exit (from its start, or from a signal to a
    /// container not started yet).
    watched: bool,
}

impl Process {
    fn new(fifos: Fifos, spec_json: Vec<u8>) -> Process {
        let (tx, rx) = watch::channel(None);
        Process {
            fifos,
            spec_json,
            status: Status::CREATED,
            guest_pid: 0,
            exit: rx,
            exit_tx: Arc::new(tx),
            io: Arc::new(std::sync::Mutex::new(None)),
            starting: false,
            watched: false,
        }
    }

    fn exited(&self) -> Exit {
        self.exit.borrow().clone()
    }

    /// Opens the process's agent streams and starts copying; returns the agent's tokens.
    async fn connect_io(&self, uds: &Path) -> TtrpcResult<ag::Stdio> {
        connect_io(&self.fifos, &self.io, uds).await
    }

    /// Ends the process's stdio copies.
    fn stop_io(&self) {
        stop_io(&self.io);
    }
}

/// A process's stdio streams to the guest, connected over the VM's vsock socket `uds` and
/// copied to and from containerd's `fifos` by the returned copies, kept in `io`.
async fn connect_io(fifos: &Fifos, io: &SharedIo, uds: &Path) -> TtrpcResult<ag::Stdio> {
    let (uds, fifos) = (uds.to_path_buf(), fifos.clone());
    let (stdio, copies) = tokio::task::spawn_blocking(move || ProcessIo::connect(&uds, &fifos))
        .await
        .expect("stdio task")
        .map_err(|e| status(ttrpc::Code::UNAVAILABLE, e.to_string()))?;
    *io.lock().unwrap_or_else(|e| e.into_inner()) = Some(copies);
    Ok(stdio)
}

/// Ends the stdio copies in `io`.
fn stop_io(io: &SharedIo) {
    if let Some(copies) = io.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        copies.shut_down();
    }
}

/// A process's stdio copies, once connected.
type SharedIo = Arc<std::sync::Mutex<Option<ProcessIo>>>;

struct Container {
    bundle: String,
    init: Process,
    execs: HashMap<String, Process>,
    /// Exec ids deleted here whose process the agent has not forgotten yet: taken again
    /// before it has, the new exec would meet the old one in the guest.
    forgetting: HashSet<String>,
}

#[derive(Default)]
struct Inner {
    sandbox: Option<Arc<Sandbox>>,
    containers: HashMap<String, Container>,
    /// Containers being created (the VM booting, the agent creating it) or deleted, with no
    /// lock held meanwhile: their ids are taken, and the sandbox is not idle.
    pending: HashSet<String>,
    /// The shim is exiting (it served nothing after its caller left): no new container.
    closing: bool,
}

impl Inner {
    /// Whether the shim serves no container and creates none.
    fn idle(&self) -> bool {
        self.containers.is_empty() && self.pending.is_empty()
    }

    /// Container `id` and its process `exec_id` ("" for the init process).
    fn process(&self, id: &str, exec_id: &str) -> TtrpcResult<(&Container, &Process)> {
        let c = self
            .containers
            .get(id)
            .ok_or_else(|| not_found(&format!("container {id}")))?;
        let p = if exec_id.is_empty() {
            &c.init
        } else {
            c.execs
                .get(exec_id)
                .ok_or_else(|| not_found(&format!("exec {exec_id}")))?
        };
        Ok((c, p))
    }
}

/// The most processes a container's list may hold. The guest writes the list, up to ttrpc's
/// message size (4 MiB, about a million pids); each becomes a `ProcessInfo` here, and no
/// container of a sandbox VM has this many.
pub const MAX_LISTED_PIDS: usize = 65536;

/// containerd's answer to Pids from the agent's process list; a list longer than
/// [`MAX_LISTED_PIDS`] is refused rather than copied.
pub fn pids_response(list: ag::ListProcessesResponse) -> TtrpcResult<api::PidsResponse> {
    if list.pids.len() > MAX_LISTED_PIDS {
        return Err(status(
            ttrpc::Code::INTERNAL,
            format!(
                "the guest agent listed {} processes; more than {MAX_LISTED_PIDS} is not taken",
                list.pids.len()
            ),
        ));
    }
    Ok(api::PidsResponse {
        processes: list
            .pids
            .into_iter()
            .map(|pid| ProcessInfo {
                pid,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
}

/// containerd's cgroup v2 metrics from the agent's container stats.
pub fn metrics(s: &ag::StatsContainerResponse) -> v2::Metrics {
    v2::Metrics {
        pids: MessageField::some(v2::PidsStat {
            current: s.pids_current,
            limit: s.pids_max,
            ..Default::default()
        }),
        cpu: MessageField::some(v2::CPUStat {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            ..Default::default()
        }),
        memory: MessageField::some(v2::MemoryStat {
            usage: s.memory_current,
            usage_limit: s.memory_max,
            ..Default::default()
        }),
        memory_events: MessageField::some(v2::MemoryEvents {
            oom_kill: s.memory_oom_kills,
            ..Default::default()
        }),
        io: MessageField::some(v2::IOStat {
            usage: vec![v2::IOEntry {
                rbytes: s.io_read_bytes,
                wbytes: s.io_write_bytes,
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_request(id: &str) -> ag::ContainerRequest {
    ag::ContainerRequest {
        container_id: id.to_string(),
        ..Default::default()
    }
}

struct State {
    namespace: String,
    exit: ExitSignal,
    publisher: OnceLock<RemotePublisher>,
    /// The containers and the sandbox: held for bookkeeping only, never across a VM's boot
    /// or an agent call, so that every other container's requests answer meanwhile.
    inner: Mutex<Inner>,
    /// Held while the sandbox's VM boots or shuts down (taken before `inner`, never after):
    /// a second create waits for the boot, and a create never boots a VM while the last
    /// one shuts down.
    vm: Mutex<()>,
}

/// The shim; one process serves every container of one sandbox.
#[derive(Clone)]
pub struct Service {
    state: Arc<State>,
}

impl Service {
    /// Sizes the sandbox's host cgroup for container `cid`'s CPU quota (or its removal); a
    /// failure is logged: the container runs either way, on the pod's former quota.
    fn resize_host_cgroup(sb: &Sandbox, cid: &str, quota: Option<u64>, gone: bool) {
        if let Err(e) = sb.container_cpu(cid, quota, gone) {
            tracing::warn!(
                "sandbox {}: cannot resize the host cgroup for {cid}: {e}",
                sb.id
            );
        }
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let Some(publisher) = self.state.publisher.get() else {
            return;
        };
        if let Err(e) = publisher
            .publish(Context::default(), topic, &self.state.namespace, event)
            .await
        {
            tracing::warn!("cannot publish {topic}: {e}");
        }
    }

    async fn sandbox(&self) -> TtrpcResult<Arc<Sandbox>> {
        self.state
            .inner
            .lock()
            .await
            .sandbox
            .clone()
            .ok_or_else(|| status(ttrpc::Code::FAILED_PRECONDITION, "no sandbox is running"))
    }

    /// The running sandbox, or one started for container `cid` (the first, whose spec
    /// sizes the VM), and whether it was started now. Under the `vm` lock alone.
    async fn ensure_sandbox(
        &self,
        spec: &Spec,
        cid: &str,
        options: Option<&containerd_shim_protos::protobuf::well_known_types::any::Any>,
    ) -> TtrpcResult<(Arc<Sandbox>, bool)> {
        let _vm = self.state.vm.lock().await;
        if let Some(sb) = self.state.inner.lock().await.sandbox.clone() {
            return Ok((sb, false));
        }
        let invalid = |e: String| status(ttrpc::Code::INVALID_ARGUMENT, e);
        let config_path = options
            .map(crate::config::config_path_option)
            .transpose()
            .map_err(|e| invalid(e.to_string()))?
            .flatten();
        let mut config = match config_path {
            Some(path) => Config::from_file(&path),
            None => Config::load(),
        }
        .map_err(|e| invalid(e.to_string()))?;
        config
            .apply_annotations(&spec.annotations().clone().unwrap_or_default())
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        shoal_vmm::confine::set_mode(config.confine_mode());
        // Set on purpose, not inherited from containerd (whose unit may allow a million):
        // it bounds the descriptors the virtio-fs server can be made to hold for the guest.
        crate::limits::set_open_files(config.limits.max_open_files)
            .map_err(|e| status(ttrpc::Code::FAILED_PRECONDITION, e.to_string()))?;
        let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
        // A container's memory limit larger than the VM grows the VM to hold it.
        let memory_limit = memory_limit_mib(spec);
        if let Some(mib) = memory_limit.filter(|mib| *mib > crate::config::MAX_MEMORY_MIB) {
            return Err(status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!(
                    "the container's memory limit of {mib} MiB is more than a sandbox VM may have ({} MiB)",
                    crate::config::MAX_MEMORY_MIB
                ),
            ));
        }
        if let Some(mib) = memory_limit.filter(|mib| *mib > config.memory_mib) {
            tracing::info!(
                "container memory limit {mib} MiB: VM RAM grows from {} MiB",
                config.memory_mib
            );
            config.memory_mib = mib;
        }
        let (quota, period) = cpu_quota_of(resources.as_ref());
        let limits = crate::sandbox::host_limits(&config, quota, period);
        let id = sandbox_id(spec, cid);
        let hostname = spec.hostname().clone().unwrap_or_default();
        let started = std::time::Instant::now();
        // A network namespace path names the pod's network, which the VM carries; without a
        // path the container gets a namespace of its own in the guest (loopback only).
        let network = match crate::network::spec_netns(spec).map_err(|e| invalid(e.to_string()))? {
            Some(netns) => Some(
                tokio::task::spawn_blocking(move || crate::network::PodNetwork::inspect(&netns))
                    .await
                    .expect("network inspection task")
                    .map_err(|e| status(ttrpc::Code::FAILED_PRECONDITION, e.to_string()))?,
            ),
            None => None,
        };
        let sb = Sandbox::start(&id, &hostname, &config, &limits, network)
            .await
            .map_err(|e| status(ttrpc::Code::UNAVAILABLE, e.to_string()))?;
        tracing::info!(
            "sandbox {id}: VM booted and agent ready in {:?}",
            started.elapsed()
        );
        let sb = Arc::new(sb);
        self.watch_oom(sb.clone());
        self.state.inner.lock().await.sandbox = Some(sb.clone());
        Ok((sb, true))
    }

    /// Passes the guest agent's OOM events on to containerd as TaskOOM until the sandbox's
    /// VM ends: only for containers this shim has, at most once a second per container, and
    /// with the poll backing off while the agent fails or floods it (`crate::oom`).
    fn watch_oom(&self, sb: Arc<Sandbox>) {
        use crate::oom::{shown, OomFilter, Verdict};
        let me = self.clone();
        tokio::spawn(async move {
            let mut ended = sb.exited.clone();
            let mut filter = OomFilter::default();
            let empty = ag::Empty::new();
            loop {
                let polled = tokio::select! {
                    r = sb.agent.wait_oom_event(ctx(Duration::ZERO), &empty) => r,
                    _ = ended.wait_for(Option::is_some) => return,
                };
                if sb.exited.borrow().is_some() {
                    return;
                }
                let now = std::time::Instant::now();
                let (wait, failure) = match polled {
                    Ok(event) => {
                        let cid = event.container_id;
                        let known = me.state.inner.lock().await.containers.contains_key(&cid);
                        let decision = filter.event(&cid, known, now);
                        match decision.verdict {
                            Verdict::Publish => {
                                me.publish(
                                    topics::TASK_OOM_EVENT_TOPIC,
                                    Box::new(ev::TaskOOM {
                                        container_id: cid,
                                        ..Default::default()
                                    }),
                                )
                                .await
                            }
                            Verdict::Unknown => shoal_vmm::guest_warn!(
                                "sandbox {}: dropped the guest's OOM event for container {:?}, which this shim does not have",
                                sb.id,
                                shown(&cid)
                            ),
                            // Published under a second ago; the container is still reported.
                            Verdict::Repeat => {}
                        }
                        (decision.wait, None)
                    }
                    Err(e) => (filter.error(now), Some(e.to_string())),
                };
                if wait.is_zero() {
                    continue;
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = ended.wait_for(Option::is_some) => return,
                }
                // Said after the wait: the poll fails once when the VM goes away, which is
                // no news, and the wait is when that shows.
                match failure {
                    Some(e) => shoal_vmm::guest_warn!(
                        "sandbox {}: waiting for the guest's OOM events failed ({:?}); polling again after waiting {wait:?}",
                        sb.id,
                        shown(&e)
                    ),
                    None => shoal_vmm::guest_warn!(
                        "sandbox {}: the guest's OOM events come faster than a working agent sends them; polling again after waiting {wait:?}",
                        sb.id
                    ),
                }
            }
        });
    }

    /// Stops the sandbox and ends the shim when it serves no container.
    async fn exit_if_idle(&self) {
        if self.release_sandbox_if_idle(true).await {
            self.state.exit.signal();
        }
    }

    /// Shuts the sandbox down if no container is left in it nor being created, and says
    /// whether it was idle; `closing`: the shim then takes no new container. The shutdown
    /// (agent call, VM stop) runs under the `vm` lock only.
    async fn release_sandbox_if_idle(&self, closing: bool) -> bool {
        let _vm = self.state.vm.lock().await;
        let sb = {
            let mut inner = self.state.inner.lock().await;
            if !inner.idle() {
                return false;
            }
            inner.closing |= closing;
            inner.sandbox.take()
        };
        if let Some(sb) = sb {
            sb.shut_down().await;
        }
        true
    }

    /// Waits for a started process to end, then records and announces its exit.
    fn spawn_waiter(
        &self,
        sb: Arc<Sandbox>,
        cid: String,
        exec_id: String,
        tx: Arc<watch::Sender<Exit>>,
        io: Arc<std::sync::Mutex<Option<ProcessIo>>>,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let req = ag::ProcessRequest {
                container_id: cid.clone(),
                exec_id: exec_id.clone(),
                ..Default::default()
            };
            let mut vm_exited = sb.exited.clone();
            // Ok: the agent's answer; Err(Some((error, broke))): the call failed, `broke` when
            // its connection broke; Err(None): the VM ended first.
            let answer = tokio::select! {
                r = sb.agent.wait_process(ctx(Duration::ZERO), &req) => {
                    r.map_err(|e| Some((e.to_string(), crate::sandbox::broke(&e))))
                }
                _ = vm_exited.wait_for(Option::is_some) => Err(None),
            };
            let (code, at) = match answer {
                Ok(r) => (r.exit_status, timestamp_from_nanos(r.exited_at_unix_nanos)),
                Err(None) => {
                    tracing::warn!("{cid}/{exec_id}: the sandbox VM ended under the process");
                    (VM_GONE_STATUS, now())
                }
                Err(Some((e, broke))) => {
                    // A connection that breaks under a running VM is most often a guest
                    // going down (a panic reboots it a second later, `panic=1`): a moment
                    // for the VM to end on its own, so that it is recorded as the crash it
                    // is and not taken for the stop the client asks next. An answer from a
                    // live agent gets no wait.
                    let ended = broke
                        && matches!(
                            tokio::time::timeout(
                                LOST_PROCESS_GRACE,
                                vm_exited.wait_for(Option::is_some),
                            )
                            .await,
                            Ok(Ok(_))
                        );
                    if ended {
                        tracing::warn!("{cid}/{exec_id}: the sandbox VM ended under the process");
                    } else {
                        tracing::warn!("{cid}/{exec_id}: lost the process: {e}");
                    }
                    (VM_GONE_STATUS, now())
                }
            };
            crate::sandbox::mark("process_exited");
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(io) = io.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                    io.drain(Duration::from_secs(5));
                }
            })
            .await;
            {
                let mut inner = me.state.inner.lock().await;
                if let Some(c) = inner.containers.get_mut(&cid) {
                    let p = if exec_id.is_empty() {
                        Some(&mut c.init)
                    } else {
                        c.execs.get_mut(&exec_id)
                    };
                    if let Some(p) = p {
                        p.status = Status::STOPPED;
                    }
                }
                // Under the lock with the status: a delete sees both or neither.
                let _ = tx.send(Some((code, at.clone())));
            }
            me.publish(
                topics::TASK_EXIT_EVENT_TOPIC,
                Box::new(ev::TaskExit {
                    container_id: cid.clone(),
                    id: if exec_id.is_empty() { cid } else { exec_id },
                    pid: std::process::id(),
                    exit_status: code,
                    exited_at: MessageField::some(at),
                    ..Default::default()
                }),
            )
            .await;
        });
    }

    /// Pauses (`pause`) or resumes a container and announces it.
    async fn freeze(&self, id: String, pause: bool) -> TtrpcResult<api::Empty> {
        let sb = self.sandbox().await?;
        let req = container_request(&id);
        if pause {
            sb.agent_call(
                "PauseContainer",
                sb.agent.pause_container(ctx(RPC_TIMEOUT), &req),
            )
            .await?;
        } else {
            sb.agent_call(
                "ResumeContainer",
                sb.agent.resume_container(ctx(RPC_TIMEOUT), &req),
            )
            .await?;
        }
        if let Some(c) = self.state.inner.lock().await.containers.get_mut(&id) {
            match (pause, c.init.status) {
                (true, Status::RUNNING) => c.init.status = Status::PAUSED,
                (false, Status::PAUSED) => c.init.status = Status::RUNNING,
                _ => {}
            }
        }
        let (topic, event): (&str, Box<dyn MessageDyn>) = if pause {
            let e = ev::TaskPaused {
                container_id: id,
                ..Default::default()
            };
            (topics::TASK_PAUSED_EVENT_TOPIC, Box::new(e))
        } else {
            let e = ev::TaskResumed {
                container_id: id,
                ..Default::default()
            };
            (topics::TASK_RESUMED_EVENT_TOPIC, Box::new(e))
        };
        self.publish(topic, event).await;
        Ok(api::Empty::new())
    }

    /// Undoes a container's host side: stdio copies, mounts, files.
    fn clean_container_files(sb: &Sandbox, cid: &str) {
        if let Err(e) = sb.remove_container_files(cid) {
            tracing::warn!("{cid}: {e}");
        }
    }
}

#[async_trait]
impl Shim for Service {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, config: &mut ShimConfig) -> Self {
        // tracing, not the crate's `log` logger: main() set it up.
        config.no_setup_logger = true;
        Service {
            state: Arc::new(State {
                namespace: args.namespace.clone(),
                exit: ExitSignal::default(),
                publisher: OnceLock::new(),
                inner: Mutex::new(Inner::default()),
                vm: Mutex::new(()),
            }),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        // containerd runs `start` in the bundle directory.
        let grouping = match load_spec(Path::new(".")) {
            Ok(spec) => sandbox_id(&spec, &opts.id),
            Err(_) => opts.id.clone(),
        };
        let address = spawn(opts, &grouping, Vec::new()).await?;
        // containerd finds a running shim again after it restarts through the bundle's
        // `address` file (it reads nothing else); the crate writes it only for a container
        // that joins an existing shim, so write it for every one, whole or not at all.
        write_address(Path::new("."), &address).map_err(|e| containerd_shim::Error::IoError {
            context: "write the bundle's address file".into(),
            err: e,
        })?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, containerd_shim::Error> {
        // The shim serving this container is gone (and its VM with it): clean what it left.
        let bundle = std::env::current_dir().unwrap_or_default();
        let cid = bundle
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Ok(config) = Config::load() {
            let sid = load_spec(&bundle)
                .map(|s| sandbox_id(&s, &cid))
                .unwrap_or_else(|_| cid.clone());
            if let Some(dir) = crate::sandbox::existing_dir(&config.state_dir, &sid) {
                let _ = mounts::remove_container(&dir, &cid);
                let others = std::fs::read_dir(dir.join(mounts::PRIVATE_DIR))
                    .map(|d| d.count())
                    .unwrap_or(0);
                if others == 0 || sid == cid {
                    // The redirects to the dead VM's taps too (recorded by its shim).
                    let _ = crate::sweep::clean(&dir);
                }
            }
            // Cgroups whose shim is gone go back to the pool, this one's included.
            if config.cgroups.enabled {
                let pool = crate::host_cgroups::Pool::open(config.cgroups.pool_config());
                if let Err(e) = pool.and_then(|p| p.recover()) {
                    tracing::warn!("cannot recover the dead shim's host cgroup: {e}");
                }
            }
        }
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(now()),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.state.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let _ = self.state.publisher.set(publisher);
        self.clone()
    }
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let me = self.clone();
        let what = format!("create of {}", req.id);
        to_completion(me.clone(), what, deadline_of(_ctx), async move {
            me.create_whole(req).await
        })
        .await
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let me = self.clone();
        let what = format!("start of {}", req.id);
        to_completion(me.clone(), what, deadline_of(_ctx), async move {
            me.start_whole(req).await
        })
        .await
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let me = self.clone();
        let what = format!("delete of {}", req.id);
        to_completion(me.clone(), what, deadline_of(_ctx), async move {
            me.delete_whole(req).await
        })
        .await
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let me = self.clone();
        let what = format!("exec of {}", req.id);
        to_completion(me.clone(), what, deadline_of(_ctx), async move {
            me.exec_whole(req).await
        })
        .await
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let inner = self.state.inner.lock().await;
        let (c, p) = inner.process(&req.id, &req.exec_id)?;
        let (code, at) = p
            .exited()
            .map(|(c, t)| (c, MessageField::some(t)))
            .unwrap_or((0, MessageField::none()));
        Ok(api::StateResponse {
            id: req.id,
            bundle: c.bundle.clone(),
            pid: std::process::id(),
            status: EnumOrUnknown::new(p.status),
            stdin: p.fifos.stdin.clone(),
            stdout: p.fifos.stdout.clone(),
            stderr: p.fifos.stderr.clone(),
            terminal: p.fifos.terminal,
            exit_status: code,
            exited_at: at,
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let sb = self.sandbox().await?;
        let r = sb
            .agent_call(
                "ListProcesses",
                sb.agent
                    .list_processes(ctx(RPC_TIMEOUT), &container_request(&req.id)),
            )
            .await?;
        pids_response(r)
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let me = self.clone();
        let what = format!("kill of {}", req.id);
        to_completion(me.clone(), what, deadline_of(_ctx), async move {
            me.kill_whole(req).await
        })
        .await
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut rx = {
            let inner = self.state.inner.lock().await;
            let (_, p) = inner.process(&req.id, &req.exec_id)?;
            p.exit.clone()
        };
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| status(ttrpc::Code::ABORTED, "the shim is shutting down"))?
            .clone()
            .expect("waited for Some");
        Ok(api::WaitResponse {
            exit_status: exit.0,
            exited_at: MessageField::some(exit.1),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let me = self.clone();
        let what = format!("pause of {}", req.id);
        to_completion(me.clone(), what, deadline_of(_ctx), async move {
            me.pause_whole(req).await
        })
        .await
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        let me = self.clone();
        let what = format!("resume of {}", req.id);
        to_completion(me.clone(), what, deadline_of(_ctx), async move {
            me.resume_whole(req).await
        })
        .await
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let me = self.clone();
        let what = format!("update of {}", req.id);
        to_completion(me.clone(), what, deadline_of(_ctx), async move {
            me.update_whole(req).await
        })
        .await
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let sb = self.sandbox().await?;
        let s = sb
            .agent_call(
                "StatsContainer",
                sb.agent
                    .stats_container(ctx(RPC_TIMEOUT), &container_request(&req.id)),
            )
            .await?;
        let metrics = metrics(&s);
        let any = containerd_shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| status(ttrpc::Code::INTERNAL, e.to_string()))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let sb = self.sandbox().await?;
        sb.agent_call(
            "ResizePty",
            sb.agent.resize_pty(
                ctx(RPC_TIMEOUT),
                &ag::ResizePtyRequest {
                    container_id: req.id,
                    exec_id: req.exec_id,
                    width: req.width,
                    height: req.height,
                    ..Default::default()
                },
            ),
        )
        .await?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let me = self.clone();
        let what = format!("close io of {}", req.id);
        to_completion(me.clone(), what, deadline_of(_ctx), async move {
            me.close_io_whole(req).await
        })
        .await
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(status(
            ttrpc::Code::UNIMPLEMENTED,
            format!("checkpoint of {}: not supported by shoal", req.id),
        ))
    }

    /// containerd's question, on start, whether this shim still serves task `id`: a
    /// containerd that restarted asks it of every bundle it finds, within 5 s, and cleans up
    /// (runs `shim delete`) after any error. So it never fails, and never waits long: a
    /// sandbox booting holds the registry for up to the agent timeout, and the task it is
    /// creating is this shim's all the same. Whether the task exists is for `state` to say.
    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        let me = self.clone();
        let what = format!("shutdown of {}", req.id);
        to_completion(me.clone(), what, deadline_of(_ctx), async move {
            me.shutdown_whole(req).await
        })
        .await
    }
}

/// The Task requests that change state, run whole (see [`to_completion`]).
impl Service {
    async fn create_whole(
        &self,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let cid = req.id.clone();
        let bundle = PathBuf::from(&req.bundle);
        let spec =
            load_spec(&bundle).map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        if !req.checkpoint.is_empty() {
            return Err(status(
                ttrpc::Code::UNIMPLEMENTED,
                "restoring from a checkpoint is not supported by shoal",
            ));
        }
        mounts::check_volumes(&spec)
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        shoal_oci::check_namespaces(&spec)
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        {
            let mut inner = self.state.inner.lock().await;
            if inner.closing {
                return Err(status(
                    ttrpc::Code::UNAVAILABLE,
                    format!("cannot create {cid}: this shim is exiting"),
                ));
            }
            if inner.containers.contains_key(&cid) || inner.pending.contains(&cid) {
                return Err(status(
                    ttrpc::Code::ALREADY_EXISTS,
                    format!("container {cid} already exists"),
                ));
            }
            inner.pending.insert(cid.clone());
        }
        // The VM's boot and the agent's create run with no lock on the other containers.
        let created = self.create_container(&req, &cid, &bundle, spec).await;
        let mut inner = self.state.inner.lock().await;
        inner.pending.remove(&cid);
        let init = match created {
            Ok(done) => done,
            Err(e) => {
                drop(inner);
                self.release_sandbox_if_idle(false).await;
                return Err(e);
            }
        };
        inner.containers.insert(
            cid.clone(),
            Container {
                bundle: req.bundle.clone(),
                init,
                execs: HashMap::new(),
                forgetting: HashSet::new(),
            },
        );
        drop(inner);
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(ev::TaskCreate {
                container_id: cid,
                bundle: req.bundle,
                rootfs: req.rootfs,
                io: MessageField::some(ev::TaskIO {
                    stdin: req.stdin,
                    stdout: req.stdout,
                    stderr: req.stderr,
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid: std::process::id(),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::CreateTaskResponse {
            pid: std::process::id(),
            ..Default::default()
        })
    }

    /// Container `cid`'s part of a create, with its id reserved and no lock held: the
    /// sandbox (booted for the first container), the container's files on the share, and
    /// the agent's create. Returns its init process.
    async fn create_container(
        &self,
        req: &api::CreateTaskRequest,
        cid: &str,
        bundle: &Path,
        mut spec: Spec,
    ) -> TtrpcResult<Process> {
        let cid = cid.to_string();
        let (sb, first) = self
            .ensure_sandbox(&spec, &cid, req.options.as_ref())
            .await?;
        if first && sb.carries_network() {
            crate::network::use_vm_network(&mut spec);
        }
        let fifos = Fifos {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let result = async {
            let (files, guest_dir) = sb
                .container_files(&cid)
                .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
            let rootfs: Vec<RootfsMount> = req
                .rootfs
                .iter()
                .map(|m| RootfsMount {
                    kind: m.type_.clone(),
                    source: m.source.clone(),
                    options: m.options.clone(),
                })
                .collect();
            let read_only = spec.root().as_ref().and_then(|r| r.readonly()) == Some(true);
            files
                .mount_rootfs(&rootfs, bundle)
                .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
            files
                .share_volumes(&mut spec, &guest_dir)
                .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
            let spec_json = serde_json::to_vec(&spec)
                .map_err(|e| status(ttrpc::Code::INTERNAL, e.to_string()))?;
            let mut init = Process::new(fifos.clone(), Vec::new());
            let stdio = init.connect_io(&sb.uds).await?;
            let created = sb
                .agent
                .create_container(
                    ctx(RPC_TIMEOUT),
                    &ag::CreateContainerRequest {
                        container_id: cid.clone(),
                        spec_json,
                        rootfs: format!("{guest_dir}/rootfs"),
                        stdio: MessageField::some(stdio),
                        ..Default::default()
                    },
                )
                .await;
            let created = match created {
                Ok(r) => r,
                Err(e) => {
                    init.stop_io();
                    return Err(sb.explain_agent_error("CreateContainer", e).await);
                }
            };
            init.guest_pid = created.pid;
            // A read-only rootfs becomes read-only on the host too, now that the container's
            // mount points exist in it (libcontainer makes any the image lacks, then makes
            // the root read-only in the guest): root in the guest can reach the rootfs
            // through the share, around its container's read-only root.
            if read_only {
                if let Err(e) = files.seal_rootfs() {
                    let remove = ag::RemoveContainerRequest {
                        container_id: cid.clone(),
                        force: true,
                        ..Default::default()
                    };
                    let _ = sb.agent.remove_container(ctx(RPC_TIMEOUT), &remove).await;
                    init.stop_io();
                    return Err(status(ttrpc::Code::FAILED_PRECONDITION, e.to_string()));
                }
            }
            Ok(init)
        }
        .await;
        let init = match result {
            Ok(init) => init,
            Err(e) => {
                Self::clean_container_files(&sb, &cid);
                return Err(e);
            }
        };
        if !first {
            // A further container of the pod: the host cgroup grows by its CPU quota.
            let (quota, period) =
                cpu_quota_of(spec.linux().as_ref().and_then(|l| l.resources().as_ref()));
            Self::resize_host_cgroup(&sb, &cid, quota_per_period(quota, period), false);
        }
        Ok(init)
    }

    async fn start_whole(&self, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let sb = self.sandbox().await?;
        let pid = std::process::id();
        // Marked as starting under the lock; the agent's start runs without it.
        let (fifos, io, spec_json) = {
            let mut inner = self.state.inner.lock().await;
            let c = inner
                .containers
                .get_mut(&req.id)
                .ok_or_else(|| not_found(&format!("container {}", req.id)))?;
            let (p, what) = match req.exec_id.is_empty() {
                true => (&mut c.init, format!("container {}", req.id)),
                false => (
                    c.execs
                        .get_mut(&req.exec_id)
                        .ok_or_else(|| not_found(&format!("exec {}", req.exec_id)))?,
                    format!("exec {}", req.exec_id),
                ),
            };
            if p.status != Status::CREATED || p.starting {
                return Err(status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("{what} was already started"),
                ));
            }
            p.starting = true;
            (p.fifos.clone(), p.io.clone(), p.spec_json.clone())
        };
        let started = match req.exec_id.is_empty() {
            true => sb
                .agent_call(
                    "StartContainer",
                    sb.agent
                        .start_container(ctx(RPC_TIMEOUT), &container_request(&req.id)),
                )
                .await
                .map(|_| None),
            false => {
                let exec = async {
                    let stdio = connect_io(&fifos, &io, &sb.uds).await?;
                    let request = ag::ExecProcessRequest {
                        container_id: req.id.clone(),
                        exec_id: req.exec_id.clone(),
                        process_json: spec_json,
                        stdio: MessageField::some(stdio),
                        ..Default::default()
                    };
                    match sb.agent.exec_process(ctx(RPC_TIMEOUT), &request).await {
                        Ok(r) => Ok(Some(r.pid)),
                        Err(e) => Err(sb.explain_agent_error("ExecProcess", e).await),
                    }
                };
                exec.await
            }
        };
        let mut inner = self.state.inner.lock().await;
        // Neither the container nor the exec is deleted while it starts.
        let p = inner
            .containers
            .get_mut(&req.id)
            .and_then(|c| match req.exec_id.is_empty() {
                true => Some(&mut c.init),
                false => c.execs.get_mut(&req.exec_id),
            });
        let Some(p) = p else {
            stop_io(&io);
            return Err(not_found(&format!("container {}", req.id)));
        };
        p.starting = false;
        let guest_pid = match started {
            Ok(guest_pid) => guest_pid,
            Err(e) => {
                if !req.exec_id.is_empty() {
                    stop_io(&io);
                }
                return Err(e);
            }
        };
        if let Some(guest_pid) = guest_pid {
            p.guest_pid = guest_pid;
        }
        // A signal sent while it started may have ended it already (its waiter, spawned by
        // the kill, has then recorded STOPPED).
        if p.exited().is_none() {
            p.status = Status::RUNNING;
        }
        let watch = !std::mem::replace(&mut p.watched, true);
        if watch {
            self.spawn_waiter(
                sb.clone(),
                req.id.clone(),
                req.exec_id.clone(),
                p.exit_tx.clone(),
                p.io.clone(),
            );
        }
        drop(inner);
        let (topic, event): (_, Box<dyn protobuf::MessageDyn>) = if req.exec_id.is_empty() {
            crate::sandbox::mark("container_started");
            let event = ev::TaskStart {
                container_id: req.id,
                pid,
                ..Default::default()
            };
            (topics::TASK_START_EVENT_TOPIC, Box::new(event))
        } else {
            let event = ev::TaskExecStarted {
                container_id: req.id,
                exec_id: req.exec_id,
                pid,
                ..Default::default()
            };
            (topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(event))
        };
        self.publish(topic, event).await;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete_whole(&self, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        let mut inner = self.state.inner.lock().await;
        let c = inner
            .containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&format!("container {}", req.id)))?;
        let pid = std::process::id();
        if !req.exec_id.is_empty() {
            let p = c
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| not_found(&format!("exec {}", req.exec_id)))?;
            if p.status == Status::RUNNING || p.starting {
                return Err(status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("exec {} is still running", req.exec_id),
                ));
            }
            let (code, at) = p.exited().unwrap_or((0, now()));
            if let Some(p) = c.execs.remove(&req.exec_id) {
                p.stop_io();
            }
            c.forgetting.insert(req.exec_id.clone());
            let sb = inner.sandbox.clone();
            drop(inner);
            if let Some(sb) = sb {
                // The agent forgets the process too, so its id can be used again.
                let forget = ag::ProcessRequest {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    ..Default::default()
                };
                let forgot = sb.agent.remove_process(ctx(RPC_TIMEOUT), &forget).await;
                match forgot {
                    Ok(_) => {}
                    // Never started in the guest, or the VM is gone.
                    Err(ttrpc::Error::RpcStatus(s)) if s.code() == ttrpc::Code::NOT_FOUND => {}
                    Err(_) if sb.exited.borrow().is_some() => {}
                    Err(e) => tracing::warn!(
                        "{}/{}: the agent could not forget the process: {e}",
                        req.id,
                        req.exec_id
                    ),
                }
            }
            let mut inner = self.state.inner.lock().await;
            if let Some(c) = inner.containers.get_mut(&req.id) {
                c.forgetting.remove(&req.exec_id);
            }
            return Ok(api::DeleteResponse {
                pid,
                exit_status: code,
                exited_at: MessageField::some(at),
                ..Default::default()
            });
        }
        // Killed before it started, its end is on its way (the waiter records it).
        let ending = c.init.watched && c.init.exited().is_none();
        let starting = c.init.starting || c.execs.values().any(|p| p.starting);
        if ending || starting || matches!(c.init.status, Status::RUNNING | Status::PAUSED) {
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("container {} is still running; kill it first", req.id),
            ));
        }
        let (code, at) = c.init.exited().unwrap_or((0, now()));
        let c = inner.containers.remove(&req.id).expect("looked up above");
        // The id stays taken, and the sandbox up, until the agent has removed it too.
        inner.pending.insert(req.id.clone());
        let sb = inner.sandbox.clone();
        drop(inner);
        if let Some(sb) = sb {
            let removed = sb
                .agent
                .remove_container(
                    ctx(RPC_TIMEOUT),
                    &ag::RemoveContainerRequest {
                        container_id: req.id.clone(),
                        force: true,
                        ..Default::default()
                    },
                )
                .await;
            if let Err(e) = removed {
                // A dead VM has nothing left to remove; anything else is worth a line.
                if sb.exited.borrow().is_none() {
                    tracing::warn!("{}: agent could not remove the container: {e}", req.id);
                }
            }
            for p in std::iter::once(&c.init).chain(c.execs.values()) {
                p.stop_io();
            }
            Self::clean_container_files(&sb, &req.id);
            if req.id != sb.id {
                Self::resize_host_cgroup(&sb, &req.id, None, true);
            }
        }
        self.state.inner.lock().await.pending.remove(&req.id);
        self.release_sandbox_if_idle(false).await;
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(ev::TaskDelete {
                container_id: req.id.clone(),
                pid,
                exit_status: code,
                exited_at: MessageField::some(at.clone()),
                id: req.id,
                ..Default::default()
            }),
        )
        .await;
        Ok(api::DeleteResponse {
            pid,
            exit_status: code,
            exited_at: MessageField::some(at),
            ..Default::default()
        })
    }

    async fn exec_whole(&self, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let mut inner = self.state.inner.lock().await;
        let c = inner
            .containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&format!("container {}", req.id)))?;
        if c.execs.contains_key(&req.exec_id) {
            return Err(status(
                ttrpc::Code::ALREADY_EXISTS,
                format!("exec {} already exists", req.exec_id),
            ));
        }
        if c.forgetting.contains(&req.exec_id) {
            return Err(status(
                ttrpc::Code::ALREADY_EXISTS,
                format!(
                    "exec {} is still being deleted; use the id again once its delete returns",
                    req.exec_id
                ),
            ));
        }
        if c.init.status != Status::RUNNING {
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("container {} is not running", req.id),
            ));
        }
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        if let Err(e) = serde_json::from_slice::<oci_spec::runtime::Process>(&spec) {
            return Err(status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("exec {}: invalid process spec: {e}", req.exec_id),
            ));
        }
        let fifos = Fifos {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        };
        c.execs
            .insert(req.exec_id.clone(), Process::new(fifos, spec));
        drop(inner);
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(ev::TaskExecAdded {
                container_id: req.id,
                exec_id: req.exec_id,
                ..Default::default()
            }),
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn kill_whole(&self, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let sb = self.sandbox().await?;
        let created = {
            let inner = self.state.inner.lock().await;
            let (_, p) = inner.process(&req.id, &req.exec_id)?;
            if p.status == Status::STOPPED {
                return Err(status(ttrpc::Code::NOT_FOUND, "process already finished"));
            }
            req.exec_id.is_empty() && p.status == Status::CREATED
        };
        let (id, exec_id) = (req.id.clone(), req.exec_id.clone());
        sb.agent_call(
            "SignalProcess",
            sb.agent.signal_process(
                ctx(RPC_TIMEOUT),
                &ag::SignalProcessRequest {
                    container_id: req.id,
                    exec_id: req.exec_id,
                    signal: req.signal,
                    all: req.all,
                    ..Default::default()
                },
            ),
        )
        .await?;
        if created {
            // A container killed before its start ends without one: watch it from here,
            // so that it reads STOPPED and its exit is announced, as runc's does.
            let mut inner = self.state.inner.lock().await;
            if let Some(c) = inner.containers.get_mut(&id) {
                if !c.init.watched {
                    c.init.watched = true;
                    let (tx, io) = (c.init.exit_tx.clone(), c.init.io.clone());
                    self.spawn_waiter(sb, id, exec_id, tx, io);
                }
            }
        }
        Ok(api::Empty::new())
    }

    async fn pause_whole(&self, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.freeze(req.id, true).await
    }

    async fn resume_whole(&self, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        self.freeze(req.id, false).await
    }

    async fn update_whole(&self, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let sb = self.sandbox().await?;
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        // An update without a CPU quota leaves the quota as it was (OCI: absent means
        // unchanged); -1 or 0 lifts it.
        let cpu = serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources)
            .ok()
            .filter(|r| r.cpu().as_ref().is_some_and(|c| c.quota().is_some()))
            .map(|r| cpu_quota_of(Some(&r)));
        sb.agent_call(
            "UpdateContainer",
            sb.agent.update_container(
                ctx(RPC_TIMEOUT),
                &ag::UpdateContainerRequest {
                    container_id: req.id.clone(),
                    resources_json: resources,
                    ..Default::default()
                },
            ),
        )
        .await?;
        // The host cgroup follows the container's new CPU quota.
        if let Some((quota, period)) = cpu {
            Self::resize_host_cgroup(&sb, &req.id, quota_per_period(quota, period), false);
        }
        Ok(api::Empty::new())
    }

    async fn close_io_whole(&self, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let io = {
            let inner = self.state.inner.lock().await;
            let (_, p) = inner.process(&req.id, &req.exec_id)?;
            p.io.clone()
        };
        tokio::task::spawn_blocking(move || {
            if let Some(io) = io.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                io.close_stdin(Duration::from_secs(1));
            }
        })
        .await
        .expect("close stdin task");
        Ok(api::Empty::new())
    }

    async fn shutdown_whole(&self, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if self.release_sandbox_if_idle(true).await {
            self.state.exit.signal();
        }
        Ok(api::Empty::new())
    }
}

/// What a ttrpc error says, for a log line: a status's message alone.
fn error_text(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => s.message().to_string(),
        other => other.to_string(),
    }
}

/// Runs a request's work on a task of its own and waits for it. ttrpc drops the future of
/// every request in flight on a connection that closes, and containerd's closes when it
/// stops (a restart, a crash): a create cut off while its VM boots, or a delete half-way,
/// would leave a VM, mounts and a cgroup claim that no task owns. On its own task the work
/// goes on to its end, and a restarted containerd finds the result. A request that ends
/// after its caller left has nobody to tell: a failure is logged, and a shim left with no
/// container exits (its VM stopped first), as containerd's clean-up would have had it (a
/// containerd going down deletes the task whose create it gave up on, and shuts the shim
/// down after the last delete).
async fn to_completion<T: Send + 'static>(
    service: Service,
    what: String,
    deadline: Option<Instant>,
    work: impl std::future::Future<Output = TtrpcResult<T>> + Send + 'static,
) -> TtrpcResult<T> {
    finish_alone(what, deadline, work, move || async move {
        service.exit_if_idle().await
    })
    .await
}

/// When the caller's own deadline for a request passes (ttrpc drops the request's future
/// then too, with the caller still there).
fn deadline_of(call: &TtrpcContext) -> Option<Instant> {
    (call.timeout_nano > 0).then(|| Instant::now() + Duration::from_nanos(call.timeout_nano as u64))
}

/// [`to_completion`]'s mechanism: `work` on a task of its own; `abandoned` runs after it
/// when the caller's future was dropped first, unless its `deadline` had passed by then
/// (the caller gave up waiting but is still there, and cleans up itself).
async fn finish_alone<T, A>(
    what: String,
    deadline: Option<Instant>,
    work: impl std::future::Future<Output = TtrpcResult<T>> + Send + 'static,
    abandoned: impl FnOnce() -> A + Send + 'static,
) -> TtrpcResult<T>
where
    T: Send + 'static,
    A: std::future::Future<Output = ()> + Send,
{
    use std::sync::atomic::{AtomicU8, Ordering};
    const RUNNING: u8 = 0;
    const DONE: u8 = 1;
    const LEFT: u8 = 2;
    /// Dropped with the request's future: when it returns, or when ttrpc drops it.
    struct Caller(Arc<AtomicU8>, String);
    impl Drop for Caller {
        fn drop(&mut self) {
            if self.0.swap(LEFT, Ordering::AcqRel) == RUNNING {
                tracing::info!("{}: its caller left; finishing it", self.1);
            }
        }
    }
    let state = Arc::new(AtomicU8::new(RUNNING));
    let _caller = Caller(state.clone(), what.clone());
    let run = tokio::spawn(async move {
        let result = work.await;
        if state.swap(DONE, Ordering::AcqRel) == LEFT {
            let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
            let why = match timed_out {
                true => "its caller's deadline passed",
                false => "containerd's connection closed",
            };
            match &result {
                Ok(_) => tracing::info!("{what}: done, after {why}"),
                Err(e) => tracing::warn!("{what} failed after {why}: {}", error_text(e)),
            }
            if !timed_out {
                abandoned().await;
            }
        }
        result
    });
    run.await.unwrap_or_else(|e| {
        Err(status(
            ttrpc::Code::INTERNAL,
            format!("the request's work failed: {e}"),
        ))
    })
}

/// Writes `dir/address` as containerd reads it (the socket address, no newline), through a
/// temporary file renamed over it, so that a containerd starting meanwhile reads the whole
/// address or none.
fn write_address(dir: &Path, address: &str) -> std::io::Result<()> {
    let tmp = dir.join(".address.tmp");
    std::fs::write(&tmp, address)?;
    std::fs::rename(&tmp, dir.join("address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What ttrpc does to a request in flight when containerd's connection closes: drops
    /// its future. The work goes on to its end all the same, and only then does the
    /// clean-up for an abandoned request run; a request whose caller stays runs none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_whose_caller_leaves_is_finished_and_then_cleaned_up_after() {
        let (finished_tx, finished) = tokio::sync::oneshot::channel();
        let (cleaned_tx, cleaned) = tokio::sync::oneshot::channel();
        let request = finish_alone(
            "create of t".into(),
            None,
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = finished_tx.send(());
                Ok(())
            },
            move || async move {
                let _ = cleaned_tx.send(());
            },
        );
        // The caller gives up after 50 ms: its future is dropped.
        assert!(tokio::time::timeout(Duration::from_millis(50), request)
            .await
            .is_err());
        let limit = Duration::from_secs(5);
        tokio::time::timeout(limit, finished)
            .await
            .expect("the work was cut off with its caller")
            .unwrap();
        tokio::time::timeout(limit, cleaned)
            .await
            .expect("no clean-up after the abandoned request")
            .unwrap();

        let cleaned_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = cleaned_up.clone();
        let answer = finish_alone(
            "start of t".into(),
            None,
            async { Ok(7) },
            move || async move { flag.store(true, std::sync::atomic::Ordering::SeqCst) },
        )
        .await;
        assert_eq!(answer.unwrap(), 7);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!cleaned_up.load(std::sync::atomic::Ordering::SeqCst));

        // A caller whose own deadline passed is still there: no clean-up on its behalf.
        let flag = cleaned_up.clone();
        let (finished_tx, finished) = tokio::sync::oneshot::channel();
        let request = finish_alone(
            "delete of t".into(),
            Some(Instant::now() + Duration::from_millis(50)),
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = finished_tx.send(());
                Ok(())
            },
            move || async move { flag.store(true, std::sync::atomic::Ordering::SeqCst) },
        );
        assert!(tokio::time::timeout(Duration::from_millis(50), request)
            .await
            .is_err());
        tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!cleaned_up.load(std::sync::atomic::Ordering::SeqCst));
    }
}
