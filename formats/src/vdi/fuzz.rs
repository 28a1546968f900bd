//! The hostile-image harness behind the `vdi_open` fuzz target and its
//! corpus replay test: one untrusted byte string is opened as a VDI image
//! on in-memory storage (size-limited, so an image cannot make it grow
//! without bound) and run through reads, block status, check,
//! synchronous writes, the asynchronous plan/finish path and a reopen.
//! Any outcome is fine except a panic or an error that does not name the
//! file.

use super::{GuestMap, Plan, Vdi, WriteMap};
use crate::storage::{MemStorage, Storage};
use std::sync::Arc;

/// The name hostile images are opened under (errors must carry it).
pub const FUZZ_NAME: &str = "hostile.vdi";

fn named<T>(r: crate::error::FResult<T>) -> Option<T> {
    crate::error::named(FUZZ_NAME, r)
}

/// Open `data` as a VDI image and exercise it; panics only on a bug.
pub fn fuzz_open_read(data: &[u8]) {
    let limit = (data.len() as u64).max(1 << 20) * 4 + (8 << 20);
    for ro in [true, false] {
        let f = Arc::new(MemStorage::new(data.to_vec(), limit));
        let Some(img) = named(Vdi::open(FUZZ_NAME, f.clone(), ro)) else {
            continue;
        };
        let size = img.size();
        let window = size.min(4 << 20);
        let mut buf = vec![0u8; window as usize];
        named(img.read(0, &mut buf));
        let mut off = 0;
        while off < window {
            match named(img.block_status(off, window - off)) {
                Some(p) => {
                    assert!(p.len > 0 && p.offset == off, "empty status run");
                    off += p.len;
                }
                None => break,
            }
        }
        let _ = img.check();
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
            let d = vec![0xa7u8; n as usize];
            if named(img.write(at, &d)).is_some() {
                let mut back = vec![0u8; n as usize];
                if named(img.read(at, &mut back)).is_some() {
                    assert!(back == d, "read back differs at {at}");
                }
            }
        }
        let at = size / 3;
        let n = 8192.min(size - at);
        if let Some(WriteMap::Allocate) = named(img.map_write(at, n)) {
            if let Some(Plan::Ready {
                zero_first,
                writes,
                alloc,
            }) = named(img.plan_alloc(at, n))
            {
                for (h, l) in zero_first {
                    let _ = f.write_zeroes(h, l);
                }
                for (_, h, l) in writes {
                    let _ = f.write_at(h, &vec![9u8; l as usize]);
                }
                named(img.finish_alloc(alloc, true));
            }
        }
        let _ = img.check();
        named(img.flush());
        drop(img);
        let again = Arc::new(MemStorage::new(f.contents(), limit));
        if let Some(img) = named(Vdi::open(FUZZ_NAME, again, true)) {
            let mut b = vec![0u8; 512];
            named(img.read(0, &mut b));
        }
    }
}
