//! The 32-byte short directory entry and the FAT date and time formats.
//!
//! Spec: fatgen103, "FAT 32 Byte Directory Entry Structure" (name and
//! extension, attributes, creation/access/write stamps, the first
//! cluster's high and low words, the size) and "Date and Time Formats"
//! (date: day 1-31, month 1-12, years since 1980 in 7 bits; time: seconds
//! / 2, minutes, hours; so 1980-01-01 to 2107-12-31).
//!
//! Stamps are UTC: Strata has no time zone database, and QEMU's local
//! time would make the same directory give different images on machines
//! in different zones (Linux mounts FAT with `tz=UTC` for the same reason).

/// Bytes per directory entry.
pub const ENTRY: usize = 32;

/// Attribute bits.
pub mod attr {
    /// Read-only.
    pub const READ_ONLY: u8 = 0x01;
    /// Hidden.
    pub const HIDDEN: u8 = 0x02;
    /// System.
    pub const SYSTEM: u8 = 0x04;
    /// The volume label.
    pub const VOLUME_ID: u8 = 0x08;
    /// A directory.
    pub const DIRECTORY: u8 = 0x10;
    /// Modified since the last backup.
    pub const ARCHIVE: u8 = 0x20;
    /// The four low bits together: a long name entry.
    pub const LONG_NAME: u8 = READ_ONLY | HIDDEN | SYSTEM | VOLUME_ID;
}

/// First name byte of a deleted entry.
pub const DELETED: u8 = 0xe5;
/// Stands for a name whose first byte really is 0xE5.
pub const KANJI_E5: u8 = 0x05;

/// A short (8.3) directory entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShortEntry {
    /// Name (8) and extension (3), space padded.
    pub name: [u8; 11],
    /// Attribute bits.
    pub attr: u8,
    /// DIR_NTRes: bit 3 says the base name reads in lower case, bit 4
    /// the extension (Windows NT's and Linux's way to keep a lower-case
    /// 8.3 name without a long name).
    pub nt_case: u8,
    /// Creation date and time.
    pub ctime: (u16, u16),
    /// Last access date.
    pub adate: u16,
    /// Last write date and time.
    pub mtime: (u16, u16),
    /// First cluster (0: none).
    pub first_cluster: u32,
    /// Size in bytes (0 for directories).
    pub size: u32,
}

impl ShortEntry {
    /// The entry's bytes.
    pub fn encode(&self) -> [u8; ENTRY] {
        let mut e = [0u8; ENTRY];
        e[..11].copy_from_slice(&self.name);
        e[11] = self.attr;
        e[12] = self.nt_case;
        e[14..16].copy_from_slice(&self.ctime.1.to_le_bytes());
        e[16..18].copy_from_slice(&self.ctime.0.to_le_bytes());
        e[18..20].copy_from_slice(&self.adate.to_le_bytes());
        e[20..22].copy_from_slice(&((self.first_cluster >> 16) as u16).to_le_bytes());
        e[22..24].copy_from_slice(&self.mtime.1.to_le_bytes());
        e[24..26].copy_from_slice(&self.mtime.0.to_le_bytes());
        e[26..28].copy_from_slice(&(self.first_cluster as u16).to_le_bytes());
        e[28..32].copy_from_slice(&self.size.to_le_bytes());
        e
    }

    /// An entry from its bytes. `fat32`: whether the first cluster's high
    /// word counts (it is always 0 on FAT12/16, where OS/2 kept other
    /// things there, so Linux ignores it and so does this).
    pub fn decode(e: &[u8; ENTRY], fat32: bool) -> ShortEntry {
        let w = |o: usize| u16::from_le_bytes([e[o], e[o + 1]]);
        let mut name = [0u8; 11];
        name.copy_from_slice(&e[..11]);
        let hi = if fat32 { u32::from(w(20)) } else { 0 };
        ShortEntry {
            name,
            attr: e[11],
            nt_case: e[12],
            ctime: (w(16), w(14)),
            adate: w(18),
            mtime: (w(24), w(22)),
            first_cluster: (hi << 16) | u32::from(w(26)),
            size: u32::from_le_bytes([e[28], e[29], e[30], e[31]]),
        }
    }
}

/// The FAT (date, time) of `secs` seconds since the Unix epoch (UTC),
/// clamped to what FAT can hold.
pub fn fat_datetime(secs: i64) -> (u16, u16) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    if y < 1980 {
        return (1 << 5 | 1, 0);
    }
    if y > 2107 {
        return ((127 << 9) | (12 << 5) | 31, (23 << 11) | (59 << 5) | 29);
    }
    let date = (((y - 1980) as u16) << 9) | ((m as u16) << 5) | d as u16;
    let (h, min, s) = (rem / 3600, rem / 60 % 60, rem % 60);
    let time = ((h as u16) << 11) | ((min as u16) << 5) | (s / 2) as u16;
    (date, time)
}

/// Seconds since the Unix epoch of a FAT (date, time) taken as UTC, or
/// `None` where the fields are out of range.
pub fn unix_time(date: u16, time: u16) -> Option<i64> {
    let (y, m, d) = (
        1980 + i64::from(date >> 9),
        u32::from((date >> 5) & 15),
        u32::from(date & 31),
    );
    let (h, min, s) = (
        i64::from(time >> 11),
        i64::from((time >> 5) & 63),
        i64::from(time & 31) * 2,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || h > 23 || min > 59 || s > 59 {
        return None;
    }
    Some(days_from_civil(y, m, d) * 86_400 + h * 3600 + min * 60 + s)
}

/// (year, month, day) of a day count from 1970-01-01, proleptic
/// Gregorian (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The day count from 1970-01-01 of a date (the inverse of
/// [`civil_from_days`]).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trip() {
        let e = ShortEntry {
            name: *b"HELLO   TXT",
            attr: attr::ARCHIVE,
            nt_case: 0x18,
            ctime: (0x1234, 0x5678),
            adate: 0x4321,
            mtime: (0x1111, 0x2222),
            first_cluster: 0x0003_0005,
            size: 100_000,
        };
        let b = e.encode();
        assert_eq!(&b[20..22], &[3, 0]);
        assert_eq!(&b[26..28], &[5, 0]);
        assert_eq!(ShortEntry::decode(&b, true), e);
        // FAT16 ignores the high word.
        assert_eq!(ShortEntry::decode(&b, false).first_cluster, 5);
    }

    #[test]
    fn dates() {
        // 2026-12-05 00:54:35 UTC: what the qemu-img image showed for
        // files made then (in a UTC zone).
        let t = 1_796_432_075;
        let (d, tm) = fat_datetime(t);
        assert_eq!((d >> 9, (d >> 5) & 15, d & 31), (46, 12, 5));
        assert_eq!((tm >> 11, (tm >> 5) & 63, tm & 31), (0, 54, 17));
        assert_eq!(unix_time(d, tm), Some(t - 1));
        // Leap day, and the clamps at both ends.
        let (d, _) = fat_datetime(951_782_400); // 2000-02-29
        assert_eq!((d >> 9, (d >> 5) & 15, d & 31), (20, 2, 29));
        assert_eq!(fat_datetime(0), (0x21, 0));
        assert_eq!(fat_datetime(-5_000_000_000).0, 0x21);
        assert_eq!(fat_datetime(i64::MAX / 2).0 >> 9, 127);
        assert_eq!(unix_time(0x21, 0), Some(315_532_800));
        assert_eq!(unix_time(0, 0), None);
        assert_eq!(unix_time(0x21, 24 << 11), None);
    }
}
