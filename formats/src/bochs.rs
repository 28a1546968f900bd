//! Bochs growing disk images ("Redolog" type, "Growing" subtype), read
//! only, as bximage writes them and QEMU's bochs driver reads them.
//!
//! Layout (Bochs' `iodev/hdimage/hdimage.h`, `redolog_header_t`): a
//! 512-byte header, all fields little-endian: magic (32 bytes, "Bochs
//! Virtual HD Image"), type (16, "Redolog"), subtype (16, "Growing"),
//! version at 64 (0x00020000, or 0x00010000 for the first layout),
//! header size at 68, catalog entries at 72, bitmap bytes at 76, extent
//! bytes at 80, and the disk size: at 88 in version 2 (after a reserved
//! word), at 84 in version 1. The catalog follows the header: one 32-bit
//! entry per extent, 0xffffffff for an extent never written, else the
//! index of a record of a bitmap (one bit per 512-byte sector, set when
//! the sector was written) followed by the extent's sectors.

use crate::error::{FResult, FormatError};
use crate::mapping::{push_run, Piece, ReadOnlyMap, Run};
use crate::storage::Storage;
use std::sync::Arc;

/// The magic at the start of the header.
pub const MAGIC: &[u8] = b"Bochs Virtual HD Image";
const HEADER_SIZE: u64 = 512;
const SECTOR: u64 = 512;
const VERSION_2: u32 = 0x0002_0000;
const VERSION_1: u32 = 0x0001_0000;
const UNALLOCATED: u32 = 0xffff_ffff;
/// QEMU's bound on extents (8 MiB).
const MAX_EXTENT: u64 = 0x80_0000;
/// Bound on catalog entries held in memory (64 MiB of catalog).
const MAX_CATALOG: u64 = 16 << 20;

/// An open Bochs image.
pub struct Bochs {
    name: String,
    file: Arc<dyn Storage>,
    size: u64,
    catalog: Vec<u32>,
    /// Where the first record starts.
    data_offset: u64,
    /// Bytes of one record's bitmap (whole sectors).
    bitmap_bytes: u64,
    extent_size: u64,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Whether the 16-byte field at `at` is `word` padded with NULs.
fn field_is(b: &[u8], at: usize, len: usize, word: &[u8]) -> bool {
    let f = &b[at..at + len];
    f.starts_with(word) && f[word.len()..].iter().all(|&c| c == 0)
}

/// How sure probing is that `head` starts a Bochs growing image.
pub fn probe(head: &[u8]) -> u32 {
    if head.len() < 84 || !head.starts_with(MAGIC) {
        return 0;
    }
    let version = le32(head, 64);
    if field_is(head, 32, 16, b"Redolog")
        && field_is(head, 48, 16, b"Growing")
        && (version == VERSION_2 || version == VERSION_1)
    {
        100
    } else {
        0
    }
}

impl Bochs {
    /// Open the image in `file` (named `name` in errors).
    pub fn open(name: &str, file: Arc<dyn Storage>) -> FResult<Bochs> {
        let corrupt = |m: String| FormatError::Corrupt(format!("{name}: {m}"));
        let io = |e| FormatError::io(e, format!("{name}: Could not read the header"));
        let mut h = [0u8; HEADER_SIZE as usize];
        file.read_at(0, &mut h).map_err(io)?;
        if probe(&h) == 0 {
            return Err(FormatError::Invalid(format!(
                "{name}: Image not in Bochs format"
            )));
        }
        let size = match le32(&h, 64) {
            VERSION_1 => le64(&h, 84),
            _ => le64(&h, 88),
        };
        let header = u64::from(le32(&h, 68));
        let entries = u64::from(le32(&h, 72));
        let bitmap = u64::from(le32(&h, 76));
        let extent = u64::from(le32(&h, 80));
        if extent < SECTOR || extent % SECTOR != 0 {
            return Err(corrupt(format!("Extent size {extent} is too small")));
        }
        if extent > MAX_EXTENT {
            return Err(corrupt(format!("Extent size {extent} is too large")));
        }
        if entries > MAX_CATALOG {
            return Err(corrupt(format!("Catalog size {entries} is too large")));
        }
        // Enough entries for the disk; their count bounds the size too.
        if entries * extent < size {
            return Err(corrupt(
                "Catalog size is too small for this disk size".into(),
            ));
        }
        if bitmap == 0 || bitmap > 65536 {
            return Err(corrupt(format!("Bitmap size {bitmap} is invalid")));
        }
        if header < HEADER_SIZE {
            return Err(corrupt(format!("Header size {header} is too small")));
        }
        // The catalog is read whole: it must be in the file, so that a
        // hostile count cannot make the reader allocate what is not there.
        let file_len = file
            .len()
            .map_err(|e| FormatError::io(e, format!("{name}: Could not read the catalog")))?;
        if header + entries * 4 > file_len {
            return Err(corrupt(format!(
                "Catalog of {entries} entries does not fit in the file"
            )));
        }
        let mut raw = vec![0u8; (entries * 4) as usize];
        file.read_at(header, &mut raw)
            .map_err(|e| FormatError::io(e, format!("{name}: Could not read the catalog")))?;
        let catalog = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
        Ok(Bochs {
            name: name.to_string(),
            file,
            size,
            catalog,
            data_offset: header + entries * 4,
            bitmap_bytes: bitmap.div_ceil(SECTOR) * SECTOR,
            extent_size: extent,
        })
    }

    /// Where the record of catalog entry `e` starts.
    fn record(&self, e: u32) -> FResult<u64> {
        (u64::from(e))
            .checked_mul(self.bitmap_bytes + self.extent_size)
            .and_then(|o| o.checked_add(self.data_offset))
            .ok_or_else(|| {
                FormatError::Corrupt(format!("{}: catalog entry {e} is out of range", self.name))
            })
    }
}

impl ReadOnlyMap for Bochs {
    fn size(&self) -> u64 {
        self.size
    }

    fn map_read(&self, offset: u64, len: u64) -> FResult<Vec<Piece>> {
        let mut out = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let idx = pos / self.extent_size;
            let in_extent = pos % self.extent_size;
            let n = (self.extent_size - in_extent).min(end - pos);
            let entry = self
                .catalog
                .get(idx as usize)
                .copied()
                .unwrap_or(UNALLOCATED);
            if entry == UNALLOCATED {
                push_run(&mut out, pos, n, Run::Zero);
                pos += n;
                continue;
            }
            let rec = self.record(entry)?;
            // The bitmap bits of the sectors this piece touches.
            let (s0, s1) = (in_extent / SECTOR, (in_extent + n).div_ceil(SECTOR));
            let mut bits = vec![0u8; (s1.div_ceil(8) - s0 / 8) as usize];
            self.file.read_at(rec + s0 / 8, &mut bits).map_err(|e| {
                FormatError::io(e, format!("{}: Could not read a bitmap", self.name))
            })?;
            for s in s0..s1 {
                let a = (s * SECTOR).max(in_extent);
                let b = ((s + 1) * SECTOR).min(in_extent + n);
                let bit = s - (s0 / 8) * 8;
                let written = bits[(bit / 8) as usize] >> (bit % 8) & 1 == 1;
                let run = if written {
                    Run::Data(rec + self.bitmap_bytes + a)
                } else {
                    Run::Zero
                };
                push_run(&mut out, pos + (a - in_extent), b - a, run);
            }
            pos += n;
        }
        Ok(out)
    }
}

/// The hostile-image harness behind the `bochs_open` fuzz target: `data`
/// as a whole image file, opened and read in a few places.
pub fn fuzz_open(data: &[u8]) {
    const NAME: &str = "hostile.bochs";
    let file = Arc::new(crate::storage::MemStorage::new(
        data.to_vec(),
        data.len() as u64,
    ));
    if let Some(img) = crate::error::named(NAME, Bochs::open(NAME, file.clone())) {
        crate::mapping::fuzz_read_only(&crate::mapping::ReadOnly(img), &*file, NAME);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{read_only_read, ReadOnly};
    use crate::storage::MemStorage;

    /// A version-2 image of `size` with 4 KiB extents whose extent 1 has
    /// sectors 0 and 2 written (0xaa, 0xbb).
    fn image(size: u64) -> Vec<u8> {
        let extent = 4096u64;
        let entries = size.div_ceil(extent);
        let mut h = vec![0u8; 512];
        h[..MAGIC.len()].copy_from_slice(MAGIC);
        h[32..39].copy_from_slice(b"Redolog");
        h[48..55].copy_from_slice(b"Growing");
        h[64..68].copy_from_slice(&VERSION_2.to_le_bytes());
        h[68..72].copy_from_slice(&512u32.to_le_bytes());
        h[72..76].copy_from_slice(&(entries as u32).to_le_bytes());
        h[76..80].copy_from_slice(&1u32.to_le_bytes());
        h[80..84].copy_from_slice(&(extent as u32).to_le_bytes());
        h[88..96].copy_from_slice(&size.to_le_bytes());
        let mut cat = vec![0xffu8; (entries * 4) as usize];
        cat[4..8].copy_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&cat);
        let mut rec = vec![0u8; 512 + extent as usize];
        rec[0] = 0b101;
        rec[512..1024].fill(0xaa);
        rec[512 + 1024..512 + 1536].fill(0xbb);
        rec[512 + 512..512 + 1024].fill(0xee); // bit clear: not shown
        h.extend_from_slice(&rec);
        h
    }

    #[test]
    fn written_sectors_read_back_and_the_rest_is_zero() {
        let f: Arc<dyn Storage> = Arc::new(MemStorage::new(image(64 * 1024), 1 << 20));
        assert_eq!(probe(&image(64 * 1024)[..512]), 100);
        let img = ReadOnly(Bochs::open("t", f.clone()).unwrap());
        assert_eq!(img.0.size(), 64 * 1024);
        let mut buf = vec![1u8; 8192];
        read_only_read(&img, "t", &*f, 0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..4608].iter().all(|&b| b == 0xaa));
        assert!(buf[4608..5120].iter().all(|&b| b == 0));
        assert!(buf[5120..5632].iter().all(|&b| b == 0xbb));
        assert!(buf[5632..].iter().all(|&b| b == 0));
    }

    #[test]
    fn hostile_headers_are_refused() {
        let mut img = image(64 * 1024);
        img[80..84].copy_from_slice(&100u32.to_le_bytes());
        let f: Arc<dyn Storage> = Arc::new(MemStorage::new(img, 1 << 20));
        assert!(Bochs::open("t", f).is_err());
        let mut img = image(64 * 1024);
        img[88..96].copy_from_slice(&u64::MAX.to_le_bytes());
        let f: Arc<dyn Storage> = Arc::new(MemStorage::new(img, 1 << 20));
        assert!(Bochs::open("t", f).is_err());
    }
}
