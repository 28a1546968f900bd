//! `strata-nbd`: serve an image as an NBD export, with qemu-nbd's command
//! line (QEMU's `docs/tools/qemu-nbd.rst`): `-f`, `-r`, `-x`, `-p`, `-b`,
//! `-k`, `-t`, `-e`, `-s`, `-l` (an internal snapshot, read-only), `-A`
//! (the `qemu:allocation-depth` context), `-B` (a persistent bitmap as
//! `qemu:dirty-bitmap:NAME`), `--cache`, `--aio`, `--discard`,
//! `--detect-zeroes`, `-D`, `--pid-file`, `--fork`, `--image-opts`,
//! `--object` (`secret`, `tls-creds-x509`, `iothread`) and `--tls-creds`
//! (clients must then start TLS, with the credentials' server certificate).
//!
//! The image is opened through the block graph and attached like
//! qemu-nbd's export (consistent read, plus write unless `-r`; sharing
//! everything), so the image locks, and who is refused, match qemu-nbd.
//! The protocol is `block::nbd::server`; this module only listens,
//! counts clients (`-e`, `-t`) and shuts down.
//!
//! Errors are one line on stderr, `strata-nbd: <message>`, exit code 1.

mod listen;

use block::backend::{BackendConfig, BlockBackend};
use block::driver::Perms;
use block::graph::BlockGraph;
use block::keyval::{self, Options, Value};
use block::nbd::server::Export;
use clap::Parser;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(
    name = "strata-nbd",
    version,
    about = "Serve a disk image over NBD (qemu-nbd compatible)"
)]
pub struct Cli {
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Export read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Export name.
    #[arg(short = 'x', long = "export-name", default_value = "")]
    export_name: String,
    /// Export description.
    #[arg(short = 'D', long = "description", default_value = "")]
    description: String,
    /// TCP port to listen on.
    #[arg(short = 'p', long = "port")]
    port: Option<String>,
    /// Address to bind.
    #[arg(short = 'b', long = "bind")]
    bind: Option<String>,
    /// Unix socket to listen on (instead of TCP).
    #[arg(short = 'k', long = "socket")]
    socket: Option<String>,
    /// Keep serving after the last client leaves.
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// How many clients at once (0: no limit).
    #[arg(short = 'e', long = "shared", default_value = "1")]
    shared: String,
    /// Serve a temporary overlay; the image is not changed.
    #[arg(short = 's', long = "snapshot")]
    snapshot: bool,
    /// Serve an internal snapshot (implies -r): snapshot.id=ID[,snapshot.name=NAME],
    /// snapshot.name=NAME, or a bare ID or name.
    #[arg(short = 'l', long = "load-snapshot", value_name = "SNAPSHOT_PARAM")]
    load_snapshot: Option<String>,
    /// Offer the qemu:allocation-depth metadata context (the backing chain
    /// layer each range comes from).
    #[arg(short = 'A', long = "allocation-depth")]
    allocation_depth: bool,
    /// Offer the image's persistent dirty bitmap NAME as the
    /// qemu:dirty-bitmap:NAME metadata context (repeatable).
    #[arg(short = 'B', long = "bitmap", value_name = "NAME")]
    bitmap: Vec<String>,
    /// Cache mode (none, writeback, writethrough, directsync, unsafe).
    #[arg(long = "cache")]
    cache: Option<String>,
    /// I/O engine (threads, native, io_uring).
    #[arg(long = "aio")]
    aio: Option<String>,
    /// Discard requests: ignore or unmap.
    #[arg(long = "discard")]
    discard: Option<String>,
    /// Detect zero writes: off, on, unmap.
    #[arg(long = "detect-zeroes")]
    detect_zeroes: Option<String>,
    /// Write the process id here.
    #[arg(long = "pid-file")]
    pid_file: Option<String>,
    /// Go to the background once the export is ready.
    #[arg(long = "fork")]
    fork: bool,
    /// FILENAME is a set of block node options, not a file name.
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// QEMU objects (iothread, secret, tls-creds-x509; its passwordid=SECRET
    /// decrypts an encrypted PKCS#8 key).
    #[arg(long = "object")]
    object: Vec<String>,
    /// Require TLS with these credentials (a tls-creds-x509 object).
    #[arg(long = "tls-creds")]
    tls_creds: Option<String>,
    /// Host name checked in a server's certificate (NBD client only).
    #[arg(long = "tls-hostname")]
    tls_hostname: Option<String>,
    /// Authorization of TLS clients by name (not supported).
    #[arg(long = "tls-authz")]
    tls_authz: Option<String>,
    /// The image.
    filename: String,
}

/// A user-facing failure.
pub struct Fail(pub String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(e.to_string())
    }
}

pub type R<T> = Result<T, Fail>;

fn fail<T>(m: impl Into<String>) -> R<T> {
    Err(Fail(m.into()))
}

/// The `-f`/`--cache`/... options checked, before anything is opened.
pub struct Settings {
    pub cli: Cli,
    /// (cache.direct, cache.no-flush, write cache).
    pub cache: (bool, bool, bool),
    pub shared: usize,
    pub listen: listen::Addr,
    /// `--tls-creds`.
    pub tls: Option<std::sync::Arc<block::nbd::tls::TlsServerConfig>>,
    /// `-l`: the node options that load the snapshot, and the option as
    /// written (for messages).
    pub load_snapshot: Option<(Vec<(String, String)>, String)>,
    /// `-B`: each bitmap's name and the option as written.
    pub bitmaps: Vec<(String, String)>,
}

/// How the user wrote the option `-short`/`--long` with `value`, for
/// messages: `-l snap1` or `--load-snapshot=snap1` (the short form when
/// it cannot be told, e.g. inside a cluster of short flags).
fn spelled(args: &[String], short: char, long: &str, value: &str) -> String {
    let (s, l) = (format!("-{short}"), format!("--{long}"));
    let mut it = args.iter().skip(1).peekable();
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        let next_is_value = it.peek().is_some_and(|n| *n == value);
        if (*a == l && next_is_value) || *a == format!("{l}={value}") {
            return format!("{l}={value}");
        }
    }
    format!("{s} {value}")
}

fn check(mut cli: Cli, args: &[String]) -> R<Settings> {
    let cache = match cli.cache.as_deref().unwrap_or("writeback") {
        "writeback" => (false, false, true),
        "none" | "off" => (true, false, true),
        "writethrough" => (false, false, false),
        "directsync" => (true, false, false),
        "unsafe" => (false, true, true),
        m => return fail(format!("Invalid cache mode '{m}'")),
    };
    if let Some(a) = cli.aio.as_deref() {
        if !matches!(a, "threads" | "native" | "io_uring") {
            return fail(format!("Invalid aio mode '{a}'"));
        }
    }
    if let Some(d) = cli.discard.as_deref() {
        if !matches!(d, "ignore" | "off" | "unmap" | "on") {
            return fail(format!("Invalid discard mode '{d}'"));
        }
    }
    if let Some(d) = cli.detect_zeroes.as_deref() {
        if !matches!(d, "off" | "on" | "unmap") {
            return fail(format!("Invalid detect-zeroes mode '{d}'"));
        }
        let unmap = matches!(cli.discard.as_deref(), Some("unmap" | "on"));
        if d == "unmap" && !unmap {
            return fail("--detect-zeroes=unmap is only allowed with --discard=unmap");
        }
    }
    let shared = cli
        .shared
        .parse::<usize>()
        .map_err(|_| Fail(format!("Invalid shared device number '{}'", cli.shared)))?;
    if cli.image_opts && cli.format.is_some() {
        return fail("--image-opts and -f are mutually exclusive");
    }
    if cli.snapshot && cli.read_only {
        // qemu-nbd allows it, but a read-only overlay is pointless: keep it
        // simple and serve the overlay read-only too.
    }
    let load_snapshot = match &cli.load_snapshot {
        None => None,
        Some(p) => {
            let opt = spelled(args, 'l', "load-snapshot", p);
            let o = cli::snapshot_param::node_options(&opt, p)
                .map_err(|e| Fail(format!("{opt}: {e}")))?;
            // An internal snapshot is only ever served read-only, as
            // qemu-nbd's -l implies -r.
            cli.read_only = true;
            Some((o, opt))
        }
    };
    let bitmaps = cli
        .bitmap
        .iter()
        .map(|b| (b.clone(), spelled(args, 'B', "bitmap", b)))
        .collect();
    for o in &cli.object {
        block::objects::add_str("--object", o)?;
    }
    if cli.tls_hostname.is_some() {
        return fail("--tls-hostname is only for an NBD client, and strata-nbd only serves");
    }
    if let Some(a) = &cli.tls_authz {
        return fail(format!(
            "--tls-authz={a}: authorization objects are not supported"
        ));
    }
    let tls = match &cli.tls_creds {
        None => None,
        Some(id) => {
            let c = block::objects::tls_creds(id, block::nbd::tls::Endpoint::Server)
                .map_err(|e| Fail(format!("--tls-creds={id}: {e}")))?;
            c.server_config()
        }
    };
    let listen = match (&cli.socket, &cli.port, &cli.bind) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return fail("-k and -p/-b are mutually exclusive")
        }
        (Some(k), None, None) => listen::Addr::Unix(k.clone()),
        (None, port, bind) => {
            let port = match port {
                None => 10809,
                Some(p) => p
                    .parse::<u16>()
                    .map_err(|_| Fail(format!("Invalid port '{p}'")))?,
            };
            listen::Addr::Tcp(bind.clone().unwrap_or_else(|| "0.0.0.0".into()), port)
        }
    };
    Ok(Settings {
        cli,
        cache,
        shared,
        listen,
        tls,
        load_snapshot,
        bitmaps,
    })
}

/// An open failure in one line that names the image as written.
fn open_fail(name: &str, e: block::error::BlockError) -> Fail {
    let m = e.to_string();
    if m.contains(name) {
        Fail(m)
    } else {
        Fail(format!("Failed to open '{name}': {m}"))
    }
}

fn on(b: bool) -> String {
    if b { "on" } else { "off" }.to_string()
}

/// Open the image and attach the export's backend.
pub fn open_export(s: &Settings, graph: &BlockGraph) -> R<Export> {
    let cli = &s.cli;
    let (direct, no_flush, wce) = s.cache;
    let mut extra: Vec<(String, String)> = vec![
        ("cache.direct".into(), on(direct)),
        ("cache.no-flush".into(), on(no_flush)),
    ];
    if let Some(d) = &cli.discard {
        extra.push(("discard".into(), d.clone()));
    }
    if let Some(d) = &cli.detect_zeroes {
        extra.push(("detect-zeroes".into(), d.clone()));
    }
    // The image itself is only read when a snapshot overlay takes writes.
    let ro = cli.read_only || cli.snapshot;
    let name = &cli.filename;
    if let Some((o, _)) = &s.load_snapshot {
        extra.extend(o.iter().cloned());
    }
    let node = if cli.image_opts {
        let mut map = keyval::parse("image options", name, None)?;
        keyval::merge_pairs(&mut map, "image options", &extra)?;
        if ro {
            map.insert("read-only".into(), Value::Str("on".into()));
        }
        let probe = !map.contains_key("driver");
        graph
            .open_options(Options::new("image options", map), None, probe)
            .map_err(|e| snapshot_fail(s, name, e))?
    } else {
        if let Some(a) = &cli.aio {
            if !block::nbd::uri::is_nbd(name) {
                extra.push(("file.aio".into(), a.clone()));
            }
        }
        let refs: Vec<(&str, &str)> = extra
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        graph
            .open_image(name, cli.format.as_deref(), ro, &refs)
            .map_err(|e| snapshot_fail(s, name, e))?
    };
    let _ = graph.take_warnings();
    let node = if cli.snapshot {
        let cache = keyval::parse(
            "cache",
            &format!("direct={},no-flush={}", on(direct), on(no_flush)),
            None,
        )?;
        block::snapshot_overlay::open_temp_overlay(graph, &node, Some(Value::Map(cache)))
            .map_err(|e| open_fail(name, e))?
    } else {
        node
    };
    let bitmaps = s
        .bitmaps
        .iter()
        .map(|(b, opt)| find_bitmap(&node, b).map_err(|Fail(e)| Fail(format!("{opt}: {e}"))))
        .collect::<R<Vec<_>>>()?;
    let read_only = cli.read_only;
    let cfg = BackendConfig {
        read_only,
        write_cache: wce,
        // qemu-nbd's export shares everything; a format's metadata child
        // refuses other writers by itself.
        shared: Perms::ALL,
        ..Default::default()
    };
    let trim = node.common().discard_unmap;
    let blk = BlockBackend::new("export", node, cfg).map_err(|e| open_fail(name, e))?;
    Ok(Export {
        name: cli.export_name.clone(),
        description: cli.description.clone(),
        blk,
        read_only,
        trim,
        multi_conn: read_only || s.shared != 1,
        bitmaps,
        allocation_depth: cli.allocation_depth,
    })
}

/// An open failure; with `-l`, a failure to find or load the snapshot
/// names that option.
fn snapshot_fail(s: &Settings, name: &str, e: block::error::BlockError) -> Fail {
    let Some((_, opt)) = &s.load_snapshot else {
        return open_fail(name, e);
    };
    let m = e.to_string();
    if m.contains("x-load-snapshot") && m.contains("doesn't support") {
        // The format has no internal snapshots (raw, ...).
        return Fail(format!(
            "{opt}: Failed to load snapshot: the format of '{name}' has no internal snapshots"
        ));
    }
    if m.contains("snapshot") {
        return Fail(format!("{opt}: Failed to load snapshot: {m}"));
    }
    open_fail(name, e)
}

/// The persistent bitmap `name` of the export's node or of an image below
/// it in the backing chain (where qemu-nbd's `-B` looks; filters are
/// looked through), its image's bitmaps loaded first. A node opened
/// read-write keeps tracking writes in them and stores them back when it
/// closes, as QEMU does.
fn find_bitmap(top: &Arc<block::node::Node>, name: &str) -> R<Arc<block::bitmap::DirtyBitmap>> {
    let mut cur = Some(top.clone().skip_filters());
    while let Some(n) = cur {
        if n.bitmaps().is_empty() && n.driver().can_store_bitmaps() {
            for b in n.driver().load_bitmaps()? {
                n.add_bitmap(Arc::new(b))?;
            }
        }
        if let Some(b) = n.bitmap(name) {
            return Ok(b);
        }
        if n.driver().inconsistent_bitmaps().iter().any(|b| b == name) {
            return fail(format!(
                "Bitmap '{name}' is inconsistent and cannot be used"
            ));
        }
        cur = n.child("backing").map(|b| b.skip_filters());
    }
    fail(format!("Bitmap '{name}' is not found"))
}

/// Run the command line; returns the exit code.
pub fn main_with_args(args: Vec<String>) -> i32 {
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                print!("{e}");
                return 0;
            }
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            let line = line.strip_prefix("error: ").unwrap_or(line);
            eprintln!("strata-nbd: {line}");
            return 1;
        }
    };
    match check(cli, &args).and_then(listen::run) {
        Ok(()) => 0,
        Err(Fail(m)) => {
            eprintln!("strata-nbd: {m}");
            1
        }
    }
}
