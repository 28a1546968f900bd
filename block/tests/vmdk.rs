//! vmdk nodes: batches of up to 32 concurrent requests (reads, writes,
//! write-zeroes, some unaligned) through `Node::submit` against a raw
//! model, on every writable subformat Strata and qemu-img create (the
//! asynchronous data path for single-file images, the worker pool for
//! split ones) and on a child over a parent; at the end qemu-img must
//! agree (`check`, `compare` against the model). Also: the VMware stream
//! sample through the graph, and the class's probing.

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

/// Create `path` through the vmdk class with `-o`-style options.
fn create(path: &str, size: u64, o: &[&str]) {
    let class = format::class("vmdk").unwrap();
    let mut opts = CreateOpts::parse(
        class.create_options(),
        &o.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )
    .unwrap();
    opts.set("size", OptValue::Num(size));
    class.create(path, &opts).unwrap();
}

/// `batches` batches of concurrent requests on `img`, whose contents
/// are `model`.
fn run(img: &str, model: &mut [u8], seed: u64, batches: u64, direct: bool) {
    let g = BlockGraph::new();
    let node = g
        .open_image(
            img,
            Some("vmdk"),
            false,
            &[("cache.direct", if direct { "on" } else { "off" })],
        )
        .expect("open");
    assert_eq!(node.len(), model.len() as u64);
    let size = model.len() as u64;
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    for b in 0..batches {
        let (tx, rx) = mpsc::channel();
        let mut taken: Vec<(u64, u64)> = Vec::new();
        let mut n = 0;
        for _ in 0..32 {
            let (off, len) = if direct || rng.below(3) > 0 {
                let len = ((rng.below(3 * (1 << 20) / 512) + 1) * 512).min(size);
                (rng.below((size - len) / 512 + 1) * 512, len)
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
                assert!(
                    got[..] == model[o..o + l],
                    "seed {seed} batch {b}: read at {o} len {l} differs"
                );
            }
        }
    }
    let mut all = vec![0u8; model.len()];
    node.read_vectored(0, &mut [std::io::IoSliceMut::new(&mut all)])
        .unwrap();
    assert!(all == model, "seed {seed}: final contents differ");
    node.close().unwrap();
}

fn qemu_agrees(t: &TempDir, img: &str, model: &[u8]) {
    let raw = t.path("expected.raw");
    std::fs::write(&raw, model).unwrap();
    ok("qemu-img", &["check", "-f", "vmdk", img]);
    let o = ok(
        "qemu-img",
        &["compare", "-f", "vmdk", "-F", "raw", img, &raw],
    );
    assert!(o.contains("Images are identical"), "{o}");
}

#[test]
fn images_under_concurrent_io_satisfy_qemu_img() {
    let cases: &[&[&str]] = &[
        &[],
        &["zeroed_grain=on"],
        &["subformat=monolithicFlat"],
        &["subformat=twoGbMaxExtentSparse"],
        &["subformat=twoGbMaxExtentFlat"],
    ];
    for (i, opts) in cases.iter().enumerate() {
        for (direct, by_qemu) in [(true, false), (false, false), (false, true)] {
            let t = TempDir::new("vmdk-async");
            let img = t.path("i.vmdk");
            let size = 9u64 << 20;
            if by_qemu {
                let o = opts.join(",");
                let mut a = vec!["create", "-q", "-f", "vmdk"];
                if !o.is_empty() {
                    a.extend(["-o", &o]);
                }
                let sz = size.to_string();
                a.extend([img.as_str(), sz.as_str()]);
                ok("qemu-img", &a);
            } else {
                create(&img, size, opts);
            }
            let mut model = vec![0u8; size as usize];
            run(&img, &mut model, 11 + i as u64, 16, direct);
            qemu_agrees(&t, &img, &model);
            // Again after a reopen (grains allocated before).
            run(&img, &mut model, 101 + i as u64, 6, direct);
            qemu_agrees(&t, &img, &model);
        }
    }
}

#[test]
fn child_reads_its_parent_where_it_has_no_grains() {
    let t = TempDir::new("vmdk-chain");
    let base = t.path("base.vmdk");
    ok("qemu-img", &["create", "-q", "-f", "vmdk", &base, "8M"]);
    ok(
        "qemu-io",
        &["-f", "vmdk", "-c", "write -P 0x5a 0 8M", &base],
    );
    let child = t.path("child.vmdk");
    let class = format::class("vmdk").unwrap();
    let mut opts = CreateOpts::parse(
        class.create_options(),
        &["backing_file=base.vmdk".to_string()],
    )
    .unwrap();
    opts.set("size", OptValue::Num(8 << 20));
    class.create(&child, &opts).unwrap();
    let mut model = vec![0x5au8; 8 << 20];
    run(&child, &mut model, 7, 12, false);
    let raw = t.path("expected.raw");
    std::fs::write(&raw, &model).unwrap();
    let o = ok("qemu-img", &["compare", "-F", "raw", &child, &raw]);
    assert!(o.contains("Images are identical"), "{o}");
}

#[test]
fn vmware_stream_sample_through_the_graph() {
    let t = TempDir::new("vmdk-sample");
    let src = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/samples/iotest-version3.vmdk.bz2"
    );
    let o = std::process::Command::new("bzip2")
        .args(["-dc", src])
        .output()
        .unwrap();
    let img = t.path("v3.vmdk");
    std::fs::write(&img, &o.stdout).unwrap();
    let g = BlockGraph::new();
    let node = g.open_image(&img, None, true, &[]).unwrap();
    assert_eq!(node.driver_name(), "vmdk");
    assert_eq!(node.len(), 17_179_869_184);
    assert_eq!(node.driver().info().unwrap().cluster_size, Some(65536));
    for i in 0..99u64 {
        let mut b = vec![0u8; 512];
        let (tx, rx) = mpsc::channel();
        node.submit(
            IoRequest::read(i * 655_360 + i * 512, IoVecs::from_vec(b.clone())),
            Box::new(move |r, res| tx.send((r, res)).unwrap()),
        );
        let (r, res) = rx.recv().unwrap();
        res.unwrap();
        b.copy_from_slice(&r.iov.into_vec().unwrap());
        assert!(b.iter().all(|&x| x == 0x30 + (i % 10) as u8), "sector {i}");
    }
    let e = node.block_status(0, 1 << 20).unwrap();
    assert!(e.compressed && e.data && e.len == 65536);
}

#[test]
fn probing_names_vmdk_headers_and_descriptors() {
    let c = format::class("vmdk").unwrap();
    assert_eq!(c.probe(b"KDMV\x01\0\0\0", "x"), 100);
    assert_eq!(c.probe(b"COWD\x01\0\0\0", "x"), 100);
    assert_eq!(
        c.probe(b"# Disk DescriptorFile\nversion=1\nCID=1\n", "x"),
        100
    );
    assert_eq!(c.probe(b"# c\n  \r\nversion=3\r\n", "x"), 100);
    assert_eq!(c.probe(b"# c\nversion=4\n", "x"), 0);
    assert_eq!(c.probe(b"hello\nversion=1\n", "x"), 0);
    assert_eq!(c.probe(&[0u8; 512], "x"), 0);
}
