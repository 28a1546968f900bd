//! Overlap checks before writes (QEMU's `overlap-check` option): a write
//! that would land on metadata it is not meant to change is refused and the
//! image is marked corrupt ([`Meta::fatal`]). Without them a hostile or
//! damaged L2 entry, or a refcount that lies, would let guest data or one
//! table overwrite another.
//!
//! What is checked is a bit mask, chosen as in QEMU by a template and
//! per-kind switches (`overlap-check.<kind>`): `none`; `constant`, what
//! lies where the header says (the header, the active L1 table, the
//! refcount table, the snapshot table, the bitmap directory); `cached`, the
//! default, adds what the tables held in memory name (every active L2
//! table, every refcount block, every snapshot's L1 table); `all` adds the
//! snapshots' L2 tables, which live only on disk.
//!
//! Cost: QEMU walks the whole L1 and refcount tables on every write. Here
//! the clusters of the active L2 tables and of the refcount blocks are kept
//! in ordered sets, changed where L1 and refcount table entries change, so
//! a check is a few range lookups whatever the image size. The snapshots'
//! L1 tables are kept as disjoint byte ranges and (with `all`) their L2
//! tables as a set read once; both are rebuilt when the snapshot table
//! changes, never per write.

use super::{header, Meta, OFFSET_MASK, REFT_OFFSET_MASK};
use crate::error::FResult;
use std::collections::{BTreeMap, BTreeSet};

/// The image header (the first cluster).
pub const MAIN_HEADER: u32 = 1 << 0;
/// The active L1 table.
pub const ACTIVE_L1: u32 = 1 << 1;
/// The L2 tables the active L1 table names.
pub const ACTIVE_L2: u32 = 1 << 2;
/// The refcount table.
pub const REFCOUNT_TABLE: u32 = 1 << 3;
/// The refcount blocks.
pub const REFCOUNT_BLOCK: u32 = 1 << 4;
/// The snapshot table.
pub const SNAPSHOT_TABLE: u32 = 1 << 5;
/// The snapshots' L1 tables.
pub const INACTIVE_L1: u32 = 1 << 6;
/// The snapshots' L2 tables (read from disk).
pub const INACTIVE_L2: u32 = 1 << 7;
/// The bitmap directory.
pub const BITMAP_DIRECTORY: u32 = 1 << 8;

/// Template `constant`: what the header locates.
pub const CONSTANT: u32 =
    MAIN_HEADER | ACTIVE_L1 | REFCOUNT_TABLE | SNAPSHOT_TABLE | BITMAP_DIRECTORY;
/// Template `cached` (the default): plus what the in-memory tables locate.
pub const CACHED: u32 = CONSTANT | ACTIVE_L2 | REFCOUNT_BLOCK | INACTIVE_L1;
/// Template `all`: plus the snapshots' L2 tables.
pub const ALL: u32 = CACHED | INACTIVE_L2;

/// What an L2 table write may land on: a table can be active and shared
/// with snapshots at once (its COPIED flags are rewritten then).
pub(crate) const L2_TABLES: u32 = ACTIVE_L2 | INACTIVE_L2;

/// QEMU's `overlap-check.<key>` switches and their bits.
pub const FLAG_NAMES: [(&str, u32); 9] = [
    ("main-header", MAIN_HEADER),
    ("active-l1", ACTIVE_L1),
    ("active-l2", ACTIVE_L2),
    ("refcount-table", REFCOUNT_TABLE),
    ("refcount-block", REFCOUNT_BLOCK),
    ("snapshot-table", SNAPSHOT_TABLE),
    ("inactive-l1", INACTIVE_L1),
    ("inactive-l2", INACTIVE_L2),
    ("bitmap-directory", BITMAP_DIRECTORY),
];

/// The template names QEMU accepts.
pub const TEMPLATES: [&str; 4] = ["none", "constant", "cached", "all"];

/// The mask of a template name.
pub fn template(name: &str) -> Option<u32> {
    Some(match name {
        "none" => 0,
        "constant" => CONSTANT,
        "cached" => CACHED,
        "all" => ALL,
        _ => return None,
    })
}

fn describe(bit: u32) -> &'static str {
    match bit {
        MAIN_HEADER => "the image header",
        ACTIVE_L1 => "the active L1 table",
        ACTIVE_L2 => "an active L2 table",
        REFCOUNT_TABLE => "the refcount table",
        REFCOUNT_BLOCK => "a refcount block",
        SNAPSHOT_TABLE => "the snapshot table",
        INACTIVE_L1 => "a snapshot's L1 table",
        INACTIVE_L2 => "a snapshot's L2 table",
        _ => "the bitmap directory",
    }
}

/// Where the metadata named by in-memory tables lies.
#[derive(Default, Debug, PartialEq, Eq)]
pub(crate) struct Index {
    /// Active L2 table offsets, with the number of L1 entries naming each
    /// (a damaged L1 may name one table twice).
    l2: BTreeMap<u64, u32>,
    /// Refcount block offsets.
    rb: BTreeSet<u64>,
    /// The snapshots' L1 tables as disjoint byte ranges (start -> end).
    inactive_l1: BTreeMap<u64, u64>,
    /// The snapshots' L2 table offsets (only with [`INACTIVE_L2`]).
    inactive_l2: BTreeSet<u64>,
}

/// Merge byte ranges into disjoint ones (start -> end).
fn disjoint(mut v: Vec<(u64, u64)>) -> BTreeMap<u64, u64> {
    v.sort_unstable();
    let mut out: BTreeMap<u64, u64> = BTreeMap::new();
    let mut cur: Option<(u64, u64)> = None;
    for (a, b) in v {
        cur = match cur {
            Some((s, e)) if a <= e => Some((s, e.max(b))),
            Some((s, e)) => {
                out.insert(s, e);
                Some((a, b))
            }
            None => Some((a, b)),
        };
    }
    if let Some((s, e)) = cur {
        out.insert(s, e);
    }
    out
}

impl Meta {
    /// An L1 entry changes from `old` to `new` (raw entries).
    pub(crate) fn index_l1_change(&mut self, old: u64, new: u64) {
        let (o, n) = (old & OFFSET_MASK, new & OFFSET_MASK);
        if o == n {
            return;
        }
        if o != 0 {
            if let Some(c) = self.ol_index.l2.get_mut(&o) {
                *c -= 1;
                if *c == 0 {
                    self.ol_index.l2.remove(&o);
                }
            }
        }
        if n != 0 {
            *self.ol_index.l2.entry(n).or_insert(0) += 1;
        }
    }

    /// The active L1 table was replaced.
    pub(crate) fn reindex_l1(&mut self) {
        let mut l2 = BTreeMap::new();
        for e in &self.l1 {
            let o = e & OFFSET_MASK;
            if o != 0 {
                *l2.entry(o).or_insert(0) += 1;
            }
        }
        self.ol_index.l2 = l2;
    }

    /// A refcount block was hooked into the table.
    pub(crate) fn index_rb_added(&mut self, off: u64) {
        self.ol_index.rb.insert(off);
    }

    /// The refcount table was replaced.
    pub(crate) fn reindex_reftable(&mut self) {
        self.ol_index.rb = self
            .reftable
            .iter()
            .map(|e| e & REFT_OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
    }

    /// The snapshot table changed (or was just read): its L1 tables, and
    /// with [`INACTIVE_L2`] the L2 tables they name, read from disk. A
    /// table that cannot be read is skipped here (it is reported where it
    /// is used).
    pub(crate) fn reindex_snapshots(&mut self) {
        let ranges = self
            .snapshots
            .iter()
            .filter(|s| s.l1_size > 0)
            .map(|s| {
                let len = s.l1_size as u64 * 8;
                (s.l1_offset, s.l1_offset.saturating_add(len))
            })
            .collect();
        self.ol_index.inactive_l1 = disjoint(ranges);
        let mut l2 = BTreeSet::new();
        if self.overlap_mask & INACTIVE_L2 != 0 {
            let flen = self.file_len().unwrap_or(0);
            let mut seen = BTreeSet::new();
            for s in &self.snapshots {
                let len = s.l1_size as u64 * 8;
                // Tables past the end of the file hold nothing (and a
                // hostile table must not make us read without bound).
                if len == 0 || s.l1_offset.saturating_add(len) > flen {
                    continue;
                }
                if !seen.insert((s.l1_offset, len)) {
                    continue;
                }
                let mut raw = vec![0u8; len as usize];
                if self.file.read_at(s.l1_offset, &mut raw).is_err() {
                    continue;
                }
                for c in raw.chunks_exact(8) {
                    let o = u64::from_be_bytes(c.try_into().unwrap_or([0; 8])) & OFFSET_MASK;
                    if o != 0 {
                        l2.insert(o);
                    }
                }
            }
        }
        self.ol_index.inactive_l2 = l2;
    }

    /// Build every part of the index (at open).
    pub(crate) fn reindex_all(&mut self) {
        self.reindex_l1();
        self.reindex_reftable();
        self.reindex_snapshots();
    }

    /// The metadata that a write of `[off, off+len)` would hit, among the
    /// kinds checked and not in `ign` (the kind being written, for
    /// metadata writes).
    pub(crate) fn overlapping(&self, off: u64, len: u64, ign: u32) -> Option<&'static str> {
        let chk = self.overlap_mask & !ign;
        if len == 0 || chk == 0 {
            return None;
        }
        let cs = self.cs;
        if chk & MAIN_HEADER != 0 && off < cs {
            return Some(describe(MAIN_HEADER));
        }
        // Whole clusters from here on, as QEMU does: two structures never
        // share a cluster.
        let start = off - off % cs;
        let end = off.saturating_add(len).div_ceil(cs).saturating_mul(cs);
        let hit = |a: u64, l: u64| l > 0 && start < a.saturating_add(l) && a < end;
        let hit_set = |s: &BTreeSet<u64>| s.range(start..end).next().is_some();
        let h = &self.h;
        if chk & ACTIVE_L1 != 0 && hit(h.l1_table_offset, self.l1.len() as u64 * 8) {
            return Some(describe(ACTIVE_L1));
        }
        if chk & REFCOUNT_TABLE != 0
            && hit(
                h.refcount_table_offset,
                h.refcount_table_clusters as u64 * cs,
            )
        {
            return Some(describe(REFCOUNT_TABLE));
        }
        if chk & SNAPSHOT_TABLE != 0
            && h.nb_snapshots > 0
            && hit(h.snapshots_offset, self.snapshots_size)
        {
            return Some(describe(SNAPSHOT_TABLE));
        }
        if chk & BITMAP_DIRECTORY != 0 && h.autoclear & header::AUTOCLEAR_BITMAPS != 0 {
            if let Some((o, l)) = bitmap_directory(h) {
                if hit(o, l) {
                    return Some(describe(BITMAP_DIRECTORY));
                }
            }
        }
        if chk & ACTIVE_L2 != 0 && self.ol_index.l2.range(start..end).next().is_some() {
            return Some(describe(ACTIVE_L2));
        }
        if chk & REFCOUNT_BLOCK != 0 && hit_set(&self.ol_index.rb) {
            return Some(describe(REFCOUNT_BLOCK));
        }
        if chk & INACTIVE_L1 != 0 {
            // The last range starting before `end` is the only candidate:
            // the ranges are disjoint and sorted.
            if let Some((_, &e)) = self.ol_index.inactive_l1.range(..end).next_back() {
                if e > start {
                    return Some(describe(INACTIVE_L1));
                }
            }
        }
        if chk & INACTIVE_L2 != 0 && hit_set(&self.ol_index.inactive_l2) {
            return Some(describe(INACTIVE_L2));
        }
        None
    }

    /// Refuse a write of `[off, off+len)` that would hit metadata other
    /// than `ign` (0 for data writes): the image is corrupt, and is marked
    /// so.
    pub(crate) fn check_overlap(&self, off: u64, len: u64, ign: u32) -> FResult<()> {
        if off.checked_add(len).is_none() {
            return Err(self.fatal(format!("write offset 0x{off:x} overflows")));
        }
        match self.overlapping(off, len, ign) {
            Some(w) => Err(self.fatal(format!(
                "preventing an invalid write at offset 0x{off:x} (length {len}): it would overwrite {w}"
            ))),
            None => Ok(()),
        }
    }

    /// Test helper: the index as it would be rebuilt from scratch.
    #[cfg(test)]
    pub(crate) fn index_is_fresh(&mut self) -> bool {
        let kept = std::mem::take(&mut self.ol_index);
        self.reindex_all();
        let fresh = std::mem::replace(&mut self.ol_index, kept);
        fresh == self.ol_index
    }
}

/// Offset and size of the bitmap directory (bitmaps extension).
fn bitmap_directory(h: &header::Header) -> Option<(u64, u64)> {
    let b = h.bitmaps_ext.as_ref()?;
    if b.len() < 24 {
        return None;
    }
    let size = u64::from_be_bytes(b[8..16].try_into().ok()?);
    let off = u64::from_be_bytes(b[16..24].try_into().ok()?);
    Some((off, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::amend::Amend;
    use crate::qcow2::create::{create, CreateOptions};
    use crate::qcow2::{OpenOptions, Qcow2};
    use crate::storage::{MemStorage, Storage};
    use std::sync::Arc;

    /// The index is kept up to date by every operation that moves tables.
    #[test]
    fn index_follows_every_table_move() {
        for (cs, bits) in [(4096u64, 16u32), (512, 64)] {
            let f: Arc<dyn Storage> = Arc::new(MemStorage::new(Vec::new(), 1 << 32));
            let o = CreateOptions {
                size: 32 << 20,
                cluster_size: cs,
                refcount_bits: bits,
                ..Default::default()
            };
            create("ix", f.clone(), None, &o).unwrap();
            let oo = OpenOptions {
                overlap_check: ALL,
                ..Default::default()
            };
            let img = Qcow2::open("ix", f.clone(), None, None, &oo).unwrap();
            let fresh = |img: &Qcow2, what: &str| {
                let mut m = img.lock();
                assert!(m.index_is_fresh(), "cs {cs}: after {what}");
                assert!(!m.ol_index.l2.is_empty() || what == "open");
            };
            fresh(&img, "open");
            // Many L2 tables, and (512-byte clusters, 64-bit refcounts)
            // many refcount blocks and a refcount table that grows.
            for i in 0..24u64 {
                img.write(i * (1 << 20) + 512, &[i as u8; 3000], false)
                    .unwrap();
            }
            img.flush().unwrap();
            fresh(&img, "writes");
            img.snapshot_create("a", (0, 0)).unwrap();
            fresh(&img, "snapshot create");
            img.write(0, &[9; 70_000], false).unwrap();
            img.discard(4 << 20, 1 << 20).unwrap();
            img.flush().unwrap();
            fresh(&img, "copy-on-write of shared tables");
            img.snapshot_create("b", (0, 0)).unwrap();
            img.snapshot_apply("a").unwrap();
            fresh(&img, "snapshot apply");
            img.snapshot_delete("b").unwrap();
            fresh(&img, "snapshot delete");
            img.snapshot_delete("a").unwrap();
            img.truncate(3 << 30).unwrap();
            img.write((3 << 30) - 4096, &[1; 4096], false).unwrap();
            img.flush().unwrap();
            fresh(&img, "L1 growth");
            img.amend(&Amend {
                refcount_bits: Some(8),
                ..Default::default()
            })
            .unwrap();
            fresh(&img, "refcount width change");
            img.write(9 << 20, &[7; 5000], false).unwrap();
            img.close().unwrap();
            fresh(&img, "close");
        }
    }

    #[test]
    fn ranges_merge_into_disjoint_ones() {
        let d = disjoint(vec![(10, 20), (0, 5), (15, 30), (30, 31), (40, 41)]);
        let v: Vec<_> = d.into_iter().collect();
        assert_eq!(v, vec![(0, 5), (10, 31), (40, 41)]);
    }

    #[test]
    fn templates() {
        assert_eq!(template("none"), Some(0));
        assert_eq!(template("cached"), Some(CACHED));
        assert_eq!(template("all").map(|m| m & INACTIVE_L2), Some(INACTIVE_L2));
        assert_eq!(template("bogus"), None);
        assert_eq!(CACHED & INACTIVE_L2, 0);
    }
}
