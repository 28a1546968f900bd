//! Persistent dirty bitmaps (qcow2.rst: "Bitmaps extension", "Bitmap
//! directory", "Bitmap table"): the header extension and the bitmap
//! directory, parsed and checked against the limits QEMU enforces when it
//! opens an image, so that an image QEMU refuses is refused here too and
//! `info` can list the bitmaps as `qemu-img info` does. Everything read
//! from the file is bounds-checked; nothing here panics on hostile input.
//!
//! Strata does not track guest writes in bitmaps. A bitmap with the `auto`
//! flag is one QEMU would have updated on each write, so before the first
//! change of guest data through a read-write open (write, write-zeroes,
//! discard, resize, snapshot apply, commit's emptying...) those bitmaps are
//! marked `in_use` on disk ([`Meta::mark_bitmaps_in_use`]): that is what
//! the spec calls a bitmap that "may be inconsistent", what QEMU leaves
//! after a crash, and what makes QEMU refuse to use it rather than trust a
//! stale one. Disabled bitmaps (no `auto`) are not changed by writes in
//! QEMU either, so they stay valid and are left alone; so are all bitmaps
//! while nothing changes guest data (check, amend, snapshot create).
//! A resize changes the size every bitmap table must fit, and Strata does
//! not resize bitmaps: then every bitmap is marked in use (QEMU accepts a
//! table of the wrong size only for those).
//! The clusters of every bitmap stay referenced, so `check` stays clean.

use super::Meta;
use crate::error::{FResult, FormatError};
use crate::storage::Storage;

/// The bitmap was not saved correctly and may be inconsistent.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// The bitmap tracks every write (enabled).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Extra data may be ignored by a reader that does not know it.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// Flags a reader must know.
const KNOWN_FLAGS: u32 = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE;
/// Most bitmaps in an image (QEMU's limit).
pub const MAX_BITMAPS: u32 = 65535;
/// Longest bitmap name.
pub const MAX_NAME: usize = 1023;
/// Largest directory entry QEMU accepts, and so the largest directory.
const MAX_ENTRY: u64 = 1024;
/// Largest directory, in bytes.
pub const MAX_DIR_SIZE: u64 = MAX_BITMAPS as u64 * MAX_ENTRY;
/// Largest bitmap table, in entries.
const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
/// Largest bitmap data (table entries times cluster size), in bytes.
const MAX_PHYS_BYTES: u64 = 0x2000_0000;
/// Granularity limits, as log2 of bytes.
const GRANULARITY_BITS: std::ops::RangeInclusive<u8> = 9..=31;
/// The only bitmap type: dirty tracking.
const TYPE_DIRTY_TRACKING: u8 = 1;

/// The header extension's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Directory size in bytes.
    pub dir_size: u64,
    /// Directory offset in the image file.
    pub dir_offset: u64,
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries of the bitmap table.
    pub table_size: u32,
    /// Flags ([`FLAG_IN_USE`], [`FLAG_AUTO`], ...).
    pub flags: u32,
    /// log2 of the bytes of guest disk one bit stands for.
    pub granularity_bits: u8,
    /// The bitmap's name.
    pub name: String,
    /// Where the entry starts in the directory.
    pub entry_offset: usize,
}

impl Bitmap {
    /// Bytes of guest disk per bit.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }
    /// `qemu-img info`'s names of the flags it knows, in its order.
    pub fn flag_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.flags & FLAG_IN_USE != 0 {
            v.push("in-use");
        }
        if self.flags & FLAG_AUTO != 0 {
            v.push("auto");
        }
        v
    }
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

impl BitmapsExt {
    /// Parse and check the extension's data (`cs`: cluster size). Errors
    /// are QEMU's messages, without the file name.
    pub fn parse(raw: &[u8], cs: u64) -> Result<BitmapsExt, String> {
        if raw.len() != 24 {
            return Err("bitmaps_ext: Invalid extension length".into());
        }
        if be32(raw, 4) != 0 {
            return Err("bitmaps_ext: Reserved field is not zero".into());
        }
        let e = BitmapsExt {
            nb_bitmaps: be32(raw, 0),
            dir_size: be64(raw, 8),
            dir_offset: be64(raw, 16),
        };
        if e.nb_bitmaps > MAX_BITMAPS {
            return Err(format!(
                "bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}",
                e.nb_bitmaps
            ));
        }
        if e.nb_bitmaps == 0 {
            return Err("found bitmaps extension with zero bitmaps".into());
        }
        if !e.dir_offset.is_multiple_of(cs) {
            return Err("bitmaps_ext: invalid bitmap directory offset".into());
        }
        if e.dir_size > MAX_DIR_SIZE {
            return Err(format!(
                "bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size ({MAX_DIR_SIZE})",
                e.dir_size
            ));
        }
        Ok(e)
    }
}

/// Bitmap table entries a bitmap of `granularity_bits` needs for a disk of
/// `size` bytes with clusters of `cs` bytes.
fn table_entries_for(size: u64, granularity_bits: u8, cs: u64) -> u64 {
    let bits = size.div_ceil(1 << granularity_bits);
    bits.div_ceil(cs * 8)
}

/// Parse and check the directory `dir` (what the extension points at) of
/// an image of virtual size `size` with clusters of `cs` bytes. Errors are
/// QEMU's messages, without the file name.
pub fn parse_directory(
    dir: &[u8],
    ext: &BitmapsExt,
    cs: u64,
    size: u64,
) -> Result<Vec<Bitmap>, String> {
    let mut out: Vec<Bitmap> = Vec::new();
    let mut p = 0usize;
    while p < dir.len() {
        if dir.len() - p < 24 {
            return Err("Broken bitmap directory".into());
        }
        let name_size = be16(dir, p + 18) as usize;
        let extra = be32(dir, p + 20) as u64;
        let entry_len = (24 + extra + name_size as u64).div_ceil(8) * 8;
        if entry_len > (dir.len() - p) as u64 {
            return Err("Broken bitmap directory".into());
        }
        if out.len() as u32 >= ext.nb_bitmaps {
            return Err("More bitmaps found than specified in header extension".into());
        }
        let name_at = p + 24 + extra as usize;
        let name = String::from_utf8_lossy(&dir[name_at..name_at + name_size]).into_owned();
        if extra != 0 {
            return Err("Bitmap extra data is not supported".into());
        }
        let b = Bitmap {
            table_offset: be64(dir, p),
            table_size: be32(dir, p + 8),
            flags: be32(dir, p + 12),
            granularity_bits: dir[p + 17],
            name,
            entry_offset: p,
        };
        let ts = b.table_size as u64;
        let fits = b.table_offset.is_multiple_of(cs)
            && ts <= MAX_TABLE_ENTRIES
            && ts.saturating_mul(cs) <= MAX_PHYS_BYTES
            && (b.table_offset != 0 || ts == 0)
            && GRANULARITY_BITS.contains(&b.granularity_bits)
            && b.flags & !KNOWN_FLAGS == 0
            && (1..=MAX_NAME).contains(&name_size)
            && dir[p + 16] == TYPE_DIRTY_TRACKING
            && !out.iter().any(|o| o.name == b.name);
        if !fits {
            return Err(format!(
                "Bitmap '{}' doesn't satisfy the constraints",
                b.name
            ));
        }
        // QEMU reads the data of the bitmaps that are not in use, and
        // their tables must fit the disk.
        if b.flags & FLAG_IN_USE == 0 && ts != table_entries_for(size, b.granularity_bits, cs) {
            return Err(format!(
                "Could not read bitmap '{}' from image: Invalid argument",
                b.name
            ));
        }
        out.push(b);
        p += entry_len as usize;
    }
    if (out.len() as u32) < ext.nb_bitmaps {
        return Err("Less bitmaps found than specified in header extension".into());
    }
    Ok(out)
}

/// Read and check the bitmap directory of an image whose header carries
/// the extension `raw` (`None`: no bitmaps). `name` names the file in
/// errors.
pub fn read_bitmaps(
    file: &dyn Storage,
    raw: &[u8],
    cs: u64,
    size: u64,
    name: &str,
) -> FResult<(BitmapsExt, Vec<Bitmap>)> {
    let bad = |m: String| FormatError::Corrupt(format!("{name}: {m}"));
    let ext = BitmapsExt::parse(raw, cs).map_err(bad)?;
    // At most MAX_DIR_SIZE (64 MiB) by the check above.
    let mut dir = vec![0u8; ext.dir_size as usize];
    file.read_at(ext.dir_offset, &mut dir)
        .map_err(|e| FormatError::io(e, format!("{name}: reading the bitmap directory")))?;
    let list = parse_directory(&dir, &ext, cs, size).map_err(bad)?;
    Ok((ext, list))
}

/// A bitmap to store in the image: what the block layer tracked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBitmap {
    pub name: String,
    /// log2 of the bytes one bit stands for.
    pub granularity_bits: u8,
    /// Tracks writes (stored with the `auto` flag).
    pub enabled: bool,
    /// One bit per granule, granule `i` in bit `i % 64` of word `i / 64`
    /// (the spec's byte order once the words are little endian).
    pub words: Vec<u64>,
}

/// Data cluster offset bits of a bitmap table entry.
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

impl super::Qcow2 {
    /// The bits of the stored bitmap `b` (one that is not in use), as
    /// [`StoredBitmap::words`]. Reads are bounded by the directory checks
    /// made at open (tables of at most 512 MiB of data).
    pub fn load_bitmap(&self, b: &Bitmap) -> FResult<Vec<u64>> {
        let m = self.lock();
        let cs = m.cs;
        let bits = m.h.size.div_ceil(b.granularity());
        let bytes = bits.div_ceil(8);
        let entries = b.table_size as u64;
        if entries != table_entries_for(m.h.size, b.granularity_bits, cs)
            || b.flags & FLAG_IN_USE != 0
        {
            return Err(m.corrupt(format!("bitmap '{}' cannot be loaded", b.name)));
        }
        let mut table = vec![0u8; (entries * 8) as usize];
        m.file
            .read_at(b.table_offset, &mut table)
            .map_err(|e| m.ioe(e, "reading a bitmap table"))?;
        let mut data = vec![0u8; bytes.div_ceil(8) as usize * 8];
        for (i, e) in table.chunks_exact(8).enumerate() {
            let e = u64::from_be_bytes(e.try_into().unwrap_or([0; 8]));
            let at = i as u64 * cs;
            if at >= bytes {
                break;
            }
            let n = (bytes - at).min(cs) as usize;
            let part = &mut data[at as usize..at as usize + n];
            let off = e & TABLE_OFFSET_MASK;
            if off == 0 {
                part.fill(if e & 1 != 0 { 0xff } else { 0 });
            } else {
                m.file
                    .read_at(off, part)
                    .map_err(|e| m.ioe(e, "reading bitmap data"))?;
            }
        }
        let mut words: Vec<u64> = data
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        // Bits past the last granule are not the bitmap's.
        let tail = bits % 64;
        if let (Some(w), true) = (words.last_mut(), tail != 0) {
            *w &= (1u64 << tail) - 1;
        }
        words.truncate(bits.div_ceil(64) as usize);
        Ok(words)
    }

    /// Replace the image's bitmaps with `list` (QEMU stores its persistent
    /// bitmaps so when an image is closed): each bitmap's data clusters
    /// (all-zero clusters are not stored), its table and the directory are
    /// written to new clusters, the header's extension is pointed at them,
    /// and the old ones are freed. Bitmaps in `keep` that are still in the
    /// old directory are carried over unchanged (inconsistent bitmaps this
    /// process never loaded). Needs a version 3 image.
    pub fn store_bitmaps(&self, list: &[StoredBitmap], keep: &[String]) -> FResult<()> {
        let mut m = self.exclusive();
        m.writable()?;
        if m.h.version < 3 && !list.is_empty() {
            return Err(FormatError::Unsupported(format!(
                "{}: Cannot store dirty bitmaps in qcow2 v2 files",
                m.name
            )));
        }
        let cs = m.cs;
        let size = m.h.size;
        let old = std::mem::take(&mut m.bitmaps);
        let old_ext = m.bitmaps_ext.take();
        let mut entries: Vec<(String, u32, u8, u64, u32)> = Vec::new(); // name, flags, gbits, table, size
        let mut free: Vec<(u64, u64)> = Vec::new();
        for b in &old {
            if keep.contains(&b.name) && !list.iter().any(|l| l.name == b.name) {
                entries.push((
                    b.name.clone(),
                    b.flags,
                    b.granularity_bits,
                    b.table_offset,
                    b.table_size,
                ));
                continue;
            }
            // The old data and table go once the new directory is in place.
            if b.table_size > 0 {
                let mut t = vec![0u8; b.table_size as usize * 8];
                m.file
                    .read_at(b.table_offset, &mut t)
                    .map_err(|e| m.ioe(e, "reading a bitmap table"))?;
                for e in t.chunks_exact(8) {
                    let off =
                        u64::from_be_bytes(e.try_into().unwrap_or([0; 8])) & TABLE_OFFSET_MASK;
                    if off != 0 {
                        free.push((off, 1));
                    }
                }
                free.push((b.table_offset, (b.table_size as u64 * 8).div_ceil(cs)));
            }
        }
        if let Some(e) = old_ext {
            free.push((e.dir_offset, e.dir_size.div_ceil(cs)));
        }
        for b in list {
            let bits = size.div_ceil(1u64 << b.granularity_bits);
            let bytes = bits.div_ceil(8);
            let mut data: Vec<u8> = b.words.iter().flat_map(|w| w.to_le_bytes()).collect();
            data.resize(bytes as usize, 0);
            let n = table_entries_for(size, b.granularity_bits, cs);
            let mut table = Vec::with_capacity(n as usize * 8);
            for chunk in data.chunks(cs as usize) {
                let e = if chunk.iter().all(|&x| x == 0) {
                    0
                } else {
                    let off = m.alloc_clusters(1)?;
                    let mut c = chunk.to_vec();
                    c.resize(cs as usize, 0);
                    m.write_meta(off, &c, super::overlap::BITMAP_DIRECTORY)?;
                    off
                };
                table.extend_from_slice(&e.to_be_bytes());
            }
            table.resize(n as usize * 8, 0);
            let toff = m.alloc_clusters((table.len() as u64).div_ceil(cs).max(1))?;
            m.write_meta(toff, &table, super::overlap::BITMAP_DIRECTORY)?;
            let flags = if b.enabled { FLAG_AUTO } else { 0 };
            entries.push((b.name.clone(), flags, b.granularity_bits, toff, n as u32));
        }
        if entries.is_empty() {
            m.h.bitmaps_ext = None;
            m.h.autoclear &= !super::header::AUTOCLEAR_BITMAPS;
        } else {
            let mut dir = Vec::new();
            for (name, flags, gbits, toff, tsize) in &entries {
                let start = dir.len();
                dir.extend_from_slice(&toff.to_be_bytes());
                dir.extend_from_slice(&tsize.to_be_bytes());
                dir.extend_from_slice(&flags.to_be_bytes());
                dir.push(TYPE_DIRTY_TRACKING);
                dir.push(*gbits);
                dir.extend_from_slice(&(name.len() as u16).to_be_bytes());
                dir.extend_from_slice(&0u32.to_be_bytes());
                dir.extend_from_slice(name.as_bytes());
                let len = (dir.len() - start).div_ceil(8) * 8;
                dir.resize(start + len, 0);
            }
            let doff = m.alloc_clusters((dir.len() as u64).div_ceil(cs))?;
            m.write_meta(doff, &dir, super::overlap::BITMAP_DIRECTORY)?;
            let mut ext = Vec::with_capacity(24);
            ext.extend_from_slice(&(entries.len() as u32).to_be_bytes());
            ext.extend_from_slice(&0u32.to_be_bytes());
            ext.extend_from_slice(&(dir.len() as u64).to_be_bytes());
            ext.extend_from_slice(&doff.to_be_bytes());
            let parsed = BitmapsExt::parse(&ext, cs).map_err(|e| m.corrupt(e))?;
            let list = parse_directory(&dir, &parsed, cs, size).map_err(|e| m.corrupt(e))?;
            m.h.bitmaps_ext = Some(ext);
            m.h.autoclear |= super::header::AUTOCLEAR_BITMAPS;
            m.bitmaps_ext = Some(parsed);
            m.bitmaps = list;
        }
        // The new clusters' refcounts and data first, then the header
        // that points at them, then the old clusters go.
        m.flush_all()?;
        m.write_header()?;
        for (off, n) in free {
            m.queue_free(off, n, super::DiscardType::Other);
        }
        m.reindex_all();
        m.flush_all()?;
        self.bitmaps_pending
            .store(false, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Mark every bitmap in use on disk: the block layer tracks them in
    /// memory now and stores them at close (a crash leaves them marked
    /// inconsistent, as in QEMU).
    pub fn bitmaps_taken(&self) -> FResult<()> {
        let mut m = self.exclusive();
        m.mark_bitmaps_in_use(true)?;
        self.bitmaps_pending
            .store(false, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}

impl Meta {
    /// Before the first change of guest data: mark the `auto` bitmaps
    /// (`all`: every bitmap) `in_use` on disk (see the module doc),
    /// durably, so that no write lands while a bitmap still claims to be
    /// exact.
    pub(crate) fn mark_bitmaps_in_use(&mut self, all: bool) -> FResult<()> {
        let Some(ext) = self.bitmaps_ext else {
            return Ok(());
        };
        let todo: Vec<usize> = self
            .bitmaps
            .iter()
            .enumerate()
            .filter(|(_, b)| (all || b.flags & FLAG_AUTO != 0) && b.flags & FLAG_IN_USE == 0)
            .map(|(i, _)| i)
            .collect();
        if todo.is_empty() || self.read_only {
            return Ok(());
        }
        for i in todo {
            let b = &mut self.bitmaps[i];
            b.flags |= FLAG_IN_USE;
            let at = ext.dir_offset + b.entry_offset as u64 + 12;
            let flags = b.flags.to_be_bytes();
            self.write_meta(at, &flags, super::overlap::BITMAP_DIRECTORY)?;
        }
        self.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, flags: u32, gbits: u8, table: (u64, u32)) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&table.0.to_be_bytes());
        e.extend_from_slice(&table.1.to_be_bytes());
        e.extend_from_slice(&flags.to_be_bytes());
        e.push(1);
        e.push(gbits);
        e.extend_from_slice(&(name.len() as u16).to_be_bytes());
        e.extend_from_slice(&0u32.to_be_bytes());
        e.extend_from_slice(name.as_bytes());
        e.resize(e.len().div_ceil(8) * 8, 0);
        e
    }

    fn ext(nb: u32, dir: &[u8]) -> BitmapsExt {
        BitmapsExt {
            nb_bitmaps: nb,
            dir_size: dir.len() as u64,
            dir_offset: 0x10000,
        }
    }

    #[test]
    fn parses_and_checks() {
        let cs = 65536;
        let size = 64 << 20;
        let mut dir = entry("b0", FLAG_AUTO, 16, (0x20000, 1));
        dir.extend(entry("other", FLAG_IN_USE | FLAG_AUTO, 9, (0x30000, 1)));
        let l = parse_directory(&dir, &ext(2, &dir), cs, size).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].name, "b0");
        assert_eq!(l[0].granularity(), 65536);
        assert_eq!(l[1].flag_names(), vec!["in-use", "auto"]);
        assert_eq!(l[1].entry_offset, 32);
        let e = parse_directory(&dir, &ext(3, &dir), cs, size).unwrap_err();
        assert!(e.starts_with("Less bitmaps"), "{e}");
        let e = parse_directory(&dir, &ext(1, &dir), cs, size).unwrap_err();
        assert!(e.starts_with("More bitmaps"), "{e}");
        let bad = entry("b0", FLAG_AUTO, 8, (0x20000, 1));
        let e = parse_directory(&bad, &ext(1, &bad), cs, size).unwrap_err();
        assert_eq!(e, "Bitmap 'b0' doesn't satisfy the constraints");
        let bad = entry("b0", FLAG_AUTO, 16, (0x20000, 7));
        let e = parse_directory(&bad, &ext(1, &bad), cs, size).unwrap_err();
        assert!(e.starts_with("Could not read bitmap 'b0'"), "{e}");
        let mut raw = vec![0u8; 24];
        raw[3] = 1;
        raw[16..24].copy_from_slice(&0x10001u64.to_be_bytes());
        assert!(BitmapsExt::parse(&raw, cs).is_err());
        assert!(BitmapsExt::parse(&raw[..16], cs).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut dir = entry("b0", FLAG_AUTO, 16, (0x20000, 1));
        dir.extend(entry("b1", 0, 17, (0x30000, 1)));
        for _ in 0..5000 {
            let mut d = dir.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x % d.len() as u64) as usize;
                d[i] = (x >> 40) as u8;
            }
            let cut = (x >> 20) as usize % (d.len() + 1);
            let e = ext((x % 4) as u32, &d[..cut]);
            let _ = parse_directory(&d[..cut], &e, 65536, (x >> 8) % (1 << 40));
        }
    }
}
