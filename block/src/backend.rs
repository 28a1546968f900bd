//! `BlockBackend`: what a guest device attaches to (QEMU's
//! `block/block-backend.c` vocabulary and `-drive` `rerror`/`werror`
//! semantics from the `qemu(1)` man page).
//!
//! # API for devices
//!
//! A `BlockBackend` is `Send + Sync` and shared as `Arc<BlockBackend>`.
//!
//! Blocking convenience methods (for tools, tests and simple devices):
//! [`BlockBackend::read_at`], [`write_at`](BlockBackend::write_at),
//! [`flush`](BlockBackend::flush), [`discard`](BlockBackend::discard),
//! [`write_zeroes`](BlockBackend::write_zeroes),
//! [`block_status`](BlockBackend::block_status),
//! [`truncate`](BlockBackend::truncate), and the vectored
//! [`readv_at`](BlockBackend::readv_at) / [`writev_at`](BlockBackend::writev_at).
//!
//! Media: [`BlockBackend::new_empty`] makes a backend without a medium (an
//! empty CD-ROM or floppy drive; requests fail with `ENOMEDIUM`),
//! [`insert`](BlockBackend::insert) / [`eject`](BlockBackend::eject) change
//! it, [`is_inserted`](BlockBackend::is_inserted) tells.
//!
//! Asynchronous submission (for devices, off the vCPU thread):
//! [`BlockBackend::submit`] takes an [`IoRequest`] (operation, offset and
//! [`IoVecs`], which may point into guest memory) and a
//! completion callback, called exactly once on an I/O thread with the request
//! (buffers included) and its result. [`CompletionQueue`] turns callbacks
//! into a queue plus an `eventfd`, for event loops.
//!
//! Policies applied here, in this order: read-only and range checks (errors
//! returned directly, like QEMU's `-EIO`/`-EACCES` checks), the write cache
//! (with WCE off every write and write-zeroes carries FUA: durable before it
//! completes), throttling (`throttling.*` leaky buckets, see
//! [`crate::throttle`]), I/O statistics per operation kind (ops, bytes, failures,
//! latency), and the error policy: `report` returns the error, `ignore`
//! completes successfully, `stop` parks the request, calls the stop handler
//! (the VM pauses) and retries it on [`BlockBackend::resume`], `enospc`
//! stops on `ENOSPC` and reports other errors. `rerror` applies to reads,
//! `werror` to everything else.

use crate::driver::{Completion, Extent, IoOp, IoRequest, Perms};
use crate::error::{BlockError, BlockResult};
use crate::iov::IoVecs;
use crate::node::{Node, PermHandle};
use crate::throttle::{Throttle, ThrottleConfig};
use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// `rerror=`/`werror=` action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ErrorAction {
    /// Return the error to the guest.
    #[default]
    Report,
    /// Pretend success.
    Ignore,
    /// Pause the VM; retry on resume.
    Stop,
    /// Stop on ENOSPC, report otherwise.
    Enospc,
}

impl ErrorAction {
    /// Parse QEMU's spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "report" => Some(ErrorAction::Report),
            "ignore" => Some(ErrorAction::Ignore),
            "stop" => Some(ErrorAction::Stop),
            "enospc" => Some(ErrorAction::Enospc),
            _ => None,
        }
    }
    /// QEMU's spelling.
    pub fn name(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
            ErrorAction::Enospc => "enospc",
        }
    }
}

/// How a backend is configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    /// Refuse writes (also implied by a read-only root node).
    pub read_only: bool,
    /// The write cache (WCE) starts enabled.
    pub write_cache: bool,
    /// Read error action.
    pub rerror: ErrorAction,
    /// Write error action.
    pub werror: ErrorAction,
    /// Take the resize permission (tools that truncate).
    pub resize: bool,
    /// What other users may do meanwhile. Devices (QEMU's default,
    /// `share-rw=off`) share consistent read, write-unchanged and resize
    /// (QEMU's disks are resizable: `block_resize` grows them under the
    /// guest); tools such as `strata-img` share everything, as `qemu-img`
    /// does.
    pub shared: Perms,
    /// I/O limits (`throttling.*`).
    pub throttle: ThrottleConfig,
    /// `throttling.group`: share the limits with other backends.
    pub throttle_group: Option<String>,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            read_only: false,
            write_cache: true,
            rerror: ErrorAction::Report,
            werror: ErrorAction::Enospc,
            resize: false,
            shared: Perms::CONSISTENT_READ
                .union(Perms::WRITE_UNCHANGED)
                .union(Perms::RESIZE),
            throttle: ThrottleConfig::default(),
            throttle_group: None,
        }
    }
}

/// Statistics of one operation kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpStats {
    /// Completed operations.
    pub ops: u64,
    /// Bytes transferred (or covered, for discard/zeroes).
    pub bytes: u64,
    /// Failed operations (before the error policy).
    pub failed: u64,
    /// Sum of latencies in nanoseconds.
    pub total_time_ns: u64,
}

/// Statistics per operation kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Reads.
    pub read: OpStats,
    /// Writes.
    pub write: OpStats,
    /// Flushes.
    pub flush: OpStats,
    /// Discards.
    pub discard: OpStats,
    /// Write-zeroes.
    pub write_zeroes: OpStats,
}

#[derive(Default)]
struct AtomicOpStats {
    ops: AtomicU64,
    bytes: AtomicU64,
    failed: AtomicU64,
    ns: AtomicU64,
}

impl AtomicOpStats {
    fn get(&self) -> OpStats {
        OpStats {
            ops: self.ops.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            total_time_ns: self.ns.load(Ordering::Relaxed),
        }
    }
}

fn kind_index(op: IoOp) -> usize {
    match op {
        IoOp::Read => 0,
        IoOp::Write => 1,
        IoOp::Flush => 2,
        IoOp::Discard => 3,
        IoOp::WriteZeroes { .. } => 4,
    }
}

type StopHandler = Arc<dyn Fn(IoOp, ErrorAction, &BlockError) + Send + Sync>;

#[derive(Default)]
struct PauseState {
    stopped: bool,
    generation: u64,
    parked: Vec<(IoRequest, Completion)>,
}

/// The medium: a root node and the permissions taken on it.
struct Attached {
    node: Arc<Node>,
    _perm: PermHandle,
    read_only: bool,
}

/// What a device attaches to.
pub struct BlockBackend {
    id: String,
    root: std::sync::RwLock<Option<Attached>>,
    cfg: BackendConfig,
    wce: AtomicBool,
    /// `rerror`/`werror`: from the `-drive`, or the device's own
    /// properties (QEMU's `-blockdev` + `-device ...,werror=` form).
    errors: Mutex<(ErrorAction, ErrorAction)>,
    stats: [AtomicOpStats; 5],
    pause: Mutex<PauseState>,
    resumed: Condvar,
    stop_handler: Mutex<Option<StopHandler>>,
    /// The limits in force, if any; replaced by `block_set_io_throttle`.
    throttle: std::sync::RwLock<Option<Arc<Throttle>>>,
    /// Devices to tell when the medium's size changes.
    resize_listeners: Mutex<Vec<ResizeListener>>,
    /// Requests between submission to the root node and completion.
    inflight: AtomicU64,
    /// True while someone drains the backend ([`BlockBackend::drained`]):
    /// new requests wait in `quiesce` instead of going to the root.
    quiesced: AtomicBool,
    quiesce: Mutex<Quiesce>,
    /// Signalled when `inflight` drops to zero while quiesced, and when
    /// the quiesced section ends.
    idle: Condvar,
}

/// A drained section of a backend ([`BlockBackend::drain_begin`]); it
/// ends, and queued requests go on, when this is dropped.
#[must_use = "the drained section ends when the guard is dropped"]
pub struct DrainGuard {
    blk: Arc<BlockBackend>,
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        self.blk.drain_end();
    }
}

impl std::fmt::Debug for DrainGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainGuard")
            .field("blk", &self.blk.id)
            .finish()
    }
}

#[derive(Default)]
struct Quiesce {
    depth: u32,
    queued: Vec<(IoRequest, Completion)>,
}

type ResizeListener = Box<dyn Fn() -> bool + Send + Sync>;

impl std::fmt::Debug for BlockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockBackend")
            .field("id", &self.id)
            .field("root", &self.root().map(|n| n.name().to_string()))
            .finish()
    }
}

impl BlockBackend {
    /// Attach a backend named `id` to `root`, taking permissions (and thus
    /// image locks): consistent read, plus write unless read-only (plus
    /// resize if asked); sharing `cfg.shared`, or everything with `force-share`.
    pub fn new(id: &str, root: Arc<Node>, cfg: BackendConfig) -> BlockResult<Arc<BlockBackend>> {
        let blk = Self::new_empty(id, cfg);
        blk.insert(root)?;
        Ok(blk)
    }

    /// A backend with no medium (an empty CD-ROM or floppy drive). Requests
    /// fail with `ENOMEDIUM` until [`BlockBackend::insert`].
    pub fn new_empty(id: &str, cfg: BackendConfig) -> Arc<BlockBackend> {
        let throttle = match &cfg.throttle_group {
            Some(g) => Some(Throttle::group(g, cfg.throttle)),
            None if cfg.throttle.enabled() => Some(Throttle::new(cfg.throttle)),
            None => None,
        };
        Arc::new(BlockBackend {
            id: id.to_string(),
            root: std::sync::RwLock::new(None),
            wce: AtomicBool::new(cfg.write_cache),
            errors: Mutex::new((cfg.rerror, cfg.werror)),
            cfg,
            stats: Default::default(),
            pause: Mutex::new(PauseState::default()),
            resumed: Condvar::new(),
            stop_handler: Mutex::new(None),
            throttle: std::sync::RwLock::new(throttle),
            resize_listeners: Mutex::new(Vec::new()),
            inflight: AtomicU64::new(0),
            quiesced: AtomicBool::new(false),
            quiesce: Mutex::new(Quiesce::default()),
            idle: Condvar::new(),
        })
    }

    /// Insert a medium (QEMU's `blockdev-insert-medium`).
    pub fn insert(&self, root: Arc<Node>) -> BlockResult<()> {
        let mut slot = self.root.write().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return Err(BlockError::Permission(format!(
                "Block device '{}' already has a medium inserted",
                self.id
            )));
        }
        *slot = Some(self.attach_root(root)?);
        Ok(())
    }

    /// Take this backend's permissions on `root`.
    fn attach_root(&self, root: Arc<Node>) -> BlockResult<Attached> {
        let read_only = self.cfg.read_only || root.is_read_only();
        let mut perm = Perms::CONSISTENT_READ;
        if !read_only {
            perm = perm.union(Perms::WRITE);
            if self.cfg.resize {
                perm = perm.union(Perms::RESIZE);
            }
        }
        let shared = if root.common().force_share {
            Perms::ALL
        } else {
            self.cfg.shared
        };
        let user = if self.id.is_empty() {
            "a block backend".to_string()
        } else {
            format!("block device '{}'", self.id)
        };
        let handle = root.attach(&user, perm, shared)?;
        Ok(Attached {
            node: root,
            _perm: handle,
            read_only,
        })
    }

    /// Make `new` the root in place of the current one (a snapshot's
    /// overlay, a mirror's target, a commit's base), returning the old
    /// root. The old root's permissions go first, so that the new root
    /// may be a node the old one had as a child; if the new root cannot
    /// be attached the old one is attached again and the error returned.
    /// Call it inside [`BlockBackend::drained`].
    pub fn replace_root(&self, new: Arc<Node>) -> BlockResult<Arc<Node>> {
        let mut slot = self.root.write().unwrap_or_else(|e| e.into_inner());
        let Some(old) = slot.take() else {
            return Err(BlockError::NoMedium(format!("Block device '{}'", self.id)));
        };
        let old_node = old.node.clone();
        let old_len = old_node.len();
        drop(old);
        match self.attach_root(new.clone()) {
            Ok(a) => *slot = Some(a),
            Err(e) => {
                *slot = Some(self.attach_root(old_node)?);
                return Err(e);
            }
        }
        drop(slot);
        if new.len() != old_len {
            self.resized();
        }
        Ok(old_node)
    }

    /// Run `f` with no request of this backend in flight: new requests
    /// wait (without a thread) until `f` returns, then go on in order.
    /// Graph changes under a backend happen in here (QEMU's drained
    /// sections). Sections nest.
    pub fn drained<R>(self: &Arc<Self>, f: impl FnOnce() -> R) -> R {
        let _guard = self.drain_begin();
        f()
    }

    /// Open a drained section that lasts as long as the returned guard:
    /// wait until no request of this backend is in flight; new requests
    /// queue (without a thread) until the guard drops, then go on in
    /// order. Requests parked by a `stop` error policy are not in flight
    /// and stay parked (see [`BlockBackend::take_parked`]). What live
    /// migration holds from stopping the machine until the images are
    /// handed over; sections nest.
    pub fn drain_begin(self: &Arc<Self>) -> DrainGuard {
        let mut q = self.quiesce.lock().unwrap_or_else(|e| e.into_inner());
        q.depth += 1;
        self.quiesced.store(true, Ordering::SeqCst);
        while self.inflight.load(Ordering::SeqCst) != 0 {
            q = self
                .idle
                .wait_timeout(q, std::time::Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        DrainGuard { blk: self.clone() }
    }

    fn drain_end(self: &Arc<Self>) {
        let queued = {
            let mut q = self.quiesce.lock().unwrap_or_else(|e| e.into_inner());
            q.depth -= 1;
            if q.depth > 0 {
                return;
            }
            self.quiesced.store(false, Ordering::SeqCst);
            std::mem::take(&mut q.queued)
        };
        self.idle.notify_all();
        for (req, done) in queued {
            self.submit_checked(req, done);
        }
    }

    /// Forget the requests parked by a `stop` error policy, returning how
    /// many there were: the source of a live migration, once the
    /// destination has the machine (whose devices issue those requests
    /// again from guest memory there). Their completions are dropped, not
    /// run: running them, even with an error, would complete the request
    /// into the device and the guest (status registers, interrupts,
    /// guest memory) of a machine that has been handed over, and an
    /// error could be reported to the management as a new failure. Their
    /// buffers are freed; a caller waiting on a completion sees its
    /// sender go. A synchronous request waiting for `resume` stays
    /// waiting. The backend stays stopped: after a successful migration
    /// the source machine never runs again, so call this only then (after
    /// a failed one, [`BlockBackend::resume`] retries them as usual).
    pub fn take_parked(&self) -> usize {
        let parked = {
            let mut p = self.pause.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut p.parked)
        };
        let n = parked.len();
        // Dropped outside the lock: a completion's captures may do
        // anything when they go.
        drop(parked);
        n
    }

    /// Requests submitted and not yet completed.
    pub fn in_flight(&self) -> u64 {
        self.inflight.load(Ordering::SeqCst)
    }

    /// Count a request in flight, unless a drained section is open: then
    /// `Some` gives the request back to wait in the queue.
    fn enter(&self, req: IoRequest, done: Completion) -> Option<(IoRequest, Completion)> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        if !self.quiesced.load(Ordering::SeqCst) {
            return Some((req, done));
        }
        let mut q = self.quiesce.lock().unwrap_or_else(|e| e.into_inner());
        if q.depth == 0 {
            return Some((req, done));
        }
        self.inflight.fetch_sub(1, Ordering::SeqCst);
        self.idle.notify_all();
        q.queued.push((req, done));
        None
    }

    /// A request left: wake a drain waiting for the last one.
    fn leave(&self) {
        if self.inflight.fetch_sub(1, Ordering::SeqCst) == 1 && self.quiesced.load(Ordering::SeqCst)
        {
            let _q = self.quiesce.lock().unwrap_or_else(|e| e.into_inner());
            self.idle.notify_all();
        }
    }

    /// The synchronous counterpart of [`BlockBackend::enter`]: wait for a
    /// drained section to end, then count the request.
    fn enter_sync(&self) {
        loop {
            self.inflight.fetch_add(1, Ordering::SeqCst);
            if !self.quiesced.load(Ordering::SeqCst) {
                return;
            }
            let mut q = self.quiesce.lock().unwrap_or_else(|e| e.into_inner());
            if q.depth == 0 {
                return;
            }
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            self.idle.notify_all();
            while q.depth > 0 {
                q = self.idle.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    /// Remove the medium (QEMU's `blockdev-remove-medium`), releasing its
    /// permissions and image locks. Refused while requests are parked by a
    /// `stop` error policy.
    pub fn eject(&self) -> BlockResult<Arc<Node>> {
        if !self
            .pause
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .parked
            .is_empty()
        {
            return Err(BlockError::Permission(format!(
                "Block device '{}' has requests waiting for resume",
                self.id
            )));
        }
        let mut slot = self.root.write().unwrap_or_else(|e| e.into_inner());
        match slot.take() {
            Some(a) => Ok(a.node.clone()),
            None => Err(BlockError::NoMedium(format!("Block device '{}'", self.id))),
        }
    }

    /// True if a medium is inserted.
    pub fn is_inserted(&self) -> bool {
        self.root
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn node(&self) -> BlockResult<Arc<Node>> {
        self.root
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|a| a.node.clone())
            .ok_or_else(|| BlockError::NoMedium(format!("Block device '{}'", self.id)))
    }

    /// Time a request must wait under the throttling limits (reserving it).
    fn throttle_delay(&self, op: IoOp, bytes: u64) -> std::time::Duration {
        let t = self.throttle.read().unwrap_or_else(|e| e.into_inner());
        match (t.as_ref(), op) {
            (Some(t), IoOp::Read) => t.reserve(false, bytes),
            (Some(t), IoOp::Write | IoOp::WriteZeroes { .. }) => t.reserve(true, bytes),
            _ => std::time::Duration::ZERO,
        }
    }

    /// The I/O limits in force (all zero: none) and the group, if any.
    pub fn io_limits(&self) -> ThrottleConfig {
        let t = self.throttle.read().unwrap_or_else(|e| e.into_inner());
        t.as_ref().map(|t| t.config()).unwrap_or_default()
    }

    /// Replaces the I/O limits (QMP `block_set_io_throttle`): `group`
    /// joins (or creates) a throttle group; limits of all zero remove
    /// throttling. Requests already waiting keep their dispatch time.
    pub fn set_io_limits(&self, cfg: ThrottleConfig, group: Option<&str>) {
        let mut t = self.throttle.write().unwrap_or_else(|e| e.into_inner());
        *t = match group {
            Some(g) => {
                let th = Throttle::group(g, cfg);
                th.set_config(cfg);
                Some(th)
            }
            None if !cfg.enabled() => None,
            None => match t.as_ref() {
                Some(th) => {
                    th.set_config(cfg);
                    Some(th.clone())
                }
                None => Some(Throttle::new(cfg)),
            },
        };
    }

    /// The backend id (`-drive id=`).
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The root node, if a medium is inserted.
    pub fn root(&self) -> Option<Arc<Node>> {
        self.node().ok()
    }
    /// Size in bytes (0 without a medium).
    pub fn len(&self) -> u64 {
        self.node().map(|n| n.len()).unwrap_or(0)
    }
    /// True for a zero-length medium.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Read-only backend (configured so, or its medium is read-only).
    pub fn is_read_only(&self) -> bool {
        self.cfg.read_only
            || self
                .root
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_some_and(|a| a.read_only)
    }
    /// Switch the guest-visible write cache (WCE) at runtime.
    pub fn set_write_cache(&self, on: bool) {
        self.wce.store(on, Ordering::SeqCst);
    }
    /// Current WCE state.
    pub fn write_cache_enabled(&self) -> bool {
        self.wce.load(Ordering::SeqCst)
    }
    /// Read error action.
    pub fn rerror(&self) -> ErrorAction {
        self.errors.lock().unwrap_or_else(|e| e.into_inner()).0
    }
    /// Write error action.
    pub fn werror(&self) -> ErrorAction {
        self.errors.lock().unwrap_or_else(|e| e.into_inner()).1
    }
    /// The error actions of the device now using the backend: its
    /// `rerror=`/`werror=` where given, the drive's otherwise (so what a
    /// device that left had set does not stay for the next one).
    pub fn set_error_actions(&self, rerror: Option<ErrorAction>, werror: Option<ErrorAction>) {
        *self.errors.lock().unwrap_or_else(|e| e.into_inner()) = (
            rerror.unwrap_or(self.cfg.rerror),
            werror.unwrap_or(self.cfg.werror),
        );
    }
    /// Logical block alignment of the root (512 or 4096 under O_DIRECT, 1 otherwise).
    pub fn request_alignment(&self) -> u64 {
        self.node()
            .map(|n| n.limits().request_alignment)
            .unwrap_or(512)
    }
    /// Statistics snapshot.
    pub fn stats(&self) -> BlockStats {
        BlockStats {
            read: self.stats[0].get(),
            write: self.stats[1].get(),
            flush: self.stats[2].get(),
            discard: self.stats[3].get(),
            write_zeroes: self.stats[4].get(),
        }
    }
    /// Called (on an I/O thread) for every failed request with the
    /// action its error policy took (QMP's BLOCK_IO_ERROR). After
    /// [`ErrorAction::Stop`] the backend is stopped: the VM should pause,
    /// and call [`BlockBackend::resume`] on continue.
    pub fn set_error_handler(
        &self,
        f: impl Fn(IoOp, ErrorAction, &BlockError) + Send + Sync + 'static,
    ) {
        *self.stop_handler.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(f));
    }
    /// True while requests are parked by a `stop` policy.
    pub fn is_stopped(&self) -> bool {
        self.pause.lock().unwrap_or_else(|e| e.into_inner()).stopped
    }
    /// Retry every parked request (the VM continues).
    pub fn resume(self: &Arc<Self>) {
        let parked = {
            let mut p = self.pause.lock().unwrap_or_else(|e| e.into_inner());
            p.stopped = false;
            p.generation += 1;
            std::mem::take(&mut p.parked)
        };
        self.resumed.notify_all();
        for (req, done) in parked {
            self.submit_checked(req, done);
        }
    }

    fn action_for(&self, op: IoOp, e: &BlockError) -> ErrorAction {
        let a = if op == IoOp::Read {
            self.rerror()
        } else {
            self.werror()
        };
        match a {
            ErrorAction::Enospc if e.errno() == libc::ENOSPC => ErrorAction::Stop,
            ErrorAction::Enospc => ErrorAction::Report,
            other => other,
        }
    }

    fn account(&self, op: IoOp, bytes: u64, start: Instant, ok: bool) {
        let s = &self.stats[kind_index(op)];
        s.ops.fetch_add(1, Ordering::Relaxed);
        if ok {
            s.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            s.failed.fetch_add(1, Ordering::Relaxed);
        }
        s.ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Tells the error handler what happened to a failed request.
    fn report(&self, op: IoOp, action: ErrorAction, e: &BlockError) {
        let h = self
            .stop_handler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(h) = h {
            h(op, action, e);
        }
    }

    fn check(&self, op: IoOp, offset: u64, len: u64) -> BlockResult<()> {
        // One look at the root for the medium, read-only and the size
        // (every request passes here).
        let root = self.root.read().unwrap_or_else(|e| e.into_inner());
        let Some(a) = root.as_ref() else {
            return Err(BlockError::NoMedium(format!("Block device '{}'", self.id)));
        };
        if op != IoOp::Read && op != IoOp::Flush && (self.cfg.read_only || a.read_only) {
            return Err(BlockError::ReadOnly(format!("Block device '{}'", self.id)));
        }
        if op != IoOp::Flush {
            crate::driver::check_range(&self.id, offset, len, a.node.len())?;
        }
        Ok(())
    }

    /// Run a synchronous operation under stats and the error policy.
    fn run(
        &self,
        op: IoOp,
        offset: u64,
        bytes: u64,
        mut f: impl FnMut(&Node) -> BlockResult<()>,
    ) -> BlockResult<()> {
        self.check(op, offset, bytes)?;
        let delay = self.throttle_delay(op, bytes);
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        loop {
            let start = Instant::now();
            self.enter_sync();
            // The root is looked up inside: a drained section may have
            // replaced it while this request waited.
            let r = self.node().and_then(|root| f(&root));
            self.leave();
            self.account(op, bytes, start, r.is_ok());
            let e = match r {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let action = self.action_for(op, &e);
            if action != ErrorAction::Stop {
                self.report(op, action, &e);
            }
            match action {
                ErrorAction::Report | ErrorAction::Enospc => return Err(e),
                ErrorAction::Ignore => return Ok(()),
                ErrorAction::Stop => {
                    let gen = {
                        let mut p = self.pause.lock().unwrap_or_else(|e| e.into_inner());
                        p.stopped = true;
                        p.generation
                    };
                    self.report(op, action, &e);
                    let mut p = self.pause.lock().unwrap_or_else(|e| e.into_inner());
                    while p.generation == gen {
                        p = self.resumed.wait(p).unwrap_or_else(|e| e.into_inner());
                    }
                }
            }
        }
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.readv_at(offset, &mut [IoSliceMut::new(buf)])
    }
    /// Vectored read.
    pub fn readv_at(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        let len = crate::iov::total_len_mut(iov) as u64;
        self.run(IoOp::Read, offset, len, |root| {
            root.read_vectored(offset, iov)
        })
    }
    /// Write `buf` at `offset` (FUA when the write cache is off).
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        self.writev_at(offset, &[IoSlice::new(buf)])
    }
    /// Vectored write.
    pub fn writev_at(&self, offset: u64, iov: &[IoSlice<'_>]) -> BlockResult<()> {
        self.writev_at_fua(offset, iov, false)
    }
    /// Vectored write with explicit FUA (also forced when WCE is off).
    pub fn writev_at_fua(&self, offset: u64, iov: &[IoSlice<'_>], fua: bool) -> BlockResult<()> {
        let len = crate::iov::total_len(iov) as u64;
        let fua = fua || !self.write_cache_enabled();
        self.run(IoOp::Write, offset, len, |root| {
            root.write_vectored(offset, iov, fua)
        })
    }
    /// Write whole clusters of `buf` at `offset` to be stored compressed
    /// (a request with [`crate::driver::IoFlags::COMPRESSED`]); refused by
    /// formats that cannot compress.
    pub fn write_compressed_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        self.run(IoOp::Write, offset, buf.len() as u64, |root| {
            root.write_compressed(offset, buf)
        })
    }
    /// Flush the write cache down to stable storage.
    pub fn flush(&self) -> BlockResult<()> {
        self.run(IoOp::Flush, 0, 0, |root| root.flush())
    }
    /// Discard (honoured only with `discard=unmap`).
    pub fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.run(IoOp::Discard, offset, len, |root| root.discard(offset, len))
    }
    /// Make a range read as zeroes.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> BlockResult<()> {
        let fua = !self.write_cache_enabled();
        self.run(IoOp::WriteZeroes { may_unmap }, offset, len, |root| {
            root.write_zeroes(offset, len, may_unmap, fua)
        })
    }
    /// Allocation status of the run starting at `offset`.
    pub fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.node()?.block_status(offset, len)
    }
    /// The run at `offset` and the depth of the backing chain layer that
    /// provides it (see [`Node::allocation_depth`]).
    pub fn allocation_depth(&self, offset: u64, len: u64) -> BlockResult<(u64, u32)> {
        self.node()?.allocation_depth(offset, len)
    }
    /// Resize (needs `BackendConfig::resize`).
    pub fn truncate(&self, len: u64) -> BlockResult<()> {
        if self.is_read_only() {
            return Err(BlockError::ReadOnly(format!("Block device '{}'", self.id)));
        }
        self.node()?.truncate(len)?;
        self.resized();
        Ok(())
    }

    /// Registers `f` to run after the medium's size changed (`block_resize`):
    /// the device attached to this backend tells its guest. `f` returns
    /// false once its device is gone, and is then dropped.
    pub fn on_resize(&self, f: impl Fn() -> bool + Send + Sync + 'static) {
        self.resize_listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(f));
    }

    /// Tells the attached devices that the medium's size changed (also for
    /// a resize of the root node done without this backend).
    pub fn resized(&self) {
        self.resize_listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|f| f());
    }

    /// Submit a request; `done` runs exactly once, on an I/O thread (or in
    /// the caller's thread, before `submit` returns, for immediate errors
    /// and requests that need no I/O: `null-co`, qcow2 reads of zero or
    /// unallocated clusters).
    pub fn submit(self: &Arc<Self>, mut req: IoRequest, done: Completion) {
        if let Err(e) = self.check(req.op, req.offset, req.byte_len()) {
            done(req, Err(e));
            return;
        }
        if matches!(req.op, IoOp::Write | IoOp::WriteZeroes { .. }) && !self.write_cache_enabled() {
            req.fua = true;
        }
        let delay = self.throttle_delay(req.op, req.byte_len());
        if !delay.is_zero() {
            let me = self.clone();
            crate::throttle::run_after(delay, Box::new(move || me.submit_checked(req, done)));
            return;
        }
        self.submit_checked(req, done);
    }

    fn submit_checked(self: &Arc<Self>, req: IoRequest, done: Completion) {
        let start = Instant::now();
        let op = req.op;
        let bytes = req.byte_len();
        let Some((req, done)) = self.enter(req, done) else {
            return;
        };
        let root = match self.node() {
            Ok(r) => r,
            Err(e) => {
                self.leave();
                return done(req, Err(e));
            }
        };
        let me = self.clone();
        root.submit(
            req,
            Box::new(move |req, r| {
                me.leave();
                me.account(op, bytes, start, r.is_ok());
                // The backend reference is dropped before `done` runs, so a
                // caller that drops its last reference after the completion
                // really releases the backend (and its image locks).
                let e = match r {
                    Ok(()) => {
                        drop(me);
                        return done(req, Ok(()));
                    }
                    Err(e) => e,
                };
                let action = me.action_for(op, &e);
                match action {
                    ErrorAction::Report | ErrorAction::Enospc => {
                        me.report(op, action, &e);
                        drop(me);
                        done(req, Err(e))
                    }
                    ErrorAction::Ignore => {
                        me.report(op, action, &e);
                        drop(me);
                        done(req, Ok(()))
                    }
                    ErrorAction::Stop => {
                        {
                            let mut p = me.pause.lock().unwrap_or_else(|e| e.into_inner());
                            p.stopped = true;
                            p.parked.push((req, done));
                        }
                        me.report(op, action, &e);
                    }
                }
            }),
        );
    }
}

/// Completion record delivered through a [`CompletionQueue`].
pub type Completed = (u64, IoRequest, BlockResult<()>);

/// Completions as a queue plus an `eventfd` that becomes readable when
/// entries are waiting (for an event loop).
pub struct CompletionQueue {
    efd: OwnedFd,
    items: Mutex<VecDeque<Completed>>,
    cv: Condvar,
}

impl CompletionQueue {
    /// A new queue.
    pub fn new() -> std::io::Result<Arc<Self>> {
        // SAFETY: eventfd has no memory effects; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Arc::new(CompletionQueue {
            // SAFETY: fd was just created and is owned by nobody else.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
            items: Mutex::new(VecDeque::new()),
            cv: Condvar::new(),
        }))
    }
    /// The eventfd to poll.
    pub fn eventfd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }
    /// A completion callback that queues `(tag, request, result)`.
    pub fn completion(self: &Arc<Self>, tag: u64) -> Completion {
        let q = self.clone();
        Box::new(move |req, r| {
            q.items
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back((tag, req, r));
            q.cv.notify_all();
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
            unsafe { libc::write(q.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        })
    }
    /// Take every queued completion (and reset the eventfd).
    pub fn drain(&self) -> Vec<Completed> {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64; EAGAIN when empty is fine.
        unsafe { libc::read(self.efd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        self.items
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect()
    }
    /// Block until at least one completion is queued, then drain.
    pub fn wait(&self) -> Vec<Completed> {
        {
            let mut g = self.items.lock().unwrap_or_else(|e| e.into_inner());
            while g.is_empty() {
                g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        }
        self.drain()
    }
}

/// Build an owned-buffer read request (convenience).
pub fn read_request(offset: u64, len: usize) -> IoRequest {
    IoRequest::read(offset, IoVecs::from_vec(vec![0u8; len]))
}
