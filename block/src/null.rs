//! The `null-co` and `null-aio` protocols (QEMU's `block/null.c`, documented
//! in the `BlockdevOptionsNull` QAPI schema): a device of `size` bytes
//! (default 1 GiB) that discards writes. Reads leave the buffer untouched
//! unless `read-zeroes=on`. `latency-ns` delays every request. `null-co`
//! completes requests in the submitting thread, `null-aio` on the worker pool.

use crate::driver::{BlockDriver, Completion, IoOp, IoRequest};
use crate::error::BlockResult;
use crate::graph::OpenCtx;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;
use std::time::Duration;

/// A null node.
#[derive(Debug)]
pub struct NullNode {
    aio: bool,
    size: u64,
    read_zeroes: bool,
    latency: Duration,
}

impl NullNode {
    /// Build directly.
    pub fn new(aio: bool, size: u64, read_zeroes: bool, latency_ns: u64) -> Self {
        NullNode {
            aio,
            size,
            read_zeroes,
            latency: Duration::from_nanos(latency_ns),
        }
    }
    /// Open from options.
    pub fn open(ctx: &mut OpenCtx<'_>, aio: bool) -> BlockResult<Arc<dyn BlockDriver>> {
        let size = ctx.opts.take_size("size", 1)?.unwrap_or(1 << 30);
        let read_zeroes = ctx.opts.take_bool("read-zeroes")?.unwrap_or(false);
        let latency = ctx.opts.take_u64("latency-ns")?.unwrap_or(0);
        ctx.describe("size", size.to_string());
        ctx.describe("read-zeroes", read_zeroes.to_string());
        ctx.describe("latency-ns", latency.to_string());
        Ok(Arc::new(NullNode::new(aio, size, read_zeroes, latency)))
    }
    fn delay(&self) {
        if !self.latency.is_zero() {
            std::thread::sleep(self.latency);
        }
    }
}

impl BlockDriver for NullNode {
    /// No data at all.
    fn migration_blocker(&self, _node: &str) -> Option<String> {
        None
    }
    /// Nothing of its own depends on the mode; the node reopens the child.
    fn reopen(&self, _read_only: bool) -> BlockResult<()> {
        Ok(())
    }
    fn driver_name(&self) -> &'static str {
        if self.aio {
            "null-aio"
        } else {
            "null-co"
        }
    }
    fn len(&self) -> u64 {
        self.size
    }
    fn read_vectored(&self, _offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        self.delay();
        if self.read_zeroes {
            crate::iov::zero_fill(iov);
        }
        Ok(())
    }
    fn write_vectored(&self, _offset: u64, _iov: &[IoSlice<'_>], _fua: bool) -> BlockResult<()> {
        self.delay();
        Ok(())
    }
    fn flush(&self) -> BlockResult<()> {
        self.delay();
        Ok(())
    }
    fn write_zeroes(&self, _o: u64, _l: u64, _u: bool, _f: bool) -> BlockResult<()> {
        self.delay();
        Ok(())
    }
    fn block_status(&self, _offset: u64, len: u64) -> BlockResult<crate::driver::Extent> {
        Ok(crate::driver::Extent {
            len,
            data: !self.read_zeroes,
            zero: self.read_zeroes,
            offset: None,
            allocated: true,
            compressed: false,
        })
    }
    fn submit(self: Arc<Self>, req: IoRequest, done: Completion) {
        if self.aio || !self.latency.is_zero() {
            crate::aio::pool().spawn(Box::new(move || {
                let mut req = req;
                let r = crate::driver::execute(&*self, &mut req);
                drop(self);
                done(req, r);
            }));
        } else {
            let mut req = req;
            if req.op == IoOp::Read && self.read_zeroes {
                crate::iov::zero_fill(&mut req.iov.slices_mut());
            }
            done(req, Ok(()));
        }
    }
}
