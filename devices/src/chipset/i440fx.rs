//! Intel 82441FX PCI and memory controller (PMC), the `pc` host bridge at
//! 00:00.0 (8086:1237). Follows the 440FX PCIset datasheet, section 3.2
//! (configuration registers).
//!
//! The PAM registers (0x59-0x5f) steer 0xc0000-0xfffff between ROM and RAM.
//! Strata backs that whole area with RAM preloaded with the BIOS image, so
//! PAM and SMRAM writes are plain register stores: SeaBIOS only needs the
//! area to be writable while it relocates itself, which RAM always is.

use crate::pci::{PciConfig, PciFunction};

pub const PAM0: u16 = 0x59;
pub const SMRAM: u16 = 0x72;

pub struct I440fx {
    config: PciConfig,
}

impl I440fx {
    pub fn new() -> Self {
        let mut config = PciConfig::new(0x8086, 0x1237, 0x060000, 0x02);
        config.set_writable(0x50, 2); // PMCCFG
        config.set_writable(PAM0, 7);
        config.set_writable(SMRAM, 1);
        config.set_u8(SMRAM, 0x02);
        I440fx { config }
    }
}

impl Default for I440fx {
    fn default() -> Self {
        Self::new()
    }
}

impl PciFunction for I440fx {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
}
