//! Internal snapshots (qcow2.rst: "Snapshots", "Snapshot table entry"):
//! the snapshot table is read and validated at open; listing works on any
//! image. Every length is bounded (QEMU's limits: 65536 snapshots, 1 KiB of
//! extra data per entry, 64 MiB of table) before anything is allocated.

use super::Meta;
use crate::error::FResult;

/// Largest extra data QEMU writes or accepts.
pub const MAX_EXTRA: u32 = 1024;
/// Largest snapshot table.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;

/// One snapshot table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// L1 table offset.
    pub l1_offset: u64,
    /// L1 entries.
    pub l1_size: u32,
    /// Unique ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Seconds since the epoch.
    pub date_sec: u32,
    /// Nanoseconds.
    pub date_nsec: u32,
    /// Guest run time in ns.
    pub vm_clock_nsec: u64,
    /// VM state size.
    pub vm_state_size: u64,
    /// Virtual disk size when taken (extra data), if recorded.
    pub disk_size: Option<u64>,
    /// icount (extra data), if recorded.
    pub icount: Option<u64>,
    /// Extra data beyond what we know, kept.
    pub extra_rest: Vec<u8>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

/// Read the snapshot table of `m`.
pub(crate) fn read_table(m: &Meta) -> FResult<Vec<Snapshot>> {
    let mut v = Vec::new();
    let mut off = m.h.snapshots_offset;
    let mut total = 0u64;
    for i in 0..m.h.nb_snapshots {
        let mut hd = [0u8; 40];
        m.file
            .read_at(off, &mut hd)
            .map_err(|e| m.ioe(e, "reading the snapshot table"))?;
        let l1_offset = be64(&hd, 0);
        let l1_size = be32(&hd, 8);
        let id_len = u16::from_be_bytes([hd[12], hd[13]]) as u64;
        let name_len = u16::from_be_bytes([hd[14], hd[15]]) as u64;
        let extra = be32(&hd, 36);
        if extra > MAX_EXTRA {
            return Err(m.corrupt(format!("snapshot {i}: too much extra data")));
        }
        if !l1_offset.is_multiple_of(m.cs) || l1_size as u64 * 8 > super::header::MAX_L1_BYTES {
            return Err(m.corrupt(format!("snapshot {i}: invalid L1 table")));
        }
        let len = 40 + extra as u64 + id_len + name_len;
        total += len.div_ceil(8) * 8;
        if total > MAX_TABLE_BYTES {
            return Err(m.corrupt("snapshot table too large"));
        }
        let mut rest = vec![0u8; (len - 40) as usize];
        m.file
            .read_at(off + 40, &mut rest)
            .map_err(|e| m.ioe(e, "reading the snapshot table"))?;
        let ex = &rest[..extra as usize];
        let vm_state_size = if ex.len() >= 8 {
            be64(ex, 0)
        } else {
            be32(&hd, 32) as u64
        };
        let disk_size = (ex.len() >= 16).then(|| be64(ex, 8));
        let icount = (ex.len() >= 24).then(|| be64(ex, 16));
        let extra_rest = if ex.len() > 24 {
            ex[24..].to_vec()
        } else {
            Vec::new()
        };
        let e = extra as usize;
        let id = String::from_utf8_lossy(&rest[e..e + id_len as usize]).into_owned();
        let name = String::from_utf8_lossy(&rest[e + id_len as usize..]).into_owned();
        v.push(Snapshot {
            l1_offset,
            l1_size,
            id,
            name,
            date_sec: be32(&hd, 16),
            date_nsec: be32(&hd, 20),
            vm_clock_nsec: be64(&hd, 24),
            vm_state_size,
            disk_size,
            icount,
            extra_rest,
        });
        off += len.div_ceil(8) * 8;
    }
    Ok(v)
}

/// Serialize a snapshot table.
pub fn serialize_table(snaps: &[Snapshot]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in snaps {
        let mut ex = Vec::new();
        ex.extend_from_slice(&s.vm_state_size.to_be_bytes());
        ex.extend_from_slice(&s.disk_size.unwrap_or(0).to_be_bytes());
        if let Some(ic) = s.icount {
            ex.extend_from_slice(&ic.to_be_bytes());
            ex.extend_from_slice(&s.extra_rest);
        }
        let mut e = Vec::new();
        e.extend_from_slice(&s.l1_offset.to_be_bytes());
        e.extend_from_slice(&s.l1_size.to_be_bytes());
        e.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
        e.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
        e.extend_from_slice(&s.date_sec.to_be_bytes());
        e.extend_from_slice(&s.date_nsec.to_be_bytes());
        e.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        e.extend_from_slice(&(s.vm_state_size.min(u32::MAX as u64) as u32).to_be_bytes());
        e.extend_from_slice(&(ex.len() as u32).to_be_bytes());
        e.extend_from_slice(&ex);
        e.extend_from_slice(s.id.as_bytes());
        e.extend_from_slice(s.name.as_bytes());
        e.resize(e.len().div_ceil(8) * 8, 0);
        out.extend_from_slice(&e);
    }
    out
}
