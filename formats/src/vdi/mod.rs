//! VirtualBox VDI images (QEMU's `vdi`), after VirtualBox's VDI layout
//! (`src/VBox/Storage/VDICore.h`: the pre-header, header version 1.1 and
//! the block map):
//!
//! - `0x000` pre-header: 64 bytes of free text, the signature
//!   `0xbeda107f`, the version (1.1 = `0x00010001`);
//! - `0x048` header 1.1: header size, image type (1 dynamic, 2 static),
//!   flags, a 256-byte description, the offsets of the block map and of
//!   the data, the legacy geometry, the sector size, the disk size, the
//!   block size and the extra bytes before each block, blocks in the
//!   image and allocated, and four UUIDs (image, last snapshot, link,
//!   parent);
//! - the block map: one little-endian `u32` per block, the index of its
//!   data block, or [`FREE`] (never written: reads as zeroes here) or
//!   [`ZERO`] (discarded: reads as zeroes);
//! - data blocks of `block_size` bytes from the data offset.
//!
//! As in QEMU, images with a parent or link UUID (VirtualBox's
//! differencing images), extra bytes per block, or a block size other
//! than 1 MiB are refused by name.
//!
//! A new block takes the next index (the header's allocated count, or
//! past the highest index in the map if that is larger: an image whose
//! count is stale never gets a block written over another), zeroed except
//! where the guest writes; then the header's count and the block map
//! sector are written. Hostile images: the block map must lie in the
//! file and is capped by QEMU's limit; map entries that point past the
//! image's blocks fail the requests that reach them; an image whose map
//! names a block twice or whose map overlaps the data opens read-only
//! only, so no write lands on another block or on metadata.

pub mod fuzz;

use crate::error::{FResult, FormatError};
pub use crate::mapping::{GuestMap, Piece, Run, WriteMap};
use crate::storage::Storage;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

pub use fuzz::fuzz_open_read;

/// The header signature.
pub const SIGNATURE: u32 = 0xbeda_107f;
/// Header version 1.1.
pub const VERSION_1_1: u32 = 0x0001_0001;
/// Image type: blocks allocated on demand.
pub const TYPE_DYNAMIC: u32 = 1;
/// Image type: every block preallocated.
pub const TYPE_STATIC: u32 = 2;
/// A block map entry for a block never written.
pub const FREE: u32 = 0xffff_ffff;
/// A block map entry for a discarded block (reads as zeroes).
pub const ZERO: u32 = 0xffff_fffe;
/// The only block size accepted (QEMU's too).
pub const BLOCK_SIZE: u32 = 1 << 20;
/// Most blocks an image may have: the block map, rounded up to a
/// sector, stays below 2 GiB (QEMU's `VDI_BLOCKS_IN_IMAGE_MAX`).
pub const MAX_BLOCKS: u32 = ((1u64 << 31) - 512) as u32 / 4;
/// The largest disk size.
pub const MAX_DISK_SIZE: u64 = MAX_BLOCKS as u64 * BLOCK_SIZE as u64;
/// The header's bytes (pre-header and header 1.1, padded to a sector).
pub const HEADER_BYTES: usize = 512;
/// Offset of the allocated-block count in the header.
const ALLOCATED_AT: u64 = 0x184;

/// Whether a block map entry names a data block.
pub fn is_allocated(e: u32) -> bool {
    e < ZERO
}

/// The fields of the header that matter here (the rest is kept as it is
/// on disk).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The pre-header's text.
    pub text: String,
    /// Signature.
    pub signature: u32,
    /// Version.
    pub version: u32,
    /// Size of the header after the pre-header.
    pub header_size: u32,
    /// [`TYPE_DYNAMIC`] or [`TYPE_STATIC`].
    pub image_type: u32,
    /// Flags.
    pub image_flags: u32,
    /// Offset of the block map.
    pub offset_bmap: u32,
    /// Offset of data block 0.
    pub offset_data: u32,
    /// Sector size.
    pub sector_size: u32,
    /// Virtual size in bytes.
    pub disk_size: u64,
    /// Bytes per block.
    pub block_size: u32,
    /// Bytes before each block's data.
    pub block_extra: u32,
    /// Entries in the block map.
    pub blocks_in_image: u32,
    /// Blocks allocated.
    pub blocks_allocated: u32,
    /// The image's UUID.
    pub uuid_image: [u8; 16],
    /// The last snapshot's UUID.
    pub uuid_last_snap: [u8; 16],
    /// Link UUID (differencing images).
    pub uuid_link: [u8; 16],
    /// Parent UUID (differencing images).
    pub uuid_parent: [u8; 16],
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

impl Header {
    /// Parse the first 512 bytes of a file (no checks).
    pub fn parse(b: &[u8; HEADER_BYTES]) -> Header {
        let uuid = |o: usize| -> [u8; 16] { b[o..o + 16].try_into().unwrap_or([0; 16]) };
        let text_end = b[..64].iter().position(|&c| c == 0).unwrap_or(64);
        Header {
            text: String::from_utf8_lossy(&b[..text_end]).into_owned(),
            signature: le32(b, 0x40),
            version: le32(b, 0x44),
            header_size: le32(b, 0x48),
            image_type: le32(b, 0x4c),
            image_flags: le32(b, 0x50),
            offset_bmap: le32(b, 0x154),
            offset_data: le32(b, 0x158),
            sector_size: le32(b, 0x168),
            disk_size: le32(b, 0x170) as u64 | (le32(b, 0x174) as u64) << 32,
            block_size: le32(b, 0x178),
            block_extra: le32(b, 0x17c),
            blocks_in_image: le32(b, 0x180),
            blocks_allocated: le32(b, 0x184),
            uuid_image: uuid(0x188),
            uuid_last_snap: uuid(0x198),
            uuid_link: uuid(0x1a8),
            uuid_parent: uuid(0x1b8),
        }
    }

    /// The 512 bytes of a new image's header.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        let t = self.text.as_bytes();
        b[..t.len().min(63)].copy_from_slice(&t[..t.len().min(63)]);
        let mut put = |o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_le_bytes());
        put(0x40, self.signature);
        put(0x44, self.version);
        put(0x48, self.header_size);
        put(0x4c, self.image_type);
        put(0x50, self.image_flags);
        put(0x154, self.offset_bmap);
        put(0x158, self.offset_data);
        put(0x168, self.sector_size);
        put(0x170, self.disk_size as u32);
        put(0x174, (self.disk_size >> 32) as u32);
        put(0x178, self.block_size);
        put(0x17c, self.block_extra);
        put(0x180, self.blocks_in_image);
        put(0x184, self.blocks_allocated);
        b[0x188..0x198].copy_from_slice(&self.uuid_image);
        b[0x198..0x1a8].copy_from_slice(&self.uuid_last_snap);
        b[0x1a8..0x1b8].copy_from_slice(&self.uuid_link);
        b[0x1b8..0x1c8].copy_from_slice(&self.uuid_parent);
        b
    }

    /// QEMU's checks, with its messages (after `name: `).
    fn validate(&self, name: &str) -> FResult<()> {
        let uns = |m: String| Err(FormatError::Unsupported(format!("{name}: {m}")));
        if self.disk_size > MAX_DISK_SIZE {
            return uns(format!(
                "Unsupported VDI image size (size is {:#x}, max supported is {:#x})",
                self.disk_size, MAX_DISK_SIZE
            ));
        }
        if self.signature != SIGNATURE {
            return Err(FormatError::Corrupt(format!(
                "{name}: Image not in VDI format (bad signature {:08x})",
                self.signature
            )));
        }
        if self.version != VERSION_1_1 {
            return uns(format!(
                "unsupported VDI image (version {}.{})",
                self.version >> 16,
                self.version & 0xffff
            ));
        }
        if !self.offset_bmap.is_multiple_of(512) {
            return uns(format!(
                "unsupported VDI image (unaligned block map offset {:#x})",
                self.offset_bmap
            ));
        }
        if !self.offset_data.is_multiple_of(512) {
            return uns(format!(
                "unsupported VDI image (unaligned data offset {:#x})",
                self.offset_data
            ));
        }
        if self.sector_size != 512 {
            return uns(format!(
                "unsupported VDI image (sector size {} is not 512)",
                self.sector_size
            ));
        }
        if self.block_size != BLOCK_SIZE {
            return uns(format!(
                "unsupported VDI image (block size {} is not {BLOCK_SIZE})",
                self.block_size
            ));
        }
        let room = self.blocks_in_image as u64 * self.block_size as u64;
        if self.disk_size.div_ceil(512) * 512 > room {
            return uns(format!(
                "unsupported VDI image (disk size {}, image bitmap has room for {room})",
                self.disk_size
            ));
        }
        if self.uuid_link != [0; 16] {
            return uns("unsupported VDI image (non-NULL link UUID)".into());
        }
        if self.uuid_parent != [0; 16] {
            return uns("unsupported VDI image (non-NULL parent UUID)".into());
        }
        if self.blocks_in_image > MAX_BLOCKS {
            return uns(format!(
                "unsupported VDI image (too many blocks {}, max is {MAX_BLOCKS})",
                self.blocks_in_image
            ));
        }
        if self.block_extra != 0 {
            return uns(format!(
                "unsupported VDI image ({} extra bytes per block)",
                self.block_extra
            ));
        }
        Ok(())
    }
}

/// Read and check the header of `file`.
pub fn read_header(file: &dyn Storage, name: &str) -> FResult<Header> {
    let flen = file
        .len()
        .map_err(|e| FormatError::io(e, format!("{name}: Invalid file size")))?;
    if flen < HEADER_BYTES as u64 {
        return Err(FormatError::Corrupt(format!(
            "{name}: File too small for a VDI header"
        )));
    }
    let mut b = [0u8; HEADER_BYTES];
    file.read_at(0, &mut b)
        .map_err(|e| FormatError::io(e, format!("{name}: Could not read the VDI header")))?;
    let h = Header::parse(&b);
    h.validate(name)?;
    Ok(h)
}

/// New blocks of a planned write: (block, data block index).
#[derive(Debug)]
pub struct Alloc(Vec<(u32, u32)>);

/// A planned allocating write of this format.
pub type Plan = crate::mapping::Plan<Alloc>;

struct State {
    bmap: Vec<u32>,
    /// The index the next new block takes.
    next: u32,
    busy: HashSet<u32>,
}

/// An open VDI image.
pub struct Vdi {
    name: String,
    file: Arc<dyn Storage>,
    header: Header,
    size: u64,
    read_only: AtomicBool,
    /// Why the image may only be read, if so.
    unsafe_to_write: Option<String>,
    st: Mutex<State>,
    done: Condvar,
}

impl Vdi {
    /// Open the image in `file`, named `name` in errors.
    pub fn open(name: &str, file: Arc<dyn Storage>, read_only: bool) -> FResult<Vdi> {
        let h = read_header(&*file, name)?;
        let flen = file
            .len()
            .map_err(|e| FormatError::io(e, format!("{name}: Invalid file size")))?;
        let blocks = h.blocks_in_image as u64;
        let bmap_end = h.offset_bmap as u64 + blocks * 4;
        if bmap_end > flen {
            return Err(FormatError::Corrupt(format!(
                "{name}: the block map lies past the end of the file"
            )));
        }
        let mut raw = vec![0u8; (blocks * 4) as usize];
        file.read_at(h.offset_bmap as u64, &mut raw)
            .map_err(|e| FormatError::io(e, format!("{name}: Could not read the block map")))?;
        let bmap: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        drop(raw);
        let mut unsafe_to_write = None;
        if (h.offset_bmap as u64) < HEADER_BYTES as u64 || (h.offset_data as u64) < bmap_end {
            unsafe_to_write = Some(format!(
                "{name}: the block map overlaps the header or the data; the image can only be opened read-only"
            ));
        }
        let mut seen = vec![0u64; blocks.div_ceil(64) as usize];
        let mut top = 0u32;
        for &e in bmap
            .iter()
            .filter(|&&e| is_allocated(e) && (e as u64) < blocks)
        {
            let (w, b) = ((e / 64) as usize, e % 64);
            if seen[w] & (1 << b) != 0 && unsafe_to_write.is_none() {
                unsafe_to_write = Some(format!(
                    "{name}: the block map names data block {e} twice; the image can only be opened read-only"
                ));
            }
            seen[w] |= 1 << b;
            top = top.max(e + 1);
        }
        drop(seen);
        // Data written where the file is not: a data area starting past
        // the file's end, or allocated blocks that begin past it (a
        // truncated or forged image), would send writes far beyond the
        // file; such images are only read.
        let bs = u64::from(h.block_size);
        let data_end = u64::from(h.offset_data) + u64::from(top.saturating_sub(1)) * bs;
        if unsafe_to_write.is_none()
            && (u64::from(h.offset_data) > flen || (top > 0 && data_end > flen))
        {
            unsafe_to_write = Some(format!(
                "{name}: the data area lies past the end of the file; the image can only be opened read-only"
            ));
        }
        if let (false, Some(m)) = (read_only, &unsafe_to_write) {
            return Err(FormatError::Corrupt(m.clone()));
        }
        let next = h.blocks_allocated.max(top);
        Ok(Vdi {
            name: name.to_string(),
            file,
            size: h.disk_size.div_ceil(512) * 512,
            header: h,
            read_only: AtomicBool::new(read_only),
            unsafe_to_write,
            st: Mutex::new(State {
                bmap,
                next,
                busy: HashSet::new(),
            }),
            done: Condvar::new(),
        })
    }

    /// The virtual size.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// The header as read at open.
    pub fn header(&self) -> &Header {
        &self.header
    }
    /// Bytes per block.
    pub fn block_size(&self) -> u64 {
        self.header.block_size as u64
    }
    /// Whether every block was preallocated.
    pub fn is_static(&self) -> bool {
        self.header.image_type == TYPE_STATIC
    }
    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Relaxed)
    }
    /// Switch between read-only and read-write.
    pub fn set_read_only(&self, ro: bool) -> FResult<()> {
        if let (false, Some(m)) = (ro, &self.unsafe_to_write) {
            return Err(FormatError::Corrupt(m.clone()));
        }
        self.read_only.store(ro, Ordering::Relaxed);
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn io(&self, e: std::io::Error, what: &str) -> FormatError {
        FormatError::io(e, format!("{}: {what}", self.name))
    }

    fn check_range(&self, off: u64, len: u64) -> FResult<()> {
        crate::mapping::check_range(&self.name, off, len, self.size)
    }

    fn writable(&self) -> FResult<()> {
        crate::mapping::check_writable(&self.name, self.read_only())
    }

    fn chunks(&self, off: u64, len: u64) -> impl Iterator<Item = (u32, u64, u64)> {
        crate::mapping::block_chunks(off, len, self.block_size()).map(|(b, i, n)| (b as u32, i, n))
    }

    /// Host offset of data block `e`, which must exist.
    fn host(&self, block: u32, e: u32) -> FResult<u64> {
        if e >= self.header.blocks_in_image {
            return Err(FormatError::Corrupt(format!(
                "{}: block {block} maps to data block {e}, past the image's {} blocks",
                self.name, self.header.blocks_in_image
            )));
        }
        Ok(self.header.offset_data as u64 + e as u64 * self.block_size())
    }

    fn take_index(&self, st: &mut State) -> FResult<u32> {
        if st.next >= self.header.blocks_in_image {
            return Err(FormatError::NoSpace(format!(
                "{}: every data block of the image is in use",
                self.name
            )));
        }
        st.next += 1;
        Ok(st.next - 1)
    }

    fn give_back(&self, st: &mut State, a: &Alloc) {
        for &(i, idx) in a.0.iter().rev() {
            if idx + 1 == st.next {
                st.next = idx;
            }
            st.busy.remove(&i);
        }
    }

    /// The header's count first (a crash then leaves a counted block no
    /// entry names, never an entry the count would let a later writer
    /// reuse), then the block map sectors of the new entries.
    fn link(&self, st: &mut State, a: &Alloc) -> FResult<()> {
        if a.0.is_empty() {
            return Ok(());
        }
        self.file
            .write_at(ALLOCATED_AT, &st.next.to_le_bytes())
            .map_err(|e| self.io(e, "Error writing the header"))?;
        for &(i, idx) in &a.0 {
            st.bmap[i as usize] = idx;
        }
        let mut sectors: Vec<u64> = a.0.iter().map(|(i, _)| *i as u64 / 128).collect();
        sectors.dedup();
        for s in sectors {
            let first = (s * 128) as usize;
            let last = (first + 128).min(st.bmap.len());
            let bytes: Vec<u8> = st.bmap[first..last]
                .iter()
                .flat_map(|e| e.to_le_bytes())
                .collect();
            self.file
                .write_at(self.header.offset_bmap as u64 + s * 512, &bytes)
                .map_err(|e| self.io(e, "Error writing the block map"))?;
        }
        Ok(())
    }

    /// Read `[off, off+buf.len())` synchronously.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> FResult<()> {
        let pieces = self.map_read(off, buf.len() as u64)?;
        crate::mapping::read_pieces(self, &self.name, &*self.file, None, off, &pieces, buf)
    }

    /// Write `data` at `off` synchronously.
    pub fn write(&self, off: u64, data: &[u8]) -> FResult<()> {
        let len = data.len() as u64;
        self.check_range(off, len)?;
        self.writable()?;
        let mut st = self.lock();
        while self.chunks(off, len).any(|(i, _, _)| st.busy.contains(&i)) {
            st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let flen = self
            .file
            .len()
            .map_err(|e| self.io(e, "Invalid file size"))?;
        let bs = self.block_size();
        for (i, inb, n) in self.chunks(off, len) {
            let guest = i as u64 * bs + inb;
            let src = &data[(guest - off) as usize..(guest - off + n) as usize];
            let e = st.bmap[i as usize];
            if is_allocated(e) {
                let h = self.host(i, e)?;
                self.file
                    .write_at(h + inb, src)
                    .map_err(|e| self.io(e, "write error"))?;
                continue;
            }
            let idx = self.take_index(&mut st)?;
            let a = Alloc(vec![(i, idx)]);
            let base = self.header.offset_data as u64 + idx as u64 * bs;
            let r = (|| {
                for (x, y) in [(base, base + inb), (base + inb + n, base + bs)] {
                    let y = y.min(flen);
                    if x < y {
                        self.file
                            .write_zeroes(x, y - x)
                            .map_err(|e| self.io(e, "write error"))?;
                    }
                }
                self.file
                    .write_at(base + inb, src)
                    .map_err(|e| self.io(e, "write error"))?;
                self.link(&mut st, &a)
            })();
            if r.is_err() && !is_allocated(st.bmap[i as usize]) {
                self.give_back(&mut st, &a);
            }
            r?;
        }
        Ok(())
    }

    /// The status of the first run of `[off, off+len)`.
    pub fn block_status(&self, off: u64, len: u64) -> FResult<Piece> {
        self.check_range(off, len)?;
        let st = self.lock();
        let bs = self.block_size();
        let (i, inb) = ((off / bs) as u32, off % bs);
        let e = st.bmap[i as usize];
        let first = (bs - inb).min(len);
        if is_allocated(e) {
            return Ok(Piece {
                offset: off,
                len: first,
                run: Run::Data(self.host(i, e)? + inb),
            });
        }
        let mut n = first;
        let mut j = i as usize + 1;
        while n < len && !is_allocated(st.bmap[j]) {
            n = (n + bs).min(len);
            j += 1;
        }
        Ok(Piece {
            offset: off,
            len: n,
            run: Run::Zero,
        })
    }

    /// Make writes durable.
    pub fn flush(&self) -> FResult<()> {
        self.file.flush().map_err(|e| self.io(e, "flush error"))
    }

    /// QEMU's consistency check: each entry names a block inside the
    /// image and no block twice, and the header counts them right.
    pub fn check(&self) -> crate::check::CheckResult {
        let st = self.lock();
        let blocks = self.header.blocks_in_image;
        // Only corruptions and their messages: vdi counts nothing else.
        let mut r = crate::check::CheckResult::default();
        let mut owner: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
        let mut allocated = 0u32;
        for (i, &e) in st.bmap.iter().enumerate() {
            if !is_allocated(e) {
                continue;
            }
            if e < blocks {
                allocated += 1;
                if let Some(first) = owner.insert(e, i as u32) {
                    r.messages
                        .push(format!("ERROR: block index {first} also used by {i}"));
                    r.corruptions += 1;
                }
            } else {
                r.messages
                    .push(format!("ERROR: block index {i} too large, is {e}"));
                r.corruptions += 1;
            }
        }
        // The count on disk, which allocations since open have changed.
        let mut b = [0u8; 4];
        let on_disk = match self.file.read_at(ALLOCATED_AT, &mut b) {
            Ok(()) => u32::from_le_bytes(b),
            Err(_) => self.header.blocks_allocated,
        };
        if allocated != on_disk {
            r.messages.push(format!(
                "ERROR: allocated blocks mismatch, is {allocated}, should be {on_disk}"
            ));
            r.corruptions += 1;
        }
        r
    }
}

impl GuestMap for Vdi {
    type Alloc = Alloc;

    /// Map `[off, off+len)` for reading.
    fn map_read(&self, off: u64, len: u64) -> FResult<Vec<Piece>> {
        self.check_range(off, len)?;
        let st = self.lock();
        let mut out: Vec<Piece> = Vec::new();
        for (i, inb, n) in self.chunks(off, len) {
            let e = st.bmap[i as usize];
            let guest = i as u64 * self.block_size() + inb;
            let run = if is_allocated(e) {
                Run::Data(self.host(i, e)? + inb)
            } else {
                Run::Zero
            };
            crate::mapping::push_run(&mut out, guest, n, run);
        }
        Ok(out)
    }

    /// Map a write of `[off, off+len)` that allocates nothing.
    fn map_write(&self, off: u64, len: u64) -> FResult<WriteMap> {
        self.check_range(off, len)?;
        self.writable()?;
        let st = self.lock();
        let mut runs = Vec::new();
        for (i, inb, n) in self.chunks(off, len) {
            if st.busy.contains(&i) {
                return Ok(WriteMap::Busy);
            }
            let e = st.bmap[i as usize];
            if !is_allocated(e) {
                return Ok(WriteMap::Allocate);
            }
            runs.push((
                i as u64 * self.block_size() + inb,
                self.host(i, e)? + inb,
                n,
            ));
        }
        Ok(WriteMap::InPlace(runs))
    }

    /// Plan a write of `[off, off+len)` that allocates blocks.
    fn plan_alloc(&self, off: u64, len: u64) -> FResult<Plan> {
        self.check_range(off, len)?;
        self.writable()?;
        let flen = self
            .file
            .len()
            .map_err(|e| self.io(e, "Invalid file size"))?;
        let mut st = self.lock();
        if self.chunks(off, len).any(|(i, _, _)| st.busy.contains(&i)) {
            return Ok(Plan::Busy);
        }
        let bs = self.block_size();
        let (mut zero_first, mut writes, mut alloc) = (Vec::new(), Vec::new(), Alloc(Vec::new()));
        for (i, inb, n) in self.chunks(off, len) {
            let guest = i as u64 * bs + inb;
            let e = st.bmap[i as usize];
            let base = if is_allocated(e) {
                self.host(i, e)?
            } else {
                let idx = match self.take_index(&mut st) {
                    Ok(x) => x,
                    Err(err) => {
                        self.give_back(&mut st, &alloc);
                        return Err(err);
                    }
                };
                let base = self.header.offset_data as u64 + idx as u64 * bs;
                // The rest of the block must read as zeroes; past the
                // file's end it already does.
                for (a, b) in [(base, base + inb), (base + inb + n, base + bs)] {
                    let b = b.min(flen);
                    if a < b {
                        zero_first.push((a, b - a));
                    }
                }
                st.busy.insert(i);
                alloc.0.push((i, idx));
                base
            };
            writes.push((guest, base + inb, n));
        }
        Ok(Plan::Ready {
            zero_first,
            writes,
            alloc,
        })
    }

    /// Link what `a` allocated once its data is written (`ok`), or give
    /// the blocks back.
    fn finish_alloc(&self, a: Alloc, ok: bool) -> FResult<()> {
        let mut st = self.lock();
        let r = if ok { self.link(&mut st, &a) } else { Ok(()) };
        if !ok || r.is_err() {
            let keep: Vec<(u32, u32)> =
                a.0.iter()
                    .copied()
                    .filter(|(i, _)| !is_allocated(st.bmap[*i as usize]))
                    .collect();
            self.give_back(&mut st, &Alloc(keep));
        }
        for (i, _) in &a.0 {
            st.busy.remove(i);
        }
        drop(st);
        self.done.notify_all();
        r
    }
}

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size (rounded up to a sector).
    pub size: u64,
    /// Preallocate every block (`static=on`).
    pub is_static: bool,
    /// The image's UUID and its last snapshot's.
    pub uuids: ([u8; 16], [u8; 16]),
}

/// Check `o` as qemu-img does before creating anything.
pub fn validate(o: &CreateOptions) -> FResult<()> {
    let size = o.size.div_ceil(512) * 512;
    if size > MAX_DISK_SIZE {
        return Err(FormatError::Unsupported(format!(
            "Unsupported VDI image size (size is {size:#x}, max supported is {MAX_DISK_SIZE:#x})"
        )));
    }
    Ok(())
}

/// Write a new image into the empty `file`.
pub fn create(file: &dyn Storage, o: &CreateOptions) -> FResult<()> {
    validate(o)?;
    let io = |e: std::io::Error| FormatError::io(e, "Error writing the VDI image");
    let size = o.size.div_ceil(512) * 512;
    let blocks = size.div_ceil(BLOCK_SIZE as u64) as u32;
    let bmap_bytes = (blocks as u64 * 4).div_ceil(512) * 512;
    let h = Header {
        // Free text; VirtualBox's own images say which product made them.
        text: "<<< Strata Virtual Disk Image >>>\n".into(),
        signature: SIGNATURE,
        version: VERSION_1_1,
        header_size: 0x180,
        image_type: if o.is_static {
            TYPE_STATIC
        } else {
            TYPE_DYNAMIC
        },
        image_flags: 0,
        offset_bmap: 0x200,
        offset_data: (0x200 + bmap_bytes) as u32,
        sector_size: 512,
        disk_size: size,
        block_size: BLOCK_SIZE,
        block_extra: 0,
        blocks_in_image: blocks,
        blocks_allocated: if o.is_static { blocks } else { 0 },
        uuid_image: o.uuids.0,
        uuid_last_snap: o.uuids.1,
        uuid_link: [0; 16],
        uuid_parent: [0; 16],
    };
    file.write_at(0, &h.to_bytes()).map_err(io)?;
    let mut bmap = vec![0u8; bmap_bytes as usize];
    for i in 0..blocks {
        let e = if o.is_static { i } else { FREE };
        bmap[i as usize * 4..i as usize * 4 + 4].copy_from_slice(&e.to_le_bytes());
    }
    file.write_at(0x200, &bmap).map_err(io)?;
    if o.is_static {
        file.set_len(0x200 + bmap_bytes + blocks as u64 * BLOCK_SIZE as u64)
            .map_err(io)?;
    }
    Ok(())
}
