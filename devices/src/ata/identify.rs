//! IDENTIFY DEVICE (ATA8-ACS 7.16, table 22) and IDENTIFY PACKET DEVICE
//! (ATA8-ACS 7.17, table 26) data, built from a drive's configuration and
//! its current settings (write cache, multiple count, transfer mode, CHS
//! translation). Words are little-endian; ATA strings are big-endian within
//! each word and space-padded (ATA8-ACS 3.3.10).

/// Largest READ/WRITE MULTIPLE block, in sectors (word 47).
pub const MAX_MULTIPLE: u32 = 16;
/// Largest DATA SET MANAGEMENT payload in 512-byte blocks (word 105).
pub const MAX_DSM_BLOCKS: u16 = 8;

/// The transfer mode chosen with SET FEATURES 03h.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum XferMode {
    Pio(u8),
    MultiwordDma(u8),
    UltraDma(u8),
}

/// What the identify data shows.
pub struct IdentifyParams<'a> {
    pub model: &'a str,
    pub serial: &'a str,
    pub firmware: &'a str,
    pub wwn: Option<u64>,
    pub sectors: u64,
    /// Default geometry (words 1, 3, 6).
    pub cyls: u16,
    pub heads: u16,
    pub secs: u16,
    /// Current translation (words 54..58); heads 0 when not initialised.
    pub cur_heads: u16,
    pub cur_secs: u16,
    pub multiple: u16,
    pub write_cache: bool,
    pub smart_enabled: bool,
    pub mode: XferMode,
    /// log2(physical block size / 512).
    pub phys_exp: u8,
    /// The slave device on its channel (word 93).
    pub slave: bool,
    /// NCQ with 32 tags on a SATA Gen 1 link (words 75-76).
    pub ncq: bool,
}

fn put_str(w: &mut [u16], s: &str) {
    let mut bytes = vec![b' '; w.len() * 2];
    for (d, b) in bytes.iter_mut().zip(s.bytes()) {
        *d = b;
    }
    for (i, word) in w.iter_mut().enumerate() {
        *word = (bytes[2 * i] as u16) << 8 | bytes[2 * i + 1] as u16;
    }
}

fn mode_words(w: &mut [u16; 256], mode: XferMode) {
    // Words 63 and 88: supported modes in the low byte, the selected one
    // in the high byte (only one mode of all kinds is selected).
    w[63] = 0x07;
    w[88] = 0x3f;
    match mode {
        XferMode::MultiwordDma(n) => w[63] |= 0x100 << n,
        XferMode::UltraDma(n) => w[88] |= 0x100 << n,
        XferMode::Pio(_) => {}
    }
}

/// Word 255: signature A5h and a checksum making all 512 bytes sum to 0.
fn finish(mut w: [u16; 256]) -> [u8; 512] {
    w[255] = 0x00a5;
    let mut out = [0u8; 512];
    for (i, v) in w.iter().enumerate() {
        out[2 * i..2 * i + 2].copy_from_slice(&v.to_le_bytes());
    }
    let sum = out[..511].iter().fold(0u8, |a, &b| a.wrapping_add(b));
    out[511] = sum.wrapping_neg();
    out
}

/// IDENTIFY DEVICE for an ATA disk.
pub fn identify_disk(p: &IdentifyParams) -> [u8; 512] {
    let mut w = [0u16; 256];
    w[0] = 0x0040; // fixed device
    w[1] = p.cyls;
    w[3] = p.heads;
    // Retired since ATA-2, and still read by old software (and QEMU's
    // ahci-test): unformatted bytes per track and per sector.
    w[4] = (512 * p.secs as u32).min(0xffff) as u16;
    w[5] = 512;
    w[6] = p.secs;
    put_str(&mut w[10..20], p.serial);
    put_str(&mut w[23..27], p.firmware);
    put_str(&mut w[27..47], p.model);
    w[47] = 0x8000 | MAX_MULTIPLE as u16;
    w[49] = 0x0b00; // IORDY, LBA, DMA
    w[50] = 0x4000;
    w[51] = 0x0200; // PIO timing mode 2 (obsolete)
    w[53] = 0x0007; // words 54..58, 64..70 and 88 are valid
    if p.cur_heads != 0 && p.cur_secs != 0 {
        let cur_cyls = (p.sectors / (p.cur_heads as u64 * p.cur_secs as u64)).min(65535);
        let cap = cur_cyls * p.cur_heads as u64 * p.cur_secs as u64;
        w[54] = cur_cyls as u16;
        w[55] = p.cur_heads;
        w[56] = p.cur_secs;
        w[57] = cap as u16;
        w[58] = (cap >> 16) as u16;
    }
    if p.multiple != 0 {
        w[59] = 0x0100 | p.multiple;
    }
    let lba28 = p.sectors.min(0x0fff_ffff) as u32;
    w[60] = lba28 as u16;
    w[61] = (lba28 >> 16) as u16;
    mode_words(&mut w, p.mode);
    w[64] = 0x03; // PIO modes 3 and 4
    w[65] = 120;
    w[66] = 120;
    w[67] = 120;
    w[68] = 120;
    if p.ncq {
        w[75] = 31; // queue depth - 1
        w[76] = 1 << 8 | 1 << 1; // NCQ, SATA Gen 1 signalling
    }
    w[80] = 0x01f0; // ATA/ATAPI-4 .. ATA8-ACS
                    // Supported: 82 NOP, write cache, SMART; 83 FLUSH CACHE (EXT), 48-bit;
                    // 84 WWN. Enabled: 85..87 mirror them with the current settings.
    w[82] = 1 << 14 | 1 << 5 | 1;
    w[83] = 1 << 14 | 1 << 13 | 1 << 12 | 1 << 10;
    w[84] = 1 << 14 | if p.wwn.is_some() { 1 << 8 } else { 0 };
    w[85] = 1 << 14 | (p.write_cache as u16) << 5 | p.smart_enabled as u16;
    w[86] = 1 << 13 | 1 << 12 | 1 << 10;
    w[87] = 1 << 14 | if p.wwn.is_some() { 1 << 8 } else { 0 };
    // Word 93: hardware reset result; bit 13 reports an 80-conductor cable
    // so that guests use UDMA modes above 2.
    w[93] = if p.slave { 0x6100 } else { 0x6001 } | 1 << 13;
    for i in 0..4 {
        w[100 + i] = (p.sectors >> (16 * i)) as u16;
    }
    w[105] = MAX_DSM_BLOCKS;
    if p.phys_exp > 0 {
        w[106] = 0x6000 | p.phys_exp as u16;
    }
    if let Some(wwn) = p.wwn {
        for i in 0..4 {
            w[108 + i] = (wwn >> (48 - 16 * i)) as u16;
        }
    }
    w[169] = 1; // DATA SET MANAGEMENT TRIM
    finish(w)
}

/// IDENTIFY PACKET DEVICE for an ATAPI CD/DVD-ROM.
pub fn identify_packet(p: &IdentifyParams) -> [u8; 512] {
    let mut w = [0u16; 256];
    // ATAPI, device type 05h (CD/DVD), removable, DRQ within 50 us of
    // PACKET (no interrupt before the packet), 12-byte packets.
    w[0] = 2 << 14 | 5 << 8 | 1 << 7 | 2 << 5;
    put_str(&mut w[10..20], p.serial);
    put_str(&mut w[23..27], p.firmware);
    put_str(&mut w[27..47], p.model);
    w[49] = 1 << 9 | 1 << 8; // LBA, DMA
    w[53] = 0x0007;
    mode_words(&mut w, p.mode);
    w[64] = 0x03;
    w[65] = 0xb4;
    w[66] = 0xb4;
    w[67] = 0x12c;
    w[68] = 0xb4;
    w[71] = 30; // typical time to release the bus after PACKET, ns
    w[72] = 30;
    w[80] = 0x001e; // ATA/ATAPI-1 .. 4
    w[82] = 1 << 14 | 1 << 4; // NOP, PACKET
    w[85] = 1 << 14 | 1 << 4;
    w[93] = if p.slave { 0x6100 } else { 0x6001 } | 1 << 13;
    finish(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> IdentifyParams<'static> {
        IdentifyParams {
            model: "QEMU HARDDISK",
            serial: "QM00001",
            firmware: "2.5+",
            wwn: Some(0x5000_c500_1234_5678),
            sectors: 0x1_0000_0001,
            cyls: 16383,
            heads: 16,
            secs: 63,
            cur_heads: 16,
            cur_secs: 63,
            multiple: 16,
            write_cache: true,
            smart_enabled: true,
            mode: XferMode::UltraDma(5),
            phys_exp: 3,
            slave: false,
            ncq: false,
        }
    }

    #[test]
    fn disk_identify_fields() {
        let d = identify_disk(&params());
        let w = |i: usize| u16::from_le_bytes([d[2 * i], d[2 * i + 1]]);
        assert_eq!(&d[54..67], b"EQUMH RADDSI ");
        assert_eq!(&d[20..27], b"MQ0000 ");
        assert_eq!(w(60) as u32 | (w(61) as u32) << 16, 0x0fff_ffff);
        assert_eq!(w(100), 1);
        assert_eq!(w(102), 1);
        assert_eq!(w(88), 0x3f | 0x2000);
        assert_eq!(w(85) & 0x21, 0x21);
        assert_eq!(w(106), 0x6003);
        assert_eq!(w(108), 0x5000);
        assert_eq!(w(111), 0x5678);
        assert_eq!(d.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        assert_eq!(d[510], 0xa5);
        let p = identify_packet(&params());
        assert_eq!(u16::from_le_bytes([p[0], p[1]]), 0x85c0);
    }
}
