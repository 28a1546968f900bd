//! NBD transports: TCP and unix sockets, either of them under TLS once
//! `NBD_OPT_STARTTLS` succeeded, behind one stream type, and the server
//! address as `-blockdev`'s `server.*` (QAPI `SocketAddress`) gives it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// `server.type=inet`.
    Inet {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// `server.type=unix`.
    Unix(String),
}

impl std::fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddr::Inet { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdAddr::Inet { host, port } => write!(f, "{host}:{port}"),
            NbdAddr::Unix(p) => write!(f, "{p}"),
        }
    }
}

/// A connected socket.
#[derive(Debug)]
pub enum Stream {
    /// TCP (Nagle off: requests are small and latency matters).
    Tcp(TcpStream),
    /// Unix domain socket.
    Unix(UnixStream),
    /// A TLS session over one of the above.
    Tls(super::tls::TlsStream),
}

impl Stream {
    /// Connect to `addr`, giving up after `timeout` per address.
    pub fn connect(addr: &NbdAddr, timeout: Duration) -> io::Result<Stream> {
        match addr {
            NbdAddr::Inet { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                for a in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
            NbdAddr::Unix(p) => UnixStream::connect(p).map(Stream::Unix),
        }
    }
    /// A second handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tls(s) => Stream::Tls(s.try_clone()?),
        })
    }
    /// Shut both directions down: blocked readers and writers return.
    pub fn shutdown(&self) {
        self.shutdown_how(Shutdown::Both);
    }
    /// Shut the receiving side down: a blocked reader sees end of file.
    pub fn shutdown_read(&self) {
        self.shutdown_how(Shutdown::Read);
    }
    fn shutdown_how(&self, how: Shutdown) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tls(s) => {
                s.socket().shutdown_how(how);
                Ok(())
            }
        };
    }
    /// End a TLS session politely (close_notify) before closing; nothing
    /// for a plain socket.
    pub fn close_notify(&self) {
        if let Stream::Tls(s) = self {
            s.close_notify();
        }
    }
    /// Whether TLS runs on this stream.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }
    /// The send timeout alone (`None`: block).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tls(s) => s.socket().set_write_timeout(t),
        }
    }
    /// Read/write timeouts (`None`: block).
    pub fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Tls(s) => s.socket().set_timeouts(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read_vectored(bufs),
            Stream::Unix(s) => s.read_vectored(bufs),
            Stream::Tls(s) => s.read_vectored(bufs),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tls(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Write every byte of `bufs` (the std `write_all_vectored` is unstable).
pub fn write_all_vectored<W: Write>(w: &mut W, bufs: &[&[u8]]) -> io::Result<()> {
    let mut idx = 0;
    let mut off = 0;
    while idx < bufs.len() {
        let slices: Vec<io::IoSlice<'_>> = std::iter::once(io::IoSlice::new(&bufs[idx][off..]))
            .chain(bufs[idx + 1..].iter().map(|b| io::IoSlice::new(b)))
            .collect();
        let mut n = match w.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while idx < bufs.len() && n >= bufs[idx].len() - off {
            n -= bufs[idx].len() - off;
            idx += 1;
            off = 0;
        }
        off += n;
    }
    Ok(())
}

/// Fill `iov` (a request's buffers, from position `pos` for `len` bytes)
/// from `r`.
pub fn read_into_iov<R: Read>(
    r: &mut R,
    iov: &mut [io::IoSliceMut<'_>],
    mut pos: usize,
    mut len: usize,
) -> io::Result<()> {
    for s in iov.iter_mut() {
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
    if len != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "data beyond the request's buffers",
        ));
    }
    Ok(())
}

/// Zero `len` bytes of `iov` from position `pos`.
pub fn zero_iov(iov: &mut [io::IoSliceMut<'_>], mut pos: usize, mut len: usize) {
    for s in iov.iter_mut() {
        if len == 0 {
            break;
        }
        if pos >= s.len() {
            pos -= s.len();
            continue;
        }
        let n = (s.len() - pos).min(len);
        s[pos..pos + n].fill(0);
        len -= n;
        pos = 0;
    }
}
