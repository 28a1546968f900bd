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

use crate::bus::{le_value, lock, put_le, BusDevice};
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

pub const PM1_STS: u64 = 0x00;
pub const PM1_EN: u64 = 0x02;
pub const PM1_CNT: u64 = 0x04;
pub const PM_TMR: u64 = 0x08;

pub const SCI_EN: u16 = 1 << 0;
const SLP_EN: u16 = 1 << 13;
const PWRBTN_STS: u16 = 1 << 8;
const TMR_STS: u16 = 1 << 0;

/// The ACPI PM timer runs at 3.579545 MHz.
pub const PM_TIMER_HZ: u64 = 3_579_545;

/// APM control values that SeaBIOS's (and QEMU's) firmware interface uses to
/// switch ACPI mode on and off.
pub const APM_ACPI_ENABLE: u8 = 0xf1;
pub const APM_ACPI_DISABLE: u8 = 0xf0;

/// The GPE0 block QEMU's `pc` puts at 0xafe0 (status, then enable, two
/// bytes each), which the FADT's GPE0_BLK points at.
pub const GPE0_BASE: u16 = 0xafe0;
pub const GPE0_LEN: u64 = 4;
/// GPE0 bit 1: a PCI hotplug event (the DSDT's `_E01`).
pub const GPE_PCI_HOTPLUG: u16 = 1 << 1;

/// The PM registers, shared between the PCI function and the APM ports.
pub struct PmRegs {
    sts: u16,
    en: u16,
    cnt: u16,
    gpe_sts: u16,
    gpe_en: u16,
    apm_sts: u8,
    clock: Arc<dyn Clock>,
    sci: Arc<dyn IrqLine>,
    system: Arc<dyn SystemControl>,
}

impl PmRegs {
    fn update_sci(&self) {
        let pm1 = self.sts & self.en & (PWRBTN_STS | TMR_STS) != 0;
        let gpe = self.gpe_sts & self.gpe_en != 0;
        self.sci.set_level(self.cnt & SCI_EN != 0 && (pm1 || gpe));
    }

    /// Raises general-purpose event `bits` (ACPI 4.8.4.1: the status bit
    /// stays until the guest writes it back; SCI while it is enabled).
    pub fn gpe_event(&mut self, bits: u16) {
        self.gpe_sts |= bits;
        self.update_sci();
    }

    fn timer(&self) -> u32 {
        let ns = self.clock.now_ns() as u128;
        ((ns * PM_TIMER_HZ as u128 / 1_000_000_000) & 0xff_ffff) as u32
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        let v: u64 = match offset {
            PM1_STS => self.sts as u64,
            PM1_EN => self.en as u64,
            PM1_CNT => self.cnt as u64,
            PM_TMR => self.timer() as u64,
            _ => 0,
        };
        put_le(data, v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let v = le_value(data) as u16;
        match offset {
            PM1_STS => self.sts &= !v,
            PM1_EN => self.en = v,
            PM1_CNT => {
                self.cnt = v & !SLP_EN;
                // SLP_TYP 0 with SLP_EN is soft-off (S5) in this chipset's DSDT.
                if v & SLP_EN != 0 && (v >> 10) & 7 == 0 {
                    self.system.request_shutdown();
                }
            }
            _ => {}
        }
        self.update_sci();
    }

    /// Presses the power button (QMP `system_powerdown`).
    pub fn power_button(&mut self) {
        self.sts |= PWRBTN_STS;
        self.update_sci();
    }
}

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
        let regs = Arc::new(Mutex::new(PmRegs {
            sts: 0,
            en: 0,
            cnt: 0,
            gpe_sts: 0,
            gpe_en: 0,
            apm_sts: 0,
            clock,
            sci,
            system,
        }));
        Piix4Pm { config, regs }
    }

    pub fn regs(&self) -> Arc<Mutex<PmRegs>> {
        self.regs.clone()
    }

    /// The GPE0 block at [`GPE0_BASE`].
    pub fn gpe0(&self) -> Gpe0 {
        Gpe0 {
            regs: self.regs.clone(),
        }
    }

    /// The APM control/status ports, 0xb2-0xb3.
    pub fn apm(&self) -> Apm {
        Apm {
            regs: self.regs.clone(),
        }
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

/// GPE0_STS (offsets 0-1, write one to clear) and GPE0_EN (2-3).
pub struct Gpe0 {
    regs: Arc<Mutex<PmRegs>>,
}

impl BusDevice for Gpe0 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let r = lock(&self.regs);
        let v = (r.gpe_sts as u32 | (r.gpe_en as u32) << 16) as u64;
        let bytes = v.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut r = lock(&self.regs);
        for (i, &b) in data.iter().enumerate() {
            match offset as usize + i {
                0 => r.gpe_sts &= !(b as u16),
                1 => r.gpe_sts &= !((b as u16) << 8),
                2 => r.gpe_en = (r.gpe_en & 0xff00) | b as u16,
                3 => r.gpe_en = (r.gpe_en & 0x00ff) | (b as u16) << 8,
                _ => {}
            }
        }
        r.update_sci();
    }
}

/// APM ports: 0xb2 (APMC) and 0xb3 (APMS).
pub struct Apm {
    regs: Arc<Mutex<PmRegs>>,
}

impl BusDevice for Apm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let r = lock(&self.regs);
        data.fill(0);
        if offset == 1 {
            data[0] = r.apm_sts;
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut r = lock(&self.regs);
        match (offset, data[0]) {
            (0, APM_ACPI_ENABLE) => r.cnt |= SCI_EN,
            (0, APM_ACPI_DISABLE) => r.cnt &= !SCI_EN,
            (1, v) => r.apm_sts = v,
            _ => {}
        }
    }
}
