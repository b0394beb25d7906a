//! The flight recorder: when a sandbox's VM ends without the shim having asked (a guest
//! kernel panic, a triple fault, a VMM error, a guest that rebooted itself), what is known of
//! it is written to `<state_dir>/.crashes/`, which outlives the sandbox's own directory. The
//! newest [`KEEP`] reports are kept. The guest decides what its console says: a report holds
//! at most the console's last 64 KiB (as [`crate::console::console_tail`] reads it), with
//! control characters shown as `?`, so that reading a report cannot drive a terminal.
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// How many reports are kept, newest first.
pub const KEEP: usize = 32;
/// The reports' directory under the state directory (no container id starts with a dot,
/// so no sandbox directory can be this one).
pub const DIR: &str = ".crashes";
/// How many console lines a report holds.
pub const CONSOLE_LINES: usize = 200;

pub use crate::console::printable;

/// Writes a report for sandbox `sandbox`, whose VM ended with `reason`, holding `console`
/// (the console's last lines), then removes all but the newest [`KEEP`] reports. Returns the
/// report's path.
pub fn record(
    state_dir: &Path,
    sandbox: &str,
    reason: &str,
    console: &str,
) -> std::io::Result<PathBuf> {
    let dir = state_dir.join(DIR);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // Names sort by time; the id is containerd's, shown safely and cut short.
    let id: String = sandbox
        .chars()
        .take(64)
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' | '.' => c,
            _ => '_',
        })
        .collect();
    let path = dir.join(format!("{:013}-{id}.txt", now.as_millis()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)?;
    write!(
        file,
        "sandbox: {}\nended: {} s after the epoch\nreason: {}\nthe guest console's last lines:\n{}\n",
        printable(sandbox),
        now.as_secs(),
        printable(reason),
        printable(console)
    )?;
    prune(&dir, KEEP);
    Ok(path)
}

/// Removes all but the newest `keep` reports in `dir`.
fn prune(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".txt"))
        .collect();
    names.sort();
    let extra = names.len().saturating_sub(keep);
    for name in &names[..extra] {
        // Another shim may have removed it first.
        let _ = std::fs::remove_file(dir.join(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shoal-crashes-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_report_holds_the_reason_and_the_console_shown_safely() {
        let dir = scratch("one");
        let path = record(
            &dir,
            "pod/../x",
            "the guest triple-faulted (vCPU 0 at rip 0xffffffff81000000)",
            "  Kernel panic - not syncing: sysrq\n  \u{1b}[2Jcleared",
        )
        .unwrap();
        assert_eq!(path.parent().unwrap(), dir.join(DIR));
        assert!(
            path.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .ends_with("-pod_.._x.txt"),
            "{}",
            path.display()
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("sandbox: pod/../x\n"), "{text}");
        assert!(
            text.contains("reason: the guest triple-faulted (vCPU 0 at rip"),
            "{text}"
        );
        assert!(text.contains("Kernel panic - not syncing: sysrq"), "{text}");
        assert!(
            text.contains("?[2Jcleared") && !text.contains('\u{1b}'),
            "{text}"
        );
        assert_eq!(printable("a\u{202E}b\u{200B}c\td\n"), "a?b?c\td\n");
    }

    #[test]
    fn only_the_newest_reports_are_kept() {
        let dir = scratch("keep");
        let mut made = Vec::new();
        for i in 0..KEEP + 3 {
            made.push(record(&dir, &format!("s{i}"), "reset", "").unwrap());
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let left = std::fs::read_dir(dir.join(DIR)).unwrap().count();
        assert_eq!(left, KEEP);
        assert!(made[..3].iter().all(|p| !p.exists()), "the oldest stay");
        assert!(made[3..].iter().all(|p| p.exists()), "a newer one went");
    }
}
