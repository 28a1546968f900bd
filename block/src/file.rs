//! The `file` and `host_device` protocols (QEMU's `block/file-posix.c`
//! behaviour, documented in QEMU's `BlockdevOptionsFile` QAPI schema).
//!
//! * `O_DIRECT` when `cache.direct=on`, with the request alignment probed
//!   (`BLKSSZGET` on devices, trial reads on files) and read-modify-write /
//!   bounce buffers for unaligned requests.
//! * Flush is `fdatasync`; FUA writes use `pwritev2(RWF_DSYNC)`.
//! * Discard punches holes (`fallocate`) or issues `BLKDISCARD`; write-zeroes
//!   uses `FALLOC_FL_ZERO_RANGE`/`PUNCH_HOLE` or `BLKZEROOUT`.
//! * Block status from `SEEK_DATA`/`SEEK_HOLE`.
//! * Image locking with OFD locks on QEMU's lock bytes: byte 100+i is held
//!   (shared) while permission bit i is used, byte 200+i while it is not
//!   shared; a conflicting holder is found with `F_OFD_GETLK`. The layout is
//!   QEMU's, so Strata and QEMU see each other's locks.
//! * `aio=threads|native|io_uring`: the worker pool, Linux AIO (only with
//!   `cache.direct=on`, as QEMU requires) or io_uring; without `aio=` the
//!   best available (io_uring, else threads) is picked. Requests the engine
//!   cannot take as they are (unaligned under O_DIRECT, discard, zeroes)
//!   run on the worker pool.
//! * The length is reported in whole 512-byte sectors, like QEMU; the part
//!   past EOF reads as zeroes.

use crate::aio::{LinuxAio, SyscallStats, Uring};
use crate::driver::{BlockDriver, Completion, Extent, IoOp, IoRequest, Limits, Perms};
use crate::error::{BlockError, BlockResult};
use crate::iov::{self, AlignedBuf};
use crate::serialise::{InFlight, WriteRanges};
use std::ffi::CString;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKPBSZGET: libc::c_ulong = 0x127b;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

const LOCK_PERM_BASE: i64 = 100;
const LOCK_SHARED_BASE: i64 = 200;

/// The I/O engine of a `file` node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aio {
    /// Blocking syscalls on the worker pool.
    Threads,
    /// Linux native AIO (needs `cache.direct=on`).
    Native,
    /// io_uring.
    IoUring,
}

impl Aio {
    /// Parse QEMU's spelling.
    pub fn parse(s: &str) -> Option<Aio> {
        match s {
            "threads" => Some(Aio::Threads),
            "native" => Some(Aio::Native),
            "io_uring" => Some(Aio::IoUring),
            _ => None,
        }
    }
    /// QEMU's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Aio::Threads => "threads",
            Aio::Native => "native",
            Aio::IoUring => "io_uring",
        }
    }
}

/// Locking mode (`locking=auto|on|off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Locking {
    /// Lock when OFD locks are supported.
    Auto,
    /// Always lock.
    On,
    /// Never lock.
    Off,
}

/// Options of a `file`/`host_device` node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileOptions {
    /// Path.
    pub filename: String,
    /// Engine; `None` picks the best available (io_uring, else threads).
    pub aio: Option<Aio>,
    /// Lock mode.
    pub locking: Locking,
    /// `cache.direct`.
    pub direct: bool,
    /// Open read-only.
    pub read_only: bool,
    /// `host_device` instead of `file`.
    pub host_device: bool,
}

impl FileOptions {
    /// Defaults for `filename`.
    pub fn new(filename: &str) -> Self {
        FileOptions {
            filename: filename.into(),
            aio: None,
            locking: Locking::Auto,
            direct: false,
            read_only: false,
            host_device: false,
        }
    }
}

/// An open `file` or `host_device` node.
pub struct FileNode {
    opts: FileOptions,
    fd: Arc<OwnedFd>,
    size: AtomicU64,
    is_blockdev: bool,
    /// `fallocate(FALLOC_FL_ZERO_RANGE)` has not failed as unsupported.
    zero_range_ok: std::sync::atomic::AtomicBool,
    align: u64,
    physical_block: u64,
    aio: Aio,
    uring: Option<Arc<Uring>>,
    native: Option<Arc<LinuxAio>>,
    stats: Arc<SyscallStats>,
    /// Writes in flight by range, with O_DIRECT and an alignment above
    /// one byte, where a read-modify-write must not interleave with
    /// other writes to its units ([`crate::serialise`]).
    writes: Option<Arc<WriteRanges>>,
    locked: Mutex<(Perms, Perms)>,
    use_lock: bool,
    /// Open read-only now (see [`BlockDriver::reopen`]).
    read_only: std::sync::atomic::AtomicBool,
    /// The file lives in memory (tmpfs, ramfs): see [`FileNode::submit`].
    in_memory: bool,
}

impl std::fmt::Debug for FileNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileNode")
            .field("opts", &self.opts)
            .finish()
    }
}

/// Whether `fd`'s file system keeps its files in memory (tmpfs, ramfs).
fn in_memory_fs(fd: &OwnedFd) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    // SAFETY: a zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open and st is a valid, writable statfs buffer.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } < 0 {
        return false;
    }
    matches!(st.f_type as i64, TMPFS_MAGIC | RAMFS_MAGIC)
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

impl FileNode {
    /// Open the file. Locks are taken by [`BlockDriver::set_perms`].
    pub fn open(opts: FileOptions) -> BlockResult<FileNode> {
        let name = &opts.filename;
        let could_not = |e: i32| {
            BlockError::Open(format!(
                "Could not open '{name}': {}",
                crate::error::strerror(e)
            ))
        };
        let aio = match opts.aio {
            Some(Aio::Native) if !opts.direct => {
                return Err(BlockError::Open(
                    "aio=native was specified, but it requires cache.direct=on, which was not specified.".into(),
                ))
            }
            Some(a) => Some(a),
            None => None,
        };
        let cpath = CString::new(std::path::Path::new(name).as_os_str().as_bytes())
            .map_err(|_| BlockError::Open(format!("Could not open '{name}': invalid file name")))?;
        let mut flags = libc::O_CLOEXEC
            | if opts.read_only {
                libc::O_RDONLY
            } else {
                libc::O_RDWR
            };
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        // O_NONBLOCK so that a FIFO given as an image fails instead of
        // hanging; it is cleared again below for files and devices.
        flags |= libc::O_NONBLOCK;
        // SAFETY: cpath is a valid NUL-terminated string; open has no other
        // memory effects.
        let raw = unsafe { libc::open(cpath.as_ptr(), flags) };
        if raw < 0 {
            let e = errno();
            if e == libc::EISDIR && !opts.host_device {
                return Err(BlockError::Open(format!(
                    "'file' driver requires '{name}' to be a regular file"
                )));
            }
            if e == libc::EINVAL && opts.direct {
                return Err(BlockError::Open(format!(
                    "Could not open '{name}': cache.direct=on (O_DIRECT) is not supported by this file system"
                )));
            }
            return Err(could_not(e));
        }
        // SAFETY: raw is a freshly opened descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: zeroed stat is a valid out-parameter for fstat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fd is open and st is a valid, writable stat buffer.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
            return Err(could_not(errno()));
        }
        let fmt = st.st_mode & libc::S_IFMT;
        let is_blockdev = fmt == libc::S_IFBLK;
        if opts.host_device {
            if fmt != libc::S_IFBLK && fmt != libc::S_IFCHR {
                return Err(BlockError::Open(format!("'{name}' is not a block device")));
            }
        } else if fmt != libc::S_IFREG {
            return Err(BlockError::Open(format!(
                "'file' driver requires '{name}' to be a regular file"
            )));
        }
        // SAFETY: F_SETFL with plain flag bits on our own descriptor.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) };
        let size = if is_blockdev {
            let mut sz: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 to the pointer we pass.
            if unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64, &mut sz as *mut u64) } < 0 {
                return Err(could_not(errno()));
            }
            sz
        } else {
            st.st_size as u64
        };
        let (align, physical_block) = probe_alignment(&fd, is_blockdev, opts.direct);
        let in_memory = !is_blockdev && in_memory_fs(&fd);
        let stats = Arc::new(SyscallStats::default());
        let fd = Arc::new(fd);
        let mut native = None;
        let (aio, uring) = match aio {
            Some(Aio::IoUring) => match Uring::new(fd.clone(), stats.clone()) {
                Ok(u) => (Aio::IoUring, Some(u)),
                Err(e) => {
                    return Err(BlockError::Unsupported(format!(
                        "'{name}': aio=io_uring is not available on this host: {e}"
                    )))
                }
            },
            Some(Aio::Native) => match LinuxAio::new(fd.clone(), stats.clone()) {
                Ok(a) => {
                    native = Some(a);
                    (Aio::Native, None)
                }
                Err(e) => {
                    return Err(BlockError::Unsupported(format!(
                        "'{name}': aio=native (Linux AIO) is not available on this host: {e}"
                    )))
                }
            },
            Some(Aio::Threads) => (Aio::Threads, None),
            None => match Uring::new(fd.clone(), stats.clone()) {
                Ok(u) => (Aio::IoUring, Some(u)),
                Err(_) => (Aio::Threads, None),
            },
        };
        let use_lock = match opts.locking {
            Locking::Off => false,
            Locking::On | Locking::Auto => true,
        };
        let read_only = opts.read_only;
        let writes = (opts.direct && align > 1).then(Arc::default);
        Ok(FileNode {
            opts,
            fd,
            size: AtomicU64::new(size),
            zero_range_ok: std::sync::atomic::AtomicBool::new(true),
            is_blockdev,
            align,
            physical_block,
            aio,
            uring,
            native,
            stats,
            writes,
            locked: Mutex::new((Perms::NONE, Perms::ALL)),
            read_only: std::sync::atomic::AtomicBool::new(read_only),
            use_lock,
            in_memory,
        })
    }

    /// The engine in use.
    pub fn aio(&self) -> Aio {
        self.aio
    }
    /// Syscall counters (fdatasync, FUA writes, io_uring ops).
    pub fn syscall_stats(&self) -> &SyscallStats {
        &self.stats
    }
    /// The raw descriptor (for tests inspecting `/proc/self/fdinfo`).
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
    /// Logical and physical block sizes.
    pub fn block_sizes(&self) -> (u64, u64) {
        (self.align, self.physical_block)
    }
    /// Allocated bytes on the host (`st_blocks * 512`).
    pub fn allocated_size(&self) -> Option<u64> {
        // SAFETY: zeroed stat is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fd is open, st is writable.
        if unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) } < 0 {
            return None;
        }
        Some(st.st_blocks as u64 * 512)
    }

    fn needs_bounce(&self, offset: u64, lens: impl Iterator<Item = (usize, usize)>) -> bool {
        if !self.opts.direct {
            return false;
        }
        let a = self.align;
        if !offset.is_multiple_of(a) {
            return true;
        }
        let mut total = 0u64;
        for (addr, len) in lens {
            if !(addr as u64).is_multiple_of(a) || !(len as u64).is_multiple_of(a) {
                return true;
            }
            total += len as u64;
        }
        !total.is_multiple_of(a)
    }

    fn preadv_all(&self, mut offset: u64, buf: &mut [u8]) -> BlockResult<usize> {
        let mut pos = 0;
        while pos < buf.len() {
            let rest = &mut buf[pos..];
            // SAFETY: rest is a valid writable buffer of rest.len() bytes.
            let n = unsafe {
                libc::pread(
                    self.fd.as_raw_fd(),
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                    offset as i64,
                )
            };
            if n < 0 {
                let e = errno();
                if e == libc::EINTR {
                    continue;
                }
                return Err(BlockError::io(e, format!("{}: read", self.opts.filename)));
            }
            if n == 0 {
                break;
            }
            pos += n as usize;
            offset += n as u64;
        }
        Ok(pos)
    }

    fn pwrite_all(&self, mut offset: u64, mut buf: &[u8], fua: bool) -> BlockResult<()> {
        while !buf.is_empty() {
            let n = self.pwritev_raw(offset, &[IoSlice::new(buf)], fua)?;
            buf = &buf[n..];
            offset += n as u64;
        }
        Ok(())
    }

    /// One pwritev2 call; returns bytes written.
    fn pwritev_raw(&self, offset: u64, iov: &[IoSlice<'_>], fua: bool) -> BlockResult<usize> {
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        loop {
            // SAFETY: IoSlice is ABI-compatible with iovec; the slices are
            // valid for reads for the duration of the call.
            let n = unsafe {
                libc::pwritev2(
                    self.fd.as_raw_fd(),
                    iov.as_ptr().cast(),
                    iov.len().min(1024) as i32,
                    offset as i64,
                    flags,
                )
            };
            if n < 0 {
                let e = errno();
                if e == libc::EINTR {
                    continue;
                }
                return Err(BlockError::io(e, format!("{}: write", self.opts.filename)));
            }
            if n == 0 {
                return Err(BlockError::io(
                    libc::EIO,
                    format!("{}: short write", self.opts.filename),
                ));
            }
            if fua {
                self.stats.dsync_writes.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(n as usize);
        }
    }

    fn bounce_read(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        let len = iov::total_len_mut(iov) as u64;
        let a = self.align;
        let start = offset / a * a;
        let end = (offset + len).div_ceil(a) * a;
        let mut buf = AlignedBuf::new((end - start) as usize, a.max(4096) as usize);
        let got = self.preadv_all(start, &mut buf)?;
        buf[got..].fill(0);
        let skip = (offset - start) as usize;
        iov::scatter(&buf[skip..skip + len as usize], iov);
        Ok(())
    }

    /// The whole alignment units `[offset, offset+len)` touches.
    fn units(&self, offset: u64, len: u64) -> (u64, u64) {
        let a = self.align;
        let end = offset.saturating_add(len);
        (offset / a * a, end.div_ceil(a).saturating_mul(a))
    }

    /// Waits for the writes a write of `[offset, offset+len)` must not
    /// interleave with and holds its units until the guard drops.
    fn begin_write(&self, offset: u64, len: u64) -> Option<InFlight> {
        let w = self.writes.as_ref()?;
        let (s, e) = self.units(offset, len);
        let partial = !offset.is_multiple_of(self.align)
            || !offset.saturating_add(len).is_multiple_of(self.align);
        Some(w.begin(s, e, partial))
    }

    /// Merges the caller's bytes into whole alignment units read first
    /// (the head and tail units) and writes those; the caller holds the
    /// units serialised ([`FileNode::begin_write`]).
    fn rmw_write(&self, offset: u64, iov: &[IoSlice<'_>], fua: bool) -> BlockResult<()> {
        let len = iov::total_len(iov) as u64;
        let a = self.align;
        let start = offset / a * a;
        let end = (offset + len).div_ceil(a) * a;
        let mut buf = AlignedBuf::new((end - start) as usize, a.max(4096) as usize);
        let skip = (offset - start) as usize;
        if skip != 0 || !(offset + len).is_multiple_of(a) {
            // Read the partial head and tail blocks (whole range is simplest).
            let got = self.preadv_all(start, &mut buf)?;
            buf[got..].fill(0);
        }
        iov::gather(iov, &mut buf[skip..skip + len as usize]);
        let size = self.size.load(Ordering::Relaxed);
        self.pwrite_all(start, &buf, fua)?;
        // A write that was rounded up past EOF must not grow the file
        // beyond what the caller asked for.
        let want = size.max(offset + len);
        if !self.is_blockdev && end > want {
            // SAFETY: plain ftruncate on our descriptor.
            if unsafe { libc::ftruncate(self.fd.as_raw_fd(), want as i64) } < 0 {
                return Err(BlockError::io(
                    errno(),
                    format!("{}: truncate", self.opts.filename),
                ));
            }
        }
        Ok(())
    }

    fn fdatasync(&self) -> BlockResult<()> {
        self.stats.fdatasync.fetch_add(1, Ordering::Relaxed);
        // SAFETY: plain syscall on our descriptor.
        if unsafe { libc::fdatasync(self.fd.as_raw_fd()) } < 0 {
            return Err(BlockError::io(
                errno(),
                format!("{}: flush", self.opts.filename),
            ));
        }
        Ok(())
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> Result<(), i32> {
        // SAFETY: plain syscall on our descriptor.
        if unsafe { libc::fallocate(self.fd.as_raw_fd(), mode, offset as i64, len as i64) } < 0 {
            return Err(errno());
        }
        Ok(())
    }

    fn blk_range_ioctl(&self, req: libc::c_ulong, offset: u64, len: u64) -> Result<(), i32> {
        let range = [offset, len];
        // SAFETY: BLKDISCARD/BLKZEROOUT read two u64 from the pointer.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), req, range.as_ptr()) } < 0 {
            return Err(errno());
        }
        Ok(())
    }

    fn lock_byte(&self, off: i64, ty: i32, cmd: i32) -> Result<libc::flock, i32> {
        // SAFETY: a zeroed flock is a valid initial value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = ty as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = off;
        fl.l_len = 1;
        fl.l_pid = 0;
        // SAFETY: fcntl with an F_OFD_* command reads/writes the flock struct.
        if unsafe { libc::fcntl(self.fd.as_raw_fd(), cmd, &mut fl) } < 0 {
            return Err(errno());
        }
        Ok(fl)
    }

    fn held_by_other(&self, off: i64) -> bool {
        matches!(self.lock_byte(off, libc::F_WRLCK, libc::F_OFD_GETLK), Ok(fl) if fl.l_type != libc::F_UNLCK as i16)
    }
}

impl Drop for FileNode {
    fn drop(&mut self) {
        // Release the lock bytes now: the engine threads may keep the
        // descriptor open a little longer, until their last completion.
        if self.use_lock {
            for off in [LOCK_PERM_BASE, LOCK_SHARED_BASE] {
                // SAFETY: a zeroed flock is a valid initial value.
                let mut fl: libc::flock = unsafe { std::mem::zeroed() };
                fl.l_type = libc::F_UNLCK as i16;
                fl.l_whence = libc::SEEK_SET as i16;
                fl.l_start = off;
                fl.l_len = 4;
                // SAFETY: fcntl(F_OFD_SETLK) reads the flock struct.
                unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
            }
        }
        if let Some(u) = &self.uring {
            u.shutdown();
        }
        if let Some(a) = &self.native {
            a.shutdown();
        }
    }
}

fn probe_alignment(fd: &OwnedFd, is_blockdev: bool, direct: bool) -> (u64, u64) {
    let mut logical: u64 = 512;
    let mut physical: u64 = 512;
    if is_blockdev {
        let mut v: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int.
        if unsafe { libc::ioctl(fd.as_raw_fd(), BLKSSZGET, &mut v as *mut libc::c_int) } == 0
            && v > 0
        {
            logical = v as u64;
        }
        let mut p: libc::c_uint = 0;
        // SAFETY: BLKPBSZGET writes one unsigned int.
        if unsafe { libc::ioctl(fd.as_raw_fd(), BLKPBSZGET, &mut p as *mut libc::c_uint) } == 0
            && p > 0
        {
            physical = p as u64;
        }
        if !direct {
            return (1, physical);
        }
        return (logical, physical);
    }
    if !direct {
        return (1, 4096);
    }
    // Trial reads, as QEMU's raw_probe_alignment does.
    let buf = AlignedBuf::new(4096, 4096);
    for a in [512usize, 1024, 2048, 4096] {
        // SAFETY: buf holds 4096 writable bytes, a <= 4096.
        let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_ptr() as *mut libc::c_void, a, 0) };
        if n >= 0 {
            logical = a as u64;
            break;
        }
        logical = 4096;
    }
    (logical, 4096)
}

impl BlockDriver for FileNode {
    /// A protocol: the image is the file; [`BlockDriver::activate`] reads its size again.
    fn migration_blocker(&self, _node: &str) -> Option<String> {
        None
    }
    /// qemu-img shows an empty `format-specific` object for files.
    fn info(&self) -> Option<crate::format::ImageInfo> {
        Some(crate::format::ImageInfo {
            specific: Some((self.driver_name().to_string(), Vec::new())),
            ..Default::default()
        })
    }
    fn driver_name(&self) -> &'static str {
        if self.opts.host_device {
            "host_device"
        } else {
            "file"
        }
    }
    fn len(&self) -> u64 {
        // QEMU reports lengths in whole 512-byte sectors; the tail past EOF
        // reads as zeroes.
        let s = self.size.load(Ordering::Relaxed);
        if self.is_blockdev {
            s
        } else {
            s.div_ceil(512) * 512
        }
    }
    fn limits(&self) -> Limits {
        Limits {
            request_alignment: self.align,
            mem_alignment: if self.opts.direct {
                self.align as usize
            } else {
                1
            },
        }
    }
    fn filename(&self) -> Option<String> {
        Some(self.opts.filename.clone())
    }
    fn syscall_stats(&self) -> Option<&SyscallStats> {
        Some(&self.stats)
    }
    fn raw_fd(&self) -> Option<i32> {
        Some(self.fd.as_raw_fd())
    }
    fn allocated_size(&self) -> Option<u64> {
        FileNode::allocated_size(self)
    }
    fn aio_engine(&self) -> Option<&'static str> {
        Some(self.aio.name())
    }

    fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        if self.needs_bounce(offset, iov.iter().map(|s| (s.as_ptr() as usize, s.len()))) {
            return self.bounce_read(offset, iov);
        }
        let total = iov::total_len_mut(iov);
        let mut done = 0usize;
        // Fast path: one preadv; fall back to a flat loop for short reads.
        // SAFETY: IoSliceMut is ABI-compatible with iovec; the buffers are
        // valid for writes for the duration of the call.
        let n = unsafe {
            libc::preadv(
                self.fd.as_raw_fd(),
                iov.as_ptr().cast(),
                iov.len().min(1024) as i32,
                offset as i64,
            )
        };
        if n >= 0 {
            done = n as usize;
        } else if errno() != libc::EINTR {
            return Err(BlockError::io(
                errno(),
                format!("{}: read", self.opts.filename),
            ));
        }
        if done < total {
            let mut flat = vec![0u8; total - done];
            let got = if self.opts.direct {
                // Unusual for O_DIRECT; go through the aligned path.
                let mut tmp = [IoSliceMut::new(&mut flat)];
                self.bounce_read(offset + done as u64, &mut tmp)?;
                total - done
            } else {
                self.preadv_all(offset + done as u64, &mut flat)?
            };
            let _ = got; // bytes past EOF stay zero
            let mut all = vec![0u8; total];
            {
                let mut tmp = vec![0u8; total];
                // keep what preadv already placed in iov
                let slices: Vec<IoSlice<'_>> = iov.iter().map(|s| IoSlice::new(s)).collect();
                iov::gather(&slices, &mut tmp);
                all[..done].copy_from_slice(&tmp[..done]);
            }
            all[done..].copy_from_slice(&flat);
            iov::scatter(&all, iov);
        }
        Ok(())
    }

    fn write_vectored(&self, offset: u64, iov: &[IoSlice<'_>], fua: bool) -> BlockResult<()> {
        let _units = self.begin_write(offset, iov::total_len(iov) as u64);
        if self.needs_bounce(offset, iov.iter().map(|s| (s.as_ptr() as usize, s.len()))) {
            self.rmw_write(offset, iov, fua)?;
        } else {
            let total = iov::total_len(iov);
            let n = self.pwritev_raw(offset, iov, fua)?;
            if n < total {
                let mut flat = vec![0u8; total];
                iov::gather(iov, &mut flat);
                self.pwrite_all(offset + n as u64, &flat[n..], fua)?;
            }
        }
        let end = offset + iov::total_len(iov) as u64;
        self.size.fetch_max(end, Ordering::Relaxed);
        Ok(())
    }

    fn flush(&self) -> BlockResult<()> {
        self.fdatasync()
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        if self.read_only.load(Ordering::Acquire) {
            return Err(BlockError::ReadOnly(self.opts.filename.clone()));
        }
        let r = if self.is_blockdev {
            self.blk_range_ioctl(BLKDISCARD, offset, len)
        } else if self.opts.host_device {
            Err(libc::ENOTSUP)
        } else {
            self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        match r {
            Ok(()) => Ok(()),
            // Discard is advisory.
            Err(e) if e == libc::EOPNOTSUPP || e == libc::ENOTTY || e == libc::EINVAL => Ok(()),
            Err(e) => Err(BlockError::io(
                e,
                format!("{}: discard", self.opts.filename),
            )),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> BlockResult<()> {
        if self.read_only.load(Ordering::Acquire) {
            return Err(BlockError::ReadOnly(self.opts.filename.clone()));
        }
        let aligned = offset.is_multiple_of(self.align) && len.is_multiple_of(self.align);
        // Held for the zeroing only: the fallback writes (and serialises)
        // by itself.
        let units = if aligned {
            self.begin_write(offset, len)
        } else {
            None
        };
        let r = if !aligned {
            Err(libc::EINVAL)
        } else if self.is_blockdev {
            self.blk_range_ioctl(BLKZEROOUT, offset, len)
        } else if offset >= self.len() {
            // Past the end: allocating reads as zeroes (how QEMU extends a
            // file with zeroes).
            self.fallocate(0, offset, len)
                .or_else(|_| self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len))
        } else if may_unmap && offset + len <= self.len() {
            self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
            .or_else(|_| self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len))
        } else {
            // Where ZERO_RANGE is missing (tmpfs), a hole punched and
            // allocated again is the same: zeroes, still allocated.
            self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len)
                .or_else(|_| {
                    if offset + len > self.len() {
                        return Err(libc::EOPNOTSUPP);
                    }
                    self.fallocate(
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                    )?;
                    self.fallocate(0, offset, len)
                })
        };
        drop(units);
        match r {
            Ok(()) => {
                self.size.fetch_max(offset + len, Ordering::Relaxed);
                if fua {
                    self.fdatasync()?;
                }
                Ok(())
            }
            Err(_) => crate::driver::write_zeroes_by_writing(self, offset, len, fua),
        }
    }

    fn preallocate(&self, offset: u64, len: u64) -> BlockResult<()> {
        if self.read_only.load(Ordering::Acquire) {
            return Err(BlockError::ReadOnly(self.opts.filename.clone()));
        }
        if self.is_blockdev || self.opts.host_device || len == 0 {
            return Ok(());
        }
        // Mode 0: allocate and grow the file, as posix_fallocate does.
        self.fallocate(0, offset, len).map_err(|e| BlockError::Io {
            errno: e,
            context: format!(
                "{}: Could not preallocate data for the new file",
                self.opts.filename
            ),
        })?;
        self.size.fetch_max(offset + len, Ordering::Relaxed);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        if self.is_blockdev || self.opts.host_device {
            return Ok(Extent {
                len,
                data: true,
                zero: false,
                offset: Some(offset),
                allocated: true,
                compressed: false,
            });
        }
        let size = self.size.load(Ordering::Relaxed);
        if offset >= size {
            // The sector-rounding tail past EOF.
            return Ok(Extent {
                len,
                data: false,
                zero: true,
                offset: Some(offset),
                allocated: true,
                compressed: false,
            });
        }
        let len = len.min(size - offset);
        let fd = self.fd.as_raw_fd();
        // SAFETY: lseek has no memory effects.
        let data = unsafe { libc::lseek(fd, offset as i64, libc::SEEK_DATA) };
        if data < 0 {
            if errno() == libc::ENXIO {
                // Hole up to the end of the file.
                return Ok(Extent {
                    len,
                    data: false,
                    zero: true,
                    offset: Some(offset),
                    allocated: true,
                    compressed: false,
                });
            }
            return Ok(Extent {
                len,
                data: true,
                zero: false,
                offset: Some(offset),
                allocated: true,
                compressed: false,
            });
        }
        let data = data as u64;
        if data > offset {
            return Ok(Extent {
                len: (data - offset).min(len),
                data: false,
                zero: true,
                offset: Some(offset),
                allocated: true,
                compressed: false,
            });
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, offset as i64, libc::SEEK_HOLE) };
        let hole = if hole < 0 { size } else { hole as u64 };
        Ok(Extent {
            len: hole.saturating_sub(offset).clamp(1, len),
            data: true,
            zero: false,
            offset: Some(offset),
            allocated: true,
            compressed: false,
        })
    }

    fn truncate(&self, len: u64) -> BlockResult<()> {
        if self.is_blockdev || self.opts.host_device {
            if len == self.len() {
                return Ok(());
            }
            return Err(BlockError::Unsupported(format!(
                "{}: cannot resize a block device",
                self.opts.filename
            )));
        }
        // SAFETY: plain syscall on our descriptor.
        if unsafe { libc::ftruncate(self.fd.as_raw_fd(), len as i64) } < 0 {
            return Err(BlockError::io(
                errno(),
                format!("{}: truncate", self.opts.filename),
            ));
        }
        self.size.store(len, Ordering::Relaxed);
        Ok(())
    }

    /// Reopen with the other access mode: a new open file description
    /// takes the place of the old one under the same descriptor number
    /// (`dup3`), so requests in flight and the I/O engines keep working.
    /// The old description's locks go with it; the node takes them again
    /// on the new one at once ([`crate::node::Node::reopen`]).
    fn reopen(&self, read_only: bool) -> BlockResult<()> {
        let name = &self.opts.filename;
        let cpath =
            CString::new(std::path::Path::new(name).as_os_str().as_bytes()).map_err(|_| {
                BlockError::Open(format!("Could not reopen '{name}': invalid file name"))
            })?;
        let mut flags = libc::O_CLOEXEC
            | if read_only {
                libc::O_RDONLY
            } else {
                libc::O_RDWR
            };
        if self.opts.direct {
            flags |= libc::O_DIRECT;
        }
        // SAFETY: cpath is a valid NUL-terminated string; open has no other
        // memory effects.
        let raw = unsafe { libc::open(cpath.as_ptr(), flags) };
        if raw < 0 {
            return Err(BlockError::Open(format!(
                "Could not reopen '{name}': {}",
                crate::error::strerror(errno())
            )));
        }
        // SAFETY: raw is a freshly opened descriptor that nothing else owns.
        let new = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut cur = self.locked.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: dup3 atomically replaces our own descriptor number with
        // the new description; both descriptors are open and ours.
        if unsafe { libc::dup3(new.as_raw_fd(), self.fd.as_raw_fd(), libc::O_CLOEXEC) } < 0 {
            return Err(BlockError::io(errno(), format!("{name}: reopen")));
        }
        *cur = (Perms::NONE, Perms::ALL);
        self.read_only.store(read_only, Ordering::Release);
        Ok(())
    }

    /// The other process may have grown or shrunk the file while this
    /// node was inactive: read its size again.
    fn activate(&self, _read_only: bool) -> BlockResult<()> {
        let fd = self.fd.as_raw_fd();
        let size = if self.is_blockdev {
            let mut sz: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 to the pointer we pass.
            if unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut sz as *mut u64) } < 0 {
                return Err(BlockError::io(
                    errno(),
                    format!("{}: size", self.opts.filename),
                ));
            }
            sz
        } else {
            // SAFETY: zeroed stat is a valid out-parameter for fstat.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fd is our open descriptor and st a writable stat buffer.
            if unsafe { libc::fstat(fd, &mut st) } < 0 {
                return Err(BlockError::io(
                    errno(),
                    format!("{}: size", self.opts.filename),
                ));
            }
            st.st_size as u64
        };
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }

    fn set_perms(&self, perm: Perms, shared: Perms) -> BlockResult<()> {
        if !self.use_lock {
            return Ok(());
        }
        let mut cur = self.locked.lock().unwrap_or_else(|e| e.into_inner());
        let name = &self.opts.filename;
        // Take the new lock bytes first.
        for i in 0..4i64 {
            let bit = Perms(1 << i);
            if perm.contains(bit) && !cur.0.contains(bit) {
                if let Err(e) = self.lock_byte(LOCK_PERM_BASE + i, libc::F_RDLCK, libc::F_OFD_SETLK)
                {
                    if (e == libc::EINVAL || e == libc::ENOTSUP)
                        && self.opts.locking == Locking::Auto
                    {
                        return Ok(()); // no OFD locks on this file system
                    }
                    return Err(BlockError::Locked(format!(
                        "Failed to lock byte {}: {}: is another process using the image [{name}]?",
                        LOCK_PERM_BASE + i,
                        crate::error::strerror(e)
                    )));
                }
            }
            if !shared.contains(bit) && cur.1.contains(bit) {
                if let Err(e) =
                    self.lock_byte(LOCK_SHARED_BASE + i, libc::F_RDLCK, libc::F_OFD_SETLK)
                {
                    return Err(BlockError::Locked(format!(
                        "Failed to lock byte {}: {}: is another process using the image [{name}]?",
                        LOCK_SHARED_BASE + i,
                        crate::error::strerror(e)
                    )));
                }
            }
        }
        // Check for conflicting holders.
        let mut conflict = None;
        for i in 0..4i64 {
            let bit = Perms(1 << i);
            if perm.contains(bit) && self.held_by_other(LOCK_SHARED_BASE + i) {
                conflict = Some(format!(
                    "Failed to get \"{}\" lock: is another process using the image [{name}]?",
                    Perms::NAMES[i as usize]
                ));
                break;
            }
            if !shared.contains(bit) && self.held_by_other(LOCK_PERM_BASE + i) {
                conflict = Some(format!(
                    "Failed to get shared \"{}\" lock: is another process using the image [{name}]?",
                    Perms::NAMES[i as usize]
                ));
                break;
            }
        }
        // Release bytes that are no longer needed (or all new ones on conflict).
        let (keep_perm, keep_unshared) = if conflict.is_some() {
            (cur.0, Perms::ALL.minus(cur.1))
        } else {
            (perm, Perms::ALL.minus(shared))
        };
        for i in 0..4i64 {
            let bit = Perms(1 << i);
            if !keep_perm.contains(bit) {
                let _ = self.lock_byte(LOCK_PERM_BASE + i, libc::F_UNLCK, libc::F_OFD_SETLK);
            }
            if !keep_unshared.contains(bit) {
                let _ = self.lock_byte(LOCK_SHARED_BASE + i, libc::F_UNLCK, libc::F_OFD_SETLK);
            }
        }
        if let Some(msg) = conflict {
            return Err(BlockError::Locked(msg));
        }
        *cur = (perm, shared);
        Ok(())
    }

    fn submit(self: Arc<Self>, mut req: IoRequest, mut done: Completion) {
        // A file in memory is read and written by copying, which the
        // kernel cannot do without blocking the caller: io_uring hands
        // every such request to one of its worker threads (tmpfs has no
        // non-blocking reads; `preadv2(RWF_NOWAIT)` says EOPNOTSUPP), so
        // each request costs two thread switches and a third runnable
        // thread around one memcpy. Copy here instead.
        if self.in_memory && req.op != IoOp::Discard {
            let r = crate::driver::execute(&*self, &mut req);
            done(req, r);
            return;
        }
        if self.uring.is_some() || self.native.is_some() {
            let ok = match req.op {
                IoOp::Read | IoOp::Write => {
                    !self.needs_bounce(
                        req.offset,
                        req.iov
                            .as_raw()
                            .iter()
                            .map(|v| (v.iov_base as usize, v.iov_len)),
                    ) && req.iov.as_raw().len() <= 1024
                }
                IoOp::Flush => true,
                // Zeroing as ZERO_RANGE through the ring, where it worked
                // before (allocating writes of qcow2 zero new clusters).
                IoOp::WriteZeroes { may_unmap: false } => {
                    self.uring.is_some()
                        && !self.is_blockdev
                        && self.zero_range_ok.load(Ordering::Relaxed)
                        && req.offset.is_multiple_of(self.align)
                        && req.len.is_multiple_of(self.align)
                        && !self.read_only.load(Ordering::Acquire)
                }
                _ => false,
            };
            let in_file = req.op != IoOp::Write
                || req.offset + req.iov.len() as u64 <= self.size.load(Ordering::Relaxed);
            // Both branches below submit to the kernel. A write that would
            // have to wait for a read-modify-write in flight waits on a
            // worker thread instead of here.
            let zeroes = matches!(req.op, IoOp::WriteZeroes { .. });
            if ok && (zeroes || req.op == IoOp::Write && in_file) {
                if let Some(w) = &self.writes {
                    let len = match req.op {
                        IoOp::Write => req.iov.len() as u64,
                        _ => req.len,
                    };
                    let (s, e) = self.units(req.offset, len);
                    let Some(units) = w.try_begin(s, e) else {
                        return crate::driver::run_on_pool(self, req, done);
                    };
                    done = Box::new(move |r, res| {
                        drop(units);
                        done(r, res)
                    });
                }
            }
            if ok && zeroes {
                if let Some(u) = &self.uring {
                    let me = self.clone();
                    let end = req.offset + req.len;
                    u.submit(
                        req,
                        Box::new(move |r, res| match res {
                            Ok(()) => {
                                me.size.fetch_max(end, Ordering::Relaxed);
                                done(r, Ok(()))
                            }
                            Err(e) if matches!(e.errno(), libc::EOPNOTSUPP | libc::EINVAL) => {
                                // Not supported here: the synchronous path
                                // falls back to writing zeroes.
                                me.zero_range_ok.store(false, Ordering::Relaxed);
                                crate::driver::run_on_pool(me, r, done)
                            }
                            Err(e) => done(r, Err(e)),
                        }),
                    );
                    return;
                }
            }
            if ok && in_file {
                if let Some(u) = &self.uring {
                    u.submit(req, done);
                    return;
                }
                if let Some(a) = &self.native {
                    a.submit(req, done);
                    return;
                }
            }
        }
        crate::driver::run_on_pool(self, req, done)
    }
}
