#![no_main]
//! See `shoal_vmm::fuzz::fuse_session`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_vmm::fuzz::fuse_session(data));
