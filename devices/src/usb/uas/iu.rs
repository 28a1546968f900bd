//! UAS information units (T10 UAS-2 section 6.2; the USB UASP 1.0 spec
//! carries the same layouts): the IUs the host sends on the command pipe
//! parsed into typed values before anything acts on them, and the IUs the
//! device sends on the status pipe built from typed values.
//!
//! Every IU starts with a 4-byte header (6.2.1): IU ID, a reserved byte
//! and the big-endian tag.

use crate::scsi::Sense;

/// IU IDs (UAS-2 table 10).
pub mod id {
    pub const COMMAND: u8 = 0x01;
    pub const SENSE: u8 = 0x03;
    pub const RESPONSE: u8 = 0x04;
    pub const TASK_MANAGEMENT: u8 = 0x05;
    pub const READ_READY: u8 = 0x06;
    pub const WRITE_READY: u8 = 0x07;
}

/// The COMMAND IU without additional CDB bytes (6.2.2): header, task
/// attribute and priority, additional CDB length, LUN, 16-byte CDB.
pub const COMMAND_LEN: usize = 32;
/// The TASK MANAGEMENT IU (6.2.6).
pub const TASK_MANAGEMENT_LEN: usize = 16;
/// Header, status qualifier, status, reserved, sense length (6.2.3), before
/// the sense data.
pub const SENSE_HEADER_LEN: usize = 16;
/// The RESPONSE IU (6.2.5).
pub const RESPONSE_LEN: usize = 8;
/// READ READY and WRITE READY are a bare header (6.2.4, 6.2.7).
pub const READY_LEN: usize = 4;
/// The longest IU the command pipe can carry: a COMMAND IU with the
/// largest additional CDB length (6 bits of dwords).
pub const MAX_IU_LEN: usize = COMMAND_LEN + 63 * 4;

/// RESPONSE CODE values (UAS-2 table 17).
pub mod response {
    pub const TMF_COMPLETE: u8 = 0x00;
    pub const INVALID_IU: u8 = 0x02;
    pub const TMF_NOT_SUPPORTED: u8 = 0x04;
    pub const TMF_FAILED: u8 = 0x05;
    pub const TMF_SUCCEEDED: u8 = 0x08;
    pub const INCORRECT_LUN: u8 = 0x09;
    pub const OVERLAPPED_TAG: u8 = 0x0a;
}

/// SAM-5 task attributes (UAS-2 table 12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskAttribute {
    Simple,
    HeadOfQueue,
    Ordered,
    Aca,
}

/// A COMMAND IU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandIu {
    pub tag: u16,
    pub attribute: TaskAttribute,
    /// Command priority (bits 6..3 of byte 4).
    pub priority: u8,
    /// The 8-byte SAM LUN field, as sent.
    pub lun: [u8; 8],
    /// The CDB with its additional bytes (16..=268 bytes).
    pub cdb: Vec<u8>,
}

/// Task management functions (UAS-2 table 19, SAM-5 7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tmf {
    AbortTask,
    AbortTaskSet,
    ClearTaskSet,
    LogicalUnitReset,
    ITNexusReset,
    ClearAca,
    QueryTask,
    QueryTaskSet,
    QueryAsyncEvent,
    /// A function code the spec does not define.
    Other(u8),
}

impl Tmf {
    fn from_code(c: u8) -> Tmf {
        match c {
            0x01 => Tmf::AbortTask,
            0x02 => Tmf::AbortTaskSet,
            0x04 => Tmf::ClearTaskSet,
            0x08 => Tmf::LogicalUnitReset,
            0x10 => Tmf::ITNexusReset,
            0x40 => Tmf::ClearAca,
            0x80 => Tmf::QueryTask,
            0x81 => Tmf::QueryTaskSet,
            0x82 => Tmf::QueryAsyncEvent,
            c => Tmf::Other(c),
        }
    }
}

/// A TASK MANAGEMENT IU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskManagementIu {
    pub tag: u16,
    pub function: Tmf,
    /// The tag of the task to manage (ABORT TASK, QUERY TASK).
    pub task_tag: u16,
    pub lun: [u8; 8],
}

/// What the command pipe carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostIu {
    Command(CommandIu),
    TaskManagement(TaskManagementIu),
}

/// Why an IU was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IuError {
    /// Too short to hold even a header: there is no tag to answer.
    NoHeader(usize),
    /// The IU (with this tag) is not one a host sends, is shorter than its
    /// type, or has a reserved task attribute: RESPONSE IU with INVALID
    /// INFORMATION UNIT (UAS-2 6.2.5).
    Invalid { tag: u16 },
}

impl HostIu {
    /// Parses one transfer of the command pipe.
    pub fn parse(b: &[u8]) -> Result<HostIu, IuError> {
        if b.len() < 4 {
            return Err(IuError::NoHeader(b.len()));
        }
        let tag = u16::from_be_bytes([b[2], b[3]]);
        let invalid = IuError::Invalid { tag };
        let lun = |at: usize| -> [u8; 8] {
            let mut l = [0u8; 8];
            l.copy_from_slice(&b[at..at + 8]);
            l
        };
        match b[0] {
            id::COMMAND => {
                if b.len() < COMMAND_LEN {
                    return Err(invalid);
                }
                let attribute = match b[4] & 7 {
                    0 => TaskAttribute::Simple,
                    1 => TaskAttribute::HeadOfQueue,
                    2 => TaskAttribute::Ordered,
                    4 => TaskAttribute::Aca,
                    _ => return Err(invalid),
                };
                let extra = (b[6] >> 2) as usize * 4;
                let end = COMMAND_LEN + extra;
                if b.len() < end {
                    return Err(invalid);
                }
                Ok(HostIu::Command(CommandIu {
                    tag,
                    attribute,
                    priority: (b[4] >> 3) & 0x0f,
                    lun: lun(8),
                    cdb: b[16..end].to_vec(),
                }))
            }
            id::TASK_MANAGEMENT => {
                if b.len() < TASK_MANAGEMENT_LEN {
                    return Err(invalid);
                }
                Ok(HostIu::TaskManagement(TaskManagementIu {
                    tag,
                    function: Tmf::from_code(b[4]),
                    task_tag: u16::from_be_bytes([b[6], b[7]]),
                    lun: lun(8),
                }))
            }
            _ => Err(invalid),
        }
    }

    pub fn tag(&self) -> u16 {
        match self {
            HostIu::Command(c) => c.tag,
            HostIu::TaskManagement(t) => t.tag,
        }
    }
}

/// The LUN a SAM-5 8-byte LUN field addresses (SAM-5 4.7: single level,
/// peripheral device addressing with bus 0, or flat space addressing);
/// `None` for other methods and for a second level, which a single
/// target never has.
pub fn decode_lun(l: &[u8; 8]) -> Option<u64> {
    if l[2..].iter().any(|&b| b != 0) {
        return None;
    }
    match l[0] >> 6 {
        0 if l[0] == 0 => Some(l[1] as u64),
        1 => Some(((l[0] as u64 & 0x3f) << 8) | l[1] as u64),
        _ => None,
    }
}

/// The 8-byte LUN field for `lun` (peripheral addressing below 256, flat
/// space above), as a host builds it.
pub fn encode_lun(lun: u64) -> [u8; 8] {
    let mut l = [0u8; 8];
    if lun < 256 {
        l[1] = lun as u8;
    } else {
        l[0] = 0x40 | ((lun >> 8) as u8 & 0x3f);
        l[1] = lun as u8;
    }
    l
}

/// An IU the device sends on the status pipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceIu {
    /// SENSE IU (6.2.3): the SAM status, with fixed-format sense data
    /// for CHECK CONDITION.
    Sense {
        tag: u16,
        status: u8,
        sense: Option<Sense>,
    },
    /// RESPONSE IU (6.2.5).
    Response { tag: u16, code: u8 },
    /// READ READY (6.2.4): the device is ready for the data-in phase.
    ReadReady { tag: u16 },
    /// WRITE READY (6.2.7): the device is ready for the data-out phase.
    WriteReady { tag: u16 },
}

impl DeviceIu {
    pub fn tag(&self) -> u16 {
        match *self {
            DeviceIu::Sense { tag, .. }
            | DeviceIu::Response { tag, .. }
            | DeviceIu::ReadReady { tag }
            | DeviceIu::WriteReady { tag } => tag,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let (id, tag) = match *self {
            DeviceIu::Sense { tag, .. } => (id::SENSE, tag),
            DeviceIu::Response { tag, .. } => (id::RESPONSE, tag),
            DeviceIu::ReadReady { tag } => (id::READ_READY, tag),
            DeviceIu::WriteReady { tag } => (id::WRITE_READY, tag),
        };
        let t = tag.to_be_bytes();
        let mut v = vec![id, 0, t[0], t[1]];
        match *self {
            DeviceIu::Sense { status, sense, .. } => {
                let data = sense.map(|s| s.fixed());
                let len = data.map_or(0, |d| d.len()) as u16;
                // Status qualifier 0, status, 7 reserved bytes, length.
                v.extend_from_slice(&[0, 0, status, 0, 0, 0, 0, 0, 0, 0]);
                v.extend_from_slice(&len.to_be_bytes());
                if let Some(d) = data {
                    v.extend_from_slice(&d);
                }
            }
            DeviceIu::Response { code, .. } => v.extend_from_slice(&[0, 0, 0, code]),
            DeviceIu::ReadReady { .. } | DeviceIu::WriteReady { .. } => {}
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(tag: u16, attr: u8, add: u8, lun: [u8; 8], cdb: &[u8]) -> Vec<u8> {
        let t = tag.to_be_bytes();
        let mut v = vec![1, 0, t[0], t[1], attr, 0, add << 2, 0];
        v.extend_from_slice(&lun);
        let mut c = [0u8; 16];
        c[..cdb.len().min(16)].copy_from_slice(&cdb[..cdb.len().min(16)]);
        v.extend_from_slice(&c);
        v.extend(std::iter::repeat_n(0xaa, add as usize * 4));
        v
    }

    #[test]
    fn command_iu() {
        let b = command(0x1234, (3 << 3) | 2, 0, encode_lun(5), &[0x12, 0, 0, 0, 36]);
        let HostIu::Command(c) = HostIu::parse(&b).unwrap() else {
            panic!()
        };
        assert_eq!(c.tag, 0x1234);
        assert_eq!((c.attribute, c.priority), (TaskAttribute::Ordered, 3));
        assert_eq!(decode_lun(&c.lun), Some(5));
        assert_eq!(c.cdb.len(), 16);
        assert_eq!(&c.cdb[..5], &[0x12, 0, 0, 0, 36]);
        // Additional CDB bytes must be there.
        let b = command(7, 0, 2, encode_lun(0), &[0x7f]);
        let HostIu::Command(c) = HostIu::parse(&b).unwrap() else {
            panic!()
        };
        assert_eq!(c.cdb.len(), 24);
        assert_eq!(
            HostIu::parse(&b[..b.len() - 1]),
            Err(IuError::Invalid { tag: 7 })
        );
        assert_eq!(
            HostIu::parse(&command(9, 3, 0, [0; 8], &[0])),
            Err(IuError::Invalid { tag: 9 }),
            "reserved task attribute"
        );
        assert_eq!(HostIu::parse(&b[..31]), Err(IuError::Invalid { tag: 7 }));
        assert_eq!(HostIu::parse(&b[..3]), Err(IuError::NoHeader(3)));
    }

    #[test]
    fn task_management_iu() {
        let mut b = vec![5, 0, 0, 9, 0x01, 0, 0, 4];
        b.extend_from_slice(&encode_lun(0));
        assert_eq!(
            HostIu::parse(&b),
            Ok(HostIu::TaskManagement(TaskManagementIu {
                tag: 9,
                function: Tmf::AbortTask,
                task_tag: 4,
                lun: [0; 8],
            }))
        );
        b[4] = 0x33;
        assert!(matches!(
            HostIu::parse(&b),
            Ok(HostIu::TaskManagement(TaskManagementIu {
                function: Tmf::Other(0x33),
                ..
            }))
        ));
        assert_eq!(HostIu::parse(&b[..15]), Err(IuError::Invalid { tag: 9 }));
        // A device IU on the command pipe is not valid there.
        assert_eq!(
            HostIu::parse(&[3, 0, 0, 2, 0, 0, 0, 0]),
            Err(IuError::Invalid { tag: 2 })
        );
    }

    #[test]
    fn luns() {
        assert_eq!(decode_lun(&encode_lun(0)), Some(0));
        assert_eq!(decode_lun(&encode_lun(255)), Some(255));
        assert_eq!(decode_lun(&encode_lun(300)), Some(300));
        assert_eq!(decode_lun(&[0x01, 0, 0, 0, 0, 0, 0, 0]), None, "bus 1");
        assert_eq!(decode_lun(&[0, 1, 0, 1, 0, 0, 0, 0]), None, "level 2");
        assert_eq!(decode_lun(&[0x80, 1, 0, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn device_ius() {
        assert_eq!(
            DeviceIu::Sense {
                tag: 3,
                status: 0,
                sense: None
            }
            .to_bytes(),
            vec![3, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let s = DeviceIu::Sense {
            tag: 0x102,
            status: 2,
            sense: Some(Sense::LUN_NOT_SUPPORTED),
        }
        .to_bytes();
        assert_eq!(s.len(), 34);
        assert_eq!(
            (s[2], s[3], s[6], s[15], s[16], s[18]),
            (1, 2, 2, 18, 0x70, 5)
        );
        assert_eq!(s[16 + 12], 0x25);
        assert_eq!(
            DeviceIu::Response { tag: 1, code: 0x0a }.to_bytes(),
            vec![4, 0, 0, 1, 0, 0, 0, 0x0a]
        );
        assert_eq!(DeviceIu::ReadReady { tag: 5 }.to_bytes(), vec![6, 0, 0, 5]);
        assert_eq!(DeviceIu::WriteReady { tag: 5 }.to_bytes(), vec![7, 0, 0, 5]);
    }
}
