//! The MSI capability (PCI Local Bus 3.0, section 6.8.1): one message,
//! 64-bit address, no per-vector masking, the form ICH9's AHCI has (ICH9
//! datasheet 14.1.23-14.1.27). Its state lives in config space; a device
//! asks [`Msi::message`] whether to signal with a message instead of INTx.

use super::config::PciConfig;

pub const CAP_ID: u8 = 0x05;
/// Message Control bit 0: MSI enable.
pub const CTRL_ENABLE: u16 = 1 << 0;
/// Message Control bit 7: 64-bit address capable.
pub const CTRL_64BIT: u16 = 1 << 7;

#[derive(Clone, Copy, Debug, Default)]
pub struct Msi {
    /// Offset of the capability (0: not added).
    cap: u16,
}

impl Msi {
    /// Adds the capability to `cfg` where its list goes next.
    pub fn add_capability(cfg: &mut PciConfig) -> Msi {
        // Control, address low/high, data (and a reserved word).
        let mut body = [0u8; 12];
        body[0..2].copy_from_slice(&CTRL_64BIT.to_le_bytes());
        let cap = cfg.add_capability(CAP_ID, &body);
        // Enable and Multiple Message Enable (which one message ignores),
        // the dword-aligned address and the data.
        cfg.set_wmask(cap + 2, &[0x71, 0x00]);
        cfg.set_wmask(cap + 4, &[0xfc, 0xff, 0xff, 0xff]);
        cfg.set_writable(cap + 8, 4);
        cfg.set_writable(cap + 12, 2);
        Msi { cap }
    }

    /// The message to send instead of raising INTx, while MSI is enabled.
    pub fn message(&self, cfg: &PciConfig) -> Option<(u64, u32)> {
        if self.cap == 0 || cfg.u16(self.cap + 2) & CTRL_ENABLE == 0 {
            return None;
        }
        let addr = cfg.u32(self.cap + 4) as u64 | (cfg.u32(self.cap + 8) as u64) << 32;
        Some((addr, cfg.u16(self.cap + 12) as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enable_address_and_data_follow_config_writes() {
        let mut cfg = PciConfig::new(0x8086, 0x2922, 0x010601, 2);
        let msi = Msi::add_capability(&mut cfg);
        assert_eq!(cfg.u8(super::super::config::CAPABILITIES_PTR), 0x40);
        assert_eq!(cfg.u16(0x42), CTRL_64BIT, "disabled, one vector");
        assert_eq!(msi.message(&cfg), None);
        cfg.write(0x44, &0xfee0_1003u32.to_le_bytes());
        cfg.write(0x4c, &0x4041u16.to_le_bytes());
        cfg.write(0x42, &[0xff, 0xff]);
        assert_eq!(cfg.u16(0x42), CTRL_64BIT | 0x71);
        assert_eq!(msi.message(&cfg), Some((0xfee0_1000, 0x4041)));
    }
}
