//! The `qcow2` format driver: a thin adapter from [`formats::qcow2`] to a
//! node with a `file` child, an optional `backing` child (from the options
//! or from the image header, resolved as QEMU resolves relative names) and
//! an optional `data-file` child. Options and defaults are QEMU's
//! (`BlockdevOptionsQcow2`): `l2-cache-size`, `l2-cache-entry-size`,
//! `refcount-cache-size`, `cache-size`, `cache-clean-interval`,
//! `pass-discard-request`/`-snapshot`/`-other`, `lazy-refcounts` (this
//! open only, as in QEMU), `overlap-check` (template or per-kind switches;
//! `all` also checks the snapshots' L2 tables, read once per snapshot
//! change rather than on every write), `data-file`, `backing`.

use crate::driver::{
    run_on_pool, BlockDriver, Completion, Extent, IoFlags, IoOp, IoRequest, Limits,
};
use crate::error::{BlockError, BlockResult};
use crate::format::{
    CheckResult, CreateOpts, DriverClass, DriverKind, ImageInfo, InfoValue, Measure, OptSpec,
    OptType, OptValue, Repair, SnapshotInfo,
};
use crate::graph::OpenCtx;
use crate::keyval::{Map, Options, Value};
use crate::mapped::{AllocPlan, HostData, MapRun, MappedIo, MappingFormat, RunKind, WriteMap};
use crate::node::{Child, Node};
use formats::error::FormatError;
use formats::qcow2::create::{CreateOptions, Prealloc};
use formats::qcow2::crypt::NewCrypt;
use formats::qcow2::io::{Overwrite, WriteData, WritePlan};
use formats::qcow2::l2::Kind;
use formats::qcow2::snapshot::SnapshotRef;
use formats::qcow2::{self, OpenOptions, Qcow2, Ticket};
use formats::storage::Storage;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::{Arc, Mutex};

pub use crate::format::{block_error, ChildStorage, NodeStorage};

fn open_error(e: FormatError) -> BlockError {
    match e {
        FormatError::Io { .. } => block_error(e),
        FormatError::Unsupported(m) => BlockError::Unsupported(m),
        other => BlockError::Open(other.to_string()),
    }
}

/// QEMU's `overlap-check`: a template name (`none`, `constant`,
/// `cached` - the default -, `all`), or an object with `template` and one
/// switch per kind of metadata (`main-header`, `active-l1`, ... as in
/// `BlockdevQcow2OverlapCheckFlags`) that changes the template's choice.
fn overlap_check(opts: &mut Options) -> BlockResult<u32> {
    use formats::qcow2::overlap;
    let allowed = overlap::TEMPLATES;
    if let Some(Value::Map(_)) = opts.map().get("overlap-check") {
        let Some(mut o) = opts.take_object("overlap-check")? else {
            return Ok(overlap::CACHED);
        };
        let t = o.take_enum("template", &allowed)?;
        let mut mask =
            overlap::template(t.as_deref().unwrap_or("cached")).unwrap_or(overlap::CACHED);
        for (key, bit) in overlap::FLAG_NAMES {
            match o.take_bool(key)? {
                Some(true) => mask |= bit,
                Some(false) => mask &= !bit,
                None => {}
            }
        }
        o.finish()?;
        return Ok(mask);
    }
    let t = opts.take_enum("overlap-check", &allowed)?;
    Ok(overlap::template(t.as_deref().unwrap_or("cached")).unwrap_or(overlap::CACHED))
}

pub use crate::format::resolve_backing;

/// The qcow2 class: probing by magic, creation and measurement with
/// qemu-img's `-o` options (the logic is `formats::qcow2::create`).
pub struct Qcow2Class;

const QCOW2_OPTS: &[OptSpec] = &[
    crate::format::BACKING_FILE,
    crate::format::BACKING_FMT,
    OptSpec::new("cluster_size", OptType::Size, "qcow2 cluster size"),
    OptSpec::new(
        "compat",
        OptType::Str,
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    OptSpec::new(
        "compression_type",
        OptType::Str,
        "Compression method used for image cluster compression",
    ),
    OptSpec::new(
        "data_file",
        OptType::Str,
        "File name of an external data file",
    ),
    OptSpec::new(
        "data_file_raw",
        OptType::Bool,
        "The external data file must stay valid as a raw image",
    ),
    OptSpec::new("extended_l2", OptType::Bool, "Extended L2 tables"),
    OptSpec::new("lazy_refcounts", OptType::Bool, "Postpone refcount updates"),
    OptSpec::new(
        "preallocation",
        OptType::Str,
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    OptSpec::new(
        "refcount_bits",
        OptType::Number,
        "Width of a reference count entry in bits",
    ),
    crate::format::SIZE,
    OptSpec::new(
        "encrypt.cipher-alg",
        OptType::Str,
        "Name of encryption cipher algorithm",
    ),
    OptSpec::new(
        "encrypt.cipher-mode",
        OptType::Str,
        "Name of encryption cipher mode",
    ),
    OptSpec::new(
        "encrypt.format",
        OptType::Str,
        "Encrypt the image, format choices: 'aes', 'luks'",
    ),
    OptSpec::new(
        "encrypt.hash-alg",
        OptType::Str,
        "Name of encryption hash algorithm",
    ),
    OptSpec::new(
        "encrypt.iter-time",
        OptType::Number,
        "Time to spend in PBKDF in milliseconds",
    ),
    OptSpec::new(
        "encrypt.ivgen-alg",
        OptType::Str,
        "Name of IV generator algorithm",
    ),
    OptSpec::new(
        "encrypt.ivgen-hash-alg",
        OptType::Str,
        "Name of IV generator hash algorithm",
    ),
    OptSpec::new(
        "encrypt.key-secret",
        OptType::Str,
        "ID of secret providing qcow AES key or LUKS passphrase",
    ),
    OptSpec::new(
        "encryption",
        OptType::Bool,
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    ),
    // Accepted without help, as qemu-img does: ignored.
    OptSpec::new("nocow", OptType::Bool, ""),
];

/// The `encrypt.*` create options, in the order qemu-img's summary line
/// shows them.
const ENCRYPT_OPTS: &[&str] = &[
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "encrypt.iter-time",
];

/// What `create` options other than `amend`'s are: creation only (and
/// every one of [`ENCRYPT_OPTS`]).
const CREATE_ONLY: &[&str] = &[
    "size",
    "backing_file",
    "backing_fmt",
    "data_file",
    "data_file_raw",
    "encryption",
    "cluster_size",
    "preallocation",
    "compression_type",
    "extended_l2",
    "nocow",
];

fn bad_value(v: &str) -> BlockError {
    BlockError::Invalid(format!("Invalid parameter '{v}'"))
}

/// The encryption a create asks for: `encrypt.format`, or the legacy
/// `encryption=on` (AES); its key secret's id is required.
fn encrypt_request(opts: &CreateOpts) -> BlockResult<Option<(&'static str, String)>> {
    let format = match (opts.str("encrypt.format"), opts.bool("encryption")) {
        (Some(_), Some(true)) => {
            return Err(BlockError::Invalid(
                "Options 'encryption' and 'encrypt.format' are mutually exclusive".into(),
            ))
        }
        (Some("luks"), _) => "luks",
        (Some("aes"), _) => "aes",
        (Some(f), _) => {
            return Err(BlockError::Invalid(format!(
                "Parameter 'encrypt.format' does not accept value '{f}'"
            )))
        }
        (None, Some(true)) => "aes",
        (None, _) => {
            if let Some(k) = ENCRYPT_OPTS.iter().find(|k| opts.get(k).is_some()) {
                return Err(BlockError::Invalid(format!(
                    "{k} is given without encrypt.format"
                )));
            }
            return Ok(None);
        }
    };
    if format == "aes" {
        if let Some(k) = ENCRYPT_OPTS[2..].iter().find(|k| opts.get(k).is_some()) {
            return Err(BlockError::Invalid(format!(
                "{k} does not apply to encrypt.format=aes"
            )));
        }
    }
    let id = opts.str("encrypt.key-secret").ok_or_else(|| {
        BlockError::Invalid("Parameter 'encrypt.key-secret' is required for cipher".into())
    })?;
    Ok(Some((format, id.to_string())))
}

/// `opts` as `formats::qcow2` create options (size rounded up to a
/// sector), and the `compat` text as given. An encrypted image gets a
/// placeholder for its LUKS header ([`Qcow2Class::create`] makes it).
fn create_options(opts: &CreateOpts) -> BlockResult<(CreateOptions, Option<String>)> {
    let mut o = CreateOptions::default();
    let mut compat = None;
    o.crypt = match encrypt_request(opts)? {
        Some(("luks", _)) => {
            crate::luks::check_create(&crate::luks::nested_opts(opts, "encrypt."))?;
            Some(NewCrypt::Luks(Vec::new()))
        }
        Some(_) => Some(NewCrypt::Aes),
        None => None,
    };
    if let Some(v) = opts.str("compat") {
        o.version = match v {
            "0.10" | "v2" => 2,
            "1.1" | "v3" => 3,
            _ => return Err(bad_value(v)),
        };
        compat = Some(v.to_string());
    }
    o.backing_file = opts.backing_file().map(str::to_string);
    o.backing_format = opts.backing_fmt().map(str::to_string);
    if let Some(c) = opts.num("cluster_size") {
        o.cluster_size = c;
    }
    if let Some(p) = opts.str("preallocation") {
        o.prealloc = Prealloc::parse(p).ok_or_else(|| bad_value(p))?;
    }
    if let Some(b) = opts.bool("lazy_refcounts") {
        o.lazy_refcounts = b;
    }
    if let Some(b) = opts.bool("extended_l2") {
        o.extended_l2 = b;
    }
    if let Some(n) = opts.num("refcount_bits") {
        o.refcount_bits = u32::try_from(n).map_err(|_| bad_value(&n.to_string()))?;
    }
    if let Some(c) = opts.str("compression_type") {
        o.compression_type = match c {
            "zlib" => 0,
            "zstd" => 1,
            _ => return Err(bad_value(c)),
        };
    }
    o.data_file = opts.str("data_file").map(str::to_string);
    if let Some(b) = opts.bool("data_file_raw") {
        o.data_file_raw = b;
    }
    o.size = opts.size().unwrap_or(0).div_ceil(512) * 512;
    Ok((o, compat))
}

impl DriverClass for Qcow2Class {
    fn name(&self) -> &str {
        "qcow2"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }
    fn open(&self, ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        Qcow2Node::open(ctx)
    }
    /// The magic, and any version but 1 (qcow's): a qcow2 header with a
    /// version Strata cannot read still fails as qcow2, by name.
    fn probe(&self, head: &[u8], _filename: &str) -> u32 {
        match (head.get(..4), head.get(4..8)) {
            (Some(m), Some(v))
                if u32::from_be_bytes([m[0], m[1], m[2], m[3]]) == qcow2::header::MAGIC =>
            {
                if u32::from_be_bytes([v[0], v[1], v[2], v[3]]) == 1 {
                    0
                } else {
                    100
                }
            }
            (Some(m), None)
                if u32::from_be_bytes([m[0], m[1], m[2], m[3]]) == qcow2::header::MAGIC =>
            {
                100
            }
            _ => 0,
        }
    }
    fn create_options(&self) -> &'static [OptSpec] {
        QCOW2_OPTS
    }
    fn supports_backing(&self) -> bool {
        true
    }
    fn can_amend(&self) -> bool {
        true
    }
    fn can_compress(&self) -> bool {
        true
    }
    fn create_summary(&self, filename: &str, opts: &CreateOpts) -> BlockResult<String> {
        let (o, compat) = create_options(opts)?;
        qcow2::create::validate(&o).map_err(|e| BlockError::Invalid(format!("{filename}: {e}")))?;
        let on = |b: bool| if b { "on" } else { "off" };
        let mut line = String::new();
        if opts.bool("encryption") == Some(true) {
            line.push_str("encryption=on ");
        }
        for k in ENCRYPT_OPTS {
            match opts.get(k) {
                Some(OptValue::Str(v)) => line.push_str(&format!("{k}={v} ")),
                Some(OptValue::Num(v)) => line.push_str(&format!("{k}={v} ")),
                _ => {}
            }
        }
        line.push_str(&format!("cluster_size={}", o.cluster_size));
        if let Some(c) = &compat {
            line.push_str(&format!(" compat={c}"));
        }
        line.push_str(&format!(
            " extended_l2={} compression_type={} size={}",
            on(o.extended_l2),
            if o.compression_type == 1 {
                "zstd"
            } else {
                "zlib"
            },
            opts.size().unwrap_or(0)
        ));
        if let Some(b) = &o.backing_file {
            line.push_str(&format!(" backing_file={b}"));
        }
        if let Some(b) = &o.backing_format {
            line.push_str(&format!(" backing_fmt={b}"));
        }
        if let Some(d) = &o.data_file {
            line.push_str(&format!(" data_file={d}"));
        }
        if o.data_file_raw {
            line.push_str(" data_file_raw=on");
        }
        if o.prealloc != Prealloc::Off {
            line.push_str(&format!(" preallocation={}", o.prealloc.name()));
        }
        line.push_str(&format!(
            " lazy_refcounts={} refcount_bits={}",
            on(o.lazy_refcounts),
            o.refcount_bits
        ));
        Ok(line)
    }
    /// Formatted under the locks of a read-write qcow2 node, as qemu-img
    /// opens the new image (and its data file).
    fn create(&self, filename: &str, opts: &CreateOpts) -> BlockResult<()> {
        use crate::format::{create_file, file_node, locked_storage};
        let (mut o, _) = create_options(opts)?;
        qcow2::create::validate(&o).map_err(|e| BlockError::Invalid(format!("{filename}: {e}")))?;
        if let Some(NewCrypt::Luks(blob)) = &mut o.crypt {
            let id = opts.str("encrypt.key-secret").unwrap_or_default();
            let secret = crate::luks::secret_of("encrypt.key-secret", id)?;
            *blob = crate::luks::header_blob(&crate::luks::nested_opts(opts, "encrypt."), &secret)
                .map_err(|e| BlockError::Invalid(format!("{filename}: {e}")))?;
        } else if o.crypt.is_some() {
            let id = opts.str("encrypt.key-secret").unwrap_or_default();
            crate::luks::secret_of("encrypt.key-secret", id)?;
        }
        create_file(filename, filename)?;
        let g = crate::graph::BlockGraph::new();
        let f = locked_storage(file_node(&g, filename, false, None)?, filename, true, false)?;
        let data: Option<Arc<dyn Storage>> = match &o.data_file {
            Some(d) => {
                let p = resolve_backing(filename, d);
                create_file(filename, &p)?;
                Some(locked_storage(
                    file_node(&g, &p, false, None)?,
                    &p,
                    true,
                    false,
                )?)
            }
            None => None,
        };
        qcow2::create::create(filename, f, data, &o)
            .map_err(|e| BlockError::Open(format!("{filename}: {e}")))
    }
    /// The fully allocated size, with the data replaced by the target's
    /// clusters that hold anything the source allocates (across its
    /// backing chain) for the required size.
    fn measure(
        &self,
        opts: &CreateOpts,
        size: u64,
        src: Option<&Arc<Node>>,
    ) -> BlockResult<Measure> {
        for k in ["backing_file", "data_file"] {
            if opts.get(k).is_some() {
                return Err(BlockError::Invalid(format!(
                    "Parameter '{k}' is not supported by measure"
                )));
            }
        }
        let (mut o, _) = create_options(opts)?;
        o.size = size;
        qcow2::create::validate(&o).map_err(|e| BlockError::Invalid(e.to_string()))?;
        let cs = o.cluster_size;
        let vsize = size.div_ceil(cs) * cs;
        let mut used = 0u64;
        let mut bitmaps = None;
        if let Some(root) = src {
            if root.driver().supports_persistent_bitmaps() && o.version >= 3 {
                bitmaps = Some(0);
            }
            let mut off = 0u64;
            while off < size {
                let e = crate::format::chain_status(root, off, size - off, 0)?;
                let len = e.len.clamp(1, size - off);
                if e.present && e.data && !e.zero {
                    // Whole clusters of the target that hold any of it.
                    let a0 = off / cs * cs;
                    let end = (off + len).div_ceil(cs) * cs;
                    used += end - a0;
                    off = end;
                    continue;
                }
                off += len;
            }
            // Runs may share their first cluster with the previous run.
            used = used.min(vsize);
        }
        if matches!(o.prealloc, Prealloc::Full | Prealloc::Falloc) {
            used = vsize;
        }
        let mut full =
            qcow2::create::full_size(size, cs, o.refcount_bits.trailing_zeros(), o.extended_l2);
        if let Some(NewCrypt::Luks(_)) = o.crypt {
            // The LUKS header's clusters.
            let h = crate::luks::header_len(&crate::luks::nested_opts(opts, "encrypt."))?;
            full += h.div_ceil(cs) * cs;
        }
        Ok(Measure {
            required: full - vsize + used,
            fully_allocated: full,
            bitmaps,
        })
    }
}

/// Errors of metadata operations (check, amend, snapshots) with the
/// format's text kept as it is.
fn op_error(e: FormatError) -> BlockError {
    match e {
        FormatError::Io { .. } => block_error(e),
        FormatError::Unsupported(m) => BlockError::Unsupported(m),
        FormatError::ReadOnly(m) => BlockError::Permission(m),
        FormatError::Corrupt(m) => BlockError::Corrupt(m),
        other => BlockError::Invalid(other.to_string()),
    }
}

fn snapshot_info(s: qcow2::snapshot::Snapshot) -> SnapshotInfo {
    SnapshotInfo {
        id: s.id,
        name: s.name,
        vm_state_size: s.vm_state_size,
        date_sec: s.date_sec,
        date_nsec: s.date_nsec,
        vm_clock_nsec: s.vm_clock_nsec,
        icount: s.icount,
    }
}

/// `format-specific` of `info`, fields in qemu-img's human order.
/// `info`'s `encrypt` object: the format, and a LUKS header's fields in
/// qemu-img's order (`format` before `cipher-mode`).
fn encrypt_info(fs: &dyn Storage, h: &qcow2::header::Header, name: &str) -> Option<InfoValue> {
    let s = |v: &str| InfoValue::Str(v.to_string());
    match h.crypt_method {
        qcow2::crypt::METHOD_AES => Some(InfoValue::Obj(vec![("format".into(), s("aes"))])),
        qcow2::crypt::METHOD_LUKS => {
            let lh = qcow2::crypt::luks_header(fs, h, name).ok()?;
            let mut f = crate::luks::luks_fields(&lh);
            let at = f
                .iter()
                .position(|(k, _)| k == "cipher-mode")
                .unwrap_or(f.len());
            f.insert(at, ("format".into(), s("luks")));
            Some(InfoValue::Obj(f))
        }
        _ => None,
    }
}

fn specific_info(
    h: &qcow2::header::Header,
    bitmaps: &[qcow2::bitmap::Bitmap],
    encrypt: Option<InfoValue>,
) -> Vec<(String, InfoValue)> {
    let s = |v: &str| InfoValue::Str(v.to_string());
    let mut d: Vec<(&str, InfoValue)> = vec![
        ("compat", s(if h.version == 2 { "0.10" } else { "1.1" })),
        (
            "compression-type",
            s(if h.version >= 3 && h.compression_type == 1 {
                "zstd"
            } else {
                "zlib"
            }),
        ),
    ];
    if h.version >= 3 {
        d.push(("lazy-refcounts", InfoValue::Bool(h.compatible & 1 != 0)));
        if !bitmaps.is_empty() {
            let list = bitmaps
                .iter()
                .map(|b| {
                    InfoValue::Obj(vec![
                        (
                            "flags".into(),
                            InfoValue::List(b.flag_names().into_iter().map(s).collect()),
                        ),
                        ("name".into(), s(&b.name)),
                        ("granularity".into(), InfoValue::Num(b.granularity())),
                    ])
                })
                .collect();
            d.push(("bitmaps", InfoValue::List(list)));
        }
        d.push(("refcount-bits", InfoValue::Num(h.refcount_bits() as u64)));
        if let Some(e) = encrypt {
            d.push(("encrypt", e));
        }
        d.push(("corrupt", InfoValue::Bool(h.incompatible & 2 != 0)));
        if let Some(df) = &h.data_file {
            d.push(("data-file", s(df)));
            d.push(("data-file-raw", InfoValue::Bool(h.autoclear & 2 != 0)));
        }
        d.push(("extended-l2", InfoValue::Bool(h.extended_l2())));
    } else {
        // qemu-img 10 shows the (fixed) refcount width of version 2 too.
        d.push(("refcount-bits", InfoValue::Num(h.refcount_bits() as u64)));
        if let Some(e) = encrypt {
            d.push(("encrypt", e));
        }
    }
    d.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// An open qcow2 node.
pub struct Qcow2Node {
    img: Arc<Qcow2>,
    file: Arc<Node>,
    /// Where data clusters live: the external data file, or `file`.
    store: Arc<Node>,
    /// The `backing` slot (empty without a backing file).
    backing: Arc<Child>,
    /// The asynchronous data path.
    io: Arc<MappedIo<Qcow2>>,
    /// See [`Qcow2Node::metadata_preallocated`]; decided on first use.
    meta_prealloc: std::sync::OnceLock<bool>,
    /// Persistent bitmaps handed to the block layer by `load_bitmaps`
    /// (None: never asked, so nothing is stored back at close).
    loaded_bitmaps: Mutex<Option<Vec<String>>>,
    /// Whole-sector requests for an encrypted image.
    sectors: crate::sectors::Sectors,
}

impl Qcow2Node {
    /// The format-layer image (for strata-img: info, check, snapshots).
    pub fn image(&self) -> &Qcow2 {
        &self.img
    }

    /// Open from options.
    pub fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        let file = ctx.open_child("file")?;
        let mut o = OpenOptions {
            // An inactive node (the destination of a live migration, while
            // the source still owns the image) must not write the image:
            // no repair of a dirty image, no dirty bit, no autoclear
            // change, no bitmap marked in use. The node itself stays as
            // configured; `activate` makes the image writable.
            read_only: ctx.common.read_only || ctx.graph.is_incoming(),
            allow_corrupt: ctx.flags.check,
            ..Default::default()
        };
        o.l2_cache_size = ctx.opts.take_size("l2-cache-size", 1)?;
        o.l2_cache_entry_size = ctx.opts.take_size("l2-cache-entry-size", 1)?;
        o.refcount_cache_size = ctx.opts.take_size("refcount-cache-size", 1)?;
        o.cache_size = ctx.opts.take_size("cache-size", 1)?;
        if let Some(v) = ctx.opts.take_u64("cache-clean-interval")? {
            o.cache_clean_interval = v;
        }
        o.pass_discard[0] = ctx
            .opts
            .take_bool("pass-discard-request")?
            .unwrap_or(ctx.common.discard_unmap);
        if let Some(v) = ctx.opts.take_bool("pass-discard-snapshot")? {
            o.pass_discard[1] = v;
        }
        if let Some(v) = ctx.opts.take_bool("pass-discard-other")? {
            o.pass_discard[2] = v;
        }
        // For this open only, as in QEMU: the image's compatible bit is
        // changed by `amend`, not by the option.
        o.lazy_refcounts = ctx.opts.take_bool("lazy-refcounts")?;
        o.overlap_check = overlap_check(&mut ctx.opts)?;
        let _ = ctx.opts.take_bool("discard-no-unref")?;
        // `encrypt.format` (checked against the image) and
        // `encrypt.key-secret`, QEMU's BlockdevOptionsQcow2.encrypt.
        let (mut want_format, mut key) = (None, None);
        if let Some(mut enc) = ctx.opts.take_object("encrypt")? {
            if let Some(f) = enc.take_str("format")? {
                want_format = Some((enc.path("format"), f));
            }
            if let Some(id) = enc.take_str("key-secret")? {
                key = Some(crate::luks::secret_of(&enc.path("key-secret"), &id)?);
            }
            enc.finish()?;
        }
        let name = file.filename().unwrap_or_else(|| file.name().to_string());
        let fs: Arc<dyn Storage> = Arc::new(NodeStorage(file.clone()));
        let pv = qcow2::preview(&*fs, &name).map_err(open_error)?;
        let h = pv.header;
        let method = match h.crypt_method {
            qcow2::crypt::METHOD_AES => Some("aes"),
            qcow2::crypt::METHOD_LUKS => Some("luks"),
            _ => None,
        };
        if let Some((path, f)) = &want_format {
            if method != Some(f.as_str()) {
                return Err(BlockError::Open(format!(
                    "{name}: {path}={f} does not match the image's encryption ({})",
                    method.unwrap_or("none")
                )));
            }
        }
        if method.is_some() && key.is_none() && !ctx.flags.no_io {
            return Err(BlockError::Open(format!(
                "{name}: Parameter 'encrypt.key-secret' is required for cipher"
            )));
        }
        if method == Some("aes") && !ctx.flags.no_io {
            ctx.graph.warn(format!(
                "warning: {name}: qcow2's AES encryption is insecure (it leaks data patterns); convert the image to LUKS"
            ));
        }
        // Metadata only (`info`): not unlocked, as QEMU's
        // QCRYPTO_BLOCK_OPEN_NO_IO.
        if !ctx.flags.no_io {
            o.secret = key.map(|k| qcow2::Secret(k.to_vec()));
        }
        // External data file.
        let mut data = ctx.open_optional_child("data-file")?;
        if data.is_none() && h.incompatible & qcow2::header::INCOMPAT_DATA_FILE != 0 {
            let Some(df) = &h.data_file else {
                return Err(BlockError::Open(format!(
                    "{name}: Missing data_file option; the image has an external data file but no name for it"
                )));
            };
            let path = resolve_backing(&name, df);
            let mut m = Map::new();
            m.insert("driver".into(), Value::Str("file".into()));
            m.insert("filename".into(), Value::Str(path.clone()));
            if ctx.common.read_only {
                m.insert("read-only".into(), Value::Str("on".into()));
            }
            let n = ctx
                .graph
                .open_options(Options::new("data-file", m), Some(&ctx.common), false)
                .map_err(|e| {
                    BlockError::Open(format!("{name}: Could not open data file '{path}': {e}"))
                })?;
            ctx.add_child("data-file", n.clone());
            data = Some(n);
        }
        // Backing file.
        let backing = crate::format::open_backing(
            ctx,
            &name,
            h.backing_file.as_deref(),
            h.backing_format.as_deref(),
        )?;
        let store = data.clone().unwrap_or_else(|| file.clone());
        let ds: Option<Arc<dyn Storage>> =
            data.map(|d| Arc::new(NodeStorage(d)) as Arc<dyn Storage>);
        let bs: Option<Arc<dyn Storage>> = Some(Arc::new(ChildStorage(backing.clone())));
        // `x-load-snapshot`: show an internal snapshot, read-only (what
        // qemu-img's `convert -l` and `measure -l` read).
        // A word names the snapshot by ID or name; `x-load-snapshot.id`
        // and `.name` must each match (QEMU's `snapshot.id=`/`.name=`).
        let snap = match ctx.opts.take_value("x-load-snapshot") {
            None => None,
            Some(Value::Str(w)) => Some((Some(w), None, None)),
            Some(Value::Map(m)) => {
                let (mut id, mut sname) = (None, None);
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("id", Value::Str(v)) => id = Some(v),
                        ("name", Value::Str(v)) => sname = Some(v),
                        _ => {
                            return Err(BlockError::Open(format!(
                                "Invalid parameter 'x-load-snapshot.{k}'"
                            )))
                        }
                    }
                }
                Some((None, id, sname))
            }
            Some(_) => {
                return Err(BlockError::Open(
                    "Invalid parameter 'x-load-snapshot'".into(),
                ))
            }
        };
        let img = Qcow2::open(&name, fs, ds, bs, &o).map_err(open_error)?;
        if let Some((word, id, sname)) = &snap {
            if !ctx.common.read_only {
                return Err(BlockError::Open(format!(
                    "{name}: x-load-snapshot needs a read-only image"
                )));
            }
            let which = match word {
                Some(w) => SnapshotRef::IdOrName(w),
                None => SnapshotRef::Exact {
                    id: id.as_deref(),
                    name: sname.as_deref(),
                },
            };
            img.load_snapshot_readonly_by(&which).map_err(open_error)?;
        }
        let img = Arc::new(img);
        let io = MappedIo::new(img.clone(), store.clone(), backing.clone());
        let node = Arc::new(Qcow2Node {
            img,
            file,
            store,
            backing,
            io,
            meta_prealloc: std::sync::OnceLock::new(),
            loaded_bitmaps: Mutex::new(None),
            sectors: Default::default(),
        });
        let weak = Arc::downgrade(&node.io);
        node.img.set_alloc_hook(Box::new(move || {
            if let Some(io) = weak.upgrade() {
                io.unpark();
            }
        }));
        let drv: Arc<dyn BlockDriver> = node.clone();
        node.io.set_fallback(Arc::downgrade(&drv));
        Ok(node)
    }
}

fn to_format(e: BlockError) -> FormatError {
    FormatError::io(io::Error::from_raw_os_error(e.errno()), e.to_string())
}

/// qcow2's answers for the asynchronous data path: its read mapping,
/// in-place overwrites, planned allocations and compressed clusters
/// (`formats::qcow2::io`).
impl MappingFormat for Qcow2 {
    type Ticket = Ticket;
    type Plan = formats::qcow2::io::PlannedWrite;
    /// (byte offset, length) of the compressed data.
    type Encoded = (u64, u64);

    fn map_read(&self, offset: u64, len: u64) -> BlockResult<(Vec<MapRun<(u64, u64)>>, Ticket)> {
        let (pieces, t) = Qcow2::map_read(self, offset, len).map_err(block_error)?;
        let runs = pieces
            .into_iter()
            .map(|p| MapRun {
                offset: p.offset,
                len: p.len,
                kind: match p.kind {
                    Kind::Data { host, .. } => RunKind::Data { host },
                    Kind::Zero => RunKind::Zero,
                    Kind::Unalloc => RunKind::Unallocated,
                    Kind::Compressed { off, len } => RunKind::Encoded((off, len)),
                },
            })
            .collect();
        Ok((runs, t))
    }
    fn read_encoded(&self, at: (u64, u64), offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.read_compressed_part(at.0, at.1, offset, buf)
            .map_err(block_error)
    }
    fn map_write(&self, offset: u64, len: u64) -> BlockResult<WriteMap<Ticket>> {
        Ok(
            match self.map_overwrite(offset, len).map_err(block_error)? {
                Overwrite::InPlace(runs, t) => WriteMap::InPlace(runs, t),
                Overwrite::Busy => WriteMap::Busy,
                Overwrite::Join {
                    host,
                    cluster,
                    ticket,
                } => WriteMap::Join {
                    host,
                    cluster,
                    ticket,
                },
                Overwrite::Allocate => WriteMap::Allocate,
            },
        )
    }
    fn plan_alloc(&self, offset: u64, data: &[u8]) -> BlockResult<AllocPlan<Self::Plan>> {
        Ok(match self.plan_write(offset, data).map_err(block_error)? {
            WritePlan::Busy => AllocPlan::Busy,
            WritePlan::Sync => AllocPlan::Sync,
            WritePlan::Ready(mut pw) => {
                let zero_first = std::mem::take(&mut pw.zero_first);
                let writes = std::mem::take(&mut pw.writes)
                    .into_iter()
                    .map(|(h, w)| {
                        let d = match w {
                            WriteData::Guest { offset, len } => HostData::Guest { offset, len },
                            WriteData::Owned(v) => HostData::Owned(v),
                        };
                        (h, d)
                    })
                    .collect();
                AllocPlan::Ready {
                    zero_first,
                    writes,
                    plan: pw,
                }
            }
        })
    }
    fn finish_alloc(&self, plan: Self::Plan, result: BlockResult<()>) -> BlockResult<()> {
        self.finish_write(plan, result.map_err(to_format))
            .map_err(block_error)
    }
}

impl Qcow2Node {
    /// Whether the image looks created with `preallocation=metadata`: its
    /// refcounts claim clearly more clusters (a ninth more, and at least
    /// two) than the file has space allocated for. Only then does block
    /// status ask the file whether a data cluster is a hole that reads as
    /// zeroes, as QEMU decides it (its `qcow2_detect_metadata_preallocation`);
    /// for other images, and so for `falloc` and `full` preallocation,
    /// data clusters are data.
    fn metadata_preallocated(&self) -> bool {
        *self.meta_prealloc.get_or_init(|| {
            let cs = self.img.cluster_size();
            let Some(real) = self.file.driver().allocated_size() else {
                return false;
            };
            let real = real / cs;
            let threshold = (real * 10 / 9).max(real + 2);
            self.img
                .refcounted_clusters(self.file.len())
                .is_ok_and(|n| n >= threshold)
        })
    }
}

impl BlockDriver for Qcow2Node {
    /// Its metadata is read again at activation ([`Qcow2::reload`]).
    fn migration_blocker(&self, _node: &str) -> Option<String> {
        None
    }
    fn driver_name(&self) -> &'static str {
        "qcow2"
    }
    fn metadata_in_file(&self) -> bool {
        true
    }
    fn len(&self) -> u64 {
        self.img.size()
    }
    fn limits(&self) -> Limits {
        // Encryption works on whole sectors (advertised, e.g. to NBD
        // clients); `sectors` pads smaller requests.
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
        let mut off = offset;
        for s in iov.iter_mut() {
            self.img.read(off, s).map_err(block_error)?;
            off += s.len() as u64;
        }
        Ok(())
    }
    fn write_vectored(&self, offset: u64, iov: &[IoSlice<'_>], fua: bool) -> BlockResult<()> {
        if self.img.is_encrypted() {
            return self.sectors.write(
                offset,
                iov,
                |o, b| self.img.read(o, b).map_err(block_error),
                |o, b| self.img.write(o, b, fua).map_err(block_error),
            );
        }
        let mut off = offset;
        if iov.len() > 1 {
            // One write keeps clusters contiguous.
            let mut flat = vec![0u8; crate::iov::total_len(iov)];
            crate::iov::gather(iov, &mut flat);
            self.img.write(off, &flat, fua).map_err(block_error)?;
            return Ok(());
        }
        for s in iov {
            self.img.write(off, s, false).map_err(block_error)?;
            off += s.len() as u64;
        }
        if fua {
            self.img.flush().map_err(block_error)?;
        }
        Ok(())
    }
    fn flush(&self) -> BlockResult<()> {
        self.img.flush().map_err(block_error)
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.img.discard(offset, len).map_err(block_error)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> BlockResult<()> {
        self.img
            .write_zeroes(offset, len, may_unmap)
            .map_err(block_error)?;
        if fua {
            self.img.flush().map_err(block_error)?;
        }
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        let st = self.img.block_status(offset, len).map_err(block_error)?;
        // Unallocated and zero runs of a cluster that keeps host space
        // report that offset, as QEMU does (`qemu-img map` prints it).
        Ok(match st.kind {
            Kind::Unalloc => match &self.backing.get() {
                Some(b) if offset < b.len() => {
                    let e = b.block_status(offset, st.len.min(b.len() - offset))?;
                    Extent {
                        len: e.len.min(st.len).max(1),
                        allocated: false,
                        compressed: false,
                        ..e
                    }
                }
                _ => Extent {
                    len: st.len,
                    data: false,
                    zero: true,
                    offset: st.reserved,
                    allocated: false,
                    compressed: false,
                },
            },
            Kind::Zero => Extent {
                len: st.len,
                data: false,
                zero: true,
                offset: st.reserved,
                allocated: true,
                compressed: false,
            },
            Kind::Data { host, .. } => {
                let (mut len, mut zero) = (st.len, false);
                // Data clusters over holes of a metadata-preallocated
                // image read as zeroes.
                if self.metadata_preallocated() && host < self.store.len() {
                    let fe = self.store.block_status(host, len)?;
                    len = len.min(fe.len.max(1));
                    zero = fe.zero && !fe.data;
                }
                Extent {
                    len,
                    data: true,
                    zero,
                    // The host bytes of an encrypted image are ciphertext:
                    // no reader may use them as data.
                    offset: (!self.img.is_encrypted()).then_some(host),
                    allocated: true,
                    compressed: false,
                }
            }
            Kind::Compressed { .. } => Extent {
                len: st.len,
                data: true,
                zero: false,
                offset: None,
                allocated: true,
                compressed: true,
            },
        })
    }
    fn truncate(&self, len: u64) -> BlockResult<()> {
        self.img.truncate(len).map_err(block_error)
    }
    fn submit(self: Arc<Self>, req: IoRequest, done: Completion) {
        if self.img.is_encrypted() {
            // Data passes through the cipher in `read`/`write`: the
            // mapped path would move ciphertext.
            return run_on_pool(self, req, done);
        }
        match req.op {
            IoOp::Read => self.io.clone().submit_read(req, done),
            IoOp::Write if !req.fua && req.flags == IoFlags::NONE => {
                self.io.clone().submit_write(req, done)
            }
            _ => run_on_pool(self, req, done),
        }
    }
    fn allocated_size(&self) -> Option<u64> {
        self.file.driver().allocated_size()
    }
    fn reopen(&self, read_only: bool) -> BlockResult<()> {
        self.img.reopen(read_only).map_err(block_error)
    }
    fn load_bitmaps(&self) -> BlockResult<Vec<crate::bitmap::DirtyBitmap>> {
        use formats::qcow2::bitmap::{FLAG_AUTO, FLAG_IN_USE};
        let mut out = Vec::new();
        let mut names = Vec::new();
        for b in self.img.bitmaps() {
            // An inconsistent bitmap (in use: a crash, or a program that
            // did not store it) is left in the image, not used.
            if b.flags & FLAG_IN_USE != 0 {
                continue;
            }
            let words = self.img.load_bitmap(&b).map_err(block_error)?;
            let d =
                crate::bitmap::DirtyBitmap::new(&b.name, self.img.size(), b.granularity(), true)?;
            d.set_words(&words);
            d.set_enabled(b.flags & FLAG_AUTO != 0);
            names.push(b.name.clone());
            out.push(d);
        }
        if !out.is_empty() {
            self.img.bitmaps_taken().map_err(block_error)?;
        }
        *self
            .loaded_bitmaps
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(names);
        Ok(out)
    }
    fn inconsistent_bitmaps(&self) -> Vec<String> {
        use formats::qcow2::bitmap::FLAG_IN_USE;
        // Once loaded, every bitmap is marked in use on disk: only those
        // not handed over count.
        let loaded = self
            .loaded_bitmaps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default();
        self.img
            .bitmaps()
            .into_iter()
            .filter(|b| b.flags & FLAG_IN_USE != 0 && !loaded.contains(&b.name))
            .map(|b| b.name)
            .collect()
    }
    fn can_store_bitmaps(&self) -> bool {
        true
    }
    fn supports_persistent_bitmaps(&self) -> bool {
        self.img.header().version >= 3
    }
    /// Read from the file as it is on disk (what another program sees),
    /// as qemu-img's `info` reads a freshly opened image.
    fn info(&self) -> Option<ImageInfo> {
        let fs = NodeStorage(self.file.clone());
        let name = self.file.filename().unwrap_or_default();
        let h = qcow2::preview(&fs, "").ok()?.header;
        let bitmaps = match &h.bitmaps_ext {
            Some(raw) if h.version >= 3 && h.autoclear & qcow2::header::AUTOCLEAR_BITMAPS != 0 => {
                qcow2::bitmap::read_bitmaps(&fs, raw, h.cluster_size(), h.size, "")
                    .map(|(_, l)| l)
                    .unwrap_or_default()
            }
            _ => Vec::new(),
        };
        let snapshots = qcow2::snapshot::read_snapshots(&fs, &h, &name)
            .unwrap_or_default()
            .into_iter()
            .map(snapshot_info)
            .collect();
        let encrypt = encrypt_info(&fs, &h, &name);
        Some(ImageInfo {
            cluster_size: Some(h.cluster_size()),
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format.clone(),
            dirty: h.incompatible & qcow2::header::INCOMPAT_DIRTY != 0,
            snapshots,
            specific: Some(("qcow2".into(), specific_info(&h, &bitmaps, encrypt))),
            encrypted: h.crypt_method != 0,
        })
    }
    fn check(&self, repair: Repair) -> BlockResult<CheckResult> {
        self.img.check(repair).map_err(op_error)
    }
    fn amend(&self, opts: &CreateOpts, _force: bool) -> BlockResult<()> {
        let mut am = qcow2::amend::Amend::default();
        for k in opts.names() {
            match k {
                "compat" => {
                    let v = opts.str(k).unwrap_or_default();
                    am.version = Some(match v {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => {
                            return Err(BlockError::Invalid(format!(
                                "Unknown compatibility level {v}"
                            )))
                        }
                    })
                }
                "lazy_refcounts" => am.lazy_refcounts = opts.bool(k),
                "refcount_bits" => {
                    am.refcount_bits = opts.num(k).and_then(|n| u32::try_from(n).ok())
                }
                k if CREATE_ONLY.contains(&k) || ENCRYPT_OPTS.contains(&k) => {
                    return Err(BlockError::Invalid(format!(
                        "Invalid parameter '{k}'\nThis option is only supported for image creation"
                    )))
                }
                _ => return Err(BlockError::Invalid(format!("Invalid parameter '{k}'"))),
            }
        }
        self.img.amend(&am).map_err(op_error)
    }
    fn supports_snapshots(&self) -> bool {
        true
    }
    fn snapshot_list(&self) -> BlockResult<Vec<SnapshotInfo>> {
        Ok(self
            .img
            .snapshots()
            .into_iter()
            .map(snapshot_info)
            .collect())
    }
    fn snapshot_create(&self, name: &str, date: (u32, u32)) -> BlockResult<()> {
        self.img
            .snapshot_create(name, date)
            .map(drop)
            .map_err(op_error)
    }
    fn snapshot_apply(&self, id_or_name: &str) -> BlockResult<()> {
        self.img.snapshot_apply(id_or_name).map_err(op_error)
    }
    fn snapshot_delete(&self, id_or_name: &str) -> BlockResult<()> {
        self.img
            .snapshot_delete(id_or_name)
            .map(drop)
            .map_err(op_error)
    }
    fn close(&self) -> BlockResult<()> {
        self.img.close().map_err(block_error)
    }
    /// Everything is written back and the image marked clean; the image
    /// is read-only from now on (a stray write, or the drop at exit,
    /// cannot touch it) until `activate`. The bitmaps handed to the node
    /// were stored just before, so none is handed over any more.
    fn inactivate(&self) -> BlockResult<()> {
        self.img.reopen(true).map_err(block_error)?;
        *self
            .loaded_bitmaps
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }
    /// The other process wrote the image: header, L1 and refcount
    /// tables, snapshots and bitmaps are read again, the caches emptied.
    fn activate(&self, read_only: bool) -> BlockResult<()> {
        self.img.reload(read_only).map_err(block_error)
    }
    fn can_compress(&self) -> bool {
        !self.img.is_encrypted()
    }
    fn write_compressed(&self, offset: u64, data: &[u8]) -> BlockResult<()> {
        self.img.write_compressed(offset, data).map_err(block_error)
    }
    fn make_empty(&self) -> BlockResult<()> {
        self.img.make_empty().map_err(block_error)
    }
    fn store_bitmaps(&self, list: &[Arc<crate::bitmap::DirtyBitmap>]) -> BlockResult<()> {
        let loaded = self
            .loaded_bitmaps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let loaded = loaded.unwrap_or_default();
        if list.is_empty() && loaded.is_empty() {
            return Ok(());
        }
        let keep: Vec<String> = self
            .img
            .bitmaps()
            .into_iter()
            .map(|b| b.name)
            .filter(|n| !loaded.contains(n))
            .collect();
        let stored: Vec<formats::qcow2::bitmap::StoredBitmap> = list
            .iter()
            .map(|b| formats::qcow2::bitmap::StoredBitmap {
                name: b.name().to_string(),
                granularity_bits: b.granularity().trailing_zeros() as u8,
                enabled: b.is_enabled(),
                words: b.words(),
            })
            .collect();
        self.img.store_bitmaps(&stored, &keep).map_err(block_error)
    }
    fn set_backing_file(&self, name: Option<&str>, format: Option<&str>) -> BlockResult<()> {
        self.img.set_backing(name, format).map_err(op_error)
    }
}
