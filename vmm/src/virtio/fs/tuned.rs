//! The passthrough file system with the FUSE options a container's root file system wants,
//! and the policy of what the guest may not do through the share.
//!
//! fuse-backend-rs's passthrough asks the guest for little at INIT; in particular not
//! `BIG_WRITES`/`MAX_PAGES`, which leaves every write at one page per request (measured: 4 MB/s
//! of 1 MiB O_DIRECT writes where reads ran at 136 MB/s, emulated). This wrapper adds those
//! (and parallel directory operations) when the guest offers them. Every call the policy below
//! does not name goes straight through.
//!
//! # Policy: what the guest may not do through the share, and why
//!
//! The passthrough runs as root on the host and acts with the guest's uid and gid (a guest
//! root is host root to it), so anything the guest's root could make on a local file system
//! it could otherwise make in the host's tree. The share's trees are container root file
//! systems (snapshots of image layers) and host volumes: other host processes may later mount
//! them, use them as overlay layers or open files in them, without the care a guest's own
//! disk would get. The wrapper therefore refuses:
//!
//! - **Device nodes** (`mknod` of a block or character device): `EPERM`. A guest-made
//!   `b 8,0` in the tree would be the host's raw disk to anyone on the host who opens it
//!   from a mount without `nodev`. Privileged containers still get their device nodes, on
//!   the guest's own file systems (devtmpfs, tmpfs), not in the share. FIFOs, sockets and
//!   regular files made with `mknod` are allowed. One character device is allowed too: `0,0`,
//!   which is how overlayfs marks a deleted file (a whiteout) and which no driver answers
//!   (opening it fails with `ENXIO`); an overlay mounted in the guest with its upper layer on
//!   the share makes them, and a `rename` with `RENAME_WHITEOUT` makes the same node anyway.
//! - **`trusted.*` xattrs**: set and remove are `EPERM`; get answers `ENODATA` and list
//!   leaves them out, as if the host file had none. The host's overlayfs keeps its own
//!   metadata there (`trusted.overlay.*`: opaque directories, redirects, metacopy origins), so
//!   a guest that could write them could change what a host overlay mount of a snapshot
//!   shows; one that could read them would learn about the host's layout. An overlay mounted
//!   in the guest with its upper layer on the share still works: the guest kernel, refused
//!   at mount, runs it without xattrs (or use `-o userxattr`, which keeps them in `user.*`).
//! - **`security.*` xattrs**: set and remove are `EPERM` (file capabilities, SELinux and
//!   SMACK labels, IMA/EVM data are host policy, not the guest's to grant itself). Reading
//!   them passes: file capabilities that came with an image (`security.capability` on
//!   `ping`) work in the guest. `setcap` on a file in the share fails.
//! - **Oversized xattr reads**: a get or list asking for more than 64 KiB (the kernel's own
//!   ceiling for a value and for a list) is served with a 64 KiB buffer, so a request cannot
//!   make the host allocate what the guest names.
//!
//! # Read and write flags
//!
//! A FUSE READ or WRITE carries the file's flags as the guest has them now, and the
//! passthrough, when they differ from the flags the handle was opened with, sets them on the
//! host descriptor (`F_SETFL`). Where that fails (an `O_PATH` descriptor the guest opened,
//! `O_DIRECT` on a file system without it, `O_APPEND` on an append-only file),
//! fuse-backend-rs 0.14 closes the handle's descriptor on the way out and leaves the handle
//! holding its number, which is then closed a second time: whatever the VMM or the shim
//! opened meanwhile under that number. (Found by the `fuse_session` fuzz target.) So the
//! wrapper keeps each handle's open flags (files and directories) and hands the passthrough
//! those with every read and write: the host descriptor keeps the flags it was opened with,
//! and no `F_SETFL` is made. A read or write naming a handle no open, create or opendir made
//! is refused (`EBADF`) before it reaches the passthrough.
//!
//! # What passes through
//!
//! `user.*` and `system.posix_acl_*` xattrs pass through (the host kernel checks them as it
//! would for any root process).
//!
//! Allowed, on purpose: `chown`, and `chmod`/`setattr` of the setuid, setgid and sticky bits
//! (containers need setuid binaries inside the guest, and image layers hold them). The host's
//! protection against setuid files and device nodes already in the tree is the mount: the
//! shared trees are mounted `nosuid,nodev` on the host, so nothing the guest leaves there
//! runs with its owner's rights or opens a device through that mount.
use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::sync::Mutex;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, FsOptions, GetxattrReply, IoctlData,
    ListxattrReply, OpenOptions, SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::PassthroughFs;
use fuse_backend_rs::transport::FsCacheReqHandler;

/// Options added to what the passthrough file system asks for, when the guest offers them.
const EXTRA_OPTIONS: FsOptions = FsOptions::BIG_WRITES
    .union(FsOptions::MAX_PAGES)
    .union(FsOptions::PARALLEL_DIROPS)
    .union(FsOptions::ASYNC_READ);

/// The largest xattr value and the longest xattr name list the kernel hands out
/// (`XATTR_SIZE_MAX`, `XATTR_LIST_MAX`).
const XATTR_MAX: u32 = 64 * 1024;
/// The device number of an overlayfs whiteout, the one character device the guest may make.
const WHITEOUT_RDEV: u32 = 0;

/// See the module documentation. Beside the passthrough file system: the flags each open
/// handle was opened with (see "Read and write flags" there).
pub struct ContainerFs(pub PassthroughFs, Mutex<HashMap<u64, u32>>);

impl ContainerFs {
    pub fn new(fs: PassthroughFs) -> ContainerFs {
        ContainerFs(fs, Mutex::new(HashMap::new()))
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u32>> {
        self.1
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The flags `handle` was opened with (file or directory); `EBADF` for a handle no
    /// open, create or opendir made.
    fn open_flags(&self, handle: u64) -> io::Result<u32> {
        self.handles()
            .get(&handle)
            .copied()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))
    }
}

fn refused() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

/// Whether `mknod` with this mode and device number makes a device node the policy refuses.
fn is_refused_device(mode: u32, rdev: u32) -> bool {
    match mode & libc::S_IFMT {
        libc::S_IFBLK => true,
        libc::S_IFCHR => rdev != WHITEOUT_RDEV,
        _ => false,
    }
}

/// Whether the guest may set or remove the xattr `name`.
fn may_write_xattr(name: &[u8]) -> bool {
    !name.starts_with(b"trusted.") && !name.starts_with(b"security.")
}

/// Whether the guest may read, or see listed, the xattr `name`.
fn may_see_xattr(name: &[u8]) -> bool {
    !name.starts_with(b"trusted.")
}

/// The names of a NUL-separated xattr name list the guest may see, in the same form.
fn visible_xattrs(list: &[u8]) -> Vec<u8> {
    list.split_inclusive(|b| *b == 0)
        .filter(|name| may_see_xattr(name))
        .flatten()
        .copied()
        .collect()
}

impl FileSystem for ContainerFs {
    type Inode = <PassthroughFs as FileSystem>::Inode;
    type Handle = <PassthroughFs as FileSystem>::Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        Ok(self.0.init(capable)? | (capable & EXTRA_OPTIONS))
    }

    fn destroy(&self) {
        self.handles().clear();
        self.0.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<Entry> {
        #[cfg(test)]
        if let Some(path) = name.to_bytes().strip_prefix(INJECTED_BUG) {
            return injected_bug(path);
        }
        #[cfg(test)]
        if let Some(path) = name.to_bytes().strip_prefix(INJECTED_CHMOD_BUG) {
            return injected_chmod_bug(path);
        }
        self.0.lookup(ctx, parent, name)
    }

    fn forget(&self, ctx: &Context, inode: Self::Inode, count: u64) {
        self.0.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Self::Inode, u64)>) {
        self.0.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Option<Self::Handle>,
    ) -> io::Result<(stat64, Duration)> {
        self.0.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        attr: stat64,
        handle: Option<Self::Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.0.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: Self::Inode) -> io::Result<Vec<u8>> {
        self.0.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Self::Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.0.symlink(ctx, linkname, parent, name)
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        // The passthrough makes the node with `mode & !umask`, and the umask can clear
        // file-type bits too (`0o070000` with umask `0o010000` is a block device). So the
        // mode is masked here, checked as masked, and handed on with no umask left to apply:
        // what is checked is what is made.
        let mode = mode & !umask;
        if is_refused_device(mode, rdev) {
            crate::guest_warn!(
                mode,
                rdev,
                "virtio-fs: the guest's mknod of a device node in the share was refused"
            );
            return Err(refused());
        }
        self.0.mknod(ctx, inode, name, mode, rdev, 0)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.0.mkdir(ctx, parent, name, mode, umask)
    }

    fn unlink(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.0.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.0.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Self::Inode,
        oldname: &CStr,
        newdir: Self::Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.0.rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        newparent: Self::Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        self.0.link(ctx, inode, newparent, newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions, Option<u32>)> {
        let opened = self.0.open(ctx, inode, flags, fuse_flags)?;
        if let Some(handle) = opened.0 {
            self.handles().insert(handle, flags);
        }
        Ok(opened)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Self::Handle>, OpenOptions, Option<u32>)> {
        let flags = args.flags;
        let created = self.0.create(ctx, parent, name, args)?;
        if let Some(handle) = created.1 {
            self.handles().insert(handle, flags);
        }
        Ok(created)
    }

    fn read(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        _guest_flags: u32,
    ) -> io::Result<usize> {
        // The handle's open flags, not the guest's current ones: "Read and write flags".
        let flags = self.open_flags(handle)?;
        self.0
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        _guest_flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        let flags = self.open_flags(handle)?;
        self.0.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.0.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.0.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.0.fallocate(ctx, inode, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.handles().remove(&handle);
        self.0
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: Self::Inode) -> io::Result<statvfs64> {
        self.0.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        if !may_write_xattr(name.to_bytes()) {
            tracing::debug!(?name, "virtio-fs: setxattr refused");
            return Err(refused());
        }
        self.0.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        if !may_see_xattr(name.to_bytes()) {
            return Err(io::Error::from_raw_os_error(libc::ENODATA));
        }
        self.0.getxattr(ctx, inode, name, size.min(XATTR_MAX))
    }

    fn listxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        size: u32,
    ) -> io::Result<ListxattrReply> {
        // The guest asks twice: with size 0 for the length of the list, then with a buffer of
        // that length. Both answers must be about the filtered list, so the host's whole list
        // is read each time (a 64 KiB buffer holds any list the kernel returns) and filtered;
        // the host's own size probe would count the hidden names too.
        let all = match self.0.listxattr(ctx, inode, XATTR_MAX)? {
            ListxattrReply::Names(names) => names,
            // Only a size probe is answered with a count.
            ListxattrReply::Count(_) => return Err(io::Error::from_raw_os_error(libc::EIO)),
        };
        let visible = visible_xattrs(&all);
        if size == 0 {
            Ok(ListxattrReply::Count(visible.len() as u32))
        } else if visible.len() > size as usize {
            Err(io::Error::from_raw_os_error(libc::ERANGE))
        } else {
            Ok(ListxattrReply::Names(visible))
        }
    }

    fn removexattr(&self, ctx: &Context, inode: Self::Inode, name: &CStr) -> io::Result<()> {
        if !may_write_xattr(name.to_bytes()) {
            tracing::debug!(?name, "virtio-fs: removexattr refused");
            return Err(refused());
        }
        self.0.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions)> {
        let opened = self.0.opendir(ctx, inode, flags)?;
        if let Some(handle) = opened.0 {
            // What the passthrough records for a directory handle.
            self.handles()
                .insert(handle, flags | libc::O_DIRECTORY as u32);
        }
        Ok(opened)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.0.readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.0
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.0.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.handles().remove(&handle);
        self.0.releasedir(ctx, inode, flags, handle)
    }

    #[allow(clippy::too_many_arguments)]
    fn setupmapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        foffset: u64,
        len: u64,
        flags: u64,
        moffset: u64,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.0
            .setupmapping(ctx, inode, handle, foffset, len, flags, moffset, vu_req)
    }

    fn removemapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        requests: Vec<RemovemappingOne>,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.0.removemapping(ctx, inode, requests, vu_req)
    }

    fn access(&self, ctx: &Context, inode: Self::Inode, mask: u32) -> io::Result<()> {
        self.0.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.0.lseek(ctx, inode, handle, offset, whence)
    }

    /// Query file lock status
    fn getlk(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.0.getlk(ctx, inode, handle, owner, lock, flags)
    }

    /// Grab a file read lock
    fn setlk(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.0.setlk(ctx, inode, handle, owner, lock, flags)
    }

    /// Grab a file write lock
    fn setlkw(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.0.setlkw(ctx, inode, handle, owner, lock, flags)
    }

    /// send ioctl to the file
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        flags: u32,
        cmd: u32,
        data: IoctlData,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        self.0.ioctl(ctx, inode, handle, flags, cmd, data, out_size)
    }

    /// Query a file's block mapping info
    fn bmap(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        block: u64,
        blocksize: u32,
    ) -> io::Result<u64> {
        self.0.bmap(ctx, inode, block, blocksize)
    }

    /// Poll a file's events
    fn poll(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        khandle: Self::Handle,
        flags: u32,
        events: u32,
    ) -> io::Result<u32> {
        self.0.poll(ctx, inode, handle, khandle, flags, events)
    }

    /// Send notify reply.
    fn notify_reply(&self) -> io::Result<()> {
        self.0.notify_reply()
    }

    #[inline]
    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        self.0.id_remap(ctx)
    }
}

/// Test double for a path-handling bug in the server (the confinement tests): a LOOKUP
/// whose name starts with this opens the rest of the name as a host path, as a bug that let
/// a guest's name through unchecked would. No real request reaches the host this way; the
/// double exists because a bug cannot be provoked on purpose.
#[cfg(test)]
pub(crate) const INJECTED_BUG: &[u8] = b"\x01host:";

/// The answer of the injected bug: `ENOTRECOVERABLE` when it opened the host file (the
/// attack worked), the open's own error otherwise.
#[cfg(test)]
fn injected_bug(path: &[u8]) -> io::Result<Entry> {
    use std::os::unix::ffi::OsStrExt;
    match std::fs::File::open(std::ffi::OsStr::from_bytes(path)) {
        Ok(_) => Err(io::Error::from_raw_os_error(libc::ENOTRECOVERABLE)),
        Err(e) => Err(e),
    }
}

/// Like [`INJECTED_BUG`], for the calls Landlock does not cover: a LOOKUP whose name starts
/// with this makes the server `chmod` the rest of the name, a host path, to 0666.
#[cfg(test)]
pub(crate) const INJECTED_CHMOD_BUG: &[u8] = b"\x01chmod:";

/// The answer of the injected chmod bug: `ENOTRECOVERABLE` when the mode of the host file
/// changed (the attack worked), the call's own error otherwise. It calls `fchmodat`, as the
/// passthrough does (plain `chmod` is not in the worker's seccomp list).
#[cfg(test)]
fn injected_chmod_bug(path: &[u8]) -> io::Result<Entry> {
    let path =
        std::ffi::CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: fchmodat(2) with a NUL-terminated path; it touches no memory of ours after.
    match unsafe { libc::fchmodat(libc::AT_FDCWD, path.as_ptr(), 0o666, 0) } {
        0 => Err(io::Error::from_raw_os_error(libc::ENOTRECOVERABLE)),
        _ => Err(io::Error::last_os_error()),
    }
}
