//! Hyper-V VHDX images (QEMU's `vhdx`), after Microsoft's "VHDX Format
//! Specification v1.00": 2.1 (layout), 2.2 (file type identifier, the
//! two headers and region tables: [`layout`]), 2.3 (the log and its
//! replay: [`log`]), 2.5 (the BAT: payload and sector bitmap entries
//! interleaved per chunk) and 2.6 (metadata: file parameters, sizes,
//! page 83 data, parent locator).
//!
//! Reads map each payload block by its BAT state: fully present blocks
//! are data; partially present ones (differencing disks) are data or the
//! parent's sectors as the chunk's sector bitmap says; not-present and
//! undefined blocks are the parent's (zeroes without one); zero and
//! unmapped blocks read as zeroes.
//!
//! Writes allocate payload blocks at the end of the file, 1 MiB aligned
//! (the file grows to cover the block when it is reserved, so that the
//! BAT never points past the end), and then update the BAT in place:
//! data first, then a sector bitmap, then the BAT entry (the commit
//! point; a crash before it leaves unreferenced space). Strata does not
//! journal its BAT updates through the log as QEMU does: each is one
//! aligned 8-byte write, and qemu-img check accepts the result. Before
//! the first write after an open both headers get new file-write and
//! data-write GUIDs (spec 2.2.2) and a cleared log GUID.
//!
//! A read-write open replays a pending log first; a read-only open
//! refuses it with qemu-img's message.
//!
//! Hostile images: every offset and length from the file is checked
//! against the file's length with checked arithmetic before use; the
//! tables are capped (2047 entries), the BAT must fit its region and the
//! region the file, the log is read only up to [`log::MAX_LOG`], and
//! blocks that overlap each other or the metadata refuse the open (as
//! QEMU refuses them).

pub mod create;
pub mod fuzz;
pub mod layout;
pub mod log;

use crate::check::CheckResult;
use crate::error::{FResult, FormatError};
use crate::mapping::push_run;
pub use crate::mapping::{GuestMap, Piece, Run, WriteMap};
use crate::storage::Storage;
use layout::*;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

pub use fuzz::fuzz_open_read;

/// The largest virtual size (QEMU's and the spec's 64 TiB).
pub const MAX_SIZE: u64 = 64 << 40;

/// How to open an image.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    /// No writes (and no log replay).
    pub read_only: bool,
    /// Fresh GUIDs for the file-write and data-write fields of the
    /// headers, used if the image is written.
    pub guids: [Guid; 2],
}

/// What the metadata region says (spec 2.6.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// Bytes per payload block.
    pub block_size: u64,
    /// A fixed disk: blocks stay allocated.
    pub leave_allocated: bool,
    /// A differencing disk.
    pub has_parent: bool,
    /// Virtual size.
    pub size: u64,
    /// Logical sector size (512 or 4096).
    pub logical_sector: u64,
    /// Physical sector size (512 or 4096).
    pub physical_sector: u64,
    /// The disk's SCSI identity.
    pub page83: Guid,
    /// The parent locator's key/value pairs (differencing disks).
    pub locator: Vec<(String, String)>,
}

impl Metadata {
    /// The parent's paths the locator gives, best first
    /// (`relative_path`, `absolute_win32_path`, `volume_path`), with
    /// Windows separators turned into `/`.
    pub fn parent_paths(&self) -> Vec<String> {
        let mut v = Vec::new();
        for key in ["relative_path", "absolute_win32_path", "volume_path"] {
            for (_, val) in self.locator.iter().filter(|(k, _)| k == key) {
                let mut p = val.replace('\\', "/");
                while let Some(r) = p.strip_prefix("./") {
                    p = r.to_string();
                }
                if !p.is_empty() && !v.contains(&p) {
                    v.push(p);
                }
            }
        }
        v
    }
    /// The locator's `parent_linkage` (the parent's data-write GUID).
    pub fn parent_linkage(&self) -> Option<Guid> {
        self.locator
            .iter()
            .find(|(k, _)| k == "parent_linkage")
            .and_then(|(_, v)| parse_guid_text(v))
    }
}

/// The header section and metadata, read without opening the image (to
/// find a differencing disk's parent first).
#[derive(Clone, Debug)]
pub struct Preview {
    /// The current header.
    pub header: Header,
    /// The metadata.
    pub meta: Metadata,
    /// The log holds entries to replay.
    pub log_pending: bool,
}

fn io_err(e: std::io::Error, name: &str, what: &str) -> FormatError {
    FormatError::io(e, format!("{name}: {what}"))
}

fn corrupt(name: &str, what: impl std::fmt::Display) -> FormatError {
    FormatError::Corrupt(format!("{name}: {what}"))
}

fn read(file: &dyn Storage, name: &str, at: u64, len: u64, what: &str) -> FResult<Vec<u8>> {
    let mut b = vec![0u8; len as usize];
    file.read_at(at, &mut b)
        .map_err(|e| io_err(e, name, &format!("Could not read the {what}")))?;
    Ok(b)
}

/// The parsed header section and metadata.
struct Parsed {
    header: Header,
    /// Which header slot (0 or 1) is current.
    slot: usize,
    bat: Region,
    meta_region: Region,
    meta: Metadata,
    log: Option<log::Replay>,
}

fn file_len(file: &dyn Storage, name: &str) -> FResult<u64> {
    file.len().map_err(|e| io_err(e, name, "Invalid file size"))
}

/// The current header: the valid one with the higher sequence number
/// (header 1 when both are equal, as Disk2VHD writes them).
fn read_header(file: &dyn Storage, name: &str) -> FResult<(Header, usize)> {
    let id = read(file, name, 0, 8, "file identifier")?;
    if id != FILE_SIGNATURE {
        return Err(corrupt(
            name,
            "Invalid VHDX file identifier (no 'vhdxfile' signature)",
        ));
    }
    let h: Vec<Option<Header>> = HEADER_OFFSETS
        .iter()
        .map(|&o| read(file, name, o, HEADER_SIZE as u64, "header").map(|b| Header::parse(&b)))
        .collect::<FResult<_>>()?;
    match (&h[0], &h[1]) {
        (Some(a), Some(b)) if b.sequence > a.sequence => Ok((b.clone(), 1)),
        (Some(a), _) => Ok((a.clone(), 0)),
        (None, Some(b)) => Ok((b.clone(), 1)),
        (None, None) => Err(corrupt(name, "No valid VHDX header found")),
    }
}

/// A region `[off, off+len)` that must be 1 MiB aligned, past the
/// header section and inside the file.
fn check_region(name: &str, what: &str, off: u64, len: u64, flen: u64) -> FResult<()> {
    let ok = off.is_multiple_of(MIB)
        && len.is_multiple_of(MIB)
        && len > 0
        && off >= HEADER_SECTION
        && off.checked_add(len).is_some_and(|e| e <= flen);
    if ok {
        Ok(())
    } else {
        Err(corrupt(
            name,
            format_args!("the {what} region [{off}, +{len}) is misaligned or outside the file ({flen} bytes)"),
        ))
    }
}

/// Read the log region of `h`, if its GUID says it may hold entries,
/// and find what to replay.
fn read_log(file: &dyn Storage, name: &str, h: &Header, flen: u64) -> FResult<Option<log::Replay>> {
    if h.log_guid == [0; 16] {
        return Ok(None);
    }
    if h.log_version != 0 {
        return Err(FormatError::Unsupported(format!(
            "{name}: unsupported VHDX log version {}",
            h.log_version
        )));
    }
    let len = h.log_length as u64;
    check_region(name, "log", h.log_offset, len, flen)?;
    if len > log::MAX_LOG {
        return Err(FormatError::Unsupported(format!(
            "{name}: the VHDX log is too large ({len} bytes)"
        )));
    }
    let buf = read(file, name, h.log_offset, len, "log")?;
    log::find_replay(&buf, &h.log_guid, name)
}

fn parse(file: &dyn Storage, name: &str) -> FResult<Parsed> {
    let flen = file_len(file, name)?;
    if flen < HEADER_SECTION {
        return Err(corrupt(name, "File too small for a VHDX header section"));
    }
    let (header, slot) = read_header(file, name)?;
    let log = read_log(file, name, &header, flen)?;
    let (bat, meta_region) = read_regions(file, name, &header, flen)?;
    let meta = read_metadata(file, name, &meta_region)?;
    Ok(Parsed {
        header,
        slot,
        bat,
        meta_region,
        meta,
        log,
    })
}

fn read_regions(
    file: &dyn Storage,
    name: &str,
    h: &Header,
    flen: u64,
) -> FResult<(Region, Region)> {
    let mut table = None;
    for o in REGION_OFFSETS {
        let b = read(file, name, o, TABLE_SIZE as u64, "region table")?;
        if let Some(t) = parse_regions(&b, name)? {
            table = Some(t);
            break;
        }
    }
    let Some(table) = table else {
        return Err(corrupt(name, "No valid VHDX region table found"));
    };
    let (mut bat, mut meta) = (None, None);
    let mut spans: Vec<(u64, u64)> = Vec::new();
    if h.log_guid != [0; 16] || h.log_length != 0 {
        spans.push((
            h.log_offset,
            h.log_offset.saturating_add(h.log_length as u64),
        ));
    }
    for r in &table {
        let slot = if r.guid == BAT_GUID {
            &mut bat
        } else if r.guid == METADATA_GUID {
            &mut meta
        } else if r.required {
            return Err(FormatError::Unsupported(format!(
                "{name}: the VHDX region {} is required but unknown",
                guid_text(&r.guid)
            )));
        } else {
            continue;
        };
        if slot.is_some() {
            return Err(corrupt(
                name,
                format_args!("duplicate VHDX region {}", guid_text(&r.guid)),
            ));
        }
        check_region(
            name,
            if r.guid == BAT_GUID {
                "BAT"
            } else {
                "metadata"
            },
            r.offset,
            r.length as u64,
            flen,
        )?;
        let (s, e) = (r.offset, r.offset + r.length as u64);
        if spans.iter().any(|&(a, b)| s < b && a < e) {
            return Err(corrupt(
                name,
                format_args!("VHDX region {s}-{e} overlaps with another region"),
            ));
        }
        spans.push((s, e));
        *slot = Some(*r);
    }
    match (bat, meta) {
        (Some(b), Some(m)) => Ok((b, m)),
        _ => Err(corrupt(
            name,
            "the VHDX region table lacks the BAT or the metadata region",
        )),
    }
}

fn read_metadata(file: &dyn Storage, name: &str, region: &Region) -> FResult<Metadata> {
    let rlen = region.length as u64;
    let table = read(
        file,
        name,
        region.offset,
        TABLE_SIZE as u64,
        "metadata table",
    )?;
    let entries = parse_metadata_table(&table, name)?;
    let mut items: HashMap<Guid, Vec<u8>> = HashMap::new();
    for e in &entries {
        let known = [
            FILE_PARAMETERS,
            VIRTUAL_DISK_SIZE,
            PAGE83_DATA,
            LOGICAL_SECTOR_SIZE,
            PHYSICAL_SECTOR_SIZE,
            PARENT_LOCATOR,
        ]
        .contains(&e.guid);
        if !known {
            if e.required {
                return Err(FormatError::Unsupported(format!(
                    "{name}: the VHDX metadata item {} is required but unknown",
                    guid_text(&e.guid)
                )));
            }
            continue;
        }
        let (off, len) = (e.offset as u64, e.length as u64);
        if len > 0 && (off < TABLE_SIZE as u64 || off + len > rlen) {
            return Err(corrupt(
                name,
                format_args!(
                    "the VHDX metadata item {} lies outside its region",
                    guid_text(&e.guid)
                ),
            ));
        }
        if items.contains_key(&e.guid) {
            return Err(corrupt(
                name,
                format_args!("duplicate VHDX metadata item {}", guid_text(&e.guid)),
            ));
        }
        items.insert(
            e.guid,
            read(file, name, region.offset + off, len, "metadata")?,
        );
    }
    let item = |g: &Guid, what: &str, min: usize| -> FResult<&[u8]> {
        match items.get(g) {
            Some(b) if b.len() >= min => Ok(b),
            _ => Err(corrupt(
                name,
                format_args!("the VHDX metadata lacks the {what}"),
            )),
        }
    };
    let fp = item(&FILE_PARAMETERS, "file parameters", 8)?;
    let (block_size, flags) = (le32(fp, 0) as u64, le32(fp, 4));
    let size = le64(item(&VIRTUAL_DISK_SIZE, "virtual disk size", 8)?, 0);
    let logical_sector = le32(item(&LOGICAL_SECTOR_SIZE, "logical sector size", 4)?, 0) as u64;
    let physical_sector = le32(item(&PHYSICAL_SECTOR_SIZE, "physical sector size", 4)?, 0) as u64;
    let page83 = guid_at(item(&PAGE83_DATA, "page 83 data", 16)?, 0);
    if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
        return Err(corrupt(
            name,
            format_args!("invalid VHDX block size {block_size}"),
        ));
    }
    for (what, s) in [("logical", logical_sector), ("physical", physical_sector)] {
        if s != 512 && s != 4096 {
            return Err(corrupt(
                name,
                format_args!("invalid VHDX {what} sector size {s}"),
            ));
        }
    }
    if size > MAX_SIZE {
        return Err(FormatError::Unsupported(format!(
            "{name}: the virtual size {size} is larger than the 64 TiB VHDX allows"
        )));
    }
    let has_parent = flags & 2 != 0;
    let mut locator = Vec::new();
    if has_parent {
        let (kind, kv) = parse_locator(item(&PARENT_LOCATOR, "parent locator", 20)?, name)?;
        if kind != VHDX_LOCATOR_TYPE {
            return Err(FormatError::Unsupported(format!(
                "{name}: unsupported VHDX parent locator type {}",
                guid_text(&kind)
            )));
        }
        locator = kv;
    }
    Ok(Metadata {
        block_size,
        leave_allocated: flags & 1 != 0,
        has_parent,
        size,
        logical_sector,
        physical_sector,
        page83,
        locator,
    })
}

/// Read what the image's metadata says without opening it.
pub fn preview(file: &dyn Storage, name: &str) -> FResult<Preview> {
    let p = parse(file, name)?;
    Ok(Preview {
        header: p.header,
        meta: p.meta,
        log_pending: p.log.is_some(),
    })
}

/// The geometry of the BAT (spec 2.5).
#[derive(Clone, Copy, Debug)]
struct Geo {
    bs: u64,
    size: u64,
    lss: u64,
    /// Payload blocks per chunk.
    chunk_ratio: u64,
    blocks: u64,
    entries: u64,
    diff: bool,
}

impl Geo {
    fn new(m: &Metadata) -> Geo {
        let chunk_ratio = SECTORS_PER_BITMAP * m.logical_sector / m.block_size;
        let blocks = m.size.div_ceil(m.block_size);
        let entries = if m.has_parent {
            blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else if blocks == 0 {
            0
        } else {
            blocks + (blocks - 1) / chunk_ratio
        };
        Geo {
            bs: m.block_size,
            size: m.size,
            lss: m.logical_sector,
            chunk_ratio,
            blocks,
            entries,
            diff: m.has_parent,
        }
    }
    /// The BAT index of payload block `i`.
    fn payload(&self, i: u64) -> usize {
        (i + i / self.chunk_ratio) as usize
    }
    /// The BAT index of chunk `c`'s sector bitmap.
    fn bitmap(&self, c: u64) -> usize {
        (c * (self.chunk_ratio + 1) + self.chunk_ratio) as usize
    }
    /// Guest bytes of block `i` (the last may be short).
    fn block_len(&self, i: u64) -> u64 {
        self.bs.min(self.size - i * self.bs)
    }
    /// The first bit of block `i` in its chunk's bitmap.
    fn first_bit(&self, i: u64) -> u64 {
        (i % self.chunk_ratio) * (self.bs / self.lss)
    }
}

/// What [`Vhdx::finish_alloc`] links once the data is written.
#[derive(Debug, Default)]
pub struct Alloc {
    /// New payload blocks: (block, host offset, BAT state).
    new: Vec<(u64, u64, u64)>,
    /// New sector bitmap blocks: (chunk, host offset).
    bitmaps: Vec<(u64, u64)>,
    /// Sectors to mark present: (block, first byte, end byte) in the block.
    marks: Vec<(u64, u64, u64)>,
}

/// A planned allocating write of this format.
pub type Plan = crate::mapping::Plan<Alloc>;

struct State {
    bat: Vec<u64>,
    /// Where the next block goes.
    next_free: u64,
    /// Blocks with an allocation or bitmap update in flight.
    busy: HashSet<u64>,
    /// Chunks whose sector bitmap block is being allocated.
    busy_chunks: HashSet<u64>,
    /// Sector bitmaps read so far, by chunk.
    bitmaps: HashMap<u64, Vec<u8>>,
    /// The current header and its slot.
    header: Header,
    slot: usize,
    /// The headers carry this open's write GUIDs.
    touched: bool,
}

/// An open VHDX image.
pub struct Vhdx {
    name: String,
    file: Arc<dyn Storage>,
    backing: Option<Arc<dyn Storage>>,
    meta: Metadata,
    geo: Geo,
    bat_offset: u64,
    guids: [Guid; 2],
    read_only: AtomicBool,
    log_replayed: bool,
    st: Mutex<State>,
    /// Signalled when an allocation finishes.
    done: Condvar,
}

impl Vhdx {
    /// Open the image in `file` (named `name` in errors), with the
    /// parent of a differencing disk in `backing`. A read-write open
    /// replays a pending log.
    pub fn open(
        name: &str,
        file: Arc<dyn Storage>,
        backing: Option<Arc<dyn Storage>>,
        o: &OpenOptions,
    ) -> FResult<Vhdx> {
        let mut p = parse(&*file, name)?;
        let mut log_replayed = false;
        if let Some(r) = p.log.take() {
            if o.read_only {
                return Err(FormatError::ReadOnly(format!(
                    "VHDX image file '{name}' opened read-only, but contains a log that needs to be replayed\nTo replay the log, run:\nqemu-img check -r all '{name}'"
                )));
            }
            replay(&*file, name, &mut p, &r, o.guids)?;
            log_replayed = true;
            // The log may have rewritten any metadata: read it again.
            p = parse(&*file, name)?;
        }
        let flen = file_len(&*file, name)?;
        let geo = Geo::new(&p.meta);
        let bat_bytes = geo.entries * 8;
        if bat_bytes > p.bat.length as u64 {
            return Err(corrupt(
                name,
                format_args!(
                    "the VHDX BAT region ({} bytes) is too small for {} entries",
                    p.bat.length, geo.entries
                ),
            ));
        }
        let raw = read(&*file, name, p.bat.offset, bat_bytes, "BAT")?;
        let bat: Vec<u64> = raw.chunks_exact(8).map(|c| le64(c, 0)).collect();
        drop(raw);
        let mut spans: Vec<(u64, u64, String)> = vec![
            (0, HEADER_SECTION, "the header section".into()),
            (
                p.bat.offset,
                p.bat.offset + p.bat.length as u64,
                "the BAT".into(),
            ),
            (
                p.meta_region.offset,
                p.meta_region.offset + p.meta_region.length as u64,
                "the metadata".into(),
            ),
        ];
        if p.header.log_length > 0 {
            let e = p
                .header
                .log_offset
                .saturating_add(p.header.log_length as u64);
            spans.push((p.header.log_offset, e, "the log".into()));
        }
        let mut partial_chunks = HashSet::new();
        for i in 0..geo.blocks {
            let e = bat[geo.payload(i)];
            let state = e & STATE_MASK;
            let off = e & OFFSET_MASK;
            match state {
                PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => {
                    continue
                }
                PAYLOAD_FULLY_PRESENT => {}
                PAYLOAD_PARTIALLY_PRESENT if geo.diff => {
                    partial_chunks.insert(i / geo.chunk_ratio);
                }
                _ => {
                    return Err(corrupt(
                        name,
                        format_args!("VHDX BAT entry {i} has the invalid state {state}"),
                    ))
                }
            }
            // QEMU's images may end in a short last block.
            let end = off.checked_add(geo.block_len(i)).filter(|&e| e <= flen);
            let Some(end) = end.filter(|_| off >= HEADER_SECTION) else {
                return Err(corrupt(
                    name,
                    format_args!("VHDX BAT entry {i} offset {off} points after end of file ({flen}). Image has probably been truncated."),
                ));
            };
            spans.push((off, end, format!("BAT entry {i}")));
        }
        if geo.diff {
            for c in 0..geo.blocks.div_ceil(geo.chunk_ratio) {
                let e = bat[geo.bitmap(c)];
                match e & STATE_MASK {
                    SB_PRESENT => {
                        let off = e & OFFSET_MASK;
                        if off < HEADER_SECTION || off.checked_add(MIB).is_none_or(|x| x > flen) {
                            return Err(corrupt(
                                name,
                                format_args!(
                                    "the sector bitmap of VHDX chunk {c} points after end of file"
                                ),
                            ));
                        }
                        spans.push((off, off + MIB, format!("the sector bitmap of chunk {c}")));
                    }
                    _ if partial_chunks.contains(&c) => {
                        return Err(corrupt(
                            name,
                            format_args!(
                                "VHDX chunk {c} has partially present blocks but no sector bitmap"
                            ),
                        ))
                    }
                    _ => {}
                }
            }
        }
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(corrupt(
                    name,
                    format_args!(
                        "VHDX {} (offset {}) overlaps with {} (offset {})",
                        w[1].2, w[1].0, w[0].2, w[0].0
                    ),
                ));
            }
        }
        let end = spans.iter().map(|s| s.1).max().unwrap_or(0).max(flen);
        let next_free = end.div_ceil(MIB) * MIB;
        Ok(Vhdx {
            name: name.to_string(),
            file,
            backing,
            geo,
            bat_offset: p.bat.offset,
            guids: o.guids,
            read_only: AtomicBool::new(o.read_only),
            log_replayed,
            st: Mutex::new(State {
                bat,
                next_free,
                busy: HashSet::new(),
                busy_chunks: HashSet::new(),
                bitmaps: HashMap::new(),
                header: p.header,
                slot: p.slot,
                touched: log_replayed,
            }),
            done: Condvar::new(),
            meta: p.meta,
        })
    }

    /// The virtual size.
    pub fn size(&self) -> u64 {
        self.geo.size
    }
    /// Bytes per payload block.
    pub fn block_size(&self) -> u64 {
        self.geo.bs
    }
    /// The metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }
    /// The current header.
    pub fn header(&self) -> Header {
        self.lock().header.clone()
    }
    /// The image's name in errors.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Whether this open replayed a log.
    pub fn log_replayed(&self) -> bool {
        self.log_replayed
    }
    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Relaxed)
    }
    /// Switch between read-only and read-write.
    pub fn set_read_only(&self, ro: bool) -> FResult<()> {
        self.read_only.store(ro, Ordering::Relaxed);
        Ok(())
    }
    /// Payload blocks whose data is in the file.
    pub fn allocated_blocks(&self) -> u64 {
        let st = self.lock();
        (0..self.geo.blocks)
            .filter(|&i| {
                matches!(
                    st.bat[self.geo.payload(i)] & STATE_MASK,
                    PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT
                )
            })
            .count() as u64
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn io(&self, e: std::io::Error, what: &str) -> FormatError {
        io_err(e, &self.name, what)
    }

    fn check_range(&self, off: u64, len: u64) -> FResult<()> {
        crate::mapping::check_range(&self.name, off, len, self.geo.size)
    }

    fn writable(&self) -> FResult<()> {
        crate::mapping::check_writable(&self.name, self.read_only())
    }

    /// Split `[off, off+len)` into (block, offset in block, length).
    fn chunks(&self, off: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        crate::mapping::block_chunks(off, len, self.geo.bs)
    }

    /// Write both headers with this open's GUIDs and no log, once,
    /// before the first write (spec 2.2.2: the file-write and data-write
    /// GUIDs change before the file or the guest's data does).
    fn touch(&self, st: &mut State) -> FResult<()> {
        if st.touched {
            return Ok(());
        }
        let mut h = st.header.clone();
        h.file_write_guid = self.guids[0];
        h.data_write_guid = self.guids[1];
        h.log_guid = [0; 16];
        write_headers(&*self.file, &self.name, &mut h, st.slot)?;
        st.header = h;
        st.touched = true;
        Ok(())
    }

    /// The sector bitmap of chunk `c`, read on first use.
    fn bitmap<'a>(&self, st: &'a mut State, c: u64) -> FResult<&'a mut Vec<u8>> {
        if !st.bitmaps.contains_key(&c) {
            let e = st.bat[self.geo.bitmap(c)];
            let b = if e & STATE_MASK == SB_PRESENT {
                read(
                    &*self.file,
                    &self.name,
                    e & OFFSET_MASK,
                    MIB,
                    "sector bitmap",
                )?
            } else {
                vec![0u8; MIB as usize]
            };
            st.bitmaps.insert(c, b);
        }
        st.bitmaps
            .get_mut(&c)
            .ok_or_else(|| corrupt(&self.name, "sector bitmap cache"))
    }

    /// Whether sectors `[s0, s1)` (bits of chunk `c`) are all present.
    fn present(&self, st: &mut State, c: u64, s0: u64, s1: u64) -> FResult<bool> {
        let b = self.bitmap(st, c)?;
        Ok((s0..s1).all(|s| b[(s / 8) as usize] & (1 << (s % 8)) != 0))
    }

    fn map_locked(&self, st: &mut State, off: u64, len: u64) -> FResult<Vec<Piece>> {
        let g = self.geo;
        let mut out: Vec<Piece> = Vec::new();
        let absent = if g.diff { Run::Backing } else { Run::Zero };
        for (i, inb, n) in self.chunks(off, len) {
            let guest = i * g.bs + inb;
            let e = st.bat[g.payload(i)];
            let host = e & OFFSET_MASK;
            match e & STATE_MASK {
                PAYLOAD_FULLY_PRESENT => push_run(&mut out, guest, n, Run::Data(host + inb)),
                PAYLOAD_PARTIALLY_PRESENT => {
                    let c = i / g.chunk_ratio;
                    let base = g.first_bit(i);
                    let bits = self.bitmap(st, c)?;
                    let bit = |p: u64| {
                        let s = base + p / g.lss;
                        bits[(s / 8) as usize] & (1 << (s % 8)) != 0
                    };
                    let mut p = inb;
                    while p < inb + n {
                        let here = bit(p);
                        let mut q = ((p / g.lss + 1) * g.lss).min(inb + n);
                        while q < inb + n && bit(q) == here {
                            q = ((q / g.lss + 1) * g.lss).min(inb + n);
                        }
                        let run = if here {
                            Run::Data(host + p)
                        } else {
                            Run::Backing
                        };
                        push_run(&mut out, i * g.bs + p, q - p, run);
                        p = q;
                    }
                }
                PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED => push_run(&mut out, guest, n, absent),
                _ => push_run(&mut out, guest, n, Run::Zero),
            }
        }
        Ok(out)
    }

    /// Read `[off, off+buf.len())` synchronously.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> FResult<()> {
        let pieces = self.map_read(off, buf.len() as u64)?;
        crate::mapping::read_pieces(
            self,
            &self.name,
            &*self.file,
            self.backing.as_deref(),
            off,
            &pieces,
            buf,
        )
    }

    /// The status of `[off, off+len)`'s first run (at most `len` bytes).
    pub fn block_status(&self, off: u64, len: u64) -> FResult<Piece> {
        self.check_range(off, len)?;
        // A bounded look-ahead: long runs are reported in parts.
        let len = len.min(1024 * self.geo.bs).max(1);
        let len = len.min(self.geo.size - off);
        let mut st = self.lock();
        let p = self.map_locked(&mut st, off, len)?;
        p.first()
            .copied()
            .ok_or_else(|| corrupt(&self.name, "an empty mapping"))
    }

    /// Write `data` at `off` synchronously (any alignment).
    ///
    /// An allocation runs entirely under the metadata lock: the
    /// asynchronous path then waits on the lock instead of finding the
    /// blocks busy and parking until an asynchronous allocation ends
    /// (which, for this one, would never tell it).
    pub fn write(&self, off: u64, data: &[u8]) -> FResult<()> {
        self.check_range(off, data.len() as u64)?;
        self.writable()?;
        let len = data.len() as u64;
        let mut st = self.lock();
        loop {
            // Asynchronous allocations on these blocks finish first.
            let g = self.geo;
            while self.chunks(off, len).any(|(i, _, _)| {
                st.busy.contains(&i) || st.busy_chunks.contains(&(i / g.chunk_ratio))
            }) {
                st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            // Read under the lock: what lies below it may be space a
            // failed allocation wrote, which a new block must zero.
            let flen = self
                .file
                .len()
                .map_err(|e| self.io(e, "Invalid file size"))?;
            let plan = match self.map_write_locked(&mut st, off, len)? {
                WriteMap::InPlace(runs) => {
                    drop(st);
                    for (g, h, n) in runs {
                        let s = (g - off) as usize;
                        self.file
                            .write_at(h, &data[s..s + n as usize])
                            .map_err(|e| self.io(e, "write error"))?;
                    }
                    return Ok(());
                }
                WriteMap::Busy => continue,
                WriteMap::Allocate => self.plan_locked(&mut st, flen, off, len)?,
            };
            match plan {
                crate::mapping::Plan::Busy => continue,
                crate::mapping::Plan::Sync => {
                    drop(st);
                    return self.write_merged(off, data);
                }
                crate::mapping::Plan::Ready {
                    zero_first,
                    writes,
                    alloc,
                } => {
                    let r = (|| {
                        for (h, n) in zero_first {
                            self.file
                                .write_zeroes(h, n)
                                .map_err(|e| self.io(e, "write error"))?;
                        }
                        for (g, h, n) in writes {
                            let s = (g - off) as usize;
                            self.file
                                .write_at(h, &data[s..s + n as usize])
                                .map_err(|e| self.io(e, "write error"))?;
                        }
                        Ok(())
                    })();
                    let f = self.finish_locked(&mut st, alloc, r.is_ok());
                    drop(st);
                    self.done.notify_all();
                    return r.and(f);
                }
            }
        }
    }

    /// A write whose edge sectors are the parent's: whole sectors, the
    /// edges keeping what they read now.
    fn write_merged(&self, off: u64, data: &[u8]) -> FResult<()> {
        let s = self.geo.lss;
        let a0 = off / s * s;
        let a1 = (off + data.len() as u64).div_ceil(s) * s;
        let mut buf = vec![0u8; (a1 - a0) as usize];
        self.read(a0, &mut buf[..s as usize])?;
        let last = (a1 - a0 - s) as usize;
        self.read(a1 - s, &mut buf[last..])?;
        buf[(off - a0) as usize..(off - a0) as usize + data.len()].copy_from_slice(data);
        self.write(a0, &buf)
    }

    /// Reserve `len` bytes at the end of the file, growing the file to
    /// cover them (so that no BAT entry ever points past its end).
    fn reserve(&self, st: &mut State, len: u64) -> FResult<u64> {
        let at = st.next_free;
        let end = at
            .checked_add(len)
            .filter(|&e| e <= OFFSET_MASK)
            .ok_or_else(|| {
                FormatError::NoSpace(format!("{}: the VHDX cannot grow further", self.name))
            })?;
        let flen = self
            .file
            .len()
            .map_err(|e| self.io(e, "Invalid file size"))?;
        if flen < end {
            self.file
                .set_len(end)
                .map_err(|e| self.io(e, "Could not grow the image"))?;
        }
        st.next_free = end;
        Ok(at)
    }

    fn unreserve(&self, st: &mut State, a: &Alloc) {
        let mut spans: Vec<(u64, u64)> = a.new.iter().map(|&(_, h, _)| (h, self.geo.bs)).collect();
        spans.extend(a.bitmaps.iter().map(|&(_, h)| (h, MIB)));
        spans.sort_unstable();
        for (h, n) in spans.into_iter().rev() {
            if h + n == st.next_free {
                st.next_free = h;
            }
        }
    }

    fn release(&self, st: &mut State, a: &Alloc) {
        for (i, _, _) in &a.marks {
            st.busy.remove(i);
        }
        for (i, _, _) in &a.new {
            st.busy.remove(i);
        }
        for (c, _) in &a.bitmaps {
            st.busy_chunks.remove(c);
        }
    }

    fn write_entry(&self, st: &mut State, idx: usize, v: u64) -> FResult<()> {
        self.file
            .write_at(self.bat_offset + idx as u64 * 8, &v.to_le_bytes())
            .map_err(|e| self.io(e, "Error writing the BAT"))?;
        st.bat[idx] = v;
        Ok(())
    }

    /// Write the sector bitmaps and then the BAT entries of `a`.
    fn link(&self, st: &mut State, a: &Alloc) -> FResult<()> {
        let g = self.geo;
        for &(c, at) in &a.bitmaps {
            st.bitmaps.insert(c, vec![0u8; MIB as usize]);
            let _ = at;
        }
        let mut dirty: HashMap<u64, (u64, u64)> = HashMap::new();
        for &(i, b0, b1) in &a.marks {
            let c = i / g.chunk_ratio;
            let (s0, s1) = (
                g.first_bit(i) + b0 / g.lss,
                g.first_bit(i) + b1.div_ceil(g.lss),
            );
            let bits = self.bitmap(st, c)?;
            for s in s0..s1 {
                bits[(s / 8) as usize] |= 1 << (s % 8);
            }
            let d = dirty.entry(c).or_insert((u64::MAX, 0));
            d.0 = d.0.min(s0 / 8);
            d.1 = d.1.max(s1.div_ceil(8));
        }
        for &(c, at) in &a.bitmaps {
            // A new bitmap block is written whole: its space may hold
            // the bytes of an allocation that failed.
            let b = self.bitmap(st, c)?.clone();
            self.file
                .write_at(at, &b)
                .map_err(|e| self.io(e, "Error writing a sector bitmap"))?;
            dirty.remove(&c);
        }
        for (c, (b0, b1)) in dirty {
            let at = st.bat[g.bitmap(c)] & OFFSET_MASK;
            let chunk = self.bitmap(st, c)?[b0 as usize..b1 as usize].to_vec();
            self.file
                .write_at(at + b0, &chunk)
                .map_err(|e| self.io(e, "Error writing a sector bitmap"))?;
        }
        for &(c, at) in &a.bitmaps {
            self.write_entry(st, g.bitmap(c), at | SB_PRESENT)?;
        }
        for &(i, at, state) in &a.new {
            self.write_entry(st, g.payload(i), at | state)?;
        }
        Ok(())
    }

    /// Make writes durable.
    pub fn flush(&self) -> FResult<()> {
        self.file.flush().map_err(|e| self.io(e, "flush error"))
    }

    /// qemu-img's check: QEMU's open already refuses blocks past the end
    /// of the file or overlapping, so what is left to report is a log
    /// replayed by this open, as a fixed corruption (QEMU counts it only
    /// as fixed, so the double check after a repair finds none left).
    pub fn check(&self) -> CheckResult {
        CheckResult {
            corruptions_fixed: self.log_replayed as u64,
            ..Default::default()
        }
    }
}

/// Write header `h` into both slots, the stale one first, each with the
/// next sequence number, so that a torn write leaves a valid header.
fn write_headers(file: &dyn Storage, name: &str, h: &mut Header, slot: usize) -> FResult<()> {
    for s in [1 - slot, slot] {
        h.sequence = h.sequence.wrapping_add(1);
        file.write_at(HEADER_OFFSETS[s], &h.to_bytes())
            .map_err(|e| io_err(e, name, "Could not write the VHDX header"))?;
        file.flush()
            .map_err(|e| io_err(e, name, "Could not write the VHDX header"))?;
    }
    Ok(())
}

/// Apply log replay `r` to `file` and clear the log from the headers.
fn replay(
    file: &dyn Storage,
    name: &str,
    p: &mut Parsed,
    r: &log::Replay,
    guids: [Guid; 2],
) -> FResult<()> {
    let flen = file_len(file, name)?;
    if r.flushed_file_offset > flen {
        return Err(corrupt(
            name,
            format_args!(
                "the VHDX log expects a file of {} bytes, but it has {flen}: it has been truncated",
                r.flushed_file_offset
            ),
        ));
    }
    // The file grows between log flushes by a few blocks at most; a log
    // that claims more would make a huge sparse file.
    if r.last_file_offset > flen.saturating_add(16 << 30) {
        return Err(corrupt(
            name,
            format_args!(
                "the VHDX log claims a file of {} bytes, far beyond its {flen}",
                r.last_file_offset
            ),
        ));
    }
    let limit = flen.max(r.last_file_offset);
    log::validate(r, limit, name)?;
    let w = |e| io_err(e, name, "Could not replay the VHDX log");
    for op in &r.writes {
        match op {
            log::LogWrite::Data(off, d) => file.write_at(*off, d).map_err(w)?,
            log::LogWrite::Zero(off, n) => file.write_zeroes(*off, *n).map_err(w)?,
        }
    }
    if r.last_file_offset > flen {
        file.set_len(r.last_file_offset.div_ceil(MIB) * MIB)
            .map_err(w)?;
    }
    file.flush().map_err(w)?;
    let mut h = p.header.clone();
    h.log_guid = [0; 16];
    h.file_write_guid = guids[0];
    h.data_write_guid = guids[1];
    write_headers(file, name, &mut h, p.slot)
}

impl Vhdx {
    /// [`GuestMap::map_write`] under the lock.
    fn map_write_locked(&self, st: &mut State, off: u64, len: u64) -> FResult<WriteMap> {
        let g = self.geo;
        let mut runs = Vec::new();
        for (i, inb, n) in self.chunks(off, len) {
            if st.busy.contains(&i) {
                return Ok(WriteMap::Busy);
            }
            let e = st.bat[g.payload(i)];
            let host = e & OFFSET_MASK;
            let ok = match e & STATE_MASK {
                PAYLOAD_FULLY_PRESENT => true,
                PAYLOAD_PARTIALLY_PRESENT => {
                    let b = g.first_bit(i);
                    self.present(
                        st,
                        i / g.chunk_ratio,
                        b + inb / g.lss,
                        b + (inb + n).div_ceil(g.lss),
                    )?
                }
                _ => false,
            };
            if !ok {
                return Ok(WriteMap::Allocate);
            }
            runs.push((i * g.bs + inb, host + inb, n));
        }
        self.touch(st)?;
        Ok(WriteMap::InPlace(runs))
    }

    /// [`GuestMap::plan_alloc`] under the lock, `flen` the file's length.
    fn plan_locked(&self, st: &mut State, flen: u64, off: u64, len: u64) -> FResult<Plan> {
        let g = self.geo;
        for (i, inb, n) in self.chunks(off, len) {
            if st.busy.contains(&i) || st.busy_chunks.contains(&(i / g.chunk_ratio)) {
                return Ok(Plan::Busy);
            }
            if g.diff && (inb % g.lss != 0 || (inb + n) % g.lss != 0) {
                // A partial sector the parent still holds needs its
                // bytes around the guest's.
                let e = st.bat[g.payload(i)] & STATE_MASK;
                let c = i / g.chunk_ratio;
                let b = g.first_bit(i);
                let mut have = |p: u64| -> FResult<bool> {
                    Ok(match e {
                        PAYLOAD_FULLY_PRESENT | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => true,
                        PAYLOAD_PARTIALLY_PRESENT => {
                            self.present(st, c, b + p / g.lss, b + p / g.lss + 1)?
                        }
                        _ => false,
                    })
                };
                if (inb % g.lss != 0 && !have(inb)?) || ((inb + n) % g.lss != 0 && !have(inb + n)?)
                {
                    return Ok(Plan::Sync);
                }
            }
        }
        self.touch(st)?;
        let mut zero_first = Vec::new();
        let mut writes = Vec::new();
        let mut alloc = Alloc::default();
        let r = (|| -> FResult<()> {
            for (i, inb, n) in self.chunks(off, len) {
                let guest = i * g.bs + inb;
                let e = st.bat[g.payload(i)];
                let state = e & STATE_MASK;
                let whole = inb == 0 && n == g.block_len(i);
                let host = match state {
                    PAYLOAD_FULLY_PRESENT => e & OFFSET_MASK,
                    PAYLOAD_PARTIALLY_PRESENT => {
                        st.busy.insert(i);
                        alloc.marks.push((i, inb, inb + n));
                        e & OFFSET_MASK
                    }
                    PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED if g.diff && !whole => {
                        let c = i / g.chunk_ratio;
                        if st.bat[g.bitmap(c)] & STATE_MASK != SB_PRESENT
                            && !alloc.bitmaps.iter().any(|b| b.0 == c)
                        {
                            let at = self.reserve(st, MIB)?;
                            st.busy_chunks.insert(c);
                            alloc.bitmaps.push((c, at));
                        }
                        let at = self.reserve(st, g.bs)?;
                        st.busy.insert(i);
                        alloc.new.push((i, at, PAYLOAD_PARTIALLY_PRESENT));
                        alloc.marks.push((i, inb, inb + n));
                        // Space an earlier, failed allocation wrote must
                        // not show through where the bitmap says present.
                        if at < flen {
                            zero_first.push((at, g.bs.min(flen - at)));
                        }
                        at
                    }
                    _ => {
                        // Everything else becomes a fully present block
                        // whose other bytes read as zeroes; past the
                        // file's old end they already do.
                        let at = self.reserve(st, g.bs)?;
                        st.busy.insert(i);
                        alloc.new.push((i, at, PAYLOAD_FULLY_PRESENT));
                        for (a, b) in [(at, at + inb), (at + inb + n, at + g.bs)] {
                            let b = b.min(flen);
                            if a < b {
                                zero_first.push((a, b - a));
                            }
                        }
                        at
                    }
                };
                writes.push((guest, host + inb, n));
            }
            Ok(())
        })();
        if let Err(e) = r {
            self.unreserve(st, &alloc);
            self.release(st, &alloc);
            return Err(e);
        }
        Ok(Plan::Ready {
            zero_first,
            writes,
            alloc,
        })
    }

    /// [`GuestMap::finish_alloc`] under the lock (the caller notifies).
    fn finish_locked(&self, st: &mut State, a: Alloc, ok: bool) -> FResult<()> {
        let r = if ok { self.link(st, &a) } else { Ok(()) };
        if !ok || r.is_err() {
            // What the BAT does not reference goes back.
            let g = self.geo;
            let back = Alloc {
                new: a
                    .new
                    .iter()
                    .copied()
                    .filter(|&(i, _, _)| {
                        st.bat[g.payload(i)] & STATE_MASK != PAYLOAD_FULLY_PRESENT
                            && st.bat[g.payload(i)] & STATE_MASK != PAYLOAD_PARTIALLY_PRESENT
                    })
                    .collect(),
                bitmaps: a
                    .bitmaps
                    .iter()
                    .copied()
                    .filter(|&(c, _)| st.bat[g.bitmap(c)] & STATE_MASK != SB_PRESENT)
                    .collect(),
                marks: Vec::new(),
            };
            for (c, _) in &back.bitmaps {
                st.bitmaps.remove(c);
            }
            self.unreserve(st, &back);
        }
        self.release(st, &a);
        r
    }
}

impl GuestMap for Vhdx {
    type Alloc = Alloc;

    fn map_read(&self, off: u64, len: u64) -> FResult<Vec<Piece>> {
        self.check_range(off, len)?;
        let mut st = self.lock();
        self.map_locked(&mut st, off, len)
    }

    fn map_write(&self, off: u64, len: u64) -> FResult<WriteMap> {
        self.check_range(off, len)?;
        self.writable()?;
        self.map_write_locked(&mut self.lock(), off, len)
    }

    fn plan_alloc(&self, off: u64, len: u64) -> FResult<Plan> {
        self.check_range(off, len)?;
        self.writable()?;
        let flen = self
            .file
            .len()
            .map_err(|e| self.io(e, "Invalid file size"))?;
        self.plan_locked(&mut self.lock(), flen, off, len)
    }

    fn finish_alloc(&self, a: Alloc, ok: bool) -> FResult<()> {
        let r = self.finish_locked(&mut self.lock(), a, ok);
        self.done.notify_all();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::create::{create, CreateOptions, Parent};
    use super::*;
    use crate::storage::MemStorage;

    /// A differencing disk of 4 KiB logical sectors (which qemu-img
    /// cannot make) over an in-memory parent: seeded writes of any
    /// alignment, synchronous and planned, read back as a model says,
    /// also after a reopen.
    #[test]
    fn differencing_with_4k_sectors_matches_a_model() {
        let size = 6u64 << 20;
        let parent_bytes: Vec<u8> = (0..size).map(|i| (i / 4096) as u8 ^ 0x5a).collect();
        let parent: Arc<dyn Storage> = Arc::new(MemStorage::new(parent_bytes.clone(), size));
        let f = Arc::new(MemStorage::new(Vec::new(), 256 << 20));
        let o = CreateOptions {
            size: 0,
            block_size: 1 << 20,
            log_size: 1 << 20,
            fixed: false,
            block_state_zero: true,
            parent: Some(Parent {
                size,
                logical_sector: 4096,
                data_write_guid: [9; 16],
                relative: "p.vhdx".into(),
                absolute: "/x/p.vhdx".into(),
            }),
            guids: [[1; 16], [2; 16], [3; 16]],
            creator: "test".into(),
        };
        create(&*f, &o).unwrap();
        let opts = OpenOptions {
            read_only: false,
            guids: [[4; 16], [5; 16]],
        };
        let img = Vhdx::open("c", f.clone(), Some(parent.clone()), &opts).unwrap();
        assert_eq!(img.metadata().logical_sector, 4096);
        assert_eq!(img.metadata().parent_linkage(), Some([9; 16]));
        let mut model = parent_bytes.clone();
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for k in 0..60 {
            let len = next() % 20000 + 1;
            let off = next() % (size - len);
            let d: Vec<u8> = (0..len).map(|j| (j as u8) ^ k as u8).collect();
            if k % 2 == 0 {
                img.write(off, &d).unwrap();
            } else {
                // The planned path, with its data written here.
                match img.map_write(off, len).unwrap() {
                    WriteMap::InPlace(runs) => {
                        for (g, h, n) in runs {
                            let s = (g - off) as usize;
                            f.write_at(h, &d[s..s + n as usize]).unwrap();
                        }
                    }
                    _ => match img.plan_alloc(off, len).unwrap() {
                        crate::mapping::Plan::Ready {
                            zero_first,
                            writes,
                            alloc,
                        } => {
                            for (h, n) in zero_first {
                                f.write_zeroes(h, n).unwrap();
                            }
                            for (g, h, n) in writes {
                                let s = (g - off) as usize;
                                f.write_at(h, &d[s..s + n as usize]).unwrap();
                            }
                            img.finish_alloc(alloc, true).unwrap();
                        }
                        crate::mapping::Plan::Sync => img.write(off, &d).unwrap(),
                        crate::mapping::Plan::Busy => unreachable!("nothing in flight"),
                    },
                }
            }
            model[off as usize..(off + len) as usize].copy_from_slice(&d);
        }
        let mut all = vec![0u8; size as usize];
        img.read(0, &mut all).unwrap();
        assert!(all == model);
        drop(img);
        let img = Vhdx::open("c", f, Some(parent), &opts).unwrap();
        img.read(0, &mut all).unwrap();
        assert!(all == model, "after reopen");
    }
}
