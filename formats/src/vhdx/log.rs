//! The VHDX log (spec 2.3): a circular buffer of entries, each a header
//! sector with descriptors (data and zero descriptors, 2.3.1.2-2.3.1.3)
//! followed by data sectors (2.3.1.4), all CRC-32C checksummed and
//! tagged with the header's log GUID and the entry's sequence number.
//! Replay (2.3.3) finds the active sequence, the run of consecutive
//! valid entries that ends at the newest one and starts where that
//! entry's tail says, and applies its descriptors in order.
//!
//! Parse, then execute: [`find_replay`] reads and validates the whole
//! log into a [`Replay`] (a list of writes) and nothing is written until
//! every entry of the sequence has checked out. [`entry_bytes`] builds an
//! entry, for tests that need a pending log (Strata itself updates the
//! BAT in place and never writes the log).

use super::layout::{checksum_ok, guid_at, le32, le64, set_checksum, Guid, MIB};
use crate::error::{FResult, FormatError};
use std::collections::HashMap;

/// Sector size of the log.
pub const SECTOR: u64 = 4096;
/// The largest log Strata reads into memory (the spec allows 4 GiB).
pub const MAX_LOG: u64 = 256 << 20;
/// Bytes of an entry header.
const ENTRY_HEADER: u64 = 64;
/// Bytes of a descriptor.
const DESCRIPTOR: u64 = 32;
/// Payload bytes of a data sector (the rest is signature and sequence).
const DATA_PAYLOAD: usize = 4084;

/// One write a replay makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogWrite {
    /// 4 KiB of data at a file offset.
    Data(u64, Vec<u8>),
    /// Zeroes: (file offset, length).
    Zero(u64, u64),
}

/// A validated active sequence, ready to apply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// Writes in log order.
    pub writes: Vec<LogWrite>,
    /// The file must be at least this long before replay.
    pub flushed_file_offset: u64,
    /// The file must be grown to at least this length after replay.
    pub last_file_offset: u64,
    /// Entries in the sequence.
    pub entries: usize,
}

struct Entry {
    seq: u64,
    len: u64,
    tail: u64,
    flushed: u64,
    last: u64,
    writes: Vec<LogWrite>,
}

/// `len` bytes of the circular `log` from `at`, wrapping at its end.
fn circ(log: &[u8], at: u64, len: u64) -> Option<Vec<u8>> {
    let n = log.len() as u64;
    if len > n || at >= n {
        return None;
    }
    let first = (n - at).min(len);
    let mut v = log[at as usize..(at + first) as usize].to_vec();
    v.extend_from_slice(&log[..(len - first) as usize]);
    Some(v)
}

/// The entry at `at`, if it is a valid one of this log.
fn parse_entry(log: &[u8], at: u64, guid: &Guid, budget: &mut u64) -> Option<Entry> {
    let h = circ(log, at, SECTOR)?;
    if &h[..4] != b"loge" || guid_at(&h, 32) != *guid {
        return None;
    }
    let len = le32(&h, 8) as u64;
    let tail = le32(&h, 12) as u64;
    let seq = le64(&h, 16);
    let count = le32(&h, 24) as u64;
    let n = log.len() as u64;
    if len == 0
        || !len.is_multiple_of(SECTOR)
        || len > n
        || !tail.is_multiple_of(SECTOR)
        || tail >= n
        || seq == 0
    {
        return None;
    }
    let desc_sectors = (ENTRY_HEADER + count * DESCRIPTOR).div_ceil(SECTOR);
    if desc_sectors > len / SECTOR {
        return None;
    }
    *budget = budget.saturating_sub(len);
    let e = circ(log, at, len)?;
    if !checksum_ok(&e, 4) {
        return None;
    }
    let mut writes = Vec::new();
    let mut data_at = desc_sectors * SECTOR;
    for d in 0..count {
        let o = (ENTRY_HEADER + d * DESCRIPTOR) as usize;
        let sig = &e[o..o + 4];
        let file_offset = le64(&e, o + 16);
        if le64(&e, o + 24) != seq || !file_offset.is_multiple_of(SECTOR) {
            return None;
        }
        if sig == b"zero" {
            let zlen = le64(&e, o + 8);
            if !zlen.is_multiple_of(SECTOR) {
                return None;
            }
            writes.push(LogWrite::Zero(file_offset, zlen));
        } else if sig == b"desc" {
            let s = e.get(data_at as usize..(data_at + SECTOR) as usize)?;
            let sseq = (le32(s, 4) as u64) << 32 | le32(s, 4092) as u64;
            if &s[..4] != b"data" || sseq != seq {
                return None;
            }
            let mut block = Vec::with_capacity(SECTOR as usize);
            block.extend_from_slice(&e[o + 8..o + 16]);
            block.extend_from_slice(&s[8..8 + DATA_PAYLOAD]);
            block.extend_from_slice(&e[o + 4..o + 8]);
            writes.push(LogWrite::Data(file_offset, block));
            data_at += SECTOR;
        } else {
            return None;
        }
    }
    if data_at != len {
        return None;
    }
    Some(Entry {
        seq,
        len,
        tail,
        flushed: le64(&e, 48),
        last: le64(&e, 56),
        writes,
    })
}

/// The active sequence of `log` (the log region's bytes) under `guid`,
/// if any entry is valid. `name` names the file in errors.
pub fn find_replay(log: &[u8], guid: &Guid, name: &str) -> FResult<Option<Replay>> {
    let n = log.len() as u64;
    let mut entries: HashMap<u64, Entry> = HashMap::new();
    let mut at = 0;
    // Valid entries do not overlap, so checksumming more than the log a
    // few times over means a hostile log built to make the scan slow.
    let mut budget = n.saturating_mul(4);
    while at < n {
        if let Some(e) = parse_entry(log, at, guid, &mut budget) {
            entries.insert(at, e);
        }
        if budget == 0 {
            return Err(FormatError::Corrupt(format!(
                "{name}: the VHDX log holds too many overlapping entries"
            )));
        }
        at += SECTOR;
    }
    // The head each entry's run of consecutive sequence numbers leads
    // to, newest entries first so that every successor is known.
    let mut order: Vec<u64> = entries.keys().copied().collect();
    order.sort_unstable_by_key(|o| std::cmp::Reverse(entries[o].seq));
    let mut head: HashMap<u64, (u64, usize)> = HashMap::new();
    for &o in &order {
        let e = &entries[&o];
        let next = (o + e.len) % n;
        let h = match entries.get(&next) {
            Some(x) if e.seq.checked_add(1) == Some(x.seq) => {
                let (h, k) = head[&next];
                (h, k + 1)
            }
            _ => (o, 1),
        };
        head.insert(o, h);
    }
    // A sequence is valid when its head's tail points back at its
    // start; the one with the newest head wins.
    let best = order
        .iter()
        .filter(|o| entries[&head[o].0].tail == **o)
        .max_by_key(|o| (entries[&head[o].0].seq, head[o].1));
    let Some(&start) = best else {
        return Ok(None);
    };
    let (h, count) = head[&start];
    let mut r = Replay {
        flushed_file_offset: entries[&h].flushed,
        last_file_offset: entries[&h].last,
        entries: count,
        writes: Vec::new(),
    };
    let mut o = start;
    for _ in 0..count {
        let e = entries.remove(&o).ok_or_else(|| {
            FormatError::Corrupt(format!("{name}: the VHDX log sequence is inconsistent"))
        })?;
        o = (o + e.len) % n;
        r.writes.extend(e.writes);
    }
    Ok(Some(r))
}

/// Check the replay's targets against the file: every write lands past
/// the header section and below `limit`.
pub fn validate(r: &Replay, limit: u64, name: &str) -> FResult<()> {
    for w in &r.writes {
        let (off, len) = match w {
            LogWrite::Data(o, d) => (*o, d.len() as u64),
            LogWrite::Zero(o, l) => (*o, *l),
        };
        match off.checked_add(len) {
            Some(end) if off >= MIB && end <= limit => {}
            _ => {
                return Err(FormatError::Corrupt(format!(
                    "{name}: a VHDX log entry writes outside the image ([{off}, +{len}))"
                )))
            }
        }
    }
    Ok(())
}

/// One log entry (for tests and tools): `writes` (4 KiB-aligned data
/// of whole sectors, or zero runs) as sequence `seq` of log `guid`,
/// with `tail` the offset of its sequence's first entry and the file
/// lengths before (`flushed`) and after (`last`).
pub fn entry_bytes(
    seq: u64,
    tail: u32,
    guid: &Guid,
    flushed: u64,
    last: u64,
    writes: &[LogWrite],
) -> Vec<u8> {
    let mut descs = Vec::new();
    let mut data = Vec::new();
    for w in writes {
        match w {
            LogWrite::Zero(off, len) => {
                let mut d = [0u8; 32];
                d[..4].copy_from_slice(b"zero");
                d[8..16].copy_from_slice(&len.to_le_bytes());
                d[16..24].copy_from_slice(&off.to_le_bytes());
                d[24..32].copy_from_slice(&seq.to_le_bytes());
                descs.push(d);
            }
            LogWrite::Data(off, bytes) => {
                for (k, s) in bytes.chunks(SECTOR as usize).enumerate() {
                    let mut sector = s.to_vec();
                    sector.resize(SECTOR as usize, 0);
                    let mut d = [0u8; 32];
                    d[..4].copy_from_slice(b"desc");
                    d[4..8].copy_from_slice(&sector[4092..]);
                    d[8..16].copy_from_slice(&sector[..8]);
                    d[16..24].copy_from_slice(&(off + k as u64 * SECTOR).to_le_bytes());
                    d[24..32].copy_from_slice(&seq.to_le_bytes());
                    descs.push(d);
                    let mut ds = vec![0u8; SECTOR as usize];
                    ds[..4].copy_from_slice(b"data");
                    ds[4..8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
                    ds[8..4092].copy_from_slice(&sector[8..4092]);
                    ds[4092..].copy_from_slice(&(seq as u32).to_le_bytes());
                    data.extend_from_slice(&ds);
                }
            }
        }
    }
    let desc_sectors = (ENTRY_HEADER + descs.len() as u64 * DESCRIPTOR).div_ceil(SECTOR);
    let mut e = vec![0u8; (desc_sectors * SECTOR) as usize];
    e[..4].copy_from_slice(b"loge");
    e[12..16].copy_from_slice(&tail.to_le_bytes());
    e[16..24].copy_from_slice(&seq.to_le_bytes());
    e[24..28].copy_from_slice(&(descs.len() as u32).to_le_bytes());
    e[32..48].copy_from_slice(guid);
    e[48..56].copy_from_slice(&flushed.to_le_bytes());
    e[56..64].copy_from_slice(&last.to_le_bytes());
    for (i, d) in descs.iter().enumerate() {
        let o = (ENTRY_HEADER + i as u64 * DESCRIPTOR) as usize;
        e[o..o + 32].copy_from_slice(d);
    }
    e.extend_from_slice(&data);
    let len = e.len() as u32;
    e[8..12].copy_from_slice(&len.to_le_bytes());
    set_checksum(&mut e, 4);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_valid_sequence_replays() {
        let g = [7u8; 16];
        let mut log = vec![0u8; MIB as usize];
        let a: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        let e1 = entry_bytes(5, 0, &g, 0, 0, &[LogWrite::Data(2 * MIB, a.clone())]);
        let e2 = entry_bytes(6, 0, &g, 0, 9 * MIB, &[LogWrite::Zero(3 * MIB, 4096)]);
        // An older, unrelated entry further on, and one of another log.
        let old = entry_bytes(2, 0x80000, &g, 0, 0, &[LogWrite::Zero(4 * MIB, 4096)]);
        let other = entry_bytes(9, 0x90000, &[1; 16], 0, 0, &[]);
        log[..e1.len()].copy_from_slice(&e1);
        log[e1.len()..e1.len() + e2.len()].copy_from_slice(&e2);
        log[0x80000..0x80000 + old.len()].copy_from_slice(&old);
        log[0x90000..0x90000 + other.len()].copy_from_slice(&other);
        let r = find_replay(&log, &g, "x").unwrap().unwrap();
        assert_eq!(r.entries, 2);
        assert_eq!(r.last_file_offset, 9 * MIB);
        assert_eq!(
            r.writes,
            vec![
                LogWrite::Data(2 * MIB, a[..4096].to_vec()),
                LogWrite::Data(2 * MIB + 4096, a[4096..].to_vec()),
                LogWrite::Zero(3 * MIB, 4096),
            ]
        );
        // A flipped bit in the head drops it: the sequence ends before.
        log[e1.len() + 100] ^= 1;
        let r = find_replay(&log, &g, "x").unwrap().unwrap();
        assert_eq!(r.entries, 1);
        assert!(find_replay(&vec![0u8; MIB as usize], &g, "x")
            .unwrap()
            .is_none());
    }

    #[test]
    fn an_entry_may_wrap_around_the_end_of_the_log() {
        let g = [3u8; 16];
        let n = MIB as usize;
        let mut log = vec![0u8; n];
        let d = vec![0x9cu8; 4096];
        let e = entry_bytes(
            4,
            (n - 4096) as u32,
            &g,
            0,
            0,
            &[LogWrite::Data(5 * MIB, d.clone())],
        );
        assert_eq!(e.len(), 8192);
        log[n - 4096..].copy_from_slice(&e[..4096]);
        log[..4096].copy_from_slice(&e[4096..]);
        let r = find_replay(&log, &g, "x").unwrap().unwrap();
        assert_eq!(r.writes, vec![LogWrite::Data(5 * MIB, d)]);
        assert!(validate(&r, 6 * MIB, "x").is_ok());
        let e = validate(&r, 5 * MIB, "x").unwrap_err().to_string();
        assert!(
            e.contains("x: a VHDX log entry writes outside the image"),
            "{e}"
        );
    }
}
