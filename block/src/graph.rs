//! The block graph: opening nodes from `-blockdev` options (dotted or JSON),
//! node-names, children by reference or inline, backing plumbing, format
//! probing, and the driver registry.
//!
//! Follows QEMU's `blockdev-add` semantics (QAPI `BlockdevOptions`): every
//! node has a `driver` and generic options (`node-name`, `read-only`,
//! `auto-read-only`, `force-share`, `cache.direct`, `cache.no-flush`,
//! `discard`, `detect-zeroes`); format and filter drivers name their
//! children (`file`, `image`, `backing`), each given as a node-name
//! reference or an inline definition, which inherits the cache, read-only
//! and discard options of its parent unless it sets them itself.
//!
//! Driver registry: one [`DriverClass`] per driver name, the built-in ones
//! ([`crate::format::builtin`]: `file`, `host_device`, `nbd`, `null-co`,
//! `null-aio`, `raw`, `qcow2`, `blkdebug`, `throttle`, `copy-on-read`) and
//! any added with [`BlockGraph::register_class`]. Probing asks every
//! format class for its score; messages name a driver's kind from its
//! class. Where format code lives: see [`crate::format`].

use crate::driver::BlockDriver;
use crate::error::{BlockError, BlockResult};
use crate::file::{Aio, FileNode, FileOptions, Locking};
use crate::format::{DriverClass, DriverKind, OpenOnly};
use crate::keyval::{self, ChildRef, KeyvalError, Map, Options, Value};
use crate::node::{Child, DetectZeroes, Node, NodeCommon};
use std::collections::{BTreeMap, HashMap};
use std::io::IoSliceMut;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// A driver constructor.
pub type OpenFn = fn(&mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>>;

/// What a format was told about its backing file.
#[derive(Debug)]
pub enum Backing {
    /// No `backing` option: use what the image header says.
    Default,
    /// `backing: null`: no backing file at all.
    None,
    /// An explicit backing node.
    Node(Arc<Node>),
}

/// How a top-level open is meant (QEMU's `BDRV_O_*` flags that are not
/// options): they apply to the node named, not to its children.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenFlags {
    /// Opened to be checked (QEMU's `BDRV_O_CHECK`): an image marked
    /// corrupt opens read-write for repair, and a dirty one is left for
    /// the check to see rather than repaired at open.
    pub check: bool,
    /// Do not open the backing file the image names (QEMU's
    /// `BDRV_O_NO_BACKING`): for commands that touch metadata only.
    pub no_backing: bool,
    /// Opened to read metadata only (QEMU's `BDRV_O_NO_IO`): `info`. An
    /// encrypted image then opens without its key.
    pub no_io: bool,
}

/// Everything a driver constructor sees.
pub struct OpenCtx<'a> {
    /// The graph (for opening children).
    pub graph: &'a BlockGraph,
    /// Driver-specific options still to be consumed.
    pub opts: Options,
    /// Generic options of the node being opened.
    pub common: NodeCommon,
    /// The node's name (possibly generated).
    pub node_name: String,
    /// The format was probed, not given (raw's sector-0 guard).
    pub probed: bool,
    /// Flags of this open (defaults for children).
    pub flags: OpenFlags,
    children: Vec<Arc<Child>>,
    desc: BTreeMap<String, String>,
    preopened: HashMap<String, Arc<Node>>,
}

impl OpenCtx<'_> {
    /// Open (or look up) the mandatory child `role`.
    pub fn open_child(&mut self, role: &str) -> BlockResult<Arc<Node>> {
        match self.open_optional_child(role)? {
            Some(n) => Ok(n),
            None => Err(BlockError::Config(KeyvalError::Missing {
                option: self.opts.option().to_string(),
                key: self.opts.path(role),
            })),
        }
    }

    /// Open (or look up) the optional child `role`.
    pub fn open_optional_child(&mut self, role: &str) -> BlockResult<Option<Arc<Node>>> {
        if let Some(n) = self.preopened.remove(role) {
            self.children.push(Child::new(role, Some(n.clone())));
            return Ok(Some(n));
        }
        let node = match self.opts.take_child(role)? {
            None | Some(ChildRef::Null) => return Ok(None),
            Some(ChildRef::Reference(name)) => self.graph.get(&name).ok_or_else(|| {
                BlockError::Open(format!("Cannot find device='' nor node-name='{name}'"))
            })?,
            Some(ChildRef::Inline(o)) => self.graph.open_options(o, Some(&self.common), false)?,
        };
        self.children.push(Child::new(role, Some(node.clone())));
        Ok(Some(node))
    }

    /// The `backing` option (for formats with backing files).
    pub fn take_backing(&mut self) -> BlockResult<Backing> {
        match self.opts.take_child("backing")? {
            None => Ok(Backing::Default),
            Some(ChildRef::Null) => Ok(Backing::None),
            Some(ChildRef::Reference(name)) => {
                let n = self.graph.get(&name).ok_or_else(|| {
                    BlockError::Open(format!("Cannot find device='' nor node-name='{name}'"))
                })?;
                self.add_slot("backing", Some(n.clone()));
                Ok(Backing::Node(n))
            }
            Some(ChildRef::Inline(o)) => {
                let mut inherit = self.common.clone();
                inherit.read_only = true;
                let n = self.graph.open_options(o, Some(&inherit), false)?;
                self.add_slot("backing", Some(n.clone()));
                Ok(Backing::Node(n))
            }
        }
    }

    /// Attach a child the driver opened itself (a data file).
    pub fn add_child(&mut self, role: &str, node: Arc<Node>) {
        self.children.push(Child::new(role, Some(node)));
    }

    /// A slot for `role` holding `node`, possibly nothing, which the
    /// driver keeps to reach the child (a format's `backing`: the slot
    /// is what graph changes replace).
    /// The slot already made for `role` (by [`OpenCtx::take_backing`])
    /// is reused.
    pub fn add_slot(&mut self, role: &str, node: Option<Arc<Node>>) -> Arc<Child> {
        if let Some(c) = self.children.iter().find(|c| c.role() == role) {
            let same = match (c.get(), &node) {
                (Some(a), Some(b)) => Arc::ptr_eq(&a, b),
                (None, None) => true,
                _ => false,
            };
            if same {
                return c.clone();
            }
        }
        let c = Child::new(role, node);
        self.children.push(c.clone());
        c
    }

    /// Record a normalised driver option (for graph descriptions).
    pub fn describe(&mut self, key: &str, value: String) {
        self.desc.insert(key.to_string(), value);
    }
}

/// A comparable description of a node and its subtree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeDesc {
    /// The node-name, or `None` when generated.
    pub name: Option<String>,
    /// Driver.
    pub driver: String,
    /// Generic options.
    pub common: NodeCommon,
    /// Normalised driver options.
    pub options: BTreeMap<String, String>,
    /// Children by role.
    pub children: Vec<(String, NodeDesc)>,
}

/// The set of named nodes.
pub struct BlockGraph {
    nodes: Mutex<BTreeMap<String, Arc<Node>>>,
    next_id: AtomicU64,
    drivers: RwLock<HashMap<String, Arc<dyn DriverClass>>>,
    descs: Mutex<HashMap<String, BTreeMap<String, String>>>,
    warnings: Mutex<Vec<String>>,
    /// Load persistent dirty bitmaps from images opened read-write (and
    /// store them back when the node goes), as the VMM does; tools leave
    /// them alone.
    load_bitmaps: std::sync::atomic::AtomicBool,
    /// Nodes open inactive ([`BlockGraph::set_incoming`]).
    incoming: std::sync::atomic::AtomicBool,
}

impl Default for BlockGraph {
    fn default() -> Self {
        Self::new()
    }
}

pub(crate) fn open_file(
    ctx: &mut OpenCtx<'_>,
    host_device: bool,
) -> BlockResult<Arc<dyn BlockDriver>> {
    let filename = ctx.opts.require_str("filename")?;
    let aio = match ctx.opts.take_str("aio")? {
        None => None,
        Some(s) => Some(
            Aio::parse(&s)
                .ok_or_else(|| BlockError::Open(format!("invalid parameter value: {s}")))?,
        ),
    };
    let locking = match ctx
        .opts
        .take_enum("locking", &["auto", "on", "off"])?
        .as_deref()
    {
        Some("on") => Locking::On,
        Some("off") => Locking::Off,
        _ => Locking::Auto,
    };
    for k in [
        "aio-max-batch",
        "drop-cache",
        "x-check-cache-dropped",
        "pr-manager",
    ] {
        let _ = ctx.opts.take_str(k)?;
    }
    let fopts = FileOptions {
        filename: filename.clone(),
        aio,
        locking,
        direct: ctx.common.direct,
        read_only: ctx.common.read_only,
        host_device,
    };
    let node = match FileNode::open(fopts.clone()) {
        Ok(n) => n,
        Err(e) if ctx.common.auto_read_only && !fopts.read_only => {
            // auto-read-only: fall back to read-only when writing is refused.
            let ro = FileOptions {
                read_only: true,
                ..fopts
            };
            let n = FileNode::open(ro).map_err(|_| e)?;
            ctx.common.read_only = true;
            n
        }
        Err(e) => return Err(e),
    };
    ctx.describe("filename", filename);
    ctx.describe("aio", node.aio().name().into());
    ctx.describe("locking", format!("{locking:?}").to_lowercase());
    Ok(Arc::new(node))
}

/// QEMU's identifier rule (`id_wellformed`): a letter first, then letters,
/// digits, `-`, `.`, `_`.
pub fn valid_id(name: &str) -> bool {
    let mut c = name.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic())
        && c.all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '.' | '_'))
}

/// QEMU's node-name rule: an identifier of at most 31 characters.
pub fn valid_node_name(name: &str) -> bool {
    valid_id(name) && name.len() <= 31
}

impl BlockGraph {
    /// A graph with the built-in drivers.
    pub fn new() -> Self {
        let g = BlockGraph {
            nodes: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            drivers: RwLock::new(HashMap::new()),
            descs: Mutex::new(HashMap::new()),
            warnings: Mutex::new(Vec::new()),
            load_bitmaps: std::sync::atomic::AtomicBool::new(false),
            incoming: std::sync::atomic::AtomicBool::new(false),
        };
        for c in crate::format::builtin() {
            g.register_class(c);
        }
        g
    }

    /// Load (and at close store) persistent dirty bitmaps of the images
    /// opened read-write from now on.
    pub fn set_load_bitmaps(&self, on: bool) {
        self.load_bitmaps.store(on, Ordering::Relaxed);
    }

    /// While `on`, every node opened (command line or `blockdev-add`) is
    /// inactive: the process is the destination of a live migration and
    /// the source still owns the images (see `Node::inactive`). The
    /// node's read-only option is kept (a device may attach a writable
    /// drive), but it takes no image locks, its format writes nothing
    /// (qcow2 reads the image read-only), its persistent bitmaps load
    /// only when it becomes active, and writes to it are refused.
    /// [`BlockGraph::activate_all`] ends it.
    pub fn set_incoming(&self, on: bool) {
        self.incoming.store(on, Ordering::Release);
    }

    /// Nodes open inactive (see [`BlockGraph::set_incoming`]); what a
    /// driver's open asks to write nothing.
    pub fn is_incoming(&self) -> bool {
        self.incoming.load(Ordering::Acquire)
    }

    /// Every node reachable from the name table, each once, children
    /// before their parents.
    fn nodes_children_first(&self) -> Vec<Arc<Node>> {
        let roots: Vec<Arc<Node>> = self
            .nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut seen = std::collections::HashSet::new();
        let mut order = Vec::new();
        fn visit(
            n: &Arc<Node>,
            seen: &mut std::collections::HashSet<*const Node>,
            order: &mut Vec<Arc<Node>>,
        ) {
            if !seen.insert(Arc::as_ptr(n)) {
                return;
            }
            for (_, c) in n.children() {
                visit(&c, seen, order);
            }
            order.push(n.clone());
        }
        for n in &roots {
            visit(n, &mut seen, &mut order);
        }
        order
    }

    /// Take every image over, children first (QEMU's
    /// `bdrv_activate_all`): the destination of a live migration once the
    /// machine's state is loaded, or the source after a failed one. Each
    /// node takes its image locks (the usual lock-conflict error while
    /// another process still holds them), its driver reads the image's
    /// metadata again (qcow2: header, L1 and refcount tables, caches) and
    /// becomes writable if the node is, and deferred bitmaps load (a
    /// failure there is a warning, see [`BlockGraph::take_warnings`]).
    /// Stops at the first node that fails (those done stay active; a
    /// second call picks up the rest). On success nodes open active again.
    pub fn activate_all(&self) -> BlockResult<()> {
        for n in self.nodes_children_first() {
            if let Some(w) = n.activate()? {
                self.warn(w);
            }
        }
        self.incoming.store(false, Ordering::Release);
        Ok(())
    }

    /// Hand every image over to another process, parents first (QEMU's
    /// `bdrv_inactivate_all`): the source of a live migration, once its
    /// backends are drained and before the destination activates. Each
    /// writable node stores its persistent bitmaps, its driver writes its
    /// metadata back and marks the image clean, the node is flushed and
    /// its image locks released; from then on writes are refused and
    /// [`BlockGraph::close_all`] writes nothing to it. Stops at the first
    /// error: the migration fails, and [`BlockGraph::activate_all`] takes
    /// the images back.
    pub fn inactivate_all(&self) -> BlockResult<()> {
        for n in self.nodes_children_first().iter().rev() {
            n.inactivate()?;
        }
        Ok(())
    }

    /// Why the images cannot be handed over by live migration: one
    /// message per node whose driver cannot (see
    /// [`crate::driver::BlockDriver::migration_blocker`]). Block jobs and
    /// NBD exports are not known to the graph; see
    /// [`crate::jobs::Jobs::migration_blockers`].
    pub fn migration_blockers(&self) -> Vec<String> {
        self.nodes_children_first()
            .iter()
            .filter_map(|n| n.migration_blocker())
            .collect()
    }

    /// Add (or replace) a format driver made of its constructor only.
    pub fn register_driver(&self, name: &str, f: OpenFn) {
        self.register_class(Arc::new(OpenOnly {
            name: name.to_string(),
            kind: DriverKind::Format,
            open: f,
        }));
    }

    /// Add (or replace) a driver class.
    pub fn register_class(&self, c: Arc<dyn DriverClass>) {
        self.drivers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(c.name().to_string(), c);
    }

    /// The class of driver `name`.
    pub fn class(&self, name: &str) -> Option<Arc<dyn DriverClass>> {
        self.drivers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Every registered class, sorted by name.
    pub fn classes(&self) -> Vec<Arc<dyn DriverClass>> {
        let mut v: Vec<Arc<dyn DriverClass>> = self
            .drivers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
    }

    /// Registered driver names, sorted.
    pub fn driver_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .drivers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Look a node up by name.
    pub fn get(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Names of all nodes (generated ones start with `#`).
    pub fn node_names(&self) -> Vec<String> {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Forget the generated nodes nothing uses any more (only this table
    /// holds them): what a pivot, a stream or a commit left behind, as
    /// QEMU deletes its implicit nodes. Their images close (and store
    /// their persistent bitmaps) as they go.
    pub fn prune_unused(&self) {
        loop {
            let gone: Vec<Arc<Node>> = {
                let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
                let names: Vec<String> = nodes
                    .iter()
                    .filter(|(_, n)| n.is_auto_named() && Arc::strong_count(n) == 1)
                    .map(|(k, _)| k.clone())
                    .collect();
                names.iter().filter_map(|k| nodes.remove(k)).collect()
            };
            if gone.is_empty() {
                return;
            }
            // Dropped outside the table's lock: closing may take time.
            drop(gone);
        }
    }

    /// Close every node at exit, parents before their children, so that
    /// a format writes its metadata and bitmaps into a file that is still
    /// open and is flushed after it (QEMU's `bdrv_close_all`). Nodes are
    /// closed whether or not some thread still holds them: the process
    /// exits without waiting for those. Errors are logged.
    pub fn close_all(&self) {
        // Depth-first, children after parents: post-order, reversed.
        // Inactive nodes close without writing (see `Node::close`).
        let order = self.nodes_children_first();
        for n in order.iter().rev() {
            if let Err(e) = n.close() {
                log::warn!("{}: {e}", n.name());
            }
        }
    }

    /// Remove a node from the name table (it lives on while referenced).
    pub fn remove(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
    }

    /// Record a warning for the caller to print once (a driver's, while
    /// opening).
    pub fn warn(&self, w: String) {
        self.warnings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(w);
    }

    /// Warnings produced while opening (e.g. the raw-probing warning).
    pub fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut *self.warnings.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// `-blockdev` from its command-line text (JSON or dotted).
    pub fn blockdev_add_str(&self, text: &str) -> BlockResult<Arc<Node>> {
        let map = keyval::parse_json_or_dotted("-blockdev", text, None)?;
        self.blockdev_add(map)
    }

    /// `-blockdev` / `blockdev-add` from a parsed tree: `node-name` is
    /// mandatory at the top level.
    pub fn blockdev_add(&self, map: Map) -> BlockResult<Arc<Node>> {
        if !map.contains_key("node-name") {
            return Err(KeyvalError::Missing {
                option: "-blockdev".into(),
                key: "node-name".into(),
            }
            .into());
        }
        self.open_options(Options::new("-blockdev", map), None, false)
    }

    /// Open a node from options. `inherit` carries the parent's generic
    /// options for inline children. With `probe`, a missing `driver` is
    /// guessed from the image contents (the `-drive` behaviour).
    pub fn open_options(
        &self,
        o: Options,
        inherit: Option<&NodeCommon>,
        probe: bool,
    ) -> BlockResult<Arc<Node>> {
        self.open_options_flags(o, inherit, probe, OpenFlags::default())
    }

    /// [`BlockGraph::open_options`] with [`OpenFlags`] for this node.
    pub fn open_options_flags(
        &self,
        mut o: Options,
        inherit: Option<&NodeCommon>,
        probe: bool,
        flags: OpenFlags,
    ) -> BlockResult<Arc<Node>> {
        let driver = o.take_str("driver")?;
        let name = match o.take_str("node-name")? {
            Some(n) => {
                if !valid_node_name(&n) {
                    return Err(BlockError::Open(format!("Invalid node-name: '{n}'")));
                }
                if self.get(&n).is_some() {
                    return Err(BlockError::Open(format!(
                        "Duplicate nodes with node-name='{n}'"
                    )));
                }
                Some(n)
            }
            None => None,
        };
        let common = parse_common(&mut o, inherit)?;
        let (node_name, auto) = match name {
            Some(n) => (n, false),
            None => (
                format!("#block{:03}", self.next_id.fetch_add(1, Ordering::Relaxed)),
                true,
            ),
        };
        let mut preopened = HashMap::new();
        let mut probed = false;
        let driver = match driver {
            Some(d) => d,
            None if probe => {
                // Open the protocol child first, then look at its first bytes.
                let file = match o.take_child("file")? {
                    Some(ChildRef::Inline(fo)) => self.open_options(fo, Some(&common), false)?,
                    Some(ChildRef::Reference(r)) => self.get(&r).ok_or_else(|| {
                        BlockError::Open(format!("Cannot find device='' nor node-name='{r}'"))
                    })?,
                    _ => {
                        return Err(KeyvalError::Missing {
                            option: o.option().into(),
                            key: "driver".into(),
                        }
                        .into())
                    }
                };
                let mut buf = vec![0u8; formats::probe::PROBE_BUF_SIZE.min(file.len() as usize)];
                file.read_vectored(0, &mut [IoSliceMut::new(&mut buf)])?;
                let fname = file.filename().unwrap_or_default();
                let fmt = crate::format::probe(&self.classes(), &buf, &fname);
                preopened.insert("file".to_string(), file.clone());
                match fmt {
                    Some(f) => f,
                    // QEMU warns only when the guessed raw image can be
                    // written (the warning is about writes to block 0), so
                    // read-only drives and CD-ROMs say nothing.
                    None if common.read_only => {
                        probed = true;
                        "raw".to_string()
                    }
                    None => {
                        probed = true;
                        let fname = file.filename().unwrap_or_else(|| file.name().to_string());
                        let w = format!(
                            "WARNING: Image format was not specified for '{fname}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions."
                        );
                        // Collected, not logged: the caller prints it once.
                        self.warnings
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(w);
                        "raw".to_string()
                    }
                }
            }
            None => {
                return Err(KeyvalError::Missing {
                    option: o.option().into(),
                    key: o.path("driver"),
                }
                .into())
            }
        };
        let class = self
            .class(&driver)
            .ok_or_else(|| BlockError::Open(format!("Unknown driver '{driver}'")))?;
        let mut ctx = OpenCtx {
            graph: self,
            opts: o,
            common,
            node_name: node_name.clone(),
            probed,
            flags,
            children: Vec::new(),
            desc: BTreeMap::new(),
            preopened,
        };
        let drv = class.open(&mut ctx)?;
        let OpenCtx {
            opts,
            common,
            children,
            desc,
            ..
        } = ctx;
        let prefix = format!("{}.", opts.prefix());
        if let Err(e) = opts.finish() {
            let key = match &e {
                KeyvalError::Unknown { key, .. } => {
                    key.strip_prefix(&prefix).unwrap_or(key).to_string()
                }
                other => other.to_string(),
            };
            let kind = class.kind().word();
            return Err(BlockError::Open(format!(
                "Block {kind} '{driver}' doesn't support the option '{key}'"
            )));
        }
        let node = Node::new(node_name.clone(), auto, drv, common, children);
        if self.is_incoming() {
            node.set_inactive_at_open();
        }
        if self.load_bitmaps.load(Ordering::Relaxed) {
            // Deferred to activation while the node is inactive.
            if let Err(e) = node.load_persistent_bitmaps() {
                self.warn(format!(
                    "could not load the dirty bitmaps of '{node_name}': {e}"
                ));
            }
        }
        self.descs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node_name.clone(), desc);
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node_name, node.clone());
        Ok(node)
    }

    /// Open an image file the way `qemu-img` does: `format` given or probed,
    /// on a `file` (or `host_device`, for block devices) protocol node.
    pub fn open_image(
        &self,
        filename: &str,
        format: Option<&str>,
        read_only: bool,
        extra: &[(&str, &str)],
    ) -> BlockResult<Arc<Node>> {
        self.open_image_flags(filename, format, read_only, extra, OpenFlags::default())
    }

    /// [`BlockGraph::open_image`] with [`OpenFlags`] for the image's node.
    pub fn open_image_flags(
        &self,
        filename: &str,
        format: Option<&str>,
        read_only: bool,
        extra: &[(&str, &str)],
        flags: OpenFlags,
    ) -> BlockResult<Arc<Node>> {
        let mut map = Map::new();
        if let Some(json) = filename.strip_prefix("json:") {
            // QEMU's `json:{...}` pseudo-protocol: the whole node tree.
            map = keyval::parse_json_filename("json: filename", json)?;
            if let Some(f) = format {
                map.entry("driver".to_string())
                    .or_insert_with(|| Value::Str(f.into()));
            }
            if read_only {
                map.insert("read-only".into(), Value::Str("on".into()));
            }
            let extra_map = extra_options(extra)?;
            keyval::merge(&mut map, extra_map);
            let probe = !map.contains_key("driver");
            return self.open_options_flags(
                Options::new("json: filename", map),
                None,
                probe,
                flags,
            );
        }
        if let Some(proto_map) = crate::filename::parse(filename)? {
            // `nbd://...`, `null-co://`, `blkdebug:...`: the protocol node
            // the name stands for, under the (given or probed) format.
            map.insert("file".into(), Value::Map(proto_map));
            if let Some(f) = format {
                map.insert("driver".into(), Value::Str(f.into()));
            }
            if read_only {
                map.insert("read-only".into(), Value::Str("on".into()));
            }
            keyval::merge(&mut map, extra_options(extra)?);
            return self.open_options_flags(
                Options::new("image options", map),
                None,
                format.is_none(),
                flags,
            );
        }
        let mut file = Map::new();
        let proto = match std::fs::metadata(filename) {
            Ok(m) if std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) => {
                "host_device"
            }
            _ => "file",
        };
        file.insert("driver".into(), Value::Str(proto.into()));
        file.insert("filename".into(), Value::Str(filename.into()));
        map.insert("file".into(), Value::Map(file));
        if let Some(f) = format {
            map.insert("driver".into(), Value::Str(f.into()));
        }
        if read_only {
            map.insert("read-only".into(), Value::Str("on".into()));
        }
        let extra_map = extra_options(extra)?;
        keyval::merge(&mut map, extra_map);
        self.open_options_flags(
            Options::new("image options", map),
            None,
            format.is_none(),
            flags,
        )
    }

    /// A comparable description of `node`'s subtree.
    pub fn describe(&self, node: &Node) -> NodeDesc {
        let options = self
            .descs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node.name())
            .cloned()
            .unwrap_or_default();
        NodeDesc {
            name: if node.is_auto_named() {
                None
            } else {
                Some(node.name().to_string())
            },
            driver: node.driver_name().to_string(),
            common: node.common().clone(),
            options,
            children: node
                .children()
                .iter()
                .map(|(r, c)| (r.clone(), self.describe(c)))
                .collect(),
        }
    }
}

/// `(dotted key, value)` pairs as a tree.
fn extra_options(extra: &[(&str, &str)]) -> BlockResult<Map> {
    let pairs = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Ok(keyval::Parser::new("image options").build(pairs)?)
}

/// Parse the generic node options, inheriting from `inherit` when absent.
fn parse_common(o: &mut Options, inherit: Option<&NodeCommon>) -> BlockResult<NodeCommon> {
    let base = inherit.cloned().unwrap_or_default();
    let mut c = NodeCommon {
        read_only: o.take_bool("read-only")?.unwrap_or(base.read_only),
        auto_read_only: o
            .take_bool("auto-read-only")?
            .unwrap_or(base.auto_read_only),
        force_share: o.take_bool("force-share")?.unwrap_or(base.force_share),
        direct: base.direct,
        no_flush: base.no_flush,
        discard_unmap: base.discard_unmap,
        detect_zeroes: DetectZeroes::Off,
    };
    if let Some(mut cache) = o.take_object("cache")? {
        if let Some(d) = cache.take_bool("direct")? {
            c.direct = d;
        }
        if let Some(n) = cache.take_bool("no-flush")? {
            c.no_flush = n;
        }
        cache.finish()?;
    }
    if let Some(d) = o.take_enum("discard", &["ignore", "off", "unmap", "on"])? {
        c.discard_unmap = d == "unmap" || d == "on";
    }
    if let Some(d) = o.take_enum("detect-zeroes", &["off", "on", "unmap"])? {
        c.detect_zeroes = DetectZeroes::parse(&d).unwrap_or_default();
        if c.detect_zeroes == DetectZeroes::Unmap && !c.discard_unmap {
            // QEMU: "setting detect-zeroes to unmap is not allowed without
            // setting discard operation to unmap".
            return Err(BlockError::Open(
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".into(),
            ));
        }
    }
    if c.force_share && !c.read_only {
        return Err(BlockError::Open(
            "force-share=on can only be used with read-only images".into(),
        ));
    }
    Ok(c)
}
