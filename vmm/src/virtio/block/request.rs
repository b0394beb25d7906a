//! virtio-blk requests: a descriptor chain turned into a typed request, or an error. The
//! parser only reads guest memory through vm-memory's checked accessors; bounds against the
//! disk are checked by the device, which knows its capacity.
use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};

pub const SECTOR_SIZE: u64 = 512;
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Length of the device id string GET_ID returns.
pub const ID_BYTES: u32 = 20;
const HEADER_LEN: u32 = 16;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Flush,
    GetId,
    Unsupported(u32),
}

/// A parsed request: what, where on the disk, which guest buffers, where the status goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    pub sector: u64,
    pub data: Vec<(GuestAddress, u32)>,
    pub status: GuestAddress,
}

impl Request {
    /// Total bytes of the data buffers.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|(_, l)| u64::from(*l)).sum()
    }
}

/// Why a chain is not a usable request. With `status: Some`, the driver can be told.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("empty descriptor chain")]
    Empty,
    #[error("request header descriptor is write-only or shorter than 16 bytes")]
    BadHeader,
    #[error("cannot read the request header at {0:#x}")]
    HeaderOutsideMemory(u64),
    #[error("no device-writable status byte at the end of the chain")]
    NoStatus,
    #[error("data descriptor at {addr:#x} has the wrong direction for a {kind:?} request")]
    WrongDirection { kind: Kind, addr: u64 },
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("descriptor at {addr:#x} (+{len}) is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
}

/// Parses a chain: header (readable), data (direction by type), status byte (writable).
pub fn parse<T>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<T>,
) -> Result<Request, (RequestError, Option<GuestAddress>)>
where
    T: Deref,
    T::Target: GuestMemory,
{
    let descs: Vec<_> = chain.collect();
    let (Some(head), Some(last)) = (descs.first(), descs.last()) else {
        return Err((RequestError::Empty, None));
    };
    // The status byte comes first in our checks so that every later error can be reported.
    let status = if descs.len() >= 2 && last.is_write_only() && last.len() >= 1 {
        let addr = last
            .addr()
            .checked_add(u64::from(last.len()) - 1)
            .filter(|a| mem.address_in_range(*a));
        addr.map(|_| last.addr())
    } else {
        None
    };
    let Some(status) = status else {
        return Err((RequestError::NoStatus, None));
    };
    let fail = |e| Err((e, Some(status)));
    if head.is_write_only() || head.len() < HEADER_LEN {
        return fail(RequestError::BadHeader);
    }
    let Ok(kind_raw) = mem.read_obj::<u32>(head.addr()) else {
        return fail(RequestError::HeaderOutsideMemory(head.addr().0));
    };
    let Ok(sector) = mem.read_obj::<u64>(GuestAddress(head.addr().0.wrapping_add(8))) else {
        return fail(RequestError::HeaderOutsideMemory(head.addr().0));
    };
    let kind = match kind_raw {
        T_IN => Kind::Read,
        T_OUT => Kind::Write,
        T_FLUSH => Kind::Flush,
        T_GET_ID => Kind::GetId,
        other => Kind::Unsupported(other),
    };
    let mut data = Vec::new();
    for d in &descs[1..descs.len() - 1] {
        let device_writes = matches!(kind, Kind::Read | Kind::GetId);
        if d.is_write_only() != device_writes && !matches!(kind, Kind::Flush | Kind::Unsupported(_))
        {
            return fail(RequestError::WrongDirection {
                kind,
                addr: d.addr().0,
            });
        }
        let end = d.addr().checked_add(u64::from(d.len()).saturating_sub(1));
        if d.len() == 0
            || !end.is_some_and(|e| mem.address_in_range(e))
            || !mem.address_in_range(d.addr())
        {
            return fail(RequestError::OutsideMemory {
                addr: d.addr().0,
                len: d.len(),
            });
        }
        data.push((d.addr(), d.len()));
    }
    let req = Request {
        kind,
        sector,
        data,
        status,
    };
    if matches!(kind, Kind::Read | Kind::Write) && !req.data_len().is_multiple_of(SECTOR_SIZE) {
        return fail(RequestError::Unaligned(req.data_len()));
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::chained;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// build_desc_chain links the descriptors itself, so `next` does not matter here.
    fn d(addr: u64, len: u32, write: bool) -> RawDescriptor {
        chained(addr, len, write, 0)
    }

    fn header(m: &GuestMemoryMmap, kind: u32, sector: u64) {
        m.write_obj(kind, GuestAddress(0x1000)).unwrap();
        m.write_obj(0u32, GuestAddress(0x1004)).unwrap();
        m.write_obj(sector, GuestAddress(0x1008)).unwrap();
    }

    fn parse_descs(
        m: &GuestMemoryMmap,
        descs: &[RawDescriptor],
    ) -> Result<Request, (RequestError, Option<GuestAddress>)> {
        let q = MockSplitQueue::new(m, 16);
        parse(m, q.build_desc_chain(descs).unwrap())
    }

    #[test]
    fn read_write_flush_and_get_id() {
        let m = mem();
        header(&m, T_IN, 7);
        let r = parse_descs(
            &m,
            &[
                d(0x1000, 16, false),
                d(0x2000, 1024, true),
                d(0x3000, 1, true),
            ],
        )
        .unwrap();
        assert_eq!(
            (r.kind, r.sector, r.data_len(), r.status),
            (Kind::Read, 7, 1024, GuestAddress(0x3000))
        );
        header(&m, T_OUT, 0);
        let r = parse_descs(
            &m,
            &[
                d(0x1000, 16, false),
                d(0x2000, 512, false),
                d(0x2200, 512, false),
                d(0x3000, 1, true),
            ],
        )
        .unwrap();
        assert_eq!((r.kind, r.data.len()), (Kind::Write, 2));
        header(&m, T_FLUSH, 0);
        let r = parse_descs(&m, &[d(0x1000, 16, false), d(0x3000, 1, true)]).unwrap();
        assert_eq!((r.kind, r.data_len()), (Kind::Flush, 0));
        header(&m, T_GET_ID, 0);
        let r = parse_descs(
            &m,
            &[
                d(0x1000, 16, false),
                d(0x2000, 20, true),
                d(0x3000, 1, true),
            ],
        )
        .unwrap();
        assert_eq!(r.kind, Kind::GetId);
        header(&m, 99, 0);
        assert_eq!(
            parse_descs(&m, &[d(0x1000, 16, false), d(0x3000, 1, true)])
                .unwrap()
                .kind,
            Kind::Unsupported(99)
        );
    }

    #[test]
    fn malformed_chains_are_errors_with_a_status_when_possible() {
        let m = mem();
        header(&m, T_IN, 0);
        // No writable status byte at the end.
        let e = parse_descs(&m, &[d(0x1000, 16, false), d(0x2000, 512, true)]);
        assert!(
            e.is_ok(),
            "a writable data buffer can serve as the status byte"
        );
        let e = parse_descs(&m, &[d(0x1000, 16, false), d(0x2000, 512, false)]).unwrap_err();
        assert_eq!(e, (RequestError::NoStatus, None));
        let e = parse_descs(&m, &[d(0x1000, 16, false)]).unwrap_err();
        assert_eq!(e.0, RequestError::NoStatus);
        // Short or write-only header.
        let e = parse_descs(&m, &[d(0x1000, 8, false), d(0x3000, 1, true)]).unwrap_err();
        assert_eq!(e, (RequestError::BadHeader, Some(GuestAddress(0x3000))));
        let e = parse_descs(&m, &[d(0x1000, 16, true), d(0x3000, 1, true)]).unwrap_err();
        assert_eq!(e.0, RequestError::BadHeader);
        // A read whose buffer the device may not write.
        let e = parse_descs(
            &m,
            &[
                d(0x1000, 16, false),
                d(0x2000, 512, false),
                d(0x3000, 1, true),
            ],
        )
        .unwrap_err();
        assert!(matches!(e.0, RequestError::WrongDirection { .. }));
        // Data outside guest memory.
        let e = parse_descs(
            &m,
            &[
                d(0x1000, 16, false),
                d(0xff000, 0x2000, true),
                d(0x3000, 1, true),
            ],
        )
        .unwrap_err();
        assert!(matches!(e.0, RequestError::OutsideMemory { .. }));
        // Length not a whole number of sectors.
        let e = parse_descs(
            &m,
            &[
                d(0x1000, 16, false),
                d(0x2000, 100, true),
                d(0x3000, 1, true),
            ],
        )
        .unwrap_err();
        assert_eq!(e.0, RequestError::Unaligned(100));
        // Status byte outside guest memory: nothing can be reported.
        let e = parse_descs(&m, &[d(0x1000, 16, false), d(0x20_0000, 1, true)]).unwrap_err();
        assert_eq!(e, (RequestError::NoStatus, None));
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::test_support::{random_chain, Rng, MEM_SIZE};
    use virtio_queue::mock::MockSplitQueue;

    /// Random chains never panic the parser, and what it accepts lies inside guest memory.
    #[test]
    fn random_chains() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let mut rng = Rng(0xb10c_f00d);
        let mut accepted = 0;
        for _ in 0..5000 {
            let descs = random_chain(&mut rng, &mem);
            let q = MockSplitQueue::new(&mem, 16);
            let Ok(chain) = q.build_desc_chain(&descs) else {
                continue;
            };
            if let Ok(req) = parse(&mem, chain) {
                accepted += 1;
                for (addr, len) in &req.data {
                    assert!(addr.0 + u64::from(*len) <= MEM_SIZE, "{req:?}");
                }
                assert!(req.status.0 < MEM_SIZE);
            }
        }
        assert!(
            accepted > 0,
            "the generator should produce some valid requests"
        );
    }
}
