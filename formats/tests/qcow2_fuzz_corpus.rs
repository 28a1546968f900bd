//! Runs every input of the `qcow2_open` fuzz corpus (fuzz/corpus/qcow2_open:
//! small qemu-img-made images, plus whatever the fuzzer found worth
//! keeping) through the harness, then seeded mutations of each, as a
//! normal test.

use std::path::PathBuf;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/qcow2_open");
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

#[test]
fn qcow2_open_corpus() {
    for (name, data) in corpus() {
        eprintln!("{name}");
        formats::qcow2::fuzz_open_read(&data);
    }
}

#[test]
fn qcow2_open_seeded_mutations() {
    // xorshift64*: deterministic, so a failure reproduces.
    let mut x: u64 = 0x9c0f_2a11_5eed_0042;
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    // Only the qemu-img-made seeds: the fuzzer's own finds (named by
    // their hash) are replayed as they are above, and mutating each of
    // them too would make this test grow with the corpus.
    for (_, base) in corpus().into_iter().filter(|(n, _)| n.ends_with(".qcow2")) {
        let meta_end = base.len().min(8192);
        for _ in 0..20 {
            let mut d = base.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() as usize) % meta_end;
                d[i] ^= (next() as u8) | 1;
            }
            formats::qcow2::fuzz_open_read(&d);
        }
    }
}

#[test]
fn corpus_reaches_the_bitmap_directory() {
    // The seed with persistent bitmaps (qemu-img bitmap --add, one enabled,
    // one disabled) opens with both listed: mutations of it exercise the
    // directory parser.
    use formats::qcow2::{OpenOptions, Qcow2};
    use formats::storage::{MemStorage, Storage};
    use std::sync::Arc;
    let (_, data) = corpus()
        .into_iter()
        .find(|(n, _)| n.ends_with("bitmaps-512.qcow2"))
        .expect("bitmaps seed in the corpus");
    let f: Arc<dyn Storage> = Arc::new(MemStorage::new(data, 1 << 24));
    let o = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let img = Qcow2::open("seed", f, None, None, &o).unwrap();
    let b = img.bitmaps();
    assert_eq!(b.len(), 2);
    assert_eq!(b[0].flag_names(), ["auto"]);
    assert!(b[1].flag_names().is_empty());
}
