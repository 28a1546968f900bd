//! Where everything lies on the synthesized disk, and the sectors that
//! describe it: the MBR's partition table, the boot sector with its BPB
//! and, for FAT32, the FSInfo sector and the backup boot sector.
//!
//! Spec: Microsoft's "FAT: General Overview of On-Disk Format" (fatgen103),
//! sections "Boot Sector and BPB", "FAT Type Determination" and "FAT32
//! FSInfo Sector Structure and Backup Boot Sector"; the MBR partition
//! entry is the IBM PC one (CHS start and end, LBA start and length).
//!
//! The sizes are QEMU's (block/vvfat.c): a hard disk of 16 heads and 63
//! sectors per track, 1024 cylinders (504 MiB) for FAT16 and FAT32 and 64
//! (31.5 MiB) for FAT12, whose one partition starts at sector 63; a
//! floppy of 80 cylinders and 2 heads, 36 sectors per track (2.88 MB) by
//! default and 18 (1.44 MB) with FAT12 asked for, with no partition table.
//! Clusters are 8 KiB (16 sectors) with one reserved sector and 512 root
//! entries, as QEMU has them, except where QEMU's own layout is not a
//! valid FAT of the type its boot sector names (fatgen103 decides the type
//! by the count of clusters alone, and so do Linux, mtools and fsck):
//! * a FAT16 floppy has 1-sector clusters (QEMU's 8 KiB clusters leave
//!   357 clusters, which every reader takes for FAT12);
//! * FAT32 is a real FAT32 volume (QEMU writes a FAT16 boot sector): 4 KiB
//!   clusters (over 65,525 of them), 32 reserved sectors with FSInfo at 1
//!   and the backup boot sector at 6, the root directory a cluster chain
//!   starting at cluster 2.

use super::SECTOR;

/// The FAT variant: the width of a FAT entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FatType {
    /// 12-bit entries.
    Fat12,
    /// 16-bit entries.
    Fat16,
    /// 28-bit entries in 32-bit slots.
    Fat32,
}

impl FatType {
    /// From the `fat-type` option's number.
    pub fn from_bits(bits: u64) -> Option<FatType> {
        match bits {
            12 => Some(FatType::Fat12),
            16 => Some(FatType::Fat16),
            32 => Some(FatType::Fat32),
            _ => None,
        }
    }
    /// Bits per FAT entry as stored (32 for FAT32).
    pub fn bits(self) -> u32 {
        match self {
            FatType::Fat12 => 12,
            FatType::Fat16 => 16,
            FatType::Fat32 => 32,
        }
    }
    /// The end-of-chain mark written (the largest value).
    pub fn eoc(self) -> u32 {
        match self {
            FatType::Fat12 => 0xfff,
            FatType::Fat16 => 0xffff,
            FatType::Fat32 => 0x0fff_ffff,
        }
    }
    /// Whether `v` ends a chain (fatgen103: any value from 0x?FF8 up).
    pub fn is_eoc(self, v: u32) -> bool {
        v >= self.eoc() - 7
    }
    /// "FAT12" and so on.
    pub fn name(self) -> &'static str {
        match self {
            FatType::Fat12 => "FAT12",
            FatType::Fat16 => "FAT16",
            FatType::Fat32 => "FAT32",
        }
    }
}

/// The volume serial number QEMU writes (0xfabe1afd), also the MBR's
/// disk signature byte-swapped as QEMU has it.
const VOLUME_ID: u32 = 0xfabe_1afd;
const DISK_SIGNATURE: u32 = 0xbe1a_fdfa;

/// A boot stub where the jump at byte 0 lands: `int 18h` (the BIOS tries
/// the next boot device) then `jmp $`. QEMU leaves zeroes there, which a
/// BIOS booting the disk would execute.
const BOOT_STUB: [u8; 4] = [0xcd, 0x18, 0xeb, 0xfe];

/// The layout of one synthesized disk or floppy. Sector numbers are
/// absolute (from the start of the disk); clusters are numbered as the FAT
/// numbers them, the first data cluster being 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// The FAT variant.
    pub fat_type: FatType,
    /// A floppy: no MBR, media byte 0xf0, drive number 0.
    pub floppy: bool,
    /// CHS geometry, for the BPB and the partition entry.
    pub cylinders: u32,
    /// See `cylinders`.
    pub heads: u32,
    /// See `cylinders`.
    pub sectors_per_track: u32,
    /// Sectors of the whole disk.
    pub total_sectors: u32,
    /// First sector of the FAT volume (63 on a disk, 0 on a floppy).
    pub part_start: u32,
    /// Sectors of the FAT volume.
    pub part_sectors: u32,
    /// Sectors per cluster.
    pub spc: u32,
    /// Reserved sectors at the start of the volume (the boot sector
    /// and, on FAT32, FSInfo and the backup boot sector).
    pub reserved: u32,
    /// Sectors per FAT (there are two FATs).
    pub spf: u32,
    /// Entries of the fixed root directory (0 on FAT32).
    pub root_entries: u32,
    /// Count of data clusters (fatgen103's CountofClusters).
    pub clusters: u32,
}

/// The first cluster of FAT32's root directory.
pub const FAT32_ROOT_CLUSTER: u32 = 2;

impl Geometry {
    /// The layout for `fat_type` (QEMU's default when `None`: FAT16 for a
    /// disk, FAT12 for a floppy). A FAT32 floppy is refused: 2.88 MB holds
    /// too few clusters to be FAT32.
    pub fn new(fat_type: Option<FatType>, floppy: bool) -> Result<Geometry, String> {
        let (ty, cylinders, heads, spt, part_start, spc, reserved) = if floppy {
            match fat_type {
                None => (FatType::Fat12, 80, 2, 36, 0, 16, 1),
                Some(FatType::Fat12) => (FatType::Fat12, 80, 2, 18, 0, 16, 1),
                Some(FatType::Fat16) => (FatType::Fat16, 80, 2, 36, 0, 1, 1),
                Some(FatType::Fat32) => {
                    return Err("a floppy cannot be FAT32 (use fat-type 12 or 16)".into())
                }
            }
        } else {
            match fat_type.unwrap_or(FatType::Fat16) {
                FatType::Fat12 => (FatType::Fat12, 64, 16, 63, 63, 16, 1),
                FatType::Fat16 => (FatType::Fat16, 1024, 16, 63, 63, 16, 1),
                FatType::Fat32 => (FatType::Fat32, 1024, 16, 63, 63, 8, 32),
            }
        };
        let total_sectors = cylinders * heads * spt;
        let part_sectors = total_sectors - part_start;
        let root_entries = if ty == FatType::Fat32 { 0 } else { 512 };
        let root_sectors = root_entries * 32 / SECTOR as u32;
        // A FAT big enough for every cluster the area after it could
        // hold (an upper bound, as the FATs take some of that area): for
        // QEMU's layouts this is the very size QEMU computes.
        let upper = (part_sectors - reserved - root_sectors).div_ceil(spc) + 2;
        let spf = (upper * ty.bits()).div_ceil(8 * SECTOR as u32);
        let data = part_sectors - reserved - 2 * spf - root_sectors;
        let clusters = data / spc;
        let g = Geometry {
            fat_type: ty,
            floppy,
            cylinders,
            heads,
            sectors_per_track: spt,
            total_sectors,
            part_start,
            part_sectors,
            spc,
            reserved,
            spf,
            root_entries,
            clusters,
        };
        debug_assert!(g.fat_entries() >= clusters + 2);
        Ok(g)
    }

    /// The disk's size in bytes.
    pub fn disk_bytes(&self) -> u64 {
        u64::from(self.total_sectors) * SECTOR
    }
    /// First sector of the first FAT.
    pub fn fat_start(&self) -> u64 {
        u64::from(self.part_start + self.reserved)
    }
    /// First sector of the fixed root directory (FAT12/16) or of the
    /// data area (FAT32, where there is none).
    pub fn root_start(&self) -> u64 {
        self.fat_start() + 2 * u64::from(self.spf)
    }
    /// Sectors of the fixed root directory.
    pub fn root_sectors(&self) -> u64 {
        u64::from(self.root_entries) * 32 / SECTOR
    }
    /// First sector of cluster 2.
    pub fn data_start(&self) -> u64 {
        self.root_start() + self.root_sectors()
    }
    /// Bytes per cluster.
    pub fn cluster_bytes(&self) -> u64 {
        u64::from(self.spc) * SECTOR
    }
    /// The highest valid cluster number.
    pub fn last_cluster(&self) -> u32 {
        self.clusters + 1
    }
    /// Whether `c` names a data cluster.
    pub fn valid_cluster(&self, c: u32) -> bool {
        (2..=self.last_cluster()).contains(&c)
    }
    /// First sector of data cluster `c` (at least 2).
    pub fn cluster_sector(&self, c: u32) -> u64 {
        self.data_start() + u64::from(c - 2) * u64::from(self.spc)
    }
    /// Entries one FAT has room for.
    pub fn fat_entries(&self) -> u32 {
        self.spf * SECTOR as u32 * 8 / self.fat_type.bits()
    }
    /// The media descriptor (fatgen103: 0xF8 fixed, 0xF0 removable).
    pub fn media(&self) -> u8 {
        if self.floppy {
            0xf0
        } else {
            0xf8
        }
    }
    /// The first cluster of the root directory: 0 where it is the fixed
    /// area (as `..` entries name it), 2 on FAT32.
    pub fn root_cluster(&self) -> u32 {
        if self.fat_type == FatType::Fat32 {
            FAT32_ROOT_CLUSTER
        } else {
            0
        }
    }

    /// The MBR: one bootable partition holding the volume (QEMU's
    /// `init_mbr`: the type says FAT12, FAT16 or FAT32, the LBA variants
    /// when the end lies beyond what CHS can address).
    pub fn mbr(&self) -> [u8; 512] {
        let mut m = [0u8; 512];
        m[..BOOT_STUB.len()].copy_from_slice(&BOOT_STUB);
        m[0x1b8..0x1bc].copy_from_slice(&DISK_SIGNATURE.to_le_bytes());
        let p = &mut m[0x1be..0x1ce];
        p[0] = 0x80;
        let (start, lba1) = self.chs(self.part_start);
        let (end, lba2) = self.chs(self.total_sectors - 1);
        p[1..4].copy_from_slice(&start);
        p[5..8].copy_from_slice(&end);
        let lba = lba1 || lba2;
        p[4] = match self.fat_type {
            FatType::Fat12 => 0x01,
            FatType::Fat16 if lba => 0x0e,
            FatType::Fat16 => 0x06,
            FatType::Fat32 if lba => 0x0c,
            FatType::Fat32 => 0x0b,
        };
        p[8..12].copy_from_slice(&self.part_start.to_le_bytes());
        p[12..16].copy_from_slice(&self.part_sectors.to_le_bytes());
        m[510] = 0x55;
        m[511] = 0xaa;
        m
    }

    /// The partition entry's CHS bytes (head, sector with the cylinder's
    /// high bits, cylinder) for `lba`, and whether it lies beyond CHS
    /// (then 0xff 0xff 0xff, as DOS expects).
    fn chs(&self, lba: u32) -> ([u8; 3], bool) {
        let sector = lba % self.sectors_per_track;
        let rest = lba / self.sectors_per_track;
        let head = rest % self.heads;
        let cyl = rest / self.heads;
        if cyl >= self.cylinders {
            return ([0xff; 3], true);
        }
        (
            [
                head as u8,
                ((sector + 1) | ((cyl >> 8) << 6)) as u8,
                cyl as u8,
            ],
            false,
        )
    }

    /// The boot sector with the BPB (fatgen103 "Boot Sector and BPB"),
    /// labelled `label` (11 bytes, space padded).
    pub fn boot_sector(&self, label: &[u8; 11]) -> [u8; 512] {
        let mut b = [0u8; 512];
        let fat32 = self.fat_type == FatType::Fat32;
        // The jump lands on the stub after the BPB (where QEMU's jump,
        // `eb 3e 90`, lands on FAT12/16).
        let code = if fat32 { 0x5a } else { 0x40 };
        b[0] = 0xeb;
        b[1] = (code - 2) as u8;
        b[2] = 0x90;
        b[code..code + BOOT_STUB.len()].copy_from_slice(&BOOT_STUB);
        b[3..11].copy_from_slice(b"MSWIN4.1");
        b[11..13].copy_from_slice(&(SECTOR as u16).to_le_bytes());
        b[13] = self.spc as u8;
        b[14..16].copy_from_slice(&(self.reserved as u16).to_le_bytes());
        b[16] = 2;
        b[17..19].copy_from_slice(&(self.root_entries as u16).to_le_bytes());
        if self.part_sectors <= 0xffff && !fat32 {
            b[19..21].copy_from_slice(&(self.part_sectors as u16).to_le_bytes());
        } else {
            b[32..36].copy_from_slice(&self.part_sectors.to_le_bytes());
        }
        b[21] = self.media();
        if !fat32 {
            b[22..24].copy_from_slice(&(self.spf as u16).to_le_bytes());
        }
        b[24..26].copy_from_slice(&(self.sectors_per_track as u16).to_le_bytes());
        b[26..28].copy_from_slice(&(self.heads as u16).to_le_bytes());
        b[28..32].copy_from_slice(&self.part_start.to_le_bytes());
        let ext = if fat32 {
            b[36..40].copy_from_slice(&self.spf.to_le_bytes());
            // ExtFlags 0: both FATs mirrored; FSVer 0.0.
            b[44..48].copy_from_slice(&FAT32_ROOT_CLUSTER.to_le_bytes());
            b[48..50].copy_from_slice(&1u16.to_le_bytes());
            b[50..52].copy_from_slice(&6u16.to_le_bytes());
            64
        } else {
            36
        };
        b[ext] = if self.floppy { 0 } else { 0x80 };
        b[ext + 2] = 0x29;
        b[ext + 3..ext + 7].copy_from_slice(&VOLUME_ID.to_le_bytes());
        b[ext + 7..ext + 18].copy_from_slice(label);
        let name: &[u8; 8] = match self.fat_type {
            FatType::Fat12 => b"FAT12   ",
            FatType::Fat16 => b"FAT16   ",
            FatType::Fat32 => b"FAT32   ",
        };
        b[ext + 18..ext + 26].copy_from_slice(name);
        b[510] = 0x55;
        b[511] = 0xaa;
        b
    }

    /// FAT32's FSInfo sector: `free` clusters, the next one to try.
    pub fn fsinfo(&self, free: u32, next: u32) -> [u8; 512] {
        let mut s = [0u8; 512];
        s[0..4].copy_from_slice(&0x4161_5252u32.to_le_bytes());
        s[484..488].copy_from_slice(&0x6141_7272u32.to_le_bytes());
        s[488..492].copy_from_slice(&free.to_le_bytes());
        s[492..496].copy_from_slice(&next.to_le_bytes());
        s[508..512].copy_from_slice(&0xaa55_0000u32.to_le_bytes());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le16(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }
    fn le32(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }

    #[test]
    fn qemu_sizes() {
        // qemu-img convert -f vvfat fat:DIR: 528482304 bytes, the
        // partition of 1032129 sectors at 63, 252 sectors per FAT.
        let g = Geometry::new(None, false).unwrap();
        assert_eq!(g.fat_type, FatType::Fat16);
        assert_eq!(g.disk_bytes(), 528_482_304);
        assert_eq!((g.part_start, g.part_sectors, g.spf), (63, 1_032_129, 252));
        assert_eq!((g.spc, g.root_entries, g.clusters), (16, 512, 64_474));
        assert!(g.clusters >= 4085 && g.clusters < 65525);
        // fat:12:DIR: 33030144 bytes, 12 sectors per FAT.
        let g = Geometry::new(Some(FatType::Fat12), false).unwrap();
        assert_eq!((g.disk_bytes(), g.spf), (33_030_144, 12));
        assert!(g.clusters < 4085);
        // fat:floppy:DIR is 2.88 MB FAT12, fat:floppy:12:DIR 1.44 MB.
        let g = Geometry::new(None, true).unwrap();
        assert_eq!((g.disk_bytes(), g.spf, g.clusters), (2_949_120, 2, 357));
        let g = Geometry::new(Some(FatType::Fat12), true).unwrap();
        assert_eq!((g.disk_bytes(), g.spf), (1_474_560, 1));
    }

    #[test]
    fn every_type_is_what_its_cluster_count_says() {
        for floppy in [false, true] {
            for ty in [FatType::Fat12, FatType::Fat16, FatType::Fat32] {
                let Ok(g) = Geometry::new(Some(ty), floppy) else {
                    assert!(floppy && ty == FatType::Fat32);
                    continue;
                };
                let by_count = if g.clusters < 4085 {
                    FatType::Fat12
                } else if g.clusters < 65525 {
                    FatType::Fat16
                } else {
                    FatType::Fat32
                };
                assert_eq!(by_count, ty, "{g:?}");
                assert!(g.fat_entries() >= g.clusters + 2, "{g:?}");
                let end = g.data_start() + u64::from(g.clusters) * u64::from(g.spc);
                assert!(end <= u64::from(g.total_sectors), "{g:?}");
            }
        }
    }

    #[test]
    fn bpb_fields() {
        let g = Geometry::new(None, false).unwrap();
        let b = g.boot_sector(b"QEMU VVFAT ");
        assert_eq!(&b[..3], &[0xeb, 0x3e, 0x90]);
        assert_eq!(&b[0x40..0x44], &BOOT_STUB);
        assert_eq!(le16(&b, 11), 512);
        assert_eq!(b[13], 16);
        assert_eq!(le16(&b, 14), 1);
        assert_eq!(b[16], 2);
        assert_eq!(le16(&b, 17), 512);
        assert_eq!(le16(&b, 19), 0);
        assert_eq!(b[21], 0xf8);
        assert_eq!(le16(&b, 22), 252);
        assert_eq!((le16(&b, 24), le16(&b, 26)), (63, 16));
        assert_eq!(le32(&b, 28), 63);
        assert_eq!(le32(&b, 32), 1_032_129);
        assert_eq!((b[36], b[38]), (0x80, 0x29));
        assert_eq!(le32(&b, 39), 0xfabe_1afd);
        assert_eq!(&b[43..54], b"QEMU VVFAT ");
        assert_eq!(&b[54..62], b"FAT16   ");
        assert_eq!(&b[510..], &[0x55, 0xaa]);

        let f = Geometry::new(Some(FatType::Fat12), true).unwrap();
        let b = f.boot_sector(b"NO NAME    ");
        assert_eq!(le16(&b, 19), 2880);
        assert_eq!((b[21], b[36]), (0xf0, 0));
        assert_eq!(le32(&b, 28), 0);

        let g = Geometry::new(Some(FatType::Fat32), false).unwrap();
        let b = g.boot_sector(b"QEMU VVFAT ");
        assert_eq!(&b[..3], &[0xeb, 0x58, 0x90]);
        assert_eq!((le16(&b, 14), le16(&b, 17), le16(&b, 22)), (32, 0, 0));
        assert_eq!(le32(&b, 36), g.spf);
        assert_eq!(le32(&b, 44), 2);
        assert_eq!((le16(&b, 48), le16(&b, 50)), (1, 6));
        assert_eq!((b[64], b[66]), (0x80, 0x29));
        assert_eq!(&b[71..82], b"QEMU VVFAT ");
        assert_eq!(&b[82..90], b"FAT32   ");
        let fs = g.fsinfo(10, 3);
        assert_eq!((le32(&fs, 0), le32(&fs, 484)), (0x4161_5252, 0x6141_7272));
        assert_eq!((le32(&fs, 488), le32(&fs, 492)), (10, 3));
        assert_eq!(&fs[508..], &[0, 0, 0x55, 0xaa]);
    }

    #[test]
    fn partition_entry_matches_qemu() {
        // What qemu-img wrote for fat:DIR (bytes 0x1b8..0x1ce).
        let g = Geometry::new(None, false).unwrap();
        let m = g.mbr();
        assert_eq!(
            &m[0x1b8..0x1ce],
            &[
                0xfa, 0xfd, 0x1a, 0xbe, 0, 0, 0x80, 0x01, 0x01, 0x00, 0x06, 0x0f, 0xff, 0xff, 0x3f,
                0, 0, 0, 0xc1, 0xbf, 0x0f, 0
            ]
        );
        assert_eq!(&m[510..], &[0x55, 0xaa]);
        let g = Geometry::new(Some(FatType::Fat12), false).unwrap();
        assert_eq!(g.mbr()[0x1c2], 0x01);
        let g = Geometry::new(Some(FatType::Fat32), false).unwrap();
        assert_eq!(g.mbr()[0x1c2], 0x0b);
        assert!(Geometry::new(Some(FatType::Fat32), true).is_err());
    }
}
