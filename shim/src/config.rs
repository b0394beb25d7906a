//! The shim's configuration: `/etc/shoal/config.toml` (or the file `SHOAL_CONFIG` names),
//! then per-pod sizing from annotations.
//!
//! ```toml
//! kernel = "/usr/share/shoal/vmlinux"          # guest kernel (uncompressed ELF)
//! initrd = "/usr/share/shoal/shoal-agent.img"  # guest image: the agent as /init
//! vcpus = 1
//! memory_mib = 256
//! log_level = "info"                           # tracing filter for the shim's log
//! state_dir = "/run/shoal"                     # per-sandbox sockets, shared dirs, console
//! agent_timeout_secs = 60                      # boot to agent answering
//! kernel_cmdline = "console=ttyS0 reboot=k panic=1 quiet noreplace-smp"
//! free_page_reporting = true                   # guests give freed pages back to the host
//! host_reserve_mib = 256                       # no new sandbox while the host has less free
//! template = false                             # restore VM templates instead of booting
//! template_dir = "/var/lib/shoal/templates"    # made by scripts/template, one per VM size
//! confine = "enforce"                          # VMM threads: seccomp, capabilities, Landlock;
//!                                              # "log" lets denied calls through to dmesg, "off"
//! sweep_secs = 60                              # at most this often a starting shim cleans
//!                                              # what dead shims left (0: at every start)
//!
//! [cgroups]                                    # host cgroups for sandboxes, from a pool
//! enabled = true
//! root = "/sys/fs/cgroup"
//! parent = "shoal"
//! driver = "cgroupfs"                          # or "systemd"
//! pool_size = 256
//! state_dir = "/run/shoal/cgroup-pool"
//! overhead_mib = 64                            # host memory beyond guest RAM
//!
//! [limits]                                     # what one (hostile) guest can make the host hold
//! console_log_max_kib = 1024                   # guest console kept in console.log
//! vsock_max_connections = 1023                 # open vsock connections, both directions
//! vsock_max_pending_rsts = 256                 # RSTs queued for a guest that takes none
//! vsock_shutdown_timeout_ms = 2000             # a shut-down connection waits this for the guest
//! pids_max = 1024                              # tasks in the sandbox's host cgroup
//! max_open_files = 262144                      # the shim's RLIMIT_NOFILE (virtio-fs fds)
//! ```
//!
//! Annotations on the sandbox's spec: `io.shoal.vm.vcpus`, `io.shoal.vm.memory_mib`. Any other
//! `io.shoal.*` annotation is refused, so a typo does not silently give a default-sized VM.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::host_cgroups::{Driver, PoolConfig};

/// Environment variable naming the config file (containerd passes its environment to shims).
pub const CONFIG_ENV: &str = "SHOAL_CONFIG";
/// Where the config file lives when `SHOAL_CONFIG` is not set.
pub const DEFAULT_CONFIG: &str = "/etc/shoal/config.toml";
/// Annotation: vCPUs of the sandbox VM.
pub const ANNOTATION_VCPUS: &str = "io.shoal.vm.vcpus";
/// Annotation: memory of the sandbox VM in MiB.
pub const ANNOTATION_MEMORY: &str = "io.shoal.vm.memory_mib";
const ANNOTATION_PREFIX: &str = "io.shoal.";

/// Errors in configuration; each names the file or annotation at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read shoal config {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("shoal config {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("unknown annotation {0:?} (shoal knows {ANNOTATION_VCPUS} and {ANNOTATION_MEMORY})")]
    UnknownAnnotation(String),
    #[error("runtime options: {0}")]
    Options(String),
    #[error("annotation {key}={value:?}: {reason}")]
    BadAnnotation {
        key: String,
        value: String,
        reason: String,
    },
}

/// Everything the shim needs to start a sandbox.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub log_level: String,
    pub state_dir: PathBuf,
    pub agent_timeout_secs: u64,
    pub kernel_cmdline: String,
    /// Give the host back the pages each guest frees (virtio-balloon free page reporting).
    pub free_page_reporting: bool,
    /// Host memory kept free: a sandbox start is refused (with an error saying so) while
    /// the host's available memory is below this plus what a sandbox needs to start.
    pub host_reserve_mib: u64,
    /// Start sandboxes by restoring the VM template made for their size (`scripts/template`)
    /// instead of booting the guest.
    pub template: bool,
    /// Where templates live, one directory per VM size (`256m-1c`).
    pub template_dir: PathBuf,
    /// How the VMM's threads are confined (`shoal_vmm::confine`): `enforce`, `log` (calls
    /// outside a thread's list are allowed and logged by the kernel) or `off`.
    pub confine: String,
    /// A starting shim cleans the sandbox directories of shims that died ([`crate::sweep`])
    /// if no shim did in the last this many seconds (0: every start does).
    pub sweep_secs: u64,
    /// Host cgroups for sandboxes.
    pub cgroups: CgroupsConfig,
    /// Bounds on what one guest can make the host hold.
    pub limits: LimitsConfig,
}

/// `[limits]`: what one guest, which may be hostile, can make the host hold. Each bounds a
/// host resource the guest could otherwise grow without end; docs/architecture.md ("The
/// guest trust boundary") says what the guest gets past each.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Guest console output kept in the sandbox's `console.log`; the rest is dropped.
    pub console_log_max_kib: u64,
    /// vsock connections open at once, both directions; more are refused with an RST.
    pub vsock_max_connections: usize,
    /// RST packets queued for the guest; past it, stray packets get no answer.
    pub vsock_max_pending_rsts: usize,
    /// How long a connection shut down by the host waits for the guest to close it.
    pub vsock_shutdown_timeout_ms: u64,
    /// `pids.max` of the sandbox's host cgroup (the shim's and VMM's threads).
    pub pids_max: u64,
    /// The serving shim's RLIMIT_NOFILE, set on purpose rather than inherited from
    /// containerd: it bounds the descriptors the virtio-fs server holds for the guest.
    pub max_open_files: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let vm = shoal_vmm::GuestLimits::default();
        LimitsConfig {
            console_log_max_kib: vm.console_max_bytes >> 10,
            vsock_max_connections: vm.vsock_max_connections,
            vsock_max_pending_rsts: vm.vsock_max_pending_rsts,
            vsock_shutdown_timeout_ms: vm.vsock_shutdown_timeout.as_millis() as u64,
            pids_max: 1024,
            max_open_files: 262144,
        }
    }
}

/// `[cgroups]`: each sandbox's shim (which holds its VM) runs in a host cgroup claimed from a
/// pool created ahead of time (`crate::host_cgroups`), its memory limit the VM's RAM plus
/// `overhead_mib`, its CPU quota the container's.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CgroupsConfig {
    /// Off: sandboxes stay in containerd's cgroup, unlimited on the host.
    pub enabled: bool,
    /// Where the cgroup file systems are mounted.
    pub root: PathBuf,
    /// Parent cgroup of the pool (`shoal`, or `shoal.slice` with the systemd driver).
    pub parent: String,
    /// `cgroupfs` (`shoal/slot-0007`) or `systemd` (`shoal.slice/shoal-slot-0007.scope`).
    pub driver: Driver,
    /// Number of pooled cgroups: the most sandboxes this host runs at once.
    pub pool_size: usize,
    /// Claim files.
    pub state_dir: PathBuf,
    /// Host memory a sandbox may use beyond its guest RAM (VMM threads, device buffers, the
    /// shim itself).
    pub overhead_mib: u64,
}

/// Smallest `limits.pids_max` accepted: a serving shim with its VMM runs about 30 threads.
pub const MIN_PIDS_MAX: u64 = 64;
/// Smallest `limits.max_open_files` accepted: the shim's own sockets, fifos and files.
pub const MIN_OPEN_FILES: u64 = 256;

/// Smallest VM RAM accepted (config, annotation), in MiB.
pub const MIN_MEMORY_MIB: u64 = 64;
/// Largest VM RAM accepted (config, annotation, a container's memory limit), in MiB: 1 TiB.
/// The VMM refuses more than the host has; this bound keeps the shim's own arithmetic on it
/// (host cgroup limits in bytes) far from overflow whatever a pod asks.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Largest `cgroups.overhead_mib` accepted.
pub const MAX_OVERHEAD_MIB: u64 = 1 << 20;

/// Smallest `overhead_mib` accepted: an idle shim with its VMM already needs about this much.
pub const MIN_OVERHEAD_MIB: u64 = 16;

impl Default for CgroupsConfig {
    fn default() -> Self {
        let pool = PoolConfig::default();
        CgroupsConfig {
            enabled: true,
            root: pool.root,
            parent: pool.parent,
            driver: pool.driver,
            pool_size: 256,
            state_dir: pool.state_dir,
            overhead_mib: 64,
        }
    }
}

impl CgroupsConfig {
    pub fn pool_config(&self) -> PoolConfig {
        PoolConfig {
            root: self.root.clone(),
            parent: self.parent.clone(),
            driver: self.driver,
            size: self.pool_size,
            state_dir: self.state_dir.clone(),
            memory_overhead: self.overhead_mib << 20,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kernel: "/usr/share/shoal/vmlinux".into(),
            initrd: "/usr/share/shoal/shoal-agent.img".into(),
            vcpus: 1,
            memory_mib: 256,
            log_level: "info".into(),
            state_dir: "/run/shoal".into(),
            agent_timeout_secs: 60,
            kernel_cmdline: shoal_vmm::DEFAULT_CMDLINE.into(),
            free_page_reporting: true,
            host_reserve_mib: 256,
            template: false,
            template_dir: "/var/lib/shoal/templates".into(),
            confine: "enforce".into(),
            sweep_secs: 60,
            cgroups: CgroupsConfig::default(),
            limits: LimitsConfig::default(),
        }
    }
}

impl Config {
    /// How the VMM's threads are confined (checked when the config was read).
    pub fn confine_mode(&self) -> shoal_vmm::confine::Mode {
        self.confine
            .parse()
            .unwrap_or(shoal_vmm::confine::Mode::Enforce)
    }

    /// The VM's share of `[limits]`.
    pub fn guest_limits(&self) -> shoal_vmm::GuestLimits {
        let l = &self.limits;
        shoal_vmm::GuestLimits {
            console_max_bytes: l.console_log_max_kib.saturating_mul(1024),
            vsock_max_connections: l.vsock_max_connections,
            vsock_max_pending_rsts: l.vsock_max_pending_rsts,
            vsock_shutdown_timeout: std::time::Duration::from_millis(l.vsock_shutdown_timeout_ms),
        }
    }

    /// Reads the config file: `$SHOAL_CONFIG` if set (it must exist), else
    /// `/etc/shoal/config.toml` if present, else the defaults.
    pub fn load() -> Result<Config, ConfigError> {
        match std::env::var_os(CONFIG_ENV) {
            Some(path) => Config::from_file(Path::new(&path)),
            None if Path::new(DEFAULT_CONFIG).exists() => {
                Config::from_file(Path::new(DEFAULT_CONFIG))
            }
            None => Ok(Config::default()),
        }
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            cause: source,
        })?;
        Config::from_toml(&text, path)
    }

    /// Parses and checks the config file's text; `path` is what errors name.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        if config.vcpus == 0 || !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&config.memory_mib) {
            return Err(ConfigError::Parse {
                path: path.into(),
                message: format!(
                    "vcpus must be at least 1 and memory_mib from {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} (got {} and {})",
                    config.vcpus, config.memory_mib
                ),
            });
        }
        if let Err(message) = config.confine.parse::<shoal_vmm::confine::Mode>() {
            return Err(ConfigError::Parse {
                path: path.into(),
                message,
            });
        }
        let cg = &config.cgroups;
        let overhead = MIN_OVERHEAD_MIB..=MAX_OVERHEAD_MIB;
        if cg.enabled && (cg.pool_size == 0 || !overhead.contains(&cg.overhead_mib)) {
            return Err(ConfigError::Parse {
                path: path.into(),
                message: format!(
                    "cgroups.pool_size must be at least 1 and cgroups.overhead_mib from {MIN_OVERHEAD_MIB} to {MAX_OVERHEAD_MIB} (got {} and {})",
                    cg.pool_size, cg.overhead_mib
                ),
            });
        }
        let l = &config.limits;
        if l.console_log_max_kib == 0
            || l.vsock_max_connections == 0
            || l.vsock_max_pending_rsts == 0
            || l.vsock_shutdown_timeout_ms == 0
            || l.pids_max < MIN_PIDS_MAX
            || l.max_open_files < MIN_OPEN_FILES
        {
            return Err(ConfigError::Parse {
                path: path.into(),
                message: format!(
                    "limits: console_log_max_kib, vsock_max_connections, vsock_max_pending_rsts and vsock_shutdown_timeout_ms must be at least 1, pids_max at least {MIN_PIDS_MAX} and max_open_files at least {MIN_OPEN_FILES} (got {l:?})"
                ),
            });
        }
        Ok(config)
    }

    /// Applies the sandbox's sizing annotations; refuses unknown `io.shoal.*` keys.
    pub fn apply_annotations(
        &mut self,
        annotations: &HashMap<String, String>,
    ) -> Result<(), ConfigError> {
        for (key, value) in annotations {
            if !key.starts_with(ANNOTATION_PREFIX) {
                continue;
            }
            let bad = |reason: &str| ConfigError::BadAnnotation {
                key: key.clone(),
                value: value.clone(),
                reason: reason.into(),
            };
            match key.as_str() {
                ANNOTATION_VCPUS => {
                    self.vcpus = value
                        .parse()
                        .ok()
                        .filter(|v| (1..=64).contains(v))
                        .ok_or_else(|| bad("expected a number of vCPUs from 1 to 64"))?;
                }
                ANNOTATION_MEMORY => {
                    self.memory_mib = value
                        .parse()
                        .ok()
                        .filter(|v| (MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(v))
                        .ok_or_else(|| {
                            bad(&format!(
                                "expected MiB, from {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}"
                            ))
                        })?;
                }
                _ => return Err(ConfigError::UnknownAnnotation(key.clone())),
            }
        }
        Ok(())
    }
}

/// The config file named by containerd's runtime options (`runtimeoptions.v1.Options`, what
/// CRI's `ConfigPath` and `ctr run --runtime-config-path` send), if any. Other option types
/// are refused: shoal would not know what they ask for.
pub fn config_path_option(
    any: &containerd_shim_protos::protobuf::well_known_types::any::Any,
) -> Result<Option<PathBuf>, ConfigError> {
    if any.type_url.is_empty() && any.value.is_empty() {
        return Ok(None);
    }
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return Err(ConfigError::Options(format!(
            "runtime options of type {:?} are not shoal's (use ConfigPath: runtimeoptions.v1.Options)",
            any.type_url
        )));
    }
    // message Options { string type_url = 1; string config_path = 2; }
    let mut input = containerd_shim_protos::protobuf::CodedInputStream::from_bytes(&any.value);
    let bad = |e: containerd_shim_protos::protobuf::Error| ConfigError::Options(e.to_string());
    let mut path = None;
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(bad)? {
        match tag {
            18 => path = Some(input.read_string().map_err(bad)?),
            other => {
                let wire = containerd_shim_protos::protobuf::rt::WireType::new(other & 7)
                    .ok_or_else(|| ConfigError::Options(format!("bad field tag {other}")))?;
                input.skip_field(wire).map_err(bad)?;
            }
        }
    }
    Ok(path.filter(|p| !p.is_empty()).map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let dir = std::env::temp_dir().join(format!("shoal-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("config.toml");
        std::fs::write(&p, "vcpus = 2\nmemory_mib = 512\n").unwrap();
        let c = Config::from_file(&p).unwrap();
        assert_eq!((c.vcpus, c.memory_mib), (2, 512));
        assert_eq!(c.kernel, Config::default().kernel);
        std::fs::write(&p, "vcpu = 2\n").unwrap();
        let e = Config::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("vcpu") && e.contains("config.toml"), "{e}");
        std::fs::write(&p, "memory_mib = 8\n").unwrap();
        assert!(Config::from_file(&p).is_err());
        let e = Config::from_file(&dir.join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.toml"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cgroups_section_is_read_and_checked() {
        let dir = std::env::temp_dir().join(format!("shoal-config-cg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("config.toml");
        std::fs::write(
            &p,
            "memory_mib = 128\n[cgroups]\ndriver = \"systemd\"\npool_size = 9\noverhead_mib = 32\n",
        )
        .unwrap();
        let c = Config::from_file(&p).unwrap();
        assert_eq!(c.cgroups.driver, Driver::Systemd);
        let pool = c.cgroups.pool_config();
        assert_eq!((pool.size, pool.memory_overhead), (9, 32 << 20));
        assert_eq!(pool.parent, "shoal");
        for (bad, named) in [
            ("[cgroups]\noverhead_mib = 4\n", "overhead_mib"),
            ("[cgroups]\npool_size = 0\n", "pool_size"),
            ("[cgroups]\ndriver = \"cgroupv3\"\n", "cgroupv3"),
            ("[cgroups]\npool = 3\n", "pool"),
        ] {
            std::fs::write(&p, bad).unwrap();
            let e = Config::from_file(&p).unwrap_err().to_string();
            assert!(e.contains(named), "{bad}: {e}");
        }
        // Turned off, the pool's settings are not checked.
        std::fs::write(&p, "[cgroups]\nenabled = false\noverhead_mib = 0\n").unwrap();
        assert!(!Config::from_file(&p).unwrap().cgroups.enabled);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn runtime_options_name_a_config_file() {
        use containerd_shim_protos::protobuf::well_known_types::any::Any;
        // type_url = "x", config_path = "/etc/shoal/other.toml"
        let mut value = vec![10, 1, b'x', 18, 21];
        value.extend_from_slice(b"/etc/shoal/other.toml");
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value,
            ..Default::default()
        };
        assert_eq!(
            config_path_option(&any).unwrap(),
            Some(PathBuf::from("/etc/shoal/other.toml"))
        );
        assert_eq!(config_path_option(&Any::default()).unwrap(), None);
        let runc = Any {
            type_url: "containerd.runc.v1.Options".into(),
            ..Default::default()
        };
        let e = config_path_option(&runc).unwrap_err().to_string();
        assert!(e.contains("containerd.runc.v1.Options"), "{e}");
    }

    #[test]
    fn annotations_size_the_vm_and_typos_are_refused() {
        let mut c = Config::default();
        let a = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        c.apply_annotations(&a(&[
            (ANNOTATION_VCPUS, "2"),
            (ANNOTATION_MEMORY, "300"),
            ("other", "x"),
        ]))
        .unwrap();
        assert_eq!((c.vcpus, c.memory_mib), (2, 300));
        let e = c
            .apply_annotations(&a(&[("io.shoal.vm.cpus", "2")]))
            .unwrap_err();
        assert!(e.to_string().contains("io.shoal.vm.cpus"));
        let e = c
            .apply_annotations(&a(&[(ANNOTATION_VCPUS, "0")]))
            .unwrap_err();
        assert!(e.to_string().contains("1 to 64"));
    }
}
