//! vhdx nodes: the Hyper-V sample, images qemu-img creates and writes
//! (Strata reads them as `qemu-img convert` does), batches of concurrent
//! requests through `Node::submit` against a raw model on images Strata
//! and qemu-img create (then `qemu-img check` and `compare` must agree),
//! differencing disks over a parent, a pending log (built here, entry by
//! entry) that a read-write open replays as QEMU does and a read-only
//! open refuses, hostile metadata, and the class's probing.

mod common;

use block::driver::{IoOp, IoRequest};
use block::format::{self, CreateOpts, OptValue, Repair};
use block::graph::BlockGraph;
use block::iov::IoVecs;
use common::{qemu, Rng, TempDir};
use formats::vhdx::layout::{self, Header, HEADER_OFFSETS, MIB};
use formats::vhdx::log::{entry_bytes, LogWrite};
use std::sync::mpsc;

fn ok(tool: &str, args: &[&str]) -> String {
    let (c, o) = qemu(tool, args);
    assert_eq!(c, 0, "{tool} {args:?}: {o}");
    o
}

/// Create `path` through the vhdx class with `-o`-style options.
fn create(path: &str, size: u64, o: &[&str]) {
    let class = format::class("vhdx").unwrap();
    let mut opts = CreateOpts::parse(
        class.create_options(),
        &o.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )
    .unwrap();
    if opts.size().is_none() && size > 0 {
        opts.set("size", OptValue::Num(size));
    }
    class.create(path, &opts).unwrap();
}

/// The guest contents of `img` as qemu-img sees them.
fn qemu_raw(t: &TempDir, img: &str) -> Vec<u8> {
    let out = t.path("model.raw");
    ok(
        "qemu-img",
        &["convert", "-f", "vhdx", "-O", "raw", img, &out],
    );
    std::fs::read(&out).unwrap()
}

/// The guest contents of `img` as Strata reads them.
fn strata_raw(img: &str) -> Vec<u8> {
    let g = BlockGraph::new();
    let n = g.open_image(img, None, true, &[]).expect("open");
    let mut all = vec![0u8; n.len() as usize];
    n.read_vectored(0, &mut [std::io::IoSliceMut::new(&mut all)])
        .unwrap();
    all
}

/// `batches` batches of up to 32 concurrent reads, writes and
/// write-zeroes on `img`, whose contents are `model`; some requests
/// start and end inside sectors unless `direct` (O_DIRECT).
fn run(img: &str, model: &mut [u8], seed: u64, batches: u64, direct: bool) {
    let g = BlockGraph::new();
    let node = g
        .open_image(
            img,
            None,
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
                let len = ((rng.below(3 * MIB / 512) + 1) * 512).min(size);
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
                    "seed {seed} batch {b}: read at {o}+{l} differs"
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

/// qemu-img agrees: a clean check and the same contents as `model`.
fn qemu_agrees(t: &TempDir, img: &str, model: &[u8]) {
    let raw = t.path("expected.raw");
    std::fs::write(&raw, model).unwrap();
    let o = ok("qemu-img", &["check", "-f", "vhdx", img]);
    assert!(o.contains("No errors were found"), "{o}");
    let o = ok(
        "qemu-img",
        &["compare", "-f", "vhdx", "-F", "raw", img, &raw],
    );
    assert!(o.contains("Images are identical"), "{o}");
}

fn sample(t: &TempDir) -> String {
    let src = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/samples/iotest-dynamic-1G.vhdx.bz2"
    );
    let out = std::process::Command::new("bzip2")
        .args(["-dc", src])
        .output()
        .expect("bzip2");
    assert!(out.status.success());
    let p = t.path("iotest-dynamic-1G.vhdx");
    std::fs::write(&p, out.stdout).unwrap();
    p
}

#[test]
fn hyper_v_sample_reads_as_documented() {
    let t = TempDir::new("vhdx-sample");
    let img = sample(&t);
    let g = BlockGraph::new();
    let n = g.open_image(&img, None, true, &[]).unwrap();
    assert_eq!(n.driver_name(), "vhdx");
    assert_eq!(n.len(), 1 << 30);
    assert_eq!(n.driver().info().unwrap().cluster_size, Some(32 << 20));
    let mut all = vec![0u8; 1 << 30];
    n.read_vectored(0, &mut [std::io::IoSliceMut::new(&mut all)])
        .unwrap();
    let mb = 1 << 20;
    assert!(all[..33 * mb].iter().all(|&x| x == 0xa5));
    assert!(all[33 * mb..66 * mb].iter().all(|&x| x == 0x96));
    assert!(all[66 * mb..].iter().all(|&x| x == 0));
    let raw = t.path("sample.raw");
    std::fs::write(&raw, &all).unwrap();
    let out = std::process::Command::new("sha256sum")
        .arg(&raw)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout)
        .starts_with("d3d112d8dab7fd360609f7d5a7b769904b7a2a7d7b6b8c535f65a23293c05478"));
    // Block status: three allocated 32 MiB blocks, then zero blocks.
    let e = n.block_status(0, n.len()).unwrap();
    assert!(e.data && e.len == 96 * mb as u64, "{e:?}");
    let e = n
        .block_status(96 * mb as u64, n.len() - 96 * mb as u64)
        .unwrap();
    assert!(e.zero && !e.data, "{e:?}");
}

#[test]
fn qemu_images_read_as_qemu_reads_them_and_take_concurrent_io() {
    for (i, opts) in [
        "subformat=dynamic",
        "subformat=dynamic,block_state_zero=off,block_size=1M",
        "subformat=fixed",
        "subformat=fixed,block_state_zero=off",
        "log_size=2M,block_size=2M",
    ]
    .into_iter()
    .enumerate()
    {
        let t = TempDir::new("vhdx-qemu");
        let img = t.path("q.vhdx");
        ok(
            "qemu-img",
            &["create", "-q", "-f", "vhdx", "-o", opts, &img, "21M"],
        );
        ok(
            "qemu-io",
            &[
                "-f",
                "vhdx",
                "-c",
                "write -P 0x5a 1000 70000",
                "-c",
                "write -P 0x6b 9M 3M",
                "-c",
                "write -P 0x7c 20M 1M",
                &img,
            ],
        );
        let mut model = qemu_raw(&t, &img);
        assert!(strata_raw(&img) == model, "{opts}: Strata reads otherwise");
        run(&img, &mut model, 7 + i as u64, 12, false);
        qemu_agrees(&t, &img, &model);
    }
}

#[test]
fn strata_images_under_concurrent_io_satisfy_qemu_img() {
    for (i, opts) in [
        vec![],
        vec!["block_size=1M"],
        vec!["block_state_zero=off", "block_size=2M"],
        vec!["subformat=fixed", "block_size=1M"],
        vec!["subformat=fixed", "block_state_zero=off", "block_size=1M"],
        vec!["log_size=3M", "block_size=4M"],
    ]
    .into_iter()
    .enumerate()
    {
        for direct in [true, false] {
            let t = TempDir::new("vhdx-async");
            let img = t.path("i.vhdx");
            create(&img, 9 << 20, &opts);
            let o = ok("qemu-img", &["check", "-f", "vhdx", &img]);
            assert!(o.contains("No errors"), "{opts:?}: {o}");
            let mut model = vec![0u8; 9 << 20];
            assert!(qemu_raw(&t, &img) == model);
            run(&img, &mut model, 11 + i as u64, 16, direct);
            qemu_agrees(&t, &img, &model);
            // Written again after a reopen (blocks allocated before).
            run(&img, &mut model, 101 + i as u64, 6, direct);
            qemu_agrees(&t, &img, &model);
        }
    }
}

#[test]
fn first_write_changes_the_write_guids_in_both_headers() {
    let t = TempDir::new("vhdx-guid");
    let img = t.path("g.vhdx");
    create(&img, 4 << 20, &["block_size=1M"]);
    let headers = || {
        let d = std::fs::read(&img).unwrap();
        HEADER_OFFSETS.map(|o| Header::parse(&d[o as usize..o as usize + 4096]).unwrap())
    };
    let before = headers();
    // A read-write open that does not write changes nothing.
    let g = BlockGraph::new();
    g.open_image(&img, None, false, &[])
        .unwrap()
        .close()
        .unwrap();
    assert_eq!(headers(), before);
    let mut model = vec![0u8; 4 << 20];
    run(&img, &mut model, 3, 2, false);
    let after = headers();
    for h in &after {
        assert_ne!(h.file_write_guid, before[0].file_write_guid);
        assert_ne!(h.data_write_guid, before[0].data_write_guid);
        assert_eq!(h.file_write_guid, after[0].file_write_guid);
        assert!(h.sequence > before[1].sequence);
    }
    qemu_agrees(&t, &img, &model);
}

#[test]
fn differencing_vhdx_reads_its_parent_where_it_has_no_sectors() {
    let t = TempDir::new("vhdx-diff");
    let parent = t.path("parent.vhdx");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M",
            &parent,
            "9M",
        ],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "vhdx",
            "-c",
            "write -P 0x11 0 5M",
            "-c",
            "write -P 0x22 6M 700k",
            &parent,
        ],
    );
    let before = qemu_raw(&t, &parent);
    let child = t.path("child.vhdx");
    create(&child, 0, &["backing_file=parent.vhdx"]);
    {
        let g = BlockGraph::new();
        let n = g.open_image(&child, None, true, &[]).unwrap();
        assert_eq!(n.len(), 9 << 20);
        let info = n.driver().info().unwrap();
        assert_eq!(info.backing_file.as_deref(), Some("parent.vhdx"));
    }
    assert!(strata_raw(&child) == before);
    let mut model = before.clone();
    run(&child, &mut model, 5, 24, false);
    run(&child, &mut model, 6, 8, true);
    // The parent is only read.
    assert_eq!(qemu_raw(&t, &parent), before);
    // Moved elsewhere with its parent, the relative path still finds it.
    let t2 = TempDir::new("vhdx-diff-moved");
    std::fs::rename(&parent, t2.path("parent.vhdx")).unwrap();
    std::fs::rename(&child, t2.path("child.vhdx")).unwrap();
    assert!(strata_raw(&t2.path("child.vhdx")) == model);
    std::fs::remove_file(t2.path("parent.vhdx")).unwrap();
    let e = BlockGraph::new()
        .open_image(&t2.path("child.vhdx"), None, true, &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Could not open backing file") && e.contains("parent.vhdx"),
        "{e}"
    );
}

/// Rewrite both headers of `img` with `f` applied (checksums renewed).
fn edit_headers(img: &str, f: impl Fn(&mut Header)) {
    let mut d = std::fs::read(img).unwrap();
    for o in HEADER_OFFSETS {
        let o = o as usize;
        let mut h = Header::parse(&d[o..o + 4096]).unwrap();
        f(&mut h);
        d[o..o + 4096].copy_from_slice(&h.to_bytes());
    }
    std::fs::write(img, d).unwrap();
}

#[test]
fn a_pending_log_is_replayed_read_write_and_refused_read_only() {
    let t = TempDir::new("vhdx-log");
    let img = t.path("dirty.vhdx");
    // 8 MiB of 1 MiB blocks: the BAT at 2 MiB, the metadata at 3 MiB,
    // the file ends at 8 MiB (where QEMU's layout starts the payload).
    create(&img, 8 << 20, &["block_size=1M"]);
    let d = std::fs::read(&img).unwrap();
    assert_eq!(d.len() as u64, 8 * MIB);
    let h = Header::parse(&d[0x10000..0x11000]).unwrap();
    let guid = [0x42u8; 16];
    // Entry 1: block 3's data at 8 MiB (a pattern in its first 8 KiB
    // and zeroes for the rest), and the BAT sector that points there.
    let pat: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 1) as u8).collect();
    let mut bat = d[2 << 20..(2 << 20) + 4096].to_vec();
    bat[24..32].copy_from_slice(&((8 * MIB) | layout::PAYLOAD_FULLY_PRESENT).to_le_bytes());
    let e1 = entry_bytes(
        10,
        0,
        &guid,
        8 * MIB,
        9 * MIB,
        &[
            LogWrite::Data(8 * MIB, pat.clone()),
            LogWrite::Zero(8 * MIB + 8192, MIB - 8192),
            LogWrite::Data(2 * MIB, bat.clone()),
        ],
    );
    // Entry 2 (the head) rewrites block 3's second 4 KiB: applied
    // after entry 1, it wins.
    let pat2 = vec![0xe2u8; 4096];
    let e1_len = e1.len() as u64;
    let e2 = entry_bytes(
        11,
        0,
        &guid,
        8 * MIB,
        9 * MIB,
        &[LogWrite::Data(8 * MIB + 4096, pat2.clone())],
    );
    let mut f = d.clone();
    let lo = h.log_offset as usize;
    f[lo..lo + e1.len()].copy_from_slice(&e1);
    f[lo + e1_len as usize..lo + e1_len as usize + e2.len()].copy_from_slice(&e2);
    std::fs::write(&img, &f).unwrap();
    edit_headers(&img, |h| h.log_guid = guid);
    let mut expected = vec![0u8; 8 << 20];
    expected[3 << 20..(3 << 20) + 8192].copy_from_slice(&pat);
    expected[(3 << 20) + 4096..(3 << 20) + 8192].copy_from_slice(&pat2);

    // QEMU agrees the log is pending, and replays it to `expected`.
    let q = t.path("q.vhdx");
    std::fs::copy(&img, &q).unwrap();
    let (c, o) = qemu("qemu-img", &["info", &q]);
    assert_ne!(c, 0);
    assert!(
        o.contains("contains a log that needs to be replayed"),
        "{o}"
    );
    ok("qemu-img", &["check", "-r", "all", &q]);
    assert!(qemu_raw(&t, &q) == expected, "qemu replays otherwise");

    // Strata refuses a read-only open, saying what to do.
    let e = BlockGraph::new()
        .open_image(&img, None, true, &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!(
            "VHDX image file '{img}' opened read-only, but contains a log that needs to be replayed"
        )) && e.contains("qemu-img check -r all"),
        "{e}"
    );
    // A read-write open replays it, and check reports the repair.
    let g = BlockGraph::new();
    let n = g.open_image(&img, None, false, &[]).unwrap();
    let r = n.driver().check(Repair::All).unwrap();
    assert_eq!(r.corruptions_fixed, 1);
    n.close().unwrap();
    drop(n);
    let d = std::fs::read(&img).unwrap();
    for o in HEADER_OFFSETS {
        let h = Header::parse(&d[o as usize..o as usize + 4096]).unwrap();
        assert_eq!(h.log_guid, [0; 16]);
    }
    assert!(strata_raw(&img) == expected);
    qemu_agrees(&t, &img, &expected);
}

#[test]
fn hostile_metadata_is_refused_by_name() {
    let t = TempDir::new("vhdx-hostile");
    let base = t.path("base.vhdx");
    create(&base, 8 << 20, &["block_size=1M"]);
    let d = std::fs::read(&base).unwrap();
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Damage)> = vec![
        (
            "No valid VHDX header",
            Box::new(|d| {
                d[0x10000] ^= 1;
                d[0x20000] ^= 1;
            }),
        ),
        ("Invalid VHDX file identifier", Box::new(|d| d[0] = b'X')),
        (
            "is required but unknown",
            Box::new(|d| {
                for r in [0x30000usize, 0x40000] {
                    d[r + 16] ^= 0x55; // The BAT's GUID: now unknown, still required.
                    let mut t = d[r..r + 0x10000].to_vec();
                    layout::set_checksum(&mut t, 4);
                    d[r..r + 0x10000].copy_from_slice(&t);
                }
            }),
        ),
        (
            "points after end of file",
            Box::new(|d| {
                let v = (1u64 << 40) | layout::PAYLOAD_FULLY_PRESENT;
                d[2 << 20..(2 << 20) + 8].copy_from_slice(&v.to_le_bytes());
            }),
        ),
        (
            "overlaps",
            Box::new(|d| {
                let v = (2 * MIB) | layout::PAYLOAD_FULLY_PRESENT;
                d[2 << 20..(2 << 20) + 8].copy_from_slice(&v.to_le_bytes());
            }),
        ),
        (
            "the metadata table has 4000 entries",
            Box::new(|d| {
                d[(3 << 20) + 10..(3 << 20) + 12].copy_from_slice(&4000u16.to_le_bytes());
            }),
        ),
        (
            "invalid VHDX block size",
            Box::new(|d| {
                d[(3 << 20) + 0x10000..(3 << 20) + 0x10004]
                    .copy_from_slice(&12345u32.to_le_bytes());
            }),
        ),
    ];
    for (want, f) in cases {
        let img = t.path("h.vhdx");
        let mut b = d.clone();
        f(&mut b);
        std::fs::write(&img, &b).unwrap();
        for ro in [true, false] {
            let e = BlockGraph::new()
                .open_image(&img, Some("vhdx"), ro, &[])
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.contains("h.vhdx"), "{want}: {e}");
        }
    }
}

#[test]
fn probing_names_vhdx() {
    let classes = BlockGraph::new().classes();
    let t = TempDir::new("vhdx-probe");
    for opt in ["subformat=dynamic", "subformat=fixed"] {
        let img = t.path("p");
        let _ = std::fs::remove_file(&img);
        ok(
            "qemu-img",
            &["create", "-q", "-f", "vhdx", "-o", opt, &img, "1M"],
        );
        let head = std::fs::read(&img).unwrap();
        assert_eq!(
            format::probe(&classes, &head[..512], &img).as_deref(),
            Some("vhdx"),
            "{opt}"
        );
    }
}
