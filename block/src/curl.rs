//! The read-only web protocols `http`, `https`, `ftp` and `ftps`, through
//! libcurl (the `curl` crate), with QEMU's curl driver's options.
//!
//! Specs: RFC 9110 §9.3.2 (HEAD), §14 (range requests: `Range`,
//! `Accept-Ranges`, `Content-Range`, 206 Partial Content); RFC 959 §4.1.3
//! (RETR) with RFC 3659 §4 (SIZE) and §5 (REST STREAM) for FTP; RFC 4217
//! for FTP over TLS (libcurl's `ftps://` is implicit TLS).
//!
//! The image is fetched piecewise, never whole: the length comes from one
//! HEAD (FTP: SIZE) at open, and each read asks for a byte range. Reads go
//! through a cache of a few readahead windows (`readahead=`, 256 KiB by
//! default as in QEMU) because guests and firmware read in small pieces
//! and a round trip per sector would be slow. A window covers the read and
//! at least `readahead` bytes from its start; reads larger than that are
//! fetched as they are (at most [`MAX_TRANSFER`] per transfer).
//!
//! Certificates are checked against the system's CAs, or the bundle that
//! `CURL_CA_BUNDLE` or `SSL_CERT_FILE` names (as for the curl tool), unless
//! `sslverify=off`.
//!
//! The server is not trusted: a transfer keeps at most the bytes it asked
//! for (a server that ignores `Range` and sends the whole file is cut off),
//! a short or misplaced answer is an error, and a failed transfer
//! (connection refused or reset, timeout, 5xx) is retried a few times with
//! growing pauses before the read fails with EIO.

use crate::driver::{BlockDriver, Completion, IoOp, IoRequest};
use crate::error::{BlockError, BlockResult};
use crate::graph::OpenCtx;
use crate::iov;
use curl::easy::Easy;
use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// QEMU's default readahead (`READ_AHEAD_DEFAULT`).
const READAHEAD_DEFAULT: u64 = 256 * 1024;
/// QEMU's default transfer timeout in seconds (`CURL_TIMEOUT_DEFAULT`).
const TIMEOUT_DEFAULT: u64 = 5;
/// QEMU's bound on `timeout=` (`CURL_TIMEOUT_MAX`).
const TIMEOUT_MAX: u64 = 100_000;
/// Windows kept (QEMU keeps `CURL_NUM_STATES` transfers' buffers).
const WINDOWS: usize = 8;
/// The largest range one transfer asks for, so that one read never makes
/// the node hold more than this (longer reads take several transfers).
pub const MAX_TRANSFER: u64 = 32 << 20;
/// The largest image length taken from a server (QEMU's
/// `BDRV_MAX_LENGTH` is of this order).
const MAX_LENGTH: u64 = 1 << 62;
/// Attempts of a failed transfer before the read fails.
const ATTEMPTS: u32 = 4;

/// One of the four protocols.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http,
    Https,
    Ftp,
    Ftps,
}

impl Proto {
    /// The driver (and URI scheme) name.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Http => "http",
            Proto::Https => "https",
            Proto::Ftp => "ftp",
            Proto::Ftps => "ftps",
        }
    }
    /// The protocol a file name's scheme names, if it is one of these.
    pub fn of_url(url: &str) -> Option<Proto> {
        let (scheme, _) = url.split_once("://")?;
        [Proto::Http, Proto::Https, Proto::Ftp, Proto::Ftps]
            .into_iter()
            .find(|p| scheme.eq_ignore_ascii_case(p.name()))
    }
    fn is_http(self) -> bool {
        matches!(self, Proto::Http | Proto::Https)
    }
    fn has_tls(self) -> bool {
        matches!(self, Proto::Https | Proto::Ftps)
    }
}

/// The node's options (QEMU's `BlockdevOptionsCurl*`), parsed.
#[derive(Clone, Debug)]
struct Config {
    proto: Proto,
    url: String,
    readahead: u64,
    timeout: u64,
    sslverify: bool,
    cookie: Option<String>,
    username: Option<String>,
    password: Option<String>,
    proxy_username: Option<String>,
    proxy_password: Option<String>,
}

fn secret_text(ctx: &OpenCtx<'_>, key: &str, id: &str) -> BlockResult<String> {
    let bytes = crate::objects::secret(id)
        .map_err(|e| BlockError::Open(format!("{}: {e}", ctx.opts.path(key))))?;
    String::from_utf8(bytes.to_vec()).map_err(|_| {
        BlockError::Open(format!(
            "{}: secret '{id}' is not UTF-8 text",
            ctx.opts.path(key)
        ))
    })
}

fn parse_options(ctx: &mut OpenCtx<'_>, proto: Proto) -> BlockResult<Config> {
    let url = ctx.opts.require_str("url")?;
    if Proto::of_url(&url) != Some(proto) {
        return Err(BlockError::Open(format!(
            "{}: '{url}' is not a {}:// URL",
            ctx.opts.path("url"),
            proto.name()
        )));
    }
    let readahead = ctx
        .opts
        .take_size("readahead", 1)?
        .unwrap_or(READAHEAD_DEFAULT);
    if readahead == 0 || readahead % 512 != 0 || readahead > MAX_TRANSFER {
        return Err(BlockError::Open(format!(
            "{}: readahead {readahead} must be a non-zero multiple of 512 up to {MAX_TRANSFER}",
            ctx.opts.path("readahead")
        )));
    }
    let timeout = ctx.opts.take_u64("timeout")?.unwrap_or(TIMEOUT_DEFAULT);
    if timeout == 0 || timeout > TIMEOUT_MAX {
        return Err(BlockError::Open(format!(
            "{}: timeout {timeout} must be between 1 and {TIMEOUT_MAX} seconds",
            ctx.opts.path("timeout")
        )));
    }
    // `sslverify` exists only on the TLS protocols, `cookie` only on
    // HTTP(S): elsewhere they stay in the options and are refused as
    // unknown, as QEMU's per-protocol schemas do.
    let sslverify = if proto.has_tls() {
        ctx.opts.take_bool("sslverify")?.unwrap_or(true)
    } else {
        true
    };
    let mut cookie = None;
    if proto.is_http() {
        cookie = ctx.opts.take_str("cookie")?;
        if let Some(id) = ctx.opts.take_str("cookie-secret")? {
            if cookie.is_some() {
                return Err(BlockError::Open(format!(
                    "{}: cookie and cookie-secret are mutually exclusive",
                    ctx.opts.path("cookie-secret")
                )));
            }
            cookie = Some(secret_text(ctx, "cookie-secret", &id)?);
        }
    }
    let username = ctx.opts.take_str("username")?;
    let password = match ctx.opts.take_str("password-secret")? {
        Some(id) => Some(secret_text(ctx, "password-secret", &id)?),
        None => None,
    };
    let proxy_username = ctx.opts.take_str("proxy-username")?;
    let proxy_password = match ctx.opts.take_str("proxy-password-secret")? {
        Some(id) => Some(secret_text(ctx, "proxy-password-secret", &id)?),
        None => None,
    };
    Ok(Config {
        proto,
        url,
        readahead,
        timeout,
        sslverify,
        cookie,
        username,
        password,
        proxy_username,
        proxy_password,
    })
}

/// A fetched range of the image.
struct Window {
    start: u64,
    data: Vec<u8>,
    last_use: u64,
}

impl Window {
    fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }
}

#[derive(Default)]
struct Cache {
    windows: Vec<Window>,
    tick: u64,
}

impl Cache {
    /// Scatter `[pos, end)` into `iov` if one window holds all of it.
    fn scatter_whole(&mut self, pos: u64, end: u64, iov: &mut [IoSliceMut<'_>]) -> bool {
        self.tick += 1;
        let tick = self.tick;
        let Some(w) = self
            .windows
            .iter_mut()
            .find(|w| w.start <= pos && end <= w.end())
        else {
            return false;
        };
        w.last_use = tick;
        let at = (pos - w.start) as usize;
        iov::scatter(&w.data[at..at + (end - pos) as usize], iov);
        true
    }

    /// Copy what a window holds of `[pos, end)` into `out`; the bytes
    /// copied (0 on a miss).
    fn copy_from(&mut self, pos: u64, end: u64, out: &mut Vec<u8>) -> u64 {
        self.tick += 1;
        let tick = self.tick;
        let Some(w) = self
            .windows
            .iter_mut()
            .find(|w| w.start <= pos && pos < w.end())
        else {
            return 0;
        };
        w.last_use = tick;
        let n = end.min(w.end()) - pos;
        let at = (pos - w.start) as usize;
        out.extend_from_slice(&w.data[at..at + n as usize]);
        n
    }

    fn insert(&mut self, start: u64, data: Vec<u8>) {
        self.tick += 1;
        if self.windows.len() >= WINDOWS {
            if let Some(i) = (0..self.windows.len()).min_by_key(|&i| self.windows[i].last_use) {
                self.windows.swap_remove(i);
            }
        }
        self.windows.push(Window {
            start,
            data,
            last_use: self.tick,
        });
    }
}

/// Why a transfer failed, and whether trying again may help.
struct TransferError {
    msg: String,
    transient: bool,
}

/// An `http`, `https`, `ftp` or `ftps` node.
pub struct CurlNode {
    cfg: Config,
    len: u64,
    /// Idle handles: each keeps its connection open between transfers.
    handles: Mutex<Vec<Easy>>,
    cache: Mutex<Cache>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn curl_err(e: curl::Error) -> TransferError {
    // Failures of the network or the server's side may pass; a refused
    // certificate, a bad URL or a login failure will not.
    let transient = e.is_couldnt_connect()
        || e.is_operation_timedout()
        || e.is_recv_error()
        || e.is_send_error()
        || e.is_got_nothing()
        || e.is_partial_file()
        || e.is_read_error();
    let mut msg = e.description().to_string();
    if let Some(extra) = e.extra_description() {
        msg = format!("{msg}: {extra}");
    }
    TransferError { msg, transient }
}

impl CurlNode {
    /// Open from `-blockdev driver=http|https|ftp|ftps` options.
    pub fn open(ctx: &mut OpenCtx<'_>, proto: Proto) -> BlockResult<Arc<dyn BlockDriver>> {
        let cfg = parse_options(ctx, proto)?;
        if !ctx.common.read_only {
            if ctx.common.auto_read_only {
                ctx.common.read_only = true;
            } else {
                return Err(BlockError::Open(format!(
                    "{}: the {} driver does not support writes (use read-only=on)",
                    cfg.url,
                    proto.name()
                )));
            }
        }
        ctx.describe("url", cfg.url.clone());
        let mut node = CurlNode {
            cfg,
            len: 0,
            handles: Mutex::new(Vec::new()),
            cache: Mutex::new(Cache::default()),
        };
        node.len = node
            .with_retries(|n| n.head())
            .map_err(|e| BlockError::Open(format!("{}: {}", node.cfg.url, e.msg)))?;
        Ok(Arc::new(node))
    }

    /// A handle set up with the node's URL and options.
    fn new_handle(&self) -> Result<Easy, curl::Error> {
        let c = &self.cfg;
        let mut h = Easy::new();
        h.url(&c.url)?;
        h.connect_timeout(Duration::from_secs(c.timeout))?;
        h.timeout(Duration::from_secs(c.timeout))?;
        // Redirects are followed, as QEMU does (CURLOPT_FOLLOWLOCATION);
        // libcurl follows them only to http, https, ftp and ftps.
        h.follow_location(true)?;
        h.max_redirections(8)?;
        h.signal(false)?;
        if c.proto.has_tls() {
            h.ssl_verify_peer(c.sslverify)?;
            h.ssl_verify_host(c.sslverify)?;
            // A private CA, as the curl tool takes it (QEMU's curl
            // driver has no option for one; libcurl alone reads no
            // environment).
            if let Some(ca) = ca_bundle_from_env() {
                h.cainfo(ca)?;
            }
        }
        if let Some(v) = &c.cookie {
            h.cookie(v)?;
        }
        if let Some(v) = &c.username {
            h.username(v)?;
        }
        if let Some(v) = &c.password {
            h.password(v)?;
        }
        if let Some(v) = &c.proxy_username {
            h.proxy_username(v)?;
        }
        if let Some(v) = &c.proxy_password {
            h.proxy_password(v)?;
        }
        Ok(h)
    }

    fn take_handle(&self) -> Result<Easy, TransferError> {
        if let Some(h) = lock(&self.handles).pop() {
            return Ok(h);
        }
        self.new_handle().map_err(curl_err)
    }

    fn give_back(&self, h: Easy) {
        let mut idle = lock(&self.handles);
        if idle.len() < WINDOWS {
            idle.push(h);
        }
    }

    /// Run `f` until it succeeds, fails for good, or has been tried
    /// [`ATTEMPTS`] times, pausing longer after each failure.
    fn with_retries<T>(
        &self,
        mut f: impl FnMut(&Self) -> Result<T, TransferError>,
    ) -> Result<T, TransferError> {
        let mut pause = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            match f(self) {
                Ok(v) => return Ok(v),
                Err(e) if e.transient && attempt < ATTEMPTS => {
                    log::warn!(
                        "{}: {} (attempt {attempt} of {ATTEMPTS})",
                        self.cfg.url,
                        e.msg
                    );
                    std::thread::sleep(pause);
                    pause *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The image's length: HEAD for HTTP(S), SIZE for FTP.
    fn head(&self) -> Result<u64, TransferError> {
        let mut h = self.take_handle()?;
        let mut ranges = false;
        {
            h.nobody(true).map_err(curl_err)?;
            let mut t = h.transfer();
            t.header_function(|line| {
                if header(line, "accept-ranges").is_some_and(|v| accepts_bytes(&v)) {
                    ranges = true;
                }
                true
            })
            .map_err(curl_err)?;
            t.perform().map_err(curl_err)?;
        }
        h.nobody(false).map_err(curl_err)?;
        let code = h.response_code().map_err(curl_err)?;
        let len = h.content_length_download().map_err(curl_err)?;
        if self.cfg.proto.is_http() {
            check_status(code)?;
            if !ranges {
                return Err(TransferError {
                    msg: "the server does not support byte ranges (no 'Accept-Ranges: bytes')"
                        .into(),
                    transient: false,
                });
            }
        }
        // -1 is "unknown"; a length no image can have is refused too, so
        // that offsets computed from it cannot overflow.
        if len.is_nan() || len < 0.0 {
            return Err(TransferError {
                msg: "the server did not report the file size".into(),
                transient: false,
            });
        }
        if len > MAX_LENGTH as f64 {
            return Err(TransferError {
                msg: format!("the server reported an impossible file size ({len})"),
                transient: false,
            });
        }
        self.give_back(h);
        Ok(len as u64)
    }

    /// Fetch `[start, end)` (at most [`MAX_TRANSFER`] bytes).
    fn fetch(&self, start: u64, end: u64) -> Result<Vec<u8>, TransferError> {
        let want = (end - start) as usize;
        let mut h = self.take_handle()?;
        h.range(&format!("{start}-{}", end - 1)).map_err(curl_err)?;
        let mut data = Vec::with_capacity(want);
        let mut content_range = None;
        let done = {
            let mut t = h.transfer();
            t.header_function(|line| {
                if let Some(v) = header(line, "content-range") {
                    content_range = Some(v);
                }
                true
            })
            .map_err(curl_err)?;
            t.write_function(|chunk| {
                // Keep what was asked for and no more; a longer answer
                // (a server that ignored the range) ends the transfer.
                let room = want - data.len();
                if chunk.len() > room {
                    data.extend_from_slice(&chunk[..room]);
                    return Ok(0);
                }
                data.extend_from_slice(chunk);
                Ok(chunk.len())
            })
            .map_err(curl_err)?;
            t.perform()
        };
        let overflow = matches!(&done, Err(e) if e.is_write_error());
        if let Err(e) = done {
            if !overflow {
                return Err(curl_err(e));
            }
        }
        if self.cfg.proto.is_http() {
            let code = h.response_code().map_err(curl_err)?;
            check_status(code)?;
            // 200 is the whole file: good only when that is what was asked.
            let whole = code == 200 && start == 0 && end == self.len;
            if code != 206 && !whole {
                return Err(TransferError {
                    msg: format!("the server ignored the byte range (HTTP status {code})"),
                    transient: false,
                });
            }
            if code == 206 && !content_range_starts_at(content_range.as_deref(), start) {
                return Err(TransferError {
                    msg: format!(
                        "the server answered a range from {start} with 'Content-Range: {}'",
                        content_range.as_deref().unwrap_or("")
                    ),
                    transient: false,
                });
            }
        } else if overflow {
            // FTP has no range end: libcurl stops after the bytes asked
            // for, so an overflow here is the server's doing.
            return Err(TransferError {
                msg: "the server sent more than the range asked for".into(),
                transient: false,
            });
        }
        self.give_back(h);
        if data.len() != want {
            return Err(TransferError {
                msg: format!(
                    "short read at offset {start}: {} of {want} bytes",
                    data.len()
                ),
                transient: true,
            });
        }
        Ok(data)
    }

    /// Read `[offset, offset + len)` into one buffer, through the cache.
    fn read_range(&self, offset: u64, len: u64) -> BlockResult<Vec<u8>> {
        let end = offset + len;
        let mut out = Vec::with_capacity(len as usize);
        let mut pos = offset;
        while pos < end {
            let n = lock(&self.cache).copy_from(pos, end, &mut out);
            if n > 0 {
                pos += n;
                continue;
            }
            let fetch_end = end
                .max(pos + self.cfg.readahead)
                .min(self.len)
                .min(pos + MAX_TRANSFER);
            let data = self
                .with_retries(|n| n.fetch(pos, fetch_end))
                .map_err(|e| BlockError::io(libc::EIO, format!("{}: {}", self.cfg.url, e.msg)))?;
            let take = (end.min(fetch_end) - pos) as usize;
            out.extend_from_slice(&data[..take]);
            pos += take as u64;
            // Only windows of readahead size are kept: one large read
            // must not make the cache hold eight large buffers.
            if data.len() as u64 <= self.cfg.readahead.max(1 << 20) {
                lock(&self.cache).insert(fetch_end - data.len() as u64, data);
            }
        }
        Ok(out)
    }
}

/// The CA bundle named by `CURL_CA_BUNDLE` or `SSL_CERT_FILE`.
fn ca_bundle_from_env() -> Option<std::path::PathBuf> {
    ["CURL_CA_BUNDLE", "SSL_CERT_FILE"]
        .iter()
        .filter_map(std::env::var_os)
        .find(|v| !v.is_empty())
        .map(Into::into)
}

/// An HTTP status the transfer cannot use: 4xx is final, 5xx may pass.
fn check_status(code: u32) -> Result<(), TransferError> {
    if code < 400 {
        return Ok(());
    }
    Err(TransferError {
        msg: format!("HTTP status {code}"),
        transient: code >= 500,
    })
}

/// The value of header `name` if `line` is that header (names are
/// case-insensitive; RFC 9110 §5.1), trimmed, bounded in length.
fn header(line: &[u8], name: &str) -> Option<String> {
    let colon = line.iter().position(|&b| b == b':')?;
    let (k, v) = (&line[..colon], &line[colon + 1..]);
    if !k.trim_ascii().eq_ignore_ascii_case(name.as_bytes()) {
        return None;
    }
    // libcurl hands over one header line at a time (at most its
    // CURL_MAX_HTTP_HEADER, 100 KiB); keep only what a value needs.
    let v = &v[..v.len().min(256)];
    Some(String::from_utf8_lossy(v.trim_ascii()).into_owned())
}

/// Whether an `Accept-Ranges` value lists `bytes`.
fn accepts_bytes(value: &str) -> bool {
    value
        .split(',')
        .any(|u| u.trim().eq_ignore_ascii_case("bytes"))
}

/// The header parsing of a transfer, for the `web_headers` fuzz target:
/// each line of `data` as a header line, checked against a range start.
pub fn fuzz_headers(data: &[u8]) {
    let start = data.first().copied().unwrap_or(0) as u64 * 512;
    for line in data.split(|&b| b == b'\n') {
        if let Some(v) = header(line, "accept-ranges") {
            let _ = accepts_bytes(&v);
        }
        if let Some(v) = header(line, "content-range") {
            let _ = content_range_starts_at(Some(&v), start);
        }
    }
}

/// Whether `Content-Range: bytes START-END/TOTAL` starts at `start`.
fn content_range_starts_at(header: Option<&str>, start: u64) -> bool {
    let Some(h) = header else {
        return false;
    };
    let Some(rest) = h.strip_prefix("bytes ") else {
        return false;
    };
    rest.split('-')
        .next()
        .and_then(|s| s.trim().parse::<u64>().ok())
        == Some(start)
}

impl BlockDriver for CurlNode {
    /// A read-only protocol: nothing to hand over.
    fn migration_blocker(&self, _node: &str) -> Option<String> {
        None
    }
    fn driver_name(&self) -> &'static str {
        self.cfg.proto.name()
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        let len = iov::total_len_mut(iov) as u64;
        let in_file = self.len.saturating_sub(offset).min(len);
        // Past the end reads as zeroes (the block layer rounds requests
        // up to sectors; an ISO need not be a multiple of 512).
        iov::zero_fill(iov);
        if in_file > 0 {
            let data = self.read_range(offset, in_file)?;
            iov::scatter(&data, iov);
        }
        Ok(())
    }
    fn write_vectored(&self, _offset: u64, _iov: &[IoSlice<'_>], _fua: bool) -> BlockResult<()> {
        Err(BlockError::ReadOnly(self.cfg.url.clone()))
    }
    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    fn filename(&self) -> Option<String> {
        Some(self.cfg.url.clone())
    }
    /// A read that one readahead window holds is served at once, copied
    /// once, without a trip through the worker pool; the rest go there
    /// (transfers block).
    fn submit(self: Arc<Self>, mut req: IoRequest, done: Completion) {
        if req.op == IoOp::Read {
            let end = req.offset.saturating_add(req.iov.len() as u64);
            if end <= self.len && !req.iov.is_empty() {
                let hit = {
                    let mut slices = req.iov.slices_mut();
                    lock(&self.cache).scatter_whole(req.offset, end, &mut slices)
                };
                if hit {
                    return done(req, Ok(()));
                }
            }
        }
        crate::driver::run_on_pool(self, req, done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_name_their_protocol() {
        assert_eq!(Proto::of_url("https://h/x.iso"), Some(Proto::Https));
        assert_eq!(Proto::of_url("HTTP://h/x"), Some(Proto::Http));
        assert_eq!(Proto::of_url("ftps://h/x"), Some(Proto::Ftps));
        assert_eq!(Proto::of_url("nbd://h/x"), None);
        assert_eq!(Proto::of_url("/tmp/http://x"), None);
    }

    #[test]
    fn headers_are_found_by_name_whatever_the_case() {
        assert_eq!(
            header(b"Content-Range: bytes 0-1/2\r\n", "content-range").as_deref(),
            Some("bytes 0-1/2")
        );
        assert_eq!(
            header(b"ACCEPT-RANGES:bytes", "accept-ranges").as_deref(),
            Some("bytes")
        );
        assert_eq!(header(b"X-Accept-Ranges: bytes", "accept-ranges"), None);
        assert_eq!(header(b"no colon", "accept-ranges"), None);
        assert!(accepts_bytes("none, Bytes"));
        assert!(!accepts_bytes("none"));
    }

    #[test]
    fn content_range_must_start_where_asked() {
        assert!(content_range_starts_at(Some("bytes 512-1023/4096"), 512));
        assert!(!content_range_starts_at(Some("bytes 0-1023/4096"), 512));
        assert!(!content_range_starts_at(Some("items 512-1023/4096"), 512));
        assert!(!content_range_starts_at(None, 0));
    }

    #[test]
    fn whole_hits_scatter_across_buffers() {
        let mut c = Cache::default();
        c.insert(1000, (0..=255u8).cycle().take(4096).collect());
        let (mut a, mut b) = (vec![0u8; 10], vec![0u8; 20]);
        let mut iov = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        assert!(c.scatter_whole(1005, 1035, &mut iov));
        assert_eq!(a, (5..15u8).collect::<Vec<_>>());
        assert_eq!(b, (15..35u8).collect::<Vec<_>>());
        let mut iov = [IoSliceMut::new(&mut a)];
        assert!(!c.scatter_whole(5090, 5100, &mut iov), "past the window");
    }

    #[test]
    fn the_cache_serves_windows_and_evicts_the_oldest() {
        let mut c = Cache::default();
        for i in 0..WINDOWS as u64 + 1 {
            c.insert(i * 100, vec![i as u8; 100]);
        }
        assert_eq!(c.windows.len(), WINDOWS);
        let mut out = Vec::new();
        assert_eq!(c.copy_from(0, 50, &mut out), 0, "window 0 was evicted");
        assert_eq!(c.copy_from(150, 400, &mut out), 50);
        assert_eq!(out, vec![1u8; 50]);
    }
}
