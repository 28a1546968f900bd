//! ACPI tables for the `pc` machine (ACPI 6.5): RSDP (5.2.5), RSDT
//! (5.2.7), XSDT (5.2.8), FADT revision 6 (5.2.9), FACS (5.2.10), MADT
//! (5.2.12) and a DSDT in AML (5.2.11.1, built with [`aml`]).
//!
//! The tables are built once as two blobs, `etc/acpi/rsdp` and
//! `etc/acpi/tables`, whose internal pointers hold offsets into the
//! tables blob. A list of pointer and checksum fix-ups goes with them. That
//! is QEMU's "BIOS linker/loader" design (QEMU's
//! hw/acpi/bios-linker-loader.c documents the command format): SeaBIOS
//! receives the blobs and the fix-ups as `etc/table-loader` commands and
//! patches them wherever it allocates them; direct boot applies the same
//! fix-ups itself for the addresses it chose ([`Tables::place`]).
//!
//! What the tables say must match the hardware:
//! - PM1a event/control and the PM timer at PIIX4 PMBASE 0x600 (the value
//!   SeaBIOS and the direct-boot path program), SCI on IRQ 9, the
//!   `SMI_CMD` port 0xb2 with the ACPI enable/disable values 0xf1/0xf0
//!   that `devices::chipset::piix4_pm` implements, the reset register at
//!   I/O 0xcf9 (value 6, the PCI host's reset control);
//! - the power button is the PM1 fixed-feature button (PWRBTN_STS), which
//!   `Piix4Pm::power_button` raises, so the FADT's PWR_BUTTON flag is
//!   clear and the DSDT has no control-method button;
//! - the MADT's IRQ0 -> GSI 2 override matches KVM's GSI routing, and the
//!   level/active-high overrides for IRQs 5, 9, 10 and 11 match the PCI
//!   link IRQs (QEMU's choice too);
//! - the DSDT's `_PRT` maps slot `d` pin `p` to link `(d - 1 + p) & 3`,
//!   the PIIX swizzle SeaBIOS uses when it programs PIRQ A-D.

pub mod aml;

use crate::boot::PM_BASE;
use crate::machine::ChipsetKind;
use devices::chipset::mch::{ECAM_BASE, ECAM_SIZE};

/// The end of the ECAM window (`q35`).
const ECAM_END: u64 = ECAM_BASE + ECAM_SIZE;
use crate::mptable::{IOAPIC_ADDR, LAPIC_ADDR};

pub const OEM_ID: &[u8; 6] = b"STRATA";
pub const OEM_TABLE_ID: &[u8; 8] = b"STRATAPC";
pub const RSDP_FILE: &str = "etc/acpi/rsdp";
pub const TABLES_FILE: &str = "etc/acpi/tables";
pub const LOADER_FILE: &str = "etc/table-loader";
pub const SCI_IRQ: u16 = 9;
/// The IOAPIC's ID in the MADT (QEMU's ACPI_BUILD_IOAPIC_ID).
pub const IOAPIC_ID: u8 = 0;

/// What the tables describe.
pub struct AcpiConfig {
    pub cpus: u32,
    /// RAM below 4 GiB: the PCI memory window starts there.
    pub below_4g: u64,
    /// Whether an ISA floppy controller exists.
    pub floppy: bool,
    pub chipset: ChipsetKind,
}

impl AcpiConfig {
    pub fn new(
        cfg: &crate::config::MachineConfig,
        layout: &crate::memory::Layout,
        chipset: ChipsetKind,
    ) -> Self {
        use block::drive::Interface;
        let floppy = cfg.drives.iter().any(|d| {
            d.device
                .as_ref()
                .is_some_and(|p| p.interface == Interface::Floppy)
        }) || cfg
            .devices
            .iter()
            .any(|d| d.ty.name == "isa-fdc" || d.ty.name == "floppy");
        AcpiConfig {
            cpus: cfg.cpus,
            below_4g: layout.below_4g,
            floppy,
            chipset,
        }
    }
}

/// Which blob a pointer or checksum refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blob {
    Rsdp,
    Tables,
}

impl Blob {
    fn file(self) -> &'static str {
        match self {
            Blob::Rsdp => RSDP_FILE,
            Blob::Tables => TABLES_FILE,
        }
    }
}

/// A pointer field in `dest` at `offset`, `size` bytes, holding an offset
/// into the tables blob until the blob's address is added.
#[derive(Clone, Copy, Debug)]
pub struct Pointer {
    pub dest: Blob,
    pub offset: usize,
    pub size: u8,
}

/// A checksum byte at `at` making bytes `[start, start + len)` sum to 0.
#[derive(Clone, Copy, Debug)]
pub struct Checksum {
    pub blob: Blob,
    pub at: usize,
    pub start: usize,
    pub len: usize,
}

pub struct Tables {
    pub rsdp: Vec<u8>,
    pub tables: Vec<u8>,
    pub pointers: Vec<Pointer>,
    pub checksums: Vec<Checksum>,
}

/// Sum of bytes, mod 256.
pub fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
}

fn header(sig: &[u8; 4], len: usize, rev: u8) -> Vec<u8> {
    let mut h = Vec::with_capacity(len);
    h.extend_from_slice(sig);
    h.extend_from_slice(&(len as u32).to_le_bytes());
    h.push(rev);
    h.push(0); // checksum, filled by a fix-up
    h.extend_from_slice(OEM_ID);
    h.extend_from_slice(OEM_TABLE_ID);
    h.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    h.extend_from_slice(b"STRA"); // creator ID
    h.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    h
}

/// A Generic Address Structure (5.2.3.2) in system I/O space.
fn gas_io(bits: u8, access: u8, port: u64) -> Vec<u8> {
    let mut g = vec![1, bits, 0, access];
    g.extend_from_slice(&port.to_le_bytes());
    g
}

fn put(buf: &mut [u8], off: usize, v: &[u8]) {
    buf[off..off + v.len()].copy_from_slice(v);
}

struct Builder {
    t: Tables,
}

impl Builder {
    /// Appends a table to the tables blob, aligned, with its checksum
    /// fix-up unless `checksum` is false (the FACS has none). Returns its
    /// offset.
    fn add(&mut self, table: Vec<u8>, align: usize, checksum: bool) -> usize {
        while !self.t.tables.len().is_multiple_of(align) {
            self.t.tables.push(0);
        }
        let off = self.t.tables.len();
        if checksum {
            self.t.checksums.push(Checksum {
                blob: Blob::Tables,
                at: off + 9,
                start: off,
                len: table.len(),
            });
        }
        self.t.tables.extend(table);
        off
    }

    /// Writes `target` (an offset into the tables blob) into the table at
    /// `table_off + field` and records the pointer fix-up.
    fn point(&mut self, dest: Blob, at: usize, size: u8, target: usize) {
        let buf = match dest {
            Blob::Rsdp => &mut self.t.rsdp,
            Blob::Tables => &mut self.t.tables,
        };
        put(buf, at, &(target as u64).to_le_bytes()[..size as usize]);
        self.t.pointers.push(Pointer {
            dest,
            offset: at,
            size,
        });
    }
}

pub fn build(cfg: &AcpiConfig) -> Tables {
    let mut b = Builder {
        t: Tables {
            rsdp: Vec::new(),
            tables: Vec::new(),
            pointers: Vec::new(),
            checksums: Vec::new(),
        },
    };

    // FACS: 64-byte aligned, no checksum.
    let mut facs = vec![0u8; 64];
    put(&mut facs, 0, b"FACS");
    put(&mut facs, 4, &64u32.to_le_bytes());
    facs[32] = 2; // version
    let facs_off = b.add(facs, 64, false);

    let dsdt = dsdt(cfg);
    let dsdt_off = b.add(dsdt, 8, true);

    let fadt_off = b.add(fadt(cfg), 8, true);
    b.point(Blob::Tables, fadt_off + 36, 4, facs_off);
    b.point(Blob::Tables, fadt_off + 40, 4, dsdt_off);
    b.point(Blob::Tables, fadt_off + 140, 8, dsdt_off);

    let madt_off = b.add(madt(cfg), 8, true);

    let mut entries = vec![fadt_off, madt_off];
    if cfg.chipset == ChipsetKind::Q35 {
        entries.push(b.add(mcfg(), 8, true));
    }
    let rsdt_len = 36 + 4 * entries.len();
    let mut rsdt = header(b"RSDT", rsdt_len, 1);
    rsdt.resize(rsdt_len, 0);
    let rsdt_off = b.add(rsdt, 8, true);
    for (i, &e) in entries.iter().enumerate() {
        b.point(Blob::Tables, rsdt_off + 36 + 4 * i, 4, e);
    }
    let xsdt_len = 36 + 8 * entries.len();
    let mut xsdt = header(b"XSDT", xsdt_len, 1);
    xsdt.resize(xsdt_len, 0);
    let xsdt_off = b.add(xsdt, 8, true);
    for (i, &e) in entries.iter().enumerate() {
        b.point(Blob::Tables, xsdt_off + 36 + 8 * i, 8, e);
    }

    // RSDP, ACPI 2.0+ form (36 bytes).
    let mut rsdp = vec![0u8; 36];
    put(&mut rsdp, 0, b"RSD PTR ");
    put(&mut rsdp, 9, OEM_ID);
    rsdp[15] = 2;
    put(&mut rsdp, 20, &36u32.to_le_bytes());
    b.t.rsdp = rsdp;
    b.point(Blob::Rsdp, 16, 4, rsdt_off);
    b.point(Blob::Rsdp, 24, 8, xsdt_off);
    // The 20-byte checksum first: the extended one covers it.
    b.t.checksums.push(Checksum {
        blob: Blob::Rsdp,
        at: 8,
        start: 0,
        len: 20,
    });
    b.t.checksums.push(Checksum {
        blob: Blob::Rsdp,
        at: 32,
        start: 0,
        len: 36,
    });
    b.t
}

/// Where the GPE0 block is and its length: PIIX4's at 0xafe0 (as QEMU's
/// `pc`), ICH9's inside the PM block.
fn gpe0_blk(cfg: &AcpiConfig) -> (u32, u8) {
    match cfg.chipset {
        ChipsetKind::I440fx => (
            devices::chipset::piix4_pm::GPE0_BASE as u32,
            devices::chipset::piix4_pm::GPE0_LEN as u8,
        ),
        ChipsetKind::Q35 => {
            use devices::chipset::ich9_lpc::{GPE0_HALF, GPE0_OFFSET};
            (PM_BASE as u32 + GPE0_OFFSET as u32, 2 * GPE0_HALF as u8)
        }
    }
}

fn fadt(cfg: &AcpiConfig) -> Vec<u8> {
    const LEN: usize = 276;
    let mut f = header(b"FACP", LEN, 6);
    f.resize(LEN, 0);
    let pm = PM_BASE as u32;
    put(&mut f, 46, &SCI_IRQ.to_le_bytes());
    put(&mut f, 48, &0xb2u32.to_le_bytes()); // SMI_CMD
    f[52] = 0xf1; // ACPI_ENABLE
    f[53] = 0xf0; // ACPI_DISABLE
    put(&mut f, 56, &pm.to_le_bytes()); // PM1a_EVT_BLK
    put(&mut f, 64, &(pm + 4).to_le_bytes()); // PM1a_CNT_BLK
    put(&mut f, 76, &(pm + 8).to_le_bytes()); // PM_TMR_BLK
    let (gpe0, gpe0_len) = gpe0_blk(cfg);
    put(&mut f, 80, &gpe0.to_le_bytes()); // GPE0_BLK
    f[92] = gpe0_len; // GPE0_BLK_LEN
    f[88] = 4; // PM1_EVT_LEN
    f[89] = 2; // PM1_CNT_LEN
    f[91] = 4; // PM_TMR_LEN
    put(&mut f, 96, &0xfffu16.to_le_bytes()); // P_LVL2_LAT: no C2
    put(&mut f, 98, &0xfffu16.to_le_bytes()); // P_LVL3_LAT: no C3
    f[108] = 0x32; // CENTURY: CMOS register
                   // IAPC_BOOT_ARCH: legacy devices, 8042, no VGA.
    put(&mut f, 109, &0x7u16.to_le_bytes());
    // WBINVD | PROC_C1 | SLP_BUTTON (none) | RTC_S4 | RESET_REG_SUP.
    put(&mut f, 112, &0x4a5u32.to_le_bytes());
    put(&mut f, 116, &gas_io(8, 1, 0xcf9)); // RESET_REG
    f[128] = 0x06; // RESET_VALUE: hard reset via 0xcf9
    put(&mut f, 148, &gas_io(32, 2, pm as u64)); // X_PM1a_EVT_BLK
    put(&mut f, 172, &gas_io(16, 2, pm as u64 + 4)); // X_PM1a_CNT_BLK
    put(&mut f, 208, &gas_io(32, 3, pm as u64 + 8)); // X_PM_TMR_BLK
    put(&mut f, 220, &gas_io(gpe0_len * 8, 1, gpe0 as u64)); // X_GPE0_BLK
    f
}

/// The MCFG table (PCI Firmware Specification 3.2, 4.1.2): the ECAM
/// window of segment 0, buses 0-255, where `init_q35` and SeaBIOS put it.
fn mcfg() -> Vec<u8> {
    let mut t = header(b"MCFG", 36 + 8 + 16, 1);
    t.extend([0u8; 8]);
    t.extend_from_slice(&ECAM_BASE.to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes()); // segment
    t.push(0);
    t.push(((ECAM_SIZE >> 20) - 1) as u8);
    t.extend([0u8; 4]);
    t
}

fn madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: 8259s present
    for id in 0..cfg.cpus {
        // Processor Local APIC: UID, APIC ID, enabled.
        body.extend([0, 8, id as u8, id as u8, 1, 0, 0, 0]);
    }
    body.extend([1, 12, IOAPIC_ID, 0]);
    body.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    let iso = |body: &mut Vec<u8>, src: u8, gsi: u32, flags: u16| {
        body.extend([2, 10, 0, src]);
        body.extend_from_slice(&gsi.to_le_bytes());
        body.extend_from_slice(&flags.to_le_bytes());
    };
    iso(&mut body, 0, 2, 0);
    // The SCI; on `pc` also the IRQs PCI links use (q35's PCI interrupts
    // have inputs 16-23 of their own).
    let level: &[u8] = match cfg.chipset {
        ChipsetKind::I440fx => &[5, 9, 10, 11],
        ChipsetKind::Q35 => &[9],
    };
    for &irq in level {
        iso(&mut body, irq, irq as u32, 0xd); // level, active high
    }
    // Local APIC NMI on LINT1 for all processors.
    body.extend([4, 6, 0xff, 0, 0, 1]);
    let mut m = header(b"APIC", 36 + body.len(), 3);
    m.extend(body);
    m
}

/// The DSDT: the PCI root bridge with its resources and `_PRT`, the ISA
/// devices and `_S5`; on `pc` also the PIIX PIRQ link devices and the PCI
/// hotplug slots, on `q35` the ECAM window's reservation.
pub fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    use aml::*;
    let q35 = cfg.chipset == ChipsetKind::Q35;
    // q35's PCI memory starts above the ECAM window, as SeaBIOS allocates.
    let mem_start = if q35 {
        cfg.below_4g.max(ECAM_END)
    } else {
        cfg.below_4g.max(0x0010_0000)
    };
    let pci_crs = res::template(&[
        res::word_bus(0, 0xff),
        res::io(0xcf8, 8),
        res::word_io(0, 0xcf7),
        res::word_io(0xd00, 0xffff),
        res::dword_mem(0xa0000, 0xbffff),
        res::dword_mem(mem_start as u32, 0xfebf_ffff),
    ]);
    let mut prt = Vec::new();
    for slot in 1..32u64 {
        for pin in 0..4u64 {
            // q35: the PIRQ's own I/O APIC input (a GSI, no link device).
            let (source, index) = if q35 {
                let pirq = devices::chipset::pirq::ich9_swizzle(slot as u8, pin as u8 + 1);
                (int(0), int(16 + pirq as u64))
            } else if slot == 1 && pin == 0 {
                (name_ref("LNKS"), int(0))
            } else {
                let l = (b'A' + ((slot + 3 + pin) & 3) as u8) as char;
                (name_ref(&format!("LNK{l}")), int(0))
            };
            prt.push(package(&[
                int((slot << 16) | 0xffff),
                int(pin),
                source,
                index,
            ]));
        }
    }
    // A package holds at most 255 elements: 124 entries fit.
    let mut isa = if q35 {
        name("_ADR", int(0x001f_0000))
    } else {
        [
            name("_ADR", int(0x0001_0000)),
            op_region("P40C", REGION_PCI_CONFIG, 0x60, 4),
        ]
        .concat()
    };
    isa.extend(
        [
            isa_dev("RTC", "PNP0B00", None, &[res::io(0x70, 8), res::irq(8)]),
            isa_dev(
                "KBD",
                "PNP0303",
                None,
                &[res::io(0x60, 1), res::io(0x64, 1), res::irq(1)],
            ),
            isa_dev("MOU", "PNP0F13", None, &[res::irq(12)]),
            isa_dev(
                "COM1",
                "PNP0501",
                Some(1),
                &[res::io(0x3f8, 8), res::irq(4)],
            ),
        ]
        .concat(),
    );
    if cfg.floppy {
        isa.extend(isa_dev(
            "FDC0",
            "PNP0700",
            None,
            &[
                res::io(0x3f2, 4),
                res::io(0x3f7, 1),
                res::irq(6),
                res::dma(2),
            ],
        ));
    }
    let mut pci0 = if q35 {
        [
            name("_HID", eisa_id("PNP0A08")),
            name("_CID", eisa_id("PNP0A03")),
        ]
        .concat()
    } else {
        name("_HID", eisa_id("PNP0A03"))
    };
    pci0.extend(
        [
            name("_UID", int(0)),
            name("_CRS", pci_crs),
            name("_PRT", package(&prt)),
            device("ISA", isa),
        ]
        .concat(),
    );
    let body = if q35 {
        // The ECAM window is a motherboard resource: Linux uses MCFG's
        // window only when something reserves it (e820 or PNP0C02).
        pci0.extend(device(
            "RES0",
            [
                name("_HID", eisa_id("PNP0C02")),
                name(
                    "_CRS",
                    res::template(&[res::dword_mem(ECAM_BASE as u32, (ECAM_END - 1) as u32)]),
                ),
            ]
            .concat(),
        ));
        let sb = scope("\\_SB", device("PCI0", pci0));
        let gpe = scope("\\_GPE", name("_HID", string("ACPI0006")));
        [sb, s5(), gpe].concat()
    } else {
        pci0.extend(pci_hotplug());
        let sb = scope("\\_SB", [device("PCI0", pci0), piix_links()].concat());
        // GPE 1 is a PCI hotplug event: notify the slots.
        let gpe = scope(
            "\\_GPE",
            [
                name("_HID", string("ACPI0006")),
                method("_E01", 0, false, call("\\_SB.PCI0.PCNT", &[])),
            ]
            .concat(),
        );
        [sb, s5(), gpe].concat()
    };
    let mut t = header(b"DSDT", 36 + body.len(), 2);
    t.extend(body);
    t
}

/// `_S5`: SLP_TYP 0 is soft-off in `acpi_pm`'s PM1_CNT.
fn s5() -> Vec<u8> {
    use aml::*;
    name("\\_S5", package(&[int(0), int(0), int(0), int(0)]))
}

/// The PIIX PIRQ link devices LNKA-LNKD, on the route registers at
/// 00:01.0 0x60-0x63, and LNKS, the PM function's SCI.
fn piix_links() -> Vec<u8> {
    use aml::*;
    // Link helpers, as QEMU's DSDT has them: IQST gives a link's _STA from
    // its PIRQ register (bit 7 = disabled), IQCR its current IRQ.
    let iqst = method(
        "IQST",
        1,
        false,
        [
            if_(and(int(0x80), vec![ARG0]), ret(int(0x09))),
            ret(int(0x0b)),
        ]
        .concat(),
    );
    let iqcr = method(
        "IQCR",
        1,
        true,
        [
            name("PRR0", res::template(&[res::ext_irq(&[0])])),
            create_dword_field(name_string("PRR0"), 5, "PRRI"),
            if_(
                lless(vec![ARG0], int(0x80)),
                store(vec![ARG0], name_string("PRRI")),
            ),
            ret(name_string("PRR0")),
        ]
        .concat(),
    );
    let mut links = Vec::new();
    for (i, l) in ["A", "B", "C", "D"].iter().enumerate() {
        let reg = format!("PRQ{i}");
        links.extend(device(
            &format!("LNK{l}"),
            [
                name("_HID", eisa_id("PNP0C0F")),
                name("_UID", int(i as u64)),
                name("_PRS", res::template(&[res::ext_irq(&[5, 10, 11])])),
                method("_STA", 0, false, ret(call("IQST", &[name_string(&reg)]))),
                method(
                    "_DIS",
                    0,
                    false,
                    or(name_string(&reg), int(0x80), name_string(&reg)),
                ),
                method("_CRS", 0, false, ret(call("IQCR", &[name_string(&reg)]))),
                method(
                    "_SRS",
                    1,
                    true,
                    [
                        create_dword_field(vec![ARG0], 5, "PRRI"),
                        store(name_string("PRRI"), name_string(&reg)),
                    ]
                    .concat(),
                ),
            ]
            .concat(),
        ));
    }
    // The PM function's SCI: wired to IRQ 9, not through a PIRQ.
    links.extend(device(
        "LNKS",
        [
            name("_HID", eisa_id("PNP0C0F")),
            name("_UID", int(4)),
            name("_STA", int(0x0b)),
            name("_PRS", res::template(&[res::ext_irq(&[9])])),
            name("_CRS", res::template(&[res::ext_irq(&[9])])),
            method("_SRS", 1, false, Vec::new()),
        ]
        .concat(),
    ));
    [
        field(
            "PCI0.ISA.P40C",
            FIELD_BYTE_ACC,
            &[("PRQ0", 8), ("PRQ1", 8), ("PRQ2", 8), ("PRQ3", 8)],
        ),
        iqst,
        iqcr,
        links,
    ]
    .concat()
}

/// The hotplug slots of bus 0 (devices/src/chipset/pcihp.rs has the
/// registers): one device per slot with `_SUN` and `_EJ0`, which writes the
/// slot's bit to B0EJ, and `PCNT`, which `_E01` runs to notify the slots
/// whose devices came (Device Check) or must go (Eject Request).
fn pci_hotplug() -> Vec<u8> {
    use aml::*;
    use devices::chipset::pcihp::PCIHP_BASE;
    let slot_name = |s: u64| format!("SL{s:02X}");
    let mut out = [
        op_region("PCST", REGION_SYSTEM_IO, PCIHP_BASE as u64, 8),
        field("PCST", FIELD_DWORD_ACC, &[("PCIU", 32), ("PCID", 32)]),
        op_region("SEJ", REGION_SYSTEM_IO, PCIHP_BASE as u64 + 8, 4),
        field("SEJ", FIELD_DWORD_ACC, &[("B0EJ", 32)]),
    ]
    .concat();
    let mut pcnt = [
        store(name_string("PCIU"), vec![LOCAL0]),
        store(name_string("PCID"), vec![LOCAL1]),
    ]
    .concat();
    // Slots 0 and 1 hold the host bridge and the chipset.
    for s in 2..32u64 {
        out.extend(device(
            &slot_name(s),
            [
                name("_ADR", int(s << 16)),
                name("_SUN", int(s)),
                method("_EJ0", 1, false, store(int(1 << s), name_string("B0EJ"))),
            ]
            .concat(),
        ));
        pcnt.extend(if_(
            and(vec![LOCAL0], int(1 << s)),
            notify(&slot_name(s), 1),
        ));
        pcnt.extend(if_(
            and(vec![LOCAL1], int(1 << s)),
            notify(&slot_name(s), 3),
        ));
    }
    out.extend(method("PCNT", 0, true, pcnt));
    out
}

fn isa_dev(n: &str, hid: &str, uid: Option<u64>, crs: &[Vec<u8>]) -> Vec<u8> {
    use aml::*;
    let mut body = name("_HID", eisa_id(hid));
    if let Some(u) = uid {
        body.extend(name("_UID", int(u)));
    }
    body.extend(name("_STA", int(0x0f)));
    body.extend(name("_CRS", res::template(crs)));
    device(n, body)
}

impl Tables {
    /// Applies the fix-ups for the blobs placed at `rsdp_addr` and
    /// `tables_addr`; returns the final bytes of both.
    pub fn place(&self, tables_addr: u64) -> (Vec<u8>, Vec<u8>) {
        let mut rsdp = self.rsdp.clone();
        let mut tables = self.tables.clone();
        for p in &self.pointers {
            let buf = match p.dest {
                Blob::Rsdp => &mut rsdp,
                Blob::Tables => &mut tables,
            };
            let n = p.size as usize;
            let mut v = [0u8; 8];
            v[..n].copy_from_slice(&buf[p.offset..p.offset + n]);
            let patched = u64::from_le_bytes(v).wrapping_add(tables_addr);
            buf[p.offset..p.offset + n].copy_from_slice(&patched.to_le_bytes()[..n]);
        }
        for c in &self.checksums {
            let buf = match c.blob {
                Blob::Rsdp => &mut rsdp,
                Blob::Tables => &mut tables,
            };
            buf[c.at] = 0;
            buf[c.at] = 0u8.wrapping_sub(sum(&buf[c.start..c.start + c.len]));
        }
        (rsdp, tables)
    }

    /// The `etc/table-loader` commands (128 bytes each): allocate the RSDP
    /// in the F segment and the tables in high memory, patch the pointers,
    /// then compute the checksums.
    pub fn loader(&self) -> Vec<u8> {
        const ALLOCATE: u32 = 1;
        const ADD_POINTER: u32 = 2;
        const ADD_CHECKSUM: u32 = 3;
        const ZONE_HIGH: u8 = 1;
        const ZONE_FSEG: u8 = 2;
        fn entry(cmd: u32, parts: &[&[u8]]) -> Vec<u8> {
            let mut e = cmd.to_le_bytes().to_vec();
            for p in parts {
                e.extend_from_slice(p);
            }
            e.resize(128, 0);
            e
        }
        fn name(n: &str) -> [u8; 56] {
            let mut b = [0u8; 56];
            b[..n.len()].copy_from_slice(n.as_bytes());
            b
        }
        let mut out = Vec::new();
        out.extend(entry(
            ALLOCATE,
            &[&name(RSDP_FILE), &16u32.to_le_bytes(), &[ZONE_FSEG]],
        ));
        out.extend(entry(
            ALLOCATE,
            &[&name(TABLES_FILE), &64u32.to_le_bytes(), &[ZONE_HIGH]],
        ));
        for p in &self.pointers {
            out.extend(entry(
                ADD_POINTER,
                &[
                    &name(p.dest.file()),
                    &name(TABLES_FILE),
                    &(p.offset as u32).to_le_bytes(),
                    &[p.size],
                ],
            ));
        }
        for c in &self.checksums {
            out.extend(entry(
                ADD_CHECKSUM,
                &[
                    &name(c.blob.file()),
                    &(c.at as u32).to_le_bytes(),
                    &(c.start as u32).to_le_bytes(),
                    &(c.len as u32).to_le_bytes(),
                ],
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AcpiConfig {
        AcpiConfig {
            cpus: 2,
            below_4g: 128 << 20,
            floppy: true,
            chipset: ChipsetKind::I440fx,
        }
    }

    #[test]
    fn placed_tables_checksum_and_point_right() {
        placed_tables_for(cfg(), &[b"FACP", b"APIC"]);
        let q35 = AcpiConfig {
            chipset: ChipsetKind::Q35,
            ..cfg()
        };
        placed_tables_for(q35, &[b"FACP", b"APIC", b"MCFG"]);
    }

    fn placed_tables_for(cfg: AcpiConfig, want: &[&[u8; 4]]) {
        let t = build(&cfg);
        let base = 0xe0000u64;
        let (rsdp, tables) = t.place(base);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        let rsdt = u32::from_le_bytes(rsdp[16..20].try_into().unwrap()) as u64 - base;
        let xsdt = u64::from_le_bytes(rsdp[24..32].try_into().unwrap()) - base;
        let at = |o: u64| &tables[o as usize..];
        assert_eq!(&at(rsdt)[..4], b"RSDT");
        assert_eq!(&at(xsdt)[..4], b"XSDT");
        let len = |o: u64| u32::from_le_bytes(at(o)[4..8].try_into().unwrap()) as usize;
        let mut seen = Vec::new();
        for i in 0..want.len() {
            let p = u64::from_le_bytes(at(xsdt)[36 + 8 * i..44 + 8 * i].try_into().unwrap()) - base;
            let sig = &at(p)[..4];
            assert_eq!(sum(&at(p)[..len(p)]), 0, "{}", String::from_utf8_lossy(sig));
            seen.push(sig.to_vec());
            if sig == b"FACP" {
                let dsdt = u64::from_le_bytes(at(p)[140..148].try_into().unwrap()) - base;
                assert_eq!(&at(dsdt)[..4], b"DSDT");
                assert_eq!(sum(&at(dsdt)[..len(dsdt)]), 0);
                let facs = u32::from_le_bytes(at(p)[36..40].try_into().unwrap()) as u64;
                assert_eq!((facs - base) % 64, 0);
                assert_eq!(&at(facs - base)[..4], b"FACS");
            }
        }
        let want: Vec<Vec<u8>> = want.iter().map(|w| w.to_vec()).collect();
        assert_eq!(seen, want);
        assert_eq!(len(xsdt), 36 + 8 * want.len());
    }

    #[test]
    fn loader_commands_are_128_bytes_each() {
        let t = build(&cfg());
        let l = t.loader();
        assert_eq!(l.len(), 128 * (2 + t.pointers.len() + t.checksums.len()));
        assert_eq!(&l[4..17], RSDP_FILE.as_bytes());
    }
}
