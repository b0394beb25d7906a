//! virtio-net backed by a tap device.
//!
//! One receive and one transmit queue. Frames move between the tap and guest buffers with
//! `readv`/`writev` on guest memory, header included (the tap speaks the same
//! `virtio_net_hdr_v1`), so there is no copy in the VMM. Offloads: the guest may send
//! partially checksummed and TSO frames (the host kernel finishes them), and receives them
//! too when it accepts `GUEST_CSUM`/`GUEST_TSO*`, which the tap is then told
//! (`TUNSETOFFLOAD`). With mergeable receive buffers a large frame spreads over several of
//! the guest's small buffers, so the guest need not post 64 KiB buffers for every slot.
//!
//! The tap is watched edge-triggered: a readable tap is drained until it is empty or the
//! guest has no buffers left; in the latter case the guest's next receive-queue notification
//! resumes it.
pub mod tap;

use std::collections::VecDeque;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{read_config_bytes, Interrupt, VirtioDevice, VirtioError};
pub use shoal_netlink::{format_mac, parse_mac};
pub use tap::{Tap, TapError};
use tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, VNET_HDR_LEN};

/// virtio device id of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// The device finishes partial checksums of frames the guest sends.
pub const F_CSUM: u64 = 1 << 0;
/// The guest takes frames with partial checksums.
pub const F_GUEST_CSUM: u64 = 1 << 1;
/// The device tells the guest its MTU.
pub const F_MTU: u64 = 1 << 3;
/// The device tells the guest its MAC address.
pub const F_MAC: u64 = 1 << 5;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_GUEST_ECN: u64 = 1 << 9;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_HOST_ECN: u64 = 1 << 13;
/// A received frame may span several receive buffers.
pub const F_MRG_RXBUF: u64 = 1 << 15;
/// The configuration space has a link status.
pub const F_STATUS: u64 = 1 << 16;
const LINK_UP: u16 = 1;

const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZES: [u16; 2] = [256, 256];
/// The largest frame a TSO-capable guest can be handed: a 64 KiB IP packet behind an
/// Ethernet and a VLAN header.
const MAX_GSO_FRAME: usize = 65535 + 14 + 4;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Settings of one network card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The host tap's name; created if it does not exist.
    pub tap: String,
    /// Network namespace (a path such as /var/run/netns/NAME) the tap lives in; the
    /// VMM's own when `None`.
    pub netns: Option<std::path::PathBuf>,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The link's MTU as the guest should see it.
    pub mtu: u16,
}

impl std::str::FromStr for NetConfig {
    type Err = String;
    /// `TAP[,mac=MAC][,mtu=N][,netns=PATH]`; without a MAC, a random locally administered
    /// one; without an MTU, 1500.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let tap = parts.next().unwrap_or_default();
        let mut config = NetConfig {
            tap: tap.into(),
            netns: None,
            mac: random_mac(),
            mtu: 1500,
        };
        for part in parts {
            match part.split_once('=') {
                Some(("mac", v)) => config.mac = parse_mac(v)?,
                Some(("mtu", v)) => {
                    config.mtu = v.parse().ok().filter(|m| *m >= 68).ok_or_else(|| {
                        format!("{s:?}: MTU {v:?} is not a number from 68 to 65535")
                    })?
                }
                Some(("netns", v)) if !v.is_empty() => config.netns = Some(v.into()),
                _ => {
                    return Err(format!(
                        "{s:?}: expected TAP[,mac=MAC][,mtu=N][,netns=PATH]"
                    ))
                }
            }
        }
        if tap.is_empty() || tap.len() > tap::MAX_NAME_LEN {
            return Err(format!("{s:?}: tap name must be 1 to 15 characters"));
        }
        Ok(config)
    }
}

/// A random unicast, locally administered MAC address.
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut mac))
        .is_err()
    {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id());
        mac.copy_from_slice(&nanos.to_le_bytes()[..6]);
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// Frame counters, shared with whoever wants to know.
#[derive(Debug, Default)]
pub struct NetStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames the guest sent that the tap refused (or that were malformed).
    pub tx_dropped: AtomicU64,
    /// Frames from the tap that did not fit the guest's buffers or could not be read.
    pub rx_dropped: AtomicU64,
}

/// A receive buffer chain taken from the guest and not yet used.
struct RxChain {
    head: u16,
    bufs: Vec<(GuestAddress, u32)>,
    len: usize,
}

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<Interrupt>,
    /// Chains popped from the receive queue, in order, waiting for frames.
    pending: VecDeque<RxChain>,
    pending_len: usize,
}

/// One virtio-net device.
pub struct Net {
    tap: Tap,
    config: [u8; 12],
    mtu: u16,
    driver_features: u64,
    stats: Arc<NetStats>,
    active: Option<Active>,
}

impl Net {
    /// Opens the tap `config` names and builds the device around it.
    pub fn new(config: &NetConfig) -> Result<Net, TapError> {
        let tap = Tap::open(&config.tap, config.netns.as_deref())?;
        Ok(Self::with_tap(tap, config.mac, config.mtu))
    }

    /// Builds the device on an open tap.
    pub fn with_tap(tap: Tap, mac: [u8; 6], mtu: u16) -> Net {
        let mut cfg = [0u8; 12];
        cfg[..6].copy_from_slice(&mac);
        cfg[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        cfg[10..12].copy_from_slice(&mtu.to_le_bytes());
        Net {
            tap,
            config: cfg,
            mtu,
            driver_features: 0,
            stats: Arc::default(),
            active: None,
        }
    }

    /// The device's frame counters.
    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    /// The longest frame (with header) the tap may hand over, given the offloads in force.
    fn max_frame(&self) -> usize {
        let tso = self.driver_features & (F_GUEST_TSO4 | F_GUEST_TSO6) != 0;
        VNET_HDR_LEN
            + if tso {
                MAX_GSO_FRAME
            } else {
                usize::from(self.mtu) + 14 + 4
            }
    }

    /// The tap offloads matching what the guest accepted.
    fn tap_offloads(features: u64) -> u32 {
        let mut flags = 0;
        if features & F_GUEST_CSUM != 0 {
            flags |= TUN_F_CSUM;
            if features & F_GUEST_TSO4 != 0 {
                flags |= TUN_F_TSO4;
            }
            if features & F_GUEST_TSO6 != 0 {
                flags |= TUN_F_TSO6;
            }
            if features & F_GUEST_ECN != 0 && flags & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
                flags |= TUN_F_TSO_ECN;
            }
        }
        flags
    }

    /// Moves frames from the tap into guest buffers until the tap is empty or the guest has
    /// no room left.
    fn process_rx(&mut self) {
        let mergeable = self.driver_features & F_MRG_RXBUF != 0;
        let guest_csum = self.driver_features & F_GUEST_CSUM != 0;
        let max_frame = self.max_frame();
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let ring = usize::from(a.rx.size());
        let mut used_any = false;
        let drop_frame = |stats: &NetStats| stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
        loop {
            // Without mergeable buffers one chain takes a whole frame (the driver sizes them
            // for it); with them, enough chains to hold the largest frame must be at hand.
            let want = if mergeable { max_frame } else { 1 };
            while a.pending_len < want {
                let Some(chain) = a.rx.pop_descriptor_chain(&a.mem) else {
                    break;
                };
                let head = chain.head_index();
                let mut bufs = Vec::new();
                let mut valid = true;
                for d in chain {
                    if !d.is_write_only() || host_iovec(&a.mem, d.addr(), d.len()).is_none() {
                        valid = false;
                        break;
                    }
                    bufs.push((d.addr(), d.len()));
                }
                let len: usize = bufs.iter().map(|b| b.1 as usize).sum();
                if !valid || len < VNET_HDR_LEN {
                    // Not a usable receive buffer: handed back empty at once.
                    tracing::debug!("virtio-net: unusable receive buffer returned");
                    if let Err(e) = a.rx.add_used(&a.mem, head, 0) {
                        crate::guest_warn!("virtio-net: cannot return a receive buffer: {e:?}");
                    }
                    used_any = true;
                    continue;
                }
                a.pending_len += len;
                a.pending.push_back(RxChain { head, bufs, len });
            }
            // A driver whose whole ring holds less than the largest frame gets frames as
            // they come (one that does not fit is dropped) rather than none at all.
            let starved = a.pending.len() >= ring;
            if a.pending.is_empty() || (a.pending_len < want && !starved) {
                // Resumed by the guest's next receive-queue notification.
                break;
            }
            let chains = if mergeable { a.pending.len() } else { 1 };
            let capacity: usize = a.pending.iter().take(chains).map(|c| c.len).sum();
            let iovs: Vec<libc::iovec> = a
                .pending
                .iter()
                .take(chains)
                .flat_map(|c| c.bufs.iter())
                .filter_map(|&(addr, len)| host_iovec(&a.mem, addr, len))
                .collect();
            // SAFETY: every iovec comes from `host_iovec`, which checked that the whole range
            // lies inside guest memory; the mapping outlives the call (held by `a.mem`), and
            // these buffers were handed to the device by the driver for writing.
            let n = match unsafe { self.tap.readv(&iovs) } {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // The frame is gone. Hand the first buffer back empty, so that a buffer
                    // the tap cannot use does not stall receiving for good.
                    tracing::debug!(tap = self.tap.name(), "virtio-net: tap read failed: {e}");
                    drop_frame(&self.stats);
                    if let Some(chain) = a.pending.pop_front() {
                        a.pending_len -= chain.len;
                        let _ = a.rx.add_used(&a.mem, chain.head, 0);
                        used_any = true;
                    }
                    continue;
                }
            };
            // The tap cuts a frame to the buffers and reports what it copied, so a read that
            // fills buffers smaller than the largest frame may have lost the rest.
            let truncated = n > capacity || (n == capacity && capacity < max_frame);
            if truncated || n < VNET_HDR_LEN {
                // Dropped; the buffers serve the next frame.
                drop_frame(&self.stats);
                continue;
            }
            // Hand back as many chains as the frame filled.
            let mut left = n;
            let mut used = Vec::new();
            while let Some(chain) = a.pending.pop_front() {
                a.pending_len -= chain.len;
                let take = left.min(chain.len);
                left -= take;
                used.push((chain, take));
                if left == 0 || !mergeable {
                    break;
                }
            }
            let count = used.len() as u16;
            if let Some((first, _)) = used.first() {
                write_at(
                    &a.mem,
                    &first.bufs,
                    NUM_BUFFERS_OFFSET,
                    &count.to_le_bytes(),
                );
                if !guest_csum {
                    // The tap marks checksummed frames DATA_VALID; a driver that did not
                    // accept checksum offload must see no flags.
                    write_at(&a.mem, &first.bufs, 0, &[0]);
                }
            }
            for (chain, len) in used {
                if let Err(e) = a.rx.add_used(&a.mem, chain.head, len as u32) {
                    crate::guest_warn!("virtio-net: cannot return a receive buffer: {e:?}");
                }
            }
            used_any = true;
            self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
            self.stats
                .rx_bytes
                .fetch_add((n - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        }
        if used_any {
            a.interrupt.signal_used();
        }
    }

    /// Sends every frame the guest queued.
    fn process_tx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used = Vec::new();
        while let Some(chain) = a.tx.pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            let mut iovs = Vec::new();
            let mut total = 0usize;
            let mut valid = true;
            for d in chain {
                match host_iovec(&a.mem, d.addr(), d.len()).filter(|_| !d.is_write_only()) {
                    Some(iov) => {
                        total += d.len() as usize;
                        iovs.push(iov);
                    }
                    None => valid = false,
                }
            }
            used.push(head);
            if !valid || total <= VNET_HDR_LEN {
                self.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("virtio-net: malformed frame from the guest dropped");
                continue;
            }
            // SAFETY: each iovec was checked by `host_iovec` to lie in guest memory, which
            // stays mapped during the call; the tap only reads from them.
            match unsafe { self.tap.writev(&iovs) } {
                Ok(_) => {
                    self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .tx_bytes
                        .fetch_add((total - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    self.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(tap = self.tap.name(), "virtio-net: frame dropped: {e}");
                }
            }
        }
        if used.is_empty() {
            return;
        }
        for head in used {
            if let Err(e) = a.tx.add_used(&a.mem, head, 0) {
                crate::guest_warn!("virtio-net: cannot return a transmit buffer: {e:?}");
            }
        }
        a.interrupt.signal_used();
    }
}

/// The host address range of `len` bytes of guest memory at `addr`, if all of it is there.
fn host_iovec(mem: &GuestMemoryMmap, addr: GuestAddress, len: u32) -> Option<libc::iovec> {
    let slice = mem.get_slice(addr, len as usize).ok()?;
    Some(libc::iovec {
        iov_base: slice.ptr_guard_mut().as_ptr().cast(),
        iov_len: len as usize,
    })
}

/// Writes `data` at byte `offset` of the buffer list `bufs`.
fn write_at(mem: &GuestMemoryMmap, bufs: &[(GuestAddress, u32)], offset: usize, data: &[u8]) {
    for (i, byte) in data.iter().enumerate() {
        let mut at = offset + i;
        for &(addr, len) in bufs {
            if at < len as usize {
                let _ = mem.write_obj(*byte, GuestAddress(addr.0 + at as u64));
                break;
            }
            at -= len as usize;
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn name(&self) -> &'static str {
        "net"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        F_CSUM
            | F_GUEST_CSUM
            | F_MTU
            | F_MAC
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_GUEST_ECN
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_HOST_ECN
            | F_MRG_RXBUF
            | F_STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data)
    }

    fn set_driver_features(&mut self, features: u64) {
        self.driver_features = features;
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), VirtioError> {
        super::expect_queues("net", &queues, QUEUE_SIZES.len())?;
        self.tap
            .set_offload(Self::tap_offloads(self.driver_features))
            .map_err(|e| VirtioError::Backend {
                device: "net",
                what: e.to_string(),
            })?;
        let tx = queues.remove(TX);
        let rx = queues.remove(RX);
        self.active = Some(Active {
            mem,
            rx,
            tx,
            interrupt,
            pending: VecDeque::new(),
            pending_len: 0,
        });
        // Frames may have queued up on the tap while the guest was booting.
        self.process_rx();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.driver_features = 0;
        let _ = self.tap.set_offload(0);
    }

    fn queue_notify(&mut self, index: usize) {
        match index {
            RX => self.process_rx(),
            TX => self.process_tx(),
            _ => {}
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.tap.as_raw_fd())
    }

    fn backend_edge_triggered(&self) -> bool {
        true
    }

    fn backend_event(&mut self) {
        self.process_rx();
    }
}

#[cfg(test)]
mod tests;
