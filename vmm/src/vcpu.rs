//! A vCPU: its registers at boot, its run loop, which hands every exit to the device bus,
//! and its complete state for snapshots (saved while the vCPU is parked, see [`Pause`]).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES, KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use crate::boot::BOOT_GDT;
use crate::devices::Bus;
use crate::exit::{ExitReason, ExitSignal};
use crate::layout::*;

/// Said of a triple fault whose vCPU reads as just INITed. KVM on AMD (SVM) re-initialises
/// a vCPU that triple-faults before it reports the fault, so the registers are then the
/// INIT state's (the reset vector; cr0 keeps only ET, as a running Linux has CD and NW
/// clear), not where the guest faulted. `scripts/lab-tests` knows a lab test that failed
/// on such a fault by this text.
pub const INIT_STATE_NOTE: &str = "; these are the vCPU's INIT state: KVM on AMD re-initialises a vCPU that triple-faults, so where it faulted is lost";

/// Whether a vCPU at `rip` with `cr0` reads as KVM leaves it after an INIT that found
/// caching enabled: the reset vector, cr0 holding only ET.
pub fn in_init_state(rip: u64, cr0: u64) -> bool {
    rip == 0xfff0 && cr0 == 0x10
}

/// MSR of the TSC-deadline timer.
const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// MSR of the time-stamp counter.
const MSR_TSC: u32 = 0x10;

/// A local APIC register (at `offset` in the register page) of a saved state.
fn lapic_reg(lapic: &kvm_bindings::kvm_lapic_state, offset: usize) -> u32 {
    let b = |i: usize| lapic.regs[offset + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

/// What a vCPU's saved state says about where it stands (see [`crate::Vm::cpu_report`]).
pub fn describe(state: &VcpuState) -> String {
    let run = match state.mp_state.mp_state {
        0 => "running".to_string(),
        3 => "halted".to_string(),
        1 => "not started".to_string(),
        other => format!("MP state {other}"),
    };
    let interrupts = if state.regs.rflags & (1 << 9) != 0 {
        "on"
    } else {
        "off"
    };
    let lvtt = lapic_reg(&state.lapic, 0x320);
    let masked = if lvtt & (1 << 16) != 0 {
        ", masked"
    } else {
        ""
    };
    let msr = |index| state.msrs.iter().find(|m| m.index == index).map(|m| m.data);
    // TSC ticks as ms, or as ticks where the frequency is unknown.
    let ms = |ticks: u64| match state.tsc_khz {
        0 => format!("{ticks} TSC ticks (frequency unknown)"),
        khz => format!("{} ms", ticks / u64::from(khz)),
    };
    let timer = match (lvtt >> 17) & 3 {
        2 => match (msr(MSR_TSC_DEADLINE), msr(MSR_TSC)) {
            (Some(0), _) => "TSC-deadline, not armed".to_string(),
            (Some(deadline), Some(tsc)) if deadline >= tsc => {
                format!("TSC-deadline in {}", ms(deadline - tsc))
            }
            // KVM clears the deadline when it delivers the interrupt: one that passed
            // long before the pause was never delivered.
            (Some(deadline), Some(tsc)) => {
                format!(
                    "TSC-deadline passed {} ago, not delivered yet",
                    ms(tsc - deadline)
                )
            }
            _ => "TSC-deadline, deadline not read".to_string(),
        },
        3 => "reserved mode 3".to_string(),
        mode => format!(
            "{}, initial count {}, current count {}",
            if mode == 1 { "periodic" } else { "one-shot" },
            lapic_reg(&state.lapic, 0x380),
            lapic_reg(&state.lapic, 0x390)
        ),
    };
    format!(
        "{run} at rip {:#x} (cr3 {:#x}, interrupts {interrupts}); LAPIC timer vector {}{masked}: {timer}",
        state.regs.rip,
        state.sregs.cr3,
        lvtt & 0xff
    )
}

/// Errors from creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}: {cause}")]
    Create { index: u8, cause: kvm_ioctls::Error },
    #[error("cannot set {what} of vCPU {index}: {cause}")]
    Set {
        what: &'static str,
        index: u8,
        cause: kvm_ioctls::Error,
    },
    #[error("KVM accepted {set} of {total} MSRs for vCPU {index}")]
    Msrs { index: u8, set: usize, total: usize },
    #[error("cannot read {what} of vCPU {index}: {cause}")]
    Get {
        what: &'static str,
        index: u8,
        cause: kvm_ioctls::Error,
    },
    #[error(
        "KVM refused MSR {msr:#x} of vCPU {index} (a snapshot from a different kind of host?)"
    )]
    MsrRefused { index: u8, msr: u32 },
}

impl VcpuError {
    /// For `map_err`: KVM refused to set `what` on vCPU `index`.
    fn set(what: &'static str, index: u8) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |source| VcpuError::Set {
            what,
            index,
            cause: source,
        }
    }

    /// For `map_err`: KVM could not read `what` of vCPU `index`.
    fn get(what: &'static str, index: u8) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |source| VcpuError::Get {
            what,
            index,
            cause: source,
        }
    }
}

/// Everything KVM holds about one vCPU, as a snapshot saves it.
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub msrs: Vec<kvm_msr_entry>,
    /// The guest's TSC frequency (0: unknown); a restore on a host of another frequency
    /// scales the guest's TSC to it.
    pub tsc_khz: u32,
}

/// Parks running vCPUs between two KVM_RUN calls, where their state is complete, and lets
/// them go again. State is read in a second step, once every vCPU has parked, so no vCPU
/// can change another's (an IPI into a LAPIC already saved) between two saves.
#[derive(Default)]
pub struct Pause {
    requested: AtomicBool,
    parked: Mutex<Parked>,
    changed: Condvar,
}

#[derive(Default)]
struct Parked {
    /// Bumped by every request: a vCPU still parked from an earlier pause leaves and parks
    /// again, so it is counted (and saves) for the current one.
    generation: u64,
    /// vCPUs parked in the current generation.
    count: usize,
    /// Bumped by every save request; each parked vCPU saves once per bump.
    saves: u64,
    /// MSRs to save (KVM_GET_MSR_INDEX_LIST), given by the requester.
    msrs: Arc<[u32]>,
    /// Indexed by vCPU; filled by a save request.
    states: Vec<Option<Result<VcpuState, VcpuError>>>,
}

impl Pause {
    fn lock(&self) -> std::sync::MutexGuard<'_, Parked> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks every vCPU to park; the caller then kicks them out of KVM_RUN. `msrs` are the
    /// MSRs a later [`Pause::save`] reads.
    pub fn request(&self, msrs: Arc<[u32]>) {
        let mut parked = self.lock();
        parked.generation += 1;
        parked.count = 0;
        parked.msrs = msrs;
        self.requested.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Waits up to `limit` for `vcpus` vCPUs to have parked; true when they all have.
    pub fn wait_parked(&self, vcpus: usize, limit: Duration) -> bool {
        let (parked, _) = self
            .changed
            .wait_timeout_while(self.lock(), limit, |p| p.count < vcpus)
            .unwrap_or_else(|e| e.into_inner());
        parked.count >= vcpus
    }

    /// Has every parked vCPU read its state now; the states in vCPU order (None for a vCPU
    /// that did not answer within `limit`).
    pub fn save(&self, vcpus: usize, limit: Duration) -> Vec<Option<Result<VcpuState, VcpuError>>> {
        let mut parked = self.lock();
        parked.states = (0..vcpus).map(|_| None).collect();
        parked.saves += 1;
        self.changed.notify_all();
        let (mut parked, _) = self
            .changed
            .wait_timeout_while(parked, limit, |p| p.states.iter().any(Option::is_none))
            .unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut parked.states)
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        let _parked = self.lock();
        self.requested.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    /// Called by a vCPU thread: sleeps until resumed or stopped, saving its state (with
    /// `save`) whenever asked.
    fn park(
        &self,
        index: u8,
        stop: &AtomicBool,
        mut save: impl FnMut(&[u32]) -> Result<VcpuState, VcpuError>,
    ) {
        let mut parked = self.lock();
        let generation = parked.generation;
        let mut saved = parked.saves;
        parked.count += 1;
        self.changed.notify_all();
        loop {
            if parked.generation != generation
                || !self.is_requested()
                || stop.load(Ordering::Acquire)
            {
                break;
            }
            if parked.saves != saved {
                saved = parked.saves;
                let msrs = parked.msrs.clone();
                drop(parked);
                let state = save(&msrs);
                parked = self.lock();
                if let Some(slot) = parked.states.get_mut(usize::from(index)) {
                    *slot = Some(state);
                }
                self.changed.notify_all();
                continue;
            }
            // Stopping a VM does not take this lock, so look at the stop flag now and then.
            parked = self
                .changed
                .wait_timeout(parked, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if parked.generation == generation {
            parked.count -= 1;
        }
    }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// One vCPU and its index (which is also its APIC id).
pub struct Vcpu {
    pub index: u8,
    fd: VcpuFd,
}

/// Largest xsave area KVM_GET/SET_XSAVE move; hosts needing more (AMX) report a larger
/// KVM_CAP_XSAVE2 and are refused snapshots.
pub const XSAVE_SIZE: usize = std::mem::size_of::<kvm_xsave>();

/// The MSRs a snapshot saves: every MSR KVM lists for save/restore.
pub fn msrs_to_save(kvm: &kvm_ioctls::Kvm) -> Result<Vec<u32>, VcpuError> {
    kvm.get_msr_index_list()
        .map(|list| list.as_slice().to_vec())
        .map_err(|source| VcpuError::Get {
            what: "the MSR list (KVM_GET_MSR_INDEX_LIST)",
            index: 0,
            cause: source,
        })
}

/// Reads KVM's supported CPUID once for all vCPUs.
pub fn supported_cpuid(kvm: &kvm_ioctls::Kvm) -> Result<CpuId, VcpuError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| VcpuError::Set {
            what: "CPUID (KVM_GET_SUPPORTED_CPUID)",
            index: 0,
            cause: source,
        })
}

/// A segment descriptor from an entry of the boot GDT.
pub fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let present = ((entry >> 47) & 1) as u8;
    let granularity = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if granularity == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

impl Vcpu {
    pub fn new(vm: &VmFd, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create {
                index,
                cause: source,
            })?;
        Ok(Vcpu { index, fd })
    }

    /// Puts the vCPU in 64-bit mode at `entry`, with `rsi` pointing at `boot_params`.
    pub fn configure(&self, cpuid: &CpuId, count: u8, entry: u64) -> Result<(), VcpuError> {
        let index = self.index;
        let set = |what| VcpuError::set(what, index);

        let mut cpuid = cpuid.clone();
        crate::cpuid::filter(&mut cpuid, index, count);
        self.fd.set_cpuid2(&cpuid).map_err(set("CPUID"))?;

        let msr = |index, data| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        };
        let entries = [
            msr(0x174, 0),       // IA32_SYSENTER_CS
            msr(0x175, 0),       // IA32_SYSENTER_ESP
            msr(0x176, 0),       // IA32_SYSENTER_EIP
            msr(0xc000_0081, 0), // STAR
            msr(0xc000_0082, 0), // LSTAR
            msr(0xc000_0083, 0), // CSTAR
            msr(0xc000_0084, 0), // SYSCALL_MASK
            msr(0xc000_0102, 0), // KERNEL_GS_BASE
            msr(0x10, 0),        // TSC
            msr(0x1a0, 1),       // IA32_MISC_ENABLE: fast strings
        ];
        let msrs = Msrs::from_entries(&entries).expect("a fixed, small MSR list fits");
        let written = self.fd.set_msrs(&msrs).map_err(set("MSRs"))?;
        if written != entries.len() {
            return Err(VcpuError::Msrs {
                index,
                set: written,
                total: entries.len(),
            });
        }

        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(set("FPU"))?;

        let regs = kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(set("registers"))?;

        let mut sregs: kvm_sregs = self.fd.get_sregs().map_err(set("special registers"))?;
        long_mode_sregs(&mut sregs);
        self.fd
            .set_sregs(&sregs)
            .map_err(set("special registers"))?;

        let mut lapic = self.fd.get_lapic().map_err(set("LAPIC"))?;
        for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let bytes: Vec<u8> = lapic.regs[offset..offset + 4]
                .iter()
                .map(|b| *b as u8)
                .collect();
            let value = u32::from_le_bytes(bytes.try_into().expect("4 bytes"));
            let value = (value & !0x700) | (mode << 8);
            for (i, b) in value.to_le_bytes().iter().enumerate() {
                lapic.regs[offset + i] = *b as _;
            }
        }
        self.fd.set_lapic(&lapic).map_err(set("LAPIC"))?;
        Ok(())
    }

    /// Reads this vCPU's complete state. Only meaningful while it is out of KVM_RUN with
    /// any I/O exit completed (see [`Vcpu::run`]'s parking).
    pub fn save_state(&self, msrs: &[u32]) -> Result<VcpuState, VcpuError> {
        let index = self.index;
        let get = |what| VcpuError::get(what, index);
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(get("CPUID"))?
            .as_slice()
            .to_vec();
        // KVM reads MSRs in order and stops at the first it cannot: leave that one out and
        // go on from the next.
        let mut saved = Vec::with_capacity(msrs.len());
        let mut rest = msrs;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut buf = Msrs::from_entries(&entries).expect("at most KVM_MAX_MSR_ENTRIES");
            let read = self.fd.get_msrs(&mut buf).map_err(get("MSRs"))?;
            saved.extend_from_slice(&buf.as_slice()[..read]);
            if read < chunk.len() {
                tracing::debug!(
                    vcpu = index,
                    msr = chunk[read],
                    "MSR not readable; not saved"
                );
                rest = &rest[read + 1..];
            } else {
                rest = &rest[read..];
            }
        }
        Ok(VcpuState {
            cpuid,
            regs: self.fd.get_regs().map_err(get("registers"))?,
            sregs: self.fd.get_sregs().map_err(get("special registers"))?,
            xsave: self.fd.get_xsave().map_err(get("xsave area"))?,
            xcrs: self.fd.get_xcrs().map_err(get("XCRs"))?,
            debugregs: self.fd.get_debug_regs().map_err(get("debug registers"))?,
            lapic: self.fd.get_lapic().map_err(get("LAPIC"))?,
            mp_state: self.fd.get_mp_state().map_err(get("MP state"))?,
            events: self.fd.get_vcpu_events().map_err(get("pending events"))?,
            msrs: saved,
            tsc_khz: self.fd.get_tsc_khz().unwrap_or(0),
        })
    }

    /// Loads a saved state into this (new) vCPU. CPUID first, since it decides which MSRs
    /// and xsave features exist; pending events last, over the registers they refer to.
    /// `xsave_size` is this host's KVM_CAP_XSAVE2 size (0 when KVM lacks the capability).
    pub fn restore_state(&self, state: &VcpuState, xsave_size: usize) -> Result<(), VcpuError> {
        let index = self.index;
        let set = |what| VcpuError::set(what, index);
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuError::Set {
            what: "CPUID (too many entries)",
            index,
            cause: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        self.fd.set_cpuid2(&cpuid).map_err(set("CPUID"))?;
        if state.tsc_khz != 0
            && self
                .fd
                .get_tsc_khz()
                .is_ok_and(|here| here != state.tsc_khz)
        {
            self.fd.set_tsc_khz(state.tsc_khz).map_err(set(
                "TSC frequency (this host's differs from the snapshot's)",
            ))?;
        }
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(set("MP state"))?;
        self.fd.set_regs(&state.regs).map_err(set("registers"))?;
        self.fd
            .set_sregs(&state.sregs)
            .map_err(set("special registers"))?;
        if xsave_size > XSAVE_SIZE {
            return Err(VcpuError::Set {
                what: "xsave area (this host's is larger than KVM_SET_XSAVE moves)",
                index,
                cause: kvm_ioctls::Error::new(libc::E2BIG),
            });
        }
        // SAFETY: KVM_SET_XSAVE reads the xsave area this host's KVM uses, which is at most
        // `xsave_size` bytes (checked just above to fit in the `kvm_xsave` we pass); the
        // struct is fully initialised (read back from a file of exactly its size).
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(set("xsave area"))?;
        self.fd.set_xcrs(&state.xcrs).map_err(set("XCRs"))?;
        self.fd
            .set_debug_regs(&state.debugregs)
            .map_err(set("debug registers"))?;
        self.fd.set_lapic(&state.lapic).map_err(set("LAPIC"))?;
        for chunk in state.msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).expect("at most KVM_MAX_MSR_ENTRIES");
            let written = self.fd.set_msrs(&msrs).map_err(set("MSRs"))?;
            if written < chunk.len() {
                return Err(VcpuError::MsrRefused {
                    index,
                    msr: chunk[written].index,
                });
            }
        }
        // KVM_GET_VCPU_EVENTS does not mark these as valid; without the flags KVM_SET drops
        // a pending NMI and an AP's SIPI vector.
        let mut events = state.events;
        events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        self.fd
            .set_vcpu_events(&events)
            .map_err(set("pending events"))?;
        Ok(())
    }

    /// Parks this vCPU for a pause. First it finishes an I/O exit KVM is still completing:
    /// KVM completes it on the next KVM_RUN, which with immediate_exit set then returns
    /// EINTR at once; an exit that needs another trip here (string I/O, split MMIO) is
    /// served and the call repeated, so the saved registers never sit inside an instruction.
    fn park(&mut self, pause: &Pause, bus: &Bus, exit: &ExitSignal, stop: &AtomicBool) {
        self.fd.set_kvm_immediate_exit(1);
        while !self.run_once(bus, exit) && !exit.is_signalled() {}
        self.fd.set_kvm_immediate_exit(0);
        if exit.is_signalled() {
            return;
        }
        let index = self.index;
        pause.park(index, stop, |msrs| self.save_state(msrs));
    }

    /// Runs the vCPU until the guest resets or powers off, the host asks it to stop, or KVM
    /// fails. Whatever ends the loop is reported once through `exit`. While `pause` is
    /// requested the vCPU parks (see [`Pause`]).
    pub fn run(
        mut self,
        bus: Arc<Bus>,
        exit: Arc<ExitSignal>,
        stop: Arc<AtomicBool>,
        pause: Arc<Pause>,
        first_run: Option<Arc<std::sync::OnceLock<std::time::Instant>>>,
    ) {
        if let Some(first_run) = first_run {
            let _ = first_run.set(std::time::Instant::now());
        }
        while !stop.load(Ordering::Acquire) && !exit.is_signalled() {
            if pause.is_requested() {
                self.park(&pause, &bus, &exit, &stop);
                continue;
            }
            self.run_once(&bus, &exit);
        }
    }

    /// One KVM_RUN and the exit it ends with, served on `bus` or reported through `exit`.
    /// True when the call was interrupted (a kick, or immediate_exit).
    fn run_once(&mut self, bus: &Bus, exit: &ExitSignal) -> bool {
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => bus.pio_write(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data),
            Ok(VcpuExit::Shutdown) => {
                // A triple fault: shoal's guests reboot through the keyboard controller, so
                // this is a guest that broke; say where, for whoever reads the log.
                let at = match (self.fd.get_regs(), self.fd.get_sregs()) {
                    (Ok(r), Ok(s)) => format!(
                        "vCPU {} at rip {:#x}, rsp {:#x}, cr0 {:#x}, cr3 {:#x}, cr4 {:#x}, efer {:#x}{}",
                        self.index,
                        r.rip,
                        r.rsp,
                        s.cr0,
                        s.cr3,
                        s.cr4,
                        s.efer,
                        if in_init_state(r.rip, s.cr0) {
                            INIT_STATE_NOTE
                        } else {
                            ""
                        }
                    ),
                    _ => format!("vCPU {}", self.index),
                };
                tracing::warn!("guest triple fault: {at}");
                exit.signal(ExitReason::TripleFault(at))
            }
            Ok(VcpuExit::Hlt) => exit.signal(ExitReason::PowerOff),
            Ok(VcpuExit::SystemEvent(kind, _)) => exit.signal(match kind {
                KVM_SYSTEM_EVENT_RESET => ExitReason::Reboot,
                KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                KVM_SYSTEM_EVENT_CRASH => {
                    ExitReason::Error(format!("vCPU {} reported a guest crash", self.index))
                }
                other => {
                    ExitReason::Error(format!("vCPU {}: unknown system event {other}", self.index))
                }
            }),
            Ok(VcpuExit::FailEntry(reason, cpu)) => exit.signal(ExitReason::Error(format!(
                "vCPU {}: KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})",
                self.index
            ))),
            Ok(VcpuExit::InternalError) => exit.signal(ExitReason::Error(format!(
                "vCPU {}: KVM internal error",
                self.index
            ))),
            Ok(other) => exit.signal(ExitReason::Error(format!(
                "vCPU {}: unexpected exit {other:?}",
                self.index
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return true;
            }
            Err(e) => exit.signal(ExitReason::Error(format!(
                "vCPU {}: KVM_RUN failed: {e}",
                self.index
            ))),
        }
        false
    }
}

/// Special registers for 64-bit mode with the boot GDT and identity-mapped page tables.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    let code = segment_from_gdt(BOOT_GDT[1], 1);
    let data = segment_from_gdt(BOOT_GDT[2], 2);
    let tss = segment_from_gdt(BOOT_GDT[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_init_state_is_told_from_where_a_guest_broke() {
        assert!(super::in_init_state(0xfff0, 0x10));
        // Where a guest kernel breaks: long mode, paging on (what KVM on Intel reports).
        assert!(!super::in_init_state(0xffff_ffff_8100_0000, 0x8005_0033));
        // A vCPU reset rather than INITed has CD and NW set.
        assert!(!super::in_init_state(0xfff0, 0x6000_0010));
    }

    use super::*;

    #[test]
    fn code_segment_is_64_bit() {
        let cs = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.present, cs.s, cs.type_),
            (8, 1, 0, 1, 1, 0xb)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!((ds.selector, ds.l, ds.db, ds.type_), (16, 0, 1, 3));
        let null = segment_from_gdt(BOOT_GDT[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn long_mode_bits() {
        let mut s = kvm_sregs::default();
        long_mode_sregs(&mut s);
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.gdt.limit, 31);
    }
}
