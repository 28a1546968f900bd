//! cloop compressed images (the Linux compressed loop device, version
//! 2.0, as `create_compressed_fs` writes them and QEMU's cloop driver
//! reads them), read only.
//!
//! Layout (cloop's `cloop.h`, `struct cloop_head`): a 128-byte preamble
//! (a shell script that mounts the file), then the block size and the
//! number of blocks as big-endian 32-bit words at 128 and 132, then
//! `n + 1` big-endian 64-bit file offsets: block `i` is the zlib stream
//! stored in `[offset[i], offset[i+1])`, which inflates to exactly one
//! block. The guest size is `n * block size`.

use crate::error::{FResult, FormatError};
use crate::mapping::{push_run, Piece, ReadOnlyMap, Run};
use crate::storage::Storage;
use std::sync::{Arc, Mutex};

/// The start of the preamble of version 2.0 images.
pub const MAGIC: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
const PREAMBLE: u64 = 128;
/// QEMU's bound on the block size (64 MiB).
const MAX_BLOCK: u64 = 64 << 20;
/// QEMU's bound on the offset table (512 MiB).
const MAX_OFFSETS_BYTES: u64 = 512 << 20;

/// An open cloop image.
pub struct Cloop {
    name: String,
    file: Arc<dyn Storage>,
    block_size: u64,
    offsets: Vec<u64>,
    /// The last block inflated, by index: reads come in small pieces.
    cache: Mutex<Option<(u64, Vec<u8>)>>,
}

/// How sure probing is that `head` starts a cloop 2.0 image.
pub fn probe(head: &[u8]) -> u32 {
    if head.starts_with(MAGIC) {
        2
    } else {
        0
    }
}

fn be32(b: &[u8]) -> u64 {
    u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

impl Cloop {
    /// Open the image in `file` (named `name` in errors).
    pub fn open(name: &str, file: Arc<dyn Storage>) -> FResult<Cloop> {
        let corrupt = |m: String| FormatError::Corrupt(format!("{name}: {m}"));
        let mut h = [0u8; 8];
        file.read_at(PREAMBLE, &mut h)
            .map_err(|e| FormatError::io(e, format!("{name}: Could not read the header")))?;
        let (block_size, n) = (be32(&h[..4]), be32(&h[4..]));
        if block_size == 0 || block_size % 512 != 0 {
            return Err(corrupt(format!(
                "block_size {block_size} must be a multiple of 512"
            )));
        }
        if block_size > MAX_BLOCK {
            return Err(corrupt(format!(
                "block_size {block_size} must be 64 MB or less"
            )));
        }
        let table = (n + 1) * 8;
        if table > MAX_OFFSETS_BYTES {
            return Err(corrupt(
                "image requires too many offsets, try increasing block size".into(),
            ));
        }
        // The table is read whole: it must be in the file, so that a
        // hostile count cannot make the reader allocate what is not there.
        let file_len = file
            .len()
            .map_err(|e| FormatError::io(e, format!("{name}: Could not read the header")))?;
        if PREAMBLE + 8 + table > file_len {
            return Err(corrupt(format!(
                "the offsets of {n} blocks do not fit in the file"
            )));
        }
        let mut raw = vec![0u8; table as usize];
        file.read_at(PREAMBLE + 8, &mut raw)
            .map_err(|e| FormatError::io(e, format!("{name}: Could not read the offsets")))?;
        let offsets: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        for i in 0..n as usize {
            let (a, b) = (offsets[i], offsets[i + 1]);
            if b < a {
                return Err(corrupt(format!(
                    "offsets not monotonically increasing at index {i}, image file is corrupt"
                )));
            }
            // A zlib stream of one block is at most a little larger than
            // the block (QEMU allows twice the largest block).
            if b - a > 2 * MAX_BLOCK {
                return Err(corrupt(format!(
                    "invalid compressed block size at index {i}, image file is corrupt"
                )));
            }
        }
        Ok(Cloop {
            name: name.to_string(),
            file,
            block_size,
            offsets,
            cache: Mutex::new(None),
        })
    }

    /// Inflate block `i` into `out` (one block long).
    fn inflate(&self, i: u64, out: &mut [u8]) -> FResult<()> {
        let (a, b) = (self.offsets[i as usize], self.offsets[i as usize + 1]);
        let mut src = vec![0u8; (b - a) as usize];
        self.file
            .read_at(a, &mut src)
            .map_err(|e| FormatError::io(e, format!("{}: Could not read block {i}", self.name)))?;
        let mut z = flate2::Decompress::new(true);
        let bad = || {
            FormatError::Corrupt(format!(
                "{}: block {i} does not inflate to {} bytes",
                self.name, self.block_size
            ))
        };
        match z.decompress(&src, out, flate2::FlushDecompress::Finish) {
            Ok(flate2::Status::StreamEnd) if z.total_out() == self.block_size => Ok(()),
            _ => Err(bad()),
        }
    }
}

impl ReadOnlyMap for Cloop {
    fn size(&self) -> u64 {
        (self.offsets.len() as u64 - 1) * self.block_size
    }

    /// Every block is encoded: the run's record is the block index.
    fn map_read(&self, offset: u64, len: u64) -> FResult<Vec<Piece>> {
        let mut out = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let i = pos / self.block_size;
            let n = ((i + 1) * self.block_size).min(end) - pos;
            push_run(&mut out, pos, n, Run::Encoded(i));
            pos += n;
        }
        Ok(out)
    }

    fn read_encoded(&self, at: u64, offset: u64, buf: &mut [u8]) -> FResult<()> {
        let start = at * self.block_size;
        let inside = offset.checked_sub(start).filter(|&o| {
            o + buf.len() as u64 <= self.block_size && at < self.size() / self.block_size
        });
        let Some(o) = inside else {
            return Err(FormatError::Corrupt(format!(
                "{}: a read outside block {at}",
                self.name
            )));
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.as_ref().map(|(i, _)| *i) != Some(at) {
            let mut block = vec![0u8; self.block_size as usize];
            self.inflate(at, &mut block)?;
            *cache = Some((at, block));
        }
        let block = &cache
            .as_ref()
            .map(|(_, b)| b)
            .ok_or_else(|| FormatError::Corrupt(format!("{}: block cache empty", self.name)))?;
        buf.copy_from_slice(&block[o as usize..o as usize + buf.len()]);
        Ok(())
    }
}

/// The hostile-image harness behind the `cloop_open` fuzz target.
pub fn fuzz_open(data: &[u8]) {
    const NAME: &str = "hostile.cloop";
    let file = Arc::new(crate::storage::MemStorage::new(
        data.to_vec(),
        data.len() as u64,
    ));
    if let Some(img) = crate::error::named(NAME, Cloop::open(NAME, file.clone())) {
        crate::mapping::fuzz_read_only(&crate::mapping::ReadOnly(img), &*file, NAME);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{read_only_read, ReadOnly};
    use crate::storage::MemStorage;
    use std::io::Write;

    /// Two 1 KiB blocks: 0x11s, then 0x22s.
    fn image() -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.resize(128, 0);
        v.extend_from_slice(&1024u32.to_be_bytes());
        v.extend_from_slice(&2u32.to_be_bytes());
        let blocks: Vec<Vec<u8>> = [0x11u8, 0x22]
            .iter()
            .map(|&b| {
                let mut e =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
                e.write_all(&[b; 1024]).unwrap();
                e.finish().unwrap()
            })
            .collect();
        let mut off = 128 + 8 + 3 * 8;
        for b in std::iter::once(&Vec::new()).chain(blocks.iter()) {
            off += b.len() as u64;
            v.extend_from_slice(&off.to_be_bytes());
        }
        for b in &blocks {
            v.extend_from_slice(b);
        }
        v
    }

    #[test]
    fn blocks_inflate() {
        let f = Arc::new(MemStorage::new(image(), 1 << 20));
        let img = ReadOnly(Cloop::open("t", f.clone()).unwrap());
        assert_eq!(img.0.size(), 2048);
        let mut buf = vec![0u8; 1000];
        read_only_read(&img, "t", &*f, 600, &mut buf).unwrap();
        assert!(buf[..424].iter().all(|&b| b == 0x11));
        assert!(buf[424..].iter().all(|&b| b == 0x22));
    }

    #[test]
    fn corrupt_blocks_fail_by_name() {
        let mut v = image();
        let n = v.len();
        v[n - 5] ^= 0xff;
        let f = Arc::new(MemStorage::new(v, 1 << 20));
        let img = ReadOnly(Cloop::open("t.cloop", f.clone()).unwrap());
        let mut buf = vec![0u8; 2048];
        let e = read_only_read(&img, "t.cloop", &*f, 0, &mut buf).unwrap_err();
        assert!(e.to_string().contains("t.cloop"), "{e}");
    }
}
