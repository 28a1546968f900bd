//! Runs every input of the `vpc_open` and `vdi_open` fuzz corpora
//! (fuzz/corpus/*: small qemu-img- and Strata-made images and hand-made
//! ones with small blocks, differencing locators and data past the end
//! of the file) through their harnesses, then seeded mutations of the
//! named seeds, as a normal test.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("corpus directory")
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "empty corpus in {}", dir.display());
    v
}

fn mutations(seeds: Vec<(String, Vec<u8>)>, ext: &str, f: fn(&[u8])) {
    // xorshift64*: deterministic, so a failure reproduces.
    let mut x: u64 = 0x51ed_270b_1f2a_9c41;
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    // STRATA_FUZZ_MUTATIONS runs more per seed (a poor man's fuzzer on
    // stable, without cargo-fuzz).
    let per_seed: u32 = std::env::var("STRATA_FUZZ_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    for (name, base) in seeds.into_iter().filter(|(n, _)| n.ends_with(ext)) {
        for i in 0..per_seed {
            let mut d = base.clone();
            // Mostly the metadata at the start (and a fixed disk's footer
            // at the end); sometimes a cut.
            for _ in 0..1 + next() % 4 {
                let at = if next() % 4 == 0 {
                    d.len() - 1 - (next() as usize) % d.len().min(512)
                } else {
                    (next() as usize) % d.len().min(2048)
                };
                d[at] ^= (next() as u8) | 1;
            }
            if i % 10 == 9 {
                let n = (next() as usize) % d.len();
                d.truncate(n);
            }
            if let Err(e) = std::panic::catch_unwind(|| f(&d)) {
                let keep = std::env::temp_dir().join(format!("fuzz-crash-{i}{ext}"));
                let _ = std::fs::write(&keep, &d);
                eprintln!(
                    "{name} mutation {i} panicked; input kept in {}",
                    keep.display()
                );
                std::panic::resume_unwind(e);
            }
        }
    }
}

#[test]
fn vpc_open_corpus() {
    for (name, data) in corpus("vpc_open") {
        eprintln!("{name}");
        formats::vpc::fuzz_open_read(&data);
    }
}

#[test]
fn vdi_open_corpus() {
    for (name, data) in corpus("vdi_open") {
        eprintln!("{name}");
        formats::vdi::fuzz_open_read(&data);
    }
}

#[test]
fn vpc_open_seeded_mutations() {
    mutations(corpus("vpc_open"), ".vhd", formats::vpc::fuzz_open_read);
}

#[test]
fn vdi_open_seeded_mutations() {
    mutations(corpus("vdi_open"), ".vdi", formats::vdi::fuzz_open_read);
}

#[test]
fn seeds_open() {
    // The hand-made seeds reach the paths they were made for.
    use formats::storage::{MemStorage, Storage};
    use std::sync::Arc;
    let get = |t: &str, n: &str| {
        let (_, d) = corpus(t).into_iter().find(|(p, _)| p.ends_with(n)).unwrap();
        Arc::new(MemStorage::new(d, 1 << 24)) as Arc<dyn Storage>
    };
    let o = formats::vpc::OpenOptions::default();
    let img = formats::vpc::Vpc::open("s", get("vpc_open", "small-blocks.vhd"), None, &o).unwrap();
    assert_eq!(img.size(), 65536);
    assert_eq!(img.block_size(), Some(4096));
    let mut b = vec![0u8; 8192];
    img.read(0, &mut b).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0));
    assert_eq!(&b[4096..4100], &[0, 1, 2, 3]);
    let p = formats::vpc::preview(&*get("vpc_open", "small-diff.vhd"), "d").unwrap();
    assert_eq!(p.parents, ["parent.vhd"]);
    // Sectors 0-3 of block 1 are the child's, the rest the parent's.
    let parent: Arc<dyn Storage> = Arc::new(MemStorage::new(vec![0x5a; 65536], 65536));
    let img =
        formats::vpc::Vpc::open("d", get("vpc_open", "small-diff.vhd"), Some(parent), &o).unwrap();
    img.read(0, &mut b).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0x5a));
    assert_eq!(&b[4096..4100], &[0, 1, 2, 3]);
    assert!(b[4096 + 2048..].iter().all(|&x| x == 0x5a));
    let v = formats::vdi::Vdi::open("v", get("vdi_open", "alloc-cut.vdi"), true).unwrap();
    assert_eq!(v.check().corruptions, 0);
}
