//! containerd shim v2 for shoal. The Task service arrives with issue #5; nothing here yet.
