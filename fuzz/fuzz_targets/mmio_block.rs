#![no_main]
//! See `shoal_vmm::fuzz::mmio_block`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_vmm::fuzz::mmio_block(data));
