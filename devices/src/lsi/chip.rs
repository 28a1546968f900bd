//! The chip behind the registers: the SCRIPTS processor (Technical Manual
//! chapter 2 "Functional Description", "SCSI Functional Description": the
//! SCSI SCRIPTS processor, SCRIPTS RAM, phase mismatch handling; chapter 5
//! for each instruction), the initiator's side of the SCSI bus with the
//! emulated targets on the other side (selection, phases, messages), the
//! interrupt logic (chapter 2, "Interrupt Handling": DSTAT, SIST0/1,
//! ISTAT0 DIP/SIP/INTF, the masks in DIEN and SIEN0/1, fatal versus
//! non-fatal SCSI interrupts, halting the SCRIPTS), and DMA.
//!
//! The targets are modelled, not a wire: a command is handed to
//! [`ScsiBus::plan`] when the COMMAND phase ends, and the [`Plan`] it
//! answers with decides the phases that follow (DATA IN/OUT while the plan
//! has data, then STATUS and MESSAGE IN with COMMAND COMPLETE). Targets
//! never disconnect: a command that waits for block I/O keeps the bus, and
//! the SCRIPTS processor waits with it, as a real initiator waits for REQ.
//!
//! Block I/O runs through [`crate::scsi::request`]: each data-phase block
//! move becomes one run of the plan's piece (its byte range of the
//! medium) straight into the guest buffer the move names, and a plan
//! without data (or a parameter list gathered from data-out moves) runs
//! whole. The chip never performs I/O itself: it returns an [`IoStart`]
//! and waits ([`Wait::Io`]) until its owner reports the outcome through
//! [`Chip::complete`].
//!
//! Hostile SCRIPTS are bounded: one activation (a register write that
//! starts or wakes the processor, or an I/O completion) executes at most
//! [`BUDGET`] units (an instruction is one, a memory move one more per
//! 4 KiB, a data move one more per 64 KiB). A program that exhausts it
//! gets what QEMU gives it: an unexpected disconnect (SIST0 UDC), the bus
//! freed and the processor stopped. Every DMA address is checked; a DMA
//! the bus cannot complete stops the processor with DSTAT BF.

use std::collections::VecDeque;
use std::sync::Arc;

use vm_memory::GuestAddress;

use super::regs::{self, off, phase, Regs};
use super::scripts::{Addressing, Flow, IdSource, Insn, RegMove};
use crate::dma;
use crate::irq::IrqLine;
use crate::scsi::bus::ScsiBus;
use crate::scsi::request::{DataPath, DataPathError, Outcome, Request, Status, VecPath, MAX_CHUNK};
use crate::scsi::{Direction, Lun, Plan};
use crate::GuestMem;

/// The on-chip SCRIPTS RAM (BAR2).
pub const RAM_SIZE: usize = 8192;
/// The memory-space register window (BAR1); registers repeat every 256
/// bytes inside it.
pub const MMIO_SIZE: u64 = 0x400;
/// The largest SCSI id on the bus, as QEMU's LSI offers (the chip itself
/// is 7 by default, and never selects its own id).
pub const MAX_ID: u32 = 7;
/// LUNs an IDENTIFY message can address.
pub const LUNS: u64 = 8;
/// Work one activation may do before the chip gives up on the program.
pub const BUDGET: u32 = 10_000;
/// Message-out bytes examined per block move: longer moves are consumed
/// but only their head is interpreted.
const MSG_OUT_MAX: usize = 64;
/// Memory move bounce buffer.
const COPY_CHUNK: usize = 4096;

/// Why the processor is not executing although SRUN is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    None,
    /// WAIT RESELECT: until SIGP (no target reselects: none disconnects).
    Reselect,
    /// Block I/O of the connected target.
    Io,
}

/// What the target does when its MESSAGE IN bytes are all taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AfterMsgIn {
    /// Go to COMMAND (after MESSAGE REJECT during selection).
    Command,
    /// Free the bus (after COMMAND COMPLETE).
    Disconnect,
}

/// The medium part of a plan, moved piece by piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Medium {
    Read,
    Write { fua: bool },
    Compare,
}

/// The data phase of the command on the bus.
#[derive(Debug)]
enum Data {
    /// Data the unit produced, handed out as DATA IN moves come.
    In { data: Vec<u8>, pos: usize },
    /// A range of the medium.
    Medium {
        kind: Medium,
        offset: u64,
        len: u64,
        pos: u64,
    },
    /// Data-out gathered until `need` bytes are there, then `plan` runs
    /// whole on them (WRITE SAME's block, a parameter list).
    Gather {
        plan: Plan,
        buf: Vec<u8>,
        need: usize,
    },
}

/// The command of the connected nexus.
struct Command {
    unit: Option<Arc<dyn Lun>>,
    data: Option<Data>,
}

/// What the I/O in flight is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InFlight {
    /// One data-phase block move's piece of a medium plan.
    Piece,
    /// A plan run whole; `from_move` when a block move started it.
    Whole { from_move: bool },
}

/// Block I/O for the chip's owner to run ([`crate::scsi::request::run`])
/// outside the chip's lock; its outcome goes to [`Chip::complete`] with
/// `gen`.
pub struct IoStart {
    pub gen: u64,
    pub req: Request,
    pub unit: Option<Arc<dyn Lun>>,
    pub plan: Plan,
    pub path: LsiPath,
}

/// The initiator's buffer of one run.
pub enum LsiPath {
    /// Guest memory at `addr` (a block move's buffer).
    Guest {
        mem: Arc<GuestMem>,
        addr: u64,
        len: u64,
    },
    /// Data-out the chip gathered.
    Buf(VecPath),
    /// No buffer of `len` bytes that could be copied: for plans without
    /// data, and for a parameter list too long to gather (which the
    /// runner refuses before copying anything).
    Empty(u64),
}

impl DataPath for LsiPath {
    fn len(&self) -> u64 {
        match self {
            LsiPath::Guest { len, .. } => *len,
            LsiPath::Buf(v) => v.len(),
            LsiPath::Empty(n) => *n,
        }
    }
    fn copy_to_initiator(&mut self, offset: u64, data: &[u8]) -> Result<(), DataPathError> {
        match self {
            LsiPath::Guest { mem, addr, .. } => {
                let at = addr.checked_add(offset).ok_or(DataPathError)?;
                dma::write_ram(mem, GuestAddress(at), data).map_err(|_| DataPathError)
            }
            LsiPath::Buf(v) => v.copy_to_initiator(offset, data),
            LsiPath::Empty(_) if data.is_empty() => Ok(()),
            LsiPath::Empty(_) => Err(DataPathError),
        }
    }
    fn copy_from_initiator(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DataPathError> {
        match self {
            LsiPath::Guest { mem, addr, .. } => {
                let at = addr.checked_add(offset).ok_or(DataPathError)?;
                dma::read_ram(mem, GuestAddress(at), buf).map_err(|_| DataPathError)
            }
            LsiPath::Buf(v) => v.copy_from_initiator(offset, buf),
            LsiPath::Empty(_) if buf.is_empty() => Ok(()),
            LsiPath::Empty(_) => Err(DataPathError),
        }
    }
}

/// Where the chip's own BARs are, for DMA that addresses the chip itself
/// (SCRIPTS in the on-chip RAM, drivers copying to and from registers by
/// their bus address), and whether the function may master the bus.
#[derive(Clone, Copy, Debug, Default)]
pub struct Windows {
    pub mmio: Option<u64>,
    pub ram: Option<u64>,
    pub bus_master: bool,
}

/// A DMA the bus did not complete.
#[derive(Debug)]
struct Fault;

pub struct Chip {
    mem: Arc<GuestMem>,
    line: Arc<dyn IrqLine>,
    level: bool,
    pub r: Regs,
    pub ram: Vec<u8>,
    pub windows: Windows,
    bus: Arc<ScsiBus>,
    // The bus, as the chip sees it.
    connected: bool,
    phase: u8,
    target_id: u8,
    lun: u8,
    tag: Option<u8>,
    msg_in: VecDeque<u8>,
    after_msg_in: AfterMsgIn,
    cmd: Option<Command>,
    /// The status byte of the finished command, for the STATUS phase.
    status: u8,
    // The SCRIPTS processor.
    carry: bool,
    running: bool,
    wait: Wait,
    /// The phase of the block move being executed (phase mismatch).
    move_phase: u8,
    /// Bumped whenever a reset abandons I/O in flight: stale completions
    /// are dropped.
    gen: u64,
    inflight: Option<(Request, InFlight)>,
}

impl Chip {
    pub fn new(mem: Arc<GuestMem>, line: Arc<dyn IrqLine>, bus: Arc<ScsiBus>) -> Chip {
        Chip {
            mem,
            line,
            level: false,
            r: Regs::default(),
            ram: vec![0; RAM_SIZE],
            windows: Windows::default(),
            bus,
            connected: false,
            phase: 0,
            target_id: 0,
            lun: 0,
            tag: None,
            msg_in: VecDeque::new(),
            after_msg_in: AfterMsgIn::Disconnect,
            cmd: None,
            status: 0,
            carry: false,
            running: false,
            wait: Wait::None,
            move_phase: 0,
            gen: 0,
            inflight: None,
        }
    }

    /// Attaches `unit` as LUN `lun` of the target at SCSI id `id`.
    pub fn attach(&mut self, id: u8, lun: u64, unit: Arc<dyn Lun>) -> Result<(), String> {
        if lun >= LUNS {
            return Err(format!(
                "lun {lun} is not reachable on lsi53c895a (0..{})",
                LUNS - 1
            ));
        }
        self.bus.attach(id as u32, lun, unit)
    }

    /// Whether a target answers selection at `id`.
    fn present(&self, id: u8) -> bool {
        id != self.r.scid & regs::scid::ID && self.bus.has_target(id as u32)
    }

    /// Whether the processor is executing or waiting (ISTAT1 SRUN).
    pub fn running(&self) -> bool {
        self.running
    }

    pub fn waiting(&self) -> Wait {
        self.wait
    }

    // ---- interrupts -----------------------------------------------------

    /// Recomputes ISTAT0 DIP/SIP and the INTx level. DIP and SIP follow
    /// DSTAT and SIST0/1 (reading those clears them); the line is raised
    /// by an unmasked DSTAT or SIST bit or by INTF, unless DCNTL IRQD
    /// disables the pin.
    pub fn sync_irq(&mut self) {
        let r = &mut self.r;
        if r.dstat != 0 {
            r.istat0 |= regs::istat0::DIP;
        } else {
            r.istat0 &= !regs::istat0::DIP;
        }
        if r.sist0 != 0 || r.sist1 != 0 {
            r.istat0 |= regs::istat0::SIP;
        } else {
            r.istat0 &= !regs::istat0::SIP;
        }
        let mut level = r.dstat & r.dien != 0
            || r.sist0 & r.sien0 != 0
            || r.sist1 & r.sien1 != 0
            || r.istat0 & regs::istat0::INTF != 0;
        if r.dcntl & regs::dcntl::IRQD != 0 {
            level = false;
        }
        if level != self.level {
            self.level = level;
            self.line.set_level(level);
        }
    }

    /// A SCSI interrupt. Fatal causes, and non-fatal ones that are not
    /// masked, halt the SCRIPTS (SIEN0/1 description in chapter 4).
    /// Selection timeout is the exception QEMU makes: the processor runs
    /// on and halts at the next instruction that needs the bus, which is
    /// what a real chip does while the timeout is still counting.
    fn scsi_interrupt(&mut self, s0: u8, s1: u8) {
        use regs::{sist0, sist1};
        self.r.sist0 |= s0;
        self.r.sist1 |= s1;
        let nonfatal0 = sist0::CMP | sist0::SEL | sist0::RSL;
        let nonfatal1 = sist1::GEN | sist1::HTH;
        let halt0 = s0 & (self.r.sien0 | !nonfatal0);
        let halt1 = s1 & (self.r.sien1 | !nonfatal1) & !sist1::STO;
        if halt0 | halt1 != 0 {
            self.running = false;
        }
    }

    /// A DMA interrupt: always halts the SCRIPTS.
    fn dma_interrupt(&mut self, bits: u8) {
        self.r.dstat |= bits;
        self.running = false;
    }

    // ---- resets ---------------------------------------------------------

    /// Drops the I/O in flight: its completion will be ignored, and the
    /// runner stops before its next chunk.
    fn abandon_io(&mut self) {
        if let Some((req, _)) = self.inflight.take() {
            req.abort();
        }
        self.gen = self.gen.wrapping_add(1);
        if self.wait == Wait::Io {
            self.wait = Wait::None;
        }
    }

    /// ISTAT0 SRST: every register to its default, the processor stopped,
    /// the chip off the bus. SCRIPTS RAM and the targets are kept.
    pub fn soft_reset(&mut self) {
        self.abandon_io();
        self.r = Regs::default();
        self.running = false;
        self.wait = Wait::None;
        self.carry = false;
        self.status = 0;
        self.cmd = None;
        self.msg_in.clear();
        self.connected = false;
        self.phase = 0;
    }

    /// SCNTL1 RST: a SCSI bus reset. Commands are dropped and every
    /// target resets its units (which report UNIT ATTENTION next).
    fn bus_reset(&mut self) {
        self.abandon_io();
        self.cmd = None;
        self.disconnect();
        self.wait = Wait::None;
        self.bus.reset();
    }

    /// A device reset (power on, system reset): the chip and the bus.
    pub fn reset(&mut self) {
        self.soft_reset();
        self.bus.reset();
        self.sync_irq();
    }

    // ---- the bus --------------------------------------------------------

    fn set_phase(&mut self, p: u8) {
        self.phase = p;
        self.r.sbcl = (self.r.sbcl & !phase::MASK) | p | regs::sbcl::REQ;
        self.r.sstat1 = (self.r.sstat1 & !phase::MASK) | p;
    }

    /// Bus free. A command still on the bus is gone with it.
    fn disconnect(&mut self) {
        self.connected = false;
        self.phase = 0;
        self.r.sbcl = 0;
        self.r.sstat1 &= !phase::MASK;
        self.cmd = None;
        self.msg_in.clear();
    }

    /// The one place a command's status is decided on this transport: the
    /// target goes to STATUS with the byte.
    fn finish_command(&mut self, status: Status) {
        // A data path failure never reaches here (it is a bus fault); if
        // it did, CHECK CONDITION is the honest answer.
        self.status = status.byte().unwrap_or(0x02);
        self.cmd = None;
        self.set_phase(phase::STATUS);
    }

    // ---- registers ------------------------------------------------------

    /// A register read by the CPU or by SCRIPTS (LOAD/STORE, register
    /// moves, DMA to the register window), with the side effects reads
    /// have.
    pub fn read(&mut self, o: u8) -> u8 {
        use regs::{get_byte, istat0};
        let r = &mut self.r;
        match o {
            off::SCNTL0 => r.scntl0,
            off::SCNTL1 => {
                (r.scntl1 & !regs::scntl1::CON) | if self.connected { regs::scntl1::CON } else { 0 }
            }
            off::SCNTL2 => r.scntl2,
            off::SCNTL3 => r.scntl3,
            off::SCID => r.scid,
            off::SXFER => r.sxfer,
            off::SDID => r.sdid,
            off::GPREG => 0x7f,
            off::SFBR => r.sfbr,
            off::SOCL => r.socl,
            off::SSID => r.ssid,
            off::SBCL => r.sbcl,
            off::DSTAT => {
                let v = r.dstat | regs::dstat::DFE;
                // As QEMU: DSTAT clears on read unless an interrupt on
                // the fly is being serviced first.
                if r.istat0 & istat0::INTF == 0 {
                    r.dstat = 0;
                }
                v
            }
            off::SSTAT0 => r.sstat0,
            off::SSTAT1 => r.sstat1,
            off::SSTAT2 => {
                if self.connected {
                    0
                } else {
                    regs::sstat2::LDSC
                }
            }
            off::ISTAT0 => (r.istat0 & !istat0::CON) | if self.connected { istat0::CON } else { 0 },
            off::ISTAT1 => {
                if self.running {
                    regs::istat1::SRUN
                } else {
                    0
                }
            }
            off::MBOX0 => r.mbox0,
            off::MBOX1 => r.mbox1,
            off::CTEST0 => 0xff,
            off::CTEST1 => 0,
            off::CTEST2 => {
                let mut v = r.ctest2 | regs::ctest2::DACK | regs::ctest2::CM;
                if r.istat0 & istat0::SIGP != 0 {
                    r.istat0 &= !istat0::SIGP;
                    v |= regs::ctest2::SIGP;
                }
                v
            }
            off::CTEST3 => r.ctest3,
            off::DFIFO => r.dfifo,
            off::CTEST4 => r.ctest4,
            off::CTEST5 => r.ctest5,
            off::CTEST6 => 0,
            0x24..=0x26 => get_byte(r.dbc, (o - off::DBC) as u32),
            off::DCMD => r.dcmd,
            0x2c..=0x2f => get_byte(r.dsp, (o - off::DSP) as u32),
            off::DMODE => r.dmode,
            off::DIEN => r.dien,
            off::SBR => r.sbr,
            off::DCNTL => r.dcntl,
            off::SIEN0 => r.sien0,
            off::SIEN1 => r.sien1,
            off::SIST0 => std::mem::take(&mut r.sist0),
            off::SIST1 => std::mem::take(&mut r.sist1),
            off::SLPAR => r.slpar,
            off::SWIDE => 0,
            off::MACNTL => 0x0f,
            off::GPCNTL => 0x0f,
            off::STIME0 => r.stime0,
            off::STIME1 => r.stime1,
            off::RESPID0 => r.respid0,
            off::RESPID1 => r.respid1,
            off::STEST0 => 0,
            off::STEST1 => r.stest1,
            off::STEST2 => r.stest2,
            off::STEST3 => r.stest3,
            off::SIDL => r.sidl,
            // STEST4: low voltage differential bus mode.
            off::STEST4 => 0xe0,
            off::SODL => r.sodl,
            off::CCNTL0 => r.ccntl0,
            off::CCNTL1 => r.ccntl1,
            // Drivers peek at the data lines during MESSAGE IN.
            off::SBDL => {
                if self.connected && self.phase == phase::MSG_IN {
                    self.msg_in.front().copied().unwrap_or(0)
                } else {
                    0
                }
            }
            _ => match regs::dword_mut(r, o) {
                Some((v, b)) => get_byte(*v, b),
                None => 0,
            },
        }
    }

    /// A register write. Returns true when the SCRIPTS processor should
    /// run now (it was started, or woken from WAIT RESELECT).
    pub fn write(&mut self, o: u8, v: u8) -> bool {
        use regs::{istat0, set_byte};
        match o {
            off::SCNTL0 => self.r.scntl0 = v,
            off::SCNTL1 => {
                use regs::scntl1;
                // CON is the chip's state, SST a self-clearing command.
                self.r.scntl1 = v & !(scntl1::SST | scntl1::CON);
                if v & scntl1::RST != 0 {
                    if self.r.sstat0 & regs::sstat0::RST == 0 {
                        self.bus_reset();
                        self.r.sstat0 |= regs::sstat0::RST;
                        self.scsi_interrupt(regs::sist0::RST, 0);
                    }
                } else {
                    self.r.sstat0 &= !regs::sstat0::RST;
                }
            }
            off::SCNTL2 => self.r.scntl2 = v & !(regs::scntl2::WSR | regs::scntl2::WSS),
            off::SCNTL3 => self.r.scntl3 = v,
            off::SCID => self.r.scid = v,
            off::SXFER => self.r.sxfer = v,
            off::SDID => self.r.sdid = v & 0xf,
            off::SFBR => self.r.sfbr = v,
            off::SOCL => self.r.socl = v,
            // Read-only status (drivers write some of them at start-up).
            off::GPREG | off::SSID | off::SBCL | off::DSTAT | off::SSTAT0 | off::SSTAT1 => {}
            off::SSTAT2 | off::ISTAT1 | off::CTEST0 | off::CTEST1 | off::CTEST6 => {}
            off::ISTAT0 => {
                let r = &mut self.r;
                r.istat0 = (r.istat0 & 0x0f) | (v & 0xf0);
                if v & istat0::INTF != 0 {
                    r.istat0 &= !istat0::INTF;
                }
                if v & istat0::ABRT != 0 {
                    self.dma_interrupt(regs::dstat::ABRT);
                }
                if v & istat0::SRST != 0 {
                    self.soft_reset();
                    return false;
                }
                if v & istat0::SIGP != 0 && self.wait == Wait::Reselect {
                    // WAIT RESELECT's alternate address is in DNAD.
                    self.wait = Wait::None;
                    self.r.dsp = self.r.dnad;
                    return self.running;
                }
            }
            off::MBOX0 => self.r.mbox0 = v,
            off::MBOX1 => self.r.mbox1 = v,
            off::CTEST2 => self.r.ctest2 = v & regs::ctest2::PCICIE,
            off::CTEST3 => self.r.ctest3 = v & 0x0f,
            off::DFIFO => self.r.dfifo = v,
            off::CTEST4 => self.r.ctest4 = v,
            off::CTEST5 => self.r.ctest5 = v,
            0x24..=0x26 => self.r.dbc = set_byte(self.r.dbc, (o - off::DBC) as u32, v),
            off::DCMD => self.r.dcmd = v,
            0x2c..=0x2f => {
                self.r.dsp = set_byte(self.r.dsp, (o - off::DSP) as u32, v);
                // Writing the top byte starts the SCRIPTS unless manual
                // start mode waits for DCNTL STD.
                if o == off::DSP + 3 && self.r.dmode & regs::dmode::MAN == 0 {
                    return self.start();
                }
            }
            off::DMODE => self.r.dmode = v,
            off::DIEN => self.r.dien = v,
            off::SBR => self.r.sbr = v,
            off::DCNTL => {
                self.r.dcntl = v & !(regs::dcntl::PFF | regs::dcntl::STD);
                if v & regs::dcntl::STD != 0 {
                    return self.start();
                }
            }
            0x3c..=0x3f => {} // ADDER is read only
            off::SIEN0 => self.r.sien0 = v,
            off::SIEN1 => self.r.sien1 = v,
            off::SIST0 | off::SIST1 => {}
            off::SLPAR => self.r.slpar = v,
            off::STIME0 => self.r.stime0 = v,
            off::STIME1 => {
                self.r.stime1 = v;
                // The general purpose timer is not modelled: it expires at
                // once, which is what drivers polling for it need (QEMU
                // does the same for FreeBSD's driver).
                if v & 0xf != 0 {
                    self.scsi_interrupt(0, regs::sist1::GEN);
                }
            }
            off::RESPID0 => self.r.respid0 = v,
            off::RESPID1 => self.r.respid1 = v,
            off::STEST1 => self.r.stest1 = v,
            off::STEST2 => self.r.stest2 = v,
            off::STEST3 => self.r.stest3 = v,
            off::SODL => self.r.sodl = v,
            off::CCNTL0 => self.r.ccntl0 = v,
            off::CCNTL1 => self.r.ccntl1 = v,
            _ => {
                if let Some((reg, b)) = regs::dword_mut(&mut self.r, o) {
                    *reg = set_byte(*reg, b, v);
                }
            }
        }
        false
    }

    /// Starts the SCRIPTS at DSP unless they are running. With I/O still
    /// in flight (the program was aborted meanwhile) the new program runs
    /// once that I/O has completed.
    fn start(&mut self) -> bool {
        if self.running {
            return false;
        }
        // A WAIT RESELECT the program was stopped in (ABRT, an interrupt)
        // is over: the new program starts from DSP.
        if self.wait == Wait::Reselect {
            self.wait = Wait::None;
        }
        self.running = true;
        true
    }

    // ---- DMA ------------------------------------------------------------

    /// The chip's own window an access of `len` bytes at `addr` falls in:
    /// `(is_ram, offset)`.
    fn window(&self, addr: u64, len: usize) -> Option<(bool, u64)> {
        let inside = |base: Option<u64>, size: u64| {
            let base = base?;
            let o = addr.checked_sub(base)?;
            (o.checked_add(len as u64)? <= size).then_some(o)
        };
        if let Some(o) = inside(self.windows.ram, RAM_SIZE as u64) {
            return Some((true, o));
        }
        inside(self.windows.mmio, MMIO_SIZE).map(|o| (false, o))
    }

    /// Reads for the SCRIPTS processor: instruction fetches, tables,
    /// memory move and LOAD sources. The chip's own BARs are reached
    /// without the bus (register reads keep their side effects).
    fn dma_read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), Fault> {
        if let Some((ram, o)) = self.window(addr, buf.len()) {
            let o = o as usize;
            if ram {
                buf.copy_from_slice(&self.ram[o..o + buf.len()]);
            } else {
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = self.read(((o + i) & 0xff) as u8);
                }
            }
            return Ok(());
        }
        if !self.windows.bus_master {
            return Err(Fault);
        }
        dma::read_ram(&self.mem, GuestAddress(addr), buf).map_err(|_| Fault)
    }

    /// Writes for the SCRIPTS processor (memory move, STORE, the status
    /// and message bytes). A write that would start the SCRIPTS (DSP
    /// through the register window) does nothing while they run.
    fn dma_write(&mut self, addr: u64, buf: &[u8]) -> Result<(), Fault> {
        if let Some((ram, o)) = self.window(addr, buf.len()) {
            let o = o as usize;
            if ram {
                self.ram[o..o + buf.len()].copy_from_slice(buf);
            } else {
                for (i, &b) in buf.iter().enumerate() {
                    self.write(((o + i) & 0xff) as u8, b);
                }
            }
            return Ok(());
        }
        if !self.windows.bus_master {
            return Err(Fault);
        }
        dma::write_ram(&self.mem, GuestAddress(addr), buf).map_err(|_| Fault)
    }

    fn read_dword(&mut self, addr: u64) -> Result<u32, Fault> {
        let mut b = [0u8; 4];
        self.dma_read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    // ---- the SCRIPTS processor -------------------------------------------

    /// Runs the SCRIPTS while they may, within `budget`; returns the block
    /// I/O the program now waits for.
    pub fn run(&mut self, budget: &mut u32) -> Option<IoStart> {
        while self.running && self.wait == Wait::None {
            if *budget == 0 {
                // What QEMU does to programs spinning on memory: an
                // unexpected disconnect the driver has to handle.
                log::debug!("lsi53c895a: SCRIPTS budget exhausted at {:#x}", self.r.dsp);
                self.cmd = None;
                self.disconnect();
                self.scsi_interrupt(regs::sist0::UDC, 0);
                self.running = false;
                break;
            }
            *budget -= 1;
            let io = self.step(budget);
            if io.is_some() {
                return io;
            }
            if self.running && self.wait == Wait::None && self.r.dcntl & regs::dcntl::SSM != 0 {
                self.dma_interrupt(regs::dstat::SSI);
            }
        }
        None
    }

    /// Fetches, decodes and executes one instruction.
    fn step(&mut self, budget: &mut u32) -> Option<IoStart> {
        let dsp = self.r.dsp;
        let Ok(w0) = self.read_dword(dsp as u64) else {
            self.dma_interrupt(regs::dstat::BF);
            return None;
        };
        if w0 == 0 {
            // QEMU skips a zero dword as a 4-byte no-op; SeaBIOS's script
            // relies on it for commands without data (a block move of
            // zero bytes to address zero).
            self.r.dsp = dsp.wrapping_add(4);
            return None;
        }
        let Ok(w1) = self.read_dword(dsp.wrapping_add(4) as u64) else {
            self.dma_interrupt(regs::dstat::BF);
            return None;
        };
        let mut next = dsp.wrapping_add(8);
        let mut w2 = 0;
        if super::scripts::has_third_dword(w0) {
            let Ok(v) = self.read_dword(next as u64) else {
                self.dma_interrupt(regs::dstat::BF);
                return None;
            };
            w2 = v;
            next = next.wrapping_add(4);
        }
        self.r.dsp = next;
        self.r.dsps = w1;
        self.r.dcmd = (w0 >> 24) as u8;
        let insn = Insn::decode(w0, w1, w2);
        self.execute(insn, budget)
    }

    fn execute(&mut self, insn: Insn, budget: &mut u32) -> Option<IoStart> {
        match insn {
            Insn::BlockMove { phase, count, addr } => {
                return self.block_move(phase, count, addr, budget)
            }
            Insn::Select { atn, id, alt } => {
                let alt = alt.resolve(self.r.dsp);
                self.r.dnad = alt;
                let id = match id {
                    IdSource::Immediate(id) => id,
                    IdSource::Table(o) => {
                        let at = self.r.dsa.wrapping_add(o as u32) as u64;
                        let Ok(d) = self.read_dword(at) else {
                            self.dma_interrupt(regs::dstat::BF);
                            return None;
                        };
                        self.r.scntl3 = (d >> 24) as u8;
                        self.r.sxfer = (d >> 8) as u8;
                        ((d >> 16) & 0xf) as u8
                    }
                };
                self.select(id, atn, alt);
            }
            Insn::WaitDisconnect => {
                if self.connected {
                    self.disconnect();
                }
            }
            Insn::WaitReselect { alt } => {
                let alt = alt.resolve(self.r.dsp);
                self.r.dnad = alt;
                if self.r.istat0 & regs::istat0::SIGP != 0 {
                    self.r.dsp = alt;
                } else if !self.connected {
                    // No target ever disconnects, so only SIGP ends this.
                    self.wait = Wait::Reselect;
                }
            }
            Insn::SetClear {
                set,
                atn,
                ack,
                target_mode,
                carry,
            } => {
                use regs::sbcl;
                if atn {
                    if set {
                        self.r.socl |= sbcl::ATN;
                        self.r.sbcl |= sbcl::ATN;
                        // The target answers ATN with MESSAGE OUT.
                        if self.connected {
                            self.set_phase(phase::MSG_OUT);
                        }
                    } else {
                        self.r.socl &= !sbcl::ATN;
                        self.r.sbcl &= !sbcl::ATN;
                    }
                }
                if ack {
                    if set {
                        self.r.sbcl |= sbcl::ACK;
                    } else {
                        self.r.sbcl &= !sbcl::ACK;
                    }
                }
                if target_mode {
                    log::debug!("lsi53c895a: target mode is not emulated");
                }
                if carry {
                    self.carry = set;
                }
            }
            Insn::RegisterMove {
                kind,
                reg,
                op,
                data,
                use_sfbr,
            } => {
                // A plain move does not read its register (reads of
                // DSTAT or SIST clear them).
                let reads = op != super::scripts::AluOp::Move;
                let (a, b) = match kind {
                    RegMove::FromSfbr => (self.r.sfbr, data),
                    RegMove::ToSfbr => (if reads { self.read(reg) } else { 0 }, data),
                    RegMove::ReadModifyWrite => (
                        if reads { self.read(reg) } else { 0 },
                        if use_sfbr { self.r.sfbr } else { data },
                    ),
                };
                let (v, c) = op.apply(a, b, self.carry);
                self.carry = c;
                match kind {
                    RegMove::ToSfbr => self.r.sfbr = v,
                    _ => {
                        // SCRIPTS writing DSP or DCNTL do not restart
                        // themselves.
                        self.write(reg, v);
                    }
                }
            }
            Insn::Transfer { flow, cond, to } => {
                if self.r.sist1 & regs::sist1::STO != 0 {
                    self.running = false;
                    return None;
                }
                let bus_phase = self.connected.then_some(self.phase);
                if cond.holds(self.carry, bus_phase, self.r.sfbr) {
                    let addr = to.resolve(self.r.dsp);
                    match flow {
                        Flow::Jump => {
                            self.r.adder = addr;
                            self.r.dsp = addr;
                        }
                        Flow::Call => {
                            self.r.temp = self.r.dsp;
                            self.r.dsp = addr;
                        }
                        Flow::Return => self.r.dsp = self.r.temp,
                        Flow::Interrupt { on_the_fly: true } => {
                            self.r.istat0 |= regs::istat0::INTF;
                        }
                        Flow::Interrupt { on_the_fly: false } => {
                            self.dma_interrupt(regs::dstat::SIR);
                        }
                    }
                }
            }
            Insn::Nop => {}
            Insn::MemoryMove { count, src, dst } => {
                *budget = budget.saturating_sub(count / COPY_CHUNK as u32);
                let mut buf = [0u8; COPY_CHUNK];
                let mut done = 0u32;
                while done < count {
                    let n = (count - done).min(COPY_CHUNK as u32) as usize;
                    let s = src.wrapping_add(done) as u64;
                    let d = dst.wrapping_add(done) as u64;
                    if self.dma_read(s, &mut buf[..n]).is_err()
                        || self.dma_write(d, &buf[..n]).is_err()
                    {
                        self.dma_interrupt(regs::dstat::BF);
                        return None;
                    }
                    done += n as u32;
                }
            }
            Insn::LoadStore {
                load,
                reg,
                count,
                addr,
                dsa_relative,
            } => {
                let addr = if dsa_relative {
                    self.r.dsa.wrapping_add(super::scripts::sext24(addr) as u32)
                } else {
                    addr
                };
                let n = count as usize;
                let mut data = [0u8; 8];
                if load {
                    if self.dma_read(addr as u64, &mut data[..n]).is_err() {
                        self.dma_interrupt(regs::dstat::BF);
                        return None;
                    }
                    for (i, &b) in data[..n].iter().enumerate() {
                        self.write(reg.wrapping_add(i as u8), b);
                    }
                } else {
                    for (i, b) in data[..n].iter_mut().enumerate() {
                        *b = self.read(reg.wrapping_add(i as u8));
                    }
                    if self.dma_write(addr as u64, &data[..n]).is_err() {
                        self.dma_interrupt(regs::dstat::BF);
                        return None;
                    }
                }
            }
            Insn::Illegal => self.dma_interrupt(regs::dstat::IID),
        }
        None
    }

    /// SELECT: arbitration always succeeds (no other initiator); a target
    /// that is not there times out (SIST1 STO).
    fn select(&mut self, id: u8, atn: bool, alt: u32) {
        self.r.sdid = id;
        if self.connected {
            // Reselected meanwhile: go to the alternate address.
            self.r.dsp = alt;
            return;
        }
        self.r.sstat0 |= regs::sstat0::WOA;
        self.r.scntl1 &= !regs::scntl1::IARB;
        if !self.present(id) {
            self.scsi_interrupt(0, regs::sist1::STO);
            self.disconnect();
            return;
        }
        self.connected = true;
        self.target_id = id;
        self.lun = 0;
        self.tag = None;
        self.msg_in.clear();
        self.cmd = None;
        if atn {
            self.r.socl |= regs::sbcl::ATN;
            self.r.sbcl |= regs::sbcl::ATN;
        }
        self.r.sbcl |= regs::sbcl::BSY;
        // MESSAGE OUT follows whether or not ATN was raised: SeaBIOS
        // selects without ATN and sends IDENTIFY, as QEMU lets it.
        self.set_phase(phase::MSG_OUT);
    }

    // ---- block moves -------------------------------------------------------

    fn block_move(
        &mut self,
        ph: u8,
        count: u32,
        addr: Addressing,
        budget: &mut u32,
    ) -> Option<IoStart> {
        if self.r.sist1 & regs::sist1::STO != 0 {
            self.running = false;
            return None;
        }
        let (count, addr) = match addr {
            Addressing::Direct(a) => (count, a),
            Addressing::Indirect(p) => match self.read_dword(p as u64) {
                Ok(a) => (count, a),
                Err(Fault) => {
                    self.dma_interrupt(regs::dstat::BF);
                    return None;
                }
            },
            Addressing::Table(o) => {
                let at = self.r.dsa.wrapping_add(o as u32) as u64;
                let mut t = [0u8; 8];
                if self.dma_read(at, &mut t).is_err() {
                    self.dma_interrupt(regs::dstat::BF);
                    return None;
                }
                let c = u32::from_le_bytes([t[0], t[1], t[2], t[3]]) & 0x00ff_ffff;
                (c, u32::from_le_bytes([t[4], t[5], t[6], t[7]]))
            }
        };
        self.r.dbc = count;
        self.r.rbc = count;
        self.r.ia = self.r.dsp.wrapping_sub(8);
        if !self.connected {
            // Nobody drives REQ: a real chip would hang here.
            self.dma_interrupt(regs::dstat::IID);
            return None;
        }
        if self.phase != ph {
            self.scsi_interrupt(regs::sist0::MA, 0);
            return None;
        }
        self.r.dnad = addr;
        self.move_phase = ph;
        *budget = budget.saturating_sub(count >> 16);
        let io = match ph {
            phase::DATA_OUT | phase::DATA_IN => {
                let io = self.data_move();
                if io.is_some() {
                    return io;
                }
                None
            }
            phase::COMMAND => self.command_phase(),
            phase::STATUS => {
                self.status_phase();
                None
            }
            phase::MSG_OUT => {
                self.msg_out_phase();
                None
            }
            phase::MSG_IN => {
                self.msg_in_phase();
                None
            }
            // The targets never enter the reserved phases.
            _ => None,
        };
        if io.is_none() && self.wait == Wait::None {
            self.end_move();
        }
        io
    }

    /// Advances the move's address and count by `n` bytes moved.
    fn advance(&mut self, n: u64) {
        let n = n.min(self.r.dbc as u64) as u32;
        self.r.dnad = self.r.dnad.wrapping_add(n);
        self.r.dbc -= n;
        self.r.csbc = self.r.csbc.wrapping_add(n);
    }

    /// The bookkeeping at the end of a block move. A data move the target
    /// left before its count was done is a phase mismatch; with no FIFO,
    /// DFIFO and CTEST5 mirror DBC so that the drivers' FIFO arithmetic
    /// finds nothing left in it.
    fn end_move(&mut self) {
        let r = &mut self.r;
        r.dfifo = r.dbc as u8;
        r.ctest5 = (r.ctest5 & 0xfc) | ((r.dbc >> 8) & 3) as u8;
        r.sbc = r.dbc;
        r.rbc = r.rbc.wrapping_sub(r.dbc);
        r.ua = r.dnad;
        let data = matches!(self.move_phase, phase::DATA_OUT | phase::DATA_IN);
        if data && r.dbc != 0 && (!self.connected || self.phase != self.move_phase) && self.running
        {
            self.phase_mismatch();
        }
    }

    /// Phase mismatch: the phase mismatch jump when enabled (CCNTL0
    /// ENPMJ), else SIST0 MA.
    fn phase_mismatch(&mut self) {
        use regs::ccntl0;
        let r = &mut self.r;
        if r.ccntl0 & ccntl0::ENPMJ != 0 {
            let out = self.move_phase == phase::DATA_OUT;
            r.dsp = if r.ccntl0 & ccntl0::PMJCTL != 0 {
                if out {
                    r.pmjad1
                } else {
                    r.pmjad2
                }
            } else if r.scntl2 & regs::scntl2::WSR != 0 {
                r.pmjad2
            } else {
                r.pmjad1
            };
        } else {
            self.scsi_interrupt(regs::sist0::MA, 0);
        }
    }

    fn start_io(
        &mut self,
        what: InFlight,
        unit: Option<Arc<dyn Lun>>,
        plan: Plan,
        path: LsiPath,
    ) -> Option<IoStart> {
        let req = Request::new();
        self.inflight = Some((req.clone(), what));
        self.wait = Wait::Io;
        Some(IoStart {
            gen: self.gen,
            req,
            unit,
            plan,
            path,
        })
    }

    /// A DATA IN or DATA OUT block move.
    fn data_move(&mut self) -> Option<IoStart> {
        let Some(cmd) = self.cmd.as_mut() else {
            self.dma_interrupt(regs::dstat::IID);
            return None;
        };
        let unit = cmd.unit.clone();
        let Some(mut data) = cmd.data.take() else {
            self.dma_interrupt(regs::dstat::IID);
            return None;
        };
        let dbc = self.r.dbc as u64;
        let addr = self.r.dnad as u64;
        match &mut data {
            Data::In { data: v, pos } => {
                let n = dbc.min((v.len() - *pos) as u64) as usize;
                if self.guest_write(addr, &v[*pos..*pos + n]).is_err() {
                    self.put_data(data);
                    self.dma_interrupt(regs::dstat::BF);
                    return None;
                }
                *pos += n;
                self.advance(n as u64);
                if *pos == v.len() {
                    self.finish_command(Status::Good);
                } else {
                    self.put_data(data);
                }
                None
            }
            Data::Medium {
                kind,
                offset,
                len,
                pos,
            } => {
                let n = dbc.min(*len - *pos);
                if n == 0 {
                    self.put_data(data);
                    return None;
                }
                let at = *offset + *pos;
                let plan = match kind {
                    Medium::Read => Plan::Read { offset: at, len: n },
                    Medium::Write { fua } => Plan::Write {
                        offset: at,
                        len: n,
                        fua: *fua,
                    },
                    Medium::Compare => Plan::Compare { offset: at, len: n },
                };
                self.put_data(data);
                if !self.windows.bus_master {
                    self.dma_interrupt(regs::dstat::BF);
                    return None;
                }
                let path = LsiPath::Guest {
                    mem: self.mem.clone(),
                    addr,
                    len: n,
                };
                self.start_io(InFlight::Piece, unit, plan, path)
            }
            Data::Gather { buf, need, .. } => {
                let n = dbc.min((*need - buf.len()) as u64) as usize;
                let at = buf.len();
                buf.resize(at + n, 0);
                if self.guest_read(addr, &mut buf[at..]).is_err() {
                    buf.truncate(at);
                    self.put_data(data);
                    self.dma_interrupt(regs::dstat::BF);
                    return None;
                }
                self.advance(n as u64);
                if buf.len() < *need {
                    self.put_data(data);
                    return None;
                }
                let Data::Gather { plan, buf, .. } = data else {
                    unreachable!("matched above")
                };
                self.start_io(
                    InFlight::Whole { from_move: true },
                    unit,
                    plan,
                    LsiPath::Buf(VecPath { buf }),
                )
            }
        }
    }

    fn put_data(&mut self, data: Data) {
        if let Some(c) = self.cmd.as_mut() {
            c.data = Some(data);
        }
    }

    /// Data phases move between the targets and guest RAM only.
    fn guest_write(&self, addr: u64, buf: &[u8]) -> Result<(), Fault> {
        if !self.windows.bus_master {
            return Err(Fault);
        }
        dma::write_ram(&self.mem, GuestAddress(addr), buf).map_err(|_| Fault)
    }

    fn guest_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Fault> {
        if !self.windows.bus_master {
            return Err(Fault);
        }
        dma::read_ram(&self.mem, GuestAddress(addr), buf).map_err(|_| Fault)
    }

    /// COMMAND: the CDB goes to the target, whose plan sets the phases to
    /// come. At most 16 bytes are taken (the longest CDB), as QEMU does.
    fn command_phase(&mut self) -> Option<IoStart> {
        let n = (self.r.dbc as usize).min(16);
        let mut cdb = [0u8; 16];
        if self.dma_read(self.r.dnad as u64, &mut cdb[..n]).is_err() {
            self.dma_interrupt(regs::dstat::BF);
            return None;
        }
        self.r.sfbr = cdb[0];
        self.r.dnad = self.r.dnad.wrapping_add(self.r.dbc);
        self.r.dbc = 0;
        let Some((unit, plan)) = self
            .bus
            .plan(self.target_id as u32, self.lun as u64, &cdb[..n])
        else {
            // The target went away (unplugged) while selected.
            self.disconnect();
            self.scsi_interrupt(regs::sist0::UDC, 0);
            return None;
        };
        let dir = plan.direction();
        let data = match plan {
            Plan::DataIn(v) if dir == Direction::In => Data::In { data: v, pos: 0 },
            Plan::Read { offset, len } if dir == Direction::In => Data::Medium {
                kind: Medium::Read,
                offset,
                len,
                pos: 0,
            },
            Plan::Write { offset, len, fua } if dir == Direction::Out => Data::Medium {
                kind: Medium::Write { fua },
                offset,
                len,
                pos: 0,
            },
            Plan::Compare { offset, len } if dir == Direction::Out => Data::Medium {
                kind: Medium::Compare,
                offset,
                len,
                pos: 0,
            },
            Plan::WriteSame { block, .. } if block > 0 && block as usize <= MAX_CHUNK => {
                Data::Gather {
                    need: block as usize,
                    plan,
                    buf: Vec::new(),
                }
            }
            Plan::DataOut { len, .. } if len > 0 && len as usize <= MAX_CHUNK => Data::Gather {
                need: len as usize,
                plan,
                buf: Vec::new(),
            },
            plan => {
                // No data phase (or a parameter list too long to take,
                // which the runner refuses without copying): run it now
                // and go to STATUS when it is done.
                let len = plan.data_len();
                self.cmd = Some(Command {
                    unit: unit.clone(),
                    data: None,
                });
                return self.start_io(
                    InFlight::Whole { from_move: false },
                    unit,
                    plan,
                    LsiPath::Empty(len),
                );
            }
        };
        self.cmd = Some(Command {
            unit,
            data: Some(data),
        });
        self.set_phase(if dir == Direction::In {
            phase::DATA_IN
        } else {
            phase::DATA_OUT
        });
        None
    }

    /// STATUS: one byte, then COMMAND COMPLETE in MESSAGE IN.
    fn status_phase(&mut self) {
        let st = self.status;
        if self.dma_write(self.r.dnad as u64, &[st]).is_err() {
            self.dma_interrupt(regs::dstat::BF);
            return;
        }
        self.r.sfbr = st;
        self.r.dnad = self.r.dnad.wrapping_add(1);
        self.r.dbc = 0;
        self.msg_in.clear();
        self.msg_in.push_back(0x00);
        self.after_msg_in = AfterMsgIn::Disconnect;
        self.set_phase(phase::MSG_IN);
    }

    /// MESSAGE IN: the queued bytes, as many as the move takes; SIDL keeps
    /// the last one (Linux's driver reads it there).
    fn msg_in_phase(&mut self) {
        let n = (self.r.dbc as usize).min(self.msg_in.len());
        if n == 0 {
            return;
        }
        let bytes: Vec<u8> = self.msg_in.iter().take(n).copied().collect();
        if self.dma_write(self.r.dnad as u64, &bytes).is_err() {
            self.dma_interrupt(regs::dstat::BF);
            return;
        }
        self.r.sfbr = bytes[0];
        self.r.sidl = bytes[n - 1];
        self.msg_in.drain(..n);
        self.advance(n as u64);
        if self.msg_in.is_empty() {
            match self.after_msg_in {
                AfterMsgIn::Command => self.set_phase(phase::COMMAND),
                AfterMsgIn::Disconnect => self.disconnect(),
            }
        }
    }

    /// Queues MESSAGE REJECT and goes on to COMMAND once it is read.
    fn reject(&mut self) {
        self.msg_in.clear();
        self.msg_in.push_back(0x07);
        self.after_msg_in = AfterMsgIn::Command;
        self.set_phase(phase::MSG_IN);
    }

    /// MESSAGE OUT: IDENTIFY, queue tags, the negotiation messages (SDTR,
    /// WDTR, PPR: ignored, so the transfer stays asynchronous and narrow,
    /// as with QEMU), NOP, and the abort and reset messages. Anything else
    /// is answered with MESSAGE REJECT.
    fn msg_out_phase(&mut self) {
        let n = (self.r.dbc as usize).min(MSG_OUT_MAX);
        let mut b = [0u8; MSG_OUT_MAX];
        if self.dma_read(self.r.dnad as u64, &mut b[..n]).is_err() {
            self.dma_interrupt(regs::dstat::BF);
            return;
        }
        self.r.dnad = self.r.dnad.wrapping_add(self.r.dbc);
        self.r.dbc = 0;
        let b = &b[..n];
        let mut i = 0;
        while i < b.len() {
            let m = b[i];
            i += 1;
            self.r.sfbr = m;
            match m {
                // IDENTIFY: bits 2..0 the LUN, bit 6 the right to
                // disconnect (never used: targets keep the bus).
                0x80..=0xff => {
                    self.lun = m & 7;
                    self.set_phase(phase::COMMAND);
                }
                // SIMPLE, HEAD OF QUEUE, ORDERED QUEUE TAG: commands run
                // one at a time, so the tag only names the nexus.
                0x20..=0x22 => {
                    self.tag = b.get(i).copied();
                    i += 1;
                }
                0x01 => {
                    let (Some(&len), Some(&code)) = (b.get(i), b.get(i + 1)) else {
                        self.reject();
                        return;
                    };
                    let end = i + 1 + len as usize;
                    if len == 0 || end > b.len() || !matches!(code, 1 | 3 | 4) {
                        self.reject();
                        return;
                    }
                    i = end;
                }
                0x08 => self.set_phase(phase::COMMAND),
                // MESSAGE REJECT of ours: nothing to take back.
                0x07 => {}
                0x04 => {
                    self.disconnect();
                    return;
                }
                // ABORT, BUS DEVICE RESET, ABORT TAG, CLEAR QUEUE: the one
                // command of the nexus goes; a bus device reset resets
                // the target's units too.
                0x06 | 0x0c | 0x0d | 0x0e => {
                    if m == 0x0c {
                        self.bus.reset_target(self.target_id as u32);
                    }
                    self.cmd = None;
                    self.disconnect();
                    return;
                }
                _ => {
                    self.reject();
                    return;
                }
            }
        }
    }

    /// The outcome of the I/O in flight; continues the SCRIPTS. Stale
    /// outcomes (a reset came in between) are dropped.
    pub fn complete(&mut self, gen: u64, o: Outcome, budget: &mut u32) -> Option<IoStart> {
        if gen != self.gen {
            return None;
        }
        let (_, what) = self.inflight.take()?;
        self.wait = Wait::None;
        match what {
            InFlight::Piece => self.piece_done(o),
            InFlight::Whole { from_move } => {
                if o.status == Status::DataPathFailed {
                    self.dma_interrupt(regs::dstat::BF);
                }
                self.finish_command(o.status);
                if from_move {
                    self.end_move();
                }
            }
        }
        let io = self.run(budget);
        self.sync_irq();
        io
    }

    fn piece_done(&mut self, o: Outcome) {
        if o.status == Status::DataPathFailed {
            // The guest buffer is not RAM: a bus fault; the command stays
            // in its data phase for the driver to reset.
            self.dma_interrupt(regs::dstat::BF);
            return;
        }
        self.advance(o.transferred);
        let mut finished = false;
        if let Some(Command {
            data: Some(Data::Medium { pos, len, .. }),
            ..
        }) = self.cmd.as_mut()
        {
            *pos = (*pos + o.transferred).min(*len);
            finished = *pos == *len;
        }
        match o.status {
            Status::Good if !finished => {}
            s => self.finish_command(s),
        }
        self.end_move();
    }
}
