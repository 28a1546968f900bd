//! `-drive ...,snapshot=on`: writes land in a temporary qcow2 overlay, the
//! image (raw or qcow2) stays byte-identical, and the overlay file is
//! unlinked from $TMPDIR as soon as it is open.

use block::drive::parse_drive;
use block::graph::BlockGraph;

fn overlays(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref().is_ok_and(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("strata-snapshot")
            })
        })
        .count()
}

fn check(spec: &str, img: &std::path::Path, tmp: &std::path::Path) {
    let before = std::fs::read(img).unwrap();
    let d = parse_drive(spec).unwrap();
    assert_eq!(d.snapshot, Some(true));
    let g = BlockGraph::new();
    let be = d.open(&g).unwrap();
    assert!(!be.is_read_only());
    assert_eq!(be.len(), 4 << 20);
    let root = be.root().unwrap();
    assert_eq!(root.driver_name(), "qcow2", "the overlay is the root");
    assert!(
        root.child("backing").unwrap().is_read_only(),
        "base read-only"
    );
    assert_eq!(overlays(tmp), 0, "overlay unlinked once open");
    let mut buf = vec![0u8; 8192];
    be.read_at(65536 - 4096, &mut buf).unwrap();
    assert_eq!(buf, before_or_raw(&before, img, 65536 - 4096, 8192));
    be.write_at(65536 - 4096, &[0xab; 8192]).unwrap();
    be.write_zeroes(1 << 20, 1 << 20, true).unwrap();
    be.flush().unwrap();
    be.read_at(65536 - 4096, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xab));
    let mut z = vec![1u8; 4096];
    be.read_at(1 << 20, &mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    // The rest still reads from the base.
    let mut r = vec![0u8; 4096];
    be.read_at(3 << 20, &mut r).unwrap();
    assert_eq!(r, before_or_raw(&before, img, 3 << 20, 4096));
    drop(root);
    drop(be);
    drop(g);
    assert!(
        std::fs::read(img).unwrap() == before,
        "{spec}: the image changed"
    );
}

/// The guest-visible bytes of the base: the file itself when raw, else
/// qemu-img's view of it.
fn before_or_raw(before: &[u8], img: &std::path::Path, off: usize, len: usize) -> Vec<u8> {
    if img.extension().is_some_and(|e| e == "qcow2") {
        let out = img.with_extension("raw-view");
        let ok = std::process::Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(img)
            .arg(&out)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        std::fs::read(&out).unwrap()[off..off + len].to_vec()
    } else {
        before[off..off + len].to_vec()
    }
}

#[test]
fn snapshot_on_writes_to_a_temporary_overlay() {
    let dir = std::env::temp_dir().join(format!("strata-snapov-{}", std::process::id()));
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    // The only test in this binary: setting the environment is safe.
    std::env::set_var("TMPDIR", &tmp);
    let raw = dir.join("base.img");
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&raw, &data).unwrap();
    check(
        &format!("file={},format=raw,if=none,snapshot=on", raw.display()),
        &raw,
        &tmp,
    );
    check(
        &format!("file={},if=none,snapshot=on", raw.display()),
        &raw,
        &tmp,
    );
    let q2 = dir.join("base.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&q2)
        .status()
        .is_ok_and(|s| s.success());
    if made {
        check(
            &format!("file={},format=qcow2,if=none,snapshot=on", q2.display()),
            &q2,
            &tmp,
        );
        let out = std::process::Command::new("qemu-img")
            .args(["check"])
            .arg(&q2)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // snapshot=off and read-only drives open the image directly.
    let d = parse_drive(&format!(
        "file={},format=raw,if=none,snapshot=off",
        raw.display()
    ))
    .unwrap();
    let g = BlockGraph::new();
    assert_eq!(d.open(&g).unwrap().root().unwrap().driver_name(), "raw");
    let _ = std::fs::remove_dir_all(&dir);
}
