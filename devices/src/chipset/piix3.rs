//! Intel 82371SB PIIX3 PCI-to-ISA bridge, function 00:01.0 (8086:7000), and
//! its Edge/Level Control Registers. Follows the PIIX3 datasheet, sections
//! 2.2 (PCI configuration: PIRQ route control at 0x60-0x63) and the ELCR at
//! ports 0x4d0/0x4d1.
//!
//! [`PirqRouter`] routes PCI INTx lines: slot S pin P (1 = INTA) drives
//! PIRQ[(S + P - 1) % 4] (the swizzle of QEMU's `pc` and SeaBIOS's tables),
//! and each PIRQ reaches the ISA IRQ its route register names. Levels of
//! every source sharing an ISA IRQ are ORed, as the wired-OR lines are.
//!
//! Under KVM the in-kernel PIC answers the ELCR ports itself and Strata's
//! [`Elcr`] never sees them; it exists for the qtest accelerator, where no
//! in-kernel irqchip runs.

use std::sync::{Arc, Mutex};

use crate::bus::{lock, BusDevice};
use crate::irq::{IrqChip, IrqLine};
use crate::pci::{PciConfig, PciFunction};

pub const PIRQ_ROUTE: u16 = 0x60;
/// Bit 7 of a PIRQ route register: the PIRQ is not routed to any ISA IRQ.
pub const PIRQ_DISABLED: u8 = 0x80;

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
        router.set_routes(p.routes());
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
                r.set_routes(self.routes());
            }
        }
    }
}

/// Routes PCI INTx lines to ISA IRQs through the PIRQ route registers.
pub struct PirqRouter {
    chip: Arc<dyn IrqChip>,
    state: Mutex<RouterState>,
}

#[derive(Default)]
struct RouterState {
    routes: [u8; 4],
    /// Asserted level of each source, by source id, with its PIRQ.
    sources: Vec<(usize, bool)>,
    /// What was last driven onto each ISA IRQ.
    driven: [bool; 16],
}

impl RouterState {
    fn isa_irq(&self, pirq: usize) -> Option<usize> {
        let v = self.routes[pirq & 3];
        (v & PIRQ_DISABLED == 0 && (v & 0xf) >= 3).then_some((v & 0xf) as usize)
    }

    /// ISA IRQ levels as the sources and routes imply.
    fn levels(&self) -> [bool; 16] {
        let mut l = [false; 16];
        for &(pirq, up) in &self.sources {
            if let (true, Some(irq)) = (up, self.isa_irq(pirq)) {
                l[irq] = true;
            }
        }
        l
    }
}

impl PirqRouter {
    pub fn new(chip: Arc<dyn IrqChip>) -> Arc<Self> {
        let state = RouterState {
            routes: [PIRQ_DISABLED; 4],
            ..Default::default()
        };
        Arc::new(PirqRouter {
            chip,
            state: Mutex::new(state),
        })
    }

    /// The PIRQ (0 = PIRQA) that `slot`'s `pin` (1 = INTA .. 4 = INTD)
    /// drives: the board rotates the links by slot starting from slot 1,
    /// the mapping SeaBIOS's PIR table, Strata's MP table and `_PRT` (and
    /// QEMU's `pc`) all describe: slot 1 INTA is PIRQA, slot 2 INTA PIRQB.
    pub fn pirq_for(slot: u8, pin: u8) -> usize {
        (slot as usize + 3 + pin.max(1) as usize - 1) % 4
    }

    /// A new interrupt source for `slot`/`pin`.
    pub fn line(self: &Arc<Self>, slot: u8, pin: u8) -> Arc<dyn IrqLine> {
        let mut s = lock(&self.state);
        s.sources.push((Self::pirq_for(slot, pin), false));
        Arc::new(IntxLine {
            router: self.clone(),
            source: s.sources.len() - 1,
        })
    }

    fn set_routes(&self, routes: [u8; 4]) {
        let mut s = lock(&self.state);
        s.routes = routes;
        self.update(&mut s);
    }

    fn update(&self, s: &mut RouterState) {
        let levels = s.levels();
        for (irq, &level) in levels.iter().enumerate() {
            if level != s.driven[irq] {
                s.driven[irq] = level;
                self.chip.line(irq as u32).set_level(level);
            }
        }
    }
}

struct IntxLine {
    router: Arc<PirqRouter>,
    source: usize,
}

impl IrqLine for IntxLine {
    fn set_level(&self, level: bool) {
        let mut s = lock(&self.router.state);
        if s.sources[self.source].1 != level {
            s.sources[self.source].1 = level;
            self.router.update(&mut s);
        }
    }
}

/// ELCR1/ELCR2 at 0x4d0/0x4d1. IRQ 0, 1, 2, 8 and 13 are always edge.
#[derive(Default)]
pub struct Elcr {
    regs: [u8; 2],
}

const ELCR_MASK: [u8; 2] = [0xf8, 0xde];

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

    #[derive(Default)]
    struct Chip(Mutex<Vec<(u32, bool)>>);
    struct Line(Arc<Chip>, u32);
    impl IrqLine for Line {
        fn set_level(&self, l: bool) {
            self.0 .0.lock().unwrap().push((self.1, l));
        }
    }
    struct Handle(Arc<Chip>);
    impl IrqChip for Handle {
        fn line(&self, gsi: u32) -> Arc<dyn IrqLine> {
            Arc::new(Line(self.0.clone(), gsi))
        }
    }

    #[test]
    fn intx_follows_pirq_routes_and_shares() {
        let chip = Arc::new(Chip::default());
        let r = PirqRouter::new(Arc::new(Handle(chip.clone())));
        let mut p = Piix3::with_router(r.clone());
        // Slot 1 INTA -> PIRQA, slot 2 INTA -> PIRQB, slot 5 INTA -> PIRQA,
        // slot 4 INTB -> PIRQA.
        assert_eq!(PirqRouter::pirq_for(4, 2), 0);
        assert_eq!(PirqRouter::pirq_for(3, 1), 2);
        let a = r.line(1, 1);
        let b = r.line(2, 1);
        let c = r.line(5, 1);
        a.set_level(true);
        assert!(chip.0.lock().unwrap().is_empty(), "PIRQA not routed");
        p.config_write(0x60, &[11, 10, 0x80, 0x80]);
        assert_eq!(*chip.0.lock().unwrap(), vec![(11, true)]);
        c.set_level(true);
        a.set_level(false);
        assert_eq!(chip.0.lock().unwrap().len(), 1, "c still holds IRQ 11");
        c.set_level(false);
        b.set_level(true);
        assert_eq!(chip.0.lock().unwrap()[1..], [(11, false), (10, true)][..]);
        // Rerouting PIRQB moves the asserted level.
        p.config_write(0x61, &[5]);
        assert_eq!(chip.0.lock().unwrap()[3..], [(5, true), (10, false)][..]);
    }
}
