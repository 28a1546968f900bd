//! Runs every input of the `vmdk_open` fuzz corpus (fuzz/corpus/vmdk_open:
//! small qemu-img-made sparse, zeroed-grain and stream images, VMware's
//! footer stream sample, and a hand-made descriptor with FLAT and ZERO
//! extents) through its harness, then seeded mutations of them, as a
//! normal test.

use std::path::PathBuf;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/vmdk_open");
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
fn vmdk_open_corpus() {
    for (name, data) in corpus() {
        eprintln!("{name}");
        formats::vmdk::fuzz_open_read(&data);
    }
}

#[test]
fn vmdk_open_seeded_mutations() {
    // xorshift64*: deterministic, so a failure reproduces.
    let mut x: u64 = 0x51ed_270b_1f2a_9c41;
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let per_seed: u32 = std::env::var("STRATA_FUZZ_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    for (name, base) in corpus() {
        for i in 0..per_seed {
            let mut d = base.clone();
            // Mostly the header, descriptor and tables at the start; the
            // footer of a stream at the end; sometimes a cut.
            for _ in 0..1 + next() % 4 {
                let at = match next() % 4 {
                    0 => d.len() - 1 - (next() as usize) % d.len().min(1536),
                    1 => (next() as usize) % d.len().min(65536),
                    _ => (next() as usize) % d.len().min(1024),
                };
                d[at] ^= (next() as u8) | 1;
            }
            if i % 10 == 9 {
                let n = (next() as usize) % d.len();
                d.truncate(n);
            }
            if let Err(e) = std::panic::catch_unwind(|| formats::vmdk::fuzz_open_read(&d)) {
                let keep = std::env::temp_dir().join(format!("fuzz-crash-{i}.vmdk"));
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
