//! The UHCI schedule's data structures (Intel UHCI Design Guide rev 1.1,
//! chapter 3 "Data Structures": 3.1 the frame list and its link
//! pointers, 3.2 transfer descriptors, 3.3 queue heads), parsed from the
//! guest's bytes into typed values before the controller acts on them.

/// Link pointer bits (3.1.1, 3.2.1, 3.3.1).
pub mod link {
    /// T: nothing follows.
    pub const TERMINATE: u32 = 1 << 0;
    /// Q: the pointer is to a queue head, not a TD.
    pub const QH: u32 = 1 << 1;
    /// Vf (TD link only): depth first, go on down the queue.
    pub const DEPTH: u32 = 1 << 2;
    /// Bits 31..4: the 16-byte aligned address.
    pub const ADDR: u32 = !0xf;
}

/// TD control and status bits (3.2.2).
pub mod ctrl {
    pub const ACTLEN: u32 = 0x7ff;
    pub const BITSTUFF: u32 = 1 << 17;
    pub const CRC_TIMEOUT: u32 = 1 << 18;
    pub const NAK: u32 = 1 << 19;
    pub const BABBLE: u32 = 1 << 20;
    pub const DATA_BUFFER: u32 = 1 << 21;
    pub const STALLED: u32 = 1 << 22;
    pub const ACTIVE: u32 = 1 << 23;
    pub const IOC: u32 = 1 << 24;
    pub const IOS: u32 = 1 << 25;
    pub const LS: u32 = 1 << 26;
    pub const C_ERR_SHIFT: u32 = 27;
    pub const C_ERR: u32 = 3 << C_ERR_SHIFT;
    pub const SPD: u32 = 1 << 29;
    /// Every status bit the controller writes on completion.
    pub const STATUS: u32 = 0xff << 16;
}

/// Packet identifiers (USB 2.0 table 8-1).
pub mod pid {
    pub const SETUP: u8 = 0x2d;
    pub const IN: u8 = 0x69;
    pub const OUT: u8 = 0xe1;
}

/// The largest MaxLen a TD may carry (3.2.3: 0x4FF, 1280 bytes); 0x7FF
/// is the null packet, 0x500..=0x7FE are invalid.
pub const MAX_LEN_FIELD: u32 = 0x4ff;
const NULL_LEN_FIELD: u32 = 0x7ff;

/// A link pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    Terminate,
    Td { addr: u32, depth: bool },
    Qh { addr: u32 },
}

impl Link {
    pub fn parse(v: u32) -> Link {
        if v & link::TERMINATE != 0 {
            Link::Terminate
        } else if v & link::QH != 0 {
            Link::Qh {
                addr: v & link::ADDR,
            }
        } else {
            Link::Td {
                addr: v & link::ADDR,
                depth: v & link::DEPTH != 0,
            }
        }
    }
}

/// A queue head (3.3): the horizontal link and the queue element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Qh {
    pub head: u32,
    pub element: u32,
}

impl Qh {
    pub fn parse(b: &[u8; 8]) -> Qh {
        Qh {
            head: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            element: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
}

/// The token's PID, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TdPid {
    Setup,
    In,
    Out,
}

/// A transfer descriptor (3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Td {
    pub link: u32,
    pub ctrl: u32,
    pub token: u32,
    pub buffer: u32,
}

/// A TD the controller cannot carry out: an HC Process Error (2.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TdError {
    Pid(u8),
    MaxLen(u32),
}

/// The token's fields (3.2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    pub pid: TdPid,
    pub address: u8,
    pub endpoint: u8,
    /// Bytes to move: MaxLen + 1, or 0 for the null packet.
    pub len: usize,
}

impl Td {
    pub fn parse(b: &[u8; 16]) -> Td {
        let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Td {
            link: w(0),
            ctrl: w(4),
            token: w(8),
            buffer: w(12),
        }
    }

    pub fn active(&self) -> bool {
        self.ctrl & ctrl::ACTIVE != 0
    }

    pub fn token(&self) -> Result<Token, TdError> {
        let t = self.token;
        let pid = match t as u8 {
            pid::SETUP => TdPid::Setup,
            pid::IN => TdPid::In,
            pid::OUT => TdPid::Out,
            p => return Err(TdError::Pid(p)),
        };
        let max = t >> 21;
        let len = match max {
            NULL_LEN_FIELD => 0,
            m if m <= MAX_LEN_FIELD => m as usize + 1,
            m => return Err(TdError::MaxLen(m)),
        };
        Ok(Token {
            pid,
            address: ((t >> 8) & 0x7f) as u8,
            endpoint: ((t >> 15) & 0xf) as u8,
            len,
        })
    }

    /// Records `n` bytes moved: ActLen is n - 1, 0x7FF for none.
    pub fn set_actlen(&mut self, n: usize) {
        let v = (n as u32).wrapping_sub(1) & ctrl::ACTLEN;
        self.ctrl = (self.ctrl & !ctrl::ACTLEN) | v;
    }

    pub fn c_err(&self) -> u32 {
        (self.ctrl & ctrl::C_ERR) >> ctrl::C_ERR_SHIFT
    }

    pub fn set_c_err(&mut self, v: u32) {
        self.ctrl = (self.ctrl & !ctrl::C_ERR) | ((v & 3) << ctrl::C_ERR_SHIFT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields() {
        assert_eq!(Link::parse(1), Link::Terminate);
        assert_eq!(Link::parse(0x1232), Link::Qh { addr: 0x1230 });
        assert_eq!(
            Link::parse(0x1244),
            Link::Td {
                addr: 0x1240,
                depth: true
            }
        );
        let token = (7u32 << 21) | (1 << 19) | (2 << 15) | (5 << 8) | pid::IN as u32;
        let mut td = Td::parse(&[0; 16]);
        td.token = token;
        assert_eq!(
            td.token(),
            Ok(Token {
                pid: TdPid::In,
                address: 5,
                endpoint: 2,
                len: 8
            })
        );
        td.token = (0x7ff << 21) | pid::OUT as u32;
        assert_eq!(td.token().unwrap().len, 0);
        td.token = (0x500 << 21) | pid::OUT as u32;
        assert_eq!(td.token(), Err(TdError::MaxLen(0x500)));
        td.token = 0x42;
        assert_eq!(td.token(), Err(TdError::Pid(0x42)));
        td.set_actlen(0);
        assert_eq!(td.ctrl & ctrl::ACTLEN, 0x7ff);
        td.set_actlen(64);
        assert_eq!(td.ctrl & ctrl::ACTLEN, 63);
        td.set_c_err(3);
        assert_eq!(td.c_err(), 3);
    }
}
