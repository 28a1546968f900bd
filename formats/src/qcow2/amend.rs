//! Changing an existing image's metadata in place, for `strata-img amend`,
//! `rebase` and `commit`: the backing file name and format, the version
//! (compat 0.10 <-> 1.1; a downgrade turns the zero clusters of the active
//! state and of every internal snapshot into what version 2 can express),
//! lazy refcounts, the refcount width, and emptying
//! an image (every cluster unallocated); and, on a read-only open, showing
//! an internal snapshot instead of the active state (`convert -l`,
//! `measure -l`). qcow2.rst is the reference; the
//! refcount width change builds a complete new refcount table and blocks
//! after the end of the file, then switches the header to them.

use super::header::{Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_DIRTY};
use super::l2::Kind;
use super::refcount::rb_set;
use super::{DiscardType, Qcow2};
use crate::error::{FResult, FormatError};

/// What `amend` changes (`None`: leave as it is).
#[derive(Clone, Debug, Default)]
pub struct Amend {
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: Option<u32>,
    /// lazy_refcounts.
    pub lazy_refcounts: Option<bool>,
    /// refcount_bits (a power of two, 1 to 64).
    pub refcount_bits: Option<u32>,
}

impl Qcow2 {
    fn invalid(&self, m: impl std::fmt::Display) -> FormatError {
        FormatError::Invalid(format!("{}: {m}", self.name()))
    }

    /// Point the header at another backing file (`None`: no backing file).
    /// Only the header changes; `rebase` copies data first.
    pub fn set_backing(&self, file: Option<&str>, format: Option<&str>) -> FResult<()> {
        if self.is_read_only() {
            return Err(FormatError::ReadOnly(format!(
                "{}: the image is read-only",
                self.name()
            )));
        }
        let mut m = self.exclusive();
        m.flush_all()?;
        m.h.backing_file = file.map(str::to_string);
        m.h.backing_format = file.and(format).map(str::to_string);
        // Refuse names that do not fit before changing anything on disk.
        m.h.serialize()?;
        m.write_header()
    }

    /// Read-only opens only: make reads see the internal snapshot
    /// `id_or_name` (its L1 table) instead of the active
    /// state, at the current virtual size. Nothing is written.
    pub fn load_snapshot_readonly(&self, id_or_name: &str) -> FResult<()> {
        self.load_snapshot_readonly_by(&super::snapshot::SnapshotRef::IdOrName(id_or_name))
    }

    /// [`Qcow2::load_snapshot_readonly`] with QEMU's ways of naming the
    /// snapshot (`snapshot.id=`/`snapshot.name=` or a bare ID-or-name).
    pub fn load_snapshot_readonly_by(
        &self,
        which: &super::snapshot::SnapshotRef<'_>,
    ) -> FResult<()> {
        if !self.is_read_only() {
            return Err(self.invalid("a snapshot can only be loaded on a read-only image"));
        }
        let mut m = self.lock();
        let Some(i) = m.find_snapshot_by(which) else {
            return Err(self.invalid(format!("Can't find snapshot '{which}'")));
        };
        let s = m.snapshots[i].clone();
        let cs = m.cs;
        if !s.l1_offset.is_multiple_of(cs) || (s.l1_size > 0 && s.l1_offset == 0) {
            return Err(m.corrupt(format!("snapshot '{}': invalid L1 table offset", s.name)));
        }
        if s.l1_size as u64 * 8 > super::header::MAX_L1_BYTES {
            return Err(m.corrupt(format!("snapshot '{}': L1 table too large", s.name)));
        }
        let mut raw = vec![0u8; s.l1_size as usize * 8];
        m.file
            .read_at(s.l1_offset, &mut raw)
            .map_err(|e| m.ioe(e, "reading a snapshot L1 table"))?;
        let l1: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        // The virtual size stays the current one, as in QEMU's temporary
        // snapshot load; L1 entries past the snapshot's table read as
        // unallocated.
        m.l1 = l1;
        m.reindex_l1();
        m.l2c = super::cache::Cache::new(m.l2c.capacity(), None);
        Ok(())
    }

    /// Make every cluster of the active image unallocated (what is left
    /// reads from the backing file), as `commit` does to the committed image.
    pub fn make_empty(&self) -> FResult<()> {
        let size = self.size();
        let cs = self.cluster_size();
        self.discard_typed(0, size.div_ceil(cs) * cs, DiscardType::Snapshot, true)?;
        self.flush()
    }

    /// Change version, lazy refcounts and refcount width.
    pub fn amend(&self, a: &Amend) -> FResult<()> {
        if self.is_read_only() {
            return Err(FormatError::ReadOnly(format!(
                "{}: the image is read-only",
                self.name()
            )));
        }
        let h = self.header();
        let version = a.version.unwrap_or(h.version);
        let lazy = a
            .lazy_refcounts
            .unwrap_or(h.compatible & COMPAT_LAZY_REFCOUNTS != 0);
        let bits = a.refcount_bits.unwrap_or(h.refcount_bits());
        if !bits.is_power_of_two() || bits > 64 {
            return Err(
                self.invalid("Refcount width must be a power of two and may not exceed 64 bits")
            );
        }
        if version == 2 {
            if lazy {
                return Err(self.invalid(
                    "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
                ));
            }
            if bits != 16 {
                return Err(self.invalid(
                    "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
                ));
            }
            if h.extended_l2() {
                return Err(self
                    .invalid("Cannot downgrade an image with extended L2 entries to compat=0.10"));
            }
            if h.data_file.is_some() {
                return Err(
                    self.invalid("Cannot downgrade an image with a data file to compat=0.10")
                );
            }
            if h.compression_type != 0 {
                return Err(
                    self.invalid("Cannot downgrade an image with zstd compression to compat=0.10")
                );
            }
            if h.version == 3 && h.crypt_method != 0 && h.nb_snapshots > 0 {
                // The zero clusters of snapshots are written as zeroes in
                // place, outside the data path that encrypts.
                return Err(self.invalid(
                    "Cannot downgrade an encrypted image with internal snapshots to compat=0.10",
                ));
            }
        }
        if version == 3 && h.version == 2 {
            // Upgrade first: a version 2 header cannot record the width.
            let mut m = self.exclusive();
            m.flush_exact()?;
            m.h.version = 3;
            m.h.refcount_order = 4;
            m.h.feature_table = Header::default_feature_table();
            m.write_header()?;
        }
        if bits != self.header().refcount_bits() {
            self.change_refcount_width(bits.trailing_zeros())?;
        }
        if version == 2 && h.version == 3 {
            self.expand_zero_clusters()?;
            self.expand_snapshot_zero_clusters()?;
        }
        let mut m = self.exclusive();
        m.flush_exact()?;
        let mut nh: Header = m.h.clone();
        nh.version = version;
        if lazy {
            nh.compatible |= COMPAT_LAZY_REFCOUNTS;
        } else {
            nh.compatible &= !COMPAT_LAZY_REFCOUNTS;
        }
        if version == 2 {
            nh.incompatible = 0;
            nh.compatible = 0;
            nh.autoclear = 0;
            nh.extra_fields.clear();
            nh.feature_table.clear();
            nh.bitmaps_ext = None;
        }
        nh.incompatible &= !INCOMPAT_DIRTY;
        nh.serialize()?;
        m.h = nh;
        // Like QEMU's amend, the new setting holds for this open too.
        m.lazy = lazy;
        m.write_header()
    }

    /// Version 2 has no zero flag: zero clusters become unallocated (no
    /// backing file) or explicitly written zeroes (over a backing file).
    fn expand_zero_clusters(&self) -> FResult<()> {
        let size = self.size();
        let cs = self.cluster_size();
        let has_backing = self.live_backing().is_some();
        let zeros = vec![0u8; cs as usize];
        let mut off = 0;
        while off < size {
            let st = self.block_status(off, size - off)?;
            let len = st.len.max(1).min(size - off);
            if st.kind == Kind::Zero {
                let a = off - off % cs;
                let b = (off + len).div_ceil(cs) * cs;
                if has_backing {
                    let mut p = a;
                    while p < b.min(size) {
                        let n = cs.min(size - p);
                        self.write(p, &zeros[..n as usize], false)?;
                        p += n;
                    }
                } else {
                    self.discard_typed(a, b - a, DiscardType::Other, true)?;
                }
                off = b;
                continue;
            }
            off += len;
        }
        self.flush()
    }

    /// The zero clusters of the internal snapshots, for version 2 (which
    /// keeps its snapshot table as it is: extra data is allowed there).
    /// Runs after [`Qcow2::expand_zero_clusters`], so the L2 tables of the
    /// active state hold no zero entries; an L2 table only snapshots use
    /// is rewritten in place. Its refcount `k` is the number of views
    /// (L1 tables) that see it, and each data cluster it points at counts
    /// `k` references from it. A zero entry becomes:
    /// * with a host cluster only these views reference (refcount `k`):
    ///   that cluster, zeroed;
    /// * otherwise, without a backing file: unallocated (reads as zeroes);
    ///   with one: a new zeroed cluster with refcount `k`; a host cluster
    ///   it had loses its `k` references (QEMU 10 zeroes a shared host
    ///   cluster in place instead, which changes what the other views
    ///   read: not done here).
    fn expand_snapshot_zero_clusters(&self) -> FResult<()> {
        use super::{OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
        let mut m = self.exclusive();
        m.flush_all()?;
        let cs = m.cs;
        let has_backing = self.live_backing().is_some();
        let file_len = m.file_len()?;
        let zeros = vec![0u8; cs as usize];
        let mut done: std::collections::BTreeSet<u64> =
            m.l1.iter().map(|e| e & OFFSET_MASK).collect();
        for s in m.snapshots.clone() {
            if s.l1_size == 0 {
                continue;
            }
            if !s.l1_offset.is_multiple_of(cs)
                || s.l1_offset == 0
                || s.l1_size as u64 * 8 > super::header::MAX_L1_BYTES
            {
                return Err(m.corrupt(format!("snapshot '{}': invalid L1 table", s.name)));
            }
            let mut raw = vec![0u8; s.l1_size as usize * 8];
            m.file
                .read_at(s.l1_offset, &mut raw)
                .map_err(|e| m.ioe(e, "reading a snapshot L1 table"))?;
            for c in raw.chunks_exact(8) {
                let l2 = u64::from_be_bytes(c.try_into().unwrap_or([0; 8])) & OFFSET_MASK;
                if l2 == 0 || !done.insert(l2) {
                    continue;
                }
                if !l2.is_multiple_of(cs) || l2.saturating_add(cs) > file_len {
                    return Err(m.corrupt(format!(
                        "snapshot '{}': invalid L2 table offset 0x{l2:x}",
                        s.name
                    )));
                }
                let mut t = vec![0u8; cs as usize];
                m.file
                    .read_at(l2, &mut t)
                    .map_err(|e| m.ioe(e, "reading a snapshot L2 table"))?;
                let k = m.get_refcount(l2 / cs)?;
                let mut changed = false;
                let mut dropped = Vec::new();
                for ent in t.chunks_exact_mut(8) {
                    let e = u64::from_be_bytes((&*ent).try_into().unwrap_or([0; 8]));
                    if e & OFLAG_COMPRESSED != 0 || e & OFLAG_ZERO == 0 {
                        continue;
                    }
                    let host = e & OFFSET_MASK;
                    let ne = if host != 0 && m.get_refcount(host / cs)? == k {
                        m.check_overlap(host, cs, 0)?;
                        m.file
                            .write_at(host, &zeros)
                            .map_err(|e| m.ioe(e, "zeroing a cluster"))?;
                        e & !OFLAG_ZERO
                    } else {
                        if host != 0 {
                            dropped.push(host);
                        }
                        if has_backing {
                            let new = m.alloc_clusters(1)?;
                            if k != 1 {
                                m.set_refcount(new / cs, k)?;
                            }
                            m.check_overlap(new, cs, 0)?;
                            m.file
                                .write_at(new, &zeros)
                                .map_err(|e| m.ioe(e, "zeroing a cluster"))?;
                            new | if k == 1 { OFLAG_COPIED } else { 0 }
                        } else {
                            0
                        }
                    };
                    ent.copy_from_slice(&ne.to_be_bytes());
                    changed = true;
                }
                if !changed {
                    continue;
                }
                // New clusters (data and refcounts) before the table that
                // points at them; references dropped only once it is
                // durable.
                m.sync_refcounts()?;
                m.sync()?;
                m.write_meta(l2, &t, super::overlap::L2_TABLES)?;
                m.sync()?;
                for h in dropped {
                    m.add_refcount(h / cs, -(k as i64))?;
                }
            }
        }
        m.drop_l2_cache()?;
        m.flush_all()
    }

    /// Rewrite the refcount structure with `2^order`-bit entries.
    fn change_refcount_width(&self, order: u32) -> FResult<()> {
        let mut m = self.exclusive();
        m.flush_exact()?;
        let cs = m.cs;
        let end = m.file_len()?.max(m.alloc_end);
        let n = end.div_ceil(cs);
        let mut counts = Vec::with_capacity(n as usize);
        for i in 0..n {
            counts.push(m.get_refcount(i)?);
        }
        let new_max = if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << order)) - 1
        };
        if let Some((i, c)) = counts.iter().enumerate().find(|(_, c)| **c > new_max) {
            return Err(self.invalid(format!(
                "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a refcount of {c}",
                1u32 << order,
                i as u64 * cs
            )));
        }
        // The old table and blocks become free.
        let old_rt = m.h.refcount_table_offset / cs;
        for c in 0..m.h.refcount_table_clusters as u64 {
            if let Some(x) = counts.get_mut((old_rt + c) as usize) {
                *x = 0;
            }
        }
        for &e in &m.reftable {
            let off = e & super::REFT_OFFSET_MASK;
            if off != 0 {
                if let Some(x) = counts.get_mut((off / cs) as usize) {
                    *x = 0;
                }
            }
        }
        // New blocks and table after the end of the file, covering
        // themselves.
        let per_block = (cs * 8) >> order;
        let (mut blocks, mut table) = (0u64, 0u64);
        loop {
            let total = n + blocks + table;
            let nb = total.div_ceil(per_block);
            let nt = (nb * 8).div_ceil(cs);
            if (nb, nt) == (blocks, table) {
                break;
            }
            (blocks, table) = (nb, nt);
        }
        if table * cs > super::header::MAX_REFTABLE_BYTES {
            return Err(self.invalid("the refcount table would be too large"));
        }
        let first_block = n;
        let table_at = n + blocks;
        counts.resize((n + blocks + table) as usize, 0);
        for c in n..n + blocks + table {
            counts[c as usize] = 1;
        }
        let mut rt = vec![0u8; (table * cs) as usize];
        for b in 0..blocks {
            let mut blk = vec![0u8; cs as usize];
            for i in 0..per_block {
                let idx = b * per_block + i;
                match counts.get(idx as usize) {
                    Some(&v) if v > 0 => rb_set(&mut blk, i as usize, order, v),
                    Some(_) => {}
                    None => break,
                }
            }
            let at = (first_block + b) * cs;
            m.write_meta(at, &blk, super::overlap::REFCOUNT_BLOCK)?;
            rt[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&at.to_be_bytes());
        }
        m.write_meta(table_at * cs, &rt, super::overlap::REFCOUNT_TABLE)?;
        m.sync()?;
        m.h.refcount_order = order;
        m.h.refcount_table_offset = table_at * cs;
        m.h.refcount_table_clusters = table as u32;
        m.write_header()?;
        m.reftable = rt
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        m.reindex_reftable();
        m.rbc = super::cache::Cache::new(m.rbc.capacity(), None);
        m.alloc_end = m.alloc_end.max((table_at + table) * cs);
        m.free_cursor = 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::check::Repair;
    use crate::qcow2::create::{create, CreateOptions};
    use crate::qcow2::OpenOptions;
    use crate::storage::{MemStorage, Storage};
    use std::sync::Arc;

    fn image() -> (Arc<dyn Storage>, Qcow2) {
        let f: Arc<dyn Storage> = Arc::new(MemStorage::new(Vec::new(), 1 << 30));
        let o = CreateOptions {
            size: 8 << 20,
            ..Default::default()
        };
        create("t", f.clone(), None, &o).unwrap();
        let img = Qcow2::open("t", f.clone(), None, None, &OpenOptions::default()).unwrap();
        (f, img)
    }

    fn contents(img: &Qcow2) -> Vec<u8> {
        let mut v = vec![0u8; img.size() as usize];
        img.read(0, &mut v).unwrap();
        v
    }

    #[test]
    fn refcount_width_and_version_changes_keep_data_and_refcounts() {
        let (_f, img) = image();
        img.write(0, &[7u8; 200_000], false).unwrap();
        img.write_zeroes(3 << 20, 1 << 20, false).unwrap();
        img.write(5 << 20, &[9u8; 70_000], false).unwrap();
        img.flush().unwrap();
        let before = contents(&img);
        for a in [
            Amend {
                refcount_bits: Some(1),
                ..Default::default()
            },
            Amend {
                refcount_bits: Some(64),
                ..Default::default()
            },
            Amend {
                refcount_bits: Some(16),
                version: Some(2),
                ..Default::default()
            },
            Amend {
                version: Some(3),
                refcount_bits: Some(8),
                lazy_refcounts: Some(true),
            },
        ] {
            img.amend(&a).unwrap();
            let r = img.check(Repair::None).unwrap();
            assert_eq!((r.corruptions_after(), r.leaks_after()), (0, 0), "{a:?}");
            assert_eq!(contents(&img), before, "{a:?}");
            let h = img.header();
            if let Some(b) = a.refcount_bits {
                assert_eq!(h.refcount_bits(), b);
            }
            if let Some(v) = a.version {
                assert_eq!(h.version, v);
            }
        }
        // Writes after the changes allocate through the new structure.
        img.write(6 << 20, &[5u8; 300_000], false).unwrap();
        img.flush().unwrap();
        let r = img.check(Repair::None).unwrap();
        assert_eq!((r.corruptions_after(), r.leaks_after()), (0, 0));
    }

    #[test]
    fn downgrade_refuses_what_version_2_cannot_hold() {
        let (_f, img) = image();
        let a = Amend {
            version: Some(2),
            lazy_refcounts: Some(true),
            ..Default::default()
        };
        assert!(img.amend(&a).is_err());
        let a = Amend {
            version: Some(2),
            refcount_bits: Some(4),
            ..Default::default()
        };
        assert!(img.amend(&a).is_err());
        let a = Amend {
            refcount_bits: Some(3),
            ..Default::default()
        };
        assert!(img.amend(&a).is_err());
    }

    #[test]
    fn downgrade_with_snapshots_keeps_every_view() {
        let (f, img) = image();
        img.write(0, &[7u8; 200_000], false).unwrap();
        img.write_zeroes(1 << 20, 1 << 16, true).unwrap();
        img.snapshot_create("s1", (0, 0)).unwrap();
        // Zero clusters over data the snapshot shares, with and without
        // keeping the host cluster, and only in the snapshot's tables.
        img.write_zeroes(0, 1 << 16, false).unwrap();
        img.write_zeroes(1 << 16, 1 << 16, true).unwrap();
        img.write(3 << 20, &[5u8; 4096], false).unwrap();
        img.flush().unwrap();
        let active = contents(&img);
        img.amend(&Amend {
            version: Some(2),
            ..Default::default()
        })
        .unwrap();
        let r = img.check(Repair::None).unwrap();
        assert_eq!((r.corruptions_after(), r.leaks_after()), (0, 0));
        assert_eq!(contents(&img), active);
        img.close().unwrap();
        drop(img);
        let ro = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        let img = Qcow2::open("t", f, None, None, &ro).unwrap();
        assert_eq!(img.header().version, 2);
        img.load_snapshot_readonly("s1").unwrap();
        let snap = contents(&img);
        assert!(snap[..200_000].iter().all(|&b| b == 7));
        assert!(snap[200_000..].iter().all(|&b| b == 0));
    }

    #[test]
    fn snapshot_named_by_id_name_or_both() {
        use crate::qcow2::snapshot::SnapshotRef;
        let (f, img) = image();
        img.write(0, &[1u8; 4096], false).unwrap();
        // ID 1, named "2"; then ID 2, named "two".
        img.snapshot_create("2", (0, 0)).unwrap();
        img.write(0, &[2u8; 4096], false).unwrap();
        img.snapshot_create("two", (0, 0)).unwrap();
        img.write(0, &[3u8; 4096], false).unwrap();
        img.close().unwrap();
        drop(img);
        let ro = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        let first = |which: SnapshotRef<'_>| -> Result<u8, String> {
            let img = Qcow2::open("t", f.clone(), None, None, &ro).unwrap();
            img.load_snapshot_readonly_by(&which)
                .map_err(|e| e.to_string())?;
            let mut b = [0u8; 1];
            img.read(0, &mut b).unwrap();
            Ok(b[0])
        };
        let exact = |id, name| SnapshotRef::Exact { id, name };
        // A bare word is an ID first, then a name.
        assert_eq!(first(SnapshotRef::IdOrName("2")), Ok(2));
        assert_eq!(first(SnapshotRef::IdOrName("two")), Ok(2));
        assert_eq!(first(exact(None, Some("2"))), Ok(1));
        assert_eq!(first(exact(Some("2"), None)), Ok(2));
        assert_eq!(first(exact(Some("1"), Some("2"))), Ok(1));
        let e = first(exact(Some("1"), Some("two"))).unwrap_err();
        assert!(e.contains("snapshot.id=1,snapshot.name=two"), "{e}");
        assert!(first(exact(None, None)).is_err());
    }

    #[test]
    fn backing_name_and_make_empty() {
        let (f, img) = image();
        img.write(0, &[1u8; 65536], false).unwrap();
        img.set_backing(Some("base.img"), Some("raw")).unwrap();
        let h = img.header();
        assert_eq!(h.backing_file.as_deref(), Some("base.img"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        img.make_empty().unwrap();
        assert!(contents(&img).iter().all(|&b| b == 0));
        img.set_backing(None, Some("raw")).unwrap();
        assert_eq!(img.header().backing_format, None);
        drop(img);
        let ro = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        let img = Qcow2::open("t", f, None, None, &ro).unwrap();
        let r = img.check(Repair::None).unwrap();
        assert_eq!((r.corruptions_after(), r.leaks_after()), (0, 0));
        assert!(img.load_snapshot_readonly("none").is_err());
    }
}
