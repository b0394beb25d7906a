//! COM1 (8250 UART, from vm-superio) and the i8042 controller, whose only job here is to turn
//! the guest's keyboard-controller reset into a clean VM exit.
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
    #[error("cannot open console file {path}: {source}")]
    ConsoleFile { path: PathBuf, source: io::Error },
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

type ConsoleOut = Box<dyn Write + Send>;

/// The port-I/O devices.
pub struct Legacy {
    serial: Serial<IrqTrigger, NoEvents, ConsoleOut>,
    i8042: I8042Device<ResetTrigger>,
}

fn open_console(console: &Console) -> Result<ConsoleOut, LegacyError> {
    Ok(match console {
        Console::Sink => Box::new(io::sink()),
        Console::Stdout => Box::new(io::stdout()),
        Console::File(path) => Box::new(open_append(path)?),
    })
}

fn open_append(path: &Path) -> Result<File, LegacyError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| LegacyError::ConsoleFile {
            path: path.into(),
            source,
        })
}

impl Legacy {
    /// Creates COM1 writing to `console`, raising `serial_irq`, and the i8042 reporting
    /// resets to `exit`. With `serial_state`, COM1 resumes from it (a restored snapshot).
    pub fn new(
        console: &Console,
        serial_irq: EventFd,
        exit: Arc<ExitSignal>,
        serial_state: Option<&SerialState>,
    ) -> Result<Self, LegacyError> {
        let (trigger, out) = (IrqTrigger(serial_irq), open_console(console)?);
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
            tracing::warn!(port, "legacy device write failed: {e}");
        }
        if (SERIAL_PORT..SERIAL_PORT + 8).contains(&port) {
            let _ = self.serial.writer_mut().flush();
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

    #[test]
    fn unwritable_console_is_named() {
        let err = Legacy::new(
            &Console::File("/nonexistent-dir/console".into()),
            EventFd::new(0).unwrap(),
            Arc::new(ExitSignal::new().unwrap()),
            None,
        );
        let msg = err.err().unwrap().to_string();
        assert!(msg.contains("/nonexistent-dir/console"), "{msg}");
    }
}
