//! The `throttle` and `copy-on-read` filter drivers (QEMU's
//! `block/throttle.c` and `block/copy-on-read.c`, QAPI
//! `BlockdevOptionsThrottle` / `BlockdevOptionsCor`).
//!
//! * `throttle`: `throttle-group=<id>` names a group defined beforehand
//!   (`-object throttle-group`, see [`crate::throttle::Throttle::define_group`]);
//!   reads and writes through the filter wait for the group's buckets.
//! * `copy-on-read`: reads of ranges that the child does not hold itself
//!   (block status not allocated at the child's layer, i.e. served from its
//!   backing chain) are written into the child after reading, so the next
//!   read is local. The write is data-preserving (QEMU's WRITE_UNCHANGED).

use crate::driver::{BlockDriver, Completion, Extent, IoOp, IoRequest, Limits};
use crate::error::{BlockError, BlockResult};
use crate::graph::OpenCtx;
use crate::node::Node;
use crate::throttle::Throttle;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

/// The `throttle` filter.
pub struct ThrottleFilter {
    file: Arc<Node>,
    throttle: Arc<Throttle>,
}

impl ThrottleFilter {
    /// Open from options: `file`, `throttle-group`.
    pub fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        let group = ctx.opts.require_str("throttle-group")?;
        let throttle = Throttle::lookup_group(&group)
            .ok_or_else(|| BlockError::Open(format!("Throttle group '{group}' does not exist")))?;
        let file = ctx.open_child("file")?;
        ctx.describe("throttle-group", group);
        Ok(Arc::new(ThrottleFilter { file, throttle }))
    }
    fn wait(&self, write: bool, bytes: u64) {
        let d = self.throttle.reserve(write, bytes);
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }
}

impl BlockDriver for ThrottleFilter {
    /// A filter: it keeps no image metadata.
    fn migration_blocker(&self, _node: &str) -> Option<String> {
        None
    }
    /// Nothing of its own depends on the mode; the node reopens the child.
    fn reopen(&self, _read_only: bool) -> BlockResult<()> {
        Ok(())
    }
    fn driver_name(&self) -> &'static str {
        "throttle"
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn len(&self) -> u64 {
        self.file.len()
    }
    fn limits(&self) -> Limits {
        self.file.limits()
    }
    fn filename(&self) -> Option<String> {
        self.file.filename()
    }
    fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        self.wait(false, crate::iov::total_len_mut(iov) as u64);
        self.file.read_vectored(offset, iov)
    }
    fn write_vectored(&self, offset: u64, iov: &[IoSlice<'_>], fua: bool) -> BlockResult<()> {
        self.wait(true, crate::iov::total_len(iov) as u64);
        self.file.write_vectored(offset, iov, fua)
    }
    fn flush(&self) -> BlockResult<()> {
        self.file.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.file.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> BlockResult<()> {
        self.wait(true, len);
        self.file.write_zeroes(offset, len, may_unmap, fua)
    }
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.file.block_status(offset, len)
    }
    fn truncate(&self, len: u64) -> BlockResult<()> {
        self.file.truncate(len)
    }
    fn submit(self: Arc<Self>, req: IoRequest, done: Completion) {
        let d = match req.op {
            IoOp::Read => self.throttle.reserve(false, req.byte_len()),
            IoOp::Write | IoOp::WriteZeroes { .. } => self.throttle.reserve(true, req.byte_len()),
            _ => std::time::Duration::ZERO,
        };
        let file = self.file.clone();
        if d.is_zero() {
            file.submit(req, done);
        } else {
            crate::throttle::run_after(d, Box::new(move || file.submit(req, done)));
        }
    }
}

/// The `copy-on-read` filter.
pub struct CopyOnRead {
    file: Arc<Node>,
}

impl CopyOnRead {
    /// Open from options: `file`.
    pub fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        let file = ctx.open_child("file")?;
        Ok(Arc::new(CopyOnRead { file }))
    }
}

impl BlockDriver for CopyOnRead {
    /// A filter: it keeps no image metadata.
    fn migration_blocker(&self, _node: &str) -> Option<String> {
        None
    }
    /// Nothing of its own depends on the mode; the node reopens the child.
    fn reopen(&self, _read_only: bool) -> BlockResult<()> {
        Ok(())
    }
    fn driver_name(&self) -> &'static str {
        "copy-on-read"
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn len(&self) -> u64 {
        self.file.len()
    }
    fn limits(&self) -> Limits {
        self.file.limits()
    }
    fn filename(&self) -> Option<String> {
        self.file.filename()
    }
    fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        let len = crate::iov::total_len_mut(iov) as u64;
        // Find the runs the child does not hold itself.
        let mut runs = Vec::new();
        let mut pos = 0u64;
        while pos < len {
            let e = self.file.block_status(offset + pos, len - pos)?;
            let n = e.len.clamp(1, len - pos);
            if !e.allocated {
                runs.push((pos, n));
            }
            pos += n;
        }
        if runs.is_empty() || self.file.is_read_only() {
            return self.file.read_vectored(offset, iov);
        }
        let mut flat = vec![0u8; len as usize];
        self.file
            .read_vectored(offset, &mut [IoSliceMut::new(&mut flat)])?;
        for (p, n) in runs {
            let s = &flat[p as usize..(p + n) as usize];
            self.file
                .write_vectored(offset + p, &[IoSlice::new(s)], false)?;
        }
        crate::iov::scatter(&flat, iov);
        Ok(())
    }
    fn write_vectored(&self, offset: u64, iov: &[IoSlice<'_>], fua: bool) -> BlockResult<()> {
        self.file.write_vectored(offset, iov, fua)
    }
    fn flush(&self) -> BlockResult<()> {
        self.file.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.file.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> BlockResult<()> {
        self.file.write_zeroes(offset, len, may_unmap, fua)
    }
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.file.block_status(offset, len)
    }
    fn truncate(&self, len: u64) -> BlockResult<()> {
        self.file.truncate(len)
    }
}
