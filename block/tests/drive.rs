//! `-drive` desugaring against the examples of QEMU's documentation.

use block::backend::ErrorAction;
use block::drive::{parse_drive, DriveTable, Interface, Media};
use block::keyval::Value;

fn s(v: &str) -> Value {
    Value::Str(v.into())
}

type Want = (&'static str, Interface, u32, u32, Media);

#[test]
fn qemu_doc_examples() {
    // (drives given in order, expected (id, if, bus, unit, media))
    let table: &[(&[&str], &[Want])] = &[
        (
            &["file=f,index=0,media=disk"],
            &[("ide0-hd0", Interface::Ide, 0, 0, Media::Disk)],
        ),
        (
            &["file=f,index=2,media=cdrom"],
            &[("ide1-cd0", Interface::Ide, 1, 0, Media::Cdrom)],
        ),
        (
            &["file=f,index=3,media=disk"],
            &[("ide1-hd1", Interface::Ide, 1, 1, Media::Disk)],
        ),
        (
            &["file=f,index=0,if=floppy"],
            &[("floppy0", Interface::Floppy, 0, 0, Media::Disk)],
        ),
        (
            &["file=f,if=scsi,bus=0,unit=6"],
            &[("scsi0-hd6", Interface::Scsi, 0, 6, Media::Disk)],
        ),
        (
            &["file=f,if=virtio"],
            &[("virtio0", Interface::Virtio, 0, 0, Media::Disk)],
        ),
        (
            &["file=f,if=pflash,format=raw"],
            &[("pflash0", Interface::Pflash, 0, 0, Media::Disk)],
        ),
        (
            &["file=f,if=sd"],
            &[("sd0", Interface::Sd, 0, 0, Media::Disk)],
        ),
        (
            &["file=a", "file=b", "file=c"],
            &[
                ("ide0-hd0", Interface::Ide, 0, 0, Media::Disk),
                ("ide0-hd1", Interface::Ide, 0, 1, Media::Disk),
                // Past the bus's last unit, the next bus (QEMU's
                // drive_new; qemu-system-x86_64 names it ide1-hd0).
                ("ide1-hd0", Interface::Ide, 1, 0, Media::Disk),
            ],
        ),
    ];
    for (drives, want) in table {
        let mut t = DriveTable::new();
        for (d, w) in drives.iter().zip(want.iter()) {
            match t.parse_drive(d) {
                Ok(spec) => {
                    let dev = spec.device.clone().unwrap();
                    assert_eq!(
                        (
                            spec.id.as_str(),
                            dev.interface,
                            dev.bus,
                            dev.unit,
                            dev.media,
                        ),
                        *w,
                        "{d}"
                    );
                }
                Err(e) => panic!("{d}: {e}"),
            }
        }
    }
}

#[test]
fn sugar_options() {
    let mut t = DriveTable::new();
    let hda = t.hd(0, "a.img").unwrap();
    assert_eq!(hda.id, "ide0-hd0");
    let cd = t.cdrom("x,y.iso").unwrap();
    assert_eq!(cd.id, "ide1-cd0");
    assert!(cd.backend.read_only, "media=cdrom implies read-only");
    let file = match &cd.node.as_ref().unwrap()["file"] {
        Value::Map(m) => m["filename"].clone(),
        v => panic!("{v:?}"),
    };
    assert_eq!(file, s("x,y.iso"), ",, escaping survives the sugar");
    let fda = t.fd(0, "f.img").unwrap();
    assert_eq!(fda.id, "floppy0");
    assert!(t.hd(0, "b.img").is_err(), "index 0 used twice");
}

#[test]
fn issue_example_and_cache_table() {
    let spec =
        parse_drive("file=disk.img,format=raw,if=none,id=d0,cache=none,aio=io_uring,discard=unmap")
            .unwrap();
    assert_eq!(spec.id, "d0");
    assert!(spec.device.is_none());
    assert!(!spec.probe);
    let n = spec.node.unwrap();
    assert_eq!(n["driver"], s("raw"));
    assert_eq!(n["discard"], s("unmap"));
    let Value::Map(file) = &n["file"] else {
        panic!()
    };
    assert_eq!(file["driver"], s("file"));
    assert_eq!(file["filename"], s("disk.img"));
    assert_eq!(file["aio"], s("io_uring"));
    let Value::Map(cache) = &n["cache"] else {
        panic!()
    };
    assert_eq!(cache["direct"], s("on"));
    assert_eq!(cache["no-flush"], s("off"));
    assert!(spec.backend.write_cache);

    // DESIGN.md table: (mode, direct, wce, no-flush)
    for (mode, direct, wce, no_flush) in [
        ("writeback", "off", true, "off"),
        ("none", "on", true, "off"),
        ("writethrough", "off", false, "off"),
        ("directsync", "on", false, "off"),
        ("unsafe", "off", true, "on"),
    ] {
        let spec = parse_drive(&format!("file=d.img,if=none,cache={mode}")).unwrap();
        let n = spec.node.unwrap();
        let Value::Map(cache) = &n["cache"] else {
            panic!()
        };
        assert_eq!(cache["direct"], s(direct), "{mode}");
        assert_eq!(cache["no-flush"], s(no_flush), "{mode}");
        assert_eq!(spec.backend.write_cache, wce, "{mode}");
    }
}

#[test]
fn other_keys() {
    let spec = parse_drive(
        "file=d.img,if=virtio,serial=S123,addr=05.0,werror=stop,rerror=ignore,readonly=on,detect-zeroes=on,node-name=n1,file.locking=off,id=v",
    )
    .unwrap();
    let dev = spec.device.unwrap();
    assert_eq!(dev.serial.as_deref(), Some("S123"));
    assert_eq!(dev.addr.as_deref(), Some("05.0"));
    assert_eq!(spec.backend.werror, ErrorAction::Stop);
    assert_eq!(spec.backend.rerror, ErrorAction::Ignore);
    assert!(spec.backend.read_only);
    let n = spec.node.unwrap();
    assert_eq!(n["read-only"], s("on"));
    assert_eq!(n["node-name"], s("n1"));
    assert_eq!(n["detect-zeroes"], s("on"));
    let Value::Map(file) = &n["file"] else {
        panic!()
    };
    assert_eq!(file["locking"], s("off"));
    assert_eq!(file["filename"], s("d.img"));
    // Bare flag form (QemuOpts): readonly alone means on.
    assert!(
        parse_drive("file=d.img,readonly")
            .unwrap()
            .backend
            .read_only
    );
    // An empty CD-ROM drive has no node.
    let e = parse_drive("if=ide,index=1,media=cdrom").unwrap();
    assert!(e.node.is_none());
    assert_eq!(e.id, "ide0-cd1");
}

#[test]
fn errors_are_one_line() {
    for (d, want) in [
        ("file=x,if=bogus", "-drive: parameter 'if' expects one of none, ide, scsi, floppy, virtio, sd, pflash, mtd, got 'bogus'"),
        ("file=x,cache=sometimes", "-drive: parameter 'cache' expects one of writeback, none, writethrough, directsync, unsafe, got 'sometimes'"),
        ("file=x,rerror=enospc", "-drive: parameter 'rerror' expects one of report, ignore, stop, got 'enospc'"),
        ("file=x,media=tape", "-drive: parameter 'media' expects 'disk' or 'cdrom', got 'tape'"),
        ("file=x,index=1,unit=1", "-drive: index cannot be used with bus and unit"),
        ("file=x,readonly=perhaps", "-drive: parameter 'readonly' expects 'on' or 'off', got 'perhaps'"),
        ("file=x,snapshot=maybe", "-drive: parameter 'snapshot' expects 'on' or 'off', got 'maybe'"),
        ("file=x,id=0bad", "-drive: Parameter 'id' expects an identifier (letters, digits, '-', '.', '_', starting with a letter), got '0bad'"),
    ] {
        let e = parse_drive(d).unwrap_err().to_string();
        assert_eq!(e, want, "{d}");
    }
    let mut t = DriveTable::new();
    t.parse_drive("file=a,id=x,if=none").unwrap();
    assert_eq!(
        t.parse_drive("file=b,id=x,if=none")
            .unwrap_err()
            .to_string(),
        "-drive: Duplicate ID 'x' for drive"
    );
}
