//! The LSI53C895A PCI to Ultra2 SCSI controller (PCI 1000:0012), QEMU's
//! `lsi53c895a`, the default `if=scsi` HBA of the `pc` machine, driven by
//! SeaBIOS's lsi-scsi driver and Linux's sym53c8xx_2.
//!
//! Spec followed: the "LSI53C895A PCI to Ultra2 SCSI Controller Technical
//! Manual" (LSI Logic):
//! - chapter 2 "Functional Description": "PCI Functional Description" (the
//!   three BARs, bus mastering) and "SCSI Functional Description" (the
//!   SCRIPTS processor, SCRIPTS RAM, phase mismatch handling), and
//!   "Interrupt Handling" (fatal and non-fatal SCSI interrupts, DSTAT,
//!   SIST0/SIST1, ISTAT0 DIP/SIP/INTF, halting the SCRIPTS);
//! - chapter 4 "Registers": "PCI Configuration Registers" and "SCSI
//!   Registers" (offsets and bits in [`regs`]);
//! - chapter 5 "SCSI SCRIPTS Instruction Set": block move, I/O,
//!   read/write, transfer control, memory move, load and store
//!   ([`scripts`]).
//!
//! QEMU's hw/scsi/lsi53c895a.c was read for what drivers rely on beyond
//! the manual (a zero dword is skipped, MESSAGE OUT follows selection
//! without ATN, negotiation messages are ignored, the delayed selection
//! timeout, the instruction budget ending in an unexpected disconnect).
//!
//! - [`regs`]: register offsets, bits and storage.
//! - [`scripts`]: instruction decoding into typed [`scripts::Insn`]s.
//! - [`chip`]: the SCRIPTS processor, the SCSI bus with its targets,
//!   interrupts, DMA and resets.
//! - this module: the PCI function ([`Lsi53c895a`]) and the block I/O the
//!   chip asks for, run outside its lock.
//!
//! Not emulated: target mode, disconnection and reselection (targets keep
//! the bus while their I/O runs, so WAIT RESELECT only ends by SIGP),
//! 64-bit and 40-bit table indirect addressing (CCNTL1), DMA to I/O space
//! (DMODE SIOM/DIOM), the general purpose and handshake timers (STIME1
//! fires at once, as in QEMU), wide and synchronous transfers (SDTR, WDTR
//! and PPR are ignored, so the bus stays narrow and asynchronous).

pub mod chip;
pub mod fuzz;
pub mod regs;
pub mod scripts;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};

use crate::bus::lock;
use crate::irq::IrqLine;
use crate::pci::{BarKind, PciConfig, PciFunction};
use crate::scsi::bus::ScsiBus;
use crate::scsi::request::{self, Outcome};
use crate::scsi::Lun;
use crate::GuestMem;

use chip::{Chip, IoStart, Windows, BUDGET, MAX_ID, MMIO_SIZE, RAM_SIZE};

/// PCI identity (chapter 4, "PCI Configuration Registers").
pub const VENDOR_ID: u16 = 0x1000;
pub const DEVICE_ID: u16 = 0x0012;
/// Mass storage, SCSI controller.
const CLASS: u32 = 0x01_00_00;
/// The I/O BAR holding the registers.
pub const BAR_IO: usize = 0;
/// The memory BAR holding the registers.
pub const BAR_MMIO: usize = 1;
/// The memory BAR holding the SCRIPTS RAM.
pub const BAR_RAM: usize = 2;
const IO_SIZE: u64 = 256;
const CMD_BUS_MASTER: u16 = 1 << 2;

/// The chip, shared by the PCI function (vCPU threads) and block I/O
/// completions (I/O threads).
type Shared = Arc<Mutex<Chip>>;

/// The LSI53C895A as a PCI function.
///
/// The vmm builds one with [`Lsi53c895a::new`] (guest RAM and the INTA#
/// line from its INTx routing), adds it to a PCI bus (`PciBus::add` with
/// an `Arc<Mutex<Lsi53c895a>>`), registers its [`Lsi53c895a::bus`] as the
/// SCSI bus `<id>.0` (a `ScsiPort`), and `scsi-hd`/`scsi-cd` attach to
/// that bus (`scsi-id` 0..=7 as QEMU allows, 7 unreachable while it is
/// the chip's own id; `lun` 0..=7, what IDENTIFY can address).
/// [`Lsi53c895a::attach`] does the same for callers without a port.
/// Boot paths are QEMU's `/pci@i0cf8/scsi@SLOT/channel@0/disk@ID,LUN`. Its BARs: BAR0 I/O (256 bytes of
/// registers), BAR1 memory (the registers, 1 KiB), BAR2 memory (the
/// 8 KiB SCRIPTS RAM). Interrupts are INTx (pin A), level-triggered.
/// Register accesses never wait for disk I/O: the chip's block I/O
/// completes on I/O threads, which continue the SCRIPTS and raise the
/// line.
pub struct Lsi53c895a {
    config: PciConfig,
    chip: Shared,
    bus: Arc<ScsiBus>,
}

impl Lsi53c895a {
    pub fn new(mem: Arc<GuestMem>, irq: Arc<dyn IrqLine>) -> Lsi53c895a {
        Self::with_device_id(mem, irq, DEVICE_ID)
    }

    /// The same chip under another PCI device ID: QEMU's `lsi53c810`
    /// (0x0001) is this model with the 53C810's ID.
    pub fn with_device_id(mem: Arc<GuestMem>, irq: Arc<dyn IrqLine>, id: u16) -> Lsi53c895a {
        let mut config = PciConfig::new(VENDOR_ID, id, CLASS, 0);
        config.add_bar(BAR_IO, BarKind::Io, IO_SIZE);
        config.add_bar(BAR_MMIO, BarKind::Mem32, MMIO_SIZE);
        config.add_bar(BAR_RAM, BarKind::Mem32, RAM_SIZE as u64);
        config.set_interrupt_pin(1);
        // QEMU's subsystem ids for the device.
        config.set_subsystem(0x1af4, 0x1000);
        let bus = Arc::new(ScsiBus::new(MAX_ID));
        Lsi53c895a {
            config,
            chip: Arc::new(Mutex::new(Chip::new(mem, irq, bus.clone()))),
            bus,
        }
    }

    /// The SCSI bus behind the chip (ids 0..=7; the chip never selects
    /// its own id, 7 after reset): what the vmm's `ScsiPort` hands to
    /// `scsi-hd`/`scsi-cd`. Units attached or detached here are seen at
    /// the next selection.
    pub fn bus(&self) -> &Arc<ScsiBus> {
        &self.bus
    }

    /// Attaches `unit` (a [`crate::scsi::Disk`] or
    /// [`crate::scsi::CdRom`]) as LUN `lun` of the target at SCSI id
    /// `scsi_id`.
    pub fn attach(&mut self, scsi_id: u8, lun: u64, unit: Arc<dyn Lun>) -> Result<(), String> {
        lock(&self.chip).attach(scsi_id, lun, unit)
    }

    /// A device reset: the chip's registers and the SCSI bus.
    pub fn reset(&mut self) {
        lock(&self.chip).reset();
    }

    /// The chip's view of where its BARs are and whether it may master
    /// the bus, refreshed after every config write.
    fn windows(&self) -> Windows {
        let mut w = Windows {
            bus_master: self.config.command() & CMD_BUS_MASTER != 0,
            ..Windows::default()
        };
        for (i, bar) in self.config.decoded_bars() {
            match i {
                BAR_MMIO => w.mmio = Some(bar.base),
                BAR_RAM => w.ram = Some(bar.base),
                _ => {}
            }
        }
        w
    }
}

impl PciFunction for Lsi53c895a {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        let w = self.windows();
        lock(&self.chip).windows = w;
    }

    /// Registers are bytes: wider accesses are split, lowest address
    /// first. The SCRIPTS RAM takes any width.
    fn region_read(&mut self, region: usize, offset: u64, data: &mut [u8]) {
        match region {
            BAR_IO | BAR_MMIO => {
                let mut c = lock(&self.chip);
                for (i, b) in data.iter_mut().enumerate() {
                    *b = c.read((offset as usize + i) as u8);
                }
                c.sync_irq();
            }
            BAR_RAM => {
                let c = lock(&self.chip);
                for (i, b) in data.iter_mut().enumerate() {
                    *b = offset
                        .checked_add(i as u64)
                        .and_then(|o| c.ram.get(o as usize).copied())
                        .unwrap_or(0xff);
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn region_write(&mut self, region: usize, offset: u64, data: &[u8]) {
        match region {
            BAR_IO | BAR_MMIO => register_write(&self.chip, offset, data),
            BAR_RAM => {
                let mut c = lock(&self.chip);
                for (i, &b) in data.iter().enumerate() {
                    if let Some(x) = offset
                        .checked_add(i as u64)
                        .and_then(|o| c.ram.get_mut(o as usize))
                    {
                        *x = b;
                    }
                }
            }
            _ => {}
        }
    }
}

/// A register write from the CPU: the bytes in order, then the SCRIPTS
/// if one of them started or woke them, then their I/O.
fn register_write(chip: &Shared, offset: u64, data: &[u8]) {
    let mut budget = BUDGET;
    let io = {
        let mut c = lock(chip);
        let mut kick = false;
        for (i, &b) in data.iter().enumerate() {
            kick |= c.write((offset as usize + i) as u8, b);
        }
        let io = if kick { c.run(&mut budget) } else { None };
        c.sync_irq();
        io
    };
    drive(chip, io, budget);
}

/// Where a submitted run's outcome meets [`drive`]: whichever of
/// `request::run` returning and the completion comes second continues,
/// so that completions inside `run` loop here instead of recursing.
enum Slot {
    Submitting,
    Done(Outcome),
    Parked,
}

/// Runs the chip's block I/O outside its lock until the SCRIPTS stop
/// asking for more or an I/O is really asynchronous; its completion then
/// continues on the I/O thread with a fresh budget. Completions that come
/// back inside `run` share the caller's budget, so a program whose I/O
/// always completes at once is still bounded per activation.
fn drive(chip: &Shared, mut next: Option<IoStart>, mut budget: u32) {
    while let Some(io) = next.take() {
        let slot = Arc::new(Mutex::new(Slot::Submitting));
        let theirs = slot.clone();
        let chip2 = chip.clone();
        let gen = io.gen;
        request::run(&io.req, io.unit, io.plan, io.path, move |o, _path| {
            let mut g = lock(&theirs);
            match std::mem::replace(&mut *g, Slot::Submitting) {
                Slot::Submitting => *g = Slot::Done(o),
                Slot::Parked => {
                    drop(g);
                    let mut budget = BUDGET;
                    let next = lock(&chip2).complete(gen, o, &mut budget);
                    drive(&chip2, next, budget);
                }
                Slot::Done(_) => log::error!("lsi53c895a: a request completed twice"),
            }
        });
        let mut g = lock(&slot);
        match std::mem::replace(&mut *g, Slot::Parked) {
            Slot::Done(o) => {
                drop(g);
                next = lock(chip).complete(gen, o, &mut budget);
            }
            Slot::Submitting => return,
            Slot::Parked => unreachable!("only this thread parks"),
        }
    }
}
