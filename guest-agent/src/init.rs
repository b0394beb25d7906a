//! PID 1 duties in the guest: the file systems every container needs, the cgroup v2
//! hierarchy with controllers delegated to containers, hostname and DNS, power-off.
use std::path::Path;

use nix::mount::{mount, MsFlags};

use crate::cgroup::{CGROUP_PARENT, CGROUP_ROOT};
use crate::error::{AgentError, Result};

fn mount_fs(fstype: &str, target: &str, flags: MsFlags, data: Option<&str>) -> Result<()> {
    std::fs::create_dir_all(target).map_err(|e| AgentError::io(format!("create {target}"), e))?;
    match mount(Some(fstype), target, Some(fstype), flags, data) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(AgentError::sys(format!("mount {fstype} on {target}"), e)),
    }
}

/// Mounts the sandbox's virtio-fs share (tag `tag`) at `target`.
///
/// Not `nosuid`: the share holds the containers' root file systems, and a setuid binary of
/// an image (`sudo`, `ping`) must raise a process that does not ask for `no_new_privs`, as
/// under runc (issue 22). This is the guest's own business: the host serves the share from
/// mounts that are `nosuid` on the host (shim/src/mounts.rs), so no file the guest leaves
/// there runs as root on the host. `nodev` stays (the server refuses device nodes anyway).
pub fn mount_share(tag: &str, target: &str) -> Result<()> {
    std::fs::create_dir_all(target).map_err(|e| AgentError::io(format!("create {target}"), e))?;
    mount(
        Some(tag),
        target,
        Some("virtiofs"),
        MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| AgentError::sys(format!("mount virtio-fs tag {tag:?} on {target}"), e))
}

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, cgroup2, /run and /tmp (guest PID 1 only).
pub fn mount_basics() -> Result<()> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", nosuid, None)?;
    mount_fs("sysfs", "/sys", nosuid, None)?;
    mount_fs("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mount_fs(
        "devpts",
        "/dev/pts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("gid=5,mode=0620,ptmxmode=0666"),
    )?;
    mount_fs("tmpfs", "/dev/shm", nosuid, Some("mode=1777"))?;
    mount_fs("cgroup2", CGROUP_ROOT, nosuid, None)?;
    mount_fs(
        "tmpfs",
        "/run",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount_fs(
        "tmpfs",
        "/tmp",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    Ok(())
}

/// Creates the parent cgroup of all containers with the controllers they need delegated.
/// Needs a cgroup v2 hierarchy at /sys/fs/cgroup.
pub fn prepare_cgroups() -> Result<()> {
    let root = Path::new(CGROUP_ROOT);
    if !root.join("cgroup.controllers").exists() {
        return Err(AgentError::io(
            format!("{CGROUP_ROOT} is not a cgroup v2 hierarchy"),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    let available = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let wanted: Vec<&str> = ["cpu", "cpuset", "io", "memory", "pids"]
        .into_iter()
        .filter(|c| available.split_whitespace().any(|a| a == *c))
        .collect();
    let enable = wanted
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    let parent = root.join(CGROUP_PARENT);
    std::fs::create_dir_all(&parent)
        .map_err(|e| AgentError::io(format!("create {}", parent.display()), e))?;
    for dir in [root, parent.as_path()] {
        let file = dir.join("cgroup.subtree_control");
        std::fs::write(&file, &enable)
            .map_err(|e| AgentError::io(format!("enable {enable} in {}", file.display()), e))?;
    }
    Ok(())
}

/// Sets the guest's hostname (the guest is the pod's own machine).
/// Most host entropy one request may carry.
pub const MAX_ENTROPY: usize = 4096;

/// Refuses more host entropy than [`MAX_ENTROPY`].
pub fn check_entropy(entropy: &[u8]) -> Result<()> {
    if entropy.len() > MAX_ENTROPY {
        return Err(AgentError::InvalidRequest(format!(
            "{} bytes of entropy, at most {MAX_ENTROPY}",
            entropy.len()
        )));
    }
    Ok(())
}

/// Sets the guest's clock to the host's (`host_time_unix_ns`, 0: leave it) when the two
/// differ by more than a second, and mixes the host's random bytes into the guest's pool
/// (a write to /dev/urandom mixes them in without crediting entropy). A VM restored from a
/// snapshot needs both: it wakes with the snapshot's time and random state.
pub fn take_host_time_and_entropy(host_time_unix_ns: u64, entropy: &[u8]) -> Result<()> {
    use nix::time::{clock_gettime, clock_settime, ClockId};
    const NS: i128 = 1_000_000_000;
    if host_time_unix_ns != 0 {
        let now = clock_gettime(ClockId::CLOCK_REALTIME)
            .map_err(|e| AgentError::sys("reading the guest clock", e))?;
        let guest = i128::from(now.tv_sec()) * NS + i128::from(now.tv_nsec());
        let host = i128::from(host_time_unix_ns);
        if (guest - host).abs() > NS {
            let to = nix::sys::time::TimeSpec::new((host / NS) as i64, (host % NS) as i64);
            clock_settime(ClockId::CLOCK_REALTIME, to)
                .map_err(|e| AgentError::sys("setting the guest clock to the host's", e))?;
            tracing::info!(
                off_by_ms = ((guest - host) / 1_000_000) as i64,
                "guest clock set to the host's"
            );
        }
    }
    if !entropy.is_empty() {
        let mut urandom = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/urandom")
            .map_err(|e| AgentError::io("opening /dev/urandom", e))?;
        std::io::Write::write_all(&mut urandom, entropy)
            .map_err(|e| AgentError::io("mixing the host's entropy into /dev/urandom", e))?;
        // Mixing alone changes nothing the guest draws until the kernel next reseeds its
        // generator (up to a minute): VMs restored from one template would hand out the
        // same random numbers until then. Reseed now. ENODATA: the generator is not seeded
        // yet, and its first seed will include these bytes.
        match reseed_crng(&urandom) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => tracing::warn!("cannot reseed the kernel's random generator: {e}"),
        }
    }
    Ok(())
}

/// `RNDRESEEDCRNG` (`_IO('R', 0x07)`): the kernel's random generator takes a new key from
/// its input pool at once.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

fn reseed_crng(urandom: &std::fs::File) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: RNDRESEEDCRNG takes no argument and touches no memory of this process; the
    // descriptor is a live /dev/urandom that `urandom` owns for the call.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn set_hostname(hostname: &str) -> Result<()> {
    if hostname.len() > 64
        || !hostname
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(AgentError::InvalidSpec(format!(
            "invalid hostname {hostname:?}"
        )));
    }
    nix::unistd::sethostname(hostname)
        .map_err(|e| AgentError::sys(format!("set hostname {hostname}"), e))
}

/// resolv.conf text for the pod's DNS settings.
pub fn resolv_conf(dns_servers: &[String], dns_search: &[String]) -> Result<String> {
    let mut text = String::new();
    for s in dns_servers {
        if s.parse::<std::net::IpAddr>().is_err() {
            return Err(AgentError::InvalidSpec(format!("invalid DNS server {s:?}")));
        }
        text.push_str(&format!("nameserver {s}\n"));
    }
    if !dns_search.is_empty() {
        if dns_search
            .iter()
            .any(|d| d.is_empty() || d.contains(char::is_whitespace))
        {
            return Err(AgentError::InvalidSpec(format!(
                "invalid DNS search list {dns_search:?}"
            )));
        }
        text.push_str(&format!("search {}\n", dns_search.join(" ")));
    }
    Ok(text)
}

/// Syncs and reboots the VM (the VMM turns a guest reboot into a clean exit).
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    std::process::exit(0);
}
