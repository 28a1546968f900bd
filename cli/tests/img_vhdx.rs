//! strata-img on vhdx images, side by side with qemu-img: images
//! qemu-img makes and qemu-io writes read back as `qemu-img convert -O
//! raw` reads them, and `info` (human and JSON) and `check` print what
//! qemu-img prints; images strata-img makes are the ones qemu-img makes
//! (same `Formatting` line, same length, same `info`) and pass
//! `qemu-img check`/`compare`, also after seeded writes through
//! strata-nbd; the Hyper-V sample; differencing disks; a pending log
//! (refused read-only with qemu-img's words, replayed by `check -r
//! all`); option help and refusals.
//!
//! `map` deliberately differs: QEMU's vhdx driver has no block status,
//! so qemu-img maps every byte as data, while Strata reports zero and
//! unallocated blocks (which `convert` uses to skip them).

mod support;

use std::process::Output;
use support::img::{io, q_ok, run, s_ok, strata, Dir};

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const CASES: &[&str] = &[
    "subformat=dynamic",
    "subformat=dynamic,block_state_zero=off",
    "subformat=fixed",
    "subformat=fixed,block_state_zero=off",
    "block_size=1M,log_size=2M",
];

/// `info` (human and JSON) and `check` (human and JSON, with exit
/// codes) print the same for both tools.
fn same_reports(img: &str) {
    for mut c in [
        vec!["info"],
        vec!["info", "--output=json"],
        vec!["check"],
        vec!["check", "--output=json"],
    ] {
        c.extend_from_slice(&["-f", "vhdx", img]);
        let (s, q) = (strata(&c), run("qemu-img", &c));
        assert_eq!(out(&s), out(&q), "{c:?}: {}", err(&s));
        assert_eq!(s.status.code(), q.status.code(), "{c:?}");
    }
}

#[test]
fn qemu_images_read_back_as_qemu_img_reads_them() {
    let d = Dir::new("vhdx", "read");
    for (i, opts) in CASES.iter().enumerate() {
        let img = d.p(&format!("q{i}.vhdx"));
        q_ok(&["create", "-q", "-f", "vhdx", "-o", opts, &img, "13M"]);
        io(
            &img,
            "vhdx",
            &[
                "write -P 0xa1 0 4096",
                "write -P 0xb2 1000 3000",
                "write -P 0xc3 2044k 8k",
                "write -P 0xd4 5M 1M",
                "write -P 0xe5 11M 333",
            ],
        );
        let (q, s) = (d.p("q.raw"), d.p("s.raw"));
        q_ok(&["convert", "-f", "vhdx", "-O", "raw", &img, &q]);
        s_ok(&["convert", "-O", "raw", &img, &s]);
        assert!(
            std::fs::read(&q).unwrap() == std::fs::read(&s).unwrap(),
            "{opts}: contents differ"
        );
        same_reports(&img);
        // Probed like qemu-img.
        let a = ["info", "--output=json", &img];
        assert_eq!(out(&strata(&a)), out(&run("qemu-img", &a)), "{opts}");
    }
}

#[test]
fn strata_images_are_qemu_imgs() {
    let d = Dir::new("vhdx", "create");
    for (i, opts) in CASES.iter().enumerate() {
        for size in ["13M", "1000000", "3G"] {
            let (q, s) = (d.p(&format!("q{i}.vhdx")), d.p(&format!("s{i}.vhdx")));
            let _ = (std::fs::remove_file(&q), std::fs::remove_file(&s));
            let qo = q_ok(&["create", "-f", "vhdx", "-o", opts, &q, size]);
            let so = s_ok(&["create", "-f", "vhdx", "-o", opts, &s, size]);
            assert_eq!(so.replace(&s, &q), qo, "{opts} {size}");
            let len = |p: &str| std::fs::metadata(p).unwrap().len();
            assert_eq!(len(&s), len(&q), "{opts} {size}: file length");
            let info = |p: &str| {
                let mut v: serde_json::Value =
                    serde_json::from_str(&q_ok(&["info", "-f", "vhdx", "--output=json", p]))
                        .unwrap();
                v["filename"] = "x".into();
                v["children"] = serde_json::Value::Null;
                v["actual-size"] = 0.into();
                v
            };
            assert_eq!(info(&s), info(&q), "{opts} {size}");
            same_reports(&s);
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
    let d = Dir::new("vhdx", "write");
    for (i, opts) in CASES.iter().enumerate() {
        let m = d.p("model.raw");
        model(&m, 37 << 20, 17 + i as u64);
        let img = d.p(&format!("w{i}.vhdx"));
        s_ok(&["convert", "-f", "raw", "-O", "vhdx", "-o", opts, &m, &img]);
        let c = q_ok(&["compare", "-f", "vhdx", "-F", "raw", &img, &m]);
        assert!(c.contains("Images are identical"), "{opts}: {c}");
        q_ok(&["check", &img]);
        let back = d.p("back.raw");
        s_ok(&["convert", "-O", "raw", &img, &back]);
        assert!(
            std::fs::read(&back).unwrap() == std::fs::read(&m).unwrap(),
            "{opts}"
        );
    }
}

/// Write `cmds` (qemu-io commands) into `img` through `strata-nbd`
/// serving it, then stop the server with SIGTERM (a clean close).
fn through_strata_nbd(d: &Dir, img: &str, cmds: &[String]) {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let sock = d.p("nbd.sock");
    let _ = std::fs::remove_file(&sock);
    let mut srv = Command::new(env!("CARGO_BIN_EXE_strata-nbd"))
        .args(["-t", "-f", "vhdx", "-k", &sock, img])
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
    let d = Dir::new("vhdx", "nbd");
    for (i, opts) in CASES.iter().enumerate() {
        let img = d.p(&format!("n{i}.vhdx"));
        s_ok(&["create", "-q", "-f", "vhdx", "-o", opts, &img, "11M"]);
        let size = 11u64 << 20;
        let model = d.p("model.raw");
        std::fs::File::create(&model)
            .unwrap()
            .set_len(size)
            .unwrap();
        let cmds = write_sequence(31 + i as u64, size, 48);
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        io(&model, "raw", &refs);
        through_strata_nbd(&d, &img, &cmds);
        q_ok(&["check", &img]);
        let c = q_ok(&["compare", "-f", "vhdx", "-F", "raw", &img, &model]);
        assert!(c.contains("Images are identical"), "{opts}: {c}");
    }
}

#[test]
fn hyper_v_sample() {
    let d = Dir::new("vhdx", "sample");
    let src = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/samples/iotest-dynamic-1G.vhdx.bz2"
    );
    let o = run("bzip2", &["-dc", src]);
    assert!(o.status.success());
    let img = d.p("iotest-dynamic-1G.vhdx");
    std::fs::write(&img, &o.stdout).unwrap();
    let j: serde_json::Value =
        serde_json::from_str(&s_ok(&["info", "--output=json", &img])).unwrap();
    assert_eq!(j["virtual-size"], 1u64 << 30);
    assert_eq!(j["format"], "vhdx");
    assert_eq!(j["cluster-size"], 32 << 20);
    same_reports(&img);
    let raw = d.p("sample.raw");
    s_ok(&["convert", "-O", "raw", &img, &raw]);
    let sum = out(&run("sha256sum", &[&raw]));
    assert!(
        sum.starts_with("d3d112d8dab7fd360609f7d5a7b769904b7a2a7d7b6b8c535f65a23293c05478"),
        "{sum}"
    );
    // Strata's map: the three allocated blocks, then zero blocks.
    let m: serde_json::Value =
        serde_json::from_str(&s_ok(&["map", "--output=json", &img])).unwrap();
    assert_eq!(m[0]["length"], 96u64 << 20);
    assert_eq!(m[0]["data"], true);
    assert_eq!(m[1]["zero"], true);
    assert_eq!(m[1]["data"], false);
}

#[test]
fn differencing_vhdx_through_strata_img() {
    let d = Dir::new("vhdx", "diff");
    let base = d.p("base.vhdx");
    q_ok(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        &base,
        "8M",
    ]);
    io(&base, "vhdx", &["write -P 0x42 0 3M"]);
    let child = d.p("child.vhdx");
    let f = s_ok(&[
        "create",
        "-f",
        "vhdx",
        "-b",
        "base.vhdx",
        "-F",
        "vhdx",
        &child,
    ]);
    assert!(f.contains("backing_file=base.vhdx"), "{f}");
    let h = s_ok(&["info", &child]);
    assert!(h.contains("\nbacking file: base.vhdx"), "{h}");
    let m = s_ok(&["map", "--output=json", &child]);
    assert!(m.contains("\"depth\": 1"), "{m}");
    let size = 8u64 << 20;
    let model = d.p("model.raw");
    q_ok(&["convert", "-f", "vhdx", "-O", "raw", &base, &model]);
    let before = std::fs::read(&model).unwrap();
    let mut cmds = vec![
        "write -P 0x99 1000 700".to_string(),
        "write -P 0x98 2M 1".into(),
    ];
    cmds.extend(write_sequence(77, size, 24));
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    io(&model, "raw", &refs);
    through_strata_nbd(&d, &child, &cmds);
    let raw = d.p("child.raw");
    s_ok(&["convert", "-O", "raw", &child, &raw]);
    assert!(std::fs::read(&raw).unwrap() == std::fs::read(&model).unwrap());
    q_ok(&["convert", "-f", "vhdx", "-O", "raw", &base, &raw]);
    assert!(std::fs::read(&raw).unwrap() == before, "the parent changed");
    // A VHDX parent only.
    let r = d.p("r.raw");
    q_ok(&["create", "-q", "-f", "raw", &r, "1M"]);
    let o = strata(&[
        "create",
        "-f",
        "vhdx",
        "-b",
        &r,
        "-F",
        "raw",
        &d.p("c2.vhdx"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("must be a vhdx image"), "{}", err(&o));
}

#[test]
fn a_pending_log_is_refused_read_only_and_replayed_by_check_repair() {
    use formats::vhdx::layout::{Header, HEADER_OFFSETS, MIB};
    use formats::vhdx::log::{entry_bytes, LogWrite};
    let d = Dir::new("vhdx", "log");
    let img = d.p("dirty.vhdx");
    q_ok(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        &img,
        "8M",
    ]);
    io(&img, "vhdx", &["write -P 0x31 0 1M"]);
    // One entry: 4 KiB of 0x77 into block 0's data (at 8 MiB, where
    // qemu-img put it).
    let mut b = std::fs::read(&img).unwrap();
    let guid = [0x24u8; 16];
    let e = entry_bytes(
        3,
        0,
        &guid,
        9 * MIB,
        9 * MIB,
        &[LogWrite::Data(8 * MIB + 4096, vec![0x77; 4096])],
    );
    b[MIB as usize..MIB as usize + e.len()].copy_from_slice(&e);
    for o in HEADER_OFFSETS {
        let o = o as usize;
        let mut h = Header::parse(&b[o..o + 4096]).unwrap();
        h.log_guid = guid;
        b[o..o + 4096].copy_from_slice(&h.to_bytes());
    }
    std::fs::write(&img, &b).unwrap();
    let q = d.p("q.vhdx");
    std::fs::copy(&img, &q).unwrap();
    // Read-only opens fail with qemu-img's message and hint.
    for c in [vec!["info"], vec!["check"], vec!["convert", "-O", "raw"]] {
        let mut a = c.clone();
        a.push(&img);
        let mut qa = c.clone();
        qa.push(&q);
        if c[0] == "convert" {
            a.push("/dev/null");
            qa.push("/dev/null");
        }
        let (s, r) = (strata(&a), run("qemu-img", &qa));
        assert_eq!(s.status.code(), r.status.code(), "{c:?}");
        let norm = |o: &Output, p: &str| {
            err(o)
                .replace(p, "IMG")
                .replace("qemu-img: ", "")
                .replace("strata-img: ", "")
        };
        assert_eq!(norm(&s, &img), norm(&r, &q), "{c:?}");
    }
    // `check -r all` replays it, as qemu-img's does.
    let (s, r) = (
        strata(&["check", "-r", "all", &img]),
        run("qemu-img", &["check", "-r", "all", &q]),
    );
    assert_eq!(out(&s), out(&r));
    assert_eq!(s.status.code(), r.status.code());
    let (a, b) = (d.p("a.raw"), d.p("b.raw"));
    s_ok(&["convert", "-O", "raw", &img, &a]);
    q_ok(&["convert", "-O", "raw", &q, &b]);
    let a = std::fs::read(&a).unwrap();
    assert!(a == std::fs::read(&b).unwrap());
    assert!(a[4096..8192].iter().all(|&x| x == 0x77));
    assert!(a[..4096].iter().all(|&x| x == 0x31));
    same_reports(&img);
}

#[test]
fn option_help_and_refusals_match_qemu_img() {
    let d = Dir::new("vhdx", "help");
    let f = d.p("x");
    let ours = s_ok(&["create", "-f", "vhdx", "-o", "help", &f]);
    let theirs = q_ok(&["create", "-f", "vhdx", "-o", "help", &f]);
    for line in ours.lines() {
        assert!(theirs.lines().any(|t| t == line), "{line:?}\n{theirs}");
    }
    for (o, size) in [
        ("block_size=3M", "1M"),
        ("log_size=0", "1M"),
        ("subformat=foo", "1M"),
        ("subformat=dynamic", "65T"),
    ] {
        let (s, q) = (d.p("s.vhdx"), d.p("q.vhdx"));
        let so = strata(&["create", "-f", "vhdx", "-o", o, &s, size]);
        let qo = run("qemu-img", &["create", "-f", "vhdx", "-o", o, &q, size]);
        assert_eq!(so.status.code(), qo.status.code(), "{o}");
        assert_eq!(out(&so).replace(&s, &q), out(&qo), "{o}");
        let msg = |x: &Output, p: &str| {
            err(x)
                .replace(p, "F")
                .replace("qemu-img: ", "")
                .replace("strata-img: ", "")
        };
        assert_eq!(msg(&so, &s), msg(&qo, &q), "{o}");
    }
}

/// Bytes of `src` with `f` applied, written to `dst`.
fn mangle(src: &str, dst: &str, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(src).unwrap();
    f(&mut b);
    std::fs::write(dst, b).unwrap();
}

#[test]
fn hostile_images_fail_in_one_line_naming_the_file() {
    let d = Dir::new("vhdx", "hostile");
    let good = d.p("good.vhdx");
    q_ok(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        &good,
        "64M",
    ]);
    io(&good, "vhdx", &["write -P 1 0 1M"]);
    type Mangle = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Mangle, &str)> = vec![
        ("empty.vhdx", Box::new(|b| b.truncate(0)), "too small"),
        (
            "half.vhdx",
            Box::new(|b| b.truncate(600 << 10)),
            "too small",
        ),
        ("trunc.vhdx", Box::new(|b| b.truncate(8 << 20)), "truncated"),
        ("ident.vhdx", Box::new(|b| b[3] ^= 1), "file identifier"),
        (
            "headers.vhdx",
            Box::new(|b| {
                b[0x10010] ^= 1;
                b[0x20010] ^= 1;
            }),
            "No valid VHDX header",
        ),
        (
            "regions.vhdx",
            Box::new(|b| {
                b[0x30010] ^= 1;
                b[0x40010] ^= 1;
            }),
            "region table",
        ),
        (
            "meta.vhdx",
            Box::new(|b| b[3 << 20] = b'X'),
            "metadata table",
        ),
        (
            "bat-state.vhdx",
            Box::new(|b| b[2 << 20] = 5),
            "invalid state",
        ),
    ];
    for (name, f, want) in cases {
        let p = d.p(name);
        mangle(&good, &p, f);
        let o = strata(&["info", "-f", "vhdx", &p]);
        assert_eq!(o.status.code(), Some(1), "{name}");
        let e = err(&o);
        assert_eq!(e.lines().count(), 1, "{name}: {e}");
        assert!(e.contains(name) && e.contains(want), "{name}: {e}");
    }
}
