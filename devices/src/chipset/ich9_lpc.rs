//! Intel ICH9 LPC interface bridge, the `q35` PCI-to-ISA bridge at
//! 00:1f.0 (8086:2918), with the ACPI power management block it decodes.
//! Follows the ICH9 datasheet, sections 13.1 (LPC configuration: PMBASE
//! 13.1.10, ACPI_CNTL 13.1.11, PIRQ[A-H]_ROUT 13.1.17/13.1.20, RCBA
//! 13.1.35) and 13.8.3 (ACPI and legacy I/O at PMBASE: PM1 at 0x00-0x0b,
//! GPE0_STS/GPE0_EN at 0x20/0x28, SMI_EN at 0x30, SMI_STS at 0x34).
//!
//! The PIRQ route registers drive a [`PirqRouter`] of eight links with the
//! ICH9 swizzle, which also wires PIRQA-H to I/O APIC inputs 16-23.
//! SMI_EN.APMC_EN (bit 5) is preset: SeaBIOS reads it as "SMM already
//! initialised" and skips its SMM setup, as with the PIIX4's DEVACTB; there
//! is no SMM here. The chipset configuration registers behind RCBA keep
//! their reset values (the interrupt routing they hold is the swizzle), so
//! RCBA is plain storage.

use std::sync::{Arc, Mutex};

use super::acpi_pm::{Gpe0, PmRegs};
use super::pirq::{PirqRouter, PIRQ_DISABLED};
use crate::bus::{le_value, lock, put_le};
use crate::migration::DeviceState;
use crate::pci::{PciConfig, PciFunction};
use serde::{Deserialize, Serialize};

pub const PMBASE: u16 = 0x40;
pub const ACPI_CNTL: u16 = 0x44;
/// ACPI_CNTL bit 7: the PM block at PMBASE decodes.
pub const ACPI_EN: u8 = 1 << 7;
pub const PIRQA_ROUT: u16 = 0x60;
pub const PIRQE_ROUT: u16 = 0x68;
pub const RCBA: u16 = 0xf0;

/// The PM I/O block's length (PMBASE is 128-byte aligned).
pub const PM_IO_LEN: u64 = 0x80;
/// The region id of the PM I/O block in [`PciFunction::extra_io`].
pub const PM_REGION: usize = 6;
/// GPE0_STS within the PM block; GPE0_EN follows [`GPE0_HALF`] bytes on.
pub const GPE0_OFFSET: u64 = 0x20;
pub const GPE0_HALF: usize = 8;
pub const SMI_EN: u64 = 0x30;
pub const SMI_STS: u64 = 0x34;
/// SMI_EN bit 5, APMC_EN.
pub const SMI_EN_APMC_EN: u32 = 1 << 5;

pub struct Ich9Lpc {
    config: PciConfig,
    pm: Arc<Mutex<PmRegs>>,
    router: Arc<PirqRouter>,
    smi_en: u32,
}

impl Ich9Lpc {
    pub fn new(pm: Arc<Mutex<PmRegs>>, router: Arc<PirqRouter>) -> Self {
        let mut config = PciConfig::new(0x8086, 0x2918, 0x060100, 0x02);
        config.set_multifunction();
        config.set_wmask(PMBASE, &[0x80, 0xff, 0, 0]);
        config.set_u32(PMBASE, 1);
        config.set_wmask(ACPI_CNTL, &[0x87]);
        config.set_writable(0x48, 8); // GPIOBASE, GC
        config.set_writable(PIRQA_ROUT, 4);
        config.set_writable(0x64, 1); // SIRQ_CNTL
        config.set_u8(0x64, 0x10);
        config.set_writable(PIRQE_ROUT, 4);
        for i in 0..4 {
            config.set_u8(PIRQA_ROUT + i, PIRQ_DISABLED);
            config.set_u8(PIRQE_ROUT + i, PIRQ_DISABLED);
        }
        config.set_writable(0x80, 0x18); // LPC decode ranges
        config.set_writable(0xa0, 0x10); // GEN_PMCON_1-3 and friends
        config.set_writable(0xd0, 0x10); // FWH_SEL, FWH_DEC_EN, BIOS_CNTL
        config.set_wmask(RCBA, &[0x01, 0xc0, 0xff, 0xff]);
        let lpc = Ich9Lpc {
            config,
            pm,
            router,
            smi_en: SMI_EN_APMC_EN,
        };
        lpc.router.set_routes(&lpc.routes());
        lpc
    }

    fn routes(&self) -> [u8; 8] {
        let c = &self.config;
        [0, 1, 2, 3, 4, 5, 6, 7].map(|i| {
            c.u8(if i < 4 {
                PIRQA_ROUT + i
            } else {
                PIRQE_ROUT + i - 4
            })
        })
    }

    /// Where the PM block decodes, if it does.
    pub fn pm_base(&self) -> Option<u16> {
        let base = (self.config.u32(PMBASE) & 0xff80) as u16;
        (self.config.u8(ACPI_CNTL) & ACPI_EN != 0 && base != 0).then_some(base)
    }
}

/// The LPC bridge's config space (PMBASE, ACPI_CNTL, the PIRQ routes,
/// RCBA, ...) and SMI_EN. The PM registers are their own section
/// ([`PmRegs`]).
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Ich9LpcState {
    pub config: Vec<u8>,
    pub smi_en: u32,
}

impl DeviceState for Ich9Lpc {
    const VERSION: u32 = 1;
    type State = Ich9LpcState;
    fn save_state(&self) -> Ich9LpcState {
        Ich9LpcState {
            config: self.config.save_bytes(),
            smi_en: self.smi_en,
        }
    }
    fn load_state(&mut self, s: Ich9LpcState, _version: u32) -> Result<(), String> {
        self.config
            .load_bytes(&s.config)
            .map_err(|e| format!("ICH9 LPC: {e}"))?;
        self.smi_en = s.smi_en;
        Ok(())
    }
    /// The router takes the PIRQ routes (every source re-drives its own
    /// level in its post-load). The PM block's decode at PMBASE follows
    /// config space when the bus rebuilds its decode table.
    fn post_load(&mut self) {
        self.router.set_routes(&self.routes());
    }
}

fn overlaps(offset: u16, len: usize, reg: u16, reg_len: usize) -> bool {
    (offset as usize) < reg as usize + reg_len && offset as usize + len > reg as usize
}

impl PciFunction for Ich9Lpc {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        if overlaps(offset, data.len(), PIRQA_ROUT, 4)
            || overlaps(offset, data.len(), PIRQE_ROUT, 4)
        {
            self.router.set_routes(&self.routes());
        }
    }

    fn region_read(&mut self, _region: usize, offset: u64, data: &mut [u8]) {
        let pm = lock(&self.pm);
        match offset {
            0..=0x0f => pm.read(offset, data),
            GPE0_OFFSET..=0x2f => Gpe0::read_at(&pm, GPE0_HALF, offset - GPE0_OFFSET, data),
            SMI_EN..=0x33 => put_le(data, (self.smi_en >> (8 * (offset - SMI_EN))) as u64),
            _ => data.fill(0),
        }
    }

    fn region_write(&mut self, _region: usize, offset: u64, data: &[u8]) {
        let mut pm = lock(&self.pm);
        match offset {
            0..=0x0f => pm.write(offset, data),
            GPE0_OFFSET..=0x2f => Gpe0::write_at(&mut pm, GPE0_HALF, offset - GPE0_OFFSET, data),
            SMI_EN if data.len() == 4 => self.smi_en = le_value(data) as u32,
            _ => {}
        }
    }

    fn extra_io(&self) -> Vec<(u64, u64, usize)> {
        match self.pm_base() {
            Some(base) => vec![(base as u64, PM_IO_LEN, PM_REGION)],
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Fallback;
    use crate::chipset::pirq::ich9_swizzle;
    use crate::irq::{IrqChip, IrqLine, NoIrq};
    use crate::pci::{PciBus, PciRegions, Space};

    /// The last level driven on each GSI.
    #[derive(Default)]
    struct Levels(Mutex<std::collections::BTreeMap<u32, bool>>);
    impl Levels {
        fn level(&self, gsi: u32) -> bool {
            self.0.lock().unwrap().get(&gsi).copied().unwrap_or(false)
        }
    }
    struct LevelLine(Arc<Levels>, u32);
    impl IrqLine for LevelLine {
        fn set_level(&self, l: bool) {
            self.0 .0.lock().unwrap().insert(self.1, l);
        }
    }
    struct LevelChip(Arc<Levels>);
    impl IrqChip for LevelChip {
        fn line(&self, gsi: u32) -> Arc<dyn IrqLine> {
            Arc::new(LevelLine(self.0.clone(), gsi))
        }
    }

    struct Quiet;
    impl IrqChip for Quiet {
        fn line(&self, _: u32) -> Arc<dyn IrqLine> {
            Arc::new(NoIrq)
        }
    }
    struct Clock0;
    impl crate::clock::Clock for Clock0 {
        fn now_ns(&self) -> u64 {
            0
        }
    }
    struct NoSystem;
    impl crate::system::SystemControl for NoSystem {
        fn request_reset(&self) {}
        fn request_shutdown(&self) {}
    }

    #[test]
    fn lpc_migrates_routes_pmbase_and_smi_en() {
        let chip = Arc::new(Levels::default());
        let mk = |chip: Arc<Levels>| {
            let pm = PmRegs::new(Arc::new(Clock0), Arc::new(NoIrq), Arc::new(NoSystem));
            let router = PirqRouter::new(Arc::new(LevelChip(chip)), 8, ich9_swizzle, Some(16));
            (Ich9Lpc::new(pm, router.clone()), router)
        };
        let (mut a, _) = mk(Arc::new(Levels::default()));
        a.config_write(PMBASE, &0x601u32.to_le_bytes());
        a.config_write(ACPI_CNTL, &[ACPI_EN]);
        a.config_write(PIRQA_ROUT, &[10, 11, 0x80, 0x80]);
        a.region_write(PM_REGION, SMI_EN, &0x7u32.to_le_bytes());
        let (mut b, router) = mk(chip.clone());
        // The AHCI's INTA (PIRQA) is up before the load, as its own
        // post-load would leave it.
        router.line(31, 1).set_level(true);
        crate::migration::round_trip(&a, &mut b);
        assert_eq!(b.pm_base(), Some(0x600));
        assert_eq!(b.extra_io(), vec![(0x600, PM_IO_LEN, PM_REGION)]);
        let mut d = [0u8; 4];
        b.region_read(PM_REGION, SMI_EN, &mut d);
        assert_eq!(u32::from_le_bytes(d), 7);
        assert!(chip.level(10), "PIRQA routed to IRQ 10 again");
        let e = crate::migration::load_edited(&a, &mut b, |v| {
            v["config"].as_array_mut().unwrap().truncate(255)
        });
        assert!(e.contains("Bad config data"), "{e}");
    }

    /// What SeaBIOS's q35 setup writes, then reads back through the PM
    /// block: PMBASE 0x600 with ACPI_EN, SMI_EN with APMC_EN preset.
    #[test]
    fn pm_block_follows_pmbase_and_acpi_en() {
        let pm = PmRegs::new(Arc::new(Clock0), Arc::new(NoIrq), Arc::new(NoSystem));
        let router = PirqRouter::new(Arc::new(Quiet), 8, ich9_swizzle, Some(16));
        let bus = PciBus::new();
        bus.add(31, 0, Arc::new(Mutex::new(Ich9Lpc::new(pm, router))))
            .unwrap();
        let devfn = 31 << 3;
        let io = PciRegions {
            bus: bus.clone(),
            space: Space::Io,
            ecam: None,
        };
        let mut d = [0u8; 4];
        bus.config_write(devfn, PMBASE, &0x601u32.to_le_bytes());
        assert!(
            !io.read(0x600 + SMI_EN, &mut d),
            "no decode without ACPI_EN"
        );
        bus.config_write(devfn, ACPI_CNTL, &[ACPI_EN]);
        bus.config_read(devfn, PMBASE, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x601);
        assert!(io.read(0x600 + SMI_EN, &mut d));
        assert_eq!(u32::from_le_bytes(d) & SMI_EN_APMC_EN, SMI_EN_APMC_EN);
        // PM1_CNT.SCI_EN and GPE0_EN through the block.
        assert!(io.write(0x604, &1u16.to_le_bytes()));
        let mut w = [0u8; 2];
        assert!(io.read(0x604, &mut w));
        assert_eq!(u16::from_le_bytes(w), 1);
        assert!(io.write(0x600 + 0x28, &[0x02]));
        assert!(io.read(0x600 + 0x28, &mut w));
        assert_eq!(w, [0x02, 0]);
        // Moving PMBASE moves the block.
        bus.config_write(devfn, PMBASE, &0xb001u32.to_le_bytes());
        assert!(!io.read(0x604, &mut w));
        assert!(io.read(0xb004, &mut w));
    }
}
