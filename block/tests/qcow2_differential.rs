//! Differential test: seeded random writes, write-zeroes, discards, flushes
//! and resizes go to a Strata qcow2 node and to a raw model at once. After
//! each run `qemu-img check` must be clean and `qemu-img compare` must find
//! the image equal to the model. `STRATA_QCOW2_OPS` sets the operations per
//! seed (default 2000), `STRATA_QCOW2_SEEDS` the number of seeds.

mod common;

use block::graph::BlockGraph;
use common::{Rng, TempDir};
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

fn qemu_img(args: &[&str]) -> (i32, String) {
    common::qemu("qemu-img", args)
}

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn open_rw(g: &BlockGraph, path: &str) -> Arc<block::node::Node> {
    g.open_image(path, Some("qcow2"), false, &[("discard", "unmap")])
        .expect("open read-write")
}

/// One seeded run on `img` (already created; `backing` is its backing raw
/// file, or none).
fn run_seed(
    t: &TempDir,
    img: &str,
    backing: Option<&str>,
    cs: u64,
    seed: u64,
    ops: u64,
    resize: bool,
) {
    let g = BlockGraph::new();
    let node = open_rw(&g, img);
    let mut model = match backing {
        Some(b) => {
            let mut v = std::fs::read(b).unwrap();
            v.resize(node.len() as usize, 0);
            v
        }
        None => vec![0u8; node.len() as usize],
    };
    let has_backing = backing.is_some();
    let v2 = {
        let (_, out) = qemu_img(&["info", "-U", img]);
        out.contains("compat: 0.10")
    };
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    for i in 0..ops {
        let size = model.len() as u64;
        let unit = if rng.below(4) == 0 { 1 } else { 512 };
        let off = rng.below(size / unit) * unit;
        let len = ((rng.below(3 * cs / 512 + 8) + 1) * 512 / unit.max(1) * unit.max(1))
            .max(1)
            .min(size - off);
        if len == 0 {
            continue;
        }
        match rng.below(20) {
            0..=10 => {
                let v = rng.next() as u8;
                let data: Vec<u8> = (0..len).map(|j| v ^ (j as u8)).collect();
                node.write_vectored(off, &[IoSlice::new(&data)], rng.below(50) == 0)
                    .unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            11..=13 => {
                node.write_zeroes(off, len, rng.below(2) == 0, false)
                    .unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            14..=15 => {
                node.discard(off, len).unwrap();
                let a = off.div_ceil(cs) * cs;
                let b = (off + len) / cs * cs;
                if a < b {
                    if v2 && has_backing {
                        // Version 2 has no zero clusters: discarded clusters
                        // show the backing file again.
                        let orig = std::fs::read(backing.unwrap()).unwrap();
                        for p in a..b {
                            model[p as usize] = orig.get(p as usize).copied().unwrap_or(0);
                        }
                    } else {
                        model[a as usize..b as usize].fill(0);
                    }
                }
            }
            16 if resize && i % 40 == 0 => {
                let new = (rng.below(size * 3 / 2 / 512) + 1) * 512;
                node.truncate(new).unwrap();
                model.resize(new as usize, 0);
            }
            17 => {
                let mut got = vec![0u8; len as usize];
                node.read_vectored(off, &mut [IoSliceMut::new(&mut got)])
                    .unwrap();
                assert!(
                    got[..] == model[off as usize..(off + len) as usize],
                    "seed {seed} op {i}: read at {off} len {len} differs"
                );
            }
            _ => node.flush().unwrap(),
        }
    }
    let mut got = vec![0u8; model.len()];
    node.read_vectored(0, &mut [IoSliceMut::new(&mut got)])
        .unwrap();
    assert!(got == model, "seed {seed}: final contents differ");
    drop(node);
    drop(g);
    let (code, out) = qemu_img(&["check", img]);
    assert_eq!(code, 0, "seed {seed}: qemu-img check: {out}");
    let m = t.path("model.raw");
    std::fs::write(&m, &model).unwrap();
    let (code, out) = qemu_img(&["compare", "-f", "raw", "-F", "qcow2", &m, img]);
    assert_eq!(code, 0, "seed {seed}: qemu-img compare: {out}");
}

fn matrix(tag: &str, opts: &str, cs: u64, with_backing: bool, resize: bool) {
    let t = TempDir::new(tag);
    let ops = env_u64("STRATA_QCOW2_OPS", 2000);
    let seeds = env_u64("STRATA_QCOW2_SEEDS", 2);
    for seed in 1..=seeds {
        let img = t.path("img.qcow2");
        let _ = std::fs::remove_file(&img);
        let backing = if with_backing {
            let b = t.path("base.raw");
            let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8 | 1).collect();
            std::fs::write(&b, &data).unwrap();
            let (c, o) = qemu_img(&[
                "create", "-q", "-f", "qcow2", "-o", opts, "-b", &b, "-F", "raw", &img, "4M",
            ]);
            assert_eq!(c, 0, "{o}");
            Some(b)
        } else {
            let (c, o) = qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, &img, "4M"]);
            assert_eq!(c, 0, "{o}");
            None
        };
        run_seed(&t, &img, backing.as_deref(), cs, seed, ops, resize);
    }
}

#[test]
fn differential_default() {
    matrix("q2d-def", "cluster_size=65536", 65536, false, true);
}

#[test]
fn differential_small_clusters_v2() {
    matrix("q2d-v2", "compat=0.10,cluster_size=4096", 4096, false, true);
}

#[test]
fn differential_refcount_widths() {
    matrix(
        "q2d-rc1",
        "cluster_size=1024,refcount_bits=1",
        1024,
        false,
        true,
    );
    matrix(
        "q2d-rc64",
        "cluster_size=512,refcount_bits=64",
        512,
        false,
        false,
    );
}

#[test]
fn differential_backing_cow() {
    matrix("q2d-back", "cluster_size=16384", 16384, true, false);
    matrix(
        "q2d-back2",
        "compat=0.10,cluster_size=4096",
        4096,
        true,
        false,
    );
}

#[test]
fn differential_extended_l2() {
    matrix(
        "q2d-ext",
        "extended_l2=on,cluster_size=65536",
        65536,
        true,
        false,
    );
    matrix(
        "q2d-ext2",
        "extended_l2=on,cluster_size=16384",
        16384,
        false,
        true,
    );
}

#[test]
fn concurrent_allocating_writers() {
    let t = TempDir::new("q2conc");
    let img = t.path("c.qcow2");
    let (c, o) = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        &img,
        "16M",
    ]);
    assert_eq!(c, 0, "{o}");
    let g = BlockGraph::new();
    let node = open_rw(&g, &img);
    let mut hs = Vec::new();
    for th in 0..8u64 {
        let n = node.clone();
        hs.push(std::thread::spawn(move || {
            let mut rng = Rng(th + 11);
            for _ in 0..300 {
                // Each thread owns the 512-byte sectors s with s % 8 == th,
                // so the threads share clusters and L2 tables.
                let s = rng.below(16 << 20 >> 12) * 8 + th;
                let data = vec![(th as u8) + 1; 512];
                n.write_vectored(s * 512, &[IoSlice::new(&data)], false)
                    .unwrap();
                if rng.below(10) == 0 {
                    n.flush().unwrap();
                }
                if rng.below(7) == 0 {
                    let mut b = vec![0u8; 512];
                    n.read_vectored(s * 512, &mut [IoSliceMut::new(&mut b)])
                        .unwrap();
                    assert_eq!(b, data);
                }
            }
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    drop(node);
    drop(g);
    let (code, out) = qemu_img(&["check", &img]);
    assert_eq!(code, 0, "{out}");
}
