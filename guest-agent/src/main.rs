//! `shoal-agent [--listen vsock:PORT|unix:PATH] [--state-dir DIR]`
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use shoal_agent::{
    init, reaper::Reaper, sandbox::Sandbox, service::AgentService, spawn, stdio::StreamRegistry,
};
use tokio::sync::Notify;

/// shoal's guest agent.
#[derive(Parser, Debug)]
#[command(name = "shoal-agent", version)]
struct Args {
    /// Where the ttrpc service listens: `vsock:PORT` (in a VM) or `unix:PATH` (on a host).
    /// Stdio streams use vsock PORT+1, or the unix socket PATH.io.
    #[arg(long, default_value = "vsock:1024")]
    listen: String,
    /// Directory for container state and bundles.
    #[arg(long, default_value = "/run/shoal")]
    state_dir: PathBuf,
}

enum Listen {
    Vsock(u32),
    Unix(PathBuf),
}

fn parse_listen(s: &str) -> anyhow::Result<Listen> {
    if let Some(port) = s.strip_prefix("vsock:") {
        Ok(Listen::Vsock(port.parse().with_context(|| {
            format!("bad vsock port in --listen {s}")
        })?))
    } else if let Some(path) = s.strip_prefix("unix:") {
        Ok(Listen::Unix(PathBuf::from(path)))
    } else {
        bail!("--listen must be vsock:PORT or unix:PATH, not {s}")
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| "info,libcgroups=error,libcontainer=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(spawn::HELPER_ARG)) {
        spawn::helper_main();
    }
    let pid1 = std::process::id() == 1;
    if let Err(e) = run(Args::parse(), pid1) {
        eprintln!("shoal-agent: {e:#}");
        if pid1 {
            init::power_off();
        }
        std::process::exit(1);
    }
    if pid1 {
        init::power_off();
    }
}

fn run(args: Args, pid1: bool) -> anyhow::Result<()> {
    let listen = parse_listen(&args.listen)?;
    if pid1 {
        init::mount_basics().context("PID 1 set-up")?;
    } else {
        // Container processes are reparented to the agent, which must reap them.
        nix::sys::prctl::set_child_subreaper(true).context("become a child subreaper")?;
    }
    match init::prepare_cgroups() {
        Ok(()) => {}
        // In a guest this is fatal; an agent on a host without cgroup v2 still answers, and
        // container creation then fails with a message naming the cgroup problem.
        Err(e) if pid1 => return Err(e).context("cgroup v2 set-up"),
        Err(e) => tracing::warn!("cgroup v2 set-up: {e}; containers cannot be created here"),
    }
    let reaper = Reaper::start().context("start the reaper")?;
    let streams = StreamRegistry::default();
    let address = match &listen {
        Listen::Vsock(port) => {
            streams
                .serve_vsock(port + 1)
                .with_context(|| format!("listen for stdio on vsock port {}", port + 1))?;
            format!("vsock://-1:{port}")
        }
        Listen::Unix(path) => {
            let io = PathBuf::from(format!("{}.io", path.display()));
            streams
                .serve_unix(&io)
                .with_context(|| format!("listen for stdio on {}", io.display()))?;
            let _ = std::fs::remove_file(path);
            format!("unix://{}", path.display())
        }
    };
    let sandbox = Sandbox::new(&args.state_dir, reaper, streams)?;
    let shutdown = Arc::new(Notify::new());
    let service = AgentService {
        sandbox: sandbox.clone(),
        shutdown: shutdown.clone(),
        sandbox_id: Default::default(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .thread_stack_size(256 * 1024)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let served = runtime.block_on(async move {
        let services = shoal_agent_api::agent_ttrpc::create_agent(Arc::new(service));
        let mut server = ttrpc::r#async::Server::new()
            .bind(&address)
            .with_context(|| format!("listen on {address}"))?
            .register_service(services);
        server
            .start()
            .await
            .with_context(|| format!("serve on {address}"))?;
        tracing::info!(%address, "shoal-agent ready");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = shutdown.notified() => tracing::info!("shutdown requested"),
            _ = term.recv() => tracing::info!("SIGTERM"),
        }
        // The shim keeps long polls open (OOM events, waits): don't wait for them to finish.
        let _ =
            tokio::time::timeout(std::time::Duration::from_millis(300), server.shutdown()).await;
        anyhow::Ok(())
    });
    // Blocking tasks may sit in long polls (OOM events wait up to 30 s): dropping the runtime
    // would wait for them, and the VM's power-off with it.
    runtime.shutdown_background();
    served?;
    sandbox.remove_all();
    if let Listen::Unix(path) = &listen {
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(format!("{}.io", path.display()));
    }
    Ok(())
}
