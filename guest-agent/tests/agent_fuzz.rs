//! Robustness of request decoding: the agent is PID 1 of its VM, so no request may panic it.
//! Random and mutated payloads go to every method through the real ttrpc server; afterwards
//! the same agent must still answer. Runs natively as root (no cgroup v2 needed: container
//! creation then just fails with an error, which is an answer too).
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use protobuf::Message;
use shoal_agent_api::agent::*;
use shoal_agent_api::agent_ttrpc::AgentClient;

/// A small deterministic generator (xorshift), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, max: u64) -> Vec<u8> {
        (0..self.below(max)).map(|_| self.next() as u8).collect()
    }
}

const METHODS: &[&str] = &[
    "Check",
    "CreateSandbox",
    "CreateContainer",
    "StartContainer",
    "ExecProcess",
    "SignalProcess",
    "WaitProcess",
    "ResizePty",
    "CloseStdin",
    "UpdateContainer",
    "StatsContainer",
    "PauseContainer",
    "ResumeContainer",
    "ListProcesses",
    "RemoveContainer",
];

/// Valid messages to mutate, so the decoder gets past the first byte more often.
fn seeds() -> Vec<Vec<u8>> {
    let spec = br#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},"root":{"path":"/nonexistent"}}"#;
    vec![
        CreateContainerRequest {
            container_id: "c1".into(),
            spec_json: spec.to_vec(),
            rootfs: "/nonexistent".into(),
            ..Default::default()
        }
        .write_to_bytes()
        .unwrap(),
        ExecProcessRequest {
            container_id: "c1".into(),
            exec_id: "e1".into(),
            process_json: br#"{"args":["true"],"cwd":"/"}"#.to_vec(),
            ..Default::default()
        }
        .write_to_bytes()
        .unwrap(),
        SignalProcessRequest {
            container_id: "c1".into(),
            signal: 9,
            all: true,
            ..Default::default()
        }
        .write_to_bytes()
        .unwrap(),
        UpdateContainerRequest {
            container_id: "c1".into(),
            resources_json: br#"{"memory":{"limit":-5}}"#.to_vec(),
            ..Default::default()
        }
        .write_to_bytes()
        .unwrap(),
        CreateSandboxRequest {
            hostname: "h".into(),
            dns_servers: vec!["1.2.3.4".into()],
            ..Default::default()
        }
        .write_to_bytes()
        .unwrap(),
    ]
}

fn mutate(rng: &mut Rng, mut data: Vec<u8>) -> Vec<u8> {
    for _ in 0..=rng.below(4) {
        if data.is_empty() {
            break;
        }
        let i = rng.below(data.len() as u64) as usize;
        match rng.below(3) {
            0 => data[i] = rng.next() as u8,
            1 => {
                data.truncate(i);
            }
            _ => data.insert(i, rng.next() as u8),
        }
    }
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_fuzz_requests_never_take_the_agent_down() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIP: the agent fuzz test needs root (the agent becomes a subreaper and manages cgroups)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("shoal-agent-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("agent.sock");
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_shoal-agent"))
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("SHOAL_LOG", "error")
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "agent did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let raw = ttrpc::r#async::Client::connect(&format!("unix://{}", sock.display()))
        .await
        .unwrap();

    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let seeds = seeds();
    let mut answered = 0;
    for round in 0..3000 {
        let method = METHODS[rng.below(METHODS.len() as u64) as usize];
        let payload = if rng.below(2) == 0 {
            rng.bytes(256)
        } else {
            let seed = seeds[rng.below(seeds.len() as u64) as usize].clone();
            mutate(&mut rng, seed)
        };
        let req = ttrpc::Request {
            service: "shoal.agent.v1.Agent".into(),
            method: method.into(),
            timeout_nano: 10_000_000_000,
            payload,
            ..Default::default()
        };
        // Any answer (success or error status) is fine; a dead connection is not.
        match raw.request(req).await {
            Ok(_) => answered += 1,
            Err(ttrpc::Error::RpcStatus(_)) => answered += 1,
            Err(e) => panic!("round {round}: {method} broke the connection: {e:?}"),
        }
    }
    assert_eq!(answered, 3000);
    assert!(child.try_wait().unwrap().is_none(), "the agent exited");
    let client = AgentClient::new(raw);
    client
        .check(
            ttrpc::context::with_timeout(5_000_000_000),
            &CheckRequest::new(),
        )
        .await
        .unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
