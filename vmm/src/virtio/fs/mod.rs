//! virtio-fs: a host directory tree shared with the guest, served inside the VMM (no daemon).
//!
//! FUSE requests arrive on two queues (high priority for FORGET/INTERRUPT, one request queue)
//! and are answered by fuse-backend-rs's FUSE server over its passthrough file system, rooted
//! at the shared directory. The passthrough layer resolves every name with `openat` against an
//! `O_PATH` descriptor of its parent, refuses names with `/`, opens with `O_NOFOLLOW` and maps
//! `..` at the root to the root itself, so the guest reaches nothing outside the tree: symlinks
//! in the tree are handed to the guest as links and resolved there, in the guest's namespace.
//! What the guest may not do inside the tree (device nodes, `trusted.*`/`security.*` xattrs)
//! is the policy in `tuned.rs`, which wraps the passthrough file system.
//!
//! fuse-backend-rs is built against vm-memory 0.17 and virtio-queue 0.17, the VMM against 0.18.
//! The two are not interchangeable, so at activation the device builds a 0.17 view of the same
//! guest mapping (no copy, no second mapping) and runs its queues with virtio-queue 0.17.
//! Requests are served on a worker thread of the device's own, so a slow file system call never
//! holds up the device thread's other devices (vsock, disks).
pub mod config;
mod tuned;

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{self, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use fuse_virtio_queue::QueueT as _;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

pub use config::{CacheMode, FsConfig};

use super::{Interrupt, VirtioDevice, VirtioError};

/// virtio device id of a file system device.
pub const VIRTIO_ID_FS: u32 = 26;
/// The high-priority queue and one request queue.
const QUEUE_SIZES: [u16; 2] = [128, 256];
/// The longest tag the guest accepts (virtio spec: 36 bytes, not NUL-terminated when full).
pub const TAG_MAX: usize = 36;
/// Stack of the worker thread: the FUSE server keeps its buffers on the heap.
const WORKER_STACK: usize = 256 * 1024;

/// Errors from setting up a shared directory.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag {tag:?}: {reason}")]
    Tag { tag: String, reason: &'static str },
    #[error("virtio-fs directory {path}: {cause}")]
    Dir {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("virtio-fs directory {path} is not a directory")]
    NotDir { path: PathBuf },
    #[error("cannot start the passthrough file system for {path}: {cause}")]
    Passthrough {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("virtio-fs root {root} for {share}: {reason}")]
    Root {
        root: PathBuf,
        share: PathBuf,
        reason: String,
    },
    #[error("virtio-fs {tag:?}: cannot start its worker thread")]
    Worker {
        tag: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

type FuseServer = Server<Arc<tuned::ContainerFs>>;

/// What the worker serves while the device is active: the queues as virtio-queue 0.17
/// sees them, over a 0.17 view of guest memory.
struct Active {
    /// Owns the 0.18 memory so the view's regions stay mapped.
    _owner: GuestMemoryMmap,
    view: fuse_vm_memory::GuestMemoryMmap,
    queues: Vec<fuse_virtio_queue::Queue>,
    interrupt: Arc<Interrupt>,
}

/// The worker thread, started with the device (on the VMM's set-up thread, so that it can
/// confine itself to the share before the guest runs; a guest's activation only hands it
/// queues). It serves the active queues each time it is woken, under `active`'s lock, so a
/// reset that takes the queues away waits for the round in progress.
struct Worker {
    kick: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    active: Arc<Mutex<Option<Active>>>,
    /// The thread until it has said it is confined (`confirm`), then its handle.
    starting: Option<crate::confine::Starting>,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    fn start(
        tag: &str,
        share: PathBuf,
        root: Option<PathBuf>,
        (server, proc_fd): (Arc<FuseServer>, Option<std::os::fd::RawFd>),
        served: Arc<AtomicBool>,
    ) -> Result<Worker, FsError> {
        let kick = Arc::new(EventFd::new(0).map_err(|source| FsError::Worker {
            tag: tag.into(),
            source: source.into(),
        })?);
        let stop = Arc::new(AtomicBool::new(false));
        let active: Arc<Mutex<Option<Active>>> = Arc::new(Mutex::new(None));
        let (worker_kick, worker_stop, worker_active) =
            (kick.clone(), stop.clone(), active.clone());
        let class = crate::confine::ThreadClass::FsWorker {
            share,
            root,
            proc_fd,
        };
        let starting =
            crate::confine::start(&format!("shoal-fs-{tag}"), WORKER_STACK, class, move || {
                loop {
                    match worker_kick.read() {
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::error!(
                                "virtio-fs: worker eventfd {} failed: {e}",
                                worker_kick.as_raw_fd()
                            );
                            return;
                        }
                    }
                    if worker_stop.load(Ordering::Acquire) {
                        return;
                    }
                    let mut guard = worker_active.lock().unwrap_or_else(|p| p.into_inner());
                    let Some(active) = guard.as_mut() else {
                        continue;
                    };
                    let mut any = false;
                    for queue in active.queues.iter_mut() {
                        any |= serve_queue(&server, &active.view, queue);
                    }
                    if any {
                        served.store(true, Ordering::Release);
                        active.interrupt.signal_used();
                    }
                }
            })
            .map_err(|source| FsError::Worker {
                tag: tag.into(),
                source: source.into(),
            })?;
        Ok(Worker {
            kick,
            stop,
            active,
            starting: Some(starting),
            handle: None,
        })
    }

    /// Waits until the worker is confined; its error if it could not be.
    fn confirm(&mut self) -> Result<(), crate::confine::ConfineError> {
        if let Some(starting) = self.starting.take() {
            self.handle = Some(starting.confined()?);
        }
        Ok(())
    }

    fn wake(&self) {
        if let Err(e) = self.kick.write(1) {
            crate::guest_warn!("virtio-fs: cannot wake the worker: {e}");
        }
    }

    /// Hands the worker new queues (`Some`) or takes them away (`None`); returns once the
    /// worker no longer uses the old ones.
    fn set_active(&self, active: Option<Active>) {
        let old = std::mem::replace(
            &mut *self.active.lock().unwrap_or_else(|p| p.into_inner()),
            active,
        );
        drop(old);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.confirm();
        self.stop.store(true, Ordering::Release);
        let _ = self.kick.write(1);
        if let Some(handle) = self.handle.take() {
            if handle.join().is_err() {
                crate::guest_error!("virtio-fs worker panicked");
            }
        }
    }
}

/// One virtio-fs device.
pub struct Fs {
    tag: String,
    config: Vec<u8>,
    /// A second server over the same share, by its absolute path, served on the caller's
    /// thread (`DirectServe`, for tests and the fuzz harness).
    #[cfg(any(test, feature = "fuzzing"))]
    direct: Arc<FuseServer>,
    worker: Worker,
    /// The queues as the driver handed them over, and whether any request has been served
    /// since: a device that has served none still stands where it started, which is all a
    /// snapshot can hold (a FUSE session, once the guest mounts, lives in the server).
    activated: Vec<QueueState>,
    served: Arc<AtomicBool>,
    /// The number of the worker's passthrough descriptor of `/proc/self/fd` (tests try `..`
    /// from it).
    #[cfg(test)]
    proc_fd: Option<std::os::fd::RawFd>,
}

impl Fs {
    /// Opens the shared directory of `config` and prepares the FUSE server for it.
    pub fn new(config: &FsConfig) -> Result<Fs, FsError> {
        config::check_tag(&config.tag)?;
        let dir = std::fs::canonicalize(&config.dir).map_err(|source| FsError::Dir {
            path: config.dir.clone(),
            cause: source,
        })?;
        if !dir.is_dir() {
            return Err(FsError::NotDir { path: dir });
        }
        let root = config
            .root
            .as_ref()
            .map(|r| jail_root(r, &dir))
            .transpose()?;
        // The worker serves the share as its working directory (".", where confine.rs puts its
        // thread in every mode), so the guest's INIT imports the share there.
        let server =
            build_server(".", config.cache, false).map_err(|source| FsError::Passthrough {
                path: dir.clone(),
                cause: source,
            })?;
        #[cfg(any(test, feature = "fuzzing"))]
        let direct = {
            let root = dir.to_str().expect("test shares have UTF-8 paths");
            build_server(root, config.cache, true)
                .map_err(|source| FsError::Passthrough {
                    path: dir.clone(),
                    cause: source,
                })?
                .0
        };
        let mut blob = vec![0u8; TAG_MAX + 4];
        blob[..config.tag.len()].copy_from_slice(config.tag.as_bytes());
        blob[TAG_MAX..].copy_from_slice(&1u32.to_le_bytes());
        let served = Arc::new(AtomicBool::new(false));
        #[cfg(test)]
        let proc_fd = server.1;
        let worker = Worker::start(&config.tag, dir, root, server, served.clone())?;
        Ok(Fs {
            #[cfg(test)]
            proc_fd,
            tag: config.tag.clone(),
            config: blob,
            #[cfg(any(test, feature = "fuzzing"))]
            direct,
            worker,
            activated: Vec::new(),
            served,
        })
    }

    /// The tag the guest mounts (`mount -t virtiofs TAG /mnt`).
    pub fn tag(&self) -> &str {
        &self.tag
    }
}

/// Checks `root` for a worker serving `share` (canonical): a directory strictly above the
/// share, with `proc/self/fd` in it. Returns it canonical.
fn jail_root(root: &Path, share: &Path) -> Result<PathBuf, FsError> {
    let fail = |reason: String| FsError::Root {
        root: root.to_path_buf(),
        share: share.to_path_buf(),
        reason,
    };
    let canonical = std::fs::canonicalize(root).map_err(|e| fail(e.to_string()))?;
    if canonical == share || !share.starts_with(&canonical) {
        return Err(fail("the share must be beneath the root".into()));
    }
    if !canonical.join("proc/self/fd").is_dir() {
        return Err(fail(
            "it has no proc/self/fd (a bind of /proc/self/fd, for the passthrough's xattr calls)"
                .into(),
        ));
    }
    Ok(canonical)
}

/// The FUSE server over a passthrough file system rooted at `root_dir` (resolved by the
/// thread that serves, when the guest's INIT imports it; `import` does it now), and the
/// number of the passthrough's descriptor of `/proc/self/fd`.
fn build_server(
    root_dir: &str,
    cache: CacheMode,
    import: bool,
) -> std::io::Result<(Arc<FuseServer>, Option<std::os::fd::RawFd>)> {
    let (timeout, policy) = match cache {
        CacheMode::Never => (Duration::ZERO, passthrough::CachePolicy::Never),
        CacheMode::Auto => (Duration::from_secs(1), passthrough::CachePolicy::Auto),
        CacheMode::Always => (
            Duration::from_secs(86_400),
            passthrough::CachePolicy::Always,
        ),
    };
    let fs_config = passthrough::Config {
        root_dir: root_dir.to_owned(),
        cache_policy: policy,
        entry_timeout: timeout,
        attr_timeout: timeout,
        // overlayfs on top of the share stores its metadata in xattrs; which ones the
        // guest may set or see is `tuned`'s policy.
        xattr: true,
        do_import: true,
        writeback: false,
        ..Default::default()
    };
    let fs = PassthroughFs::new(fs_config)?;
    if import {
        fs.import()?;
    }
    // Its one descriptor opened by path: `/proc/self/fd`, for reopening files by number.
    let proc_fd = fs.keep_fds().first().copied();
    let server = Arc::new(Server::new(Arc::new(tuned::ContainerFs::new(fs))));
    Ok((server, proc_fd))
}

/// A vm-memory 0.17 view of the VMM's guest memory, for fuse-backend-rs.
///
/// Each region of `mem` is described to 0.17 by its host address and length; nothing is mapped
/// or copied. The caller keeps `mem` alive for as long as the view is used.
fn memory_view(
    mem: &GuestMemoryMmap,
) -> Result<fuse_vm_memory::GuestMemoryMmap, fuse_vm_memory::mmap::FromRangesError> {
    let mut regions = Vec::new();
    for region in mem.iter() {
        let len = region.len() as usize;
        // SAFETY: `region.as_ptr()` .. `+ len` is the live host mapping of this guest RAM
        // region. `build_raw` only records the pointer (it neither maps nor, on drop, unmaps),
        // and the worker that uses the view holds a clone of `mem`, whose regions own the
        // mapping, for the view's whole life.
        let raw = unsafe {
            fuse_vm_memory::MmapRegion::build_raw(
                region.as_ptr(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            )
        }
        .map_err(fuse_vm_memory::mmap::FromRangesError::MmapRegion)?;
        let start = fuse_vm_memory::GuestAddress(region.start_addr().raw_value());
        let region = fuse_vm_memory::GuestRegionMmap::new(raw, start)
            .ok_or(fuse_vm_memory::mmap::FromRangesError::InvalidGuestRegion)?;
        regions.push(region);
    }
    fuse_vm_memory::GuestMemoryMmap::from_regions(regions)
        .map_err(fuse_vm_memory::mmap::FromRangesError::Collection)
}

/// The same queue, as virtio-queue 0.17 sees it.
fn queue_view(
    queue: &Queue,
    mem: &fuse_vm_memory::GuestMemoryMmap,
) -> Option<fuse_virtio_queue::Queue> {
    let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
    let mut view = fuse_virtio_queue::Queue::new(queue.max_size()).ok()?;
    view.set_size(queue.size());
    let (lo, hi) = split(queue.desc_table());
    view.set_desc_table_address(lo, hi);
    let (lo, hi) = split(queue.avail_ring());
    view.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(queue.used_ring());
    view.set_used_ring_address(lo, hi);
    view.set_event_idx(queue.event_idx_enabled());
    view.set_next_avail(queue.next_avail());
    view.set_next_used(queue.next_used());
    view.set_ready(queue.ready());
    view.is_valid(mem).then_some(view)
}

/// Serves every request waiting on `queue`; returns whether any was answered.
fn serve_queue(
    server: &FuseServer,
    mem: &fuse_vm_memory::GuestMemoryMmap,
    queue: &mut fuse_virtio_queue::Queue,
) -> bool {
    let mut any = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let reader = Reader::from_descriptor_chain(mem, chain.clone());
        let writer = VirtioFsWriter::new(mem, chain);
        let written = match (reader, writer) {
            (Ok(reader), Ok(writer)) => server
                .handle_message(reader, writer.into(), None, None)
                .unwrap_or_else(|e| {
                    tracing::debug!("virtio-fs: request not served: {e}");
                    0
                }),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!("virtio-fs: bad descriptor chain: {e}");
                0
            }
        };
        if let Err(e) = queue.add_used(mem, head, written as u32) {
            crate::guest_warn!("virtio-fs: cannot return a request: {e:?}");
        }
        any = true;
    }
    any
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn name(&self) -> &'static str {
        "fs"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        0
    }

    fn ready(&mut self) -> Result<(), crate::confine::ConfineError> {
        self.worker.confirm()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data)
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), VirtioError> {
        super::expect_queues("fs", &queues, QUEUE_SIZES.len())?;
        let view = memory_view(&mem).map_err(|e| VirtioError::Backend {
            device: "fs",
            what: format!("cannot describe guest memory: {e}"),
        })?;
        let mut views = Vec::with_capacity(queues.len());
        for (index, queue) in queues.iter().enumerate() {
            views.push(queue_view(queue, &view).ok_or(VirtioError::InvalidQueue {
                device: "fs",
                index,
            })?);
        }
        self.activated = queues.iter().map(Queue::state).collect();
        self.worker.set_active(Some(Active {
            _owner: mem,
            view,
            queues: views,
            interrupt,
        }));
        // Requests may already wait on the queues.
        self.worker.wake();
        Ok(())
    }

    fn reset(&mut self) {
        self.worker.set_active(None);
        self.activated.clear();
        // A guest that reset the device starts a new FUSE session on a fresh device.
        self.served.store(false, Ordering::Release);
    }

    fn save_queues(&self) -> Result<Vec<QueueState>, VirtioError> {
        if self.served.load(Ordering::Acquire) {
            return Err(VirtioError::Backend {
                device: "fs",
                what: format!(
                    "the guest has used the share {:?}; its FUSE session cannot be saved (snapshot before mounting it)",
                    self.tag
                ),
            });
        }
        Ok(self.activated.clone())
    }

    /// A notification made just before the snapshot may not have been served: wake the
    /// worker once to look at its queues.
    fn restored(&mut self) {
        self.queue_notify(0);
    }

    fn changed_since_save(&self) -> bool {
        self.served.load(Ordering::Acquire)
    }

    fn queue_notify(&mut self, _index: usize) {
        self.worker.wake();
    }
}

/// The device's FUSE server driven on the caller's thread, one request queue at a time: the
/// fuzz harness's way in (the same `serve_queue` the worker runs, without the thread).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) struct DirectServe {
    server: Arc<FuseServer>,
    view: fuse_vm_memory::GuestMemoryMmap,
    queue: fuse_virtio_queue::Queue,
}

#[cfg(any(test, feature = "fuzzing"))]
impl DirectServe {
    /// Serves `queue` of `fs` over `mem`, which the caller keeps alive (and mapped) for as
    /// long as this lives. `None` when the queue is not one the device would accept.
    pub(crate) fn new(fs: &Fs, mem: &GuestMemoryMmap, queue: &Queue) -> Option<DirectServe> {
        let view = memory_view(mem).ok()?;
        let queue = queue_view(queue, &view)?;
        Some(DirectServe {
            server: fs.direct.clone(),
            view,
            queue,
        })
    }

    /// Serves every request waiting; returns whether any was answered.
    pub(crate) fn serve(&mut self) -> bool {
        serve_queue(&self.server, &self.view, &mut self.queue)
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests;
