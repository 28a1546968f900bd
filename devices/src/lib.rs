//! Guest-visible PC hardware.
//!
//! Nothing here knows about KVM. A device sees guest memory (`vm-memory`),
//! interrupt lines ([`irq::IrqLine`]), a clock ([`clock::Clock`]) and, for
//! storage controllers, a `block::BlockBackend`. The `vmm` crate wires these
//! to KVM (or to the qtest protocol) and dispatches port and MMIO accesses
//! through a [`bus::Bus`].
//!
//! There is no `unsafe` code here: buffers that point into guest RAM are
//! made by [`dma::GuestSgList::to_iovecs`], on top of
//! `block::iov::IoVecs::from_guest`.

#![forbid(unsafe_code)]

pub mod ahci;
pub mod ata;
pub mod bus;
pub mod chipset;
pub mod clock;
pub mod dma;
pub mod fdc;
pub mod harness;
pub mod ide;
pub mod irq;
pub mod legacy;
pub mod lsi;
pub mod media;
pub mod migration;
pub mod pci;
pub mod scsi;
pub mod system;
pub mod timer;
pub mod usb;
pub mod virtio;

pub use bus::{Bus, BusDevice};
pub use irq::IrqLine;
pub mod bootorder;

/// Guest RAM as devices see it. It never changes while a machine exists.
pub type GuestMem = vm_memory::GuestMemoryMmap<()>;
