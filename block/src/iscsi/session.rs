//! One iSCSI session on one connection, full-feature phase: RFC 7143
//! §4.2.2 (command numbering: CmdSN, ExpCmdSN and MaxCmdSN, the command
//! window; StatSN and ExpStatSN), §4.2.2.1 (serial arithmetic), §4.3 and
//! §11.3-§11.8 (SCSI commands, Data-In with status, R2T and Data-Out,
//! immediate and unsolicited data: §4.2.5.2, §13.10-§13.14), §11.18/§11.19
//! (NOP-In answered by NOP-Out), §11.9 (asynchronous messages), §7.1.4
//! and §7.2 (error recovery level 0: a broken connection ends the session,
//! which is logged in again and its unanswered commands sent again).
//!
//! Threads: submitters queue commands; one writer thread per connection
//! sends PDUs (commands, Data-Out for R2Ts, NOP-Outs), so that neither a
//! submitter nor the reader ever blocks on a full socket while the target
//! waits for us to read; one reader thread per connection parses PDUs
//! ([`super::pdu`]) and completes commands by Initiator Task Tag; one
//! supervisor per session logs in again when the connection breaks
//! (retrying with a back-off of at most a second, as QEMU keeps trying)
//! and fails commands older than `timeout` when one is set.
//!
//! Commands are sent in CmdSN order and only within the window the target
//! opened (CmdSN <= MaxCmdSN); the rest wait in the queue until a PDU
//! from the target moves MaxCmdSN.

use super::login::{self, LoginConfig, LoginError, Offer, Params};
use super::pdu::{self, TargetPdu, BHS_LEN, NO_TAG};
use crate::error::{BlockError, BlockResult};
use crate::iov::IoVecs;
use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The direction of a command's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    None,
    Read,
    Write,
}

/// A SCSI command to run: its CDB and data buffer (`len` bytes).
#[derive(Debug)]
pub struct Command {
    pub cdb: [u8; 16],
    pub dir: Dir,
    pub buf: IoVecs,
}

impl Command {
    pub fn new(cdb: &[u8], dir: Dir, buf: IoVecs) -> Self {
        let mut c = [0u8; 16];
        let n = cdb.len().min(16);
        c[..n].copy_from_slice(&cdb[..n]);
        Command { cdb: c, dir, buf }
    }
}

/// Called once with the command's buffer and its result.
pub type Done = Box<dyn FnOnce(IoVecs, BlockResult<()>) + Send>;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub login: LoginConfig,
    pub host: String,
    pub port: u16,
    pub lun: u16,
    /// Fail commands older than this (QEMU's `timeout`; none when zero).
    pub timeout: Option<Duration>,
    /// Connect and login timeout.
    pub connect_timeout: Duration,
    /// Ping a silent target this often (NOP-Out) and give the connection
    /// up after [`MAX_SILENT_PINGS`] intervals of silence.
    pub nop_interval: Duration,
}

impl SessionConfig {
    fn portal(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A command's buffer and completion, locked by whoever moves its data.
struct Task {
    cmd: Command,
    done: Option<Done>,
    /// `done` only wakes a waiting caller: run it on the reader thread.
    sync: bool,
}

type Slot = Arc<Mutex<Task>>;

/// A command known to the session (queued or in flight).
#[derive(Clone)]
struct Entry {
    slot: Slot,
    started: Instant,
    retries: u32,
    cmdsn: u32,
    /// Expected data transfer length.
    len: u32,
    dir: Dir,
}

/// What the writer sends.
enum Out {
    Cmd {
        e: Entry,
        itt: u32,
    },
    Data {
        slot: Slot,
        itt: u32,
        ttt: u32,
        offset: u32,
        len: u32,
    },
    /// A header without data (NOP-Out, TMF, Logout) whose ExpStatSN is
    /// filled in when sent.
    Raw([u8; BHS_LEN]),
    /// Close the sending side.
    Stop,
}

/// One live connection.
///
/// Sending: PDUs wait in `outq` in the order they must go out (commands
/// are queued under the session lock, in CmdSN order). Whoever holds the
/// `w` lock writes them: a submitting thread writes its own command at
/// once when nobody else is writing (no thread hop per request); the
/// reader never writes (it must not block on a full socket while the
/// target waits for us to read), it queues and wakes the writer thread.
struct Conn {
    gen: u64,
    outq: Mutex<VecDeque<Out>>,
    /// Signals `outq` to the writer thread.
    cv: Condvar,
    /// The sending side and its buffer.
    w: Mutex<(TcpStream, Vec<u8>)>,
    stopped: AtomicBool,
    sock: TcpStream,
    params: Params,
    expstatsn: AtomicU32,
    /// When the reader last got a PDU (ms since the session began).
    last_rx: AtomicU64,
    /// When we last pinged it.
    last_ping: AtomicU64,
}

impl Conn {
    /// Queue `o` for the writer thread. False if too much waits already:
    /// a target that keeps asking (R2Ts, NOP-In pings) without reading
    /// what we send must not make us queue without bound.
    fn send(&self, o: Out) -> bool {
        {
            let mut q = lock(&self.outq);
            if q.len() >= MAX_OUTQ {
                return false;
            }
            q.push_back(o);
        }
        self.cv.notify_one();
        true
    }
    /// Wake the writer thread for what was queued.
    fn kick(&self) {
        self.cv.notify_one();
    }
    fn kill(&self) {
        self.stopped.store(true, Ordering::Release);
        let _ = self.sock.shutdown(Shutdown::Both);
        self.cv.notify_all();
    }
}

struct St {
    conn: Option<Arc<Conn>>,
    gen: u64,
    tasks: HashMap<u32, Entry>,
    queue: VecDeque<Entry>,
    cmdsn: u32,
    maxcmdsn: u32,
    next_itt: u32,
    down_since: Option<Instant>,
    last_error: String,
}

/// An iSCSI session to one LUN.
pub struct Session {
    cfg: SessionConfig,
    lun: [u8; 8],
    st: Mutex<St>,
    cv: Condvar,
    closing: AtomicBool,
    /// Commands cut off by a lost connection are sent again (false while
    /// the node opens: a target that drops us then fails the open).
    retry: AtomicBool,
    epoch: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a connection ended.
enum Fail {
    Io(std::io::Error),
    Proto(String),
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        Fail::Io(e)
    }
}

impl From<pdu::PduError> for Fail {
    fn from(e: pdu::PduError) -> Self {
        Fail::Proto(e.0)
    }
}

type Job = Box<dyn FnOnce() + Send>;

thread_local! {
    /// On a reader thread: the completions waiting to go to the pool.
    static BATCH: std::cell::RefCell<Option<Vec<Job>>> = const { std::cell::RefCell::new(None) };
}

/// Run the reader's gathered completions on the pool, in order.
fn flush_batch() {
    let jobs = BATCH.with(|b| b.borrow_mut().as_mut().map(std::mem::take));
    match jobs {
        Some(v) if v.len() == 1 => {
            if let Some(j) = v.into_iter().next() {
                crate::aio::pool().spawn(j);
            }
        }
        Some(v) if !v.is_empty() => crate::aio::pool().spawn(Box::new(move || {
            for j in v {
                j();
            }
        })),
        _ => {}
    }
}

/// Copy `len` bytes at `pos` of `iov` to the end of `dst`.
fn gather_at(iov: &IoVecs, mut pos: usize, mut len: usize, dst: &mut Vec<u8>) {
    for s in iov.slices() {
        if len == 0 {
            break;
        }
        if pos >= s.len() {
            pos -= s.len();
            continue;
        }
        let n = (s.len() - pos).min(len);
        dst.extend_from_slice(&s[pos..pos + n]);
        len -= n;
        pos = 0;
    }
}

/// Read `len` bytes from `r` into `iov` at `pos` (the caller checked
/// that they fit).
fn read_into<R: Read>(
    r: &mut R,
    iov: &mut IoVecs,
    mut pos: usize,
    mut len: usize,
) -> std::io::Result<()> {
    for mut s in iov.slices_mut() {
        if len == 0 {
            break;
        }
        if pos >= s.len() {
            pos -= s.len();
            continue;
        }
        let n = (s.len() - pos).min(len);
        r.read_exact(&mut s[pos..pos + n])?;
        len -= n;
        pos = 0;
    }
    Ok(())
}

fn discard<R: Read>(r: &mut R, mut n: usize) -> std::io::Result<()> {
    let mut b = [0u8; 4096];
    while n > 0 {
        let k = n.min(b.len());
        r.read_exact(&mut b[..k])?;
        n -= k;
    }
    Ok(())
}

/// QEMU's `scsi_sense_to_errno`: the errno of a CHECK CONDITION.
pub fn sense_errno(key: u8, asc: u8, ascq: u8) -> i32 {
    match key {
        0x00 | 0x01 | 0x06 => return libc::EAGAIN,
        0x0b => return libc::ECANCELED,
        0x02 | 0x05 | 0x07 => {}
        _ => return libc::EIO,
    }
    match (asc, ascq) {
        (0x1a, 0) | (0x20, 0) | (0x24, 0) | (0x26, 0) => libc::EINVAL,
        (0x21, 0) | (0x27, 0x07) => libc::ENOSPC,
        (0x25, 0) => libc::ENOTSUP,
        (0x3a, 0..=2) => libc::ENOMEDIUM,
        (0x27, 0) => libc::EACCES,
        (0x04, 0x01) => libc::EINPROGRESS,
        (0x04, 0x02) => libc::ENOTCONN,
        _ => libc::EIO,
    }
}

fn sense_key_name(k: u8) -> &'static str {
    match k {
        0x0 => "NO SENSE",
        0x1 => "RECOVERED ERROR",
        0x2 => "NOT READY",
        0x3 => "MEDIUM ERROR",
        0x4 => "HARDWARE ERROR",
        0x5 => "ILLEGAL REQUEST",
        0x6 => "UNIT ATTENTION",
        0x7 => "DATA PROTECT",
        0x8 => "BLANK CHECK",
        0xb => "ABORTED COMMAND",
        0xd => "VOLUME OVERFLOW",
        0xe => "MISCOMPARE",
        _ => "sense key",
    }
}

/// What to do with a command that ended.
enum Outcome {
    Ok,
    Retry { delay: Duration },
    Fail(BlockError),
}

/// Task tags from here up are not commands': NOP-Out pings, TMFs, logout.
const FIRST_INTERNAL_TAG: u32 = 0xfff0_0000;
/// The task tag of our NOP-Out pings.
const PING_TAG: u32 = 0xfff0_0001;
/// A connection silent for this many ping intervals is given up
/// (QEMU: a NOP-Out every 5 s, reconnect after 3 unanswered).
const MAX_SILENT_PINGS: u32 = 4;

/// At most this many PDUs wait to be sent on a connection for the reader.
const MAX_OUTQ: usize = 16384;

/// Commands retried on UNIT ATTENTION or a busy target at most this often.
const MAX_RETRIES: u32 = 50;

impl Session {
    fn what(&self) -> String {
        format!("iSCSI {} {}", self.cfg.portal(), self.cfg.login.target)
    }

    fn outcome(&self, cdb0: u8, status: u8, sense: &[u8], retries: u32) -> Outcome {
        let can_retry = retries < MAX_RETRIES;
        match status {
            0x00 => Outcome::Ok,
            0x02 => {
                let (k, asc, ascq) = pdu::parse_sense(sense).unwrap_or((0x0b, 0, 0));
                // A UNIT ATTENTION reports an event (a target that came
                // back, a reset, a changed capacity) and fails only the
                // command that met it: send it again, as QEMU does.
                if k == 0x06 && can_retry {
                    return Outcome::Retry {
                        delay: Duration::ZERO,
                    };
                }
                if k == 0x02 && asc == 0x04 && ascq == 0x01 && can_retry {
                    return Outcome::Retry {
                        delay: Duration::from_millis(100),
                    };
                }
                Outcome::Fail(BlockError::io(
                    sense_errno(k, asc, ascq),
                    format!(
                        "{}: SCSI command {cdb0:#04x} failed: {} (ASC/ASCQ {asc:02x}/{ascq:02x})",
                        self.what(),
                        sense_key_name(k)
                    ),
                ))
            }
            // BUSY, TASK SET FULL: the target asks us to try later.
            0x08 | 0x28 if can_retry => Outcome::Retry {
                delay: Duration::from_millis(20),
            },
            0x18 => Outcome::Fail(BlockError::io(
                libc::EBADE,
                format!("{}: reservation conflict", self.what()),
            )),
            s => Outcome::Fail(BlockError::io(
                libc::EIO,
                format!(
                    "{}: SCSI command {cdb0:#04x} ended with status {s:#04x}",
                    self.what()
                ),
            )),
        }
    }

    /// Open a session: connect, log in, and start the supervisor.
    pub fn open(cfg: SessionConfig) -> BlockResult<Arc<Session>> {
        let lun = pdu::encode_lun(cfg.lun);
        let s = Arc::new(Session {
            cfg,
            lun,
            st: Mutex::new(St {
                conn: None,
                gen: 0,
                tasks: HashMap::new(),
                queue: VecDeque::new(),
                cmdsn: 0,
                maxcmdsn: 0,
                next_itt: 1,
                down_since: Some(Instant::now()),
                last_error: String::new(),
            }),
            cv: Condvar::new(),
            closing: AtomicBool::new(false),
            retry: AtomicBool::new(false),
            epoch: Instant::now(),
        });
        let (sock, l) = s.connect().map_err(|e| {
            BlockError::Open(format!(
                "iscsi: cannot log in to target '{}' at {}: {}",
                s.cfg.login.target,
                s.cfg.portal(),
                match e {
                    LoginError::Io(e) => e.to_string(),
                    LoginError::Failed(m) => m,
                }
            ))
        })?;
        s.install(sock, l)
            .map_err(|e| BlockError::io(libc::EIO, format!("iscsi: thread: {e}")))?;
        let me = s.clone();
        std::thread::Builder::new()
            .name("iscsi-supervisor".into())
            .spawn(move || me.supervise())
            .map_err(|e| BlockError::io(libc::EIO, format!("iscsi: thread: {e}")))?;
        Ok(s)
    }

    /// From now on, commands cut off by a lost connection wait for the
    /// next one instead of failing.
    pub fn enable_retry(&self) {
        self.retry.store(true, Ordering::Release);
    }

    /// The parameters of the current connection (the first one's while
    /// disconnected).
    pub fn params(&self) -> Option<Params> {
        lock(&self.st).conn.as_ref().map(|c| c.params)
    }

    fn connect(&self) -> Result<(TcpStream, login::Session), LoginError> {
        let addrs = (self.cfg.host.as_str(), self.cfg.port).to_socket_addrs()?;
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        for a in addrs {
            match TcpStream::connect_timeout(&a, self.cfg.connect_timeout) {
                Ok(mut s) => {
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(self.cfg.connect_timeout))?;
                    s.set_write_timeout(Some(self.cfg.connect_timeout))?;
                    let cmdsn = lock(&self.st).cmdsn;
                    let l = login::login(&mut s, &self.cfg.login, Offer::default(), cmdsn)?;
                    s.set_read_timeout(None)?;
                    s.set_write_timeout(None)?;
                    return Ok((s, l));
                }
                Err(e) => last = e,
            }
        }
        Err(LoginError::Io(last))
    }

    /// Make `sock` the connection and send what waits.
    fn install(self: &Arc<Self>, sock: TcpStream, l: login::Session) -> std::io::Result<()> {
        let rsock = sock.try_clone()?;
        let wsock = sock.try_clone()?;
        let mut st = lock(&self.st);
        st.gen += 1;
        let conn = Arc::new(Conn {
            gen: st.gen,
            outq: Mutex::new(VecDeque::new()),
            cv: Condvar::new(),
            w: Mutex::new((wsock, Vec::with_capacity(1 << 20))),
            stopped: AtomicBool::new(false),
            last_rx: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
            last_ping: AtomicU64::new(0),
            sock,
            params: l.params,
            expstatsn: AtomicU32::new(l.expstatsn),
        });
        st.cmdsn = l.cmdsn;
        st.maxcmdsn = l.maxcmdsn;
        st.conn = Some(conn.clone());
        st.down_since = None;
        let (me, c) = (self.clone(), conn.clone());
        std::thread::Builder::new()
            .name("iscsi-writer".into())
            .spawn(move || me.writer(c))?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("iscsi-reader".into())
            .spawn(move || me.reader(conn, rsock))?;
        if let Some(c) = self.pump(&mut st) {
            c.kick();
        }
        Ok(())
    }

    /// Queue a command; `done` runs once with its result. `sync`: `done`
    /// only wakes a caller and may run on the reader thread.
    pub fn submit(self: &Arc<Self>, cmd: Command, done: Done, sync: bool) {
        if self.closing.load(Ordering::Acquire) {
            return done(
                cmd.buf,
                Err(BlockError::io(libc::ESHUTDOWN, "iSCSI session is closing")),
            );
        }
        let len = cmd.buf.len();
        let Ok(len) = u32::try_from(len) else {
            return done(
                cmd.buf,
                Err(BlockError::io(libc::EINVAL, "iSCSI command too large")),
            );
        };
        let dir = cmd.dir;
        let e = Entry {
            slot: Arc::new(Mutex::new(Task {
                cmd,
                done: Some(done),
                sync,
            })),
            started: Instant::now(),
            retries: 0,
            cmdsn: 0,
            len,
            dir,
        };
        let mut st = lock(&self.st);
        st.queue.push_back(e);
        let c = self.pump(&mut st);
        drop(st);
        if let Some(c) = c {
            self.write_now(&c);
        }
    }

    /// Submit and wait.
    pub fn run(self: &Arc<Self>, cmd: Command) -> BlockResult<IoVecs> {
        let (tx, rx) = mpsc::channel();
        self.submit(
            cmd,
            Box::new(move |b, r| {
                let _ = tx.send(r.map(|()| b));
            }),
            true,
        );
        rx.recv()
            .unwrap_or_else(|_| Err(BlockError::io(libc::EIO, "iSCSI command lost")))
    }

    /// Queue commands for sending while the window is open; the
    /// connection if any were (the caller writes them or wakes the writer).
    fn pump(&self, st: &mut St) -> Option<Arc<Conn>> {
        let conn = st.conn.clone()?;
        let mut any = false;
        while !st.queue.is_empty() && pdu::sn_le(st.cmdsn, st.maxcmdsn) {
            let Some(mut e) = st.queue.pop_front() else {
                break;
            };
            let mut itt = st.next_itt;
            // Tags from FIRST_INTERNAL_TAG up are our pings and TMFs.
            while itt == 0 || itt >= FIRST_INTERNAL_TAG || st.tasks.contains_key(&itt) {
                itt = if itt >= FIRST_INTERNAL_TAG {
                    1
                } else {
                    itt + 1
                };
            }
            st.next_itt = itt.wrapping_add(1);
            e.cmdsn = st.cmdsn;
            st.cmdsn = st.cmdsn.wrapping_add(1);
            st.tasks.insert(itt, e.clone());
            lock(&conn.outq).push_back(Out::Cmd { e, itt });
            any = true;
        }
        any.then_some(conn)
    }

    /// Complete `e` with `r` (its buffers go back to the caller).
    fn complete(&self, e: Entry, r: BlockResult<()>) {
        let (done, buf, sync) = {
            let mut t = lock(&e.slot);
            (
                t.done.take(),
                std::mem::replace(&mut t.cmd.buf, IoVecs::empty()),
                t.sync,
            )
        };
        let Some(done) = done else { return };
        if sync {
            return done(buf, r);
        }
        // Not on the reader: the caller may wait for more iSCSI I/O. On
        // the reader, completions gather until it has read all that
        // arrived, and go to the pool as one job (one wake-up per burst).
        let job: Job = Box::new(move || done(buf, r));
        let job = BATCH.with(|b| match b.borrow_mut().as_mut() {
            Some(v) => {
                v.push(job);
                None
            }
            None => Some(job),
        });
        if let Some(job) = job {
            crate::aio::pool().spawn(job);
        }
    }

    /// The command `itt` ended with `status`.
    fn finish(self: &Arc<Self>, itt: u32, status: u8, sense: &[u8], underflow: bool) {
        let Some(mut e) = lock(&self.st).tasks.remove(&itt) else {
            return;
        };
        let cdb0 = lock(&e.slot).cmd.cdb[0];
        let mut o = self.outcome(cdb0, status, sense, e.retries);
        // Short INQUIRY or MODE SENSE data is normal (the buffer keeps
        // zeroes); a READ or WRITE that moved less than asked failed.
        if matches!(o, Outcome::Ok) && underflow && matches!(cdb0, 0x88 | 0x8a | 0x28 | 0x2a) {
            o = Outcome::Fail(BlockError::io(
                libc::EIO,
                format!("{}: short data transfer", self.what()),
            ));
        }
        match o {
            Outcome::Ok => self.complete(e, Ok(())),
            Outcome::Fail(err) => self.complete(e, Err(err)),
            Outcome::Retry { delay } => {
                e.retries += 1;
                if delay.is_zero() {
                    let mut st = lock(&self.st);
                    st.queue.push_back(e);
                    if let Some(c) = self.pump(&mut st) {
                        c.kick();
                    }
                } else {
                    let me = self.clone();
                    crate::aio::pool().spawn(Box::new(move || {
                        std::thread::sleep(delay);
                        let mut st = lock(&me.st);
                        st.queue.push_back(e);
                        if let Some(c) = me.pump(&mut st) {
                            c.kick();
                        }
                    }));
                }
            }
        }
    }

    fn fail(&self, itt: u32, err: BlockError) {
        let e = lock(&self.st).tasks.remove(&itt);
        if let Some(e) = e {
            self.complete(e, Err(err));
        }
    }

    /// Write what `conn` has queued while holding its sending side
    /// (`g`); false once the connection stopped.
    fn drain(&self, conn: &Conn, g: &mut (TcpStream, Vec<u8>)) -> bool {
        let p = conn.params;
        loop {
            if conn.stopped.load(Ordering::Acquire) {
                lock(&conn.outq).clear();
                return false;
            }
            let batch = std::mem::take(&mut *lock(&conn.outq));
            if batch.is_empty() {
                return true;
            }
            let (w, buf) = g;
            buf.clear();
            let mut stop = false;
            let mut r = Ok(());
            for o in batch {
                match o {
                    Out::Stop => stop = true,
                    o if !stop && r.is_ok() => {
                        self.encode(conn, p, o, buf);
                        // Written a megabyte at a time: what waits is
                        // bounded by the queue, never copied in whole.
                        if buf.len() >= 1 << 20 {
                            r = w.write_all(buf);
                            buf.clear();
                        }
                    }
                    _ => {}
                }
            }
            if r.is_ok() {
                r = w.write_all(buf);
            }
            if buf.capacity() > 4 << 20 {
                // One large write is no reason to keep its buffer.
                *buf = Vec::with_capacity(1 << 20);
            }
            if stop {
                // The Logout goes out before the FIN; the reader then
                // ends on the closed socket.
                conn.kill();
                return false;
            }
            if let Err(e) = r {
                log::debug!("{}: send: {e}", self.what());
                conn.kill();
                return false;
            }
        }
    }

    /// Write what is queued now, on this thread, unless another thread
    /// is writing (it then writes ours too).
    fn write_now(&self, conn: &Conn) {
        loop {
            match conn.w.try_lock() {
                Ok(mut g) => {
                    if !self.drain(conn, &mut g) {
                        return;
                    }
                }
                Err(_) => return,
            }
            // Something queued after our last look but before we let go
            // of the lock found it taken: it is ours to write.
            if lock(&conn.outq).is_empty() {
                return;
            }
        }
    }

    /// The writer thread of a connection: writes what the reader (and
    /// anything that must not block) queued.
    fn writer(self: Arc<Self>, conn: Arc<Conn>) {
        loop {
            {
                let mut q = lock(&conn.outq);
                while q.is_empty() && !conn.stopped.load(Ordering::Acquire) {
                    q = conn.cv.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            }
            let mut g = lock(&conn.w);
            if !self.drain(&conn, &mut g) {
                return;
            }
        }
    }

    fn push_pdu(&self, p: Params, hdr: &[u8; BHS_LEN], out: &mut Vec<u8>) {
        out.extend_from_slice(hdr);
        if p.header_digest {
            out.extend_from_slice(&pdu::digest(&[hdr]));
        }
    }

    /// Data-Out PDUs for `[offset, offset+len)` of the command's data,
    /// each at most MaxRecvDataSegmentLength (§11.7.7).
    #[allow(clippy::too_many_arguments)]
    fn data_outs(
        &self,
        p: Params,
        t: &Task,
        itt: u32,
        ttt: u32,
        expstatsn: u32,
        offset: u32,
        len: u32,
        out: &mut Vec<u8>,
    ) {
        let mut pos = 0u32;
        let mut datasn = 0u32;
        while pos < len {
            let n = (len - pos).min(p.max_xmit_data);
            let h = pdu::data_out(
                pos + n == len,
                self.lun,
                itt,
                ttt,
                expstatsn,
                datasn,
                offset + pos,
                n,
            );
            self.push_pdu(p, &h, out);
            gather_at(&t.cmd.buf, (offset + pos) as usize, n as usize, out);
            out.resize(out.len() + pdu::pad(n), 0);
            pos += n;
            datasn += 1;
        }
    }

    fn encode(&self, conn: &Conn, p: Params, o: Out, out: &mut Vec<u8>) {
        let expstatsn = conn.expstatsn.load(Ordering::Acquire);
        match o {
            Out::Cmd { e, itt } => {
                let t = lock(&e.slot);
                let write = e.dir == Dir::Write;
                let len = e.len;
                // §4.2.5.2: immediate data up to FirstBurstLength and one
                // PDU; then, without InitialR2T, unsolicited Data-Out up
                // to FirstBurstLength; the rest comes by R2T.
                let imm = if write && p.immediate_data {
                    len.min(p.first_burst).min(p.max_xmit_data)
                } else {
                    0
                };
                let unsolicited_end = if write && !p.initial_r2t {
                    len.min(p.first_burst)
                } else {
                    imm
                };
                let h = pdu::ScsiCommand {
                    read: e.dir == Dir::Read,
                    write,
                    lun: self.lun,
                    itt,
                    expected_len: len,
                    cmdsn: e.cmdsn,
                    expstatsn,
                    cdb: t.cmd.cdb,
                    data_len: imm,
                    more_unsolicited: unsolicited_end > imm,
                }
                .encode();
                self.push_pdu(p, &h, out);
                if imm > 0 {
                    gather_at(&t.cmd.buf, 0, imm as usize, out);
                    out.resize(out.len() + pdu::pad(imm), 0);
                }
                if unsolicited_end > imm {
                    self.data_outs(
                        p,
                        &t,
                        itt,
                        NO_TAG,
                        expstatsn,
                        imm,
                        unsolicited_end - imm,
                        out,
                    );
                }
            }
            Out::Data {
                slot,
                itt,
                ttt,
                offset,
                len,
            } => {
                let t = lock(&slot);
                self.data_outs(p, &t, itt, ttt, expstatsn, offset, len, out);
            }
            Out::Raw(mut h) => {
                h[28..32].copy_from_slice(&expstatsn.to_be_bytes());
                self.push_pdu(p, &h, out);
            }
            Out::Stop => {}
        }
    }

    /// The reader of a connection.
    fn reader(self: Arc<Self>, conn: Arc<Conn>, sock: TcpStream) {
        let mut r = BufReader::with_capacity(256 << 10, sock);
        BATCH.with(|b| *b.borrow_mut() = Some(Vec::new()));
        let why = loop {
            if let Err(e) = self.one_pdu(&conn, &mut r) {
                break e;
            }
            // About to wait for the socket: hand over the completions.
            if r.buffer().is_empty()
                || BATCH.with(|b| b.borrow().as_ref().is_some_and(|v| v.len() >= 64))
            {
                flush_batch();
            }
        };
        self.lost(&conn, why);
        flush_batch();
        BATCH.with(|b| *b.borrow_mut() = None);
    }

    /// Take the sequence numbers of a target PDU (§4.2.2.1).
    fn sequence(&self, conn: &Conn, sn: pdu::Sn, advances: bool) {
        let next = if advances {
            sn.statsn.wrapping_add(1)
        } else {
            sn.statsn
        };
        let cur = conn.expstatsn.load(Ordering::Acquire);
        if pdu::sn_lt(cur, next) {
            conn.expstatsn.store(next, Ordering::Release);
        }
        // §4.2.2.1: MaxCmdSN below ExpCmdSN - 1 is not a window; ignore.
        if !pdu::sn_le(sn.expcmdsn.wrapping_sub(1), sn.maxcmdsn) {
            return;
        }
        let mut st = lock(&self.st);
        if st.conn.as_ref().is_some_and(|c| c.gen == conn.gen)
            && pdu::sn_lt(st.maxcmdsn, sn.maxcmdsn)
        {
            st.maxcmdsn = sn.maxcmdsn;
            if let Some(c) = self.pump(&mut st) {
                c.kick();
            }
        }
    }

    fn read_data<R: Read>(&self, r: &mut R, len: u32) -> std::io::Result<Vec<u8>> {
        let mut d = vec![0u8; len as usize + pdu::pad(len)];
        r.read_exact(&mut d)?;
        d.truncate(len as usize);
        Ok(d)
    }

    fn one_pdu<R: Read>(self: &Arc<Self>, conn: &Conn, r: &mut R) -> Result<(), Fail> {
        let mut b = [0u8; BHS_LEN];
        r.read_exact(&mut b)?;
        conn.last_rx
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        let h = pdu::parse(&b, pdu::MAX_RECV_DATA)?;
        let mut ahs = [0u8; 1020];
        r.read_exact(&mut ahs[..h.ahs_len])?;
        if conn.params.header_digest {
            let mut d = [0u8; 4];
            r.read_exact(&mut d)?;
            if d != pdu::digest(&[&b, &ahs[..h.ahs_len]]) {
                // §7.8 at level 0: the connection is dropped.
                return Err(Fail::Proto("header digest error".into()));
            }
        }
        let dlen = h.data_len;
        match h.pdu {
            TargetPdu::DataIn {
                itt,
                status,
                sn,
                offset,
                residual,
                ..
            } => {
                self.sequence(conn, sn, status.is_some());
                let e = lock(&self.st).tasks.get(&itt).cloned();
                let Some(e) = e else {
                    // A command that timed out: its data goes nowhere.
                    discard(r, dlen as usize + pdu::pad(dlen))?;
                    return Ok(());
                };
                if e.dir != Dir::Read || (offset as u64 + dlen as u64) > e.len as u64 {
                    return Err(Fail::Proto(format!(
                        "Data-In of {dlen} bytes at {offset} for a command that reads {}",
                        if e.dir == Dir::Read { e.len } else { 0 }
                    )));
                }
                {
                    let mut t = lock(&e.slot);
                    read_into(r, &mut t.cmd.buf, offset as usize, dlen as usize)?;
                }
                discard(r, pdu::pad(dlen))?;
                if let Some(s) = status {
                    self.finish(itt, s, &[], residual.1 && residual.2 > 0);
                }
            }
            TargetPdu::ScsiResponse {
                itt,
                response,
                status,
                sn,
                residual,
            } => {
                self.sequence(conn, sn, true);
                let d = self.read_data(r, dlen)?;
                if response != 0 {
                    self.fail(
                        itt,
                        BlockError::io(
                            libc::EIO,
                            format!(
                                "{}: target failure (iSCSI response {response:#04x})",
                                self.what()
                            ),
                        ),
                    );
                } else {
                    self.finish(
                        itt,
                        status,
                        pdu::response_sense(&d),
                        residual.1 && residual.2 > 0,
                    );
                }
            }
            TargetPdu::R2t {
                itt,
                ttt,
                sn,
                offset,
                len,
                ..
            } => {
                self.sequence(conn, sn, false);
                let e = lock(&self.st).tasks.get(&itt).cloned();
                let Some(e) = e else {
                    return Ok(());
                };
                if e.dir != Dir::Write || (offset as u64 + len as u64) > e.len as u64 {
                    return Err(Fail::Proto(format!(
                        "R2T for {len} bytes at {offset} of a command that writes {}",
                        if e.dir == Dir::Write { e.len } else { 0 }
                    )));
                }
                if !conn.send(Out::Data {
                    slot: e.slot,
                    itt,
                    ttt,
                    offset,
                    len,
                }) {
                    return Err(Fail::Proto(
                        "the target sends R2Ts faster than it reads the data".into(),
                    ));
                }
            }
            TargetPdu::NopIn { itt, ttt, lun, sn } => {
                self.sequence(conn, sn, itt != NO_TAG);
                discard(r, dlen as usize + pdu::pad(dlen))?;
                if ttt != NO_TAG {
                    // §11.19: the target pings; answer with its tag.
                    let cmdsn = lock(&self.st).cmdsn;
                    if !conn.send(Out::Raw(pdu::nop_out(NO_TAG, ttt, lun, cmdsn, 0))) {
                        return Err(Fail::Proto(
                            "the target pings faster than it reads the answers".into(),
                        ));
                    }
                }
            }
            TargetPdu::Async { event, sn, .. } => {
                self.sequence(conn, sn, true);
                discard(r, dlen as usize + pdu::pad(dlen))?;
                match event {
                    // The target asks for a logout, or will drop the
                    // connection: log in again now rather than lose
                    // commands to it.
                    1..=3 => {
                        return Err(Fail::Io(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            format!("the target asked to end the connection (event {event})"),
                        )))
                    }
                    _ => log::debug!("{}: asynchronous event {event}", self.what()),
                }
            }
            TargetPdu::Reject { reason, sn } => {
                self.sequence(conn, sn, true);
                let d = self.read_data(r, dlen)?;
                match pdu::rejected_itt(&d) {
                    Some(itt) if itt != NO_TAG => self.fail(
                        itt,
                        BlockError::io(
                            libc::EIO,
                            format!(
                                "{}: the target rejected the command (reason {reason:#04x})",
                                self.what()
                            ),
                        ),
                    ),
                    _ => log::warn!(
                        "{}: the target rejected a PDU (reason {reason:#04x})",
                        self.what()
                    ),
                }
            }
            TargetPdu::TmfResponse { sn, .. }
            | TargetPdu::LogoutResponse { sn, .. }
            | TargetPdu::TextResponse { sn, .. } => {
                self.sequence(conn, sn, true);
                discard(r, dlen as usize + pdu::pad(dlen))?;
            }
            TargetPdu::LoginResponse { .. } => {
                return Err(Fail::Proto(
                    "Login Response in the full-feature phase".into(),
                ))
            }
        }
        Ok(())
    }

    /// The connection ended: what had no status is sent again on the
    /// next connection (level 0 recovery: the new session runs them anew).
    fn lost(self: &Arc<Self>, conn: &Conn, why: Fail) {
        conn.kill();
        let closing = self.closing.load(Ordering::Acquire);
        let retry = self.retry.load(Ordering::Acquire);
        let why_text = match &why {
            Fail::Io(e) => format!("connection lost: {e}"),
            Fail::Proto(e) => format!("protocol error: {e}"),
        };
        let fail_all = {
            let mut st = lock(&self.st);
            if st.conn.as_ref().is_some_and(|c| c.gen == conn.gen) {
                st.conn = None;
                st.down_since = Some(Instant::now());
            }
            let mut back: Vec<Entry> = st.tasks.drain().map(|(_, e)| e).collect();
            let base = back.first().map(|e| e.cmdsn).unwrap_or(0);
            back.sort_by_key(|e| e.cmdsn.wrapping_sub(base).wrapping_add(0x8000_0000));
            for e in back.into_iter().rev() {
                st.queue.push_front(e);
            }
            self.cv.notify_all();
            if closing || !retry {
                std::mem::take(&mut st.queue)
            } else {
                VecDeque::new()
            }
        };
        if !closing {
            match &why {
                Fail::Io(e) => log::warn!("{}: connection lost: {e}", self.what()),
                Fail::Proto(e) => log::error!("{}: {e}; logging in again", self.what()),
            }
            lock(&self.st).last_error = why_text.clone();
        }
        for e in fail_all {
            let err = if closing {
                BlockError::io(libc::ESHUTDOWN, "iSCSI session is closing")
            } else {
                BlockError::io(libc::EIO, format!("{}: {why_text}", self.what()))
            };
            self.complete(e, Err(err));
        }
    }

    /// Fail commands older than the timeout.
    fn expire(&self) {
        let Some(t) = self.cfg.timeout else { return };
        let (old, aborts) = {
            let mut st = lock(&self.st);
            let mut old = Vec::new();
            let q = std::mem::take(&mut st.queue);
            for e in q {
                if e.started.elapsed() >= t {
                    old.push(e);
                } else {
                    st.queue.push_back(e);
                }
            }
            let itts: Vec<u32> = st
                .tasks
                .iter()
                .filter(|(_, e)| e.started.elapsed() >= t)
                .map(|(i, _)| *i)
                .collect();
            let mut aborts = Vec::new();
            for i in itts {
                if let Some(e) = st.tasks.remove(&i) {
                    aborts.push((i, e.cmdsn));
                    old.push(e);
                }
            }
            let conn = st.conn.clone();
            let cmdsn = st.cmdsn;
            (old, conn.map(|c| (c, aborts, cmdsn)))
        };
        if let Some((c, aborts, cmdsn)) = aborts {
            // ABORT TASK (§11.5.1) for each command we give up on, so the
            // target stops working on it.
            for (itt, ref_cmdsn) in aborts {
                let _ = c.send(Out::Raw(pdu::tmf(
                    pdu::TMF_ABORT_TASK,
                    self.lun,
                    NO_TAG - 1 - (itt & 0xffff),
                    itt,
                    cmdsn,
                    0,
                    ref_cmdsn,
                )));
            }
        }
        for e in old {
            self.complete(
                e,
                Err(BlockError::io(
                    libc::ETIMEDOUT,
                    format!("{}: request timed out", self.what()),
                )),
            );
        }
    }

    /// Ping a target that has been silent for a ping interval; give up
    /// a connection silent for [`MAX_SILENT_PINGS`] of them (a target
    /// that vanished without closing it), so the session logs in again.
    fn keepalive(&self, c: &Conn) {
        let iv = self.cfg.nop_interval.as_millis() as u64;
        if iv == 0 {
            return;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        let silent = now.saturating_sub(c.last_rx.load(Ordering::Relaxed));
        if silent >= iv * MAX_SILENT_PINGS as u64 {
            log::warn!(
                "{}: no answer for {} ms; logging in again",
                self.what(),
                silent
            );
            c.kill();
        } else if silent >= iv && now.saturating_sub(c.last_ping.load(Ordering::Relaxed)) >= iv {
            c.last_ping.store(now, Ordering::Relaxed);
            let cmdsn = lock(&self.st).cmdsn;
            let _ = c.send(Out::Raw(pdu::nop_out(PING_TAG, NO_TAG, self.lun, cmdsn, 0)));
        }
    }

    /// Log in again whenever the connection is down.
    fn supervise(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(20);
        loop {
            {
                let st = lock(&self.st);
                if st.conn.is_some() && !self.closing.load(Ordering::Acquire) {
                    let tick = (self.cfg.nop_interval / 2)
                        .clamp(Duration::from_millis(50), Duration::from_millis(500));
                    let _ = self.cv.wait_timeout(st, tick);
                }
            }
            if self.closing.load(Ordering::Acquire) {
                let q = std::mem::take(&mut lock(&self.st).queue);
                for e in q {
                    self.complete(
                        e,
                        Err(BlockError::io(libc::ESHUTDOWN, "iSCSI session is closing")),
                    );
                }
                return;
            }
            self.expire();
            let conn = lock(&self.st).conn.clone();
            if let Some(c) = conn {
                self.keepalive(&c);
                continue;
            }
            match self.connect() {
                Ok((s, l)) => {
                    log::info!("{}: logged in again", self.what());
                    if self.install(s, l).is_ok() {
                        backoff = Duration::from_millis(20);
                        continue;
                    }
                }
                Err(e) => {
                    let m = match e {
                        LoginError::Io(e) => e.to_string(),
                        LoginError::Failed(m) => m,
                    };
                    log::debug!("{}: login: {m}", self.what());
                    lock(&self.st).last_error = m;
                }
            }
            let st = lock(&self.st);
            let _ = self.cv.wait_timeout(st, backoff);
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// End the session: log out and close (commands still queued fail).
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        let (conn, cmdsn) = {
            let st = lock(&self.st);
            (st.conn.clone(), st.cmdsn)
        };
        if let Some(c) = conn {
            let _ = c.send(Out::Raw(pdu::logout(NO_TAG - 1, cmdsn, 0)));
            if !c.send(Out::Stop) {
                c.kill();
            }
        }
        self.cv.notify_all();
    }
}
