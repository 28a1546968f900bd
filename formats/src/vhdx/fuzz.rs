//! The hostile-image harness behind the `vhdx_open` fuzz target and its
//! corpus replay test: one untrusted byte string is opened as a VHDX on
//! in-memory storage (size-limited, so an image cannot make it grow
//! without bound), read-only and read-write (which replays a log), over
//! a small parent in case it is a differencing disk, and run through
//! reads, block status, check, synchronous writes, the asynchronous
//! plan/finish path and a reopen. Any outcome is fine except a panic or
//! an error that does not name the file.
//!
//! A VHDX spreads its structures over megabytes of zeroes (headers at
//! 64 and 128 KiB, regions 1 MiB aligned), so inputs may come packed
//! ([`pack`]): the image's length and its non-zero runs. Seeds stay a
//! few KiB and mutations land on the structures, not on the zeroes.

use super::{OpenOptions, Vhdx};
use crate::storage::{MemStorage, Storage};
use std::sync::Arc;

/// The name hostile images are opened under (errors must carry it).
pub const FUZZ_NAME: &str = "hostile.vhdx";

fn named<T>(r: crate::error::FResult<T>) -> Option<T> {
    crate::error::named(FUZZ_NAME, r)
}

/// The signature of a packed image.
pub const PACKED: &[u8; 4] = b"VXPK";
/// The largest image a packed input unpacks to.
pub const MAX_UNPACKED: u64 = 16 << 20;

/// `image` packed: [`PACKED`], its length (u32 LE), then records of an
/// offset (u32 LE), a length (u16 LE) and that many bytes, one per run
/// of non-zero 64-byte pieces.
pub fn pack(image: &[u8]) -> Vec<u8> {
    let mut out = PACKED.to_vec();
    out.extend_from_slice(&(image.len() as u32).to_le_bytes());
    let pieces: Vec<usize> = (0..image.len().div_ceil(64))
        .filter(|&k| {
            image[k * 64..(k * 64 + 64).min(image.len())]
                .iter()
                .any(|&b| b != 0)
        })
        .collect();
    let mut i = 0;
    while i < pieces.len() {
        let mut j = i;
        while j + 1 < pieces.len()
            && pieces[j + 1] == pieces[j] + 1
            && (pieces[j + 1] - pieces[i]) < 1000
        {
            j += 1;
        }
        let (a, b) = (pieces[i] * 64, ((pieces[j] + 1) * 64).min(image.len()));
        out.extend_from_slice(&(a as u32).to_le_bytes());
        out.extend_from_slice(&((b - a) as u16).to_le_bytes());
        out.extend_from_slice(&image[a..b]);
        i = j + 1;
    }
    out
}

/// The image a packed input describes (`None`: `data` is not packed).
/// Records past the stated length, or cut short, are dropped.
pub fn unpack(data: &[u8]) -> Option<Vec<u8>> {
    let rest = data.strip_prefix(PACKED)?;
    let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as u64;
    let mut img = vec![0u8; len.min(MAX_UNPACKED) as usize];
    let mut r = &rest[4..];
    while r.len() >= 6 {
        let off = u32::from_le_bytes([r[0], r[1], r[2], r[3]]) as usize;
        let n = u16::from_le_bytes([r[4], r[5]]) as usize;
        let Some(bytes) = r.get(6..6 + n) else { break };
        if let Some(dst) = img.get_mut(off..off + n) {
            dst.copy_from_slice(bytes);
        }
        r = &r[6 + n..];
    }
    Some(img)
}

/// Open `data` (an image, or a packed one) as a VHDX and exercise it;
/// panics only on a bug.
pub fn fuzz_open_read(data: &[u8]) {
    let unpacked = unpack(data);
    let data = unpacked.as_deref().unwrap_or(data);
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
        let p = pack(&img);
        assert!(p.len() < 4096, "{}", p.len());
        assert_eq!(unpack(&p).as_deref(), Some(&img[..]));
        fuzz_open_read(&p);
    }
}
