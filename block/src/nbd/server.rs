//! The NBD server side of one connection: negotiation and transmission
//! over a [`BlockBackend`], for `strata-nbd`.
//!
//! NBD protocol sections: "Fixed newstyle negotiation" (greeting with
//! `NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES`; options `EXPORT_NAME`,
//! `ABORT`, `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT`,
//! `SET_META_CONTEXT` with `base:allocation` and QEMU's `qemu:` contexts
//! (`docs/interop/nbd.txt`: `qemu:allocation-depth`,
//! `qemu:dirty-bitmap:NAME`); unknown ones are answered
//! `NBD_REP_ERR_UNSUP`), "TLS support" (with credentials the server runs
//! in FORCEDTLS mode: every option but `STARTTLS` and `ABORT` is refused
//! with `NBD_REP_ERR_TLS_REQD` until TLS is up, and `EXPORT_NAME` ends the
//! session; without, `STARTTLS` is refused with `NBD_REP_ERR_POLICY`),
//! "Transmission" (simple or structured
//! replies; reads come back as one `OFFSET_DATA` chunk) and "Request types"
//! (READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS).
//!
//! Untrusted clients: every message goes through `proto`'s parsers first;
//! negotiation must finish within [`HANDSHAKE_LIMIT`]; a connection has at
//! most [`INFLIGHT_BYTES`] of request data and [`INFLIGHT_REQUESTS`]
//! requests in flight (the reader waits for replies to go out before
//! taking more), so memory per client is bounded; a
//! protocol violation closes that connection only. Requests run
//! asynchronously on the backend; their replies are queued, in completion
//! order, for the connection's writer thread (a client that stops reading
//! stalls only itself and is dropped after [`REPLY_TIMEOUT`]).

use super::proto::{self, ClientOption, Command, ExportLimits, RequestError, RequestHeader};
use super::transport::{write_all_vectored, Stream};
use crate::backend::BlockBackend;
use crate::driver::IoRequest;
use crate::iov::IoVecs;
use rustls::ServerConfig;
use std::io::{self, Read, Write};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How long a client may take to negotiate (qemu-nbd's `--handshake-limit`
/// default).
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// Request data in flight per connection.
pub const INFLIGHT_BYTES: u64 = 2 * proto::MAX_PAYLOAD as u64;
/// Requests in flight per connection (bounds the replies queued for a
/// client that does not read them, data or not).
pub const INFLIGHT_REQUESTS: usize = 1024;
/// How long a reply may wait for the client to read it.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Extents sent in one block status reply at most.
const MAX_EXTENTS: usize = 1024;

/// One export.
pub struct Export {
    /// Name clients ask for.
    pub name: String,
    /// `NBD_INFO_DESCRIPTION` (`-D`).
    pub description: String,
    /// The image.
    pub blk: Arc<BlockBackend>,
    /// Served read-only.
    pub read_only: bool,
    /// Trim is passed down (`--discard=unmap`): advertise `SEND_TRIM`.
    pub trim: bool,
    /// Several clients may share it (`-e` > 1): advertise `CAN_MULTI_CONN`.
    pub multi_conn: bool,
    /// Dirty bitmaps offered as `qemu:dirty-bitmap:NAME` metadata
    /// contexts (QEMU's `nbd-server-add bitmap=`, qemu-nbd's `-B`): what an
    /// incremental backup pulls.
    pub bitmaps: Vec<Arc<crate::bitmap::DirtyBitmap>>,
    /// Offer the `qemu:allocation-depth` metadata context (qemu-nbd's
    /// `-A`): which layer of the backing chain each range comes from.
    pub allocation_depth: bool,
}

/// The metadata context id of `base:allocation`.
const CTX_ALLOCATION: u32 = 1;
/// The metadata context id of `qemu:allocation-depth`.
const CTX_DEPTH: u32 = 2;
/// The metadata context id of the export's first dirty bitmap; the others
/// follow in order.
const CTX_BITMAP: u32 = 3;
/// `qemu:dirty-bitmap:` status bit: the range is dirty.
const STATE_DIRTY: u32 = 1;
/// The name of QEMU's allocation depth context.
const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// A metadata context an export offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ctx {
    Allocation,
    Depth,
    /// The export's bitmap at this index.
    Bitmap(usize),
}

impl Ctx {
    fn id(self) -> u32 {
        match self {
            Ctx::Allocation => CTX_ALLOCATION,
            Ctx::Depth => CTX_DEPTH,
            Ctx::Bitmap(i) => CTX_BITMAP + i as u32,
        }
    }
}

impl Export {
    /// The metadata contexts this export offers, with their names, in the
    /// order replies list them.
    fn contexts(&self) -> Vec<(Ctx, String)> {
        let mut v = vec![(Ctx::Allocation, proto::BASE_ALLOCATION.to_string())];
        if self.allocation_depth {
            v.push((Ctx::Depth, ALLOCATION_DEPTH.to_string()));
        }
        for (i, b) in self.bitmaps.iter().enumerate() {
            v.push((Ctx::Bitmap(i), format!("qemu:dirty-bitmap:{}", b.name())));
        }
        v
    }
}

/// Whether `query` of `NBD_OPT_SET_META_CONTEXT` (`set`) or
/// `LIST_META_CONTEXT` selects the context `name`. Only listing takes the
/// namespace queries (`base:`, `qemu:`, `qemu:dirty-bitmap:`), as in QEMU's
/// `docs/interop/nbd.txt`.
fn selects(set: bool, query: &str, name: &str) -> bool {
    query == name
        || (!set
            && matches!(query, "base:" | "qemu:" | "qemu:dirty-bitmap:")
            && name.starts_with(query))
}

impl Export {
    /// The transmission flags of this export.
    pub fn flags(&self) -> u16 {
        let mut f = proto::TF_HAS_FLAGS
            | proto::TF_SEND_FLUSH
            | proto::TF_SEND_FUA
            | proto::TF_SEND_CACHE
            | proto::TF_SEND_DF;
        if self.read_only {
            f |= proto::TF_READ_ONLY;
        } else {
            // Not SEND_FAST_ZERO: whether zeroing is fast depends on the
            // image, so it is not promised.
            f |= proto::TF_SEND_WRITE_ZEROES;
            if self.trim {
                f |= proto::TF_SEND_TRIM;
            }
        }
        if self.multi_conn {
            f |= proto::TF_CAN_MULTI_CONN;
        }
        f
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a connection ended (for the log).
#[derive(Debug)]
pub enum End {
    /// The client said goodbye (`NBD_CMD_DISC`, `NBD_OPT_ABORT`).
    Clean,
    /// The socket failed or closed.
    Io(io::Error),
    /// The client broke the protocol.
    Proto(proto::ProtoError),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Clean => f.write_str("disconnected"),
            End::Io(e) => write!(f, "connection failed: {e}"),
            End::Proto(e) => write!(f, "protocol error: {e}"),
        }
    }
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        End::Io(e)
    }
}

impl From<proto::ProtoError> for End {
    fn from(e: proto::ProtoError) -> Self {
        End::Proto(e)
    }
}

/// What negotiation chose.
struct Session {
    export: Arc<Export>,
    structured: bool,
    /// Extended headers (implies `structured`).
    extended: bool,
    /// The metadata contexts selected with `NBD_OPT_SET_META_CONTEXT`.
    contexts: Vec<Ctx>,
}

fn reply(s: &mut Stream, opt: u32, rtype: u32, data: &[u8]) -> io::Result<()> {
    s.write_all(&proto::encode_option_reply(opt, rtype, data))
}

fn find(exports: &[Arc<Export>], name: &str) -> Option<Arc<Export>> {
    exports.iter().find(|e| e.name == name).cloned()
}

/// Negotiate; `None` when the client left during negotiation. With `tls`,
/// the client must start TLS first (`s` becomes the TLS stream).
fn negotiate(
    s: &mut Stream,
    exports: &[Arc<Export>],
    tls: Option<&Arc<ServerConfig>>,
) -> Result<Option<Session>, End> {
    s.write_all(&proto::encode_greeting(
        proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
    ))?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    let cflags = u32::from_be_bytes(cf);
    if cflags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(proto::ProtoError(format!("unknown client flags {cflags:#x}")).into());
    }
    let no_zeroes = cflags & proto::FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut extended = false;
    let mut contexts: Vec<Ctx> = Vec::new();
    let mut data = Vec::new();
    let start = std::time::Instant::now();
    loop {
        // Each read has its own timeout; this bounds the whole exchange.
        if start.elapsed() > HANDSHAKE_LIMIT {
            return Err(proto::ProtoError("negotiation took too long".into()).into());
        }
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let h = proto::parse_option_header(&h)?;
        data.resize(h.len as usize, 0);
        s.read_exact(&mut data)?;
        // FORCEDTLS: nothing but STARTTLS and ABORT before TLS.
        if tls.is_some()
            && !s.is_tls()
            && !matches!(h.option, proto::OPT_STARTTLS | proto::OPT_ABORT)
        {
            if h.option == proto::OPT_EXPORT_NAME {
                // No error reply exists for this option.
                return Err(proto::ProtoError(
                    "the client asked for an export without starting TLS".into(),
                )
                .into());
            }
            reply(
                s,
                h.option,
                proto::REP_ERR_TLS_REQD,
                b"TLS is required: start it with NBD_OPT_STARTTLS",
            )?;
            continue;
        }
        let o = match proto::parse_option(h.option, &data) {
            Ok(o) => o,
            Err(e) => {
                if h.option == proto::OPT_EXPORT_NAME {
                    return Err(e.into());
                }
                reply(s, h.option, proto::REP_ERR_INVALID, e.0.as_bytes())?;
                continue;
            }
        };
        match o {
            ClientOption::ExportName(name) => {
                // No error reply exists for this option: close on a bad name.
                let Some(export) = find(exports, &name) else {
                    return Err(proto::ProtoError(format!("unknown export '{name}'")).into());
                };
                let mut v = export.blk.len().to_be_bytes().to_vec();
                v.extend_from_slice(&export.flags().to_be_bytes());
                if !no_zeroes {
                    v.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&v)?;
                return Ok(Some(Session {
                    export,
                    structured,
                    extended,
                    contexts,
                }));
            }
            ClientOption::Abort => {
                let _ = reply(s, h.option, proto::REP_ACK, &[]);
                return Ok(None);
            }
            ClientOption::List => {
                for e in exports {
                    let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    // The rest of the reply is the description.
                    d.extend_from_slice(e.description.as_bytes());
                    reply(s, h.option, proto::REP_SERVER, &d)?;
                }
                reply(s, h.option, proto::REP_ACK, &[])?;
            }
            ClientOption::Info { go, name, infos } => {
                let Some(export) = find(exports, &name) else {
                    let msg = format!("export '{name}' not present");
                    reply(s, h.option, proto::REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                };
                reply(
                    s,
                    h.option,
                    proto::REP_INFO,
                    &proto::encode_info_export(export.blk.len(), export.flags()),
                )?;
                let align = export.blk.request_alignment().clamp(1, 64 << 10) as u32;
                let align = align.next_power_of_two();
                reply(
                    s,
                    h.option,
                    proto::REP_INFO,
                    &proto::encode_info_block_size(align, 4096.max(align), proto::MAX_PAYLOAD),
                )?;
                if infos.contains(&proto::INFO_NAME) {
                    reply(
                        s,
                        h.option,
                        proto::REP_INFO,
                        &proto::encode_info_string(proto::INFO_NAME, &export.name),
                    )?;
                }
                if infos.contains(&proto::INFO_DESCRIPTION) && !export.description.is_empty() {
                    reply(
                        s,
                        h.option,
                        proto::REP_INFO,
                        &proto::encode_info_string(proto::INFO_DESCRIPTION, &export.description),
                    )?;
                }
                reply(s, h.option, proto::REP_ACK, &[])?;
                if go {
                    return Ok(Some(Session {
                        export,
                        structured,
                        extended,
                        contexts,
                    }));
                }
            }
            ClientOption::StructuredReply if extended => reply(
                s,
                h.option,
                proto::REP_ERR_EXT_HEADER_REQD,
                b"extended headers are already on",
            )?,
            ClientOption::StructuredReply if structured => reply(
                s,
                h.option,
                proto::REP_ERR_INVALID,
                b"structured replies are already on",
            )?,
            ClientOption::StructuredReply => {
                structured = true;
                reply(s, h.option, proto::REP_ACK, &[])?;
            }
            ClientOption::ExtendedHeaders if extended => reply(
                s,
                h.option,
                proto::REP_ERR_INVALID,
                b"extended headers are already on",
            )?,
            ClientOption::ExtendedHeaders => {
                // They include structured replies.
                extended = true;
                structured = true;
                reply(s, h.option, proto::REP_ACK, &[])?;
            }
            ClientOption::MetaContext {
                set,
                export,
                queries,
            } => {
                if !structured {
                    reply(
                        s,
                        h.option,
                        proto::REP_ERR_INVALID,
                        b"structured replies were not negotiated",
                    )?;
                    continue;
                }
                let Some(ex) = find(exports, &export) else {
                    let msg = format!("export '{export}' not present");
                    reply(s, h.option, proto::REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                };
                // Listing with no query lists everything.
                let all = !set && queries.is_empty();
                let chosen: Vec<(Ctx, String)> = ex
                    .contexts()
                    .into_iter()
                    .filter(|(_, name)| all || queries.iter().any(|q| selects(set, q, name)))
                    .collect();
                for (c, name) in &chosen {
                    let mut d = c.id().to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    reply(s, h.option, proto::REP_META_CONTEXT, &d)?;
                }
                if set {
                    // A new SET replaces the earlier selection.
                    contexts = chosen.into_iter().map(|(c, _)| c).collect();
                }
                reply(s, h.option, proto::REP_ACK, &[])?;
            }
            ClientOption::StartTls => match tls {
                None => reply(
                    s,
                    h.option,
                    proto::REP_ERR_POLICY,
                    b"TLS is not configured on this server",
                )?,
                Some(_) if s.is_tls() => {
                    reply(s, h.option, proto::REP_ERR_INVALID, b"TLS is already on")?
                }
                Some(cfg) => {
                    reply(s, h.option, proto::REP_ACK, &[])?;
                    let raw = s.try_clone()?;
                    *s = super::tls::accept(raw, cfg.clone()).map_err(|e| {
                        End::Io(io::Error::new(
                            e.kind(),
                            format!("TLS handshake failed: {e}"),
                        ))
                    })?;
                    // Nothing negotiated in plain text carries over.
                    structured = false;
                    extended = false;
                    contexts.clear();
                }
            },
            ClientOption::Unknown(_) => {
                reply(s, h.option, proto::REP_ERR_UNSUP, &[])?;
            }
        }
    }
}

/// Bytes of request data in flight on a connection, and how many requests.
#[derive(Default)]
struct Budget {
    state: Mutex<(u64, usize)>,
    cv: Condvar,
}

impl Budget {
    fn take(&self, bytes: u64) {
        let mut g = lock(&self.state);
        while g.1 >= INFLIGHT_REQUESTS || (g.0 > 0 && g.0 + bytes > INFLIGHT_BYTES) {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.0 += bytes;
        g.1 += 1;
    }
    fn give(&self, bytes: u64) {
        let mut g = lock(&self.state);
        g.0 -= bytes;
        g.1 -= 1;
        self.cv.notify_all();
    }
    fn drain(&self) {
        let mut g = lock(&self.state);
        while g.1 > 0 {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A reply on its way to the writer thread, with the request data it
/// accounts for.
struct Out {
    head: Vec<u8>,
    data: Vec<u8>,
    bytes: u64,
}

/// The replying half of a connection. Completions never write to the
/// socket themselves: they queue the reply for the connection's writer
/// thread, so a client that stops reading stalls only its own connection
/// (its budget runs out and its reader waits), never the block layer's
/// shared threads.
struct Replier {
    tx: Mutex<Option<mpsc::Sender<Out>>>,
    structured: bool,
    extended: bool,
    budget: Arc<Budget>,
}

/// Which request a reply answers: its cookie, and its offset (echoed in
/// extended reply headers).
#[derive(Clone, Copy)]
struct Req {
    cookie: u64,
    offset: u64,
}

impl Replier {
    fn push(&self, head: Vec<u8>, data: Vec<u8>, bytes: u64) {
        if let Some(tx) = lock(&self.tx).as_ref() {
            if tx.send(Out { head, data, bytes }).is_ok() {
                return;
            }
        }
        self.budget.give(bytes);
    }
    /// Queue a reply without data; gives `bytes` of budget back once sent.
    fn send(&self, q: Req, r: Result<(), (u32, String)>, bytes: u64) {
        let head = match (r, self.structured) {
            (Ok(()), false) => proto::encode_simple_reply(q.cookie, 0).to_vec(),
            (Err((e, _)), false) => proto::encode_simple_reply(q.cookie, e).to_vec(),
            (Ok(()), true) => proto::encode_chunk(
                self.extended,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_NONE,
                q.cookie,
                q.offset,
                0,
            ),
            (Err((e, msg)), true) => {
                proto::encode_error_chunk(self.extended, q.cookie, q.offset, e, &msg)
            }
        };
        self.push(head, Vec::new(), bytes);
    }
    fn send_read(&self, q: Req, data: Vec<u8>, bytes: u64) {
        let head = if self.structured {
            let mut h = proto::encode_chunk(
                self.extended,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_OFFSET_DATA,
                q.cookie,
                q.offset,
                8 + data.len() as u64,
            );
            h.extend_from_slice(&q.offset.to_be_bytes());
            h
        } else {
            proto::encode_simple_reply(q.cookie, 0).to_vec()
        };
        self.push(head, data, bytes);
    }
}

/// The writer thread: send queued replies in order; after a failure, only
/// give their budget back.
fn writer(mut w: Stream, rx: mpsc::Receiver<Out>, budget: Arc<Budget>) {
    let mut dead = false;
    let mut batch: Vec<Out> = Vec::new();
    while let Ok(first) = rx.recv() {
        // Replies that are already waiting go out in one system call.
        batch.push(first);
        let mut size = batch[0].head.len() + batch[0].data.len();
        while batch.len() < 64 && size < (1 << 20) {
            match rx.try_recv() {
                Ok(o) => {
                    size += o.head.len() + o.data.len();
                    batch.push(o);
                }
                Err(_) => break,
            }
        }
        if !dead {
            let bufs: Vec<&[u8]> = batch
                .iter()
                .flat_map(|o| [&o.head[..], &o.data[..]])
                .filter(|b| !b.is_empty())
                .collect();
            if write_all_vectored(&mut w, &bufs).is_err() {
                dead = true;
                // The reader sees the shutdown and ends the connection.
                w.shutdown();
            }
        }
        for o in batch.drain(..) {
            budget.give(o.bytes);
        }
    }
}

fn err_of(e: &crate::error::BlockError) -> (u32, String) {
    (proto::errno_to_nbd(e.errno()), e.to_string())
}

/// Serve one connection until it ends. Returns how it ended. With `tls`,
/// the client must start TLS before anything else.
pub fn serve(mut s: Stream, exports: &[Arc<Export>], tls: Option<&Arc<ServerConfig>>) -> End {
    if let Err(e) = s.set_timeouts(Some(HANDSHAKE_LIMIT)) {
        return End::Io(e);
    }
    let sess = match negotiate(&mut s, exports, tls) {
        Ok(Some(sess)) => sess,
        Ok(None) => return End::Clean,
        Err(e) => return e,
    };
    if let Err(e) = s.set_timeouts(None) {
        return End::Io(e);
    }
    let w = match s.try_clone() {
        Ok(w) => w,
        Err(e) => return End::Io(e),
    };
    // A client that does not read its replies for this long is dropped.
    if let Err(e) = w.set_write_timeout(Some(REPLY_TIMEOUT)) {
        return End::Io(e);
    }
    let budget = Arc::new(Budget::default());
    let (tx, rx) = mpsc::channel();
    let b = budget.clone();
    let wt = match std::thread::Builder::new()
        .name("nbd-writer".into())
        .spawn(move || writer(w, rx, b))
    {
        Ok(t) => t,
        Err(e) => return End::Io(e),
    };
    let rep = Arc::new(Replier {
        tx: Mutex::new(Some(tx)),
        structured: sess.structured,
        extended: sess.extended,
        budget,
    });
    // Pipelined request headers arrive together: read them in batches.
    let mut r = io::BufReader::with_capacity(64 << 10, s);
    let end = transmission(&mut r, &sess, &rep);
    let s = r.into_inner();
    // Every started request completes (and replies, if it still can)
    // before the connection is closed.
    rep.budget.drain();
    *lock(&rep.tx) = None;
    let _ = wt.join();
    // NBD_CMD_DISC: "the server MUST close down the TLS session".
    s.close_notify();
    s.shutdown();
    end
}

fn transmission(s: &mut io::BufReader<Stream>, sess: &Session, rep: &Arc<Replier>) -> End {
    let ex = &sess.export;
    let limits = ExportLimits {
        size: ex.blk.len(),
        flags: ex.flags(),
        structured: sess.structured,
        base_allocation: !sess.contexts.is_empty(),
        extended: sess.extended,
    };
    loop {
        // Extended headers: every request is 32 bytes, else 28.
        let mut hb = [0u8; proto::EXT_REQUEST_LEN];
        let n = if sess.extended {
            proto::EXT_REQUEST_LEN
        } else {
            proto::REQUEST_LEN
        };
        if let Err(e) = s.read_exact(&mut hb[..n]) {
            return End::Io(e);
        }
        let h = if sess.extended {
            RequestHeader::decode_ext(&hb)
        } else {
            let mut c = [0u8; proto::REQUEST_LEN];
            c.copy_from_slice(&hb[..proto::REQUEST_LEN]);
            RequestHeader::decode(&c)
        };
        let h = match h {
            Ok(h) => h,
            Err(e) => return End::Proto(e),
        };
        let q = Req {
            cookie: h.cookie,
            offset: h.offset,
        };
        let cmd = match proto::check_request(&h, &limits) {
            Ok(c) => c,
            Err(RequestError::Fatal(e)) => return End::Proto(e),
            Err(RequestError::Reply {
                error, skip, why, ..
            }) => {
                // Drop the payload in small pieces: nothing is allocated
                // for it.
                if let Err(e) = io::copy(&mut (&mut *s).take(skip as u64), &mut io::sink()) {
                    return End::Io(e);
                }
                rep.budget.take(0);
                rep.send(q, Err((error, why)), 0);
                continue;
            }
        };
        if let Err(e) = execute(s, sess, rep, q, cmd) {
            return e;
        }
    }
}

fn execute(
    s: &mut io::BufReader<Stream>,
    sess: &Session,
    rep: &Arc<Replier>,
    q: Req,
    cmd: Command,
) -> Result<(), End> {
    let ex = &sess.export;
    let blk = &ex.blk;
    match cmd {
        Command::Disc => Err(End::Clean),
        Command::Read { offset, len } => {
            rep.budget.take(len as u64);
            let r = rep.clone();
            blk.submit(
                IoRequest::read(offset, IoVecs::from_vec(vec![0; len as usize])),
                Box::new(move |req, res| {
                    let bytes = len as u64;
                    match res {
                        Ok(()) => {
                            let buf = req.iov.into_vec().unwrap_or_default();
                            r.send_read(q, buf, bytes);
                        }
                        Err(e) => r.send(q, Err(err_of(&e)), bytes),
                    }
                }),
            );
            Ok(())
        }
        Command::Cache { offset, len } => {
            // Advisory: prefetching the first MAX_PAYLOAD bytes is enough,
            // and a client's length never sizes a buffer.
            let len = len.min(proto::MAX_PAYLOAD as u64);
            rep.budget.take(len);
            let r = rep.clone();
            blk.submit(
                IoRequest::read(offset, IoVecs::from_vec(vec![0; len as usize])),
                Box::new(move |_req, res| match res {
                    Ok(()) => r.send(q, Ok(()), len),
                    Err(e) => r.send(q, Err(err_of(&e)), len),
                }),
            );
            Ok(())
        }
        Command::Write { offset, len, fua } => {
            rep.budget.take(len as u64);
            let mut buf = vec![0u8; len as usize];
            if let Err(e) = s.read_exact(&mut buf) {
                rep.budget.give(len as u64);
                return Err(End::Io(e));
            }
            let r = rep.clone();
            blk.submit(
                IoRequest::write(offset, IoVecs::from_vec(buf), fua),
                done(r, q, len as u64),
            );
            Ok(())
        }
        Command::Flush => {
            rep.budget.take(0);
            blk.submit(IoRequest::flush(), done(rep.clone(), q, 0));
            Ok(())
        }
        Command::Trim { offset, len, fua } => {
            rep.budget.take(0);
            let r = rep.clone();
            let b = blk.clone();
            blk.submit(
                IoRequest::discard(offset, len),
                Box::new(move |_req, res| match res {
                    Ok(()) if fua => b.submit(IoRequest::flush(), done(r, q, 0)),
                    res => finish(&r, q, res, 0),
                }),
            );
            Ok(())
        }
        Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
            fast_zero: _,
        } => {
            rep.budget.take(0);
            let mut req = IoRequest::write_zeroes(offset, len, !no_hole);
            req.fua = fua;
            blk.submit(req, done(rep.clone(), q, 0));
            Ok(())
        }
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => {
            rep.budget.take(0);
            let r = rep.clone();
            let ex = ex.clone();
            let contexts = sess.contexts.clone();
            crate::aio::pool().spawn(Box::new(move || {
                let rtype = if r.extended {
                    proto::REPLY_TYPE_BLOCK_STATUS_EXT
                } else {
                    proto::REPLY_TYPE_BLOCK_STATUS
                };
                // One chunk per selected context, the last one flagged done,
                // sent as one reply.
                let mut chunks = Vec::new();
                for c in contexts {
                    let p = match c {
                        Ctx::Allocation => block_status(&ex.blk, offset, len, req_one, r.extended),
                        Ctx::Depth => depth_status(&ex.blk, offset, len, req_one, r.extended),
                        Ctx::Bitmap(i) => Ok(bitmap_status(
                            &ex.bitmaps[i],
                            c.id(),
                            offset,
                            len,
                            req_one,
                            r.extended,
                        )),
                    };
                    match p {
                        Ok(p) => chunks.push(p),
                        Err(e) => return r.send(q, Err(err_of(&e)), 0),
                    }
                }
                let n = chunks.len();
                let mut head = Vec::new();
                let mut last = Vec::new();
                for (i, p) in chunks.into_iter().enumerate() {
                    let flags = if i + 1 == n {
                        proto::REPLY_FLAG_DONE
                    } else {
                        0
                    };
                    head.extend(proto::encode_chunk(
                        r.extended,
                        flags,
                        rtype,
                        q.cookie,
                        q.offset,
                        p.len() as u64,
                    ));
                    if i + 1 == n {
                        last = p;
                    } else {
                        head.extend(p);
                    }
                }
                r.push(head, last, 0);
            }));
            Ok(())
        }
    }
}

/// The payload of a block status chunk for metadata context `ctx`:
/// 32-bit descriptors, or with `extended` the 64-bit ones of
/// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` after a descriptor count. `next`
/// gives the length and flags of the run at an offset, at most the bytes
/// left.
fn extents(
    ctx: u32,
    offset: u64,
    end: u64,
    req_one: bool,
    extended: bool,
    mut next: impl FnMut(u64, u64) -> crate::error::BlockResult<(u64, u32)>,
) -> crate::error::BlockResult<Vec<u8>> {
    let mut v = ctx.to_be_bytes().to_vec();
    if extended {
        // The count, filled in below.
        v.extend_from_slice(&[0; 4]);
    }
    let mut pos = offset;
    let mut n = 0u32;
    while pos < end && (n as usize) < MAX_EXTENTS {
        let (l, flags) = next(pos, end - pos)?;
        let l = l.clamp(1, end - pos);
        if extended {
            v.extend_from_slice(&l.to_be_bytes());
            v.extend_from_slice(&(flags as u64).to_be_bytes());
        } else {
            // Without extended headers the request was at most 32 bits.
            v.extend_from_slice(&(l as u32).to_be_bytes());
            v.extend_from_slice(&flags.to_be_bytes());
        }
        pos += l;
        n += 1;
        if req_one {
            break;
        }
    }
    if extended {
        v[4..8].copy_from_slice(&n.to_be_bytes());
    }
    Ok(v)
}

/// The payload of a `qemu:dirty-bitmap:` block status chunk: runs of
/// dirty (1) and clean (0) granules.
fn bitmap_status(
    bm: &crate::bitmap::DirtyBitmap,
    ctx: u32,
    offset: u64,
    len: u64,
    req_one: bool,
    extended: bool,
) -> Vec<u8> {
    let g = bm.granularity();
    let end = (offset + len).min(bm.size().max(offset + 1));
    // Up to 4 GiB minus a granule per extent without extended headers.
    let cap = if extended {
        u64::MAX
    } else {
        u32::MAX as u64 - g
    };
    extents(ctx, offset, end, req_one, extended, |pos, left| {
        let dirty = bm.is_dirty(pos, 1);
        let mut next = (pos / g + 1) * g;
        while next < pos + left && next - pos < cap && bm.is_dirty(next, 1) == dirty {
            next += g;
        }
        Ok((next - pos, if dirty { STATE_DIRTY } else { 0 }))
    })
    .unwrap_or_default()
}

/// The payload of a `qemu:allocation-depth` block status chunk: each run's
/// layer in the backing chain (0: no layer has it, 1: the export's own
/// node, 2: its backing image, ...).
fn depth_status(
    blk: &BlockBackend,
    offset: u64,
    len: u64,
    req_one: bool,
    extended: bool,
) -> crate::error::BlockResult<Vec<u8>> {
    extents(
        CTX_DEPTH,
        offset,
        offset + len,
        req_one,
        extended,
        |pos, left| blk.allocation_depth(pos, left),
    )
}

/// The payload of a `base:allocation` block status chunk.
fn block_status(
    blk: &BlockBackend,
    offset: u64,
    len: u64,
    req_one: bool,
    extended: bool,
) -> crate::error::BlockResult<Vec<u8>> {
    extents(
        CTX_ALLOCATION,
        offset,
        offset + len,
        req_one,
        extended,
        |pos, left| {
            let e = blk.block_status(pos, left)?;
            let mut flags = 0;
            if !e.data {
                flags |= proto::STATE_HOLE;
            }
            if e.zero {
                flags |= proto::STATE_ZERO;
            }
            Ok((e.len, flags))
        },
    )
}

fn finish(r: &Replier, q: Req, res: crate::error::BlockResult<()>, bytes: u64) {
    match res {
        Ok(()) => r.send(q, Ok(()), bytes),
        Err(e) => r.send(q, Err(err_of(&e)), bytes),
    }
}

fn done(r: Arc<Replier>, q: Req, bytes: u64) -> crate::driver::Completion {
    Box::new(move |_req, res| finish(&r, q, res, bytes))
}

#[cfg(test)]
mod tests {
    use super::selects;

    #[test]
    fn context_queries() {
        let bm = "qemu:dirty-bitmap:b0";
        // SET takes exact names only.
        assert!(selects(true, bm, bm));
        assert!(!selects(true, "qemu:", bm));
        assert!(!selects(true, "qemu:dirty-bitmap:", bm));
        // LIST also takes the namespaces QEMU documents.
        for q in ["qemu:", "qemu:dirty-bitmap:", bm] {
            assert!(selects(false, q, bm), "{q}");
        }
        assert!(selects(false, "qemu:", "qemu:allocation-depth"));
        assert!(!selects(
            false,
            "qemu:dirty-bitmap:",
            "qemu:allocation-depth"
        ));
        assert!(!selects(false, "qemu:dirty-", bm));
        assert!(selects(false, "base:", "base:allocation"));
        assert!(!selects(false, "base:", bm));
    }
}
