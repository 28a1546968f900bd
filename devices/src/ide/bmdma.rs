//! Bus-master IDE registers and the Physical Region Descriptor table
//! (SFF-8038i revision 1.0, sections 2 and 3; PIIX3 datasheet 2.7.2).
//!
//! Per channel, in BAR4 at +0 (primary) and +8 (secondary):
//! - +0 command: bit 0 start/stop, bit 3 direction (1 = the controller
//!   writes memory, i.e. a device read).
//! - +2 status: bit 0 active (read-only), bit 1 error and bit 2 interrupt
//!   (write 1 to clear), bits 5/6 "drive 0/1 DMA capable" (read/write).
//! - +4 PRD table address, dword aligned.
//!
//! A PRD is 8 bytes: a 32-bit physical address, a 16-bit byte count (0
//! means 64 KiB; bit 0 is ignored) and bit 31 of the second dword marking
//! the end of the table (EOT). [`walk`] reads the table through
//! bounds-checked guest memory accesses and turns it into a list of
//! segments, with an explicit cap on the number of entries, so that a
//! table outside RAM or without EOT ends in an error, never a panic or an
//! endless loop.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::GuestMem;

pub const CMD_START: u8 = 0x01;
pub const CMD_WRITE_TO_MEMORY: u8 = 0x08;
pub const STATUS_ACTIVE: u8 = 0x01;
pub const STATUS_ERROR: u8 = 0x02;
pub const STATUS_INTERRUPT: u8 = 0x04;
pub const STATUS_DMA_CAPABLE: u8 = 0x60;

/// The table may not cross a 64 KiB boundary (SFF-8038i 3.1), so a valid
/// one has at most 8192 entries; walking more means the guest built an
/// endless table.
pub const MAX_PRDS: usize = 8192;

#[derive(Clone, Copy, Debug, Default)]
pub struct BmRegs {
    pub cmd: u8,
    pub status: u8,
    pub prd_addr: u32,
}

/// The guest memory a transfer touches, in table order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SgList {
    pub segments: Vec<(u64, usize)>,
    /// Total bytes of `segments`.
    pub len: usize,
    /// The table ended (EOT) before `wanted` bytes were described.
    pub short: bool,
    /// The transfer ends exactly at the end of the EOT entry, so the
    /// controller has nothing left and clears "active" (SFF-8038i 3.2:
    /// otherwise active stays set with the interrupt bit).
    pub exhausted: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrdError {
    /// An entry or a buffer lies outside guest RAM.
    OutsideRam(u64),
    /// No EOT within [`MAX_PRDS`] entries.
    TooLong,
}

/// Builds the scatter list for a transfer of `wanted` bytes.
pub fn walk(mem: &GuestMem, table: u32, wanted: usize) -> Result<SgList, PrdError> {
    let mut sg = SgList::default();
    let mut addr = (table & !3) as u64;
    for _ in 0..MAX_PRDS {
        let mut e = [0u8; 8];
        mem.read_slice(&mut e, GuestAddress(addr))
            .map_err(|_| PrdError::OutsideRam(addr))?;
        let base = u32::from_le_bytes([e[0], e[1], e[2], e[3]]) as u64;
        let count = match u16::from_le_bytes([e[4], e[5]]) & !1 {
            0 => 0x10000,
            n => n as usize,
        };
        let eot = e[7] & 0x80 != 0;
        let take = count.min(wanted - sg.len);
        if take > 0 {
            if !GuestMemoryBackend::check_range(mem, GuestAddress(base), take) {
                return Err(PrdError::OutsideRam(base));
            }
            sg.segments.push((base, take));
            sg.len += take;
        }
        if sg.len == wanted {
            sg.exhausted = eot && take == count;
            return Ok(sg);
        }
        if eot {
            sg.short = true;
            sg.exhausted = true;
            return Ok(sg);
        }
        addr += 8;
    }
    Err(PrdError::TooLong)
}

/// The segment pieces covering `len` bytes from byte `offset` of `sg`.
fn pieces(sg: &SgList, offset: usize, len: usize) -> impl Iterator<Item = (u64, usize)> + '_ {
    let end = offset.saturating_add(len);
    let mut pos = 0usize;
    sg.segments.iter().filter_map(move |&(a, l)| {
        let (s, e) = (pos, pos + l);
        pos = e;
        let (from, to) = (s.max(offset), e.min(end));
        (from < to).then(|| (a + (from - s) as u64, to - from))
    })
}

/// Copies `data` into the segments from byte `offset` of the list on (one
/// chunk of a device read). Bytes past the list's end are dropped.
pub fn scatter_at(mem: &GuestMem, sg: &SgList, offset: usize, data: &[u8]) -> bool {
    let mut done = 0;
    for (a, l) in pieces(sg, offset, data.len()) {
        if mem
            .write_slice(&data[done..done + l], GuestAddress(a))
            .is_err()
        {
            return false;
        }
        done += l;
    }
    true
}

/// Fills `buf` from the segments, from byte `offset` of the list on (one
/// chunk of a device write); false if the list is shorter than that.
pub fn gather_at(mem: &GuestMem, sg: &SgList, offset: usize, buf: &mut [u8]) -> bool {
    let mut done = 0;
    for (a, l) in pieces(sg, offset, buf.len()) {
        if mem
            .read_slice(&mut buf[done..done + l], GuestAddress(a))
            .is_err()
        {
            return false;
        }
        done += l;
    }
    done == buf.len()
}

/// Copies `data` into the segments (a device read). The segments were
/// checked by [`walk`]; a failure here still only reports false.
pub fn scatter(mem: &GuestMem, sg: &SgList, data: &[u8]) -> bool {
    let mut off = 0;
    for &(a, l) in &sg.segments {
        let end = (off + l).min(data.len());
        if off >= end {
            break;
        }
        if mem.write_slice(&data[off..end], GuestAddress(a)).is_err() {
            return false;
        }
        off = end;
    }
    true
}

/// Reads the segments into one buffer (a device write).
pub fn gather(mem: &GuestMem, sg: &SgList) -> Option<Vec<u8>> {
    let mut v = vec![0u8; sg.len];
    let mut off = 0;
    for &(a, l) in &sg.segments {
        mem.read_slice(&mut v[off..off + l], GuestAddress(a)).ok()?;
        off += l;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap()
    }

    fn prd(m: &GuestMem, at: u64, base: u32, count: u16, eot: bool) {
        let mut e = [0u8; 8];
        e[..4].copy_from_slice(&base.to_le_bytes());
        e[4..6].copy_from_slice(&count.to_le_bytes());
        e[7] = if eot { 0x80 } else { 0 };
        m.write_slice(&e, GuestAddress(at)).unwrap();
    }

    #[test]
    fn tables() {
        let m = mem();
        prd(&m, 0x1000, 0x2000, 512, false);
        prd(&m, 0x1008, 0x4000, 1024, true);
        let sg = walk(&m, 0x1000, 1536).unwrap();
        assert_eq!(sg.segments, vec![(0x2000, 512), (0x4000, 1024)]);
        assert!(sg.exhausted && !sg.short);
        // Longer table than the transfer: active stays.
        let sg = walk(&m, 0x1000, 1024).unwrap();
        assert_eq!(sg.segments, vec![(0x2000, 512), (0x4000, 512)]);
        assert!(!sg.exhausted);
        // Short table.
        let sg = walk(&m, 0x1000, 4096).unwrap();
        assert!(sg.short);
        assert_eq!(sg.len, 1536);
        // Buffer outside RAM.
        prd(&m, 0x1008, 0x7fff_0000, 1024, true);
        assert_eq!(
            walk(&m, 0x1000, 1536),
            Err(PrdError::OutsideRam(0x7fff_0000))
        );
        // Table outside RAM.
        assert!(matches!(
            walk(&m, 0xfff0_0000, 512),
            Err(PrdError::OutsideRam(_))
        ));
        // Endless table: more than 8192 tiny entries without EOT.
        for i in 0..8200 {
            prd(&m, 0x10000 + 8 * i, 0x100, 2, false);
        }
        assert_eq!(walk(&m, 0x10000, 1 << 20), Err(PrdError::TooLong));
        // Chunked copies at an offset cross segment boundaries.
        prd(&m, 0x1000, 0x2000, 4, false);
        prd(&m, 0x1008, 0x3000, 4, true);
        let sg = walk(&m, 0x1000, 8).unwrap();
        assert!(scatter_at(&m, &sg, 2, &[1, 2, 3, 4]));
        let mut b = [0u8; 8];
        assert!(gather_at(&m, &sg, 0, &mut b));
        assert_eq!(b, [0, 0, 1, 2, 3, 4, 0, 0]);
        let mut b = [0u8; 3];
        assert!(gather_at(&m, &sg, 3, &mut b));
        assert_eq!(b, [2, 3, 4]);
        assert!(!gather_at(&m, &sg, 6, &mut b), "past the end");
        // 0 bytes count = 64 KiB.
        prd(&m, 0x1000, 0x0, 0, true);
        assert_eq!(walk(&m, 0x1000, 0x10000).unwrap().len, 0x10000);
    }
}
