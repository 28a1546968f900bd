//! One IDE channel: two device positions (master, slave), the shared
//! command and control blocks, the interrupt line, and the channel's
//! bus-master DMA engine: the PIIX transport of [`crate::ata::AtaDevice`].
//! The device parses and executes a command into an
//! [`crate::ata::Outcome`]; the channel carries it out by PIO or
//! DMA and decides the status byte (`Channel::finish`).
//!
//! Protocols follow ATA8-ACS and ATA/ATAPI-6 chapter 9 (the PIO data-in,
//! PIO data-out, non-data, DMA and PACKET protocols) and SFF-8038i for DMA:
//! - Register writes reach both devices; reads and commands go to the
//!   device selected by DEV. An absent device reads as 0 (as QEMU's).
//! - Status reads clear the pending interrupt; alternate status does not.
//!   INTRQ is asserted while an interrupt is pending and nIEN is clear.
//! - SRST (device control bit 2) resets both devices, which then show their
//!   signature (ATA 00h/00h, ATAPI 14h/EBh in LBA mid/high).
//! - PIO data moves through the data register in any access width: a
//!   string I/O exit may carry a whole sector.
//!
//! No disk I/O blocks the vCPU thread: every transfer is asynchronous
//! (BlockBackend::submit; the completion on an I/O thread sets the status
//! and raises the interrupt): READ/WRITE DMA (+EXT, FUA), DATA SET
//! MANAGEMENT (TRIM), FLUSH CACHE (+EXT), ATAPI READ(10)/(12) by DMA, and
//! by PIO one DRQ block (READ/WRITE SECTORS and MULTIPLE (+EXT)) or one
//! ATAPI chunk at a time, with BSY set until its data is read or written,
//! as on a real drive. Bus-master transfers move in chunks of at most
//! [`MAX_BOUNCE`] bytes (TRIM payloads in 64 KiB pieces), each through its
//! own host buffer: a chunk's completion starts the next one, the last one
//! ends the command, so host memory per request stays bounded whatever PRD
//! table the guest builds. Stopping the bus master while a DMA transfer's
//! I/O is in flight lets it complete, every remaining chunk included
//! (status, interrupt, then "active" cleared), as QEMU's
//! `ide_cancel_dma_sync` does, without the vCPU waiting for it.

use std::sync::{Arc, Mutex};

use block::backend::BlockBackend;
use block::driver::IoRequest;
use block::error::BlockError;
use block::iov::IoVecs;

use super::bmdma::{self, BmRegs, SgList};
use crate::ata::device::{AtaDevice, DriveConfig, Outcome, DIAG_OK, SECTOR};
use crate::ata::{error, status, Taskfile, Xfer};
use crate::bus::lock;
use crate::dma::MAX_BOUNCE;
use crate::irq::IrqLine;
use crate::scsi::{CdRom, Lun, Plan, Sense};
use crate::GuestMem;

/// Device control register bits.
const CTRL_NIEN: u8 = 0x02;
const CTRL_SRST: u8 = 0x04;
const CTRL_HOB: u8 = 0x80;

/// ATAPI interrupt reason (sector count register) bits.
const REASON_COD: u8 = 0x01;
const REASON_IO: u8 = 0x02;

enum AtapiSrc {
    Buf(Vec<u8>, usize),
    Medium(u64),
}

enum AfterIn {
    Done,
    Sectors { lba: u64, left: u32, per_block: u32 },
    Atapi { src: AtapiSrc, left: u64 },
}

enum AfterOut {
    Sectors {
        lba: u64,
        left: u32,
        per_block: u32,
        fua: bool,
    },
    Packet,
}

enum Pio {
    Idle,
    In {
        buf: Vec<u8>,
        pos: usize,
        then: AfterIn,
    },
    Out {
        buf: Vec<u8>,
        pos: usize,
        then: AfterOut,
    },
}

/// A device position of the channel: the ATA device and the registers
/// the PIIX transport keeps for it.
pub struct Drive {
    dev: AtaDevice,
    tf: Taskfile,
    status: u8,
    error: u8,
    pio: Pio,
    /// Byte count limit and DMA flag of the current PACKET command.
    bcl: u16,
    packet_dma: bool,
}

impl Drive {
    pub fn new(cfg: DriveConfig, index: u32, slave: bool) -> Result<Drive, String> {
        let mut d = Drive {
            dev: AtaDevice::new(cfg, index, slave)?,
            tf: Taskfile::default(),
            status: 0,
            error: 0,
            pio: Pio::Idle,
            bcl: 0,
            packet_dma: false,
        };
        d.reset();
        Ok(d)
    }

    pub fn device(&self) -> &AtaDevice {
        &self.dev
    }

    pub fn device_mut(&mut self) -> &mut AtaDevice {
        &mut self.dev
    }

    pub fn is_atapi(&self) -> bool {
        self.dev.is_atapi()
    }

    pub fn cdrom(&self) -> Option<&CdRom> {
        self.dev.cdrom()
    }

    fn disk(&self) -> Option<&Arc<BlockBackend>> {
        self.dev.disk()
    }

    /// The state after power-on, SRST or DEVICE RESET: the signature in the
    /// taskfile, diagnostic code 01h (no error), ATAPI devices not ready.
    fn reset(&mut self) {
        self.dev.reset(&mut self.tf);
        self.reset_registers();
    }

    /// The transport's part of a reset (the device has done its own).
    fn reset_registers(&mut self) {
        self.pio = Pio::Idle;
        self.error = DIAG_OK;
        self.status = if self.is_atapi() {
            0
        } else {
            status::DRDY | status::DSC
        };
    }
}

/// A DMA transfer waiting for (or running under) the bus master.
enum DmaJob {
    DiskRead { lba: u64, count: u32 },
    DiskWrite { lba: u64, count: u32, fua: bool },
    Trim { blocks: u16 },
    AtapiData(Vec<u8>),
    AtapiRead { offset: u64, len: u64 },
}

impl DmaJob {
    fn bytes(&self) -> usize {
        match self {
            DmaJob::DiskRead { count, .. } | DmaJob::DiskWrite { count, .. } => {
                *count as usize * SECTOR as usize
            }
            DmaJob::Trim { blocks } => *blocks as usize * SECTOR as usize,
            DmaJob::AtapiData(v) => v.len(),
            DmaJob::AtapiRead { len, .. } => *len as usize,
        }
    }
}

/// Which way a chunked bus-master transfer moves data.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RunDir {
    DiskRead,
    DiskWrite {
        fua: bool,
    },
    AtapiRead,
    /// DATA SET MANAGEMENT: the payload is a list of ranges to discard.
    Trim,
}

/// The TRIM payload bytes read (and ranges discarded) per step: 8192
/// ranges.
const TRIM_PIECE: usize = 64 << 10;

/// A disk or medium transfer by bus-master DMA, carried out in chunks of
/// at most [`MAX_BOUNCE`] bytes through one host buffer per chunk: each
/// chunk's completion (on an I/O thread) starts the next, the last one
/// ends the command. Host memory per request stays bounded whatever PRD
/// table the guest builds.
pub struct DmaRun {
    backend: Arc<BlockBackend>,
    sg: SgList,
    dir: RunDir,
    /// Byte offset on the disk or medium where the transfer starts.
    base: u64,
    /// Bytes to move: the list's whole sectors for a disk, all of it for
    /// a medium read.
    total: usize,
    /// Bytes moved so far.
    done: usize,
    /// Length of the chunk in flight.
    chunk: usize,
}

/// What to do when asynchronous I/O completes.
pub enum Pending {
    /// A chunk of a bus-master disk or medium transfer.
    Dma(DmaRun),
    Flush,
    /// A PIO data-in block of a disk read is read: offer it (DRQ).
    PioRead {
        lba: u64,
        left: u32,
        per_block: u32,
    },
    /// A PIO data-out block at `lba` is written: the next block, or done.
    PioWrite {
        lba: u64,
        next: u64,
        left: u32,
        per_block: u32,
        fua: bool,
    },
    /// A PIO chunk of a packet command's medium read is read; `next` and
    /// `left` describe what follows it.
    AtapiPio {
        next: u64,
        left: u64,
    },
}

/// Asynchronous I/O to start once the channel lock is released.
pub struct Io {
    backend: Arc<BlockBackend>,
    reqs: Vec<IoRequest>,
    gen: u64,
    drive: usize,
    pending: Pending,
}

pub struct Channel {
    drives: [Option<Drive>; 2],
    cur: usize,
    ctrl: u8,
    irq_pending: bool,
    irq: Arc<dyn IrqLine>,
    mem: GuestMem,
    pub bm: BmRegs,
    dma: Option<(usize, DmaJob)>,
    /// Bumped whenever in-flight I/O must be forgotten (reset).
    gen: u64,
    inflight: bool,
    /// The in-flight I/O is a bus-master transfer (not PIO or a flush).
    dma_inflight: bool,
}

impl Channel {
    pub fn new(mem: GuestMem, irq: Arc<dyn IrqLine>) -> Self {
        Channel {
            drives: [None, None],
            cur: 0,
            ctrl: 0,
            irq_pending: false,
            irq,
            mem,
            bm: BmRegs::default(),
            dma: None,
            gen: 0,
            inflight: false,
            dma_inflight: false,
        }
    }

    pub fn attach(&mut self, unit: usize, drive: Drive) -> Result<(), String> {
        match self.drives.get_mut(unit) {
            Some(slot @ None) => {
                *slot = Some(drive);
                Ok(())
            }
            Some(Some(_)) => Err(format!("unit {unit} is already in use")),
            None => Err(format!("unit {unit} does not exist (0 or 1)")),
        }
    }

    pub fn drive(&self, unit: usize) -> Option<&Drive> {
        self.drives.get(unit)?.as_ref()
    }

    pub fn drive_mut(&mut self, unit: usize) -> Option<&mut Drive> {
        self.drives.get_mut(unit)?.as_mut()
    }

    fn update_irq(&self) {
        self.irq
            .set_level(self.irq_pending && self.ctrl & CTRL_NIEN == 0);
    }

    /// The device asserts its interrupt; the bus master latches it in its
    /// status register (SFF-8038i 2.1.2, "Interrupt").
    fn raise(&mut self) {
        self.irq_pending = true;
        self.bm.status |= bmdma::STATUS_INTERRUPT;
        self.update_irq();
    }

    fn lower(&mut self) {
        self.irq_pending = false;
        self.update_irq();
    }

    fn cur(&mut self) -> Option<&mut Drive> {
        self.drives[self.cur].as_mut()
    }

    // ---- register block -------------------------------------------------

    /// Read of the command block at `reg` (0..=7).
    pub fn read(&mut self, reg: u64, data: &mut [u8]) -> Option<Io> {
        if reg == 0 {
            return self.data_read(data);
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_reg(reg + i as u64);
        }
        None
    }

    fn read_reg(&mut self, reg: u64) -> u8 {
        let hob = self.ctrl & CTRL_HOB != 0;
        let Some(d) = self.drives[self.cur].as_ref() else {
            return 0;
        };
        let tf = &d.tf;
        match reg {
            1 if hob => tf.hob_feature,
            1 => d.error,
            2 if hob => tf.hob_nsector,
            2 => tf.nsector,
            3 if hob => tf.hob_sector,
            3 => tf.sector,
            4 if hob => tf.hob_lcyl,
            4 => tf.lcyl,
            5 if hob => tf.hob_hcyl,
            5 => tf.hcyl,
            6 => tf.select,
            7 => {
                let s = d.status;
                self.lower();
                s
            }
            _ => 0xff,
        }
    }

    /// Alternate status (control block): no side effects.
    pub fn alt_status(&self) -> u8 {
        self.drives[self.cur].as_ref().map_or(0, |d| d.status)
    }

    pub fn write(&mut self, reg: u64, data: &[u8]) -> Option<Io> {
        if reg == 0 {
            return self.data_write(data);
        }
        let mut io = None;
        for (i, &v) in data.iter().enumerate() {
            if let Some(x) = self.write_reg(reg + i as u64, v) {
                io = Some(x);
            }
        }
        io
    }

    fn write_reg(&mut self, reg: u64, v: u8) -> Option<Io> {
        if reg == 7 {
            return self.command(v);
        }
        // Any taskfile write clears HOB (ATA8-ACS 6.2.6).
        self.ctrl &= !CTRL_HOB;
        for d in self.drives.iter_mut().flatten() {
            let tf = &mut d.tf;
            match reg {
                1 => {
                    tf.hob_feature = tf.feature;
                    tf.feature = v;
                }
                2 => {
                    tf.hob_nsector = tf.nsector;
                    tf.nsector = v;
                }
                3 => {
                    tf.hob_sector = tf.sector;
                    tf.sector = v;
                }
                4 => {
                    tf.hob_lcyl = tf.lcyl;
                    tf.lcyl = v;
                }
                5 => {
                    tf.hob_hcyl = tf.hcyl;
                    tf.hcyl = v;
                }
                // Bits 7 and 5 are obsolete and read as one.
                6 => tf.select = v | 0xa0,
                _ => {}
            }
        }
        if reg == 6 {
            self.cur = ((v >> 4) & 1) as usize;
        }
        None
    }

    /// Device control register.
    pub fn control(&mut self, v: u8) {
        let was = self.ctrl;
        self.ctrl = v;
        if v & CTRL_SRST != 0 && was & CTRL_SRST == 0 {
            self.gen += 1;
            self.inflight = false;
            self.dma_inflight = false;
            self.dma = None;
            for d in self.drives.iter_mut().flatten() {
                d.pio = Pio::Idle;
                d.status = status::BSY | status::DSC;
            }
        } else if v & CTRL_SRST == 0 && was & CTRL_SRST != 0 {
            for d in self.drives.iter_mut().flatten() {
                d.reset();
            }
            self.cur = 0;
            self.irq_pending = false;
        }
        self.update_irq();
    }

    // ---- PIO data -------------------------------------------------------

    fn data_read(&mut self, data: &mut [u8]) -> Option<Io> {
        data.fill(0);
        let d = self.cur()?;
        let Pio::In { buf, pos, .. } = &mut d.pio else {
            return None;
        };
        let n = data.len().min(buf.len() - *pos);
        data[..n].copy_from_slice(&buf[*pos..*pos + n]);
        *pos += n;
        if *pos < buf.len() {
            return None;
        }
        let Pio::In { then, .. } = std::mem::replace(&mut d.pio, Pio::Idle) else {
            return None;
        };
        match then {
            AfterIn::Done => {
                d.status = status::DRDY | status::DSC;
                None
            }
            AfterIn::Sectors {
                lba,
                left,
                per_block,
            } => self.pio_read_block(lba, left, per_block),
            AfterIn::Atapi { src, left } => {
                if left == 0 {
                    self.atapi_ok();
                    None
                } else {
                    self.atapi_chunk(src, left)
                }
            }
        }
    }

    fn data_write(&mut self, data: &[u8]) -> Option<Io> {
        let d = self.cur()?;
        let Pio::Out { buf, pos, .. } = &mut d.pio else {
            return None;
        };
        let n = data.len().min(buf.len() - *pos);
        buf[*pos..*pos + n].copy_from_slice(&data[..n]);
        *pos += n;
        if *pos < buf.len() {
            return None;
        }
        let Pio::Out { buf, then, .. } = std::mem::replace(&mut d.pio, Pio::Idle) else {
            return None;
        };
        match then {
            AfterOut::Sectors {
                lba,
                left,
                per_block,
                fua,
            } => {
                // Written asynchronously; BSY until then (the vCPU does
                // not wait for the disk).
                let backend = d.disk()?.clone();
                let next = lba + buf.len() as u64 / SECTOR;
                d.status = status::BSY | status::DRDY | status::DSC;
                let req = IoRequest::write(lba * SECTOR, IoVecs::from_vec(buf), fua);
                self.inflight = true;
                Some(Io {
                    backend,
                    reqs: vec![req],
                    gen: self.gen,
                    drive: self.cur,
                    pending: Pending::PioWrite {
                        lba,
                        next,
                        left,
                        per_block,
                        fua,
                    },
                })
            }
            AfterOut::Packet => {
                let mut cdb = [0u8; 12];
                cdb.copy_from_slice(&buf[..12]);
                self.atapi_packet(cdb)
            }
        }
    }

    /// Starts the next PIO data-in block of a disk read: asynchronous, BSY
    /// until the data is there (then DRQ and an interrupt).
    fn pio_read_block(&mut self, lba: u64, left: u32, per_block: u32) -> Option<Io> {
        let (unit, gen) = (self.cur, self.gen);
        let d = self.cur()?;
        let backend = d.disk()?.clone();
        let n = left.min(per_block);
        d.pio = Pio::Idle;
        d.status = status::BSY | status::DRDY | status::DSC;
        self.inflight = true;
        let req = IoRequest::read(
            lba * SECTOR,
            IoVecs::from_vec(vec![0u8; n as usize * SECTOR as usize]),
        );
        Some(Io {
            backend,
            reqs: vec![req],
            gen,
            drive: unit,
            pending: Pending::PioRead {
                lba,
                left,
                per_block,
            },
        })
    }

    /// A PIO data-in block has been read: offer it.
    fn pio_read_done(&mut self, lba: u64, left: u32, per_block: u32, buf: Vec<u8>) {
        let Some(d) = self.cur() else { return };
        let n = left.min(per_block);
        d.pio = Pio::In {
            buf,
            pos: 0,
            then: if left > n {
                AfterIn::Sectors {
                    lba: lba + n as u64,
                    left: left - n,
                    per_block,
                }
            } else {
                AfterIn::Done
            },
        };
        d.status = status::DRDY | status::DSC | status::DRQ;
        self.raise();
    }

    /// Opens the next PIO data-out block of a disk write (the caller raises
    /// the interrupt for every block but the first).
    fn pio_write_block(&mut self, lba: u64, left: u32, per_block: u32, fua: bool) {
        let Some(d) = self.cur() else { return };
        let n = left.min(per_block);
        d.pio = Pio::Out {
            buf: vec![0u8; n as usize * SECTOR as usize],
            pos: 0,
            then: AfterOut::Sectors {
                lba,
                left: left - n,
                per_block,
                fua,
            },
        };
        d.status = status::DRDY | status::DSC | status::DRQ;
    }

    /// Starts PIO data-in of a buffer that is ready (IDENTIFY, SMART).
    fn pio_in(&mut self, buf: Vec<u8>) {
        let Some(d) = self.cur() else { return };
        d.pio = Pio::In {
            buf,
            pos: 0,
            then: AfterIn::Done,
        };
        d.status = status::DRDY | status::DSC | status::DRQ;
        self.raise();
    }

    // ---- completion -----------------------------------------------------

    /// Ends the current command: the status and error registers (and the
    /// interrupt reason of a packet command) as ATA8-ACS's protocols leave
    /// them, then the interrupt. Every command that completes goes through
    /// here.
    fn finish(&mut self, end: End) {
        if let Some(d) = self.cur() {
            let (status, error) = match end {
                End::Ok => (status::DRDY | status::DSC, 0),
                End::Error { error, lba } => {
                    if let Some(l) = lba {
                        let ext = l > 0x0fff_ffff;
                        d.tf.set_lba(l, ext);
                    }
                    (status::DRDY | status::DSC | status::ERR, error)
                }
                End::PacketOk => (status::DRDY | status::DSC, 0),
                // CHECK CONDITION: the sense key in the error register's
                // high nibble (ATA8-ACS 7.18.5 PACKET error outputs).
                End::PacketCheck(s) => (status::DRDY | status::ERR, s.key << 4),
            };
            if !matches!(end, End::Ok | End::PacketOk) {
                d.pio = Pio::Idle;
            }
            if matches!(end, End::PacketOk | End::PacketCheck(_)) {
                d.tf.nsector = (d.tf.nsector & !7) | REASON_IO | REASON_COD;
            }
            d.status = status;
            d.error = error;
        }
        self.raise();
    }

    /// Successful completion of a command.
    fn done(&mut self) {
        self.finish(End::Ok);
    }

    /// Completion with an error: ERR in status, `err` in the error
    /// register, and the failing LBA in the taskfile when there is one.
    fn fail(&mut self, err: u8, lba: Option<u64>) {
        self.finish(End::Error { error: err, lba });
    }

    // ---- commands -------------------------------------------------------

    fn command(&mut self, opcode: u8) -> Option<Io> {
        let d = self.drives[self.cur].as_mut()?;
        if d.status & status::BSY != 0 {
            return None; // ignored while busy (ATA8-ACS 6.2.11.1)
        }
        d.pio = Pio::Idle;
        // A new command replaces a DMA that was never started.
        if self.dma.as_ref().is_some_and(|(u, _)| *u == self.cur) && !self.inflight {
            self.dma = None;
        }
        let d = self.drives[self.cur].as_mut()?;
        let outcome = d.dev.command(opcode, &mut d.tf);
        self.carry_out(outcome)
    }

    /// Carries out what the device asks for: PIO, bus-master DMA or a
    /// flush, and the status and interrupt of the protocol.
    fn carry_out(&mut self, outcome: Outcome) -> Option<Io> {
        let unit = self.cur;
        match outcome {
            Outcome::Done => self.done(),
            Outcome::Fail { error, lba } => self.fail(error, lba),
            Outcome::DataIn(buf) => self.pio_in(buf),
            Outcome::Packet { dma } => {
                let d = self.cur()?;
                d.bcl = (d.tf.hcyl as u16) << 8 | d.tf.lcyl as u16;
                d.packet_dma = dma;
                d.tf.nsector = (d.tf.nsector & !7) | REASON_COD;
                d.pio = Pio::Out {
                    buf: vec![0u8; 12],
                    pos: 0,
                    then: AfterOut::Packet,
                };
                // No interrupt: IDENTIFY PACKET word 0 announces DRQ within
                // 50 us of the command.
                d.status = status::DRDY | status::DSC | status::DRQ;
            }
            Outcome::Reset { diagnostic } => {
                self.cur()?.reset_registers();
                if diagnostic {
                    // The device register is shared: DEV = 0 selects
                    // device 0 on the channel, which reports the result
                    // (its device register reads A0h as well). Without a
                    // device 0 the reporting one stays selected.
                    for d in self.drives.iter_mut().flatten() {
                        d.tf.select = 0xa0;
                    }
                    if self.drives[0].is_some() {
                        self.cur = 0;
                    }
                    self.raise();
                }
            }
            Outcome::Read { lba, count, xfer } => {
                if xfer == Xfer::Dma {
                    return self.queue_dma(unit, DmaJob::DiskRead { lba, count });
                }
                let per_block = self.cur()?.dev.drq_block(xfer);
                return self.pio_read_block(lba, count, per_block);
            }
            Outcome::Write {
                lba,
                count,
                xfer,
                fua,
            } => {
                if xfer == Xfer::Dma {
                    return self.queue_dma(unit, DmaJob::DiskWrite { lba, count, fua });
                }
                let per_block = self.cur()?.dev.drq_block(xfer);
                self.pio_write_block(lba, count, per_block, fua);
            }
            Outcome::Flush => {
                let d = self.cur()?;
                let backend = d.disk()?.clone();
                d.status = status::BSY | status::DRDY | status::DSC;
                self.inflight = true;
                return Some(Io {
                    backend,
                    reqs: vec![IoRequest::flush()],
                    gen: self.gen,
                    drive: unit,
                    pending: Pending::Flush,
                });
            }
            Outcome::Trim { blocks } => return self.queue_dma(unit, DmaJob::Trim { blocks }),
        }
        None
    }

    // ---- ATAPI ----------------------------------------------------------

    fn atapi_packet(&mut self, cdb: [u8; 12]) -> Option<Io> {
        let unit = self.cur;
        let d = self.cur()?;
        let dma = d.packet_dma;
        let plan = d.cdrom()?.execute(&cdb);
        match plan {
            Plan::Good => self.atapi_ok(),
            Plan::Check(s) => self.atapi_error(s),
            Plan::DataIn(v) if v.is_empty() => self.atapi_ok(),
            Plan::DataIn(v) if dma => return self.queue_dma(unit, DmaJob::AtapiData(v)),
            Plan::DataIn(v) => {
                let len = v.len() as u64;
                return self.atapi_chunk(AtapiSrc::Buf(v, 0), len);
            }
            Plan::Read { offset, len } if dma => {
                return self.queue_dma(unit, DmaJob::AtapiRead { offset, len })
            }
            Plan::Read { offset, len } => return self.atapi_chunk(AtapiSrc::Medium(offset), len),
            // A CD-ROM plans no writes, flushes or parameter lists; this
            // engine carries none of them out.
            _ => self.atapi_error(Sense::INVALID_OPCODE),
        }
        None
    }

    /// The next PIO data-in chunk of a packet command, at most the byte
    /// count limit the host gave (even unless it is the last chunk). Medium
    /// reads are asynchronous (BSY until the data is there).
    fn atapi_chunk(&mut self, src: AtapiSrc, left: u64) -> Option<Io> {
        let (unit, gen) = (self.cur, self.gen);
        let d = self.cur()?;
        let bcl = match d.bcl {
            0 | 0xffff => 0xfffe,
            b => b,
        } as u64;
        let mut n = left.min(bcl);
        if n < left {
            n &= !1;
        }
        match src {
            AtapiSrc::Buf(v, pos) => {
                let end = (pos + n as usize).min(v.len());
                let buf = v[pos..end].to_vec();
                self.atapi_data_in(buf, AtapiSrc::Buf(v, end), left - n);
                None
            }
            AtapiSrc::Medium(off) => {
                let cd = d.cdrom()?;
                let Some(m) = cd.medium() else {
                    let s = cd.read_failed();
                    self.atapi_error(s);
                    return None;
                };
                d.pio = Pio::Idle;
                d.status = status::BSY | status::DRDY | status::DSC;
                self.inflight = true;
                let req = IoRequest::read(off, IoVecs::from_vec(vec![0u8; n as usize]));
                Some(Io {
                    backend: m,
                    reqs: vec![req],
                    gen,
                    drive: unit,
                    pending: Pending::AtapiPio {
                        next: off + n,
                        left: left - n,
                    },
                })
            }
        }
    }

    /// Offer one chunk of packet data-in (byte count in the cylinder
    /// registers, I/O reason), DRQ and an interrupt.
    fn atapi_data_in(&mut self, buf: Vec<u8>, next: AtapiSrc, left: u64) {
        let Some(d) = self.cur() else { return };
        let n = buf.len() as u64;
        d.tf.lcyl = n as u8;
        d.tf.hcyl = (n >> 8) as u8;
        d.tf.nsector = (d.tf.nsector & !7) | REASON_IO;
        d.pio = Pio::In {
            buf,
            pos: 0,
            then: AfterIn::Atapi { src: next, left },
        };
        d.status = status::DRDY | status::DSC | status::DRQ;
        self.raise();
    }

    fn atapi_ok(&mut self) {
        self.finish(End::PacketOk);
    }

    fn atapi_error(&mut self, s: Sense) {
        self.finish(End::PacketCheck(s));
    }

    // ---- bus-master DMA ---------------------------------------------------

    /// Records a DMA transfer; it runs as soon as the bus master is started
    /// (the host may start it before or after the command).
    fn queue_dma(&mut self, unit: usize, job: DmaJob) -> Option<Io> {
        if let Some(d) = self.drives[unit].as_mut() {
            d.status = status::DRDY | status::DSC | status::DRQ;
        }
        self.dma = Some((unit, job));
        self.start_dma()
    }

    /// Bus-master register access (offset 0..8 within the channel's part).
    pub fn bm_read(&self, off: u64) -> u8 {
        match off {
            0 => self.bm.cmd,
            2 => self.bm.status,
            4..=7 => (self.bm.prd_addr >> (8 * (off - 4))) as u8,
            _ => 0,
        }
    }

    pub fn bm_write(&mut self, off: u64, v: u8) -> Option<Io> {
        match off {
            0 => {
                let was = self.bm.cmd;
                self.bm.cmd = v & (bmdma::CMD_START | bmdma::CMD_WRITE_TO_MEMORY);
                if v & bmdma::CMD_START != 0 && was & bmdma::CMD_START == 0 {
                    self.bm.status |= bmdma::STATUS_ACTIVE;
                    return self.start_dma();
                }
                if v & bmdma::CMD_START == 0 && was & bmdma::CMD_START != 0 {
                    // A transfer whose I/O is in flight cannot be cut
                    // short: part of it may have reached the disk. As
                    // QEMU (ide_cancel_dma_sync), it completes as if it
                    // had ended before the stop: the command's status
                    // and interrupt, and "active" cleared with the
                    // completion (`dma_finish`), so the guest sees the
                    // same result whenever the I/O ends. Until then the
                    // device is BSY and the engine active; the vCPU does
                    // not wait for the disk. Otherwise the engine just
                    // goes inactive (SFF-8038i 2.1.1).
                    if !self.dma_inflight {
                        self.bm.status &= !bmdma::STATUS_ACTIVE;
                    }
                }
            }
            2 => {
                let keep = self.bm.status & bmdma::STATUS_ACTIVE;
                let clear = v & (bmdma::STATUS_ERROR | bmdma::STATUS_INTERRUPT);
                self.bm.status = keep
                    | (self.bm.status & !clear & (bmdma::STATUS_ERROR | bmdma::STATUS_INTERRUPT))
                    | (v & bmdma::STATUS_DMA_CAPABLE);
            }
            4..=7 => {
                let shift = 8 * (off - 4);
                let mut a = self.bm.prd_addr & !(0xff << shift);
                a |= (v as u32) << shift;
                self.bm.prd_addr = a & !3;
            }
            _ => {}
        }
        None
    }

    fn start_dma(&mut self) -> Option<Io> {
        if self.inflight || self.bm.status & bmdma::STATUS_ACTIVE == 0 {
            return None;
        }
        let (unit, job) = self.dma.take()?;
        self.cur = unit;
        let sg = match bmdma::walk(&self.mem, self.bm.prd_addr, job.bytes()) {
            Ok(sg) => sg,
            Err(e) => {
                log::debug!("ide: bus-master PRD table error: {e:?}");
                self.bm.status = (self.bm.status & !bmdma::STATUS_ACTIVE) | bmdma::STATUS_ERROR;
                if let Some(d) = self.drives[unit].as_mut() {
                    if d.is_atapi() {
                        self.atapi_error(Sense::IO_ERROR);
                        return None;
                    }
                }
                self.fail(error::ABRT, None);
                return None;
            }
        };
        let d = self.drives[unit].as_mut()?;
        // Whole sectors only: a table that ends inside a sector cannot
        // complete that sector.
        let whole = |len: usize| len & !(SECTOR as usize - 1);
        let run = |backend, sg: SgList, dir, base, total| DmaRun {
            backend,
            sg,
            dir,
            base,
            total,
            done: 0,
            chunk: 0,
        };
        match job {
            DmaJob::DiskRead { lba, .. } => {
                let b = d.disk()?.clone();
                let total = whole(sg.len);
                let r = run(b, sg, RunDir::DiskRead, lba * SECTOR, total);
                self.dma_chunk(unit, r)
            }
            DmaJob::DiskWrite { lba, fua, .. } => {
                let b = d.disk()?.clone();
                let total = whole(sg.len);
                let r = run(b, sg, RunDir::DiskWrite { fua }, lba * SECTOR, total);
                self.dma_chunk(unit, r)
            }
            DmaJob::Trim { .. } => {
                let b = d.disk()?.clone();
                // The whole payload is checked before anything is
                // discarded, in pieces: a range past the end aborts the
                // command. A failed command ends the transfer: the engine
                // goes inactive, the device interrupts with ABRT (QEMU's
                // ide-test `bmdma/trim` expects exactly "interrupt").
                let mut buf = vec![0u8; sg.len.min(TRIM_PIECE)];
                let mut off = 0;
                while off < sg.len {
                    let n = (sg.len - off).min(TRIM_PIECE);
                    let piece = &mut buf[..n];
                    let r = if bmdma::gather_at(&self.mem, &sg, off, piece) {
                        d.dev
                            .trim_ranges(piece)
                            .map(drop)
                            .map_err(|r| r.error_bits())
                    } else {
                        Err(error::ABRT)
                    };
                    if let Err(e) = r {
                        self.dma_finish(unit, &sg, Err(DmaError::Device(e)));
                        return None;
                    }
                    off += n;
                }
                let total = sg.len;
                let r = run(b, sg, RunDir::Trim, 0, total);
                self.trim_chunk(unit, r)
            }
            DmaJob::AtapiData(v) => {
                bmdma::scatter(&self.mem, &sg, &v);
                self.dma_finish(unit, &sg, Ok(()));
                None
            }
            DmaJob::AtapiRead { offset, .. } => {
                let Some(m) = d.cdrom()?.medium() else {
                    let s = d.cdrom()?.read_failed();
                    self.atapi_error(s);
                    return None;
                };
                let total = sg.len;
                let r = run(m, sg, RunDir::AtapiRead, offset, total);
                self.dma_chunk(unit, r)
            }
        }
    }

    /// Starts the next chunk of `run` (the first one even if the transfer
    /// is empty, so that it completes on an I/O thread as any other).
    fn dma_chunk(&mut self, unit: usize, mut run: DmaRun) -> Option<Io> {
        let n = (run.total - run.done).min(MAX_BOUNCE);
        let off = run.base + run.done as u64;
        let req = match run.dir {
            RunDir::Trim => return self.trim_chunk(unit, run),
            RunDir::DiskRead | RunDir::AtapiRead => {
                IoRequest::read(off, IoVecs::from_vec(vec![0u8; n]))
            }
            RunDir::DiskWrite { fua } => {
                let mut data = vec![0u8; n];
                if !bmdma::gather_at(&self.mem, &run.sg, run.done, &mut data) {
                    self.cur = unit;
                    self.bm.status = (self.bm.status & !bmdma::STATUS_ACTIVE) | bmdma::STATUS_ERROR;
                    self.fail(error::ABRT, None);
                    return None;
                }
                IoRequest::write(off, IoVecs::from_vec(data), fua)
            }
        };
        run.chunk = n;
        if let Some(d) = self.drives[unit].as_mut() {
            d.status = status::BSY | status::DRDY | status::DSC;
        }
        self.inflight = true;
        self.dma_inflight = true;
        Some(Io {
            backend: run.backend.clone(),
            reqs: vec![req],
            gen: self.gen,
            drive: unit,
            pending: Pending::Dma(run),
        })
    }

    /// The next discards of a TRIM (checked when it started): the ranges
    /// of the payload's next pieces, up to the first piece that has any;
    /// none once the payload is used up (the completion ends the command).
    fn trim_chunk(&mut self, unit: usize, mut run: DmaRun) -> Option<Io> {
        let mut buf = vec![0u8; (run.total - run.done).min(TRIM_PIECE)];
        let mut reqs = Vec::new();
        while run.done < run.total && reqs.is_empty() {
            let n = (run.total - run.done).min(TRIM_PIECE);
            let piece = &mut buf[..n];
            let r = if bmdma::gather_at(&self.mem, &run.sg, run.done, piece) {
                let d = self.drives[unit].as_ref()?;
                d.dev.trim_ranges(piece).map_err(|r| r.error_bits())
            } else {
                Err(error::ABRT)
            };
            match r {
                Ok(ranges) => {
                    reqs = ranges
                        .into_iter()
                        .map(|(lba, n)| IoRequest::discard(lba * SECTOR, n * SECTOR))
                        .collect();
                }
                Err(e) => {
                    self.dma_finish(unit, &run.sg, Err(DmaError::Device(e)));
                    return None;
                }
            }
            run.done += n;
        }
        run.chunk = 0;
        if let Some(d) = self.drives[unit].as_mut() {
            d.status = status::BSY | status::DRDY | status::DSC;
        }
        self.inflight = true;
        self.dma_inflight = true;
        Some(Io {
            backend: run.backend.clone(),
            reqs,
            gen: self.gen,
            drive: unit,
            pending: Pending::Dma(run),
        })
    }

    /// A chunk of `run` is done: copy it to guest memory (reads), then the
    /// next chunk or the end of the command.
    fn dma_chunk_done(
        &mut self,
        unit: usize,
        run: DmaRun,
        reqs: Vec<IoRequest>,
        err: Option<BlockError>,
    ) -> Option<Io> {
        let mut run = run;
        let r = match (run.dir, err) {
            (RunDir::DiskRead, Some(_)) => Err(DmaError::Device(error::UNC)),
            (RunDir::DiskWrite { .. } | RunDir::Trim, Some(_)) => {
                Err(DmaError::Device(error::ABRT))
            }
            (RunDir::AtapiRead, Some(_)) => {
                let s = self
                    .drive_mut(unit)
                    .and_then(|d| d.cdrom())
                    .map_or(Sense::READ_ERROR, |c| c.read_failed());
                Err(DmaError::Sense(s))
            }
            (RunDir::DiskWrite { .. } | RunDir::Trim, None) => Ok(()),
            (dir, None) => {
                let bad = if dir == RunDir::AtapiRead {
                    DmaError::Sense(Sense::IO_ERROR)
                } else {
                    DmaError::Device(error::ABRT)
                };
                let data = reqs.into_iter().next().and_then(|r| r.iov.into_vec());
                match data {
                    Some(v) if bmdma::scatter_at(&self.mem, &run.sg, run.done, &v) => Ok(()),
                    _ => Err(bad),
                }
            }
        };
        if r.is_ok() {
            run.done += run.chunk;
            if run.done < run.total {
                return self.dma_chunk(unit, run);
            }
        }
        self.dma_finish(unit, &run.sg, r);
        None
    }

    /// Ends a DMA transfer: a short PRD table stops the engine without an
    /// interrupt (the device still wants data, as QEMU models it); otherwise
    /// the device completes and interrupts, and "active" stays set if the
    /// table has room left (SFF-8038i 3.2) and the engine was not stopped
    /// meanwhile.
    fn dma_finish(&mut self, unit: usize, sg: &SgList, result: Result<(), DmaError>) {
        self.cur = unit;
        if sg.short && result.is_ok() {
            self.bm.status &= !bmdma::STATUS_ACTIVE;
            if let Some(d) = self.cur() {
                d.status = status::DRDY | status::DSC;
            }
            return;
        }
        if sg.exhausted || result.is_err() || self.bm.cmd & bmdma::CMD_START == 0 {
            self.bm.status &= !bmdma::STATUS_ACTIVE;
        }
        let atapi = self.cur().is_some_and(|d| d.is_atapi());
        match (result, atapi) {
            (Ok(()), false) => self.done(),
            (Ok(()), true) => self.atapi_ok(),
            (Err(DmaError::Device(e)), false) => self.fail(e, None),
            (Err(DmaError::Sense(s)), true) => self.atapi_error(s),
            (Err(DmaError::Device(_)), true) => self.atapi_error(Sense::IO_ERROR),
            (Err(DmaError::Sense(_)), false) => self.fail(error::ABRT, None),
        }
    }

    /// Called (on an I/O thread) when the requests of an [`Io`] are done;
    /// returns the I/O that continues the command (the next chunk of a
    /// DMA transfer), to start once the lock is released.
    pub fn complete(
        &mut self,
        gen: u64,
        unit: usize,
        pending: Pending,
        reqs: Vec<IoRequest>,
        err: Option<BlockError>,
    ) -> Option<Io> {
        if gen != self.gen {
            return None; // reset meanwhile
        }
        self.inflight = false;
        self.dma_inflight = false;
        match pending {
            Pending::Flush => {
                self.cur = unit;
                if err.is_some() {
                    self.fail(error::ABRT, None)
                } else {
                    self.done()
                }
            }
            Pending::Dma(run) => return self.dma_chunk_done(unit, run, reqs, err),
            Pending::PioRead {
                lba,
                left,
                per_block,
            } => {
                self.cur = unit;
                let data = reqs.into_iter().next().and_then(|r| r.iov.into_vec());
                match (err, data) {
                    (None, Some(buf)) => self.pio_read_done(lba, left, per_block, buf),
                    _ => self.fail(error::UNC, Some(lba)),
                }
            }
            Pending::PioWrite {
                lba,
                next,
                left,
                per_block,
                fua,
            } => {
                self.cur = unit;
                if err.is_some() {
                    self.fail(error::ABRT, Some(lba));
                } else if left == 0 {
                    self.done();
                } else {
                    self.pio_write_block(next, left, per_block, fua);
                    self.raise();
                }
            }
            Pending::AtapiPio { next, left } => {
                self.cur = unit;
                let data = reqs.into_iter().next().and_then(|r| r.iov.into_vec());
                match (err, data) {
                    (None, Some(buf)) => self.atapi_data_in(buf, AtapiSrc::Medium(next), left),
                    _ => {
                        let s = self
                            .drive_mut(unit)
                            .and_then(|d| d.cdrom())
                            .map_or(Sense::READ_ERROR, |c| c.read_failed());
                        self.atapi_error(s);
                    }
                }
            }
        }
        None
    }
}

/// How a command ends (see [`Channel::finish`]).
enum End {
    Ok,
    Error { error: u8, lba: Option<u64> },
    PacketOk,
    PacketCheck(Sense),
}

enum DmaError {
    Device(u8),
    Sense(Sense),
}

/// Starts the asynchronous I/O of `io` (with the channel unlocked); the
/// last completion finishes the command under the channel lock.
pub fn run_io(ch: &Arc<Mutex<Channel>>, io: Io) {
    struct Gather {
        left: usize,
        reqs: Vec<IoRequest>,
        err: Option<BlockError>,
        pending: Option<Pending>,
    }
    let Io {
        backend,
        reqs,
        gen,
        drive,
        pending,
    } = io;
    if reqs.is_empty() {
        let next = lock(ch).complete(gen, drive, pending, Vec::new(), None);
        if let Some(io) = next {
            run_io(ch, io);
        }
        return;
    }
    let state = Arc::new(Mutex::new(Gather {
        left: reqs.len(),
        reqs: Vec::new(),
        err: None,
        pending: Some(pending),
    }));
    for req in reqs {
        let (st, ch) = (state.clone(), ch.clone());
        backend.submit(
            req,
            Box::new(move |req, r| {
                let finished = {
                    let mut s = lock(&st);
                    s.left -= 1;
                    if let Err(e) = r {
                        log::debug!("ide: I/O error: {e}");
                        s.err.get_or_insert(e);
                    }
                    s.reqs.push(req);
                    if s.left == 0 {
                        let reqs = std::mem::take(&mut s.reqs);
                        s.pending.take().map(|p| (p, reqs, s.err.take()))
                    } else {
                        None
                    }
                };
                if let Some((p, reqs, err)) = finished {
                    let next = lock(&ch).complete(gen, drive, p, reqs, err);
                    if let Some(io) = next {
                        run_io(&ch, io);
                    }
                }
            }),
        );
    }
}
