//! The `vdi` format driver (VirtualBox): the class (probing by the
//! signature at 0x40, creation with qemu-img's `static` option) and the
//! node, which adapts [`formats::vdi`] to the graph: a `file` child, the
//! asynchronous data path through [`MappedIo`], and `check` as qemu-img
//! runs it (report only: a repair is refused as QEMU refuses it).

use crate::driver::{run_on_pool, BlockDriver, Completion, Extent, IoFlags, IoOp, IoRequest};
use crate::error::{BlockError, BlockResult};
use crate::format::{
    block_error, CheckResult, CreateOpts, DriverClass, DriverKind, ImageInfo, NodeStorage, OptSpec,
    OptType, Repair,
};
use crate::graph::OpenCtx;
use crate::mapped::{AllocPlan, HostData, MapRun, MappedIo, MappingFormat, RunKind, WriteMap};
use crate::node::{Child, Node};
use crate::vpc::{new_uuid, open_error};
use formats::storage::Storage;
use formats::vdi::{self, CreateOptions, Plan, Run, Vdi};
use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, OnceLock, Weak};

/// The `vdi` class.
pub struct VdiClass;

const VDI_OPTS: &[OptSpec] = &[
    crate::format::SIZE,
    OptSpec::new("static", OptType::Bool, "VDI static (pre-allocated) image"),
];

fn create_options(opts: &CreateOpts) -> CreateOptions {
    CreateOptions {
        size: opts.size().unwrap_or(0),
        is_static: opts.bool("static").unwrap_or(false),
        uuids: (new_uuid(), new_uuid()),
    }
}

impl DriverClass for VdiClass {
    fn name(&self) -> &str {
        "vdi"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }
    fn open(&self, ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        VdiNode::open(ctx)
    }
    /// The signature, in a header of full size (QEMU's test).
    fn probe(&self, head: &[u8], _filename: &str) -> u32 {
        match head.get(0x40..0x44) {
            Some(s)
                if head.len() >= vdi::HEADER_BYTES
                    && u32::from_le_bytes([s[0], s[1], s[2], s[3]]) == vdi::SIGNATURE =>
            {
                100
            }
            _ => 0,
        }
    }
    fn create_options(&self) -> &'static [OptSpec] {
        VDI_OPTS
    }
    fn create_summary(&self, filename: &str, opts: &CreateOpts) -> BlockResult<String> {
        let o = create_options(opts);
        vdi::validate(&o).map_err(|e| BlockError::Invalid(format!("{filename}: {e}")))?;
        Ok(format!(
            "size={} static={}",
            opts.size().unwrap_or(0),
            if o.is_static { "on" } else { "off" }
        ))
    }
    fn create(&self, filename: &str, opts: &CreateOpts) -> BlockResult<()> {
        let o = create_options(opts);
        vdi::validate(&o).map_err(|e| BlockError::Invalid(format!("{filename}: {e}")))?;
        crate::format::create_image(filename, |f| vdi::create(f, &o))
    }
}

/// [`formats::vdi`] as a [`MappingFormat`].
pub struct VdiMap {
    img: Arc<Vdi>,
    io: OnceLock<Weak<MappedIo<VdiMap>>>,
}

impl MappingFormat for VdiMap {
    type Ticket = ();
    type Plan = vdi::Alloc;
    type Encoded = ();

    fn map_read(&self, offset: u64, len: u64) -> BlockResult<(Vec<MapRun<()>>, ())> {
        let runs = self
            .img
            .map_read(offset, len)
            .map_err(block_error)?
            .into_iter()
            .map(|p| MapRun {
                offset: p.offset,
                len: p.len,
                kind: match p.run {
                    Run::Data(host) => RunKind::Data { host },
                    Run::Zero => RunKind::Zero,
                },
            })
            .collect();
        Ok((runs, ()))
    }
    fn read_encoded(&self, _at: (), _offset: u64, _buf: &mut [u8]) -> BlockResult<()> {
        Err(BlockError::Unsupported("vdi has no encoded data".into()))
    }
    fn map_write(&self, offset: u64, len: u64) -> BlockResult<WriteMap<()>> {
        Ok(
            match self.img.map_write(offset, len).map_err(block_error)? {
                vdi::WriteMap::InPlace(runs) => WriteMap::InPlace(runs, ()),
                vdi::WriteMap::Busy => WriteMap::Busy,
                vdi::WriteMap::Allocate => WriteMap::Allocate,
            },
        )
    }
    fn plan_alloc(&self, offset: u64, data: &[u8]) -> BlockResult<AllocPlan<vdi::Alloc>> {
        Ok(
            match self
                .img
                .plan_alloc(offset, data.len() as u64)
                .map_err(block_error)?
            {
                Plan::Busy => AllocPlan::Busy,
                Plan::Ready {
                    zero_first,
                    writes,
                    alloc,
                } => AllocPlan::Ready {
                    zero_first,
                    writes: writes
                        .into_iter()
                        .map(|(g, h, l)| (h, HostData::Guest { offset: g, len: l }))
                        .collect(),
                    plan: alloc,
                },
            },
        )
    }
    fn finish_alloc(&self, plan: vdi::Alloc, result: BlockResult<()>) -> BlockResult<()> {
        let r = self
            .img
            .finish_alloc(plan, result.is_ok())
            .map_err(block_error);
        if let Some(io) = self.io.get().and_then(Weak::upgrade) {
            io.unpark();
        }
        result.and(r)
    }
}

/// An open VDI image.
pub struct VdiNode {
    img: Arc<Vdi>,
    file: Arc<Node>,
    io: Arc<MappedIo<VdiMap>>,
}

impl VdiNode {
    /// Open from options.
    pub fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        let file = ctx.open_child("file")?;
        let name = file.filename().unwrap_or_else(|| file.name().to_string());
        let fs: Arc<dyn Storage> = Arc::new(NodeStorage(file.clone()));
        let img = Arc::new(Vdi::open(&name, fs, ctx.common.read_only).map_err(open_error)?);
        let map = Arc::new(VdiMap {
            img: img.clone(),
            io: OnceLock::new(),
        });
        // No backing file: an empty slot the data path never reads.
        let io = MappedIo::new(map.clone(), file.clone(), Child::new("backing", None));
        let _ = map.io.set(Arc::downgrade(&io));
        let node = Arc::new(VdiNode { img, file, io });
        let drv: Arc<dyn BlockDriver> = node.clone();
        node.io.set_fallback(Arc::downgrade(&drv));
        Ok(node)
    }
}

impl BlockDriver for VdiNode {
    fn driver_name(&self) -> &'static str {
        "vdi"
    }
    fn metadata_in_file(&self) -> bool {
        true
    }
    fn len(&self) -> u64 {
        self.img.size()
    }
    fn filename(&self) -> Option<String> {
        self.file.filename()
    }
    fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        let mut off = offset;
        for s in iov.iter_mut() {
            self.img.read(off, s).map_err(block_error)?;
            off += s.len() as u64;
        }
        Ok(())
    }
    fn write_vectored(&self, offset: u64, iov: &[IoSlice<'_>], fua: bool) -> BlockResult<()> {
        let mut flat = vec![0u8; crate::iov::total_len(iov)];
        crate::iov::gather(iov, &mut flat);
        self.img.write(offset, &flat).map_err(block_error)?;
        if fua {
            self.img.flush().map_err(block_error)?;
        }
        Ok(())
    }
    fn flush(&self) -> BlockResult<()> {
        self.img.flush().map_err(block_error)
    }
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        if offset >= self.img.size() {
            return Ok(Extent {
                len: len.max(1),
                data: false,
                zero: true,
                offset: None,
                allocated: true,
                compressed: false,
            });
        }
        let len = len.min(self.img.size() - offset);
        let p = self.img.block_status(offset, len).map_err(block_error)?;
        Ok(match p.run {
            Run::Data(host) if self.img.is_static() => {
                // A static image's blocks are what the file holds there:
                // holes read as zeroes (QEMU's BDRV_BLOCK_RECURSE).
                let fe = self.file.block_status(host, p.len)?;
                Extent {
                    len: fe.len.clamp(1, p.len),
                    data: true,
                    zero: fe.zero && !fe.data,
                    offset: Some(host),
                    allocated: true,
                    compressed: false,
                }
            }
            Run::Data(host) => Extent {
                len: p.len,
                data: true,
                zero: false,
                offset: Some(host),
                allocated: true,
                compressed: false,
            },
            Run::Zero => Extent {
                len: p.len,
                data: false,
                zero: true,
                offset: None,
                allocated: true,
                compressed: false,
            },
        })
    }
    fn submit(self: Arc<Self>, req: IoRequest, done: Completion) {
        match req.op {
            IoOp::Read => self.io.clone().submit_read(req, done),
            IoOp::Write if !req.fua && req.flags == IoFlags::NONE => {
                self.io.clone().submit_write(req, done)
            }
            _ => run_on_pool(self, req, done),
        }
    }
    fn allocated_size(&self) -> Option<u64> {
        self.file.driver().allocated_size()
    }
    fn reopen(&self, read_only: bool) -> BlockResult<()> {
        self.img.set_read_only(read_only).map_err(open_error)
    }
    fn info(&self) -> Option<ImageInfo> {
        Some(ImageInfo {
            // QEMU's `vdi_get_info`.
            cluster_size: Some(self.img.block_size()),
            ..Default::default()
        })
    }
    fn check(&self, repair: Repair) -> BlockResult<CheckResult> {
        if repair != Repair::None {
            // QEMU's vdi check cannot repair and says so this way.
            return Err(BlockError::Unsupported(
                "This image format does not support checks".into(),
            ));
        }
        Ok(self.img.check())
    }
}
