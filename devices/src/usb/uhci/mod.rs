//! The PIIX3 USB host controller (PCI 8086:7020), QEMU's
//! `piix3-usb-uhci`: a UHCI with two root hub ports.
//!
//! Specs followed: Intel "Universal Host Controller Interface (UHCI)
//! Design Guide", revision 1.1: chapter 2 "Register Description" (2.1 the
//! PCI configuration registers SBRN and LEGSUP, 2.1.1-2.1.7 USBCMD,
//! USBSTS, USBINTR, FRNUM, FLBASEADD, SOFMOD and PORTSC), chapter 3 "Data
//! Structures" ([`schedule`]) and chapter 4 "Operational Model"
//! (frame list traversal, queue advance, short packet detection, error
//! counting and the interrupts). The 82371SB (PIIX3) datasheet for the
//! PCI function: class 0C0300h, USBBASE in BAR4 (32 bytes of I/O), LEGSUP
//! at C0h (2000h after reset), INTD#.
//!
//! QEMU's hw/usb/hcd-uhci.c was read for what drivers rely on beyond the
//! guide: PORTSC bit 7 reads as one, registers are 16-bit with 8- and
//! 32-bit accesses split or widened, a frame stops at 1280 bytes (full
//! speed bandwidth), circular schedules end the frame once a queue head
//! comes round again with nothing done since.
//!
//! Time: the controller runs a frame per millisecond while USBCMD.RS is
//! set. It has no thread: the vmm drives it ([`Uhci::poll`] returns the
//! next deadline on the [`Clock`]; the callback of
//! [`Uhci::set_frame_timer`] tells it when RS starts the frames).
//!
//! Hostile schedules are bounded: a frame visits at most [`MAX_LINKS`]
//! link pointers; a frame list entry, QH, TD or data buffer outside guest
//! RAM (or DMA with bus mastering off) is a Host System Error, and an
//! invalid PID or MaxLen an HC Process Error, each halting the
//! controller as the hardware does.

pub mod fuzz;
pub mod schedule;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::GuestAddress;

use super::control::{ControlPipe, Pid};
use super::{best_speed, Dir, Endpoint, GuestData, Speed, UsbDevice, UsbResult, Wakeup};
use crate::clock::Clock;
use crate::dma::{self, GuestSgList};
use crate::irq::IrqLine;
use crate::pci::{BarKind, PciConfig, PciFunction};
use crate::GuestMem;
use schedule::{ctrl, Link, Qh, Td, TdPid};

pub const VENDOR_ID: u16 = 0x8086;
pub const DEVICE_ID: u16 = 0x7020;
/// The ICH9 UHCI functions: 2934h (UHCI1) to 2939h (UHCI6).
pub const ICH9_DEVICE_ID_BASE: u16 = 0x2934;
/// Serial bus controller, USB, UHCI.
const CLASS: u32 = 0x0c_03_00;
/// USBBASE.
pub const BAR_IO: usize = 4;
const IO_SIZE: u64 = 32;
/// Serial Bus Release Number: USB 1.0.
const SBRN: u16 = 0x60;
/// Legacy support register.
const LEGSUP: u16 = 0xc0;
const CMD_BUS_MASTER: u16 = 1 << 2;

/// Root hub ports.
pub const PORTS: usize = 2;
/// One frame.
pub const FRAME_NS: u64 = 1_000_000;
/// Frames one [`Uhci::poll`] runs to catch up; beyond that FRNUM jumps,
/// as QEMU's does, rather than running a burst of frames.
pub const MAX_CATCHUP: u64 = 16;
/// Link pointers (QHs and TDs) one frame visits at most.
pub const MAX_LINKS: u32 = 2048;
/// Bytes one frame moves at most: what full speed carries in a
/// millisecond, less the overhead.
pub const FRAME_BYTES: usize = 1280;
/// Queue heads remembered for detecting a schedule that comes round.
const QH_SEEN: usize = 128;

/// Register offsets in the I/O BAR (2.1).
pub mod reg {
    pub const USBCMD: u64 = 0x00;
    pub const USBSTS: u64 = 0x02;
    pub const USBINTR: u64 = 0x04;
    pub const FRNUM: u64 = 0x06;
    pub const FLBASEADD: u64 = 0x08;
    pub const SOFMOD: u64 = 0x0c;
    pub const PORTSC1: u64 = 0x10;
}

/// USBCMD bits (2.1.1).
pub mod cmd {
    pub const RS: u16 = 1 << 0;
    pub const HCRESET: u16 = 1 << 1;
    pub const GRESET: u16 = 1 << 2;
    pub const EGSM: u16 = 1 << 3;
    pub const FGR: u16 = 1 << 4;
    pub const SWDBG: u16 = 1 << 5;
    pub const CF: u16 = 1 << 6;
    pub const MAXP: u16 = 1 << 7;
}

/// USBSTS bits (2.1.2); all but HCH are write-one-to-clear.
pub mod sts {
    pub const USBINT: u16 = 1 << 0;
    pub const ERROR: u16 = 1 << 1;
    pub const RESUME: u16 = 1 << 2;
    pub const HSE: u16 = 1 << 3;
    pub const HCPE: u16 = 1 << 4;
    pub const HCH: u16 = 1 << 5;
}

/// USBINTR bits (2.1.3).
pub mod intr {
    pub const TIMEOUT_CRC: u16 = 1 << 0;
    pub const RESUME: u16 = 1 << 1;
    pub const IOC: u16 = 1 << 2;
    pub const SPD: u16 = 1 << 3;
}

/// PORTSC bits (2.1.7).
pub mod port {
    pub const CCS: u16 = 1 << 0;
    pub const CSC: u16 = 1 << 1;
    pub const PE: u16 = 1 << 2;
    pub const PEC: u16 = 1 << 3;
    pub const RD: u16 = 1 << 6;
    /// Reserved, reads as one (drivers count ports by it).
    pub const ALWAYS: u16 = 1 << 7;
    pub const LSDA: u16 = 1 << 8;
    pub const PR: u16 = 1 << 9;
    pub const SUSP: u16 = 1 << 12;
}

/// Why a frame's USBINT was set.
const PENDING_IOC: u8 = 1;
const PENDING_SPD: u8 = 2;

struct Port {
    /// PE, RD, PR, SUSP, CSC, PEC; CCS and LSDA follow `dev`.
    ctrl: u16,
    dev: Option<Box<dyn UsbDevice>>,
    pipe: ControlPipe,
}

impl Port {
    fn status(&self) -> u16 {
        let mut v = self.ctrl | port::ALWAYS;
        if let Some(d) = &self.dev {
            v |= port::CCS;
            if d.speed() == Speed::Low {
                v |= port::LSDA;
            }
        }
        v
    }
}

/// The PIIX3 UHCI as a PCI function.
///
/// The vmm builds it with [`Uhci::new`] (guest RAM, the INTD# line from
/// its INTx routing, the machine's clock), adds it to the PCI bus as
/// `Arc<Mutex<Uhci>>` (QEMU puts it at 01.2 on `pc`), and drives the
/// frames: it registers [`Uhci::set_frame_timer`], and on each deadline
/// calls [`Uhci::poll`] under the function's lock and arms its timer for
/// the deadline returned (none: stopped until the callback fires again).
/// Devices go on the root ports with [`Uhci::attach`] (hotplug too) and
/// leave with [`Uhci::detach`].
pub struct Uhci {
    config: PciConfig,
    mem: Arc<GuestMem>,
    irq: Arc<dyn IrqLine>,
    clock: Arc<dyn Clock>,
    usbcmd: u16,
    usbsts: u16,
    usbintr: u16,
    frnum: u16,
    flbase: u32,
    sofmod: u8,
    /// Causes of USBINT ([`PENDING_IOC`], [`PENDING_SPD`]).
    pending: u8,
    ports: [Port; PORTS],
    /// When the next frame is due, while running.
    next_frame: Option<u64>,
    timer: Option<Arc<dyn Fn(u64) + Send + Sync>>,
    /// Wakeups received from devices (UHCI retries every frame anyway;
    /// kept for observation).
    wakeups: Arc<AtomicU64>,
    irq_level: bool,
}

impl Uhci {
    pub fn new(mem: Arc<GuestMem>, irq: Arc<dyn IrqLine>, clock: Arc<dyn Clock>) -> Uhci {
        Self::with_identity(DEVICE_ID, 0x01, 4, mem, irq, clock)
    }

    /// The ICH9 UHCI function `n` (1..=6), QEMU's `ich9-usb-uhci<n>`
    /// (8086:2934 + n - 1, revision 3), the same registers as the PIIX3's.
    /// Its interrupt pin is INTA#, INTB#, INTC#, INTA#, ... as QEMU gives
    /// them (functions 0, 1, 2 of 1Dh and 1Ah). Used as a companion of
    /// the ICH9 EHCI ([`crate::usb::ehci::Ehci::register_companion`]),
    /// or alone.
    pub fn ich9(
        n: u8,
        mem: Arc<GuestMem>,
        irq: Arc<dyn IrqLine>,
        clock: Arc<dyn Clock>,
    ) -> Result<Uhci, String> {
        if !(1..=6).contains(&n) {
            return Err(format!("there is no ich9-usb-uhci{n} (1-6)"));
        }
        let pin = 1 + (n - 1) % 3;
        Ok(Self::with_identity(
            ICH9_DEVICE_ID_BASE + (n - 1) as u16,
            0x03,
            pin,
            mem,
            irq,
            clock,
        ))
    }

    fn with_identity(
        device_id: u16,
        revision: u8,
        pin: u8,
        mem: Arc<GuestMem>,
        irq: Arc<dyn IrqLine>,
        clock: Arc<dyn Clock>,
    ) -> Uhci {
        let mut config = PciConfig::new(VENDOR_ID, device_id, CLASS, revision);
        config.add_bar(BAR_IO, BarKind::Io, IO_SIZE);
        config.set_interrupt_pin(pin);
        config.set_subsystem(0x1af4, 0x1100);
        config.set_u8(SBRN, 0x10);
        config.set_u16(LEGSUP, 0x2000);
        // PIRQDEN and the trap enables are the driver's; the status bits
        // are never set (no legacy keyboard emulation), so the
        // write-one-to-clear bits stay zero.
        config.set_wmask(LEGSUP, &[0xbf, 0x20]);
        let new_port = || Port {
            ctrl: 0,
            dev: None,
            pipe: ControlPipe::new(),
        };
        let mut u = Uhci {
            config,
            mem,
            irq,
            clock,
            usbcmd: 0,
            usbsts: sts::HCH,
            usbintr: 0,
            frnum: 0,
            flbase: 0,
            sofmod: 64,
            pending: 0,
            ports: [new_port(), new_port()],
            next_frame: None,
            timer: None,
            wakeups: Arc::new(AtomicU64::new(0)),
            irq_level: false,
        };
        u.hc_reset();
        u
    }

    /// Registers the callback that arms the vmm's timer: called with the
    /// first frame's deadline (nanoseconds on the [`Clock`]) when the
    /// driver sets USBCMD.RS. It runs under the function's lock, from a
    /// register write, so it must not lock the function.
    pub fn set_frame_timer(&mut self, arm: Arc<dyn Fn(u64) + Send + Sync>) {
        self.timer = Some(arm);
    }

    /// When the next frame is due (nanoseconds on the clock), `None`
    /// while the controller is stopped.
    pub fn next_deadline(&self) -> Option<u64> {
        self.next_frame
    }

    /// Runs the frames due by now (at most [`MAX_CATCHUP`]; a controller
    /// further behind skips frames, FRNUM counting them) and returns the
    /// next deadline, `None` once stopped.
    pub fn poll(&mut self) -> Option<u64> {
        let now = self.clock.now_ns();
        let mut n = 0;
        while let Some(due) = self.next_frame {
            if now < due {
                break;
            }
            if n == MAX_CATCHUP {
                let behind = (now - due) / FRAME_NS + 1;
                self.frnum = ((self.frnum as u64 + behind) & 0x7ff) as u16;
                self.next_frame = Some(due.saturating_add(behind.saturating_mul(FRAME_NS)));
                break;
            }
            self.run_frame();
            n += 1;
            if let Some(d) = self.next_frame.as_mut() {
                *d = d.saturating_add(FRAME_NS);
            }
        }
        self.next_frame
    }

    /// Attaches `dev` to root port `index` (0 or 1) at the fastest speed
    /// both support (full or low): a connect the driver sees in PORTSC.
    pub fn attach(&mut self, index: usize, dev: Box<dyn UsbDevice>) -> Result<(), String> {
        self.attach_or_return(index, dev).map_err(|(e, _)| e)
    }

    /// [`Uhci::attach`], giving the device back when it cannot attach
    /// (an EHCI handing a device to its companion keeps it then).
    pub fn attach_or_return(
        &mut self,
        index: usize,
        mut dev: Box<dyn UsbDevice>,
    ) -> Result<(), (String, Box<dyn UsbDevice>)> {
        let Some(p) = self.ports.get_mut(index) else {
            return Err((
                format!("UHCI port {} does not exist (1-{PORTS})", index + 1),
                dev,
            ));
        };
        if p.dev.is_some() {
            return Err((format!("UHCI port {} is in use", index + 1), dev));
        }
        let Some(speed) = best_speed(dev.speeds(), &[Speed::Low, Speed::Full]) else {
            return Err((
                "the device cannot run at full or low speed, which UHCI needs".into(),
                dev,
            ));
        };
        dev.set_speed(speed);
        dev.reset();
        let count = self.wakeups.clone();
        let wake: Wakeup = Arc::new(move |_ep: Endpoint| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        dev.set_wakeup(Some(wake));
        p.dev = Some(dev);
        p.pipe.reset();
        p.ctrl |= port::CSC;
        self.resume_detect();
        Ok(())
    }

    /// Detaches the device on port `index` (hot-unplug).
    pub fn detach(&mut self, index: usize) -> Option<Box<dyn UsbDevice>> {
        let p = self.ports.get_mut(index)?;
        let mut dev = p.dev.take()?;
        dev.set_wakeup(None);
        if p.ctrl & port::PE != 0 {
            p.ctrl |= port::PEC;
        }
        p.ctrl = (p.ctrl & !port::PE) | port::CSC;
        p.pipe.reset();
        self.resume_detect();
        Some(dev)
    }

    /// How many wakeups devices have sent.
    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }

    /// A system reset: the controller and the devices on its ports.
    pub fn reset(&mut self) {
        self.hc_reset();
    }

    /// USBCMD.HCRESET (2.1.1): registers to their defaults, the ports
    /// disabled, devices still attached seen as new connects and reset.
    fn hc_reset(&mut self) {
        self.usbcmd = 0;
        self.usbsts = sts::HCH;
        self.usbintr = 0;
        self.frnum = 0;
        self.flbase = 0;
        self.sofmod = 64;
        self.pending = 0;
        self.next_frame = None;
        for p in &mut self.ports {
            p.ctrl = 0;
            p.pipe.reset();
            if let Some(d) = p.dev.as_mut() {
                d.reset();
                p.ctrl |= port::CSC;
            }
        }
        self.update_irq();
    }

    /// A connect or disconnect while the bus is globally suspended
    /// resumes it (2.1.1 EGSM, 2.1.2 Resume Detect).
    fn resume_detect(&mut self) {
        if self.usbcmd & cmd::EGSM != 0 {
            self.usbcmd |= cmd::FGR;
            self.usbsts |= sts::RESUME;
            self.update_irq();
        }
    }

    fn update_irq(&mut self) {
        let s = self.usbsts;
        let e = self.usbintr;
        let level = (s & sts::USBINT != 0
            && ((self.pending & PENDING_IOC != 0 && e & intr::IOC != 0)
                || (self.pending & PENDING_SPD != 0 && e & intr::SPD != 0)))
            || (s & sts::ERROR != 0 && e & intr::TIMEOUT_CRC != 0)
            || (s & sts::RESUME != 0 && e & intr::RESUME != 0)
            || s & (sts::HSE | sts::HCPE) != 0;
        if level != self.irq_level {
            self.irq_level = level;
            self.irq.set_level(level);
        }
    }

    /// Stops the controller on a fatal error (HSE or HCPE).
    fn halt(&mut self, why: u16) {
        self.usbsts |= why | sts::HCH;
        self.usbcmd &= !cmd::RS;
        self.next_frame = None;
        self.update_irq();
    }

    fn read_reg(&self, off: u64) -> u16 {
        match off {
            reg::USBCMD => self.usbcmd,
            reg::USBSTS => self.usbsts,
            reg::USBINTR => self.usbintr,
            reg::FRNUM => self.frnum,
            reg::FLBASEADD => self.flbase as u16,
            0x0a => (self.flbase >> 16) as u16,
            reg::SOFMOD => self.sofmod as u16,
            0x10 | 0x12 => self.ports[((off - 0x10) / 2) as usize].status(),
            _ => 0xff7f,
        }
    }

    fn write_reg(&mut self, off: u64, v: u16) {
        match off {
            reg::USBCMD => self.write_cmd(v),
            reg::USBSTS => {
                let clear = v & (sts::USBINT | sts::ERROR | sts::RESUME | sts::HSE | sts::HCPE);
                self.usbsts &= !clear;
                if clear & sts::USBINT != 0 {
                    self.pending = 0;
                }
                self.update_irq();
            }
            reg::USBINTR => {
                self.usbintr = v & 0xf;
                self.update_irq();
            }
            // Writable only while stopped (2.1.4).
            reg::FRNUM if self.usbsts & sts::HCH != 0 => self.frnum = v & 0x7ff,
            reg::FLBASEADD => self.flbase = (self.flbase & 0xffff_0000) | (v & 0xf000) as u32,
            0x0a => self.flbase = (self.flbase & 0xffff) | (v as u32) << 16,
            reg::SOFMOD => self.sofmod = (v & 0x7f) as u8,
            0x10 | 0x12 => self.write_port(((off - 0x10) / 2) as usize, v),
            _ => {}
        }
    }

    fn write_cmd(&mut self, v: u16) {
        if v & cmd::GRESET != 0 {
            // A USB bus reset of every device, then the controller's.
            self.hc_reset();
            return;
        }
        if v & cmd::HCRESET != 0 {
            self.hc_reset();
            return;
        }
        let was_running = self.usbcmd & cmd::RS != 0;
        self.usbcmd = v & (cmd::RS | cmd::EGSM | cmd::FGR | cmd::SWDBG | cmd::CF | cmd::MAXP);
        if v & cmd::RS != 0 && !was_running {
            self.usbsts &= !sts::HCH;
            let due = self.clock.now_ns().saturating_add(FRAME_NS);
            self.next_frame = Some(due);
            if let Some(t) = &self.timer {
                t(due);
            }
        } else if v & cmd::RS == 0 {
            self.usbsts |= sts::HCH;
            self.next_frame = None;
        }
    }

    fn write_port(&mut self, i: usize, v: u16) {
        let p = &mut self.ports[i];
        if v & port::PR != 0 && p.ctrl & port::PR == 0 {
            // Port reset (2.1.7): the device sees a bus reset; the port is
            // disabled until the driver enables it.
            if let Some(d) = p.dev.as_mut() {
                d.reset();
            }
            p.pipe.reset();
            p.ctrl &= !port::PE;
        }
        let mut keep = p.ctrl & (port::CSC | port::PEC);
        keep &= !(v & (port::CSC | port::PEC));
        let mut set = v & (port::PE | port::RD | port::PR | port::SUSP);
        if p.dev.is_none() || v & port::PR != 0 {
            set &= !port::PE;
        }
        p.ctrl = keep | set;
    }

    /// One frame (chapter 4): the frame list entry for FRNUM, its
    /// schedule walked within the bounds, then FRNUM advanced and the
    /// frame's interrupts raised.
    pub fn run_frame(&mut self) {
        if self.usbcmd & cmd::RS == 0 {
            return;
        }
        if self.config.command() & CMD_BUS_MASTER == 0 {
            self.halt(sts::HSE);
            return;
        }
        let entry = self.flbase as u64 + ((self.frnum & 0x3ff) as u64) * 4;
        let Some(first) = self.read32(entry) else {
            self.halt(sts::HSE);
            return;
        };
        if self.walk(first).is_err() {
            return;
        }
        self.frnum = (self.frnum + 1) & 0x7ff;
        if self.pending != 0 {
            self.usbsts |= sts::USBINT;
        }
        self.update_irq();
    }

    fn read32(&self, addr: u64) -> Option<u32> {
        let mut b = [0u8; 4];
        dma::read_ram(&self.mem, GuestAddress(addr), &mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }

    fn write32(&self, addr: u64, v: u32) -> Option<()> {
        dma::write_ram(&self.mem, GuestAddress(addr), &v.to_le_bytes()).ok()
    }

    /// Walks one frame's schedule from `link`. `Err` when the controller
    /// halted.
    fn walk(&mut self, mut next: u32) -> Result<(), ()> {
        let mut budget = MAX_LINKS;
        let mut bytes = 0usize;
        // The queue being worked down: (QH address, its head link).
        let mut queue: Option<(u32, u32)> = None;
        let mut seen: Vec<u32> = Vec::new();
        let mut done_since = 0u32;
        loop {
            if budget == 0 {
                return Ok(());
            }
            budget -= 1;
            match Link::parse(next) {
                Link::Terminate => return Ok(()),
                Link::Qh { addr } => {
                    // A schedule may come round on purpose (bandwidth
                    // reclamation): the frame ends when a queue head
                    // returns with nothing done since it was seen.
                    if seen.contains(&addr) {
                        if done_since == 0 {
                            return Ok(());
                        }
                        seen.clear();
                        done_since = 0;
                    }
                    if seen.len() < QH_SEEN {
                        seen.push(addr);
                    }
                    let mut b = [0u8; 8];
                    if dma::read_ram(&self.mem, GuestAddress(addr as u64), &mut b).is_err() {
                        self.halt(sts::HSE);
                        return Err(());
                    }
                    let qh = Qh::parse(&b);
                    if qh.element & schedule::link::TERMINATE != 0 {
                        queue = None;
                        next = qh.head;
                    } else {
                        queue = Some((addr, qh.head));
                        next = qh.element;
                    }
                }
                Link::Td { addr, .. } => {
                    let mut b = [0u8; 16];
                    if dma::read_ram(&self.mem, GuestAddress(addr as u64), &mut b).is_err() {
                        self.halt(sts::HSE);
                        return Err(());
                    }
                    let mut td = Td::parse(&b);
                    let before = td.ctrl;
                    let r = self.transaction(&mut td, &mut bytes)?;
                    if td.ctrl != before && self.write32(addr as u64 + 4, td.ctrl).is_none() {
                        self.halt(sts::HSE);
                        return Err(());
                    }
                    match r {
                        TdResult::FrameFull => return Ok(()),
                        TdResult::Completed => {
                            done_since += 1;
                            match queue {
                                Some((qaddr, head)) => {
                                    // Advance the queue (4.x "queue
                                    // advance"): the element is the next TD.
                                    if self.write32(qaddr as u64 + 4, td.link).is_none() {
                                        self.halt(sts::HSE);
                                        return Err(());
                                    }
                                    let depth = td.link
                                        & (schedule::link::TERMINATE | schedule::link::DEPTH)
                                        == schedule::link::DEPTH;
                                    if depth {
                                        next = td.link;
                                    } else {
                                        queue = None;
                                        next = head;
                                    }
                                }
                                None => next = td.link,
                            }
                        }
                        // Not done (NAK, an error being retried, an inactive
                        // TD), or done without advancing the queue (an
                        // error, a short packet with SPD): on to the next
                        // queue.
                        TdResult::Skip | TdResult::Stopped => {
                            if matches!(r, TdResult::Stopped) {
                                done_since += 1;
                            }
                            match queue.take() {
                                Some((_, head)) => next = head,
                                None => next = td.link,
                            }
                        }
                    }
                }
            }
        }
    }

    /// Carries out one TD's transaction (3.2, 4.x): its status written
    /// into `td`. `Err` when the controller halted.
    fn transaction(&mut self, td: &mut Td, bytes: &mut usize) -> Result<TdResult, ()> {
        if !td.active() {
            return Ok(TdResult::Skip);
        }
        let token = match td.token() {
            Ok(t) => t,
            Err(e) => {
                log::debug!("uhci: HC process error: {e:?}");
                self.halt(sts::HCPE);
                return Err(());
            }
        };
        if *bytes > 0 && *bytes + token.len > FRAME_BYTES {
            return Ok(TdResult::FrameFull);
        }
        let mut sg = GuestSgList::new(1, FRAME_BYTES as u64);
        if sg
            .push(&self.mem, GuestAddress(td.buffer as u64), token.len)
            .is_err()
        {
            self.halt(sts::HSE);
            return Err(());
        }
        let mut data = GuestData {
            mem: &self.mem,
            sg: &sg,
        };
        // The device whose address the token names, on an enabled port.
        let port = self.ports.iter_mut().find(|p| {
            p.ctrl & port::PE != 0 && p.dev.as_ref().is_some_and(|d| d.address() == token.address)
        });
        let target = port.and_then(|p| {
            let Port { dev, pipe, .. } = p;
            dev.as_deref_mut().map(|d| (d, pipe))
        });
        let result = match target {
            None => UsbResult::Error,
            Some((dev, pipe)) => {
                let dir = if token.pid == TdPid::In {
                    Dir::In
                } else {
                    Dir::Out
                };
                match (token.pid, token.endpoint) {
                    (TdPid::Setup, 0) => pipe.packet(dev, Pid::Setup, &mut data),
                    (TdPid::In, 0) => pipe.packet(dev, Pid::In, &mut data),
                    (TdPid::Out, 0) => pipe.packet(dev, Pid::Out, &mut data),
                    // Control endpoints other than 0 are not offered.
                    (TdPid::Setup, _) => UsbResult::Stall,
                    (_, ep) => dev.handle_data(Endpoint::new(ep, dir), 0, &mut data),
                }
            }
        };
        td.ctrl &= !(ctrl::STATUS & !ctrl::ACTIVE);
        let ioc = td.ctrl & ctrl::IOC != 0;
        Ok(match result {
            UsbResult::Ack(n) => {
                let n = n.min(token.len);
                *bytes += n.max(1);
                td.set_actlen(n);
                td.ctrl &= !ctrl::ACTIVE;
                if ioc {
                    self.pending |= PENDING_IOC;
                }
                if token.pid == TdPid::In && n < token.len && td.ctrl & ctrl::SPD != 0 {
                    // Short packet detect (4.x): the queue is not
                    // advanced; the driver fixes it up.
                    self.pending |= PENDING_SPD;
                    TdResult::Stopped
                } else {
                    TdResult::Completed
                }
            }
            UsbResult::Nak => {
                td.ctrl |= ctrl::NAK;
                TdResult::Skip
            }
            UsbResult::Stall | UsbResult::Babble => {
                td.ctrl |= ctrl::STALLED;
                if result == UsbResult::Babble {
                    td.ctrl |= ctrl::BABBLE;
                }
                td.set_actlen(0);
                self.fail_td(td, ioc);
                TdResult::Stopped
            }
            UsbResult::Error => {
                // No handshake: C_ERR counts down; at one the TD is
                // retired (3.2.2); at zero it retries for ever.
                td.ctrl |= ctrl::CRC_TIMEOUT;
                td.set_actlen(0);
                match td.c_err() {
                    0 => TdResult::Skip,
                    1 => {
                        td.set_c_err(0);
                        td.ctrl |= ctrl::STALLED;
                        self.fail_td(td, ioc);
                        TdResult::Stopped
                    }
                    c => {
                        td.set_c_err(c - 1);
                        TdResult::Skip
                    }
                }
            }
        })
    }

    /// A TD retired with an error: the USB error interrupt.
    fn fail_td(&mut self, td: &mut Td, ioc: bool) {
        td.ctrl &= !ctrl::ACTIVE;
        self.usbsts |= sts::ERROR;
        if ioc {
            self.pending |= PENDING_IOC;
        }
    }
}

/// What a TD came to, for the walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TdResult {
    /// Done: the queue advances.
    Completed,
    /// Retired without advancing the queue (error, short packet).
    Stopped,
    /// Not done (inactive, NAKed, an error retried).
    Skip,
    /// The frame's bandwidth is used up: the TD waits for the next frame.
    FrameFull,
}

impl PciFunction for Uhci {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    /// Registers are 16 bits wide: a byte access reads or writes its half
    /// (a byte write zero-extended, as QEMU's), a dword access is two
    /// words, lowest first.
    fn region_read(&mut self, region: usize, offset: u64, data: &mut [u8]) {
        if region != BAR_IO {
            data.fill(0xff);
            return;
        }
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            let word = self.read_reg(at & !1);
            *b = (word >> ((at & 1) * 8)) as u8;
        }
    }

    fn region_write(&mut self, region: usize, offset: u64, data: &[u8]) {
        if region != BAR_IO {
            return;
        }
        let mut i = 0;
        while i < data.len() {
            let at = offset.saturating_add(i as u64);
            let (v, n) = if at & 1 == 0 && i + 1 < data.len() {
                (u16::from_le_bytes([data[i], data[i + 1]]), 2)
            } else {
                ((data[i] as u16) << ((at & 1) * 8), 1)
            };
            self.write_reg(at & !1, v);
            i += n;
        }
    }
}

/// A UHCI as an EHCI's companion (EHCI 4.2): its root ports are the
/// EHCI's ports `firstport..firstport + PORTS`.
impl crate::usb::ehci::Companion for Uhci {
    fn ports(&self) -> usize {
        PORTS
    }
    fn attach(
        &mut self,
        port: usize,
        dev: Box<dyn UsbDevice>,
    ) -> Result<(), (String, Box<dyn UsbDevice>)> {
        self.attach_or_return(port, dev)
    }
    fn detach(&mut self, port: usize) -> Option<Box<dyn UsbDevice>> {
        Uhci::detach(self, port)
    }
}
