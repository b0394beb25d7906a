//! A soak through a real containerd (`scripts/soak N [C]`): N cycles, C at a time, each
//! start → exec → write data → stop → delete of a busybox sandbox. Every other cycle is
//! restored from a VM template instead of booted (unless SHOAL_SOAK_TEMPLATE=0). In each,
//! the container writes 64 KiB of random data into a volume and its sha256 beside it, and
//! the host reads both back and checks them. Prints the failures by class with the first
//! error of each, what was left behind (shims, sandbox directories, mounts, cgroup claims),
//! and host memory and open descriptors (all processes', containerd's) at the start and the
//! end.
//!
//! Needs what `shim/tests/ctr_e2e.rs` needs (root, containerd, SHOAL_GUEST_KERNEL,
//! SHOAL_AGENT_IMAGE, SHOAL_BUSYBOX_IMAGE; the lab where the host cannot boot guests).
//! SHOAL_SOAK_N and SHOAL_SOAK_C (defaults 100 and 2).
#[path = "../shim/tests/support/containerd.rs"]
mod containerd;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use containerd::{env, env_usize, in_flight, stdout, text, Containerd};

/// Where a cycle failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Start,
    Exec,
    Data,
    Stop,
    Delete,
    /// A `ctr` call that did not finish in time (the fixture's limit).
    Hang,
}

/// One cycle: `flags` are extra `ctr run` flags (a template's runtime config).
fn cycle(c: &Containerd, i: usize, flags: &[&str]) -> Result<(), (Class, String)> {
    let id = format!("soak-{i}");
    let vol = c.root.join(format!("soak-vol-{i}"));
    std::fs::create_dir_all(&vol).map_err(|e| (Class::Start, format!("{id}: volume: {e}")))?;
    let mount = format!("type=bind,src={},dst=/data,options=rbind:rw", vol.display());
    let mut run = vec!["-d", "--mount", &mount];
    run.extend_from_slice(flags);
    let out = c.run(&run, &id, &["sleep", "600"]);
    if !out.status.success() {
        let _ = c.ctr(&["container", "delete", &id]);
        let _ = std::fs::remove_dir_all(&vol);
        return Err((Class::Start, format!("{id}: {}", text(&out))));
    }
    let result = exec_and_check(c, &id, &vol);
    let stopped = stop(c, &id);
    let _ = std::fs::remove_dir_all(&vol);
    result.and(stopped)
}

fn exec_and_check(c: &Containerd, id: &str, vol: &Path) -> Result<(), (Class, String)> {
    let write = "head -c 65536 /dev/urandom > /data/blob && cd /data && sha256sum blob > sum";
    let out = c.ctr(&["task", "exec", "--exec-id", "w", id, "sh", "-c", write]);
    if !out.status.success() {
        return Err((Class::Exec, format!("{id}: {}", text(&out))));
    }
    let written = std::fs::read_to_string(vol.join("sum")).unwrap_or_default();
    let host = Command::new("sha256sum")
        .arg("blob")
        .current_dir(vol)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let size = std::fs::metadata(vol.join("blob"))
        .map(|m| m.len())
        .unwrap_or(0);
    if written.is_empty() || written != host || size != 65536 {
        return Err((
            Class::Data,
            format!("{id}: guest wrote {written:?}, the host reads {host:?} ({size} bytes)"),
        ));
    }
    Ok(())
}

fn stop(c: &Containerd, id: &str) -> Result<(), (Class, String)> {
    let _ = c.ctr(&["task", "kill", "-s", "KILL", id]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = stdout(&c.ctr(&["task", "ls"]));
        let line = out.lines().find(|l| l.starts_with(&format!("{id} ")));
        if line.is_none_or(|l| l.contains("STOPPED")) {
            break;
        }
        if Instant::now() >= deadline {
            return Err((Class::Stop, format!("{id}: still listed: {line:?}")));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let task = c.ctr(&["task", "delete", id]);
    let container = c.ctr(&["container", "delete", id]);
    if !container.status.success() {
        return Err((
            Class::Delete,
            format!("{id}: {} / {}", text(&task), text(&container)),
        ));
    }
    Ok(())
}

/// MemAvailable in MiB, the host's open descriptors (all processes') and containerd's own.
fn host_figures(c: &Containerd) -> (u64, u64, usize) {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024;
    // Every process's descriptors (file-nr's count is only an estimate).
    let open = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                .map(|e| std::fs::read_dir(e.path().join("fd")).map_or(0, |f| f.count()))
                .sum::<usize>() as u64
        })
        .unwrap_or(0);
    let containerd_fds = std::fs::read_dir(format!("/proc/{}/fd", c.pid()))
        .map(|d| d.count())
        .unwrap_or(0);
    (available, open, containerd_fds)
}

fn main() {
    let Some(env) = env() else {
        std::process::exit(2);
    };
    let n = env_usize("SHOAL_SOAK_N", 100);
    let conc = env_usize("SHOAL_SOAK_C", 2);
    let templates = env_usize("SHOAL_SOAK_TEMPLATE", 1) != 0;
    let c = Containerd::start(&env, "soak", "");
    let template = templates.then(|| c.template_config());
    let template_flags: Vec<String> = template
        .iter()
        .flat_map(|t| ["--runtime-config-path".to_string(), t.display().to_string()])
        .collect();
    let (mem0, open0, cfd0) = host_figures(&c);
    println!(
        "== soak: {n} cycles (start, exec, write 64 KiB and its sha256, check on the host, stop, delete), {conc} at a time, {}",
        if templates {
            "every other one restored from a template"
        } else {
            "all booted"
        }
    );
    let wall = Instant::now();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let results = in_flight(n, conc, |i| {
        let flags: Vec<&str> = match i % 2 {
            1 => template_flags.iter().map(String::as_str).collect(),
            _ => Vec::new(),
        };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cycle(&c, i, &flags)))
            .unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let first: String = msg.lines().next().unwrap_or("").chars().take(300).collect();
                Err((Class::Hang, format!("soak-{i}: {first}")))
            });
        let k = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if k.is_multiple_of(25) {
            eprintln!("soak: {k}/{n} cycles done");
        }
        r
    });
    let secs = wall.elapsed().as_secs_f64();
    let mut classes: BTreeMap<Class, (usize, String)> = BTreeMap::new();
    for (class, error) in results.iter().filter_map(|r| r.as_ref().err()) {
        let entry = classes.entry(*class).or_insert((0, error.clone()));
        entry.0 += 1;
    }
    let ok = results.iter().filter(|r| r.is_ok()).count();
    println!("cycles: {n}, passed {ok}, failed {} in {secs:.0} s", n - ok);
    for (class, (count, first)) in &classes {
        println!("  {class:?}: {count} (first: {first})");
    }
    // Give the last shims a moment to exit before counting what is left.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.leftovers().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    let left = c.leftovers();
    println!(
        "left behind: {}",
        if left.is_empty() {
            "nothing".to_string()
        } else {
            left.join(", ")
        }
    );
    let (mem1, open1, cfd1) = host_figures(&c);
    println!("host MemAvailable: {mem0} MiB at the start, {mem1} MiB at the end");
    println!("host open descriptors (all processes): {open0} at the start, {open1} at the end");
    println!("containerd's descriptors: {cfd0} at the start, {cfd1} at the end");
    if ok != n || !left.is_empty() {
        std::process::exit(1);
    }
}
