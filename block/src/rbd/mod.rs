//! The `rbd` protocol: disks that are Ceph RADOS Block Device images,
//! through librbd, with QEMU's rbd driver's options
//! (`BlockdevOptionsRbd`: `pool`, `namespace`, `image`, `snapshot`,
//! `conf`, `user`, `key-secret`, `auth-client-required`, `server`) and
//! file name (`rbd:POOL/IMAGE...`, [`crate::rbd_name`]).
//!
//! Reference: Ceph's librbd C API (`rbd/librbd.h`: open, aio read/write
//! with iovecs, flush, discard, write-zeroes, resize, create) and
//! librados (`rados/librados.h`: cluster, configuration, pools).
//!
//! Requests are asynchronous end to end: `submit` hands them to librbd,
//! whose completion callbacks finish them (see [`ffi`]), so a guest's
//! queue depth reaches the cluster. librbd's own cache follows the cache
//! mode as in QEMU (`cache.direct=on` turns `rbd_cache` off).

mod ffi;

use crate::driver::{BlockDriver, Completion, IoOp, IoRequest};
use crate::error::{BlockError, BlockResult};
use crate::format::{DriverClass, DriverKind};
use crate::graph::OpenCtx;
use crate::keyval::{Map, Options, Value};
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Where and how to reach an image.
#[derive(Clone, Debug, Default)]
struct Target {
    pool: String,
    namespace: Option<String>,
    image: String,
    snapshot: Option<String>,
    conf: Option<String>,
    user: Option<String>,
    /// Ceph settings, in order: the file name's pairs, the key, the
    /// monitors and the authentication methods.
    settings: Vec<(String, String)>,
}

impl Target {
    /// What messages call the image.
    fn name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("rbd:{}/{ns}/{}", self.pool, self.image),
            None => format!("rbd:{}/{}", self.pool, self.image),
        }
    }

    fn parse(opts: &mut Options) -> BlockResult<Target> {
        let mut t = Target {
            pool: opts.require_str("pool")?,
            namespace: opts.take_str("namespace")?.filter(|s| !s.is_empty()),
            image: opts.require_str("image")?,
            snapshot: opts.take_str("snapshot")?,
            conf: opts.take_str("conf")?,
            user: opts.take_str("user")?,
            settings: Vec::new(),
        };
        if let Some(json) = opts.take_str(crate::rbd_name::KEYVALUE_PAIRS)? {
            t.settings = crate::rbd_name::settings(&json).map_err(BlockError::Open)?;
        }
        if let Some(id) = opts.take_str("key-secret")? {
            // The secret holds the key's bytes; Ceph takes them in base64
            // (QEMU's `qcrypto_secret_lookup_as_base64`: libvirt passes the
            // key as `data=KEY,format=base64`).
            use base64::Engine;
            let key = crate::objects::secret(&id)
                .map_err(|e| BlockError::Open(format!("{}: {e}", opts.path("key-secret"))))?;
            let key = base64::engine::general_purpose::STANDARD.encode(key.as_slice());
            t.settings.push(("key".into(), key));
        }
        if let Some(Value::List(servers)) = opts.take_value("server") {
            let mut hosts = Vec::new();
            for s in servers {
                let Value::Map(m) = s else {
                    return Err(BlockError::Open(format!(
                        "{}: each server is an object with host and port",
                        opts.path("server")
                    )));
                };
                let get = |k: &str| match m.get(k) {
                    Some(Value::Str(v)) => Some(v.clone()),
                    _ => None,
                };
                let host = get("host").ok_or_else(|| {
                    BlockError::Open(format!("{}: a server has no host", opts.path("server")))
                })?;
                hosts.push(match get("port") {
                    Some(p) => format!("{host}:{p}"),
                    None => host,
                });
            }
            t.settings.push(("mon_host".into(), hosts.join(",")));
        }
        if let Some(Value::List(methods)) = opts.take_value("auth-client-required") {
            let m: Vec<String> = methods
                .into_iter()
                .filter_map(|v| match v {
                    Value::Str(s) => Some(s),
                    _ => None,
                })
                .collect();
            t.settings
                .push(("auth_client_required".into(), m.join(";")));
        }
        Ok(t)
    }

    fn connect(&self) -> BlockResult<Arc<ffi::IoCtx>> {
        let name = self.name();
        let on = |e: BlockError| BlockError::Open(format!("{name}: {e}"));
        let cluster =
            ffi::Cluster::connect(self.user.as_deref(), self.conf.as_deref(), &self.settings)
                .map_err(on)?;
        Ok(Arc::new(
            cluster
                .ioctx(&self.pool, self.namespace.as_deref())
                .map_err(on)?,
        ))
    }
}

/// An open `rbd` node.
pub struct RbdNode {
    name: String,
    image: Arc<ffi::Image>,
    len: AtomicU64,
    /// Held while the image grows (see [`RbdNode::grow_for`]).
    growing: Mutex<()>,
}

impl RbdNode {
    fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        let mut t = Target::parse(&mut ctx.opts)?;
        if t.snapshot.is_some() && !ctx.common.read_only {
            if ctx.common.auto_read_only {
                ctx.common.read_only = true;
            } else {
                return Err(BlockError::Open(format!(
                    "{}@{}: Snapshots are read-only (use read-only=on)",
                    t.name(),
                    t.snapshot.as_deref().unwrap_or_default()
                )));
            }
        }
        // librbd's write-back cache only where the cache mode allows one.
        t.settings.push((
            "rbd_cache".into(),
            if ctx.common.direct { "false" } else { "true" }.into(),
        ));
        let io = t.connect()?;
        let name = t.name();
        let image = io
            .open(&t.image, t.snapshot.as_deref(), ctx.common.read_only)
            .map_err(|e| BlockError::Open(format!("{name}: {e}")))?;
        let len = image.size()?;
        ctx.describe("pool", t.pool.clone());
        ctx.describe("image", t.image.clone());
        Ok(Arc::new(RbdNode {
            name,
            image,
            len: AtomicU64::new(len),
            growing: Mutex::new(()),
        }))
    }

    /// An RBD image does not grow by writing past its end (librbd
    /// refuses with EINVAL), but a format laying itself out on the node,
    /// as a file would take it, does so: grow the image first, as
    /// QEMU's rbd driver does.
    fn grow_for(&self, end: u64) -> BlockResult<()> {
        if end <= self.len() {
            return Ok(());
        }
        let _g = self.growing.lock().unwrap_or_else(|e| e.into_inner());
        if end > self.len() {
            self.image.resize(end)?;
            self.len.store(end, Ordering::Release);
        }
        Ok(())
    }
}

impl BlockDriver for RbdNode {
    /// A protocol on shared storage: no format metadata.
    fn migration_blocker(&self, _node: &str) -> Option<String> {
        None
    }
    fn driver_name(&self) -> &'static str {
        "rbd"
    }
    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }
    fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        let want = crate::iov::total_len_mut(iov) as u64;
        let got = self.image.read(offset, iov)?;
        if got < want {
            // Short only past the end: zeroes, as in `ffi::Pending::finish`.
            let mut skip = got as usize;
            for s in iov.iter_mut() {
                if skip >= s.len() {
                    skip -= s.len();
                } else {
                    s[skip..].fill(0);
                    skip = 0;
                }
            }
        }
        Ok(())
    }
    fn write_vectored(&self, offset: u64, iov: &[IoSlice<'_>], fua: bool) -> BlockResult<()> {
        self.grow_for(offset + crate::iov::total_len(iov) as u64)?;
        self.image.write(offset, iov)?;
        if fua {
            self.image.flush()?;
        }
        Ok(())
    }
    fn flush(&self) -> BlockResult<()> {
        self.image.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.image.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool, fua: bool) -> BlockResult<()> {
        self.grow_for(offset + len)?;
        self.image.write_zeroes(offset, len)?;
        if fua {
            self.image.flush()?;
        }
        Ok(())
    }
    fn truncate(&self, len: u64) -> BlockResult<()> {
        self.image.resize(len)?;
        self.len.store(self.image.size()?, Ordering::Release);
        Ok(())
    }
    fn submit(self: Arc<Self>, req: IoRequest, done: Completion) {
        if matches!(req.op, IoOp::Write | IoOp::WriteZeroes { .. }) {
            if let Err(e) = self.grow_for(req.offset + req.byte_len()) {
                return done(req, Err(e));
            }
        }
        self.image.submit(req, done)
    }
    fn filename(&self) -> Option<String> {
        Some(self.name.clone())
    }
}

/// The `rbd` class: open, and create for `strata-img create` and
/// `convert` targets.
pub struct RbdClass;

impl DriverClass for RbdClass {
    fn name(&self) -> &str {
        "rbd"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }
    fn open(&self, ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        RbdNode::open(ctx)
    }
    fn create_protocol(&self, name: &str, opts: Map) -> BlockResult<()> {
        let mut o = Options::new(name, opts);
        let _ = o.take_str("driver")?;
        let t = Target::parse(&mut o)?;
        if t.snapshot.is_some() {
            return Err(BlockError::Open(format!(
                "{name}: Can't use snapshot name for image creation"
            )));
        }
        let io = t.connect()?;
        // Empty: the format sizes it through the node, as for files.
        io.create_image(&t.image, 0)
            .map_err(|e| BlockError::Open(format!("{name}: {e}")))
    }
}
