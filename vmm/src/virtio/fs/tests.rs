//! The device against real guest memory: FUSE requests laid out as a guest driver would, served
//! by the worker thread, replies read back from the used ring and the reply buffers.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::test_support::{chained, desc};

const OP_LOOKUP: u32 = 1;
const OP_READLINK: u32 = 5;
const OP_MKDIR: u32 = 9;
const OP_OPEN: u32 = 14;
const OP_READ: u32 = 15;
const OP_INIT: u32 = 26;

const MEM: usize = 0x40_0000;
// Clear of the 0x2_0000..0x3_0000 buffers `random_chain` fills with noise.
const HI_QUEUE: u64 = 0x8_0000;
const REQ_QUEUE: u64 = 0x9_0000;
const BUFFERS: u64 = 0x10_0000;
const SLOT: u64 = 0x2000;

struct TempTree(PathBuf);
impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tree(name: &str) -> TempTree {
    let dir = std::env::temp_dir().join(format!("shoal-fs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hello"), "hi there").unwrap();
    std::os::unix::fs::symlink("/etc", dir.join("link")).unwrap();
    TempTree(dir)
}

/// A device with both queues activated over fresh guest memory.
struct Harness {
    mem: GuestMemoryMmap,
    req: MockSplitQueue<'static, GuestMemoryMmap>,
    fs: Fs,
    sent: u16,
    unique: u64,
}

impl Harness {
    fn new(dir: &Path) -> Harness {
        // Leaked so the mock queue can borrow it for the test's life.
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap(),
        ));
        let hi = MockSplitQueue::create(mem, GuestAddress(HI_QUEUE), 16);
        let req = MockSplitQueue::create(mem, GuestAddress(REQ_QUEUE), 256);
        let mut fs = Fs::new(&FsConfig {
            tag: "test".into(),
            dir: dir.into(),
            cache: CacheMode::Auto,
        })
        .unwrap();
        fs.activate(
            mem.clone(),
            vec![
                hi.create_queue::<Queue>().unwrap(),
                req.create_queue::<Queue>().unwrap(),
            ],
            Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        )
        .unwrap();
        Harness {
            mem: mem.clone(),
            req,
            fs,
            sent: 0,
            unique: 0,
        }
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(self.req.used_addr().unchecked_add(2))
            .unwrap()
    }

    /// Queues `descs` (one or more chains), notifies, and waits until `chains` more are used.
    fn submit(&mut self, descs: &[virtio_queue::desc::RawDescriptor], chains: u16) {
        self.req.add_desc_chains(descs, self.sent).unwrap();
        self.sent += descs.len() as u16;
        let before = self.used_idx();
        self.fs.queue_notify(1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used_idx().wrapping_sub(before) < chains {
            assert!(Instant::now() < deadline, "the device did not answer");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The used length of the most recent used element.
    fn last_used_len(&self) -> u32 {
        let slot = u64::from(self.used_idx().wrapping_sub(1) % 256);
        self.mem
            .read_obj(self.req.used_addr().unchecked_add(4 + slot * 8 + 4))
            .unwrap()
    }

    /// Sends one FUSE request; returns the reply's error field and body.
    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> (i32, Vec<u8>) {
        self.unique += 1;
        let mut msg = Vec::new();
        msg.extend_from_slice(&(40 + body.len() as u32).to_le_bytes());
        msg.extend_from_slice(&opcode.to_le_bytes());
        msg.extend_from_slice(&self.unique.to_le_bytes());
        msg.extend_from_slice(&nodeid.to_le_bytes());
        msg.extend_from_slice(&[0u8; 16]); // uid, gid, pid 0; no extensions
        msg.extend_from_slice(body);
        let slot = BUFFERS + u64::from(self.sent) * SLOT;
        self.mem.write_slice(&msg, GuestAddress(slot)).unwrap();
        let reply_at = slot + SLOT / 2;
        self.mem
            .write_slice(&[0xeeu8; 0x1000], GuestAddress(reply_at))
            .unwrap();
        self.submit(
            &[
                chained(slot, msg.len() as u32, false, self.sent + 1),
                desc(reply_at, 0x1000, VRING_DESC_F_WRITE, 0),
            ],
            1,
        );
        let used = self.last_used_len() as usize;
        assert!(used >= 16, "reply of {used} bytes");
        let mut reply = vec![0u8; used];
        self.mem
            .read_slice(&mut reply, GuestAddress(reply_at))
            .unwrap();
        let len = u32::from_le_bytes(reply[0..4].try_into().unwrap()) as usize;
        assert_eq!(len, used, "header length and used length differ");
        let error = i32::from_le_bytes(reply[4..8].try_into().unwrap());
        let unique = u64::from_le_bytes(reply[8..16].try_into().unwrap());
        assert_eq!(unique, self.unique);
        (error, reply[16..].to_vec())
    }

    fn init(&mut self) {
        let mut body = Vec::new();
        for v in [7u32, 31, 0x2_0000, 0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        let (err, out) = self.call(OP_INIT, 0, &body);
        assert_eq!(err, 0);
        assert_eq!(u32::from_le_bytes(out[0..4].try_into().unwrap()), 7);
    }

    /// LOOKUP: Ok((nodeid, mode, size)) or the negative errno.
    fn lookup(&mut self, parent: u64, name: &str) -> Result<(u64, u32, u64), i32> {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        let (err, out) = self.call(OP_LOOKUP, parent, &body);
        if err != 0 {
            return Err(err);
        }
        let u64_at = |o: usize| u64::from_le_bytes(out[o..o + 8].try_into().unwrap());
        let mode = u32::from_le_bytes(out[40 + 60..40 + 64].try_into().unwrap());
        Ok((u64_at(0), mode, u64_at(40 + 8)))
    }
}

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;

#[test]
fn serves_fuse_requests_inside_the_shared_tree_only() {
    let t = tree("serve");
    let mut h = Harness::new(&t.0);
    h.init();

    let (hello, mode, size) = h.lookup(1, "hello").unwrap();
    assert_eq!(mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(size, 8);
    let (err, out) = h.call(OP_OPEN, hello, &[0u8; 8]);
    assert_eq!(err, 0);
    let fh = &out[0..8];
    let mut read = fh.to_vec();
    read.extend_from_slice(&0u64.to_le_bytes());
    read.extend_from_slice(&100u32.to_le_bytes());
    read.extend_from_slice(&[0u8; 20]);
    let (err, data) = h.call(OP_READ, hello, &read);
    assert_eq!((err, data.as_slice()), (0, &b"hi there"[..]));

    // ".." at the root is the root; a name with a slash is refused.
    assert_eq!(h.lookup(1, "..").unwrap().0, 1);
    assert_eq!(h.lookup(1, "../etc"), Err(-libc::EINVAL));
    assert_eq!(h.lookup(1, "missing"), Err(-libc::ENOENT));

    // A symlink to /etc is a link for the guest to resolve in its own tree; nothing under it
    // is reachable through the share.
    let (link, mode, _) = h.lookup(1, "link").unwrap();
    assert_eq!(mode & libc::S_IFMT, libc::S_IFLNK);
    let (err, target) = h.call(OP_READLINK, link, &[]);
    assert_eq!((err, target.as_slice()), (0, &b"/etc"[..]));
    assert!(h.lookup(link, "passwd").is_err());

    let mut mkdir = Vec::new();
    mkdir.extend_from_slice(&0o755u32.to_le_bytes());
    mkdir.extend_from_slice(&0u32.to_le_bytes());
    mkdir.extend_from_slice(b"made\0");
    assert_eq!(h.call(OP_MKDIR, 1, &mkdir).0, 0);
    assert!(t.0.join("made").is_dir());

    // An operation nobody implements gets ENOSYS, not silence.
    assert_eq!(h.call(9999, 1, &[]).0, -libc::ENOSYS);
}

#[test]
fn malformed_requests_are_returned_without_touching_anything_else() {
    let t = tree("bad");
    let mut h = Harness::new(&t.0);
    h.init();
    let canary = 0x3f_0000;
    h.mem
        .write_slice(&[0x5au8; 64], GuestAddress(canary))
        .unwrap();
    let at = BUFFERS + 0x10_0000;
    // 1: a header cut short; 2: a header claiming more bytes than the chain has;
    // 3: descriptors outside guest memory; 4: a zero-length reply buffer.
    h.mem.write_slice(&[1u8; 10], GuestAddress(at)).unwrap();
    let mut long = Vec::new();
    long.extend_from_slice(&4096u32.to_le_bytes());
    long.extend_from_slice(&OP_LOOKUP.to_le_bytes());
    long.extend_from_slice(&[0u8; 32]);
    h.mem.write_slice(&long, GuestAddress(at + 0x100)).unwrap();
    h.mem.write_slice(&long, GuestAddress(at + 0x200)).unwrap();
    let s = h.sent;
    h.submit(
        &[
            chained(at, 10, false, s + 1),
            desc(at + 0x1000, 256, VRING_DESC_F_WRITE, 0),
            chained(at + 0x100, 40, false, s + 3),
            desc(at + 0x2000, 256, VRING_DESC_F_WRITE, 0),
            chained(MEM as u64 - 8, 40, false, s + 5),
            desc(u64::MAX - 4096, 256, VRING_DESC_F_WRITE, 0),
            chained(at + 0x200, 40, false, s + 7),
            desc(at + 0x3000, 0, VRING_DESC_F_WRITE, 0),
        ],
        4,
    );
    let canary_now: Vec<u8> = {
        let mut b = vec![0u8; 64];
        h.mem.read_slice(&mut b, GuestAddress(canary)).unwrap();
        b
    };
    assert!(canary_now.iter().all(|b| *b == 0x5a));
    // The device still serves well-formed requests afterwards.
    assert_eq!(h.lookup(1, "hello").unwrap().2, 8);
}

/// Random descriptor chains with plausible FUSE headers: the worker never panics and returns
/// every chain; the shared tree's files are still there.
#[test]
fn random_requests_through_the_device() {
    use crate::test_support::{random_chain, Rng};
    let t = tree("fuzz");
    let mut h = Harness::new(&t.0);
    h.init();
    let mut rng = Rng(0xf5_0001);
    for _ in 0..300 {
        let descs = random_chain(&mut rng, &h.mem);
        let head = virtio_queue::desc::split::Descriptor::from(descs[0]).addr();
        let _ = h.mem.write_obj(rng.below(64) as u32, head);
        let op = 1 + rng.below(50) as u32;
        let _ = h.mem.write_obj(op, head.unchecked_add(4));
        let _ = h.mem.write_obj(rng.below(4), head.unchecked_add(16));
        if h.sent as usize + descs.len() > 250 {
            break;
        }
        h.submit(&descs, 1);
    }
    assert_eq!(std::fs::read(t.0.join("hello")).unwrap(), b"hi there");
    assert!(h.sent > 100);
}
