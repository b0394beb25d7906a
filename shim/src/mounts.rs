//! Host side of a container's files: its rootfs and bind-mount volumes, put where the guest
//! sees them through virtio-fs, and taken down again.
//!
//! The guest may be hostile and can write to whatever it is served at any moment, so the host
//! never builds in, or follows a path through, a tree the guest can change. A sandbox
//! directory ([`prepare_sandbox_dir`]) holds `private/`, where the host makes each
//! container's directory and mount points and mounts each rootfs and volume first, and
//! `fs-root/share/` ([`SHARED_DIR`]), the tree served to the guest: a bind of `private/` that is read-only,
//! `nosuid`, `nodev` and `noexec` on the host. A finished mount gets `nosuid` and `nodev`
//! (and `rdonly` for a read-only rootfs or `ro` volume), on it and every mount under it,
//! before it is moved into the share ([`ContainerFiles`]); the guest writes only inside
//! such mounts. Creation goes by descriptor (`openat2` with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS`, `mkdirat`, `O_NOFOLLOW | O_EXCL`), and removal too ([`remove_tree`]).
use std::os::fd::AsFd;
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
    #[error("container id {0:?} cannot name a directory (it must be one path component)")]
    BadId(String),
    #[error("sandbox directory {0} belongs to a running shim")]
    InUse(PathBuf),
    #[error("{what} {path}: {cause}")]
    Io {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> MountError + 'a {
    move |source| MountError::Io {
        what,
        path: path.into(),
        cause: source,
    }
}

/// One rootfs mount as containerd hands it over.
#[derive(Debug, Clone)]
pub struct RootfsMount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Where the host builds a sandbox's container files (a directory the guest never sees).
pub const PRIVATE_DIR: &str = "private";
/// The root the VMM's virtio-fs worker `chroot`s to: read-only, holding only [`SHARED_DIR`]
/// and `proc/self/fd` (a bind of this process's `/proc/self/fd`, which the passthrough
/// names for xattr calls).
pub const FS_ROOT_DIR: &str = "fs-root";
/// What the guest is served over virtio-fs: a read-only bind of [`PRIVATE_DIR`].
pub const SHARED_DIR: &str = "fs-root/share";

/// Prepares the state directory that holds the sandbox directories: root-only (made 0700,
/// or made so again), and a private mount, bound onto itself the first time, so that no
/// sandbox's mounts propagate anywhere else on the host (the host's `/run` is usually a
/// shared mount, with copies in other mount namespaces) and mounts can be moved within it.
/// Taken under a lock, as shims start together; cheap once done.
pub fn prepare_state_dir(state_dir: &Path) -> Result<(), MountError> {
    use rustix::fs::{Mode, OFlags};
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(state_dir)
        .map_err(io("create", state_dir))?;
    // One descriptor, opened without following a symlink, for the mode, the chmod and the
    // lock (the directory's own: the bind shows the same inode, so it holds across it).
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::open(state_dir, flags, Mode::empty())
        .map_err(|e| io("open", state_dir)(e.into()))?;
    let mode = rustix::fs::fstat(&fd)
        .map_err(|e| io("inspect", state_dir)(e.into()))?
        .st_mode;
    if mode & 0o077 != 0 {
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700))
            .map_err(|e| io("make root-only", state_dir)(e.into()))?;
    }
    let _held =
        nix::fcntl::Flock::lock(std::fs::File::from(fd), nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io("lock", state_dir)(e.into()))?;
    let none = None::<&str>;
    let fail = |what: &'static str| {
        move |e: nix::Error| MountError::Io {
            what,
            path: state_dir.into(),
            cause: e.into(),
        }
    };
    if !is_mount_root(state_dir)? {
        mount(Some(state_dir), state_dir, none, MsFlags::MS_BIND, none).map_err(fail("bind"))?;
    }
    mount(none, state_dir, none, MsFlags::MS_PRIVATE, none).map_err(fail("make private"))
}

/// Whether something is mounted on `path` itself.
fn is_mount_root(path: &Path) -> Result<bool, MountError> {
    use rustix::fs::{statx, AtFlags, StatxAttributes, StatxFlags, CWD};
    if !statx_knows_mount_roots() {
        return Ok(mounts_under(path).first().is_some_and(|p| p == path));
    }
    let st = statx(CWD, path, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::TYPE)
        .map_err(|e| io("inspect", path)(e.into()))?;
    Ok(st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT))
}

/// Creates the sandbox directory `dir` (mode 0700) in a state directory prepared by
/// [`prepare_state_dir`], with the layout that keeps the guest from ever choosing a path
/// the host follows:
///
/// - `dir/private` is where the host creates each container's directory, its mount points
///   and volume placeholders, and where it mounts each rootfs and volume first (the stage);
/// - `dir/fs-root/share` ([`SHARED_DIR`], "the share"), which the VM's virtio-fs server
///   serves, is a bind of `private` made
///   read-only, `nosuid`, `nodev` and `noexec` on the host. The guest can read the tree
///   but cannot create, rename, replace or remove any entry of it; it writes only inside
///   the rootfs and volume mounts the host moves onto it, which are themselves `nosuid`
///   and `nodev` on the host (and read-only where the spec says so);
/// - `dir/fs-root` ([`FS_ROOT_DIR`]), a read-only bind of itself, holds the share and
///   `proc/self/fd` (a read-only bind of this process's): the virtio-fs worker's root, in
///   which nothing else of the host has a name (but through this process's descriptors).
///
/// `dir` must not exist (the caller removes what a dead shim left). The directory is this
/// process's from its first moment: the returned [`Owner`] holds it (and must be kept for
/// the sandbox's life), so a sweep for dead shims' directories passes it by.
pub fn prepare_sandbox_dir(dir: &Path) -> Result<Owner, MountError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(io("create", dir))?;
    let owner = Owner::take(dir)?;
    let private = dir.join(PRIVATE_DIR);
    let root = dir.join(FS_ROOT_DIR);
    let shared = dir.join(SHARED_DIR);
    let fd_dir = root.join("proc/self/fd");
    for d in [
        &private,
        &root,
        &shared,
        &root.join("proc"),
        &root.join("proc/self"),
        &fd_dir,
    ] {
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(d)
            .map_err(io("create", d))?;
    }
    let fail = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |e: nix::Error| MountError::Io {
            what,
            path,
            cause: e.into(),
        }
    };
    let none = None::<&str>;
    let read_only = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    // The root first (mounts on its directories then sit on the read-only bind), then the
    // share and the descriptor directory. By path: `dir` was made just now, root-only in a
    // root-only state directory, and no VM serves any of it yet; the guest only ever sees
    // the share, read-only, never `fs-root` itself.
    let binds = [
        (root.as_path(), root.as_path()),
        (private.as_path(), shared.as_path()),
        (Path::new("/proc/self/fd"), fd_dir.as_path()),
    ];
    for (source, target) in binds {
        mount(Some(source), target, none, MsFlags::MS_BIND, none).map_err(fail("bind", target))?;
        mount(none, target, none, MsFlags::MS_PRIVATE, none)
            .map_err(fail("make private", target))?;
        mount(none, target, none, read_only, none).map_err(fail("make read-only", target))?;
    }
    Ok(owner)
}

/// The file in a sandbox directory on which its shim holds an exclusive `flock` for the
/// sandbox's whole life ([`Owner`]). The kernel drops the lock when the shim dies, however
/// it dies and in whatever pid namespace it ran, so an owner file nobody holds marks a
/// dead shim's directory, with no pid that could have been reused.
pub const OWNER_FILE: &str = "owner";

/// A hold on a sandbox directory: the lock on its [`OWNER_FILE`], taken by the shim that
/// made the directory, or by a sweep that found the file unheld (its shim is dead) and
/// now cleans the directory alone.
#[derive(Debug)]
pub struct Owner(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

impl Owner {
    /// Makes `dir`'s owner file and holds it. The file is made and locked under another
    /// name and then renamed into place, so no sweep can meet it unheld.
    fn take(dir: &Path) -> Result<Owner, MountError> {
        use std::os::unix::fs::OpenOptionsExt;
        let fresh = dir.join(".owner.new");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&fresh)
            .map_err(io("create", &fresh))?;
        let held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| io("lock", &fresh)(e.into()))?;
        let owner = dir.join(OWNER_FILE);
        std::fs::rename(&fresh, &owner).map_err(io("rename into place", &owner))?;
        Ok(Owner(held))
    }

    /// Whose `dir` is: its shim's while that shim lives, or nobody's (then held by the
    /// caller from now on), or unknown without an owner file (made by a shim from before
    /// owner files, or one that died before making it).
    pub fn of(dir: &Path) -> Result<Ownership, MountError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(OWNER_FILE);
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ownership::Unknown),
            Err(e) => return Err(io("open", &path)(e)),
        };
        Ok(
            match try_flock(file, nix::fcntl::FlockArg::LockExclusiveNonblock, &path)? {
                Some(held) => Ownership::Dead(Owner(held)),
                None => Ownership::Alive,
            },
        )
    }
}

/// What [`Owner::of`] found of a sandbox directory.
#[derive(Debug)]
pub enum Ownership {
    /// Its shim holds it.
    Alive,
    /// Its shim is dead; the caller holds it now.
    Dead(Owner),
    /// It has no owner file: nothing tells whether its shim lives.
    Unknown,
}

/// `flock(file, how)`, or `None` if a non-blocking lock is held elsewhere; `path` names
/// the file in an error.
pub(crate) fn try_flock(
    file: std::fs::File,
    how: nix::fcntl::FlockArg,
    path: &Path,
) -> Result<Option<nix::fcntl::Flock<std::fs::File>>, MountError> {
    match nix::fcntl::Flock::lock(file, how) {
        Ok(held) => Ok(Some(held)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(io("lock", path)(e.into())),
    }
}

/// A container's files in a sandbox prepared by [`prepare_sandbox_dir`]: built under
/// `private/<id>`, seen by the guest (and mounted) under `shared/<id>`.
pub struct ContainerFiles {
    /// `private/<id>`, opened without following symlinks.
    private: std::os::fd::OwnedFd,
    private_path: PathBuf,
    /// `shared/<id>` (an `O_PATH` descriptor): where the mounts go.
    shared: std::os::fd::OwnedFd,
}

/// Opens `name` under `dir` (an open directory) as a directory, following no symlink on
/// the way (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`).
fn open_dir_beneath(
    dir: std::os::fd::BorrowedFd<'_>,
    name: &str,
    path_flag: bool,
    shown: &Path,
) -> Result<std::os::fd::OwnedFd, MountError> {
    use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
    let flags = OFlags::DIRECTORY
        | OFlags::NOFOLLOW
        | OFlags::CLOEXEC
        | if path_flag {
            OFlags::PATH
        } else {
            OFlags::RDONLY
        };
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    openat2(dir, name, flags, Mode::empty(), resolve).map_err(|e| io("open", shown)(e.into()))
}

/// Checks that a container id is one plain path component.
fn check_id(id: &str) -> Result<(), MountError> {
    if id.is_empty() || id == "." || id == ".." || id.contains('/') || id.contains('\0') {
        return Err(MountError::BadId(id.into()));
    }
    Ok(())
}

impl ContainerFiles {
    /// Creates container `id`'s directory in sandbox directory `dir`.
    pub fn create(dir: &Path, id: &str) -> Result<ContainerFiles, MountError> {
        use rustix::fs::{mkdirat, openat, Mode, OFlags, CWD};
        check_id(id)?;
        // The sandbox directory's own path is the shim's (state_dir and sandbox id), above
        // anything the guest is served; below it nothing is followed.
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let top = openat(CWD, dir, flags, Mode::empty()).map_err(|e| io("open", dir)(e.into()))?;
        let private_top = open_dir_beneath(top.as_fd(), PRIVATE_DIR, false, dir)?;
        let private_path = dir.join(PRIVATE_DIR).join(id);
        mkdirat(&private_top, id, Mode::from_raw_mode(0o755))
            .map_err(|e| io("create", &private_path)(e.into()))?;
        let private = open_dir_beneath(private_top.as_fd(), id, false, &private_path)?;
        let shared_path = dir.join(SHARED_DIR).join(id);
        let shared_top = open_dir_beneath(top.as_fd(), SHARED_DIR, true, dir)?;
        let shared = open_dir_beneath(shared_top.as_fd(), id, true, &shared_path)?;
        Ok(ContainerFiles {
            private,
            private_path,
            shared,
        })
    }

    /// Mounts the rootfs: containerd's mounts (the snapshot) when given, else a bind of the
    /// bundle's own `rootfs` directory. A read-only rootfs is made read-only on the host by
    /// [`seal_rootfs`](Self::seal_rootfs) once the container exists: until then the guest
    /// makes the mount points the image lacks.
    pub fn mount_rootfs(&self, mounts: &[RootfsMount], bundle: &Path) -> Result<(), MountError> {
        let stage = self.private_path.join("rootfs");
        self.make_point("rootfs", true)?;
        let result = if mounts.is_empty() {
            let src = bundle.join("rootfs");
            mount(
                Some(&src),
                &stage,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| MountError::Rootfs {
                kind: "bind".into(),
                source_path: src.display().to_string(),
                target: stage.clone(),
                message: e.to_string(),
            })
        } else {
            mounts.iter().try_for_each(|m| {
                containerd_shim::mount::mount_rootfs(
                    Some(&m.kind),
                    Some(&m.source),
                    &m.options,
                    &stage,
                )
                .map_err(|e| MountError::Rootfs {
                    kind: m.kind.clone(),
                    source_path: m.source.clone(),
                    target: stage.clone(),
                    message: e.to_string(),
                })
            })
        };
        result?;
        self.publish("rootfs", false)
    }

    /// Makes the published rootfs, and every mount under it, read-only on the host. Fails
    /// (`EBUSY`) while a file in it is open for writing: a container whose guest holds one
    /// does not start, rather than keep a writable rootfs.
    pub fn seal_rootfs(&self) -> Result<(), MountError> {
        let shown = self.private_path.join("rootfs");
        let root = open_dir_beneath(self.shared.as_fd(), "rootfs", true, &shown)?;
        set_mount_attributes(&root, MOUNT_ATTR_RDONLY, false).map_err(io("make read-only", &shown))
    }

    /// Binds every host-path volume of `spec` beside the rootfs (`volume-N`) and points the
    /// spec at the guest path of the same place (under `guest_dir`). A volume with the `ro`
    /// option is read-only on the host too. Mounts of kernel file systems stay as they are.
    pub fn share_volumes(&self, spec: &mut Spec, guest_dir: &str) -> Result<(), MountError> {
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
            let name = format!("volume-{i}");
            self.make_point(&name, meta.is_dir())
                .map_err(|e| fail(e.to_string()))?;
            let options = m.options().clone().unwrap_or_default();
            let flags = MsFlags::MS_BIND
                | if options.iter().any(|o| o == "rbind") {
                    MsFlags::MS_REC
                } else {
                    MsFlags::empty()
                };
            let stage = self.private_path.join(&name);
            mount(Some(&source), &stage, None::<&str>, flags, None::<&str>)
                .map_err(|e| fail(e.to_string()))?;
            let read_only = options.iter().any(|o| o == "ro");
            self.publish(&name, read_only)
                .map_err(|e| fail(e.to_string()))?;
            m.set_source(Some(PathBuf::from(format!("{guest_dir}/{name}"))));
        }
        spec.set_mounts(Some(mounts));
        Ok(())
    }

    /// Creates the mount point `name` (a directory, or an empty file) in the private tree.
    fn make_point(&self, name: &str, dir: bool) -> Result<(), MountError> {
        use rustix::fs::{mkdirat, openat, Mode, OFlags};
        let shown = self.private_path.join(name);
        let made = if dir {
            mkdirat(&self.private, name, Mode::from_raw_mode(0o755))
        } else {
            let flags = OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            openat(&self.private, name, flags, Mode::from_raw_mode(0o600)).map(drop)
        };
        made.map_err(|e| io("create", &shown)(e.into()))
    }

    /// Sets `nosuid` and `nodev` (and `rdonly` when `read_only`) on the staged mount
    /// `private/<id>/<name>` and everything mounted under it, then moves it to the same
    /// place under `shared/<id>`, where the guest sees it. The guest never sees the mount
    /// before its flags are set.
    fn publish(&self, name: &str, read_only: bool) -> Result<(), MountError> {
        use rustix::mount::{move_mount, open_tree, MoveMountFlags, OpenTreeFlags};
        let shown = self.private_path.join(name);
        let tree = open_tree(&self.private, name, OpenTreeFlags::OPEN_TREE_CLOEXEC)
            .map_err(|e| io("open the mount", &shown)(e.into()))?;
        let mut set = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
        if read_only {
            set |= MOUNT_ATTR_RDONLY;
        }
        set_mount_attributes(&tree, set, true).map_err(io("set nosuid, nodev on", &shown))?;
        move_mount(
            &tree,
            "",
            &self.shared,
            name,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(|e| io("move the mount into the share", &shown)(e.into()))
    }
}

/// mount_setattr(2) attributes (linux/mount.h).
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Sets `attributes` on the mount `tree` refers to and on every mount under it; with
/// `private`, also makes them private mounts. A bind of a shared mount (a volume under a
/// host directory mounted shared) would otherwise stay in its peer group, and mounts the
/// host makes later under the source would appear in the share without these flags.
fn set_mount_attributes(
    tree: &std::os::fd::OwnedFd,
    attributes: u64,
    private: bool,
) -> Result<(), std::io::Error> {
    use std::os::fd::AsRawFd;
    let attr = MountAttr {
        attr_set: attributes,
        attr_clr: 0,
        propagation: if private { libc::MS_PRIVATE } else { 0 },
        userns_fd: 0,
    };
    // SAFETY: mount_setattr reads `size_of::<MountAttr>()` bytes at `&attr`, a live
    // `repr(C)` struct laid out as the kernel's `struct mount_attr` (version 0, 32 bytes);
    // the path is a NUL-terminated empty string and `tree` an open descriptor.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    match rc {
        0 => Ok(()),
        _ => {
            let e = std::io::Error::last_os_error();
            Err(match e.raw_os_error() {
                Some(libc::ENOSYS) => std::io::Error::other(
                    "this kernel has no mount_setattr: shoal needs Linux 5.12 or later",
                ),
                _ => e,
            })
        }
    }
}

/// Takes container `id`'s files out of sandbox directory `dir`: detaches what is mounted
/// under `shared/<id>` (where the guest sees it) and removes `private/<id>`, mounts left
/// there by a failed start included. Safe to call more than once.
pub fn remove_container(dir: &Path, id: &str) -> Result<(), MountError> {
    check_id(id)?;
    let shared = dir.join(SHARED_DIR).join(id);
    let mut walk = Walk {
        listed: (!statx_knows_mount_roots()).then(|| mounts_under(&shared).into_iter().collect()),
        first: None,
        unlink: false,
    };
    walk.remove_at(rustix::fs::CWD, shared.as_os_str(), &shared, &shared, 0);
    let detached = walk.first.map_or(Ok(()), Err);
    let removed = remove_tree(&dir.join(PRIVATE_DIR).join(id));
    detached.and(removed)
}

fn is_bind(m: &OciMount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"))
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
/// container's mount and unmount took 15 ms instead of 0.5 (see docs/benchmarks.md, "Start storms").
/// On kernels whose statx does not tell mount roots (before 5.8) the table is read once to
/// know them, and the same walk detaches them.
pub fn remove_tree(dir: &Path) -> Result<(), MountError> {
    // A mount on one name of a directory holds its other names busy (a sandbox's share is
    // a bind of its private tree, so a container's rootfs mounted in the share pins the
    // private directory under it until the share is detached). Whatever the order the walk
    // meets them in, a second walk, after the first has detached every mount, removes what
    // the first could not.
    match remove_tree_once(dir) {
        Err(_) if std::fs::symlink_metadata(dir).is_ok() => remove_tree_once(dir),
        done => done,
    }
}

fn remove_tree_once(dir: &Path) -> Result<(), MountError> {
    let mut walk = Walk {
        listed: (!statx_knows_mount_roots()).then(|| mounts_under(dir).into_iter().collect()),
        first: None,
        unlink: true,
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
    /// Whether entries are removed, or only the mounts on them detached (a read-only view).
    unlink: bool,
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
        if !self.unlink {
            // Detaching only (a container's read-only view in the share): the shim's mounts
            // are the entries of the top directory; nothing of its own is deeper.
            if is_dir && depth == 0 {
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                match openat(parent, name, flags, Mode::empty()) {
                    Ok(fd) => self.empty_dir(&fd, shown, depth),
                    Err(Errno::NOENT) => {}
                    Err(e) => self.keep(io("open", shown)(e.into())),
                }
            }
            return;
        }
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
    /// The mounts of a sandbox directory with no container: its fs root, the share and the
    /// descriptor directory (sorted).
    fn sandbox_mounts(dir: &Path) -> Vec<PathBuf> {
        let root = dir.join(FS_ROOT_DIR);
        sorted(vec![root.join("proc/self/fd"), dir.join(SHARED_DIR), root])
    }

    fn sorted(mut paths: Vec<PathBuf>) -> Vec<PathBuf> {
        paths.sort();
        paths
    }

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
    impl Scratch {
        /// The scratch directory `shoal-NAME-PID` under the temporary directory for a test
        /// that mounts, or `None` (saying so, as a SKIP line naming `what`) when not root.
        fn for_root_test(name: &str, what: &str) -> Option<Scratch> {
            if !nix::unistd::geteuid().is_root() {
                println!("SKIP: {what} needs root (it mounts)");
                return None;
            }
            let dir = std::env::temp_dir().join(format!("shoal-{name}-{}", std::process::id()));
            Some(Scratch(dir))
        }
    }
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
        let Some(scratch) =
            Scratch::for_root_test(&format!("rm-{tag}"), &format!("remove_tree test ({tag})"))
        else {
            return;
        };
        let base = scratch.0.clone();
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
                unlink: true,
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

    /// A volume spec entry: `source` bound at `destination` with `options`.
    fn volume(source: &Path, destination: &str, options: &[&str]) -> OciMount {
        let mut m = OciMount::default();
        m.set_destination(destination.into());
        m.set_source(Some(source.into()));
        m.set_typ(Some("bind".into()));
        m.set_options(Some(options.iter().map(|o| o.to_string()).collect()));
        m
    }

    /// Whether `err` is "read-only file system" (or "busy": a mount point on a read-only
    /// tree may answer either to a rename).
    fn refused(err: std::io::Error) -> bool {
        matches!(err.raw_os_error(), Some(libc::EROFS) | Some(libc::EBUSY))
    }

    /// Runs `path` (a copy of `id`) as user nobody and returns the effective uid it prints.
    fn euid_of(path: &Path) -> String {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(path)
            .arg("-u")
            .output()
            .expect("setpriv (util-linux)");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// What the guest meets through virtio-fs, checked on the host path the server serves:
    /// it cannot add, rename or replace any entry of the share or of a container's
    /// directory, it writes in the rootfs and read-write volumes, a read-only volume is
    /// read-only on the host, and a setuid-root file it makes does not run as root on the
    /// host. The last is shown against a plain bind of the same tree (what the shim used
    /// to make), where the same file does run as root.
    /// The virtio-fs worker's root, as a worker turned by a path bug would meet it: it holds
    /// the share and this process's descriptor directory and nothing else, and no entry of
    /// it can be made, swapped or removed (no `proc/self/fd` of the worker's own making,
    /// no symlink out). The same calls in the sandbox directory beside it succeed.
    #[test]
    fn the_fs_root_holds_only_the_share_and_the_descriptors_and_is_read_only() {
        let Some(scratch) = Scratch::for_root_test("fsroot", "fs root test") else {
            return;
        };
        let base = scratch.0.clone();
        prepare_state_dir(&base).unwrap();
        let dir = base.join("sandbox");
        let _owner = prepare_sandbox_dir(&dir).unwrap();
        let root = dir.join(FS_ROOT_DIR);
        let names = |p: &Path| {
            let mut n: Vec<_> = std::fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            n.sort();
            n
        };
        assert_eq!(names(&root), ["proc", "share"]);
        // This process's own descriptors, by number.
        let held = std::fs::File::open("/").unwrap();
        assert!(root
            .join(format!(
                "proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&held)
            ))
            .exists());
        drop(held);
        type Attack<'a> = (&'a str, &'a dyn Fn(&Path) -> std::io::Result<()>);
        let attacks: [Attack; 4] = [
            ("create a file", &|r| std::fs::write(r.join("etc"), b"x")),
            ("plant a symlink", &|r| {
                std::os::unix::fs::symlink("/etc", r.join("host"))
            }),
            ("remove proc/self/fd's place", &|r| {
                std::fs::remove_dir(r.join("proc/self"))
            }),
            ("swap proc", &|r| {
                std::fs::rename(r.join("proc"), r.join("p"))
            }),
        ];
        for (what, attack) in attacks {
            let err = attack(&root).expect_err(what);
            assert!(refused(err), "{what}");
        }
        assert_eq!(names(&root), ["proc", "share"]);
        // Beside it, in the sandbox directory, the same calls work: the refusals above are
        // the root's read-only bind, not a lack of permission.
        let beside = dir.join("beside");
        std::fs::create_dir_all(beside.join("proc/self")).unwrap();
        for (what, attack) in attacks {
            attack(&beside).unwrap_or_else(|e| panic!("{what} beside the root: {e}"));
        }
        remove_tree(&dir).unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn the_share_is_read_only_to_the_guest_except_inside_its_mounts() {
        let Some(scratch) = Scratch::for_root_test("share", "share layout test") else {
            return;
        };
        let base = scratch.0.clone();
        let bundle = base.join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs/etc")).unwrap();
        let data = base.join("data");
        std::fs::create_dir_all(data.join("rw")).unwrap();
        std::fs::create_dir_all(data.join("ro")).unwrap();
        std::fs::write(data.join("ro/precious"), b"mine").unwrap();
        std::fs::write(data.join("file"), b"file volume").unwrap();
        prepare_state_dir(&base).unwrap();
        let dir = base.join("sandbox");
        let _owner = prepare_sandbox_dir(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "sandbox directory is root-only");

        let files = ContainerFiles::create(&dir, "c1").unwrap();
        files.mount_rootfs(&[], &bundle).unwrap();
        let mut spec = Spec::default();
        spec.set_mounts(Some(vec![
            volume(&data.join("rw"), "/rw", &["rbind", "rw"]),
            volume(&data.join("ro"), "/ro", &["rbind", "ro"]),
            volume(&data.join("file"), "/file", &["bind"]),
        ]));
        files.share_volumes(&mut spec, "/guest/c1").unwrap();
        let sources: Vec<_> = spec
            .mounts()
            .iter()
            .flatten()
            .map(|m| m.source().clone().unwrap())
            .collect();
        assert_eq!(
            sources,
            [
                "/guest/c1/volume-0",
                "/guest/c1/volume-1",
                "/guest/c1/volume-2"
            ]
            .map(PathBuf::from)
        );

        // What the virtio-fs server serves.
        let shared = dir.join(SHARED_DIR);
        let c1 = shared.join("c1");
        let decoy = base.join("decoy");
        std::fs::create_dir_all(&decoy).unwrap();
        assert!(refused(
            std::fs::write(shared.join("planted"), b"x").unwrap_err()
        ));
        assert!(refused(std::fs::create_dir(shared.join("c2")).unwrap_err()));
        assert!(refused(
            std::os::unix::fs::symlink(&decoy, shared.join("c2")).unwrap_err()
        ));
        assert!(refused(
            std::os::unix::fs::symlink(&decoy, c1.join("volume-9")).unwrap_err()
        ));
        assert!(refused(
            std::fs::rename(c1.join("volume-0"), c1.join("moved")).unwrap_err()
        ));
        assert!(refused(std::fs::remove_dir(c1.join("rootfs")).unwrap_err()));
        // Inside its mounts the guest writes, except in the read-only volume.
        std::fs::write(c1.join("rootfs/etc/hostname"), b"guest").unwrap();
        assert_eq!(
            std::fs::read(bundle.join("rootfs/etc/hostname")).unwrap(),
            b"guest"
        );
        std::fs::write(c1.join("volume-0/new"), b"guest").unwrap();
        assert!(data.join("rw/new").exists());
        assert!(refused(
            std::fs::write(c1.join("volume-1/precious"), b"overwritten").unwrap_err()
        ));
        assert!(refused(
            std::fs::write(c1.join("volume-1/new"), b"x").unwrap_err()
        ));
        assert_eq!(std::fs::read(data.join("ro/precious")).unwrap(), b"mine");
        assert_eq!(std::fs::read(c1.join("volume-2")).unwrap(), b"file volume");
        for point in ["rootfs", "volume-0", "volume-1", "volume-2"] {
            let flags = nix::sys::statvfs::statvfs(&c1.join(point)).unwrap().flags();
            use nix::sys::statvfs::FsFlags;
            assert!(
                flags.contains(FsFlags::ST_NOSUID | FsFlags::ST_NODEV),
                "{point}: {flags:?}"
            );
        }
        // A setuid-root copy of `id` the guest leaves in its rootfs.
        let planted = c1.join("rootfs/id");
        std::fs::copy("/usr/bin/id", &planted).unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o4755)).unwrap();
        assert_eq!(
            euid_of(&planted),
            "65534",
            "setuid honoured through the share"
        );
        // The same file through a plain bind of the bundle, as the shim used to mount it.
        let plain = base.join("plain");
        bind(&bundle.join("rootfs"), &plain);
        assert_eq!(
            euid_of(&plain.join("id")),
            "0",
            "without nosuid the guest's file runs as root (the attack this layout stops)"
        );
        umount2(&plain, MntFlags::MNT_DETACH).unwrap();

        // A read-only rootfs: writable until the container exists (the guest makes the
        // mount points its image lacks), then sealed read-only on the host. A guest holding
        // a file open for writing keeps it from being sealed, and the seal says so.
        let ro_bundle = base.join("ro-bundle");
        std::fs::create_dir_all(ro_bundle.join("rootfs")).unwrap();
        let ro = ContainerFiles::create(&dir, "ro").unwrap();
        ro.mount_rootfs(&[], &ro_bundle).unwrap();
        let ro_root = shared.join("ro/rootfs");
        std::fs::create_dir(ro_root.join("proc")).unwrap();
        let held = std::fs::File::create(ro_root.join("held")).unwrap();
        let busy = ro.seal_rootfs().unwrap_err().to_string();
        assert!(
            busy.contains("make read-only") && busy.contains("busy"),
            "{busy}"
        );
        drop(held);
        ro.seal_rootfs().unwrap();
        assert!(refused(
            std::fs::write(ro_root.join("x"), b"x").unwrap_err()
        ));
        assert!(refused(
            std::fs::create_dir(ro_root.join("proc/y")).unwrap_err()
        ));
        assert!(ro_root.join("proc").is_dir());
        remove_container(&dir, "ro").unwrap();

        // Taking the container down detaches its mounts and removes its directory; what
        // the mounts showed stays.
        remove_container(&dir, "c1").unwrap();
        assert!(!c1.exists());
        assert!(!dir.join(PRIVATE_DIR).join("c1").exists());
        assert_eq!(sorted(mounts_under(&dir)), sandbox_mounts(&dir));
        assert_eq!(std::fs::read(data.join("ro/precious")).unwrap(), b"mine");
        assert!(bundle.join("rootfs/etc/hostname").exists());
        remove_container(&dir, "c1").unwrap();
        // A failed start leaves a staged mount in the private tree; it goes too.
        let files = ContainerFiles::create(&dir, "c2").unwrap();
        files.make_point("rootfs", true).unwrap();
        bind(
            &bundle.join("rootfs"),
            &dir.join(PRIVATE_DIR).join("c2/rootfs"),
        );
        remove_container(&dir, "c2").unwrap();
        assert_eq!(sorted(mounts_under(&dir)), sandbox_mounts(&dir));
        assert!(matches!(
            ContainerFiles::create(&dir, "../x"),
            Err(MountError::BadId(_))
        ));

        remove_tree(&dir).unwrap();
        assert!(!dir.exists());
        assert_eq!(
            mounts_under(&base),
            vec![base.clone()],
            "only the state directory's own"
        );
        assert!(bundle.join("rootfs/id").exists());
    }

    /// The race of issue 18, run as the guest would: while the host creates 200 containers
    /// with directory, file and read-only volumes, a thread with the guest's view (the
    /// served tree) keeps planting symlinks to a decoy directory and renaming entries in
    /// every container directory. Nothing lands: every plant fails, the decoy is unchanged
    /// and no mount exists outside the sandbox. Then the same plant against the way the
    /// shim used to build the tree (directories in the served tree, then a bind by path)
    /// puts a volume over the decoy: the attack this layout stops.
    #[test]
    fn a_guest_racing_symlinks_into_the_share_reaches_nothing() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let Some(scratch) = Scratch::for_root_test("share-race", "share race test") else {
            return;
        };
        let base = scratch.0.clone();
        let bundle = base.join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        let data = base.join("data");
        std::fs::create_dir_all(data.join("dir")).unwrap();
        std::fs::write(data.join("file"), b"f").unwrap();
        let decoy = base.join("decoy");
        std::fs::create_dir_all(&decoy).unwrap();
        std::fs::write(decoy.join("cron"), b"host file").unwrap();
        prepare_state_dir(&base).unwrap();
        let dir = base.join("sandbox");
        let _owner = prepare_sandbox_dir(&dir).unwrap();
        let shared = dir.join(SHARED_DIR);

        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let landed = std::sync::Arc::new(AtomicUsize::new(0));
        let guest = {
            let (stop, landed, shared, decoy) =
                (stop.clone(), landed.clone(), shared.clone(), decoy.clone());
            std::thread::spawn(move || {
                let mut tries = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let ids: Vec<_> = std::fs::read_dir(&shared)
                        .map(|d| d.flatten().map(|e| e.path()).collect())
                        .unwrap_or_default();
                    for c in ids {
                        for name in ["rootfs", "volume-0", "volume-1", "volume-2"] {
                            tries += 1;
                            let at = c.join(name);
                            let _ = std::fs::rename(&at, c.join("moved"));
                            if std::os::unix::fs::symlink(&decoy, &at).is_ok() {
                                landed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    if std::os::unix::fs::symlink(&decoy, shared.join("planted")).is_ok() {
                        landed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tries
            })
        };
        for i in 0..200 {
            let id = format!("c{i}");
            let files = ContainerFiles::create(&dir, &id).unwrap();
            files.mount_rootfs(&[], &bundle).unwrap();
            let mut spec = Spec::default();
            spec.set_mounts(Some(vec![
                volume(&data.join("dir"), "/d", &["rbind"]),
                volume(&data.join("file"), "/f", &["bind"]),
                volume(&data.join("dir"), "/r", &["rbind", "ro"]),
            ]));
            files.share_volumes(&mut spec, "/g").unwrap();
            if i % 2 == 1 {
                remove_container(&dir, &format!("c{}", i - 1)).unwrap();
            }
        }
        stop.store(true, Ordering::Relaxed);
        let tries = guest.join().unwrap();
        assert!(tries > 200, "the guest thread barely ran ({tries} tries)");
        assert_eq!(
            landed.load(Ordering::Relaxed),
            0,
            "a plant landed in the share"
        );
        let names: Vec<_> = std::fs::read_dir(&decoy)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["cron"], "the decoy changed");
        assert_eq!(std::fs::read(decoy.join("cron")).unwrap(), b"host file");
        assert!(mounts_under(&decoy).is_empty());
        remove_tree(&dir).unwrap();
        assert_eq!(
            mounts_under(&base),
            vec![base.clone()],
            "only the state directory's own"
        );

        // The old way: the container directory in the served tree, writable by the guest,
        // which plants its symlink before the host binds the volume by path.
        let old = base.join("old-shared/c");
        std::fs::create_dir_all(&old).unwrap();
        std::os::unix::fs::symlink(&decoy, old.join("volume-0")).unwrap();
        mount(
            Some(&data.join("dir")),
            &old.join("volume-0"),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        assert_eq!(
            mounts_under(&decoy),
            vec![decoy.clone()],
            "the old way's bind lands on the decoy (the attack this layout stops)"
        );
    }

    /// The state directory is made root-only, and a symlink in its place is refused, not
    /// followed: without `O_NOFOLLOW` the chmod and the bind would land on its target.
    #[test]
    fn the_state_directory_is_made_root_only_and_a_symlink_there_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let Some(scratch) = Scratch::for_root_test("statedir", "state directory test") else {
            return;
        };
        let base = scratch.0.clone();
        let state = base.join("state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_state_dir(&state).unwrap();
        let mode = std::fs::metadata(&state).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(mounts_under(&base), vec![state.clone()]);

        let target = base.join("elsewhere");
        std::fs::create_dir_all(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = base.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = prepare_state_dir(&link).unwrap_err().to_string();
        assert!(e.contains("link"), "{e}");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "the symlink's target was changed");
        assert!(
            mounts_under(&target).is_empty(),
            "the symlink's target was mounted on"
        );
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/end\\"), "/end\\");
    }
}
