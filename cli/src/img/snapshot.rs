//! `strata-img snapshot [-f fmt] [-q] [-U] [-l | -a S | -c S | -d S] file`:
//! list, apply, create and delete qcow2 internal snapshots, with qemu-img's
//! output and messages (`docs/tools/qemu-img.rst`, "snapshot"). The
//! snapshot list printed here is also the one `info` shows. The format
//! logic is `formats::qcow2::snapshot`.

use super::json::J;
use super::{fail, size_to_str, Fail, R};
use block::graph::BlockGraph;
use block::keyval::{Map, Options, Value};
use block::qcow2::NodeStorage;
use formats::qcow2::snapshot::Snapshot;
use formats::qcow2::{OpenOptions, Qcow2};

/// `snapshot` options (qemu-img's letters).
#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// Image format (only qcow2 has internal snapshots).
    #[arg(short = 'f')]
    pub fmt: Option<String>,
    /// List the snapshots.
    #[arg(short = 'l')]
    pub list: bool,
    /// Apply (revert to) a snapshot.
    #[arg(short = 'a')]
    pub apply: Option<String>,
    /// Create a snapshot.
    #[arg(short = 'c')]
    pub create: Option<String>,
    /// Delete a snapshot.
    #[arg(short = 'd')]
    pub delete: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Open with shared permissions (listing only).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image.
    pub filename: String,
}

/// `%Y-%m-%d %H:%M:%S` of `secs` in local time, as QEMU prints dates.
fn local_date(secs: u32) -> String {
    let t = secs as libc::time_t;
    // SAFETY: `libc::tm` is plain integers (and a pointer that may be
    // null), so all-zero bytes are a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call, and
    // localtime_r only fills in `tm`.
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return "1970-01-01 00:00:00".into();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// QEMU's snapshot table (`bdrv_snapshot_dump`): a header line and one
/// line per snapshot, without the "Snapshot list:" title.
pub fn table_human(snaps: &[Snapshot]) -> String {
    let mut out = format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for s in snaps {
        let secs = s.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (s.vm_clock_nsec / 1_000_000) % 1000
        );
        let icount = match s.icount {
            Some(i) if i != u64::MAX => (i as i64).to_string(),
            _ => String::new(),
        };
        out.push_str(&format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            s.id,
            s.name,
            size_to_str(s.vm_state_size),
            local_date(s.date_sec),
            clock,
            icount
        ));
    }
    out
}

/// The `snapshots` array of `info --output=json`.
pub fn table_json(snaps: &[Snapshot]) -> J {
    J::Arr(
        snaps
            .iter()
            .map(|s| {
                let mut v = Vec::new();
                if let Some(i) = s.icount.filter(|&i| i != u64::MAX) {
                    v.push(("icount", J::u(i)));
                }
                v.extend([
                    ("vm-clock-nsec", J::u(s.vm_clock_nsec % 1_000_000_000)),
                    ("name", J::s(&s.name)),
                    ("date-sec", J::u(s.date_sec as u64)),
                    ("date-nsec", J::u(s.date_nsec as u64)),
                    ("vm-clock-sec", J::u(s.vm_clock_nsec / 1_000_000_000)),
                    ("id", J::s(&s.id)),
                    ("vm-state-size", J::u(s.vm_state_size)),
                ]);
                J::obj(v)
            })
            .collect(),
    )
}

/// The snapshot table of a qcow2 node (empty when unreadable: `info` has
/// already opened the image, errors were reported then).
pub fn of_node(n: &block::node::Node) -> Vec<Snapshot> {
    let Some(f) = n.child("file") else {
        return Vec::new();
    };
    let fs = NodeStorage(f.clone());
    let name = f.filename().unwrap_or_default();
    formats::qcow2::preview(&fs, &name)
        .and_then(|p| formats::qcow2::snapshot::read_snapshots(&fs, &p.header, &name))
        .unwrap_or_default()
}

fn open(g: &BlockGraph, filename: &str, read_only: bool, force_share: bool) -> R<Qcow2> {
    if force_share && !read_only {
        return fail(format!(
            "Could not open '{filename}': force-share=on can only be used with read-only images"
        ));
    }
    let mut m = Map::new();
    m.insert("driver".into(), Value::Str("file".into()));
    m.insert("filename".into(), Value::Str(filename.into()));
    if read_only {
        m.insert("read-only".into(), Value::Str("on".into()));
    }
    if force_share {
        m.insert("force-share".into(), Value::Str("on".into()));
    }
    let f = g
        .open_options(Options::new("file", m), None, false)
        .map_err(|e| Fail(format!("Could not open '{filename}': {e}"), 1))?;
    // The locks qemu-img's qcow2 node takes on its file: refused while a
    // running VM or qemu-nbd writes the image (a reader unless -U).
    let fs = super::locked_storage(f, filename, !read_only, force_share)?;
    let mut magic = [0u8; 4];
    let _ = fs.read_at(0, &mut magic);
    if &magic != b"QFI\xfb" {
        return fail(format!(
            "Could not open '{filename}': this image format does not support internal snapshots"
        ));
    }
    let o = OpenOptions {
        read_only,
        ..Default::default()
    };
    // The backing file is not needed: snapshots only touch metadata.
    Qcow2::open(filename, fs, None, None, &o)
        .map_err(|e| Fail(format!("Could not open '{filename}': {e}"), 1))
}

fn now() -> (u32, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // QEMU keeps microseconds.
    (d.as_secs() as u32, d.subsec_micros() * 1000)
}

/// Strip the "file: " prefix the format layer puts on its messages.
fn why(filename: &str, e: &formats::error::FormatError) -> String {
    let s = e.to_string();
    s.strip_prefix(&format!("{filename}: "))
        .map(str::to_string)
        .unwrap_or(s)
}

/// `snapshot`.
pub fn snapshot(a: SnapshotArgs) -> R<i32> {
    let n = [
        a.list,
        a.apply.is_some(),
        a.create.is_some(),
        a.delete.is_some(),
    ]
    .iter()
    .filter(|&&b| b)
    .count();
    if n > 1 {
        return fail("Cannot mix '-l', '-a', '-c', '-d'");
    }
    if let Some(f) = a.fmt.as_deref() {
        if f != "qcow2" {
            return fail(format!(
                "Could not open '{}': format '{f}' does not support internal snapshots",
                a.filename
            ));
        }
    }
    let file = &a.filename;
    let g = BlockGraph::new();
    let list = n == 0 || a.list;
    let img = open(&g, file, list, a.force_share)?;
    if list {
        let s = img.snapshots();
        if !s.is_empty() && !a.quiet {
            print!("Snapshot list:\n{}", table_human(&s));
        }
    } else if let Some(name) = &a.create {
        img.snapshot_create(name, now()).map_err(|e| {
            Fail(
                format!("Could not create snapshot '{name}': {}", why(file, &e)),
                1,
            )
        })?;
    } else if let Some(name) = &a.apply {
        img.snapshot_apply(name).map_err(|e| {
            Fail(
                format!("Could not apply snapshot '{name}': {}", why(file, &e)),
                1,
            )
        })?;
    } else if let Some(name) = &a.delete {
        if !img
            .snapshots()
            .iter()
            .any(|s| &s.id == name || &s.name == name)
        {
            return fail(format!(
                "Could not delete snapshot '{name}': snapshot not found"
            ));
        }
        img.snapshot_delete(name).map_err(|e| {
            Fail(
                format!("Could not delete snapshot '{name}': {}", why(file, &e)),
                1,
            )
        })?;
    }
    img.close()
        .map_err(|e| Fail(format!("{file}: {}", why(file, &e)), 1))?;
    Ok(0)
}
