//! The driver class: what the block layer knows about a driver before any
//! node of it is open (QEMU's `BlockDriver` fields that need no
//! `BlockDriverState`): its kind, how well it recognises a file
//! (`probe`), how it opens a node, and how it creates, measures and
//! describes images with typed option tables. The per-node half of QEMU's
//! `BlockDriver` (info, check, amend, snapshots, block status, backing
//! file changes, truncate, child permissions) is [`BlockDriver`] itself,
//! reached through an open node.
//!
//! Every driver has one class in the graph's registry
//! ([`crate::graph::BlockGraph::register_class`]); `driver=NAME`, format
//! probing, `strata-img create -f NAME` and `-o help` all look it up
//! there, so a format is added by writing its class and its node.
//!
//! Where the code lives: a format's logic (on-disk layout, probing
//! magic, create/check/amend algorithms, option validation) is pure code
//! in the `formats` crate over [`formats::storage::Storage`]; its class
//! and node live in `block` and adapt that logic to nodes, options and
//! files. `formats` never depends on `block`.

use crate::driver::BlockDriver;
use crate::error::{BlockError, BlockResult};
use crate::graph::{BlockGraph, OpenCtx};
use crate::keyval::{self, Value};
use crate::node::{Child, Node};
use formats::error::FormatError;
use formats::storage::Storage;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::Arc;

/// What kind of node a driver makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverKind {
    /// Reaches storage itself (`file`, `nbd`, `null-co`): no children.
    Protocol,
    /// Interprets the bytes of a `file` child (`raw`, `qcow2`).
    Format,
    /// Passes requests to its child, adding a policy (`throttle`).
    Filter,
}

impl DriverKind {
    /// The word QEMU's messages use ("Block protocol 'file' ...").
    pub fn word(self) -> &'static str {
        match self {
            DriverKind::Protocol => "protocol",
            DriverKind::Format | DriverKind::Filter => "format",
        }
    }
}

/// The type of a create (or amend) option, as `-o help` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptType {
    /// Free text (a file name, an enumeration the driver checks).
    Str,
    /// `on`/`off` (also `true`/`false`, `yes`/`no`).
    Bool,
    /// A decimal number.
    Number,
    /// A byte count with QEMU's suffixes.
    Size,
}

impl OptType {
    fn help_name(self) -> &'static str {
        match self {
            OptType::Str => "str",
            OptType::Bool => "bool (on/off)",
            OptType::Number => "num",
            OptType::Size => "size",
        }
    }
}

/// One entry of a driver's option table.
#[derive(Clone, Copy, Debug)]
pub struct OptSpec {
    /// The option's name (`cluster_size`).
    pub name: &'static str,
    /// Its type: parsing and `-o help` follow it.
    pub ty: OptType,
    /// One line for `-o help`.
    pub help: &'static str,
}

impl OptSpec {
    /// An entry (for `const` tables).
    pub const fn new(name: &'static str, ty: OptType, help: &'static str) -> Self {
        OptSpec { name, ty, help }
    }
}

/// The options every format with a backing file understands.
pub const BACKING_FILE: OptSpec =
    OptSpec::new("backing_file", OptType::Str, "File name of a base image");
/// See [`BACKING_FILE`].
pub const BACKING_FMT: OptSpec = OptSpec::new(
    "backing_fmt",
    OptType::Str,
    "Image format of the base image",
);
/// The virtual size, which every format takes.
pub const SIZE: OptSpec = OptSpec::new("size", OptType::Size, "Virtual disk size");

/// A parsed option value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptValue {
    /// [`OptType::Str`].
    Str(String),
    /// [`OptType::Bool`].
    Bool(bool),
    /// [`OptType::Number`] and [`OptType::Size`].
    Num(u64),
}

/// Options checked against a driver's table, in the order given (a later
/// value of the same option replaces the earlier one).
#[derive(Clone, Debug, Default)]
pub struct CreateOpts {
    vals: Vec<(&'static str, OptValue)>,
}

impl CreateOpts {
    /// Parse `-o` arguments (each a `key=value,...` list) against
    /// `table`. Unknown keys and values of the wrong type are refused
    /// with a message naming the option.
    pub fn parse(table: &[OptSpec], args: &[String]) -> BlockResult<CreateOpts> {
        let mut o = CreateOpts::default();
        for a in args {
            let m = keyval::parse("-o", a, None)?;
            let mut flat = Vec::new();
            flatten("", m, &mut flat);
            for (k, v) in flat {
                o.set_str(table, &k, &v)?;
            }
        }
        Ok(o)
    }

    /// Set option `key` from its text, checked against `table`.
    pub fn set_str(&mut self, table: &[OptSpec], key: &str, v: &str) -> BlockResult<()> {
        let Some(spec) = table.iter().find(|s| s.name == key) else {
            return Err(invalid(format!("Invalid parameter '{key}'")));
        };
        let val = match spec.ty {
            OptType::Str => OptValue::Str(v.to_string()),
            OptType::Bool => OptValue::Bool(match v {
                "on" | "true" | "yes" => true,
                "off" | "false" | "no" => false,
                _ => return Err(invalid(format!("Parameter '{key}' expects 'on' or 'off'"))),
            }),
            OptType::Number => OptValue::Num(v.parse().map_err(|_| {
                invalid(format!("Parameter '{key}' expects a number: '{v}'"))
            })?),
            OptType::Size => OptValue::Num(keyval::parse_size_str(v, 1).map_err(|_| {
                invalid(format!(
                    "Parameter '{key}' expects a size (a number with an optional k, M, G, T, P or E suffix): '{v}'"
                ))
            })?),
        };
        self.set(spec.name, val);
        Ok(())
    }

    /// Set (or replace) a value without checking it (for values that do
    /// not come from `-o`: the size argument, `-b`, `-F`).
    pub fn set(&mut self, name: &'static str, v: OptValue) {
        self.vals.retain(|(k, _)| *k != name);
        self.vals.push((name, v));
    }

    /// Remove a value.
    pub fn remove(&mut self, name: &str) {
        self.vals.retain(|(k, _)| *k != name);
    }

    /// The value of `name`, if given.
    pub fn get(&self, name: &str) -> Option<&OptValue> {
        self.vals.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }
    /// A string option.
    pub fn str(&self, name: &str) -> Option<&str> {
        match self.get(name) {
            Some(OptValue::Str(s)) => Some(s),
            _ => None,
        }
    }
    /// A boolean option.
    pub fn bool(&self, name: &str) -> Option<bool> {
        match self.get(name) {
            Some(OptValue::Bool(b)) => Some(*b),
            _ => None,
        }
    }
    /// A number or size option.
    pub fn num(&self, name: &str) -> Option<u64> {
        match self.get(name) {
            Some(OptValue::Num(n)) => Some(*n),
            _ => None,
        }
    }
    /// Names given, in order.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.vals.iter().map(|(k, _)| *k)
    }
    /// The virtual size (`size`).
    pub fn size(&self) -> Option<u64> {
        self.num("size")
    }
    /// The backing file name (`backing_file`).
    pub fn backing_file(&self) -> Option<&str> {
        self.str("backing_file")
    }
    /// The backing file's format (`backing_fmt`).
    pub fn backing_fmt(&self) -> Option<&str> {
        self.str("backing_fmt")
    }
}

fn flatten(prefix: &str, m: keyval::Map, out: &mut Vec<(String, String)>) {
    for (k, v) in m {
        let key = if prefix.is_empty() {
            k
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Map(sub) => flatten(&key, sub, out),
            Value::Str(s) => out.push((key, s)),
            Value::Null => out.push((key, String::new())),
            Value::List(_) => out.push((key, String::new())),
        }
    }
}

fn invalid(m: String) -> BlockError {
    BlockError::Invalid(m)
}

/// `-o help`: the option table as qemu-img lists it.
pub fn options_help(table: &[OptSpec]) -> String {
    let mut v: Vec<&OptSpec> = table.iter().filter(|s| !s.help.is_empty()).collect();
    v.sort_by_key(|s| s.name);
    let mut out = String::from("Supported options:\n");
    for s in v {
        let head = format!("{}=<{}>", s.name, s.ty.help_name());
        out.push_str(&format!("  {head:<22} - {}\n", s.help));
    }
    out
}

/// What `measure` found: qemu-img's numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measure {
    /// File size the image needs for the source's data.
    pub required: u64,
    /// File size with every cluster allocated.
    pub fully_allocated: u64,
    /// Bytes for the source's persistent bitmaps (`None`: the target
    /// format cannot hold them).
    pub bitmaps: Option<u64>,
}

/// The class side of a driver.
pub trait DriverClass: Send + Sync + 'static {
    /// `driver=` name.
    fn name(&self) -> &str;
    /// Protocol, format or filter.
    fn kind(&self) -> DriverKind;
    /// Open a node (consumes this driver's options from `ctx`).
    fn open(&self, ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>>;
    /// How sure the driver is that a file starting with `head` (at most
    /// [`formats::probe::PROBE_BUF_SIZE`] bytes) and named `filename` is
    /// its format: 0 = not at all, 100 = certain (a magic number).
    fn probe(&self, _head: &[u8], _filename: &str) -> u32 {
        0
    }
    /// The options of `create` (and of `amend`, which refuses those it
    /// cannot change). Empty: the driver cannot create images.
    fn create_options(&self) -> &'static [OptSpec] {
        &[]
    }
    /// Whether open images can change some creation options
    /// ([`BlockDriver::amend`]).
    fn can_amend(&self) -> bool {
        false
    }
    /// Whether images of this format can have a backing file.
    fn supports_backing(&self) -> bool {
        false
    }
    /// Whether compressed writes ([`crate::driver::IoFlags::COMPRESSED`])
    /// can work on this format (an open image may still refuse them).
    fn can_compress(&self) -> bool {
        false
    }
    /// Check `opts` (which hold `size`) before anything is created and
    /// return the `key=value` list qemu-img prints after `fmt=NAME`.
    fn create_summary(&self, _filename: &str, _opts: &CreateOpts) -> BlockResult<String> {
        Err(BlockError::Unsupported(format!(
            "Format driver '{}' does not support image creation",
            self.name()
        )))
    }
    /// Create the image `filename` (and the other files its options
    /// name, resolved against it), under the locks qemu-img takes.
    fn create(&self, _filename: &str, _opts: &CreateOpts) -> BlockResult<()> {
        Err(BlockError::Unsupported(format!(
            "Format driver '{}' does not support image creation",
            self.name()
        )))
    }
    /// Create the empty file a protocol node will open, named by the
    /// protocol file name `name` whose options are `opts` (what
    /// [`crate::filename::parse`] made of it): QEMU's
    /// `bdrv_create_file` for protocols other than `file`. The format
    /// then opens it ([`file_node`]) and sizes it.
    fn create_protocol(&self, _name: &str, _opts: keyval::Map) -> BlockResult<()> {
        Err(BlockError::Unsupported(format!(
            "Protocol driver '{}' does not support image creation",
            self.name()
        )))
    }
    /// The file size an image of `size` bytes made with `opts` needs,
    /// holding the data `src` allocates (none: sized for `size` only).
    fn measure(
        &self,
        _opts: &CreateOpts,
        _size: u64,
        _src: Option<&Arc<Node>>,
    ) -> BlockResult<Measure> {
        Err(BlockError::Unsupported(format!(
            "Block driver '{}' does not support size measurement",
            self.name()
        )))
    }
}

/// A class made of an open function only (tests' drivers, and what
/// [`BlockGraph::register_driver`] registers).
pub struct OpenOnly {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: DriverKind,
    /// Constructor.
    pub open: crate::graph::OpenFn,
}

impl DriverClass for OpenOnly {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> DriverKind {
        self.kind
    }
    fn open(&self, ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        (self.open)(ctx)
    }
}

/// A protocol class that also creates files on its storage (`ssh`,
/// `nfs`): [`DriverClass::create_protocol`] runs `create`.
pub struct ProtocolClass {
    /// Name.
    pub name: &'static str,
    /// Constructor.
    pub open: crate::graph::OpenFn,
    /// Create the empty file a protocol file name names.
    pub create: fn(&str, keyval::Map) -> BlockResult<()>,
}

impl DriverClass for ProtocolClass {
    fn name(&self) -> &str {
        self.name
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }
    fn open(&self, ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        (self.open)(ctx)
    }
    fn create_protocol(&self, name: &str, opts: keyval::Map) -> BlockResult<()> {
        (self.create)(name, opts)
    }
}

/// The built-in drivers' classes.
pub fn builtin() -> Vec<Arc<dyn DriverClass>> {
    use crate::graph::open_file;
    let class = |name: &str, kind, open| {
        Arc::new(OpenOnly {
            name: name.to_string(),
            kind,
            open,
        }) as Arc<dyn DriverClass>
    };
    let protocol = |name, open| class(name, DriverKind::Protocol, open);
    let filter = |name, open| class(name, DriverKind::Filter, open);
    #[allow(unused_mut)] // without librbd
    let mut all = vec![
        protocol("file", |c| open_file(c, false)),
        protocol("host_device", |c| open_file(c, true)),
        protocol("null-co", |c| crate::null::NullNode::open(c, false)),
        protocol("null-aio", |c| crate::null::NullNode::open(c, true)),
        protocol("nbd", crate::nbd::client::NbdNode::open),
        protocol("http", |c| {
            crate::curl::CurlNode::open(c, crate::curl::Proto::Http)
        }),
        protocol("https", |c| {
            crate::curl::CurlNode::open(c, crate::curl::Proto::Https)
        }),
        protocol("ftp", |c| {
            crate::curl::CurlNode::open(c, crate::curl::Proto::Ftp)
        }),
        protocol("ftps", |c| {
            crate::curl::CurlNode::open(c, crate::curl::Proto::Ftps)
        }),
        Arc::new(ProtocolClass {
            name: "ssh",
            open: crate::ssh::SshNode::open,
            create: crate::ssh::create,
        }),
        Arc::new(ProtocolClass {
            name: "nfs",
            open: crate::nfs::NfsNode::open,
            create: crate::nfs::create,
        }),
        protocol("iscsi", crate::iscsi::IscsiNode::open),
        protocol("vvfat", crate::vvfat::VvfatNode::open),
        Arc::new(crate::raw::RawClass),
        Arc::new(crate::qcow2::Qcow2Class),
        Arc::new(crate::vpc::VpcClass),
        Arc::new(crate::vdi::VdiClass),
        Arc::new(crate::vmdk::VmdkClass),
        Arc::new(crate::vhdx::VhdxClass),
        Arc::new(crate::luks::LuksClass),
        Arc::new(crate::qed::QedClass),
        Arc::new(crate::qcow::QcowClass),
        Arc::new(crate::readonly::ReadOnlyClass::<formats::bochs::Bochs>::new()),
        Arc::new(crate::readonly::ReadOnlyClass::<formats::cloop::Cloop>::new()),
        Arc::new(crate::readonly::ReadOnlyClass::<formats::dmg::Dmg>::new()),
        Arc::new(crate::parallels::ParallelsClass),
        filter("blkdebug", crate::blkdebug::BlkdebugNode::open),
        filter("throttle", crate::filters::ThrottleFilter::open),
        filter("copy-on-read", crate::filters::CopyOnRead::open),
    ];
    #[cfg(have_rbd)]
    all.push(Arc::new(crate::rbd::RbdClass));
    all
}

/// The built-in class named `name`.
pub fn class(name: &str) -> Option<Arc<dyn DriverClass>> {
    builtin().into_iter().find(|c| c.name() == name)
}

/// The format of a file starting with `head`: the registered format
/// with the best probe score, else a format the `formats` crate knows
/// but no driver implements (so that opening it fails by name rather
/// than as raw), else `None` (raw).
pub fn probe(classes: &[Arc<dyn DriverClass>], head: &[u8], filename: &str) -> Option<String> {
    let best = classes
        .iter()
        .filter(|c| c.kind() == DriverKind::Format)
        .map(|c| (c.probe(head, filename), c.name()))
        .filter(|(s, _)| *s > 0)
        .max_by_key(|(s, _)| *s);
    match best {
        Some((_, n)) => Some(n.to_string()),
        None => formats::probe::probe(head).map(str::to_string),
    }
}

/// Open the `file` protocol node of `path`, with `cache.direct` and
/// `cache.no-flush` when given.
pub fn file_node(
    g: &BlockGraph,
    path: &str,
    read_only: bool,
    cache: Option<(bool, bool)>,
) -> BlockResult<Arc<Node>> {
    let s = |v: &str| Value::Str(v.into());
    // A protocol file name (`rbd:pool/img`, `ssh://...`) opens that
    // protocol's node, as QEMU's `bdrv_open` of a file name does.
    let mut m = match crate::filename::parse(path) {
        Ok(Some(m)) => m,
        Ok(None) => {
            let mut m = keyval::Map::new();
            m.insert("driver".into(), s("file"));
            m.insert("filename".into(), s(path));
            m
        }
        Err(e) => return Err(BlockError::Open(format!("Could not open '{path}': {e}"))),
    };
    if read_only {
        m.insert("read-only".into(), s("on"));
    }
    if let Some((direct, no_flush)) = cache {
        let mut cm = keyval::Map::new();
        let b = |x: bool| s(if x { "on" } else { "off" });
        cm.insert("direct".into(), b(direct));
        cm.insert("no-flush".into(), b(no_flush));
        m.insert("cache".into(), Value::Map(cm));
    }
    g.open_options(keyval::Options::new("file", m), None, false)
        .map_err(|e| BlockError::Open(format!("Could not open '{path}': {e}")))
}

/// Create (or empty) the file `path` for a new image, under the lock
/// qemu-img's file creation takes (write and resize, not sharing
/// resize): refused, leaving the file as it was, while another process
/// uses it. `name` is how messages name the image.
pub fn create_file(name: &str, path: &str) -> BlockResult<()> {
    if let Some(opts) = crate::filename::parse(path)? {
        let driver = match opts.get("driver") {
            Some(Value::Str(d)) => d.clone(),
            _ => return Err(BlockError::Open(format!("{name}: no protocol driver"))),
        };
        let cls = class(&driver).ok_or_else(|| {
            BlockError::Open(format!("{name}: Unknown protocol driver '{driver}'"))
        })?;
        return cls.create_protocol(name, opts).map_err(|e| match e {
            BlockError::Open(m) => BlockError::Open(m),
            e => BlockError::Open(format!("{name}: {e}")),
        });
    }
    #[allow(clippy::suspicious_open_options)] // emptied under the lock below
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .open(path)
        .map_err(|e| {
            BlockError::Open(format!(
                "{name}: Could not create '{path}': {}",
                crate::error::strerror(e.raw_os_error().unwrap_or(libc::EIO))
            ))
        })?;
    let g = BlockGraph::new();
    let f = file_node(&g, path, false, None)?;
    let _h = f
        .attach(
            "create",
            crate::driver::Perms::WRITE.union(crate::driver::Perms::RESIZE),
            crate::driver::Perms::ALL.minus(crate::driver::Perms::RESIZE),
        )
        .map_err(|e| BlockError::Open(format!("{name}: {e}")))?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(0))
        .map_err(|e| BlockError::Open(format!("{name}: Could not resize file: {e}")))
}

/// Creates (or empties) the image file `filename` under qemu-img's locks,
/// lays a new image out on it with `lay_out`, and makes it durable; errors
/// name the file.
pub fn create_image(
    filename: &str,
    lay_out: impl FnOnce(&dyn formats::storage::Storage) -> Result<(), FormatError>,
) -> BlockResult<()> {
    create_file(filename, filename)?;
    let g = BlockGraph::new();
    let f = locked_storage(file_node(&g, filename, false, None)?, filename, true, false)?;
    lay_out(&*f).map_err(|e| BlockError::Open(format!("{filename}: {e}")))?;
    f.flush()
        .map_err(|e| BlockError::Open(format!("{filename}: {e}")))
}

/// The storage of a file that a driver formats or repairs itself (not
/// through an open node of its format), holding the permissions a format
/// node takes on its `file` child, and so the same image locks: a writer
/// uses consistent read, write and resize; a reader consistent read;
/// neither lets others write or resize the file unless `force_share` (a
/// reader's `-U`).
pub struct LockedStorage {
    inner: NodeStorage,
    _perm: crate::node::PermHandle,
}

/// Lock `node` (the file of the image `filename`) for reading or writing
/// as a format node would; refused with QEMU's message while another
/// process holds a conflicting lock.
pub fn locked_storage(
    node: Arc<Node>,
    filename: &str,
    write: bool,
    force_share: bool,
) -> BlockResult<Arc<dyn formats::storage::Storage>> {
    use crate::driver::Perms;
    let perm = if write {
        Perms::CONSISTENT_READ
            .union(Perms::WRITE)
            .union(Perms::RESIZE)
    } else {
        Perms::CONSISTENT_READ
    };
    let shared = if force_share && !write {
        Perms::ALL
    } else {
        Perms::CONSISTENT_READ.union(Perms::WRITE_UNCHANGED)
    };
    let h = node
        .attach("strata-img", perm, shared)
        .map_err(|e| BlockError::Open(format!("Could not open '{filename}': {e}")))?;
    Ok(Arc::new(LockedStorage {
        inner: NodeStorage(node),
        _perm: h,
    }))
}

impl formats::storage::Storage for LockedStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.allocate(offset, len)
    }
}

/// QEMU's `path_combine`: a relative backing file name is relative to the
/// directory of the image that names it; absolute names and protocol
/// prefixes (`nbd:`, `json:`) stay as they are.
pub fn resolve_backing(image: &str, backing: &str) -> String {
    let has_protocol = backing
        .find(':')
        .is_some_and(|i| !backing[..i].contains('/') && i > 0);
    if backing.starts_with('/') || has_protocol || image.starts_with("json:") {
        return backing.to_string();
    }
    match image.rfind('/') {
        Some(i) => format!("{}/{}", &image[..i], backing),
        None => backing.to_string(),
    }
}

/// A node as the format layer's [`formats::storage::Storage`]; reads past its end are zeroes.
pub struct NodeStorage(pub Arc<Node>);

fn to_io(e: BlockError) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

impl Storage for NodeStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = self.0.len();
        if offset >= len {
            buf.fill(0);
            return Ok(());
        }
        let n = ((len - offset) as usize).min(buf.len());
        buf[n..].fill(0);
        self.0
            .read_vectored(offset, &mut [IoSliceMut::new(&mut buf[..n])])
            .map_err(to_io)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.0
            .driver()
            .write_vectored(offset, &[IoSlice::new(buf)], false)
            .map_err(to_io)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush().map_err(to_io)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.driver().truncate(len).map_err(to_io)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0
            .driver()
            .write_zeroes(offset, len, false, false)
            .map_err(to_io)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.driver().discard(offset, len).map_err(to_io)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.0.driver().preallocate(offset, len) {
            Err(BlockError::Unsupported(_)) => {
                let end = offset.saturating_add(len);
                if self.0.len() < end {
                    self.set_len(end)?;
                }
                Ok(())
            }
            r => r.map_err(to_io),
        }
    }
}

/// A child slot as the format layer's [`formats::storage::Storage`]: each call goes to the
/// node in the slot now, and an empty slot is no backing file at all
/// ([`formats::storage::Storage::is_present`]). qcow2's backing file is reached only
/// through this, so replacing the slot's node changes the backing file for
/// the format layer and the driver at once.
pub struct ChildStorage(pub Arc<Child>);

impl ChildStorage {
    fn node(&self) -> io::Result<NodeStorage> {
        self.0
            .get()
            .map(NodeStorage)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))
    }
}

impl Storage for ChildStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self.0.get() {
            Some(n) => NodeStorage(n).read_at(offset, buf),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.node()?.write_at(offset, buf)
    }
    fn flush(&self) -> io::Result<()> {
        match self.0.get() {
            Some(n) => NodeStorage(n).flush(),
            None => Ok(()),
        }
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.get().map_or(0, |n| n.len()))
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.node()?.set_len(len)
    }
    fn is_present(&self) -> bool {
        self.0.get().is_some()
    }
}

/// Format-layer errors as block-layer errors (one line, errno kept).
pub fn block_error(e: FormatError) -> BlockError {
    match e {
        FormatError::Io { errno, context, .. } => BlockError::Io { errno, context },
        FormatError::Unsupported(m) => BlockError::Unsupported(m),
        FormatError::ReadOnly(m) => BlockError::Permission(m),
        FormatError::Corrupt(m) => BlockError::Corrupt(m),
        other => BlockError::Io {
            errno: other.errno(),
            context: other.to_string(),
        },
    }
}

/// One run of an image's map down its backing chain (what `qemu-img
/// map` prints a row of).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainExtent {
    /// Bytes in the run.
    pub len: u64,
    /// Which layer answered: 0 for the image itself.
    pub depth: u64,
    /// Some layer allocates the run.
    pub present: bool,
    /// The run holds data (not a hole).
    pub data: bool,
    /// The run reads as zeroes.
    pub zero: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset, when the layer knows it.
    pub offset: Option<u64>,
    /// The file name of the layer that answered.
    pub file: String,
}

/// Block status of `[off, off+max)` down the backing chain from `n` (at
/// `depth`): the first layer that allocates the run answers, as in
/// qemu-img map; a run no layer allocates reads as zeroes and is not
/// present, with the depth of the last layer that has a backing image
/// under it there (a layer's own depth past the end of its backing
/// image). Unallocated and zero runs keep the host offset the driver
/// reports for clusters that have host space (qemu-img prints it).
pub fn chain_status(n: &Node, off: u64, max: u64, depth: u64) -> BlockResult<ChainExtent> {
    let e = n.block_status(off, max)?;
    let len = e.len.clamp(1, max);
    if !e.allocated {
        // Down the chain while a backing image covers the run; past its
        // end the run reads as zeroes and, as in qemu-img, belongs to this
        // layer (the driver answered zero and no data here).
        if let Some(b) = n.child("backing") {
            if off < b.len() {
                return chain_status(&b, off, len.min(b.len() - off), depth + 1);
            }
        }
    }
    let present = e.allocated;
    Ok(ChainExtent {
        len,
        depth,
        present,
        data: e.data,
        zero: e.zero || !present,
        compressed: e.compressed && present,
        offset: e.offset,
        file: n.filename().unwrap_or_default(),
    })
}

/// A value of an image's format-specific information (QEMU's
/// `ImageInfoSpecific`), rendered as JSON by `info --output=json` and as
/// QEMU's indented dump by `info`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InfoValue {
    /// Text.
    Str(String),
    /// A number.
    Num(u64),
    /// A flag.
    Bool(bool),
    /// A list.
    List(Vec<InfoValue>),
    /// An object, fields in qemu-img's (human output's) order.
    Obj(Vec<(String, InfoValue)>),
}

/// One internal snapshot, as `info` and `snapshot -l` list it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique ID.
    pub id: String,
    /// Name (tag).
    pub name: String,
    /// Size of the saved VM state.
    pub vm_state_size: u64,
    /// Creation time: seconds and nanoseconds since the epoch.
    pub date_sec: u32,
    /// See `date_sec`.
    pub date_nsec: u32,
    /// Guest clock at creation, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count at creation, when recorded.
    pub icount: Option<u64>,
}

/// What `info` shows about an image beyond sizes (QEMU's
/// `BlockDriverInfo` and `ImageInfoSpecific` of one node).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageInfo {
    /// The format's allocation unit, when it has one.
    pub cluster_size: Option<u64>,
    /// The backing file name as the image records it.
    pub backing_file: Option<String>,
    /// The backing file's format as the image records it.
    pub backing_format: Option<String>,
    /// The image was not closed cleanly.
    pub dirty: bool,
    /// The data is encrypted (qemu-img's `encrypted: yes`).
    pub encrypted: bool,
    /// Internal snapshots.
    pub snapshots: Vec<SnapshotInfo>,
    /// `format-specific`: its `type` and its `data` fields.
    pub specific: Option<(String, Vec<(String, InfoValue)>)>,
}

pub use formats::check::{CheckResult, Repair};

thread_local! {
    /// How deep the backing chain being opened on this thread is.
    static BACKING_DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The most images a backing chain may have (a loop ends here).
pub const MAX_BACKING_DEPTH: usize = 1000;

/// The `backing` slot of image `name`, whose header records the backing
/// file `recorded` (a name relative to the image's directory) of format
/// `fmt` (probed when none): what `backing=` gives, else the recorded
/// file opened read-only, nothing with `backing=null` or
/// [`crate::graph::OpenFlags::no_backing`] (QEMU's
/// `bdrv_open_backing_file`).
pub fn open_backing(
    ctx: &mut OpenCtx<'_>,
    name: &str,
    recorded: Option<&str>,
    fmt: Option<&str>,
) -> BlockResult<Arc<Child>> {
    use crate::graph::Backing;
    let node = match ctx.take_backing()? {
        Backing::None => None,
        Backing::Node(n) => Some(n),
        Backing::Default if ctx.flags.no_backing => None,
        Backing::Default => match recorded {
            None => None,
            Some(b) => {
                let depth = BACKING_DEPTH.with(|d| d.get());
                if depth >= MAX_BACKING_DEPTH {
                    return Err(BlockError::Open(format!(
                        "{name}: backing chain too deep (more than {MAX_BACKING_DEPTH} images; is there a loop?)"
                    )));
                }
                let path = resolve_backing(name, b);
                BACKING_DEPTH.with(|d| d.set(depth + 1));
                let r = ctx.graph.open_image(&path, fmt, true, &[]);
                BACKING_DEPTH.with(|d| d.set(depth));
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
    Ok(ctx.add_slot("backing", node))
}
