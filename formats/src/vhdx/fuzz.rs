//! The hostile-image harness behind the `vhdx_open` fuzz target and its
//! corpus replay test: one untrusted byte string is opened as a VHDX on
//! in-memory storage (size-limited, so an image cannot make it grow
//! without bound), read-only and read-write (which replays a log), over
//! a small parent in case it is a differencing disk, and run through
//! reads, block status, check, synchronous writes, the asynchronous
//! plan/finish path and a reopen. Any outcome is fine except a panic or
//! an error that does not name the file.

use super::{GuestMap, OpenOptions, Plan, Vhdx, WriteMap};
use crate::storage::{MemStorage, Storage};
use std::sync::Arc;

/// The name hostile images are opened under (errors must carry it).
pub const FUZZ_NAME: &str = "hostile.vhdx";

fn named<T>(r: crate::error::FResult<T>) -> Option<T> {
    crate::error::named(FUZZ_NAME, r)
}

/// Open `data` as a VHDX and exercise it; panics only on a bug.
pub fn fuzz_open_read(data: &[u8]) {
    let limit = (data.len() as u64).max(1 << 20) * 4 + (40 << 20);
    let parent: Arc<dyn Storage> = Arc::new(MemStorage::new(vec![0x5a; 1 << 20], 1 << 20));
    for ro in [true, false] {
        let f = Arc::new(MemStorage::new(data.to_vec(), limit));
        let o = OpenOptions {
            read_only: ro,
            guids: [[1; 16], [2; 16]],
        };
        let Some(img) = named(Vhdx::open(FUZZ_NAME, f.clone(), Some(parent.clone()), &o)) else {
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
                    assert!(h + l <= f.len().unwrap_or(0), "in-place write past the end");
                }
            }
            _ => {}
        }
        named(img.flush());
        drop(img);
        let again = Arc::new(MemStorage::new(f.contents(), limit));
        if let Some(img) = named(Vhdx::open(FUZZ_NAME, again, Some(parent.clone()), &o)) {
            let mut b = vec![0u8; 512];
            named(img.read(0, &mut b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::create::{create, CreateOptions};
    use super::*;

    /// A small image Strata makes, and that image cut and bit-flipped.
    #[test]
    fn created_and_damaged_images_do_not_panic() {
        let f = MemStorage::new(Vec::new(), 64 << 20);
        let o = CreateOptions {
            size: 3 << 20,
            block_size: 1 << 20,
            log_size: 1 << 20,
            fixed: false,
            block_state_zero: true,
            parent: None,
            guids: [[3; 16], [4; 16], [5; 16]],
            creator: "test".into(),
        };
        create(&f, &o).unwrap();
        let img = f.contents();
        fuzz_open_read(&img);
        for (i, at) in [
            0usize,
            8,
            0x10000 + 8,
            0x30000 + 20,
            0x200000,
            0x300000 + 0x10000,
        ]
        .into_iter()
        .enumerate()
        {
            let mut bad = img.clone();
            bad[at] ^= 0x41 + i as u8;
            fuzz_open_read(&bad);
        }
        fuzz_open_read(&img[..img.len() / 2]);
    }
}
