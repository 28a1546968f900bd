//! Differential test of internal snapshots: seeded random writes,
//! write-zeroes, discards, compressed writes, growing resizes and snapshot
//! create/apply/delete run on a Strata qcow2 image (in memory) and on a
//! model (the current contents plus a copy per snapshot). After each step
//! group Strata's own check must be clean; at the end the image is written
//! to a file, where `qemu-img check` must be clean and `qemu-img convert
//! -l` must show every snapshot as the model has it. `STRATA_QCOW2_OPS`
//! sets the operations per seed (default 1500), `STRATA_QCOW2_SEEDS` the
//! number of seeds (default 3).

use formats::qcow2::check::Repair;
use formats::qcow2::create::{create, CreateOptions};
use formats::qcow2::{OpenOptions, Qcow2};
use formats::storage::MemStorage;
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

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn assert_clean(img: &Qcow2, what: &str) {
    let r = img.check(Repair::None).unwrap();
    assert_eq!(r.corruptions_after(), 0, "{what}: {:?}", r.messages);
    assert_eq!(r.leaks_after(), 0, "{what}: {:?}", r.messages);
}

fn run(seed: u64, o: &CreateOptions, ops: u64) {
    let f = Arc::new(MemStorage::new(Vec::new(), 1 << 32));
    create("snap.qcow2", f.clone(), None, o).unwrap();
    let img = Qcow2::open("snap.qcow2", f.clone(), None, None, &OpenOptions::default()).unwrap();
    let cs = o.cluster_size;
    let mut model = vec![0u8; o.size as usize];
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let mut rng = Rng(seed);
    let mut counter = 0u64;
    for op in 0..ops {
        let size = model.len() as u64;
        let what = format!("seed {seed:x} op {op}");
        match rng.below(100) {
            0..=44 => {
                let off = rng.below(size);
                let len = (1 + rng.below(3 * cs)).min(size - off);
                let b = rng.next() as u8;
                let data: Vec<u8> = (0..len).map(|i| b.wrapping_add(i as u8)).collect();
                img.write(off, &data, false).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            45..=54 => {
                let off = rng.below(size / 512) * 512;
                let len = ((1 + rng.below(4 * cs)) / 512 * 512).clamp(512, size - off);
                img.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            55..=62 => {
                // Discard whole clusters (reads as zero without backing).
                let c = rng.below(size / cs);
                let n = (1 + rng.below(3)).min(size / cs - c);
                img.discard(c * cs, n * cs).unwrap();
                model[(c * cs) as usize..((c + n) * cs) as usize].fill(0);
            }
            63..=66 => {
                let c = rng.below(size / cs);
                let b = rng.next() as u8;
                let data = vec![b; cs as usize];
                if img.write_compressed(c * cs, &data).is_ok() {
                    model[(c * cs) as usize..((c + 1) * cs) as usize].copy_from_slice(&data);
                } else {
                    // qemu refuses compressed writes to allocated clusters too.
                    let mut cur = vec![0u8; cs as usize];
                    img.read(c * cs, &mut cur).unwrap();
                    assert_eq!(
                        cur,
                        model[(c * cs) as usize..((c + 1) * cs) as usize],
                        "{what}"
                    );
                }
            }
            67..=76 if snaps.len() < 6 => {
                counter += 1;
                let name = format!("s{counter}");
                img.snapshot_create(&name, (1_700_000_000 + counter as u32, 0))
                    .unwrap();
                snaps.push((name, model.clone()));
                assert_clean(&img, &what);
            }
            77..=84 if !snaps.is_empty() => {
                let i = rng.below(snaps.len() as u64) as usize;
                img.snapshot_apply(&snaps[i].0).unwrap();
                model = snaps[i].1.clone();
                assert_eq!(img.size(), model.len() as u64, "{what}");
                assert_clean(&img, &what);
            }
            85..=90 if !snaps.is_empty() => {
                let i = rng.below(snaps.len() as u64) as usize;
                img.snapshot_delete(&snaps[i].0).unwrap();
                snaps.remove(i);
                assert_clean(&img, &what);
            }
            91..=92 if size < 8 * o.size => {
                let new = size + cs * (1 + rng.below(8));
                img.truncate(new).unwrap();
                model.resize(new as usize, 0);
            }
            93..=95 => img.flush().unwrap(),
            _ => {
                let off = rng.below(size);
                let len = (1 + rng.below(2 * cs)).min(size - off);
                let mut b = vec![0u8; len as usize];
                img.read(off, &mut b).unwrap();
                assert!(
                    b == model[off as usize..(off + len) as usize],
                    "{what}: read at {off} len {len}"
                );
            }
        }
    }
    let mut all = vec![0u8; model.len()];
    img.read(0, &mut all).unwrap();
    assert!(all == model, "seed {seed:x}: final contents");
    img.flush().unwrap();
    assert_clean(&img, "final");
    img.close().unwrap();
    drop(img);
    // qemu-img's view.
    let dir = std::env::temp_dir().join(format!("strata-snapdiff-{}-{seed:x}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("i.qcow2");
    std::fs::write(&p, f.contents()).unwrap();
    let p = p.to_str().unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["check", p])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "seed {seed:x}: qemu-img check:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut views = vec![(None, model)];
    views.extend(snaps.into_iter().map(|(n, m)| (Some(n), m)));
    for (name, m) in views {
        let r = dir.join("view.raw");
        let _ = std::fs::remove_file(&r);
        let mut a = vec!["convert", "-O", "raw"];
        if let Some(n) = &name {
            a.extend(["-l", n.as_str()]);
        }
        a.extend([p, r.to_str().unwrap()]);
        let ok = std::process::Command::new("qemu-img")
            .args(&a)
            .status()
            .unwrap()
            .success();
        assert!(ok, "seed {seed:x}: convert {name:?}");
        let mut got = std::fs::read(&r).unwrap();
        // `convert -l` shows a snapshot at the current virtual size: past
        // the snapshot's end it reads zeroes, and a snapshot larger than
        // the current size is cut there.
        let mut m = m;
        if got.len() > m.len() && got[m.len()..].iter().all(|&b| b == 0) {
            got.truncate(m.len());
        }
        m.truncate(got.len());
        let first = got.iter().zip(m.iter()).position(|(a, b)| a != b);
        assert!(
            got == m,
            "seed {seed:x}: snapshot {name:?} differs in qemu-img (len {} vs {}, first difference at {first:?})",
            got.len(),
            m.len()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn snapshots_match_the_model() {
    let ops = env_u64("STRATA_QCOW2_OPS", 1500);
    let seeds = env_u64("STRATA_QCOW2_SEEDS", 3);
    let configs = [
        CreateOptions {
            size: 4 << 20,
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
            size: 1 << 20,
            cluster_size: 512,
            version: 2,
            ..Default::default()
        },
    ];
    for s in 0..seeds {
        let c = &configs[s as usize % configs.len()];
        run(0x51a9_0000 + s * 7919, c, ops);
    }
}
