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

use crate::driver::{run_on_pool, BlockDriver, Completion, Extent, IoOp, IoRequest, Limits};
use crate::error::{BlockError, BlockResult};
use crate::graph::{Backing, OpenCtx};
use crate::iov::{Carved, IoVecs};
use crate::keyval::{Map, Options, Value};
use crate::node::{Child, Node};
use formats::error::FormatError;
use formats::qcow2::io::{Overwrite, Piece, WriteData, WritePlan};
use formats::qcow2::l2::Kind;
use formats::qcow2::snapshot::SnapshotRef;
use formats::qcow2::{self, OpenOptions, Qcow2, Ticket};
use formats::storage::Storage;
use std::cell::Cell;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::{Arc, Mutex};

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

/// A child slot as the format layer's [`Storage`]: each call goes to the
/// node in the slot now, and an empty slot is no backing file at all
/// ([`Storage::is_present`]). qcow2's backing file is reached only
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
    /// Where data clusters live: the external data file, or `file`.
    store: Arc<Node>,
    /// The `backing` slot (empty without a backing file).
    backing: Arc<Child>,
    /// Writes waiting for an allocation in flight on their clusters.
    parked: Mutex<Vec<(IoRequest, Completion)>>,
    /// Fresh clusters of asynchronous allocating writes in flight, by host
    /// offset: writes to the same cluster join them.
    joinable: Mutex<std::collections::HashMap<u64, Arc<AllocWait>>>,
    /// See [`Qcow2Node::metadata_preallocated`]; decided on first use.
    meta_prealloc: std::sync::OnceLock<bool>,
    /// Persistent bitmaps handed to the block layer by `load_bitmaps`
    /// (None: never asked, so nothing is stored back at close).
    loaded_bitmaps: Mutex<Option<Vec<String>>>,
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
        // For this open only, as in QEMU: the image's compatible bit is
        // changed by `amend`, not by the option.
        o.lazy_refcounts = ctx.opts.take_bool("lazy-refcounts")?;
        o.overlap_check = overlap_check(&mut ctx.opts)?;
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
                    Some(n)
                }
            },
        };
        let backing = ctx.add_slot("backing", backing);
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
        let node = Arc::new(Qcow2Node {
            img,
            file,
            store,
            backing,
            parked: Mutex::new(Vec::new()),
            joinable: Mutex::new(std::collections::HashMap::new()),
            meta_prealloc: std::sync::OnceLock::new(),
            loaded_bitmaps: Mutex::new(None),
        });
        let weak = Arc::downgrade(&node);
        node.img.set_alloc_hook(Box::new(move || {
            if let Some(n) = weak.upgrade() {
                n.unpark();
            }
        }));
        Ok(node)
    }

    /// Read asynchronously: map under the metadata lock, then send each
    /// run where it lives (data clusters to the data node, unallocated
    /// runs to the backing node, compressed clusters to the worker pool)
    /// and complete when all are done.
    fn submit_read(self: Arc<Self>, mut req: IoRequest, done: Completion) {
        let len = req.iov.len() as u64;
        let (pieces, ticket) = match self.img.map_read(req.offset, len) {
            Ok(x) => x,
            Err(e) => return done(req, Err(block_error(e))),
        };
        if let [Piece {
            kind: Kind::Data { host, .. },
            ..
        }] = pieces[..]
        {
            // One host extent: the request itself goes down.
            return self.forward(req, host, ticket, done);
        }
        let backing = self.backing.get();
        let blen = backing.as_ref().map_or(0, |b| b.len());
        if pieces.iter().all(|p| match p.kind {
            Kind::Zero => true,
            Kind::Unalloc => p.offset >= blen,
            _ => false,
        }) {
            // Zeroes only (a fresh disk): no I/O, so no parts to join.
            drop(ticket);
            crate::iov::zero_fill(&mut req.iov.slices_mut());
            return done(req, Ok(()));
        }
        // Split unallocated runs at the end of the backing file: what lies
        // past it reads as zeroes.
        let mut runs: Vec<(Piece, bool)> = Vec::new(); // piece, zero
        for p in pieces {
            match p.kind {
                Kind::Zero => runs.push((p, true)),
                Kind::Unalloc if p.offset >= blen => runs.push((p, true)),
                Kind::Unalloc if p.offset + p.len > blen => {
                    let n = blen - p.offset;
                    runs.push((Piece { len: n, ..p }, false));
                    runs.push((
                        Piece {
                            offset: blen,
                            len: p.len - n,
                            ..p
                        },
                        true,
                    ));
                }
                _ => runs.push((p, false)),
            }
        }
        let base = req.offset;
        let ranges: Vec<(usize, usize)> = runs
            .iter()
            .map(|(p, _)| ((p.offset - base) as usize, p.len as usize))
            .collect();
        let Some((whole, parts)) = carve(&mut req, &ranges) else {
            return done(req, Err(internal("bad read mapping")));
        };
        let join = Join::new(complete(req, whole, Some(ticket), done));
        for ((p, zero), mut part) in runs.into_iter().zip(parts) {
            if zero {
                crate::iov::zero_fill(&mut part.slices_mut());
                continue;
            }
            let cb = join.part();
            match p.kind {
                Kind::Data { host, .. } => self
                    .store
                    .driver()
                    .clone()
                    .submit(IoRequest::read(host, part), cb),
                Kind::Compressed { off, len } => {
                    let me = self.clone();
                    crate::aio::pool().spawn(Box::new(move || {
                        let mut tmp = vec![0u8; p.len as usize];
                        let res = me
                            .img
                            .read_compressed_part(off, len, p.offset, &mut tmp)
                            .map_err(block_error);
                        if res.is_ok() {
                            crate::iov::scatter(&tmp, &mut part.slices_mut());
                        }
                        drop(me);
                        cb(IoRequest::read(p.offset, part), res)
                    }));
                }
                // Unallocated, inside the backing file (others are zero).
                _ => match &backing {
                    Some(b) => b.submit(IoRequest::read(p.offset, part), cb),
                    None => cb(IoRequest::read(p.offset, part), Ok(())),
                },
            }
        }
        join.release();
    }

    /// Send `req` to the data node at host offset `host` (one extent),
    /// keeping `ticket` until it completes.
    fn forward(&self, mut req: IoRequest, host: u64, ticket: Ticket, done: Completion) {
        let guest = req.offset;
        req.offset = host;
        self.store.driver().clone().submit(
            req,
            Box::new(move |mut r, res| {
                drop(ticket);
                r.offset = guest;
                done(r, res)
            }),
        )
    }

    /// Write asynchronously. Overwrites of clusters this image owns go
    /// straight to the data node; a write that allocates is planned under
    /// the metadata lock and its data I/O (zeroing new clusters first when
    /// QEMU would) sent asynchronously, the L2 entries linked on
    /// completion. One that touches clusters being allocated waits, parked
    /// without a thread, and is submitted again when an allocation
    /// finishes; one that must read copy-on-write data first runs on the
    /// worker pool.
    fn submit_write(self: Arc<Self>, req: IoRequest, done: Completion) {
        let len = req.iov.len() as u64;
        // Mapping under the parking lock: an allocation that finishes
        // after we saw it busy resubmits the parked requests only after
        // this one is parked.
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        let plan = match self.img.map_overwrite(req.offset, len) {
            Ok(Overwrite::InPlace(runs, t)) => {
                drop(parked);
                if let [(_, host, _)] = runs[..] {
                    return self.forward(req, host, t, done);
                }
                let writes = runs
                    .into_iter()
                    .map(|(g, h, l)| (h, WriteData::Guest { offset: g, len: l }))
                    .collect();
                return self.write_extents(req, Vec::new(), writes, t, done);
            }
            Ok(Overwrite::Busy) => return parked.push((req, done)),
            Ok(Overwrite::Join {
                host,
                cluster,
                ticket,
            }) => {
                let w = self
                    .joinable
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&cluster)
                    .cloned();
                match w {
                    Some(w) => {
                        drop(parked);
                        w.join(
                            &self,
                            Joined {
                                req,
                                host,
                                ticket,
                                done,
                            },
                        );
                    }
                    // Allocated by the synchronous path: wait for it.
                    None => parked.push((req, done)),
                }
                return;
            }
            Ok(Overwrite::Allocate) => {
                let mut src = vec![0u8; len as usize];
                crate::iov::gather(&req.iov.slices(), &mut src);
                self.img.plan_write(req.offset, &src)
            }
            Err(e) => Err(e),
        };
        match plan {
            Ok(WritePlan::Ready(mut pw)) => {
                let zero = std::mem::take(&mut pw.zero_first);
                let writes = std::mem::take(&mut pw.writes);
                // Fresh clusters other writes may join: registered before
                // the parking lock goes, so a writer that is told to join
                // finds them.
                let waits: Vec<(u64, Arc<AllocWait>)> = {
                    let mut jobs = self.joinable.lock().unwrap_or_else(|e| e.into_inner());
                    zero.iter()
                        .map(|&(h, _)| {
                            let w = Arc::new(AllocWait::default());
                            jobs.insert(h, w.clone());
                            (h, w)
                        })
                        .collect()
                };
                drop(parked);
                let zw: Vec<Arc<AllocWait>> = waits.iter().map(|(_, w)| w.clone()).collect();
                let zme = self.clone();
                let on_zeroed: Box<dyn FnOnce() + Send> = Box::new(move || {
                    for w in zw {
                        w.zeroed(&zme);
                    }
                });
                let me = self.clone();
                let fin: Completion = Box::new(move |r, res| {
                    let res = me
                        .img
                        .finish_write(pw, res.map_err(to_format))
                        .map_err(block_error);
                    {
                        let mut jobs = me.joinable.lock().unwrap_or_else(|e| e.into_inner());
                        for (h, _) in &waits {
                            jobs.remove(h);
                        }
                    }
                    for (_, w) in waits {
                        w.linked(&me, res.clone());
                    }
                    // The node goes before the caller hears of the write: a
                    // caller that then drops the image must really close it.
                    drop(me);
                    done(r, res)
                });
                self.write_extents_then(req, zero, writes, fin, Some(on_zeroed));
            }
            Ok(WritePlan::Busy) => parked.push((req, done)),
            Ok(WritePlan::Sync) => {
                drop(parked);
                run_on_pool(self, req, done)
            }
            Err(e) => {
                drop(parked);
                done(req, Err(block_error(e)))
            }
        }
    }

    /// [`Qcow2Node::write_extents_then`] for in-place runs, holding the
    /// mapping's ticket until the writes are done.
    fn write_extents(
        &self,
        req: IoRequest,
        zero: Vec<(u64, u64)>,
        writes: Vec<(u64, WriteData)>,
        ticket: Ticket,
        done: Completion,
    ) {
        self.write_extents_then(
            req,
            zero,
            writes,
            Box::new(move |r, res| {
                drop(ticket);
                done(r, res)
            }),
            None,
        )
    }

    /// Zero the host ranges `zero`, then write `writes` (guest data from
    /// `req`'s buffers, or owned buffers), all asynchronously; `done` gets
    /// `req` back with the first error.
    fn write_extents_then(
        &self,
        req: IoRequest,
        zero: Vec<(u64, u64)>,
        writes: Vec<(u64, WriteData)>,
        done: Completion,
        on_zeroed: Option<Box<dyn FnOnce() + Send>>,
    ) {
        let store = self.store.clone();
        if !zero.is_empty() {
            // Zeroing first, or it could land on top of the data.
            let st = store.clone();
            let join = Join::new(Box::new(move |err| match err {
                Some(e) => done(req, Err(e)),
                None => {
                    if let Some(f) = on_zeroed {
                        f();
                    }
                    send_writes(&st, req, writes, done)
                }
            }));
            for (h, l) in zero {
                store
                    .driver()
                    .clone()
                    .submit(IoRequest::write_zeroes(h, l, false), join.part());
            }
            join.release();
            return;
        }
        send_writes(&store, req, writes, done)
    }
}

/// Write `writes` to `store` in parallel; `done` gets `req` back.
fn send_writes(
    store: &Arc<Node>,
    mut req: IoRequest,
    writes: Vec<(u64, WriteData)>,
    done: Completion,
) {
    let base = req.offset;
    let ranges: Vec<(usize, usize)> = writes
        .iter()
        .filter_map(|(_, w)| match w {
            WriteData::Guest { offset, len } => Some(((offset - base) as usize, *len as usize)),
            WriteData::Owned(_) => None,
        })
        .collect();
    let Some((whole, parts)) = carve(&mut req, &ranges) else {
        return done(req, Err(internal("bad write mapping")));
    };
    let join = Join::new(complete(req, whole, None, done));
    let mut parts = parts.into_iter();
    let align = store.limits().mem_alignment.max(1);
    for (host, w) in writes {
        let iov = match w {
            WriteData::Guest { .. } => match parts.next() {
                Some(p) => p,
                None => continue,
            },
            WriteData::Owned(d) => {
                // Aligned, so that O_DIRECT needs no bounce buffer below.
                let mut b = crate::iov::AlignedBuf::new(d.len(), align.max(4096));
                b.copy_from_slice(&d);
                IoVecs::from_aligned(b)
            }
        };
        store
            .driver()
            .clone()
            .submit(IoRequest::write(host, iov, false), join.part());
    }
    join.release();
}

/// Take `req`'s buffers apart into `ranges` (relative to `req.offset`).
fn carve(req: &mut IoRequest, ranges: &[(usize, usize)]) -> Option<(Carved, Vec<IoVecs>)> {
    std::mem::replace(&mut req.iov, IoVecs::empty()).carve(ranges)
}

/// The continuation that puts `req`'s buffers back together (all parts
/// are gone by then), drops `ticket` and completes.
fn complete(
    mut req: IoRequest,
    whole: Carved,
    ticket: Option<Ticket>,
    done: Completion,
) -> Box<dyn FnOnce(Option<BlockError>) + Send> {
    Box::new(move |err| {
        drop(ticket);
        req.iov = whole.into_inner().unwrap_or_else(|_| IoVecs::empty());
        done(req, err.map_or(Ok(()), Err))
    })
}

fn internal(what: &str) -> BlockError {
    BlockError::Io {
        errno: libc::EIO,
        context: format!("qcow2: internal error: {what}"),
    }
}

fn to_format(e: BlockError) -> FormatError {
    FormatError::io(io::Error::from_raw_os_error(e.errno()), e.to_string())
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

    /// Submit the parked writes again (an allocation has finished).
    fn unpark(self: &Arc<Self>) {
        let list = std::mem::take(&mut *self.parked.lock().unwrap_or_else(|e| e.into_inner()));
        for (req, done) in list {
            self.clone().submit_write(req, done);
        }
    }
}

/// A write joining a fresh cluster being allocated (QEMU makes such writes
/// wait for the allocation; here they are written as soon as the cluster
/// is zeroed, in parallel with the allocating write, and complete when it
/// has linked the cluster).
struct Joined {
    req: IoRequest,
    /// Host offset to write at.
    host: u64,
    ticket: Ticket,
    done: Completion,
}

/// The state of one joinable fresh cluster.
#[derive(Default)]
struct AllocWait {
    st: Mutex<AllocWaitState>,
}

#[derive(Default)]
struct AllocWaitState {
    zeroed: bool,
    /// The allocating write's result, once it has finished.
    linked: Option<BlockResult<()>>,
    /// Joined writes waiting for the zeroing.
    queued: Vec<Joined>,
    /// Joined writes done, waiting for the link: (request, done, result,
    /// ticket).
    written: Vec<(IoRequest, Completion, BlockResult<()>, Ticket)>,
}

impl AllocWait {
    fn state(&self) -> std::sync::MutexGuard<'_, AllocWaitState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn join(self: &Arc<Self>, node: &Arc<Qcow2Node>, j: Joined) {
        let mut s = self.state();
        if s.linked.is_some() {
            // Finished meanwhile: an ordinary write now.
            drop(s);
            drop(j.ticket);
            return node.clone().submit_write(j.req, j.done);
        }
        if !s.zeroed {
            s.queued.push(j);
            return;
        }
        drop(s);
        self.send(node, j);
    }

    fn send(self: &Arc<Self>, node: &Arc<Qcow2Node>, j: Joined) {
        let Joined {
            mut req,
            host,
            ticket,
            done,
        } = j;
        let guest = req.offset;
        req.offset = host;
        let me = self.clone();
        node.store.driver().clone().submit(
            req,
            Box::new(move |mut r, res| {
                r.offset = guest;
                me.written(r, done, res, ticket)
            }),
        );
    }

    fn written(&self, r: IoRequest, done: Completion, res: BlockResult<()>, t: Ticket) {
        let mut s = self.state();
        match &s.linked {
            Some(l) => {
                let l = l.clone();
                drop(s);
                drop(t);
                done(r, res.and(l))
            }
            None => s.written.push((r, done, res, t)),
        }
    }

    fn zeroed(self: &Arc<Self>, node: &Arc<Qcow2Node>) {
        let queued = {
            let mut s = self.state();
            s.zeroed = true;
            std::mem::take(&mut s.queued)
        };
        for j in queued {
            self.send(node, j);
        }
    }

    fn linked(&self, node: &Arc<Qcow2Node>, res: BlockResult<()>) {
        let (queued, written) = {
            let mut s = self.state();
            s.linked = Some(res.clone());
            (
                std::mem::take(&mut s.queued),
                std::mem::take(&mut s.written),
            )
        };
        for (r, done, wres, t) in written {
            drop(t);
            done(r, wres.and(res.clone()));
        }
        // Never sent (the zeroing failed): ordinary writes now.
        for j in queued {
            drop(j.ticket);
            node.clone().submit_write(j.req, j.done);
        }
    }
}

/// Parts of one request in flight: runs the continuation with the first
/// error once every part is done and the submitter has let go.
struct Join {
    st: Mutex<JoinState>,
}

type Then = Box<dyn FnOnce(Option<BlockError>) + Send>;

struct JoinState {
    /// Parts in flight, plus one for the submitter until it has sent all.
    left: usize,
    err: Option<BlockError>,
    then: Option<Then>,
}

impl Join {
    fn new(then: Then) -> Arc<Join> {
        Arc::new(Join {
            st: Mutex::new(JoinState {
                left: 1,
                err: None,
                then: Some(then),
            }),
        })
    }
    /// A completion for one more part.
    fn part(self: &Arc<Self>) -> Completion {
        self.st.lock().unwrap_or_else(|e| e.into_inner()).left += 1;
        let j = self.clone();
        Box::new(move |part, res| {
            // The part's buffers go first: the whole comes back only when
            // no part refers to it.
            drop(part);
            j.finish(res.err());
        })
    }
    /// The submitter has sent every part.
    fn release(&self) {
        self.finish(None);
    }
    fn finish(&self, err: Option<BlockError>) {
        let mut s = self.st.lock().unwrap_or_else(|e| e.into_inner());
        if s.err.is_none() {
            s.err = err;
        }
        s.left -= 1;
        if s.left > 0 {
            return;
        }
        let (then, err) = (s.then.take(), s.err.take());
        drop(s);
        if let Some(f) = then {
            f(err);
        }
    }
}

impl BlockDriver for Qcow2Node {
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
        // Unallocated and zero runs of a cluster that keeps host space
        // report that offset, as QEMU does (`qemu-img map` prints it).
        Ok(match st.kind {
            Kind::Unalloc => match &self.backing.get() {
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
                    offset: st.reserved,
                    allocated: false,
                },
            },
            Kind::Zero => Extent {
                len: st.len,
                data: false,
                zero: true,
                offset: st.reserved,
                allocated: true,
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
                    offset: Some(host),
                    allocated: true,
                }
            }
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
    fn submit(self: Arc<Self>, req: IoRequest, done: Completion) {
        match req.op {
            IoOp::Read => self.submit_read(req, done),
            IoOp::Write if !req.fua => self.submit_write(req, done),
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
    fn close(&self) -> BlockResult<()> {
        self.img.close().map_err(block_error)
    }
    fn can_compress(&self) -> bool {
        true
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
        self.img.set_backing(name, format).map_err(block_error)
    }
}
