//! virtio-blk and virtio-fs throughput and host page-cache growth (run by `scripts/bench`;
//! prints figures, asserts nothing). Side by side in one run: the same O_DIRECT operations on
//! the host file, from the guest through virtio-blk (the file as a disk) and from the guest
//! through virtio-fs (the file in a shared directory) — sequential 1 MiB reads and writes,
//! 4 KiB random reads — and how much the host page cache grows while the guest reads 256 MiB
//! (virtio-blk opens its file with O_DIRECT: the target is none).
//!
//! Needs SHOAL_GUEST_KERNEL and SHOAL_TEST_INITRD, root, and a host that can boot guests
//! (`scripts/bench` runs it in the nested lab otherwise: then speeds are EMULATED).
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shoal_vmm::{Console, DiskConfig, Vm, VmConfig, VsockConfig};

/// The file size; SHOAL_BENCH_IO_MIB overrides the 256 MiB default (for quick checks).
fn size() -> u64 {
    std::env::var("SHOAL_BENCH_IO_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(256)
        << 20
}
const CHUNK: usize = 1 << 20;
const RANDOM_READS: u64 = 2000;

fn cached_mib() -> f64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("Cached:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    kib as f64 / 1024.0
}

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn aligned(buf: &mut [u8], len: usize) -> &mut [u8] {
    let start = buf.as_ptr().align_offset(4096);
    &mut buf[start..start + len]
}

/// Host baselines with O_DIRECT: (read MB/s, write MB/s, random-read IOPS).
fn host_baseline(ro: &Path, rw: &Path) -> (f64, f64, f64) {
    let mut raw = vec![0u8; CHUNK + 4096];
    let buf = aligned(&mut raw, CHUNK);
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(ro)
        .unwrap();
    let t = Instant::now();
    let mut off = 0;
    while off < size() {
        off += f.read_at(buf, off).unwrap() as u64;
    }
    let read = size() as f64 / 1e6 / t.elapsed().as_secs_f64();
    let w = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(rw)
        .unwrap();
    let t = Instant::now();
    let mut off = 0;
    while off < size() {
        w.write_all_at(buf, off).unwrap();
        off += CHUNK as u64;
    }
    w.sync_all().unwrap();
    let write = size() as f64 / 1e6 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..RANDOM_READS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.read_exact_at(&mut buf[..4096], (x % (size() / 4096)) * 4096)
            .unwrap();
    }
    let iops = RANDOM_READS as f64 / t.elapsed().as_secs_f64();
    (read, write, iops)
}

fn connect(uds: &Path, port: u32, deadline: Instant) -> (UnixStream, BufReader<UnixStream>) {
    loop {
        assert!(Instant::now() < deadline, "guest did not answer");
        if let Ok(mut s) = UnixStream::connect(uds) {
            s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            if r.read_line(&mut line).is_ok() && line.starts_with("OK ") {
                return (s, r);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs one guest command; returns (bytes, seconds) from its "BYTES NANOS" answer.
fn guest(uds: &Path, cmd: &str, deadline: Instant) -> (f64, f64) {
    let (mut s, mut r) = connect(uds, 1024, deadline);
    s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let mut it = line.split_whitespace();
    let (Some(b), Some(ns)) = (
        it.next().and_then(|v| v.parse::<f64>().ok()),
        it.next().and_then(|v| v.parse::<f64>().ok()),
    ) else {
        panic!("guest answered {line:?} to {cmd}");
    };
    (b, ns / 1e9)
}

fn main() {
    let (Some(kernel), Some(initrd)) = (
        std::env::var_os("SHOAL_GUEST_KERNEL"),
        std::env::var_os("SHOAL_TEST_INITRD"),
    ) else {
        eprintln!("storage_io: set SHOAL_GUEST_KERNEL and SHOAL_TEST_INITRD (scripts/bench does)");
        std::process::exit(2);
    };
    let dir = PathBuf::from(format!("/var/tmp/shoal-bench-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ro, rw) = (dir.join("ro.img"), dir.join("rw.img"));
    let mut f = std::fs::File::create(&ro).unwrap();
    let block: Vec<u8> = (0..CHUNK).map(|i| (i * 7 + 3) as u8).collect();
    for _ in 0..size() / CHUNK as u64 {
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
    std::fs::File::create(&rw).unwrap().set_len(size()).unwrap();
    let rw_fs = dir.join("rw-fs.img");
    std::fs::File::create(&rw_fs)
        .unwrap()
        .set_len(size())
        .unwrap();
    drop_caches();

    let (h_read, h_write, h_iops) = host_baseline(&ro, &rw);
    drop_caches();

    let uds = dir.join("vm.sock");
    let config = VmConfig {
        kernel: kernel.into(),
        initrd: Some(initrd.into()),
        cmdline: shoal_vmm::DEFAULT_CMDLINE.into(),
        memory_mib: 256,
        vcpus: 1,
        vsock: Some(VsockConfig {
            uds_path: uds.clone(),
            cid: 3,
        }),
        disks: vec![
            DiskConfig {
                path: ro.clone(),
                read_only: true,
            },
            DiskConfig {
                path: rw.clone(),
                read_only: false,
            },
        ],
        shares: vec![shoal_vmm::FsConfig {
            tag: "bench".into(),
            dir: dir.clone(),
            cache: shoal_vmm::CacheMode::Auto,
            root: None,
        }],
        nets: Vec::new(),
        free_page_reporting: false,
        console: Console::File(dir.join("console")),
        limits: Default::default(),
    };
    let hello = UnixListener::bind(format!("{}_1234", uds.display())).unwrap();
    let vm = Vm::boot(&config).expect("boot");
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut c, _) = hello.accept().unwrap();
    let _ = c.read(&mut [0u8; 64]);

    let cache_before = cached_mib();
    let (b, s) = guest(&uds, "readdev /dev/vda", deadline);
    let cache_growth = cached_mib() - cache_before;
    let g_read = b / 1e6 / s;
    let (b, s) = guest(&uds, &format!("writedev /dev/vdb {}", size()), deadline);
    let g_write = b / 1e6 / s;
    let (b, s) = guest(&uds, &format!("randread /dev/vda {RANDOM_READS}"), deadline);
    let g_iops = b / 4096.0 / s;

    // The same through virtio-fs: the image files seen in the shared directory.
    let (mut s, mut r) = connect(&uds, 1024, deadline);
    s.write_all(b"sh mkdir -p /mnt && mount -t virtiofs bench /mnt\n")
        .unwrap();
    let mut answer = String::new();
    r.read_to_string(&mut answer).unwrap();
    assert!(answer.ends_with("exit=0\n"), "mounting virtio-fs: {answer}");
    drop_caches();
    let cache_before = cached_mib();
    eprintln!("storage_io: virtio-fs mounted; reading");
    let (b, s) = guest(&uds, "readdev /mnt/ro.img", deadline);
    let fs_cache_growth = cached_mib() - cache_before;
    let f_read = b / 1e6 / s;
    eprintln!("storage_io: virtio-fs writing");
    let (b, s) = guest(
        &uds,
        &format!("writedev /mnt/rw-fs.img {}", size()),
        deadline,
    );
    let f_write = b / 1e6 / s;
    let (b, s) = guest(
        &uds,
        &format!("randread /mnt/ro.img {RANDOM_READS}"),
        deadline,
    );
    let f_iops = b / 4096.0 / s;
    let (mut s, _) = connect(&uds, 1024, deadline);
    s.write_all(b"reboot\n").unwrap();
    let _ = vm.wait();

    // The contrast: a buffered host read of the same file fills the page cache.
    drop_caches();
    let before = cached_mib();
    let _ = std::fs::read(&ro).unwrap();
    let buffered_growth = cached_mib() - before;

    let label = if std::env::var_os("SHOAL_IN_LAB").is_some() {
        "EMULATED speeds (nested lab); cache figures hold"
    } else {
        "native"
    };
    let mib = size() >> 20;
    println!("virtio-blk and virtio-fs, {mib} MiB file on the host file system ({label}):");
    println!(
        "{:<44} {:>14} {:>14} {:>14}",
        "", "host", "virtio-blk", "virtio-fs"
    );
    println!(
        "{:<44} {:>9.1} MB/s {:>9.1} MB/s {:>9.1} MB/s",
        "sequential read, 1 MiB, O_DIRECT", h_read, g_read, f_read
    );
    println!(
        "{:<44} {:>9.1} MB/s {:>9.1} MB/s {:>9.1} MB/s",
        "sequential write + fsync, 1 MiB, O_DIRECT", h_write, g_write, f_write
    );
    println!(
        "{:<44} {:>9.0} IOPS {:>9.0} IOPS {:>9.0} IOPS",
        "random read, 4 KiB, O_DIRECT", h_iops, g_iops, f_iops
    );
    println!(
        "{:<44} {:>14} {:>9.1} MiB {:>9.1} MiB",
        format!("host page-cache growth, guest reads {mib} MiB"),
        "",
        cache_growth,
        fs_cache_growth
    );
    println!(
        "{:<44} {:>9.1} MiB",
        "  (for contrast: buffered host read)", buffered_growth
    );
    let _ = std::fs::remove_dir_all(&dir);
}
