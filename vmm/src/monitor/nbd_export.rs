//! QMP's NBD server: `nbd-server-start`, `nbd-server-add` /
//! `block-export-add`, `nbd-server-remove` / `block-export-del`,
//! `nbd-server-stop` and `query-block-exports` (QAPI `block-export.json`).
//! Exports a running disk through the block layer's NBD server code
//! (`block::nbd::server`), as `strata-nbd` serves a file.
//!
//! An export has its own read-only (unless `writable`) backend on the
//! node, sharing everything, so the guest keeps writing while a client
//! reads (a backup pulled over NBD reads a disk that is not changing:
//! export a `blockdev-backup` target with `sync=none` for that).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use block::backend::{BackendConfig, BlockBackend};
use block::driver::Perms;
use block::nbd::server::{serve, Export};
use block::nbd::transport::Stream;
use block::node::Node;

/// The running server, if any.
#[derive(Default)]
pub struct NbdServerSlot(Mutex<Option<Server>>);

/// Exports by id, with their names.
type Exports = Arc<Mutex<BTreeMap<String, (String, Arc<Export>)>>>;

pub struct Server {
    exports: Exports,
    stop: Arc<std::sync::atomic::AtomicBool>,
    addr: Addr,
}

#[derive(Clone, Debug)]
pub enum Addr {
    Tcp(String, u16),
    Unix(String),
}

impl NbdServerSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Server>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `nbd-server-start`: listen on `addr`; each client is served on its
    /// own thread with the exports there are when it connects.
    pub fn start(
        &self,
        addr: Addr,
        tls: Option<Arc<block::nbd::tls::TlsServerConfig>>,
    ) -> Result<(), String> {
        let mut slot = self.lock();
        if slot.is_some() {
            return Err("NBD server already running".into());
        }
        let exports: Exports = Default::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        enum L {
            Tcp(std::net::TcpListener),
            Unix(std::os::unix::net::UnixListener),
        }
        let l = match &addr {
            Addr::Tcp(h, p) => L::Tcp(
                std::net::TcpListener::bind((h.as_str(), *p))
                    .map_err(|e| format!("Failed to bind socket to {h}:{p}: {e}"))?,
            ),
            Addr::Unix(p) => {
                let _ = std::fs::remove_file(p);
                L::Unix(
                    std::os::unix::net::UnixListener::bind(p)
                        .map_err(|e| format!("Failed to bind socket to {p}: {e}"))?,
                )
            }
        };
        let (ex, st) = (exports.clone(), stop.clone());
        std::thread::Builder::new()
            .name("nbd-server".into())
            .spawn(move || loop {
                let s = match &l {
                    L::Tcp(t) => t.accept().map(|(s, _)| {
                        let _ = s.set_nodelay(true);
                        Stream::Tcp(s)
                    }),
                    L::Unix(u) => u.accept().map(|(s, _)| Stream::Unix(s)),
                };
                if st.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                let Ok(s) = s else { continue };
                let list: Vec<Arc<Export>> = ex
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .map(|(_, e)| e.clone())
                    .collect();
                let tls = tls.clone();
                let _ = std::thread::Builder::new()
                    .name("nbd-client".into())
                    .spawn(move || {
                        let end = serve(s, &list, tls.as_ref());
                        log::debug!("nbd client: {end:?}");
                    });
            })
            .map_err(|e| e.to_string())?;
        *slot = Some(Server {
            exports,
            stop,
            addr,
        });
        Ok(())
    }

    /// `nbd-server-add` / `block-export-add`.
    pub fn add(
        &self,
        id: &str,
        name: &str,
        node: Arc<Node>,
        writable: bool,
        bitmap: Option<Arc<block::bitmap::DirtyBitmap>>,
    ) -> Result<(), String> {
        let slot = self.lock();
        let Some(srv) = slot.as_ref() else {
            return Err("NBD server not running".into());
        };
        let mut ex = srv.exports.lock().unwrap_or_else(|e| e.into_inner());
        if ex.contains_key(id) || ex.values().any(|(n, _)| n == name) {
            return Err(format!("Block export id '{id}' is already in use"));
        }
        let cfg = BackendConfig {
            read_only: !writable,
            shared: Perms::ALL,
            ..Default::default()
        };
        let blk = BlockBackend::new("", node, cfg).map_err(|e| e.to_string())?;
        ex.insert(
            id.to_string(),
            (
                name.to_string(),
                Arc::new(Export {
                    name: name.to_string(),
                    description: String::new(),
                    blk,
                    read_only: !writable,
                    trim: false,
                    multi_conn: !writable,
                    bitmaps: bitmap.into_iter().collect(),
                    allocation_depth: false,
                }),
            ),
        );
        Ok(())
    }

    /// `nbd-server-remove` (by export name) / `block-export-del` (by id).
    pub fn remove(&self, key: &str, by_name: bool) -> Result<(), String> {
        let slot = self.lock();
        let Some(srv) = slot.as_ref() else {
            return Err("NBD server not running".into());
        };
        let mut ex = srv.exports.lock().unwrap_or_else(|e| e.into_inner());
        let id = if by_name {
            ex.iter()
                .find(|(_, (n, _))| n == key)
                .map(|(i, _)| i.clone())
        } else {
            ex.contains_key(key).then(|| key.to_string())
        };
        match id {
            Some(i) => {
                ex.remove(&i);
                Ok(())
            }
            None if by_name => Err(format!("Export '{key}' is not found")),
            None => Err(format!("Export '{key}' is not found")),
        }
    }

    /// `nbd-server-stop`: no new clients; exports go.
    pub fn stop(&self) -> Result<(), String> {
        let Some(srv) = self.lock().take() else {
            return Err("NBD server not running".into());
        };
        srv.stop.store(true, std::sync::atomic::Ordering::Release);
        srv.exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        // Wake the accept so the listener thread sees the stop.
        match &srv.addr {
            Addr::Tcp(h, p) => {
                let _ = std::net::TcpStream::connect((h.as_str(), *p));
            }
            Addr::Unix(p) => {
                let _ = std::os::unix::net::UnixStream::connect(p);
                let _ = std::fs::remove_file(p);
            }
        }
        Ok(())
    }

    /// `query-block-exports`: (id, node-name).
    pub fn list(&self) -> Vec<(String, String)> {
        let slot = self.lock();
        let Some(srv) = slot.as_ref() else {
            return Vec::new();
        };
        let ex = srv.exports.lock().unwrap_or_else(|e| e.into_inner());
        ex.iter()
            .map(|(id, (_, e))| {
                (
                    id.clone(),
                    e.blk
                        .root()
                        .map(|n| n.name().to_string())
                        .unwrap_or_default(),
                )
            })
            .collect()
    }
}
