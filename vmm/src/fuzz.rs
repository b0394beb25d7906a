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
    ("fuse_session", fuse_session),
    ("mmio_net", mmio_net),
    ("mmio_vsock", mmio_vsock),
    ("mmio_fs", mmio_fs),
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
    // The report holds the open connections and a bounded event log, whatever the guest did.
    let report = muxer.report();
    assert!(
        report.lines().count() <= 1 + crate::virtio::vsock::muxer::EVENT_LOG_LEN,
        "{report}"
    );
}

/// FUSE opcodes the session harness names (the kernel's `fuse.h`).
mod fuse_op {
    pub const LOOKUP: u32 = 1;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const CREATE: u32 = 35;
    pub const FALLOCATE: u32 = 43;
    pub const RENAME2: u32 = 45;
    pub const TMPFILE: u32 = 51;
}

/// Names a session request may carry: the tree's own, the ones that try to leave it, and
/// xattr names the policy cares about. A selector past the table takes the name from the
/// input instead.
const FUSE_NAMES: &[&[u8]] = &[
    b"hello",
    b"dir",
    b"link",
    b"up",
    b"..",
    b".",
    b"new",
    b"../outside",
    b"/etc/passwd",
    b"outside",
    b"secret",
    b"trusted.overlay.opaque",
    b"security.capability",
    b"user.x",
];

/// A FUSE session against the virtio-fs device's server (the passthrough file system with
/// shoal's policy, on a fresh tree each input): a valid INIT, then up to 64 requests from the
/// input. Each has an opcode, a node (the root, one an earlier reply named, or any number),
/// a body (names from [`FUSE_NAMES`] or the input after the fixed part the opcode expects,
/// open handles an earlier reply gave), and a reply buffer of the input's size. What must
/// hold: every request is returned, no reply outgrows its buffer, and afterwards nothing
/// outside the shared tree has changed (a directory `outside` beside it, which a symlink
/// `up` in the tree names, and the directory holding both) and the tree holds no device node
/// but the whiteout `0,0`.
///
/// FALLOCATE is left out: the passthrough would reserve real disk blocks for any length
/// the input names, filling the fuzzing machine's disk rather than finding a bug.
pub fn fuse_session(data: &[u8]) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use virtio_queue::Queue;
    use vm_memory::Address;
    const QUEUE_AT: u64 = 0x1_0000;
    const SLOTS_AT: u64 = 0x8_0000;
    const SLOT: u64 = 0x2000;
    const HALF: u64 = SLOT / 2;
    const STEPS: u16 = 63;

    let base = scratch("fuse");
    let share = base.join("share");
    let outside = base.join("outside");
    let _ = std::fs::remove_dir_all(&share);
    std::fs::create_dir_all(share.join("dir")).expect("fuzz share");
    std::fs::write(share.join("hello"), "hi there").expect("fuzz share");
    std::os::unix::fs::symlink("/etc", share.join("link")).expect("fuzz share");
    std::os::unix::fs::symlink("../outside", share.join("up")).expect("fuzz share");
    std::fs::create_dir_all(&outside).expect("fuzz outside");
    std::fs::write(outside.join("secret"), "secret").expect("fuzz outside");
    let listing = |dir: &Path| {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        names.sort();
        names
    };
    let secret_meta = |p: &Path| {
        std::fs::symlink_metadata(p)
            .map(|m| (m.mode(), m.uid(), m.gid(), m.nlink(), m.len()))
            .ok()
    };
    let before = (
        listing(&base),
        listing(&outside),
        secret_meta(&outside.join("secret")),
    );

    let mem = memory();
    let fs = crate::virtio::fs::Fs::new(&crate::virtio::fs::FsConfig {
        tag: "fuzz".into(),
        dir: share.clone(),
        cache: crate::virtio::fs::CacheMode::Auto,
        root: None,
    })
    .expect("fuzz virtio-fs device");
    let q = MockSplitQueue::create(&mem, GuestAddress(QUEUE_AT), 2 * (STEPS + 1));
    let queue: Queue = q.create_queue().expect("fuzz queue");
    let Some(mut server) = crate::virtio::fs::DirectServe::new(&fs, &mem, &queue) else {
        panic!("the fuzz queue was refused");
    };

    let mut input = Input(data);
    let mut nodes: Vec<u64> = vec![1];
    let mut handles: Vec<u64> = Vec::new();
    // Requests sent: each takes a slot, two descriptors and one used-ring entry.
    let mut sent: u16 = 0;
    for step in 0..=STEPS {
        // The request: INIT first (7.31, every flag offered), then the input's.
        let (opcode, nodeid, body, reply_len) = if step == 0 {
            let mut body = Vec::new();
            for v in [7u32, 31, 0x2_0000, u32::MAX] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            (fuse_op::INIT, 0, body, HALF as u32)
        } else {
            if input.is_empty() {
                break;
            }
            let opcode = match input.u8() {
                n @ 0..=51 => u32::from(n),
                _ => input.u32(),
            };
            if opcode == fuse_op::FALLOCATE {
                continue;
            }
            let nodeid = fuzz_node(&mut input, &nodes);
            let body = fuse_body(&mut input, opcode, &nodes, &handles);
            let reply_len = u32::from(input.u16()) % (HALF as u32 + 1);
            (opcode, nodeid, body, reply_len)
        };
        let mut msg = Vec::with_capacity(40 + body.len());
        msg.extend_from_slice(&(40 + body.len() as u32).to_le_bytes());
        msg.extend_from_slice(&opcode.to_le_bytes());
        msg.extend_from_slice(&u64::from(sent + 1).to_le_bytes());
        msg.extend_from_slice(&nodeid.to_le_bytes());
        msg.extend_from_slice(&[0u8; 16]); // uid, gid and pid 0, no extensions
        msg.extend_from_slice(&body);
        msg.truncate(HALF as usize);
        let slot = SLOTS_AT + u64::from(sent) * SLOT;
        mem.write_slice(&msg, GuestAddress(slot))
            .expect("request in guest memory");
        let reply_at = slot + HALF;
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(
                slot,
                msg.len() as u32,
                VRING_DESC_F_NEXT as u16,
                2 * sent + 1,
            )),
            RawDescriptor::from(SplitDescriptor::new(
                reply_at,
                reply_len,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
        ];
        q.add_desc_chains(&descs, 2 * sent)
            .expect("queue the request");
        assert!(
            server.serve(),
            "request {sent} (opcode {opcode}) was not returned"
        );
        let used: u32 = mem
            .read_obj(q.used_addr().unchecked_add(4 + u64::from(sent) * 8 + 4))
            .expect("used ring");
        assert!(
            used <= reply_len,
            "opcode {opcode}: {used} bytes written into a {reply_len}-byte reply"
        );
        sent += 1;
        // Nodes and open handles the reply names, for later requests to use.
        let mut reply = vec![0u8; used as usize];
        mem.read_slice(&mut reply, GuestAddress(reply_at))
            .expect("reply");
        if reply.len() >= 24 && reply[4..8] == [0; 4] {
            let word = |at: usize| {
                reply
                    .get(16 + at..16 + at + 8)
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            };
            match opcode {
                fuse_op::LOOKUP
                | fuse_op::MKNOD
                | fuse_op::MKDIR
                | fuse_op::SYMLINK
                | fuse_op::LINK => nodes.extend(word(0)),
                fuse_op::CREATE | fuse_op::TMPFILE => {
                    nodes.extend(word(0));
                    handles.extend(word(128));
                }
                fuse_op::OPEN | fuse_op::OPENDIR => handles.extend(word(0)),
                _ => {}
            }
        }
    }
    drop(server);
    drop(fs);

    let after = (
        listing(&base),
        listing(&outside),
        secret_meta(&outside.join("secret")),
    );
    assert_eq!(before, after, "something outside the share changed");
    assert_eq!(
        std::fs::read(outside.join("secret")).ok().as_deref(),
        Some(&b"secret"[..])
    );
    let mut dirs = vec![share];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
                continue;
            };
            let kind = meta.file_type();
            if kind.is_dir() {
                dirs.push(entry.path());
            }
            assert!(
                !(kind.is_block_device() || (kind.is_char_device() && meta.rdev() != 0)),
                "the guest made a device node {} in the share",
                entry.path().display()
            );
        }
    }
}

/// A seed for `fuse_session`: LOOKUP `hello`, OPEN and READ it, LOOKUP `up`, MKDIR `new`,
/// SYMLINK `secret` to `../outside`, RENAME `hello` over it; each with a 2 KiB reply buffer.
pub fn fuse_seed() -> Vec<u8> {
    let reply = [0x00, 0x08];
    let mut read = vec![fuse_op::OPEN as u8 + 1, 17, 0, 32];
    read.extend_from_slice(&[0; 8]); // offset
    read.extend_from_slice(&100u32.to_le_bytes()); // size
    read.extend_from_slice(&[0; 20]); // read flags, lock owner, flags, padding
    let steps: [Vec<u8>; 7] = [
        vec![fuse_op::LOOKUP as u8, 0, 0, 0],
        vec![fuse_op::OPEN as u8, 17, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0],
        read,
        vec![fuse_op::LOOKUP as u8, 0, 0, 3],
        vec![fuse_op::MKDIR as u8, 0, 0, 0xed, 0x01, 0, 0, 0, 0, 0, 0, 6],
        vec![fuse_op::SYMLINK as u8, 0, 0, 10, 7],
        vec![fuse_op::RENAME as u8, 0, 0, 0, 0, 10],
    ];
    steps
        .into_iter()
        .flat_map(|mut step| {
            step.extend_from_slice(&reply);
            step
        })
        .collect()
}

/// A node for a session request: mostly the root or one an earlier reply named, sometimes
/// any number.
fn fuzz_node(input: &mut Input, nodes: &[u64]) -> u64 {
    match input.u8() {
        0..=15 => 1,
        n @ 16..=239 => nodes[usize::from(n) % nodes.len()],
        _ => input.u64(),
    }
}

/// A name for a session request: one of [`FUSE_NAMES`] or up to 31 bytes of the input.
fn fuzz_name(input: &mut Input, out: &mut Vec<u8>) {
    let pick = usize::from(input.u8());
    match FUSE_NAMES.get(pick) {
        Some(name) => out.extend_from_slice(name),
        None => {
            let len = pick % 32;
            out.extend((0..len).map(|_| input.u8()));
        }
    }
    out.push(0);
}

/// A request body: for the opcodes that carry names, the fixed part from the input (a node
/// where the opcode names one) and then the names; for the ones that take an open handle
/// first, a handle an earlier reply gave; otherwise (and when the input's first byte says
/// so) raw input.
fn fuse_body(input: &mut Input, opcode: u32, nodes: &[u64], handles: &[u64]) -> Vec<u8> {
    let mut body = Vec::new();
    let raw = input.u8();
    if raw >= 224 {
        let len = usize::from(input.u8());
        body.extend((0..len).map(|_| input.u8()));
        return body;
    }
    let fixed = |input: &mut Input, body: &mut Vec<u8>, n: usize| {
        body.extend((0..n).map(|_| input.u8()));
    };
    match opcode {
        fuse_op::LOOKUP | 10 | 11 | 24 => fuzz_name(input, &mut body),
        fuse_op::MKNOD | fuse_op::CREATE | fuse_op::TMPFILE => {
            fixed(input, &mut body, 16);
            fuzz_name(input, &mut body);
        }
        fuse_op::MKDIR => {
            fixed(input, &mut body, 8);
            fuzz_name(input, &mut body);
        }
        fuse_op::SYMLINK => {
            fuzz_name(input, &mut body);
            fuzz_name(input, &mut body);
        }
        fuse_op::RENAME | fuse_op::RENAME2 | fuse_op::LINK => {
            body.extend_from_slice(&fuzz_node(input, nodes).to_le_bytes());
            if opcode == fuse_op::RENAME2 {
                fixed(input, &mut body, 8);
            }
            fuzz_name(input, &mut body);
            if opcode != fuse_op::LINK {
                fuzz_name(input, &mut body);
            }
        }
        fuse_op::SETXATTR | fuse_op::GETXATTR => {
            let size = u32::from(input.u8() % 64);
            body.extend_from_slice(&size.to_le_bytes());
            fixed(input, &mut body, 4);
            fuzz_name(input, &mut body);
            if opcode == fuse_op::SETXATTR {
                fixed(input, &mut body, size as usize);
            }
        }
        // READ, WRITE, RELEASE, FSYNC, FLUSH, READDIR, RELEASEDIR, FSYNCDIR, GETLK, SETLK,
        // SETLKW, IOCTL, POLL, READDIRPLUS, LSEEK, COPY_FILE_RANGE: an open handle first.
        15 | 16 | 18 | 20 | 25 | 28..=33 | 39 | 40 | 44 | 46 | 47 => {
            let handle = match handles.len() {
                0 => input.u64(),
                n => handles[usize::from(raw) % n],
            };
            body.extend_from_slice(&handle.to_le_bytes());
            let len = usize::from(input.u8() % 96);
            fixed(input, &mut body, len);
        }
        _ => {
            let len = usize::from(input.u8() % 96);
            fixed(input, &mut body, len);
        }
    }
    body
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

/// virtio-net behind MMIO, on a real tap: `shoal-fz0`, up with address 10.213.0.1/24 in a
/// network namespace of this process's own (IPv6 off, so nothing but answers to the
/// guest's frames arrives: an ARP request or a ping for that address gets one, which the
/// receive queue then takes). Needs root and /dev/net/tun; without them the input is not
/// run, and [`net_unavailable`] says why.
pub fn mmio_net(data: &[u8]) {
    let Some(tap) = fuzz_tap() else {
        return;
    };
    let net = crate::virtio::net::Net::with_tap(tap, [2, 0, 0, 0, 0, 2], 1500);
    mmio(Box::new(net), data);
}

/// Hybrid vsock behind MMIO, its host socket in this thread's scratch directory (no host
/// client connects: the guest's own packets, connects to ports nobody takes, and RSTs).
pub fn mmio_vsock(data: &[u8]) {
    let path = scratch("vsock").join("v.sock");
    let _ = std::fs::remove_file(&path);
    let vsock =
        crate::virtio::vsock::Vsock::new(3, &path, &Default::default()).expect("fuzz vsock device");
    mmio(Box::new(vsock), data);
}

/// virtio-fs behind MMIO over a small shared tree: the queues as a guest sets them up,
/// served by the device's own (confined) worker thread, as in a VM.
pub fn mmio_fs(data: &[u8]) {
    let share = scratch("mmio-fs").join("share");
    if !share.join("hello").exists() {
        let _ = std::fs::create_dir_all(&share);
        let _ = std::fs::write(share.join("hello"), "hi");
    }
    let fs = crate::virtio::fs::Fs::new(&crate::virtio::fs::FsConfig {
        tag: "fuzz".into(),
        dir: share,
        cache: crate::virtio::fs::CacheMode::Auto,
        root: None,
    })
    .expect("fuzz virtio-fs device");
    let mut fs = fs;
    fs.ready()
        .expect("the virtio-fs worker could not be confined (run as root)");
    mmio(Box::new(fs), data);
}

/// Why [`mmio_net`] cannot run here, if it cannot.
pub fn net_unavailable() -> Option<&'static str> {
    // SAFETY: geteuid takes nothing and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("mmio_net needs root (a tap in a network namespace)");
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("mmio_net needs /dev/net/tun");
    }
    None
}

/// A new descriptor of this process's fuzzing tap, made (with its namespace) on first use.
fn fuzz_tap() -> Option<crate::virtio::net::Tap> {
    use crate::virtio::net::Tap;
    static TAP: std::sync::OnceLock<Option<Tap>> = std::sync::OnceLock::new();
    let tap = TAP.get_or_init(|| {
        if net_unavailable().is_some() {
            return None;
        }
        // A thread enters the new namespace and makes the tap there; the tap (and with it
        // the namespace) lives as long as this descriptor, which the process keeps.
        std::thread::spawn(|| {
            // SAFETY: unshare takes a flag word and touches no memory of ours; it moves only
            // this short-lived thread into a new network namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare netns: {}", std::io::Error::last_os_error());
            for conf in ["all", "default"] {
                let knob = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
                if Path::new(&knob).exists() {
                    std::fs::write(&knob, "1").expect("disable IPv6");
                }
            }
            let tap = Tap::open("shoal-fz0", None).expect("fuzz tap");
            let mut nl = shoal_netlink::Netlink::open().expect("netlink");
            let index = nl
                .links()
                .expect("links")
                .into_iter()
                .find(|l| l.name == "shoal-fz0")
                .expect("the fuzz tap's link")
                .index;
            nl.add_address(index, [10, 213, 0, 1].into(), 24)
                .expect("fuzz tap address");
            nl.set_link(index, None, None, Some(true))
                .expect("fuzz tap up");
            tap
        })
        .join()
        .ok()
    });
    tap.as_ref()?.try_clone().ok()
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

/// This thread's scratch directory for the harnesses (a disk file, sockets, a shared tree),
/// kept from one input to the next; [`remove_scratch`] removes it. Per thread, so that tests
/// running harnesses side by side do not share one.
fn scratch_root() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static ID: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    let id = ID.with(|id| *id);
    std::env::temp_dir().join(format!("shoal-fuzz-{}-{id}", std::process::id()))
}

/// The harness `kind`'s part of [`scratch_root`], made if missing.
fn scratch(kind: &str) -> std::path::PathBuf {
    let dir = scratch_root().join(kind);
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Removes this thread's scratch directory.
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
            if *name == "mmio_net" {
                if let Some(reason) = net_unavailable() {
                    println!("SKIP: the mmio_net corpus: {reason}");
                    continue;
                }
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                panic!("no corpus for fuzz target {name} at {}", dir.display());
            };
            for entry in entries {
                let path = entry.unwrap().path();
                // A fuzzer running beside the test replaces inputs as it reduces them.
                let data = match std::fs::read(&path) {
                    Ok(data) => data,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => panic!("{}: {e}", path.display()),
                };
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

    /// The FUSE seed reaches the tree: its MKDIR made `new`, and its RENAME put `hello`
    /// (read by the READ before) in place of the symlink `secret`, in the share only.
    #[test]
    fn fuse_seed_reaches_the_tree() {
        fuse_session(&fuse_seed());
        let share = scratch("fuse").join("share");
        let outside = scratch("fuse").join("outside");
        let made = share.join("new").is_dir();
        let moved = std::fs::read(share.join("secret")).ok();
        let gone = !share.join("hello").exists();
        let secret = std::fs::read(outside.join("secret")).ok();
        remove_scratch();
        assert!(made, "the seed's MKDIR did not reach the tree");
        assert_eq!(moved.as_deref(), Some(&b"hi there"[..]));
        assert!(gone);
        assert_eq!(secret.as_deref(), Some(&b"secret"[..]));
    }

    /// The fuzzing tap's namespace answers what the guest sends: an ARP request for
    /// 10.213.0.1, written as the device's transmit path writes it, gets its reply on the
    /// tap, which is what `mmio_net`'s receive queue then takes.
    #[test]
    fn fuzz_tap_answers_arp() {
        use std::os::unix::io::AsRawFd;
        if let Some(reason) = net_unavailable() {
            println!("SKIP: {reason}");
            return;
        }
        let tap = fuzz_tap().expect("the fuzzing tap");
        let guest = [2u8, 0, 0, 0, 0, 2];
        let mut frame = vec![0u8; 12]; // the virtio-net header: no offloads
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(&guest);
        frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        frame.extend_from_slice(&guest);
        frame.extend_from_slice(&[10, 213, 0, 2]);
        frame.extend_from_slice(&[0; 6]);
        frame.extend_from_slice(&[10, 213, 0, 1]);
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::write(tap.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut buf = [0u8; 2048];
        loop {
            // SAFETY: the buffer is valid for writes of its length.
            let n = unsafe { libc::read(tap.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 12 + 21 {
                let eth = &buf[12..n as usize];
                if eth[12..14] == [0x08, 0x06] && eth[20..22] == [0, 2] {
                    assert_eq!(&eth[0..6], &guest, "the reply is for the guest");
                    break;
                }
            }
            assert!(std::time::Instant::now() < deadline, "no ARP reply");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
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
