//! The device bus: where vCPU port-I/O and MMIO exits land.
//!
//! Legacy devices (COM1, i8042) answer on the vCPU thread that trapped. virtio-mmio register
//! accesses do too; queue notifications bypass the vCPU through ioeventfds and are served by
//! the device thread (`event_loop`).
pub mod legacy;

use std::sync::{Arc, Mutex};

use crate::virtio::mmio::MmioTransport;

pub use legacy::{Console, Legacy};

/// One virtio-mmio device on the bus.
pub struct MmioSlot {
    pub base: u64,
    pub size: u64,
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// Every device a vCPU exit can reach.
pub struct Bus {
    legacy: Mutex<Legacy>,
    mmio: Vec<MmioSlot>,
}

impl Bus {
    pub fn new(legacy: Legacy, mmio: Vec<MmioSlot>) -> Self {
        Bus {
            legacy: Mutex::new(legacy),
            mmio,
        }
    }

    /// Each virtio device's ring report (`MmioTransport::ring_report`), a line each.
    pub fn ring_report(&self) -> String {
        self.mmio
            .iter()
            .map(|slot| {
                slot.transport
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .ring_report()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// COM1's state, for a snapshot.
    pub fn serial_state(&self) -> vm_superio::serial::SerialState {
        self.legacy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .serial_state()
    }

    /// Writes out console output COM1 holds back for want of a newline.
    pub fn flush_console(&self) {
        self.legacy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush_console()
    }

    /// Every virtio transport, locked, in bus order.
    pub fn lock_transports(&self) -> Vec<std::sync::MutexGuard<'_, MmioTransport>> {
        self.mmio
            .iter()
            .map(|s| s.transport.lock().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.legacy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(port, data);
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        self.legacy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(port, data);
    }

    fn slot(&self, addr: u64) -> Option<&MmioSlot> {
        self.mmio
            .iter()
            .find(|s| addr >= s.base && addr < s.base + s.size)
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.slot(addr) {
            Some(slot) => slot
                .transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(addr - slot.base, data),
            None => {
                tracing::trace!(addr, "MMIO read outside any device");
                data.fill(0xff);
            }
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        match self.slot(addr) {
            Some(slot) => slot
                .transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(addr - slot.base, data),
            None => tracing::trace!(addr, "MMIO write outside any device"),
        }
    }
}
