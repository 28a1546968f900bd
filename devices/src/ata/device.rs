//! One ATA device without its transport: a disk (general feature set,
//! 48-bit addressing, write cache, SMART, TRIM) or an ATAPI CD/DVD-ROM
//! (PACKET feature set; the packets go to [`crate::scsi::CdRom`]).
//!
//! A transport delivers a command as an opcode and a [`Taskfile`] (the
//! PIIX channel from its registers, AHCI from a Register H2D FIS).
//! [`AtaDevice::command`] parses it (`command.rs`), executes what needs no
//! data and returns an [`Outcome`]: the plan the transport carries out
//! with its own data path (PIO blocks, bus-master or AHCI DMA), status
//! byte and interrupt. Output registers (CHECK POWER MODE's count, SMART
//! RETURN STATUS, the signature after a reset) are written into the
//! taskfile; the transport reports them (PIIX through its registers, AHCI
//! in a Register D2H FIS).
//!
//! What belongs to the device: the medium, identity (model, serial, WWN,
//! physical block size), CHS geometry and translation, the multiple count,
//! SMART, the transfer mode, the power mode, and the write cache (the
//! backend's WCE). The taskfile shadow, status and error registers, PIO
//! buffers and DMA belong to the transport.

use std::sync::Arc;

use block::backend::BlockBackend;

use super::command::{cmd, error, AtaCommand, DriveInfo, Power, Refusal, Taskfile, Xfer};
use super::geometry::{self, Geometry, Translation};
use super::identify::{self, IdentifyParams, XferMode};
use super::smart;
use crate::scsi::CdRom;

pub const SECTOR: u64 = 512;

/// The error register after a reset or EXECUTE DEVICE DIAGNOSTIC: code
/// 01h, device 0 passed (ATA8-ACS table 32).
pub const DIAG_OK: u8 = 0x01;

/// What is attached at a device position.
pub enum Media {
    Disk(Arc<BlockBackend>),
    Cd(CdRom),
}

/// How a drive is configured (from `-device ide-hd|ide-cd`).
pub struct DriveConfig {
    pub media: Media,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub wwn: Option<u64>,
    pub physical_block_size: u32,
    pub geometry: Option<Geometry>,
    pub translation: Option<Translation>,
}

/// What the transport does to finish a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Completed without data; output registers are in the taskfile.
    Done,
    /// Completed with ERR: `error` is the error register; `lba`, when
    /// there is one, the failing address to report in the taskfile.
    Fail { error: u8, lba: Option<u64> },
    /// PIO data-in of data the device built (IDENTIFY, SMART, logs).
    DataIn(Vec<u8>),
    /// Read `count` sectors at `lba` of [`AtaDevice::disk`]. PIO commands
    /// move [`AtaDevice::drq_block`] sectors per DRQ block.
    Read { lba: u64, count: u32, xfer: Xfer },
    /// Write `count` sectors at `lba`, forced unit access if `fua`.
    Write {
        lba: u64,
        count: u32,
        xfer: Xfer,
        fua: bool,
    },
    /// Flush the disk's write cache.
    Flush,
    /// DATA SET MANAGEMENT TRIM: `blocks` 512-byte blocks of range
    /// entries follow by DMA; [`AtaDevice::trim_ranges`] decodes them.
    Trim { blocks: u16 },
    /// PACKET: the transport takes the 12-byte command packet (DMA data if
    /// `dma`) and runs it on [`AtaDevice::cdrom`].
    Packet { dma: bool },
    /// DEVICE RESET (no interrupt) or EXECUTE DEVICE DIAGNOSTIC: the
    /// device is reset and shows its signature in the taskfile; the error
    /// register holds [`DIAG_OK`].
    Reset { diagnostic: bool },
}

impl Outcome {
    fn abort() -> Outcome {
        Outcome::Fail {
            error: error::ABRT,
            lba: None,
        }
    }
}

pub struct AtaDevice {
    media: Media,
    model: String,
    serial: String,
    wwn: Option<u64>,
    phys_exp: u8,
    pub geometry: Geometry,
    pub translation: Translation,
    cur_heads: u32,
    cur_secs: u32,
    multiple: u32,
    smart: bool,
    mode: XferMode,
    standby: bool,
    slave: bool,
}

impl AtaDevice {
    /// A device in its power-on state. `index` numbers the default serial
    /// (`QM0000n`, n = index + 1); `slave` is IDENTIFY word 93's device 1
    /// (a parallel ATA position; false elsewhere). Reads sector 0 of a
    /// disk to guess its geometry.
    pub fn new(cfg: DriveConfig, index: u32, slave: bool) -> Result<AtaDevice, String> {
        let (sectors, sector0) = match &cfg.media {
            Media::Disk(b) => {
                let mut s0 = vec![0u8; 512];
                if b.len() >= 512 {
                    b.read_at(0, &mut s0)
                        .map_err(|e| format!("cannot read sector 0: {e}"))?;
                }
                (b.len() / SECTOR, s0)
            }
            Media::Cd(_) => (0, vec![]),
        };
        let (geometry, translation) =
            geometry::guess(sectors, &sector0, cfg.geometry, cfg.translation);
        let pbs = cfg.physical_block_size.max(512);
        if !pbs.is_power_of_two() || pbs > 512 << 15 {
            return Err(format!(
                "physical_block_size={pbs} must be a power of two between 512 and 16 MiB"
            ));
        }
        let is_cd = matches!(cfg.media, Media::Cd(_));
        let mut d = AtaDevice {
            media: cfg.media,
            model: cfg.model.unwrap_or_else(|| {
                if is_cd {
                    "QEMU DVD-ROM".into()
                } else {
                    "QEMU HARDDISK".into()
                }
            }),
            serial: cfg.serial.unwrap_or_else(|| format!("QM{:05}", index + 1)),
            wwn: cfg.wwn,
            phys_exp: (pbs / 512).trailing_zeros() as u8,
            geometry,
            translation,
            cur_heads: geometry.heads,
            cur_secs: geometry.secs,
            multiple: 0,
            smart: true,
            mode: XferMode::UltraDma(5),
            standby: false,
            slave,
        };
        if let Media::Cd(cd) = &mut d.media {
            cd.set_product(&d.model);
        }
        Ok(d)
    }

    pub fn is_atapi(&self) -> bool {
        matches!(self.media, Media::Cd(_))
    }

    /// Capacity in 512-byte sectors (0 for a CD-ROM).
    pub fn sectors(&self) -> u64 {
        match &self.media {
            Media::Disk(b) => b.len() / SECTOR,
            Media::Cd(_) => 0,
        }
    }

    pub fn cdrom(&mut self) -> Option<&mut CdRom> {
        match &mut self.media {
            Media::Cd(c) => Some(c),
            Media::Disk(_) => None,
        }
    }

    pub fn disk(&self) -> Option<&Arc<BlockBackend>> {
        match &self.media {
            Media::Disk(b) => Some(b),
            Media::Cd(_) => None,
        }
    }

    /// Sectors per DRQ block of a PIO read or write.
    pub fn drq_block(&self, xfer: Xfer) -> u32 {
        match xfer {
            Xfer::Multiple => self.multiple,
            Xfer::Pio | Xfer::Dma => 1,
        }
    }

    /// The signature a device shows after a reset (ATA8-ACS 9.12), in the
    /// layout of AHCI's PxSIG: LBA high, LBA mid, LBA low, count.
    pub fn signature(&self) -> u32 {
        if self.is_atapi() {
            0xeb14_0101
        } else {
            0x0000_0101
        }
    }

    /// Puts the signature in the count and LBA registers.
    pub fn set_signature(&self, tf: &mut Taskfile) {
        let s = self.signature();
        tf.nsector = s as u8;
        tf.sector = (s >> 8) as u8;
        tf.lcyl = (s >> 16) as u8;
        tf.hcyl = (s >> 24) as u8;
    }

    /// Power-on, software or DEVICE RESET: the signature in the taskfile
    /// (DEV and LBA kept, head bits cleared) and the CD-ROM's sense reset.
    /// The transport sets the error register to [`DIAG_OK`] and its status.
    pub fn reset(&mut self, tf: &mut Taskfile) {
        tf.select &= 0xf0;
        self.set_signature(tf);
        if let Media::Cd(cd) = &mut self.media {
            cd.reset();
        }
    }

    /// What command parsing needs to know about the device.
    pub fn info(&self) -> DriveInfo {
        DriveInfo {
            atapi: self.is_atapi(),
            sectors: self.sectors(),
            heads: self.cur_heads,
            secs: self.cur_secs,
            multiple: self.multiple,
            max_dsm_blocks: identify::MAX_DSM_BLOCKS,
        }
    }

    /// IDENTIFY DEVICE data (IDENTIFY PACKET DEVICE for ATAPI) with the
    /// current settings.
    pub fn identify(&self) -> [u8; 512] {
        let write_cache = self.disk().is_some_and(|b| b.write_cache_enabled());
        let p = IdentifyParams {
            model: &self.model,
            serial: &self.serial,
            firmware: "2.5+",
            wwn: self.wwn,
            sectors: self.sectors(),
            cyls: self.geometry.cyls.min(65535) as u16,
            heads: self.geometry.heads as u16,
            secs: self.geometry.secs as u16,
            cur_heads: self.cur_heads as u16,
            cur_secs: self.cur_secs as u16,
            multiple: self.multiple as u16,
            write_cache,
            smart_enabled: self.smart,
            mode: self.mode,
            phys_exp: self.phys_exp,
            slave: self.slave,
        };
        if self.is_atapi() {
            identify::identify_packet(&p)
        } else {
            identify::identify_disk(&p)
        }
    }

    pub fn parse(&self, opcode: u8, tf: &Taskfile) -> Result<AtaCommand, Refusal> {
        AtaCommand::parse(opcode, tf, &self.info())
    }

    /// Parses and executes the command `opcode` with the registers in `tf`.
    pub fn command(&mut self, opcode: u8, tf: &mut Taskfile) -> Outcome {
        match self.parse(opcode, tf) {
            Ok(c) => self.execute(c, tf),
            Err(r) => {
                // A packet device aborts IDENTIFY DEVICE and shows its
                // signature, which is how hosts tell it from a disk.
                if self.is_atapi() && opcode == cmd::IDENTIFY {
                    self.set_signature(tf);
                }
                Outcome::Fail {
                    error: r.error_bits(),
                    lba: None,
                }
            }
        }
    }

    /// Executes a parsed command. Commands of the other device type abort
    /// and disk transfers outside the medium are IDNF, as `parse` would
    /// have refused them, so a transport may also build commands itself.
    pub fn execute(&mut self, c: AtaCommand, tf: &mut Taskfile) -> Outcome {
        let packet_only = matches!(
            c,
            AtaCommand::Packet { .. } | AtaCommand::IdentifyPacket | AtaCommand::DeviceReset
        );
        let both = matches!(
            c,
            AtaCommand::ExecuteDiagnostic | AtaCommand::SetFeatures { .. } | AtaCommand::Power(_)
        );
        if !both && packet_only != self.is_atapi() {
            return Outcome::abort();
        }
        let in_range = |lba: u64, count: u32| {
            lba.checked_add(count as u64)
                .is_some_and(|end| end <= self.sectors())
        };
        match c {
            AtaCommand::Identify | AtaCommand::IdentifyPacket => {
                Outcome::DataIn(self.identify().to_vec())
            }
            AtaCommand::Packet { dma } => Outcome::Packet { dma },
            AtaCommand::DeviceReset => {
                self.reset(tf);
                Outcome::Reset { diagnostic: false }
            }
            AtaCommand::ExecuteDiagnostic => {
                self.reset(tf);
                Outcome::Reset { diagnostic: true }
            }
            AtaCommand::Seek => Outcome::Done,
            AtaCommand::Read {
                lba, count, xfer, ..
            } => {
                if !in_range(lba, count) {
                    return Outcome::Fail {
                        error: error::IDNF,
                        lba: None,
                    };
                }
                Outcome::Read { lba, count, xfer }
            }
            AtaCommand::Write {
                lba,
                count,
                xfer,
                fua,
                ..
            } => {
                if !in_range(lba, count) {
                    return Outcome::Fail {
                        error: error::IDNF,
                        lba: None,
                    };
                }
                Outcome::Write {
                    lba,
                    count,
                    xfer,
                    fua,
                }
            }
            AtaCommand::Verify { lba, count } => {
                if !in_range(lba, count) {
                    return Outcome::Fail {
                        error: error::IDNF,
                        lba: None,
                    };
                }
                Outcome::Done
            }
            AtaCommand::Flush => Outcome::Flush,
            AtaCommand::SetFeatures { subcommand, count } => self.set_features(subcommand, count),
            AtaCommand::SetMultiple { count } => {
                self.multiple = count as u32;
                Outcome::Done
            }
            AtaCommand::InitializeParams { heads, sectors } => {
                self.cur_heads = heads as u32;
                self.cur_secs = sectors as u32;
                Outcome::Done
            }
            AtaCommand::Power(p) => {
                match p {
                    Power::Idle => self.standby = false,
                    Power::Standby | Power::Sleep => self.standby = true,
                    // The result is in the count register.
                    Power::Check => tf.nsector = if self.standby { 0x00 } else { 0xff },
                }
                Outcome::Done
            }
            AtaCommand::Trim { blocks } => Outcome::Trim { blocks },
            AtaCommand::Smart {
                feature,
                count,
                lba_low,
            } => self.smart(feature, count, lba_low, tf),
        }
    }

    /// The LBA ranges (first sector, sector count) of a DATA SET
    /// MANAGEMENT TRIM payload (ATA8-ACS 7.10.3.2: 8-byte entries, LBA in
    /// bits 47:0 and count in 63:48; entries with count 0 are padding). A
    /// range past the end of the medium aborts the whole command.
    pub fn trim_ranges(&self, payload: &[u8]) -> Result<Vec<(u64, u64)>, Refusal> {
        let sectors = self.sectors();
        let mut ranges = Vec::new();
        for e in payload.chunks_exact(8) {
            let v = u64::from_le_bytes(e.try_into().unwrap_or([0; 8]));
            let (lba, n) = (v & 0xffff_ffff_ffff, v >> 48);
            if n == 0 {
                continue;
            }
            if lba + n > sectors {
                return Err(Refusal::Abort);
            }
            ranges.push((lba, n));
        }
        Ok(ranges)
    }

    /// SET FEATURES (ATA8-ACS 7.48).
    fn set_features(&mut self, sub: u8, count: u8) -> Outcome {
        match sub {
            // Write cache on/off flips the backend's WCE, which makes
            // writes FUA (cache=writethrough semantics) while it is off.
            0x02 | 0x82 => match self.disk() {
                Some(b) => b.set_write_cache(sub == 0x02),
                None => return Outcome::abort(),
            },
            0x03 => {
                let mode = match count >> 3 {
                    0 | 1 if count < 0x10 => XferMode::Pio(count.saturating_sub(8).min(4)),
                    4 if count & 7 <= 2 => XferMode::MultiwordDma(count & 7),
                    8 if count & 7 <= 5 => XferMode::UltraDma(count & 7),
                    _ => return Outcome::abort(),
                };
                if let XferMode::Pio(n) = mode {
                    if count >= 8 && n > 4 {
                        return Outcome::abort();
                    }
                }
                self.mode = mode;
            }
            // Look-ahead, APM, reverting to defaults, 8-bit PIO off, ... are
            // accepted and have no effect on a virtual disk.
            0x05 | 0x85 | 0x55 | 0xaa | 0x66 | 0xcc | 0x42 | 0xc2 | 0x69 | 0x67 | 0x96 | 0x9a => {}
            _ => return Outcome::abort(),
        }
        Outcome::Done
    }

    /// SMART (ATA8-ACS 7.52): enable/disable, attribute autosave, return
    /// status, read data/thresholds, immediate offline, and the summary
    /// error log and self-test log (both empty).
    fn smart(&mut self, feature: u8, count: u8, lba_low: u8, tf: &mut Taskfile) -> Outcome {
        if !self.smart && feature != 0xd8 {
            return Outcome::abort();
        }
        match feature {
            0xd8 | 0xd9 => {
                self.smart = feature == 0xd8;
                Outcome::Done
            }
            0xd2 | 0xd4 => Outcome::Done,
            0xda => {
                // No threshold exceeded: the signature stays in LBA mid/high.
                tf.lcyl = 0x4f;
                tf.hcyl = 0xc2;
                Outcome::Done
            }
            0xd0 => Outcome::DataIn(smart::data(false)),
            0xd1 => Outcome::DataIn(smart::data(true)),
            0xd5 if count == 1 && (lba_low == 1 || lba_low == 6) => {
                Outcome::DataIn(smart::empty_log())
            }
            _ => Outcome::abort(),
        }
    }
}
