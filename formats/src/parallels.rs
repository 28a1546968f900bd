//! Parallels (ploop) disk images, read only, as QEMU's
//! `docs/interop/parallels.txt` describes them.
//!
//! Layout ("Header" and "BAT" sections): a 64-byte little-endian header
//! (magic "WithoutFreeSpace" or, for images whose BAT counts clusters,
//! "WithouFreSpacExt"; version 2 at 16; cluster size in sectors
//! (`tracks`) at 28; BAT entries at 32; disk sectors at 36 (64 bits; only
//! the low 32 count in "WithoutFreeSpace" images); the in-use mark at 44
//! (0x746F6E59 while a writer has it open); the data area's sector at
//! 48; the format extension's sector at 56), then the BAT: one 32-bit
//! entry per cluster, 0 for a cluster never written, else where the
//! cluster is, in sectors ("WithoutFreeSpace") or clusters
//! ("WithouFreSpacExt").

use crate::error::{FResult, FormatError};
use crate::mapping::{push_run, Piece, ReadOnlyMap, Run};
use crate::storage::Storage;
use std::sync::Arc;

/// The magic of images whose BAT counts sectors.
pub const MAGIC: &[u8] = b"WithoutFreeSpace";
/// The magic of images whose BAT counts clusters.
pub const MAGIC_EXT: &[u8] = b"WithouFreSpacExt";
const HEADER_SIZE: u64 = 64;
const VERSION: u32 = 2;
const SECTOR: u64 = 512;
/// The in-use mark ("Ynot").
pub const IN_USE: u32 = 0x746f_6e59;

/// An open Parallels image.
pub struct Parallels {
    name: String,
    size: u64,
    cluster_size: u64,
    bat: Vec<u32>,
    /// Bytes per BAT unit: a sector or a cluster.
    unit: u64,
    /// Whether the in-use mark was set.
    dirty: bool,
    /// The format extension's offset in bytes (0: none).
    ext_offset: u64,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// How sure probing is that `head` starts a Parallels image (QEMU's
/// test: a magic and version 2).
pub fn probe(head: &[u8]) -> u32 {
    if head.len() < HEADER_SIZE as usize {
        return 0;
    }
    let magic = &head[..16];
    if (magic == MAGIC || magic == MAGIC_EXT) && le32(head, 16) == VERSION {
        100
    } else {
        0
    }
}

impl Parallels {
    /// Open the image in `file` (named `name` in errors).
    pub fn open(name: &str, file: Arc<dyn Storage>) -> FResult<Parallels> {
        let corrupt = |m: &str| FormatError::Corrupt(format!("{name}: {m}"));
        let io = |e| FormatError::io(e, format!("{name}: Could not read the header"));
        let mut h = [0u8; HEADER_SIZE as usize];
        file.read_at(0, &mut h).map_err(io)?;
        if h[..16] != *MAGIC && h[..16] != *MAGIC_EXT {
            return Err(FormatError::Invalid(format!(
                "{name}: Image not in Parallels format"
            )));
        }
        if le32(&h, 16) != VERSION {
            return Err(FormatError::Unsupported(format!(
                "{name}: Unsupported Parallels format version {}",
                le32(&h, 16)
            )));
        }
        let tracks = u64::from(le32(&h, 28));
        if tracks == 0 {
            return Err(corrupt("Invalid image: Zero sectors per track"));
        }
        if tracks > i32::MAX as u64 / 513 {
            return Err(corrupt("Invalid image: Too big cluster"));
        }
        let entries = u64::from(le32(&h, 32));
        let mut sectors = u64::from_le_bytes(h[36..44].try_into().unwrap_or([0; 8]));
        let ext = h[..16] == *MAGIC_EXT;
        if !ext {
            sectors &= 0xffff_ffff;
        }
        // The BAT is read whole: it must be in the file.
        let file_len = file.len().map_err(io)?;
        if HEADER_SIZE + entries * 4 > file_len {
            return Err(corrupt("Catalog too large"));
        }
        let mut raw = vec![0u8; (entries * 4) as usize];
        file.read_at(HEADER_SIZE, &mut raw)
            .map_err(|e| FormatError::io(e, format!("{name}: Could not read the BAT")))?;
        let cluster_size = tracks * SECTOR;
        let size = sectors
            .checked_mul(SECTOR)
            .filter(|&s| s <= 1 << 62)
            .ok_or_else(|| corrupt("Invalid image: disk size too large"))?;
        Ok(Parallels {
            name: name.to_string(),
            size,
            cluster_size,
            bat: raw.chunks_exact(4).map(|c| le32(c, 0)).collect(),
            unit: if ext { cluster_size } else { SECTOR },
            dirty: le32(&h, 44) == IN_USE,
            ext_offset: u64::from_le_bytes(h[56..64].try_into().unwrap_or([0; 8]))
                .saturating_mul(SECTOR),
        })
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// Whether the image was left marked in use.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// The format extension's offset (0: none).
    pub fn ext_offset(&self) -> u64 {
        self.ext_offset
    }
}

impl ReadOnlyMap for Parallels {
    fn size(&self) -> u64 {
        self.size
    }

    fn map_read(&self, offset: u64, len: u64) -> FResult<Vec<Piece>> {
        let mut out = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let i = pos / self.cluster_size;
            let within = pos % self.cluster_size;
            let n = (self.cluster_size - within).min(end - pos);
            // Clusters never written (or past the BAT) are not in this
            // image: a backing file's, as in QEMU, else zeroes.
            let run = match self.bat.get(i as usize).copied().unwrap_or(0) {
                0 => Run::Backing,
                e => Run::Data(
                    u64::from(e)
                        .checked_mul(self.unit)
                        .and_then(|o| o.checked_add(within))
                        .ok_or_else(|| {
                            FormatError::Corrupt(format!(
                                "{}: BAT entry {i} is out of range",
                                self.name
                            ))
                        })?,
                ),
            };
            push_run(&mut out, pos, n, run);
            pos += n;
        }
        Ok(out)
    }
}

/// The hostile-image harness behind the `parallels_open` fuzz target.
pub fn fuzz_open(data: &[u8]) {
    const NAME: &str = "hostile.parallels";
    let file = Arc::new(crate::storage::MemStorage::new(
        data.to_vec(),
        data.len() as u64,
    ));
    if let Some(img) = crate::error::named(NAME, Parallels::open(NAME, file.clone())) {
        crate::mapping::fuzz_read_only(&crate::mapping::ReadOnly(img), &*file, NAME);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{read_only_read, ReadOnly};
    use crate::storage::MemStorage;

    /// A 256 KiB image of 64 KiB clusters whose cluster 1 is stored.
    fn image(magic: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 512];
        v[..16].copy_from_slice(magic);
        v[16..20].copy_from_slice(&VERSION.to_le_bytes());
        v[28..32].copy_from_slice(&128u32.to_le_bytes());
        v[32..36].copy_from_slice(&4u32.to_le_bytes());
        v[36..44].copy_from_slice(&512u64.to_le_bytes());
        v[48..52].copy_from_slice(&1u32.to_le_bytes());
        // Entry 1 is sector 1 (old) or cluster 1 (ext).
        v[64 + 4..64 + 8].copy_from_slice(&1u32.to_le_bytes());
        let at = if magic == MAGIC { 512 } else { 65536 };
        v.resize(at + 65536, 0);
        v[at..at + 65536].fill(0x5a);
        v
    }

    #[test]
    fn both_bat_units_map() {
        for magic in [MAGIC, MAGIC_EXT] {
            let data = image(magic);
            assert_eq!(probe(&data), 100);
            let f = Arc::new(MemStorage::new(data, 1 << 20));
            let img = ReadOnly(Parallels::open("t", f.clone()).unwrap());
            assert_eq!(img.0.size(), 256 * 1024);
            let mut buf = vec![1u8; 256 * 1024];
            read_only_read(&img, "t", &*f, 0, &mut buf).unwrap();
            assert!(buf[..65536].iter().all(|&b| b == 0));
            assert!(buf[65536..131072].iter().all(|&b| b == 0x5a));
            assert!(buf[131072..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn hostile_headers_are_refused() {
        let mut v = image(MAGIC_EXT);
        v[28..32].copy_from_slice(&0u32.to_le_bytes());
        assert!(Parallels::open("t", Arc::new(MemStorage::new(v, 1 << 20))).is_err());
        let mut v = image(MAGIC_EXT);
        v[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Parallels::open("t", Arc::new(MemStorage::new(v, 1 << 20))).is_err());
    }
}
