//! The `nfs` protocol driver: an image file on an NFSv3 server (QEMU's
//! `block/nfs.c`, `BlockdevOptionsNfs`), spoken by [`rpc`] (RFC 1813 NFS
//! version 3, RFC 1833 portmapper, RFC 5531 ONC RPC with AUTH_SYS).
//!
//! Options: `server.type=inet`, `server.host`, `path`, `user` and `group`
//! (the AUTH_SYS ids; default the process's), and libnfs's tunables
//! `tcp-syn-count`, `readahead-size`, `page-cache-size`, `debug`, which
//! are checked and clamped as QEMU does but change nothing here (there is
//! no client cache to size). A Strata extension, `server.port`, names the
//! NFS port instead of asking the portmapper. The file names
//! `nfs://HOST[:PORT]/PATH[?uid=&gid=&tcp-syncnt=&readahead=&pagecache=&debug=]`
//! become those options.
//!
//! Opening follows libnfs as QEMU uses it: the portmapper (port 111) gives
//! the MOUNT and NFS ports, the directory holding the file is mounted
//! (MNT), or, when that directory is not itself an export, the nearest
//! parent that is, and LOOKUP walks from there to the file. A writable
//! node asks ACCESS whether the credential may write the file, as an
//! O_RDWR open on a client does (`auto-read-only` falls back to reading).
//!
//! Writes are UNSTABLE and flush COMMITs them (FUA writes are FILE_SYNC);
//! the write verifiers are compared, and a change (the server restarted
//! and may have lost cached writes) fails the flush with EIO rather than
//! pretending the data is safe. Up to four TCP connections serve the node,
//! one call at a time each, so requests from several threads run in
//! parallel; a connection that breaks is dropped and the request retried
//! once on another (the file handle survives).

pub mod rpc;

use crate::driver::{BlockDriver, Extent};
use crate::error::{BlockError, BlockResult};
use crate::graph::OpenCtx;
use crate::keyval::{Map, Options, Value};
use crate::neturi;
use rpc::{Attr, Conn, Cred, RpcError, Stable};
use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How long connecting, the portmapper and MOUNT may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// QEMU's clamps of the libnfs tunables.
const MAX_READAHEAD: u64 = 1 << 20;
const MAX_PAGECACHE: u64 = 1024;
const MAX_DEBUG: u64 = 2;
/// Connections a node opens at most: requests from several threads run
/// in parallel, as libnfs pipelines them on its one connection.
const MAX_CONNS: usize = 4;
/// The mode of files `create` makes (QEMU's, through libnfs' `nfs_creat`).
const CREATE_MODE: u32 = 0o600;

/// What an `nfs` node opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfsConfig {
    /// `server.host`.
    pub host: String,
    /// `server.port` (Strata): the NFS port; none asks the portmapper.
    pub port: Option<u16>,
    /// `path`: the file, from the server's root.
    pub path: String,
    /// AUTH_SYS ids (`user`, `group`).
    pub cred: Cred,
    /// The libnfs tunables as given (after QEMU's clamps), for `describe`.
    pub tunables: Vec<(&'static str, u64)>,
}

impl NfsConfig {
    /// The `nfs://` URI of the file.
    pub fn uri(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.port {
            Some(p) => format!("nfs://{host}:{p}{}", self.path),
            None => format!("nfs://{host}{}", self.path),
        }
    }
}

/// The `driver=nfs` options of an `nfs://` file name (QEMU's
/// `nfs_parse_uri`).
pub fn uri_options(name: &str) -> Result<Map, String> {
    let u = neturi::parse(name, "nfs")?;
    if u.host.is_empty() || u.path.is_empty() {
        return Err(format!("{name}: Invalid URI specified"));
    }
    if u.user.is_some() {
        return Err(format!(
            "{name}: a user in the URI is not supported (use uid=)"
        ));
    }
    let s = |v: &str| Value::Str(v.to_string());
    let mut m = Map::new();
    m.insert("driver".into(), s("nfs"));
    let mut server = Map::new();
    server.insert("type".into(), s("inet"));
    server.insert("host".into(), s(&u.host));
    if let Some(p) = u.port {
        server.insert("port".into(), s(&p.to_string()));
    }
    m.insert("server".into(), Value::Map(server));
    m.insert("path".into(), s(&u.path));
    for (k, v) in &u.query {
        let key = match k.as_str() {
            "uid" => "user",
            "gid" => "group",
            "tcp-syncnt" => "tcp-syn-count",
            "readahead" => "readahead-size",
            "pagecache" => "page-cache-size",
            "debug" => "debug",
            _ => return Err(format!("{name}: Unknown NFS parameter name: {k}")),
        };
        if crate::keyval::parse_uint_str(v).is_none() {
            return Err(format!("{name}: Illegal value for NFS parameter: {k}"));
        }
        m.insert(key.into(), s(v));
    }
    Ok(m)
}

/// The process's effective uid and gid (the owner of `/proc/self`).
fn own_ids() -> Cred {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata("/proc/self") {
        Ok(m) => Cred {
            uid: m.uid(),
            gid: m.gid(),
        },
        Err(_) => Cred { uid: 0, gid: 0 },
    }
}

/// Parse `-blockdev driver=nfs` options (also the options of a file name).
pub fn parse_options(o: &mut Options) -> BlockResult<NfsConfig> {
    let mut server = o
        .take_object("server")?
        .ok_or_else(|| BlockError::Open("nfs: the option 'server' is required".into()))?;
    let _ = server.take_enum("type", &["inet"])?;
    let host = server.require_str("host")?;
    let port = match server.take_str("port")? {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| {
            BlockError::Open(format!("nfs: server.port: '{p}' is not a valid port"))
        })?),
    };
    server.finish()?;
    let path = o.require_str("path")?;
    if !path.starts_with('/') || path.ends_with('/') || path.contains('\0') {
        return Err(BlockError::Open(format!(
            "nfs: path: '{path}' is not an absolute path to a file"
        )));
    }
    let own = own_ids();
    let id = |o: &mut Options, k: &str, def: u32| -> BlockResult<u32> {
        match o.take_u64(k)? {
            None => Ok(def),
            Some(v) => u32::try_from(v)
                .map_err(|_| BlockError::Open(format!("nfs: {k}: {v} is out of range"))),
        }
    };
    let cred = Cred {
        uid: id(o, "user", own.uid)?,
        gid: id(o, "group", own.gid)?,
    };
    let mut tunables = Vec::new();
    for (k, max) in [
        ("tcp-syn-count", u64::from(u32::MAX)),
        ("readahead-size", MAX_READAHEAD),
        ("page-cache-size", MAX_PAGECACHE),
        ("debug", MAX_DEBUG),
    ] {
        if let Some(v) = o.take_u64(k)? {
            tunables.push((k, v.min(max)));
        }
    }
    Ok(NfsConfig {
        host,
        port,
        path,
        cred,
        tunables,
    })
}

fn rpc_err(cfg: &NfsConfig, what: &str, e: RpcError) -> BlockError {
    match e {
        RpcError::Io(errno, m) => BlockError::Io {
            errno,
            context: format!("{}: {what}: {m}", cfg.uri()),
        },
        RpcError::Status(s) => BlockError::Io {
            errno: rpc::status_errno(s),
            context: format!("{}: {what}: {}", cfg.uri(), RpcError::Status(s)),
        },
        e => BlockError::Io {
            errno: libc::EIO,
            context: format!("{}: {what}: {e}", cfg.uri()),
        },
    }
}

/// Where the file is once the server is found: the NFS address, the
/// directory's handle and the file's name in it.
struct Located {
    nfs_addr: SocketAddr,
    conn: Conn,
    dir: Vec<u8>,
    name: String,
}

fn locate(cfg: &NfsConfig) -> BlockResult<Located> {
    let open = |m: String| BlockError::Open(format!("{}: {m}", cfg.uri()));
    let ip = (cfg.host.as_str(), 0)
        .to_socket_addrs()
        .map_err(|e| open(format!("address resolution failed: {e}")))?
        .next()
        .ok_or_else(|| open("address resolution failed".into()))?
        .ip();
    let at = |port| SocketAddr::new(ip, port);
    let mut pmap = Conn::connect(at(rpc::PMAP_PORT), cfg.cred, CONNECT_TIMEOUT)
        .map_err(|e| open(format!("portmapper: {e}")))?;
    let mount_port = rpc::pmap_getport(&mut pmap, rpc::MOUNT_PROG, 3)
        .map_err(|e| open(format!("portmapper: {e}")))?;
    if mount_port == 0 {
        return Err(open(
            "the server has no MOUNT version 3 service over TCP".into(),
        ));
    }
    let nfs_port = match cfg.port {
        Some(p) => p,
        None => match rpc::pmap_getport(&mut pmap, rpc::NFS_PROG, 3)
            .map_err(|e| open(format!("portmapper: {e}")))?
        {
            0 => {
                return Err(open(
                    "the server has no NFS version 3 service over TCP".into(),
                ))
            }
            p => p,
        },
    };
    drop(pmap);
    let (dir_path, name) = cfg
        .path
        .rsplit_once('/')
        .ok_or_else(|| open("Invalid URI specified".into()))?;
    if name.is_empty() || name == "." || name == ".." {
        return Err(open(format!("'{}' does not name a file", cfg.path)));
    }
    // Mount the file's directory, else the nearest parent that is an
    // export (a server may export only a parent).
    let mut mnt = Conn::connect(at(mount_port), cfg.cred, CONNECT_TIMEOUT)
        .map_err(|e| open(format!("mount: {e}")))?;
    let mut export = if dir_path.is_empty() { "/" } else { dir_path };
    let mut first_err = None;
    let root = loop {
        match rpc::mount(&mut mnt, export) {
            Ok(fh) => break fh,
            Err(e @ RpcError::Status(_)) => {
                first_err.get_or_insert(e);
                match export.rsplit_once('/') {
                    Some((p, _)) if export != "/" => {
                        export = if p.is_empty() { "/" } else { p };
                    }
                    _ => {
                        let e = first_err.unwrap_or(RpcError::Status(2));
                        return Err(open(format!(
                            "Failed to mount nfs share '{}': {e}",
                            if dir_path.is_empty() { "/" } else { dir_path }
                        )));
                    }
                }
            }
            Err(e) => return Err(open(format!("Failed to mount nfs share '{export}': {e}"))),
        }
    };
    drop(mnt);
    let mut conn =
        Conn::connect(at(nfs_port), cfg.cred, CONNECT_TIMEOUT).map_err(|e| open(format!("{e}")))?;
    let rest = dir_path.strip_prefix(export).unwrap_or("");
    let mut dir = root;
    for comp in rest.split('/').filter(|c| !c.is_empty()) {
        dir = rpc::lookup(&mut conn, &dir, comp)
            .map_err(|e| rpc_err(cfg, &format!("Failed to open directory '{comp}'"), e))?
            .0;
    }
    Ok(Located {
        nfs_addr: at(nfs_port),
        conn,
        dir,
        name: name.to_string(),
    })
}

/// The node's connections: idle ones, and how many exist.
struct Pool {
    idle: Vec<Conn>,
    live: usize,
}

/// UNSTABLE writes not yet committed.
#[derive(Default)]
struct Unstable {
    /// Their verifier (none: nothing to commit).
    verf: Option<[u8; 8]>,
    /// Counts them, so that a COMMIT racing with a write does not count
    /// that write as committed.
    gen: u64,
}

/// An `nfs` node.
pub struct NfsNode {
    cfg: NfsConfig,
    addr: SocketAddr,
    fh: Vec<u8>,
    pool: Mutex<Pool>,
    /// Signalled when a connection goes back to the pool or away.
    freed: Condvar,
    /// The verifier of the UNSTABLE writes since the last COMMIT.
    verf: Mutex<Unstable>,
    len: AtomicU64,
    rmax: usize,
    wmax: usize,
}

impl std::fmt::Debug for NfsNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NfsNode({})", self.cfg.uri())
    }
}

/// A transfer size from the server's preferred and maximum ones, within
/// [4 KiB, [`rpc::MAX_IO`]].
fn io_size(pref: u32, max: u32) -> usize {
    let v = if pref != 0 { pref } else { max };
    let v = if max != 0 { v.min(max) } else { v };
    v.clamp(4096, rpc::MAX_IO) as usize
}

impl NfsNode {
    /// Find, mount and open the file; a writable node needs the server
    /// to grant writing, else (with `auto_read_only`) it becomes
    /// read-only. Returns the node and whether it is read-only.
    pub fn connect(
        cfg: NfsConfig,
        read_only: bool,
        auto_read_only: bool,
    ) -> BlockResult<(NfsNode, bool)> {
        let mut read_only = read_only;
        let Located {
            nfs_addr,
            mut conn,
            dir,
            name,
        } = locate(&cfg)?;
        let (fh, attr) = rpc::lookup(&mut conn, &dir, &name)
            .map_err(|e| rpc_err(&cfg, "Failed to open file", e))?;
        let attr = match attr {
            Some(a) => a,
            None => rpc::getattr(&mut conn, &fh)
                .map_err(|e| rpc_err(&cfg, "Failed to fstat file", e))?,
        };
        if attr.ftype == 2 {
            return Err(BlockError::Open(format!(
                "{}: '{}' is a directory",
                cfg.uri(),
                cfg.path
            )));
        }
        // The server decides what the credential may do (export options,
        // the file's mode): ask, as opening O_RDWR on a client would.
        if !read_only {
            let want = rpc::ACCESS_READ | rpc::ACCESS_MODIFY | rpc::ACCESS_EXTEND;
            let got = rpc::access(&mut conn, &fh, want)
                .map_err(|e| rpc_err(&cfg, "Failed to check access", e))?;
            if got & want != want {
                if !auto_read_only {
                    return Err(BlockError::Io {
                        errno: libc::EACCES,
                        context: format!(
                            "{}: Failed to open file for writing (uid {}, gid {})",
                            cfg.uri(),
                            cfg.cred.uid,
                            cfg.cred.gid
                        ),
                    });
                }
                read_only = true;
            }
        }
        let [rtmax, rtpref, wtmax, wtpref] = rpc::fsinfo(&mut conn, &fh).unwrap_or([0; 4]);
        conn.set_timeout(None)
            .map_err(|e| rpc_err(&cfg, "socket", e))?;
        let node = NfsNode {
            addr: nfs_addr,
            fh,
            pool: Mutex::new(Pool {
                idle: vec![conn],
                live: 1,
            }),
            freed: Condvar::new(),
            verf: Mutex::new(Unstable::default()),
            len: AtomicU64::new(attr.size),
            rmax: io_size(rtpref, rtmax),
            wmax: io_size(wtpref, wtmax),
            cfg,
        };
        Ok((node, read_only))
    }

    /// Open from `-blockdev driver=nfs` options.
    pub fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        let cfg = parse_options(&mut ctx.opts)?;
        ctx.describe("server", cfg.host.clone());
        ctx.describe("path", cfg.path.clone());
        ctx.describe("user", cfg.cred.uid.to_string());
        ctx.describe("group", cfg.cred.gid.to_string());
        for (k, v) in &cfg.tunables {
            ctx.describe(k, v.to_string());
        }
        let (node, ro) = NfsNode::connect(cfg, ctx.common.read_only, ctx.common.auto_read_only)?;
        ctx.common.read_only = ro;
        Ok(Arc::new(node))
    }

    fn pool(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection, a new one while fewer than [`MAX_CONNS`] exist,
    /// else the next one freed.
    fn take_conn(&self) -> BlockResult<Conn> {
        let mut p = self.pool();
        loop {
            if let Some(c) = p.idle.pop() {
                return Ok(c);
            }
            if p.live < MAX_CONNS {
                p.live += 1;
                drop(p);
                let c = Conn::connect(self.addr, self.cfg.cred, CONNECT_TIMEOUT)
                    .and_then(|mut c| c.set_timeout(None).map(|_| c));
                return c.map_err(|e| {
                    self.drop_conn();
                    rpc_err(&self.cfg, "connect", e)
                });
            }
            p = self.freed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn put_conn(&self, c: Conn) {
        self.pool().idle.push(c);
        self.freed.notify_one();
    }

    /// A connection that broke: it is never reused.
    fn drop_conn(&self) {
        self.pool().live -= 1;
        self.freed.notify_one();
    }

    /// Run `f` on a connection of the pool; one that breaks is replaced
    /// once (the file handle stays valid across connections, and the
    /// procedures used are idempotent) and `f` retried.
    fn with_conn<T>(
        &self,
        what: &str,
        mut f: impl FnMut(&mut Conn) -> Result<T, RpcError>,
    ) -> BlockResult<T> {
        let mut last = None;
        for _ in 0..2 {
            let mut c = self.take_conn()?;
            match f(&mut c) {
                Ok(v) => {
                    self.put_conn(c);
                    return Ok(v);
                }
                Err(e @ RpcError::Io(..)) => {
                    self.drop_conn();
                    last = Some(e);
                }
                Err(e @ RpcError::Proto(_)) => {
                    // Out of step with the server: not retried.
                    self.drop_conn();
                    return Err(rpc_err(&self.cfg, what, e));
                }
                Err(e) => {
                    self.put_conn(c);
                    return Err(rpc_err(&self.cfg, what, e));
                }
            }
        }
        Err(rpc_err(
            &self.cfg,
            what,
            last.unwrap_or(RpcError::Io(libc::EIO, "connection lost".into())),
        ))
    }

    fn getattr(&self) -> BlockResult<Attr> {
        self.with_conn("fstat", |c| rpc::getattr(c, &self.fh))
    }

    fn verf(&self) -> MutexGuard<'_, Unstable> {
        self.verf.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Note the verifier of an UNSTABLE write: a different one than the
    /// writes before it had means the server restarted in between.
    fn note_unstable(&self, v: [u8; 8]) -> BlockResult<()> {
        let mut u = self.verf();
        u.gen += 1;
        match u.verf {
            Some(old) if old != v => {
                u.verf = None;
                Err(self.restarted())
            }
            _ => {
                u.verf = Some(v);
                Ok(())
            }
        }
    }

    fn restarted(&self) -> BlockError {
        BlockError::Io {
            errno: libc::EIO,
            context: format!(
                "{}: the server restarted (write verifier changed): unstable writes since the last flush may be lost",
                self.cfg.uri()
            ),
        }
    }

    fn commit(&self) -> BlockResult<()> {
        let (before, gen) = {
            let u = self.verf();
            match u.verf {
                None => return Ok(()),
                Some(v) => (v, u.gen),
            }
        };
        let v = self.with_conn("COMMIT", |c| rpc::commit(c, &self.fh))?;
        let mut u = self.verf();
        if v != before {
            u.verf = None;
            return Err(self.restarted());
        }
        // Writes noted since the COMMIT was sent may not be covered by it:
        // the next flush commits again.
        if u.gen == gen {
            u.verf = None;
        }
        Ok(())
    }
}

/// Create (or empty) the file an `nfs://` name or option map stands for
/// (QEMU's `nfs_file_co_create`: mode 0600).
pub fn create(name: &str, map: Map) -> BlockResult<()> {
    let mut o = Options::new(name, map);
    let _ = o.take_str("driver")?;
    let cfg = parse_options(&mut o)?;
    o.finish()?;
    let mut l = locate(&cfg)?;
    rpc::create(&mut l.conn, &l.dir, &l.name, CREATE_MODE)
        .map_err(|e| rpc_err(&cfg, "Failed to create file", e))?;
    Ok(())
}

impl BlockDriver for NfsNode {
    /// A protocol on shared storage: no format metadata.
    fn migration_blocker(&self, _node: &str) -> Option<String> {
        None
    }
    fn driver_name(&self) -> &'static str {
        "nfs"
    }
    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }
    fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        let mut off = offset;
        let mut eof = false;
        for s in iov.iter_mut() {
            let mut done = 0;
            while done < s.len() && !eof {
                let n = (s.len() - done).min(self.rmax);
                let buf = &mut s[done..done + n];
                let (got, at_end) = self.with_conn(&format!("read at {off}"), |c| {
                    rpc::read(c, &self.fh, off, &mut *buf)
                })?;
                if got == 0 && !at_end {
                    return Err(rpc_err(
                        &self.cfg,
                        &format!("read at {off}"),
                        RpcError::Proto("READ returned no data before the end of the file".into()),
                    ));
                }
                eof = at_end && got < n;
                done += got;
                off += got as u64;
            }
            // Past the end of the file reads as zeroes, as pread's short
            // reads do for the file protocol.
            s[done..].fill(0);
            off += (s.len() - done) as u64;
        }
        Ok(())
    }
    fn write_vectored(&self, offset: u64, iov: &[IoSlice<'_>], fua: bool) -> BlockResult<()> {
        let stable = if fua {
            Stable::FileSync
        } else {
            Stable::Unstable
        };
        let mut off = offset;
        for s in iov {
            let mut done = 0;
            while done < s.len() {
                let n = (s.len() - done).min(self.wmax);
                let data = &s[done..done + n];
                let (got, durable, verf) = self.with_conn(&format!("write at {off}"), |c| {
                    rpc::write(c, &self.fh, off, data, stable)
                })?;
                if got == 0 {
                    return Err(rpc_err(
                        &self.cfg,
                        &format!("write at {off}"),
                        RpcError::Proto("WRITE wrote nothing".into()),
                    ));
                }
                if !durable {
                    self.note_unstable(verf)?;
                }
                done += got;
                off += got as u64;
            }
        }
        self.len.fetch_max(off, Ordering::AcqRel);
        Ok(())
    }
    fn flush(&self) -> BlockResult<()> {
        self.commit()
    }
    fn truncate(&self, len: u64) -> BlockResult<()> {
        self.with_conn(&format!("resize to {len}"), |c| {
            rpc::set_size(c, &self.fh, len)
        })?;
        self.len.store(len, Ordering::Release);
        Ok(())
    }
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
    fn reopen(&self, _read_only: bool) -> BlockResult<()> {
        // NFS has no open state: permissions are checked per call.
        Ok(())
    }
    fn allocated_size(&self) -> Option<u64> {
        self.getattr().ok().map(|a| a.used)
    }
    fn filename(&self) -> Option<String> {
        Some(self.cfg.uri())
    }
}

impl Drop for NfsNode {
    fn drop(&mut self) {
        // Unstable writes not yet committed: a last COMMIT, as closing a
        // file on an NFS client does; bounded, so that a hung server cannot
        // hang the process's exit.
        if self.verf().verf.is_some() {
            for c in self.pool().idle.iter_mut() {
                let _ = c.set_timeout(Some(CONNECT_TIMEOUT));
            }
            let _ = self.commit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(uri: &str) -> Result<NfsConfig, String> {
        let m = uri_options(uri)?;
        let mut o = Options::new("file", m);
        let _ = o.take_str("driver");
        let c = parse_options(&mut o).map_err(|e| e.to_string())?;
        o.finish().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn uris() {
        let c = opts("nfs://srv/export/dir/img.qcow2?uid=1000&gid=100&readahead=4194304&debug=9")
            .unwrap();
        assert_eq!(c.host, "srv");
        assert_eq!(c.port, None);
        assert_eq!(c.path, "/export/dir/img.qcow2");
        assert_eq!(
            c.cred,
            Cred {
                uid: 1000,
                gid: 100
            }
        );
        // QEMU's clamps.
        assert_eq!(c.tunables, vec![("readahead-size", 1 << 20), ("debug", 2)]);
        assert_eq!(c.uri(), "nfs://srv/export/dir/img.qcow2");
        let c = opts("nfs://[::1]:2049/e/f").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", Some(2049)));
        assert_eq!(c.uri(), "nfs://[::1]:2049/e/f");
        for (bad, msg) in [
            ("nfs://srv", "Invalid URI"),
            ("nfs:///e/f", "Invalid URI"),
            ("nfs://srv/e/f?foo=1", "Unknown NFS parameter name: foo"),
            (
                "nfs://srv/e/f?uid=x",
                "Illegal value for NFS parameter: uid",
            ),
            ("nfs://srv/e/f?uid=4294967296", "out of range"),
            ("nfs://srv/e/", "not an absolute path to a file"),
            ("nfs://u@srv/e/f", "user in the URI"),
        ] {
            let e = opts(bad).unwrap_err();
            assert!(e.contains(msg), "{bad}: {e}");
        }
    }

    /// A fake NFS server on loopback answering WRITE (UNSTABLE) and
    /// COMMIT with the given verifiers in turn; counts the COMMITs.
    fn fake_server(
        writes: Vec<[u8; 8]>,
        commits: Vec<[u8; 8]>,
    ) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = n.clone();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let (mut w, mut c) = (writes.into_iter(), commits.into_iter());
            loop {
                let mut m = [0u8; 4];
                if s.read_exact(&mut m).is_err() {
                    return;
                }
                let mut call = vec![0u8; (u32::from_be_bytes(m) & 0x7fff_ffff) as usize];
                s.read_exact(&mut call).unwrap();
                let word =
                    |i: usize| u32::from_be_bytes(call[i * 4..i * 4 + 4].try_into().unwrap());
                let mut r: Vec<u8> = Vec::new();
                for v in [word(0), 1, 0, 0, 0, 0, 0, 0, 0] {
                    r.extend_from_slice(&v.to_be_bytes()); // header, status, wcc
                }
                match word(5) {
                    7 => {
                        r.extend_from_slice(&512u32.to_be_bytes());
                        r.extend_from_slice(&0u32.to_be_bytes());
                        r.extend_from_slice(&w.next().unwrap());
                    }
                    21 => {
                        count.fetch_add(1, Ordering::SeqCst);
                        r.extend_from_slice(&c.next().unwrap());
                    }
                    p => panic!("unexpected procedure {p}"),
                }
                let mut out = (0x8000_0000u32 | r.len() as u32).to_be_bytes().to_vec();
                out.extend_from_slice(&r);
                s.write_all(&out).unwrap();
            }
        });
        (addr, n)
    }

    fn node_at(addr: SocketAddr) -> NfsNode {
        let cred = Cred { uid: 0, gid: 0 };
        let conn = Conn::connect(addr, cred, CONNECT_TIMEOUT).unwrap();
        NfsNode {
            cfg: NfsConfig {
                host: "127.0.0.1".into(),
                port: Some(addr.port()),
                path: "/t/f".into(),
                cred,
                tunables: Vec::new(),
            },
            addr,
            fh: vec![1; 8],
            pool: Mutex::new(Pool {
                idle: vec![conn],
                live: 1,
            }),
            freed: Condvar::new(),
            verf: Mutex::new(Unstable::default()),
            len: AtomicU64::new(1 << 20),
            rmax: 4096,
            wmax: 4096,
        }
    }

    #[test]
    fn commit_and_verifiers() {
        let data = [7u8; 512];
        let w = |n: &NfsNode| n.write_vectored(0, &[IoSlice::new(&data)], false);
        // Flush commits the unstable write once; a second flush has
        // nothing to commit.
        let (addr, commits) = fake_server(vec![[1; 8]], vec![[1; 8]]);
        let n = node_at(addr);
        w(&n).unwrap();
        n.flush().unwrap();
        n.flush().unwrap();
        assert_eq!(commits.load(Ordering::SeqCst), 1);
        drop(n);
        // The server restarted between the write and the COMMIT.
        let (addr, _) = fake_server(vec![[1; 8]], vec![[2; 8]]);
        let n = node_at(addr);
        w(&n).unwrap();
        let e = n.flush().unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        assert!(e.to_string().contains("server restarted"), "{e}");
        drop(n);
        // ... or between two writes.
        let (addr, _) = fake_server(vec![[1; 8], [3; 8]], vec![]);
        let n = node_at(addr);
        w(&n).unwrap();
        assert!(w(&n).unwrap_err().to_string().contains("server restarted"));
    }

    #[test]
    fn sizes() {
        assert_eq!(io_size(0, 0), 4096);
        assert_eq!(io_size(65536, 1 << 20), 65536);
        assert_eq!(io_size(0, 1 << 24), 1 << 20);
        assert_eq!(io_size(1 << 20, 8192), 8192);
    }
}
