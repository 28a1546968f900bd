//! Intel 82Q35 memory controller hub (MCH), the `q35` host bridge at
//! 00:00.0 (8086:29c0). Follows the Intel 3 Series Express Chipset Family
//! datasheet, section 5.1 (Host Bridge/DRAM Controller, D0:F0): PCIEXBAR
//! (5.1.13) places the PCI Express ECAM window, PAM0-6 (5.1.19-25) and
//! SMRAM/ESMRAMC (5.1.27-28).
//!
//! As on the i440FX (`i440fx.rs`), 0xc0000-0xfffff is RAM preloaded with
//! the BIOS, so PAM and SMRAM writes are plain register stores. There is no
//! SMM: the ICH9 LPC presets SMI_EN.APMC_EN so that SeaBIOS skips its SMM
//! setup.

use std::sync::Arc;

use crate::migration::DeviceState;
use crate::pci::{Ecam, PciConfig, PciFunction};
use serde::{Deserialize, Serialize};

pub const PCIEXBAR: u16 = 0x60;
pub const PAM0: u16 = 0x90;
pub const SMRAM: u16 = 0x9d;
pub const ESMRAMC: u16 = 0x9e;

/// PCIEXBAR bit 0: the ECAM window decodes.
pub const PCIEXBAR_EN: u64 = 1;
/// Where firmware (SeaBIOS, OVMF) and QEMU put the window on `q35`.
pub const ECAM_BASE: u64 = 0xb000_0000;
/// The window's size with PCIEXBAR's LENGTH field at 0: 256 buses.
pub const ECAM_SIZE: u64 = 256 << 20;

pub struct Mch {
    config: PciConfig,
    ecam: Arc<Ecam>,
}

impl Mch {
    /// An MCH whose PCIEXBAR drives `ecam`.
    pub fn new(ecam: Arc<Ecam>) -> Self {
        let mut config = PciConfig::new(0x8086, 0x29c0, 0x060000, 0x00);
        // PCIEXBAR: base bits 35:26, LENGTH (2:1) and enable; the base bits
        // below the chosen size are masked when the window is decoded.
        config.set_wmask(PCIEXBAR, &[0x07, 0x00, 0x00, 0xfc, 0x0f, 0, 0, 0]);
        config.set_writable(PAM0, 7);
        config.set_writable(SMRAM, 1);
        config.set_u8(SMRAM, 0x02);
        config.set_writable(ESMRAMC, 1);
        config.set_u8(ESMRAMC, 0x38);
        ecam.set(None);
        Mch { config, ecam }
    }

    fn pciexbar(&self) -> u64 {
        self.config.u32(PCIEXBAR) as u64 | (self.config.u32(PCIEXBAR + 4) as u64) << 32
    }

    /// The ECAM window PCIEXBAR describes, if enabled: LENGTH 0 is 256
    /// buses, 1 is 128, 2 is 64 (3 is reserved and decodes nothing).
    fn window(&self) -> Option<(u64, u64)> {
        let v = self.pciexbar();
        if v & PCIEXBAR_EN == 0 {
            return None;
        }
        let size = match (v >> 1) & 3 {
            0 => 256u64 << 20,
            1 => 128 << 20,
            2 => 64 << 20,
            _ => return None,
        };
        Some((v & 0xf_ffff_ffff & !(size - 1), size))
    }
}

impl PciFunction for Mch {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        let end = offset as usize + data.len();
        if (offset as usize) < PCIEXBAR as usize + 8 && end > PCIEXBAR as usize {
            self.ecam.set(self.window());
        }
    }
}

/// The MCH's config space (PCIEXBAR, PAM, SMRAM are in it).
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MchState {
    pub config: Vec<u8>,
}

impl DeviceState for Mch {
    const VERSION: u32 = 1;
    type State = MchState;
    fn save_state(&self) -> MchState {
        MchState {
            config: self.config.save_bytes(),
        }
    }
    fn load_state(&mut self, s: MchState, _version: u32) -> Result<(), String> {
        self.config
            .load_bytes(&s.config)
            .map_err(|e| format!("MCH: {e}"))
    }
    /// The ECAM window follows PCIEXBAR.
    fn post_load(&mut self) {
        self.ecam.set(self.window());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Fallback;
    use crate::pci::{PciBus, PciRegions, Space};
    use std::sync::Mutex;

    #[test]
    fn mch_migrates_and_reopens_the_ecam_window() {
        let ea = Ecam::new();
        let mut a = Mch::new(ea.clone());
        let v = 0xe000_0000u32 | 2 << 1 | 1;
        a.config_write(PCIEXBAR, &v.to_le_bytes());
        a.config_write(PAM0 + 1, &[0x33]);
        let eb = Ecam::new();
        let mut b = Mch::new(eb.clone());
        crate::migration::round_trip(&a, &mut b);
        assert_eq!(eb.window(), Some((0xe000_0000, 64 << 20)));
        assert_eq!(b.config().u8(PAM0 + 1), 0x33);
        let e = crate::migration::load_edited(&a, &mut b, |v| v["config"][0] = 0x87.into());
        assert!(e.contains("Bad config data"), "{e}");
    }

    #[test]
    fn pciexbar_moves_the_ecam_window() {
        let bus = PciBus::new();
        let ecam = Ecam::new();
        let mch = Arc::new(Mutex::new(Mch::new(ecam.clone())));
        bus.add(0, 0, mch).unwrap();
        let mmio = PciRegions {
            bus: bus.clone(),
            space: Space::Mem,
            ecam: Some(ecam.clone()),
        };
        let mut d = [0u8; 4];
        assert!(!mmio.read(ECAM_BASE, &mut d), "disabled at reset");
        bus.config_write(
            0,
            PCIEXBAR,
            &((ECAM_BASE | PCIEXBAR_EN) as u32).to_le_bytes(),
        );
        assert_eq!(ecam.window(), Some((ECAM_BASE, ECAM_SIZE)));
        assert!(mmio.read(ECAM_BASE, &mut d));
        assert_eq!(u32::from_le_bytes(d), 0x29c0_8086);
        // Another bus, or an absent function: all ones.
        assert!(mmio.read(ECAM_BASE + (1 << 20), &mut d));
        assert_eq!(d, [0xff; 4]);
        assert!(mmio.read(ECAM_BASE + (3 << 15), &mut d));
        assert_eq!(d, [0xff; 4]);
        // 64 MiB at 0xe0000000; written through ECAM itself.
        let v = 0xe000_0000u32 | 2 << 1 | 1;
        assert!(mmio.write(ECAM_BASE + PCIEXBAR as u64, &v.to_le_bytes()));
        assert_eq!(ecam.window(), Some((0xe000_0000, 64 << 20)));
        assert!(!mmio.read(ECAM_BASE, &mut d));
        bus.config_write(0, PCIEXBAR, &[0]);
        assert_eq!(ecam.window(), None);
    }
}
