//! Helpers shared by the agent's integration tests.
#![allow(dead_code)]
use oci_spec::runtime::{ProcessBuilder, Spec};

/// runc's default spec (namespaces, mounts, capabilities) running `args` with PATH=/bin.
pub fn spec(args: &[&str]) -> Spec {
    let mut spec = Spec::default();
    let process = ProcessBuilder::default()
        .args(args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .env(vec!["PATH=/bin".to_string()])
        .cwd("/")
        .terminal(false)
        .build()
        .unwrap();
    spec.set_process(Some(process));
    spec
}

/// Removes container `id` through the agent's client (`force`: running or not).
pub async fn remove_container(
    client: &shoal_agent_api::agent_ttrpc::AgentClient,
    id: &str,
    force: bool,
) {
    let req = shoal_agent_api::agent::RemoveContainerRequest {
        container_id: id.into(),
        force,
        ..Default::default()
    };
    client
        .remove_container(ttrpc::context::with_timeout(30_000_000_000), &req)
        .await
        .unwrap();
}
