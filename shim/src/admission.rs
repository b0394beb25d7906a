//! Admission: whether the host has the memory for one more sandbox start.
//!
//! A starting sandbox takes its memory over the first second or so (shim, VMM, the guest's
//! first pages), so under a storm the starts that check `MemAvailable` at the same moment
//! all see the memory none of them has taken yet, and all pass. Each start therefore holds
//! a *ticket* from admission until its agent answers (by then its memory shows in
//! `MemAvailable`), and admission counts the memory of the tickets held by other live
//! processes as already gone. Tickets are files `.starting-PID-N` in a directory shared by
//! every shim (the cgroup pool's state directory); counting and taking one hold a `flock`
//! for a directory listing and a file creation, so admissions of concurrent starts are
//! ordered and none is decided on a count that is already stale.
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::host_cgroups::{lock_file, pid_file, sweep_pid_files};

/// Host memory an idle sandbox takes once started (shim, VMM, the guest's touched RAM; about
/// 31 MiB measured by `benches/density.rs`), rounded up: what admission asks to be free for
/// each start in flight.
pub const STARTUP_MIB: u64 = 64;

const TICKET: &str = ".starting-";

/// Why a start was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("host memory is low: {available} MiB available, and a sandbox needs {STARTUP_MIB} MiB to start above the {reserve} MiB kept free (host_reserve_mib in the shoal config){}", in_flight_note(*.starting))]
    HostMemory {
        available: u64,
        reserve: u64,
        /// Other starts in flight, each counted as taking `STARTUP_MIB`.
        starting: u64,
    },
    #[error("cannot use the admission directory {path}: {cause}")]
    State {
        path: PathBuf,
        cause: std::io::Error,
    },
}

fn in_flight_note(starting: u64) -> String {
    match starting {
        0 => String::new(),
        n => format!(
            ", counting {} MiB for {n} other sandbox starts in flight",
            n * STARTUP_MIB
        ),
    }
}

/// A start's hold on `STARTUP_MIB` of host memory; dropping it (the agent answered, or the
/// start failed) gives it back.
#[derive(Debug)]
pub struct Ticket {
    path: PathBuf,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Admits one start when the host's MemAvailable (`available_mib`, read once the other
/// admissions are done, so a start that finished meanwhile has its memory counted), less
/// `STARTUP_MIB` for each start other live processes hold a ticket for, leaves
/// `STARTUP_MIB` above `reserve_mib`. Where MemAvailable cannot be read the start is
/// admitted. Tickets of processes that died are removed on the way.
pub fn admit(
    dir: &Path,
    reserve_mib: u64,
    available_mib: impl FnOnce() -> Option<u64>,
) -> Result<Ticket, AdmissionError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AdmissionError::State {
            path,
            cause: source,
        }
    };
    std::fs::create_dir_all(dir).map_err(err(dir))?;
    let lock_path = dir.join(".admission.lock");
    let _lock = lock_file(&lock_path).map_err(err(&lock_path))?;
    let starting = sweep_pid_files(dir, TICKET).map_err(err(dir))?;
    if let Some(available) = available_mib() {
        if available < reserve_mib + STARTUP_MIB * (starting + 1) {
            return Err(AdmissionError::HostMemory {
                available,
                reserve: reserve_mib,
                starting,
            });
        }
    }
    let path = pid_file(dir, TICKET);
    File::create(&path).map_err(err(&path))?;
    Ok(Ticket { path })
}

/// The host's MemAvailable in MiB (None where /proc/meminfo lacks it).
pub fn host_available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib >> 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("shoal-admission-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    // MemAvailable is given, not read: a host that runs short of memory at a chosen moment
    // cannot be provoked in a test; the tickets, the lock and the pid checks are real.
    #[test]
    fn starts_in_flight_count_against_the_memory_left() {
        let dir = scratch("flight");
        // Room for three starts above a 100 MiB reserve.
        let available = 100 + 3 * STARTUP_MIB;
        let held: Vec<Ticket> = (0..3)
            .map(|_| admit(&dir, 100, || Some(available)).expect("fits"))
            .collect();
        let e = admit(&dir, 100, || Some(available)).unwrap_err();
        assert!(
            matches!(e, AdmissionError::HostMemory { starting: 3, .. }),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.starts_with("host memory is low: 292 MiB available")
                && msg.contains("192 MiB for 3 other sandbox starts in flight"),
            "{msg}"
        );
        // One start reaches its agent: its ticket goes, and the next start fits.
        drop(held);
        let again = admit(&dir, 100, || Some(available)).expect("fits once the others are done");
        drop(again);
        let left = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(TICKET))
            .count();
        assert_eq!(left, 0, "tickets left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn concurrent_starts_are_admitted_only_as_far_as_memory_goes() {
        let dir = scratch("storm");
        let available = 100 + 4 * STARTUP_MIB;
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..10)
                .map(|_| s.spawn(|| admit(&dir, 100, || Some(available))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let admitted = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(admitted, 4, "{results:?}");
        for r in &results {
            if let Err(e) = r {
                assert!(
                    matches!(e, AdmissionError::HostMemory { starting: 4, .. }),
                    "{e}"
                );
            }
        }
        drop(results);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tickets_of_dead_processes_are_not_counted() {
        let dir = scratch("dead");
        std::fs::create_dir_all(&dir).unwrap();
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let pid = dead.id();
        dead.wait().unwrap();
        let stale = dir.join(format!("{TICKET}{pid}-0"));
        std::fs::write(&stale, "").unwrap();
        let t = admit(&dir, 100, || Some(100 + STARTUP_MIB)).expect("a dead shim's ticket counted");
        assert!(!stale.exists(), "the dead shim's ticket was kept");
        drop(t);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
