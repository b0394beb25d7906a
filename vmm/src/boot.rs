//! Putting a Linux kernel into guest memory: the ELF `vmlinux`, the initramfs, the command
//! line and `boot_params` for the 64-bit boot protocol, plus the page tables and GDT the
//! vCPUs start with.
use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};

use crate::layout::*;
use crate::memory::{e820_map, E820Kind};

/// Errors from loading the kernel, initramfs and boot data.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel image {path}: {cause}")]
    OpenKernel {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("kernel image {path} is not a loadable x86-64 ELF vmlinux: {cause}")]
    LoadKernel {
        path: PathBuf,
        cause: linux_loader::loader::Error,
    },
    #[error("cannot open initramfs {path}: {cause}")]
    OpenInitrd {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error("cannot read initramfs {path} into guest memory: {cause}")]
    ReadInitrd {
        path: PathBuf,
        cause: vm_memory::GuestMemoryError,
    },
    #[error("kernel command line is invalid: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("cannot write {what} into guest memory: {cause}")]
    Write {
        what: &'static str,
        cause: vm_memory::GuestMemoryError,
    },
    #[error("too many vCPUs for the MP table: {0}")]
    TooManyVcpus(u8),
}

/// Where the kernel landed.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point (`startup_64`).
    pub entry: GuestAddress,
    /// First byte after the kernel's segments.
    pub end: u64,
}

/// Where the initramfs landed.
#[derive(Debug, Clone, Copy)]
pub struct LoadedInitrd {
    pub addr: GuestAddress,
    pub size: u64,
}

/// Loads an uncompressed ELF kernel at its physical addresses (at or above 1 MiB).
///
/// Page-aligned parts of the kernel's segments are not copied: the file's pages are mapped
/// copy-on-write over guest RAM (see [`SharedPages`]), so every VM booted from the same
/// `vmlinux` shares the host page cache's copy of the kernel until the guest writes a page.
/// The file must therefore be replaced by renaming a new one over it, never rewritten in
/// place (`scripts/install` does so).
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.into(),
        cause: source,
    })?;
    let mut file = SharedPages { file, shared: 0 };
    let result =
        Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|source| {
            BootError::LoadKernel {
                path: path.into(),
                cause: source,
            }
        })?;
    tracing::debug!(
        shared_bytes = file.shared,
        "kernel pages mapped from {}",
        path.display()
    );
    Ok(LoadedKernel {
        entry: result.kernel_load,
        end: result.kernel_end,
    })
}

const PAGE_SIZE: usize = 4096;

/// A kernel image reader for the ELF loader that maps what it can instead of copying it.
/// When the file position and the destination in guest RAM are both page-aligned, whole
/// pages are mapped `MAP_PRIVATE | MAP_FIXED` from the file over the guest's anonymous RAM;
/// the partial last page is read as usual (so the bytes after it stay zero, as a segment's
/// bss needs). Pages the guest later writes become private copies; pages it only reads stay
/// shared with every other VM using the same file. Where the file system cannot map the
/// file, the reader copies.
struct SharedPages {
    file: File,
    /// Bytes mapped rather than copied.
    shared: u64,
}

impl SharedPages {
    /// Maps `len` bytes of the file at `offset` over guest RAM at `host`.
    fn map(&self, offset: u64, host: *mut u8, len: usize) -> std::io::Result<()> {
        // SAFETY: `host..host+len` is part of a VolatileSlice of guest RAM, which the
        // GuestMemoryMmap that produced it keeps mapped for the VM's life; both ends are
        // page-aligned (checked by the caller). MAP_FIXED swaps those pages for a private,
        // writable, copy-on-write view of the file, so the range stays mapped with the same
        // access and the later munmap of the whole region still covers it. No Rust reference
        // points into guest RAM (it is only accessed through volatile operations), and the
        // kernel is loaded before any vCPU exists, so no one observes the swap; KVM follows
        // host mapping changes through its MMU notifier.
        let mapped = unsafe {
            libc::mmap(
                host.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                std::os::fd::AsRawFd::as_raw_fd(&self.file),
                offset as libc::off_t,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl std::io::Read for SharedPages {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

impl std::io::Seek for SharedPages {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.file.seek(pos)
    }
}

impl vm_memory::ReadVolatile for SharedPages {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &mut vm_memory::VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        use std::io::Seek;
        use vm_memory::VolatileMemoryError as E;
        let offset = self.file.stream_position().map_err(E::IOError)?;
        let host = buf.ptr_guard_mut().as_ptr();
        let whole = buf.len() / PAGE_SIZE * PAGE_SIZE;
        let mut done = 0;
        if whole > 0
            && offset.is_multiple_of(PAGE_SIZE as u64)
            && (host as usize).is_multiple_of(PAGE_SIZE)
        {
            match self.map(offset, host, whole) {
                Ok(()) => {
                    self.file
                        .seek(std::io::SeekFrom::Current(whole as i64))
                        .map_err(E::IOError)?;
                    self.shared += whole as u64;
                    done = whole;
                }
                Err(e) => tracing::debug!("kernel pages cannot be mapped, copying them: {e}"),
            }
        }
        // The loader wants the whole buffer from one call.
        while done < buf.len() {
            let mut rest = buf.subslice(done, buf.len() - done)?;
            match self.file.read_volatile(&mut rest)? {
                0 => break,
                n => done += n,
            }
        }
        Ok(done)
    }
}

/// Copies the initramfs to the top of low RAM (page aligned), where the kernel expects it.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<LoadedInitrd, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::OpenInitrd {
        path: path.into(),
        cause: source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| BootError::OpenInitrd {
            path: path.into(),
            cause: source,
        })?
        .len();
    let low_ram_end = mem
        .iter()
        .next()
        .map(|r| r.start_addr().raw_value() + r.len())
        .unwrap_or(0);
    let addr = low_ram_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end);
    let Some(addr) = addr else {
        return Err(BootError::InitrdTooLarge {
            path: path.into(),
            size,
        });
    };
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| BootError::ReadInitrd {
            path: path.into(),
            cause: source,
        })?;
    Ok(LoadedInitrd {
        addr: GuestAddress(addr),
        size,
    })
}

/// Builds a command line from the user's text plus the devices the VMM added, checking the
/// kernel's length limit.
pub fn build_cmdline(base: &str, extra: &[String]) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    let total = base.len() + extra.iter().map(|e| e.len() + 1).sum::<usize>();
    if total >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: total,
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    if !base.trim().is_empty() {
        cmdline.insert_str(base).map_err(BootError::Cmdline)?;
    }
    for e in extra {
        cmdline.insert_str(e).map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Writes the command line to its fixed place and returns its length without the NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &Cmdline) -> Result<usize, BootError> {
    let cstring = cmdline.as_cstring().map_err(BootError::Cmdline)?;
    let bytes = cstring.as_bytes_with_nul();
    mem.write_slice(bytes, GuestAddress(CMDLINE_START))
        .map_err(|source| BootError::Write {
            what: "command line",
            cause: source,
        })?;
    Ok(bytes.len() - 1)
}

/// `boot_params` as plain bytes for guest memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
pub struct BootParams(pub boot_params);

// SAFETY: `boot_params` is a packed C struct of integers and arrays of integers generated by
// bindgen: every bit pattern is a valid value and it has no padding with undefined contents.
unsafe impl ByteValued for BootParams {}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// Fills `boot_params` (the "zero page") for the 64-bit boot protocol.
pub fn boot_params(mem_size: u64, cmdline_len: usize, initrd: Option<LoadedInitrd>) -> BootParams {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr.raw_value() as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let map = e820_map(mem_size);
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        slot.addr = entry.addr;
        slot.size = entry.size;
        slot.r#type = match entry.kind {
            E820Kind::Ram => 1,
            E820Kind::Reserved => 2,
        };
    }
    params.e820_entries = map.len() as u8;
    BootParams(params)
}

/// Writes `boot_params` to the zero page.
pub fn write_boot_params(mem: &GuestMemoryMmap, params: &BootParams) -> Result<(), BootError> {
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_START))
        .map_err(|source| BootError::Write {
            what: "boot_params",
            cause: source,
        })
}

/// A GDT entry from flags, base and limit (the usual x86 packing).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | (((limit as u64 & 0x000f_0000) >> 16) << 48)
        | ((flags as u64 & 0x0000_f0ff) << 40)
}

/// Boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Writes the boot GDT and an empty IDT.
pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|source| BootError::Write {
                what: "GDT",
                cause: source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|source| BootError::Write {
            what: "IDT",
            cause: source,
        })
}

/// Identity-maps the first 4 GiB with 2 MiB pages: PML4[0] -> PDPT, PDPT[0..4] -> 4 PDs.
/// The kernel replaces these early; tiny test payloads use them to reach MMIO devices.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let w = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(|source| BootError::Write {
                what: "page tables",
                cause: source,
            })
    };
    w(PDPTE_START | 0x03, PML4_START)?;
    for pd in 0..4u64 {
        let pd_addr = PDE_START + pd * 0x1000;
        w(pd_addr | 0x03, PDPTE_START + pd * 8)?;
        for i in 0..512u64 {
            // Present | writable | page size (2 MiB).
            w(((pd << 30) | (i << 21)) | 0x83, pd_addr + i * 8)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (mib << 20) as usize)]).unwrap()
    }

    /// A file of `pages` pages plus 100 bytes, each byte a function of its offset.
    fn image(name: &str, pages: usize) -> (PathBuf, Vec<u8>) {
        let data: Vec<u8> = (0..pages * PAGE_SIZE + 100)
            .map(|i| (i % 251) as u8 + 1)
            .collect();
        let path = std::env::temp_dir().join(format!("shoal-pages-{name}-{}", std::process::id()));
        std::fs::write(&path, &data).unwrap();
        (path, data)
    }

    fn mapped_from(path: &Path, host: usize) -> bool {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .any(|l| {
                let range = l.split_whitespace().next().unwrap();
                let (lo, hi) = range.split_once('-').unwrap();
                let (lo, hi) = (
                    usize::from_str_radix(lo, 16).unwrap(),
                    usize::from_str_radix(hi, 16).unwrap(),
                );
                (lo..hi).contains(&host) && l.ends_with(path.to_str().unwrap())
            })
    }

    #[test]
    fn aligned_kernel_pages_are_mapped_private_and_the_tail_copied() {
        let (path, data) = image("aligned", 3);
        let m = mem(1);
        let mut r = SharedPages {
            file: File::open(&path).unwrap(),
            shared: 0,
        };
        m.read_exact_volatile_from(GuestAddress(0x1_0000), &mut r, data.len())
            .unwrap();
        assert_eq!(r.shared, 3 * PAGE_SIZE as u64);
        let mut got = vec![0u8; data.len() + 16];
        m.read_slice(&mut got, GuestAddress(0x1_0000)).unwrap();
        assert_eq!(&got[..data.len()], &data[..]);
        assert!(
            got[data.len()..].iter().all(|b| *b == 0),
            "bytes after the image stay zero"
        );
        let host = m.get_host_address(GuestAddress(0x1_0000)).unwrap() as usize;
        assert!(
            mapped_from(&path, host),
            "the first page comes from the file"
        );
        assert!(
            !mapped_from(&path, host + 3 * PAGE_SIZE),
            "the tail page is guest RAM"
        );
        // A guest write changes guest memory only, never the file.
        m.write_obj(0xffu8, GuestAddress(0x1_0000)).unwrap();
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x1_0000)).unwrap(), 0xff);
        assert_eq!(std::fs::read(&path).unwrap(), data);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn unaligned_kernel_pages_are_copied() {
        let (path, data) = image("unaligned", 2);
        let m = mem(1);
        let mut r = SharedPages {
            file: File::open(&path).unwrap(),
            shared: 0,
        };
        m.read_exact_volatile_from(GuestAddress(0x1_0010), &mut r, data.len())
            .unwrap();
        assert_eq!(r.shared, 0);
        let mut got = vec![0u8; data.len()];
        m.read_slice(&mut got, GuestAddress(0x1_0010)).unwrap();
        assert_eq!(got, data);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn boot_params_carry_cmdline_initrd_and_e820() {
        let initrd = LoadedInitrd {
            addr: GuestAddress(0x700_0000),
            size: 0x1234,
        };
        let p = boot_params(128 << 20, 42, Some(initrd)).0;
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!({ hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!(p.e820_entries, 3);
        let e2 = p.e820_table[2];
        assert_eq!(
            ({ e2.addr }, { e2.size }, { e2.r#type }),
            (HIMEM_START, (128 << 20) - HIMEM_START, 1)
        );
    }

    #[test]
    fn cmdline_is_written_nul_terminated() {
        let m = mem(16);
        let c = build_cmdline(
            "console=ttyS0 reboot=k",
            &["virtio_mmio.device=4K@0xd0000000:5".into()],
        )
        .unwrap();
        let len = write_cmdline(&m, &c).unwrap();
        let mut buf = vec![0u8; len + 1];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(
            &buf[..len],
            b"console=ttyS0 reboot=k virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(buf[len], 0);
    }

    #[test]
    fn cmdline_over_the_limit_is_refused() {
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            build_cmdline(&long, &[]),
            Err(BootError::CmdlineTooLong { .. })
        ));
        let almost = "y".repeat(CMDLINE_MAX_SIZE - 20);
        assert!(matches!(
            build_cmdline(&almost, &["virtio_mmio.device=4K@0xd0000000:5".into()]),
            Err(BootError::CmdlineTooLong { .. })
        ));
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let m = mem(16);
        write_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpt3: u64 = m.read_obj(GuestAddress(PDPTE_START + 24)).unwrap();
        assert_eq!(pdpt3, (PDE_START + 0x3000) | 3);
        // The PD entry covering the first virtio-mmio window maps it to itself.
        let idx = (VIRTIO_MMIO_BASE >> 21) & 511;
        let pde: u64 = m
            .read_obj(GuestAddress(PDE_START + 0x3000 + idx * 8))
            .unwrap();
        assert_eq!(pde & !0xfff, VIRTIO_MMIO_BASE);
    }

    #[test]
    fn gdt_entries_match_long_mode_descriptors() {
        assert_eq!(BOOT_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn missing_and_bad_kernels_are_named() {
        let m = mem(16);
        let err = load_kernel(&m, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
        let dir = std::env::temp_dir().join(format!("shoal-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_elf = dir.join("not-elf");
        std::fs::write(&not_elf, b"#!/bin/sh\necho this is not a kernel\n").unwrap();
        let err = load_kernel(&m, &not_elf).unwrap_err();
        assert!(matches!(err, BootError::LoadKernel { .. }), "{err}");
        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            load_kernel(&m, &empty),
            Err(BootError::LoadKernel { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram() {
        let m = mem(32);
        let dir = std::env::temp_dir().join(format!("shoal-initrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("initrd");
        std::fs::write(&path, vec![0xabu8; 10_000]).unwrap();
        let loaded = load_initrd(&m, &path, 0x20_0000).unwrap();
        assert_eq!(loaded.size, 10_000);
        assert_eq!(loaded.addr.raw_value() & 0xfff, 0);
        assert!(loaded.addr.raw_value() + 10_000 <= 32 << 20);
        let b: u8 = m.read_obj(loaded.addr.unchecked_add(9_999)).unwrap();
        assert_eq!(b, 0xab);
        // Larger than the space above the kernel.
        std::fs::write(&path, vec![0u8; 31 << 20]).unwrap();
        assert!(matches!(
            load_initrd(&m, &path, 0x20_0000),
            Err(BootError::InitrdTooLarge { .. })
        ));
        let missing = load_initrd(&m, &dir.join("missing"), 0);
        // The message names the cause, and a walk of the chain (what `{:#}` prints) adds
        // nothing: the cause shows once.
        if let Err(e) = &missing {
            let mut line = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                line = format!("{line}: {c}");
                cause = c.source();
            }
            assert_eq!(
                line.matches("No such file or directory").count(),
                1,
                "{line}"
            );
        }
        assert!(matches!(missing, Err(BootError::OpenInitrd { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
