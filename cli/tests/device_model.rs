//! The device model from the command line: `-device help`, `-device
//! TYPE,help`, `-machine help`, `-global`, and one-line errors for every
//! kind of mistake a `-device` can hold.

mod support;

use std::time::Duration;

use support::run_strata;

fn ok(args: &[&str]) -> String {
    let (code, out, err) = run_strata(args, Duration::from_secs(30));
    assert_eq!(code, Some(0), "{args:?}: {err}");
    assert!(err.is_empty(), "{args:?}: {err}");
    out
}

#[test]
fn help_lists() {
    let out = ok(&["-device", "help"]);
    // QEMU's category order: USB before storage.
    assert!(out.starts_with("USB devices:\n"), "{out}");
    assert!(out.contains("\n\nStorage devices:\n"), "{out}");
    for line in [
        "name \"ide-cd\", bus IDE, desc \"virtual IDE CD-ROM\"",
        "name \"ide-hd\", bus IDE, desc \"virtual IDE disk\"",
        "name \"virtio-blk-pci\", bus PCI, alias \"virtio-blk\"",
    ] {
        assert!(out.lines().any(|l| l == line), "{line} in {out}");
    }
    assert_eq!(ok(&["-device", "?"]), out);

    let out = ok(&["-device", "ide-hd,help"]);
    assert!(out.starts_with("ide-hd options:\n"), "{out}");
    for want in [
        "  bios-chs-trans=<BiosAtaTranslation> - Logical CHS translation algorithm, auto/none/lba/large/rechs (default: \"auto\")",
        "  bootindex=<int32>",
        "  serial=<str>",
        "  unit=<uint32>            - (default: 4294967295)",
    ] {
        assert!(out.lines().any(|l| l == want), "{want} in {out}");
    }
    let mut names: Vec<&str> = out.lines().skip(1).collect();
    let sorted = {
        let mut s = names.clone();
        s.sort();
        s
    };
    assert_eq!(names, sorted, "properties sorted by name");
    names.clear();

    let out = ok(&["-device", "virtio-blk-pci,help"]);
    assert!(out.starts_with("virtio-blk-pci options:\n"), "{out}");
    for want in [
        "  num-queues=<uint16>",
        "  addr=<int32>",
        "  iothread=<str>",
        "  scsi=<bool>",
    ] {
        assert!(out.lines().any(|l| l.starts_with(want)), "{want} in {out}");
    }
    // An alias gives the same list.
    assert_eq!(ok(&["-device", "virtio-blk,help"]), out);

    let out = ok(&["-machine", "help"]);
    assert!(out.starts_with("Supported machines are:\n"), "{out}");
    assert!(out.contains("\npc                   Standard PC (i440FX + PIIX, 1996) (default)\n"));
    assert!(out.contains("\npc-i440fx-7.2 "));
    assert!(out.contains("\nnone                 empty machine\n"));
    assert_eq!(ok(&["-M", "?"]), out);
}

/// One line on stderr that mentions `want`, exit 1, no panic.
fn refused(args: &[&str], want: &str) {
    let (code, _out, err) = run_strata(args, Duration::from_secs(30));
    assert_eq!(code, Some(1), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line expected, got {err}");
    assert!(lines[0].starts_with("strata: "), "{err}");
    assert!(
        lines[0].contains(want),
        "{args:?}: {err} does not mention {want}"
    );
}

#[test]
fn mistakes_are_one_line() {
    support::require_bios();
    let dir = support::scratch("devmodel-errors");
    let img = dir.join("a.img");
    let img2 = dir.join("b.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&img2, vec![0u8; 1 << 20]).unwrap();
    let d = format!("file={},format=raw,if=none,id=d", img.display());
    let e = format!("file={},format=raw,if=none,id=e", img2.display());
    let q = ["-machine", "pc,accel=qtest", "-qtest", "stdio"];
    let with = |more: &[&'static str]| -> Vec<String> {
        q.iter()
            .map(|s| s.to_string())
            .chain([
                "-drive".to_string(),
                d.clone(),
                "-drive".to_string(),
                e.clone(),
            ])
            .chain(more.iter().map(|s| s.to_string()))
            .collect()
    };
    let run = |more: &[&'static str], want: &str| {
        let a = with(more);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        refused(&a, want);
    };
    // Unknown property, bad value: refused while parsing.
    run(
        &["-device", "ide-hd,drive=d,frob=1"],
        "-device ide-hd,drive=d,frob=1: Property 'ide-hd.frob' not found",
    );
    run(
        &["-device", "ide-hd,drive=d,unit=one"],
        "-device ide-hd,drive=d,unit=one: Parameter 'unit' expects uint32",
    );
    run(
        &["-device", "virtio-blk-pci,drive=d,config-wce=maybe"],
        "Parameter 'config-wce' expects 'on' or 'off'",
    );
    run(
        &["-device", "ide-hd,drive=d,bios-chs-trans=big"],
        "Parameter 'bios-chs-trans' does not accept value 'big'",
    );
    run(
        &["-device", "virtio-blk-pci,drive=d,addr=0x20"],
        "Property 'addr' doesn't take value '0x20'",
    );
    run(
        &["-device", "frob"],
        "'frob' is not a valid device model name",
    );
    // Wrong bus, unknown bus, full bus, occupied unit or slot.
    run(
        &["-device", "ide-hd,drive=d,bus=pci.0"],
        "-device ide-hd,drive=d,bus=pci.0: Device 'ide-hd' can't go on PCI bus",
    );
    run(
        &["-device", "virtio-blk-pci,drive=d,bus=ide.0"],
        "Device 'virtio-blk-pci' can't go on IDE bus",
    );
    run(
        &["-device", "ide-hd,drive=d,bus=ide.9"],
        "Bus 'ide.9' not found",
    );
    run(
        &[
            "-device",
            "ide-hd,drive=d,unit=0",
            "-device",
            "ide-hd,drive=e,bus=ide.0,unit=0",
        ],
        "-device ide-hd,drive=e,bus=ide.0,unit=0: IDE unit 0 is in use",
    );
    run(
        &["-device", "ide-hd,drive=d,bus=ide.1,unit=2"],
        "Can't create IDE unit 2, bus supports only 2 units",
    );
    run(
        &["-device", "virtio-blk-pci,drive=d,addr=1"],
        "PCI: slot 1 function 0 not available for virtio-blk-pci, in use by PIIX3",
    );
    run(
        &[
            "-device",
            "virtio-blk-pci,drive=d,addr=5",
            "-device",
            "virtio-blk-pci,drive=e,addr=5.0",
        ],
        "PCI: slot 5 function 0 not available for virtio-blk-pci, in use by virtio-blk-pci",
    );
    run(
        &["-device", "ide-hd,drive=d", "-device", "ide-cd,drive=d"],
        "Drive 'd' is already in use by another device",
    );
    run(
        &["-device", "ide-hd,drive=nope"],
        "Property 'drive' can't find value 'nope'",
    );
    // -global: unknown driver, unknown property, bad value.
    run(
        &["-global", "frob.x=1"],
        "-global frob.x=1: 'frob' is not a valid device model name",
    );
    run(
        &["-global", "ide-hd.frob=1"],
        "-global ide-hd.frob=1: Property 'ide-hd.frob' not found",
    );
    run(
        &["-global", "virtio-blk-pci.num-queues=lots"],
        "Parameter 'num-queues' expects uint16",
    );
    run(
        &["-global", "ide-hd"],
        "-global ide-hd: expected DRIVER.PROPERTY=VALUE",
    );
    // SCSI units: ids and LUNs past the HBA's, a LUN in use, a -drive
    // if=scsi no HBA takes.
    run(
        &[
            "-device",
            "virtio-scsi-pci,id=s",
            "-device",
            "scsi-hd,drive=d,bus=s.0,scsi-id=256",
        ],
        "bad scsi device id: 256",
    );
    run(
        &[
            "-device",
            "lsi53c895a,id=s",
            "-device",
            "scsi-hd,drive=d,bus=s.0,lun=8",
        ],
        "bad scsi device lun: 8",
    );
    run(
        &[
            "-device",
            "virtio-scsi-pci,id=s",
            "-device",
            "scsi-hd,drive=d,bus=s.0,scsi-id=1,lun=0",
            "-device",
            "scsi-hd,drive=e,bus=s.0,scsi-id=1,lun=0",
        ],
        "lun already used by 'scsi-hd'",
    );
    run(
        &["-device", "scsi-hd,drive=d"],
        "No 'SCSI' bus found for device 'scsi-hd'",
    );
    run(
        &["-device", "usb-storage,drive=d"],
        "No 'usb-bus' bus found for device 'usb-storage'",
    );
    run(
        &["-usb", "-device", "usb-storage,drive=d,port=3"],
        "usb port 3 (bus usb-bus.0) not found (in use?)",
    );
    run(
        &["-usb", "-device", "usb-storage,drive=d,port=1.2"],
        "usb port 1.2 not found (hubs are not emulated)",
    );
    run(
        &["-usb", "-device", "usb-storage"],
        "drive property not set",
    );
    run(
        &["-device", "ich9-usb-uhci1,masterbus=nowhere.0"],
        "masterbus nowhere.0 not found",
    );
    run(
        &["-global", "kvm-pit.lost_tick_policy=slew"],
        "Parameter 'lost_tick_policy' does not accept value 'slew'",
    );
}

/// libqtest starts `-machine none` for tests that need no board: RAM
/// only, nothing on the ports.
#[test]
fn machine_none_is_ram_only() {
    let mut q = support::qtest::Qtest::start(&["-machine", "none", "-m", "64"]);
    q.writel(0x1000, 0xdead_beef);
    assert_eq!(q.readl(0x1000), 0xdead_beef);
    assert_eq!(q.inb(0x70), 0xff, "no RTC");
    assert_eq!(q.inl(0xcfc), 0xffff_ffff, "no PCI");
}

/// `-machine none` has no bus: a disk on it is one line, as in QEMU.
#[test]
fn machine_none_refuses_disks() {
    let dir = support::scratch("devmodel-none");
    let img = dir.join("a.img");
    std::fs::write(&img, vec![0u8; 65536]).unwrap();
    let d = format!("file={},format=raw", img.display());
    refused(
        &["-M", "none", "-nodefaults", "-drive", &d],
        "machine type does not support if=ide,bus=0,unit=0",
    );
    refused(
        &["-M", "none", "-nodefaults", "-device", "virtio-blk-pci"],
        "No 'PCI' bus found for device 'virtio-blk-pci'",
    );
}

/// libvirt's versioned machine names select the same board.
#[test]
fn versioned_machine_names() {
    support::require_bios();
    let mut q = support::qtest::Qtest::start(&["-machine", "pc-i440fx-7.2"]);
    assert_eq!(q.pci_read32(0, 0, 0), 0x1237_8086);
}
