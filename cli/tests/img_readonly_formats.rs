//! strata-img on bochs, cloop and parallels: the real samples made by
//! Bochs, cloop's tools and ploop read as their facts say
//! (tests/samples/README.md), `info` and `map` print what qemu-img
//! prints; parallels images qemu-img makes and qemu-io writes read back
//! as qemu-img reads them, and parallels images strata-img makes and
//! writes are qemu-img's (same bytes at create, a clean `qemu-img check`
//! after writes, an image left in use repaired); writes to the read-only
//! formats are refused and hostile headers fail in one line naming the
//! file.

mod support;

use std::process::Output;
use support::img::{io, q_ok, run, s_ok, strata, Dir};

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The sample `name` decompressed into `d`.
fn sample(d: &Dir, name: &str) -> String {
    let src = format!("{}/../tests/samples/{name}.bz2", env!("CARGO_MANIFEST_DIR"));
    let o = run("bzip2", &["-dc", &src]);
    assert!(o.status.success(), "bzip2 -dc {src}");
    let img = d.p(name);
    std::fs::write(&img, &o.stdout).unwrap();
    img
}

fn sha256_of_raw(d: &Dir, img: &str) -> String {
    let raw = d.p("conv.raw");
    s_ok(&["convert", "-O", "raw", img, &raw]);
    out(&run("sha256sum", &[&raw]))[..64].to_string()
}

#[test]
fn samples_read_as_their_facts_say() {
    let d = Dir::new("rofmt", "samples");
    for (name, format, size, sum) in [
        (
            "empty.bochs",
            "bochs",
            1032192u64,
            "85e614bc2ef17bec493b849dbeea34687ba52d7b1fedc4e5fc3729b0fb059aad",
        ),
        (
            "parallels-v1",
            "parallels",
            2 << 20,
            "15faf41ebc93b5f734341cb7a2d909001e3f7306960f9d8bc63894f2a8e5bc45",
        ),
        (
            "simple-pattern.cloop",
            "cloop",
            1 << 20,
            "7c77af2771e0f86b7ec9707374c7416037fedae45cb0e6e27fbdf55688a5dd12",
        ),
    ] {
        let img = sample(&d, name);
        let j: serde_json::Value =
            serde_json::from_str(&s_ok(&["info", "--output=json", &img])).unwrap();
        assert_eq!(j["format"], format, "{name}");
        assert_eq!(j["virtual-size"], size, "{name}");
        assert_eq!(sha256_of_raw(&d, &img), sum, "{name}");
        assert_eq!(s_ok(&["info", &img]), q_ok(&["info", &img]), "{name}");
    }
    let pl = sample(&d, "parallels-v1");
    assert_eq!(
        s_ok(&["map", "--output=json", &pl]),
        q_ok(&["map", "--output=json", &pl])
    );
    // GRUB's boot sector is raw, not any of these.
    let mbr = sample(&d, "grub_mbr.raw");
    assert!(s_ok(&["info", &mbr]).contains("file format: raw"));
}

#[test]
fn parallels_images_qemu_img_makes_read_as_qemu_img_reads_them() {
    let d = Dir::new("rofmt", "parallels");
    for cluster in ["4k", "1M"] {
        let img = d.p(&format!("p-{cluster}.parallels"));
        q_ok(&[
            "create",
            "-q",
            "-f",
            "parallels",
            "-o",
            &format!("cluster_size={cluster}"),
            &img,
            "64M",
        ]);
        io(
            &img,
            "parallels",
            &[
                "write -P 0x61 0 5k",
                "write -P 0x62 33M 1M",
                "write -P 0x63 63M 1000k",
            ],
        );
        let ours = d.p("ours.raw");
        let theirs = d.p("theirs.raw");
        s_ok(&["convert", "-O", "raw", &img, &ours]);
        q_ok(&["convert", "-O", "raw", &img, &theirs]);
        assert!(
            std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
            "{cluster}"
        );
        assert_eq!(s_ok(&["info", &img]), q_ok(&["info", &img]), "{cluster}");
        let o = s_ok(&["compare", &img, &theirs]);
        assert!(o.contains("Images are identical"), "{o}");
    }
}

/// Guest bytes of `img` as qemu-img reads them.
fn qemu_raw(d: &Dir, img: &str) -> Vec<u8> {
    let out = d.p("q.raw");
    q_ok(&["convert", "-O", "raw", img, &out]);
    std::fs::read(out).unwrap()
}

fn qemu_check_clean(img: &str) {
    let o = q_ok(&["check", "-f", "parallels", img]);
    assert!(o.contains("No errors were found"), "{img}: {o}");
}

#[test]
fn parallels_images_strata_img_makes_and_writes_are_qemu_imgs() {
    let d = Dir::new("rofmt", "pwrite");
    // The same bytes at create.
    for cluster in ["1000", "4k", "1M"] {
        let (ours, theirs) = (d.p("s.parallels"), d.p("q.parallels"));
        let o = format!("cluster_size={cluster}");
        let line = s_ok(&["create", "-f", "parallels", "-o", &o, &ours, "10M"]);
        let qline = q_ok(&["create", "-f", "parallels", "-o", &o, &theirs, "10M"]);
        assert_eq!(line.replace(&ours, ""), qline.replace(&theirs, ""));
        assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap());
    }
    // Converted data (zero runs left unallocated) reads back in qemu-img.
    let mut data: Vec<u8> = (0..6u32 << 20)
        .map(|i| (i / 4096) as u8 ^ i as u8)
        .collect();
    data[1 << 20..3 << 20].fill(0);
    let src = d.p("src.raw");
    std::fs::write(&src, &data).unwrap();
    let img = d.p("c.parallels");
    s_ok(&[
        "convert",
        "-O",
        "parallels",
        "-o",
        "cluster_size=64k",
        &src,
        &img,
    ]);
    qemu_check_clean(&img);
    assert!(qemu_raw(&d, &img) == data);
    // qemu-io's writes come back through strata-img.
    io(&img, "parallels", &["write -P 0x44 5000 70000"]);
    data[5000..75000].fill(0x44);
    let ours = d.p("ours.raw");
    s_ok(&["convert", "-O", "raw", &img, &ours]);
    assert!(std::fs::read(&ours).unwrap() == data);
    // strata-img writes into images qemu-img made, old format too.
    for img in [d.p("q.parallels"), sample(&d, "parallels-v1")] {
        let size = q_ok(&["info", "--output=json", &img]);
        let v: serde_json::Value = serde_json::from_str(&size).unwrap();
        let n = v["virtual-size"].as_u64().unwrap() as usize;
        let pat: Vec<u8> = (0..n)
            .map(|i| if i % 3000 < 1000 { 0 } else { (i % 251) as u8 })
            .collect();
        let p = d.p("pat.raw");
        std::fs::write(&p, &pat).unwrap();
        s_ok(&["convert", "-n", "-f", "raw", "-O", "parallels", &p, &img]);
        qemu_check_clean(&img);
        assert!(qemu_raw(&d, &img) == pat, "{img}");
        let h = std::fs::read(&img).unwrap();
        assert_eq!(
            &h[44..48],
            &[0, 0, 0, 0],
            "the in-use mark is cleared at close"
        );
    }
    // An image left in use with a BAT entry past the end of the file is
    // repaired when opened for writing.
    let mut h = std::fs::read(&img).unwrap();
    h[44..48].copy_from_slice(&0x746f_6e59u32.to_le_bytes());
    let last = 64 + 4 * 95;
    h[last..last + 4].copy_from_slice(&5000u32.to_le_bytes());
    std::fs::write(&img, &h).unwrap();
    s_ok(&[
        "bench",
        "-w",
        "-q",
        "-c",
        "1",
        "-d",
        "1",
        "-s",
        "4096",
        "-f",
        "parallels",
        &img,
    ]);
    qemu_check_clean(&img);
}

#[test]
fn writes_are_refused_and_hostile_headers_fail_in_one_line() {
    let d = Dir::new("rofmt", "errors");
    let pl = sample(&d, "parallels-v1");
    let src = d.p("src.raw");
    std::fs::write(&src, vec![7u8; 2 << 20]).unwrap();
    let bochs = sample(&d, "empty.bochs");
    let o = strata(&["convert", "-n", "-O", "bochs", &src, &bochs]);
    assert_ne!(o.status.code(), Some(0));
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("read-only"), "{e}");

    // Zero sectors per cluster; a catalog bigger than the file; a cloop
    // block size that is not a multiple of 512.
    let mut p = std::fs::read(&pl).unwrap();
    p[28..32].copy_from_slice(&0u32.to_le_bytes());
    let bad_pl = d.p("bad.parallels");
    std::fs::write(&bad_pl, &p).unwrap();
    let b = sample(&d, "empty.bochs");
    let mut bb = std::fs::read(&b).unwrap();
    bb[72..76].copy_from_slice(&0x00ff_ffffu32.to_le_bytes());
    let bad_b = d.p("bad.bochs");
    std::fs::write(&bad_b, &bb).unwrap();
    let c = sample(&d, "simple-pattern.cloop");
    let mut cc = std::fs::read(&c).unwrap();
    cc[128..132].copy_from_slice(&1000u32.to_be_bytes());
    let bad_c = d.p("bad.cloop");
    std::fs::write(&bad_c, &cc).unwrap();
    for bad in [&bad_pl, &bad_b, &bad_c] {
        let o = strata(&["info", bad]);
        assert_eq!(o.status.code(), Some(1), "{bad}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(e.lines().count(), 1, "{bad}: {e}");
        assert!(e.contains(bad.as_str()), "{bad}: {e}");
        assert!(!e.contains("panicked"), "{e}");
    }
}
