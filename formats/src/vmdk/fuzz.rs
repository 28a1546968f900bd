//! The hostile-image harness behind the `vmdk_open` fuzz target and its
//! corpus replay test: one untrusted byte string is opened as a
//! monolithic VMDK (sparse, stream, or a descriptor whose extents are
//! all one in-memory flat file and a ZERO extent) on size-limited
//! in-memory storage, over a small parent, and run through reads, block
//! status, a check, synchronous writes, the asynchronous plan/finish
//! path and a reopen. Any outcome is fine except a panic or an error
//! that does not name the file.

use super::{ExtentFile, GuestMap, OpenOptions, Plan, Vmdk, WriteMap};
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
        let end = size - size.min(5000);
        for (at, n) in [
            (0, 4096),
            (700, 1000),
            (end, size.min(5000)),
            (size / 2, 512),
        ] {
            let d = vec![0xc3u8; n as usize];
            if named(img.write(at, &d)).is_some() {
                let mut back = vec![0u8; n as usize];
                if named(img.read(at, &mut back)).is_some() {
                    assert!(back == d, "read back differs at {at}");
                }
            }
        }
        let at = (size / 3) / 512 * 512;
        let n = 8192.min(size - at);
        if let Some(WriteMap::Allocate) = named(img.map_write(at, n)) {
            if let Some(Plan::Ready {
                zero_first,
                writes,
                alloc,
            }) = named(img.plan_alloc(at, n))
            {
                for (h, l) in zero_first {
                    let _ = f.write_zeroes(h, l.min(1 << 24));
                }
                for (_, h, l) in writes {
                    let _ = f.write_at(h, &vec![7u8; l as usize]);
                }
                named(img.finish_alloc(alloc, true));
            }
        }
        named(img.flush());
        drop(img);
        let again = Arc::new(MemStorage::new(f.contents(), limit));
        if let Some(img) = open(again, &parent, true) {
            let mut b = vec![0u8; 512.min(img.size() as usize)];
            named(img.read(0, &mut b));
        }
    }
}
