//! `ctr run --rm` of busybox `true` through a real containerd: shoal booting its guest, shoal
//! restoring a VM template, and runc, same image, same run (run by `scripts/bench`; prints
//! figures, asserts nothing). Prints median and p99 per runtime and, for shoal, the split of
//! a run: ctr launched → shim serving → VM created →
//! agent ready → container started → exit seen → sandbox stopped (from the shim's phase marks
//! in containerd's log).
//!
//! Needs what `shim/tests/ctr_e2e.rs` needs (root, containerd, SHOAL_GUEST_KERNEL,
//! SHOAL_AGENT_IMAGE, SHOAL_BUSYBOX_IMAGE; the lab where the host cannot boot guests: then
//! the latencies are EMULATED). SHOAL_BENCH_RUNS sets the runs per runtime (default 20).
#[path = "../shim/tests/support/containerd.rs"]
mod containerd;

use std::time::Instant;

use containerd::{env, percentile, phase_marks, text, Containerd, IMAGE, RUNTIME};
use containerd_shim_shoal_v2::sandbox::boottime_ms;

/// The shim's phase marks logged after `since` (boottime ms), by phase name.
fn phases(log: &str, since: f64) -> Vec<(String, f64)> {
    phase_marks(log)
        .into_iter()
        .filter(|(_, _, v)| *v >= since)
        .map(|(name, _, v)| (name, v))
        .collect()
}

fn main() {
    let Some(env) = env() else {
        std::process::exit(2);
    };
    let runs: usize = std::env::var("SHOAL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let c = Containerd::start(&env, "bench", "log_level = \"info\"\n");
    let template = c.template_config();
    let template = template.to_str().unwrap();
    let mut results = Vec::new();
    let mut splits = Vec::new();
    let variants: [(&str, &str, &[&str]); 3] = [
        ("shoal", RUNTIME, &[]),
        (
            "shoal (template)",
            RUNTIME,
            &["--runtime-config-path", template],
        ),
        ("runc", "io.containerd.runc.v2", &[]),
    ];
    for (variant, runtime, flags) in variants {
        let mut times = Vec::new();
        let mut split = vec![Vec::new(); 6];
        for i in 0..runs {
            let id = format!("bench-{}-{i}", variant.replace([' ', '(', ')'], ""));
            let t0 = boottime_ms();
            let started = Instant::now();
            let mut args = vec!["run", "--rm", "--runtime", runtime];
            args.extend_from_slice(flags);
            args.extend_from_slice(&[IMAGE, &id, "true"]);
            let out = c.ctr(&args);
            let ms = started.elapsed().as_secs_f64() * 1e3;
            assert!(
                out.status.success(),
                "{runtime}: {}\n{}",
                text(&out),
                c.log()
            );
            times.push(ms);
            if runtime == RUNTIME {
                let marks = phases(&c.log(), t0);
                let at = |name: &str| marks.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
                let names = [
                    "shim_started",
                    "vm_created",
                    "agent_ready",
                    "container_started",
                    "process_exited",
                    "sandbox_stopped",
                ];
                let found: Option<Vec<f64>> = names.iter().map(|n| at(n)).collect();
                if let Some(found) = found {
                    let mut previous = t0;
                    for (slot, at) in split.iter_mut().zip(found) {
                        slot.push(at - previous);
                        previous = at;
                    }
                }
            }
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        results.push((variant, times));
        if runtime == RUNTIME {
            splits.push((variant, split));
        }
    }
    c.assert_clean();
    let label = if std::env::var_os("SHOAL_IN_LAB").is_some() {
        "EMULATED: nested lab, QEMU TCG"
    } else {
        "native"
    };
    println!("ctr run --rm busybox true, {runs} sequential runs per runtime ({label}):");
    println!("{:<26} {:>12} {:>12}", "runtime", "median ms", "p99 ms");
    for (runtime, times) in &results {
        println!(
            "{:<26} {:>12.0} {:>12.0}",
            runtime,
            percentile(times, 0.5),
            percentile(times, 0.99)
        );
    }
    let names = [
        "ctr launched -> shim serving",
        "shim serving -> VM created",
        "VM created -> agent ready",
        "agent ready -> container started",
        "container started -> exit seen",
        "exit seen -> sandbox stopped (delete)",
    ];
    println!(
        "split of one run (median ms over the runs that logged every mark; with a template, \"VM created\" is the restore):"
    );
    println!(
        "  {:<38} {}",
        "",
        splits
            .iter()
            .map(|(v, _)| format!("{v:>18}"))
            .collect::<String>()
    );
    for (i, name) in names.iter().enumerate() {
        let cells: String = splits
            .iter()
            .map(|(_, split)| {
                let mut v = split[i].clone();
                v.sort_by(|a, b| a.partial_cmp(b).unwrap());
                match v.is_empty() {
                    true => format!("{:>18}", "-"),
                    false => format!("{:>18.0}", percentile(&v, 0.5)),
                }
            })
            .collect();
        println!("  {name:<38} {cells}");
    }
}
