#![no_main]
//! See `shoal_vmm::fuzz::vsock_muxer`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_vmm::fuzz::vsock_muxer(data));
