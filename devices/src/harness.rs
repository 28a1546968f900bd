//! Fuzzing harnesses for the parsers of guest data in this crate: the SCSI
//! CDB parser and MMC command set (shared by ATAPI and, later, every SCSI
//! transport), and the virtio-blk descriptor-chain parser. The cargo fuzz
//! targets under `fuzz/` call these functions, and
//! `devices/tests/fuzz_corpus.rs` replays each corpus as a regular test.
//! The property: no input panics, loops forever, or reads outside guest
//! memory.

use block::backend::{BackendConfig, BlockBackend};
use block::graph::BlockGraph;
use vm_memory::{Bytes, GuestAddress};

use crate::scsi::cdb::Command;
use crate::scsi::mmc::{CdRom, Reply, Transport};
use crate::virtio::block::{Limits, Request};
use crate::virtio::chain::{Chain, ChainHead};
use crate::GuestMem;

/// A CD-ROM with a 1 MiB medium that reads as zeros.
fn null_cd() -> Option<CdRom> {
    let graph = BlockGraph::new();
    let node = graph
        .blockdev_add_str("driver=null-co,size=1048576,read-zeroes=on")
        .ok()?;
    let medium = BlockBackend::new("fuzz-cd", node, BackendConfig::default()).ok()?;
    Some(CdRom::new(Transport::Atapi, Some(medium)))
}

/// Runs `data` as a sequence of 12-byte CDBs (ATAPI's packet size) through
/// the parser and the CD-ROM model.
pub fn scsi_cdb(data: &[u8]) {
    let Some(mut cd) = null_cd() else { return };
    for cdb in data.chunks(12) {
        let _ = Command::parse(cdb);
        if let Reply::Read { offset, len } = cd.execute(cdb) {
            // A read the model accepts must lie on the medium.
            let size = cd.medium().map_or(0, |m| m.len());
            assert!(
                offset.checked_add(len).is_some_and(|end| end <= size),
                "read past the medium"
            );
        }
    }
}

const MEM: u64 = 64 << 10;

/// Lays `data` out as guest memory (descriptor table at 0) and parses the
/// chain the first bytes select.
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
}

/// Both harnesses by name, for the corpus test.
pub fn by_name(name: &str) -> Option<fn(&[u8])> {
    match name {
        "scsi_cdb" => Some(scsi_cdb),
        "virtio_chain" => Some(virtio_chain),
        _ => None,
    }
}
