//! dmg: Apple's UDIF disk images ("Universal Disk Image Format", what
//! `hdiutil` writes as `.dmg` files), read only, as QEMU's dmg driver
//! reads them.
//!
//! Sources: UDIF as documented publicly, above all Jonathan Levin's
//! "Demystifying the DMG File Format" (the `koly` trailer, the `mish`
//! block tables and their chunk types, the XML property list and the
//! resource fork that carry the tables), and what QEMU's `block/dmg.c`
//! accepts and refuses, which this module follows where the two differ.
//! All numbers in the file are big-endian.
//!
//! - The trailer ("koly", 512 bytes) ends the file: data fork offset and
//!   length at 0x18/0x20, resource fork offset and length at 0x28/0x30,
//!   XML property list offset and length at 0xd8/0xe0, the disk's sector
//!   count at 0x1ec. Like QEMU, the magic is looked for in the last 1023
//!   bytes (a trailer that ends up to 511 bytes before the end of the
//!   file still counts), the first hit wins.
//! - The block tables ("mish", Levin's `BLKXTable`): the first sector the
//!   table describes at 8, its data's offset in the data fork at 0x18,
//!   then 40-byte chunk entries from byte 204 on: type at 0, first sector
//!   (relative to the table's) at 8, sector count at 0x10, offset of the
//!   stored bytes (relative to the table's data, itself relative to the
//!   data fork) at 0x18, stored length at 0x20. QEMU counts the entries
//!   by the block's size, not by its count field, and so does this.
//! - The tables are read from the resource fork when it has a length
//!   (each resource of its data part is a length and the bytes; the
//!   ones that are not `mish` blocks are skipped), else from the XML
//!   property list, where every `<data>` element holds one resource in
//!   base64 (those under the `blkx` key are the `mish` ones; like QEMU,
//!   every element is decoded and those that are not `mish` blocks are
//!   skipped).
//! - Chunk types: 0 (zeroes) and 2 (ignored, reads as zeroes), 1 (stored
//!   raw), 0x80000005 (zlib), 0x80000006 (bzip2), 0x80000007 (LZFSE);
//!   0x7ffffffe (comment) and 0xffffffff (the last entry) describe no
//!   data. Every other type (ADC, 0x80000004, among them) is skipped with
//!   a warning, as QEMU does: reading its sectors fails.
//!
//! What QEMU does with odd tables, and what this does:
//! - A sector no chunk covers (a hole, or a chunk of an unknown type):
//!   QEMU's read fails with an I/O error, and so does this one.
//! - Chunks that overlap: QEMU's binary search finds one of them
//!   depending on the order of the table, so what a read returns is
//!   arbitrary; this refuses such an image at open instead. Tables out
//!   of order (which QEMU's search can miss) are sorted here.
//! - A raw chunk that stores fewer bytes than its sectors: QEMU returns
//!   whatever its buffer held before; reading that chunk fails here.
//! - A compressed chunk must inflate to exactly its sectors: QEMU checks
//!   that for zlib and bzip2 and not for LZFSE; this checks all three.
//!
//! Everything from the file is bounded before it is used: chunks of data
//! are at most 64 MiB stored and 64 MiB inflated (QEMU's bounds; zero
//! chunks have no bound on their sectors), the XML property list at most
//! 16 MiB (QEMU's), the number of chunks at [`MAX_CHUNKS`]; sector and
//! offset arithmetic is checked.

use crate::error::{FResult, FormatError};
use crate::mapping::{check_range, push_run, Piece, ReadOnlyMap, Run};
use crate::storage::Storage;
use base64::Engine as _;
use std::sync::{Arc, Mutex};

const SECTOR: u64 = 512;
/// The trailer's magic.
pub const KOLY: &[u8; 4] = b"koly";
const TRAILER: usize = 512;
/// A block table's magic.
const MISH: &[u8; 4] = b"mish";
/// Bytes before a block table's first chunk entry.
const MISH_HEADER: u64 = 204;
/// Bytes of one chunk entry.
const ENTRY: u64 = 40;
/// QEMU's bound on a chunk's stored and inflated bytes (64 MiB).
const MAX_CHUNK_BYTES: u64 = 64 << 20;
const MAX_CHUNK_SECTORS: u64 = MAX_CHUNK_BYTES / SECTOR;
/// QEMU's bound on the XML property list (16 MiB).
const MAX_PLIST: u64 = 16 << 20;
/// Chunks held in memory (40 bytes each, 160 MiB at most): 4 TiB of
/// 1 MiB chunks. Every chunk is 40 bytes of table in the file too.
pub const MAX_CHUNKS: usize = 4 << 20;
/// Chunk entries read from the resource fork at a time.
const ENTRY_BATCH: u64 = 1024;

/// Chunk types (Levin's `BLKXChunkEntry.EntryType`).
const ZERO: u32 = 0;
const RAW: u32 = 1;
const IGNORE: u32 = 2;
const ZLIB: u32 = 0x8000_0005;
const BZIP2: u32 = 0x8000_0006;
const LZFSE: u32 = 0x8000_0007;
const COMMENT: u32 = 0x7fff_fffe;
const LAST: u32 = 0xffff_ffff;

/// How a chunk's bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Zero,
    Raw,
    Zlib,
    Bzip2,
    Lzfse,
}

impl Kind {
    fn of(t: u32) -> Option<Kind> {
        match t {
            ZERO | IGNORE => Some(Kind::Zero),
            RAW => Some(Kind::Raw),
            ZLIB => Some(Kind::Zlib),
            BZIP2 => Some(Kind::Bzip2),
            LZFSE => Some(Kind::Lzfse),
            _ => None,
        }
    }
}

/// One chunk, absolute: guest sectors `[sector, sector + sectors)`, its
/// bytes `length` bytes at `offset` of the file.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    kind: Kind,
    sector: u64,
    sectors: u64,
    offset: u64,
    length: u64,
}

impl Chunk {
    fn end(&self) -> u64 {
        // Checked when the chunk was read.
        self.sector + self.sectors
    }
}

/// An open dmg image.
pub struct Dmg {
    name: String,
    file: Arc<dyn Storage>,
    size: u64,
    /// Sorted by first sector, none overlapping, none empty.
    chunks: Vec<Chunk>,
    /// The last chunk inflated, by index: reads come in pieces smaller
    /// than a chunk.
    cache: Mutex<Option<(usize, Vec<u8>)>>,
}

/// How sure probing is that a file named `filename` is a dmg image:
/// UDIF has no magic at the start of the file, so QEMU goes by the name
/// alone, ending in ".dmg" (with something before it), and scores it 2
/// (any format whose magic matches wins).
pub fn probe(filename: &str) -> u32 {
    if filename.len() > 4 && filename.ends_with(".dmg") {
        2
    } else {
        0
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The chunk table being gathered at open, with what it needs to name
/// problems.
struct Tables<'a> {
    name: &'a str,
    data_fork: u64,
    chunks: Vec<Chunk>,
    /// Chunk entries seen so far, counting skipped ones: errors name the
    /// entry by this index, as QEMU's do.
    entries: u64,
    /// Unknown chunk types already warned about.
    warned: Vec<u32>,
}

impl Tables<'_> {
    fn corrupt(&self, m: String) -> FormatError {
        FormatError::Corrupt(format!("{}: {m}", self.name))
    }

    /// Read one resource of `count` bytes through `read` (offset in the
    /// resource, buffer) and add its chunks if it is a block table.
    fn mish(
        &mut self,
        count: u64,
        read: &mut dyn FnMut(u64, &mut [u8]) -> FResult<()>,
    ) -> FResult<()> {
        // Too small for one chunk entry: not a table (QEMU skips it too).
        if count < MISH_HEADER + ENTRY {
            return Ok(());
        }
        let mut h = [0u8; MISH_HEADER as usize];
        read(0, &mut h)?;
        if &h[..4] != MISH {
            return Ok(());
        }
        let first_sector = be64(&h, 8);
        let base = self
            .data_fork
            .checked_add(be64(&h, 0x18))
            .ok_or_else(|| self.corrupt("a block table's data offset is past 2^64".into()))?;
        let n = (count - MISH_HEADER) / ENTRY;
        let mut done = 0;
        while done < n {
            let batch = (n - done).min(ENTRY_BATCH);
            let mut buf = vec![0u8; (batch * ENTRY) as usize];
            read(MISH_HEADER + done * ENTRY, &mut buf)?;
            for e in buf.chunks_exact(ENTRY as usize) {
                self.entry(e, first_sector, base)?;
            }
            done += batch;
        }
        Ok(())
    }

    /// One 40-byte chunk entry of a table whose sectors start at
    /// `first_sector` and whose data at file offset `base`.
    fn entry(&mut self, e: &[u8], first_sector: u64, base: u64) -> FResult<()> {
        let i = self.entries;
        self.entries += 1;
        let t = be32(e, 0);
        let Some(kind) = Kind::of(t) else {
            if t != COMMENT && t != LAST && !self.warned.contains(&t) {
                self.warned.push(t);
                log::warn!(
                    "{}: Image contains chunks of unknown type {t:x}, accessing them will result in I/O errors",
                    self.name
                );
            }
            return Ok(());
        };
        let sectors = be64(e, 0x10);
        // Zero chunks are never inflated, so their size needs no bound.
        if kind != Kind::Zero && sectors > MAX_CHUNK_SECTORS {
            return Err(self.corrupt(format!(
                "sector count {sectors} for chunk {i} is larger than max ({MAX_CHUNK_SECTORS})"
            )));
        }
        let length = be64(e, 0x20);
        if length > MAX_CHUNK_BYTES {
            return Err(self.corrupt(format!(
                "length {length} for chunk {i} is larger than max ({MAX_CHUNK_BYTES})"
            )));
        }
        let sector = first_sector.checked_add(be64(e, 8));
        let end = sector.and_then(|s| s.checked_add(sectors));
        let offset = base.checked_add(be64(e, 0x18));
        let stored_end = offset.and_then(|o| o.checked_add(length));
        let (Some(sector), Some(_), Some(offset), Some(_)) = (sector, end, offset, stored_end)
        else {
            return Err(self.corrupt(format!("chunk {i} lies past 2^64")));
        };
        if sectors == 0 {
            return Ok(());
        }
        if self.chunks.len() >= MAX_CHUNKS {
            return Err(self.corrupt(format!("more than {MAX_CHUNKS} chunks")));
        }
        self.chunks.push(Chunk {
            kind,
            sector,
            sectors,
            offset,
            length,
        });
        Ok(())
    }
}

/// Decode the base64 text of one `<data>` element. Whitespace (plists
/// wrap and indent the text) is skipped; any other character outside
/// the alphabet is an error (QEMU's decoder skips those too, which only
/// turns a damaged table into one that is not recognised).
fn base64_data(text: &[u8]) -> Option<Vec<u8>> {
    let clean: Vec<u8> = text
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    engine.decode(clean).ok()
}

impl Dmg {
    /// Open the image in `file` (named `name` in errors).
    pub fn open(name: &str, file: Arc<dyn Storage>) -> FResult<Dmg> {
        let corrupt = |m: String| FormatError::Corrupt(format!("{name}: {m}"));
        let io = |what: &'static str| {
            move |e: std::io::Error| FormatError::io(e, format!("{name}: {what}"))
        };
        let len = file
            .len()
            .map_err(io("Failed to get file size while reading UDIF trailer"))?;
        if len < TRAILER as u64 {
            return Err(FormatError::Invalid(format!(
                "{name}: dmg file must be at least 512 bytes long"
            )));
        }
        // The trailer starts in the last 511 bytes of the second-last
        // sector or the first 4 of the last (odd-sized files).
        let window_at = len.saturating_sub(1023);
        let mut window = vec![0u8; len.min(515) as usize];
        file.read_at(window_at, &mut window)
            .map_err(io("Failed while reading UDIF trailer"))?;
        let Some(koly) = find(&window, KOLY).map(|i| window_at + i as u64) else {
            return Err(FormatError::Invalid(format!(
                "{name}: Could not locate UDIF trailer in dmg file"
            )));
        };
        // Past the end of a short file the trailer reads as zeroes, as
        // QEMU's reads do.
        let mut t = [0u8; TRAILER];
        let have = (len - koly).min(TRAILER as u64) as usize;
        file.read_at(koly, &mut t[..have])
            .map_err(io("Failed while reading UDIF trailer"))?;
        let data_fork = be64(&t, 0x18);
        if data_fork > koly {
            return Err(corrupt(format!(
                "the data fork offset {data_fork} is past the trailer"
            )));
        }
        // Both forks must lie before the trailer (QEMU checks the offsets
        // even when the lengths are 0).
        let region = |off: u64, length: u64, what: &str| {
            if off >= koly || length > koly - off {
                Err(corrupt(format!(
                    "the {what} [{off}, +{length}) does not lie before the trailer"
                )))
            } else {
                Ok((off, length))
            }
        };
        let (rsrc, rsrc_len) = region(be64(&t, 0x28), be64(&t, 0x30), "resource fork")?;
        let (plist, plist_len) = region(be64(&t, 0xd8), be64(&t, 0xe0), "XML property list")?;
        let sectors = be64(&t, 0x1ec);
        let size = sectors
            .checked_mul(SECTOR)
            .filter(|&s| s <= i64::MAX as u64)
            .ok_or_else(|| corrupt(format!("the sector count {sectors} is too large")))?;
        let mut tables = Tables {
            name,
            data_fork,
            chunks: Vec::new(),
            entries: 0,
            warned: Vec::new(),
        };
        if rsrc_len != 0 {
            Self::read_rsrc(&file, &mut tables, rsrc, rsrc_len)?;
        } else if plist_len != 0 {
            Self::read_plist(&file, &mut tables, plist, plist_len)?;
        } else {
            return Err(corrupt(
                "the trailer names neither a resource fork nor an XML property list".into(),
            ));
        }
        let mut chunks = tables.chunks;
        chunks.sort_by_key(|c| c.sector);
        if let Some(w) = chunks.windows(2).find(|w| w[1].sector < w[0].end()) {
            return Err(corrupt(format!("chunks overlap at sector {}", w[1].sector)));
        }
        Ok(Dmg {
            name: name.to_string(),
            file,
            size,
            chunks,
            cache: Mutex::new(None),
        })
    }

    /// The block tables of the resource fork `[at, at+len)`: a header
    /// with the offset (at 0) and length (at 8) of the resource data,
    /// which is a run of resources, each a 32-bit length and its bytes.
    fn read_rsrc(file: &Arc<dyn Storage>, tables: &mut Tables, at: u64, len: u64) -> FResult<()> {
        let name = tables.name;
        let rd = |off: u64, buf: &mut [u8]| {
            file.read_at(off, buf).map_err(|e| {
                FormatError::io(e, format!("{name}: Could not read the resource fork"))
            })
        };
        let mut h = [0u8; 12];
        rd(at, &mut h)?;
        let (data_off, data_len) = (u64::from(be32(&h, 0)), u64::from(be32(&h, 8)));
        if data_off > len || data_len == 0 || data_off + data_len > len {
            return Err(tables.corrupt(format!(
                "the resource data [{data_off}, +{data_len}) does not lie in the resource fork"
            )));
        }
        let mut pos = at + data_off;
        let end = pos + data_len;
        while pos < end {
            let mut c = [0u8; 4];
            rd(pos, &mut c)?;
            let count = u64::from(u32::from_be_bytes(c));
            // QEMU compares the length with what is left before taking
            // the 4 length bytes: a resource may end 4 bytes past the
            // resource data (in the resource map that follows it).
            if count == 0 || count > end - pos {
                return Err(tables.corrupt(format!(
                    "a resource of {count} bytes at {pos} does not fit in the resource data"
                )));
            }
            pos += 4;
            let start = pos;
            tables.mish(count, &mut |o, b| rd(start + o, b))?;
            pos += count;
        }
        Ok(())
    }

    /// The block tables of the XML property list `[at, at+len)`: the
    /// base64 text of every `<data>` element.
    fn read_plist(file: &Arc<dyn Storage>, tables: &mut Tables, at: u64, len: u64) -> FResult<()> {
        let name = tables.name;
        if len > MAX_PLIST {
            return Err(tables.corrupt(format!(
                "the XML property list of {len} bytes is larger than max ({MAX_PLIST})"
            )));
        }
        let mut xml = vec![0u8; len as usize];
        file.read_at(at, &mut xml).map_err(|e| {
            FormatError::io(e, format!("{name}: Could not read the XML property list"))
        })?;
        let mut pos = 0;
        while let Some(i) = find(&xml[pos..], b"<data>") {
            let start = pos + i + b"<data>".len();
            let Some(j) = find(&xml[start..], b"</data>") else {
                return Err(tables.corrupt(format!(
                    "the XML property list has a <data> at {} without </data>",
                    start - 6
                )));
            };
            let text = &xml[start..start + j];
            let Some(data) = base64_data(text) else {
                return Err(tables.corrupt(format!(
                    "the <data> at byte {} of the XML property list is not base64",
                    start - 6
                )));
            };
            tables.mish(data.len() as u64, &mut |o, b| {
                let from = o as usize;
                match data.get(from..from + b.len()) {
                    Some(s) => {
                        b.copy_from_slice(s);
                        Ok(())
                    }
                    None => Err(FormatError::Corrupt(format!(
                        "{name}: a block table is shorter than its entries"
                    ))),
                }
            })?;
            pos = start + j + b"</data>".len();
        }
        Ok(())
    }

    /// The index of the chunk holding `sector`.
    fn chunk_of(&self, sector: u64) -> Option<usize> {
        let i = self.chunks.partition_point(|c| c.sector <= sector);
        let i = i.checked_sub(1)?;
        (sector < self.chunks[i].end()).then_some(i)
    }

    /// The bytes of compressed chunk `i`, inflated (exactly its sectors).
    fn inflate(&self, i: usize) -> FResult<Vec<u8>> {
        let c = self.chunks[i];
        let name = &self.name;
        let mut src = vec![0u8; c.length as usize];
        self.file
            .read_at(c.offset, &mut src)
            .map_err(|e| FormatError::io(e, format!("{name}: Could not read chunk {i}")))?;
        let mut out = vec![0u8; (c.sectors * SECTOR) as usize];
        let want = out.len() as u64;
        let ok = match c.kind {
            Kind::Zlib => {
                let mut z = flate2::Decompress::new(true);
                matches!(
                    z.decompress(&src, &mut out, flate2::FlushDecompress::Finish),
                    Ok(flate2::Status::StreamEnd)
                ) && z.total_out() == want
            }
            Kind::Bzip2 => {
                let mut z = bzip2::Decompress::new(false);
                matches!(z.decompress(&src, &mut out), Ok(bzip2::Status::StreamEnd))
                    && z.total_out() == want
            }
            Kind::Lzfse => {
                // Decoded into the chunk's buffer, which a longer stream
                // overflows (an error): the output is bounded by it.
                let mut d = lzfse_rust::LzfseRingDecoder::default();
                let mut w: &mut [u8] = &mut out;
                matches!(d.decode(&mut src.as_slice(), &mut w), Ok((_, n)) if n == want)
            }
            Kind::Zero | Kind::Raw => false,
        };
        if !ok {
            return Err(FormatError::Corrupt(format!(
                "{name}: chunk {i} ({:?}) does not inflate to {want} bytes",
                c.kind
            )));
        }
        Ok(out)
    }
}

impl ReadOnlyMap for Dmg {
    fn size(&self) -> u64 {
        self.size
    }

    /// Zero chunks read as zeroes, raw ones are in the file, compressed
    /// ones are encoded: the run's record is the chunk's index.
    fn map_read(&self, offset: u64, len: u64) -> FResult<Vec<Piece>> {
        check_range(&self.name, offset, len, self.size)?;
        let mut out = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let sector = pos / SECTOR;
            let Some(i) = self.chunk_of(sector) else {
                return Err(FormatError::Corrupt(format!(
                    "{}: no chunk holds sector {sector}",
                    self.name
                )));
            };
            let c = self.chunks[i];
            // Chunks end below 2^64 sectors, not bytes; the read's end
            // is below the disk's size, which fits.
            let start = c.sector * SECTOR;
            let n = c.end().saturating_mul(SECTOR).min(end) - pos;
            let run = match c.kind {
                Kind::Zero => Run::Zero,
                Kind::Raw if c.length < c.sectors * SECTOR => {
                    return Err(FormatError::Corrupt(format!(
                        "{}: raw chunk {i} stores {} bytes for {} sectors",
                        self.name, c.length, c.sectors
                    )));
                }
                Kind::Raw => Run::Data(c.offset + (pos - start)),
                Kind::Zlib | Kind::Bzip2 | Kind::Lzfse => Run::Encoded(i as u64),
            };
            push_run(&mut out, pos, n, run);
            pos += n;
        }
        Ok(out)
    }

    fn read_encoded(&self, at: u64, offset: u64, buf: &mut [u8]) -> FResult<()> {
        let i = usize::try_from(at).unwrap_or(usize::MAX);
        // Only compressed chunks are encoded, and those are at most
        // MAX_CHUNK_SECTORS long.
        let inside = self.chunks.get(i).and_then(|c| {
            if matches!(c.kind, Kind::Zero | Kind::Raw) {
                return None;
            }
            let o = offset.checked_sub(c.sector.checked_mul(SECTOR)?)?;
            (o.checked_add(buf.len() as u64)? <= c.sectors * SECTOR).then_some(o as usize)
        });
        let Some(o) = inside else {
            return Err(FormatError::Corrupt(format!(
                "{}: a read outside chunk {at}",
                self.name
            )));
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let hit = matches!(&*cache, Some((c, _)) if *c == i);
        if !hit {
            *cache = None;
            *cache = Some((i, self.inflate(i)?));
        }
        let Some((_, data)) = &*cache else {
            return Err(FormatError::Corrupt(format!(
                "{}: chunk cache empty",
                self.name
            )));
        };
        buf.copy_from_slice(&data[o..o + buf.len()]);
        Ok(())
    }
}

/// The hostile-image harness behind the `dmg_open` fuzz target.
pub fn fuzz_open(data: &[u8]) {
    const NAME: &str = "hostile.dmg";
    let file = Arc::new(crate::storage::MemStorage::new(
        data.to_vec(),
        data.len() as u64,
    ));
    if let Some(img) = crate::error::named(NAME, Dmg::open(NAME, file.clone())) {
        crate::mapping::fuzz_read_only(&crate::mapping::ReadOnly(img), &*file, NAME);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_goes_by_the_name_as_qemu_does() {
        assert_eq!(probe("x.dmg"), 2);
        assert_eq!(probe("/a/b/image.dmg"), 2);
        assert_eq!(probe(".dmg"), 0);
        assert_eq!(probe("x.DMG"), 0);
        assert_eq!(probe("x.dmg.raw"), 0);
        assert_eq!(probe(""), 0);
    }

    #[test]
    fn base64_skips_whitespace_and_refuses_junk() {
        assert_eq!(base64_data(b"\n\t\tbWlzaA==\n\t").unwrap(), b"mish");
        assert_eq!(base64_data(b"bWlz\naA").unwrap(), b"mish");
        assert!(base64_data(b"bWl*aA==").is_none());
        assert!(base64_data(b"bW=lzaA").is_none());
    }
}
