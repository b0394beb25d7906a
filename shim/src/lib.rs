//! containerd shim v2 for shoal. The Task service arrives with issue #5; what exists is the
//! host side of sandbox cgroups: [`host_cgroups`], a pool of pre-created cgroups.
pub mod host_cgroups;
