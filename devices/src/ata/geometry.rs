//! CHS geometry of an ATA disk and the BIOS translation, guessed the way
//! QEMU guesses them (hw/block/hd-geometry.c behaviour) so that disks
//! partitioned under QEMU keep their logical geometry under Strata:
//!
//! 1. If sector 0 holds an MBR whose partitions end on a consistent
//!    head/sector boundary, that logical geometry is used. With at most 16
//!    heads it is also the physical geometry (no translation); with more,
//!    a BIOS translation was in use, so the disk gets the standard
//!    geometry and LARGE or LBA translation.
//! 2. Otherwise the standard geometry: 16 heads, 63 sectors, and as many
//!    cylinders as fit (2..=16383), with a translation only when the
//!    geometry exceeds what INT 13h can address (1024 cylinders).

/// BIOS translation (the CMOS 0x39 encoding SeaBIOS reads, 2 bits a
/// drive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Translation {
    None,
    Lba,
    Large,
    Rechs,
}

impl Translation {
    pub fn parse(s: &str) -> Option<Option<Self>> {
        Some(match s {
            "auto" => None,
            "none" => Some(Translation::None),
            "lba" => Some(Translation::Lba),
            "large" => Some(Translation::Large),
            "rechs" => Some(Translation::Rechs),
            _ => return None,
        })
    }
    pub fn cmos_bits(self) -> u8 {
        match self {
            Translation::None => 0,
            Translation::Lba => 1,
            Translation::Large => 2,
            Translation::Rechs => 3,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Geometry {
    pub cyls: u32,
    pub heads: u32,
    pub secs: u32,
}

impl Geometry {
    /// Validates user-given values (QEMU's limits for IDE).
    pub fn checked(cyls: u32, heads: u32, secs: u32) -> Result<Geometry, String> {
        if !(1..=65535).contains(&cyls) {
            return Err(format!("cyls={cyls} must be between 1 and 65535"));
        }
        if !(1..=16).contains(&heads) {
            return Err(format!("heads={heads} must be between 1 and 16"));
        }
        if !(1..=255).contains(&secs) {
            return Err(format!("secs={secs} must be between 1 and 255"));
        }
        Ok(Geometry { cyls, heads, secs })
    }
}

fn standard(sectors: u64) -> Geometry {
    let cyls = (sectors / (16 * 63)).clamp(2, 16383) as u32;
    Geometry {
        cyls,
        heads: 16,
        secs: 63,
    }
}

fn auto_translation(g: Geometry) -> Translation {
    if g.cyls <= 1024 && g.heads <= 16 && g.secs <= 63 {
        Translation::None
    } else if g.cyls * g.heads <= 131072 {
        Translation::Large
    } else {
        Translation::Lba
    }
}

/// The logical geometry an MBR's partition table implies, if any.
fn mbr_lchs(sector0: &[u8], sectors: u64) -> Option<Geometry> {
    if sector0.len() < 512 || sector0[510] != 0x55 || sector0[511] != 0xaa {
        return None;
    }
    for i in 0..4 {
        let e = &sector0[446 + 16 * i..462 + 16 * i];
        let nr_sects = u32::from_le_bytes([e[12], e[13], e[14], e[15]]);
        let end_head = e[5] as u32;
        let end_sector = (e[6] & 63) as u32;
        if nr_sects == 0 || end_sector == 0 {
            continue;
        }
        let heads = end_head + 1;
        let cyls = sectors / (heads as u64 * end_sector as u64);
        if (1..=16383).contains(&cyls) {
            return Some(Geometry {
                cyls: cyls as u32,
                heads,
                secs: end_sector,
            });
        }
    }
    None
}

/// Physical geometry and translation for a disk of `sectors` sectors whose
/// first sector is `sector0`, with the user's overrides applied.
pub fn guess(
    sectors: u64,
    sector0: &[u8],
    given: Option<Geometry>,
    given_trans: Option<Translation>,
) -> (Geometry, Translation) {
    let (g, t) = match given {
        Some(g) => (g, auto_translation(g)),
        None => match mbr_lchs(sector0, sectors) {
            None => {
                let g = standard(sectors);
                (g, auto_translation(g))
            }
            Some(l) if l.heads > 16 => {
                let g = standard(sectors);
                let t = if g.cyls * g.heads <= 131072 {
                    Translation::Large
                } else {
                    Translation::Lba
                };
                (g, t)
            }
            Some(l) => (l, Translation::None),
        },
    };
    (g, given_trans.unwrap_or(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_and_mbr_geometries() {
        // 10 MiB, no MBR: 20 cylinders, no translation.
        let (g, t) = guess(20480, &[0; 512], None, None);
        assert_eq!(
            (g.cyls, g.heads, g.secs, t),
            (20, 16, 63, Translation::None)
        );
        // 8 GiB: capped at 16383 cylinders, LBA translation.
        let (g, t) = guess(16 << 21, &[0; 512], None, None);
        assert_eq!((g.cyls, t), (16383, Translation::Lba));
        // MBR partition ending at head 254, sector 63: LCHS 255 heads, so
        // the standard geometry with LARGE translation for a 1 GiB disk.
        let mut mbr = [0u8; 512];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        mbr[446 + 5] = 254;
        mbr[446 + 6] = 63;
        mbr[446 + 12] = 1;
        let (g, t) = guess(2 << 20, &mbr, None, None);
        assert_eq!((g.heads, t), (16, Translation::Large));
        // MBR with 4 heads x 32 sectors: used as is.
        mbr[446 + 5] = 3;
        mbr[446 + 6] = 32;
        let (g, t) = guess(8192, &mbr, None, None);
        assert_eq!((g.cyls, g.heads, g.secs, t), (64, 4, 32, Translation::None));
        let given = Geometry::checked(100, 4, 17).unwrap();
        assert_eq!(
            guess(8192, &mbr, Some(given), Some(Translation::Lba)),
            (given, Translation::Lba)
        );
        assert!(Geometry::checked(1, 17, 1).is_err());
    }
}
