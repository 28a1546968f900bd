//! The `vhdx` format driver (Hyper-V VHDX): the class (probing by the
//! `vhdxfile` identifier, creation with qemu-img's `subformat`,
//! `block_size`, `log_size` and `block_state_zero`, and differencing
//! disks with `-b`, which qemu-img lacks) and the node, which adapts
//! [`formats::vhdx`] to the graph: a `file` child, a `backing` slot for
//! a differencing disk's parent (from the options, or the first parent
//! locator path naming a file that exists), the asynchronous data path
//! through [`MappedIo`], and `check` as qemu-img runs it (a log replayed
//! by the read-write open counts as a fixed corruption).

use crate::driver::{BlockDriver, Completion, Extent, IoRequest};
use crate::error::{BlockError, BlockResult};
use crate::format::{
    block_error, resolve_backing, CheckResult, ChildStorage, CreateOpts, DriverClass, DriverKind,
    ImageInfo, NodeStorage, OptSpec, OptType, Repair,
};
use crate::graph::{Backing, OpenCtx};
use crate::mapped::{
    past_end, piece_extent, read_vectored_by, submit_mapped, write_vectored_by, Mapped, MappedIo,
};
use crate::node::{Child, Node};
use crate::vpc::{new_uuid, open_error};
use formats::storage::Storage;
use formats::vhdx::create::{CreateOptions, Parent};
use formats::vhdx::{self, OpenOptions, Piece, Vhdx};
use std::cell::Cell;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

/// How deep a chain of differencing disks may go (a loop ends here).
const MAX_CHAIN: usize = 64;

thread_local! {
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// The `vhdx` class.
pub struct VhdxClass;

const VHDX_OPTS: &[OptSpec] = &[
    OptSpec::new("size", OptType::Size, "Virtual disk size; max of 64TB."),
    OptSpec::new("log_size", OptType::Size, "Log size; min 1MB."),
    OptSpec::new(
        "block_size",
        OptType::Size,
        "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size.",
    ),
    OptSpec::new(
        "subformat",
        OptType::Str,
        "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'.",
    ),
    OptSpec::new(
        "block_state_zero",
        OptType::Bool,
        "Force use of payload blocks of type 'ZERO'. Non-standard, but default.  Do not set to 'off' when using 'qemu-img convert' with subformat=dynamic.",
    ),
    // Differencing disks (not in qemu-img, so not in its help).
    OptSpec::new("backing_file", OptType::Str, ""),
    OptSpec::new("backing_fmt", OptType::Str, ""),
];

fn bad(filename: &str, m: impl std::fmt::Display) -> BlockError {
    BlockError::Invalid(format!("{filename}: {m}"))
}

fn guids() -> [[u8; 16]; 2] {
    [new_uuid(), new_uuid()]
}

impl VhdxClass {
    fn options(&self, filename: &str, opts: &CreateOpts) -> BlockResult<CreateOptions> {
        let fixed = match opts.str("subformat") {
            None | Some("dynamic") => false,
            Some("fixed") => true,
            Some(v) => {
                return Err(bad(
                    filename,
                    format_args!("Parameter 'subformat' does not accept value '{v}'"),
                ))
            }
        };
        let parent = match opts.backing_file() {
            Some(b) => Some(self.parent(filename, b, opts.backing_fmt())?),
            None => None,
        };
        let o = CreateOptions {
            size: opts.size().unwrap_or(0),
            block_size: opts.num("block_size").unwrap_or(0),
            log_size: opts.num("log_size").unwrap_or(1 << 20),
            fixed,
            block_state_zero: opts.bool("block_state_zero").unwrap_or(true),
            parent,
            guids: [new_uuid(), new_uuid(), new_uuid()],
            creator: format!("Strata v{}", env!("CARGO_PKG_VERSION")),
        };
        vhdx::create::validate(&o).map_err(|e| bad(filename, e))?;
        Ok(o)
    }

    /// The parent of a differencing disk `filename` named `backing`.
    fn parent(&self, filename: &str, backing: &str, fmt: Option<&str>) -> BlockResult<Parent> {
        if fmt.is_some_and(|f| f != "vhdx") {
            return Err(bad(
                filename,
                "the parent of a differencing VHDX must be a vhdx image",
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
        let pv = vhdx::preview(&NodeStorage(node), &path).map_err(|e| {
            bad(
                filename,
                format_args!("the parent of a differencing VHDX must be a vhdx image ({e})"),
            )
        })?;
        let absolute = std::fs::canonicalize(&path)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or(path.clone());
        Ok(Parent {
            size: pv.meta.size,
            logical_sector: pv.meta.logical_sector,
            data_write_guid: pv.header.data_write_guid,
            relative: if backing.starts_with('/') {
                absolute.clone()
            } else {
                backing.to_string()
            },
            absolute,
        })
    }
}

impl DriverClass for VhdxClass {
    fn name(&self) -> &str {
        "vhdx"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }
    fn open(&self, ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        VhdxNode::open(ctx)
    }
    fn probe(&self, head: &[u8], _filename: &str) -> u32 {
        if head.starts_with(vhdx::layout::FILE_SIGNATURE) {
            100
        } else {
            0
        }
    }
    fn create_options(&self) -> &'static [OptSpec] {
        VHDX_OPTS
    }
    fn supports_backing(&self) -> bool {
        true
    }
    /// qemu-img's line (log_size and block_size always appear); like
    /// qemu-img, the options are checked after it is printed.
    fn create_summary(&self, _filename: &str, opts: &CreateOpts) -> BlockResult<String> {
        let mut line = format!(
            "size={} log_size={} block_size={}",
            opts.size().unwrap_or(0),
            opts.num("log_size").unwrap_or(1 << 20),
            opts.num("block_size").unwrap_or(0)
        );
        if let Some(b) = opts.backing_file() {
            line.push_str(&format!(" backing_file={b}"));
        }
        if let Some(f) = opts.backing_fmt() {
            line.push_str(&format!(" backing_fmt={f}"));
        }
        if let Some(s) = opts.str("subformat") {
            line.push_str(&format!(" subformat={s}"));
        }
        if let Some(z) = opts.bool("block_state_zero") {
            line.push_str(&format!(
                " block_state_zero={}",
                if z { "on" } else { "off" }
            ));
        }
        Ok(line)
    }
    fn create(&self, filename: &str, opts: &CreateOpts) -> BlockResult<()> {
        let o = self.options(filename, opts)?;
        crate::format::create_image(filename, |f| vhdx::create::create(f, &o))
    }
}

/// An open VHDX image.
pub struct VhdxNode {
    img: Arc<Vhdx>,
    file: Arc<Node>,
    backing: Arc<Child>,
    /// The parent as the image names it (differencing disks).
    parent_name: Option<String>,
    io: Arc<MappedIo<Mapped<Vhdx>>>,
}

impl VhdxNode {
    /// Open from options.
    pub fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        let file = ctx.open_child("file")?;
        let name = file.filename().unwrap_or_else(|| file.name().to_string());
        let fs: Arc<dyn Storage> = Arc::new(NodeStorage(file.clone()));
        let pv = vhdx::preview(&*fs, &name).map_err(open_error)?;
        let mut parent_name = None;
        let backing = if pv.meta.has_parent {
            let paths = pv.meta.parent_paths();
            parent_name = paths.first().cloned();
            let node = match ctx.take_backing()? {
                Backing::None => None,
                Backing::Node(n) => Some(n),
                Backing::Default if ctx.flags.no_backing => None,
                Backing::Default => {
                    let found = paths
                        .iter()
                        .find(|p| std::path::Path::new(&resolve_backing(&name, p)).exists());
                    let Some(p) = found.or(paths.first()) else {
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
                    let r = ctx.graph.open_image(&path, Some("vhdx"), true, &[]);
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
            guids: guids(),
        };
        let img = Arc::new(Vhdx::open(&name, fs, bs, &o).map_err(open_error)?);
        let io = Mapped::data_path(img.clone(), file.clone(), backing.clone());
        let node = Arc::new(VhdxNode {
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
        // A fixed disk's blocks are whatever its file holds there: the
        // file's holes read as zeroes.
        let fixed = self.img.metadata().leave_allocated;
        piece_extent(p, len, &self.file, fixed, &self.backing)
    }
}

impl BlockDriver for VhdxNode {
    fn driver_name(&self) -> &'static str {
        "vhdx"
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
            // QEMU's `vhdx_get_info`: the block size, nothing specific.
            cluster_size: Some(self.img.block_size()),
            backing_file: self.parent_name.clone(),
            ..Default::default()
        })
    }
    fn check(&self, _repair: Repair) -> BlockResult<CheckResult> {
        Ok(self.img.check())
    }
}
