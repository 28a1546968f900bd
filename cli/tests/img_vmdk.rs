//! strata-img on vmdk images, side by side with qemu-img: images of
//! every subformat qemu-img makes and qemu-io writes read back as
//! `qemu-img convert -O raw` reads them, with the same `info` and `map`;
//! images strata-img makes have qemu-img's files, lengths and
//! descriptors and, written by convert (compressed for streams) or by a
//! seeded write sequence through strata-nbd, pass `qemu-img check` and
//! `compare`; parent chains; the VMware stream sample; hostile images
//! fail in one line naming the file.

mod support;

use std::process::Output;
use support::img::{io, q_ok, run, s_ok, strata, Dir};

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const SUBFORMATS: &[&str] = &[
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
];

/// `info --output=json` without what depends on the graph's children
/// order, and `map --output=json`, print the same for both tools.
fn same_reports(img: &str) {
    let info = |o: &Output| {
        let mut v: serde_json::Value = serde_json::from_str(&out(o)).unwrap();
        v["children"] = serde_json::Value::Null;
        v["actual-size"] = 0.into();
        v
    };
    let c = ["info", "-f", "vmdk", "--output=json", img];
    let (s, q) = (strata(&c), run("qemu-img", &c));
    assert_eq!(info(&s), info(&q), "{img}: {}", err(&s));
    for c in [
        ["map", "-f", "vmdk", "--output=json", img],
        ["check", "-f", "vmdk", "--output=human", img],
    ] {
        let (s, q) = (strata(&c), run("qemu-img", &c));
        assert_eq!(out(&s), out(&q), "{c:?}: {}", err(&s));
        assert_eq!(s.status.code(), q.status.code(), "{c:?}");
    }
}

fn same_contents(d: &Dir, img: &str, what: &str) {
    let (q, s) = (d.p("q.raw"), d.p("s.raw"));
    q_ok(&["convert", "-f", "vmdk", "-O", "raw", img, &q]);
    s_ok(&["convert", "-f", "vmdk", "-O", "raw", img, &s]);
    assert!(files_equal(&q, &s), "{what}: contents differ");
}

/// Whether two files hold the same bytes, compared 1 MiB at a time: the
/// raw images here are up to 16 GiB (sparse), more than RAM.
fn files_equal(a: &str, b: &str) -> bool {
    use std::io::Read;
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    if fa.metadata().unwrap().len() != fb.metadata().unwrap().len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba).unwrap();
        if n == 0 {
            return true;
        }
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            return false;
        }
    }
}

#[test]
fn qemu_images_read_back_as_qemu_img_reads_them() {
    let d = Dir::new("vmdk", "read");
    for sf in SUBFORMATS {
        for zg in ["off", "on"] {
            if zg == "on" && sf.contains("Flat") {
                continue;
            }
            let img = d.p(&format!("q-{sf}-{zg}.vmdk"));
            let o = format!("subformat={sf},zeroed_grain={zg}");
            q_ok(&["create", "-q", "-f", "vmdk", "-o", &o, &img, "2100M"]);
            // Whole grains for streams (qemu refuses anything else).
            let cmds: &[&str] = if *sf == "streamOptimized" {
                &[
                    "write -P 0xa1 0 64k",
                    "write -P 0xb2 2047M 2M",
                    "write -P 0xc3 2099M 1M",
                ]
            } else {
                &[
                    "write -P 0xa1 0 4096",
                    "write -P 0xb2 1000 3000",
                    "write -P 0xc3 2047M 2M",
                    "write -z 1M 1M",
                    "write -P 0xe5 2099M 333",
                ]
            };
            io(&img, "vmdk", cmds);
            same_contents(&d, &img, &o);
            same_reports(&img);
        }
    }
}

#[test]
fn strata_images_are_qemu_imgs() {
    let d = Dir::new("vmdk", "create");
    let opts = [
        "",
        "adapter_type=lsilogic",
        "adapter_type=buslogic,hwversion=7,toolsversion=42",
        "adapter_type=legacyESX,compat6=on",
        "zeroed_grain=on",
    ];
    let files = |dir: &str, prefix: &str| {
        let mut v: Vec<(String, u64)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                let n = n[prefix.len()..].to_string();
                // A separate descriptor's length depends on the random
                // CID: its text is compared below.
                let len = e.metadata().unwrap().len();
                let len = if n == ".vmdk" && len < 4096 { 0 } else { len };
                (n, len)
            })
            .collect();
        v.sort();
        v
    };
    // The descriptor without its random CID.
    let desc = |p: &str| {
        let b = std::fs::read(p).unwrap();
        let at = if b.starts_with(b"KDMV") { 512 } else { 0 };
        let t: Vec<u8> = b[at..].iter().copied().take_while(|&c| c != 0).collect();
        String::from_utf8_lossy(&t)
            .lines()
            .filter(|l| !l.starts_with("CID="))
            .collect::<Vec<_>>()
            .join("\n")
    };
    for sf in SUBFORMATS {
        for o in opts {
            if o.contains("zeroed") && sf.contains("Flat") {
                continue;
            }
            let sub = d.p(&format!("{sf}{}", o.len()));
            std::fs::create_dir_all(&sub).unwrap();
            let opt = format!("subformat={sf}{}{o}", if o.is_empty() { "" } else { "," });
            let (q, s) = (format!("{sub}/q.vmdk"), format!("{sub}/s.vmdk"));
            for size in ["5G", "1000000"] {
                let qo = q_ok(&["create", "-f", "vmdk", "-o", &opt, &q, size]);
                let so = s_ok(&["create", "-f", "vmdk", "-o", &opt, &s, size]);
                assert_eq!(so.replace(&s, &q), qo, "{opt} {size}");
                assert_eq!(files(&sub, "s"), files(&sub, "q"), "{opt} {size}");
                assert_eq!(
                    desc(&s).replace("\"s.", "\"q.").replace("\"s-", "\"q-"),
                    desc(&q),
                    "{opt} {size}: descriptor"
                );
                q_ok(&["check", &s]);
                same_reports(&s);
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
fn strata_converted_images_pass_qemu_img_check_and_compare() {
    let d = Dir::new("vmdk", "convert");
    for (i, sf) in SUBFORMATS.iter().enumerate() {
        for compress in [false, true] {
            let m = d.p("model.raw");
            // Past 2 GiB, so that split images have two extents.
            model(&m, (2 << 30) + 3 * 1000 * 1000 + 512, 17 + i as u64);
            let img = d.p(&format!("c{i}{compress}.vmdk"));
            let o = format!("subformat={sf}");
            let mut args = vec!["convert", "-f", "raw", "-O", "vmdk", "-o", &o];
            if compress {
                args.push("-c");
            }
            args.extend([m.as_str(), img.as_str()]);
            s_ok(&args);
            q_ok(&["check", &img]);
            let c = q_ok(&["compare", "-f", "vmdk", "-F", "raw", &img, &m]);
            assert!(c.contains("Images are identical"), "{sf}: {c}");
            if *sf == "streamOptimized" {
                let map = q_ok(&["map", "--output=json", &img]);
                assert!(map.contains("\"compressed\": true"), "{sf}: {map}");
            }
            let back = d.p("back.raw");
            s_ok(&["convert", "-f", "vmdk", "-O", "raw", &img, &back]);
            let c = q_ok(&["compare", "-f", "raw", "-F", "raw", &back, &m]);
            assert!(c.contains("Images are identical"), "{sf}: {c}");
        }
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
        .args(["-t", "-f", "vmdk", "-k", &sock, img])
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

/// A seeded sequence of qemu-io writes (unaligned ones too) in `size`;
/// for streams, whole new grains only (the format is append-only).
fn write_sequence(seed: u64, size: u64, n: usize, stream: bool) -> Vec<String> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    if stream {
        let grains = size / 65536;
        let mut used = std::collections::HashSet::new();
        return (0..n)
            .filter_map(|_| {
                let g = next() % grains;
                used.insert(g)
                    .then(|| format!("write -P {} {} 65536", next() % 255 + 1, g * 65536))
            })
            .collect();
    }
    (0..n)
        .map(|i| {
            let len = match i % 3 {
                0 => (next() % 2048 + 1) * 512,
                1 => next() % 5000 + 1,
                _ => next() % (3 << 20) + 1,
            }
            .min(size);
            let off = next() % (size - len + 1);
            format!("write -P {} {off} {len}", next() % 255 + 1)
        })
        .collect()
}

#[test]
fn seeded_writes_through_strata_nbd_satisfy_qemu_img() {
    let d = Dir::new("vmdk", "nbd");
    for (i, sf) in SUBFORMATS.iter().enumerate() {
        for zg in ["off", "on"] {
            if zg == "on" && sf.contains("Flat") {
                continue;
            }
            let img = d.p(&format!("n{i}{zg}.vmdk"));
            let o = format!("subformat={sf},zeroed_grain={zg}");
            // Past 2 GiB with a tail that is not a whole grain.
            let size: u64 = (2 << 30) + 3 * 65536 + 1536;
            s_ok(&[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                &o,
                &img,
                &size.to_string(),
            ]);
            let model = d.p("model.raw");
            std::fs::File::create(&model)
                .unwrap()
                .set_len(size)
                .unwrap();
            let mut cmds = write_sequence(31 + i as u64, size, 48, *sf == "streamOptimized");
            // Around the extent boundary.
            if *sf != "streamOptimized" {
                cmds.push(format!("write -P 7 {} 100000", (2u64 << 30) - 50000));
            }
            let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
            io(&model, "raw", &refs);
            through_strata_nbd(&d, &img, &cmds);
            q_ok(&["check", &img]);
            let c = q_ok(&["compare", "-f", "vmdk", "-F", "raw", &img, &model]);
            assert!(c.contains("Images are identical"), "{o}: {c}");
        }
    }
}

#[test]
fn parent_chains_both_ways() {
    let d = Dir::new("vmdk", "chain");
    let base = d.p("base.vmdk");
    q_ok(&["create", "-q", "-f", "vmdk", &base, "64M"]);
    io(&base, "vmdk", &["write -P 0x11 0 8M"]);
    // A child strata-img makes, written unaligned through strata.
    let s = d.p("s.vmdk");
    let so = s_ok(&["create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", &s]);
    let q = d.p("q.vmdk");
    let qo = q_ok(&["create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", &q]);
    assert_eq!(so.replace(&s, &q), qo);
    let j: serde_json::Value = serde_json::from_str(&s_ok(&["info", "--output=json", &s])).unwrap();
    let base_j: serde_json::Value =
        serde_json::from_str(&q_ok(&["info", "--output=json", &base])).unwrap();
    assert_eq!(j["backing-filename"], "base.vmdk");
    assert_eq!(
        j["format-specific"]["data"]["parent-cid"],
        base_j["format-specific"]["data"]["cid"]
    );
    let cmds = [
        "write -P 0x22 1000 3000".to_string(),
        "write -P 0x33 4095k 2k".to_string(),
        "write -P 0x44 10M 1M".to_string(),
    ];
    through_strata_nbd(&d, &s, &cmds);
    io(
        &q,
        "vmdk",
        &cmds.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    q_ok(&["check", &s]);
    let c = q_ok(&["compare", &s, &q]);
    assert!(c.contains("Images are identical"), "{c}");
    same_contents(&d, &q, "qemu child");
    same_reports(&q);
}

#[test]
fn vmware_stream_sample() {
    let d = Dir::new("vmdk", "sample");
    let src = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/samples/iotest-version3.vmdk.bz2"
    );
    let o = run("bzip2", &["-dc", src]);
    assert!(o.status.success());
    let img = d.p("iotest-version3.vmdk");
    std::fs::write(&img, &o.stdout).unwrap();
    let j: serde_json::Value =
        serde_json::from_str(&s_ok(&["info", "--output=json", &img])).unwrap();
    assert_eq!(j["virtual-size"], 17_179_869_184u64);
    assert_eq!(j["format"], "vmdk");
    assert_eq!(j["cluster-size"], 65536);
    assert_eq!(
        j["format-specific"]["data"]["create-type"],
        "streamOptimized"
    );
    same_reports(&img);
    let raw = d.p("sample.raw");
    s_ok(&["convert", "-O", "raw", &img, &raw]);
    // 16 GiB of raw image: read the 99 sectors, not the file.
    let f = std::fs::File::open(&raw).unwrap();
    let mut b = [0u8; 512];
    for i in 0..99u64 {
        let at = i * 655_360 + i * 512;
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, at).unwrap();
        assert!(b.iter().all(|&x| x == 0x30 + (i % 10) as u8), "sector {i}");
    }
}

fn mangle(src: &str, dst: &str, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(src).unwrap();
    f(&mut b);
    std::fs::write(dst, b).unwrap();
}

#[test]
fn hostile_images_fail_in_one_line_naming_the_file() {
    let d = Dir::new("vmdk", "hostile");
    let good = d.p("good.vmdk");
    q_ok(&["create", "-q", "-f", "vmdk", &good, "64M"]);
    io(&good, "vmdk", &["write -P 1 0 1M"]);
    let le32 = |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let le64 = |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    type Mangle = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Mangle, &str)> = vec![
        (
            "version.vmdk",
            Box::new(move |b| le32(b, 4, 9)),
            "Unsupported VMDK version 9",
        ),
        (
            "gtes.vmdk",
            Box::new(move |b| le32(b, 44, 4096)),
            "L2 table size too big",
        ),
        (
            "grain.vmdk",
            Box::new(move |b| le64(b, 20, 0)),
            "L1 entry size is invalid",
        ),
        (
            "huge-grain.vmdk",
            Box::new(move |b| le64(b, 20, 1 << 40)),
            "granularity",
        ),
        (
            "gd.vmdk",
            Box::new(move |b| le64(b, 56, 1 << 50)),
            "grain directory",
        ),
        ("cap.vmdk", Box::new(move |b| le64(b, 12, u64::MAX / 2)), ""),
        ("trunc.vmdk", Box::new(|b| b.truncate(600)), ""),
        (
            "footer.vmdk",
            Box::new(move |b| le64(b, 56, u64::MAX)),
            "Invalid footer",
        ),
        (
            "desc.vmdk",
            Box::new(|b| b[512..512 + 10240].fill(b'x')),
            "descriptor",
        ),
    ];
    for (name, f, msg) in cases {
        let p = d.p(name);
        mangle(&good, &p, f);
        let o = strata(&["convert", "-f", "vmdk", "-O", "raw", &p, &d.p("x.raw")]);
        if o.status.success() {
            continue; // some mangles leave a readable image
        }
        let e = err(&o);
        assert_eq!(e.lines().count(), 1, "{name}: {e}");
        assert!(e.contains(name) && e.contains(msg), "{name}: {e}");
    }
    // A descriptor naming a missing extent, and a bad extent line.
    let desc = d.p("missing.vmdk");
    std::fs::write(
        &desc,
        "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 100 FLAT \"nothere.img\" 0\n",
    )
    .unwrap();
    let e = err(&strata(&["info", &desc]));
    assert!(e.contains("nothere.img"), "{e}");
    std::fs::write(
        &desc,
        "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 100 FLAT \"x.img\"\n",
    )
    .unwrap();
    let e = err(&strata(&["info", &desc]));
    assert!(
        e.contains("missing.vmdk") && e.contains("Invalid extent line"),
        "{e}"
    );
}
