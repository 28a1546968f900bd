//! Parallels (ploop) disk images, read and write, as QEMU's
//! `docs/interop/parallels.txt` describes them and its `parallels` driver
//! keeps them.
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
//! Writes (QEMU's behaviour): a read-write open sets the in-use mark (and
//! clears it at close); new clusters go at the end of the data area, the
//! rest of each zeroed, their BAT entries written once the data is. A
//! read-write open repairs as QEMU's does: entries whose clusters lie
//! past the end of the file are dropped, and in an image left in use the
//! space after the last cluster is cut. An image with a format extension opens read-only (QEMU 7.2
//! cannot write those either). `create` lays images out as qemu-img does.
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
use crate::mapping::{push_run, GuestMap, Piece, Plan, Run, WriteMap};
use crate::storage::Storage;
use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

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
    file: Arc<dyn Storage>,
    size: u64,
    cluster_size: u64,
    /// Bytes per BAT unit: a sector or a cluster.
    unit: u64,
    /// Where the data area starts: no cluster lies before it.
    data_off: u64,
    /// Whether the in-use mark was set when opened.
    dirty: bool,
    read_only: bool,
    /// The format extension's offset in bytes (0: none).
    ext_offset: u64,
    /// The extension's dirty bitmaps.
    bitmaps: Vec<ExtBitmap>,
    st: Mutex<State>,
    /// Signalled when an allocation has finished.
    done: Condvar,
}

struct State {
    bat: Vec<u32>,
    /// The end of the data area: where the next cluster goes.
    data_end: u64,
    /// Clusters with an allocation in flight.
    busy: HashSet<u64>,
}

/// Clusters planned by [`GuestMap::plan_alloc`]: (index, host offset).
#[derive(Debug)]
pub struct Alloc(Vec<(u64, u64)>);

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
    /// Open the image in `file` (named `name` in errors), read-write
    /// unless `read_only`.
    pub fn open(name: &str, file: Arc<dyn Storage>, read_only: bool) -> FResult<Parallels> {
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
        if ext_offset != 0 && !read_only {
            return Err(FormatError::ReadOnly(format!(
                "{name}: images with a format extension open read-only (use read-only=on)"
            )));
        }
        let bitmaps = if ext_offset != 0 {
            read_extension(name, &*file, ext_offset, cluster_size, sectors, file_len)?
        } else {
            Vec::new()
        };
        // Without data_off ("WithoutFreeSpace" only), the data area
        // starts at the sector after the BAT.
        // A data_off inside the BAT (hostile, or QEMU's "incorrect
        // data_off") is taken as the end of the BAT: no cluster is
        // written over the metadata.
        let bat_end = (HEADER_SIZE + entries * 4).div_ceil(SECTOR) * SECTOR;
        let data_off = (u64::from(le32(&h, 48)) * SECTOR).max(bat_end);
        let unit = if ext { cluster_size } else { SECTOR };
        let mut bat: Vec<u32> = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
        let dirty = le32(&h, 44) == IN_USE;
        if !read_only {
            // Entries whose cluster is not (wholly) in the file (a crash
            // left them, or a hostile image: writes there would grow the
            // file without bound) are dropped and the BAT written back,
            // as QEMU's open repairs them.
            for (i, e) in bat.iter_mut().enumerate() {
                let end = u64::from(*e) * unit + cluster_size;
                if *e != 0 && end > file_len {
                    *e = 0;
                    file.write_at(HEADER_SIZE + i as u64 * 4, &[0; 4])
                        .map_err(|e| FormatError::io(e, format!("{name}: repairing the BAT")))?;
                }
            }
        }
        if !read_only {
            // Two entries sharing host bytes would have one cluster's
            // writes land in the other (QEMU's check copies one away):
            // such an image is not written.
            let mut hosts: Vec<(u64, usize)> = bat
                .iter()
                .enumerate()
                .filter(|(_, &e)| e != 0)
                .map(|(i, &e)| (u64::from(e) * unit, i))
                .collect();
            hosts.sort_unstable();
            if let Some(w) = hosts.windows(2).find(|w| w[0].0 + cluster_size > w[1].0) {
                return Err(FormatError::Corrupt(format!(
                    "{name}: BAT entries {} and {} overlap; repair the image (qemu-img check -r all) before writing to it",
                    w[0].1, w[1].1
                )));
            }
        }
        let data_end = bat
            .iter()
            .filter(|&&e| e != 0)
            .map(|&e| u64::from(e) * unit + cluster_size)
            .fold(data_off, u64::max);
        if dirty && !read_only && file_len > data_end {
            // Space past the last cluster is leaked: cut, as QEMU's
            // repair does.
            file.set_len(data_end)
                .map_err(|e| FormatError::io(e, format!("{name}: repairing the image")))?;
        }
        if !read_only {
            file.write_at(44, &IN_USE.to_le_bytes())
                .and_then(|()| file.flush())
                .map_err(|e| FormatError::io(e, format!("{name}: writing the header")))?;
        }
        Ok(Parallels {
            name: name.to_string(),
            file,
            size,
            cluster_size,
            unit,
            data_off,
            dirty,
            read_only,
            ext_offset,
            bitmaps,
            st: Mutex::new(State {
                bat,
                data_end,
                busy: HashSet::new(),
            }),
            done: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn io(&self, e: std::io::Error, what: &str) -> FormatError {
        FormatError::io(e, format!("{}: {what}", self.name))
    }

    /// Guest size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The host offset of allocated cluster `i` (entry `e`), checked to
    /// lie in the data area: a hostile entry pointing at the header or
    /// the BAT must not have writes land there.
    fn host(&self, i: u64, e: u32) -> FResult<u64> {
        let h = u64::from(e).saturating_mul(self.unit);
        if h < self.data_off || h.checked_add(self.cluster_size).is_none() {
            return Err(FormatError::Corrupt(format!(
                "{}: BAT entry {i} is out of range",
                self.name
            )));
        }
        Ok(h)
    }

    /// The BAT entry of cluster `i` for a write: an image whose BAT is
    /// shorter than its disk has nowhere to record the clusters past it.
    fn entry_for_write(&self, st: &State, i: u64) -> FResult<u32> {
        st.bat.get(i as usize).copied().ok_or_else(|| {
            FormatError::Corrupt(format!(
                "{}: the BAT has no entry for cluster {i} (the image is smaller than its disk size)",
                self.name
            ))
        })
    }

    /// A new cluster at the end of the data area.
    fn take_cluster(&self, st: &mut State) -> FResult<u64> {
        // BAT entries count units (clusters in "WithouFreSpacExt"
        // images): a new cluster starts on one, whatever data_off says.
        let h = st.data_end.div_ceil(self.unit) * self.unit;
        if h / self.unit > u64::from(u32::MAX) {
            return Err(FormatError::Unsupported(format!(
                "{}: the image is full (its BAT cannot address more clusters)",
                self.name
            )));
        }
        st.data_end = h + self.cluster_size;
        Ok(h)
    }

    /// Record the allocations of `a` in the BAT, on disk and in memory.
    fn link(&self, st: &mut State, a: &Alloc) -> FResult<()> {
        for &(i, h) in &a.0 {
            let e = (h / self.unit) as u32;
            self.file
                .write_at(HEADER_SIZE + i * 4, &e.to_le_bytes())
                .map_err(|er| self.io(er, "Could not write the BAT"))?;
            st.bat[i as usize] = e;
        }
        Ok(())
    }

    /// Give back clusters of a failed allocation: the last ones come off
    /// the end of the data area, others stay leaked (as QEMU's check
    /// would count them).
    fn give_back(&self, st: &mut State, a: &Alloc) {
        for &(_, h) in a.0.iter().rev() {
            if st.data_end == h + self.cluster_size {
                st.data_end = h;
            }
        }
    }

    fn chunks(&self, off: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        crate::mapping::block_chunks(off, len, self.cluster_size)
    }

    /// Synchronous read.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> FResult<()> {
        let pieces = self.map_read(off, buf.len() as u64)?;
        crate::mapping::read_pieces(self, &self.name, &*self.file, None, off, &pieces, buf)
    }

    /// Synchronous write: in place, or into new clusters whose other
    /// bytes are zeroed.
    pub fn write(&self, off: u64, data: &[u8]) -> FResult<()> {
        let len = data.len() as u64;
        crate::mapping::check_range(&self.name, off, len, self.size)?;
        crate::mapping::check_writable(&self.name, self.read_only)?;
        let mut st = self.lock();
        while self.chunks(off, len).any(|(i, _, _)| st.busy.contains(&i)) {
            st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let cs = self.cluster_size;
        for (i, inc, n) in self.chunks(off, len) {
            let guest = i * cs + inc;
            let src = &data[(guest - off) as usize..(guest - off + n) as usize];
            let e = self.entry_for_write(&st, i)?;
            if e != 0 {
                let h = self.host(i, e)?;
                self.file
                    .write_at(h + inc, src)
                    .map_err(|er| self.io(er, "write error"))?;
                continue;
            }
            let h = self.take_cluster(&mut st)?;
            let a = Alloc(vec![(i, h)]);
            let r = (|| {
                for (x, y) in [(h, h + inc), (h + inc + n, h + cs)] {
                    if x < y {
                        self.file
                            .write_zeroes(x, y - x)
                            .map_err(|er| self.io(er, "write error"))?;
                    }
                }
                self.file
                    .write_at(h + inc, src)
                    .map_err(|er| self.io(er, "write error"))?;
                self.link(&mut st, &a)
            })();
            if r.is_err() {
                self.give_back(&mut st, &a);
            }
            r?;
        }
        Ok(())
    }

    /// Make writes durable.
    pub fn flush(&self) -> FResult<()> {
        self.file.flush().map_err(|e| self.io(e, "flush error"))
    }

    /// A read-write open ends: clear the in-use mark (QEMU writes 0).
    pub fn close(&self) -> FResult<()> {
        if self.read_only {
            return Ok(());
        }
        self.file
            .write_at(44, &0u32.to_le_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| self.io(e, "writing the header"))
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
    let id = crate::uuid_string(d[8..24].try_into().unwrap_or(&[0; 16]));
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

impl GuestMap for Parallels {
    type Alloc = Alloc;

    fn map_read(&self, offset: u64, len: u64) -> FResult<Vec<Piece>> {
        crate::mapping::check_range(&self.name, offset, len, self.size)?;
        let st = self.lock();
        let bat = &st.bat;
        let mut out = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let i = pos / self.cluster_size;
            let within = pos % self.cluster_size;
            let n = (self.cluster_size - within).min(end - pos);
            // Clusters never written (or past the BAT) are not in this
            // image: a backing file's, as in QEMU, else zeroes.
            let run = match bat.get(i as usize).copied().unwrap_or(0) {
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

    fn map_write(&self, off: u64, len: u64) -> FResult<WriteMap> {
        crate::mapping::check_range(&self.name, off, len, self.size)?;
        crate::mapping::check_writable(&self.name, self.read_only)?;
        let st = self.lock();
        let mut runs = Vec::new();
        for (i, inc, n) in self.chunks(off, len) {
            if st.busy.contains(&i) {
                return Ok(WriteMap::Busy);
            }
            match self.entry_for_write(&st, i)? {
                0 => return Ok(WriteMap::Allocate),
                e => runs.push((i * self.cluster_size + inc, self.host(i, e)? + inc, n)),
            }
        }
        Ok(WriteMap::InPlace(runs))
    }

    fn plan_alloc(&self, off: u64, len: u64) -> FResult<Plan<Alloc>> {
        crate::mapping::check_range(&self.name, off, len, self.size)?;
        crate::mapping::check_writable(&self.name, self.read_only)?;
        let flen = self
            .file
            .len()
            .map_err(|e| self.io(e, "Invalid file size"))?;
        let mut st = self.lock();
        if self.chunks(off, len).any(|(i, _, _)| st.busy.contains(&i)) {
            return Ok(Plan::Busy);
        }
        let cs = self.cluster_size;
        let (mut zero_first, mut writes, mut alloc) = (Vec::new(), Vec::new(), Alloc(Vec::new()));
        for (i, inc, n) in self.chunks(off, len) {
            let entry = match self.entry_for_write(&st, i) {
                Ok(e) => e,
                Err(e) => {
                    self.give_back(&mut st, &alloc);
                    for (j, _) in &alloc.0 {
                        st.busy.remove(j);
                    }
                    return Err(e);
                }
            };
            let base = match entry {
                0 => {
                    let h = match self.take_cluster(&mut st) {
                        Ok(h) => h,
                        Err(e) => {
                            self.give_back(&mut st, &alloc);
                            for (j, _) in &alloc.0 {
                                st.busy.remove(j);
                            }
                            return Err(e);
                        }
                    };
                    // The rest of the cluster reads as zeroes; past the
                    // file's end it already does.
                    for (a, b) in [(h, h + inc), (h + inc + n, h + cs)] {
                        let b = b.min(flen);
                        if a < b {
                            zero_first.push((a, b - a));
                        }
                    }
                    st.busy.insert(i);
                    alloc.0.push((i, h));
                    h
                }
                e => self.host(i, e)?,
            };
            writes.push((i * cs + inc, base + inc, n));
        }
        Ok(Plan::Ready {
            zero_first,
            writes,
            alloc,
        })
    }

    fn finish_alloc(&self, a: Alloc, ok: bool) -> FResult<()> {
        let mut st = self.lock();
        let r = if ok { self.link(&mut st, &a) } else { Ok(()) };
        if !ok || r.is_err() {
            self.give_back(&mut st, &a);
        }
        for (i, _) in &a.0 {
            st.busy.remove(i);
        }
        drop(st);
        self.done.notify_all();
        r
    }
}

/// What to create (qemu-img's `parallels` options).
#[derive(Clone, Copy, Debug)]
pub struct CreateOptions {
    /// Virtual size (rounded up to a sector).
    pub size: u64,
    /// Cluster size (rounded up to a sector; QEMU's default 1 MiB).
    pub cluster_size: u64,
}

/// QEMU's default cluster size.
pub const DEFAULT_CLUSTER_SIZE: u64 = 1 << 20;

/// Check `o` as qemu-img does; the rounded (size, cluster size).
pub fn validate(o: &CreateOptions) -> FResult<(u64, u64)> {
    let size = o.size.div_ceil(SECTOR) * SECTOR;
    let cs = o.cluster_size.div_ceil(SECTOR) * SECTOR;
    if cs > i32::MAX as u64 {
        return Err(FormatError::Invalid("Cluster size is too large".into()));
    }
    // The BAT's 32-bit entries count clusters.
    if cs == 0 || size >= (1u64 << 32).saturating_mul(cs) {
        return Err(FormatError::Invalid(
            "Image size is too large for this cluster size".into(),
        ));
    }
    Ok((size, cs))
}

/// Write a new, empty image into `file` with qemu-img's layout: the
/// "WithouFreSpacExt" header (16 heads, 32 sectors a track for the
/// cylinder count), the BAT, and the data area starting at the next
/// cluster boundary, where the file ends.
pub fn create(file: &dyn Storage, o: &CreateOptions) -> FResult<()> {
    let (size, cs) = validate(o)?;
    let sectors = size / SECTOR;
    let entries = size.div_ceil(cs);
    let data_off = (HEADER_SIZE + entries * 4).div_ceil(cs) * cs;
    let mut h = vec![0u8; HEADER_SIZE as usize];
    h[..16].copy_from_slice(MAGIC_EXT);
    h[16..20].copy_from_slice(&VERSION.to_le_bytes());
    h[20..24].copy_from_slice(&16u32.to_le_bytes());
    h[24..28].copy_from_slice(&((sectors / (16 * 32)) as u32).to_le_bytes());
    h[28..32].copy_from_slice(&((cs / SECTOR) as u32).to_le_bytes());
    h[32..36].copy_from_slice(&(entries as u32).to_le_bytes());
    h[36..44].copy_from_slice(&sectors.to_le_bytes());
    h[48..52].copy_from_slice(&((data_off / SECTOR) as u32).to_le_bytes());
    let io = |e| FormatError::io(e, "Could not write the parallels image");
    file.set_len(data_off).map_err(io)?;
    file.write_at(0, &h).map_err(io)?;
    file.flush().map_err(io)
}

/// The hostile-image harness behind the `parallels_open` fuzz target:
/// read-only opens (extension bitmaps loaded, reads), then read-write
/// ones (repair of an image left in use, writes in place and allocating,
/// synchronous and planned, close and reopen), on size-limited memory.
pub fn fuzz_open(data: &[u8]) {
    const NAME: &str = "hostile.parallels";
    let named = |r| crate::error::named(NAME, r);
    let limit = (data.len() as u64).max(1 << 20) * 4 + (8 << 20);
    for ro in [true, false] {
        let f = Arc::new(crate::storage::MemStorage::new(data.to_vec(), limit));
        let Some(img) = crate::error::named(NAME, Parallels::open(NAME, f.clone(), ro)) else {
            continue;
        };
        for b in img.bitmaps() {
            let _ = img.load_bitmap(&*f, b);
        }
        let window = img.size().min(4 << 20);
        let mut buf = vec![0u8; window as usize];
        named(img.read(0, &mut buf));
        if ro || img.size() == 0 {
            continue;
        }
        crate::mapping::fuzz_write_phase(
            &img,
            &*f,
            img.size(),
            NAME,
            |o, d| img.write(o, d),
            |o, b| img.read(o, b),
        );
        named(img.close());
        drop(img);
        let again = Arc::new(crate::storage::MemStorage::new(f.contents(), limit));
        if let Some(img) = crate::error::named(NAME, Parallels::open(NAME, again, true)) {
            named(img.read(0, &mut buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn both_bat_units_map_and_take_writes() {
        for magic in [MAGIC, MAGIC_EXT] {
            let data = image(magic);
            assert_eq!(probe(&data), 100);
            let f = Arc::new(MemStorage::new(data, 1 << 20));
            let img = Parallels::open("t", f.clone(), false).unwrap();
            assert_eq!(img.size(), 256 * 1024);
            let mut buf = vec![1u8; 256 * 1024];
            img.read(0, &mut buf).unwrap();
            assert!(buf[..65536].iter().all(|&b| b == 0));
            assert!(buf[65536..131072].iter().all(|&b| b == 0x5a));
            assert!(buf[131072..].iter().all(|&b| b == 0));
            // In place, and into a new cluster (the rest of it zeroes).
            img.write(65536 + 100, &[7; 100]).unwrap();
            img.write(200_000, &[9; 1000]).unwrap();
            img.close().unwrap();
            let img = Parallels::open("t", f.clone(), true).unwrap();
            img.read(0, &mut buf).unwrap();
            assert!(buf[65636..65736].iter().all(|&b| b == 7));
            assert!(buf[200_000..201_000].iter().all(|&b| b == 9));
            assert!(buf[196_608..200_000].iter().all(|&b| b == 0));
            assert!(!img.is_dirty(), "closed cleanly");
        }
    }

    #[test]
    fn an_image_left_in_use_drops_clusters_past_the_file() {
        let mut v = image(MAGIC_EXT);
        v[44..48].copy_from_slice(&IN_USE.to_le_bytes());
        v[64 + 8..64 + 12].copy_from_slice(&9u32.to_le_bytes());
        let f = Arc::new(MemStorage::new(v, 1 << 20));
        let img = Parallels::open("t", f.clone(), false).unwrap();
        let mut buf = vec![1u8; 65536];
        img.read(131072, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        // The next cluster goes right after the last one in the file.
        img.write(131072, &[3; 512]).unwrap();
        let mut e = [0u8; 4];
        f.read_at(64 + 8, &mut e).unwrap();
        assert_eq!(u32::from_le_bytes(e), 2);
    }

    #[test]
    fn hostile_headers_are_refused() {
        let mut v = image(MAGIC_EXT);
        v[28..32].copy_from_slice(&0u32.to_le_bytes());
        assert!(Parallels::open("t", Arc::new(MemStorage::new(v, 1 << 20)), true).is_err());
        let mut v = image(MAGIC_EXT);
        v[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Parallels::open("t", Arc::new(MemStorage::new(v, 1 << 20)), true).is_err());
        // An entry below the data area (here: the data area moved past
        // cluster 1) takes no write: it would land in the metadata.
        let mut below = image(MAGIC_EXT);
        below[48..52].copy_from_slice(&256u32.to_le_bytes());
        let f = Arc::new(MemStorage::new(below, 1 << 20));
        let img = Parallels::open("t", f, false).unwrap();
        let e = img.write(65536, &[1; 512]).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
    }

    #[test]
    fn create_lays_out_what_qemu_img_does() {
        let f = MemStorage::new(Vec::new(), 1 << 30);
        create(
            &f,
            &CreateOptions {
                size: 10 << 20,
                cluster_size: DEFAULT_CLUSTER_SIZE,
            },
        )
        .unwrap();
        let v = f.contents();
        assert_eq!(v.len(), 1 << 20);
        assert_eq!(&v[..16], MAGIC_EXT);
        assert_eq!(le32(&v, 24), 40);
        assert_eq!(le32(&v, 28), 2048);
        assert_eq!(le32(&v, 32), 10);
        assert_eq!(le32(&v, 48), 2048);
        assert!(validate(&CreateOptions {
            size: 100 << 40,
            cluster_size: 4096
        })
        .is_err());
    }
}
