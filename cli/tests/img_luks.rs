//! strata-img and qemu-img on the same LUKS images, both ways: images
//! qemu-img makes (XTS and CBC with ESSIV) and qemu-io writes read back
//! as qemu-img reads them, with the same `info` (human and JSON); images
//! strata-img makes open in qemu-img with the same secret and hold what
//! strata-img wrote; a wrong passphrase and a missing secret fail in one
//! line with exit code 1.

mod support;

use std::process::Output;
use support::img::{q_ok, run, s_ok, strata, Dir};

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const SECRET: &str = "secret,id=sec0,data=correct horse";

/// The image as `json:` options unlocked by `sec0`.
fn opened(path: &str) -> String {
    format!(
        "json:{{\"driver\":\"luks\",\"key-secret\":\"sec0\",\"file\":{{\"driver\":\"file\",\"filename\":\"{path}\"}}}}"
    )
}

/// qemu-io on the unlocked image.
fn qemu_io(path: &str, cmds: &[&str]) {
    let mut a = vec!["--object", SECRET, "--image-opts"];
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    let o = format!("driver=luks,key-secret=sec0,file.filename={path}");
    a.push(&o);
    let r = run("qemu-io", &a);
    assert!(r.status.success(), "qemu-io {cmds:?}: {}", err(&r));
}

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

#[test]
fn images_qemu_img_makes_read_the_same() {
    let d = Dir::new("luks", "theirs");
    for (i, extra) in [
        "",
        ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
        ",cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain64,hash-alg=sha1",
    ]
    .iter()
    .enumerate()
    {
        let img = d.p(&format!("q{i}.luks"));
        let o = format!("key-secret=sec0,iter-time=10{extra}");
        q_ok(&[
            "create", "-q", "-f", "luks", "--object", SECRET, "-o", &o, &img, "8M",
        ]);
        qemu_io(
            &img,
            &[
                "write -P 0x5a 0 64k",
                "write -P 0xa5 3M 1536",
                "write -P 0x11 8380416 8k",
            ],
        );
        let (ours, theirs) = raw_by_both(&d, &img);
        assert!(ours == theirs, "{extra}");
        assert!(ours[..65536].iter().all(|&b| b == 0x5a));
        assert_eq!(s_ok(&["info", &img]), q_ok(&["info", &img]), "{extra}");
        assert_eq!(
            s_ok(&["info", "--output=json", &img]),
            q_ok(&["info", "--output=json", &img]),
            "{extra}"
        );
    }
}

#[test]
fn images_strata_img_makes_open_in_qemu_img() {
    let d = Dir::new("luks", "ours");
    for (i, extra) in ["", ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv"]
        .iter()
        .enumerate()
    {
        let img = d.p(&format!("s{i}.luks"));
        let o = format!("key-secret=sec0,iter-time=10{extra}");
        let line = s_ok(&[
            "create", "-f", "luks", "--object", SECRET, "-o", &o, &img, "8M",
        ]);
        assert!(
            line.contains("fmt=luks size=8388608 key-secret=sec0"),
            "{line}"
        );
        // strata-img writes the data, qemu-img reads it back.
        let src = d.p("src.raw");
        let data: Vec<u8> = (0..8u32 << 20)
            .map(|i| (i / 4096) as u8 ^ (i as u8))
            .collect();
        std::fs::write(&src, &data).unwrap();
        s_ok(&[
            "convert",
            "-n",
            "--object",
            SECRET,
            "-f",
            "raw",
            "-O",
            "luks",
            &src,
            &opened(&img),
        ]);
        let (ours, theirs) = raw_by_both(&d, &img);
        assert!(
            theirs == data,
            "qemu-img reads what strata-img wrote ({extra})"
        );
        assert!(ours == data);
        let info = q_ok(&["info", &img]);
        assert!(
            info.contains("encrypted: yes") && info.contains("stripes: 4000"),
            "{info}"
        );
        // And qemu-io's writes come back through strata-img.
        qemu_io(&img, &["write -P 0x33 1M 4k"]);
        let (ours, theirs) = raw_by_both(&d, &img);
        assert!(ours == theirs);
    }
}

#[test]
fn wrong_passphrases_and_missing_secrets_fail_in_one_line() {
    let d = Dir::new("luks", "errors");
    let img = d.p("e.luks");
    q_ok(&[
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        SECRET,
        "-o",
        "key-secret=sec0,iter-time=10",
        &img,
        "1M",
    ]);
    let out = d.p("x.raw");
    let o = strata(&[
        "convert",
        "--object",
        "secret,id=sec0,data=battery staple",
        "-O",
        "raw",
        &opened(&img),
        &out,
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = err(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains("Invalid password, cannot unlock any keyslot"),
        "{e}"
    );

    let o = strata(&["convert", "-O", "raw", &opened(&img), &out]);
    assert_eq!(o.status.code(), Some(1));
    let e = err(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("sec0"), "{e}");

    let o = strata(&[
        "create",
        "-f",
        "luks",
        "-o",
        "key-secret=nosuch",
        &d.p("n.luks"),
        "1M",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("nosuch"), "{}", err(&o));

    let o = strata(&["create", "-f", "luks", &d.p("m.luks"), "1M"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("key-secret"), "{}", err(&o));
}
