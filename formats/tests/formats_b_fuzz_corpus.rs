//! Runs every input of the `bochs_open`, `cloop_open`, `parallels_open`
//! `luks_open`, `qed_open` and `qcow_open` fuzz corpora (the real samples, a qemu-img-made
//! parallels image, hand-made LUKS headers) through their harnesses,
//! then seeded mutations of each (bytes flipped in the headers and
//! tables, cuts), as a normal test.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut v: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("corpus directory")
        .map(|e| {
            let p = e.unwrap().path();
            let d = std::fs::read(&p).unwrap();
            (p, d)
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "empty corpus in {}", dir.display());
    v.into_iter().map(|(_, d)| d).collect()
}

fn replay_and_mutate(target: &str, f: fn(&[u8])) {
    let mut x: u64 = 0x726f_666d_7400_0001;
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for base in corpus(target) {
        f(&base);
        for i in 0..200 {
            let mut d = base.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % d.len().min(1024);
                d[at] ^= (next() as u8) | 1;
            }
            if i % 10 == 9 {
                let n = (next() as usize) % d.len();
                d.truncate(n.max(1));
            }
            f(&d);
        }
    }
}

#[test]
fn bochs_open_corpus() {
    replay_and_mutate("bochs_open", formats::bochs::fuzz_open);
}

#[test]
fn cloop_open_corpus() {
    replay_and_mutate("cloop_open", formats::cloop::fuzz_open);
}

#[test]
fn parallels_open_corpus() {
    replay_and_mutate("parallels_open", formats::parallels::fuzz_open);
}

#[test]
fn luks_open_corpus() {
    replay_and_mutate("luks_open", formats::luks::fuzz_open);
}

#[test]
fn qed_open_corpus() {
    replay_and_mutate("qed_open", formats::qed::fuzz_open);
}

#[test]
fn qcow_open_corpus() {
    replay_and_mutate("qcow_open", formats::qcow::fuzz_open);
}
