//! Replays the `keyval` fuzz corpus (fuzz/corpus/keyval) and seeded random
//! inputs through the harness cargo fuzz runs, so `cargo test` on a stable
//! compiler covers it.

use std::path::PathBuf;

#[test]
fn keyval_corpus() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/keyval");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        block::harness::keyval(&std::fs::read(entry.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n > 0, "empty corpus in {}", dir.display());
    // xorshift64* over the grammar's own characters, so that random inputs
    // get past the first comma.
    const ALPHABET: &[u8] = b"ab.0,=,{}\":[]1kKMx-_ on";
    let mut x: u64 = 0x6b65_7976_616c_0001;
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for _ in 0..2000 {
        let len = (next() % 64) as usize;
        let data: Vec<u8> = (0..len)
            .map(|i| {
                let r = next();
                if i == 0 {
                    r as u8
                } else {
                    ALPHABET[(r % ALPHABET.len() as u64) as usize]
                }
            })
            .collect();
        block::harness::keyval(&data);
    }
}

#[test]
fn web_headers_corpus() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/web_headers");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        block::curl::fuzz_headers(&std::fs::read(entry.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n > 0, "empty corpus in {}", dir.display());
}
