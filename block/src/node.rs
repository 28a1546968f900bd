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

use crate::driver::{BlockDriver, Completion, Extent, IoOp, IoRequest, Limits, Perms};
use crate::error::{BlockError, BlockResult};
use crate::iov;
use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, Mutex, Weak};

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
    children: Vec<(String, Arc<Node>)>,
    users: Mutex<(Vec<User>, u64)>,
    self_ref: Weak<Node>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver.driver_name())
            .finish()
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
        children: Vec<(String, Arc<Node>)>,
    ) -> Arc<Node> {
        Arc::new_cyclic(|w| Node {
            name,
            auto_named,
            driver,
            common,
            children,
            users: Mutex::new((Vec::new(), 0)),
            self_ref: w.clone(),
        })
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
    /// Generic options.
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

    pub fn children(&self) -> &[(String, Arc<Node>)] {
        &self.children
    }
    /// The child with `role`.
    pub fn child(&self, role: &str) -> Option<&Arc<Node>> {
        self.children
            .iter()
            .find(|(r, _)| r == role)
            .map(|(_, n)| n)
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
        self.common.read_only
    }
    /// The file name of the node or of its first file-like descendant.
    pub fn filename(&self) -> Option<String> {
        self.driver
            .filename()
            .or_else(|| self.children.first().and_then(|(_, c)| c.filename()))
    }

    fn check_writable(&self) -> BlockResult<()> {
        if self.common.read_only {
            return Err(BlockError::ReadOnly(format!("Node '{}'", self.name)));
        }
        Ok(())
    }

    /// Read.
    pub fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        self.driver.read_vectored(offset, iov)
    }

    /// Write, with `detect-zeroes` applied.
    pub fn write_vectored(&self, offset: u64, data: &[IoSlice<'_>], fua: bool) -> BlockResult<()> {
        self.check_writable()?;
        if self.common.detect_zeroes != DetectZeroes::Off && iov::is_zero(data) {
            let len = iov::total_len(data) as u64;
            let unmap =
                self.common.detect_zeroes == DetectZeroes::Unmap && self.common.discard_unmap;
            return self.driver.write_zeroes(offset, len, unmap, fua);
        }
        self.driver.write_vectored(offset, data, fua)
    }

    /// Flush; skipped on protocol nodes with `cache.no-flush=on`.
    pub fn flush(&self) -> BlockResult<()> {
        if self.common.no_flush && self.children.is_empty() {
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
        self.driver.discard(offset, len)
    }

    /// Write zeroes; `may_unmap` only honoured with `discard=unmap`.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> BlockResult<()> {
        self.check_writable()?;
        self.driver
            .write_zeroes(offset, len, may_unmap && self.common.discard_unmap, fua)
    }

    /// Block status of the run starting at `offset`.
    pub fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.driver.block_status(offset, len)
    }

    /// Resize.
    pub fn truncate(&self, len: u64) -> BlockResult<()> {
        self.check_writable()?;
        self.driver.truncate(len)
    }

    /// Asynchronous submission with the node's generic policies applied.
    pub fn submit(&self, mut req: IoRequest, done: Completion) {
        match req.op {
            IoOp::Read => {}
            IoOp::Flush => {
                if self.common.no_flush && self.children.is_empty() {
                    done(req, Ok(()));
                    return;
                }
            }
            _ => {
                if let Err(e) = self.check_writable() {
                    done(req, Err(e));
                    return;
                }
                match req.op {
                    IoOp::Discard if !self.common.discard_unmap => {
                        done(req, Ok(()));
                        return;
                    }
                    IoOp::WriteZeroes { may_unmap } => {
                        req.op = IoOp::WriteZeroes {
                            may_unmap: may_unmap && self.common.discard_unmap,
                        }
                    }
                    IoOp::Write
                        if self.common.detect_zeroes != DetectZeroes::Off
                            && iov::is_zero(&req.iov.slices()) =>
                    {
                        let unmap = self.common.detect_zeroes == DetectZeroes::Unmap
                            && self.common.discard_unmap;
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
            }
        }
        self.driver.clone().submit(req, done);
    }

    /// Register a user needing `perm` and sharing `shared`.
    pub fn attach(&self, user: &str, perm: Perms, shared: Perms) -> BlockResult<PermHandle> {
        let me = self
            .self_ref
            .upgrade()
            .ok_or_else(|| BlockError::Permission(format!("node '{}' is gone", self.name)))?;
        let mut g = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if perm.contains(Perms::WRITE) || perm.contains(Perms::RESIZE) {
            self.check_writable()?;
        }
        self.check_conflicts(&g.0, None, perm, shared)?;
        let id = g.1;
        g.1 += 1;
        g.0.push(User {
            id,
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
        perm: Perms,
        shared: Perms,
    ) -> BlockResult<()> {
        for u in users
            .iter()
            .filter(|u| edge.is_none() || u.edge.as_deref() != edge)
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
    /// children (QEMU's `bdrv_default_perms`): a `file`-like child gets what
    /// this node's users need; a format's metadata `file` child is also
    /// read consistently, written and resized while the node is writable,
    /// and never shared for write or resize; a `data-file` child is not
    /// shared for resize and is resized when written; a `backing` child is
    /// only read and must not change under it. A child opened with
    /// `force-share` shares everything.
    fn apply(&self, perm: Perms, shared: Perms) -> BlockResult<()> {
        self.driver.set_perms(perm, shared)?;
        let used = perm.0 != 0 || shared != Perms::ALL;
        for (role, child) in &self.children {
            let (cp, mut cs) = if !used {
                (Perms::NONE, Perms::ALL)
            } else if role == "backing" {
                (
                    Perms::CONSISTENT_READ,
                    Perms::ALL.minus(Perms::WRITE).minus(Perms::RESIZE),
                )
            } else if role == "file" && self.driver.metadata_in_file() {
                let mut p = perm.union(Perms::CONSISTENT_READ);
                if !self.common.read_only {
                    p = p.union(Perms::WRITE).union(Perms::RESIZE);
                }
                let s = shared
                    .union(Perms::WRITE_UNCHANGED)
                    .minus(Perms::WRITE)
                    .minus(Perms::RESIZE);
                (p, s)
            } else if role == "data-file" {
                let mut p = perm;
                if p.contains(Perms::WRITE_UNCHANGED) {
                    p = p.union(Perms::WRITE);
                }
                if p.contains(Perms::WRITE) {
                    p = p.union(Perms::RESIZE);
                }
                (p, shared.union(Perms::WRITE_UNCHANGED).minus(Perms::RESIZE))
            } else {
                (perm, shared)
            };
            if used && child.common.force_share {
                cs = Perms::ALL;
            }
            child.set_edge(&self.name, role, cp, cs)?;
        }
        Ok(())
    }

    /// Set what parent `parent` (through child role `role`) needs and shares.
    fn set_edge(&self, parent: &str, role: &str, perm: Perms, shared: Perms) -> BlockResult<()> {
        let edge = format!("{parent}/{role}");
        let mut g = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if perm == Perms::NONE && shared == Perms::ALL {
            g.0.retain(|u| u.edge.as_deref() != Some(edge.as_str()));
        } else {
            self.check_conflicts(&g.0, Some(&edge), perm, shared)?;
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
