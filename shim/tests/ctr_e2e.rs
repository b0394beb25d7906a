//! End to end through Debian's containerd and `ctr`: each test starts its own containerd
//! (private root, state and socket), imports the locally built busybox image and runs
//! containers with `--runtime io.containerd.shoal.v2`, which boots real micro-VMs.
//!
//! Needs root, containerd, a host that can boot guests (`scripts/test` runs this file inside
//! the nested lab otherwise) and, from `scripts/test`: SHOAL_GUEST_KERNEL, SHOAL_AGENT_IMAGE
//! (`scripts/guest-image`) and SHOAL_BUSYBOX_IMAGE (`scripts/busybox-image`).
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const RUNTIME: &str = "io.containerd.shoal.v2";
const IMAGE: &str = "docker.io/library/shoal-busybox:latest";

struct Env {
    kernel: PathBuf,
    agent: PathBuf,
    image: PathBuf,
}

fn env() -> Option<Env> {
    let get = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let (Some(kernel), Some(agent), Some(image)) = (
        get("SHOAL_GUEST_KERNEL"),
        get("SHOAL_AGENT_IMAGE"),
        get("SHOAL_BUSYBOX_IMAGE"),
    ) else {
        eprintln!("SKIP: SHOAL_GUEST_KERNEL / SHOAL_AGENT_IMAGE / SHOAL_BUSYBOX_IMAGE not set; scripts/test sets them");
        return None;
    };
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIP: containerd and the shim need root");
        return None;
    }
    if Command::new("containerd")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: containerd is not installed (scripts/deps containerd)");
        return None;
    }
    if Path::new("/sys/module/kvm_pvm").exists() && std::env::var_os("SHOAL_IN_LAB").is_none() {
        eprintln!("SKIP: /dev/kvm is nested PVM, which cannot boot a Linux guest; run through scripts/lab");
        return None;
    }
    Some(Env {
        kernel,
        agent,
        image,
    })
}

/// A private containerd with the shim on its PATH.
struct Containerd {
    root: PathBuf,
    run: PathBuf,
    child: Child,
}

impl Containerd {
    /// Starts containerd; `shoal_config` is the body of the shim's config file (kernel and
    /// image lines are added unless it sets them).
    fn start(env: &Env, name: &str, shoal_config: &str) -> Containerd {
        let tag = format!("shoal-e2e-{name}-{}", std::process::id());
        let root = PathBuf::from("/var/tmp").join(&tag);
        let run = PathBuf::from("/run").join(&tag);
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(
            root.join("containerd.toml"),
            format!(
                "version = 2\nroot = \"{}/root\"\nstate = \"{}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{}/containerd.sock\"\n",
                root.display(),
                run.display(),
                run.display()
            ),
        )
        .unwrap();
        let mut config = String::new();
        if !shoal_config.contains("kernel =") {
            config += &format!("kernel = \"{}\"\n", env.kernel.display());
        }
        if !shoal_config.contains("initrd =") {
            config += &format!("initrd = \"{}\"\n", env.agent.display());
        }
        config += &format!(
            "state_dir = \"{}/shoal\"\nlog_level = \"debug\"\n",
            run.display()
        );
        config += shoal_config;
        std::fs::write(root.join("shoal.toml"), config).unwrap();
        let shim = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-shoal-v2"));
        let path = format!(
            "{}:{}",
            shim.parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(root.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(root.join("containerd.toml"))
            .env("PATH", path)
            .env("SHOAL_CONFIG", root.join("shoal.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd");
        let c = Containerd { root, run, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.run.join("containerd.sock").exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = c.ctr(&["images", "import", env.image.to_str().unwrap()]);
        assert!(out.status.success(), "image import: {}", text(&out));
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("containerd.log")).unwrap_or_default()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a")
            .arg(self.run.join("containerd.sock"))
            .args(args);
        cmd
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("ctr")
    }

    /// `ctr run --rm --runtime shoal IMAGE ID CMD...` with extra flags before the image.
    fn run(&self, flags: &[&str], id: &str, cmd: &[&str]) -> Output {
        let mut args = vec!["run", "--runtime", RUNTIME];
        args.extend_from_slice(flags);
        args.push(IMAGE);
        args.push(id);
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    fn shoal_state(&self) -> PathBuf {
        self.run.join("shoal")
    }

    /// Nothing of shoal's is left: no shim, no sandbox directory, no mount under it.
    fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let shims = shim_pids();
            let leftovers: Vec<_> = std::fs::read_dir(self.shoal_state())
                .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                .unwrap_or_default();
            let mounts = std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .lines()
                .filter(|l| l.contains(self.shoal_state().to_str().unwrap()))
                .count();
            if shims.is_empty() && leftovers.is_empty() && mounts == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left behind: shims {shims:?}, sandbox dirs {leftovers:?}, {mounts} mounts\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for pid in shim_pids() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.root.join("root"))
            .output();
        for dir in [&self.run, &self.root] {
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let mut points: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|p| p.starts_with(dir.to_str().unwrap()))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn shim_pids() -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/cmdline")) {
            if comm
                .split('\0')
                .next()
                .is_some_and(|a| a.ends_with("containerd-shim-shoal-v2"))
            {
                pids.push(pid);
            }
        }
    }
    pids
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until `ctr task ls` shows `id` in `status`.
fn wait_status(c: &Containerd, id: &str, status: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = stdout(&c.ctr(&["task", "ls"]));
        if out.lines().any(|l| l.starts_with(id) && l.contains(status)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never reached {status}: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ctr_run_prints_output_exit_codes_and_stdin() {
    let Some(env) = env() else { return };
    let c = Containerd::start(&env, "run", "");
    let out = c.run(&["--rm"], "echo", &["echo", "hi"]);
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    assert_eq!(stdout(&out), "hi\n");

    let out = c.run(
        &["--rm"],
        "seven",
        &["sh", "-c", "echo to-stderr >&2; exit 7"],
    );
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("to-stderr"));

    let mut child = c
        .command(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "stdin",
            "sh",
            "-c",
            "tr a-z A-Z",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"piped through\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out), "PIPED THROUGH\n");
    c.assert_clean();
}

#[test]
fn ctr_detached_task_lifecycle_and_events() {
    let Some(env) = env() else { return };
    let c = Containerd::start(&env, "task", "");
    let mut events = c
        .command(&["events"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let ev_out = events.stdout.take().unwrap();
    let collected = std::thread::spawn(move || {
        BufReader::new(ev_out)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    let script = "trap 'echo bye; exit 0' TERM; while true; do sleep 1; done";
    let out = c.run(&["-d"], "d1", &["sh", "-c", script]);
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    wait_status(&c, "d1", "RUNNING");

    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "d1",
        "sh",
        "-c",
        "echo from-exec; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_eq!(stdout(&out), "from-exec\n");

    let out = c.ctr(&["task", "ps", "d1"]);
    assert!(out.status.success(), "{}", text(&out));
    let pids = stdout(&out).lines().skip(1).count();
    assert!(pids >= 1, "task ps: {}", text(&out));

    assert!(c.ctr(&["task", "pause", "d1"]).status.success());
    wait_status(&c, "d1", "PAUSED");
    assert!(c.ctr(&["task", "resume", "d1"]).status.success());
    wait_status(&c, "d1", "RUNNING");

    let out = c.ctr(&["task", "metrics", "d1"]);
    assert!(out.status.success(), "{}", text(&out));
    let metrics = stdout(&out);
    assert!(
        metrics.contains("pids.current") || metrics.contains("memory"),
        "{metrics}"
    );

    assert!(c
        .ctr(&["task", "kill", "-s", "TERM", "d1"])
        .status
        .success());
    wait_status(&c, "d1", "STOPPED");
    let out = c.ctr(&["task", "delete", "d1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(c.ctr(&["container", "delete", "d1"]).status.success());
    c.assert_clean();

    let _ = events.kill();
    let _ = events.wait();
    let lines = collected.join().unwrap();
    let topics: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("/tasks/")))
        .collect();
    let expected = [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/exit",
        "/tasks/delete",
    ];
    assert_eq!(topics, expected, "events:\n{}", lines.join("\n"));
}

#[test]
fn ctr_run_with_a_terminal() {
    let Some(env) = env() else { return };
    let c = Containerd::start(&env, "tty", "");
    // ctr -t wants a terminal of its own: script(1) gives it one.
    let line = format!(
        "ctr -a {} run --rm -t --runtime {RUNTIME} {IMAGE} tty1 sh -c 'tty; echo tty-ok'",
        c.run.join("containerd.sock").display()
    );
    let out = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .output()
        .unwrap();
    let text_out = stdout(&out);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text_out.contains("/dev/pts/"), "{text_out}");
    assert!(text_out.contains("tty-ok"), "{text_out}");
    c.assert_clean();
}

#[test]
fn ctr_bad_input_gets_clear_errors_and_leaves_nothing() {
    let Some(env) = env() else { return };
    let c = Containerd::start(&env, "bad", "");
    // A typo in a shoal annotation.
    let out = c.run(
        &["--rm", "--annotation", "io.shoal.vm.cpus=2"],
        "typo",
        &["true"],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("io.shoal.vm.cpus"), "{}", text(&out));
    let _ = c.ctr(&["container", "delete", "typo"]);
    c.assert_clean();

    // The shim is killed under a running container: containerd sees the task stop, and
    // deleting it leaves nothing behind.
    let out = c.run(&["-d"], "victim", &["sleep", "600"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_status(&c, "victim", "RUNNING");
    for pid in shim_pids() {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    }
    // containerd notices the dead shim, runs `shim delete` and drops the task.
    let deadline = Instant::now() + Duration::from_secs(60);
    while stdout(&c.ctr(&["task", "ls"])).contains("victim") {
        let out = stdout(&c.ctr(&["task", "ls"]));
        if out
            .lines()
            .any(|l| l.starts_with("victim") && l.contains("STOPPED"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "task still listed: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = c.ctr(&["task", "delete", "victim"]);
    let _ = c.ctr(&["container", "delete", "victim"]);
    c.assert_clean();
    drop(c);

    // A missing guest kernel is named.
    let c = Containerd::start(&env, "nokernel", "kernel = \"/nonexistent/vmlinux\"\n");
    let out = c.run(&["--rm"], "nok", &["true"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("/nonexistent/vmlinux"),
        "{}",
        text(&out)
    );
    let _ = c.ctr(&["container", "delete", "nok"]);
    c.assert_clean();
    drop(c);

    // A guest that never brings up the agent (its image has no /init): the agent timeout
    // is reported with the console to look at.
    let empty = std::env::temp_dir().join(format!("shoal-e2e-empty-{}.img", std::process::id()));
    std::fs::write(&empty, b"").unwrap();
    let c = Containerd::start(
        &env,
        "noagent",
        &format!("initrd = \"{}\"\nagent_timeout_secs = 5\n", empty.display()),
    );
    let out = c.run(&["--rm"], "noagent", &["true"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("did not answer"), "{}", text(&out));
    let _ = c.ctr(&["container", "delete", "noagent"]);
    c.assert_clean();
    let _ = std::fs::remove_file(&empty);
}
