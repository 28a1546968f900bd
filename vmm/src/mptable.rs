//! The Intel MultiProcessor Specification 1.4 tables (chapter 4: the MP
//! floating pointer structure and the MP configuration table), for guests
//! that boot with ACPI off and still need to find the CPUs and the IOAPIC.
//!
//! Interrupt entries follow what SeaBIOS writes for QEMU's `pc`, so a
//! guest sees the same routing whether firmware or Strata made the table:
//! - ISA IRQs 0-15 go to the same IOAPIC pins, except IRQ 0 -> pin 2 (the
//!   IRQ0 override KVM's GSI routing implements) and no entry for IRQ 2 or
//!   for the IRQs PCI uses;
//! - PCI INTx of slot `d`, pin `p` (0 = INTA) goes through PIIX PIRQ link
//!   `(d - 1 + p) & 3` to the ISA IRQ in [`PIRQ_IRQS`], level-triggered and
//!   active-low (MP spec table 4-10); slot 1 INTA is the PIIX4 PM function,
//!   whose SCI is wired to IRQ 9.
//! - on `q35`, PCI INTx goes to the ICH9 PIRQ's own input 16-23 instead
//!   (`devices::chipset::pirq::ich9_swizzle`), and every ISA IRQ but 2
//!   has its entry;
//! - LINT0 is ExtINT and LINT1 is NMI on every local APIC.

/// The ISA IRQ each PIIX PIRQ link (A-D) is routed to, as SeaBIOS programs
/// PIIX3 config registers 0x60-0x63; the direct-boot path programs the same.
pub const PIRQ_IRQS: [u8; 4] = [10, 10, 11, 11];
pub const SCI_IRQ: u8 = 9;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

use crate::machine::ChipsetKind;

const PCI_BUS: u8 = 0;
const ISA_BUS: u8 = 1;

/// I/O APIC input of PCI slot `dev`'s interrupt pin `pin` (0 = INTA) on
/// `chipset`: an ISA IRQ through a PIIX link, or on ICH9 the PIRQ's own
/// input 16-23.
pub fn pci_irq_on(chipset: ChipsetKind, dev: u8, pin: u8) -> u8 {
    match chipset {
        ChipsetKind::I440fx => pci_irq(dev, pin),
        ChipsetKind::Q35 => 16 + devices::chipset::pirq::ich9_swizzle(dev, pin + 1) as u8,
    }
}

/// ISA IRQ of PCI slot `dev`'s interrupt pin `pin` (0 = INTA) on `pc`.
pub fn pci_irq(dev: u8, pin: u8) -> u8 {
    if dev == 1 && pin == 0 {
        SCI_IRQ
    } else {
        PIRQ_IRQS[((dev as usize + 3) + pin as usize) & 3]
    }
}

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, &x| a.wrapping_add(x)))
}

/// Builds the floating pointer followed by the configuration table, for
/// placement at `addr` (16-byte aligned).
pub fn build(addr: u32, cpus: u32, chipset: ChipsetKind) -> Vec<u8> {
    let ioapic_id = cpus as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count = 0u16;
    for id in 0..cpus {
        let mut e = vec![0u8, id as u8, 0x14, 1 | if id == 0 { 2 } else { 0 }];
        e.extend_from_slice(&0x600u32.to_le_bytes()); // family 6
        e.extend_from_slice(&0x201u32.to_le_bytes()); // FPU | APIC
        e.extend_from_slice(&[0; 8]);
        entries.extend(e);
        count += 1;
    }
    for (id, name) in [(PCI_BUS, b"PCI   "), (ISA_BUS, b"ISA   ")] {
        entries.extend([1, id]);
        entries.extend_from_slice(name);
        count += 1;
    }
    entries.extend([2, ioapic_id, 0x11, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    let mut irq = |kind: u8, flags: u16, bus: u8, src: u8, apic: u8, pin: u8| {
        entries.extend([3 + (apic == 0xfe) as u8, kind]);
        entries.extend_from_slice(&flags.to_le_bytes());
        entries.extend([bus, src, if apic == 0xfe { 0xff } else { apic }, pin]);
        count += 1;
    };
    const INT: u8 = 0;
    const NMI: u8 = 1;
    const EXTINT: u8 = 3;
    const LEVEL_LOW: u16 = 0x0f;
    let mut pci_used = 0u16;
    for dev in 1..32u8 {
        for pin in 0..4u8 {
            let input = pci_irq_on(chipset, dev, pin);
            if input < 16 {
                pci_used |= 1 << input;
            }
            irq(INT, LEVEL_LOW, PCI_BUS, dev << 2 | pin, ioapic_id, input);
        }
    }
    for i in 0..16u8 {
        if i == 2 || pci_used & (1 << i) != 0 {
            continue;
        }
        let pin = if i == 0 { 2 } else { i };
        irq(INT, 0, ISA_BUS, i, ioapic_id, pin);
    }
    // Local interrupts; 0xfe marks "type 4, all local APICs".
    irq(EXTINT, 0, ISA_BUS, 0, 0xfe, 0);
    irq(NMI, 0, ISA_BUS, 0, 0xfe, 1);

    let mut table = Vec::new();
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.extend([4, 0]); // spec revision 1.4, checksum
    table.extend_from_slice(b"STRATA  ");
    table.extend_from_slice(b"PC          ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length/checksum
    table.extend(entries);
    table[7] = checksum(&table);

    let mut fp = Vec::new();
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(addr + 16).to_le_bytes());
    fp.extend([1, 4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);
    fp.extend(table);
    fp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let t = build(0xf0000, 2, ChipsetKind::I440fx);
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        let cfg = &t[16..];
        assert_eq!(&cfg[..4], b"PCMP");
        let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
        assert_eq!(len, cfg.len());
        assert_eq!(cfg.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        // 2 CPUs, 2 buses, 1 IOAPIC, 124 PCI, 12 ISA, 2 local.
        assert_eq!(
            u16::from_le_bytes([cfg[34], cfg[35]]),
            2 + 2 + 1 + 124 + 12 + 2
        );
    }

    #[test]
    fn pirq_swizzle_matches_seabios() {
        // SeaBIOS: pci_irqs[(pin - 1 + dev - 1) & 3], pin 1-based.
        assert_eq!(pci_irq(2, 0), 10);
        assert_eq!(pci_irq(3, 0), 11);
        assert_eq!(pci_irq(4, 0), 11);
        assert_eq!(pci_irq(5, 0), 10);
        assert_eq!(pci_irq(1, 1), 10);
        assert_eq!(pci_irq(1, 2), 11);
        assert_eq!(pci_irq(1, 0), SCI_IRQ);
    }
}
