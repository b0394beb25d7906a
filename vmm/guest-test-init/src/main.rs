//! PID 1 of the guest that the VMM's integration tests boot (built static, packed into a
//! test initramfs by `scripts/test-initramfs`).
//!
//! 1. Mounts /dev, /proc, /sys and prints `SHOAL-TEST-INIT: up cpus=N mem_kib=M` on the console.
//! 2. Connects to host vsock port 1234 and sends `hello from the guest over vsock\n`.
//! 3. Serves vsock port 1024, one command line per connection:
//!    `echo TEXT` → `TEXT\n`; `sink N` → reads N bytes, answers `got N SUM\n`;
//!    `source N` → writes N bytes (byte i = i % 251), then closes; `mount DEV DIR FSTYPE`,
//!    `write PATH TEXT`, `read PATH`, `sync`, `umount DIR` → `ok`/the text, or `error: ...`
//!    (for disk tests); `readdev DEV`, `writedev DEV BYTES`, `randread DEV COUNT` → `BYTES NANOS`
//!    (disk benchmark, O_DIRECT in the guest; DEV may also be a file); `sh LINE` → the output
//!    of `/bin/sh -c LINE` (busybox) and `exit=N`; `reboot` → step 4.
//! 4. Prints `SHOAL-TEST-INIT: rebooting`, syncs and reboots (the VMM then exits cleanly).
//!
//! With `shoal.test=churn:N` it does neither 2 nor 3: it runs N short-lived shells, each in
//! new mount, UTS, IPC and PID namespaces with a tmpfs mounted (what a container start does
//! to a guest kernel), printing `SHOAL-TEST-INIT: churn I` every 20 and `SHOAL-TEST-INIT:
//! churn done` at the end, then goes to step 4: the control experiment's workload
//! (`scripts/lab-control`), the same under any VMM.
//!
//! With `shoal.test=count` on the kernel command line it does neither 2 nor 3: it prints
//! `SHOAL-TEST-INIT: count N uptime_ms=T` every 100 ms for ever (N from 1; T from
//! CLOCK_BOOTTIME), so snapshot tests can see a guest go on counting, with timers and its
//! clock, after a restore.
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};

use vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};

const HOST_CID: u32 = 2;
const HOST_PORT: u32 = 1234;
const LISTEN_PORT: u32 = 1024;

fn console() -> File {
    OpenOptions::new()
        .write(true)
        .open("/dev/console")
        .or_else(|_| OpenOptions::new().write(true).open("/dev/ttyS0"))
        .expect("a console")
}

fn mount(fstype: &str, target: &str) {
    let _ = std::fs::create_dir_all(target);
    let _ = nix::mount::mount(
        Some(fstype),
        target,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    );
}

fn main() {
    mount("devtmpfs", "/dev");
    mount("proc", "/proc");
    mount("sysfs", "/sys");
    let mut out = console();
    let cpus = std::fs::read_dir("/sys/devices/system/cpu")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.starts_with("cpu")
                        && n[3..].chars().all(|c| c.is_ascii_digit())
                        && n.len() > 3
                })
                .count()
        })
        .unwrap_or(0);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_default();
    let _ = writeln!(out, "SHOAL-TEST-INIT: up cpus={cpus} mem_kib={mem_kib}");
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|w| w == "shoal.test=count") {
        count(&mut out);
    }
    let churn = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("shoal.test=churn:"))
        .and_then(|n| n.parse::<u32>().ok());
    if let Some(n) = churn {
        run_churn(&mut out, n);
    } else {
        match send_hello() {
            Ok(()) => {}
            Err(e) => {
                let _ = writeln!(out, "SHOAL-TEST-INIT: vsock connect to host failed: {e}");
            }
        }
        if let Err(e) = serve(&mut out) {
            let _ = writeln!(out, "SHOAL-TEST-INIT: vsock server failed: {e}");
        }
    }
    let _ = writeln!(out, "SHOAL-TEST-INIT: rebooting");
    // Let the line leave the serial port before the kernel prints its own reboot message,
    // which would otherwise land in the middle of it.
    let _ = nix::sys::termios::tcdrain(&out);
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
}

/// Runs `n` shells in new namespaces, each mounting a tmpfs (see the module comment).
fn run_churn(out: &mut File, n: u32) {
    let script =
        "mount -t tmpfs t /tmp && echo $$ > /tmp/a && cat /tmp/a > /dev/null && hostname c";
    for i in 1..=n {
        let status = std::process::Command::new("/bin/unshare")
            .args(["-m", "-u", "-i", "-p", "-f", "/bin/sh", "-c", script])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            let _ = writeln!(out, "SHOAL-TEST-INIT: churn {i} failed: {status:?}");
        }
        if i % 20 == 0 {
            let _ = writeln!(out, "SHOAL-TEST-INIT: churn {i}");
        }
    }
    let _ = writeln!(out, "SHOAL-TEST-INIT: churn done");
}

/// Counts on the console every 100 ms, for ever.
fn count(out: &mut File) -> ! {
    for n in 1u64.. {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
            .unwrap_or(0);
        let _ = writeln!(out, "SHOAL-TEST-INIT: count {n} uptime_ms={now}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    unreachable!("the count ends only with the VM")
}

/// Connects to the host's port and says hello; retried, since a busy host (the lab runs
/// under emulation) can take longer than the guest's connect timeout to answer.
fn send_hello() -> Result<(), Box<dyn std::error::Error>> {
    let mut tries = 0;
    let mut stream = loop {
        match VsockStream::connect(&VsockAddr::new(HOST_CID, HOST_PORT)) {
            Ok(s) => break s,
            Err(_) if tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            Err(e) => return Err(e.into()),
        }
    };
    stream.write_all(b"hello from the guest over vsock\n")?;
    Ok(())
}

fn serve(out: &mut File) -> Result<(), Box<dyn std::error::Error>> {
    let listener = VsockListener::bind(&VsockAddr::new(VMADDR_CID_ANY, LISTEN_PORT))?;
    let _ = writeln!(
        out,
        "SHOAL-TEST-INIT: listening on vsock port {LISTEN_PORT}"
    );
    loop {
        let (mut stream, _) = listener.accept()?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
        match cmd {
            "echo" => stream.write_all(format!("{arg}\n").as_bytes())?,
            "sink" => {
                let n: u64 = arg.parse()?;
                let mut sum = 0u64;
                let mut left = n;
                let mut buf = vec![0u8; 65536];
                while left > 0 {
                    let want = (left as usize).min(buf.len());
                    let got = reader.read(&mut buf[..want])?;
                    if got == 0 {
                        break;
                    }
                    sum = buf[..got]
                        .iter()
                        .fold(sum, |s, b| s.wrapping_add(u64::from(*b)));
                    left -= got as u64;
                }
                stream.write_all(format!("got {} {sum}\n", n - left).as_bytes())?;
            }
            "source" => {
                let n: usize = arg.parse()?;
                let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
                stream.write_all(&data)?;
            }
            "readdev" | "writedev" | "randread" => {
                let reply = match disk_bench(cmd, arg) {
                    Ok(text) => text,
                    Err(e) => format!("error: {e}"),
                };
                stream.write_all(format!("{reply}\n").as_bytes())?;
            }
            "mount" | "write" | "read" | "sync" | "umount" => {
                let reply = match file_command(cmd, arg) {
                    Ok(text) => text,
                    Err(e) => format!("error: {e}"),
                };
                stream.write_all(format!("{reply}\n").as_bytes())?;
            }
            "sh" => {
                // One shell command line (busybox, /bin in the test initramfs): its output,
                // then `exit=N`, then the connection closes.
                let reply = match std::process::Command::new("/bin/sh")
                    .args(["-c", arg])
                    .env("PATH", "/bin")
                    .output()
                {
                    Ok(o) => {
                        let mut r = o.stdout;
                        r.extend_from_slice(&o.stderr);
                        r.extend_from_slice(
                            format!("exit={}\n", o.status.code().unwrap_or(-1)).as_bytes(),
                        );
                        r
                    }
                    Err(e) => format!("cannot run /bin/sh: {e}\nexit=-1\n").into_bytes(),
                };
                stream.write_all(&reply)?;
            }
            "reboot" => return Ok(()),
            _ => stream.write_all(b"unknown command\n")?,
        }
    }
}

/// The disk-test commands; returns the reply line.
fn file_command(cmd: &str, arg: &str) -> Result<String, Box<dyn std::error::Error>> {
    use nix::mount::{mount, umount, MsFlags};
    match cmd {
        "mount" => {
            let mut it = arg.split_whitespace();
            let (Some(dev), Some(dir), Some(fstype)) = (it.next(), it.next(), it.next()) else {
                return Err("usage: mount DEV DIR FSTYPE".into());
            };
            std::fs::create_dir_all(dir)?;
            // Like mount(8): a write-protected device is mounted read-only.
            match mount(Some(dev), dir, Some(fstype), MsFlags::empty(), None::<&str>) {
                Err(nix::errno::Errno::EROFS) | Err(nix::errno::Errno::EACCES) => {
                    mount(
                        Some(dev),
                        dir,
                        Some(fstype),
                        MsFlags::MS_RDONLY,
                        None::<&str>,
                    )?;
                    Ok("ok read-only".into())
                }
                other => other.map(|_| "ok".into()).map_err(Into::into),
            }
        }
        "write" => {
            let (path, text) = arg.split_once(' ').ok_or("usage: write PATH TEXT")?;
            std::fs::write(path, text)?;
            Ok("ok".into())
        }
        "read" => Ok(std::fs::read_to_string(arg)?),
        "sync" => {
            nix::unistd::sync();
            Ok("ok".into())
        }
        _ => {
            umount(arg)?;
            Ok("ok".into())
        }
    }
}

/// A 4 KiB-aligned window into a larger buffer (O_DIRECT needs aligned memory).
fn aligned(buf: &mut [u8], len: usize) -> &mut [u8] {
    let start = buf.as_ptr().align_offset(4096);
    &mut buf[start..start + len]
}

/// Disk benchmark commands; returns "BYTES NANOS".
fn disk_bench(cmd: &str, arg: &str) -> Result<String, Box<dyn std::error::Error>> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const CHUNK: usize = 1 << 20;
    let mut parts = arg.split_whitespace();
    let dev = parts.next().ok_or("device missing")?;
    let n: u64 = parts.next().map(str::parse).transpose()?.unwrap_or(0);
    let mut raw = vec![0u8; CHUNK + 4096];
    let buf = aligned(&mut raw, CHUNK);
    let start = std::time::Instant::now();
    let mut done: u64 = 0;
    match cmd {
        "readdev" => {
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_DIRECT)
                .open(dev)?;
            loop {
                let got = f.read_at(buf, done)?;
                if got == 0 {
                    break;
                }
                done += got as u64;
            }
        }
        "writedev" => {
            let f = OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_DIRECT)
                .open(dev)?;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = i as u8;
            }
            while done < n {
                f.write_all_at(buf, done)?;
                done += CHUNK as u64;
            }
            f.sync_all()?;
        }
        _ => {
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_DIRECT)
                .open(dev)?;
            // A file has a length; a block device has its size in sysfs.
            let bytes = match f.metadata()?.len() {
                0 => {
                    std::fs::read_to_string(format!(
                        "/sys/class/block/{}/size",
                        dev.trim_start_matches("/dev/")
                    ))?
                    .trim()
                    .parse::<u64>()?
                        * 512
                }
                len => len,
            };
            let blocks = bytes / 4096;
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                f.read_exact_at(&mut buf[..4096], (x % blocks) * 4096)?;
                done += 4096;
            }
        }
    }
    Ok(format!("{done} {}", start.elapsed().as_nanos()))
}
