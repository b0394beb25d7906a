//! End to end through Debian's containerd and `ctr`: each test starts its own containerd
//! (private root, state and socket), imports the locally built busybox image and runs
//! containers with `--runtime io.containerd.shoal.v2`, which boots real micro-VMs.
//!
//! Needs root, containerd, a host that can boot guests (`scripts/test` runs this file inside
//! the nested lab otherwise) and, from `scripts/test`: SHOAL_GUEST_KERNEL, SHOAL_AGENT_IMAGE
//! (`scripts/guest-image`) and SHOAL_BUSYBOX_IMAGE (`scripts/busybox-image`).
mod support;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::containerd::{
    env, in_flight, shim_pid_of, shim_pids, stdout, text, Containerd, IMAGE, RUNTIME,
};
use support::netns::{connect_retrying, PodNetns};

/// Waits until `ctr task ls` shows `id` in `status`.
fn wait_status(c: &Containerd, id: &str, status: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = stdout(&c.ctr(&["task", "ls"]));
        if out.lines().any(|l| l.starts_with(id) && l.contains(status)) {
            return;
        }
        if Instant::now() >= deadline {
            let log = c.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "{id} never reached {status}: {out}\ncontainerd's last lines:\n{}",
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ctr run -d` of `id` (with `flags` too) that must succeed, then waits until it runs.
fn run_detached(c: &Containerd, flags: &[&str], id: &str, cmd: &[&str]) {
    let flags: Vec<&str> = std::iter::once("-d").chain(flags.iter().copied()).collect();
    let out = c.run(&flags, id, cmd);
    assert!(out.status.success(), "{id}: {}\n{}", text(&out), c.log());
    wait_status(c, id, "RUNNING");
}

/// `ctr run --rm --config SPEC ID` with shoal: a container from a whole spec file (no image).
fn run_spec(c: &Containerd, spec: &std::path::Path, id: &str) -> std::process::Output {
    let spec = spec.to_str().unwrap();
    c.ctr(&["run", "--rm", "--runtime", RUNTIME, "--config", spec, id])
}

/// Runs `ctr events` and collects its lines on a thread, up to the first for which `last`
/// holds (not kept) or until the returned child is killed.
fn watch_events(
    c: &Containerd,
    last: impl Fn(&str) -> bool + Send + 'static,
) -> (std::process::Child, std::thread::JoinHandle<Vec<String>>) {
    let mut events = c
        .command(&["events"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = events.stdout.take().unwrap();
    let collected = std::thread::spawn(move || {
        BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .take_while(|l| !last(l))
            .collect::<Vec<String>>()
    });
    (events, collected)
}

/// After its shim was killed: waits until containerd has noticed, run `shim delete` and
/// dropped the task or marked it stopped.
fn wait_task_gone_or_stopped(c: &Containerd, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = stdout(&c.ctr(&["task", "ls"]));
        let line = out.lines().find(|l| l.starts_with(id));
        if line.is_none_or(|l| l.contains("STOPPED")) {
            return;
        }
        assert!(Instant::now() < deadline, "task still listed: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A container's seccomp profile is in effect in the guest for its first process and for
/// every exec'd one: with containerd's default profile (`ctr run --seccomp`) both read
/// filter mode 2 in their /proc status, without one 0. Exec'd processes read 0 either way
/// until the agent loaded the profile itself (issue 22; libcontainer 0.7 drops it for them,
/// see guest-agent/src/exec_seccomp.rs, whose agent_host test shows a denied call).
#[test]
fn ctr_seccomp_profile_is_in_effect_for_the_first_process_and_execs() {
    let Some(env) = env() else { return };
    let c = Containerd::start(&env, "seccomp", "");
    // ctr's specs ask for no_new_privs; --allow-new-privs takes the agent's other way of
    // loading (capabilities raised for it and dropped again), Kubernetes' default.
    for (id, flags, mode) in [
        ("sc-on", &["--seccomp"][..], "2"),
        ("sc-anp", &["--seccomp", "--allow-new-privs"][..], "2"),
        ("sc-off", &[][..], "0"),
    ] {
        run_detached(&c, flags, id, &["sleep", "1000"]);
        // `cat PATH` run as exec `exec_id`: the status file it printed.
        let status = |exec_id: &str, path: &str| {
            let out = c.ctr(&["task", "exec", "--exec-id", exec_id, id, "cat", path]);
            assert!(out.status.success(), "{id}: {}", text(&out));
            stdout(&out)
        };
        let field_of = |status: &str, name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        let init = status("s1", "/proc/1/status");
        assert_eq!(
            field_of(&init, "Seccomp:").as_deref(),
            Some(mode),
            "{id}'s init: {init}"
        );
        let exec = status("s2", "/proc/self/status");
        assert_eq!(
            field_of(&exec, "Seccomp:").as_deref(),
            Some(mode),
            "{id}'s exec: {exec}"
        );
        // The capabilities the agent adds for loading the filter are gone again: the exec
        // ends with the sets the first process has (ctr asks the same of both).
        for set in ["CapBnd:", "CapPrm:", "CapEff:", "CapInh:", "NoNewPrivs:"] {
            assert_eq!(field_of(&exec, set), field_of(&init, set), "{id}: {set}");
        }
        c.remove(id);
    }
    c.assert_clean();
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
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    assert_eq!(stdout(&out), "PIPED THROUGH\n");

    // Runtime options name another config file (CRI's ConfigPath): a 2-vCPU VM.
    let other = c.root.join("two-cpus.toml");
    std::fs::write(
        &other,
        format!(
            "kernel = \"{}\"\ninitrd = \"{}\"\nstate_dir = \"{}\"\nvcpus = 2\n",
            env.kernel.display(),
            env.agent.display(),
            c.shoal_state().display()
        ),
    )
    .unwrap();
    let out = c.run(
        &["--rm", "--runtime-config-path", other.to_str().unwrap()],
        "twocpu",
        &["nproc"],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    assert_eq!(stdout(&out), "2\n");
    c.assert_clean();
}

/// containerd restarted as a node upgrade does (SIGTERM, then started again on the same
/// state) finds shoal's sandboxes again, as it finds runc's (issue 20): a running task is
/// RUNNING afterwards and takes exec, kill and delete; a task that exited while containerd
/// was down reads STOPPED and its exit status is kept; a task whose shim (and with it its
/// VM) died while containerd was down is cleaned up whole when containerd starts, and only
/// that one.
#[test]
fn ctr_tasks_survive_a_containerd_restart() {
    let Some(env) = env() else { return };
    let mut c = Containerd::start(&env, "restart", "");
    let forever = [
        "sh",
        "-c",
        "trap 'exit 0' TERM; while true; do sleep 1; done",
    ];
    for (id, cmd) in [
        ("r1", &forever[..]),
        // Exits with 7 three seconds after a TERM: while containerd is down.
        (
            "r2",
            &[
                "sh",
                "-c",
                "trap 'sleep 3; exit 7' TERM; while true; do sleep 1; done",
            ][..],
        ),
        ("r3", &forever[..]),
    ] {
        let out = c.run(&["-d"], id, cmd);
        assert!(out.status.success(), "{id}: {}\n{}", text(&out), c.log());
    }
    // A second container in r1's pod, served by r1's shim and VM.
    let pod = [
        "-d",
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=r1",
    ];
    let out = c.run(&pod, "r1app", &forever);
    assert!(out.status.success(), "r1app: {}\n{}", text(&out), c.log());
    for id in ["r1", "r1app", "r2", "r3"] {
        wait_status(&c, id, "RUNNING");
    }
    let r1_shim = shim_pid_of("r1").expect("r1's shim");
    let r3_shim = shim_pid_of("r3").expect("r3's shim");

    let out = c.ctr(&["task", "kill", "-s", "TERM", "r2"]);
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    c.stop();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(r3_shim),
        nix::sys::signal::SIGKILL,
    );
    std::thread::sleep(Duration::from_secs(8));
    c.start_again();

    let tasks = stdout(&c.ctr(&["task", "ls"]));
    let status = |id: &str| {
        tasks
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .map(str::to_owned)
    };
    for id in ["r1", "r1app"] {
        assert_eq!(
            status(id).as_deref(),
            Some("RUNNING"),
            "{id}: {tasks}\n{}",
            c.log()
        );
    }
    assert_eq!(
        status("r2").as_deref(),
        Some("STOPPED"),
        "{tasks}\n{}",
        c.log()
    );
    assert_eq!(status("r3"), None, "{tasks}\n{}", c.log());
    assert_eq!(shim_pid_of("r1"), Some(r1_shim), "r1's shim was replaced");
    let log = c.log();
    let cleaned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cleaning up after shim disconnected"))
        .collect();
    assert!(
        !cleaned.is_empty() && cleaned.iter().all(|l| l.contains("id=r3")),
        "containerd cleaned up other shims than r3's: {cleaned:#?}"
    );

    for id in ["r1", "r1app"] {
        let exec = [
            "task",
            "exec",
            "--exec-id",
            "e1",
            id,
            "echo",
            "after-restart",
        ];
        let out = c.ctr(&exec);
        assert!(out.status.success(), "{id}: {}\n{}", text(&out), c.log());
        assert_eq!(stdout(&out), "after-restart\n");
    }
    // `ctr task delete` says the task's status.
    let out = c.ctr(&["task", "delete", "r2"]);
    assert!(
        out.status.success() && text(&out).contains("non-zero exit code 7"),
        "{}\n{}",
        text(&out),
        c.log()
    );
    // Events flow again: the shims' publishers reconnect to the new containerd.
    let (mut events, collected) =
        watch_events(&c, |l| l.contains("/tasks/delete") && l.contains("\"r1\""));
    for id in ["r1app", "r1"] {
        let out = c.ctr(&["task", "kill", "-s", "TERM", id]);
        assert!(out.status.success(), "{id}: {}\n{}", text(&out), c.log());
        wait_status(&c, id, "STOPPED");
        let out = c.ctr(&["task", "delete", id]);
        assert!(out.status.success(), "{id}: {}\n{}", text(&out), c.log());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !collected.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = events.kill();
    let _ = events.wait();
    let lines = collected.join().unwrap();
    let exits = lines.iter().filter(|l| l.contains("/tasks/exit")).count();
    assert_eq!(exits, 2, "events after the restart:\n{}", lines.join("\n"));
    for id in ["r1", "r1app", "r2", "r3"] {
        let out = c.ctr(&["container", "delete", id]);
        assert!(out.status.success(), "{id}: {}\n{}", text(&out), c.log());
    }
    c.assert_clean();
}

/// What a dead shim left, and containerd forgot, is cleaned by the next sandbox's shim
/// (issue 20). containerd cleans up after a dead shim by running its `delete`, but kills
/// that command after 5 s and then forgets the task; on a loaded host (seen in the lab)
/// the sandbox directory, its mounts and its cgroup claim stayed for good. That kill cannot
/// be provoked on demand, so this test stands in for its outcome: with containerd killed,
/// the shim is killed and containerd's record of the task (its bundle) removed, which is
/// all containerd has once its `delete` failed. After containerd starts again the leftovers
/// are all there (nothing else would remove them), and the next sandbox's start removes
/// them, and only them.
#[test]
fn ctr_a_dead_shims_leftovers_are_cleaned_by_the_next_start() {
    let Some(env) = env() else { return };
    let mut c = Containerd::start(&env, "sweep", "sweep_secs = 0\n");
    run_detached(&c, &[], "s1", &["sleep", "1000"]);
    let shim = shim_pid_of("s1").expect("s1's shim");
    c.stop_with(nix::sys::signal::SIGKILL);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim), nix::sys::signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(30);
    while shim_pids().contains(&shim) {
        assert!(Instant::now() < deadline, "s1's shim outlived SIGKILL");
        std::thread::sleep(Duration::from_millis(100));
    }
    let bundle = c.run.join("state/io.containerd.runtime.v2.task/default/s1");
    assert!(bundle.is_dir(), "no bundle at {}", bundle.display());
    containerd_shim_shoal_v2::mounts::remove_tree(&bundle).unwrap();
    c.start_again();

    let dir = c.shoal_state().join("s1");
    let mounts_of = |d: &std::path::Path| containerd_shim_shoal_v2::mounts::mounts_under(d).len();
    assert!(
        dir.is_dir(),
        "s1's sandbox directory is gone before any sweep"
    );
    assert!(mounts_of(&dir) > 0, "s1's mounts are gone before any sweep");
    assert_eq!(
        c.cgroup_claims().len(),
        1,
        "s1's cgroup claim is gone before any sweep"
    );

    run_detached(&c, &[], "s2", &["sleep", "1000"]);
    let s2 = c.shoal_state().join("s2");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let dirs = c.sandbox_dirs();
        let claims = c.cgroup_claims();
        let swept = c
            .log()
            .contains("sandbox s1: its shim had died; cleaned what it left");
        if dirs == [s2.clone()] && claims.len() == 1 && swept {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "s1's leftovers stayed: dirs {dirs:?}, claims {claims:?}, sweep logged: {swept}\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let state = c.shoal_state();
    let under_state: Vec<_> = containerd_shim_shoal_v2::mounts::mounts_under(&state)
        .into_iter()
        .filter(|m| *m != state && !m.starts_with(&s2))
        .collect();
    assert!(under_state.is_empty(), "mounts left: {under_state:?}");
    assert!(
        mounts_of(&s2) > 0,
        "the sweep took the live sandbox's mounts"
    );
    let out = c.ctr(&["task", "exec", "--exec-id", "e1", "s2", "echo", "alive"]);
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    assert_eq!(stdout(&out), "alive\n");

    c.remove("s2");
    let _ = c.ctr(&["container", "delete", "s1"]);
    c.assert_clean();
}

/// A pod's containers answer while another container of the pod is being created (issue
/// 21): the shim holds no lock across an agent call. Under CRI the kubelet polls the pod's
/// containers while it creates the next one; the shim used to hold the lock every request
/// takes across the VM's boot and the agent's CreateContainer, so those polls waited for
/// the create. Here the slow create is a real one: a container whose spec has a
/// createRuntime hook that sleeps 20 s in the guest (busybox from the first container's
/// rootfs), which the agent's create waits for. While it runs, the first container's state
/// (`ctr task ls`), a signal to it and its process list each answer, and the slow create is
/// still under way after them.
#[test]
fn ctr_a_pods_containers_answer_while_another_is_created() {
    let Some(env) = env() else { return };
    let c = Containerd::start(&env, "busy", "");
    run_detached(&c, &[], "p1", &["sleep", "1000"]);

    let mut spec: serde_json::Value = serde_json::from_slice(&c.ctr(&["oci", "spec"]).stdout)
        .expect("`ctr oci spec` prints a spec");
    spec["process"]["args"] = serde_json::json!(["/bin/sleep", "1000"]);
    spec["root"] = serde_json::json!({ "path": "rootfs" });
    spec["annotations"] = serde_json::json!({
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-id": "p1",
    });
    let busybox = format!(
        "{}/bin/busybox",
        containerd_shim_shoal_v2::sandbox::guest_container_dir("p1") + "/rootfs"
    );
    spec["hooks"] = serde_json::json!({
        "createRuntime": [{ "path": busybox, "args": ["sleep", "20"] }],
    });
    let path = c.root.join("slow-create.json");
    std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
    let slow = {
        let mut cmd = c.command(&["run", "--runtime", RUNTIME, "-d", "--config"]);
        cmd.arg(&path).arg("slow");
        std::thread::spawn(move || {
            let started = Instant::now();
            let out = cmd.output().expect("ctr run");
            (started.elapsed(), out)
        })
    };
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !slow.is_finished(),
        "the create with the sleeping hook ended within 5 s"
    );
    // Each answers well within the hook's 20 s: in a fraction of a second here. The shim
    // that held its lock across the create gave the list after 4 s with containerd giving
    // up on p1's state (UNKNOWN), and the signal after the create had ended.
    let bound = Duration::from_secs(3);
    for args in [
        &["task", "ls"][..],
        &["task", "kill", "-s", "CONT", "p1"][..],
        &["task", "ps", "p1"][..],
    ] {
        let asked = Instant::now();
        let out = c.ctr(args);
        let took = asked.elapsed();
        let shown = args.join(" ");
        assert!(
            out.status.success(),
            "ctr {shown}: {}\n{}",
            text(&out),
            c.log()
        );
        eprintln!(
            "ctr {shown} answered in {took:?} during the slow create:\n{}",
            stdout(&out)
        );
        assert!(
            took < bound && !slow.is_finished(),
            "`ctr {shown}` took {took:?} while the other container was created"
        );
        if args[1] == "ls" {
            let p1 = stdout(&out)
                .lines()
                .find(|l| l.starts_with("p1 "))
                .map(str::to_owned);
            assert!(
                p1.as_deref().is_some_and(|l| l.contains("RUNNING")),
                "p1 while the other container was created: {p1:?}"
            );
        }
    }
    let (took, out) = slow.join().unwrap();
    eprintln!(
        "the create with the sleeping hook took {took:?}: {}",
        text(&out)
    );
    assert!(
        took >= Duration::from_secs(15),
        "the hook did not hold the create: {took:?}"
    );

    c.remove("slow");
    c.remove("p1");
    c.assert_clean();
}

/// containerd stopped while sandboxes' VMs boot (the shims' Create calls in flight, their
/// `ctr run` clients waiting) and started again (issue 20). ttrpc drops a request's future
/// when its connection closes, which used to cut the create off half-way and leave its VM,
/// mounts and cgroup claim to a shim nobody knew of. Now each request runs to its end:
/// `b1`'s create (no stdio) completes; `b2`'s fails once its VM is up, as runc's would,
/// because its client removed the stdio fifos when it failed. containerd, going down, may
/// still send the delete of a task whose create it gave up on, or run `shim delete` on its
/// shim; a shim left serving nothing after its caller went away stops its VM and exits, as
/// containerd's clean-up would have had it. So after the restart `b1` is either CREATED (its shim kept it) or gone with its
/// shim, `b2` is gone with its shim, and `b1` then runs and takes exec. Nothing is left.
#[test]
fn ctr_containerd_restart_while_sandboxes_boot() {
    restart_while_sandboxes_boot(nix::sys::signal::SIGTERM);
}

/// The same with containerd killed (a crash, the OOM killer): it sends nothing on its way
/// down, so `b1` is always found CREATED (killed before it ever started, it reads STOPPED),
/// and `b2`'s shim ends on its own after its failed create.
#[test]
fn ctr_containerd_killed_while_sandboxes_boot() {
    restart_while_sandboxes_boot(nix::sys::signal::SIGKILL);
}

fn restart_while_sandboxes_boot(signal: nix::sys::signal::Signal) {
    let Some(env) = env() else { return };
    let mut c = Containerd::start(&env, "restartboot", "");
    let forever = "trap 'exit 0' TERM; while true; do sleep 1; done";
    let mut runs: Vec<_> = [("b1", &["--null-io"][..]), ("b2", &[][..])]
        .into_iter()
        .map(|(id, flags)| {
            let mut args = vec!["run", "-d", "--runtime", RUNTIME];
            args.extend_from_slice(flags);
            args.extend_from_slice(&[IMAGE, id, "sh", "-c", forever]);
            c.command(&args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // A VM is booting once its console log exists; its agent has not answered yet.
    let deadline = Instant::now() + Duration::from_secs(60);
    for (id, run) in ["b1", "b2"].into_iter().zip(runs.iter_mut()) {
        let console = c.shoal_state().join(id).join("console.log");
        while !console.exists() {
            // A VM that ends at once (a guest triple fault in the lab) takes its sandbox
            // directory with it before this loop sees it: say why, from `ctr run`.
            if let Ok(Some(_)) = run.try_wait() {
                let mut why = String::new();
                if let Some(mut err) = run.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut err, &mut why);
                }
                panic!("{id}'s ctr run ended before its VM was seen booting: {why}");
            }
            assert!(
                Instant::now() < deadline,
                "{id}'s VM never started\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    c.stop_with(signal);
    for run in runs {
        let out = run.wait_with_output().unwrap();
        assert!(
            !out.status.success(),
            "ctr run outlived containerd: {}",
            text(&out)
        );
    }
    c.start_again();

    let listed = |id: &str| {
        let tasks = stdout(&c.ctr(&["task", "ls"]));
        tasks
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .map(str::to_owned)
    };
    // Each create ends (its VM boot, up to the agent timeout), and each sandbox is then
    // either a task containerd lists or gone, its shim with it.
    let deadline = Instant::now() + Duration::from_secs(90);
    let settled = |id: &str| match listed(id).as_deref() {
        Some("CREATED") => true,
        None => shim_pid_of(id).is_none(),
        _ => false,
    };
    while !(settled("b1") && settled("b2")) {
        assert!(
            Instant::now() < deadline,
            "after the restart: b1 {:?}, b2 {:?}; left: {:?}\n{}",
            listed("b1"),
            listed("b2"),
            c.leftovers(),
            c.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(listed("b2"), None, "{}", c.log());
    if signal == nix::sys::signal::SIGKILL {
        // A containerd going down on SIGTERM may itself have ended b2's shim (`shim
        // delete` for the create it gave up on); a killed one cannot have.
        assert!(
            c.log()
                .contains("create of b2 failed after containerd's connection closed"),
            "{}",
            c.log()
        );
    }
    println!(
        "b1 after the restart: {}",
        listed("b1").unwrap_or_else(|| "gone with its shim (containerd deleted it)".into())
    );
    if signal == nix::sys::signal::SIGKILL {
        assert_eq!(listed("b1").as_deref(), Some("CREATED"), "{}", c.log());
    }
    if listed("b1").is_some() {
        // ctr cannot start a task another client created (CRI can): kill and delete it,
        // which takes its VM down, and start the container again in a new sandbox.
        let out = c.ctr(&["task", "kill", "-s", "KILL", "b1"]);
        assert!(out.status.success(), "{}\n{}", text(&out), c.log());
        wait_status(&c, "b1", "STOPPED");
        let out = c.ctr(&["task", "delete", "b1"]);
        assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    }
    c.assert_clean();
    let out = c.ctr(&["task", "start", "-d", "b1"]);
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    wait_status(&c, "b1", "RUNNING");
    let out = c.ctr(&["task", "exec", "--exec-id", "e1", "b1", "echo", "after"]);
    assert_eq!(stdout(&out), "after\n", "{}\n{}", text(&out), c.log());
    for id in ["b1", "b2"] {
        c.remove(id);
    }
    c.assert_clean();
}

#[test]
fn ctr_vm_dying_under_a_container_ends_the_task() {
    let Some(env) = env() else { return };
    let c = Containerd::start(&env, "crash", "");
    // A real guest crash: a privileged container panics the guest kernel through sysrq
    // (panic=1 reboots it, and the VM ends). The task must end with a non-zero status, and
    // the crash be on record.
    let out = c.run(
        &["--rm", "--privileged"],
        "crash",
        &["sh", "-c", "echo c > /proc/sysrq-trigger; sleep 600"],
    );
    assert_eq!(out.status.code(), Some(255), "{}\n{}", text(&out), c.log());
    // The flight recorder kept what the guest said before it went, after the sandbox's
    // directory was removed.
    let report = the_crash_report(&c);
    assert!(
        report.contains("sandbox: crash\n")
            && report.contains("reason: the guest reset itself")
            && report.contains("Kernel panic"),
        "{report}"
    );
    assert!(
        c.log().contains("sandbox crash: the VM ended unasked"),
        "{}",
        c.log()
    );
    c.assert_clean();
}

/// The one report in the flight recorder of `c`'s shoal (`<state_dir>/.crashes`).
fn the_crash_report(c: &Containerd) -> String {
    let reports: Vec<_> = std::fs::read_dir(c.shoal_state().join(".crashes"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert_eq!(reports.len(), 1, "{reports:?}\n{}", c.log());
    std::fs::read_to_string(&reports[0]).unwrap()
}

#[test]
fn ctr_detached_task_lifecycle_and_events() {
    let Some(env) = env() else { return };
    let c = Containerd::start(&env, "task", "");
    let (mut events, collected) = watch_events(&c, |_| false);
    let script = "trap 'echo bye; exit 0' TERM; while true; do sleep 1; done";
    run_detached(&c, &[], "d1", &["sh", "-c", script]);

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
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    let pids = stdout(&out).lines().skip(1).count();
    assert!(pids >= 1, "task ps: {}", text(&out));

    assert!(c.ctr(&["task", "pause", "d1"]).status.success());
    wait_status(&c, "d1", "PAUSED");
    assert!(c.ctr(&["task", "resume", "d1"]).status.success());
    wait_status(&c, "d1", "RUNNING");

    let out = c.ctr(&["task", "metrics", "d1"]);
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
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
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
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
    // A pod stopped as asked (the agent powers the guest off by rebooting it) is no crash:
    // the flight recorder keeps nothing.
    let reports: Vec<_> = std::fs::read_dir(c.shoal_state().join(".crashes"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        reports.is_empty(),
        "crash reports of a clean stop: {reports:?}"
    );
}

/// The shim's stdio copy threads of shim `pid`, by name.
fn stdio_threads(pid: i32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("shoal-std"))
        .collect()
}

/// The README's check of a running sandbox: its shim's vCPU, device and virtio-fs threads
/// run under seccomp with `no_new_privs`, the first two with no capabilities and the fs
/// worker with only its own, chrooted to its sandbox's `fs-root` (vmm/src/confine.rs); the
/// shim's own main thread keeps its.
fn vmm_threads_are_confined(shim: i32) {
    if std::env::var("SHOAL_VMM_CONFINE").as_deref() == Ok("off") {
        println!("not checked: SHOAL_VMM_CONFINE=off");
        return;
    }
    let mut seen = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{shim}/task")).unwrap() {
        let task = task.unwrap().path();
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let name = field("Name:");
        let (class, caps) = if name.starts_with("shoal-vcpu") {
            ("vcpu", "0000000000000000")
        } else if name == "shoal-devices" {
            ("devices", "0000000000000000")
        } else if name.starts_with("shoal-fs-") {
            ("fs", "00000000000000df")
        } else {
            continue;
        };
        assert_eq!(field("Seccomp:"), "2", "{name}: {status}");
        assert_eq!(field("NoNewPrivs:"), "1", "{name}");
        assert_eq!(field("CapEff:"), caps, "{name}");
        assert_eq!(field("CapPrm:"), caps, "{name}");
        assert_eq!(field("CapBnd:"), caps, "{name}");
        // The fs worker's root is its sandbox's fs-root (the share and proc/self/fd only).
        let root = std::fs::read_link(task.join("root")).unwrap();
        if class == "fs" {
            assert!(root.ends_with("fs-root"), "{name}: root {}", root.display());
        }
        *seen.entry(class).or_insert(0) += 1;
    }
    assert!(
        ["vcpu", "devices", "fs"]
            .iter()
            .all(|c| seen.contains_key(c)),
        "not every VMM thread class found in the shim: {seen:?}"
    );
    let main = std::fs::read_to_string(format!("/proc/{shim}/status")).unwrap();
    assert!(
        main.contains("Seccomp:\t0"),
        "the shim's main thread: {main}"
    );
}

/// Exec ids are the client's: `ctr task exec --exec-id` may use one again once the last
/// process under it was deleted, as probes do. Each exec's stdio copies end with it (they
/// used to wait for a stdin writer `ctr` never opens, one host thread per exec, and an exec
/// the agent refused left `ctr` waiting for output that never ended), and an exec that
/// cannot start fails at once.
#[test]
fn ctr_exec_ids_are_used_again_and_execs_leave_no_host_threads() {
    let Some(env) = env() else { return };
    let c = Containerd::start(&env, "execs", "");
    run_detached(&c, &[], "x1", &["sleep", "600"]);
    let shim = shim_pid_of("x1").expect("x1's shim");
    vmm_threads_are_confined(shim);
    let before = stdio_threads(shim);
    for round in 0..3 {
        let script = format!("echo round {round}; exit 3");
        let out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "probe",
            "x1",
            "sh",
            "-c",
            &script,
        ]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "round {round}: {}\n{}",
            text(&out),
            c.log()
        );
        assert_eq!(stdout(&out), format!("round {round}\n"));
    }
    let out = c.ctr(&["task", "exec", "--exec-id", "bad", "x1", "/no/such/binary"]);
    assert!(!out.status.success(), "{}", text(&out));
    let out = c.ctr(&["task", "exec", "--exec-id", "bad", "x1", "true"]);
    assert!(
        out.status.success(),
        "the failed exec's id: {}\n{}",
        text(&out),
        c.log()
    );
    // The last copies end as their exec is deleted, just before ctr returns.
    let deadline = Instant::now() + Duration::from_secs(5);
    while stdio_threads(shim).len() > before.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        stdio_threads(shim),
        before,
        "stdio threads of deleted execs are left in the shim"
    );
    c.remove("x1");
    c.assert_clean();
}

/// The sandbox's shim (holding its VM) runs in a host cgroup from the pool, limited to the
/// VM's RAM plus the configured overhead and charged for the guest's memory; a start beyond
/// the pool fails with a clear error and leaves nothing; deleting returns the cgroup.
#[test]
fn ctr_sandbox_in_a_pooled_host_cgroup_and_pool_exhaustion() {
    use containerd_shim_shoal_v2::host_cgroups::{Hierarchy, Pool};
    let Some(env) = env() else { return };
    let c = Containerd::start(
        &env,
        "cgroup",
        "memory_mib = 128\n[cgroups]\npool_size = 1\noverhead_mib = 32\n",
    );
    run_detached(&c, &[], "held", &["sleep", "1000"]);
    let shims = shim_pids();
    assert_eq!(shims.len(), 1, "{shims:?}");
    let pool = Pool::open(c.shoal_config().cgroups.pool_config()).unwrap();
    let dirs = pool.cgroups_of(shims[0] as u32).unwrap();
    assert!(
        dirs[0].to_string_lossy().contains("slot-0000"),
        "the shim is in {dirs:?}, not the pool's slot"
    );
    let (limit_file, usage_file) = match pool.hierarchy() {
        Hierarchy::V2 => (dirs[0].join("memory.max"), dirs[0].join("memory.current")),
        Hierarchy::V1 { controllers } => {
            let d = &dirs[controllers.iter().position(|c| *c == "memory").unwrap()];
            (
                d.join("memory.limit_in_bytes"),
                d.join("memory.usage_in_bytes"),
            )
        }
    };
    let read = |p: &std::path::Path| -> u64 {
        std::fs::read_to_string(p).unwrap().trim().parse().unwrap()
    };
    assert_eq!(read(&limit_file), (128 + 32) << 20);
    let usage = read(&usage_file);
    assert!(
        usage > 16 << 20,
        "the guest's memory is charged to the sandbox cgroup: only {usage} bytes"
    );
    assert_eq!(c.cgroup_claims().len(), 1);

    // The pool has one slot: a second sandbox cannot start, says why, and leaves nothing.
    let out = c.run(&["-d"], "extra", &["sleep", "1000"]);
    assert!(!out.status.success(), "a start beyond the pool succeeded");
    let err = text(&out);
    assert!(
        err.contains("host cgroup") && err.contains("all 1 pooled cgroups are claimed"),
        "{err}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dirs = c.sandbox_dirs().len();
        if shim_pids().len() == 1 && dirs == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failed start left a shim or a sandbox dir behind"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = c.ctr(&["container", "delete", "extra"]);

    assert!(c
        .ctr(&["task", "kill", "-s", "KILL", "held"])
        .status
        .success());
    wait_status(&c, "held", "STOPPED");
    assert!(c.ctr(&["task", "delete", "held"]).status.success());
    assert!(c.ctr(&["container", "delete", "held"]).status.success());
    c.assert_clean();
    assert_eq!(pool.free_count(), 1, "the slot went back to the pool");
}

/// A setuid-root binary in a container raises a process that does not ask for
/// `no_new_privs`, as under runc (issue 22: the guest mounted the share holding every rootfs
/// and volume `nosuid`, so `sudo` and `ping` in an image never worked; the same exec read
/// `euid=1000` then). The host is not what is tested here: its mounts of the same files
/// stay `nosuid` (`mounts::tests`, the setuid attack).
#[test]
fn ctr_a_setuid_binary_raises_an_exec_without_no_new_privs() {
    let Some(env) = env() else { return };
    let c = Containerd::start(&env, "setuid", "");
    let probe = c.root.join("probe");
    std::fs::create_dir_all(&probe).unwrap();
    let source = probe.join("euid.c");
    std::fs::write(
        &source,
        "#include <stdio.h>\n#include <unistd.h>\nint main(void) {\n  \
         printf(\"uid=%d euid=%d\\n\", (int)getuid(), (int)geteuid());\n  return 0;\n}\n",
    )
    .unwrap();
    let bin = probe.join("euid");
    let cc = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&source)
        .output()
        .unwrap();
    assert!(
        cc.status.success(),
        "cc (Debian gcc, libc6-dev): {}",
        text(&cc)
    );
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o4755)).unwrap();
    let volume = format!(
        "type=bind,src={},dst=/probe,options=rbind:ro",
        probe.display()
    );
    // ctr's specs ask for no_new_privs unless told otherwise; Kubernetes' default
    // (allowPrivilegeEscalation) does not. With it, the setuid bit is ignored, as it must be.
    for (id, flags, euid) in [
        ("suid", &["--allow-new-privs"][..], "0"),
        ("nnp", &[][..], "1000"),
    ] {
        let mut flags = flags.to_vec();
        flags.extend(["--mount", &volume]);
        run_detached(&c, &flags, id, &["sleep", "1000"]);
        let out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "--user",
            "1000:1000",
            id,
            "/probe/euid",
        ]);
        assert!(out.status.success(), "{id}: {}", text(&out));
        assert_eq!(
            stdout(&out),
            format!("uid=1000 euid={euid}\n"),
            "{id}: {}",
            text(&out)
        );
        c.remove(id);
    }
    c.assert_clean();
}

/// A terminal for a container's first process and for an exec into a container without one
/// (issue 22 has execs with terminals failing under CRI: its 64-character ids overflowed
/// the console socket's path, fixed by numbering them, and "failed to setup tty" was the
/// lab's chroot under the agent_host tests, see docs/architecture.md).
#[test]
fn ctr_run_with_a_terminal() {
    let Some(env) = env() else { return };
    let c = Containerd::start(&env, "tty", "");
    // ctr -t wants a terminal of its own: script(1) gives it one.
    let with_terminal = |args: &str| {
        let line = format!("ctr -a {} {args}", c.run.join("containerd.sock").display());
        Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .output()
            .unwrap()
    };
    let out = with_terminal(&format!(
        "run --rm -t --runtime {RUNTIME} {IMAGE} tty1 sh -c 'tty; echo tty-ok'"
    ));
    let text_out = stdout(&out);
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    assert!(text_out.contains("/dev/pts/"), "{text_out}");
    assert!(text_out.contains("tty-ok"), "{text_out}");

    // An exec with a terminal (`kubectl exec -it`), into a container without one.
    run_detached(&c, &[], "tty2", &["sleep", "1000"]);
    let out = with_terminal("task exec -t --exec-id t1 tty2 sh -c 'tty; echo exec-tty-ok'");
    let text_out = stdout(&out);
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    assert!(text_out.contains("/dev/pts/"), "{text_out}");
    assert!(text_out.contains("exec-tty-ok"), "{text_out}");
    c.remove("tty2");
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

    // RAM past what a sandbox VM may have, by annotation and by a container's memory
    // limit (2 TiB): refused before anything is made, naming the bound.
    let out = c.run(
        &["--rm", "--annotation", "io.shoal.vm.memory_mib=4000000"],
        "hugeram",
        &["true"],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("from 64 to 1048576"), "{}", text(&out));
    let _ = c.ctr(&["container", "delete", "hugeram"]);
    let out = c.run(
        &["--rm", "--memory-limit", "2199023255552"],
        "hugelimit",
        &["true"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("more than a sandbox VM may have (1048576 MiB)"),
        "{}",
        text(&out)
    );
    let _ = c.ctr(&["container", "delete", "hugelimit"]);
    c.assert_clean();

    // A spec without a process, and a volume whose host path does not exist.
    let spec = c.root.join("no-process.json");
    std::fs::write(&spec, r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"}}"#).unwrap();
    let out = run_spec(&c, &spec, "noproc");
    assert!(!out.status.success());
    assert!(text(&out).contains("no process"), "{}", text(&out));
    let _ = c.ctr(&["container", "delete", "noproc"]);
    // Host IPC (a spec without an ipc namespace; hostIPC in Kubernetes): refused, saying so.
    let mut hostipc: serde_json::Value =
        serde_json::from_slice(&c.ctr(&["oci", "spec"]).stdout).unwrap();
    let namespaces = hostipc["linux"]["namespaces"].as_array_mut().unwrap();
    namespaces.retain(|n| n["type"] != "ipc");
    let spec = c.root.join("host-ipc.json");
    std::fs::write(&spec, serde_json::to_vec(&hostipc).unwrap()).unwrap();
    let out = run_spec(&c, &spec, "hostipc");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("host IPC is not supported"),
        "{}",
        text(&out)
    );
    let _ = c.ctr(&["container", "delete", "hostipc"]);
    let out = c.run(
        &[
            "--rm",
            "--mount",
            "type=bind,src=/nonexistent-volume,dst=/data,options=rbind",
        ],
        "novol",
        &["true"],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("/nonexistent-volume"), "{}", text(&out));
    let _ = c.ctr(&["container", "delete", "novol"]);
    c.assert_clean();

    // The shim is killed under a running container: containerd sees the task stop, and
    // deleting it leaves nothing behind.
    run_detached(&c, &[], "victim", &["sleep", "600"]);
    for pid in shim_pids() {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    }
    wait_task_gone_or_stopped(&c, "victim");
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

    // A guest that dies while booting (its image has no /init, so the kernel panics): the
    // start fails as soon as the VM ends, not after the agent timeout, and the error carries
    // the guest console's last lines (the sandbox directory with the log is gone by then).
    let tmp = std::env::temp_dir().join(format!("shoal-e2e-initrds-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let empty = tmp.join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let c = Containerd::start(
        &env,
        "noinit",
        &format!(
            "initrd = \"{}\"\nagent_timeout_secs = 120\n",
            empty.display()
        ),
    );
    let started = Instant::now();
    let out = c.run(&["--rm"], "noinit", &["true"]);
    assert!(!out.status.success());
    let err = text(&out);
    assert!(err.contains("the sandbox VM ended"), "{err}");
    assert!(
        err.contains("Kernel panic"),
        "the console's panic is in the error: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(100), "{err}");
    let _ = c.ctr(&["container", "delete", "noinit"]);
    c.assert_clean();
    drop(c);

    // A guest that boots but never brings up the agent (its /init only sleeps): the agent
    // timeout names the time waited and shows what the guest printed.
    let idle = idle_initrd(&tmp);
    let c = Containerd::start(
        &env,
        "noagent",
        &format!("initrd = \"{}\"\nagent_timeout_secs = 5\n", idle.display()),
    );
    let out = c.run(&["--rm"], "noagent", &["true"]);
    assert!(!out.status.success());
    let err = text(&out);
    assert!(err.contains("did not answer within 5 s"), "{err}");
    assert!(
        err.contains("idle init: up"),
        "the console is in the error: {err}"
    );
    // The flight recorder kept it too, with what the vsock device saw: the guest took
    // the shim's connection requests and refused them, nothing listening on the port.
    let report = the_crash_report(&c);
    assert!(
        report.contains("sandbox: noagent\n")
            && report.contains("reason: the sandbox did not start: the guest agent did not answer")
            && report.contains("REQUEST handed to the guest")
            && report.contains("->1024 guest refused the connection (RST)")
            && report.contains("idle init: up"),
        "{report}"
    );
    let _ = c.ctr(&["container", "delete", "noagent"]);
    c.assert_clean();
    let _ = std::fs::remove_dir_all(&tmp);
}

/// An initramfs in `dir` whose /init (busybox, from the host's busybox-static) prints
/// `idle init: up` on the console and sleeps: a guest that boots but runs no agent.
fn idle_initrd(dir: &std::path::Path) -> std::path::PathBuf {
    let root = dir.join("idle-root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    std::fs::write(
        root.join("init"),
        "#!/bin/busybox sh\n/bin/busybox mount -t devtmpfs dev /dev\necho 'idle init: up' > /dev/console\nexec /bin/busybox sleep 100000\n",
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("init"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let img = dir.join("idle.img");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc --quiet -R 0:0 > {}",
            root.display(),
            img.display()
        ))
        .status()
        .unwrap();
    assert!(status.success(), "building the idle initramfs with cpio");
    img
}

#[test]
fn ctr_pod_network_namespace_is_carried_into_the_vm() {
    use std::io::Read;
    let Some(env) = env() else { return };
    let c = Containerd::start(&env, "net", "");
    let ns = PodNetns::new("net", 1);
    let resolv = c.root.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 10.216.1.53\nsearch pod.example\n").unwrap();
    let with_ns = format!("network:{}", ns.path());
    let dns = format!(
        "type=bind,src={},dst=/etc/resolv.conf,options=rbind:ro",
        resolv.display()
    );
    let out = c.run(
        &["-d", "--with-ns", &with_ns, "--mount", &dns],
        "web",
        &["nc", "-ll", "-p", "7000", "-e", "cat"],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    wait_status(&c, "web", "RUNNING");

    // The host reaches the guest: ping, and the container's TCP echo server.
    let ping = Command::new("busybox")
        .args(["ping", "-c", "1", "-W", "10", &ns.guest_ip()])
        .output()
        .unwrap();
    assert!(ping.status.success(), "ping: {}", text(&ping));
    let mut stream = connect_retrying(&format!("{}:7000", ns.guest_ip()), Duration::from_secs(60));
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(b"echo through the VM\n").unwrap();
    let mut got = [0u8; 20];
    stream.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"echo through the VM\n");
    drop(stream);

    // Inside: the pod's interface, address, MTU, route and DNS.
    let exec = |id: &str, script: &str| {
        c.ctr(&["task", "exec", "--exec-id", id, "web", "sh", "-c", script])
    };
    let out = exec("addr", "ip addr show eth0; ip route; cat /etc/resolv.conf");
    let shown = stdout(&out);
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    assert!(shown.contains("mtu 1400"), "{shown}");
    assert!(shown.contains("inet 10.216.1.2/24"), "{shown}");
    assert!(shown.contains("default via 10.216.1.1 dev eth0"), "{shown}");
    assert!(shown.contains("nameserver 10.216.1.53"), "{shown}");

    // The container reaches a server on the host side.
    let listener = std::net::TcpListener::bind(format!("{}:7001", ns.host_ip())).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&mut s).read_line(&mut line).unwrap();
        line
    });
    let out = exec("out", "echo from the container | nc -w 10 10.216.1.1 7001");
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    assert_eq!(server.join().unwrap(), "from the container\n");

    // Stopping the sandbox removes the tap and the redirects.
    let _ = c.ctr(&["task", "kill", "-s", "KILL", "web"]);
    wait_status(&c, "web", "STOPPED");
    let out = c.ctr(&["task", "delete", "web"]);
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    let _ = c.ctr(&["container", "delete", "web"]);
    c.assert_clean();
    ns.assert_clean();

    // The shim killed under a networked sandbox: `shim delete` removes the redirects.
    let out = c.run(&["-d", "--with-ns", &with_ns], "victim", &["sleep", "600"]);
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    wait_status(&c, "victim", "RUNNING");
    assert!(ns.show("tc qdisc show dev eth0").contains("ingress"));
    for pid in shim_pids() {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    }
    wait_task_gone_or_stopped(&c, "victim");
    let _ = c.ctr(&["task", "delete", "victim"]);
    let _ = c.ctr(&["container", "delete", "victim"]);
    c.assert_clean();
    ns.assert_clean();
}

#[test]
fn ctr_network_bad_input_gets_clear_errors() {
    let Some(env) = env() else { return };
    let c = Containerd::start(&env, "netbad", "");
    // No namespace path (plain `ctr run`): loopback only, and up, as with runc.
    let out = c.run(
        &["--rm"],
        "plain",
        &[
            "sh",
            "-c",
            "ip -o link; ping -c 1 -W 5 127.0.0.1 >/dev/null && echo lo-ok",
        ],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    let shown = stdout(&out);
    // Up: loopback alone (the guest kernel's IPv6 adds a `sit0` to every namespace, down).
    let up: Vec<_> = shown
        .lines()
        .filter(|l| l.contains(": <") && (l.contains(",UP") || l.contains("<UP")))
        .collect();
    assert_eq!(up.len(), 1, "{shown}");
    assert!(up[0].contains("lo: <LOOPBACK,UP"), "{shown}");
    assert!(shown.contains("lo-ok"), "{shown}");
    // Each refused start says why, and leaves no container behind.
    let refused = |flags: &[&str], id: &str, why: &str| {
        let out = c.run(&[&["--rm"], flags].concat(), id, &["true"]);
        assert!(!out.status.success());
        assert!(text(&out).contains(why), "{}", text(&out));
        let _ = c.ctr(&["container", "delete", id]);
    };
    // Host networking: not something a VM can share.
    refused(
        &["--net-host"],
        "hostnet",
        "host networking is not supported",
    );
    // A namespace that is gone.
    let gone = "network:/var/run/netns/shoal-vanished";
    refused(&["--with-ns", gone], "gone", "shoal-vanished");
    // An interface that cannot be carried (a layer-3 tun has no MAC).
    let ns = PodNetns::new("l3", 2);
    ns.ip("tuntap add l3tun mode tun");
    ns.ip("addr add 10.216.99.1/24 dev l3tun");
    ns.ip("link set l3tun up");
    refused(
        &["--with-ns", &format!("network:{}", ns.path())],
        "l3",
        "l3tun",
    );
    c.assert_clean();
    ns.assert_clean();
    // A tap that cannot be created: its name is taken by an interface that is not a tap.
    let ns = PodNetns::new("tapbusy", 3);
    ns.ip("link add shoal-tap0 type veth peer name p0");
    let with_ns = format!("network:{}", ns.path());
    refused(&["--with-ns", &with_ns], "tapbusy", "shoal-tap0");
    c.assert_clean();
    let qdiscs = ns.show("tc qdisc show");
    assert!(
        !qdiscs.contains("ingress"),
        "redirect left behind: {qdiscs}"
    );
}

#[test]
fn ctr_storm_beyond_what_fits_fails_cleanly() {
    let Some(env) = env() else { return };
    // Five starts at once against a pool of three: three run, two fail saying why.
    let c = Containerd::start(&env, "overflow", "[cgroups]\npool_size = 3\n");
    let outs = in_flight(5, 5, |i| {
        c.run(&["-d"], &format!("o{i}"), &["sleep", "600"])
    });
    let ok = outs.iter().filter(|o| o.status.success()).count();
    let all = || outs.iter().map(text).collect::<Vec<_>>();
    assert_eq!(ok, 3, "{:?}\n{}", all(), c.log());
    for o in outs.iter().filter(|o| !o.status.success()) {
        assert!(
            text(o).contains("all 3 pooled cgroups are claimed"),
            "{}\n{}",
            text(o),
            c.log()
        );
    }
    for i in 0..5 {
        c.remove(&format!("o{i}"));
    }
    c.assert_clean();
    drop(c);

    // A host short of memory (a reserve larger than any host) refuses the start, cleanly.
    let c = Containerd::start(&env, "lowmem", "host_reserve_mib = 100000000\n");
    let out = c.run(&["--rm"], "lowmem", &["true"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("host memory is low"), "{}", text(&out));
    let _ = c.ctr(&["container", "delete", "lowmem"]);
    c.assert_clean();

    // A storm beyond the memory the host has left: a reserve that leaves room for about two
    // starts. Starts in flight count against it, so the starts arriving together do not all
    // pass one look at MemAvailable: some run, the rest fail saying why, nothing is left.
    let available = containerd_shim_shoal_v2::admission::host_available_mib().unwrap();
    let room = 2 * containerd_shim_shoal_v2::admission::STARTUP_MIB + 32;
    let base = std::fs::read_to_string(c.root.join("shoal.toml"))
        .unwrap()
        .replace("host_reserve_mib = 100000000\n", "");
    let tight = c.root.join("shoal-tight.toml");
    // Before the rest: the base ends inside its [cgroups] table.
    std::fs::write(
        &tight,
        format!("host_reserve_mib = {}\n{base}", available - room),
    )
    .unwrap();
    let flags = ["-d", "--runtime-config-path", tight.to_str().unwrap()];
    let outs = in_flight(5, 5, |i| c.run(&flags, &format!("m{i}"), &["sleep", "600"]));
    let ok = outs.iter().filter(|o| o.status.success()).count();
    let all = || outs.iter().map(text).collect::<Vec<_>>();
    assert!(
        (1..5).contains(&ok),
        "{ok} of 5 started: {:?}\n{}",
        all(),
        c.log()
    );
    for o in outs.iter().filter(|o| !o.status.success()) {
        assert!(
            text(o).contains("host memory is low"),
            "{}\n{}",
            text(o),
            c.log()
        );
    }
    for i in 0..5 {
        c.remove(&format!("m{i}"));
    }
    c.assert_clean();
}

/// VM templates (`template = true`), as an operator uses them: a start without a template
/// fails saying how to make one; `shoal-template` makes it from the same config; sandboxes
/// then start by restoring it, two at once, each with its own boot id, random numbers and
/// the host's clock (hostnames: `agent_vm`, since `ctr run` sets none); a config the
/// template no longer fits, or a damaged snapshot, is refused by name and leaves nothing.
#[test]
fn ctr_templates_restore_sandboxes_that_are_each_unique() {
    let Some(env) = env() else { return };
    let templates = std::path::PathBuf::from(format!(
        "/var/tmp/shoal-e2e-templates-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&templates);
    let c = Containerd::start(
        &env,
        "template",
        &format!(
            "template = true\ntemplate_dir = \"{}\"\n",
            templates.display()
        ),
    );
    let out = c.run(&["--rm"], "notemplate", &["true"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no VM template for 256 MiB and 1 vCPUs")
            && text(&out).contains("scripts/template"),
        "{}",
        text(&out)
    );
    let _ = c.ctr(&["container", "delete", "notemplate"]);
    c.assert_clean();

    let made = std::process::Command::new(env!("CARGO_BIN_EXE_shoal-template"))
        .arg("--config")
        .arg(c.root.join("shoal.toml"))
        .output()
        .unwrap();
    assert!(made.status.success(), "shoal-template: {}", text(&made));
    let dir = templates.join("256m-1c");
    assert_eq!(stdout(&made).trim(), dir.to_str().unwrap());
    for f in ["vm.state", "vm.mem", "template.json", "console.log"] {
        assert!(dir.join(f).is_file(), "{f} missing from the template");
    }

    // The container's root file system is on the sandbox's virtio-fs share, which the
    // restored guest mounts from its new host directory.
    let script = "cat /proc/sys/kernel/random/boot_id /proc/sys/kernel/random/uuid; date +%s";
    let outs = in_flight(2, 2, |i| {
        let name = format!("tpl{i}");
        c.run(&["--rm"], &name, &["sh", "-c", script])
    });
    let mut seen = Vec::new();
    for out in &outs {
        assert!(out.status.success(), "{}\n{}", text(out), c.log());
        let lines: Vec<String> = stdout(out).lines().map(String::from).collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        let guest_now: i64 = lines[2].parse().unwrap();
        let host_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(
            (host_now - guest_now).abs() < 120,
            "guest clock {guest_now}, host {host_now}"
        );
        seen.push(lines);
    }
    assert_ne!(
        seen[0][0], seen[1][0],
        "both restored guests have the same boot id"
    );
    assert_ne!(
        seen[0][1], seen[1][1],
        "both restored guests drew the same random uuid"
    );
    let restored = c.log().matches("restoring the VM template").count();
    assert_eq!(restored, 2, "{}", c.log());
    c.assert_clean();

    // A config the template no longer fits: another size, another command line.
    for (extra, wanted) in [
        ("memory_mib = 320\n", "no VM template for 320 MiB"),
        (
            "kernel_cmdline = \"console=ttyS0 reboot=k panic=1\"\n",
            "does not fit this config: it was booted with the command line",
        ),
    ] {
        let other = c.root.join("other.toml");
        std::fs::write(
            &other,
            format!(
                "kernel = \"{}\"\ninitrd = \"{}\"\nstate_dir = \"{}\"\ntemplate = true\ntemplate_dir = \"{}\"\n{extra}[cgroups]\nenabled = false\n",
                env.kernel.display(),
                env.agent.display(),
                c.shoal_state().display(),
                templates.display()
            ),
        )
        .unwrap();
        let out = c.run(
            &["--rm", "--runtime-config-path", other.to_str().unwrap()],
            "misfit",
            &["true"],
        );
        assert!(!out.status.success());
        assert!(text(&out).contains(wanted), "{}", text(&out));
        let _ = c.ctr(&["container", "delete", "misfit"]);
        c.assert_clean();
    }

    // A damaged snapshot: the start fails naming the file, and leaves nothing.
    let state = dir.join("vm.state");
    let mut bytes = std::fs::read(&state).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&state, bytes).unwrap();
    let out = c.run(&["--rm"], "damaged", &["true"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("vm.state is corrupted"),
        "{}",
        text(&out)
    );
    let _ = c.ctr(&["container", "delete", "damaged"]);
    c.assert_clean();
    std::fs::remove_dir_all(&templates).unwrap();
}

/// A pod of two containers (the second joins the first's sandbox through the CRI
/// annotations, as containerd's CRI plugin sends them): the sandbox's host cgroup carries
/// the sum of their CPU quotas, and gives the second's back when it is deleted.
#[test]
fn ctr_pod_host_cgroup_follows_its_containers_cpu_quotas() {
    use containerd_shim_shoal_v2::host_cgroups::{Hierarchy, Pool};
    let Some(env) = env() else { return };
    let c = Containerd::start(&env, "podcpu", "");
    let out = c.run(&["-d", "--cpus", "0.5"], "pod", &["sleep", "1000"]);
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    wait_status(&c, "pod", "RUNNING");
    let shims = shim_pids();
    assert_eq!(shims.len(), 1, "{shims:?}");
    let pool = Pool::open(c.shoal_config().cgroups.pool_config()).unwrap();
    let dirs = pool.cgroups_of(shims[0] as u32).unwrap();
    let quota = || -> String {
        match pool.hierarchy() {
            Hierarchy::V2 => std::fs::read_to_string(dirs[0].join("cpu.max"))
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_string(),
            Hierarchy::V1 { controllers } => {
                let d = &dirs[controllers.iter().position(|c| *c == "cpu").unwrap()];
                std::fs::read_to_string(d.join("cpu.cfs_quota_us"))
                    .unwrap()
                    .trim()
                    .to_string()
            }
        }
    };
    assert_eq!(quota(), "50000");
    let out = c.run(
        &[
            "-d",
            "--cpus",
            "0.25",
            "--annotation",
            "io.kubernetes.cri.container-type=container",
            "--annotation",
            "io.kubernetes.cri.sandbox-id=pod",
        ],
        "app",
        &["sleep", "1000"],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    wait_status(&c, "app", "RUNNING");
    assert_eq!(
        shim_pids().len(),
        1,
        "the second container has a shim of its own"
    );
    assert_eq!(
        quota(),
        "75000",
        "the pod's quota is its containers' together"
    );
    c.remove("app");
    assert_eq!(quota(), "50000", "the deleted container's quota went back");
    c.remove("pod");
    c.assert_clean();
}

/// The files under `dir`, each with its bytes' hash (a directory's entries, a symlink's
/// target), sorted: what "nothing changed" compares.
fn tree_digest(dir: &std::path::Path) -> Vec<(String, u64)> {
    use std::hash::{Hash, Hasher};
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        if meta.file_type().is_symlink() {
            std::fs::read_link(&p).unwrap().hash(&mut h);
        } else if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        } else {
            std::fs::read(&p).unwrap().hash(&mut h);
        }
        use std::os::unix::fs::MetadataExt;
        meta.mode().hash(&mut h);
        out.push((p.display().to_string(), h.finish()));
    }
    out.sort();
    out
}

/// Mount points outside `inside`, from this process's mount table.
fn mounts_outside(inside: &std::path::Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| !std::path::Path::new(p).starts_with(inside))
        .map(String::from)
        .collect();
    points.sort();
    points
}

/// Guest resets (a lab failure) `ctr_guest_racing_the_share_reaches_nothing_on_the_host`
/// goes on past.
const MAX_LAB_RESETS: usize = 6;

/// The lab's guest resets a test has gone on past.
#[derive(Default)]
struct LabResets {
    /// The shim's triple-fault lines already counted.
    seen: usize,
    count: usize,
}

impl LabResets {
    /// Whether containerd's log `log` shows a guest triple fault not counted yet: counts
    /// it, prints it with `when`, and fails the test past `MAX_LAB_RESETS`.
    fn new_one(&mut self, log: &str, when: &str) -> bool {
        let faults: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("guest triple fault"))
            .collect();
        let new = faults.get(self.seen).map(|l| l.to_string());
        self.seen = faults.len();
        let Some(fault) = new else { return false };
        self.count += 1;
        println!(
            "the lab's guest reset {when} ({} so far): {fault}",
            self.count
        );
        assert!(
            self.count <= MAX_LAB_RESETS,
            "the pod's guest reset {} times\n{log}",
            self.count
        );
        true
    }
}

/// Issue 18's attack, through containerd with a real guest: root in a privileged container
/// mounts the sandbox's virtio-fs share and, in a loop, renames every entry of every
/// container directory in it and plants symlinks to a host decoy directory in their place
/// and at the names the host will mount on next (`ln -sT`: a link made inside a writable
/// mount is the container's own business, not a plant), plants one in the share's root,
/// and writes over a read-only volume's file, while the host
/// creates containers in the same pod, each with a directory volume, a file volume and a
/// read-only volume (SHOAL_RACE_N of them, default 200). No plant and no write may land; the
/// decoy, the read-only file and the host's mounts outside the sandbox stay as they were. A
/// control shows the attacker's tools work: through the same share it writes in its own
/// rootfs. (With the share built the old way the same plant binds a volume over the decoy:
/// the unit test `a_guest_racing_symlinks_into_the_share_reaches_nothing` shows that
/// natively, where the old code path can be run as it was.)
///
/// In the nested lab a busy guest now and then triple-faults with no message (the vCPU
/// state KVM reports is the reset state; issue 24). It happens as often with an attacker
/// that only runs `ls` in a loop, and the lab's own machine reset under that load once, so
/// it is the lab's emulation, not the attack; the attacker rests 0.1 s between rounds,
/// which makes it rarer. The pod's VM then ends: the host's side is checked at that point
/// as at the end, the reset is printed, and a new attacker pod takes over for the
/// creations left; more than `MAX_LAB_RESETS` resets fail the test.
#[test]
fn ctr_guest_racing_the_share_reaches_nothing_on_the_host() {
    let Some(env) = env() else { return };
    let n = support::containerd::env_usize("SHOAL_RACE_N", 200);
    if n == 0 {
        println!("\nSKIP: share race e2e: SHOAL_RACE_N=0 (scripts/test leaves it out unless SHOAL_RACE_N is set: in two-vCPU labs its churn of nested VMs brings out the lab's faults, guest triple faults and once a stalled lab; docs/lab.md)");
        return;
    }
    let c = Containerd::start(&env, "race", "");
    let decoy = c.root.join("decoy");
    std::fs::create_dir_all(decoy.join("cron.d")).unwrap();
    std::fs::write(decoy.join("cron.d/job"), b"* * * * * root true\n").unwrap();
    std::fs::write(decoy.join("shadow"), b"root:x:1::::::\n").unwrap();
    let vols = c.root.join("volumes");
    std::fs::create_dir_all(vols.join("dir")).unwrap();
    std::fs::create_dir_all(vols.join("ro")).unwrap();
    std::fs::write(vols.join("ro/precious"), b"read-only on the host\n").unwrap();
    std::fs::write(vols.join("file"), b"file volume\n").unwrap();
    let before = tree_digest(&decoy);
    let ro_before = tree_digest(&vols.join("ro"));
    let state = c.shoal_state();
    let mounts_before = mounts_outside(&state);
    let host_unchanged = |when: &str| {
        assert_eq!(
            tree_digest(&decoy),
            before,
            "{when}: a host file outside the sandbox changed"
        );
        assert_eq!(
            tree_digest(&vols.join("ro")),
            ro_before,
            "{when}: the read-only volume changed"
        );
        assert_eq!(
            mounts_outside(&state),
            mounts_before,
            "{when}: mounts outside the sandbox changed"
        );
    };
    let (dir, file, ro) = (vols.join("dir"), vols.join("file"), vols.join("ro"));
    let volumes = [
        format!("type=bind,src={},dst=/d,options=rbind:rw", dir.display()),
        format!("type=bind,src={},dst=/f,options=bind:rw", file.display()),
        format!("type=bind,src={},dst=/r,options=rbind:ro", ro.display()),
    ];

    let (mut made, mut resets) = (0, LabResets::default());
    while made < n {
        let pod = format!("pod{}", resets.count);
        let attack = format!(
            r#"mkdir -p /mnt && mount -t virtiofs shoal /mnt || {{ echo mount-failed > /tmp/landed; exit 1; }}
ln -s {decoy} /mnt/{pod}/rootfs/control-link && echo ok > /tmp/control
n=0
while [ ! -e /tmp/stop ]; do
  for d in /mnt/*/; do
    for p in "$d"*; do
      mv "$p" "$p.moved" 2>/dev/null && n=$((n+1)) && echo "mv $p" >> /tmp/ops
      ln -sT {decoy} "$p" 2>/dev/null && n=$((n+1)) && echo "ln $p" >> /tmp/ops
      ln -sT {decoy} "$p.new" 2>/dev/null && n=$((n+1)) && echo "ln $p.new" >> /tmp/ops
      [ -e "$p/precious" ] && echo overwritten 2>/dev/null > "$p/precious" && n=$((n+1)) && echo "write $p/precious" >> /tmp/ops
    done
    for name in rootfs volume-0 volume-1 volume-2 volume-3 volume-4 volume-5 volume-6 volume-7 volume-8 volume-9; do
      ln -sT {decoy} "$d$name" 2>/dev/null && n=$((n+1)) && echo "ln $d$name" >> /tmp/ops
    done
  done
  ln -sT {decoy} /mnt/planted 2>/dev/null && n=$((n+1)) && echo "ln /mnt/planted" >> /tmp/ops
  echo $n > /tmp/landed
  sleep 0.1
done
echo $n > /tmp/landed; touch /tmp/done
exec sleep 3600"#,
            decoy = decoy.display()
        );
        let out = c.run(&["-d", "--privileged"], &pod, &["sh", "-c", &attack]);
        if !out.status.success() {
            let log = c.log();
            if !resets.new_one(&log, "while the attacker started") {
                panic!("{}\n{log}", text(&out));
            }
            let _ = c.ctr(&["container", "delete", &pod]);
            c.assert_clean();
            continue;
        }
        wait_status(&c, &pod, "RUNNING");
        let exec = |id: &str, cmd: &str| {
            stdout(&c.ctr(&["task", "exec", "--exec-id", id, &pod, "sh", "-c", cmd]))
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while exec("control", "cat /tmp/control 2>/dev/null").trim() != "ok" {
            let landed = exec("early", "cat /tmp/landed 2>/dev/null");
            assert!(
                !landed.contains("mount-failed"),
                "the attacker could not mount the share"
            );
            assert!(Instant::now() < deadline, "the attacker never started");
            std::thread::sleep(Duration::from_millis(500));
        }
        let mut reset = false;
        while made < n {
            let id = format!("app{made}");
            let sandbox = format!("io.kubernetes.cri.sandbox-id={pod}");
            let out = c.run(
                &[
                    "--rm",
                    "--annotation",
                    "io.kubernetes.cri.container-type=container",
                    "--annotation",
                    &sandbox,
                    "--mount",
                    &volumes[0],
                    "--mount",
                    &volumes[1],
                    "--mount",
                    &volumes[2],
                ],
                &id,
                &[
                    "sh",
                    "-c",
                    "cat /f /r/precious >/dev/null && ! touch /r/x 2>/dev/null",
                ],
            );
            if out.status.success() {
                made += 1;
                continue;
            }
            // A container whose directory the attacker managed to swap could fail; none
            // may, unless the pod's VM itself is gone.
            let log = c.log();
            if !resets.new_one(&log, &format!("after {made} creations")) {
                let console = std::fs::read_to_string(state.join(&pod).join("console.log"));
                panic!(
                    "{id}: {}\n{log}\nthe pod's guest console:\n{}",
                    text(&out),
                    console.unwrap_or_else(|e| format!("(cannot read: {e})"))
                );
            }
            let _ = c.ctr(&["container", "delete", &id]);
            host_unchanged("after a guest reset");
            c.remove(&pod);
            c.assert_clean();
            reset = true;
            break;
        }
        if reset {
            continue;
        }
        exec("stop", "touch /tmp/stop");
        let deadline = Instant::now() + Duration::from_secs(60);
        while exec("done", "test -e /tmp/done && echo yes").trim() != "yes" {
            assert!(Instant::now() < deadline, "the attacker did not stop");
            std::thread::sleep(Duration::from_millis(300));
        }
        let landed = exec("landed", "cat /tmp/landed");
        let ops = exec("ops", "head -n 20 /tmp/ops 2>/dev/null");
        assert_eq!(
            landed.trim(),
            "0",
            "the guest changed the share's tree:\n{ops}"
        );
        host_unchanged("at the end");
        c.remove(&pod);
        c.assert_clean();
    }
    println!(
        "{made} containers made beside the attacker; the lab's guest reset {} times",
        resets.count
    );
}

/// A read-only rootfs is read-only on the host too: root in a privileged guest container
/// that reaches its own rootfs through the share, not through its read-only root, cannot
/// write to it (the shim seals the mount once the container exists). The share goes on /tmp:
/// a read-only root cannot have a new mount point made in it.
#[test]
fn ctr_read_only_rootfs_is_read_only_through_the_share() {
    let Some(env) = env() else { return };
    let c = Containerd::start(&env, "rofs", "");
    let out = c.run(
        &["--rm", "--read-only", "--privileged"],
        "rofs",
        &[
            "sh",
            "-c",
            "mount -t virtiofs shoal /tmp && ls /tmp/rofs/rootfs/bin >/dev/null && \
             if touch /tmp/rofs/rootfs/x; then echo written; else echo refused; fi",
        ],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    assert_eq!(stdout(&out).trim(), "refused", "{}", text(&out));
    c.assert_clean();
}
