//! Intel 82371AB PIIX4 power management function, 00:01.3 (8086:7113), as
//! QEMU's `pc` machine has it. Follows the PIIX4 datasheet, sections 3.3
//! (function 3 configuration) and 7 (power management I/O: PM1 status,
//! enable and control, and the 24-bit ACPI PM timer at PMBASE+8), plus the
//! APM control/status ports 0xb2/0xb3.
//!
//! Config byte 0x5b (DEVACTB bits 31:24) is preset to 0x02, "APMC enabled":
//! SeaBIOS reads it as "SMM already initialised" and skips SMM setup, which
//! would otherwise spin on port 0xb3 waiting for an SMI handler.

use std::sync::{Arc, Mutex};

use super::acpi_pm::{Apm, Gpe0, PmRegs};
use crate::bus::lock;
use crate::clock::Clock;
use crate::irq::IrqLine;
use crate::pci::{PciConfig, PciFunction};
use crate::system::SystemControl;

pub const PMBASE: u16 = 0x40;
pub const DEVACTB: u16 = 0x58;
pub const PMREGMISC: u16 = 0x80;
pub const PM_IO_LEN: u64 = 0x40;
/// The region id of the PM I/O block in [`PciFunction::extra_io`].
pub const PM_REGION: usize = 6;

/// The GPE0 block QEMU's `pc` puts at 0xafe0 (status, then enable, two
/// bytes each), which the FADT's GPE0_BLK points at.
pub const GPE0_BASE: u16 = 0xafe0;
pub const GPE0_LEN: u64 = 4;
/// GPE0 bit 1: a PCI hotplug event (the DSDT's `_E01`).
pub const GPE_PCI_HOTPLUG: u16 = 1 << 1;

pub struct Piix4Pm {
    config: PciConfig,
    regs: Arc<Mutex<PmRegs>>,
}

impl Piix4Pm {
    pub fn new(
        clock: Arc<dyn Clock>,
        sci: Arc<dyn IrqLine>,
        system: Arc<dyn SystemControl>,
    ) -> Self {
        let mut config = PciConfig::new(0x8086, 0x7113, 0x068000, 0x03);
        config.set_interrupt_pin(1);
        config.set_u8(crate::pci::config::INTERRUPT_LINE, 9);
        config.set_writable(PMBASE, 4);
        config.set_u32(PMBASE, 1);
        config.set_writable(DEVACTB, 4);
        config.set_u8(DEVACTB + 3, 0x02);
        config.set_writable(0x5c, 4); // DEVRESD
        config.set_writable(PMREGMISC, 1);
        config.set_writable(0x90, 4); // SMBBA
        config.set_u32(0x90, 1);
        config.set_writable(0xd2, 1); // SMBHSTCFG
        let regs = PmRegs::new(clock, sci, system);
        Piix4Pm { config, regs }
    }

    pub fn regs(&self) -> Arc<Mutex<PmRegs>> {
        self.regs.clone()
    }

    /// The GPE0 block at [`GPE0_BASE`].
    pub fn gpe0(&self) -> Gpe0 {
        Gpe0::new(self.regs.clone(), GPE0_LEN as usize / 2)
    }

    /// The APM control/status ports, 0xb2-0xb3.
    pub fn apm(&self) -> Apm {
        Apm::new(self.regs.clone())
    }
}

impl PciFunction for Piix4Pm {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        // PMBASE bit 0 reads as 1 (I/O space indicator); bits 15:6 hold the base.
        let base = self.config.u32(PMBASE);
        self.config.set_u32(PMBASE, (base & 0xffc0) | 1);
    }

    fn region_read(&mut self, _region: usize, offset: u64, data: &mut [u8]) {
        lock(&self.regs).read(offset, data)
    }
    fn region_write(&mut self, _region: usize, offset: u64, data: &[u8]) {
        lock(&self.regs).write(offset, data)
    }

    fn extra_io(&self) -> Vec<(u64, u64, usize)> {
        let base = (self.config.u32(PMBASE) & 0xffc0) as u64;
        if self.config.u8(PMREGMISC) & 1 != 0 && base != 0 {
            vec![(base, PM_IO_LEN, PM_REGION)]
        } else {
            Vec::new()
        }
    }
}
