//! ACPI fixed hardware and general-purpose events as PC chipsets
//! implement them: the PM1 event and control registers, the 24-bit PM
//! timer (ACPI 6.4 sections 4.8.3.1-4.8.3.3), GPE0 status/enable
//! (4.8.4.1) and the APM control/status ports 0xb2/0xb3 that switch ACPI
//! mode on and off. The PIIX4 PM function (`pc`) and the ICH9 LPC (`q35`)
//! place these registers at their own PMBASE.

use std::sync::{Arc, Mutex};

use crate::bus::{le_value, lock, put_le, BusDevice};
use crate::clock::Clock;
use crate::irq::IrqLine;
use crate::migration::DeviceState;
use crate::system::SystemControl;
use serde::{Deserialize, Serialize};

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
    pub fn new(
        clock: Arc<dyn Clock>,
        sci: Arc<dyn IrqLine>,
        system: Arc<dyn SystemControl>,
    ) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(PmRegs {
            sts: 0,
            en: 0,
            cnt: 0,
            gpe_sts: 0,
            gpe_en: 0,
            apm_sts: 0,
            clock,
            sci,
            system,
        }))
    }

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

    /// A read of the PM1 block (PM1_STS, PM1_EN, PM1_CNT, PM_TMR) at
    /// `offset` from PMBASE.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let v: u64 = match offset {
            PM1_STS => self.sts as u64,
            PM1_EN => self.en as u64,
            PM1_CNT => self.cnt as u64,
            PM_TMR => self.timer() as u64,
            _ => 0,
        };
        put_le(data, v);
    }

    /// A write to the PM1 block.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
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

/// The PM1 and GPE0 registers and APMS. The PM timer is the clock's.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PmState {
    pub sts: u16,
    pub en: u16,
    pub cnt: u16,
    pub gpe_sts: u16,
    pub gpe_en: u16,
    pub apm_sts: u8,
}

impl DeviceState for PmRegs {
    const VERSION: u32 = 1;
    type State = PmState;
    fn save_state(&self) -> PmState {
        PmState {
            sts: self.sts,
            en: self.en,
            cnt: self.cnt,
            gpe_sts: self.gpe_sts,
            gpe_en: self.gpe_en,
            apm_sts: self.apm_sts,
        }
    }
    fn load_state(&mut self, s: PmState, _version: u32) -> Result<(), String> {
        if s.cnt & SLP_EN != 0 {
            return Err("PM1_CNT: SLP_EN never stays set".into());
        }
        self.sts = s.sts;
        self.en = s.en;
        self.cnt = s.cnt;
        self.gpe_sts = s.gpe_sts;
        self.gpe_en = s.gpe_en;
        self.apm_sts = s.apm_sts;
        Ok(())
    }
    /// The SCI level follows the status, enable and SCI_EN bits.
    fn post_load(&mut self) {
        self.update_sci();
    }
}

/// A GPE0 block: GPE0_STS (write one to clear), then GPE0_EN, each
/// `half` bytes (the block length in the FADT is `2 * half`). Events above
/// bit 15 do not exist here; their bytes read as zero.
pub struct Gpe0 {
    regs: Arc<Mutex<PmRegs>>,
    half: usize,
}

impl Gpe0 {
    pub fn new(regs: Arc<Mutex<PmRegs>>, half: usize) -> Self {
        Gpe0 { regs, half }
    }

    /// Reads `data` at `offset` into the block.
    pub fn read_at(regs: &PmRegs, half: usize, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let o = offset as usize + i;
            let (v, byte) = if o < half {
                (regs.gpe_sts, o)
            } else {
                (regs.gpe_en, o - half)
            };
            *d = v.to_le_bytes().get(byte).copied().unwrap_or(0);
        }
    }

    /// Writes `data` at `offset` into the block.
    pub fn write_at(regs: &mut PmRegs, half: usize, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let o = offset as usize + i;
            match (o < half, o % half) {
                (true, 0) => regs.gpe_sts &= !(b as u16),
                (true, 1) => regs.gpe_sts &= !((b as u16) << 8),
                (false, 0) => regs.gpe_en = (regs.gpe_en & 0xff00) | b as u16,
                (false, 1) => regs.gpe_en = (regs.gpe_en & 0x00ff) | (b as u16) << 8,
                _ => {}
            }
        }
        regs.update_sci();
    }
}

impl BusDevice for Gpe0 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        Self::read_at(&lock(&self.regs), self.half, offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        Self::write_at(&mut lock(&self.regs), self.half, offset, data)
    }
}

/// APM ports: 0xb2 (APMC) and 0xb3 (APMS).
pub struct Apm {
    regs: Arc<Mutex<PmRegs>>,
}

impl Apm {
    pub fn new(regs: Arc<Mutex<PmRegs>>) -> Self {
        Apm { regs }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::system::NoSystem;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Default)]
    struct Line(AtomicBool);
    impl IrqLine for Line {
        fn set_level(&self, l: bool) {
            self.0.store(l, Ordering::SeqCst);
        }
    }

    #[test]
    fn pm_registers_migrate_and_the_sci_follows() {
        let mk =
            |sci: Arc<Line>| PmRegs::new(Arc::new(ManualClock::default()), sci, Arc::new(NoSystem));
        let a = mk(Arc::new(Line::default()));
        {
            let mut apm = Apm::new(a.clone());
            apm.write(0, &[APM_ACPI_ENABLE]);
            apm.write(1, &[0x42]);
            let mut g = lock(&a);
            g.write(PM1_EN, &PWRBTN_STS.to_le_bytes());
            g.power_button();
            let mut gpe = Gpe0::new(a.clone(), 4);
            drop(g);
            gpe.write(4, &[0x02]);
        }
        let sci = Arc::new(Line::default());
        let b = mk(sci.clone());
        crate::migration::round_trip(&*lock(&a), &mut lock(&b));
        assert!(sci.0.load(Ordering::SeqCst), "the power button's SCI");
        let mut d = [0u8; 2];
        Apm::new(b.clone()).read(1, &mut d[..1]);
        assert_eq!(d[0], 0x42);
        lock(&b).read(PM1_STS, &mut d);
        assert_eq!(u16::from_le_bytes(d), PWRBTN_STS);
        let e =
            crate::migration::load_edited(&*lock(&a), &mut lock(&b), |v| v["cnt"] = 0x2001.into());
        assert!(e.contains("SLP_EN"), "{e}");
    }
}
