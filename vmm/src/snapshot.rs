//! VM snapshots, the ground VM templates stand on: a paused VM's vCPU, interrupt-controller,
//! PIT, clock and serial state go to a state file, its RAM to a memory file; a new VM is
//! restored from the pair with its RAM mapped from the memory file `MAP_PRIVATE`, so every
//! VM restored from one snapshot shares the pages none of them has written.
//!
//! State file: a 32-byte header (magic `SHOALSNP`, format version, payload length, CRC-32 of
//! the payload) and the payload, a fixed sequence of length-prefixed records. KVM structures
//! are stored as their raw bytes (the kernel ABI keeps their layout stable); a record whose
//! length differs from the structure it should hold is refused.
//!
//! Memory file: one 4 KiB header page (magic `SHOALMEM`, format version, the identity it
//! shares with its state file, RAM size), then guest RAM, region after region. Pages that
//! are all zero are left as holes, so a mostly idle guest's file is small on disk.
//!
//! virtio devices are saved as their transport registers and queue positions. vsock host
//! connections are not carried over: a restored guest is told its vsock transport was reset.
//! A virtio-fs share can be saved only before the guest has used it (its FUSE session lives
//! in the VMM); disks and network cards cannot be saved yet.
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap,
};
use vm_superio::serial::SerialState;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use virtio_queue::QueueState;

use crate::memory::ram_ranges;
use crate::vcpu::VcpuState;
use crate::virtio::mmio::TransportState;
use crate::vm::VmState;

/// Version of both file formats; a file of any other version is refused.
pub const FORMAT_VERSION: u32 = 2;
const STATE_MAGIC: &[u8; 8] = b"SHOALSNP";
const MEMORY_MAGIC: &[u8; 8] = b"SHOALMEM";
const STATE_HEADER: usize = 32;
/// Size of the memory file's header; guest RAM starts at this offset (page-aligned, so it
/// can be mapped).
pub const MEMORY_HEADER: u64 = 4096;
const PAGE: usize = 4096;

/// Errors from saving or loading a snapshot. Each names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot {what} {path}: {cause}")]
    Io {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path} is not a shoal snapshot {kind} file")]
    NotASnapshot { path: PathBuf, kind: &'static str },
    #[error("{path} is a snapshot of format version {found}; this shoal reads version {FORMAT_VERSION} (make the template again with this version)")]
    Version { path: PathBuf, found: u32 },
    #[error("{path} is truncated: {expected} bytes expected, {found} found")]
    Truncated {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{path} is corrupted: its checksum does not match its contents")]
    Checksum { path: PathBuf },
    #[error("{path} is malformed: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("memory file {path} does not belong to this snapshot's state file (made by another snapshot)")]
    ForeignMemory { path: PathBuf },
    #[error("cannot map the memory file {path}: {cause}")]
    Map {
        path: PathBuf,
        cause: vm_memory::mmap::MmapRegionError,
    },
    #[error("the snapshot is of a VM with {found}; {wanted} was asked for")]
    SizeMismatch { found: String, wanted: String },
    #[error("cannot snapshot this VM: {0}")]
    Unsupported(&'static str),
    #[error("cannot snapshot this VM: {0}")]
    Device(crate::virtio::VirtioError),
    #[error("the snapshot's VM has the devices [{found}]; this VM asks for [{wanted}] (make the template with the same devices)")]
    DeviceMismatch { found: String, wanted: String },
    #[error("cannot restore the snapshot's {device} device: {cause}")]
    DeviceRestore {
        device: &'static str,
        cause: crate::virtio::VirtioError,
    },
    #[error("the VM must be paused to be snapshotted")]
    NotPaused,
    #[error("the vCPUs did not pause within {0:?}")]
    PauseTimeout(std::time::Duration),
    #[error("the VM has ended; there is nothing to pause")]
    Ended,
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuError),
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
}

type Result<T> = std::result::Result<T, SnapshotError>;

/// What a state file holds.
pub struct Snapshot {
    pub memory_mib: u64,
    /// Shared with the memory file, so a state file is never paired with another's memory.
    pub id: [u8; 16],
    pub vm: VmState,
    pub serial: SerialState,
    pub vcpus: Vec<VcpuState>,
    /// The virtio transports, in bus order.
    pub devices: Vec<TransportState>,
}

/// Appends records to a payload.
struct Writer(Vec<u8>);

impl Writer {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn record(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(
            &u32::try_from(bytes.len())
                .expect("record under 4 GiB")
                .to_le_bytes(),
        );
        self.0.extend_from_slice(bytes);
    }

    fn pod<T: IntoBytes + Immutable>(&mut self, v: &T) {
        self.record(v.as_bytes());
    }

    fn pods<T: IntoBytes + Immutable>(&mut self, items: &[T]) {
        self.u64(items.len() as u64);
        for item in items {
            self.pod(item);
        }
    }
}

/// Reads a payload's records back, naming what is missing or of the wrong size.
struct Reader<'a> {
    buf: &'a [u8],
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn malformed(&self, what: impl Into<String>) -> SnapshotError {
        SnapshotError::Malformed {
            path: self.path.into(),
            what: what.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(self.malformed(format!("it ends inside {what}")));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        let bytes = self.take(8, what)?;
        Ok(u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
    }

    fn record(&mut self, what: &str) -> Result<&'a [u8]> {
        let len = self.take(4, what)?;
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        self.take(len, what)
    }

    fn pod<T: FromBytes>(&mut self, what: &str) -> Result<T> {
        let bytes = self.record(what)?;
        T::read_from_bytes(bytes).map_err(|_| {
            self.malformed(format!(
                "{what} is {} bytes, not {}",
                bytes.len(),
                std::mem::size_of::<T>()
            ))
        })
    }

    fn pods<T: FromBytes>(&mut self, what: &str, max: u64) -> Result<Vec<T>> {
        let n = self.u64(what)?;
        if n > max {
            return Err(self.malformed(format!("{n} {what}, more than {max}")));
        }
        (0..n).map(|_| self.pod(what)).collect()
    }
}

pub(crate) fn encode(s: &Snapshot) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    w.u64(s.memory_mib);
    w.record(&s.id);
    w.pod(&s.vm.pic_master);
    w.pod(&s.vm.pic_slave);
    w.pod(&s.vm.ioapic);
    w.pod(&s.vm.pit);
    w.pod(&s.vm.clock);
    let serial = &s.serial;
    w.record(&[
        serial.baud_divisor_low,
        serial.baud_divisor_high,
        serial.interrupt_enable,
        serial.interrupt_identification,
        serial.line_control,
        serial.line_status,
        serial.modem_control,
        serial.modem_status,
        serial.scratch,
    ]);
    w.record(&serial.in_buffer);
    w.u64(s.vcpus.len() as u64);
    for v in &s.vcpus {
        w.pods(&v.cpuid);
        w.pod(&v.regs);
        w.pod(&v.sregs);
        w.pod(&v.xsave);
        w.pod(&v.xcrs);
        w.pod(&v.debugregs);
        w.pod(&v.lapic);
        w.pod(&v.mp_state);
        w.pod(&v.events);
        w.pods(&v.msrs);
        w.u64(u64::from(v.tsc_khz));
    }
    w.u64(s.devices.len() as u64);
    for d in &s.devices {
        for v in [
            u64::from(d.device_type),
            u64::from(d.status),
            d.driver_features,
            u64::from(d.queue_select),
            u64::from(d.device_features_select),
            u64::from(d.driver_features_select),
            u64::from(d.config_generation),
            u64::from(d.interrupt_status),
            u64::from(d.active),
        ] {
            w.u64(v);
        }
        w.u64(d.queues.len() as u64);
        for q in &d.queues {
            for v in [
                u64::from(q.max_size),
                u64::from(q.next_avail),
                u64::from(q.next_used),
                u64::from(q.event_idx_enabled),
                u64::from(q.size),
                u64::from(q.ready),
                q.desc_table,
                q.avail_ring,
                q.used_ring,
            ] {
                w.u64(v);
            }
        }
    }
    w.0
}

/// Largest number of queues one device's record may hold.
const MAX_QUEUES: u64 = 64;

fn decode_device(r: &mut Reader) -> Result<TransportState> {
    let mut next = |what: &str, max: u64| -> Result<u64> {
        let v = r.u64(what)?;
        if v > max {
            return Err(r.malformed(format!("{what} is {v}, more than {max}")));
        }
        Ok(v)
    };
    let u32_max = u64::from(u32::MAX);
    let mut d = TransportState {
        device_type: next("a device type", u32_max)? as u32,
        status: next("a device status", u32_max)? as u32,
        driver_features: next("a device's features", u64::MAX)?,
        queue_select: next("a device's queue selector", u32_max)? as u32,
        device_features_select: next("a device's feature selector", u32_max)? as u32,
        driver_features_select: next("a device's feature selector", u32_max)? as u32,
        config_generation: next("a device's config generation", u32_max)? as u32,
        interrupt_status: next("a device's interrupt status", u32_max)? as u32,
        active: next("a device's activation", 1)? == 1,
        queues: Vec::new(),
    };
    let count = next("a device's queue count", MAX_QUEUES)?;
    let u16_max = u64::from(u16::MAX);
    for _ in 0..count {
        d.queues.push(QueueState {
            max_size: next("a queue's maximum size", u16_max)? as u16,
            next_avail: next("a queue's next available", u16_max)? as u16,
            next_used: next("a queue's next used", u16_max)? as u16,
            event_idx_enabled: next("a queue's event index flag", 1)? == 1,
            size: next("a queue's size", u16_max)? as u16,
            ready: next("a queue's ready flag", 1)? == 1,
            desc_table: next("a queue's descriptor table", u64::MAX)?,
            avail_ring: next("a queue's available ring", u64::MAX)?,
            used_ring: next("a queue's used ring", u64::MAX)?,
        });
    }
    Ok(d)
}

pub(crate) fn decode(payload: &[u8], path: &Path) -> Result<Snapshot> {
    let mut r = Reader { buf: payload, path };
    let memory_mib = r.u64("the memory size")?;
    let id: [u8; 16] = r
        .record("the snapshot id")?
        .try_into()
        .map_err(|_| r.malformed("the snapshot id is not 16 bytes"))?;
    let vm = VmState {
        pic_master: r.pod::<kvm_irqchip>("the master PIC")?,
        pic_slave: r.pod::<kvm_irqchip>("the slave PIC")?,
        ioapic: r.pod::<kvm_irqchip>("the IOAPIC")?,
        pit: r.pod::<kvm_pit_state2>("the PIT")?,
        clock: r.pod::<kvm_clock_data>("the KVM clock")?,
    };
    let regs: [u8; 9] = r
        .record("the serial port")?
        .try_into()
        .map_err(|_| r.malformed("the serial port's registers are not 9 bytes"))?;
    let serial = SerialState {
        baud_divisor_low: regs[0],
        baud_divisor_high: regs[1],
        interrupt_enable: regs[2],
        interrupt_identification: regs[3],
        line_control: regs[4],
        line_status: regs[5],
        modem_control: regs[6],
        modem_status: regs[7],
        scratch: regs[8],
        in_buffer: r.record("the serial input")?.to_vec(),
    };
    if !(crate::memory::MIN_MEMORY_MIB..=1 << 30).contains(&memory_mib) {
        return Err(r.malformed(format!("a VM of {memory_mib} MiB")));
    }
    let count = r.u64("the vCPU count")?;
    if count == 0 || count > u64::from(crate::mptable::MAX_VCPUS) {
        return Err(r.malformed(format!("{count} vCPUs")));
    }
    let mut vcpus = Vec::new();
    for _ in 0..count {
        vcpus.push(VcpuState {
            cpuid: r.pods::<kvm_cpuid_entry2>(
                "CPUID entries",
                kvm_bindings::KVM_MAX_CPUID_ENTRIES as u64,
            )?,
            regs: r.pod::<kvm_regs>("vCPU registers")?,
            sregs: r.pod::<kvm_sregs>("vCPU special registers")?,
            xsave: r.pod::<kvm_xsave>("the xsave area")?,
            xcrs: r.pod::<kvm_xcrs>("the XCRs")?,
            debugregs: r.pod::<kvm_debugregs>("the debug registers")?,
            lapic: r.pod::<kvm_lapic_state>("the LAPIC")?,
            mp_state: r.pod::<kvm_mp_state>("the MP state")?,
            events: r.pod::<kvm_vcpu_events>("the pending events")?,
            msrs: r.pods::<kvm_msr_entry>("MSRs", 4096)?,
            tsc_khz: u32::try_from(r.u64("the TSC frequency")?)
                .map_err(|_| r.malformed("the TSC frequency is out of range"))?,
        });
    }
    let count = r.u64("the device count")?;
    if count > u64::from(crate::layout::VIRTIO_MMIO_MAX_DEVICES) {
        return Err(r.malformed(format!("{count} devices")));
    }
    let devices = (0..count)
        .map(|_| decode_device(&mut r))
        .collect::<Result<Vec<_>>>()?;
    if !r.buf.is_empty() {
        return Err(r.malformed(format!("{} bytes follow the last device", r.buf.len())));
    }
    Ok(Snapshot {
        memory_mib,
        id,
        vm,
        serial,
        vcpus,
        devices,
    })
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io {
        what,
        path,
        cause: source,
    }
}

/// A fresh random identity for a snapshot.
pub fn new_id() -> std::io::Result<[u8; 16]> {
    let mut id = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut id)?;
    Ok(id)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader never sees a
/// half-written file under the final name.
fn write_atomically(path: &Path, fill: impl FnOnce(&File) -> std::io::Result<()>) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let result = File::create(&tmp)
        .and_then(|f| {
            fill(&f)?;
            f.sync_all()
        })
        .and_then(|_| std::fs::rename(&tmp, path))
        // The rename itself lasts only once the directory is on disk too.
        .and_then(|_| File::open(dir)?.sync_all());
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io("write", path))
}

/// Writes the state file.
pub fn write_state(path: &Path, snapshot: &Snapshot) -> Result<()> {
    let payload = encode(snapshot);
    let mut header = Vec::with_capacity(STATE_HEADER);
    header.extend_from_slice(STATE_MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    header.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    write_atomically(path, |mut f| {
        f.write_all(&header)?;
        f.write_all(&payload)
    })
}

/// Largest payload a state file may declare (a few KiB per vCPU in practice).
const MAX_PAYLOAD: u64 = 64 << 20;

/// Reads and checks a state file: magic, version, length and checksum, then every record.
/// The header is read first, so a wrong file (a memory file, say) is not read whole.
pub fn read_state(path: &Path) -> Result<Snapshot> {
    let mut file = File::open(path).map_err(io("read the snapshot state file", path))?;
    let mut bytes = Vec::with_capacity(STATE_HEADER);
    (&mut file)
        .take(STATE_HEADER as u64)
        .read_to_end(&mut bytes)
        .map_err(io("read the snapshot state file", path))?;
    check_magic_and_version(&bytes, STATE_MAGIC, "state", path)?;
    if bytes.len() < STATE_HEADER {
        return Err(SnapshotError::Truncated {
            path: path.into(),
            expected: STATE_HEADER as u64,
            found: bytes.len() as u64,
        });
    }
    let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes"));
    if len > MAX_PAYLOAD {
        return Err(SnapshotError::Malformed {
            path: path.into(),
            what: format!("its header declares {len} bytes of state, more than {MAX_PAYLOAD}"),
        });
    }
    let expected = STATE_HEADER as u64 + len;
    (&mut file)
        .take(len + 1)
        .read_to_end(&mut bytes)
        .map_err(io("read the snapshot state file", path))?;
    if bytes.len() as u64 != expected {
        return Err(SnapshotError::Truncated {
            path: path.into(),
            expected,
            found: bytes.len() as u64,
        });
    }
    let payload = &bytes[STATE_HEADER..];
    if crc32fast::hash(payload) != crc {
        return Err(SnapshotError::Checksum { path: path.into() });
    }
    decode(payload, path)
}

/// Both files start with their magic and the format version: a file of another kind is
/// "not a snapshot", one of another version says which.
fn check_magic_and_version(
    head: &[u8],
    magic: &[u8; 8],
    kind: &'static str,
    path: &Path,
) -> Result<()> {
    if head.len() < 12 || &head[..8] != magic {
        return Err(SnapshotError::NotASnapshot {
            path: path.into(),
            kind,
        });
    }
    let version = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: path.into(),
            found: version,
        });
    }
    Ok(())
}

fn memory_header(id: &[u8; 16], ram_bytes: u64) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[..8].copy_from_slice(MEMORY_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..32].copy_from_slice(id);
    h[32..40].copy_from_slice(&ram_bytes.to_le_bytes());
    h
}

/// Bytes of guest RAM in `mem`, all regions together.
pub fn ram_bytes(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Writes guest RAM to the memory file, leaving all-zero pages as holes.
pub fn write_memory(path: &Path, mem: &GuestMemoryMmap, id: &[u8; 16]) -> Result<()> {
    let ram_bytes = ram_bytes(mem);
    write_atomically(path, |f| {
        f.write_all_at(&memory_header(id, ram_bytes), 0)?;
        let mut offset = MEMORY_HEADER;
        let mut chunk = vec![0u8; 1 << 20];
        for region in mem.iter() {
            let (start, len) = (region.start_addr(), region.len());
            let mut done = 0u64;
            while done < len {
                let n = chunk.len().min((len - done) as usize);
                mem.read_slice(&mut chunk[..n], start.unchecked_add(done))
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                for (i, page) in chunk[..n].chunks(PAGE).enumerate() {
                    if page.iter().any(|&b| b != 0) {
                        f.write_all_at(page, offset + done + (i * PAGE) as u64)?;
                    }
                }
                done += n as u64;
            }
            offset += len;
        }
        f.set_len(MEMORY_HEADER + ram_bytes)
    })
}

/// Maps the memory file as guest RAM, `MAP_PRIVATE`: the guest's writes go to its own
/// copies, the file and the pages other VMs share stay as they are.
pub fn map_memory(path: &Path, snapshot: &Snapshot) -> Result<GuestMemoryMmap> {
    let file = File::open(path).map_err(io("open the snapshot memory file", path))?;
    let ram_bytes = snapshot.memory_mib << 20;
    let mut header = [0u8; 40];
    let found = file.metadata().map_err(io("read the size of", path))?.len();
    if found < header.len() as u64 {
        return Err(SnapshotError::NotASnapshot {
            path: path.into(),
            kind: "memory",
        });
    }
    file.read_exact_at(&mut header, 0)
        .map_err(io("read the snapshot memory file", path))?;
    check_magic_and_version(&header, MEMORY_MAGIC, "memory", path)?;
    if header != memory_header(&snapshot.id, ram_bytes) {
        return Err(SnapshotError::ForeignMemory { path: path.into() });
    }
    let expected = MEMORY_HEADER + ram_bytes;
    if found != expected {
        return Err(SnapshotError::Truncated {
            path: path.into(),
            expected,
            found,
        });
    }
    let mut regions = Vec::new();
    let mut offset = MEMORY_HEADER;
    for (addr, len) in ram_ranges(ram_bytes) {
        let clone = file
            .try_clone()
            .map_err(io("duplicate the descriptor of", path))?;
        let map = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(clone, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| SnapshotError::Map {
                path: path.into(),
                cause: source,
            })?;
        regions.push(GuestRegionMmap::new(map, addr).expect("RAM ranges do not wrap"));
        offset += len as u64;
    }
    Ok(GuestMemoryMmap::from_regions(regions).expect("RAM ranges do not overlap"))
}

/// Where a snapshot goes, or comes from.
#[derive(Debug, Clone)]
pub struct SnapshotFiles {
    pub state: PathBuf,
    pub memory: PathBuf,
}

/// Reads `len` bytes of guest RAM at `addr` (below the MMIO gap) from a memory file, for
/// tests and tools that look into a snapshot without restoring it.
pub fn peek_memory(path: &Path, addr: GuestAddress, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    File::open(path)?.read_exact_at(&mut buf, MEMORY_HEADER + addr.0)?;
    Ok(buf)
}

/// A small snapshot with every kind of record (the unit tests' round trip, and the fuzz
/// corpus's seed).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn sample() -> Snapshot {
    let vcpu = VcpuState {
        cpuid: vec![kvm_cpuid_entry2 {
            function: 7,
            eax: 0x1234,
            ..Default::default()
        }],
        regs: kvm_regs {
            rip: 0x10_0000,
            rax: 42,
            ..Default::default()
        },
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debugregs: Default::default(),
        lapic: Default::default(),
        mp_state: Default::default(),
        events: Default::default(),
        msrs: vec![kvm_msr_entry {
            index: 0x10,
            data: 99,
            ..Default::default()
        }],
        tsc_khz: 2_600_000,
    };
    Snapshot {
        memory_mib: 64,
        id: [7; 16],
        vm: VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: kvm_clock_data {
                clock: 123_456,
                ..Default::default()
            },
        },
        serial: SerialState {
            interrupt_enable: 2,
            in_buffer: b"typed".to_vec(),
            ..Default::default()
        },
        vcpus: vec![vcpu],
        devices: vec![TransportState {
            device_type: 19,
            status: 15,
            driver_features: 1 << 32,
            queue_select: 2,
            device_features_select: 1,
            driver_features_select: 1,
            config_generation: 0,
            interrupt_status: 1,
            active: true,
            queues: vec![QueueState {
                max_size: 256,
                next_avail: 65535,
                next_used: 3,
                event_idx_enabled: true,
                size: 128,
                ready: true,
                desc_table: 0x1000,
                avail_ring: 0x2000,
                used_ring: 0x3000,
            }],
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_malformed_payloads_are_named() {
        let path = Path::new("/x.state");
        let payload = encode(&sample());
        let back = decode(&payload, path).unwrap();
        assert_eq!((back.memory_mib, back.id), (64, [7; 16]));
        assert_eq!(back.vm.clock.clock, 123_456);
        assert_eq!(back.serial.in_buffer, b"typed");
        assert_eq!(back.serial.interrupt_enable, 2);
        let v = &back.vcpus[0];
        assert_eq!((v.regs.rip, v.regs.rax), (0x10_0000, 42));
        assert_eq!((v.cpuid[0].function, v.cpuid[0].eax), (7, 0x1234));
        assert_eq!((v.msrs[0].index, v.msrs[0].data), (0x10, 99));
        assert_eq!(v.tsc_khz, 2_600_000);
        assert_eq!(back.devices, sample().devices);

        let e = decode(&payload[..payload.len() - 3], path)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("/x.state is malformed") && e.contains("ends inside a queue's used ring"),
            "{e}"
        );

        let mut extra = payload.clone();
        extra.push(0);
        let e = decode(&extra, path).err().unwrap().to_string();
        assert!(e.contains("1 bytes follow the last device"), "{e}");

        // A queue whose ready flag is neither 0 nor 1.
        let mut bad = payload.clone();
        let at = payload.len() - 4 * 8;
        bad[at..at + 8].copy_from_slice(&7u64.to_le_bytes());
        let e = decode(&bad, path).err().unwrap().to_string();
        assert!(e.contains("a queue's ready flag is 7, more than 1"), "{e}");

        // The master PIC's record claims one byte less than a kvm_irqchip.
        let mut short = payload.clone();
        let at = 8 + 4 + 16;
        let len = u32::from_le_bytes(short[at..at + 4].try_into().unwrap());
        short[at..at + 4].copy_from_slice(&(len - 1).to_le_bytes());
        let e = decode(&short, path).err().unwrap().to_string();
        assert!(
            e.contains(&format!("the master PIC is {} bytes, not {len}", len - 1)),
            "{e}"
        );
    }

    #[test]
    fn state_file_header_is_checked_before_the_payload() {
        let dir = std::env::temp_dir().join(format!("shoal-snapshot-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.state");
        write_state(&path, &sample()).unwrap();
        assert!(!dir.join("vm.state.partial").exists());
        assert_eq!(read_state(&path).unwrap().memory_mib, 64);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..20]).unwrap();
        let e = read_state(&path).err().unwrap().to_string();
        assert!(e.contains("truncated: 32 bytes expected, 20 found"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
