//! qcow2 interop with QEMU's own tools as oracles.
//!
//! Reading: for a matrix of images made by `qemu-img create` and filled by
//! `qemu-io -c 'write -P ...'` (plus zero writes, discards, compression,
//! snapshots, backing chains and data files), Strata reads exactly what
//! `qemu-img convert -O raw` produces.
//! Writing: Strata writes into images, then `qemu-img check` is clean and
//! `qemu-img compare` finds them equal to a raw model.

mod common;

use block::graph::BlockGraph;
use common::TempDir;
use std::io::IoSliceMut;
use std::process::Command;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_io(img: &str, fmt_opts: &[&str], cmds: &[&str]) {
    let mut args: Vec<&str> = fmt_opts.to_vec();
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img);
    run("qemu-io", &args);
}

/// Read the whole image through Strata (probing the format).
fn strata_read(path: &str) -> Vec<u8> {
    let g = BlockGraph::new();
    let node = g.open_image(path, None, true, &[]).expect("strata opens");
    let mut buf = vec![0u8; node.len() as usize];
    // Read in odd-sized pieces to exercise mapping across clusters.
    let mut off = 0usize;
    let mut step = 1 << 16;
    while off < buf.len() {
        let n = step.min(buf.len() - off);
        node.read_vectored(off as u64, &mut [IoSliceMut::new(&mut buf[off..off + n])])
            .expect("strata reads");
        off += n;
        step = if step == 1 << 16 {
            3 * 512 + 4096
        } else {
            1 << 16
        };
    }
    buf
}

fn qemu_raw(t: &TempDir, path: &str) -> Vec<u8> {
    let out = t.path("oracle.raw");
    run("qemu-img", &["convert", "-U", "-O", "raw", path, &out]);
    std::fs::read(&out).unwrap()
}

fn assert_same(t: &TempDir, path: &str, what: &str) {
    let a = strata_read(path);
    let b = qemu_raw(t, path);
    assert_eq!(a.len(), b.len(), "{what}: sizes differ");
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!(
            "{what}: first difference at byte {i} (strata {:#x}, qemu {:#x})",
            a[i], b[i]
        );
    }
}

/// A workload of pattern writes, zero writes and discards.
fn fill(img: &str, cs: u64, size: u64) {
    let s = |v: u64| v.to_string();
    let c = [
        format!("write -P 0x11 0 {}", s(cs * 3 + 512)),
        format!("write -P 0x22 {} {}", s(size / 2 + 1024), s(cs + 4096)),
        format!("write -P 0x33 {} 512", s(size - 512)),
        format!("write -z {} {}", s(cs), s(cs)),
        format!("write -P 0x44 {} 4096", s(size / 4)),
        format!("discard {} {}", s(size / 4), s(cs.max(4096))),
        format!("write -P 0x55 {} 1536", s(size / 3 + 512)),
    ];
    let refs: Vec<&str> = c.iter().map(|x| x.as_str()).collect();
    qemu_io(img, &["-f", "qcow2"], &refs);
}

#[test]
fn reads_what_qemu_img_made() {
    let t = TempDir::new("q2read");
    let size: u64 = 8 << 20;
    let cases: &[(&str, u64)] = &[
        ("compat=0.10", 65536),
        ("compat=1.1", 65536),
        ("cluster_size=512", 512),
        ("cluster_size=4096", 4096),
        ("cluster_size=2M", 2 << 20),
        ("refcount_bits=1", 65536),
        ("refcount_bits=64,cluster_size=4096", 4096),
        ("extended_l2=on,cluster_size=65536", 65536),
        ("extended_l2=on,cluster_size=2M", 2 << 20),
        ("lazy_refcounts=on", 65536),
        ("compression_type=zstd", 65536),
        ("compat=0.10,cluster_size=512", 512),
    ];
    for (i, (opts, cs)) in cases.iter().enumerate() {
        let p = t.path(&format!("m{i}.qcow2"));
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                opts,
                &p,
                &size.to_string(),
            ],
        );
        fill(&p, *cs, size);
        assert_same(&t, &p, opts);
    }
}

#[test]
fn reads_compressed_images() {
    let t = TempDir::new("q2comp");
    let raw = t.path("src.raw");
    let data: Vec<u8> = (0..(3u32 << 20))
        .map(|i| ((i / 4096) as u8) ^ (i as u8 & 3))
        .collect();
    std::fs::write(&raw, &data).unwrap();
    for (ct, cs) in [
        ("zlib", "65536"),
        ("zstd", "65536"),
        ("zlib", "4096"),
        ("zstd", "2M"),
        ("zlib", "512"),
    ] {
        let p = t.path(&format!("c-{ct}-{cs}.qcow2"));
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={ct},cluster_size={cs}"),
                &raw,
                &p,
            ],
        );
        let got = strata_read(&p);
        assert!(got == data, "{ct}/{cs}: compressed image reads differently");
        // Partial overwrites on top of compressed clusters, by QEMU.
        qemu_io(&p, &["-f", "qcow2"], &["write -P 0x77 1000 3000"]);
        assert_same(&t, &p, &format!("compressed {ct} {cs} after overwrite"));
    }
}

#[test]
fn reads_backing_chains_and_data_files() {
    let t = TempDir::new("q2chain");
    let size = "4M";
    let base = t.path("base.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &base, size]);
    qemu_io(&base, &["-f", "raw"], &["write -P 0xa1 0 4M"]);
    // Relative backing names, resolved against the overlay's directory.
    let mid = t.path("mid.qcow2");
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &mid,
        ],
    );
    qemu_io(
        &mid,
        &["-f", "qcow2"],
        &["write -P 0xb2 65536 100000", "write -z 1048576 65536"],
    );
    let top = t.path("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            &top,
        ],
    );
    qemu_io(
        &top,
        &["-f", "qcow2"],
        &["write -P 0xc3 70000 5000", "discard 2097152 65536"],
    );
    assert_same(&t, &top, "depth-3 chain");
    // A backing file smaller than the overlay reads as zeroes past its end.
    let big = t.path("big.qcow2");
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", &mid, "-F", "qcow2", &big, "6M",
        ],
    );
    assert_same(&t, &big, "overlay larger than backing");
    // External data file.
    let df = t.path("df.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", t.path("df.data")),
            &df,
            size,
        ],
    );
    qemu_io(
        &df,
        &["-f", "qcow2"],
        &["write -P 0xd4 4096 200000", "write -z 0 512"],
    );
    assert_same(&t, &df, "data file");
    let dfr = t.path("dfr.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={},data_file_raw=on", t.path("dfr.data")),
            &dfr,
            size,
        ],
    );
    qemu_io(&dfr, &["-f", "qcow2"], &["write -P 0xe5 8192 300000"]);
    assert_same(&t, &dfr, "raw data file");
}

#[test]
fn reads_images_with_internal_snapshots() {
    let t = TempDir::new("q2snap");
    let p = t.path("s.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", &p, "4M"]);
    qemu_io(&p, &["-f", "qcow2"], &["write -P 0x10 0 1M"]);
    run("qemu-img", &["snapshot", "-c", "one", &p]);
    qemu_io(&p, &["-f", "qcow2"], &["write -P 0x20 65536 4096"]);
    run("qemu-img", &["snapshot", "-c", "two", &p]);
    qemu_io(
        &p,
        &["-f", "qcow2"],
        &["write -P 0x30 512 512", "write -z 524288 65536"],
    );
    assert_same(&t, &p, "active layer with snapshots");
}

/// `lazy-refcounts` holds for one open, as in QEMU: on, an image without
/// the compatible bit gets the dirty bit at its first allocation (and
/// loses it at close); off, an image with the bit never gets dirty. The
/// compatible bit itself is left alone; `qemu-img check` is clean after.
#[test]
fn lazy_refcounts_option_holds_for_one_open() {
    use std::io::IoSlice;
    let t = TempDir::new("q2lazyopt");
    let dirty = |p: &str| std::fs::read(p).unwrap()[79] & 1 != 0;
    for (create_opt, lazy, compat) in [
        ("lazy_refcounts=off", "on", "lazy refcounts: false"),
        ("lazy_refcounts=on", "off", "lazy refcounts: true"),
    ] {
        let p = t.path(&format!("{lazy}.qcow2"));
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", create_opt, &p, "64M"],
        );
        let g = BlockGraph::new();
        let node = g
            .open_image(&p, Some("qcow2"), false, &[("lazy-refcounts", lazy)])
            .unwrap();
        node.write_vectored(1 << 20, &[IoSlice::new(&[5u8; 70_000])], false)
            .unwrap();
        node.flush().unwrap();
        assert_eq!(dirty(&p), lazy == "on", "lazy-refcounts={lazy}");
        drop(node);
        drop(g);
        assert!(!dirty(&p), "lazy-refcounts={lazy}: clean after close");
        let info = run("qemu-img", &["info", &p]);
        assert!(info.contains(compat), "{info}");
        run("qemu-img", &["check", &p]);
    }
    // Version 2 images have no lazy refcounts.
    let p = t.path("v2.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", "compat=0.10", &p, "1M"],
    );
    let e = BlockGraph::new()
        .open_image(&p, Some("qcow2"), false, &[("lazy-refcounts", "on")])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("Lazy refcounts require"), "{e}");
}
