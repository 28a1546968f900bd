//! The `qed` format driver: the class (probing, creation with QEMU's
//! `cluster_size`, `table_size`, `backing_file` and `backing_fmt`) and the
//! node, which adapts [`formats::qed`] to the graph: a `file` child, the
//! backing file the header names, the asynchronous data path through
//! [`MappedIo`], `check`, and a clean close that clears need-check.

use crate::driver::{BlockDriver, Completion, Extent, IoRequest};
use crate::error::{BlockError, BlockResult};
use crate::format::{
    block_error, open_backing, CheckResult, ChildStorage, CreateOpts, DriverClass, DriverKind,
    ImageInfo, NodeStorage, OptSpec, OptType, Repair,
};
use crate::graph::OpenCtx;
use crate::mapped::first_run_status;
use crate::mapped::{read_vectored_by, submit_mapped, write_vectored_by, Mapped, MappedIo};
use crate::node::{Child, Node};
use formats::error::FormatError;
use formats::mapping::GuestMap;
use formats::qed::{self, CreateOptions, Qed};
use formats::storage::Storage;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

/// The `qed` class.
pub struct QedClass;

const QED_OPTS: &[OptSpec] = &[
    crate::format::SIZE,
    OptSpec::new("backing_file", OptType::Str, "File name of a base image"),
    OptSpec::new(
        "backing_fmt",
        OptType::Str,
        "Image format of the base image",
    ),
    OptSpec::new("cluster_size", OptType::Size, "Cluster size (in bytes)"),
    OptSpec::new(
        "table_size",
        OptType::Number,
        "L1/L2 table size (in clusters)",
    ),
];

fn create_options(opts: &CreateOpts) -> CreateOptions {
    CreateOptions {
        size: opts.size().unwrap_or(0),
        cluster_size: opts.num("cluster_size").unwrap_or(64 * 1024),
        table_size: opts.num("table_size").unwrap_or(4),
        backing_file: opts.backing_file().map(str::to_string),
        backing_fmt: opts.backing_fmt().map(str::to_string),
    }
}

fn open_error(e: FormatError) -> BlockError {
    match e {
        FormatError::Io { .. } => block_error(e),
        FormatError::Unsupported(m) => BlockError::Unsupported(m),
        other => BlockError::Open(other.to_string()),
    }
}

impl DriverClass for QedClass {
    fn name(&self) -> &str {
        "qed"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }
    fn open(&self, ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        QedNode::open(ctx)
    }
    fn probe(&self, head: &[u8], _filename: &str) -> u32 {
        qed::probe(head)
    }
    fn create_options(&self) -> &'static [OptSpec] {
        QED_OPTS
    }
    fn supports_backing(&self) -> bool {
        true
    }
    fn create_summary(&self, filename: &str, opts: &CreateOpts) -> BlockResult<String> {
        let o = create_options(opts);
        qed::validate(&o).map_err(|e| BlockError::Invalid(format!("{filename}: {e}")))?;
        let mut line = format!("size={}", o.size);
        if let Some(b) = &o.backing_file {
            line.push_str(&format!(" backing_file={b}"));
        }
        if let Some(f) = &o.backing_fmt {
            line.push_str(&format!(" backing_fmt={f}"));
        }
        line.push_str(&format!(" cluster_size={}", o.cluster_size));
        if let Some(t) = opts.num("table_size") {
            line.push_str(&format!(" table_size={t}"));
        }
        Ok(line)
    }
    fn create(&self, filename: &str, opts: &CreateOpts) -> BlockResult<()> {
        let o = create_options(opts);
        qed::validate(&o).map_err(|e| BlockError::Invalid(format!("{filename}: {e}")))?;
        crate::format::create_image(filename, |f| qed::create(f, &o))
    }
}

/// An open QED image.
pub struct QedNode {
    img: Arc<Qed>,
    file: Arc<Node>,
    backing: Arc<Child>,
    backing_name: Option<String>,
    /// `raw` when the header says the backing file is not probed.
    backing_fmt: Option<&'static str>,
    io: Arc<MappedIo<Mapped<Qed>>>,
}

impl QedNode {
    /// Open from options.
    pub fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        let file = ctx.open_child("file")?;
        let name = file.filename().unwrap_or_else(|| file.name().to_string());
        let fs: Arc<dyn Storage> = Arc::new(NodeStorage(file.clone()));
        let pv = qed::preview(&name, &*fs).map_err(open_error)?;
        let fmt = pv.backing_raw.then_some("raw");
        let backing = open_backing(ctx, &name, pv.backing_file.as_deref(), fmt)?;
        let bs: Option<Arc<dyn Storage>> = Some(Arc::new(ChildStorage(backing.clone())));
        let img = Arc::new(Qed::open(&name, fs, bs, ctx.common.read_only).map_err(open_error)?);
        let io = Mapped::data_path(img.clone(), file.clone(), backing.clone());
        let node = Arc::new(QedNode {
            img,
            file,
            backing,
            backing_name: pv.backing_file,
            backing_fmt: fmt,
            io,
        });
        let drv: Arc<dyn BlockDriver> = node.clone();
        node.io.set_fallback(Arc::downgrade(&drv));
        Ok(node)
    }
}

impl BlockDriver for QedNode {
    fn driver_name(&self) -> &'static str {
        "qed"
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
        let map = |o, l| self.img.map_read(o, l);
        first_run_status(
            "qed",
            self.img.size(),
            offset,
            len,
            map,
            &self.file,
            &self.backing,
        )
    }
    fn submit(self: Arc<Self>, req: IoRequest, done: Completion) {
        let io = self.io.clone();
        submit_mapped(Some(&io), self, req, done)
    }
    fn allocated_size(&self) -> Option<u64> {
        self.file.driver().allocated_size()
    }
    fn close(&self) -> BlockResult<()> {
        self.img.close().map_err(block_error)
    }
    fn info(&self) -> Option<ImageInfo> {
        Some(ImageInfo {
            cluster_size: Some(self.img.cluster_size()),
            backing_file: self.backing_name.clone(),
            backing_format: self.backing_fmt.map(str::to_string),
            ..Default::default()
        })
    }
    fn check(&self, repair: Repair) -> BlockResult<CheckResult> {
        self.img.check(repair).map_err(block_error)
    }
}
