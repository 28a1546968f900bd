//! Internal snapshots (qcow2.rst: "Snapshots", "Snapshot table entry"):
//! the snapshot table is read and validated at open; listing works on any
//! image. Every length is bounded (QEMU's limits: 65536 snapshots, 1 KiB of
//! extra data per entry, 64 MiB of table) before anything is allocated.

use super::Meta;
use crate::error::FResult;

/// Largest extra data QEMU writes or accepts.
pub const MAX_EXTRA: u32 = 1024;
/// Largest snapshot table.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;

/// One snapshot table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// L1 table offset.
    pub l1_offset: u64,
    /// L1 entries.
    pub l1_size: u32,
    /// Unique ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Seconds since the epoch.
    pub date_sec: u32,
    /// Nanoseconds.
    pub date_nsec: u32,
    /// Guest run time in ns.
    pub vm_clock_nsec: u64,
    /// VM state size.
    pub vm_state_size: u64,
    /// Virtual disk size when taken (extra data), if recorded.
    pub disk_size: Option<u64>,
    /// icount (extra data), if recorded.
    pub icount: Option<u64>,
    /// Extra data beyond what we know, kept.
    pub extra_rest: Vec<u8>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

/// Read the snapshot table of `m`, and its size in bytes.
pub(crate) fn read_table(m: &Meta) -> FResult<(Vec<Snapshot>, u64)> {
    read_sized(&*m.file, &m.h, &m.name)
}

/// Read and validate the snapshot table described by header `h` of the
/// image `file` (for listing without a full open, e.g. `info`).
pub fn read_snapshots(
    file: &dyn crate::storage::Storage,
    h: &super::header::Header,
    name: &str,
) -> FResult<Vec<Snapshot>> {
    read_sized(file, h, name).map(|(v, _)| v)
}

fn read_sized(
    file: &dyn crate::storage::Storage,
    h: &super::header::Header,
    name: &str,
) -> FResult<(Vec<Snapshot>, u64)> {
    let corrupt = |w: String| crate::error::FormatError::Corrupt(format!("{name}: {w}"));
    let ioe = |e| crate::error::FormatError::io(e, format!("{name}: reading the snapshot table"));
    let cs = h.cluster_size();
    let mut v = Vec::new();
    let mut off = h.snapshots_offset;
    let mut total = 0u64;
    for i in 0..h.nb_snapshots {
        let mut hd = [0u8; 40];
        file.read_at(off, &mut hd).map_err(ioe)?;
        let l1_offset = be64(&hd, 0);
        let l1_size = be32(&hd, 8);
        let id_len = u16::from_be_bytes([hd[12], hd[13]]) as u64;
        let name_len = u16::from_be_bytes([hd[14], hd[15]]) as u64;
        let extra = be32(&hd, 36);
        if extra > MAX_EXTRA {
            return Err(corrupt(format!("snapshot {i}: too much extra data")));
        }
        if !l1_offset.is_multiple_of(cs) || l1_size as u64 * 8 > super::header::MAX_L1_BYTES {
            return Err(corrupt(format!("snapshot {i}: invalid L1 table")));
        }
        let len = 40 + extra as u64 + id_len + name_len;
        total += len.div_ceil(8) * 8;
        if total > MAX_TABLE_BYTES {
            return Err(corrupt("snapshot table too large".into()));
        }
        let mut rest = vec![0u8; (len - 40) as usize];
        file.read_at(off + 40, &mut rest).map_err(ioe)?;
        let ex = &rest[..extra as usize];
        let vm_state_size = if ex.len() >= 8 {
            be64(ex, 0)
        } else {
            be32(&hd, 32) as u64
        };
        let disk_size = (ex.len() >= 16).then(|| be64(ex, 8));
        let icount = (ex.len() >= 24).then(|| be64(ex, 16));
        let extra_rest = if ex.len() > 24 {
            ex[24..].to_vec()
        } else {
            Vec::new()
        };
        let e = extra as usize;
        let id = String::from_utf8_lossy(&rest[e..e + id_len as usize]).into_owned();
        let name = String::from_utf8_lossy(&rest[e + id_len as usize..]).into_owned();
        v.push(Snapshot {
            l1_offset,
            l1_size,
            id,
            name,
            date_sec: be32(&hd, 16),
            date_nsec: be32(&hd, 20),
            vm_clock_nsec: be64(&hd, 24),
            vm_state_size,
            disk_size,
            icount,
            extra_rest,
        });
        off += len.div_ceil(8) * 8;
    }
    Ok((v, total))
}

/// Serialize a snapshot table.
pub fn serialize_table(snaps: &[Snapshot]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in snaps {
        let mut ex = Vec::new();
        ex.extend_from_slice(&s.vm_state_size.to_be_bytes());
        ex.extend_from_slice(&s.disk_size.unwrap_or(0).to_be_bytes());
        if let Some(ic) = s.icount {
            ex.extend_from_slice(&ic.to_be_bytes());
            ex.extend_from_slice(&s.extra_rest);
        }
        let mut e = Vec::new();
        e.extend_from_slice(&s.l1_offset.to_be_bytes());
        e.extend_from_slice(&s.l1_size.to_be_bytes());
        e.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
        e.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
        e.extend_from_slice(&s.date_sec.to_be_bytes());
        e.extend_from_slice(&s.date_nsec.to_be_bytes());
        e.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        e.extend_from_slice(&(s.vm_state_size.min(u32::MAX as u64) as u32).to_be_bytes());
        e.extend_from_slice(&(ex.len() as u32).to_be_bytes());
        e.extend_from_slice(&ex);
        e.extend_from_slice(s.id.as_bytes());
        e.extend_from_slice(s.name.as_bytes());
        e.resize(e.len().div_ceil(8) * 8, 0);
        out.extend_from_slice(&e);
    }
    out
}

// ---------------------------------------------------------------------
// Snapshot operations: create, apply ("goto"), delete.
//
// Refcount model (the one `qemu-img check` counts): an L2 table has one
// reference per L1 table (active or snapshot) that points at it, and a
// data cluster one reference per L1 table that reaches it. Taking a
// snapshot therefore adds one to the L2 tables and data clusters of the
// active L1; deleting one subtracts one along its L1. After each change
// the COPIED flags of the active L1 and its L2 tables are recomputed
// (set exactly where the refcount is 1), since writes in place rely on
// them and `qemu-img check` reports any mismatch.
//
// Ordering for crashes: increments are made durable before the new
// reference (snapshot table, header, L1) is written; decrements only
// after the reference is gone on disk. A crash leaks clusters at worst.
// All of it runs with the metadata lock held and nothing in flight
// (`Qcow2::exclusive`), after a full flush, with the L2 cache emptied: the L2
// tables are read and rewritten directly in the file.

use super::{overlap, DiscardType, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::error::FormatError;

/// Longest ID or name QEMU stores (the fields are 16-bit lengths).
pub const MAX_NAME: usize = 65535;

impl Meta {
    fn read_words(&self, off: u64, n: u64, what: &str) -> FResult<Vec<u64>> {
        let end = off
            .checked_add(n * 8)
            .ok_or_else(|| self.fatal(format!("{what} offset overflows")))?;
        if end > self.file_len()?.max(self.alloc_end) {
            return Err(self.fatal(format!(
                "{what} at 0x{off:x} lies beyond the end of the image"
            )));
        }
        let mut raw = vec![0u8; (n * 8) as usize];
        self.file
            .read_at(off, &mut raw)
            .map_err(|e| self.ioe(e, "reading a table"))?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    }

    /// Write a table of kind `ign` (an overlap bit).
    fn write_words(&self, off: u64, w: &[u64], ign: u32) -> FResult<()> {
        let raw: Vec<u8> = w.iter().flat_map(|x| x.to_be_bytes()).collect();
        self.write_meta(off, &raw, ign)
    }

    /// Drop every (clean) L2 slice: the tables are about to change on disk.
    pub(crate) fn drop_l2_cache(&mut self) -> FResult<()> {
        self.write_dirty_l2()?;
        for k in self.l2c.keys() {
            self.l2c.remove(k);
        }
        Ok(())
    }

    /// Add `addend` (+1 or -1) to the refcounts along `l1`: its L2 tables
    /// and every cluster they reference.
    fn update_refcounts(&mut self, l1: &[u64], addend: i64) -> FResult<()> {
        let cs = self.cs;
        let ew = self.entry_words();
        let nent = self.h.l2_entries();
        for &e in l1 {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if !l2.is_multiple_of(cs) {
                return Err(self.fatal(format!("L2 table offset 0x{l2:x} unaligned")));
            }
            let t = self.read_words(l2, cs / 8, "L2 table")?;
            for j in 0..nent as usize {
                let le = t[j * ew as usize];
                if le & OFLAG_COMPRESSED == 0 && !(le & OFFSET_MASK).is_multiple_of(cs) {
                    return Err(self.fatal(format!(
                        "data cluster offset 0x{:x} unaligned",
                        le & OFFSET_MASK
                    )));
                }
                if let Some((o, n)) = self.entry_refs(le) {
                    for k in 0..n {
                        self.add_refcount(o / cs + k, addend)?;
                    }
                }
            }
            self.add_refcount(l2 / cs, addend)?;
        }
        Ok(())
    }

    /// Recompute the COPIED flags of the active L1 and its L2 tables.
    fn fix_copied_flags(&mut self) -> FResult<()> {
        let cs = self.cs;
        let ew = self.entry_words() as usize;
        let nent = self.h.l2_entries() as usize;
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let mut t = self.read_words(l2, cs / 8, "L2 table")?;
            let mut changed = false;
            for j in 0..nent {
                let le = t[j * ew];
                let host = le & OFFSET_MASK;
                if le & OFLAG_COMPRESSED != 0 || host == 0 || self.data.is_some() {
                    continue;
                }
                let one = self.get_refcount(host / cs)? == 1;
                let ne = if one {
                    le | OFLAG_COPIED
                } else {
                    le & !OFLAG_COPIED
                };
                if ne != le {
                    t[j * ew] = ne;
                    changed = true;
                }
            }
            if changed {
                self.write_words(l2, &t, overlap::L2_TABLES)?;
            }
            let one = self.get_refcount(l2 / cs)? == 1;
            let ne = if one {
                e | OFLAG_COPIED
            } else {
                e & !OFLAG_COPIED
            };
            if ne != e {
                self.l1[i] = ne;
                self.index_l1_change(e, ne);
                self.l1_dirty.insert(i as u64 * 8 / 512);
            }
        }
        Ok(())
    }

    /// Write `snaps` as the new snapshot table, point the header at it and
    /// release the old table.
    fn write_snapshot_table(&mut self, snaps: Vec<Snapshot>) -> FResult<()> {
        let raw = serialize_table(&snaps);
        let old = (self.h.snapshots_offset, self.h.nb_snapshots);
        let old_len = serialize_table(&self.snapshots).len() as u64;
        let off = if raw.is_empty() {
            0
        } else {
            let n = (raw.len() as u64).div_ceil(self.cs);
            let off = self.alloc_clusters(n)?;
            self.sync_refcounts()?;
            let mut buf = raw.clone();
            buf.resize((n * self.cs) as usize, 0);
            self.write_meta(off, &buf, overlap::SNAPSHOT_TABLE)?;
            self.sync()?;
            off
        };
        self.h.snapshots_offset = off;
        self.h.nb_snapshots = snaps.len() as u32;
        self.write_header()?;
        self.snapshots = snaps;
        self.snapshots_size = raw.len() as u64;
        // Before the old table and any snapshot L1 table can be freed
        // and reused.
        self.reindex_snapshots();
        if old.1 > 0 && old.0 != 0 && old_len > 0 {
            let first = old.0 / self.cs;
            let last = (old.0 + old_len - 1) / self.cs;
            self.queue_free(first * self.cs, last - first + 1, DiscardType::Snapshot);
        }
        Ok(())
    }

    fn snapshots_allowed(&self) -> FResult<()> {
        self.writable()?;
        if self.data.is_some() {
            return Err(FormatError::Unsupported(format!(
                "{}: internal snapshots are not supported with an external data file",
                self.name
            )));
        }
        Ok(())
    }

    /// Index of the snapshot named by ID first, then by name (QEMU's
    /// lookup order).
    pub(crate) fn find_snapshot(&self, id_or_name: &str) -> Option<usize> {
        self.snapshots
            .iter()
            .position(|s| s.id == id_or_name)
            .or_else(|| self.snapshots.iter().position(|s| s.name == id_or_name))
    }
}

/// How a user names an internal snapshot (QEMU's `SNAPSHOT_PARAM` of
/// `qemu-img convert -l` and `qemu-nbd -l`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotRef<'a> {
    /// A bare word: the snapshot with that ID, else the one with that name.
    IdOrName(&'a str),
    /// `snapshot.id=`, `snapshot.name=`: each one given must match.
    Exact {
        id: Option<&'a str>,
        name: Option<&'a str>,
    },
}

impl std::fmt::Display for SnapshotRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotRef::IdOrName(s) => f.write_str(s),
            SnapshotRef::Exact { id, name } => match (id, name) {
                (Some(i), Some(n)) => write!(f, "snapshot.id={i},snapshot.name={n}"),
                (Some(i), None) => write!(f, "snapshot.id={i}"),
                (None, Some(n)) => write!(f, "snapshot.name={n}"),
                (None, None) => Ok(()),
            },
        }
    }
}

impl Meta {
    /// Index of the snapshot `which` names.
    pub(crate) fn find_snapshot_by(&self, which: &SnapshotRef<'_>) -> Option<usize> {
        match *which {
            SnapshotRef::IdOrName(s) => self.find_snapshot(s),
            // Naming nothing finds nothing (QEMU refuses it the same way).
            SnapshotRef::Exact {
                id: None,
                name: None,
            } => None,
            SnapshotRef::Exact { id, name } => self
                .snapshots
                .iter()
                .position(|s| id.is_none_or(|i| s.id == i) && name.is_none_or(|n| s.name == n)),
        }
    }
}

/// The ID a new snapshot gets: one more than the largest numeric ID.
fn next_id(snaps: &[Snapshot]) -> String {
    let max = snaps
        .iter()
        .filter_map(|s| s.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    (max + 1).to_string()
}

impl super::Qcow2 {
    /// Create an internal snapshot of the current state (no VM state).
    /// `date` is (seconds, nanoseconds) since the epoch.
    pub fn snapshot_create(&self, name: &str, date: (u32, u32)) -> FResult<Snapshot> {
        let mut m = self.exclusive();
        m.snapshots_allowed()?;
        if name.len() > MAX_NAME {
            return Err(FormatError::Invalid(format!(
                "{}: snapshot name too long",
                m.name
            )));
        }
        if m.snapshots.len() >= 65536 {
            return Err(FormatError::Invalid(format!(
                "{}: too many snapshots",
                m.name
            )));
        }
        m.flush_exact()?;
        m.drop_l2_cache()?;
        m.comp_cursor = 0;
        let cs = m.cs;
        // 1. A copy of the active L1 table.
        let l1 = m.l1.clone();
        let l1_off = if l1.is_empty() {
            0
        } else {
            let n = (l1.len() as u64 * 8).div_ceil(cs);
            let off = m.alloc_clusters(n)?;
            let mut raw: Vec<u8> = l1.iter().flat_map(|w| w.to_be_bytes()).collect();
            raw.resize((n * cs) as usize, 0);
            m.sync_refcounts()?;
            m.write_meta(off, &raw, overlap::INACTIVE_L1)?;
            off
        };
        // 2. One more reference to everything the active state uses.
        m.update_refcounts(&l1, 1)?;
        m.sync_refcounts()?;
        // 3. The snapshot table entry, then the header.
        let s = Snapshot {
            l1_offset: l1_off,
            l1_size: l1.len() as u32,
            id: next_id(&m.snapshots),
            name: name.to_string(),
            date_sec: date.0,
            date_nsec: date.1,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(m.h.size),
            // What qemu-img records without a replay icount.
            icount: Some(0),
            extra_rest: Vec::new(),
        };
        let mut snaps = m.snapshots.clone();
        snaps.push(s.clone());
        m.write_snapshot_table(snaps)?;
        // 4. The active tables are shared now: clear their COPIED flags.
        m.fix_copied_flags()?;
        m.flush_all()?;
        Ok(s)
    }

    /// Make the snapshot `id_or_name` the current state.
    pub fn snapshot_apply(&self, id_or_name: &str) -> FResult<()> {
        // Guest data changes: auto bitmaps no longer describe it.
        self.bitmaps_in_use()?;
        let mut m = self.exclusive();
        m.snapshots_allowed()?;
        let Some(i) = m.find_snapshot(id_or_name) else {
            return Err(FormatError::Invalid(format!(
                "{}: snapshot '{id_or_name}' not found",
                m.name
            )));
        };
        let s = m.snapshots[i].clone();
        if s.vm_state_size != 0 {
            log::warn!(
                "{}: snapshot '{}' has VM state; only the disk contents are restored",
                m.name,
                s.name
            );
        }
        m.flush_exact()?;
        m.drop_l2_cache()?;
        m.comp_cursor = 0;
        if !s.l1_offset.is_multiple_of(m.cs) || (s.l1_size > 0 && s.l1_offset == 0) {
            return Err(m.fatal(format!("snapshot '{}': invalid L1 table offset", s.name)));
        }
        let sl1 = m.read_words(s.l1_offset, s.l1_size as u64, "snapshot L1 table")?;
        let size = s.disk_size.unwrap_or(m.h.size);
        if size > super::header::MAX_VIRTUAL_SIZE || m.h.l1_entries_for(size) > sl1.len() as u64 {
            return Err(m.fatal(format!(
                "snapshot '{}': its L1 table is too small for its disk size",
                s.name
            )));
        }
        if sl1.len() > m.l1.len() {
            m.grow_l1(sl1.len() as u64)?;
            m.flush_all()?;
        }
        // 1. References for the snapshot's state, durable first.
        m.update_refcounts(&sl1, 1)?;
        m.sync_refcounts()?;
        // 2. The active L1 becomes a copy of the snapshot's.
        let mut new_l1 = sl1;
        new_l1.resize(m.l1.len(), 0);
        let old_l1 = std::mem::replace(&mut m.l1, new_l1);
        m.reindex_l1();
        let all = m.l1.clone();
        let off = m.h.l1_table_offset;
        m.write_words(off, &all, overlap::ACTIVE_L1)?;
        m.l1_dirty.clear();
        m.sync()?;
        if m.h.size != size {
            m.h.size = size;
            m.write_header()?;
        }
        // 3. The old state loses its reference; then the flags.
        m.update_refcounts(&old_l1, -1)?;
        m.fix_copied_flags()?;
        m.flush_all()?;
        Ok(())
    }

    /// Delete the snapshot `id_or_name`.
    pub fn snapshot_delete(&self, id_or_name: &str) -> FResult<Snapshot> {
        let mut m = self.exclusive();
        m.snapshots_allowed()?;
        let Some(i) = m.find_snapshot(id_or_name) else {
            return Err(FormatError::Invalid(format!(
                "{}: snapshot '{id_or_name}' not found",
                m.name
            )));
        };
        m.flush_exact()?;
        m.drop_l2_cache()?;
        m.comp_cursor = 0;
        let s = m.snapshots[i].clone();
        if !s.l1_offset.is_multiple_of(m.cs) || (s.l1_size > 0 && s.l1_offset == 0) {
            return Err(m.fatal(format!("snapshot '{}': invalid L1 table offset", s.name)));
        }
        let sl1 = m.read_words(s.l1_offset, s.l1_size as u64, "snapshot L1 table")?;
        // 1. The table without it, durable.
        let mut snaps = m.snapshots.clone();
        snaps.remove(i);
        m.write_snapshot_table(snaps)?;
        // 2. Its references go, and its L1 table.
        m.update_refcounts(&sl1, -1)?;
        if s.l1_size > 0 {
            let n = (s.l1_size as u64 * 8).div_ceil(m.cs);
            m.queue_free(s.l1_offset, n, DiscardType::Snapshot);
        }
        m.fix_copied_flags()?;
        m.flush_all()?;
        Ok(s)
    }
}
