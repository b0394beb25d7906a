//! How a VM ends: the first reason reported wins and wakes whoever waits on the VM.
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset (`reboot`, with `reboot=k` through the i8042).
    Reboot,
    /// A vCPU triple-faulted (a guest kernel that broke beyond reporting it); the text says
    /// which vCPU and where.
    TripleFault(String),
    /// The guest powered off or halted for good.
    PowerOff,
    /// The host asked the VM to stop.
    Stopped,
    /// Something failed; the text says what.
    Error(String),
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Reboot => {
                f.write_str("the guest reset itself, as it does after a kernel panic")
            }
            ExitReason::TripleFault(at) => write!(f, "the guest triple-faulted ({at})"),
            ExitReason::PowerOff => f.write_str("the guest powered off"),
            ExitReason::Stopped => f.write_str("stopped by the host"),
            ExitReason::Error(e) => write!(f, "VMM error: {e}"),
        }
    }
}

/// A one-shot, thread-safe "the VM is over" signal with its reason.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless another was recorded first, and wakes the waiter.
    pub fn signal(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            tracing::debug!(?reason, "VM exit");
            *slot = Some(reason);
            let _ = self.evt.write(1);
        }
    }

    pub fn is_signalled(&self) -> bool {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The eventfd that becomes readable once a reason is recorded.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}
