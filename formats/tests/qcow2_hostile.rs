//! Hostile images: seeded corruptions of the header, L1/L2 tables,
//! refcount structures and snapshot table of valid images. Opening,
//! reading, writing, flushing and checking must end with a result or an
//! error naming the file, never a panic; in-memory storage with a size
//! limit makes any attempt to grow the image without bound fail.

use formats::qcow2::create::{create, CreateOptions};
use formats::qcow2::{OpenOptions, Qcow2};
use formats::storage::MemStorage;
use std::sync::Arc;

fn base_image(o: &CreateOptions) -> Vec<u8> {
    let f = Arc::new(MemStorage::new(Vec::new(), 1 << 30));
    create("base", f.clone(), None, o).unwrap();
    let img = Qcow2::open("base", f.clone(), None, None, &OpenOptions::default()).unwrap();
    let cs = o.cluster_size;
    img.write(0, &vec![0x5a; (3 * cs) as usize], false).unwrap();
    img.write(o.size / 2, &vec![0x6b; 5000], false).unwrap();
    img.write_compressed(4 * cs, &vec![0x11; cs as usize])
        .unwrap();
    img.write_zeroes(6 * cs, cs, true).unwrap();
    img.close().unwrap();
    drop(img);
    f.contents()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Run one corrupted image through every operation (the library harness,
/// also the `qcow2_open` fuzz target).
pub fn exercise(data: Vec<u8>) {
    formats::qcow2::fuzz_open_read(&data);
}

#[test]
fn corrupted_metadata_never_panics() {
    let configs = [
        CreateOptions {
            size: 2 << 20,
            cluster_size: 4096,
            ..Default::default()
        },
        CreateOptions {
            size: 2 << 20,
            cluster_size: 16384,
            extended_l2: true,
            ..Default::default()
        },
        CreateOptions {
            size: 2 << 20,
            cluster_size: 512,
            refcount_bits: 1,
            ..Default::default()
        },
        CreateOptions {
            size: 1 << 20,
            cluster_size: 4096,
            version: 2,
            ..Default::default()
        },
    ];
    let rounds: u64 = std::env::var("STRATA_QCOW2_HOSTILE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    for (ci, c) in configs.iter().enumerate() {
        let base = base_image(c);
        let meta_end = (8 * c.cluster_size as usize).min(base.len());
        let mut rng = Rng(0x1234_5678 + ci as u64);
        for _ in 0..rounds {
            let mut d = base.clone();
            let n = 1 + rng.next() % 6;
            for _ in 0..n {
                let i = (rng.next() as usize) % meta_end;
                match rng.next() % 3 {
                    0 => d[i] = rng.next() as u8,
                    1 => d[i] ^= 1 << (rng.next() % 8),
                    _ => {
                        // A whole big-endian field of 0xff or random.
                        let j = i & !7;
                        let v = if rng.next().is_multiple_of(2) {
                            u64::MAX
                        } else {
                            rng.next()
                        };
                        if j + 8 <= d.len() {
                            d[j..j + 8].copy_from_slice(&v.to_be_bytes());
                        }
                    }
                }
            }
            exercise(d);
        }
    }
}

#[test]
fn truncated_and_empty_files() {
    let base = base_image(&CreateOptions {
        size: 1 << 20,
        cluster_size: 4096,
        ..Default::default()
    });
    for len in [0usize, 3, 71, 72, 104, 511, 4096, 8192, 12288] {
        exercise(base[..len.min(base.len())].to_vec());
    }
}
