#![no_main]
//! See `shoal_vmm::fuzz::snapshot_state`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_vmm::fuzz::snapshot_state(data));
