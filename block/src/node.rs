//! A node of the block graph: a driver plus QEMU's generic node options
//! (`read-only`, `cache.no-flush`, `discard`, `detect-zeroes`), its children
//! and the permissions its parents hold on it.
//!
//! Permissions follow QEMU's model (the `BLK_PERM_*` bits of
//! `include/block/block-common.h`): every user of a node (a `BlockBackend`,
//! or a parent node through one child edge) declares what it uses (`perm`)
//! and what it lets others do (`shared`). A new user is refused when it needs
//! something another user does not share, or does not share something
//! another user needs; this is checked at every node. A node passes the
//! union of what its users need and the intersection of what they share to
//! its `file`-like children, with QEMU's adjustments for a format's
//! metadata child (consistent read, write and resize while writable, never
//! shared for write or resize, so a reader without `force-share` is refused
//! while another process writes the image, as `qemu-img` is), asks only
//! consistent read of a `backing` child (which must not be written or
//! resized under it), and a protocol node turns its aggregate into image
//! locks.

use crate::bitmap::DirtyBitmap;
use crate::driver::{BlockDriver, Completion, Extent, IoOp, IoRequest, Limits, Perms};
use crate::error::{BlockError, BlockResult};
use crate::iov;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

/// One child edge of a node: the only owner of the child. The parent
/// node, its driver (qcow2 reads unallocated clusters from its `backing`
/// slot) and the format layer (through [`crate::qcow2::ChildStorage`])
/// share the slot, so that a graph change (`block-stream`, `block-commit`,
/// `blockdev-snapshot`) replaces the child everywhere at once. A slot may
/// be empty: a qcow2 node always has a `backing` slot, which holds nothing
/// while the image has no backing file.
pub struct Child {
    role: String,
    node: RwLock<Option<Arc<Node>>>,
}

impl std::fmt::Debug for Child {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Child")
            .field("role", &self.role)
            .field("node", &self.get().map(|n| n.name().to_string()))
            .finish()
    }
}

impl Child {
    /// A slot for `role` holding `node`.
    pub fn new(role: &str, node: Option<Arc<Node>>) -> Arc<Child> {
        Arc::new(Child {
            role: role.to_string(),
            node: RwLock::new(node),
        })
    }
    /// The role (`file`, `backing`, `data-file`, `image`, ...).
    pub fn role(&self) -> &str {
        &self.role
    }
    /// The child now in the slot.
    pub fn get(&self) -> Option<Arc<Node>> {
        self.node.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn set(&self, node: Option<Arc<Node>>) -> Option<Arc<Node>> {
        std::mem::replace(
            &mut *self.node.write().unwrap_or_else(|e| e.into_inner()),
            node,
        )
    }
}

/// Told before a write reaches a node, while the old data is still there
/// (the copy-before-write of `backup`, QEMU's `copy-before-write` filter).
/// It runs on a worker thread and may do blocking I/O; the write waits.
pub trait BeforeWrite: Send + Sync {
    /// `[offset, offset+len)` is about to change.
    fn before_write(&self, offset: u64, len: u64);
}

/// What watches a node's writes: dirty bitmaps and before-write hooks.
#[derive(Default)]
struct Watchers {
    bitmaps: Vec<Arc<DirtyBitmap>>,
    before: Vec<(u64, Arc<dyn BeforeWrite>)>,
    next_id: u64,
}

/// `detect-zeroes=off|on|unmap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// No detection.
    #[default]
    Off,
    /// Zero writes become write-zeroes.
    On,
    /// Zero writes become write-zeroes that may unmap (if `discard=unmap`).
    Unmap,
}

impl DetectZeroes {
    /// Parse QEMU's spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(DetectZeroes::Off),
            "on" => Some(DetectZeroes::On),
            "unmap" => Some(DetectZeroes::Unmap),
            _ => None,
        }
    }
    /// QEMU's spelling.
    pub fn name(self) -> &'static str {
        match self {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        }
    }
}

/// Generic options every node has.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeCommon {
    /// `read-only`.
    pub read_only: bool,
    /// `auto-read-only`.
    pub auto_read_only: bool,
    /// `force-share`.
    pub force_share: bool,
    /// `cache.direct`.
    pub direct: bool,
    /// `cache.no-flush`.
    pub no_flush: bool,
    /// `discard=unmap` (true) or `ignore` (false).
    pub discard_unmap: bool,
    /// `detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
}

struct User {
    id: u64,
    /// A block job's own use: it does not conflict with the graph's edges
    /// (a commit writes into a backing node, what QEMU's job filter nodes
    /// declare), only with backends and other jobs.
    job: bool,
    /// How errors name this user ("block device 'd0'", "node 'n1' as 'file'").
    name: String,
    /// For parent nodes: "parent/role", so that updates replace the entry.
    edge: Option<String>,
    perm: Perms,
    shared: Perms,
}

/// A block node.
pub struct Node {
    name: String,
    auto_named: bool,
    driver: Arc<dyn BlockDriver>,
    common: NodeCommon,
    /// `common.read_only` as it is now ([`Node::reopen`] changes it).
    read_only: AtomicBool,
    children: Vec<Arc<Child>>,
    users: Mutex<(Vec<User>, u64)>,
    /// True while `watchers` has anything, so that plain writes pay one
    /// atomic load.
    watched: AtomicBool,
    watchers: RwLock<Watchers>,
    self_ref: Weak<Node>,
    /// [`Node::close`] ran: the bitmaps are stored and the image is clean,
    /// so dropping the node does not do it again.
    closed: AtomicBool,
    /// Another process owns the image (QEMU's `BDRV_O_INACTIVE`): the
    /// destination of a live migration until the machine's state has
    /// arrived, the source once it has handed its images over. No image
    /// locks are held (the users' permissions are recorded and taken at
    /// [`Node::activate`]), nothing is written, and closing writes nothing.
    inactive: AtomicBool,
    /// Persistent bitmaps are to be loaded when the node becomes active
    /// (opened inactive while the graph loads bitmaps, or stored into the
    /// image and dropped from the node at [`Node::inactivate`]).
    bitmaps_deferred: AtomicBool,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver.driver_name())
            .finish()
    }
}

impl Drop for Node {
    /// A node that goes before [`BlockGraph::close_all`](crate::graph::BlockGraph::close_all)
    /// (an unused implicit node after a pivot, a `blockdev-del`) closes
    /// here.
    fn drop(&mut self) {
        // An inactive node's image belongs to another process.
        if !self.closed.load(Ordering::Acquire) && !self.is_inactive() {
            self.store_persistent_bitmaps();
        }
    }
}

/// A registration of a user on a node; dropping it releases the permissions.
pub struct PermHandle {
    node: Arc<Node>,
    id: u64,
}

impl Drop for PermHandle {
    fn drop(&mut self) {
        self.node.release(self.id);
    }
}

impl Node {
    /// Build a node.
    pub fn new(
        name: String,
        auto_named: bool,
        driver: Arc<dyn BlockDriver>,
        common: NodeCommon,
        children: Vec<Arc<Child>>,
    ) -> Arc<Node> {
        Arc::new_cyclic(|w| Node {
            name,
            auto_named,
            driver,
            read_only: AtomicBool::new(common.read_only),
            common,
            children,
            users: Mutex::new((Vec::new(), 0)),
            watched: AtomicBool::new(false),
            watchers: RwLock::new(Watchers::default()),
            self_ref: w.clone(),
            closed: AtomicBool::new(false),
            inactive: AtomicBool::new(false),
            bitmaps_deferred: AtomicBool::new(false),
        })
    }
    /// A node whose children are given as nodes (each in its own slot).
    pub fn with_children(
        name: String,
        auto_named: bool,
        driver: Arc<dyn BlockDriver>,
        common: NodeCommon,
        children: Vec<(String, Arc<Node>)>,
    ) -> Arc<Node> {
        let slots = children
            .into_iter()
            .map(|(r, n)| Child::new(&r, Some(n)))
            .collect();
        Node::new(name, auto_named, driver, common, slots)
    }
    /// The node-name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// True if the name was generated.
    pub fn is_auto_named(&self) -> bool {
        self.auto_named
    }
    /// The driver name.
    pub fn driver_name(&self) -> &'static str {
        self.driver.driver_name()
    }
    /// The driver object.
    pub fn driver(&self) -> &Arc<dyn BlockDriver> {
        &self.driver
    }
    /// Generic options as opened (`read-only` as it is now: see
    /// [`Node::is_read_only`]).
    pub fn common(&self) -> &NodeCommon {
        &self.common
    }
    /// Children with their roles (`file`, `backing`, `image`, ...).
    /// A qemu-io breakpoint command, run by the first node from here down
    /// (children in order) whose driver takes it; ENOTSUP if none does.
    pub fn debug_command(&self, cmd: &crate::driver::DebugCommand) -> Result<(), i32> {
        if let Some(r) = self.driver.debug_command(cmd) {
            return r;
        }
        for (_, c) in self.children() {
            match c.debug_command(cmd) {
                Err(libc::ENOTSUP) => {}
                r => return r,
            }
        }
        Err(libc::ENOTSUP)
    }

    /// Close the node as QEMU's `bdrv_close` does, whoever else still
    /// holds it: persistent dirty bitmaps go back into the image, the
    /// driver writes back what it caches and marks the image clean, and a
    /// writable node is flushed. Done once; the process exits after it
    /// (threads that still hold the node are not waited for), so this,
    /// not `Drop`, is what makes an image consistent at exit.
    pub fn close(&self) -> BlockResult<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if self.is_inactive() {
            // Handed over (or never taken over): the image is another
            // process's, and what this one had was written back when it
            // became inactive.
            return Ok(());
        }
        self.store_persistent_bitmaps();
        if self.is_read_only() {
            return Ok(());
        }
        self.driver.close()?;
        self.flush()
    }

    /// Persistent dirty bitmaps go back into the image (QEMU stores them
    /// at close); a failure is logged, as there is no one to tell.
    fn store_persistent_bitmaps(&self) {
        if let Err(e) = self.try_store_persistent_bitmaps() {
            log::warn!("{}: could not store the dirty bitmaps: {e}", self.name);
        }
    }

    fn try_store_persistent_bitmaps(&self) -> BlockResult<()> {
        if self.is_read_only() || !self.driver.can_store_bitmaps() {
            return Ok(());
        }
        let list: Vec<Arc<DirtyBitmap>> = self
            .watchers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .bitmaps
            .iter()
            .filter(|b| b.is_persistent())
            .cloned()
            .collect();
        self.driver.store_bitmaps(&list)
    }

    /// Load the persistent dirty bitmaps the image holds and track writes
    /// in them (a writable node, or a driver whose loading writes
    /// nothing); while the node is inactive this waits for
    /// [`Node::activate`], since loading marks them in use in the image.
    pub fn load_persistent_bitmaps(&self) -> BlockResult<()> {
        if self.is_read_only() && !self.driver.bitmaps_load_read_only() {
            return Ok(());
        }
        if self.is_inactive() {
            self.bitmaps_deferred.store(true, Ordering::Release);
            return Ok(());
        }
        for b in self.driver.load_bitmaps()? {
            let _ = self.add_bitmap(Arc::new(b));
        }
        Ok(())
    }

    /// Another process owns the image (see `Node::inactive`).
    pub fn is_inactive(&self) -> bool {
        self.inactive.load(Ordering::Acquire)
    }

    /// Open the node inactive: called by the graph on a node just built,
    /// before anyone could take permissions on it.
    pub(crate) fn set_inactive_at_open(&self) {
        self.inactive.store(true, Ordering::Release);
    }

    /// Hand the image over to another process (the source of a live
    /// migration; QEMU's `bdrv_inactivate_recurse` for one node): the
    /// persistent bitmaps go into the image (and leave the node, to be
    /// loaded again if it becomes active again), the driver writes back
    /// what it caches and marks the image clean, the node is flushed,
    /// then refuses writes, and its image locks go. Parents first (see
    /// [`crate::graph::BlockGraph::inactivate_all`]); the caller has
    /// drained the backends above, so no write is in flight. A node
    /// already inactive is left alone. On an error the node stays
    /// inactive, and [`Node::activate`] takes it back.
    pub fn inactivate(&self) -> BlockResult<()> {
        if self.inactive.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if !self.is_read_only() {
            self.try_store_persistent_bitmaps()?;
            if self.driver.can_store_bitmaps() {
                let stored: Vec<String> = self
                    .bitmaps()
                    .iter()
                    .filter(|b| b.is_persistent())
                    .map(|b| b.name().to_string())
                    .collect();
                for n in &stored {
                    self.remove_bitmap(n);
                }
                if !stored.is_empty() {
                    self.bitmaps_deferred.store(true, Ordering::Release);
                }
            }
            self.driver.inactivate()?;
            if !(self.common.no_flush && self.children.is_empty()) {
                self.driver.flush()?;
            }
        }
        self.driver.set_perms(Perms::NONE, Perms::ALL)
    }

    /// Take the image over (the destination of a live migration once the
    /// machine's state has arrived, or the source again after a failed
    /// one; QEMU's `bdrv_activate` for one node): the image locks the
    /// node's users need are taken (refused as usual while another
    /// process still holds the image), the driver reads what it knows of
    /// the image again, and deferred bitmaps are loaded. Children first
    /// (see [`crate::graph::BlockGraph::activate_all`]). On an error the
    /// node stays inactive, without locks. A bitmap that fails to load is
    /// reported in `Ok(Some(message))`: the node is active all the same.
    pub fn activate(&self) -> BlockResult<Option<String>> {
        if !self.is_inactive() {
            return Ok(None);
        }
        {
            let g = self.users.lock().unwrap_or_else(|e| e.into_inner());
            let (p, s) = aggregate(&g.0);
            self.driver.set_perms(p, s)?;
        }
        if let Err(e) = self.driver.activate(self.is_read_only()) {
            let _ = self.driver.set_perms(Perms::NONE, Perms::ALL);
            return Err(e);
        }
        self.inactive.store(false, Ordering::Release);
        if self.bitmaps_deferred.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.load_persistent_bitmaps() {
                return Ok(Some(format!(
                    "could not load the dirty bitmaps of '{}': {e}",
                    self.name
                )));
            }
        }
        Ok(None)
    }

    /// Why this node cannot be handed over by live migration, if it cannot
    /// (see [`BlockDriver::migration_blocker`]).
    pub fn migration_blocker(&self) -> Option<String> {
        self.driver.migration_blocker(&self.name)
    }

    pub fn children(&self) -> Vec<(String, Arc<Node>)> {
        self.children
            .iter()
            .filter_map(|c| c.get().map(|n| (c.role.clone(), n)))
            .collect()
    }
    /// The child with `role`.
    pub fn child(&self, role: &str) -> Option<Arc<Node>> {
        self.child_slot(role).and_then(|c| c.get())
    }
    /// The slot of `role`, full or empty.
    pub fn child_slot(&self, role: &str) -> Option<&Arc<Child>> {
        self.children.iter().find(|c| c.role == role)
    }
    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.driver.len()
    }
    /// True if the node is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Alignment limits.
    pub fn limits(&self) -> Limits {
        self.driver.limits()
    }
    /// Read-only node.
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }
    /// The file name of the node or of its first file-like descendant.
    pub fn filename(&self) -> Option<String> {
        self.driver.filename().or_else(|| {
            self.children
                .first()
                .and_then(|c| c.get())
                .and_then(|c| c.filename())
        })
    }

    fn check_read_only(&self) -> BlockResult<()> {
        if self.is_read_only() {
            return Err(BlockError::ReadOnly(format!("Node '{}'", self.name)));
        }
        Ok(())
    }

    /// Writes need a writable node that owns its image.
    fn check_writable(&self) -> BlockResult<()> {
        self.check_read_only()?;
        self.check_active()
    }

    fn check_active(&self) -> BlockResult<()> {
        if self.is_inactive() {
            return Err(BlockError::Permission(format!(
                "node '{}' is inactive",
                self.name
            )));
        }
        Ok(())
    }

    /// Read.
    pub fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        self.driver.read_vectored(offset, iov)
    }

    /// Run the before-write hooks and return the bitmaps to mark, when
    /// anything watches this node.
    fn watch_write(&self, offset: u64, len: u64) -> Option<Vec<Arc<DirtyBitmap>>> {
        if !self.watched.load(Ordering::Acquire) {
            return None;
        }
        let (before, bitmaps) = {
            let w = self.watchers.read().unwrap_or_else(|e| e.into_inner());
            let before: Vec<_> = w.before.iter().map(|(_, h)| h.clone()).collect();
            (before, w.bitmaps.clone())
        };
        for h in before {
            h.before_write(offset, len);
        }
        Some(bitmaps)
    }

    fn mark(bitmaps: Option<Vec<Arc<DirtyBitmap>>>, offset: u64, len: u64) {
        for b in bitmaps.into_iter().flatten() {
            if b.is_enabled() {
                b.set_range(offset, len);
            }
        }
    }

    /// A synchronous change of `[offset, offset+len)` under the watchers.
    fn watched_change(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce() -> BlockResult<()>,
    ) -> BlockResult<()> {
        self.check_writable()?;
        let bitmaps = self.watch_write(offset, len);
        let r = f();
        if r.is_ok() {
            Self::mark(bitmaps, offset, len);
        }
        r
    }

    /// Write, with `detect-zeroes` applied.
    pub fn write_vectored(&self, offset: u64, data: &[IoSlice<'_>], fua: bool) -> BlockResult<()> {
        let len = iov::total_len(data) as u64;
        self.watched_change(offset, len, || {
            if self.common.detect_zeroes != DetectZeroes::Off && iov::is_zero(data) {
                let unmap =
                    self.common.detect_zeroes == DetectZeroes::Unmap && self.common.discard_unmap;
                return self.driver.write_zeroes(offset, len, unmap, fua);
            }
            self.driver.write_vectored(offset, data, fua)
        })
    }

    /// Write whole clusters compressed (see
    /// [`BlockDriver::write_compressed`]).
    pub fn write_compressed(&self, offset: u64, data: &[u8]) -> BlockResult<()> {
        self.check_compress()?;
        self.watched_change(offset, data.len() as u64, || {
            self.driver.write_compressed(offset, data)
        })
    }

    /// Compressed writes reach only drivers that can store them: any
    /// other would write the data plainly, or not at all.
    fn check_compress(&self) -> BlockResult<()> {
        if self.driver.can_compress() {
            return Ok(());
        }
        Err(BlockError::Unsupported(format!(
            "Compression is not supported for the '{}' format",
            self.driver_name()
        )))
    }

    /// Flush; skipped on protocol nodes with `cache.no-flush=on`, and on
    /// inactive nodes (everything was flushed when the node became
    /// inactive, and nothing was written since).
    pub fn flush(&self) -> BlockResult<()> {
        if (self.common.no_flush && self.children.is_empty()) || self.is_inactive() {
            return Ok(());
        }
        self.driver.flush()
    }

    /// Discard; ignored unless `discard=unmap`.
    pub fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.check_writable()?;
        if !self.common.discard_unmap {
            return Ok(());
        }
        self.watched_change(offset, len, || self.driver.discard(offset, len))
    }

    /// Write zeroes; `may_unmap` only honoured with `discard=unmap`.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> BlockResult<()> {
        self.watched_change(offset, len, || {
            self.driver
                .write_zeroes(offset, len, may_unmap && self.common.discard_unmap, fua)
        })
    }

    /// Block status of the run starting at `offset`.
    pub fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.driver.block_status(offset, len)
    }

    /// Which layer of the backing chain provides the run at `offset` (at
    /// most `len` bytes): the run's length and its depth, 1 for this node,
    /// 2 for its backing image and so on, 0 when no layer allocates it
    /// (QEMU's `bdrv_is_allocated_above` over the whole chain, what the
    /// `qemu:allocation-depth` NBD context reports).
    pub fn allocation_depth(&self, offset: u64, len: u64) -> BlockResult<(u64, u32)> {
        let mut depth = 1u32;
        let mut len = len.max(1);
        let mut below: Option<Arc<Node>> = self.self_ref.upgrade().map(|n| n.skip_filters());
        loop {
            let node = below.as_deref().unwrap_or(self);
            let e = node.block_status(offset, len)?;
            let l = e.len.clamp(1, len);
            if e.allocated {
                return Ok((l, depth));
            }
            let Some(b) = node.child("backing") else {
                return Ok((l, 0));
            };
            if offset >= b.len() {
                // Past the end of a shorter backing image the run reads as
                // zeroes, and QEMU counts them as that image's.
                return Ok((l, depth + 1));
            }
            len = l.min(b.len() - offset);
            depth += 1;
            below = Some(b.skip_filters());
        }
    }

    /// The first node at or below this one that is not a filter
    /// ([`BlockDriver::is_filter`]), following `file` children.
    pub fn skip_filters(self: Arc<Self>) -> Arc<Node> {
        let mut n = self;
        while n.driver.is_filter() {
            match n.child("file") {
                Some(c) => n = c,
                None => break,
            }
        }
        n
    }

    /// Resize.
    pub fn truncate(&self, len: u64) -> BlockResult<()> {
        self.check_writable()?;
        self.driver.truncate(len)?;
        let w = self.watchers.read().unwrap_or_else(|e| e.into_inner());
        for b in &w.bitmaps {
            b.resize(len);
        }
        Ok(())
    }

    /// Asynchronous submission with the node's generic policies applied.
    pub fn submit(&self, req: IoRequest, done: Completion) {
        match req.op {
            IoOp::Read => {}
            IoOp::Flush => {
                if (self.common.no_flush && self.children.is_empty()) || self.is_inactive() {
                    done(req, Ok(()));
                    return;
                }
            }
            _ => {
                if let Err(e) = self.check_writable() {
                    done(req, Err(e));
                    return;
                }
                if req.op == IoOp::Discard && !self.common.discard_unmap {
                    done(req, Ok(()));
                    return;
                }
                if req.flags.contains(crate::driver::IoFlags::COMPRESSED) {
                    if let Err(e) = self.check_compress() {
                        done(req, Err(e));
                        return;
                    }
                }
                if self.watched.load(Ordering::Acquire) {
                    return self.submit_watched(req, done);
                }
            }
        }
        self.submit_to_driver(req, done);
    }

    /// A change of data while something watches the node: the hooks run
    /// on a worker thread (they may copy the old data away first), the
    /// bitmaps are marked when the change completes.
    fn submit_watched(&self, req: IoRequest, done: Completion) {
        let Some(me) = self.self_ref.upgrade() else {
            return done(req, Err(BlockError::Invalid("node is gone".into())));
        };
        crate::aio::pool().spawn(Box::new(move || {
            let (offset, len) = (req.offset, req.byte_len());
            let bitmaps = me.watch_write(offset, len);
            me.submit_to_driver(
                req,
                Box::new(move |r, res| {
                    if res.is_ok() {
                        Node::mark(bitmaps, offset, len);
                    }
                    done(r, res)
                }),
            );
        }));
    }

    fn submit_to_driver(&self, mut req: IoRequest, done: Completion) {
        match req.op {
            IoOp::WriteZeroes { may_unmap } => {
                req.op = IoOp::WriteZeroes {
                    may_unmap: may_unmap && self.common.discard_unmap,
                }
            }
            IoOp::Write
                if self.common.detect_zeroes != DetectZeroes::Off
                    && iov::is_zero(&req.iov.slices()) =>
            {
                let unmap =
                    self.common.detect_zeroes == DetectZeroes::Unmap && self.common.discard_unmap;
                // Keep the buffers with the request; only the op changes.
                req.len = req.iov.len() as u64;
                req.op = IoOp::WriteZeroes { may_unmap: unmap };
                let op_back = IoOp::Write;
                self.driver.clone().submit(
                    req,
                    Box::new(move |mut r, res| {
                        r.op = op_back;
                        done(r, res)
                    }),
                );
                return;
            }
            _ => {}
        }
        self.driver.clone().submit(req, done);
    }

    /// Start recording writes in `bitmap` (`block-dirty-bitmap-add`).
    /// Names are unique per node, as in QEMU.
    pub fn add_bitmap(&self, bitmap: Arc<DirtyBitmap>) -> BlockResult<()> {
        let mut w = self.watchers.write().unwrap_or_else(|e| e.into_inner());
        if w.bitmaps.iter().any(|b| b.name() == bitmap.name()) {
            return Err(BlockError::Invalid(format!(
                "Bitmap already exists: {}",
                bitmap.name()
            )));
        }
        w.bitmaps.push(bitmap);
        self.watched.store(true, Ordering::Release);
        Ok(())
    }

    /// Stop recording into the bitmap `name` and return it.
    pub fn remove_bitmap(&self, name: &str) -> Option<Arc<DirtyBitmap>> {
        let mut w = self.watchers.write().unwrap_or_else(|e| e.into_inner());
        let i = w.bitmaps.iter().position(|b| b.name() == name)?;
        let b = w.bitmaps.remove(i);
        self.watched.store(
            !w.bitmaps.is_empty() || !w.before.is_empty(),
            Ordering::Release,
        );
        Some(b)
    }

    /// The bitmap `name`.
    pub fn bitmap(&self, name: &str) -> Option<Arc<DirtyBitmap>> {
        let w = self.watchers.read().unwrap_or_else(|e| e.into_inner());
        w.bitmaps.iter().find(|b| b.name() == name).cloned()
    }

    /// Every bitmap, in the order they were added.
    pub fn bitmaps(&self) -> Vec<Arc<DirtyBitmap>> {
        let w = self.watchers.read().unwrap_or_else(|e| e.into_inner());
        w.bitmaps.clone()
    }

    /// Run `hook` before every change of data until the returned id is
    /// given to [`Node::remove_before_write`].
    pub fn add_before_write(&self, hook: Arc<dyn BeforeWrite>) -> u64 {
        let mut w = self.watchers.write().unwrap_or_else(|e| e.into_inner());
        let id = w.next_id;
        w.next_id += 1;
        w.before.push((id, hook));
        self.watched.store(true, Ordering::Release);
        id
    }

    /// Remove a before-write hook.
    pub fn remove_before_write(&self, id: u64) {
        let mut w = self.watchers.write().unwrap_or_else(|e| e.into_inner());
        w.before.retain(|(i, _)| *i != id);
        self.watched.store(
            !w.bitmaps.is_empty() || !w.before.is_empty(),
            Ordering::Release,
        );
    }

    /// Put `node` into the slot `role` (or empty it), moving this node's
    /// edge permissions from the old child to the new one first: a new
    /// child that cannot grant them is refused with the permission error
    /// and nothing changes. The caller quiesces I/O around the change
    /// (a backend's [`crate::backend::BlockBackend::drained`]) and tells
    /// the driver what it needs to know (a new backing file name).
    pub fn set_child(&self, role: &str, node: Option<Arc<Node>>) -> BlockResult<()> {
        let slot = self.child_slot(role).cloned().ok_or_else(|| {
            BlockError::Invalid(format!("Node '{}' has no '{role}' child slot", self.name))
        })?;
        if let Some(n) = &node {
            if std::ptr::eq(Arc::as_ptr(n), self) || n.has_descendant(self) {
                return Err(BlockError::Invalid(format!(
                    "Making '{}' a {role} child of '{}' would create a loop",
                    n.name(),
                    self.name
                )));
            }
        }
        let g = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let (perm, shared) = aggregate(&g.0);
        let edge = self.edge_perms(role, perm, shared, node.as_ref());
        if let Some(n) = &node {
            n.set_edge(&self.name, role, edge.0, edge.1)?;
        }
        let old = slot.set(node);
        if let Some(o) = old {
            let still_used = slot.get().is_some_and(|n| Arc::ptr_eq(&n, &o));
            if !still_used {
                let _ = o.set_edge(&self.name, role, Perms::NONE, Perms::ALL);
            }
        }
        drop(g);
        Ok(())
    }

    /// True if `n` is this node or lies below it.
    pub fn has_descendant(&self, n: &Node) -> bool {
        std::ptr::eq(self, n) || self.children().iter().any(|(_, c)| c.has_descendant(n))
    }

    /// Switch the node (and its `file`-like children, not its backing
    /// chain) between read-only and read-write while open (QEMU's
    /// `bdrv_reopen`): what `block-commit` does to the base it writes
    /// into, and undoes afterwards. Permissions are taken again for the
    /// new mode, so a read-write reopen takes the image's write lock.
    pub fn reopen(&self, read_only: bool) -> BlockResult<()> {
        if read_only == self.is_read_only() {
            return Ok(());
        }
        self.check_active()?;
        if !read_only && self.common.read_only && !self.common.auto_read_only {
            // Opened read-only on purpose by the user: QEMU refuses too.
            let explicit = !self.auto_named;
            if explicit {
                return Err(BlockError::ReadOnly(format!(
                    "Node '{}' was opened read-only",
                    self.name
                )));
            }
        }
        let kids: Vec<Arc<Node>> = self
            .children()
            .into_iter()
            .filter(|(r, _)| r != "backing")
            .map(|(_, n)| n)
            .collect();
        if read_only {
            self.driver.reopen(true)?;
            self.read_only.store(true, Ordering::Release);
            self.refresh_perms()?;
            for k in kids {
                k.reopen(true)?;
            }
        } else {
            for k in &kids {
                k.reopen(false)?;
            }
            self.driver.reopen(false)?;
            self.read_only.store(false, Ordering::Release);
            self.refresh_perms()?;
        }
        Ok(())
    }

    /// Apply the users' permissions again (after the mode changed).
    fn refresh_perms(&self) -> BlockResult<()> {
        let g = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let (p, s) = aggregate(&g.0);
        self.apply(p, s)
    }

    /// Register a user needing `perm` and sharing `shared`.
    pub fn attach(&self, user: &str, perm: Perms, shared: Perms) -> BlockResult<PermHandle> {
        self.attach_as(user, perm, shared, false)
    }

    /// Register a block job's use (see `User::job`): only backends and
    /// other jobs can refuse it.
    pub fn attach_job(&self, user: &str, perm: Perms, shared: Perms) -> BlockResult<PermHandle> {
        self.attach_as(user, perm, shared, true)
    }

    fn attach_as(
        &self,
        user: &str,
        perm: Perms,
        shared: Perms,
        job: bool,
    ) -> BlockResult<PermHandle> {
        let me = self
            .self_ref
            .upgrade()
            .ok_or_else(|| BlockError::Permission(format!("node '{}' is gone", self.name)))?;
        let mut g = self.users.lock().unwrap_or_else(|e| e.into_inner());
        // An inactive node takes writers: a device attaches to its drive
        // before the image is handed over, and writes once it is.
        if perm.contains(Perms::WRITE) || perm.contains(Perms::RESIZE) {
            self.check_read_only()?;
        }
        self.check_conflicts(&g.0, None, job, perm, shared)?;
        let id = g.1;
        g.1 += 1;
        g.0.push(User {
            id,
            job,
            name: user.to_string(),
            edge: None,
            perm,
            shared,
        });
        let (p, s) = aggregate(&g.0);
        if let Err(e) = self.apply(p, s) {
            g.0.retain(|u| u.id != id);
            let (p, s) = aggregate(&g.0);
            let _ = self.apply(p, s);
            return Err(e);
        }
        Ok(PermHandle { node: me, id })
    }

    /// Refuse `perm`/`shared` if another user (other than `edge`) does not
    /// share what is needed, or uses what is not shared.
    fn check_conflicts(
        &self,
        users: &[User],
        edge: Option<&str>,
        job: bool,
        perm: Perms,
        shared: Perms,
    ) -> BlockResult<()> {
        let is_edge = edge.is_some();
        for u in users
            .iter()
            .filter(|u| edge.is_none() || u.edge.as_deref() != edge)
            // Jobs and graph edges do not refuse each other.
            .filter(|u| !((job && u.edge.is_some()) || (is_edge && u.job)))
        {
            for (i, pname) in perm.bits() {
                if !u.shared.contains(Perms(1 << i)) {
                    return Err(BlockError::Permission(format!(
                        "Conflicts with use by {} which does not allow '{pname}' on {}",
                        u.name, self.name
                    )));
                }
            }
            for (i, pname) in u.perm.bits() {
                if !shared.contains(Perms(1 << i)) {
                    return Err(BlockError::Permission(format!(
                        "Conflicts with use by {} which uses '{pname}' on {}",
                        u.name, self.name
                    )));
                }
            }
        }
        Ok(())
    }

    fn release(&self, id: u64) {
        let mut g = self.users.lock().unwrap_or_else(|e| e.into_inner());
        g.0.retain(|u| u.id != id);
        let (p, s) = aggregate(&g.0);
        let _ = self.apply(p, s);
    }

    /// Apply aggregate perms to this node's driver and, edge by edge, to its
    /// children, as the driver's [`BlockDriver::child_perms`] says (by
    /// default QEMU's rules by role, [`crate::driver::default_child_perms`]).
    /// A child opened with `force-share` shares everything.
    fn apply(&self, perm: Perms, shared: Perms) -> BlockResult<()> {
        // An inactive node takes no image locks (QEMU's
        // `raw_handle_perm_lock` on BDRV_O_INACTIVE): the users are
        // recorded, and `activate` takes what they need.
        if !self.is_inactive() {
            self.driver.set_perms(perm, shared)?;
        }
        for (role, child) in self.children() {
            let (cp, cs) = self.edge_perms(&role, perm, shared, Some(&child));
            child.set_edge(&self.name, &role, cp, cs)?;
        }
        Ok(())
    }

    /// What this node, used with `perm`/`shared`, needs from and shares
    /// on its child in `role`.
    fn edge_perms(
        &self,
        role: &str,
        perm: Perms,
        shared: Perms,
        child: Option<&Arc<Node>>,
    ) -> (Perms, Perms) {
        let used = perm.0 != 0 || shared != Perms::ALL;
        let (cp, mut cs) = if !used {
            (Perms::NONE, Perms::ALL)
        } else {
            self.driver
                .child_perms(role, perm, shared, self.is_read_only())
        };
        if used && child.is_some_and(|c| c.common.force_share) {
            cs = Perms::ALL;
        }
        (cp, cs)
    }

    /// Set what parent `parent` (through child role `role`) needs and shares.
    fn set_edge(&self, parent: &str, role: &str, perm: Perms, shared: Perms) -> BlockResult<()> {
        let edge = format!("{parent}/{role}");
        let mut g = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if perm == Perms::NONE && shared == Perms::ALL {
            g.0.retain(|u| u.edge.as_deref() != Some(edge.as_str()));
        } else {
            self.check_conflicts(&g.0, Some(&edge), false, perm, shared)?;
            match g
                .0
                .iter_mut()
                .find(|u| u.edge.as_deref() == Some(edge.as_str()))
            {
                Some(u) => {
                    u.perm = perm;
                    u.shared = shared;
                }
                None => {
                    let id = g.1;
                    g.1 += 1;
                    g.0.push(User {
                        id,
                        job: false,
                        name: format!("node '{parent}' as '{role}'"),
                        edge: Some(edge),
                        perm,
                        shared,
                    });
                }
            }
        }
        let (p, s) = aggregate(&g.0);
        self.apply(p, s)
    }
}

fn aggregate(users: &[User]) -> (Perms, Perms) {
    let mut p = Perms::NONE;
    let mut s = Perms::ALL;
    for u in users {
        p = p.union(u.perm);
        s = Perms(s.0 & u.shared.0);
    }
    (p, s)
}
