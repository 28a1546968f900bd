//! The hostile-image harness behind the `vpc_open` fuzz target and its
//! corpus replay test: one untrusted byte string is opened as a VHD on
//! in-memory storage (size-limited, so an image cannot make it grow
//! without bound), as a differencing disk over a small parent too, and
//! run through reads, block status, synchronous writes, the asynchronous
//! plan/finish path and a reopen. Any outcome is fine except a panic, an
//! error that does not name the file, or a write outside the image's
//! data, blocks and metadata.

use super::footer::SizeCalc;
use super::{OpenOptions, Vpc};
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
        // What was written must open again.
        let again = Arc::new(MemStorage::new(f.contents(), limit));
        if let Some(img) = named(Vpc::open(FUZZ_NAME, again, Some(parent.clone()), &o)) {
            let mut b = vec![0u8; 512];
            named(img.read(0, &mut b));
        }
    }
}
