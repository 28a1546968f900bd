//! Test helpers: the driver's side of a split virtqueue, written by hand
//! into guest memory, so that tests can build the malformed chains a
//! hostile driver would.

use vm_memory::{Bytes, GuestAddress};

use super::chain::ChainHead;
use crate::GuestMem;

pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const INDIRECT: u16 = 4;

/// Where tests put the descriptor table.
pub const TABLE: u64 = 0x1000;
/// Guest RAM size of [`mem`].
pub const RAM: u64 = 1 << 20;

/// 1 MiB of guest RAM at 0.
pub fn mem() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
}

/// Writes descriptor `i` of the table at `table`.
pub fn desc(mem: &GuestMem, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(table + 16 * i as u64))
        .unwrap();
}

/// Lays out buffers `(address, length, device-writable)` as descriptors
/// `first`, `first + 1`, ... of the table at `table`, linked in that order.
pub fn chain(mem: &GuestMem, table: u64, first: u16, bufs: &[(u64, u32, bool)]) {
    for (k, &(addr, len, w)) in bufs.iter().enumerate() {
        let i = first + k as u16;
        let last = k + 1 == bufs.len();
        let flags = if w { WRITE } else { 0 } | if last { 0 } else { NEXT };
        desc(mem, table, i, addr, len, flags, i + 1);
    }
}

/// The chain at `head` of a 16-entry table at [`TABLE`].
pub fn head(head: u16) -> ChainHead {
    ChainHead {
        table: GuestAddress(TABLE),
        size: 16,
        head,
    }
}
