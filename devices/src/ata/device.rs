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
use crate::migration::DeviceState;
use crate::scsi::{CdRom, Lun};
use serde::{Deserialize, Serialize};

pub const SECTOR: u64 = 512;

/// The firmware revision's length: IDENTIFY words 23..26.
pub const FIRMWARE_LEN: usize = 8;
/// QEMU's hardware version string, the default firmware revision.
pub const DEFAULT_FIRMWARE: &str = "2.5+";

/// The error register after a reset or EXECUTE DEVICE DIAGNOSTIC: code
/// 01h, device 0 passed (ATA8-ACS table 32).
pub const DIAG_OK: u8 = 0x01;

/// What is attached at a device position.
pub enum Media {
    Disk(Arc<BlockBackend>),
    Cd(Arc<CdRom>),
}

/// How a drive is configured (from `-device ide-hd|ide-cd`).
pub struct DriveConfig {
    pub media: Media,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub wwn: Option<u64>,
    /// Firmware revision (`ver=`): IDENTIFY words 23..26 and the ATAPI
    /// INQUIRY revision; QEMU's version string "2.5+" when not given.
    /// Longer than [`FIRMWARE_LEN`] bytes is cut, as QEMU does.
    pub version: Option<String>,
    pub physical_block_size: u32,
    pub geometry: Option<Geometry>,
    pub translation: Option<Translation>,
}

impl DriveConfig {
    /// `media` with every property at its default (QEMU's model, serial
    /// and firmware strings, 512-byte blocks, geometry guessed).
    pub fn new(media: Media) -> DriveConfig {
        DriveConfig {
            media,
            model: None,
            serial: None,
            wwn: None,
            version: None,
            physical_block_size: 512,
            geometry: None,
            translation: None,
        }
    }
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
    firmware: String,
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
    /// Native Command Queuing (a SATA device behind AHCI): IDENTIFY says
    /// so and the transport accepts READ/WRITE FPDMA QUEUED.
    ncq: bool,
}

/// The firmware revision from `ver=`: at most [`FIRMWARE_LEN`] bytes
/// (cut at a character boundary), [`DEFAULT_FIRMWARE`] when not given.
fn firmware(version: Option<&str>) -> String {
    let v = version.unwrap_or(DEFAULT_FIRMWARE);
    let mut end = v.len().min(FIRMWARE_LEN);
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    v[..end].to_string()
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
        let d = AtaDevice {
            media: cfg.media,
            model: cfg.model.unwrap_or_else(|| {
                if is_cd {
                    "QEMU DVD-ROM".into()
                } else {
                    "QEMU HARDDISK".into()
                }
            }),
            serial: cfg.serial.unwrap_or_else(|| format!("QM{:05}", index + 1)),
            firmware: firmware(cfg.version.as_deref()),
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
            ncq: false,
        };
        if let Media::Cd(cd) = &d.media {
            cd.set_product(&d.model);
            cd.set_revision(&d.firmware);
        }
        Ok(d)
    }

    /// Makes a disk advertise NCQ with 32 tags (the AHCI port does; a
    /// parallel IDE channel has no queuing).
    pub fn enable_ncq(&mut self) {
        self.ncq = !self.is_atapi();
    }

    pub fn ncq(&self) -> bool {
        self.ncq
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

    pub fn cdrom(&self) -> Option<&CdRom> {
        match &self.media {
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
        if let Media::Cd(cd) = &self.media {
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
            firmware: &self.firmware,
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
            ncq: self.ncq,
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
                // DEV (and LBA) cleared: device 0 reports the result
                // (ATA/ATAPI-6 9.10; QEMU since 7.1 leaves A0h).
                tf.select = 0xa0;
                Outcome::Reset { diagnostic: true }
            }
            AtaCommand::Seek => Outcome::Done,
            AtaCommand::ReadNativeMax { ext } => {
                let last = self.sectors().saturating_sub(1);
                let last = if ext { last } else { last.min(0x0fff_ffff) };
                tf.set_lba(last, ext);
                Outcome::Done
            }
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

/// A device's runtime settings, and what identifies its medium (checked,
/// not taken over: the destination's device comes from the same command
/// line). The geometry is carried because it was guessed from sector 0,
/// which the guest may have rewritten since. A CD-ROM's MMC state (sense,
/// tray, medium) is not here: AHCI with a CD-ROM does not migrate
/// ([`crate::ahci::hba::Ahci::migration_blocker`]).
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AtaDeviceState {
    pub atapi: bool,
    pub sectors: u64,
    pub geometry: Geometry,
    pub translation: Translation,
    pub cur_heads: u32,
    pub cur_secs: u32,
    pub multiple: u32,
    pub smart: bool,
    pub mode: XferMode,
    pub standby: bool,
    /// The backend's write cache (SET FEATURES 02h/82h); none for a CD.
    pub write_cache: Option<bool>,
}

impl DeviceState for AtaDevice {
    const VERSION: u32 = 1;
    type State = AtaDeviceState;
    fn save_state(&self) -> AtaDeviceState {
        AtaDeviceState {
            atapi: self.is_atapi(),
            sectors: self.sectors(),
            geometry: self.geometry,
            translation: self.translation,
            cur_heads: self.cur_heads,
            cur_secs: self.cur_secs,
            multiple: self.multiple,
            smart: self.smart,
            mode: self.mode,
            standby: self.standby,
            write_cache: self.disk().map(|b| b.write_cache_enabled()),
        }
    }
    fn load_state(&mut self, s: AtaDeviceState, _version: u32) -> Result<(), String> {
        if s.atapi != self.is_atapi() || s.sectors != self.sectors() {
            return Err(format!(
                "ATA device: the source's is {} of {} sectors, this one {} of {}",
                if s.atapi { "a CD-ROM" } else { "a disk" },
                s.sectors,
                if self.is_atapi() {
                    "a CD-ROM"
                } else {
                    "a disk"
                },
                self.sectors()
            ));
        }
        if s.write_cache.is_some() != self.disk().is_some() {
            return Err(
                "ATA device: a write cache setting for a CD-ROM, or none for a disk".into(),
            );
        }
        // What commands can set: INITIALIZE DEVICE PARAMETERS (1-16
        // heads, 0-255 sectors), SET MULTIPLE MODE, SET FEATURES 03h.
        let mode_ok = match s.mode {
            XferMode::Pio(n) => n <= 4,
            XferMode::MultiwordDma(n) => n <= 2,
            XferMode::UltraDma(n) => n <= 5,
        };
        let multiple_ok = s.multiple == 0
            || (s.multiple.is_power_of_two() && s.multiple <= identify::MAX_MULTIPLE);
        let g = s.geometry;
        let geometry_ok = g.cyls >= 1 && (1..=16).contains(&g.heads) && (1..=255).contains(&g.secs);
        if !(mode_ok
            && multiple_ok
            && geometry_ok
            && (1..=16).contains(&s.cur_heads)
            && s.cur_secs <= 255)
        {
            return Err(format!("ATA device: settings out of range: {s:?}"));
        }
        self.geometry = s.geometry;
        self.translation = s.translation;
        self.cur_heads = s.cur_heads;
        self.cur_secs = s.cur_secs;
        self.multiple = s.multiple;
        self.smart = s.smart;
        self.mode = s.mode;
        self.standby = s.standby;
        if let (Some(b), Some(on)) = (self.disk(), s.write_cache) {
            b.set_write_cache(on);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::Transport;
    use block::backend::BackendConfig;
    use block::graph::BlockGraph;

    /// 20 cylinders of 16 heads and 63 sectors.
    const SECTORS: u64 = 20 * 16 * 63;

    fn backend() -> Arc<BlockBackend> {
        let g = BlockGraph::new();
        let node = g
            .blockdev_add_str(&format!(
                "driver=null-co,node-name=hd,read-zeroes=on,size={}",
                SECTORS * SECTOR
            ))
            .unwrap();
        BlockBackend::new("hd", node, BackendConfig::default()).unwrap()
    }

    fn config(media: Media) -> DriveConfig {
        DriveConfig::new(media)
    }

    fn disk() -> (AtaDevice, Arc<BlockBackend>) {
        let b = backend();
        let d = AtaDevice::new(config(Media::Disk(b.clone())), 0, false).unwrap();
        (d, b)
    }

    fn cd() -> AtaDevice {
        let cd = CdRom::new(Transport::Atapi, None);
        AtaDevice::new(config(Media::Cd(Arc::new(cd))), 2, true).unwrap()
    }

    /// Registers in LBA mode, as a host sets them before a command.
    fn lba(lba: u64, count: u8) -> Taskfile {
        let mut tf = Taskfile {
            select: 0xe0,
            nsector: count,
            ..Default::default()
        };
        tf.set_lba(lba, false);
        tf
    }

    fn word(id: &[u8], i: usize) -> u16 {
        u16::from_le_bytes([id[2 * i], id[2 * i + 1]])
    }

    fn identify(d: &mut AtaDevice) -> Vec<u8> {
        match d.command(cmd::IDENTIFY, &mut Taskfile::default()) {
            Outcome::DataIn(v) => v,
            o => panic!("IDENTIFY: {o:?}"),
        }
    }

    fn abort() -> Outcome {
        Outcome::Fail {
            error: error::ABRT,
            lba: None,
        }
    }

    fn set_features(d: &mut AtaDevice, sub: u8, count: u8) -> Outcome {
        let mut tf = Taskfile {
            feature: sub,
            nsector: count,
            ..Default::default()
        };
        d.command(cmd::SET_FEATURES, &mut tf)
    }

    fn smart(d: &mut AtaDevice, feature: u8) -> (Outcome, Taskfile) {
        let mut tf = Taskfile {
            feature,
            lcyl: 0x4f,
            hcyl: 0xc2,
            ..Default::default()
        };
        let o = d.command(cmd::SMART, &mut tf);
        (o, tf)
    }

    #[test]
    fn identify_contents() {
        let (mut d, _) = disk();
        let id = identify(&mut d);
        assert_eq!(id.len(), 512);
        assert_eq!(&id[54..68], b"EQUMH RADDSI K");
        assert_eq!(&id[20..28], b"MQ0000 1");
        assert_eq!((word(&id, 1), word(&id, 3), word(&id, 6)), (20, 16, 63));
        let lba28 = word(&id, 60) as u64 | (word(&id, 61) as u64) << 16;
        assert_eq!(lba28, SECTORS);
        assert_eq!(word(&id, 100) as u64, SECTORS);
        assert_eq!(word(&id, 93) & 0x1f00, 0, "device 0");
        assert_eq!(id.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);

        // Model, serial and WWN from the configuration.
        let cfg = DriveConfig {
            model: Some("STRATA DISK".into()),
            serial: Some("S1".into()),
            wwn: Some(0x5000_0000_0000_0001),
            physical_block_size: 4096,
            ..config(Media::Disk(backend()))
        };
        let mut d = AtaDevice::new(cfg, 0, true).unwrap();
        let id = identify(&mut d);
        assert_eq!(&id[54..67], b"TSARATD SI K ");
        assert_eq!(&id[20..22], b"1S");
        assert_eq!(word(&id, 111), 1);
        assert_eq!(word(&id, 106), 0x6003);
        assert_eq!(word(&id, 93) & 0x1f00, 0x0100, "device 1");

        // A packet device aborts IDENTIFY DEVICE and shows its signature.
        let mut c = cd();
        let mut tf = Taskfile::default();
        assert_eq!(c.command(cmd::IDENTIFY, &mut tf), abort());
        assert_eq!(
            (tf.nsector, tf.sector, tf.lcyl, tf.hcyl),
            (1, 1, 0x14, 0xeb)
        );
        let Outcome::DataIn(id) = c.command(cmd::IDENTIFY_PACKET, &mut tf) else {
            panic!("IDENTIFY PACKET");
        };
        assert_eq!(word(&id, 0), 0x85c0);
        assert_eq!(&id[54..66], b"EQUMD DVR-MO");
        assert_eq!(&id[20..28], b"MQ0000 3");
    }

    #[test]
    fn firmware_revision_from_ver() {
        // QEMU's version string by default, words 23..26 space-padded.
        let (mut d, _) = disk();
        assert_eq!(&identify(&mut d)[46..54], b".2+5    ");
        let cfg = DriveConfig {
            version: Some("ABC".into()),
            ..config(Media::Disk(backend()))
        };
        let mut d = AtaDevice::new(cfg, 0, false).unwrap();
        assert_eq!(&identify(&mut d)[46..54], b"BA C    ");
        // At most 8 characters, as QEMU's pstrcpy into char[9].
        let cfg = DriveConfig {
            version: Some("123456789".into()),
            ..config(Media::Disk(backend()))
        };
        let mut d = AtaDevice::new(cfg, 0, false).unwrap();
        assert_eq!(&identify(&mut d)[46..54], b"21436587");
        // The CD-ROM: IDENTIFY PACKET DEVICE and the INQUIRY revision.
        let cfg = DriveConfig {
            version: Some("XYZ".into()),
            ..config(Media::Cd(Arc::new(CdRom::new(Transport::Atapi, None))))
        };
        let mut c = AtaDevice::new(cfg, 2, true).unwrap();
        let mut tf = Taskfile::default();
        let Outcome::DataIn(id) = c.command(cmd::IDENTIFY_PACKET, &mut tf) else {
            panic!("IDENTIFY PACKET");
        };
        assert_eq!(&id[46..54], b"YX Z    ");
        assert_eq!(c.cdrom().unwrap().revision(), "XYZ");
    }

    #[test]
    fn set_features_write_cache_and_modes() {
        let (mut d, b) = disk();
        assert!(b.write_cache_enabled());
        assert_eq!(set_features(&mut d, 0x82, 0), Outcome::Done);
        assert!(!b.write_cache_enabled());
        assert_eq!(word(&identify(&mut d), 85) & 0x20, 0);
        assert_eq!(set_features(&mut d, 0x02, 0), Outcome::Done);
        assert!(b.write_cache_enabled());
        assert_eq!(word(&identify(&mut d), 85) & 0x20, 0x20);
        // A CD has no write cache.
        assert_eq!(set_features(&mut cd(), 0x02, 0), abort());

        // Transfer modes: UDMA 0-5, multiword DMA 0-2, PIO.
        assert_eq!(word(&identify(&mut d), 88), 0x203f, "UDMA 5 by default");
        assert_eq!(set_features(&mut d, 0x03, 0x42), Outcome::Done);
        assert_eq!(word(&identify(&mut d), 88), 0x043f);
        assert_eq!(set_features(&mut d, 0x03, 0x22), Outcome::Done);
        let id = identify(&mut d);
        assert_eq!((word(&id, 63), word(&id, 88)), (0x0407, 0x003f));
        assert_eq!(set_features(&mut d, 0x03, 0x0c), Outcome::Done);
        let id = identify(&mut d);
        assert_eq!((word(&id, 63), word(&id, 88)), (0x0007, 0x003f));
        for bad in [0x46, 0x47, 0x23, 0x10, 0x30, 0x50, 0xff] {
            assert_eq!(set_features(&mut d, 0x03, bad), abort(), "mode {bad:#x}");
        }
        assert_eq!(word(&identify(&mut d), 63), 0x0007, "unchanged");
        // Accepted without effect, and unknown subcommands.
        assert_eq!(set_features(&mut d, 0xaa, 0), Outcome::Done);
        assert_eq!(set_features(&mut d, 0x10, 0), abort());
    }

    #[test]
    fn smart_enable_disable_and_status() {
        let (mut d, _) = disk();
        let (o, tf) = smart(&mut d, 0xda);
        assert_eq!(o, Outcome::Done);
        assert_eq!((tf.lcyl, tf.hcyl), (0x4f, 0xc2), "no threshold exceeded");
        let Outcome::DataIn(data) = smart(&mut d, 0xd0).0 else {
            panic!("READ DATA");
        };
        assert_eq!(data.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        assert_eq!((data[2], data[2 + 12]), (0x01, 0x03), "attribute ids");

        assert_eq!(smart(&mut d, 0xd9).0, Outcome::Done);
        assert_eq!(word(&identify(&mut d), 85) & 1, 0);
        for f in [0xda, 0xd0, 0xd9] {
            assert_eq!(smart(&mut d, f).0, abort(), "feature {f:#x} while disabled");
        }
        assert_eq!(smart(&mut d, 0xd8).0, Outcome::Done);
        assert_eq!(word(&identify(&mut d), 85) & 1, 1);

        // Logs 1 and 6 of one block; others abort.
        let mut tf = Taskfile {
            feature: 0xd5,
            nsector: 1,
            sector: 6,
            lcyl: 0x4f,
            hcyl: 0xc2,
            ..Default::default()
        };
        assert!(matches!(d.command(cmd::SMART, &mut tf), Outcome::DataIn(v) if v[0] == 1));
        tf.sector = 2;
        assert_eq!(d.command(cmd::SMART, &mut tf), abort());
        // Without the signature in LBA mid/high, and on a CD.
        let mut tf = Taskfile {
            feature: 0xda,
            ..Default::default()
        };
        assert_eq!(d.command(cmd::SMART, &mut tf), abort());
        assert_eq!(smart(&mut cd(), 0xda).0, abort());
    }

    #[test]
    fn check_power_mode() {
        for mut d in [disk().0, cd()] {
            let mut tf = Taskfile::default();
            assert_eq!(d.command(cmd::CHECK_POWER_MODE, &mut tf), Outcome::Done);
            assert_eq!(tf.nsector, 0xff, "active or idle");
            for (op, mode) in [
                (cmd::STANDBY_IMMEDIATE, 0x00),
                (cmd::IDLE_IMMEDIATE, 0xff),
                (cmd::SLEEP, 0x00),
                (cmd::IDLE, 0xff),
                (cmd::STANDBY, 0x00),
            ] {
                assert_eq!(d.command(op, &mut tf), Outcome::Done);
                assert_eq!(d.command(cmd::CHECK_POWER_MODE, &mut tf), Outcome::Done);
                assert_eq!(tf.nsector, mode, "after {op:#x}");
            }
        }
    }

    #[test]
    fn read_native_max_reports_the_last_lba() {
        let (mut d, _) = disk();
        let last = d.sectors() - 1;
        let mut tf = Taskfile::default();
        assert_eq!(d.command(cmd::READ_NATIVE_MAX_EXT, &mut tf), Outcome::Done);
        assert_eq!(tf.lba48(), last);
        let mut tf = Taskfile {
            select: 0xe0,
            ..Default::default()
        };
        assert_eq!(d.command(cmd::READ_NATIVE_MAX, &mut tf), Outcome::Done);
        assert_eq!(
            (tf.lba28(), tf.select & 0xf0),
            (last.min(0x0fff_ffff), 0xe0)
        );
    }

    #[test]
    fn read_and_write_plans() {
        let (mut d, _) = disk();
        assert_eq!(
            d.command(cmd::READ_DMA, &mut lba(10, 2)),
            Outcome::Read {
                lba: 10,
                count: 2,
                xfer: Xfer::Dma
            }
        );
        assert_eq!(
            d.command(cmd::WRITE_SECTORS, &mut lba(SECTORS - 1, 1)),
            Outcome::Write {
                lba: SECTORS - 1,
                count: 1,
                xfer: Xfer::Pio,
                fua: false
            }
        );
        let mut ext = lba(5, 0);
        ext.hob_nsector = 1; // 256 sectors
        assert_eq!(
            d.command(cmd::WRITE_DMA_FUA_EXT, &mut ext),
            Outcome::Write {
                lba: 5,
                count: 256,
                xfer: Xfer::Dma,
                fua: true
            }
        );
        // Past the end: IDNF, from parsing and from execute alike.
        let idnf = Outcome::Fail {
            error: error::IDNF,
            lba: None,
        };
        assert_eq!(d.command(cmd::READ_SECTORS, &mut lba(SECTORS - 1, 2)), idnf);
        assert_eq!(d.command(cmd::READ_VERIFY, &mut lba(SECTORS, 1)), idnf);
        let read = AtaCommand::Read {
            lba: u64::MAX,
            count: 1,
            xfer: Xfer::Dma,
            ext: true,
        };
        assert_eq!(d.execute(read, &mut Taskfile::default()), idnf);
        let write = AtaCommand::Write {
            lba: SECTORS,
            count: 1,
            xfer: Xfer::Pio,
            ext: false,
            fua: false,
        };
        assert_eq!(d.execute(write, &mut Taskfile::default()), idnf);
        assert_eq!(d.command(cmd::READ_VERIFY, &mut lba(0, 8)), Outcome::Done);

        // READ MULTIPLE needs SET MULTIPLE; its DRQ blocks have that size.
        assert_eq!(d.command(cmd::READ_MULTIPLE, &mut lba(0, 8)), abort());
        assert_eq!(d.command(cmd::SET_MULTIPLE, &mut lba(0, 3)), abort());
        assert_eq!(d.command(cmd::SET_MULTIPLE, &mut lba(0, 4)), Outcome::Done);
        assert_eq!(word(&identify(&mut d), 59), 0x0104);
        assert_eq!(
            d.command(cmd::READ_MULTIPLE, &mut lba(0, 8)),
            Outcome::Read {
                lba: 0,
                count: 8,
                xfer: Xfer::Multiple
            }
        );
        assert_eq!(d.drq_block(Xfer::Multiple), 4);
        assert_eq!(d.drq_block(Xfer::Pio), 1);

        // CHS after INITIALIZE DEVICE PARAMETERS: C=1 H=2 S=3 with 4 heads
        // and 10 sectors is (1 * 4 + 2) * 10 + 2.
        let mut tf = Taskfile {
            select: 0xa3,
            nsector: 10,
            ..Default::default()
        };
        assert_eq!(d.command(cmd::INITIALIZE_PARAMS, &mut tf), Outcome::Done);
        let mut tf = Taskfile {
            select: 0xa2,
            lcyl: 1,
            sector: 3,
            nsector: 1,
            ..Default::default()
        };
        assert!(matches!(
            d.command(cmd::READ_SECTORS, &mut tf),
            Outcome::Read { lba: 62, .. }
        ));

        // A CD takes no disk commands, parsed or not.
        let mut c = cd();
        assert_eq!(c.command(cmd::READ_DMA, &mut lba(0, 1)), abort());
        assert_eq!(c.execute(read, &mut Taskfile::default()), abort());
        assert_eq!(c.execute(write, &mut Taskfile::default()), abort());
    }

    #[test]
    fn flush() {
        let (mut d, _) = disk();
        assert_eq!(d.command(cmd::FLUSH_CACHE, &mut lba(0, 0)), Outcome::Flush);
        assert_eq!(
            d.command(cmd::FLUSH_CACHE_EXT, &mut lba(0, 0)),
            Outcome::Flush
        );
        let mut c = cd();
        assert_eq!(c.command(cmd::FLUSH_CACHE, &mut lba(0, 0)), abort());
        assert_eq!(c.execute(AtaCommand::Flush, &mut lba(0, 0)), abort());
    }

    #[test]
    fn packet_reset_and_signatures() {
        let (mut d, _) = disk();
        let mut c = cd();
        assert_eq!((d.signature(), c.signature()), (0x0000_0101, 0xeb14_0101));
        let mut tf = Taskfile {
            feature: 1,
            ..Default::default()
        };
        assert_eq!(
            c.command(cmd::PACKET, &mut tf),
            Outcome::Packet { dma: true }
        );
        assert_eq!(d.command(cmd::PACKET, &mut tf), abort());
        assert_eq!(
            d.execute(AtaCommand::Packet { dma: false }, &mut tf),
            abort()
        );

        let mut tf = lba(0x0abc_def1, 7);
        assert_eq!(
            c.command(cmd::DEVICE_RESET, &mut tf),
            Outcome::Reset { diagnostic: false }
        );
        assert_eq!(
            (tf.nsector, tf.sector, tf.lcyl, tf.hcyl, tf.select),
            (1, 1, 0x14, 0xeb, 0xe0)
        );
        assert_eq!(d.command(cmd::DEVICE_RESET, &mut tf), abort());
        let mut tf = lba(0x0abc_def1, 7);
        assert_eq!(
            d.command(cmd::EXECUTE_DIAGNOSTIC, &mut tf),
            Outcome::Reset { diagnostic: true }
        );
        assert_eq!((tf.nsector, tf.sector, tf.lcyl, tf.hcyl), (1, 1, 0, 0));
        assert_eq!(tf.select, 0xa0, "DEV and LBA cleared");
    }

    #[test]
    fn trim() {
        let (mut d, _) = disk();
        let mut tf = lba(0, 1);
        tf.feature = 1;
        assert_eq!(
            d.command(cmd::DATA_SET_MANAGEMENT, &mut tf),
            Outcome::Trim { blocks: 1 }
        );
        let entry = |lba: u64, n: u64| (lba | n << 48).to_le_bytes();
        let mut payload = vec![0u8; 512];
        payload[..8].copy_from_slice(&entry(100, 8));
        payload[8..16].copy_from_slice(&entry(7, 0)); // padding
        payload[16..24].copy_from_slice(&entry(SECTORS - 1, 1));
        assert_eq!(
            d.trim_ranges(&payload),
            Ok(vec![(100, 8), (SECTORS - 1, 1)])
        );
        payload[24..32].copy_from_slice(&entry(SECTORS - 1, 2));
        assert_eq!(d.trim_ranges(&payload), Err(Refusal::Abort));
    }
}
