//! strata-img on dmg (UDIF) images, which the tests build themselves
//! (formats/tests/support/dmg_image.rs: no tool on Linux makes them),
//! with qemu-img as the oracle: raw, zero, ignored and zlib chunks in
//! both homes of the block tables read as qemu-img reads them and as
//! written; bzip2 chunks (compressed by the `bzip2` program) and LZFSE
//! ones (the reference implementation's encodings) read as written, and
//! as qemu-img reads them where its dmg-bz2 and dmg-lzfse modules are
//! there (Debian builds neither: then qemu-img fails on those sectors
//! alone, which is checked too); `info` prints what qemu-img prints;
//! probing goes by the file name as QEMU's does; writes are refused and
//! hostile images fail in one line naming the file.

mod support;

#[path = "../../formats/tests/support/dmg_image.rs"]
mod dmg_image;

use dmg_image::*;
use std::io::Write;
use support::img::{q_ok, run, s_ok, strata, Dir};

fn zlib(d: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(d).unwrap();
    e.finish().unwrap()
}

/// `d` compressed by the bzip2 program.
fn bzip2(dir: &Dir, d: &[u8]) -> Vec<u8> {
    let p = dir.p("chunk");
    std::fs::write(&p, d).unwrap();
    let o = run("bzip2", &["-9", "-c", &p]);
    assert!(o.status.success(), "bzip2");
    o.stdout
}

fn write(d: &Dir, name: &str, v: &[u8]) -> String {
    let p = d.p(name);
    std::fs::write(&p, v).unwrap();
    p
}

/// Two partitions of raw, zero, ignored and zlib chunks (what
/// qemu-img reads without modules), and the disk they make.
fn plain() -> (Vec<Table>, Vec<u8>, u64) {
    let mut want = Vec::new();
    let mut first = Vec::new();
    for c in [
        Chunk::new(RAW, 8, pattern(0, 8)),
        Chunk::new(ZERO, 24, vec![]),
        Chunk::new(ZLIB, 64, zlib(&pattern(32, 64))),
        Chunk::new(IGNORE, 16, vec![]),
        Chunk::new(ZLIB, 2048, zlib(&pattern(112, 2048))),
        Chunk::new(RAW, 1, pattern(2160, 1)),
    ] {
        want.extend_from_slice(&match c.kind {
            ZERO | IGNORE => vec![0; c.sectors as usize * 512],
            RAW => c.stored.clone(),
            _ => pattern((want.len() / 512) as u64, c.sectors),
        });
        first.push(c);
    }
    let second_at = (want.len() / 512) as u64;
    let second = vec![
        Chunk::new(ZLIB, 100, zlib(&pattern(second_at, 100))),
        Chunk::new(ZERO, 1000, vec![]),
        Chunk::new(RAW, 3, pattern(second_at + 1100, 3)),
    ];
    want.extend_from_slice(&pattern(second_at, 100));
    want.extend_from_slice(&vec![0; 1000 * 512]);
    want.extend_from_slice(&pattern(second_at + 1100, 3));
    let n = (want.len() / 512) as u64;
    let tables = vec![
        Table {
            first_sector: 0,
            chunks: first,
        },
        Table {
            first_sector: second_at,
            chunks: second,
        },
    ];
    (tables, want, n)
}

#[test]
fn dmg_images_read_as_qemu_img_reads_them() {
    let d = Dir::new("dmg", "plain");
    let (tables, want, n) = plain();
    for (tag, form, tail) in [
        ("plist", Form::Plist, 0),
        ("rsrc", Form::ResourceFork, 0),
        // Odd sizes: the trailer ends before the file does.
        ("odd", Form::Plist, 77),
    ] {
        let mut v = build(&tables, n, form);
        v.resize(v.len() + tail, 0);
        let img = write(&d, &format!("{tag}.dmg"), &v);
        let (ours, theirs) = (d.p("ours.raw"), d.p("theirs.raw"));
        s_ok(&["convert", "-f", "dmg", &img, "-O", "raw", &ours]);
        q_ok(&["convert", "-f", "dmg", "-O", "raw", &img, &theirs]);
        let ours = std::fs::read(&ours).unwrap();
        assert!(ours == std::fs::read(&theirs).unwrap(), "{tag}");
        assert!(ours == want, "{tag}");
        assert_eq!(s_ok(&["info", &img]), q_ok(&["info", &img]), "{tag}");
        let j: serde_json::Value =
            serde_json::from_str(&s_ok(&["info", "--output=json", &img])).unwrap();
        assert_eq!(j["format"], "dmg", "{tag}");
        assert_eq!(j["virtual-size"], n * 512, "{tag}");
        let o = s_ok(&[
            "compare",
            "-f",
            "dmg",
            "-F",
            "raw",
            &img,
            &d.p("theirs.raw"),
        ]);
        assert!(o.contains("Images are identical"), "{tag}: {o}");
    }
}

#[test]
fn bzip2_and_lzfse_chunks_read_as_written() {
    let d = Dir::new("dmg", "bz2lzfse");
    let [(lz8, t8), (lz1, t1)] = lzfse_samples();
    // Sectors: 0-3 raw, 4-67 bzip2, 68-83 LZFSE, 84-85 LZVN, 86-101 zlib,
    // 102-105 bzip2.
    let chunks = vec![
        Chunk::new(RAW, 4, pattern(0, 4)),
        Chunk::new(BZIP2, 64, bzip2(&d, &pattern(4, 64))),
        Chunk::new(LZFSE, 16, lz8),
        Chunk::new(LZFSE, 2, lz1),
        Chunk::new(ZLIB, 16, zlib(&pattern(86, 16))),
        Chunk::new(BZIP2, 4, bzip2(&d, &[0u8; 2048])),
    ];
    let mut want = pattern(0, 68);
    want.extend_from_slice(&t8);
    want.extend_from_slice(&t1);
    want.extend_from_slice(&pattern(86, 16));
    want.extend_from_slice(&[0u8; 2048]);
    let n = 106;
    for form in [Form::Plist, Form::ResourceFork] {
        let v = build(
            &[Table {
                first_sector: 0,
                chunks: chunks.clone(),
            }],
            n,
            form,
        );
        let img = write(&d, "mixed.dmg", &v);
        let ours = d.p("ours.raw");
        s_ok(&["convert", "-f", "dmg", &img, "-O", "raw", &ours]);
        assert!(std::fs::read(&ours).unwrap() == want, "{form:?}");
        // qemu-img, sector range by range (its `dd` counts `count` from
        // the start of the input, not from `skip`).
        for (skip, count, needs_module) in [
            (0, 4, false),
            (4, 64, true),
            (68, 18, true),
            (86, 16, false),
            (102, 4, true),
        ] {
            let part = d.p("part.raw");
            let _ = std::fs::remove_file(&part);
            let o = run(
                "qemu-img",
                &[
                    "dd",
                    "-f",
                    "dmg",
                    "-O",
                    "raw",
                    "bs=512",
                    &format!("skip={skip}"),
                    &format!("count={}", skip + count),
                    &format!("if={img}"),
                    &format!("of={part}"),
                ],
            );
            let err = String::from_utf8_lossy(&o.stderr);
            let range = &want[skip * 512..(skip + count) * 512];
            if o.status.success() {
                assert!(std::fs::read(&part).unwrap() == range, "{form:?} {skip}");
            } else {
                // Only a missing module may keep qemu-img from a range.
                assert!(needs_module, "{form:?} {skip}: {err}");
                assert!(err.contains("module is missing"), "{form:?} {skip}: {err}");
            }
        }
    }
}

#[test]
fn probing_goes_by_the_file_name() {
    let d = Dir::new("dmg", "probe");
    let (tables, _, n) = plain();
    let v = build(&tables, n, Form::Plist);
    for (name, fmt) in [("a.dmg", "dmg"), ("a.img", "raw"), ("a.dmg.bak", "raw")] {
        let img = write(&d, name, &v);
        let line = format!("file format: {fmt}\n");
        assert!(s_ok(&["info", &img]).contains(&line), "{name}");
        assert!(q_ok(&["info", &img]).contains(&line), "{name}");
    }
    // A qcow2 image named .dmg is qcow2: magic beats the name.
    let q = d.p("q.dmg");
    q_ok(&["create", "-q", "-f", "qcow2", &q, "1M"]);
    assert!(s_ok(&["info", &q]).contains("file format: qcow2\n"));
}

#[test]
fn writes_are_refused_and_hostile_images_fail_in_one_line() {
    let d = Dir::new("dmg", "errors");
    let (tables, _, n) = plain();
    let img = write(&d, "ok.dmg", &build(&tables, n, Form::Plist));
    let src = write(&d, "src.raw", &vec![7u8; (n * 512) as usize]);
    let o = strata(&["convert", "-n", "-O", "dmg", &src, &img]);
    assert_ne!(o.status.code(), Some(0));
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("read-only"), "{e}");

    // No trailer; overlapping chunks; bad base64; a zlib chunk larger
    // than 64 MiB.
    let cut = write(&d, "cut.dmg", &[0u8; 4096]);
    let overlap = write(
        &d,
        "overlap.dmg",
        &finish(
            pattern(0, 4),
            &[mish_raw(
                0,
                4,
                0,
                &[entry(RAW, 0, 3, 0, 1536), entry(RAW, 1, 3, 512, 1536)],
            )],
            4,
            Form::Plist,
        ),
    );
    let mut p = finish(
        vec![],
        &[mish_raw(0, 1, 0, &[entry(ZERO, 0, 1, 0, 0)])],
        1,
        Form::Plist,
    );
    let at = p.windows(6).position(|w| w == b"<data>").unwrap() + 12;
    p[at] = b'!';
    let b64 = write(&d, "b64.dmg", &p);
    let huge = write(
        &d,
        "huge.dmg",
        &finish(
            vec![],
            &[mish_raw(0, 1 << 20, 0, &[entry(ZLIB, 0, 1 << 20, 0, 100)])],
            1 << 20,
            Form::ResourceFork,
        ),
    );
    for bad in [&cut, &overlap, &b64, &huge] {
        let o = strata(&["info", "-f", "dmg", bad]);
        assert_eq!(o.status.code(), Some(1), "{bad}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(e.lines().count(), 1, "{bad}: {e}");
        assert!(e.contains(bad.as_str()), "{bad}: {e}");
        assert!(!e.contains("panicked"), "{e}");
        // qemu-img refuses them too, but for two it opens: overlaps (its
        // reads find one chunk or the other), and bad base64 (its decoder
        // skips the bad character, and the table, shifted, is not
        // recognised: an image without chunks).
        let q = run("qemu-img", &["info", "-f", "dmg", bad]);
        let opens = bad == &overlap || bad == &b64;
        assert_eq!(q.status.success(), opens, "{bad}");
    }

    // A hole: info works, reading it fails by name, as with qemu-img.
    let hole = write(
        &d,
        "hole.dmg",
        &finish(
            pattern(0, 2),
            &[mish_raw(
                0,
                4,
                0,
                &[entry(RAW, 0, 1, 0, 512), entry(RAW, 2, 1, 512, 512)],
            )],
            4,
            Form::Plist,
        ),
    );
    s_ok(&["info", &hole]);
    let o = strata(&["convert", "-O", "raw", &hole, &d.p("h.raw")]);
    assert_ne!(o.status.code(), Some(0));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("hole.dmg") && e.contains("sector 1"), "{e}");
    let q = run("qemu-img", &["convert", "-O", "raw", &hole, &d.p("hq.raw")]);
    assert!(!q.status.success());
}
