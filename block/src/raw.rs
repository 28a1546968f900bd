//! The `raw` format (QEMU's `block/raw-format.c`, `BlockdevOptionsRaw`): the
//! guest sees the bytes of its `file` child, optionally a window of it given
//! by `offset=` and `size=`.
//!
//! When the format was *probed* rather than given, a write to sector 0 that
//! would make the image look like another format (a qcow2 header, say) is
//! refused with `EPERM`: otherwise a guest could turn its raw disk into a
//! qcow2 image pointing at any host file as backing file on the next start.

use crate::driver::{check_range, BlockDriver, Completion, Extent, IoOp, IoRequest, Limits, Perms};
use crate::error::{BlockError, BlockResult};
use crate::format::{CreateOpts, DriverClass, DriverKind, Measure, OptSpec, OptType};
use crate::graph::OpenCtx;
use crate::node::Node;
use formats::probe::{probe, PROBE_BUF_SIZE};
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The `raw` class: no probe score (raw is what a file is when no format
/// recognises it), and creation of plain files with `preallocation`.
pub struct RawClass;

const RAW_OPTS: &[OptSpec] = &[
    crate::format::SIZE,
    OptSpec::new(
        "preallocation",
        OptType::Str,
        "Preallocation mode (allowed values: off, falloc, full)",
    ),
];

impl DriverClass for RawClass {
    fn name(&self) -> &str {
        "raw"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }
    fn open(&self, ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        RawNode::open(ctx)
    }
    fn create_options(&self) -> &'static [OptSpec] {
        RAW_OPTS
    }
    fn create_summary(&self, _filename: &str, opts: &CreateOpts) -> BlockResult<String> {
        let size = opts.size().unwrap_or(0);
        match opts.str("preallocation") {
            None => Ok(format!("size={size}")),
            Some(p @ ("off" | "falloc" | "full")) => Ok(format!("size={size} preallocation={p}")),
            Some(p) => Err(BlockError::Invalid(format!("Invalid parameter '{p}'"))),
        }
    }
    fn create(&self, filename: &str, opts: &CreateOpts) -> BlockResult<()> {
        let size = opts.size().unwrap_or(0);
        if crate::iscsi::uri::is_iscsi(filename) {
            // A LUN exists already: "creating" checks that it is big
            // enough, as QEMU's iscsi_co_create_opts does.
            return crate::iscsi::create(filename, size);
        }
        crate::format::create_file(filename, filename)?;
        let g = crate::graph::BlockGraph::new();
        let f = crate::format::file_node(&g, filename, false, None)?;
        let _h = f
            .attach(
                "create",
                Perms::WRITE.union(Perms::RESIZE),
                Perms::ALL.minus(Perms::RESIZE),
            )
            .map_err(|e| BlockError::Open(format!("{filename}: {e}")))?;
        f.truncate(size)
            .map_err(|e| BlockError::Open(format!("{filename}: Could not resize file: {e}")))?;
        match opts.str("preallocation") {
            Some("falloc") if size > 0 => f.driver().preallocate(0, size),
            Some("full") => crate::driver::write_zeroes_by_writing(&**f.driver(), 0, size, false),
            _ => Ok(()),
        }?;
        f.flush()
    }
    fn measure(
        &self,
        _opts: &CreateOpts,
        size: u64,
        _src: Option<&Arc<Node>>,
    ) -> BlockResult<Measure> {
        let s = size.div_ceil(512) * 512;
        Ok(Measure {
            required: s,
            fully_allocated: s,
            bitmaps: None,
        })
    }
}

/// A raw node.
pub struct RawNode {
    file: Arc<Node>,
    offset: u64,
    size: AtomicU64,
    has_size: bool,
    probed: bool,
}

impl RawNode {
    /// Open from options: `file` child, `offset`, `size`.
    pub fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        let file = ctx.open_child("file")?;
        let offset = ctx.opts.take_size("offset", 1)?.unwrap_or(0);
        let size = ctx.opts.take_size("size", 1)?;
        let flen = file.len();
        if offset > flen {
            return Err(BlockError::Open(format!(
                "{}: offset cannot be greater than the file size",
                ctx.node_name
            )));
        }
        if let Some(sz) = size {
            if offset.checked_add(sz).is_none_or(|e| e > flen) {
                return Err(BlockError::Open(format!(
                    "{}: the sum of offset ({offset}) and size ({sz}) has to be smaller or equal to the actual size of the containing file ({flen})",
                    ctx.node_name
                )));
            }
        }
        ctx.describe("offset", offset.to_string());
        if let Some(s) = size {
            ctx.describe("size", s.to_string());
        }
        let size_v = size.unwrap_or(flen - offset);
        Ok(Arc::new(RawNode {
            file,
            offset,
            size: AtomicU64::new(size_v),
            has_size: size.is_some(),
            probed: ctx.probed,
        }))
    }

    fn len_now(&self) -> u64 {
        if self.has_size {
            self.size.load(Ordering::Relaxed)
        } else {
            self.file.len().saturating_sub(self.offset)
        }
    }

    /// The sector-0 guard for probed images.
    fn check_sector0(&self, offset: u64, data: &[IoSlice<'_>]) -> BlockResult<()> {
        if !self.probed || offset >= PROBE_BUF_SIZE as u64 {
            return Ok(());
        }
        let mut sector = vec![0u8; PROBE_BUF_SIZE];
        self.file
            .read_vectored(self.offset, &mut [IoSliceMut::new(&mut sector)])?;
        let len = crate::iov::total_len(data);
        let mut flat = vec![0u8; len];
        crate::iov::gather(data, &mut flat);
        let start = offset as usize;
        let n = (PROBE_BUF_SIZE - start).min(len);
        sector[start..start + n].copy_from_slice(&flat[..n]);
        if let Some(fmt) = probe(&sector) {
            return Err(BlockError::Permission(format!(
                "write to sector 0 refused: it would turn the probed raw image into a '{fmt}' header (specify format=raw explicitly to allow it)"
            )));
        }
        Ok(())
    }
}

impl BlockDriver for RawNode {
    /// No metadata of its own.
    fn migration_blocker(&self, _node: &str) -> Option<String> {
        None
    }
    /// Nothing of its own depends on the mode; the node reopens the child.
    fn reopen(&self, _read_only: bool) -> BlockResult<()> {
        Ok(())
    }
    fn driver_name(&self) -> &'static str {
        "raw"
    }
    fn len(&self) -> u64 {
        self.len_now()
    }
    fn limits(&self) -> Limits {
        self.file.limits()
    }
    fn filename(&self) -> Option<String> {
        self.file.filename()
    }
    fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        let len = crate::iov::total_len_mut(iov) as u64;
        check_range("raw", offset, len, self.len_now())?;
        self.file.read_vectored(self.offset + offset, iov)
    }
    fn write_vectored(&self, offset: u64, iov: &[IoSlice<'_>], fua: bool) -> BlockResult<()> {
        let len = crate::iov::total_len(iov) as u64;
        check_range("raw", offset, len, self.len_now())?;
        self.check_sector0(offset, iov)?;
        self.file.write_vectored(self.offset + offset, iov, fua)
    }
    fn flush(&self) -> BlockResult<()> {
        self.file.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        check_range("raw", offset, len, self.len_now())?;
        self.file.discard(self.offset + offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> BlockResult<()> {
        check_range("raw", offset, len, self.len_now())?;
        if self.probed && offset < PROBE_BUF_SIZE as u64 {
            // Zeroes never form a header, but keep the check uniform.
            let z = vec![0u8; (PROBE_BUF_SIZE as u64 - offset).min(len) as usize];
            self.check_sector0(offset, &[IoSlice::new(&z)])?;
        }
        self.file
            .write_zeroes(self.offset + offset, len, may_unmap, fua)
    }
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        let size = self.len_now();
        if offset >= size {
            return Ok(Extent {
                len,
                data: false,
                zero: true,
                offset: None,
                allocated: true,
                compressed: false,
            });
        }
        let mut e = self
            .file
            .block_status(self.offset + offset, len.min(size - offset))?;
        e.len = e.len.min(size - offset).max(1);
        Ok(e)
    }
    fn truncate(&self, len: u64) -> BlockResult<()> {
        if self.has_size || self.offset != 0 {
            return Err(BlockError::Unsupported(
                "raw: cannot resize an image that uses offset= or size=".into(),
            ));
        }
        self.file.truncate(len)
    }
    fn submit(self: Arc<Self>, mut req: IoRequest, done: Completion) {
        let size = self.len_now();
        if let Err(e) = check_range("raw", req.offset, req.byte_len(), size) {
            if req.op != IoOp::Flush {
                done(req, Err(e));
                return;
            }
        }
        if req.op == IoOp::Write && self.probed && req.offset < PROBE_BUF_SIZE as u64 {
            let r = self.check_sector0(req.offset, &req.iov.slices());
            if let Err(e) = r {
                done(req, Err(e));
                return;
            }
        }
        let shift = self.offset;
        req.offset += shift;
        self.file.submit(
            req,
            Box::new(move |mut r, res| {
                r.offset -= shift;
                done(r, res)
            }),
        );
    }
}
