//! A start storm through a real containerd (`scripts/storm N C`): N busybox sandboxes
//! (`ctr run -d … sleep`), C in flight at a time, each timed until its container runs; then
//! all are stopped and deleted, C at a time, and whatever is left behind is listed (it must
//! be nothing). The same with runc in the same run. Prints throughput, per-start latency
//! (p50, p90, p99, max), for shoal the split of each start by phase from the shim's marks
//! (shim spawn, cgroup claim, VM creation, guest boot to agent ready, container start), and
//! the starts that failed with their errors (a storm beyond what the host holds must fail
//! cleanly, not hang).
//!
//! Needs what `shim/tests/ctr_e2e.rs` needs (root, containerd, SHOAL_GUEST_KERNEL,
//! SHOAL_AGENT_IMAGE, SHOAL_BUSYBOX_IMAGE; the lab where the host cannot boot guests: then the
//! latencies are EMULATED). SHOAL_STORM_N and SHOAL_STORM_C (defaults 20 and 4);
//! SHOAL_STORM_POOL sizes shoal's cgroup pool (default N: a smaller pool shows back-pressure);
//! SHOAL_STORM_RUNC=0 skips runc. Unless SHOAL_STORM_TEMPLATE=0, the shoal storm runs twice:
//! booting each guest, then restoring each from one VM template (`tmpl`);
//! SHOAL_STORM_BOOT=0 leaves out the booting pass.
#[path = "../shim/tests/support/containerd.rs"]
mod containerd;

use std::time::Instant;

use containerd::{
    env, env_usize, in_flight, percentile, phase_marks, text, Containerd, IMAGE, RUNTIME,
};
use containerd_shim_shoal_v2::sandbox::boottime_ms;

/// One start: when it began (boottime ms), how long `ctr run -d` took, and its error if any.
struct Start {
    id: String,
    began: f64,
    ms: f64,
    error: Option<String>,
}

fn storm(c: &Containerd, (name, runtime, flags): (&str, &str, &[&str]), n: usize, conc: usize) {
    let wall = Instant::now();
    // Progress on stderr, so a run that dies midway (the lab's kernel) shows how far it got.
    let done = std::sync::atomic::AtomicUsize::new(0);
    let starts = in_flight(n, conc, |i| {
        let id = format!("storm-{name}-{i}");
        let began = boottime_ms();
        let t = Instant::now();
        let mut args = vec!["run", "-d", "--runtime", runtime];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[IMAGE, &id, "sleep", "3600"]);
        let out = c.ctr(&args);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let error = (!out.status.success()).then(|| text(&out).trim().to_string());
        let k = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if k.is_multiple_of(25) {
            eprintln!(
                "storm {name}: {k} of {n} starts done after {:.0} s",
                wall.elapsed().as_secs_f64()
            );
        }
        Start {
            id,
            began,
            ms,
            error,
        }
    });
    let start_wall = wall.elapsed().as_secs_f64();
    let ok: Vec<&Start> = starts.iter().filter(|s| s.error.is_none()).collect();
    let mut lat: Vec<f64> = ok.iter().map(|s| s.ms).collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{name:<6} {:>4}/{n:<4} {:>8.2} {:>9.0} {:>9.0} {:>9.0} {:>9.0}",
        ok.len(),
        ok.len() as f64 / start_wall,
        percentile(&lat, 0.5),
        percentile(&lat, 0.9),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN),
    );
    let failed: Vec<&Start> = starts.iter().filter(|s| s.error.is_some()).collect();
    if !failed.is_empty() {
        println!("  {} starts failed; first errors:", failed.len());
        let mut seen = Vec::new();
        for s in &failed {
            let e = s.error.as_deref().unwrap_or_default();
            let short: String = e.lines().last().unwrap_or(e).chars().take(200).collect();
            if !seen.contains(&short) {
                println!("    {}: {short}", s.id);
                seen.push(short);
            }
        }
    }
    if runtime == RUNTIME {
        let marks = phase_marks(&c.log());
        let phases = [
            ("shim spawn", "", "shim_started"),
            (
                "cgroup claim (with shim set-up)",
                "shim_started",
                "cgroup_claimed",
            ),
            ("VM creation (or restore)", "cgroup_claimed", "vm_created"),
            (
                "guest boot (or resume) to agent",
                "vm_created",
                "agent_ready",
            ),
            ("container start", "agent_ready", "container_started"),
        ];
        let mut split = vec![Vec::new(); phases.len()];
        for s in &ok {
            let at = |p: &str| match p {
                "" => Some(s.began),
                p => marks
                    .iter()
                    .find(|(n, id, _)| n == p && *id == s.id)
                    .map(|(_, _, v)| *v),
            };
            for (k, (_, from, to)) in phases.iter().enumerate() {
                if let (Some(a), Some(b)) = (at(from), at(to)) {
                    split[k].push(b - a);
                }
            }
        }
        println!(
            "  phase (median / p99 ms, {} starts with marks)",
            split[0].len()
        );
        for ((label, _, _), mut v) in phases.iter().zip(split) {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!(
                "    {label:<32} {:>8.0} {:>8.0}",
                percentile(&v, 0.5),
                percentile(&v, 0.99)
            );
        }
    }
    // Teardown, C at a time.
    let t = Instant::now();
    in_flight(n, conc, |i| c.remove(&format!("storm-{name}-{i}")));
    println!(
        "  teardown of {n}: {:.1} s; left behind: {}",
        t.elapsed().as_secs_f64(),
        match c.leftovers() {
            l if l.is_empty() => "nothing".to_string(),
            l => l.join(", "),
        }
    );
}

fn main() {
    let Some(env) = env() else {
        std::process::exit(2);
    };
    let n = env_usize("SHOAL_STORM_N", 20);
    let conc = env_usize("SHOAL_STORM_C", 4);
    let pool = env_usize("SHOAL_STORM_POOL", n);
    let emulated = std::env::var_os("SHOAL_IN_LAB").is_some();
    let c = Containerd::start(
        &env,
        "storm",
        &format!("log_level = \"info\"\n[cgroups]\npool_size = {pool}\n"),
    );
    println!(
        "== start storm: {n} busybox sandboxes, {conc} in flight, cgroup pool {pool}{}",
        if emulated {
            " (EMULATED latency: nested lab under TCG)"
        } else {
            ""
        }
    );
    println!(
        "{:<6} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "", "started", "per s", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    if env_usize("SHOAL_STORM_BOOT", 1) != 0 {
        storm(&c, ("shoal", RUNTIME, &[]), n, conc);
    }
    if env_usize("SHOAL_STORM_TEMPLATE", 1) != 0 {
        // The same sandboxes restored from a VM template instead of booted.
        let template = c.template_config();
        let flags = ["--runtime-config-path", template.to_str().unwrap()];
        storm(&c, ("tmpl", RUNTIME, &flags), n, conc);
    }
    if env_usize("SHOAL_STORM_RUNC", 1) != 0 {
        storm(&c, ("runc", "io.containerd.runc.v2", &[]), n, conc);
    }
}
