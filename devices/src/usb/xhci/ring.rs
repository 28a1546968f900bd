//! Walking the command ring and the transfer rings (xHCI 1.2, 4.9): the
//! Consumer Cycle State against each TRB's cycle bit (4.9.2), Link TRBs
//! with Toggle Cycle (4.11.5.1), and Transfer Descriptors gathered whole
//! (the TRBs up to the first one without Chain, 4.11.7) before anything
//! runs.
//!
//! Everything is bounded, since the guest writes the rings: at most
//! [`MAX_LINKS`] Link TRBs in a row (a ring of links pointing at each
//! other, or at themselves, ends there) and at most [`MAX_TD_TRBS`] TRBs
//! in one TD. Overstepping either, or a TRB outside guest RAM, is a
//! [`RingError`] the controller reports as a TRB Error.

use vm_memory::GuestAddress;

use super::trb::{ty, TransferTrb, Trb, TrbError, TRB_SIZE};
use crate::dma;
use crate::GuestMem;

/// Link TRBs followed in a row before the ring is declared broken. A
/// real ring needs one per segment boundary.
pub const MAX_LINKS: u32 = 32;
/// TRBs in one TD, links not counted: a 1 MiB scatter list of 4 KiB
/// pages with its Event Data TRBs fits many times over.
pub const MAX_TD_TRBS: usize = 4096;

/// A ring's consumer state: where the next TRB is and the cycle bit
/// that marks it as the controller's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ring {
    pub dequeue: u64,
    pub cycle: bool,
}

/// Why a ring cannot be walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The TRB at this address is not in guest RAM.
    OutOfRam(u64),
    /// [`MAX_LINKS`] Link TRBs in a row, the last at this address.
    LinkLoop(u64),
    /// A TD longer than [`MAX_TD_TRBS`]; the TRB past the limit.
    TdTooLong(u64),
    /// A malformed TRB at this address.
    BadTrb(u64, TrbError),
    /// A TRB whose type has no place in a TD here (Isoch, a command, an
    /// event type) at this address.
    Unsupported(u64),
}

impl RingError {
    /// The TRB the error event points at.
    pub fn addr(&self) -> u64 {
        match *self {
            RingError::OutOfRam(a)
            | RingError::LinkLoop(a)
            | RingError::TdTooLong(a)
            | RingError::BadTrb(a, _)
            | RingError::Unsupported(a) => a,
        }
    }
}

/// Reads the TRB at `addr`.
pub fn read_trb(mem: &GuestMem, addr: u64) -> Option<Trb> {
    let mut b = [0u8; 16];
    dma::read_ram(mem, GuestAddress(addr), &mut b).ok()?;
    Some(Trb::from_bytes(&b))
}

impl Ring {
    pub fn new(dequeue: u64, cycle: bool) -> Ring {
        Ring {
            dequeue: dequeue & !0xf,
            cycle,
        }
    }

    /// The next TRB the controller owns, with its address, Link TRBs
    /// followed (and the cycle toggled where they say so); the ring moves
    /// past it. `None` when the ring is empty (the cycle bit is the
    /// producer's): the ring stays where it is.
    pub fn next(&mut self, mem: &GuestMem) -> Result<Option<(u64, Trb)>, RingError> {
        let mut links = 0;
        let mut at = *self;
        loop {
            let trb = read_trb(mem, at.dequeue).ok_or(RingError::OutOfRam(at.dequeue))?;
            if trb.cycle() != at.cycle {
                return Ok(None);
            }
            if trb.ty() == ty::LINK {
                links += 1;
                if links > MAX_LINKS {
                    return Err(RingError::LinkLoop(at.dequeue));
                }
                if trb.control & super::trb::ctl::TC != 0 {
                    at.cycle = !at.cycle;
                }
                at.dequeue = trb.param & !0xf;
                // The link is consumed even if the ring turns out empty
                // behind it: the producer's next TRB goes at the target.
                *self = at;
                continue;
            }
            let addr = at.dequeue;
            at.dequeue = at.dequeue.wrapping_add(TRB_SIZE);
            *self = at;
            return Ok(Some((addr, trb)));
        }
    }

    /// Gathers the TD at the dequeue pointer without moving the ring:
    /// its TRBs, typed, and where the ring stands after it. `Ok(None)`
    /// while the TD is not all there yet (the producer has not handed
    /// over its last TRB).
    pub fn read_td(&self, mem: &GuestMem) -> Result<Option<(Vec<TdTrb>, Ring)>, RingError> {
        let mut at = *self;
        let mut trbs = Vec::new();
        loop {
            let Some((addr, raw)) = at.next(mem)? else {
                return Ok(None);
            };
            if trbs.len() == MAX_TD_TRBS {
                return Err(RingError::TdTooLong(addr));
            }
            let trb = TransferTrb::parse(&raw).map_err(|e| RingError::BadTrb(addr, e))?;
            if matches!(trb, TransferTrb::Isoch { .. } | TransferTrb::Invalid { .. }) {
                return Err(RingError::Unsupported(addr));
            }
            let chain = trb.flags().chain;
            trbs.push(TdTrb { addr, trb });
            if !chain {
                return Ok(Some((trbs, at)));
            }
        }
    }
}

impl Ring {
    /// Gathers a control transfer at the dequeue pointer: its Setup
    /// Stage TD, the Data Stage TD if any and the Status Stage TD, which
    /// are separate TDs (4.11.2.2) but one transfer to the device. A TD
    /// that does not start with a Setup Stage is returned alone, for the
    /// controller to refuse. `Ok(None)` until the Status Stage is there.
    pub fn read_control_td(&self, mem: &GuestMem) -> Result<Option<(Vec<TdTrb>, Ring)>, RingError> {
        let Some((mut trbs, mut at)) = self.read_td(mem)? else {
            return Ok(None);
        };
        if !matches!(trbs.first().map(|t| t.trb), Some(TransferTrb::Setup { .. })) {
            return Ok(Some((trbs, at)));
        }
        loop {
            if trbs
                .iter()
                .any(|t| matches!(t.trb, TransferTrb::Status { .. }))
            {
                return Ok(Some((trbs, at)));
            }
            let Some((more, next)) = at.read_td(mem)? else {
                return Ok(None);
            };
            if trbs.len() + more.len() > MAX_TD_TRBS {
                return Err(RingError::TdTooLong(more[0].addr));
            }
            // A new Setup Stage before the Status Stage: the transfer
            // is malformed.
            if let Some(t) = more
                .iter()
                .find(|t| matches!(t.trb, TransferTrb::Setup { .. }))
            {
                return Err(RingError::Unsupported(t.addr));
            }
            trbs.extend(more);
            at = next;
        }
    }
}

/// One TRB of a TD, with its address (what its events point at).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TdTrb {
    pub addr: u64,
    pub trb: TransferTrb,
}

#[cfg(test)]
mod tests {
    use super::super::trb::ctl;
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    fn mem() -> GuestMem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn put(m: &GuestMem, at: u64, t: Trb) {
        m.write_slice(&t.to_bytes(), GuestAddress(at)).unwrap();
    }

    fn normal(len: u32, bits: u32) -> Trb {
        Trb {
            param: 0x8000,
            status: len,
            control: (ty::NORMAL as u32) << 10 | bits,
        }
    }

    fn link(to: u64, bits: u32) -> Trb {
        Trb {
            param: to,
            status: 0,
            control: (ty::LINK as u32) << 10 | bits,
        }
    }

    #[test]
    fn cycle_links_and_toggle() {
        let m = mem();
        put(&m, 0x1000, normal(1, 1));
        put(&m, 0x1010, link(0x1000, ctl::TC | 1));
        let mut r = Ring::new(0x1000, true);
        assert_eq!(r.next(&m).unwrap().unwrap().0, 0x1000);
        // The link toggles the cycle: the old TRB is the producer's.
        assert_eq!(r.next(&m).unwrap(), None);
        assert_eq!(r, Ring::new(0x1000, false));
        put(&m, 0x1000, normal(2, 0));
        assert_eq!(r.next(&m).unwrap().unwrap().1.status, 2);
    }

    #[test]
    fn link_loops_and_ram_are_bounded() {
        let m = mem();
        // A link to itself without toggle: a loop.
        put(&m, 0x2000, link(0x2000, 1));
        let mut r = Ring::new(0x2000, true);
        assert_eq!(r.next(&m), Err(RingError::LinkLoop(0x2000)));
        // Two links to each other.
        put(&m, 0x3000, link(0x3100, 1));
        put(&m, 0x3100, link(0x3000, 1));
        assert!(matches!(
            Ring::new(0x3000, true).read_td(&m),
            Err(RingError::LinkLoop(_))
        ));
        let mut r = Ring::new(0xfff8_0000, true);
        assert_eq!(r.next(&m), Err(RingError::OutOfRam(0xfff8_0000)));
        put(&m, 0x4000, link(0x1_0000_0000, 1));
        assert_eq!(
            Ring::new(0x4000, true).read_td(&m),
            Err(RingError::OutOfRam(0x1_0000_0000))
        );
    }

    #[test]
    fn tds_are_gathered_whole() {
        let m = mem();
        put(&m, 0x1000, normal(10, ctl::CH | 1));
        put(&m, 0x1010, link(0x2000, ctl::CH | 1));
        put(&m, 0x2000, normal(20, ctl::IOC | 1));
        let r = Ring::new(0x1000, true);
        let (trbs, next) = r.read_td(&m).unwrap().unwrap();
        assert_eq!(trbs.len(), 2);
        assert_eq!((trbs[0].addr, trbs[1].addr), (0x1000, 0x2000));
        assert_eq!(next, Ring::new(0x2010, true));
        // Not all there: nothing moves.
        put(&m, 0x2000, normal(20, ctl::CH | 1));
        assert_eq!(r.read_td(&m).unwrap(), None);
        // A TD that never ends: a chained TRB linking to itself.
        put(&m, 0x5000, normal(1, ctl::CH | 1));
        put(&m, 0x5010, link(0x5000, ctl::CH | 1));
        assert!(matches!(
            Ring::new(0x5000, true).read_td(&m),
            Err(RingError::TdTooLong(_))
        ));
    }
}
