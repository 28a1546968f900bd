//! Runs every input of the `vhdx_open` fuzz corpus (fuzz/corpus/vhdx_open:
//! packed qemu-img images, a Strata differencing disk written through
//! strata-nbd, and one with a pending log) through its harness, then
//! seeded mutations of each, as a normal test; and checks that the
//! seeds reach the paths they were made for.

use formats::storage::{MemStorage, Storage};
use formats::vhdx::fuzz::{fuzz_open_read, unpack};
use formats::vhdx::{OpenOptions, Vhdx};
use std::path::PathBuf;
use std::sync::Arc;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/vhdx_open");
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
fn vhdx_open_corpus() {
    for (name, data) in corpus() {
        eprintln!("{name}");
        fuzz_open_read(&data);
    }
}

#[test]
fn vhdx_open_seeded_mutations() {
    // xorshift64*: deterministic, so a failure reproduces.
    let mut x: u64 = 0x7a3c_55e1_0b9d_4f27;
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
            // Past the packed header: the structures' bytes and the
            // records' offsets and lengths alike.
            for _ in 0..1 + next() % 4 {
                let at = 8 + (next() as usize) % (d.len() - 8);
                d[at] ^= (next() as u8) | 1;
            }
            if i % 10 == 9 {
                let n = 8 + (next() as usize) % (d.len() - 8);
                d.truncate(n);
            }
            if let Err(e) = std::panic::catch_unwind(|| fuzz_open_read(&d)) {
                let keep = std::env::temp_dir().join(format!("fuzz-crash-{i}.vhdx"));
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

fn seed(n: &str) -> Arc<MemStorage> {
    let (_, d) = corpus().into_iter().find(|(p, _)| p.ends_with(n)).unwrap();
    Arc::new(MemStorage::new(unpack(&d).unwrap(), 64 << 20))
}

fn opts(read_only: bool) -> OpenOptions {
    OpenOptions {
        read_only,
        guids: [[1; 16], [2; 16]],
    }
}

#[test]
fn seeds_open() {
    let mut b = vec![0u8; 8192];
    // qemu-io's writes.
    let img = Vhdx::open("d", seed("dyn-1M.vhdx"), None, &opts(true)).unwrap();
    assert_eq!(img.size(), 6 << 20);
    img.read(0, &mut b).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0x11) && b[4096..].iter().all(|&x| x == 0));
    img.read(2_100_000, &mut b[..700]).unwrap();
    assert!(b[..700].iter().all(|&x| x == 0x22));
    // The differencing disk: its sectors, the parent's around them.
    let parent: Arc<dyn Storage> = Arc::new(MemStorage::new(vec![0x5a; 1 << 20], 1 << 20));
    let img = Vhdx::open("c", seed("diff.vhdx"), Some(parent), &opts(true)).unwrap();
    assert!(img.metadata().has_parent);
    assert_eq!(img.metadata().parent_paths()[0], "parent.vhdx");
    img.read(0, &mut b[..4096]).unwrap();
    assert!(b[..1024].iter().all(|&x| x == 0x5a));
    assert!(b[1024..2560].iter().all(|&x| x == 0x44));
    assert!(b[2560..4096].iter().all(|&x| x == 0x5a));
    // The pending log: refused read-only, replayed read-write.
    let e = Vhdx::open("l", seed("dirty-log.vhdx"), None, &opts(true))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("needs to be replayed"), "{e}");
    let f = seed("dirty-log.vhdx");
    let img = Vhdx::open("l", f.clone(), None, &opts(false)).unwrap();
    assert!(img.log_replayed());
    img.read(0, &mut b).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0x66));
    assert!(b[4096..].iter().all(|&x| x == 0));
    assert_eq!(img.header().log_guid, [0; 16]);
    drop(img);
    Vhdx::open(
        "l",
        Arc::new(MemStorage::new(f.contents(), 64 << 20)),
        None,
        &opts(true),
    )
    .unwrap();
}
