//! The `vpc` format driver (VHD): the class (probing by the footer
//! cookie at offset 0, creation with qemu-img's `subformat` and
//! `force_size`, and differencing disks with `-b`, which qemu-img lacks)
//! and the node, which adapts [`formats::vpc`] to the graph: a `file`
//! child, a `backing` slot for a differencing disk's parent (from the
//! options, or the first locator naming a file that exists), the
//! `force_size_calc` open option (`chs` or `current_size`), and the
//! asynchronous data path through [`MappedIo`].
//!
//! A fixed disk starts with the guest's data, so probing calls it raw,
//! as QEMU does: it opens as `vpc` only when named.

use crate::driver::{BlockDriver, Completion, Extent, IoRequest};
use crate::error::{BlockError, BlockResult};
use crate::format::{
    block_error, resolve_backing, ChildStorage, CreateOpts, DriverClass, DriverKind, ImageInfo,
    NodeStorage, OptSpec, OptType,
};
use crate::graph::{Backing, OpenCtx};
use crate::mapped::{
    past_end, piece_extent, read_vectored_by, submit_mapped, write_vectored_by, Mapped, MappedIo,
};
use crate::node::{Child, Node};
use formats::error::FormatError;
use formats::storage::Storage;
use formats::vpc::create::{CreateOptions, Parent};
use formats::vpc::footer::{DiskType, SizeCalc};
use formats::vpc::{self, OpenOptions, Piece, Vpc};
use std::cell::Cell;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

/// How deep a chain of differencing disks may go (a loop ends here).
const MAX_CHAIN: usize = 64;

thread_local! {
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// The `vpc` class.
pub struct VpcClass;

const VPC_OPTS: &[OptSpec] = &[
    crate::format::SIZE,
    OptSpec::new(
        "subformat",
        OptType::Str,
        "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} ",
    ),
    OptSpec::new(
        "force_size",
        OptType::Bool,
        "Force disk size calculation to use the actual size specified, rather than using the nearest CHS-based calculation",
    ),
    // Differencing disks (not in qemu-img, so not in its help).
    OptSpec::new("backing_file", OptType::Str, ""),
    OptSpec::new("backing_fmt", OptType::Str, ""),
];

pub(crate) fn open_error(e: FormatError) -> BlockError {
    match e {
        FormatError::Io { .. } => block_error(e),
        FormatError::Unsupported(m) => BlockError::Unsupported(m),
        other => BlockError::Open(other.to_string()),
    }
}

/// 16 random bytes as a version 4 UUID.
pub(crate) fn new_uuid() -> [u8; 16] {
    use std::io::Read;
    let mut u = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut u))
        .is_ok();
    if !ok {
        // No entropy device: the time and the process make it unique
        // enough for an image identity.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        u[..16].copy_from_slice(&(t ^ (std::process::id() as u128) << 64).to_le_bytes());
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn bad(filename: &str, m: impl std::fmt::Display) -> BlockError {
    BlockError::Invalid(format!("{filename}: {m}"))
}

impl VpcClass {
    /// `opts` checked: (fixed, force_size).
    fn parse(&self, filename: &str, opts: &CreateOpts) -> BlockResult<(bool, bool)> {
        let fixed = match opts.str("subformat") {
            None | Some("dynamic") => false,
            Some("fixed") => true,
            Some(v) => return Err(bad(filename, format_args!("Invalid subformat '{v}'"))),
        };
        if fixed && opts.backing_file().is_some() {
            return Err(bad(filename, "A fixed VHD cannot have a parent"));
        }
        Ok((fixed, opts.bool("force_size").unwrap_or(false)))
    }

    /// The parent of a differencing disk `filename` named `backing`.
    fn parent(&self, filename: &str, backing: &str, fmt: Option<&str>) -> BlockResult<Parent> {
        if fmt.is_some_and(|f| f != "vpc") {
            return Err(bad(
                filename,
                "the parent of a differencing VHD must be a vpc image",
            ));
        }
        let path = resolve_backing(filename, backing);
        let g = crate::graph::BlockGraph::new();
        let node = crate::format::file_node(&g, &path, true, None)?;
        let _h = node
            .attach(
                "create",
                crate::driver::Perms::CONSISTENT_READ,
                crate::driver::Perms::ALL,
            )
            .map_err(|e| BlockError::Open(format!("Could not open '{path}': {e}")))?;
        let fs = NodeStorage(node.clone());
        let pv = vpc::preview(&fs, &path).map_err(|e| {
            bad(
                filename,
                format_args!("the parent of a differencing VHD must be a vpc image ({e})"),
            )
        })?;
        let img = Vpc::open(
            &path,
            Arc::new(NodeStorage(node)),
            None,
            &OpenOptions {
                read_only: true,
                size_calc: SizeCalc::Auto,
            },
        )
        .map_err(open_error)?;
        let meta = std::fs::metadata(&path)
            .map_err(|e| BlockError::Open(format!("Could not open '{path}': {e}")))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let absolute = std::fs::canonicalize(&path)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or(path.clone());
        Ok(Parent {
            footer: pv.footer,
            size: img.size(),
            block_size: pv.header.map(|h| h.block_size),
            mtime,
            relative: if backing.starts_with('/') {
                absolute.clone()
            } else {
                backing.to_string()
            },
            absolute,
        })
    }
}

impl DriverClass for VpcClass {
    fn name(&self) -> &str {
        "vpc"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }
    fn open(&self, ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        VpcNode::open(ctx)
    }
    fn probe(&self, head: &[u8], _filename: &str) -> u32 {
        if vpc::footer::Footer::has_cookie(head) {
            100
        } else {
            0
        }
    }
    fn create_options(&self) -> &'static [OptSpec] {
        VPC_OPTS
    }
    fn supports_backing(&self) -> bool {
        true
    }
    fn create_summary(&self, filename: &str, opts: &CreateOpts) -> BlockResult<String> {
        let (_, force) = self.parse(filename, opts)?;
        let size = opts.size().unwrap_or(0);
        if opts.backing_file().is_none() {
            vpc::footer::create_geometry(size, force).map_err(|e| bad(filename, e))?;
        }
        let mut line = format!("size={size}");
        if let Some(b) = opts.backing_file() {
            line.push_str(&format!(" backing_file={b}"));
        }
        if let Some(f) = opts.backing_fmt() {
            line.push_str(&format!(" backing_fmt={f}"));
        }
        if let Some(s) = opts.str("subformat") {
            line.push_str(&format!(" subformat={s}"));
        }
        if let Some(f) = opts.bool("force_size") {
            line.push_str(&format!(" force_size={}", if f { "on" } else { "off" }));
        }
        Ok(line)
    }
    fn create(&self, filename: &str, opts: &CreateOpts) -> BlockResult<()> {
        let (fixed, force_size) = self.parse(filename, opts)?;
        let parent = match opts.backing_file() {
            Some(b) => Some(self.parent(filename, b, opts.backing_fmt())?),
            None => None,
        };
        let o = CreateOptions {
            size: opts.size().unwrap_or(0),
            fixed,
            force_size,
            parent,
            uuid: new_uuid(),
            now: now(),
        };
        vpc::create::created_size(&o).map_err(|e| bad(filename, e))?;
        crate::format::create_image(filename, |f| vpc::create::create(f, &o))
    }
}

/// [`formats::vpc`] as a [`MappingFormat`]: it tells [`MappedIo`] when
/// An open VHD.
pub struct VpcNode {
    img: Arc<Vpc>,
    file: Arc<Node>,
    backing: Arc<Child>,
    /// The parent as the image names it (differencing disks).
    parent_name: Option<String>,
    io: Arc<MappedIo<Mapped<Vpc>>>,
}

impl VpcNode {
    /// Open from options.
    pub fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        let file = ctx.open_child("file")?;
        let size_calc = match ctx.opts.take_str("force_size_calc")? {
            None => SizeCalc::Auto,
            Some(v) => SizeCalc::parse(&v)
                .ok_or_else(|| BlockError::Open(format!("Invalid size calculation mode: '{v}'")))?,
        };
        let name = file.filename().unwrap_or_else(|| file.name().to_string());
        let fs: Arc<dyn Storage> = Arc::new(NodeStorage(file.clone()));
        let pv = vpc::preview(&*fs, &name).map_err(open_error)?;
        let mut parent_name = None;
        let backing = if pv.kind == DiskType::Differencing {
            parent_name = pv.parents.first().cloned();
            let node = match ctx.take_backing()? {
                Backing::None => None,
                Backing::Node(n) => Some(n),
                Backing::Default if ctx.flags.no_backing => None,
                Backing::Default => {
                    // The first locator that names a file here.
                    let found = pv
                        .parents
                        .iter()
                        .find(|p| std::path::Path::new(&resolve_backing(&name, p)).exists());
                    let Some(p) = found.or(pv.parents.first()) else {
                        return Err(BlockError::Open(format!(
                            "{name}: the differencing disk names no parent"
                        )));
                    };
                    parent_name = Some(p.clone());
                    let path = resolve_backing(&name, p);
                    let depth = DEPTH.with(|d| d.get());
                    if depth >= MAX_CHAIN {
                        return Err(BlockError::Open(format!(
                            "{name}: backing chain too deep (more than {MAX_CHAIN} images; is there a loop?)"
                        )));
                    }
                    DEPTH.with(|d| d.set(depth + 1));
                    let r = ctx.graph.open_image(&path, Some("vpc"), true, &[]);
                    DEPTH.with(|d| d.set(depth));
                    let n = r.map_err(|e| {
                        let m = e.to_string();
                        BlockError::Open(format!(
                            "Could not open backing file: {}",
                            m.strip_prefix("Could not open backing file: ")
                                .unwrap_or(&m)
                        ))
                    })?;
                    let _ = ctx.graph.take_warnings();
                    Some(n)
                }
            };
            ctx.add_slot("backing", node)
        } else {
            Child::new("backing", None)
        };
        let bs: Option<Arc<dyn Storage>> = Some(Arc::new(ChildStorage(backing.clone())));
        let o = OpenOptions {
            read_only: ctx.common.read_only,
            size_calc,
        };
        let img = Arc::new(Vpc::open(&name, fs, bs, &o).map_err(open_error)?);
        let io = Mapped::data_path(img.clone(), file.clone(), backing.clone());
        let node = Arc::new(VpcNode {
            img,
            file,
            backing,
            parent_name,
            io,
        });
        let drv: Arc<dyn BlockDriver> = node.clone();
        node.io.set_fallback(Arc::downgrade(&drv));
        Ok(node)
    }

    fn extent(&self, p: Piece, len: u64) -> BlockResult<Extent> {
        let fixed = self.img.kind() == DiskType::Fixed;
        piece_extent(p, len, &self.file, fixed, &self.backing)
    }
}

impl BlockDriver for VpcNode {
    fn driver_name(&self) -> &'static str {
        "vpc"
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
        self.extent(p, p.len)
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
            // QEMU's `vpc_get_info`: dynamic disks have a cluster size.
            cluster_size: self.img.block_size(),
            backing_file: self.parent_name.clone(),
            ..Default::default()
        })
    }
}
