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
pub fn remove_tree(dir: &Path) -> Result<(), MountError> {
    for point in mounts_under(dir) {
        if let Err(e) = umount2(&point, MntFlags::MNT_DETACH) {
            tracing::warn!("cannot unmount {}: {e}", point.display());
        }
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(MountError::Io {
            what: "remove",
            path: dir.into(),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/end\\"), "/end\\");
    }
}
