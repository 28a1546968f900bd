//! Listening, clients and shutdown for `strata-nbd`.
//!
//! One thread per client runs `block::nbd::server::serve`. `-e N` caps the
//! clients served at once: further connections wait in the listen backlog
//! until one leaves, as with qemu-nbd. Without `-t` the server exits when
//! its last client leaves. SIGTERM, SIGINT and SIGHUP stop accepting, let
//! the clients' requests in flight finish and reply, flush the image and
//! exit 0. `--fork` runs the server as a child in its own process group and
//! returns once it listens (or with its error).

use super::{open_export, Fail, Settings, R};
use block::graph::BlockGraph;
use block::nbd::server::{self, Export};
use block::nbd::tls::TlsServerConfig;
use block::nbd::transport::Stream;
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Where to listen.
pub enum Addr {
    /// `-b ADDR -p PORT`.
    Tcp(String, u16),
    /// `-k PATH`.
    Unix(String),
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn accept(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
        })
    }
}

/// The environment variable that marks the `--fork` child.
const CHILD_ENV: &str = "STRATA_NBD_FORKED_CHILD";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct Clients {
    active: usize,
    next: u64,
    /// A handle on each client's socket, to end it at shutdown.
    streams: HashMap<u64, Stream>,
}

struct Server {
    /// Taken (and closed) at shutdown.
    exports: Mutex<Vec<Arc<Export>>>,
    /// The images' nodes, closed at shutdown.
    graph: BlockGraph,
    clients: Mutex<Clients>,
    cv: Condvar,
    stopping: AtomicBool,
    persistent: bool,
    cleanup: Vec<String>,
    /// `--tls-creds`: clients must start TLS.
    tls: Option<Arc<TlsServerConfig>>,
}

impl Server {
    /// Stop: end every client's input, let requests in flight reply, flush
    /// the image, remove the socket and pid files, exit 0. Only the first
    /// caller does it; others return.
    fn shutdown(&self) {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        {
            let mut g = lock(&self.clients);
            for s in g.streams.values() {
                s.shutdown_read();
            }
            // Clients finish their requests in flight, then leave.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while g.active > 0 && std::time::Instant::now() < deadline {
                g = self
                    .cv
                    .wait_timeout(g, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        let mut code = 0;
        let exports = std::mem::take(&mut *lock(&self.exports));
        for e in &exports {
            if let Err(err) = e.blk.flush() {
                log::error!("flush failed: {err}");
                code = 1;
            }
        }
        // Close the images, even if a client thread still holds its
        // export: metadata written back, persistent bitmaps (`-B`) stored.
        drop(exports);
        self.graph.close_all();
        for f in &self.cleanup {
            let _ = std::fs::remove_file(f);
        }
        std::process::exit(code);
    }

    /// Count a new client in (refused once stopping); its id.
    fn admit(&self, s: &Stream) -> Option<u64> {
        let mut g = lock(&self.clients);
        if self.stopping.load(Ordering::Acquire) {
            return None;
        }
        g.next += 1;
        let id = g.next;
        if let Ok(c) = s.try_clone() {
            g.streams.insert(id, c);
        }
        g.active += 1;
        Some(id)
    }

    fn client(self: &Arc<Self>, id: u64, s: Stream) {
        let exports = lock(&self.exports).clone();
        let end = server::serve(s, &exports, self.tls.as_ref());
        drop(exports);
        match end {
            server::End::Clean => log::info!("client {id} disconnected"),
            e => log::warn!("client {id}: {e}"),
        }
        let last = {
            let mut g = lock(&self.clients);
            g.streams.remove(&id);
            g.active -= 1;
            self.cv.notify_all();
            g.active == 0
        };
        if last && !self.persistent {
            self.shutdown();
        }
    }
}

fn bind(addr: &Addr) -> R<Listener> {
    match addr {
        Addr::Unix(p) => {
            // A socket left by a server that died is replaced, as qemu-nbd
            // does; anything else at that path is left alone (bind fails).
            use std::os::unix::fs::FileTypeExt;
            if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(p);
            }
            UnixListener::bind(p)
                .map(Listener::Unix)
                .map_err(|e| Fail(format!("Failed to bind socket '{p}': {e}")))
        }
        Addr::Tcp(host, port) => {
            let h = host.trim_start_matches('[').trim_end_matches(']');
            TcpListener::bind((h, *port))
                .map(Listener::Tcp)
                .map_err(|e| Fail(format!("Failed to bind socket '{host}:{port}': {e}")))
        }
    }
}

/// `--fork`: run the server as a child and return once it is ready. The
/// child's stderr comes through this process until then (its startup
/// errors reach the user); afterwards the pipe is closed and the child's
/// log writes fail quietly, so no caller waits on an inherited descriptor.
fn fork_child() -> R<()> {
    let exe = std::env::current_exe().map_err(|e| Fail(format!("--fork: {e}")))?;
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--fork").collect();
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new(exe)
            .args(args)
            .env(CHILD_ENV, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: the terminal's signals do not reach it.
            .process_group(0)
            .spawn()
            .map_err(|e| Fail(format!("--fork: {e}")))?
    };
    let relay = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut e, &mut std::io::stderr());
        })
    });
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = std::io::BufReader::new(out).read_line(&mut line);
    }
    if line.trim() == "ready" {
        return Ok(());
    }
    // The child printed its error; pass its exit code on.
    let code = child.wait().ok().and_then(|s| s.code()).unwrap_or(1);
    if let Some(r) = relay {
        let _ = r.join();
    }
    std::process::exit(code.max(1));
}

/// Serve until told to stop.
pub fn run(s: Settings) -> R<()> {
    if s.cli.fork && std::env::var_os(CHILD_ENV).is_none() {
        return fork_child();
    }
    // Signals are routed to one thread before any other thread starts.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(|e| Fail(format!("cannot handle signals: {e}")))?;
    let graph = BlockGraph::new();
    let export = Arc::new(open_export(&s, &graph)?);
    let listener = bind(&s.listen)?;
    let mut cleanup = Vec::new();
    if let Addr::Unix(p) = &s.listen {
        cleanup.push(p.clone());
    }
    if let Some(p) = &s.cli.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| Fail(format!("Failed to write pid file '{p}': {e}")))?;
        cleanup.push(p.clone());
    }
    let srv = Arc::new(Server {
        exports: Mutex::new(vec![export]),
        graph,
        clients: Mutex::new(Clients::default()),
        cv: Condvar::new(),
        stopping: AtomicBool::new(false),
        persistent: s.cli.persistent,
        cleanup,
        tls: s.tls.clone(),
    });
    {
        let srv = srv.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if signals.forever().next().is_some() {
                    srv.shutdown();
                }
            })
            .map_err(|e| Fail(format!("cannot start a thread: {e}")))?;
    }
    if std::env::var_os(CHILD_ENV).is_some() {
        // Tell the parent we are ready; stdout is not used afterwards.
        let mut out = std::io::stdout();
        let _ = writeln!(out, "ready");
        let _ = out.flush();
    }
    let shared = s.shared;
    loop {
        {
            let mut g = lock(&srv.clients);
            while shared != 0 && g.active >= shared {
                g = srv.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            if srv.stopping.load(Ordering::Acquire) {
                // The stopping thread exits the process.
                drop(g);
                loop {
                    std::thread::park();
                }
            }
        }
        let stream = match listener.accept() {
            Ok(st) => st,
            Err(e) => {
                log::warn!("accept: {e}");
                // EMFILE and friends: do not spin.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let Some(id) = srv.admit(&stream) else {
            continue;
        };
        let me = srv.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-client".into())
            .spawn(move || me.client(id, stream));
        if let Err(e) = spawned {
            let mut g = lock(&srv.clients);
            g.active -= 1;
            g.streams.remove(&id);
            log::warn!("cannot start a client thread: {e}");
        }
    }
}
