//! Edges of strata-img on qcow2 against qemu-img 10 (the oracle): `map` on
//! extended L2 images, zero clusters that keep their host cluster,
//! compressed clusters and backing chains shorter than the image;
//! persistent dirty bitmaps in `info` and kept intact by Strata's writes;
//! `create -o preallocation=falloc|full`; `commit -r`; `amend` to
//! compat=0.10 with internal snapshots. Images are built with qemu-img and
//! qemu-io; outputs must be byte-identical unless a test says otherwise.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod support;

use support::img::{q_ok, run, s_ok, strata, Dir};

/// qemu-io on a qcow2 image.
fn io(file: &str, cmds: &[&str]) {
    support::img::io(file, "qcow2", cmds)
}

/// `qemu-img create -f qcow2 [-o opts] [-b backing -F qcow2] file [size]`.
fn create(file: &str, opts: &str, backing: Option<&str>, size: Option<&str>) {
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        a.extend(["-o", opts]);
    }
    if let Some(b) = backing {
        a.extend(["-b", b, "-F", "qcow2"]);
    }
    a.push(file);
    if let Some(s) = size {
        a.push(s);
    }
    q_ok(&a);
}

/// Same exit code and stdout; stderr the same but for the program name.
fn same_output(args: &[&str]) {
    let (q, s) = (run("qemu-img", args), strata(args));
    assert_eq!(q.status.code(), s.status.code(), "{args:?}");
    assert_eq!(
        String::from_utf8_lossy(&q.stdout),
        String::from_utf8_lossy(&s.stdout),
        "{args:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&q.stderr),
        String::from_utf8_lossy(&s.stderr).replace("strata-img:", "qemu-img:"),
        "{args:?}"
    );
}

/// Both programs' stdout and stderr into one file, as a shell user would.
fn combined(prog: &str, args: &[&str], out: &str) -> (Option<i32>, String) {
    let f = std::fs::File::create(out).unwrap();
    let st = Command::new(prog)
        .args(args)
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .status()
        .unwrap();
    (st.code(), std::fs::read_to_string(out).unwrap())
}

#[test]
fn map_edge_cases_match_qemu_img() {
    let d = Dir::new("q2edges", "map");
    let mut imgs = Vec::new();
    // Standard L2: a zero cluster that keeps its host cluster (write -z
    // without unmap), one that drops it, a partial zero write.
    let std_ = d.p("std.qcow2");
    create(&std_, "", None, Some("4M"));
    io(
        &std_,
        &[
            "write -P 1 0 128k",
            "write -z 0 64k",
            "write -z -u 64k 64k",
            "write -P 2 1M 64k",
            "write -z 1M 4k",
        ],
    );
    imgs.push(std_);
    // Extended L2: unallocated and zero subclusters inside allocated
    // clusters, zero subclusters of unallocated clusters, whole-cluster
    // zero and discard.
    let ext = d.p("ext.qcow2");
    create(&ext, "extended_l2=on", None, Some("4M"));
    io(
        &ext,
        &[
            "write -P 1 0 4k",
            "write -P 2 64k 64k",
            "write -P 3 200k 8k",
            "write -z 136k 4k",
            "write -z 300k 64k",
            "write -P 4 1M 128k",
            "write -z 1M 32k",
            "discard 1M 96k",
            "write -P 1 2M 64k",
            "write -z 2056k 4k",
            "write -z 2064k 8k",
            "write -z -u 3M 64k",
        ],
    );
    imgs.push(ext);
    // Compressed clusters between plain ones (human output fails on the
    // first compressed one, after the rows before it).
    let comp = d.p("comp.qcow2");
    create(&comp, "", None, Some("4M"));
    io(
        &comp,
        &[
            "write -P 2 0 64k",
            "write -c -P 3 256k 64k",
            "write -c -P 0 512k 64k",
            "write -P 2 1M 64k",
        ],
    );
    imgs.push(comp.clone());
    // Backing chains: a backing image shorter than the overlay (runs past
    // its end belong to the overlay's depth), an extended L2 overlay, and
    // a third level.
    let short = d.p("short.qcow2");
    create(&short, "", None, Some("1M"));
    io(&short, &["write -P 5 0 512k"]);
    let over = d.p("over.qcow2");
    create(&over, "", Some("short.qcow2"), Some("4M"));
    io(&over, &["write -P 6 768k 512k", "write -P 7 3M 64k"]);
    let overx = d.p("overx.qcow2");
    create(&overx, "extended_l2=on", Some("short.qcow2"), Some("4M"));
    io(
        &overx,
        &["write -P 6 1M 4k", "write -P 7 0 4k", "write -z 600k 4k"],
    );
    let top = d.p("top.qcow2");
    create(&top, "", Some("over.qcow2"), None);
    io(&top, &["write -P 8 2M 64k"]);
    imgs.extend([over, overx, top]);
    for f in &imgs {
        for o in ["json", "human"] {
            let out = format!("--output={o}");
            same_output(&["map", &out, f]);
            same_output(&["map", &out, "-s", "100k", "-l", "1100k", f]);
        }
    }
    // stdout and stderr in one file: qemu-img's stdout is fully buffered
    // there, so the error comes first.
    let (qc, qo) = combined("qemu-img", &["map", &comp], &d.p("q.txt"));
    let (sc, so) = combined(
        env!("CARGO_BIN_EXE_strata-img"),
        &["map", &comp],
        &d.p("s.txt"),
    );
    assert_eq!(qc, sc);
    assert_eq!(qo, so.replace("strata-img:", "qemu-img:"));
}

/// Bytes the file occupies on the host.
fn du(p: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn preallocated_images_map_like_qemu_img() {
    let d = Dir::new("q2edges", "prealloc");
    for opts in [
        "preallocation=metadata",
        "preallocation=falloc",
        "preallocation=full",
        "preallocation=metadata,cluster_size=4k",
        "preallocation=falloc,extended_l2=on",
        "preallocation=metadata,extended_l2=on",
        "preallocation=metadata,data_file=DATA",
        "preallocation=off,data_file=DATA,data_file_raw=on",
    ] {
        let q = d.p("q.qcow2");
        let s = d.p("s.qcow2");
        q_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opts.replace("DATA", &d.p("q.data")),
            &q,
            "8M",
        ]);
        s_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opts.replace("DATA", &d.p("s.data")),
            &s,
            "8M",
        ]);
        q_ok(&["check", &s]);
        // Same layout, so the same map, printed by either program.
        let want = q_ok(&["map", "--output=json", &q]);
        assert_eq!(s_ok(&["map", "--output=json", &s]), want, "{opts}");
        assert_eq!(q_ok(&["map", "--output=json", &s]), want, "{opts}");
        assert_eq!(s_ok(&["map", "--output=json", &q]), want, "{opts}");
        // falloc and full reserve the data area on the host, as qemu-img
        // does; metadata leaves it sparse.
        let (dq, ds) = (du(&q), du(&s));
        if opts.contains("falloc") || opts.contains("full") {
            assert!(ds >= 8 << 20, "{opts}: {ds} bytes allocated");
            assert!(dq >= 8 << 20, "{opts}: qemu-img {dq}");
        } else {
            assert!(ds < 2 << 20, "{opts}: {ds} bytes allocated");
        }
        std::fs::remove_file(&q).unwrap();
        std::fs::remove_file(&s).unwrap();
    }
    // full writes zeroes, not holes: the file has no hole in the data area.
    let s = d.p("full.qcow2");
    s_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=full",
        &s,
        "4M",
    ]);
    let map = s_ok(&["map", "--output=json", &s]);
    assert!(!map.contains("\"zero\": true"), "{map}");
    let raw = d.p("full.raw");
    q_ok(&["convert", "-O", "raw", &s, &raw]);
    assert!(std::fs::read(&raw).unwrap().iter().all(|&b| b == 0));
}

/// `info` in both outputs: human byte for byte, JSON value for value
/// (qemu-img's key order is its dictionary's).
fn same_info(img: &str) {
    same_output(&["info", img]);
    let (q, s) = (
        run("qemu-img", &["info", "--output=json", img]),
        strata(&["info", "--output=json", img]),
    );
    let parse = |o: &Output| -> serde_json::Value {
        serde_json::from_slice(&o.stdout).expect("JSON output")
    };
    assert_eq!(parse(&q), parse(&s), "{img}");
}

/// The bitmaps `qemu-img info` lists: (name, flags).
fn bitmaps(img: &str) -> Vec<(String, Vec<String>)> {
    let v: serde_json::Value =
        serde_json::from_str(&q_ok(&["info", "--output=json", "-U", img])).unwrap();
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    let flags = b["flags"].as_array().unwrap();
                    (
                        b["name"].as_str().unwrap().to_string(),
                        flags
                            .iter()
                            .map(|f| f.as_str().unwrap().to_string())
                            .collect(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn flags(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// An image with an enabled bitmap, a disabled one with another
/// granularity and one with an odd name, all with data.
fn with_bitmaps(d: &Dir, name: &str) -> String {
    let img = d.p(name);
    create(&img, "", None, Some("64M"));
    q_ok(&["bitmap", "--add", &img, "b0"]);
    q_ok(&["bitmap", "--add", "--disable", "-g", "128k", &img, "off"]);
    q_ok(&["bitmap", "--add", "-g", "512", &img, "name with space"]);
    io(&img, &["write -P 1 0 1M", "write -P 2 10M 64k"]);
    img
}

#[test]
fn bitmaps_listed_like_qemu_img_and_kept_by_strata_writes() {
    let d = Dir::new("q2edges", "bitmaps");
    let img = with_bitmaps(&d, "b.qcow2");
    same_info(&img);
    let strata_check = |f: &str| {
        let r = strata(&["check", f]);
        assert_eq!(
            r.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&r.stdout)
        );
        let q = run("qemu-img", &["check", f]);
        assert_eq!(q.stdout, r.stdout, "check output");
    };
    strata_check(&img);
    // A bitmap left in use by a process that died (qemu-io's abort).
    let crashed = d.p("crashed.qcow2");
    create(&crashed, "", None, Some("16M"));
    q_ok(&["bitmap", "--add", &crashed, "b0"]);
    let _ = run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write 0 64k", "-c", "abort", &crashed],
    );
    assert_eq!(
        bitmaps(&crashed),
        [("b0".into(), flags(&["in-use", "auto"]))]
    );
    same_info(&crashed);

    // Nothing that leaves guest data alone touches the bitmaps.
    let before = bitmaps(&img);
    s_ok(&["snapshot", "-c", "s1", &img]);
    s_ok(&["snapshot", "-d", "s1", &img]);
    s_ok(&["check", "-r", "all", &img]);
    assert_eq!(bitmaps(&img), before);
    // A Strata write (commit into the image as a base) leaves the enabled
    // bitmaps in use (they did not record it), the disabled one as it was,
    // every bitmap cluster referenced, and QEMU able to open it.
    let top = d.p("top.qcow2");
    create(&top, "", Some("b.qcow2"), None);
    io(&top, &["write -P 9 20M 1M"]);
    s_ok(&["commit", "-q", &top]);
    q_ok(&["check", &img]);
    strata_check(&img);
    assert_eq!(
        bitmaps(&img),
        [
            ("b0".into(), flags(&["in-use", "auto"])),
            ("off".into(), flags(&[])),
            ("name with space".into(), flags(&["in-use", "auto"])),
        ]
    );
    same_info(&img);
    io(&img, &["read -P 9 20M 1M", "write -P 3 30M 64k"]);
    q_ok(&["check", &img]);
    // A resize makes every table the wrong size: all are in use then.
    let img2 = with_bitmaps(&d, "r.qcow2");
    s_ok(&["resize", "-q", &img2, "128M"]);
    q_ok(&["check", &img2]);
    assert!(bitmaps(&img2)
        .iter()
        .all(|(_, f)| f.contains(&"in-use".to_string())));
    same_info(&img2);
}

#[test]
fn hostile_bitmap_directories_are_refused_like_qemu_img() {
    let d = Dir::new("q2edges", "bmhostile");
    let good = with_bitmaps(&d, "good.qcow2");
    let data = std::fs::read(&good).unwrap();
    let be32 = |b: &[u8], o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let be64 = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    // The bitmaps extension and the directory it points at.
    let mut off = be32(&data, 100);
    let ext = loop {
        let (ty, len) = (be32(&data, off), be32(&data, off + 4));
        assert_ne!(ty, 0, "no bitmaps extension");
        if ty == 0x2385_2875 {
            break off + 8;
        }
        off += 8 + len.div_ceil(8) * 8;
    };
    let dir = be64(&data, ext + 16);
    // (what, byte to change, its new value)
    let cases = [
        ("reserved", ext + 7, 1),
        ("zero bitmaps", ext + 3, 0),
        ("count", ext + 3, 4),
        ("offset", ext + 23, 8),
        ("dir size", ext + 12, 0x40),
        ("granularity", dir + 17, 40),
        ("type", dir + 16, 7),
        ("flags", dir + 14, 1),
        ("table", dir + 6, 2),
        ("table size", dir + 11, 9),
        ("extra data", dir + 23, 8),
        // (qemu-img prints the bytes after the entry as the empty name.)
        ("name size", dir + 19, 0),
    ];
    for (what, at, v) in cases {
        let mut b = data.clone();
        b[at] = v;
        let bad = d.p("bad.qcow2");
        std::fs::write(&bad, &b).unwrap();
        let q = run("qemu-img", &["info", &bad]);
        let s = strata(&["info", &bad]);
        assert_eq!(q.status.code(), Some(1), "{what}");
        assert_eq!(s.status.code(), Some(1), "{what}");
        // One line, naming the file, with qemu-img's reason.
        let qe = String::from_utf8_lossy(&q.stderr);
        let se = String::from_utf8_lossy(&s.stderr);
        let prefix = format!("qemu-img: Could not open '{bad}': ");
        let mut reason = qe
            .trim_end()
            .strip_prefix(&prefix)
            .expect("qemu-img's message");
        if what == "name size" {
            reason = "doesn't satisfy the constraints";
        }
        assert_eq!(se.lines().count(), 1, "{what}: {se}");
        assert!(
            se.contains(&bad) && se.trim_end().ends_with(reason),
            "{what}: {se} vs {qe}"
        );
        let s = strata(&["check", &bad]);
        assert_eq!(s.status.code(), Some(1), "{what}");
    }
    // Without the autoclear bit the bitmaps are ignored, as QEMU does.
    let mut b = data.clone();
    b[88..96].fill(0);
    let ign = d.p("ignored.qcow2");
    std::fs::write(&ign, &b).unwrap();
    let s = s_ok(&["info", &ign]);
    assert!(!s.contains("bitmaps:"), "{s}");
}

#[test]
fn commit_rate_limit_is_applied_and_checked() {
    let d = Dir::new("q2edges", "rate");
    let base = d.p("base.qcow2");
    create(&base, "", None, Some("8M"));
    let top = d.p("top.qcow2");
    create(&top, "", Some("base.qcow2"), None);
    // 2 MiB at 4 MiB/s takes half a second (qemu-img: about 0.52 s);
    // unlimited, a small fraction of that.
    io(&top, &["write -P 7 1M 2M"]);
    let t = Instant::now();
    s_ok(&["commit", "-q", "-r", "4M", &top]);
    let limited = t.elapsed();
    assert!(limited >= Duration::from_millis(450), "{limited:?}");
    assert!(limited < Duration::from_secs(10), "{limited:?}");
    io(&base, &["read -P 7 1M 2M"]);
    q_ok(&["check", &base]);
    io(&top, &["write -P 8 1M 2M"]);
    let t = Instant::now();
    s_ok(&["commit", "-q", "-r", "0", &top]);
    assert!(t.elapsed() < limited, "-r 0 is no limit");
    io(&base, &["read -P 8 1M 2M"]);
    // Bad values: qemu-img's one line and exit code, nothing committed.
    io(&top, &["write -P 9 1M 64k"]);
    for r in ["abc", "-1", "10x", "", "1e3", "16E", "99999999999999999999"] {
        same_output(&["commit", "-r", r, &top]);
    }
    io(&base, &["read -P 8 1M 64k"]);
}

/// Guest contents of `img` (or of its internal snapshot `snap`), read by
/// strata-img (which refuses zero clusters in a version 2 image).
fn contents(d: &Dir, img: &str, snap: Option<&str>) -> Vec<u8> {
    let out = d.p("contents.raw");
    let _ = std::fs::remove_file(&out);
    match snap {
        Some(s) => s_ok(&["convert", "-l", s, "-O", "raw", img, &out]),
        None => s_ok(&["convert", "-O", "raw", img, &out]),
    };
    std::fs::read(&out).unwrap()
}

#[test]
fn amend_to_compat_0_10_keeps_internal_snapshots() {
    let d = Dir::new("q2edges", "downgrade");
    let base = d.p("base.qcow2");
    create(&base, "", None, Some("4M"));
    io(&base, &["write -P 9 0 4M"]);
    for backing in [None, Some("base.qcow2")] {
        let img = d.p("img.qcow2");
        let _ = std::fs::remove_file(&img);
        create(&img, "", backing, Some("4M"));
        // Plain and preallocated zero clusters in tables the snapshots share
        // with each other and with the active state, and in tables only a
        // snapshot has; compressed clusters.
        io(
            &img,
            &[
                "write -P 1 0 128k",
                "write -z 256k 64k",
                "write -c -P 2 512k 64k",
            ],
        );
        q_ok(&["snapshot", "-c", "s1", &img]);
        io(
            &img,
            &[
                "write -z 0 64k",
                "write -z -u 64k 64k",
                "write -P 3 1M 64k",
                "write -z 1M 64k",
                "write -z 2M 64k",
            ],
        );
        q_ok(&["snapshot", "-c", "s2", &img]);
        io(&img, &["write -P 4 2M 128k", "write -z 3M 64k"]);
        let views = [None, Some("s1"), Some("s2")];
        let before: Vec<Vec<u8>> = views.iter().map(|v| contents(&d, &img, *v)).collect();
        let list = q_ok(&["snapshot", "-l", &img]);
        s_ok(&["amend", "-o", "compat=0.10", &img]);
        q_ok(&["check", &img]);
        assert_eq!(s_ok(&["check", &img]), q_ok(&["check", &img]));
        for (v, want) in views.iter().zip(&before) {
            assert!(contents(&d, &img, *v) == *want, "{backing:?} {v:?}");
        }
        assert_eq!(q_ok(&["snapshot", "-l", &img]), list);
        same_info(&img);
        assert!(q_ok(&["info", &img]).contains("compat: 0.10"));
        // And back: the snapshots still apply.
        s_ok(&["amend", "-o", "compat=1.1", &img]);
        q_ok(&["check", &img]);
        s_ok(&["snapshot", "-a", "s1", &img]);
        assert!(contents(&d, &img, None) == before[1], "{backing:?}");
        q_ok(&["check", &img]);
    }
}
