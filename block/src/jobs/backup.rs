//! `drive-backup` / `blockdev-backup`: a point-in-time copy of a running
//! disk (QEMU's `block/backup.c` with its copy-before-write filter, QAPI
//! `BackupCommon`).
//!
//! The job works from a private copy bitmap of what is still to be
//! copied (`full`: everything that does not read as zeroes, or everything
//! for a target that is not new; `top`: what the top layer holds;
//! `incremental`/`bitmap`: the user's bitmap; `none`: nothing, the job then
//! only preserves old data until it is cancelled, QEMU's image fleecing).
//! A before-write hook on the source copies the old data of any granule
//! still to be copied before a guest write changes it, so the target ends
//! as the disk was when the job started. The hook and the job's own loop
//! take one lock per granule run, so each granule is copied once.
//!
//! With a user bitmap (`bitmap-mode`, default `on-success` for
//! `incremental`), the bitmap is cleared at the start and keeps recording
//! new writes; if the job fails or is cancelled its old bits are merged
//! back (so the next incremental backup still covers them), and with
//! `never` they are merged back on success too.

use super::copy::{self, MAX_CHUNK};
use super::{Ctl, Failure, JobDriver};
use crate::bitmap::DirtyBitmap;
use crate::driver::Perms;
use crate::error::BlockError;
use crate::node::{BeforeWrite, Node, PermHandle};
use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// QAPI `MirrorSyncMode` as backup takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sync {
    Full,
    Top,
    None,
    Incremental,
    Bitmap,
}

impl Sync {
    /// QAPI's spelling.
    pub fn parse(s: &str) -> Option<Sync> {
        Some(match s {
            "full" => Sync::Full,
            "top" => Sync::Top,
            "none" => Sync::None,
            "incremental" => Sync::Incremental,
            "bitmap" => Sync::Bitmap,
            _ => return None,
        })
    }
}

/// QAPI `BitmapSyncMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitmapMode {
    OnSuccess,
    Never,
    Always,
}

impl BitmapMode {
    /// QAPI's spelling.
    pub fn parse(s: &str) -> Option<BitmapMode> {
        Some(match s {
            "on-success" => BitmapMode::OnSuccess,
            "never" => BitmapMode::Never,
            "always" => BitmapMode::Always,
            _ => return None,
        })
    }
}

struct Inner {
    source: Arc<Node>,
    target: Arc<Node>,
    /// Still to copy.
    todo: DirtyBitmap,
    /// One copier at a time (the job loop or a guest write's hook).
    lock: Mutex<()>,
    /// Write the target's clusters compressed (`compress`).
    compress: bool,
    /// A copy-before-write that failed: the target is no longer a
    /// point-in-time image, and the job fails.
    cbw_error: Mutex<Option<String>>,
}

impl Inner {
    /// Copy the granules of `[off, off+len)` still to be copied, without
    /// a job's error policy (a guest write waits on it).
    fn copy_before_write(&self, off: u64, len: u64) {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let end = off.saturating_add(len);
        let mut pos = off - off % self.todo.granularity();
        while let Some((d, n)) = self.todo.next_dirty(pos, MAX_CHUNK) {
            if d >= end {
                break;
            }
            self.todo.clear_range(d, n);
            let mut buf = vec![0u8; n as usize];
            let r = self
                .source
                .read_vectored(d, &mut [IoSliceMut::new(&mut buf)])
                .and_then(|()| {
                    if self.compress {
                        self.target.write_compressed(d, &buf)
                    } else {
                        self.target.write_vectored(d, &[IoSlice::new(&buf)], false)
                    }
                });
            if let Err(e) = r {
                let mut err = self.cbw_error.lock().unwrap_or_else(|e| e.into_inner());
                err.get_or_insert_with(|| format!("copy-before-write failed: {e}"));
            }
            pos = d + n;
        }
    }
}

struct Hook(Arc<Inner>);

impl BeforeWrite for Hook {
    fn before_write(&self, offset: u64, len: u64) {
        self.0.copy_before_write(offset, len);
    }
}

/// A backup job.
pub struct Backup {
    inner: Arc<Inner>,
    sync: Sync,
    /// Zero runs of the source need no write on a new target.
    target_zeroed: bool,
    user_bitmap: Option<(Arc<DirtyBitmap>, BitmapMode)>,
    /// The user bitmap's bits at the start.
    saved: Mutex<Option<DirtyBitmap>>,
    hook: Mutex<Option<u64>>,
    perm: Mutex<Option<PermHandle>>,
}

impl Backup {
    /// Back up `source` into `target`. The copy bitmap and the hook are
    /// in place when this returns: the point in time is now.
    pub fn new(
        job_id: &str,
        source: Arc<Node>,
        target: Arc<Node>,
        sync: Sync,
        bitmap: Option<(Arc<DirtyBitmap>, BitmapMode)>,
        target_zeroed: bool,
        compress: bool,
    ) -> Result<Backup, BlockError> {
        if target.len() < source.len() {
            return Err(BlockError::Invalid(format!(
                "Source and target image have different sizes ({} and {} bytes)",
                source.len(),
                target.len()
            )));
        }
        if matches!(sync, Sync::Incremental | Sync::Bitmap) && bitmap.is_none() {
            return Err(BlockError::Invalid(
                "must provide a valid bitmap name for 'incremental' sync mode".into(),
            ));
        }
        if let Some((b, _)) = &bitmap {
            if b.is_busy() {
                return Err(BlockError::Invalid(format!(
                    "Bitmap '{}' is currently in use by another operation and cannot be used",
                    b.name()
                )));
            }
        }
        let perm = target.attach_job(
            &format!("block job '{job_id}'"),
            Perms::WRITE.union(Perms::RESIZE),
            Perms::CONSISTENT_READ.union(Perms::WRITE_UNCHANGED),
        )?;
        let todo = DirtyBitmap::new(
            &format!("#job-{job_id}"),
            source.len(),
            bitmap.as_ref().map_or(65536, |(b, _)| b.granularity()),
            false,
        )?;
        // The point in time is now: what is to be copied is marked before
        // the hook goes in.
        match sync {
            Sync::Full => todo.set_all(),
            Sync::Top => {
                let below = source.child("backing");
                copy::mark_allocated(None, &todo, &source, below.as_ref(), source.len())
                    .map_err(|_| BlockError::Invalid("cannot map the source".into()))?;
            }
            Sync::None | Sync::Incremental | Sync::Bitmap => {}
        }
        let saved = bitmap.as_ref().map(|(b, _)| {
            b.set_busy(true);
            let s = b.copy_as("saved");
            if matches!(sync, Sync::Incremental | Sync::Bitmap) {
                let _ = todo.merge(&s);
            }
            b.clear();
            s
        });
        let inner = Arc::new(Inner {
            source: source.clone(),
            target,
            todo,
            lock: Mutex::new(()),
            compress,
            cbw_error: Mutex::new(None),
        });
        let hook = source.add_before_write(Arc::new(Hook(inner.clone())));
        Ok(Backup {
            inner,
            sync,
            target_zeroed,
            user_bitmap: bitmap,
            saved: Mutex::new(saved),
            hook: Mutex::new(Some(hook)),
            perm: Mutex::new(Some(perm)),
        })
    }

    fn restore_bitmap(&self) {
        if let (Some((b, _)), Some(s)) = (
            &self.user_bitmap,
            self.saved.lock().unwrap_or_else(|e| e.into_inner()).take(),
        ) {
            let _ = b.merge(&s);
        }
    }

    fn cbw_failed(&self) -> Option<String> {
        self.inner
            .cbw_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl JobDriver for Backup {
    fn run(&self, ctl: &Ctl) -> Result<(), Failure> {
        let i = &self.inner;
        if self.sync == Sync::None {
            // Fleecing: the hook does the work until the job is cancelled.
            loop {
                ctl.check()?;
                if let Some(e) = self.cbw_failed() {
                    return Err(Failure::Error(e));
                }
                ctl.nap(Duration::from_millis(100));
            }
        }
        ctl.set_len(i.todo.count());
        let mut buf = vec![0u8; MAX_CHUNK as usize];
        let mut cursor = 0;
        loop {
            ctl.check()?;
            if let Some(e) = self.cbw_failed() {
                return Err(Failure::Error(e));
            }
            let g = i.lock.lock().unwrap_or_else(|e| e.into_inner());
            let Some((off, n)) = i.todo.next_dirty(cursor, MAX_CHUNK) else {
                break;
            };
            i.todo.clear_range(off, n);
            let r = if i.compress {
                copy::copy_compressed(ctl, &i.source, &i.target, off, n, &mut buf)
            } else {
                copy::copy_range(
                    ctl,
                    &i.source,
                    &i.target,
                    off,
                    n,
                    &mut buf,
                    self.target_zeroed,
                )
            };
            drop(g);
            if !r? {
                return Err(Failure::Error(
                    "an ignored error left the backup incomplete".into(),
                ));
            }
            ctl.advance(n);
            ctl.throttle(n)?;
            cursor = off + n;
        }
        i.target.flush()?;
        Ok(())
    }

    fn commit(&self, _ctl: &Ctl) -> Result<(), Failure> {
        if let Some(e) = self.cbw_failed() {
            return Err(Failure::Error(e));
        }
        if matches!(self.user_bitmap, Some((_, BitmapMode::Never))) {
            self.restore_bitmap();
        }
        Ok(())
    }

    fn abort(&self) {
        if !matches!(self.user_bitmap, Some((_, BitmapMode::Always))) {
            self.restore_bitmap();
        }
    }

    fn clean(&self) {
        if let Some(id) = self.hook.lock().unwrap_or_else(|e| e.into_inner()).take() {
            self.inner.source.remove_before_write(id);
        }
        if let Some((b, _)) = &self.user_bitmap {
            b.set_busy(false);
        }
        let _ = self.inner.target.flush();
        self.perm.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}
