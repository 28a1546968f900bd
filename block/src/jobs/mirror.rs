//! `drive-mirror` / `blockdev-mirror`, and `block-commit` of the active
//! layer, which is a mirror into the base (QEMU's `block/mirror.c`
//! behaviour, QAPI `DriveMirror`/`BlockdevMirror`).
//!
//! The job puts a private dirty bitmap on the source before anything
//! else, marks what the sync mode copies (`full`: everything that does not
//! read as zeroes; `top`: what the top layer holds; `none`: nothing), and
//! copies dirty granules until none is left: it is then ready
//! (BLOCK_JOB_READY) and keeps copying what the guest writes. A write that
//! races with a copy dirties the granule again after the copy cleared it,
//! so it is copied once more. `block-job-complete` drains the device,
//! copies what is still dirty and makes the target the device's root (the
//! pivot); a cancel of a ready job without `force` does the same final
//! copy without the pivot, leaving the target a point-in-time copy.

use super::copy::{self, MAX_CHUNK};
use super::{Ctl, Failure, JobDriver};
use crate::backend::BlockBackend;
use crate::bitmap::DirtyBitmap;
use crate::driver::Perms;
use crate::node::{Node, PermHandle};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `sync=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sync {
    Full,
    Top,
    None,
}

impl Sync {
    /// QAPI's spelling (`MirrorSyncMode`; backup's extra modes are
    /// parsed by backup).
    pub fn parse(s: &str) -> Option<Sync> {
        match s {
            "full" => Some(Sync::Full),
            "top" => Some(Sync::Top),
            "none" => Some(Sync::None),
            _ => None,
        }
    }
}

/// A mirror job.
pub struct Mirror {
    backend: Arc<BlockBackend>,
    source: Arc<Node>,
    target: Arc<Node>,
    sync: Sync,
    /// Active commit: the target is the source's base; what lies above it
    /// is copied and then dropped from the chain.
    commit_base: bool,
    /// The target reads as zeroes where nothing was written (a new image).
    target_zeroed: bool,
    buf_size: u64,
    bitmap: Arc<DirtyBitmap>,
    perm: Mutex<Option<PermHandle>>,
}

/// What a mirror is asked to do.
pub struct MirrorSpec {
    pub backend: Arc<BlockBackend>,
    pub target: Arc<Node>,
    pub sync: Sync,
    pub commit_base: bool,
    pub target_zeroed: bool,
    /// Bytes per bitmap bit (power of two, 512 B to 64 MiB).
    pub granularity: u64,
    /// Bytes copied at once (at least one granule).
    pub buf_size: u64,
}

impl Mirror {
    /// Set up a mirror from `spec.backend`'s root: checks sizes, takes the
    /// job's permissions on the target and starts recording writes.
    pub fn new(job_id: &str, spec: MirrorSpec) -> Result<Mirror, crate::error::BlockError> {
        use crate::error::BlockError;
        let source = spec
            .backend
            .root()
            .ok_or_else(|| BlockError::NoMedium(format!("Block device '{}'", spec.backend.id())))?;
        if !spec.commit_base && spec.target.len() != source.len() {
            return Err(BlockError::Invalid(format!(
                "Source and target image have different sizes ({} and {} bytes)",
                source.len(),
                spec.target.len()
            )));
        }
        if spec.granularity > 64 << 20 {
            return Err(BlockError::Invalid(
                "Parameter 'granularity' expects a value in range [512B, 64MB]".into(),
            ));
        }
        if spec.commit_base {
            spec.target.reopen(false)?;
        }
        let perm = spec.target.attach_job(
            &format!("block job '{job_id}'"),
            Perms::WRITE.union(Perms::RESIZE),
            Perms::CONSISTENT_READ.union(Perms::WRITE_UNCHANGED),
        )?;
        let bitmap = Arc::new(DirtyBitmap::new(
            &format!("#job-{job_id}"),
            source.len(),
            spec.granularity,
            false,
        )?);
        source.add_bitmap(bitmap.clone())?;
        Ok(Mirror {
            backend: spec.backend,
            source,
            target: spec.target,
            sync: spec.sync,
            commit_base: spec.commit_base,
            target_zeroed: spec.target_zeroed,
            buf_size: spec.buf_size.max(spec.granularity).min(64 << 20),
            bitmap,
            perm: Mutex::new(Some(perm)),
        })
    }

    /// Copy one dirty run starting at or after `cursor`; returns the next
    /// cursor, or None when nothing is dirty.
    fn step(&self, ctl: &Ctl, cursor: u64, buf: &mut [u8]) -> Result<Option<u64>, Failure> {
        let found = self
            .bitmap
            .next_dirty(cursor, self.buf_size)
            .or_else(|| self.bitmap.next_dirty(0, self.buf_size));
        let Some((off, len)) = found else {
            return Ok(None);
        };
        self.bitmap.clear_range(off, len);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_CHUNK);
            let ok = copy::copy_range(
                ctl,
                &self.source,
                &self.target,
                off + done,
                n,
                buf,
                self.target_zeroed,
            )?;
            if !ok {
                // Ignored errors leave the range dirty, to try later.
                self.bitmap.set_range(off + done, n);
            }
            ctl.advance(n);
            ctl.throttle(n)?;
            done += n;
        }
        // QEMU's estimate: what is done plus what is dirty now.
        ctl.set_len(ctl.offset() + self.bitmap.count());
        Ok(Some(off + len))
    }

    /// Copy everything still dirty (inside a drained section: nothing new
    /// comes in).
    fn flush_dirty(&self, ctl: &Ctl, buf: &mut [u8]) -> Result<(), Failure> {
        let mut cursor = 0;
        while let Some(next) = self.step(ctl, cursor, buf)? {
            cursor = next;
        }
        self.target.flush()?;
        Ok(())
    }
}

impl JobDriver for Mirror {
    fn run(&self, ctl: &Ctl) -> Result<(), Failure> {
        let len = self.source.len();
        let base = if self.commit_base {
            Some(&self.target)
        } else {
            None
        };
        match (self.sync, self.commit_base) {
            (_, true) => copy::mark_allocated(Some(ctl), &self.bitmap, &self.source, base, len)?,
            (Sync::Full, _) if self.target_zeroed => {
                copy::mark_data(Some(ctl), &self.bitmap, &self.source, len)?
            }
            (Sync::Full, _) => self.bitmap.set_all(),
            (Sync::Top, _) => {
                let below = self.source.child("backing");
                copy::mark_allocated(Some(ctl), &self.bitmap, &self.source, below.as_ref(), len)?
            }
            (Sync::None, _) => {}
        }
        ctl.set_len(self.bitmap.count());
        let mut buf = vec![0u8; MAX_CHUNK.min(self.buf_size) as usize];
        let mut cursor = 0;
        loop {
            ctl.check()?;
            if ctl.should_finish() {
                return Ok(());
            }
            match self.step(ctl, cursor, &mut buf)? {
                Some(next) => cursor = next,
                None => {
                    ctl.set_ready();
                    ctl.nap(Duration::from_millis(20));
                }
            }
        }
    }

    fn commit(&self, ctl: &Ctl) -> Result<(), Failure> {
        let pivot = ctl.completing();
        let mut buf = vec![0u8; MAX_CHUNK.min(self.buf_size) as usize];
        self.backend.drained(|| -> Result<(), Failure> {
            self.flush_dirty(ctl, &mut buf)?;
            if !pivot {
                return Ok(());
            }
            // The device takes the target's write permission from the job.
            self.perm.lock().unwrap_or_else(|e| e.into_inner()).take();
            self.source.remove_bitmap(self.bitmap.name());
            self.backend.replace_root(self.target.clone())?;
            Ok(())
        })
    }

    fn abort(&self) {
        if self.commit_base {
            // The base goes back to being a read-only backing image.
            self.perm.lock().unwrap_or_else(|e| e.into_inner()).take();
            let _ = self.target.flush();
            let _ = self.target.reopen(true);
        }
    }

    fn clean(&self) {
        self.source.remove_bitmap(self.bitmap.name());
        self.perm.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}
