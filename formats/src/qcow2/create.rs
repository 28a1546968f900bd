//! Image creation with qemu-img's `-o` options for qcow2 (`compat`,
//! `cluster_size`, `refcount_bits`, `lazy_refcounts`, `extended_l2`,
//! `compression_type`, `backing_file`, `backing_fmt`, `data_file`,
//! `data_file_raw`, `preallocation`), following qcow2.rst for the layout:
//! header in cluster 0, refcount table, one refcount block, then the L1
//! table, which is grown to the virtual size through the normal allocator.

use super::crypt::{self, CryptoExt, NewCrypt};
use super::header::{self, Header};
use super::{OpenOptions, Qcow2};
use crate::error::{FResult, FormatError};
use crate::storage::Storage;
use std::sync::Arc;

/// `preallocation=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Prealloc {
    /// Nothing.
    #[default]
    Off,
    /// L2 tables and cluster mappings.
    Metadata,
    /// Metadata plus fallocate.
    Falloc,
    /// Metadata plus zeroes written.
    Full,
}

impl Prealloc {
    /// Parse QEMU's spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "off" => Prealloc::Off,
            "metadata" => Prealloc::Metadata,
            "falloc" => Prealloc::Falloc,
            "full" => Prealloc::Full,
            _ => return None,
        })
    }
    /// QEMU's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Prealloc::Off => "off",
            Prealloc::Metadata => "metadata",
            Prealloc::Falloc => "falloc",
            Prealloc::Full => "full",
        }
    }
}

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size.
    pub size: u64,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// refcount_bits.
    pub refcount_bits: u32,
    /// lazy_refcounts.
    pub lazy_refcounts: bool,
    /// extended_l2.
    pub extended_l2: bool,
    /// 0 zlib, 1 zstd.
    pub compression_type: u8,
    /// backing_file.
    pub backing_file: Option<String>,
    /// backing_fmt.
    pub backing_format: Option<String>,
    /// data_file name (the caller creates the file itself).
    pub data_file: Option<String>,
    /// data_file_raw.
    pub data_file_raw: bool,
    /// preallocation.
    pub prealloc: Prealloc,
    /// encrypt.format (with the LUKS header already made for LUKS).
    pub crypt: Option<NewCrypt>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            version: 3,
            cluster_size: 65536,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
            data_file: None,
            data_file_raw: false,
            prealloc: Prealloc::Off,
            crypt: None,
        }
    }
}

/// Validate options as qemu-img does; returns the header to write.
pub fn validate(o: &CreateOptions) -> FResult<Header> {
    let inval = |m: &str| Err(FormatError::Invalid(m.to_string()));
    let cs = o.cluster_size;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return inval("Cluster size must be a power of two between 512 and 2048k");
    }
    if !o.refcount_bits.is_power_of_two() || o.refcount_bits > 64 {
        return inval("Refcount width must be a power of two and may not exceed 64 bits");
    }
    if o.version == 2 {
        if o.refcount_bits != 16 {
            return inval("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)");
        }
        if o.lazy_refcounts {
            return inval("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)");
        }
        if o.extended_l2 {
            return inval("Extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)");
        }
        if o.data_file.is_some() {
            return inval(
                "External data files are only supported with compatibility level 1.1 and above",
            );
        }
        if o.compression_type != 0 {
            return inval("Non-zlib compression type is only supported with compatibility level 1.1 and above (use compat=1.1 or greater)");
        }
    }
    if o.extended_l2 && cs < 16384 {
        return inval(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        );
    }
    if o.data_file_raw && o.data_file.is_none() {
        return inval("data-file-raw requires data-file");
    }
    if o.data_file_raw && o.backing_file.is_some() {
        return inval("Backing file and data-file-raw can only be used together with preallocation=off... backing files are not allowed with data-file-raw");
    }
    if o.crypt.is_some() && o.prealloc != Prealloc::Off {
        // QEMU allows it, and its preallocated clusters then read as
        // garbage: the zeroes on the host are decrypted.
        return inval("Preallocation is not supported with encryption (preallocated clusters would not read as zeroes)");
    }
    if o.crypt.is_some() && o.data_file_raw {
        return inval(
            "data-file-raw cannot be used with encryption (the data file would not be a raw image)",
        );
    }
    if o.backing_format.is_some() && o.backing_file.is_none() {
        return inval("Backing file format not supported for file format 'qcow2'");
    }
    if !o.size.is_multiple_of(512) && o.size > 0 {
        // qemu-img rounds up to a sector; callers pass the rounded size.
    }
    let mut incompat = 0;
    if o.extended_l2 {
        incompat |= header::INCOMPAT_EXTL2;
    }
    if o.data_file.is_some() {
        incompat |= header::INCOMPAT_DATA_FILE;
    }
    if o.compression_type != 0 {
        incompat |= header::INCOMPAT_COMPRESSION;
    }
    let cbits = cs.trailing_zeros();
    Ok(Header {
        version: o.version,
        cluster_bits: cbits,
        size: 0,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: incompat,
        compatible: if o.lazy_refcounts {
            header::COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear: if o.data_file_raw {
            header::AUTOCLEAR_DATA_FILE_RAW
        } else {
            0
        },
        refcount_order: o.refcount_bits.trailing_zeros(),
        compression_type: o.compression_type,
        extra_fields: Vec::new(),
        backing_file: o.backing_file.clone(),
        backing_format: o.backing_format.clone(),
        data_file: o.data_file.clone(),
        feature_table: if o.version >= 3 {
            Header::default_feature_table()
        } else {
            Vec::new()
        },
        bitmaps_ext: None,
        crypto_ext: None,
        unknown_exts: Vec::new(),
    })
}

/// Write a new image into `file` (truncated first). `data` is the
/// external data file when `data_file` is set.
pub fn create(
    name: &str,
    file: Arc<dyn Storage>,
    data: Option<Arc<dyn Storage>>,
    o: &CreateOptions,
) -> FResult<()> {
    let h = validate(o)?;
    let cs = o.cluster_size;
    let io = |e| FormatError::io(e, format!("{name}: creating the image"));
    file.set_len(0).map_err(io)?;
    let hb = h.serialize()?;
    file.write_at(0, &hb).map_err(io)?;
    let mut rt = vec![0u8; cs as usize];
    rt[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    file.write_at(cs, &rt).map_err(io)?;
    let mut rb = vec![0u8; cs as usize];
    for i in 0..3 {
        super::refcount::rb_set(&mut rb, i, h.refcount_order, 1);
    }
    file.write_at(2 * cs, &rb).map_err(io)?;
    file.flush().map_err(io)?;
    let img = Qcow2::open(
        name,
        file.clone(),
        data.clone(),
        None,
        &OpenOptions::default(),
    )?;
    match &o.crypt {
        None => {}
        Some(NewCrypt::Aes) => img.set_crypt_method(crypt::METHOD_AES, None)?,
        Some(NewCrypt::Luks(blob)) => img.set_crypt_method(crypt::METHOD_LUKS, Some(blob))?,
    }
    img.truncate(o.size)?;
    if let Some(d) = &data {
        if d.len().map_err(io)? < o.size {
            d.set_len(o.size).map_err(io)?;
        }
    }
    if o.prealloc != Prealloc::Off || o.data_file_raw {
        img.preallocate(0, o.size, o.prealloc)?;
    }
    img.close()
}

/// Write zero bytes (not a write-zeroes request, which may leave holes or
/// unwritten extents behind).
fn write_zero_data(f: &dyn Storage, off: u64, len: u64) -> std::io::Result<()> {
    let zero = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zero.len() as u64);
        f.write_at(off + done, &zero[..n as usize])?;
        done += n;
    }
    Ok(())
}

impl Qcow2 {
    /// Make a new, still empty image encrypted: record `method` and, for
    /// LUKS, store the header `blob` in clusters of its own (zero-padded to
    /// whole clusters, as QEMU does) pointed at by the extension.
    fn set_crypt_method(&self, method: u32, blob: Option<&[u8]>) -> FResult<()> {
        let mut m = self.exclusive();
        if let Some(blob) = blob {
            let cs = m.cs;
            let len = blob.len() as u64;
            let host = m.alloc_clusters(len.div_ceil(cs).max(1))?;
            let mut padded = blob.to_vec();
            padded.resize((len.div_ceil(cs).max(1) * cs) as usize, 0);
            m.file
                .write_at(host, &padded)
                .map_err(|e| m.ioe(e, "writing the encryption header"))?;
            m.h.crypto_ext = Some(
                CryptoExt {
                    offset: host,
                    length: len,
                }
                .serialize(),
            );
        }
        m.h.crypt_method = method;
        m.flush_exact()?;
        m.write_header()
    }

    /// Map every cluster of `[start, end)` (`preallocation=metadata`), and
    /// reserve or write the host space (`falloc`, `full`).
    pub fn preallocate(&self, start: u64, end: u64, mode: Prealloc) -> FResult<()> {
        if self.is_encrypted() {
            return Err(FormatError::Unsupported(format!(
                "{}: preallocation is not supported with encryption",
                self.name()
            )));
        }
        let cs = self.cluster_size();
        let mut gcl = start / cs;
        let last = end.div_ceil(cs);
        while gcl < last {
            let mut m = self.lock();
            m.ensure_l2_writable(gcl)?;
            let (l1i, _) = m.split(gcl);
            let table_end = ((l1i + 1) * m.h.l2_entries()).min(last);
            // One contiguous run per L2 table.
            let mut todo = Vec::new();
            for g in gcl..table_end {
                let (e, _) = m.get_l2(g)?;
                if e & super::OFFSET_MASK == 0 && e & super::OFLAG_COMPRESSED == 0 {
                    todo.push(g);
                }
            }
            // Extended L2: the clusters get host space but no subcluster is
            // marked allocated, as QEMU leaves them (they read as before:
            // zeroes, or the backing file).
            let bm = 0;
            if m.data.is_some() {
                for g in todo {
                    m.set_l2(g, (g * cs) | super::OFLAG_COPIED, bm)?;
                }
            } else if !todo.is_empty() {
                let host = m.alloc_clusters(todo.len() as u64)?;
                for (i, g) in todo.iter().enumerate() {
                    m.set_l2(*g, (host + i as u64 * cs) | super::OFLAG_COPIED, bm)?;
                }
                let len = todo.len() as u64 * cs;
                let f = m.file.clone();
                let r = match mode {
                    // Zeroes really written, as QEMU does: the file holds
                    // data there, not holes or unwritten extents.
                    Prealloc::Full => write_zero_data(&*f, host, len),
                    // Host space reserved without writing.
                    Prealloc::Falloc => f.allocate(host, len),
                    _ => {
                        // Make the file cover the clusters so that reads
                        // of preallocated clusters stay inside it.
                        let cur = f.len().unwrap_or(0);
                        if cur < host + len {
                            f.set_len(host + len)
                        } else {
                            Ok(())
                        }
                    }
                };
                r.map_err(|e| m.ioe(e, "preallocating"))?;
            }
            drop(m);
            gcl = table_end;
        }
        self.flush()
    }
}

/// Refcount table and block bytes covering `clusters` clusters and
/// themselves (`order`: log2 of the refcount width in bits).
fn refcount_meta(clusters: u64, cs: u64, order: u32) -> u64 {
    let per_block = (cs * 8) >> order;
    let per_table_cluster = cs / 8;
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let nb = (clusters + blocks + table).div_ceil(per_block);
        let nt = nb.div_ceil(per_table_cluster);
        if (nb, nt) == (blocks, table) {
            return (blocks + table) * cs;
        }
        (blocks, table) = (nb, nt);
    }
}

/// File size of a fully allocated image of `size` bytes (what `qemu-img
/// measure` calls fully allocated): one header cluster, the L2 and L1
/// tables for the whole disk, the refcount table and blocks covering all
/// of it, and the data.
pub fn full_size(size: u64, cs: u64, refcount_order: u32, extended_l2: bool) -> u64 {
    let data = size.div_ceil(cs) * cs;
    let l2e = if extended_l2 { 16 } else { 8 };
    let mut meta = cs; // header
    let l2_entries = (data / cs).div_ceil(cs / l2e) * (cs / l2e);
    meta += l2_entries * l2e;
    let l1_entries = (l2_entries * l2e / cs).div_ceil(cs / 8) * (cs / 8);
    meta += l1_entries * 8;
    meta += refcount_meta((meta + data) / cs, cs, refcount_order);
    meta + data
}
