//! Replays the `vvfat_rw` fuzz corpus (fuzz/corpus/vvfat_rw) through the
//! harness cargo fuzz runs, checks that the seeds (guest changes made by
//! mtools on vvfat's own images, as sector writes) are written back as
//! mtools made them, and runs seeded random variations of them, so that
//! `cargo test` on a stable compiler covers the harness.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/vvfat_rw");
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .expect("corpus directory")
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "empty corpus in {}", dir.display());
    v
}

/// Every path below `root`.
fn names(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.insert(p.strip_prefix(root).unwrap().display().to_string());
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn vvfat_rw_corpus() {
    let start: BTreeSet<String> = ["a.txt", "dir", "dir/b.bin", "empty", "escape"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (name, data) in corpus() {
        let mut seen = None;
        block::vvfat::fuzz::run(&data, &mut |p| seen = Some(names(p)));
        let seen = seen.unwrap();
        let with = |add: &[&str], del: &[&str]| -> BTreeSet<String> {
            let mut s = start.clone();
            for d in del {
                s.remove(*d);
            }
            s.extend(add.iter().map(|a| a.to_string()));
            s
        };
        let want = match name.as_str() {
            "new_file" => with(&["new file.txt"], &[]),
            "delete" => with(&[], &["a.txt"]),
            "mkdir_and_file" => with(&["newdir", "newdir/inner"], &[]),
            // mtools' mmove stores a bare 8.3 name (as mdir then shows it).
            "rename_and_move" => with(&["renamed a.txt", "B.BIN"], &["a.txt", "dir/b.bin"]),
            "deltree" => with(&[], &["dir", "dir/b.bin"]),
            "fat16_new_file" => with(&["NEW.TXT"], &[]),
            "fat32_mkdir" => with(&["d32"], &[]),
            "floppy_rename" => with(&["FULL"], &["empty"]),
            "grow" | "empty_ops" => start.clone(),
            // Inputs the fuzzer found: only that they run.
            _ => continue,
        };
        assert_eq!(seen, want, "seed {name}");
    }
}

#[test]
fn vvfat_rw_variations() {
    let seeds = corpus();
    let mut x: u64 = 0x7676_6661_7400_0001;
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for i in 0..300 {
        let mut data = seeds[i % seeds.len()].1.clone();
        for _ in 0..1 + next() % 8 {
            if data.is_empty() {
                break;
            }
            let at = (next() % data.len() as u64) as usize;
            data[at] = next() as u8;
        }
        block::vvfat::fuzz::vvfat_rw(&data);
    }
}
