//! TLS for NBD (the NBD protocol's "TLS support" section): x509
//! credentials in QEMU's directory layout, turned into rustls
//! configurations, and [`TlsStream`], a TLS session that a reader thread
//! and writer threads share.
//!
//! The credentials directory holds `ca-cert.pem` (the authority peers are
//! checked against), `server-cert.pem`/`server-key.pem` (a server's
//! identity) and `client-cert.pem`/`client-key.pem` (a client's, optional
//! unless the server checks clients). `verify-peer=on` (the default, as in
//! QEMU) makes a server require a client certificate signed by the CA and a
//! client check the server's certificate against the CA and the host name;
//! `off` skips those checks.
//!
//! Crypto is rustls with the `ring` provider; TLS 1.2 and 1.3.

use super::transport::Stream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, ClientConnection, Connection, DigitallySignedStruct,
    RootCertStore, ServerConfig, ServerConnection, SignatureScheme,
};
use std::io::{self, IoSlice, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// A server's TLS configuration, as [`X509Creds::server_config`] builds it.
pub use rustls::ServerConfig as TlsServerConfig;

/// Which side of a connection credentials are for (`endpoint=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `endpoint=client` (QEMU's default).
    Client,
    /// `endpoint=server`.
    Server,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loaded `tls-creds-x509` credentials.
pub struct X509Creds {
    /// The object's id (for messages).
    pub id: String,
    /// Client or server.
    pub endpoint: Endpoint,
    /// Check the peer's certificate.
    pub verify_peer: bool,
    /// The directory (for messages).
    pub dir: PathBuf,
    /// A server's configuration, built once.
    server: Option<Arc<ServerConfig>>,
    /// A client's trust anchors (when verifying the server).
    roots: Option<Arc<RootCertStore>>,
    /// A client's own certificate chain and key, when the directory has one.
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
}

impl std::fmt::Debug for X509Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "X509Creds({}, {:?}, verify-peer={})",
            self.id, self.endpoint, self.verify_peer
        )
    }
}

fn read_file(p: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("cannot read '{}': {e}", p.display()))
}

fn certs(p: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let data = read_file(p)?;
    let v: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("'{}': {e}", p.display()))?;
    if v.is_empty() {
        return Err(format!("'{}' holds no PEM certificate", p.display()));
    }
    Ok(v)
}

/// PEM markers of an encrypted PKCS#8 key (RFC 5958 `EncryptedPrivateKeyInfo`).
const ENCRYPTED_BEGIN: &str = "-----BEGIN ENCRYPTED PRIVATE KEY-----";
const ENCRYPTED_END: &str = "-----END ENCRYPTED PRIVATE KEY-----";

/// A private key: plain PEM (PKCS#1, SEC1, PKCS#8), or PKCS#8 encrypted
/// with PBES2 (what `openssl genpkey -aes-256-cbc`, `openssl pkcs8 -topk8`
/// and `certtool --pkcs8` write, and GnuTLS reads for QEMU's
/// `passwordid=`), decrypted with `password`.
fn key(p: &Path, password: Option<&[u8]>) -> Result<PrivateKeyDer<'static>, String> {
    let data = read_file(p)?;
    let text = String::from_utf8_lossy(&data);
    if let Some(at) = text.find(ENCRYPTED_BEGIN) {
        let Some(password) = password else {
            return Err(format!(
                "'{}' is encrypted and no passwordid= is given",
                p.display()
            ));
        };
        return decrypt_key(p, &text[at..], password);
    }
    // rustls reads only unencrypted keys; an OpenSSL-style encrypted PEM
    // would otherwise be reported as "no key found".
    if text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(format!(
            "'{}' uses OpenSSL's legacy PEM encryption, which is not supported; convert it to encrypted PKCS#8 (openssl pkcs8 -topk8 -v2 aes-256-cbc)",
            p.display()
        ));
    }
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| format!("'{}': {e}", p.display()))
}

/// Decrypt the encrypted PKCS#8 key at the start of `pem`.
fn decrypt_key(p: &Path, pem: &str, password: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    use pkcs8::der::Decode;
    let bad = |what: &str| format!("'{}': {what}", p.display());
    let end = pem
        .find(ENCRYPTED_END)
        .ok_or_else(|| bad("the encrypted key has no END line"))?;
    let block = &pem[..end + ENCRYPTED_END.len()];
    let (_, doc) = pkcs8::der::Document::from_pem(block)
        .map_err(|e| bad(&format!("not a valid encrypted key: {e}")))?;
    let info = pkcs8::EncryptedPrivateKeyInfoRef::from_der(doc.as_bytes())
        .map_err(|e| bad(&format!("not a valid encrypted key: {e}")))?;
    // A wrong password almost always breaks the padding; the rare one that
    // does not yields bytes that are not a key, checked below.
    let wrong = || bad("cannot decrypt the key: wrong password (passwordid=) or damaged key");
    let plain = info.decrypt(password).map_err(|e| match e {
        pkcs8::Error::EncryptedPrivateKey(pkcs8::pkcs5::Error::DecryptFailed) => wrong(),
        e => bad(&format!("cannot decrypt the key: {e}")),
    })?;
    pkcs8::PrivateKeyInfoRef::from_der(plain.as_bytes()).map_err(|_| wrong())?;
    Ok(PrivateKeyDer::Pkcs8(plain.as_bytes().to_vec().into()))
}

fn roots(p: &Path) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for c in certs(p)? {
        store
            .add(c)
            .map_err(|e| format!("'{}': not a usable CA certificate: {e}", p.display()))?;
    }
    Ok(store)
}

impl X509Creds {
    /// Load the files of `dir` that `endpoint` needs. `password` (from
    /// `passwordid=`) decrypts an encrypted PKCS#8 key.
    pub fn load(
        id: &str,
        dir: &Path,
        endpoint: Endpoint,
        verify_peer: bool,
        password: Option<&[u8]>,
    ) -> Result<X509Creds, String> {
        let f = |name: &str| -> PathBuf { dir.join(name) };
        let p = provider();
        let mut creds = X509Creds {
            id: id.to_string(),
            endpoint,
            verify_peer,
            dir: dir.to_path_buf(),
            server: None,
            roots: None,
            client_cert: None,
        };
        match endpoint {
            Endpoint::Server => {
                let chain = certs(&f("server-cert.pem"))?;
                let k = key(&f("server-key.pem"), password)?;
                let verifier = if verify_peer {
                    WebPkiClientVerifier::builder_with_provider(
                        Arc::new(roots(&f("ca-cert.pem"))?),
                        p.clone(),
                    )
                    .build()
                    .map_err(|e| format!("ca-cert.pem: {e}"))?
                } else {
                    WebPkiClientVerifier::no_client_auth()
                };
                let cfg = ServerConfig::builder_with_provider(p)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_client_cert_verifier(verifier)
                    .with_single_cert(chain, k)
                    .map_err(|e| format!("server-cert.pem and server-key.pem: {e}"))?;
                creds.server = Some(Arc::new(cfg));
            }
            Endpoint::Client => {
                if verify_peer {
                    creds.roots = Some(Arc::new(roots(&f("ca-cert.pem"))?));
                }
                // Optional, as in QEMU: only servers that check clients
                // need it.
                let (cp, kp) = (f("client-cert.pem"), f("client-key.pem"));
                if cp.exists() && kp.exists() {
                    creds.client_cert = Some((certs(&cp)?, key(&kp, password)?));
                }
                // Built once here so a bad key is reported at start-up.
                creds.client_config()?;
            }
        }
        Ok(creds)
    }

    /// A client must know the server's host name to check its certificate
    /// (QEMU refuses a unix socket without `tls-hostname` too).
    pub fn needs_hostname(&self) -> bool {
        self.endpoint == Endpoint::Client && self.verify_peer
    }

    /// The server configuration (server credentials only).
    pub fn server_config(&self) -> Option<Arc<ServerConfig>> {
        self.server.clone()
    }

    /// A client configuration.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, String> {
        let p = provider();
        let verifier: Arc<dyn ServerCertVerifier> = match &self.roots {
            Some(r) => WebPkiServerVerifier::builder_with_provider(r.clone(), p.clone())
                .build()
                .map_err(|e| format!("ca-cert.pem: {e}"))?,
            None => Arc::new(NoVerifier(p.signature_verification_algorithms)),
        };
        let b = ClientConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut cfg = match &self.client_cert {
            Some((chain, k)) => b
                .with_client_auth_cert(chain.clone(), k.clone_key())
                .map_err(|e| format!("client-cert.pem and client-key.pem: {e}"))?,
            None => b.with_no_client_auth(),
        };
        // An IP address is never sent; a name is, as QEMU does.
        cfg.enable_sni = true;
        Ok(Arc::new(cfg))
    }
}

/// `verify-peer=off` on a client: any certificate is accepted, but the
/// handshake's signatures are still checked (the session is encrypted to
/// whoever holds the key of the certificate shown).
#[derive(Debug)]
struct NoVerifier(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The session state shared by every handle on a connection.
struct Session {
    conn: Connection,
    /// Bytes read from the socket that rustls has not taken yet.
    raw: Vec<u8>,
    raw_pos: usize,
    /// The socket reached end of file.
    eof: bool,
}

struct Shared {
    session: Mutex<Session>,
    /// Held while encrypting and sending, so records reach the socket in
    /// the order of their sequence numbers; taken before `session`.
    send: Mutex<()>,
}

/// A TLS session over a TCP or unix socket.
///
/// Handles made by [`TlsStream::try_clone`] share the session, so one
/// thread may read while others write, as with a plain socket: reading
/// waits on the socket without holding the session lock, and writing
/// encrypts under the lock but sends after releasing it (a writer stuck on
/// a full socket never stops the reader). Only one thread may read at a
/// time (the NBD client and server each have one reader per connection).
pub struct TlsStream {
    sock: Box<Stream>,
    sh: Arc<Shared>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsStream({:?})", self.sock)
    }
}

/// Run the TLS handshake on `sock` (already in the NBD option phase, right
/// after `NBD_REP_ACK` to `NBD_OPT_STARTTLS`).
fn handshake(mut sock: Stream, mut conn: Connection) -> io::Result<TlsStream> {
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    // Anything left to send (a TLS 1.3 server's session tickets) goes now.
    while conn.wants_write() {
        conn.write_tls(&mut sock)?;
    }
    // Replies of up to 32 MiB are encrypted at once: no cap on buffered
    // plaintext (each sender's data is bounded by the NBD layer above).
    conn.set_buffer_limit(None);
    Ok(TlsStream {
        sock: Box::new(sock),
        sh: Arc::new(Shared {
            session: Mutex::new(Session {
                conn,
                raw: Vec::new(),
                raw_pos: 0,
                eof: false,
            }),
            send: Mutex::new(()),
        }),
        buf: Vec::new(),
    })
}

/// rustls words a lost connection with a link to its manual; the NBD
/// layers above only need to know the connection ended.
fn plain_eof(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the connection",
        )
    } else {
        e
    }
}

/// The server side of the handshake.
pub fn accept(sock: Stream, cfg: Arc<ServerConfig>) -> io::Result<Stream> {
    let conn = ServerConnection::new(cfg).map_err(tls_err)?;
    handshake(sock, conn.into())
        .map(Stream::Tls)
        .map_err(plain_eof)
}

/// The client side of the handshake; `hostname` is checked against the
/// server's certificate (it may be `None` only with `verify-peer=off`, see
/// [`X509Creds::needs_hostname`]).
pub fn connect(sock: Stream, creds: &X509Creds, hostname: Option<&str>) -> io::Result<Stream> {
    let cfg = creds
        .client_config()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let name = match hostname {
        Some(h) => ServerName::try_from(h.to_string()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("'{h}' is not a valid TLS host name"),
            )
        })?,
        // Nothing is checked (verify-peer=off): any name will do.
        None => ServerName::try_from("localhost")
            .map_err(|e| tls_err(rustls::Error::General(e.to_string())))?,
    };
    let conn = ClientConnection::new(cfg, name).map_err(tls_err)?;
    handshake(sock, conn.into())
        .map(Stream::Tls)
        .map_err(|e| explain(e, creds))
}

/// Say what a failed certificate check means for the user's files.
fn explain(e: io::Error, creds: &X509Creds) -> io::Error {
    let Some(t) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e;
    };
    let ca = creds.dir.join("ca-cert.pem");
    let msg = match t {
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => format!(
            "the peer's certificate is not signed by the CA of '{}'",
            ca.display()
        ),
        rustls::Error::InvalidCertificate(CertificateError::Expired) => {
            "the peer's certificate has expired".to_string()
        }
        other => other.to_string(),
    };
    io::Error::new(e.kind(), msg)
}

impl TlsStream {
    /// Another handle on the same session.
    pub fn try_clone(&self) -> io::Result<TlsStream> {
        Ok(TlsStream {
            sock: Box::new(self.sock.try_clone()?),
            sh: self.sh.clone(),
            buf: Vec::new(),
        })
    }

    /// The socket below.
    pub fn socket(&self) -> &Stream {
        &self.sock
    }

    /// Send a TLS close_notify (best effort; before closing cleanly).
    pub fn close_notify(&self) {
        let Ok(_send) = self.sh.send.try_lock() else {
            // A writer is stuck on the socket: closing will do.
            return;
        };
        let mut out = Vec::new();
        {
            let mut s = lock(&self.sh.session);
            s.conn.send_close_notify();
            while s.conn.wants_write() {
                if s.conn.write_tls(&mut out).is_err() {
                    break;
                }
            }
        }
        let mut w = match self.sock.try_clone() {
            Ok(w) => w,
            Err(_) => return,
        };
        let _ = w.write_all(&out);
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut g = lock(&self.sh.session);
                match g.conn.reader().read(buf) {
                    // 0: the peer sent close_notify.
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(plain_eof(e)),
                }
                let s = &mut *g;
                if s.raw_pos < s.raw.len() || s.eof {
                    let mut rest = &s.raw[s.raw_pos..];
                    let n = s.conn.read_tls(&mut rest)?;
                    s.raw_pos += n;
                    if n == 0 && !s.eof {
                        // rustls takes no more until its plaintext is read,
                        // which the read above did: cannot happen twice.
                        return Err(io::Error::other("TLS receive buffer stuck"));
                    }
                    s.conn.process_new_packets().map_err(tls_err)?;
                    if s.eof && s.raw_pos >= s.raw.len() {
                        // No more will come: the reader reports EOF (or
                        // the truncation) on the next turn.
                        match s.conn.reader().read(buf) {
                            Ok(n) => return Ok(n),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                return Err(plain_eof(io::ErrorKind::UnexpectedEof.into()))
                            }
                            Err(e) => return Err(plain_eof(e)),
                        }
                    }
                    continue;
                }
            }
            // Wait for the socket without holding the session.
            self.buf.resize(32 << 10, 0);
            let n = match self.sock.read(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut g = lock(&self.sh.session);
            let s = &mut *g;
            if s.raw_pos >= s.raw.len() {
                s.raw.clear();
                s.raw_pos = 0;
            }
            if n == 0 {
                s.eof = true;
            }
            s.raw.extend_from_slice(&self.buf[..n]);
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let _send = lock(&self.sh.send);
        let mut out = Vec::new();
        let n = {
            let mut s = lock(&self.sh.session);
            let n = s.conn.writer().write_vectored(bufs)?;
            while s.conn.wants_write() {
                s.conn.write_tls(&mut out)?;
            }
            n
        };
        self.sock.write_all(&out)?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
