//! PCI INTx routing through PIRQ links, as PC south bridges do it: each
//! slot's INTA-INTD pins drive one of the PIRQ lines (PIIX3: PIRQA-D; ICH9:
//! PIRQA-H), and each PIRQ reaches the ISA IRQ its route register names
//! (PIIX3 datasheet 2.2.9, ICH9 datasheet 13.1.17-13.1.20: bit 7 set means
//! "not routed"; IRQ 0-2, 8 and 13 are reserved). On ICH9 the PIRQs also
//! reach I/O APIC inputs 16-23 directly, whatever the route registers say
//! (ICH9 datasheet 5.9.2.2). Levels of every source sharing a line are
//! ORed, as the wired-OR lines are.
//!
//! Which PIRQ a slot's pin drives is the board's choice, described to the
//! guest by its `_PRT` and MP table: [`Swizzle`].

use std::sync::{Arc, Mutex};

use crate::bus::lock;
use crate::irq::{IrqChip, IrqLine};

/// Bit 7 of a PIRQ route register: the PIRQ is not routed to any ISA IRQ.
pub const PIRQ_DISABLED: u8 = 0x80;

/// Which PIRQ (0 = PIRQA) `slot`'s `pin` (1 = INTA .. 4 = INTD) drives.
pub type Swizzle = fn(slot: u8, pin: u8) -> usize;

/// `pc`: the links rotate by slot starting from slot 1, the mapping
/// SeaBIOS's PIR table, Strata's MP table and `_PRT` (and QEMU's `pc`) all
/// describe: slot 1 INTA is PIRQA, slot 2 INTA PIRQB.
pub fn piix_swizzle(slot: u8, pin: u8) -> usize {
    (slot as usize + 3 + pin.max(1) as usize - 1) % 4
}

/// `q35`: the ICH9 functions (slots 25-31, D25IR-D31IR at their reset
/// value 0x3210) wire INTA-D to PIRQA-D; every other slot rotates over
/// PIRQE-H, QEMU's default chipset configuration, which leaves PIRQA-D to
/// the chipset's own functions.
pub fn ich9_swizzle(slot: u8, pin: u8) -> usize {
    let intx = pin.max(1) as usize - 1;
    if slot >= 25 {
        intx & 3
    } else {
        (slot as usize + intx) % 4 + 4
    }
}

/// Routes PCI INTx lines to interrupt controller inputs.
pub struct PirqRouter {
    chip: Arc<dyn IrqChip>,
    swizzle: Swizzle,
    /// The GSI of PIRQA's direct I/O APIC input, on a chipset that has them.
    apic_base: Option<u32>,
    state: Mutex<RouterState>,
}

struct RouterState {
    routes: Vec<u8>,
    /// Asserted level of each source, by source id, with its PIRQ.
    sources: Vec<(usize, bool)>,
    /// What was last driven onto each ISA IRQ.
    driven_isa: [bool; 16],
    /// What was last driven onto each PIRQ's direct I/O APIC input.
    driven_apic: Vec<bool>,
}

impl RouterState {
    fn isa_irq(&self, pirq: usize) -> Option<usize> {
        let v = *self.routes.get(pirq)?;
        (v & PIRQ_DISABLED == 0 && (v & 0xf) >= 3).then_some((v & 0xf) as usize)
    }

    /// ISA IRQ and PIRQ levels as the sources and routes imply.
    fn levels(&self) -> ([bool; 16], Vec<bool>) {
        let mut isa = [false; 16];
        let mut pirq = vec![false; self.routes.len()];
        for &(p, up) in &self.sources {
            if up {
                pirq[p] = true;
                if let Some(irq) = self.isa_irq(p) {
                    isa[irq] = true;
                }
            }
        }
        (isa, pirq)
    }
}

impl PirqRouter {
    /// A router of `pirqs` links, all unrouted.
    pub fn new(
        chip: Arc<dyn IrqChip>,
        pirqs: usize,
        swizzle: Swizzle,
        apic_base: Option<u32>,
    ) -> Arc<Self> {
        let state = RouterState {
            routes: vec![PIRQ_DISABLED; pirqs],
            sources: Vec::new(),
            driven_isa: [false; 16],
            driven_apic: vec![false; pirqs],
        };
        Arc::new(PirqRouter {
            chip,
            swizzle,
            apic_base,
            state: Mutex::new(state),
        })
    }

    /// The PIRQ `slot`'s `pin` drives.
    pub fn pirq_for(&self, slot: u8, pin: u8) -> usize {
        (self.swizzle)(slot, pin) % lock(&self.state).routes.len()
    }

    /// A new interrupt source for `slot`/`pin`.
    pub fn line(self: &Arc<Self>, slot: u8, pin: u8) -> Arc<dyn IrqLine> {
        let pirq = self.pirq_for(slot, pin);
        let mut s = lock(&self.state);
        s.sources.push((pirq, false));
        Arc::new(IntxLine {
            router: self.clone(),
            source: s.sources.len() - 1,
        })
    }

    /// New values of the route registers, PIRQA first.
    pub fn set_routes(&self, routes: &[u8]) {
        let mut s = lock(&self.state);
        let n = s.routes.len().min(routes.len());
        s.routes[..n].copy_from_slice(&routes[..n]);
        self.update(&mut s);
    }

    fn update(&self, s: &mut RouterState) {
        let (isa, pirq) = s.levels();
        for (irq, &level) in isa.iter().enumerate() {
            if level != s.driven_isa[irq] {
                s.driven_isa[irq] = level;
                self.chip.line(irq as u32).set_level(level);
            }
        }
        if let Some(base) = self.apic_base {
            for (p, &level) in pirq.iter().enumerate() {
                if level != s.driven_apic[p] {
                    s.driven_apic[p] = level;
                    self.chip.line(base + p as u32).set_level(level);
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    pub(crate) struct Chip(pub Mutex<Vec<(u32, bool)>>);
    struct Line(Arc<Chip>, u32);
    impl IrqLine for Line {
        fn set_level(&self, l: bool) {
            self.0 .0.lock().unwrap().push((self.1, l));
        }
    }
    pub(crate) struct Handle(pub Arc<Chip>);
    impl IrqChip for Handle {
        fn line(&self, gsi: u32) -> Arc<dyn IrqLine> {
            Arc::new(Line(self.0.clone(), gsi))
        }
    }

    #[test]
    fn intx_follows_pirq_routes_and_shares() {
        let chip = Arc::new(Chip::default());
        let r = PirqRouter::new(Arc::new(Handle(chip.clone())), 4, piix_swizzle, None);
        // Slot 1 INTA -> PIRQA, slot 2 INTA -> PIRQB, slot 5 INTA -> PIRQA,
        // slot 4 INTB -> PIRQA.
        assert_eq!(r.pirq_for(4, 2), 0);
        assert_eq!(r.pirq_for(3, 1), 2);
        let a = r.line(1, 1);
        let b = r.line(2, 1);
        let c = r.line(5, 1);
        a.set_level(true);
        assert!(chip.0.lock().unwrap().is_empty(), "PIRQA not routed");
        r.set_routes(&[11, 10, 0x80, 0x80]);
        assert_eq!(*chip.0.lock().unwrap(), vec![(11, true)]);
        c.set_level(true);
        a.set_level(false);
        assert_eq!(chip.0.lock().unwrap().len(), 1, "c still holds IRQ 11");
        c.set_level(false);
        b.set_level(true);
        assert_eq!(chip.0.lock().unwrap()[1..], [(11, false), (10, true)][..]);
        // Rerouting PIRQB moves the asserted level.
        r.set_routes(&[11, 5]);
        assert_eq!(chip.0.lock().unwrap()[3..], [(5, true), (10, false)][..]);
    }

    #[test]
    fn ich9_pirqs_also_reach_gsi_16_to_23() {
        let chip = Arc::new(Chip::default());
        let r = PirqRouter::new(Arc::new(Handle(chip.clone())), 8, ich9_swizzle, Some(16));
        // 00:1f.2 INTA -> PIRQA; 00:03.0 INTA -> PIRQH; 00:04.0 INTB -> PIRQE.
        assert_eq!(r.pirq_for(31, 1), 0);
        assert_eq!(r.pirq_for(3, 1), 7);
        assert_eq!(r.pirq_for(4, 2), 5);
        let ahci = r.line(31, 1);
        let disk = r.line(3, 1);
        ahci.set_level(true);
        disk.set_level(true);
        assert_eq!(*chip.0.lock().unwrap(), vec![(16, true), (23, true)]);
        r.set_routes(&[10, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 11]);
        ahci.set_level(false);
        assert_eq!(
            chip.0.lock().unwrap()[2..],
            [(10, true), (11, true), (10, false), (16, false)][..]
        );
    }
}
