//! The Intel MultiProcessor table, which tells a guest without ACPI how many CPUs it has and
//! where its IOAPIC is, and how ISA interrupt lines reach it.
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{APIC_START, EBDA_START, IOAPIC_PINS, IOAPIC_START};

/// Errors from writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs requested; the MP table supports 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

// By hand, not `#[from]`: the messages carry the cause, so it is not also a `source()`
// (printed once, not twice, by a walk of the chain).
impl From<vm_memory::GuestMemoryError> for MpTableError {
    fn from(e: vm_memory::GuestMemoryError) -> Self {
        MpTableError::Write(e)
    }
}

/// Most vCPUs shoal gives one guest (the guest kernel is built with NR_CPUS=64).
pub const MAX_VCPUS: u8 = 64;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
// Family 6 signature and "has FPU, has APIC" feature flags.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The floating pointer and configuration table for `vcpus` CPUs, as laid at `base`.
pub fn build(vcpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::VcpuCount(vcpus));
    }
    let ioapic_id = vcpus;
    let table_addr = base as u32 + 16;

    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        entries.extend_from_slice(&[
            0,
            cpu,
            APIC_VERSION,
            CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 },
        ]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 2;
    for pin in 0..IOAPIC_PINS as u8 {
        // Interrupt type INT, default polarity and trigger, ISA bus line `pin` -> IOAPIC pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 is ExtINT (the 8259), LINT1 is NMI on every local APIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let length = 44 + entries.len() as u16;
    let mut table = Vec::with_capacity(length as usize);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"SHOAL   ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended length + checksum + reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length in 16-byte units, revision, checksum, features
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    Ok(fp)
}

/// Writes the MP table into the EBDA.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MpTableError> {
    let bytes = build(vcpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        for vcpus in [1u8, 2, 8, 64] {
            let t = build(vcpus, EBDA_START).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, EBDA_START + 16);
            let cfg = &t[16..];
            assert_eq!(&cfg[..4], b"PCMP");
            let len = u16::from_le_bytes(cfg[4..6].try_into().unwrap()) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(sum(cfg), 0, "configuration table checksum");
            let entries = u16::from_le_bytes(cfg[34..36].try_into().unwrap());
            assert_eq!(entries, vcpus as u16 + 2 + IOAPIC_PINS as u16 + 2);
            // Exactly one bootstrap processor, CPU 0.
            let bsps = (0..vcpus as usize)
                .filter(|i| cfg[44 + 20 * i + 3] & CPU_BOOTSTRAP != 0)
                .count();
            assert_eq!(bsps, 1);
            assert_eq!(cfg[44 + 3] & CPU_BOOTSTRAP, CPU_BOOTSTRAP);
        }
    }

    #[test]
    fn vcpu_count_is_bounded() {
        assert!(matches!(
            build(0, EBDA_START),
            Err(MpTableError::VcpuCount(0))
        ));
        assert!(matches!(
            build(65, EBDA_START),
            Err(MpTableError::VcpuCount(65))
        ));
    }
}
