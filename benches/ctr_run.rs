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
//!
//! `SHOAL_BENCH_BASELINE_SHIM=PATH` adds a row for another build of the shim (say, one from
//! before a change), run beside this one under its own runtime name with its own state
//! directory, so that a change's cost is measured in the same run. The runtimes take turns
//! run by run, so drift over the run (a warming cache, a busy neighbour) falls on all alike.
#[path = "../shim/tests/support/containerd.rs"]
mod containerd;

use std::path::PathBuf;
use std::time::Instant;

use containerd::{env, percentile, phase_marks, text, Containerd, IMAGE, RUNTIME};
use containerd_shim_shoal_v2::sandbox::boottime_ms;

/// The runtime name the baseline shim (SHOAL_BENCH_BASELINE_SHIM) runs under.
const BASELINE_RUNTIME: &str = "io.containerd.shoalbaseline.v2";

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
    let baseline = std::env::var_os("SHOAL_BENCH_BASELINE_SHIM").map(PathBuf::from);
    // The baseline shim goes on containerd's PATH under the runtime name BASELINE_RUNTIME.
    let baseline_dir =
        PathBuf::from("/var/tmp").join(format!("shoal-bench-baseline-{}", std::process::id()));
    if let Some(shim) = &baseline {
        assert!(
            shim.is_file(),
            "SHOAL_BENCH_BASELINE_SHIM: no file {}",
            shim.display()
        );
        std::fs::create_dir_all(&baseline_dir).unwrap();
        let link = baseline_dir.join("containerd-shim-shoalbaseline-v2");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(std::fs::canonicalize(shim).unwrap(), &link).unwrap();
    }
    let c = Containerd::start_with_path(
        &env,
        "bench",
        "log_level = \"info\"\n",
        baseline.as_ref().map(|_| baseline_dir.as_path()),
    );
    let template = c.template_config();
    let template = template.to_str().unwrap();
    // The baseline's own config: the same, with its own state directory.
    let baseline_config = baseline.as_ref().map(|_| {
        let path = c.root.join("shoal-baseline.toml");
        let base = std::fs::read_to_string(c.root.join("shoal.toml")).unwrap();
        let state = c.shoal_state();
        std::fs::write(
            &path,
            base.replace(
                &format!("state_dir = \"{}\"", state.display()),
                &format!("state_dir = \"{}-baseline\"", state.display()),
            ),
        )
        .unwrap();
        path.to_str().unwrap().to_string()
    });
    let mut variants: Vec<(&str, &str, Vec<&str>)> = vec![
        ("shoal", RUNTIME, vec![]),
        (
            "shoal (template)",
            RUNTIME,
            vec!["--runtime-config-path", template],
        ),
        ("runc", "io.containerd.runc.v2", vec![]),
    ];
    if let Some(config) = &baseline_config {
        variants.insert(
            1,
            (
                "shoal (baseline build)",
                BASELINE_RUNTIME,
                vec!["--runtime-config-path", config],
            ),
        );
    }
    let mut times = vec![Vec::new(); variants.len()];
    let mut split = vec![vec![Vec::new(); 6]; variants.len()];
    for i in 0..runs {
        for (v, (variant, runtime, flags)) in variants.iter().enumerate() {
            let (variant, runtime) = (*variant, *runtime);
            let (times, split) = (&mut times[v], &mut split[v]);
            let id = format!("bench-{}-{i}", variant.replace([' ', '(', ')'], ""));
            let t0 = boottime_ms();
            let started = Instant::now();
            let mut args = vec!["run", "--rm", "--runtime", runtime];
            args.extend_from_slice(flags);
            args.extend_from_slice(&[IMAGE, &id, "true"]);
            let out = c.ctr(&args);
            let ms = started.elapsed().as_secs_f64() * 1e3;
            let shoal = runtime == RUNTIME || runtime == BASELINE_RUNTIME;
            assert!(
                out.status.success(),
                "{runtime}: {}\n{}",
                text(&out),
                c.log()
            );
            times.push(ms);
            if shoal {
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
    }
    let mut results = Vec::new();
    let mut splits = Vec::new();
    for ((variant, runtime, _), (mut times, split)) in
        variants.iter().zip(times.into_iter().zip(split))
    {
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        results.push((*variant, times));
        if *runtime != "io.containerd.runc.v2" {
            splits.push((*variant, split));
        }
    }
    c.assert_clean();
    if baseline.is_some() {
        let _ = std::fs::remove_dir_all(&baseline_dir);
        println!(
            "shoal (baseline build): {}",
            std::env::var("SHOAL_BENCH_BASELINE_SHIM").unwrap_or_default()
        );
    }
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
