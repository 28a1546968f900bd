//! Device DMA into guest RAM: scatter-gather lists that a controller builds
//! from guest data (a virtqueue chain, an AHCI PRD table, an LSI SCRIPTS
//! move, an xHCI TD) and hands to the block layer or copies through.
//!
//! A [`GuestSgList`] is a list of `(guest address, length)` segments, each
//! checked when it is added: no wrapping arithmetic, every byte in guest
//! RAM, at most as many segments and bytes as the device allows. It turns
//! into [`IoVecs`] that point straight into guest RAM and keep the memory
//! mapped until the request is done ([`GuestSgList::to_iovecs`], built on
//! `block::iov::IoVecs::from_guest`), so no device writes `unsafe` code.
//!
//! Devices that bounce through a host buffer (emulated SCSI data phases,
//! PIO, anything that must look at or transform the bytes) copy with
//! [`GuestSgList::read_at`] and [`GuestSgList::write_at`], in pieces of at
//! most [`MAX_BOUNCE`] bytes ([`GuestSgList::chunks`]): host memory per
//! request stays bounded whatever length the guest asks for.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use block::iov::IoVecs;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileMemory};

use crate::GuestMem;

/// True if `[addr, addr + len)` is guest RAM (an empty range always is).
///
/// The same answer as `vm-memory`'s `check_range`, cheaper on the path
/// every request takes: that one walks the regions with a generic
/// iterator on each call, where a range inside one region (all of them
/// but those that straddle two adjacent regions) costs one region lookup
/// here; the others, and anything not RAM, get `check_range`'s answer.
pub fn in_ram(mem: &GuestMem, addr: GuestAddress, len: usize) -> bool {
    if len == 0 {
        return true;
    }
    if let Some(r) = mem.find_region(addr) {
        // `addr` is in the region: no underflow.
        if len as u64 <= r.len() - (addr.0 - r.start_addr().0) {
            return true;
        }
    }
    mem.check_range(addr, len)
}

/// Copies guest RAM at `addr` into `buf` (`read_slice`, with the
/// one-region fast path of [`in_ram`]). Fails if any byte is not RAM.
pub fn read_ram(mem: &GuestMem, addr: GuestAddress, buf: &mut [u8]) -> Result<(), DmaError> {
    match mem.get_slice(addr, buf.len()) {
        Ok(s) => {
            s.copy_to(buf);
            Ok(())
        }
        Err(_) => mem.read_slice(buf, addr).map_err(|_| DmaError::OutOfRam),
    }
}

/// Writes one byte of guest RAM (a status byte), false if `addr` is not
/// RAM: a region lookup and a store, where the general copy costs several
/// times that.
pub fn write_ram_byte(mem: &GuestMem, addr: GuestAddress, v: u8) -> bool {
    let Some(r) = mem.find_region(addr) else {
        return false;
    };
    // `addr` is in the region: no underflow.
    let off = (addr.0 - r.start_addr().0) as usize;
    match r.get_ref::<u8>(off) {
        Ok(b) => {
            b.store(v);
            true
        }
        Err(_) => false,
    }
}

/// Loads a 16-bit value of guest RAM atomically with `order`, in native
/// order (a ring index or head; callers convert from little endian):
/// vm-memory's `load` with one region lookup. `None` unless both bytes
/// are RAM in one region and `addr` is 2-aligned, as for `load`.
pub fn load_ram_u16(mem: &GuestMem, addr: GuestAddress, order: Ordering) -> Option<u16> {
    let r = mem.find_region(addr)?;
    // `addr` is in the region: no underflow.
    let off = (addr.0 - r.start_addr().0) as usize;
    r.get_atomic_ref::<AtomicU16>(off)
        .ok()
        .map(|v| v.load(order))
}

/// Copies `buf` into guest RAM at `addr` (`write_slice`, with the
/// one-region fast path of [`in_ram`]). Fails, writing nothing, if any
/// byte is not RAM.
pub fn write_ram(mem: &GuestMem, addr: GuestAddress, buf: &[u8]) -> Result<(), DmaError> {
    match mem.get_slice(addr, buf.len()) {
        Ok(s) => {
            s.copy_from(buf);
            Ok(())
        }
        Err(_) if !mem.check_range(addr, buf.len()) => Err(DmaError::OutOfRam),
        Err(_) => mem.write_slice(buf, addr).map_err(|_| DmaError::OutOfRam),
    }
}

/// The largest host buffer a device should bounce one request through.
pub const MAX_BOUNCE: usize = 4 << 20;

/// Why a segment or a copy was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// `address + length` does not fit in 64 bits.
    #[error("segment wraps around the address space")]
    Overflow,
    /// Part of the segment is not guest RAM.
    #[error("segment outside guest RAM")]
    OutOfRam,
    /// More segments than the list allows.
    #[error("too many segments")]
    TooManySegments,
    /// More bytes in total than the list allows.
    #[error("transfer too long")]
    TooLong,
    /// A segment is RAM but spans two memory regions, so it cannot be
    /// handed to the host as one buffer.
    #[error("segment spans two memory regions")]
    NotContiguous,
    /// An offset or length beyond the end of the list.
    #[error("access beyond the end of the list")]
    OutOfBounds,
}

/// A checked scatter-gather list over guest RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSgList {
    segs: Vec<(GuestAddress, usize)>,
    len: u64,
    max_segments: usize,
    max_len: u64,
}

impl GuestSgList {
    /// An empty list that accepts at most `max_segments` (non-empty)
    /// segments and `max_len` bytes in total. Allocates nothing until the
    /// first segment.
    pub fn new(max_segments: usize, max_len: u64) -> Self {
        GuestSgList {
            segs: Vec::new(),
            len: 0,
            max_segments,
            max_len,
        }
    }

    /// Like [`GuestSgList::new`], but in `storage` (emptied first): a
    /// caller that recycles its lists ([`GuestSgList::into_storage`])
    /// allocates nothing per list once the storage has grown.
    pub fn with_storage(
        mut storage: Vec<(GuestAddress, usize)>,
        max_segments: usize,
        max_len: u64,
    ) -> Self {
        storage.clear();
        GuestSgList {
            segs: storage,
            len: 0,
            max_segments,
            max_len,
        }
    }

    /// The list's storage, for the next [`GuestSgList::with_storage`].
    pub fn into_storage(self) -> Vec<(GuestAddress, usize)> {
        self.segs
    }

    /// Adds `len` bytes at `addr`, after checking that the range does not
    /// wrap, lies in guest RAM, and keeps the list within its limits. An
    /// empty segment is accepted and not stored. On error the list is
    /// unchanged.
    pub fn push(&mut self, mem: &GuestMem, addr: GuestAddress, len: usize) -> Result<(), DmaError> {
        if len == 0 {
            return Ok(());
        }
        addr.0.checked_add(len as u64).ok_or(DmaError::Overflow)?;
        if self.segs.len() >= self.max_segments {
            return Err(DmaError::TooManySegments);
        }
        let total = self
            .len
            .checked_add(len as u64)
            .filter(|&t| t <= self.max_len)
            .ok_or(DmaError::TooLong)?;
        if !in_ram(mem, addr, len) {
            return Err(DmaError::OutOfRam);
        }
        self.segs.push((addr, len));
        self.len = total;
        Ok(())
    }

    /// Forgets every segment (keeping the allocation and the limits).
    pub fn clear(&mut self) {
        self.segs.clear();
        self.len = 0;
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if the list holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segments, in order; none is empty.
    pub fn segments(&self) -> &[(GuestAddress, usize)] {
        &self.segs
    }

    /// The buffers for a block-layer request: `iovec`s straight into guest
    /// RAM that keep `mem` alive until the request is dropped. Fails with
    /// [`DmaError::NotContiguous`] if a segment spans two memory regions.
    pub fn to_iovecs(&self, mem: &Arc<GuestMem>) -> Result<IoVecs, DmaError> {
        IoVecs::from_guest(mem, &self.segs).ok_or(DmaError::NotContiguous)
    }

    /// The segment pieces that cover `len` bytes from byte `offset` of the
    /// list, as `(guest address, length)`.
    fn pieces(
        &self,
        offset: u64,
        len: usize,
    ) -> Result<impl Iterator<Item = (GuestAddress, usize)> + '_, DmaError> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.len)
            .ok_or(DmaError::OutOfBounds)?;
        let mut pos = 0u64;
        Ok(self.segs.iter().filter_map(move |&(a, l)| {
            let (s, e) = (pos, pos + l as u64);
            pos = e;
            let (from, to) = (s.max(offset), e.min(end));
            // `from - s` is inside this segment, which was checked not to
            // wrap.
            (from < to).then(|| (GuestAddress(a.0 + (from - s)), (to - from) as usize))
        }))
    }

    /// Copies `buf.len()` bytes of guest memory, from byte `offset` of the
    /// list on, into `buf` (device reads, guest to host).
    pub fn read_at(&self, mem: &GuestMem, offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let mut done = 0;
        for (a, l) in self.pieces(offset, buf.len())? {
            mem.read_slice(&mut buf[done..done + l], a)
                .map_err(|_| DmaError::OutOfRam)?;
            done += l;
        }
        Ok(())
    }

    /// Copies `buf` into guest memory from byte `offset` of the list on
    /// (device writes, host to guest).
    pub fn write_at(&self, mem: &GuestMem, offset: u64, buf: &[u8]) -> Result<(), DmaError> {
        let mut done = 0;
        for (a, l) in self.pieces(offset, buf.len())? {
            mem.write_slice(&buf[done..done + l], a)
                .map_err(|_| DmaError::OutOfRam)?;
            done += l;
        }
        Ok(())
    }

    /// Fills the whole list with zeroes (the tail of a short read, a
    /// medium that is not there), in bounded pieces.
    pub fn zero(&self, mem: &GuestMem) -> Result<(), DmaError> {
        const ZEROES: [u8; 4096] = [0; 4096];
        for (off, n) in self.chunks(ZEROES.len()) {
            self.write_at(mem, off, &ZEROES[..n])?;
        }
        Ok(())
    }

    /// The `(offset, length)` pieces of a bounced transfer: in order,
    /// covering the list, each at most `max` bytes (and at most
    /// [`MAX_BOUNCE`]; a `max` of 0 counts as 1). Allocate one buffer of
    /// [`GuestSgList::bounce_len`] bytes and reuse it for every piece.
    pub fn chunks(&self, max: usize) -> impl Iterator<Item = (u64, usize)> {
        let step = max.clamp(1, MAX_BOUNCE) as u64;
        let len = self.len;
        (0..len.div_ceil(step)).map(move |i| {
            let off = i * step;
            (off, (len - off).min(step) as usize)
        })
    }

    /// The host buffer size a bounced transfer in pieces of `max` bytes
    /// needs: the list's length, capped at `max` and [`MAX_BOUNCE`].
    pub fn bounce_len(&self, max: usize) -> usize {
        self.len.min(max.clamp(1, MAX_BOUNCE) as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMem {
        // Two regions with a hole between them: [0, 64K) and [128K, 192K).
        GuestMem::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x2_0000), 0x1_0000),
        ])
        .unwrap()
    }

    #[test]
    fn ram_helpers_agree_with_vm_memory_across_regions() {
        // Two adjacent regions: a range across the boundary is RAM, but
        // not in one region, so it takes the fallback.
        let m = GuestMem::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1_0000),
        ])
        .unwrap();
        for (a, l) in [
            (0xfff8, 16),
            (0x100, 16),
            (0x1_fff8, 8),
            (0x1_fff8, 9),
            (0, 0),
        ] {
            assert_eq!(
                in_ram(&m, GuestAddress(a), l),
                m.check_range(GuestAddress(a), l)
            );
        }
        write_ram(&m, GuestAddress(0xfff8), &[7; 16]).unwrap();
        assert!(write_ram_byte(&m, GuestAddress(0x1_ffff), 9));
        let ld = |a| load_ram_u16(&m, GuestAddress(a), Ordering::Acquire);
        assert_eq!(ld(0x1_fffe), Some(0x0900));
        assert_eq!(ld(0x1_ffff), None, "across the end, and misaligned");
        assert_eq!(ld(0xfff9), None, "misaligned");
        assert!(!write_ram_byte(&m, GuestAddress(0x2_0000), 9));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x1_ffff)).unwrap(), 9);
        let mut b = [0u8; 16];
        read_ram(&m, GuestAddress(0xfff8), &mut b).unwrap();
        assert_eq!(b, [7; 16]);
        assert_eq!(
            write_ram(&m, GuestAddress(0x1_fff8), &[1; 9]),
            Err(DmaError::OutOfRam)
        );
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x1_fff8)).unwrap(),
            0,
            "nothing written"
        );
        assert_eq!(
            read_ram(&mem(), GuestAddress(0xfff8), &mut b),
            Err(DmaError::OutOfRam),
            "runs into the hole"
        );
    }

    #[test]
    fn segments_are_checked_when_added() {
        let m = mem();
        let mut sg = GuestSgList::new(3, 0x3000);
        assert_eq!(
            sg.push(&m, GuestAddress(u64::MAX - 1), 4),
            Err(DmaError::Overflow)
        );
        assert_eq!(
            sg.push(&m, GuestAddress(0xff00), 0x200),
            Err(DmaError::OutOfRam),
            "runs into the hole"
        );
        assert_eq!(
            sg.push(&m, GuestAddress(0x3_0000), 1),
            Err(DmaError::OutOfRam),
            "past the end of RAM"
        );
        sg.push(&m, GuestAddress(0x1000), 0x1000).unwrap();
        sg.push(&m, GuestAddress(0x5000), 0).unwrap();
        assert_eq!(sg.segments().len(), 1, "empty segments are not stored");
        assert_eq!(
            sg.push(&m, GuestAddress(0x2000), 0x2001),
            Err(DmaError::TooLong)
        );
        sg.push(&m, GuestAddress(0x2000), 0x1000).unwrap();
        sg.push(&m, GuestAddress(0x2_0000), 0x1000).unwrap();
        assert_eq!(
            sg.push(&m, GuestAddress(0x4000), 1),
            Err(DmaError::TooManySegments)
        );
        assert_eq!(sg.len(), 0x3000);
        assert_eq!(sg.segments().len(), 3);
    }

    #[test]
    fn total_length_arithmetic_is_checked() {
        let m = mem();
        let mut sg = GuestSgList::new(usize::MAX, u64::MAX);
        sg.len = u64::MAX - 1;
        assert_eq!(sg.push(&m, GuestAddress(0), 2), Err(DmaError::TooLong));
        assert_eq!(sg.len(), u64::MAX - 1, "unchanged on error");
    }

    #[test]
    fn copies_cross_segment_boundaries_and_stay_in_bounds() {
        let m = mem();
        let mut sg = GuestSgList::new(8, 1 << 20);
        sg.push(&m, GuestAddress(0x100), 3).unwrap();
        sg.push(&m, GuestAddress(0x2_0000), 2).unwrap();
        sg.push(&m, GuestAddress(0x200), 4).unwrap();
        sg.write_at(&m, 1, &[1, 2, 3, 4, 5, 6]).unwrap();
        let mut all = [0u8; 9];
        sg.read_at(&m, 0, &mut all).unwrap();
        assert_eq!(all, [0, 1, 2, 3, 4, 5, 6, 0, 0]);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x2_0001)).unwrap(), 4);
        assert_eq!(sg.read_at(&m, 8, &mut [0u8; 2]), Err(DmaError::OutOfBounds));
        assert_eq!(sg.write_at(&m, u64::MAX, &[0]), Err(DmaError::OutOfBounds));
        sg.read_at(&m, 9, &mut []).unwrap();
        sg.zero(&m).unwrap();
        sg.read_at(&m, 0, &mut all).unwrap();
        assert_eq!(all, [0; 9]);
    }

    #[test]
    fn bounce_chunks_are_bounded_whatever_the_guest_asks() {
        let m = GuestMem::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let mut sg = GuestSgList::new(4, u64::MAX);
        sg.push(&m, GuestAddress(0), 10 << 20).unwrap();
        sg.push(&m, GuestAddress(12 << 20), 3).unwrap();
        assert_eq!(sg.bounce_len(usize::MAX), MAX_BOUNCE);
        let c: Vec<_> = sg.chunks(usize::MAX).collect();
        assert_eq!(
            c,
            [
                (0, MAX_BOUNCE),
                (4 << 20, MAX_BOUNCE),
                (8 << 20, (2 << 20) + 3)
            ]
        );
        let c: Vec<_> = sg.chunks(0).take(2).collect();
        assert_eq!(c, [(0, 1), (1, 1)]);
        let mut small = GuestSgList::new(1, 100);
        small.push(&m, GuestAddress(0), 100).unwrap();
        assert_eq!(small.bounce_len(4096), 100);
        assert_eq!(small.chunks(64).collect::<Vec<_>>(), [(0, 64), (64, 36)]);
        assert_eq!(GuestSgList::new(1, 1).chunks(64).count(), 0);
    }

    #[test]
    fn iovecs_point_into_guest_memory_and_need_one_mapping() {
        let m = Arc::new(mem());
        let mut sg = GuestSgList::new(4, 1 << 20);
        sg.push(&m, GuestAddress(0x10), 4).unwrap();
        sg.push(&m, GuestAddress(0x2_0000), 4).unwrap();
        let mut iov = sg.to_iovecs(&m).unwrap();
        assert_eq!(iov.len(), 8);
        block::iov::scatter(&[1, 2, 3, 4, 5, 6, 7, 8], &mut iov.slices_mut());
        drop(iov);
        assert_eq!(m.read_obj::<u32>(GuestAddress(0x10)).unwrap(), 0x0403_0201);
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(0x2_0000)).unwrap(),
            0x0807_0605
        );

        // Adjacent regions: RAM throughout, but not one mapping.
        let split = Arc::new(
            GuestMem::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
                .unwrap(),
        );
        let mut sg = GuestSgList::new(4, 1 << 20);
        sg.push(&split, GuestAddress(0xff0), 0x20).unwrap();
        assert_eq!(sg.to_iovecs(&split).err(), Some(DmaError::NotContiguous));
    }
}
