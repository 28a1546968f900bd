//! strata-img's qcow2 tools against qemu-img: `convert -O qcow2` (`-c`,
//! `-o`, `-B`, `-S`, qcow2 sources with backing chains), `map`, `compare`,
//! `info --backing-chain`, `commit`, `rebase`, `resize`, `amend` and
//! `measure`. Contents are checked with `qemu-img compare`, metadata with
//! `qemu-img check`, and printed output against qemu-img's own.

use std::path::Path;
use std::process::Output;

mod support;

use support::img::{io, q_ok, run, s_ok, strata, Dir};

fn same(a: &str, b: &str) {
    q_ok(&["compare", a, b]);
}

fn clean(img: &str) {
    q_ok(&["check", img]);
}

fn size_of(p: &str) -> u64 {
    std::fs::metadata(Path::new(p)).unwrap().len()
}

/// A raw image with data, a zero run and holes.
fn source(d: &Dir) -> String {
    let src = d.p("src.raw");
    q_ok(&["create", "-q", "-f", "raw", &src, "64M"]);
    io(
        &src,
        "raw",
        &[
            "write -P 1 0 1M",
            "write -P 2 10M 3M",
            "write -P 0 20M 1M",
            "write -P 3 33000 5000",
            // Clusters that are part hole, part data, in a later chunk
            // (convert reuses an earlier chunk's buffer: holes must read
            // as zeroes, not as the old bytes).
            "write -P 5 5246976 4096",
            "write -P 6 4259840 512",
            "write -P 4 63M 1M",
        ],
    );
    src
}

#[test]
fn convert_to_qcow2_options() {
    let d = Dir::new("q2tools", "conv");
    let src = source(&d);
    for o in [
        "",
        "compat=0.10",
        "cluster_size=512",
        "cluster_size=2M",
        "refcount_bits=1",
        "refcount_bits=64",
        "extended_l2=on",
        "lazy_refcounts=on",
        "preallocation=metadata",
        "preallocation=full,cluster_size=4k",
        "compression_type=zstd",
    ] {
        let t = d.p("t.qcow2");
        let mut a = vec!["convert", "-O", "qcow2"];
        if !o.is_empty() {
            a.extend(["-o", o]);
        }
        a.extend([src.as_str(), t.as_str()]);
        s_ok(&a);
        clean(&t);
        same(&src, &t);
        // And back to raw through Strata.
        let r = d.p("back.raw");
        s_ok(&["convert", "-O", "raw", &t, &r]);
        same(&src, &r);
    }
}

#[test]
fn convert_compressed_is_smaller_and_readable() {
    let d = Dir::new("q2tools", "comp");
    let src = source(&d);
    let plain = d.p("plain.qcow2");
    s_ok(&["convert", "-O", "qcow2", &src, &plain]);
    for ct in ["zlib", "zstd"] {
        let t = d.p(&format!("c-{ct}.qcow2"));
        let o = format!("compression_type={ct}");
        s_ok(&["convert", "-c", "-O", "qcow2", "-o", &o, &src, &t]);
        clean(&t);
        same(&src, &t);
        assert!(size_of(&t) < size_of(&plain) / 4, "{ct}: not smaller");
        let info = q_ok(&["info", &t]);
        assert!(info.contains(&format!("compression type: {ct}")), "{info}");
        // qemu-img reads it back exactly.
        let r = d.p("q.raw");
        q_ok(&["convert", "-O", "raw", &t, &r]);
        same(&src, &r);
        let c = q_ok(&["check", &t]);
        assert!(!c.contains(" 0.00% compressed"), "{c}");
    }
}

#[test]
fn convert_with_backing_writes_differences_only() {
    let d = Dir::new("q2tools", "back");
    let base = d.p("base.qcow2");
    q_ok(&["create", "-q", "-f", "qcow2", &base, "64M"]);
    io(&base, "qcow2", &["write -P 1 0 1M", "write -P 9 40M 2M"]);
    let top = d.p("top.qcow2");
    q_ok(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
    ]);
    io(&top, "qcow2", &["write -P 5 512k 64k", "write -z 40M 64k"]);
    // A qcow2 source with a backing chain, flattened.
    let flat = d.p("flat.raw");
    s_ok(&["convert", "-O", "raw", &top, &flat]);
    same(&top, &flat);
    let flatq = d.p("flat.qcow2");
    s_ok(&["convert", "-O", "qcow2", &top, &flatq]);
    clean(&flatq);
    same(&top, &flatq);
    // -B: only what differs from base lands in the new image.
    let diff = d.p("diff.qcow2");
    s_ok(&[
        "convert", "-O", "qcow2", "-B", &base, "-F", "qcow2", &flat, &diff,
    ]);
    clean(&diff);
    same(&flat, &diff);
    let map = q_ok(&["map", "--output=json", &diff]);
    let own: Vec<&str> = map
        .lines()
        .filter(|l| l.contains("\"depth\": 0") && l.contains("\"present\": true"))
        .collect();
    // The 64k data cluster and the 64k zero cluster, nothing else.
    assert_eq!(own.len(), 2, "{map}");
    assert!(own.iter().all(|l| l.contains("\"length\": 65536")), "{map}");
    let info = q_ok(&["info", &diff]);
    assert!(info.contains("backing file format: qcow2"), "{info}");
}

#[test]
fn convert_sparse_option() {
    let d = Dir::new("q2tools", "sparse");
    let src = source(&d);
    let full = d.p("full.qcow2");
    s_ok(&["convert", "-O", "qcow2", "-S", "0", &src, &full]);
    clean(&full);
    same(&src, &full);
    let sparse = d.p("sparse.qcow2");
    s_ok(&["convert", "-O", "qcow2", &src, &sparse]);
    assert!(size_of(&sparse) * 4 < size_of(&full));
    // The explicit zero MiB of the source is not allocated by default.
    let map = q_ok(&["map", "--output=json", &sparse]);
    assert!(!map.contains("\"start\": 20971520, \"length\": 1048576, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"), "{map}");
}

/// base (qcow2) <- mid (qcow2) <- top (qcow2) with data, zero clusters and
/// holes at every level; returns (base, mid, top).
fn chain(d: &Dir) -> (String, String, String) {
    let base = d.p("base.qcow2");
    q_ok(&["create", "-q", "-f", "qcow2", &base, "64M"]);
    io(&base, "qcow2", &["write -P 1 0 1M", "write -P 9 40M 2M"]);
    let mid = d.p("mid.qcow2");
    q_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &mid,
    ]);
    io(&mid, "qcow2", &["write -P 5 512k 64k", "write -z 40M 64k"]);
    let top = d.p("top.qcow2");
    q_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        &top,
    ]);
    io(&top, "qcow2", &["write -P 7 1M 64k", "write -z 2M 128k"]);
    (base, mid, top)
}

fn both(args: &[&str]) -> (Output, Output) {
    (run("qemu-img", args), strata(args))
}

fn same_output(args: &[&str]) {
    let (q, s) = both(args);
    assert_eq!(q.status.code(), s.status.code(), "{args:?}");
    assert_eq!(
        String::from_utf8_lossy(&q.stdout),
        String::from_utf8_lossy(&s.stdout),
        "{args:?}"
    );
}

#[test]
fn map_matches_qemu_img() {
    let d = Dir::new("q2tools", "map");
    let (_, _, top) = chain(&d);
    let src = source(&d);
    let plain = d.p("plain.qcow2");
    s_ok(&["convert", "-O", "qcow2", &src, &plain]);
    let comp = d.p("comp.qcow2");
    s_ok(&["convert", "-c", "-O", "qcow2", &src, &comp]);
    let pre = d.p("pre.qcow2");
    q_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        &pre,
        "8M",
    ]);
    io(&pre, "qcow2", &["write -P 3 1M 64k"]);
    for f in [&top, &plain, &comp, &pre, &src] {
        same_output(&["map", "--output=json", f]);
        same_output(&["map", "--output=json", "-s", "1M", "-l", "3M", f]);
        if f != &comp {
            same_output(&["map", f]);
        } else {
            // Compressed clusters have no offset to print.
            let (q, s) = both(&["map", f]);
            assert_eq!(q.status.code(), s.status.code());
        }
    }
}

#[test]
fn compare_qcow2_strict_and_sizes() {
    let d = Dir::new("q2tools", "cmp");
    let (_, mid, top) = chain(&d);
    let flat = d.p("flat.qcow2");
    s_ok(&["convert", "-O", "qcow2", &top, &flat]);
    let raw = d.p("flat.raw");
    s_ok(&["convert", "-O", "raw", &top, &raw]);
    let comp = d.p("comp.qcow2");
    s_ok(&["convert", "-c", "-O", "qcow2", &top, &comp]);
    let z1 = d.p("z1.qcow2");
    q_ok(&["create", "-q", "-f", "qcow2", &z1, "64M"]);
    io(&z1, "qcow2", &["write -z 0 1M"]);
    let z2 = d.p("z2.qcow2");
    q_ok(&["create", "-q", "-f", "qcow2", &z2, "64M"]);
    let big = d.p("big.qcow2");
    q_ok(&["create", "-q", "-f", "qcow2", &big, "65M"]);
    for (a, b) in [
        (&top, &flat),
        (&top, &raw),
        (&top, &comp),
        (&top, &mid),
        (&flat, &raw),
        (&z1, &z2),
        (&z1, &big),
        (&top, &top),
    ] {
        same_output(&["compare", a, b]);
        same_output(&["compare", "-s", a, b]);
    }
}

#[test]
fn info_backing_chain_matches_qemu_img() {
    let d = Dir::new("q2tools", "info");
    let (_, _, top) = chain(&d);
    for args in [
        vec!["info", "--backing-chain", top.as_str()],
        vec!["info", top.as_str()],
    ] {
        same_output(&args);
        // qemu-img's key order is its dictionary's: compare the values.
        let mut j = args.clone();
        j.insert(1, "--output=json");
        let (q, s) = both(&j);
        let parse = |o: &Output| -> serde_json::Value {
            serde_json::from_slice(&o.stdout).expect("JSON output")
        };
        assert_eq!(parse(&q), parse(&s), "{j:?}");
    }
}

fn to_raw(img: &str, out: &str) {
    q_ok(&["convert", "-O", "raw", img, out]);
}

#[test]
fn commit_default_d_and_b() {
    for mode in ["default", "-d", "-b"] {
        let d = Dir::new("q2tools", &format!("commit{mode}"));
        let (base, mid, top) = chain(&d);
        let exp = d.p("exp.raw");
        to_raw(&top, &exp);
        let expmid = d.p("expmid.raw");
        to_raw(&mid, &expmid);
        let out = match mode {
            "default" => s_ok(&["commit", &top]),
            "-d" => s_ok(&["commit", "-d", &top]),
            _ => s_ok(&["commit", "-b", &base, &top]),
        };
        assert_eq!(out, "Image committed.\n");
        for f in [&base, &mid, &top] {
            clean(f);
        }
        same(&top, &exp);
        let own = q_ok(&["map", "--output=json", &top]);
        let own = own.lines().filter(|l| l.contains("\"depth\": 0")).count();
        match mode {
            "default" => {
                same(&mid, &exp);
                assert_eq!(own, 0, "the committed image is emptied");
            }
            "-d" => {
                same(&mid, &exp);
                assert!(own > 0, "-d keeps the image");
            }
            _ => {
                // As with qemu-img, mid now sees the committed data where
                // it allocates nothing itself.
                same(&base, &exp);
                let _ = &expmid;
            }
        }
    }
    // A raw base smaller than the image grows.
    let d = Dir::new("q2tools", "commitraw");
    let b = d.p("b.raw");
    q_ok(&["create", "-q", "-f", "raw", &b, "32M"]);
    io(&b, "raw", &["write -P 3 0 1M"]);
    let t = d.p("t.qcow2");
    q_ok(&[
        "create", "-q", "-f", "qcow2", "-b", &b, "-F", "raw", &t, "64M",
    ]);
    io(&t, "qcow2", &["write -P 4 40M 1M"]);
    let exp = d.p("exp.raw");
    to_raw(&t, &exp);
    s_ok(&["commit", "-q", &t]);
    q_ok(&["compare", "-f", "raw", "-F", "raw", &b, &exp]);
}

#[test]
fn rebase_safe_unsafe_and_none() {
    let d = Dir::new("q2tools", "rebase");
    let (base, _, top) = chain(&d);
    let exp = d.p("exp.raw");
    to_raw(&top, &exp);
    let other = d.p("other.raw");
    q_ok(&["create", "-q", "-f", "raw", &other, "64M"]);
    io(&other, "raw", &["write -P 6 0 3M"]);
    let work = d.p("work.qcow2");
    for (args, keeps) in [
        (vec!["-b", "base.qcow2", "-F", "qcow2"], true),
        (vec!["-b", other.as_str(), "-F", "raw"], true),
        (vec!["-b", ""], true),
        (vec!["-u", "-b", "base.qcow2", "-F", "qcow2"], false),
    ] {
        std::fs::copy(&top, &work).unwrap();
        let mut a = vec!["rebase"];
        a.extend(args.iter());
        a.push(&work);
        s_ok(&a);
        clean(&work);
        let info = q_ok(&["info", "--output=json", &work]);
        match args.iter().position(|x| *x == "-b").map(|i| args[i + 1]) {
            Some("") => assert!(!info.contains("backing-filename"), "{info}"),
            Some(b) => assert!(
                info.contains(&format!("\"backing-filename\": \"{b}\"")),
                "{info}"
            ),
            None => unreachable!(),
        }
        let r = run("qemu-img", &["compare", &work, &exp]);
        assert_eq!(r.status.success(), keeps, "{args:?}");
    }
    let _ = base;
}

#[test]
fn resize_grow_and_shrink_like_qemu() {
    let d = Dir::new("q2tools", "resize");
    let (_, _, top) = chain(&d);
    let src = source(&d);
    let plain = d.p("plain.qcow2");
    s_ok(&["convert", "-O", "qcow2", &src, &plain]);
    for img in [&plain, &top] {
        let (s, q) = (d.p("s.qcow2"), d.p("q.qcow2"));
        std::fs::copy(img, &s).unwrap();
        std::fs::copy(img, &q).unwrap();
        for (shrink, size) in [
            (false, "+100M"),
            (true, "12M"),
            (false, "64M"),
            (true, "1M"),
            (false, "1G"),
        ] {
            let mut a = vec!["resize", "-q"];
            if shrink {
                a.push("--shrink");
            }
            let (mut sa, mut qa) = (a.clone(), a.clone());
            sa.extend([s.as_str(), size]);
            qa.extend([q.as_str(), size]);
            s_ok(&sa);
            q_ok(&qa);
            clean(&s);
            same(&s, &q);
        }
    }
    let r = strata(&["resize", &plain, "1M"]);
    assert_eq!(r.status.code(), Some(1));
}

#[test]
fn amend_versions_and_refcounts() {
    let d = Dir::new("q2tools", "amend");
    let src = source(&d);
    let orig = d.p("orig.qcow2");
    s_ok(&["convert", "-O", "qcow2", &src, &orig]);
    io(&orig, "qcow2", &["write -z 5M 1M"]);
    let (_, _, top) = chain(&d);
    let img = d.p("img.qcow2");
    for (from, seq) in [
        (&orig, vec!["compat=0.10", "compat=1.1"]),
        (&orig, vec!["lazy_refcounts=on", "lazy_refcounts=off"]),
        (
            &orig,
            vec!["refcount_bits=1", "refcount_bits=64", "refcount_bits=16"],
        ),
        (
            &orig,
            vec![
                "refcount_bits=1",
                "refcount_bits=16,compat=0.10",
                "compat=1.1,refcount_bits=4",
            ],
        ),
        (&top, vec!["compat=0.10"]),
    ] {
        std::fs::copy(from, &img).unwrap();
        for o in seq {
            s_ok(&["amend", "-o", o, &img]);
            clean(&img);
            same(from, &img);
            let info = q_ok(&["info", &img]);
            for kv in o.split(',') {
                let (k, v) = kv.split_once('=').unwrap();
                let line = match k {
                    "compat" => format!("compat: {v}"),
                    "lazy_refcounts" => format!("lazy refcounts: {}", v == "on"),
                    _ => format!("refcount bits: {v}"),
                };
                assert!(info.contains(&line), "{o}: {info}");
            }
        }
    }
    // Errors as qemu-img gives them.
    for o in ["cluster_size=4k", "foo=1"] {
        let (q, s) = both(&["amend", "-o", o, &img]);
        assert_eq!(q.status.code(), s.status.code(), "{o}");
    }
    let r = strata(&["amend", "-f", "raw", "-o", "compat=1.1", &src]);
    assert_eq!(r.status.code(), Some(1));
}

#[test]
fn measure_matches_qemu_img() {
    let d = Dir::new("q2tools", "measure");
    let (_, _, top) = chain(&d);
    let src = source(&d);
    let comp = d.p("comp.qcow2");
    s_ok(&["convert", "-c", "-O", "qcow2", &src, &comp]);
    let cases: Vec<Vec<&str>> = vec![
        vec!["-O", "qcow2", "--size", "1G"],
        vec!["-O", "qcow2", "--size", "100T"],
        vec![
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=64",
            "--size",
            "10G",
        ],
        vec!["-O", "qcow2", "-o", "cluster_size=2M", "--size", "7G"],
        vec!["-O", "qcow2", "-o", "cluster_size=16k,extended_l2=on", &src],
        vec!["-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=1", &src],
        vec!["-O", "qcow2", "-o", "preallocation=full", &src],
        vec!["-O", "qcow2", &top],
        vec!["-O", "qcow2", "-o", "compat=0.10", &top],
        vec!["-O", "qcow2", &comp],
        vec!["-O", "raw", &src],
        vec!["--size", "1G"],
        vec!["-O", "qcow2", "--size", "1G", &src],
        vec!["-O", "vmdk", "--size", "1G"],
    ];
    for c in cases {
        for out in ["--output=human", "--output=json"] {
            let mut a = vec!["measure", out];
            a.extend(c.iter());
            same_output(&a);
        }
    }
}

#[test]
fn convert_and_measure_from_internal_snapshots() {
    let d = Dir::new("q2tools", "snap");
    let img = d.p("sn.qcow2");
    q_ok(&["create", "-q", "-f", "qcow2", &img, "64M"]);
    io(&img, "qcow2", &["write -P 1 0 1M"]);
    q_ok(&["snapshot", "-c", "s1", &img]);
    io(&img, "qcow2", &["write -P 2 512k 1M", "write -z 4M 64k"]);
    q_ok(&["resize", "-q", &img, "128M"]);
    q_ok(&["snapshot", "-c", "s2", &img]);
    io(&img, "qcow2", &["write -P 3 0 64k"]);
    let (q, s, sq) = (d.p("q.raw"), d.p("s.raw"), d.p("s.qcow2"));
    for l in ["s1", "snapshot.name=s2", "snapshot.id=1", "2"] {
        q_ok(&["convert", "-l", l, "-O", "raw", &img, &q]);
        s_ok(&["convert", "-l", l, "-O", "raw", &img, &s]);
        assert_eq!(
            std::fs::read(&q).unwrap(),
            std::fs::read(&s).unwrap(),
            "{l}"
        );
        s_ok(&["convert", "-l", l, "-O", "qcow2", &img, &sq]);
        clean(&sq);
        same(&q, &sq);
        same_output(&["measure", "-O", "qcow2", "-l", l, &img]);
    }
    let r = strata(&["convert", "-l", "nope", "-O", "raw", &img, &s]);
    assert_eq!(r.status.code(), Some(1));
}
