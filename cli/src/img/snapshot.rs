//! `strata-img snapshot [-f fmt] [-q] [-U] [-l | -a S | -c S | -d S] file`:
//! list, apply, create and delete internal snapshots of any format whose
//! driver keeps them, with qemu-img's output and messages
//! (`docs/tools/qemu-img.rst`, "snapshot"). The snapshot list printed
//! here is also the one `info` shows.

use super::json::J;
use super::{fail, size_to_str, Fail, OpenSpec, R};
use block::format::SnapshotInfo as Snapshot;
use block::graph::{BlockGraph, OpenFlags};

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

fn now() -> (u32, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // QEMU keeps microseconds.
    (d.as_secs() as u32, d.subsec_micros() * 1000)
}

/// Strip the "file: " prefix the format layer puts on its messages.
fn why(filename: &str, e: &block::error::BlockError) -> String {
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
    let file = &a.filename;
    let g = BlockGraph::new();
    let list = n == 0 || a.list;
    if a.force_share && !list {
        return fail(format!(
            "Could not open '{file}': force-share=on can only be used with read-only images"
        ));
    }
    let mut spec = OpenSpec::new(file);
    spec.fmt = a.fmt.as_deref();
    spec.read_only = list;
    spec.force_share = a.force_share;
    // Snapshots only touch metadata: no backing file needed.
    spec.flags = OpenFlags {
        check: false,
        no_backing: true,
        ..Default::default()
    };
    let blk = super::open(&g, &spec)?;
    let Some(root) = blk.root() else {
        return fail(format!("Could not open '{file}': no medium"));
    };
    // Formats without internal snapshots list none and refuse the rest,
    // as qemu-img's do.
    let img = root.driver().clone();
    if list {
        let s = img.snapshot_list()?;
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
            .snapshot_list()?
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
    drop(img);
    root.close()
        .map_err(|e| Fail(format!("{file}: {}", why(file, &e)), 1))?;
    Ok(0)
}
