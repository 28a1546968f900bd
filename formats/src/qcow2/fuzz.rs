//! The hostile-image harness, shared by `formats/tests/qcow2_hostile.rs`,
//! the `qcow2_open` cargo-fuzz target and its corpus replay test: one
//! untrusted byte string is opened as a qcow2 image on in-memory storage
//! (with a size limit, so an image can never make us grow without bound)
//! and run through every operation: open read-only and read-write (the
//! bitmap directory is checked there; the bitmaps are loaded and stored
//! back), read, write (the first change marks
//! `auto` bitmaps in use), write-zeroes, discard, snapshot
//! create/apply/delete, flush, check and repair. Any outcome is fine except
//! a panic, an error that does not name the file, or a loop without end.

use super::check::Repair;
use super::{OpenOptions, Qcow2};
use crate::storage::{MemStorage, Storage};
use std::sync::Arc;

/// The name hostile images are opened under (errors must carry it).
pub const FUZZ_NAME: &str = "hostile.qcow2";

fn named(r: Result<(), crate::error::FormatError>) {
    if let Err(e) = r {
        assert!(
            e.to_string().contains(FUZZ_NAME) || e.to_string().contains("internal error"),
            "error without file name: {e}"
        );
    }
}

/// Open `data` as a qcow2 image and exercise it; panics only on a bug.
pub fn fuzz_open_read(data: &[u8]) {
    let limit = (data.len() as u64).max(1 << 20) * 4;
    let f: Arc<dyn Storage> = Arc::new(MemStorage::new(data.to_vec(), limit));
    for ro in [true, false] {
        let o = OpenOptions {
            read_only: ro,
            ..Default::default()
        };
        let img = match Qcow2::open(FUZZ_NAME, f.clone(), None, None, &o) {
            Ok(i) => i,
            Err(e) => {
                named(Err(e));
                continue;
            }
        };
        let size = img.size().min(4 << 20);
        let mut buf = vec![0u8; size as usize];
        named(img.read(0, &mut buf));
        let _ = img.block_status(0, size.max(1));
        let _ = img.snapshots();
        // The bitmap directory was parsed and checked by the open.
        // Loading each bitmap's data follows its hostile table.
        let mut stored = Vec::new();
        for b in img.bitmaps() {
            let _ = (b.flag_names(), b.granularity());
            // The directory check bounds a bitmap at 512 MiB of data; past
            // a few MiB a fuzz run would only measure memcpy.
            if b.table_size as u64 * img.cluster_size() > 16 << 20 {
                continue;
            }
            if let Ok(words) = img.load_bitmap(&b) {
                stored.push(super::bitmap::StoredBitmap {
                    name: b.name.clone(),
                    granularity_bits: b.granularity_bits,
                    enabled: true,
                    words,
                });
            }
        }
        if !ro {
            // Storing them back rewrites the directory over hostile
            // refcounts.
            named(img.bitmaps_taken());
            named(img.store_bitmaps(&stored, &[]));
        }
        if !ro {
            named(img.write(0, &[1u8; 4096], false));
            // The asynchronous driver's entry points, with the data I/O
            // done here as the block layer would do it.
            let n = 8192.min(size as usize / 2);
            let src = vec![4u8; n];
            if let Ok(super::io::WritePlan::Ready(mut pw)) = img.plan_write(size / 5, &src) {
                for &(h, l) in &pw.zero_first {
                    let _ = f.write_zeroes(h, l);
                }
                for (h, d) in std::mem::take(&mut pw.writes) {
                    let _ = match d {
                        super::io::WriteData::Guest { offset, len } => {
                            let a = (offset - size / 5) as usize;
                            f.write_at(h, &src[a..a + len as usize])
                        }
                        super::io::WriteData::Owned(v) => f.write_at(h, &v),
                    };
                }
                named(img.finish_write(pw, Ok(())));
            }
            if let Ok(super::io::Overwrite::InPlace(runs, t)) = img.map_overwrite(0, n as u64) {
                for (_, h, l) in runs {
                    let _ = f.write_at(h, &src[..l as usize]);
                }
                drop(t);
            }
            let _ = img.map_read(0, size).map(|(p, t)| (p.len(), drop(t)));
            let _ = img.write(size / 3, &vec![2u8; 70000.min(size as usize / 2)], false);
            let _ = img.write_zeroes(0, size / 2, true);
            let _ = img.discard(0, size);
            let _ = img.flush();
            if let Some(s) = img.snapshots().first() {
                named(img.snapshot_apply(&s.id));
                let mut b = vec![0u8; 4096.min(size as usize)];
                let _ = img.read(0, &mut b);
            }
            let _ = img.snapshot_create("fuzz", (0, 0)).map(|_| ());
            let _ = img.write(0, &[3u8; 512], false);
            if let Some(s) = img.snapshots().first() {
                let _ = img.snapshot_delete(&s.id).map(|_| ());
            }
            let _ = img.flush();
        }
        let _ = img.check(if ro { Repair::None } else { Repair::All });
        let _ = img.close();
    }
}
