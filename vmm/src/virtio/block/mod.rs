//! virtio-blk backed by a host file or block device.
//!
//! The file is opened with O_DIRECT where its file system allows it, so the page cache does
//! not hold a second copy of what the guest already caches. Aligned segments (the normal
//! case: the guest's block layer hands out sector-aligned buffers) go straight between the
//! file and guest memory; anything else goes through a buffered handle on the same file.
//! Requests are served on the device thread.
pub mod request;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile, WriteVolatile,
};

use super::{read_config_bytes, Interrupt, VirtioDevice, VirtioError};
use request::{Kind, Request, ID_BYTES, SECTOR_SIZE, S_IOERR, S_OK, S_UNSUPP};

/// virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
const QUEUE_SIZES: [u16; 1] = [256];
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
/// O_DIRECT wants buffers, offsets and lengths aligned to the logical block size.
const DIRECT_ALIGN: u64 = 512;

/// Errors from opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {cause}")]
    Open {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("disk image {path} is {size} bytes, not a whole number of 512-byte sectors")]
    Size { path: PathBuf, size: u64 },
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// One virtio-blk device.
pub struct Block {
    /// O_DIRECT when `direct`, else the same as `buffered`.
    file: File,
    buffered: File,
    direct: bool,
    read_only: bool,
    capacity: u64,
    id: [u8; ID_BYTES as usize],
    config: [u8; 8],
    active: Option<Active>,
}

impl Block {
    /// Opens `path` (read-only when asked) for a guest disk.
    pub fn open(path: &Path, read_only: bool) -> Result<Block, BlockError> {
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(!read_only);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let err = |source| BlockError::Open {
            path: path.into(),
            cause: source,
        };
        let buffered = open(false).map_err(err)?;
        let (file, direct) = match open(true) {
            Ok(f) => (f, true),
            // tmpfs and some others refuse O_DIRECT; the disk still works, cached.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(
                    "{}: file system does not support O_DIRECT; using the page cache",
                    path.display()
                );
                (buffered.try_clone().map_err(err)?, false)
            }
            Err(e) => return Err(err(e)),
        };
        let size = (&buffered).seek(SeekFrom::End(0)).map_err(err)?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::Size {
                path: path.into(),
                size,
            });
        }
        let mut id = [0u8; ID_BYTES as usize];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (slot, b) in id.iter_mut().zip(name.bytes()) {
            *slot = b;
        }
        Ok(Block {
            file,
            buffered,
            direct,
            read_only,
            capacity: size,
            id,
            config: (size / SECTOR_SIZE).to_le_bytes(),
            active: None,
        })
    }

    /// Whether the disk bypasses the host page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The file handle to use for one segment: O_DIRECT only when everything is aligned.
    fn handle(&self, mem: &GuestMemoryMmap, addr: GuestAddress, len: u32, offset: u64) -> &File {
        let host = mem.get_host_address(addr).map(|p| p as u64).unwrap_or(1);
        let aligned = host.is_multiple_of(DIRECT_ALIGN)
            && u64::from(len).is_multiple_of(DIRECT_ALIGN)
            && offset.is_multiple_of(DIRECT_ALIGN);
        if self.direct && aligned {
            &self.file
        } else {
            &self.buffered
        }
    }

    /// Runs one request; returns the status and the bytes written into guest buffers.
    fn execute(&self, mem: &GuestMemoryMmap, req: &Request) -> (u8, u32) {
        match req.kind {
            Kind::Read | Kind::Write => {
                let start = req.sector.checked_mul(SECTOR_SIZE);
                let in_range = start
                    .and_then(|s| s.checked_add(req.data_len()))
                    .is_some_and(|end| end <= self.capacity);
                if !in_range {
                    tracing::debug!(
                        sector = req.sector,
                        len = req.data_len(),
                        "virtio-blk: request beyond the disk"
                    );
                    return (S_IOERR, 0);
                }
                if req.kind == Kind::Write && self.read_only {
                    return (S_IOERR, 0);
                }
                let mut offset = start.unwrap_or(0);
                for &(addr, len) in &req.data {
                    let ok = self.transfer(mem, req.kind, addr, len, offset);
                    if let Err(e) = ok {
                        crate::guest_warn!(
                            "virtio-blk: {:?} at byte {offset} failed: {e}",
                            req.kind
                        );
                        return (S_IOERR, 0);
                    }
                    offset += u64::from(len);
                }
                let written = if req.kind == Kind::Read {
                    req.data_len() as u32
                } else {
                    0
                };
                (S_OK, written)
            }
            Kind::Flush => match self.file.sync_data() {
                Ok(()) => (S_OK, 0),
                Err(e) => {
                    crate::guest_warn!("virtio-blk: flush failed: {e}");
                    (S_IOERR, 0)
                }
            },
            Kind::GetId => {
                let Some(&(addr, len)) = req.data.first() else {
                    return (S_IOERR, 0);
                };
                let n = len.min(ID_BYTES) as usize;
                match mem.write_slice(&self.id[..n], addr) {
                    Ok(()) => (S_OK, n as u32),
                    Err(_) => (S_IOERR, 0),
                }
            }
            Kind::Unsupported(_) => (S_UNSUPP, 0),
        }
    }

    /// Moves one segment between the disk and guest memory, with no copy in between.
    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        kind: Kind,
        addr: GuestAddress,
        len: u32,
        offset: u64,
    ) -> std::io::Result<()> {
        let slice = mem
            .get_slice(addr, len as usize)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut file = self.handle(mem, addr, len, offset);
        file.seek(SeekFrom::Start(offset))?;
        let mut done = 0usize;
        while done < len as usize {
            let mut rest = slice
                .subslice(done, len as usize - done)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let n = if kind == Kind::Read {
                file.read_volatile(&mut rest)
            } else {
                file.write_volatile(&rest)
            }
            .map_err(|e| std::io::Error::other(e.to_string()))?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
    }

    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut chains = Vec::new();
        while let Some(chain) = active.queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            chains.push((head, request::parse(&active.mem, chain)));
        }
        if chains.is_empty() {
            return;
        }
        let (mem, interrupt) = (active.mem.clone(), active.interrupt.clone());
        let mut used = Vec::with_capacity(chains.len());
        for (head, parsed) in chains {
            let (status_addr, status, len) = match parsed {
                Ok(req) => {
                    let (status, len) = self.execute(&mem, &req);
                    (Some(req.status), status, len)
                }
                Err((e, status_addr)) => {
                    tracing::debug!("virtio-blk: bad request: {e}");
                    (status_addr, S_IOERR, 0)
                }
            };
            let total = match status_addr {
                Some(addr) if mem.write_obj(status, addr).is_ok() => len + 1,
                _ => 0,
            };
            used.push((head, total));
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        for (head, len) in used {
            if let Err(e) = active.queue.add_used(&mem, head, len) {
                crate::guest_warn!("virtio-blk: cannot return a request: {e:?}");
            }
        }
        interrupt.signal_used();
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn name(&self) -> &'static str {
        "block"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        F_FLUSH | if self.read_only { F_RO } else { 0 }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data)
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), VirtioError> {
        super::expect_queues("block", &queues, QUEUE_SIZES.len())?;
        self.active = Some(Active {
            mem,
            queue: queues.remove(0),
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_notify(&mut self, index: usize) {
        if index == 0 {
            self.process_queue();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{chained as d, desc};
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Address;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// The status byte that ends a request.
    fn last(addr: u64) -> RawDescriptor {
        desc(addr, 1, VRING_DESC_F_WRITE, 0)
    }

    struct Disk(PathBuf);
    impl Drop for Disk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn disk(name: &str, sectors: u64) -> Disk {
        // /var/tmp rather than /tmp: tmpfs has no O_DIRECT, and the point is to exercise it.
        let dir = if Path::new("/var/tmp").is_dir() {
            PathBuf::from("/var/tmp")
        } else {
            std::env::temp_dir()
        };
        let p = dir.join(format!("shoal-blk-{name}-{}", std::process::id()));
        let data: Vec<u8> = (0..sectors * 512).map(|i| (i / 512) as u8).collect();
        std::fs::write(&p, data).unwrap();
        Disk(p)
    }

    fn header(m: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        m.write_obj(kind, GuestAddress(at)).unwrap();
        m.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    #[test]
    fn reads_writes_flushes_and_reports_errors_through_the_queue() {
        let disk = disk("rw", 64);
        let mut blk = Block::open(&disk.0, false).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let q = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        // 0: read sectors 3..5 into 0x10_0000 (aligned: O_DIRECT path)
        header(&mem, 0x2_0000, request::T_IN, 3);
        // 1: write 512 bytes from an unaligned buffer to sector 10 (buffered path)
        header(&mem, 0x2_1000, request::T_OUT, 10);
        mem.write_slice(&[0xabu8; 512], GuestAddress(0x11_0010))
            .unwrap();
        // 2: flush; 3: read past the end; 4: unsupported type
        header(&mem, 0x2_2000, request::T_FLUSH, 0);
        header(&mem, 0x2_3000, request::T_IN, 63);
        header(&mem, 0x2_4000, 77, 0);
        q.add_desc_chains(
            &[
                d(0x2_0000, 16, false, 1),
                d(0x10_0000, 1024, true, 2),
                last(0x3_0000),
                d(0x2_1000, 16, false, 4),
                d(0x11_0010, 512, false, 5),
                last(0x3_0001),
                d(0x2_2000, 16, false, 7),
                last(0x3_0002),
                d(0x2_3000, 16, false, 9),
                d(0x12_0000, 1024, true, 10),
                last(0x3_0003),
                d(0x2_4000, 16, false, 12),
                last(0x3_0004),
            ],
            0,
        )
        .unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        blk.activate(
            mem.clone(),
            vec![q.create_queue::<Queue>().unwrap()],
            Interrupt::new(irq.try_clone().unwrap()),
        )
        .unwrap();
        blk.queue_notify(0);

        let status = |i: u64| mem.read_obj::<u8>(GuestAddress(0x3_0000 + i)).unwrap();
        assert_eq!(
            [status(0), status(1), status(2), status(3), status(4)],
            [S_OK, S_OK, S_OK, S_IOERR, S_UNSUPP]
        );
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert!(got[..512].iter().all(|b| *b == 3) && got[512..].iter().all(|b| *b == 4));
        let file = std::fs::read(&disk.0).unwrap();
        assert!(file[10 * 512..11 * 512].iter().all(|b| *b == 0xab));
        let used_idx: u16 = mem.read_obj(q.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(used_idx, 5);
        // The first used element reports the read's data plus the status byte.
        let used_len: u32 = mem.read_obj(q.used_addr().unchecked_add(4 + 4)).unwrap();
        assert_eq!(used_len, 1025);
        assert!(irq.read().is_ok());
    }

    #[test]
    fn read_only_disks_refuse_writes_and_say_so_in_features() {
        let disk = disk("ro", 8);
        let mut blk = Block::open(&disk.0, true).unwrap();
        assert_ne!(blk.features() & F_RO, 0);
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let q = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        header(&mem, 0x2_0000, request::T_OUT, 0);
        q.add_desc_chains(
            &[
                d(0x2_0000, 16, false, 1),
                d(0x10_0000, 512, false, 2),
                last(0x3_0000),
            ],
            0,
        )
        .unwrap();
        blk.activate(
            mem.clone(),
            vec![q.create_queue::<Queue>().unwrap()],
            Interrupt::new(EventFd::new(0).unwrap()),
        )
        .unwrap();
        blk.queue_notify(0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3_0000)).unwrap(), S_IOERR);
        assert!(std::fs::read(&disk.0).unwrap()[..512]
            .iter()
            .all(|b| *b == 0));
    }

    #[test]
    fn bad_images_are_named() {
        let e = Block::open(Path::new("/nonexistent/disk.img"), false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/nonexistent/disk.img"), "{e}");
        let p = std::env::temp_dir().join(format!("shoal-blk-odd-{}", std::process::id()));
        std::fs::write(&p, [0u8; 1000]).unwrap();
        let e = Block::open(&p, false).err().unwrap();
        assert!(matches!(e, BlockError::Size { size: 1000, .. }));
        std::fs::remove_file(&p).unwrap();
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::test_support::{random_chain, Rng, MEM_SIZE};
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// Random requests through the whole device: no panic, the disk keeps its size, and
    /// every used element is returned.
    #[test]
    fn random_requests_through_the_device() {
        let path = std::env::temp_dir().join(format!("shoal-blk-fuzz-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 64 * 512]).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let mut rng = Rng(0xd15c_0001);
        for round in 0..300 {
            let mut blk = Block::open(&path, round % 3 == 0).unwrap();
            let q = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
            // A plausible header most of the time, so execution paths are reached.
            let kind = [
                request::T_IN,
                request::T_OUT,
                request::T_FLUSH,
                request::T_GET_ID,
                1234,
            ][rng.below(5) as usize];
            let descs = random_chain(&mut rng, &mem);
            let head = SplitDescriptorView::addr(&descs[0]);
            let _ = mem.write_obj(kind, head);
            let _ = mem.write_obj(rng.below(80), GuestAddress(head.0.wrapping_add(8)));
            q.add_desc_chains(&descs, 0).unwrap();
            let queue = q.create_queue::<Queue>().unwrap();
            blk.activate(
                mem.clone(),
                vec![queue],
                Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            )
            .unwrap();
            blk.queue_notify(0);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 * 512);
        }
        std::fs::remove_file(&path).unwrap();
    }

    /// The head descriptor's address (RawDescriptor keeps its fields private).
    struct SplitDescriptorView;
    impl SplitDescriptorView {
        fn addr(d: &virtio_queue::desc::RawDescriptor) -> GuestAddress {
            virtio_queue::desc::split::Descriptor::from(*d).addr()
        }
    }
}
