//! The device thread: one epoll loop serving queue notifications (ioeventfds) and device
//! backends for every virtio device, until told to stop.
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::mmio::MmioTransport;

/// Errors from setting up the device thread.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("cannot set up the device thread's epoll: {0}")]
    Epoll(std::io::Error),
}

const STOP_TOKEN: u64 = u64::MAX;
const BACKEND: u64 = 0xffff;

/// A device as the loop sees it.
pub struct LoopDevice {
    pub transport: Arc<Mutex<MmioTransport>>,
    pub queue_evts: Vec<EventFd>,
}

/// The device thread's state.
pub struct EventLoop {
    epoll: Epoll,
    devices: Vec<LoopDevice>,
    stop: EventFd,
}

fn token(device: usize, slot: u64) -> u64 {
    ((device as u64) << 16) | slot
}

impl EventLoop {
    pub fn new(devices: Vec<LoopDevice>, stop: EventFd) -> Result<Self, EventLoopError> {
        let epoll = Epoll::new().map_err(EventLoopError::Epoll)?;
        let add = |fd: RawFd, data: u64, events: EventSet| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, data))
                .map_err(EventLoopError::Epoll)
        };
        add(stop.as_raw_fd(), STOP_TOKEN, EventSet::IN)?;
        for (i, dev) in devices.iter().enumerate() {
            for (q, evt) in dev.queue_evts.iter().enumerate() {
                add(evt.as_raw_fd(), token(i, q as u64), EventSet::IN)?;
            }
            let (backend, edge) = {
                let transport = dev.transport.lock().unwrap_or_else(|e| e.into_inner());
                let device = transport.device();
                (device.backend_fd(), device.backend_edge_triggered())
            };
            if let Some(fd) = backend {
                let events = match edge {
                    true => EventSet::IN | EventSet::EDGE_TRIGGERED,
                    false => EventSet::IN,
                };
                add(fd, token(i, BACKEND), events)?;
            }
        }
        Ok(EventLoop {
            epoll,
            devices,
            stop,
        })
    }

    /// Serves events until the stop eventfd is written.
    pub fn run(self) {
        let mut events = [EpollEvent::default(); 16];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("device thread: epoll_wait failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                let data = ev.data();
                if data == STOP_TOKEN {
                    let _ = self.stop.read();
                    return;
                }
                let (device, slot) = ((data >> 16) as usize, data & 0xffff);
                let Some(dev) = self.devices.get(device) else {
                    continue;
                };
                let mut transport = dev.transport.lock().unwrap_or_else(|e| e.into_inner());
                if slot == BACKEND {
                    // Served even before the driver starts the device, so host clients are
                    // accepted while the guest boots and the level-triggered fd does not spin.
                    transport.device_mut().backend_event();
                } else {
                    let _ = dev.queue_evts[slot as usize].read();
                    if transport.is_active() {
                        transport.device_mut().queue_notify(slot as usize);
                    }
                }
            }
        }
    }
}
