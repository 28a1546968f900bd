//! The data pages of SMART (ATA8-ACS 7.52): READ DATA, READ ATTRIBUTE
//! THRESHOLDS, and the logs READ LOG reaches, for a healthy drive.

/// Byte 511 of a data structure: the two's complement of the sum of
/// bytes 0..=510, so that all 512 bytes sum to zero.
fn checksum(b: &mut [u8]) {
    let n = b.len();
    let sum = b[..n - 1].iter().fold(0u8, |a, &x| a.wrapping_add(x));
    b[n - 1] = sum.wrapping_neg();
}

/// SMART READ DATA / READ ATTRIBUTE THRESHOLDS (the vendor-specific
/// attribute table in the layout every tool reads: 30 entries of 12 bytes
/// from byte 2).
pub fn data(thresholds: bool) -> Vec<u8> {
    let mut v = vec![0u8; 512];
    v[0] = 0x10; // revision
                 // id, flags, value, worst, raw: a healthy drive.
    let attrs: [(u8, u16, u8, u8, u32); 5] = [
        (0x01, 0x002b, 100, 100, 0),  // raw read error rate
        (0x03, 0x0027, 100, 100, 16), // spin-up time
        (0x04, 0x0032, 100, 100, 1),  // start/stop count
        (0x05, 0x0033, 100, 100, 0),  // reallocated sectors
        (0x09, 0x0032, 100, 100, 1),  // power-on hours
    ];
    for (i, &(id, flags, val, worst, raw)) in attrs.iter().enumerate() {
        let e = &mut v[2 + 12 * i..14 + 12 * i];
        e[0] = id;
        if thresholds {
            e[1] = 0x06;
        } else {
            e[1..3].copy_from_slice(&flags.to_le_bytes());
            e[3] = val;
            e[4] = worst;
            e[5..9].copy_from_slice(&raw.to_le_bytes());
        }
    }
    if !thresholds {
        v[362] = 0x82; // offline data collection completed
        v[367] = 0x5b; // offline capabilities
        v[368] = 0x03; // SMART capabilities: saves data, autosave
        v[370] = 0x01; // error logging supported
        v[372] = 0x02; // short self-test: 2 minutes
        v[373] = 0x0a; // extended self-test: 10 minutes
    }
    checksum(&mut v);
    v
}

/// An empty log page (the summary error log and the self-test log):
/// version 1, no entries.
pub fn empty_log() -> Vec<u8> {
    let mut log = vec![0u8; 512];
    log[0] = 1; // log version
    checksum(&mut log);
    log
}
