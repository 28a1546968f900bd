//! The hard disk footer (spec: "Hard Disk Footer Format") and the disk
//! geometry rules (spec appendix: "CHS Calculation"), with the choice of
//! virtual size between geometry and `current_size`.

use crate::error::{FResult, FormatError};

/// The footer's size in bytes (the spec's 512; pre-2004 Virtual PC wrote
/// 511, which only fixed disks of that era carry and are not supported).
pub const FOOTER_SIZE: usize = 512;
/// The footer's cookie.
pub const COOKIE: &[u8; 8] = b"conectix";
/// `data_offset` of a fixed disk: no further structure.
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 UTC).
pub const VHD_EPOCH: u64 = 946_684_800;
/// The largest geometry: 65535 cylinders, 16 heads, 255 sectors. An image
/// with exactly this geometry has a size CHS cannot express, so its
/// `current_size` is its size whoever made it.
pub const MAX_GEOMETRY: u64 = 65535 * 16 * 255;
/// Largest virtual size in sectors (2040 GiB), what QEMU accepts.
pub const MAX_SECTORS: u64 = 0xff00_0000;

/// Disk types (the footer's `Disk Type` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskType {
    /// Data at the start of the file, footer at the end.
    Fixed,
    /// Blocks allocated on demand through the BAT.
    Dynamic,
    /// A dynamic disk whose unwritten sectors come from a parent.
    Differencing,
}

impl DiskType {
    /// The on-disk value.
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }
    fn from_code(c: u32) -> Option<DiskType> {
        match c {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }
}

/// A parsed footer (all fields big-endian on disk).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    /// `Features` (bit 1 is always set: "reserved").
    pub features: u32,
    /// `File Format Version` (1.0 = 0x00010000).
    pub version: u32,
    /// Offset of the dynamic disk header, or [`NO_DATA_OFFSET`].
    pub data_offset: u64,
    /// Creation time, seconds since the VHD epoch.
    pub timestamp: u32,
    /// The application that created the image (`vpc `, `qemu`, `win `...).
    pub creator_app: [u8; 4],
    /// Its version.
    pub creator_version: u32,
    /// Its host OS (`Wi2k`, `Mac `).
    pub creator_os: [u8; 4],
    /// Size at creation.
    pub original_size: u64,
    /// Current size in bytes.
    pub current_size: u64,
    /// Geometry: cylinders.
    pub cylinders: u16,
    /// Geometry: heads.
    pub heads: u8,
    /// Geometry: sectors per track.
    pub sectors: u8,
    /// The raw disk type.
    pub disk_type: u32,
    /// The stored checksum.
    pub checksum: u32,
    /// The disk's identity (a differencing child names its parent by it).
    pub uuid: [u8; 16],
    /// Saved-state flag.
    pub saved_state: u8,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    (be32(b, o) as u64) << 32 | be32(b, o + 4) as u64
}

/// The spec's checksum: the one's complement of the byte sum, with the
/// checksum field (`at..at+4`) counted as zero.
pub fn checksum(buf: &[u8], at: usize) -> u32 {
    let sum = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| !(at..at + 4).contains(i))
        .fold(0u32, |s, (_, b)| s.wrapping_add(*b as u32));
    !sum
}

impl Footer {
    /// Whether `b` starts with the cookie.
    pub fn has_cookie(b: &[u8]) -> bool {
        b.len() >= 8 && &b[..8] == COOKIE
    }

    /// Parse 512 bytes that start with the cookie; `name` names the
    /// image in errors. The checksum must match.
    pub fn parse(b: &[u8; FOOTER_SIZE], name: &str) -> FResult<Footer> {
        if !Self::has_cookie(b) {
            return Err(FormatError::Corrupt(format!("{name}: invalid VPC image")));
        }
        let f = Footer {
            features: be32(b, 8),
            version: be32(b, 12),
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app: [b[28], b[29], b[30], b[31]],
            creator_version: be32(b, 32),
            creator_os: [b[36], b[37], b[38], b[39]],
            original_size: be64(b, 40),
            current_size: be64(b, 48),
            cylinders: u16::from_be_bytes([b[56], b[57]]),
            heads: b[58],
            sectors: b[59],
            disk_type: be32(b, 60),
            checksum: be32(b, 64),
            uuid: b[68..84].try_into().unwrap_or([0; 16]),
            saved_state: b[84],
        };
        if checksum(b, 64) != f.checksum {
            return Err(FormatError::Corrupt(format!(
                "{name}: Incorrect header checksum"
            )));
        }
        Ok(f)
    }

    /// The 512 bytes on disk, with a fresh checksum.
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[..8].copy_from_slice(COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&self.version.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_os);
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.cylinders.to_be_bytes());
        b[58] = self.heads;
        b[59] = self.sectors;
        b[60..64].copy_from_slice(&self.disk_type.to_be_bytes());
        b[68..84].copy_from_slice(&self.uuid);
        b[84] = self.saved_state;
        let c = checksum(&b, 64);
        b[64..68].copy_from_slice(&c.to_be_bytes());
        b
    }

    /// The disk type, if the footer names a known one.
    pub fn kind(&self) -> Option<DiskType> {
        DiskType::from_code(self.disk_type)
    }

    /// Sectors the geometry describes.
    pub fn chs_sectors(&self) -> u64 {
        self.cylinders as u64 * self.heads as u64 * self.sectors as u64
    }

    /// The virtual size in bytes, by QEMU's rule: Virtual PC and QEMU
    /// (creator `vpc `, `qemu`, and any creator QEMU does not know) size
    /// a disk by its geometry, since the footer's size is usually larger
    /// than what Virtual PC shows; Hyper-V (`win `), Disk2vhd (`d2v `),
    /// XenServer (`tap\0`), XenConverter (`CTXS`) and QEMU with
    /// `force_size` (`qem2`) by `current_size`. The maximal geometry
    /// always means `current_size`, and `size_calc` (the
    /// `force_size_calc` open option) overrides the creator table.
    pub fn virtual_size(&self, size_calc: SizeCalc) -> u64 {
        let by_size = matches!(
            &self.creator_app,
            b"win " | b"qem2" | b"d2v " | b"CTXS" | b"tap\0"
        );
        let use_chs = match size_calc {
            SizeCalc::Auto => !by_size,
            SizeCalc::Chs => true,
            SizeCalc::CurrentSize => false,
        };
        let chs = self.chs_sectors();
        if !use_chs || chs == MAX_GEOMETRY {
            self.current_size / 512 * 512
        } else {
            chs * 512
        }
    }
}

/// How the virtual size is chosen (QEMU's `force_size_calc`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SizeCalc {
    /// By the creator application.
    #[default]
    Auto,
    /// From the geometry.
    Chs,
    /// From `current_size`.
    CurrentSize,
}

impl SizeCalc {
    /// The option's value (`chs`, `current_size`).
    pub fn parse(v: &str) -> Option<SizeCalc> {
        match v {
            "chs" => Some(SizeCalc::Chs),
            "current_size" => Some(SizeCalc::CurrentSize),
            _ => None,
        }
    }
}

/// The spec's geometry for `total` sectors (it may describe fewer: the
/// spec rounds down), allowing up to 255 sectors per track above the
/// ATA limit as QEMU does.
pub fn geometry(total: u64) -> (u16, u8, u8) {
    let total = total.min(MAX_GEOMETRY);
    let (spt, heads, cth): (u64, u64, u64);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17u64;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        (spt, heads, cth) = (s, h, c);
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

/// The geometry and byte size `create` gives a disk of `size` bytes
/// (rounded up to a sector): the smallest geometry that holds it, its
/// size being what the geometry describes; with `force_size`, or when
/// no geometry is large enough, the maximal geometry and `size` itself.
pub fn create_geometry(size: u64, force_size: bool) -> FResult<((u16, u8, u8), u64)> {
    let size = size.div_ceil(512) * 512;
    let chs = if force_size {
        (65535, 16, 255)
    } else {
        let want = (size / 512).min(MAX_GEOMETRY);
        let mut g = (0u16, 0u8, 0u8);
        let mut i = 0;
        // Each step adds a sector; a geometry step is at most 16 x 255
        // sectors, so this ends quickly.
        while want > g.0 as u64 * g.1 as u64 * g.2 as u64 {
            g = geometry(want + i);
            i += 1;
        }
        g
    };
    let sectors = chs.0 as u64 * chs.1 as u64 * chs.2 as u64;
    let bytes = if sectors == MAX_GEOMETRY {
        if size / 512 > MAX_SECTORS {
            return Err(FormatError::Invalid(
                "Disk size is too large, max size is 2040 GiB".into(),
            ));
        }
        size
    } else {
        sectors * 512
    };
    Ok((chs, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_a_geometry() {
        // qemu-img create -f vpc x 100M: 104865792 bytes.
        assert_eq!(create_geometry(100 << 20, false).unwrap().1, 104_865_792);
        assert_eq!(create_geometry(100 << 20, true).unwrap().1, 100 << 20);
        let (g, _) = create_geometry(100 << 20, true).unwrap();
        assert_eq!(g, (65535, 16, 255));
        assert!(create_geometry(3 << 40, true).is_err());
    }

    #[test]
    fn footer_round_trips_with_its_checksum() {
        let f = Footer {
            features: 2,
            version: 0x10000,
            data_offset: 512,
            timestamp: 7,
            creator_app: *b"vpc ",
            creator_version: 0x50003,
            creator_os: *b"Wi2k",
            original_size: 136_365_211_648,
            current_size: 136_365_211_648,
            cylinders: 65278,
            heads: 16,
            sectors: 255,
            disk_type: 3,
            checksum: 0,
            uuid: [1; 16],
            saved_state: 0,
        };
        let b = f.to_bytes();
        let g = Footer::parse(&b, "x").unwrap();
        assert_eq!(g.virtual_size(SizeCalc::Auto), 136_363_130_880);
        assert_eq!(g.virtual_size(SizeCalc::CurrentSize), 136_365_211_648);
        let mut bad = b;
        bad[100] ^= 1;
        assert_eq!(
            Footer::parse(&bad, "x").unwrap_err().to_string(),
            "x: Incorrect header checksum"
        );
    }
}
