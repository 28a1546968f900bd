//! The qcow2 driver's asynchronous path under concurrency: batches of up to
//! 32 requests on disjoint byte ranges (which share clusters, L2 tables and
//! allocations) are in flight at once through `Node::submit`, on io_uring
//! with O_DIRECT; reads are checked against a raw model, and at the end
//! `qemu-img check` must be clean and `qemu-img compare` must find the
//! image equal to the model. Images come with backing files, snapshot-shared
//! clusters (copy-on-write), compressed clusters and subclusters.

mod common;

use block::driver::IoRequest;
use block::graph::BlockGraph;
use block::iov::IoVecs;
use common::{qemu, Rng, TempDir};
use std::sync::mpsc;

fn ok(tool: &str, args: &[&str]) {
    let (c, o) = qemu(tool, args);
    assert_eq!(c, 0, "{tool} {args:?}: {o}");
}

enum Op {
    Read,
    Write(Vec<u8>),
    Zero,
    Discard,
}

/// Run `batches` batches of concurrent requests on `img` (whose guest
/// contents are `model`); `cs` is the cluster size.
fn run(t: &TempDir, img: &str, mut model: Vec<u8>, cs: u64, seed: u64, batches: u64) {
    run_with(t, img, &mut model, cs, seed, batches, true)
}

fn run_with(
    t: &TempDir,
    img: &str,
    model: &mut [u8],
    cs: u64,
    seed: u64,
    batches: u64,
    direct: bool,
) {
    let g = BlockGraph::new();
    let direct = if direct { "on" } else { "off" };
    let node = g
        .open_image(
            img,
            Some("qcow2"),
            false,
            &[
                ("discard", "unmap"),
                ("cache.direct", direct),
                ("file.aio", "io_uring"),
            ],
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
            // Sector-aligned (O_DIRECT), 512 B to 3 clusters; sequential
            // neighbours half of the time, so requests share clusters.
            let len = ((rng.below(3 * cs / 512) + 1) * 512).min(size);
            let off = match taken.last() {
                Some(&(o, l)) if rng.below(2) == 0 && o + l + len <= size => o + l,
                _ => rng.below((size - len) / 512 + 1) * 512,
            };
            if taken.iter().any(|&(o, l)| off < o + l && o < off + len) {
                continue;
            }
            taken.push((off, len));
            let op = match rng.below(10) {
                0..=4 => Op::Read,
                5..=7 => {
                    let v = rng.next() as u8;
                    Op::Write((0..len).map(|j| v ^ (j as u8) ^ (j >> 9) as u8).collect())
                }
                8 => Op::Zero,
                _ => Op::Discard,
            };
            let (o, l) = (off as usize, len as usize);
            let req = match op {
                Op::Read => IoRequest::read(off, IoVecs::from_vec(vec![0xee; l])),
                Op::Write(d) => {
                    model[o..o + l].copy_from_slice(&d);
                    IoRequest::write(off, IoVecs::from_vec(d), false)
                }
                Op::Zero => {
                    model[o..o + l].fill(0);
                    IoRequest::write_zeroes(off, len, rng.below(2) == 0)
                }
                Op::Discard => {
                    // Whole clusters inside the range read as zeroes (v3).
                    let a = off.div_ceil(cs) * cs;
                    let e = (off + len) / cs * cs;
                    if a < e {
                        model[a as usize..e as usize].fill(0);
                    }
                    IoRequest::discard(off, len)
                }
            };
            let tx = tx.clone();
            n += 1;
            node.submit(req, Box::new(move |r, res| tx.send((r, res)).unwrap()));
        }
        for _ in 0..n {
            let (r, res) = rx.recv().unwrap();
            res.unwrap_or_else(|e| panic!("seed {seed} batch {b}: {e}"));
            if r.op == block::driver::IoOp::Read {
                let (o, l) = (r.offset as usize, r.iov.len());
                let got = r.iov.into_vec().unwrap();
                assert!(
                    got[..] == model[o..o + l],
                    "seed {seed} batch {b}: read at {o} len {l} differs"
                );
            }
        }
        if rng.below(8) == 0 {
            node.flush().unwrap();
        }
    }
    let (tx, rx) = mpsc::channel();
    node.submit(
        IoRequest::read(0, IoVecs::from_vec(vec![0xee; size as usize])),
        Box::new(move |r, res| tx.send((r, res)).unwrap()),
    );
    let (r, res) = rx.recv().unwrap();
    res.unwrap();
    assert!(
        r.iov.into_vec().unwrap() == *model,
        "seed {seed}: final contents"
    );
    drop(node);
    drop(g);
    let (c, o) = qemu("qemu-img", &["check", img]);
    assert_eq!(c, 0, "seed {seed}: qemu-img check: {o}");
    let m = t.path("model.raw");
    std::fs::write(&m, &*model).unwrap();
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", &m, img],
    );
}

fn batches() -> u64 {
    std::env::var("STRATA_QCOW2_BATCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150)
}

/// A fresh image: every write allocates, many at once.
#[test]
fn async_empty_image() {
    let t = TempDir::new("q2a-empty");
    let img = t.path("a.qcow2");
    for seed in 1..=2 {
        let _ = std::fs::remove_file(&img);
        ok("qemu-img", &["create", "-q", "-f", "qcow2", &img, "8M"]);
        run(&t, &img, vec![0; 8 << 20], 65536, seed, batches());
    }
}

/// Backing file, data in the image shared with an internal snapshot
/// (copy-on-write on every write), subclusters.
#[test]
fn async_backing_snapshot_subclusters() {
    let t = TempDir::new("q2a-snap");
    let base = t.path("base.raw");
    let data: Vec<u8> = (0..(6u32 << 20)).map(|i| (i % 253) as u8 | 1).collect();
    std::fs::write(&base, &data).unwrap();
    for (seed, opts, cs) in [
        (1, "cluster_size=16384,extended_l2=on", 16384),
        (2, "cluster_size=65536", 65536),
    ] {
        let img = t.path("s.qcow2");
        let _ = std::fs::remove_file(&img);
        ok(
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-o", opts, "-b", &base, "-F", "raw", &img, "8M",
            ],
        );
        ok(
            "qemu-io",
            &[
                "-c",
                "write -P 0x5a 1M 2M",
                "-c",
                "write -z 4M 64k",
                "-c",
                "write -P 0x33 7M 12k",
                &img,
            ],
        );
        ok("qemu-img", &["snapshot", "-c", "s1", &img]);
        let mut model = data.clone();
        model.resize(8 << 20, 0);
        model[1 << 20..3 << 20].fill(0x5a);
        model[4 << 20..(4 << 20) + 65536].fill(0);
        model[7 << 20..(7 << 20) + 12288].fill(0x33);
        run(&t, &img, model, cs, seed, batches());
    }
}

/// Compressed clusters (written by qemu-img convert -c) read and
/// overwritten concurrently.
#[test]
fn async_compressed_clusters() {
    let t = TempDir::new("q2a-comp");
    let raw = t.path("src.raw");
    let data: Vec<u8> = (0..(4u32 << 20))
        .map(|i| {
            if (i >> 16) % 3 == 0 {
                0
            } else {
                (i / 7 % 5) as u8
            }
        })
        .collect();
    std::fs::write(&raw, &data).unwrap();
    let img = t.path("c.qcow2");
    ok(
        "qemu-img",
        &["convert", "-c", "-f", "raw", "-O", "qcow2", &raw, &img],
    );
    run(&t, &img, data, 65536, 3, batches());
}

/// On tmpfs, where `fallocate(FALLOC_FL_ZERO_RANGE)` is not supported: the
/// zeroing of new clusters through io_uring falls back to writing zeroes.
#[test]
fn async_zero_range_fallback_on_tmpfs() {
    let t = TempDir::new("q2a-shm");
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("SKIP: no /dev/shm");
        return;
    }
    let dir = shm.join(format!("strata-q2a-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("z.qcow2").to_str().unwrap().to_string();
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &img, "4M"]);
    let mut model = vec![0; 4 << 20];
    run_with(&t, &img, &mut model, 65536, 4, batches() / 3, false);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A request's completion comes after the driver let go of the image: a
/// caller that drops the image as soon as its last write completes closes
/// it (flushes the metadata) there and then. Checked through a weak
/// reference to the driver, over many single allocating writes.
#[test]
fn completion_comes_after_the_driver_lets_go() {
    let t = TempDir::new("q2a-close");
    let img = t.path("c.qcow2");
    for i in 0..40u8 {
        let _ = std::fs::remove_file(&img);
        ok("qemu-img", &["create", "-q", "-f", "qcow2", &img, "1M"]);
        let g = BlockGraph::new();
        let node = g.open_image(&img, Some("qcow2"), false, &[]).expect("open");
        let weak = std::sync::Arc::downgrade(node.driver());
        let (tx, rx) = mpsc::channel();
        let off = (i as u64 % 16) * 4096;
        node.submit(
            IoRequest::write(off, IoVecs::from_vec(vec![i + 1; 4096]), false),
            Box::new(move |_, res| tx.send(res).unwrap()),
        );
        rx.recv().unwrap().unwrap();
        drop(node);
        drop(g);
        assert!(
            weak.upgrade().is_none(),
            "round {i}: the driver outlived the completion"
        );
        let (c, o) = qemu("qemu-img", &["check", &img]);
        assert_eq!(c, 0, "round {i}: {o}");
        let cmd = format!("read -P {} {off} 4096", i + 1);
        let (c, o) = qemu("qemu-io", &["-c", &cmd, &img]);
        assert!(c == 0 && !o.contains("fail"), "round {i}: {o}");
    }
}

/// `qemu-img bench -w`'s pattern: sequential 4 KiB writes, 32 in flight,
/// each new request issued from a completion, into a fresh image. Most
/// writes land in a cluster another write is allocating (they join it);
/// every byte must be there afterwards.
#[test]
fn sequential_writes_join_allocations() {
    use std::sync::{Arc, Mutex};
    let t = TempDir::new("q2a-seq");
    let img = t.path("s.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &img, "16M"]);
    let g = BlockGraph::new();
    let node = g
        .open_image(
            &img,
            Some("qcow2"),
            false,
            &[("cache.direct", "on"), ("file.aio", "io_uring")],
        )
        .expect("open");
    const N: u64 = 3000;
    let (tx, rx) = mpsc::channel::<Result<(), String>>();
    let next = Arc::new(Mutex::new(0u64));
    fn issue(
        node: &Arc<block::node::Node>,
        next: &Arc<Mutex<u64>>,
        tx: &mpsc::Sender<Result<(), String>>,
    ) {
        let i = {
            let mut n = next.lock().unwrap();
            if *n >= N {
                return;
            }
            *n += 1;
            *n - 1
        };
        let (n2, nx, t2) = (node.clone(), next.clone(), tx.clone());
        node.submit(
            IoRequest::write(
                i * 4096,
                IoVecs::from_vec(vec![(i % 251) as u8 + 1; 4096]),
                false,
            ),
            Box::new(move |_, res| {
                issue(&n2, &nx, &t2);
                // Let go of the node before reporting, so that once the
                // test has every report its own handle is the last one
                // and dropping it closes the image before qemu-img looks.
                drop(n2);
                t2.send(res.map_err(|e| e.to_string())).unwrap();
            }),
        );
    }
    for _ in 0..32 {
        issue(&node, &next, &tx);
    }
    for _ in 0..N {
        rx.recv().unwrap().unwrap();
    }
    drop(node);
    drop(g);
    let (c, o) = qemu("qemu-img", &["check", &img]);
    assert_eq!(c, 0, "{o}");
    let mut model = vec![0u8; 16 << 20];
    for i in 0..N {
        let a = (i * 4096) as usize;
        model[a..a + 4096].fill((i % 251) as u8 + 1);
    }
    let m = t.path("model.raw");
    std::fs::write(&m, &model).unwrap();
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", &m, &img],
    );
}

/// An external data file: data clusters live in another node, at their
/// guest offsets.
#[test]
fn async_external_data_file() {
    let t = TempDir::new("q2a-df");
    let img = t.path("d.qcow2");
    let data = t.path("d.data");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={data}"),
            &img,
            "4M",
        ],
    );
    ok("qemu-io", &["-c", "write -P 0x42 1M 200k", &img]);
    let mut model = vec![0u8; 4 << 20];
    model[1 << 20..(1 << 20) + 200 * 1024].fill(0x42);
    run(&t, &img, model, 65536, 5, batches() / 2);
}
