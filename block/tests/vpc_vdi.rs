//! vpc (VHD) and vdi nodes: batches of up to 32 concurrent requests
//! (reads, writes, write-zeroes, some unaligned) through `Node::submit`
//! against a raw model, on images Strata creates, qemu-img creates, a
//! differencing VHD over its parent and a qcow2 over each format; at the
//! end qemu-img must agree (`check` where it has one, `compare` against
//! the model). Also: the Virtual PC sample, `-drive format=`, locking
//! against qemu-io, and the class's probing.

mod common;

use block::driver::{IoOp, IoRequest};
use block::format::{self, CreateOpts, OptValue};
use block::graph::BlockGraph;
use block::iov::IoVecs;
use common::{qemu, Rng, TempDir};
use std::sync::mpsc;

fn ok(tool: &str, args: &[&str]) -> String {
    let (c, o) = qemu(tool, args);
    assert_eq!(c, 0, "{tool} {args:?}: {o}");
    o
}

/// Create `path` through the class of `fmt` with `-o`-style options.
fn create(fmt: &str, path: &str, size: u64, o: &[&str]) {
    let class = format::class(fmt).unwrap();
    let mut opts = CreateOpts::parse(
        class.create_options(),
        &o.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )
    .unwrap();
    if opts.size().is_none() {
        opts.set("size", OptValue::Num(size));
    }
    class.create(path, &opts).unwrap();
}

/// The guest contents of `img` as qemu-img sees them.
fn qemu_raw(t: &TempDir, img: &str, fmt: &str) -> Vec<u8> {
    let out = t.path("model.raw");
    ok("qemu-img", &["convert", "-f", fmt, "-O", "raw", img, &out]);
    std::fs::read(&out).unwrap()
}

/// `batches` batches of concurrent requests on `img` (format `fmt`,
/// probed when `None`), whose contents are `model`. With `direct`, the
/// file is opened O_DIRECT and requests are sector-aligned; otherwise
/// some start and end inside sectors.
fn run(img: &str, fmt: Option<&str>, model: &mut [u8], seed: u64, batches: u64, direct: bool) {
    let g = BlockGraph::new();
    let node = g
        .open_image(
            img,
            fmt,
            false,
            &[
                ("cache.direct", if direct { "on" } else { "off" }),
                ("file.aio", "io_uring"),
            ],
        )
        .expect("open");
    assert_eq!(node.len(), model.len() as u64);
    let size = model.len() as u64;
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let block = 1u64 << 20;
    for b in 0..batches {
        let (tx, rx) = mpsc::channel();
        let mut taken: Vec<(u64, u64)> = Vec::new();
        let mut n = 0;
        for _ in 0..32 {
            let (off, len) = if direct || rng.below(3) > 0 {
                let len = ((rng.below(3 * block / 512) + 1) * 512).min(size);
                let off = match taken.last() {
                    Some(&(o, l)) if rng.below(2) == 0 && o + l + len <= size => o + l,
                    _ => rng.below((size - len) / 512 + 1) * 512,
                };
                (off, len)
            } else {
                let len = (rng.below(3000) + 1).min(size);
                (rng.below(size - len + 1), len)
            };
            if taken.iter().any(|&(o, l)| off < o + l && o < off + len) {
                continue;
            }
            taken.push((off, len));
            let (o, l) = (off as usize, len as usize);
            let req = match rng.below(10) {
                0..=4 => IoRequest::read(off, IoVecs::from_vec(vec![0xee; l])),
                5..=8 => {
                    let v = rng.next() as u8;
                    let d: Vec<u8> = (0..len).map(|j| v ^ (j as u8) ^ (j >> 9) as u8).collect();
                    model[o..o + l].copy_from_slice(&d);
                    IoRequest::write(off, IoVecs::from_vec(d), false)
                }
                _ => {
                    model[o..o + l].fill(0);
                    IoRequest::write_zeroes(off, len, false)
                }
            };
            let tx = tx.clone();
            n += 1;
            node.submit(req, Box::new(move |r, res| tx.send((r, res)).unwrap()));
        }
        for _ in 0..n {
            let (r, res) = rx.recv().unwrap();
            res.unwrap_or_else(|e| panic!("seed {seed} batch {b}: {e}"));
            if r.op == IoOp::Read {
                let (o, l) = (r.offset as usize, r.iov.len());
                let got = r.iov.into_vec().unwrap();
                if got[..] != model[o..o + l] {
                    let first = (0..l).find(|&k| got[k] != model[o + k]).unwrap_or(0);
                    let last = (0..l).rev().find(|&k| got[k] != model[o + k]).unwrap_or(0);
                    panic!(
                        "seed {seed} batch {b}: read at {o} len {l} differs from {} to {} \
                         (got {:02x?}, want {:02x?})",
                        o + first,
                        o + last,
                        &got[first..(first + 8).min(l)],
                        &model[o + first..(o + first + 8).min(o + l)]
                    );
                }
            }
        }
    }
    // Everything, synchronously, after the concurrent batches.
    let mut all = vec![0u8; model.len()];
    node.read_vectored(0, &mut [std::io::IoSliceMut::new(&mut all)])
        .unwrap();
    assert!(all == model, "seed {seed}: final contents differ");
    node.close().unwrap();
}

/// qemu-img agrees: a clean check (vdi) and the same contents as `model`.
fn qemu_agrees(t: &TempDir, img: &str, fmt: &str, model: &[u8]) {
    let raw = t.path("expected.raw");
    std::fs::write(&raw, model).unwrap();
    if fmt == "vdi" {
        ok("qemu-img", &["check", "-f", "vdi", img]);
    }
    let o = ok("qemu-img", &["compare", "-f", fmt, "-F", "raw", img, &raw]);
    assert!(o.contains("Images are identical"), "{o}");
}

#[test]
fn strata_images_under_concurrent_io_satisfy_qemu_img() {
    for (i, (fmt, opts)) in [
        ("vpc", vec![]),
        ("vpc", vec!["subformat=fixed"]),
        ("vpc", vec!["force_size=on"]),
        ("vdi", vec![]),
        ("vdi", vec!["static=on"]),
    ]
    .into_iter()
    .enumerate()
    {
        for direct in [true, false] {
            let t = TempDir::new("vpcvdi-async");
            let img = t.path(&format!("i.{fmt}"));
            create(fmt, &img, 9 << 20, &opts);
            let size = {
                let g = BlockGraph::new();
                g.open_image(&img, Some(fmt), true, &[]).unwrap().len()
            };
            let mut model = vec![0u8; size as usize];
            run(&img, Some(fmt), &mut model, 11 + i as u64, 24, direct);
            qemu_agrees(&t, &img, fmt, &model);
            // Written again after a reopen (blocks allocated before).
            run(&img, Some(fmt), &mut model, 101 + i as u64, 8, direct);
            qemu_agrees(&t, &img, fmt, &model);
        }
    }
}

#[test]
fn qemu_images_under_concurrent_io_satisfy_qemu_img() {
    for (i, (fmt, opts)) in [
        ("vpc", "subformat=dynamic"),
        ("vpc", "subformat=fixed"),
        ("vpc", "force_size=on"),
        ("vdi", "static=off"),
        ("vdi", "static=on"),
    ]
    .into_iter()
    .enumerate()
    {
        let t = TempDir::new("vpcvdi-qemu");
        let img = t.path(&format!("q.{fmt}"));
        ok(
            "qemu-img",
            &["create", "-q", "-f", fmt, "-o", opts, &img, "7M"],
        );
        ok(
            "qemu-io",
            &[
                "-f",
                fmt,
                "-c",
                "write -P 0x5a 1000 70000",
                "-c",
                "write -P 0x6b 3M 1M",
                &img,
            ],
        );
        let mut model = qemu_raw(&t, &img, fmt);
        run(&img, Some(fmt), &mut model, 7 + i as u64, 16, false);
        qemu_agrees(&t, &img, fmt, &model);
    }
}

#[test]
fn differencing_vhd_reads_its_parent_where_it_has_no_sectors() {
    let t = TempDir::new("vpc-diff");
    let parent = t.path("parent.vhd");
    ok("qemu-img", &["create", "-q", "-f", "vpc", &parent, "9M"]);
    ok(
        "qemu-io",
        &[
            "-f",
            "vpc",
            "-c",
            "write -P 0x11 0 5M",
            "-c",
            "write -P 0x22 6M 700k",
            &parent,
        ],
    );
    let before = qemu_raw(&t, &parent, "vpc");
    let child = t.path("child.vhd");
    create("vpc", &child, 0, &["backing_file=parent.vhd"]);
    let mut model = before.clone();
    // Probed: a differencing VHD starts with its footer copy.
    run(&child, None, &mut model, 5, 24, false);
    run(&child, None, &mut model, 6, 8, true);
    // The parent is only read.
    assert_eq!(qemu_raw(&t, &parent, "vpc"), before);
    // Moved elsewhere with its parent, the relative locator still finds it.
    let t2 = TempDir::new("vpc-diff-moved");
    std::fs::rename(&parent, t2.path("parent.vhd")).unwrap();
    std::fs::rename(&child, t2.path("child.vhd")).unwrap();
    let g = BlockGraph::new();
    let n = g
        .open_image(&t2.path("child.vhd"), None, true, &[])
        .unwrap();
    let mut all = vec![0u8; model.len()];
    n.read_vectored(0, &mut [std::io::IoSliceMut::new(&mut all)])
        .unwrap();
    assert!(all == model);
    let info = n.driver().info().unwrap();
    assert_eq!(info.backing_file.as_deref(), Some("parent.vhd"));
    // Without its parent it opens with the parent's sectors as zeroes
    // when told to, and fails by name otherwise.
    drop(n);
    std::fs::remove_file(t2.path("parent.vhd")).unwrap();
    let e = g
        .open_image(&t2.path("child.vhd"), None, true, &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Could not open backing file") && e.contains("parent.vhd"),
        "{e}"
    );
}

#[test]
fn qcow2_over_vpc_and_vdi() {
    for fmt in ["vpc", "vdi"] {
        let t = TempDir::new("qcow2-over");
        let base = t.path(&format!("base.{fmt}"));
        ok("qemu-img", &["create", "-q", "-f", fmt, &base, "6M"]);
        ok(
            "qemu-io",
            &["-f", fmt, "-c", "write -P 0x77 512k 2M", &base],
        );
        let top = t.path("top.qcow2");
        ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-b", &base, "-F", fmt, &top],
        );
        let before = qemu_raw(&t, &base, fmt);
        let mut model = before.clone();
        model.resize(
            {
                let g = BlockGraph::new();
                g.open_image(&top, None, true, &[]).unwrap().len() as usize
            },
            0,
        );
        run(&top, None, &mut model, 3, 16, false);
        ok("qemu-img", &["check", &top]);
        qemu_agrees(&t, &top, "qcow2", &model);
        assert_eq!(qemu_raw(&t, &base, fmt), before, "{fmt} base changed");
    }
}

fn sample(t: &TempDir) -> String {
    let src = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/samples/virtualpc-dynamic.vhd.bz2"
    );
    let out = std::process::Command::new("bzip2")
        .args(["-dc", src])
        .output()
        .expect("bzip2");
    assert!(out.status.success());
    let p = t.path("virtualpc-dynamic.vhd");
    std::fs::write(&p, out.stdout).unwrap();
    p
}

#[test]
fn virtual_pc_sample_is_127_gib_of_zeroes() {
    let t = TempDir::new("vpc-sample");
    let img = sample(&t);
    let g = BlockGraph::new();
    let n = g.open_image(&img, None, true, &[]).unwrap();
    assert_eq!(n.driver_name(), "vpc");
    assert_eq!(n.len(), 136_363_130_880);
    for off in [0, 1 << 20, 77 << 30, 136_363_130_880 - (1 << 20)] {
        let mut b = vec![0xffu8; 1 << 20];
        n.read_vectored(off, &mut [std::io::IoSliceMut::new(&mut b)])
            .unwrap();
        assert!(b.iter().all(|&x| x == 0), "non-zero at {off}");
    }
    let e = n.block_status(0, n.len()).unwrap();
    assert_eq!(e.len, n.len());
    assert!(e.zero && !e.data && e.allocated);
    // `force_size_calc=current_size` reads the footer's size instead.
    drop(n);
    let g = BlockGraph::new();
    let n = g
        .open_image(
            &img,
            Some("vpc"),
            true,
            &[("force_size_calc", "current_size")],
        )
        .unwrap();
    assert_eq!(n.len(), 136_365_211_648);
}

#[test]
fn drive_format_opens_vpc_and_vdi() {
    let t = TempDir::new("vpc-drive");
    for (fmt, opt) in [("vpc", "subformat=fixed"), ("vdi", "static=off")] {
        let img = t.path(&format!("d.{fmt}"));
        ok(
            "qemu-img",
            &["create", "-q", "-f", fmt, "-o", opt, &img, "2M"],
        );
        ok(
            "qemu-io",
            &["-f", fmt, "-c", "write -P 0x3c 4096 4096", &img],
        );
        let g = BlockGraph::new();
        let spec =
            block::drive::parse_drive(&format!("file={img},format={fmt},if=none,id=d")).unwrap();
        let blk = spec.open(&g).unwrap();
        let mut b = vec![0u8; 8192];
        blk.read_at(0, &mut b).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert!(b[4096..].iter().all(|&x| x == 0x3c));
    }
}

#[test]
fn open_images_are_locked_against_qemu() {
    let t = TempDir::new("vpc-lock");
    for fmt in ["vpc", "vdi"] {
        let img = t.path(&format!("l.{fmt}"));
        create(fmt, &img, 1 << 20, &[]);
        let g = BlockGraph::new();
        let n = g.open_image(&img, Some(fmt), false, &[]).unwrap();
        let blk = block::backend::BlockBackend::new(
            "l",
            n.clone(),
            block::backend::BackendConfig::default(),
        )
        .unwrap();
        let (c, o) = qemu("qemu-io", &["-f", fmt, "-c", "read 0 512", &img]);
        assert_ne!(c, 0, "{fmt}: qemu-io wrote an image Strata holds: {o}");
        assert!(o.contains("lock"), "{o}");
        drop(blk);
        n.close().unwrap();
        drop(n);
        drop(g);
        ok("qemu-io", &["-f", fmt, "-c", "read 0 512", &img]);
    }
}

#[test]
fn probing_names_dynamic_vhds_and_vdis_only() {
    let classes = BlockGraph::new().classes();
    let t = TempDir::new("vpc-probe");
    for (fmt, opt, want) in [
        ("vpc", "subformat=dynamic", Some("vpc")),
        // A fixed VHD starts with guest data: raw, as QEMU probes it.
        ("vpc", "subformat=fixed", None),
        ("vdi", "static=on", Some("vdi")),
    ] {
        let img = t.path("p");
        let _ = std::fs::remove_file(&img);
        ok(
            "qemu-img",
            &["create", "-q", "-f", fmt, "-o", opt, &img, "1M"],
        );
        let head = std::fs::read(&img).unwrap();
        assert_eq!(
            format::probe(&classes, &head[..512], &img).as_deref(),
            want,
            "{fmt} {opt}"
        );
    }
}
