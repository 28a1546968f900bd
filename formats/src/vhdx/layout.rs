//! The on-disk structures of a VHDX file, after Microsoft's "VHDX Format
//! Specification v1.00": 2.2 (header section: file type identifier,
//! headers, region tables), 2.5 (BAT entries and their states) and 2.6
//! (metadata region: table, known items, parent locator). Every field is
//! little-endian; GUIDs keep the Windows byte order (first three fields
//! little-endian) so they compare as the bytes on disk. Checksums are
//! CRC-32C over the whole structure with the checksum field zeroed.
//!
//! Parsing only decodes and range-checks what one structure says about
//! itself; how structures relate to the file (bounds, overlaps) is the
//! opener's job ([`super::Vhdx::open`]).

use crate::error::{FResult, FormatError};

/// 1 MiB: the alignment of regions, blocks and the log.
pub const MIB: u64 = 1 << 20;
/// The header section (identifier, two headers, two region tables).
pub const HEADER_SECTION: u64 = MIB;
/// Offsets of the two headers (spec 2.2.2).
pub const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
/// Bytes a header's checksum covers.
pub const HEADER_SIZE: usize = 4096;
/// Offsets of the two region tables (spec 2.2.3).
pub const REGION_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
/// Bytes of a region table (and of the metadata table).
pub const TABLE_SIZE: usize = 64 << 10;
/// Most entries a region or metadata table may hold (spec 2.2.3, 2.6.1).
pub const MAX_TABLE_ENTRIES: u32 = 2047;
/// The file type identifier's signature.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";

/// A GUID in its on-disk byte order.
pub type Guid = [u8; 16];

/// The on-disk bytes of GUID `d1-d2-d3-d4`.
pub const fn guid(d1: u32, d2: u16, d3: u16, d4: u64) -> Guid {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    let d = d4.to_be_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

/// Region: the BAT.
pub const BAT_GUID: Guid = guid(0x2dc2_7766, 0xf623, 0x4200, 0x9d64_115e_9bfd_4a08);
/// Region: the metadata.
pub const METADATA_GUID: Guid = guid(0x8b7c_a206, 0x4790, 0x4b9a, 0xb8fe_575f_050f_886e);
/// Metadata item: file parameters.
pub const FILE_PARAMETERS: Guid = guid(0xcaa1_6737, 0xfa36, 0x4d43, 0xb3b6_33f0_aa44_e76b);
/// Metadata item: virtual disk size.
pub const VIRTUAL_DISK_SIZE: Guid = guid(0x2fa5_4224, 0xcd1b, 0x4876, 0xb211_5dbe_d83b_f4b8);
/// Metadata item: page 83 data (the disk's SCSI identity).
pub const PAGE83_DATA: Guid = guid(0xbeca_12ab, 0xb2e6, 0x4523, 0x93ef_c309_e000_c746);
/// Metadata item: logical sector size.
pub const LOGICAL_SECTOR_SIZE: Guid = guid(0x8141_bf1d, 0xa96f, 0x4709, 0xba47_f233_a8fa_ab5f);
/// Metadata item: physical sector size.
pub const PHYSICAL_SECTOR_SIZE: Guid = guid(0xcda3_48c7, 0x445d, 0x4471, 0x9cc9_e988_5251_c556);
/// Metadata item: parent locator.
pub const PARENT_LOCATOR: Guid = guid(0xa8d3_5f2d, 0xb30b, 0x454d, 0xabf7_d3d8_4834_ab0c);
/// The parent locator type of a VHDX parent (spec 2.6.2.6.1).
pub const VHDX_LOCATOR_TYPE: Guid = guid(0xb04a_efb7, 0xd19e, 0x4a81, 0xb789_25b8_e944_5913);

/// BAT entry states (spec 2.5.1.1, 2.5.1.2).
pub const PAYLOAD_NOT_PRESENT: u64 = 0;
/// Contents undefined (read as the parent's, or zeroes).
pub const PAYLOAD_UNDEFINED: u64 = 1;
/// Reads as zeroes.
pub const PAYLOAD_ZERO: u64 = 2;
/// Unmapped (trimmed): reads as zeroes here.
pub const PAYLOAD_UNMAPPED: u64 = 3;
/// Every sector is in the file.
pub const PAYLOAD_FULLY_PRESENT: u64 = 6;
/// Some sectors are in the file, as the sector bitmap says.
pub const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
/// A sector bitmap block that is in the file.
pub const SB_PRESENT: u64 = 6;
/// The state bits of a BAT entry.
pub const STATE_MASK: u64 = 7;
/// The file offset bits of a BAT entry (a multiple of 1 MiB).
pub const OFFSET_MASK: u64 = !(MIB - 1);

/// Sectors one sector bitmap block describes (2^23, one bit each).
pub const SECTORS_PER_BITMAP: u64 = 1 << 23;

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            // Castagnoli's polynomial, reflected.
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32C of `data` (a table per byte: metadata is checksummed rarely).
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Whether the checksum at byte `at` of `buf` matches the rest.
pub fn checksum_ok(buf: &[u8], at: usize) -> bool {
    let Some(stored) = buf.get(at..at + 4) else {
        return false;
    };
    let stored = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]);
    let mut copy = buf.to_vec();
    copy[at..at + 4].fill(0);
    crc32c(&copy) == stored
}

/// Store the checksum of `buf` at byte `at`.
pub fn set_checksum(buf: &mut [u8], at: usize) {
    buf[at..at + 4].fill(0);
    let c = crc32c(buf);
    buf[at..at + 4].copy_from_slice(&c.to_le_bytes());
}

/// Little-endian field readers over a slice whose length the caller
/// checked.
pub fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
/// A 32-bit field.
pub fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
/// A 64-bit field.
pub fn le64(b: &[u8], o: usize) -> u64 {
    le32(b, o) as u64 | (le32(b, o + 4) as u64) << 32
}
/// A GUID field.
pub fn guid_at(b: &[u8], o: usize) -> Guid {
    let mut g = [0u8; 16];
    g.copy_from_slice(&b[o..o + 16]);
    g
}

/// One of the two headers (spec 2.2.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Higher is newer.
    pub sequence: u64,
    /// Changed before the first write to the file after an open.
    pub file_write_guid: Guid,
    /// Changed before the first write of guest-visible data.
    pub data_write_guid: Guid,
    /// Non-zero: the log may hold entries to replay (they carry it).
    pub log_guid: Guid,
    /// Must be 0.
    pub log_version: u16,
    /// Must be 1.
    pub version: u16,
    /// Bytes of the log (a multiple of 1 MiB).
    pub log_length: u32,
    /// Where the log is (a multiple of 1 MiB).
    pub log_offset: u64,
}

impl Header {
    /// The header in `b` (4 KiB), if its signature, checksum and
    /// version make it valid.
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_SIZE || &b[..4] != b"head" || !checksum_ok(&b[..HEADER_SIZE], 4) {
            return None;
        }
        let h = Header {
            sequence: le64(b, 8),
            file_write_guid: guid_at(b, 16),
            data_write_guid: guid_at(b, 32),
            log_guid: guid_at(b, 48),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        };
        (h.version == 1).then_some(h)
    }

    /// The 4 KiB on disk, with its checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..4].copy_from_slice(b"head");
        b[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid);
        b[32..48].copy_from_slice(&self.data_write_guid);
        b[48..64].copy_from_slice(&self.log_guid);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        set_checksum(&mut b, 4);
        b
    }
}

/// A region table entry (spec 2.2.3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// What the region is.
    pub guid: Guid,
    /// Where (a multiple of 1 MiB, past the header section).
    pub offset: u64,
    /// Bytes (a multiple of 1 MiB).
    pub length: u32,
    /// A reader that does not know the region must refuse the file.
    pub required: bool,
}

/// Parse a region table (64 KiB); `None` if its signature or checksum
/// is wrong, an error if it is valid but says something impossible.
pub fn parse_regions(b: &[u8], name: &str) -> FResult<Option<Vec<Region>>> {
    if b.len() < TABLE_SIZE || &b[..4] != b"regi" || !checksum_ok(&b[..TABLE_SIZE], 4) {
        return Ok(None);
    }
    let n = le32(b, 8);
    if n > MAX_TABLE_ENTRIES {
        return Err(FormatError::Corrupt(format!(
            "{name}: the region table has {n} entries (at most {MAX_TABLE_ENTRIES} are allowed)"
        )));
    }
    Ok(Some(
        (0..n as usize)
            .map(|i| {
                let o = 16 + 32 * i;
                Region {
                    guid: guid_at(b, o),
                    offset: le64(b, o + 16),
                    length: le32(b, o + 24),
                    required: le32(b, o + 28) & 1 != 0,
                }
            })
            .collect(),
    ))
}

/// A region table's 64 KiB, with its checksum.
pub fn regions_to_bytes(regions: &[Region]) -> Vec<u8> {
    let mut b = vec![0u8; TABLE_SIZE];
    b[..4].copy_from_slice(b"regi");
    b[8..12].copy_from_slice(&(regions.len() as u32).to_le_bytes());
    for (i, r) in regions.iter().enumerate() {
        let o = 16 + 32 * i;
        b[o..o + 16].copy_from_slice(&r.guid);
        b[o + 16..o + 24].copy_from_slice(&r.offset.to_le_bytes());
        b[o + 24..o + 28].copy_from_slice(&r.length.to_le_bytes());
        b[o + 28..o + 32].copy_from_slice(&(r.required as u32).to_le_bytes());
    }
    set_checksum(&mut b, 4);
    b
}

/// A metadata table entry (spec 2.6.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaEntry {
    /// What the item is.
    pub guid: Guid,
    /// Where, from the start of the metadata region (at least 64 KiB).
    pub offset: u32,
    /// Bytes.
    pub length: u32,
    /// Describes the virtual disk (as opposed to the file).
    pub virtual_disk: bool,
    /// A reader that does not know the item must refuse the file.
    pub required: bool,
    /// A user item (not a system one).
    pub user: bool,
}

/// Parse the metadata table (the region's first 64 KiB).
pub fn parse_metadata_table(b: &[u8], name: &str) -> FResult<Vec<MetaEntry>> {
    if b.len() < TABLE_SIZE || &b[..8] != b"metadata" {
        return Err(FormatError::Corrupt(format!(
            "{name}: Invalid VHDX metadata table signature"
        )));
    }
    let n = le16(b, 10) as u32;
    if n > MAX_TABLE_ENTRIES {
        return Err(FormatError::Corrupt(format!(
            "{name}: the metadata table has {n} entries (at most {MAX_TABLE_ENTRIES} are allowed)"
        )));
    }
    Ok((0..n as usize)
        .map(|i| {
            let o = 32 + 32 * i;
            let flags = le32(b, o + 24);
            MetaEntry {
                guid: guid_at(b, o),
                offset: le32(b, o + 16),
                length: le32(b, o + 20),
                user: flags & 1 != 0,
                virtual_disk: flags & 2 != 0,
                required: flags & 4 != 0,
            }
        })
        .collect())
}

/// The metadata table's 64 KiB.
pub fn metadata_table_to_bytes(entries: &[MetaEntry]) -> Vec<u8> {
    let mut b = vec![0u8; TABLE_SIZE];
    b[..8].copy_from_slice(b"metadata");
    b[10..12].copy_from_slice(&(entries.len() as u16).to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let o = 32 + 32 * i;
        b[o..o + 16].copy_from_slice(&e.guid);
        b[o + 16..o + 20].copy_from_slice(&e.offset.to_le_bytes());
        b[o + 20..o + 24].copy_from_slice(&e.length.to_le_bytes());
        let flags = e.user as u32 | (e.virtual_disk as u32) << 1 | (e.required as u32) << 2;
        b[o + 24..o + 28].copy_from_slice(&flags.to_le_bytes());
    }
    b
}

/// Parse a parent locator item (spec 2.6.2.6): its type and its
/// key/value pairs (UTF-16LE strings at offsets within the item).
pub fn parse_locator(b: &[u8], name: &str) -> FResult<(Guid, Vec<(String, String)>)> {
    let bad = |what: &str| FormatError::Corrupt(format!("{name}: invalid parent locator: {what}"));
    if b.len() < 20 {
        return Err(bad("too short"));
    }
    let kind = guid_at(b, 0);
    let n = le16(b, 18) as usize;
    if 20 + n * 12 > b.len() {
        return Err(bad("more entries than the item holds"));
    }
    let text = |off: u32, len: u16| -> FResult<String> {
        let (off, len) = (off as usize, len as usize);
        let s = b
            .get(off..off + len)
            .filter(|_| len % 2 == 0)
            .ok_or_else(|| bad("a key or value lies outside the item"))?;
        let units: Vec<u16> = s.chunks_exact(2).map(|c| le16(c, 0)).collect();
        String::from_utf16(&units).map_err(|_| bad("a key or value is not UTF-16"))
    };
    let mut kv = Vec::with_capacity(n);
    for i in 0..n {
        let o = 20 + 12 * i;
        let k = text(le32(b, o), le16(b, o + 8))?;
        let v = text(le32(b, o + 4), le16(b, o + 10))?;
        kv.push((k, v));
    }
    Ok((kind, kv))
}

/// A parent locator item of type VHDX holding `kv`.
pub fn locator_to_bytes(kv: &[(String, String)]) -> Vec<u8> {
    let mut b = vec![0u8; 20 + 12 * kv.len()];
    b[..16].copy_from_slice(&VHDX_LOCATOR_TYPE);
    b[18..20].copy_from_slice(&(kv.len() as u16).to_le_bytes());
    for (i, (k, v)) in kv.iter().enumerate() {
        let mut put = |s: &str| {
            let at = b.len() as u32;
            let bytes: Vec<u8> = s.encode_utf16().flat_map(|c| c.to_le_bytes()).collect();
            b.extend_from_slice(&bytes);
            (at, bytes.len() as u16)
        };
        let (ko, kl) = put(k);
        let (vo, vl) = put(v);
        let o = 20 + 12 * i;
        b[o..o + 4].copy_from_slice(&ko.to_le_bytes());
        b[o + 4..o + 8].copy_from_slice(&vo.to_le_bytes());
        b[o + 8..o + 10].copy_from_slice(&kl.to_le_bytes());
        b[o + 10..o + 12].copy_from_slice(&vl.to_le_bytes());
    }
    b
}

/// A GUID as text, `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` as parent
/// locators write it.
pub fn guid_text(g: &Guid) -> String {
    format!(
        "{{{:08x}-{:04x}-{:04x}-{:04x}-{:012x}}}",
        le32(g, 0),
        le16(g, 4),
        le16(g, 6),
        u16::from_be_bytes([g[8], g[9]]),
        u64::from_be_bytes([0, 0, g[10], g[11], g[12], g[13], g[14], g[15]])
    )
}

/// The GUID `guid_text` wrote (braces optional), if it is one.
pub fn parse_guid_text(s: &str) -> Option<Guid> {
    let s = s.trim().trim_start_matches('{').trim_end_matches('}');
    let hex: String = s.chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let n = u128::from_str_radix(&hex, 16).ok()?;
    Some(guid(
        (n >> 96) as u32,
        (n >> 80) as u16,
        (n >> 64) as u16,
        n as u64,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_value() {
        // The check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn guid_text_round_trips() {
        let t = guid_text(&BAT_GUID);
        assert_eq!(t, "{2dc27766-f623-4200-9d64-115e9bfd4a08}");
        assert_eq!(parse_guid_text(&t), Some(BAT_GUID));
        assert_eq!(parse_guid_text("nope"), None);
    }

    #[test]
    fn structures_round_trip() {
        let h = Header {
            sequence: 9,
            file_write_guid: [1; 16],
            data_write_guid: [2; 16],
            log_guid: [0; 16],
            log_version: 0,
            version: 1,
            log_length: 1 << 20,
            log_offset: 1 << 20,
        };
        assert_eq!(Header::parse(&h.to_bytes()), Some(h.clone()));
        let mut bad = h.to_bytes();
        bad[100] ^= 1;
        assert_eq!(Header::parse(&bad), None);
        let r = vec![Region {
            guid: BAT_GUID,
            offset: 2 << 20,
            length: 1 << 20,
            required: true,
        }];
        assert_eq!(parse_regions(&regions_to_bytes(&r), "x").unwrap(), Some(r));
        let kv = vec![("parent_linkage".to_string(), "{x}".to_string())];
        let b = locator_to_bytes(&kv);
        assert_eq!(parse_locator(&b, "x").unwrap(), (VHDX_LOCATOR_TYPE, kv));
    }
}
