//! virtio-vsock with hybrid (unix socket) host side.
//!
//! `device.rs`-style plumbing lives here; `packet` parses and fills descriptor chains;
//! `muxer` owns the host sockets and the connection state, and bounds what the guest can
//! make it hold ([`GuestLimits`]).
pub mod muxer;
pub mod packet;

use std::os::unix::io::RawFd;
use std::path::Path;
use std::sync::Arc;

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::Bytes;
use vm_memory::GuestMemoryMmap;

use super::{read_config_bytes, Interrupt, VirtioDevice, VirtioError};
use crate::GuestLimits;
pub use muxer::{Muxer, MuxerError};

/// virtio device id of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
const QUEUE_SIZES: [u16; 3] = [256, 256, 256];
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
/// `virtio_vsock_event.id` of a transport reset.
const EVENT_TRANSPORT_RESET: u32 = 0;

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
    /// After a restore: the guest has been sent a transport reset and has not shown yet
    /// that it took the new CID. Packets for it wait: answered before the reset, a host
    /// connection would be answered from the old CID, which the muxer drops.
    awaiting_reset: bool,
}

impl Vsock {
    /// A vsock device for guest `cid` whose host side listens on `uds_path`; `limits` bound
    /// the connections and queued packets the guest can make the host hold.
    pub fn new(cid: u64, uds_path: &Path, limits: &GuestLimits) -> Result<Self, MuxerError> {
        Ok(Vsock {
            cid,
            muxer: Muxer::new(uds_path, cid, limits)?,
            active: None,
            awaiting_reset: false,
        })
    }

    /// Moves guest-bound packets into RX buffers the driver provided.
    fn fill_rx(&mut self) {
        if self.awaiting_reset {
            return;
        }
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
                    crate::guest_warn!("vsock: unusable RX buffer: {e}");
                    self.muxer.push_front_to_guest(pkt);
                    0
                }
            };
            if let Err(e) = active.queues[RXQ].add_used(&active.mem, head, used) {
                crate::guest_warn!("vsock: cannot return RX buffer: {e:?}");
            }
            used_any = true;
        }
        if used_any {
            active.interrupt.signal_used();
        }
    }

    /// Puts a TRANSPORT_RESET event in the first buffer of the event queue.
    fn send_transport_reset(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(mut chain) = active.queues[EVQ].pop_descriptor_chain(&active.mem) else {
            crate::guest_warn!(
                "vsock: no event buffer for the transport reset; the guest keeps its old CID"
            );
            return;
        };
        let head = chain.head_index();
        let written = match chain.find(|d| d.is_write_only() && d.len() >= 4) {
            Some(d) => match active
                .mem
                .write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr())
            {
                Ok(()) => 4,
                Err(e) => {
                    crate::guest_warn!("vsock: cannot write the transport reset event: {e}");
                    0
                }
            },
            None => {
                crate::guest_warn!("vsock: event buffer too small for the transport reset");
                0
            }
        };
        if let Err(e) = active.queues[EVQ].add_used(&active.mem, head, written) {
            crate::guest_warn!("vsock: cannot return the event buffer: {e:?}");
        }
        active.interrupt.signal_used();
        self.awaiting_reset = written != 0;
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
                Ok(pkt) => {
                    // A packet from the new CID: the guest has taken the reset.
                    if pkt.hdr.src_cid == self.cid {
                        self.awaiting_reset = false;
                    }
                    self.muxer.from_guest(pkt)
                }
                Err(e) => crate::guest_warn!("vsock: dropping malformed TX packet: {e}"),
            }
            if let Err(e) = active.queues[TXQ].add_used(&active.mem, head, 0) {
                crate::guest_warn!("vsock: cannot return TX buffer: {e:?}");
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
        super::expect_queues("vsock", &queues, QUEUE_SIZES.len())?;
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
        self.awaiting_reset = false;
    }

    fn queue_notify(&mut self, index: usize) {
        match index {
            TXQ => {
                self.drain_tx();
                self.fill_rx();
            }
            RXQ => self.fill_rx(),
            // The guest handed back an event buffer: it has handled the transport reset
            // (Linux refills the event queue after handling its events).
            EVQ => {
                self.awaiting_reset = false;
                self.fill_rx();
            }
            _ => tracing::debug!(index, "vsock: notify for unknown queue"),
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn report(&self) -> Option<String> {
        let waiting = if self.awaiting_reset {
            "; packets for the guest wait for it to take the transport reset"
        } else {
            ""
        };
        Some(format!("{}{waiting}", self.muxer.report()))
    }

    /// Host connections are not saved: a restored guest is told its transport was reset
    /// (see `restored`), which closes every connection it had.
    fn save_queues(&self) -> Result<Vec<QueueState>, VirtioError> {
        Ok(self
            .active
            .as_ref()
            .map(|a| a.queues.iter().map(Queue::state).collect())
            .unwrap_or_default())
    }

    /// Nothing reaches the guest between activation and the reset event.
    fn prepare_restore(&mut self) {
        self.awaiting_reset = true;
    }

    /// A VM restored from a snapshot has a new host side (socket, CID) and none of the
    /// old connections: a TRANSPORT_RESET event makes the guest reset every connected
    /// socket and read its CID again. Listening sockets stay.
    fn restored(&mut self) {
        self.send_transport_reset();
        self.drain_tx();
        self.fill_rx();
    }

    fn backend_event(&mut self) {
        self.muxer.process_host_events();
        self.fill_rx();
    }
}

#[cfg(test)]
mod tests {
    use super::packet::{header_bytes, Header, OP_REQUEST, OP_RESPONSE, OP_RW, TYPE_STREAM};
    use super::*;
    use crate::test_support::desc;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_vsock::packet::PKT_HEADER_SIZE;
    use vm_memory::{Address, Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// An RX buffer for descriptor table slots `slot` and `slot + 1`: a header at `addr`
    /// chained to 4 KiB of payload at `addr + 0x1000`.
    fn rx_buffer(addr: u64, slot: u16) -> [virtio_queue::desc::RawDescriptor; 2] {
        [
            desc(
                addr,
                PKT_HEADER_SIZE as u32,
                VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                slot + 1,
            ),
            desc(addr + 0x1000, 4096, VRING_DESC_F_WRITE, 0),
        ]
    }

    /// A connection request from guest CID 3, port 40000, to host port `dst_port`.
    fn guest_request(dst_port: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 40_000,
            dst_port,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            buf_alloc: 65536,
            ..Default::default()
        }
    }

    /// Drives the device through its queues in real guest memory: a guest connection request
    /// on TX reaches a host socket, the response lands in an RX buffer, data follows.
    #[test]
    fn queues_carry_a_guest_connection_to_a_host_socket() {
        let dir = std::env::temp_dir().join(format!("shoal-vsock-dev-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();

        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        let evq = MockSplitQueue::create(&mem, GuestAddress(0x3_0000), 16);
        // Two RX buffers: header + 4 KiB payload each.
        let [a, b] = rx_buffer(0x10_0000, 0);
        let [c, d] = rx_buffer(0x11_0000, 2);
        rxq.add_desc_chains(&[a, b, c, d], 0).unwrap();
        // TX: a REQUEST to host port 5000, then 5 bytes of data.
        let req = guest_request(5000);
        mem.write_slice(&header_bytes(&req, 0), GuestAddress(0x20_0000))
            .unwrap();
        let rw = Header { op: OP_RW, ..req };
        mem.write_slice(&header_bytes(&rw, 5), GuestAddress(0x21_0000))
            .unwrap();
        mem.write_slice(b"hello", GuestAddress(0x21_1000)).unwrap();
        txq.add_desc_chains(
            &[
                desc(0x20_0000, PKT_HEADER_SIZE as u32, 0, 0),
                desc(0x21_0000, PKT_HEADER_SIZE as u32, VRING_DESC_F_NEXT, 2),
                desc(0x21_1000, 5, 0, 0),
            ],
            0,
        )
        .unwrap();

        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Interrupt::new(irq.try_clone().unwrap());
        let mut dev = Vsock::new(3, &uds, &GuestLimits::default()).unwrap();
        let queues = vec![
            rxq.create_queue::<Queue>().unwrap(),
            txq.create_queue::<Queue>().unwrap(),
            evq.create_queue::<Queue>().unwrap(),
        ];
        dev.activate(mem.clone(), queues, interrupt.clone())
            .unwrap();
        dev.queue_notify(TXQ);

        // Both TX chains were consumed.
        let tx_used: u16 = mem.read_obj(txq.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(tx_used, 2);
        // The guest got a RESPONSE in its first RX buffer, and an interrupt.
        let rx_used: u16 = mem.read_obj(rxq.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(rx_used, 1);
        let op: u16 = mem.read_obj(GuestAddress(0x10_0000 + 30)).unwrap();
        assert_eq!(op, OP_RESPONSE);
        let dst_port: u32 = mem.read_obj(GuestAddress(0x10_0000 + 20)).unwrap();
        assert_eq!(dst_port, 40_000);
        assert_eq!(
            irq.read().unwrap(),
            2,
            "one interrupt per queue that was used"
        );
        assert_eq!(
            interrupt.status() & crate::virtio::INTERRUPT_VRING,
            crate::virtio::INTERRUPT_VRING
        );

        // The data reached the host socket.
        let (mut server, _) = listener.accept().unwrap();
        let mut got = [0u8; 5];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Save a device that has served a connection, restore it behind a new transport with a
    /// new CID and socket: the queues go on where they stood, the guest gets a transport
    /// reset event, and the config space shows the new CID.
    #[test]
    fn restored_device_keeps_queue_positions_and_tells_the_guest_of_the_reset() {
        use crate::virtio::mmio::{MmioTransport, TransportState, REG_CONFIG, REG_STATUS};
        let dir = std::env::temp_dir().join(format!("shoal-vsock-restore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        let evq = MockSplitQueue::create(&mem, GuestAddress(0x3_0000), 16);
        // A packet to a port nobody listens on: the device answers with a reset.
        let req = guest_request(5999);
        mem.write_slice(&header_bytes(&req, 0), GuestAddress(0x20_0000))
            .unwrap();
        txq.add_desc_chains(&[desc(0x20_0000, PKT_HEADER_SIZE as u32, 0, 0)], 0)
            .unwrap();
        evq.add_desc_chains(&[desc(0x30_0000, 8, VRING_DESC_F_WRITE, 0)], 0)
            .unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut old = Vsock::new(3, &dir.join("old.sock"), &GuestLimits::default()).unwrap();
        let queues = [&rxq, &txq, &evq]
            .iter()
            .map(|q| q.create_queue::<Queue>().unwrap())
            .collect();
        old.activate(
            mem.clone(),
            queues,
            Interrupt::new(irq.try_clone().unwrap()),
        )
        .unwrap();
        old.queue_notify(TXQ);
        let mut saved = old.save_queues().unwrap();
        // The mock rings are 16 long; a transport's queues offer the device's maximum.
        for (q, max) in saved.iter_mut().zip(QUEUE_SIZES) {
            assert_eq!(q.max_size, 16);
            q.max_size = max;
        }
        assert_eq!((saved[TXQ].next_avail, saved[TXQ].next_used), (1, 1));
        assert_eq!(
            saved[EVQ].next_avail, 0,
            "no event sent before the snapshot"
        );
        drop(old);

        let state = TransportState {
            device_type: VIRTIO_ID_VSOCK,
            status: 15,
            driver_features: crate::virtio::VIRTIO_F_VERSION_1,
            queue_select: 2,
            device_features_select: 0,
            driver_features_select: 1,
            config_generation: 0,
            interrupt_status: 0,
            active: true,
            queues: saved.clone(),
        };
        mem.write_obj(0xffff_ffffu32, GuestAddress(0x30_0000))
            .unwrap();
        let new = Vsock::new(9, &dir.join("new.sock"), &GuestLimits::default()).unwrap();
        let mut transport = MmioTransport::restore(
            Box::new(new),
            mem.clone(),
            Interrupt::new(irq.try_clone().unwrap()),
            &state,
        )
        .unwrap();
        assert!(transport.is_active());
        let mut word = [0u8; 4];
        transport.read(REG_STATUS, &mut word);
        assert_eq!(u32::from_le_bytes(word), 15);
        let mut cid = [0u8; 8];
        transport.read(REG_CONFIG, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 9, "the guest reads its new CID");
        // One event, TRANSPORT_RESET (id 0), 4 bytes long.
        let ev_used: u16 = mem.read_obj(evq.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(ev_used, 1);
        let ev_len: u32 = mem.read_obj(evq.used_addr().unchecked_add(8)).unwrap();
        assert_eq!(ev_len, 4);
        let event: u32 = mem.read_obj(GuestAddress(0x30_0000)).unwrap();
        assert_eq!(event, EVENT_TRANSPORT_RESET);
        let again = transport.save_state().unwrap();
        assert_eq!(again.queues[TXQ], saved[TXQ], "TX goes on where it stood");
        assert_eq!(again.queues[EVQ].next_used, 1);

        // A host connection waits until the guest shows it took the reset (it hands an
        // event buffer back): answered earlier, the guest would answer from its old CID.
        let mut host = std::os::unix::net::UnixStream::connect(dir.join("new.sock")).unwrap();
        host.write_all(b"CONNECT 1024\n").unwrap();
        rxq.add_desc_chains(&rx_buffer(0x10_0000, 0), 0).unwrap();
        let rx_used = || -> u16 { mem.read_obj(rxq.used_addr().unchecked_add(2)).unwrap() };
        for _ in 0..20 {
            transport.device_mut().backend_event();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(rx_used(), 0, "the connection request was not held back");
        transport.device_mut().queue_notify(EVQ);
        assert_eq!(rx_used(), 1, "the connection request was not delivered");
        let op: u16 = mem.read_obj(GuestAddress(0x10_0000 + 30)).unwrap();
        let dst_cid: u64 = mem.read_obj(GuestAddress(0x10_0000 + 8)).unwrap();
        assert_eq!((op, dst_cid), (OP_REQUEST, 9));

        // A saved queue that does not fit the device is refused, naming the queue.
        let mut wrong = state.clone();
        wrong.queues[1].max_size = 1024;
        let err = MmioTransport::restore(
            Box::new(Vsock::new(10, &dir.join("bad.sock"), &GuestLimits::default()).unwrap()),
            mem,
            Interrupt::new(irq),
            &wrong,
        )
        .err()
        .unwrap();
        assert!(
            matches!(err, VirtioError::InvalidQueue { index: 1, .. }),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn activation_needs_three_queues_and_config_holds_the_cid() {
        let dir = std::env::temp_dir().join(format!("shoal-vsock-cfg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut dev = Vsock::new(
            0x0001_2345_6789,
            &dir.join("v.sock"),
            &GuestLimits::default(),
        )
        .unwrap();
        let mut cfg = [0u8; 8];
        dev.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 0x0001_2345_6789);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let err = dev.activate(
            mem,
            vec![Queue::new(16).unwrap()],
            Interrupt::new(EventFd::new(0).unwrap()),
        );
        assert!(matches!(
            err,
            Err(VirtioError::QueueCount {
                got: 1,
                expected: 3,
                ..
            })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
