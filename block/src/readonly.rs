//! The read-only formats' driver: one class and one node for every
//! format that only reads (`bochs`, `cloop`, `dmg`), adapting a
//! [`formats::mapping::ReadOnlyMap`] to the graph. The format supplies
//! its probe, its open and its `info` facts ([`ReadOnlyFormat`]); the
//! node supplies the `file` child, the asynchronous data path (the same
//! [`MappedIo`] as the writable mapped formats), block status and the
//! refusal of writes.

use crate::driver::{BlockDriver, Completion, Extent, IoRequest};
use crate::error::{BlockError, BlockResult};
use crate::format::{block_error, DriverClass, DriverKind, ImageInfo, NodeStorage};
use crate::graph::OpenCtx;
use crate::mapped::first_run_status;
use crate::mapped::{read_vectored_by, submit_mapped, Mapped, MappedIo};
use crate::node::{Child, Node};
use formats::error::{FResult, FormatError};
use formats::mapping::{read_only_read, ReadOnly, ReadOnlyMap};
use formats::storage::Storage;
use std::io::{IoSlice, IoSliceMut};
use std::marker::PhantomData;
use std::sync::Arc;

/// What a read-only format tells the driver beyond its mapping.
pub trait ReadOnlyFormat: ReadOnlyMap + Sized {
    /// The `driver=` name.
    const NAME: &'static str;
    /// How sure the format is that a file starting with `head`, named
    /// `filename`, is one of its images (0 to 100).
    fn probe(head: &[u8], filename: &str) -> u32;
    /// Open the image stored in `file`, named `name` in errors.
    fn open(name: &str, file: Arc<dyn Storage>) -> FResult<Self>;
    /// What `info` shows.
    fn info(&self) -> ImageInfo {
        ImageInfo::default()
    }
}

/// The class of read-only format `F`.
pub struct ReadOnlyClass<F>(PhantomData<fn() -> F>);

impl<F> ReadOnlyClass<F> {
    /// The class.
    pub const fn new() -> Self {
        ReadOnlyClass(PhantomData)
    }
}

impl<F> Default for ReadOnlyClass<F> {
    fn default() -> Self {
        Self::new()
    }
}

impl<F: ReadOnlyFormat> DriverClass for ReadOnlyClass<F> {
    fn name(&self) -> &str {
        F::NAME
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }
    fn open(&self, ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        ReadOnlyNode::<F>::open(ctx)
    }
    fn probe(&self, head: &[u8], filename: &str) -> u32 {
        F::probe(head, filename)
    }
}

/// An open image of read-only format `F`.
pub struct ReadOnlyNode<F: ReadOnlyFormat> {
    name: String,
    img: Arc<ReadOnly<F>>,
    file: Arc<Node>,
    io: Arc<MappedIo<Mapped<ReadOnly<F>>>>,
}

fn open_error(e: FormatError) -> BlockError {
    match e {
        FormatError::Io { .. } => block_error(e),
        FormatError::Unsupported(m) => BlockError::Unsupported(m),
        other => BlockError::Open(other.to_string()),
    }
}

impl<F: ReadOnlyFormat> ReadOnlyNode<F> {
    fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        // These formats are read-only in QEMU too: a writable open is
        // made read-only where auto-read-only allows it.
        if !ctx.common.read_only {
            if ctx.common.auto_read_only {
                ctx.common.read_only = true;
            } else {
                return Err(BlockError::Open(format!(
                    "the {} format is read-only (use read-only=on)",
                    F::NAME
                )));
            }
        }
        let file = ctx.open_child("file")?;
        let name = file.filename().unwrap_or_else(|| file.name().to_string());
        let fs: Arc<dyn Storage> = Arc::new(NodeStorage(file.clone()));
        let img = Arc::new(ReadOnly(F::open(&name, fs).map_err(open_error)?));
        let io = Mapped::data_path(img.clone(), file.clone(), Child::new("backing", None));
        let node = Arc::new(ReadOnlyNode {
            name,
            img,
            file,
            io,
        });
        let drv: Arc<dyn BlockDriver> = node.clone();
        node.io.set_fallback(Arc::downgrade(&drv));
        Ok(node)
    }
}

impl<F: ReadOnlyFormat> BlockDriver for ReadOnlyNode<F> {
    /// A read-only format: nobody changes the image under it.
    fn migration_blocker(&self, _node: &str) -> Option<String> {
        None
    }
    fn driver_name(&self) -> &'static str {
        F::NAME
    }
    fn metadata_in_file(&self) -> bool {
        true
    }
    fn len(&self) -> u64 {
        self.img.0.size()
    }
    fn filename(&self) -> Option<String> {
        self.file.filename()
    }
    fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        let file = NodeStorage(self.file.clone());
        read_vectored_by(offset, iov, |o, b| {
            read_only_read(&self.img, &self.name, &file, o, b)
        })
    }
    fn write_vectored(&self, _offset: u64, _iov: &[IoSlice<'_>], _fua: bool) -> BlockResult<()> {
        Err(BlockError::ReadOnly(self.name.clone()))
    }
    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        let none = Child::new("backing", None);
        let map = |o, l| self.img.0.map_read(o, l);
        first_run_status(
            &self.name,
            self.img.0.size(),
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
    fn info(&self) -> Option<ImageInfo> {
        Some(self.img.0.info())
    }
}

impl ReadOnlyFormat for formats::bochs::Bochs {
    const NAME: &'static str = "bochs";
    fn probe(head: &[u8], _filename: &str) -> u32 {
        formats::bochs::probe(head)
    }
    fn open(name: &str, file: Arc<dyn Storage>) -> FResult<Self> {
        Self::open(name, file)
    }
}

impl ReadOnlyFormat for formats::cloop::Cloop {
    const NAME: &'static str = "cloop";
    fn probe(head: &[u8], _filename: &str) -> u32 {
        formats::cloop::probe(head)
    }
    fn open(name: &str, file: Arc<dyn Storage>) -> FResult<Self> {
        Self::open(name, file)
    }
}

impl ReadOnlyFormat for formats::dmg::Dmg {
    const NAME: &'static str = "dmg";
    /// UDIF has no magic at the start: QEMU goes by the file name.
    fn probe(_head: &[u8], filename: &str) -> u32 {
        formats::dmg::probe(filename)
    }
    fn open(name: &str, file: Arc<dyn Storage>) -> FResult<Self> {
        Self::open(name, file)
    }
}
