//! Guest I/O on a qcow2 image: read, write (allocation, copy-on-write from
//! the backing file, snapshots and compressed clusters), compressed writes,
//! write-zeroes, discard, resize and flush (qcow2.rst: "Cluster mapping",
//! "Extended L2 Entries", "Compressed Clusters Descriptor"; discard and
//! zeroing follow QEMU's `qcow2_cluster_discard`/`qcow2_cluster_zeroize`).

use super::l2::Kind;
use super::{
    compress, DiscardType, Meta, Qcow2, Ticket, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
    OFLAG_ZERO,
};
use crate::error::{FResult, FormatError};
use crate::storage::Storage;
use std::sync::Arc;

/// All subclusters read as zeroes (extended L2 bitmap).
const BITMAP_ALL_ZERO: u64 = 0xffff_ffff_0000_0000;

/// One run of a mapped read ([`Qcow2::map_read`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Guest byte offset.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Where they come from; `Data` carries the host offset of `offset`.
    pub kind: Kind,
}

/// What [`Qcow2::plan_write`] decided.
pub enum WritePlan {
    /// Allocating writes are in flight on these clusters: retry later.
    Busy,
    /// Copy-on-write needs reads: use the synchronous [`Qcow2::write`].
    Sync,
    /// Planned: do its I/O, then [`Qcow2::finish_write`].
    Ready(PlannedWrite),
}

/// Where the bytes of a planned host write come from.
pub enum WriteData {
    /// The caller's data for guest bytes `[offset, offset+len)`.
    Guest {
        /// Guest byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// A buffer the plan built (guest data merged with copy-on-write).
    Owned(Vec<u8>),
}

/// A write planned by [`Qcow2::plan_write`].
pub struct PlannedWrite {
    /// Host ranges to make read as zeroes before any write: (offset, len).
    pub zero_first: Vec<(u64, u64)>,
    /// Host writes: (host offset, data).
    pub writes: Vec<(u64, WriteData)>,
    jobs: Vec<AllocJob>,
    ticket: Option<Ticket>,
}

/// How a write can proceed ([`Qcow2::map_overwrite`]).
pub enum Overwrite {
    /// In place: (guest offset, host offset, length) runs, and the ticket
    /// to hold until the data is written.
    InPlace(Vec<(u64, u64, u64)>, Ticket),
    /// An allocating write is in flight on these clusters: retry once it
    /// has finished ([`Qcow2::write`] waits for it by itself).
    Busy,
    /// The write lies in one fresh cluster whose allocating write (planned
    /// by [`Qcow2::plan_write`]) is in flight: it may go to `host` once
    /// that write has zeroed the host cluster `cluster`, and is complete
    /// once that write has finished (linked the cluster).
    Join {
        /// Host offset for the write.
        host: u64,
        /// Host offset of the cluster (the allocating write's zero range).
        cluster: u64,
        /// Held until the write is done.
        ticket: Ticket,
    },
    /// Clusters must be allocated: use [`Qcow2::write`].
    Allocate,
}

/// Block status of a run of the guest disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// Bytes with this status.
    pub len: u64,
    /// What they are.
    pub kind: Kind,
    /// For `Unalloc` and `Zero` runs whose cluster keeps host space (see
    /// [`Meta::map_reserved`]): the host offset of the run's first byte.
    pub reserved: Option<u64>,
}

impl Meta {
    /// The kind at byte `off` and the run length (at most `max`) with the
    /// same kind and, for data, contiguous host offsets. Data kinds carry
    /// the exact host byte offset of `off`.
    pub(crate) fn map(&mut self, off: u64, max: u64) -> FResult<(Kind, u64)> {
        self.map_reserved(off, max, false).map(|(k, _, n)| (k, n))
    }

    /// As [`Meta::map`]; with `reserved`, also the host offset of `off`
    /// when it is unallocated or zero but its cluster has host space
    /// (extended L2 subclusters of an allocated cluster, zero clusters that
    /// kept their cluster: QEMU's `*_ALLOC` types, whose offset `qemu-img
    /// map` prints), and the run then also stops where that offset is not
    /// contiguous. Reads do not need it and keep the longer runs.
    pub(crate) fn map_reserved(
        &mut self,
        off: u64,
        max: u64,
        reserved: bool,
    ) -> FResult<(Kind, Option<u64>, u64)> {
        let cs = self.cs;
        let scs = self.sc_size();
        let gcl = off / cs;
        let (e, bm) = self.get_l2(gcl)?;
        let sc = (off % cs) / scs;
        let mut kind = self.kind(e, bm, sc)?;
        if let Kind::Compressed { .. } = kind {
            return Ok((kind, None, (cs - off % cs).min(max)));
        }
        if let Kind::Data { host, copied } = kind {
            kind = Kind::Data {
                host: host + off % scs,
                copied,
            };
        }
        // Host space of a non-data (sub)cluster: the cluster's offset (a
        // plain entry is never compressed here) plus the place inside it.
        // With a data file, offset 0 is a real place when COPIED says the
        // cluster is allocated (as in `kind`).
        let df = self.data.is_some();
        let spare = |e: u64, p: u64| -> Option<u64> {
            let h = e & OFFSET_MASK;
            let allocated = h != 0 || (df && e & OFLAG_COPIED != 0);
            (reserved && allocated).then_some(h + p % cs)
        };
        let res = match kind {
            Kind::Unalloc | Kind::Zero => spare(e, off),
            _ => None,
        };
        let mut n = (scs - off % scs).min(max);
        // Extend while the next subclusters look the same; at most to the
        // end of the L2 slice, which is cached already.
        let limit = (off - off % cs) + self.left_in_slice(gcl) * cs;
        let (mut ce, mut cbm, mut ccl) = (e, bm, gcl);
        while n < max && off + n < limit {
            let p = off + n;
            let pcl = p / cs;
            if pcl != ccl {
                let (e2, b2) = self.get_l2(pcl)?;
                ce = e2;
                cbm = b2;
                ccl = pcl;
            }
            let k2 = self.kind(ce, cbm, (p % cs) / scs)?;
            let same = match (kind, k2) {
                (Kind::Unalloc, Kind::Unalloc) | (Kind::Zero, Kind::Zero) => {
                    spare(ce, p) == res.map(|r| r + n)
                }
                (
                    Kind::Data { host, copied },
                    Kind::Data {
                        host: h2,
                        copied: c2,
                    },
                ) => h2 == host + n && copied == c2,
                _ => false,
            };
            if !same {
                break;
            }
            n = (n + scs).min(max);
        }
        Ok((kind, res, n))
    }

    /// Where data lives: the data file or the image file.
    pub(crate) fn data_store(&self) -> Arc<dyn Storage> {
        self.data.clone().unwrap_or_else(|| self.file.clone())
    }

    /// Read what the guest sees through `kind` (for copy-on-write).
    fn read_kind(
        &mut self,
        kind: Kind,
        guest: u64,
        buf: &mut [u8],
        ccache: &mut Option<Vec<u8>>,
    ) -> FResult<()> {
        match kind {
            Kind::Zero => buf.fill(0),
            Kind::Unalloc => read_backing(self.live_backing(), &self.name, guest, buf)?,
            Kind::Data { host, .. } => {
                self.data_store()
                    .read_at(host, buf)
                    .map_err(|e| self.ioe(e, "reading data"))?;
                if let Some(c) = self.crypt.get(&self.name)? {
                    c.decrypt(guest, host, buf);
                }
            }
            Kind::Compressed { off, len } => {
                if ccache.is_none() {
                    let mut c = vec![0u8; self.cs as usize];
                    self.read_compressed(off, len, &mut c)?;
                    *ccache = Some(c);
                }
                let c = ccache.as_ref().map(|c| c.as_slice()).unwrap_or(&[]);
                let o = (guest % self.cs) as usize;
                buf.copy_from_slice(&c[o..o + buf.len()]);
            }
        }
        Ok(())
    }

    pub(crate) fn read_compressed(&self, off: u64, len: u64, out: &mut [u8]) -> FResult<()> {
        decompress_at(
            &*self.file,
            self.h.compression_type,
            self.cs,
            &self.name,
            off,
            len,
            out,
        )
    }

    /// The standard (not extended) L2 entry `e` of the guest cluster at
    /// `cstart` reads as zeroes throughout.
    fn reads_zero(&self, e: u64, bm: u64, cstart: u64) -> FResult<bool> {
        Ok(match self.kind(e, bm, 0)? {
            Kind::Zero => true,
            Kind::Unalloc => match self.live_backing() {
                None => true,
                Some(b) => cstart >= b.len().map_err(|e| self.ioe(e, "backing file size"))?,
            },
            _ => false,
        })
    }

    /// Clusters referenced by an L2 entry (offset, count), for freeing.
    pub(crate) fn entry_refs(&self, entry: u64) -> Option<(u64, u64)> {
        if entry & OFLAG_COMPRESSED != 0 {
            let cb = self.cluster_bits();
            let shift = 62 - (cb - 8);
            let mask = (1u64 << (cb - 8)) - 1;
            let off = entry & ((1u64 << shift) - 1) & !511;
            let sectors = ((entry >> shift) & mask) + 1;
            let first = off / self.cs;
            let last = (off + sectors * 512 - 1) / self.cs;
            return Some((first * self.cs, last - first + 1));
        }
        if self.data.is_some() {
            return None;
        }
        let host = entry & OFFSET_MASK;
        (host != 0).then_some((host, 1))
    }

    fn release(&mut self, entry: u64, ty: DiscardType) {
        if let Some((o, n)) = self.entry_refs(entry) {
            self.queue_free(o, n, ty);
        }
    }

    /// The host byte offset for an in-place overwrite of `[off, off+max)`,
    /// and its length, when every touched subcluster is already allocated
    /// to this image alone.
    pub(crate) fn inplace(&mut self, off: u64, max: u64) -> FResult<Option<(u64, u64)>> {
        self.writable()?;
        let (kind, n) = self.map(off, max)?;
        let Kind::Data { host, copied: true } = kind else {
            return Ok(None);
        };
        if self.data.is_none() && host + n > self.file_len()?.max(self.alloc_end) {
            return Err(self.fatal(format!(
                "data cluster at 0x{:x} lies beyond the end of the image",
                host - host % self.cs
            )));
        }
        if self.data.is_none() {
            self.check_overlap(host, n, 0)?;
        }
        Ok(Some((host, n)))
    }

    /// Plan a write of `src` at guest `off` where clusters need allocating
    /// (or subclusters filling): allocate the new clusters, build the data
    /// writes (with copy-on-write areas) and the L2 updates, and mark the
    /// guest clusters as allocating. The job handles at least one
    /// subcluster's worth of bytes or the end of `src`. `no_reads` is for
    /// asynchronous callers: `None` (before allocating anything) when the
    /// copy-on-write areas would have to be read from somewhere, and fresh
    /// zeroed clusters are marked joinable.
    pub(crate) fn plan_alloc(
        &mut self,
        off: u64,
        src: &[u8],
        no_reads: bool,
    ) -> FResult<Option<AllocJob>> {
        self.writable()?;
        let cs = self.cs;
        let gcl0 = off / cs;
        self.ensure_l2_writable(gcl0)?;
        let end = off + src.len() as u64;
        let last = (end - 1) / cs;
        let (l1i, _) = self.split(gcl0);
        let table_last = (l1i + 1) * self.h.l2_entries() - 1;
        let last = last.min(table_last);
        // Which clusters: reuse their host cluster (COPIED, standard) or
        // need a new one. New ones are allocated together, contiguously.
        let mut plan: Vec<(u64, u64, u64, Option<u64>)> = Vec::new(); // gcl, entry, bitmap, reuse host
        for gcl in gcl0..=last {
            let (e, bm) = self.get_l2(gcl)?;
            let reuse = if self.data.is_some() {
                Some(gcl * cs)
            } else if e & OFLAG_COMPRESSED == 0 && e & OFLAG_COPIED != 0 && e & OFFSET_MASK != 0 {
                Some(e & OFFSET_MASK)
            } else {
                None
            };
            if gcl != gcl0 {
                // Stop at clusters the in-place path can take, and keep one
                // reused cluster per call.
                let a = gcl * cs;
                let b = end.min(a + cs);
                let ip = reuse.is_some() && {
                    let mut all = true;
                    for sc in (a % cs) / self.sc_size()..=((b - 1) % cs) / self.sc_size() {
                        if !matches!(self.kind(e, bm, sc)?, Kind::Data { copied: true, .. }) {
                            all = false;
                        }
                    }
                    all
                };
                if ip || reuse.is_some() || plan[0].3.is_some() {
                    break;
                }
            }
            plan.push((gcl, e, bm, reuse));
        }
        if no_reads && self.cow_reads(&plan, off, end)? {
            return Ok(None);
        }
        let new_count = plan.iter().filter(|p| p.3.is_none()).count() as u64;
        let mut next_new = if new_count > 0 {
            self.alloc_clusters(new_count)?
        } else {
            0
        };
        let scs = self.sc_size();
        let nsc = self.subclusters();
        // Data writes: (host offset, bytes); merged when contiguous.
        let mut writes: Vec<(u64, JobData)> = Vec::new();
        // Host ranges to zero before the writes.
        let mut zero_first: Vec<(u64, u64)> = Vec::new();
        let mut updates: Vec<(u64, u64, u64, u64)> = Vec::new(); // gcl, new entry, new bitmap, old entry
        let mut handled_end = off;
        for &(gcl, e, bm, reuse) in &plan {
            let host = match reuse {
                Some(h) => h,
                None => {
                    let h = next_new;
                    next_new += cs;
                    h
                }
            };
            let cstart = gcl * cs;
            let a = off.max(cstart) - cstart;
            let b = end.min(cstart + cs) - cstart;
            handled_end = cstart + b;
            // (Not for encrypted images: zeroes on the host are not zeroes
            // once decrypted.)
            if nsc == 1
                && reuse.is_none()
                && !self.crypt.encrypted()
                && (a > 0 || b < cs)
                && self.reads_zero(e, bm, cstart)?
            {
                // A new cluster whose copy-on-write areas are zeroes: zero
                // the whole cluster on the host (one fallocate, no data)
                // and write only the guest's bytes, as QEMU does.
                zero_first.push((host, cs));
                let src_off = cstart + a - off;
                push_write(&mut writes, host + a, JobData::Src(src_off, b - a));
                updates.push((gcl, host | OFLAG_COPIED, 0, e));
                continue;
            }
            let mut new_bm = 0u64;
            let mut ccache = None;
            let mut sc = 0;
            while sc < nsc {
                let s0 = sc * scs;
                let s1 = s0 + scs;
                let touched = s0 < b && a < s1;
                let old = self.kind(e, bm, sc)?;
                let keep_in_place = reuse.is_some() && matches!(old, Kind::Data { .. });
                if touched {
                    let (ca, cb) = (a.max(s0), b.min(s1));
                    if ca > s0 || cb < s1 {
                        // Partial subcluster: the rest comes from the old view
                        // (in place: the data is already there, only the
                        // touched part is written).
                        if keep_in_place {
                            let src_off = cstart + ca - off;
                            push_write(&mut writes, host + ca, JobData::Src(src_off, cb - ca));
                            new_bm |= 1 << sc;
                            sc += 1;
                            continue;
                        }
                        let mut buf = vec![0u8; scs as usize];
                        self.read_kind(old, cstart + s0, &mut buf, &mut ccache)?;
                        let src_off = (cstart + ca - off) as usize;
                        buf[(ca - s0) as usize..(cb - s0) as usize]
                            .copy_from_slice(&src[src_off..src_off + (cb - ca) as usize]);
                        push_write(&mut writes, host + s0, JobData::Owned(buf));
                    } else {
                        // Whole subcluster: straight from the caller's data.
                        push_write(&mut writes, host + s0, JobData::Src(cstart + s0 - off, scs));
                    }
                    new_bm |= 1 << sc;
                } else {
                    match old {
                        Kind::Data { .. } if keep_in_place => new_bm |= 1 << sc,
                        Kind::Data { .. } | Kind::Compressed { .. } => {
                            let mut buf = vec![0u8; scs as usize];
                            self.read_kind(old, cstart + s0, &mut buf, &mut ccache)?;
                            push_write(&mut writes, host + s0, JobData::Owned(buf));
                            new_bm |= 1 << sc;
                        }
                        Kind::Zero => new_bm |= 1 << (sc + 32),
                        Kind::Unalloc => {}
                    }
                }
                sc += 1;
            }
            let new_entry = host | OFLAG_COPIED;
            updates.push((gcl, new_entry, if nsc > 1 { new_bm } else { 0 }, e));
        }
        if self.data.is_none() {
            for (h, d) in &writes {
                self.check_overlap(*h, d.len(), 0)?;
            }
        }
        for u in &updates {
            // A fresh cluster zeroed first and written only where the
            // guest wrote: an asynchronous caller may send other writes to
            // it once zeroed (its data is nobody else's).
            let join = (no_reads && zero_first.iter().any(|z| z.0 == u.1 & OFFSET_MASK))
                .then_some(u.1 & OFFSET_MASK);
            self.allocating.insert(u.0, join);
        }
        let first_new = next_new - new_count * cs;
        Ok(Some(AllocJob {
            zero_first,
            writes,
            updates,
            new: (first_new, new_count),
            handled: handled_end - off,
            base: (plan[0].3.unwrap_or(first_new), gcl0 * cs),
        }))
    }

    /// Whether planning `plan` (for guest bytes `[off, end)`) would read
    /// old data for copy-on-write: a (sub)cluster only partly written whose
    /// old contents are data, compressed, or in the backing file.
    fn cow_reads(
        &mut self,
        plan: &[(u64, u64, u64, Option<u64>)],
        off: u64,
        end: u64,
    ) -> FResult<bool> {
        let (cs, scs) = (self.cs, self.sc_size());
        let blen = match self.live_backing() {
            Some(b) => b.len().map_err(|e| self.ioe(e, "backing file size"))?,
            None => 0,
        };
        for &(gcl, e, bm, reuse) in plan {
            let cstart = gcl * cs;
            let a = off.max(cstart) - cstart;
            let b = end.min(cstart + cs) - cstart;
            for sc in 0..self.subclusters() {
                let (s0, s1) = (sc * scs, sc * scs + scs);
                if a <= s0 && s1 <= b {
                    continue; // overwritten whole
                }
                let old = self.kind(e, bm, sc)?;
                let read = match old {
                    Kind::Zero => false,
                    Kind::Data { .. } => reuse.is_none(),
                    Kind::Compressed { .. } => true,
                    Kind::Unalloc => cstart + s0 < blen,
                };
                if read {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Link the clusters of a planned job once its data is written (`r`),
    /// or give them back when the write failed; either way the guest
    /// clusters stop being allocating (wake the waiters after this).
    pub(crate) fn finish_alloc(&mut self, job: &AllocJob, r: FResult<()>) -> FResult<()> {
        for u in &job.updates {
            self.allocating.remove(&u.0);
        }
        if let Err(e) = r {
            if job.new.1 > 0 {
                self.queue_free(job.new.0, job.new.1, DiscardType::Other);
            }
            return Err(e);
        }
        for &(gcl, ne, nb, old) in &job.updates {
            self.set_l2(gcl, ne, nb)?;
            if self.entry_refs(old).map(|r| r.0) != self.entry_refs(ne).map(|r| r.0) {
                self.release(old, DiscardType::Other);
            }
        }
        Ok(())
    }
}

/// An allocating write between its planning and its linking.
pub(crate) struct AllocJob {
    /// Host ranges to make read as zeroes first: (offset, length).
    zero_first: Vec<(u64, u64)>,
    /// Data to write: (host offset, bytes).
    writes: Vec<(u64, JobData)>,
    /// L2 updates: (guest cluster, new entry, new bitmap, old entry).
    updates: Vec<(u64, u64, u64, u64)>,
    /// Newly allocated clusters: (first host offset, count).
    new: (u64, u64),
    /// Guest bytes the job covers.
    handled: u64,
    /// The host and guest offsets of its first cluster: a job's clusters
    /// are consecutive on both sides (one reused cluster, or new ones
    /// allocated together), so each write's guest offset follows from its
    /// host offset (for the IVs of guest-offset encryption).
    base: (u64, u64),
}

impl AllocJob {
    /// The guest offset of the job's bytes at host offset `host`.
    fn guest_of(&self, host: u64) -> u64 {
        host - self.base.0 + self.base.1
    }
}

/// Read the compressed data of one cluster (`len` bytes at `off`, bounded)
/// and decompress it into `out`.
fn decompress_at(
    file: &dyn Storage,
    ctype: u8,
    cs: u64,
    name: &str,
    off: u64,
    len: u64,
    out: &mut [u8],
) -> FResult<()> {
    let mut c = vec![0u8; len.min(2 * cs + 512) as usize];
    file.read_at(off, &mut c)
        .map_err(|e| FormatError::io(e, format!("{name}: reading a compressed cluster")))?;
    compress::decompress(ctype, &c, out, name)
}

/// The bytes of one host write of an allocating job.
pub(crate) enum JobData {
    /// `(start, len)` of the caller's data (no copy).
    Src(u64, u64),
    /// A buffer built for copy-on-write.
    Owned(Vec<u8>),
}

impl JobData {
    fn len(&self) -> u64 {
        match self {
            JobData::Src(_, l) => *l,
            JobData::Owned(v) => v.len() as u64,
        }
    }
    /// The bytes, given the caller's data.
    fn bytes<'a>(&'a self, src: &'a [u8]) -> &'a [u8] {
        match self {
            JobData::Src(a, l) => &src[*a as usize..(*a + *l) as usize],
            JobData::Owned(v) => v,
        }
    }
}

/// Append a host write, merged with the previous one when both the host
/// range and the source are contiguous (the caller's data is never copied;
/// copy-on-write buffers are joined up to 8 MiB).
fn push_write(w: &mut Vec<(u64, JobData)>, host: u64, data: JobData) {
    if let Some((h, d)) = w.last_mut() {
        if *h + d.len() == host {
            match (d, &data) {
                (JobData::Src(a, l), JobData::Src(b, m)) if *a + *l == *b => {
                    *l += m;
                    return;
                }
                (JobData::Owned(v), JobData::Owned(x)) if v.len() < (8 << 20) => {
                    v.extend_from_slice(x);
                    return;
                }
                _ => {}
            }
        }
    }
    w.push((host, data));
}

/// Read guest bytes from the backing file (zeroes past its end).
pub(crate) fn read_backing(
    backing: Option<&Arc<dyn Storage>>,
    name: &str,
    off: u64,
    buf: &mut [u8],
) -> FResult<()> {
    buf.fill(0);
    let Some(b) = backing else { return Ok(()) };
    let blen = b
        .len()
        .map_err(|e| FormatError::io(e, format!("{name}: backing file size")))?;
    if off >= blen {
        return Ok(());
    }
    let n = ((blen - off) as usize).min(buf.len());
    b.read_at(off, &mut buf[..n])
        .map_err(|e| FormatError::io(e, format!("{name}: reading the backing file")))
}

impl Qcow2 {
    fn check_range(&self, off: u64, len: u64, size: u64) -> FResult<()> {
        match off.checked_add(len) {
            Some(e) if e <= size => Ok(()),
            _ => Err(FormatError::Invalid(format!(
                "{}: request at offset {off} length {len} is beyond the end of the image ({size} bytes)",
                self.name
            ))),
        }
    }

    /// Every change of guest data starts here: refuse it on a read-only
    /// open, and mark `auto` bitmaps in use first (see [`super::bitmap`]).
    fn writable(&self) -> FResult<()> {
        if self.is_read_only() {
            return Err(FormatError::ReadOnly(format!(
                "{}: the image is read-only",
                self.name
            )));
        }
        self.bitmaps_in_use()
    }

    fn store(&self) -> &Arc<dyn Storage> {
        self.data.as_ref().unwrap_or(&self.file)
    }

    /// Map `[offset, offset+len)` for reading: the runs in order, and the
    /// ticket that keeps their host clusters from being reused until the
    /// caller has finished reading them (drop it then). `Unalloc` runs
    /// read from the backing file (zeroes past its end or without one).
    /// Plain images only: the data of an encrypted one is read through
    /// [`Qcow2::read`].
    pub fn map_read(&self, offset: u64, len: u64) -> FResult<(Vec<Piece>, Ticket)> {
        self.plain_only()?;
        self.map_pieces(offset, len)
    }

    /// Refuse the asynchronous entry points, which hand host offsets to
    /// callers that would read or write ciphertext as data.
    fn plain_only(&self) -> FResult<()> {
        if self.crypt.encrypted() {
            return Err(FormatError::Unsupported(format!(
                "{}: the data of an encrypted image is not mapped for direct I/O",
                self.name
            )));
        }
        Ok(())
    }

    fn map_pieces(&self, offset: u64, len: u64) -> FResult<(Vec<Piece>, Ticket)> {
        let mut m = self.lock();
        self.check_range(offset, len, m.h.size)?;
        let mut pieces: Vec<Piece> = Vec::new();
        let mut done = 0u64;
        while done < len {
            let off = offset + done;
            let (kind, n) = m.map(off, len - done)?;
            match (pieces.last_mut(), kind) {
                // A cluster boundary splits runs; join what stays the same
                // so that a contiguous read is one host request.
                (Some(p), Kind::Zero | Kind::Unalloc) if p.kind == kind => p.len += n,
                (
                    Some(Piece {
                        kind: Kind::Data { host: h, .. },
                        len: pl,
                        ..
                    }),
                    Kind::Data { host, .. },
                ) if *h + *pl == host => *pl += n,
                _ => pieces.push(Piece {
                    offset: off,
                    len: n,
                    kind,
                }),
            }
            done += n;
        }
        let t = self.gate.ticket();
        Ok((pieces, t))
    }

    /// Map `[offset, offset+len)` for an overwrite in place: `InPlace`
    /// when every byte lies in a cluster allocated to this image alone and
    /// no allocating write is in flight there. The ticket is as for
    /// [`Qcow2::map_read`].
    pub fn map_overwrite(&self, offset: u64, len: u64) -> FResult<Overwrite> {
        self.writable()?;
        self.plain_only()?;
        let mut m = self.lock();
        self.check_range(offset, len, m.h.size)?;
        let first = offset / self.cs;
        let last = (offset + len.max(1) - 1) / self.cs;
        if let Some((_, &join)) = m.allocating.range(first..=last).next() {
            return Ok(match join {
                Some(host) if first == last => Overwrite::Join {
                    host: host + offset % self.cs,
                    cluster: host,
                    ticket: self.gate.ticket(),
                },
                _ => Overwrite::Busy,
            });
        }
        let mut runs: Vec<(u64, u64, u64)> = Vec::new();
        let mut done = 0u64;
        while done < len {
            let off = offset + done;
            let Some((host, n)) = m.inplace(off, len - done)? else {
                return Ok(Overwrite::Allocate);
            };
            match runs.last_mut() {
                Some((_, h, l)) if *h + *l == host => *l += n,
                _ => runs.push((off, host, n)),
            }
            done += n;
        }
        let t = self.gate.ticket();
        Ok(Overwrite::InPlace(runs, t))
    }

    /// Plan a write of `src` at `offset` that may allocate, for callers
    /// that do the data I/O themselves, asynchronously: clusters are
    /// allocated and marked allocating now; the caller zeroes
    /// `zero_first`, then writes `writes` (in any order), then calls
    /// [`Qcow2::finish_write`]. `Sync` when copy-on-write data would have
    /// to be read first: use [`Qcow2::write`] then.
    pub fn plan_write(&self, offset: u64, src: &[u8]) -> FResult<WritePlan> {
        self.writable()?;
        self.plain_only()?;
        let len = src.len() as u64;
        let mut m = self.lock();
        self.check_range(offset, len, m.h.size)?;
        let first = offset / self.cs;
        let last = (offset + len.max(1) - 1) / self.cs;
        if m.allocating.range(first..=last).next().is_some() {
            return Ok(WritePlan::Busy);
        }
        let mut pw = PlannedWrite {
            zero_first: Vec::new(),
            writes: Vec::new(),
            jobs: Vec::new(),
            ticket: None,
        };
        let mut done = 0u64;
        while done < len {
            let off = offset + done;
            let step = match m.inplace(off, len - done) {
                Ok(Some((host, n))) => {
                    pw.writes.push((
                        host,
                        WriteData::Guest {
                            offset: off,
                            len: n,
                        },
                    ));
                    Ok(n)
                }
                Ok(None) => match m.plan_alloc(off, &src[done as usize..], true) {
                    Ok(Some(mut job)) => {
                        pw.zero_first.append(&mut job.zero_first);
                        pw.writes
                            .extend(std::mem::take(&mut job.writes).into_iter().map(
                                |(h, d)| match d {
                                    JobData::Src(a, l) => (
                                        h,
                                        WriteData::Guest {
                                            offset: off + a,
                                            len: l,
                                        },
                                    ),
                                    JobData::Owned(v) => (h, WriteData::Owned(v)),
                                },
                            ));
                        let n = job.handled;
                        pw.jobs.push(job);
                        Ok(n)
                    }
                    Ok(None) => Err(None),
                    Err(e) => Err(Some(e)),
                },
                Err(e) => Err(Some(e)),
            };
            match step {
                Ok(n) => done += n,
                Err(e) => {
                    // Give back what was planned so far. Nobody can be
                    // waiting for these clusters: the lock was never let go.
                    for job in &pw.jobs {
                        let _ = m.finish_alloc(job, Err(FormatError::Invalid(String::new())));
                    }
                    return match e {
                        Some(e) => Err(e),
                        None => Ok(WritePlan::Sync),
                    };
                }
            }
        }
        pw.ticket = Some(self.gate.ticket());
        Ok(WritePlan::Ready(pw))
    }

    /// Complete a planned write: link the new clusters if the data I/O
    /// succeeded (`r`), give them back otherwise.
    pub fn finish_write(&self, pw: PlannedWrite, r: FResult<()>) -> FResult<()> {
        let mut m = self.lock();
        let mut res = r.clone();
        for job in &pw.jobs {
            let f = m.finish_alloc(job, r.clone());
            if res.is_ok() {
                res = f;
            }
        }
        drop(m);
        drop(pw.ticket);
        if !pw.jobs.is_empty() {
            self.alloc_finished();
        }
        res
    }

    /// Guest bytes of a compressed cluster: decompress the cluster whose
    /// data is `len` bytes at `off`, copy out from guest offset `guest`.
    pub fn read_compressed_part(
        &self,
        off: u64,
        len: u64,
        guest: u64,
        buf: &mut [u8],
    ) -> FResult<()> {
        let mut c = vec![0u8; self.cs as usize];
        decompress_at(
            &*self.file,
            self.ctype,
            self.cs,
            &self.name,
            off,
            len,
            &mut c,
        )?;
        let o = (guest % self.cs) as usize;
        let n = buf.len().min(c.len().saturating_sub(o));
        buf[..n].copy_from_slice(&c[o..o + n]);
        Ok(())
    }

    /// Encrypted images take whole sectors only (the block driver's
    /// request alignment).
    fn check_sectors(&self, offset: u64, len: u64) -> FResult<()> {
        if self.crypt.encrypted() && !(offset | len).is_multiple_of(crate::luks::SECTOR) {
            return Err(FormatError::Invalid(format!(
                "{}: encrypted images are read and written in whole 512-byte sectors (offset {offset} length {len})",
                self.name
            )));
        }
        Ok(())
    }

    /// Read guest bytes.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> FResult<()> {
        self.check_sectors(offset, buf.len() as u64)?;
        let (pieces, ticket) = self.map_pieces(offset, buf.len() as u64)?;
        for p in pieces {
            let a = (p.offset - offset) as usize;
            let part = &mut buf[a..a + p.len as usize];
            match p.kind {
                Kind::Unalloc => read_backing(self.live_backing(), &self.name, p.offset, part)?,
                Kind::Zero => part.fill(0),
                Kind::Data { host, .. } => {
                    self.store()
                        .read_at(host, part)
                        .map_err(|e| FormatError::io(e, format!("{}: reading data", self.name)))?;
                    if let Some(c) = self.crypt.get(&self.name)? {
                        c.decrypt(p.offset, host, part);
                    }
                }
                Kind::Compressed { off, len } => {
                    self.read_compressed_part(off, len, p.offset, part)?
                }
            }
        }
        drop(ticket);
        Ok(())
    }

    /// Write guest bytes; with `fua`, durable on return.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> FResult<()> {
        self.writable()?;
        let size = self.size();
        self.check_range(offset, data.len() as u64, size)?;
        self.check_sectors(offset, data.len() as u64)?;
        let crypt = self.crypt.get(&self.name)?;
        // Ciphertext of `bytes` for host offset `host` (guest `guest`), or
        // the bytes themselves on a plain image.
        let sealed = |guest: u64, host: u64, bytes: &[u8]| -> Vec<u8> {
            let mut v = bytes.to_vec();
            if let Some(c) = crypt {
                c.encrypt(guest, host, &mut v);
            }
            v
        };
        let mut done = 0usize;
        while done < data.len() {
            let off = offset + done as u64;
            let rest = &data[done..];
            let m = self.lock();
            let mut m = self.wait_allocs(m, off, rest.len() as u64);
            if let Some((host, n)) = m.inplace(off, rest.len() as u64)? {
                let _t = self.gate.ticket();
                drop(m);
                let part = &rest[..n as usize];
                let r = match crypt {
                    Some(_) => self.store().write_at(host, &sealed(off, host, part)),
                    None => self.store().write_at(host, part),
                };
                r.map_err(|e| FormatError::io(e, format!("{}: writing data", self.name)))?;
                done += n as usize;
                continue;
            }
            let Some(job) = m.plan_alloc(off, rest, false)? else {
                return Err(m.corrupt("internal error: no allocation plan"));
            };
            let _t = self.gate.ticket();
            drop(m);
            // The data (copy-on-write areas included) goes to clusters
            // nobody else references yet, without the metadata lock.
            let store = self.store();
            let mut r = Ok(());
            for &(h, l) in &job.zero_first {
                if let Err(e) = store.write_zeroes(h, l) {
                    r = Err(FormatError::io(
                        e,
                        format!("{}: zeroing a new cluster", self.name),
                    ));
                    break;
                }
            }
            for (h, d) in job.writes.iter().filter(|_| r.is_ok()) {
                let w = match crypt {
                    Some(_) => store.write_at(*h, &sealed(job.guest_of(*h), *h, d.bytes(rest))),
                    None => store.write_at(*h, d.bytes(rest)),
                };
                if let Err(e) = w {
                    r = Err(FormatError::io(e, format!("{}: writing data", self.name)));
                    break;
                }
            }
            let mut m = self.lock();
            let fin = m.finish_alloc(&job, r);
            drop(m);
            self.alloc_finished();
            fin?;
            done += job.handled as usize;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Write whole clusters compressed (cluster-aligned `offset`; the last
    /// cluster may be short at the end of the image). Clusters that do not
    /// compress are written normally.
    pub fn write_compressed(&self, offset: u64, data: &[u8]) -> FResult<()> {
        self.writable()?;
        if self.crypt.encrypted() {
            return Err(FormatError::Unsupported(format!(
                "{}: Compression and encryption not supported at the same time",
                self.name
            )));
        }
        let cs = self.cs;
        if !offset.is_multiple_of(cs) {
            return Err(FormatError::Invalid(format!(
                "{}: compressed writes must be cluster aligned",
                self.name
            )));
        }
        if self.data.is_some() {
            return Err(FormatError::Unsupported(format!(
                "{}: compressed writes are not supported with an external data file",
                self.name
            )));
        }
        self.check_range(offset, data.len() as u64, self.size())?;
        for (i, chunk) in data.chunks(cs as usize).enumerate() {
            let off = offset + i as u64 * cs;
            let mut full;
            let c = if chunk.len() < cs as usize {
                full = vec![0u8; cs as usize];
                full[..chunk.len()].copy_from_slice(chunk);
                &full[..]
            } else {
                full = Vec::new();
                let _ = &full;
                chunk
            };
            let Some(z) = compress::compress(self.ctype, c, cs as usize - 512) else {
                self.write(off, chunk, false)?;
                continue;
            };
            let m = self.lock();
            let mut m = self.wait_allocs(m, off, cs);
            m.writable()?;
            let gcl = off / cs;
            m.ensure_l2_writable(gcl)?;
            let (old, _) = m.get_l2(gcl)?;
            let host = m.alloc_bytes(z.len() as u64)?;
            m.check_overlap(host, z.len() as u64, 0)?;
            m.file
                .write_at(host, &z)
                .map_err(|e| m.ioe(e, "writing compressed data"))?;
            let cb = m.cluster_bits();
            let shift = 62 - (cb - 8);
            let sectors = (host % 512 + z.len() as u64).div_ceil(512);
            let entry = OFLAG_COMPRESSED | ((sectors - 1) << shift) | host;
            m.set_l2(gcl, entry, 0)?;
            m.release(old, DiscardType::Other);
        }
        Ok(())
    }

    /// Make `[offset, offset+len)` read as zeroes; `may_unmap` allows
    /// releasing the host clusters.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> FResult<()> {
        self.writable()?;
        let size = self.size();
        self.check_range(offset, len, size)?;
        let (v2_backing, raw_df, g) = {
            let m = self.lock();
            (
                m.h.version < 3 && self.live_backing().is_some(),
                m.h.autoclear & super::header::AUTOCLEAR_DATA_FILE_RAW != 0,
                m.sc_size(),
            )
        };
        let end = offset + len;
        let a = offset.div_ceil(g) * g;
        let b = end / g * g;
        if v2_backing || raw_df || a >= b {
            return self.write_zero_bytes(offset, len);
        }
        if a > offset {
            self.write_zero_bytes(offset, a - offset)?;
        }
        let mut off = a;
        while off < b {
            let cs = self.cs;
            let gcl = off / cs;
            let cend = ((gcl + 1) * cs).min(b);
            let m = self.lock();
            let mut m = self.wait_allocs(m, off, cend - off);
            m.ensure_l2_writable(gcl)?;
            let (e, bm) = m.get_l2(gcl)?;
            let whole = off % cs == 0 && cend - off == cs;
            if m.h.extended_l2() {
                if e & OFLAG_COMPRESSED != 0 && !whole {
                    drop(m);
                    self.write_zero_bytes(off, cend - off)?;
                    off = cend;
                    continue;
                }
                if whole && (may_unmap || e & OFLAG_COMPRESSED != 0 || e & OFLAG_COPIED == 0) {
                    m.set_l2(gcl, 0, BITMAP_ALL_ZERO)?;
                    m.release(e, DiscardType::Request);
                } else {
                    let s0 = (off % cs) / g;
                    let s1 = (cend - 1) % cs / g;
                    let mut mask = 0u64;
                    for s in s0..=s1 {
                        mask |= 1 << s;
                    }
                    m.set_l2(gcl, e, (bm & !mask) | (mask << 32))?;
                }
            } else {
                let keep = !may_unmap
                    && m.h.version >= 3
                    && e & OFLAG_COMPRESSED == 0
                    && e & OFLAG_COPIED != 0
                    && (e & OFFSET_MASK != 0 || m.data.is_some());
                let ne = if m.h.version < 3 {
                    0
                } else if keep {
                    (e & (OFFSET_MASK | OFLAG_COPIED)) | OFLAG_ZERO
                } else {
                    OFLAG_ZERO
                };
                m.set_l2(gcl, ne, 0)?;
                if !keep {
                    m.release(e, DiscardType::Request);
                }
            }
            drop(m);
            off = cend;
        }
        if end > b && b >= a {
            self.write_zero_bytes(b, end - b)?;
        }
        Ok(())
    }

    fn write_zero_bytes(&self, mut off: u64, len: u64) -> FResult<()> {
        let end = off + len;
        let zero = vec![0u8; (len.min(1 << 20)) as usize];
        while off < end {
            let n = (end - off).min(zero.len() as u64);
            self.write(off, &zero[..n as usize], false)?;
            off += n;
        }
        Ok(())
    }

    /// Discard whole clusters in the range (partial clusters are left as
    /// they are, as QEMU does): they read as zeroes afterwards (version 3),
    /// or fall through to the backing file (version 2).
    pub fn discard(&self, offset: u64, len: u64) -> FResult<()> {
        self.discard_typed(offset, len, DiscardType::Request, false)
    }

    /// Discard with a reason; `full` makes clusters unallocated (shrink).
    pub(crate) fn discard_typed(
        &self,
        offset: u64,
        len: u64,
        ty: DiscardType,
        full: bool,
    ) -> FResult<()> {
        self.writable()?;
        let cs = self.cs;
        let a = offset.div_ceil(cs);
        let b = offset.saturating_add(len) / cs;
        for gcl in a..b {
            let m = self.lock();
            let mut m = self.wait_allocs(m, gcl * cs, cs);
            let (l1i, _) = m.split(gcl);
            if m.l2_offset(l1i)?.is_none()
                && (full || self.live_backing().is_none() || m.h.version < 3)
            {
                continue;
            }
            let (e, bm) = m.get_l2(gcl)?;
            let allocated = e & (OFFSET_MASK | OFLAG_COMPRESSED) != 0 || bm & 0xffff_ffff != 0;
            let (ne, nb) = if full || m.h.version < 3 {
                (0, 0)
            } else if self.live_backing().is_some() || allocated {
                if m.h.extended_l2() {
                    (0, BITMAP_ALL_ZERO)
                } else {
                    (OFLAG_ZERO, 0)
                }
            } else {
                continue;
            };
            if (e, bm) == (ne, nb) {
                continue;
            }
            m.ensure_l2_writable(gcl)?;
            let (e, _) = m.get_l2(gcl)?;
            m.set_l2(gcl, ne, nb)?;
            m.release(e, ty);
        }
        Ok(())
    }

    /// Block status of the run at `offset` (at most `len` bytes).
    pub fn block_status(&self, offset: u64, len: u64) -> FResult<Status> {
        let size = self.size();
        if offset >= size {
            return Ok(Status {
                len,
                kind: Kind::Zero,
                reserved: None,
            });
        }
        let mut m = self.lock();
        let (kind, reserved, n) = m.map_reserved(offset, len.min(size - offset), true)?;
        Ok(Status {
            len: n.max(1),
            kind,
            reserved,
        })
    }

    /// Make completed writes and metadata durable; release freed clusters.
    pub fn flush(&self) -> FResult<()> {
        if self.is_read_only() {
            return Ok(());
        }
        // Unlocked I/O may go on: clusters it could still use stay
        // quarantined (see `gate`).
        self.lock().flush_all()
    }

    /// Change the virtual size (shrinking drops the clusters past the end).
    pub fn truncate(&self, new: u64) -> FResult<()> {
        self.writable()?;
        let old = self.size();
        if !new.is_multiple_of(512) {
            return Err(FormatError::Invalid(format!(
                "{}: the image size must be a multiple of 512 bytes",
                self.name
            )));
        }
        if new > super::header::MAX_VIRTUAL_SIZE {
            return Err(FormatError::Invalid(format!(
                "{}: Image too large",
                self.name
            )));
        }
        if !self.snapshots().is_empty() && new < old {
            return Err(FormatError::Unsupported(format!(
                "{}: Can't resize an image which has snapshots",
                self.name
            )));
        }
        if new != old {
            // Bitmap tables fit the old size (see `bitmap`).
            self.lock().mark_bitmaps_in_use(true)?;
        }
        if new < old {
            let start = new.div_ceil(self.cs) * self.cs;
            if start < old {
                self.discard_typed(
                    start,
                    old.div_ceil(self.cs) * self.cs - start,
                    DiscardType::Other,
                    true,
                )?;
            }
            // The partial cluster keeps stale bytes past the new end; they
            // are zeroed if the image grows again (below).
        }
        {
            let mut m = self.exclusive();
            m.flush_all()?;
            let need = m.h.l1_entries_for(new);
            if need > m.l1.len() as u64 {
                m.grow_l1(need)?;
            }
            m.h.size = new;
            m.write_header()?;
        }
        if new > old {
            // Whatever lies past the old end (the tail of its last cluster,
            // or backing data) must read as zeroes.
            let tail_end = if self.live_backing().is_some() {
                new
            } else {
                old.div_ceil(self.cs).saturating_mul(self.cs).min(new)
            };
            if tail_end > old {
                self.write_zeroes(old, tail_end - old, true)?;
            }
        }
        self.flush()
    }
}

impl Meta {
    /// Move the L1 table to a larger place.
    pub(crate) fn grow_l1(&mut self, need: u64) -> FResult<()> {
        let cs = self.cs;
        let new_len = need
            .max(self.l1.len() as u64 * 3 / 2)
            .min(super::header::MAX_L1_BYTES / 8);
        if new_len < need {
            return Err(FormatError::Invalid(format!(
                "{}: Image too large",
                self.name
            )));
        }
        let clusters = (new_len * 8).div_ceil(cs);
        let off = self.alloc_clusters(clusters)?;
        let mut l1 = self.l1.clone();
        l1.resize(new_len as usize, 0);
        let mut raw: Vec<u8> = l1.iter().flat_map(|w| w.to_be_bytes()).collect();
        raw.resize((clusters * cs) as usize, 0);
        // The copy holds the in-memory L1, which may point at L2 tables
        // still dirty in the cache: they reach the disk (after their
        // refcounts) within the same sync as the new table, before the
        // header points at it.
        self.refcounts_before_l2()?;
        self.write_dirty_l2()?;
        self.write_meta(off, &raw, super::overlap::ACTIVE_L1)?;
        self.sync()?;
        let old_off = self.h.l1_table_offset;
        let old_cl = (self.l1.len() as u64 * 8).div_ceil(cs);
        self.h.l1_table_offset = off;
        self.h.l1_size = new_len as u32;
        self.l1 = l1;
        self.l1_dirty.clear();
        self.write_header()?;
        if old_cl > 0 && old_off != 0 {
            self.queue_free(old_off, old_cl, DiscardType::Other);
        }
        Ok(())
    }
}
