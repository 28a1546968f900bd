//! strata-img on vpc (VHD) and vdi images, side by side with qemu-img:
//! images qemu-img makes and qemu-io writes read back as `qemu-img
//! convert -O raw` reads them; `info` (human and JSON), `map` and `check`
//! print what qemu-img prints; images strata-img makes are the ones
//! qemu-img makes (same `Formatting` line, same length, same `info`) and
//! pass `qemu-img check`/`compare`; the Virtual PC sample; differencing
//! VHDs; qcow2 over both; hostile images fail in one line naming the file.

mod support;

use std::process::Output;
use support::img::{io, ok, q_ok, run, s_ok, strata, Dir};

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The subformats and options of both formats, as `-o` arguments.
const CASES: &[(&str, &str)] = &[
    ("vpc", "subformat=dynamic"),
    ("vpc", "subformat=fixed"),
    ("vpc", "force_size=on"),
    ("vpc", "subformat=fixed,force_size=on"),
    ("vdi", "static=off"),
    ("vdi", "static=on"),
];

/// `info`, `info --output=json` and `map --output=json` (and `check`
/// for vdi, with its exit code) print the same for both tools.
fn same_reports(img: &str, fmt: &str) {
    let f = ["-f", fmt];
    let mut cmds: Vec<Vec<&str>> = vec![
        vec!["info"],
        vec!["info", "--output=json"],
        vec!["map", "--output=json"],
        vec!["map"],
    ];
    if fmt == "vdi" {
        cmds.push(vec!["check"]);
        cmds.push(vec!["check", "--output=json"]);
    }
    for mut c in cmds {
        c.extend_from_slice(&f);
        c.push(img);
        let (s, q) = (strata(&c), run("qemu-img", &c));
        assert_eq!(out(&s), out(&q), "{c:?}: {}", err(&s));
        assert_eq!(s.status.code(), q.status.code(), "{c:?}");
    }
}

#[test]
fn qemu_images_read_back_as_qemu_img_reads_them() {
    let d = Dir::new("vpcvdi", "read");
    for (i, (fmt, opts)) in CASES.iter().enumerate() {
        let img = d.p(&format!("q{i}.{fmt}"));
        q_ok(&["create", "-q", "-f", fmt, "-o", opts, &img, "13M"]);
        io(
            &img,
            fmt,
            &[
                "write -P 0xa1 0 4096",
                "write -P 0xb2 1000 3000",
                "write -P 0xc3 2044k 8k",
                "write -P 0xd4 5M 1M",
                "write -P 0xe5 11M 333",
            ],
        );
        let (q, s) = (d.p("q.raw"), d.p("s.raw"));
        q_ok(&["convert", "-f", fmt, "-O", "raw", &img, &q]);
        s_ok(&["convert", "-f", fmt, "-O", "raw", &img, &s]);
        assert!(
            std::fs::read(&q).unwrap() == std::fs::read(&s).unwrap(),
            "{fmt} {opts}: contents differ"
        );
        same_reports(&img, fmt);
        // Probed like qemu-img (a fixed VHD is raw to both).
        let a = ["info", "--output=json", &img];
        assert_eq!(out(&strata(&a)), out(&run("qemu-img", &a)), "{fmt} {opts}");
    }
}

#[test]
fn strata_images_are_qemu_imgs() {
    let d = Dir::new("vpcvdi", "create");
    for (i, (fmt, opts)) in CASES.iter().enumerate() {
        for size in ["13M", "100M", "1000000"] {
            let (q, s) = (d.p(&format!("q{i}.{fmt}")), d.p(&format!("s{i}.{fmt}")));
            let qo = q_ok(&["create", "-f", fmt, "-o", opts, &q, size]);
            let so = s_ok(&["create", "-f", fmt, "-o", opts, &s, size]);
            assert_eq!(so.replace(&s, &q), qo, "{fmt} {opts} {size}");
            let len = |p: &str| std::fs::metadata(p).unwrap().len();
            assert_eq!(len(&s), len(&q), "{fmt} {opts} {size}: file length");
            let info = |p: &str| {
                let mut v: serde_json::Value =
                    serde_json::from_str(&q_ok(&["info", "-f", fmt, "--output=json", p])).unwrap();
                v["filename"] = "x".into();
                v["children"] = serde_json::Value::Null;
                v["actual-size"] = 0.into();
                v
            };
            assert_eq!(info(&s), info(&q), "{fmt} {opts} {size}");
            same_reports(&s, fmt);
            if *fmt == "vdi" {
                q_ok(&["check", &s]);
            }
        }
    }
}

/// A raw image with a seeded pattern of data runs and holes.
fn model(path: &str, size: u64, seed: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..40 {
        let len = next() % (600 << 10) + 1;
        let off = next() % (size - len);
        let v = next() as u8;
        let buf: Vec<u8> = (0..len).map(|j| v ^ (j as u8)).collect();
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&buf).unwrap();
    }
}

#[test]
fn strata_written_images_pass_qemu_img_check_and_compare() {
    let d = Dir::new("vpcvdi", "write");
    for (i, (fmt, opts)) in CASES.iter().enumerate() {
        let m = d.p("model.raw");
        model(&m, 20 * 16 * 63 * 512, 17 + i as u64);
        let img = d.p(&format!("w{i}.{fmt}"));
        s_ok(&["convert", "-f", "raw", "-O", fmt, "-o", opts, &m, &img]);
        let c = q_ok(&["compare", "-f", fmt, "-F", "raw", &img, &m]);
        assert!(c.contains("Images are identical"), "{fmt} {opts}: {c}");
        if *fmt == "vdi" {
            q_ok(&["check", &img]);
        }
        // And back through strata-img.
        // And back through strata-img (sizes rounded up to a geometry
        // read as zeroes past the model's end).
        let back = d.p("back.raw");
        s_ok(&["convert", "-f", fmt, "-O", "raw", &img, &back]);
        let (b, m) = (std::fs::read(&back).unwrap(), std::fs::read(&m).unwrap());
        assert!(b.len() >= m.len() && b[..m.len()] == m[..], "{fmt} {opts}");
        assert!(b[m.len()..].iter().all(|&x| x == 0), "{fmt} {opts}");
    }
}

#[test]
fn virtual_pc_sample() {
    let d = Dir::new("vpcvdi", "sample");
    let src = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/samples/virtualpc-dynamic.vhd.bz2"
    );
    let o = run("bzip2", &["-dc", src]);
    assert!(o.status.success());
    let img = d.p("virtualpc-dynamic.vhd");
    std::fs::write(&img, &o.stdout).unwrap();
    let j: serde_json::Value =
        serde_json::from_str(&s_ok(&["info", "--output=json", &img])).unwrap();
    assert_eq!(j["virtual-size"], 136_363_130_880u64);
    assert_eq!(j["format"], "vpc");
    assert_eq!(j["cluster-size"], 2 << 20);
    same_reports(&img, "vpc");
    // Every byte reads as zero: equal to a sparse raw file of its size.
    let z = d.p("zero.raw");
    std::fs::File::create(&z)
        .unwrap()
        .set_len(136_363_130_880)
        .unwrap();
    let c = s_ok(&["compare", "-f", "vpc", "-F", "raw", &img, &z]);
    assert_eq!(c, "Images are identical.\n");
}

/// Write `cmds` (qemu-io commands) into `img` through `strata-nbd`
/// serving it, then stop the server with SIGTERM (a clean close).
fn through_strata_nbd(d: &Dir, img: &str, fmt: &str, cmds: &[String]) {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let sock = d.p("nbd.sock");
    let _ = std::fs::remove_file(&sock);
    let mut srv = Command::new(env!("CARGO_BIN_EXE_strata-nbd"))
        .args(["-t", "-f", fmt, "-k", &sock, img])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(srv.try_wait().unwrap().is_none(), "strata-nbd exited");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "strata-nbd never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let url = format!("nbd+unix:///?socket={sock}");
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    // Several commands per process, so that requests overlap (aio).
    for chunk in cmds.chunks(16) {
        io(&url, "raw", chunk);
    }
    run("kill", &["-TERM", &srv.id().to_string()]);
    let t = Instant::now();
    loop {
        if let Some(s) = srv.try_wait().unwrap() {
            assert!(s.success(), "strata-nbd: {s}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A seeded sequence of qemu-io writes (unaligned ones too) in `size`.
fn write_sequence(seed: u64, size: u64, n: usize) -> Vec<String> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|i| {
            let len = match i % 3 {
                0 => (next() % 2048 + 1) * 512,
                1 => next() % 5000 + 1,
                _ => next() % (3 << 20) + 1,
            }
            .min(size);
            let off = next() % (size - len + 1);
            match next() % 8 {
                0 => format!("write -z {off} {len}"),
                _ => format!("write -P {} {off} {len}", next() % 255 + 1),
            }
        })
        .collect()
}

#[test]
fn seeded_writes_through_strata_nbd_satisfy_qemu_img() {
    let d = Dir::new("vpcvdi", "nbd");
    for (i, (fmt, opts)) in CASES.iter().enumerate() {
        let img = d.p(&format!("n{i}.{fmt}"));
        s_ok(&["create", "-q", "-f", fmt, "-o", opts, &img, "11M"]);
        let size: u64 = serde_json::from_str::<serde_json::Value>(&s_ok(&[
            "info",
            "-f",
            fmt,
            "--output=json",
            &img,
        ]))
        .unwrap()["virtual-size"]
            .as_u64()
            .unwrap();
        let model = d.p("model.raw");
        std::fs::File::create(&model)
            .unwrap()
            .set_len(size)
            .unwrap();
        let cmds = write_sequence(31 + i as u64, size, 48);
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        io(&model, "raw", &refs);
        through_strata_nbd(&d, &img, fmt, &cmds);
        if *fmt == "vdi" {
            q_ok(&["check", &img]);
        }
        let c = q_ok(&["compare", "-f", fmt, "-F", "raw", &img, &model]);
        assert!(c.contains("Images are identical"), "{fmt} {opts}: {c}");
    }
}

#[test]
fn differencing_vhd_through_strata_img() {
    let d = Dir::new("vpcvdi", "diff");
    let base = d.p("base.vhd");
    q_ok(&["create", "-q", "-f", "vpc", &base, "8M"]);
    io(&base, "vpc", &["write -P 0x42 0 3M"]);
    let child = d.p("child.vhd");
    let f = s_ok(&["create", "-f", "vpc", "-b", "base.vhd", "-F", "vpc", &child]);
    assert!(f.contains("backing_file=base.vhd"), "{f}");
    let h = s_ok(&["info", &child]);
    assert!(h.contains("\nbacking file: base.vhd"), "{h}");
    // Unallocated runs come from the parent (depth 1).
    let m = s_ok(&["map", "--output=json", &child]);
    assert!(m.contains("\"depth\": 1"), "{m}");
    // Written through strata-nbd: unaligned pieces inside the parent's
    // data keep the parent's bytes around them in the same sectors.
    let size = 8u64 << 20;
    let model = d.p("model.raw");
    q_ok(&["convert", "-f", "vpc", "-O", "raw", &base, &model]);
    let before = std::fs::read(&model).unwrap();
    let mut cmds = vec![
        "write -P 0x99 1000 700".to_string(),
        "write -P 0x98 2M 1".into(),
    ];
    cmds.extend(write_sequence(77, size, 24));
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    io(&model, "raw", &refs);
    through_strata_nbd(&d, &child, "vpc", &cmds);
    let raw = d.p("child.raw");
    s_ok(&["convert", "-O", "raw", &child, &raw]);
    assert!(std::fs::read(&raw).unwrap() == std::fs::read(&model).unwrap());
    // The parent is only read.
    q_ok(&["convert", "-f", "vpc", "-O", "raw", &base, &raw]);
    assert!(std::fs::read(&raw).unwrap() == before);
    // qemu-img knows no differencing VHDs (it reads one as a dynamic
    // disk), but the footer, header and BAT Strata wrote are valid to it.
    q_ok(&["info", "-f", "vpc", &child]);
    // A VHD parent only.
    let r = d.p("r.raw");
    q_ok(&["create", "-q", "-f", "raw", &r, "1M"]);
    let o = strata(&["create", "-f", "vpc", "-b", &r, "-F", "raw", &d.p("c2.vhd")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("must be a vpc image"), "{}", err(&o));
}

#[test]
fn qcow2_over_vpc_and_vdi_through_strata_img() {
    let d = Dir::new("vpcvdi", "backing");
    for (fmt, opts) in [("vpc", "subformat=dynamic"), ("vdi", "static=off")] {
        let base = d.p(&format!("base.{fmt}"));
        q_ok(&["create", "-q", "-f", fmt, "-o", opts, &base, "6M"]);
        io(&base, fmt, &["write -P 0x17 1M 1M"]);
        let top = d.p(&format!("top-{fmt}.qcow2"));
        s_ok(&["create", "-f", "qcow2", "-b", &base, "-F", fmt, &top]);
        io(&top, "qcow2", &["write -P 0x28 1536k 1M"]);
        let (q, s) = (d.p("q.raw"), d.p("s.raw"));
        q_ok(&["convert", "-O", "raw", &top, &q]);
        s_ok(&["convert", "-O", "raw", &top, &s]);
        assert!(std::fs::read(&q).unwrap() == std::fs::read(&s).unwrap());
        let a = ["info", "--backing-chain", "--output=json", &top];
        assert_eq!(out(&strata(&a)), out(&run("qemu-img", &a)), "{fmt}");
        let a = ["map", "--output=json", &top];
        assert_eq!(out(&strata(&a)), out(&run("qemu-img", &a)), "{fmt}");
    }
}

#[test]
fn option_help_and_refusals_match_qemu_img() {
    let d = Dir::new("vpcvdi", "help");
    let f = d.p("x");
    for fmt in ["vpc", "vdi"] {
        let ours = s_ok(&["create", "-f", fmt, "-o", "help", &f]);
        let theirs = q_ok(&["create", "-f", fmt, "-o", "help", &f]);
        for line in ours.lines() {
            assert!(
                theirs.lines().any(|t| t == line),
                "{fmt}: {line:?}\n{theirs}"
            );
        }
    }
    let v = d.p("v.vdi");
    q_ok(&["create", "-q", "-f", "vdi", &v, "1M"]);
    let h = d.p("h.vhd");
    q_ok(&["create", "-q", "-f", "vpc", &h, "1M"]);
    for args in [
        vec!["check", "-r", "all", &v],
        vec!["check", "-f", "vpc", &h],
        vec!["snapshot", "-l", &v],
        vec!["amend", "-f", "vdi", "-o", "static=on", &v],
    ] {
        let (s, q) = (strata(&args), run("qemu-img", &args));
        assert_eq!(s.status.code(), q.status.code(), "{args:?}: {}", err(&s));
        let msg = |o: &Output| err(o).replace("qemu-img: ", "").replace("strata-img: ", "");
        assert_eq!(msg(&s), msg(&q), "{args:?}");
    }
}

/// Bytes of `path` with `f` applied.
fn mangle(src: &str, dst: &str, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(src).unwrap();
    f(&mut b);
    std::fs::write(dst, b).unwrap();
}

#[test]
fn hostile_images_fail_in_one_line_naming_the_file() {
    let d = Dir::new("vpcvdi", "hostile");
    let vhd = d.p("good.vhd");
    q_ok(&["create", "-q", "-f", "vpc", &vhd, "64M"]);
    io(&vhd, "vpc", &["write -P 1 0 1M"]);
    let vdi = d.p("good.vdi");
    q_ok(&["create", "-q", "-f", "vdi", &vdi, "64M"]);
    io(&vdi, "vdi", &["write -P 1 0 1M"]);
    let fixed = d.p("good-fixed.vhd");
    q_ok(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=fixed",
        &fixed,
        "1M",
    ]);
    let be32 = |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let le32 = |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    type Mangle = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, &str, &str, Mangle, &str)> = vec![
        (
            "vpc",
            &vhd,
            "empty.vhd",
            Box::new(|b| b.truncate(0)),
            "File too small",
        ),
        (
            "vpc",
            &vhd,
            "trunc-footer.vhd",
            Box::new(|b| b.truncate(300)),
            "header lies past the end of the file",
        ),
        (
            "vpc",
            &vhd,
            "checksum.vhd",
            Box::new(|b| b[50] ^= 1),
            "Incorrect header checksum",
        ),
        (
            "vpc",
            &vhd,
            "trunc-blocks.vhd",
            Box::new(|b| b.truncate(8192)),
            "truncated",
        ),
        (
            "vpc",
            &vhd,
            "no-header.vhd",
            Box::new(|b| b.truncate(1000)),
            "dynamic VHD header",
        ),
        (
            "vpc",
            &vhd,
            "bad-magic.vhd",
            Box::new(|b| b[512] = b'X'),
            "header magic",
        ),
        (
            "vpc",
            &vhd,
            "block-size.vhd",
            Box::new(move |b| be32(b, 512 + 32, 3000)),
            "Invalid block size",
        ),
        (
            "vpc",
            &vhd,
            "huge-bat.vhd",
            Box::new(move |b| be32(b, 512 + 28, 0x7fff_ffff)),
            "Max Table Entries",
        ),
        (
            "vpc",
            &vhd,
            "bat-past-end.vhd",
            Box::new(move |b| be32(b, 512 + 20, 0x7fff_0000)),
            "BAT lies past the end",
        ),
        (
            "vpc",
            &fixed,
            "fixed-garbled.vhd",
            Box::new(|b| {
                let n = b.len();
                b[n - 512] = b'X';
            }),
            "invalid VPC image",
        ),
        (
            "vdi",
            &vdi,
            "empty.vdi",
            Box::new(|b| b.truncate(0)),
            "too small",
        ),
        // Read as a whole sector, zeroes after the cut.
        (
            "vdi",
            &vdi,
            "trunc-header.vdi",
            Box::new(|b| b.truncate(100)),
            "sector size 0",
        ),
        (
            "vdi",
            &vdi,
            "trunc-bmap.vdi",
            Box::new(|b| b.truncate(512)),
            "block map lies past the end",
        ),
        (
            "vdi",
            &vdi,
            "signature.vdi",
            Box::new(move |b| le32(b, 0x40, 1)),
            "bad signature",
        ),
        (
            "vdi",
            &vdi,
            "version.vdi",
            Box::new(move |b| le32(b, 0x44, 0x20000)),
            "version 2.0",
        ),
        (
            "vdi",
            &vdi,
            "blocks.vdi",
            Box::new(move |b| le32(b, 0x180, 0x4000_0000)),
            "too many blocks",
        ),
        (
            "vdi",
            &vdi,
            "bmap-past-end.vdi",
            Box::new(move |b| le32(b, 0x154, 0x7fff_fe00)),
            "block map lies past the end",
        ),
        (
            "vdi",
            &vdi,
            "block-size.vdi",
            Box::new(move |b| le32(b, 0x178, 4096)),
            "block size 4096",
        ),
    ];
    for (fmt, src, name, f, want) in cases {
        let p = d.p(name);
        mangle(src, &p, f);
        for args in [
            vec!["info", "-f", fmt, &p],
            vec!["convert", "-f", fmt, "-O", "raw", &p, &d.p("out.raw")],
        ] {
            let o = strata(&args);
            assert_eq!(o.status.code(), Some(1), "{name} {args:?}: {}", out(&o));
            let e = err(&o);
            assert_eq!(e.lines().count(), 1, "{name}: {e}");
            assert!(e.contains(name) && e.contains(want), "{name}: {e}");
        }
    }
    // A block map entry past the image's blocks fails the read that
    // reaches it, naming the file; the rest of the image still reads.
    let p = d.p("entry.vdi");
    mangle(&vdi, &p, |b| le32(b, 0x200 + 4 * 3, 1000));
    let o = strata(&["convert", "-f", "vdi", "-O", "raw", &p, &d.p("out.raw")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("entry.vdi"), "{}", err(&o));
    let c = strata(&["check", &p]);
    assert_eq!(c.status.code(), Some(2), "{}", err(&c));
    assert!(err(&c).contains("too large"), "{}", err(&c));
    let _ = ok;
}
