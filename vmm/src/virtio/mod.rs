//! virtio: the device trait, interrupts, and the MMIO transport. Device types live below.
pub mod balloon;
pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod vsock;

use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_F_VERSION_1`: the only virtio flavour shoal speaks (no legacy devices).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bit: a used ring was updated.
pub const INTERRUPT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INTERRUPT_CONFIG: u32 = 2;

/// Errors devices report to the transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("{device}: the driver activated the device with {got} queues, expected {expected}")]
    QueueCount {
        device: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("{device}: queue {index} is not valid in guest memory")]
    InvalidQueue { device: &'static str, index: usize },
    #[error("{device}: {what}")]
    Backend { device: &'static str, what: String },
}

/// A device's interrupt line: the status register the driver reads and the irqfd that raises it.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Arc<Self> {
        Arc::new(Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        })
    }

    /// Tells the driver that used rings changed.
    pub fn signal_used(&self) {
        self.raise(INTERRUPT_VRING);
    }

    /// Tells the driver that the device needs attention (configuration or status changed).
    pub fn signal_config(&self) {
        self.raise(INTERRUPT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("cannot raise virtio interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Sets the status a snapshot saved, without raising the line (the interrupt
    /// controller's saved state already holds whatever the guest had not yet taken).
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::Release);
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// What a virtio device implements; the transport does the rest.
pub trait VirtioDevice: Send {
    /// virtio device id (19 for vsock).
    fn device_type(&self) -> u32;
    /// Short name for logs and errors.
    fn name(&self) -> &'static str;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn features(&self) -> u64;
    /// Waits for what the device started in the background to be ready (the virtio-fs
    /// worker confining itself, side by side with the rest of the VM's set-up).
    fn ready(&mut self) -> Result<(), crate::confine::ConfineError> {
        Ok(())
    }
    /// How many queues the driver must set up, given the features it accepted (all of
    /// them unless a feature adds a queue).
    fn queues_in_use(&self, _driver_features: u64) -> usize {
        self.queue_max_sizes().len()
    }
    /// The features the driver accepted, told before `activate`.
    fn set_driver_features(&mut self, _features: u64) {}
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver wrote the configuration space (read-only unless the device says otherwise).
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(
            device = self.name(),
            offset,
            "virtio: configuration space is read-only"
        );
    }
    /// The driver set DRIVER_OK: start serving `queues`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), VirtioError>;
    /// The driver reset the device: drop queues and in-flight state.
    fn reset(&mut self);
    /// The driver notified queue `index`.
    fn queue_notify(&mut self, index: usize);
    /// A file descriptor the device thread should watch for the device's backend, if any.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// Watch the backend fd edge-triggered (the device drains it on each event and resumes
    /// on its own when it had to stop early) rather than level-triggered.
    fn backend_edge_triggered(&self) -> bool {
        false
    }
    /// The backend fd is ready.
    fn backend_event(&mut self) {}
    /// The positions of the queues the device serves (none while it is not active), for a
    /// snapshot; called with every vCPU parked and the transport locked. A device whose
    /// state a snapshot cannot hold says why.
    fn save_queues(&self) -> Result<Vec<QueueState>, VirtioError> {
        Err(VirtioError::Backend {
            device: self.name(),
            what: "this device's state cannot be saved in a snapshot yet".into(),
        })
    }
    /// Whether the device moved its queues after `save_queues` without the transport's
    /// lock (a worker thread of its own), which makes the snapshot wrong.
    fn changed_since_save(&self) -> bool {
        false
    }
    /// More on where the device stands than its rings show (its backend's connections,
    /// what waits for the guest), for a report on a guest that stopped answering.
    fn report(&self) -> Option<String> {
        None
    }
    /// A restore is about to activate the device with a snapshot's queues.
    fn prepare_restore(&mut self) {}
    /// The device was activated from a snapshot's queues (in a new VM): tell the driver
    /// whatever it must know about the new host side, and serve what the queues hold.
    fn restored(&mut self) {}
}

/// A device type's name, for messages about snapshots.
pub fn device_type_name(device_type: u32) -> String {
    match device_type {
        net::VIRTIO_ID_NET => "net".into(),
        block::VIRTIO_ID_BLOCK => "block".into(),
        balloon::VIRTIO_ID_BALLOON => "balloon".into(),
        vsock::VIRTIO_ID_VSOCK => "vsock".into(),
        fs::VIRTIO_ID_FS => "fs".into(),
        other => format!("type {other}"),
    }
}

/// Checks that the driver activated `device` with the `expected` number of queues.
pub fn expect_queues(
    device: &'static str,
    queues: &[Queue],
    expected: usize,
) -> Result<(), VirtioError> {
    if queues.len() == expected {
        Ok(())
    } else {
        Err(VirtioError::QueueCount {
            device,
            got: queues.len(),
            expected,
        })
    }
}

/// Copies a little-endian configuration blob's bytes at `offset` into `data`, zero past the end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = config.get(offset as usize + i).copied().unwrap_or(0);
    }
}
