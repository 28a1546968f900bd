//! The migration stream, version 1: Strata's own wire format between a
//! source and a destination Strata (not QEMU's).
//!
//! A 16-byte magic (`STRATAMIGRATION\0`) and a little-endian `u32`
//! version, then records: a kind byte, a little-endian `u32` payload
//! length (at most [`MAX_RECORD`]), the payload. In order: one `Config`
//! (JSON: machine, RAM layout, run state, clock), RAM as `RamPages`
//! (data) and `RamZero` (runs the destination leaves or makes zero), one
//! `Rom`, one `Device` per registered section, and `End` with counts to
//! check. The destination answers on the same connection with one JSON
//! line, `{"ok":true}` or `{"error":"..."}`, once it has loaded
//! everything: only then does the source call the migration completed.
//!
//! Everything read is untrusted: lengths are bounded before anything is
//! allocated, unknown kinds are refused, and a reader never panics.

use std::io::{Read, Write};

/// The stream's first bytes.
pub const MAGIC: &[u8; 16] = b"STRATAMIGRATION\0";
/// This layout.
pub const VERSION: u32 = 1;
/// Largest payload of one record.
pub const MAX_RECORD: u32 = 16 << 20;
/// RAM data records carry at most this much (whole pages).
pub const RAM_CHUNK: usize = 1 << 20;

const KIND_CONFIG: u8 = 1;
const KIND_RAM_PAGES: u8 = 2;
const KIND_RAM_ZERO: u8 = 3;
const KIND_ROM: u8 = 4;
const KIND_DEVICE: u8 = 5;
const KIND_END: u8 = 6;

/// One record.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// What the destination must match, and the source's run state.
    Config(serde_json::Value),
    /// Guest bytes at `offset` of RAM region `region`.
    RamPages {
        region: u32,
        offset: u64,
        data: Vec<u8>,
    },
    /// `len` bytes of region `region` from `offset` read as zeroes.
    RamZero { region: u32, offset: u64, len: u64 },
    /// The firmware ROM's contents.
    Rom(Vec<u8>),
    /// A device section: its id, its state's version, the state.
    Device {
        id: String,
        version: u32,
        state: Vec<u8>,
    },
    /// The end, with how many RAM records and device sections came.
    End { ram_records: u64, devices: u64 },
}

/// Write the magic and version.
pub fn write_header(w: &mut dyn Write) -> std::io::Result<()> {
    w.write_all(MAGIC)?;
    w.write_all(&VERSION.to_le_bytes())
}

/// Read and check the magic and version.
pub fn read_header(r: &mut dyn Read) -> Result<(), String> {
    let mut m = [0u8; 20];
    r.read_exact(&mut m)
        .map_err(|e| format!("reading the stream header: {e}"))?;
    if m[..16] != *MAGIC {
        return Err("not a Strata migration stream".into());
    }
    let v = u32::from_le_bytes([m[16], m[17], m[18], m[19]]);
    if v != VERSION {
        return Err(format!(
            "migration stream version {v}, this Strata reads version {VERSION}"
        ));
    }
    Ok(())
}

fn put(w: &mut dyn Write, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_RECORD)
        .ok_or_else(|| std::io::Error::other("migration record too large"))?;
    w.write_all(&[kind])?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(payload)
}

/// Write one record.
pub fn write_record(w: &mut dyn Write, rec: &Record) -> std::io::Result<()> {
    match rec {
        Record::Config(v) => put(w, KIND_CONFIG, &serde_json::to_vec(v)?),
        Record::RamPages {
            region,
            offset,
            data,
        } => {
            let mut p = Vec::with_capacity(12 + data.len());
            p.extend_from_slice(&region.to_le_bytes());
            p.extend_from_slice(&offset.to_le_bytes());
            p.extend_from_slice(data);
            put(w, KIND_RAM_PAGES, &p)
        }
        Record::RamZero {
            region,
            offset,
            len,
        } => {
            let mut p = region.to_le_bytes().to_vec();
            p.extend_from_slice(&offset.to_le_bytes());
            p.extend_from_slice(&len.to_le_bytes());
            put(w, KIND_RAM_ZERO, &p)
        }
        Record::Rom(d) => put(w, KIND_ROM, d),
        Record::Device { id, version, state } => {
            let idb = id.as_bytes();
            let idlen = u16::try_from(idb.len())
                .map_err(|_| std::io::Error::other("device id too long"))?;
            let mut p = idlen.to_le_bytes().to_vec();
            p.extend_from_slice(idb);
            p.extend_from_slice(&version.to_le_bytes());
            p.extend_from_slice(state);
            put(w, KIND_DEVICE, &p)
        }
        Record::End {
            ram_records,
            devices,
        } => {
            let mut p = ram_records.to_le_bytes().to_vec();
            p.extend_from_slice(&devices.to_le_bytes());
            put(w, KIND_END, &p)
        }
    }
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Read one record (bounded; a short or malformed one is an error).
pub fn read_record(r: &mut dyn Read) -> Result<Record, String> {
    let mut h = [0u8; 5];
    r.read_exact(&mut h)
        .map_err(|e| format!("reading a record: {e}"))?;
    let len = u32::from_le_bytes([h[1], h[2], h[3], h[4]]);
    if len > MAX_RECORD {
        return Err(format!("a record of {len} bytes is over the limit"));
    }
    let mut p = vec![0u8; len as usize];
    r.read_exact(&mut p)
        .map_err(|e| format!("reading a record: {e}"))?;
    let short = || format!("a record of kind {} is too short", h[0]);
    Ok(match h[0] {
        KIND_CONFIG => Record::Config(
            serde_json::from_slice(&p).map_err(|e| format!("the configuration record: {e}"))?,
        ),
        KIND_RAM_PAGES => Record::RamPages {
            region: le32(&p, 0).ok_or_else(short)?,
            offset: le64(&p, 4).ok_or_else(short)?,
            data: p.get(12..).ok_or_else(short)?.to_vec(),
        },
        KIND_RAM_ZERO => Record::RamZero {
            region: le32(&p, 0).ok_or_else(short)?,
            offset: le64(&p, 4).ok_or_else(short)?,
            len: le64(&p, 12).ok_or_else(short)?,
        },
        KIND_ROM => Record::Rom(p),
        KIND_DEVICE => {
            let n = u16::from_le_bytes(p.get(0..2).ok_or_else(short)?.try_into().unwrap_or([0; 2]))
                as usize;
            let id = std::str::from_utf8(p.get(2..2 + n).ok_or_else(short)?)
                .map_err(|_| "a device id is not UTF-8".to_string())?
                .to_string();
            Record::Device {
                id,
                version: le32(&p, 2 + n).ok_or_else(short)?,
                state: p.get(6 + n..).ok_or_else(short)?.to_vec(),
            }
        }
        KIND_END => Record::End {
            ram_records: le64(&p, 0).ok_or_else(short)?,
            devices: le64(&p, 8).ok_or_else(short)?,
        },
        k => return Err(format!("unknown record kind {k}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_hostile_ones_are_refused() {
        let recs = vec![
            Record::Config(serde_json::json!({"machine": "q35"})),
            Record::RamPages {
                region: 1,
                offset: 4096,
                data: vec![7; 8192],
            },
            Record::RamZero {
                region: 0,
                offset: 0,
                len: 1 << 20,
            },
            Record::Rom(vec![1, 2, 3]),
            Record::Device {
                id: "0000:00:1f.2/ich9-ahci".into(),
                version: 1,
                state: b"{}".to_vec(),
            },
            Record::End {
                ram_records: 2,
                devices: 1,
            },
        ];
        let mut buf = Vec::new();
        write_header(&mut buf).unwrap();
        for r in &recs {
            write_record(&mut buf, r).unwrap();
        }
        let mut rd = &buf[..];
        read_header(&mut rd).unwrap();
        for r in &recs {
            assert_eq!(&read_record(&mut rd).unwrap(), r);
        }
        // Hostile: a huge length, an unknown kind, a short payload, a
        // truncated stream, another version.
        assert!(read_record(&mut &[2u8, 0xff, 0xff, 0xff, 0xff][..]).is_err());
        assert!(read_record(&mut &[9u8, 0, 0, 0, 0][..]).is_err());
        assert!(read_record(&mut &[3u8, 2, 0, 0, 0, 1, 2][..]).is_err());
        assert!(read_record(&mut &[5u8, 3, 0, 0, 0, 0xff, 0xff, 0][..]).is_err());
        assert!(read_record(&mut &buf[20..30]).is_err());
        let mut v2 = buf.clone();
        v2[16] = 2;
        assert!(read_header(&mut &v2[..]).is_err());
    }
}
