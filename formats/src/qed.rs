//! QED, the QEMU Enhanced Disk format, read and write, as QEMU's
//! `docs/interop/qed_spec.txt` describes it.
//!
//! Layout ("Header", "Tables", "Cluster allocation"): a little-endian
//! header at 0 (magic "QED\0", cluster size, table size in clusters,
//! header size in clusters, feature bits, compatible and autoclear
//! feature bits, L1 table offset, image size, and with the backing-file
//! feature the backing file name's offset and size); an L1 and any number
//! of L2 tables, each `table_size` clusters of 64-bit offsets: 0 is a
//! cluster not allocated (read from the backing file, else zeroes), 1 a
//! zero cluster, anything else a cluster-aligned offset in the file.
//! Clusters and tables are allocated at the end of the file.
//!
//! "Consistency checking": the need-check feature bit is set before the
//! first allocating write and cleared when the image is closed cleanly;
//! an image opened writable with it set is checked, entries pointing
//! outside the file are dropped, and the bit is cleared.

use crate::check::{CheckResult, Repair};
use crate::error::{FResult, FormatError};
use crate::mapping::{push_run, GuestMap, Piece, Plan, Run, WriteMap};
use crate::storage::Storage;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The magic at offset 0.
pub const MAGIC: &[u8; 4] = b"QED\0";
const HEADER_BYTES: usize = 64;
/// The image has a backing file.
pub const F_BACKING_FILE: u64 = 0x1;
/// The image may be inconsistent: check it before writing.
pub const F_NEED_CHECK: u64 = 0x2;
/// The backing file's format is raw, not probed.
pub const F_BACKING_FORMAT_NO_PROBE: u64 = 0x4;
const KNOWN_FEATURES: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;
const ZERO_CLUSTER: u64 = 1;
const MIN_CLUSTER: u64 = 4096;
const MAX_CLUSTER: u64 = 64 << 20;
const MAX_TABLE: u64 = 16;
/// L2 tables kept in memory at once.
const L2_CACHE: usize = 64;

/// The header's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub cluster_size: u64,
    pub table_size: u64,
    pub header_size: u64,
    pub features: u64,
    pub compat_features: u64,
    pub autoclear_features: u64,
    pub l1_offset: u64,
    pub image_size: u64,
    pub backing_name_offset: u32,
    pub backing_name_size: u32,
}

fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// How sure probing is that `head` starts a QED image.
pub fn probe(head: &[u8]) -> u32 {
    if head.starts_with(MAGIC) {
        100
    } else {
        0
    }
}

impl Header {
    fn parse(name: &str, b: &[u8]) -> FResult<Header> {
        let bad = |m: String| FormatError::Corrupt(format!("{name}: {m}"));
        if !b.starts_with(MAGIC) {
            return Err(FormatError::Invalid(format!(
                "{name}: Image not in QED format"
            )));
        }
        let h = Header {
            cluster_size: le32(b, 4),
            table_size: le32(b, 8),
            header_size: le32(b, 12),
            features: le64(b, 16),
            compat_features: le64(b, 24),
            autoclear_features: le64(b, 32),
            l1_offset: le64(b, 40),
            image_size: le64(b, 48),
            backing_name_offset: le32(b, 56) as u32,
            backing_name_size: le32(b, 60) as u32,
        };
        let cs = h.cluster_size;
        if !cs.is_power_of_two() || !(MIN_CLUSTER..=MAX_CLUSTER).contains(&cs) {
            return Err(bad(format!("invalid cluster size {cs}")));
        }
        if !h.table_size.is_power_of_two() || h.table_size > MAX_TABLE {
            return Err(bad(format!("invalid table size {}", h.table_size)));
        }
        if h.features & !KNOWN_FEATURES != 0 {
            return Err(FormatError::Unsupported(format!(
                "{name}: Unsupported QED features: {:#x}",
                h.features & !KNOWN_FEATURES
            )));
        }
        if h.header_size == 0 || h.header_size > 16 {
            return Err(bad(format!("invalid header size {}", h.header_size)));
        }
        if !h.l1_offset.is_multiple_of(cs) || h.l1_offset < h.header_size * cs {
            return Err(bad(format!("invalid L1 table offset {:#x}", h.l1_offset)));
        }
        if !h.image_size.is_multiple_of(512) || h.image_size > h.max_size() {
            return Err(bad(format!("invalid image size {}", h.image_size)));
        }
        if h.features & F_BACKING_FILE != 0 {
            let end = u64::from(h.backing_name_offset) + u64::from(h.backing_name_size);
            if end > h.header_size * cs || h.backing_name_size > 1023 {
                return Err(bad("the backing file name is outside the header".into()));
            }
        }
        Ok(h)
    }

    fn serialize(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&(self.cluster_size as u32).to_le_bytes());
        b[8..12].copy_from_slice(&(self.table_size as u32).to_le_bytes());
        b[12..16].copy_from_slice(&(self.header_size as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.features.to_le_bytes());
        b[24..32].copy_from_slice(&self.compat_features.to_le_bytes());
        b[32..40].copy_from_slice(&self.autoclear_features.to_le_bytes());
        b[40..48].copy_from_slice(&self.l1_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.image_size.to_le_bytes());
        b[56..60].copy_from_slice(&self.backing_name_offset.to_le_bytes());
        b[60..64].copy_from_slice(&self.backing_name_size.to_le_bytes());
        b
    }

    fn entries(&self) -> u64 {
        self.table_size * self.cluster_size / 8
    }
    fn table_bytes(&self) -> u64 {
        self.table_size * self.cluster_size
    }
    /// What the tables can address (the spec's maximum image size).
    fn max_size(&self) -> u64 {
        self.entries()
            .saturating_mul(self.entries())
            .saturating_mul(self.cluster_size)
    }
}

/// What an allocating write allocated, for [`GuestMap::finish_alloc`].
#[derive(Debug, Default)]
pub struct Alloc {
    /// (guest cluster, new host offset).
    clusters: Vec<(u64, u64)>,
    /// (L1 index, new L2 table offset).
    tables: Vec<(u64, u64)>,
}

struct State {
    l1: Vec<u64>,
    /// L2 tables by their offset.
    l2: HashMap<u64, Vec<u64>>,
    /// Where the next cluster or table goes.
    file_end: u64,
    /// The need-check bit as the header on disk has it.
    need_check: bool,
    /// Guest clusters and L1 entries with allocations in flight.
    busy: HashSet<u64>,
    busy_l1: HashSet<u64>,
}

/// An open QED image.
pub struct Qed {
    name: String,
    file: Arc<dyn Storage>,
    backing: Option<Arc<dyn Storage>>,
    header: Mutex<Header>,
    h: Header,
    read_only: bool,
    st: Mutex<State>,
    done: Condvar,
}

/// What [`Qed::open`] reports of the header before opening the backing
/// file.
pub struct Preview {
    pub backing_file: Option<String>,
    /// The backing file's format, when the image says it is raw.
    pub backing_raw: bool,
}

/// Read what the header says of the backing file.
pub fn preview(name: &str, file: &dyn Storage) -> FResult<Preview> {
    let mut b = [0u8; HEADER_BYTES];
    file.read_at(0, &mut b)
        .map_err(|e| FormatError::io(e, format!("{name}: Could not read the header")))?;
    let h = Header::parse(name, &b)?;
    let mut backing_file = None;
    if h.features & F_BACKING_FILE != 0 {
        let mut n = vec![0u8; h.backing_name_size as usize];
        file.read_at(h.backing_name_offset.into(), &mut n)
            .map_err(|e| {
                FormatError::io(e, format!("{name}: Could not read the backing file name"))
            })?;
        backing_file = Some(String::from_utf8_lossy(&n).into_owned());
    }
    Ok(Preview {
        backing_file,
        backing_raw: h.features & F_BACKING_FORMAT_NO_PROBE != 0,
    })
}

impl Qed {
    /// Open `file` (named `name` in errors) with its parent in `backing`.
    pub fn open(
        name: &str,
        file: Arc<dyn Storage>,
        backing: Option<Arc<dyn Storage>>,
        read_only: bool,
    ) -> FResult<Qed> {
        let io = |e| FormatError::io(e, format!("{name}: Could not read the header"));
        let mut b = [0u8; HEADER_BYTES];
        file.read_at(0, &mut b).map_err(io)?;
        let h = Header::parse(name, &b)?;
        let flen = file.len().map_err(io)?;
        if h.l1_offset + h.table_bytes() > flen {
            return Err(FormatError::Corrupt(format!(
                "{name}: the L1 table is outside the file"
            )));
        }
        let mut raw = vec![0u8; h.table_bytes() as usize];
        file.read_at(h.l1_offset, &mut raw).map_err(io)?;
        let l1 = raw.chunks_exact(8).map(|c| le64(c, 0)).collect();
        let cs = h.cluster_size;
        let img = Qed {
            name: name.to_string(),
            file,
            backing,
            header: Mutex::new(h.clone()),
            read_only,
            st: Mutex::new(State {
                l1,
                l2: HashMap::new(),
                file_end: flen.div_ceil(cs) * cs,
                need_check: h.features & F_NEED_CHECK != 0,
                busy: HashSet::new(),
                busy_l1: HashSet::new(),
            }),
            h,
            done: Condvar::new(),
        };
        if !read_only && img.lock().need_check {
            // Left inconsistent by a writer that stopped: check, drop
            // what points outside the file, and mark it clean again.
            img.check(Repair::All)?;
            img.set_need_check(&mut img.lock(), false)?;
        }
        Ok(img)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn io(&self, e: std::io::Error, what: &str) -> FormatError {
        FormatError::io(e, format!("{}: {what}", self.name))
    }

    /// Guest size.
    pub fn size(&self) -> u64 {
        self.h.image_size
    }
    /// Cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.h.cluster_size
    }
    /// Whether the image has a backing file.
    pub fn has_backing(&self) -> bool {
        self.h.features & F_BACKING_FILE != 0
    }

    fn check_range(&self, off: u64, len: u64) -> FResult<()> {
        crate::mapping::check_range(&self.name, off, len, self.h.image_size)
    }

    fn writable(&self) -> FResult<()> {
        crate::mapping::check_writable(&self.name, self.read_only)
    }

    /// (guest cluster, offset in it, bytes) pieces of a range.
    fn chunks(&self, off: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        crate::mapping::block_chunks(off, len, self.h.cluster_size)
    }

    fn l1_index(&self, cluster: u64) -> (u64, u64) {
        let e = self.h.entries();
        (cluster / e, cluster % e)
    }

    /// A table or cluster offset must be aligned and inside the file.
    fn valid(&self, off: u64, len: u64, file_end: u64) -> bool {
        off.is_multiple_of(self.h.cluster_size)
            && off >= self.h.header_size * self.h.cluster_size
            && off.checked_add(len).is_some_and(|e| e <= file_end)
    }

    /// The L2 table at `off`, loaded into the cache.
    fn l2<'a>(&self, st: &'a mut State, off: u64) -> FResult<&'a mut Vec<u64>> {
        if !st.l2.contains_key(&off) {
            if !self.valid(off, self.h.table_bytes(), st.file_end) {
                return Err(FormatError::Corrupt(format!(
                    "{}: an L2 table offset {off:#x} is invalid",
                    self.name
                )));
            }
            let mut raw = vec![0u8; self.h.table_bytes() as usize];
            self.file
                .read_at(off, &mut raw)
                .map_err(|e| self.io(e, "Could not read an L2 table"))?;
            if st.l2.len() >= L2_CACHE {
                if let Some(k) = st.l2.keys().next().copied() {
                    st.l2.remove(&k);
                }
            }
            st.l2
                .insert(off, raw.chunks_exact(8).map(|c| le64(c, 0)).collect());
        }
        Ok(st.l2.get_mut(&off).expect("just inserted"))
    }

    /// The entry of guest `cluster`: 0, 1 or a host offset (checked).
    fn entry(&self, st: &mut State, cluster: u64) -> FResult<u64> {
        let (i1, i2) = self.l1_index(cluster);
        let t = st.l1.get(i1 as usize).copied().unwrap_or(0);
        if t == 0 {
            return Ok(0);
        }
        let fe = st.file_end;
        let e = self.l2(st, t)?[i2 as usize];
        if e > ZERO_CLUSTER && !self.valid(e, self.h.cluster_size, fe) {
            return Err(FormatError::Corrupt(format!(
                "{}: cluster {cluster} maps to an invalid offset {e:#x}",
                self.name
            )));
        }
        Ok(e)
    }

    fn set_need_check(&self, st: &mut State, on: bool) -> FResult<()> {
        if st.need_check == on {
            return Ok(());
        }
        let mut h = self.header.lock().unwrap_or_else(|e| e.into_inner());
        if on {
            h.features |= F_NEED_CHECK;
        } else {
            // Clean only once everything before is durable.
            self.file.flush().map_err(|e| self.io(e, "flush"))?;
            h.features &= !F_NEED_CHECK;
        }
        self.file
            .write_at(0, &h.serialize())
            .map_err(|e| self.io(e, "Could not write the header"))?;
        if on {
            self.file.flush().map_err(|e| self.io(e, "flush"))?;
        }
        st.need_check = on;
        Ok(())
    }

    /// Synchronous read.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> FResult<()> {
        let pieces = self.map_read(off, buf.len() as u64)?;
        crate::mapping::read_pieces(
            self,
            &self.name,
            &*self.file,
            self.backing.as_deref(),
            off,
            &pieces,
            buf,
        )
    }

    /// Synchronous write (allocating, with copy-on-write from the
    /// backing file for partly written new clusters).
    pub fn write(&self, off: u64, data: &[u8]) -> FResult<()> {
        let len = data.len() as u64;
        self.check_range(off, len)?;
        self.writable()?;
        let cs = self.h.cluster_size;
        for (c, inc, n) in self.chunks(off, len) {
            let guest = c * cs;
            let src = &data[(guest + inc - off) as usize..(guest + inc + n - off) as usize];
            let mut st = self.lock();
            while st.busy.contains(&c) || st.busy_l1.contains(&self.l1_index(c).0) {
                st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            let e = self.entry(&mut st, c)?;
            if e > ZERO_CLUSTER {
                self.file
                    .write_at(e + inc, src)
                    .map_err(|e| self.io(e, "write error"))?;
                continue;
            }
            // A new cluster: what the write does not cover comes from
            // the backing file (or is zero).
            let mut whole = vec![0u8; cs as usize];
            let in_image = (self.h.image_size - guest).min(cs) as usize;
            if e == 0 && (inc + n < cs || inc > 0) {
                if let Some(b) = self.backing.as_deref().filter(|b| b.is_present()) {
                    b.read_at(guest, &mut whole[..in_image])
                        .map_err(|e| self.io(e, "Could not read the backing file"))?;
                }
            }
            whole[inc as usize..(inc + n) as usize].copy_from_slice(src);
            let mut plan = self.allocate(&mut st, c)?;
            let host = plan.clusters[0].1;
            let r = self
                .file
                .write_at(host, &whole)
                .map_err(|e| self.io(e, "write error"))
                .and_then(|()| self.link(&mut st, &plan));
            if r.is_err() {
                plan.clusters.clear();
            }
            for (i1, _) in &plan.tables {
                st.busy_l1.remove(i1);
            }
            st.busy.remove(&c);
            drop(st);
            self.done.notify_all();
            r?;
        }
        Ok(())
    }

    /// Reserve a cluster for guest cluster `c` (and an L2 table if its
    /// L1 entry has none), marking both busy; sets need-check first.
    fn allocate(&self, st: &mut State, c: u64) -> FResult<Alloc> {
        self.set_need_check(st, true)?;
        let cs = self.h.cluster_size;
        let (i1, _) = self.l1_index(c);
        let mut a = Alloc::default();
        if st.l1[i1 as usize] == 0 && !st.busy_l1.contains(&i1) {
            let t = st.file_end;
            st.file_end += self.h.table_bytes();
            st.busy_l1.insert(i1);
            a.tables.push((i1, t));
        }
        let host = st.file_end;
        st.file_end += cs;
        st.busy.insert(c);
        a.clusters.push((c, host));
        Ok(a)
    }

    /// Link what `a` allocated: new L2 tables (written whole, then the L1
    /// entry), then the L2 entries of the clusters.
    fn link(&self, st: &mut State, a: &Alloc) -> FResult<()> {
        for &(i1, t) in &a.tables {
            let mut table = vec![0u64; self.h.entries() as usize];
            for &(c, host) in &a.clusters {
                let (j1, j2) = self.l1_index(c);
                if j1 == i1 {
                    table[j2 as usize] = host;
                }
            }
            let raw: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
            self.file
                .write_at(t, &raw)
                .map_err(|e| self.io(e, "Could not write an L2 table"))?;
            self.file.flush().map_err(|e| self.io(e, "flush"))?;
            self.file
                .write_at(self.h.l1_offset + i1 * 8, &t.to_le_bytes())
                .map_err(|e| self.io(e, "Could not write the L1 table"))?;
            st.l1[i1 as usize] = t;
            st.l2.insert(t, table);
        }
        for &(c, host) in &a.clusters {
            let (i1, i2) = self.l1_index(c);
            if a.tables.iter().any(|&(t1, _)| t1 == i1) {
                continue;
            }
            let t = st.l1[i1 as usize];
            self.file
                .write_at(t + i2 * 8, &host.to_le_bytes())
                .map_err(|e| self.io(e, "Could not write an L2 table"))?;
            self.l2(st, t)?[i2 as usize] = host;
        }
        Ok(())
    }

    /// Make writes durable.
    pub fn flush(&self) -> FResult<()> {
        self.file.flush().map_err(|e| self.io(e, "flush"))
    }

    /// Close cleanly: the need-check bit is cleared once all is durable.
    pub fn close(&self) -> FResult<()> {
        if self.read_only {
            return Ok(());
        }
        let mut st = self.lock();
        self.set_need_check(&mut st, false)
    }

    /// QEMU's `qed_check`: every table and cluster inside the file,
    /// aligned and used once; clusters the tables do not reach are
    /// leaks. With `repair`, bad entries are dropped.
    pub fn check(&self, repair: Repair) -> FResult<CheckResult> {
        let mut r = CheckResult::default();
        let mut st = self.lock();
        let cs = self.h.cluster_size;
        let fe = st.file_end;
        let mut used: HashSet<u64> = HashSet::new();
        let fix = repair != Repair::None && !self.read_only;
        let meta_clusters = (self.h.l1_offset + self.h.table_bytes()) / cs;
        r.total_clusters = self.h.image_size.div_ceil(cs);
        for i1 in 0..st.l1.len() as u64 {
            let t = st.l1[i1 as usize];
            if t == 0 {
                continue;
            }
            let tables_ok = self.valid(t, self.h.table_bytes(), fe)
                && (0..self.h.table_size).all(|k| used.insert(t / cs + k));
            if !tables_ok {
                r.corruptions += 1;
                r.messages
                    .push(format!("ERROR: invalid L2 table offset {t:#x}"));
                if fix {
                    self.file
                        .write_at(self.h.l1_offset + i1 * 8, &0u64.to_le_bytes())
                        .map_err(|e| self.io(e, "Could not write the L1 table"))?;
                    st.l1[i1 as usize] = 0;
                    r.corruptions_fixed += 1;
                }
                continue;
            }
            let entries = self.l2(&mut st, t)?.clone();
            // A cluster not right after the table's previous one is
            // fragmented (QEMU counts per table).
            let mut last = 0u64;
            for (i2, &e) in entries.iter().enumerate() {
                if e <= ZERO_CLUSTER {
                    continue;
                }
                r.allocated_clusters += 1;
                if last != 0 && last.checked_add(cs) != Some(e) {
                    r.fragmented_clusters += 1;
                }
                last = e;
                if !self.valid(e, cs, fe) || !used.insert(e / cs) {
                    r.corruptions += 1;
                    r.messages
                        .push(format!("ERROR: invalid cluster offset {e:#x}"));
                    if fix {
                        self.file
                            .write_at(t + i2 as u64 * 8, &0u64.to_le_bytes())
                            .map_err(|e| self.io(e, "Could not write an L2 table"))?;
                        self.l2(&mut st, t)?[i2] = 0;
                        r.corruptions_fixed += 1;
                    }
                }
            }
        }
        for c in meta_clusters..fe / cs {
            if !used.contains(&c) {
                r.leaks += 1;
            }
        }
        // QEMU's qed check reports no image end offset.
        Ok(r)
    }
}

impl GuestMap for Qed {
    type Alloc = Alloc;

    fn map_read(&self, off: u64, len: u64) -> FResult<Vec<Piece>> {
        self.check_range(off, len)?;
        let mut st = self.lock();
        let mut out = Vec::new();
        let cs = self.h.cluster_size;
        for (c, inc, n) in self.chunks(off, len) {
            // Unallocated: the backing file's bytes (zeroes without one),
            // and not present in this layer, as QEMU reports it.
            let run = match self.entry(&mut st, c)? {
                0 => Run::Backing,
                ZERO_CLUSTER => Run::Zero,
                e => Run::Data(e + inc),
            };
            push_run(&mut out, c * cs + inc, n, run);
        }
        Ok(out)
    }

    fn map_write(&self, off: u64, len: u64) -> FResult<WriteMap> {
        self.check_range(off, len)?;
        self.writable()?;
        let mut st = self.lock();
        let cs = self.h.cluster_size;
        let mut runs = Vec::new();
        for (c, inc, n) in self.chunks(off, len) {
            if st.busy.contains(&c) || st.busy_l1.contains(&self.l1_index(c).0) {
                return Ok(WriteMap::Busy);
            }
            match self.entry(&mut st, c)? {
                e if e > ZERO_CLUSTER => runs.push((c * cs + inc, e + inc, n)),
                _ => return Ok(WriteMap::Allocate),
            }
        }
        Ok(WriteMap::InPlace(runs))
    }

    fn plan_alloc(&self, off: u64, len: u64) -> FResult<Plan<Alloc>> {
        self.check_range(off, len)?;
        self.writable()?;
        let mut st = self.lock();
        let cs = self.h.cluster_size;
        let chunks: Vec<_> = self.chunks(off, len).collect();
        if chunks
            .iter()
            .any(|&(c, _, _)| st.busy.contains(&c) || st.busy_l1.contains(&self.l1_index(c).0))
        {
            return Ok(Plan::Busy);
        }
        // Partly written new clusters over a backing file need its bytes
        // merged in: the synchronous path does that.
        for &(c, inc, n) in &chunks {
            let e = self.entry(&mut st, c)?;
            let partial = inc > 0 || (inc + n < cs && c * cs + inc + n < self.h.image_size);
            if e == 0 && partial && self.has_backing() {
                return Ok(Plan::Sync);
            }
        }
        let (mut writes, mut alloc) = (Vec::new(), Alloc::default());
        for &(c, inc, n) in &chunks {
            let guest = c * cs + inc;
            let e = self.entry(&mut st, c)?;
            if e > ZERO_CLUSTER {
                writes.push((guest, e + inc, n));
                continue;
            }
            // A table an earlier chunk of this request planned serves
            // this cluster too (`allocate` sees its L1 entry busy).
            let a = match self.allocate(&mut st, c) {
                Ok(a) => a,
                Err(err) => {
                    self.release(&mut st, &alloc);
                    return Err(err);
                }
            };
            // New clusters lie past the file's end and read as zeroes
            // wherever this write puts no data, as an unallocated or a
            // zero cluster without a backing file must.
            let host = a.clusters[0].1;
            writes.push((guest, host + inc, n));
            alloc.clusters.extend(a.clusters);
            alloc.tables.extend(a.tables);
        }
        Ok(Plan::Ready {
            zero_first: Vec::new(),
            writes,
            alloc,
        })
    }

    fn finish_alloc(&self, a: Alloc, ok: bool) -> FResult<()> {
        let mut st = self.lock();
        let r = if ok { self.link(&mut st, &a) } else { Ok(()) };
        self.release(&mut st, &a);
        drop(st);
        self.done.notify_all();
        r
    }
}

impl Qed {
    fn release(&self, st: &mut State, a: &Alloc) {
        for (c, _) in &a.clusters {
            st.busy.remove(c);
        }
        for (i1, _) in &a.tables {
            st.busy_l1.remove(i1);
        }
    }
}

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_size: u64,
    pub table_size: u64,
    pub backing_file: Option<String>,
    pub backing_fmt: Option<String>,
}

/// Check create options (QEMU's messages).
pub fn validate(o: &CreateOptions) -> FResult<()> {
    let cs = o.cluster_size;
    if !cs.is_power_of_two() || !(MIN_CLUSTER..=MAX_CLUSTER).contains(&cs) {
        return Err(FormatError::Invalid(format!(
            "QED cluster size must be within range [{MIN_CLUSTER}, {MAX_CLUSTER}] and power of 2"
        )));
    }
    if !o.table_size.is_power_of_two() || o.table_size > MAX_TABLE {
        return Err(FormatError::Invalid(format!(
            "QED table size must be within range [1, {MAX_TABLE}] and power of 2"
        )));
    }
    let entries = o.table_size * cs / 8;
    let max = entries.saturating_mul(entries).saturating_mul(cs);
    if o.size > max || !o.size.is_multiple_of(512) {
        return Err(FormatError::Invalid(format!(
            "QED image size must be a non-zero multiple of cluster size and less than {max} bytes"
        )));
    }
    Ok(())
}

/// Lay a new image out on `file`: the header cluster with the backing
/// file name, then the L1 table.
pub fn create(file: &dyn Storage, o: &CreateOptions) -> FResult<()> {
    validate(o)?;
    let cs = o.cluster_size;
    let mut h = Header {
        cluster_size: cs,
        table_size: o.table_size,
        header_size: 1,
        features: 0,
        compat_features: 0,
        autoclear_features: 0,
        l1_offset: cs,
        image_size: o.size,
        backing_name_offset: 0,
        backing_name_size: 0,
    };
    let mut cluster = vec![0u8; cs as usize];
    if let Some(b) = &o.backing_file {
        h.features |= F_BACKING_FILE;
        if o.backing_fmt.as_deref() == Some("raw") {
            h.features |= F_BACKING_FORMAT_NO_PROBE;
        }
        h.backing_name_offset = HEADER_BYTES as u32;
        h.backing_name_size = b.len() as u32;
        if HEADER_BYTES + b.len() > cluster.len() {
            return Err(FormatError::Invalid(
                "the backing file name is too long".into(),
            ));
        }
        cluster[HEADER_BYTES..HEADER_BYTES + b.len()].copy_from_slice(b.as_bytes());
    }
    cluster[..HEADER_BYTES].copy_from_slice(&h.serialize());
    let io = |e| FormatError::io(e, "creating the image".to_string());
    file.set_len(0).map_err(io)?;
    file.write_at(0, &cluster).map_err(io)?;
    file.write_at(cs, &vec![0u8; h.table_bytes() as usize])
        .map_err(io)?;
    file.flush().map_err(io)
}

/// The hostile-image harness behind the `qed_open` fuzz target: `data`
/// opened read-only and read, then writable (which checks it) and written.
pub fn fuzz_open(data: &[u8]) {
    const NAME: &str = "hostile.qed";
    let limit = (data.len() as u64).max(1 << 20) * 4 + (8 << 20);
    for ro in [true, false] {
        let f = Arc::new(crate::storage::MemStorage::new(data.to_vec(), limit));
        let Some(img) = crate::error::named(NAME, Qed::open(NAME, f.clone(), None, ro)) else {
            continue;
        };
        let window = img.size().min(1 << 20);
        let mut buf = vec![0u8; window as usize];
        crate::error::named(NAME, img.read(0, &mut buf));
        let _ = img.check(Repair::None);
        if !ro && img.size() > 0 {
            let n = img.size().min(6000) as usize;
            crate::error::named(NAME, img.write(0, &vec![0x5a; n]));
            crate::error::named(NAME, img.write(img.size() - 512, &[1u8; 512]));
            crate::error::named(NAME, img.close());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn new_image(size: u64) -> (Arc<MemStorage>, Qed) {
        let f = Arc::new(MemStorage::new(Vec::new(), 64 << 20));
        create(
            &*f,
            &CreateOptions {
                size,
                cluster_size: 4096,
                table_size: 1,
                backing_file: None,
                backing_fmt: None,
            },
        )
        .unwrap();
        let img = Qed::open("t", f.clone(), None, false).unwrap();
        (f, img)
    }

    #[test]
    fn writes_allocate_and_read_back_after_reopen() {
        let (f, img) = new_image(8 << 20);
        img.write(4096 * 600 + 100, &[7u8; 9000]).unwrap();
        img.write(0, &[1u8; 512]).unwrap();
        let mut b = vec![0u8; 9000];
        img.read(4096 * 600 + 100, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 7));
        img.close().unwrap();
        let again = Qed::open("t", f.clone(), None, true).unwrap();
        let mut b = vec![9u8; 4096];
        again.read(0, &mut b).unwrap();
        assert!(b[..512].iter().all(|&x| x == 1) && b[512..].iter().all(|&x| x == 0));
        let r = again.check(Repair::None).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
        assert_eq!(r.allocated_clusters, 4);
    }

    #[test]
    fn partial_writes_over_a_backing_file_copy_the_rest() {
        let f = Arc::new(MemStorage::new(Vec::new(), 64 << 20));
        let o = CreateOptions {
            size: 1 << 20,
            cluster_size: 4096,
            table_size: 1,
            backing_file: Some("base".into()),
            backing_fmt: Some("raw".into()),
        };
        create(&*f, &o).unwrap();
        let base: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
        let b: Arc<dyn Storage> = Arc::new(MemStorage::new(base.clone(), 1 << 20));
        let img = Qed::open("t", f.clone(), Some(b), false).unwrap();
        assert!(img.has_backing());
        img.write(5000, &[0xee; 100]).unwrap();
        let mut got = vec![0u8; 12288];
        img.read(0, &mut got).unwrap();
        let mut want = base[..12288].to_vec();
        want[5000..5100].fill(0xee);
        assert!(got == want);
        let pv = preview("t", &*f).unwrap();
        assert_eq!(pv.backing_file.as_deref(), Some("base"));
        assert!(pv.backing_raw);
    }

    #[test]
    fn need_check_is_set_while_writing_and_cleared_at_close() {
        let (f, img) = new_image(1 << 20);
        img.write(0, &[1u8; 4096]).unwrap();
        let mut h = [0u8; 64];
        f.read_at(0, &mut h).unwrap();
        assert_ne!(le64(&h, 16) & F_NEED_CHECK, 0);
        img.close().unwrap();
        f.read_at(0, &mut h).unwrap();
        assert_eq!(le64(&h, 16) & F_NEED_CHECK, 0);
    }
}
