//! Refcounts and cluster allocation (qcow2.rst: "Host cluster management").
//!
//! The refcount table lives in memory (bounded to 8 MiB by the header
//! check); refcount blocks go through the bounded cache. Refcount blocks a
//! new allocation needs are put at the start of the free run found for it
//! (as QEMU puts them at the first free cluster), counted by themselves or
//! by a block that exists, so allocation never recurses; the run is looked
//! for again after them. Anywhere else (a repair setting a refcount) a
//! missing block is created at the first cluster it covers, which is free
//! by definition (all its refcounts are 0), so it describes itself. When
//! the table itself is full, a larger one is built past the end of
//! everything it covers, together with the blocks that describe it,
//! written and synced before the header points at it.

use super::overlap::{REFCOUNT_BLOCK, REFCOUNT_TABLE};
use super::{DiscardType, Meta, REFT_OFFSET_MASK};
use crate::error::{FResult, FormatError};

/// Read entry `i` of a refcount block of width `1 << order` bits.
pub fn rb_get(b: &[u8], i: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            ((b[bit / 8] >> (bit % 8)) as u64) & ((1u64 << bits) - 1)
        }
        3 => b[i] as u64,
        4 => u16::from_be_bytes([b[2 * i], b[2 * i + 1]]) as u64,
        5 => u32::from_be_bytes(b[4 * i..4 * i + 4].try_into().unwrap_or([0; 4])) as u64,
        _ => u64::from_be_bytes(b[8 * i..8 * i + 8].try_into().unwrap_or([0; 8])),
    }
}

/// Write entry `i` (the value fits: the caller checked the maximum).
pub fn rb_set(b: &mut [u8], i: usize, order: u32, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            b[bit / 8] = (b[bit / 8] & !mask) | (((v as u8) << (bit % 8)) & mask);
        }
        3 => b[i] = v as u8,
        4 => b[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => b[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => b[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

/// Host offsets must stay below 2^56 (L2 entry offset bits).
const MAX_HOST_CLUSTER_END: u64 = 1 << 56;

impl Meta {
    /// Refcount entries per block.
    pub(crate) fn rb_entries(&self) -> u64 {
        self.cs * 8 / self.h.refcount_bits() as u64
    }
    /// Largest refcount value.
    pub(crate) fn rc_max(&self) -> u64 {
        let b = self.h.refcount_bits();
        if b == 64 {
            u64::MAX
        } else {
            (1 << b) - 1
        }
    }

    /// Offset of refcount block `t`, validated; `None` when absent.
    pub(crate) fn rb_offset(&self, t: u64) -> FResult<Option<u64>> {
        let Some(&e) = self.reftable.get(t as usize) else {
            return Ok(None);
        };
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(self.cs) {
            return Err(self.fatal(format!(
                "refcount block offset 0x{off:x} is not aligned to a cluster"
            )));
        }
        Ok(Some(off))
    }

    fn make_room_rb(&mut self) -> FResult<()> {
        while self.rbc.is_full() {
            let Some(k) = self.rbc.victim() else { break };
            if self.rbc.is_dirty(k) {
                if let Some(b) = self.rbc.peek(k) {
                    let b = b.clone();
                    self.write_meta(k, &b, REFCOUNT_BLOCK)?;
                    self.rc_unsynced = true;
                }
            }
            self.rbc.remove(k);
        }
        Ok(())
    }

    fn load_rb(&mut self, off: u64) -> FResult<()> {
        if self.rbc.contains(off) {
            return Ok(());
        }
        self.rbc.maybe_clean();
        self.make_room_rb()?;
        let mut b = vec![0u8; self.cs as usize];
        self.file
            .read_at(off, &mut b)
            .map_err(|e| self.ioe(e, "reading a refcount block"))?;
        self.rbc.insert(off, b, false);
        Ok(())
    }

    /// Refcount of host cluster `idx`.
    pub(crate) fn get_refcount(&mut self, idx: u64) -> FResult<u64> {
        let epb = self.rb_entries();
        let Some(off) = self.rb_offset(idx / epb)? else {
            return Ok(0);
        };
        self.load_rb(off)?;
        let order = self.h.refcount_order;
        let b = self.rbc.get(off).ok_or_else(cache_miss)?;
        Ok(rb_get(b, (idx % epb) as usize, order))
    }

    /// Make sure refcount block `t` exists (creating a self-describing one).
    pub(crate) fn ensure_rb(&mut self, t: u64) -> FResult<u64> {
        self.ensure_rb_at(t, t * self.rb_entries())
    }

    /// As [`Meta::ensure_rb`], placing a new block at cluster `at`, which
    /// must lie in the range the block describes (all of that range is
    /// free while the block is missing).
    pub(crate) fn ensure_rb_at(&mut self, t: u64, at: u64) -> FResult<u64> {
        if t as usize >= self.reftable.len() {
            self.grow_reftable(t + 1)?;
        }
        if let Some(off) = self.rb_offset(t)? {
            return Ok(off);
        }
        let epb = self.rb_entries();
        let cl = t * epb;
        if cl == 0 {
            return Err(self.fatal("the refcount block for the header cluster is missing"));
        }
        let at = if at / epb == t { at } else { cl };
        let off = at * self.cs;
        self.make_room_rb()?;
        let mut b = vec![0u8; self.cs as usize];
        rb_set(&mut b, (at - cl) as usize, self.h.refcount_order, 1);
        // The block is written before the table entry points at it.
        self.write_meta(off, &b, REFCOUNT_BLOCK)?;
        self.rbc.insert(off, b, false);
        self.reftable[t as usize] = off;
        self.index_rb_added(off);
        let ent = off.to_be_bytes();
        self.sync()?;
        self.write_meta(self.h.refcount_table_offset + t * 8, &ent, REFCOUNT_TABLE)?;
        self.rc_unsynced = true;
        self.alloc_end = self.alloc_end.max(off + self.cs);
        Ok(off)
    }

    /// Set the refcount of cluster `idx`.
    pub(crate) fn set_refcount(&mut self, idx: u64, v: u64) -> FResult<()> {
        if v > self.rc_max() {
            return Err(FormatError::Invalid(format!(
                "{}: refcount overflow (refcount_bits={})",
                self.name,
                self.h.refcount_bits()
            )));
        }
        let epb = self.rb_entries();
        let t = idx / epb;
        let off = self.ensure_rb(t)?;
        self.load_rb(off)?;
        let order = self.h.refcount_order;
        let b = self.rbc.get_mut(off).ok_or_else(cache_miss)?;
        rb_set(b, (idx % epb) as usize, order, v);
        Ok(())
    }

    /// Add `delta` to the refcount of cluster `idx`; returns the new value.
    pub(crate) fn add_refcount(&mut self, idx: u64, delta: i64) -> FResult<u64> {
        let cur = self.get_refcount(idx)?;
        let new = if delta < 0 {
            cur.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                self.fatal(format!("refcount of cluster {idx} would drop below zero"))
            })?
        } else {
            cur.checked_add(delta as u64)
                .filter(|v| *v <= self.rc_max())
                .ok_or_else(|| {
                    FormatError::Invalid(format!(
                        "{}: refcount overflow for cluster {idx} (refcount_bits={})",
                        self.name,
                        self.h.refcount_bits()
                    ))
                })?
        };
        self.set_refcount(idx, new)?;
        if new == 0 && idx < self.free_cursor {
            self.free_cursor = idx.max(1);
        }
        Ok(new)
    }

    /// Allocate `n` contiguous clusters (refcount 1); returns the offset.
    pub(crate) fn alloc_clusters(&mut self, n: u64) -> FResult<u64> {
        self.writable()?;
        self.mark_dirty()?;
        let epb = self.rb_entries();
        let mut start = self.free_cursor.max(1);
        // The lowest free cluster seen: every cluster the search passes is
        // looked at, so below it (from the cursor on) all are in use.
        let mut first_free: Option<u64> = None;
        'search: loop {
            if (start + n) * self.cs > MAX_HOST_CLUSTER_END {
                return Err(FormatError::NoSpace(format!(
                    "{}: no space left in the image (host offsets are limited to 2^56)",
                    self.name
                )));
            }
            for i in 0..n {
                if self.get_refcount(start + i)? != 0 {
                    start = start + i + 1;
                    continue 'search;
                }
                first_free.get_or_insert(start + i);
            }
            // Refcount blocks for the run. A missing block goes where QEMU
            // puts it when it can: before the run in its own range, or
            // right after the run (counting itself), so the run stays.
            // A range the run covers to its end has no such place (a block
            // at its first cluster would sit inside any run longer than a
            // block counts, which could then never be found): then all
            // missing blocks go at the run's start and the search starts
            // again after them.
            let (t0, t1) = (start / epb, (start + n - 1) / epb);
            if t1 as usize >= self.reftable.len() {
                self.grow_reftable(t1 + 1)?;
                continue 'search;
            }
            let mut missing = Vec::new();
            for t in t0..=t1 {
                if self.rb_offset(t)?.is_none() {
                    let at = if t * epb < start {
                        Some(t * epb)
                    } else if (start + n) / epb == t {
                        Some(start + n)
                    } else {
                        None
                    };
                    missing.push((t, at));
                }
            }
            if missing.iter().any(|m| m.1.is_none()) {
                let ts: Vec<u64> = missing.iter().map(|m| m.0).collect();
                self.create_rbs(&ts, start)?;
                continue 'search;
            }
            if !missing.is_empty() {
                for &(t, at) in &missing {
                    self.ensure_rb_at(t, at.unwrap_or(t * epb))?;
                }
                // Growing the refcount table may have taken part of it.
                for i in 0..n {
                    if self.get_refcount(start + i)? != 0 {
                        continue 'search;
                    }
                }
            }
            for i in 0..n {
                self.set_refcount(start + i, 1)?;
            }
            // Skipped free clusters (a run too short) stay findable.
            self.free_cursor = match first_free {
                Some(f) if f < start => f,
                _ => start + n,
            };
            let off = start * self.cs;
            self.alloc_end = self.alloc_end.max(off + n * self.cs);
            return Ok(off);
        }
    }

    /// Create the refcount blocks of the table entries `ts` at clusters
    /// `at`, `at + 1`, ...: free clusters of the runs the blocks are for,
    /// so each is counted by one of the new blocks or by a block that
    /// exists. The blocks (and the blocks that count them) are durable
    /// before the table points at them.
    fn create_rbs(&mut self, ts: &[u64], at: u64) -> FResult<()> {
        if ts.contains(&0) {
            return Err(self.fatal("the refcount block for the header cluster is missing"));
        }
        let (cs, epb, order) = (self.cs, self.rb_entries(), self.h.refcount_order);
        let mut new: Vec<(u64, u64, Vec<u8>)> = ts
            .iter()
            .enumerate()
            .map(|(j, &t)| (t, at + j as u64, vec![0u8; cs as usize]))
            .collect();
        for j in 0..new.len() {
            let pos = new[j].1;
            match new.iter_mut().find(|b| b.0 == pos / epb) {
                Some(b) => rb_set(&mut b.2, (pos % epb) as usize, order, 1),
                // The run's other blocks all exist.
                None => self.set_refcount(pos, 1)?,
            }
        }
        for (_, pos, b) in &new {
            self.write_meta(pos * cs, b, REFCOUNT_BLOCK)?;
        }
        self.rc_unsynced = true;
        self.sync_refcounts()?;
        for (t, pos, b) in new {
            let off = pos * cs;
            self.make_room_rb()?;
            self.rbc.insert(off, b, false);
            self.reftable[t as usize] = off;
            self.index_rb_added(off);
            let at = self.h.refcount_table_offset + t * 8;
            self.write_meta(at, &off.to_be_bytes(), REFCOUNT_TABLE)?;
            self.alloc_end = self.alloc_end.max(off + cs);
        }
        self.rc_unsynced = true;
        Ok(())
    }

    /// Room for `size` bytes of compressed data (sector-aligned start).
    pub(crate) fn alloc_bytes(&mut self, size: u64) -> FResult<u64> {
        let size = size.div_ceil(512) * 512;
        let cur = self.comp_cursor;
        if cur != 0 && !cur.is_multiple_of(self.cs) && self.cs - cur % self.cs >= size {
            self.add_refcount(cur / self.cs, 1)?;
            self.comp_cursor = if (cur + size).is_multiple_of(self.cs) {
                0
            } else {
                cur + size
            };
            return Ok(cur);
        }
        let n = size.div_ceil(self.cs);
        let off = self.alloc_clusters(n)?;
        let end = off + size;
        self.comp_cursor = if end.is_multiple_of(self.cs) { 0 } else { end };
        Ok(off)
    }

    /// Drop one reference to each of `n` clusters at `off`, at the next flush.
    pub(crate) fn queue_free(&mut self, off: u64, n: u64, ty: DiscardType) {
        for i in 0..n {
            self.pending_free.push((off + i * self.cs, ty));
        }
    }

    /// Apply the queued refcount decrements (the L2 changes are durable):
    /// stamp them with the closing epoch, then release every stamped
    /// cluster that no in-flight request can still be using.
    pub(crate) fn process_frees(&mut self) -> FResult<()> {
        let list = std::mem::take(&mut self.pending_free);
        if !list.is_empty() {
            let e = self.gate.bump();
            self.quarantine
                .extend(list.into_iter().map(|(off, ty)| (e, off, ty)));
        }
        let oldest = self.gate.oldest();
        let (ready, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.quarantine)
            .into_iter()
            .partition(|&(e, _, _)| oldest.is_none_or(|o| o > e));
        self.quarantine = wait;
        for (_, off, ty) in ready {
            let idx = off / self.cs;
            let v = self.add_refcount(idx, -1)?;
            if v == 0 {
                if self.comp_cursor != 0 && self.comp_cursor / self.cs == idx {
                    self.comp_cursor = 0;
                }
                if self.pass_discard[ty as usize] {
                    let _ = self.file.discard(off, self.cs);
                }
            }
        }
        Ok(())
    }

    /// Frees are waiting to be applied (queued, or quarantined and free
    /// to go now).
    pub(crate) fn frees_due(&self) -> bool {
        if !self.pending_free.is_empty() {
            return true;
        }
        let oldest = self.gate.oldest();
        self.quarantine
            .iter()
            .any(|&(e, _, _)| oldest.is_none_or(|o| o > e))
    }

    /// Grow the refcount table to at least `need` entries: new blocks and
    /// the new table go past everything the old table covers and past the
    /// end of the file, so they do not collide with anything.
    pub(crate) fn grow_reftable(&mut self, need: u64) -> FResult<()> {
        let cs = self.cs;
        let epb = self.rb_entries();
        let old_len = self.reftable.len() as u64;
        let file_cl = self.file_len()?.max(self.alloc_end).div_ceil(cs);
        let e = file_cl.max(old_len * epb).div_ceil(epb) * epb;
        let mut new_len = need.max(old_len + old_len / 2).max(1);
        let (k, m) = loop {
            let k = (new_len * 8).div_ceil(cs);
            let mut m = 1;
            while (m + k).div_ceil(epb) > m {
                m += 1;
            }
            let needed = e / epb + m;
            if new_len >= needed {
                break (k, m);
            }
            new_len = needed;
        };
        if k * cs > super::header::MAX_REFTABLE_BYTES || (e + m + k) * cs > MAX_HOST_CLUSTER_END {
            return Err(FormatError::NoSpace(format!(
                "{}: the refcount table cannot grow any further",
                self.name
            )));
        }
        let order = self.h.refcount_order;
        for j in 0..m {
            let t = e / epb + j;
            let mut b = vec![0u8; cs as usize];
            for c in (e..e + m + k).filter(|c| c / epb == t) {
                rb_set(&mut b, (c % epb) as usize, order, 1);
            }
            self.write_meta((e + j) * cs, &b, REFCOUNT_BLOCK)?;
        }
        let mut table = self.reftable.clone();
        table.resize((k * cs / 8) as usize, 0);
        for j in 0..m {
            table[(e / epb + j) as usize] = (e + j) * cs;
        }
        let raw: Vec<u8> = table.iter().flat_map(|v| v.to_be_bytes()).collect();
        let new_off = (e + m) * cs;
        self.write_meta(new_off, &raw, REFCOUNT_TABLE)?;
        self.sync()?;
        let old_off = self.h.refcount_table_offset;
        let old_cl = self.h.refcount_table_clusters as u64;
        self.h.refcount_table_offset = new_off;
        self.h.refcount_table_clusters = k as u32;
        self.reftable = table;
        self.reindex_reftable();
        self.alloc_end = self.alloc_end.max((e + m + k) * cs);
        self.write_header()?;
        self.queue_free(old_off, old_cl, DiscardType::Other);
        Ok(())
    }

    /// Write dirty refcount blocks.
    pub(crate) fn write_dirty_rbs(&mut self) -> FResult<()> {
        for k in self.rbc.dirty_keys() {
            if let Some(b) = self.rbc.peek(k) {
                let b = b.clone();
                self.write_meta(k, &b, REFCOUNT_BLOCK)?;
                self.rbc.mark_clean(k);
                self.rc_unsynced = true;
            }
        }
        Ok(())
    }

    /// Refcount blocks durable (what new L2 references depend on).
    pub(crate) fn sync_refcounts(&mut self) -> FResult<()> {
        self.write_dirty_rbs()?;
        if self.rc_unsynced {
            self.sync()?;
            self.rc_unsynced = false;
        }
        Ok(())
    }
}

/// A table we just loaded is not in the cache: a logic error, reported
/// instead of panicking.
fn cache_miss() -> crate::error::FormatError {
    crate::error::FormatError::Corrupt("internal error: metadata cache miss".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::check::Repair;
    use crate::qcow2::create::{create, CreateOptions};
    use crate::qcow2::{OpenOptions, Qcow2};
    use crate::storage::{MemStorage, Storage};
    use std::sync::Arc;

    /// Runs longer than one refcount block counts: a write of a whole L2
    /// table's worth of new clusters with 64-bit refcounts, and snapshot
    /// L1 copies of hundreds of 512-byte clusters. The blocks they need
    /// used to go inside the run, so no run was ever found and the file
    /// grew until the refcount table could grow no more.
    #[test]
    fn long_runs_find_room() {
        for (bits, size) in [(64u32, 64u64 << 20), (16, 1 << 30)] {
            let f: Arc<dyn Storage> = Arc::new(MemStorage::new(Vec::new(), 1 << 28));
            let o = CreateOptions {
                size,
                cluster_size: 512,
                refcount_bits: bits,
                ..Default::default()
            };
            create("lr", f.clone(), None, &o).unwrap();
            let img = Qcow2::open("lr", f.clone(), None, None, &OpenOptions::default()).unwrap();
            let data: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
            img.write(512, &data, false).unwrap();
            img.snapshot_create("s", (0, 0)).unwrap();
            img.write(1 << 20, &data, false).unwrap();
            img.snapshot_create("t", (0, 0)).unwrap();
            img.flush().unwrap();
            let r = img.check(Repair::None).unwrap();
            assert_eq!((r.corruptions, r.leaks), (0, 0), "bits {bits}: {r:?}");
            let mut back = vec![0u8; data.len()];
            img.read(1 << 20, &mut back).unwrap();
            assert_eq!(back, data);
            assert!(
                f.len().unwrap() < 4 << 20,
                "bits {bits}: {}",
                f.len().unwrap()
            );
        }
    }

    #[test]
    fn packing() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 64];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            let n = (64 * 8) >> order;
            for i in 0..n {
                rb_set(&mut b, i, order, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    rb_get(&b, i, order),
                    (i as u64 * 7) & max,
                    "order {order} i {i}"
                );
            }
        }
        // Sub-byte widths: bit 0 is the least significant bit.
        let mut b = vec![0u8; 1];
        rb_set(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
    }
}
