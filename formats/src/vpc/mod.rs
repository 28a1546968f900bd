//! Virtual PC / Hyper-V VHD images (QEMU's `vpc`), after Microsoft's
//! "Virtual Hard Disk Image Format Specification" (version 1.0):
//! "Hard Disk Footer Format" ([`footer`]), "Dynamic Disk Header Format"
//! and "Parent Locator Entry" ([`dynamic`]), "Block Allocation Table and
//! Data Blocks" (the BAT and sector bitmaps here), and the appendix "CHS
//! Calculation" ([`footer::geometry`]).
//!
//! Layouts:
//! - fixed: the guest's bytes, then the footer;
//! - dynamic: a copy of the footer, the dynamic header, the BAT (one
//!   big-endian sector number per block, [`dynamic::UNALLOCATED`] for
//!   none), then blocks (a sector bitmap padded to 512 bytes, then the
//!   block's data), then the footer;
//! - differencing: a dynamic disk whose clear bitmap bits mean "the
//!   parent's sector", the parent named by locators.
//!
//! Reads of a dynamic disk ignore the bitmaps, as QEMU does (every
//! sector of an allocated block is data; new blocks are zeroed), but
//! writes set the bits of the sectors they touch, so Virtual PC sees the
//! data. A differencing disk reads each sector from itself or the parent
//! as its bit says, and a write that covers part of a sector whose bit
//! is clear merges the parent's bytes in (synchronously, [`Plan::Sync`]).
//!
//! Allocation order: the data, then the block's bitmap, then the footer at
//! the new end of the file, then the BAT entry (the commit point: a crash
//! before it leaves unreferenced space that the next open reuses).
//!
//! Hostile images: the footer checksum must match, the BAT must lie in
//! the file and is capped ([`MAX_BAT_ENTRIES`]), every block must lie in
//! the file, and an image whose blocks overlap each other or its
//! metadata opens read-only only, so no write can land on metadata.

pub mod create;
pub mod dynamic;
pub mod footer;
pub mod fuzz;

use crate::error::{FResult, FormatError};
pub use crate::mapping::{GuestMap, Piece, Run, WriteMap};
use crate::storage::Storage;
use dynamic::{DynHeader, HEADER_SIZE, UNALLOCATED};
use footer::{DiskType, Footer, SizeCalc, FOOTER_SIZE};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

pub use fuzz::fuzz_open_read;

/// The largest BAT Strata reads (256 MiB of entries: a 2040 GiB disk of
/// 2 MiB blocks needs 1 Mi entries).
pub const MAX_BAT_ENTRIES: u64 = 64 << 20;
/// Block sizes accepted (powers of two from one sector to 256 MiB).
pub const MAX_BLOCK_SIZE: u64 = 256 << 20;

/// How to open an image.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    /// No writes.
    pub read_only: bool,
    /// The `force_size_calc` override.
    pub size_calc: SizeCalc,
}

/// What the image's metadata says, read without opening it (to find the
/// parent of a differencing disk before opening it).
#[derive(Clone, Debug)]
pub struct Preview {
    /// The footer.
    pub footer: Footer,
    /// Its disk type.
    pub kind: DiskType,
    /// The dynamic header (dynamic and differencing disks).
    pub header: Option<DynHeader>,
    /// Paths the parent locators give, best first (W2ru, W2ku, MacX),
    /// then the parent's Unicode name.
    pub parents: Vec<String>,
}

fn io_err(e: std::io::Error, name: &str, what: &str) -> FormatError {
    FormatError::io(e, format!("{name}: {what}"))
}

fn corrupt(name: &str, what: impl std::fmt::Display) -> FormatError {
    FormatError::Corrupt(format!("{name}: {what}"))
}

/// Read the footer: at offset 0 for dynamic and differencing disks, at
/// the end for fixed ones.
fn read_footer(file: &dyn Storage, name: &str) -> FResult<(Footer, DiskType)> {
    let flen = file
        .len()
        .map_err(|e| io_err(e, name, "Invalid file size"))?;
    if flen < FOOTER_SIZE as u64 {
        return Err(corrupt(name, "File too small for a VHD header"));
    }
    let mut b = [0u8; FOOTER_SIZE];
    file.read_at(0, &mut b)
        .map_err(|e| io_err(e, name, "Unable to read VHD header"))?;
    if Footer::has_cookie(&b) {
        let f = Footer::parse(&b, name)?;
        return match f.kind() {
            Some(k @ (DiskType::Dynamic | DiskType::Differencing)) => Ok((f, k)),
            _ => Err(corrupt(
                name,
                format_args!("unsupported VHD disk type {}", f.disk_type),
            )),
        };
    }
    file.read_at(flen - FOOTER_SIZE as u64, &mut b)
        .map_err(|e| io_err(e, name, "Unable to read VHD footer"))?;
    if !Footer::has_cookie(&b) {
        return Err(corrupt(name, "invalid VPC image"));
    }
    let f = Footer::parse(&b, name)?;
    if f.kind() != Some(DiskType::Fixed) {
        return Err(corrupt(name, "invalid VPC image"));
    }
    Ok((f, DiskType::Fixed))
}

/// Read what the image's metadata says without opening it.
pub fn preview(file: &dyn Storage, name: &str) -> FResult<Preview> {
    let (footer, kind) = read_footer(file, name)?;
    let mut p = Preview {
        footer,
        kind,
        header: None,
        parents: Vec::new(),
    };
    if kind == DiskType::Fixed {
        return Ok(p);
    }
    let h = read_header(file, &p.footer, name)?;
    if kind == DiskType::Differencing {
        let flen = file.len().unwrap_or(0);
        for code in [dynamic::W2RU, dynamic::W2KU, dynamic::MACX] {
            for l in h.locators.iter().filter(|l| l.platform == code) {
                let len = l.length as u64;
                if len == 0 || len > dynamic::MAX_LOCATOR || l.offset.saturating_add(len) > flen {
                    continue;
                }
                let mut d = vec![0u8; len as usize];
                if file.read_at(l.offset, &mut d).is_err() {
                    continue;
                }
                if let Some(path) = dynamic::locator_path(code, &d) {
                    if !p.parents.contains(&path) {
                        p.parents.push(path);
                    }
                }
            }
        }
        if let Ok(n) = String::from_utf16(&h.parent_name) {
            let n = n.replace('\\', "/");
            if !n.is_empty() && !p.parents.contains(&n) {
                p.parents.push(n);
            }
        }
    }
    p.header = Some(h);
    Ok(p)
}

fn read_header(file: &dyn Storage, f: &Footer, name: &str) -> FResult<DynHeader> {
    let flen = file
        .len()
        .map_err(|e| io_err(e, name, "Invalid file size"))?;
    if f.data_offset.saturating_add(HEADER_SIZE as u64) > flen {
        return Err(corrupt(
            name,
            "the dynamic VHD header lies past the end of the file",
        ));
    }
    let mut b = [0u8; HEADER_SIZE];
    file.read_at(f.data_offset, &mut b)
        .map_err(|e| io_err(e, name, "Error reading dynamic VHD header"))?;
    DynHeader::parse(&b, name)
}

/// What [`Vpc::finish_alloc`] links once the data is written.
#[derive(Debug)]
pub struct Alloc {
    /// New blocks: (block index, offset of its bitmap).
    new: Vec<(u32, u64)>,
    /// Sectors to mark present: (block index, first sector, end sector),
    /// sectors counted within the block.
    marks: Vec<(u32, u64, u64)>,
}

/// A planned allocating write of this format.
pub type Plan = crate::mapping::Plan<Alloc>;

/// A block's sector bitmap, as far as it has been read.
enum Bits {
    /// Every sector present.
    Full,
    /// The bitmap's bytes (bit 7 of byte 0 is sector 0).
    Some(Vec<u8>),
}

impl Bits {
    fn get(&self, s: u64) -> bool {
        match self {
            Bits::Full => true,
            Bits::Some(b) => b
                .get((s / 8) as usize)
                .is_some_and(|x| x & (0x80 >> (s % 8)) != 0),
        }
    }
    fn all(&self, s0: u64, s1: u64) -> bool {
        matches!(self, Bits::Full) || (s0..s1).all(|s| self.get(s))
    }
}

struct State {
    bat: Vec<u32>,
    /// Where the next block's bitmap goes (and the footer copy sits).
    next_free: u64,
    /// Bitmaps read or written so far, by block.
    bits: HashMap<u32, Bits>,
    /// Blocks with an allocation or bitmap update in flight.
    busy: HashSet<u32>,
}

struct Dyn {
    header: DynHeader,
    block_size: u64,
    bitmap_size: u64,
    differencing: bool,
    st: Mutex<State>,
    /// Signalled when an allocation finishes (synchronous writers wait).
    done: Condvar,
}

/// An open VHD image.
pub struct Vpc {
    name: String,
    file: Arc<dyn Storage>,
    backing: Option<Arc<dyn Storage>>,
    footer: Footer,
    kind: DiskType,
    size: u64,
    read_only: AtomicBool,
    /// Why the image may only be read (its blocks overlap), if so.
    overlap: Option<String>,
    dynamic: Option<Dyn>,
}

impl Vpc {
    /// Open the image in `file` (named `name` in errors), with the
    /// parent of a differencing disk in `backing`.
    pub fn open(
        name: &str,
        file: Arc<dyn Storage>,
        backing: Option<Arc<dyn Storage>>,
        o: &OpenOptions,
    ) -> FResult<Vpc> {
        let (footer, kind) = read_footer(&*file, name)?;
        let size = footer.virtual_size(o.size_calc);
        if size / 512 > footer::MAX_SECTORS {
            return Err(FormatError::Unsupported(format!(
                "{name}: the virtual size {size} is larger than the 2040 GiB VHD allows"
            )));
        }
        let flen = file
            .len()
            .map_err(|e| io_err(e, name, "Invalid file size"))?;
        let mut img = Vpc {
            name: name.to_string(),
            file,
            backing,
            footer,
            kind,
            size,
            read_only: AtomicBool::new(o.read_only),
            overlap: None,
            dynamic: None,
        };
        if kind == DiskType::Fixed {
            if size > flen - FOOTER_SIZE as u64 {
                return Err(corrupt(
                    name,
                    format_args!("the fixed disk's data ({} bytes) is shorter than its virtual size ({size})", flen - FOOTER_SIZE as u64),
                ));
            }
            return Ok(img);
        }
        let h = read_header(&*img.file, &img.footer, name)?;
        let bs = h.block_size as u64;
        if !bs.is_power_of_two() || !(512..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(corrupt(name, format_args!("Invalid block size {bs}")));
        }
        let bitmap_size = (bs / (8 * 512)).div_ceil(512) * 512;
        let entries = h.max_table_entries as u64;
        if size / bs > u32::MAX as u64 {
            return Err(corrupt(name, "Too many blocks"));
        }
        if entries * bs < size {
            return Err(corrupt(name, "Page table too small"));
        }
        let bat_bytes = entries * 4;
        if entries > MAX_BAT_ENTRIES {
            return Err(FormatError::Unsupported(format!(
                "{name}: Max Table Entries too large ({entries})"
            )));
        }
        if h.table_offset.saturating_add(bat_bytes) > flen {
            return Err(corrupt(name, "the BAT lies past the end of the file"));
        }
        let mut raw = vec![0u8; bat_bytes as usize];
        img.file
            .read_at(h.table_offset, &mut raw)
            .map_err(|e| io_err(e, name, "Error reading the BAT"))?;
        let bat: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        drop(raw);
        // Metadata regions, then every block: the next block goes after
        // all of them, and none may overlap another.
        let mut regions: Vec<(u64, u64, Option<usize>)> = vec![
            (0, FOOTER_SIZE as u64, None),
            (
                img.footer.data_offset,
                img.footer.data_offset + HEADER_SIZE as u64,
                None,
            ),
            (
                h.table_offset,
                h.table_offset + bat_bytes.div_ceil(512) * 512,
                None,
            ),
        ];
        for l in h.locators.iter().filter(|l| l.platform != 0) {
            let len = (l.length as u64).div_ceil(512) * 512;
            let end = l.offset.saturating_add(len);
            if len > 0 && end <= flen {
                regions.push((l.offset, end, None));
            }
        }
        let mut next_free = regions.iter().map(|r| r.1).max().unwrap_or(0);
        for (i, &e) in bat.iter().enumerate() {
            if e == UNALLOCATED {
                continue;
            }
            let start = e as u64 * 512;
            let end = start + bitmap_size + bs;
            if end > flen {
                return Err(corrupt(
                    name,
                    format_args!(
                        "block {i} lies past the end of the file. The image has been truncated."
                    ),
                ));
            }
            next_free = next_free.max(end);
            regions.push((start, end, Some(i)));
        }
        if next_free > flen {
            return Err(corrupt(
                name,
                "free_data_block_offset points after the end of file. The image has been truncated.",
            ));
        }
        // BAT entries count sectors: blocks start on a sector boundary
        // whatever the metadata's offsets.
        let next_free = next_free.div_ceil(512) * 512;
        regions.sort_unstable();
        for w in regions.windows(2) {
            if w[1].0 < w[0].1 {
                let which = w[1]
                    .2
                    .or(w[0].2)
                    .map_or("metadata".to_string(), |i| format!("block {i}"));
                img.overlap = Some(format!(
                    "{name}: {which} overlaps other data in the image; it can only be opened read-only"
                ));
                break;
            }
        }
        if let (false, Some(m)) = (o.read_only, &img.overlap) {
            return Err(FormatError::Corrupt(m.clone()));
        }
        img.dynamic = Some(Dyn {
            header: h,
            block_size: bs,
            bitmap_size,
            differencing: kind == DiskType::Differencing,
            st: Mutex::new(State {
                bat,
                next_free,
                bits: HashMap::new(),
                busy: HashSet::new(),
            }),
            done: Condvar::new(),
        });
        Ok(img)
    }

    /// The virtual size.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// The disk type.
    pub fn kind(&self) -> DiskType {
        self.kind
    }
    /// The footer.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }
    /// The dynamic header (not for fixed disks).
    pub fn header(&self) -> Option<&DynHeader> {
        self.dynamic.as_ref().map(|d| &d.header)
    }
    /// Bytes per block (not for fixed disks).
    pub fn block_size(&self) -> Option<u64> {
        self.dynamic.as_ref().map(|d| d.block_size)
    }
    /// The image's name in errors.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Relaxed)
    }
    /// Switch between read-only and read-write (refused for an image
    /// whose blocks overlap, which would have failed a writable open).
    pub fn set_read_only(&self, ro: bool) -> FResult<()> {
        if let (false, Some(m)) = (ro, &self.overlap) {
            return Err(FormatError::Corrupt(m.clone()));
        }
        self.read_only.store(ro, Ordering::Relaxed);
        Ok(())
    }

    fn lock<'a>(&self, d: &'a Dyn) -> MutexGuard<'a, State> {
        d.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_range(&self, off: u64, len: u64) -> FResult<()> {
        crate::mapping::check_range(&self.name, off, len, self.size)
    }

    fn io(&self, e: std::io::Error, what: &str) -> FormatError {
        io_err(e, &self.name, what)
    }

    /// The bitmap of allocated block `i`, read on first use.
    fn bits<'a>(&self, d: &Dyn, st: &'a mut State, i: u32) -> FResult<&'a Bits> {
        if !st.bits.contains_key(&i) {
            let at = st.bat[i as usize] as u64 * 512;
            let mut b = vec![0u8; d.bitmap_size as usize];
            self.file
                .read_at(at, &mut b)
                .map_err(|e| self.io(e, "Error reading a sector bitmap"))?;
            let full =
                (0..d.block_size / 512).all(|s| b[(s / 8) as usize] & (0x80 >> (s % 8)) != 0);
            st.bits
                .insert(i, if full { Bits::Full } else { Bits::Some(b) });
        }
        Ok(&st.bits[&i])
    }

    /// Split `[off, off+len)` into (block, offset in block, length).
    fn chunks(d: &Dyn, off: u64, len: u64) -> impl Iterator<Item = (u32, u64, u64)> + '_ {
        crate::mapping::block_chunks(off, len, d.block_size).map(|(b, i, n)| (b as u32, i, n))
    }

    fn map_locked(&self, d: &Dyn, st: &mut State, off: u64, len: u64) -> FResult<Vec<Piece>> {
        let mut out: Vec<Piece> = Vec::new();
        let mut push = |p: Piece| crate::mapping::push_run(&mut out, p.offset, p.len, p.run);
        let bs = d.block_size;
        for (i, inb, n) in Self::chunks(d, off, len) {
            let guest = i as u64 * bs + inb;
            let e = st.bat[i as usize];
            if e == UNALLOCATED {
                push(Piece {
                    offset: guest,
                    len: n,
                    run: if d.differencing {
                        Run::Backing
                    } else {
                        Run::Zero
                    },
                });
                continue;
            }
            let data = e as u64 * 512 + d.bitmap_size;
            if !d.differencing {
                push(Piece {
                    offset: guest,
                    len: n,
                    run: Run::Data(data + inb),
                });
                continue;
            }
            let bits = self.bits(d, st, i)?;
            let mut p = inb;
            while p < inb + n {
                let s = p / 512;
                let present = bits.get(s);
                let mut q = ((s + 1) * 512).min(inb + n);
                while q < inb + n && bits.get(q / 512) == present {
                    q = ((q / 512 + 1) * 512).min(inb + n);
                }
                push(Piece {
                    offset: i as u64 * bs + p,
                    len: q - p,
                    run: if present {
                        Run::Data(data + p)
                    } else {
                        Run::Backing
                    },
                });
                p = q;
            }
        }
        Ok(out)
    }

    fn writable(&self) -> FResult<()> {
        crate::mapping::check_writable(&self.name, self.read_only())
    }

    /// Reserve a new block at the end of the file.
    fn reserve(&self, d: &Dyn, st: &mut State) -> FResult<u64> {
        let at = st.next_free;
        if at / 512 >= UNALLOCATED as u64 {
            return Err(FormatError::NoSpace(format!(
                "{}: the VHD cannot address more blocks",
                self.name
            )));
        }
        st.next_free = at + d.bitmap_size + d.block_size;
        Ok(at)
    }

    fn unreserve(&self, d: &Dyn, st: &mut State, a: &Alloc) {
        for &(_, at) in a.new.iter().rev() {
            if at + d.bitmap_size + d.block_size == st.next_free {
                st.next_free = at;
            }
        }
        for (i, _, _) in &a.marks {
            st.busy.remove(i);
        }
        for (i, _) in &a.new {
            st.busy.remove(i);
        }
    }

    /// Write the bitmaps, the footer and the BAT entries of `a`.
    fn link(&self, d: &Dyn, st: &mut State, a: &Alloc) -> FResult<()> {
        let sectors = d.block_size / 512;
        for &(i, at) in &a.new {
            let mut bits = vec![0u8; d.bitmap_size as usize];
            if d.differencing {
                for &(_, s0, s1) in a.marks.iter().filter(|m| m.0 == i) {
                    set_bits(&mut bits, s0, s1);
                }
            } else {
                set_bits(&mut bits, 0, sectors);
            }
            self.file
                .write_at(at, &bits)
                .map_err(|e| self.io(e, "Error writing a sector bitmap"))?;
            let full = Bits::Some(bits.clone()).all(0, sectors);
            st.bits
                .insert(i, if full { Bits::Full } else { Bits::Some(bits) });
        }
        for &(i, s0, s1) in &a.marks {
            if a.new.iter().any(|n| n.0 == i) {
                continue;
            }
            let at = st.bat[i as usize] as u64 * 512;
            let Some(Bits::Some(b)) = st.bits.get_mut(&i) else {
                continue;
            };
            set_bits(b, s0, s1);
            // The bitmap's 512-byte sectors that hold the changed bits.
            let b0 = s0 / 8 / 512 * 512;
            let b1 = (((s1 - 1) / 8 / 512 + 1) * 512).min(b.len() as u64);
            let chunk = b[b0 as usize..b1 as usize].to_vec();
            let full = Bits::Some(b.clone()).all(0, sectors);
            self.file
                .write_at(at + b0, &chunk)
                .map_err(|e| self.io(e, "Error writing a sector bitmap"))?;
            if full {
                st.bits.insert(i, Bits::Full);
            }
        }
        if !a.new.is_empty() {
            self.file
                .write_at(st.next_free, &self.footer.to_bytes())
                .map_err(|e| self.io(e, "Error writing the footer"))?;
            for &(i, at) in &a.new {
                let v = (at / 512) as u32;
                self.file
                    .write_at(d.header.table_offset + 4 * i as u64, &v.to_be_bytes())
                    .map_err(|e| self.io(e, "Error writing the BAT"))?;
                st.bat[i as usize] = v;
            }
        }
        Ok(())
    }

    /// Read `[off, off+buf.len())` synchronously.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> FResult<()> {
        let pieces = self.map_read(off, buf.len() as u64)?;
        self.read_pieces(off, &pieces, buf)
    }

    fn read_pieces(&self, off: u64, pieces: &[Piece], buf: &mut [u8]) -> FResult<()> {
        crate::mapping::read_pieces(
            self,
            &self.name,
            &*self.file,
            self.backing.as_deref(),
            off,
            pieces,
            buf,
        )
    }

    /// Write `data` at `off` synchronously (any alignment).
    pub fn write(&self, off: u64, data: &[u8]) -> FResult<()> {
        self.check_range(off, data.len() as u64)?;
        self.writable()?;
        let Some(d) = &self.dynamic else {
            return self
                .file
                .write_at(off, data)
                .map_err(|e| self.io(e, "write error"));
        };
        let len = data.len() as u64;
        let mut st = self.lock(d);
        // Wait for asynchronous allocations on these blocks to finish.
        while Self::chunks(d, off, len).any(|(i, _, _)| st.busy.contains(&i)) {
            st = d.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let flen = self
            .file
            .len()
            .map_err(|e| self.io(e, "Invalid file size"))?;
        for (i, inb, n) in Self::chunks(d, off, len) {
            let guest = i as u64 * d.block_size + inb;
            let src = &data[(guest - off) as usize..(guest - off + n) as usize];
            let e = st.bat[i as usize];
            if e != UNALLOCATED
                && self
                    .bits(d, &mut st, i)?
                    .all(inb / 512, (inb + n).div_ceil(512))
            {
                // Sectors the image already holds: exactly the guest's
                // bytes. Rewriting whole edge sectors with what they read
                // before would undo an asynchronous write into the same
                // sector that landed meanwhile (those take no lock).
                let host = e as u64 * 512 + d.bitmap_size + inb;
                self.file
                    .write_at(host, src)
                    .map_err(|e| self.io(e, "write error"))?;
                continue;
            }
            // Whole sectors: the edges keep what the sector reads now.
            let (a0, a1) = (inb / 512 * 512, (inb + n).div_ceil(512) * 512);
            let mut buf = vec![0u8; (a1 - a0) as usize];
            if a0 < inb || a1 > inb + n {
                let base = i as u64 * d.block_size;
                for s in [a0, a1 - 512] {
                    let p = self.map_locked(d, &mut st, base + s, 512)?;
                    let at = (s - a0) as usize;
                    self.read_pieces(base + s, &p, &mut buf[at..at + 512])?;
                }
            }
            buf[(inb - a0) as usize..(inb - a0 + n) as usize].copy_from_slice(src);
            let (s0, s1) = (a0 / 512, a1 / 512);
            let e = st.bat[i as usize];
            if e == UNALLOCATED {
                let at = self.reserve(d, &mut st)?;
                let data_at = at + d.bitmap_size;
                let a = Alloc {
                    new: vec![(i, at)],
                    marks: vec![(i, s0, s1)],
                };
                let r = (|| {
                    if !d.differencing {
                        for (x, y) in [
                            (data_at, data_at + a0),
                            (data_at + a1, data_at + d.block_size),
                        ] {
                            let y = y.min(flen);
                            if x < y {
                                self.file
                                    .write_zeroes(x, y - x)
                                    .map_err(|e| self.io(e, "write error"))?;
                            }
                        }
                    }
                    self.file
                        .write_at(data_at + a0, &buf)
                        .map_err(|e| self.io(e, "write error"))?;
                    self.link(d, &mut st, &a)
                })();
                if r.is_err() && st.bat[i as usize] == UNALLOCATED {
                    self.unreserve(d, &mut st, &a);
                }
                r?;
            } else {
                let host = e as u64 * 512 + d.bitmap_size;
                self.file
                    .write_at(host + a0, &buf)
                    .map_err(|e| self.io(e, "write error"))?;
                if !self.bits(d, &mut st, i)?.all(s0, s1) {
                    self.link(
                        d,
                        &mut st,
                        &Alloc {
                            new: Vec::new(),
                            marks: vec![(i, s0, s1)],
                        },
                    )?;
                }
            }
        }
        Ok(())
    }

    /// The status of `[off, off+len)`'s first run (at most `len` bytes).
    pub fn block_status(&self, off: u64, len: u64) -> FResult<Piece> {
        self.check_range(off, len)?;
        let Some(d) = &self.dynamic else {
            return Ok(Piece {
                offset: off,
                len,
                run: Run::Data(off),
            });
        };
        let mut st = self.lock(d);
        let bs = d.block_size;
        let (i, inb) = ((off / bs) as u32, off % bs);
        let e = st.bat[i as usize];
        let first = (bs - inb).min(len);
        if e == UNALLOCATED {
            // Consecutive unallocated blocks form one run.
            let mut n = first;
            let mut j = i as u64 + 1;
            while n < len && st.bat[j as usize] == UNALLOCATED {
                n = (n + bs).min(len);
                j += 1;
            }
            let run = if d.differencing {
                Run::Backing
            } else {
                Run::Zero
            };
            return Ok(Piece {
                offset: off,
                len: n,
                run,
            });
        }
        if !d.differencing {
            // Allocated blocks are data through, whatever their bitmaps.
            return Ok(Piece {
                offset: off,
                len: first,
                run: Run::Data(e as u64 * 512 + d.bitmap_size + inb),
            });
        }
        let p = self.map_locked(d, &mut st, off, first)?;
        Ok(p[0])
    }

    /// Make writes durable.
    pub fn flush(&self) -> FResult<()> {
        self.file.flush().map_err(|e| self.io(e, "flush error"))
    }

    /// Allocated blocks (dynamic and differencing disks).
    pub fn allocated_blocks(&self) -> u64 {
        self.dynamic.as_ref().map_or(0, |d| {
            self.lock(d)
                .bat
                .iter()
                .filter(|&&e| e != UNALLOCATED)
                .count() as u64
        })
    }
}

impl GuestMap for Vpc {
    type Alloc = Alloc;

    /// Map `[off, off+len)` for reading.
    fn map_read(&self, off: u64, len: u64) -> FResult<Vec<Piece>> {
        self.check_range(off, len)?;
        let Some(d) = &self.dynamic else {
            return Ok(vec![Piece {
                offset: off,
                len,
                run: Run::Data(off),
            }]);
        };
        let mut st = self.lock(d);
        self.map_locked(d, &mut st, off, len)
    }

    /// Map a write of `[off, off+len)` that allocates nothing.
    fn map_write(&self, off: u64, len: u64) -> FResult<WriteMap> {
        self.check_range(off, len)?;
        self.writable()?;
        let Some(d) = &self.dynamic else {
            return Ok(WriteMap::InPlace(vec![(off, off, len)]));
        };
        let mut st = self.lock(d);
        let mut runs = Vec::new();
        for (i, inb, n) in Self::chunks(d, off, len) {
            if st.busy.contains(&i) {
                return Ok(WriteMap::Busy);
            }
            let e = st.bat[i as usize];
            if e == UNALLOCATED
                || !self
                    .bits(d, &mut st, i)?
                    .all(inb / 512, (inb + n).div_ceil(512))
            {
                return Ok(WriteMap::Allocate);
            }
            let host = e as u64 * 512 + d.bitmap_size + inb;
            runs.push((i as u64 * d.block_size + inb, host, n));
        }
        Ok(WriteMap::InPlace(runs))
    }

    /// Plan a write of `[off, off+len)` that allocates blocks or sets
    /// bitmap bits.
    fn plan_alloc(&self, off: u64, len: u64) -> FResult<Plan> {
        self.check_range(off, len)?;
        self.writable()?;
        let Some(d) = &self.dynamic else {
            return Ok(Plan::Sync);
        };
        let flen = self
            .file
            .len()
            .map_err(|e| self.io(e, "Invalid file size"))?;
        let mut st = self.lock(d);
        for (i, inb, n) in Self::chunks(d, off, len) {
            if st.busy.contains(&i) {
                return Ok(Plan::Busy);
            }
            if d.differencing && (inb % 512 != 0 || (inb + n) % 512 != 0) {
                // A partial sector whose bit is clear needs the parent's
                // bytes around the guest's.
                let allocated = st.bat[i as usize] != UNALLOCATED;
                let head_ok =
                    inb % 512 == 0 || allocated && self.bits(d, &mut st, i)?.get(inb / 512);
                let tail_ok = (inb + n) % 512 == 0
                    || allocated && self.bits(d, &mut st, i)?.get((inb + n) / 512);
                if !head_ok || !tail_ok {
                    return Ok(Plan::Sync);
                }
            }
        }
        let mut zero_first = Vec::new();
        let mut writes = Vec::new();
        let mut alloc = Alloc {
            new: Vec::new(),
            marks: Vec::new(),
        };
        for (i, inb, n) in Self::chunks(d, off, len) {
            let guest = i as u64 * d.block_size + inb;
            let (s0, s1) = (inb / 512, (inb + n).div_ceil(512));
            let e = st.bat[i as usize];
            let data = if e == UNALLOCATED {
                let at = match self.reserve(d, &mut st) {
                    Ok(a) => a,
                    Err(err) => {
                        self.unreserve(d, &mut st, &alloc);
                        return Err(err);
                    }
                };
                let data = at + d.bitmap_size;
                if !d.differencing {
                    // The rest of the block must read as zeroes; past the
                    // file's end it already does.
                    for (a, b) in [(data, data + inb), (data + inb + n, data + d.block_size)] {
                        let b = b.min(flen);
                        if a < b {
                            zero_first.push((a, b - a));
                        }
                    }
                }
                alloc.new.push((i, at));
                st.busy.insert(i);
                data
            } else {
                if !self.bits(d, &mut st, i)?.all(s0, s1) {
                    st.busy.insert(i);
                }
                e as u64 * 512 + d.bitmap_size
            };
            if st.busy.contains(&i) {
                alloc.marks.push((i, s0, s1));
            }
            writes.push((guest, data + inb, n));
        }
        Ok(Plan::Ready {
            zero_first,
            writes,
            alloc,
        })
    }

    /// Link what `a` allocated once its data is written (`ok`), or give
    /// the space back.
    fn finish_alloc(&self, a: Alloc, ok: bool) -> FResult<()> {
        let Some(d) = &self.dynamic else {
            return Ok(());
        };
        let mut st = self.lock(d);
        let r = if ok {
            self.link(d, &mut st, &a)
        } else {
            Ok(())
        };
        if !ok || r.is_err() {
            // Blocks whose BAT entry was not written stay unallocated.
            let keep: Vec<(u32, u64)> = a
                .new
                .iter()
                .copied()
                .filter(|(i, _)| st.bat[*i as usize] == UNALLOCATED)
                .collect();
            for (i, _) in &keep {
                st.bits.remove(i);
            }
            self.unreserve(
                d,
                &mut st,
                &Alloc {
                    new: keep,
                    marks: Vec::new(),
                },
            );
        }
        for (i, _, _) in &a.marks {
            st.busy.remove(i);
        }
        for (i, _) in &a.new {
            st.busy.remove(i);
        }
        drop(st);
        d.done.notify_all();
        r
    }
}

fn set_bits(b: &mut [u8], s0: u64, s1: u64) {
    for s in s0..s1 {
        if let Some(x) = b.get_mut((s / 8) as usize) {
            *x |= 0x80 >> (s % 8);
        }
    }
}
