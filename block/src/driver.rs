//! The node driver interface: what every protocol, format and filter
//! implements, with QEMU's vocabulary (permissions, block status, FUA).
//!
//! Drivers implement the synchronous, vectored operations. The asynchronous
//! entry point [`BlockDriver::submit`] defaults to running the synchronous
//! operation on the shared worker pool (QEMU's `aio=threads`); drivers that
//! can do better (the `file` protocol on io_uring, `raw` forwarding to its
//! child, `null-aio`) override it.

use crate::aio;
use crate::error::{BlockError, BlockResult};
use crate::iov::IoVecs;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

/// QEMU's permission bits (`BLK_PERM_*`), also used for image lock bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Perms(pub u64);

impl Perms {
    /// Reads see consistent data.
    pub const CONSISTENT_READ: Perms = Perms(0x1);
    /// May change the data.
    pub const WRITE: Perms = Perms(0x2);
    /// May write data that does not change what readers see.
    pub const WRITE_UNCHANGED: Perms = Perms(0x4);
    /// May change the size.
    pub const RESIZE: Perms = Perms(0x8);
    /// Every permission.
    pub const ALL: Perms = Perms(0xf);
    /// No permission.
    pub const NONE: Perms = Perms(0);
    /// QEMU's names, by bit index.
    pub const NAMES: [&'static str; 4] = ["consistent read", "write", "write unchanged", "resize"];

    /// True if all bits of `other` are set.
    pub fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }
    /// Union.
    pub fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }
    /// Bits not in `other`.
    pub fn minus(self, other: Perms) -> Perms {
        Perms(self.0 & !other.0)
    }
    /// Iterate set bits as (index, name).
    pub fn bits(self) -> impl Iterator<Item = (u32, &'static str)> {
        (0..4u32)
            .filter(move |i| self.0 & (1 << i) != 0)
            .map(|i| (i, Self::NAMES[i as usize]))
    }
}

/// Alignment and size limits of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Offsets and lengths of requests must be multiples of this.
    pub request_alignment: u64,
    /// Buffer addresses and segment lengths must be multiples of this.
    pub mem_alignment: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_alignment: 1,
            mem_alignment: 1,
        }
    }
}

/// Result of a block-status query: the first `len` bytes from the queried
/// offset share one status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length of the run with this status (at least 1 byte, at most the query).
    pub len: u64,
    /// Data is stored in this node or below (not a hole).
    pub data: bool,
    /// Reads return zeroes.
    pub zero: bool,
    /// Host offset in the protocol file, when known.
    pub offset: Option<u64>,
    /// The data (or zeroes) is stored in this node's own layer, not served
    /// from a backing file (QEMU's `BDRV_BLOCK_ALLOCATED`). Always true for
    /// protocols and raw.
    pub allocated: bool,
    /// Stored compressed (QEMU's `BDRV_BLOCK_COMPRESSED`): `data` with no
    /// host offset a reader could use.
    pub compressed: bool,
}

/// Flags of a request beyond its operation (QEMU's `BdrvRequestFlags`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoFlags(pub u32);

impl IoFlags {
    /// No flag.
    pub const NONE: IoFlags = IoFlags(0);
    /// A write of whole clusters to be stored compressed (`convert -c`,
    /// backup's `compress`); formats that cannot compress refuse it
    /// rather than store the data plainly.
    pub const COMPRESSED: IoFlags = IoFlags(1);

    /// True if all bits of `other` are set.
    pub fn contains(self, other: IoFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

/// The operation of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// Read `iov.len()` bytes at `offset`.
    Read,
    /// Write `iov` at `offset`; with `fua`, durable before completion.
    Write,
    /// Make completed writes durable.
    Flush,
    /// Drop the data of a range (advisory).
    Discard,
    /// Make a range read as zeroes; `may_unmap` allows deallocation.
    WriteZeroes {
        /// Deallocation is allowed.
        may_unmap: bool,
    },
}

/// One asynchronous request.
#[derive(Debug)]
pub struct IoRequest {
    /// What to do.
    pub op: IoOp,
    /// Byte offset in the node.
    pub offset: u64,
    /// Length for discard / write-zeroes (reads and writes use `iov.len()`).
    pub len: u64,
    /// Buffers.
    pub iov: IoVecs,
    /// Force unit access (writes, write-zeroes).
    pub fua: bool,
    /// Further flags ([`IoFlags::COMPRESSED`] on writes).
    pub flags: IoFlags,
}

impl IoRequest {
    /// A read into `iov` at `offset`.
    pub fn read(offset: u64, iov: IoVecs) -> Self {
        IoRequest {
            op: IoOp::Read,
            offset,
            len: iov.len() as u64,
            iov,
            fua: false,
            flags: IoFlags::NONE,
        }
    }
    /// A write of `iov` at `offset`.
    pub fn write(offset: u64, iov: IoVecs, fua: bool) -> Self {
        IoRequest {
            op: IoOp::Write,
            offset,
            len: iov.len() as u64,
            iov,
            fua,
            flags: IoFlags::NONE,
        }
    }
    /// A write of whole clusters to be stored compressed
    /// ([`IoFlags::COMPRESSED`]).
    pub fn write_compressed(offset: u64, iov: IoVecs) -> Self {
        IoRequest {
            flags: IoFlags::COMPRESSED,
            ..Self::write(offset, iov, false)
        }
    }
    /// A flush.
    pub fn flush() -> Self {
        IoRequest {
            op: IoOp::Flush,
            offset: 0,
            len: 0,
            iov: IoVecs::empty(),
            fua: false,
            flags: IoFlags::NONE,
        }
    }
    /// A discard.
    pub fn discard(offset: u64, len: u64) -> Self {
        IoRequest {
            op: IoOp::Discard,
            offset,
            len,
            iov: IoVecs::empty(),
            fua: false,
            flags: IoFlags::NONE,
        }
    }
    /// A write-zeroes.
    pub fn write_zeroes(offset: u64, len: u64, may_unmap: bool) -> Self {
        IoRequest {
            op: IoOp::WriteZeroes { may_unmap },
            offset,
            len,
            iov: IoVecs::empty(),
            fua: false,
            flags: IoFlags::NONE,
        }
    }
    /// Byte length covered by the request.
    pub fn byte_len(&self) -> u64 {
        match self.op {
            IoOp::Read | IoOp::Write => self.iov.len() as u64,
            IoOp::Flush => 0,
            IoOp::Discard | IoOp::WriteZeroes { .. } => self.len,
        }
    }
}

/// Completion callback: gets the request back (with its buffers) and the result.
pub type Completion = Box<dyn FnOnce(IoRequest, BlockResult<()>) + Send>;

/// A node implementation (protocol, format or filter).
#[allow(clippy::len_without_is_empty)]
pub trait BlockDriver: Send + Sync + 'static {
    /// The driver name (`file`, `raw`, ...).
    fn driver_name(&self) -> &'static str;
    /// Current length in bytes.
    fn len(&self) -> u64;
    /// Alignment requirements.
    fn limits(&self) -> Limits {
        Limits::default()
    }
    /// Read into `iov` at `offset`.
    fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()>;
    /// Write `iov` at `offset`. With `fua` the data is durable on return.
    fn write_vectored(&self, offset: u64, iov: &[IoSlice<'_>], fua: bool) -> BlockResult<()>;
    /// Make completed writes durable.
    fn flush(&self) -> BlockResult<()>;
    /// Discard a range (advisory; may do nothing).
    fn discard(&self, _offset: u64, _len: u64) -> BlockResult<()> {
        Ok(())
    }
    /// Make a range read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool, fua: bool) -> BlockResult<()> {
        write_zeroes_by_writing(self, offset, len, fua)
    }
    /// Status of the range starting at `offset` (at most `len` bytes).
    fn block_status(&self, _offset: u64, len: u64) -> BlockResult<Extent> {
        Ok(Extent {
            len,
            data: true,
            zero: false,
            offset: None,
            allocated: true,
            compressed: false,
        })
    }
    /// Reserve host space for `[offset, offset+len)` without writing it,
    /// growing the node if needed (QEMU's `preallocation=falloc`).
    /// Default: unsupported (callers fall back to growing the length).
    fn preallocate(&self, _offset: u64, _len: u64) -> BlockResult<()> {
        Err(BlockError::Unsupported(format!(
            "driver '{}' does not support preallocation",
            self.driver_name()
        )))
    }
    /// Change the length.
    fn truncate(&self, _len: u64) -> BlockResult<()> {
        Err(BlockError::Unsupported(format!(
            "driver '{}' does not support resizing",
            self.driver_name()
        )))
    }
    /// Whether the `file` child holds this format's metadata (QEMU's
    /// `BDRV_CHILD_METADATA`): the node then needs consistent reads of it,
    /// write and resize when the node is writable, and never lets others
    /// write or resize it. Default: no (`raw` and filters pass their
    /// users' permissions through).
    fn metadata_in_file(&self) -> bool {
        false
    }
    /// Take the permissions this node's users need and allow others
    /// (image locking for protocols). Default: nothing to do.
    fn set_perms(&self, _perm: Perms, _shared: Perms) -> BlockResult<()> {
        Ok(())
    }
    /// Switch between read-only and read-write while open (see
    /// [`crate::node::Node::reopen`], which reopens the children first).
    /// Default: refused.
    fn reopen(&self, _read_only: bool) -> BlockResult<()> {
        Err(BlockError::Unsupported(format!(
            "driver '{}' cannot be reopened read-write",
            self.driver_name()
        )))
    }
    /// Record a new backing file name in the image (after a graph change
    /// made another node this node's backing child; QEMU's
    /// `bdrv_change_backing_file`). Default: the format has none.
    fn set_backing_file(&self, _name: Option<&str>, _format: Option<&str>) -> BlockResult<()> {
        Err(BlockError::Unsupported(format!(
            "driver '{}' has no backing file",
            self.driver_name()
        )))
    }
    /// Whether [`BlockDriver::write_compressed`] works.
    fn can_compress(&self) -> bool {
        false
    }
    /// Write whole clusters compressed (a cluster-aligned `offset`; the
    /// last cluster may end at the end of the image): backup's `compress`.
    fn write_compressed(&self, _offset: u64, _data: &[u8]) -> BlockResult<()> {
        Err(BlockError::Unsupported(format!(
            "Compression is not supported for the '{}' format",
            self.driver_name()
        )))
    }
    /// Drop every cluster of the image's own layer, so that it reads
    /// through to its backing file (after HMP's `commit`).
    fn make_empty(&self) -> BlockResult<()> {
        Err(BlockError::Unsupported(format!(
            "driver '{}' cannot be emptied",
            self.driver_name()
        )))
    }
    /// Whether [`BlockDriver::load_bitmaps`] writes nothing, so that a
    /// read-only node's bitmaps load too (parallels' format extension).
    /// Default: no (qcow2 marks its bitmaps in use).
    fn bitmaps_load_read_only(&self) -> bool {
        false
    }
    /// The persistent dirty bitmaps stored in the image, to track writes
    /// in while it is open (they are marked in use on disk meanwhile).
    /// Default: the format has none.
    fn load_bitmaps(&self) -> BlockResult<Vec<crate::bitmap::DirtyBitmap>> {
        Ok(Vec::new())
    }
    /// Persistent bitmaps the image holds but [`BlockDriver::load_bitmaps`]
    /// leaves out because they are marked in use on disk (a program
    /// holding them died), by name: QEMU's inconsistent bitmaps.
    fn inconsistent_bitmaps(&self) -> Vec<String> {
        Vec::new()
    }
    /// A filter passes every request to its `file` child and has no data
    /// of its own (QEMU's `is_filter`: throttle, copy-on-read); what asks
    /// about an image's layers (allocation depth, bitmaps) looks through it.
    fn is_filter(&self) -> bool {
        false
    }
    /// Write back whatever the driver caches and leave the image clean
    /// (qcow2: metadata caches, the dirty flag). Called once, by
    /// [`crate::node::Node::close`], on a writable node; a flush of the
    /// node follows. Default: nothing cached.
    fn close(&self) -> BlockResult<()> {
        Ok(())
    }
    /// The node leaves another process's hands (the destination of a
    /// live migration, or the source taking its images back after a
    /// failed one): what the driver keeps about the image may be stale,
    /// so it reads it again from below, and becomes writable if
    /// `read_only` is false. Called after the node's children are active
    /// and its image locks are taken (QEMU's `bdrv_co_invalidate_cache`).
    /// Default: nothing cached.
    fn activate(&self, _read_only: bool) -> BlockResult<()> {
        Ok(())
    }
    /// The node is about to be handed to another process (the source of
    /// a live migration): write back what the driver caches, leave the
    /// image clean and write nothing more until [`BlockDriver::activate`].
    /// Called on a writable node after its persistent bitmaps are stored;
    /// a flush of the node follows (QEMU's `bdrv_inactivate`). Default:
    /// what [`BlockDriver::close`] does.
    fn inactivate(&self) -> BlockResult<()> {
        self.close()
    }
    /// Why the node, named `node`, cannot be handed to another process
    /// by live migration, if it cannot. Default: it cannot, since a
    /// format keeps metadata in memory that it has no way to read again
    /// when the destination takes over (QEMU adds a migration blocker in
    /// vpc, vdi, vmdk, vhdx, qcow, qed and parallels); drivers that hold
    /// nothing (protocols, raw, filters) or can re-read it (qcow2, see
    /// [`BlockDriver::activate`]) return `None`.
    fn migration_blocker(&self, node: &str) -> Option<String> {
        Some(format!(
            "The {} format used by node '{node}' does not support live migration",
            self.driver_name()
        ))
    }
    /// Whether the format can store persistent dirty bitmaps.
    fn can_store_bitmaps(&self) -> bool {
        false
    }
    /// Store `list` as the image's persistent bitmaps (at close).
    fn store_bitmaps(&self, _list: &[Arc<crate::bitmap::DirtyBitmap>]) -> BlockResult<()> {
        Err(BlockError::Unsupported(format!(
            "Cannot store dirty bitmaps in {} format",
            self.driver_name()
        )))
    }
    /// What `info` shows beyond sizes (cluster size, backing file as
    /// recorded, snapshots, format-specific fields). Default: nothing.
    fn info(&self) -> Option<crate::format::ImageInfo> {
        None
    }
    /// Check the image's consistency, repairing what `repair` allows
    /// (the node was opened with [`crate::graph::OpenFlags::check`], and
    /// read-write to repair). Default: the format has nothing to check.
    fn check(&self, _repair: crate::format::Repair) -> BlockResult<crate::format::CheckResult> {
        Err(BlockError::Unsupported(
            "This image format does not support checks".into(),
        ))
    }
    /// Change creation options of the open (read-write) image: `opts`
    /// were parsed against the class's create option table, and the
    /// driver refuses those it cannot change. Default: none can be.
    fn amend(&self, _opts: &crate::format::CreateOpts, _force: bool) -> BlockResult<()> {
        Err(BlockError::Unsupported(format!(
            "Format driver '{}' does not support option amendment",
            self.driver_name()
        )))
    }
    /// Whether the format keeps internal snapshots.
    fn supports_snapshots(&self) -> bool {
        false
    }
    /// The internal snapshots.
    fn snapshot_list(&self) -> BlockResult<Vec<crate::format::SnapshotInfo>> {
        Ok(Vec::new())
    }
    /// Save the current state as snapshot `name`, dated `date`
    /// (seconds, nanoseconds).
    fn snapshot_create(&self, _name: &str, _date: (u32, u32)) -> BlockResult<()> {
        Err(no_snapshots(self.driver_name()))
    }
    /// Revert the image to the snapshot with this ID or name.
    fn snapshot_apply(&self, _id_or_name: &str) -> BlockResult<()> {
        Err(BlockError::Unsupported(
            "Block driver does not support snapshots".into(),
        ))
    }
    /// Delete the snapshot with this ID or name.
    fn snapshot_delete(&self, _id_or_name: &str) -> BlockResult<()> {
        Err(no_snapshots(self.driver_name()))
    }
    /// Whether the image can hold persistent dirty bitmaps in its current
    /// version (what `measure` counts bitmap space for).
    fn supports_persistent_bitmaps(&self) -> bool {
        self.can_store_bitmaps()
    }
    /// What this node, used with `perm`/`shared`, needs from and shares
    /// on its child in `role` (QEMU's `bdrv_child_perm`). Default:
    /// [`default_child_perms`], QEMU's rules by role.
    fn child_perms(
        &self,
        role: &str,
        perm: Perms,
        shared: Perms,
        read_only: bool,
    ) -> (Perms, Perms) {
        default_child_perms(self.metadata_in_file(), role, perm, shared, read_only)
    }
    /// Submit a request asynchronously. `done` runs exactly once, possibly
    /// before `submit` returns (on this thread) when no I/O is needed; so
    /// callers must not hold a lock across `submit` that `done` takes.
    /// Default: run it on the worker pool.
    fn submit(self: Arc<Self>, req: IoRequest, done: Completion) {
        run_on_pool(self, req, done)
    }
    /// The file name, for protocols. Default: none.
    fn filename(&self) -> Option<String> {
        None
    }
    /// Counters of real syscalls (protocols only), for observation.
    fn syscall_stats(&self) -> Option<&crate::aio::SyscallStats> {
        None
    }
    /// The host descriptor (protocols only).
    fn raw_fd(&self) -> Option<i32> {
        None
    }
    /// Bytes allocated on the host (protocols only).
    fn allocated_size(&self) -> Option<u64> {
        None
    }
    /// The I/O engine in use (protocols only).
    fn aio_engine(&self) -> Option<&'static str> {
        None
    }
    /// qemu-io's breakpoint commands: `Some` from a driver that can
    /// suspend requests (blkdebug), `Err(errno)` when it failed; `None`
    /// passes the command on to the node's children.
    fn debug_command(&self, _cmd: &DebugCommand) -> Option<Result<(), i32>> {
        None
    }
}

/// QEMU's answer (`-ENOTSUP`) to snapshot operations on a format
/// without internal snapshots, whose list is simply empty.
fn no_snapshots(_driver: &str) -> BlockError {
    BlockError::Unsupported("Operation not supported".into())
}

/// QEMU's default permissions of a child edge (`bdrv_default_perms`),
/// for a node used with `perm`/`shared`: a `backing` child is only read
/// and must not change under it; a metadata `file` child (see
/// [`BlockDriver::metadata_in_file`]) is read consistently, written and
/// resized while the node is writable, and never shared for write or
/// resize; a `data-file` child is not shared for resize and is resized
/// when written; other children get what the node's users need.
pub fn default_child_perms(
    metadata_in_file: bool,
    role: &str,
    perm: Perms,
    shared: Perms,
    read_only: bool,
) -> (Perms, Perms) {
    if role == "backing" {
        (
            Perms::CONSISTENT_READ,
            Perms::ALL.minus(Perms::WRITE).minus(Perms::RESIZE),
        )
    } else if role == "file" && metadata_in_file {
        let mut p = perm.union(Perms::CONSISTENT_READ);
        if !read_only {
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
    }
}

/// qemu-io's `break EVENT TAG`, `resume TAG` and `remove_break TAG` (QEMU's
/// `bdrv_debug_breakpoint` and friends), for tests that hold a request in
/// flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DebugCommand {
    Break { event: String, tag: String },
    Resume { tag: String },
    RemoveBreak { tag: String },
}

/// Run `req` synchronously on the worker pool (the default `submit`).
pub fn run_on_pool<D: BlockDriver + ?Sized>(drv: Arc<D>, req: IoRequest, done: Completion) {
    aio::pool().spawn(Box::new(move || {
        let mut req = req;
        let r = execute(&*drv, &mut req);
        drop(drv);
        done(req, r);
    }));
}

/// Run `req` synchronously on `drv`.
pub fn execute<D: BlockDriver + ?Sized>(drv: &D, req: &mut IoRequest) -> BlockResult<()> {
    match req.op {
        IoOp::Read => {
            let mut s = req.iov.slices_mut();
            drv.read_vectored(req.offset, &mut s)
        }
        IoOp::Write if req.flags.contains(IoFlags::COMPRESSED) => {
            let mut flat = vec![0u8; req.iov.len()];
            crate::iov::gather(&req.iov.slices(), &mut flat);
            drv.write_compressed(req.offset, &flat)
        }
        IoOp::Write => {
            let s = req.iov.slices();
            drv.write_vectored(req.offset, &s, req.fua)
        }
        IoOp::Flush => drv.flush(),
        IoOp::Discard => drv.discard(req.offset, req.len),
        IoOp::WriteZeroes { may_unmap } => {
            drv.write_zeroes(req.offset, req.len, may_unmap, req.fua)
        }
    }
}

/// Generic write-zeroes: write a zero buffer in 1 MiB chunks.
pub fn write_zeroes_by_writing<D: BlockDriver + ?Sized>(
    drv: &D,
    offset: u64,
    len: u64,
    fua: bool,
) -> BlockResult<()> {
    let align = drv.limits().mem_alignment.max(4096);
    let own;
    let zero: &[u8] = if align <= ZERO_ALIGN {
        shared_zeroes()
    } else {
        own = crate::iov::AlignedBuf::new(ZERO_CHUNK.min(len as usize), align);
        &own
    };
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zero.len() as u64) as usize;
        drv.write_vectored(offset + done, &[IoSlice::new(&zero[..n])], fua)?;
        done += n as u64;
    }
    Ok(())
}

const ZERO_CHUNK: usize = 1 << 20;
const ZERO_ALIGN: usize = 4096;

/// One MiB of zeroes, aligned for O_DIRECT, shared by every writer of
/// zeroes and never written: no allocation or memset per request (a qcow2
/// cluster allocation on tmpfs zeroes its cluster this way; a fresh 1 MiB
/// buffer each time cost more than the write), and its pages stay the
/// kernel's shared zero page.
fn shared_zeroes() -> &'static [u8] {
    static Z: std::sync::OnceLock<crate::iov::AlignedBuf> = std::sync::OnceLock::new();
    Z.get_or_init(|| crate::iov::AlignedBuf::new(ZERO_CHUNK, ZERO_ALIGN))
}

/// Check that `[offset, offset+len)` lies within `size`.
pub fn check_range(node: &str, offset: u64, len: u64, size: u64) -> BlockResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange {
            node: node.to_string(),
            offset,
            len,
            size,
        }),
    }
}
