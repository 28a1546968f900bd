//! SCSI sense data: the (sense key, ASC, ASCQ) triples this target reports
//! and their fixed-format encoding (SPC-4 section 4.5.3, "Fixed format sense
//! data"; the codes are from SPC-4 annex D and MMC-5 annex F).

/// One sense condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

/// Sense keys (SPC-4 table 27).
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const ABORTED_COMMAND: u8 = 0xb;
    pub const MISCOMPARE: u8 = 0xe;
}

const fn s(key: u8, asc: u8, ascq: u8) -> Sense {
    Sense { key, asc, ascq }
}

impl Sense {
    pub const NONE: Sense = s(key::NO_SENSE, 0, 0);
    /// MEDIUM NOT PRESENT (no further information).
    pub const NO_MEDIUM: Sense = s(key::NOT_READY, 0x3a, 0x00);
    /// MEDIUM NOT PRESENT - TRAY CLOSED.
    pub const NO_MEDIUM_TRAY_CLOSED: Sense = s(key::NOT_READY, 0x3a, 0x01);
    /// MEDIUM NOT PRESENT - TRAY OPEN.
    pub const NO_MEDIUM_TRAY_OPEN: Sense = s(key::NOT_READY, 0x3a, 0x02);
    /// UNRECOVERED READ ERROR.
    pub const READ_ERROR: Sense = s(key::MEDIUM_ERROR, 0x11, 0x00);
    /// WRITE ERROR.
    pub const WRITE_ERROR: Sense = s(key::MEDIUM_ERROR, 0x0c, 0x00);
    /// INTERNAL TARGET FAILURE (the host ran out of memory).
    pub const TARGET_FAILURE: Sense = s(key::HARDWARE_ERROR, 0x44, 0x00);
    /// PARAMETER LIST LENGTH ERROR.
    pub const PARAM_LIST_LENGTH: Sense = s(key::ILLEGAL_REQUEST, 0x1a, 0x00);
    /// INVALID COMMAND OPERATION CODE.
    pub const INVALID_OPCODE: Sense = s(key::ILLEGAL_REQUEST, 0x20, 0x00);
    /// LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const LBA_OUT_OF_RANGE: Sense = s(key::ILLEGAL_REQUEST, 0x21, 0x00);
    /// INVALID FIELD IN CDB.
    pub const INVALID_FIELD: Sense = s(key::ILLEGAL_REQUEST, 0x24, 0x00);
    /// LOGICAL UNIT NOT SUPPORTED.
    pub const LUN_NOT_SUPPORTED: Sense = s(key::ILLEGAL_REQUEST, 0x25, 0x00);
    /// INVALID FIELD IN PARAMETER LIST.
    pub const INVALID_PARAM: Sense = s(key::ILLEGAL_REQUEST, 0x26, 0x00);
    /// SAVING PARAMETERS NOT SUPPORTED.
    pub const SAVING_NOT_SUPPORTED: Sense = s(key::ILLEGAL_REQUEST, 0x39, 0x00);
    /// MEDIUM REMOVAL PREVENTED.
    pub const REMOVAL_PREVENTED: Sense = s(key::ILLEGAL_REQUEST, 0x53, 0x02);
    /// NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED.
    pub const MEDIUM_CHANGED: Sense = s(key::UNIT_ATTENTION, 0x28, 0x00);
    /// POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
    pub const POWER_ON_RESET: Sense = s(key::UNIT_ATTENTION, 0x29, 0x00);
    /// WRITE PROTECTED.
    pub const WRITE_PROTECTED: Sense = s(key::DATA_PROTECT, 0x27, 0x00);
    /// SPACE ALLOCATION FAILED WRITE PROTECT (the host ran out of space).
    pub const SPACE_ALLOC_FAILED: Sense = s(key::DATA_PROTECT, 0x27, 0x07);
    /// MISCOMPARE DURING VERIFY OPERATION.
    pub const MISCOMPARE: Sense = s(key::MISCOMPARE, 0x1d, 0x00);
    /// I/O PROCESS TERMINATED (used for host-side write errors).
    pub const IO_ERROR: Sense = s(key::ABORTED_COMMAND, 0x00, 0x06);

    /// Fixed-format sense data, current error (response code 0x70), with
    /// the additional length covering the 18-byte format.
    pub fn fixed(&self) -> [u8; 18] {
        let mut d = [0u8; 18];
        d[0] = 0x70;
        d[2] = self.key & 0x0f;
        d[7] = 10; // additional sense length: bytes 8..17
        d[12] = self.asc;
        d[13] = self.ascq;
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_layout() {
        let d = Sense::MEDIUM_CHANGED.fixed();
        assert_eq!(d[0], 0x70);
        assert_eq!(d[2], 6);
        assert_eq!(d[7], 10);
        assert_eq!((d[12], d[13]), (0x28, 0));
    }
}
