//! The abstract child a format works on: byte-addressed storage with
//! read/write/flush/len/set_len (DESIGN.md: "pure logic over an abstract
//! child"). The block layer adapts its nodes to this trait; tests and the
//! fuzz harness use [`MemStorage`].
//!
//! Contract: reads past the end return zeroes (as QEMU's `file` protocol
//! does), writes past the end grow the storage.

use std::io;
use std::sync::Mutex;

/// Byte storage under a format.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync {
    /// Fill `buf` from `offset`; bytes past the end read as zeroes.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Make completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Set the length (grow with zeroes or cut).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Make a range read as zeroes (default: write zeroes).
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zero = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zero.len() as u64) as usize;
            self.write_at(offset + done, &zero[..n])?;
            done += n as u64;
        }
        Ok(())
    }
    /// Drop the data of a range (advisory).
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// False for a slot that holds nothing now: a backing link the block
    /// layer has detached (after a `block-stream` without base, say). A
    /// format treats such storage as if it had no backing file at all.
    fn is_present(&self) -> bool {
        true
    }
    /// Reserve host space for a range without writing it (`fallocate`),
    /// growing the storage to cover it. Default: only grow, for storage
    /// that has no notion of reserved space.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.saturating_add(len);
        if self.len()? < end {
            self.set_len(end)?;
        }
        Ok(())
    }
}

/// Storage in memory, for tests and fuzzing.
#[derive(Default)]
pub struct MemStorage {
    data: Mutex<Vec<u8>>,
    /// Largest length the storage may grow to (writes beyond fail with ENOSPC).
    pub limit: u64,
}

impl MemStorage {
    /// Storage holding `data`, allowed to grow to `limit` bytes.
    pub fn new(data: Vec<u8>, limit: u64) -> Self {
        MemStorage {
            data: Mutex::new(data),
            limit,
        }
    }
    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(28)
}

impl Storage for MemStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        buf.fill(0);
        if offset < d.len() as u64 {
            let start = offset as usize;
            let n = (d.len() - start).min(buf.len());
            buf[..n].copy_from_slice(&d[start..start + n]);
        }
        Ok(())
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).ok_or_else(enospc)?;
        if end > self.limit {
            return Err(enospc());
        }
        let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        if d.len() < end as usize {
            d.resize(end as usize, 0);
        }
        d[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.lock().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > self.limit {
            return Err(enospc());
        }
        self.data
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .resize(len as usize, 0);
        Ok(())
    }
}
