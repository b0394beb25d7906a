//! The pod's state inside the agent: its containers and their processes. Methods here are
//! blocking (libcontainer forks and waits); the ttrpc layer calls them off the async runtime.
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use libcontainer::container::{Container, ContainerStatus};
use oci_spec::runtime::{LinuxResources, Process as OciProcess, Spec};
use tokio::sync::watch;

use crate::cgroup;
use crate::error::{validate_id, AgentError, Result};
use crate::reaper::{ExitStatus, Reaper};
use crate::stdio::{ConsoleReceiver, ProcessIo, StreamRegistry, Tokens};

/// One process the agent started (a container's init or an exec).
pub struct Process {
    pub pid: i32,
    exit: watch::Receiver<Option<ExitStatus>>,
    io: Mutex<ProcessIo>,
}

impl Process {
    /// The exit status once the process has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Waits for exit, then for the output copies to finish.
    pub async fn wait(self: &Arc<Self>) -> ExitStatus {
        let mut rx = self.exit.clone();
        let status = loop {
            if let Some(s) = *rx.borrow_and_update() {
                break s;
            }
            if rx.changed().await.is_err() {
                // The reaper is gone (agent shutting down); report an abnormal end.
                break 255;
            }
        };
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            me.io.lock().unwrap_or_else(|e| e.into_inner()).drain()
        })
        .await;
        status
    }

    pub fn close_stdin(&self) {
        self.io
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .close_stdin();
    }

    pub fn resize(&self, width: u16, height: u16) -> Result<()> {
        self.io
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .resize(width, height)
    }
}

struct ContainerEntry {
    runtime: Mutex<Container>,
    bundle: PathBuf,
    /// The spec's seccomp profile, for the container's exec'd processes.
    seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
    processes: Mutex<HashMap<String, Arc<Process>>>,
}

/// Stdio of a process request.
pub struct StdioRequest {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioRequest {
    /// The stream tokens the request names.
    fn token_list(&self) -> Vec<String> {
        [&self.stdin, &self.stdout, &self.stderr]
            .into_iter()
            .filter(|t| !t.is_empty())
            .cloned()
            .collect()
    }
}

/// The pod.
pub struct Sandbox {
    state_root: PathBuf,
    bundles: PathBuf,
    reaper: Reaper,
    streams: StreamRegistry,
    containers: Mutex<HashMap<String, Arc<ContainerEntry>>>,
    ooms: Arc<(Mutex<VecDeque<String>>, Condvar)>,
    /// Console sockets made so far: each gets the next number for its name.
    consoles: std::sync::atomic::AtomicU64,
    /// The pod's resolv.conf once CreateSandbox set DNS.
    resolv_conf: Mutex<Option<PathBuf>>,
    state_dir: PathBuf,
    /// pivot_root cannot leave an initramfs (the kernel's rootfs cannot be unmounted); there
    /// containers get their root by moving it over / and chroot instead. The VM is the
    /// isolation boundary either way.
    no_pivot: bool,
}

/// Whether this process's root is the kernel's initial rootfs (an initramfs).
pub fn root_is_initramfs() -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    // Fields: id parent major:minor root mount-point options ... - fstype source super-options
    info.lines().any(|l| {
        let fields: Vec<&str> = l.split_whitespace().collect();
        let mount_point = fields.get(4).copied();
        let fstype = fields
            .iter()
            .position(|f| *f == "-")
            .and_then(|i| fields.get(i + 1))
            .copied();
        mount_point == Some("/") && fstype == Some("rootfs")
    })
}

impl Sandbox {
    /// A new console socket's path: numbered, not named after the container or exec, whose
    /// ids (CRI's are 64 characters, up to 128 allowed) would overflow a unix socket's
    /// 108 bytes.
    fn console_socket(&self) -> PathBuf {
        use std::sync::atomic::Ordering;
        let n = self.consoles.fetch_add(1, Ordering::Relaxed);
        self.bundles.join(format!(".console-{n}.sock"))
    }

    /// A sandbox keeping libcontainer state and bundles under `state_dir`.
    pub fn new(state_dir: &Path, reaper: Reaper, streams: StreamRegistry) -> Result<Arc<Sandbox>> {
        let state_root = state_dir.join("containers");
        let bundles = state_dir.join("bundles");
        for d in [&state_root, &bundles] {
            std::fs::create_dir_all(d)
                .map_err(|e| AgentError::io(format!("create {}", d.display()), e))?;
        }
        let sandbox = Arc::new(Sandbox {
            state_root,
            bundles,
            reaper,
            streams,
            containers: Mutex::new(HashMap::new()),
            consoles: std::sync::atomic::AtomicU64::new(0),
            ooms: Arc::new((Mutex::new(VecDeque::new()), Condvar::new())),
            no_pivot: root_is_initramfs(),
            resolv_conf: Mutex::new(None),
            state_dir: state_dir.to_path_buf(),
        });
        if sandbox.no_pivot {
            tracing::info!("root is an initramfs: containers use chroot instead of pivot_root");
        }
        sandbox.watch_ooms();
        Ok(sandbox)
    }

    fn entry(&self, id: &str) -> Result<Arc<ContainerEntry>> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NoSuchContainer(id.into()))
    }

    /// A process of a container ("" = its init process).
    pub fn process(&self, container_id: &str, exec_id: &str) -> Result<Arc<Process>> {
        let entry = self.entry(container_id)?;
        let procs = entry.processes.lock().unwrap_or_else(|e| e.into_inner());
        procs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| AgentError::NoSuchProcess {
                container_id: container_id.into(),
                exec_id: exec_id.into(),
            })
    }

    fn refreshed_status(entry: &ContainerEntry) -> ContainerStatus {
        let mut c = entry.runtime.lock().unwrap_or_else(|e| e.into_inner());
        let _ = c.refresh_status();
        c.status()
    }

    /// Creates a container from its OCI spec; its init process waits for `start`.
    pub fn create_container(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &str,
        stdio: StdioRequest,
    ) -> Result<i32> {
        let tokens = stdio.token_list();
        let created = self.create_container_with(id, spec_json, rootfs, stdio);
        self.discard_streams_if_failed(&tokens, created)
    }

    /// Closes the streams of a process request that failed (see [`StreamRegistry::discard`]).
    fn discard_streams_if_failed<T>(&self, tokens: &[String], result: Result<T>) -> Result<T> {
        if result.is_err() {
            self.streams.discard(tokens);
        }
        result
    }

    fn create_container_with(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &str,
        stdio: StdioRequest,
    ) -> Result<i32> {
        validate_id(id)?;
        if self
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
        {
            return Err(AgentError::ContainerExists(id.into()));
        }
        let mut spec: Spec = serde_json::from_slice(spec_json)
            .map_err(|e| AgentError::InvalidSpec(e.to_string()))?;
        let Some(process) = spec.process_mut() else {
            return Err(AgentError::InvalidSpec("no process".into()));
        };
        // libcontainer 0.7 tests `noNewPrivileges` for presence, not truth: an outright
        // `false` made it load the seccomp filter after dropping the capabilities that
        // loading needs without no_new_privs, and the create failed ("failed to load
        // seccomp context"). Absent means the same to the spec.
        if process.no_new_privileges() == Some(false) {
            process.set_no_new_privileges(None);
        }
        let root = if rootfs.is_empty() {
            spec.root()
                .as_ref()
                .map(|r| r.path().clone())
                .ok_or_else(|| AgentError::InvalidSpec("no root and no rootfs given".into()))?
        } else {
            PathBuf::from(rootfs)
        };
        if !root.is_absolute() || !root.is_dir() {
            return Err(AgentError::MissingRootfs {
                id: id.into(),
                path: root.display().to_string(),
            });
        }
        let mut root_cfg = spec.root().clone().unwrap_or_default();
        root_cfg.set_path(root);
        spec.set_root(Some(root_cfg));
        let mut linux = spec.linux().clone().unwrap_or_default();
        linux.set_cgroups_path(Some(cgroup::cgroups_path(id)));
        rootfs_propagation_for_libcontainer(&mut linux)?;
        check_sysctls(&linux, Path::new("/proc/sys"))?;
        spec.set_linux(Some(linux));
        self.join_pod_namespaces(&mut spec)?;
        if let Some(resolv) = self
            .resolv_conf
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
        {
            add_resolv_conf(&mut spec, resolv);
        }

        let bundle = self.bundles.join(id);
        std::fs::create_dir_all(&bundle)
            .map_err(|e| AgentError::io(format!("create bundle {}", bundle.display()), e))?;
        let cleanup_bundle = |e| {
            let _ = std::fs::remove_dir_all(&bundle);
            e
        };
        spec.save(bundle.join("config.json"))
            .map_err(|e| AgentError::InvalidSpec(e.to_string()))
            .map_err(cleanup_bundle)?;

        let console = stdio
            .terminal
            .then(|| ConsoleReceiver::listen(&self.console_socket()))
            .transpose()
            .map_err(cleanup_bundle)?;
        let console_path = console.as_ref().map(|c| c.path().to_path_buf());
        let (mut io, child, outputs) =
            ProcessIo::prepare(&self.streams, tokens(&stdio), console).map_err(cleanup_bundle)?;
        // A network namespace of its own (no path to join): created with the container.
        let own_netns = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|nss| {
                nss.iter().any(|n| {
                    n.typ() == oci_spec::runtime::LinuxNamespaceType::Network && n.path().is_none()
                })
            });
        let job = crate::spawn::Job {
            id: id.into(),
            state_root: self.state_root.clone(),
            console_socket: console_path,
            kind: crate::spawn::JobKind::Create {
                bundle: bundle.clone(),
                no_pivot: self.no_pivot,
            },
        };
        let container = {
            let _fork = self.reaper.fork_lock();
            crate::spawn::make(&job, child).and_then(|pid| {
                Container::load(self.state_root.join(id)).map_err(|e| {
                    // Made but not loadable: take it down, so that the id can be used again.
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    let _ = std::fs::remove_dir_all(self.state_root.join(id));
                    AgentError::runtime(id, "load")(e)
                })
            })
        }
        .map_err(cleanup_bundle)?;
        let mut container = container;
        let pid = container.pid().map(|p| p.as_raw()).unwrap_or(0);
        let exit = self.reaper.watch(pid);
        if !own_pid_namespace(&spec) {
            kill_the_rest_when_it_ends(id, exit.clone());
        }
        let lo = match own_netns {
            true => crate::network::loopback_up_in(pid),
            false => Ok(()),
        };
        if let Err(e) = lo.and_then(|()| io.start(outputs)) {
            // Without its stdio the container is of no use: take it down again.
            let _ = container.delete(true);
            return Err(cleanup_bundle(e));
        }
        let init = Arc::new(Process {
            pid,
            exit,
            io: Mutex::new(io),
        });
        let entry = ContainerEntry {
            runtime: Mutex::new(container),
            bundle,
            seccomp: spec.linux().as_ref().and_then(|l| l.seccomp().clone()),
            processes: Mutex::new(HashMap::from([(String::new(), init)])),
        };
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.into(), Arc::new(entry));
        Ok(pid)
    }

    /// Starts a created container's init process.
    pub fn start_container(&self, id: &str) -> Result<()> {
        let entry = self.entry(id)?;
        let status = Self::refreshed_status(&entry);
        if status != ContainerStatus::Created {
            return Err(AgentError::wrong_state(id, status, "start", "created"));
        }
        let _fork = self.reaper.fork_lock();
        let mut runtime = entry.runtime.lock().unwrap_or_else(|e| e.into_inner());
        runtime.start().map_err(AgentError::runtime(id, "start"))
    }

    /// Starts an extra process in a running container.
    pub fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: StdioRequest,
    ) -> Result<i32> {
        let tokens = stdio.token_list();
        let started = self.exec_process_with(id, exec_id, process_json, stdio);
        self.discard_streams_if_failed(&tokens, started)
    }

    fn exec_process_with(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: StdioRequest,
    ) -> Result<i32> {
        validate_id(exec_id)?;
        let entry = self.entry(id)?;
        if entry
            .processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(exec_id)
        {
            return Err(AgentError::ProcessExists {
                container_id: id.into(),
                exec_id: exec_id.into(),
            });
        }
        let mut process: OciProcess = serde_json::from_slice(process_json)
            .map_err(|e| AgentError::InvalidProcess(e.to_string()))?;
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(AgentError::InvalidProcess("no args".into()));
        }
        let status = Self::refreshed_status(&entry);
        if status != ContainerStatus::Running {
            return Err(AgentError::wrong_state(id, status, "exec", "running"));
        }
        let seccomp = crate::exec_seccomp::prepare(&mut process, entry.seccomp.as_ref())?;
        let path = entry.bundle.join(format!("exec-{exec_id}.json"));
        let json =
            serde_json::to_vec(&process).map_err(|e| AgentError::InvalidProcess(e.to_string()))?;
        std::fs::write(&path, json)
            .map_err(|e| AgentError::io(format!("write {}", path.display()), e))?;

        let console = stdio
            .terminal
            .then(|| ConsoleReceiver::listen(&self.console_socket()))
            .transpose()?;
        let console_path = console.as_ref().map(|c| c.path().to_path_buf());
        let (mut io, child, outputs) = ProcessIo::prepare(&self.streams, tokens(&stdio), console)?;
        let job = crate::spawn::Job {
            id: id.into(),
            state_root: self.state_root.clone(),
            console_socket: console_path,
            kind: crate::spawn::JobKind::Exec {
                process: path.clone(),
                seccomp: seccomp.map(Box::new),
            },
        };
        let built = {
            let _fork = self.reaper.fork_lock();
            crate::spawn::make(&job, child)
        };
        let _ = std::fs::remove_file(&path);
        let pid = built?;
        let exit = self.reaper.watch(pid);
        if let Err(e) = io.start(outputs) {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            return Err(e);
        }
        let proc = Arc::new(Process {
            pid,
            exit,
            io: Mutex::new(io),
        });
        entry
            .processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(exec_id.into(), proc);
        Ok(pid)
    }

    /// Sends `signal` to one process, or to every process of the container with `all`.
    pub fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let entry = self.entry(id)?;
        let sig = nix::sys::signal::Signal::try_from(signal as i32)
            .map_err(|e| AgentError::sys(format!("signal {signal}"), e))?;
        if all {
            for pid in cgroup::pids(&cgroup::dir(id)) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
            }
            return Ok(());
        }
        let proc = self.process(id, exec_id)?;
        if proc.exit_status().is_some() {
            return Err(AgentError::ProcessExited {
                container_id: id.into(),
                exec_id: exec_id.into(),
            });
        }
        if exec_id.is_empty() && Self::refreshed_status(&entry) == ContainerStatus::Created {
            // Not started yet: libcontainer knows how to kill a created container.
            let lc_sig = libcontainer::signal::Signal::try_from(signal as i32)
                .map_err(|_| AgentError::InvalidProcess(format!("unknown signal {signal}")))?;
            let mut runtime = entry.runtime.lock().unwrap_or_else(|e| e.into_inner());
            return runtime
                .kill(lc_sig, false)
                .map_err(AgentError::runtime(id, "kill"));
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(proc.pid), sig)
            .map_err(|e| AgentError::sys(format!("signal process {}", proc.pid), e))
    }

    pub fn pause(&self, id: &str) -> Result<()> {
        let entry = self.entry(id)?;
        let mut c = entry.runtime.lock().unwrap_or_else(|e| e.into_inner());
        let _ = c.refresh_status();
        c.pause().map_err(AgentError::runtime(id, "pause"))
    }

    pub fn resume(&self, id: &str) -> Result<()> {
        let entry = self.entry(id)?;
        let mut c = entry.runtime.lock().unwrap_or_else(|e| e.into_inner());
        let _ = c.refresh_status();
        c.resume().map_err(AgentError::runtime(id, "resume"))
    }

    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        self.entry(id)?;
        let resources: LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| AgentError::InvalidResources(e.to_string()))?;
        cgroup::update(&cgroup::dir(id), &resources)
    }

    pub fn stats(&self, id: &str) -> Result<cgroup::Stats> {
        self.entry(id)?;
        Ok(cgroup::stats(&cgroup::dir(id)))
    }

    pub fn pids(&self, id: &str) -> Result<Vec<u32>> {
        self.entry(id)?;
        Ok(cgroup::pids(&cgroup::dir(id)))
    }

    /// Forgets exec process `exec_id` of container `id` once it has exited: its record,
    /// stdio and id go, so the id can be used again (a probe that reuses its exec id, as
    /// `ctr task exec --exec-id` allows after a delete). The init process goes with the
    /// container ([`Sandbox::remove`]).
    pub fn remove_process(&self, id: &str, exec_id: &str) -> Result<()> {
        if exec_id.is_empty() {
            return Err(AgentError::InvalidRequest(format!(
                "the init process of container {id} goes with the container (RemoveContainer)"
            )));
        }
        let entry = self.entry(id)?;
        let mut procs = entry.processes.lock().unwrap_or_else(|e| e.into_inner());
        let Some(proc) = procs.get(exec_id) else {
            return Err(AgentError::NoSuchProcess {
                container_id: id.into(),
                exec_id: exec_id.into(),
            });
        };
        if proc.exit_status().is_none() {
            return Err(AgentError::ProcessRunning {
                container_id: id.into(),
                exec_id: exec_id.into(),
            });
        }
        procs.remove(exec_id);
        Ok(())
    }

    /// Deletes a container: its processes (when `force` or already stopped), cgroup, state and bundle.
    pub fn remove(&self, id: &str, force: bool) -> Result<()> {
        let entry = self.entry(id)?;
        let status = Self::refreshed_status(&entry);
        if !force && matches!(status, ContainerStatus::Running | ContainerStatus::Paused) {
            return Err(AgentError::wrong_state(
                id,
                status,
                "remove",
                "stopped (or force)",
            ));
        }
        {
            let _fork = self.reaper.fork_lock();
            let mut c = entry.runtime.lock().unwrap_or_else(|e| e.into_inner());
            c.delete(true).map_err(AgentError::runtime(id, "delete"))?;
        }
        let _ = std::fs::remove_dir_all(&entry.bundle);
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(())
    }

    fn container_ids(&self) -> Vec<String> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Kills and deletes every container (shutdown).
    pub fn remove_all(&self) {
        for id in self.container_ids() {
            if let Err(e) = self.remove(&id, true) {
                tracing::warn!("shutdown: {e}");
            }
        }
    }

    /// Blocks until a container's cgroup records an OOM kill; returns the container id.
    pub fn next_oom(&self, timeout: Duration) -> Option<String> {
        let (queue, cv) = &*self.ooms;
        let guard = queue.lock().unwrap_or_else(|e| e.into_inner());
        let (mut guard, _) = cv
            .wait_timeout_while(guard, timeout, |q| q.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        guard.pop_front()
    }

    /// Polls every container's `memory.events` for new OOM kills.
    fn watch_ooms(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("oom-watch".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                let mut seen: HashMap<String, u64> = HashMap::new();
                loop {
                    std::thread::sleep(Duration::from_millis(200));
                    let Some(sandbox) = weak.upgrade() else {
                        return;
                    };
                    let ids = sandbox.container_ids();
                    seen.retain(|id, _| ids.contains(id));
                    for id in ids {
                        let kills = cgroup::stats(&cgroup::dir(&id)).memory_oom_kills;
                        let before = seen.insert(id.clone(), kills).unwrap_or(0);
                        if kills > before {
                            let (queue, cv) = &*sandbox.ooms;
                            queue
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push_back(id);
                            cv.notify_all();
                        }
                    }
                }
            });
    }
}

/// CRI annotations naming a container's role in its pod.
const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

impl Sandbox {
    /// Pod-wide settings: the guest's hostname (guest only) and DNS for every container.
    pub fn configure(
        &self,
        hostname: &str,
        dns_servers: &[String],
        dns_search: &[String],
        set_hostname: bool,
    ) -> Result<()> {
        if !hostname.is_empty() && set_hostname {
            crate::init::set_hostname(hostname)?;
        }
        if !dns_servers.is_empty() || !dns_search.is_empty() {
            let text = crate::init::resolv_conf(dns_servers, dns_search)?;
            let path = self.state_dir.join("resolv.conf");
            std::fs::write(&path, text)
                .map_err(|e| AgentError::io(format!("write {}", path.display()), e))?;
            *self.resolv_conf.lock().unwrap_or_else(|e| e.into_inner()) = Some(path);
        }
        Ok(())
    }

    /// A CRI pod's containers join the namespaces of its sandbox (pause) container. CRI fills
    /// the spec with paths of host processes, which mean nothing in the guest; they are
    /// pointed at the sandbox container's init process here instead.
    fn join_pod_namespaces(&self, spec: &mut Spec) -> Result<()> {
        use oci_spec::runtime::LinuxNamespaceType as Ns;
        let Some(annotations) = spec.annotations().clone() else {
            return Ok(());
        };
        if annotations.get(CRI_CONTAINER_TYPE).map(String::as_str) != Some("container") {
            return Ok(());
        }
        let Some(sandbox_id) = annotations.get(CRI_SANDBOX_ID) else {
            return Err(AgentError::InvalidSpec(format!(
                "{CRI_CONTAINER_TYPE}=container without {CRI_SANDBOX_ID}"
            )));
        };
        let pod = self.process(sandbox_id, "").map_err(|_| {
            AgentError::InvalidSpec(format!(
                "pod sandbox container {sandbox_id} does not exist in this VM"
            ))
        })?;
        if pod.exit_status().is_some() {
            return Err(AgentError::InvalidSpec(format!(
                "pod sandbox container {sandbox_id} has exited"
            )));
        }
        let Some(mut linux) = spec.linux().clone() else {
            return Ok(());
        };
        let mut namespaces = linux.namespaces().clone().unwrap_or_default();
        for ns in namespaces.iter_mut() {
            let name = match ns.typ() {
                Ns::Network => "net",
                Ns::Ipc => "ipc",
                Ns::Uts => "uts",
                Ns::Pid => "pid",
                _ => continue,
            };
            if ns.path().is_some() {
                ns.set_path(Some(PathBuf::from(format!("/proc/{}/ns/{name}", pod.pid))));
            }
        }
        linux.set_namespaces(Some(namespaces));
        spec.set_linux(Some(linux));
        Ok(())
    }
}

/// Puts the spec's `rootfsPropagation` in the words libcontainer 0.7 knows.
///
/// containerd's CRI plugin writes `rshared` for a Bidirectional volume and `rslave` for a
/// HostToContainer one, as runc accepts; libcontainer 0.7 knows only `shared`, `slave`,
/// `private` and `unbindable` there and failed the create ("failed to prepare rootfs",
/// issue 22). It applies the root's propagation recursively anyway, so the `r` forms mean
/// the same. Anything else is refused by name. (Propagation holds inside the guest, between
/// the pod's containers; mounts made on the host later do not cross virtio-fs.)
fn rootfs_propagation_for_libcontainer(linux: &mut oci_spec::runtime::Linux) -> Result<()> {
    let Some(asked) = linux.rootfs_propagation().clone() else {
        return Ok(());
    };
    let plain = match asked.as_str() {
        "shared" | "rshared" => "shared",
        "slave" | "rslave" => "slave",
        "private" | "rprivate" => "private",
        "unbindable" | "runbindable" => "unbindable",
        _ => {
            return Err(AgentError::InvalidSpec(format!(
                "linux.rootfsPropagation {asked:?}: expected one of shared, slave, private, \
                 unbindable, or their r-prefixed forms"
            )))
        }
    };
    linux.set_rootfs_propagation(Some(plain.to_string()));
    Ok(())
}

/// Refuses a sysctl the guest kernel does not have, by name: libcontainer's own failure
/// says only "open subpath in procfs failed" (issue 22, where the guest kernel lacked
/// System V IPC and so `kernel.shm_rmid_forced`). `proc_sys` is /proc/sys; the file
/// looked for is the one libcontainer opens, the name with its dots made slashes.
fn check_sysctls(linux: &oci_spec::runtime::Linux, proc_sys: &Path) -> Result<()> {
    for name in linux.sysctl().iter().flat_map(|s| s.keys()) {
        let relative = name.replace('.', "/");
        if relative
            .split('/')
            .any(|part| part.is_empty() || part == "..")
        {
            return Err(AgentError::InvalidSpec(format!(
                "sysctl {name:?} is not a sysctl name"
            )));
        }
        if !proc_sys.join(&relative).exists() {
            return Err(AgentError::InvalidSpec(format!(
                "sysctl {name}: the guest kernel has no such setting (no /proc/sys/{relative})"
            )));
        }
    }
    Ok(())
}

/// Whether the container's first process is the init of a PID namespace of its own (not
/// the pod's, joined by path, nor the guest's, with no `pid` entry).
fn own_pid_namespace(spec: &Spec) -> bool {
    use oci_spec::runtime::LinuxNamespaceType as Ns;
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|n| {
            n.iter()
                .any(|ns| ns.typ() == Ns::Pid && ns.path().is_none())
        })
}

/// For a container without a PID namespace of its own: when its first process ends, the
/// kernel does not end the rest as it does a namespace's, so they are killed with the
/// container's cgroup (`cgroup.kill`), as runc does. They would otherwise outlive the
/// container and, holding its output open, keep its exit from ever being reported (a pod
/// whose nginx workers outlive their master never stopped).
fn kill_the_rest_when_it_ends(
    id: &str,
    mut exit: tokio::sync::watch::Receiver<Option<ExitStatus>>,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(
            "container {id}: no runtime to watch its end; its other processes may outlive it"
        );
        return;
    };
    let (id, kill) = (id.to_string(), cgroup::dir(id).join("cgroup.kill"));
    runtime.spawn(async move {
        while exit.borrow_and_update().is_none() {
            if exit.changed().await.is_err() {
                return;
            }
        }
        match std::fs::write(&kill, "1") {
            Ok(()) => {}
            // Removed with the container meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                "container {id}: cannot kill the processes left after its first: {e}"
            ),
        }
    });
}

/// With pod DNS configured (CreateSandbox), containers see it as /etc/resolv.conf.
fn add_resolv_conf(spec: &mut Spec, source: &Path) {
    let mut mounts: Vec<_> = spec.mounts().clone().unwrap_or_default();
    mounts.retain(|m| m.destination() != Path::new("/etc/resolv.conf"));
    let mut m = oci_spec::runtime::Mount::default();
    m.set_destination(PathBuf::from("/etc/resolv.conf"));
    m.set_source(Some(source.to_path_buf()));
    m.set_typ(Some("bind".into()));
    m.set_options(Some(vec!["rbind".into(), "ro".into()]));
    mounts.push(m);
    spec.set_mounts(Some(mounts));
}

fn tokens(s: &StdioRequest) -> Tokens<'_> {
    Tokens {
        stdin: &s.stdin,
        stdout: &s.stdout,
        stderr: &s.stderr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctls_the_kernel_lacks_are_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("shoal-sysctl-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("net/ipv4")).unwrap();
        std::fs::write(dir.join("net/ipv4/tcp_syncookies"), "1\n").unwrap();
        let with = |names: &[&str]| {
            let mut linux = oci_spec::runtime::Linux::default();
            linux.set_sysctl(Some(
                names
                    .iter()
                    .map(|n| (n.to_string(), "1".to_string()))
                    .collect(),
            ));
            check_sysctls(&linux, &dir).map_err(|e| e.to_string())
        };
        assert!(with(&[]).is_ok());
        assert!(with(&["net.ipv4.tcp_syncookies"]).is_ok());
        let e = with(&["kernel.shm_rmid_forced"]).unwrap_err();
        assert!(
            e.contains("kernel.shm_rmid_forced: the guest kernel has no such setting"),
            "{e}"
        );
        for bad in ["net..ipv4", "net/../../etc", ".net", ""] {
            let e = with(&[bad]).unwrap_err();
            assert!(e.contains("is not a sysctl name"), "{bad}: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn cri_rootfs_propagation_words_are_taken_and_unknown_ones_refused() {
        for (asked, plain) in [
            ("rshared", "shared"),
            ("rslave", "slave"),
            ("rprivate", "private"),
            ("runbindable", "unbindable"),
            ("shared", "shared"),
            ("slave", "slave"),
        ] {
            let mut linux = oci_spec::runtime::Linux::default();
            linux.set_rootfs_propagation(Some(asked.into()));
            rootfs_propagation_for_libcontainer(&mut linux).unwrap();
            assert_eq!(
                linux.rootfs_propagation().as_deref(),
                Some(plain),
                "{asked}"
            );
        }
        let mut linux = oci_spec::runtime::Linux::default();
        rootfs_propagation_for_libcontainer(&mut linux).unwrap();
        assert_eq!(linux.rootfs_propagation(), &None);
        linux.set_rootfs_propagation(Some("rsharde".into()));
        let e = rootfs_propagation_for_libcontainer(&mut linux)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"rsharde\""), "{e}");
    }
}
