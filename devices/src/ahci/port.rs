//! One AHCI port and its device: the command engine that takes issued
//! slots from the command list, runs them through [`AtaDevice`] and posts
//! the result FISes.
//!
//! Specs followed: AHCI 1.3.1 section 5.3 (the port's command processing:
//! slots are fetched in order, one non-queued command at a time; PRDBC is
//! updated and the slot's PxCI bit cleared when its D2H Register FIS is
//! posted), 4.2.1 (where each FIS lands in the received-FIS area, only
//! while PxCMD.FR), 6.2.2.1 (a non-queued command that ends with ERR sets
//! PxIS.TFES and stops the list with the slot still in PxCI) and 10.4.1
//! (software reset through two control FISes).
//!
//! Data moves through the slot's PRDT in both PIO and DMA commands: the
//! device's PIO data-in (IDENTIFY, SMART) is copied into it and announced
//! by a PIO Setup FIS; disk reads and writes go to the block layer
//! asynchronously as one request whose buffers are the PRDT's guest
//! memory ([`Port::start`] hands back a [`PortIo`] to submit outside the
//! port's lock, [`Port::complete`] finishes it).
//!
//! Not yet (issue 18): NCQ, ATAPI PACKET, TRIM, COMRESET's device side,
//! the HBA around the ports and the PCI function.

use std::sync::Arc;

use block::backend::BlockBackend;
use block::driver::IoRequest;
use vm_memory::GuestAddress;

use super::fis::{self, rfis, Command, CommandHeader, Kind, HEADER_LEN};
use super::regs::{cmd, is, PortEvent, PortRegs};
use crate::ata::command::Xfer;
use crate::ata::device::{AtaDevice, AtaDeviceState, Outcome, DIAG_OK, SECTOR};
use crate::ata::{error, status, Taskfile};
use crate::dma::{self, GuestSgList};
use crate::migration::DeviceState;
use crate::scsi::{Lun, Plan, Sense};
use crate::GuestMem;
use serde::{Deserialize, Serialize};

/// The ATAPI command packet: 12 bytes (IDENTIFY PACKET DEVICE word 0).
const PACKET_LEN: usize = 12;
/// ATAPI interrupt reason bits in the sector count register.
const REASON_COD: u8 = 0x01;
const REASON_IO: u8 = 0x02;

/// QEMU's AHCI takes the Register H2D FIS's 16-bit count (COUNT and
/// COUNT EXP) for every command, so a 28-bit LBA read or write with COUNT
/// EXP set moves more than 256 sectors there (and QEMU's ahci-test relies
/// on it). A SATA drive would ignore COUNT EXP; Linux and SeaBIOS leave it
/// 0 for 28-bit commands, so only a driver written against QEMU sees the
/// difference, and Strata answers as QEMU does: such a command runs as its
/// 48-bit form, at the same LBA.
fn count_exp_quirk(opcode: u8, tf: &mut Taskfile) -> u8 {
    use crate::ata::command::cmd::*;
    let ext = match opcode {
        READ_SECTORS | READ_SECTORS_NORETRY => READ_SECTORS_EXT,
        READ_DMA | READ_DMA_NORETRY => READ_DMA_EXT,
        READ_MULTIPLE => READ_MULTIPLE_EXT,
        READ_VERIFY | READ_VERIFY_NORETRY => READ_VERIFY_EXT,
        WRITE_SECTORS | WRITE_SECTORS_NORETRY => WRITE_SECTORS_EXT,
        WRITE_DMA | WRITE_DMA_NORETRY => WRITE_DMA_EXT,
        WRITE_MULTIPLE => WRITE_MULTIPLE_EXT,
        _ => return opcode,
    };
    if tf.hob_nsector == 0 || !tf.lba_mode() {
        return opcode;
    }
    // LBA 27:24 sits in the device register's low nibble.
    tf.hob_sector = tf.select & 0x0f;
    tf.hob_lcyl = 0;
    tf.hob_hcyl = 0;
    ext
}

/// The most PRD entries a command may use (PRDTL is 16 bits).
const MAX_PRDS: usize = 65535;

/// A block request the port needs submitted, outside its lock; its result
/// goes back to [`Port::complete`].
pub struct PortIo {
    pub backend: Arc<BlockBackend>,
    /// One request, or a TRIM step's discards: the step completes when
    /// all of them have, successfully only if each did.
    pub reqs: Vec<IoRequest>,
    pub ticket: Ticket,
}

/// Which command a [`PortIo`] belongs to (stale after a reset or a stop).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    gen: u64,
    slot: u8,
    /// Bytes the command moves (PRDBC when it completes).
    bytes: u32,
    lba: Option<u64>,
    /// A PIO command's last DRQ block: what its PIO Setup FIS says.
    pio: Option<PioBlock>,
    /// A queued command: it completes by a Set Device Bits FIS for its
    /// tag (its slot), while other commands run.
    ncq: bool,
    /// A packet command's medium read: it ends with the packet status.
    atapi: bool,
    /// A step of DATA SET MANAGEMENT TRIM: the next one follows.
    trim: bool,
}

/// The PIO Setup FIS a PIO read or write leaves in the receive area: the
/// one of its last DRQ block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PioBlock {
    len: u16,
    to_host: bool,
    /// Whether it interrupts: every data-in block does; a data-out block
    /// does unless it is the first (ATA8-ACS PIO data-out protocol).
    irq: bool,
}

pub struct Port {
    pub regs: PortRegs,
    mem: Arc<GuestMem>,
    dev: Option<AtaDevice>,
    tf: Taskfile,
    /// The slot executing: commands run one at a time, in slot order.
    active: Option<u8>,
    /// Bumped by a stop or reset, so completions of older I/O are dropped.
    gen: u64,
    /// Whether the device's signature FIS after the last reset has been
    /// received (it waits for FIS receive to be enabled).
    signature_sent: bool,
    /// The TRIM command running: its payload and how far it got.
    trim: Option<TrimJob>,
    /// Slots with a [`PortIo`] handed out and not completed: what a
    /// migration destination re-issues ([`Port::resume`]). A request the
    /// block layer parked (`werror=stop`) stays here until the VM goes on.
    outstanding: u32,
}

/// A DATA SET MANAGEMENT TRIM in progress: the payload (in the slot's
/// PRDT) is discarded a piece at a time, so that host memory and requests
/// in flight stay bounded whatever the guest asks.
struct TrimJob {
    sg: GuestSgList,
    /// Payload bytes done.
    next: u64,
    len: u64,
}

/// TRIM payload bytes per step: 8192 ranges.
const TRIM_PIECE: u64 = 64 << 10;

impl Port {
    pub fn new(mem: Arc<GuestMem>) -> Port {
        Port {
            regs: PortRegs::reset(),
            mem,
            dev: None,
            tf: Taskfile::default(),
            active: None,
            gen: 0,
            signature_sent: false,
            trim: None,
            outstanding: 0,
        }
    }

    /// The port after an HBA reset (GHC.HR): registers as at power-on,
    /// the device (if any) showing its signature again.
    pub fn reset(&mut self) {
        self.regs = PortRegs::reset();
        self.reset_device();
    }

    /// Attaches a device; it comes up as after a COMRESET.
    pub fn attach(&mut self, dev: AtaDevice) {
        self.dev = Some(dev);
        self.reset_device();
    }

    /// Link and device after a reset: PxSSTS says a Gen 1 device is
    /// present and active; PxTFD and PxSIG hold their reset values (7Fh,
    /// all ones) until the device's signature FIS is received.
    fn reset_device(&mut self) {
        self.gen += 1;
        self.active = None;
        self.trim = None;
        self.outstanding = 0;
        self.regs.tfd = 0x7f;
        self.regs.sig = 0xffff_ffff;
        self.signature_sent = false;
        let Some(dev) = self.dev.as_mut() else {
            self.regs.ssts = 0;
            return;
        };
        dev.reset(&mut self.tf);
        self.regs.ssts = 0x113;
        self.receive_signature();
    }

    /// The device's first D2H Register FIS after a reset (AHCI 10.1.2,
    /// 3.3.9): once FIS receive runs, it lands in the receive area and
    /// sets PxTFD, PxSIG and PxIS.DHRS. Software waiting for BSY to clear
    /// after a COMRESET sees the device ready then.
    fn receive_signature(&mut self) {
        if self.signature_sent || self.regs.cmd & cmd::FR == 0 {
            return;
        }
        let Some(dev) = self.dev.as_ref() else {
            return;
        };
        // ATA devices come up ready; ATAPI devices clear DRDY (ATA8-ACS
        // 9.12, the signature and status after a reset).
        let st = if dev.is_atapi() {
            0
        } else {
            status::DRDY | status::DSC
        };
        self.regs.sig = dev.signature();
        self.regs.tfd = (DIAG_OK as u32) << 8 | st as u32;
        let tf = self.tf;
        self.post(rfis::REG_D2H, &fis::reg_d2h(st, DIAG_OK, &tf, false));
        self.regs.is |= is::DHRS;
        self.signature_sent = true;
    }

    /// Whether the device is an ATAPI CD-ROM.
    pub fn has_atapi(&self) -> bool {
        self.dev.as_ref().is_some_and(|d| d.is_atapi())
    }

    /// True while the port asks for an interrupt (PxIS & PxIE).
    pub fn irq_pending(&self) -> bool {
        self.regs.is & self.regs.ie != 0
    }

    /// A guest write to a port register; the I/O to start.
    pub fn write(&mut self, off: u64, v: u32) -> Vec<PortIo> {
        let fis_receive = self.regs.cmd & cmd::FR;
        let event = self.regs.write(off, v);
        if fis_receive == 0 && self.regs.cmd & cmd::FR != 0 {
            self.receive_signature();
        }
        match event {
            PortEvent::Issue | PortEvent::Start => self.next(),
            PortEvent::Stop => {
                // What was running is abandoned (its completion is stale).
                self.gen += 1;
                self.active = None;
                self.trim = None;
                self.outstanding = 0;
                Vec::new()
            }
            PortEvent::ComResetDone => {
                self.reset_device();
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// Starts issued slots in order until a non-queued command needs I/O
    /// (it holds the engine until it completes); queued commands are
    /// accepted and their I/O started as they come.
    fn next(&mut self) -> Vec<PortIo> {
        let mut out = Vec::new();
        loop {
            if self.active.is_some() || self.regs.cmd & cmd::ST == 0 || self.regs.ci == 0 {
                return out;
            }
            let slot = self.regs.ci.trailing_zeros() as u8;
            self.active = Some(slot);
            if let Some(io) = self.start(slot) {
                out.push(io);
            }
            if self.active.is_some() {
                // Waiting for its I/O, or stopped on an error (software
                // recovers first).
                return out;
            }
        }
    }

    /// Reads and parses slot `slot`, then executes it; `None` when it
    /// finished (or failed) without I/O.
    fn start(&mut self, slot: u8) -> Option<PortIo> {
        let io = self.execute(slot);
        self.handed_out(io)
    }

    /// Notes that `io`'s slot has I/O outstanding.
    fn handed_out(&mut self, io: Option<PortIo>) -> Option<PortIo> {
        if let Some(io) = &io {
            self.outstanding |= 1 << io.ticket.slot;
        }
        io
    }

    fn execute(&mut self, slot: u8) -> Option<PortIo> {
        let c = match self.fetch(slot) {
            Ok(c) => c,
            Err(()) => {
                // A command list or table outside guest memory, or a
                // malformed FIS: an interface error, the list stops.
                self.regs.is |= is::IFS;
                self.regs.tfd = (error::ABRT as u32) << 8 | (status::DRDY | status::ERR) as u32;
                return None;
            }
        };
        match c.kind {
            Kind::Control { srst } => {
                // SRST set, then cleared: the device resets between the
                // two and reports its signature (AHCI 10.4.1).
                if !srst {
                    self.reset_device();
                    let tf = self.tf;
                    self.post(rfis::REG_D2H, &fis::reg_d2h(0x50, DIAG_OK, &tf, false));
                }
                self.retire(slot, 0);
                None
            }
            Kind::Ata { opcode, mut tf } => {
                let Some(dev) = self.dev.as_mut() else {
                    self.fail(slot, error::ABRT, None);
                    return None;
                };
                let opcode = count_exp_quirk(opcode, &mut tf);
                let outcome = dev.command(opcode, &mut tf);
                self.tf = tf;
                self.carry_out(slot, &c, outcome)
            }
            Kind::Ncq {
                tag,
                write,
                lba,
                count,
                fua,
            } => self.queue(slot, &c, tag, write, lba, count, fua),
        }
    }

    /// READ/WRITE FPDMA QUEUED (SATA 3.2 13.6, AHCI 5.3.6): the device
    /// accepts the command at once (BSY clears in PxTFD without a FIS and
    /// the slot leaves PxCI) and its I/O runs while later slots are
    /// fetched; a Set Device Bits FIS completes it ([`Port::complete`]).
    /// The tag must be the slot, as AHCI requires.
    #[allow(clippy::too_many_arguments)]
    fn queue(
        &mut self,
        slot: u8,
        c: &Command,
        tag: u8,
        write: bool,
        lba: u64,
        count: u32,
        fua: bool,
    ) -> Option<PortIo> {
        let Some(io) = self.ncq_io(slot, c, tag, write, lba, count, fua) else {
            self.fail(slot, error::ABRT, None);
            return None;
        };
        self.regs.tfd = (status::DRDY | status::DSC) as u32;
        self.regs.sact |= 1 << slot;
        self.retire(slot, io.ticket.bytes);
        Some(io)
    }

    /// A queued command's request, if the device, tag, range and PRDT
    /// allow it; nothing in the port changes.
    #[allow(clippy::too_many_arguments)]
    fn ncq_io(
        &self,
        slot: u8,
        c: &Command,
        tag: u8,
        write: bool,
        lba: u64,
        count: u32,
        fua: bool,
    ) -> Option<PortIo> {
        let backend = self
            .dev
            .as_ref()
            .filter(|d| d.ncq())
            .and_then(|d| d.disk())
            .cloned();
        let sectors = self.dev.as_ref().map_or(0, |d| d.sectors());
        let in_range = lba
            .checked_add(count as u64)
            .is_some_and(|end| end <= sectors);
        let bytes = count as u64 * SECTOR;
        let (Some(backend), true, true, Some(sg)) =
            (backend, tag == slot, in_range, self.sg(c, bytes))
        else {
            return None;
        };
        let iov = sg.to_iovecs(&self.mem).ok()?;
        let req = if write {
            IoRequest::write(lba * SECTOR, iov, fua)
        } else {
            IoRequest::read(lba * SECTOR, iov)
        };
        Some(PortIo {
            backend,
            reqs: vec![req],
            ticket: Ticket {
                gen: self.gen,
                slot,
                bytes: bytes as u32,
                lba: Some(lba),
                pio: None,
                ncq: true,
                atapi: false,
                trim: false,
            },
        })
    }

    /// The slot's header and table, parsed (AHCI 4.2.2, 4.2.3).
    fn fetch(&self, slot: u8) -> Result<Command, ()> {
        let mut h = [0u8; HEADER_LEN];
        let at = self.regs.clb + slot as u64 * HEADER_LEN as u64;
        dma::read_ram(&self.mem, GuestAddress(at), &mut h).map_err(|_| ())?;
        let header = CommandHeader::parse(&h);
        let mut table = vec![0u8; header.table_len()];
        dma::read_ram(&self.mem, GuestAddress(header.ctba), &mut table).map_err(|_| ())?;
        Command::parse(header, &table).map_err(|_| ())
    }

    /// The PRDT as a checked scatter-gather list, cut to `bytes`.
    fn sg(&self, c: &Command, bytes: u64) -> Option<GuestSgList> {
        let mut sg = GuestSgList::new(MAX_PRDS, bytes);
        let mut left = bytes;
        for p in &c.prdt {
            if left == 0 {
                break;
            }
            let n = (p.len as u64).min(left);
            sg.push(&self.mem, GuestAddress(p.addr), n as usize).ok()?;
            left -= n;
        }
        (left == 0).then_some(sg)
    }

    fn carry_out(&mut self, slot: u8, c: &Command, outcome: Outcome) -> Option<PortIo> {
        match outcome {
            Outcome::Done => self.finish(slot, 0),
            Outcome::Fail { error, lba } => self.fail(slot, error, lba),
            Outcome::DataIn(buf) => {
                let n = (buf.len() as u64).min(c.prdt_bytes());
                match self.sg(c, n) {
                    Some(sg) if sg.write_at(&self.mem, 0, &buf[..n as usize]).is_ok() => {
                        let tf = self.tf;
                        let end = status::DRDY | status::DSC;
                        let ps = fis::pio_setup(
                            status::DRDY | status::DRQ,
                            end,
                            0,
                            &tf,
                            n as u16,
                            true,
                            true,
                        );
                        self.post(rfis::PIO_SETUP, &ps);
                        self.regs.is |= is::PSS;
                        self.finish(slot, n as u32);
                    }
                    _ => self.fail(slot, error::ABRT, None),
                }
            }
            Outcome::Read {
                lba, count, xfer, ..
            }
            | Outcome::Write {
                lba, count, xfer, ..
            } => {
                let write = matches!(outcome, Outcome::Write { .. });
                let fua = matches!(outcome, Outcome::Write { fua: true, .. });
                let bytes = count as u64 * SECTOR;
                let pio = match (xfer, self.dev.as_ref()) {
                    (Xfer::Dma, _) | (_, None) => None,
                    (_, Some(d)) => {
                        let per = d.drq_block(xfer).max(1);
                        let blocks = count.div_ceil(per);
                        let last = count - (blocks - 1) * per;
                        Some(PioBlock {
                            len: (last as u64 * SECTOR).min(u16::MAX as u64) as u16,
                            to_host: !write,
                            irq: !write || blocks > 1,
                        })
                    }
                };
                let (Some(sg), Some(backend)) = (
                    self.sg(c, bytes),
                    self.dev.as_ref().and_then(|d| d.disk()).cloned(),
                ) else {
                    self.fail(slot, error::ABRT, Some(lba));
                    return None;
                };
                let Ok(iov) = sg.to_iovecs(&self.mem) else {
                    self.fail(slot, error::ABRT, Some(lba));
                    return None;
                };
                let req = if write {
                    IoRequest::write(lba * SECTOR, iov, fua)
                } else {
                    IoRequest::read(lba * SECTOR, iov)
                };
                let ticket = Ticket {
                    gen: self.gen,
                    slot,
                    bytes: bytes as u32,
                    lba: Some(lba),
                    pio,
                    ncq: false,
                    atapi: false,
                    trim: false,
                };
                return Some(PortIo {
                    backend,
                    reqs: vec![req],
                    ticket,
                });
            }
            Outcome::Flush => {
                let Some(backend) = self.dev.as_ref().and_then(|d| d.disk()).cloned() else {
                    self.finish(slot, 0);
                    return None;
                };
                let ticket = Ticket {
                    gen: self.gen,
                    slot,
                    bytes: 0,
                    lba: None,
                    pio: None,
                    ncq: false,
                    atapi: false,
                    trim: false,
                };
                return Some(PortIo {
                    backend,
                    reqs: vec![IoRequest::flush()],
                    ticket,
                });
            }
            Outcome::Reset { .. } => {
                self.reset_device();
                self.finish(slot, 0);
            }
            Outcome::Packet { dma } => return self.packet(slot, c, dma),
            Outcome::Trim { blocks } => return self.trim(slot, c, blocks),
        }
        None
    }

    /// DATA SET MANAGEMENT with TRIM (ATA8-ACS 7.10): `blocks` 512-byte
    /// blocks of ranges arrive through the PRDT (DMA out). The whole
    /// payload is checked first (a range past the end aborts the command
    /// before anything is discarded), then discarded piece by piece.
    fn trim(&mut self, slot: u8, c: &Command, blocks: u16) -> Option<PortIo> {
        let len = blocks as u64 * SECTOR;
        let (Some(sg), Some(dev)) = (self.sg(c, len), self.dev.as_ref()) else {
            self.fail(slot, error::ABRT, None);
            return None;
        };
        let mut buf = vec![0u8; len.min(TRIM_PIECE) as usize];
        let mut off = 0;
        while off < len {
            let piece = &mut buf[..(len - off).min(TRIM_PIECE) as usize];
            let ok = sg.read_at(&self.mem, off, piece).is_ok() && dev.trim_ranges(piece).is_ok();
            if !ok {
                self.fail(slot, error::ABRT, None);
                return None;
            }
            off += piece.len() as u64;
        }
        self.trim = Some(TrimJob { sg, next: 0, len });
        self.trim_step(slot)
    }

    /// The discards of the next piece of the TRIM payload; at the end, the
    /// command's status.
    fn trim_step(&mut self, slot: u8) -> Option<PortIo> {
        loop {
            let (Some(job), Some(dev)) = (self.trim.as_mut(), self.dev.as_ref()) else {
                return None;
            };
            if job.next >= job.len {
                let bytes = job.len as u32;
                self.trim = None;
                self.finish(slot, bytes);
                return None;
            }
            let mut piece = vec![0u8; (job.len - job.next).min(TRIM_PIECE) as usize];
            let ranges = job
                .sg
                .read_at(&self.mem, job.next, &mut piece)
                .ok()
                .and_then(|()| dev.trim_ranges(&piece).ok());
            job.next += piece.len() as u64;
            let (Some(ranges), Some(backend)) = (ranges, dev.disk().cloned()) else {
                // The guest changed the payload under the command.
                self.trim = None;
                self.fail(slot, error::ABRT, None);
                return None;
            };
            let reqs: Vec<IoRequest> = ranges
                .iter()
                .map(|&(lba, n)| IoRequest::discard(lba * SECTOR, n * SECTOR))
                .collect();
            if reqs.is_empty() {
                continue;
            }
            return Some(PortIo {
                backend,
                reqs,
                ticket: Ticket {
                    gen: self.gen,
                    slot,
                    bytes: 0,
                    lba: None,
                    pio: None,
                    ncq: false,
                    atapi: false,
                    trim: true,
                },
            });
        }
    }

    /// PACKET (ATA8-ACS 7.18, AHCI 5.3.4): the device asks for the command
    /// packet with a PIO Setup FIS (12 bytes out, no interrupt), runs the
    /// CDB from the table's ACMD on its MMC unit, and data-in goes through
    /// the PRDT. PIO data-in is announced by a PIO Setup FIS per DRQ block
    /// of at most the byte count limit (the host's cylinder registers).
    fn packet(&mut self, slot: u8, c: &Command, dma: bool) -> Option<PortIo> {
        let tf = self.tf;
        let ps = fis::pio_setup(
            status::DRDY | status::DRQ,
            status::DRDY | status::DRQ,
            0,
            &tf,
            PACKET_LEN as u16,
            false,
            false,
        );
        self.post(rfis::PIO_SETUP, &ps);
        let Some(cd) = self.dev.as_ref().and_then(|d| d.cdrom()) else {
            self.fail(slot, error::ABRT, None);
            return None;
        };
        let plan = cd.execute(&c.acmd[..PACKET_LEN]);
        let bcl = match u16::from_le_bytes([tf.lcyl, tf.hcyl]) {
            0 | 0xffff => 0xfffe,
            b => b,
        };
        // The last DRQ block of `n` bytes moved in blocks of at most `bcl`.
        let last_block = move |n: u64| -> Option<PioBlock> {
            let per = bcl as u64;
            (!dma && n > 0).then(|| PioBlock {
                len: (n - (n - 1) / per * per) as u16,
                to_host: true,
                irq: true,
            })
        };
        match plan {
            Plan::Good => self.finish_packet(slot, Ok(()), 0),
            Plan::Check(s) => self.finish_packet(slot, Err(s), 0),
            Plan::DataIn(v) => {
                let n = (v.len() as u64).min(c.prdt_bytes());
                match self.sg(c, n) {
                    Some(sg) if sg.write_at(&self.mem, 0, &v[..n as usize]).is_ok() => {
                        self.pio_block(last_block(n));
                        self.finish_packet(slot, Ok(()), n as u32);
                    }
                    _ => self.fail(slot, error::ABRT, None),
                }
            }
            Plan::Read { offset, len } => {
                let n = len.min(c.prdt_bytes());
                let medium = cd.medium();
                let (Some(sg), Some(backend)) = (self.sg(c, n), medium) else {
                    let s = cd.read_failed();
                    self.finish_packet(slot, Err(s), 0);
                    return None;
                };
                let Ok(iov) = sg.to_iovecs(&self.mem) else {
                    self.fail(slot, error::ABRT, None);
                    return None;
                };
                return Some(PortIo {
                    backend,
                    reqs: vec![IoRequest::read(offset, iov)],
                    ticket: Ticket {
                        gen: self.gen,
                        slot,
                        bytes: n as u32,
                        lba: None,
                        pio: last_block(n),
                        ncq: false,
                        atapi: true,
                        trim: false,
                    },
                });
            }
            // A CD-ROM plans no writes, flushes or parameter lists.
            _ => self.finish_packet(slot, Err(Sense::INVALID_OPCODE), 0),
        }
        None
    }

    /// Posts a PIO data block's PIO Setup FIS (and its interrupt).
    fn pio_block(&mut self, b: Option<PioBlock>) {
        let Some(b) = b else { return };
        let tf = self.tf;
        let (busy, end) = (status::DRDY | status::DRQ, status::DRDY | status::DSC);
        let ps = fis::pio_setup(busy, end, 0, &tf, b.len, b.to_host, b.irq);
        self.post(rfis::PIO_SETUP, &ps);
        if b.irq {
            self.regs.is |= is::PSS;
        }
    }

    /// A packet command's status: the interrupt reason says "status"
    /// (I/O and C/D set); CHECK CONDITION is ERR with the sense key in
    /// the error register's high nibble, which stops the list (TFES).
    fn finish_packet(&mut self, slot: u8, result: Result<(), Sense>, bytes: u32) {
        self.tf.nsector = (self.tf.nsector & !7) | REASON_IO | REASON_COD;
        let (st, err) = match result {
            Ok(()) => (status::DRDY | status::DSC, 0),
            Err(s) => (status::DRDY | status::ERR, s.key << 4),
        };
        self.regs.tfd = (err as u32) << 8 | st as u32;
        let tf = self.tf;
        self.post(rfis::REG_D2H, &fis::reg_d2h(st, err, &tf, true));
        self.regs.is |= is::DHRS;
        if err == 0 {
            self.retire(slot, bytes);
        } else {
            self.regs.is |= is::TFES;
            self.set_prdbc(slot, 0);
        }
    }

    /// A block request of `ticket` finished; the next I/O to start.
    pub fn complete(&mut self, ticket: Ticket, ok: bool) -> Vec<PortIo> {
        if ticket.gen != self.gen {
            return Vec::new();
        }
        self.outstanding &= !(1 << ticket.slot);
        if ticket.ncq {
            if self.regs.sact & 1 << ticket.slot != 0 {
                self.complete_queued(ticket.slot, ok);
            }
            return self.next();
        }
        if self.active != Some(ticket.slot) {
            return Vec::new();
        }
        if ticket.trim {
            if !ok {
                self.trim = None;
                self.fail(ticket.slot, error::ABRT, None);
                return Vec::new();
            }
            let io = self.trim_step(ticket.slot);
            return match self.handed_out(io) {
                Some(io) => vec![io],
                None => self.next(),
            };
        }
        if ok {
            self.pio_block(ticket.pio);
            if ticket.atapi {
                self.finish_packet(ticket.slot, Ok(()), ticket.bytes);
            } else {
                self.finish(ticket.slot, ticket.bytes);
            }
        } else if ticket.atapi {
            let sense = self
                .dev
                .as_ref()
                .and_then(|d| d.cdrom())
                .map(|cd| cd.read_failed());
            self.finish_packet(ticket.slot, Err(sense.unwrap_or(Sense::INVALID_OPCODE)), 0);
        } else {
            let err = if ticket.lba.is_some() {
                error::UNC
            } else {
                error::ABRT
            };
            self.fail(ticket.slot, err, ticket.lba);
        }
        self.next()
    }

    /// A queued command finished: a Set Device Bits FIS for its tag,
    /// which clears its PxSACT bit and raises PxIS.SDBS. A failed one
    /// reports ERR in the FIS and PxTFD, raises TFES and keeps its PxSACT
    /// bit, and the engine stops for software's recovery (SATA 3.2
    /// 13.6.3.2, AHCI 6.2.2.2).
    fn complete_queued(&mut self, tag: u8, ok: bool) {
        if ok {
            let st = status::DRDY | status::DSC;
            self.regs.sact &= !(1 << tag);
            self.post(
                rfis::SET_DEVICE_BITS,
                &fis::set_device_bits(st, 0, 1 << tag, true),
            );
            self.regs.is |= is::SDBS;
        } else {
            let st = status::DRDY | status::ERR;
            self.regs.tfd = (error::ABRT as u32) << 8 | st as u32;
            self.post(
                rfis::SET_DEVICE_BITS,
                &fis::set_device_bits(st, error::ABRT, 0, true),
            );
            self.regs.is |= is::SDBS | is::TFES;
            // The engine stops here, as after a non-queued error.
            self.active = Some(tag);
        }
    }

    /// On a migration destination, when the VM runs: the I/O of every
    /// slot whose request was outstanding on the source (halted by a
    /// `stop` error policy, or in flight), issued again from the command
    /// in guest RAM, which came with the migration. A non-queued command
    /// runs again from its header, FIS and PRDT (a TRIM from its first
    /// range); a queued one has its request rebuilt, its PxCI and PxSACT
    /// left as they are. Reads, writes, flushes and discards of the same
    /// data are idempotent, so running one twice is harmless. Then the
    /// engine goes on with what was issued behind them.
    pub fn reissue(&mut self) -> Vec<PortIo> {
        let retry = std::mem::take(&mut self.outstanding);
        let mut out = Vec::new();
        for slot in 0..32u8 {
            if retry & 1 << slot == 0 {
                continue;
            }
            let io = if self.active == Some(slot) && self.regs.ci & 1 << slot != 0 {
                self.start(slot)
            } else if self.regs.sact & 1 << slot != 0 {
                let io = self.requeue(slot);
                self.handed_out(io)
            } else {
                None
            };
            out.extend(io);
        }
        out.extend(self.next());
        out
    }

    /// A queued command's request again, from its slot in guest RAM;
    /// if the slot no longer holds it (software rewrote the command
    /// while it was queued), it completes with ERR.
    fn requeue(&mut self, slot: u8) -> Option<PortIo> {
        let io = match self.fetch(slot) {
            Ok(
                c @ Command {
                    kind:
                        Kind::Ncq {
                            tag,
                            write,
                            lba,
                            count,
                            fua,
                        },
                    ..
                },
            ) => self.ncq_io(slot, &c, tag, write, lba, count, fua),
            _ => None,
        };
        if io.is_none() {
            self.complete_queued(slot, false);
        }
        io
    }

    /// Writes `f` into the received-FIS area at `at`, if FIS receive runs.
    fn post(&self, at: u64, f: &[u8]) {
        if self.regs.cmd & cmd::FR != 0 {
            let _ = dma::write_ram(&self.mem, GuestAddress(self.regs.fb + at), f);
        }
    }

    /// PRDBC of `slot`'s command header (DW1).
    fn set_prdbc(&self, slot: u8, bytes: u32) {
        let at = self.regs.clb + slot as u64 * HEADER_LEN as u64 + 4;
        let _ = dma::write_ram(&self.mem, GuestAddress(at), &bytes.to_le_bytes());
    }

    /// The slot is done: PRDBC, PxCI, and the engine free for the next.
    fn retire(&mut self, slot: u8, bytes: u32) {
        self.set_prdbc(slot, bytes);
        self.regs.ci &= !(1 << slot);
        self.active = None;
    }

    /// Success: a D2H Register FIS with the device's status.
    fn finish(&mut self, slot: u8, bytes: u32) {
        let st = status::DRDY | status::DSC;
        self.regs.tfd = st as u32;
        let tf = self.tf;
        self.post(rfis::REG_D2H, &fis::reg_d2h(st, 0, &tf, true));
        self.regs.is |= is::DHRS;
        self.retire(slot, bytes);
    }

    /// ERR: the D2H FIS reports it, PxIS.TFES is raised and the list
    /// stops here with the slot still issued (AHCI 6.2.2.1).
    fn fail(&mut self, slot: u8, err: u8, lba: Option<u64>) {
        let st = status::DRDY | status::ERR;
        let mut tf = self.tf;
        if let Some(l) = lba {
            tf.set_lba(l, true);
        }
        self.regs.tfd = (err as u32) << 8 | st as u32;
        self.post(rfis::REG_D2H, &fis::reg_d2h(st, err, &tf, true));
        self.regs.is |= is::DHRS | is::TFES;
        self.set_prdbc(slot, 0);
    }
}

/// A port as migration carries it: its registers, the taskfile shadow,
/// the engine's position, and the slots whose I/O must be issued again
/// (`retry`). A TRIM in progress restarts from its first range, so its
/// job is not carried.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PortState {
    pub regs: PortRegs,
    pub tf: Taskfile,
    pub active: Option<u8>,
    pub signature_sent: bool,
    pub retry: u32,
    pub device: Option<AtaDeviceState>,
}

impl DeviceState for Port {
    const VERSION: u32 = 1;
    type State = PortState;
    fn save_state(&self) -> PortState {
        PortState {
            regs: self.regs.clone(),
            tf: self.tf,
            active: self.active,
            signature_sent: self.signature_sent,
            retry: self.outstanding,
            device: self.dev.as_ref().map(|d| d.save_state()),
        }
    }
    fn load_state(&mut self, s: PortState, version: u32) -> Result<(), String> {
        if let Some(a) = s.active.filter(|&a| a >= 32) {
            return Err(format!("AHCI port: active slot {a} of 32"));
        }
        // Each slot to re-issue is the running non-queued command (still
        // issued) or a queued one (still active in PxSACT), on a running
        // engine.
        let mut runnable = s.regs.sact;
        if let Some(a) = s.active.filter(|&a| s.regs.ci & 1 << a != 0) {
            runnable |= 1 << a;
        }
        if s.retry & !runnable != 0 || (s.retry != 0 && s.regs.cmd & cmd::ST == 0) {
            return Err(format!(
                "AHCI port: slots {:#x} to re-issue, but only {runnable:#x} are running",
                s.retry
            ));
        }
        match (self.dev.as_mut(), s.device) {
            (Some(d), Some(ds)) => d.load_state(ds, version)?,
            (None, None) => {}
            (Some(_), None) => {
                return Err("AHCI port: no device on the source's port, one here".into())
            }
            (None, Some(_)) => {
                return Err("AHCI port: a device on the source's port, none here".into())
            }
        }
        self.regs = s.regs;
        self.tf = s.tf;
        self.active = s.active;
        self.signature_sent = s.signature_sent;
        self.outstanding = s.retry;
        self.trim = None;
        // Nothing of this process is in flight for the port.
        self.gen += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ahci::regs::port;
    use crate::ata::cmd as ata_cmd;
    use crate::ata::device::{DriveConfig, Media};
    use block::backend::BackendConfig;
    use block::graph::BlockGraph;
    use vm_memory::{Bytes, GuestMemoryMmap};

    const CLB: u64 = 0x1000;
    const FB: u64 = 0x2000;
    const CTBA: u64 = 0x3000;
    const BUF: u64 = 0x8000;

    fn disk() -> Arc<BlockBackend> {
        let g = BlockGraph::new();
        let n = g
            .blockdev_add_str("driver=null-co,node-name=d,size=1048576,read-zeroes=on")
            .unwrap();
        BlockBackend::new("d", n, BackendConfig::default()).unwrap()
    }

    fn port() -> Port {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let mut p = fresh_port(mem);
        p.write(port::CLB, CLB as u32);
        p.write(port::FB, FB as u32);
        p.write(port::IE, u32::MAX);
        p.write(port::CMD, cmd::FRE | cmd::ST);
        p
    }

    /// A port with a disk over `mem`, as the machine builds it (what a
    /// migration destination starts from).
    fn fresh_port(mem: Arc<GuestMem>) -> Port {
        let cfg = DriveConfig::new(Media::Disk(disk()));
        let mut p = Port::new(mem);
        let mut dev = AtaDevice::new(cfg, 0, false).unwrap();
        dev.enable_ncq();
        p.attach(dev);
        p
    }

    /// `a`'s state moved into a fresh port over the same guest memory.
    fn migrate(a: &Port) -> Port {
        let mut b = fresh_port(a.mem.clone());
        crate::migration::round_trip(a, &mut b);
        b
    }

    /// Slot 0: a Register H2D FIS for `opcode` with one PRD of `len`
    /// bytes at BUF.
    fn command(p: &Port, opcode: u8, lba: u64, count: u16, len: u32, write: bool) {
        command_in(p, 0, opcode, lba, count, len, write)
    }

    /// The same in `slot`, with its table and buffer after slot 0's.
    fn command_in(p: &Port, slot: u8, opcode: u8, lba: u64, count: u16, len: u32, write: bool) {
        let (ctba, buf) = (CTBA + slot as u64 * 0x100, BUF + slot as u64 * 0x10000);
        let dw0: u32 = 5 | if write { 1 << 6 } else { 0 } | 1 << 16;
        let mut h = [0u8; 32];
        h[0..4].copy_from_slice(&dw0.to_le_bytes());
        h[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        h[8..16].copy_from_slice(&ctba.to_le_bytes());
        p.mem
            .write_slice(&h, GuestAddress(CLB + 32 * slot as u64))
            .unwrap();
        let mut f = [0u8; 20];
        f[0] = fis::fis_type::REG_H2D;
        f[1] = 0x80;
        f[2] = opcode;
        f[4..7].copy_from_slice(&lba.to_le_bytes()[..3]);
        f[7] = 0x40;
        f[8..11].copy_from_slice(&lba.to_le_bytes()[3..6]);
        if opcode == fis::READ_FPDMA_QUEUED || opcode == fis::WRITE_FPDMA_QUEUED {
            // Queued: the count in FEATURES, the tag in COUNT 7:3.
            f[3] = count as u8;
            f[11] = (count >> 8) as u8;
            f[12] = slot << 3;
        } else {
            f[12..14].copy_from_slice(&count.to_le_bytes());
        }
        p.mem.write_slice(&f, GuestAddress(ctba)).unwrap();
        let mut prd = [0u8; 16];
        prd[0..8].copy_from_slice(&buf.to_le_bytes());
        prd[12..16].copy_from_slice(&(len - 1).to_le_bytes());
        p.mem.write_slice(&prd, GuestAddress(ctba + 0x80)).unwrap();
    }

    fn prdbc(p: &Port) -> u32 {
        p.mem.read_obj::<u32>(GuestAddress(CLB + 4)).unwrap()
    }

    fn d2h(p: &Port) -> [u8; 20] {
        let mut f = [0u8; 20];
        p.mem
            .read_slice(&mut f, GuestAddress(FB + rfis::REG_D2H))
            .unwrap();
        f
    }

    /// Runs a [`PortIo`] to its end, as the HBA's completion would.
    fn run(p: &mut Port, io: PortIo) -> Vec<PortIo> {
        let (tx, rx) = std::sync::mpsc::channel();
        let n = io.reqs.len();
        for req in io.reqs {
            let tx = tx.clone();
            io.backend.submit(
                req,
                Box::new(move |_, r| {
                    let _ = tx.send(r.is_ok());
                }),
            );
        }
        let ok = (0..n).all(|_| rx.recv().unwrap());
        p.complete(io.ticket, ok)
    }

    /// A DMA write whose request never completes on the source (as one
    /// the block layer parked): the destination runs it again from the
    /// command in guest RAM and completes the slot.
    #[test]
    fn an_outstanding_write_is_reissued_on_the_destination() {
        let mut a = port();
        a.write(port::IS, u32::MAX);
        command(&a, ata_cmd::WRITE_DMA_EXT, 100, 8, 4096, true);
        let lost = a.write(port::CI, 1).pop().expect("a write");
        assert_eq!(a.outstanding, 1);
        let mut b = migrate(&a);
        assert_eq!((b.regs.ci, b.active, b.outstanding), (1, Some(0), 1));
        let mut ios = b.reissue();
        assert_eq!(ios.len(), 1);
        assert_eq!(ios[0].ticket.lba, Some(100));
        assert!(run(&mut b, ios.remove(0)).is_empty());
        assert_eq!((b.regs.ci, b.outstanding, b.active), (0, 0, None));
        assert_eq!(prdbc(&b), 4096);
        assert_eq!(d2h(&b)[..3], [fis::fis_type::REG_D2H, 0x40, 0x50]);
        assert_ne!(b.regs.is & is::DHRS, 0);
        assert!(b.irq_pending());
        // Nothing on the source assumed it completed; a completion that
        // does come there finishes the slot as usual.
        assert_eq!(a.regs.ci, 1);
        assert!(run(&mut a, lost).is_empty());
        assert_eq!((a.regs.ci, a.outstanding), (0, 0));
        // A completed or stopped port has nothing to re-issue.
        assert!(migrate(&a).reissue().is_empty());
        command(&a, ata_cmd::FLUSH_CACHE_EXT, 0, 0, 512, false);
        let _flush = a.write(port::CI, 1).pop().expect("a flush");
        a.write(port::CMD, cmd::FRE);
        assert_eq!(a.outstanding, 0, "stopping the engine drops it");
    }

    /// Queued commands: the one still outstanding is re-queued without
    /// touching PxCI or PxSACT and completes with its Set Device Bits FIS;
    /// one rewritten in RAM meanwhile fails with ERR.
    #[test]
    fn outstanding_queued_commands_are_requeued() {
        let mut a = port();
        a.write(port::IS, u32::MAX);
        command_in(&a, 0, fis::WRITE_FPDMA_QUEUED, 8, 8, 4096, true);
        command_in(&a, 1, fis::READ_FPDMA_QUEUED, 16, 8, 4096, false);
        command_in(&a, 2, fis::READ_FPDMA_QUEUED, 24, 1, 512, false);
        a.write(port::SACT, 0b111);
        let mut ios = a.write(port::CI, 0b111);
        assert_eq!(ios.len(), 3);
        assert!(run(&mut a, ios.remove(1)).is_empty());
        assert_eq!((a.regs.sact, a.outstanding), (0b101, 0b101));
        let mut b = migrate(&a);
        // Slot 2's FIS is no longer a queued command.
        b.mem
            .write_slice(&[ata_cmd::READ_DMA_EXT], GuestAddress(CTBA + 0x200 + 2))
            .unwrap();
        let mut ios = b.reissue();
        assert_eq!(ios.len(), 1);
        assert!(ios[0].ticket.ncq && ios[0].ticket.slot == 0);
        assert_eq!((b.regs.ci, b.regs.sact), (0, 0b101));
        assert_ne!(b.regs.is & is::TFES, 0, "slot 2 failed");
        // The failure stopped the engine; slot 0's completion still lands.
        b.write(port::IS, u32::MAX);
        assert!(run(&mut b, ios.remove(0)).is_empty());
        assert_eq!(b.regs.sact & 1, 0);
        let mut sdb = [0u8; 8];
        b.mem
            .read_slice(&mut sdb, GuestAddress(FB + rfis::SET_DEVICE_BITS))
            .unwrap();
        assert_eq!(u32::from_le_bytes(sdb[4..8].try_into().unwrap()), 0b1);
        assert_ne!(b.regs.is & is::SDBS, 0);
        assert_eq!(b.outstanding, 0);
    }

    /// A TRIM halted in its discards starts again from its first range.
    #[test]
    fn an_outstanding_trim_restarts() {
        let mut a = port();
        let mut payload = [0u8; 512];
        payload[0..8].copy_from_slice(&(8u64 | 8 << 48).to_le_bytes());
        a.mem.write_slice(&payload, GuestAddress(BUF)).unwrap();
        command(&a, ata_cmd::DATA_SET_MANAGEMENT, 0, 1, 512, true);
        a.mem.write_slice(&[1], GuestAddress(CTBA + 3)).unwrap();
        let _lost = a.write(port::CI, 1).pop().expect("discards");
        let mut b = migrate(&a);
        let io = b.reissue().pop().expect("the discards again");
        assert_eq!(io.reqs.len(), 1);
        assert!(run(&mut b, io).is_empty());
        assert_eq!((b.regs.ci, b.regs.tfd & 0xff, prdbc(&b)), (0, 0x50, 512));
    }

    #[test]
    fn hostile_port_states_are_refused() {
        let mut a = port();
        command(&a, ata_cmd::WRITE_DMA_EXT, 100, 8, 4096, true);
        let _lost = a.write(port::CI, 1);
        let mut b = fresh_port(a.mem.clone());
        let load = |b: &mut Port, f: &dyn Fn(&mut serde_json::Value)| {
            crate::migration::load_edited(&a, b, f)
        };
        let e = load(&mut b, &|v| v["active"] = 32.into());
        assert!(e.contains("active slot 32"), "{e}");
        let e = load(&mut b, &|v| v["retry"] = 0b10.into());
        assert!(e.contains("re-issue"), "{e}");
        let e = load(&mut b, &|v| v["regs"]["cmd"] = 0.into());
        assert!(e.contains("re-issue"), "{e}");
        let e = load(&mut b, &|v| v["device"] = serde_json::Value::Null);
        assert!(
            e.contains("none on the source") || e.contains("no device"),
            "{e}"
        );
        let e = load(&mut b, &|v| v["device"]["sectors"] = 7.into());
        assert!(e.contains("7 sectors"), "{e}");
        let e = load(&mut b, &|v| v["device"]["multiple"] = 3.into());
        assert!(e.contains("out of range"), "{e}");
        let e = load(&mut b, &|v| {
            v["device"]["mode"] = serde_json::json!({"UltraDma": 200})
        });
        assert!(e.contains("out of range"), "{e}");
        let e = load(&mut b, &|v| v["regs"]["extra"] = 1.into());
        assert!(e.contains("unknown field"), "{e}");
        let mut empty = Port::new(a.mem.clone());
        let e = crate::migration::load_edited(&a, &mut empty, |_| {});
        assert!(e.contains("none here"), "{e}");
    }

    #[test]
    fn signature_after_attach() {
        let p = port();
        assert_eq!(p.regs.sig, 0x101);
        assert_eq!(p.regs.ssts, 0x113);
        assert_eq!(p.regs.tfd & 0xff, 0x50);
    }

    #[test]
    fn identify_by_pio_setup_into_the_prdt() {
        let mut p = port();
        command(&p, ata_cmd::IDENTIFY, 0, 0, 512, false);
        assert!(p.write(port::CI, 1).is_empty(), "no block I/O");
        assert_eq!(p.regs.ci, 0);
        assert_eq!(prdbc(&p), 512);
        let mut id = [0u8; 512];
        p.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
        // Word 0: a fixed ATA device; words 60-61: 2048 sectors.
        assert_eq!(u16::from_le_bytes([id[0], id[1]]) & 0x8000, 0);
        assert_eq!(u16::from_le_bytes([id[120], id[121]]), 2048);
        let mut ps = [0u8; 20];
        p.mem
            .read_slice(&mut ps, GuestAddress(FB + rfis::PIO_SETUP))
            .unwrap();
        assert_eq!(ps[0], fis::fis_type::PIO_SETUP);
        assert_eq!(u16::from_le_bytes([ps[16], ps[17]]), 512);
        assert_eq!(d2h(&p)[..3], [fis::fis_type::REG_D2H, 0x40, 0x50]);
        assert_eq!(p.regs.is & (is::PSS | is::DHRS), is::PSS | is::DHRS);
        assert!(p.irq_pending());
    }

    #[test]
    fn dma_read_and_write_through_the_block_layer() {
        let mut p = port();
        p.mem.write_slice(&[0xaa; 4096], GuestAddress(BUF)).unwrap();
        command(&p, ata_cmd::READ_DMA_EXT, 100, 8, 4096, false);
        let io = p.write(port::CI, 1).pop().expect("a read");
        assert_eq!(p.regs.ci, 1, "still running");
        assert!(run(&mut p, io).is_empty());
        assert_eq!(p.regs.ci, 0);
        assert_eq!(prdbc(&p), 4096);
        let mut back = [1u8; 4096];
        p.mem.read_slice(&mut back, GuestAddress(BUF)).unwrap();
        assert!(back.iter().all(|&b| b == 0), "null-co reads zeroes");
        command(&p, ata_cmd::WRITE_DMA_EXT, 100, 8, 4096, true);
        let io = p.write(port::CI, 1).pop().expect("a write");
        assert!(run(&mut p, io).is_empty());
        assert_eq!((p.regs.ci, p.regs.tfd & 0xff), (0, 0x50));
    }

    #[test]
    fn errors_stop_the_list_with_tfes() {
        let mut p = port();
        // A transfer past the end of the 1 MiB disk.
        command(&p, ata_cmd::READ_DMA_EXT, 4096, 8, 4096, false);
        assert!(p.write(port::CI, 1).is_empty());
        assert_eq!(p.regs.ci, 1, "the failed slot stays issued");
        assert_ne!(p.regs.is & is::TFES, 0);
        assert_eq!(p.regs.tfd & 0xff, (status::DRDY | status::ERR) as u32);
        assert_eq!(d2h(&p)[2] & status::ERR, status::ERR);
        // A PRDT too short for the transfer is refused before any I/O.
        let mut p = port();
        command(&p, ata_cmd::READ_DMA_EXT, 0, 8, 512, false);
        assert!(p.write(port::CI, 1).is_empty());
        assert_ne!(p.regs.is & is::TFES, 0);
        // A table outside guest memory is an interface error.
        let mut p = port();
        command(&p, ata_cmd::READ_DMA_EXT, 0, 1, 512, false);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&(5u32 | 1 << 16).to_le_bytes());
        h[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        p.mem.write_slice(&h, GuestAddress(CLB)).unwrap();
        assert!(p.write(port::CI, 1).is_empty());
        assert_ne!(p.regs.is & is::IFS, 0);
    }

    #[test]
    fn stop_drops_a_running_command() {
        let mut p = port();
        command(&p, ata_cmd::READ_DMA_EXT, 0, 8, 4096, false);
        let io = p.write(port::CI, 1).pop().unwrap();
        p.write(port::CMD, cmd::FRE);
        assert_eq!(p.regs.ci, 0);
        assert!(run(&mut p, io).is_empty());
        assert_eq!(prdbc(&p), 0xdead_beef, "a stale completion writes nothing");
    }

    /// Two queued commands are accepted together (their slots leave PxCI
    /// at once, PxSACT holds them), complete in any order by Set Device
    /// Bits FISes, and raise SDBS, not DHRS.
    #[test]
    fn queued_commands_run_together_and_complete_out_of_order() {
        let mut p = port();
        assert_ne!(p.regs.is & is::DHRS, 0, "the signature FIS");
        p.write(port::IS, u32::MAX);
        command_in(&p, 0, fis::WRITE_FPDMA_QUEUED, 8, 8, 4096, true);
        command_in(&p, 1, fis::READ_FPDMA_QUEUED, 16, 8, 4096, false);
        p.write(port::SACT, 0b11);
        let mut ios = p.write(port::CI, 0b11);
        assert_eq!(ios.len(), 2);
        assert_eq!((p.regs.ci, p.regs.sact), (0, 0b11));
        let first = ios.remove(0);
        assert!(run(&mut p, ios.remove(0)).is_empty());
        assert_eq!(p.regs.sact, 0b01, "slot 1 first");
        let mut sdb = [0u8; 8];
        p.mem
            .read_slice(&mut sdb, GuestAddress(FB + rfis::SET_DEVICE_BITS))
            .unwrap();
        assert_eq!(sdb[0], fis::fis_type::SET_DEVICE_BITS);
        assert_eq!(u32::from_le_bytes(sdb[4..8].try_into().unwrap()), 0b10);
        assert!(run(&mut p, first).is_empty());
        assert_eq!(p.regs.sact, 0);
        assert_eq!(p.regs.is & (is::SDBS | is::DHRS), is::SDBS);
        // A tag that is not its slot is refused.
        command_in(&p, 2, fis::READ_FPDMA_QUEUED, 0, 1, 512, false);
        p.mem
            .write_slice(&[3 << 3], GuestAddress(CTBA + 0x200 + 12))
            .unwrap();
        p.write(port::SACT, 0b100);
        assert!(p.write(port::CI, 0b100).is_empty());
        assert_ne!(p.regs.is & is::TFES, 0);
    }

    /// TRIM: the payload's ranges become discards (one step for a small
    /// payload), and the command completes with DHRS; a range past the
    /// end aborts before anything is discarded.
    #[test]
    fn trim_discards_the_payload_ranges() {
        let mut p = port();
        let mut payload = [0u8; 512];
        payload[0..8].copy_from_slice(&(8u64 | 8 << 48).to_le_bytes());
        payload[8..16].copy_from_slice(&(100u64 | 16 << 48).to_le_bytes());
        p.mem.write_slice(&payload, GuestAddress(BUF)).unwrap();
        command(&p, ata_cmd::DATA_SET_MANAGEMENT, 0, 1, 512, true);
        let mut h2d = [0u8; 1];
        h2d[0] = 1; // FEATURES bit 0: TRIM
        p.mem.write_slice(&h2d, GuestAddress(CTBA + 3)).unwrap();
        let io = p.write(port::CI, 1).pop().expect("discards");
        assert_eq!(io.reqs.len(), 2);
        assert!(run(&mut p, io).is_empty());
        assert_eq!((p.regs.ci, p.regs.tfd & 0xff), (0, 0x50));
        assert_eq!(prdbc(&p), 512);
        // 2048 sectors: a range ending past them.
        payload[16..24].copy_from_slice(&(2040u64 | 9 << 48).to_le_bytes());
        p.mem.write_slice(&payload, GuestAddress(BUF)).unwrap();
        assert!(p.write(port::CI, 1).is_empty());
        assert_ne!(p.regs.is & is::TFES, 0);
    }

    /// READ DMA (28-bit) with COUNT EXP set moves the 16-bit count, as on
    /// QEMU's AHCI; with COUNT EXP 0 it is the usual 8-bit count.
    #[test]
    fn count_exp_counts_on_28_bit_commands_as_on_qemu() {
        let mut p = port();
        command(&p, ata_cmd::READ_DMA, 0, 0x200, 512 * 512, false);
        let io = p.write(port::CI, 1).pop().expect("a read");
        assert!(run(&mut p, io).is_empty());
        assert_eq!((p.regs.ci, prdbc(&p)), (0, 512 * 512));
        command(&p, ata_cmd::READ_DMA, 0, 0, 512 * 256, false);
        let io = p.write(port::CI, 1).pop().expect("a read");
        assert!(run(&mut p, io).is_empty());
        assert_eq!(prdbc(&p), 512 * 256, "0 is 256 sectors");
    }
}
