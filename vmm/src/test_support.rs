//! Test helpers for the virtio devices: descriptors, and randomised inputs for the parser
//! tests ("fuzzing" with a fixed seed, so any failure can be replayed): random descriptor
//! chains laid out in real guest memory.
#![cfg(test)]

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A split-ring descriptor.
pub fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// A descriptor chained to `next`, device-writable when `write`.
pub fn chained(addr: u64, len: u32, write: bool, next: u16) -> RawDescriptor {
    desc(
        addr,
        len,
        VRING_DESC_F_NEXT | if write { VRING_DESC_F_WRITE } else { 0 },
        next,
    )
}

/// xorshift64: small, deterministic, good enough to spread inputs.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Guest memory size the fuzz tests use.
pub const MEM_SIZE: u64 = 0x10_0000;

/// Random bytes over the first 64 KiB of buffers, then a random chain of 1..=6 descriptors
/// whose addresses are sometimes outside guest memory and whose lengths are sometimes huge.
pub fn random_chain(rng: &mut Rng, mem: &GuestMemoryMmap) -> Vec<RawDescriptor> {
    let noise: Vec<u8> = (0..256).map(|_| rng.next() as u8).collect();
    for i in 0..16u64 {
        let _ = mem.write_slice(&noise, GuestAddress(0x2_0000 + i * 0x1000));
    }
    let n = 1 + rng.below(6);
    (0..n)
        .map(|i| {
            let addr = match rng.below(8) {
                0 => MEM_SIZE - rng.below(64),
                1 => rng.next(),
                _ => 0x2_0000 + rng.below(16) * 0x1000 + rng.below(64),
            };
            let len = match rng.below(6) {
                0 => 0,
                1 => rng.next() as u32,
                _ => rng.below(5000) as u32,
            };
            let mut flags = if rng.below(2) == 0 {
                VRING_DESC_F_WRITE
            } else {
                0
            };
            if i + 1 < n {
                flags |= VRING_DESC_F_NEXT;
            }
            RawDescriptor::from(SplitDescriptor::new(
                addr,
                len,
                flags as u16,
                (i + 1) as u16,
            ))
        })
        .collect()
}
