//! ACPI and MP tables as a guest finds them. Under qtest (no KVM) a direct
//! boot lays them out in guest memory; the test finds the RSDP the way an
//! OS does (scanning 0xe0000-0xfffff), walks RSDT/XSDT to every table,
//! verifies every checksum, disassembles the DSDT with `iasl -d` and
//! recompiles it, and checks the `_PRT` against the PIIX routing SeaBIOS
//! programs. Under KVM, SeaBIOS's debug log shows it installing Strata's
//! tables from etc/table-loader.

mod support;

use std::process::Command;
use std::time::Duration;

use support::qtest::Qtest;
use support::{kernels, kvm_available, require_bios, scratch};

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Reads a table at `addr` whole (its length is at offset 4).
fn table(q: &mut Qtest, addr: u64) -> Vec<u8> {
    let head = q.memread(addr, 8);
    let len = u32_at(&head, 4) as usize;
    assert!(
        (36..1 << 20).contains(&len) || &head[..4] == b"FACS",
        "table at {addr:#x}: length {len}"
    );
    q.memread(addr, len)
}

fn iasl() -> &'static str {
    assert!(
        Command::new("iasl").arg("-v").output().is_ok(),
        "iasl is missing: install the Debian package acpica-tools (make test does)"
    );
    "iasl"
}

#[test]
fn tables_checksum_and_dsdt_round_trips_through_iasl() {
    let k = kernels::path("testkernel-pvh.elf");
    let mut q = Qtest::start(&["-smp", "3", "-m", "256", "-kernel", &k]);
    let bios = q.memread(0xe0000, 0x20000);
    let rsdp_off = (0..bios.len())
        .step_by(16)
        .find(|&o| &bios[o..o + 8] == b"RSD PTR ")
        .expect("RSDP in the BIOS area");
    let rsdp = &bios[rsdp_off..rsdp_off + 36];
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
    assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
    assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
    let rsdt = table(&mut q, u32_at(rsdp, 16) as u64);
    let xsdt = table(&mut q, u64_at(rsdp, 24));
    assert_eq!(&rsdt[..4], b"RSDT");
    assert_eq!(&xsdt[..4], b"XSDT");
    assert_eq!(sum(&rsdt), 0);
    assert_eq!(sum(&xsdt), 0);
    let via_rsdt: Vec<u64> = (36..rsdt.len())
        .step_by(4)
        .map(|o| u32_at(&rsdt, o) as u64)
        .collect();
    let via_xsdt: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|o| u64_at(&xsdt, o))
        .collect();
    assert_eq!(via_rsdt, via_xsdt);
    let mut sigs = Vec::new();
    let mut dsdt = Vec::new();
    let mut madt = Vec::new();
    let mut fadt = Vec::new();
    for a in via_xsdt {
        let t = table(&mut q, a);
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(&t[..4]));
        sigs.push(String::from_utf8_lossy(&t[..4]).into_owned());
        match &t[..4] {
            b"FACP" => fadt = t,
            b"APIC" => madt = t,
            _ => {}
        }
    }
    assert_eq!(sigs, ["FACP", "APIC"]);
    // FADT: FACS and DSDT pointers, PM blocks at PMBASE 0x600, SCI 9.
    assert_eq!(fadt[8], 6, "FADT revision");
    let facs = q.memread(u32_at(&fadt, 36) as u64, 64);
    assert_eq!(&facs[..4], b"FACS");
    assert_eq!(u32_at(&fadt, 36) % 64, 0, "FACS alignment");
    let dsdt_addr = u64_at(&fadt, 140);
    assert_eq!(dsdt_addr, u32_at(&fadt, 40) as u64);
    dsdt.extend(table(&mut q, dsdt_addr));
    assert_eq!(&dsdt[..4], b"DSDT");
    assert_eq!(sum(&dsdt), 0, "DSDT checksum");
    assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 9);
    assert_eq!(
        [u32_at(&fadt, 56), u32_at(&fadt, 64), u32_at(&fadt, 76)],
        [0x600, 0x604, 0x608]
    );
    assert_eq!(u64_at(&fadt, 120), 0xcf9, "reset register");
    // The chipset really decodes the PM timer there (the direct-boot path
    // programs PMBASE as SeaBIOS would), and it counts.
    let t0 = q.inl(0x608);
    q.clock_step(1_000_000);
    let t1 = q.inl(0x608);
    assert_eq!(t1.wrapping_sub(t0) & 0xff_ffff, 3579, "PM timer at 0x608");
    // MADT: one LAPIC per CPU, the IOAPIC, IRQ0 -> GSI 2.
    let mut lapics = 0;
    let mut isos = Vec::new();
    let mut o = 44;
    while o < madt.len() {
        match madt[o] {
            0 => lapics += 1,
            1 => assert_eq!(u32_at(&madt, o + 4), 0xfec0_0000),
            2 => isos.push((madt[o + 3], u32_at(&madt, o + 4))),
            _ => {}
        }
        o += madt[o + 1] as usize;
    }
    assert_eq!(lapics, 3);
    assert!(isos.contains(&(0, 2)), "{isos:?}");
    assert!(isos.contains(&(9, 9)), "{isos:?}");

    // MP table for acpi=off guests.
    let mp = (0..bios.len())
        .step_by(16)
        .find(|&o| &bios[o..o + 4] == b"_MP_")
        .expect("MP floating pointer");
    assert_eq!(sum(&bios[mp..mp + 16]), 0);
    let cfg = u32_at(&bios, mp + 4) as usize - 0xe0000;
    let len = u16::from_le_bytes([bios[cfg + 4], bios[cfg + 5]]) as usize;
    assert_eq!(&bios[cfg..cfg + 4], b"PCMP");
    assert_eq!(sum(&bios[cfg..cfg + len]), 0);

    // iasl: disassemble, then recompile, without errors.
    let dir = scratch("acpi-iasl");
    std::fs::write(dir.join("dsdt.aml"), &dsdt).unwrap();
    let out = Command::new(iasl())
        .current_dir(&dir)
        .args(["-d", "dsdt.aml"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "iasl -d failed:\n{text}");
    let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
    assert!(!dsl.contains("Incorrect checksum"), "{dsl}");
    let out = Command::new("iasl")
        .current_dir(&dir)
        .arg("dsdt.dsl")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "recompiling the DSDT failed:\n{text}");
    assert!(text.contains("Compilation successful. 0 Errors"), "{text}");
    for dev in [
        "PNP0A03", "PNP0B00", "PNP0303", "PNP0F13", "PNP0501", "PNP0C0F",
    ] {
        assert!(dsl.contains(dev), "{dev} missing from the DSDT");
    }
    // No floppy drive configured: no floppy controller described.
    assert!(!dsl.contains("PNP0700"), "FDC without a floppy");
    assert!(dsl.contains("Name (\\_S5, Package"), "_S5 missing");

    // _PRT: each (slot, pin) names the link SeaBIOS's PIIX swizzle picks;
    // each link's IRQ (after SeaBIOS's PIRQ programming, A-D = 10,10,11,11)
    // is the one the MP table and firmware use.
    let prt = prt_entries(&dsl);
    assert_eq!(prt.len(), 124);
    for (slot, pin, link) in prt {
        let want = if slot == 1 && pin == 0 {
            "LNKS".to_string()
        } else {
            format!("LNK{}", (b'A' + ((slot - 1 + pin) & 3) as u8) as char)
        };
        assert_eq!(link, want, "slot {slot} pin {pin}");
        let irq = match link.as_bytes()[3] {
            b'S' => 9,
            l => [10, 10, 11, 11][(l - b'A') as usize],
        };
        assert_eq!(irq, vmm::mptable::pci_irq(slot as u8, pin as u8));
    }
    // The PIRQ registers the link methods read hold those routes.
    for (i, irq) in [10u8, 10, 11, 11].iter().enumerate() {
        assert_eq!(q.pci_read8(1, 0, 0x60 + i as u8), *irq);
    }
}

/// The q35 tables under direct boot: MCFG joins FADT and MADT; the FADT's
/// GPE0 is the ICH9 block at PMBASE+0x20; the chipset decodes what they
/// say (PM timer at 0x608, ECAM at the MCFG's base); the DSDT (PNP0A08,
/// `_PRT` entries naming GSI 16-23 directly) round-trips through iasl.
#[test]
fn q35_tables_describe_the_ich9_and_the_ecam_window() {
    let k = kernels::path("testkernel-pvh.elf");
    let mut q = Qtest::start_machine("q35", &["-m", "256", "-kernel", &k], &[]);
    let bios = q.memread(0xe0000, 0x20000);
    let rsdp_off = (0..bios.len())
        .step_by(16)
        .find(|&o| &bios[o..o + 8] == b"RSD PTR ")
        .expect("RSDP in the BIOS area");
    let xsdt = table(&mut q, u64_at(&bios[rsdp_off..], 24));
    let mut sigs = Vec::new();
    let (mut fadt, mut mcfg) = (Vec::new(), Vec::new());
    for o in (36..xsdt.len()).step_by(8) {
        let t = table(&mut q, u64_at(&xsdt, o));
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(&t[..4]));
        sigs.push(String::from_utf8_lossy(&t[..4]).into_owned());
        match &t[..4] {
            b"FACP" => fadt = t,
            b"MCFG" => mcfg = t,
            _ => {}
        }
    }
    assert_eq!(sigs, ["FACP", "APIC", "MCFG"]);
    assert_eq!((u32_at(&fadt, 80), fadt[92]), (0x620, 16), "GPE0 block");
    let t0 = q.inl(0x608);
    q.clock_step(1_000_000);
    assert_eq!(q.inl(0x608).wrapping_sub(t0) & 0xff_ffff, 3579, "PM timer");
    let ecam = u64_at(&mcfg, 44);
    assert_eq!((ecam, mcfg[54], mcfg[55]), (0xb000_0000, 0, 255));
    // 00:1f.2 through ECAM: bus 0, device 31, function 2.
    assert_eq!(q.readl(ecam + (0x1f << 15 | 2 << 12)), 0x2922_8086);
    let dsdt = table(&mut q, u64_at(&fadt, 140));
    let dir = scratch("acpi-iasl-q35");
    std::fs::write(dir.join("dsdt.aml"), &dsdt).unwrap();
    let out = Command::new(iasl())
        .current_dir(&dir)
        .args(["-d", "dsdt.aml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "iasl -d failed");
    let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
    let out = Command::new("iasl")
        .current_dir(&dir)
        .arg("dsdt.dsl")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Compilation successful. 0 Errors"), "{text}");
    for dev in ["PNP0A08", "PNP0A03", "PNP0C02", "PNP0B00", "PNP0501"] {
        assert!(dsl.contains(dev), "{dev} missing from the DSDT");
    }
    assert!(!dsl.contains("PNP0C0F"), "no link devices on q35");
    // Each _PRT entry: (slot << 16 | 0xffff, pin, Zero, GSI).
    let start = dsl.find("Name (_PRT").expect("_PRT");
    let nums: Vec<u64> = dsl[start..]
        .split("Package (0x04)")
        .skip(1)
        .take(124)
        .map(|pkg| {
            pkg.split(['{', '}', ',', '\n'])
                .map(str::trim)
                .filter(|s| !s.is_empty() && !s.starts_with("//"))
                .take(4)
                .map(|v| match v {
                    "Zero" => 0,
                    "One" => 1,
                    v => u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap(),
                })
                .collect::<Vec<u64>>()
        })
        .flat_map(|v| {
            let slot = (v[0] >> 16) as u8;
            let pin = v[1] as u8;
            assert_eq!(v[2], 0, "a GSI, not a link");
            let gsi = 16 + devices::chipset::pirq::ich9_swizzle(slot, pin + 1) as u64;
            assert_eq!(v[3], gsi, "slot {slot} pin {pin}");
            [v[3]]
        })
        .collect();
    assert_eq!(nums.len(), 124);
}

/// (slot, pin, link) from the disassembled `_PRT`.
fn prt_entries(dsl: &str) -> Vec<(u64, u64, String)> {
    let start = dsl.find("Name (_PRT").expect("_PRT");
    let body = &dsl[start..];
    let mut out = Vec::new();
    let mut it = body.split("Package (0x04)").skip(1);
    for pkg in it.by_ref() {
        let vals: Vec<&str> = pkg
            .split(['{', '}', ',', '\n'])
            .map(str::trim)
            .filter(|s| !s.is_empty() && !s.starts_with("//"))
            .take(3)
            .collect();
        if vals.len() < 3 {
            break;
        }
        let num = |s: &str| match s {
            "Zero" => 0,
            "One" => 1,
            s => u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap(),
        };
        out.push((num(vals[0]) >> 16, num(vals[1]), vals[2].to_string()));
        if pkg.contains(')') && pkg.contains("})") {
            break;
        }
    }
    out
}

#[test]
fn seabios_installs_strata_tables_from_the_table_loader() {
    if !kvm_available("seabios_installs_strata_tables_from_the_table_loader") {
        return;
    }
    require_bios();
    let out = support::until_seabios_log(
        "acpi-seabios",
        &["-m", "128", "-nodefaults"],
        "ACPI: parse DSDT",
        Duration::from_secs(120),
    );
    // SeaBIOS builds no tables of its own when etc/table-loader exists: the
    // FADT it finds through the XSDT and the DSDT it parses are Strata's.
    let cfg = vmm::acpi::AcpiConfig {
        cpus: 1,
        below_4g: 128 << 20,
        floppy: false,
        chipset: vmm::machine::ChipsetKind::I440fx,
    };
    let dsdt_len = vmm::acpi::dsdt(&cfg).len();
    assert!(
        out.contains("table(50434146)="),
        "FADT via the loader:\n{out}"
    );
    assert!(out.contains("(via xsdt)"), "{out}");
    assert!(
        out.contains(&format!("(len {dsdt_len})")),
        "SeaBIOS parsed a DSDT of another length than Strata's {dsdt_len}:\n{out}"
    );
}
