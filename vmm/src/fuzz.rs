//! Fuzz harnesses: each takes arbitrary bytes, builds guest input from them (descriptor
//! chains in guest memory, MMIO register sequences, snapshot state) and drives one
//! guest-facing parser or device with it, asserting what must hold for any input. The same
//! functions serve `cargo fuzz` (the `fuzz/` crate, coverage-guided, nightly) and the replay
//! of the saved corpus and of every crash ever found as ordinary unit tests
//! (`fuzz::tests::corpus_replays`, stable, in every `cargo test`).
//!
//! Compiled for tests and with the `fuzzing` feature only.
use std::path::Path;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio::mmio::{self, MmioTransport};
use crate::virtio::{Interrupt, VirtioDevice};

/// Guest memory the harnesses lay their input out in.
pub const MEM_SIZE: u64 = 0x10_0000;
/// Where input bytes are written into guest memory (the buffers descriptors point at).
const DATA_BASE: u64 = 0x2_0000;
const DATA_SPAN: u64 = 0x1_0000;

/// A fuzz harness: any bytes in, a panic when what must hold does not.
pub type Harness = fn(&[u8]);

/// The fuzz targets, by name: what `fuzz/` builds and the corpus directories are called.
pub const TARGETS: &[(&str, Harness)] = &[
    ("block_request", block_request),
    ("vsock_packet", vsock_packet),
    ("mmio_balloon", mmio_balloon),
    ("mmio_block", mmio_block),
    ("snapshot_state", snapshot_state),
    ("vsock_muxer", vsock_muxer),
];

/// Reads the input front to back; past its end every read is zero.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
    fn rest(&mut self) -> &[u8] {
        std::mem::take(&mut self.0)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("fuzz guest memory")
}

/// An address a descriptor names: mostly inside the data area, sometimes at the end of
/// memory, sometimes anything at all.
fn address(input: &mut Input) -> u64 {
    let selector = input.u8();
    let value = input.u64();
    match selector % 8 {
        0 => MEM_SIZE - (value % 64),
        1 => value,
        _ => DATA_BASE + value % DATA_SPAN,
    }
}

/// A descriptor chain of 1..=8 descriptors from the input, then the input's next bytes
/// written over the data area (the buffers' contents).
fn chain(input: &mut Input, mem: &GuestMemoryMmap) -> Vec<RawDescriptor> {
    let n = 1 + u16::from(input.u8() % 8);
    let descs = (0..n)
        .map(|i| {
            let addr = address(input);
            let len = input.u32();
            let len = if input.u8().is_multiple_of(4) {
                len
            } else {
                len % 8192
            };
            let mut flags = if input.u8() & 1 == 1 {
                VRING_DESC_F_WRITE
            } else {
                0
            };
            if i + 1 < n {
                flags |= VRING_DESC_F_NEXT;
            }
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, i + 1))
        })
        .collect();
    let data = input.rest();
    let data = &data[..data.len().min(DATA_SPAN as usize)];
    let _ = mem.write_slice(data, GuestAddress(DATA_BASE));
    descs
}

/// virtio-blk's request parser: whatever it accepts lies inside guest memory.
pub fn block_request(data: &[u8]) {
    let mem = memory();
    let mut input = Input(data);
    let descs = chain(&mut input, &mem);
    let q = MockSplitQueue::new(&mem, 16);
    let Ok(chain) = q.build_desc_chain(&descs) else {
        return;
    };
    if let Ok(req) = crate::virtio::block::request::parse(&mem, chain) {
        for (addr, len) in &req.data {
            assert!(addr.0 + u64::from(*len) <= MEM_SIZE, "{req:?}");
        }
        assert!(req.status.0 < MEM_SIZE, "{req:?}");
    }
}

/// vsock's packet reader and writer: a TX packet's payload stays within the size limit, and
/// an RX write accounts for every payload byte (written or handed back).
pub fn vsock_packet(data: &[u8]) {
    use crate::virtio::vsock::packet::{read_tx, write_rx, Header, Packet, MAX_PKT_DATA};
    let mem = memory();
    let mut input = Input(data);
    let payload = usize::from(input.u16() % 8192);
    let descs = chain(&mut input, &mem);
    let q = MockSplitQueue::new(&mem, 16);
    if let Ok(mut chain) = q.build_desc_chain(&descs) {
        if let Ok(p) = read_tx(&mem, &mut chain) {
            assert!(p.data.len() <= MAX_PKT_DATA as usize);
        }
    }
    let pkt = Packet {
        hdr: Header {
            op: crate::virtio::vsock::packet::OP_RW,
            type_: crate::virtio::vsock::packet::TYPE_STREAM,
            ..Default::default()
        },
        data: vec![7u8; payload],
    };
    if let Ok(mut chain) = q.build_desc_chain(&descs) {
        if let Ok((used, rest)) = write_rx(&mem, &mut chain, &pkt) {
            let header = virtio_vsock::packet::PKT_HEADER_SIZE;
            assert_eq!(used as usize - header + rest.len(), pkt.data.len());
        }
    }
}

/// The vsock muxer, fed a sequence of guest packets (addresses, ports, operations, flags,
/// credit and payload from the input) mixed with the host's side: a host listener on port
/// 1024 that accepts and writes, host events processed, and packets taken for the guest.
/// The connection and RST caps hold throughout, and what the host queues for the guest stays
/// bounded.
pub fn vsock_muxer(data: &[u8]) {
    use crate::virtio::vsock::muxer::Muxer;
    use crate::virtio::vsock::packet::{Header, Packet, TYPE_STREAM};
    use std::io::Write;
    use std::os::unix::net::UnixListener;
    const GUEST_CID: u64 = 3;
    let dir = scratch("vsock");
    let path = dir.join("v.sock");
    let _ = std::fs::remove_file(&path);
    let listener_path = dir.join("v.sock_1024");
    let _ = std::fs::remove_file(&listener_path);
    let listener = UnixListener::bind(&listener_path).expect("host listener");
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let limits = crate::GuestLimits {
        vsock_max_connections: 4,
        vsock_max_pending_rsts: 8,
        ..Default::default()
    };
    let mut muxer = Muxer::new(&path, GUEST_CID, &limits).expect("muxer");
    let mut accepted = Vec::new();
    let mut input = Input(data);
    let mut steps = 0;
    while !input.is_empty() && steps < 512 {
        steps += 1;
        match input.u8() % 6 {
            0..=2 => {
                let flags = input.u8();
                let hdr = Header {
                    src_cid: if flags & 1 == 0 {
                        GUEST_CID
                    } else {
                        input.u64()
                    },
                    dst_cid: if flags & 2 == 0 { 2 } else { input.u64() },
                    src_port: u32::from(input.u8() % 4),
                    dst_port: if flags & 4 == 0 { 1024 } else { input.u32() },
                    type_: if flags & 8 == 0 {
                        TYPE_STREAM
                    } else {
                        input.u16()
                    },
                    op: u16::from(input.u8() % 9),
                    flags: u32::from(input.u8() % 4),
                    buf_alloc: input.u32(),
                    fwd_cnt: input.u32(),
                };
                let len = usize::from(input.u8() % 64);
                let data = (0..len).map(|_| input.u8()).collect();
                muxer.from_guest(Packet { hdr, data });
            }
            3 => {
                let _ = muxer.pop_to_guest();
            }
            4 => muxer.process_host_events(),
            _ => {
                // The host side: accept what the guest connected, write to or drop one.
                if let Ok((stream, _)) = listener.accept() {
                    accepted.push(stream);
                }
                let pick = usize::from(input.u8());
                if !accepted.is_empty() {
                    let i = pick % accepted.len();
                    if pick & 0x80 != 0 {
                        drop(accepted.swap_remove(i));
                    } else {
                        let _ = accepted[i].write(&[0x5a; 100]);
                    }
                }
            }
        }
        assert!(muxer.connection_count() <= limits.vsock_max_connections);
        assert!(muxer.queued_rsts() <= limits.vsock_max_pending_rsts);
        // A few packets per connection (data, credit, control) and the RSTs.
        let bound = limits.vsock_max_connections * 16 + limits.vsock_max_pending_rsts;
        assert!(
            muxer.queued_for_guest() <= bound,
            "{}",
            muxer.queued_for_guest()
        );
    }
}

/// A register sequence against a device behind its MMIO transport, as a guest driver (or
/// a hostile guest) would write it: register reads and writes, queue notifications, and
/// bytes written into guest memory (rings and buffers). Nothing may panic, and the
/// transport must answer its identity registers throughout.
fn mmio(device: Box<dyn VirtioDevice>, data: &[u8]) -> (MmioTransport, GuestMemoryMmap) {
    let mem = memory();
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let mut transport = MmioTransport::new(device, mem.clone(), Interrupt::new(irq));
    let mut input = Input(data);
    let mut steps = 0;
    while !input.is_empty() && steps < 256 {
        steps += 1;
        match input.u8() % 5 {
            0 | 1 => {
                // A register write: offsets in the register window and the config space.
                let offset = u64::from(input.u8()) * 4 % 0x140;
                let value = input.u32();
                transport.write(offset, &value.to_le_bytes());
            }
            2 => {
                let offset = u64::from(input.u16()) % 0x140;
                let mut buf = [0u8; 4];
                let len = 1 + usize::from(input.u8() % 4);
                transport.read(offset, &mut buf[..len]);
            }
            3 => {
                // Guest memory: up to 64 bytes anywhere in the first 128 KiB (rings, buffers).
                let addr = u64::from(input.u32()) % (DATA_BASE + DATA_SPAN);
                let len = usize::from(input.u8() % 64);
                let bytes: Vec<u8> = (0..len).map(|_| input.u8()).collect();
                let _ = mem.write_slice(&bytes, GuestAddress(addr));
            }
            _ => {
                let queue = u32::from(input.u8() % 4);
                transport.write(mmio::REG_QUEUE_NOTIFY, &queue.to_le_bytes());
            }
        }
    }
    let mut magic = [0u8; 4];
    transport.read(mmio::REG_MAGIC, &mut magic);
    assert_eq!(&magic, b"virt");
    (transport, mem)
}

/// The balloon behind MMIO (inflate/deflate/reporting queues discard guest pages).
pub fn mmio_balloon(data: &[u8]) {
    mmio(Box::new(crate::virtio::balloon::Balloon::new()), data);
}

/// virtio-blk behind MMIO, backed by a 1 MiB temporary file.
pub fn mmio_block(data: &[u8]) {
    let path = scratch("blk").join("disk");
    if std::fs::metadata(&path).map_or(true, |m| m.len() != 1 << 20) {
        std::fs::write(&path, vec![0u8; 1 << 20]).expect("fuzz disk");
    }
    let block = crate::virtio::block::Block::open(&path, false).expect("fuzz disk");
    mmio(Box::new(block), data);
}

/// The snapshot state decoder, given any payload (the harness frames it with a valid header
/// and checksum, so the fuzzer reaches the records): it returns an error or a snapshot,
/// never panics, and never allocates what a length field claims before checking it.
pub fn snapshot_state(data: &[u8]) {
    let _ = crate::snapshot::decode(data, Path::new("fuzz-input"));
}

/// A seed for `snapshot_state`: a whole, valid state payload.
pub fn snapshot_seed() -> Vec<u8> {
    crate::snapshot::encode(&crate::snapshot::sample())
}

/// A seed for the MMIO targets: a driver's whole set-up of queue 0 with rings at 0x1000,
/// 0x2000 and 0x3000, one avail entry pointing at descriptor 0, then a notification, so the
/// fuzzer starts from a device that processes requests.
pub fn mmio_seed(queues: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let write = |out: &mut Vec<u8>, reg: u64, value: u32| {
        out.push(0);
        out.push((reg / 4) as u8);
        out.extend_from_slice(&value.to_le_bytes());
    };
    let status = |out: &mut Vec<u8>, s: u32| write(out, mmio::REG_STATUS, s);
    status(&mut out, mmio::STATUS_ACKNOWLEDGE);
    status(&mut out, mmio::STATUS_ACKNOWLEDGE | mmio::STATUS_DRIVER);
    write(&mut out, mmio::REG_DRIVER_FEATURES_SEL, 1);
    write(&mut out, mmio::REG_DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
    let features_ok = mmio::STATUS_ACKNOWLEDGE | mmio::STATUS_DRIVER | mmio::STATUS_FEATURES_OK;
    status(&mut out, features_ok);
    for q in 0..queues {
        let base = 0x1000 + q * 0x3000;
        write(&mut out, mmio::REG_QUEUE_SEL, q);
        write(&mut out, mmio::REG_QUEUE_NUM, 16);
        write(&mut out, mmio::REG_QUEUE_DESC_LOW, base);
        write(&mut out, mmio::REG_QUEUE_DRIVER_LOW, base + 0x1000);
        write(&mut out, mmio::REG_QUEUE_DEVICE_LOW, base + 0x2000);
        write(&mut out, mmio::REG_QUEUE_READY, 1);
        // Descriptor 0: 16 readable bytes at DATA_BASE; avail ring: idx 1, ring[0] = 0.
        let mut desc = Vec::new();
        desc.extend_from_slice(&DATA_BASE.to_le_bytes());
        desc.extend_from_slice(&16u32.to_le_bytes());
        desc.extend_from_slice(&[0u8; 4]);
        for (addr, bytes) in [(base, desc), (base + 0x1000, vec![0, 0, 1, 0, 0, 0])] {
            out.push(3);
            out.extend_from_slice(&addr.to_le_bytes());
            out.push(bytes.len() as u8);
            out.extend_from_slice(&bytes);
        }
    }
    status(&mut out, features_ok | mmio::STATUS_DRIVER_OK);
    for q in 0..queues {
        out.push(4);
        out.push(q as u8);
    }
    out
}

/// This process's scratch directory for the harnesses (a disk file, sockets), kept from one
/// input to the next; [`remove_scratch`] removes it.
fn scratch_root() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("shoal-fuzz-{}", std::process::id()))
}

/// The harness `kind`'s part of [`scratch_root`], made if missing.
fn scratch(kind: &str) -> std::path::PathBuf {
    let dir = scratch_root().join(kind);
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Removes this process's scratch directory.
pub fn remove_scratch() {
    let _ = std::fs::remove_dir_all(scratch_root());
}

/// The corpus directory of `target` in the repository (`fuzz/corpus/TARGET`).
pub fn corpus_dir(target: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every saved input of every target (the corpus `scripts/fuzz` grew, and each crash
    /// it ever found, kept under `fuzz/corpus/TARGET/`) runs through its harness again:
    /// a fixed crash stays fixed, on stable Rust, in every `cargo test`.
    #[test]
    fn corpus_replays() {
        let mut ran = 0;
        for (name, harness) in TARGETS {
            let dir = corpus_dir(name);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                panic!("no corpus for fuzz target {name} at {}", dir.display());
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let result = std::panic::catch_unwind(|| harness(&data));
                if result.is_err() {
                    remove_scratch();
                    panic!("{name}: {} fails", path.display());
                }
                ran += 1;
            }
        }
        remove_scratch();
        assert!(ran >= TARGETS.len(), "only {ran} corpus inputs");
    }

    /// The MMIO seeds reach the device: the balloon's queue processes the seed's request
    /// (the used ring's index moves), so the fuzzer starts past the driver set-up.
    #[test]
    fn mmio_seed_reaches_the_device() {
        let balloon = Box::new(crate::virtio::balloon::Balloon::new());
        let (transport, mem) = mmio(balloon, &mmio_seed(2));
        assert!(transport.is_active());
        let used_idx: u16 = mem.read_obj(GuestAddress(0x3000 + 2)).unwrap();
        assert_eq!(used_idx, 1, "the balloon did not take the seed's request");
    }
}
