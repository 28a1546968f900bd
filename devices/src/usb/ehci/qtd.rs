//! Queue element transfer descriptors (EHCI 1.0 section 3.5: the next
//! and alternate next qTD pointers, the token of 3.5.3 and the five
//! buffer page pointers of 3.5.4), parsed from the guest's 32 bytes into
//! a typed value, and the checked view of a qTD the controller executes
//! ([`Transfer`]). The same layout is the queue head's transfer overlay
//! (3.6.3).

/// A qTD's size in guest memory (32-bit structures: no 64-bit
/// extension, HCCPARAMS bit 0 clear).
pub const QTD_SIZE: usize = 32;
/// The most one qTD moves: five 4 KiB pages (3.5.3).
pub const MAX_BYTES: usize = 0x5000;
const PAGE: u64 = 0x1000;

/// Link pointer bits shared by qTD and schedule pointers (3.1, 3.5.1).
pub mod ptr {
    /// T: no pointer.
    pub const TERMINATE: u32 = 1;
    /// Bits 31..5: a 32-byte aligned address.
    pub const ADDR: u32 = !0x1f;
}

/// Token bits (3.5.3).
pub mod token {
    pub const PING: u32 = 1 << 0;
    pub const SPLIT_STATE: u32 = 1 << 1;
    pub const MISSED_UFRAME: u32 = 1 << 2;
    pub const XACT_ERR: u32 = 1 << 3;
    pub const BABBLE: u32 = 1 << 4;
    pub const DATA_BUFFER_ERR: u32 = 1 << 5;
    pub const HALTED: u32 = 1 << 6;
    pub const ACTIVE: u32 = 1 << 7;
    pub const PID_SHIFT: u32 = 8;
    pub const PID: u32 = 3 << PID_SHIFT;
    pub const CERR_SHIFT: u32 = 10;
    pub const CERR: u32 = 3 << CERR_SHIFT;
    pub const C_PAGE_SHIFT: u32 = 12;
    pub const C_PAGE: u32 = 7 << C_PAGE_SHIFT;
    pub const IOC: u32 = 1 << 15;
    pub const BYTES_SHIFT: u32 = 16;
    pub const BYTES: u32 = 0x7fff << BYTES_SHIFT;
    pub const DT: u32 = 1 << 31;
    /// The status byte.
    pub const STATUS: u32 = 0xff;
}

/// The token's PID code (3.5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QtdPid {
    Out,
    In,
    Setup,
}

/// A qTD (or a queue head's overlay), word by word.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Qtd {
    pub next: u32,
    /// Bits 4..1 of the overlay's copy hold NakCnt.
    pub alt: u32,
    pub token: u32,
    /// Page 0's bits 11..0 are the current offset.
    pub pages: [u32; 5],
}

/// A qTD the controller cannot carry out as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QtdError {
    /// PID code 3 is reserved.
    Pid,
    /// More bytes than the buffer pages from C_Page and the offset on
    /// hold (or than 20 KiB).
    Length(usize),
}

/// What one execution of a qTD needs, checked: the PID, the bytes left
/// and where they are in guest memory (at most five segments, one per
/// page).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub pid: QtdPid,
    pub len: usize,
    pub segments: Vec<(u64, usize)>,
}

impl Qtd {
    pub fn parse(b: &[u8; QTD_SIZE]) -> Qtd {
        let w = |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        Qtd {
            next: w(0),
            alt: w(1),
            token: w(2),
            pages: [w(3), w(4), w(5), w(6), w(7)],
        }
    }

    pub fn words(&self) -> [u32; 8] {
        let p = self.pages;
        [
            self.next, self.alt, self.token, p[0], p[1], p[2], p[3], p[4],
        ]
    }

    pub fn active(&self) -> bool {
        self.token & token::ACTIVE != 0
    }

    pub fn halted(&self) -> bool {
        self.token & token::HALTED != 0
    }

    pub fn ioc(&self) -> bool {
        self.token & token::IOC != 0
    }

    /// Total Bytes to Transfer: what is left.
    pub fn bytes(&self) -> usize {
        ((self.token & token::BYTES) >> token::BYTES_SHIFT) as usize
    }

    pub fn c_page(&self) -> usize {
        ((self.token & token::C_PAGE) >> token::C_PAGE_SHIFT) as usize
    }

    pub fn cerr(&self) -> u32 {
        (self.token & token::CERR) >> token::CERR_SHIFT
    }

    pub fn set_cerr(&mut self, v: u32) {
        self.token = (self.token & !token::CERR) | (v & 3) << token::CERR_SHIFT;
    }

    pub fn pid(&self) -> Result<QtdPid, QtdError> {
        match (self.token & token::PID) >> token::PID_SHIFT {
            0 => Ok(QtdPid::Out),
            1 => Ok(QtdPid::In),
            2 => Ok(QtdPid::Setup),
            _ => Err(QtdError::Pid),
        }
    }

    /// The checked transfer (3.5.4): the bytes left, from the current
    /// offset in page C_Page on through the following pages.
    pub fn transfer(&self) -> Result<Transfer, QtdError> {
        let pid = self.pid()?;
        let len = self.bytes();
        let mut segments = Vec::new();
        let mut page = self.c_page();
        let mut offset = (self.pages[0] & 0xfff) as u64;
        let mut left = len;
        if len > MAX_BYTES {
            return Err(QtdError::Length(len));
        }
        while left > 0 {
            let Some(&base) = self.pages.get(page) else {
                return Err(QtdError::Length(len));
            };
            let n = ((PAGE - offset) as usize).min(left);
            segments.push(((base as u64 & !(PAGE - 1)) + offset, n));
            left -= n;
            offset = 0;
            page += 1;
        }
        Ok(Transfer { pid, len, segments })
    }

    /// Records `n` bytes moved: Total Bytes to Transfer, C_Page and the
    /// current offset advance (3.5.3, 3.5.4).
    pub fn advance(&mut self, n: usize) {
        let n = n.min(self.bytes());
        let left = (self.bytes() - n) as u32;
        let at = (self.pages[0] & 0xfff) as usize + n;
        // A transfer that ends exactly at the end of page 4 leaves C_Page
        // one past it, with nothing left to move.
        let page = (self.c_page() + at / PAGE as usize).min(7) as u32;
        self.pages[0] = (self.pages[0] & !0xfff) | (at % PAGE as usize) as u32;
        self.token = (self.token & !(token::BYTES | token::C_PAGE))
            | left << token::BYTES_SHIFT
            | page << token::C_PAGE_SHIFT;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qtd(tok: u32, pages: [u32; 5]) -> Qtd {
        Qtd {
            next: 1,
            alt: 1,
            token: tok,
            pages,
        }
    }

    #[test]
    fn parse_and_buffers() {
        let mut b = [0u8; 32];
        b[8..12].copy_from_slice(&(token::ACTIVE | 1 << 8 | 100 << 16).to_le_bytes());
        b[12..16].copy_from_slice(&0x1_0ff0u32.to_le_bytes());
        b[16..20].copy_from_slice(&0x5_0000u32.to_le_bytes());
        let q = Qtd::parse(&b);
        assert!(q.active());
        assert_eq!(q.bytes(), 100);
        let t = q.transfer().unwrap();
        assert_eq!(t.pid, QtdPid::In);
        assert_eq!(t.segments, vec![(0x1_0ff0, 16), (0x5_0000, 84)]);
        let mut q2 = q;
        q2.advance(20);
        assert_eq!((q2.bytes(), q2.c_page(), q2.pages[0]), (80, 1, 0x1_0004));
        assert_eq!(q2.transfer().unwrap().segments, vec![(0x5_0004, 80)]);
        // Reserved PID, too long, past page 4.
        assert_eq!(qtd(3 << 8, [0; 5]).transfer(), Err(QtdError::Pid));
        assert!(qtd(0x5001 << 16, [0; 5]).transfer().is_err());
        assert!(qtd(0x5000 << 16, [0x10, 0, 0, 0, 0]).transfer().is_err());
        assert!(qtd(0x5000 << 16, [0; 5]).transfer().is_ok());
        let mut full = qtd(0x5000 << 16, [0; 5]);
        full.advance(0x5000);
        assert_eq!((full.bytes(), full.c_page()), (0, 5));
        assert_eq!(full.transfer().unwrap().segments, vec![]);
        let mut q3 = qtd(0, [0; 5]);
        q3.set_cerr(3);
        assert_eq!(q3.cerr(), 3);
    }
}
