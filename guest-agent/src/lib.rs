//! shoal-agent: PID 1 of a shoal micro-VM. It takes orders from the shim over ttrpc and runs
//! the pod's OCI containers with youki's libcontainer.
//!
//! Modules: `service` (ttrpc requests → `sandbox`), `sandbox` (containers and processes),
//! `stdio` (process streams over separate connections), `reaper` (child exits),
//! `spawn` (the helper that makes container processes), `exec_seccomp` (an exec'd
//! process under its container's seccomp profile), `cgroup` (stats, updates, OOM), `init` (PID 1 set-up), `network` (the pod's interfaces
//! and routes in the guest), `error`.
pub mod cgroup;
pub mod error;
pub mod exec_seccomp;
pub mod init;
pub mod network;
pub mod reaper;
pub mod sandbox;
pub mod service;
pub mod spawn;
pub mod stdio;
