//! The ttrpc service: thin translation from requests to [`Sandbox`] calls. Blocking work
//! runs on tokio's blocking pool; nothing here panics on any request.
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use shoal_agent_api::agent::*;
use shoal_agent_api::agent_ttrpc::Agent;
use tokio::sync::Notify;
use ttrpc::r#async::TtrpcContext;

use crate::error::{AgentError, Result};
use crate::sandbox::{Sandbox, StdioRequest};

/// The agent service.
pub struct AgentService {
    pub sandbox: Arc<Sandbox>,
    /// Notified when Shutdown is requested.
    pub shutdown: Arc<Notify>,
    /// The sandbox id CreateSandbox gave, reported by Check.
    pub sandbox_id: std::sync::Mutex<String>,
}

/// Runs blocking sandbox work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> ttrpc::Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Into::into),
        Err(e) => Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
            ttrpc::Code::INTERNAL,
            format!("agent task failed: {e}"),
        ))),
    }
}

fn stdio(s: &Stdio) -> StdioRequest {
    StdioRequest {
        stdin: s.stdin.clone(),
        stdout: s.stdout.clone(),
        stderr: s.stderr.clone(),
        terminal: s.terminal,
    }
}

#[async_trait]
impl Agent for AgentService {
    async fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        Ok(CheckResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sandbox_id: self
                .sandbox_id
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            ..Default::default()
        })
    }

    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        let sb = self.sandbox.clone();
        // Only PID 1 of a VM owns its machine's hostname and network; an agent on a host
        // leaves them alone.
        let in_vm = std::process::id() == 1;
        let sandbox_id = req.sandbox_id.clone();
        blocking(move || {
            crate::init::check_entropy(&req.entropy)?;
            if in_vm {
                crate::init::take_host_time_and_entropy(req.host_time_unix_ns, &req.entropy)?;
            }
            if !req.shared_fs_tag.is_empty() {
                crate::init::mount_share(&req.shared_fs_tag, shoal_agent_api::GUEST_SHARED_DIR)?;
            }
            if in_vm {
                crate::network::configure(&req.interfaces, &req.routes)?;
            } else if !req.interfaces.is_empty() {
                return Err(AgentError::Unsupported("network interfaces outside a VM"));
            }
            sb.configure(&req.hostname, &req.dns_servers, &req.dns_search, in_vm)
        })
        .await?;
        *self.sandbox_id.lock().unwrap_or_else(|e| e.into_inner()) = sandbox_id;
        Ok(Empty::new())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let sb = self.sandbox.clone();
        let stdio = stdio(req.stdio.as_ref().unwrap_or_default());
        let pid = blocking(move || {
            sb.create_container(&req.container_id, &req.spec_json, &req.rootfs, stdio)
        })
        .await?;
        Ok(CreateContainerResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let sb = self.sandbox.clone();
        blocking(move || sb.start_container(&req.container_id)).await?;
        Ok(Empty::new())
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let sb = self.sandbox.clone();
        let stdio = stdio(req.stdio.as_ref().unwrap_or_default());
        let pid = blocking(move || {
            sb.exec_process(&req.container_id, &req.exec_id, &req.process_json, stdio)
        })
        .await?;
        Ok(ExecProcessResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        let sb = self.sandbox.clone();
        blocking(move || sb.signal(&req.container_id, &req.exec_id, req.signal, req.all)).await?;
        Ok(Empty::new())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let proc = self.sandbox.process(&req.container_id, &req.exec_id)?;
        let status = proc.wait().await;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        Ok(WaitProcessResponse {
            exit_status: status,
            exited_at_unix_nanos: now,
            ..Default::default()
        })
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        let proc = self.sandbox.process(&req.container_id, &req.exec_id)?;
        let clamp = |v: u32| v.min(u32::from(u16::MAX)) as u16;
        proc.resize(clamp(req.width), clamp(req.height))?;
        Ok(Empty::new())
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        self.sandbox
            .process(&req.container_id, &req.exec_id)?
            .close_stdin();
        Ok(Empty::new())
    }

    async fn remove_process(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.sandbox
            .remove_process(&req.container_id, &req.exec_id)?;
        Ok(Empty::new())
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let sb = self.sandbox.clone();
        blocking(move || sb.update(&req.container_id, &req.resources_json)).await?;
        Ok(Empty::new())
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        let sb = self.sandbox.clone();
        let s = blocking(move || sb.stats(&req.container_id)).await?;
        Ok(StatsContainerResponse {
            cpu_usage_usec: s.cpu_usage_usec,
            cpu_user_usec: s.cpu_user_usec,
            cpu_system_usec: s.cpu_system_usec,
            memory_current: s.memory_current,
            memory_max: s.memory_max,
            memory_oom_kills: s.memory_oom_kills,
            pids_current: s.pids_current,
            pids_max: s.pids_max,
            io_read_bytes: s.io_read_bytes,
            io_write_bytes: s.io_write_bytes,
            ..Default::default()
        })
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let sb = self.sandbox.clone();
        blocking(move || sb.pause(&req.container_id)).await?;
        Ok(Empty::new())
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let sb = self.sandbox.clone();
        blocking(move || sb.resume(&req.container_id)).await?;
        Ok(Empty::new())
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let sb = self.sandbox.clone();
        let pids = blocking(move || sb.pids(&req.container_id)).await?;
        Ok(ListProcessesResponse {
            pids,
            ..Default::default()
        })
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let sb = self.sandbox.clone();
        blocking(move || sb.remove(&req.container_id, req.force)).await?;
        Ok(Empty::new())
    }

    async fn wait_oom_event(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<OomEvent> {
        loop {
            let sb = self.sandbox.clone();
            if let Some(id) = blocking(move || Ok(sb.next_oom(Duration::from_secs(30)))).await? {
                return Ok(OomEvent {
                    container_id: id,
                    ..Default::default()
                });
            }
        }
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<Empty> {
        self.shutdown.notify_one();
        Ok(Empty::new())
    }
}
