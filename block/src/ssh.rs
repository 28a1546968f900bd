//! The `ssh` protocol driver: an image file on an SSH server, read and
//! written over SFTP (QEMU's `block/ssh.c`, `BlockdevOptionsSsh`).
//!
//! Specs: RFC 4251–4254 (the SSH transport, authentication and connection
//! protocols, which libssh2 speaks for us), draft-ietf-secsh-filexfer-02
//! (SFTP version 3, what OpenSSH's `sftp-server` implements: OPEN, READ,
//! WRITE, FSTAT, FSETSTAT) and OpenSSH's `PROTOCOL` file for the
//! `fsync@openssh.com` extension behind flush.
//!
//! Options: `server.host`, `server.port` (22), `path`, `user` (default:
//! the current user), `host-key-check.mode=none|hash|known_hosts`
//! (default `known_hosts`: `~/.ssh/known_hosts`, then
//! `/etc/ssh/ssh_known_hosts`), with `hash`: `host-key-check.type=md5|sha1|sha256`
//! and `host-key-check.hash=` (hex, colons allowed; for sha256 also the
//! `SHA256:base64` form `ssh-keygen -l` prints). The file names
//! `ssh://[USER@]HOST[:PORT]/PATH[?host_key_check=no|yes|md5:H|sha1:H|sha256:H]`
//! become those options (the query is QEMU's legacy `host_key_check`).
//!
//! Authentication is QEMU's: public keys only, first the identities of the
//! ssh-agent at `SSH_AUTH_SOCK`, then the unencrypted default key files
//! (`~/.ssh/id_ed25519`, `id_ecdsa`, `id_rsa`), as libssh's
//! `ssh_userauth_publickey_auto` tries them.
//!
//! Up to four SSH sessions, each with its own SFTP handle on the file,
//! serve the node (the first opened with the node, the others when
//! requests overlap); a request has a session to itself (it seeks, then
//! reads or writes all its bytes), which keeps libssh2's pipelined reads
//! and writes from interleaving. A flush's fsync on one handle covers
//! the writes made through the others: the server syncs the file.

use crate::driver::{BlockDriver, Extent};
use crate::error::{BlockError, BlockResult};
use crate::graph::OpenCtx;
use crate::keyval::{Map, Options, Value};
use crate::neturi;
use ssh2::{CheckResult, HashType, KnownHostFileKind, OpenFlags, OpenType, Session, Sftp};
use std::io::{IoSlice, IoSliceMut, Read, Seek, SeekFrom, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Sessions a node opens at most (each with its own SFTP handle on the
/// file), so that requests from several threads run in parallel; the
/// extra ones connect when first needed.
const MAX_SESSIONS: usize = 4;
/// Cipher preference (see [`connect`]).
const CIPHERS: &str =
    "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,\
                       aes128-ctr,aes192-ctr,aes256-ctr";
/// The SSH port.
pub const DEFAULT_PORT: u16 = 22;
/// How long connecting and the handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A known_hosts file larger than this is not read (it is hostile or
/// broken; the biggest real ones are a few MiB).
const MAX_KNOWN_HOSTS: u64 = 16 << 20;

/// The hash of a `host-key-check.mode=hash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKind {
    /// MD5 (16 bytes).
    Md5,
    /// SHA-1 (20 bytes).
    Sha1,
    /// SHA-256 (32 bytes).
    Sha256,
}

impl HashKind {
    fn name(self) -> &'static str {
        match self {
            HashKind::Md5 => "md5",
            HashKind::Sha1 => "sha1",
            HashKind::Sha256 => "sha256",
        }
    }
    fn len(self) -> usize {
        match self {
            HashKind::Md5 => 16,
            HashKind::Sha1 => 20,
            HashKind::Sha256 => 32,
        }
    }
    fn ssh2(self) -> HashType {
        match self {
            HashKind::Md5 => HashType::Md5,
            HashKind::Sha1 => HashType::Sha1,
            HashKind::Sha256 => HashType::Sha256,
        }
    }
}

/// How the server's host key is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyCheck {
    /// Not at all.
    None,
    /// Against a fingerprint: the hash as given, and its bytes.
    Hash(HashKind, String, Vec<u8>),
    /// Against the user's and the system's known_hosts files.
    KnownHosts,
}

/// What an `ssh` node connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshConfig {
    /// `server.host`.
    pub host: String,
    /// `server.port`.
    pub port: u16,
    /// `path`: the remote file.
    pub path: String,
    /// `user`.
    pub user: String,
    /// `host-key-check`.
    pub check: HostKeyCheck,
}

impl SshConfig {
    /// The `ssh://` URI of the file (what `filename` reports).
    pub fn uri(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("ssh://{}@{host}:{}{}", self.user, self.port, self.path)
    }
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = s.bytes().filter(|&c| c != b':').collect();
    if !digits.len().is_multiple_of(2) || digits.is_empty() {
        return None;
    }
    digits
        .chunks(2)
        .map(|p| {
            std::str::from_utf8(p)
                .ok()
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect()
}

/// The bytes of a fingerprint: hex (colons allowed, QEMU's form) or, for
/// SHA-256 and MD5, the `SHA256:base64` / `MD5:hex` forms of `ssh-keygen -l`.
pub fn parse_fingerprint(kind: HashKind, s: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let bytes = if let Some(b64) = s.strip_prefix("SHA256:") {
        if kind != HashKind::Sha256 {
            return Err(format!(
                "'{s}' is a SHA-256 fingerprint, not {}",
                kind.name()
            ));
        }
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(b64.trim_end_matches('='))
            .ok()
    } else {
        hex_bytes(s.strip_prefix("MD5:").unwrap_or(s))
    };
    match bytes {
        Some(b) if b.len() == kind.len() => Ok(b),
        _ => Err(format!(
            "'{s}' is not a {} fingerprint ({} bytes in hex)",
            kind.name(),
            kind.len()
        )),
    }
}

/// The `host-key-check` options of QEMU's legacy `host_key_check=` value
/// (URI query or `-drive` option).
pub fn legacy_host_key_check(v: &str) -> Result<Map, String> {
    let s = |v: &str| Value::Str(v.to_string());
    let mut m = Map::new();
    match v {
        "no" => {
            m.insert("mode".into(), s("none"));
        }
        "yes" => {
            m.insert("mode".into(), s("known_hosts"));
        }
        _ => {
            let (ty, hash) = v
                .split_once(':')
                .filter(|(t, _)| matches!(*t, "md5" | "sha1" | "sha256"))
                .ok_or_else(|| format!("unknown host_key_check setting ({v})"))?;
            m.insert("mode".into(), s("hash"));
            m.insert("type".into(), s(ty));
            m.insert("hash".into(), s(hash));
        }
    }
    Ok(m)
}

/// The `driver=ssh` options of an `ssh://` file name.
pub fn uri_options(name: &str) -> Result<Map, String> {
    let u = neturi::parse(name, "ssh")?;
    if u.host.is_empty() {
        return Err(format!("{name}: missing hostname in URI"));
    }
    if u.path.is_empty() || u.path == "/" {
        return Err(format!("{name}: missing remote path in URI"));
    }
    let s = |v: &str| Value::Str(v.to_string());
    let mut m = Map::new();
    m.insert("driver".into(), s("ssh"));
    let mut server = Map::new();
    server.insert("host".into(), s(&u.host));
    server.insert(
        "port".into(),
        s(&u.port.unwrap_or(DEFAULT_PORT).to_string()),
    );
    m.insert("server".into(), Value::Map(server));
    m.insert("path".into(), s(&u.path));
    if let Some(user) = u.user.filter(|u| !u.is_empty()) {
        m.insert("user".into(), s(&user));
    }
    for (k, v) in &u.query {
        match k.as_str() {
            "host_key_check" => {
                let hkc = legacy_host_key_check(v).map_err(|e| format!("{name}: {e}"))?;
                m.insert("host-key-check".into(), Value::Map(hkc));
            }
            other => {
                return Err(format!(
                    "{name}: unknown query parameter '{other}' (the ssh URI takes host_key_check)"
                ))
            }
        }
    }
    Ok(m)
}

/// The current user's name and home directory: `$USER`/`$HOME`, else the
/// password file's entry for the process's uid.
fn current_user() -> (Option<String>, Option<PathBuf>) {
    let env = |k| std::env::var(k).ok().filter(|v: &String| !v.is_empty());
    let mut user = env("USER").or_else(|| env("LOGNAME"));
    let mut home = env("HOME").map(PathBuf::from);
    if user.is_none() || home.is_none() {
        use std::os::unix::fs::MetadataExt;
        // The owner of /proc/self is the process's effective uid.
        let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        if let Some(f) = passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() >= 6 && uid.is_some_and(|u| f[2].parse::<u32>().ok() == Some(u)))
        {
            user = user.or_else(|| Some(f[0].to_string()));
            home = home.or_else(|| Some(PathBuf::from(f[5])));
        }
    }
    (user, home)
}

/// Parse `-blockdev driver=ssh` options (also the options of a file name).
pub fn parse_options(o: &mut Options) -> BlockResult<SshConfig> {
    // QEMU's legacy flat `host=`/`port=` stand for `server.host`/`server.port`.
    let (legacy_host, legacy_port) = (o.take_str("host")?, o.take_str("port")?);
    let mut server = match (o.take_object("server")?, legacy_host) {
        (Some(_), Some(_)) => {
            return Err(BlockError::Open(
                "ssh: host and server.host are mutually exclusive".into(),
            ))
        }
        (Some(s), None) => s,
        (None, Some(h)) => {
            let mut m = Map::new();
            m.insert("host".into(), Value::Str(h));
            if let Some(p) = legacy_port {
                m.insert("port".into(), Value::Str(p));
            }
            Options::new(o.option(), m)
        }
        (None, None) => {
            return Err(BlockError::Open(
                "ssh: the option 'server' is required".into(),
            ))
        }
    };
    let host = server.require_str("host")?;
    let port = match server.take_str("port")? {
        None => DEFAULT_PORT,
        Some(p) => p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| {
            BlockError::Open(format!("ssh: server.port: '{p}' is not a valid port"))
        })?,
    };
    server.finish()?;
    let path = o.require_str("path")?;
    if path.is_empty() || path.contains('\0') {
        return Err(BlockError::Open(format!(
            "ssh: path: invalid remote path '{path}'"
        )));
    }
    let user = match o.take_str("user")? {
        Some(u) => u,
        None => current_user().0.ok_or_else(|| {
            BlockError::Open("ssh: no user= given and the current user name is unknown".into())
        })?,
    };
    let legacy = o.take_str("host_key_check")?;
    let hkc = match (o.take_object("host-key-check")?, legacy) {
        (Some(_), Some(_)) => {
            return Err(BlockError::Open(
                "ssh: host_key_check and host-key-check are mutually exclusive".into(),
            ))
        }
        (Some(h), None) => Some(h),
        (None, Some(v)) => Some(Options::new(
            o.option(),
            legacy_host_key_check(&v).map_err(|e| BlockError::Open(format!("ssh: {e}")))?,
        )),
        (None, None) => None,
    };
    let check = match hkc {
        None => HostKeyCheck::KnownHosts,
        Some(mut h) => {
            let mode = h
                .take_enum("mode", &["none", "hash", "known_hosts"])?
                .ok_or_else(|| BlockError::Open("ssh: host-key-check.mode is required".into()))?;
            let c = match mode.as_str() {
                "none" => HostKeyCheck::None,
                "known_hosts" => HostKeyCheck::KnownHosts,
                _ => {
                    let ty = h
                        .take_enum("type", &["md5", "sha1", "sha256"])?
                        .ok_or_else(|| {
                            BlockError::Open("ssh: host-key-check.type is required".into())
                        })?;
                    let kind = match ty.as_str() {
                        "md5" => HashKind::Md5,
                        "sha1" => HashKind::Sha1,
                        _ => HashKind::Sha256,
                    };
                    let hash = h.require_str("hash")?;
                    let bytes = parse_fingerprint(kind, &hash)
                        .map_err(|e| BlockError::Open(format!("ssh: host-key-check.hash: {e}")))?;
                    HostKeyCheck::Hash(kind, hash, bytes)
                }
            };
            h.finish()?;
            c
        }
    };
    Ok(SshConfig {
        host,
        port,
        path,
        user,
        check,
    })
}

fn open_err(cfg: &SshConfig, msg: impl std::fmt::Display) -> BlockError {
    BlockError::Open(format!("{}: {msg}", cfg.uri()))
}

/// The errno closest to an SFTP status (v3 has few: OpenSSH reports
/// ENOSPC and most others as SSH_FX_FAILURE).
fn sftp_errno(code: &ssh2::ErrorCode) -> i32 {
    match code {
        ssh2::ErrorCode::SFTP(c) => match *c {
            2 | 10 => libc::ENOENT,
            3 => libc::EACCES,
            8 => libc::ENOTSUP,
            11 => libc::EEXIST,
            12 => libc::EROFS,
            14 => libc::ENOSPC,
            15 => libc::EDQUOT,
            19 => libc::ENOTDIR,
            _ => libc::EIO,
        },
        ssh2::ErrorCode::Session(_) => libc::EIO,
    }
}

/// The errno of an I/O error from an SFTP read or write (ssh2 keeps only
/// the message of the status).
fn io_errno(e: &std::io::Error) -> i32 {
    let m = e.to_string();
    match m.as_str() {
        "no such file" | "no such path" => libc::ENOENT,
        "permission denied" => libc::EACCES,
        "file is write protected" => libc::EROFS,
        "no space on filesystem" => libc::ENOSPC,
        "quota exceeded" => libc::EDQUOT,
        "operation unsupported" => libc::ENOTSUP,
        _ => e.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// Check the server's host key as `cfg` asks.
fn check_host_key(sess: &Session, cfg: &SshConfig) -> BlockResult<()> {
    match &cfg.check {
        HostKeyCheck::None => Ok(()),
        HostKeyCheck::Hash(kind, given, want) => {
            let got = match sess.host_key_hash(kind.ssh2()) {
                Some(h) => h.to_vec(),
                // libssh2 built on OpenSSL 3 has no MD5: hash the key's
                // blob (what the fingerprint is of) here.
                None if *kind == HashKind::Md5 => {
                    use md5::Digest;
                    let (blob, _) = sess
                        .host_key()
                        .ok_or_else(|| open_err(cfg, "failed to read remote host key"))?;
                    md5::Md5::digest(blob).to_vec()
                }
                None => return Err(open_err(cfg, "failed to read remote host key")),
            };
            if got == *want {
                return Ok(());
            }
            // QEMU's message, with the key type and the server's
            // fingerprint in the form host-key-check.hash takes.
            let hex: String = got.iter().map(|b| format!("{b:02x}")).collect();
            let ty = match sess.host_key().map(|k| k.1) {
                Some(ssh2::HostKeyType::Rsa) => "ssh-rsa ",
                Some(ssh2::HostKeyType::Dss) => "ssh-dss ",
                Some(ssh2::HostKeyType::Ed25519) => "ssh-ed25519 ",
                Some(
                    ssh2::HostKeyType::Ecdsa256
                    | ssh2::HostKeyType::Ecdsa384
                    | ssh2::HostKeyType::Ecdsa521,
                ) => "ecdsa ",
                _ => "",
            };
            Err(open_err(
                cfg,
                format!(
                    "remote host {ty}key fingerprint '{k}:{hex}' does not match host_key_check '{k}:{given}'",
                    k = kind.name()
                ),
            ))
        }
        HostKeyCheck::KnownHosts => {
            let (key, _) = sess
                .host_key()
                .ok_or_else(|| open_err(cfg, "failed to read remote host key"))?;
            let mut files = Vec::new();
            if let Some(h) = current_user().1 {
                files.push(h.join(".ssh/known_hosts"));
            }
            files.push(PathBuf::from("/etc/ssh/ssh_known_hosts"));
            let mut kh = sess
                .known_hosts()
                .map_err(|e| open_err(cfg, format!("known_hosts: {}", e.message())))?;
            for f in &files {
                let Ok(file) = std::fs::File::open(f) else {
                    continue;
                };
                let mut text = String::new();
                if file
                    .take(MAX_KNOWN_HOSTS)
                    .read_to_string(&mut text)
                    .is_err()
                {
                    continue;
                }
                // Line by line: libssh2 stops reading a file at the first
                // line it cannot parse (a key type it does not know).
                for line in text.lines() {
                    let l = line.trim();
                    if !l.is_empty() && !l.starts_with('#') {
                        let _ = kh.read_str(l, KnownHostFileKind::OpenSSH);
                    }
                }
            }
            match kh.check_port(&cfg.host, cfg.port, key) {
                CheckResult::Match => Ok(()),
                CheckResult::Mismatch => Err(open_err(
                    cfg,
                    "host key does not match the one in known_hosts; this may be a possible attack",
                )),
                CheckResult::NotFound => Err(open_err(
                    cfg,
                    format!(
                        "no host key was found in known_hosts ({})",
                        files
                            .iter()
                            .map(|f| f.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )),
                CheckResult::Failure => Err(open_err(cfg, "failed to check the host key")),
            }
        }
    }
}

/// Public key authentication: the agent's identities, then the default
/// unencrypted key files.
fn authenticate(sess: &Session, cfg: &SshConfig) -> BlockResult<()> {
    let methods = sess.auth_methods(&cfg.user).unwrap_or("publickey");
    if sess.authenticated() {
        return Ok(());
    }
    if !methods.split(',').any(|m| m == "publickey") {
        return Err(open_err(
            cfg,
            format!("the server does not offer publickey authentication (it offers: {methods})"),
        ));
    }
    if std::env::var_os("SSH_AUTH_SOCK").is_some() {
        if let Ok(mut agent) = sess.agent() {
            if agent.connect().is_ok() && agent.list_identities().is_ok() {
                for id in agent.identities().unwrap_or_default() {
                    if agent.userauth(&cfg.user, &id).is_ok() && sess.authenticated() {
                        let _ = agent.disconnect();
                        return Ok(());
                    }
                }
                let _ = agent.disconnect();
            }
        }
    }
    if let Some(home) = current_user().1 {
        for k in ["id_ed25519", "id_ecdsa", "id_rsa"] {
            let p = home.join(".ssh").join(k);
            if p.is_file()
                && sess.userauth_pubkey_file(&cfg.user, None, &p, None).is_ok()
                && sess.authenticated()
            {
                return Ok(());
            }
        }
    }
    Err(open_err(
        cfg,
        format!(
            "failed to authenticate as '{}' using publickey authentication and the identities held by your ssh-agent",
            cfg.user
        ),
    ))
}

/// Connect, check the host key, authenticate and start SFTP.
fn connect(cfg: &SshConfig) -> BlockResult<(Session, Sftp)> {
    let addrs: Vec<_> = (cfg.host.as_str(), cfg.port)
        .to_socket_addrs()
        .map_err(|e| open_err(cfg, format!("address resolution failed: {e}")))?
        .collect();
    let mut last = None;
    let mut tcp = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let tcp = tcp.ok_or_else(|| {
        open_err(
            cfg,
            format!(
                "Failed to connect: {}",
                last.map(|e| e.to_string())
                    .unwrap_or_else(|| "no address".into())
            ),
        )
    })?;
    let _ = tcp.set_nodelay(true);
    let mut sess = Session::new().map_err(|e| open_err(cfg, e.message()))?;
    sess.set_tcp_stream(tcp);
    // AES-GCM first: libssh2 runs it on OpenSSL (AES-NI), while its own
    // chacha20-poly1305, which servers otherwise pick, is several times
    // slower. Methods this libssh2 lacks are left out of the list.
    for m in [ssh2::MethodType::CryptCs, ssh2::MethodType::CryptSc] {
        let _ = sess.method_pref(m, CIPHERS);
    }
    // Bounded waits while the peer is not yet trusted; requests on an
    // established session wait as long as the server takes (as QEMU's).
    sess.set_timeout(CONNECT_TIMEOUT.as_millis() as u32);
    sess.handshake()
        .map_err(|e| open_err(cfg, format!("SSH handshake failed: {}", e.message())))?;
    check_host_key(&sess, cfg)?;
    authenticate(&sess, cfg)?;
    let sftp = sess.sftp().map_err(|e| {
        open_err(
            cfg,
            format!("failed to initialize sftp handle: {}", e.message()),
        )
    })?;
    sess.set_timeout(0);
    Ok((sess, sftp))
}

/// The open file and what it depends on.
struct Conn {
    file: ssh2::File,
    sftp: Sftp,
    sess: Session,
}

/// The node's sessions: idle ones, and how many exist.
struct Pool {
    idle: Vec<Conn>,
    live: usize,
}

/// An `ssh` node.
pub struct SshNode {
    cfg: SshConfig,
    pool: Mutex<Pool>,
    /// Signalled when a session goes back to the pool or away.
    freed: Condvar,
    read_only: AtomicBool,
    len: AtomicU64,
    /// The server lacks `fsync@openssh.com` (said once).
    no_fsync: AtomicBool,
}

impl std::fmt::Debug for SshNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SshNode({})", self.cfg.uri())
    }
}

fn open_file(sftp: &Sftp, cfg: &SshConfig, flags: OpenFlags) -> BlockResult<ssh2::File> {
    sftp.open_mode(Path::new(&cfg.path), flags, 0o644, OpenType::File)
        .map_err(|e| BlockError::Io {
            errno: sftp_errno(&e.code()),
            context: format!("{}: failed to open remote file '{}'", cfg.uri(), cfg.path),
        })
}

impl SshNode {
    /// Connect and open the remote file.
    /// With `auto_read_only`, a file the server refuses to open for
    /// writing is opened read-only instead (the node's `read_only`
    /// becomes true).
    pub fn connect(
        cfg: SshConfig,
        read_only: &mut bool,
        auto_read_only: bool,
    ) -> BlockResult<SshNode> {
        let (sess, sftp) = connect(&cfg)?;
        let rw = OpenFlags::READ | OpenFlags::WRITE;
        let mut file = match open_file(&sftp, &cfg, if *read_only { OpenFlags::READ } else { rw }) {
            Err(BlockError::Io { errno, .. })
                if !*read_only && auto_read_only && matches!(errno, libc::EACCES | libc::EROFS) =>
            {
                *read_only = true;
                open_file(&sftp, &cfg, OpenFlags::READ)?
            }
            r => r?,
        };
        let read_only = *read_only;
        let st = file.stat().map_err(|e| BlockError::Io {
            errno: sftp_errno(&e.code()),
            context: format!("{}: failed to read file attributes", cfg.uri()),
        })?;
        if st.is_dir() {
            return Err(open_err(&cfg, format!("'{}' is a directory", cfg.path)));
        }
        Ok(SshNode {
            len: AtomicU64::new(st.size.unwrap_or(0)),
            pool: Mutex::new(Pool {
                idle: vec![Conn { file, sftp, sess }],
                live: 1,
            }),
            freed: Condvar::new(),
            read_only: AtomicBool::new(read_only),
            cfg,
            no_fsync: AtomicBool::new(false),
        })
    }

    /// Open from `-blockdev driver=ssh` options.
    pub fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<std::sync::Arc<dyn BlockDriver>> {
        let cfg = parse_options(&mut ctx.opts)?;
        ctx.describe("server", format!("{}:{}", cfg.host, cfg.port));
        ctx.describe("path", cfg.path.clone());
        ctx.describe("user", cfg.user.clone());
        let auto = ctx.common.auto_read_only;
        let node = SshNode::connect(cfg, &mut ctx.common.read_only, auto)?;
        Ok(std::sync::Arc::new(node))
    }

    fn pool(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn flags(&self) -> OpenFlags {
        if self.read_only.load(Ordering::Acquire) {
            OpenFlags::READ
        } else {
            OpenFlags::READ | OpenFlags::WRITE
        }
    }

    /// An idle session, a new one while fewer than [`MAX_SESSIONS`]
    /// exist, else the next one freed.
    fn lease(&self) -> BlockResult<Lease<'_>> {
        let mut p = self.pool();
        loop {
            if let Some(c) = p.idle.pop() {
                return Ok(Lease {
                    node: self,
                    conn: Some(c),
                });
            }
            if p.live < MAX_SESSIONS {
                p.live += 1;
                drop(p);
                let c = connect(&self.cfg).and_then(|(sess, sftp)| {
                    let file = open_file(&sftp, &self.cfg, self.flags())?;
                    Ok(Conn { file, sftp, sess })
                });
                return match c {
                    Ok(c) => Ok(Lease {
                        node: self,
                        conn: Some(c),
                    }),
                    Err(e) => {
                        self.pool().live -= 1;
                        self.freed.notify_one();
                        Err(e)
                    }
                };
            }
            p = self.freed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn io_err(&self, what: &str, e: std::io::Error) -> BlockError {
        BlockError::Io {
            errno: io_errno(&e),
            context: format!("{}: {what}: {e}", self.cfg.uri()),
        }
    }
}

/// Create (or empty) the file an `ssh://` name or option map stands for:
/// QEMU's `ssh_co_create` (`O_RDWR | O_CREAT | O_TRUNC`, mode 0644).
pub fn create(name: &str, map: Map) -> BlockResult<()> {
    let mut o = Options::new(name, map);
    let _ = o.take_str("driver")?;
    let cfg = parse_options(&mut o)?;
    o.finish()?;
    let (_sess, sftp) = connect(&cfg)?;
    open_file(
        &sftp,
        &cfg,
        OpenFlags::READ | OpenFlags::WRITE | OpenFlags::TRUNCATE,
    )?;
    Ok(())
}

impl BlockDriver for SshNode {
    /// A protocol on shared storage: no format metadata.
    fn migration_blocker(&self, _node: &str) -> Option<String> {
        None
    }
    fn driver_name(&self) -> &'static str {
        "ssh"
    }
    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }
    fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        let mut c = self.lease()?;
        c.file
            .seek(SeekFrom::Start(offset))
            .map_err(|e| self.io_err("seek", e))?;
        let mut eof = false;
        // libssh2 asks the server for four times what one read call is
        // given (read-ahead), and the seek of the next request throws the
        // surplus away: reading a quarter of what is still needed per
        // call makes it ask for exactly the request's bytes.
        let mut need = crate::iov::total_len_mut(iov);
        for s in iov.iter_mut() {
            let mut done = 0;
            while done < s.len() && !eof {
                let want = (s.len() - done).min(need.div_ceil(4).max(1));
                match c.file.read(&mut s[done..done + want]) {
                    Ok(0) => eof = true,
                    Ok(n) => {
                        let n = n.min(want);
                        done += n;
                        need -= n;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(self.io_err(&format!("read at {offset}"), e)),
                }
            }
            // Past the end of the file reads as zeroes, as pread's short
            // reads do for the file protocol.
            s[done..].fill(0);
        }
        Ok(())
    }
    fn write_vectored(&self, offset: u64, iov: &[IoSlice<'_>], fua: bool) -> BlockResult<()> {
        let mut c = self.lease()?;
        c.file
            .seek(SeekFrom::Start(offset))
            .map_err(|e| self.io_err("seek", e))?;
        let mut n = 0u64;
        for s in iov {
            c.file
                .write_all(s)
                .map_err(|e| self.io_err(&format!("write at {offset}"), e))?;
            n += s.len() as u64;
        }
        self.len
            .fetch_max(offset.saturating_add(n), Ordering::AcqRel);
        if fua {
            self.fsync(&mut c)?;
        }
        Ok(())
    }
    fn flush(&self) -> BlockResult<()> {
        let mut c = self.lease()?;
        self.fsync(&mut c)
    }
    fn truncate(&self, len: u64) -> BlockResult<()> {
        let mut c = self.lease()?;
        // FSETSTAT with a size: OpenSSH's sftp-server ftruncate()s, so the
        // file shrinks as well as grows.
        c.file
            .setstat(ssh2::FileStat {
                size: Some(len),
                uid: None,
                gid: None,
                perm: None,
                atime: None,
                mtime: None,
            })
            .map_err(|e| BlockError::Io {
                errno: sftp_errno(&e.code()),
                context: format!("{}: resize to {len}: {}", self.cfg.uri(), e.message()),
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
    fn reopen(&self, read_only: bool) -> BlockResult<()> {
        // Requests are drained around a reopen: every session is idle.
        let mut p = self.pool();
        self.read_only.store(read_only, Ordering::Release);
        let flags = self.flags();
        for c in p.idle.iter_mut() {
            c.file = open_file(&c.sftp, &self.cfg, flags)?;
        }
        Ok(())
    }
    fn filename(&self) -> Option<String> {
        Some(self.cfg.uri())
    }
}

impl Drop for SshNode {
    fn drop(&mut self) {
        // Closing the handles and sessions waits for the server: bounded,
        // so that a hung server cannot hang the process's exit.
        for c in self.pool().idle.iter() {
            c.sess.set_timeout(CONNECT_TIMEOUT.as_millis() as u32);
        }
    }
}

/// A session taken from the pool, given back on drop.
struct Lease<'a> {
    node: &'a SshNode,
    conn: Option<Conn>,
}

impl std::ops::Deref for Lease<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn
            .as_ref()
            .expect("a lease holds its session until dropped")
    }
}

impl std::ops::DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .expect("a lease holds its session until dropped")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            self.node.pool().idle.push(c);
            self.node.freed.notify_one();
        }
    }
}

impl SshNode {
    fn fsync(&self, c: &mut Conn) -> BlockResult<()> {
        if self.no_fsync.load(Ordering::Relaxed) {
            return Ok(());
        }
        match c.file.fsync() {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.code(), ssh2::ErrorCode::SFTP(8)) => {
                // QEMU's behaviour: a server without fsync@openssh.com
                // cannot make data durable; say so once and go on.
                self.no_fsync.store(true, Ordering::Relaxed);
                log::warn!(
                    "{}: the ssh server does not support fsync; flushes do nothing",
                    self.cfg.uri()
                );
                Ok(())
            }
            Err(e) => Err(BlockError::Io {
                errno: sftp_errno(&e.code()),
                context: format!("{}: fsync: {}", self.cfg.uri(), e.message()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(uri: &str) -> Result<SshConfig, String> {
        let m = uri_options(uri)?;
        let mut o = Options::new("file", m);
        let _ = o.take_str("driver");
        let c = parse_options(&mut o).map_err(|e| e.to_string())?;
        o.finish().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn uris() {
        let c = opts("ssh://bob@host:2222/img.qcow2?host_key_check=no").unwrap();
        assert_eq!(
            c,
            SshConfig {
                host: "host".into(),
                port: 2222,
                path: "/img.qcow2".into(),
                user: "bob".into(),
                check: HostKeyCheck::None,
            }
        );
        assert_eq!(c.uri(), "ssh://bob@host:2222/img.qcow2");
        let c = opts("ssh://bob@[::1]/a").unwrap();
        assert_eq!((c.port, c.check.clone()), (22, HostKeyCheck::KnownHosts));
        assert_eq!(c.uri(), "ssh://bob@[::1]:22/a");
        let c = opts("ssh://u@h/a?host_key_check=yes").unwrap();
        assert_eq!(c.check, HostKeyCheck::KnownHosts);
        let c =
            opts("ssh://u@h/a?host_key_check=md5:00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff")
                .unwrap();
        assert!(matches!(c.check, HostKeyCheck::Hash(HashKind::Md5, _, ref b) if b[15] == 0xff));
        let sha = "ab".repeat(32);
        let c = opts(&format!("ssh://u@h/a?host_key_check=sha256:{sha}")).unwrap();
        assert!(matches!(c.check, HostKeyCheck::Hash(HashKind::Sha256, _, ref b) if b.len() == 32));
        for bad in [
            "ssh://u@h",
            "ssh://u@h/",
            "ssh:///path",
            "ssh://u@h/a?host_key_check=maybe",
            "ssh://u@h/a?host_key_check=sha1:0011",
            "ssh://u@h/a?host_key_check=crc:00",
            "ssh://u@h/a?other=1",
        ] {
            assert!(opts(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fingerprints() {
        assert_eq!(
            parse_fingerprint(HashKind::Sha1, &"0A".repeat(20)).unwrap(),
            vec![10; 20]
        );
        // The form ssh-keygen -l prints (43 base64 characters, no padding).
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode([7u8; 32]);
        assert_eq!(
            parse_fingerprint(HashKind::Sha256, &format!("SHA256:{b64}")).unwrap(),
            vec![7; 32]
        );
        assert!(parse_fingerprint(HashKind::Md5, &format!("SHA256:{b64}")).is_err());
        assert!(parse_fingerprint(HashKind::Md5, "").is_err());
        assert!(parse_fingerprint(HashKind::Md5, "zz").is_err());
        assert!(parse_fingerprint(HashKind::Md5, "0").is_err());
    }

    #[test]
    fn blockdev_options() {
        let mut m = Map::new();
        let s = |v: &str| Value::Str(v.into());
        let mut server = Map::new();
        server.insert("host".into(), s("h"));
        m.insert("server".into(), Value::Map(server));
        m.insert("path".into(), s("/p"));
        m.insert("user".into(), s("u"));
        let mut h = Map::new();
        h.insert("mode".into(), s("hash"));
        h.insert("type".into(), s("sha1"));
        h.insert("hash".into(), s(&"01".repeat(20)));
        m.insert("host-key-check".into(), Value::Map(h));
        let mut o = Options::new("blockdev", m.clone());
        let c = parse_options(&mut o).unwrap();
        assert!(matches!(c.check, HostKeyCheck::Hash(HashKind::Sha1, _, _)));
        // A hash mode without its hash is refused.
        let Value::Map(h) = m.get_mut("host-key-check").unwrap() else {
            panic!()
        };
        h.remove("hash");
        assert!(parse_options(&mut Options::new("blockdev", m)).is_err());
        // The legacy flat form.
        let mut m = Map::new();
        m.insert("host".into(), s("h"));
        m.insert("port".into(), s("2200"));
        m.insert("path".into(), s("/p"));
        m.insert("user".into(), s("u"));
        m.insert("host_key_check".into(), s("no"));
        let mut o = Options::new("drive", m);
        let c = parse_options(&mut o).unwrap();
        o.finish().unwrap();
        assert_eq!((c.port, c.check), (2200, HostKeyCheck::None));
    }
}
