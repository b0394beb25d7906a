//! The guest console log as the shim shows it: its last lines, read within a bound (the
//! guest decides how big the log gets) and made printable.
use std::path::Path;

/// How much of the guest console an agent timeout reports.
pub const CONSOLE_TAIL_LINES: usize = 20;

/// The last `lines` lines of the console log at `path`, indented, or why there are none.
///
/// Only the log's last 64 KiB are read (the guest decides how big the log gets), less the
/// first line there if the cut fell inside it; a single line longer than that shows as its end.
pub fn console_tail(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    const TAIL_BYTES: u64 = 64 * 1024;
    let read_end = || -> std::io::Result<Vec<u8>> {
        let mut file = std::fs::File::open(path)?;
        let start = file.metadata()?.len().saturating_sub(TAIL_BYTES);
        // One byte before the cut too: if it is a newline, the first line read is whole.
        let from = start.saturating_sub(1);
        file.seek(SeekFrom::Start(from))?;
        let mut bytes = Vec::new();
        file.take(TAIL_BYTES + 1).read_to_end(&mut bytes)?;
        if start > 0 {
            if let Some(newline) = bytes.iter().position(|b| *b == b'\n') {
                bytes.drain(..=newline);
            }
        }
        Ok(bytes)
    };
    match read_end() {
        Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => {
            "  (the guest printed nothing)".into()
        }
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            // The guest writes it: shown safely wherever it goes (errors, logs, reports).
            tail.iter()
                .map(|l| format!("  {}", printable(l)))
                .collect::<Vec<_>>()
                .join("\n")
        }
        Err(e) => format!("  (cannot read {}: {e})", path.display()),
    }
}

/// The last `lines` lines of `tail`, a [`console_tail`] of more lines: what [`console_tail`]
/// gives for `lines`, without reading the log again.
pub fn last_lines(tail: &str, lines: usize) -> String {
    let all: Vec<&str> = tail.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `text` with every control character but newline and tab, and every invisible
/// formatting character (bidi overrides and isolates, zero-width marks), shown as `?`: the
/// guest writes its console, and reading it must not drive a terminal nor reorder the text.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\n' | '\t' => c,
            c if c.is_control() => '?',
            '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}' => '?',
            c => c,
        })
        .collect()
}
