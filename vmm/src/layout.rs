//! The guest's physical address space and interrupt lines, in one place.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)            0x0000_0520  IDT (empty)
//! 0x0000_7000  boot_params ("zero page")  0x0000_8ff0  initial stack (grows down)
//! 0x0000_9000  PML4                       0x0000_a000  PDPT
//! 0x0000_b000  4 page directories (2 MiB pages, identity map of the first 4 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (in the EBDA)     0x000a_0000 .. 0x0010_0000  legacy hole
//! 0x0010_0000  kernel (ELF segments)      ...  initramfs at the top of low RAM
//! 0xc000_0000 .. 0x1_0000_0000            MMIO gap: virtio-mmio devices, IOAPIC, LAPIC
//! 0x1_0000_0000                           RAM beyond 3 GiB continues here
//! ```

/// GDT location.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT location (an empty IDT: the kernel installs its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x520;
/// `struct boot_params` for the 64-bit Linux boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of the four page directories.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line the x86 kernel accepts (`COMMAND_LINE_SIZE`, including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area, where the MP table goes; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// End of the legacy (VGA/BIOS) hole.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap; RAM above this address is moved past 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of each virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Most virtio-mmio devices one VM can have (IRQ lines 5..=23).
pub const VIRTIO_MMIO_MAX_DEVICES: u32 = 19;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;

/// GSI of the first virtio-mmio device; device `n` gets `VIRTIO_IRQ_BASE + n`.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Number of IOAPIC pins KVM's in-kernel IOAPIC provides.
pub const IOAPIC_PINS: u32 = 24;

/// COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1's interrupt line.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port; writing 0xfe here is the guest's `reboot=k`.
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// Address KVM uses for its TSS (three pages, inside the MMIO gap, never RAM).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Address of KVM's identity-map page, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Window of virtio-mmio device `index`.
pub fn virtio_mmio_window(index: u32) -> (u64, u64) {
    (
        VIRTIO_MMIO_BASE + u64::from(index) * VIRTIO_MMIO_SIZE,
        VIRTIO_MMIO_SIZE,
    )
}
