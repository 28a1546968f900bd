//! Command descriptor blocks: parsing a CDB into a typed [`Command`] before
//! anything is executed (the parse-then-execute split of DESIGN.md).
//!
//! Field layouts follow SPC-4 (TEST UNIT READY 6.33, REQUEST SENSE 6.27,
//! INQUIRY 6.4, MODE SENSE(10) 6.12), SBC-3 (READ CAPACITY(10) 5.15,
//! READ(10) 5.8, READ(12) 5.9, START STOP UNIT 5.25, PREVENT ALLOW MEDIUM
//! REMOVAL 5.5) and MMC-5 (READ TOC/PMA/ATIP 6.33, GET CONFIGURATION 6.6,
//! GET EVENT STATUS NOTIFICATION 6.7, READ DISC INFORMATION 6.22,
//! MECHANISM STATUS 6.11, SET CD SPEED 6.37). Every field a guest can set is
//! checked here; execution code only sees values that make sense.

use super::sense::Sense;

/// Operation codes this target knows.
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const SEEK_10: u8 = 0x2b;
    pub const READ_TOC: u8 = 0x43;
    pub const GET_CONFIGURATION: u8 = 0x46;
    pub const GET_EVENT_STATUS: u8 = 0x4a;
    pub const READ_DISC_INFO: u8 = 0x51;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_12: u8 = 0xa8;
    pub const SET_CD_SPEED: u8 = 0xbb;
    pub const MECHANISM_STATUS: u8 = 0xbd;
}

/// MODE SENSE page control (SPC-4 table 95).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageControl {
    Current,
    Changeable,
    Default,
    Saved,
}

/// A parsed command. Allocation lengths are the guest's upper bound on the
/// data it accepts; the executor truncates its reply to them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    TestUnitReady,
    RequestSense {
        alloc: u16,
    },
    Inquiry {
        /// `Some(page)` when EVPD is set.
        vpd_page: Option<u8>,
        alloc: u16,
    },
    ModeSense {
        page: u8,
        subpage: u8,
        pc: PageControl,
        alloc: u16,
        /// MODE SENSE(6) (4-byte header) rather than (10).
        six: bool,
    },
    StartStopUnit {
        start: bool,
        load_eject: bool,
    },
    PreventAllow {
        prevent: bool,
    },
    ReadCapacity10,
    Read {
        lba: u32,
        blocks: u32,
    },
    Seek {
        lba: u32,
    },
    ReadToc {
        msf: bool,
        format: u8,
        track: u8,
        alloc: u16,
    },
    GetConfiguration {
        rt: u8,
        start: u16,
        alloc: u16,
    },
    GetEventStatus {
        class_mask: u8,
        alloc: u16,
    },
    ReadDiscInfo {
        alloc: u16,
    },
    MechanismStatus {
        alloc: u16,
    },
    SetCdSpeed,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// The CDB length implied by the operation code's group (SPC-4 4.2.5.1).
pub fn cdb_len(opcode: u8) -> usize {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 10,
    }
}

impl Command {
    /// Parses `cdb`. Returns the sense to report for an unknown operation
    /// code, a short CDB or a field this target does not support.
    pub fn parse(cdb: &[u8]) -> Result<Command, Sense> {
        let opcode = *cdb.first().ok_or(Sense::INVALID_OPCODE)?;
        if cdb.len() < cdb_len(opcode) {
            return Err(Sense::INVALID_FIELD);
        }
        let c = match opcode {
            op::TEST_UNIT_READY => Command::TestUnitReady,
            op::REQUEST_SENSE => {
                // DESC=1 asks for descriptor format, which is optional.
                if cdb[1] & 1 != 0 {
                    return Err(Sense::INVALID_FIELD);
                }
                Command::RequestSense {
                    alloc: cdb[4] as u16,
                }
            }
            op::INQUIRY => {
                let evpd = cdb[1] & 1 != 0;
                if !evpd && cdb[2] != 0 {
                    return Err(Sense::INVALID_FIELD);
                }
                Command::Inquiry {
                    vpd_page: evpd.then_some(cdb[2]),
                    alloc: be16(&cdb[3..]),
                }
            }
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => {
                let pc = match cdb[2] >> 6 {
                    0 => PageControl::Current,
                    1 => PageControl::Changeable,
                    2 => PageControl::Default,
                    _ => PageControl::Saved,
                };
                let six = opcode == op::MODE_SENSE_6;
                Command::ModeSense {
                    page: cdb[2] & 0x3f,
                    subpage: cdb[3],
                    pc,
                    alloc: if six { cdb[4] as u16 } else { be16(&cdb[7..]) },
                    six,
                }
            }
            op::START_STOP_UNIT => {
                // Power conditions (byte 4 bits 7..4) other than START_VALID
                // are not supported by this drive.
                if cdb[4] >> 4 != 0 {
                    return Err(Sense::INVALID_FIELD);
                }
                Command::StartStopUnit {
                    start: cdb[4] & 1 != 0,
                    load_eject: cdb[4] & 2 != 0,
                }
            }
            op::PREVENT_ALLOW => Command::PreventAllow {
                prevent: cdb[4] & 1 != 0,
            },
            op::READ_CAPACITY_10 => {
                // PMI with a non-zero LBA is obsolete; reject rather than
                // guess.
                if cdb[8] & 1 == 0 && be32(&cdb[2..]) != 0 {
                    return Err(Sense::INVALID_FIELD);
                }
                Command::ReadCapacity10
            }
            op::READ_10 => Command::Read {
                lba: be32(&cdb[2..]),
                blocks: be16(&cdb[7..]) as u32,
            },
            op::READ_12 => Command::Read {
                lba: be32(&cdb[2..]),
                blocks: be32(&cdb[6..]),
            },
            op::SEEK_10 => Command::Seek {
                lba: be32(&cdb[2..]),
            },
            op::READ_TOC => {
                // The format is in byte 2 bits 3..0; old drives (and
                // Windows) still put it in byte 9 bits 7..6.
                let mut format = cdb[2] & 0x0f;
                if format == 0 {
                    format = cdb[9] >> 6;
                }
                if format > 2 {
                    return Err(Sense::INVALID_FIELD);
                }
                Command::ReadToc {
                    msf: cdb[1] & 2 != 0,
                    format,
                    track: cdb[6],
                    alloc: be16(&cdb[7..]),
                }
            }
            op::GET_CONFIGURATION => {
                let rt = cdb[1] & 3;
                if rt == 3 {
                    return Err(Sense::INVALID_FIELD);
                }
                Command::GetConfiguration {
                    rt,
                    start: be16(&cdb[2..]),
                    alloc: be16(&cdb[7..]),
                }
            }
            op::GET_EVENT_STATUS => {
                // Only polled operation: asynchronous notification needs a
                // transport that can send unsolicited status.
                if cdb[1] & 1 == 0 {
                    return Err(Sense::INVALID_FIELD);
                }
                Command::GetEventStatus {
                    class_mask: cdb[4],
                    alloc: be16(&cdb[7..]),
                }
            }
            op::READ_DISC_INFO => {
                // Data type 000b (standard disc information) only.
                if cdb[1] & 7 != 0 {
                    return Err(Sense::INVALID_FIELD);
                }
                Command::ReadDiscInfo {
                    alloc: be16(&cdb[7..]),
                }
            }
            op::MECHANISM_STATUS => Command::MechanismStatus {
                alloc: be16(&cdb[8..]),
            },
            op::SET_CD_SPEED => Command::SetCdSpeed,
            _ => return Err(Sense::INVALID_OPCODE),
        };
        Ok(c)
    }

    /// Commands that are answered even while a UNIT ATTENTION is pending
    /// (SPC-4 5.14: INQUIRY and REQUEST SENSE; MMC-5 4.1.6.1 adds GET
    /// CONFIGURATION and GET EVENT STATUS NOTIFICATION so that hosts can
    /// poll for media without consuming the condition).
    pub fn allowed_with_unit_attention(&self) -> bool {
        matches!(
            self,
            Command::Inquiry { .. }
                | Command::RequestSense { .. }
                | Command::GetConfiguration { .. }
                | Command::GetEventStatus { .. }
        )
    }

    /// Commands that need a medium in the drive.
    pub fn needs_medium(&self) -> bool {
        matches!(
            self,
            Command::TestUnitReady
                | Command::ReadCapacity10
                | Command::Read { .. }
                | Command::Seek { .. }
                | Command::ReadToc { .. }
                | Command::ReadDiscInfo { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reads_and_rejects_junk() {
        let mut cdb = [0u8; 12];
        cdb[0] = op::READ_10;
        cdb[2..6].copy_from_slice(&7u32.to_be_bytes());
        cdb[7..9].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(
            Command::parse(&cdb),
            Ok(Command::Read { lba: 7, blocks: 3 })
        );
        cdb[0] = op::READ_12;
        cdb[6..10].copy_from_slice(&0x10000u32.to_be_bytes());
        assert_eq!(
            Command::parse(&cdb),
            Ok(Command::Read {
                lba: 7,
                blocks: 0x10000
            })
        );
        assert_eq!(Command::parse(&[0xff; 12]), Err(Sense::INVALID_OPCODE));
        assert_eq!(Command::parse(&[]), Err(Sense::INVALID_OPCODE));
        assert_eq!(Command::parse(&[op::READ_10, 0]), Err(Sense::INVALID_FIELD));
        let mut gesn = [0u8; 12];
        gesn[0] = op::GET_EVENT_STATUS;
        assert_eq!(Command::parse(&gesn), Err(Sense::INVALID_FIELD));
        let mut toc = [0u8; 12];
        toc[0] = op::READ_TOC;
        toc[9] = 0x40; // old-style format 1
        assert!(matches!(
            Command::parse(&toc),
            Ok(Command::ReadToc { format: 1, .. })
        ));
    }
}
