//! Helpers shared by the shim's integration tests.
pub mod containerd;
pub mod netns;
