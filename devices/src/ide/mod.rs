//! The PIIX3 IDE controller (PCI function 8086:7010, as at 00:01.1 on
//! QEMU's `pc`), with ATA disks and ATAPI CD/DVD-ROMs.
//!
//! Specs followed: the 82371SB (PIIX3) datasheet section 2.7 (IDE
//! configuration and bus-master registers), SFF-8038i (bus-master IDE),
//! ATA8-ACS and ATA/ATAPI-6 (registers, protocols, commands), and MMC-5
//! through the shared SCSI target for ATAPI packets.
//!
//! - `bmdma`: bus-master registers and PRD table walking.
//! - `channel`: the per-channel registers, PIO and DMA state machine.
//!
//! The devices themselves (command execution, IDENTIFY, SMART, geometry)
//! are [`crate::ata::AtaDevice`]s, shared with other ATA transports.
//!
//! The function works in "compatibility mode" (programming interface 80h):
//! the channels always decode the legacy ports 0x1f0-0x1f7/0x3f6 (IRQ 14)
//! and 0x170-0x177/0x376 (IRQ 15); BAR4 holds the 16 bus-master bytes.

pub mod bmdma;
pub mod channel;

use std::sync::{Arc, Mutex};

pub use crate::ata::device::{DriveConfig, Media};
use crate::bus::{lock, BusDevice};
use crate::irq::IrqLine;
use crate::pci::{BarKind, PciConfig, PciFunction};
use crate::GuestMem;
pub use channel::{Channel, Drive};

/// Legacy command block base, control block port and IRQ of each channel.
pub const LEGACY: [(u64, u64, u32); 2] = [(0x1f0, 0x3f6, 14), (0x170, 0x376, 15)];

pub type SharedChannel = Arc<Mutex<Channel>>;

pub struct PiixIde {
    config: PciConfig,
    channels: [SharedChannel; 2],
}

impl PiixIde {
    pub fn new(mem: GuestMem, irq14: Arc<dyn IrqLine>, irq15: Arc<dyn IrqLine>) -> Self {
        let mut config = PciConfig::new(0x8086, 0x7010, 0x010180, 0);
        config.add_bar(4, BarKind::Io, 16);
        // IDE timing registers (IDETIM 40h-43h, SIDETIM 44h): stored,
        // without effect on a virtual bus.
        config.set_writable(0x40, 5);
        PiixIde {
            config,
            channels: [
                Arc::new(Mutex::new(Channel::new(mem.clone(), irq14))),
                Arc::new(Mutex::new(Channel::new(mem, irq15))),
            ],
        }
    }

    pub fn channel(&self, bus: usize) -> SharedChannel {
        self.channels[bus & 1].clone()
    }

    /// The legacy port devices of channel `bus`: (command block, control).
    pub fn legacy_ports(&self, bus: usize) -> (CommandBlock, ControlBlock) {
        let ch = self.channel(bus);
        (CommandBlock(ch.clone()), ControlBlock(ch))
    }
}

impl PciFunction for PiixIde {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn region_read(&mut self, region: usize, offset: u64, data: &mut [u8]) {
        if region != 4 {
            data.fill(0xff);
            return;
        }
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset + i as u64;
            *b = lock(&self.channels[(off >> 3) as usize & 1]).bm_read(off & 7);
        }
    }

    fn region_write(&mut self, region: usize, offset: u64, data: &[u8]) {
        if region != 4 {
            return;
        }
        for (i, &v) in data.iter().enumerate() {
            let off = offset + i as u64;
            let ch = &self.channels[(off >> 3) as usize & 1];
            let io = lock(ch).bm_write(off & 7, v);
            if let Some(io) = io {
                channel::run_io(ch, io);
            }
        }
    }
}

/// Ports base+0..=7 of a channel.
pub struct CommandBlock(SharedChannel);

impl BusDevice for CommandBlock {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let io = lock(&self.0).read(offset, data);
        if let Some(io) = io {
            channel::run_io(&self.0, io);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let io = lock(&self.0).write(offset, data);
        if let Some(io) = io {
            channel::run_io(&self.0, io);
        }
    }
}

/// The control block port (alternate status / device control).
pub struct ControlBlock(SharedChannel);

impl BusDevice for ControlBlock {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let s = lock(&self.0).alt_status();
        data.fill(s);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            lock(&self.0).control(v);
        }
    }
}
