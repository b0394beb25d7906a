//! Container processes are made by a helper process of one thread, never by the agent itself.
//!
//! libcontainer makes a container's processes with raw `clone3` calls and runs Rust and libc
//! code in the copies (allocating, logging, exiting). A copy of a process of many threads
//! holds every lock as the other threads held it at that instant, and none of those threads
//! exists in the copy: a copy that takes such a lock waits forever. The agent has many
//! threads (the async runtime, its blocking pool, stdio copies, the reaper), and under load
//! this happened: an intermediate process `youki:[1:INTER]` sat in a futex wait, the create
//! that made it waited for it while holding the reaper's lock, and every later request of the
//! pod timed out. So the agent runs itself again (`/proc/self/exe`, first argument
//! [`HELPER_ARG`]) as a helper of one thread for each create and exec. The helper reads its
//! [`Job`] on stdin, takes the process's stdin, stdout and stderr as descriptors 3, 4 and 5,
//! makes the process with libcontainer (its clones now copy a process of one thread), writes
//! one line of JSON with the new pid or the error on stdout and exits. The process it made
//! outlives it and is re-parented to the agent (PID 1 in the guest, a child subreaper on a
//! host), whose reaper collects its exit as before.
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};
use crate::stdio::ChildStdio;

/// The helper's first argument.
pub const HELPER_ARG: &str = "--container-process-helper";

/// The descriptor numbers the process's stdin, stdout and stderr have in the helper.
const STDIO_FDS: [i32; 3] = [3, 4, 5];

/// How long a helper may take to answer: under the shim's 30 s for a CreateContainer, so
/// that a helper stuck (in a hook, or on a lock as in the module comment) is killed and the
/// request answered with an error naming it, and the reaper's lock is released, before the
/// shim gives up on the call.
pub const HELPER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(25);

/// What the helper makes.
#[derive(Debug, Serialize, Deserialize)]
pub struct Job {
    /// The container's id.
    pub id: String,
    /// libcontainer's state directory (the container's is `<state_root>/<id>`).
    pub state_root: PathBuf,
    /// Where the process's terminal is sent, if it has one.
    pub console_socket: Option<PathBuf>,
    pub kind: JobKind,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum JobKind {
    /// A container's init process from the bundle at `bundle`, waiting for its start.
    Create { bundle: PathBuf, no_pivot: bool },
    /// A process (`process`: its OCI process JSON file) in a running container, under the
    /// container's seccomp profile if it has one.
    Exec {
        process: PathBuf,
        seccomp: Option<Box<crate::exec_seccomp::ExecSeccomp>>,
    },
}

/// The helper's answer: the new process's pid, or what failed.
#[derive(Debug, Serialize, Deserialize)]
enum Outcome {
    Made(i32),
    Failed(String),
}

/// Runs the helper for `job`, the process's stdio being `stdio`; returns the new process's
/// pid. The caller holds the reaper's lock, so that the reaper does not take the helper's
/// exit, which is waited for here.
pub fn make(job: &Job, stdio: ChildStdio) -> Result<i32> {
    let action = match job.kind {
        JobKind::Create { .. } => "create",
        JobKind::Exec { .. } => "exec",
    };
    let failed =
        |what: &str, e: std::io::Error| AgentError::io(format!("{action} helper: {what}"), e);
    // Copies numbered 10 and up: moving a descriptor onto its own number would leave it
    // close-on-exec, and none of these can be 3, 4 or 5.
    let mut copies = Vec::with_capacity(3);
    for fd in [&stdio.stdin, &stdio.stdout, &stdio.stderr] {
        let copy = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))
            .map_err(|e| AgentError::sys(format!("{action} helper: copy a stdio descriptor"), e))?;
        // SAFETY: fcntl just returned this new descriptor, owned by nothing else.
        copies.push(unsafe { OwnedFd::from_raw_fd(copy) });
    }
    drop(stdio);
    let raw: Vec<i32> = copies.iter().map(|f| f.as_raw_fd()).collect();
    let raw = [raw[0], raw[1], raw[2]];
    let mut command = Command::new("/proc/self/exe");
    command
        .arg0("shoal-agent")
        .arg(HELPER_ARG)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: between fork and exec the closure calls only dup2 and setpgid, which are
    // async-signal-safe, on descriptors the parent keeps open until spawn returns; it
    // allocates nothing.
    unsafe {
        command.pre_exec(move || {
            for (from, to) in raw.iter().zip(STDIO_FDS) {
                if libc::dup2(*from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // A process group of its own, which a helper past its deadline is killed by.
            if libc::setpgid(0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|e| failed("start", e))?;
    drop(copies);
    let sent = serde_json::to_vec(job)
        .map_err(std::io::Error::other)
        .and_then(|json| child.stdin.take().expect("piped").write_all(&json));
    let mut out = child.stdout.take().expect("piped");
    let read = sent.and_then(|()| read_answer(&mut out, HELPER_DEADLINE));
    let line = match read {
        Ok(Some(line)) => line,
        Ok(None) => {
            end_group(&mut child);
            if let JobKind::Create { .. } = job.kind {
                // What it made so far (an init that left the group with setsid, its cgroup,
                // its state): gone, so that the id can be used again.
                remove_half_made(&job.state_root.join(&job.id));
            }
            return Err(AgentError::Helper(format!(
                "container {}: the {action} helper did not answer within {} s and was killed",
                job.id,
                HELPER_DEADLINE.as_secs()
            )));
        }
        Err(e) => {
            end_group(&mut child);
            return Err(failed("talk to it", e));
        }
    };
    let status = child.wait().map_err(|e| failed("wait", e))?;
    match serde_json::from_str::<Outcome>(&line) {
        Ok(Outcome::Made(pid)) => Ok(pid),
        Ok(Outcome::Failed(message)) => Err(AgentError::Helper(message)),
        Err(_) => Err(AgentError::Helper(format!(
            "container {}: the {action} helper ended ({status}) without an answer",
            job.id
        ))),
    }
}

/// Kills the helper's whole process group (the helper and what it made so far) and reaps the
/// helper.
fn end_group(child: &mut std::process::Child) {
    // SAFETY: kill(2) on the helper's own process group (set in pre_exec); the unreaped
    // helper keeps its pid, and so the group's id, from being used again.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.wait();
}

/// Takes down a container a killed create helper left half made: its processes and cgroup
/// through libcontainer's forced delete where its state can be read, its state directory in
/// any case.
fn remove_half_made(state: &std::path::Path) {
    if let Ok(mut container) = libcontainer::container::Container::load(state.to_path_buf()) {
        if let Err(e) = container.delete(true) {
            tracing::warn!(
                "cannot delete the half-made container {}: {e}",
                state.display()
            );
        }
    }
    let _ = std::fs::remove_dir_all(state);
}

/// Reads the helper's one line from `out` until `deadline` has passed: `None` when it has
/// not answered by then.
fn read_answer(
    out: &mut std::process::ChildStdout,
    deadline: std::time::Duration,
) -> std::io::Result<Option<String>> {
    let end = std::time::Instant::now() + deadline;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let mut fds = [libc::pollfd {
            fd: out.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one pollfd for a descriptor `out` keeps open.
        let ready = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                1,
                left.as_millis().min(i32::MAX as u128) as i32,
            )
        };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if ready == 0 {
            continue;
        }
        let n = out.read(&mut buf)?;
        bytes.extend_from_slice(&buf[..n]);
        if n == 0 || bytes.contains(&b'\n') || bytes.len() > 1 << 20 {
            let line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
            return Ok(Some(String::from_utf8_lossy(line).into_owned()));
        }
    }
}

/// The helper's whole life (see the module comment): never returns.
pub fn helper_main() -> ! {
    let outcome = match run_job() {
        Ok(pid) => Outcome::Made(pid),
        Err(e) => Outcome::Failed(e.to_string()),
    };
    let mut line = serde_json::to_string(&outcome).unwrap_or_else(|_| "null".into());
    line.push('\n');
    let _ = std::io::stdout().write_all(line.as_bytes());
    std::process::exit(0)
}

fn run_job() -> Result<i32> {
    let mut json = Vec::new();
    std::io::stdin()
        .read_to_end(&mut json)
        .map_err(|e| AgentError::io("read the helper's job", e))?;
    let job: Job = serde_json::from_slice(&json)
        .map_err(|e| AgentError::InvalidRequest(format!("the helper's job: {e}")))?;
    // SAFETY: the agent put the process's stdio on these descriptors for the helper, and
    // nothing else in the helper uses them.
    let [stdin, stdout, stderr] = STDIO_FDS.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    let id = job.id.as_str();
    let builder = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_root_path(&job.state_root)
        .map_err(AgentError::runtime(id, "prepare"))?
        .with_stdin(stdin)
        .with_stdout(stdout)
        .with_stderr(stderr)
        .with_console_socket(job.console_socket.as_ref());
    match &job.kind {
        JobKind::Create { bundle, no_pivot } => {
            let container = builder
                .validate_id()
                .map_err(AgentError::runtime(id, "create"))?
                .as_init(bundle)
                .with_no_pivot(*no_pivot)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(AgentError::runtime(id, "create"))?;
            Ok(container.pid().map(|p| p.as_raw()).unwrap_or(0))
        }
        JobKind::Exec { process, seccomp } => {
            let builder = match seccomp {
                Some(s) => builder.with_executor(crate::exec_seccomp::Confined(s.as_ref().clone())),
                None => builder,
            };
            let pid = builder
                .as_tenant()
                .with_process(Some(process))
                .with_detach(true)
                .build()
                .map_err(AgentError::runtime(id, "exec"))?;
            Ok(pid.as_raw())
        }
    }
}
