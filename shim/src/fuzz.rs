//! Fuzz harnesses for what the shim parses: the guest agent's replies (the guest writes
//! them) and the shoal config with its sizing annotations (the operator and the pod's author
//! write those). Each takes arbitrary bytes, asserts what must hold for any input, and
//! serves both `cargo fuzz` (the `fuzz/` crate, coverage-guided, nightly) and the replay of
//! the saved corpus as an ordinary unit test (`fuzz::tests::corpus_replays`, stable).
//!
//! Compiled for tests and with the `fuzzing` feature only.
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use protobuf::Message;
use shoal_agent_api::agent as ag;

use crate::config::{Config, MAX_MEMORY_MIB};
use crate::oom::{OomFilter, Verdict};
use crate::service::{metrics, pids_response, MAX_LISTED_PIDS};

/// A fuzz harness: any bytes in, a panic when what must hold does not.
pub type Harness = fn(&[u8]);

/// The shim's fuzz targets, by name: what `fuzz/` builds and the corpus directories are
/// called.
pub const TARGETS: &[(&str, Harness)] = &[
    ("agent_replies", agent_replies),
    ("shim_config", shim_config),
];

/// One agent reply: the first byte picks the message type, the rest is its protobuf
/// encoding as the guest sent it. Each decoded reply goes through what the shim does with
/// it: Pids (refused past [`MAX_LISTED_PIDS`], otherwise one entry per pid), Stats (metrics
/// packed for containerd), OOM events (the filter's verdicts and waits stay bounded),
/// the agent's id check and the create, exec and wait answers.
pub fn agent_replies(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 5 {
        0 => {
            let Ok(list) = ag::ListProcessesResponse::parse_from_bytes(body) else {
                return;
            };
            let listed = list.pids.len();
            match pids_response(list) {
                Ok(r) => {
                    assert!(listed <= MAX_LISTED_PIDS);
                    assert_eq!(r.processes.len(), listed);
                }
                Err(_) => assert!(listed > MAX_LISTED_PIDS),
            }
        }
        1 => {
            let Ok(stats) = ag::StatsContainerResponse::parse_from_bytes(body) else {
                return;
            };
            let m = metrics(&stats);
            assert_eq!(m.memory.usage, stats.memory_current);
            containerd_shim::util::convert_to_any(Box::new(m)).expect("metrics pack");
        }
        2 => {
            // A run of OOM events, as the poll receives them one after another.
            let mut filter = OomFilter::default();
            let start = Instant::now();
            let mut now = start;
            for (i, chunk) in body.split(|b| *b == 0xff).enumerate().take(256) {
                let Ok(event) = ag::OomEvent::parse_from_bytes(chunk) else {
                    now += filter.error(now);
                    continue;
                };
                let known = event.container_id == "pod" || event.container_id == "app";
                let d = filter.event(&event.container_id, known, now);
                assert!(d.wait <= Duration::from_secs(60), "{d:?}");
                assert!(known || d.verdict != Verdict::Publish, "{d:?}");
                let shown = crate::oom::shown(&event.container_id);
                assert!(shown.len() <= 64);
                now += d.wait + Duration::from_millis(i as u64 % 7);
            }
        }
        3 => {
            if let Ok(check) = ag::CheckResponse::parse_from_bytes(body) {
                let _ = format!("{check:?}");
            }
        }
        _ => {
            // Pids the agent reports for a create, an exec and an exit: stored as they are.
            let _ = ag::CreateContainerResponse::parse_from_bytes(body).map(|r| r.pid);
            let _ = ag::ExecProcessResponse::parse_from_bytes(body).map(|r| r.pid);
            let _ = ag::WaitProcessResponse::parse_from_bytes(body).map(|r| r.exit_status);
        }
    }
}

/// A config file and sizing annotations: the bytes up to the first NUL are the file's text,
/// the rest `key=value` lines of annotations. A config that parses has its annotations
/// applied, and every figure the shim derives from it (the VM's RAM, host cgroup limits,
/// the guest's limits, the cgroup pool) is computed without overflow and within bounds.
pub fn shim_config(data: &[u8]) {
    let (text, rest) = match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let text = String::from_utf8_lossy(text);
    let Ok(mut config) = Config::from_toml(&text, Path::new("fuzz.toml")) else {
        return;
    };
    let annotations: HashMap<String, String> = String::from_utf8_lossy(rest)
        .lines()
        .take(32)
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if config.apply_annotations(&annotations).is_err() {
        return;
    }
    assert!(config.vcpus >= 1);
    assert!((64..=MAX_MEMORY_MIB).contains(&config.memory_mib));
    let limits = crate::sandbox::host_limits(&config, Some(50_000), Some(100_000));
    let max = limits.memory_max.expect("a memory limit");
    assert!(max >= config.memory_mib << 20, "{max}");
    let _ = config.guest_limits();
    let _ = config.cgroups.pool_config();
}

/// Where `target`'s corpus lives: `fuzz/corpus/TARGET` in the repository.
pub fn corpus_dir(target: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every saved input of every shim target runs through its harness again, on stable
    /// Rust, in every `cargo test`.
    #[test]
    fn corpus_replays() {
        let mut ran = 0;
        for (name, harness) in TARGETS {
            let dir = corpus_dir(name);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                panic!("no corpus for fuzz target {name} at {}", dir.display());
            };
            for entry in entries {
                let path = entry.unwrap().path();
                // A fuzzer running beside the test replaces inputs as it reduces them.
                let data = match std::fs::read(&path) {
                    Ok(data) => data,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => panic!("{}: {e}", path.display()),
                };
                if std::panic::catch_unwind(|| harness(&data)).is_err() {
                    panic!("{name}: {} fails", path.display());
                }
                ran += 1;
            }
        }
        assert!(ran >= TARGETS.len(), "only {ran} corpus inputs");
    }

    /// A list of more pids than any container has is refused, not copied; a reasonable one
    /// becomes one entry per pid.
    #[test]
    fn a_huge_process_list_is_refused() {
        let mut list = ag::ListProcessesResponse::new();
        list.pids = (1..=MAX_LISTED_PIDS as u32 + 1).collect();
        let mut data = vec![0u8];
        data.extend(list.write_to_bytes().unwrap());
        agent_replies(&data);
        let e = pids_response(list).unwrap_err();
        assert!(format!("{e:?}").contains("listed 65537 processes"), "{e:?}");
        let ok = ag::ListProcessesResponse {
            pids: vec![1, 7],
            ..Default::default()
        };
        assert_eq!(pids_response(ok).unwrap().processes.len(), 2);
    }

    /// RAM past the bound is refused in the config file and in an annotation, naming it.
    #[test]
    fn memory_past_the_bound_is_refused() {
        let path = Path::new("c.toml");
        let e = Config::from_toml("memory_mib = 2000000\n", path).unwrap_err();
        assert!(
            e.to_string().contains("memory_mib from 64 to 1048576"),
            "{e}"
        );
        let mut config = Config::default();
        let huge = HashMap::from([(
            crate::config::ANNOTATION_MEMORY.to_string(),
            u64::MAX.to_string(),
        )]);
        let e = config.apply_annotations(&huge).unwrap_err();
        assert!(e.to_string().contains("from 64 to 1048576"), "{e}");
        shim_config(format!("\0{}=1048576", crate::config::ANNOTATION_MEMORY).as_bytes());
    }
}
