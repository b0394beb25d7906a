//! The shim reads a container's spec with oci-spec 0.9 and sends it to the guest agent as
//! JSON (`serde_json::to_vec(&spec)`), which reads it with oci-spec 0.10 (libcontainer's).
//! Each fixture goes that way, and what the agent reads must be what the shim sent: the
//! same JSON value, field for field (a field one version drops or renames would otherwise
//! vanish on the way into the guest, silently: a seccomp profile, a hook, a sysctl).
//!
//! Fixtures (`tests/fixtures/`): `ctr-default.json` is containerd 1.6's own default spec
//! (`ctr oci spec`); `cri-pod-container.json` is shaped as containerd's CRI plugin writes
//! a pod's app container (CRI annotations, joined namespaces by path, a seccomp profile with
//! argument filters, sysctls, devices and unified cgroup resources, hooks, read-only root,
//! masked and read-only paths, a `rslave` volume), written here to cover what CRI can set.
use std::path::Path;

fn round_trip(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let text = std::fs::read_to_string(dir.join(name)).unwrap();
    let shim: shoal_oci::Spec = serde_json::from_str(&text).expect("the shim reads it");
    let sent = serde_json::to_vec(&shim).unwrap();
    let agent: oci_spec_guest::runtime::Spec =
        serde_json::from_slice(&sent).expect("the agent reads what the shim sends");
    let sent = normalized(serde_json::from_slice(&sent).unwrap());
    let read = normalized(serde_json::to_value(&agent).unwrap());
    assert_eq!(
        read, sent,
        "{name}: the agent's reading differs from what the shim sent"
    );
    // And the shim sends what containerd wrote, nothing lost or added on its side.
    let original = normalized(serde_json::from_str(&text).unwrap());
    assert_eq!(
        sent, original,
        "{name}: the shim's reading differs from the file"
    );
}

/// `spec` with its capability sets sorted: both versions hold them as hash sets, which
/// come out in any order (the order means nothing to the kernel).
fn normalized(mut spec: serde_json::Value) -> serde_json::Value {
    if let Some(caps) = spec
        .pointer_mut("/process/capabilities")
        .and_then(|c| c.as_object_mut())
    {
        for set in caps.values_mut() {
            if let Some(list) = set.as_array_mut() {
                list.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
            }
        }
    }
    spec
}

#[test]
fn containerds_default_spec_reaches_the_agent_as_sent() {
    round_trip("ctr-default.json");
}

#[test]
fn a_cri_pod_containers_spec_reaches_the_agent_as_sent() {
    round_trip("cri-pod-container.json");
}
