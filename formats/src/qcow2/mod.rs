//! The qcow2 format (QEMU's `docs/interop/qcow2.rst`): versions 2 and 3,
//! cluster sizes 512 B to 2 MiB, refcount widths 1 to 64 bits, zero and
//! compressed (deflate, zstd) clusters, extended L2 entries (subclusters),
//! external data files, backing files and internal snapshots.
//!
//! Module map:
//! * [`header`]: header fields, feature bits and header extensions.
//! * [`bitmap`]: persistent dirty bitmaps: the extension and directory,
//!   checked at open and listed by `info`; `auto` bitmaps are marked in use
//!   before Strata first changes guest data (it does not track writes).
//! * [`cache`]: the bounded metadata cache.
//! * [`refcount`]: refcount table/blocks and cluster allocation.
//! * [`l2`]: L1/L2 lookup and L2 entry decoding.
//! * [`io`]: reads, writes, write-zeroes, discard, resize, flush.
//! * [`compress`]: compressed clusters.
//! * [`snapshot`]: the snapshot table, snapshot create/apply/delete.
//! * [`check`]: consistency check and repair (`qemu-img check`).
//! * [`overlap`]: the overlap checks before writes (`overlap-check`).
//! * [`create`]: image creation with qemu-img's options.
//! * [`crypt`]: encrypted data clusters (LUKS, legacy AES).
//! * [`amend`]: in-place metadata changes (backing file, version, lazy
//!   refcounts, refcount width), emptying an image, read-only snapshot load.
//! * [`fuzz`]: the hostile-image harness (fuzz target, corpus test).
//!
//! Concurrency: all metadata lives in one [`Meta`] behind a mutex. Data I/O
//! runs outside it: a request maps its range under the mutex, takes a
//! [`gate::Ticket`], and reads or overwrites clusters already allocated to
//! this image (refcount 1, the COPIED flag) without the lock, possibly
//! asynchronously ([`Qcow2::map_read`], [`Qcow2::map_overwrite`]). A write
//! that needs new clusters allocates them and records its guest clusters as
//! *allocating* under the mutex, writes the data (copy-on-write areas
//! included) without it, then links the L2 entries under it again; every
//! other request that would change or depend on those L2 entries waits for
//! it (QEMU's in-flight allocation dependencies). Freed clusters are
//! returned to the allocator only after the L2 tables that dropped them are
//! on disk and every ticket that could still map them is gone (the epochs of
//! [`gate`]), so an unlocked write can never land in a cluster that was
//! freed and reused meanwhile. Snapshots, check, resize and close drain all
//! of this first ([`Qcow2::exclusive`]).
//!
//! Crash safety (flush ordering): metadata is written back lazily, as
//! QEMU's writeback metadata caches do. An allocating write changes L2
//! slices, refcount blocks and L1 entries in memory only (a new L2 table
//! too: its slices enter the cache dirty) and syncs nothing; a guest
//! flush, a FUA write (every write under `cache=writethrough`), close,
//! and the operations that need the metadata exact on disk (check,
//! snapshots, amend, resize) write everything back. The ordering is kept
//! where a table is written back, never earlier (QEMU's cache
//! dependencies): dirty refcount blocks are written and synced before any
//! L2 slice (at a flush, or when a dirty slice is evicted); all dirty L2
//! slices, then a sync, before the L1 entries that point at new tables;
//! refcount decrements only after the L2 change that dropped the
//! reference is durable. Refcount blocks themselves may be written at any
//! time (evicted early they only count more). Creating a refcount block or
//! growing the refcount table still syncs on the spot, as in QEMU (rare:
//! one block counts thousands of clusters). A crash loses the writes not
//! yet flushed (the write-cache contract) and can leak clusters, but never
//! leaves a reference to a cluster whose refcount is zero, nor an L1 entry
//! pointing at a table not yet written. With lazy refcounts (the image's
//! compatible bit, or the `lazy-refcounts` open option) the first
//! allocation sets the dirty bit in memory, the first writeback of an L2
//! or L1 table writes it to disk first (header, sync), and refcount blocks
//! are written only when evicted, at close and where they must be exact
//! on disk (check, snapshots, amend); a crash leaves the dirty bit, and
//! the next read-write open rebuilds the refcounts from the L2 tables.
//!
//! Corruption found while the image is open read-write (a write that would
//! overwrite metadata, an L2 entry that cannot be right, a refcount that
//! would drop below zero) marks the image corrupt on disk and refuses
//! writes from then on ([`Meta::fatal`], QEMU's `qcow2_signal_corruption`);
//! `check -r all` repairs it and clears the mark.

pub mod amend;
pub mod bitmap;
pub mod cache;
pub mod check;
pub mod compress;
pub mod create;
pub mod crypt;
pub mod fuzz;
pub mod gate;
pub mod header;
pub mod io;
pub mod l2;
pub mod overlap;
pub mod refcount;
pub mod snapshot;

use crate::error::{FResult, FormatError};
use crate::storage::Storage;
use cache::Cache;
pub use fuzz::fuzz_open_read;
use gate::Gate;
pub use gate::Ticket;
use header::Header;
use std::cell::Cell;
use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// L1/L2 entry bit: refcount is exactly one.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry bit: compressed cluster.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry bit (standard descriptor, v3): reads as zeroes.
pub const OFLAG_ZERO: u64 = 1;
/// Offset bits of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Offset bits of refcount table entries.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry.
pub const L1E_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (bit 0 is the zero flag).
pub const L2E_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// QEMU's default upper bound of the L2 cache (block/qcow2.h).
pub const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
/// QEMU's minimum refcount cache, in clusters.
pub const MIN_REFCOUNT_CACHE_CLUSTERS: u64 = 4;
/// Default `cache-clean-interval`, seconds.
pub const DEFAULT_CACHE_CLEAN_INTERVAL: u64 = 600;
/// Deepest backing chain we open (QEMU refuses deeper chains too).
pub const MAX_BACKING_DEPTH: usize = 1000;

/// Why clusters are freed, for `pass-discard-*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscardType {
    /// A discard request from above.
    Request = 0,
    /// Snapshot deletion.
    Snapshot = 1,
    /// Anything else (COW, table moves).
    Other = 2,
}

/// Options of an open, with QEMU's names in the block driver.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Open read-only.
    pub read_only: bool,
    /// `l2-cache-size` in bytes.
    pub l2_cache_size: Option<u64>,
    /// `l2-cache-entry-size` in bytes.
    pub l2_cache_entry_size: Option<u64>,
    /// `refcount-cache-size` in bytes.
    pub refcount_cache_size: Option<u64>,
    /// `cache-size` (both caches) in bytes.
    pub cache_size: Option<u64>,
    /// `cache-clean-interval` in seconds (0 = never).
    pub cache_clean_interval: u64,
    /// `pass-discard-request`, `pass-discard-snapshot`, `pass-discard-other`.
    pub pass_discard: [bool; 3],
    /// Open for a check that may repair (QEMU's `BDRV_O_CHECK`): an image
    /// marked corrupt may be opened read-write, and a dirty image is not
    /// repaired at open (the check sees and repairs what it finds).
    pub allow_corrupt: bool,
    /// `overlap-check`: what writes are checked against (a mask of
    /// [`overlap`] bits; QEMU's default template is `cached`).
    pub overlap_check: u32,
    /// `lazy-refcounts`: `None` follows the image's compatible bit.
    pub lazy_refcounts: Option<bool>,
    /// `encrypt.key-secret`'s passphrase: an encrypted image opened
    /// without it serves its metadata only.
    pub secret: Option<Secret>,
}

/// A passphrase, kept out of `Debug` output.
#[derive(Clone, Default)]
pub struct Secret(pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            l2_cache_size: None,
            l2_cache_entry_size: None,
            refcount_cache_size: None,
            cache_size: None,
            cache_clean_interval: DEFAULT_CACHE_CLEAN_INTERVAL,
            pass_discard: [false, true, false],
            allow_corrupt: false,
            overlap_check: overlap::CACHED,
            lazy_refcounts: None,
            secret: None,
        }
    }
}

/// What a caller needs from the header before opening (to open the
/// backing file and the data file first).
#[derive(Clone, Debug)]
pub struct Preview {
    /// The parsed header.
    pub header: Header,
}

/// Read and validate the header only.
pub fn preview(file: &dyn Storage, name: &str) -> FResult<Preview> {
    let len = file
        .len()
        .map_err(|e| FormatError::io(e, format!("{name}: reading the header")))?;
    // The header and its extensions fill at most the first cluster: read
    // the fixed part, then just that cluster (not always 2 MiB: it stays
    // in the peak memory of every open).
    let mut buf = vec![0u8; (len.max(512) as usize).min(4096)];
    file.read_at(0, &mut buf)
        .map_err(|e| FormatError::io(e, format!("{name}: reading the header")))?;
    let cluster_bits = u32::from_be_bytes([buf[20], buf[21], buf[22], buf[23]]).clamp(9, 21);
    let want = (len.max(512) as usize).min(1 << cluster_bits);
    if want > buf.len() {
        buf = vec![0u8; want];
        file.read_at(0, &mut buf)
            .map_err(|e| FormatError::io(e, format!("{name}: reading the header")))?;
    }
    let header = Header::parse(&buf, name)?;
    Ok(Preview { header })
}

/// The mutable state: header, L1, refcount table, caches, free lists.
pub struct Meta {
    pub(crate) name: String,
    pub(crate) file: Arc<dyn Storage>,
    pub(crate) data: Option<Arc<dyn Storage>>,
    pub(crate) backing: Option<Arc<dyn Storage>>,
    pub(crate) h: Header,
    pub(crate) cs: u64,
    pub(crate) l1: Vec<u64>,
    /// Dirty 512-byte chunks of the L1 table.
    pub(crate) l1_dirty: BTreeSet<u64>,
    pub(crate) reftable: Vec<u64>,
    pub(crate) l2c: Cache<Vec<u64>>,
    /// Bytes per L2 cache entry (a slice of an L2 table).
    pub(crate) slice_bytes: u64,
    pub(crate) rbc: Cache<Vec<u8>>,
    /// Clusters whose reference was dropped; freed at the next flush.
    pub(crate) pending_free: Vec<(u64, DiscardType)>,
    /// Freed clusters whose L2 change is durable, waiting for the tickets
    /// of their epoch (and older) to go: (epoch, offset, reason).
    pub(crate) quarantine: Vec<(u64, u64, DiscardType)>,
    /// In-flight I/O tracking, shared with [`Qcow2`].
    pub(crate) gate: Arc<Gate>,
    /// Guest clusters with an allocating write in flight, with the new host
    /// cluster when other writes may join it ([`io::Overwrite::Join`]).
    pub(crate) allocating: std::collections::BTreeMap<u64, Option<u64>>,
    pub(crate) free_cursor: u64,
    /// Refcount blocks were written since the last sync.
    pub(crate) rc_unsynced: bool,
    pub(crate) read_only: bool,
    /// Writes are refused: the image is marked corrupt on disk, or this
    /// process found corruption.
    pub(crate) corrupt: Cell<bool>,
    /// This process found corruption ([`Meta::fatal`]): the metadata on
    /// disk is left as it is, nothing more is written.
    pub(crate) halted: Cell<bool>,
    /// A check is running: corruption it meets is reported, not signalled.
    pub(crate) quiet: Cell<bool>,
    /// Use lazy refcounts in this open.
    pub(crate) lazy: bool,
    /// The dirty bit is set in `h` but not yet on disk: it is written
    /// (and synced) before the first L2 or L1 write that may reference
    /// clusters whose refcounts are only in the cache
    /// ([`Meta::refcounts_before_l2`]).
    pub(crate) dirty_pending: bool,
    /// What writes are checked against ([`overlap`]).
    pub(crate) overlap_mask: u32,
    /// Where the metadata named by in-memory tables lies ([`overlap`]).
    pub(crate) ol_index: overlap::Index,
    pub(crate) snapshots: Vec<snapshot::Snapshot>,
    /// Bytes of the snapshot table on disk.
    pub(crate) snapshots_size: u64,
    /// Where the next compressed cluster may go (0: start a new cluster).
    pub(crate) comp_cursor: u64,
    pub(crate) pass_discard: [bool; 3],
    /// End of the clusters allocated by this process (they may lie past
    /// the end of the file until written).
    pub(crate) alloc_end: u64,
    /// The bitmaps extension, when the image has bitmaps QEMU would load
    /// (the extension is present and the autoclear bit says it is valid).
    pub(crate) bitmaps_ext: Option<bitmap::BitmapsExt>,
    /// The bitmap directory (empty without `bitmaps_ext`).
    pub(crate) bitmaps: Vec<bitmap::Bitmap>,
    /// The data cipher ([`crypt`]), shared with [`Qcow2`].
    pub(crate) crypt: CryptState,
}

/// An image's encryption as this open sees it.
#[derive(Clone)]
pub(crate) enum CryptState {
    /// Not encrypted.
    Plain,
    /// Encrypted and unlocked.
    Keyed(Arc<crypt::Crypt>),
    /// Encrypted, opened without the secret: data I/O is refused.
    Locked,
}

impl CryptState {
    /// The cipher for data I/O: `None` for a plain image, an error naming
    /// the image when it was opened without its secret.
    pub(crate) fn get(&self, name: &str) -> FResult<Option<&crypt::Crypt>> {
        match self {
            CryptState::Plain => Ok(None),
            CryptState::Keyed(c) => Ok(Some(c)),
            CryptState::Locked => Err(FormatError::Invalid(format!(
                "{name}: the image is encrypted and was opened without encrypt.key-secret"
            ))),
        }
    }
    pub(crate) fn encrypted(&self) -> bool {
        !matches!(self, CryptState::Plain)
    }
}

/// See [`Qcow2::set_alloc_hook`].
pub type AllocHook = Box<dyn Fn() + Send + Sync>;

/// An open qcow2 image.
pub struct Qcow2 {
    meta: Mutex<Meta>,
    /// Signalled when an allocating write has linked its clusters.
    alloc_done: Condvar,
    /// Called (without the metadata lock) after an allocating write has
    /// linked its clusters: the block driver resubmits writes it parked.
    alloc_hook: std::sync::OnceLock<AllocHook>,
    gate: Arc<Gate>,
    name: String,
    file: Arc<dyn Storage>,
    data: Option<Arc<dyn Storage>>,
    backing: Option<Arc<dyn Storage>>,
    cs: u64,
    ctype: u8,
    /// Changed by [`Qcow2::reopen`] (a job that writes into a backing
    /// image opens it read-write for that time).
    read_only: std::sync::atomic::AtomicBool,
    /// `auto` bitmaps still to be marked in use before the first change of
    /// guest data (see [`bitmap`]).
    bitmaps_pending: std::sync::atomic::AtomicBool,
    /// The data cipher (the same as [`Meta`]'s).
    crypt: CryptState,
    /// The options of the open, without the secret (the cipher is kept
    /// in `crypt`): what [`Qcow2::reload`] reads the metadata with again.
    opts: OpenOptions,
}

impl Meta {
    /// What a read-write open does before the first write: rebuild the
    /// refcounts that lazy refcounts left stale, and clear the autoclear
    /// bits we do not know (we keep refcounts exact, so their data may be
    /// invalidated, as the spec asks).
    fn prepare_for_writing(&mut self, allow_corrupt: bool) -> FResult<()> {
        if self.h.incompatible & header::INCOMPAT_DIRTY != 0 && !allow_corrupt {
            let r = check::check(self, check::Repair::All)?;
            if r.corruptions_after() > 0 {
                return Err(self.corrupt("could not repair the refcounts of a dirty image"));
            }
            self.h.incompatible &= !header::INCOMPAT_DIRTY;
            self.write_header()?;
        }
        let clear = self.h.autoclear & !header::AUTOCLEAR_KNOWN;
        if clear != 0 {
            self.h.autoclear &= !clear;
            self.write_header()?;
        }
        Ok(())
    }
    /// `auto` bitmaps not yet marked in use: a writable open marks them
    /// before the first change of guest data.
    fn auto_bitmaps_pending(&self) -> bool {
        self.bitmaps
            .iter()
            .any(|b| b.flags & bitmap::FLAG_AUTO != 0 && b.flags & bitmap::FLAG_IN_USE == 0)
    }
    /// The backing file, when one is attached now.
    pub(crate) fn live_backing(&self) -> Option<&Arc<dyn Storage>> {
        self.backing.as_ref().filter(|b| b.is_present())
    }
    pub(crate) fn corrupt(&self, what: impl std::fmt::Display) -> FormatError {
        FormatError::Corrupt(format!("{}: {what}", self.name))
    }
    pub(crate) fn ioe(&self, e: std::io::Error, what: &str) -> FormatError {
        FormatError::io(e, format!("{}: {what}", self.name))
    }
    pub(crate) fn cluster_bits(&self) -> u32 {
        self.h.cluster_bits
    }
    /// File length in bytes.
    pub(crate) fn file_len(&self) -> FResult<u64> {
        self.file
            .len()
            .map_err(|e| self.ioe(e, "getting the file size"))
    }
    /// Write metadata of kind `ign` (an [`overlap`] bit): refused when it
    /// would land on other metadata (a hostile L1 or refcount table entry
    /// must not make one table overwrite another), and once corruption
    /// has been found.
    pub(crate) fn write_meta(&self, off: u64, buf: &[u8], ign: u32) -> FResult<()> {
        self.not_halted()?;
        self.check_overlap(off, buf.len() as u64, ign)?;
        self.file
            .write_at(off, buf)
            .map_err(|e| self.ioe(e, "writing metadata"))
    }
    /// Corruption found while the image is in use (QEMU's
    /// `qcow2_signal_corruption`). On a read-write open, the first time:
    /// the image is marked corrupt on disk (best effort), writes are
    /// refused from now on, and no more metadata is written, so what is on
    /// disk stays as consistent as after a crash (the flush ordering sees
    /// to that) for `check -r all` to repair. Read-only, or inside a
    /// check, it is only an error.
    pub(crate) fn fatal(&self, what: impl std::fmt::Display) -> FormatError {
        let name = &self.name;
        if self.read_only || self.quiet.get() {
            return FormatError::Corrupt(format!("{name}: {what}"));
        }
        if self.halted.replace(true) {
            return FormatError::Corrupt(format!("{name}: {what} (the image is marked corrupt)"));
        }
        self.corrupt.set(true);
        log::error!("{name}: marking the image as corrupt: {what}");
        let note = match self.mark_corrupt_on_disk() {
            Ok(true) => "the image is now marked corrupt".to_string(),
            Ok(false) => "writes are refused now (a version 2 image has no corrupt flag)".into(),
            Err(e) => format!("marking the image corrupt on disk failed ({e})"),
        };
        FormatError::Corrupt(format!(
            "{name}: {what}; {note} (repair it with 'strata-img check -r all')"
        ))
    }
    /// Set the corrupt bit in the header on disk, and sync; `false` when
    /// the header has no feature bits (version 2).
    fn mark_corrupt_on_disk(&self) -> std::io::Result<bool> {
        if self.h.version < 3 {
            return Ok(false);
        }
        let v = self.h.incompatible | header::INCOMPAT_CORRUPT;
        // Only the incompatible features field (bytes 72..80): the rest of
        // the header may hold what we are not going to rewrite now.
        self.file.write_at(72, &v.to_be_bytes())?;
        self.file.flush()?;
        Ok(true)
    }
    /// Refuse writes on a read-only or corrupt image.
    pub(crate) fn writable(&self) -> FResult<()> {
        if self.read_only {
            return Err(FormatError::ReadOnly(format!(
                "{}: the image is read-only",
                self.name
            )));
        }
        if self.corrupt.get() {
            return Err(FormatError::Corrupt(format!(
                "{}: the image is marked corrupt; writes are refused (repair it with 'strata-img check -r all')",
                self.name
            )));
        }
        Ok(())
    }
    /// Refuse metadata writes once this process has found corruption.
    pub(crate) fn not_halted(&self) -> FResult<()> {
        if self.halted.get() {
            return Err(FormatError::Corrupt(format!(
                "{}: the image is marked corrupt; its metadata is left as it is on disk",
                self.name
            )));
        }
        Ok(())
    }
    /// Rewrite the header cluster and sync.
    pub(crate) fn write_header(&mut self) -> FResult<()> {
        self.not_halted()?;
        let b = self.h.serialize().map_err(|e| match e {
            FormatError::Invalid(m) => FormatError::Invalid(format!("{}: {m}", self.name)),
            e => e,
        })?;
        let hl = self.h.header_length();
        // Write what holds information (header, extensions, backing name):
        // the rest of the cluster is zero anyway.
        let used = b
            .iter()
            .rposition(|&c| c != 0)
            .map_or(hl, |p| p + 1)
            .max(hl);
        self.file
            .write_at(0, &b[..used.div_ceil(512) * 512])
            .map_err(|e| self.ioe(e, "writing the header"))?;
        self.sync()?;
        // What the header says, the dirty bit included, is on disk now.
        self.dirty_pending = false;
        Ok(())
    }
    /// With lazy refcounts, set the dirty bit at the first allocation
    /// (QEMU's `qcow2_mark_dirty`): from then on refcount blocks may lag
    /// behind the L2 tables on disk ([`Meta::lazy_now`]); a process that
    /// dies before closing leaves the bit, and the next read-write open
    /// rebuilds the refcounts. The bit is set in memory only: nothing on
    /// disk depends on it until an L2 or L1 table is written back, and
    /// [`Meta::refcounts_before_l2`] writes the header first then, so the
    /// allocating write itself costs no sync.
    pub(crate) fn mark_dirty(&mut self) -> FResult<()> {
        if self.lazy
            && self.h.incompatible & header::INCOMPAT_DIRTY == 0
            && !self.read_only
            && self.h.version >= 3
        {
            self.h.incompatible |= header::INCOMPAT_DIRTY;
            self.dirty_pending = true;
        }
        Ok(())
    }
    /// Refcount blocks may lag behind the L2 tables on disk: lazy
    /// refcounts, and the dirty bit is set (on disk, or pending and
    /// written before the next L2 or L1 write).
    pub(crate) fn lazy_now(&self) -> bool {
        self.lazy && self.h.incompatible & header::INCOMPAT_DIRTY != 0
    }
    /// Flush with the refcount blocks exact on disk, then clear the dirty
    /// bit (a clean close). Nothing is written once corruption was found.
    pub(crate) fn mark_clean(&mut self) -> FResult<()> {
        if self.read_only || self.halted.get() {
            return Ok(());
        }
        if self.dirty_pending {
            // The bit never reached the disk, and need not: with the
            // refcounts durable first, the ordered writeback below is
            // safe without it (one header write and sync fewer).
            self.sync_refcounts()?;
            self.h.incompatible &= !header::INCOMPAT_DIRTY;
            self.dirty_pending = false;
        }
        self.flush_exact()?;
        if self.h.incompatible & header::INCOMPAT_DIRTY != 0 {
            self.h.incompatible &= !header::INCOMPAT_DIRTY;
            self.write_header()?;
        }
        Ok(())
    }
    pub(crate) fn sync(&self) -> FResult<()> {
        self.file.flush().map_err(|e| self.ioe(e, "flushing"))
    }
}

fn cache_sizes(h: &Header, o: &OpenOptions, name: &str) -> FResult<(u64, u64, u64)> {
    let cs = h.cluster_size();
    let inval = |m: String| FormatError::Invalid(format!("{name}: {m}"));
    let entry = o.l2_cache_entry_size.unwrap_or(cs);
    if !entry.is_power_of_two() || entry < 512 || entry > cs {
        return Err(inval(
            "L2 cache entry size must be a power of two between 512 and the cluster size".into(),
        ));
    }
    // Enough L2 cache for the whole disk, capped (QEMU >= 3.1).
    let tables = h.l1_entries_for(h.size).max(1);
    let max_l2 = tables.saturating_mul(cs).min(DEFAULT_L2_CACHE_MAX);
    let min_rc = MIN_REFCOUNT_CACHE_CLUSTERS * cs;
    let (l2, rc) = match (o.cache_size, o.l2_cache_size, o.refcount_cache_size) {
        (Some(c), Some(l), Some(r)) => {
            if l.saturating_add(r) > c {
                return Err(inval(format!(
                    "l2-cache-size ({l}) + refcount-cache-size ({r}) may not exceed cache-size ({c})"
                )));
            }
            (l, r)
        }
        (Some(c), Some(l), None) => (l, c.saturating_sub(l)),
        (Some(c), None, Some(r)) => (c.saturating_sub(r), r),
        (Some(c), None, None) => {
            let l = max_l2.min(c.saturating_sub(min_rc));
            (l, c.saturating_sub(l))
        }
        (None, l, r) => (l.unwrap_or(max_l2), r.unwrap_or(min_rc)),
    };
    // Bound the entry counts: hostile or silly sizes must not make us
    // allocate without limit (each entry is allocated on use anyway).
    let l2_entries = (l2 / entry).clamp(2, 1 << 20);
    let rc_entries = (rc / cs).clamp(MIN_REFCOUNT_CACHE_CLUSTERS, 1 << 16);
    Ok((entry, l2_entries, rc_entries))
}

impl Qcow2 {
    /// Open an image. `data` is the external data file (required when the
    /// header says so), `backing` the opened backing image, if any.
    pub fn open(
        name: &str,
        file: Arc<dyn Storage>,
        data: Option<Arc<dyn Storage>>,
        backing: Option<Arc<dyn Storage>>,
        o: &OpenOptions,
    ) -> FResult<Qcow2> {
        let h = preview(&*file, name)?.header;
        let crypt = match crypt::open(&*file, &h, o.secret.as_ref().map(|s| &s.0[..]), name)? {
            Some(c) => CryptState::Keyed(Arc::new(c)),
            None if h.crypt_method != crypt::METHOD_NONE => CryptState::Locked,
            None => CryptState::Plain,
        };
        let gate = Arc::new(Gate::default());
        let mut m = Self::read_meta(
            name,
            &file,
            data.clone(),
            backing.clone(),
            o,
            crypt.clone(),
            gate.clone(),
        )?;
        if !o.read_only {
            m.prepare_for_writing(o.allow_corrupt)?;
        }
        let cs = m.cs;
        let ctype = m.h.compression_type;
        let pending = !o.read_only && m.auto_bitmaps_pending();
        Ok(Qcow2 {
            meta: Mutex::new(m),
            alloc_done: Condvar::new(),
            alloc_hook: std::sync::OnceLock::new(),
            gate,
            name: name.to_string(),
            file,
            data,
            backing,
            cs,
            ctype,
            read_only: std::sync::atomic::AtomicBool::new(o.read_only),
            bitmaps_pending: std::sync::atomic::AtomicBool::new(pending),
            crypt,
            opts: OpenOptions {
                secret: None,
                ..o.clone()
            },
        })
    }

    /// Read the metadata from the image as it is on disk now (header,
    /// snapshot table, bitmap directory, L1 and refcount tables; empty
    /// caches) and check it against the options, writing nothing: what
    /// an open and [`Qcow2::reload`] share.
    fn read_meta(
        name: &str,
        file: &Arc<dyn Storage>,
        data: Option<Arc<dyn Storage>>,
        backing: Option<Arc<dyn Storage>>,
        o: &OpenOptions,
        crypt: CryptState,
        gate: Arc<Gate>,
    ) -> FResult<Meta> {
        let h = preview(&**file, name)?.header;
        let cs = h.cluster_size();
        let has_df = h.incompatible & header::INCOMPAT_DATA_FILE != 0;
        if has_df && data.is_none() {
            return Err(FormatError::Invalid(format!(
                "{name}: Could not open the external data file: the image needs one ('data-file' option)"
            )));
        }
        if has_df && h.nb_snapshots > 0 {
            return Err(FormatError::Corrupt(format!(
                "{name}: snapshots are not supported with an external data file"
            )));
        }
        let corrupt = h.incompatible & header::INCOMPAT_CORRUPT != 0;
        if corrupt && !o.read_only && !o.allow_corrupt {
            return Err(FormatError::ReadOnly(format!(
                "{name}: the image is marked corrupt and can only be opened read-only (repair it with 'strata-img check -r all')"
            )));
        }
        let lazy = o
            .lazy_refcounts
            .unwrap_or(h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0);
        if lazy && h.version < 3 {
            return Err(FormatError::Invalid(format!(
                "{name}: Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
            )));
        }
        let (slice_bytes, l2n, rcn) = cache_sizes(&h, o, name)?;
        let interval =
            (o.cache_clean_interval > 0).then(|| Duration::from_secs(o.cache_clean_interval));
        // L1 table (bounded by the header check: at most 32 MiB).
        let mut raw = vec![0u8; h.l1_size as usize * 8];
        file.read_at(h.l1_table_offset, &mut raw)
            .map_err(|e| FormatError::io(e, format!("{name}: reading the L1 table")))?;
        let l1: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        // Refcount table (at most 8 MiB).
        let mut raw = vec![0u8; (h.refcount_table_clusters as u64 * cs) as usize];
        file.read_at(h.refcount_table_offset, &mut raw)
            .map_err(|e| FormatError::io(e, format!("{name}: reading the refcount table")))?;
        let reftable: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let mut m = Meta {
            name: name.to_string(),
            file: file.clone(),
            data,
            backing,
            cs,
            l1,
            l1_dirty: BTreeSet::new(),
            reftable,
            l2c: Cache::new(l2n as usize, interval),
            slice_bytes,
            rbc: Cache::new(rcn as usize, interval),
            pending_free: Vec::new(),
            quarantine: Vec::new(),
            gate,
            allocating: std::collections::BTreeMap::new(),
            free_cursor: 1,
            rc_unsynced: false,
            read_only: o.read_only,
            corrupt: Cell::new(corrupt),
            halted: Cell::new(false),
            quiet: Cell::new(false),
            lazy,
            dirty_pending: false,
            overlap_mask: o.overlap_check,
            ol_index: overlap::Index::default(),
            snapshots: Vec::new(),
            snapshots_size: 0,
            comp_cursor: 0,
            pass_discard: o.pass_discard,
            alloc_end: 0,
            bitmaps_ext: None,
            bitmaps: Vec::new(),
            crypt,
            h,
        };
        (m.snapshots, m.snapshots_size) = snapshot::read_table(&m)?;
        if let Some(raw) = m.h.bitmaps_ext.clone() {
            // Without the autoclear bit a program that does not know
            // bitmaps changed the image: QEMU ignores them then.
            if raw.len() != 24 {
                return Err(FormatError::Corrupt(format!(
                    "{name}: bitmaps_ext: Invalid extension length"
                )));
            }
            if m.h.version >= 3 && m.h.autoclear & header::AUTOCLEAR_BITMAPS != 0 {
                let (e, list) = bitmap::read_bitmaps(&**file, &raw, cs, m.h.size, name)?;
                m.bitmaps_ext = Some(e);
                m.bitmaps = list;
            }
        }
        m.reindex_all();
        Ok(m)
    }

    /// Throw the metadata in memory away and read it again from the
    /// image, then be read-only or read-write as `read_only` says: how
    /// an image opened while another process owned it (the destination
    /// of a live migration) takes over once that process has written its
    /// metadata back and let go (QEMU's `qcow2_co_invalidate_cache`).
    /// Going read-write does what a read-write open does (repair a dirty
    /// image, clear unknown autoclear bits, refuse a corrupt one). The
    /// cluster size and compression type cannot have changed; the data
    /// cipher is kept. In-flight requests are waited for, and the gate
    /// stays the same, so tickets handed out before stay valid. What was
    /// writable is written back first, so nothing this process changed is
    /// lost; on an error the old metadata stays (read-only).
    pub fn reload(&self, read_only: bool) -> FResult<()> {
        use std::sync::atomic::Ordering;
        let mut m = self.exclusive();
        if !m.read_only {
            m.mark_clean()?;
            m.read_only = true;
            self.read_only.store(true, Ordering::Release);
        }
        let o = OpenOptions {
            read_only,
            ..self.opts.clone()
        };
        let mut new = Self::read_meta(
            &self.name,
            &self.file,
            self.data.clone(),
            self.backing.clone(),
            &o,
            self.crypt.clone(),
            self.gate.clone(),
        )?;
        if new.cs != self.cs || new.h.compression_type != self.ctype {
            return Err(FormatError::Invalid(format!(
                "{}: the cluster size or compression type changed while the image was open",
                self.name
            )));
        }
        if !read_only {
            new.prepare_for_writing(o.allow_corrupt)?;
        }
        let pending = !read_only && new.auto_bitmaps_pending();
        *m = new;
        self.bitmaps_pending.store(pending, Ordering::Release);
        self.read_only.store(read_only, Ordering::Release);
        Ok(())
    }

    /// The persistent dirty bitmaps QEMU would load (name, flags,
    /// granularity), in directory order.
    pub fn bitmaps(&self) -> Vec<bitmap::Bitmap> {
        self.lock().bitmaps.clone()
    }

    /// Mark the `auto` bitmaps in use if that is still to do; called before
    /// anything changes guest data (never with the metadata lock held).
    pub(crate) fn bitmaps_in_use(&self) -> FResult<()> {
        use std::sync::atomic::Ordering;
        if self.bitmaps_pending.load(Ordering::Acquire) {
            let mut m = self.lock();
            m.mark_bitmaps_in_use(false)?;
            self.bitmaps_pending.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// Set the function called after each allocating write has finished
    /// (see [`io::Overwrite::Busy`]); once per image.
    pub fn set_alloc_hook(&self, f: AllocHook) {
        let _ = self.alloc_hook.set(f);
    }

    /// Wake what waits for an allocation: threads, and the hook. No lock
    /// is held while the hook runs (it may submit writes that finish
    /// allocations of their own).
    pub(crate) fn alloc_finished(&self) {
        self.alloc_done.notify_all();
        if let Some(f) = self.alloc_hook.get() {
            f();
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The metadata lock once nothing is in flight: no allocating write
    /// and no unlocked data I/O (snapshots, check, resize, amend, close).
    /// New requests cannot start meanwhile, since they map under the lock.
    pub(crate) fn exclusive(&self) -> MutexGuard<'_, Meta> {
        let mut m = self.lock();
        while !m.allocating.is_empty() {
            m = self.alloc_done.wait(m).unwrap_or_else(|e| e.into_inner());
        }
        // What is left holds tickets but never needs the lock again.
        self.gate.wait_idle();
        m
    }

    /// Wait until no allocating write is in flight on the guest clusters
    /// of `[off, off+len)`.
    pub(crate) fn wait_allocs<'a>(
        &'a self,
        mut m: MutexGuard<'a, Meta>,
        off: u64,
        len: u64,
    ) -> MutexGuard<'a, Meta> {
        let first = off / self.cs;
        let last = off.saturating_add(len.max(1) - 1) / self.cs;
        while m.allocating.range(first..=last).next().is_some() {
            m = self.alloc_done.wait(m).unwrap_or_else(|e| e.into_inner());
        }
        m
    }

    /// The file name used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Virtual size.
    pub fn size(&self) -> u64 {
        self.lock().h.size
    }
    /// Cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.cs
    }
    /// A copy of the header (with the corrupt bit if this process has
    /// found corruption).
    pub fn header(&self) -> Header {
        let m = self.lock();
        let mut h = m.h.clone();
        if m.corrupt.get() && h.version >= 3 {
            h.incompatible |= header::INCOMPAT_CORRUPT;
        }
        h
    }
    /// Writes are refused because the image is corrupt (marked so on disk,
    /// or found so by this process).
    pub fn is_corrupt(&self) -> bool {
        self.lock().corrupt.get()
    }
    /// Its data clusters are encrypted ([`crypt`]): whole 512-byte
    /// sectors only, through [`Qcow2::read`] and [`Qcow2::write`].
    pub fn is_encrypted(&self) -> bool {
        self.crypt.encrypted()
    }
    /// Opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(std::sync::atomic::Ordering::Acquire)
    }
    /// The backing file, when one is attached now.
    pub(crate) fn live_backing(&self) -> Option<&Arc<dyn Storage>> {
        self.backing.as_ref().filter(|b| b.is_present())
    }
    /// Switch between read-only and read-write while open (QEMU's
    /// `bdrv_reopen` of a backing image that `block-commit` writes into).
    /// Going read-write does what a read-write open does first (repair a
    /// dirty image, refuse a corrupt one); going read-only writes
    /// everything back and marks the image clean.
    pub fn reopen(&self, read_only: bool) -> FResult<()> {
        use std::sync::atomic::Ordering;
        if read_only == self.is_read_only() {
            return Ok(());
        }
        let mut m = self.exclusive();
        if read_only {
            m.mark_clean()?;
            m.read_only = true;
            self.read_only.store(true, Ordering::Release);
            return Ok(());
        }
        if m.corrupt.get() {
            return Err(FormatError::ReadOnly(format!(
                "{}: the image is marked corrupt and can only be opened read-only (repair it with 'strata-img check -r all')",
                self.name
            )));
        }
        m.read_only = false;
        if let Err(e) = m.prepare_for_writing(false) {
            m.read_only = true;
            return Err(e);
        }
        let pending = m.auto_bitmaps_pending();
        self.bitmaps_pending.store(pending, Ordering::Release);
        self.read_only.store(false, Ordering::Release);
        Ok(())
    }
    /// The snapshot table.
    pub fn snapshots(&self) -> Vec<snapshot::Snapshot> {
        self.lock().snapshots.clone()
    }
    /// How many clusters of the image file below byte `end` have a
    /// non-zero refcount (what the image uses, metadata included).
    pub fn refcounted_clusters(&self, end: u64) -> FResult<u64> {
        let mut m = self.lock();
        let mut n = 0;
        for i in 0..end / self.cs {
            if m.get_refcount(i)? != 0 {
                n += 1;
            }
        }
        Ok(n)
    }
    /// Consistency check, optionally repairing. A repair that leaves no
    /// corruption and no check error clears the corrupt and dirty bits
    /// (QEMU: `qcow2_mark_clean` and `qcow2_mark_consistent` after a
    /// check with repair).
    pub fn check(&self, repair: check::Repair) -> FResult<check::CheckResult> {
        let mut m = self.exclusive();
        if repair != check::Repair::None {
            m.flush_exact()?;
        } else if !m.read_only && !m.halted.get() {
            // The check reads L2 tables from the file: dirty ones (a new
            // table may exist only in the cache) must be there first.
            m.flush_all()?;
        }
        let r = check::check(&mut m, repair)?;
        if repair != check::Repair::None {
            m.flush_exact()?;
            let bits = header::INCOMPAT_CORRUPT | header::INCOMPAT_DIRTY;
            if r.corruptions_after() == 0 && r.check_errors == 0 && m.h.incompatible & bits != 0 {
                m.h.incompatible &= !bits;
                m.write_header()?;
            }
            if r.corruptions_after() == 0 && r.check_errors == 0 {
                m.corrupt.set(false);
            }
        }
        Ok(r)
    }
    /// Flush everything and release what the flush frees (call before
    /// drop). After corruption was found nothing is written: that was
    /// reported where it was found.
    pub fn close(&self) -> FResult<()> {
        if self.is_read_only() {
            return Ok(());
        }
        let mut m = self.exclusive();
        m.mark_clean()
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if !self.is_read_only() {
            let m = self.meta.get_mut().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = m.mark_clean() {
                log::warn!("{e}");
            }
        }
    }
}
