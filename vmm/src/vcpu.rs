//! A vCPU: its registers at boot and its run loop, which hands every exit to the device bus.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use crate::boot::BOOT_GDT;
use crate::devices::Bus;
use crate::exit::{ExitReason, ExitSignal};
use crate::layout::*;

/// Errors from creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}: {source}")]
    Create {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("cannot set {what} of vCPU {index}: {source}")]
    Set {
        what: &'static str,
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted {set} of {total} MSRs for vCPU {index}")]
    Msrs { index: u8, set: usize, total: usize },
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

/// Reads KVM's supported CPUID once for all vCPUs.
pub fn supported_cpuid(kvm: &kvm_ioctls::Kvm) -> Result<CpuId, VcpuError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| VcpuError::Set {
            what: "CPUID (KVM_GET_SUPPORTED_CPUID)",
            index: 0,
            source,
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
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Vcpu { index, fd })
    }

    /// Puts the vCPU in 64-bit mode at `entry`, with `rsi` pointing at `boot_params`.
    pub fn configure(&self, cpuid: &CpuId, count: u8, entry: u64) -> Result<(), VcpuError> {
        let index = self.index;
        let set = |what| {
            move |source| VcpuError::Set {
                what,
                index,
                source,
            }
        };

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

    /// Runs the vCPU until the guest resets or powers off, the host asks it to stop, or KVM
    /// fails. Whatever ends the loop is reported once through `exit`.
    pub fn run(
        mut self,
        bus: Arc<Bus>,
        exit: Arc<ExitSignal>,
        stop: Arc<AtomicBool>,
        first_run: Option<Arc<std::sync::OnceLock<std::time::Instant>>>,
    ) {
        if let Some(first_run) = first_run {
            let _ = first_run.set(std::time::Instant::now());
        }
        while !stop.load(Ordering::Acquire) && !exit.is_signalled() {
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
                Ok(VcpuExit::IoOut(port, data)) => bus.pio_write(port, data),
                Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data),
                Ok(VcpuExit::Shutdown) => exit.signal(ExitReason::Reboot),
                Ok(VcpuExit::Hlt) => exit.signal(ExitReason::PowerOff),
                Ok(VcpuExit::SystemEvent(kind, _)) => exit.signal(match kind {
                    KVM_SYSTEM_EVENT_RESET => ExitReason::Reboot,
                    KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                    KVM_SYSTEM_EVENT_CRASH => ExitReason::Error(format!("vCPU {} reported a guest crash", self.index)),
                    other => ExitReason::Error(format!("vCPU {}: unknown system event {other}", self.index)),
                }),
                Ok(VcpuExit::FailEntry(reason, cpu)) => exit.signal(ExitReason::Error(format!(
                    "vCPU {}: KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})",
                    self.index
                ))),
                Ok(VcpuExit::InternalError) => {
                    exit.signal(ExitReason::Error(format!("vCPU {}: KVM internal error", self.index)))
                }
                Ok(other) => exit.signal(ExitReason::Error(format!("vCPU {}: unexpected exit {other:?}", self.index))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => exit.signal(ExitReason::Error(format!("vCPU {}: KVM_RUN failed: {e}", self.index))),
            }
        }
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
