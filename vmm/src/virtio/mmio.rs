//! The virtio-mmio transport (virtio 1.x, "version 2" register layout).
use std::sync::Arc;

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Interrupt, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5348_4f4c; // "SHOL"

pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const REG_CONFIG: u64 = 0x100;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// A transport as a snapshot holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub driver_features: u64,
    pub queue_select: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub active: bool,
    pub queues: Vec<QueueState>,
}

/// A virtio device behind its MMIO register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    /// Where each active queue's avail and used rings are (for [`MmioTransport::ring_report`]).
    rings: Vec<(u64, u64)>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    active: bool,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        let queues = Self::fresh_queues(device.as_ref());
        MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            rings: Vec::new(),
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            active: false,
        }
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
            .collect()
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// A register read from the guest.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 {
            crate::guest_warn!(
                offset,
                len = data.len(),
                "virtio-mmio: non-32-bit register read"
            );
            data.fill(0);
            return;
        }
        let value = match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_select {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(offset, "virtio-mmio: read of unknown register");
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A register write from the guest.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            self.device.write_config(offset - REG_CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            crate::guest_warn!(
                offset,
                len = data.len(),
                "virtio-mmio: non-32-bit register write"
            );
            return;
        };
        let value = u32::from_le_bytes(bytes);
        // Queue layout may only change while the driver has not started the device.
        let queue_setup_allowed = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            REG_DRIVER_FEATURES => {
                if self.status & STATUS_FEATURES_OK != 0 {
                    crate::guest_warn!("virtio-mmio: driver changed features after FEATURES_OK");
                    return;
                }
                match self.driver_features_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_select = value,
            REG_QUEUE_NUM if queue_setup_allowed => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16);
                }
            }
            REG_QUEUE_READY if queue_setup_allowed => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH
                if queue_setup_allowed =>
            {
                if let Some(q) = self.selected_queue() {
                    let (low, high) = if offset & 4 == 0 {
                        (Some(value), None)
                    } else {
                        (None, Some(value))
                    };
                    match offset & !4 {
                        REG_QUEUE_DESC_LOW => q.set_desc_table_address(low, high),
                        REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            REG_QUEUE_NOTIFY => {
                // Normally served by an ioeventfd without a vCPU exit; this is the fallback.
                if self.active && (value as usize) < self.queues.len() {
                    self.device.queue_notify(value as usize);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.set_status(value),
            _ => tracing::debug!(offset, value, "virtio-mmio: ignored register write"),
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let unknown = self.driver_features & !self.offered_features();
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                crate::guest_warn!(
                    features = self.driver_features,
                    "virtio-mmio: refusing driver features"
                );
                value &= !STATUS_FEATURES_OK;
            }
        }
        self.status = value;
        if !self.active && value & STATUS_DRIVER_OK != 0 && value & STATUS_FEATURES_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let mut queues =
            std::mem::replace(&mut self.queues, Self::fresh_queues(self.device.as_ref()));
        self.keep_queue_registers(&queues);
        // Queues a feature the driver did not take would add stay unused.
        queues.truncate(self.device.queues_in_use(self.driver_features));
        self.rings.truncate(queues.len());
        self.device.set_driver_features(self.driver_features);
        if let Some(i) = queues.iter().position(|q| !q.is_valid(&self.mem)) {
            crate::guest_warn!(
                device = self.device.name(),
                queue = i,
                "virtio-mmio: invalid queue at DRIVER_OK"
            );
            self.fail();
            return;
        }
        match self
            .device
            .activate(self.mem.clone(), queues, self.interrupt.clone())
        {
            Ok(()) => self.active = true,
            Err(e) => {
                crate::guest_warn!("virtio-mmio: {e}");
                self.fail();
            }
        }
    }

    fn fail(&mut self) {
        self.status |= STATUS_NEEDS_RESET;
        self.interrupt.signal_config();
    }

    /// One line on where the device stands, for a report on a guest that stopped
    /// answering: its interrupt status and, per active queue, the avail and used ring
    /// indexes as guest memory holds them (avail ahead of used: requests not answered yet);
    /// then, indented, whatever more the device tells ([`VirtioDevice::report`]).
    pub fn ring_report(&self) -> String {
        use vm_memory::{Bytes, GuestAddress};
        let idx = |ring: u64| {
            self.mem
                .read_obj::<u16>(GuestAddress(ring.wrapping_add(2)))
                .map(|i| u16::from_le(i).to_string())
                .unwrap_or_else(|_| "?".into())
        };
        let queues: Vec<String> = self
            .rings
            .iter()
            .enumerate()
            .map(|(i, (avail, used))| format!("q{i} avail {} used {}", idx(*avail), idx(*used)))
            .collect();
        let more = self
            .device
            .report()
            .map(|r| format!("\n  {r}"))
            .unwrap_or_default();
        format!(
            "{}: {}, interrupt status {:#x}{}{}{more}",
            self.device.name(),
            if self.active { "active" } else { "not active" },
            self.interrupt.status(),
            if queues.is_empty() { "" } else { "; " },
            queues.join(", ")
        )
    }

    /// The transport's registers and every queue's position, for a snapshot. The queues of
    /// an active device are the device's own; a device that cannot be saved says why.
    pub fn save_state(&self) -> Result<TransportState, VirtioError> {
        // Asked even when not active: a device that cannot be saved says so either way.
        let device_queues = self.device.save_queues()?;
        let queues = match self.active {
            true => device_queues,
            false => self.queues.iter().map(Queue::state).collect(),
        };
        Ok(TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            active: self.active,
            queues,
        })
    }

    /// A transport for `device` as a snapshot left it: registers set, and an active device
    /// given its queues back at the positions saved, then told it was restored.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        state: &TransportState,
    ) -> Result<Self, VirtioError> {
        let name = device.name();
        let invalid = |index| VirtioError::InvalidQueue {
            device: name,
            index,
        };
        let mut queues = Vec::with_capacity(state.queues.len());
        for (index, q) in state.queues.iter().enumerate() {
            if index >= device.queue_max_sizes().len()
                || q.max_size != device.queue_max_sizes()[index]
            {
                return Err(invalid(index));
            }
            queues.push(Queue::try_from(*q).map_err(|_| invalid(index))?);
        }
        interrupt.restore_status(state.interrupt_status);
        let mut transport = MmioTransport::new(device, mem, interrupt);
        transport.status = state.status;
        transport.driver_features = state.driver_features;
        transport.queue_select = state.queue_select;
        transport.device_features_select = state.device_features_select;
        transport.driver_features_select = state.driver_features_select;
        transport.config_generation = state.config_generation;
        transport.keep_queue_registers(&queues);
        if !state.active {
            for (kept, q) in transport.queues.iter_mut().zip(queues) {
                *kept = q;
            }
            return Ok(transport);
        }
        if let Some(index) = queues.iter().position(|q| !q.is_valid(&transport.mem)) {
            return Err(invalid(index));
        }
        transport.device.set_driver_features(state.driver_features);
        transport.device.prepare_restore();
        transport
            .device
            .activate(transport.mem.clone(), queues, transport.interrupt.clone())?;
        transport.active = true;
        transport.device.restored();
        Ok(transport)
    }

    /// Keeps the driver's view of the queue registers it reads back (size, ready) once the
    /// queues themselves are the device's.
    fn keep_queue_registers(&mut self, queues: &[Queue]) {
        self.rings = queues
            .iter()
            .map(|q| (q.avail_ring(), q.used_ring()))
            .collect();
        for (kept, q) in self.queues.iter_mut().zip(queues) {
            kept.set_size(q.size());
            kept.set_ready(q.ready());
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        self.rings.clear();
        self.queues = Self::fresh_queues(self.device.as_ref());
        self.status = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.interrupt.ack(u32::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// A device that records what the transport tells it (a stand-in for a real device: the
    /// transport's register semantics are what is under test).
    #[derive(Default)]
    struct Recorder {
        log: Arc<Mutex<Vec<String>>>,
    }

    impl VirtioDevice for Recorder {
        fn device_type(&self) -> u32 {
            42
        }
        fn name(&self) -> &'static str {
            "recorder"
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[1, 2, 3, 4, 5, 6, 7, 8], offset, data)
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            queues: Vec<Queue>,
            _i: Arc<Interrupt>,
        ) -> Result<(), super::super::VirtioError> {
            self.log.lock().unwrap().push(format!(
                "activate {} {:#x}",
                queues.len(),
                queues[0].desc_table()
            ));
            Ok(())
        }
        fn reset(&mut self) {
            self.log.lock().unwrap().push("reset".into());
        }
        fn queue_notify(&mut self, index: usize) {
            self.log.lock().unwrap().push(format!("notify {index}"));
        }
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Vec<String>>>, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let rec = Recorder::default();
        let log = rec.log.clone();
        let t = MmioTransport::new(
            Box::new(rec),
            mem.clone(),
            Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        );
        (t, log, mem)
    }

    fn set_queue(t: &mut MmioTransport, sel: u32, q: &MockSplitQueue<GuestMemoryMmap>, size: u32) {
        w(t, REG_QUEUE_SEL, sel);
        w(t, REG_QUEUE_NUM, size);
        w(t, REG_QUEUE_DESC_LOW, q.desc_table_addr().0 as u32);
        w(t, REG_QUEUE_DESC_HIGH, 0);
        w(t, REG_QUEUE_DRIVER_LOW, q.avail_addr().0 as u32);
        w(t, REG_QUEUE_DRIVER_HIGH, 0);
        w(t, REG_QUEUE_DEVICE_LOW, q.used_addr().0 as u32);
        w(t, REG_QUEUE_DEVICE_HIGH, 0);
        w(t, REG_QUEUE_READY, 1);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _, _) = setup();
        assert_eq!(r(&mut t, REG_MAGIC), 0x7472_6976);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 42);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1 << 3);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1, "VERSION_1 is offered");
        w(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 8);
        w(&mut t, REG_QUEUE_SEL, 7);
        assert_eq!(
            r(&mut t, REG_QUEUE_NUM_MAX),
            0,
            "missing queues read as absent"
        );
        let mut cfg = [0u8; 2];
        t.read(REG_CONFIG + 6, &mut cfg);
        assert_eq!(cfg, [7, 8]);
    }

    /// The report on a stalled guest reads each ring's indexes from guest memory: a request
    /// the device has not answered shows as avail ahead of used.
    #[test]
    fn the_ring_report_shows_requests_not_answered() {
        let (mut t, _, mem) = setup();
        assert_eq!(
            t.ring_report(),
            "recorder: not active, interrupt status 0x0"
        );
        let q0 = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let q1 = MockSplitQueue::create(&mem, GuestAddress(0x8000), 8);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        set_queue(&mut t, 0, &q0, 16);
        set_queue(&mut t, 1, &q1, 8);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(t.is_active());
        q0.avail().idx().store(3);
        q0.used().idx().store(2);
        assert_eq!(
            t.ring_report(),
            "recorder: active, interrupt status 0x0; q0 avail 3 used 2, q1 avail 0 used 0"
        );
    }

    #[test]
    fn full_driver_handshake_activates_with_real_queues() {
        let (mut t, log, mem) = setup();
        let q0 = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let q1 = MockSplitQueue::create(&mem, GuestAddress(0x8000), 8);
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        w(&mut t, REG_DRIVER_FEATURES, 1 << 3);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        set_queue(&mut t, 0, &q0, 16);
        set_queue(&mut t, 1, &q1, 8);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(t.is_active());
        assert_eq!(log.lock().unwrap()[0], "activate 2 0x1000");
        w(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(log.lock().unwrap()[1], "notify 1");
        w(&mut t, REG_QUEUE_NOTIFY, 9);
        assert_eq!(
            log.lock().unwrap().len(),
            2,
            "notify of a missing queue is ignored"
        );
        // Reset returns everything to the initial state.
        w(&mut t, REG_STATUS, 0);
        assert!(!t.is_active());
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert_eq!(log.lock().unwrap()[2], "reset");
        w(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let (mut t, _, _) = setup();
        w(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        w(&mut t, REG_DRIVER_FEATURES, 1 << 3);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        // Unknown feature bits are refused too.
        w(&mut t, REG_STATUS, 0);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1 | 2);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn queue_outside_guest_memory_fails_activation() {
        let (mut t, log, _) = setup();
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_NUM, 16);
        w(&mut t, REG_QUEUE_DESC_LOW, 0);
        w(&mut t, REG_QUEUE_DESC_HIGH, 0x10); // far beyond 1 MiB of RAM
        w(&mut t, REG_QUEUE_READY, 1);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(!t.is_active());
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        assert_ne!(
            r(&mut t, REG_INTERRUPT_STATUS) & super::super::INTERRUPT_CONFIG,
            0
        );
        assert!(log.lock().unwrap().is_empty());
        // The driver acknowledges the interrupt.
        w(&mut t, REG_INTERRUPT_ACK, super::super::INTERRUPT_CONFIG);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
    }
}
