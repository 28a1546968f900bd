//! Whole sectors for the drivers that can only work in them: the
//! encrypting formats (`luks`, qcow2 and qcow with a cipher), whose
//! ciphers take whole 512-byte sectors (QEMU's `request_alignment` and
//! its padding of unaligned requests in the generic block layer).
//!
//! A read that does not cover whole sectors reads them into a bounce
//! buffer and copies the asked bytes out. A write that does not reads
//! its head and tail sectors, merges the caller's bytes in and writes
//! the sectors whole: a read-modify-write, which must not interleave with
//! other writes to the same sectors, so every write holds its sectors in
//! a [`WriteRanges`] (a partial one serialising) until it is done.
//! Whole-sector writes read nothing first.

use crate::error::BlockResult;
use crate::iov;
use crate::serialise::WriteRanges;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

/// The sector size the ciphers work in.
pub const SECTOR: u64 = 512;

/// One driver's sector alignment: the writes in flight by sector.
#[derive(Default)]
pub struct Sectors {
    writes: Arc<WriteRanges>,
}

fn span(offset: u64, len: u64) -> (u64, u64) {
    (
        offset / SECTOR * SECTOR,
        offset.saturating_add(len).div_ceil(SECTOR) * SECTOR,
    )
}

impl Sectors {
    /// Read `iov` at `offset` through `read`, which fills whole sectors
    /// into one buffer (the cipher's unit: the caller's segments need not
    /// be sector multiples).
    pub fn read(
        &self,
        offset: u64,
        iov: &mut [IoSliceMut<'_>],
        read: impl Fn(u64, &mut [u8]) -> BlockResult<()>,
    ) -> BlockResult<()> {
        let len = iov::total_len_mut(iov) as u64;
        let (start, end) = span(offset, len);
        let mut buf = vec![0u8; (end - start) as usize];
        read(start, &mut buf)?;
        let skip = (offset - start) as usize;
        iov::scatter(&buf[skip..skip + len as usize], iov);
        Ok(())
    }

    /// Write `iov` at `offset` through `write`, which takes whole
    /// sectors in one buffer (`read` fetches the head and tail of a
    /// partial write).
    pub fn write(
        &self,
        offset: u64,
        iov: &[IoSlice<'_>],
        read: impl Fn(u64, &mut [u8]) -> BlockResult<()>,
        write: impl Fn(u64, &[u8]) -> BlockResult<()>,
    ) -> BlockResult<()> {
        let len = iov::total_len(iov) as u64;
        let (start, end) = span(offset, len);
        let whole = start == offset && end == offset + len;
        let _held = self.writes.begin(start, end, !whole);
        let mut buf = vec![0u8; (end - start) as usize];
        if !whole {
            read(start, &mut buf)?;
        }
        let skip = (offset - start) as usize;
        iov::gather(iov, &mut buf[skip..skip + len as usize]);
        write(start, &buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A store that refuses anything but whole sectors.
    struct Disk(Mutex<Vec<u8>>);

    impl Disk {
        fn read(&self, off: u64, buf: &mut [u8]) -> BlockResult<()> {
            let n = buf.len() as u64;
            assert!(
                off.is_multiple_of(SECTOR) && n.is_multiple_of(SECTOR),
                "{off} {n}"
            );
            let d = self.0.lock().unwrap();
            buf.copy_from_slice(&d[off as usize..(off + n) as usize]);
            Ok(())
        }
        fn write(&self, off: u64, buf: &[u8]) -> BlockResult<()> {
            let n = buf.len() as u64;
            assert!(
                off.is_multiple_of(SECTOR) && n.is_multiple_of(SECTOR),
                "{off} {n}"
            );
            self.0.lock().unwrap()[off as usize..(off + n) as usize].copy_from_slice(buf);
            Ok(())
        }
    }

    #[test]
    fn unaligned_requests_become_whole_sectors() {
        let disk = Disk(Mutex::new(vec![7u8; 4096]));
        let s = Sectors::default();
        let data = vec![1u8; 1000];
        s.write(
            700,
            &[IoSlice::new(&data[..300]), IoSlice::new(&data[300..])],
            |o, i| disk.read(o, i),
            |o, i| disk.write(o, i),
        )
        .unwrap();
        let mut back = vec![0u8; 1200];
        s.read(600, &mut [IoSliceMut::new(&mut back)], |o, i| {
            disk.read(o, i)
        })
        .unwrap();
        assert!(back[..100].iter().all(|&b| b == 7));
        assert!(back[100..1100].iter().all(|&b| b == 1));
        assert!(back[1100..].iter().all(|&b| b == 7));
        // Whole-sector writes read nothing.
        s.write(
            1024,
            &[IoSlice::new(&[2u8; 512])],
            |_, _| panic!("no read for a whole-sector write"),
            |o, i| disk.write(o, i),
        )
        .unwrap();
        assert_eq!(disk.0.lock().unwrap()[1024], 2);
    }
}
