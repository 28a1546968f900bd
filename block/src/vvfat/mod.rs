//! The `vvfat` protocol (QEMU's `block/vvfat.c`): a host directory seen
//! by the guest as a FAT disk or floppy. `-hda fat:/dir`, `-drive
//! file=fat:rw:/dir,format=raw`, `-fda fat:floppy:/dir`, `-blockdev
//! driver=vvfat,dir=/dir,fat-type=16,floppy=off,label=NAME,rw=on`.
//!
//! At open the directory is walked ([`build`]) and a FAT12, FAT16 or
//! FAT32 image synthesized: an MBR with one partition (disks), the boot
//! sector, two FATs, the directories with long names, all in memory
//! (bounded by the disk's size and [`build::MAX_NODES`]); file contents
//! are read from the host files only when the guest reads them. Sizes and
//! layout are QEMU's ([`geometry`]), except where QEMU's is not the FAT
//! it claims to be (a FAT16 floppy, FAT32).
//!
//! Writes: a writable node keeps every guest write in an overlay
//! ([`overlay`]: a sparse temporary file), so the guest always reads back
//! what it wrote. Without `rw` that is all: the changes last as long as
//! the node (as with `snapshot=on`; QEMU instead refuses a writable
//! non-`rw` node). With `rw=on` they are written back to the directory:
//!
//! **The consistency rule.** After every write that touches the FATs, the
//! fixed root directory or a directory cluster, at every flush and at
//! close, the guest's FAT and directories are parsed ([`parse`]). Only if
//! they are consistent (every file's chain exactly as long as its size
//! needs, no cluster in two chains or in a loop, no cluster in use
//! outside a chain, valid and unique names, bounded sizes) is the
//! difference from the last consistent state applied to the host
//! ([`commit`]): new, changed, truncated and grown files, deletions,
//! renames and moves, new and removed directories. A half-done change
//! (a file whose size is written but not its chain, a rename with the old
//! or new entry still missing) is inconsistent, so nothing of it reaches
//! the host until the guest finishes it; a flush, where a guest promises
//! its writes are complete, then finds it consistent. The guest writing
//! garbage only stops write-back: nothing it writes can name a path
//! outside the directory (names are checked, directories are checked by
//! canonical path, new files are created with O_EXCL), and the parser
//! bounds its work and memory by the disk's size.
//!
//! Host errors during write-back (a name taken by a file the image left
//! out, a read-only file) are logged one line each; the guest's data for
//! such a file stays in the overlay and is tried again at the next
//! write-back. Changes made to the directory on the host while the image
//! is open are not seen by the guest (as in QEMU).

mod build;
pub mod commit;
pub mod dirent;
pub mod fat;
pub mod fuzz;
pub mod geometry;
pub mod image;
pub mod names;
pub mod options;
pub mod overlay;
pub mod parse;
pub mod volume;

#[cfg(test)]
mod tests;

use crate::driver::{BlockDriver, Extent};
use crate::error::{BlockError, BlockResult};
use crate::graph::OpenCtx;
use geometry::Geometry;
use options::Config;
use std::io::{IoSlice, IoSliceMut};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use volume::Volume;

/// Bytes per sector.
pub const SECTOR: u64 = 512;

/// A vvfat node.
#[derive(Debug)]
pub struct VvfatNode {
    vol: Mutex<Volume>,
    cfg: Config,
    len: u64,
    writable: bool,
}

/// Build the volume of `cfg`: the image of its directory, writable or
/// not. Errors are one line naming the directory.
pub fn open_volume(cfg: &Config, writable: bool) -> Result<(Volume, Vec<String>), String> {
    let geo = Geometry::new(cfg.fat_type, cfg.floppy).map_err(|e| format!("{}: {e}", cfg.dir))?;
    let dir = PathBuf::from(&cfg.dir);
    let canon = build::canonical_root(&dir, &cfg.dir)?;
    let (base, warnings) = build::build(&dir, &cfg.dir, &canon, geo, &cfg.label_bytes())?;
    let mut vol = Volume::new(base, dir, canon, writable)
        .map_err(|e| format!("{}: cannot make the write overlay: {e}", cfg.dir))?;
    vol.write_through = writable && cfg.rw;
    Ok((vol, warnings))
}

impl VvfatNode {
    /// Open from `-blockdev driver=vvfat` options (or a `fat:` name).
    pub fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        let cfg = Config::from_ctx(ctx)?;
        let writable = !ctx.common.read_only;
        if cfg.rw && !writable {
            return Err(BlockError::Open(format!(
                "{}: Unable to set VVFAT to 'rw' when drive is read-only",
                cfg.dir
            )));
        }
        if cfg.fat_type == Some(geometry::FatType::Fat32) && !cfg.floppy {
            log::debug!("vvfat {}: FAT32 with 4 KiB clusters", cfg.dir);
        }
        let (vol, warnings) = open_volume(&cfg, writable).map_err(BlockError::Open)?;
        for w in warnings {
            ctx.graph.warn(format!("vvfat: {w}"));
        }
        ctx.describe("dir", cfg.dir.clone());
        ctx.describe("fat-type", cfg.fat_type_given.to_string());
        ctx.describe("floppy", cfg.floppy.to_string());
        ctx.describe("rw", cfg.rw.to_string());
        if let Some(l) = &cfg.label {
            ctx.describe("label", l.clone());
        }
        let len = vol.disk_bytes();
        Ok(Arc::new(VvfatNode {
            vol: Mutex::new(vol),
            cfg,
            len,
            writable,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Volume> {
        self.vol.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn io_error(&self, what: &str, e: std::io::Error) -> BlockError {
        BlockError::Io {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            context: format!("vvfat {}: {what}", self.cfg.dir),
        }
    }

    /// Write the guest's changes back if they are consistent; `why` says
    /// when, for the log. Returns the files written.
    fn write_back(&self, vol: &mut Volume, why: &str) -> Vec<PathBuf> {
        if !self.cfg.rw {
            return Vec::new();
        }
        match try_commit(vol) {
            Ok(rep) => {
                for e in &rep.errors {
                    log::warn!("vvfat {}: {e}", self.cfg.dir);
                }
                rep.written
            }
            Err(why_not) => {
                log::debug!(
                    "vvfat {}: not written back at {why}: {why_not}",
                    self.cfg.dir
                );
                if why == "close" {
                    log::warn!(
                        "vvfat {}: the guest's last changes were never consistent and are not written back ({why_not})",
                        self.cfg.dir
                    );
                }
                Vec::new()
            }
        }
    }
}

/// Parse the guest's view of `vol` and, when consistent, write it back.
pub fn try_commit(vol: &mut Volume) -> Result<commit::Report, String> {
    let geo = vol.base.geo;
    let tree = parse::parse(&geo, &mut |s, buf| vol.read_sectors(s, buf))?;
    Ok(commit::commit(vol, &tree))
}

impl BlockDriver for VvfatNode {
    fn driver_name(&self) -> &'static str {
        "vvfat"
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        let total: u64 = iov.iter().map(|s| s.len() as u64).sum();
        crate::driver::check_range(&self.cfg.dir, offset, total, self.len)?;
        let mut vol = self.lock();
        let mut at = offset;
        for s in iov.iter_mut() {
            vol.read(at, s).map_err(|e| self.io_error("read", e))?;
            at += s.len() as u64;
        }
        Ok(())
    }
    fn write_vectored(&self, offset: u64, iov: &[IoSlice<'_>], _fua: bool) -> BlockResult<()> {
        if !self.writable {
            return Err(BlockError::ReadOnly(format!("vvfat {}", self.cfg.dir)));
        }
        let total: u64 = iov.iter().map(|s| s.len() as u64).sum();
        crate::driver::check_range(&self.cfg.dir, offset, total, self.len)?;
        let mut vol = self.lock();
        let mut at = offset;
        let mut meta = false;
        for s in iov {
            meta |= vol.write(at, s).map_err(|e| self.io_error("write", e))?;
            at += s.len() as u64;
        }
        if meta {
            self.write_back(&mut vol, "a write");
        }
        Ok(())
    }
    fn flush(&self) -> BlockResult<()> {
        if !self.writable {
            return Ok(());
        }
        let mut vol = self.lock();
        let mut written = self.write_back(&mut vol, "flush");
        written.extend(vol.take_written());
        drop(vol);
        for e in commit::sync_files(&written) {
            log::warn!("vvfat {}: {e}", self.cfg.dir);
        }
        Ok(())
    }
    fn close(&self) -> BlockResult<()> {
        if self.writable {
            let mut vol = self.lock();
            self.write_back(&mut vol, "close");
        }
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        let vol = self.lock();
        let (zero, run) = vol.zero_run(offset, len);
        Ok(Extent {
            len: run.max(1).min(len.max(1)),
            data: !zero,
            zero,
            offset: None,
            allocated: true,
            compressed: false,
        })
    }
    fn filename(&self) -> Option<String> {
        Some(self.cfg.json_name())
    }
}
