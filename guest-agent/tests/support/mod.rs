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
