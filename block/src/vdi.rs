//! The `vdi` format driver (VirtualBox): the class (probing by the
//! signature at 0x40, creation with qemu-img's `static` option) and the
//! node, which adapts [`formats::vdi`] to the graph: a `file` child, the
//! asynchronous data path through [`MappedIo`], and `check` as qemu-img
//! runs it (report only: a repair is refused as QEMU refuses it).

use crate::driver::{BlockDriver, Completion, Extent, IoRequest};
use crate::error::{BlockError, BlockResult};
use crate::format::{
    block_error, CheckResult, CreateOpts, DriverClass, DriverKind, ImageInfo, NodeStorage, OptSpec,
    OptType, Repair,
};
use crate::graph::OpenCtx;
use crate::mapped::{
    past_end, piece_extent, read_vectored_by, submit_mapped, write_vectored_by, Mapped, MappedIo,
};
use crate::node::{Child, Node};
use crate::vpc::{new_uuid, open_error};
use formats::storage::Storage;
use formats::vdi::{self, CreateOptions, Vdi};
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

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

/// An open VDI image.
pub struct VdiNode {
    img: Arc<Vdi>,
    file: Arc<Node>,
    io: Arc<MappedIo<Mapped<Vdi>>>,
}

impl VdiNode {
    /// Open from options.
    pub fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        let file = ctx.open_child("file")?;
        let name = file.filename().unwrap_or_else(|| file.name().to_string());
        let fs: Arc<dyn Storage> = Arc::new(NodeStorage(file.clone()));
        let img = Arc::new(Vdi::open(&name, fs, ctx.common.read_only).map_err(open_error)?);
        // No backing file: an empty slot the data path never reads.
        let io = Mapped::data_path(img.clone(), file.clone(), Child::new("backing", None));
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
        read_vectored_by(offset, iov, |o, b| self.img.read(o, b))
    }
    fn write_vectored(&self, offset: u64, iov: &[IoSlice<'_>], fua: bool) -> BlockResult<()> {
        write_vectored_by(
            offset,
            iov,
            fua,
            |o, d| self.img.write(o, d),
            || self.img.flush(),
        )
    }
    fn flush(&self) -> BlockResult<()> {
        self.img.flush().map_err(block_error)
    }
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        if let Some(e) = past_end(self.img.size(), offset, len) {
            return Ok(e);
        }
        let len = len.min(self.img.size() - offset);
        let p = self.img.block_status(offset, len).map_err(block_error)?;
        let none = Child::new("backing", None);
        piece_extent(p, p.len, &self.file, self.img.is_static(), &none)
    }
    fn submit(self: Arc<Self>, req: IoRequest, done: Completion) {
        let io = self.io.clone();
        submit_mapped(Some(&io), self, req, done)
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
