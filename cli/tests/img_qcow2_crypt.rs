//! Encrypted qcow2 (`encrypt.format=luks` and the legacy `aes`) with
//! qemu-img as the oracle, both ways: images qemu-img makes and qemu-io
//! writes (over a plain backing file too, so copy-on-write data is
//! encrypted on the way) read the same through strata-img, with the same
//! `info`; images strata-img makes (create and convert) open in qemu-img
//! with the same secret, check clean, and hold what strata-img wrote;
//! `measure` agrees; bad input fails in one line.

mod support;

use std::process::Output;
use support::img::{q_ok, run, s_ok, strata, Dir};

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const SECRET: &str = "secret,id=sec0,data=correct horse";

/// The image as `json:` options unlocked by `sec0` (dotted, as QEMU
/// accepts them in `json:` names).
fn opened(path: &str) -> String {
    format!(
        "json:{{\"driver\":\"qcow2\",\"encrypt.key-secret\":\"sec0\",\"file.driver\":\"file\",\"file.filename\":\"{path}\"}}"
    )
}

/// qemu-io on the unlocked image.
fn qemu_io(path: &str, cmds: &[&str]) {
    let mut a = vec!["--object", SECRET, "--image-opts"];
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    let o = format!("driver=qcow2,encrypt.key-secret=sec0,file.filename={path}");
    a.push(&o);
    let r = run("qemu-io", &a);
    assert!(r.status.success(), "qemu-io {cmds:?}: {}", err(&r));
}

/// The guest view of `path` as strata-img and as qemu-img read it.
fn raw_by_both(d: &Dir, path: &str) -> (Vec<u8>, Vec<u8>) {
    let (ours, theirs) = (d.p("ours.raw"), d.p("theirs.raw"));
    s_ok(&[
        "convert",
        "--object",
        SECRET,
        "-O",
        "raw",
        &opened(path),
        &ours,
    ]);
    q_ok(&[
        "convert",
        "--object",
        SECRET,
        "-O",
        "raw",
        &opened(path),
        &theirs,
    ]);
    (std::fs::read(ours).unwrap(), std::fs::read(theirs).unwrap())
}

fn qemu_check(path: &str) {
    let o = format!("driver=qcow2,encrypt.key-secret=sec0,file.filename={path}");
    let out = q_ok(&["check", "--object", SECRET, "--image-opts", &o]);
    assert!(out.contains("No errors were found"), "{out}");
}

#[test]
fn images_qemu_img_makes_read_the_same() {
    let d = Dir::new("qcow2crypt", "theirs");
    for (i, opts) in [
        "encrypt.format=luks,encrypt.iter-time=10",
        "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
        "encrypt.format=luks,encrypt.iter-time=10,compat=0.10,cluster_size=4096",
        "encrypt.format=aes",
    ]
    .iter()
    .enumerate()
    {
        let img = d.p(&format!("q{i}.qcow2"));
        let o = format!("encrypt.key-secret=sec0,{opts}");
        q_ok(&[
            "create", "-q", "-f", "qcow2", "--object", SECRET, "-o", &o, &img, "8M",
        ]);
        qemu_io(
            &img,
            &[
                "write -P 0x5a 0 64k",
                "write -P 0xa5 3M 1536",
                "write -P 0x11 8380416 8k",
                "write -z 1M 64k",
            ],
        );
        let (ours, theirs) = raw_by_both(&d, &img);
        assert!(ours == theirs, "{opts}");
        assert!(ours[..65536].iter().all(|&b| b == 0x5a));
        assert!(ours[3 << 20..(3 << 20) + 1536].iter().all(|&b| b == 0xa5));
        assert_eq!(s_ok(&["info", &img]), q_ok(&["info", &img]), "{opts}");
        assert_eq!(
            s_ok(&["info", "--output=json", &img]),
            q_ok(&["info", "--output=json", &img]),
            "{opts}"
        );
        // The data on the host is not the plaintext.
        let file = std::fs::read(&img).unwrap();
        assert!(!file.windows(4096).any(|w| w.iter().all(|&b| b == 0x5a)));
    }
}

#[test]
fn copy_on_write_from_a_plain_backing_file_is_encrypted() {
    let d = Dir::new("qcow2crypt", "cow");
    let base = d.p("base.raw");
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i / 512) as u8 ^ 0x3c).collect();
    std::fs::write(&base, &data).unwrap();
    // qemu-io writes part of clusters of an encrypted overlay: the rest
    // of each cluster is copied from the backing file and encrypted.
    let top = d.p("top.qcow2");
    q_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        SECRET,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "-b",
        &base,
        "-F",
        "raw",
        &top,
        "4M",
    ]);
    qemu_io(&top, &["write -P 0x77 70000 5000"]);
    let (ours, theirs) = raw_by_both(&d, &top);
    assert!(ours == theirs);
    // strata-img writes into another overlay at sector granularity
    // inside clusters; qemu-img reads back the same.
    let top2 = d.p("top2.qcow2");
    s_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        SECRET,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "-b",
        &base,
        "-F",
        "raw",
        &top2,
        "4M",
    ]);
    // One unaligned write (not whole sectors: read-modify-write below
    // the cipher) through strata-img's block layer.
    s_ok(&[
        "bench",
        "--object",
        SECRET,
        "-w",
        "-q",
        "-c",
        "1",
        "-d",
        "1",
        "-o",
        "70000",
        "-s",
        "5000",
        "--pattern",
        "119",
        &opened(&top2),
    ]);
    let (ours2, theirs2) = raw_by_both(&d, &top2);
    assert!(ours2 == theirs2);
    assert!(
        ours2 == ours,
        "strata-img's copy-on-write matches qemu-io's"
    );
    qemu_check(&top2);
}

#[test]
fn images_strata_img_makes_open_in_qemu_img() {
    let d = Dir::new("qcow2crypt", "ours");
    let src = d.p("src.raw");
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i / 4096) as u8 ^ (i as u8))
        .collect();
    std::fs::write(&src, &data).unwrap();
    for (i, opts) in [
        "encrypt.format=luks,encrypt.iter-time=10",
        "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
        "encrypt.format=aes",
        "encryption=on",
    ]
    .iter()
    .enumerate()
    {
        let img = d.p(&format!("s{i}.qcow2"));
        let o = format!("encrypt.key-secret=sec0,{opts}");
        // The target of a convert is opened with the create's secret, as
        // qemu-img does.
        s_ok(&["convert", "--object", SECRET, "-O", "qcow2", "-o", &o, &src, &img]);
        let (ours, theirs) = raw_by_both(&d, &img);
        assert!(theirs == data, "qemu-img reads what strata-img wrote ({opts})");
        assert!(ours == data);
        qemu_check(&img);
        assert_eq!(s_ok(&["info", &img]), q_ok(&["info", &img]), "{opts}");
        let info = q_ok(&["info", &img]);
        assert!(info.contains("encrypted: yes"), "{info}");
        // And qemu-io's writes come back through strata-img.
        qemu_io(&img, &["write -P 0x33 1M 4k", "write -P 0x44 5000k 1536"]);
        let (ours, theirs) = raw_by_both(&d, &img);
        assert!(ours == theirs);
        // strata-img's own check agrees.
        let c = s_ok(&["check", "--object", SECRET, &opened(&img)]);
        assert!(c.contains("No errors were found"), "{c}");
    }
    // The create line names the options as qemu-img's does.
    let img = d.p("c.qcow2");
    let o = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";
    let ours = s_ok(&[
        "create", "-f", "qcow2", "--object", SECRET, "-o", o, &img, "1M",
    ]);
    let theirs = q_ok(&[
        "create", "-f", "qcow2", "--object", SECRET, "-o", o, &img, "1M",
    ]);
    assert_eq!(ours, theirs);
}

#[test]
fn measure_counts_the_luks_header() {
    for o in [
        "encrypt.format=luks,encrypt.key-secret=sec0",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128",
        "encrypt.format=aes,encrypt.key-secret=sec0",
    ] {
        let a = [
            "measure", "--object", SECRET, "-O", "qcow2", "-o", o, "--size", "100G",
        ];
        assert_eq!(s_ok(&a), q_ok(&a), "{o}");
    }
}

#[test]
fn bad_input_fails_in_one_line() {
    let d = Dir::new("qcow2crypt", "errors");
    let img = d.p("e.qcow2");
    q_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        SECRET,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        &img,
        "1M",
    ]);
    let out = d.p("x.raw");
    let one_line = |o: &Output, want: &str| {
        assert_eq!(o.status.code(), Some(1), "{}", err(o));
        let e = err(o);
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains(want), "{e}");
    };
    // A wrong passphrase.
    let o = strata(&[
        "convert",
        "--object",
        "secret,id=sec0,data=battery staple",
        "-O",
        "raw",
        &opened(&img),
        &out,
    ]);
    one_line(&o, "Invalid password, cannot unlock any keyslot");
    // The secret object missing: named.
    one_line(
        &strata(&["convert", "-O", "raw", &opened(&img), &out]),
        "sec0",
    );
    // No key at all.
    one_line(
        &strata(&["convert", "-O", "raw", &img, &out]),
        "Parameter 'encrypt.key-secret' is required for cipher",
    );
    // `info` needs no key.
    assert!(s_ok(&["info", &img]).contains("encrypted: yes"));
    // Compression and preallocation do not mix with encryption.
    let o = strata(&[
        "convert",
        "-c",
        "--object",
        SECRET,
        "-O",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        &opened(&img),
        &d.p("c.qcow2"),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(
        err(&o).contains("Compression and encryption"),
        "{}",
        err(&o)
    );
    one_line(
        &strata(&[
            "create",
            "-f",
            "qcow2",
            "--object",
            SECRET,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,preallocation=metadata",
            &d.p("p.qcow2"),
            "1M",
        ]),
        "Preallocation is not supported with encryption",
    );
    one_line(
        &strata(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks",
            &d.p("k.qcow2"),
            "1M",
        ]),
        "encrypt.key-secret",
    );
    one_line(
        &strata(&[
            "create",
            "-f",
            "qcow2",
            "--object",
            SECRET,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=twofish",
            &d.p("t.qcow2"),
            "1M",
        ]),
        "twofish",
    );
}
