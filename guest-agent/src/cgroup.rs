//! A container's cgroup v2 directory: statistics, resource updates, process list, OOM count.
//! Containers get `linux.cgroupsPath = /shoal/<id>`, so the directory is known without
//! asking libcontainer.
use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;

use crate::error::{AgentError, Result};

/// Where cgroup v2 is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Parent of every container cgroup, relative to the cgroup root.
pub const CGROUP_PARENT: &str = "shoal";

/// The cgroup path given to libcontainer for container `id`.
pub fn cgroups_path(id: &str) -> PathBuf {
    PathBuf::from(format!("/{CGROUP_PARENT}/{id}"))
}

/// The container's cgroup directory.
pub fn dir(id: &str) -> PathBuf {
    Path::new(CGROUP_ROOT).join(CGROUP_PARENT).join(id)
}

fn read(dir: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(file)).ok()
}

/// `key value` lines → value of `key`.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn single(dir: &Path, file: &str) -> u64 {
    // "max" means no limit: report it as 0, as containerd's metrics do for unset limits.
    read(dir, file)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Counters of one cgroup.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub memory_current: u64,
    pub memory_max: u64,
    pub memory_oom_kills: u64,
    pub pids_current: u64,
    pub pids_max: u64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
}

/// Reads the statistics of the cgroup at `dir`.
pub fn stats(dir: &Path) -> Stats {
    let cpu = read(dir, "cpu.stat").unwrap_or_default();
    let events = read(dir, "memory.events").unwrap_or_default();
    let (mut rbytes, mut wbytes) = (0, 0);
    for line in read(dir, "io.stat").unwrap_or_default().lines() {
        for field in line.split_whitespace().skip(1) {
            if let Some(v) = field.strip_prefix("rbytes=") {
                rbytes += v.parse::<u64>().unwrap_or(0);
            } else if let Some(v) = field.strip_prefix("wbytes=") {
                wbytes += v.parse::<u64>().unwrap_or(0);
            }
        }
    }
    Stats {
        cpu_usage_usec: keyed(&cpu, "usage_usec").unwrap_or(0),
        cpu_user_usec: keyed(&cpu, "user_usec").unwrap_or(0),
        cpu_system_usec: keyed(&cpu, "system_usec").unwrap_or(0),
        memory_current: single(dir, "memory.current"),
        memory_max: single(dir, "memory.max"),
        memory_oom_kills: keyed(&events, "oom_kill").unwrap_or(0),
        pids_current: single(dir, "pids.current"),
        pids_max: single(dir, "pids.max"),
        io_read_bytes: rbytes,
        io_write_bytes: wbytes,
    }
}

/// Pids of every process in the cgroup (and its children).
pub fn pids(dir: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    collect_pids(dir, &mut out);
    out.sort_unstable();
    out
}

fn collect_pids(dir: &Path, out: &mut Vec<u32>) {
    if let Some(text) = read(dir, "cgroup.procs") {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_pids(&e.path(), out);
            }
        }
    }
}

/// The cgroup v2 file writes for `resources` (memory, CPU, pids), as (file, value).
pub fn resource_writes(resources: &LinuxResources) -> Result<Vec<(&'static str, String)>> {
    let mut writes = Vec::new();
    if let Some(mem) = resources.memory() {
        if let Some(limit) = mem.limit() {
            if limit == 0 || limit < -1 {
                return Err(AgentError::InvalidResources(format!(
                    "memory limit {limit}"
                )));
            }
            writes.push((
                "memory.max",
                if limit == -1 {
                    "max".into()
                } else {
                    limit.to_string()
                },
            ));
        }
        if let Some(res) = mem.reservation() {
            writes.push((
                "memory.low",
                if res < 0 { "0".into() } else { res.to_string() },
            ));
        }
        if let Some(swap) = mem.swap() {
            let v = match (swap, mem.limit()) {
                (-1, _) => "max".to_string(),
                (s, Some(l)) if l > 0 && s >= l => (s - l).to_string(),
                (s, _) if s >= 0 => s.to_string(),
                (s, _) => return Err(AgentError::InvalidResources(format!("memory swap {s}"))),
            };
            writes.push(("memory.swap.max", v));
        }
    }
    if let Some(cpu) = resources.cpu() {
        if let Some(shares) = cpu.shares() {
            // The same shares→weight conversion runc and crun use.
            let weight = if shares == 0 {
                100
            } else {
                1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142
            };
            writes.push(("cpu.weight", weight.to_string()));
        }
        if cpu.quota().is_some() || cpu.period().is_some() {
            let period = cpu.period().unwrap_or(100_000);
            let quota = match cpu.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".to_string(),
            };
            writes.push(("cpu.max", format!("{quota} {period}")));
        }
    }
    if let Some(pids) = resources.pids() {
        let limit = pids.limit();
        writes.push((
            "pids.max",
            if limit <= 0 {
                "max".into()
            } else {
                limit.to_string()
            },
        ));
    }
    Ok(writes)
}

/// Applies `resources` to the cgroup at `dir`.
pub fn update(dir: &Path, resources: &LinuxResources) -> Result<()> {
    for (file, value) in resource_writes(resources)? {
        std::fs::write(dir.join(file), &value).map_err(|e| {
            AgentError::io(format!("write {value} to {}", dir.join(file).display()), e)
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResourcesBuilder,
    };

    #[test]
    fn resources_map_to_cgroup_v2_files() {
        let r = LinuxResourcesBuilder::default()
            .memory(
                LinuxMemoryBuilder::default()
                    .limit(64 << 20)
                    .swap(96 << 20)
                    .build()
                    .unwrap(),
            )
            .cpu(
                LinuxCpuBuilder::default()
                    .shares(1024u64)
                    .quota(50_000i64)
                    .period(100_000u64)
                    .build()
                    .unwrap(),
            )
            .pids(LinuxPidsBuilder::default().limit(32).build().unwrap())
            .build()
            .unwrap();
        let w = resource_writes(&r).unwrap();
        assert!(w.contains(&("memory.max", (64u64 << 20).to_string())));
        assert!(w.contains(&("memory.swap.max", (32u64 << 20).to_string())));
        assert!(w.contains(&("cpu.weight", "39".to_string())));
        assert!(w.contains(&("cpu.max", "50000 100000".to_string())));
        assert!(w.contains(&("pids.max", "32".to_string())));
    }

    #[test]
    fn bad_limits_are_refused() {
        let r = LinuxResourcesBuilder::default()
            .memory(LinuxMemoryBuilder::default().limit(0).build().unwrap())
            .build()
            .unwrap();
        assert!(resource_writes(&r).is_err());
    }

    #[test]
    fn stats_parse_cgroup_files() {
        let d = std::env::temp_dir().join(format!("shoal-cg-{}", std::process::id()));
        std::fs::create_dir_all(d.join("child")).unwrap();
        std::fs::write(
            d.join("cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
        )
        .unwrap();
        std::fs::write(d.join("memory.current"), "4096\n").unwrap();
        std::fs::write(d.join("memory.max"), "max\n").unwrap();
        std::fs::write(
            d.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        std::fs::write(
            d.join("io.stat"),
            "254:0 rbytes=10 wbytes=20 rios=1 wios=2\n8:0 rbytes=5 wbytes=0\n",
        )
        .unwrap();
        std::fs::write(d.join("cgroup.procs"), "12\n7\n").unwrap();
        std::fs::write(d.join("child/cgroup.procs"), "30\n").unwrap();
        let s = stats(&d);
        assert_eq!(
            (s.cpu_usage_usec, s.cpu_user_usec, s.cpu_system_usec),
            (1500, 1000, 500)
        );
        assert_eq!(
            (s.memory_current, s.memory_max, s.memory_oom_kills),
            (4096, 0, 1)
        );
        assert_eq!((s.io_read_bytes, s.io_write_bytes), (15, 20));
        assert_eq!(pids(&d), vec![7, 12, 30]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
