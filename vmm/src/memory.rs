//! Guest RAM: how it is laid out, how it is mapped, and the e820 map the guest sees.
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// Errors from setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size must be at least 16 MiB, got {0} MiB")]
    TooSmall(u64),
    #[error(
        "guest memory of {requested_mib} MiB is larger than this host's {host_mib} MiB of RAM"
    )]
    LargerThanHost { requested_mib: u64, host_mib: u64 },
    #[error("cannot map {mib} MiB of guest memory: {cause}")]
    Map {
        mib: u64,
        cause: vm_memory::mmap::FromRangesError,
    },
}

/// Smallest guest the layout supports (kernel, initramfs and page tables must fit).
pub const MIN_MEMORY_MIB: u64 = 16;

/// e820 entry types the guest understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

/// One entry of the e820 map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

/// Guest-physical RAM ranges for `size` bytes of RAM: below the MMIO gap, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// The e820 map for `size` bytes of RAM. The EBDA and the legacy hole are left out of RAM so
/// the MP table we write there is not overwritten.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820Kind::Reserved,
        },
    ];
    let low_end = size.min(MMIO_GAP_START);
    map.push(E820Entry {
        addr: HIMEM_START,
        size: low_end - HIMEM_START,
        kind: E820Kind::Ram,
    });
    if size > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: size - MMIO_GAP_START,
            kind: E820Kind::Ram,
        });
    }
    map
}

/// Host RAM in MiB, from /proc/meminfo (None when it cannot be read).
fn host_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Checks a requested guest size against the layout's minimum and the host's RAM.
pub fn validate_size(mib: u64) -> Result<(), MemoryError> {
    if mib < MIN_MEMORY_MIB {
        return Err(MemoryError::TooSmall(mib));
    }
    if let Some(host_mib) = host_memory_mib() {
        if mib > host_mib {
            return Err(MemoryError::LargerThanHost {
                requested_mib: mib,
                host_mib,
            });
        }
    }
    Ok(())
}

/// Maps guest RAM. The mapping is anonymous, private and MAP_NORESERVE (vm-memory's default
/// for anonymous regions): a page costs the host nothing until the guest touches it.
pub fn create_guest_memory(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    validate_size(mib)?;
    GuestMemoryMmap::from_ranges(&ram_ranges(mib << 20))
        .map_err(|source| MemoryError::Map { mib, cause: source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_guest_has_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1], (GuestAddress(MMIO_GAP_END), (1 << 30) as usize));
    }

    #[test]
    fn e820_covers_ram_and_reserves_the_ebda() {
        let map = e820_map(128 << 20);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820Kind::Ram
            }
        );
        assert_eq!(map[1].kind, E820Kind::Reserved);
        assert_eq!(
            map[2],
            E820Entry {
                addr: HIMEM_START,
                size: (128 << 20) - HIMEM_START,
                kind: E820Kind::Ram
            }
        );
        assert_eq!(map.len(), 3);
        // RAM entries sum to the guest size less the 0x9fc00..0x100000 hole.
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (128 << 20) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn e820_above_4g() {
        let map = e820_map(5 << 30);
        let last = map.last().unwrap();
        assert_eq!(last.addr, MMIO_GAP_END);
        assert_eq!(last.size, (5 << 30) - MMIO_GAP_START);
        // Nothing is RAM inside the gap.
        assert!(map.iter().all(|e| e.kind != E820Kind::Ram
            || e.addr + e.size <= MMIO_GAP_START
            || e.addr >= MMIO_GAP_END));
    }

    #[test]
    fn sizes_are_validated() {
        assert!(matches!(validate_size(0), Err(MemoryError::TooSmall(0))));
        assert!(matches!(
            validate_size(1 << 30),
            Err(MemoryError::LargerThanHost { .. })
        ));
        validate_size(128).unwrap();
    }

    #[test]
    fn untouched_memory_costs_nothing() {
        // 1 GiB mapped; RSS must not grow by anywhere near that (MAP_NORESERVE, lazily backed).
        let rss_before = rss_kib();
        let mem = create_guest_memory(1024).unwrap();
        assert_eq!(mem.iter().map(|r| r.len()).sum::<u64>(), 1 << 30);
        let rss_after = rss_kib();
        assert!(
            rss_after < rss_before + 8 * 1024,
            "RSS grew from {rss_before} to {rss_after} KiB"
        );
    }

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}
