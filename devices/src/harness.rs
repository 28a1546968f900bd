//! Fuzzing harnesses for the parsers of guest data in this crate: the SCSI
//! CDB parser, the MMC and SBC command sets behind a target and the request
//! runner (shared by ATAPI and, later, every SCSI transport), the ATA
//! taskfile parser and device (shared by IDE and, later, AHCI), and the
//! virtio-blk descriptor-chain parser. The cargo fuzz
//! targets under `fuzz/` call these functions, and
//! `devices/tests/fuzz_corpus.rs` replays each corpus as a regular test.
//! The property: no input panics, loops forever, or reads outside guest
//! memory.

use block::backend::{BackendConfig, BlockBackend};
use block::graph::BlockGraph;
use vm_memory::{Bytes, GuestAddress};

use std::sync::{Arc, Mutex};

use crate::ata::{self, AtaDevice, DriveConfig, Media, Taskfile};
use crate::scsi::cdb::Command;
use crate::scsi::mmc::{CdRom, Transport};
use crate::scsi::request::{Outcome, VecPath};
use crate::scsi::{Disk, DiskOptions, Lun, Plan, Target};
use crate::virtio::block::{Limits, Request};
use crate::virtio::chain::{Chain, ChainHead};
use crate::GuestMem;

/// A 1 MiB medium that reads as zeros and discards writes.
fn null_medium(name: &str) -> Option<Arc<BlockBackend>> {
    let graph = BlockGraph::new();
    let node = graph
        .blockdev_add_str(&format!(
            "driver=null-co,node-name={name},size=1048576,read-zeroes=on"
        ))
        .ok()?;
    BlockBackend::new(name, node, BackendConfig::default()).ok()
}

/// Runs `data` as a sequence of 12-byte CDBs (ATAPI's packet size) through
/// the parser and the CD-ROM model, then as 16-byte CDBs through a target
/// with a disk (LUN 0) and a SCSI CD-ROM (LUN 1) and the request runner.
pub fn scsi_cdb(data: &[u8]) {
    let Some(medium) = null_medium("fuzz-cd") else {
        return;
    };
    let cd = CdRom::new(Transport::Atapi, Some(medium));
    for cdb in data.chunks(12) {
        let _ = Command::parse(cdb);
        if let Plan::Read { offset, len } = cd.execute(cdb) {
            // A read the model accepts must lie on the medium.
            let size = cd.medium().map_or(0, |m| m.len());
            assert!(
                offset.checked_add(len).is_some_and(|end| end <= size),
                "read past the medium"
            );
        }
    }
    scsi_target(data);
}

/// The target half of [`scsi_cdb`]. Byte 15 of each CDB (the CONTROL
/// byte, which nothing interprets) picks the LUN (bits 1..0: 2 is absent)
/// and the initiator's buffer size (bits 7..2, in 512-byte units); the
/// buffer holds the input itself, so that parameter lists vary too.
fn scsi_target(data: &[u8]) {
    let (Some(disk_medium), Some(cd_medium)) = (null_medium("fuzz-hd"), null_medium("fuzz-cd"))
    else {
        return;
    };
    let size = disk_medium.len();
    let Ok(disk) = Disk::new(disk_medium, DiskOptions::default()) else {
        return;
    };
    let mut target = Target::new();
    let cd = Arc::new(CdRom::new(Transport::Scsi, Some(cd_medium)));
    if target.attach(0, Arc::new(disk)).is_err() || target.attach(1, cd).is_err() {
        return;
    }
    for (i, cdb) in data.chunks(16).enumerate() {
        let control = cdb.get(15).copied().unwrap_or(0);
        let lun = (control & 3) as u64;
        let len = (control >> 2) as usize * 512;
        let buf = data
            .iter()
            .cycle()
            .skip(i * 16)
            .take(len)
            .copied()
            .collect();
        if lun == 0 {
            if let Plan::Read { offset, len } | Plan::Write { offset, len, .. } =
                target.lun(0).map_or(Plan::Good, |d| d.execute(cdb))
            {
                assert!(
                    offset.checked_add(len).is_some_and(|end| end <= size),
                    "disk I/O past the medium"
                );
            }
        }
        let seen: Arc<Mutex<Vec<Outcome>>> = Arc::default();
        let log = seen.clone();
        target.start(lun, cdb, VecPath { buf }, move |o, p| {
            log.lock().unwrap_or_else(|e| e.into_inner()).push(o);
            assert_eq!(p.buf.len(), len, "the runner resized the buffer");
        });
        // The null medium completes inline: the request is over.
        let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(seen.len(), 1, "done runs exactly once");
        let o = seen[0];
        assert_eq!(o.transferred + o.residual, len as u64, "residual");
    }
}

const MEM: u64 = 64 << 10;

/// Lays `data` out as guest memory (descriptor table at 0) and parses the
/// chain the first bytes select, as a virtio-blk and as a virtio-scsi
/// request.
pub fn virtio_chain(data: &[u8]) {
    if data.len() < 6 {
        return;
    }
    let Ok(mem) = GuestMem::from_ranges(&[(GuestAddress(0), MEM as usize)]) else {
        return;
    };
    let head = u16::from_le_bytes([data[0], data[1]]);
    // Queue sizes are powers of two up to 32768.
    let size = 1u16 << (data[2] % 16);
    let flags = data[3];
    let lim = Limits {
        capacity_sectors: u64::from(data[4]) << 4,
        seg_max: u32::from(data[5]).max(1),
        read_only: flags & 1 != 0,
        indirect: flags & 2 != 0,
        discard: flags & 4 != 0,
        write_zeroes: flags & 8 != 0,
    };
    let body = &data[6..];
    let _ = mem.write_slice(&body[..body.len().min(MEM as usize)], GuestAddress(0));
    let at = ChainHead {
        table: GuestAddress(0),
        size,
        head,
    };
    let _ = Request::parse(&mem, at, &lim, &mut Chain::new());
    // The same chain as a virtio-scsi request, with CDB and sense sizes
    // the driver may have configured (flags bits 4-7; at most the
    // device's own). Checked: the response fits where it is written, and
    // bidirectional requests are refused.
    let mut chain = Chain::new();
    if chain.walk(&mem, at, lim.indirect).is_ok() {
        let cdb_size = u32::from(flags >> 4) * 2 + 6;
        let sense_size = u32::from(flags >> 4) * 6;
        if let Ok((req, resp)) =
            crate::virtio::scsi::CmdRequest::parse(&mem, &chain, cdb_size, sense_size)
        {
            assert_eq!(resp.len(), 12 + u64::from(sense_size), "response size");
            assert_eq!(req.cdb.len(), cdb_size as usize);
            assert!(req.data_in.is_empty() || req.data_out.is_empty());
        }
    }
}

fn ata_device(media: Media, slave: bool) -> Option<AtaDevice> {
    AtaDevice::new(DriveConfig::new(media), 0, slave).ok()
}

/// Runs `data` through the ATA device model as a transport would: each
/// 12-byte chunk is an opcode, the device/head register (bit 4 picks the
/// disk or the CD-ROM) and the ten other taskfile bytes, handed to
/// [`AtaDevice::command`]. The first 512 bytes are also a sector 0 for the
/// CHS geometry guess, and the input is a TRIM payload. Checked: disk
/// transfers stay on the medium and have a count, data-in is one sector,
/// TRIM sizes stay within IDENTIFY's limit and TRIM ranges on the medium.
pub fn ata_taskfile(data: &[u8]) {
    let sector0 = &data[..data.len().min(512)];
    let sectors = data.get(..8).map_or(0, |b| {
        u64::from_le_bytes(b.try_into().unwrap_or_default()) >> 16
    });
    let (g, _) = ata::geometry::guess(sectors, sector0, None, None);
    // CHS arithmetic divides by these.
    assert!(g.heads > 0 && g.secs > 0, "geometry {g:?}");

    let (Some(disk_medium), Some(cd_medium)) = (null_medium("fuzz-ata"), null_medium("fuzz-atapi"))
    else {
        return;
    };
    let size = disk_medium.len() / ata::device::SECTOR;
    let cd = CdRom::new(Transport::Atapi, Some(cd_medium));
    let (Some(mut disk), Some(mut cdrom)) = (
        ata_device(Media::Disk(disk_medium), false),
        ata_device(Media::Cd(Arc::new(cd)), true),
    ) else {
        return;
    };
    for c in data.chunks_exact(12) {
        let mut tf = Taskfile {
            select: c[1],
            feature: c[2],
            hob_feature: c[3],
            nsector: c[4],
            hob_nsector: c[5],
            sector: c[6],
            hob_sector: c[7],
            lcyl: c[8],
            hob_lcyl: c[9],
            hcyl: c[10],
            hob_hcyl: c[11],
        };
        let dev = if c[1] & 0x10 != 0 {
            &mut cdrom
        } else {
            &mut disk
        };
        match dev.command(c[0], &mut tf) {
            ata::Outcome::Read { lba, count, .. } | ata::Outcome::Write { lba, count, .. } => {
                assert!(!dev.is_atapi(), "disk transfer on a CD-ROM");
                assert!(count > 0, "empty transfer");
                assert!(
                    lba.checked_add(count as u64).is_some_and(|e| e <= size),
                    "transfer past the medium: {lba}+{count}"
                );
            }
            ata::Outcome::DataIn(v) => assert_eq!(v.len(), 512, "data-in size"),
            ata::Outcome::Trim { blocks } => {
                assert!(
                    blocks <= dev.info().max_dsm_blocks,
                    "TRIM of {blocks} blocks"
                );
                let payload = &data[..data.len().min(blocks as usize * 512)];
                if let Ok(ranges) = dev.trim_ranges(payload) {
                    for (lba, n) in ranges {
                        assert!(lba + n <= size, "TRIM past the medium");
                    }
                }
            }
            ata::Outcome::Packet { .. } => assert!(dev.is_atapi(), "PACKET on a disk"),
            _ => {}
        }
    }
}

/// Runs `data` through AHCI's command parsing as a port would: the first
/// 32 bytes are a command header, the rest its command table (cut where
/// the guest's memory would end). Checked: a parsed command has a PRD per
/// PRDTL entry, each PRD a byte count in 1..=4 MiB, and an NCQ command a
/// PRDT covering its transfer and a tag below 32. Then the slot runs on a
/// port ([`ahci_port`]).
pub fn ahci_command(data: &[u8]) {
    use crate::ahci::fis::{Command, CommandHeader, Kind, HEADER_LEN, PRD_MAX};
    let Some((h, table)) = data.split_first_chunk::<HEADER_LEN>() else {
        return;
    };
    let header = CommandHeader::parse(h);
    assert_eq!(header.ctba & 0x7f, 0, "unaligned command table");
    if let Ok(c) = Command::parse(header, table) {
        assert_eq!(c.prdt.len(), header.prdtl as usize);
        assert!(c.prdt.iter().all(|p| p.len >= 1 && p.len <= PRD_MAX));
        if let Kind::Ncq { tag, count, .. } = c.kind {
            assert!(tag < 32, "tag {tag}");
            assert!(c.prdt_bytes() >= count as u64 * 512, "short PRDT");
        }
    }
    ahci_port(h, table);
}

/// Guest memory of the port harness, and where the harness puts things.
const AHCI_RAM: usize = 256 << 10;
const AHCI_CLB: u64 = 0x1000;
const AHCI_FB: u64 = 0x2000;
const AHCI_CTBA: u64 = 0x4000;

/// [`ahci_command`]'s execution half: the slot runs on a port with a disk
/// (or, when the header's ATAPI bit is set, a CD-ROM), both 1 MiB of
/// null-co. The header goes into slots 0 and 1 with the table at a fixed
/// address (its own CTBA is the parser's business); slot 1 is issued as a
/// queued command too, so NCQ, PIO, DMA, TRIM and packet commands all run
/// with hostile PRDTs (addresses anywhere, past RAM included). The block
/// I/O they start is run to completion, bounded. Checked: the engine
/// settles (no slot both idle and issued forever), PxCI/PxSACT only hold
/// what was issued, and nothing writes outside guest memory.
fn ahci_port(h: &[u8; 32], table: &[u8]) {
    use crate::ahci::port::{Port, PortIo};
    use crate::ahci::regs::{cmd, port};
    let Ok(mem) = GuestMem::from_ranges(&[(GuestAddress(0), AHCI_RAM)]) else {
        return;
    };
    let mem = Arc::new(mem);
    let atapi = h[0] & 1 << 5 != 0;
    let media = if atapi {
        null_medium("fuzz-ahci-cd")
            .map(|m| Media::Cd(Arc::new(CdRom::new(Transport::Atapi, Some(m)))))
    } else {
        null_medium("fuzz-ahci").map(Media::Disk)
    };
    let Some(mut dev) = media.and_then(|m| ata_device(m, false)) else {
        return;
    };
    dev.enable_ncq();
    let mut hdr = *h;
    hdr[8..16].copy_from_slice(&AHCI_CTBA.to_le_bytes());
    let table = &table[..table.len().min(AHCI_RAM - AHCI_CTBA as usize)];
    for slot in 0..2u64 {
        if mem
            .write_slice(&hdr, GuestAddress(AHCI_CLB + 32 * slot))
            .is_err()
        {
            return;
        }
    }
    if mem.write_slice(table, GuestAddress(AHCI_CTBA)).is_err() {
        return;
    }
    let mut p = Port::new(mem.clone());
    p.attach(dev);
    let mut ios: Vec<PortIo> = Vec::new();
    ios.extend(p.write(port::CLB, AHCI_CLB as u32));
    ios.extend(p.write(port::FB, AHCI_FB as u32));
    ios.extend(p.write(port::IE, u32::MAX));
    ios.extend(p.write(port::CMD, cmd::FRE | cmd::ST));
    ios.extend(p.write(port::CI, 1));
    ios.extend(p.write(port::SACT, 2));
    ios.extend(p.write(port::CI, 2));
    // Each request completes at once (null-co); a command may start more
    // (TRIM steps, the next slot), never without end.
    let mut steps = 0;
    while let Some(io) = ios.pop() {
        steps += 1;
        assert!(steps < 10_000, "the port never settles");
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
        let ok = (0..n).all(|_| rx.recv().unwrap_or(false));
        ios.extend(p.complete(io.ticket, ok));
    }
    assert_eq!(p.regs.ci & !3, 0, "PxCI holds a slot never issued");
    assert_eq!(p.regs.sact & !2, 0, "PxSACT holds a tag never issued");
}

/// The LSI53C895A HBA: register accesses and SCRIPTS programs (see
/// [`crate::lsi::fuzz`] for the input format).
pub fn lsi(data: &[u8]) {
    crate::lsi::fuzz::run(data)
}

/// usb-storage: setup packets, CBWs and bulk packets (see
/// [`crate::usb::fuzz`] for the input format).
pub fn usb_bot(data: &[u8]) {
    crate::usb::fuzz::run(data)
}

/// usb-ccid: setup packets and CCID messages, whole and in packets (see
/// [`crate::usb::ccid::fuzz`] for the input format).
pub fn usb_ccid(data: &[u8]) {
    crate::usb::ccid::fuzz::run(data)
}

/// usb-uas: IUs and pipe transfers at high speed and with streams (see
/// [`crate::usb::uas::fuzz`] for the input format).
pub fn usb_uas(data: &[u8]) {
    crate::usb::uas::fuzz::run(data)
}

/// The xHCI: TRBs, rings, commands and transfers from guest memory
/// (see [`crate::usb::xhci::fuzz`] for the input format).
pub fn xhci_ring(data: &[u8]) {
    crate::usb::xhci::fuzz::run(data)
}

/// The EHCI: queue heads and qTDs parsed, and schedules walked over
/// the input as guest RAM (see [`crate::usb::ehci::fuzz`]).
pub fn usb_ehci(data: &[u8]) {
    crate::usb::ehci::fuzz::run(data)
}

/// The UHCI: link pointers, queue heads and TDs parsed, and the frame
/// list walked over the input as guest RAM (see
/// [`crate::usb::uhci::fuzz`]).
pub fn usb_uhci(data: &[u8]) {
    crate::usb::uhci::fuzz::run(data)
}

pub fn vhost_user(data: &[u8]) {
    crate::virtio::vhost_user::fuzz::run(data)
}

/// The VDUSE back end's control messages, ring set-ups and kicks from a
/// kernel stand-in, the input doubling as the driver's memory (see
/// [`crate::virtio::vduse::fuzz`]).
pub fn vduse(data: &[u8]) {
    crate::virtio::vduse::fuzz::run(data)
}

/// Every harness by name, for the corpus test.
pub fn by_name(name: &str) -> Option<fn(&[u8])> {
    match name {
        "ahci_command" => Some(ahci_command),
        "ata_taskfile" => Some(ata_taskfile),
        "lsi" => Some(lsi),
        "scsi_cdb" => Some(scsi_cdb),
        "usb_bot" => Some(usb_bot),
        "usb_ccid" => Some(usb_ccid),
        "usb_ehci" => Some(usb_ehci),
        "usb_uas" => Some(usb_uas),
        "usb_uhci" => Some(usb_uhci),
        "virtio_chain" => Some(virtio_chain),
        "xhci_ring" => Some(xhci_ring),
        "vhost_user" => Some(vhost_user),
        "vduse" => Some(vduse),
        _ => None,
    }
}
