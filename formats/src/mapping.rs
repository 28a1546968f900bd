//! The vocabulary every format that maps guest offsets to host extents
//! (vpc, vdi, vmdk, vhdx, and any later one) answers the block layer in:
//! where a guest range is ([`Piece`]), how a write can go without
//! allocating ([`WriteMap`]), and how an allocating one is planned
//! ([`Plan`]). One trait, [`GuestMap`], gathers the calls, so that the
//! block layer adapts every such format to its asynchronous data path
//! with one generic adapter instead of one per format.
//!
//! The protocol: every call runs under the format's own metadata lock and
//! does no data I/O. A format marks the blocks a planned allocation
//! touches busy until [`GuestMap::finish_alloc`]; a write that finds them
//! busy is told to retry ([`WriteMap::Busy`], [`Plan::Busy`]) once an
//! allocation has finished.

use crate::error::{FResult, FormatError};
use crate::storage::Storage;

/// Where a run of guest bytes is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Run {
    /// At this offset of the image (or data) file.
    Data(u64),
    /// Reads as zeroes.
    Zero,
    /// Not in this image: the backing file's bytes (zeroes without one).
    Backing,
    /// Stored encoded (a compressed grain) at this offset of the file:
    /// [`GuestMap::read_encoded`] decodes it.
    Encoded(u64),
}

/// One run of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Guest offset.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Where.
    pub run: Run,
}

/// Appends a run of `len` bytes at guest `offset` to `out`, merging it
/// into the last piece when it continues it (the same kind, and for data
/// the next host bytes), so that a mapping has as few pieces as it can.
pub fn push_run(out: &mut Vec<Piece>, offset: u64, len: u64, run: Run) {
    if let Some(l) = out.last_mut() {
        let continues = l.offset.checked_add(l.len) == Some(offset)
            && match (l.run, run) {
                (Run::Zero, Run::Zero) | (Run::Backing, Run::Backing) => true,
                (Run::Data(a), Run::Data(b)) => a.checked_add(l.len) == Some(b),
                _ => false,
            };
        if continues {
            l.len += len;
            return;
        }
    }
    out.push(Piece { offset, len, run });
}

/// How a write can go without allocating.
#[derive(Debug)]
pub enum WriteMap {
    /// In place: (guest offset, host offset, length) runs.
    InPlace(Vec<(u64, u64, u64)>),
    /// Blocks it touches have allocations in flight: retry after one ends.
    Busy,
    /// It allocates (or updates metadata): [`GuestMap::plan_alloc`].
    Allocate,
}

/// A planned allocating write.
#[derive(Debug)]
pub enum Plan<A> {
    /// Blocks it touches have allocations in flight: retry after one ends.
    Busy,
    /// It needs reads first (a parent's bytes to merge): write it
    /// synchronously.
    Sync,
    /// Make `zero_first` host ranges read as zeroes, write the guest data
    /// to `writes` ((guest offset, host offset, length)), then
    /// [`GuestMap::finish_alloc`] with `alloc`.
    Ready {
        /// Host ranges to zero first: (offset, length).
        zero_first: Vec<(u64, u64)>,
        /// Guest data to host offsets.
        writes: Vec<(u64, u64, u64)>,
        /// The format's record of what it allocated.
        alloc: A,
    },
}

/// A format whose guest bytes are runs of host extents, as the block
/// layer's asynchronous data path drives it.
pub trait GuestMap: Send + Sync + 'static {
    /// What [`GuestMap::plan_alloc`] allocated, for
    /// [`GuestMap::finish_alloc`].
    type Alloc: Send + 'static;

    /// Map `[offset, offset+len)` for reading: pieces in order, covering
    /// it.
    fn map_read(&self, offset: u64, len: u64) -> FResult<Vec<Piece>>;
    /// Map a write of `[offset, offset+len)` that allocates nothing, if
    /// it can be one.
    fn map_write(&self, offset: u64, len: u64) -> FResult<WriteMap>;
    /// Plan a write of `[offset, offset+len)` that allocates.
    fn plan_alloc(&self, offset: u64, len: u64) -> FResult<Plan<Self::Alloc>>;
    /// Link what `alloc` allocated once its data is written (`ok`), or
    /// give it back.
    fn finish_alloc(&self, alloc: Self::Alloc, ok: bool) -> FResult<()>;
    /// Decode guest bytes `[offset, offset+buf.len())` of the
    /// [`Run::Encoded`] record at host offset `at`. Formats without
    /// encoded runs never return one, so the default is never called.
    fn read_encoded(&self, at: u64, offset: u64, buf: &mut [u8]) -> FResult<()> {
        let _ = (at, offset, buf);
        Err(FormatError::Unsupported(
            "this format has no encoded data".into(),
        ))
    }
}

/// The synchronous read of guest bytes `[off, off+buf.len())` that
/// `pieces` (a mapping of exactly that range) describe: data from `file`,
/// parent bytes from `backing` (zeroes without one), encoded runs through
/// `map`. Errors name `name`, the image.
pub fn read_pieces<M: GuestMap + ?Sized>(
    map: &M,
    name: &str,
    file: &dyn Storage,
    backing: Option<&dyn Storage>,
    off: u64,
    pieces: &[Piece],
    buf: &mut [u8],
) -> FResult<()> {
    for p in pieces {
        let at = usize::try_from(p.offset - off).ok();
        let end = usize::try_from(p.offset - off + p.len).ok();
        let Some(b) = at.zip(end).and_then(|(a, e)| buf.get_mut(a..e)) else {
            return Err(FormatError::Corrupt(format!(
                "{name}: a mapping does not cover the read"
            )));
        };
        match p.run {
            Run::Data(h) => file
                .read_at(h, b)
                .map_err(|e| FormatError::io(e, format!("{name}: read error")))?,
            Run::Zero => b.fill(0),
            Run::Backing => match backing {
                Some(bk) if bk.is_present() => bk.read_at(p.offset, b).map_err(|e| {
                    FormatError::io(e, format!("{name}: Could not read the parent"))
                })?,
                _ => b.fill(0),
            },
            Run::Encoded(h) => map.read_encoded(h, p.offset, b)?,
        }
    }
    Ok(())
}

/// The write phase every mapped format's hostile-image harness runs on
/// an image it could open writable (`size` bytes, stored in `file`,
/// named `name` in errors): unaligned and aligned writes at the start,
/// the middle and the end read back as written (through `write` and
/// `read`, the format's synchronous path), then one allocating write
/// planned, carried out on `file` and finished by hand, as the block
/// layer's asynchronous path does it; an in-place mapping must stay
/// near the file.
pub fn fuzz_write_phase<M: GuestMap>(
    img: &M,
    file: &dyn Storage,
    size: u64,
    name: &str,
    write: impl Fn(u64, &[u8]) -> FResult<()>,
    read: impl Fn(u64, &mut [u8]) -> FResult<()>,
) {
    let named = |r| crate::error::named(name, r);
    let end = size - size.min(5000);
    for (at, n) in [
        (0, 4096),
        (700, 1000),
        (end, size.min(5000)),
        (size / 2, 512),
    ] {
        let d = vec![0xc3u8; n as usize];
        if named(write(at, &d)).is_some() {
            let mut back = vec![0u8; n as usize];
            if named(read(at, &mut back)).is_some() {
                assert!(back == d, "read back differs at {at}");
            }
        }
    }
    let at = (size / 3) / 512 * 512;
    let n = 8192.min(size - at);
    match crate::error::named(name, img.map_write(at, n)) {
        Some(WriteMap::Allocate) => {
            if let Some(Plan::Ready {
                zero_first,
                writes,
                alloc,
            }) = crate::error::named(name, img.plan_alloc(at, n))
            {
                for (h, l) in zero_first {
                    let _ = file.write_zeroes(h, l.min(1 << 24));
                }
                for (_, h, l) in writes {
                    let _ = file.write_at(h, &vec![7u8; l as usize]);
                }
                crate::error::named(name, img.finish_alloc(alloc, true));
            }
        }
        Some(WriteMap::InPlace(runs)) => {
            for (_, h, l) in runs {
                assert!(
                    h + l <= file.len().unwrap_or(0) + (64 << 20),
                    "wild in-place write"
                );
            }
        }
        _ => {}
    }
}

/// A read-only format: its guest size and where its bytes are. Wrapped
/// in [`ReadOnly`], it is a [`GuestMap`] whose writes are refused, so
/// that the block layer's one mapped data path serves it too.
pub trait ReadOnlyMap: Send + Sync + 'static {
    /// Guest size in bytes.
    fn size(&self) -> u64;
    /// Map `[offset, offset+len)` (inside the size): pieces in order.
    fn map_read(&self, offset: u64, len: u64) -> FResult<Vec<Piece>>;
    /// Decode guest bytes of the [`Run::Encoded`] record at `at`.
    fn read_encoded(&self, at: u64, offset: u64, buf: &mut [u8]) -> FResult<()> {
        let _ = (at, offset, buf);
        Err(FormatError::Unsupported(
            "this format has no encoded data".into(),
        ))
    }
}

/// A [`ReadOnlyMap`] as a [`GuestMap`].
pub struct ReadOnly<T>(pub T);

fn read_only<T>() -> FResult<T> {
    Err(FormatError::ReadOnly(
        "this image format is read-only".into(),
    ))
}

impl<T: ReadOnlyMap> GuestMap for ReadOnly<T> {
    type Alloc = ();
    fn map_read(&self, offset: u64, len: u64) -> FResult<Vec<Piece>> {
        self.0.map_read(offset, len)
    }
    fn map_write(&self, _offset: u64, _len: u64) -> FResult<WriteMap> {
        read_only()
    }
    fn plan_alloc(&self, _offset: u64, _len: u64) -> FResult<Plan<()>> {
        read_only()
    }
    fn finish_alloc(&self, _alloc: (), _ok: bool) -> FResult<()> {
        read_only()
    }
    fn read_encoded(&self, at: u64, offset: u64, buf: &mut [u8]) -> FResult<()> {
        self.0.read_encoded(at, offset, buf)
    }
}

/// Read guest bytes `[off, off+buf.len())` of a read-only image stored
/// in `file`: the synchronous path, also what the fuzz harnesses read
/// through.
pub fn read_only_read<T: ReadOnlyMap>(
    img: &ReadOnly<T>,
    name: &str,
    file: &dyn Storage,
    off: u64,
    buf: &mut [u8],
) -> FResult<()> {
    let end = off
        .checked_add(buf.len() as u64)
        .filter(|&e| e <= img.0.size());
    if end.is_none() {
        return Err(FormatError::Invalid(format!(
            "{name}: read past the end of the image"
        )));
    }
    let pieces = img.0.map_read(off, buf.len() as u64)?;
    read_pieces(img, name, file, None, off, &pieces, buf)
}

/// The read phase of every read-only format's hostile-image harness:
/// reads at the start, the middle and the end of the image (at most
/// 4 MiB each), whose mappings must cover exactly what was asked; errors
/// must name `name`, the image.
pub fn fuzz_read_only<T: ReadOnlyMap>(img: &ReadOnly<T>, file: &dyn Storage, name: &str) {
    let size = img.0.size();
    let window = size.min(4 << 20);
    for off in [0, size / 2, size - window] {
        let len = window.min(size - off);
        if len == 0 {
            continue;
        }
        if let Some(pieces) = crate::error::named(name, img.0.map_read(off, len)) {
            let mut at = off;
            for p in &pieces {
                assert!(p.offset == at && p.len > 0, "mapping pieces out of order");
                at += p.len;
            }
            assert_eq!(at, off + len, "mapping does not cover the read");
        }
        let mut buf = vec![0u8; len as usize];
        crate::error::named(name, read_only_read(img, name, file, off, &mut buf));
    }
}

/// A request `[off, off+len)` must lie inside a disk of `size` bytes:
/// the one check and message of every format's data path.
pub fn check_range(name: &str, off: u64, len: u64, size: u64) -> FResult<()> {
    match off.checked_add(len) {
        Some(e) if e <= size => Ok(()),
        _ => Err(FormatError::Invalid(format!(
            "{name}: request [{off}, +{len}) past the end of the disk ({size})"
        ))),
    }
}

/// Writes to an image opened read-only are refused, by name.
pub fn check_writable(name: &str, read_only: bool) -> FResult<()> {
    if read_only {
        return Err(FormatError::ReadOnly(format!(
            "{name}: the image is opened read-only"
        )));
    }
    Ok(())
}

/// Split `[off, off+len)` at multiples of `bs` into (block index, offset
/// in the block, length) pieces.
pub fn block_chunks(off: u64, len: u64, bs: u64) -> impl Iterator<Item = (u64, u64, u64)> {
    let end = off + len;
    let mut pos = off;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let inb = pos % bs;
        let n = (bs - inb).min(end - pos);
        let r = (pos / bs, inb, n);
        pos += n;
        Some(r)
    })
}
