//! virtio-vsock with hybrid (unix socket) host side.
//!
//! `device.rs`-style plumbing lives here; `packet` parses and fills descriptor chains;
//! `muxer` owns the host sockets and the connection state.
pub mod muxer;
pub mod packet;

use std::os::unix::io::RawFd;
use std::path::Path;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{read_config_bytes, Interrupt, VirtioDevice, VirtioError};
pub use muxer::{Muxer, MuxerError};

/// virtio device id of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
const QUEUE_SIZES: [u16; 3] = [256, 256, 256];
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

/// The vsock device of one VM.
pub struct Vsock {
    cid: u64,
    muxer: Muxer,
    active: Option<Active>,
}

impl Vsock {
    /// A vsock device for guest `cid` whose host side listens on `uds_path`.
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, MuxerError> {
        Ok(Vsock {
            cid,
            muxer: Muxer::new(uds_path, cid)?,
            active: None,
        })
    }

    /// Moves guest-bound packets into RX buffers the driver provided.
    fn fill_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        while self.muxer.has_packets_for_guest() {
            let Some(mut chain) = active.queues[RXQ].pop_descriptor_chain(&active.mem) else {
                break;
            };
            let pkt = self.muxer.pop_to_guest().expect("checked non-empty");
            let head = chain.head_index();
            let used = match packet::write_rx(&active.mem, &mut chain, &pkt) {
                Ok((used, rest)) => {
                    if !rest.is_empty() {
                        self.muxer.push_front_to_guest(packet::Packet {
                            hdr: pkt.hdr,
                            data: rest,
                        });
                    }
                    used
                }
                Err(e) => {
                    tracing::warn!("vsock: unusable RX buffer: {e}");
                    self.muxer.push_front_to_guest(pkt);
                    0
                }
            };
            if let Err(e) = active.queues[RXQ].add_used(&active.mem, head, used) {
                tracing::warn!("vsock: cannot return RX buffer: {e:?}");
            }
            used_any = true;
        }
        if used_any {
            active.interrupt.signal_used();
        }
    }

    /// Takes every packet the driver queued on TX and hands it to the muxer.
    fn drain_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        while let Some(mut chain) = active.queues[TXQ].pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            match packet::read_tx(&active.mem, &mut chain) {
                Ok(pkt) => self.muxer.from_guest(pkt),
                Err(e) => tracing::warn!("vsock: dropping malformed TX packet: {e}"),
            }
            if let Err(e) = active.queues[TXQ].add_used(&active.mem, head, 0) {
                tracing::warn!("vsock: cannot return TX buffer: {e:?}");
            }
            used_any = true;
        }
        if used_any {
            active.interrupt.signal_used();
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn name(&self) -> &'static str {
        "vsock"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data)
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), VirtioError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(VirtioError::QueueCount {
                device: "vsock",
                got: queues.len(),
                expected: QUEUE_SIZES.len(),
            });
        }
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        // Host clients may have connected while the guest was still booting.
        self.backend_event();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_notify(&mut self, index: usize) {
        match index {
            TXQ => {
                self.drain_tx();
                self.fill_rx();
            }
            RXQ => self.fill_rx(),
            EVQ => {}
            _ => tracing::debug!(index, "vsock: notify for unknown queue"),
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn backend_event(&mut self) {
        self.muxer.process_host_events();
        self.fill_rx();
    }
}
