//! The qcow2 header and its extensions (qcow2.rst: "Header", "Additional
//! fields", "Header padding", "Header extensions", "String header
//! extensions", "Feature name table", "Bitmaps extension").
//!
//! Parsing validates every field against the limits QEMU enforces, so that
//! no later code has to trust the header: cluster_bits 9..=21, tables
//! aligned and of bounded size, known incompatible bits only. Unknown
//! header extensions and unknown trailing header fields are kept verbatim
//! and written back, as the spec asks.

use crate::error::{FResult, FormatError};

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// The image may be corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// External data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// compression_type is non-zero.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit this implementation knows.
pub const INCOMPAT_KNOWN: u64 = 0x1f;
/// Compatible: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear: bitmaps extension consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear: external data file is a consistent raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
/// Autoclear bits this implementation keeps up to date.
pub const AUTOCLEAR_KNOWN: u64 = 0x3;

/// Header extension types.
pub const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// QEMU's limits (block/qcow2.h): L1 at most 32 MiB, refcount table at most
/// 8 MiB, 65536 snapshots, backing file name at most 1023 bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Most snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Largest virtual size QEMU accepts (QCOW_MAX_... : 2^63 - 1 rounded to 512).
pub const MAX_VIRTUAL_SIZE: u64 = (1 << 63) - 512;

/// The parsed header with its extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Active L1 entries.
    pub l1_size: u32,
    /// Active L1 offset.
    pub l1_table_offset: u64,
    /// Refcount table offset.
    pub refcount_table_offset: u64,
    /// Refcount table length in clusters.
    pub refcount_table_clusters: u32,
    /// Snapshot count.
    pub nb_snapshots: u32,
    /// Snapshot table offset.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of refcount_bits.
    pub refcount_order: u32,
    /// 0 deflate, 1 zstd.
    pub compression_type: u8,
    /// Header bytes after the fields we know (v3, header_length > 112): kept.
    pub extra_fields: Vec<u8>,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing file format (extension).
    pub backing_format: Option<String>,
    /// External data file name (extension).
    pub data_file: Option<String>,
    /// Feature name table entries (type, bit, name).
    pub feature_table: Vec<(u8, u8, String)>,
    /// Bitmaps extension, raw (kept, listed by `info`).
    pub bitmaps_ext: Option<Vec<u8>>,
    /// Encryption header pointer, raw.
    pub crypto_ext: Option<Vec<u8>>,
    /// Unknown extensions, in order.
    pub unknown_exts: Vec<(u32, Vec<u8>)>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

/// Names of the incompatible bits we know, for messages.
pub fn incompat_name(bit: u32) -> Option<&'static str> {
    Some(match bit {
        0 => "dirty bit",
        1 => "corrupt bit",
        2 => "external data file",
        3 => "compression type",
        4 => "extended L2 entries",
        _ => return None,
    })
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// refcount_bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    /// Extended L2 entries in use.
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }
    /// Header length as written (72 for v2).
    pub fn header_length(&self) -> usize {
        if self.version == 2 {
            72
        } else {
            112 + self.extra_fields.len()
        }
    }
    /// L2 entries per table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2() { 16 } else { 8 }
    }
    /// L1 entries needed for `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let per = self.l2_entries() << self.cluster_bits;
        size.div_ceil(per)
    }

    /// Parse the first cluster (`buf` holds at least the first 512 bytes,
    /// ideally the whole first cluster). `name` names the file in errors.
    pub fn parse(buf: &[u8], name: &str) -> FResult<Header> {
        let bad = |m: &str| FormatError::Corrupt(format!("{name}: {m}"));
        if buf.len() < 72 || be32(buf, 0) != MAGIC {
            return Err(FormatError::Invalid(format!(
                "{name}: Image is not in qcow2 format"
            )));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(FormatError::Unsupported(format!(
                "{name}: Unsupported qcow2 version {version}"
            )));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad(&format!("Unsupported cluster size: 2^{cluster_bits}")));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            compression_type: 0,
            extra_fields: Vec::new(),
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_table: Vec::new(),
            bitmaps_ext: None,
            crypto_ext: None,
            unknown_exts: Vec::new(),
        };
        let backing_file_offset = be64(buf, 8);
        let backing_file_size = be32(buf, 16);
        let mut hlen = 72usize;
        if version == 3 {
            if buf.len() < 104 {
                return Err(bad("qcow2 header too short"));
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            hlen = be32(buf, 100) as usize;
            if hlen < 104 || !hlen.is_multiple_of(8) && hlen != 104 {
                return Err(bad("qcow2 header length invalid"));
            }
            if hlen as u64 > cs || hlen > buf.len() {
                return Err(bad("qcow2 header exceeds cluster size"));
            }
            if hlen > 104 {
                h.compression_type = buf[104];
            }
            if hlen > 112 {
                h.extra_fields = buf[112..hlen].to_vec();
            }
        }
        if h.refcount_order > 6 {
            return Err(bad(
                "Reference count entry width too large; may not exceed 64 bits",
            ));
        }
        let unknown = h.incompatible & !INCOMPAT_KNOWN;
        // Feature names come from the extension table, parsed below; the
        // check waits for it so the message can name the feature.
        if h.crypt_method > 2 {
            return Err(bad(&format!(
                "Unsupported encryption method: {}",
                h.crypt_method
            )));
        }
        match h.compression_type {
            0 if h.incompatible & INCOMPAT_COMPRESSION != 0 => {
                return Err(bad("Compression type incompatible feature bit must not be set for the deflate (zlib) compression type"));
            }
            0 => {}
            1 if h.incompatible & INCOMPAT_COMPRESSION == 0 => {
                return Err(bad("Compression type incompatible feature bit must be set for a non-deflate compression type"));
            }
            1 => {}
            t => return Err(bad(&format!("unknown compression type {t}"))),
        }
        if h.size > MAX_VIRTUAL_SIZE {
            return Err(bad("Image too large"));
        }
        // Tables: aligned, bounded, and not the header cluster.
        let aligned = |o: u64| o.is_multiple_of(cs);
        if h.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(bad("Active L1 table too large"));
        }
        if h.l1_size > 0 && (!aligned(h.l1_table_offset) || h.l1_table_offset == 0) {
            return Err(bad("Invalid L1 table offset"));
        }
        if (h.l1_size as u64) < h.l1_entries_for(h.size) {
            return Err(bad("L1 table is too small"));
        }
        if h.refcount_table_clusters as u64 * cs > MAX_REFTABLE_BYTES
            || h.refcount_table_clusters == 0
        {
            return Err(bad("Reference count table too large"));
        }
        if !aligned(h.refcount_table_offset) || h.refcount_table_offset == 0 {
            return Err(bad("Invalid reference count table offset"));
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(bad("Too many snapshots"));
        }
        if h.nb_snapshots > 0 && (!aligned(h.snapshots_offset) || h.snapshots_offset == 0) {
            return Err(bad("Invalid snapshot table offset"));
        }
        // Backing file name.
        let cluster = &buf[..buf.len().min(cs as usize)];
        let mut ext_end = cluster.len();
        if backing_file_offset != 0 {
            if backing_file_size > MAX_BACKING_NAME
                || backing_file_offset
                    .checked_add(backing_file_size as u64)
                    .is_none_or(|e| e > cluster.len() as u64)
            {
                return Err(bad("Backing file name too long"));
            }
            let o = backing_file_offset as usize;
            let s = &cluster[o..o + backing_file_size as usize];
            h.backing_file = Some(String::from_utf8_lossy(s).into_owned());
            if o >= hlen {
                ext_end = o;
            }
        }
        // Extensions.
        let mut off = hlen;
        let mut seen_end = false;
        while off + 8 <= ext_end {
            let ty = be32(cluster, off);
            let len = be32(cluster, off + 4) as usize;
            off += 8;
            if ty == EXT_END {
                seen_end = true;
                break;
            }
            if len > ext_end - off {
                return Err(bad(&format!("Header extension 0x{ty:x} too large")));
            }
            let data = cluster[off..off + len].to_vec();
            let text = || String::from_utf8_lossy(&data).into_owned();
            match ty {
                EXT_BACKING_FORMAT => h.backing_format = Some(text()),
                EXT_DATA_FILE => h.data_file = Some(text()),
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let n = e[2..].iter().position(|&c| c == 0).unwrap_or(46);
                        h.feature_table.push((
                            e[0],
                            e[1],
                            String::from_utf8_lossy(&e[2..2 + n]).into_owned(),
                        ));
                    }
                }
                EXT_BITMAPS => h.bitmaps_ext = Some(data),
                EXT_CRYPTO => h.crypto_ext = Some(data),
                _ => h.unknown_exts.push((ty, data)),
            }
            off += len.div_ceil(8) * 8;
        }
        let _ = seen_end;
        if unknown != 0 {
            let mut names = Vec::new();
            for bit in 0..64 {
                if unknown & (1 << bit) == 0 {
                    continue;
                }
                match h
                    .feature_table
                    .iter()
                    .find(|(t, b, _)| *t == 0 && *b as u32 == bit)
                {
                    Some((_, _, n)) => names.push(n.clone()),
                    None => names.push(format!("Unknown incompatible feature: {bit:x}")),
                }
            }
            return Err(FormatError::Unsupported(format!(
                "{name}: Unsupported qcow2 feature(s): {}",
                names.join(", ")
            )));
        }
        if h.incompatible & INCOMPAT_DATA_FILE == 0 && h.data_file.is_some() {
            // QEMU ignores the name without the bit; so do we.
            h.data_file = None;
        }
        if h.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0 && h.incompatible & INCOMPAT_DATA_FILE == 0 {
            return Err(bad("data-file-raw requires a data file"));
        }
        Ok(h)
    }

    /// The header cluster as it should be written.
    pub fn serialize(&self) -> FResult<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; cs];
        let put32 =
            |b: &mut Vec<u8>, o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut Vec<u8>, o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        let hlen = self.header_length();
        if self.version == 3 {
            put64(&mut b, 72, self.incompatible);
            put64(&mut b, 80, self.compatible);
            put64(&mut b, 88, self.autoclear);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, hlen as u32);
            b[104] = self.compression_type;
            b[112..hlen].copy_from_slice(&self.extra_fields);
        }
        let mut off = hlen;
        let mut ext = |b: &mut Vec<u8>, ty: u32, data: &[u8]| -> FResult<()> {
            let need = 8 + data.len().div_ceil(8) * 8;
            if off + need + 8 > cs {
                return Err(FormatError::Invalid(
                    "qcow2 header extensions do not fit in the first cluster".into(),
                ));
            }
            put32(b, off, ty);
            put32(b, off + 4, data.len() as u32);
            b[off + 8..off + 8 + data.len()].copy_from_slice(data);
            off += need;
            Ok(())
        };
        if let Some(f) = &self.backing_format {
            ext(&mut b, EXT_BACKING_FORMAT, f.as_bytes())?;
        }
        if let Some(d) = &self.data_file {
            ext(&mut b, EXT_DATA_FILE, d.as_bytes())?;
        }
        if let Some(c) = &self.crypto_ext {
            ext(&mut b, EXT_CRYPTO, c)?;
        }
        if !self.feature_table.is_empty() && self.version == 3 {
            let mut t = Vec::new();
            for (ty, bit, n) in &self.feature_table {
                let mut e = [0u8; 48];
                e[0] = *ty;
                e[1] = *bit;
                let nb = n.as_bytes();
                let l = nb.len().min(46);
                e[2..2 + l].copy_from_slice(&nb[..l]);
                t.extend_from_slice(&e);
            }
            ext(&mut b, EXT_FEATURE_TABLE, &t)?;
        }
        if let Some(bm) = &self.bitmaps_ext {
            ext(&mut b, EXT_BITMAPS, bm)?;
        }
        for (ty, d) in &self.unknown_exts {
            ext(&mut b, *ty, d)?;
        }
        // End marker (already zero), then the backing file name.
        off += 8;
        if let Some(bf) = &self.backing_file {
            let nb = bf.as_bytes();
            if nb.len() > MAX_BACKING_NAME as usize || off + nb.len() > cs {
                return Err(FormatError::Invalid(format!(
                    "Backing file name '{bf}' is too long"
                )));
            }
            put64(&mut b, 8, off as u64);
            put32(&mut b, 16, nb.len() as u32);
            b[off..off + nb.len()].copy_from_slice(nb);
        }
        Ok(b)
    }

    /// QEMU's standard feature name table.
    pub fn default_feature_table() -> Vec<(u8, u8, String)> {
        vec![
            (0, 0, "dirty bit".into()),
            (0, 1, "corrupt bit".into()),
            (0, 2, "external data file".into()),
            (0, 3, "compression type".into()),
            (0, 4, "extended L2 entries".into()),
            (1, 0, "lazy refcounts".into()),
            (2, 0, "bitmaps".into()),
            (2, 1, "raw external data".into()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            compression_type: 0,
            extra_fields: Vec::new(),
            backing_file: Some("base.img".into()),
            backing_format: Some("raw".into()),
            data_file: None,
            feature_table: Header::default_feature_table(),
            bitmaps_ext: None,
            crypto_ext: None,
            unknown_exts: vec![(0x1234_5678, vec![1, 2, 3])],
        }
    }

    #[test]
    fn roundtrip() {
        let h = sample();
        let b = h.serialize().unwrap();
        assert_eq!(Header::parse(&b, "x").unwrap(), h);
        let mut v2 = h.clone();
        v2.version = 2;
        v2.feature_table.clear();
        let b = v2.serialize().unwrap();
        assert_eq!(Header::parse(&b, "x").unwrap(), v2);
    }

    #[test]
    fn refuses_unknown_incompatible() {
        let mut h = sample();
        h.incompatible = 1 << 20;
        let b = h.serialize().unwrap();
        let e = Header::parse(&b, "img").unwrap_err().to_string();
        assert!(
            e.contains("img") && e.contains("Unsupported qcow2 feature"),
            "{e}"
        );
        h.feature_table.push((0, 20, "frobnication".into()));
        let b = h.serialize().unwrap();
        let e = Header::parse(&b, "img").unwrap_err().to_string();
        assert!(e.contains("frobnication"), "{e}");
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 7;
        for _ in 0..2000 {
            let mut b = sample().serialize().unwrap();
            for _ in 0..8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x % 512) as usize;
                b[i] = (x >> 32) as u8;
            }
            let _ = Header::parse(&b, "f");
            let _ = Header::parse(&b[..(x % 600) as usize], "f");
        }
    }
}
