//! virtio-balloon, used for free page reporting: the guest tells the VMM which of its pages
//! are free, and the VMM drops them from the host (`MADV_DONTNEED` on the private guest
//! mapping), so memory a guest touched once — the initramfs it unpacked, buffers freed
//! after boot — stops costing the host. A page the guest uses again faults back in as a zero
//! page (or, in a VM restored from a snapshot, as the snapshot's page); the guest expects
//! nothing of a reported page's contents.
//!
//! Queues: inflate and deflate (required by the device type; the target size stays 0, so a
//! driver only inflates if it chooses to, and inflated pages are dropped the same way), and
//! the reporting queue when the driver accepts `VIRTIO_BALLOON_F_REPORTING`. Requests are
//! served on the device thread.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{read_config_bytes, Interrupt, VirtioDevice, VirtioError};

/// virtio device id of a memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// The driver reports free pages on a queue of its own.
pub const F_REPORTING: u64 = 1 << 5;
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const REPORTING: usize = 2;
const QUEUE_SIZES: [u16; 3] = [256, 256, 32];
/// Balloon page frame numbers are always in 4 KiB units.
const PFN_SHIFT: u32 = 12;
const PAGE: u64 = 1 << PFN_SHIFT;

/// What the device has given back to the host so far (shared with whoever wants to know).
#[derive(Debug, Default)]
pub struct BalloonStats {
    /// Bytes in free page reports that were dropped.
    pub reported_bytes: AtomicU64,
    /// Free page reports received.
    pub reports: AtomicU64,
    /// Bytes of inflated pages dropped.
    pub inflated_bytes: AtomicU64,
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

/// One virtio-balloon device.
pub struct Balloon {
    /// num_pages (target, always 0) and actual, little-endian.
    config: [u8; 8],
    stats: Arc<BalloonStats>,
    active: Option<Active>,
}

impl Default for Balloon {
    fn default() -> Self {
        Self::new()
    }
}

impl Balloon {
    pub fn new() -> Balloon {
        Balloon {
            config: [0; 8],
            stats: Arc::default(),
            active: None,
        }
    }

    /// Counters of what was given back.
    pub fn stats(&self) -> Arc<BalloonStats> {
        self.stats.clone()
    }

    fn process(&mut self, index: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(index) else {
            return;
        };
        let mem = &active.mem;
        let mut returned = false;
        // What this pass may cost: frame numbers read and ranges dropped. Buffers past it are
        // returned untouched (their pages stay the guest's, only the host does not reclaim
        // them), so one notification costs the VMM a bounded amount of work however the
        // guest lays out its queue: chains sharing descriptors, buffers claiming 4 GiB.
        let mut budget = PASS_BUDGET;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            for desc in chain {
                let (addr, len) = (desc.addr(), u64::from(desc.len()));
                if budget == 0 {
                    crate::guest_warn!(
                        "virtio-balloon: more than {PASS_BUDGET} frames or ranges in one notification; the rest is returned untouched"
                    );
                    break;
                }
                match index {
                    INFLATE => {
                        let dropped = drop_pfns(mem, addr, len, &mut budget);
                        self.stats
                            .inflated_bytes
                            .fetch_add(dropped, Ordering::Relaxed);
                    }
                    REPORTING if take(&mut budget, 1) == 1 && discard(mem, addr, len) => {
                        self.stats.reported_bytes.fetch_add(len, Ordering::Relaxed);
                    }
                    // Deflated pages need nothing: the guest's next touch faults them in.
                    _ => {}
                }
            }
            if index == REPORTING {
                self.stats.reports.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                crate::guest_warn!("virtio-balloon: cannot return a buffer: {e:?}");
            }
            returned = true;
        }
        if returned {
            active.interrupt.signal_used();
        }
    }
}

/// The most work one notification gets: inflate frame numbers read plus reported ranges
/// dropped. Linux's driver sends at most 256 frames (`VIRTIO_BALLOON_ARRAY_PFNS_MAX`) or a
/// few reported ranges per notification. Without a bound, a guest's buffer claiming 4 GiB,
/// or 256 chains reusing one long chain of such buffers, had the VMM read up to billions of
/// numbers and make as many `madvise` calls for one notification (found by the
/// `mmio_balloon` fuzz target: minutes for one input).
const PASS_BUDGET: u64 = 4096;

/// Takes up to `want` from `budget`; returns what was taken.
fn take(budget: &mut u64, want: u64) -> u64 {
    let got = want.min(*budget);
    *budget -= got;
    got
}

/// Drops the pages whose 4 KiB frame numbers (u32 each) fill the buffer at `addr`, as many
/// of them as `budget` allows (it is charged one per number read); returns the bytes
/// dropped. Runs of consecutive frames go to the kernel as one range.
fn drop_pfns(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64, budget: &mut u64) -> u64 {
    let mut run: Option<(u64, u64)> = None;
    let mut dropped = 0;
    let mut flush = |run: Option<(u64, u64)>| {
        if let Some((start, pages)) = run {
            if discard(mem, GuestAddress(start << PFN_SHIFT), pages * PAGE) {
                dropped += pages * PAGE;
            }
        }
    };
    for i in 0..take(budget, len / 4) {
        let Ok(pfn) = mem.read_obj::<u32>(GuestAddress(addr.0.wrapping_add(i * 4))) else {
            break;
        };
        let pfn = u64::from(pfn);
        run = match run {
            Some((start, pages)) if start + pages == pfn => Some((start, pages + 1)),
            other => {
                flush(other);
                Some((pfn, 1))
            }
        };
    }
    flush(run);
    dropped
}

/// Gives the host pages behind guest range `addr..addr+len` back. Ranges that are not
/// page-aligned or not wholly inside one guest RAM region are refused (false): a guest
/// cannot make the VMM drop anything but its own RAM.
fn discard(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> bool {
    if len == 0 || !addr.0.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
        tracing::debug!(
            addr = addr.0,
            len,
            "virtio-balloon: unaligned range ignored"
        );
        return false;
    }
    let Ok(slice) = mem.get_slice(addr, len as usize) else {
        tracing::debug!(
            addr = addr.0,
            len,
            "virtio-balloon: range outside guest RAM ignored"
        );
        return false;
    };
    let host = slice.ptr_guard_mut().as_ptr();
    // SAFETY: `host..host+len` lies inside one region of the guest memory mapping, which
    // `mem` keeps mapped (get_slice checked the bounds), and is page-aligned because guest
    // regions are page-aligned in both address spaces. The mapping is private: anonymous
    // after a boot, where MADV_DONTNEED makes the next access see a zero page, or of a
    // snapshot's memory file after a restore, where it sees the file's page again. A reported
    // or inflated page may hold anything. No host object lives in guest memory, so nothing
    // on the host side is invalidated.
    let rc = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) };
    if rc != 0 {
        crate::guest_warn!(
            addr = addr.0,
            len,
            "virtio-balloon: madvise failed: {}",
            std::io::Error::last_os_error()
        );
        return false;
    }
    true
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn name(&self) -> &'static str {
        "balloon"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        F_REPORTING
    }

    fn queues_in_use(&self, driver_features: u64) -> usize {
        if driver_features & F_REPORTING != 0 {
            3
        } else {
            2
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The driver tells how many pages it holds (`actual`, bytes 4..8); nothing else is
        // writable.
        for (i, b) in data.iter().enumerate() {
            let at = offset as usize + i;
            if (4..8).contains(&at) {
                self.config[at] = *b;
            }
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), VirtioError> {
        if !(2..=3).contains(&queues.len()) {
            return Err(VirtioError::QueueCount {
                device: "balloon",
                got: queues.len(),
                expected: 3,
            });
        }
        tracing::debug!(reporting = queues.len() == 3, "virtio-balloon: active");
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.config[4..].fill(0);
    }

    fn save_queues(&self) -> Result<Vec<virtio_queue::QueueState>, VirtioError> {
        Ok(self
            .active
            .as_ref()
            .map(|a| a.queues.iter().map(Queue::state).collect())
            .unwrap_or_default())
    }

    /// A notification the guest made just before the snapshot may not have been served
    /// (its eventfd belonged to the old VM): look at every queue once.
    fn restored(&mut self) {
        let queues = self.active.as_ref().map_or(0, |a| a.queues.len());
        for index in 0..queues {
            self.process(index);
        }
    }

    fn queue_notify(&mut self, index: usize) {
        if matches!(index, INFLATE | DEFLATE | REPORTING) {
            self.process(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{chained, desc, random_chain, Rng, MEM_SIZE};
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Address;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const MIB: u64 = 1 << 20;

    fn fill(mem: &GuestMemoryMmap, addr: u64, len: u64) {
        mem.write_slice(&vec![0x5au8; len as usize], GuestAddress(addr))
            .unwrap();
    }

    fn is_zero(mem: &GuestMemoryMmap, addr: u64, len: u64) -> bool {
        let mut buf = vec![1u8; len as usize];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf.iter().all(|b| *b == 0)
    }

    /// `n` mock queues of 16 entries at 0x1_0000, 0x2_0000, ...
    fn mock_queues(mem: &GuestMemoryMmap, n: u64) -> Vec<MockSplitQueue<'_, GuestMemoryMmap>> {
        (0..n)
            .map(|i| MockSplitQueue::create(mem, GuestAddress(0x1_0000 * (i + 1)), 16))
            .collect()
    }

    fn active(mem: &GuestMemoryMmap, queues: Vec<Queue>) -> (Balloon, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut b = Balloon::new();
        b.activate(
            mem.clone(),
            queues,
            Interrupt::new(irq.try_clone().unwrap()),
        )
        .unwrap();
        (b, irq)
    }

    #[test]
    fn reported_ranges_are_dropped_and_others_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 * MIB as usize)]).unwrap();
        let queues = mock_queues(&mem, 3);
        fill(&mem, 2 * MIB, 2 * MIB);
        fill(&mem, 5 * MIB, PAGE);
        // One report of two ranges (2 MiB and 4 KiB at 6 MiB), then bad ranges: unaligned,
        // beyond guest RAM, crossing its end, empty.
        let w = VRING_DESC_F_WRITE;
        queues[2]
            .add_desc_chains(
                &[
                    chained(2 * MIB, 2 * MIB as u32, true, 1),
                    desc(6 * MIB, PAGE as u32, w, 0),
                    desc(5 * MIB + 8, PAGE as u32, w, 0),
                    desc(64 * MIB, PAGE as u32, w, 0),
                    desc(8 * MIB - PAGE, 2 * PAGE as u32, w, 0),
                    desc(5 * MIB, 0, w, 0),
                ],
                0,
            )
            .unwrap();
        let (mut b, irq) = active(
            &mem,
            queues.iter().map(|q| q.create_queue().unwrap()).collect(),
        );
        b.queue_notify(REPORTING);
        assert!(is_zero(&mem, 2 * MIB, 2 * MIB));
        let mut kept = [0u8; 1];
        mem.read_slice(&mut kept, GuestAddress(5 * MIB)).unwrap();
        assert_eq!(kept[0], 0x5a, "an unaligned report must not drop the page");
        let stats = b.stats();
        assert_eq!(stats.reported_bytes.load(Ordering::Relaxed), 2 * MIB + PAGE);
        assert_eq!(stats.reports.load(Ordering::Relaxed), 5);
        let used_idx: u16 = mem
            .read_obj(queues[2].used_addr().unchecked_add(2))
            .unwrap();
        assert_eq!(used_idx, 5, "every buffer goes back to the driver");
        assert!(irq.read().is_ok());
        // Memory that was dropped is usable again.
        fill(&mem, 2 * MIB, PAGE);
        assert!(!is_zero(&mem, 2 * MIB, PAGE));
    }

    #[test]
    fn inflated_frames_are_dropped_in_runs_and_deflate_returns_buffers() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 * MIB as usize)]).unwrap();
        let queues = mock_queues(&mem, 2);
        fill(&mem, 0x40_0000, 4 * PAGE);
        // Frames 0x400, 0x401, 0x403 and one far outside guest RAM.
        let pfns: [u32; 4] = [0x400, 0x401, 0x403, 0xff_ffff];
        for (i, p) in pfns.iter().enumerate() {
            mem.write_obj(*p, GuestAddress(0x8_0000 + 4 * i as u64))
                .unwrap();
        }
        queues[0]
            .add_desc_chains(&[desc(0x8_0000, 16, 0, 0)], 0)
            .unwrap();
        queues[1]
            .add_desc_chains(&[desc(0x8_0000, 16, 0, 0)], 0)
            .unwrap();
        let (mut b, _irq) = active(
            &mem,
            queues.iter().map(|q| q.create_queue().unwrap()).collect(),
        );
        b.queue_notify(INFLATE);
        b.queue_notify(DEFLATE);
        // The reporting queue was not negotiated: a notify for it is ignored.
        b.queue_notify(REPORTING);
        assert!(is_zero(&mem, 0x40_0000, 2 * PAGE));
        assert!(
            !is_zero(&mem, 0x40_2000, PAGE),
            "frame 0x402 was not inflated"
        );
        assert!(is_zero(&mem, 0x40_3000, PAGE));
        assert_eq!(b.stats().inflated_bytes.load(Ordering::Relaxed), 3 * PAGE);
        for q in &queues {
            let used_idx: u16 = mem.read_obj(q.used_addr().unchecked_add(2)).unwrap();
            assert_eq!(used_idx, 1);
        }
    }

    /// An inflate buffer claiming 4 GiB of frame numbers is read for the first
    /// `PASS_BUDGET` only, and a second chain in the same notification is returned
    /// untouched: the VMM's work for one notification is bounded, whatever the lengths say.
    #[test]
    fn an_inflate_buffer_is_read_for_a_bounded_number_of_frames() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 * MIB as usize)]).unwrap();
        let queues = mock_queues(&mem, 2);
        // Frame numbers 0x400, 0x402, 0x400, ... (no runs: one madvise each) from 0x10_0000
        // to the end of guest RAM: far more of them than the bound.
        let frames = (8 * MIB - 0x10_0000) / 4;
        for i in 0..frames {
            mem.write_obj(0x400 + 2 * (i % 2) as u32, GuestAddress(0x10_0000 + 4 * i))
                .unwrap();
        }
        queues[0]
            .add_desc_chains(
                &[
                    desc(0x10_0000, u32::MAX, 0, 0),
                    desc(0x10_0000, u32::MAX, 0, 0),
                ],
                0,
            )
            .unwrap();
        let (mut b, _irq) = active(
            &mem,
            queues.iter().map(|q| q.create_queue().unwrap()).collect(),
        );
        b.queue_notify(INFLATE);
        let dropped = b.stats().inflated_bytes.load(Ordering::Relaxed);
        assert_eq!(dropped, PASS_BUDGET * PAGE);
        let used_idx: u16 = mem
            .read_obj(queues[0].used_addr().unchecked_add(2))
            .unwrap();
        assert_eq!(used_idx, 2, "both buffers are returned");
    }

    #[test]
    fn queue_count_follows_the_reporting_feature() {
        let b = Balloon::new();
        assert_eq!(b.queues_in_use(F_REPORTING), 3);
        assert_eq!(b.queues_in_use(0), 2);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MIB as usize)]).unwrap();
        let q = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut b = Balloon::new();
        assert!(b
            .activate(
                mem.clone(),
                vec![q.create_queue().unwrap()],
                Interrupt::new(irq)
            )
            .is_err());
    }

    #[test]
    fn config_space_only_takes_the_actual_field() {
        let mut b = Balloon::new();
        b.write_config(0, &[9, 9, 9, 9, 7, 0, 0, 0]);
        let mut got = [0u8; 8];
        b.read_config(0, &mut got);
        assert_eq!(got, [0, 0, 0, 0, 7, 0, 0, 0]);
    }

    #[test]
    fn random_chains_never_drop_memory_outside_their_ranges_or_panic() {
        let mut rng = Rng(0xba11_00f5);
        for _ in 0..300 {
            let mem =
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
            let queues: Vec<MockSplitQueue<_>> = (0..3)
                .map(|i| MockSplitQueue::create(&mem, GuestAddress(0x1000 * (i + 1)), 8))
                .collect();
            let which = rng.below(3) as usize;
            let chain = random_chain(&mut rng, &mem);
            queues[which].add_desc_chains(&chain, 0).unwrap();
            // The queue rings live below 0x1_0000; the random buffers never name them, so
            // the rings must survive whatever the chain asks.
            let (mut b, _irq) = active(
                &mem,
                queues.iter().map(|q| q.create_queue().unwrap()).collect(),
            );
            b.queue_notify(which);
            let used_idx: u16 = mem
                .read_obj(queues[which].used_addr().unchecked_add(2))
                .unwrap();
            assert_eq!(used_idx, 1);
        }
    }
}
