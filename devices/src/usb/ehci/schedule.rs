//! One frame of the EHCI (EHCI 1.0 chapter 4): the periodic schedule's
//! frame list entry (4.6, 4.7: interrupt queue heads; iTDs, siTDs and
//! FSTNs walked past), the asynchronous schedule's ring until a pass
//! moves nothing (4.8, 4.8.3 reclamation with the H bit), queue heads
//! and qTDs executed from their transfer overlay (4.10: fetch, execute,
//! write back, advance the queue), the doorbell (4.8.2) and the frame's
//! interrupts (4.15).
//!
//! Every structure is read from guest memory, parsed ([`super::qh`],
//! [`super::qtd`]) and checked before the device sees anything; the
//! controller keeps no copy of the schedule between frames, so a driver
//! changing it needs no more than the doorbell.

use vm_memory::GuestAddress;

use super::qh::{EpSpeed, Link, LinkKind, Qh, QH_CURRENT, QH_OVERLAY, QH_SIZE};
use super::qtd::{ptr, token, Qtd, QtdError, QtdPid, QTD_SIZE};
use super::regs::{cmd, pci, port, sts};
use super::{Ehci, FRAME_BYTES, MAX_VISITS};
use crate::dma::{self, GuestSgList};
use crate::usb::control::Pid;
use crate::usb::{DataError, Dir, Endpoint, GuestData, PacketData, UsbResult};

/// The controller halted (Host System Error).
struct Fatal;

/// What one frame may still do.
struct Budget {
    visits: u32,
    bytes: usize,
}

impl Budget {
    fn visit(&mut self) -> bool {
        if self.visits == 0 {
            return false;
        }
        self.visits -= 1;
        true
    }
}

/// The calls one qTD execution makes at most on a device that keeps
/// answering full packets (a guest max packet size of 1 against 20 KiB).
const MAX_CALLS: usize = 256;

/// A view of a transfer buffer from `offset` on: the rest of a qTD after
/// the bytes the device took already.
struct Window<'a> {
    inner: &'a mut dyn PacketData,
    offset: usize,
}

impl PacketData for Window<'_> {
    fn len(&self) -> usize {
        self.inner.len().saturating_sub(self.offset)
    }
    fn copy_to_host(&mut self, offset: usize, data: &[u8]) -> Result<(), DataError> {
        self.inner.copy_to_host(self.offset + offset, data)
    }
    fn copy_from_host(&self, offset: usize, buf: &mut [u8]) -> Result<(), DataError> {
        self.inner.copy_from_host(self.offset + offset, buf)
    }
}

/// How a qTD execution ended.
enum Outcome {
    /// All moved, or a short packet: the qTD retires.
    Done,
    /// Not finished (NAK, or the call bound): stays active.
    Pending,
    Stall,
    Babble,
    /// No handshake.
    XactErr,
}

impl Ehci {
    /// Runs one frame, if running.
    pub fn run_frame(&mut self) {
        if self.usbcmd & cmd::RS == 0 {
            return;
        }
        if self.config.command() & pci::CMD_BUS_MASTER == 0 {
            self.host_system_error();
            return;
        }
        // Each schedule has its own bound on visits, so that a looping
        // periodic list does not starve the asynchronous one.
        let mut budget = Budget {
            visits: MAX_VISITS,
            bytes: FRAME_BYTES,
        };
        if self.usbcmd & cmd::PSE != 0 && self.periodic(&mut budget).is_err() {
            self.host_system_error();
            return;
        }
        budget.visits = MAX_VISITS;
        if self.usbcmd & cmd::ASE != 0 && self.asynchronous(&mut budget).is_err() {
            self.host_system_error();
            return;
        }
        // The doorbell (4.8.2): this frame's async pass is over, so the
        // controller holds no pointer into a queue head unlinked before
        // it was rung.
        if self.usbcmd & cmd::IAAD != 0 {
            self.usbcmd &= !cmd::IAAD;
            self.usbsts |= sts::IAA;
        }
        self.advance_frindex(1);
        self.update_irq();
    }

    fn read<const N: usize>(&self, addr: u32) -> Result<[u8; N], Fatal> {
        let mut b = [0u8; N];
        dma::read_ram(&self.mem, GuestAddress(addr as u64), &mut b).map_err(|_| Fatal)?;
        Ok(b)
    }

    fn write_words(&self, addr: u64, words: &[u32]) -> Result<(), Fatal> {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        dma::write_ram(&self.mem, GuestAddress(addr), &bytes).map_err(|_| Fatal)
    }

    /// The frame list entry of this frame and what it links (4.6).
    fn periodic(&mut self, budget: &mut Budget) -> Result<(), Fatal> {
        let index = (self.frindex >> 3) & 0x3ff;
        let entry = u32::from_le_bytes(self.read::<4>(self.periodic_base + 4 * index)?);
        let mut next = Link::parse(entry);
        while let Link::To { kind, addr } = next {
            if !budget.visit() {
                return Ok(());
            }
            next = match kind {
                LinkKind::Qh => {
                    let qh = Qh::parse(&self.read::<QH_SIZE>(addr)?);
                    // An interrupt queue head runs in the microframes of
                    // its S-mask; one with none is not scheduled (3.6.2).
                    if qh.s_mask != 0 {
                        self.service_qh(addr, &qh, budget)?;
                    }
                    Link::parse(qh.link)
                }
                // Not emulated (module doc of qh): only their next link.
                LinkKind::Itd | LinkKind::Sitd | LinkKind::Fstn => {
                    Link::parse(u32::from_le_bytes(self.read::<4>(addr)?))
                }
            };
        }
        Ok(())
    }

    /// The asynchronous ring from ASYNCLISTADDR (4.8): round and round
    /// while transactions happen, ending when the head of the
    /// reclamation list comes round with none since it was last seen.
    fn asynchronous(&mut self, budget: &mut Budget) -> Result<(), Fatal> {
        let mut addr = self.async_addr;
        let mut reclaim = true;
        loop {
            if !budget.visit() || budget.bytes == 0 {
                break;
            }
            let qh = Qh::parse(&self.read::<QH_SIZE>(addr)?);
            if qh.head {
                if !reclaim {
                    break;
                }
                reclaim = false;
            }
            if self.service_qh(addr, &qh, budget)? {
                reclaim = true;
            }
            // Only queue heads belong on the ring; anything else ends it.
            match Link::parse(qh.link) {
                Link::To {
                    kind: LinkKind::Qh,
                    addr: a,
                } => addr = a,
                _ => break,
            }
        }
        if reclaim {
            self.usbsts |= sts::RECLAMATION;
        } else {
            self.usbsts &= !sts::RECLAMATION;
        }
        Ok(())
    }

    /// One visit of a queue head (4.10): its overlay's qTD executed, or
    /// the next qTD fetched into the overlay and executed. True when a
    /// transaction moved data or retired a qTD.
    fn service_qh(&mut self, addr: u32, qh: &Qh, budget: &mut Budget) -> Result<bool, Fatal> {
        let mut qh = *qh;
        if qh.overlay.halted() {
            return Ok(false);
        }
        if !qh.overlay.active() {
            // Advance the queue (4.10.2): the alternate next qTD after a
            // short packet, else the next.
            let ov = &qh.overlay;
            let next = if ov.bytes() != 0 && ov.alt & ptr::TERMINATE == 0 {
                ov.alt
            } else {
                ov.next
            };
            if next & ptr::TERMINATE != 0 {
                return Ok(false);
            }
            let at = next & ptr::ADDR;
            let qtd = Qtd::parse(&self.read::<QTD_SIZE>(at)?);
            if !qtd.active() {
                return Ok(false);
            }
            // Fetch (4.10.2): the qTD becomes the overlay; without DTC
            // the queue head keeps the data toggle; NakCnt reloads.
            let mut ov = qtd;
            if !qh.dtc {
                ov.token = (ov.token & !token::DT) | (qh.overlay.token & token::DT);
            }
            ov.alt = (ov.alt & !0x1e) | ((qh.nak_reload as u32) & 0xf) << 1;
            qh.current = at;
            qh.overlay = ov;
            let mut w = vec![at];
            w.extend(ov.words());
            self.write_words(addr as u64 + QH_CURRENT, &w)?;
        }
        self.execute(addr, &mut qh, budget)
    }

    /// Executes the overlay's qTD (4.10.3) and writes the results back
    /// to the overlay and the qTD's token (4.10.4).
    fn execute(&mut self, qh_addr: u32, qh: &mut Qh, budget: &mut Budget) -> Result<bool, Fatal> {
        let ov = &mut qh.overlay;
        let outcome = match ov.transfer() {
            Err(e) => {
                log::debug!("ehci: qTD at {:#x} cannot run: {e:?}", qh.current);
                ov.token |= match e {
                    QtdError::Pid => token::XACT_ERR,
                    QtdError::Length(_) => token::DATA_BUFFER_ERR,
                };
                Outcome::Stall
            }
            Ok(t) => {
                let mut sg =
                    GuestSgList::new(t.segments.len().max(1), super::qtd::MAX_BYTES as u64);
                for &(a, n) in &t.segments {
                    if sg.push(&self.mem, GuestAddress(a), n).is_err() {
                        return Err(Fatal);
                    }
                }
                // Its own handle: the device call borrows the ports.
                let mem = self.mem.clone();
                let mut data = GuestData { mem: &mem, sg: &sg };
                let (moved, outcome) = self.transact(qh, t.pid, &mut data);
                budget.bytes = budget.bytes.saturating_sub(moved.max(1));
                let ov = &mut qh.overlay;
                ov.advance(moved);
                // The data toggle flips once per packet moved.
                let mps = qh.max_packet.max(1);
                let packets = if moved == 0 {
                    usize::from(matches!(outcome, Outcome::Done))
                } else {
                    moved.div_ceil(mps)
                };
                if packets % 2 == 1 {
                    ov.token ^= token::DT;
                }
                if moved > 0 && matches!(outcome, Outcome::Pending) {
                    // Partial progress: write it back, still active.
                    self.write_overlay(qh_addr, qh)?;
                    return Ok(true);
                }
                outcome
            }
        };
        let ov = &mut qh.overlay;
        let ioc = ov.ioc();
        let progressed = match outcome {
            Outcome::Pending => return Ok(false),
            Outcome::Done => {
                ov.token &= !token::ACTIVE;
                if ioc {
                    self.usbsts |= sts::USBINT;
                }
                if ov.bytes() != 0 && ov.pid() == Ok(QtdPid::In) {
                    // Short packet (2.3.2 USBINT).
                    self.usbsts |= sts::USBINT;
                }
                true
            }
            Outcome::Stall | Outcome::Babble => {
                ov.token = (ov.token & !token::ACTIVE) | token::HALTED;
                if matches!(outcome, Outcome::Babble) {
                    ov.token |= token::BABBLE;
                }
                self.usbsts |= sts::ERRINT | if ioc { sts::USBINT } else { 0 };
                true
            }
            Outcome::XactErr => {
                ov.token |= token::XACT_ERR;
                match ov.cerr() {
                    // No error counting: retried for ever.
                    0 => {}
                    1 => {
                        ov.set_cerr(0);
                        ov.token = (ov.token & !token::ACTIVE) | token::HALTED;
                        self.usbsts |= sts::ERRINT | if ioc { sts::USBINT } else { 0 };
                    }
                    c => ov.set_cerr(c - 1),
                }
                // A retry is no progress: the ring may end this frame.
                ov.halted()
            }
        };
        self.write_overlay(qh_addr, qh)?;
        if qh.overlay.token & token::ACTIVE == 0 {
            // The qTD's own token gets the result (4.10.4).
            self.write_words(qh.current as u64 + 8, &[qh.overlay.token])?;
        }
        Ok(progressed)
    }

    fn write_overlay(&self, qh_addr: u32, qh: &Qh) -> Result<(), Fatal> {
        self.write_words(qh_addr as u64 + QH_OVERLAY, &qh.overlay.words())
    }

    /// The transaction(s) of one qTD with the device the queue head
    /// names: bytes moved and how it ended.
    fn transact(&mut self, qh: &Qh, pid: QtdPid, data: &mut dyn PacketData) -> (usize, Outcome) {
        let len = data.len();
        // The device at the address, on an enabled port the EHCI owns; a
        // queue head for a full/low speed endpoint would need a
        // transaction translator, which no port here has.
        let target = self.ports.iter_mut().find(|p| {
            !p.owner_companion
                && p.sc & port::PE != 0
                && p.dev.as_ref().is_some_and(|d| d.address() == qh.address)
        });
        let Some(p) = target.filter(|_| qh.speed == EpSpeed::High) else {
            return (0, Outcome::XactErr);
        };
        let super::Port { dev, pipe, .. } = p;
        let Some(dev) = dev.as_deref_mut() else {
            return (0, Outcome::XactErr);
        };
        if qh.endpoint == 0 {
            let r = match pid {
                QtdPid::Setup => pipe.packet(dev, Pid::Setup, data),
                QtdPid::In => pipe.packet(dev, Pid::In, data),
                QtdPid::Out => pipe.packet(dev, Pid::Out, data),
            };
            return match r {
                UsbResult::Ack(n) => (n.min(len), Outcome::Done),
                other => (0, fail(other)),
            };
        }
        if pid == QtdPid::Setup {
            // Control endpoints other than 0 are not offered.
            return (0, Outcome::Stall);
        }
        let dir = if pid == QtdPid::In { Dir::In } else { Dir::Out };
        let ep = Endpoint::new(qh.endpoint, dir);
        let mps = qh.max_packet;
        let mut done = 0usize;
        for _ in 0..MAX_CALLS {
            let mut w = Window {
                inner: &mut *data,
                offset: done,
            };
            match dev.handle_data(ep, 0, &mut w) {
                UsbResult::Ack(n) => {
                    let n = n.min(len - done);
                    done += n;
                    // Full packets with room left: more to come (the
                    // module doc of usb); anything else ends the qTD.
                    let more = done < len && n > 0 && mps > 0 && n % mps == 0;
                    if !more {
                        return (done, Outcome::Done);
                    }
                }
                UsbResult::Nak => return (done, Outcome::Pending),
                other => return (done, fail(other)),
            }
        }
        (done, Outcome::Pending)
    }
}

fn fail(r: UsbResult) -> Outcome {
    match r {
        UsbResult::Nak => Outcome::Pending,
        UsbResult::Babble => Outcome::Babble,
        UsbResult::Error => Outcome::XactErr,
        _ => Outcome::Stall,
    }
}
