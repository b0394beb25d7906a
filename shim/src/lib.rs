//! containerd shim v2 for shoal: one shim process per sandbox (pod), which boots the sandbox's
//! micro-VM in-process and serves containerd's Task API against the guest agent.
//!
//! - [`admission`]: whether the host has memory for one more sandbox start;
//! - [`crashes`]: the flight recorder, reports of VMs that ended unasked;
//! - [`service`]: the shim's `start`/`delete` actions and the Task service;
//! - [`sandbox`]: the VM, its agent connection and state directory;
//! - [`vm_spec`]: the VM a sandbox runs, the same for templates;
//! - [`console`]: the guest console's last lines, bounded and printable;
//! - [`agent`]: agent call deadlines and what a failed call says;
//! - [`mounts`]: rootfs and volumes under the virtio-fs shared tree;
//! - [`oom`]: which of the guest's OOM events are published, and the poll's backoff;
//! - [`io`]: containerd's stdio fifos to and from the agent's streams;
//! - [`config`]: `/etc/shoal/config.toml` and sizing annotations;
//! - [`host_cgroups`]: a pool of pre-created sandbox cgroups;
//! - [`limits`]: the serving shim's own process limits (open files);
//! - [`network`]: the pod's network namespace carried into the VM (taps and tc redirects);
//! - [`sweep`]: sandbox directories of shims that died, cleaned by a later shim;
//! - [`template`]: VM templates, restored instead of booted when configured;
//! - `fuzz` (tests and the `fuzzing` feature): harnesses for agent replies and the config.
pub mod admission;
pub mod agent;
pub mod config;
pub mod console;
pub mod crashes;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod host_cgroups;
pub mod io;
pub mod limits;
pub mod mounts;
pub mod network;
pub mod oom;
pub mod sandbox;
pub mod service;
pub mod sweep;
pub mod template;
pub mod vm_spec;
