//! COM1 (8250 UART, from vm-superio) and the i8042 controller, whose only job here is to turn
//! the guest's keyboard-controller reset into a clean VM exit.
//!
//! A console file is the guest's to fill, so it is capped: it holds at most `console_max_bytes`
//! of guest output, counting what it already held when opened (a restored VM appends to the
//! file its snapshot's VM wrote). The first byte past the cap is replaced by one line,
//! `\n[shoal: console output past N bytes dropped]\n`, written just past the cap, and everything
//! after it is dropped; so the file never grows past the cap plus that line. A file that was
//! already over the cap when opened (its VM wrote the line) takes nothing more, no second line.
//!
//! The UART hands over one byte at a time and flushes after each. The console file is written
//! a line at a time instead: bytes wait in a buffer until a newline, until the buffer holds
//! [`CONSOLE_BUFFER`] bytes, until [`Legacy::flush_console`] or until the device is dropped. A
//! guest printing lines costs one `write` per line, not one per byte, and every complete line
//! is in the file as soon as the guest has sent its newline. The console on stdout is for a
//! person watching (prompts without a newline included) and is written through.
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::exit::{ExitReason, ExitSignal};
use crate::layout::{I8042_COMMAND_PORT, I8042_DATA_PORT, SERIAL_PORT};

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    /// Discarded.
    Sink,
    /// The VMM process's stdout.
    Stdout,
    /// Appended to a file, created if needed.
    File(PathBuf),
}

/// Errors from setting up legacy devices.
#[derive(Debug, thiserror::Error)]
pub enum LegacyError {
    #[error("cannot open console file {path}: {cause}")]
    ConsoleFile { path: PathBuf, cause: io::Error },
    #[error("cannot create the serial interrupt eventfd: {0}")]
    EventFd(io::Error),
    #[error("the snapshot's serial port state is unusable: {0}")]
    SerialState(String),
}

/// Raises the serial IRQ by writing to an eventfd registered as a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Ends the VM with `ExitReason::Reboot` when the guest resets through the i8042.
pub struct ResetTrigger(pub Arc<ExitSignal>);

impl Trigger for ResetTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.signal(ExitReason::Reboot);
        Ok(())
    }
}

/// Bytes a console file holds back while no newline comes.
pub const CONSOLE_BUFFER: usize = 4096;

/// A console file: capped, written a line at a time (see the module documentation).
struct ConsoleFile {
    file: File,
    buf: Vec<u8>,
    /// Guest bytes the file may still take.
    room: u64,
    max: u64,
    /// Whether the cap has been reached: every byte from now on is dropped.
    full: bool,
}

impl ConsoleFile {
    fn open(path: &Path, max: u64) -> Result<Self, LegacyError> {
        let err = |source| LegacyError::ConsoleFile {
            path: path.into(),
            cause: source,
        };
        let file = open_append(path).map_err(err)?;
        let held = file.metadata().map_err(err)?.len();
        Ok(ConsoleFile {
            file,
            buf: Vec::with_capacity(CONSOLE_BUFFER),
            room: max.saturating_sub(held),
            max,
            full: held > max,
        })
    }

    /// Writes out what the buffer holds. On an error the buffered bytes are lost (as the
    /// UART's would be), so the buffer never outgrows [`CONSOLE_BUFFER`].
    fn write_out(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let result = self.file.write_all(&self.buf);
        self.buf.clear();
        result
    }
}

impl Write for ConsoleFile {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.full {
            return Ok(data.len());
        }
        let keep = usize::try_from(self.room).map_or(data.len(), |room| room.min(data.len()));
        let kept = &data[..keep];
        self.buf.extend_from_slice(kept);
        self.room -= kept.len() as u64;
        if kept.len() < data.len() {
            self.full = true;
            let note = format!(
                "\n[shoal: console output past {} bytes dropped]\n",
                self.max
            );
            self.buf.extend_from_slice(note.as_bytes());
            self.write_out()?;
        } else if kept.contains(&b'\n') || self.buf.len() >= CONSOLE_BUFFER {
            self.write_out()?;
        }
        Ok(data.len())
    }

    /// Nothing: the UART calls this after every byte, and a partial line waits for its
    /// newline. [`ConsoleOut::write_out`] is the flush that writes.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleFile {
    fn drop(&mut self) {
        if let Err(e) = self.write_out() {
            tracing::warn!("cannot write the end of the guest console: {e}");
        }
    }
}

/// Where COM1's bytes go.
enum ConsoleOut {
    Sink,
    Stdout(io::Stdout),
    File(ConsoleFile),
}

impl ConsoleOut {
    /// Writes out whatever is held back.
    fn write_out(&mut self) -> io::Result<()> {
        match self {
            ConsoleOut::Sink => Ok(()),
            ConsoleOut::Stdout(out) => out.flush(),
            ConsoleOut::File(file) => file.write_out(),
        }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            ConsoleOut::Sink => Ok(data.len()),
            ConsoleOut::Stdout(out) => out.write(data),
            ConsoleOut::File(file) => file.write(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            ConsoleOut::Sink => Ok(()),
            ConsoleOut::Stdout(out) => out.flush(),
            ConsoleOut::File(file) => file.flush(),
        }
    }
}

/// The port-I/O devices.
pub struct Legacy {
    serial: Serial<IrqTrigger, NoEvents, ConsoleOut>,
    i8042: I8042Device<ResetTrigger>,
}

fn open_console(console: &Console, max_bytes: u64) -> Result<ConsoleOut, LegacyError> {
    Ok(match console {
        Console::Sink => ConsoleOut::Sink,
        Console::Stdout => ConsoleOut::Stdout(io::stdout()),
        Console::File(path) => ConsoleOut::File(ConsoleFile::open(path, max_bytes)?),
    })
}

/// Opens a console file for appending; one it creates is readable by its owner only (what a
/// guest prints is the guest's, not for other host users).
fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

impl Legacy {
    /// Creates COM1 writing to `console` (a file capped at `console_max_bytes`), raising
    /// `serial_irq`, and the i8042 reporting resets to `exit`. With `serial_state`, COM1
    /// resumes from it (a restored snapshot).
    pub fn new(
        console: &Console,
        console_max_bytes: u64,
        serial_irq: EventFd,
        exit: Arc<ExitSignal>,
        serial_state: Option<&SerialState>,
    ) -> Result<Self, LegacyError> {
        let (trigger, out) = (
            IrqTrigger(serial_irq),
            open_console(console, console_max_bytes)?,
        );
        let serial = match serial_state {
            None => Serial::new(trigger, out),
            Some(state) => Serial::from_state(state, trigger, NoEvents, out)
                .map_err(|e| LegacyError::SerialState(format!("{e:?}")))?,
        };
        Ok(Legacy {
            serial,
            i8042: I8042Device::new(ResetTrigger(exit)),
        })
    }

    /// Writes out the console output held back for want of a newline (a VM about to pause,
    /// whose console a reader expects to be complete).
    pub fn flush_console(&mut self) {
        if let Err(e) = self.serial.writer_mut().write_out() {
            crate::guest_warn!("cannot write the guest console: {e}");
        }
    }

    /// COM1's registers and pending input, for a snapshot.
    pub fn serial_state(&self) -> SerialState {
        self.serial.state()
    }

    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) => {
                self.serial.read((p - SERIAL_PORT) as u8)
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT => self.i8042.read((port - I8042_DATA_PORT) as u8),
            _ => 0xff,
        };
    }

    pub fn write(&mut self, port: u16, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        let result = match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) => self
                .serial
                .write((p - SERIAL_PORT) as u8, data[0])
                .map_err(|e| format!("{e:?}")),
            I8042_DATA_PORT | I8042_COMMAND_PORT => self
                .i8042
                .write((port - I8042_DATA_PORT) as u8, data[0])
                .map_err(|e| e.to_string()),
            _ => Ok(()),
        };
        if let Err(e) = result {
            crate::guest_warn!(port, "legacy device write failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn serial_bytes_reach_the_console_file_and_reset_ends_the_vm() {
        let path = std::env::temp_dir().join(format!("shoal-console-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut legacy = Legacy::new(
            &Console::File(path.clone()),
            1 << 20,
            EventFd::new(EFD_NONBLOCK).unwrap(),
            exit.clone(),
            None,
        )
        .unwrap();
        for b in b"hi\n" {
            legacy.write(SERIAL_PORT, &[*b]);
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"hi\n");
        assert!(!exit.is_signalled());
        legacy.write(I8042_COMMAND_PORT, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reboot));
        // Unknown ports read as all ones.
        let mut b = [0u8];
        legacy.read(0x80, &mut b);
        assert_eq!(b[0], 0xff);
        std::fs::remove_file(&path).unwrap();
    }

    /// COM1 writing to a console file at `path` capped at `cap` bytes.
    fn console_to(path: &Path, cap: u64) -> Legacy {
        Legacy::new(
            &Console::File(path.into()),
            cap,
            EventFd::new(EFD_NONBLOCK).unwrap(),
            Arc::new(ExitSignal::new().unwrap()),
            None,
        )
        .unwrap()
    }

    /// The guest writing `bytes` to COM1's transmit register, one at a time as the UART takes
    /// them.
    fn type_out(legacy: &mut Legacy, bytes: &[u8]) {
        for b in bytes {
            legacy.write(SERIAL_PORT, &[*b]);
        }
    }

    fn note(cap: u64) -> String {
        format!("\n[shoal: console output past {cap} bytes dropped]\n")
    }

    struct TempFile(PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn temp_file(name: &str) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("shoal-console-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        TempFile(path)
    }

    #[test]
    fn a_guest_flooding_the_console_fills_it_to_the_cap_and_no_further() {
        let file = temp_file("flood");
        let cap = 1000;
        let mut legacy = console_to(&file.0, cap);
        let line = [&[b'x'; 99][..], b"\n"].concat();
        let flood = line.repeat(100); // 10 times the cap
        type_out(&mut legacy, &flood);
        // Written as soon as the cap was reached, not only when the device goes.
        let expected = [&flood[..cap as usize], note(cap).as_bytes()].concat();
        assert_eq!(std::fs::read(&file.0).unwrap(), expected);
        type_out(&mut legacy, &flood);
        drop(legacy);
        let held = std::fs::read(&file.0).unwrap();
        assert_eq!(held, expected);
        assert!(held.len() as u64 <= cap + note(cap).len() as u64);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file.0).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the console file is its owner's only");
    }

    #[test]
    fn console_output_under_the_cap_is_kept_whole_a_line_at_a_time() {
        let file = temp_file("whole");
        let cap = 10_000;
        let mut legacy = console_to(&file.0, cap);
        type_out(&mut legacy, b"booting\nprompt# ");
        // A line is in the file once its newline is; a partial one waits for its own.
        assert_eq!(std::fs::read(&file.0).unwrap(), b"booting\n");
        legacy.flush_console();
        assert_eq!(std::fs::read(&file.0).unwrap(), b"booting\nprompt# ");
        // A long run without a newline is written when the buffer fills.
        let run = vec![b'y'; CONSOLE_BUFFER + 10];
        type_out(&mut legacy, &run);
        assert!(std::fs::read(&file.0).unwrap().len() >= CONSOLE_BUFFER);
        // Up to exactly the cap: everything kept, no note.
        let so_far = (b"booting\nprompt# ".len() + run.len()) as u64;
        let rest = vec![b'z'; (cap - so_far) as usize];
        type_out(&mut legacy, &rest);
        drop(legacy);
        let held = std::fs::read(&file.0).unwrap();
        assert_eq!(held.len() as u64, cap);
        assert_eq!(held, [&b"booting\nprompt# "[..], &run, &rest].concat());
    }

    #[test]
    fn what_a_console_file_already_holds_counts_against_the_cap() {
        let file = temp_file("restored");
        let cap = 1000;
        let before = vec![b'a'; 900];
        std::fs::write(&file.0, &before).unwrap();
        let mut legacy = console_to(&file.0, cap);
        type_out(&mut legacy, &[b'b'; 500]);
        drop(legacy);
        let expected = [&before[..], &[b'b'; 100], note(cap).as_bytes()].concat();
        assert_eq!(std::fs::read(&file.0).unwrap(), expected);
        // Opened again, over the cap with its note: nothing more goes in.
        let mut legacy = console_to(&file.0, cap);
        type_out(&mut legacy, b"more\n");
        drop(legacy);
        assert_eq!(std::fs::read(&file.0).unwrap(), expected);
    }

    #[test]
    fn unwritable_console_is_named() {
        let err = Legacy::new(
            &Console::File("/nonexistent-dir/console".into()),
            1 << 20,
            EventFd::new(0).unwrap(),
            Arc::new(ExitSignal::new().unwrap()),
            None,
        );
        let msg = err.err().unwrap().to_string();
        assert!(msg.contains("/nonexistent-dir/console"), "{msg}");
    }
}
