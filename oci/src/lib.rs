//! shoal's spec layer: what the shim reads from a container's OCI spec, as pure functions
//! over `oci_spec::runtime::Spec` (the shim's version, 0.9) with a typed error.
//!
//! - [`load_spec`]: a bundle's `config.json`, checked for what a container needs;
//! - [`sandbox_id`]: the sandbox (CRI pod) a container belongs to;
//! - [`cpu_quota_of`], [`memory_limit_mib`]: the resources that size the sandbox.
//!
//! The shim sends the spec on to the guest agent as JSON, which the agent reads with
//! oci-spec 0.10 (libcontainer's); `tests/spec_round_trip.rs` checks that the two read
//! the same specs alike.
use std::path::{Path, PathBuf};

pub use oci_spec::runtime::Spec;

/// CRI's annotation saying whether a container is a pod's sandbox or one of its others.
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation naming the pod sandbox a container belongs to.
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// What is wrong with a bundle's spec; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("invalid OCI spec {path}: {cause}")]
    Invalid { path: PathBuf, cause: String },
    #[error("{0}: no process to run")]
    NoProcess(PathBuf),
    #[error("{0}: no root file system")]
    NoRoot(PathBuf),
    #[error("host IPC is not supported: a sandbox VM cannot share the host's IPC namespace (the spec has no ipc namespace; in Kubernetes, hostIPC: true)")]
    HostIpc,
}

/// Reads the bundle's `config.json` and checks that it has a process and a root.
pub fn load_spec(bundle: &Path) -> Result<Spec, SpecError> {
    let path = bundle.join("config.json");
    let spec = Spec::load(&path).map_err(|e| SpecError::Invalid {
        path: path.clone(),
        cause: e.to_string(),
    })?;
    if spec.process().is_none() {
        return Err(SpecError::NoProcess(path));
    }
    if spec.root().is_none() {
        return Err(SpecError::NoRoot(path));
    }
    Ok(spec)
}

/// Refuses what a VM cannot honour in the spec's namespaces: the host's IPC namespace
/// (no `ipc` entry), whose shared memory and message queues a guest cannot reach. (The
/// host's network namespace is refused where the network is read, naming the namespace.)
pub fn check_namespaces(spec: &Spec) -> Result<(), SpecError> {
    use oci_spec::runtime::LinuxNamespaceType;
    let has_ipc = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|n| n.iter().any(|ns| ns.typ() == LinuxNamespaceType::Ipc));
    match has_ipc {
        true => Ok(()),
        false => Err(SpecError::HostIpc),
    }
}

/// The sandbox a container belongs to: its CRI pod for a pod's other containers, else
/// itself (a pod's sandbox container, or a plain `ctr run`).
pub fn sandbox_id(spec: &Spec, container_id: &str) -> String {
    let annotations = spec.annotations().clone().unwrap_or_default();
    match annotations.get(CRI_CONTAINER_TYPE).map(String::as_str) {
        Some("container") => annotations
            .get(CRI_SANDBOX_ID)
            .cloned()
            .unwrap_or_else(|| container_id.to_string()),
        _ => container_id.to_string(),
    }
}

/// A container's CPU quota (none unless positive) and period, in microseconds.
pub fn cpu_quota_of(
    resources: Option<&oci_spec::runtime::LinuxResources>,
) -> (Option<u64>, Option<u64>) {
    let cpu = resources.and_then(|r| r.cpu().as_ref());
    (
        cpu.and_then(|c| c.quota())
            .filter(|q| *q > 0)
            .map(|q| q as u64),
        cpu.and_then(|c| c.period()),
    )
}

/// The container's memory limit in MiB, rounded up (none unless positive).
pub fn memory_limit_mib(spec: &Spec) -> Option<u64> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .filter(|l| *l > 0)
        .map(|l| (l as u64).div_ceil(1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shoal-oci-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn bundle_specs_are_checked_and_errors_name_the_file() {
        let dir = scratch("load");
        let e = load_spec(&dir).unwrap_err().to_string();
        assert!(
            e.starts_with("invalid OCI spec") && e.contains("config.json"),
            "{e}"
        );
        std::fs::write(
            dir.join("config.json"),
            r#"{"ociVersion": "1.0.2", "root": {"path": "rootfs"}}"#,
        )
        .unwrap();
        let e = load_spec(&dir).unwrap_err();
        assert!(matches!(e, SpecError::NoProcess(_)), "{e}");
        std::fs::write(
            dir.join("config.json"),
            r#"{"ociVersion": "1.0.2",
                "process": {"cwd": "/", "args": ["true"], "user": {"uid": 0, "gid": 0}}}"#,
        )
        .unwrap();
        assert!(matches!(load_spec(&dir), Err(SpecError::NoRoot(_))));
        std::fs::write(
            dir.join("config.json"),
            r#"{"ociVersion": "1.0.2",
                "process": {"cwd": "/", "args": ["true"], "user": {"uid": 0, "gid": 0}},
                "root": {"path": "rootfs"}}"#,
        )
        .unwrap();
        load_spec(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(load_spec(&dir)
            .unwrap_err()
            .to_string()
            .contains("config.json"));
    }

    #[test]
    fn host_ipc_is_refused_and_a_joined_ipc_namespace_is_not() {
        let with = |namespaces: &str| {
            serde_json_like(&format!(
                r#"{{"ociVersion": "1.0.2", "linux": {{"namespaces": [{namespaces}]}}}}"#
            ))
        };
        let e = check_namespaces(&with(r#"{"type": "pid"}, {"type": "network"}"#)).unwrap_err();
        assert!(
            e.to_string().starts_with("host IPC is not supported"),
            "{e}"
        );
        check_namespaces(&with(r#"{"type": "ipc"}"#)).unwrap();
        check_namespaces(&with(r#"{"type": "ipc", "path": "/proc/7/ns/ipc"}"#)).unwrap();
    }

    #[test]
    fn cri_containers_join_their_pod_sandbox() {
        let mut spec = Spec::default();
        assert_eq!(sandbox_id(&spec, "c1"), "c1");
        let mut a = HashMap::new();
        a.insert(CRI_CONTAINER_TYPE.to_string(), "container".to_string());
        a.insert(CRI_SANDBOX_ID.to_string(), "pod1".to_string());
        spec.set_annotations(Some(a.clone()));
        assert_eq!(sandbox_id(&spec, "c1"), "pod1");
        a.insert(CRI_CONTAINER_TYPE.to_string(), "sandbox".to_string());
        spec.set_annotations(Some(a));
        assert_eq!(sandbox_id(&spec, "pod1"), "pod1");
    }

    #[test]
    fn resources_read_as_the_sandbox_is_sized() {
        let spec: Spec = serde_json_like(
            r#"{"ociVersion": "1.0.2", "linux": {"resources": {
                "memory": {"limit": 314572801},
                "cpu": {"quota": 50000, "period": 100000}}}}"#,
        );
        assert_eq!(memory_limit_mib(&spec), Some(301));
        let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
        assert_eq!(cpu_quota_of(resources), (Some(50000), Some(100000)));
        let spec: Spec = serde_json_like(
            r#"{"ociVersion": "1.0.2", "linux": {"resources": {
                "memory": {"limit": -1}, "cpu": {"quota": -1}}}}"#,
        );
        assert_eq!(memory_limit_mib(&spec), None);
        let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
        assert_eq!(cpu_quota_of(resources), (None, None));
        assert_eq!(memory_limit_mib(&Spec::default()), None);
    }

    /// A spec from JSON text, through the loader's own path (a file).
    fn serde_json_like(text: &str) -> Spec {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = scratch(&format!("json{n}"));
        let path = dir.join("config.json");
        std::fs::write(&path, text).unwrap();
        let spec = Spec::load(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        spec
    }
}
