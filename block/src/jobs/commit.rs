//! `block-commit` of an intermediate layer: copy what `top` and the
//! layers between it and `base` hold into `base`, then make `base` the
//! backing file of the image above `top` (QEMU's `block/commit.c`
//! behaviour). Committing the active layer is a mirror into the base
//! ([`super::mirror`] with `commit_base`).
//!
//! The base is opened read-only as a backing image; the job reopens it
//! read-write for its time (taking the image's write lock) and read-only
//! again at the end. Nothing else writes the layers it reads: they are
//! backing images.

use super::copy::{self, MAX_CHUNK};
use super::{Ctl, Failure, JobDriver};
use crate::backend::BlockBackend;
use crate::driver::Perms;
use crate::error::BlockError;
use crate::node::{Node, PermHandle};
use std::sync::{Arc, Mutex};

/// An intermediate commit job.
pub struct Commit {
    backend: Arc<BlockBackend>,
    /// The image whose backing file is `top`.
    above: Arc<Node>,
    top: Arc<Node>,
    base: Arc<Node>,
    backing_file: Option<String>,
    perm: Mutex<Option<PermHandle>>,
}

impl Commit {
    /// Commit `top` (the backing image of `above`) into `base`.
    pub fn new(
        job_id: &str,
        backend: Arc<BlockBackend>,
        above: Arc<Node>,
        top: Arc<Node>,
        base: Arc<Node>,
        backing_file: Option<String>,
    ) -> Result<Commit, BlockError> {
        if Arc::ptr_eq(&top, &base) || !top.has_descendant(&base) {
            return Err(BlockError::Invalid(format!(
                "Base '{}' is not reachable from top '{}'",
                base.name(),
                top.name()
            )));
        }
        base.reopen(false)?;
        let perm = base.attach_job(
            &format!("block job '{job_id}'"),
            Perms::WRITE.union(Perms::RESIZE),
            Perms::CONSISTENT_READ.union(Perms::WRITE_UNCHANGED),
        );
        let perm = match perm {
            Ok(p) => p,
            Err(e) => {
                let _ = base.reopen(true);
                return Err(e);
            }
        };
        let backing_file = backing_file.or_else(|| base.filename());
        Ok(Commit {
            backend,
            above,
            top,
            base,
            backing_file,
            perm: Mutex::new(Some(perm)),
        })
    }
}

impl JobDriver for Commit {
    fn run(&self, ctl: &Ctl) -> Result<(), Failure> {
        let len = self.top.len();
        if self.base.len() < len {
            self.base.truncate(len)?;
        }
        ctl.set_len(len);
        let mut buf = vec![0u8; MAX_CHUNK as usize];
        copy::each_run(ctl, len, |off, want| {
            let (alloc, n) = copy::allocated_above(&self.top, Some(&self.base), off, want);
            if alloc {
                copy::copy_range(ctl, &self.top, &self.base, off, n, &mut buf, false)?;
            }
            Ok(n)
        })?;
        self.base.flush()?;
        Ok(())
    }

    fn commit(&self, _ctl: &Ctl) -> Result<(), Failure> {
        let fmt = self.base.driver_name().to_string();
        self.backend.drained(|| -> Result<(), BlockError> {
            self.above.set_child("backing", Some(self.base.clone()))?;
            self.above
                .driver()
                .set_backing_file(self.backing_file.as_deref(), Some(&fmt))
        })?;
        Ok(())
    }

    fn clean(&self) {
        self.perm.lock().unwrap_or_else(|e| e.into_inner()).take();
        let _ = self.base.flush();
        let _ = self.base.reopen(true);
    }
}
