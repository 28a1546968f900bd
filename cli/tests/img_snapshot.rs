//! Internal snapshots against qemu-img: snapshots `strata-img snapshot`
//! creates are listed and applied by qemu-img and pass `qemu-img check`;
//! snapshots qemu-img creates are applied and deleted by Strata with the
//! contents `qemu-img convert -l` shows; `snapshot -l` and `info` print the
//! list as qemu-img does.

use std::path::Path;
use std::process::{Command, Output};

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap()
}

fn strata(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_strata-img"), args)
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

fn dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("strata-img-snap-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn qemu_io(img: &str, cmds: &[&str]) {
    let mut a = vec![];
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    a.push(img);
    ok(run("qemu-io", &a), &format!("qemu-io {cmds:?}"));
}

/// The guest contents of `img` (or of its snapshot `snap`), by qemu-img.
fn contents(d: &Path, img: &str, snap: Option<&str>) -> Vec<u8> {
    let out = d.join("view.raw");
    let out = out.to_str().unwrap();
    let _ = std::fs::remove_file(out);
    let mut a = vec!["convert", "-O", "raw"];
    if let Some(s) = snap {
        a.extend(["-l", s]);
    }
    a.extend([img, out]);
    ok(run("qemu-img", &a), "qemu-img convert");
    std::fs::read(out).unwrap()
}

fn clean(img: &str, what: &str) {
    ok(
        run("qemu-img", &["check", img]),
        &format!("qemu-img check ({what})"),
    );
    ok(
        strata(&["check", img]),
        &format!("strata-img check ({what})"),
    );
}

#[test]
fn strata_snapshots_work_in_qemu_img() {
    let d = dir("strata");
    let img = d.join("a.qcow2");
    let img = img.to_str().unwrap();
    for o in [
        "compat=1.1",
        "compat=0.10",
        "cluster_size=512,refcount_bits=4",
        "cluster_size=16384,extended_l2=on",
        "lazy_refcounts=on,refcount_bits=64",
    ] {
        let _ = std::fs::remove_file(img);
        ok(
            run(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-o", o, img, "8M"],
            ),
            o,
        );
        qemu_io(img, &["write -P 0x11 0 1M", "write -P 0x12 3M 64k"]);
        let a = contents(&d, img, None);
        ok(strata(&["snapshot", "-c", "first", img]), o);
        qemu_io(img, &["write -P 0x21 512k 1M", "discard 3M 64k"]);
        let b = contents(&d, img, None);
        ok(strata(&["snapshot", "-c", "second", img]), o);
        qemu_io(
            img,
            &[
                "write -P 0x31 0 64k",
                "write -z 1M 1M",
                "write -P 0x32 6M 128k",
            ],
        );
        let c = contents(&d, img, None);
        clean(img, o);
        let l = ok(run("qemu-img", &["snapshot", "-l", img]), o);
        assert!(l.contains(" first ") && l.contains(" second "), "{o}: {l}");
        assert_eq!(l, ok(strata(&["snapshot", "-l", img]), o), "{o}: list");
        assert_eq!(contents(&d, img, Some("first")), a, "{o}: first");
        assert_eq!(contents(&d, img, Some("2")), b, "{o}: second by id");
        // qemu-img applies a Strata snapshot.
        ok(run("qemu-img", &["snapshot", "-a", "first", img]), o);
        assert_eq!(contents(&d, img, None), a, "{o}: applied by qemu-img");
        clean(img, o);
        // Strata applies, writes on top, deletes.
        ok(strata(&["snapshot", "-a", "second", img]), o);
        assert_eq!(contents(&d, img, None), b, "{o}: applied by strata");
        qemu_io(img, &["write -P 0x41 2M 256k"]);
        clean(img, o);
        ok(strata(&["snapshot", "-d", "first", img]), o);
        clean(img, o);
        assert_eq!(contents(&d, img, Some("second")), b, "{o}: second kept");
        ok(strata(&["snapshot", "-d", "2", img]), o);
        clean(img, o);
        assert_eq!(ok(strata(&["snapshot", "-l", img]), o), "");
        let _ = c;
    }
}

#[test]
fn qemu_img_snapshots_are_applied_by_strata() {
    let d = dir("qemu");
    let img = d.join("q.qcow2");
    let img = img.to_str().unwrap();
    for o in [
        "compat=1.1",
        "compat=0.10",
        "cluster_size=16384,extended_l2=on",
    ] {
        let _ = std::fs::remove_file(img);
        ok(
            run(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-o", o, img, "4M"],
            ),
            o,
        );
        qemu_io(img, &["write -P 0x51 0 1M"]);
        ok(run("qemu-img", &["snapshot", "-c", "q1", img]), o);
        qemu_io(img, &["write -P 0x52 256k 2M"]);
        ok(run("qemu-img", &["snapshot", "-c", "q2", img]), o);
        qemu_io(img, &["write -P 0x53 0 4M"]);
        let s1 = contents(&d, img, Some("q1"));
        let s2 = contents(&d, img, Some("q2"));
        ok(strata(&["snapshot", "-a", "q1", img]), o);
        assert_eq!(contents(&d, img, None), s1, "{o}: q1");
        clean(img, o);
        ok(strata(&["snapshot", "-a", "q2", img]), o);
        assert_eq!(contents(&d, img, None), s2, "{o}: q2");
        clean(img, o);
        ok(strata(&["snapshot", "-d", "q1", img]), o);
        clean(img, o);
        ok(strata(&["snapshot", "-c", "s3", img]), o);
        let l = ok(run("qemu-img", &["snapshot", "-l", img]), o);
        assert!(
            l.contains(" q2 ") && l.contains(" s3 ") && !l.contains(" q1 "),
            "{l}"
        );
        clean(img, o);
    }
    // Compressed clusters (shared by several L2 entries' host cluster).
    let raw = d.join("c.raw");
    let data: Vec<u8> = (0..2u32 << 20).map(|i| ((i / 4096) % 7) as u8).collect();
    std::fs::write(&raw, &data).unwrap();
    let _ = std::fs::remove_file(img);
    ok(
        run(
            "qemu-img",
            &["convert", "-c", "-O", "qcow2", raw.to_str().unwrap(), img],
        ),
        "convert -c",
    );
    ok(strata(&["snapshot", "-c", "packed", img]), "compressed");
    qemu_io(img, &["write -P 0x61 0 1M", "write -P 0x62 1M 64k"]);
    clean(img, "compressed");
    ok(strata(&["snapshot", "-a", "packed", img]), "compressed");
    assert_eq!(contents(&d, img, None), data, "compressed");
    clean(img, "compressed");
    ok(strata(&["snapshot", "-d", "packed", img]), "compressed");
    clean(img, "compressed");
    assert_eq!(contents(&d, img, None), data, "compressed");
}

#[test]
fn list_info_and_errors_match_qemu_img() {
    let d = dir("list");
    let img = d.join("l.qcow2");
    let img = img.to_str().unwrap();
    ok(
        run("qemu-img", &["create", "-q", "-f", "qcow2", img, "1M"]),
        "create",
    );
    ok(run("qemu-img", &["snapshot", "-c", "by qemu", img]), "snap");
    ok(
        strata(&["snapshot", "-c", "by strata with a long name", img]),
        "snap",
    );
    assert_eq!(
        ok(strata(&["snapshot", "-l", img]), "list"),
        ok(run("qemu-img", &["snapshot", "-l", img]), "list")
    );
    assert_eq!(
        ok(strata(&["info", img]), "info"),
        ok(run("qemu-img", &["info", img]), "info")
    );
    let j = |o: String| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&o).unwrap()["snapshots"].clone()
    };
    assert_eq!(
        j(ok(strata(&["info", "--output=json", img]), "json")),
        j(ok(run("qemu-img", &["info", "--output=json", img]), "json"))
    );
    let e = strata(&["snapshot", "-a", "nope", img]);
    assert_eq!(e.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&e.stderr);
    assert!(
        msg.contains("Could not apply snapshot 'nope'") && msg.lines().count() == 1,
        "{msg}"
    );
    let e = strata(&["snapshot", "-d", "nope", img]);
    assert_eq!(
        String::from_utf8_lossy(&e.stderr).trim(),
        "strata-img: Could not delete snapshot 'nope': snapshot not found"
    );
    let e = strata(&["snapshot", "-l", "-c", "x", img]);
    assert_eq!(e.status.code(), Some(1));
    // A raw image has no snapshots.
    let raw = d.join("r.raw");
    std::fs::write(&raw, vec![0u8; 65536]).unwrap();
    let e = strata(&["snapshot", "-c", "x", raw.to_str().unwrap()]);
    assert_eq!(e.status.code(), Some(1));
    assert_eq!(std::fs::read(&raw).unwrap(), vec![0u8; 65536]);
}
