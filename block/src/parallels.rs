//! The `parallels` format driver (ploop images, [`formats::parallels`]):
//! the class (probing both magics, creation with qemu-img's
//! `cluster_size`) and the node, which adapts the format to the graph: a
//! `file` child, the asynchronous data path through [`MappedIo`], the
//! in-use mark cleared at close, and the format extension's dirty bitmaps
//! handed to the block layer (QMP lists them). An image with an
//! extension opens read-only, falling back to it under `auto-read-only`.

use crate::driver::{BlockDriver, Completion, Extent, IoRequest};
use crate::error::{BlockError, BlockResult};
use crate::format::{
    block_error, CreateOpts, DriverClass, DriverKind, ImageInfo, NodeStorage, OptSpec, OptType,
};
use crate::graph::OpenCtx;
use crate::mapped::first_run_status;
use crate::mapped::{read_vectored_by, submit_mapped, write_vectored_by, Mapped, MappedIo};
use crate::node::{Child, Node};
use crate::vpc::open_error;
use formats::error::FormatError;
use formats::mapping::GuestMap;
use formats::parallels::{self, CreateOptions, Parallels};
use formats::storage::Storage;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

/// The `parallels` class.
pub struct ParallelsClass;

const PARALLELS_OPTS: &[OptSpec] = &[
    OptSpec::new(
        "cluster_size",
        OptType::Size,
        "Parallels image cluster size",
    ),
    crate::format::SIZE,
];

fn create_options(opts: &CreateOpts) -> CreateOptions {
    CreateOptions {
        size: opts.size().unwrap_or(0),
        cluster_size: opts
            .num("cluster_size")
            .unwrap_or(parallels::DEFAULT_CLUSTER_SIZE),
    }
}

impl DriverClass for ParallelsClass {
    fn name(&self) -> &str {
        "parallels"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }
    fn open(&self, ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        ParallelsNode::open(ctx)
    }
    fn probe(&self, head: &[u8], _filename: &str) -> u32 {
        parallels::probe(head)
    }
    fn create_options(&self) -> &'static [OptSpec] {
        PARALLELS_OPTS
    }
    fn create_summary(&self, filename: &str, opts: &CreateOpts) -> BlockResult<String> {
        let o = create_options(opts);
        parallels::validate(&o).map_err(|e| BlockError::Invalid(format!("{filename}: {e}")))?;
        Ok(format!(
            "size={} cluster_size={}",
            opts.size().unwrap_or(0),
            o.cluster_size
        ))
    }
    fn create(&self, filename: &str, opts: &CreateOpts) -> BlockResult<()> {
        let o = create_options(opts);
        parallels::validate(&o).map_err(|e| BlockError::Invalid(format!("{filename}: {e}")))?;
        crate::format::create_image(filename, |f| parallels::create(f, &o))
    }
}

/// An open Parallels image.
pub struct ParallelsNode {
    img: Arc<Parallels>,
    file: Arc<Node>,
    io: Arc<MappedIo<Mapped<Parallels>>>,
}

impl ParallelsNode {
    /// Open from options.
    pub fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        let file = ctx.open_child("file")?;
        let name = file.filename().unwrap_or_else(|| file.name().to_string());
        let fs: Arc<dyn Storage> = Arc::new(NodeStorage(file.clone()));
        let img = match Parallels::open(&name, fs.clone(), ctx.common.read_only) {
            // Read-only where auto-read-only allows it, as QEMU falls
            // back for images it cannot write.
            Err(FormatError::ReadOnly(_)) if ctx.common.auto_read_only => {
                ctx.common.read_only = true;
                Parallels::open(&name, fs, true)
            }
            r => r,
        }
        .map_err(open_error)?;
        let img = Arc::new(img);
        // No backing file: an empty slot the data path never reads.
        let io = Mapped::data_path(img.clone(), file.clone(), Child::new("backing", None));
        let node = Arc::new(ParallelsNode { img, file, io });
        let drv: Arc<dyn BlockDriver> = node.clone();
        node.io.set_fallback(Arc::downgrade(&drv));
        Ok(node)
    }
}

impl BlockDriver for ParallelsNode {
    fn driver_name(&self) -> &'static str {
        "parallels"
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
    fn close(&self) -> BlockResult<()> {
        self.img.close().map_err(block_error)
    }
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        let none = Child::new("backing", None);
        let map = |o, l| self.img.map_read(o, l);
        first_run_status(
            "parallels",
            self.img.size(),
            offset,
            len,
            map,
            &self.file,
            &none,
        )
    }
    fn submit(self: Arc<Self>, req: IoRequest, done: Completion) {
        let io = self.io.clone();
        submit_mapped(Some(&io), self, req, done)
    }
    fn allocated_size(&self) -> Option<u64> {
        self.file.driver().allocated_size()
    }
    /// QEMU shows no cluster size for parallels images.
    fn info(&self) -> Option<ImageInfo> {
        Some(ImageInfo {
            dirty: self.img.is_dirty(),
            ..Default::default()
        })
    }
    /// Loading writes nothing (the extension is only read).
    fn bitmaps_load_read_only(&self) -> bool {
        true
    }
    /// The format extension's dirty bitmaps, named by their ids; not
    /// persistent (never written back), as QEMU loads them.
    fn load_bitmaps(&self) -> BlockResult<Vec<crate::bitmap::DirtyBitmap>> {
        let file = NodeStorage(self.file.clone());
        let mut out = Vec::new();
        for b in self.img.bitmaps() {
            let bytes = self.img.load_bitmap(&file, b).map_err(open_error)?;
            let d =
                crate::bitmap::DirtyBitmap::new(&b.name, self.img.size(), b.granularity, false)?;
            let words: Vec<u64> = bytes
                .chunks(8)
                .map(|c| {
                    let mut w = [0u8; 8];
                    w[..c.len()].copy_from_slice(c);
                    u64::from_le_bytes(w)
                })
                .collect();
            d.set_words(&words);
            out.push(d);
        }
        Ok(out)
    }
}
