//! The hostile-image harness behind the `vdi_open` fuzz target and its
//! corpus replay test: one untrusted byte string is opened as a VDI image
//! on in-memory storage (size-limited, so an image cannot make it grow
//! without bound) and run through reads, block status, check,
//! synchronous writes, the asynchronous plan/finish path and a reopen.
//! Any outcome is fine except a panic or an error that does not name the
//! file.

use super::Vdi;
use crate::storage::MemStorage;
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
        crate::mapping::fuzz_write_phase(
            &img,
            &*f,
            size,
            FUZZ_NAME,
            |o, d| img.write(o, d),
            |o, b| img.read(o, b),
        );
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
