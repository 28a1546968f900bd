//! The binary records of sparse extents, after VMware's "Virtual Disk
//! Format 5.0": "Hosted Sparse Extent Header" (the `KDMV` header,
//! versions 1 to 3), "Stream-Optimized Compressed Sparse Extents" (grain
//! markers, metadata markers, the footer and the end-of-stream marker),
//! and the ESX Server 2.x "VMFS Sparse Extent" (`COWD`) header that
//! QEMU also reads.
//!
//! Every field is little-endian; offsets and sizes count 512-byte
//! sectors. Parsing checks nothing but the magic: what the values mean
//! for the file is judged where the extent is opened.

use crate::error::{FResult, FormatError};

/// The hosted sparse extent magic (`KDMV`, big-endian at offset 0).
pub const MAGIC_V4: &[u8; 4] = b"KDMV";
/// The VMFS sparse (COWD) magic.
pub const MAGIC_V3: &[u8; 4] = b"COWD";
/// Flag: a valid newline-detection test in the header.
pub const FLAG_NL_DETECT: u32 = 1 << 0;
/// Flag: a redundant grain directory exists.
pub const FLAG_RGD: u32 = 1 << 1;
/// Flag: a grain table entry of 1 means "zeroed grain".
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Flag: grains are compressed.
pub const FLAG_COMPRESS: u32 = 1 << 16;
/// Flag: grains and metadata are preceded by markers.
pub const FLAG_MARKER: u32 = 1 << 17;
/// `gdOffset` meaning "the grain directory is named by the footer".
pub const GD_AT_END: u64 = u64::MAX;
/// `compressAlgorithm` for deflate (zlib streams).
pub const COMPRESSION_DEFLATE: u16 = 1;
/// The newline-detection bytes (`"\n \r\n"`).
pub const CHECK_BYTES: [u8; 4] = [0x0a, 0x20, 0x0d, 0x0a];
/// Metadata marker type: end of stream.
pub const MARKER_EOS: u32 = 0;
/// Metadata marker type: a grain table follows.
pub const MARKER_GT: u32 = 1;
/// Metadata marker type: a grain directory follows.
pub const MARKER_GD: u32 = 2;
/// Metadata marker type: the footer follows.
pub const MARKER_FOOTER: u32 = 3;
/// A grain marker's size before the compressed bytes (lba, size).
pub const GRAIN_MARKER: usize = 12;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// The hosted sparse extent header (its first sector, magic included).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SparseHeader {
    /// 1, 2 (zeroed grains) or 3 (change tracking; streams).
    pub version: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Extent size, sectors.
    pub capacity: u64,
    /// Grain size, sectors.
    pub granularity: u64,
    /// Embedded descriptor, sector offset (0: none).
    pub desc_offset: u64,
    /// Embedded descriptor, sectors.
    pub desc_size: u64,
    /// Entries per grain table.
    pub num_gtes_per_gt: u32,
    /// Redundant grain directory, sector offset.
    pub rgd_offset: u64,
    /// Grain directory, sector offset ([`GD_AT_END`]: in the footer).
    pub gd_offset: u64,
    /// First grain's sector (the end of the metadata).
    pub grain_offset: u64,
    /// The newline-detection bytes as read.
    pub check_bytes: [u8; 4],
    /// 0 none, 1 deflate.
    pub compress_algorithm: u16,
}

impl SparseHeader {
    /// Parse a header sector that starts with [`MAGIC_V4`].
    pub fn parse(b: &[u8; 512], name: &str) -> FResult<SparseHeader> {
        if &b[..4] != MAGIC_V4 {
            return Err(FormatError::Corrupt(format!(
                "{name}: Image not in VMDK format"
            )));
        }
        let mut check_bytes = [0u8; 4];
        check_bytes.copy_from_slice(&b[73..77]);
        Ok(SparseHeader {
            version: u32_at(b, 4),
            flags: u32_at(b, 8),
            capacity: u64_at(b, 12),
            granularity: u64_at(b, 20),
            desc_offset: u64_at(b, 28),
            desc_size: u64_at(b, 36),
            num_gtes_per_gt: u32_at(b, 44),
            rgd_offset: u64_at(b, 48),
            gd_offset: u64_at(b, 56),
            grain_offset: u64_at(b, 64),
            check_bytes,
            compress_algorithm: u16_at(b, 77),
        })
    }

    /// The header sector.
    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..4].copy_from_slice(MAGIC_V4);
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.granularity.to_le_bytes());
        b[28..36].copy_from_slice(&self.desc_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.desc_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.num_gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.grain_offset.to_le_bytes());
        b[73..77].copy_from_slice(&self.check_bytes);
        b[77..79].copy_from_slice(&self.compress_algorithm.to_le_bytes());
        b
    }

    /// Grains are deflate-compressed.
    pub fn compressed(&self) -> bool {
        self.compress_algorithm == COMPRESSION_DEFLATE
    }
}

/// The VMFS sparse (`COWD`) header fields QEMU uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CowdHeader {
    /// Version.
    pub version: u32,
    /// Extent size, sectors.
    pub disk_sectors: u32,
    /// Grain size, sectors.
    pub granularity: u32,
    /// Grain directory, sector offset.
    pub l1dir_offset: u32,
    /// Grain directory entries.
    pub l1dir_size: u32,
}

/// Entries per grain table of a COWD extent.
pub const COWD_GTES: u32 = 4096;

impl CowdHeader {
    /// Parse a header sector that starts with [`MAGIC_V3`].
    pub fn parse(b: &[u8; 512]) -> CowdHeader {
        CowdHeader {
            version: u32_at(b, 4),
            disk_sectors: u32_at(b, 12),
            granularity: u32_at(b, 16),
            l1dir_offset: u32_at(b, 20),
            l1dir_size: u32_at(b, 24),
        }
    }
}

/// A metadata marker sector: (value, size, type). A grain marker has a
/// non-zero size where a metadata marker has 0.
pub fn parse_marker(b: &[u8]) -> (u64, u32, u32) {
    (u64_at(b, 0), u32_at(b, 8), u32_at(b, 12))
}

/// A metadata marker sector.
pub fn marker(value: u64, kind: u32) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[..8].copy_from_slice(&value.to_le_bytes());
    b[12..16].copy_from_slice(&kind.to_le_bytes());
    b
}

/// The three sectors that end a stream: footer marker, footer (a copy
/// of the header naming the grain directory), end-of-stream marker.
pub fn stream_tail(footer: &SparseHeader) -> Vec<u8> {
    let mut v = Vec::with_capacity(1536);
    v.extend_from_slice(&marker(1, MARKER_FOOTER));
    v.extend_from_slice(&footer.to_bytes());
    v.extend_from_slice(&marker(0, MARKER_EOS));
    v
}

/// Parse the stream tail (the last 1536 bytes of the file): the footer
/// header, if the markers are right.
pub fn parse_stream_tail(b: &[u8; 1536], name: &str) -> FResult<SparseHeader> {
    let (_, fsize, ftype) = parse_marker(&b[..16]);
    let (eval, esize, etype) = parse_marker(&b[1024..1040]);
    if &b[512..516] != MAGIC_V4
        || fsize != 0
        || ftype != MARKER_FOOTER
        || eval != 0
        || esize != 0
        || etype != MARKER_EOS
    {
        return Err(FormatError::Corrupt(format!("{name}: Invalid footer")));
    }
    let mut h = [0u8; 512];
    h.copy_from_slice(&b[512..1024]);
    SparseHeader::parse(&h, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = SparseHeader {
            version: 3,
            flags: FLAG_NL_DETECT | FLAG_COMPRESS | FLAG_MARKER,
            capacity: 1 << 20,
            granularity: 128,
            desc_offset: 1,
            desc_size: 20,
            num_gtes_per_gt: 512,
            rgd_offset: 21,
            gd_offset: GD_AT_END,
            grain_offset: 128,
            check_bytes: CHECK_BYTES,
            compress_algorithm: COMPRESSION_DEFLATE,
        };
        assert_eq!(SparseHeader::parse(&h.to_bytes(), "x").unwrap(), h);
        let mut t = [0u8; 1536];
        t.copy_from_slice(&stream_tail(&h));
        assert_eq!(parse_stream_tail(&t, "x").unwrap(), h);
        t[1024] = 1;
        assert!(parse_stream_tail(&t, "x").is_err());
    }
}
