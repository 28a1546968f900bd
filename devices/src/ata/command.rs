//! The ATA taskfile and its parsing into a typed [`AtaCommand`] (ATA8-ACS
//! chapter 7 for the commands, 6.2 for the status and error bits, 4.1 for
//! 28- and 48-bit addressing, and ATA/ATAPI-6 6.2.1 for CHS addressing).
//!
//! Parsing decodes the address and count, checks them against the drive's
//! capacity and geometry, and refuses commands the drive type does not
//! accept. Execution (`device.rs`) only sees commands that can run.

/// Status register bits (ATA8-ACS 6.2.11 and ATA/ATAPI-6 for DSC).
pub mod status {
    pub const ERR: u8 = 0x01;
    pub const DRQ: u8 = 0x08;
    /// Device seek complete (obsolete in ATA8, still expected by BIOSes).
    pub const DSC: u8 = 0x10;
    pub const DF: u8 = 0x20;
    pub const DRDY: u8 = 0x40;
    pub const BSY: u8 = 0x80;
}

/// Error register bits (ATA8-ACS 6.2.4).
pub mod error {
    pub const ABRT: u8 = 0x04;
    pub const IDNF: u8 = 0x10;
    pub const UNC: u8 = 0x40;
}

/// Command opcodes (ATA8-ACS table B.3 and older standards).
pub mod cmd {
    pub const NOP: u8 = 0x00;
    pub const DATA_SET_MANAGEMENT: u8 = 0x06;
    pub const DEVICE_RESET: u8 = 0x08;
    pub const READ_SECTORS: u8 = 0x20;
    pub const READ_SECTORS_NORETRY: u8 = 0x21;
    pub const READ_SECTORS_EXT: u8 = 0x24;
    pub const READ_DMA_EXT: u8 = 0x25;
    pub const READ_NATIVE_MAX_EXT: u8 = 0x27;
    pub const READ_MULTIPLE_EXT: u8 = 0x29;
    pub const WRITE_SECTORS: u8 = 0x30;
    pub const WRITE_SECTORS_NORETRY: u8 = 0x31;
    pub const WRITE_SECTORS_EXT: u8 = 0x34;
    pub const WRITE_DMA_EXT: u8 = 0x35;
    pub const WRITE_MULTIPLE_EXT: u8 = 0x39;
    pub const WRITE_DMA_FUA_EXT: u8 = 0x3d;
    pub const READ_VERIFY: u8 = 0x40;
    pub const READ_VERIFY_NORETRY: u8 = 0x41;
    pub const READ_VERIFY_EXT: u8 = 0x42;
    pub const SEEK: u8 = 0x70;
    pub const EXECUTE_DIAGNOSTIC: u8 = 0x90;
    pub const INITIALIZE_PARAMS: u8 = 0x91;
    pub const PACKET: u8 = 0xa0;
    pub const IDENTIFY_PACKET: u8 = 0xa1;
    pub const SMART: u8 = 0xb0;
    pub const READ_MULTIPLE: u8 = 0xc4;
    pub const WRITE_MULTIPLE: u8 = 0xc5;
    pub const SET_MULTIPLE: u8 = 0xc6;
    pub const READ_DMA: u8 = 0xc8;
    pub const READ_DMA_NORETRY: u8 = 0xc9;
    pub const WRITE_DMA: u8 = 0xca;
    pub const WRITE_DMA_NORETRY: u8 = 0xcb;
    pub const WRITE_MULTIPLE_FUA_EXT: u8 = 0xce;
    pub const STANDBY_IMMEDIATE: u8 = 0xe0;
    pub const IDLE_IMMEDIATE: u8 = 0xe1;
    pub const STANDBY: u8 = 0xe2;
    pub const IDLE: u8 = 0xe3;
    pub const CHECK_POWER_MODE: u8 = 0xe5;
    pub const SLEEP: u8 = 0xe6;
    pub const FLUSH_CACHE: u8 = 0xe7;
    pub const FLUSH_CACHE_EXT: u8 = 0xea;
    pub const IDENTIFY: u8 = 0xec;
    pub const SET_FEATURES: u8 = 0xef;
    pub const READ_NATIVE_MAX: u8 = 0xf8;
}

/// The command block registers of one device. Writes reach both devices
/// of a channel (ATA8-ACS: both devices latch the taskfile); each register
/// keeps its previous value as the "high order byte" for 48-bit commands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Taskfile {
    pub feature: u8,
    pub hob_feature: u8,
    pub nsector: u8,
    pub hob_nsector: u8,
    pub sector: u8,
    pub hob_sector: u8,
    pub lcyl: u8,
    pub hob_lcyl: u8,
    pub hcyl: u8,
    pub hob_hcyl: u8,
    /// Device/head register: bit 4 DEV, bit 6 LBA, bits 3..0 head/LBA 27..24.
    pub select: u8,
}

impl Taskfile {
    pub fn lba_mode(&self) -> bool {
        self.select & 0x40 != 0
    }
    pub fn lba28(&self) -> u64 {
        (self.sector as u64)
            | (self.lcyl as u64) << 8
            | (self.hcyl as u64) << 16
            | ((self.select & 0x0f) as u64) << 24
    }
    pub fn lba48(&self) -> u64 {
        (self.sector as u64)
            | (self.lcyl as u64) << 8
            | (self.hcyl as u64) << 16
            | (self.hob_sector as u64) << 24
            | (self.hob_lcyl as u64) << 32
            | (self.hob_hcyl as u64) << 40
    }
    /// Sector count; 0 means 256.
    pub fn count28(&self) -> u32 {
        match self.nsector {
            0 => 256,
            n => n as u32,
        }
    }
    /// Sector count; 0 means 65536.
    pub fn count48(&self) -> u32 {
        match (self.hob_nsector as u32) << 8 | self.nsector as u32 {
            0 => 65536,
            n => n,
        }
    }
    /// Sets a 48-bit (or 28-bit, keeping the DEV and LBA bits) address, as
    /// the device reports it after errors and in signatures.
    pub fn set_lba(&mut self, lba: u64, ext: bool) {
        self.sector = lba as u8;
        self.lcyl = (lba >> 8) as u8;
        self.hcyl = (lba >> 16) as u8;
        if ext {
            self.hob_sector = (lba >> 24) as u8;
            self.hob_lcyl = (lba >> 32) as u8;
            self.hob_hcyl = (lba >> 40) as u8;
        } else {
            self.select = (self.select & 0xf0) | ((lba >> 24) as u8 & 0x0f);
        }
    }
}

/// How the data of a read or write moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Xfer {
    /// PIO, one sector per DRQ block.
    Pio,
    /// PIO, `SET MULTIPLE` sectors per DRQ block.
    Multiple,
    /// Bus-master DMA.
    Dma,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Power {
    Idle,
    Standby,
    Sleep,
    Check,
}

/// A command ready to execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtaCommand {
    Identify,
    IdentifyPacket,
    Packet {
        dma: bool,
    },
    DeviceReset,
    ExecuteDiagnostic,
    /// RECALIBRATE and SEEK: nothing moves on a virtual disk.
    Seek,
    Read {
        lba: u64,
        count: u32,
        xfer: Xfer,
        ext: bool,
    },
    Write {
        lba: u64,
        count: u32,
        xfer: Xfer,
        ext: bool,
        fua: bool,
    },
    Verify {
        lba: u64,
        count: u32,
    },
    Flush,
    /// READ NATIVE MAX ADDRESS (EXT): the last LBA, in the LBA registers
    /// (ATA8-ACS 7.30-7.31; no Host Protected Area is ever set, so the
    /// native maximum is the medium's).
    ReadNativeMax {
        ext: bool,
    },
    SetFeatures {
        subcommand: u8,
        count: u8,
    },
    SetMultiple {
        count: u8,
    },
    InitializeParams {
        heads: u8,
        sectors: u8,
    },
    Power(Power),
    /// DATA SET MANAGEMENT with the TRIM bit: `blocks` 512-byte blocks of
    /// LBA range entries follow by DMA.
    Trim {
        blocks: u16,
    },
    Smart {
        feature: u8,
        count: u8,
        lba_low: u8,
    },
}

/// Why a command is refused: the error register value to report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Abort,
    /// The address is outside the medium (or not a valid CHS address).
    IdNotFound,
}

impl Refusal {
    pub fn error_bits(self) -> u8 {
        match self {
            Refusal::Abort => error::ABRT,
            Refusal::IdNotFound => error::IDNF,
        }
    }
}

/// What parsing needs to know about the drive.
pub struct DriveInfo {
    pub atapi: bool,
    pub sectors: u64,
    /// Current CHS translation (INITIALIZE DEVICE PARAMETERS).
    pub heads: u32,
    pub secs: u32,
    /// Sectors per DRQ block for READ/WRITE MULTIPLE; 0 when disabled.
    pub multiple: u32,
    /// Largest DATA SET MANAGEMENT payload, in 512-byte blocks.
    pub max_dsm_blocks: u16,
}

/// The largest sector count per 48-bit command Strata executes as one
/// request is the ATA limit (65536); nothing bigger can be encoded.
impl AtaCommand {
    pub fn parse(opcode: u8, tf: &Taskfile, d: &DriveInfo) -> Result<AtaCommand, Refusal> {
        use cmd::*;
        // Commands an ATAPI device accepts (ATA8-ACS 7.1, PACKET feature
        // set); everything else aborts. IDENTIFY DEVICE aborts too, and the
        // caller then shows the packet signature.
        if d.atapi {
            return match opcode {
                PACKET => {
                    // OVL (overlap) is not supported.
                    if tf.feature & 2 != 0 {
                        return Err(Refusal::Abort);
                    }
                    Ok(AtaCommand::Packet {
                        dma: tf.feature & 1 != 0,
                    })
                }
                IDENTIFY_PACKET => Ok(AtaCommand::IdentifyPacket),
                DEVICE_RESET => Ok(AtaCommand::DeviceReset),
                EXECUTE_DIAGNOSTIC => Ok(AtaCommand::ExecuteDiagnostic),
                SET_FEATURES => Ok(AtaCommand::SetFeatures {
                    subcommand: tf.feature,
                    count: tf.nsector,
                }),
                CHECK_POWER_MODE => Ok(AtaCommand::Power(Power::Check)),
                IDLE | IDLE_IMMEDIATE => Ok(AtaCommand::Power(Power::Idle)),
                STANDBY | STANDBY_IMMEDIATE => Ok(AtaCommand::Power(Power::Standby)),
                SLEEP => Ok(AtaCommand::Power(Power::Sleep)),
                _ => Err(Refusal::Abort),
            };
        }
        let range28 = || -> Result<(u64, u32), Refusal> {
            let count = tf.count28();
            let lba = if tf.lba_mode() {
                tf.lba28()
            } else {
                chs_to_lba(tf, d)?
            };
            check_range(lba, count, d)?;
            Ok((lba, count))
        };
        let range48 = || -> Result<(u64, u32), Refusal> {
            let (lba, count) = (tf.lba48(), tf.count48());
            check_range(lba, count, d)?;
            Ok((lba, count))
        };
        let multiple = || {
            if d.multiple == 0 {
                Err(Refusal::Abort)
            } else {
                Ok(Xfer::Multiple)
            }
        };
        let read = |(lba, count): (u64, u32), xfer, ext| AtaCommand::Read {
            lba,
            count,
            xfer,
            ext,
        };
        let write = |(lba, count): (u64, u32), xfer, ext, fua| AtaCommand::Write {
            lba,
            count,
            xfer,
            ext,
            fua,
        };
        Ok(match opcode {
            READ_SECTORS | READ_SECTORS_NORETRY => read(range28()?, Xfer::Pio, false),
            READ_SECTORS_EXT => read(range48()?, Xfer::Pio, true),
            READ_MULTIPLE => read(range28()?, multiple()?, false),
            READ_MULTIPLE_EXT => read(range48()?, multiple()?, true),
            READ_DMA | READ_DMA_NORETRY => read(range28()?, Xfer::Dma, false),
            READ_DMA_EXT => read(range48()?, Xfer::Dma, true),
            WRITE_SECTORS | WRITE_SECTORS_NORETRY => write(range28()?, Xfer::Pio, false, false),
            WRITE_SECTORS_EXT => write(range48()?, Xfer::Pio, true, false),
            WRITE_MULTIPLE => write(range28()?, multiple()?, false, false),
            WRITE_MULTIPLE_EXT => write(range48()?, multiple()?, true, false),
            WRITE_MULTIPLE_FUA_EXT => write(range48()?, multiple()?, true, true),
            WRITE_DMA | WRITE_DMA_NORETRY => write(range28()?, Xfer::Dma, false, false),
            WRITE_DMA_EXT => write(range48()?, Xfer::Dma, true, false),
            WRITE_DMA_FUA_EXT => write(range48()?, Xfer::Dma, true, true),
            READ_VERIFY | READ_VERIFY_NORETRY => {
                let (lba, count) = range28()?;
                AtaCommand::Verify { lba, count }
            }
            READ_VERIFY_EXT => {
                let (lba, count) = range48()?;
                AtaCommand::Verify { lba, count }
            }
            0x10..=0x1f | SEEK => AtaCommand::Seek,
            FLUSH_CACHE | FLUSH_CACHE_EXT => AtaCommand::Flush,
            READ_NATIVE_MAX => AtaCommand::ReadNativeMax { ext: false },
            READ_NATIVE_MAX_EXT => AtaCommand::ReadNativeMax { ext: true },
            IDENTIFY => AtaCommand::Identify,
            EXECUTE_DIAGNOSTIC => AtaCommand::ExecuteDiagnostic,
            SET_FEATURES => AtaCommand::SetFeatures {
                subcommand: tf.feature,
                count: tf.nsector,
            },
            SET_MULTIPLE => {
                // 0 disables; otherwise a power of two up to the maximum
                // announced in IDENTIFY word 47.
                let n = tf.nsector;
                if n != 0 && (!n.is_power_of_two() || n as u32 > super::identify::MAX_MULTIPLE) {
                    return Err(Refusal::Abort);
                }
                AtaCommand::SetMultiple { count: n }
            }
            INITIALIZE_PARAMS => AtaCommand::InitializeParams {
                heads: (tf.select & 0x0f) + 1,
                sectors: tf.nsector,
            },
            CHECK_POWER_MODE => AtaCommand::Power(Power::Check),
            IDLE | IDLE_IMMEDIATE => AtaCommand::Power(Power::Idle),
            STANDBY | STANDBY_IMMEDIATE => AtaCommand::Power(Power::Standby),
            SLEEP => AtaCommand::Power(Power::Sleep),
            DATA_SET_MANAGEMENT => {
                // TRIM is bit 0 of the feature; a zero count or more
                // blocks than IDENTIFY word 105 allows is invalid. The
                // count is the low byte only, as QEMU reads it: hosts that
                // write just the sector count (QEMU's ide-test) would
                // otherwise get the previous count (the reset signature's
                // 01h) as the high byte. Counts of 256 and more are past
                // word 105's limit either way.
                let blocks = tf.nsector as u16;
                if tf.feature & 1 == 0 || blocks == 0 || blocks > d.max_dsm_blocks {
                    return Err(Refusal::Abort);
                }
                AtaCommand::Trim { blocks }
            }
            SMART => {
                // The SMART signature in LBA mid/high is mandatory.
                if tf.lcyl != 0x4f || tf.hcyl != 0xc2 {
                    return Err(Refusal::Abort);
                }
                AtaCommand::Smart {
                    feature: tf.feature,
                    count: tf.nsector,
                    lba_low: tf.sector,
                }
            }
            // NOP (ATA8-ACS 7.17) always completes with ABRT; PACKET,
            // IDENTIFY PACKET DEVICE and DEVICE RESET are for ATAPI only.
            _ => return Err(Refusal::Abort),
        })
    }
}

fn check_range(lba: u64, count: u32, d: &DriveInfo) -> Result<(), Refusal> {
    match lba.checked_add(count as u64) {
        Some(end) if end <= d.sectors => Ok(()),
        _ => Err(Refusal::IdNotFound),
    }
}

/// CHS to LBA with the current translation: LBA = (C * heads + H) *
/// secs + S - 1. Sector 0, a head or sector beyond the geometry, or a drive
/// whose geometry was never initialised is IDNF.
fn chs_to_lba(tf: &Taskfile, d: &DriveInfo) -> Result<u64, Refusal> {
    let cyl = (tf.hcyl as u64) << 8 | tf.lcyl as u64;
    let head = (tf.select & 0x0f) as u64;
    let sect = tf.sector as u64;
    let (heads, secs) = (d.heads as u64, d.secs as u64);
    if sect == 0 || sect > secs || head >= heads {
        return Err(Refusal::IdNotFound);
    }
    Ok((cyl * heads + head) * secs + sect - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk() -> DriveInfo {
        DriveInfo {
            atapi: false,
            sectors: 1000,
            heads: 16,
            secs: 63,
            multiple: 0,
            max_dsm_blocks: 8,
        }
    }

    #[test]
    fn addressing_and_ranges() {
        let mut tf = Taskfile {
            select: 0x40,
            sector: 10,
            nsector: 2,
            ..Default::default()
        };
        assert_eq!(
            AtaCommand::parse(cmd::READ_SECTORS, &tf, &disk()),
            Ok(AtaCommand::Read {
                lba: 10,
                count: 2,
                xfer: Xfer::Pio,
                ext: false
            })
        );
        tf.sector = 255;
        tf.lcyl = 2; // 767 + 256 > 1000
        tf.nsector = 0;
        assert_eq!(
            AtaCommand::parse(cmd::READ_DMA, &tf, &disk()),
            Err(Refusal::IdNotFound)
        );
        // 48-bit: count 0 means 65536; LBA bits above 24 come from HOB.
        let tf48 = Taskfile {
            select: 0x40,
            sector: 1,
            nsector: 1,
            hob_sector: 1,
            ..Default::default()
        };
        assert_eq!(
            AtaCommand::parse(cmd::READ_SECTORS_EXT, &tf48, &disk()),
            Err(Refusal::IdNotFound)
        );
        // CHS: C=0 H=1 S=1 -> 63.
        let chs = Taskfile {
            select: 0x01,
            sector: 1,
            nsector: 1,
            ..Default::default()
        };
        assert!(matches!(
            AtaCommand::parse(cmd::WRITE_SECTORS, &chs, &disk()),
            Ok(AtaCommand::Write { lba: 63, .. })
        ));
        let chs0 = Taskfile { sector: 0, ..chs };
        assert_eq!(
            AtaCommand::parse(cmd::WRITE_SECTORS, &chs0, &disk()),
            Err(Refusal::IdNotFound)
        );
        // READ MULTIPLE before SET MULTIPLE aborts.
        let tf = Taskfile {
            select: 0x40,
            nsector: 1,
            ..Default::default()
        };
        assert_eq!(
            AtaCommand::parse(cmd::READ_MULTIPLE, &tf, &disk()),
            Err(Refusal::Abort)
        );
        assert_eq!(
            AtaCommand::parse(cmd::NOP, &tf, &disk()),
            Err(Refusal::Abort)
        );
    }

    #[test]
    fn atapi_accepts_only_its_set() {
        let d = DriveInfo {
            atapi: true,
            ..disk()
        };
        let tf = Taskfile {
            feature: 1,
            ..Default::default()
        };
        assert_eq!(
            AtaCommand::parse(cmd::PACKET, &tf, &d),
            Ok(AtaCommand::Packet { dma: true })
        );
        assert_eq!(
            AtaCommand::parse(cmd::IDENTIFY, &tf, &d),
            Err(Refusal::Abort)
        );
        assert_eq!(
            AtaCommand::parse(cmd::READ_DMA, &tf, &d),
            Err(Refusal::Abort)
        );
    }

    #[test]
    fn each_refusal() {
        let lba = |sector: u8, nsector: u8| Taskfile {
            select: 0x40,
            sector,
            nsector,
            ..Default::default()
        };
        let refuse = |op: u8, tf: Taskfile, d: &DriveInfo| AtaCommand::parse(op, &tf, d).err();
        let abort = Some(Refusal::Abort);
        let idnf = Some(Refusal::IdNotFound);
        let d = disk();
        // Abort: not a command of this device type.
        for op in [
            cmd::NOP,
            0x01,
            cmd::PACKET,
            cmd::IDENTIFY_PACKET,
            cmd::DEVICE_RESET,
        ] {
            assert_eq!(refuse(op, lba(0, 1), &d), abort, "opcode {op:#x}");
        }
        // Abort: invalid parameters.
        assert_eq!(refuse(cmd::WRITE_MULTIPLE, lba(0, 1), &d), abort);
        assert_eq!(refuse(cmd::SET_MULTIPLE, lba(0, 3), &d), abort);
        assert_eq!(refuse(cmd::SET_MULTIPLE, lba(0, 32), &d), abort);
        let dsm = |feature: u8, nsector: u8| Taskfile {
            feature,
            ..lba(0, nsector)
        };
        assert_eq!(refuse(cmd::DATA_SET_MANAGEMENT, dsm(0, 1), &d), abort);
        assert_eq!(refuse(cmd::DATA_SET_MANAGEMENT, dsm(1, 0), &d), abort);
        assert_eq!(refuse(cmd::DATA_SET_MANAGEMENT, dsm(1, 9), &d), abort);
        assert_eq!(refuse(cmd::DATA_SET_MANAGEMENT, dsm(1, 8), &d), None);
        // A stale high byte of the count is ignored.
        let stale = Taskfile {
            hob_nsector: 1,
            ..dsm(1, 1)
        };
        assert_eq!(
            AtaCommand::parse(cmd::DATA_SET_MANAGEMENT, &stale, &d),
            Ok(AtaCommand::Trim { blocks: 1 })
        );
        assert_eq!(refuse(cmd::SMART, lba(0, 0), &d), abort, "no signature");
        // IDNF: past the end, or no such CHS address.
        assert_eq!(refuse(cmd::READ_DMA, lba(232, 0), &d), None);
        let mut end = lba(232, 0);
        end.lcyl = 2; // 744 + 256 = 1000 sectors
        assert_eq!(refuse(cmd::READ_DMA, end, &d), None);
        end.sector = 233;
        assert_eq!(refuse(cmd::READ_DMA, end, &d), idnf);
        assert_eq!(refuse(cmd::READ_VERIFY_EXT, end, &d), idnf);
        let chs = |select: u8, sector: u8| Taskfile {
            select,
            sector,
            nsector: 1,
            ..Default::default()
        };
        assert_eq!(refuse(cmd::READ_SECTORS, chs(0x0f, 1), &d), None);
        assert_eq!(refuse(cmd::READ_SECTORS, chs(0x00, 63), &d), None);
        assert_eq!(
            refuse(cmd::READ_SECTORS, chs(0x0f, 63), &d),
            idnf,
            "past the end"
        );
        assert_eq!(refuse(cmd::READ_SECTORS, chs(0x00, 64), &d), idnf);
        let few_heads = DriveInfo {
            heads: 15,
            ..disk()
        };
        assert_eq!(refuse(cmd::READ_SECTORS, chs(0x0f, 1), &few_heads), idnf);
        let uninit = DriveInfo {
            heads: 0,
            secs: 0,
            ..disk()
        };
        assert_eq!(refuse(cmd::READ_SECTORS, chs(0x00, 1), &uninit), idnf);
        // A packet device: OVL, and everything outside its set.
        let cd = DriveInfo {
            atapi: true,
            ..disk()
        };
        let ovl = Taskfile {
            feature: 2,
            ..Default::default()
        };
        assert_eq!(refuse(cmd::PACKET, ovl, &cd), abort);
        for op in [cmd::FLUSH_CACHE, cmd::SMART, cmd::SET_MULTIPLE, cmd::SEEK] {
            assert_eq!(refuse(op, lba(0, 1), &cd), abort, "opcode {op:#x}");
        }
    }
}
