//! `strata-img` on `iscsi://` URIs against a private tgtd, with qemu-img
//! (Debian's qemu-block-extra, its iSCSI driver) as the oracle where it is
//! installed: `info`, `convert` onto an existing LUN (with and without
//! `-n`), `compare`, and a wrong CHAP password's one-line error. Skipped
//! with a note when tgtd cannot run (not root).

#[path = "../../block/tests/common/tgt.rs"]
mod tgt;

use std::process::{Command, Output};
use tgt::Tgt;

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata-img"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// qemu-img with its iSCSI driver, if installed.
fn qemu_iscsi() -> bool {
    std::path::Path::new("/usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so").exists()
        && Command::new("qemu-img").arg("--version").output().is_ok()
}

struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch() -> Scratch {
    let p = std::env::temp_dir().join(format!("strata-img-iscsi-{}", std::process::id()));
    std::fs::create_dir_all(&p).unwrap();
    Scratch(p)
}

#[test]
fn info_convert_compare() {
    if !Tgt::available() {
        eprintln!("tgtd not available (needs the tgt package and root): skipped");
        return;
    }
    let d = scratch();
    let lun = d.0.join("lun.img");
    std::fs::File::create(&lun)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let lun_s = lun.to_str().unwrap();
    let t = Tgt::start(&[lun_s], Some(("bob", "secret-pass1")), false);
    let uri = format!(
        "iscsi://bob%secret-pass1@127.0.0.1:{}/{}/1",
        t.port,
        tgt::IQN
    );

    let info = ok(strata(&["info", &uri]), "strata-img info");
    assert!(
        info.contains("virtual size: 16 MiB (16777216 bytes)"),
        "{info}"
    );
    assert!(info.contains("protocol type: iscsi"), "{info}");

    // A qcow2 image with data and zeroes, converted onto the LUN.
    let src = d.0.join("src.qcow2");
    let src_s = src.to_str().unwrap();
    let raw = d.0.join("src.raw");
    let mut data = vec![0u8; 16 << 20];
    for (i, b) in data[1 << 20..5 << 20].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7).wrapping_add(1);
    }
    std::fs::write(&raw, &data).unwrap();
    ok(
        strata(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            src_s,
        ]),
        "make qcow2",
    );
    ok(
        strata(&["convert", "-O", "raw", src_s, &uri]),
        "convert onto the LUN",
    );
    assert!(
        std::fs::read(&lun).unwrap() == data,
        "LUN content after convert"
    );
    std::fs::write(&lun, vec![0xffu8; 16 << 20]).unwrap();
    ok(
        strata(&["convert", "-n", "-O", "raw", src_s, &uri]),
        "convert -n",
    );
    assert!(
        std::fs::read(&lun).unwrap() == data,
        "LUN content after convert -n"
    );
    ok(strata(&["compare", src_s, &uri]), "strata-img compare");

    // A LUN too small for the image.
    let big = d.0.join("big.qcow2");
    ok(
        strata(&["create", "-f", "qcow2", big.to_str().unwrap(), "1G"]),
        "create",
    );
    let o = strata(&["convert", "-O", "raw", big.to_str().unwrap(), &uri]);
    assert!(!o.status.success());

    // A wrong password: one line that names the URI.
    let bad = format!("iscsi://bob%nope@127.0.0.1:{}/{}/1", t.port, tgt::IQN);
    let o = strata(&["info", &bad]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(
        e.contains("authentication failed") && e.contains(&bad),
        "{e}"
    );

    if !qemu_iscsi() {
        eprintln!("qemu-img has no iSCSI driver (qemu-block-extra): cross-checks skipped");
        return;
    }
    let q = ok(
        Command::new("qemu-img")
            .args(["info", &uri])
            .output()
            .unwrap(),
        "qemu-img info",
    );
    assert!(q.contains("virtual size: 16 MiB (16777216 bytes)"), "{q}");
    ok(
        Command::new("qemu-img")
            .args(["compare", src_s, &uri])
            .output()
            .unwrap(),
        "qemu-img compare",
    );
    // What strata-img writes, qemu-img reads back, and the other way.
    ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x6b 8M 64k", &uri])
            .output()
            .unwrap(),
        "qemu-io write",
    );
    let back = std::fs::read(&lun).unwrap();
    assert!(back[8 << 20..(8 << 20) + 65536].iter().all(|&b| b == 0x6b));
    ok(
        strata(&["compare", "-f", "raw", lun_s, &uri]),
        "compare LUN file",
    );
}
