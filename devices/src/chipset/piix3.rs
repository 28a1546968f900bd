//! Intel 82371SB PIIX3 PCI-to-ISA bridge, function 00:01.0 (8086:7000), and
//! its Edge/Level Control Registers. Follows the PIIX3 datasheet, sections
//! 2.2 (PCI configuration: PIRQ route control at 0x60-0x63) and the ELCR at
//! ports 0x4d0/0x4d1.
//!
//! The route registers drive a [`PirqRouter`] (`chipset::pirq`) of four
//! links with the `pc` swizzle.
//!
//! Under KVM the in-kernel PIC answers the ELCR ports itself and Strata's
//! [`Elcr`] never sees them; it exists for the qtest accelerator, where no
//! in-kernel irqchip runs.

use std::sync::Arc;

use super::pirq::{PirqRouter, PIRQ_DISABLED};
use crate::bus::BusDevice;
use crate::migration::DeviceState;
use crate::pci::{PciConfig, PciFunction};

pub const PIRQ_ROUTE: u16 = 0x60;

pub struct Piix3 {
    config: PciConfig,
    router: Option<Arc<PirqRouter>>,
}

impl Piix3 {
    pub fn new() -> Self {
        let mut config = PciConfig::new(0x8086, 0x7000, 0x060100, 0x00);
        config.set_multifunction();
        // Device-specific registers: ISA clock, PIRQ routes, SERIRQ, TOM,
        // MBDMA, APIC base, ... all plain read/write storage here.
        config.set_writable(0x40, 0xc0);
        for i in 0..4 {
            config.set_u8(PIRQ_ROUTE + i, PIRQ_DISABLED);
        }
        config.set_u8(0x69, 0x02); // TOM
        config.set_u8(0x70, PIRQ_DISABLED); // MBIRQ0
        config.set_u8(0x71, PIRQ_DISABLED); // MBIRQ1
        Piix3 {
            config,
            router: None,
        }
    }

    /// A PIIX3 whose PIRQ route registers drive `router`.
    pub fn with_router(router: Arc<PirqRouter>) -> Self {
        let mut p = Self::new();
        router.set_routes(&p.routes());
        p.router = Some(router);
        p
    }

    fn routes(&self) -> [u8; 4] {
        [0, 1, 2, 3].map(|i| self.config.u8(PIRQ_ROUTE + i))
    }

    /// The ISA IRQ PIRQ `n` (0 = PIRQA) is routed to, if any.
    pub fn pirq_route(&self, n: usize) -> Option<u8> {
        let v = self.config.u8(PIRQ_ROUTE + (n as u16 & 3));
        (v & PIRQ_DISABLED == 0 && (v & 0xf) >= 3).then_some(v & 0xf)
    }
}

impl Default for Piix3 {
    fn default() -> Self {
        Self::new()
    }
}

impl PciFunction for Piix3 {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        let end = offset as usize + data.len();
        if let Some(r) = &self.router {
            if (offset as usize) < (PIRQ_ROUTE as usize + 4) && end > PIRQ_ROUTE as usize {
                r.set_routes(&self.routes());
            }
        }
    }
}

/// ELCR1/ELCR2 at 0x4d0/0x4d1. IRQ 0, 1, 2, 8 and 13 are always edge.
#[derive(Default)]
pub struct Elcr {
    regs: [u8; 2],
}

const ELCR_MASK: [u8; 2] = [0xf8, 0xde];

impl DeviceState for Elcr {
    const VERSION: u32 = 1;
    /// ELCR1, ELCR2.
    type State = [u8; 2];
    fn save_state(&self) -> [u8; 2] {
        self.regs
    }
    fn load_state(&mut self, s: [u8; 2], _version: u32) -> Result<(), String> {
        if s[0] & !ELCR_MASK[0] != 0 || s[1] & !ELCR_MASK[1] != 0 {
            return Err(format!(
                "ELCR {s:x?}: IRQ 0, 1, 2, 8 and 13 are always edge"
            ));
        }
        self.regs = s;
        Ok(())
    }
}

impl BusDevice for Elcr {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.regs.get(offset as usize + i).copied().unwrap_or(0xff);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let o = offset as usize + i;
            if o < 2 {
                self.regs[o] = v & ELCR_MASK[o];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elcr_migrates() {
        let mut a = Elcr::default();
        a.write(0, &[0xff, 0xff]);
        let mut b = Elcr::default();
        crate::migration::round_trip(&a, &mut b);
        let mut d = [0u8; 2];
        b.read(0, &mut d);
        assert_eq!(d, ELCR_MASK);
        let e = crate::migration::load_edited(&a, &mut b, |v| v[0] = 0xff.into());
        assert!(e.contains("edge"), "{e}");
    }
}
