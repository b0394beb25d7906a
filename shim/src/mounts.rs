//! Host side of a container's files: its rootfs and bind-mount volumes, mounted under the
//! sandbox's shared directory (served to the guest by virtio-fs), and taken down again.
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{Mount as OciMount, Spec};

/// Errors from mounting; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot mount the rootfs ({kind} {source_path}) on {target}: {message}")]
    Rootfs {
        kind: String,
        source_path: String,
        target: PathBuf,
        message: String,
    },
    #[error("cannot share volume {source_path} (for {destination}): {message}")]
    Volume {
        source_path: PathBuf,
        destination: PathBuf,
        message: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> MountError + 'a {
    move |source| MountError::Io {
        what,
        path: path.into(),
        source,
    }
}

/// One rootfs mount as containerd hands it over.
#[derive(Debug, Clone)]
pub struct RootfsMount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Mounts the rootfs at `target`: containerd's mounts (the snapshot) when given, else a bind
/// of the bundle's own `rootfs` directory.
pub fn mount_rootfs(
    mounts: &[RootfsMount],
    bundle: &Path,
    target: &Path,
) -> Result<(), MountError> {
    std::fs::create_dir_all(target).map_err(io("create", target))?;
    if mounts.is_empty() {
        let src = bundle.join("rootfs");
        return mount(
            Some(&src),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| MountError::Rootfs {
            kind: "bind".into(),
            source_path: src.display().to_string(),
            target: target.into(),
            message: e.to_string(),
        });
    }
    for m in mounts {
        containerd_shim::mount::mount_rootfs(Some(&m.kind), Some(&m.source), &m.options, target)
            .map_err(|e| MountError::Rootfs {
                kind: m.kind.clone(),
                source_path: m.source.clone(),
                target: target.into(),
                message: e.to_string(),
            })?;
    }
    Ok(())
}

fn is_bind(m: &OciMount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"))
}

/// Binds every host-path volume of `spec` under `host_dir` and points the spec at the guest
/// path of the same place (`guest_dir`). Mounts of kernel file systems stay as they are.
pub fn share_volumes(spec: &mut Spec, host_dir: &Path, guest_dir: &str) -> Result<(), MountError> {
    let Some(mut mounts) = spec.mounts().clone() else {
        return Ok(());
    };
    for (i, m) in mounts.iter_mut().enumerate() {
        let Some(source) = host_volume(m) else {
            continue;
        };
        let fail = |message: String| MountError::Volume {
            source_path: source.clone(),
            destination: m.destination().clone(),
            message,
        };
        let meta = std::fs::metadata(&source).map_err(|e| fail(e.to_string()))?;
        let target = host_dir.join(format!("volume-{i}"));
        if meta.is_dir() {
            std::fs::create_dir_all(&target).map_err(|e| fail(e.to_string()))?;
        } else {
            std::fs::write(&target, b"").map_err(|e| fail(e.to_string()))?;
        }
        let recursive = m
            .options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|o| o == "rbind"));
        let flags = MsFlags::MS_BIND
            | if recursive {
                MsFlags::MS_REC
            } else {
                MsFlags::empty()
            };
        mount(Some(&source), &target, None::<&str>, flags, None::<&str>)
            .map_err(|e| fail(e.to_string()))?;
        m.set_source(Some(PathBuf::from(format!("{guest_dir}/volume-{i}"))));
    }
    spec.set_mounts(Some(mounts));
    Ok(())
}

/// The host path of a volume: a bind mount with an absolute source.
fn host_volume(m: &OciMount) -> Option<PathBuf> {
    m.source()
        .clone()
        .filter(|source| is_bind(m) && source.is_absolute())
}

/// Checks that every volume's host path exists, so that a spec naming a missing one fails
/// before a VM is started for it.
pub fn check_volumes(spec: &Spec) -> Result<(), MountError> {
    for m in spec.mounts().iter().flatten() {
        if let Some(source) = host_volume(m) {
            std::fs::metadata(&source).map_err(|e| MountError::Volume {
                destination: m.destination().clone(),
                message: e.to_string(),
                source_path: source,
            })?;
        }
    }
    Ok(())
}

/// Mount points at or under `dir`, deepest first (from /proc/self/mountinfo).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v as char);
                i += 4;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// Mounts stacked on one point that `remove_tree` detaches before it gives up on the point.
const MAX_STACKED: usize = 64;

/// Levels `remove_tree` walks itself. The shim mounts at most three levels below a sandbox's
/// directory; below this, what is left (a tree the guest made, however deep) goes to std's
/// `remove_dir_all`, which does not follow symlinks either, so a deep tree costs neither
/// stack nor a descriptor per level here.
const MAX_DEPTH: usize = 32;

/// Unmounts everything at or under `dir` and removes it. Safe to call more than once.
///
/// Walks the tree itself, by descriptor: each entry is looked at (statx, not following a
/// symlink) relative to its directory's open descriptor, a mount on it is detached through a
/// path that goes through that descriptor (`/proc/self/fd/N/NAME`), and a directory is
/// opened without following a symlink before it is listed. So the guest, which can change
/// the shared tree while a container's part of it is removed (the VM still runs), cannot
/// turn the walk to anything outside it by swapping a directory for a symlink; and nothing
/// inside a container's rootfs or a volume is removed, since a mount is detached before
/// anything under it is listed. A point that cannot be unmounted is left, with its
/// contents, and the walk goes on with the rest; the first error is returned.
///
/// The cost is the size of the tree, not the host's mount table: this used to read
/// /proc/self/mountinfo, in which every sandbox's mounts appear, and with 2000 other mounts a
/// container's mount and unmount took 15 ms instead of 0.5 (see README, "Start storms").
/// On kernels whose statx does not tell mount roots (before 5.8) the table is read once to
/// know them, and the same walk detaches them.
pub fn remove_tree(dir: &Path) -> Result<(), MountError> {
    let mut walk = Walk {
        listed: (!statx_knows_mount_roots()).then(|| mounts_under(dir).into_iter().collect()),
        first: None,
    };
    // The path to `dir` is the shim's own (above the shared tree), so it is used as given.
    walk.remove_at(rustix::fs::CWD, dir.as_os_str(), dir, dir, 0);
    walk.first.map_or(Ok(()), Err)
}

/// Whether this kernel's statx reports `STATX_ATTR_MOUNT_ROOT` (Linux 5.8 on, for every file
/// system): a property of the kernel, so asked once, of `/`.
fn statx_knows_mount_roots() -> bool {
    use rustix::fs::{statx, AtFlags, StatxAttributes, StatxFlags, CWD};
    static KNOWS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KNOWS.get_or_init(|| {
        statx(CWD, "/", AtFlags::SYMLINK_NOFOLLOW, StatxFlags::TYPE)
            .is_ok_and(|st| st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT))
    })
}

/// One `remove_tree`.
struct Walk {
    /// The mount points the mount table lists, where statx cannot tell them.
    listed: Option<std::collections::HashSet<PathBuf>>,
    /// The first error; later ones are logged.
    first: Option<MountError>,
}

impl Walk {
    fn keep(&mut self, e: MountError) {
        if self.first.is_none() {
            self.first = Some(e);
        } else {
            tracing::warn!("{e}");
        }
    }

    /// Removes entry `name` of directory `parent`, `depth` levels below the walk's top:
    /// first detaches what is mounted on it (through `via`, a path to the same entry), then,
    /// for a directory, each entry in it. `shown` names it. Entries gone meanwhile are fine.
    fn remove_at(
        &mut self,
        parent: std::os::fd::BorrowedFd<'_>,
        name: &std::ffi::OsStr,
        via: &Path,
        shown: &Path,
        depth: usize,
    ) {
        use rustix::fs::{openat, statx, unlinkat, AtFlags, FileType, Mode, OFlags};
        use rustix::fs::{StatxAttributes, StatxFlags};
        use rustix::io::Errno;
        let mut is_dir = None;
        for _ in 0..MAX_STACKED {
            let st = match statx(parent, name, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::TYPE) {
                Ok(st) => st,
                Err(Errno::NOENT) => return,
                Err(e) => return self.keep(io("inspect", shown)(e.into())),
            };
            let here = FileType::from_raw_mode(st.stx_mode.into()) == FileType::Directory;
            let mounted = match &self.listed {
                None => st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT),
                Some(points) => points.contains(shown),
            };
            if !mounted {
                is_dir = Some(here);
                break;
            }
            match umount2(via, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
                Ok(()) => {}
                // Listed, and nothing (more) mounted there: what statx saw is underneath.
                Err(nix::errno::Errno::EINVAL) if self.listed.is_some() => {
                    is_dir = Some(here);
                    break;
                }
                Err(e) => return self.keep(io("unmount", shown)(e.into())),
            }
        }
        let Some(is_dir) = is_dir else {
            let still =
                std::io::Error::other(format!("still mounted after {MAX_STACKED} unmounts"));
            return self.keep(io("unmount", shown)(still));
        };
        let unlink = |flags| match unlinkat(parent, name, flags) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(io("remove", shown)(e.into())),
        };
        if is_dir && depth >= MAX_DEPTH {
            return match std::fs::remove_dir_all(via) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    self.keep(io("remove", shown)(e))
                }
                _ => {}
            };
        }
        if is_dir {
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            match openat(parent, name, flags, Mode::empty()) {
                Ok(fd) => self.empty_dir(&fd, shown, depth),
                Err(Errno::NOENT) => return,
                // Swapped for something else since it was looked at: removed as that.
                Err(Errno::NOTDIR) | Err(Errno::LOOP) => {
                    if let Err(e) = unlink(AtFlags::empty()) {
                        self.keep(e);
                    }
                    return;
                }
                Err(e) => return self.keep(io("open", shown)(e.into())),
            }
        }
        let flags = if is_dir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        if let Err(e) = unlink(flags) {
            self.keep(e);
        }
    }

    /// Removes everything in the open directory `dir` (named `shown`, `depth` levels down).
    fn empty_dir(&mut self, dir: &std::os::fd::OwnedFd, shown: &Path, depth: usize) {
        use std::os::fd::{AsFd, AsRawFd};
        use std::os::unix::ffi::OsStrExt;
        let mut names = Vec::new();
        let listing = match rustix::fs::Dir::read_from(dir) {
            Ok(listing) => listing,
            Err(e) => return self.keep(io("list", shown)(e.into())),
        };
        for entry in listing {
            match entry {
                Ok(entry) => {
                    let name = std::ffi::OsStr::from_bytes(entry.file_name().to_bytes());
                    if name != "." && name != ".." {
                        names.push(name.to_owned());
                    }
                }
                Err(e) => return self.keep(io("list", shown)(e.into())),
            }
        }
        let through = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        for name in names {
            let (via, child) = (through.join(&name), shown.join(&name));
            self.remove_at(dir.as_fd(), &name, &via, &child, depth + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Binds `source` on `target` (a directory or file, made if missing).
    fn bind(source: &Path, target: &Path) {
        if source.is_dir() {
            std::fs::create_dir_all(target).unwrap();
        } else {
            std::fs::write(target, b"").unwrap();
        }
        let flags = MsFlags::MS_BIND;
        mount(Some(source), target, None::<&str>, flags, None::<&str>).unwrap();
    }

    /// Unmounts what is left under a test's directory and removes it, when the test ends
    /// or fails.
    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            for point in mounts_under(&self.0) {
                let _ = umount2(&point, MntFlags::MNT_DETACH);
            }
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Builds a sandbox-like tree with mounts, stacked and file mounts, symlinks out of it
    /// and a deep part, removes it with `remove`, and checks that it is gone and that what
    /// the mounts showed is untouched.
    fn mounted_tree_test(tag: &str, remove: impl Fn(&Path) -> Result<(), MountError>) {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIP: remove_tree test ({tag}) needs root (it mounts)");
            return;
        }
        let base = std::env::temp_dir().join(format!("shoal-rm-{tag}-{}", std::process::id()));
        let _scratch = Scratch(base.clone());
        // What the mounts show: a volume directory with data, a file, another tree.
        let data = base.join("data");
        std::fs::create_dir_all(data.join("keep")).unwrap();
        std::fs::write(data.join("keep/precious"), b"mine").unwrap();
        std::fs::write(data.join("file"), b"also mine").unwrap();
        let tree = base.join("sandbox");
        let c = tree.join("shared/c");
        bind(&data, &c.join("rootfs"));
        // Two mounts stacked on one point, a mount inside a mount, a file volume.
        bind(&data.join("keep"), &c.join("volume-0"));
        bind(&data.join("keep"), &c.join("volume-0"));
        bind(&data.join("keep"), &c.join("rootfs/keep"));
        bind(&data.join("file"), &c.join("volume-1"));
        // Symlinks out of the tree are removed, not followed: one to the data, one to a
        // directory with a mount in it (which stays mounted).
        std::os::unix::fs::symlink(&data, c.join("link")).unwrap();
        let outside = base.join("outside");
        bind(&data.join("keep"), &outside.join("mounted"));
        std::os::unix::fs::symlink(&outside, tree.join("shared/outside")).unwrap();
        std::fs::write(tree.join("vsock.sock"), b"").unwrap();
        // A tree deeper than the walk goes itself, with a symlink out at the bottom.
        let mut deep = tree.join("shared/deep");
        for level in 0..(MAX_DEPTH + 8) {
            deep = deep.join(format!("d{level}"));
        }
        std::fs::create_dir_all(&deep).unwrap();
        std::os::unix::fs::symlink(&data, deep.join("link")).unwrap();
        // The stacked pair is one path.
        assert_eq!(mounts_under(&tree).len(), 4);

        remove(&tree).unwrap();
        assert!(!tree.exists(), "tree left behind");
        assert!(mounts_under(&tree).is_empty(), "{:?}", mounts_under(&tree));
        assert_eq!(std::fs::read(data.join("keep/precious")).unwrap(), b"mine");
        assert_eq!(std::fs::read(data.join("file")).unwrap(), b"also mine");
        assert_eq!(
            mounts_under(&outside).len(),
            1,
            "a mount outside was touched"
        );
        assert!(outside.join("mounted/precious").exists());
        // Again: nothing there is fine.
        remove(&tree).unwrap();
    }

    /// The walk goes by descriptor, so a directory the guest swaps for a symlink while it
    /// runs cannot turn it elsewhere (the next test provokes that race); this one checks
    /// mounts, stacked mounts, file mounts, symlinks out and a deep tree.
    #[test]
    fn a_tree_with_mounts_is_removed_without_touching_what_they_show() {
        mounted_tree_test("statx", remove_tree);
    }

    /// Where statx cannot tell mount roots (kernels before 5.8) the mount table names them;
    /// the same walk, given the table, as `remove_tree` gives it there.
    #[test]
    fn the_walk_given_the_mount_table_removes_the_same_tree() {
        mounted_tree_test("table", |dir| {
            let mut walk = Walk {
                listed: Some(mounts_under(dir).into_iter().collect()),
                first: None,
            };
            walk.remove_at(rustix::fs::CWD, dir.as_os_str(), dir, dir, 0);
            walk.first.map_or(Ok(()), Err)
        });
    }

    /// Provokes the race the walk is built against, as well as a test can: a thread swaps a
    /// directory of the tree for a symlink to a directory outside it holding files of the
    /// same names, and back, while the tree is removed. Whatever the timing, nothing outside
    /// may go. (A walk by path, as this one was at first, loses files here in most runs.)
    #[test]
    fn a_directory_swapped_for_a_symlink_while_removed_is_not_followed() {
        let base = std::env::temp_dir().join(format!("shoal-swap-{}", std::process::id()));
        let _scratch = Scratch(base.clone());
        let outside = base.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        for i in 0..50 {
            std::fs::write(outside.join(format!("g{i}")), b"mine").unwrap();
        }
        for round in 0..100 {
            let tree = base.join(format!("tree-{round}"));
            let x = tree.join("x");
            std::fs::create_dir_all(&x).unwrap();
            for i in 0..50 {
                std::fs::write(x.join(format!("g{i}")), b"").unwrap();
            }
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let swapper = {
                let (stop, outside, moved) = (stop.clone(), outside.clone(), tree.join("moved"));
                let x = x.clone();
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if std::fs::rename(&x, &moved).is_ok() {
                            let _ = std::os::unix::fs::symlink(&outside, &x);
                            std::thread::sleep(std::time::Duration::from_micros(50));
                            let _ = std::fs::remove_file(&x);
                            let _ = std::fs::rename(&moved, &x);
                            std::thread::sleep(std::time::Duration::from_micros(50));
                        }
                    }
                })
            };
            let _ = remove_tree(&tree);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            swapper.join().unwrap();
            let _ = std::fs::remove_dir_all(&tree);
            let left = std::fs::read_dir(&outside).unwrap().count();
            assert_eq!(
                left, 50,
                "round {round}: files outside the tree were removed"
            );
        }
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/end\\"), "/end\\");
    }
}
