//! Descriptor chains of split virtqueues (virtio 1.2, section 2.7.5; indirect
//! tables, 2.7.5.3), read the way a hostile driver cannot abuse.
//!
//! [`Chain::walk`] follows a chain from its head and checks everything the
//! driver controls: descriptor indices against the table, loops, the chain
//! length, indirect tables (negotiated, not nested, not combined with NEXT,
//! a whole number of descriptors, in RAM), that every buffer lies in guest
//! RAM, and that device-readable buffers come before device-writable ones
//! (2.7.4.2). The result is two typed parts: the readable (driver to
//! device) descriptors, then the writable (device to driver) ones.
//!
//! A device then reads its request with a [`Reader`] (a header struct,
//! bytes, across descriptor boundaries) and answers with a [`Writer`];
//! either hands the rest of its bytes to the block layer as a
//! [`GuestSgList`]. The status byte that ends a virtio-blk chain (and
//! anything else that answers with a last device-writable byte) is found by
//! [`Chain::status_byte`], which also works on a chain that failed to parse
//! so the driver still gets an answer, and is written by [`write_status`].

use vm_memory::volatile_memory::VolatileArrayRef;
use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileMemory};

use crate::dma::{in_ram, read_ram, write_ram, write_ram_byte, DmaError, GuestSgList};
use crate::GuestMem;

/// Longest chain accepted, direct or indirect: bounds the walk (and the
/// indirect tables, whose length the driver chooses).
pub const MAX_CHAIN: usize = 1024;

/// Descriptor flags (section 2.7.5).
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Why a chain, or an access to its buffers, was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A descriptor index beyond its table.
    #[error("descriptor index out of range")]
    BadIndex,
    /// A descriptor table or a buffer is not in guest RAM.
    #[error("descriptor or buffer outside guest RAM")]
    OutOfRam,
    /// The chain visits a descriptor twice.
    #[error("descriptor chain loops")]
    Loop,
    /// More than [`MAX_CHAIN`] descriptors.
    #[error("descriptor chain too long")]
    TooLong,
    /// An indirect table inside an indirect table, with NEXT, empty, after
    /// other descriptors, or of a length that is not a multiple of 16.
    #[error("malformed indirect descriptor")]
    BadIndirect,
    /// INDIRECT used without RING_INDIRECT_DESC.
    #[error("indirect descriptor not negotiated")]
    IndirectNotNegotiated,
    /// A device-readable descriptor after a device-writable one.
    #[error("readable descriptor after a writable one")]
    WrongDirection,
    /// A [`Reader`] or [`Writer`] has fewer bytes left than asked for.
    #[error("buffer too short")]
    TooShort,
    /// Turning buffers into a scatter-gather list failed (its limits).
    #[error("{0}")]
    Dma(#[from] DmaError),
}

/// Where a popped chain starts: the queue's descriptor table and size,
/// and the head index the driver put in the available ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    pub table: GuestAddress,
    pub size: u16,
    pub head: u16,
}

/// One descriptor as read from guest memory (section 2.7.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub writable: bool,
}

/// A walked chain: its descriptors, readable ones first. Reusable: keep
/// one per worker and walk every chain into it, so that parsing allocates
/// nothing once it has grown.
#[derive(Debug, Default)]
pub struct Chain {
    head: u16,
    descs: Vec<Desc>,
    /// How many descriptors come before the first writable one.
    readable: usize,
    /// Storage for the scatter-gather list of the next request parsed
    /// from this chain, recycled by its user ([`Chain::take_sg_storage`]).
    sg_storage: Vec<(GuestAddress, usize)>,
}

impl Chain {
    pub fn new() -> Self {
        Chain {
            head: 0,
            descs: Vec::with_capacity(16),
            readable: 0,
            sg_storage: Vec::new(),
        }
    }

    /// Storage for a request's scatter-gather list
    /// ([`crate::dma::GuestSgList::with_storage`]): what was given back
    /// last, or nothing yet.
    pub fn take_sg_storage(&mut self) -> Vec<(GuestAddress, usize)> {
        std::mem::take(&mut self.sg_storage)
    }

    /// Gives a list's storage back once the request is done with it.
    pub fn recycle_sg_storage(&mut self, v: Vec<(GuestAddress, usize)>) {
        self.sg_storage = v;
    }

    /// Walks the chain at `at` into `self`, following one indirect table
    /// if `indirect` (RING_INDIRECT_DESC was negotiated).
    ///
    /// Errors in the table structure (index, loop, length, indirect) stop
    /// the walk. Errors in buffers (outside RAM, readable after writable)
    /// do not: the chain is still followed to its end and kept, so that
    /// [`Chain::status_byte`] can find where to answer; the first such
    /// error is returned.
    pub fn walk(
        &mut self,
        mem: &GuestMem,
        at: ChainHead,
        indirect: bool,
    ) -> Result<(), ChainError> {
        self.head = at.head;
        self.descs.clear();
        self.readable = 0;
        let r = self.walk_inner(mem, at, indirect);
        self.readable = self
            .descs
            .iter()
            .position(|d| d.writable)
            .unwrap_or(self.descs.len());
        r
    }

    fn walk_inner(
        &mut self,
        mem: &GuestMem,
        at: ChainHead,
        indirect_ok: bool,
    ) -> Result<(), ChainError> {
        let out = &mut self.descs;
        let (mut table, mut size, mut idx) = (at.table.0, at.size as usize, at.head as usize);
        // The table as an array, looked up once per table rather than once
        // per descriptor.
        let mut array = table_array(mem, table, size);
        let mut in_indirect = false;
        let mut deferred = None;
        // MAX_CHAIN bits: queue sizes and indirect tables are both bounded
        // by it.
        let mut seen = [0u64; MAX_CHAIN / 64];
        loop {
            if idx >= size {
                return Err(ChainError::BadIndex);
            }
            // The transport keeps queues at MAX_CHAIN entries or fewer, so
            // the bitmap covers every index; should a larger table ever
            // reach here, the MAX_CHAIN bound on the chain's length still
            // ends a loop.
            if let Some(word) = seen.get_mut(idx / 64) {
                if *word & (1 << (idx % 64)) != 0 {
                    return Err(ChainError::Loop);
                }
                *word |= 1 << (idx % 64);
            }
            // Each field is read once: the driver may change the table
            // meanwhile, and what is checked is what is used.
            let (addr, rest) = match &array {
                // `idx < size`: inside the array.
                Some(a) => (
                    u64::from_le(a.load(2 * idx)),
                    u64::from_le(a.load(2 * idx + 1)),
                ),
                None => {
                    let a = table
                        .checked_add(idx as u64 * 16)
                        .ok_or(ChainError::OutOfRam)?;
                    let mut raw = [0u8; 16];
                    read_ram(mem, GuestAddress(a), &mut raw).map_err(|_| ChainError::OutOfRam)?;
                    (
                        u64::from_le_bytes(raw[0..8].try_into().unwrap()),
                        u64::from_le_bytes(raw[8..16].try_into().unwrap()),
                    )
                }
            };
            let len = rest as u32;
            let flags = (rest >> 32) as u16;
            let next = (rest >> 48) as u16;
            if flags & F_INDIRECT != 0 {
                // Section 2.7.5.3.1: only in the main table, never with
                // NEXT, a whole number of descriptors.
                if !indirect_ok {
                    return Err(ChainError::IndirectNotNegotiated);
                }
                if in_indirect || flags & F_NEXT != 0 || len == 0 || !len.is_multiple_of(16) {
                    return Err(ChainError::BadIndirect);
                }
                if !out.is_empty() {
                    return Err(ChainError::BadIndirect);
                }
                let n = len as usize / 16;
                if n > MAX_CHAIN {
                    return Err(ChainError::TooLong);
                }
                if !in_ram(mem, GuestAddress(addr), len as usize) {
                    return Err(ChainError::OutOfRam);
                }
                table = addr;
                size = n;
                array = table_array(mem, table, size);
                idx = 0;
                in_indirect = true;
                seen = [0u64; MAX_CHAIN / 64];
                continue;
            }
            if out.len() >= MAX_CHAIN {
                return Err(ChainError::TooLong);
            }
            let writable = flags & F_WRITE != 0;
            // Buffer errors do not stop the walk: the chain is still
            // followed to its end so that the driver gets a status byte.
            // Section 2.7.4.2: readable descriptors come first.
            if !writable && out.last().is_some_and(|d| d.writable) {
                deferred.get_or_insert(ChainError::WrongDirection);
            }
            if !in_ram(mem, GuestAddress(addr), len as usize) {
                deferred.get_or_insert(ChainError::OutOfRam);
            }
            out.push(Desc {
                addr: GuestAddress(addr),
                len,
                writable,
            });
            if flags & F_NEXT == 0 {
                return deferred.map_or(Ok(()), Err);
            }
            idx = next as usize;
        }
    }

    /// The head index (what goes into the used ring).
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Every descriptor, in chain order.
    pub fn descriptors(&self) -> &[Desc] {
        &self.descs
    }

    /// The device-readable descriptors (all of them come first once the
    /// walk succeeded).
    pub fn readable(&self) -> &[Desc] {
        &self.descs[..self.readable]
    }

    /// The device-writable descriptors.
    pub fn writable(&self) -> &[Desc] {
        &self.descs[self.readable..]
    }

    /// Bytes the driver gave the device to read.
    pub fn readable_len(&self) -> u64 {
        self.readable().iter().map(|d| d.len as u64).sum()
    }

    /// Bytes the device may write.
    pub fn writable_len(&self) -> u64 {
        self.writable().iter().map(|d| d.len as u64).sum()
    }

    /// Reads the device-readable bytes, in order.
    pub fn reader<'a>(&'a self, mem: &'a GuestMem) -> Reader<'a> {
        Reader(Cursor::new(mem, self.readable()))
    }

    /// Writes the device-writable bytes, in order.
    pub fn writer<'a>(&'a self, mem: &'a GuestMem) -> Writer<'a> {
        Writer(Cursor::new(mem, self.writable()))
    }

    /// The last byte of the chain's last descriptor, if that descriptor is
    /// device-writable, not empty and in RAM: where virtio-blk's status
    /// goes (section 5.2.6). Also meaningful after a buffer error from
    /// [`Chain::walk`], so that a malformed request still gets an answer.
    pub fn status_byte(&self, mem: &GuestMem) -> Option<GuestAddress> {
        let d = self.descs.last()?;
        if !d.writable || d.len == 0 {
            return None;
        }
        let a = d.addr.0.checked_add(d.len as u64 - 1)?;
        in_ram(mem, GuestAddress(a), 1).then_some(GuestAddress(a))
    }
}

/// The `n` descriptors of the table at `table` as `2n` little-endian
/// words, when the table lies in one memory region (else each descriptor
/// is read on its own, and one outside RAM fails when it is used).
fn table_array(mem: &GuestMem, table: u64, n: usize) -> Option<VolatileArrayRef<'_, u64, ()>> {
    let r = mem.find_region(GuestAddress(table))?;
    let off = usize::try_from(table - r.start_addr().0).ok()?;
    r.get_array_ref::<u64>(off, n.checked_mul(2)?).ok()
}

/// Ends a request whose answer is a status byte: writes `status` at `at`
/// (if there is one) and returns the length for the used ring, `data_len`
/// bytes written before plus the status byte if it was written.
pub fn write_status(mem: &GuestMem, at: Option<GuestAddress>, status: u8, data_len: u32) -> u32 {
    match at {
        Some(a) if write_ram_byte(mem, a, status) => data_len.saturating_add(1),
        _ => data_len,
    }
}

/// A position in a list of descriptors, with a bound on how many bytes
/// may still be reached.
#[derive(Clone, Debug)]
struct Cursor<'a> {
    mem: &'a GuestMem,
    descs: &'a [Desc],
    /// Current descriptor and offset in it.
    idx: usize,
    off: u64,
    /// Bytes left to this cursor.
    left: u64,
}

impl<'a> Cursor<'a> {
    fn new(mem: &'a GuestMem, descs: &'a [Desc]) -> Self {
        Cursor {
            mem,
            descs,
            idx: 0,
            off: 0,
            left: descs.iter().map(|d| d.len as u64).sum(),
        }
    }

    /// The next contiguous piece of at most `max` bytes, consumed.
    fn next_piece(&mut self, max: u64) -> Option<(GuestAddress, usize)> {
        if self.left == 0 || max == 0 {
            return None;
        }
        loop {
            let d = self.descs.get(self.idx)?;
            let avail = d.len as u64 - self.off;
            if avail == 0 {
                self.idx += 1;
                self.off = 0;
                continue;
            }
            let n = avail.min(max).min(self.left);
            // Cannot wrap for a descriptor the walk accepted (in RAM); for
            // any other the access below fails instead.
            let a = GuestAddress(d.addr.0.wrapping_add(self.off));
            self.off += n;
            self.left -= n;
            return Some((a, n as usize));
        }
    }

    fn skip(&mut self, n: u64) -> Result<(), ChainError> {
        if n > self.left {
            return Err(ChainError::TooShort);
        }
        let mut todo = n;
        while todo > 0 {
            let Some((_, l)) = self.next_piece(todo) else {
                break;
            };
            todo -= l as u64;
        }
        Ok(())
    }

    fn truncate(&mut self, len: u64) {
        self.left = self.left.min(len);
    }

    fn split_at(mut self, n: u64) -> Result<(Self, Self), ChainError> {
        if n > self.left {
            return Err(ChainError::TooShort);
        }
        let mut first = self.clone();
        first.left = n;
        self.skip(n)?;
        Ok((first, self))
    }

    fn sg_list(&mut self, out: &mut GuestSgList) -> Result<(), ChainError> {
        while let Some((a, l)) = self.next_piece(u64::MAX) {
            out.push(self.mem, a, l)?;
        }
        Ok(())
    }
}

/// Reads the device-readable part of a chain as one byte stream.
#[derive(Clone, Debug)]
pub struct Reader<'a>(Cursor<'a>);

impl<'a> Reader<'a> {
    /// Bytes left.
    pub fn remaining(&self) -> u64 {
        self.0.left
    }

    /// Reads up to `buf.len()` bytes; returns how many were read (fewer
    /// only at the end).
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChainError> {
        let mut done = 0;
        while let Some((a, l)) = self.0.next_piece((buf.len() - done) as u64) {
            read_ram(self.0.mem, a, &mut buf[done..done + l]).map_err(|_| ChainError::OutOfRam)?;
            done += l;
        }
        Ok(done)
    }

    /// Reads exactly `buf.len()` bytes, or nothing if fewer are left.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ChainError> {
        if (buf.len() as u64) > self.0.left {
            return Err(ChainError::TooShort);
        }
        self.read(buf).map(|_| ())
    }

    /// Reads `N` bytes (a header, to decode with `from_le_bytes`), which
    /// may span descriptors.
    pub fn read_array<const N: usize>(&mut self) -> Result<[u8; N], ChainError> {
        let mut v = [0u8; N];
        self.read_exact(&mut v)?;
        Ok(v)
    }

    /// Reads a plain-data value (an integer, an array, one of
    /// `vm-memory`'s `Le32`-style types), which may span descriptors.
    pub fn read_obj<T: ByteValued>(&mut self) -> Result<T, ChainError> {
        let mut v = T::zeroed();
        self.read_exact(v.as_mut_slice())?;
        Ok(v)
    }

    /// Skips `n` bytes.
    pub fn skip(&mut self, n: u64) -> Result<(), ChainError> {
        self.0.skip(n)
    }

    /// Limits the bytes left to at most `len`.
    pub fn truncate(&mut self, len: u64) {
        self.0.truncate(len)
    }

    /// Splits into the next `n` bytes and the rest.
    pub fn split_at(self, n: u64) -> Result<(Reader<'a>, Reader<'a>), ChainError> {
        let (a, b) = self.0.split_at(n)?;
        Ok((Reader(a), Reader(b)))
    }

    /// Adds the bytes left to `out` (the data of a write to the disk) and
    /// consumes them.
    pub fn sg_list(&mut self, out: &mut GuestSgList) -> Result<(), ChainError> {
        self.0.sg_list(out)
    }
}

/// Writes the device-writable part of a chain as one byte stream.
#[derive(Clone, Debug)]
pub struct Writer<'a>(Cursor<'a>);

impl<'a> Writer<'a> {
    /// Bytes left.
    pub fn remaining(&self) -> u64 {
        self.0.left
    }

    /// Writes as much of `buf` as fits; returns how many bytes were
    /// written.
    pub fn write(&mut self, buf: &[u8]) -> Result<usize, ChainError> {
        let mut done = 0;
        while let Some((a, l)) = self.0.next_piece((buf.len() - done) as u64) {
            write_ram(self.0.mem, a, &buf[done..done + l]).map_err(|_| ChainError::OutOfRam)?;
            done += l;
        }
        Ok(done)
    }

    /// Writes all of `buf`, or nothing if it does not fit.
    pub fn write_all(&mut self, buf: &[u8]) -> Result<(), ChainError> {
        if (buf.len() as u64) > self.0.left {
            return Err(ChainError::TooShort);
        }
        self.write(buf).map(|_| ())
    }

    /// Writes a plain-data value (an integer, a byte array), which may
    /// span descriptors.
    pub fn write_obj<T: ByteValued>(&mut self, v: T) -> Result<(), ChainError> {
        self.write_all(v.as_slice())
    }

    /// Skips `n` bytes.
    pub fn skip(&mut self, n: u64) -> Result<(), ChainError> {
        self.0.skip(n)
    }

    /// Limits the bytes left to at most `len` (for example, all but a
    /// status byte at the end).
    pub fn truncate(&mut self, len: u64) {
        self.0.truncate(len)
    }

    /// Splits into the next `n` bytes and the rest (a reply header, then
    /// data).
    pub fn split_at(self, n: u64) -> Result<(Writer<'a>, Writer<'a>), ChainError> {
        let (a, b) = self.0.split_at(n)?;
        Ok((Writer(a), Writer(b)))
    }

    /// Adds the bytes left to `out` (the buffers of a read from the disk)
    /// and consumes them.
    pub fn sg_list(&mut self, out: &mut GuestSgList) -> Result<(), ChainError> {
        self.0.sg_list(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{chain, desc, head, mem, INDIRECT, NEXT, RAM, TABLE, WRITE};
    use vm_memory::Bytes;

    fn walk(mem: &GuestMem, at: ChainHead, indirect: bool) -> (Result<(), ChainError>, Chain) {
        let mut c = Chain::new();
        let r = c.walk(mem, at, indirect);
        (r, c)
    }

    #[test]
    fn a_chain_splits_into_readable_then_writable() {
        let m = mem();
        chain(
            &m,
            TABLE,
            3,
            &[
                (0x10000, 10, false),
                (0x10100, 6, false),
                (0x20000, 512, true),
                (0x30000, 1, true),
            ],
        );
        let (r, c) = walk(&m, head(3), false);
        r.unwrap();
        assert_eq!(c.head(), 3);
        assert_eq!(c.descriptors().len(), 4);
        assert_eq!(c.readable().len(), 2);
        assert_eq!(c.writable().len(), 2);
        assert_eq!((c.readable_len(), c.writable_len()), (16, 513));
        assert_eq!(c.status_byte(&m), Some(GuestAddress(0x30000)));
        // Walking again reuses the chain.
        chain(&m, TABLE, 0, &[(0x10000, 4, true)]);
        let mut c = c;
        c.walk(&m, head(0), false).unwrap();
        assert_eq!((c.readable_len(), c.writable_len()), (0, 4));
        assert_eq!(c.status_byte(&m), Some(GuestAddress(0x10003)));
    }

    #[test]
    fn head_index_out_of_range() {
        let m = mem();
        assert_eq!(walk(&m, head(16), false).0, Err(ChainError::BadIndex));
    }

    #[test]
    fn next_index_out_of_range() {
        let m = mem();
        desc(&m, TABLE, 0, 0x10000, 16, NEXT, 16);
        assert_eq!(walk(&m, head(0), false).0, Err(ChainError::BadIndex));
    }

    #[test]
    fn a_loop_is_refused() {
        let m = mem();
        desc(&m, TABLE, 0, 0x10000, 16, NEXT, 1);
        desc(&m, TABLE, 1, 0x10000, 16, NEXT, 2);
        desc(&m, TABLE, 2, 0x10000, 16, NEXT, 0);
        assert_eq!(walk(&m, head(0), false).0, Err(ChainError::Loop));
        // A descriptor that names itself.
        desc(&m, TABLE, 5, 0x10000, 16, NEXT, 5);
        assert_eq!(walk(&m, head(5), false).0, Err(ChainError::Loop));
    }

    #[test]
    fn a_loop_in_an_indirect_table_is_refused() {
        let m = mem();
        desc(&m, TABLE, 0, 0x8000, 32, INDIRECT, 0);
        desc(&m, 0x8000, 0, 0x10000, 16, NEXT, 1);
        desc(&m, 0x8000, 1, 0x10000, 16, NEXT, 0);
        assert_eq!(walk(&m, head(0), true).0, Err(ChainError::Loop));
    }

    #[test]
    fn a_chain_longer_than_max_chain_is_refused() {
        let m = mem();
        // A 2048-entry table: more than MAX_CHAIN distinct descriptors.
        let at = ChainHead {
            table: GuestAddress(0x4_0000),
            size: 2048,
            head: 0,
        };
        for i in 0..2048u16 {
            desc(&m, 0x4_0000, i, 0x10000, 1, NEXT, i + 1);
        }
        assert_eq!(walk(&m, at, false).0, Err(ChainError::TooLong));
    }

    #[test]
    fn an_indirect_table_longer_than_max_chain_is_refused() {
        let m = mem();
        desc(
            &m,
            TABLE,
            0,
            0x4_0000,
            16 * (MAX_CHAIN as u32 + 1),
            INDIRECT,
            0,
        );
        assert_eq!(walk(&m, head(0), true).0, Err(ChainError::TooLong));
    }

    #[test]
    fn indirect_without_the_feature() {
        let m = mem();
        desc(&m, TABLE, 0, 0x8000, 16, INDIRECT, 0);
        desc(&m, 0x8000, 0, 0x10000, 1, WRITE, 0);
        assert_eq!(
            walk(&m, head(0), false).0,
            Err(ChainError::IndirectNotNegotiated)
        );
        let (r, c) = walk(&m, head(0), true);
        r.unwrap();
        assert_eq!(c.writable_len(), 1);
    }

    #[test]
    fn indirect_in_indirect() {
        let m = mem();
        desc(&m, TABLE, 0, 0x8000, 16, INDIRECT, 0);
        desc(&m, 0x8000, 0, 0x9000, 16, INDIRECT, 0);
        desc(&m, 0x9000, 0, 0x10000, 1, WRITE, 0);
        assert_eq!(walk(&m, head(0), true).0, Err(ChainError::BadIndirect));
    }

    #[test]
    fn indirect_with_next() {
        let m = mem();
        desc(&m, TABLE, 0, 0x8000, 16, INDIRECT | NEXT, 1);
        desc(&m, 0x8000, 0, 0x10000, 1, WRITE, 0);
        desc(&m, TABLE, 1, 0x10000, 1, WRITE, 0);
        assert_eq!(walk(&m, head(0), true).0, Err(ChainError::BadIndirect));
    }

    #[test]
    fn malformed_indirect_tables() {
        let m = mem();
        // Not a multiple of 16 bytes.
        desc(&m, TABLE, 0, 0x8000, 24, INDIRECT, 0);
        assert_eq!(walk(&m, head(0), true).0, Err(ChainError::BadIndirect));
        // Empty.
        desc(&m, TABLE, 0, 0x8000, 0, INDIRECT, 0);
        assert_eq!(walk(&m, head(0), true).0, Err(ChainError::BadIndirect));
        // After a direct descriptor.
        desc(&m, TABLE, 0, 0x10000, 16, NEXT, 1);
        desc(&m, TABLE, 1, 0x8000, 16, INDIRECT, 0);
        assert_eq!(walk(&m, head(0), true).0, Err(ChainError::BadIndirect));
        // Outside RAM.
        desc(&m, TABLE, 0, RAM - 16, 32, INDIRECT, 0);
        assert_eq!(walk(&m, head(0), true).0, Err(ChainError::OutOfRam));
        // Next index beyond the indirect table's own length.
        desc(&m, TABLE, 0, 0x8000, 32, INDIRECT, 0);
        desc(&m, 0x8000, 0, 0x10000, 1, NEXT, 2);
        assert_eq!(walk(&m, head(0), true).0, Err(ChainError::BadIndex));
    }

    #[test]
    fn descriptor_table_outside_ram() {
        let m = mem();
        let at = ChainHead {
            table: GuestAddress(RAM - 16),
            size: 16,
            head: 1,
        };
        assert_eq!(walk(&m, at, false).0, Err(ChainError::OutOfRam));
        let at = ChainHead {
            table: GuestAddress(u64::MAX - 15),
            size: 16,
            head: 2,
        };
        assert_eq!(walk(&m, at, false).0, Err(ChainError::OutOfRam));
    }

    #[test]
    fn a_buffer_outside_ram_still_finds_the_status_byte() {
        let m = mem();
        chain(
            &m,
            TABLE,
            0,
            &[(0x10000, 16, false), (RAM - 4, 8, true), (0x30000, 1, true)],
        );
        let (r, c) = walk(&m, head(0), false);
        assert_eq!(r, Err(ChainError::OutOfRam));
        assert_eq!(c.descriptors().len(), 3, "walked to the end");
        assert_eq!(c.status_byte(&m), Some(GuestAddress(0x30000)));
        // A buffer whose end wraps around the address space.
        chain(
            &m,
            TABLE,
            0,
            &[(u64::MAX - 1, 4, false), (0x30000, 1, true)],
        );
        assert_eq!(walk(&m, head(0), false).0, Err(ChainError::OutOfRam));
    }

    #[test]
    fn writable_before_readable_still_finds_the_status_byte() {
        let m = mem();
        chain(
            &m,
            TABLE,
            0,
            &[(0x10000, 8, true), (0x10100, 16, false), (0x30000, 1, true)],
        );
        let (r, c) = walk(&m, head(0), false);
        assert_eq!(r, Err(ChainError::WrongDirection));
        assert_eq!(c.status_byte(&m), Some(GuestAddress(0x30000)));
    }

    #[test]
    fn no_status_byte() {
        let m = mem();
        // The last descriptor is readable.
        chain(&m, TABLE, 0, &[(0x10000, 16, false)]);
        let (r, c) = walk(&m, head(0), false);
        r.unwrap();
        assert_eq!(c.status_byte(&m), None);
        // The last descriptor is writable but empty.
        chain(&m, TABLE, 0, &[(0x10000, 16, false), (0x20000, 0, true)]);
        let (r, c) = walk(&m, head(0), false);
        r.unwrap();
        assert_eq!(c.status_byte(&m), None);
        // ... or outside RAM.
        chain(&m, TABLE, 0, &[(0x10000, 16, false), (RAM, 1, true)]);
        let (r, c) = walk(&m, head(0), false);
        assert_eq!(r, Err(ChainError::OutOfRam));
        assert_eq!(c.status_byte(&m), None);
    }

    #[test]
    fn write_status_counts_the_byte_it_wrote() {
        let m = mem();
        assert_eq!(write_status(&m, Some(GuestAddress(0x100)), 7, 512), 513);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x100)).unwrap(), 7);
        assert_eq!(write_status(&m, None, 7, 512), 512);
        assert_eq!(write_status(&m, Some(GuestAddress(RAM)), 7, 0), 0);
        assert_eq!(
            write_status(&m, Some(GuestAddress(0)), 0, u32::MAX),
            u32::MAX
        );
    }

    /// Readable bytes 0..24 over three descriptors of 5, 0, 19 bytes; 32
    /// writable bytes over two of 3 and 29.
    fn split_chain(m: &GuestMem) -> Chain {
        let src: Vec<u8> = (0..24).collect();
        m.write_slice(&src[..5], GuestAddress(0x10000)).unwrap();
        m.write_slice(&src[5..], GuestAddress(0x11000)).unwrap();
        chain(
            m,
            TABLE,
            0,
            &[
                (0x10000, 5, false),
                (0x12000, 0, false),
                (0x11000, 19, false),
                (0x20000, 3, true),
                (0x21000, 29, true),
            ],
        );
        let (r, c) = walk(m, head(0), false);
        r.unwrap();
        c
    }

    #[test]
    fn reader_reads_across_descriptor_boundaries() {
        let m = mem();
        let c = split_chain(&m);
        let mut rd = c.reader(&m);
        assert_eq!(rd.remaining(), 24);
        let h: [u8; 8] = rd.read_array().unwrap();
        assert_eq!(h, [0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(
            rd.read_obj::<u32>().unwrap(),
            u32::from_le_bytes([8, 9, 10, 11])
        );
        rd.skip(2).unwrap();
        let mut big = [0u8; 32];
        assert_eq!(
            rd.read_exact(&mut big),
            Err(ChainError::TooShort),
            "asks for more than is left"
        );
        assert_eq!(rd.remaining(), 10, "a refused read consumes nothing");
        assert_eq!(rd.read(&mut big).unwrap(), 10);
        assert_eq!(big[..10], [14, 15, 16, 17, 18, 19, 20, 21, 22, 23]);
        assert_eq!(rd.read(&mut big).unwrap(), 0);
        assert_eq!(rd.skip(1), Err(ChainError::TooShort));
    }

    #[test]
    fn reader_split_and_sg_list() {
        let m = mem();
        let c = split_chain(&m);
        let (mut hdr, mut rest) = c.reader(&m).split_at(6).unwrap();
        assert_eq!(hdr.remaining(), 6);
        assert_eq!(hdr.read_array::<6>().unwrap(), [0, 1, 2, 3, 4, 5]);
        assert_eq!(rest.read_array::<2>().unwrap(), [6, 7]);
        let mut sg = GuestSgList::new(8, 1 << 20);
        rest.truncate(10);
        rest.sg_list(&mut sg).unwrap();
        assert_eq!(sg.segments(), [(GuestAddress(0x11003), 10)]);
        assert_eq!(rest.remaining(), 0);
        assert!(c.reader(&m).split_at(25).is_err());

        let mut sg = GuestSgList::new(8, 1 << 20);
        let mut rd = c.reader(&m);
        rd.skip(3).unwrap();
        rd.sg_list(&mut sg).unwrap();
        assert_eq!(
            sg.segments(),
            [(GuestAddress(0x10003), 2), (GuestAddress(0x11000), 19)],
            "empty descriptors leave no segment"
        );
        // The list's limits hold.
        let mut one = GuestSgList::new(1, 1 << 20);
        assert_eq!(
            c.reader(&m).sg_list(&mut one),
            Err(ChainError::Dma(DmaError::TooManySegments))
        );
    }

    #[test]
    fn writer_writes_across_descriptor_boundaries() {
        let m = mem();
        let c = split_chain(&m);
        let mut w = c.writer(&m);
        assert_eq!(w.remaining(), 32);
        w.write_obj(0x0403_0201u32).unwrap();
        w.write_all(&[5, 6]).unwrap();
        let mut b = [0u8; 6];
        m.read_slice(&mut b[..3], GuestAddress(0x20000)).unwrap();
        m.read_slice(&mut b[3..], GuestAddress(0x21000)).unwrap();
        assert_eq!(b, [1, 2, 3, 4, 5, 6]);
        // All but a status byte at the end.
        w.truncate(w.remaining() - 1);
        assert_eq!(w.remaining(), 25);
        assert_eq!(w.write_all(&[9; 26]), Err(ChainError::TooShort));
        assert_eq!(w.write(&[9; 40]).unwrap(), 25);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x21000 + 27)).unwrap(), 9);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x21000 + 28)).unwrap(), 0);
        assert_eq!(w.write(&[1]).unwrap(), 0);

        let (mut resp, mut data) = c.writer(&m).split_at(4).unwrap();
        let mut sg = GuestSgList::new(8, 1 << 20);
        data.sg_list(&mut sg).unwrap();
        assert_eq!(
            sg.segments(),
            [(GuestAddress(0x21001), 28)],
            "the data after a 4-byte reply header"
        );
        resp.write_all(&[0xaa; 4]).unwrap();
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x21000)).unwrap(), 0xaa);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x21001)).unwrap(), 5);
    }
}
