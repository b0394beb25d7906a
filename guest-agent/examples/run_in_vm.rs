//! Runs one command in a busybox container inside a shoal micro-VM, the way the shim will:
//! boot the VM in-process, reach the agent over hybrid vsock, create and start the
//! container, stream its output, report its exit status, shut the VM down.
//!
//! run_in_vm KERNEL GUEST_IMAGE CMD [ARGS...]   (GUEST_IMAGE from `scripts/guest-image --test`,
//! which carries the busybox root file system at /rootfs/busybox)
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use oci_spec::runtime::{ProcessBuilder, Spec};
use shoal_agent_api::agent::*;
use shoal_agent_api::client::{connect_agent, hybrid_vsock_connect};
use shoal_agent_api::{AGENT_PORT, STDIO_PORT};
use shoal_vmm::{Console, Vm, VmConfig, VsockConfig};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kernel, image, cmd @ ..] = args.as_slice() else {
        bail!("usage: run_in_vm KERNEL GUEST_IMAGE CMD [ARGS...]");
    };
    if cmd.is_empty() {
        bail!("usage: run_in_vm KERNEL GUEST_IMAGE CMD [ARGS...]");
    }
    let dir = std::env::temp_dir().join(format!("shoal-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let uds = dir.join("vm.sock");
    let started = Instant::now();
    let vm = Vm::boot(&VmConfig {
        kernel: PathBuf::from(kernel),
        initrd: Some(PathBuf::from(image)),
        cmdline: shoal_vmm::DEFAULT_CMDLINE.into(),
        memory_mib: 256,
        vcpus: 1,
        vsock: Some(VsockConfig {
            uds_path: uds.clone(),
            cid: 3,
        }),
        disks: Vec::new(),
        shares: Vec::new(),
        nets: Vec::new(),
        free_page_reporting: true,
        console: Console::File(dir.join("console")),
        limits: Default::default(),
    })?;
    let vm_thread = std::thread::spawn(move || vm.wait());
    let agent = connect_agent(&uds, AGENT_PORT, Duration::from_secs(120)).await?;
    let ctx = || ttrpc::context::with_timeout(60_000_000_000);
    agent
        .check(ctx(), &CheckRequest::new())
        .await
        .context("agent check")?;
    eprintln!(
        "run_in_vm: VM booted and agent ready after {:?}",
        started.elapsed()
    );

    let mut out = hybrid_vsock_connect(&uds, STDIO_PORT)?;
    out.write_all(b"STREAM demo-out\n")?;
    let mut spec = Spec::default();
    spec.set_hostname(Some("shoal-demo".into()));
    spec.set_process(Some(
        ProcessBuilder::default()
            .args(cmd.to_vec())
            .env(vec!["PATH=/bin".to_string()])
            .cwd("/")
            .terminal(false)
            .build()?,
    ));
    let req = CreateContainerRequest {
        container_id: "demo".into(),
        spec_json: serde_json::to_vec(&spec)?,
        rootfs: "/rootfs/busybox".into(),
        stdio: Some(Stdio {
            stdout: "demo-out".into(),
            stderr: String::new(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    agent
        .create_container(ctx(), &req)
        .await
        .context("create container")?;
    agent
        .start_container(
            ctx(),
            &ContainerRequest {
                container_id: "demo".into(),
                ..Default::default()
            },
        )
        .await?;
    let copier = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            let _ = std::io::stdout().write_all(&buf[..n]);
        }
    });
    let exit = agent
        .wait_process(
            ctx(),
            &ProcessRequest {
                container_id: "demo".into(),
                ..Default::default()
            },
        )
        .await?;
    let _ = copier.join();
    eprintln!(
        "run_in_vm: container exited with status {}",
        exit.exit_status
    );
    agent
        .remove_container(
            ctx(),
            &RemoveContainerRequest {
                container_id: "demo".into(),
                ..Default::default()
            },
        )
        .await?;
    agent.shutdown(ctx(), &Empty::new()).await?;
    let reason = vm_thread
        .join()
        .map_err(|_| anyhow::anyhow!("VM thread panicked"))?;
    eprintln!(
        "run_in_vm: VM ended ({reason:?}) after {:?}",
        started.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::process::exit(exit.exit_status as i32);
}
