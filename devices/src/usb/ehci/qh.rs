//! Schedule link pointers (EHCI 1.0 section 3.1 and 3.6.1) and queue
//! heads (3.6: the endpoint characteristics and capabilities of 3.6.2,
//! the current qTD pointer and the transfer overlay of 3.6.3), parsed
//! from the guest's bytes into typed values before anything runs.
//!
//! Isochronous transfer descriptors (iTD, 3.3), split-transaction
//! isochronous ones (siTD, 3.4) and FSTNs (3.7) are recognised only as
//! far as their next link (their first dword), so that a periodic
//! schedule holding them is walked past them: high-speed isochronous
//! and split transactions are not emulated (no device here needs them),
//! and the controller never writes to those structures.

use super::qtd::{ptr, Qtd, QTD_SIZE};

/// A queue head's size (32-bit structures).
pub const QH_SIZE: usize = 48;

/// What a schedule link points at (the Typ field, 3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    Itd,
    Qh,
    Sitd,
    Fstn,
}

/// A frame list entry or horizontal link pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    Terminate,
    To { kind: LinkKind, addr: u32 },
}

impl Link {
    pub fn parse(v: u32) -> Link {
        if v & ptr::TERMINATE != 0 {
            return Link::Terminate;
        }
        let kind = match (v >> 1) & 3 {
            0 => LinkKind::Itd,
            1 => LinkKind::Qh,
            2 => LinkKind::Sitd,
            _ => LinkKind::Fstn,
        };
        Link::To {
            kind,
            addr: v & ptr::ADDR,
        }
    }
}

/// The endpoint speed field (EPS, 3.6.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpSpeed {
    Full,
    Low,
    High,
    Reserved,
}

/// A queue head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Qh {
    /// Queue Head Horizontal Link Pointer (dword 0).
    pub link: u32,
    pub address: u8,
    /// I: inactivate on next transaction (periodic full/low speed only).
    pub inactivate: bool,
    pub endpoint: u8,
    pub speed: EpSpeed,
    /// DTC: the data toggle comes from each qTD, not the queue head.
    pub dtc: bool,
    /// H: head of the reclamation list.
    pub head: bool,
    pub max_packet: usize,
    /// C: a full/low speed control endpoint (split transactions).
    pub control: bool,
    /// RL: the NakCnt reload value.
    pub nak_reload: u8,
    pub s_mask: u8,
    pub c_mask: u8,
    pub hub: u8,
    pub port: u8,
    pub mult: u8,
    /// Current qTD Pointer (dword 3).
    pub current: u32,
    /// The transfer overlay (dwords 4..11).
    pub overlay: Qtd,
}

/// Offsets in a queue head.
pub const QH_CURRENT: u64 = 12;
pub const QH_OVERLAY: u64 = 16;

impl Qh {
    pub fn parse(b: &[u8; QH_SIZE]) -> Qh {
        let w = |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        let (ch, caps) = (w(1), w(2));
        let mut ov = [0u8; QTD_SIZE];
        ov.copy_from_slice(&b[16..48]);
        Qh {
            link: w(0),
            address: (ch & 0x7f) as u8,
            inactivate: ch & (1 << 7) != 0,
            endpoint: ((ch >> 8) & 0xf) as u8,
            speed: match (ch >> 12) & 3 {
                0 => EpSpeed::Full,
                1 => EpSpeed::Low,
                2 => EpSpeed::High,
                _ => EpSpeed::Reserved,
            },
            dtc: ch & (1 << 14) != 0,
            head: ch & (1 << 15) != 0,
            max_packet: ((ch >> 16) & 0x7ff) as usize,
            control: ch & (1 << 27) != 0,
            nak_reload: (ch >> 28) as u8,
            s_mask: caps as u8,
            c_mask: (caps >> 8) as u8,
            hub: ((caps >> 16) & 0x7f) as u8,
            port: ((caps >> 23) & 0x7f) as u8,
            mult: (caps >> 30) as u8,
            current: w(3),
            overlay: Qtd::parse(&ov),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_and_fields() {
        assert_eq!(Link::parse(0x1001), Link::Terminate);
        assert_eq!(
            Link::parse(0x1002),
            Link::To {
                kind: LinkKind::Qh,
                addr: 0x1000
            }
        );
        assert_eq!(
            Link::parse(0x2024),
            Link::To {
                kind: LinkKind::Sitd,
                addr: 0x2020
            }
        );
        assert_eq!(
            Link::parse(0x2046),
            Link::To {
                kind: LinkKind::Fstn,
                addr: 0x2040
            }
        );
        let mut b = [0u8; QH_SIZE];
        let ch: u32 = 5 | 1 << 8 | 2 << 12 | 1 << 15 | 512 << 16 | 4 << 28;
        b[4..8].copy_from_slice(&ch.to_le_bytes());
        b[8..12].copy_from_slice(&(1u32 << 30 | 0x01).to_le_bytes());
        b[24..28].copy_from_slice(&0x80u32.to_le_bytes());
        let q = Qh::parse(&b);
        assert_eq!((q.address, q.endpoint, q.speed), (5, 1, EpSpeed::High));
        assert!(q.head && !q.dtc && !q.control);
        assert_eq!(
            (q.max_packet, q.nak_reload, q.mult, q.s_mask),
            (512, 4, 1, 1)
        );
        assert!(q.overlay.active());
    }
}
