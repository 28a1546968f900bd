//! The librados/librbd boundary (Ceph's C API, `rados/librados.h` and
//! `rbd/librbd.h`, as Debian's librbd-dev ships them): the declarations
//! Strata uses and safe wrappers around them. Every `unsafe` of the rbd
//! driver is here; nothing above this module sees a raw handle.
//!
//! Ownership: a [`Cluster`] owns the connection (`rados_shutdown` on
//! drop), an [`IoCtx`] the pool context and an [`Image`] the open image;
//! each holds an `Arc` of the one below, so a handle is never used after
//! the handle it depends on is gone. librados and librbd handles may be
//! used from any thread at once (Ceph documents them as thread-safe).
//!
//! Asynchronous requests ([`Image::submit`]) hand librbd a boxed
//! [`Pending`] that owns the request's buffers and an `Arc` of the image
//! until librbd's completion callback, which runs exactly once per
//! completion on a librbd thread, takes the box back.

#![allow(non_camel_case_types)]

use crate::driver::{Completion, IoOp, IoRequest};
use crate::error::{BlockError, BlockResult};
use libc::{c_char, c_int, c_void, iovec, size_t, ssize_t};
use std::ffi::CString;
use std::io::{IoSlice, IoSliceMut};
use std::ptr;
use std::sync::Arc;

type rados_t = *mut c_void;
type rados_ioctx_t = *mut c_void;
type rbd_image_t = *mut c_void;
type rbd_completion_t = *mut c_void;
type rbd_callback_t = Option<unsafe extern "C" fn(rbd_completion_t, *mut c_void)>;

extern "C" {
    fn rados_create(cluster: *mut rados_t, id: *const c_char) -> c_int;
    fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    fn rados_connect(cluster: rados_t) -> c_int;
    fn rados_shutdown(cluster: rados_t);
    fn rados_ioctx_create(cluster: rados_t, pool: *const c_char, io: *mut rados_ioctx_t) -> c_int;
    fn rados_ioctx_destroy(io: rados_ioctx_t);
    fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);

    fn rbd_create(io: rados_ioctx_t, name: *const c_char, size: u64, order: *mut c_int) -> c_int;
    fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap: *const c_char,
    ) -> c_int;
    fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap: *const c_char,
    ) -> c_int;
    fn rbd_close(image: rbd_image_t) -> c_int;
    fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
    fn rbd_resize(image: rbd_image_t, size: u64) -> c_int;
    fn rbd_flush(image: rbd_image_t) -> c_int;

    fn rbd_aio_create_completion(
        arg: *mut c_void,
        cb: rbd_callback_t,
        c: *mut rbd_completion_t,
    ) -> c_int;
    fn rbd_aio_wait_for_complete(c: rbd_completion_t) -> c_int;
    fn rbd_aio_get_return_value(c: rbd_completion_t) -> ssize_t;
    fn rbd_aio_release(c: rbd_completion_t);
    fn rbd_aio_readv(
        image: rbd_image_t,
        iov: *const iovec,
        iovcnt: c_int,
        off: u64,
        c: rbd_completion_t,
    ) -> c_int;
    fn rbd_aio_writev(
        image: rbd_image_t,
        iov: *const iovec,
        iovcnt: c_int,
        off: u64,
        c: rbd_completion_t,
    ) -> c_int;
    fn rbd_aio_flush(image: rbd_image_t, c: rbd_completion_t) -> c_int;
    fn rbd_aio_discard(image: rbd_image_t, off: u64, len: u64, c: rbd_completion_t) -> c_int;
    fn rbd_aio_write_zeroes(
        image: rbd_image_t,
        off: u64,
        len: size_t,
        c: rbd_completion_t,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
}

/// A C string of a name or setting; an interior NUL is a user's mistake.
fn cstr(what: &str, s: &str) -> BlockResult<CString> {
    CString::new(s).map_err(|_| BlockError::Open(format!("{what} '{s}' contains a NUL byte")))
}

/// The error of a negative return `ret` (`-errno`), with `context`.
fn err(ret: i64, context: String) -> BlockError {
    BlockError::io((-ret).clamp(1, 4095) as i32, context)
}

/// A connection to a Ceph cluster.
pub struct Cluster(rados_t);

// SAFETY: librados cluster handles are thread-safe (librados.h: "the
// handle ... may be used from multiple threads"); the pointer is only
// passed to librados.
unsafe impl Send for Cluster {}
// SAFETY: as for Send: librados serialises what it must internally.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// Connect as client `user` (none: `admin`), reading `conf` (none:
    /// Ceph's default search, whose absence is not an error, as in QEMU)
    /// and then applying `settings` in order.
    pub fn connect(
        user: Option<&str>,
        conf: Option<&str>,
        settings: &[(String, String)],
    ) -> BlockResult<Arc<Cluster>> {
        let user_c = user.map(|u| cstr("user", u)).transpose()?;
        let mut h: rados_t = ptr::null_mut();
        // SAFETY: `h` is a valid out-pointer; the id is a NUL-terminated
        // string or NULL, both outliving the call.
        let r =
            unsafe { rados_create(&mut h, user_c.as_ref().map_or(ptr::null(), |c| c.as_ptr())) };
        if r < 0 {
            return Err(err(r.into(), "error initializing rados".into()));
        }
        // From here `Drop` shuts the handle down on every error path.
        let cluster = Cluster(h);
        match conf {
            Some(path) => {
                let p = cstr("conf", path)?;
                // SAFETY: valid handle and NUL-terminated path.
                let r = unsafe { rados_conf_read_file(cluster.0, p.as_ptr()) };
                if r < 0 {
                    return Err(err(r.into(), format!("error reading conf file {path}")));
                }
            }
            None => {
                // SAFETY: valid handle; NULL asks for the default search.
                let _ = unsafe { rados_conf_read_file(cluster.0, ptr::null()) };
            }
        }
        for (k, v) in settings {
            let (kc, vc) = (cstr("setting", k)?, cstr("value", v)?);
            // SAFETY: valid handle and NUL-terminated strings.
            let r = unsafe { rados_conf_set(cluster.0, kc.as_ptr(), vc.as_ptr()) };
            if r < 0 {
                return Err(err(r.into(), format!("invalid conf option {k}")));
            }
        }
        // SAFETY: valid, configured handle.
        let r = unsafe { rados_connect(cluster.0) };
        if r < 0 {
            return Err(err(r.into(), "error connecting".into()));
        }
        Ok(Arc::new(cluster))
    }

    /// The I/O context of `pool` (and `namespace`).
    pub fn ioctx(self: &Arc<Self>, pool: &str, namespace: Option<&str>) -> BlockResult<IoCtx> {
        let p = cstr("pool", pool)?;
        let mut io: rados_ioctx_t = ptr::null_mut();
        // SAFETY: connected handle, NUL-terminated pool name, valid
        // out-pointer.
        let r = unsafe { rados_ioctx_create(self.0, p.as_ptr(), &mut io) };
        if r < 0 {
            return Err(err(r.into(), format!("error opening pool {pool}")));
        }
        let ctx = IoCtx {
            io,
            _cluster: self.clone(),
        };
        if let Some(ns) = namespace {
            let n = cstr("namespace", ns)?;
            // SAFETY: valid context and NUL-terminated name (copied by
            // librados).
            unsafe { rados_ioctx_set_namespace(ctx.io, n.as_ptr()) };
        }
        Ok(ctx)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create and every IoCtx (and
        // so every Image) holding it is gone.
        unsafe { rados_shutdown(self.0) };
    }
}

/// A pool's I/O context.
pub struct IoCtx {
    io: rados_ioctx_t,
    _cluster: Arc<Cluster>,
}

// SAFETY: I/O contexts are thread-safe in librados, like the cluster.
unsafe impl Send for IoCtx {}
// SAFETY: as for Send.
unsafe impl Sync for IoCtx {}

impl IoCtx {
    /// Create image `name` of `size` bytes (default object size).
    pub fn create_image(&self, name: &str, size: u64) -> BlockResult<()> {
        let n = cstr("image", name)?;
        let mut order: c_int = 0;
        // SAFETY: valid context, NUL-terminated name, valid out-pointer.
        let r = unsafe { rbd_create(self.io, n.as_ptr(), size, &mut order) };
        if r < 0 {
            return Err(err(r.into(), format!("error rbd create {name}")));
        }
        Ok(())
    }

    /// Open image `name` (at `snapshot`), read-only or not.
    pub fn open(
        self: Arc<Self>,
        name: &str,
        snapshot: Option<&str>,
        read_only: bool,
    ) -> BlockResult<Arc<Image>> {
        let n = cstr("image", name)?;
        let s = snapshot.map(|s| cstr("snapshot", s)).transpose()?;
        let snap = s.as_ref().map_or(ptr::null(), |c| c.as_ptr());
        let mut img: rbd_image_t = ptr::null_mut();
        // SAFETY: valid context, NUL-terminated strings (or NULL), valid
        // out-pointer.
        let r = unsafe {
            if read_only {
                rbd_open_read_only(self.io, n.as_ptr(), &mut img, snap)
            } else {
                rbd_open(self.io, n.as_ptr(), &mut img, snap)
            }
        };
        if r < 0 {
            return Err(err(r.into(), format!("error reading header from {name}")));
        }
        Ok(Arc::new(Image { img, _io: self }))
    }
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: the context came from rados_ioctx_create and no Image
        // holding it is left.
        unsafe { rados_ioctx_destroy(self.io) };
    }
}

/// An open RBD image.
pub struct Image {
    img: rbd_image_t,
    _io: Arc<IoCtx>,
}

// SAFETY: librbd image handles accept I/O from several threads at once
// (QEMU and librbd's own tests do so); the pointer is only passed to librbd.
unsafe impl Send for Image {}
// SAFETY: as for Send.
unsafe impl Sync for Image {}

impl Image {
    /// The image's size now.
    pub fn size(&self) -> BlockResult<u64> {
        let mut s = 0u64;
        // SAFETY: open image, valid out-pointer.
        let r = unsafe { rbd_get_size(self.img, &mut s) };
        if r < 0 {
            return Err(err(r.into(), "rbd get size".into()));
        }
        Ok(s)
    }

    /// Resize to `size` bytes.
    pub fn resize(&self, size: u64) -> BlockResult<()> {
        // SAFETY: open image.
        let r = unsafe { rbd_resize(self.img, size) };
        if r < 0 {
            return Err(err(r.into(), "rbd resize".into()));
        }
        Ok(())
    }

    /// Make completed writes durable (writes back librbd's cache).
    pub fn flush(&self) -> BlockResult<()> {
        // SAFETY: open image.
        let r = unsafe { rbd_flush(self.img) };
        if r < 0 {
            return Err(err(r.into(), "rbd flush".into()));
        }
        Ok(())
    }

    /// Run one asynchronous operation started by `start` (given the
    /// completion) and wait for it; its return value.
    fn wait(&self, what: &str, start: impl FnOnce(rbd_completion_t) -> c_int) -> BlockResult<i64> {
        let mut c: rbd_completion_t = ptr::null_mut();
        // SAFETY: valid out-pointer; no callback, so the completion is
        // only waited for.
        let r = unsafe { rbd_aio_create_completion(ptr::null_mut(), None, &mut c) };
        if r < 0 {
            return Err(err(r.into(), format!("rbd {what}")));
        }
        let r = start(c);
        let ret = if r < 0 {
            r as i64
        } else {
            // SAFETY: the operation was queued on `c`, which is live.
            unsafe { rbd_aio_wait_for_complete(c) };
            // SAFETY: `c` is complete.
            unsafe { rbd_aio_get_return_value(c) as i64 }
        };
        // SAFETY: `c` is complete (or was never queued) and is released
        // once.
        unsafe { rbd_aio_release(c) };
        if ret < 0 {
            return Err(err(ret, format!("rbd {what}")));
        }
        Ok(ret)
    }

    /// Read into `iov` at `off`; the bytes read.
    pub fn read(&self, off: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<u64> {
        let n = c_int::try_from(iov.len())
            .map_err(|_| BlockError::Invalid("too many buffers".into()))?;
        // IoSliceMut is ABI-compatible with iovec on Unix (std guarantees
        // it); the slices outlive the wait.
        let ptr = iov.as_mut_ptr() as *const iovec;
        self.wait("read", |c| {
            // SAFETY: open image; `ptr` points at `n` iovecs describing
            // live, writable buffers borrowed until `wait` returns.
            unsafe { rbd_aio_readv(self.img, ptr, n, off, c) }
        })
        .map(|r| r as u64)
    }

    /// Write `iov` at `off`.
    pub fn write(&self, off: u64, iov: &[IoSlice<'_>]) -> BlockResult<()> {
        let n = c_int::try_from(iov.len())
            .map_err(|_| BlockError::Invalid("too many buffers".into()))?;
        let ptr = iov.as_ptr() as *const iovec;
        self.wait("write", |c| {
            // SAFETY: open image; `ptr` points at `n` iovecs describing
            // live buffers borrowed until `wait` returns (librbd only
            // reads them).
            unsafe { rbd_aio_writev(self.img, ptr, n, off, c) }
        })
        .map(|_| ())
    }

    /// Discard `[off, off + len)`.
    pub fn discard(&self, off: u64, len: u64) -> BlockResult<()> {
        // SAFETY: open image, live completion.
        self.wait("discard", |c| unsafe {
            rbd_aio_discard(self.img, off, len, c)
        })
        .map(|_| ())
    }

    /// Make `[off, off + len)` read as zeroes.
    pub fn write_zeroes(&self, off: u64, len: u64) -> BlockResult<()> {
        let len = size_t::try_from(len).map_err(|_| BlockError::Invalid("length".into()))?;
        // SAFETY: open image, live completion.
        self.wait("write zeroes", |c| unsafe {
            rbd_aio_write_zeroes(self.img, off, len, c, 0, 0)
        })
        .map(|_| ())
    }

    /// Start `req` and call `done` from librbd's completion thread when
    /// it is over (a write with FUA is followed by a flush first).
    pub fn submit(self: &Arc<Self>, req: IoRequest, done: Completion) {
        let fua = req.op == IoOp::Write && req.fua;
        let p = Box::new(Pending {
            req,
            done,
            image: self.clone(),
            then_flush: fua,
        });
        start(p);
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: the image is open and no request holds it (each
        // Pending holds an Arc of it).
        unsafe { rbd_close(self.img) };
    }
}

/// A request in librbd's hands.
struct Pending {
    req: IoRequest,
    done: Completion,
    image: Arc<Image>,
    /// A FUA write: flush once the write is done, then complete.
    then_flush: bool,
}

impl Pending {
    fn finish(self, ret: i64) {
        let Pending { mut req, done, .. } = self;
        let res = if ret < 0 {
            Err(err(
                ret,
                format!("rbd {:?} at offset {}", req.op, req.offset),
            ))
        } else {
            if req.op == IoOp::Read && (ret as usize) < req.iov.len() {
                // A read past the image's end (it shrank under us) reads
                // zeroes, as the file protocol's does.
                let mut slices = req.iov.slices_mut();
                zero_from(&mut slices, ret as usize);
            }
            Ok(())
        };
        // The completion must not unwind into librbd's thread.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| done(req, res))).is_err() {
            log::error!("rbd: a completion panicked");
        }
    }
}

/// Zero the bytes of `iov` from byte `from` on.
fn zero_from(iov: &mut [IoSliceMut<'_>], mut from: usize) {
    for s in iov.iter_mut() {
        if from >= s.len() {
            from -= s.len();
            continue;
        }
        s[from..].fill(0);
        from = 0;
    }
}

/// Hand `p` to librbd; on a refusal, complete it at once.
fn start(p: Box<Pending>) {
    // Everything the call needs is taken out first: once the operation
    // is queued, librbd may complete it (and `on_complete` free the
    // Pending) on its own thread before the call returns.
    let img = p.image.img;
    let (op, off, len) = (p.req.op, p.req.offset, p.req.len);
    let iov = p.req.iov.as_raw();
    // Heap memory of the request, which moving the Box does not move.
    let (iov_ptr, iov_n) = (iov.as_ptr(), c_int::try_from(iov.len()));
    let mut c: rbd_completion_t = ptr::null_mut();
    let raw = Box::into_raw(p);
    // SAFETY: `raw` is a leaked Box that `on_complete` takes back exactly
    // once; valid out-pointer.
    let r = unsafe { rbd_aio_create_completion(raw.cast(), Some(on_complete), &mut c) };
    if r < 0 {
        // SAFETY: the completion was not made, so nothing else owns `raw`.
        let p = unsafe { Box::from_raw(raw) };
        return p.finish(r.into());
    }
    let r = match (op, iov_n) {
        (IoOp::Read | IoOp::Write, Err(_)) => -libc::EINVAL,
        // SAFETY: open image (the Pending holds it); the iovecs describe
        // the request's buffers, owned by the Pending until completion;
        // librbd fills them.
        (IoOp::Read, Ok(n)) => unsafe { rbd_aio_readv(img, iov_ptr, n, off, c) },
        // SAFETY: as for reads; librbd only reads the buffers.
        (IoOp::Write, Ok(n)) => unsafe { rbd_aio_writev(img, iov_ptr, n, off, c) },
        // SAFETY: open image, live completion.
        (IoOp::Flush, _) => unsafe { rbd_aio_flush(img, c) },
        // SAFETY: open image, live completion.
        (IoOp::Discard, _) => unsafe { rbd_aio_discard(img, off, len, c) },
        (IoOp::WriteZeroes { .. }, _) => match size_t::try_from(len) {
            // SAFETY: open image, live completion.
            Ok(len) => unsafe { rbd_aio_write_zeroes(img, off, len, c, 0, 0) },
            Err(_) => -libc::EINVAL,
        },
    };
    if r < 0 {
        // SAFETY: the operation was refused, so librbd will not call
        // back: the completion and the Box are ours to release.
        unsafe { rbd_aio_release(c) };
        // SAFETY: as above, nothing else owns `raw`.
        let p = unsafe { Box::from_raw(raw) };
        p.finish(r.into());
    }
}

/// librbd's completion callback.
unsafe extern "C" fn on_complete(c: rbd_completion_t, arg: *mut c_void) {
    // SAFETY: librbd passes the completion it made; it is complete.
    let ret = unsafe { rbd_aio_get_return_value(c) } as i64;
    // SAFETY: released once, after its value was read.
    unsafe { rbd_aio_release(c) };
    // SAFETY: `arg` is the Box leaked by `start` for this completion, and
    // librbd calls back once per completion.
    let mut p = unsafe { Box::from_raw(arg.cast::<Pending>()) };
    if p.then_flush && ret >= 0 {
        // The write is done; the flush that makes it durable follows.
        p.then_flush = false;
        start_flush(p);
        return;
    }
    p.finish(ret);
}

/// Queue a flush for `p` (the second half of a FUA write).
fn start_flush(p: Box<Pending>) {
    let img = p.image.img;
    let mut c: rbd_completion_t = ptr::null_mut();
    let raw = Box::into_raw(p);
    // SAFETY: as in `start`.
    let r = unsafe { rbd_aio_create_completion(raw.cast(), Some(on_complete), &mut c) };
    if r < 0 {
        // SAFETY: not handed over.
        return unsafe { Box::from_raw(raw) }.finish(r.into());
    }
    // SAFETY: open image (held by the Pending until completion), live
    // completion.
    let r = unsafe { rbd_aio_flush(img, c) };
    if r < 0 {
        // SAFETY: refused: ours to release.
        unsafe { rbd_aio_release(c) };
        // SAFETY: not handed over.
        unsafe { Box::from_raw(raw) }.finish(r.into());
    }
}
