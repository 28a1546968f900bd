//! VMware virtual disks (QEMU's `vmdk`), after VMware's "Virtual Disk
//! Format 5.0": "The Descriptor File" ([`descriptor`]), "Hosted Sparse
//! Extent Header" and "Stream-Optimized Compressed Sparse Extents"
//! ([`header`]), "Grain Directories and Grain Tables" (the two-level
//! map here), and the ESX 2.x VMFS sparse (`COWD`) extent QEMU reads.
//!
//! An image is a descriptor and its extents, in guest order:
//! - monolithicSparse / streamOptimized: one file, a sparse extent with
//!   the descriptor embedded in it;
//! - monolithicFlat, twoGbMaxExtent*, vmfs*: a text descriptor naming
//!   extent files (FLAT/VMFS: raw bytes at a sector offset; SPARSE/
//!   VMFSSPARSE: sparse extents; ZERO: no file, reads as zeroes).
//!
//! A sparse extent maps guest grains through a grain directory (GD) of
//! grain-table (GT) sectors; a GT entry (GTE) is the grain's sector, 0
//! for "not here" (the parent's bytes: `parentFileNameHint`), or 1 for a
//! zeroed grain when the header enables those. A compressed (stream)
//! extent stores each grain deflated behind a grain marker; when the
//! header's `gdOffset` is -1 the footer (the second-to-last sector)
//! holds the real header.
//!
//! Writes follow QEMU: a new grain goes at the end of the extent file,
//! written whole (the parent's bytes or zeroes around the guest's) before
//! its GTE and the redundant GTE are set (the commit point). Compressed
//! extents are append-only: a grain once written is never rewritten, and
//! in a stream whose footer names the GD, the footer and end-of-stream
//! marker are rewritten after each appended grain.
//!
//! Hostile files: headers, the GD and the GTs must lie in the file; grain
//! and table sizes and the GD are capped; the descriptor is capped at
//! [`descriptor::MAX_DESC`]; a GTE that points into the metadata is never
//! written through; compressed grains are bounded in and out.

pub mod create;
pub mod descriptor;
pub mod fuzz;
pub mod header;

use crate::check::CheckResult;
use crate::error::{FResult, FormatError};
pub use crate::mapping::{GuestMap, Piece, Run, WriteMap};
use crate::storage::Storage;
use descriptor::Descriptor;
use header::{CowdHeader, SparseHeader};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

pub use fuzz::fuzz_open_read;

/// The largest grain accepted (QEMU allows 1 GiB; no writer uses more
/// than 1 MiB, and a grain is buffered whole).
pub const MAX_GRAIN: u64 = 16 << 20;
/// The most GD entries (QEMU's limit).
pub const MAX_GD_ENTRIES: u64 = 32 << 20;
/// Grain tables kept in memory before the cache is emptied.
const GT_CACHE: usize = 4096;
/// A `GTE` meaning "zeroed grain" (with [`header::FLAG_ZERO_GRAIN`]).
pub const GTE_ZEROED: u32 = 1;

/// How to open an image.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    /// No writes.
    pub read_only: bool,
}

/// What the descriptor file says, read before the extents are opened.
#[derive(Clone, Debug)]
pub struct Preview {
    /// The descriptor.
    pub desc: Descriptor,
    /// The descriptor is embedded in a sparse extent, the only extent.
    pub embedded: bool,
    /// Where the descriptor text starts in the file.
    pub desc_offset: u64,
    /// Bytes the descriptor may occupy there (0: the whole file).
    pub desc_room: u64,
}

fn io_err(e: std::io::Error, name: &str, what: &str) -> FormatError {
    FormatError::io(e, format!("{name}: {what}"))
}

fn corrupt(name: &str, what: impl std::fmt::Display) -> FormatError {
    FormatError::Corrupt(format!("{name}: {what}"))
}

fn read_sector(file: &dyn Storage, name: &str, at: u64) -> FResult<[u8; 512]> {
    let mut b = [0u8; 512];
    file.read_at(at, &mut b)
        .map_err(|e| io_err(e, name, "Could not read header"))?;
    Ok(b)
}

fn file_len(file: &dyn Storage, name: &str) -> FResult<u64> {
    file.len()
        .map_err(|e| io_err(e, name, "Could not access file"))
}

fn read_desc(file: &dyn Storage, name: &str, at: u64, room: u64) -> FResult<Descriptor> {
    let flen = file_len(file, name)?;
    let n = room
        .min(flen.saturating_sub(at))
        .min(descriptor::MAX_DESC as u64);
    let mut b = vec![0u8; n as usize];
    file.read_at(at, &mut b)
        .map_err(|e| io_err(e, name, "Could not read from file"))?;
    Descriptor::parse(&b, name)
}

/// Read the descriptor of the image in `file`.
pub fn preview(file: &dyn Storage, name: &str) -> FResult<Preview> {
    let flen = file_len(file, name)?;
    if flen < 4 {
        return Err(corrupt(name, "File is too small, not a valid image"));
    }
    let s0 = read_sector(file, name, 0)?;
    if &s0[..4] == header::MAGIC_V4 {
        let h = SparseHeader::parse(&s0, name)?;
        let at = h
            .desc_offset
            .checked_mul(512)
            .ok_or_else(|| corrupt(name, "invalid descriptor offset"))?;
        if h.capacity == 0 && h.desc_offset != 0 {
            // A descriptor file that carries a sparse header (QEMU reads
            // these as a text descriptor).
            let desc = read_desc(file, name, at, u64::MAX)?;
            return Ok(Preview {
                desc,
                embedded: false,
                desc_offset: at,
                desc_room: 0,
            });
        }
        let room = h.desc_size.saturating_mul(512);
        let desc = if h.desc_offset == 0 || room == 0 {
            synthetic(if h.compressed() {
                "streamOptimized"
            } else {
                "monolithicSparse"
            })
        } else {
            let mut d = read_desc(file, name, at, room)?;
            // The header decides (QEMU: compressed grains make a stream).
            d.create_type = if h.compressed() {
                "streamOptimized".into()
            } else if d.create_type == "streamOptimized" || d.create_type.is_empty() {
                "monolithicSparse".into()
            } else {
                d.create_type
            };
            d
        };
        return Ok(Preview {
            desc,
            embedded: true,
            desc_offset: at,
            desc_room: room,
        });
    }
    if &s0[..4] == header::MAGIC_V3 {
        return Ok(Preview {
            desc: synthetic("vmfsSparse"),
            embedded: true,
            desc_offset: 0,
            desc_room: 0,
        });
    }
    let desc = read_desc(file, name, 0, u64::MAX)?;
    if desc.extents.is_empty() {
        return Err(corrupt(name, "invalid VMDK image descriptor: no extents"));
    }
    Ok(Preview {
        desc,
        embedded: false,
        desc_offset: 0,
        desc_room: 0,
    })
}

fn synthetic(create_type: &str) -> Descriptor {
    Descriptor {
        cid: 0,
        parent_cid: u32::MAX,
        create_type: create_type.into(),
        parent_hint: None,
        extents: Vec::new(),
    }
}

/// An extent file as the caller opened it.
#[derive(Clone)]
pub struct ExtentFile {
    /// Its storage.
    pub storage: Arc<dyn Storage>,
    /// Its name (in errors and `info`).
    pub name: String,
}

/// What kind of extent.
enum Kind {
    /// Raw bytes at this byte offset of the file.
    Flat(u64),
    /// No file: zeroes.
    Zero,
    /// A sparse extent.
    Sparse(Box<Sparse>),
}

struct Sparse {
    /// Grain bytes.
    grain: u64,
    /// Entries per GT.
    gtes: u64,
    /// GT sector per GD entry.
    gd: Vec<u32>,
    /// The redundant GD, if kept.
    rgd: Option<Vec<u32>>,
    compressed: bool,
    markers: bool,
    zero_grain: bool,
    version: u32,
    /// Bytes below this are metadata.
    data_start: u64,
    /// The header of a stream whose footer names the GD: rewritten
    /// after every appended grain.
    footer: Option<SparseHeader>,
}

/// One extent.
struct Extent {
    file: Option<ExtentFile>,
    /// `FLAT`, `SPARSE`, ... ("" for the extent of a monolithic file).
    type_name: String,
    /// Guest byte offset.
    start: u64,
    /// Bytes.
    len: u64,
    kind: Kind,
}

/// Per sparse extent, what changes.
#[derive(Default)]
struct ExtState {
    /// GTs read so far, by GD index.
    gts: HashMap<u64, Vec<u32>>,
    /// Where the next grain goes.
    next: u64,
    /// Grains with an allocation in flight.
    busy: HashSet<u64>,
}

struct State {
    ext: Vec<ExtState>,
}

/// What [`Vmdk::finish_alloc`] links: (extent, grain, host offset).
#[derive(Debug)]
pub struct Alloc {
    grains: Vec<(usize, u64, u64)>,
}

/// A planned allocating write of this format.
pub type Plan = crate::mapping::Plan<Alloc>;

/// Where a grain is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gte {
    /// The GD has no table for it.
    NoTable,
    /// Not in this image.
    Unallocated,
    /// Reads as zeroes.
    Zeroed,
    /// At this byte offset.
    At(u64),
}

/// A decompressed grain: (extent, host offset, bytes).
type DecodedGrain = (usize, u64, Arc<Vec<u8>>);

/// An open VMDK image.
pub struct Vmdk {
    name: String,
    desc: Descriptor,
    pv: Preview,
    /// The descriptor's file (CID updates).
    desc_file: Arc<dyn Storage>,
    extents: Vec<Extent>,
    backing: Option<Arc<dyn Storage>>,
    size: u64,
    read_only: AtomicBool,
    cid_updated: AtomicBool,
    st: Mutex<State>,
    done: Condvar,
    /// The last grain decompressed: (extent, host offset, bytes).
    last_grain: Mutex<Option<DecodedGrain>>,
}

impl Vmdk {
    /// Open the image whose descriptor is in `file` (named `name`) as
    /// `pv` read it, with its extents' files in `files` (one per
    /// descriptor extent, `None` for ZERO extents; ignored when the
    /// descriptor is embedded) and the parent in `backing`.
    pub fn open(
        name: &str,
        file: Arc<dyn Storage>,
        pv: &Preview,
        files: Vec<Option<ExtentFile>>,
        backing: Option<Arc<dyn Storage>>,
        o: &OpenOptions,
    ) -> FResult<Vmdk> {
        let mut extents = Vec::new();
        let mut start = 0u64;
        if pv.embedded {
            let f = ExtentFile {
                storage: file.clone(),
                name: name.to_string(),
            };
            let (len, s) = open_sparse(&f, o.read_only)?;
            extents.push(Extent {
                file: Some(f),
                type_name: String::new(),
                start: 0,
                len,
                kind: Kind::Sparse(Box::new(s)),
            });
            start = len;
        } else {
            if files.len() != pv.desc.extents.len() {
                return Err(FormatError::Invalid(format!(
                    "{name}: {} extent files for {} extents",
                    files.len(),
                    pv.desc.extents.len()
                )));
            }
            for (line, f) in pv.desc.extents.iter().zip(files) {
                let sectors_len = line
                    .sectors
                    .checked_mul(512)
                    .ok_or_else(|| corrupt(name, "extent size overflows"))?;
                let (len, kind) = match (line.kind.as_str(), &f) {
                    ("ZERO", _) => (sectors_len, Kind::Zero),
                    ("FLAT" | "VMFS", Some(_)) => {
                        let at = line
                            .offset
                            .checked_mul(512)
                            .ok_or_else(|| corrupt(name, "extent offset overflows"))?;
                        (sectors_len, Kind::Flat(at))
                    }
                    ("SPARSE" | "VMFSSPARSE", Some(f)) => {
                        let (len, s) = open_sparse(f, o.read_only)?;
                        (len, Kind::Sparse(Box::new(s)))
                    }
                    ("SESPARSE", _) => {
                        return Err(FormatError::Unsupported(format!(
                            "{name}: seSparse extents are not supported"
                        )))
                    }
                    (k, Some(_)) => {
                        return Err(FormatError::Unsupported(format!(
                            "{name}: Unsupported extent type '{k}'"
                        )))
                    }
                    (_, None) => {
                        return Err(FormatError::Invalid(format!(
                            "{name}: no file for extent '{}'",
                            line.file
                        )))
                    }
                };
                extents.push(Extent {
                    file: f,
                    type_name: line.kind.clone(),
                    start,
                    len,
                    kind,
                });
                start = start
                    .checked_add(len)
                    .ok_or_else(|| corrupt(name, "the extents' sizes overflow"))?;
            }
        }
        let mut ext = Vec::new();
        for e in &extents {
            let mut s = ExtState::default();
            if let (Kind::Sparse(sp), Some(f)) = (&e.kind, &e.file) {
                let flen = file_len(&*f.storage, &f.name)?;
                s.next = match &sp.footer {
                    // The stream's tail is rewritten after each grain.
                    Some(_) => (flen / 512 * 512).saturating_sub(1536),
                    None if sp.compressed => flen.div_ceil(512) * 512,
                    None => flen.div_ceil(sp.grain) * sp.grain,
                };
                s.next = s.next.max(sp.data_start);
            }
            ext.push(s);
        }
        Ok(Vmdk {
            name: name.to_string(),
            desc: pv.desc.clone(),
            pv: pv.clone(),
            desc_file: file,
            extents,
            backing,
            size: start,
            read_only: AtomicBool::new(o.read_only),
            cid_updated: AtomicBool::new(false),
            st: Mutex::new(State { ext }),
            done: Condvar::new(),
            last_grain: Mutex::new(None),
        })
    }

    /// The virtual size.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// The image's name in errors.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The descriptor.
    pub fn descriptor(&self) -> &Descriptor {
        &self.desc
    }
    /// Whether every extent with data lives in one file (the
    /// asynchronous data path serves only those).
    pub fn single_file(&self) -> bool {
        self.extents.len() == 1 && self.extents[0].file.is_some()
    }
    /// The grain size when every extent is sparse with the same grain,
    /// compression and flatness (QEMU's `cluster_size`).
    pub fn cluster_size(&self) -> Option<u64> {
        let key = |e: &Extent| match &e.kind {
            Kind::Sparse(s) => Some((s.grain, s.compressed)),
            _ => None,
        };
        let first = key(self.extents.first()?);
        if self.extents.iter().any(|e| key(e) != first) {
            return None;
        }
        first.map(|k| k.0)
    }
    /// Whether every write is compressed (a stream).
    pub fn compressed(&self) -> bool {
        self.extents
            .iter()
            .any(|e| matches!(&e.kind, Kind::Sparse(s) if s.compressed))
    }
    /// Whether extent `i` is flat (its bytes are the file's).
    pub fn extent_is_flat(&self, i: usize) -> bool {
        self.extents
            .get(i)
            .is_some_and(|e| matches!(e.kind, Kind::Flat(_)))
    }
    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Relaxed)
    }
    /// Switch between read-only and read-write.
    pub fn set_read_only(&self, ro: bool) -> FResult<()> {
        if !ro {
            for e in &self.extents {
                if let Kind::Sparse(s) = &e.kind {
                    if s.version == 3 && !s.compressed {
                        return Err(corrupt(&self.name, "VMDK version 3 must be read only"));
                    }
                }
            }
        }
        self.read_only.store(ro, Ordering::Relaxed);
        Ok(())
    }

    /// `format-specific` extents: (filename, type, virtual size, grain
    /// size for sparse extents, compressed).
    pub fn extent_info(&self) -> Vec<(String, String, u64, Option<u64>, bool)> {
        self.extents
            .iter()
            .map(|e| {
                let (cs, c) = match &e.kind {
                    Kind::Sparse(s) => (Some(s.grain), s.compressed),
                    Kind::Zero => (None, false),
                    Kind::Flat(_) => (None, false),
                };
                let f = e.file.as_ref().map(|f| f.name.clone()).unwrap_or_default();
                (f, e.type_name.clone(), e.len, cs, c)
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_range(&self, off: u64, len: u64) -> FResult<()> {
        crate::mapping::check_range(&self.name, off, len, self.size)
    }

    fn writable(&self) -> FResult<()> {
        crate::mapping::check_writable(&self.name, self.read_only())
    }

    fn io(&self, e: std::io::Error, what: &str) -> FormatError {
        io_err(e, &self.name, what)
    }

    /// Split `[off, off+len)` into (extent, offset in extent, length),
    /// sparse extents further at grain boundaries.
    fn chunks(&self, off: u64, len: u64) -> Vec<(usize, u64, u64)> {
        let mut out = Vec::new();
        let end = off + len;
        let mut pos = off;
        let mut i = self.extents.partition_point(|e| e.start + e.len <= pos);
        while pos < end && i < self.extents.len() {
            let e = &self.extents[i];
            let rel = pos - e.start;
            let mut n = (e.len - rel).min(end - pos);
            if let Kind::Sparse(s) = &e.kind {
                n = n.min(s.grain - rel % s.grain);
            }
            if n == 0 {
                i += 1;
                continue;
            }
            out.push((i, rel, n));
            pos += n;
            if pos >= e.start + e.len {
                i += 1;
            }
        }
        out
    }

    /// The GTE of grain `g` of sparse extent `i`.
    fn gte(&self, st: &mut State, i: usize, g: u64) -> FResult<(Gte, u64)> {
        let e = &self.extents[i];
        let (Kind::Sparse(s), Some(f)) = (&e.kind, &e.file) else {
            return Ok((Gte::Unallocated, 0));
        };
        let l1 = g / s.gtes;
        let Some(&gt) = s.gd.get(l1 as usize) else {
            return Err(corrupt(
                &f.name,
                format_args!("grain {g} is outside the grain directory"),
            ));
        };
        if gt == 0 {
            return Ok((Gte::NoTable, 0));
        }
        let gt_at = gt as u64 * 512;
        let es = &mut st.ext[i];
        if !es.gts.contains_key(&l1) {
            if es.gts.len() >= GT_CACHE {
                es.gts.clear();
            }
            let mut b = vec![0u8; (s.gtes * 4) as usize];
            f.storage
                .read_at(gt_at, &mut b)
                .map_err(|e| io_err(e, &f.name, "Could not read a grain table"))?;
            let t = b
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            es.gts.insert(l1, t);
        }
        let v = es.gts[&l1][(g % s.gtes) as usize];
        let slot = gt_at + (g % s.gtes) * 4;
        Ok((
            match v {
                0 => Gte::Unallocated,
                GTE_ZEROED if s.zero_grain => Gte::Zeroed,
                v => Gte::At(v as u64 * 512),
            },
            slot,
        ))
    }

    /// Set the GTE of grain `g` of extent `i` (and its redundant copy).
    fn set_gte(&self, st: &mut State, i: usize, g: u64, v: u32) -> FResult<()> {
        let e = &self.extents[i];
        let (Kind::Sparse(s), Some(f)) = (&e.kind, &e.file) else {
            return Ok(());
        };
        let l1 = g / s.gtes;
        let idx = g % s.gtes;
        let gt = s.gd[l1 as usize] as u64 * 512;
        let w = |at: u64| {
            f.storage
                .write_at(at + idx * 4, &v.to_le_bytes())
                .map_err(|e| io_err(e, &f.name, "Could not write a grain table entry"))
        };
        w(gt)?;
        if let Some(rgd) = &s.rgd {
            match rgd.get(l1 as usize) {
                Some(&r) if r != 0 => w(r as u64 * 512)?,
                _ => {}
            }
        }
        if let Some(t) = st.ext[i].gts.get_mut(&l1) {
            t[idx as usize] = v;
        }
        Ok(())
    }

    /// Map `[off, off+len)`: (extent, piece) in order; data offsets are
    /// in the extent's file.
    fn map_locked(&self, st: &mut State, off: u64, len: u64) -> FResult<Vec<(usize, Piece)>> {
        let mut out: Vec<(usize, Piece)> = Vec::new();
        for (i, rel, n) in self.chunks(off, len) {
            let e = &self.extents[i];
            let guest = e.start + rel;
            let run = match &e.kind {
                Kind::Flat(at) => Run::Data(at.saturating_add(rel)),
                Kind::Zero => Run::Zero,
                Kind::Sparse(s) => match self.gte(st, i, rel / s.grain)?.0 {
                    Gte::NoTable | Gte::Unallocated => Run::Backing,
                    Gte::Zeroed => Run::Zero,
                    Gte::At(h) if s.compressed => Run::Encoded(h),
                    Gte::At(h) => Run::Data(h.saturating_add(rel % s.grain)),
                },
            };
            let merge = match out.last() {
                Some((j, l)) => {
                    *j == i
                        && l.offset + l.len == guest
                        && match (l.run, run) {
                            (Run::Zero, Run::Zero) | (Run::Backing, Run::Backing) => true,
                            (Run::Data(a), Run::Data(b)) => a.checked_add(l.len) == Some(b),
                            _ => false,
                        }
                }
                None => false,
            };
            if merge {
                if let Some((_, l)) = out.last_mut() {
                    l.len += n;
                }
            } else {
                out.push((
                    i,
                    Piece {
                        offset: guest,
                        len: n,
                        run,
                    },
                ));
            }
        }
        Ok(out)
    }

    /// Read `[off, off+buf.len())` synchronously.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> FResult<()> {
        self.check_range(off, buf.len() as u64)?;
        let pieces = {
            let mut st = self.lock();
            self.map_locked(&mut st, off, buf.len() as u64)?
        };
        for (i, p) in pieces {
            let a = (p.offset - off) as usize;
            let b = &mut buf[a..a + p.len as usize];
            match p.run {
                Run::Data(h) => {
                    let f = self.extents[i]
                        .file
                        .as_ref()
                        .ok_or_else(|| corrupt(&self.name, "data in an extent without a file"))?;
                    f.storage
                        .read_at(h, b)
                        .map_err(|e| io_err(e, &f.name, "read error"))?
                }
                Run::Zero => b.fill(0),
                Run::Backing => match &self.backing {
                    Some(bk) if bk.is_present() => bk
                        .read_at(p.offset, b)
                        .map_err(|e| self.io(e, "Could not read the parent"))?,
                    _ => b.fill(0),
                },
                Run::Encoded(h) => self.read_encoded(h, p.offset, b)?,
            }
        }
        Ok(())
    }

    /// Decompress the grain stored at `at` of extent `i`.
    fn grain_bytes(&self, i: usize, at: u64) -> FResult<Arc<Vec<u8>>> {
        {
            let c = self.last_grain.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((ci, ca, d)) = &*c {
                if *ci == i && *ca == at {
                    return Ok(d.clone());
                }
            }
        }
        let e = &self.extents[i];
        let (Kind::Sparse(s), Some(f)) = (&e.kind, &e.file) else {
            return Err(corrupt(&self.name, "compressed data in a flat extent"));
        };
        let bad = |m: &str| corrupt(&f.name, format_args!("compressed grain at {at}: {m}"));
        let (src_at, n) = if s.markers {
            let mut m = [0u8; header::GRAIN_MARKER];
            f.storage
                .read_at(at, &mut m)
                .map_err(|e| io_err(e, &f.name, "read error"))?;
            let size = u32::from_le_bytes([m[8], m[9], m[10], m[11]]) as u64;
            if size == 0 || size > 2 * s.grain {
                return Err(bad("invalid size"));
            }
            (at + header::GRAIN_MARKER as u64, size)
        } else {
            (at, 2 * s.grain)
        };
        let mut src = vec![0u8; n as usize];
        f.storage
            .read_at(src_at, &mut src)
            .map_err(|e| io_err(e, &f.name, "read error"))?;
        let mut out = vec![0u8; s.grain as usize];
        let mut z = flate2::Decompress::new(true);
        let r = z.decompress(&src, &mut out, flate2::FlushDecompress::Finish);
        match r {
            Ok(flate2::Status::StreamEnd) => {}
            _ => return Err(bad("invalid deflate data")),
        }
        out.truncate(z.total_out() as usize);
        let d = Arc::new(out);
        *self.last_grain.lock().unwrap_or_else(|e| e.into_inner()) = Some((i, at, d.clone()));
        Ok(d)
    }

    /// Write `data` at `off` synchronously (any alignment).
    pub fn write(&self, off: u64, data: &[u8]) -> FResult<()> {
        self.check_range(off, data.len() as u64)?;
        self.writable()?;
        let chunks = self.chunks(off, data.len() as u64);
        let mut st = self.lock();
        while chunks
            .iter()
            .any(|&(i, rel, _)| match &self.extents[i].kind {
                Kind::Sparse(s) => st.ext[i].busy.contains(&(rel / s.grain)),
                _ => false,
            })
        {
            st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        for (i, rel, n) in chunks {
            let e = &self.extents[i];
            let guest = e.start + rel;
            let src = &data[(guest - off) as usize..(guest - off + n) as usize];
            match &e.kind {
                Kind::Zero => {
                    return Err(FormatError::ReadOnly(format!(
                        "{}: a ZERO extent cannot be written",
                        self.name
                    )))
                }
                Kind::Flat(at) => {
                    let f = e
                        .file
                        .as_ref()
                        .ok_or_else(|| corrupt(&self.name, "no file"))?;
                    f.storage
                        .write_at(at.saturating_add(rel), src)
                        .map_err(|er| io_err(er, &f.name, "write error"))?;
                }
                Kind::Sparse(s) => self.write_grain(&mut st, i, s, rel, src)?,
            }
        }
        drop(st);
        self.update_cid()
    }

    /// Write `src` at `rel` of sparse extent `i`, all in one grain.
    fn write_grain(
        &self,
        st: &mut State,
        i: usize,
        s: &Sparse,
        rel: u64,
        src: &[u8],
    ) -> FResult<()> {
        let e = &self.extents[i];
        let Some(f) = &e.file else {
            return Err(corrupt(&self.name, "no file"));
        };
        let g = rel / s.grain;
        let inner = rel % s.grain;
        let (gte, _) = self.gte(st, i, g)?;
        match gte {
            Gte::NoTable => {
                return Err(FormatError::Unsupported(format!(
                    "{}: grain table {} is not allocated; writing there is not supported",
                    f.name,
                    g / s.gtes
                )))
            }
            Gte::At(_) if s.compressed => {
                return Err(FormatError::Io {
                    errno: 5,
                    context: format!(
                        "{}: Could not write to allocated cluster for streamOptimized",
                        f.name
                    ),
                    msg: "Input/output error".into(),
                })
            }
            Gte::At(h) => {
                if h < s.data_start {
                    return Err(corrupt(
                        &f.name,
                        format_args!("grain {g} points into the metadata"),
                    ));
                }
                return f
                    .storage
                    .write_at(h + inner, src)
                    .map_err(|er| io_err(er, &f.name, "write error"));
            }
            Gte::Unallocated | Gte::Zeroed => {}
        }
        // A new grain: the guest's bytes within the parent's (or zeroes).
        let gstart = g * s.grain;
        let glen = s.grain.min(e.len - gstart);
        let mut buf = vec![0u8; s.grain as usize];
        if src.len() as u64 != glen {
            if let (Some(b), Gte::Unallocated) = (&self.backing, gte) {
                if b.is_present() {
                    b.read_at(e.start + gstart, &mut buf[..glen as usize])
                        .map_err(|er| self.io(er, "Could not read the parent"))?;
                }
            }
        }
        buf[inner as usize..inner as usize + src.len()].copy_from_slice(src);
        if s.compressed {
            return self.append_compressed(st, i, s, g, &buf[..glen as usize]);
        }
        let at = st.ext[i].next;
        if at / 512 > u32::MAX as u64 {
            return Err(FormatError::NoSpace(format!(
                "{}: the extent is full",
                f.name
            )));
        }
        st.ext[i].next = at + s.grain;
        let r = f
            .storage
            .write_at(at, &buf)
            .map_err(|er| io_err(er, &f.name, "write error"))
            .and_then(|()| self.set_gte(st, i, g, (at / 512) as u32));
        if r.is_err() && st.ext[i].next == at + s.grain {
            st.ext[i].next = at;
        }
        r
    }

    /// Append grain `g` of extent `i`, compressed, behind its marker.
    fn append_compressed(
        &self,
        st: &mut State,
        i: usize,
        s: &Sparse,
        g: u64,
        data: &[u8],
    ) -> FResult<()> {
        let e = &self.extents[i];
        let Some(f) = &e.file else {
            return Err(corrupt(&self.name, "no file"));
        };
        if !s.markers {
            return Err(FormatError::Unsupported(format!(
                "{}: compressed grains without markers cannot be written",
                f.name
            )));
        }
        let mut z = flate2::write::ZlibEncoder::new(
            Vec::with_capacity(data.len() / 2 + 64),
            flate2::Compression::default(),
        );
        z.write_all(data)
            .map_err(|er| io_err(er, &f.name, "compression failed"))?;
        let comp = z
            .finish()
            .map_err(|er| io_err(er, &f.name, "compression failed"))?;
        let mut rec = Vec::with_capacity(comp.len() + 512 + 1536);
        rec.extend_from_slice(&((e.start + g * s.grain) / 512).to_le_bytes());
        rec.extend_from_slice(&(comp.len() as u32).to_le_bytes());
        rec.extend_from_slice(&comp);
        rec.resize(rec.len().div_ceil(512) * 512, 0);
        let at = st.ext[i].next;
        if at / 512 > u32::MAX as u64 {
            return Err(FormatError::NoSpace(format!(
                "{}: the extent is full",
                f.name
            )));
        }
        let next = at + rec.len() as u64;
        if let Some(foot) = &s.footer {
            rec.extend_from_slice(&header::stream_tail(foot));
        }
        f.storage
            .write_at(at, &rec)
            .map_err(|er| io_err(er, &f.name, "write error"))?;
        st.ext[i].next = next;
        self.set_gte(st, i, g, (at / 512) as u32)
    }

    /// QEMU gives the image a new CID on the first write after open, so
    /// that children made before it see their parent changed.
    fn update_cid(&self) -> FResult<()> {
        if self.cid_updated.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        let flen = file_len(&*self.desc_file, &self.name)?;
        let room = if self.pv.desc_room == 0 {
            flen.saturating_sub(self.pv.desc_offset)
        } else {
            self.pv.desc_room
        };
        let n = room.min(descriptor::MAX_DESC as u64) as usize;
        let mut b = vec![0u8; n];
        self.desc_file
            .read_at(self.pv.desc_offset, &mut b)
            .map_err(|e| self.io(e, "Could not read the descriptor"))?;
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        let text = String::from_utf8_lossy(&b[..end]).into_owned();
        let cid = new_cid();
        let new = descriptor::with_cid(&text, cid);
        if self.pv.desc_room != 0 && new.len() as u64 > self.pv.desc_room {
            return Ok(());
        }
        self.desc_file
            .write_at(self.pv.desc_offset, new.as_bytes())
            .map_err(|e| self.io(e, "Could not write the descriptor"))?;
        if self.pv.desc_room == 0 && new.len() < end {
            self.desc_file
                .set_len(self.pv.desc_offset + new.len() as u64)
                .map_err(|e| self.io(e, "Could not write the descriptor"))?;
        } else if new.len() < end {
            self.desc_file
                .write_zeroes(
                    self.pv.desc_offset + new.len() as u64,
                    (end - new.len()) as u64,
                )
                .map_err(|e| self.io(e, "Could not write the descriptor"))?;
        }
        Ok(())
    }

    /// The status of `[off, off+len)`'s first run (at most `len` bytes).
    pub fn block_status(&self, off: u64, len: u64) -> FResult<Piece> {
        self.block_status_in(off, len).map(|p| p.1)
    }

    /// [`Vmdk::block_status`] with the index of the extent it lies in.
    pub fn block_status_in(&self, off: u64, len: u64) -> FResult<(usize, Piece)> {
        self.check_range(off, len)?;
        // A bounded look-ahead: runs are merged up to 64 MiB.
        let len = len.clamp(1, 64 << 20).min(self.size - off);
        let mut st = self.lock();
        let p = self.map_locked(&mut st, off, len)?;
        p.first()
            .copied()
            .ok_or_else(|| corrupt(&self.name, "empty mapping"))
    }

    /// Make writes durable.
    pub fn flush(&self) -> FResult<()> {
        self.desc_file
            .flush()
            .map_err(|e| self.io(e, "flush error"))?;
        for e in &self.extents {
            if let Some(f) = &e.file {
                f.storage
                    .flush()
                    .map_err(|er| io_err(er, &f.name, "flush error"))?;
            }
        }
        Ok(())
    }

    /// QEMU's check: every allocated grain must start inside its file.
    pub fn check(&self) -> CheckResult {
        let mut r = CheckResult::default();
        let mut st = self.lock();
        for (i, e) in self.extents.iter().enumerate() {
            let (Kind::Sparse(s), Some(f)) = (&e.kind, &e.file) else {
                continue;
            };
            let flen = f.storage.len().unwrap_or(0);
            let grains = e.len.div_ceil(s.grain);
            let mut g = 0;
            while g < grains {
                match self.gte(&mut st, i, g) {
                    Ok((Gte::NoTable, _)) => {
                        g = (g / s.gtes + 1) * s.gtes;
                        continue;
                    }
                    Ok((Gte::At(h), _)) if h >= flen => {
                        r.messages.push(format!(
                            "ERROR: cluster offset for sector {} points after EOF",
                            (e.start + g * s.grain) / 512
                        ));
                        r.corruptions += 1;
                        return r;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        r.messages.push(format!(
                            "ERROR: could not get cluster_offset for sector {}",
                            (e.start + g * s.grain) / 512
                        ));
                        r.corruptions += 1;
                        return r;
                    }
                }
                g += 1;
            }
        }
        r
    }
}

/// A random content ID.
pub fn new_cid() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as u32
}

/// Open the sparse extent in `f`: (bytes, extent).
fn open_sparse(f: &ExtentFile, read_only: bool) -> FResult<(u64, Sparse)> {
    let name = &f.name;
    let file = &*f.storage;
    let flen = file_len(file, name)?;
    let s0 = read_sector(file, name, 0)?;
    if &s0[..4] == header::MAGIC_V3 {
        let h = CowdHeader::parse(&s0);
        let grain = h.granularity as u64 * 512;
        if grain == 0 || grain > MAX_GRAIN {
            return Err(corrupt(name, "Invalid granularity, image may be corrupt"));
        }
        let entries = h.l1dir_size as u64;
        let cap = h.disk_sectors as u64 * 512;
        let gtes = header::COWD_GTES as u64;
        if entries * gtes * grain < cap {
            return Err(corrupt(
                name,
                "the grain directory is too small for the extent",
            ));
        }
        let gd = read_table(file, name, h.l1dir_offset as u64 * 512, entries, flen)?;
        return Ok((
            cap,
            Sparse {
                grain,
                gtes,
                gd,
                rgd: None,
                compressed: false,
                markers: false,
                zero_grain: false,
                version: h.version,
                data_start: 512,
                footer: None,
            },
        ));
    }
    let mut h = SparseHeader::parse(&s0, name)?;
    let mut footer = None;
    if h.gd_offset == header::GD_AT_END {
        let end = flen / 512 * 512;
        if end < 1536 + 512 {
            return Err(corrupt(name, "Invalid footer"));
        }
        let mut t = [0u8; 1536];
        file.read_at(end - 1536, &mut t)
            .map_err(|e| io_err(e, name, "Failed to read footer"))?;
        h = header::parse_stream_tail(&t, name)?;
        footer = Some(h.clone());
    }
    let compressed = h.compressed();
    if h.version > 3 {
        return Err(FormatError::Unsupported(format!(
            "{name}: Unsupported VMDK version {}",
            h.version
        )));
    }
    if h.version == 3 && !read_only && !compressed {
        return Err(corrupt(name, "VMDK version 3 must be read only"));
    }
    if h.num_gtes_per_gt > 512 {
        return Err(corrupt(name, "L2 table size too big"));
    }
    let gtes = h.num_gtes_per_gt as u64;
    if gtes == 0 || h.granularity == 0 {
        return Err(corrupt(name, "L1 entry size is invalid"));
    }
    let grain = h
        .granularity
        .checked_mul(512)
        .filter(|&g| g <= MAX_GRAIN)
        .ok_or_else(|| corrupt(name, "Invalid granularity, image may be corrupt"))?;
    let cap = h
        .capacity
        .checked_mul(512)
        .ok_or_else(|| corrupt(name, "the capacity overflows"))?;
    let entries = cap.div_ceil(grain).div_ceil(gtes);
    if entries > MAX_GD_ENTRIES {
        return Err(corrupt(name, "L1 size too big"));
    }
    let data_start = h.grain_offset.saturating_mul(512);
    if flen / 512 < h.grain_offset {
        return Err(corrupt(
            name,
            format_args!("File truncated, expecting at least {data_start} bytes"),
        ));
    }
    let gd_at = h
        .gd_offset
        .checked_mul(512)
        .ok_or_else(|| corrupt(name, "invalid grain directory offset"))?;
    let gd = read_table(file, name, gd_at, entries, flen)?;
    let rgd = if h.flags & header::FLAG_RGD != 0 && h.rgd_offset != 0 {
        let at = h
            .rgd_offset
            .checked_mul(512)
            .ok_or_else(|| corrupt(name, "invalid grain directory offset"))?;
        Some(read_table(file, name, at, entries, flen)?)
    } else {
        None
    };
    // Every table must lie in the file.
    for &t in gd.iter().chain(rgd.iter().flatten()) {
        if t != 0 && t as u64 * 512 + gtes * 4 > flen {
            return Err(corrupt(name, "a grain table lies past the end of the file"));
        }
    }
    Ok((
        cap,
        Sparse {
            grain,
            gtes,
            gd,
            rgd,
            compressed,
            markers: h.flags & header::FLAG_MARKER != 0,
            zero_grain: h.flags & header::FLAG_ZERO_GRAIN != 0,
            version: h.version,
            data_start: data_start.max(512),
            footer,
        },
    ))
}

/// Read `n` little-endian `u32`s at `at`, which must lie in the file.
fn read_table(file: &dyn Storage, name: &str, at: u64, n: u64, flen: u64) -> FResult<Vec<u32>> {
    let bytes = n * 4;
    if at.checked_add(bytes).is_none_or(|e| e > flen) {
        return Err(corrupt(
            name,
            "the grain directory lies past the end of the file",
        ));
    }
    let mut b = vec![0u8; bytes as usize];
    file.read_at(at, &mut b)
        .map_err(|e| io_err(e, name, "Could not read l1 table"))?;
    Ok(b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

impl GuestMap for Vmdk {
    type Alloc = Alloc;

    fn map_read(&self, off: u64, len: u64) -> FResult<Vec<Piece>> {
        self.check_range(off, len)?;
        let mut st = self.lock();
        Ok(self
            .map_locked(&mut st, off, len)?
            .into_iter()
            .map(|p| p.1)
            .collect())
    }

    fn map_write(&self, off: u64, len: u64) -> FResult<WriteMap> {
        self.check_range(off, len)?;
        self.writable()?;
        if !self.single_file() || !self.cid_updated.load(Ordering::Relaxed) {
            // The first write updates the CID: synchronously.
            return Ok(WriteMap::Allocate);
        }
        let mut st = self.lock();
        let mut runs = Vec::new();
        for (i, rel, n) in self.chunks(off, len) {
            let e = &self.extents[i];
            match &e.kind {
                Kind::Flat(at) => runs.push((e.start + rel, at.saturating_add(rel), n)),
                Kind::Zero => return Ok(WriteMap::Allocate),
                Kind::Sparse(s) => {
                    let g = rel / s.grain;
                    if st.ext[i].busy.contains(&g) {
                        return Ok(WriteMap::Busy);
                    }
                    match self.gte(&mut st, i, g)?.0 {
                        Gte::At(h) if !s.compressed && h >= s.data_start => {
                            runs.push((e.start + rel, h + rel % s.grain, n))
                        }
                        _ => return Ok(WriteMap::Allocate),
                    }
                }
            }
        }
        Ok(WriteMap::InPlace(runs))
    }

    fn plan_alloc(&self, off: u64, len: u64) -> FResult<Plan> {
        self.check_range(off, len)?;
        self.writable()?;
        if !self.single_file() || !self.cid_updated.load(Ordering::Relaxed) {
            return Ok(Plan::Sync);
        }
        let chunks = self.chunks(off, len);
        let mut st = self.lock();
        let mut fresh = Vec::new();
        for &(i, rel, n) in &chunks {
            let e = &self.extents[i];
            let Kind::Sparse(s) = &e.kind else {
                if matches!(e.kind, Kind::Zero) {
                    return Ok(Plan::Sync);
                }
                continue;
            };
            if s.compressed {
                return Ok(Plan::Sync);
            }
            let g = rel / s.grain;
            if st.ext[i].busy.contains(&g) {
                return Ok(Plan::Busy);
            }
            match self.gte(&mut st, i, g)?.0 {
                Gte::At(h) if h >= s.data_start => {}
                Gte::Unallocated => {
                    let glen = s.grain.min(e.len - g * s.grain);
                    let backed = self.backing.as_ref().is_some_and(|b| b.is_present());
                    if backed && n != glen {
                        return Ok(Plan::Sync);
                    }
                    fresh.push((i, rel, n));
                }
                Gte::Zeroed => fresh.push((i, rel, n)),
                _ => return Ok(Plan::Sync),
            }
        }
        let mut zero_first = Vec::new();
        let mut alloc = Alloc { grains: Vec::new() };
        let mut writes = Vec::new();
        for (i, rel, n) in chunks {
            let e = &self.extents[i];
            let guest = e.start + rel;
            match &e.kind {
                Kind::Flat(at) => writes.push((guest, at.saturating_add(rel), n)),
                Kind::Zero => {}
                Kind::Sparse(s) => {
                    let g = rel / s.grain;
                    let inner = rel % s.grain;
                    if fresh.iter().any(|f| f.0 == i && f.1 == rel) {
                        let flen = e
                            .file
                            .as_ref()
                            .and_then(|f| f.storage.len().ok())
                            .unwrap_or(0);
                        let at = st.ext[i].next;
                        if at / 512 > u32::MAX as u64 {
                            for &(j, g, _) in &alloc.grains {
                                st.ext[j].busy.remove(&g);
                            }
                            return Err(FormatError::NoSpace(format!(
                                "{}: the extent is full",
                                self.name
                            )));
                        }
                        st.ext[i].next = at + s.grain;
                        st.ext[i].busy.insert(g);
                        for (a, b) in [(at, at + inner), (at + inner + n, at + s.grain)] {
                            let b = b.min(flen);
                            if a < b {
                                zero_first.push((a, b - a));
                            }
                        }
                        alloc.grains.push((i, g, at));
                        writes.push((guest, at + inner, n));
                    } else {
                        let (Gte::At(h), _) = self.gte(&mut st, i, g)? else {
                            return Err(corrupt(&self.name, "grain vanished"));
                        };
                        writes.push((guest, h + inner, n));
                    }
                }
            }
        }
        Ok(Plan::Ready {
            zero_first,
            writes,
            alloc,
        })
    }

    fn finish_alloc(&self, a: Alloc, ok: bool) -> FResult<()> {
        let mut st = self.lock();
        let mut r = Ok(());
        for &(i, g, at) in &a.grains {
            if ok && r.is_ok() {
                r = self.set_gte(&mut st, i, g, (at / 512) as u32);
            }
            if (!ok || r.is_err()) && self.extents[i].kind_grain() + at == st.ext[i].next {
                st.ext[i].next = at;
            }
            st.ext[i].busy.remove(&g);
        }
        drop(st);
        self.done.notify_all();
        r
    }

    fn read_encoded(&self, at: u64, offset: u64, buf: &mut [u8]) -> FResult<()> {
        let i = self.extents.partition_point(|e| e.start + e.len <= offset);
        let Some(e) = self.extents.get(i) else {
            return Err(corrupt(&self.name, "compressed read past the end"));
        };
        let Kind::Sparse(s) = &e.kind else {
            return Err(corrupt(&self.name, "compressed data in a flat extent"));
        };
        let inner = ((offset - e.start) % s.grain) as usize;
        let d = self.grain_bytes(i, at)?;
        match d.get(inner..inner + buf.len()) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(corrupt(
                &self.name,
                format_args!("compressed grain at {at} is too short"),
            )),
        }
    }
}

impl Extent {
    fn kind_grain(&self) -> u64 {
        match &self.kind {
            Kind::Sparse(s) => s.grain,
            _ => 0,
        }
    }
}
