//! I/O engines: the worker pool (QEMU's `aio=threads`), io_uring
//! (`aio=io_uring`, Linux `io_uring(7)`) and Linux AIO (`aio=native`,
//! `io_submit(2)`).
//!
//! The pool runs blocking operations on up to 64 threads, created on demand,
//! like QEMU's `thread-pool.c`. The io_uring and Linux AIO engines own one
//! ring/context per `file` node and a reaper thread that waits for
//! completions and calls the requests' callbacks; submitters from any thread
//! push entries under a lock, and requests issued from callbacks on the
//! reaper are submitted in one batch. Short transfers are finished
//! synchronously (reads past EOF return zeroes, as in QEMU).

use crate::driver::{Completion, IoOp, IoRequest};
use crate::error::BlockError;
use io_uring::{opcode, types, IoUring};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// A job for the pool.
pub type Job = Box<dyn FnOnce() + Send>;

struct PoolState {
    queue: VecDeque<Job>,
    idle: usize,
    threads: usize,
}

/// A growable pool of worker threads.
pub struct Pool {
    shared: Arc<(Mutex<PoolState>, Condvar)>,
    max: usize,
}

impl Pool {
    fn new(max: usize) -> Self {
        Pool {
            shared: Arc::new((
                Mutex::new(PoolState {
                    queue: VecDeque::new(),
                    idle: 0,
                    threads: 0,
                }),
                Condvar::new(),
            )),
            max,
        }
    }

    /// Run `job` on a worker thread.
    pub fn spawn(&self, job: Job) {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        st.queue.push_back(job);
        if st.queue.len() > st.idle && st.threads < self.max {
            st.threads += 1;
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name("block-worker".into())
                .spawn(move || worker(shared));
            if spawned.is_err() {
                st.threads -= 1;
            }
        }
        cv.notify_one();
    }
}

fn worker(shared: Arc<(Mutex<PoolState>, Condvar)>) {
    let (lock, cv) = &*shared;
    loop {
        let job = {
            let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(j) = st.queue.pop_front() {
                    break j;
                }
                st.idle += 1;
                st = cv.wait(st).unwrap_or_else(|e| e.into_inner());
                st.idle -= 1;
            }
        };
        job();
    }
}

/// The process-wide worker pool.
pub fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(64))
}

/// Counters of the syscalls a `file` node really made (observed in tests).
#[derive(Default, Debug)]
pub struct SyscallStats {
    /// fdatasync calls (including io_uring IORING_OP_FSYNC with DATASYNC).
    pub fdatasync: AtomicU64,
    /// Writes issued with RWF_DSYNC (FUA).
    pub dsync_writes: AtomicU64,
    /// Reads and writes issued through io_uring.
    pub uring_ops: AtomicU64,
}

struct Inflight {
    req: IoRequest,
    done: Completion,
}

/// In-flight requests of an engine, indexed by the tag the kernel hands
/// back with each completion; freed tags are reused.
#[derive(Default)]
struct Slots {
    items: Vec<Option<Inflight>>,
    free: Vec<usize>,
}

impl Slots {
    fn insert(&mut self, inf: Inflight) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.items[i] = Some(inf);
                i
            }
            None => {
                self.items.push(Some(inf));
                self.items.len() - 1
            }
        }
    }

    /// Takes the request with tag `i`; an unknown or stale tag yields None.
    fn take(&mut self, i: usize) -> Option<Inflight> {
        let inf = self.items.get_mut(i).and_then(|x| x.take());
        if inf.is_some() {
            self.free.push(i);
        }
        inf
    }

    fn is_empty(&self) -> bool {
        self.items.iter().all(|x| x.is_none())
    }
}

const SHUTDOWN: u64 = u64::MAX;
/// A no-op that only wakes the reaper thread (handing a ring to a host).
const WAKE: u64 = u64::MAX - 1;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    /// The ring whose reaper runs on this thread (0: none). Requests pushed
    /// from completion callbacks on the reaper are submitted in one batch by
    /// the reaper's next `io_uring_enter`, without a syscall each.
    static REAPER_OF: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Rings with entries pushed while this thread is plugged ([`plug`]),
    /// and how deep the plugs nest.
    static PLUG: std::cell::RefCell<(usize, Vec<Arc<Uring>>)> =
        const { std::cell::RefCell::new((0, Vec::new())) };
    /// The event loop running on this thread, inside [`RingHost::enter`]:
    /// rings submitted to from here are adopted by it.
    static HOST: std::cell::RefCell<Option<Arc<RingHost>>> = const { std::cell::RefCell::new(None) };
}

/// An event loop that reaps io_uring completions on its own thread, so a
/// request completes where it was submitted, without a hop through the
/// ring's reaper thread (QEMU's iothread has the ring's fd among its
/// sources in the same way).
///
/// The loop watches [`RingHost`]'s eventfd. A ring submitted to from
/// inside [`RingHost::enter`] is adopted: its completions signal the
/// eventfd (`IORING_REGISTER_EVENTFD`), the loop calls
/// [`RingHost::reap`], and the ring's reaper thread parks until the host
/// lets the ring go ([`RingHost::release`], or the node shutting down).
/// The same eventfd serves the loop's other wake-ups ([`RingHost::wake`]).
pub struct RingHost {
    efd: std::fs::File,
    rings: Mutex<Vec<Arc<Uring>>>,
    me: std::sync::Weak<RingHost>,
}

/// Returned by [`RingHost::enter`]; restores the thread when dropped.
pub struct HostGuard {
    prev: Option<Arc<RingHost>>,
    _plug: Plug,
}

impl Drop for HostGuard {
    fn drop(&mut self) {
        let prev = self.prev.take();
        HOST.with(|h| *h.borrow_mut() = prev);
    }
}

impl RingHost {
    pub fn new() -> std::io::Result<Arc<Self>> {
        // SAFETY: eventfd(2) takes no pointers; the fd it returns is ours.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let efd =
            std::fs::File::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        Ok(Arc::new_cyclic(|me| RingHost {
            efd,
            rings: Mutex::new(Vec::new()),
            me: me.clone(),
        }))
    }

    /// Makes the loop readable.
    pub fn wake(&self) {
        use std::io::Write;
        let _ = (&self.efd).write(&1u64.to_ne_bytes());
    }

    /// Consumes the wake-ups so far (before looking at what they were for).
    pub fn clear(&self) {
        use std::io::Read;
        let mut b = [0u8; 8];
        let _ = (&self.efd).read(&mut b);
    }

    /// Until the guard is dropped, this thread is the host's: rings it
    /// submits to are adopted, and its submissions are plugged
    /// ([`plug`]).
    pub fn enter(&self) -> HostGuard {
        let me = self.me.upgrade();
        let prev = HOST.with(|h| std::mem::replace(&mut *h.borrow_mut(), me));
        HostGuard {
            prev,
            _plug: plug(),
        }
    }

    /// True once a ring has been adopted.
    pub fn has_rings(&self) -> bool {
        !lock(&self.rings).is_empty()
    }

    fn adopt(&self, u: &Uring) {
        if u.unhostable.load(Ordering::Relaxed) {
            return;
        }
        let Some(ring) = u.me.upgrade() else {
            return;
        };
        {
            let mut h = lock(&u.host);
            if h.is_some() {
                return;
            }
            if let Err(e) = u.ring.submitter().register_eventfd(self.efd.as_raw_fd()) {
                log::debug!("io_uring: eventfd registration failed, the reaper thread stays: {e}");
                u.unhostable.store(true, Ordering::Relaxed);
                return;
            }
            *h = Some(self.me.clone());
            u.hosted.store(true, Ordering::Release);
        }
        lock(&self.rings).push(ring);
        // The reaper is waiting in io_uring_enter: this completion wakes it,
        // and it parks.
        u.push(opcode::Nop::new().build().user_data(WAKE));
    }

    /// Runs the completions of every adopted ring; returns how many.
    /// Rings whose node shut down are given back to their reaper thread,
    /// which ends once their last requests complete.
    pub fn reap(&self) -> usize {
        let mut total = 0;
        let mut i = 0;
        loop {
            let Some(r) = lock(&self.rings).get(i).cloned() else {
                break;
            };
            total += r.reap_ready();
            if r.stopping.load(Ordering::SeqCst) {
                self.let_go(&r);
            } else {
                i += 1;
            }
        }
        total
    }

    /// True when an adopted ring has completions waiting (no system call),
    /// for a loop that polls before it sleeps.
    pub fn ready(&self) -> bool {
        lock(&self.rings).iter().any(|r| r.has_ready())
    }

    /// Gives every ring back to its reaper thread (the loop is going
    /// away, or stops serving them).
    pub fn release(&self) {
        let rings = std::mem::take(&mut *lock(&self.rings));
        for r in rings {
            Self::unhost(&r);
        }
    }

    fn let_go(&self, r: &Arc<Uring>) {
        lock(&self.rings).retain(|x| !Arc::ptr_eq(x, r));
        Self::unhost(r);
    }

    fn unhost(r: &Uring) {
        let mut h = lock(&r.host);
        let _ = r.ring.submitter().unregister_eventfd();
        r.hosted.store(false, Ordering::Release);
        *h = None;
        r.park.notify_all();
    }
}

impl Drop for RingHost {
    fn drop(&mut self) {
        self.release();
    }
}

impl AsRawFd for RingHost {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.efd.as_raw_fd()
    }
}

/// Holds back `io_uring_enter` for entries pushed on this thread until the
/// returned guard is dropped; then each ring that got entries is entered
/// once. A device handling one notification plugs around it, so the
/// requests of the notification reach the kernel in one system call
/// instead of one each (what QEMU's `blk_io_plug` does). Plugs nest.
pub fn plug() -> Plug {
    PLUG.with(|p| p.borrow_mut().0 += 1);
    Plug(std::marker::PhantomData)
}

/// See [`plug`]. Not `Send`: it unplugs the thread that plugged.
pub struct Plug(std::marker::PhantomData<*const ()>);

impl Drop for Plug {
    fn drop(&mut self) {
        let rings = PLUG.with(|p| {
            let mut p = p.borrow_mut();
            p.0 -= 1;
            if p.0 == 0 {
                std::mem::take(&mut p.1)
            } else {
                Vec::new()
            }
        });
        for r in rings {
            r.enter();
        }
    }
}

/// One io_uring instance with its reaper thread.
pub struct Uring {
    /// This ring, for the plug list of a thread that pushes to it.
    me: std::sync::Weak<Uring>,
    ring: IoUring,
    sq_lock: Mutex<()>,
    /// Serialises the consumers of the completion queue: the reaper
    /// thread, and the event loop that hosts the ring (see [`RingHost`]).
    cq_lock: Mutex<()>,
    slots: Mutex<Slots>,
    fd: Arc<OwnedFd>,
    stats: Arc<SyscallStats>,
    /// The event loop that reaps this ring, when one adopted it; the
    /// reaper thread parks meanwhile.
    host: Mutex<Option<std::sync::Weak<RingHost>>>,
    hosted: AtomicBool,
    park: Condvar,
    /// The shutdown entry was reaped: stop once nothing is in flight.
    stopping: AtomicBool,
    /// Registering an eventfd failed once: never hosted.
    unhostable: AtomicBool,
}

impl Uring {
    /// Create a ring for `fd` and start its reaper thread.
    pub fn new(fd: Arc<OwnedFd>, stats: Arc<SyscallStats>) -> std::io::Result<Arc<Self>> {
        let ring = IoUring::new(256)?;
        let u = Arc::new_cyclic(|me| Uring {
            me: me.clone(),
            ring,
            sq_lock: Mutex::new(()),
            cq_lock: Mutex::new(()),
            slots: Mutex::new(Slots::default()),
            fd,
            stats,
            host: Mutex::new(None),
            hosted: AtomicBool::new(false),
            park: Condvar::new(),
            stopping: AtomicBool::new(false),
            unhostable: AtomicBool::new(false),
        });
        let r = u.clone();
        std::thread::Builder::new()
            .name("io_uring-reaper".into())
            .spawn(move || r.reap())?;
        Ok(u)
    }

    /// Submit a read, write, flush, or a write-zeroes without unmap (as
    /// `fallocate(FALLOC_FL_ZERO_RANGE)`; the caller handles EOPNOTSUPP).
    /// Other operations must use the pool.
    pub fn submit(&self, req: IoRequest, done: Completion) {
        if !self.hosted.load(Ordering::Relaxed) {
            HOST.with(|h| {
                if let Some(h) = &*h.borrow() {
                    h.adopt(self);
                }
            });
        }
        let fd = types::Fd(self.fd.as_raw_fd());
        let iov_ptr = req.iov.as_raw().as_ptr();
        let iov_cnt = req.iov.as_raw().len() as u32;
        let offset = req.offset;
        let op = req.op;
        let fua = req.fua;
        let zero_len = req.len;
        let idx = {
            let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            s.insert(Inflight { req, done })
        };
        let entry = match op {
            IoOp::Read => opcode::Readv::new(fd, iov_ptr, iov_cnt)
                .offset(offset)
                .build(),
            IoOp::Write => {
                let flags = if fua {
                    self.stats.dsync_writes.fetch_add(1, Ordering::Relaxed);
                    libc::RWF_DSYNC
                } else {
                    0
                };
                opcode::Writev::new(fd, iov_ptr, iov_cnt)
                    .offset(offset)
                    .rw_flags(flags)
                    .build()
            }
            IoOp::WriteZeroes { .. } => opcode::Fallocate::new(fd, zero_len)
                .offset(offset)
                .mode(libc::FALLOC_FL_ZERO_RANGE)
                .build(),
            _ => {
                self.stats.fdatasync.fetch_add(1, Ordering::Relaxed);
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
            }
        };
        if matches!(op, IoOp::Read | IoOp::Write) {
            self.stats.uring_ops.fetch_add(1, Ordering::Relaxed);
        }
        self.push(entry.user_data(idx as u64));
    }

    fn push(&self, entry: io_uring::squeue::Entry) {
        let g = self.sq_lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // SAFETY: `sq_lock` serialises every user of the submission
            // queue, so no other SubmissionQueue handle exists meanwhile.
            let mut sq = unsafe { self.ring.submission_shared() };
            // SAFETY: the entry's buffers (iovec array and the memory it
            // points to) belong to the Inflight stored in `slots`, which is
            // only released after the completion for this entry is reaped.
            if unsafe { sq.push(&entry) }.is_ok() {
                sq.sync();
                break;
            }
            drop(sq);
            let _ = self.ring.submitter().submit();
        }
        drop(g);
        if REAPER_OF.with(|r| r.get()) == self as *const Uring as usize {
            return;
        }
        let plugged = PLUG.with(|p| {
            let mut p = p.borrow_mut();
            if p.0 == 0 {
                return false;
            }
            if !p.1.iter().any(|r| std::ptr::eq(Arc::as_ptr(r), self)) {
                match self.me.upgrade() {
                    Some(r) => p.1.push(r),
                    None => return false,
                }
            }
            true
        });
        if !plugged {
            self.enter();
        }
    }

    /// Hands the entries pushed so far to the kernel.
    fn enter(&self) {
        {
            let _g = self.sq_lock.lock().unwrap_or_else(|e| e.into_inner());
            let _ = self.ring.submitter().submit();
        }
        self.wake_host_from_elsewhere();
    }

    /// Requests entered on a thread other than the host's may have
    /// completed inside the submission; the host is told to look.
    fn wake_host_from_elsewhere(&self) {
        if !self.hosted.load(Ordering::Acquire) {
            return;
        }
        let host = lock(&self.host).as_ref().and_then(|w| w.upgrade());
        if let Some(h) = host {
            let here = HOST.with(|t| t.borrow().as_ref().is_some_and(|t| Arc::ptr_eq(t, &h)));
            if !here {
                h.wake();
            }
        }
    }

    /// Takes the completions posted so far and runs their callbacks;
    /// returns how many there were. Either the reaper thread or the
    /// hosting event loop calls it.
    fn reap_ready(&self) -> usize {
        let mut total = 0;
        loop {
            let mut batch = [(0u64, 0i32); 32];
            let mut n = 0;
            {
                let Ok(_g) = self.cq_lock.try_lock() else {
                    // The other consumer is reaping: it takes these too.
                    return total;
                };
                // SAFETY: `cq_lock` serialises every consumer of the
                // completion queue, so no other CompletionQueue handle
                // exists meanwhile.
                let mut cq = unsafe { self.ring.completion_shared() };
                for cqe in &mut cq {
                    batch[n] = (cqe.user_data(), cqe.result());
                    n += 1;
                    if n == batch.len() {
                        break;
                    }
                }
            }
            if n == 0 {
                return total;
            }
            for &(ud, res) in &batch[..n] {
                if ud == SHUTDOWN {
                    self.stopping.store(true, Ordering::SeqCst);
                    continue;
                }
                if ud == WAKE {
                    continue;
                }
                let inf = lock(&self.slots).take(ud as usize);
                if let Some(inf) = inf {
                    total += 1;
                    self.complete(inf, res);
                }
            }
        }
    }

    /// True when completions are waiting to be reaped (no system call).
    fn has_ready(&self) -> bool {
        let Ok(_g) = self.cq_lock.try_lock() else {
            return false;
        };
        // SAFETY: as in `reap_ready`; this handle only reads the indices.
        let cq = unsafe { self.ring.completion_shared() };
        !cq.is_empty()
    }

    /// Stop the reaper once every in-flight request has completed.
    pub fn shutdown(&self) {
        self.push(opcode::Nop::new().build().user_data(SHUTDOWN));
    }

    fn reap(self: Arc<Self>) {
        REAPER_OF.with(|r| r.set(Arc::as_ptr(&self) as usize));
        loop {
            if self.hosted.load(Ordering::Acquire) {
                // Entries pushed by callbacks on this thread wait for its
                // next io_uring_enter: send them before handing over.
                self.enter();
                let mut h = lock(&self.host);
                while h.is_some() && !self.stopping.load(Ordering::SeqCst) {
                    h = self.park.wait(h).unwrap_or_else(|e| e.into_inner());
                }
            }
            if self.stopping.load(Ordering::SeqCst) && lock(&self.slots).is_empty() {
                return;
            }
            match self.ring.submitter().submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
            if self.hosted.load(Ordering::Acquire) {
                // Adopted while this thread waited: what completed is the
                // host's to reap (its eventfd was registered before the
                // wake-up that ended the wait), so it runs on the host.
                continue;
            }
            if self.cq_lock.try_lock().is_err() {
                // The host is reaping; let it finish before looking again.
                std::thread::yield_now();
            }
            self.reap_ready();
        }
    }

    fn complete(&self, inf: Inflight, res: i32) {
        let Inflight { mut req, done } = inf;
        if res < 0 {
            let what = match req.op {
                IoOp::Read => "read",
                IoOp::Write => "write",
                IoOp::WriteZeroes { .. } => "fallocate",
                _ => "flush",
            };
            done(req, Err(BlockError::io(-res, format!("io_uring {what}"))));
            return;
        }
        let want = req.iov.len();
        let got = res as usize;
        let r = match req.op {
            IoOp::Read if got < want => finish_short(&self.fd, &mut req, got, false),
            IoOp::Write if got < want => finish_short(&self.fd, &mut req, got, true),
            _ => Ok(()),
        };
        done(req, r);
    }
}

/// Finish a short io_uring read or write synchronously: reads past the end of
/// the file return zeroes, as in QEMU's file-posix.
fn finish_short(
    fd: &OwnedFd,
    req: &mut IoRequest,
    mut pos: usize,
    write: bool,
) -> Result<(), BlockError> {
    let total = req.iov.len();
    let mut flat = vec![0u8; total];
    if write {
        crate::iov::gather(&req.iov.slices(), &mut flat);
    } else {
        // Keep what was already read.
        let mut tmp = vec![0u8; total];
        crate::iov::gather(&req.iov.slices(), &mut tmp);
        flat[..pos].copy_from_slice(&tmp[..pos]);
    }
    while pos < total {
        let off = req.offset + pos as u64;
        let rest = &mut flat[pos..];
        // SAFETY: `rest` is a valid buffer of rest.len() bytes for the call.
        let n = unsafe {
            if write {
                libc::pwrite(fd.as_raw_fd(), rest.as_ptr().cast(), rest.len(), off as i64)
            } else {
                libc::pread(
                    fd.as_raw_fd(),
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                    off as i64,
                )
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if e == libc::EINTR {
                continue;
            }
            return Err(BlockError::io(e, if write { "write" } else { "read" }));
        }
        if n == 0 {
            if write {
                return Err(BlockError::io(libc::EIO, "short write"));
            }
            break; // EOF: the rest stays zero
        }
        pos += n as usize;
    }
    if !write {
        crate::iov::scatter(&flat, &mut req.iov.slices_mut());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A ring submitted to inside a host's `enter` completes on the host's
    /// thread when it reaps, and on the reaper thread again once released.
    #[test]
    fn a_hosted_ring_completes_on_the_host_thread() {
        let path = std::env::temp_dir().join(format!("strata-ringhost-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let fd: OwnedFd = std::fs::File::open(&path).unwrap().into();
        let _ = std::fs::remove_file(&path);
        let Ok(u) = Uring::new(Arc::new(fd), Arc::default()) else {
            eprintln!("io_uring unavailable: skipped");
            return;
        };
        let host = RingHost::new().unwrap();
        let (tx, rx) = mpsc::channel();
        let read = |tx: mpsc::Sender<(std::thread::ThreadId, u8)>| -> Completion {
            Box::new(move |req, r| {
                r.unwrap();
                let _ = tx.send((std::thread::current().id(), req.iov.slices()[0][0]));
            })
        };
        {
            let _g = host.enter();
            u.submit(
                IoRequest::read(0, crate::iov::IoVecs::from_vec(vec![0; 4096])),
                read(tx.clone()),
            );
        }
        assert!(host.has_rings());
        let t0 = std::time::Instant::now();
        while host.reap() == 0 {
            assert!(t0.elapsed().as_secs() < 10, "no completion reaped");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(rx.recv().unwrap(), (std::thread::current().id(), 7));
        host.release();
        assert!(!host.has_rings());
        u.submit(
            IoRequest::read(4096, crate::iov::IoVecs::from_vec(vec![0; 4096])),
            read(tx),
        );
        let (on, byte) = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert_ne!(
            on,
            std::thread::current().id(),
            "the reaper thread completes it"
        );
        assert_eq!(byte, 7);
        u.shutdown();
    }

    #[test]
    fn pool_runs_many_jobs() {
        let (tx, rx) = mpsc::channel();
        for i in 0..200 {
            let tx = tx.clone();
            pool().spawn(Box::new(move || tx.send(i).unwrap()));
        }
        let mut got: Vec<i32> = (0..200).map(|_| rx.recv().unwrap()).collect();
        got.sort();
        assert_eq!(got, (0..200).collect::<Vec<_>>());
    }
}

/// Linux native AIO (`io_submit(2)`, QEMU's `aio=native`): one context per
/// `file` node and a reaper thread blocked in `io_getevents(2)`. Only
/// meaningful with `O_DIRECT`, which the `file` driver enforces as QEMU does.
pub struct LinuxAio {
    ctx: libc::c_ulong,
    /// iocbs queued by completion callbacks on the reaper thread, submitted
    /// together with one `io_submit` (lets the kernel merge and plug).
    batch: Mutex<Vec<Iocb>>,
    slots: Mutex<Slots>,
    fd: Arc<OwnedFd>,
    stats: Arc<SyscallStats>,
}

/// `struct iocb` from `<linux/aio_abi.h>` (little-endian field order).
#[repr(C)]
#[derive(Default)]
struct Iocb {
    aio_data: u64,
    aio_key: u32,
    aio_rw_flags: i32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

/// `struct io_event`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

const IOCB_CMD_PREAD: u16 = 0;
const IOCB_CMD_FDSYNC: u16 = 3;
const IOCB_CMD_PREADV: u16 = 7;
const IOCB_CMD_PWRITEV: u16 = 8;

impl LinuxAio {
    /// Create a context for `fd` and start its reaper.
    pub fn new(fd: Arc<OwnedFd>, stats: Arc<SyscallStats>) -> std::io::Result<Arc<Self>> {
        let mut ctx: libc::c_ulong = 0;
        // SAFETY: io_setup writes the context id to the pointer we pass.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_setup,
                256 as libc::c_long,
                &mut ctx as *mut libc::c_ulong,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let a = Arc::new(LinuxAio {
            ctx,
            batch: Mutex::new(Vec::new()),
            slots: Mutex::new(Slots::default()),
            fd,
            stats,
        });
        let r = a.clone();
        std::thread::Builder::new()
            .name("linux-aio-reaper".into())
            .spawn(move || r.reap())?;
        Ok(a)
    }

    fn io_submit(&self, iocb: &mut Iocb) -> Result<(), i32> {
        let mut ptrs = [iocb as *mut Iocb];
        loop {
            // SAFETY: one valid iocb pointer; the buffers it names stay
            // alive in `slots` until its completion is reaped.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_submit,
                    self.ctx,
                    1 as libc::c_long,
                    ptrs.as_mut_ptr(),
                )
            };
            if r == 1 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if r < 0 && e == libc::EAGAIN {
                std::thread::yield_now();
                continue;
            }
            return Err(if r < 0 { e } else { libc::EIO });
        }
    }

    /// Submit a read, write or flush.
    pub fn submit(&self, req: IoRequest, done: Completion) {
        let mut iocb = Iocb {
            aio_fildes: self.fd.as_raw_fd() as u32,
            aio_buf: req.iov.as_raw().as_ptr() as u64,
            aio_nbytes: req.iov.as_raw().len() as u64,
            aio_offset: req.offset as i64,
            ..Default::default()
        };
        match req.op {
            IoOp::Read => iocb.aio_lio_opcode = IOCB_CMD_PREADV,
            IoOp::Write => {
                iocb.aio_lio_opcode = IOCB_CMD_PWRITEV;
                if req.fua {
                    iocb.aio_rw_flags = libc::RWF_DSYNC;
                    self.stats.dsync_writes.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {
                iocb.aio_lio_opcode = IOCB_CMD_FDSYNC;
                iocb.aio_buf = 0;
                iocb.aio_nbytes = 0;
                self.stats.fdatasync.fetch_add(1, Ordering::Relaxed);
            }
        }
        let idx = {
            let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            s.insert(Inflight { req, done })
        };
        iocb.aio_data = idx as u64;
        if iocb.aio_lio_opcode != IOCB_CMD_FDSYNC {
            self.stats.uring_ops.fetch_add(1, Ordering::Relaxed);
        }
        if REAPER_OF.with(|r| r.get()) == self as *const LinuxAio as usize {
            self.batch
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(iocb);
            return;
        }
        if let Err(e) = self.io_submit(&mut iocb) {
            let inf = {
                self.slots
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take(idx)
            };
            if let Some(Inflight { req, done }) = inf {
                done(req, Err(BlockError::io(e, "io_submit")));
            }
        }
    }

    /// Submit the iocbs queued by callbacks, in one system call when possible.
    fn flush_batch(&self) {
        let mut batch = std::mem::take(&mut *self.batch.lock().unwrap_or_else(|e| e.into_inner()));
        let mut start = 0;
        while start < batch.len() {
            let mut ptrs: Vec<*mut Iocb> =
                batch[start..].iter_mut().map(|c| c as *mut Iocb).collect();
            // SAFETY: valid iocb pointers; their buffers stay alive in
            // `slots` until the completions are reaped.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_submit,
                    self.ctx,
                    ptrs.len() as libc::c_long,
                    ptrs.as_mut_ptr(),
                )
            };
            if r > 0 {
                start += r as usize;
                continue;
            }
            let e = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if r < 0 && e == libc::EAGAIN {
                std::thread::yield_now();
                continue;
            }
            // Fail the first iocb and go on with the rest.
            let idx = batch[start].aio_data as usize;
            let inf = {
                self.slots
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take(idx)
            };
            if let Some(Inflight { req, done }) = inf {
                done(
                    req,
                    Err(BlockError::io(
                        if r < 0 { e } else { libc::EIO },
                        "io_submit",
                    )),
                );
            }
            start += 1;
        }
    }

    /// Stop the reaper once in-flight requests have completed.
    pub fn shutdown(&self) {
        // A zero-length read completes at once and wakes the reaper.
        let mut iocb = Iocb {
            aio_data: SHUTDOWN,
            aio_fildes: self.fd.as_raw_fd() as u32,
            aio_lio_opcode: IOCB_CMD_PREAD,
            ..Default::default()
        };
        let _ = self.io_submit(&mut iocb);
    }

    fn reap(self: Arc<Self>) {
        REAPER_OF.with(|r| r.set(Arc::as_ptr(&self) as usize));
        let mut events = [IoEvent::default(); 64];
        let mut stopping = false;
        loop {
            if stopping {
                let s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
                if s.is_empty() {
                    break;
                }
            }
            // SAFETY: `events` has room for 64 io_event records.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.ctx,
                    1 as libc::c_long,
                    events.len() as libc::c_long,
                    events.as_mut_ptr(),
                    std::ptr::null_mut::<libc::timespec>(),
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO);
                if e == libc::EINTR {
                    continue;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
            for ev in &events[..n as usize] {
                if ev.data == SHUTDOWN {
                    stopping = true;
                    continue;
                }
                let inf = {
                    self.slots
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take(ev.data as usize)
                };
                if let Some(Inflight { mut req, done }) = inf {
                    let res = ev.res;
                    if res < 0 {
                        done(req, Err(BlockError::io((-res) as i32, "linux-aio")));
                        continue;
                    }
                    let got = res as usize;
                    let want = req.iov.len();
                    let r = match req.op {
                        IoOp::Read if got < want => finish_short(&self.fd, &mut req, got, false),
                        IoOp::Write if got < want => finish_short(&self.fd, &mut req, got, true),
                        _ => Ok(()),
                    };
                    done(req, r);
                }
            }
            self.flush_batch();
        }
        // SAFETY: the context is ours and no longer used.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.ctx) };
    }
}
