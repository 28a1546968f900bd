//! strata-img on qcow2, with qemu-img as the oracle: images Strata creates
//! pass `qemu-img check`; `check` finds leaks and corruptions with
//! qemu-img's exit codes and repairs them; `info` shows the qcow2 data.

use std::os::unix::fs::FileExt;
use std::process::{Command, Output};

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata-img"))
        .args(args)
        .output()
        .unwrap()
}

fn qemu(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap()
}

fn dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("strata-img-q2-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn created_images_pass_qemu_check() {
    let d = dir("create");
    let base = d.join("base.qcow2");
    let base = base.to_str().unwrap();
    for o in [
        "compat=0.10",
        "compat=1.1,cluster_size=512",
        "cluster_size=2M",
        "refcount_bits=1",
        "refcount_bits=64",
        "extended_l2=on",
        "lazy_refcounts=on",
        "compression_type=zstd",
        "preallocation=metadata",
        "preallocation=full,cluster_size=4096",
        "data_file=data.raw",
    ] {
        let o2 = o.replace("data.raw", d.join("data.raw").to_str().unwrap());
        let r = strata(&["create", "-q", "-f", "qcow2", "-o", &o2, base, "16M"]);
        assert!(
            r.status.success(),
            "{o}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let c = qemu("qemu-img", &["check", base]);
        assert!(
            c.status.success(),
            "{o}: {}",
            String::from_utf8_lossy(&c.stdout)
        );
        let i = qemu("qemu-img", &["info", "--output=json", base]);
        let s = String::from_utf8_lossy(&i.stdout);
        assert!(s.contains("\"virtual-size\": 16777216"), "{o}: {s}");
        // QEMU can write into it, and it stays clean.
        let w = qemu(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 7 100000 300000", base],
        );
        assert!(w.status.success(), "{o}");
        let c = qemu("qemu-img", &["check", base]);
        assert!(
            c.status.success(),
            "{o} after qemu-io: {}",
            String::from_utf8_lossy(&c.stdout)
        );
        let r = strata(&["check", base]);
        assert_eq!(
            r.status.code(),
            Some(0),
            "{o}: {}",
            String::from_utf8_lossy(&r.stdout)
        );
    }
    // Backing file with a relative name; size taken from the backing file.
    let top = d.join("top.qcow2");
    let r = strata(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let i = qemu(
        "qemu-img",
        &["info", "--output=json", top.to_str().unwrap()],
    );
    let s = String::from_utf8_lossy(&i.stdout);
    assert!(s.contains("\"backing-filename\": \"base.qcow2\""), "{s}");
    let ours = strata(&["info", "--output=json", top.to_str().unwrap()]);
    let so = String::from_utf8_lossy(&ours.stdout);
    assert!(
        so.contains("\"backing-filename-format\": \"qcow2\""),
        "{so}"
    );
    assert!(so.contains("\"compat\": \"1.1\""), "{so}");
    let c = qemu("qemu-img", &["compare", base, top.to_str().unwrap()]);
    assert!(c.status.success());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn check_finds_and_repairs_like_qemu_img() {
    let d = dir("check");
    let p = d.join("c.qcow2");
    let p = p.to_str().unwrap();
    assert!(strata(&["create", "-q", "-f", "qcow2", p, "64M"])
        .status
        .success());
    assert!(
        qemu("qemu-io", &["-f", "qcow2", "-c", "write -P 3 0 1M", p])
            .status
            .success()
    );
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let len = f.metadata().unwrap().len();
    // A leak: one more cluster at the end with refcount 1 (16-bit entries
    // of the refcount block at 128 KiB).
    f.set_len(len + 65536).unwrap();
    let leak = len / 65536;
    f.write_all_at(&1u16.to_be_bytes(), 131072 + 2 * leak)
        .unwrap();
    let r = strata(&["check", p]);
    assert_eq!(
        r.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&r.stdout)
    );
    assert_eq!(qemu("qemu-img", &["check", p]).status.code(), Some(3));
    let r = strata(&["check", "-r", "leaks", p]);
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stdout)
    );
    assert_eq!(qemu("qemu-img", &["check", p]).status.code(), Some(0));
    // A corruption: a used data cluster with refcount 0.
    let used = leak - 1;
    f.write_all_at(&0u16.to_be_bytes(), 131072 + 2 * used)
        .unwrap();
    let r = strata(&["check", p]);
    assert_eq!(
        r.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&r.stdout)
    );
    assert_eq!(qemu("qemu-img", &["check", p]).status.code(), Some(2));
    let r = strata(&["check", "-r", "all", p]);
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(qemu("qemu-img", &["check", p]).status.code(), Some(0));
    // Raw images still say "not supported".
    let raw = d.join("r.raw");
    std::fs::write(&raw, [0u8; 512]).unwrap();
    assert_eq!(
        strata(&["check", "-f", "raw", raw.to_str().unwrap()])
            .status
            .code(),
        Some(63)
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// QEMU's test 060 case, with Strata as the writer and the repairer: an L2
/// entry pointing (COPIED) at the L1 table. A write there through
/// `strata-img bench -w` fails, naming the file, and marks the image
/// corrupt on disk; `qemu-img info` says so and a read-write open is
/// refused; `strata-img check -r all` repairs it and clears the mark, after
/// which `qemu-img check` is clean and the image is writable again.
#[test]
fn runtime_corruption_is_marked_and_repaired() {
    let d = dir("corrupt");
    let p = d.join("c.qcow2");
    let p = p.to_str().unwrap();
    assert!(qemu("qemu-img", &["create", "-q", "-f", "qcow2", p, "64M"])
        .status
        .success());
    assert!(
        qemu("qemu-io", &["-f", "qcow2", "-c", "write -P 9 0 256k", p])
            .status
            .success()
    );
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let be64 = |off: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, off).unwrap();
        u64::from_be_bytes(b)
    };
    let l1 = be64(40);
    let l2 = be64(l1) & 0x00ff_ffff_ffff_fe00;
    f.write_all_at(&(l1 | 1 << 63).to_be_bytes(), l2 + 8)
        .unwrap();
    let corrupt = || be64(72) & 2 != 0;
    let w = strata(&[
        "bench", "-w", "-q", "-f", "qcow2", "-c", "1", "-d", "1", "-o", "65536", p,
    ]);
    let err = String::from_utf8_lossy(&w.stderr);
    assert!(!w.status.success());
    assert!(
        err.contains(p) && err.contains("active L1 table") && err.trim().lines().count() == 1,
        "{err}"
    );
    assert!(corrupt());
    let info = qemu("qemu-img", &["info", p]);
    assert!(String::from_utf8_lossy(&info.stdout).contains("corrupt: true"));
    let w = strata(&["bench", "-w", "-q", "-f", "qcow2", "-c", "1", p]);
    assert!(!w.status.success());
    assert!(String::from_utf8_lossy(&w.stderr).contains("corrupt"));
    // A plain check reports the damage and changes nothing.
    assert_eq!(strata(&["check", p]).status.code(), Some(2));
    assert!(corrupt());
    let r = strata(&["check", "-r", "all", p]);
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(!corrupt(), "the repair clears the corrupt bit");
    let c = qemu("qemu-img", &["check", p]);
    assert_eq!(
        c.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&c.stdout)
    );
    let info = qemu("qemu-img", &["info", p]);
    assert!(String::from_utf8_lossy(&info.stdout).contains("corrupt: false"));
    let w = strata(&["bench", "-w", "-q", "-f", "qcow2", "-c", "1", "-o", "1M", p]);
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    let _ = std::fs::remove_dir_all(&d);
}
