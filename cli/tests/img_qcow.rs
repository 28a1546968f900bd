//! strata-img and qemu-img on the same qcow (version 1) images, both
//! ways: images qemu-img makes and qemu-io writes (plain, over a backing
//! file, compressed by `convert -c`) read, map and `info` as qemu-img
//! does; images strata-img makes are byte for byte qemu-img's and hold
//! what strata-img writes; legacy AES images are read and written with
//! the key from `encrypt.key-secret` (with a warning), and refused
//! without it.

mod support;

use std::process::Output;
use support::img::{io, q_ok, s_ok, strata, Dir};

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn same_reads(d: &Dir, img: &str) {
    let (ours, theirs) = (d.p("ours.raw"), d.p("theirs.raw"));
    s_ok(&["convert", "-O", "raw", img, &ours]);
    q_ok(&["convert", "-O", "raw", img, &theirs]);
    assert!(
        std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
        "{img}"
    );
}

fn same_reports(img: &str) {
    for args in [
        &["info"][..],
        &["info", "--output=json"],
        &["map", "--output=json"],
    ] {
        let mut a = args.to_vec();
        a.push(img);
        assert_eq!(s_ok(&a), q_ok(&a), "{args:?} {img}");
    }
}

#[test]
fn images_qemu_img_makes_read_the_same() {
    let d = Dir::new("qcow", "theirs");
    let img = d.p("q.qcow");
    q_ok(&["create", "-q", "-f", "qcow", &img, "64M"]);
    io(
        &img,
        "qcow",
        &[
            "write -P 0x61 0 100k",
            "write -P 0x62 20M 3k",
            "write -P 0x63 63M 1M",
        ],
    );
    same_reads(&d, &img);
    same_reports(&img);
    // Over a backing file (512-byte clusters), partly rewritten.
    let ov = d.p("ov.qcow");
    q_ok(&["create", "-q", "-f", "qcow", "-b", &img, "-F", "qcow", &ov]);
    io(
        &ov,
        "qcow",
        &["write -P 0x71 50k 1536", "write -P 0x72 30M 4k"],
    );
    same_reads(&d, &ov);
    same_reports(&ov);
    // Compressed clusters. qemu-img 10 writes a whole, correct image
    // but exits with 1 (its last, empty compressed write fails), so its
    // status is not looked at; `compare` checks what it wrote.
    let src = d.p("src.qcow2");
    q_ok(&["create", "-q", "-f", "qcow2", &src, "64M"]);
    io(&src, "qcow2", &["write -P 0x1 0 3M", "write -P 0x7 50M 5k"]);
    let c = d.p("c.qcow");
    let _ = support::img::run("qemu-img", &["convert", "-c", "-O", "qcow", &src, &c]);
    assert!(q_ok(&["compare", &c, &src]).contains("Images are identical"));
    assert!(q_ok(&["map", "--output=json", &c]).contains("\"compressed\": true"));
    same_reads(&d, &c);
    same_reports(&c);
}

#[test]
fn images_strata_img_makes_are_qemu_imgs() {
    let d = Dir::new("qcow", "ours");
    let (ours, theirs) = (d.p("s.qcow"), d.p("q.qcow"));
    s_ok(&["create", "-f", "qcow", &ours, "64M"]);
    q_ok(&["create", "-q", "-f", "qcow", &theirs, "64M"]);
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap());
    let src = d.p("src.qcow2");
    q_ok(&["create", "-q", "-f", "qcow2", &src, "64M"]);
    io(
        &src,
        "qcow2",
        &[
            "write -P 0x5a 0 3M",
            "write -P 0x6b 37M 65k",
            "write -P 0x7c 63M 1M",
        ],
    );
    s_ok(&["convert", "-n", "-O", "qcow", &src, &ours]);
    let o = q_ok(&["compare", &ours, &src]);
    assert!(o.contains("Images are identical"), "{o}");
    // A backing file named as qemu-img names it, same bytes.
    let (ob, tb) = (d.p("sb.qcow"), d.p("qb.qcow"));
    s_ok(&["create", "-f", "qcow", "-b", "s.qcow", "-F", "qcow", &ob]);
    q_ok(&[
        "create", "-q", "-f", "qcow", "-b", "s.qcow", "-F", "qcow", &tb,
    ]);
    assert!(std::fs::read(&ob).unwrap() == std::fs::read(&tb).unwrap());
    same_reads(&d, &ob);
}

#[test]
fn compressed_convert_writes_what_qemu_img_reads() {
    let d = Dir::new("qcow", "compress");
    // Compressible text, incompressible noise and zeroes, in one image.
    let mut data = Vec::new();
    while data.len() < 1 << 20 {
        data.extend_from_slice(b"strata compresses qcow clusters as qemu-img does. ");
    }
    let mut x = 0x1234_5678u32;
    for _ in 0..(512 << 10) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        data.push(x as u8);
    }
    data.resize(3 << 20, 0);
    data.extend_from_slice(b"an odd tail");
    let src = d.p("src.raw");
    std::fs::write(&src, &data).unwrap();
    let img = d.p("c.qcow");
    s_ok(&["convert", "-c", "-O", "qcow", &src, &img]);
    let o = q_ok(&["compare", "-f", "qcow", "-F", "raw", &img, &src]);
    assert!(o.contains("Images are identical"), "{o}");
    let size = std::fs::metadata(&img).unwrap().len();
    assert!(size < 1 << 20, "{size} bytes: the text was not compressed");
    let map = q_ok(&["map", "--output=json", &img]);
    assert!(map.contains("\"compressed\": true"), "{map}");
    same_reports(&img);
    // Writes over compressed clusters (qemu-io's, then strata-img's
    // reads) agree.
    io(&img, "qcow", &["write -P 0x77 1000 70000"]);
    same_reads(&d, &img);
}

#[test]
fn legacy_aes_images_need_their_key_and_warn() {
    let d = Dir::new("qcow", "aes");
    let img = d.p("aes.qcow");
    let secret = "secret,id=s,data=hunter2";
    q_ok(&[
        "create",
        "-q",
        "-f",
        "qcow",
        "--object",
        secret,
        "-o",
        "encrypt.format=aes,encrypt.key-secret=s",
        &img,
        "16M",
    ]);
    let opened = format!(
        "json:{{\"driver\":\"qcow\",\"encrypt\":{{\"format\":\"aes\",\"key-secret\":\"s\"}},\"file\":{{\"driver\":\"file\",\"filename\":\"{img}\"}}}}"
    );
    let data: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i / 512) as u8 ^ i as u8)
        .collect();
    let src = d.p("src.raw");
    std::fs::write(&src, &data).unwrap();
    // strata-img writes, qemu-img reads; and the other way round.
    let o = strata(&[
        "convert", "-n", "--object", secret, "-f", "raw", "-O", "qcow", &src, &opened,
    ]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        err(&o).contains("warning") && err(&o).contains("insecure"),
        "{}",
        err(&o)
    );
    let back = d.p("back.raw");
    q_ok(&["convert", "--object", secret, "-O", "raw", &opened, &back]);
    assert!(std::fs::read(&back).unwrap() == data);
    let (ours, theirs) = (d.p("o.raw"), d.p("t.raw"));
    s_ok(&["convert", "--object", secret, "-O", "raw", &opened, &ours]);
    q_ok(&["convert", "--object", secret, "-O", "raw", &opened, &theirs]);
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap());
    // info needs no key; reading does.
    assert_eq!(s_ok(&["info", &img]), q_ok(&["info", &img]));
    let o = strata(&["convert", "-O", "raw", &img, &d.p("x.raw")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("encrypt.key-secret"), "{}", err(&o));
}
