//! The disk the guest sees: the synthesized image under the guest's own
//! writes. A sector the guest wrote comes from the overlay; any other
//! from the in-memory metadata (MBR, boot sector, FAT, directories) or,
//! for file data, from the host file, read when asked (one file kept
//! open, as QEMU's `current_fd`).
//!
//! Spec: fatgen103, "Boot Sector and BPB" (the region order: reserved
//! sectors, the FATs, the fixed root directory, the data clusters).

use super::fat::ClusterSet;
use super::image::{Base, Src};
use super::overlay::Overlay;
use super::SECTOR;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// The synthesized disk with the guest's writes.
#[derive(Debug)]
pub struct Volume {
    /// The image as synthesized (or as of the last write-back).
    pub base: Base,
    /// The exported directory, as opened.
    pub dir: PathBuf,
    /// Its canonical path (what write-back checks paths against).
    pub root_canon: PathBuf,
    /// The guest's writes (`None`: read-only).
    pub overlay: Option<Overlay>,
    /// Clusters that hold directories: a write there (or to the FATs or
    /// the fixed root) may finish a change worth writing back.
    pub dir_clusters: ClusterSet,
    /// The host file last read: its node and the open file (`None` when
    /// it could not be opened: it reads as zeroes).
    file: Option<(u32, Option<File>)>,
    /// Write guest writes to host files' data straight into the files
    /// (`rw`): see [`Volume::write`].
    pub write_through: bool,
    /// The host file last written through, and its node.
    wfile: Option<(u32, File)>,
    /// Host files written through since the last [`Volume::take_written`].
    written: Vec<PathBuf>,
}

impl Volume {
    /// The disk of `base`, exported from `dir`; `writable` gives it an
    /// overlay for the guest's writes.
    pub fn new(
        base: Base,
        dir: PathBuf,
        root_canon: PathBuf,
        writable: bool,
    ) -> io::Result<Volume> {
        let g = base.geo;
        let overlay = if writable {
            Some(Overlay::new(u64::from(g.total_sectors))?)
        } else {
            None
        };
        let mut dir_clusters = ClusterSet::new(g.last_cluster() + 1);
        for (i, s) in base.src.iter().enumerate() {
            if matches!(s, Src::Dir { .. }) {
                dir_clusters.insert(i as u32 + 2);
            }
        }
        Ok(Volume {
            base,
            dir,
            root_canon,
            overlay,
            dir_clusters,
            file: None,
            write_through: false,
            wfile: None,
            written: Vec::new(),
        })
    }

    /// The disk's size in bytes.
    pub fn disk_bytes(&self) -> u64 {
        self.base.geo.disk_bytes()
    }

    /// Forget the open host file (node numbers change at write-back).
    pub fn drop_file(&mut self) {
        self.file = None;
        self.wfile = None;
    }

    /// The host files written through since the last call (for a flush
    /// to sync).
    pub fn take_written(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.written)
    }

    /// The first sector after the piece (region, or data cluster) that
    /// sector `s` lies in.
    fn piece_end(&self, s: u64) -> u64 {
        let g = &self.base.geo;
        let spf = u64::from(g.spf);
        let data_end = g.data_start() + u64::from(g.clusters) * u64::from(g.spc);
        if s < g.fat_start() {
            g.fat_start()
        } else if s < g.fat_start() + spf {
            g.fat_start() + spf
        } else if s < g.root_start() {
            g.root_start()
        } else if s < g.data_start() {
            g.data_start()
        } else if s < data_end {
            let spc = u64::from(g.spc);
            g.data_start() + ((s - g.data_start()) / spc + 1) * spc
        } else {
            u64::from(g.total_sectors)
        }
    }

    /// Read `buf.len()` bytes at byte `offset` (anywhere; bytes past the
    /// end read as zeroes).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset.is_multiple_of(SECTOR) && (buf.len() as u64).is_multiple_of(SECTOR) {
            return self.read_sectors(offset / SECTOR, buf);
        }
        let first = offset / SECTOR;
        let end = (offset + buf.len() as u64).div_ceil(SECTOR);
        let mut tmp = vec![0u8; ((end - first) * SECTOR) as usize];
        self.read_sectors(first, &mut tmp)?;
        let skip = (offset - first * SECTOR) as usize;
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }

    /// Read whole sectors from sector `s` into `buf`.
    pub fn read_sectors(&mut self, s: u64, buf: &mut [u8]) -> io::Result<()> {
        let n = buf.len() as u64 / SECTOR;
        let total = u64::from(self.base.geo.total_sectors);
        let mut k = 0;
        while k < n {
            let cur = s + k;
            let out = &mut buf[(k * SECTOR) as usize..];
            if cur >= total {
                out.fill(0);
                return Ok(());
            }
            let piece = self.piece_end(cur).min(s + n) - cur;
            let (present, len) = match &self.overlay {
                Some(o) => (o.contains(cur), o.run(cur, piece)),
                None => (false, piece),
            };
            let bytes = (len * SECTOR) as usize;
            if present {
                if let Some(o) = &self.overlay {
                    o.read(cur, &mut out[..bytes])?;
                }
            } else {
                self.read_base(cur, &mut out[..bytes])?;
            }
            k += len;
        }
        Ok(())
    }

    /// Read sectors from `s` as synthesized (all within one piece).
    pub fn read_base(&mut self, s: u64, buf: &mut [u8]) -> io::Result<()> {
        let g = self.base.geo;
        let copy = |src: &[u8], at: u64, buf: &mut [u8]| {
            let at = (at * SECTOR) as usize;
            let n = src.len().saturating_sub(at).min(buf.len());
            buf[..n].copy_from_slice(&src[at..at + n]);
            buf[n..].fill(0);
        };
        if s < g.fat_start() {
            copy(&self.base.head, s, buf);
        } else if s < g.root_start() {
            copy(&self.base.fat, (s - g.fat_start()) % u64::from(g.spf), buf);
        } else if s < g.data_start() {
            copy(&self.base.root, s - g.root_start(), buf);
        } else {
            let rel = s - g.data_start();
            let spc = u64::from(g.spc);
            let c = rel / spc + 2;
            let within = rel % spc;
            match self.base.src(u32::try_from(c).unwrap_or(0)) {
                Src::Zero => buf.fill(0),
                Src::Dir { dir, idx } => match self.base.dirs.get(dir as usize) {
                    Some(d) => copy(d, u64::from(idx) * spc + within, buf),
                    None => buf.fill(0),
                },
                Src::File { node, idx } => {
                    let at = u64::from(idx) * g.cluster_bytes() + within * SECTOR;
                    self.read_host(node, at, buf)?;
                }
            }
        }
        Ok(())
    }

    /// Read node `node`'s host file at `at`; what lies past its end (or
    /// a file that is gone) reads as zeroes, as in QEMU.
    fn read_host(&mut self, node: u32, at: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.file.as_ref().map(|(n, _)| *n) != Some(node) {
            let path = self.dir.join(self.base.rel_path(node));
            self.file = Some((node, File::open(path).ok()));
        }
        let Some((_, Some(f))) = &self.file else {
            buf.fill(0);
            return Ok(());
        };
        let mut got = 0;
        while got < buf.len() {
            match f.read_at(&mut buf[got..], at + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf[got..].fill(0);
        Ok(())
    }

    /// Write `data` at byte `offset` (a partial sector is merged with what
    /// the guest sees there). Returns whether the write touched the FATs,
    /// the root or a directory.
    ///
    /// Where a sector is data of a host file, inside the file's size, and
    /// the guest has not written it before, the write goes straight into
    /// the host file (with `write_through`, `rw`): the image says that
    /// sector's bytes come from there, so it stays true, and rewriting a
    /// file needs no write-back. If the guest has meanwhile given the
    /// cluster to another file (a change not yet consistent), write-back
    /// later copies it from there before the old file is changed. Any
    /// other sector goes into the overlay.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<bool> {
        if self.overlay.is_none() {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.disk_bytes())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let first = offset / SECTOR;
        let last = end.div_ceil(SECTOR);
        if offset.is_multiple_of(SECTOR) && end.is_multiple_of(SECTOR) {
            self.store(first, data)?;
        } else {
            let mut tmp = vec![0u8; ((last - first) * SECTOR) as usize];
            self.read_sectors(first, &mut tmp)?;
            let skip = (offset - first * SECTOR) as usize;
            tmp[skip..skip + data.len()].copy_from_slice(data);
            self.store(first, &tmp)?;
        }
        Ok(self.touches_metadata(first, last))
    }

    /// Whole sectors of a guest write: runs written through to one host
    /// file in one call, the rest (or what the host refuses) into the
    /// overlay.
    fn store(&mut self, s: u64, data: &[u8]) -> io::Result<()> {
        let n = data.len() as u64 / SECTOR;
        let mut k = 0;
        while k < n {
            let target = self.through_target(s + k);
            let mut len = 1;
            while k + len < n {
                let same = match (target, self.through_target(s + k + len)) {
                    (None, None) => true,
                    (Some((a, off)), Some((b, off2))) => a == b && off2 == off + len * SECTOR,
                    _ => false,
                };
                if !same {
                    break;
                }
                len += 1;
            }
            let bytes = &data[(k * SECTOR) as usize..((k + len) * SECTOR) as usize];
            let through = match target {
                Some((node, off)) => self.write_host(node, off, bytes).is_ok(),
                None => false,
            };
            if !through {
                self.write_sectors(s + k, bytes)?;
            }
            k += len;
        }
        Ok(())
    }

    /// The host file (node) and offset a guest write of sector `s` goes
    /// to, if it is written through.
    fn through_target(&self, s: u64) -> Option<(u32, u64)> {
        if !self.write_through || self.overlay.as_ref().is_none_or(|o| o.contains(s)) {
            return None;
        }
        let g = &self.base.geo;
        let rel = s.checked_sub(g.data_start())?;
        let spc = u64::from(g.spc);
        let c = u32::try_from(rel / spc + 2).ok()?;
        if c > g.last_cluster() {
            return None;
        }
        match self.base.src(c) {
            Src::File { node, idx } => {
                let off = u64::from(idx) * g.cluster_bytes() + rel % spc * SECTOR;
                let size = self.base.nodes.get(node as usize)?.size;
                (off + SECTOR <= size).then_some((node, off))
            }
            _ => None,
        }
    }

    /// Write `data` into node `node`'s host file at `off`; the file is
    /// opened (once) only if its canonical path lies inside the exported
    /// directory.
    fn write_host(&mut self, node: u32, off: u64, data: &[u8]) -> io::Result<()> {
        if self.wfile.as_ref().map(|(n, _)| *n) != Some(node) {
            self.wfile = None;
            let path = self.dir.join(self.base.rel_path(node));
            let inside =
                std::fs::canonicalize(&path).is_ok_and(|c| c.starts_with(&self.root_canon));
            if !inside {
                return Err(io::Error::from_raw_os_error(libc::EXDEV));
            }
            let f = std::fs::OpenOptions::new().write(true).open(&path)?;
            if !f.metadata()?.is_file() {
                return Err(io::Error::from_raw_os_error(libc::EISDIR));
            }
            if !self.written.contains(&path) {
                self.written.push(path);
            }
            self.wfile = Some((node, f));
        }
        match &self.wfile {
            Some((_, f)) => f.write_all_at(data, off),
            None => Err(io::Error::from_raw_os_error(libc::EBADF)),
        }
    }

    /// Store whole sectors in the overlay (never written through).
    pub fn write_sectors(&mut self, s: u64, data: &[u8]) -> io::Result<()> {
        match &mut self.overlay {
            Some(o) => o.write(s, data),
            None => Err(io::Error::from_raw_os_error(libc::EROFS)),
        }
    }

    /// Whether sectors `first..last` hold FAT, fixed root or directory
    /// sectors.
    fn touches_metadata(&self, first: u64, last: u64) -> bool {
        let g = &self.base.geo;
        if first < g.data_start() && last > g.fat_start() {
            return true;
        }
        let spc = u64::from(g.spc);
        let from = first.max(g.data_start());
        if from >= last {
            return false;
        }
        let c0 = (from - g.data_start()) / spc + 2;
        let c1 = (last - 1 - g.data_start()) / spc + 2;
        (c0..=c1).any(|c| u32::try_from(c).is_ok_and(|c| self.dir_clusters.contains(c)))
    }

    /// Whether the bytes from `offset` read as zeroes the guest did not
    /// write (free clusters, the sectors after the last cluster), and for
    /// how many bytes (at most `len`) that answer holds: block status, so
    /// that a convert skips the empty part of the disk.
    pub fn zero_run(&self, offset: u64, len: u64) -> (bool, u64) {
        let end = offset.saturating_add(len).min(self.disk_bytes());
        if offset >= end {
            return (false, len);
        }
        let first = self.piece_zero(offset / SECTOR);
        let mut pos = offset;
        while pos < end {
            let s = pos / SECTOR;
            if self.piece_zero(s) != first {
                break;
            }
            pos = (self.piece_end(s) * SECTOR).min(end);
        }
        (first, pos - offset)
    }

    /// Whether the piece holding sector `s` is unwritten zeroes.
    fn piece_zero(&self, s: u64) -> bool {
        let g = &self.base.geo;
        if s < g.data_start() {
            return false;
        }
        let spc = u64::from(g.spc);
        let c = (s - g.data_start()) / spc + 2;
        // The whole piece: the cluster, or the tail after the last one.
        let (start, end) = if c > u64::from(g.last_cluster()) {
            (
                g.data_start() + u64::from(g.clusters) * spc,
                u64::from(g.total_sectors),
            )
        } else {
            let first = g.data_start() + (c - 2) * spc;
            (first, first + spc)
        };
        let written = self
            .overlay
            .as_ref()
            .is_some_and(|o| o.any(start, end - start));
        if written {
            return false;
        }
        c > u64::from(g.last_cluster()) || self.base.src(c as u32) == Src::Zero
    }

    /// Sectors of data cluster `c`: (first sector, count).
    pub fn cluster_sectors(&self, c: u32) -> (u64, u64) {
        let g = &self.base.geo;
        (g.cluster_sector(c), u64::from(g.spc))
    }
}
