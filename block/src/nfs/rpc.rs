//! The wire side of the `nfs` driver: XDR (RFC 4506), ONC RPC version 2
//! over TCP with record marking and AUTH_SYS credentials (RFC 5531), the
//! portmapper's GETPORT (RFC 1833, version 2), MOUNT version 3's MNT and
//! UMNT and the NFSv3 procedures the driver uses (RFC 1813: GETATTR,
//! SETATTR, LOOKUP, READ, WRITE, CREATE, FSINFO, COMMIT).
//!
//! Written here rather than taken from a crate because the server is
//! hostile input: a reply is at most [`MAX_REPLY`] bytes (the record
//! marks are checked before anything is read into memory), and decoding
//! borrows from that buffer, so a length field can never make us allocate
//! more than what the server actually sent.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The largest READ or WRITE payload the driver asks for.
pub const MAX_IO: u32 = 1 << 20;
/// The largest reply accepted: a full READ plus its headers.
pub const MAX_REPLY: usize = MAX_IO as usize + 4096;
/// Portmapper program, version, and the port it listens on.
pub const PMAP_PROG: u32 = 100_000;
const PMAP_VERS: u32 = 2;
/// The portmapper's well-known port.
pub const PMAP_PORT: u16 = 111;
/// MOUNT program and version 3.
pub const MOUNT_PROG: u32 = 100_005;
const MOUNT_VERS: u32 = 3;
/// NFS program and version 3.
pub const NFS_PROG: u32 = 100_003;
const NFS_VERS: u32 = 3;
/// The default NFS port, where the portmapper does not say otherwise.
pub const NFS_PORT: u16 = 2049;

/// The largest file handle NFSv3 allows (RFC 1813 `NFS3_FHSIZE`).
const FHSIZE: usize = 64;

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpcError {
    /// The connection failed or broke (errno, what).
    Io(i32, String),
    /// The server broke the protocol.
    Proto(String),
    /// The server refused the call at the RPC level.
    Rejected(String),
    /// The procedure ran and returned an NFS or MOUNT error status.
    Status(u32),
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RpcError::Io(_, m) | RpcError::Proto(m) | RpcError::Rejected(m) => f.write_str(m),
            RpcError::Status(s) => match status_name(*s) {
                "unknown error" => write!(f, "error status {s}"),
                n => f.write_str(n),
            },
        }
    }
}

/// A decode failure: the reply is shorter than its fields say.
fn short() -> RpcError {
    RpcError::Proto("truncated or malformed reply".into())
}

/// NFSv3 / MOUNTv3 status names (RFC 1813 `nfsstat3`, `mountstat3`).
pub fn status_name(s: u32) -> &'static str {
    match s {
        1 => "NFS3ERR_PERM",
        2 => "NFS3ERR_NOENT",
        5 => "NFS3ERR_IO",
        6 => "NFS3ERR_NXIO",
        13 => "NFS3ERR_ACCES",
        17 => "NFS3ERR_EXIST",
        18 => "NFS3ERR_XDEV",
        19 => "NFS3ERR_NODEV",
        20 => "NFS3ERR_NOTDIR",
        21 => "NFS3ERR_ISDIR",
        22 => "NFS3ERR_INVAL",
        27 => "NFS3ERR_FBIG",
        28 => "NFS3ERR_NOSPC",
        30 => "NFS3ERR_ROFS",
        31 => "NFS3ERR_MLINK",
        63 => "NFS3ERR_NAMETOOLONG",
        66 => "NFS3ERR_NOTEMPTY",
        69 => "NFS3ERR_DQUOT",
        70 => "NFS3ERR_STALE",
        71 => "NFS3ERR_REMOTE",
        10001 => "NFS3ERR_BADHANDLE",
        10002 => "NFS3ERR_NOT_SYNC",
        10003 => "NFS3ERR_BAD_COOKIE",
        10004 => "NFS3ERR_NOTSUPP",
        10005 => "NFS3ERR_TOOSMALL",
        10006 => "NFS3ERR_SERVERFAULT",
        10007 => "NFS3ERR_BADTYPE",
        10008 => "NFS3ERR_JUKEBOX",
        _ => "unknown error",
    }
}

/// The errno of an NFSv3 status (the numbers are the Unix ones where
/// they exist).
pub fn status_errno(s: u32) -> i32 {
    match s {
        1 => libc::EPERM,
        2 => libc::ENOENT,
        6 => libc::ENXIO,
        13 => libc::EACCES,
        17 => libc::EEXIST,
        20 => libc::ENOTDIR,
        21 => libc::EISDIR,
        22 => libc::EINVAL,
        27 => libc::EFBIG,
        28 => libc::ENOSPC,
        30 => libc::EROFS,
        69 => libc::EDQUOT,
        70 => libc::ESTALE,
        10004 => libc::ENOTSUP,
        _ => libc::EIO,
    }
}

/// XDR encoding into a growing buffer.
#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Variable-length opaque (or string): length, bytes, padding.
    fn opaque(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        let pad = (4 - b.len() % 4) % 4;
        self.0.extend_from_slice(&[0; 3][..pad]);
        self
    }
}

/// XDR decoding of a reply held in memory: every read is checked against
/// what is left, and variable-length data is borrowed, never copied.
pub struct Dec<'a> {
    buf: &'a [u8],
}

impl<'a> Dec<'a> {
    /// Decode `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Dec { buf }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], RpcError> {
        if n > self.buf.len() {
            return Err(short());
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, RpcError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, RpcError> {
        Ok((u64::from(self.u32()?) << 32) | u64::from(self.u32()?))
    }
    fn bool(&mut self) -> Result<bool, RpcError> {
        match self.u32()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(RpcError::Proto(format!("bad boolean {v} in reply"))),
        }
    }
    /// Variable-length opaque of at most `max` bytes.
    fn opaque(&mut self, max: usize) -> Result<&'a [u8], RpcError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(RpcError::Proto(format!(
                "opaque field of {n} bytes (at most {max})"
            )));
        }
        let b = self.take(n)?;
        self.take((4 - n % 4) % 4)?;
        Ok(b)
    }
}

/// The attributes the driver uses (`fattr3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attr {
    /// `ftype3` (1 = regular file, 2 = directory).
    pub ftype: u32,
    /// Size in bytes.
    pub size: u64,
    /// Bytes the file occupies on the server.
    pub used: u64,
}

fn fattr3(d: &mut Dec) -> Result<Attr, RpcError> {
    let ftype = d.u32()?;
    d.take(4 * 4)?; // mode, nlink, uid, gid
    let size = d.u64()?;
    let used = d.u64()?;
    d.take(8 + 8 + 8 + 3 * 8)?; // rdev, fsid, fileid, atime, mtime, ctime
    Ok(Attr { ftype, size, used })
}

fn post_op_attr(d: &mut Dec) -> Result<Option<Attr>, RpcError> {
    if d.bool()? {
        Ok(Some(fattr3(d)?))
    } else {
        Ok(None)
    }
}

fn wcc_data(d: &mut Dec) -> Result<Option<Attr>, RpcError> {
    if d.bool()? {
        d.take(8 + 8 + 8)?; // size, mtime, ctime
    }
    post_op_attr(d)
}

fn fh(d: &mut Dec) -> Result<Vec<u8>, RpcError> {
    let b = d.opaque(FHSIZE)?;
    if b.is_empty() {
        return Err(RpcError::Proto("empty file handle".into()));
    }
    Ok(b.to_vec())
}

/// The status word of an NFS reply; an error status ends the decoding.
fn status(d: &mut Dec) -> Result<(), RpcError> {
    match d.u32()? {
        0 => Ok(()),
        s => Err(RpcError::Status(s)),
    }
}

/// Decode an RPC reply message to `xid`: the results of an accepted,
/// successful call.
pub fn parse_reply(buf: &[u8], xid: u32) -> Result<Dec<'_>, RpcError> {
    let mut d = Dec::new(buf);
    let got = d.u32()?;
    if got != xid {
        return Err(RpcError::Proto(format!(
            "reply to call {got:#x}, expected {xid:#x}"
        )));
    }
    if d.u32()? != 1 {
        return Err(RpcError::Proto("not a reply".into()));
    }
    match d.u32()? {
        0 => {
            // Accepted: the server's verifier, then accept_stat.
            d.u32()?;
            d.opaque(400)?;
            match d.u32()? {
                0 => Ok(d),
                1 => Err(RpcError::Rejected("program unavailable".into())),
                2 => {
                    let (lo, hi) = (d.u32()?, d.u32()?);
                    Err(RpcError::Rejected(format!(
                        "program version mismatch (server has {lo}..{hi})"
                    )))
                }
                3 => Err(RpcError::Rejected("procedure unavailable".into())),
                4 => Err(RpcError::Rejected(
                    "the server could not decode the arguments".into(),
                )),
                5 => Err(RpcError::Rejected("system error on the server".into())),
                s => Err(RpcError::Proto(format!("bad accept status {s}"))),
            }
        }
        1 => match d.u32()? {
            0 => Err(RpcError::Rejected("RPC version mismatch".into())),
            1 => {
                let why = match d.u32()? {
                    1 => "bad credential",
                    2 => "rejected credential (AUTH_SYS refused)",
                    3 => "bad verifier",
                    4 => "rejected verifier",
                    5 => "too weak (the export needs another security flavour)",
                    _ => "authentication error",
                };
                Err(RpcError::Rejected(why.into()))
            }
            s => Err(RpcError::Proto(format!("bad reject status {s}"))),
        },
        s => Err(RpcError::Proto(format!("bad reply status {s}"))),
    }
}

/// The credential of calls: AUTH_SYS with these ids (RFC 5531 appendix A).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cred {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// One TCP connection speaking ONC RPC; calls take turns.
pub struct Conn {
    s: TcpStream,
    xid: u32,
    cred: Vec<u8>,
}

fn io_err(e: std::io::Error, what: &str) -> RpcError {
    RpcError::Io(
        e.raw_os_error().unwrap_or(libc::EIO),
        format!("{what}: {e}"),
    )
}

impl Conn {
    /// Connect to `addr`; `timeout` bounds the connect and, while
    /// `Some`, every read and write.
    pub fn connect(addr: SocketAddr, cred: Cred, timeout: Duration) -> Result<Conn, RpcError> {
        let s = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| io_err(e, &format!("Failed to connect to {addr}")))?;
        let _ = s.set_nodelay(true);
        let mut c = Conn {
            s,
            // Distinct xids across connections help reading server logs.
            xid: std::process::id().rotate_left(16) ^ (addr.port() as u32),
            cred: Vec::new(),
        };
        c.set_timeout(Some(timeout))?;
        let mut e = Enc::default();
        e.u32(0) // stamp
            .opaque(b"strata")
            .u32(cred.uid)
            .u32(cred.gid)
            .u32(0); // no supplementary groups
        c.cred = e.0;
        Ok(c)
    }

    /// Bound (or not) how long a call may wait.
    pub fn set_timeout(&mut self, t: Option<Duration>) -> Result<(), RpcError> {
        self.s
            .set_read_timeout(t)
            .and_then(|_| self.s.set_write_timeout(t))
            .map_err(|e| io_err(e, "socket"))
    }

    /// Call `proc` of `prog`/`vers` with encoded `args`; the reply's
    /// result bytes go to `f`, which decodes them.
    pub fn call<T>(
        &mut self,
        prog: u32,
        vers: u32,
        proc_: u32,
        args: &[&[u8]],
        f: impl FnOnce(&mut Dec) -> Result<T, RpcError>,
    ) -> Result<T, RpcError> {
        self.xid = self.xid.wrapping_add(1);
        let xid = self.xid;
        let mut h = Enc::default();
        h.u32(0) // record mark, filled in below
            .u32(xid)
            .u32(0) // CALL
            .u32(2) // RPC version
            .u32(prog)
            .u32(vers)
            .u32(proc_)
            .u32(1) // AUTH_SYS
            .opaque(&self.cred)
            .u32(0) // AUTH_NONE verifier
            .u32(0);
        let len = h.0.len() - 4 + args.iter().map(|a| a.len()).sum::<usize>();
        h.0[..4].copy_from_slice(&(0x8000_0000 | len as u32).to_be_bytes());
        let mut bufs: Vec<std::io::IoSlice> = vec![std::io::IoSlice::new(&h.0)];
        bufs.extend(args.iter().map(|a| std::io::IoSlice::new(a)));
        write_all_vectored(&mut self.s, &mut bufs).map_err(|e| io_err(e, "send"))?;
        let reply = self.recv()?;
        let mut d = parse_reply(&reply, xid)?;
        f(&mut d)
    }

    /// One reply record: fragments until the last, at most [`MAX_REPLY`]
    /// bytes in all.
    fn recv(&mut self) -> Result<Vec<u8>, RpcError> {
        let mut out = Vec::new();
        // A bounded count too: empty fragments would otherwise never end.
        for _ in 0..1024 {
            let mut m = [0u8; 4];
            self.s
                .read_exact(&mut m)
                .map_err(|e| io_err(e, "receive"))?;
            let mark = u32::from_be_bytes(m);
            let n = (mark & 0x7fff_ffff) as usize;
            if out.len() + n > MAX_REPLY {
                return Err(RpcError::Proto(format!(
                    "reply of more than {MAX_REPLY} bytes"
                )));
            }
            let at = out.len();
            out.resize(at + n, 0);
            self.s
                .read_exact(&mut out[at..])
                .map_err(|e| io_err(e, "receive"))?;
            if mark & 0x8000_0000 != 0 {
                return Ok(out);
            }
        }
        Err(RpcError::Proto("reply in more than 1024 fragments".into()))
    }
}

fn write_all_vectored(
    s: &mut TcpStream,
    mut bufs: &mut [std::io::IoSlice<'_>],
) -> std::io::Result<()> {
    std::io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match s.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// PMAPPROC_GETPORT for `prog`/`vers` over TCP: its port (0: not
/// registered).
pub fn pmap_getport(c: &mut Conn, prog: u32, vers: u32) -> Result<u16, RpcError> {
    let mut a = Enc::default();
    a.u32(prog).u32(vers).u32(6).u32(0);
    c.call(PMAP_PROG, PMAP_VERS, 3, &[&a.0], |d| {
        let p = d.u32()?;
        u16::try_from(p).map_err(|_| RpcError::Proto(format!("port {p} out of range")))
    })
}

/// MOUNTPROC3_MNT: the root file handle of the export `path`.
pub fn mount(c: &mut Conn, path: &str) -> Result<Vec<u8>, RpcError> {
    let mut a = Enc::default();
    a.opaque(path.as_bytes());
    c.call(MOUNT_PROG, MOUNT_VERS, 1, &[&a.0], parse_mnt)
}

/// The results of MNT (`mountres3`); the flavour list is not needed.
pub fn parse_mnt(d: &mut Dec) -> Result<Vec<u8>, RpcError> {
    match d.u32()? {
        0 => fh(d),
        s => Err(RpcError::Status(s)),
    }
}

/// MOUNTPROC3_UMNT: tell the server the export is no longer used.
pub fn unmount(c: &mut Conn, path: &str) -> Result<(), RpcError> {
    let mut a = Enc::default();
    a.opaque(path.as_bytes());
    c.call(MOUNT_PROG, MOUNT_VERS, 3, &[&a.0], |_| Ok(()))
}

fn nfs<T>(
    c: &mut Conn,
    proc_: u32,
    args: &[&[u8]],
    f: impl FnOnce(&mut Dec) -> Result<T, RpcError>,
) -> Result<T, RpcError> {
    c.call(NFS_PROG, NFS_VERS, proc_, args, f)
}

fn fh_arg(e: &mut Enc, fh: &[u8]) {
    e.opaque(fh);
}

/// GETATTR.
pub fn getattr(c: &mut Conn, fh: &[u8]) -> Result<Attr, RpcError> {
    let mut a = Enc::default();
    fh_arg(&mut a, fh);
    nfs(c, 1, &[&a.0], parse_getattr)
}

/// GETATTR's results.
pub fn parse_getattr(d: &mut Dec) -> Result<Attr, RpcError> {
    status(d)?;
    fattr3(d)
}

/// `sattr3` setting only the mode and/or the size.
fn sattr(e: &mut Enc, mode: Option<u32>, size: Option<u64>) {
    match mode {
        Some(m) => e.u32(1).u32(m),
        None => e.u32(0),
    };
    e.u32(0).u32(0); // uid, gid unchanged
    match size {
        Some(s) => e.u32(1).u64(s),
        None => e.u32(0),
    };
    e.u32(0).u32(0); // atime, mtime unchanged
}

/// SETATTR of the size.
pub fn set_size(c: &mut Conn, fh: &[u8], size: u64) -> Result<(), RpcError> {
    let mut a = Enc::default();
    fh_arg(&mut a, fh);
    sattr(&mut a, None, Some(size));
    a.u32(0); // no guard
    nfs(c, 2, &[&a.0], |d| {
        // Both arms carry wcc_data; only the status matters.
        status(d)
    })
}

/// LOOKUP of `name` in the directory `dir`: handle and attributes.
pub fn lookup(c: &mut Conn, dir: &[u8], name: &str) -> Result<(Vec<u8>, Option<Attr>), RpcError> {
    let mut a = Enc::default();
    fh_arg(&mut a, dir);
    a.opaque(name.as_bytes());
    nfs(c, 3, &[&a.0], parse_lookup)
}

/// LOOKUP's results.
pub fn parse_lookup(d: &mut Dec) -> Result<(Vec<u8>, Option<Attr>), RpcError> {
    status(d)?;
    let h = fh(d)?;
    let attr = post_op_attr(d)?;
    Ok((h, attr))
}

/// READ of at most `buf.len()` bytes at `offset` into `buf`: the count
/// read and whether it reached the end of the file.
pub fn read(
    c: &mut Conn,
    fh: &[u8],
    offset: u64,
    buf: &mut [u8],
) -> Result<(usize, bool), RpcError> {
    let mut a = Enc::default();
    fh_arg(&mut a, fh);
    a.u64(offset).u32(buf.len() as u32);
    nfs(c, 6, &[&a.0], |d| parse_read(d, buf))
}

/// READ's results, the data copied into `buf`.
pub fn parse_read(d: &mut Dec, buf: &mut [u8]) -> Result<(usize, bool), RpcError> {
    status(d)?;
    post_op_attr(d)?;
    let count = d.u32()? as usize;
    let eof = d.bool()?;
    let data = d.opaque(buf.len())?;
    if data.len() != count {
        return Err(RpcError::Proto(format!(
            "READ count {count} with {} bytes of data",
            data.len()
        )));
    }
    buf[..count].copy_from_slice(data);
    Ok((count, eof))
}

/// ACCESS bits (RFC 1813 3.3.4): reading, changing and growing a file.
pub const ACCESS_READ: u32 = 0x01;
/// ACCESS3_MODIFY.
pub const ACCESS_MODIFY: u32 = 0x04;
/// ACCESS3_EXTEND.
pub const ACCESS_EXTEND: u32 = 0x08;

/// ACCESS: which of the `want` bits the server grants the credential.
pub fn access(c: &mut Conn, fh: &[u8], want: u32) -> Result<u32, RpcError> {
    let mut a = Enc::default();
    fh_arg(&mut a, fh);
    a.u32(want);
    nfs(c, 4, &[&a.0], parse_access)
}

/// ACCESS's results.
pub fn parse_access(d: &mut Dec) -> Result<u32, RpcError> {
    status(d)?;
    post_op_attr(d)?;
    d.u32()
}

/// `stable_how` of a WRITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stable {
    /// Cached by the server until COMMIT.
    Unstable = 0,
    /// Durable before the reply.
    FileSync = 2,
}

/// WRITE of `data` at `offset`: the count written, whether it is durable
/// (`committed` is DATA_SYNC or FILE_SYNC) and the write verifier.
pub fn write(
    c: &mut Conn,
    fh: &[u8],
    offset: u64,
    data: &[u8],
    stable: Stable,
) -> Result<(usize, bool, [u8; 8]), RpcError> {
    let mut a = Enc::default();
    fh_arg(&mut a, fh);
    a.u64(offset)
        .u32(data.len() as u32)
        .u32(stable as u32)
        .u32(data.len() as u32);
    let pad = [0u8; 3];
    let pad = &pad[..(4 - data.len() % 4) % 4];
    nfs(c, 7, &[&a.0, data, pad], |d| parse_write(d, data.len()))
}

/// WRITE's results for a write of `asked` bytes.
pub fn parse_write(d: &mut Dec, asked: usize) -> Result<(usize, bool, [u8; 8]), RpcError> {
    status(d)?;
    wcc_data(d)?;
    let count = d.u32()? as usize;
    if count > asked {
        return Err(RpcError::Proto(format!(
            "WRITE of {asked} bytes answered with count {count}"
        )));
    }
    let committed = d.u32()?;
    let mut verf = [0u8; 8];
    verf.copy_from_slice(d.take(8)?);
    Ok((count, committed != 0, verf))
}

/// CREATE (UNCHECKED: an existing file is kept, and emptied by the size 0
/// set with it) of `name` in `dir` with `mode`: the new file's handle.
pub fn create(c: &mut Conn, dir: &[u8], name: &str, mode: u32) -> Result<Vec<u8>, RpcError> {
    let mut a = Enc::default();
    fh_arg(&mut a, dir);
    a.opaque(name.as_bytes());
    a.u32(0); // UNCHECKED
    sattr(&mut a, Some(mode), Some(0));
    let r = nfs(c, 8, &[&a.0], parse_create)?;
    match r {
        Some(h) => Ok(h),
        // A server may leave the handle out: look it up.
        None => lookup(c, dir, name).map(|(h, _)| h),
    }
}

/// CREATE's results: the handle, when the server sent it.
pub fn parse_create(d: &mut Dec) -> Result<Option<Vec<u8>>, RpcError> {
    status(d)?;
    if d.bool()? {
        Ok(Some(fh(d)?))
    } else {
        Ok(None)
    }
}

/// FSINFO: the server's preferred READ and WRITE sizes (`rtpref`,
/// `wtpref`), and maxima (`rtmax`, `wtmax`).
pub fn fsinfo(c: &mut Conn, fh: &[u8]) -> Result<[u32; 4], RpcError> {
    let mut a = Enc::default();
    fh_arg(&mut a, fh);
    nfs(c, 19, &[&a.0], parse_fsinfo)
}

/// FSINFO's results: `[rtmax, rtpref, wtmax, wtpref]`.
pub fn parse_fsinfo(d: &mut Dec) -> Result<[u32; 4], RpcError> {
    status(d)?;
    post_op_attr(d)?;
    let rtmax = d.u32()?;
    let rtpref = d.u32()?;
    d.u32()?; // rtmult
    let wtmax = d.u32()?;
    let wtpref = d.u32()?;
    Ok([rtmax, rtpref, wtmax, wtpref])
}

/// COMMIT of the whole file: the write verifier.
pub fn commit(c: &mut Conn, fh: &[u8]) -> Result<[u8; 8], RpcError> {
    let mut a = Enc::default();
    fh_arg(&mut a, fh);
    a.u64(0).u32(0);
    nfs(c, 21, &[&a.0], parse_commit)
}

/// COMMIT's results.
pub fn parse_commit(d: &mut Dec) -> Result<[u8; 8], RpcError> {
    status(d)?;
    wcc_data(d)?;
    let mut verf = [0u8; 8];
    verf.copy_from_slice(d.take(8)?);
    Ok(verf)
}

/// The `nfs_rpc` fuzz target: the first byte picks a decoder, the rest is
/// a reply (record contents). Properties: no input panics; a READ never
/// returns more than it was asked for.
pub fn fuzz_replies(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let xid = 0x1234_5678;
    let mut d = match sel % 10 {
        9 => {
            let _ = parse_access(&mut Dec::new(rest));
            return;
        }
        8 => {
            let _ = parse_reply(rest, xid);
            return;
        }
        _ => Dec::new(rest),
    };
    match sel % 10 {
        0 => drop(parse_mnt(&mut d)),
        1 => drop(parse_getattr(&mut d)),
        2 => drop(parse_lookup(&mut d)),
        3 => {
            let mut buf = vec![0u8; usize::from(sel) * 16];
            if let Ok((n, _)) = parse_read(&mut d, &mut buf) {
                assert!(n <= buf.len());
            }
        }
        4 => {
            if let Ok((n, _, _)) = parse_write(&mut d, 512) {
                assert!(n <= 512);
            }
        }
        5 => drop(parse_create(&mut d)),
        6 => drop(parse_fsinfo(&mut d)),
        _ => drop(parse_commit(&mut d)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(xid: u32, body: &[u8]) -> Vec<u8> {
        let mut e = Enc::default();
        e.u32(xid).u32(1).u32(0).u32(0).u32(0).u32(0);
        e.0.extend_from_slice(body);
        e.0
    }

    #[test]
    fn replies() {
        let mut b = Enc::default();
        b.u32(0).opaque(&[9; 32]).u32(1).u32(1);
        let r = reply(7, &b.0);
        let fh = parse_mnt(&mut parse_reply(&r, 7).unwrap()).unwrap();
        assert_eq!(fh, vec![9; 32]);
        assert!(parse_reply(&r, 8).is_err());
        // Denied: AUTH_ERROR, too weak.
        let mut e = Enc::default();
        e.u32(7).u32(1).u32(1).u32(1).u32(5);
        assert!(
            matches!(parse_reply(&e.0, 7), Err(RpcError::Rejected(m)) if m.contains("too weak"))
        );
        // A status ends decoding.
        let mut b = Enc::default();
        b.u32(2);
        assert_eq!(parse_getattr(&mut Dec::new(&b.0)), Err(RpcError::Status(2)));
    }

    /// A server on loopback that reads one call and answers `reply` bytes.
    fn peer(reply: Vec<u8>) -> Conn {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut m = [0u8; 4];
            s.read_exact(&mut m).unwrap();
            let mut call = vec![0u8; (u32::from_be_bytes(m) & 0x7fff_ffff) as usize];
            s.read_exact(&mut call).unwrap();
            let _ = s.write_all(&reply);
        });
        Conn::connect(addr, Cred { uid: 0, gid: 0 }, Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn hostile_records() {
        // A record mark announcing 2 GiB: refused before reading it.
        let mut c = peer(0xffff_ffffu32.to_be_bytes().to_vec());
        let e = getattr(&mut c, &[1; 8]).unwrap_err();
        assert!(
            matches!(&e, RpcError::Proto(m) if m.contains("more than")),
            "{e}"
        );
        // Endless empty fragments.
        let mut c = peer([0u8; 4 * 1100].to_vec());
        let e = getattr(&mut c, &[1; 8]).unwrap_err();
        assert!(
            matches!(&e, RpcError::Proto(m) if m.contains("fragments")),
            "{e}"
        );
        // A reply to another call.
        let mut r = Enc::default();
        r.u32(0x8000_0008).u32(0xdead).u32(1);
        let mut c = peer(r.0);
        let e = getattr(&mut c, &[1; 8]).unwrap_err();
        assert!(
            matches!(&e, RpcError::Proto(m) if m.contains("expected")),
            "{e}"
        );
        // The peer hangs up mid-reply.
        let mut c = peer(0x8000_0100u32.to_be_bytes().to_vec());
        assert!(matches!(getattr(&mut c, &[1; 8]), Err(RpcError::Io(..))));
    }

    #[test]
    fn hostile_lengths() {
        // An opaque claiming 4 GiB: refused without allocating.
        let mut b = Enc::default();
        b.u32(0).u32(0).u32(3).u32(1).u32(u32::MAX);
        let mut buf = [0u8; 8];
        assert!(parse_read(&mut Dec::new(&b.0), &mut buf).is_err());
        // More data than asked for.
        let mut b = Enc::default();
        b.u32(0).u32(0).u32(16).u32(1).opaque(&[1; 16]);
        assert!(parse_read(&mut Dec::new(&b.0), &mut buf).is_err());
        // Count and data disagree.
        let mut b = Enc::default();
        b.u32(0).u32(0).u32(8).u32(1).opaque(&[1; 4]);
        assert!(parse_read(&mut Dec::new(&b.0), &mut buf).is_err());
        // A good one.
        let mut b = Enc::default();
        b.u32(0).u32(0).u32(5).u32(1).opaque(&[1; 5]);
        assert_eq!(parse_read(&mut Dec::new(&b.0), &mut buf), Ok((5, true)));
        // A write count beyond the request.
        let mut b = Enc::default();
        b.u32(0).u32(0).u32(0).u32(600).u32(2).u64(1);
        assert!(parse_write(&mut Dec::new(&b.0), 512).is_err());
        // An oversized file handle.
        let mut b = Enc::default();
        b.u32(0).opaque(&[0; 65]);
        assert!(parse_lookup(&mut Dec::new(&b.0)).is_err());
        for i in 0..=255u8 {
            fuzz_replies(&[i]);
            fuzz_replies(&[i, 0, 0, 0]);
        }
    }
}
