//! `-snapshot` / `-drive ...,snapshot=on`: the guest writes into a
//! temporary qcow2 overlay whose backing node is the drive's image, opened
//! read-only, so the image is never modified (QEMU's "temporary snapshot").
//!
//! The overlay is created in `$TMPDIR` (`/var/tmp` if unset, as QEMU
//! does), opened, and unlinked at once: it lives as long as the open file
//! and vanishes when the process exits, however it exits. Its header names
//! the base image and format, for `info`-style tools; the open itself
//! takes the already opened base node as the `backing` child.

use crate::error::{BlockError, BlockResult};
use crate::graph::BlockGraph;
use crate::keyval::{Map, Options, Value};
use crate::node::Node;
use crate::qcow2::NodeStorage;
use formats::qcow2::create::{create, CreateOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

static SEQ: AtomicU32 = AtomicU32::new(0);

fn temp_dir() -> PathBuf {
    match std::env::var_os("TMPDIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from("/var/tmp"),
    }
}

/// Create a file no one else has, `$TMPDIR/strata-snapshot.PID.N.NANOS`.
fn new_temp_file() -> BlockResult<PathBuf> {
    let dir = temp_dir();
    let mut last = None;
    for _ in 0..100 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = dir.join(format!(
            "strata-snapshot.{}.{}.{nanos:09}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(_) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => {
                return Err(BlockError::Open(format!(
                    "Could not create temporary overlay in '{}': {e}",
                    dir.display()
                )))
            }
        }
    }
    Err(BlockError::Open(format!(
        "Could not create temporary overlay in '{}': {}",
        dir.display(),
        last.map(|e| e.to_string()).unwrap_or_default()
    )))
}

/// Put a temporary qcow2 overlay on `base` and return the overlay node.
/// `cache` (the drive's `cache` options) applies to the overlay file too.
pub fn open_temp_overlay(
    graph: &BlockGraph,
    base: &Arc<Node>,
    cache: Option<Value>,
) -> BlockResult<Arc<Node>> {
    let path = new_temp_file()?;
    let r = create_and_open(graph, base, cache, &path);
    // The open file keeps the overlay alive; the name goes now.
    let _ = std::fs::remove_file(&path);
    r
}

fn create_and_open(
    graph: &BlockGraph,
    base: &Arc<Node>,
    cache: Option<Value>,
    path: &std::path::Path,
) -> BlockResult<Arc<Node>> {
    let tmp = path.to_string_lossy().into_owned();
    let s = |v: &str| Value::Str(v.to_string());
    {
        let mut fm = Map::new();
        fm.insert("driver".into(), s("file"));
        fm.insert("filename".into(), s(&tmp));
        let f = graph.open_options(Options::new("snapshot overlay", fm), None, false)?;
        let o = CreateOptions {
            size: base.len(),
            backing_file: base.filename(),
            backing_format: base.filename().map(|_| base.driver_name().to_string()),
            ..Default::default()
        };
        let r = create(&tmp, Arc::new(NodeStorage(f.clone())), None, &o);
        graph.remove(f.name());
        r.map_err(|e| BlockError::Open(format!("Could not create temporary overlay: {e}")))?;
    }
    let mut fm = Map::new();
    fm.insert("driver".into(), s("file"));
    fm.insert("filename".into(), s(&tmp));
    let mut m = Map::new();
    m.insert("driver".into(), s("qcow2"));
    m.insert("file".into(), Value::Map(fm));
    m.insert("backing".into(), s(base.name()));
    if let Some(c) = cache {
        m.insert("cache".into(), c);
    }
    graph.open_options(Options::new("snapshot overlay", m), None, false)
}

/// Create a qcow2 image at `path` (replacing what is there) of `size`
/// bytes whose header names `backing` (file name and format), for
/// `blockdev-snapshot-sync`, `drive-mirror` and `drive-backup` with
/// `mode=absolute-paths`. The new file is locked while it is written.
pub fn create_qcow2(
    graph: &BlockGraph,
    path: &str,
    size: u64,
    backing: Option<(&str, &str)>,
) -> BlockResult<()> {
    std::fs::File::create(path)
        .map_err(|e| BlockError::Open(format!("Could not create '{path}': {e}")))?;
    let mut fm = Map::new();
    fm.insert("driver".into(), Value::Str("file".into()));
    fm.insert("filename".into(), Value::Str(path.to_string()));
    let f = graph.open_options(Options::new("image creation", fm), None, false)?;
    let perm = f.attach(
        "image creation",
        crate::driver::Perms::WRITE.union(crate::driver::Perms::RESIZE),
        crate::driver::Perms::CONSISTENT_READ,
    );
    let o = CreateOptions {
        size,
        backing_file: backing.map(|(f, _)| f.to_string()),
        backing_format: backing.map(|(_, fmt)| fmt.to_string()),
        ..Default::default()
    };
    let r = perm.and_then(|_p| {
        create(path, Arc::new(NodeStorage(f.clone())), None, &o)
            .map_err(|e| BlockError::Open(format!("Could not create '{path}': {e}")))
    });
    graph.remove(f.name());
    r
}

/// Create a raw image at `path` of `size` bytes (a sparse file).
pub fn create_raw(path: &str, size: u64) -> BlockResult<()> {
    let f = std::fs::File::create(path)
        .map_err(|e| BlockError::Open(format!("Could not create '{path}': {e}")))?;
    f.set_len(size)
        .map_err(|e| BlockError::Open(format!("Could not create '{path}': {e}")))
}
