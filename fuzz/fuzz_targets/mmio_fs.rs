#![no_main]
//! See `shoal_vmm::fuzz::mmio_fs`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_vmm::fuzz::mmio_fs(data));
