//! Cluster mapping: L1 and L2 tables (qcow2.rst: "Cluster mapping",
//! "Standard Cluster Descriptor", "Compressed Clusters Descriptor",
//! "Extended L2 Entries").
//!
//! L2 tables are cached in slices of `l2-cache-entry-size` bytes. Every
//! offset read from an L1 or L2 entry is validated before use: alignment,
//! reserved bits where QEMU checks them, and that tables we are about to
//! modify lie inside the file.

use super::overlap::{ACTIVE_L1, L2_TABLES};
use super::{DiscardType, Meta, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::error::FResult;

/// What one (sub)cluster of the guest disk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Not allocated here: backing file or zeroes.
    Unalloc,
    /// Reads as zeroes.
    Zero,
    /// Data at this host offset (of the subcluster or cluster start), in the
    /// data file when there is one; `copied` = refcount exactly one.
    Data {
        /// Host offset of the (sub)cluster.
        host: u64,
        /// COPIED flag.
        copied: bool,
    },
    /// Compressed cluster: byte offset and length of the compressed data.
    Compressed {
        /// Byte offset.
        off: u64,
        /// Bytes to read.
        len: u64,
    },
}

impl Meta {
    /// 1 for standard, 2 for extended L2 entries.
    pub(crate) fn entry_words(&self) -> u64 {
        if self.h.extended_l2() {
            2
        } else {
            1
        }
    }
    /// Subclusters per cluster.
    pub(crate) fn subclusters(&self) -> u64 {
        if self.h.extended_l2() {
            32
        } else {
            1
        }
    }
    /// Subcluster size.
    pub(crate) fn sc_size(&self) -> u64 {
        self.cs / self.subclusters()
    }
    /// L2 table offset of L1 entry `i` (validated), `None` when unallocated.
    pub(crate) fn l2_offset(&self, i: u64) -> FResult<Option<u64>> {
        let Some(&e) = self.l1.get(i as usize) else {
            return Ok(None);
        };
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(self.cs) {
            return Err(self.fatal(format!(
                "L2 table offset 0x{off:x} unaligned (L1 index 0x{i:x})"
            )));
        }
        Ok(Some(off))
    }

    fn make_room_l2(&mut self) -> FResult<()> {
        while self.l2c.is_full() {
            let Some(k) = self.l2c.victim() else { break };
            if self.l2c.is_dirty(k) {
                // New clusters the slice points at must be counted first.
                self.refcounts_before_l2()?;
                if let Some(v) = self.l2c.peek(k) {
                    let raw: Vec<u8> = v.iter().flat_map(|w| w.to_be_bytes()).collect();
                    self.write_meta(k, &raw, L2_TABLES)?;
                }
            }
            self.l2c.remove(k);
        }
        Ok(())
    }

    fn load_slice(&mut self, key: u64) -> FResult<()> {
        if self.l2c.contains(key) {
            return Ok(());
        }
        self.l2c.maybe_clean();
        self.make_room_l2()?;
        let mut raw = vec![0u8; self.slice_bytes as usize];
        self.file
            .read_at(key, &mut raw)
            .map_err(|e| self.ioe(e, "reading an L2 table"))?;
        let v: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        self.l2c.insert(key, v, false);
        Ok(())
    }

    /// (L1 index, L2 index) of guest cluster `gcl`.
    pub(crate) fn split(&self, gcl: u64) -> (u64, u64) {
        let n = self.h.l2_entries();
        (gcl / n, gcl % n)
    }

    /// Slice key and word index of entry `l2i` of the table at `l2off`.
    fn slice_pos(&self, l2off: u64, l2i: u64) -> (u64, usize) {
        let byte = l2i * 8 * self.entry_words();
        let key = l2off + byte / self.slice_bytes * self.slice_bytes;
        (key, ((byte % self.slice_bytes) / 8) as usize)
    }

    /// Raw L2 entry and bitmap of guest cluster `gcl` ((0, 0) when no table).
    pub(crate) fn get_l2(&mut self, gcl: u64) -> FResult<(u64, u64)> {
        let (l1i, l2i) = self.split(gcl);
        let Some(l2off) = self.l2_offset(l1i)? else {
            return Ok((0, 0));
        };
        let (key, w) = self.slice_pos(l2off, l2i);
        self.load_slice(key)?;
        let ext = self.h.extended_l2();
        let s = self.l2c.get(key).ok_or_else(cache_miss)?;
        Ok((s[w], if ext { s[w + 1] } else { 0 }))
    }

    /// Number of entries from `gcl` to the end of its L2 slice.
    pub(crate) fn left_in_slice(&self, gcl: u64) -> u64 {
        let per = self.slice_bytes / 8 / self.entry_words();
        per - gcl % per
    }

    /// Set the L2 entry of `gcl`; the table must be writable
    /// ([`Meta::ensure_l2_writable`]).
    pub(crate) fn set_l2(&mut self, gcl: u64, entry: u64, bitmap: u64) -> FResult<()> {
        self.writable()?;
        let (l1i, l2i) = self.split(gcl);
        let l2off = self
            .l2_offset(l1i)?
            .ok_or_else(|| self.corrupt("L2 table vanished"))?;
        let (key, w) = self.slice_pos(l2off, l2i);
        self.load_slice(key)?;
        let ext = self.h.extended_l2();
        let s = self.l2c.get_mut(key).ok_or_else(cache_miss)?;
        s[w] = entry;
        if ext {
            s[w + 1] = bitmap;
        }
        Ok(())
    }

    fn set_l1(&mut self, i: u64, v: u64) {
        let old = std::mem::replace(&mut self.l1[i as usize], v);
        self.index_l1_change(old, v);
        self.l1_dirty.insert(i * 8 / 512);
    }

    /// Make the L2 table of guest cluster `gcl` private to the active L1
    /// (allocate it, or copy it when a snapshot shares it).
    pub(crate) fn ensure_l2_writable(&mut self, gcl: u64) -> FResult<()> {
        let (l1i, _) = self.split(gcl);
        if l1i as usize >= self.l1.len() {
            return Err(self.corrupt("guest offset beyond the L1 table"));
        }
        let e = self.l1[l1i as usize];
        let old = self.l2_offset(l1i)?;
        if let Some(o) = old {
            if e & OFLAG_COPIED != 0 {
                if o + self.cs > self.file_len()?.max(self.alloc_end) {
                    return Err(self.fatal(format!(
                        "L2 table offset 0x{o:x} lies beyond the end of the image"
                    )));
                }
                return Ok(());
            }
        }
        let new = self.alloc_clusters(1)?;
        // Contents of the new table: zeroes or a copy of the shared one.
        let mut words = vec![0u64; (self.cs / 8) as usize];
        if let Some(o) = old {
            let per = (self.slice_bytes / 8) as usize;
            for (si, chunk) in words.chunks_mut(per).enumerate() {
                let key = o + si as u64 * self.slice_bytes;
                self.load_slice(key)?;
                let s = self.l2c.get(key).ok_or_else(cache_miss)?;
                chunk.copy_from_slice(s);
            }
        }
        // The new table goes into the cache as dirty slices, unwritten
        // (QEMU's writeback cache: an allocating write costs no sync). The
        // L1 entry changes in memory only; on disk it is written by a
        // flush, after every dirty slice (this table's included) and a
        // sync, so it never points at a table whose cluster still holds
        // garbage. A slice evicted meanwhile is written after the
        // refcounts it depends on ([`Meta::make_room_l2`]).
        let per = (self.slice_bytes / 8) as usize;
        for (si, chunk) in words.chunks(per).enumerate() {
            let key = new + si as u64 * self.slice_bytes;
            self.make_room_l2()?;
            self.l2c.insert(key, chunk.to_vec(), true);
        }
        self.set_l1(l1i, new | OFLAG_COPIED);
        if let Some(o) = old {
            self.queue_free(o, 1, DiscardType::Other);
        }
        Ok(())
    }

    /// Decode an entry into the kind of subcluster `sc`.
    pub(crate) fn kind(&self, entry: u64, bitmap: u64, sc: u64) -> FResult<Kind> {
        if entry & OFLAG_COMPRESSED != 0 {
            if self.data.is_some() {
                return Err(self.fatal("compressed cluster in an image with a data file"));
            }
            let cb = self.cluster_bits();
            let shift = 62 - (cb - 8);
            let mask = (1u64 << (cb - 8)) - 1;
            let off = entry & ((1u64 << shift) - 1);
            let sectors = ((entry >> shift) & mask) + 1;
            let len = sectors * 512 - (off & 511);
            return Ok(Kind::Compressed { off, len });
        }
        let copied = entry & OFLAG_COPIED != 0;
        let host = entry & OFFSET_MASK;
        let allocated = host != 0 || (copied && self.data.is_some());
        if allocated && !host.is_multiple_of(self.cs) {
            return Err(self.fatal(format!("Cluster allocation offset 0x{host:x} unaligned")));
        }
        if self.h.extended_l2() {
            let a = bitmap & (1 << sc) != 0;
            let z = bitmap & (1 << (sc + 32)) != 0;
            if a && z {
                return Err(self.fatal(format!(
                    "subcluster both allocated and zero (L2 bitmap 0x{bitmap:x})"
                )));
            }
            if a {
                if !allocated {
                    return Err(self.fatal("allocated subcluster without a host cluster"));
                }
                return Ok(Kind::Data {
                    host: host + sc * self.sc_size(),
                    copied,
                });
            }
            return Ok(if z { Kind::Zero } else { Kind::Unalloc });
        }
        if entry & OFLAG_ZERO != 0 {
            if self.h.version < 3 {
                return Err(self.fatal("zero cluster in a version 2 image"));
            }
            return Ok(Kind::Zero);
        }
        if !allocated {
            return Ok(Kind::Unalloc);
        }
        Ok(Kind::Data { host, copied })
    }

    /// Write the dirty L2 slices.
    pub(crate) fn write_dirty_l2(&mut self) -> FResult<()> {
        for k in self.l2c.dirty_keys() {
            if let Some(v) = self.l2c.peek(k) {
                let raw: Vec<u8> = v.iter().flat_map(|w| w.to_be_bytes()).collect();
                self.write_meta(k, &raw, L2_TABLES)?;
                self.l2c.mark_clean(k);
            }
        }
        Ok(())
    }

    /// Write the dirty parts of the L1 table.
    pub(crate) fn write_dirty_l1(&mut self) -> FResult<()> {
        let chunks: Vec<u64> = std::mem::take(&mut self.l1_dirty).into_iter().collect();
        for c in chunks {
            let start = (c * 64) as usize;
            let end = (start + 64).min(self.l1.len());
            if start >= end {
                continue;
            }
            let raw: Vec<u8> = self.l1[start..end]
                .iter()
                .flat_map(|w| w.to_be_bytes())
                .collect();
            self.write_meta(self.h.l1_table_offset + start as u64 * 8, &raw, ACTIVE_L1)?;
        }
        Ok(())
    }

    /// Make sure new clusters are counted on disk before L2 tables that
    /// reference them are written (QEMU's cache dependency of the L2 cache
    /// on the refcount cache, flushed when an L2 table is written back);
    /// with lazy refcounts, the dirty bit on disk stands in for that
    /// ([`Meta::lazy_now`]), written here the first time.
    pub(crate) fn refcounts_before_l2(&mut self) -> FResult<()> {
        if self.lazy_now() {
            if self.dirty_pending {
                self.write_header()?;
            }
            return Ok(());
        }
        self.sync_refcounts()
    }

    /// The full flush: refcounts, sync, L2, (sync, L1), sync, then release
    /// the clusters whose references are now gone and write their
    /// refcounts. With lazy refcounts (and the dirty bit set) the
    /// refcount blocks stay in the cache: (the dirty bit the first time,
    /// sync,) L2, (sync, L1), sync. This is the only place the L1 table is
    /// written in normal operation, after every dirty L2 slice, so a new
    /// table (dirty in the cache since its allocation) is on disk before
    /// anything points at it.
    pub(crate) fn flush_all(&mut self) -> FResult<()> {
        if self.read_only {
            return Ok(());
        }
        self.not_halted()?;
        self.refcounts_before_l2()?;
        self.write_dirty_l2()?;
        if !self.l1_dirty.is_empty() {
            self.sync()?;
            self.write_dirty_l1()?;
        }
        self.sync()?;
        if let Some(d) = &self.data {
            d.flush()
                .map_err(|e| self.ioe(e, "flushing the data file"))?;
        }
        // The L2 changes that dropped references are durable now.
        if self.frees_due() {
            self.process_frees()?;
        }
        self.refcounts_before_l2()
    }

    /// [`Meta::flush_all`] with the refcount blocks written and synced
    /// even with lazy refcounts: before the dirty bit is cleared, and
    /// before operations that work on the refcounts on disk.
    pub(crate) fn flush_exact(&mut self) -> FResult<()> {
        self.flush_all()?;
        self.sync_refcounts()
    }
}

/// A table we just loaded is not in the cache: a logic error, reported
/// instead of panicking.
fn cache_miss() -> crate::error::FormatError {
    crate::error::FormatError::Corrupt("internal error: metadata cache miss".into())
}
