//! The agent as PID 1 of a real micro-VM, driven over hybrid vsock like the shim will: boot
//! shoal's guest kernel with the test guest image (agent + a busybox root file system),
//! run containers, shut down. `scripts/test` sets SHOAL_GUEST_KERNEL and
//! SHOAL_AGENT_TEST_IMAGE and runs this natively or in the nested lab.
mod support;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use shoal_agent_api::agent::*;
use shoal_agent_api::client::{connect_agent, hybrid_vsock_connect};
use shoal_agent_api::{AGENT_PORT, STDIO_PORT};
use shoal_vmm::{Console, ExitReason, Vm, VmConfig, VsockConfig};
use ttrpc::context;

fn artifacts() -> Option<(PathBuf, PathBuf)> {
    let (Some(kernel), Some(image)) = (
        std::env::var_os("SHOAL_GUEST_KERNEL"),
        std::env::var_os("SHOAL_AGENT_TEST_IMAGE"),
    ) else {
        eprintln!("SKIP: SHOAL_GUEST_KERNEL / SHOAL_AGENT_TEST_IMAGE not set; scripts/test sets them where a guest can boot");
        return None;
    };
    if Path::new("/sys/module/kvm_pvm").exists() && std::env::var_os("SHOAL_IN_LAB").is_none() {
        eprintln!("SKIP: /dev/kvm is nested PVM, which cannot boot a Linux guest; run through scripts/lab");
        return None;
    }
    Some((kernel.into(), image.into()))
}

/// The agent's VM in these tests: 256 MiB, 2 vCPUs, vsock at `uds` (CID 3), the balloon.
fn vm_config(
    kernel: PathBuf,
    image: PathBuf,
    uds: &Path,
    console: &Path,
    shares: Vec<shoal_vmm::FsConfig>,
) -> VmConfig {
    VmConfig {
        kernel,
        initrd: Some(image),
        cmdline: shoal_vmm::DEFAULT_CMDLINE.into(),
        memory_mib: 256,
        vcpus: 2,
        vsock: Some(VsockConfig {
            uds_path: uds.into(),
            cid: 3,
        }),
        disks: Vec::new(),
        shares,
        nets: Vec::new(),
        free_page_reporting: true,
        console: Console::File(console.into()),
        limits: Default::default(),
    }
}

fn ctx() -> context::Context {
    context::with_timeout(60_000_000_000)
}

fn spec(args: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&support::spec(args)).unwrap()
}

/// Opens a stdio stream to the guest and names it.
fn stream(uds: &Path, token: &str) -> std::os::unix::net::UnixStream {
    let mut s = hybrid_vsock_connect(uds, STDIO_PORT).unwrap();
    s.write_all(format!("STREAM {token}\n").as_bytes()).unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_guest_agent_runs_containers_in_a_vm() {
    let Some((kernel, image)) = artifacts() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("shoal-agent-vm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("vm.sock");
    let config = vm_config(kernel, image, &uds, &dir.join("console"), Vec::new());
    let vm = Vm::boot(&config).expect("boot");
    let stopper = vm.stopper();
    let vm_thread = std::thread::spawn(move || vm.wait());
    let console = || std::fs::read_to_string(dir.join("console")).unwrap_or_default();

    let agent = connect_agent(&uds, AGENT_PORT, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| {
            stopper.stop();
            panic!("{e}\nconsole:\n{}", console())
        });
    let info = agent.check(ctx(), &CheckRequest::new()).await.unwrap();
    assert_eq!(info.pid, 1, "the agent is PID 1 of the guest");
    let too_much = agent
        .create_sandbox(
            ctx(),
            &CreateSandboxRequest {
                hostname: "shoal-pod".into(),
                entropy: vec![7; 5000],
                ..Default::default()
            },
        )
        .await
        .expect_err("5000 bytes of entropy are refused")
        .to_string();
    assert!(
        too_much.contains("5000 bytes of entropy, at most 4096"),
        "{too_much}"
    );
    // The host's clock (here 2030-01-01, far from the guest's) and entropy are taken in.
    agent
        .create_sandbox(
            ctx(),
            &CreateSandboxRequest {
                hostname: "shoal-pod".into(),
                host_time_unix_ns: 1_893_456_000 * 1_000_000_000,
                entropy: vec![0x5a; 64],
                ..Default::default()
            },
        )
        .await
        .unwrap();

    // A container's output and exit code travel back over vsock.
    let (status, text) = run_container(
        &agent,
        &uds,
        "c1",
        spec(&[
            "sh",
            "-c",
            "echo hello from $(hostname) in $(date -u +%Y); exit 7",
        ]),
    )
    .await;
    assert_eq!(status, 7, "console:\n{}", console());
    // The spec's UTS namespace gets the spec's hostname (none): the container sees its own.
    // The guest clock is the host's as CreateSandbox gave it.
    assert!(text.starts_with("hello from "), "{text:?}");
    assert!(text.trim_end().ends_with(" in 2030"), "{text:?}");
    support::remove_container(&agent, "c1", false).await;

    // Kubernetes' safe sysctls (the list a pod may set without the kubelet's
    // --allowed-unsafe-sysctls) are set in the container's namespaces, and System V IPC is
    // there: the guest kernel lacked CONFIG_SYSVIPC and CONFIG_SYN_COOKIES, so a pod setting
    // kernel.shm_rmid_forced or net.ipv4.tcp_syncookies failed to start ("open subpath in
    // procfs failed", issue 22) and shmget(2) answered ENOSYS.
    let safe = [
        ("kernel.shm_rmid_forced", "1"),
        ("net.ipv4.ip_local_port_range", "2000\t60000"),
        ("net.ipv4.tcp_syncookies", "0"),
        ("net.ipv4.ping_group_range", "0\t2147483647"),
        ("net.ipv4.ip_unprivileged_port_start", "80"),
        ("net.ipv4.ip_local_reserved_ports", "8080"),
        ("net.ipv4.tcp_keepalive_time", "600"),
        ("net.ipv4.tcp_fin_timeout", "30"),
        ("net.ipv4.tcp_keepalive_intvl", "30"),
        ("net.ipv4.tcp_keepalive_probes", "5"),
    ];
    let script: String = safe
        .iter()
        .map(|(k, _)| format!("echo \"{k}=$(cat /proc/sys/{})\"; ", k.replace('.', "/")))
        .chain(["head -1 /proc/sysvipc/shm".to_string()])
        .collect();
    let mut with_sysctls = support::spec(&["sh", "-c", &script]);
    let mut linux = with_sysctls.linux().clone().unwrap();
    linux.set_sysctl(Some(
        safe.iter()
            .map(|(k, v)| (k.to_string(), v.replace('\t', " ")))
            .collect(),
    ));
    with_sysctls.set_linux(Some(linux));
    let (status, text) = run_container(
        &agent,
        &uds,
        "sysctls",
        serde_json::to_vec(&with_sysctls).unwrap(),
    )
    .await;
    assert_eq!(status, 0, "{text}\nconsole:\n{}", console());
    for (k, v) in safe {
        assert!(text.contains(&format!("{k}={v}\n")), "{k}: {text}");
    }
    assert!(text.contains("key"), "no /proc/sysvipc/shm: {text}");
    support::remove_container(&agent, "sysctls", false).await;

    // containerd's CRI plugin asks for rootfsPropagation `rshared` (a Bidirectional
    // volume) or `rslave` (HostToContainer), with the same option on the volume; libcontainer
    // 0.7 refused both words and the create failed (issue 22).
    for (id, propagation, shown) in [("rshared", "rshared", "shared:"), ("rslave", "rslave", "")] {
        let mut s = support::spec(&["cat", "/proc/self/mountinfo"]);
        let mut linux = s.linux().clone().unwrap();
        linux.set_rootfs_propagation(Some(propagation.into()));
        s.set_linux(Some(linux));
        let mut mounts = s.mounts().clone().unwrap_or_default();
        mounts.push(
            oci_spec::runtime::MountBuilder::default()
                .destination("/data")
                .typ("bind")
                .source("/tmp")
                .options(vec!["rbind".to_string(), propagation.to_string()])
                .build()
                .unwrap(),
        );
        s.set_mounts(Some(mounts));
        let (status, text) = run_container(&agent, &uds, id, serde_json::to_vec(&s).unwrap()).await;
        assert_eq!(status, 0, "{id}: {text}\nconsole:\n{}", console());
        assert!(
            text.contains(" /data ") && text.contains(shown),
            "{id}: {text}"
        );
        support::remove_container(&agent, id, false).await;
    }

    // Stdin goes in, output comes out, closing stdin ends the process.
    let input = stream(&uds, "c2-in");
    let out = stream(&uds, "c2-out");
    let req = CreateContainerRequest {
        container_id: "c2".into(),
        spec_json: spec(&["cat"]),
        rootfs: "/rootfs/busybox".into(),
        stdio: Some(Stdio {
            stdin: "c2-in".into(),
            stdout: "c2-out".into(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    agent.create_container(ctx(), &req).await.unwrap();
    agent
        .start_container(
            ctx(),
            &ContainerRequest {
                container_id: "c2".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut input = input;
    input.write_all(b"piped through cat\n").unwrap();
    input.shutdown(std::net::Shutdown::Write).unwrap();
    let mut text = String::new();
    let mut out = out;
    out.read_to_string(&mut text).unwrap();
    assert_eq!(text, "piped through cat\n");
    let wait = agent
        .wait_process(
            ctx(),
            &ProcessRequest {
                container_id: "c2".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(wait.exit_status, 0);

    // Shutdown stops what is left and powers the VM off cleanly. The answer may be lost
    // with the guest going down (the shim allows for that too): the clean exit below is
    // what counts.
    match agent.shutdown(ctx(), &Empty::new()).await {
        Ok(_) | Err(ttrpc::Error::Socket(_)) => {}
        Err(e) => panic!("shutdown: {e:?}"),
    }
    let reason = vm_thread.join().unwrap();
    assert_eq!(reason, ExitReason::Reboot, "console:\n{}", console());
    assert!(!uds.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs container `id` (busybox root) with `spec_json` and returns its exit status and
/// output.
async fn run_container(
    agent: &shoal_agent_api::agent_ttrpc::AgentClient,
    uds: &Path,
    id: &str,
    spec_json: Vec<u8>,
) -> (i32, String) {
    let token = format!("{id}-out");
    let out = stream(uds, &token);
    let req = CreateContainerRequest {
        container_id: id.into(),
        spec_json,
        rootfs: "/rootfs/busybox".into(),
        stdio: Some(Stdio {
            stdout: token,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    agent.create_container(ctx(), &req).await.unwrap();
    let process = ContainerRequest {
        container_id: id.into(),
        ..Default::default()
    };
    agent.start_container(ctx(), &process).await.unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let mut out = out;
        out.read_to_string(&mut text).unwrap();
        text
    });
    let wait = agent
        .wait_process(
            ctx(),
            &ProcessRequest {
                container_id: id.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    (wait.exit_status as i32, reader.join().unwrap())
}

/// The template round trip at the agent's level: an agent VM (vsock, a virtio-fs share the
/// guest has not mounted yet, the balloon) is saved once its agent answered, then restored
/// twice at once with new sockets, CIDs and shares. Each copy's agent answers on its own
/// socket, takes its own hostname, sandbox id and entropy, mounts its own share, and draws
/// random numbers the other does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_guest_agent_vm_restored_twice_answers_as_two_sandboxes() {
    let Some((kernel, image)) = artifacts() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("shoal-agent-tpl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let share = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        shoal_vmm::FsConfig {
            tag: "shoal".into(),
            dir: d,
            cache: shoal_vmm::CacheMode::Auto,
            root: None,
        }
    };
    let uds = dir.join("template.sock");
    let config = vm_config(
        kernel,
        image,
        &uds,
        &dir.join("template-console"),
        vec![share("template-share")],
    );
    let vm = Vm::boot(&config).expect("boot");
    let agent = connect_agent(&uds, AGENT_PORT, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nconsole:\n{}",
                std::fs::read_to_string(dir.join("template-console")).unwrap_or_default()
            )
        });
    let first = agent.check(ctx(), &CheckRequest::new()).await.unwrap();
    assert_eq!(first.sandbox_id, "", "no CreateSandbox yet");
    drop(agent);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let files = shoal_vmm::SnapshotFiles {
        state: dir.join("vm.state"),
        memory: dir.join("vm.mem"),
    };
    vm.pause().unwrap();
    vm.snapshot(&files).unwrap();
    drop(vm);

    let restores: Vec<_> = (0..2)
        .map(|i| {
            let restore = shoal_vmm::RestoreConfig {
                files: files.clone(),
                console: Console::File(dir.join(format!("console-{i}"))),
                memory_mib: Some(256),
                vcpus: Some(2),
                vsock: Some(VsockConfig {
                    uds_path: dir.join(format!("copy-{i}.sock")),
                    cid: 100 + i,
                }),
                shares: vec![share(&format!("share-{i}"))],
                free_page_reporting: true,
                limits: Default::default(),
            };
            std::thread::spawn(move || Vm::restore(&restore).expect("restore"))
        })
        .collect();
    let vms: Vec<Vm> = restores.into_iter().map(|t| t.join().unwrap()).collect();

    let mut uuids = Vec::new();
    for i in 0..2 {
        let uds = dir.join(format!("copy-{i}.sock"));
        let console = || std::fs::read_to_string(dir.join(format!("console-{i}"))).unwrap();
        // Where a copy that stopped answering stands: its devices, vCPUs and console.
        let stalled = || {
            format!(
                "devices:\n{}\n{}\nconsole:\n{}",
                vms[i as usize].ring_report(),
                vms[i as usize].cpu_report(),
                console()
            )
        };
        let agent = connect_agent(&uds, AGENT_PORT, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("copy {i}: {e}\n{}", stalled()));
        let entropy: Vec<u8> = (0..64).map(|b| (b * 7 + i * 131) as u8).collect();
        agent
            .create_sandbox(
                ctx(),
                &CreateSandboxRequest {
                    hostname: format!("copy-{i}"),
                    sandbox_id: format!("sandbox-{i}"),
                    shared_fs_tag: "shoal".into(),
                    host_time_unix_ns: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_nanos() as u64,
                    entropy,
                    ..Default::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("copy {i}: {e:?}\n{}", stalled()));
        let who = agent.check(ctx(), &CheckRequest::new()).await.unwrap();
        assert_eq!(
            (who.hostname.as_str(), who.sandbox_id.as_str(), who.pid),
            (
                format!("copy-{i}").as_str(),
                format!("sandbox-{i}").as_str(),
                1
            )
        );
        // The share each copy mounted is its own host directory.
        std::fs::write(dir.join(format!("share-{i}/mark")), format!("share {i}")).unwrap();
        let mut with_share = serde_json::to_value(support::spec(&[
            "sh",
            "-c",
            "cat /proc/sys/kernel/random/uuid; cat /mnt/share/mark",
        ]))
        .unwrap();
        with_share["mounts"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "destination": "/mnt/share",
                "type": "bind",
                "source": shoal_agent_api::GUEST_SHARED_DIR,
                "options": ["rbind", "ro"],
            }));
        let spec_json = serde_json::to_vec(&with_share).unwrap();
        // Within the agent calls' own limit, so that a copy that stops answering is
        // reported with where its devices stand.
        let ran = tokio::time::timeout(
            Duration::from_secs(50),
            run_container(&agent, &uds, "c", spec_json),
        )
        .await;
        let (status, text) = ran.unwrap_or_else(|_| {
            panic!(
                "copy {i}: the container did not run within 50 s\n{}",
                stalled()
            )
        });
        assert_eq!(status, 0, "{text}\nconsole:\n{}", console());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines.get(1).copied(),
            Some(format!("share {i}").as_str()),
            "{text}"
        );
        uuids.push(lines[0].to_string());
        match agent.shutdown(ctx(), &Empty::new()).await {
            Ok(_) | Err(ttrpc::Error::Socket(_)) => {}
            Err(e) => panic!("shutdown: {e:?}"),
        }
    }
    assert_ne!(
        uuids[0], uuids[1],
        "the two copies drew the same random numbers"
    );
    for vm in vms {
        assert_eq!(vm.wait(), ExitReason::Reboot);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
