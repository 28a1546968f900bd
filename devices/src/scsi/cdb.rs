//! Command descriptor blocks: parsing a CDB into a typed [`Command`] before
//! anything is executed (the parse-then-execute split of DESIGN.md).
//!
//! Field layouts follow SPC-4 (TEST UNIT READY 6.33, REQUEST SENSE 6.27,
//! INQUIRY 6.4, MODE SENSE(6)/(10) 6.11/6.12, MODE SELECT(6)/(10)
//! 6.9/6.10, REPORT LUNS 6.29), SBC-3 (READ CAPACITY(10)/(16) 5.15/5.16,
//! READ(6)/(10)/(12)/(16) 5.7-5.10, WRITE(6)/(10)/(12)/(16) 5.32-5.35,
//! VERIFY(10)/(16) 5.27/5.29, WRITE SAME(10)/(16) 5.41/5.42, UNMAP 5.28,
//! SYNCHRONIZE CACHE(10)/(16) 5.22/5.23, START STOP UNIT 5.25, PREVENT
//! ALLOW MEDIUM REMOVAL 5.5) and MMC-5 (READ TOC/PMA/ATIP 6.33, GET
//! CONFIGURATION 6.6, GET EVENT STATUS NOTIFICATION 6.7, READ DISC
//! INFORMATION 6.22, MECHANISM STATUS 6.11, SET CD SPEED 6.37). Every field
//! a guest can set is checked here; execution code only sees values that
//! make sense. Which commands a logical unit implements is its own choice:
//! a unit answers a parsed command it does not implement with INVALID
//! COMMAND OPERATION CODE.

use super::sense::Sense;

/// Operation codes this target knows.
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const SEEK_10: u8 = 0x2b;
    pub const VERIFY_10: u8 = 0x2f;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const READ_TOC: u8 = 0x43;
    pub const GET_CONFIGURATION: u8 = 0x46;
    pub const GET_EVENT_STATUS: u8 = 0x4a;
    pub const READ_DISC_INFO: u8 = 0x51;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const VERIFY_16: u8 = 0x8f;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    /// SERVICE ACTION IN(16); service action 10h is READ CAPACITY(16).
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const SET_CD_SPEED: u8 = 0xbb;
    pub const MECHANISM_STATUS: u8 = 0xbd;
    pub const READ_CD: u8 = 0xbe;
}

/// SERVICE ACTION IN(16) service action of READ CAPACITY(16).
const SA_READ_CAPACITY_16: u8 = 0x10;

/// MODE SENSE page control (SPC-4 table 95).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageControl {
    Current,
    Changeable,
    Default,
    Saved,
}

/// A parsed command. Allocation lengths are the guest's upper bound on the
/// data it accepts; the executor truncates its reply to them. Transfer
/// lengths are in logical blocks of the unit, with the per-command meaning
/// of zero already applied (READ(6)/WRITE(6): 256 blocks).
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
        /// DBD: no block descriptors.
        dbd: bool,
        /// LLBAA (MODE SENSE(10) only): long LBA block descriptors allowed.
        llbaa: bool,
    },
    /// MODE SELECT with PF=1, SP=0 (the only form accepted); the parameter
    /// list follows as data-out.
    ModeSelect {
        param_len: u16,
        six: bool,
    },
    StartStopUnit {
        start: bool,
        load_eject: bool,
        /// POWER CONDITION field (byte 4 bits 7..4).
        power_condition: u8,
    },
    PreventAllow {
        prevent: bool,
    },
    ReadCapacity10,
    ReadCapacity16 {
        alloc: u32,
    },
    Read {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    Write {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    Verify {
        lba: u64,
        blocks: u32,
        /// BYTCHK=01b: compare the data-out buffer with the medium.
        bytchk: bool,
    },
    WriteSame {
        lba: u64,
        /// 0 is kept as 0 (the unit decides: this target sets WSNZ).
        blocks: u32,
        unmap: bool,
        /// NDOB (WRITE SAME(16)): no data-out buffer, write zeroes.
        ndob: bool,
    },
    Unmap {
        param_len: u16,
    },
    SynchronizeCache {
        lba: u64,
        /// 0: up to the end of the medium.
        blocks: u32,
    },
    ReportLuns {
        select: u8,
        alloc: u32,
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
    /// READ CD (MMC-6 6.22) of Mode 1 sectors: `user_data` when the
    /// 2048-byte user data is asked for, nothing at all otherwise (no
    /// header, sync, EDC or sub-channel fields are supported).
    ReadCd {
        lba: u32,
        blocks: u32,
        user_data: bool,
    },
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
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

/// The LBA and transfer length of a READ/WRITE/VERIFY/SYNCHRONIZE CACHE
/// CDB of the 10-, 12- or 16-byte layout (SBC-3 5.8-5.10: LBA in bytes
/// 2..6 or 2..10, length after it).
fn lba_len(cdb: &[u8]) -> (u64, u32) {
    match cdb_len(cdb[0]) {
        16 => (be64(&cdb[2..]), be32(&cdb[10..])),
        12 => (be32(&cdb[2..]) as u64, be32(&cdb[6..])),
        _ => (be32(&cdb[2..]) as u64, be16(&cdb[7..]) as u32),
    }
}

/// READ(6)/WRITE(6): a 21-bit LBA and a length where 0 means 256 blocks
/// (SBC-3 5.7, 5.32).
fn lba_len6(cdb: &[u8]) -> (u64, u32) {
    let lba = ((cdb[1] as u64 & 0x1f) << 16) | (cdb[2] as u64) << 8 | cdb[3] as u64;
    let blocks = match cdb[4] {
        0 => 256,
        n => n as u32,
    };
    (lba, blocks)
}

impl Command {
    /// Parses `cdb`. Returns the sense to report for an unknown operation
    /// code, a short CDB or a field this target does not support.
    pub fn parse(cdb: &[u8]) -> Result<Command, Sense> {
        let opcode = *cdb.first().ok_or(Sense::INVALID_OPCODE)?;
        if cdb.len() < cdb_len(opcode) {
            return Err(Sense::INVALID_FIELD);
        }
        // Bits 7..5 of byte 1 in the 10/12/16-byte READ, WRITE, VERIFY and
        // WRITE SAME CDBs: RDPROTECT/WRPROTECT/VRPROTECT. Protection
        // information is not supported.
        let protect = cdb[1] >> 5 != 0;
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
                    dbd: cdb[1] & 0x08 != 0,
                    llbaa: !six && cdb[1] & 0x10 != 0,
                }
            }
            op::MODE_SELECT_6 | op::MODE_SELECT_10 => {
                // PF=1 (SPC page format) and SP=0 (nothing is saved).
                if cdb[1] & 0x11 != 0x10 {
                    return Err(Sense::INVALID_FIELD);
                }
                let six = opcode == op::MODE_SELECT_6;
                Command::ModeSelect {
                    param_len: if six { cdb[4] as u16 } else { be16(&cdb[7..]) },
                    six,
                }
            }
            op::START_STOP_UNIT => Command::StartStopUnit {
                start: cdb[4] & 1 != 0,
                load_eject: cdb[4] & 2 != 0,
                power_condition: cdb[4] >> 4,
            },
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
            op::SERVICE_ACTION_IN_16 => {
                if cdb[1] & 0x1f != SA_READ_CAPACITY_16 {
                    return Err(Sense::INVALID_FIELD);
                }
                if cdb[14] & 1 == 0 && be64(&cdb[2..]) != 0 {
                    return Err(Sense::INVALID_FIELD);
                }
                Command::ReadCapacity16 {
                    alloc: be32(&cdb[10..]),
                }
            }
            op::READ_6 => {
                let (lba, blocks) = lba_len6(cdb);
                Command::Read {
                    lba,
                    blocks,
                    fua: false,
                }
            }
            op::WRITE_6 => {
                let (lba, blocks) = lba_len6(cdb);
                Command::Write {
                    lba,
                    blocks,
                    fua: false,
                }
            }
            op::READ_10 | op::READ_12 | op::READ_16 => {
                if protect {
                    return Err(Sense::INVALID_FIELD);
                }
                let (lba, blocks) = lba_len(cdb);
                Command::Read {
                    lba,
                    blocks,
                    fua: cdb[1] & 0x08 != 0,
                }
            }
            op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => {
                if protect {
                    return Err(Sense::INVALID_FIELD);
                }
                let (lba, blocks) = lba_len(cdb);
                Command::Write {
                    lba,
                    blocks,
                    fua: cdb[1] & 0x08 != 0,
                }
            }
            op::VERIFY_10 | op::VERIFY_16 => {
                // BYTCHK 00b: medium verification only; 01b: compare with
                // the data-out buffer; 10b reserved; 11b (compare one block
                // against every block) is not supported.
                let bytchk = match (cdb[1] >> 1) & 3 {
                    0 => false,
                    1 => true,
                    _ => return Err(Sense::INVALID_FIELD),
                };
                if protect {
                    return Err(Sense::INVALID_FIELD);
                }
                let (lba, blocks) = lba_len(cdb);
                Command::Verify {
                    lba,
                    blocks,
                    bytchk,
                }
            }
            op::WRITE_SAME_10 | op::WRITE_SAME_16 => {
                // WRPROTECT, ANCHOR and the obsolete PBDATA/LBDATA bits are
                // not supported.
                if protect || cdb[1] & 0x16 != 0 {
                    return Err(Sense::INVALID_FIELD);
                }
                // NDOB is SBC-4's WRITE SAME(16) bit; QEMU honours the same
                // bit of WRITE SAME(10) (obsolete RELADR there), and so do
                // we: its own virtio-scsi-test sends it.
                let ndob = cdb[1] & 0x01 != 0;
                let (lba, blocks) = lba_len(cdb);
                Command::WriteSame {
                    lba,
                    blocks,
                    unmap: cdb[1] & 0x08 != 0,
                    ndob,
                }
            }
            op::UNMAP => {
                if cdb[1] & 0x01 != 0 {
                    return Err(Sense::INVALID_FIELD); // ANCHOR
                }
                Command::Unmap {
                    param_len: be16(&cdb[7..]),
                }
            }
            op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => {
                let (lba, blocks) = lba_len(cdb);
                Command::SynchronizeCache { lba, blocks }
            }
            op::REPORT_LUNS => {
                // SELECT REPORT 00h (logical units), 01h (well-known
                // logical units only), 02h (both).
                if cdb[2] > 2 {
                    return Err(Sense::INVALID_FIELD);
                }
                Command::ReportLuns {
                    select: cdb[2],
                    alloc: be32(&cdb[6..]),
                }
            }
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
            op::READ_CD => {
                // Expected sector type: any (0) or Mode 1 (2); byte 9
                // selects the fields: none, or user data only; byte 10
                // no sub-channel data.
                let user_data = match cdb[9] & 0xf8 {
                    0x00 => false,
                    0x10 => true,
                    _ => return Err(Sense::INVALID_FIELD),
                };
                if !matches!((cdb[1] >> 2) & 7, 0 | 2) || cdb[10] & 7 != 0 {
                    return Err(Sense::INVALID_FIELD);
                }
                Command::ReadCd {
                    lba: be32(&cdb[2..]),
                    blocks: (cdb[6] as u32) << 16 | (cdb[7] as u32) << 8 | cdb[8] as u32,
                    user_data,
                }
            }
            _ => return Err(Sense::INVALID_OPCODE),
        };
        Ok(c)
    }

    /// Commands that are answered even while a UNIT ATTENTION is pending
    /// (SPC-4 5.14: INQUIRY, REPORT LUNS and REQUEST SENSE; MMC-5 4.1.6.1
    /// adds GET CONFIGURATION and GET EVENT STATUS NOTIFICATION so that
    /// hosts can poll for media without consuming the condition).
    pub fn allowed_with_unit_attention(&self) -> bool {
        matches!(
            self,
            Command::Inquiry { .. }
                | Command::RequestSense { .. }
                | Command::ReportLuns { .. }
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
                | Command::ReadCapacity16 { .. }
                | Command::Read { .. }
                | Command::ReadCd { .. }
                | Command::Write { .. }
                | Command::Verify { .. }
                | Command::WriteSame { .. }
                | Command::Unmap { .. }
                | Command::SynchronizeCache { .. }
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
            Ok(Command::Read {
                lba: 7,
                blocks: 3,
                fua: false
            })
        );
        cdb[0] = op::READ_12;
        cdb[6..10].copy_from_slice(&0x10000u32.to_be_bytes());
        assert_eq!(
            Command::parse(&cdb),
            Ok(Command::Read {
                lba: 7,
                blocks: 0x10000,
                fua: false
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

    #[test]
    fn parses_sbc_commands() {
        let p = |b: &[u8]| {
            let mut c = [0u8; 16];
            c[..b.len()].copy_from_slice(b);
            Command::parse(&c)
        };
        // READ(6): 21-bit LBA, zero blocks means 256.
        assert_eq!(
            p(&[op::READ_6, 0xff, 0x12, 0x34, 0]),
            Ok(Command::Read {
                lba: 0x1f1234,
                blocks: 256,
                fua: false
            })
        );
        let mut r16 = [0u8; 16];
        r16[0] = op::WRITE_16;
        r16[1] = 0x08;
        r16[2..10].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        r16[10..14].copy_from_slice(&0x1000u32.to_be_bytes());
        assert_eq!(
            Command::parse(&r16),
            Ok(Command::Write {
                lba: 0x0102_0304_0506_0708,
                blocks: 0x1000,
                fua: true
            })
        );
        assert_eq!(
            p(&[op::WRITE_SAME_16, 0x09, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 2]),
            Ok(Command::WriteSame {
                lba: 7,
                blocks: 2,
                unmap: true,
                ndob: true
            })
        );
        // NDOB in WRITE SAME(10) too, as QEMU reads it.
        assert_eq!(
            p(&[op::WRITE_SAME_10, 0x01, 0, 0, 0, 7, 0, 0, 2]),
            Ok(Command::WriteSame {
                lba: 7,
                blocks: 2,
                unmap: false,
                ndob: true
            })
        );
        assert_eq!(
            p(&[op::MODE_SENSE_10, 0x18, 0x08, 0, 0, 0, 0, 1, 0]),
            Ok(Command::ModeSense {
                page: 8,
                subpage: 0,
                pc: PageControl::Current,
                alloc: 256,
                six: false,
                dbd: true,
                llbaa: true
            })
        );
        assert_eq!(
            p(&[op::MODE_SELECT_10, 0x10, 0, 0, 0, 0, 0, 0x01, 0x02]),
            Ok(Command::ModeSelect {
                param_len: 0x102,
                six: false
            })
        );
        assert_eq!(
            p(&[op::REPORT_LUNS, 0, 2, 0, 0, 0, 0, 0, 1, 0]),
            Ok(Command::ReportLuns {
                select: 2,
                alloc: 256
            })
        );
        assert_eq!(
            p(&[
                op::SERVICE_ACTION_IN_16,
                0x10,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                32
            ]),
            Ok(Command::ReadCapacity16 { alloc: 32 })
        );
        assert_eq!(
            p(&[op::UNMAP, 0, 0, 0, 0, 0, 0, 0, 24]),
            Ok(Command::Unmap { param_len: 24 })
        );
        assert_eq!(
            p(&[op::SYNCHRONIZE_CACHE_10, 2, 0, 0, 0, 9, 0, 0, 0]),
            Ok(Command::SynchronizeCache { lba: 9, blocks: 0 })
        );
        assert_eq!(
            p(&[op::VERIFY_10, 0x02, 0, 0, 0, 1, 0, 0, 1]),
            Ok(Command::Verify {
                lba: 1,
                blocks: 1,
                bytchk: true
            })
        );
        assert_eq!(p(&[op::REPORT_LUNS, 0, 0x10]), Err(Sense::INVALID_FIELD));
        // A 16-byte opcode in a 12-byte packet is too short.
        assert_eq!(Command::parse(&r16[..12]), Err(Sense::INVALID_FIELD));
    }
}
