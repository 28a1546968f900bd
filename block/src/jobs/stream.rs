//! `block-stream`: copy into the active layer what its backing chain
//! holds above `base` (everything, without a base), then make `base` its
//! backing file (QEMU's `block/stream.c` behaviour, QAPI `block-stream`).
//!
//! The copy does not change what the guest sees, so the job writes with
//! `write unchanged`, which a device shares. A guest write can still race
//! with a copy of the same range: the job reads, then writes only inside
//! a drained section and only if a private dirty bitmap on the top layer
//! shows the guest did not write that range meanwhile, so old data never
//! lands over new data.

use super::copy::{self, MAX_CHUNK};
use super::{Ctl, Failure, JobDriver};
use crate::backend::BlockBackend;
use crate::bitmap::DirtyBitmap;
use crate::driver::Perms;
use crate::error::BlockError;
use crate::node::{Node, PermHandle};
use std::io::IoSlice;
use std::sync::{Arc, Mutex};

/// A stream job.
pub struct Stream {
    backend: Arc<BlockBackend>,
    top: Arc<Node>,
    base: Option<Arc<Node>>,
    /// What the top's header will name as its backing file.
    backing_file: Option<String>,
    guard: Arc<DirtyBitmap>,
    perm: Mutex<Option<PermHandle>>,
}

impl Stream {
    /// Stream into `backend`'s root from above `base`. `backing_file`
    /// overrides the name written into the image (QMP's `backing-file`).
    pub fn new(
        job_id: &str,
        backend: Arc<BlockBackend>,
        base: Option<Arc<Node>>,
        backing_file: Option<String>,
    ) -> Result<Stream, BlockError> {
        let top = backend
            .root()
            .ok_or_else(|| BlockError::NoMedium(format!("Block device '{}'", backend.id())))?;
        if let Some(b) = &base {
            if Arc::ptr_eq(b, &top) || !top.has_descendant(b) {
                return Err(BlockError::Invalid(format!(
                    "Node '{}' is not a backing image of '{}'",
                    b.name(),
                    top.name()
                )));
            }
        }
        if top.child_slot("backing").is_none() {
            return Err(BlockError::Invalid(format!(
                "Node '{}' has no backing file to stream from",
                top.name()
            )));
        }
        let perm = top.attach_job(
            &format!("block job '{job_id}'"),
            Perms::CONSISTENT_READ.union(Perms::WRITE_UNCHANGED),
            Perms::ALL,
        )?;
        let guard = Arc::new(DirtyBitmap::new(
            &format!("#job-{job_id}"),
            top.len(),
            65536,
            false,
        )?);
        top.add_bitmap(guard.clone())?;
        let backing_file = backing_file.or_else(|| base.as_ref().and_then(|b| b.filename()));
        Ok(Stream {
            backend,
            top,
            base,
            backing_file,
            guard,
            perm: Mutex::new(Some(perm)),
        })
    }
}

impl JobDriver for Stream {
    fn run(&self, ctl: &Ctl) -> Result<(), Failure> {
        let len = self.top.len();
        ctl.set_len(len);
        let mut buf = vec![0u8; MAX_CHUNK as usize];
        copy::each_run(ctl, len, |off, want| {
            let top_alloc = self.top.block_status(off, want).map_err(Failure::from)?;
            let mut n = top_alloc.len.clamp(1, want);
            if !top_alloc.allocated {
                let below = self.top.child("backing");
                let (alloc, m) = match &below {
                    Some(b) if off < b.len() => {
                        copy::allocated_above(b, self.base.as_ref(), off, n)
                    }
                    _ => (false, n),
                };
                n = m;
                if alloc {
                    let b = &mut buf[..n as usize];
                    if copy::read(ctl, &self.top, off, b)? {
                        let b: &[u8] = b;
                        let r = self.backend.drained(|| {
                            if self.guard.is_dirty(off, n) {
                                return Ok(());
                            }
                            self.top.write_vectored(off, &[IoSlice::new(b)], false)
                        });
                        if let Err(e) = r {
                            ctl.on_error(true, &e)?;
                        }
                    }
                }
            }
            Ok(n)
        })?;
        Ok(())
    }

    fn commit(&self, _ctl: &Ctl) -> Result<(), Failure> {
        self.top.flush()?;
        let fmt = self.base.as_ref().map(|b| b.driver_name().to_string());
        self.backend.drained(|| -> Result<(), BlockError> {
            self.top.set_child("backing", self.base.clone())?;
            self.top
                .driver()
                .set_backing_file(self.backing_file.as_deref(), fmt.as_deref())
        })?;
        Ok(())
    }

    fn clean(&self) {
        self.top.remove_bitmap(self.guard.name());
        self.perm.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}
