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
//!
//! The format extension ("Format Extension", "Dirty bitmaps feature"):
//! one cluster at `ext_off` holding a magic, an MD5 of the rest of the
//! cluster, then features (magic, flags, data size, data, padded to 8
//! bytes) up to an all-zero end. The dirty bitmap feature gives the
//! bitmap's size in sectors, its 16-byte id (named by it, as a UUID),
//! its granularity in sectors and an L1 table of 64-bit entries, one per
//! cluster of bitmap data: 0 all clear, 1 all set, else the sector where
//! that cluster of bits lies. QEMU loads these as dirty bitmaps (not
//! persistent: it never writes them back); so does Strata, for QMP's
//! `dirty-bitmaps`. Feature flags, unknown features, a bad magic or a bad
//! checksum fail the open, as in QEMU.

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
/// The format extension cluster's magic.
pub const EXT_MAGIC: u64 = 0xab23_4cef_23dc_ea87;
/// The dirty bitmap feature's magic.
pub const FEATURE_DIRTY_BITMAP: u64 = 0x2038_5fae_252c_b34a;
/// The largest extension cluster read (QEMU reads one cluster; bigger
/// clusters than this are hostile or absurd for a few features).
const MAX_EXT: u64 = 16 << 20;
/// The largest bitmap loaded (bits for a 1 PiB disk at 4 KiB granularity
/// are 32 GiB: beyond this the image is refused as hostile).
pub const MAX_BITMAP_BYTES: u64 = 256 << 20;

/// A dirty bitmap of the format extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtBitmap {
    /// Its id as a UUID, its name when loaded.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Where each cluster of its bits lies (0: clear, 1: set, else the
    /// byte offset in the file).
    l1: Vec<u64>,
    /// Bytes of bit data.
    bytes: u64,
}

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
    /// The extension's dirty bitmaps.
    bitmaps: Vec<ExtBitmap>,
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
        let ext_offset =
            u64::from_le_bytes(h[56..64].try_into().unwrap_or([0; 8])).saturating_mul(SECTOR);
        let bitmaps = if ext_offset != 0 {
            read_extension(name, &*file, ext_offset, cluster_size, sectors, file_len)?
        } else {
            Vec::new()
        };
        Ok(Parallels {
            name: name.to_string(),
            size,
            cluster_size,
            bat: raw.chunks_exact(4).map(|c| le32(c, 0)).collect(),
            unit: if ext { cluster_size } else { SECTOR },
            dirty: le32(&h, 44) == IN_USE,
            ext_offset,
            bitmaps,
        })
    }

    /// The format extension's dirty bitmaps.
    pub fn bitmaps(&self) -> &[ExtBitmap] {
        &self.bitmaps
    }

    /// The bits of `bm` (one of [`Parallels::bitmaps`]), least significant
    /// bit of the first byte first.
    pub fn load_bitmap(&self, file: &dyn Storage, bm: &ExtBitmap) -> FResult<Vec<u8>> {
        let cs = self.cluster_size;
        let mut out = vec![0u8; bm.bytes as usize];
        for (i, chunk) in out.chunks_mut(cs as usize).enumerate() {
            match bm.l1.get(i).copied().unwrap_or(0) {
                0 => {}
                1 => chunk.fill(0xff),
                off => file.read_at(off, chunk).map_err(|e| {
                    FormatError::io(e, format!("{}: reading bitmap {}", self.name, bm.name))
                })?,
            }
        }
        Ok(out)
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

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// The 16 bytes of an id as QEMU prints a UUID.
fn uuid_string(b: &[u8]) -> String {
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

/// Parse the format extension cluster at `off` (every field checked
/// against the cluster and the file): its dirty bitmaps.
fn read_extension(
    name: &str,
    file: &dyn Storage,
    off: u64,
    cs: u64,
    disk_sectors: u64,
    file_len: u64,
) -> FResult<Vec<ExtBitmap>> {
    let bad = |m: String| FormatError::Corrupt(format!("{name}: {m}"));
    if cs > MAX_EXT {
        return Err(FormatError::Unsupported(format!(
            "{name}: a format extension in {cs}-byte clusters is larger than the {MAX_EXT} bytes Strata reads"
        )));
    }
    if off.checked_add(cs).is_none_or(|e| e > file_len) {
        return Err(bad("the format extension is outside the file".into()));
    }
    let mut c = vec![0u8; cs as usize];
    file.read_at(off, &mut c)
        .map_err(|e| FormatError::io(e, format!("{name}: reading the format extension")))?;
    if c.len() < 24 || le64(&c, 0) != EXT_MAGIC {
        return Err(bad("Wrong parallels Format Extension magic".into()));
    }
    {
        use md5::{Digest, Md5};
        if Md5::digest(&c[24..])[..] != c[8..24] {
            return Err(bad(
                "Wrong checksum in Format Extension header. Format extension is corrupted.".into(),
            ));
        }
    }
    let mut out = Vec::new();
    let mut pos = 24usize;
    loop {
        if pos + 24 > c.len() {
            return Err(bad("the format extension has no end of features".into()));
        }
        let (magic, flags) = (le64(&c, pos), le64(&c, pos + 8));
        let size = le32(&c, pos + 16) as usize;
        pos += 24;
        if magic == 0 {
            break;
        }
        let data = pos
            .checked_add(size)
            .and_then(|e| c.get(pos..e))
            .ok_or_else(|| bad("a format extension feature is larger than its cluster".into()))?;
        // QEMU refuses any flag and any other feature: the image is
        // not opened rather than its extension half read.
        if flags != 0 {
            return Err(FormatError::Unsupported(format!(
                "{name}: Flags for extension feature are unsupported"
            )));
        }
        match magic {
            FEATURE_DIRTY_BITMAP => out.push(parse_bitmap(name, data, cs, disk_sectors, file_len)?),
            _ => {
                return Err(FormatError::Unsupported(format!(
                    "{name}: Unknown feature: {magic:#x}"
                )))
            }
        }
        pos += size.div_ceil(8) * 8;
    }
    Ok(out)
}

fn parse_bitmap(
    name: &str,
    d: &[u8],
    cs: u64,
    disk_sectors: u64,
    file_len: u64,
) -> FResult<ExtBitmap> {
    let bad = |m: String| FormatError::Corrupt(format!("{name}: {m}"));
    if d.len() < 32 {
        return Err(bad("a dirty bitmap feature is too short".into()));
    }
    let size = le64(d, 0);
    let id = uuid_string(&d[8..24]);
    let gran = u64::from(le32(d, 24));
    let l1_size = le32(d, 28) as usize;
    if size != disk_sectors {
        return Err(bad(format!(
            "Bitmap {id}: its size ({size} sectors) differs from the disk's ({disk_sectors})"
        )));
    }
    if !gran.is_power_of_two() || gran * SECTOR > u64::from(u32::MAX) {
        return Err(bad(format!(
            "Invalid bitmap granularity {}, expected a power of two of at least 512 bytes",
            gran * SECTOR
        )));
    }
    let bytes = size.div_ceil(gran).div_ceil(8);
    if bytes > MAX_BITMAP_BYTES {
        return Err(FormatError::Unsupported(format!(
            "{name}: Bitmap {id} has {bytes} bytes, more than the {MAX_BITMAP_BYTES} Strata loads"
        )));
    }
    if l1_size as u64 != bytes.div_ceil(cs) || d.len() < 32 + 8 * l1_size {
        return Err(bad(format!("Bitmap {id}: wrong L1 table size {l1_size}")));
    }
    let mut l1 = Vec::with_capacity(l1_size);
    for i in 0..l1_size {
        let e = le64(d, 32 + 8 * i);
        let e = match e {
            0 | 1 => e,
            s => {
                let at = s
                    .checked_mul(SECTOR)
                    .filter(|a| a.checked_add(cs).is_some_and(|end| end <= file_len))
                    .ok_or_else(|| {
                        bad(format!("Bitmap {id}: L1 entry {i} points outside the file"))
                    })?;
                at
            }
        };
        l1.push(e);
    }
    Ok(ExtBitmap {
        name: id,
        granularity: gran * SECTOR,
        l1,
        bytes,
    })
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
        for b in img.bitmaps() {
            let _ = img.load_bitmap(&*file, b);
        }
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
