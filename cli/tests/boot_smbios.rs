//! SMBIOS tables as the guest gets them. Under qtest (no KVM): the fw_cfg
//! files SeaBIOS reads (`etc/smbios/smbios-anchor` and
//! `etc/smbios/smbios-tables`), and, for direct boot, the SMBIOS 3.0 entry
//! point found by scanning 0xf0000-0xfffff as an OS does, with the table
//! it points to. Each check covers structure, checksums and the strings
//! `-smbios` set. Under KVM, SeaBIOS's debug log shows it installing
//! Strata's 3.0 tables and its console prints the UUID from them.

mod support;

use std::time::Duration;

use support::qtest::Qtest;
use support::{kernels, kvm_available, require_bios, run_strata, scratch};
use vmm::smbios::{parse, Parsed};

const UUID: &str = "12345678-9abc-def0-1122-334455667788";
/// The UUID in SMBIOS 2.6+ byte order: the first three fields reversed.
const UUID_BYTES: [u8; 16] = [
    0x78, 0x56, 0x34, 0x12, 0xbc, 0x9a, 0xf0, 0xde, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88,
];
const TYPE1: &str = "type=1,serial=SN-4242,manufacturer=Acme Corp,product=Roadrunner,version=7,uuid=12345678-9abc-def0-1122-334455667788";

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
}

fn types(s: &[Parsed]) -> Vec<u8> {
    s.iter().map(|p| p.ty).collect()
}

/// Checks the system information (type 1) against [`TYPE1`].
fn check_type1(s: &[Parsed]) {
    let t1 = s.iter().find(|p| p.ty == 1).expect("type 1");
    assert_eq!(t1.formatted.len(), 0x1b, "SMBIOS 2.4+ type 1 length");
    assert_eq!(t1.string(4), Some("Acme Corp"));
    assert_eq!(t1.string(5), Some("Roadrunner"));
    assert_eq!(t1.string(6), Some("7"));
    assert_eq!(t1.string(7), Some("SN-4242"));
    assert_eq!(&t1.formatted[8..24], &UUID_BYTES);
}

#[test]
fn fw_cfg_tables_carry_the_smbios_options() {
    require_bios();
    let mut q = Qtest::start(&["-m", "256", "-smp", "2", "-smbios", TYPE1]);
    let anchor = q
        .fw_cfg_file("etc/smbios/smbios-anchor")
        .expect("anchor file");
    let tables = q
        .fw_cfg_file("etc/smbios/smbios-tables")
        .expect("tables file");
    assert_eq!(anchor.len(), 24, "SMBIOS 3.0 entry point");
    assert_eq!(&anchor[..5], b"_SM3_");
    assert_eq!(sum(&anchor), 0, "entry point checksum");
    assert_eq!(anchor[6], 24);
    assert_eq!(
        (anchor[7], anchor[10]),
        (3, 1),
        "version 3, 3.0 entry point"
    );
    assert_eq!(
        u32::from_le_bytes(anchor[12..16].try_into().unwrap()) as usize,
        tables.len(),
        "SeaBIOS 1.16 requires the maximum size to be the file's size"
    );
    assert_eq!(
        u64::from_le_bytes(anchor[16..24].try_into().unwrap()),
        0,
        "the firmware fills in the address"
    );
    let s = parse(&tables).unwrap();
    // No type 0 unless asked: SeaBIOS adds its own, describing itself.
    assert_eq!(types(&s), [1, 3, 4, 4, 16, 17, 19, 32, 127]);
    check_type1(&s);
    let mem = s.iter().find(|p| p.ty == 16).unwrap();
    assert_eq!(
        u32::from_le_bytes(mem.formatted[7..11].try_into().unwrap()),
        256 << 10,
        "memory array capacity in KiB"
    );
    let handles: std::collections::HashSet<u16> = s.iter().map(|p| p.handle).collect();
    assert_eq!(handles.len(), s.len(), "handles are unique");
    drop(q);

    // With type 0 fields, type 0 is Strata's.
    let mut q = Qtest::start(&["-smbios", "type=0,vendor=Strata Test,version=1.2.3"]);
    let tables = q.fw_cfg_file("etc/smbios/smbios-tables").unwrap();
    let s = parse(&tables).unwrap();
    assert_eq!(s[0].ty, 0);
    assert_eq!(s[0].string(4), Some("Strata Test"));
    assert_eq!(s[0].string(5), Some("1.2.3"));
}

#[test]
fn direct_boot_has_an_smbios3_entry_point_in_the_bios_area() {
    let k = kernels::path("testkernel-pvh.elf");
    let mut q = Qtest::start(&[
        "-m",
        "128",
        "-smp",
        "3",
        "-kernel",
        &k,
        "-smbios",
        TYPE1,
        "-smbios",
        "type=11,value=hello,value=world",
    ]);
    let area = q.memread(0xf0000, 0x10000);
    let off = (0..area.len())
        .step_by(16)
        .find(|&o| &area[o..o + 5] == b"_SM3_")
        .expect("_SM3_ anchor on a 16-byte boundary in 0xf0000-0xfffff");
    let ep = &area[off..off + 24];
    assert_eq!(sum(&ep[..ep[6] as usize]), 0, "entry point checksum");
    let len = u32::from_le_bytes(ep[12..16].try_into().unwrap()) as usize;
    let addr = u64::from_le_bytes(ep[16..24].try_into().unwrap());
    assert!(
        (0xe0000..0x100000).contains(&addr),
        "tables in the reserved BIOS area: {addr:#x}"
    );
    let tables = q.memread(addr, len);
    let s = parse(&tables).unwrap();
    assert_eq!(types(&s), [0, 1, 3, 4, 4, 4, 16, 17, 19, 11, 32, 127]);
    assert_eq!(
        s[0].string(4),
        Some("Strata"),
        "no firmware: type 0 is Strata"
    );
    check_type1(&s);
    assert_eq!(s[9].strings, ["hello", "world"]);
    let cpus: Vec<_> = s.iter().filter(|p| p.ty == 4).collect();
    assert_eq!(cpus[2].string(4), Some("CPU 2"));
}

#[test]
fn bad_smbios_options_are_one_line_errors() {
    for (arg, want) in [
        (
            "type=1,colour=red",
            "-smbios type=1,colour=red: type 1 has no field 'colour'",
        ),
        ("type=1,uuid=nope", "uuid=nope: not a UUID"),
        ("type=9,x=1", "SMBIOS type 9 cannot be set"),
        ("serial=1", "missing type="),
    ] {
        let (code, _, err) = run_strata(&["-smbios", arg], Duration::from_secs(20));
        assert_eq!(code, Some(1), "{arg}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{arg}: {err}");
        assert!(err.contains(want), "{arg}: {err}");
    }
}

#[test]
fn seabios_installs_strata_smbios_tables() {
    if !kvm_available("seabios_installs_strata_smbios_tables") {
        return;
    }
    require_bios();
    let com1 = scratch("smbios-seabios").join("com1.log");
    let serial = format!("file:{}", com1.display());
    let marker = format!("Machine UUID {UUID}");
    let out = support::until_seabios_log(
        "smbios-seabios-log",
        &[
            "-m",
            "128",
            "-nodefaults",
            "-serial",
            &serial,
            "-smbios",
            TYPE1,
        ],
        &marker,
        Duration::from_secs(120),
    );
    // SeaBIOS's own tables would be 2.x ("Copying SMBIOS from"): 3.0 means
    // it took Strata's anchor, and the UUID it prints comes from type 1.
    assert!(out.contains("Copying SMBIOS 3.0 from"), "{out}");
}
