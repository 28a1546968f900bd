//! qcow2 on in-memory storage: random writes, zeroes, discards and resizes
//! against a flat model, then the image is reopened and its own check must
//! find nothing wrong.

use formats::qcow2::check::Repair;
use formats::qcow2::create::{create, CreateOptions};
use formats::qcow2::{OpenOptions, Qcow2};
use formats::storage::{MemStorage, Storage};
use std::sync::Arc;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn run(o: CreateOptions, seed: u64, ops: usize) {
    let file: Arc<dyn Storage> = Arc::new(MemStorage::new(Vec::new(), 1 << 32));
    create("mem", file.clone(), None, &o).unwrap();
    let img = Qcow2::open(
        "mem",
        file.clone(),
        None,
        None,
        &OpenOptions {
            l2_cache_size: Some(2 * o.cluster_size),
            ..Default::default()
        },
    )
    .unwrap();
    let mut model = vec![0u8; o.size as usize];
    let mut rng = Rng(seed);
    let cs = o.cluster_size;
    for i in 0..ops {
        let size = model.len() as u64;
        let off = rng.below(size / 512) * 512;
        let len = (rng.below(4 * cs / 512) + 1) * 512;
        let len = len.min(size - off);
        match rng.below(10) {
            0..=5 => {
                let v = (rng.next() % 255 + 1) as u8;
                let data: Vec<u8> = (0..len).map(|j| v.wrapping_add(j as u8)).collect();
                img.write(off, &data, false).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            6 => {
                img.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            7 => {
                img.discard(off, len).unwrap();
                let a = off.div_ceil(cs) * cs;
                let b = (off + len) / cs * cs;
                if a < b {
                    model[a as usize..b as usize].fill(0);
                }
            }
            8 if i % 50 == 0 => {
                let new = (rng.below(2 * o.size / 512) + 1) * 512;
                img.truncate(new).unwrap();
                model.resize(new as usize, 0);
            }
            _ => img.flush().unwrap(),
        }
        if i % 97 == 0 {
            let mut got = vec![0u8; model.len()];
            img.read(0, &mut got).unwrap();
            assert!(got == model, "seed {seed} op {i}: contents differ");
        }
    }
    let mut got = vec![0u8; model.len()];
    img.read(0, &mut got).unwrap();
    assert!(got == model, "seed {seed}: contents differ at the end");
    img.close().unwrap();
    drop(img);
    let img = Qcow2::open("mem", file, None, None, &OpenOptions::default()).unwrap();
    let r = img.check(Repair::None).unwrap();
    assert_eq!(
        (r.corruptions, r.leaks, r.check_errors),
        (0, 0, 0),
        "{:?}",
        r.messages
    );
    let mut got = vec![0u8; model.len()];
    img.read(0, &mut got).unwrap();
    assert!(got == model);
}

#[test]
fn model_default() {
    run(
        CreateOptions {
            size: 4 << 20,
            cluster_size: 4096,
            ..Default::default()
        },
        1,
        3000,
    );
}

#[test]
fn model_v2_small_refcounts() {
    run(
        CreateOptions {
            size: 2 << 20,
            cluster_size: 512,
            version: 2,
            ..Default::default()
        },
        2,
        2000,
    );
    run(
        CreateOptions {
            size: 2 << 20,
            cluster_size: 1024,
            refcount_bits: 1,
            ..Default::default()
        },
        3,
        2000,
    );
    run(
        CreateOptions {
            size: 2 << 20,
            cluster_size: 512,
            refcount_bits: 64,
            ..Default::default()
        },
        4,
        2000,
    );
}

#[test]
fn model_extended_l2() {
    run(
        CreateOptions {
            size: 4 << 20,
            cluster_size: 16384,
            extended_l2: true,
            ..Default::default()
        },
        5,
        3000,
    );
}
