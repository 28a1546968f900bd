//! The `nbd` protocol driver: a node served by an NBD server.
//!
//! NBD protocol sections: "Fixed newstyle negotiation" (the handshake:
//! `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT` for
//! `base:allocation`, `NBD_OPT_GO` with `NBD_INFO_BLOCK_SIZE`, falling back
//! to `NBD_OPT_EXPORT_NAME` on servers without GO), "TLS support" (with
//! `tls-creds`, `NBD_OPT_STARTTLS` is the first option and the session
//! ends if the server refuses it or the handshake fails; every reconnection
//! starts TLS again), "Transmission"
//! (requests pipelined on one connection, matched to their replies by
//! cookie; simple and structured replies) and "Request types".
//!
//! Threads: the submitter writes the request (header and payload) under
//! the connection's write lock; one reader thread per connection parses
//! replies and reads data straight into the request's buffers; callers'
//! completions run on the worker pool (they may wait for further NBD
//! requests, which the reader must stay free to answer), the wake-ups of
//! synchronous calls on the reader itself; one supervisor thread per node
//! reconnects.
//!
//! Reconnect (QEMU's `reconnect-delay`): when the connection breaks, the
//! requests in flight and those submitted afterwards wait while the
//! supervisor reconnects in the background; they are sent again on the new
//! connection. Once the connection has been down for `reconnect-delay`
//! seconds, the waiting requests fail with EIO, as do new ones, until a
//! reconnection succeeds (the supervisor keeps trying, with a back-off of
//! at most one second). A server that breaks the protocol (bad magic,
//! unknown cookie, oversized or out-of-range chunks) fails its requests
//! with EIO instead of having them retried, and the connection is dropped.

use super::proto::{self, Chunk, ExportInfo, InfoItem, ProtoError, ReplyHeader};
use super::tls::X509Creds;
use super::transport::{read_into_iov, write_all_vectored, zero_iov, NbdAddr, Stream};
use crate::driver::{BlockDriver, Completion, Extent, IoOp, IoRequest, Limits};
use crate::error::{BlockError, BlockResult};
use crate::graph::OpenCtx;
use crate::iov::IoVecs;
use std::collections::{HashMap, VecDeque};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Connection parameters.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Server address.
    pub addr: NbdAddr,
    /// Export name ("" is the default export).
    pub export: String,
    /// How long requests wait for a reconnection.
    pub reconnect_delay: Duration,
    /// Connect and handshake timeout.
    pub open_timeout: Duration,
    /// `tls-creds`: start TLS with these (client) credentials.
    pub tls: Option<Arc<X509Creds>>,
    /// `tls-hostname`: the name the server's certificate must carry
    /// (default: `server.host`; a unix socket has none, so credentials
    /// that check the server need it there).
    pub tls_hostname: Option<String>,
}

impl ClientConfig {
    /// Defaults for `addr` and `export`: no reconnect delay, 10 s to connect.
    pub fn new(addr: NbdAddr, export: &str) -> Self {
        ClientConfig {
            addr,
            export: export.to_string(),
            reconnect_delay: Duration::ZERO,
            open_timeout: Duration::from_secs(10),
            tls: None,
            tls_hostname: None,
        }
    }

    /// The host name to check in the server's certificate.
    fn tls_name(&self) -> Option<&str> {
        match (&self.tls_hostname, &self.addr) {
            (Some(h), _) => Some(h),
            (None, NbdAddr::Inet { host, .. }) => Some(host),
            (None, NbdAddr::Unix(_)) => None,
        }
    }
}

/// What the handshake agreed.
#[derive(Debug, Clone, Copy)]
struct Negotiated {
    info: ExportInfo,
    structured: bool,
    /// Extended headers: 32-byte requests and reply chunks.
    extended: bool,
    base_allocation: Option<u32>,
}

fn io_err(e: std::io::Error, what: &str) -> BlockError {
    BlockError::io(
        e.raw_os_error().unwrap_or(libc::EIO),
        format!("{what}: {e}"),
    )
}

fn read_exact<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), Fail> {
    r.read_exact(buf).map_err(Fail::Io)
}

/// Why a connection ended.
#[derive(Debug)]
enum Fail {
    /// The transport broke: requests may be retried elsewhere.
    Io(std::io::Error),
    /// The server broke the protocol: its requests fail.
    Proto(ProtoError),
}

impl From<ProtoError> for Fail {
    fn from(e: ProtoError) -> Self {
        Fail::Proto(e)
    }
}

/// Read one option reply to `opt`: (type, data).
fn option_reply(s: &mut Stream, opt: u32) -> Result<(u32, Vec<u8>), Fail> {
    let mut h = [0u8; 20];
    read_exact(s, &mut h)?;
    let h = proto::parse_option_reply_header(&h, opt)?;
    let mut data = vec![0u8; h.len as usize];
    read_exact(s, &mut data)?;
    Ok((h.rtype, data))
}

fn rep_error(rtype: u32, data: &[u8]) -> String {
    let msg = String::from_utf8_lossy(&data[..data.len().min(proto::MAX_STRING)]);
    let name = match rtype {
        proto::REP_ERR_UNSUP => "unsupported",
        proto::REP_ERR_POLICY => "refused by policy",
        proto::REP_ERR_INVALID => "invalid",
        proto::REP_ERR_UNKNOWN => "export unknown",
        proto::REP_ERR_TOO_BIG => "too big",
        proto::REP_ERR_TLS_REQD => "the server requires TLS (tls-creds=)",
        _ => "error",
    };
    if msg.is_empty() {
        name.to_string()
    } else {
        format!("{name}: {msg}")
    }
}

/// Connect and negotiate.
fn handshake(cfg: &ClientConfig) -> BlockResult<(Stream, Negotiated)> {
    let what = format!("Failed to connect to '{}'", cfg.addr);
    let mut s = Stream::connect(&cfg.addr, cfg.open_timeout).map_err(|e| io_err(e, &what))?;
    s.set_timeouts(Some(cfg.open_timeout))
        .map_err(|e| io_err(e, &what))?;
    let n = negotiate(&mut s, cfg);
    if n.is_err() {
        // A soft disconnect, as the protocol asks of a client that gives
        // up during negotiation (fails harmlessly on a dead socket).
        let _ = s.write_all(&proto::encode_option(proto::OPT_ABORT, &[]));
        s.close_notify();
    }
    let n = n.map_err(|e| match e {
        Fail::Io(e) => io_err(e, &format!("{}: handshake", cfg.addr)),
        Fail::Proto(p) => BlockError::Open(format!("{}: {p}", cfg.addr)),
    })?;
    s.set_timeouts(None).map_err(|e| io_err(e, &what))?;
    Ok((s, n))
}

/// `NBD_OPT_STARTTLS` and the TLS handshake; `s` becomes the TLS stream.
fn start_tls(s: &mut Stream, creds: &X509Creds, cfg: &ClientConfig) -> Result<(), Fail> {
    s.write_all(&proto::encode_option(proto::OPT_STARTTLS, &[]))
        .map_err(Fail::Io)?;
    let (t, d) = option_reply(s, proto::OPT_STARTTLS)?;
    if t != proto::REP_ACK {
        // Going on in plain text would defeat tls-creds (the protocol's
        // "downgrade attacks").
        return Err(ProtoError(format!(
            "the server does not offer TLS: {}",
            rep_error(t, &d)
        ))
        .into());
    }
    let raw = s.try_clone().map_err(Fail::Io)?;
    *s = super::tls::connect(raw, creds, cfg.tls_name()).map_err(|e| {
        // Half a TLS handshake: nothing more can be said on this socket.
        s.shutdown();
        // One line that says what failed (a certificate the CA did not
        // sign, a name that does not match).
        Fail::Proto(ProtoError(format!("TLS handshake failed: {e}")))
    })?;
    Ok(())
}

/// An option without data that the server accepts (`NBD_REP_ACK`) or
/// declines (an error reply); `first`: the first option after the
/// greeting (or TLS), whose failures say most about the session.
fn flag_option(s: &mut Stream, cfg: &ClientConfig, opt: u32, first: bool) -> Result<bool, Fail> {
    s.write_all(&proto::encode_option(opt, &[]))
        .map_err(Fail::Io)?;
    let (t, d) = option_reply(s, opt).map_err(|e| match e {
        // In TLS 1.3 the server checks the client's certificate after the
        // client's side of the handshake is done: a refusal shows here.
        Fail::Io(e)
            if first && cfg.tls.is_some() && e.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            Fail::Proto(ProtoError(
                "the server ended the session after the TLS handshake \
                 (does it accept this client's certificate, client-cert.pem?)"
                    .into(),
            ))
        }
        e => e,
    })?;
    if t == proto::REP_ERR_TLS_REQD {
        return Err(ProtoError(format!(
            "export '{}' is not available: {}",
            cfg.export,
            rep_error(t, &d)
        ))
        .into());
    }
    if t != proto::REP_ACK && t & proto::REP_FLAG_ERROR == 0 {
        return Err(ProtoError(format!("unexpected reply {t} to option {opt}")).into());
    }
    Ok(t == proto::REP_ACK)
}

fn negotiate(s: &mut Stream, cfg: &ClientConfig) -> Result<Negotiated, Fail> {
    let export = cfg.export.as_str();
    let mut g = [0u8; 18];
    read_exact(s, &mut g)?;
    let hflags = proto::parse_greeting(&g)?;
    let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
    if hflags & proto::FLAG_NO_ZEROES != 0 {
        cflags |= proto::FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes()).map_err(Fail::Io)?;

    // TLS first, so that every later option is protected.
    if let Some(creds) = &cfg.tls {
        start_tls(s, creds, cfg)?;
    }

    // Extended headers (64-bit lengths; they include structured replies),
    // else structured replies (needed for block status and sparse reads).
    let extended = flag_option(s, cfg, proto::OPT_EXTENDED_HEADERS, true)?;
    let structured = extended || flag_option(s, cfg, proto::OPT_STRUCTURED_REPLY, false)?;

    let mut base_allocation = None;
    if structured {
        let q = proto::encode_meta_context(export, &[proto::BASE_ALLOCATION]);
        s.write_all(&proto::encode_option(proto::OPT_SET_META_CONTEXT, &q))
            .map_err(Fail::Io)?;
        // At most a few replies are expected; a server that sends
        // endless ones is cut off.
        for _ in 0..16 {
            let (t, d) = option_reply(s, proto::OPT_SET_META_CONTEXT)?;
            match t {
                proto::REP_META_CONTEXT => {
                    let (id, name) = proto::parse_meta_context_reply(&d)?;
                    if name == proto::BASE_ALLOCATION {
                        base_allocation = Some(id);
                    }
                }
                proto::REP_ACK => break,
                t if t & proto::REP_FLAG_ERROR != 0 => break,
                t => {
                    return Err(
                        ProtoError(format!("unexpected reply {t} to SET_META_CONTEXT")).into(),
                    )
                }
            }
        }
    }

    s.write_all(&proto::encode_option(
        proto::OPT_GO,
        &proto::encode_go(export, &[proto::INFO_BLOCK_SIZE]),
    ))
    .map_err(Fail::Io)?;
    let mut info: Option<ExportInfo> = None;
    let mut block_size = None;
    for _ in 0..64 {
        let (t, d) = option_reply(s, proto::OPT_GO)?;
        match t {
            proto::REP_INFO => match proto::parse_info(&d)? {
                InfoItem::Export { size, flags } => {
                    info = Some(ExportInfo {
                        size,
                        flags,
                        block_size: None,
                    })
                }
                InfoItem::BlockSize(a, b, c) => block_size = Some((a, b, c)),
                InfoItem::Other(_) => {}
            },
            proto::REP_ACK => {
                let mut i = info
                    .ok_or_else(|| ProtoError("the server did not describe the export".into()))?;
                i.block_size = block_size;
                return Ok(Negotiated {
                    info: i,
                    structured,
                    extended,
                    base_allocation,
                });
            }
            proto::REP_ERR_UNSUP => {
                // An old server: NBD_OPT_EXPORT_NAME has no error reply,
                // the server just closes on an unknown name.
                s.write_all(&proto::encode_option(
                    proto::OPT_EXPORT_NAME,
                    export.as_bytes(),
                ))
                .map_err(Fail::Io)?;
                let mut b = [0u8; 10];
                read_exact(s, &mut b)?;
                let i = proto::parse_export_name_reply(&b)?;
                if hflags & proto::FLAG_NO_ZEROES == 0 {
                    let mut z = [0u8; 124];
                    read_exact(s, &mut z)?;
                }
                return Ok(Negotiated {
                    info: i,
                    structured,
                    extended,
                    base_allocation,
                });
            }
            t if t & proto::REP_FLAG_ERROR != 0 => {
                return Err(ProtoError(format!(
                    "export '{export}' is not available: {}",
                    rep_error(t, &d)
                ))
                .into())
            }
            t => return Err(ProtoError(format!("unexpected reply {t} to NBD_OPT_GO")).into()),
        }
    }
    Err(ProtoError("too many replies to NBD_OPT_GO".into()).into())
}

/// How a request reports back.
enum Done {
    /// A caller's completion: run on the worker pool, never on the reader
    /// thread, so it may itself wait for NBD requests (a format driver's
    /// synchronous metadata I/O) without stopping the replies it waits for.
    Io(Completion),
    /// The completion of a synchronous call (it only wakes the caller):
    /// run on the reader thread.
    Sync(Completion),
    Status(mpsc::Sender<BlockResult<Extent>>),
}

/// A request on its way: everything needed to send it (again) and to
/// complete it.
struct Body {
    cmd: u16,
    flags: u16,
    offset: u64,
    len: u32,
    req: IoRequest,
    done: Done,
    error: Option<BlockError>,
    status: Option<Extent>,
}

impl Body {
    fn complete(self, r: BlockResult<()>) {
        let r = match (r, self.error) {
            (Ok(()), Some(e)) => Err(e),
            (r, _) => r,
        };
        match self.done {
            Done::Io(c) => {
                let req = self.req;
                crate::aio::pool().spawn(Box::new(move || c(req, r)));
            }
            Done::Sync(c) => c(self.req, r),
            Done::Status(tx) => {
                let res = r.and_then(|()| {
                    self.status
                        .ok_or_else(|| BlockError::io(libc::EIO, "NBD server sent no block status"))
                });
                let _ = tx.send(res);
            }
        }
    }
}

/// A request in flight: the submitter holds the lock while sending, the
/// reader while filling it from a reply.
type Slot = Arc<Mutex<Option<Body>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One live connection.
struct Conn {
    writer: Mutex<Stream>,
    control: Stream,
    neg: Negotiated,
    gen: u64,
}

impl Conn {
    fn kill(&self) {
        self.control.shutdown();
    }
}

struct State {
    conn: Option<Arc<Conn>>,
    gen: u64,
    inflight: HashMap<u64, Slot>,
    waiting: VecDeque<Body>,
    /// When the connection was lost (None while connected).
    down_since: Option<Instant>,
}

struct Shared {
    cfg: ClientConfig,
    /// The export as first negotiated: size and flags must not change.
    neg: Negotiated,
    st: Mutex<State>,
    cv: Condvar,
    cookie: AtomicU64,
    closing: AtomicBool,
}

impl Shared {
    fn expired(&self, st: &State) -> bool {
        st.down_since
            .is_some_and(|t| t.elapsed() >= self.cfg.reconnect_delay)
    }

    /// Send `body` now, queue it for the next connection, or fail it.
    fn dispatch(self: &Arc<Self>, body: Body) {
        if self.closing.load(Ordering::Acquire) {
            body.complete(Err(BlockError::io(
                libc::ESHUTDOWN,
                "NBD client is closing",
            )));
            return;
        }
        let slot: Slot = Arc::new(Mutex::new(None));
        // Locked before it is visible to the reader, so a reply cannot be
        // matched to a request that is still being sent.
        let mut guard = lock(&slot);
        let mut st = lock(&self.st);
        let Some(conn) = st.conn.clone() else {
            if self.expired(&st) {
                drop(st);
                body.complete(Err(BlockError::io(
                    libc::EIO,
                    format!("NBD server {} is not connected", self.cfg.addr),
                )));
            } else {
                st.waiting.push_back(body);
                self.cv.notify_all();
            }
            return;
        };
        let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
        st.inflight.insert(cookie, slot.clone());
        drop(st);
        let b = guard.insert(body);
        let h = proto::RequestHeader {
            flags: b.flags,
            cmd: b.cmd,
            cookie,
            offset: b.offset,
            len: b.len as u64,
        };
        let ext;
        let compact;
        let hdr: &[u8] = if conn.neg.extended {
            ext = h.encode_ext();
            &ext
        } else {
            compact = h.encode();
            &compact
        };
        let sent = {
            let mut w = lock(&conn.writer);
            if b.cmd == proto::CMD_WRITE {
                let data = b.req.iov.slices();
                let mut bufs: Vec<&[u8]> = Vec::with_capacity(1 + data.len());
                bufs.push(hdr);
                bufs.extend(data.iter().map(|s| &**s));
                write_all_vectored(&mut *w, &bufs)
            } else {
                w.write_all(hdr)
            }
        };
        drop(guard);
        if sent.is_err() {
            // The reader sees the shutdown and requeues this request.
            conn.kill();
        }
    }

    /// The connection `conn` ended: requeue or fail what was in flight.
    fn lost(self: &Arc<Self>, conn: &Conn, why: Fail) {
        conn.kill();
        let slots: Vec<Slot> = {
            let mut st = lock(&self.st);
            if st.conn.as_ref().is_some_and(|c| c.gen == conn.gen) {
                st.conn = None;
                st.down_since = Some(Instant::now());
            }
            self.cv.notify_all();
            st.inflight.drain().map(|(_, s)| s).collect()
        };
        let closing = self.closing.load(Ordering::Acquire);
        if !closing {
            match &why {
                Fail::Io(e) => log::warn!("NBD server {}: connection lost: {e}", self.cfg.addr),
                Fail::Proto(e) => log::error!("NBD server {}: {e}", self.cfg.addr),
            }
        }
        let retry = matches!(why, Fail::Io(_)) && !self.cfg.reconnect_delay.is_zero() && !closing;
        for s in slots {
            let Some(body) = lock(&s).take() else {
                continue;
            };
            if retry {
                let mut st = lock(&self.st);
                if st.conn.is_some() {
                    // Already reconnected: send it on the new connection.
                    drop(st);
                    self.dispatch(body);
                    continue;
                }
                if !self.expired(&st) {
                    st.waiting.push_back(body);
                    continue;
                }
            }
            body.complete(Err(BlockError::io(
                libc::EIO,
                format!("NBD server {}: connection lost", self.cfg.addr),
            )));
        }
    }

    /// Read replies until the connection ends.
    fn reader(self: Arc<Self>, conn: Arc<Conn>, mut r: Stream) {
        let why = loop {
            match self.one_reply(&conn, &mut r) {
                Ok(()) => {}
                Err(e) => break e,
            }
        };
        self.lost(&conn, why);
    }

    fn one_reply(self: &Arc<Self>, conn: &Conn, r: &mut Stream) -> Result<(), Fail> {
        let mut m = [0u8; 4];
        read_exact(r, &mut m)?;
        let magic = u32::from_be_bytes(m);
        if (magic == proto::EXTENDED_REPLY_MAGIC) != conn.neg.extended {
            return Err(ProtoError(format!(
                "reply magic {magic:#x} does not match the negotiated headers"
            ))
            .into());
        }
        let n = proto::reply_rest_len(magic)?;
        let mut rest = [0u8; 28];
        read_exact(r, &mut rest[..n])?;
        let h = proto::parse_reply_header(magic, &rest[..n])?;
        let cookie = match h {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        };
        let slot = lock(&self.st)
            .inflight
            .get(&cookie)
            .cloned()
            .ok_or_else(|| ProtoError(format!("reply to unknown cookie {cookie}")))?;
        let mut g = lock(&slot);
        let Some(b) = g.as_mut() else {
            return Err(ProtoError(format!("reply to unknown cookie {cookie}")).into());
        };
        let finished = match h {
            ReplyHeader::Simple { error, .. } => {
                if error != 0 {
                    b.error = Some(nbd_error(error, ""));
                } else if b.cmd == proto::CMD_READ {
                    let len = b.len as usize;
                    read_into_iov(r, &mut b.req.iov.slices_mut(), 0, len).map_err(Fail::Io)?;
                } else if b.cmd == proto::CMD_BLOCK_STATUS {
                    return Err(ProtoError("simple reply to NBD_CMD_BLOCK_STATUS".into()).into());
                }
                true
            }
            ReplyHeader::Chunk {
                flags, rtype, len, ..
            } => {
                if !conn.neg.structured {
                    return Err(
                        ProtoError("structured reply that was not negotiated".into()).into(),
                    );
                }
                proto::check_chunk_len(rtype, len, b.len)?;
                let bs_type = if conn.neg.extended {
                    proto::REPLY_TYPE_BLOCK_STATUS_EXT
                } else {
                    proto::REPLY_TYPE_BLOCK_STATUS
                };
                if matches!(
                    rtype,
                    proto::REPLY_TYPE_BLOCK_STATUS | proto::REPLY_TYPE_BLOCK_STATUS_EXT
                ) && rtype != bs_type
                {
                    return Err(ProtoError(format!(
                        "block status chunk of type {rtype} does not match the negotiated headers"
                    ))
                    .into());
                }
                if rtype == proto::REPLY_TYPE_OFFSET_DATA {
                    if b.cmd != proto::CMD_READ || len < 8 {
                        return Err(
                            ProtoError("data chunk for a request that reads none".into()).into(),
                        );
                    }
                    let mut o = [0u8; 8];
                    read_exact(r, &mut o)?;
                    // At most the request's length: checked above.
                    let data_len = (len - 8) as u32;
                    let pos = proto::check_data_chunk(&o, data_len, b.offset, b.len)?;
                    read_into_iov(r, &mut b.req.iov.slices_mut(), pos, data_len as usize)
                        .map_err(Fail::Io)?;
                } else {
                    // Capped by check_chunk_len.
                    let mut d = vec![0u8; len as usize];
                    read_exact(r, &mut d)?;
                    match proto::parse_chunk(rtype, &d)? {
                        Chunk::None => {}
                        Chunk::Hole { offset, len } => {
                            if b.cmd != proto::CMD_READ {
                                return Err(ProtoError(
                                    "hole chunk for a request that reads none".into(),
                                )
                                .into());
                            }
                            let pos = proto::check_in_request(offset, len as u64, b.offset, b.len)?;
                            zero_iov(&mut b.req.iov.slices_mut(), pos, len as usize);
                        }
                        Chunk::BlockStatus { context, extents } => {
                            if b.cmd != proto::CMD_BLOCK_STATUS
                                || Some(context) != conn.neg.base_allocation
                            {
                                return Err(
                                    ProtoError("unexpected block status chunk".into()).into()
                                );
                            }
                            let (l, f) = extents[0];
                            if l == 0 || l > b.len as u64 {
                                return Err(ProtoError(format!(
                                    "block status extent of {l} bytes for a query of {}",
                                    b.len
                                ))
                                .into());
                            }
                            b.status = Some(Extent {
                                len: l,
                                data: f & proto::STATE_HOLE as u64 == 0,
                                zero: f & proto::STATE_ZERO as u64 != 0,
                                offset: None,
                                allocated: true,
                                compressed: false,
                            });
                        }
                        Chunk::Error { error, message } => {
                            b.error.get_or_insert(nbd_error(error, &message));
                        }
                    }
                }
                flags & proto::REPLY_FLAG_DONE != 0
            }
        };
        if finished {
            let body = g.take();
            drop(g);
            lock(&self.st).inflight.remove(&cookie);
            if let Some(body) = body {
                body.complete(Ok(()));
            }
        }
        Ok(())
    }

    /// Install a new connection and send what waited for it.
    fn install(self: &Arc<Self>, s: Stream, neg: Negotiated) -> std::io::Result<()> {
        let r = s.try_clone()?;
        let control = s.try_clone()?;
        let waiting = {
            let mut st = lock(&self.st);
            st.gen += 1;
            let conn = Arc::new(Conn {
                writer: Mutex::new(s),
                control,
                neg,
                gen: st.gen,
            });
            st.conn = Some(conn.clone());
            st.down_since = None;
            let me = self.clone();
            std::thread::Builder::new()
                .name("nbd-reader".into())
                .spawn(move || me.reader(conn, r))?;
            std::mem::take(&mut st.waiting)
        };
        for b in waiting {
            self.dispatch(b);
        }
        Ok(())
    }

    /// The supervisor: reconnect whenever the connection is down.
    fn supervise(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(20);
        loop {
            {
                let mut st = lock(&self.st);
                while st.conn.is_some() && !self.closing.load(Ordering::Acquire) {
                    st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            }
            if self.closing.load(Ordering::Acquire) {
                let waiting = std::mem::take(&mut lock(&self.st).waiting);
                for b in waiting {
                    b.complete(Err(BlockError::io(
                        libc::ESHUTDOWN,
                        "NBD client is closing",
                    )));
                }
                return;
            }
            self.fail_expired();
            match handshake(&self.cfg) {
                Ok((s, neg))
                    if neg.info.size == self.neg.info.size
                        && neg.info.flags == self.neg.info.flags =>
                {
                    log::info!("NBD server {}: reconnected", self.cfg.addr);
                    if self.install(s, neg).is_ok() {
                        backoff = Duration::from_millis(20);
                        continue;
                    }
                }
                Ok(_) => log::error!(
                    "NBD server {}: the export changed on reconnection",
                    self.cfg.addr
                ),
                Err(e) => log::debug!("NBD reconnect: {e}"),
            }
            self.fail_expired();
            // Sleep, but wake early on close.
            let st = lock(&self.st);
            let _ = self.cv.wait_timeout(st, backoff);
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    fn fail_expired(&self) {
        let expired = {
            let mut st = lock(&self.st);
            if self.expired(&st) {
                std::mem::take(&mut st.waiting)
            } else {
                VecDeque::new()
            }
        };
        for b in expired {
            b.complete(Err(BlockError::io(
                libc::EIO,
                format!(
                    "NBD server {}: not reconnected within reconnect-delay",
                    self.cfg.addr
                ),
            )));
        }
    }
}

fn nbd_error(e: u32, msg: &str) -> BlockError {
    let ctx = if msg.is_empty() {
        "NBD server error".to_string()
    } else {
        format!("NBD server error: {msg}")
    };
    BlockError::io(proto::nbd_to_errno(e), ctx)
}

/// The request path of a node: shared state and the largest request.
#[derive(Clone)]
struct Client {
    sh: Arc<Shared>,
    max_len: u32,
}

/// An `nbd` node. Dropping it closes the connection.
pub struct NbdNode {
    c: Client,
}

impl std::fmt::Debug for NbdNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NbdNode({}, '{}')",
            self.c.sh.cfg.addr, self.c.sh.cfg.export
        )
    }
}

impl NbdNode {
    /// Connect to the export.
    pub fn connect(cfg: ClientConfig) -> BlockResult<NbdNode> {
        let (s, neg) = handshake(&cfg)?;
        let max_len = neg
            .info
            .block_size
            .map(|(_, _, m)| m)
            .unwrap_or(proto::MAX_PAYLOAD)
            .min(proto::MAX_PAYLOAD);
        let sh = Arc::new(Shared {
            cfg,
            neg,
            st: Mutex::new(State {
                conn: None,
                gen: 0,
                inflight: HashMap::new(),
                waiting: VecDeque::new(),
                down_since: None,
            }),
            cv: Condvar::new(),
            cookie: AtomicU64::new(1),
            closing: AtomicBool::new(false),
        });
        sh.install(s, neg)
            .map_err(|e| io_err(e, "NBD client thread"))?;
        let me = sh.clone();
        std::thread::Builder::new()
            .name("nbd-reconnect".into())
            .spawn(move || me.supervise())
            .map_err(|e| io_err(e, "NBD client thread"))?;
        Ok(NbdNode {
            c: Client { sh, max_len },
        })
    }

    /// Open from `-blockdev driver=nbd` options.
    pub fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        let cfg = parse_options(ctx)?;
        let node = NbdNode::connect(cfg)?;
        if node.is_read_only_export() && !ctx.common.read_only {
            if ctx.common.auto_read_only {
                ctx.common.read_only = true;
            } else {
                return Err(BlockError::Open(format!(
                    "NBD export '{}' on {} is read-only",
                    node.c.sh.cfg.export, node.c.sh.cfg.addr
                )));
            }
        }
        Ok(Arc::new(node))
    }

    /// The server marked the export read-only.
    pub fn is_read_only_export(&self) -> bool {
        self.c.has(proto::TF_READ_ONLY)
    }

    /// The transmission flags the server sent.
    pub fn transmission_flags(&self) -> u16 {
        self.c.sh.neg.info.flags
    }

    /// Whether the current connection uses extended headers
    /// (`NBD_OPT_EXTENDED_HEADERS`); false while disconnected.
    pub fn extended_headers(&self) -> bool {
        lock(&self.c.sh.st)
            .conn
            .as_ref()
            .is_some_and(|c| c.neg.extended)
    }

    /// Whether the server sends `base:allocation` block status.
    pub fn has_block_status(&self) -> bool {
        self.c.sh.neg.base_allocation.is_some()
    }

    /// Ask the server to prefetch a range (`NBD_CMD_CACHE`; a no-op when
    /// the server does not offer it).
    pub fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        if !self.c.has(proto::TF_SEND_CACHE) {
            return Ok(());
        }
        self.c.simple_sync(proto::CMD_CACHE, 0, offset, len)
    }
}

fn body(cmd: u16, flags: u16, offset: u64, len: u32, req: IoRequest, done: Done) -> Body {
    Body {
        cmd,
        flags,
        offset,
        len,
        req,
        done,
        error: None,
        status: None,
    }
}

fn wait<T>(rx: mpsc::Receiver<BlockResult<T>>) -> BlockResult<T> {
    rx.recv()
        .unwrap_or_else(|_| Err(BlockError::io(libc::EIO, "NBD request lost")))
}

/// Join of a request split into pieces.
struct Join {
    left: usize,
    err: Option<BlockError>,
    whole: Option<(Option<crate::iov::Carved>, IoRequest)>,
    done: Option<Completion>,
}

impl Client {
    fn has(&self, flag: u16) -> bool {
        self.sh.neg.info.flags & flag != 0
    }

    /// A request without data, waited for, split into u32-sized pieces.
    fn simple_sync(&self, cmd: u16, flags: u16, offset: u64, len: u64) -> BlockResult<()> {
        let mut done = 0u64;
        loop {
            let n = (len - done).min(1 << 30) as u32;
            let (tx, rx) = mpsc::channel();
            let c: Completion = Box::new(move |_r, res| {
                let _ = tx.send(res);
            });
            self.sh.dispatch(body(
                cmd,
                flags,
                offset + done,
                n,
                IoRequest::flush(),
                Done::Sync(c),
            ));
            wait(rx)?;
            done += n as u64;
            if done >= len {
                return Ok(());
            }
        }
    }

    /// Submit and wait.
    fn run(&self, req: IoRequest) -> BlockResult<IoRequest> {
        let (tx, rx) = mpsc::channel();
        self.submit(
            req,
            Box::new(move |r, res| {
                let _ = tx.send(res.map(|()| r));
            }),
            true,
        );
        wait(rx)
    }

    /// Submit a request of at most `max_len` bytes (or without data).
    /// `sync`: `done` only wakes a waiting caller (see [`Done::Sync`]).
    fn submit_one(&self, req: IoRequest, done: Completion, sync: bool) {
        let fua = if req.fua { proto::CMD_FLAG_FUA } else { 0 };
        let (cmd, flags) = match req.op {
            IoOp::Read => (proto::CMD_READ, 0),
            IoOp::Write => (proto::CMD_WRITE, fua),
            IoOp::Flush => (proto::CMD_FLUSH, 0),
            IoOp::Discard => (proto::CMD_TRIM, 0),
            IoOp::WriteZeroes { may_unmap } => (
                proto::CMD_WRITE_ZEROES,
                (if may_unmap {
                    0
                } else {
                    proto::CMD_FLAG_NO_HOLE
                }) | fua,
            ),
        };
        let (offset, len) = (req.offset, req.byte_len() as u32);
        let done = if sync {
            Done::Sync(done)
        } else {
            Done::Io(done)
        };
        self.sh.dispatch(body(cmd, flags, offset, len, req, done));
    }

    fn submit(&self, req: IoRequest, done: Completion, sync: bool) {
        // Operations the server does not offer.
        match req.op {
            IoOp::Flush if !self.has(proto::TF_SEND_FLUSH) => return done(req, Ok(())),
            IoOp::Discard if !self.has(proto::TF_SEND_TRIM) => return done(req, Ok(())),
            IoOp::WriteZeroes { .. } if !self.has(proto::TF_SEND_WRITE_ZEROES) => {
                let me = self.clone();
                let mut req = req;
                crate::aio::pool().spawn(Box::new(move || {
                    let r = me.zeroes_by_writing(req.offset, req.len, req.fua);
                    req.iov = IoVecs::empty();
                    done(req, r)
                }));
                return;
            }
            IoOp::Write | IoOp::WriteZeroes { .. } if req.fua && !self.has(proto::TF_SEND_FUA) => {
                // Write, then flush.
                let me = self.clone();
                let mut req = req;
                req.fua = false;
                return self.submit(
                    req,
                    Box::new(move |r, res| match res {
                        Err(e) => done(r, Err(e)),
                        // Not here: this may be the reader thread.
                        Ok(()) => crate::aio::pool().spawn(Box::new(move || {
                            let f = me.run(IoRequest::flush()).map(|_| ());
                            done(r, f)
                        })),
                    }),
                    sync,
                );
            }
            _ => {}
        }
        let size = self.sh.neg.info.size;
        if let Err(e) = crate::driver::check_range("nbd", req.offset, req.byte_len(), size) {
            return done(req, Err(e));
        }
        let max = match req.op {
            IoOp::Read | IoOp::Write => self.max_len as u64,
            IoOp::Flush => u64::MAX,
            _ => 1 << 30,
        };
        let total = req.byte_len();
        if total <= max {
            return self.submit_one(req, done, sync);
        }
        // Split into pieces the server accepts.
        let mut ranges = Vec::new();
        let mut pos = 0u64;
        while pos < total {
            let n = (total - pos).min(max);
            ranges.push((pos, n));
            pos += n;
        }
        let (op, offset, fua) = (req.op, req.offset, req.fua);
        let mut req = req;
        let mut parts: Vec<IoRequest> = Vec::with_capacity(ranges.len());
        let carved = if matches!(op, IoOp::Read | IoOp::Write) {
            let r: Vec<(usize, usize)> = ranges
                .iter()
                .map(|&(a, l)| (a as usize, l as usize))
                .collect();
            let iov = std::mem::replace(&mut req.iov, IoVecs::empty());
            let Some((carved, pieces)) = iov.carve(&r) else {
                return done(req, Err(BlockError::io(libc::EINVAL, "nbd: bad buffers")));
            };
            for ((a, _), p) in ranges.iter().zip(pieces) {
                let mut pr = IoRequest::read(offset + a, p);
                pr.op = op;
                pr.fua = fua;
                parts.push(pr);
            }
            Some(carved)
        } else {
            for &(a, l) in &ranges {
                let mut pr = IoRequest::discard(offset + a, l);
                pr.op = op;
                pr.fua = fua;
                parts.push(pr);
            }
            None
        };
        let join = Arc::new(Mutex::new(Join {
            left: parts.len(),
            err: None,
            whole: Some((carved, req)),
            done: Some(done),
        }));
        for p in parts {
            let j = join.clone();
            self.submit_one(
                p,
                Box::new(move |part, res| {
                    drop(part);
                    let mut g = lock(&j);
                    if let Err(e) = res {
                        g.err.get_or_insert(e);
                    }
                    g.left -= 1;
                    if g.left > 0 {
                        return;
                    }
                    let (Some((carved, mut req)), Some(done)) = (g.whole.take(), g.done.take())
                    else {
                        return;
                    };
                    let err = g.err.take();
                    drop(g);
                    if let Some(Ok(iov)) = carved.map(|c| c.into_inner()) {
                        req.iov = iov;
                    }
                    done(req, err.map_or(Ok(()), Err));
                }),
                sync,
            );
        }
    }

    fn zeroes_by_writing(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
        let chunk = (1u64 << 20).min(self.max_len as u64);
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(chunk) as usize;
            self.run(IoRequest::write(
                offset + pos,
                IoVecs::from_vec(vec![0; n]),
                fua,
            ))?;
            pos += n as u64;
        }
        Ok(())
    }
}

impl Drop for NbdNode {
    fn drop(&mut self) {
        let sh = &self.c.sh;
        sh.closing.store(true, Ordering::Release);
        let conn = lock(&sh.st).conn.clone();
        if let Some(c) = conn {
            // A polite goodbye; the server may already be gone.
            let hdr = proto::RequestHeader {
                flags: 0,
                cmd: proto::CMD_DISC,
                cookie: 0,
                offset: 0,
                len: 0,
            }
            .encode();
            {
                let mut w = lock(&c.writer);
                let _ = w.write_all(&hdr);
                w.close_notify();
            }
            c.kill();
        }
        sh.cv.notify_all();
    }
}

impl BlockDriver for NbdNode {
    /// A protocol on shared storage: no format metadata.
    fn migration_blocker(&self, _node: &str) -> Option<String> {
        None
    }
    fn driver_name(&self) -> &'static str {
        "nbd"
    }
    fn len(&self) -> u64 {
        self.c.sh.neg.info.size
    }
    fn limits(&self) -> Limits {
        let min = self.c.sh.neg.info.block_size.map(|b| b.0).unwrap_or(1);
        Limits {
            request_alignment: min as u64,
            mem_alignment: 1,
        }
    }
    fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        let n = crate::iov::total_len_mut(iov);
        let r = self
            .c
            .run(IoRequest::read(offset, IoVecs::from_vec(vec![0; n])))?;
        let buf = r.iov.into_vec().unwrap_or_default();
        crate::iov::scatter(&buf, iov);
        Ok(())
    }
    fn write_vectored(&self, offset: u64, iov: &[IoSlice<'_>], fua: bool) -> BlockResult<()> {
        let mut buf = vec![0; crate::iov::total_len(iov)];
        crate::iov::gather(iov, &mut buf);
        self.c
            .run(IoRequest::write(offset, IoVecs::from_vec(buf), fua))
            .map(|_| ())
    }
    fn flush(&self) -> BlockResult<()> {
        self.c.run(IoRequest::flush()).map(|_| ())
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.c.run(IoRequest::discard(offset, len)).map(|_| ())
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> BlockResult<()> {
        let mut r = IoRequest::write_zeroes(offset, len, may_unmap);
        r.fua = fua;
        self.c.run(r).map(|_| ())
    }
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        if self.c.sh.neg.base_allocation.is_none() || len == 0 {
            return Ok(Extent {
                len,
                data: true,
                zero: false,
                offset: None,
                allocated: true,
                compressed: false,
            });
        }
        crate::driver::check_range("nbd", offset, len, self.len())?;
        let n = len.min(self.c.max_len as u64) as u32;
        let (tx, rx) = mpsc::channel();
        self.c.sh.dispatch(body(
            proto::CMD_BLOCK_STATUS,
            proto::CMD_FLAG_REQ_ONE,
            offset,
            n,
            IoRequest::flush(),
            Done::Status(tx),
        ));
        wait(rx)
    }
    fn submit(self: Arc<Self>, req: IoRequest, done: Completion) {
        self.c.submit(req, done, false)
    }
    fn filename(&self) -> Option<String> {
        Some(nbd_uri(&self.c.sh.cfg.addr, &self.c.sh.cfg.export))
    }
}

/// `nbd://HOST:PORT/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
pub fn nbd_uri(addr: &NbdAddr, export: &str) -> String {
    match addr {
        NbdAddr::Inet { .. } => format!("nbd://{addr}/{export}"),
        NbdAddr::Unix(p) => format!("nbd+unix:///{export}?socket={p}"),
    }
}

/// `-blockdev driver=nbd` options: `server.type`, `server.host`,
/// `server.port`, `server.path`, `export`, `reconnect-delay`,
/// `open-timeout`, `tls-creds` (a `tls-creds-x509` object with
/// `endpoint=client`) and `tls-hostname`.
fn parse_options(ctx: &mut OpenCtx<'_>) -> BlockResult<ClientConfig> {
    let mut server = ctx
        .opts
        .take_object("server")?
        .ok_or_else(|| BlockError::Open("nbd: the option 'server' is required".into()))?;
    let ty = server
        .take_enum("type", &["inet", "unix"])?
        .unwrap_or_else(|| "inet".into());
    let addr = if ty == "unix" {
        let path = server.require_str("path")?;
        NbdAddr::Unix(path)
    } else {
        let host = server.require_str("host")?;
        let port = match server.take_str("port")? {
            None => 10809,
            Some(p) => p.parse::<u16>().map_err(|_| {
                BlockError::Open(format!("nbd: server.port: '{p}' is not a valid port"))
            })?,
        };
        NbdAddr::Inet { host, port }
    };
    server.finish()?;
    let export = ctx.opts.take_str("export")?.unwrap_or_default();
    let delay = ctx.opts.take_u64("reconnect-delay")?.unwrap_or(0);
    let open_timeout = ctx.opts.take_u64("open-timeout")?.unwrap_or(10).max(1);
    let tls = match ctx.opts.take_str("tls-creds")? {
        None => None,
        Some(id) => Some(
            crate::objects::tls_creds(&id, super::tls::Endpoint::Client)
                .map_err(|e| BlockError::Open(format!("nbd: tls-creds={id}: {e}")))?,
        ),
    };
    let tls_hostname = ctx.opts.take_str("tls-hostname")?;
    if tls_hostname.is_some() && tls.is_none() {
        return Err(BlockError::Open(
            "nbd: tls-hostname= needs tls-creds=".into(),
        ));
    }
    if tls.as_ref().is_some_and(|c| c.needs_hostname())
        && tls_hostname.is_none()
        && matches!(addr, NbdAddr::Unix(_))
    {
        return Err(BlockError::Open(
            "nbd: a unix socket has no host name to check the server's certificate against: \
             set tls-hostname="
                .into(),
        ));
    }
    let _ = ctx.opts.take_str("x-dirty-bitmap")?;
    ctx.describe("server", addr.to_string());
    ctx.describe("export", export.clone());
    ctx.describe("reconnect-delay", delay.to_string());
    Ok(ClientConfig {
        addr,
        export,
        reconnect_delay: Duration::from_secs(delay),
        open_timeout: Duration::from_secs(open_timeout),
        tls,
        tls_hostname,
    })
}
