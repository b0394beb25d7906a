//! The VM a sandbox runs: its devices and where their host ends are. Sandboxes and the
//! templates they restore from are made from the same, so that a restored sandbox has what
//! a booted one has.
use std::path::{Path, PathBuf};

use shoal_vmm::{CacheMode, Console, FsConfig, NetConfig, VmConfig, VsockConfig};

use crate::config::Config;

/// virtio-fs tag of every sandbox's shared tree.
pub const SHARE_TAG: &str = "shoal";

/// A sandbox's VM: the configured kernel, image, size and command line; vsock on `uds` with
/// guest CID `cid`; the shared tree at `shared` (virtio-fs tag [`SHARE_TAG`]), its worker
/// held in `root` where there is one (a sandbox directory's `fs-root`); the pod's
/// network cards; the balloon if configured; the console to a file. Templates are made
/// with the same, so that a restored sandbox has what a booted one has.
pub fn vm_config(
    config: &Config,
    uds: &Path,
    cid: u64,
    shared: &Path,
    root: Option<&Path>,
    console: &Path,
    nets: Vec<NetConfig>,
) -> VmConfig {
    VmConfig {
        kernel: config.kernel.clone(),
        initrd: Some(config.initrd.clone()),
        cmdline: config.kernel_cmdline.clone(),
        memory_mib: config.memory_mib,
        vcpus: config.vcpus,
        vsock: Some(VsockConfig {
            uds_path: uds.into(),
            cid,
        }),
        disks: Vec::new(),
        shares: vec![FsConfig {
            tag: SHARE_TAG.into(),
            dir: shared.into(),
            cache: CacheMode::Auto,
            root: root.map(Path::to_path_buf),
        }],
        nets,
        free_page_reporting: config.free_page_reporting,
        console: Console::File(console.into()),
        limits: config.guest_limits(),
    }
}

/// The VM's hybrid-vsock socket, `<dir>/vsock/vsock.sock`, in a directory of its own (made
/// here, root-only): the VMM's vCPU and device threads are chrooted to it, so the sockets
/// they can connect to are this VM's vsock port sockets and nothing else of the sandbox's.
pub fn vsock_socket(dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let sockets = dir.join("vsock");
    match std::fs::DirBuilder::new().mode(0o700).create(&sockets) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    Ok(sockets.join("vsock.sock"))
}

/// Where the guest sees container `cid`'s files.
pub fn guest_container_dir(cid: &str) -> String {
    format!("{}/{cid}", shoal_agent_api::GUEST_SHARED_DIR)
}
