//! The live block operations over QMP (qapi/block-core.json,
//! qapi/transaction.json, qapi/job.json, qapi/block-export.json): external
//! snapshots, `transaction`, `block-commit`, `block-stream`, mirror,
//! backup, dirty bitmaps, the job verbs and the NBD server.
//!
//! Each command's arguments are parsed into a typed request first, with
//! QEMU's argument errors; only then does anything touch the graph. The
//! jobs themselves live in `block::jobs`; this module finds the nodes,
//! creates target images, and shapes the answers and events.

use std::sync::Arc;

use block::backend::{BlockBackend, ErrorAction};
use block::bitmap::DirtyBitmap;
use block::jobs::{self, Event, Info, JobError, JobOptions, Kind};
use block::node::Node;
use serde_json::{json, Map, Value};

use super::command::{ErrorClass, QmpError};
use super::nbd_export::Addr;
use super::Ctx;

/// The command names this module runs (all take their arguments boxed).
#[cfg(test)]
const NAMES: &[&str] = &[
    "blockdev-snapshot-sync",
    "blockdev-snapshot",
    "transaction",
    "block-commit",
    "block-stream",
    "drive-mirror",
    "blockdev-mirror",
    "drive-backup",
    "blockdev-backup",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "query-block-jobs",
    "query-jobs",
    "block-job-set-speed",
    "block-job-pause",
    "block-job-resume",
    "block-job-cancel",
    "block-job-complete",
    "block-job-finalize",
    "block-job-dismiss",
    "job-pause",
    "job-resume",
    "job-cancel",
    "job-complete",
    "job-finalize",
    "job-dismiss",
    "nbd-server-start",
    "nbd-server-add",
    "nbd-server-remove",
    "nbd-server-stop",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
];

fn err(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

fn job_err(e: JobError) -> QmpError {
    match e {
        JobError::NotFound(m) => QmpError::new(ErrorClass::DeviceNotActive, m),
        JobError::Generic(m) => QmpError::generic(m),
    }
}

/// A command's arguments being taken apart, with the QAPI input
/// visitor's errors (the same wording as `command::parse`).
struct Obj {
    map: Map<String, Value>,
    prefix: String,
}

impl Obj {
    fn new(map: Map<String, Value>) -> Obj {
        Obj {
            map,
            prefix: String::new(),
        }
    }
    fn path(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }
    fn opt_str(&mut self, k: &str) -> Result<Option<String>, QmpError> {
        match self.map.remove(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(QmpError::generic(format!(
                "Invalid parameter type for '{}', expected: string",
                self.path(k)
            ))),
        }
    }
    fn str(&mut self, k: &str) -> Result<String, QmpError> {
        self.opt_str(k)?
            .ok_or_else(|| QmpError::generic(format!("Parameter '{}' is missing", self.path(k))))
    }
    fn opt_int(&mut self, k: &str) -> Result<Option<i64>, QmpError> {
        match self.map.remove(k) {
            None => Ok(None),
            Some(v) if v.is_i64() => Ok(v.as_i64()),
            Some(v) if v.is_u64() => Ok(Some(i64::MAX)),
            Some(_) => Err(QmpError::generic(format!(
                "Invalid parameter type for '{}', expected: integer",
                self.path(k)
            ))),
        }
    }
    fn opt_bool(&mut self, k: &str) -> Result<Option<bool>, QmpError> {
        match self.map.remove(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(QmpError::generic(format!(
                "Invalid parameter type for '{}', expected: boolean",
                self.path(k)
            ))),
        }
    }
    fn opt_enum(&mut self, k: &str, allowed: &[&str]) -> Result<Option<String>, QmpError> {
        match self.opt_str(k)? {
            Some(v) if !allowed.contains(&v.as_str()) => Err(QmpError::generic(format!(
                "Parameter '{}' does not accept value '{v}'",
                self.path(k)
            ))),
            v => Ok(v),
        }
    }
    fn take(&mut self, k: &str) -> Option<Value> {
        self.map.remove(k)
    }
    fn obj(&mut self, k: &str) -> Result<Obj, QmpError> {
        match self.map.remove(k) {
            Some(Value::Object(m)) => Ok(Obj {
                map: m,
                prefix: format!("{}{k}.", self.prefix),
            }),
            None => Err(QmpError::generic(format!(
                "Parameter '{}' is missing",
                self.path(k)
            ))),
            Some(_) => Err(QmpError::generic(format!(
                "Invalid parameter type for '{}', expected: object",
                self.path(k)
            ))),
        }
    }
    fn finish(self) -> Result<(), QmpError> {
        match self.map.keys().next() {
            Some(k) => Err(QmpError::generic(format!(
                "Parameter '{}{k}' is unexpected",
                self.prefix
            ))),
            None => Ok(()),
        }
    }

    /// The options every job takes.
    fn job_options(&mut self, speed_ok: bool) -> Result<JobOptions, QmpError> {
        let mut o = JobOptions::default();
        if speed_ok {
            let s = self.opt_int("speed")?.unwrap_or(0);
            if s < 0 {
                return Err(QmpError::generic(
                    "Parameter 'speed' expects a non-negative value",
                ));
            }
            o.speed = s as u64;
        }
        o.auto_finalize = self.opt_bool("auto-finalize")?.unwrap_or(true);
        o.auto_dismiss = self.opt_bool("auto-dismiss")?.unwrap_or(true);
        let policies = ["report", "ignore", "enospc", "stop", "auto"];
        let p = |v: Option<String>| match v.as_deref() {
            None | Some("auto") | Some("report") => ErrorAction::Report,
            Some(x) => ErrorAction::parse(x).unwrap_or(ErrorAction::Report),
        };
        o.on_source_error = p(self.opt_enum("on-source-error", &policies)?);
        o.on_target_error = p(self.opt_enum("on-target-error", &policies)?);
        if let Some(e) = self.opt_enum("on-error", &policies)? {
            o.on_source_error = p(Some(e.clone()));
            o.on_target_error = p(Some(e));
        }
        let _ = self.opt_str("filter-node-name")?;
        Ok(o)
    }
}

/// The device a job works on: its backend and root node.
fn device(ctx: &Ctx, name: &str) -> Result<(Arc<BlockBackend>, Arc<Node>), QmpError> {
    let b = ctx.storage.job_backend(name).ok_or_else(|| {
        QmpError::new(
            ErrorClass::DeviceNotFound,
            format!("Cannot find device='{name}' nor node-name='{name}'"),
        )
    })?;
    let root = b
        .root()
        .ok_or_else(|| QmpError::generic(format!("Device '{name}' has no medium")))?;
    Ok((b, root))
}

fn node(ctx: &Ctx, name: &str) -> Result<Arc<Node>, QmpError> {
    if let Some(n) = ctx.storage.drive(name).and_then(|b| b.root()) {
        return Ok(n);
    }
    ctx.storage.graph.get(name).ok_or_else(|| {
        QmpError::new(
            ErrorClass::GenericError,
            format!("Cannot find device='{name}' nor node-name='{name}'"),
        )
    })
}

/// The chain below (and including) `top`.
fn chain(top: &Arc<Node>) -> Vec<Arc<Node>> {
    let mut v = vec![top.clone()];
    while let Some(b) = v[v.len() - 1].child("backing") {
        v.push(b);
    }
    v
}

/// A layer of `chain` named by node-name or by file name.
fn in_chain(
    chain: &[Arc<Node>],
    node_name: Option<&str>,
    file: Option<&str>,
    what: &str,
) -> Result<Option<Arc<Node>>, QmpError> {
    if let Some(n) = node_name {
        return chain
            .iter()
            .find(|x| x.name() == n)
            .cloned()
            .map(Some)
            .ok_or_else(|| {
                QmpError::generic(format!(
                    "Node '{n}' is not a backing image of the device ({what})"
                ))
            });
    }
    if let Some(f) = file {
        return chain
            .iter()
            .find(|x| x.filename().as_deref() == Some(f))
            .cloned()
            .map(Some)
            .ok_or_else(|| QmpError::generic(format!("Can't find '{f}' in the backing chain")));
    }
    Ok(None)
}

fn job_id(o: &mut Obj, device: &str) -> Result<String, QmpError> {
    Ok(o.opt_str("job-id")?.unwrap_or_else(|| device.to_string()))
}

fn start(
    ctx: &Ctx,
    id: &str,
    kind: Kind,
    opts: JobOptions,
    drv: Box<dyn jobs::JobDriver>,
) -> Result<Value, QmpError> {
    ctx.storage
        .jobs
        .start(id, kind, opts, drv)
        .map_err(job_err)?;
    Ok(json!({}))
}

/// A target image `drive-mirror`/`drive-backup`/`blockdev-snapshot-sync`
/// create (`mode=absolute-paths`) or find (`existing`), opened as a node.
fn open_target(
    ctx: &Ctx,
    file: &str,
    format: &str,
    node_name: Option<&str>,
    size: u64,
    backing: Option<&Arc<Node>>,
    create: bool,
) -> Result<Arc<Node>, QmpError> {
    let g = &ctx.storage.graph;
    if create {
        match format {
            "qcow2" => {
                let b = backing.and_then(|b| b.filename().map(|f| (f, b.driver_name())));
                block::snapshot_overlay::create_qcow2(
                    g,
                    file,
                    size,
                    b.as_ref().map(|(f, d)| (f.as_str(), *d)),
                )
                .map_err(err)?
            }
            "raw" => block::snapshot_overlay::create_raw(file, size).map_err(err)?,
            f => {
                return Err(QmpError::generic(format!(
                    "Unsupported format '{f}' for a new image"
                )))
            }
        }
    }
    let mut m = Map::new();
    m.insert("driver".into(), json!(format));
    if let Some(n) = node_name {
        m.insert("node-name".into(), json!(n));
    }
    m.insert("file".into(), json!({"driver": "file", "filename": file}));
    if format == "qcow2" {
        m.insert(
            "backing".into(),
            match backing {
                Some(b) => json!(b.name()),
                None => Value::Null,
            },
        );
    }
    let text = Value::Object(m).to_string();
    if node_name.is_some() {
        return g.blockdev_add_str(&text).map_err(err);
    }
    // No node-name: a generated one, as QEMU gives implicit nodes.
    let map = block::keyval::parse_json_or_dotted("target", &text, None).map_err(err)?;
    g.open_options(block::keyval::Options::new("target", map), None, false)
        .map_err(err)
}

/// Prepared snapshot: the overlay, opened, not yet in place.
struct Snap {
    backend: Arc<BlockBackend>,
    overlay: Arc<Node>,
}

fn prepare_snapshot(ctx: &Ctx, mut o: Obj, sync: bool) -> Result<Snap, QmpError> {
    if !sync {
        // blockdev-snapshot: node (the device's root) and overlay (a node
        // added with blockdev-add, without a backing file).
        let n = o.str("node")?;
        let ov = o.str("overlay")?;
        o.finish()?;
        let (backend, root) = device(ctx, &n)?;
        let overlay = node(ctx, &ov)?;
        if overlay.child("backing").is_some() {
            return Err(QmpError::generic("The overlay already has a backing image"));
        }
        if overlay.child_slot("backing").is_none() {
            return Err(QmpError::generic(format!(
                "The overlay '{ov}' does not support backing images"
            )));
        }
        overlay
            .set_child("backing", Some(root.clone()))
            .map_err(err)?;
        if let Some(f) = root.filename() {
            let _ = overlay
                .driver()
                .set_backing_file(Some(&f), Some(root.driver_name()));
        }
        return Ok(Snap { backend, overlay });
    }
    let dev = o.opt_str("device")?;
    let nn = o.opt_str("node-name")?;
    let file = o.str("snapshot-file")?;
    let snap_name = o.opt_str("snapshot-node-name")?;
    let format = o.opt_str("format")?.unwrap_or_else(|| "qcow2".into());
    let mode = o.opt_enum("mode", &["existing", "absolute-paths"])?;
    o.finish()?;
    let name = dev
        .or(nn)
        .ok_or_else(|| QmpError::generic("Cannot find device='' nor node-name=''"))?;
    let (backend, root) = device(ctx, &name)?;
    if format != "qcow2" {
        return Err(QmpError::generic(format!(
            "Format '{format}' cannot hold a backing file; use qcow2"
        )));
    }
    let create = mode.as_deref() != Some("existing");
    let overlay = open_target(
        ctx,
        &file,
        "qcow2",
        snap_name.as_deref(),
        root.len(),
        Some(&root),
        create,
    )?;
    Ok(Snap { backend, overlay })
}

fn commit_snapshots(snaps: Vec<Snap>) -> Result<(), QmpError> {
    // (A snapshot keeps the old root as the overlay's backing file: no
    // node is left unused.)
    for s in snaps {
        let b = s.backend.clone();
        b.drained(|| b.replace_root(s.overlay.clone()))
            .map_err(err)?;
    }
    Ok(())
}

/// Runs one of [`NAMES`].
pub fn execute(ctx: &Ctx, name: &str, args: Map<String, Value>) -> Result<Value, QmpError> {
    let mut o = Obj::new(args);
    let jobs = &ctx.storage.jobs;
    match name {
        "blockdev-snapshot-sync" | "blockdev-snapshot" => {
            let s = prepare_snapshot(ctx, o, name == "blockdev-snapshot-sync")?;
            commit_snapshots(vec![s])?;
            Ok(json!({}))
        }
        "transaction" => transaction(ctx, o),
        "block-commit" => {
            let dev = o.str("device")?;
            let id = job_id(&mut o, &dev)?;
            let base_node = o.opt_str("base-node")?;
            let base = o.opt_str("base")?;
            let top_node = o.opt_str("top-node")?;
            let top = o.opt_str("top")?;
            let backing_file = o.opt_str("backing-file")?;
            let _ = o.opt_bool("backing-mask-protocol")?;
            let opts = o.job_options(true)?;
            o.finish()?;
            let (backend, root) = device(ctx, &dev)?;
            let ch = chain(&root);
            let top = in_chain(&ch, top_node.as_deref(), top.as_deref(), "top")?
                .unwrap_or_else(|| root.clone());
            let base = match in_chain(&ch, base_node.as_deref(), base.as_deref(), "base")? {
                Some(b) => b,
                None => ch[ch.len() - 1].clone(),
            };
            if Arc::ptr_eq(&top, &base) {
                return Err(QmpError::generic("cannot commit an image into itself"));
            }
            if Arc::ptr_eq(&top, &root) {
                // Active commit: a mirror into the base, pivoted on
                // block-job-complete.
                let spec = jobs::mirror::MirrorSpec {
                    backend,
                    target: base,
                    sync: jobs::mirror::Sync::Top,
                    commit_base: true,
                    target_zeroed: false,
                    granularity: 65536,
                    buf_size: 16 << 20,
                };
                let m = jobs::mirror::Mirror::new(&id, spec).map_err(err)?;
                return start(ctx, &id, Kind::Commit, opts, Box::new(m));
            }
            let above = ch
                .iter()
                .find(|n| n.child("backing").is_some_and(|b| Arc::ptr_eq(&b, &top)))
                .cloned()
                .ok_or_else(|| QmpError::generic("top is not in the device's chain"))?;
            let c = jobs::commit::Commit::new(&id, backend, above, top, base, backing_file)
                .map_err(err)?;
            start(ctx, &id, Kind::Commit, opts, Box::new(c))
        }
        "block-stream" => {
            let dev = o.str("device")?;
            let id = job_id(&mut o, &dev)?;
            let base_node = o.opt_str("base-node")?;
            let base = o.opt_str("base")?;
            let _bottom = o.opt_str("bottom")?;
            let backing_file = o.opt_str("backing-file")?;
            let opts = o.job_options(true)?;
            o.finish()?;
            let (backend, root) = device(ctx, &dev)?;
            let ch = chain(&root);
            let base = in_chain(&ch, base_node.as_deref(), base.as_deref(), "base")?;
            let s = jobs::stream::Stream::new(&id, backend, base, backing_file).map_err(err)?;
            start(ctx, &id, Kind::Stream, opts, Box::new(s))
        }
        "drive-mirror" | "blockdev-mirror" => {
            let dev = o.str("device")?;
            let id = job_id(&mut o, &dev)?;
            let target = o.str("target")?;
            let sync = o.opt_enum("sync", &["full", "top", "none"])?;
            let sync = sync
                .as_deref()
                .and_then(jobs::mirror::Sync::parse)
                .ok_or_else(|| QmpError::generic("Parameter 'sync' is missing"))?;
            let granularity = o.opt_int("granularity")?.unwrap_or(0);
            let buf_size = o.opt_int("buf-size")?.unwrap_or(16 << 20);
            let _ = o.opt_str("replaces")?;
            let _ = o.opt_bool("unmap")?;
            let _ = o.opt_enum("copy-mode", &["background", "write-blocking"])?;
            let (format, node_name, mode) = if name == "drive-mirror" {
                (
                    o.opt_str("format")?,
                    o.opt_str("node-name")?,
                    o.opt_enum("mode", &["existing", "absolute-paths"])?,
                )
            } else {
                (None, None, None)
            };
            let opts = o.job_options(true)?;
            o.finish()?;
            if granularity != 0
                && (!(512..=64 << 20).contains(&granularity) || granularity.count_ones() != 1)
            {
                return Err(QmpError::generic(
                    "Parameter 'granularity' expects a value in range [512B, 64MB]",
                ));
            }
            let granularity = if granularity == 0 {
                65536
            } else {
                granularity as u64
            };
            let (backend, root) = device(ctx, &dev)?;
            let (tnode, zeroed) = if name == "drive-mirror" {
                let fmt = format.unwrap_or_else(|| root.driver_name().to_string());
                let create = mode.as_deref() != Some("existing");
                let below = if sync == jobs::mirror::Sync::Full {
                    None
                } else {
                    root.child("backing")
                };
                let t = open_target(
                    ctx,
                    &target,
                    &fmt,
                    node_name.as_deref(),
                    root.len(),
                    below.as_ref(),
                    create,
                )?;
                (t, create)
            } else {
                (node(ctx, &target)?, false)
            };
            let spec = jobs::mirror::MirrorSpec {
                backend,
                target: tnode,
                sync,
                commit_base: false,
                target_zeroed: zeroed,
                granularity,
                buf_size: buf_size.max(0) as u64,
            };
            let m = jobs::mirror::Mirror::new(&id, spec).map_err(err)?;
            start(ctx, &id, Kind::Mirror, opts, Box::new(m))
        }
        "drive-backup" | "blockdev-backup" => {
            let (id, opts, drv) = prepare_backup(ctx, name, o)?;
            start(ctx, &id, Kind::Backup, opts, drv)
        }
        "block-dirty-bitmap-add" => {
            let n = o.str("node")?;
            let bname = o.str("name")?;
            let gran = o.opt_int("granularity")?;
            let persistent = o.opt_bool("persistent")?.unwrap_or(false);
            let disabled = o.opt_bool("disabled")?.unwrap_or(false);
            o.finish()?;
            let nd = node(ctx, &n)?;
            if bname.is_empty() || bname.starts_with('#') {
                return Err(QmpError::generic("Bitmap name cannot be empty"));
            }
            let g = gran.unwrap_or(65536);
            if g < 0 {
                return Err(QmpError::generic(
                    "Granularity must be power of 2 between 512 and 2147483648",
                ));
            }
            if persistent && (!nd.driver().can_store_bitmaps() || nd.is_read_only()) {
                return Err(QmpError::generic(format!(
                    "Cannot store dirty bitmaps in {} format node '{n}'",
                    nd.driver_name()
                )));
            }
            let b = DirtyBitmap::new(&bname, nd.len(), g as u64, persistent).map_err(err)?;
            b.set_enabled(!disabled);
            nd.add_bitmap(Arc::new(b)).map_err(err)?;
            Ok(json!({}))
        }
        "block-dirty-bitmap-remove"
        | "block-dirty-bitmap-clear"
        | "block-dirty-bitmap-enable"
        | "block-dirty-bitmap-disable" => {
            let n = o.str("node")?;
            let bname = o.str("name")?;
            o.finish()?;
            let nd = node(ctx, &n)?;
            let b = nd
                .bitmap(&bname)
                .ok_or_else(|| QmpError::generic(format!("Dirty bitmap '{bname}' not found")))?;
            if b.is_busy() {
                return Err(QmpError::generic(format!(
                    "Bitmap '{bname}' is currently in use by another operation and cannot be used"
                )));
            }
            match name {
                "block-dirty-bitmap-remove" => {
                    nd.remove_bitmap(&bname);
                }
                "block-dirty-bitmap-clear" => b.clear(),
                "block-dirty-bitmap-enable" => b.set_enabled(true),
                _ => b.set_enabled(false),
            }
            Ok(json!({}))
        }
        "block-dirty-bitmap-merge" => {
            let n = o.str("node")?;
            let target = o.str("target")?;
            let srcs = o.take("bitmaps");
            o.finish()?;
            let nd = node(ctx, &n)?;
            let t = nd
                .bitmap(&target)
                .ok_or_else(|| QmpError::generic(format!("Dirty bitmap '{target}' not found")))?;
            let Some(Value::Array(srcs)) = srcs else {
                return Err(QmpError::generic("Parameter 'bitmaps' is missing"));
            };
            for s in srcs {
                let b = match &s {
                    Value::String(name) => nd.bitmap(name),
                    Value::Object(m) => {
                        let on = m.get("node").and_then(Value::as_str).unwrap_or_default();
                        let bn = m.get("name").and_then(Value::as_str).unwrap_or_default();
                        node(ctx, on)?.bitmap(bn)
                    }
                    _ => None,
                }
                .ok_or_else(|| QmpError::generic(format!("Dirty bitmap '{s}' not found")))?;
                t.merge(&b).map_err(err)?;
            }
            Ok(json!({}))
        }
        "query-block-jobs" => {
            o.finish()?;
            Ok(Value::Array(
                jobs.list().iter().map(block_job_info).collect(),
            ))
        }
        "query-jobs" => {
            o.finish()?;
            Ok(Value::Array(
                jobs.list()
                    .iter()
                    .map(|i| {
                        let mut v = json!({
                            "id": i.id,
                            "type": i.kind.name(),
                            "status": i.status.name(),
                            "current-progress": i.offset,
                            "total-progress": i.len,
                        });
                        if let Some(e) = &i.error {
                            v["error"] = json!(e);
                        }
                        v
                    })
                    .collect(),
            ))
        }
        "block-job-set-speed" => {
            let d = o.str("device")?;
            let speed = o
                .opt_int("speed")?
                .ok_or_else(|| QmpError::generic("Parameter 'speed' is missing"))?;
            o.finish()?;
            jobs.block_job(&d)
                .map_err(job_err)?
                .set_speed(speed)
                .map_err(job_err)?;
            Ok(json!({}))
        }
        "block-job-pause" | "block-job-resume" | "block-job-complete" | "block-job-cancel" => {
            let d = o.str("device")?;
            let force = o.opt_bool("force")?.unwrap_or(false);
            o.finish()?;
            let j = jobs.block_job(&d).map_err(job_err)?;
            match name {
                "block-job-pause" => j.pause(),
                "block-job-resume" => j.resume(),
                "block-job-complete" => j.complete(),
                _ => j.cancel(force),
            }
            .map_err(job_err)?;
            Ok(json!({}))
        }
        "block-job-finalize" | "block-job-dismiss" | "job-pause" | "job-resume" | "job-cancel"
        | "job-complete" | "job-finalize" | "job-dismiss" => {
            let id = o.str("id")?;
            o.finish()?;
            let j = if name.starts_with("block-job") {
                jobs.block_job(&id)
            } else {
                jobs.job(&id)
            }
            .map_err(job_err)?;
            match name.rsplit('-').next().unwrap_or_default() {
                "pause" => j.pause(),
                "resume" => j.resume(),
                "cancel" => j.cancel(false),
                "complete" => j.complete(),
                "finalize" => j.finalize(),
                _ => j.dismiss(),
            }
            .map_err(job_err)?;
            Ok(json!({}))
        }
        "nbd-server-start" => {
            let mut addr = o.obj("addr")?;
            let tls = match o.opt_str("tls-creds")? {
                Some(id) => {
                    let c = block::objects::tls_creds(&id, block::nbd::tls::Endpoint::Server)
                        .map_err(err)?;
                    Some(c.server_config().ok_or_else(|| {
                        QmpError::generic(format!("Object '{id}' has no server credentials"))
                    })?)
                }
                None => None,
            };
            let _ = o.opt_str("tls-authz")?;
            let _ = o.opt_int("max-connections")?;
            o.finish()?;
            let ty = addr.str("type")?;
            // QMP's SocketAddressLegacy wraps the address in `data`.
            let mut d = if addr.map.contains_key("data") {
                addr.obj("data")?
            } else {
                Obj {
                    map: std::mem::take(&mut addr.map),
                    prefix: "addr.".into(),
                }
            };
            let a = match ty.as_str() {
                "inet" => {
                    let host = d.str("host")?;
                    let port = d.str("port")?;
                    let port: u16 = port
                        .parse()
                        .map_err(|_| QmpError::generic(format!("Invalid port '{port}'")))?;
                    Addr::Tcp(host, port)
                }
                "unix" => Addr::Unix(d.str("path")?),
                t => {
                    return Err(QmpError::generic(format!(
                        "Parameter 'addr.type' does not accept value '{t}'"
                    )))
                }
            };
            let _ = d.opt_bool("ipv4")?;
            let _ = d.opt_bool("ipv6")?;
            let _ = d.opt_bool("abstract")?;
            d.finish()?;
            addr.finish()?;
            ctx.storage.nbd.start(a, tls).map_err(err)?;
            Ok(json!({}))
        }
        "nbd-server-add" => {
            let dev = o.str("device")?;
            let ename = o.opt_str("name")?.unwrap_or_else(|| dev.clone());
            let writable = o.opt_bool("writable")?.unwrap_or(false);
            let _ = o.opt_str("description")?;
            let bitmap = o.opt_str("bitmap")?;
            o.finish()?;
            let n = node(ctx, &dev)?;
            let bm = export_bitmap(&n, bitmap.as_deref())?;
            ctx.storage
                .nbd
                .add(&ename, &ename, n, writable, bm)
                .map_err(err)?;
            Ok(json!({}))
        }
        "block-export-add" => {
            let ty = o.str("type")?;
            let id = o.str("id")?;
            if ctx.storage.virtio_exports.contains(&id)
                || ctx.storage.nbd.list().iter().any(|(i, _)| *i == id)
            {
                return Err(QmpError::generic(format!(
                    "Block export id '{id}' is already in use"
                )));
            }
            let nn = o.str("node-name")?;
            let writable = o.opt_bool("writable")?.unwrap_or(false);
            let writethrough = o.opt_bool("writethrough")?.unwrap_or(false);
            let _ = o.opt_str("iothread")?;
            let _ = o.opt_bool("fixed-iothread")?;
            match ty.as_str() {
                "nbd" => {
                    let ename = o.opt_str("name")?.unwrap_or_else(|| nn.clone());
                    let _ = o.opt_str("description")?;
                    let bitmaps = o.take("bitmaps");
                    let _ = o.opt_bool("allocation-depth")?;
                    o.finish()?;
                    let n = node(ctx, &nn)?;
                    let names: Vec<String> = match &bitmaps {
                        Some(Value::Array(a)) => a
                            .iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect(),
                        _ => Vec::new(),
                    };
                    if names.len() > 1 {
                        return Err(QmpError::generic(
                            "Only one bitmap can be exported at a time",
                        ));
                    }
                    let bm = export_bitmap(&n, names.first().map(String::as_str))?;
                    ctx.storage
                        .nbd
                        .add(&id, &ename, n, writable, bm)
                        .map_err(err)?;
                }
                "vhost-user-blk" | "vduse-blk" => {
                    use super::virtio_export::{BlkExport, Listen, Transport};
                    let transport = if ty == "vhost-user-blk" {
                        let mut addr = o.obj("addr")?;
                        let aty = addr.str("type")?;
                        let listen = match aty.as_str() {
                            "unix" => {
                                let path = addr.str("path")?;
                                let _ = addr.opt_bool("abstract")?;
                                Listen::Path(path.into())
                            }
                            "fd" => Listen::Listener(
                                crate::inherited_fds::unix_listener(&addr.str("str")?, "addr.str")
                                    .map_err(QmpError::generic)?,
                            ),
                            _ => {
                                return Err(QmpError::generic(format!(
                                    "vhost-user-blk export '{id}': addr.type={aty}: a vhost-user socket must be a unix socket"
                                )))
                            }
                        };
                        addr.finish()?;
                        Transport::VhostUser(listen)
                    } else {
                        let qs = o.opt_int("queue-size")?.unwrap_or(256);
                        let queue_size = u16::try_from(qs)
                            .ok()
                            .filter(|q| q.is_power_of_two() && (2..=1024).contains(q))
                            .ok_or_else(|| {
                                QmpError::generic(format!(
                                    "queue-size {qs} must be a power of two, 2..1024"
                                ))
                            })?;
                        Transport::Vduse { queue_size }
                    };
                    let num_queues = o.opt_int("num-queues")?.unwrap_or(1);
                    let lbs = o.opt_int("logical-block-size")?.unwrap_or(512);
                    let serial = if ty == "vduse-blk" {
                        o.opt_str("serial")?
                    } else {
                        None
                    };
                    o.finish()?;
                    let num_queues = u16::try_from(num_queues)
                        .ok()
                        .filter(|n| (1..=1024).contains(n))
                        .ok_or_else(|| {
                            QmpError::generic(format!("num-queues {num_queues} must be 1..1024"))
                        })?;
                    let lbs = u32::try_from(lbs)
                        .ok()
                        .filter(|l| l.is_power_of_two() && (512..=32768).contains(l))
                        .ok_or_else(|| {
                            QmpError::generic(format!(
                                "logical-block-size {lbs} must be a power of two, 512..32768"
                            ))
                        })?;
                    if matches!(transport, Transport::Vduse { .. }) && !crate::vduse::available() {
                        return Err(QmpError::generic(format!(
                            "vduse-blk export '{id}': the host kernel has no VDUSE ({} is \
                             missing: load the vduse module, Linux 5.15 or later)",
                            crate::vduse::CONTROL
                        )));
                    }
                    let n = node(ctx, &nn)?;
                    ctx.storage
                        .virtio_exports
                        .add(BlkExport {
                            id,
                            node: n,
                            transport,
                            writable,
                            writethrough,
                            num_queues,
                            logical_block_size: lbs,
                            serial,
                        })
                        .map_err(err)?;
                }
                t => {
                    return Err(QmpError::generic(format!(
                        "Parameter 'type' does not accept value '{t}'"
                    )))
                }
            }
            Ok(json!({}))
        }
        "nbd-server-remove" | "block-export-del" => {
            let key = if name == "nbd-server-remove" {
                o.str("name")?
            } else {
                o.str("id")?
            };
            let _ = o.opt_enum("mode", &["safe", "hard"])?;
            o.finish()?;
            if name == "block-export-del" && ctx.storage.virtio_exports.remove(&key) {
                return Ok(json!({}));
            }
            ctx.storage
                .nbd
                .remove(&key, name == "nbd-server-remove")
                .map_err(err)?;
            Ok(json!({}))
        }
        "nbd-server-stop" => {
            o.finish()?;
            ctx.storage.nbd.stop().map_err(err)?;
            Ok(json!({}))
        }
        "query-block-exports" => {
            o.finish()?;
            let nbd = ctx.storage.nbd.list().into_iter().map(|e| ("nbd", e));
            let virtio = ctx.storage.virtio_exports.list().into_iter();
            Ok(Value::Array(
                nbd.chain(virtio)
                    .map(|(ty, (id, n))| {
                        json!({"id": id, "type": ty, "node-name": n, "shutting-down": false})
                    })
                    .collect(),
            ))
        }
        other => Err(QmpError::new(
            ErrorClass::CommandNotFound,
            format!("The command {other} has not been found"),
        )),
    }
}

/// The bitmap `name` of `n` (or of a node below it), to export.
fn export_bitmap(n: &Arc<Node>, name: Option<&str>) -> Result<Option<Arc<DirtyBitmap>>, QmpError> {
    let Some(name) = name else { return Ok(None) };
    let mut cur = Some(n.clone());
    while let Some(c) = cur {
        if let Some(b) = c.bitmap(name) {
            return Ok(Some(b));
        }
        cur = c.child("backing");
    }
    Err(QmpError::generic(format!("Bitmap '{name}' is not found")))
}

fn prepare_backup(
    ctx: &Ctx,
    name: &str,
    mut o: Obj,
) -> Result<(String, JobOptions, Box<dyn jobs::JobDriver>), QmpError> {
    let dev = o.str("device")?;
    let id = job_id(&mut o, &dev)?;
    let target = o.str("target")?;
    let sync = o.opt_enum("sync", &["full", "top", "none", "incremental", "bitmap"])?;
    let sync = sync
        .as_deref()
        .and_then(jobs::backup::Sync::parse)
        .ok_or_else(|| QmpError::generic("Parameter 'sync' is missing"))?;
    let bitmap = o.opt_str("bitmap")?;
    let mode = o.opt_enum("bitmap-mode", &["on-success", "never", "always"])?;
    let compress = o.opt_bool("compress")?.unwrap_or(false);
    let _ = o.take("x-perf");
    let _ = o.opt_str("filter-node-name")?;
    let _ = o.opt_str("discard-source")?;
    let (format, mode_create) = if name == "drive-backup" {
        (
            o.opt_str("format")?,
            o.opt_enum("mode", &["existing", "absolute-paths"])?,
        )
    } else {
        (None, None)
    };
    let opts = o.job_options(true)?;
    o.finish()?;
    let (_backend, root) = device(ctx, &dev)?;
    let (tnode, zeroed) = if name == "drive-backup" {
        let fmt = format.unwrap_or_else(|| root.driver_name().to_string());
        let create = mode_create.as_deref() != Some("existing");
        let below = if sync == jobs::backup::Sync::Top {
            root.child("backing")
        } else {
            None
        };
        let t = open_target(ctx, &target, &fmt, None, root.len(), below.as_ref(), create)?;
        (t, create)
    } else {
        (node(ctx, &target)?, false)
    };
    let bm = match bitmap {
        Some(b) => {
            let bmp = root
                .bitmap(&b)
                .ok_or_else(|| QmpError::generic(format!("Bitmap '{b}' could not be found")))?;
            let m = match mode.as_deref() {
                Some(m) => jobs::backup::BitmapMode::parse(m)
                    .unwrap_or(jobs::backup::BitmapMode::OnSuccess),
                None => jobs::backup::BitmapMode::OnSuccess,
            };
            Some((bmp, m))
        }
        None => None,
    };
    if compress && !tnode.driver().can_compress() {
        return Err(QmpError::generic(format!(
            "Compression is not supported for the '{}' format",
            tnode.driver_name()
        )));
    }
    let b = jobs::backup::Backup::new(&id, root, tnode, sync, bm, zeroed, compress).map_err(err)?;
    Ok((id, opts, Box::new(b)))
}

/// `transaction`: snapshots of several disks at one point (all overlays
/// are created and opened first; only if all succeed do the devices
/// switch), and the bitmap and backup actions.
fn transaction(ctx: &Ctx, mut o: Obj) -> Result<Value, QmpError> {
    let actions = o.take("actions");
    let _ = o.take("properties");
    o.finish()?;
    let Some(Value::Array(actions)) = actions else {
        return Err(QmpError::generic("Parameter 'actions' is missing"));
    };
    let mut snaps = Vec::new();
    let mut later: Vec<(String, Map<String, Value>)> = Vec::new();
    let undo = |snaps: &[Snap]| {
        for s in snaps {
            ctx.storage.graph.remove(s.overlay.name());
        }
    };
    for a in actions {
        let Value::Object(mut a) = a else {
            return Err(QmpError::generic(
                "Invalid parameter type for 'actions', expected: object",
            ));
        };
        let ty = a
            .remove("type")
            .and_then(|v| v.as_str().map(str::to_string));
        let data = match a.remove("data") {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        let ty = ty.ok_or_else(|| QmpError::generic("Parameter 'type' is missing"))?;
        match ty.as_str() {
            "blockdev-snapshot-sync" | "blockdev-snapshot" => {
                match prepare_snapshot(ctx, Obj::new(data), ty == "blockdev-snapshot-sync") {
                    Ok(s) => snaps.push(s),
                    Err(e) => {
                        undo(&snaps);
                        return Err(e);
                    }
                }
            }
            "block-dirty-bitmap-add"
            | "block-dirty-bitmap-clear"
            | "block-dirty-bitmap-enable"
            | "block-dirty-bitmap-disable"
            | "block-dirty-bitmap-remove"
            | "block-dirty-bitmap-merge"
            | "drive-backup"
            | "blockdev-backup" => later.push((ty, data)),
            "abort" => {
                undo(&snaps);
                return Err(QmpError::generic("Transaction aborted using Abort action"));
            }
            t => {
                undo(&snaps);
                return Err(QmpError::generic(format!(
                    "Parameter 'type' does not accept value '{t}'"
                )));
            }
        }
    }
    // Everything else in the transaction happens at the same point: the
    // bitmap actions and backups go while the devices are switched.
    commit_snapshots(snaps)?;
    for (ty, data) in later {
        execute(ctx, &ty, data)?;
    }
    Ok(json!({}))
}

/// HMP's `commit DEVICE|all`: synchronously write what the active image
/// holds into its backing file and empty the active image, keeping the
/// chain (QEMU's `bdrv_commit`, what `-snapshot` users run to keep their
/// changes). The device's I/O waits meanwhile.
pub fn hmp_commit(ctx: &Ctx, dev: &str) -> Result<(), QmpError> {
    let devices: Vec<String> = if dev == "all" {
        ctx.storage.drives().iter().map(|d| d.id.clone()).collect()
    } else {
        vec![dev.to_string()]
    };
    for d in devices {
        let (backend, root) = match device(ctx, &d) {
            Ok(x) => x,
            Err(_) if dev == "all" => continue,
            Err(e) => return Err(e),
        };
        let Some(base) = root.child("backing") else {
            if dev == "all" {
                continue;
            }
            return Err(QmpError::generic(format!(
                "Device '{d}' has no backing file"
            )));
        };
        backend
            .drained(|| -> Result<(), block::error::BlockError> {
                base.reopen(false)?;
                let r = commit_into(&root, &base);
                let back = base.reopen(true);
                r.and(back)
            })
            .map_err(err)?;
    }
    Ok(())
}

/// Copy what `top` itself holds into `base`, then empty `top`.
fn commit_into(top: &Node, base: &Node) -> Result<(), block::error::BlockError> {
    let len = top.len().min(base.len());
    let mut buf = vec![0u8; jobs::copy::MAX_CHUNK as usize];
    let mut off = 0;
    while off < len {
        let want = (len - off).min(jobs::copy::MAX_CHUNK);
        let e = top.block_status(off, want)?;
        let n = e.len.clamp(1, want);
        if e.allocated {
            let b = &mut buf[..n as usize];
            top.read_vectored(off, &mut [std::io::IoSliceMut::new(b)])?;
            base.write_vectored(off, &[std::io::IoSlice::new(b)], false)?;
        }
        off += n;
    }
    base.flush()?;
    top.driver().make_empty()
}

fn block_job_info(i: &Info) -> Value {
    let mut v = json!({
        "type": i.kind.name(),
        "device": i.id,
        "len": i.len,
        "offset": i.offset,
        "busy": i.busy,
        "paused": i.paused,
        "speed": i.speed,
        "io-status": if i.io_failed { "failed" } else { "ok" },
        "ready": i.ready,
        "status": i.status.name(),
        "auto-finalize": i.auto_finalize,
        "auto-dismiss": i.auto_dismiss,
    });
    if let Some(e) = &i.error {
        v["error"] = json!(e);
    }
    v
}

fn event_data(i: &Info) -> Value {
    json!({
        "type": i.kind.name(),
        "device": i.id,
        "len": i.len,
        "offset": i.offset,
        "speed": i.speed,
    })
}

/// Job events as QMP events.
pub fn sink(
    events: Arc<super::event::Events>,
    graph: Arc<block::graph::BlockGraph>,
) -> jobs::EventSink {
    Arc::new(move |e: Event| match e {
        Event::StatusChange { id, status } => events.emit(
            "JOB_STATUS_CHANGE",
            Some(json!({"id": id, "status": status.name()})),
        ),
        Event::Ready(i) => events.emit("BLOCK_JOB_READY", Some(event_data(&i))),
        Event::Completed(i) => {
            // What the job's graph change left behind goes first.
            graph.prune_unused();
            let mut d = event_data(&i);
            if let Some(e) = &i.error {
                d["error"] = json!(e);
            }
            events.emit("BLOCK_JOB_COMPLETED", Some(d))
        }
        Event::Cancelled(i) => {
            graph.prune_unused();
            events.emit("BLOCK_JOB_CANCELLED", Some(event_data(&i)))
        }
        Event::Error { id, write, action } => events.emit(
            "BLOCK_JOB_ERROR",
            Some(json!({
                "device": id,
                "operation": if write { "write" } else { "read" },
                "action": action.name(),
            })),
        ),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_command_is_in_the_table() {
        for n in super::NAMES {
            assert!(super::super::command::find(n).is_some(), "{n}");
        }
    }
}
