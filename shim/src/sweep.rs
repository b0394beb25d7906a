//! Sandboxes whose shim died, cleaned by a shim that starts later.
//!
//! containerd cleans up after a shim that died by running `containerd-shim-shoal-v2 delete`
//! in the task's bundle, which removes the sandbox's mounts, its pod-network redirects and
//! its cgroup claim. containerd gives that command 5 s and kills it after that (a loaded
//! host, the shim binary read from a slow disk), then forgets the task: what the command
//! had not removed stays, with nothing left that names it. So a starting shim also looks,
//! at most once per `sweep_secs` on the host and off its start's critical path, for
//! sandbox directories whose shim is dead, and cleans each as `delete` would have.
//!
//! Which shim is dead is told by the lock its shim holds on the directory's owner file
//! ([`mounts::Owner`]), never by a pid: the kernel drops a dead process's locks, in
//! whatever pid namespace it ran, and a pid can be reused. A sweep holds the state
//! directory's sweep lock exclusively while it picks dead directories and renames each to a
//! `.dead-` name, which makes it theirs alone; a shim making its sandbox directory holds
//! the same lock shared, so no sweep looks at a directory half made, nor takes one being
//! replaced. The cleaning itself runs after the lock is let go, holding each dead
//! directory's owner file, so that the next sweep takes a `.dead-` directory again only if
//! the sweep cleaning it died too.
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

use crate::mounts::{self, MountError, Owner, Ownership};

/// The state directory's sweep lock, holding the time of the last sweep (seconds of
/// CLOCK_BOOTTIME).
pub const LOCK_FILE: &str = ".sweep";
/// Name prefix of a dead sandbox's directory once a sweep has taken it.
pub const DEAD_PREFIX: &str = ".dead-";

/// A new sandbox directory `state_dir/id`, held by this process ([`Owner`]). A directory of
/// that name that a dead shim left is removed first; one whose shim lives is refused.
pub fn new_sandbox_dir(state_dir: &Path, id: &str) -> Result<(PathBuf, Owner), MountError> {
    mounts::prepare_state_dir(state_dir)?;
    let _making = lock(state_dir, FlockArg::LockShared)?;
    let dir = state_dir.join(id);
    if std::fs::symlink_metadata(&dir).is_ok() {
        // Held (if dead) until cleaned.
        let _left = match Owner::of(&dir)? {
            Ownership::Alive => return Err(MountError::InUse(dir)),
            left => left,
        };
        let _ = clean(&dir);
    }
    match mounts::prepare_sandbox_dir(&dir) {
        Ok(owner) => Ok((dir, owner)),
        Err(e) => {
            let _ = mounts::remove_tree(&dir);
            Err(e)
        }
    }
}

/// Cleans what a dead shim left in its sandbox directory `dir`: the tc redirects to its
/// VM's taps (from the record the shim kept there), then the directory with every mount
/// under it.
pub fn clean(dir: &Path) -> Result<(), MountError> {
    if let Ok(record) = std::fs::read_to_string(dir.join(crate::network::RECORD_FILE)) {
        match crate::network::cleanup(&record) {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                "removed {n} redirects of the dead sandbox {}",
                dir.display()
            ),
            Err(e) => tracing::warn!("cannot clean the dead sandbox's pod network: {e}"),
        }
    }
    mounts::remove_tree(dir)
}

/// If no sweep ran in the last `every` and no other runs now: cleans every sandbox
/// directory in `state_dir` whose shim is dead ([`clean`]) and returns their ids (a
/// directory a sweep took but could not finish shows as `.dead-ID`).
pub fn sweep(state_dir: &Path, every: Duration) -> Result<Vec<String>, MountError> {
    let taken = {
        let Some(mut held) = lock(state_dir, FlockArg::LockExclusiveNonblock)? else {
            return Ok(Vec::new());
        };
        let now = boottime_secs();
        let mut text = String::new();
        let _ = held.read_to_string(&mut text);
        // A time beyond now is from before a reboot: due.
        let due = match text.trim().parse::<u64>() {
            Ok(last) if last <= now => now - last >= every.as_secs(),
            _ => true,
        };
        if !due {
            return Ok(Vec::new());
        }
        let path = state_dir.join(LOCK_FILE);
        let stamp = |f: &mut Flock<File>| -> std::io::Result<()> {
            f.set_len(0)?;
            f.rewind()?;
            f.write_all(now.to_string().as_bytes())
        };
        stamp(&mut held).map_err(|e| MountError::Io {
            what: "write the sweep time to",
            path,
            cause: e,
        })?;
        take_dead(state_dir)?
    };
    let mut cleaned = Vec::new();
    for (id, dir, owner) in taken {
        match clean(&dir) {
            Ok(()) => tracing::info!("sandbox {id}: its shim had died; cleaned what it left"),
            Err(e) => tracing::warn!("sandbox {id}: its shim had died; cleaning failed: {e}"),
        }
        drop(owner);
        cleaned.push(id);
    }
    Ok(cleaned)
}

/// With the sweep lock held: the dead shims' sandbox directories, each renamed to a
/// `.dead-` name and held.
fn take_dead(state_dir: &Path) -> Result<Vec<(String, PathBuf, Owner)>, MountError> {
    let entries = std::fs::read_dir(state_dir).map_err(|e| MountError::Io {
        what: "list",
        path: state_dir.into(),
        cause: e,
    })?;
    let mut taken = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let again = name.strip_prefix(DEAD_PREFIX);
        if (name.starts_with('.') && again.is_none())
            || !entry.file_type().is_ok_and(|t| t.is_dir())
        {
            continue;
        }
        let path = entry.path();
        let owner = match Owner::of(&path) {
            Ok(Ownership::Dead(owner)) => owner,
            Ok(Ownership::Alive | Ownership::Unknown) => continue,
            Err(e) => {
                tracing::warn!("{e}");
                continue;
            }
        };
        let (id, dir) = match again {
            Some(id) => (id.to_string(), path),
            None => {
                let dead = state_dir.join(format!("{DEAD_PREFIX}{name}"));
                if let Err(e) = std::fs::rename(&path, &dead) {
                    tracing::warn!("cannot take the dead sandbox {}: {e}", path.display());
                    continue;
                }
                (name, dead)
            }
        };
        taken.push((id, dir, owner));
    }
    Ok(taken)
}

/// The state directory's sweep lock, taken `how`; `None` only for a non-blocking lock that
/// is held elsewhere.
fn lock(state_dir: &Path, how: FlockArg) -> Result<Option<Flock<File>>, MountError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| MountError::Io {
            what: "open",
            path: path.clone(),
            cause: e,
        })?;
    mounts::try_flock(file, how, &path)
}

fn boottime_secs() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// A state directory under /run for a test, removed (mounts included) when dropped;
    /// `None`, after saying why, when not root.
    struct State(PathBuf);

    impl State {
        fn new(name: &str) -> Option<State> {
            if !nix::unistd::geteuid().is_root() {
                println!("SKIP: the sweep tests mount and need root");
                return None;
            }
            let dir = PathBuf::from(format!("/run/shoal-sweep-{name}-{}", std::process::id()));
            let _ = mounts::remove_tree(&dir);
            Some(State(dir))
        }
    }

    impl Drop for State {
        fn drop(&mut self) {
            let _ = mounts::remove_tree(&self.0);
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != LOCK_FILE)
            .collect();
        n.sort();
        n
    }

    /// A process that holds `dir`'s owner file, as the shim that made it would (flock(1),
    /// a real process for a real death).
    fn holder(dir: &Path) -> std::process::Child {
        let mut child = Command::new("flock")
            .args(["--exclusive", "--no-fork"])
            .arg(dir.join(mounts::OWNER_FILE))
            .args(["sh", "-c", "echo held; exec sleep 600"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("flock(1)");
        let mut line = [0u8; 5];
        child
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut line)
            .unwrap();
        assert_eq!(&line, b"held\n");
        child
    }

    /// The sweep takes exactly the directories whose shim is dead: one held by a live
    /// process stays, and is taken once that process is killed; one with no owner file
    /// (nothing says whether its shim lives) stays; one held by this process stays. What a
    /// dead shim left goes whole, its mounts included.
    #[test]
    fn a_sweep_cleans_the_sandboxes_of_dead_shims_and_only_those() {
        let Some(state) = State::new("dead") else {
            return;
        };
        let s = &state.0;
        let (alive, _mine) = new_sandbox_dir(s, "alive").unwrap();
        let (held, owner) = new_sandbox_dir(s, "held").unwrap();
        drop(owner);
        let mut other = holder(&held);
        let (dead, owner) = new_sandbox_dir(s, "dead").unwrap();
        drop(owner);
        let legacy = s.join("legacy");
        std::fs::create_dir(&legacy).unwrap();
        assert!(
            mounts::mounts_under(&dead).len() >= 3,
            "the sandbox has its mounts"
        );

        let cleaned = sweep(s, Duration::ZERO).unwrap();
        assert_eq!(cleaned, ["dead"]);
        assert_eq!(names(s), ["alive", "held", "legacy"]);
        assert!(mounts::mounts_under(&dead).is_empty());
        assert!(!mounts::mounts_under(&alive).is_empty());

        other.kill().unwrap();
        other.wait().unwrap();
        assert_eq!(sweep(s, Duration::ZERO).unwrap(), ["held"]);
        assert_eq!(names(s), ["alive", "legacy"]);
        assert_eq!(
            mounts::mounts_under(s)
                .iter()
                .filter(|m| m.starts_with(&held))
                .count(),
            0
        );
    }

    /// A sweep is skipped while another sweep or a sandbox directory being made holds the
    /// lock, and within `every` of the last; a directory a sweep took and did not finish
    /// (the sweeper died) is taken again; a live shim's directory is not replaced by a new
    /// one of the same name, a dead one's is.
    #[test]
    fn sweeps_take_turns_and_finish_what_a_dead_sweeper_began() {
        let Some(state) = State::new("turns") else {
            return;
        };
        let s = &state.0;
        let (_, owner) = new_sandbox_dir(s, "a").unwrap();
        drop(owner);
        {
            let _making = lock(s, FlockArg::LockShared).unwrap();
            assert!(sweep(s, Duration::ZERO).unwrap().is_empty());
        }
        assert_eq!(sweep(s, Duration::from_secs(3600)).unwrap(), ["a"]);
        let (_, owner) = new_sandbox_dir(s, "b").unwrap();
        drop(owner);
        assert!(sweep(s, Duration::from_secs(3600)).unwrap().is_empty());

        // As a sweeper that died after taking `b`.
        std::fs::rename(s.join("b"), s.join(".dead-b")).unwrap();
        assert_eq!(sweep(s, Duration::ZERO).unwrap(), ["b"]);
        assert!(names(s).is_empty(), "{:?}", names(s));

        let (_, _live) = new_sandbox_dir(s, "c").unwrap();
        let e = new_sandbox_dir(s, "c").unwrap_err().to_string();
        assert!(e.contains("belongs to a running shim"), "{e}");
        let (_, owner) = new_sandbox_dir(s, "d").unwrap();
        drop(owner);
        let (again, _held) = new_sandbox_dir(s, "d").unwrap();
        assert!(again.join(mounts::OWNER_FILE).exists());
    }
}
