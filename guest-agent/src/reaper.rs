//! Child reaping. The agent is PID 1 in the guest (and a child subreaper on a host), so
//! every container process ends up as its child. One thread waits for SIGCHLD and reaps;
//! processes the agent tracks get their exit status through a watch channel.
//!
//! Some children are waited for by pid by whoever started them: the helper that makes a
//! container's process ([`crate::spawn`]) and libcontainer's hook processes. Reaping those
//! first would break their waits. Container operations therefore hold the *fork lock*, and
//! the reaper only reaps while holding it too.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::watch;

/// Exit status as runc reports it: the code, or 128 + signal.
pub type ExitStatus = u32;

#[derive(Default)]
struct Table {
    waiting: HashMap<i32, watch::Sender<Option<ExitStatus>>>,
    /// Exits of pids nobody registered yet (the process may exit before we learn its pid).
    early: HashMap<i32, ExitStatus>,
}

/// The reaper shared by the agent's parts.
#[derive(Clone, Default)]
pub struct Reaper {
    fork_lock: Arc<Mutex<()>>,
    table: Arc<Mutex<Table>>,
}

impl Reaper {
    /// Starts the reaping thread.
    pub fn start() -> std::io::Result<Reaper> {
        let reaper = Reaper::default();
        let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGCHLD])?;
        let r = reaper.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                // Reap once at start for children that exited before the handler existed.
                r.reap_all();
                for _ in signals.forever() {
                    r.reap_all();
                }
            })?;
        Ok(reaper)
    }

    /// Held while libcontainer creates processes (see the module comment).
    pub fn fork_lock(&self) -> MutexGuard<'_, ()> {
        self.fork_lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `pid`; the receiver sees `Some(status)` once it has exited.
    pub fn watch(&self, pid: i32) -> watch::Receiver<Option<ExitStatus>> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let (tx, rx) = watch::channel(None);
        if let Some(status) = table.early.remove(&pid) {
            let _ = tx.send(Some(status));
        } else {
            table.waiting.insert(pid, tx);
        }
        rx
    }

    fn reap_all(&self) {
        let _fork = self.fork_lock();
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, code as u32),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, 128 + sig as u32),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("waitpid failed: {e}");
                    return;
                }
            };
            let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            match table.waiting.remove(&pid.as_raw()) {
                Some(tx) => {
                    let _ = tx.send(Some(status));
                }
                None => {
                    // Bounded: forget the oldest-looking entries if unclaimed exits pile up.
                    if table.early.len() > 4096 {
                        table.early.clear();
                    }
                    table.early.insert(pid.as_raw(), status);
                }
            }
        }
    }
}
