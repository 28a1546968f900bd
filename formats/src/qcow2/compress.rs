//! Compressed clusters (qcow2.rst: "Compressed Clusters Descriptor" and the
//! `compression_type` header field): raw deflate without zlib header
//! (type 0, QEMU's "zlib") and zstd (type 1).
//!
//! Decompression stops as soon as one cluster of output exists: the
//! compressed bytes are followed by whatever shares their last sector (the
//! next compressed cluster, or padding), which must not be parsed.

use crate::error::{FResult, FormatError};

/// Decompress `input` into exactly `out.len()` bytes.
pub fn decompress(ctype: u8, input: &[u8], out: &mut [u8], name: &str) -> FResult<()> {
    let bad = || FormatError::Corrupt(format!("{name}: compressed cluster does not decompress"));
    match ctype {
        0 => {
            let mut d = flate2::Decompress::new(false);
            loop {
                let (i, o) = (d.total_in() as usize, d.total_out() as usize);
                if o == out.len() {
                    return Ok(());
                }
                let st = d
                    .decompress(&input[i..], &mut out[o..], flate2::FlushDecompress::Finish)
                    .map_err(|_| bad())?;
                let progress = d.total_in() as usize != i || d.total_out() as usize != o;
                if d.total_out() as usize == out.len() {
                    return Ok(());
                }
                if st == flate2::Status::StreamEnd || !progress {
                    return Err(bad());
                }
            }
        }
        1 => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut dec = Decoder::new().map_err(|_| bad())?;
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(out);
            loop {
                let before = (inb.pos(), outb.pos());
                let r = dec.run(&mut inb, &mut outb).map_err(|_| bad())?;
                if outb.pos() == outb.capacity() {
                    return Ok(());
                }
                if r == 0 || (inb.pos(), outb.pos()) == before {
                    return Err(bad());
                }
            }
        }
        t => Err(FormatError::Unsupported(format!(
            "{name}: unknown compression type {t}"
        ))),
    }
}

/// Compress one cluster; `None` when the result would not be smaller than
/// `limit` bytes (the caller then writes the cluster uncompressed).
pub fn compress(ctype: u8, input: &[u8], limit: usize) -> Option<Vec<u8>> {
    match ctype {
        0 => {
            let mut c = flate2::Compress::new(flate2::Compression::default(), false);
            let mut out = vec![0u8; limit];
            match c.compress(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => {
                    out.truncate(c.total_out() as usize);
                    Some(out)
                }
                _ => None,
            }
        }
        1 => {
            let out = zstd::bulk::compress(input, 0).ok()?;
            (out.len() < limit).then_some(out)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_both() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        for t in [0u8, 1] {
            let mut c = compress(t, &data, data.len()).unwrap();
            c.extend_from_slice(&[0xab; 700]); // trailing bytes of the sector
            let mut out = vec![0u8; data.len()];
            decompress(t, &c, &mut out, "x").unwrap();
            assert_eq!(out, data);
            let mut out = vec![0u8; data.len()];
            assert!(decompress(t, &c[..c.len() / 3], &mut out, "x").is_err());
            assert!(decompress(t, &[0xff; 100], &mut out, "x").is_err());
        }
        let mut x = 88172645463325252u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(compress(0, &noise, noise.len() - 512).is_none());
    }
}
