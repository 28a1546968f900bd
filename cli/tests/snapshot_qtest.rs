//! `-snapshot` end to end without KVM: the test plays an IDE driver through
//! the qtest protocol, writes sectors with PIO, reads them back through the
//! temporary overlay, and checks that the image file itself is unchanged
//! and that no overlay file is left behind in $TMPDIR.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::qtest::Qtest;

const PRI: u16 = 0x1f0;

fn wait_ready(q: &mut Qtest) -> u8 {
    let start = Instant::now();
    loop {
        let s = q.inb(0x3f6);
        if s & 0x80 == 0 {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "device stayed busy"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn cmd28(q: &mut Qtest, cmd: u8, lba: u32, count: u8) {
    q.outb(PRI + 6, 0xe0 | ((lba >> 24) as u8 & 0xf));
    q.outb(PRI + 2, count);
    q.outb(PRI + 3, lba as u8);
    q.outb(PRI + 4, (lba >> 8) as u8);
    q.outb(PRI + 5, (lba >> 16) as u8);
    q.outb(PRI + 7, cmd);
}

fn write_sector(q: &mut Qtest, lba: u32, data: &[u8]) {
    cmd28(q, 0x30, lba, 1);
    assert_eq!(wait_ready(q) & 0x08, 0x08, "WRITE SECTORS wants data");
    for c in data.chunks(4) {
        q.outl(PRI, u32::from_le_bytes(c.try_into().unwrap()));
    }
    let s = wait_ready(q);
    assert_eq!(s & 0x01, 0, "WRITE SECTORS failed: status {s:#x}");
}

fn read_sector(q: &mut Qtest, lba: u32) -> Vec<u8> {
    cmd28(q, 0x20, lba, 1);
    let s = wait_ready(q);
    assert_eq!(s & 0x09, 0x08, "READ SECTORS status {s:#x}");
    let mut v = Vec::new();
    for _ in 0..128 {
        v.extend_from_slice(&q.inl(PRI).to_le_bytes());
    }
    v
}

fn overlays_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("strata-snapshot"))
        .collect()
}

fn guest_writes_leave_image_unchanged(args: &[&str], img: &Path, guest: &[u8], tmp: &Path) {
    let before = std::fs::read(img).unwrap();
    {
        let mut q = Qtest::start_env(args, &[("TMPDIR", tmp.to_str().unwrap())]);
        for lba in [0u32, 7, 4095] {
            let data: Vec<u8> = (0..512).map(|i| (i as u8) ^ (lba as u8) ^ 0x5a).collect();
            assert_eq!(read_sector(&mut q, lba), guest[lba as usize * 512..][..512]);
            write_sector(&mut q, lba, &data);
            assert_eq!(
                read_sector(&mut q, lba),
                data,
                "the overlay holds the write"
            );
        }
        q.outb(PRI + 7, 0xe7); // FLUSH CACHE
        wait_ready(&mut q);
        assert!(
            overlays_in(tmp).is_empty(),
            "the overlay is unlinked at once"
        );
    }
    assert!(std::fs::read(img).unwrap() == before, "the image changed");
    assert!(overlays_in(tmp).is_empty());
}

#[test]
fn snapshot_flag_keeps_raw_and_qcow2_images_unchanged() {
    support::require_bios();
    let dir = support::scratch("snapshot-qtest");
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let raw = dir.join("base.img");
    let data: Vec<u8> = (0..4096 * 512)
        .map(|i| (i / 512) as u8 ^ (i as u8))
        .collect();
    std::fs::write(&raw, &data).unwrap();
    guest_writes_leave_image_unchanged(
        &["-snapshot", "-hda", raw.to_str().unwrap()],
        &raw,
        &data,
        &tmp,
    );
    // snapshot=on on one drive, with an explicit format.
    let d = format!(
        "file={},format=raw,if=ide,index=0,snapshot=on",
        raw.display()
    );
    guest_writes_leave_image_unchanged(&["-drive", &d], &raw, &data, &tmp);
    // A qcow2 base (made by qemu-img, if it is here).
    let q2 = dir.join("base.qcow2");
    let ok = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&q2)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        guest_writes_leave_image_unchanged(
            &["-snapshot", "-hda", q2.to_str().unwrap()],
            &q2,
            &data,
            &tmp,
        );
    }
}
