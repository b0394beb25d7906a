//! Container start latency through the agent vs `runc run`, same bundle, same run (prints
//! figures, asserts nothing). Each sample is a whole container life: create, start, wait
//! for exit, delete — `runc run` does exactly that; the agent does it over ttrpc.
//! Needs root, cgroup v2 and Debian's runc; `scripts/bench` runs it (in the nested lab on
//! cgroup v1 hosts, where the latency is emulated and labelled so).
//!
//!   SHOAL_BENCH_RUNS   samples per runtime (default 200)
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use oci_spec::runtime::{ProcessBuilder, RootBuilder, Spec};
use shoal_agent_api::agent::*;
use shoal_agent_api::agent_ttrpc::AgentClient;

fn rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    for d in ["proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/true")).unwrap();
    root
}

fn spec(root: &Path) -> Spec {
    let mut spec = Spec::default();
    spec.set_process(Some(
        ProcessBuilder::default()
            .args(vec!["/bin/true".to_string()])
            .cwd("/")
            .terminal(false)
            .build()
            .unwrap(),
    ));
    spec.set_root(Some(
        RootBuilder::default()
            .path(root)
            .readonly(false)
            .build()
            .unwrap(),
    ));
    spec
}

fn report(name: &str, mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pick = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{name:<40} median {:>8.2} ms  p99 {:>8.2} ms  min {:>8.2} ms  (n={})",
        pick(0.5),
        pick(0.99),
        v[0],
        v.len()
    );
    pick(0.5)
}

fn main() {
    if !nix::unistd::Uid::effective().is_root()
        || !Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
    {
        eprintln!("agent_vs_runc: needs root and cgroup v2 at /sys/fs/cgroup (scripts/bench runs it in the lab otherwise)");
        std::process::exit(2);
    }
    let runs: usize = std::env::var("SHOAL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = std::env::temp_dir().join(format!("shoal-bench-agent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let root = rootfs(&dir);
    let spec = spec(&root);
    spec.save(dir.join("config.json")).unwrap();

    // runc run of the same bundle.
    let mut runc = Vec::new();
    for i in 0..runs {
        let t = Instant::now();
        let status = Command::new("runc")
            .args([
                "--root",
                &dir.join("runc-state").display().to_string(),
                "run",
                "--bundle",
            ])
            .arg(&dir)
            .arg(format!("runc-{i}"))
            .status()
            .expect("run runc (Debian package runc)");
        assert!(status.success(), "runc run failed: {status}");
        runc.push(t.elapsed().as_secs_f64() * 1e3);
    }

    // The agent, on the host, over ttrpc on a unix socket.
    let sock = dir.join("agent.sock");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_shoal-agent"))
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--state-dir")
        .arg(dir.join("agent-state"))
        .env("SHOAL_LOG", "error")
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let shoal = rt.block_on(async {
        let start = Instant::now();
        while !sock.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "agent did not start"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let client = AgentClient::new(
            ttrpc::r#async::Client::connect(&format!("unix://{}", sock.display()))
                .await
                .unwrap(),
        );
        let ctx = || ttrpc::context::with_timeout(60_000_000_000);
        let spec_json = serde_json::to_vec(&spec).unwrap();
        let mut samples = Vec::new();
        for i in 0..runs {
            let id = format!("agent-{i}");
            let t = Instant::now();
            let req = CreateContainerRequest {
                container_id: id.clone(),
                spec_json: spec_json.clone(),
                ..Default::default()
            };
            client.create_container(ctx(), &req).await.unwrap();
            client
                .start_container(
                    ctx(),
                    &ContainerRequest {
                        container_id: id.clone(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            let exit = client
                .wait_process(
                    ctx(),
                    &ProcessRequest {
                        container_id: id.clone(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert_eq!(exit.exit_status, 0);
            client
                .remove_container(
                    ctx(),
                    &RemoveContainerRequest {
                        container_id: id,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            samples.push(t.elapsed().as_secs_f64() * 1e3);
        }
        samples
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = agent.wait();

    let label = if std::env::var_os("SHOAL_IN_LAB").is_some() {
        "EMULATED (nested lab)"
    } else {
        "native"
    };
    println!("{label}: busybox `true`, create + start + wait + delete, {runs} runs each");
    let r = report("runc run", runc);
    let s = report("shoal-agent (ttrpc, host mode)", shoal);
    println!("{:<40} {:.2}x runc", "shoal-agent / runc (median)", s / r);
    let _ = std::fs::remove_dir_all(&dir);
}
