//! qcow version 1, read and write, as QEMU's `block/qcow.c` keeps it for
//! old images.
//!
//! Layout (the qcow header, big-endian, 48 bytes): magic "QFI\xfb",
//! version 1, the backing file name's offset and size, mtime, the guest
//! size, cluster bits, L2 bits, the encryption method (0 none, 1 AES)
//! and the L1 table's offset. L1 entries point at L2 tables of
//! `1 << l2_bits` entries; an L2 entry is a cluster's offset, 0 for one
//! not allocated (the backing file's, else zeroes), or with bit 63 set a
//! compressed cluster: its size in the bits below 63 down to
//! `63 - cluster_bits`, its offset in the rest, raw deflate inside.
//! Tables and clusters are allocated at the end of the file.
//!
//! AES images (method 1) encrypt each 512-byte sector of a data cluster
//! with AES-128-CBC, the IV the guest sector number (plain64), the key
//! the passphrase padded with zeroes: insecure, kept for reading and
//! converting old images (the caller warns).

use crate::error::{FResult, FormatError};
use crate::luks::SectorCipher;
use crate::mapping::{push_run, GuestMap, Piece, Plan, Run, WriteMap};
use crate::storage::Storage;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The magic at offset 0 (qcow2's too; the version tells them apart).
pub const MAGIC: &[u8; 4] = b"QFI\xfb";
const HEADER_BYTES: usize = 48;
const COMPRESSED: u64 = 1 << 63;
/// AES encryption method.
pub const CRYPT_AES: u32 = 1;
const L2_CACHE: usize = 64;
const SECTOR: u64 = 512;

/// How sure probing is that `head` starts a qcow version 1 image.
pub fn probe(head: &[u8]) -> u32 {
    if head.len() >= 8 && head.starts_with(MAGIC) && head[4..8] == [0, 0, 0, 1] {
        100
    } else {
        0
    }
}

fn be32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}
/// `data` deflated raw (no zlib header), as qcow's compressed clusters
/// hold it.
fn deflate_raw(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail.
    let _ = e.write_all(data);
    e.finish().unwrap_or_default()
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// The header's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub backing_offset: u64,
    pub backing_size: u32,
    pub mtime: u32,
    pub size: u64,
    pub cluster_bits: u32,
    pub l2_bits: u32,
    pub crypt_method: u32,
    pub l1_offset: u64,
}

impl Header {
    fn parse(name: &str, b: &[u8]) -> FResult<Header> {
        let bad = |m: String| FormatError::Corrupt(format!("{name}: {m}"));
        if probe(b) == 0 {
            return Err(FormatError::Invalid(format!(
                "{name}: Image not in qcow format"
            )));
        }
        let h = Header {
            backing_offset: be64(b, 8),
            backing_size: be32(b, 16) as u32,
            mtime: be32(b, 20) as u32,
            size: be64(b, 24),
            cluster_bits: u32::from(b[32]),
            l2_bits: u32::from(b[33]),
            crypt_method: be32(b, 36) as u32,
            l1_offset: be64(b, 40),
        };
        // QEMU's bounds.
        if !(9..=16).contains(&h.cluster_bits) {
            return Err(bad(format!(
                "Cluster size must be between 512 and 64k (bits {})",
                h.cluster_bits
            )));
        }
        if !(6..=13).contains(&h.l2_bits) {
            return Err(bad(format!(
                "L2 table size must be between 512 and 64k (bits {})",
                h.l2_bits
            )));
        }
        if h.crypt_method > CRYPT_AES {
            return Err(FormatError::Unsupported(format!(
                "{name}: invalid encryption method in qcow header"
            )));
        }
        if h.size > (1 << 62) || h.size.div_ceil(1 << (h.cluster_bits + h.l2_bits)) > (1 << 24) {
            return Err(bad(format!("Image too large ({} bytes)", h.size)));
        }
        if h.backing_size > 1023 {
            return Err(bad("Backing file name too long".into()));
        }
        Ok(h)
    }

    fn serialize(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&1u32.to_be_bytes());
        b[8..16].copy_from_slice(&self.backing_offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.backing_size.to_be_bytes());
        b[20..24].copy_from_slice(&self.mtime.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32] = self.cluster_bits as u8;
        b[33] = self.l2_bits as u8;
        b[36..40].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_offset.to_be_bytes());
        b
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }
    fn l1_entries(&self) -> u64 {
        self.size.div_ceil(1 << (self.cluster_bits + self.l2_bits))
    }
}

/// What the header says of the backing file, before opening it.
pub fn preview(name: &str, file: &dyn Storage) -> FResult<(Option<String>, bool)> {
    let mut b = [0u8; HEADER_BYTES];
    file.read_at(0, &mut b)
        .map_err(|e| FormatError::io(e, format!("{name}: Could not read the header")))?;
    let h = Header::parse(name, &b)?;
    let mut backing = None;
    if h.backing_offset != 0 && h.backing_size > 0 {
        let mut n = vec![0u8; h.backing_size as usize];
        file.read_at(h.backing_offset, &mut n).map_err(|e| {
            FormatError::io(e, format!("{name}: Could not read the backing file name"))
        })?;
        backing = Some(String::from_utf8_lossy(&n).into_owned());
    }
    Ok((backing, h.crypt_method == CRYPT_AES))
}

/// What an allocating write allocated.
#[derive(Debug, Default)]
pub struct Alloc {
    clusters: Vec<(u64, u64)>,
    tables: Vec<(u64, u64)>,
}

struct State {
    l1: Vec<u64>,
    l2: HashMap<u64, Vec<u64>>,
    file_end: u64,
    busy: HashSet<u64>,
    busy_l1: HashSet<u64>,
    /// The last compressed cluster inflated (its L2 entry, the bytes).
    inflated: Option<(u64, Vec<u8>)>,
}

/// An open qcow image.
pub struct Qcow {
    name: String,
    file: Arc<dyn Storage>,
    backing: Option<Arc<dyn Storage>>,
    h: Header,
    read_only: bool,
    cipher: Option<SectorCipher>,
    st: Mutex<State>,
    done: Condvar,
}

impl Qcow {
    /// Open `file` (named `name`), its parent in `backing`; `key` is the
    /// passphrase of an AES image.
    pub fn open(
        name: &str,
        file: Arc<dyn Storage>,
        backing: Option<Arc<dyn Storage>>,
        read_only: bool,
        key: Option<&[u8]>,
    ) -> FResult<Qcow> {
        let io = |e| FormatError::io(e, format!("{name}: Could not read the header"));
        let mut b = [0u8; HEADER_BYTES];
        file.read_at(0, &mut b).map_err(io)?;
        let h = Header::parse(name, &b)?;
        let flen = file.len().map_err(io)?;
        let l1_bytes = h.l1_entries() * 8;
        if h.l1_offset.checked_add(l1_bytes).is_none_or(|e| e > flen) {
            return Err(FormatError::Corrupt(format!(
                "{name}: the L1 table is outside the file"
            )));
        }
        let mut raw = vec![0u8; l1_bytes as usize];
        file.read_at(h.l1_offset, &mut raw).map_err(io)?;
        // Without a key an AES image opens for its metadata only (the
        // caller decides whether that is allowed); its data is refused.
        let cipher = match (h.crypt_method, key) {
            (0, _) | (_, None) => None,
            (_, Some(k)) => Some(crate::luks::legacy_aes(k)),
        };
        let cs = h.cluster_size();
        Ok(Qcow {
            name: name.to_string(),
            file,
            backing,
            read_only,
            cipher,
            st: Mutex::new(State {
                l1: raw.chunks_exact(8).map(|c| be64(c, 0)).collect(),
                l2: HashMap::new(),
                file_end: flen.div_ceil(cs) * cs,
                busy: HashSet::new(),
                busy_l1: HashSet::new(),
                inflated: None,
            }),
            h,
            done: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether guest cluster `c` (or its L2 table) has an allocation in
    /// flight.
    fn busy(&self, st: &State, c: u64) -> bool {
        st.busy.contains(&c) || st.busy_l1.contains(&self.split(c).0)
    }

    /// The state, once no allocation is in flight for cluster `c`.
    fn lock_idle(&self, c: u64) -> MutexGuard<'_, State> {
        let mut st = self.lock();
        while self.busy(&st, c) {
            st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st
    }

    /// Write the new cluster's `bytes` at `host`, link what `a`
    /// allocated, and let waiters go, whatever the outcome.
    fn store_allocated(
        &self,
        mut st: MutexGuard<'_, State>,
        a: &Alloc,
        host: u64,
        bytes: &[u8],
    ) -> FResult<()> {
        let r = self
            .file
            .write_at(host, bytes)
            .map_err(|er| self.io(er, "write error"))
            .and_then(|()| self.link(&mut st, a));
        self.release(&mut st, a);
        drop(st);
        self.done.notify_all();
        r
    }
    fn io(&self, e: std::io::Error, what: &str) -> FormatError {
        FormatError::io(e, format!("{}: {what}", self.name))
    }
    /// Guest size.
    pub fn size(&self) -> u64 {
        self.h.size
    }
    /// Cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.h.cluster_size()
    }
    /// Whether the data is AES-encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.h.crypt_method == CRYPT_AES
    }

    fn check_range(&self, off: u64, len: u64) -> FResult<()> {
        crate::mapping::check_range(&self.name, off, len, self.h.size)
    }
    fn writable(&self) -> FResult<()> {
        crate::mapping::check_writable(&self.name, self.read_only)
    }
    fn chunks(&self, off: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        crate::mapping::block_chunks(off, len, self.h.cluster_size())
    }
    fn split(&self, c: u64) -> (u64, u64) {
        (c >> self.h.l2_bits, c & (self.h.l2_entries() - 1))
    }

    fn l2<'a>(&self, st: &'a mut State, off: u64) -> FResult<&'a mut Vec<u64>> {
        if !st.l2.contains_key(&off) {
            let bytes = self.h.l2_entries() * 8;
            if off.checked_add(bytes).is_none_or(|e| e > st.file_end) {
                return Err(FormatError::Corrupt(format!(
                    "{}: an L2 table offset {off:#x} is outside the file",
                    self.name
                )));
            }
            let mut raw = vec![0u8; bytes as usize];
            self.file
                .read_at(off, &mut raw)
                .map_err(|e| self.io(e, "Could not read an L2 table"))?;
            if st.l2.len() >= L2_CACHE {
                if let Some(k) = st.l2.keys().next().copied() {
                    st.l2.remove(&k);
                }
            }
            st.l2
                .insert(off, raw.chunks_exact(8).map(|c| be64(c, 0)).collect());
        }
        Ok(st.l2.get_mut(&off).expect("just inserted"))
    }

    fn entry(&self, st: &mut State, c: u64) -> FResult<u64> {
        let (i1, i2) = self.split(c);
        match st.l1.get(i1 as usize).copied().unwrap_or(0) {
            0 => Ok(0),
            t => Ok(self.l2(st, t)?[i2 as usize]),
        }
    }

    /// The inflated bytes of compressed L2 entry `e`.
    fn inflate(&self, st: &mut State, e: u64) -> FResult<Vec<u8>> {
        if let Some((k, v)) = &st.inflated {
            if *k == e {
                return Ok(v.clone());
            }
        }
        let cb = self.h.cluster_bits;
        let csize = (e >> (63 - cb)) & ((1 << cb) - 1);
        let coff = e & ((1u64 << (63 - cb)) - 1);
        let mut src = vec![0u8; csize as usize];
        self.file
            .read_at(coff, &mut src)
            .map_err(|er| self.io(er, "Could not read a compressed cluster"))?;
        let cs = self.h.cluster_size() as usize;
        let mut out = vec![0u8; cs];
        let mut z = flate2::Decompress::new(false);
        match z.decompress(&src, &mut out, flate2::FlushDecompress::Finish) {
            Ok(_) if z.total_out() as usize == cs => {}
            _ => {
                return Err(FormatError::Corrupt(format!(
                    "{}: a compressed cluster does not inflate to {cs} bytes",
                    self.name
                )))
            }
        }
        st.inflated = Some((e, out.clone()));
        Ok(out)
    }

    /// An AES image opened without its key has no data to give.
    fn keyed(&self) -> FResult<()> {
        if self.is_encrypted() && self.cipher.is_none() {
            return Err(FormatError::Invalid(format!(
                "{}: the image is encrypted and was opened without encrypt.key-secret",
                self.name
            )));
        }
        Ok(())
    }

    /// Synchronous read.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> FResult<()> {
        self.keyed()?;
        let pieces = self.map_read(off, buf.len() as u64)?;
        crate::mapping::read_pieces(
            self,
            &self.name,
            &*self.file,
            self.backing.as_deref(),
            off,
            &pieces,
            buf,
        )?;
        if let Some(c) = &self.cipher {
            for p in &pieces {
                if let Run::Data(_) = p.run {
                    let at = (p.offset - off) as usize;
                    c.decrypt(p.offset / SECTOR, &mut buf[at..at + p.len as usize]);
                }
            }
        }
        Ok(())
    }

    /// Synchronous write: in place, or into a new cluster made whole
    /// first from what it replaces (backing file, compressed cluster).
    pub fn write(&self, off: u64, data: &[u8]) -> FResult<()> {
        self.keyed()?;
        self.check_range(off, data.len() as u64)?;
        self.writable()?;
        let cs = self.h.cluster_size();
        for (c, inc, n) in self.chunks(off, data.len() as u64) {
            let guest = c * cs;
            let src = &data[(guest + inc - off) as usize..(guest + inc + n - off) as usize];
            let mut st = self.lock_idle(c);
            let e = self.entry(&mut st, c)?;
            if e != 0 && e & COMPRESSED == 0 {
                let mut d = src.to_vec();
                if let Some(ci) = &self.cipher {
                    ci.encrypt((guest + inc) / SECTOR, &mut d);
                }
                self.file
                    .write_at(e + inc, &d)
                    .map_err(|er| self.io(er, "write error"))?;
                continue;
            }
            let in_image = (self.h.size - guest).min(cs) as usize;
            let mut whole = if e & COMPRESSED != 0 {
                self.inflate(&mut st, e)?
            } else {
                let mut w = vec![0u8; cs as usize];
                if let Some(b) = self.backing.as_deref().filter(|b| b.is_present()) {
                    b.read_at(guest, &mut w[..in_image])
                        .map_err(|er| self.io(er, "Could not read the backing file"))?;
                }
                w
            };
            whole[inc as usize..(inc + n) as usize].copy_from_slice(src);
            if let Some(ci) = &self.cipher {
                ci.encrypt(guest / SECTOR, &mut whole);
            }
            let a = self.allocate(&mut st, c, None);
            let host = a.clusters[0].1;
            self.store_allocated(st, &a, host, &whole)?;
        }
        Ok(())
    }

    /// Write whole clusters compressed (cluster-aligned `off`; the last
    /// cluster may end at the end of the image), as qemu-img's `convert
    /// -c`: each cluster deflated raw and stored at the end of the file,
    /// in whole sectors; one that does not shrink is written plainly, as
    /// QEMU does. Not for AES images (QEMU refuses the combination).
    pub fn write_compressed(&self, off: u64, data: &[u8]) -> FResult<()> {
        self.check_range(off, data.len() as u64)?;
        self.writable()?;
        let cs = self.h.cluster_size();
        if self.is_encrypted() {
            return Err(FormatError::Unsupported(format!(
                "{}: Compression and encryption not supported at the same time",
                self.name
            )));
        }
        if !off.is_multiple_of(cs) {
            return Err(FormatError::Invalid(format!(
                "{}: compressed writes must be cluster aligned",
                self.name
            )));
        }
        for (i, chunk) in data.chunks(cs as usize).enumerate() {
            let guest = off + i as u64 * cs;
            let mut whole = chunk.to_vec();
            whole.resize(cs as usize, 0);
            let z = deflate_raw(&whole);
            // The size field has `cluster_bits` bits: a cluster that does
            // not shrink is stored as it is.
            if z.len() as u64 >= cs {
                self.write(guest, chunk)?;
                continue;
            }
            let c = guest / cs;
            let mut st = self.lock_idle(c);
            let mut a = self.allocate(&mut st, c, Some(z.len() as u64));
            let host = a.clusters[0].1;
            a.clusters[0].1 = COMPRESSED | ((z.len() as u64) << (63 - self.h.cluster_bits)) | host;
            let mut padded = z;
            padded.resize(padded.len().div_ceil(SECTOR as usize) * SECTOR as usize, 0);
            self.store_allocated(st, &a, host, &padded)?;
        }
        Ok(())
    }

    /// Space at the end of the file for guest cluster `c` (and its L2
    /// table if it has none): a whole cluster, or with `compressed` that
    /// many bytes in whole sectors, packed after the previous compressed
    /// cluster as qemu-img packs them. Tables and plain clusters start on
    /// a cluster boundary.
    fn allocate(&self, st: &mut State, c: u64, compressed: Option<u64>) -> Alloc {
        let cs = self.h.cluster_size();
        let (i1, _) = self.split(c);
        let mut a = Alloc::default();
        if st.l1[i1 as usize] == 0 && !st.busy_l1.contains(&i1) {
            let t = st.file_end.div_ceil(cs) * cs;
            st.file_end = t + (self.h.l2_entries() * 8).div_ceil(cs) * cs;
            st.busy_l1.insert(i1);
            a.tables.push((i1, t));
        }
        let (at, len) = match compressed {
            Some(n) => (st.file_end, n.div_ceil(SECTOR) * SECTOR),
            None => (st.file_end.div_ceil(cs) * cs, cs),
        };
        a.clusters.push((c, at));
        st.file_end = at + len;
        st.busy.insert(c);
        a
    }

    fn link(&self, st: &mut State, a: &Alloc) -> FResult<()> {
        for &(i1, t) in &a.tables {
            let mut table = vec![0u64; self.h.l2_entries() as usize];
            for &(c, host) in &a.clusters {
                let (j1, j2) = self.split(c);
                if j1 == i1 {
                    table[j2 as usize] = host;
                }
            }
            let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.file
                .write_at(t, &raw)
                .map_err(|e| self.io(e, "Could not write an L2 table"))?;
            self.file
                .write_at(self.h.l1_offset + i1 * 8, &t.to_be_bytes())
                .map_err(|e| self.io(e, "Could not write the L1 table"))?;
            st.l1[i1 as usize] = t;
            st.l2.insert(t, table);
        }
        for &(c, host) in &a.clusters {
            let (i1, i2) = self.split(c);
            if a.tables.iter().any(|&(t1, _)| t1 == i1) {
                continue;
            }
            let t = st.l1[i1 as usize];
            self.file
                .write_at(t + i2 * 8, &host.to_be_bytes())
                .map_err(|e| self.io(e, "Could not write an L2 table"))?;
            self.l2(st, t)?[i2 as usize] = host;
        }
        Ok(())
    }

    fn release(&self, st: &mut State, a: &Alloc) {
        for (c, _) in &a.clusters {
            st.busy.remove(c);
        }
        for (i1, _) in &a.tables {
            st.busy_l1.remove(i1);
        }
    }

    /// Make writes durable.
    pub fn flush(&self) -> FResult<()> {
        self.file.flush().map_err(|e| self.io(e, "flush"))
    }
}

impl GuestMap for Qcow {
    type Alloc = Alloc;

    fn map_read(&self, off: u64, len: u64) -> FResult<Vec<Piece>> {
        self.check_range(off, len)?;
        let mut st = self.lock();
        let cs = self.h.cluster_size();
        let mut out = Vec::new();
        for (c, inc, n) in self.chunks(off, len) {
            let run = match self.entry(&mut st, c)? {
                0 => Run::Backing,
                e if e & COMPRESSED != 0 => Run::Encoded(e),
                e => Run::Data(e + inc),
            };
            if let Run::Encoded(_) = run {
                // One record per cluster: runs of it never merge.
                out.push(Piece {
                    offset: c * cs + inc,
                    len: n,
                    run,
                });
            } else {
                push_run(&mut out, c * cs + inc, n, run);
            }
        }
        Ok(out)
    }

    fn map_write(&self, off: u64, len: u64) -> FResult<WriteMap> {
        self.check_range(off, len)?;
        self.writable()?;
        let mut st = self.lock();
        let cs = self.h.cluster_size();
        let mut runs = Vec::new();
        for (c, inc, n) in self.chunks(off, len) {
            if self.busy(&st, c) {
                return Ok(WriteMap::Busy);
            }
            match self.entry(&mut st, c)? {
                e if e != 0 && e & COMPRESSED == 0 => runs.push((c * cs + inc, e + inc, n)),
                _ => return Ok(WriteMap::Allocate),
            }
        }
        Ok(WriteMap::InPlace(runs))
    }

    /// Allocating writes of whole clusters without a backing file go
    /// asynchronously; the rest (partial clusters over a backing file,
    /// compressed clusters) run the synchronous merge.
    fn plan_alloc(&self, off: u64, len: u64) -> FResult<Plan<Alloc>> {
        self.check_range(off, len)?;
        self.writable()?;
        let mut st = self.lock();
        let cs = self.h.cluster_size();
        let chunks: Vec<_> = self.chunks(off, len).collect();
        if chunks.iter().any(|&(c, _, _)| self.busy(&st, c)) {
            return Ok(Plan::Busy);
        }
        for &(c, inc, n) in &chunks {
            let e = self.entry(&mut st, c)?;
            let partial = inc > 0 || (inc + n < cs && c * cs + inc + n < self.h.size);
            if e & COMPRESSED != 0 || (e == 0 && partial && self.backing.is_some()) {
                return Ok(Plan::Sync);
            }
        }
        let (mut writes, mut alloc) = (Vec::new(), Alloc::default());
        for &(c, inc, n) in &chunks {
            let e = self.entry(&mut st, c)?;
            if e != 0 {
                writes.push((c * cs + inc, e + inc, n));
                continue;
            }
            let a = self.allocate(&mut st, c, None);
            writes.push((c * cs + inc, a.clusters[0].1 + inc, n));
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

    fn read_encoded(&self, at: u64, offset: u64, buf: &mut [u8]) -> FResult<()> {
        let cs = self.h.cluster_size();
        let mut st = self.lock();
        let whole = self.inflate(&mut st, at)?;
        let o = (offset % cs) as usize;
        let b = whole.get(o..o + buf.len()).ok_or_else(|| {
            FormatError::Corrupt(format!(
                "{}: a read outside a compressed cluster",
                self.name
            ))
        })?;
        buf.copy_from_slice(b);
        Ok(())
    }
}

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub size: u64,
    pub backing_file: Option<String>,
}

/// Lay a new image out on `file` as qemu-img does: 4 KiB clusters and
/// L2 tables without a backing file, 512-byte clusters and 32 KiB L2
/// tables with one; the L1 table right after the header and the backing
/// file name, in whole sectors.
pub fn create(file: &dyn Storage, o: &CreateOptions) -> FResult<()> {
    let (cluster_bits, l2_bits) = if o.backing_file.is_some() {
        (9, 12)
    } else {
        (12, 9)
    };
    let blen = o.backing_file.as_ref().map_or(0, |b| b.len());
    if blen > 1023 {
        return Err(FormatError::Invalid("Backing file name too long".into()));
    }
    let header_size = ((HEADER_BYTES + blen) as u64).div_ceil(8) * 8;
    let h = Header {
        backing_offset: if blen > 0 { HEADER_BYTES as u64 } else { 0 },
        backing_size: blen as u32,
        mtime: 0,
        size: o.size,
        cluster_bits,
        l2_bits,
        crypt_method: 0,
        l1_offset: header_size,
    };
    let l1_bytes = (h.l1_entries() * 8).div_ceil(SECTOR) * SECTOR;
    let io = |e| FormatError::io(e, "creating the image".to_string());
    file.set_len(0).map_err(io)?;
    let mut b = vec![0u8; (header_size + l1_bytes) as usize];
    b[..HEADER_BYTES].copy_from_slice(&h.serialize());
    if let Some(n) = &o.backing_file {
        b[HEADER_BYTES..HEADER_BYTES + blen].copy_from_slice(n.as_bytes());
    }
    file.write_at(0, &b).map_err(io)?;
    file.flush().map_err(io)
}

/// The hostile-image harness behind the `qcow_open` fuzz target.
pub fn fuzz_open(data: &[u8]) {
    const NAME: &str = "hostile.qcow";
    let limit = (data.len() as u64).max(1 << 20) * 4 + (8 << 20);
    for ro in [true, false] {
        let f = Arc::new(crate::storage::MemStorage::new(data.to_vec(), limit));
        let Some(img) =
            crate::error::named(NAME, Qcow::open(NAME, f.clone(), None, ro, Some(b"key")))
        else {
            continue;
        };
        let window = img.size().min(1 << 20);
        let mut buf = vec![0u8; window as usize];
        crate::error::named(NAME, img.read(0, &mut buf));
        if !ro && img.size() >= 512 {
            let n = img.size().min(5000) as usize;
            crate::error::named(NAME, img.write(0, &vec![0x5a; n]));
            crate::error::named(NAME, img.write(img.size() - 512, &[1u8; 512]));
            let cn = img.cluster_size().min(img.size()).min(1 << 20) as usize;
            crate::error::named(NAME, img.write_compressed(0, &vec![0x33; cn]));
            crate::error::named(NAME, img.read(0, &mut buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn create_write_read_and_reopen() {
        let f = Arc::new(MemStorage::new(Vec::new(), 64 << 20));
        create(
            &*f,
            &CreateOptions {
                size: 64 << 20,
                backing_file: None,
            },
        )
        .unwrap();
        assert_eq!(f.len().unwrap(), 560, "qemu-img's layout");
        let img = Qcow::open("t", f.clone(), None, false, None).unwrap();
        img.write(4096 * 700 + 5, &[3u8; 10000]).unwrap();
        let mut b = vec![0u8; 10000];
        img.read(4096 * 700 + 5, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 3));
        let again = Qcow::open("t", f, None, true, None).unwrap();
        let mut b = vec![1u8; 4096];
        again.read(4096 * 700, &mut b).unwrap();
        assert!(b[..5].iter().all(|&x| x == 0) && b[5..].iter().all(|&x| x == 3));
    }

    #[test]
    fn aes_sectors_round_trip_with_the_key() {
        let f = Arc::new(MemStorage::new(Vec::new(), 64 << 20));
        create(
            &*f,
            &CreateOptions {
                size: 1 << 20,
                backing_file: None,
            },
        )
        .unwrap();
        let mut h = [0u8; 48];
        f.read_at(0, &mut h).unwrap();
        h[36..40].copy_from_slice(&1u32.to_be_bytes());
        f.write_at(0, &h).unwrap();
        let locked = Qcow::open("t", f.clone(), None, false, None).unwrap();
        assert!(locked.read(0, &mut [0u8; 512]).is_err());
        let img = Qcow::open("t", f.clone(), None, false, Some(b"pass")).unwrap();
        img.write(8192, &[9u8; 1024]).unwrap();
        let mut b = vec![0u8; 1024];
        img.read(8192, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 9));
        let wrong = Qcow::open("t", f, None, true, Some(b"nope")).unwrap();
        wrong.read(8192, &mut b).unwrap();
        assert!(
            !b.iter().all(|&x| x == 9),
            "a wrong key reads garbage, as in QEMU"
        );
    }
}
