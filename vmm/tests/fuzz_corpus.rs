//! Runs every input of the `pc_io` fuzz corpus (fuzz/corpus/pc_io) through
//! the harness, plus a few thousand seeded random inputs, as a normal test.

use std::path::PathBuf;

#[test]
fn pc_io_corpus() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/pc_io");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        vmm::harness::pc_io(&data);
        n += 1;
    }
    assert!(n > 0, "empty corpus in {}", dir.display());
}

#[test]
fn pc_io_seeded_random() {
    // xorshift64*: deterministic, so a failure reproduces.
    let mut x: u64 = 0x5eed_5eed_1234_5678;
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for _ in 0..200 {
        let len = (next() % 512) as usize * 8;
        let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        vmm::harness::pc_io(&data);
    }
}

#[test]
fn qmp_input_corpus() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/qmp_input");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        vmm::monitor::qmp::fuzz_input(&data);
        n += 1;
    }
    assert!(n > 0, "empty corpus in {}", dir.display());
}

#[test]
fn qmp_input_seeded_random() {
    let mut x: u64 = 0x0a0b_0c0d_5eed_0001;
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let alphabet = br#"{}[]"':,\ ntrufalse0123456789-.eE executeargumentsid"#;
    for _ in 0..2000 {
        let len = (next() % 300) as usize;
        let data: Vec<u8> = (0..len)
            .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
            .collect();
        vmm::monitor::qmp::fuzz_input(&data);
    }
}

#[test]
fn migration_stream_seed_and_mutations() {
    // A real q35 stream loads; mutations of its configuration and device
    // sections (the stream's tail) and of its RAM records are refused or
    // loaded, never a panic. The committed corpus replays too.
    let seed = vmm::harness::migration_seed().expect("a q35 source stream");
    assert!(
        vmm::harness::migration_stream_loads(&seed),
        "the seed loads whole"
    );
    let mut x: u64 = 0x6d69_6772_6174_6521;
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for i in 0..120 {
        let mut d = seed.clone();
        let tail = d.len().min(6000);
        for _ in 0..1 + next() % 4 {
            let at = if i % 3 == 0 {
                (next() as usize) % d.len()
            } else {
                d.len() - 1 - (next() as usize) % tail
            };
            d[at] ^= (next() as u8) | 1;
        }
        vmm::harness::migration_stream(&d);
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/migration_stream");
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        vmm::harness::migration_stream(&data);
    }
}

/// Regenerates the `migration_stream` corpus seed (`cargo test -p vmm
/// --test fuzz_corpus write_migration_seed -- --ignored`).
#[test]
#[ignore]
fn write_migration_seed() {
    let seed = vmm::harness::migration_seed().expect("a q35 source stream");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/migration_stream");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("q35-ahci"), seed).unwrap();
}
