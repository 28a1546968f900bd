//! The `qcow2` format driver: a thin adapter from [`formats::qcow2`] to a
//! node with a `file` child, an optional `backing` child (from the options
//! or from the image header, resolved as QEMU resolves relative names) and
//! an optional `data-file` child. Options and defaults are QEMU's
//! (`BlockdevOptionsQcow2`): `l2-cache-size`, `l2-cache-entry-size`,
//! `refcount-cache-size`, `cache-size`, `cache-clean-interval`,
//! `pass-discard-request`/`-snapshot`/`-other`, `lazy-refcounts`,
//! `overlap-check`, `data-file`, `backing`.

use crate::driver::{BlockDriver, Extent, Limits};
use crate::error::{BlockError, BlockResult};
use crate::graph::{Backing, OpenCtx};
use crate::keyval::{Map, Options, Value};
use crate::node::Node;
use formats::error::FormatError;
use formats::qcow2::l2::Kind;
use formats::qcow2::{self, OpenOptions, Qcow2};
use formats::storage::Storage;
use std::cell::Cell;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::Arc;

/// A node as the format layer's [`Storage`]; reads past its end are zeroes.
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
}

/// Format-layer errors as block-layer errors (one line, errno kept).
pub fn block_error(e: FormatError) -> BlockError {
    match e {
        FormatError::Io { errno, context, .. } => BlockError::Io { errno, context },
        FormatError::Unsupported(m) => BlockError::Unsupported(m),
        FormatError::ReadOnly(m) => BlockError::Permission(m),
        other => BlockError::Io {
            errno: other.errno(),
            context: other.to_string(),
        },
    }
}

fn open_error(e: FormatError) -> BlockError {
    match e {
        FormatError::Io { .. } => block_error(e),
        FormatError::Unsupported(m) => BlockError::Unsupported(m),
        other => BlockError::Open(other.to_string()),
    }
}

thread_local! {
    static DEPTH: Cell<usize> = const { Cell::new(0) };
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

/// An open qcow2 node.
pub struct Qcow2Node {
    img: Qcow2,
    file: Arc<Node>,
    backing: Option<Arc<Node>>,
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
            read_only: ctx.common.read_only,
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
        // Accepted: refcounts are always kept exact, and the overlap check
        // that matters (header and fixed tables) is always on.
        let _ = ctx.opts.take_bool("lazy-refcounts")?;
        let _ = ctx.opts.take_value("overlap-check");
        let _ = ctx.opts.take_bool("discard-no-unref")?;
        if ctx.opts.take_value("encrypt").is_some() {
            return Err(BlockError::Unsupported(
                "qcow2: encrypted images are not supported".into(),
            ));
        }
        let name = file.filename().unwrap_or_else(|| file.name().to_string());
        let fs: Arc<dyn Storage> = Arc::new(NodeStorage(file.clone()));
        let pv = qcow2::preview(&*fs, &name).map_err(open_error)?;
        let h = pv.header;
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
        let backing = match ctx.take_backing()? {
            Backing::None => None,
            Backing::Node(n) => Some(n),
            Backing::Default => match &h.backing_file {
                None => None,
                Some(b) => {
                    let depth = DEPTH.with(|d| d.get());
                    if depth >= qcow2::MAX_BACKING_DEPTH {
                        return Err(BlockError::Open(format!(
                            "{name}: backing chain too deep (more than {} images; is there a loop?)",
                            qcow2::MAX_BACKING_DEPTH
                        )));
                    }
                    let path = resolve_backing(&name, b);
                    DEPTH.with(|d| d.set(depth + 1));
                    let r = ctx
                        .graph
                        .open_image(&path, h.backing_format.as_deref(), true, &[]);
                    DEPTH.with(|d| d.set(depth));
                    let n = r.map_err(|e| {
                        BlockError::Open(format!(
                            "Could not open backing file: {}",
                            e.to_string()
                                .strip_prefix("Could not open backing file: ")
                                .map(str::to_string)
                                .unwrap_or_else(|| e.to_string())
                        ))
                    })?;
                    let _ = ctx.graph.take_warnings();
                    ctx.add_child("backing", n.clone());
                    Some(n)
                }
            },
        };
        let ds: Option<Arc<dyn Storage>> =
            data.map(|d| Arc::new(NodeStorage(d)) as Arc<dyn Storage>);
        let bs: Option<Arc<dyn Storage>> = backing
            .clone()
            .map(|b| Arc::new(NodeStorage(b)) as Arc<dyn Storage>);
        // `x-load-snapshot`: show an internal snapshot, read-only (what
        // qemu-img's `convert -l` and `measure -l` read).
        let snap = ctx.opts.take_str("x-load-snapshot")?;
        let img = Qcow2::open(&name, fs, ds, bs, &o).map_err(open_error)?;
        if let Some(sn) = snap {
            if !ctx.common.read_only {
                return Err(BlockError::Open(format!(
                    "{name}: x-load-snapshot needs a read-only image"
                )));
            }
            img.load_snapshot_readonly(&sn).map_err(open_error)?;
        }
        Ok(Arc::new(Qcow2Node { img, file, backing }))
    }
}

impl BlockDriver for Qcow2Node {
    fn driver_name(&self) -> &'static str {
        "qcow2"
    }
    fn len(&self) -> u64 {
        self.img.size()
    }
    fn limits(&self) -> Limits {
        Limits {
            request_alignment: 1,
            mem_alignment: 1,
        }
    }
    fn filename(&self) -> Option<String> {
        self.file.filename()
    }
    fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        let mut off = offset;
        for s in iov.iter_mut() {
            self.img.read(off, s).map_err(block_error)?;
            off += s.len() as u64;
        }
        Ok(())
    }
    fn write_vectored(&self, offset: u64, iov: &[IoSlice<'_>], fua: bool) -> BlockResult<()> {
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
        Ok(match st.kind {
            Kind::Unalloc => match &self.backing {
                Some(b) if offset < b.len() => {
                    let e = b.block_status(offset, st.len.min(b.len() - offset))?;
                    Extent {
                        len: e.len.min(st.len).max(1),
                        allocated: false,
                        ..e
                    }
                }
                _ => Extent {
                    len: st.len,
                    data: false,
                    zero: true,
                    offset: None,
                    allocated: false,
                },
            },
            Kind::Zero => Extent {
                len: st.len,
                data: false,
                zero: true,
                offset: None,
                allocated: true,
            },
            Kind::Data { host, .. } => Extent {
                len: st.len,
                data: true,
                zero: false,
                offset: Some(host),
                allocated: true,
            },
            Kind::Compressed { .. } => Extent {
                len: st.len,
                data: true,
                zero: false,
                offset: None,
                allocated: true,
            },
        })
    }
    fn truncate(&self, len: u64) -> BlockResult<()> {
        self.img.truncate(len).map_err(block_error)
    }
    fn allocated_size(&self) -> Option<u64> {
        self.file.driver().allocated_size()
    }
}
