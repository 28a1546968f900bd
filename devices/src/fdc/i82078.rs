//! The i82078 floppy disk controller at 0x3f0-0x3f5 and 0x3f7, IRQ 6 and
//! ISA DMA channel 2, as QEMU's `isa-fdc` behaves. Follows the 82078
//! datasheet: section 5 (registers: SRA, SRB, DOR, TDR, MSR/DSR, FIFO,
//! DIR/CCR), 8 (command, execution and result phases; ST0-ST3) and 9
//! (resets: four SENSE INTERRUPT STATUS results after a reset with
//! polling), with QEMU's choices where the datasheet leaves room (reading
//! on past the end of a track in multi-track mode; results of a non-DMA
//! transfer naming its last sector).
//!
//! A command's bytes are parsed into a [`Command`] once complete, then
//! executed. Medium data moves through the block layer asynchronously: a
//! data command returns an [`FdcIo`] to submit outside the controller's
//! lock, and its completion ([`Fdc::complete`]) moves the data through
//! ISA DMA (or offers it through the FIFO in non-DMA mode) and enters the
//! result phase. The status bytes are built in one place, [`Fdc::finish`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use block::backend::BlockBackend;
use block::driver::IoRequest;
use block::iov::IoVecs;

use super::command::{self, Chrn, Command, DataOp};
use super::drive::{Drive, Seek};
use crate::bus::lock;
use crate::irq::IrqLine;
use crate::legacy::isa_dma::IsaDma;

pub const IO_BASE: u64 = 0x3f0;
pub const IRQ: u32 = 6;
pub const DMA_CHANNEL: usize = 2;
const SECTOR: usize = 512;

mod msr {
    pub const CB: u8 = 0x10;
    pub const NDMA: u8 = 0x20;
    pub const DIO: u8 = 0x40;
    pub const RQM: u8 = 0x80;
}
mod dor {
    pub const SEL: u8 = 0x03;
    pub const NRESET: u8 = 0x04;
    pub const DMAEN: u8 = 0x08;
}
mod st0 {
    pub const ABNORMAL: u8 = 0x40;
    pub const INVALID: u8 = 0x80;
    pub const SEEK_END: u8 = 0x20;
    pub const READY_CHANGE: u8 = 0xc0;
}
mod st1 {
    pub const EN: u8 = 0x80;
    pub const NW: u8 = 0x02;
    pub const MA: u8 = 0x01;
    pub const ND: u8 = 0x04;
    pub const OR: u8 = 0x10;
}

/// What the data phase is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
    Verify,
    Format { filler: u8 },
}

/// A planned data transfer: the sectors, where the head ends, and how the
/// bytes move.
#[derive(Clone, Debug)]
struct Transfer {
    dir: Dir,
    drive: usize,
    /// Medium sector numbers, in transfer order.
    lbas: Vec<u64>,
    /// Head, track and sector after the transfer, for the result.
    end: (u8, u8, u8),
    dma: bool,
    /// ST0 bits gathered on the way (SEEK END when a track was crossed).
    st0: u8,
}

enum Phase {
    Command(Vec<u8>),
    /// Waiting for the block layer.
    Busy,
    /// Non-DMA data the host reads.
    DataIn {
        buf: Vec<u8>,
        pos: usize,
        t: Transfer,
    },
    /// Non-DMA data the host writes.
    DataOut {
        buf: Vec<u8>,
        pos: usize,
        t: Transfer,
    },
    Result {
        bytes: Vec<u8>,
        pos: usize,
        irq: bool,
    },
}

/// One block request of a transfer, to submit outside the lock.
pub struct FdcIo {
    pub backend: Arc<BlockBackend>,
    pub req: IoRequest,
    pub ticket: Ticket,
}

/// Which transfer a completion belongs to (stale after a reset).
pub struct Ticket {
    gen: u64,
    t: Transfer,
    /// The data of the whole transfer (reads fill it run by run).
    data: Vec<u8>,
    /// Sectors of `t.lbas` done.
    done: usize,
    /// Sectors in the request in flight.
    run: usize,
}

pub struct Fdc {
    drives: [Option<Arc<Mutex<Drive>>>; 2],
    dma: Arc<Mutex<IsaDma>>,
    irq: Arc<dyn IrqLine>,
    irq_up: bool,
    dor: u8,
    tdr: u8,
    dsr: u8,
    phase: Phase,
    status0: u8,
    reset_sensei: u8,
    specify: [u8; 2],
    config: u8,
    pretrk: u8,
    locked: bool,
    perpendicular: u8,
    eot: u8,
    gen: u64,
    irq_latency: Duration,
    /// Inside a guest register access ([`FdcPorts`]).
    in_access: bool,
    /// When an interrupt raised during an access was deferred; it is
    /// delivered `irq_latency` later unless the line is lowered first.
    irq_deferred: Option<std::time::Instant>,
    /// A thread is waiting to deliver deferred interrupts: one at most,
    /// however fast the guest makes them (bounded threads).
    irq_timer: bool,
}

impl Fdc {
    pub fn new(
        drives: [Option<Arc<Mutex<Drive>>>; 2],
        dma: Arc<Mutex<IsaDma>>,
        irq: Arc<dyn IrqLine>,
    ) -> Fdc {
        Fdc {
            drives,
            dma,
            irq,
            irq_up: false,
            dor: dor::NRESET | dor::DMAEN,
            tdr: 0,
            dsr: 0,
            phase: Phase::Command(Vec::new()),
            status0: 0,
            reset_sensei: 0,
            specify: [0; 2],
            config: 0x60,
            pretrk: 0,
            locked: false,
            perpendicular: 0,
            eot: 0,
            gen: 0,
            irq_latency: Duration::ZERO,
            in_access: false,
            irq_deferred: None,
            irq_timer: false,
        }
    }

    /// Puts `drive` at `unit` (0 or 1).
    pub fn attach(&mut self, unit: usize, drive: Arc<Mutex<Drive>>) -> Result<(), String> {
        match self.drives.get_mut(unit) {
            Some(slot @ None) => {
                *slot = Some(drive);
                Ok(())
            }
            Some(Some(_)) => Err(format!("Floppy unit {unit} is in use")),
            None => Err(format!(
                "Can't create floppy unit {unit}, bus supports only 2 units"
            )),
        }
    }

    /// How many drives are attached (for the CMOS equipment byte).
    pub fn drive_count(&self) -> usize {
        self.drives.iter().filter(|d| d.is_some()).count()
    }

    /// Makes interrupts raised during a guest register access reach the
    /// guest `latency` after it (see [`FdcPorts`]); zero (the default)
    /// raises them at once, as the qtest accelerator (with no guest code
    /// running) wants.
    pub fn set_irq_latency(&mut self, latency: Duration) {
        self.irq_latency = latency;
    }

    fn set_irq(&mut self, up: bool) {
        if up && !self.irq_up && self.in_access && !self.irq_latency.is_zero() {
            self.irq_deferred
                .get_or_insert_with(std::time::Instant::now);
            return;
        }
        if !up {
            // A deferred interrupt the guest acknowledged or a reset
            // cancelled never arrives.
            self.irq_deferred = None;
        }
        if self.irq_up != up {
            self.irq_up = up;
            self.irq.set_level(up);
        }
    }

    fn cur(&self) -> usize {
        (self.dor & dor::SEL & 1) as usize
    }

    fn drive(&self, n: usize) -> Option<Arc<Mutex<Drive>>> {
        self.drives.get(n).and_then(|d| d.clone())
    }

    /// The controller reset (DOR bit 2 going up, or DSR bit 7): back to the
    /// command phase, I/O in flight forgotten, and an interrupt that four
    /// SENSE INTERRUPT STATUS commands acknowledge (polling mode).
    fn reset(&mut self) {
        self.gen += 1;
        self.phase = Phase::Command(Vec::new());
        self.status0 = st0::READY_CHANGE;
        if !self.locked {
            self.config = 0x60;
            self.pretrk = 0;
        }
        self.reset_sensei = 4;
        self.set_irq(true);
    }

    fn msr(&self) -> u8 {
        match &self.phase {
            Phase::Command(b) if b.is_empty() => msr::RQM,
            Phase::Command(_) => msr::RQM | msr::CB,
            Phase::Busy => msr::CB,
            Phase::DataIn { .. } => msr::RQM | msr::DIO | msr::NDMA | msr::CB,
            Phase::DataOut { .. } => msr::RQM | msr::NDMA | msr::CB,
            Phase::Result { .. } => msr::RQM | msr::DIO | msr::CB,
        }
    }

    /// A read of register `reg` (0-7 from 0x3f0).
    pub fn read(&mut self, reg: u8) -> (u8, Option<FdcIo>) {
        let v = match reg {
            0 => ((self.irq_up || self.irq_deferred.is_some()) as u8) << 7,
            1 => 0xc0,
            2 => self.dor,
            3 => self.tdr,
            4 => self.msr(),
            5 => return self.read_fifo(),
            7 => match self.drive(self.cur()) {
                Some(d) => (lock(&d).change_line() as u8) << 7,
                None => 0x80,
            },
            _ => 0xff,
        };
        (v, None)
    }

    /// A write of `v` to register `reg`.
    pub fn write(&mut self, reg: u8, v: u8) -> Option<FdcIo> {
        match reg {
            2 => {
                let was_reset = self.dor & dor::NRESET == 0;
                self.dor = v;
                if was_reset && v & dor::NRESET != 0 {
                    self.reset();
                }
            }
            3 => self.tdr = v & 3,
            4 => {
                self.dsr = v & 0x7f;
                if v & 0x80 != 0 {
                    self.reset();
                }
            }
            5 => return self.write_fifo(v),
            7 => self.dsr = (self.dsr & !3) | (v & 3),
            _ => {}
        }
        None
    }

    fn read_fifo(&mut self) -> (u8, Option<FdcIo>) {
        match &mut self.phase {
            Phase::DataIn { buf, pos, .. } => {
                let v = buf.get(*pos).copied().unwrap_or(0);
                *pos += 1;
                if *pos >= buf.len() {
                    let Phase::DataIn { t, .. } = std::mem::replace(&mut self.phase, Phase::Busy)
                    else {
                        unreachable!()
                    };
                    self.finish_transfer(&t, 0, 0);
                }
                (v, None)
            }
            Phase::Result { bytes, pos, irq } => {
                let v = bytes.get(*pos).copied().unwrap_or(0);
                *pos += 1;
                if *pos >= bytes.len() {
                    let irq = *irq;
                    self.phase = Phase::Command(Vec::new());
                    if irq {
                        self.set_irq(false);
                    }
                }
                (v, None)
            }
            _ => (0, None),
        }
    }

    fn write_fifo(&mut self, v: u8) -> Option<FdcIo> {
        if self.dor & dor::NRESET == 0 {
            return None;
        }
        match &mut self.phase {
            Phase::Command(bytes) => {
                bytes.push(v);
                if bytes.len() < command::length(bytes[0]) {
                    return None;
                }
                let c = command::parse(bytes);
                log::debug!("fdc: command {bytes:02x?}: {c:?}");
                self.phase = Phase::Busy;
                self.execute(c)
            }
            Phase::DataOut { buf, pos, .. } => {
                if let Some(b) = buf.get_mut(*pos) {
                    *b = v;
                }
                *pos += 1;
                if *pos < buf.len() {
                    return None;
                }
                let Phase::DataOut { buf, t, .. } = std::mem::replace(&mut self.phase, Phase::Busy)
                else {
                    unreachable!()
                };
                self.start_io(t, buf)
            }
            // Not expecting a byte: ignored, as the chip does.
            _ => None,
        }
    }

    /// Enters the result phase with `bytes`; `irq`: the command
    /// interrupts now and reading the last byte lowers it.
    fn result(&mut self, bytes: Vec<u8>, irq: bool) {
        log::debug!("fdc: result {bytes:02x?} (interrupt {irq})");
        self.phase = Phase::Result { bytes, pos: 0, irq };
        if irq {
            self.set_irq(true);
        }
    }

    /// A command without a result phase that interrupts (seeks).
    fn seek_done(&mut self) {
        self.phase = Phase::Command(Vec::new());
        self.status0 |= st0::SEEK_END;
        self.set_irq(true);
    }

    fn execute(&mut self, c: Command) -> Option<FdcIo> {
        match c {
            Command::Invalid => self.result(vec![st0::INVALID], false),
            Command::Specify { srt_hut, hlt_nd } => {
                self.specify = [srt_hut, hlt_nd];
                self.phase = Phase::Command(Vec::new());
            }
            Command::SenseDriveStatus { drive, head } => {
                self.select(drive);
                let st3 = match self.drive(drive as usize & 1) {
                    Some(d) => {
                        let d = lock(&d);
                        (d.read_only() as u8) << 6
                            | 0x20
                            | ((d.track == 0) as u8) << 4
                            | ((d.heads() == 2) as u8) << 3
                    }
                    None => 0,
                } | head << 2
                    | drive;
                self.result(vec![st3], false);
            }
            Command::Recalibrate { drive } => {
                self.select(drive);
                if let Some(d) = self.drive(self.cur()) {
                    lock(&d).seek(0, 0, 1);
                }
                self.seek_done();
            }
            Command::Seek { drive, cyl, .. } => {
                self.select(drive);
                if let Some(d) = self.drive(self.cur()) {
                    lock(&d).seek_track(cyl);
                }
                self.seek_done();
            }
            Command::RelativeSeek {
                drive,
                inward,
                steps,
                ..
            } => {
                self.select(drive);
                if let Some(d) = self.drive(self.cur()) {
                    let mut d = lock(&d);
                    let t = d.track;
                    let to = if inward {
                        t.saturating_add(steps).min(d.tracks().saturating_sub(1))
                    } else {
                        t.saturating_sub(steps)
                    };
                    d.seek_track(to);
                }
                self.seek_done();
            }
            Command::SenseInterrupt => {
                let pcn = self.drive(self.cur()).map_or(0, |d| lock(&d).track);
                let st0 = if self.reset_sensei > 0 {
                    let n = 4 - self.reset_sensei;
                    self.reset_sensei -= 1;
                    st0::READY_CHANGE | n
                } else if !self.irq_up && self.irq_deferred.is_none() {
                    self.result(vec![st0::INVALID], false);
                    return None;
                } else {
                    (self.status0 & !0x07) | self.cur() as u8
                };
                self.set_irq(false);
                self.status0 = 0;
                self.result(vec![st0, pcn], false);
            }
            Command::Configure { config, pretrk } => {
                self.config = config;
                self.pretrk = pretrk;
                self.phase = Phase::Command(Vec::new());
            }
            Command::Version => self.result(vec![0x90], false),
            Command::PartId => self.result(vec![0x41], false),
            Command::Lock { lock } => {
                self.locked = lock;
                self.result(vec![(lock as u8) << 4], false);
            }
            Command::DumpReg => {
                let pcn = |n: usize| self.drive(n).map_or(0, |d| lock(&d).track);
                let bytes = vec![
                    pcn(0),
                    pcn(1),
                    0,
                    0,
                    self.specify[0],
                    self.specify[1],
                    self.eot,
                    (self.locked as u8) << 7 | (self.perpendicular & 0x7f),
                    self.config,
                    self.pretrk,
                ];
                self.result(bytes, false);
            }
            Command::Perpendicular { value } => {
                if value & 0x80 != 0 {
                    self.perpendicular = value & 0x7f;
                }
                self.phase = Phase::Command(Vec::new());
            }
            Command::PowerDown { value } => self.result(vec![value], false),
            Command::ReadId { drive, head } => {
                self.select(drive);
                let (t, h, s) = match self.drive(self.cur()) {
                    Some(d) => {
                        let mut d = lock(&d);
                        d.head = head;
                        (d.track, d.head, d.sect)
                    }
                    None => (0, head, 1),
                };
                let st0 = head << 2 | self.cur() as u8;
                self.result(vec![st0, 0, 0, t, h, s, 2], true);
            }
            Command::Data {
                op,
                mt,
                drive,
                at,
                eot,
                ..
            } => {
                let dir = match op {
                    DataOp::Read | DataOp::ReadTrack => Dir::Read,
                    DataOp::Write => Dir::Write,
                    DataOp::Verify => Dir::Verify,
                    // Deleted data and scans: not carried out (QEMU
                    // answers the same way).
                    _ => {
                        self.select(drive);
                        self.status0 = 0;
                        self.finish(st0::ABNORMAL | st0::SEEK_END, 0, 0, None);
                        return None;
                    }
                };
                self.select(drive);
                return self.data(dir, mt, at, eot);
            }
            Command::FormatTrack {
                drive,
                head,
                n,
                sectors,
                filler,
                ..
            } => {
                self.select(drive);
                return self.format(head, n, sectors, filler);
            }
        }
        None
    }

    /// DOR's drive select follows the command's (two drives here).
    fn select(&mut self, drive: u8) {
        self.dor = (self.dor & !dor::SEL) | (drive & dor::SEL);
    }

    /// The result of a data command: ST0 (with the drive, the head and
    /// what the transfer gathered), ST1, ST2 and the address `at` (or the
    /// drive's position). The one place that writes a data command's
    /// status.
    fn finish(&mut self, st0: u8, st1: u8, st2: u8, at: Option<(u8, u8, u8)>) {
        let cur = self.cur();
        let (h, t, s) = at.unwrap_or_else(|| match self.drive(cur) {
            Some(d) => {
                let d = lock(&d);
                (d.head, d.track, d.sect)
            }
            None => (0, 0, 1),
        });
        let st0 = (self.status0 | st0) & !0x07 | h << 2 | cur as u8;
        self.status0 = 0;
        self.result(vec![st0, st1, st2, t, h, s, 2], true);
    }

    fn finish_transfer(&mut self, t: &Transfer, st1: u8, st2: u8) {
        if let Some(d) = self.drive(t.drive) {
            let mut d = lock(&d);
            (d.head, d.track, d.sect) = t.end;
        }
        let abnormal = if st1 | st2 != 0 { st0::ABNORMAL } else { 0 };
        self.finish(t.st0 | abnormal, st1, st2, Some(t.end));
    }

    /// READ, WRITE or VERIFY DATA: the implied seek, then the sectors from
    /// R to EOT (and on head 1 with MT), each step as the drive moves on.
    fn data(&mut self, dir: Dir, mt: bool, at: Chrn, eot: u8) -> Option<FdcIo> {
        let cur = self.cur();
        self.status0 = 0;
        self.eot = eot;
        let Some(drv) = self.drive(cur) else {
            self.finish(st0::ABNORMAL, 0, 0, Some((at.h, at.c, at.r)));
            return None;
        };
        let mut d = lock(&drv);
        match d.seek(at.h & 1, at.c, at.r) {
            Seek::Done { moved } => {
                if moved {
                    self.status0 |= st0::SEEK_END;
                }
            }
            Seek::NoMedium | Seek::BadTrack => {
                drop(d);
                self.finish(st0::ABNORMAL, 0, 0, Some((at.h, at.c, at.r)));
                return None;
            }
            Seek::BadSector => {
                drop(d);
                self.finish(st0::ABNORMAL, st1::EN, 0, Some((at.h, at.c, at.r)));
                return None;
            }
        }
        let rate_ok = d.format().is_some_and(|f| f.rate == self.dsr & 3);
        if !rate_ok || at.n != 2 || eot < at.r {
            drop(d);
            let st1 = if at.n != 2 { st1::ND } else { st1::MA };
            self.finish(st0::ABNORMAL, st1, 0, Some((at.h, at.c, at.r)));
            return None;
        }
        if dir == Dir::Write && d.read_only() {
            drop(d);
            self.finish(st0::ABNORMAL, st1::NW, 0, Some((at.h, at.c, at.r)));
            return None;
        }
        let dma = self.dor & dor::DMAEN != 0;
        let mut want = (eot - at.r) as usize + 1 + if mt { eot as usize } else { 0 };
        if dma && dir != Dir::Verify {
            let left = lock(&self.dma).remaining(DMA_CHANNEL) / SECTOR;
            want = want.min(left);
        }
        let (mut h, mut t, mut s) = (d.head, d.track, d.sect);
        let mut lbas = Vec::with_capacity(want.min(2 * 255));
        let mut st0 = self.status0;
        let last = d.last_sect();
        let two_sided = d.heads() == 2;
        for i in 0..want {
            if t >= d.tracks() {
                break;
            }
            // The next sector, as the drive steps on.
            if i > 0 && !Self::step(&mut h, &mut t, &mut s, last, eot, mt, two_sided, &mut st0) {
                break;
            }
            if t >= d.tracks() {
                break;
            }
            lbas.push(d.lba(h, t, s));
        }
        // Non-DMA results name the last sector moved (QEMU); DMA ones the
        // sector after it, as the drive has stepped on.
        if dma && !lbas.is_empty() {
            Self::step(&mut h, &mut t, &mut s, last, eot, mt, two_sided, &mut st0);
        }
        drop(d);
        let tr = Transfer {
            dir,
            drive: cur,
            lbas,
            end: (h, t, s),
            dma,
            st0,
        };
        if dir == Dir::Verify {
            self.finish_transfer(&tr, 0, 0);
            return None;
        }
        if tr.lbas.is_empty() {
            // The DMA channel is not ready: the transfer overruns.
            self.finish_transfer(&tr, st1::OR, 0);
            return None;
        }
        self.begin(tr)
    }

    /// The drive's next sector after (h, t, s); false where a transfer
    /// ends (past the end of a track without multi-track).
    #[allow(clippy::too_many_arguments)]
    fn step(
        h: &mut u8,
        t: &mut u8,
        s: &mut u8,
        last: u8,
        eot: u8,
        mt: bool,
        two_sided: bool,
        st0: &mut u8,
    ) -> bool {
        if *s >= last || *s == eot {
            *s = 1;
            if mt && *h == 0 && two_sided {
                *h = 1;
                true
            } else {
                // Only a multi-track transfer goes on from head 1 to head 0
                // of the next track. Without MT the head stays: the
                // datasheet's result table gives C+1, H unchanged, R=1 for
                // a transfer that ends at EOT, and Linux counts the sectors
                // it moved from that H (a write that ended on head 1 and
                // answered H=0 counted as no sectors, retried for ever).
                if mt {
                    *h = 0;
                }
                *t = t.wrapping_add(1);
                *st0 |= st0::SEEK_END;
                mt && two_sided
            }
        } else {
            *s += 1;
            true
        }
    }

    /// FORMAT TRACK: the sector IDs arrive as data (ignored beyond their
    /// count), every sector of the track is filled with the filler byte.
    fn format(&mut self, head: u8, n: u8, sectors: u8, filler: u8) -> Option<FdcIo> {
        let cur = self.cur();
        self.status0 = 0;
        let Some(drv) = self.drive(cur) else {
            self.finish(st0::ABNORMAL, 0, 0, None);
            return None;
        };
        let d = lock(&drv);
        let track = d.track;
        let fits = d.format().is_some_and(|f| f.sectors == sectors) && n == 2;
        if d.medium().is_none() || d.read_only() || !fits || head >= d.heads() {
            let st1 = if d.medium().is_some() && d.read_only() {
                st1::NW
            } else {
                st1::MA
            };
            drop(d);
            self.finish(st0::ABNORMAL, st1, 0, None);
            return None;
        }
        let lbas = (1..=sectors).map(|s| d.lba(head, track, s)).collect();
        drop(d);
        let t = Transfer {
            dir: Dir::Format { filler },
            drive: cur,
            lbas,
            end: (head, track, 1),
            dma: self.dor & dor::DMAEN != 0,
            st0: 0,
        };
        if t.dma {
            // The four ID bytes per sector: taken from memory, not used.
            let mut ids = vec![0u8; sectors as usize * 4];
            lock(&self.dma).read_memory(DMA_CHANNEL, &mut ids);
            return self.start_io(t, Vec::new());
        }
        self.phase = Phase::DataOut {
            buf: vec![0; sectors as usize * 4],
            pos: 0,
            t,
        };
        None
    }

    /// A planned transfer starts: reads go to the medium; writes take their
    /// data from memory (DMA) or from the host through the FIFO first.
    fn begin(&mut self, t: Transfer) -> Option<FdcIo> {
        let len = t.lbas.len() * SECTOR;
        match (t.dir, t.dma) {
            (Dir::Write, true) => {
                let mut data = vec![0u8; len];
                let n = lock(&self.dma).read_memory(DMA_CHANNEL, &mut data);
                if n < len {
                    // Memory outside RAM: the transfer stops there.
                    self.finish_transfer(&t, st1::OR, 0);
                    return None;
                }
                self.start_io(t, data)
            }
            (Dir::Write, false) => {
                self.phase = Phase::DataOut {
                    buf: vec![0; len],
                    pos: 0,
                    t,
                };
                // Non-DMA: the host is asked for the data by interrupt.
                self.set_irq(true);
                None
            }
            _ => self.start_io(t, vec![0u8; len]),
        }
    }

    /// The first block request of a transfer.
    fn start_io(&mut self, t: Transfer, mut data: Vec<u8>) -> Option<FdcIo> {
        if let Dir::Format { filler } = t.dir {
            data = vec![filler; t.lbas.len() * SECTOR];
        }
        self.phase = Phase::Busy;
        self.next_io(Ticket {
            gen: self.gen,
            t,
            data,
            done: 0,
            run: 0,
        })
    }

    /// The request for the next run of consecutive sectors.
    fn next_io(&mut self, mut tk: Ticket) -> Option<FdcIo> {
        let backend = self
            .drive(tk.t.drive)
            .and_then(|d| lock(&d).medium().cloned());
        let Some(backend) = backend else {
            self.finish_transfer(&tk.t, st1::ND, 0);
            return None;
        };
        let first = tk.t.lbas[tk.done];
        let run = tk.t.lbas[tk.done..]
            .iter()
            .enumerate()
            .take_while(|&(i, &l)| l == first + i as u64)
            .count();
        tk.run = run;
        let range = tk.done * SECTOR..(tk.done + run) * SECTOR;
        let off = first * SECTOR as u64;
        let req = match tk.t.dir {
            Dir::Read => IoRequest::read(off, IoVecs::from_vec(vec![0u8; range.len()])),
            _ => IoRequest::write(off, IoVecs::from_vec(tk.data[range].to_vec()), false),
        };
        Some(FdcIo {
            backend,
            req,
            ticket: tk,
        })
    }

    /// A request of a transfer finished with `data` (what a read
    /// returned); the next request to submit, if any.
    pub fn complete(&mut self, mut tk: Ticket, ok: bool, data: Option<Vec<u8>>) -> Option<FdcIo> {
        if tk.gen != self.gen || !matches!(self.phase, Phase::Busy) {
            return None;
        }
        if !ok {
            // A medium error: data error (ST1 DE) with no data.
            self.finish_transfer(&tk.t, 0x20, 0x20);
            return None;
        }
        if let (Dir::Read, Some(d)) = (tk.t.dir, data) {
            let at = tk.done * SECTOR;
            let n = d.len().min(tk.data.len() - at);
            tk.data[at..at + n].copy_from_slice(&d[..n]);
        }
        tk.done += tk.run;
        if tk.done < tk.t.lbas.len() {
            return self.next_io(tk);
        }
        let Ticket { t, data, .. } = tk;
        match (t.dir, t.dma) {
            (Dir::Read, true) => {
                let n = lock(&self.dma).write_memory(DMA_CHANNEL, &data);
                let st1 = if n < data.len() { st1::OR } else { 0 };
                self.finish_transfer(&t, st1, 0);
            }
            (Dir::Read, false) => {
                self.phase = Phase::DataIn {
                    buf: data,
                    pos: 0,
                    t,
                };
                self.set_irq(true);
            }
            _ => self.finish_transfer(&t, 0, 0),
        }
        None
    }

    /// CMOS register 0x10: drive A's type in the high nibble, B's low.
    pub fn cmos_drive_types(&self) -> u8 {
        let code = |n: usize| self.drive(n).map_or(0, |d| lock(&d).cmos_code());
        code(0) << 4 | code(1)
    }
}

/// Submits `io`; its completion continues the transfer, no sooner than
/// the controller's interrupt latency after the submission (a transfer
/// that completes inline is deferred by [`FdcPorts`] instead).
pub fn run_io(fdc: &Arc<Mutex<Fdc>>, io: FdcIo) {
    let FdcIo {
        backend,
        req,
        ticket,
    } = io;
    let f = fdc.clone();
    let start = std::time::Instant::now();
    backend.submit(
        req,
        Box::new(move |req, r| {
            let data = req.iov.into_vec();
            let ok = r.is_ok();
            let finish = move |f: Arc<Mutex<Fdc>>| {
                let next = lock(&f).complete(ticket, ok, data);
                if let Some(io) = next {
                    run_io(&f, io);
                }
            };
            let wait = {
                let g = lock(&f);
                if g.in_access {
                    Duration::ZERO
                } else {
                    g.irq_latency.saturating_sub(start.elapsed())
                }
            };
            if wait.is_zero() {
                finish(f);
            } else {
                std::thread::spawn(move || {
                    std::thread::sleep(wait);
                    finish(f);
                });
            }
        }),
    );
}

/// The controller's ports: 0x3f0-0x3f5 (`base` 0) and 0x3f7 (`base` 7).
///
/// An interrupt the controller raises during a guest's access (a seek, a
/// reset, a transfer whose block I/O completed inside the access) reaches
/// the guest the controller's latency later ([`Fdc::set_irq_latency`]),
/// as on the chip, which takes milliseconds: SeaBIOS sends a command's last
/// byte with interrupts enabled, then clears its "interrupt seen" flag and
/// waits, so an interrupt taken at once would be lost and the wait time
/// out.
pub struct FdcPorts {
    pub fdc: Arc<Mutex<Fdc>>,
    pub base: u8,
}

impl FdcPorts {
    /// One guest access: `f` under the lock, the block I/O it started,
    /// then the interrupt it raised, delivered later.
    fn access(&mut self, f: impl FnOnce(&mut Fdc, u8) -> Vec<FdcIo>) {
        let ios = {
            let mut g = lock(&self.fdc);
            g.in_access = true;
            f(&mut g, self.base)
        };
        for io in ios {
            run_io(&self.fdc, io);
        }
        let start_timer = {
            let mut g = lock(&self.fdc);
            g.in_access = false;
            let start = g.irq_deferred.is_some() && !g.irq_timer;
            g.irq_timer |= start;
            start
        };
        if start_timer {
            let fdc = self.fdc.clone();
            std::thread::spawn(move || deliver_deferred(&fdc));
        }
    }
}

/// The timer thread of [`FdcPorts`]: delivers each deferred interrupt
/// once its latency has passed, until none is left.
fn deliver_deferred(fdc: &Arc<Mutex<Fdc>>) {
    loop {
        let wait = {
            let mut g = lock(fdc);
            match g.irq_deferred {
                None => {
                    g.irq_timer = false;
                    return;
                }
                Some(at) => {
                    let wait = g.irq_latency.saturating_sub(at.elapsed());
                    if wait.is_zero() {
                        g.irq_deferred = None;
                        g.set_irq(true);
                        g.irq_timer = false;
                        return;
                    }
                    wait
                }
            }
        };
        std::thread::sleep(wait);
    }
}

impl crate::bus::BusDevice for FdcPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.access(|f, base| {
            let mut ios = Vec::new();
            for (i, b) in data.iter_mut().enumerate() {
                let (v, io) = f.read(base + offset as u8 + i as u8);
                *b = v;
                ios.extend(io);
            }
            ios
        })
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.access(|f, base| {
            let mut ios = Vec::new();
            for (i, &b) in data.iter().enumerate() {
                ios.extend(f.write(base + offset as u8 + i as u8, b));
            }
            ios
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fdc::geometry::DriveType;
    use block::backend::BackendConfig;
    use block::graph::BlockGraph;
    use std::sync::atomic::{AtomicBool, Ordering};
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Line(AtomicBool);
    impl IrqLine for Line {
        fn set_level(&self, l: bool) {
            self.0.store(l, Ordering::SeqCst)
        }
    }

    /// A 1.44 MB image whose sector `n` is filled with `n as u8`.
    fn setup() -> (Fdc, Arc<Line>, Arc<Mutex<IsaDma>>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("strata-fdc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join(format!("fd-{:?}.img", std::thread::current().id()));
        let data: Vec<u8> = (0..2880u32).flat_map(|n| [n as u8; 512]).collect();
        std::fs::write(&img, data).unwrap();
        let g = BlockGraph::new();
        let n = g
            .blockdev_add_str(&format!(
                "driver=raw,node-name=fd,file.driver=file,file.filename={}",
                img.display()
            ))
            .unwrap();
        let b = BlockBackend::new("fd0", n, BackendConfig::default()).unwrap();
        let drive = Arc::new(Mutex::new(Drive::new(DriveType::Auto, Some(b)).unwrap()));
        let mem = crate::GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dma = Arc::new(Mutex::new(IsaDma::new(mem)));
        let line = Arc::new(Line::default());
        let mut f = Fdc::new([None, None], dma.clone(), line.clone());
        f.attach(0, drive).unwrap();
        (f, line, dma, img)
    }

    fn send(f: &mut Fdc, bytes: &[u8]) -> Option<FdcIo> {
        let mut io = None;
        for &b in bytes {
            assert_eq!(
                f.msr() & (msr::RQM | msr::DIO),
                msr::RQM,
                "ready for {b:#x}"
            );
            io = f.write(5, b);
        }
        io
    }

    /// Runs a transfer's requests to the end, synchronously.
    fn run(f: &mut Fdc, mut io: Option<FdcIo>) {
        while let Some(FdcIo {
            backend,
            req,
            ticket,
        }) = io.take()
        {
            let (tx, rx) = std::sync::mpsc::channel();
            backend.submit(
                req,
                Box::new(move |req, r| {
                    let _ = tx.send((r.is_ok(), req.iov.into_vec()));
                }),
            );
            let (ok, data) = rx.recv().unwrap();
            io = f.complete(ticket, ok, data);
        }
    }

    fn results(f: &mut Fdc, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                assert_eq!(f.msr() & (msr::RQM | msr::DIO), msr::RQM | msr::DIO);
                f.read(5).0
            })
            .collect()
    }

    #[test]
    fn reset_seek_and_sense_interrupt() {
        let (mut f, line, _, _) = setup();
        assert_eq!(results(&mut f, 0), Vec::<u8>::new());
        f.write(2, 0x08); // reset asserted
        f.write(2, 0x0c); // and released: interrupt, four SENSE INTs
        assert!(line.0.load(Ordering::SeqCst));
        for n in 0..4 {
            send(&mut f, &[command::op::SENSE_INTERRUPT]);
            assert_eq!(results(&mut f, 2), vec![0xc0 | n, 0]);
        }
        send(&mut f, &[command::op::SENSE_INTERRUPT]);
        assert_eq!(results(&mut f, 1), vec![0x80], "nothing pending");
        send(&mut f, &[command::op::SEEK, 0, 5]);
        assert!(line.0.load(Ordering::SeqCst));
        send(&mut f, &[command::op::SENSE_INTERRUPT]);
        assert_eq!(results(&mut f, 2), vec![0x20, 5]);
        assert!(!line.0.load(Ordering::SeqCst));
        assert_eq!(f.read(7).0 & 0x80, 0, "the step cleared the change line");
    }

    /// READ DATA by DMA into memory (results name the next sector), then
    /// by the FIFO (results name the last sector read), then WRITE DATA by
    /// DMA, checked in the image.
    #[test]
    fn read_and_write_by_dma_and_fifo() {
        let (mut f, _, dma, img) = setup();
        let program = |dma: &Arc<Mutex<IsaDma>>, mode: u8, len: u16| {
            let mut c = crate::legacy::isa_dma::Dma1(dma.clone());
            let mut p = crate::legacy::isa_dma::DmaPages(dma.clone());
            use crate::bus::BusDevice;
            c.write(0xc, &[0]);
            c.write(0xb, &[mode | 2]);
            c.write(4, &[0x00]);
            c.write(4, &[0x20]);
            p.write(1, &[0]);
            c.write(5, &[(len - 1) as u8]);
            c.write(5, &[((len - 1) >> 8) as u8]);
            c.write(0xa, &[2]);
        };
        // Track 1, head 0, sectors 3-4: LBAs 38 and 39.
        program(&dma, 0x44, 1024);
        let io = send(&mut f, &[0xe6, 0, 1, 0, 3, 2, 18, 0x1b, 0xff]);
        run(&mut f, io);
        assert_eq!(results(&mut f, 7), vec![0x20, 0, 0, 1, 0, 5, 2]);
        let mut m = [0u8; 1024];
        dma.lock().unwrap().read_memory_at(0x2000, &mut m);
        assert!(m[..512].iter().all(|&b| b == 38) && m[512..].iter().all(|&b| b == 39));
        // Non-DMA, one sector on each head (MT, EOT 1) of track 0.
        f.write(2, 0x04);
        let io = send(&mut f, &[0xe6, 0, 0, 0, 1, 2, 1, 0x1b, 0xff]);
        run(&mut f, io);
        let mut got = Vec::new();
        while f.msr() & msr::NDMA != 0 {
            got.push(f.read(5).0);
        }
        assert_eq!(got.len(), 1024);
        assert!(got[..512].iter().all(|&b| b == 0) && got[512..].iter().all(|&b| b == 18));
        assert_eq!(results(&mut f, 7), vec![0x24, 0, 0, 0, 1, 1, 2]);
        // WRITE DATA by DMA: sector 1 of track 2 (LBA 72) from memory.
        f.write(2, 0x0c);
        program(&dma, 0x48, 512);
        let io = send(&mut f, &[0xc5, 0, 2, 0, 1, 2, 18, 0x1b, 0xff]);
        run(&mut f, io);
        assert_eq!(results(&mut f, 7)[0] & 0xc0, 0, "normal termination");
        let image = std::fs::read(&img).unwrap();
        assert!(image[72 * 512..73 * 512].iter().all(|&b| b == 38));
    }

    /// Without MT a transfer that ends at EOT names the next track on the
    /// same head (datasheet result table: C+1, H unchanged, R=1); with MT,
    /// head 1 goes on to head 0 of the next track.
    #[test]
    fn end_of_track_keeps_the_head_without_multitrack() {
        let (mut f, _, dma, img) = setup();
        let program = |dma: &Arc<Mutex<IsaDma>>, mode: u8, len: u16| {
            let mut c = crate::legacy::isa_dma::Dma1(dma.clone());
            use crate::bus::BusDevice;
            c.write(0xc, &[0]);
            c.write(0xb, &[mode | 2]);
            c.write(4, &[0x00]);
            c.write(4, &[0x20]);
            c.write(5, &[(len - 1) as u8]);
            c.write(5, &[((len - 1) >> 8) as u8]);
            c.write(0xa, &[2]);
        };
        // WRITE DATA (MT clear, as Linux sends it) of head 1, track 0,
        // sectors 17-18: LBAs 34 and 35 take memory's bytes (zeroes).
        program(&dma, 0x48, 1024);
        let io = send(&mut f, &[0x45, 0x04, 0, 1, 17, 2, 18, 0x1b, 0xff]);
        run(&mut f, io);
        let r = results(&mut f, 7);
        assert_eq!(r[0] & 0xc4, 0x04, "normal termination on head 1: {r:?}");
        assert_eq!(&r[3..], &[1, 1, 1, 2], "C+1, H unchanged, R 1");
        let image = std::fs::read(&img).unwrap();
        assert!(image[34 * 512..36 * 512].iter().all(|&b| b == 0));
        assert!(image[36 * 512..37 * 512].iter().all(|&b| b == 36));
        // READ DATA with MT from the same place: head 0 of track 1 next.
        program(&dma, 0x44, 1024);
        let io = send(&mut f, &[0xe6, 0x04, 0, 1, 17, 2, 18, 0x1b, 0xff]);
        run(&mut f, io);
        assert_eq!(&results(&mut f, 7)[3..], &[1, 0, 1, 2]);
    }
}
