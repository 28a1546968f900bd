//! The hostile-image harness behind the `vmdk_open` fuzz target and its
//! corpus replay test: one untrusted byte string is opened as a
//! monolithic VMDK (sparse, stream, or a descriptor whose extents are
//! all one in-memory flat file and a ZERO extent) on size-limited
//! in-memory storage, over a small parent, and run through reads, block
//! status, a check, synchronous writes, the asynchronous plan/finish
//! path and a reopen. Any outcome is fine except a panic or an error
//! that does not name the file.

use super::{ExtentFile, OpenOptions, Vmdk};
use crate::storage::{MemStorage, Storage};
use std::sync::Arc;

/// The name hostile images are opened under (errors must carry it).
pub const FUZZ_NAME: &str = "hostile.vmdk";

fn named<T>(r: crate::error::FResult<T>) -> Option<T> {
    crate::error::named(FUZZ_NAME, r)
}

fn open(f: Arc<MemStorage>, parent: &Arc<dyn Storage>, ro: bool) -> Option<Vmdk> {
    let pv = named(super::preview(&*f, FUZZ_NAME))?;
    // Every extent file is a small flat file named like the image.
    let files = pv
        .desc
        .extents
        .iter()
        .map(|e| {
            (e.kind != "ZERO").then(|| ExtentFile {
                storage: Arc::new(MemStorage::new(vec![0x11; 4096], 1 << 20)) as Arc<dyn Storage>,
                name: FUZZ_NAME.to_string(),
            })
        })
        .collect();
    let o = OpenOptions { read_only: ro };
    named(Vmdk::open(
        FUZZ_NAME,
        f,
        &pv,
        files,
        Some(parent.clone()),
        &o,
    ))
}

/// Open `data` as a VMDK and exercise it; panics only on a bug.
pub fn fuzz_open_read(data: &[u8]) {
    let limit = (data.len() as u64).max(1 << 20) * 4 + (16 << 20);
    let parent: Arc<dyn Storage> = Arc::new(MemStorage::new(vec![0x5a; 1 << 20], 1 << 20));
    for ro in [true, false] {
        let f = Arc::new(MemStorage::new(data.to_vec(), limit));
        let Some(img) = open(f.clone(), &parent, ro) else {
            continue;
        };
        let size = img.size();
        let window = size.min(4 << 20);
        let mut buf = vec![0u8; window as usize];
        named(img.read(0, &mut buf));
        let mut off = 0;
        let mut steps = 0;
        while off < window && steps < 4096 {
            match named(img.block_status(off, window - off)) {
                Some(p) => {
                    assert!(p.len > 0 && p.offset == off, "empty status run");
                    off += p.len;
                }
                None => break,
            }
            steps += 1;
        }
        let _ = img.check();
        let _ = img.extent_info();
        if ro || size == 0 {
            continue;
        }
        crate::mapping::fuzz_write_phase(
            &img,
            &*f,
            size,
            FUZZ_NAME,
            |o, d| img.write(o, d),
            |o, b| img.read(o, b),
        );
        named(img.flush());
        drop(img);
        let again = Arc::new(MemStorage::new(f.contents(), limit));
        if let Some(img) = open(again, &parent, true) {
            let mut b = vec![0u8; 512.min(img.size() as usize)];
            named(img.read(0, &mut b));
        }
    }
}
