//! vsock packets between the device and the driver: parsing TX chains and filling RX chains.
//! Descriptor walking and bounds checks come from the virtio-vsock crate; this module turns
//! its packets into owned, typed values so the muxer never touches guest memory.
use std::ops::Deref;

use virtio_queue::DescriptorChain;
use virtio_vsock::packet::VsockPacket;
use vm_memory::{GuestMemory, GuestMemoryMmap};

/// Largest payload shoal puts in or accepts from one packet.
pub const MAX_PKT_DATA: u32 = 64 * 1024;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// The host's CID.
pub const HOST_CID: u64 = 2;

/// Errors from reading or writing a packet in guest memory.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("malformed vsock packet: {0:?}")]
    Malformed(virtio_vsock::packet::Error),
    #[error("cannot copy vsock payload: {0}")]
    Memory(vm_memory::VolatileMemoryError),
    #[error("RX buffer has no room for a payload")]
    NoRoom,
}

// By hand, not `#[from]`: the messages carry the cause, so it is not also a `source()`
// (printed once, not twice, by a walk of the chain).
impl From<vm_memory::VolatileMemoryError> for PacketError {
    fn from(e: vm_memory::VolatileMemoryError) -> Self {
        PacketError::Memory(e)
    }
}

/// A vsock header, host byte order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// A packet with its payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Packet {
    pub hdr: Header,
    pub data: Vec<u8>,
}

impl Packet {
    /// A reply that goes back where `hdr` came from (ports and CIDs swapped).
    pub fn reply_to(hdr: &Header, op: u16) -> Packet {
        Packet {
            hdr: Header {
                src_cid: hdr.dst_cid,
                dst_cid: hdr.src_cid,
                src_port: hdr.dst_port,
                dst_port: hdr.src_port,
                type_: TYPE_STREAM,
                op,
                ..Default::default()
            },
            data: Vec::new(),
        }
    }
}

/// Reads a driver→device packet from a TX chain.
pub fn read_tx<T>(
    mem: &GuestMemoryMmap,
    chain: &mut DescriptorChain<T>,
) -> Result<Packet, PacketError>
where
    T: Deref,
    T::Target: GuestMemory,
{
    let pkt = VsockPacket::from_tx_virtq_chain(mem, chain, MAX_PKT_DATA)
        .map_err(PacketError::Malformed)?;
    let hdr = Header {
        src_cid: pkt.src_cid(),
        dst_cid: pkt.dst_cid(),
        src_port: pkt.src_port(),
        dst_port: pkt.dst_port(),
        type_: pkt.type_(),
        op: pkt.op(),
        flags: pkt.flags(),
        buf_alloc: pkt.buf_alloc(),
        fwd_cnt: pkt.fwd_cnt(),
    };
    let mut data = Vec::new();
    if hdr.op == OP_RW && !pkt.is_empty() {
        if let Some(slice) = pkt.data_slice() {
            let n = (pkt.len() as usize).min(slice.len());
            data.resize(n, 0);
            slice.subslice(0, n)?.copy_to(&mut data[..]);
        }
    }
    Ok(Packet { hdr, data })
}

/// Writes `pkt` into an RX chain. When the chain's buffer is smaller than the payload, only
/// the part that fits is written; the rest is returned so it can go into the next buffer.
/// Returns the number of bytes written (header included) and the leftover payload.
pub fn write_rx<T>(
    mem: &GuestMemoryMmap,
    chain: &mut DescriptorChain<T>,
    pkt: &Packet,
) -> Result<(u32, Vec<u8>), PacketError>
where
    T: Deref,
    T::Target: GuestMemory,
{
    let mut out = VsockPacket::from_rx_virtq_chain(mem, chain, MAX_PKT_DATA)
        .map_err(PacketError::Malformed)?;
    let room = out.data_slice().map_or(0, |s| s.len());
    if room == 0 && !pkt.data.is_empty() {
        return Err(PacketError::NoRoom);
    }
    let n = pkt.data.len().min(room);
    if n > 0 {
        let slice = out.data_slice().expect("room > 0").subslice(0, n)?;
        slice.copy_from(&pkt.data[..n]);
    }
    let h = &pkt.hdr;
    out.set_src_cid(h.src_cid)
        .set_dst_cid(h.dst_cid)
        .set_src_port(h.src_port)
        .set_dst_port(h.dst_port)
        .set_type(h.type_)
        .set_op(h.op)
        .set_flags(h.flags)
        .set_buf_alloc(h.buf_alloc)
        .set_fwd_cnt(h.fwd_cnt)
        .set_len(n as u32);
    let header_len = out.header_slice().len() as u32;
    Ok((header_len + n as u32, pkt.data[n..].to_vec()))
}

/// A vsock header as the driver lays it out in memory (for tests that play the driver).
#[cfg(test)]
pub(crate) fn header_bytes(h: &Header, len: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(44);
    b.extend_from_slice(&h.src_cid.to_le_bytes());
    b.extend_from_slice(&h.dst_cid.to_le_bytes());
    b.extend_from_slice(&h.src_port.to_le_bytes());
    b.extend_from_slice(&h.dst_port.to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&h.type_.to_le_bytes());
    b.extend_from_slice(&h.op.to_le_bytes());
    b.extend_from_slice(&h.flags.to_le_bytes());
    b.extend_from_slice(&h.buf_alloc.to_le_bytes());
    b.extend_from_slice(&h.fwd_cnt.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::desc;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_vsock::packet::PKT_HEADER_SIZE;
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn tx_packet_header_and_payload_round_trip() {
        let m = mem();
        let hdr = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1025,
            dst_port: 1234,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 17,
        };
        let mut raw = header_bytes(&hdr, 0);
        raw[24..28].copy_from_slice(&5u32.to_le_bytes());
        m.write_slice(&raw, GuestAddress(0x4000)).unwrap();
        m.write_slice(b"hello", GuestAddress(0x5000)).unwrap();
        let q = MockSplitQueue::new(&m, 16);
        let mut chain = q
            .build_desc_chain(&[
                desc(0x4000, PKT_HEADER_SIZE as u32, VRING_DESC_F_NEXT, 1),
                desc(0x5000, 5, 0, 0),
            ])
            .unwrap();
        let pkt = read_tx(&m, &mut chain).unwrap();
        assert_eq!(pkt.hdr, hdr);
        assert_eq!(pkt.data, b"hello");
    }

    #[test]
    fn tx_packet_with_bad_descriptors_is_an_error() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        // Header descriptor shorter than a vsock header.
        let mut chain = q.build_desc_chain(&[desc(0x4000, 8, 0, 0)]).unwrap();
        assert!(matches!(
            read_tx(&m, &mut chain),
            Err(PacketError::Malformed(_))
        ));
        // Header outside guest memory.
        let mut chain = q
            .build_desc_chain(&[desc(0x20_0000, PKT_HEADER_SIZE as u32, 0, 0)])
            .unwrap();
        assert!(read_tx(&m, &mut chain).is_err());
        // A TX buffer the driver marked device-writable.
        let mut chain = q
            .build_desc_chain(&[desc(0x4000, PKT_HEADER_SIZE as u32, VRING_DESC_F_WRITE, 0)])
            .unwrap();
        assert!(read_tx(&m, &mut chain).is_err());
        // Payload length larger than the data descriptor.
        let hdr = Header {
            op: OP_RW,
            type_: TYPE_STREAM,
            ..Default::default()
        };
        let mut raw = header_bytes(&hdr, 0);
        raw[24..28].copy_from_slice(&100u32.to_le_bytes());
        m.write_slice(&raw, GuestAddress(0x4000)).unwrap();
        let mut chain = q
            .build_desc_chain(&[
                desc(0x4000, PKT_HEADER_SIZE as u32, VRING_DESC_F_NEXT, 1),
                desc(0x5000, 5, 0, 0),
            ])
            .unwrap();
        assert!(read_tx(&m, &mut chain).is_err());
    }

    #[test]
    fn rx_packet_is_split_when_the_buffer_is_small() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let mut chain = q
            .build_desc_chain(&[
                desc(
                    0x4000,
                    PKT_HEADER_SIZE as u32,
                    VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                    1,
                ),
                desc(0x5000, 4, VRING_DESC_F_WRITE, 0),
            ])
            .unwrap();
        let pkt = Packet {
            hdr: Header {
                src_cid: 2,
                dst_cid: 3,
                op: OP_RW,
                type_: TYPE_STREAM,
                buf_alloc: 9,
                fwd_cnt: 1,
                ..Default::default()
            },
            data: b"abcdefg".to_vec(),
        };
        let (used, rest) = write_rx(&m, &mut chain, &pkt).unwrap();
        assert_eq!(used, PKT_HEADER_SIZE as u32 + 4);
        assert_eq!(rest, b"efg");
        let mut payload = [0u8; 4];
        m.read_slice(&mut payload, GuestAddress(0x5000)).unwrap();
        assert_eq!(&payload, b"abcd");
        let len: u32 = m.read_obj(GuestAddress(0x4000 + 24)).unwrap();
        assert_eq!(len, 4);
        let buf_alloc: u32 = m.read_obj(GuestAddress(0x4000 + 36)).unwrap();
        assert_eq!(buf_alloc, 9);
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::test_support::{random_chain, Rng, MEM_SIZE};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    /// Random TX and RX chains never panic, and parsed payloads respect the size limit.
    #[test]
    fn random_chains() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let mut rng = Rng(0x50c4_e7ed);
        let pkt = Packet {
            hdr: Header {
                op: OP_RW,
                type_: TYPE_STREAM,
                ..Default::default()
            },
            data: vec![7u8; 3000],
        };
        for _ in 0..5000 {
            let descs = random_chain(&mut rng, &mem);
            let q = MockSplitQueue::new(&mem, 16);
            if let Ok(mut chain) = q.build_desc_chain(&descs) {
                if let Ok(p) = read_tx(&mem, &mut chain) {
                    assert!(p.data.len() <= MAX_PKT_DATA as usize);
                }
            }
            if let Ok(mut chain) = q.build_desc_chain(&descs) {
                if let Ok((used, rest)) = write_rx(&mem, &mut chain, &pkt) {
                    assert_eq!(
                        used as usize - PKT_HEADER_SIZE_FOR_TESTS + rest.len(),
                        pkt.data.len()
                    );
                }
            }
        }
    }

    const PKT_HEADER_SIZE_FOR_TESTS: usize = virtio_vsock::packet::PKT_HEADER_SIZE;
}
