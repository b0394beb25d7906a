//! VM templates: a sandbox VM booted once, its agent up and idle, and saved as a snapshot.
//! With `template = true` every sandbox of that size starts by restoring it: no guest boot,
//! and the template's memory file is mapped `MAP_PRIVATE`, so the pages of the guest kernel
//! and agent that no sandbox writes are one copy in the host's page cache for all of them.
//!
//! A template lives in `<template_dir>/<memory>m-<vcpus>c/`: the snapshot (`vm.state`,
//! `vm.mem`), the console log of the boot that made it, and `template.json`, which records
//! what it was made from (kernel and image identity, command line, devices, size). A template
//! made from another kernel, image or command line than the config names is refused, as is
//! one of another size; the shim never falls back to booting on its own, so a missing or
//! stale template is an error that says how to make it.
//!
//! A restored sandbox is made unique by the ordinary start path: a new vsock socket and CID
//! (the guest learns it from a transport reset event), a new shared directory, and the
//! agent's CreateSandbox, which sets hostname and clock and reseeds the guest's random
//! generator with host entropy.
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_agent_api::agent::CheckRequest;
use shoal_agent_api::client::connect_agent;
use shoal_agent_api::AGENT_PORT;
use shoal_vmm::{RestoreConfig, SnapshotFiles, Vm, VmConfig};

use crate::agent::ctx;
use crate::config::Config;
use crate::console::{console_tail, CONSOLE_TAIL_LINES};
use crate::vm_spec::{vm_config, vsock_socket};

/// What a template directory holds besides its snapshot.
pub const MANIFEST: &str = "template.json";
const STATE: &str = "vm.state";
const MEMORY: &str = "vm.mem";
/// Version of `template.json`.
const MANIFEST_FORMAT: u32 = 1;
/// The vsock CID of the template's own boot; restored sandboxes get others.
const TEMPLATE_CID: u64 = 3;
/// How long the template VM runs after its agent answered, before it is saved: time for
/// the guest to close the host's connection and go idle.
const SETTLE: Duration = Duration::from_millis(500);

/// Errors finding, checking or making a template; each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("no VM template for {memory_mib} MiB and {vcpus} vCPUs ({dir} has no {MANIFEST}); make it with `scripts/template --memory-mib {memory_mib} --vcpus {vcpus}`, or set template = false in the shoal config")]
    Missing {
        dir: PathBuf,
        memory_mib: u64,
        vcpus: u8,
    },
    #[error("the VM template {dir} does not fit this config: {what}; make it again with `scripts/template` (templates must be remade after the guest kernel or image changes)")]
    Stale { dir: PathBuf, what: String },
    #[error("the VM template's {path} is not valid: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("cannot {what} {path}: {cause}")]
    Io {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("the template VM failed to start: {0}")]
    Boot(shoal_vmm::Error),
    #[error("the template VM's agent did not answer: {message}; the guest console's last lines:\n{console}")]
    Agent { message: String, console: String },
    #[error("cannot save the template VM: {0}")]
    Snapshot(shoal_vmm::SnapshotError),
}

// By hand, not `#[from]`: the messages carry the cause, so it is not also a `source()`
// (printed once, not twice, by a walk of the chain).
impl From<shoal_vmm::SnapshotError> for TemplateError {
    fn from(e: shoal_vmm::SnapshotError) -> Self {
        TemplateError::Snapshot(e)
    }
}

type Result<T> = std::result::Result<T, TemplateError>;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError {
    let path = path.to_path_buf();
    move |source| TemplateError::Io {
        what,
        path,
        cause: source,
    }
}

/// A file the template was made from, as cheap to check as a `stat`: replacing it (as
/// `scripts/install` does, by rename) changes its inode, size or modification time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FileId {
    path: PathBuf,
    size: u64,
    inode: u64,
    modified_ns: i64,
}

impl FileId {
    fn of(path: &Path) -> Result<FileId> {
        let meta = std::fs::metadata(path).map_err(io("read", path))?;
        Ok(FileId {
            path: path.into(),
            size: meta.size(),
            inode: meta.ino(),
            modified_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        })
    }
}

/// `template.json`: what a template was made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    memory_mib: u64,
    vcpus: u8,
    kernel: FileId,
    initrd: FileId,
    kernel_cmdline: String,
    free_page_reporting: bool,
}

impl Manifest {
    /// What a template for `config` must have been made from.
    fn of(config: &Config) -> Result<Manifest> {
        Ok(Manifest {
            format: MANIFEST_FORMAT,
            memory_mib: config.memory_mib,
            vcpus: config.vcpus,
            kernel: FileId::of(&config.kernel)?,
            initrd: FileId::of(&config.initrd)?,
            kernel_cmdline: config.kernel_cmdline.clone(),
            free_page_reporting: config.free_page_reporting,
        })
    }

    /// The first way `self` (the template's) differs from `wanted`, in words.
    fn difference(&self, wanted: &Manifest) -> Option<String> {
        let file = |what: &str, have: &FileId, want: &FileId| {
            (have != want).then(|| match have.path == want.path {
                true => format!(
                    "the {what} {} changed since the template was made",
                    want.path.display()
                ),
                false => format!(
                    "it was made from the {what} {}, the config names {}",
                    have.path.display(),
                    want.path.display()
                ),
            })
        };
        if self.format != wanted.format {
            return Some(format!(
                "its manifest is format {}, this shoal reads {}",
                self.format, wanted.format
            ));
        }
        if (self.memory_mib, self.vcpus) != (wanted.memory_mib, wanted.vcpus) {
            return Some(format!(
                "it is a VM of {} MiB and {} vCPUs, {} MiB and {} vCPUs were asked for",
                self.memory_mib, self.vcpus, wanted.memory_mib, wanted.vcpus
            ));
        }
        file("kernel", &self.kernel, &wanted.kernel)
            .or_else(|| file("guest image", &self.initrd, &wanted.initrd))
            .or_else(|| {
                (self.kernel_cmdline != wanted.kernel_cmdline).then(|| {
                    format!(
                        "it was booted with the command line {:?}, the config says {:?}",
                        self.kernel_cmdline, wanted.kernel_cmdline
                    )
                })
            })
            .or_else(|| {
                (self.free_page_reporting != wanted.free_page_reporting).then(|| {
                    format!(
                        "it was made with free_page_reporting = {}, the config says {}",
                        self.free_page_reporting, wanted.free_page_reporting
                    )
                })
            })
    }
}

/// The template directory for `config`'s VM size.
pub fn dir_for(config: &Config) -> PathBuf {
    config
        .template_dir
        .join(format!("{}m-{}c", config.memory_mib, config.vcpus))
}

/// A template that fits a config.
#[derive(Debug, Clone)]
pub struct Template {
    pub dir: PathBuf,
}

impl Template {
    /// The template for `config`'s VM size, checked against what `config` boots.
    pub fn find(config: &Config) -> Result<Template> {
        let dir = dir_for(config);
        let path = dir.join(MANIFEST);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TemplateError::Missing {
                    dir,
                    memory_mib: config.memory_mib,
                    vcpus: config.vcpus,
                })
            }
            Err(e) => return Err(io("read", &path)(e)),
        };
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|e| TemplateError::Manifest {
                path: path.clone(),
                message: e.to_string(),
            })?;
        if let Some(what) = manifest.difference(&Manifest::of(config)?) {
            return Err(TemplateError::Stale { dir, what });
        }
        Ok(Template { dir })
    }

    pub fn files(&self) -> SnapshotFiles {
        SnapshotFiles {
            state: self.dir.join(STATE),
            memory: self.dir.join(MEMORY),
        }
    }

    /// How to restore this template as the sandbox VM `vm` (`vm_spec::vm_config`, without
    /// network cards): its size, console, and devices with their own host sides (vsock
    /// socket and CID, shared directory). The VMM checks the size and devices again.
    pub fn restore_config(&self, vm: VmConfig) -> RestoreConfig {
        RestoreConfig {
            files: self.files(),
            console: vm.console,
            memory_mib: Some(vm.memory_mib),
            vcpus: Some(vm.vcpus),
            vsock: vm.vsock,
            shares: vm.shares,
            free_page_reporting: vm.free_page_reporting,
            limits: vm.limits,
        }
    }
}

/// Makes the template for `config`'s VM size: boots a sandbox VM exactly as the shim would
/// (same kernel, image, command line, devices), waits for its agent to answer, lets it go
/// idle, and saves it. Built in a scratch directory and renamed into place, so a sandbox
/// never finds half a template; an older template of the same size is replaced.
pub async fn create(config: &Config) -> Result<PathBuf> {
    let wanted = Manifest::of(config)?;
    let dest = dir_for(config);
    std::fs::create_dir_all(&config.template_dir).map_err(io("create", &config.template_dir))?;
    remove_dead_partials(&config.template_dir);
    let name = dest
        .file_name()
        .expect("a size")
        .to_string_lossy()
        .into_owned();
    let work = config
        .template_dir
        .join(format!(".{name}.{}.partial", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let shared = work.join("shared");
    std::fs::create_dir_all(&shared).map_err(io("create", &shared))?;
    let result = boot_and_save(config, &work, &shared).await;
    // Only the snapshot, the manifest and the console log stay.
    let _ = std::fs::remove_dir_all(&shared);
    let _ = std::fs::remove_dir_all(work.join("vsock"));
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&work);
        return Err(e);
    }
    let manifest = serde_json::to_string_pretty(&wanted).expect("a manifest serializes");
    let placed = std::fs::write(work.join(MANIFEST), manifest)
        .map_err(io("write", &work.join(MANIFEST)))
        .and_then(|_| replace_dir(&work, &dest));
    if placed.is_err() {
        let _ = std::fs::remove_dir_all(&work);
    }
    placed.map(|_| dest)
}

async fn boot_and_save(config: &Config, work: &Path, shared: &Path) -> Result<()> {
    let uds = vsock_socket(work).map_err(io("make the vsock directory in", work))?;
    let console = work.join("console.log");
    // The template's own boot serves a scratch directory with nothing in it, and no root.
    let vm_config = vm_config(
        config,
        &uds,
        TEMPLATE_CID,
        shared,
        None,
        &console,
        Vec::new(),
    );
    let vm = tokio::task::spawn_blocking(move || Vm::boot(&vm_config))
        .await
        .expect("VM boot task")
        .map_err(TemplateError::Boot)?;
    let timeout = Duration::from_secs(config.agent_timeout_secs);
    let answered = async {
        let agent = connect_agent(&uds, AGENT_PORT, timeout)
            .await
            .map_err(|e| e.to_string())?;
        agent
            .check(ctx(timeout), &CheckRequest::new())
            .await
            .map_err(|e| e.to_string())
    };
    if let Err(message) = answered.await {
        return Err(TemplateError::Agent {
            message,
            console: console_tail(&console, CONSOLE_TAIL_LINES),
        });
    }
    // The connection is closed; the guest's side of it goes away while the VM idles.
    tokio::time::sleep(SETTLE).await;
    let files = SnapshotFiles {
        state: work.join(STATE),
        memory: work.join(MEMORY),
    };
    tokio::task::spawn_blocking(move || {
        vm.pause()?;
        vm.snapshot(&files)
        // Dropping the VM stops it.
    })
    .await
    .expect("VM snapshot task")?;
    Ok(())
}

/// Puts directory `from` at `to`. An older template there is swapped out in one step
/// (`RENAME_EXCHANGE`), so a sandbox starting meanwhile finds one template or the other,
/// never none; the old one, now at `from`, is then removed.
fn replace_dir(from: &Path, to: &Path) -> Result<()> {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    let swapped = renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_EXCHANGE);
    match swapped {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(from);
            Ok(())
        }
        Err(nix::errno::Errno::ENOENT) => {
            std::fs::rename(from, to).map_err(io("put the new template at", to))
        }
        Err(e) => Err(io("put the new template at", to)(e.into())),
    }
}

/// Scratch directories of `shoal-template` runs that died (their pid is gone).
fn remove_dead_partials(template_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(template_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".partial"))
        else {
            continue;
        };
        let pid = rest.rsplit('.').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A guest vsock CID of a sandbox's own (4 and up; 3 is the template's), from its id. CIDs
/// are local to each VM's hybrid vsock, so a clash harms nothing; distinct ones tell
/// restored sandboxes apart.
pub fn sandbox_cid(id: &str) -> u64 {
    // FNV-1a: stable across runs and builds.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    4 + h % (u64::from(u32::MAX) - 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("shoal-template-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A config whose kernel and image are files in `dir`.
    fn config(dir: &Path) -> Config {
        std::fs::write(dir.join("vmlinux"), b"kernel").unwrap();
        std::fs::write(dir.join("image"), b"image").unwrap();
        Config {
            kernel: dir.join("vmlinux"),
            initrd: dir.join("image"),
            template_dir: dir.join("templates"),
            ..Config::default()
        }
    }

    fn write_manifest(config: &Config) {
        let dir = dir_for(config);
        std::fs::create_dir_all(&dir).unwrap();
        let m = Manifest::of(config).unwrap();
        std::fs::write(dir.join(MANIFEST), serde_json::to_string(&m).unwrap()).unwrap();
    }

    #[test]
    fn a_template_is_found_by_size_and_refused_when_it_no_longer_fits() {
        let dir = scratch("find");
        let mut c = config(&dir);
        let e = Template::find(&c).unwrap_err().to_string();
        assert!(
            e.contains("no VM template for 256 MiB and 1 vCPUs")
                && e.contains("scripts/template --memory-mib 256 --vcpus 1"),
            "{e}"
        );
        write_manifest(&c);
        let t = Template::find(&c).unwrap();
        assert!(t.dir.ends_with("256m-1c"), "{}", t.dir.display());
        assert!(t.files().memory.ends_with("256m-1c/vm.mem"));

        // Another size looks in another directory.
        c.memory_mib = 512;
        assert!(Template::find(&c)
            .unwrap_err()
            .to_string()
            .contains("512 MiB"));
        c.memory_mib = 256;

        // The kernel replaced (as scripts/install does, by rename): stale.
        std::fs::write(dir.join("vmlinux.new"), b"kernel 2").unwrap();
        std::fs::rename(dir.join("vmlinux.new"), dir.join("vmlinux")).unwrap();
        let e = Template::find(&c).unwrap_err().to_string();
        assert!(
            e.contains("does not fit") && e.contains("kernel") && e.contains("changed"),
            "{e}"
        );
        write_manifest(&c);
        c.kernel_cmdline.push_str(" debug");
        let e = Template::find(&c).unwrap_err().to_string();
        assert!(e.contains("command line"), "{e}");
        c.kernel_cmdline = Config::default().kernel_cmdline;
        c.free_page_reporting = false;
        let e = Template::find(&c).unwrap_err().to_string();
        assert!(e.contains("free_page_reporting = true"), "{e}");
        c.free_page_reporting = true;

        // A manifest that does not parse is named.
        std::fs::write(dir_for(&c).join(MANIFEST), b"{").unwrap();
        let e = Template::find(&c).unwrap_err().to_string();
        assert!(e.contains("template.json is not valid"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_new_template_replaces_the_old_and_dead_scratch_dirs_go() {
        let dir = scratch("replace");
        let (work, dest) = (dir.join(".256m-1c.1.partial"), dir.join("256m-1c"));
        for generation in ["first", "second"] {
            std::fs::create_dir_all(&work).unwrap();
            std::fs::write(work.join("vm.state"), generation).unwrap();
            replace_dir(&work, &dest).unwrap();
            assert_eq!(
                std::fs::read_to_string(dest.join("vm.state")).unwrap(),
                generation
            );
            assert!(
                !work.exists(),
                "the old template is left at {}",
                work.display()
            );
        }
        // A scratch directory of a run that died goes; one of a live run stays.
        let dead = dir.join(".256m-1c.999999999.partial");
        let live = dir.join(format!(".256m-1c.{}.partial", std::process::id()));
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::create_dir_all(&live).unwrap();
        remove_dead_partials(&dir);
        assert!(!dead.exists() && live.exists() && dest.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sandbox_cids_are_stable_and_never_the_templates() {
        assert_eq!(sandbox_cid("abc"), sandbox_cid("abc"));
        assert_ne!(sandbox_cid("abc"), sandbox_cid("abd"));
        for id in ["", "a", "pod-1", "0123456789abcdef"] {
            let cid = sandbox_cid(id);
            assert!((4..u64::from(u32::MAX)).contains(&cid), "{id}: {cid}");
        }
    }
}
