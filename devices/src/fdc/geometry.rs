//! Diskette formats and drive types: which geometry an image has, picked
//! from its size as QEMU's floppy drives do, and what a drive reports in
//! CMOS register 0x10 (the PC/AT CMOS map: drive A in the high nibble,
//! drive B in the low one).

/// A drive type (`fdtypeA=`, `drive-type=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriveType {
    /// 5.25" 1.2 MB (also reads 360 KB media).
    D120,
    /// 3.5" 1.44 MB (also 720 KB and 1.68 MB DMF).
    D144,
    /// 3.5" 2.88 MB.
    D288,
    /// Whatever the medium is; 1.44 MB without one.
    Auto,
    None,
}

impl DriveType {
    pub fn parse(s: &str) -> Option<DriveType> {
        Some(match s {
            "120" => DriveType::D120,
            "144" => DriveType::D144,
            "288" => DriveType::D288,
            "auto" => DriveType::Auto,
            "none" => DriveType::None,
            _ => return None,
        })
    }

    /// The CMOS 0x10 code: 1 = 360 KB, 2 = 1.2 MB, 3 = 720 KB,
    /// 4 = 1.44 MB, 5 = 2.88 MB, 0 = no drive.
    pub fn cmos_code(self) -> u8 {
        match self {
            DriveType::D120 => 2,
            DriveType::D144 | DriveType::Auto => 4,
            DriveType::D288 => 5,
            DriveType::None => 0,
        }
    }
}

/// One diskette format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Format {
    pub drive: DriveType,
    /// Sectors per track.
    pub sectors: u8,
    pub tracks: u8,
    pub heads: u8,
    /// The data rate code the controller must be programmed with
    /// (DSR/CCR bits 1:0): 0 = 500 kb/s, 1 = 300, 2 = 250, 3 = 1 Mb/s.
    pub rate: u8,
}

impl Format {
    pub fn size(&self) -> u64 {
        self.sectors as u64 * self.tracks as u64 * self.heads as u64 * 512
    }
}

const fn f(drive: DriveType, sectors: u8, tracks: u8, heads: u8, rate: u8) -> Format {
    Format {
        drive,
        sectors,
        tracks,
        heads,
        rate,
    }
}

/// The formats a drive may find, most usual first for each drive type.
pub const FORMATS: &[Format] = &[
    // 3.5" high density and its variants.
    f(DriveType::D144, 18, 80, 2, 0), // 1.44 MB
    f(DriveType::D144, 20, 80, 2, 0), // 1.6 MB
    f(DriveType::D144, 21, 80, 2, 0), // 1.68 MB (DMF)
    f(DriveType::D144, 21, 82, 2, 0), // 1.72 MB
    f(DriveType::D144, 21, 83, 2, 0), // 1.74 MB
    f(DriveType::D144, 22, 80, 2, 0), // 1.76 MB
    f(DriveType::D144, 23, 80, 2, 0), // 1.84 MB
    f(DriveType::D144, 24, 80, 2, 0), // 1.92 MB
    // 3.5" 2.88 MB.
    f(DriveType::D288, 36, 80, 2, 3),
    f(DriveType::D288, 39, 80, 2, 3),
    f(DriveType::D288, 40, 80, 2, 3),
    f(DriveType::D288, 44, 80, 2, 3),
    f(DriveType::D288, 48, 80, 2, 3),
    // 3.5" double density.
    f(DriveType::D144, 9, 80, 2, 2),  // 720 KB
    f(DriveType::D144, 10, 80, 2, 2), // 800 KB
    f(DriveType::D144, 10, 82, 2, 2),
    f(DriveType::D144, 10, 83, 2, 2),
    f(DriveType::D144, 13, 80, 2, 2), // 1.04 MB
    f(DriveType::D144, 14, 80, 2, 2),
    // 5.25" high density.
    f(DriveType::D120, 15, 80, 2, 0), // 1.2 MB
    f(DriveType::D120, 18, 80, 2, 0),
    f(DriveType::D120, 18, 82, 2, 0),
    f(DriveType::D120, 18, 83, 2, 0),
    f(DriveType::D120, 20, 80, 2, 0),
    // 5.25" double density.
    f(DriveType::D120, 9, 40, 2, 1), // 360 KB
    f(DriveType::D120, 9, 40, 1, 1), // 180 KB
    f(DriveType::D120, 10, 41, 2, 1),
    f(DriveType::D120, 10, 42, 2, 1),
    f(DriveType::D120, 8, 40, 2, 1), // 320 KB
    f(DriveType::D120, 8, 40, 1, 1), // 160 KB
];

/// The format of a `size`-byte medium in a drive of type `drive`: the
/// first format of the same drive type and size, else of any drive type
/// with that size (a 2.88 MB drive reads 1.44 MB diskettes); an image of
/// another size (a
/// boot loader's floppy image, say) gets the smallest format of the
/// drive's type that holds it, as QEMU's drives pick one. `None`: the
/// image is larger than any diskette the drive takes.
pub fn pick(drive: DriveType, size: u64) -> Option<Format> {
    let same_size = || FORMATS.iter().filter(move |f| f.size() == size);
    let family = match drive {
        DriveType::Auto => DriveType::D144,
        d => d,
    };
    same_size()
        .find(|f| f.drive == drive)
        .or_else(|| same_size().next())
        .or_else(|| {
            FORMATS
                .iter()
                .filter(|f| f.drive == family && f.size() >= size)
                .min_by_key(|f| f.size())
        })
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_of_the_usual_sizes_get_their_format() {
        let k = 1024u64;
        let cases = [
            (DriveType::Auto, 1440 * k, (18, 80, 2, DriveType::D144)),
            (DriveType::Auto, 2880 * k, (36, 80, 2, DriveType::D288)),
            (DriveType::Auto, 720 * k, (9, 80, 2, DriveType::D144)),
            (DriveType::Auto, 1200 * k, (15, 80, 2, DriveType::D120)),
            (DriveType::Auto, 360 * k, (9, 40, 2, DriveType::D120)),
            (DriveType::Auto, 1680 * k, (21, 80, 2, DriveType::D144)),
            (DriveType::Auto, 160 * k, (8, 40, 1, DriveType::D120)),
            (DriveType::D144, 1440 * k, (18, 80, 2, DriveType::D144)),
        ];
        for (drive, size, (s, t, h, d)) in cases {
            let got = pick(drive, size).unwrap_or_else(|| panic!("{size}"));
            assert_eq!(
                (got.sectors, got.tracks, got.heads, got.drive),
                (s, t, h, d)
            );
        }
        // Other sizes: the smallest diskette of the drive's type that holds
        // them (GRUB's rescue floppy is 1266 KiB); larger than any: none.
        let f = pick(DriveType::Auto, 1_296_384).unwrap();
        assert_eq!((f.sectors, f.tracks, f.heads), (18, 80, 2));
        assert_eq!(pick(DriveType::D144, 1200 * k).map(|f| f.sectors), Some(15));
        assert_eq!(pick(DriveType::D288, 1440 * k).map(|f| f.sectors), Some(18));
        assert_eq!(pick(DriveType::D120, 1440 * k).map(|f| f.sectors), Some(18));
        assert_eq!(pick(DriveType::Auto, 3000 * k), None);
        assert_eq!(DriveType::Auto.cmos_code(), 4);
    }
}
