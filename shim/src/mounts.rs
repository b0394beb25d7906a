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

/// Unmounts everything at or under `dir` and removes it. Safe to call more than once.
///
/// Walks the tree itself and asks of each entry (statx) whether it is the root of a mount;
/// a mount is detached before anything under it is listed, so nothing inside a container's
/// rootfs or a volume is ever removed, and a mount that cannot be detached stops the walk
/// there with an error naming it. The cost is the size of the sandbox's own tree. It used
/// to read the host's whole mount table (/proc/self/mountinfo), in which every sandbox's
/// mounts appear: with 2000 other mounts, a container's mount and unmount took 15 ms
/// instead of 0.5 (see README, "Start storms"). Kernels without statx's mount-root flag
/// (before 5.8) still get the mount table read.
pub fn remove_tree(dir: &Path) -> Result<(), MountError> {
    if !statx_knows_mount_roots(dir) {
        for point in mounts_under(dir) {
            umount2(&point, MntFlags::MNT_DETACH).map_err(|e| MountError::Io {
                what: "unmount",
                path: point.clone(),
                source: e.into(),
            })?;
        }
    }
    remove_entry(dir)
}

/// Whether statx reports `STATX_ATTR_MOUNT_ROOT` here (a missing `dir` counts as yes: there
/// is nothing to unmount).
fn statx_knows_mount_roots(dir: &Path) -> bool {
    use rustix::fs::{statx, AtFlags, StatxAttributes, StatxFlags, CWD};
    match statx(CWD, dir, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::TYPE) {
        Ok(st) => st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT),
        Err(e) => e == rustix::io::Errno::NOENT,
    }
}

/// Removes `path` (not following symlinks), first detaching what is mounted on it, then,
/// for a directory, each entry in it. Entries gone meanwhile are fine.
fn remove_entry(path: &Path) -> Result<(), MountError> {
    use rustix::fs::{statx, AtFlags, FileType, StatxAttributes, StatxFlags, CWD};
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    // Mounts can be stacked on one point: detach until none is left.
    let is_dir = loop {
        let st = match statx(CWD, path, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::TYPE) {
            Ok(st) => st,
            Err(e) if e == rustix::io::Errno::NOENT => return Ok(()),
            Err(e) => return Err(io("inspect", path)(e.into())),
        };
        if !st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT) {
            break FileType::from_raw_mode(st.stx_mode.into()) == FileType::Directory;
        }
        umount2(path, MntFlags::MNT_DETACH).map_err(|e| io("unmount", path)(e.into()))?;
    };
    if !is_dir {
        return match std::fs::remove_file(path) {
            Err(e) if !gone(&e) => Err(io("remove", path)(e)),
            _ => Ok(()),
        };
    }
    let entries = match std::fs::read_dir(path) {
        Err(e) if gone(&e) => return Ok(()),
        other => other.map_err(io("list", path))?,
    };
    for entry in entries {
        remove_entry(&entry.map_err(io("list", path))?.path())?;
    }
    match std::fs::remove_dir(path) {
        Err(e) if !gone(&e) => Err(io("remove", path)(e)),
        _ => Ok(()),
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

    #[test]
    fn a_tree_with_mounts_is_removed_without_touching_what_they_show() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIP: remove_tree test needs root (it mounts)");
            return;
        }
        let base = std::env::temp_dir().join(format!("shoal-remove-tree-{}", std::process::id()));
        let _ = remove_tree(&base);
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
        // A symlink out of the tree is removed, not followed.
        std::os::unix::fs::symlink(&data, c.join("link")).unwrap();
        std::fs::write(tree.join("vsock.sock"), b"").unwrap();
        // The stacked pair is one path.
        assert_eq!(mounts_under(&tree).len(), 4);

        remove_tree(&tree).unwrap();
        assert!(!tree.exists(), "tree left behind");
        assert!(mounts_under(&tree).is_empty(), "{:?}", mounts_under(&tree));
        assert_eq!(std::fs::read(data.join("keep/precious")).unwrap(), b"mine");
        assert_eq!(std::fs::read(data.join("file")).unwrap(), b"also mine");
        // Again: nothing there is fine.
        remove_tree(&tree).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/end\\"), "/end\\");
    }
}
