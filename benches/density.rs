//! Density: N idle busybox sandboxes started through containerd (`ctr run -d … sleep`), then
//! host memory per sandbox — PSS summed over each sandbox's processes (smaps_rollup), plus the
//! host memory no process accounts for (kernel: page tables, KVM, slab) — and how long the N
//! starts took; then everything is deleted and checked gone. Three ways in one run: shoal
//! booting each guest, shoal restoring each from one VM template, and runc. Prints figures, asserts only that nothing is left behind.
//!
//! `scripts/density N` runs it (in the lab where guests cannot boot natively: memory figures
//! hold there, times are EMULATED). Needs what `shim/tests/ctr_e2e.rs` needs.
#[path = "../shim/tests/support/containerd.rs"]
mod containerd;

use std::time::{Duration, Instant};

use containerd::{env, stdout, text, Containerd, IMAGE, RUNTIME};

const RUNC: &str = "io.containerd.runc.v2";

fn meminfo_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn pss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// (pid, parent pid, command name) of every process.
fn processes() -> Vec<(i32, i32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        out.push((pid, ppid, comm));
    }
    out
}

/// The processes a runtime's sandboxes consist of: its shims and everything below them.
fn sandbox_pids(shim_comm_prefix: &str) -> Vec<i32> {
    let all = processes();
    let mut pids: Vec<i32> = all
        .iter()
        .filter(|(_, _, c)| c.starts_with(shim_comm_prefix))
        .map(|(p, _, _)| *p)
        .collect();
    let mut i = 0;
    while i < pids.len() {
        let parent = pids[i];
        pids.extend(
            all.iter()
                .filter(|(_, pp, _)| *pp == parent)
                .map(|(p, _, _)| *p),
        );
        i += 1;
    }
    pids
}

struct Figures {
    start_s: f64,
    pss_mib: f64,
    unattributed_mib: f64,
    /// Where a shoal sandbox's PSS goes (MiB per sandbox): see [`pss_split_kib`].
    split: Option<[f64; 4]>,
    /// The first sandbox's guest /proc/meminfo (shoal only).
    guest_meminfo: Option<String>,
}

/// Anonymous mappings at least this long are guest RAM (the VMM's own are far smaller).
const GUEST_RAM_MIN: u64 = 16 << 20;

/// PSS of one process split four ways, in KiB: guest RAM (large anonymous mappings), the
/// guest kernel's pages mapped from `kernel` (shared between VMs), other anonymous memory
/// (heap, stacks), other files (binary, libraries).
fn pss_split_kib(pid: i32, kernel: &str) -> [u64; 4] {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut out = [0u64; 4];
    let mut kind = 2;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: range, perms, offset, dev, inode, [path].
            let (lo, hi) = first.split_once('-').unwrap_or(("0", "0"));
            let len =
                u64::from_str_radix(hi, 16).unwrap_or(0) - u64::from_str_radix(lo, 16).unwrap_or(0);
            let inode = words.nth(3).unwrap_or("0");
            let path = words.next().unwrap_or("");
            kind = if path == kernel {
                1
            } else if path.ends_with("/vm.mem") {
                // A restored VM's RAM, mapped from its template's memory file.
                0
            } else if inode != "0" && path.starts_with('/') {
                3
            } else if len >= GUEST_RAM_MIN {
                0
            } else {
                2
            };
        } else if first == "Pss:" {
            out[kind] += words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    out
}

/// Starts `n` sandboxes, measures, deletes them. `kernel` is the shoal guest's kernel file
/// (None for runc), to tell the VM's memory apart in the shim's mappings.
fn measure(
    c: &Containerd,
    (name, runtime, flags): (&str, &str, &[&str]),
    shim_comm: &str,
    n: usize,
    kernel: Option<&str>,
) -> Figures {
    let before = meminfo_kib("MemAvailable:");
    let started = Instant::now();
    let ids: Vec<String> = (0..n).map(|i| format!("density-{name}-{i}")).collect();
    for id in &ids {
        let mut args = vec!["run", "-d", "--runtime", runtime];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[IMAGE, id, "sleep", "1000000"]);
        let out = c.ctr(&args);
        assert!(
            out.status.success(),
            "{runtime} {id}: {}\n{}",
            text(&out),
            c.log()
        );
        eprintln!(
            "density: {id} started at {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let listed = stdout(&c.ctr(&["task", "ls"]));
        let running = listed.lines().filter(|l| l.contains("RUNNING")).count();
        if running >= n {
            break;
        }
        assert!(Instant::now() < deadline, "only {running} of {n} running");
        std::thread::sleep(Duration::from_millis(200));
    }
    let start_s = started.elapsed().as_secs_f64();
    // Let the guests go idle before measuring.
    std::thread::sleep(Duration::from_secs(5));
    let pids = sandbox_pids(shim_comm);
    let pss: u64 = pids.iter().map(|p| pss_kib(*p)).sum();
    let used = before.saturating_sub(meminfo_kib("MemAvailable:"));
    let per = |kib: u64| kib as f64 / 1024.0 / n as f64;
    let (split, guest_meminfo) = match kernel {
        Some(kernel) => {
            let mut sum = [0u64; 4];
            for p in &pids {
                for (s, v) in sum.iter_mut().zip(pss_split_kib(*p, kernel)) {
                    *s += v;
                }
            }
            let meminfo = c.ctr(&[
                "task",
                "exec",
                "--exec-id",
                "meminfo",
                &ids[0],
                "cat",
                "/proc/meminfo",
            ]);
            (Some(sum.map(per)), Some(stdout(&meminfo)))
        }
        None => (None, None),
    };
    let figures = Figures {
        start_s,
        pss_mib: per(pss),
        unattributed_mib: per(used.saturating_sub(pss)),
        split,
        guest_meminfo,
    };
    for id in &ids {
        let _ = c.ctr(&["task", "kill", "-s", "KILL", id]);
    }
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !c.ctr(&["task", "delete", id]).status.success() {
            assert!(Instant::now() < deadline, "{id} could not be deleted");
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = c.ctr(&["container", "delete", id]);
    }
    figures
}

fn main() {
    let Some(env) = env() else {
        std::process::exit(2);
    };
    let n: usize = std::env::var("SHOAL_DENSITY_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    // SHOAL_DENSITY_CONFIG: extra lines for the shim's config (to compare settings).
    let extra = std::env::var("SHOAL_DENSITY_CONFIG").unwrap_or_default();
    let pool = if extra.contains("[cgroups]") {
        String::new()
    } else {
        format!("[cgroups]\npool_size = {n}\n")
    };
    let c = Containerd::start(
        &env,
        "density",
        &format!("log_level = \"warn\"\n{extra}\n{pool}"),
    );
    let kernel = env.kernel.to_string_lossy().into_owned();
    // SHOAL_DENSITY_BOOT=0: only templates and runc (the lab holds fewer booted guests).
    let shoal = match std::env::var("SHOAL_DENSITY_BOOT").as_deref() {
        Ok("0") => None,
        _ => Some(measure(
            &c,
            ("shoal", RUNTIME, &[]),
            "containerd-shim",
            n,
            Some(&kernel),
        )),
    };
    c.assert_clean();
    // The same sandboxes restored from one VM template (its memory file shared by all).
    let template = c.template_config();
    let flags = ["--runtime-config-path", template.to_str().unwrap()];
    let restored = measure(
        &c,
        ("template", RUNTIME, &flags),
        "containerd-shim",
        n,
        Some(&kernel),
    );
    c.assert_clean();
    let runc = measure(&c, ("runc", RUNC, &[]), "containerd-shim", n, None);
    let label = if std::env::var_os("SHOAL_IN_LAB").is_some() {
        "nested lab: memory figures hold, times EMULATED"
    } else {
        "native"
    };
    let config = shoal_vmm_size(&c);
    println!("density: {n} idle busybox sandboxes ({label}; shoal VM {config}):");
    let all = [shoal.as_ref(), Some(&restored), Some(&runc)];
    let row = |name: &str, unit: &str, value: &dyn Fn(&Figures) -> f64| {
        let cells: String = all
            .iter()
            .map(|f| match f {
                Some(f) => format!(" {:>12}", format!("{:.1} {unit}", value(f))),
                None => format!(" {:>12}", "(skipped)"),
            })
            .collect();
        println!("{name:<44}{cells}");
    };
    println!(
        "{:<44} {:>12} {:>12} {:>12}",
        "", "shoal boot", "shoal tmpl", "runc"
    );
    row(
        "PSS per sandbox (shim + VM / shim + container)",
        "MiB",
        &|f| f.pss_mib,
    );
    row("host memory not in any process, per sandbox", "MiB", &|f| {
        f.unattributed_mib
    });
    row("total per sandbox", "MiB", &|f| {
        f.pss_mib + f.unattributed_mib
    });
    row(&format!("time to start all {n} (sequential)"), "s", &|f| {
        f.start_s
    });
    for (what, f) in [
        ("booted", shoal.as_ref()),
        ("restored from a template", Some(&restored)),
    ] {
        if let Some([guest, kernel, anon, file]) = f.and_then(|f| f.split) {
            println!("shoal ({what}) PSS per sandbox by kind: guest RAM {guest:.1} MiB, guest kernel mapped from its file {kernel:.1} MiB, other anonymous (heap, stacks) {anon:.1} MiB, other files (binary, libraries) {file:.1} MiB");
        }
    }
    if let Some(meminfo) = shoal.as_ref().unwrap_or(&restored).guest_meminfo.as_ref() {
        let pick: Vec<String> = meminfo
            .lines()
            .filter(|l| {
                [
                    "MemTotal",
                    "MemFree",
                    "Buffers",
                    "Cached",
                    "Shmem",
                    "Slab",
                    "KernelStack",
                    "PageTables",
                    "AnonPages",
                ]
                .iter()
                .any(|k| l.starts_with(&format!("{k}:")))
            })
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        println!("one shoal guest's /proc/meminfo: {}", pick.join(", "));
    }
    println!("left behind after deleting all: nothing (checked)");
}

/// A value from the shim config the fixture wrote.
fn shoal_config_value(c: &Containerd, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(c.root.join("shoal.toml")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = ")).map(str::to_string))
}

/// The VM size the shim used.
fn shoal_vmm_size(c: &Containerd) -> String {
    format!(
        "{} vCPU, {} MiB",
        shoal_config_value(c, "vcpus").unwrap_or_else(|| "1".into()),
        shoal_config_value(c, "memory_mib").unwrap_or_else(|| "256".into())
    )
}
