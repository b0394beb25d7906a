//! The KVM VM object: created with an in-kernel irqchip and PIT, guest RAM registered; its
//! interrupt controllers, PIT and clock saved and restored for snapshots.
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Errors from creating the KVM VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("cannot create a KVM VM: {0}")]
    Create(kvm_ioctls::Error),
    #[error("cannot set up the VM's {what}: {cause}")]
    Setup {
        what: &'static str,
        cause: kvm_ioctls::Error,
    },
    #[error("{requested} vCPUs requested; KVM allows at most {max}")]
    TooManyVcpus { requested: u8, max: usize },
    #[error("cannot read the VM's {what}: {cause}")]
    Get {
        what: &'static str,
        cause: kvm_ioctls::Error,
    },
}

/// The VM-wide state KVM holds: the two PICs, the IOAPIC, the PIT and the KVM clock.
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

const IRQCHIPS: [(&str, u32); 3] = [
    ("master PIC", KVM_IRQCHIP_PIC_MASTER),
    ("slave PIC", KVM_IRQCHIP_PIC_SLAVE),
    ("IOAPIC", KVM_IRQCHIP_IOAPIC),
];

/// A KVM VM with its memory registered.
pub struct KvmVm {
    pub kvm: Kvm,
    pub fd: VmFd,
}

impl KvmVm {
    /// Creates the VM, its irqchip and PIT, and registers every region of `mem`.
    pub fn create(mem: &GuestMemoryMmap, vcpus: u8) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        if kvm.get_api_version() != 12 {
            return Err(VmError::ApiVersion(kvm.get_api_version()));
        }
        let max = kvm.get_max_vcpus();
        if usize::from(vcpus) > max {
            return Err(VmError::TooManyVcpus {
                requested: vcpus,
                max,
            });
        }
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        let setup = |what| {
            move |source| VmError::Setup {
                what,
                cause: source,
            }
        };
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(setup("TSS"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(setup("identity map"))?;
        fd.create_irq_chip().map_err(setup("irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(setup("PIT"))?;
        for (slot, region) in mem.iter().enumerate() {
            let host_addr = region.as_ptr() as u64;
            let kvm_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host_addr,
                flags: 0,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`, which
            // the caller keeps alive for as long as this VM exists (the `Vm` owns both and drops
            // the VM fd first).
            unsafe { fd.set_user_memory_region(kvm_region) }.map_err(setup("guest memory"))?;
        }
        Ok(KvmVm { kvm, fd })
    }

    /// Bytes of the xsave area this host's KVM uses (KVM_CAP_XSAVE2), 0 without the
    /// capability (then KVM_GET/SET_XSAVE's 4 KiB are all there is), `usize::MAX` when the
    /// query fails.
    pub fn xsave_size(&self) -> usize {
        // A failed query (negative) counts as too large, so snapshots are refused.
        usize::try_from(self.fd.check_extension_int(kvm_ioctls::Cap::Xsave2)).unwrap_or(usize::MAX)
    }

    /// Reads the VM-wide state; the vCPUs must be paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let get = |what| {
            move |source| VmError::Get {
                what,
                cause: source,
            }
        };
        let chip = |(what, chip_id): (&'static str, u32)| -> Result<kvm_irqchip, VmError> {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd.get_irqchip(&mut chip).map_err(get(what))?;
            Ok(chip)
        };
        let [master, slave, ioapic] = IRQCHIPS;
        Ok(VmState {
            pic_master: chip(master)?,
            pic_slave: chip(slave)?,
            ioapic: chip(ioapic)?,
            pit: self.fd.get_pit2().map_err(get("PIT"))?,
            clock: self.fd.get_clock().map_err(get("KVM clock"))?,
        })
    }

    /// Loads saved VM-wide state into this (new) VM, before its vCPUs are restored: the
    /// clock and the interrupt controllers. The PIT comes last, with [`KvmVm::restore_pit`].
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        let set = |what| {
            move |source| VmError::Setup {
                what,
                cause: source,
            }
        };
        // Only the clock's value: the flags say which fields were valid when it was read,
        // and KVM_SET_CLOCK refuses most of them.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(set("KVM clock"))?;
        for (chip, (what, _)) in [&state.pic_master, &state.pic_slave, &state.ioapic]
            .into_iter()
            .zip(IRQCHIPS)
        {
            self.fd.set_irqchip(chip).map_err(set(what))?;
        }
        Ok(())
    }

    /// Loads the saved PIT, once the interrupt controllers and every vCPU's local APIC
    /// hold their saved state. Loading it arms channel 0 again, and a guest in one-shot
    /// mode may have left a count of a few ticks: the tick then fires at once. KVM's PIT
    /// sends its next tick only once the guest has acknowledged the last one; a tick sent
    /// before the controllers were loaded lands in their fresh state (masked, or a disabled
    /// APIC), is overwritten and never acknowledged, and the guest gets no timer tick
    /// again. A guest that ticks from the PIT alone (the restored guests that stalled in
    /// the nested lab had both local APIC timers masked) then stops wherever it next
    /// waits on a timer, though device interrupts still reach it.
    pub fn restore_pit(&self, state: &VmState) -> Result<(), VmError> {
        self.fd
            .set_pit2(&state.pit)
            .map_err(|source| VmError::Setup {
                what: "PIT",
                cause: source,
            })
    }
}
