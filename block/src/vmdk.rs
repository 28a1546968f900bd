//! The `vmdk` format driver: the class (probing by the sparse magics or
//! a text descriptor's `version=` line, creation of qemu-img's five
//! subformats with its options) and the node, which adapts
//! [`formats::vmdk`] to the graph: a `file` child holding the
//! descriptor, one `extents.N` child per extent file of a separate
//! descriptor (opened relative to the descriptor's directory), a
//! `backing` slot for the parent `parentFileNameHint` names, and the
//! asynchronous data path through [`MappedIo`] when all data lives in
//! one file (multi-extent images run synchronously on the worker pool).

use crate::driver::{BlockDriver, Completion, Extent, IoRequest};
use crate::error::{BlockError, BlockResult};
use crate::format::{
    block_error, resolve_backing, CheckResult, ChildStorage, CreateOpts, DriverClass, DriverKind,
    ImageInfo, InfoValue, NodeStorage, OptSpec, OptType, Repair,
};
use crate::graph::{Backing, OpenCtx};
use crate::keyval::{Map, Options, Value};
use crate::mapped::{
    past_end, piece_extent, read_vectored_by, submit_mapped, write_vectored_by, Mapped, MappedIo,
};
use crate::node::{Child, Node};
use crate::vpc::open_error;
use formats::storage::Storage;
use formats::vmdk::create::{CreateOptions, Subformat};
use formats::vmdk::{self, ExtentFile, OpenOptions, Vmdk};
use std::cell::Cell;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

/// How deep a chain of parents may go (a loop ends here).
const MAX_CHAIN: usize = 64;

thread_local! {
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// The `vmdk` class.
pub struct VmdkClass;

const VMDK_OPTS: &[OptSpec] = &[
    crate::format::SIZE,
    OptSpec::new(
        "adapter_type",
        OptType::Str,
        "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX",
    ),
    OptSpec::new("backing_file", OptType::Str, "File name of a base image"),
    OptSpec::new("backing_fmt", OptType::Str, "Must be 'vmdk' if present"),
    OptSpec::new("compat6", OptType::Bool, "VMDK version 6 image"),
    OptSpec::new("hwversion", OptType::Str, "VMDK hardware version"),
    OptSpec::new("toolsversion", OptType::Str, "VMware guest tools version"),
    OptSpec::new(
        "subformat",
        OptType::Str,
        "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} ",
    ),
    OptSpec::new(
        "zeroed_grain",
        OptType::Bool,
        "Enable efficient zero writes using the zeroed-grain GTE feature",
    ),
];

fn bad(filename: &str, m: impl std::fmt::Display) -> BlockError {
    BlockError::Invalid(format!("{filename}: {m}"))
}

/// QEMU's text-descriptor probe: comments and blank lines, then a
/// `version=1|2|3` line.
fn probe_text(head: &[u8]) -> bool {
    let mut p = 0;
    while p < head.len() {
        match head[p] {
            b'#' => {
                while p < head.len() && head[p] != b'\n' {
                    p += 1;
                }
                p += 1;
            }
            b' ' => {
                while p < head.len() && head[p] == b' ' {
                    p += 1;
                }
                if p < head.len() && head[p] == b'\r' {
                    p += 1;
                }
                if p >= head.len() || head[p] != b'\n' {
                    return false;
                }
                p += 1;
            }
            _ => {
                let rest = &head[p..];
                return [b"1", b"2", b"3"].iter().any(|v| {
                    let mut a = b"version=".to_vec();
                    a.extend_from_slice(*v);
                    let mut lf = a.clone();
                    lf.push(b'\n');
                    a.extend_from_slice(b"\r\n");
                    rest.starts_with(&lf) || rest.starts_with(&a)
                });
            }
        }
    }
    false
}

impl VmdkClass {
    fn parse(&self, filename: &str, opts: &CreateOpts) -> BlockResult<CreateOptions> {
        if opts.backing_fmt().is_some_and(|f| f != "vmdk") {
            return Err(bad(filename, "backing_file must be a vmdk image"));
        }
        let subformat = match opts.str("subformat") {
            None => Subformat::MonolithicSparse,
            Some(s) => Subformat::parse(s)
                .ok_or_else(|| bad(filename, format_args!("invalid parameter value: {s}")))?,
        };
        let o = CreateOptions {
            size: opts.size().unwrap_or(0),
            subformat,
            adapter_type: opts.str("adapter_type").unwrap_or("ide").to_string(),
            hw_version: opts
                .str("hwversion")
                .filter(|v| *v != "undefined")
                .map(str::to_string),
            compat6: opts.bool("compat6").unwrap_or(false),
            tools_version: opts.str("toolsversion").map(str::to_string),
            zeroed_grain: opts.bool("zeroed_grain").unwrap_or(false),
            parent: opts.backing_file().map(|b| (b.to_string(), 0)),
            cid: vmdk::new_cid(),
        };
        vmdk::create::validate(&o).map_err(|e| bad(filename, e))?;
        Ok(o)
    }

    /// The CID of the parent `backing` of `filename`.
    fn parent_cid(&self, filename: &str, backing: &str) -> BlockResult<u32> {
        let path = resolve_backing(filename, backing);
        let g = crate::graph::BlockGraph::new();
        let node = crate::format::file_node(&g, &path, true, None)?;
        let fs = NodeStorage(node);
        let pv = vmdk::preview(&fs, &path).map_err(|e| {
            bad(
                filename,
                format_args!("Invalid backing file format: must be vmdk ({e})"),
            )
        })?;
        Ok(pv.desc.cid)
    }
}

impl DriverClass for VmdkClass {
    fn name(&self) -> &str {
        "vmdk"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }
    fn open(&self, ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        VmdkNode::open(ctx)
    }
    fn probe(&self, head: &[u8], _filename: &str) -> u32 {
        if head.starts_with(vmdk::header::MAGIC_V4)
            || head.starts_with(vmdk::header::MAGIC_V3)
            || probe_text(head)
        {
            100
        } else {
            0
        }
    }
    fn create_options(&self) -> &'static [OptSpec] {
        VMDK_OPTS
    }
    fn supports_backing(&self) -> bool {
        true
    }
    fn can_compress(&self) -> bool {
        true
    }
    fn create_summary(&self, filename: &str, opts: &CreateOpts) -> BlockResult<String> {
        self.parse(filename, opts)?;
        let mut line = format!("size={}", opts.size().unwrap_or(0));
        for k in ["adapter_type", "backing_file", "backing_fmt"] {
            if let Some(v) = opts.str(k) {
                line.push_str(&format!(" {k}={v}"));
            }
        }
        let on = |b: bool| if b { "on" } else { "off" };
        line.push_str(&format!(
            " compat6={}",
            on(opts.bool("compat6").unwrap_or(false))
        ));
        line.push_str(&format!(
            " hwversion={}",
            opts.str("hwversion").unwrap_or("undefined")
        ));
        for k in ["toolsversion", "subformat"] {
            if let Some(v) = opts.str(k) {
                line.push_str(&format!(" {k}={v}"));
            }
        }
        if let Some(z) = opts.bool("zeroed_grain") {
            line.push_str(&format!(" zeroed_grain={}", on(z)));
        }
        Ok(line)
    }
    fn create(&self, filename: &str, opts: &CreateOpts) -> BlockResult<()> {
        let mut o = self.parse(filename, opts)?;
        if let Some((b, _)) = &o.parent {
            let cid = self.parent_cid(filename, b)?;
            o.parent = Some((b.clone(), cid));
        }
        let p = std::path::Path::new(filename);
        let base = p
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = match filename.rfind('/') {
            Some(i) => &filename[..=i],
            None => "",
        };
        let files = vmdk::create::extent_files(&base, &o);
        let text = vmdk::create::descriptor_text(&base, &o, &files);
        let (flat, compress, zeroed) = (
            o.subformat.flat(),
            o.subformat == Subformat::StreamOptimized,
            o.zeroed_grain,
        );
        if files.is_empty() {
            let size = o.size.div_ceil(512) * 512;
            return crate::format::create_image(filename, |f| {
                vmdk::create::init_sparse(f, size, compress, zeroed)?;
                vmdk::create::embed_descriptor(f, &text)
            });
        }
        for (name, size) in &files {
            let path = format!("{dir}{name}");
            crate::format::create_image(&path, |f| {
                if flat {
                    f.set_len(*size)
                        .map_err(|e| formats::error::FormatError::io(e, "Could not resize"))
                } else {
                    vmdk::create::init_sparse(f, *size, false, zeroed)
                }
            })?;
        }
        crate::format::create_image(filename, |f| vmdk::create::write_descriptor(f, &text))
    }
}

/// An open VMDK image.
pub struct VmdkNode {
    img: Arc<Vmdk>,
    file: Arc<Node>,
    /// The data node of each extent (none for ZERO extents).
    ext_nodes: Vec<Option<Arc<Node>>>,
    backing: Arc<Child>,
    parent_name: Option<String>,
    io: Option<Arc<MappedIo<Mapped<Vmdk>>>>,
}

impl VmdkNode {
    /// Open from options.
    pub fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        let file = ctx.open_child("file")?;
        let name = file.filename().unwrap_or_else(|| file.name().to_string());
        let fs: Arc<dyn Storage> = Arc::new(NodeStorage(file.clone()));
        let pv = vmdk::preview(&*fs, &name).map_err(open_error)?;
        // Extent files, relative to the descriptor's directory.
        let mut files = Vec::new();
        let mut nodes: Vec<Option<Arc<Node>>> = Vec::new();
        if !pv.embedded {
            for (i, e) in pv.desc.extents.iter().enumerate() {
                if e.kind == "ZERO" {
                    files.push(None);
                    nodes.push(None);
                    continue;
                }
                let path = resolve_backing(&name, &e.file);
                let mut m = Map::new();
                m.insert("driver".into(), Value::Str("file".into()));
                m.insert("filename".into(), Value::Str(path.clone()));
                if ctx.common.read_only {
                    m.insert("read-only".into(), Value::Str("on".into()));
                }
                let role = format!("extents.{i}");
                let n = ctx
                    .graph
                    .open_options(Options::new(&role, m), Some(&ctx.common), false)
                    .map_err(|er| {
                        BlockError::Open(format!("{name}: Could not open extent '{path}': {er}"))
                    })?;
                ctx.add_child(&role, n.clone());
                files.push(Some(ExtentFile {
                    storage: Arc::new(NodeStorage(n.clone())),
                    name: n.filename().unwrap_or(path),
                }));
                nodes.push(Some(n));
            }
        }
        let mut parent_name = pv.desc.parent_hint.clone();
        let node = match ctx.take_backing()? {
            Backing::None => None,
            Backing::Node(n) => Some(n),
            Backing::Default if ctx.flags.no_backing => None,
            Backing::Default => match &pv.desc.parent_hint {
                None => None,
                Some(p) => {
                    parent_name = Some(p.clone());
                    let path = resolve_backing(&name, p);
                    let depth = DEPTH.with(|d| d.get());
                    if depth >= MAX_CHAIN {
                        return Err(BlockError::Open(format!(
                            "{name}: backing chain too deep (more than {MAX_CHAIN} images; is there a loop?)"
                        )));
                    }
                    DEPTH.with(|d| d.set(depth + 1));
                    let r = ctx.graph.open_image(&path, Some("vmdk"), true, &[]);
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
            },
        };
        let backing = ctx.add_slot("backing", node);
        let bs: Option<Arc<dyn Storage>> = Some(Arc::new(ChildStorage(backing.clone())));
        let o = OpenOptions {
            read_only: ctx.common.read_only,
        };
        let img = Arc::new(Vmdk::open(&name, fs, &pv, files, bs, &o).map_err(open_error)?);
        if pv.embedded {
            nodes = vec![Some(file.clone())];
        }
        let io = match (img.single_file(), nodes.first()) {
            (true, Some(Some(s))) => {
                Some(Mapped::data_path(img.clone(), s.clone(), backing.clone()))
            }
            _ => None,
        };
        let node = Arc::new(VmdkNode {
            img,
            file,
            ext_nodes: nodes,
            backing,
            parent_name,
            io,
        });
        if let Some(io) = &node.io {
            let drv: Arc<dyn BlockDriver> = node.clone();
            io.set_fallback(Arc::downgrade(&drv));
        }
        Ok(node)
    }
}

impl BlockDriver for VmdkNode {
    fn driver_name(&self) -> &'static str {
        "vmdk"
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
        let (i, p) = self.img.block_status_in(offset, len).map_err(block_error)?;
        let node = self.ext_nodes.get(i).cloned().flatten();
        let node = node.as_ref().unwrap_or(&self.file);
        // Flat extents are whatever their file holds (QEMU's RECURSE).
        piece_extent(p, p.len, node, self.img.extent_is_flat(i), &self.backing)
    }
    fn submit(self: Arc<Self>, req: IoRequest, done: Completion) {
        let io = self.io.clone();
        submit_mapped(io.as_ref(), self, req, done)
    }
    fn allocated_size(&self) -> Option<u64> {
        self.file.driver().allocated_size()
    }
    fn reopen(&self, read_only: bool) -> BlockResult<()> {
        self.img.set_read_only(read_only).map_err(open_error)
    }
    fn can_compress(&self) -> bool {
        true
    }
    /// Compressed extents compress every write; others write as usual
    /// (QEMU's vmdk does the same).
    fn write_compressed(&self, offset: u64, data: &[u8]) -> BlockResult<()> {
        self.img.write(offset, data).map_err(block_error)
    }
    fn info(&self) -> Option<ImageInfo> {
        let d = self.img.descriptor();
        let extents = self
            .img
            .extent_info()
            .into_iter()
            .map(|(f, t, len, cs, c)| {
                let mut o = Vec::new();
                if c {
                    o.push(("compressed".to_string(), InfoValue::Bool(true)));
                }
                o.push(("virtual-size".to_string(), InfoValue::Num(len)));
                o.push(("filename".to_string(), InfoValue::Str(f)));
                if let Some(cs) = cs {
                    o.push(("cluster-size".to_string(), InfoValue::Num(cs)));
                }
                o.push(("format".to_string(), InfoValue::Str(t)));
                InfoValue::Obj(o)
            })
            .collect();
        Some(ImageInfo {
            cluster_size: self.img.cluster_size(),
            backing_file: self.parent_name.clone(),
            // QEMU records the parent's format as vmdk.
            backing_format: self.parent_name.as_ref().map(|_| "vmdk".to_string()),
            specific: Some((
                "vmdk".into(),
                vec![
                    ("cid".into(), InfoValue::Num(d.cid as u64)),
                    ("parent-cid".into(), InfoValue::Num(d.parent_cid as u64)),
                    ("create-type".into(), InfoValue::Str(d.create_type.clone())),
                    ("extents".into(), InfoValue::List(extents)),
                ],
            )),
            ..Default::default()
        })
    }
    fn check(&self, repair: Repair) -> BlockResult<CheckResult> {
        if repair != Repair::None {
            return Err(BlockError::Unsupported(
                "This image format does not support checks".into(),
            ));
        }
        Ok(self.img.check())
    }
}
