#![no_main]
//! See `shoal_vmm::fuzz::mmio_vsock`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_vmm::fuzz::mmio_vsock(data));
