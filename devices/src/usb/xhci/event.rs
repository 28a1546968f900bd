//! Interrupters and their event rings (xHCI 1.2, 4.9.4 and 5.5.2): the
//! Event Ring Segment Table (6.5), the producer's enqueue pointer and
//! cycle state, the driver's dequeue pointer (ERDP) with Event Handler
//! Busy, and the interrupt management register (IMAN: IP and IE).
//!
//! The ring is full when the enqueue pointer would reach ERDP: the last
//! free TRB then gets an Event Ring Full Error (a Host Controller Event)
//! and later events are dropped until the driver moves ERDP (4.9.4).
//! The segment table is guest-written: at most [`MAX_ERST`] entries are
//! used, a segment holds 16 to 4096 TRBs (6.5), and an entry outside RAM
//! or out of range makes posting fail, which the controller treats as a
//! Host System Error.
//!
//! Interrupt moderation (IMOD) is stored but not applied: an interrupt
//! is asserted as soon as its event is posted and EHB is clear, as with
//! IMODI = 0.

use vm_memory::GuestAddress;

use super::regs::{erdp, iman, rt};
use super::trb::{Cc, Event, TRB_SIZE};
use crate::dma;
use crate::GuestMem;

/// ERST entries used at most (ERSTSZ is clamped to it).
pub const MAX_ERST: u32 = 16;
/// TRBs in one event ring segment, at most (6.5: 16 to 4096).
pub const MAX_SEGMENT_TRBS: u32 = 4096;

/// The event ring is unusable (no or bad segment table): the controller
/// halts with HSE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventRingError;

/// What posting an event came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Posted {
    /// Written; the interrupter should signal (unless BEI).
    Yes,
    /// Dropped: the ring is full.
    Full,
}

#[derive(Clone, Debug, Default)]
pub struct Interrupter {
    pub iman: u32,
    pub imod: u32,
    erstsz: u32,
    erstba: u64,
    /// ERDP as written (pointer and DESI) with EHB.
    erdp: u64,
    /// The producer: segment index, TRB index in it, cycle state.
    seg: u32,
    idx: u32,
    cycle: bool,
    /// An Event Ring Full Error was posted; events are dropped until
    /// ERDP moves.
    full: bool,
}

impl Interrupter {
    pub fn new() -> Self {
        Interrupter {
            // IMODI resets to 4000 (1 ms), 5.5.2.2.
            imod: 4000,
            cycle: true,
            ..Default::default()
        }
    }

    /// A register read at `off` within the interrupter's set.
    pub fn read(&self, off: u64) -> u32 {
        match off {
            rt::IMAN => self.iman,
            rt::IMOD => self.imod,
            rt::ERSTSZ => self.erstsz,
            rt::ERSTBA_LO => self.erstba as u32,
            rt::ERSTBA_HI => (self.erstba >> 32) as u32,
            rt::ERDP_LO => self.erdp as u32,
            rt::ERDP_HI => (self.erdp >> 32) as u32,
            _ => 0,
        }
    }

    /// A register write. Returns true when the driver cleared EHB with
    /// events still pending, so the interrupt is asserted again.
    pub fn write(&mut self, mem: &GuestMem, off: u64, v: u32) -> bool {
        match off {
            rt::IMAN => {
                // IP is write-1-to-clear, IE read/write.
                let mut n = (self.iman & iman::IP) | (v & iman::IE);
                if v & iman::IP != 0 {
                    n &= !iman::IP;
                }
                self.iman = n;
            }
            rt::IMOD => self.imod = v,
            rt::ERSTSZ => self.erstsz = v & 0xffff,
            rt::ERSTBA_LO => {
                self.erstba = (self.erstba & !0xffff_ffff) | (v as u64 & !0x3f);
                self.reset_ring();
            }
            rt::ERSTBA_HI => {
                self.erstba = (self.erstba & 0xffff_ffff) | (v as u64) << 32;
                self.reset_ring();
            }
            rt::ERDP_LO => {
                let ehb = self.erdp & erdp::EHB;
                let clear = v as u64 & erdp::EHB != 0;
                self.erdp = (self.erdp & !0xffff_ffff) | (v as u64 & !erdp::EHB);
                self.erdp |= if clear { 0 } else { ehb };
                self.full = false;
                return clear && self.pending(mem);
            }
            rt::ERDP_HI => {
                self.erdp = (self.erdp & 0xffff_ffff) | (v as u64) << 32;
                self.full = false;
            }
            _ => {}
        }
        false
    }

    /// Writing ERSTBA (re)starts the ring at segment 0 (4.9.4.1).
    fn reset_ring(&mut self) {
        self.seg = 0;
        self.idx = 0;
        self.cycle = true;
        self.full = false;
    }

    /// Segments in use: ERSTSZ clamped to [`MAX_ERST`].
    fn segments(&self) -> u32 {
        self.erstsz.min(MAX_ERST)
    }

    /// ERST entry `i`: the segment's base and its size in TRBs.
    fn segment(&self, mem: &GuestMem, i: u32) -> Result<(u64, u32), EventRingError> {
        let at = self
            .erstba
            .checked_add(i as u64 * 16)
            .ok_or(EventRingError)?;
        let mut b = [0u8; 16];
        dma::read_ram(mem, GuestAddress(at), &mut b).map_err(|_| EventRingError)?;
        let mut base = [0u8; 8];
        base.copy_from_slice(&b[0..8]);
        let base = u64::from_le_bytes(base) & !0x3f;
        let size = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) & 0xffff;
        if size == 0 {
            return Err(EventRingError);
        }
        Ok((base, size.min(MAX_SEGMENT_TRBS)))
    }

    /// The address of the producer's next TRB.
    fn enqueue_addr(&self, mem: &GuestMem) -> Result<u64, EventRingError> {
        let (base, size) = self.segment(mem, self.seg)?;
        let idx = self.idx.min(size - 1);
        Ok(base.wrapping_add(idx as u64 * TRB_SIZE))
    }

    /// Where the producer goes after one TRB: the next segment (and the
    /// cycle toggled after the last one) when this one is used up.
    fn advanced(&self, size: u32) -> (u32, u32, bool) {
        if self.idx + 1 < size {
            (self.seg, self.idx + 1, self.cycle)
        } else if self.seg + 1 < self.segments() {
            (self.seg + 1, 0, self.cycle)
        } else {
            (0, 0, !self.cycle)
        }
    }

    /// True while events the driver has not consumed are on the ring.
    pub fn pending(&self, mem: &GuestMem) -> bool {
        match self.enqueue_addr(mem) {
            Ok(a) => a != self.erdp & erdp::PTR_MASK,
            Err(_) => false,
        }
    }

    /// Writes `event` at the enqueue pointer with the producer's cycle.
    pub fn post(&mut self, mem: &GuestMem, event: &Event) -> Result<Posted, EventRingError> {
        if self.segments() == 0 {
            return Err(EventRingError);
        }
        if self.full {
            return Ok(Posted::Full);
        }
        let (base, size) = self.segment(mem, self.seg)?;
        if self.idx >= size {
            // The segment shrank under us: start it over.
            self.idx = 0;
        }
        let here = base
            .checked_add(self.idx as u64 * TRB_SIZE)
            .ok_or(EventRingError)?;
        let (seg, idx, cycle) = self.advanced(size);
        let next = if seg == self.seg {
            base + idx as u64 * TRB_SIZE
        } else {
            self.segment(mem, seg)?.0
        };
        let mut trb = event.to_trb();
        if next == self.erdp & erdp::PTR_MASK {
            // One TRB left: it tells the driver events were lost.
            trb = Event::HostController {
                cc: Cc::EventRingFull,
            }
            .to_trb();
            self.full = true;
        }
        if self.cycle {
            trb.control |= 1;
        }
        let bytes = trb.to_bytes();
        // The cycle bit is in the last dword: write the rest first, so
        // the driver never sees a half-written TRB as its own.
        dma::write_ram(mem, GuestAddress(here), &bytes[..12]).map_err(|_| EventRingError)?;
        dma::write_ram(mem, GuestAddress(here + 12), &bytes[12..]).map_err(|_| EventRingError)?;
        self.seg = seg;
        self.idx = idx;
        self.cycle = cycle;
        Ok(if self.full { Posted::Full } else { Posted::Yes })
    }

    /// Asserts the interrupt for a posted event: IP and EHB set. Returns
    /// true if a message (or INTx) is to go out now: EHB was clear and
    /// IE is set.
    pub fn assert(&mut self) -> bool {
        let busy = self.erdp & erdp::EHB != 0;
        self.erdp |= erdp::EHB;
        self.iman |= iman::IP;
        !busy && self.iman & iman::IE != 0
    }

    pub fn ip(&self) -> bool {
        self.iman & iman::IP != 0
    }

    pub fn ie(&self) -> bool {
        self.iman & iman::IE != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    fn setup(size: u32) -> (GuestMem, Interrupter) {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        m.write_obj(0x2000u64, GuestAddress(0x1000)).unwrap();
        m.write_obj(size, GuestAddress(0x1008)).unwrap();
        let mut i = Interrupter::new();
        i.write(&m, rt::ERSTSZ, 1);
        i.write(&m, rt::ERSTBA_LO, 0x1000);
        i.write(&m, rt::ERSTBA_HI, 0);
        i.write(&m, rt::ERDP_LO, 0x2000);
        (m, i)
    }

    fn ev() -> Event {
        Event::PortStatusChange { port: 1 }
    }

    #[test]
    fn posts_wrap_with_cycle_and_fill_up() {
        let (m, mut i) = setup(16);
        for n in 0..15 {
            assert_eq!(i.post(&m, &ev()), Ok(Posted::Yes), "event {n}");
        }
        let c: u32 = m.read_obj(GuestAddress(0x2000 + 12)).unwrap();
        assert_eq!(c & 1, 1);
        // The 16th slot would meet ERDP: Event Ring Full Error there.
        assert_eq!(i.post(&m, &ev()), Ok(Posted::Full));
        let s: u32 = m.read_obj(GuestAddress(0x2000 + 15 * 16 + 8)).unwrap();
        assert_eq!(s >> 24, Cc::EventRingFull as u32);
        assert_eq!(i.post(&m, &ev()), Ok(Posted::Full), "dropped");
        // The driver consumed everything; the producer wrapped, cycle 0.
        i.write(&m, rt::ERDP_LO, 0x2000 | erdp::EHB as u32);
        assert_eq!(i.post(&m, &ev()), Ok(Posted::Yes));
        let c: u32 = m.read_obj(GuestAddress(0x2000 + 12)).unwrap();
        assert_eq!(c & 1, 0);
    }

    #[test]
    fn bad_tables_fail() {
        let (m, mut i) = setup(0);
        assert_eq!(i.post(&m, &ev()), Err(EventRingError), "size 0 segment");
        let (m, mut i) = setup(16);
        i.write(&m, rt::ERSTSZ, 0);
        assert_eq!(i.post(&m, &ev()), Err(EventRingError), "no segments");
        i.write(&m, rt::ERSTSZ, 0xffff);
        assert_eq!(i.post(&m, &ev()), Ok(Posted::Yes), "clamped");
        i.write(&m, rt::ERSTBA_HI, 0x10);
        assert_eq!(i.post(&m, &ev()), Err(EventRingError), "outside RAM");
    }

    #[test]
    fn ehb_gates_interrupts() {
        let (m, mut i) = setup(16);
        i.write(&m, rt::IMAN, iman::IE);
        i.post(&m, &ev()).unwrap();
        assert!(i.assert());
        i.post(&m, &ev()).unwrap();
        assert!(!i.assert(), "EHB still set");
        // IP cleared, EHB cleared with ERDP at the first event: the
        // second is still pending.
        i.write(&m, rt::IMAN, iman::IP | iman::IE);
        assert!(!i.ip());
        assert!(i.write(&m, rt::ERDP_LO, 0x2010 | erdp::EHB as u32));
        assert!(!i.write(&m, rt::ERDP_LO, 0x2020 | erdp::EHB as u32));
    }
}
