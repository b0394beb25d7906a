#![no_main]
//! See `shoal_vmm::fuzz::block_request`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_vmm::fuzz::block_request(data));
