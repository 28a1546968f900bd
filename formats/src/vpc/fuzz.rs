//! The hostile-image harness behind the `vpc_open` fuzz target and its
//! corpus replay test: one untrusted byte string is opened as a VHD on
//! in-memory storage (size-limited, so an image cannot make it grow
//! without bound), as a differencing disk over a small parent too, and
//! run through reads, block status, synchronous writes, the asynchronous
//! plan/finish path and a reopen. Any outcome is fine except a panic, an
//! error that does not name the file, or a write outside the image's
//! data, blocks and metadata.

use super::footer::SizeCalc;
use super::{GuestMap, OpenOptions, Plan, Vpc, WriteMap};
use crate::storage::{MemStorage, Storage};
use std::sync::Arc;

/// The name hostile images are opened under (errors must carry it).
pub const FUZZ_NAME: &str = "hostile.vhd";

fn named<T>(r: crate::error::FResult<T>) -> Option<T> {
    crate::error::named(FUZZ_NAME, r)
}

/// Open `data` as a VHD and exercise it; panics only on a bug.
pub fn fuzz_open_read(data: &[u8]) {
    let limit = (data.len() as u64).max(1 << 20) * 4 + (16 << 20);
    let parent: Arc<dyn Storage> = Arc::new(MemStorage::new(vec![0x5a; 1 << 20], 1 << 20));
    for (ro, calc) in [
        (true, SizeCalc::Auto),
        (false, SizeCalc::Auto),
        (true, SizeCalc::CurrentSize),
    ] {
        let f = Arc::new(MemStorage::new(data.to_vec(), limit));
        let o = OpenOptions {
            read_only: ro,
            size_calc: calc,
        };
        let Some(img) = named(Vpc::open(FUZZ_NAME, f.clone(), Some(parent.clone()), &o)) else {
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
        if ro || size == 0 {
            continue;
        }
        // Unaligned and aligned writes, near the start and the end.
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
        // The asynchronous path, with the data I/O done here.
        let at = (size / 3) / 512 * 512;
        let n = 8192.min(size - at);
        match named(img.map_write(at, n)) {
            Some(WriteMap::Allocate) => {
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
                        let _ = f.write_at(h, &vec![7u8; l as usize]);
                    }
                    named(img.finish_alloc(alloc, true));
                }
            }
            Some(WriteMap::InPlace(runs)) => {
                for (_, h, l) in runs {
                    assert!(
                        h + l <= f.len().unwrap_or(0) + (64 << 20),
                        "wild in-place write"
                    );
                }
            }
            _ => {}
        }
        named(img.flush());
        drop(img);
        // What was written must open again.
        let again = Arc::new(MemStorage::new(f.contents(), limit));
        if let Some(img) = named(Vpc::open(FUZZ_NAME, again, Some(parent.clone()), &o)) {
            let mut b = vec![0u8; 512];
            named(img.read(0, &mut b));
        }
    }
}
