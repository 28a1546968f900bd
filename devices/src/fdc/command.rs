//! The i82078's command phase: how many bytes each command takes, and the
//! bytes turned into a typed [`Command`] before anything executes. Follows
//! the 82078 datasheet, section 8 (command set: opcodes, the MT, MFM and
//! SK bits, and the parameter bytes), with the 82077AA's extended commands
//! (CONFIGURE, DUMPREG, LOCK, PERPENDICULAR MODE, VERSION, RELATIVE SEEK)
//! and PART ID.

/// The data commands that share the nine-byte layout (cmd, HDS/DS, C, H,
/// R, N, EOT, GPL, DTL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataOp {
    Read,
    ReadDeleted,
    Write,
    WriteDeleted,
    ReadTrack,
    Verify,
    ScanEqual,
    ScanLowOrEqual,
    ScanHighOrEqual,
}

/// A sector address: cylinder, head, record (sector number), size code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chrn {
    pub c: u8,
    pub h: u8,
    pub r: u8,
    pub n: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Data {
        op: DataOp,
        /// Multi-track: continue on head 1 after EOT on head 0.
        mt: bool,
        drive: u8,
        /// The head select bit of the HDS/DS byte.
        head: u8,
        at: Chrn,
        /// The last sector number on the track.
        eot: u8,
        gpl: u8,
        /// Bytes per sector when N is 0.
        dtl: u8,
    },
    ReadId {
        drive: u8,
        head: u8,
    },
    FormatTrack {
        drive: u8,
        head: u8,
        n: u8,
        /// Sectors per track: the ID fields that follow as data.
        sectors: u8,
        gpl: u8,
        filler: u8,
    },
    Recalibrate {
        drive: u8,
    },
    Seek {
        drive: u8,
        head: u8,
        cyl: u8,
    },
    /// RELATIVE SEEK: `steps` tracks towards the spindle (`inward`) or
    /// towards track 0.
    RelativeSeek {
        drive: u8,
        head: u8,
        inward: bool,
        steps: u8,
    },
    SenseInterrupt,
    SenseDriveStatus {
        drive: u8,
        head: u8,
    },
    /// Step rate / head unload time, head load time / non-DMA.
    Specify {
        srt_hut: u8,
        hlt_nd: u8,
    },
    Configure {
        config: u8,
        pretrk: u8,
    },
    Version,
    PartId,
    DumpReg,
    Lock {
        lock: bool,
    },
    Perpendicular {
        value: u8,
    },
    PowerDown {
        value: u8,
    },
    /// An opcode the controller does not know: ST0 = 80h.
    Invalid,
}

pub mod op {
    pub const READ_TRACK: u8 = 0x02;
    pub const SPECIFY: u8 = 0x03;
    pub const SENSE_DRIVE_STATUS: u8 = 0x04;
    pub const WRITE: u8 = 0x05;
    pub const READ: u8 = 0x06;
    pub const RECALIBRATE: u8 = 0x07;
    pub const SENSE_INTERRUPT: u8 = 0x08;
    pub const WRITE_DELETED: u8 = 0x09;
    pub const READ_ID: u8 = 0x0a;
    pub const READ_DELETED: u8 = 0x0c;
    pub const FORMAT_TRACK: u8 = 0x0d;
    pub const DUMPREG: u8 = 0x0e;
    pub const SEEK: u8 = 0x0f;
    pub const VERSION: u8 = 0x10;
    pub const SCAN_EQUAL: u8 = 0x11;
    pub const PERPENDICULAR: u8 = 0x12;
    pub const CONFIGURE: u8 = 0x13;
    pub const LOCK: u8 = 0x94;
    pub const VERIFY: u8 = 0x16;
    pub const POWERDOWN: u8 = 0x17;
    pub const PART_ID: u8 = 0x18;
    pub const SCAN_LOW_OR_EQUAL: u8 = 0x19;
    pub const SCAN_HIGH_OR_EQUAL: u8 = 0x1d;
    pub const RELATIVE_SEEK_OUT: u8 = 0x8f;
    pub const RELATIVE_SEEK_IN: u8 = 0xcf;
    pub const UNLOCK: u8 = 0x14;
}

/// Which command the first byte starts, and its opcode bits; the bits a
/// command does not define must be clear, or the byte is invalid.
fn decode(first: u8) -> Option<(u8, usize)> {
    // Commands whose whole first byte is the opcode.
    let exact = match first {
        op::DUMPREG | op::VERSION | op::PART_ID | op::LOCK | op::UNLOCK => Some(1),
        op::SENSE_INTERRUPT => Some(1),
        op::SPECIFY | op::SEEK | op::RELATIVE_SEEK_OUT | op::RELATIVE_SEEK_IN => Some(3),
        op::SENSE_DRIVE_STATUS | op::RECALIBRATE | op::PERPENDICULAR | op::POWERDOWN => Some(2),
        op::CONFIGURE => Some(4),
        _ => None,
    };
    if let Some(len) = exact {
        return Some((first, len));
    }
    // MT (bit 7), MFM (6) and SK (5) ride on the data commands.
    let code = first & 0x1f;
    let flags = first & 0xe0;
    let allowed = match code {
        op::READ
        | op::READ_DELETED
        | op::VERIFY
        | op::SCAN_EQUAL
        | op::SCAN_LOW_OR_EQUAL
        | op::SCAN_HIGH_OR_EQUAL => 0xe0,
        op::WRITE | op::WRITE_DELETED => 0xc0,
        op::READ_TRACK => 0x60,
        op::READ_ID | op::FORMAT_TRACK => 0x40,
        _ => return None,
    };
    if flags & !allowed != 0 {
        return None;
    }
    let len = match code {
        op::READ_ID => 2,
        op::FORMAT_TRACK => 6,
        _ => 9,
    };
    Some((code, len))
}

/// Bytes of the command that `first` begins (1 for an invalid opcode,
/// which ends at once with its error result).
pub fn length(first: u8) -> usize {
    decode(first).map_or(1, |(_, len)| len)
}

/// Parses a whole command (`bytes.len() == length(bytes[0])`).
pub fn parse(bytes: &[u8]) -> Command {
    let Some(&first) = bytes.first() else {
        return Command::Invalid;
    };
    let Some((code, len)) = decode(first) else {
        return Command::Invalid;
    };
    if bytes.len() < len {
        return Command::Invalid;
    }
    let b = |i: usize| bytes[i];
    let (drive, head) = match bytes.get(1) {
        Some(&x) => (x & 3, (x >> 2) & 1),
        None => (0, 0),
    };
    let data = |op: DataOp| Command::Data {
        op,
        mt: first & 0x80 != 0,
        drive,
        head,
        at: Chrn {
            c: b(2),
            h: b(3),
            r: b(4),
            n: b(5),
        },
        eot: b(6),
        gpl: b(7),
        dtl: b(8),
    };
    match code {
        op::READ => data(DataOp::Read),
        op::READ_DELETED => data(DataOp::ReadDeleted),
        op::WRITE => data(DataOp::Write),
        op::WRITE_DELETED => data(DataOp::WriteDeleted),
        op::READ_TRACK => data(DataOp::ReadTrack),
        op::VERIFY => data(DataOp::Verify),
        op::SCAN_EQUAL => data(DataOp::ScanEqual),
        op::SCAN_LOW_OR_EQUAL => data(DataOp::ScanLowOrEqual),
        op::SCAN_HIGH_OR_EQUAL => data(DataOp::ScanHighOrEqual),
        op::READ_ID => Command::ReadId { drive, head },
        op::FORMAT_TRACK => Command::FormatTrack {
            drive,
            head,
            n: b(2),
            sectors: b(3),
            gpl: b(4),
            filler: b(5),
        },
        op::RECALIBRATE => Command::Recalibrate { drive },
        op::SEEK => Command::Seek {
            drive,
            head,
            cyl: b(2),
        },
        op::RELATIVE_SEEK_OUT | op::RELATIVE_SEEK_IN => Command::RelativeSeek {
            drive,
            head,
            inward: code == op::RELATIVE_SEEK_IN,
            steps: b(2),
        },
        op::SENSE_INTERRUPT => Command::SenseInterrupt,
        op::SENSE_DRIVE_STATUS => Command::SenseDriveStatus { drive, head },
        op::SPECIFY => Command::Specify {
            srt_hut: b(1),
            hlt_nd: b(2),
        },
        op::CONFIGURE => Command::Configure {
            config: b(2),
            pretrk: b(3),
        },
        op::VERSION => Command::Version,
        op::PART_ID => Command::PartId,
        op::DUMPREG => Command::DumpReg,
        op::LOCK | op::UNLOCK => Command::Lock {
            lock: code == op::LOCK,
        },
        op::PERPENDICULAR => Command::Perpendicular { value: b(1) },
        op::POWERDOWN => Command::PowerDown { value: b(1) },
        _ => Command::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_typed_commands() {
        // READ DATA with MT, MFM and SK (what QEMU's fdc-test sends).
        let read = [0xe6, 0x04, 3, 1, 7, 2, 18, 0x1b, 0xff];
        assert_eq!(length(read[0]), 9);
        assert_eq!(
            parse(&read),
            Command::Data {
                op: DataOp::Read,
                mt: true,
                drive: 0,
                head: 1,
                at: Chrn {
                    c: 3,
                    h: 1,
                    r: 7,
                    n: 2
                },
                eot: 18,
                gpl: 0x1b,
                dtl: 0xff
            }
        );
        // WRITE DATA has no SK bit: with it, the byte is no command.
        assert_eq!(length(0xc5), 9);
        assert_eq!(length(0xe5), 1);
        assert_eq!(parse(&[0xe5]), Command::Invalid);
        assert_eq!(length(op::SENSE_INTERRUPT), 1);
        assert_eq!(parse(&[0x4a, 0x05]), Command::ReadId { drive: 1, head: 1 });
        assert_eq!(
            parse(&[op::RELATIVE_SEEK_IN, 0, 1]),
            Command::RelativeSeek {
                drive: 0,
                head: 0,
                inward: true,
                steps: 1
            }
        );
        assert_eq!(parse(&[op::UNLOCK]), Command::Lock { lock: false });
        assert_eq!(length(op::CONFIGURE), 4);
        assert_eq!(length(0x4d), 6, "FORMAT TRACK with MFM");
        // Every byte parses to something, with its length, without panics.
        for first in 0..=255u8 {
            let mut cmd = vec![first];
            cmd.resize(length(first), 0xff);
            let _ = parse(&cmd);
            let _ = parse(&cmd[..1]);
        }
    }
}
