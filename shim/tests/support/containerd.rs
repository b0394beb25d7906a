//! A private containerd for tests and benchmarks: its own root, state and socket, the shim
//! on its PATH, shoal's config from `SHOAL_CONFIG`, the busybox image imported.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

pub const RUNTIME: &str = "io.containerd.shoal.v2";
/// The longest one `ctr` call of a test may take.
pub const CTR_LIMIT: Duration = Duration::from_secs(900);

/// How long one `ctr` call may run: [`CTR_LIMIT`], or `SHOAL_CTR_LIMIT` seconds (to find a
/// hang sooner).
pub fn ctr_limit() -> Duration {
    match env_usize("SHOAL_CTR_LIMIT", 0) {
        0 => CTR_LIMIT,
        s => Duration::from_secs(s as u64),
    }
}
pub const IMAGE: &str = "docker.io/library/shoal-busybox:latest";

pub struct Env {
    pub kernel: PathBuf,
    pub agent: PathBuf,
    pub image: PathBuf,
}

pub fn env() -> Option<Env> {
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
pub struct Containerd {
    pub root: PathBuf,
    pub run: PathBuf,
    child: Child,
    /// containerd's PATH (the shim's directory first), for a restart.
    path: String,
}

impl Containerd {
    /// Starts containerd; `shoal_config` is the body of the shim's config file (kernel and
    /// image lines are added unless it sets them).
    pub fn start(env: &Env, name: &str, shoal_config: &str) -> Containerd {
        Containerd::start_with_path(env, name, shoal_config, None)
    }

    /// [`Containerd::start`] with `extra_path` on containerd's PATH after the shim's own
    /// directory (where a bench puts another shim binary to run beside this one).
    pub fn start_with_path(
        env: &Env,
        name: &str,
        shoal_config: &str,
        extra_path: Option<&Path>,
    ) -> Containerd {
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
        config += &format!("state_dir = \"{}/shoal\"\n", run.display());
        if !shoal_config.contains("log_level =") {
            config += "log_level = \"debug\"\n";
        }
        // The lab's search for calls a thread's list lacks runs the suite with "log".
        if let Ok(mode) = std::env::var(shoal_vmm::confine::MODE_ENV) {
            if !shoal_config.contains("confine =") {
                config += &format!("confine = \"{mode}\"\n");
            }
        }
        // The host cgroup pool: one parent cgroup and claim directory per fixture, so tests
        // running side by side do not share slots; 8 slots unless the test says otherwise.
        let pool_keys = format!(
            "parent = \"{tag}\"\nstate_dir = \"{}/cgroup-pool\"\n",
            run.display()
        );
        if shoal_config.contains("[cgroups]\n") {
            config += &shoal_config.replacen("[cgroups]\n", &format!("[cgroups]\n{pool_keys}"), 1);
        } else {
            config += shoal_config;
            config += &format!("\n[cgroups]\npool_size = 8\n{pool_keys}");
        }
        std::fs::write(root.join("shoal.toml"), config).unwrap();
        let shim = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-shoal-v2"));
        let mut path = format!("{}:", shim.parent().unwrap().display());
        if let Some(extra) = extra_path {
            path += &format!("{}:", extra.display());
        }
        path += &std::env::var("PATH").unwrap_or_default();
        let child = Containerd::spawn(&root, &path);
        let c = Containerd {
            root,
            run,
            child,
            path,
        };
        c.wait_ready();
        let out = c.ctr(&["images", "import", env.image.to_str().unwrap()]);
        assert!(out.status.success(), "image import: {}", text(&out));
        c
    }

    /// Starts the containerd process of the fixture in `root`, its log appended to
    /// `root/containerd.log`.
    fn spawn(root: &Path, path: &str) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("containerd.log"))
            .unwrap();
        Command::new("containerd")
            .arg("--config")
            .arg(root.join("containerd.toml"))
            .env("PATH", path)
            .env("SHOAL_CONFIG", root.join("shoal.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd")
    }

    /// Waits until containerd answers on its socket.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.run.join("containerd.sock").exists()
                && self
                    .command(&["version"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops containerd as a node does before an upgrade (SIGTERM, then waits for it to
    /// exit); the shims it started are left running.
    pub fn stop(&mut self) {
        self.stop_with(nix::sys::signal::SIGTERM);
    }

    /// Stops containerd with `signal` (SIGKILL: as a crash or the OOM killer does, with no
    /// clean-up of its own) and waits for it to exit.
    pub fn stop_with(&mut self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal containerd");
        self.child.wait().expect("wait for containerd");
    }

    /// Starts containerd again with the same configuration and state (after [`Containerd::stop`]).
    pub fn start_again(&mut self) {
        self.child = Containerd::spawn(&self.root, &self.path);
        self.wait_ready();
    }

    /// Makes a VM template from this fixture's shoal config (`shoal-template`) and returns a
    /// config file that starts sandboxes by restoring it (for `--runtime-config-path`).
    pub fn template_config(&self) -> PathBuf {
        let base = std::fs::read_to_string(self.root.join("shoal.toml")).unwrap();
        let path = self.root.join("shoal-template.toml");
        // Before the rest: the base ends inside its [cgroups] table.
        std::fs::write(
            &path,
            format!(
                "template = true\ntemplate_dir = \"{}\"\n{base}",
                self.root.join("templates").display()
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_shoal-template"))
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "shoal-template: {}", text(&out));
        path
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("containerd.log")).unwrap_or_default()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a")
            .arg(self.run.join("containerd.sock"))
            .args(args);
        cmd
    }

    /// Runs `ctr ARGS` and returns its output. A call still running after [`ctr_limit`] is
    /// killed and fails the test with containerd's log and [`Containerd::hang_report`],
    /// rather than hang it (and the lab run with it) until the lab's own limit.
    pub fn ctr(&self, args: &[&str]) -> Output {
        let child = self
            .command(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("ctr");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let limit = ctr_limit();
        match rx.recv_timeout(limit) {
            Ok(out) => out.expect("ctr"),
            Err(_) => {
                let report = self.hang_report();
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGKILL);
                panic!(
                    "`ctr {}` did not finish within {limit:?}\n{}\n{report}",
                    args.join(" "),
                    self.log()
                );
            }
        }
    }

    /// containerd's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `ctr run --rm --runtime shoal IMAGE ID CMD...` with extra flags before the image.
    pub fn run(&self, flags: &[&str], id: &str, cmd: &[&str]) -> Output {
        let mut args = vec!["run", "--runtime", RUNTIME];
        args.extend_from_slice(flags);
        args.push(IMAGE);
        args.push(id);
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    /// Where everything that could be waiting is, for a call that hung: each shim's
    /// threads (name, state, kernel wait channel and stack), the end of each sandbox's guest
    /// console, and containerd's own threads' wait channels.
    pub fn hang_report(&self) -> String {
        use std::fmt::Write;
        let mut out = String::from("--- hang report ---\n");
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return out;
        };
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = read(p.path().join("cmdline")).replace('\0', " ");
            let ours = cmdline.contains("containerd-shim-shoal-v2") || (pid == self.child.id());
            if !ours {
                continue;
            }
            let _ = writeln!(out, "process {pid}: {cmdline}");
            let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
                continue;
            };
            for t in tasks.flatten() {
                let status = read(t.path().join("status"));
                let field = |k: &str| {
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix(k))
                        .unwrap_or("")
                        .trim()
                        .to_string()
                };
                let _ = writeln!(
                    out,
                    "  thread {} {:?} {} wchan={}",
                    t.file_name().to_string_lossy(),
                    field("Name:"),
                    field("State:"),
                    read(t.path().join("wchan"))
                );
                if pid != self.child.id() {
                    for frame in read(t.path().join("stack")).lines().take(12) {
                        let _ = writeln!(out, "      {frame}");
                    }
                }
            }
        }
        if let Ok(sandboxes) = std::fs::read_dir(self.shoal_state()) {
            for s in sandboxes.flatten() {
                let console = read(s.path().join("console.log"));
                let tail: Vec<&str> = console.lines().rev().take(30).collect();
                let _ = writeln!(out, "guest console of {}:", s.path().display());
                for l in tail.iter().rev() {
                    let _ = writeln!(out, "  {l}");
                }
            }
        }
        out
    }

    pub fn shoal_state(&self) -> PathBuf {
        self.run.join("shoal")
    }

    /// The shim's config as the fixture wrote it.
    pub fn shoal_config(&self) -> containerd_shim_shoal_v2::config::Config {
        containerd_shim_shoal_v2::config::Config::from_file(&self.root.join("shoal.toml"))
            .expect("the fixture's shoal config")
    }

    /// Sandbox directories in the fixture's shoal state directory, those a sweep took from
    /// dead shims (`.dead-ID`) included; not the flight recorder's reports nor the sweep's
    /// lock, which stay by design.
    pub fn sandbox_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.shoal_state())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        !name.starts_with('.')
                            || name.starts_with(containerd_shim_shoal_v2::sweep::DEAD_PREFIX)
                    })
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Claim files of the fixture's host cgroup pool (sandboxes holding a cgroup).
    pub fn cgroup_claims(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.shoal_config().cgroups.state_dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "claim"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Nothing of shoal's is left: no shim, no sandbox directory, no mount under it.
    pub fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = self.leftovers();
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left behind: {}\n{}",
                left.join(", "),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Kills task `id` if it has one, deletes the task once it has stopped (waiting up to a
    /// minute), then the container.
    pub fn remove(&self, id: &str) {
        let _ = self.ctr(&["task", "kill", "-s", "KILL", id]);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let listed = String::from_utf8_lossy(&self.ctr(&["task", "ls", "-q"]).stdout)
                .lines()
                .any(|l| l == id);
            if !listed
                || self.ctr(&["task", "delete", id]).status.success()
                || Instant::now() >= deadline
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.ctr(&["container", "delete", id]);
    }

    /// What of shoal's is still there: shims, sandbox directories, mounts under them, host
    /// cgroup claims (empty when all is clean).
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        let shims = shim_pids();
        if !shims.is_empty() {
            left.push(format!("shims {shims:?}"));
        }
        let dirs = self.sandbox_dirs();
        if !dirs.is_empty() {
            left.push(format!("sandbox dirs {dirs:?}"));
        }
        // The state directory's own mount (a private bind onto itself) stays.
        let state = self.shoal_state();
        let mounts = containerd_shim_shoal_v2::mounts::mounts_under(&state)
            .iter()
            .filter(|p| **p != state)
            .count();
        if mounts > 0 {
            left.push(format!("{mounts} mounts"));
        }
        let claims = self.cgroup_claims();
        if !claims.is_empty() {
            left.push(format!("cgroup claims {claims:?}"));
        }
        left
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
        // The fixture's cgroup pool goes with it (the killed shims' cgroups are empty now).
        let cgroups = self.shoal_config().cgroups;
        if cgroups.enabled {
            if let Ok(pool) =
                containerd_shim_shoal_v2::host_cgroups::Pool::open(cgroups.pool_config())
            {
                let _ = pool.destroy();
            }
        }
        // Snapshot and sandbox mounts included: the shim's own clean-up serves here too.
        for dir in [&self.run, &self.root] {
            let _ = containerd_shim_shoal_v2::mounts::remove_tree(dir);
        }
    }
}

pub fn shim_pids() -> Vec<i32> {
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

/// The pid of the shim containerd started for task `id` (`-id ID` on its command line).
pub fn shim_pid_of(id: &str) -> Option<i32> {
    shim_pids().into_iter().find(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            c.split('\0')
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| w == ["-id", id])
        })
    })
}

pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value at fraction `p` of sorted figures (NaN when there are none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A numeric setting from the environment, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The shims' phase marks in containerd's log: (phase, sandbox id, CLOCK_BOOTTIME ms), from
/// lines `shoal-phase NAME sandbox=ID boottime_ms=T`.
pub fn phase_marks(log: &str) -> Vec<(String, String, f64)> {
    log.lines()
        .filter_map(|l| {
            let mut words = l.split("shoal-phase ").nth(1)?.split_whitespace();
            let name = words.next()?.to_string();
            let sandbox = words.next()?.strip_prefix("sandbox=")?.to_string();
            let ms = words
                .next()?
                .strip_prefix("boottime_ms=")?
                .trim_end_matches('"')
                .parse()
                .ok()?;
            Some((name, sandbox, ms))
        })
        .collect()
}

/// Runs `job(i)` for i in 0..n on `c` threads (each takes the next i when done); results in
/// order of i.
pub fn in_flight<T: Send>(n: usize, c: usize, job: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..c.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let r = job(i);
                out.lock().unwrap().push((i, r));
            });
        }
    });
    let mut v = out.into_inner().unwrap();
    v.sort_by_key(|(i, _)| *i);
    v.into_iter().map(|(_, r)| r).collect()
}
