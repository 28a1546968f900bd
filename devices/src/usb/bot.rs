//! The wrappers of the USB Mass Storage Class Bulk-Only Transport, rev.
//! 1.0: the Command Block Wrapper (5.1) parsed into a typed [`Cbw`], with
//! the validity and meaningfulness checks of 6.2.1 and 6.2.2, and the
//! Command Status Wrapper (5.2, 5.3.3) built from a typed [`Csw`]. The
//! device side of the protocol is in [`super::storage`].

use super::Dir;

/// dCBWSignature, "USBC" little-endian.
pub const CBW_SIGNATURE: u32 = 0x4342_5355;
/// dCSWSignature, "USBS" little-endian.
pub const CSW_SIGNATURE: u32 = 0x5342_5355;
pub const CBW_LEN: usize = 31;
pub const CSW_LEN: usize = 13;

/// Bulk-Only class requests (3.1, 3.2).
pub const REQ_RESET: u8 = 0xff;
pub const REQ_GET_MAX_LUN: u8 = 0xfe;

/// A valid and meaningful CBW.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cbw {
    pub tag: u32,
    /// dCBWDataTransferLength: what the host expects to move.
    pub data_len: u32,
    /// bmCBWFlags bit 7 (meaningless when `data_len` is 0).
    pub dir: Dir,
    pub lun: u8,
    cb: [u8; 16],
    cb_len: u8,
}

/// Why a CBW is refused. All of them make the device stall both bulk
/// endpoints until a Reset Recovery (6.6.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CbwError {
    /// Not 31 bytes (6.2.1).
    Length(usize),
    /// Not "USBC" (6.2.1).
    Signature(u32),
    /// Reserved bits of bCBWLUN or bCBWCBLength set, or a command block
    /// length outside 1..=16 (6.2.2). Reserved bits of bmCBWFlags are
    /// ignored, as QEMU does.
    NotMeaningful,
}

impl Cbw {
    pub fn parse(b: &[u8]) -> Result<Cbw, CbwError> {
        let b: &[u8; CBW_LEN] = b.try_into().map_err(|_| CbwError::Length(b.len()))?;
        let le32 = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let sig = le32(0);
        if sig != CBW_SIGNATURE {
            return Err(CbwError::Signature(sig));
        }
        let (lun, cb_len) = (b[13], b[14]);
        if lun & 0xf0 != 0 || !(1..=16).contains(&cb_len) {
            return Err(CbwError::NotMeaningful);
        }
        let mut cb = [0u8; 16];
        cb.copy_from_slice(&b[15..31]);
        Ok(Cbw {
            tag: le32(4),
            data_len: le32(8),
            dir: if b[12] & 0x80 != 0 { Dir::In } else { Dir::Out },
            lun,
            cb,
            cb_len,
        })
    }

    /// The command block (the CDB), bCBWCBLength bytes.
    pub fn cdb(&self) -> &[u8] {
        &self.cb[..self.cb_len as usize]
    }

    /// The 31 bytes (tests, and hosts built on this type).
    pub fn to_bytes(&self) -> [u8; CBW_LEN] {
        let mut b = [0u8; CBW_LEN];
        b[0..4].copy_from_slice(&CBW_SIGNATURE.to_le_bytes());
        b[4..8].copy_from_slice(&self.tag.to_le_bytes());
        b[8..12].copy_from_slice(&self.data_len.to_le_bytes());
        b[12] = if self.dir == Dir::In { 0x80 } else { 0 };
        b[13] = self.lun;
        b[14] = self.cb_len;
        b[15..31].copy_from_slice(&self.cb);
        b
    }

    /// A CBW for `cdb` (at most 16 bytes; longer is cut).
    pub fn new(tag: u32, data_len: u32, dir: Dir, lun: u8, cdb: &[u8]) -> Cbw {
        let n = cdb.len().min(16);
        let mut cb = [0u8; 16];
        cb[..n].copy_from_slice(&cdb[..n]);
        Cbw {
            tag,
            data_len,
            dir,
            lun: lun & 0x0f,
            cb,
            cb_len: n as u8,
        }
    }
}

/// bCSWStatus (5.2, table 5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CswStatus {
    Passed = 0,
    Failed = 1,
    PhaseError = 2,
}

/// A Command Status Wrapper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Csw {
    pub tag: u32,
    /// dCSWDataResidue: what the host expected minus what the device
    /// processed (6.7).
    pub residue: u32,
    pub status: CswStatus,
}

impl Csw {
    pub fn to_bytes(&self) -> [u8; CSW_LEN] {
        let mut b = [0u8; CSW_LEN];
        b[0..4].copy_from_slice(&CSW_SIGNATURE.to_le_bytes());
        b[4..8].copy_from_slice(&self.tag.to_le_bytes());
        b[8..12].copy_from_slice(&self.residue.to_le_bytes());
        b[12] = self.status as u8;
        b
    }

    /// Parses 13 bytes (the host's side: tests).
    pub fn parse(b: &[u8]) -> Option<Csw> {
        let b: &[u8; CSW_LEN] = b.try_into().ok()?;
        let le32 = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if le32(0) != CSW_SIGNATURE {
            return None;
        }
        let status = match b[12] {
            0 => CswStatus::Passed,
            1 => CswStatus::Failed,
            2 => CswStatus::PhaseError,
            _ => return None,
        };
        Some(Csw {
            tag: le32(4),
            residue: le32(8),
            status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cbw_round_trip_and_checks() {
        let c = Cbw::new(
            0x1234_5678,
            512,
            Dir::In,
            1,
            &[0x28, 0, 0, 0, 0, 5, 0, 0, 1, 0],
        );
        let b = c.to_bytes();
        assert_eq!(&b[..4], b"USBC");
        assert_eq!(Cbw::parse(&b), Ok(c));
        assert_eq!(c.cdb().len(), 10);
        assert_eq!(Cbw::parse(&b[..30]), Err(CbwError::Length(30)));
        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(Cbw::parse(&bad), Err(CbwError::Signature(_))));
        for (at, v) in [(13, 0x10), (14, 0), (14, 17), (14, 0x21)] {
            let mut bad = b;
            bad[at] = v;
            assert_eq!(
                Cbw::parse(&bad),
                Err(CbwError::NotMeaningful),
                "byte {at} = {v:#x}"
            );
        }
        let mut flags = b;
        flags[12] = 0x81;
        assert_eq!(
            Cbw::parse(&flags).unwrap().dir,
            Dir::In,
            "reserved flag bits ignored"
        );
    }

    #[test]
    fn csw_bytes() {
        let c = Csw {
            tag: 7,
            residue: 100,
            status: CswStatus::PhaseError,
        };
        let b = c.to_bytes();
        assert_eq!(b, [b'U', b'S', b'B', b'S', 7, 0, 0, 0, 100, 0, 0, 0, 2]);
        assert_eq!(Csw::parse(&b), Some(c));
    }
}
