//! ACPI PCI hotplug for the `pc` machine's bus 0: the register block QEMU's
//! PIIX4 PM function exposes at 0xae00 (QEMU docs/specs/acpi_pci_hotplug.rst),
//! which the DSDT's slot objects (`_EJ0`) and the GPE handler (`_E01`) use:
//!
//! - 0x00 PCIU (read): slots with a device added since the last read;
//! - 0x04 PCID (read): slots the host asked the guest to release;
//! - 0x08 B0EJ (write): the guest ejects these slots;
//! - 0x0c RMV (read): slots whose devices may be removed;
//! - 0x10 BNUM (read/write): the bus selector (only bus 0 here).
//!
//! A plug or an unplug request raises GPE0 bit 1 ([`GPE_PCI_HOTPLUG`]) so
//! the guest runs `_E01`, which reads PCIU/PCID and notifies the slots. An
//! eject is handed to the machine ([`SystemControl::request_pci_eject`]),
//! which owns the devices and removes them.

use std::sync::{Arc, Mutex};

use crate::bus::{lock, BusDevice};
use crate::chipset::acpi_pm::PmRegs;
use crate::chipset::piix4_pm::GPE_PCI_HOTPLUG;
use crate::system::SystemControl;

pub const PCIHP_BASE: u16 = 0xae00;
pub const PCIHP_LEN: u64 = 0x14;

pub struct PciHotplug {
    up: u32,
    down: u32,
    removable: u32,
    pm: Arc<Mutex<PmRegs>>,
    system: Arc<dyn SystemControl>,
}

impl PciHotplug {
    /// `removable`: the slots whose devices the guest may eject (not the
    /// host bridge's or the chipset's).
    pub fn new(removable: u32, pm: Arc<Mutex<PmRegs>>, system: Arc<dyn SystemControl>) -> Self {
        PciHotplug {
            up: 0,
            down: 0,
            removable,
            pm,
            system,
        }
    }

    /// Whether the guest may be asked to release `slot`.
    pub fn is_removable(&self, slot: u8) -> bool {
        slot < 32 && self.removable & (1 << slot) != 0
    }

    /// A device was added in `slot`: tell the guest.
    pub fn plugged(&mut self, slot: u8) {
        if slot < 32 {
            self.up |= 1 << slot;
            lock(&self.pm).gpe_event(GPE_PCI_HOTPLUG);
        }
    }

    /// The host asks the guest to release `slot` (QMP `device_del`).
    pub fn unplug_request(&mut self, slot: u8) {
        if self.is_removable(slot) {
            self.down |= 1 << slot;
            lock(&self.pm).gpe_event(GPE_PCI_HOTPLUG);
        }
    }

    fn register(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => std::mem::take(&mut self.up),
            0x04 => self.down,
            0x0c => self.removable,
            _ => 0,
        }
    }
}

impl BusDevice for PciHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let reg = offset & !3;
        let v = self.register(reg).to_le_bytes();
        let start = (offset - reg) as usize;
        for (i, d) in data.iter_mut().enumerate() {
            *d = v.get(start + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset & !3 != 0x08 {
            return;
        }
        let mut v = 0u32;
        for (i, &b) in data.iter().enumerate() {
            let shift = 8 * ((offset & 3) as usize + i);
            if shift < 32 {
                v |= (b as u32) << shift;
            }
        }
        for slot in 0..32u8 {
            if v & (1 << slot) != 0 && self.is_removable(slot) {
                self.down &= !(1 << slot);
                self.system.request_pci_eject(slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chipset::piix4_pm::Piix4Pm;
    use crate::clock::ManualClock;
    use crate::irq::IrqLine;

    struct Line(Mutex<bool>);
    impl IrqLine for Line {
        fn set_level(&self, l: bool) {
            *self.0.lock().unwrap() = l;
        }
    }
    #[derive(Default)]
    struct Ejects(Mutex<Vec<u8>>);
    impl SystemControl for Ejects {
        fn request_reset(&self) {}
        fn request_shutdown(&self) {}
        fn request_pci_eject(&self, slot: u8) {
            self.0.lock().unwrap().push(slot);
        }
    }

    #[test]
    fn plug_unplug_and_eject() {
        let sci = Arc::new(Line(Mutex::new(false)));
        let ej = Arc::new(Ejects::default());
        let pm = Piix4Pm::new(Arc::new(ManualClock::default()), sci.clone(), ej.clone());
        let regs = pm.regs();
        let mut gpe = pm.gpe0();
        // ACPI mode and the hotplug GPE enabled, as the guest's OSPM does.
        pm.apm().write(0, &[0xf1]);
        gpe.write(2, &[2]);
        let mut hp = PciHotplug::new(!3, regs, ej.clone());
        hp.plugged(5);
        assert!(*sci.0.lock().unwrap(), "SCI for the plug");
        let mut b = [0u8; 4];
        hp.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1 << 5);
        hp.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0, "PCIU clears when read");
        gpe.write(0, &[2]);
        assert!(!*sci.0.lock().unwrap(), "status written back");
        hp.unplug_request(5);
        hp.unplug_request(1);
        hp.read(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1 << 5, "slot 1 is not removable");
        hp.write(8, &(1u32 << 5 | 1 << 1).to_le_bytes());
        assert_eq!(*ej.0.lock().unwrap(), vec![5]);
        hp.read(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0);
    }
}
