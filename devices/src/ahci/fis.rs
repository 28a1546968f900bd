//! AHCI's structures in guest memory, and the FISes an HBA posts.
//!
//! Specs followed: AHCI 1.3.1 section 4.2.1 (the received-FIS area and
//! where each FIS lands in it), 4.2.2 (command list and command header),
//! 4.2.3 (command table: command FIS, ATAPI command, PRDT); Serial ATA
//! 3.2 section 10.5 (the Register Host to Device, Register Device to
//! Host, PIO Setup and Set Device Bits FIS layouts) and ATA8-ACS section
//! 7.23/7.72 (READ/WRITE FPDMA QUEUED: where NCQ puts tag, count and FUA).
//!
//! Parse, then execute: a slot's command header and command table become
//! one [`Command`] before anything is read or written for it. Everything
//! a guest can get wrong in them is a [`BadCommand`], which the port
//! reports as a task-file error instead of acting on it.

use crate::ata::Taskfile;

/// Bytes per command header; a command list holds 32.
pub const HEADER_LEN: usize = 32;
/// Offset of the ATAPI command in a command table.
pub const ACMD_OFFSET: usize = 0x40;
/// Offset of the PRDT in a command table.
pub const PRDT_OFFSET: usize = 0x80;
/// Bytes per PRDT entry.
pub const PRD_LEN: usize = 16;
/// Bytes of a command table before its PRDT.
pub const TABLE_HEAD: usize = PRDT_OFFSET;
/// The largest byte count one PRD describes (DBC is 22 bits).
pub const PRD_MAX: u32 = 4 << 20;

/// FIS type codes (SATA 3.2 table 120).
pub mod fis_type {
    pub const REG_H2D: u8 = 0x27;
    pub const REG_D2H: u8 = 0x34;
    pub const PIO_SETUP: u8 = 0x5f;
    pub const SET_DEVICE_BITS: u8 = 0xa1;
}

/// Where each FIS goes in the 256-byte received-FIS area (AHCI 4.2.1).
pub mod rfis {
    pub const DMA_SETUP: u64 = 0x00;
    pub const PIO_SETUP: u64 = 0x20;
    pub const REG_D2H: u64 = 0x40;
    pub const SET_DEVICE_BITS: u64 = 0x58;
    pub const UNKNOWN: u64 = 0x60;
    pub const LEN: u64 = 0x100;
}

/// READ FPDMA QUEUED and WRITE FPDMA QUEUED (ATA8-ACS 7.23, 7.72).
pub const READ_FPDMA_QUEUED: u8 = 0x60;
pub const WRITE_FPDMA_QUEUED: u8 = 0x61;

/// What is wrong with a command a guest built.
#[derive(Debug, PartialEq, Eq)]
pub enum BadCommand {
    /// CFL outside 2..=16 dwords, or shorter than a Register H2D FIS.
    FisLength(u8),
    /// The command FIS is not a Register Host to Device FIS.
    FisType(u8),
    /// The table could not be read (outside guest RAM).
    Unreadable,
    /// NCQ count larger than the PRDT describes, or a zero-length PRD.
    Prdt,
}

/// A command header (AHCI 4.2.2), as the guest wrote it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommandHeader {
    /// Command FIS length in dwords.
    pub cfl: u8,
    /// A: the command is an ATAPI PACKET; its packet is in ACMD.
    pub atapi: bool,
    /// W: data goes from host to device.
    pub write: bool,
    /// R: this is part of a software reset sequence.
    pub reset: bool,
    /// C: clear the slot's CI bit once the FIS is sent (R_OK).
    pub clear_busy: bool,
    /// Port multiplier port.
    pub pmp: u8,
    /// PRDT entries.
    pub prdtl: u16,
    /// Command table base (128-byte aligned; the low bits are reserved).
    pub ctba: u64,
}

impl CommandHeader {
    pub fn parse(b: &[u8; HEADER_LEN]) -> CommandHeader {
        let dw0 = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let lo = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as u64;
        let hi = u32::from_le_bytes([b[12], b[13], b[14], b[15]]) as u64;
        CommandHeader {
            cfl: (dw0 & 0x1f) as u8,
            atapi: dw0 & 1 << 5 != 0,
            write: dw0 & 1 << 6 != 0,
            reset: dw0 & 1 << 8 != 0,
            clear_busy: dw0 & 1 << 10 != 0,
            pmp: (dw0 >> 12 & 0xf) as u8,
            prdtl: (dw0 >> 16) as u16,
            ctba: (hi << 32 | lo) & !0x7f,
        }
    }

    /// Bytes of the command table to read: the head and every PRD.
    pub fn table_len(&self) -> usize {
        TABLE_HEAD + self.prdtl as usize * PRD_LEN
    }
}

/// One PRDT entry (AHCI 4.2.3.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prd {
    /// Data base address (word aligned: bit 0 is reserved).
    pub addr: u64,
    /// Byte count, 1..=[`PRD_MAX`].
    pub len: u32,
    /// I: interrupt when this entry's data has moved.
    pub irq: bool,
}

impl Prd {
    fn parse(b: &[u8]) -> Prd {
        let lo = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64;
        let hi = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as u64;
        let dw3 = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        Prd {
            addr: (hi << 32 | lo) & !1,
            len: (dw3 & (PRD_MAX - 1)) + 1,
            irq: dw3 & 1 << 31 != 0,
        }
    }
}

/// A Register Host to Device FIS (SATA 3.2 10.5.5) as a taskfile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegH2D {
    pub pmp: u8,
    /// C: the FIS carries a command (else it updates the Device Control
    /// register: SRST).
    pub is_command: bool,
    pub command: u8,
    pub tf: Taskfile,
    /// Device Control register (bit 2 SRST).
    pub control: u8,
}

impl RegH2D {
    pub fn parse(f: &[u8]) -> Result<RegH2D, BadCommand> {
        if f.len() < 20 {
            return Err(BadCommand::FisLength((f.len() / 4) as u8));
        }
        if f[0] != fis_type::REG_H2D {
            return Err(BadCommand::FisType(f[0]));
        }
        Ok(RegH2D {
            pmp: f[1] & 0xf,
            is_command: f[1] & 0x80 != 0,
            command: f[2],
            tf: Taskfile {
                feature: f[3],
                sector: f[4],
                lcyl: f[5],
                hcyl: f[6],
                select: f[7],
                hob_sector: f[8],
                hob_lcyl: f[9],
                hob_hcyl: f[10],
                hob_feature: f[11],
                nsector: f[12],
                hob_nsector: f[13],
            },
            control: f[15],
        })
    }
}

/// What a slot asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A non-queued ATA command for the device (`crate::ata`); for PACKET
    /// the packet is [`Command::acmd`].
    Ata { opcode: u8, tf: Taskfile },
    /// READ or WRITE FPDMA QUEUED: `count` sectors (0 in the FIS means
    /// 65536) at `lba`, completed by a Set Device Bits FIS for `tag`.
    Ncq {
        tag: u8,
        write: bool,
        lba: u64,
        count: u32,
        fua: bool,
    },
    /// A control FIS (C clear): SRST set or cleared, the two halves of
    /// a software reset (AHCI 10.4.1).
    Control { srst: bool },
}

/// A parsed command slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub header: CommandHeader,
    pub kind: Kind,
    /// The ATAPI command bytes (ACMD), when the header's A bit is set.
    pub acmd: [u8; 16],
    pub prdt: Vec<Prd>,
}

impl Command {
    /// Parse a slot from its header and the first
    /// [`CommandHeader::table_len`] bytes of its command table.
    pub fn parse(header: CommandHeader, table: &[u8]) -> Result<Command, BadCommand> {
        if !(5..=16).contains(&header.cfl) {
            // Shorter than the 5 dwords of a Register H2D FIS.
            return Err(BadCommand::FisLength(header.cfl));
        }
        if table.len() < header.table_len() {
            return Err(BadCommand::Unreadable);
        }
        let fis = RegH2D::parse(&table[..header.cfl as usize * 4])?;
        let mut acmd = [0u8; 16];
        if header.atapi {
            acmd.copy_from_slice(&table[ACMD_OFFSET..ACMD_OFFSET + 16]);
        }
        let prdt: Vec<Prd> = table[PRDT_OFFSET..header.table_len()]
            .chunks_exact(PRD_LEN)
            .map(Prd::parse)
            .collect();
        let kind = if !fis.is_command {
            Kind::Control {
                srst: fis.control & 0x04 != 0,
            }
        } else if matches!(fis.command, READ_FPDMA_QUEUED | WRITE_FPDMA_QUEUED) {
            let tf = fis.tf;
            // NCQ: the count is in the feature registers, the tag in the
            // count register's bits 7:3, FUA in the device register.
            let count = match (tf.hob_feature as u32) << 8 | tf.feature as u32 {
                0 => 65536,
                n => n,
            };
            let bytes: u64 = prdt.iter().map(|p| p.len as u64).sum();
            if bytes < count as u64 * 512 {
                return Err(BadCommand::Prdt);
            }
            Kind::Ncq {
                tag: tf.nsector >> 3,
                write: fis.command == WRITE_FPDMA_QUEUED,
                lba: tf.lba48(),
                count,
                fua: tf.select & 0x80 != 0,
            }
        } else {
            Kind::Ata {
                opcode: fis.command,
                tf: fis.tf,
            }
        };
        Ok(Command {
            header,
            kind,
            acmd,
            prdt,
        })
    }

    /// Total bytes the PRDT describes.
    pub fn prdt_bytes(&self) -> u64 {
        self.prdt.iter().map(|p| p.len as u64).sum()
    }
}

/// A Register Device to Host FIS (SATA 3.2 10.5.6) reporting `tf`.
pub fn reg_d2h(status: u8, error: u8, tf: &Taskfile, irq: bool) -> [u8; 20] {
    let mut f = [0u8; 20];
    f[0] = fis_type::REG_D2H;
    f[1] = if irq { 0x40 } else { 0 };
    f[2] = status;
    f[3] = error;
    f[4] = tf.sector;
    f[5] = tf.lcyl;
    f[6] = tf.hcyl;
    f[7] = tf.select;
    f[8] = tf.hob_sector;
    f[9] = tf.hob_lcyl;
    f[10] = tf.hob_hcyl;
    f[12] = tf.nsector;
    f[13] = tf.hob_nsector;
    f
}

/// A PIO Setup FIS (SATA 3.2 10.5.11): `len` bytes follow in direction
/// device to host if `to_host`; `end_status` is the status after them.
pub fn pio_setup(
    status: u8,
    end_status: u8,
    error: u8,
    tf: &Taskfile,
    len: u16,
    to_host: bool,
    irq: bool,
) -> [u8; 20] {
    let mut f = reg_d2h(status, error, tf, irq);
    f[0] = fis_type::PIO_SETUP;
    if to_host {
        f[1] |= 0x20;
    }
    f[15] = end_status;
    f[16..18].copy_from_slice(&len.to_le_bytes());
    f
}

/// A Set Device Bits FIS (SATA 3.2 10.5.7): NCQ completions for the
/// tags in `done`, with the status and error after them.
pub fn set_device_bits(status: u8, error: u8, done: u32, irq: bool) -> [u8; 8] {
    let mut f = [0u8; 8];
    f[0] = fis_type::SET_DEVICE_BITS;
    f[1] = if irq { 0x40 } else { 0 };
    // Status: bits 6:4 and 2:0 only (BSY and DRQ cannot be set this way).
    f[2] = status & 0x77;
    f[3] = error;
    f[4..8].copy_from_slice(&done.to_le_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(dw0: u32, ctba: u64) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&dw0.to_le_bytes());
        b[8..16].copy_from_slice(&ctba.to_le_bytes());
        b
    }

    fn table(fis: &[u8], prds: &[(u64, u32, bool)]) -> Vec<u8> {
        let mut t = vec![0u8; TABLE_HEAD + prds.len() * PRD_LEN];
        t[..fis.len()].copy_from_slice(fis);
        for (i, &(addr, len, irq)) in prds.iter().enumerate() {
            let e = &mut t[PRDT_OFFSET + i * PRD_LEN..][..PRD_LEN];
            e[0..8].copy_from_slice(&addr.to_le_bytes());
            let dw3 = (len - 1) | if irq { 1 << 31 } else { 0 };
            e[12..16].copy_from_slice(&dw3.to_le_bytes());
        }
        t
    }

    fn h2d(command: u8, feature: u16, lba: u64, count: u16, device: u8) -> [u8; 20] {
        let mut f = [0u8; 20];
        f[0] = fis_type::REG_H2D;
        f[1] = 0x80;
        f[2] = command;
        f[3] = feature as u8;
        f[4..7].copy_from_slice(&lba.to_le_bytes()[..3]);
        f[7] = device;
        f[8..11].copy_from_slice(&lba.to_le_bytes()[3..6]);
        f[11] = (feature >> 8) as u8;
        f[12..14].copy_from_slice(&count.to_le_bytes());
        f
    }

    #[test]
    fn header_fields() {
        // CFL 5, A, W, C, PMP 3, PRDTL 2, a table at 0x1_2345_6780 with
        // reserved low bits set.
        let dw0 = 5 | 1 << 5 | 1 << 6 | 1 << 10 | 3 << 12 | 2 << 16;
        let h = CommandHeader::parse(&header(dw0, 0x1_2345_67ff));
        assert_eq!(
            h,
            CommandHeader {
                cfl: 5,
                atapi: true,
                write: true,
                reset: false,
                clear_busy: true,
                pmp: 3,
                prdtl: 2,
                ctba: 0x1_2345_6780,
            }
        );
        assert_eq!(h.table_len(), 0x80 + 32);
    }

    #[test]
    fn dma_command_and_prdt() {
        let h = CommandHeader::parse(&header(5 | 2 << 16, 0x1000));
        let t = table(
            &h2d(0x25, 0, 0x0012_3456_789a, 8, 0x40),
            &[(0x8000_0001, 2048, false), (0x1_0000_0000, 2048, true)],
        );
        let c = Command::parse(h, &t).unwrap();
        let Kind::Ata { opcode, tf } = c.kind else {
            panic!("{:?}", c.kind)
        };
        assert_eq!(opcode, 0x25);
        assert_eq!(tf.lba48(), 0x0012_3456_789a);
        assert_eq!(tf.count48(), 8);
        assert_eq!(
            c.prdt,
            vec![
                Prd {
                    addr: 0x8000_0000,
                    len: 2048,
                    irq: false
                },
                Prd {
                    addr: 0x1_0000_0000,
                    len: 2048,
                    irq: true
                }
            ]
        );
        assert_eq!(c.prdt_bytes(), 4096);
    }

    #[test]
    fn ncq_fields() {
        let h = CommandHeader::parse(&header(5 | 1 << 6 | 1 << 16, 0x1000));
        // Tag 9 in count bits 7:3, 16 sectors in the features, FUA.
        let t = table(
            &h2d(WRITE_FPDMA_QUEUED, 16, 4096, 9 << 3, 0xc0),
            &[(0x2000, 8192, false)],
        );
        assert_eq!(
            Command::parse(h, &t).unwrap().kind,
            Kind::Ncq {
                tag: 9,
                write: true,
                lba: 4096,
                count: 16,
                fua: true
            }
        );
        // A PRDT shorter than the transfer is refused before any I/O.
        let t = table(
            &h2d(READ_FPDMA_QUEUED, 17, 0, 0, 0x40),
            &[(0x2000, 8192, false)],
        );
        assert_eq!(Command::parse(h, &t), Err(BadCommand::Prdt));
    }

    #[test]
    fn control_fis_and_atapi_packet() {
        let h = CommandHeader::parse(&header(5 | 1 << 8 | 1 << 10, 0x1000));
        let mut f = h2d(0, 0, 0, 0, 0);
        f[1] = 0; // C clear
        f[15] = 0x04;
        let c = Command::parse(h, &table(&f, &[])).unwrap();
        assert_eq!(c.kind, Kind::Control { srst: true });
        let h = CommandHeader::parse(&header(5 | 1 << 5, 0x1000));
        let mut t = table(&h2d(0xa0, 1, 0, 0, 0), &[]);
        t[ACMD_OFFSET] = 0x28;
        let c = Command::parse(h, &t).unwrap();
        assert_eq!(c.acmd[0], 0x28);
        assert!(matches!(c.kind, Kind::Ata { opcode: 0xa0, .. }));
    }

    #[test]
    fn malformed_commands_are_refused() {
        let t = table(&h2d(0x25, 0, 0, 1, 0x40), &[]);
        for cfl in [0, 1, 4, 17, 31] {
            let h = CommandHeader::parse(&header(cfl, 0x1000));
            assert_eq!(
                Command::parse(h, &t),
                Err(BadCommand::FisLength(cfl as u8)),
                "{cfl}"
            );
        }
        let h = CommandHeader::parse(&header(5, 0x1000));
        let mut bad = t.clone();
        bad[0] = fis_type::REG_D2H;
        assert_eq!(
            Command::parse(h, &bad),
            Err(BadCommand::FisType(fis_type::REG_D2H))
        );
        // The table must hold every PRD the header claims.
        let h = CommandHeader::parse(&header(5 | 3 << 16, 0x1000));
        assert_eq!(Command::parse(h, &t), Err(BadCommand::Unreadable));
    }

    #[test]
    fn fis_builders() {
        let mut tf = Taskfile::default();
        tf.set_lba(0x0102_0304_0506, true);
        tf.nsector = 7;
        let d = reg_d2h(0x50, 0, &tf, true);
        assert_eq!(&d[..8], &[0x34, 0x40, 0x50, 0, 0x06, 0x05, 0x04, 0]);
        assert_eq!(&d[8..11], &[0x03, 0x02, 0x01]);
        assert_eq!(d[12], 7);
        let p = pio_setup(0x58, 0x50, 0, &tf, 512, true, true);
        assert_eq!((p[0], p[1], p[15]), (0x5f, 0x60, 0x50));
        assert_eq!(u16::from_le_bytes([p[16], p[17]]), 512);
        assert_eq!(
            set_device_bits(0xff, 0x04, 1 << 9, true),
            [0xa1, 0x40, 0x77, 0x04, 0, 2, 0, 0]
        );
    }
}
