//! Consistency check and repair, as `qemu-img check` does for qcow2: count
//! every reference to every host cluster (header, L1/L2 tables of the
//! active state and of each snapshot, data and compressed clusters,
//! refcount table and blocks, snapshot table, bitmap directory and tables,
//! encryption header), compare with the stored refcounts, and check the
//! COPIED flags of the active tables (qcow2.rst: "Host cluster management",
//! "Cluster mapping", "Snapshots", "Bitmaps").
//!
//! Stored refcount lower than the references: corruption (data could be
//! overwritten). Higher: a leak (wasted space only). Repair sets the stored
//! value to the counted one (`-r leaks` only for leaks).

use super::{Meta, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::error::FResult;

pub use crate::check::{CheckResult, Repair};

struct Counter {
    refs: Vec<u32>,
    nb: u64,
    cs: u64,
}

impl Counter {
    /// Count one reference to each cluster of `[off, off+len)`.
    fn add(&mut self, r: &mut CheckResult, off: u64, len: u64, what: &str) {
        if len == 0 {
            return;
        }
        let first = off / self.cs;
        let last = off.saturating_add(len - 1) / self.cs;
        for c in first..=last {
            if c >= self.nb {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR {what} at offset 0x{:x} is beyond the end of the image file",
                    c * self.cs
                ));
                return;
            }
            let v = &mut self.refs[c as usize];
            *v = v.saturating_add(1);
        }
    }
}

fn read_u64s(m: &Meta, off: u64, n: u64) -> FResult<Vec<u64>> {
    let mut raw = vec![0u8; (n * 8) as usize];
    m.file
        .read_at(off, &mut raw)
        .map_err(|e| m.ioe(e, "reading a table"))?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

/// Walk one L1 table; `active` also checks COPIED flags later.
fn walk_l1(
    m: &mut Meta,
    c: &mut Counter,
    r: &mut CheckResult,
    l1: &[u64],
    active: bool,
    copied_checks: &mut Vec<(u64, u64, u64, usize)>,
) -> FResult<()> {
    let cs = m.cs;
    let ew = m.entry_words();
    let nent = m.h.l2_entries();
    let mut last_host = 0u64;
    for (i, &e) in l1.iter().enumerate() {
        let l2 = e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        if !l2.is_multiple_of(cs) {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
            ));
            continue;
        }
        c.add(r, l2, cs, "L2 table");
        if active {
            copied_checks.push((0, i as u64, e, 0));
        }
        if l2 >= c.nb * cs {
            continue;
        }
        let t = read_u64s(m, l2, cs / 8)?;
        for j in 0..nent as usize {
            let le = t[j * ew as usize];
            let bm = if ew == 2 { t[j * 2 + 1] } else { 0 };
            let gcl = i as u64 * nent + j as u64;
            if le & OFLAG_COMPRESSED != 0 {
                if let Some((o, n)) = m.entry_refs(le) {
                    c.add(r, o, n * cs, "compressed cluster");
                }
                if active {
                    r.allocated_clusters += 1;
                    r.compressed_clusters += 1;
                    r.fragmented_clusters += 1;
                }
                continue;
            }
            let host = le & OFFSET_MASK;
            if host == 0 {
                if active && m.data.is_some() && le & OFLAG_COPIED != 0 {
                    r.allocated_clusters += 1;
                }
                continue;
            }
            if !host.is_multiple_of(cs) {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR offset={host:x}: Cluster is not properly aligned; L2 entry corrupted."
                ));
                continue;
            }
            if active {
                let zero_only = if ew == 2 {
                    bm & 0xffff_ffff == 0
                } else {
                    le & 1 != 0
                };
                if !zero_only || m.data.is_none() {
                    r.allocated_clusters += 1;
                }
                if last_host != 0 && host != last_host + cs {
                    r.fragmented_clusters += 1;
                }
                last_host = host;
                let _ = gcl;
                copied_checks.push((1, l2 + (j as u64 * 8 * ew), le, 0));
            }
            if m.data.is_none() {
                c.add(r, host, cs, "data cluster");
            }
        }
    }
    Ok(())
}

/// Check `m`; with repair, fix refcounts and flags. Corruption met on the
/// way is reported, not signalled ([`Meta::fatal`]): finding it is the
/// point of a check.
pub fn check(m: &mut Meta, repair: Repair) -> FResult<CheckResult> {
    let was = m.quiet.replace(true);
    let r = check_quiet(m, repair);
    m.quiet.set(was);
    r
}

fn check_quiet(m: &mut Meta, repair: Repair) -> FResult<CheckResult> {
    let mut r = CheckResult::default();
    let cs = m.cs;
    let file_len = m.file_len()?;
    let nb = file_len.div_ceil(cs);
    if nb > (1 << 31) {
        r.check_errors += 1;
        r.messages
            .push("ERROR: image file too large to check".to_string());
        return Ok(r);
    }
    let mut c = Counter {
        refs: vec![0u32; nb as usize],
        nb,
        cs,
    };
    r.total_clusters = m.h.size.div_ceil(cs);
    c.add(&mut r, 0, cs, "header");
    let l1 = m.l1.clone();
    if !l1.is_empty() {
        c.add(&mut r, m.h.l1_table_offset, l1.len() as u64 * 8, "L1 table");
    }
    let mut copied = Vec::new();
    walk_l1(m, &mut c, &mut r, &l1, true, &mut copied)?;
    for s in m.snapshots.clone() {
        if s.l1_size > 0 {
            c.add(
                &mut r,
                s.l1_offset,
                s.l1_size as u64 * 8,
                "snapshot L1 table",
            );
            let sl1 = read_u64s(m, s.l1_offset, s.l1_size as u64)?;
            walk_l1(m, &mut c, &mut r, &sl1, false, &mut Vec::new())?;
        }
    }
    if m.h.nb_snapshots > 0 {
        let len = super::snapshot::serialize_table(&m.snapshots).len() as u64;
        c.add(&mut r, m.h.snapshots_offset, len, "snapshot table");
    }
    c.add(
        &mut r,
        m.h.refcount_table_offset,
        m.h.refcount_table_clusters as u64 * cs,
        "refcount table",
    );
    for t in 0..m.reftable.len() as u64 {
        match m.rb_offset(t) {
            Ok(Some(o)) => c.add(&mut r, o, cs, "refcount block"),
            Ok(None) => {}
            Err(e) => {
                r.corruptions += 1;
                r.messages.push(format!("ERROR {e}"));
            }
        }
    }
    if let Some(b) = m.h.bitmaps_ext.clone() {
        count_bitmaps(m, &mut c, &mut r, &b)?;
    }
    if let Some(cx) = m.h.crypto_ext.clone() {
        if cx.len() >= 16 {
            let o = u64::from_be_bytes(cx[0..8].try_into().unwrap_or([0; 8]));
            let l = u64::from_be_bytes(cx[8..16].try_into().unwrap_or([0; 8]));
            c.add(&mut r, o, l.min(file_len), "encryption header");
        }
    }
    // Compare.
    let mut fixes = Vec::new();
    for i in 0..nb {
        let want = c.refs[i as usize] as u64;
        let have = match m.get_refcount(i) {
            Ok(v) => v,
            Err(e) => {
                r.check_errors += 1;
                r.messages.push(format!("ERROR {e}"));
                continue;
            }
        };
        if want != 0 {
            r.image_end_offset = (i + 1) * cs;
        }
        if have == want {
            continue;
        }
        if have > want {
            r.leaks += 1;
            let fix = repair != Repair::None;
            r.messages.push(format!(
                "{} cluster {i} refcount={have} reference={want}",
                if fix { "Repairing" } else { "Leaked" }
            ));
            if fix {
                fixes.push((i, want, false));
            }
        } else {
            r.corruptions += 1;
            let fix = repair == Repair::All;
            r.messages.push(format!(
                "{} cluster {i} refcount={have} reference={want}",
                if fix { "Repairing" } else { "ERROR" }
            ));
            if fix {
                fixes.push((i, want, true));
            }
        }
    }
    for (i, want, corr) in fixes {
        let epb = m.rb_entries();
        if m.rb_offset(i / epb)?.is_none()
            && c.refs.get(((i / epb) * epb) as usize).copied().unwrap_or(0) > 0
        {
            r.check_errors += 1;
            r.messages.push(format!(
                "ERROR cannot repair cluster {i}: its refcount block is missing"
            ));
            continue;
        }
        match m.set_refcount(i, want) {
            Ok(()) => {
                if corr {
                    r.corruptions_fixed += 1;
                } else {
                    r.leaks_fixed += 1;
                }
            }
            Err(e) => {
                r.check_errors += 1;
                r.messages.push(format!("ERROR {e}"));
            }
        }
    }
    // COPIED flags of the active tables.
    for (ty, where_, e, _) in copied {
        let host = e & OFFSET_MASK;
        let rc = if host / cs < nb {
            m.get_refcount(host / cs)?
        } else {
            0
        };
        let want = if ty == 1 && m.data.is_some() {
            true
        } else {
            rc == 1
        };
        let have = e & OFLAG_COPIED != 0;
        if want == have {
            continue;
        }
        let fix = repair == Repair::All;
        r.corruptions += 1;
        r.messages.push(if ty == 0 {
            format!(
                "{} OFLAG_COPIED L2 cluster: l1_index={where_} l1_entry={e:x} refcount={rc}",
                if fix { "Repairing" } else { "ERROR" }
            )
        } else {
            format!(
                "{} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}",
                if fix { "Repairing" } else { "ERROR" }
            )
        });
        if fix {
            let ne = if want {
                e | OFLAG_COPIED
            } else {
                e & !OFLAG_COPIED
            };
            if ty == 0 {
                m.l1[where_ as usize] = ne;
                m.index_l1_change(e, ne);
                m.l1_dirty.insert(where_ * 8 / 512);
            } else {
                m.file
                    .write_at(where_, &ne.to_be_bytes())
                    .map_err(|e| m.ioe(e, "repairing an L2 entry"))?;
                m.l2c.drop_clean();
            }
            r.corruptions_fixed += 1;
        }
    }
    if repair != Repair::None {
        m.flush_exact()?;
        // Cached L2 slices may hold entries we patched on disk.
        m.l2c.drop_clean();
    }
    Ok(r)
}

fn count_bitmaps(m: &mut Meta, c: &mut Counter, r: &mut CheckResult, ext: &[u8]) -> FResult<()> {
    if ext.len() < 24 {
        return Ok(());
    }
    let nb = u32::from_be_bytes(ext[0..4].try_into().unwrap_or([0; 4]));
    let dir_size = u64::from_be_bytes(ext[8..16].try_into().unwrap_or([0; 8]));
    let dir_off = u64::from_be_bytes(ext[16..24].try_into().unwrap_or([0; 8]));
    if dir_size > (64 << 20) || nb > 65535 {
        r.corruptions += 1;
        r.messages.push("ERROR bitmap directory too large".into());
        return Ok(());
    }
    c.add(r, dir_off, dir_size, "bitmap directory");
    let mut dir = vec![0u8; dir_size as usize];
    m.file
        .read_at(dir_off, &mut dir)
        .map_err(|e| m.ioe(e, "reading the bitmap directory"))?;
    let mut p = 0usize;
    for _ in 0..nb {
        if p + 24 > dir.len() {
            break;
        }
        let toff = u64::from_be_bytes(dir[p..p + 8].try_into().unwrap_or([0; 8]));
        let tsize = u32::from_be_bytes(dir[p + 8..p + 12].try_into().unwrap_or([0; 4])) as u64;
        let name_size = u16::from_be_bytes([dir[p + 18], dir[p + 19]]) as usize;
        let extra = u32::from_be_bytes(dir[p + 20..p + 24].try_into().unwrap_or([0; 4])) as usize;
        if tsize > (64 << 20) / 8 {
            break;
        }
        c.add(r, toff, tsize * 8, "bitmap table");
        let t = read_u64s(m, toff, tsize)?;
        for e in t {
            let o = e & OFFSET_MASK;
            if o != 0 {
                c.add(r, o, m.cs, "bitmap data");
            }
        }
        p += (24 + extra + name_size).div_ceil(8) * 8;
    }
    Ok(())
}
