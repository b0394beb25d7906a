//! The KVM VM object: created with an in-kernel irqchip and PIT, guest RAM registered.
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
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
    #[error("cannot set up the VM's {what}: {source}")]
    Setup {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{requested} vCPUs requested; KVM allows at most {max}")]
    TooManyVcpus { requested: u8, max: usize },
}

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
        let setup = |what| move |source| VmError::Setup { what, source };
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
}
