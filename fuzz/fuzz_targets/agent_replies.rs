#![no_main]
//! See `containerd_shim_shoal_v2::fuzz::agent_replies`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| containerd_shim_shoal_v2::fuzz::agent_replies(data));
