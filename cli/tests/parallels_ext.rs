//! Parallels' format extension: the dirty bitmaps it stores are loaded
//! when the image is opened and listed by QMP (`query-named-block-nodes`'
//! `dirty-bitmaps`) as qemu-storage-daemon lists them for the same
//! image: name (the bitmap's id), granularity, dirty count, recording,
//! not persistent. A bad checksum or an unknown feature fails the open
//! in one line, as in QEMU.

mod support;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::qmp::Qmp;
use support::qtest::Qtest;

const CS: usize = 65536;
const ID: [u8; 16] = *b"\x12\x34\x56\x78\x12\x34\x56\x78\x12\x34\x56\x78\x12\x34\x56\x78";

fn le64(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

/// A 4 MiB parallels image (64 KiB clusters, first cluster written by
/// qemu-io) with a format extension holding one dirty bitmap of 64 KiB
/// granularity whose bits 0, 2 and 63 are set; `feature` replaces the
/// bitmap feature's magic, `bad_sum` spoils the checksum.
fn image(dir: &Path, name: &str, feature: u64, bad_sum: bool) -> String {
    use md5::{Digest, Md5};
    let p = dir.join(name).display().to_string();
    let ok = |c: &mut Command| assert!(c.status().unwrap().success());
    ok(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "parallels",
        "-o",
        "cluster_size=64k",
        &p,
        "4M",
    ]));
    ok(Command::new("qemu-io")
        .args(["-f", "parallels", "-c", "write -P 0x11 0 64k", &p])
        .stdout(Stdio::null()));
    let mut d = std::fs::read(&p).unwrap();
    let end = d.len().div_ceil(CS) * CS;
    d.resize(end + 2 * CS, 0);
    let (ext, bm) = (end, end + CS);
    let sectors = 8192u64;
    let gran = 128u32;
    let mut feat = Vec::new();
    feat.extend(le64(sectors));
    feat.extend(ID);
    feat.extend(gran.to_le_bytes());
    feat.extend(1u32.to_le_bytes());
    feat.extend(le64((bm / 512) as u64));
    let mut body = Vec::new();
    body.extend(le64(feature));
    body.extend(le64(0));
    body.extend((feat.len() as u32).to_le_bytes());
    body.extend(0u32.to_le_bytes());
    body.extend(&feat);
    body.resize(body.len().div_ceil(8) * 8, 0);
    body.extend([0u8; 24]);
    let c = &mut d[ext..ext + CS];
    c[..8].copy_from_slice(&le64(0xab23_4cef_23dc_ea87));
    c[24..24 + body.len()].copy_from_slice(&body);
    let sum = Md5::digest(&c[24..]);
    c[8..24].copy_from_slice(&sum);
    if bad_sum {
        c[8] ^= 1;
    }
    d[bm] = 0b101;
    d[bm + 7] = 0x80;
    d[56..64].copy_from_slice(&le64((ext / 512) as u64));
    std::fs::write(&p, d).unwrap();
    p
}

/// The `dirty-bitmaps` of node `node` in a `query-named-block-nodes` answer.
fn bitmaps_of(nodes: &Value, node: &str) -> Value {
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .unwrap_or_else(|| panic!("no node {node} in {nodes}"))["dirty-bitmaps"]
        .clone()
}

/// qemu-storage-daemon's view of the image (one QMP exchange on stdio).
fn qemu_view(img: &str) -> Value {
    let mut c = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!("driver=file,filename={img},node-name=f,read-only=on"),
            "--blockdev",
            "driver=parallels,file=f,node-name=p,read-only=on",
            "--chardev",
            "stdio,id=m",
            "--monitor",
            "m",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = c.stdin.take().unwrap();
    let mut r = BufReader::new(c.stdout.take().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap(); // greeting
    writeln!(w, "{}", json!({"execute": "qmp_capabilities"})).unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    writeln!(
        w,
        "{}",
        json!({"execute": "query-named-block-nodes", "arguments": {"flat": true}})
    )
    .unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    writeln!(w, "{}", json!({"execute": "quit"})).unwrap();
    drop(w);
    let _ = c.wait();
    bitmaps_of(&v["return"], "p")
}

#[test]
fn extension_bitmaps_are_listed_as_qemu_lists_them() {
    let dir = support::scratch("parallels-ext");
    let img = image(&dir, "p.img", 0x2038_5fae_252c_b34a, false);
    let theirs = qemu_view(&img);
    let sock = dir.join("qmp.sock");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let mut qt = Qtest::start(&[
        "-qmp",
        &qmp,
        "-blockdev",
        &format!("driver=file,filename={img},node-name=f,read-only=on"),
        "-blockdev",
        "driver=parallels,file=f,node-name=p,read-only=on",
    ]);
    let mut q = Qmp::negotiated(&sock);
    let nodes = q.ok("query-named-block-nodes", json!({"flat": true}));
    let ours = bitmaps_of(&nodes, "p");
    assert_eq!(
        ours[0]["name"], "12345678-1234-5678-1234-567812345678",
        "{ours}"
    );
    assert_eq!(ours[0]["count"], 3 * 65536, "{ours}");
    for k in ["name", "granularity", "count", "recording", "persistent"] {
        assert_eq!(ours[0][k], theirs[0][k], "{k}: ours {ours} theirs {theirs}");
    }
    q.ok("quit", json!({}));
    assert!(qt.wait_exit(Duration::from_secs(30)).is_some());
    // The data reads as qemu-img reads it.
    let out = Command::new(env!("CARGO_BIN_EXE_strata-img"))
        .args(["compare", "-f", "parallels", "-F", "parallels", &img, &img])
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn corrupt_extensions_fail_the_open_in_one_line() {
    let dir = support::scratch("parallels-ext-bad");
    for (img, want) in [
        (
            image(&dir, "sum.img", 0x2038_5fae_252c_b34a, true),
            "Wrong checksum in Format Extension header",
        ),
        (
            image(&dir, "feat.img", 0x1234, false),
            "Unknown feature: 0x1234",
        ),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_strata-img"))
            .args([
                "convert",
                "-O",
                "raw",
                &img,
                &dir.join("x.raw").display().to_string(),
            ])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains(want), "{e}");
        // qemu-img refuses it too.
        let q = Command::new("qemu-img")
            .args(["info", &img])
            .output()
            .unwrap();
        assert!(!q.status.success());
    }
}
