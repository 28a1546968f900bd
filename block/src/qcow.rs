//! The `qcow` format driver (qcow version 1): the class (probing by
//! version, creation as qemu-img makes images) and the node, which adapts
//! [`formats::qcow`] to the graph: a `file` child, the backing file the
//! header names, the asynchronous mapped data path for plain images, and
//! legacy AES images read (and written) synchronously with the key from
//! `encrypt.key-secret`, with a warning that the encryption is insecure.

use crate::driver::{BlockDriver, Completion, Extent, IoRequest, Limits};
use crate::error::{BlockError, BlockResult};
use crate::format::{
    block_error, open_backing, ChildStorage, CreateOpts, DriverClass, DriverKind, ImageInfo,
    NodeStorage, OptSpec, OptType,
};
use crate::graph::OpenCtx;
use crate::mapped::first_run_status;
use crate::mapped::{read_vectored_by, submit_mapped, write_vectored_by, Mapped, MappedIo};
use crate::node::{Child, Node};
use formats::error::FormatError;
use formats::mapping::GuestMap;
use formats::qcow::{self, CreateOptions, Qcow};
use formats::storage::Storage;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

/// The `qcow` class.
pub struct QcowClass;

const QCOW_OPTS: &[OptSpec] = &[
    crate::format::SIZE,
    OptSpec::new("backing_file", OptType::Str, "File name of a base image"),
    OptSpec::new("backing_fmt", OptType::Str, "Format of the backing image"),
];

fn open_error(e: FormatError) -> BlockError {
    match e {
        FormatError::Io { .. } => block_error(e),
        FormatError::Unsupported(m) => BlockError::Unsupported(m),
        other => BlockError::Open(other.to_string()),
    }
}

impl DriverClass for QcowClass {
    fn name(&self) -> &str {
        "qcow"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }
    fn open(&self, ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        QcowNode::open(ctx)
    }
    fn probe(&self, head: &[u8], _filename: &str) -> u32 {
        qcow::probe(head)
    }
    fn can_compress(&self) -> bool {
        true
    }
    fn create_options(&self) -> &'static [OptSpec] {
        QCOW_OPTS
    }
    fn supports_backing(&self) -> bool {
        true
    }
    fn create_summary(&self, _filename: &str, opts: &CreateOpts) -> BlockResult<String> {
        let mut line = format!("size={}", opts.size().unwrap_or(0));
        if let Some(b) = opts.backing_file() {
            line.push_str(&format!(" backing_file={b}"));
        }
        if let Some(f) = opts.backing_fmt() {
            line.push_str(&format!(" backing_fmt={f}"));
        }
        Ok(line)
    }
    fn create(&self, filename: &str, opts: &CreateOpts) -> BlockResult<()> {
        let o = CreateOptions {
            size: opts.size().unwrap_or(0),
            backing_file: opts.backing_file().map(str::to_string),
        };
        crate::format::create_image(filename, |f| qcow::create(f, &o))
    }
}

/// An open qcow image.
pub struct QcowNode {
    img: Arc<Qcow>,
    file: Arc<Node>,
    backing: Arc<Child>,
    backing_name: Option<String>,
    /// The mapped data path; none for AES images, whose data must pass
    /// through the cipher.
    io: Option<Arc<MappedIo<Mapped<Qcow>>>>,
    /// Whole-sector requests for an AES image.
    sectors: crate::sectors::Sectors,
}

impl QcowNode {
    /// Open from options (`encrypt.key-secret` for AES images).
    pub fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        let mut key = None;
        if let Some(mut enc) = ctx.opts.take_object("encrypt")? {
            if let Some(f) = enc.take_str("format")? {
                if f != "aes" {
                    return Err(BlockError::Open(format!(
                        "{}: qcow images are encrypted with 'aes', not '{f}'",
                        enc.path("format")
                    )));
                }
            }
            if let Some(id) = enc.take_str("key-secret")? {
                let path = enc.path("key-secret");
                key = Some(crate::luks::secret_of(&path, &id)?);
            }
            enc.finish()?;
        }
        let file = ctx.open_child("file")?;
        let name = file.filename().unwrap_or_else(|| file.name().to_string());
        let fs: Arc<dyn Storage> = Arc::new(NodeStorage(file.clone()));
        let (backing_name, aes) = qcow::preview(&name, &*fs).map_err(open_error)?;
        let backing = open_backing(ctx, &name, backing_name.as_deref(), None)?;
        let bs: Option<Arc<dyn Storage>> = Some(Arc::new(ChildStorage(backing.clone())));
        if aes && key.is_none() && !ctx.flags.no_io {
            return Err(BlockError::Open(format!(
                "{name}: Parameter 'encrypt.key-secret' is required for cipher"
            )));
        }
        if aes && !ctx.flags.no_io {
            ctx.graph.warn(format!(
                "warning: {name}: qcow's AES encryption is insecure (it leaks data patterns); convert the image to LUKS"
            ));
        }
        let img = Arc::new(
            Qcow::open(
                &name,
                fs,
                bs,
                ctx.common.read_only,
                key.as_ref().map(|k| k.as_slice()),
            )
            .map_err(open_error)?,
        );
        let io = (!aes).then(|| Mapped::data_path(img.clone(), file.clone(), backing.clone()));
        let node = Arc::new(QcowNode {
            img,
            file,
            backing,
            backing_name,
            io,
            sectors: Default::default(),
        });
        if let Some(io) = &node.io {
            let drv: Arc<dyn BlockDriver> = node.clone();
            io.set_fallback(Arc::downgrade(&drv));
        }
        Ok(node)
    }
}

impl BlockDriver for QcowNode {
    fn driver_name(&self) -> &'static str {
        "qcow"
    }
    fn metadata_in_file(&self) -> bool {
        true
    }
    fn len(&self) -> u64 {
        self.img.size()
    }
    fn limits(&self) -> Limits {
        // AES works on whole sectors.
        Limits {
            request_alignment: if self.img.is_encrypted() { 512 } else { 1 },
            mem_alignment: 1,
        }
    }
    fn filename(&self) -> Option<String> {
        self.file.filename()
    }
    fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        if self.img.is_encrypted() {
            return self
                .sectors
                .read(offset, iov, |o, b| self.img.read(o, b).map_err(block_error));
        }
        read_vectored_by(offset, iov, |o, b| self.img.read(o, b))
    }
    fn write_vectored(&self, offset: u64, iov: &[IoSlice<'_>], fua: bool) -> BlockResult<()> {
        if self.img.is_encrypted() {
            self.sectors.write(
                offset,
                iov,
                |o, b| self.img.read(o, b).map_err(block_error),
                |o, b| self.img.write(o, b).map_err(block_error),
            )?;
            if fua {
                self.img.flush().map_err(block_error)?;
            }
            return Ok(());
        }
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
    fn can_compress(&self) -> bool {
        !self.img.is_encrypted()
    }
    fn write_compressed(&self, offset: u64, data: &[u8]) -> BlockResult<()> {
        self.img.write_compressed(offset, data).map_err(block_error)
    }
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        let map = |o, l| self.img.map_read(o, l);
        let mut e = first_run_status(
            "qcow",
            self.img.size(),
            offset,
            len,
            map,
            &self.file,
            &self.backing,
        )?;
        if self.img.is_encrypted() {
            // The host offset holds ciphertext: no reader may use it.
            e.offset = None;
        }
        Ok(e)
    }
    fn submit(self: Arc<Self>, req: IoRequest, done: Completion) {
        let io = self.io.clone();
        submit_mapped(io.as_ref(), self, req, done)
    }
    fn allocated_size(&self) -> Option<u64> {
        self.file.driver().allocated_size()
    }
    fn info(&self) -> Option<ImageInfo> {
        Some(ImageInfo {
            cluster_size: Some(self.img.cluster_size()),
            backing_file: self.backing_name.clone(),
            encrypted: self.img.is_encrypted(),
            ..Default::default()
        })
    }
}
