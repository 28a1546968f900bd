//! The dynamic disk header (spec: "Dynamic Disk Header Format") with its
//! parent locators (spec: "Parent Locator Entry"), which name a
//! differencing disk's parent.

use super::footer::checksum;
use crate::error::{FResult, FormatError};

/// The header's size in bytes.
pub const HEADER_SIZE: usize = 1024;
/// Its cookie.
pub const COOKIE: &[u8; 8] = b"cxsparse";
/// A BAT entry for a block with no data.
pub const UNALLOCATED: u32 = 0xffff_ffff;
/// Platform codes of parent locators that Strata reads and writes.
pub const W2RU: u32 = u32::from_be_bytes(*b"W2ru");
/// Absolute Windows path, UTF-16LE.
pub const W2KU: u32 = u32::from_be_bytes(*b"W2ku");
/// A `file://` URL, UTF-8 (Mac OS X).
pub const MACX: u32 = u32::from_be_bytes(*b"MacX");
/// The longest locator text read (a path, not a blob).
pub const MAX_LOCATOR: u64 = 64 << 10;

/// One parent locator entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Locator {
    /// Platform code (0: unused).
    pub platform: u32,
    /// Space reserved for the locator data, in bytes (older writers
    /// stored sectors here; only `length` is used to read).
    pub space: u32,
    /// Bytes of locator data.
    pub length: u32,
    /// Where the data is.
    pub offset: u64,
}

/// A parsed dynamic disk header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynHeader {
    /// Offset of the Block Allocation Table.
    pub table_offset: u64,
    /// Header version (1.0 = 0x00010000).
    pub version: u32,
    /// Entries in the BAT.
    pub max_table_entries: u32,
    /// Bytes per block (2 MiB by default; a power of two).
    pub block_size: u32,
    /// The parent's footer UUID (differencing disks).
    pub parent_uuid: [u8; 16],
    /// The parent's modification time, seconds since the VHD epoch.
    pub parent_timestamp: u32,
    /// The parent's file name, UTF-16BE (up to 256 characters).
    pub parent_name: Vec<u16>,
    /// The eight locators.
    pub locators: [Locator; 8],
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    (be32(b, o) as u64) << 32 | be32(b, o + 4) as u64
}

impl DynHeader {
    /// Parse the 1024 bytes at the footer's `data_offset`.
    pub fn parse(b: &[u8; HEADER_SIZE], name: &str) -> FResult<DynHeader> {
        if &b[..8] != COOKIE {
            return Err(FormatError::Corrupt(format!(
                "{name}: Invalid dynamic VHD header magic"
            )));
        }
        let parent_name: Vec<u16> = b[64..576]
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&c| c != 0)
            .collect();
        let mut locators = [Locator::default(); 8];
        for (i, l) in locators.iter_mut().enumerate() {
            let o = 576 + i * 24;
            *l = Locator {
                platform: be32(b, o),
                space: be32(b, o + 4),
                length: be32(b, o + 8),
                offset: be64(b, o + 16),
            };
        }
        Ok(DynHeader {
            table_offset: be64(b, 16),
            version: be32(b, 24),
            max_table_entries: be32(b, 28),
            block_size: be32(b, 32),
            parent_uuid: b[40..56].try_into().unwrap_or([0; 16]),
            parent_timestamp: be32(b, 56),
            parent_name,
            locators,
        })
    }

    /// The 1024 bytes on disk, with a fresh checksum.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[..8].copy_from_slice(COOKIE);
        // The spec says 0xFFFFFFFF; Microsoft's tools want all 64 bits.
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.version.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(&self.parent_uuid);
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        for (i, c) in self.parent_name.iter().take(256).enumerate() {
            b[64 + 2 * i..66 + 2 * i].copy_from_slice(&c.to_be_bytes());
        }
        for (i, l) in self.locators.iter().enumerate() {
            let o = 576 + i * 24;
            b[o..o + 4].copy_from_slice(&l.platform.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&l.space.to_be_bytes());
            b[o + 8..o + 12].copy_from_slice(&l.length.to_be_bytes());
            b[o + 16..o + 24].copy_from_slice(&l.offset.to_be_bytes());
        }
        let c = checksum(&b, 36);
        b[36..40].copy_from_slice(&c.to_be_bytes());
        b
    }
}

/// The parent's file name as a locator's data gives it, turned into a
/// path this host can try: Windows separators become `/`, a relative
/// name loses its leading `.\`, a `file://` URL its scheme. `None` for
/// platforms whose data is no path (Mac OS aliases, the deprecated
/// ANSI codes) or data that does not decode.
pub fn locator_path(platform: u32, data: &[u8]) -> Option<String> {
    let text = match platform {
        W2RU | W2KU => {
            let units: Vec<u16> = data
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&c| c != 0)
                .collect();
            String::from_utf16(&units).ok()?
        }
        MACX => {
            let s = std::str::from_utf8(data).ok()?.trim_end_matches('\0');
            let p = s.strip_prefix("file://").unwrap_or(s);
            // "file://localhost/path" and "file:///path" both name /path.
            let p = p.strip_prefix("localhost").unwrap_or(p);
            percent_decode(p)?
        }
        _ => return None,
    };
    if text.is_empty() {
        return None;
    }
    let mut p = text.replace('\\', "/");
    while let Some(rest) = p.strip_prefix("./") {
        p = rest.to_string();
    }
    Some(p)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Locator data for `path` on `platform` (W2ru/W2ku: UTF-16LE with
/// Windows separators; relative names start with `.\`).
pub fn locator_data(platform: u32, path: &str) -> Vec<u8> {
    let mut p = path.replace('/', "\\");
    if platform == W2RU && !p.starts_with(".\\") && !p.starts_with("..\\") {
        p = format!(".\\{p}");
    }
    p.encode_utf16().flat_map(|c| c.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locators_become_paths() {
        let d = locator_data(W2RU, "base.vhd");
        assert_eq!(locator_path(W2RU, &d).as_deref(), Some("base.vhd"));
        let d = locator_data(W2KU, "/tmp/x/base.vhd");
        assert_eq!(locator_path(W2KU, &d).as_deref(), Some("/tmp/x/base.vhd"));
        assert_eq!(
            locator_path(MACX, b"file:///Users/a%20b/p.vhd\0").as_deref(),
            Some("/Users/a b/p.vhd")
        );
        assert_eq!(locator_path(u32::from_be_bytes(*b"Mac "), b"alias"), None);
        assert_eq!(locator_path(W2KU, &[0x00, 0xd8]), None);
    }
}
