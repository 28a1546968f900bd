//! Creating VMDK images as qemu-img does: the subformats
//! monolithicSparse, monolithicFlat, twoGbMaxExtentSparse,
//! twoGbMaxExtentFlat and streamOptimized; sparse extents of 64 KiB
//! grains and 512-entry grain tables, all tables preallocated after a
//! redundant and a primary grain directory ("Hosted Sparse Extent
//! Header" of the VMware spec); the descriptor of qemu-img's template
//! ("The Descriptor File"), embedded at sector 1 of a monolithic sparse
//! file or alone in its own file.

use super::descriptor::NewDescriptor;
use super::header::{self, SparseHeader};
use crate::error::{FResult, FormatError};
use crate::storage::Storage;

/// How an image is split into files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subformat {
    /// One sparse file with the descriptor inside (the default).
    MonolithicSparse,
    /// A descriptor and one flat extent.
    MonolithicFlat,
    /// A descriptor and sparse extents of at most 2 GiB.
    TwoGbMaxExtentSparse,
    /// A descriptor and flat extents of at most 2 GiB.
    TwoGbMaxExtentFlat,
    /// One sparse file of compressed grains.
    StreamOptimized,
}

impl Subformat {
    /// Parse qemu-img's name.
    pub fn parse(s: &str) -> Option<Subformat> {
        Some(match s {
            "monolithicSparse" => Subformat::MonolithicSparse,
            "monolithicFlat" => Subformat::MonolithicFlat,
            "twoGbMaxExtentSparse" => Subformat::TwoGbMaxExtentSparse,
            "twoGbMaxExtentFlat" => Subformat::TwoGbMaxExtentFlat,
            "streamOptimized" => Subformat::StreamOptimized,
            _ => return None,
        })
    }
    /// The `createType`.
    pub fn name(self) -> &'static str {
        match self {
            Subformat::MonolithicSparse => "monolithicSparse",
            Subformat::MonolithicFlat => "monolithicFlat",
            Subformat::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            Subformat::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
            Subformat::StreamOptimized => "streamOptimized",
        }
    }
    /// Extents hold raw bytes.
    pub fn flat(self) -> bool {
        matches!(
            self,
            Subformat::MonolithicFlat | Subformat::TwoGbMaxExtentFlat
        )
    }
    /// Extents of at most 2 GiB.
    pub fn split(self) -> bool {
        matches!(
            self,
            Subformat::TwoGbMaxExtentFlat | Subformat::TwoGbMaxExtentSparse
        )
    }
}

/// The size of each extent of a split image.
pub const SPLIT_SIZE: u64 = 0x8000_0000;
/// Grain sectors of new sparse extents.
pub const GRANULARITY: u64 = 128;
/// GTEs per grain table of new sparse extents.
pub const GTES: u32 = 512;

/// The adapter types qemu-img knows.
pub const ADAPTER_TYPES: &[&str] = &["ide", "buslogic", "lsilogic", "legacyESX"];

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size (rounded up to a sector).
    pub size: u64,
    /// The subformat.
    pub subformat: Subformat,
    /// `ddb.adapterType`.
    pub adapter_type: String,
    /// `ddb.virtualHWVersion` (None: "4", or "6" with `compat6`).
    pub hw_version: Option<String>,
    /// VMDK version 6.
    pub compat6: bool,
    /// `ddb.toolsVersion` (None: "2147483647").
    pub tools_version: Option<String>,
    /// Zeroed-grain GTEs.
    pub zeroed_grain: bool,
    /// The parent: (name as given, its CID).
    pub parent: Option<(String, u32)>,
    /// The new image's CID.
    pub cid: u32,
}

/// Check `o` as qemu-img does before anything is created.
pub fn validate(o: &CreateOptions) -> FResult<()> {
    let bad = |m: &str| Err(FormatError::Invalid(m.to_string()));
    if o.compat6 && o.hw_version.is_some() {
        return bad("compat6 cannot be enabled with hwversion set");
    }
    if !ADAPTER_TYPES.contains(&o.adapter_type.as_str()) {
        return Err(FormatError::Invalid(format!(
            "invalid parameter value: {}",
            o.adapter_type
        )));
    }
    if o.subformat.flat() && o.parent.is_some() {
        return Err(FormatError::Unsupported(
            "Flat image can't have backing file".into(),
        ));
    }
    if o.subformat.flat() && o.zeroed_grain {
        return Err(FormatError::Unsupported(
            "Flat image can't enable zeroed grain".into(),
        ));
    }
    Ok(())
}

/// The extent files of an image whose descriptor file is `base`
/// (a file name, no directory): (file name, bytes), qemu-img's names
/// (`x-flat.vmdk`, `x-s001.vmdk`, `x-f001.vmdk`, ...). Empty for the
/// monolithic sparse subformats, whose descriptor file is the extent.
pub fn extent_files(base: &str, o: &CreateOptions) -> Vec<(String, u64)> {
    let size = o.size.div_ceil(512) * 512;
    let (prefix, postfix) = match base.rfind('.') {
        Some(i) => (&base[..i], &base[i..]),
        None => (base, ""),
    };
    let f = o.subformat;
    if !f.split() && !f.flat() {
        return Vec::new();
    }
    if !f.split() {
        return vec![(format!("{prefix}-flat{postfix}"), size)];
    }
    let mut out = Vec::new();
    let mut done = 0;
    let mut idx = 1;
    while done < size {
        let n = (size - done).min(SPLIT_SIZE);
        let c = if f.flat() { 'f' } else { 's' };
        out.push((format!("{prefix}-{c}{idx:03}{postfix}"), n));
        done += n;
        idx += 1;
    }
    out
}

/// The descriptor text for `o` with extents `files` (see
/// [`extent_files`]), or the one extent `base` of a monolithic sparse
/// file.
pub fn descriptor_text(base: &str, o: &CreateOptions, files: &[(String, u64)]) -> String {
    let size = o.size.div_ceil(512) * 512;
    let mut lines = String::new();
    if files.is_empty() {
        lines.push_str(&format!("RW {} SPARSE \"{base}\"\n", size / 512));
    }
    for (name, n) in files {
        if o.subformat.flat() {
            lines.push_str(&format!("RW {} FLAT \"{name}\" 0\n", n / 512));
        } else {
            lines.push_str(&format!("RW {} SPARSE \"{name}\"\n", n / 512));
        }
    }
    let heads = if o.adapter_type == "ide" { 16 } else { 255 };
    NewDescriptor {
        cid: o.cid,
        parent_cid: o.parent.as_ref().map_or(u32::MAX, |p| p.1),
        create_type: o.subformat.name().into(),
        parent_hint: o.parent.as_ref().map(|p| p.0.clone()),
        extents: lines,
        hw_version: match (&o.hw_version, o.compat6) {
            (Some(v), _) => v.clone(),
            (None, true) => "6".into(),
            (None, false) => "4".into(),
        },
        cylinders: size / (63 * heads as u64 * 512),
        heads,
        adapter_type: o.adapter_type.clone(),
        tools_version: o
            .tools_version
            .clone()
            .unwrap_or_else(|| "2147483647".into()),
    }
    .render()
}

/// Lay out an empty sparse extent of `size` bytes in `file`.
pub fn init_sparse(file: &dyn Storage, size: u64, compress: bool, zeroed: bool) -> FResult<()> {
    let io = |e: std::io::Error| FormatError::io(e, "Could not write the extent");
    let capacity = size / 512;
    let grains = capacity.div_ceil(GRANULARITY);
    let gt_sectors = (GTES as u64 * 4).div_ceil(512);
    let gt_count = grains.div_ceil(GTES as u64);
    let gd_sectors = (gt_count * 4).div_ceil(512);
    let rgd_offset = 21;
    let gd_offset = rgd_offset + gd_sectors + gt_sectors * gt_count;
    let grain_offset =
        (gd_offset + gd_sectors + gt_sectors * gt_count).div_ceil(GRANULARITY) * GRANULARITY;
    if gd_offset + gd_sectors + gt_sectors * gt_count > u32::MAX as u64 {
        return Err(FormatError::Invalid(
            "the image is too large for a VMDK".into(),
        ));
    }
    let h = SparseHeader {
        version: if compress {
            3
        } else if zeroed {
            2
        } else {
            1
        },
        flags: header::FLAG_RGD
            | header::FLAG_NL_DETECT
            | if compress {
                header::FLAG_COMPRESS | header::FLAG_MARKER
            } else {
                0
            }
            | if zeroed { header::FLAG_ZERO_GRAIN } else { 0 },
        capacity,
        granularity: GRANULARITY,
        desc_offset: 1,
        desc_size: 20,
        num_gtes_per_gt: GTES,
        rgd_offset,
        gd_offset,
        grain_offset,
        check_bytes: header::CHECK_BYTES,
        compress_algorithm: if compress {
            header::COMPRESSION_DEFLATE
        } else {
            0
        },
    };
    file.set_len(grain_offset * 512).map_err(io)?;
    file.write_at(0, &h.to_bytes()).map_err(io)?;
    for (dir, tables) in [
        (rgd_offset, rgd_offset + gd_sectors),
        (gd_offset, gd_offset + gd_sectors),
    ] {
        let mut b = vec![0u8; (gd_sectors * 512) as usize];
        for i in 0..gt_count {
            let v = (tables + i * gt_sectors) as u32;
            b[(i * 4) as usize..(i * 4 + 4) as usize].copy_from_slice(&v.to_le_bytes());
        }
        file.write_at(dir * 512, &b).map_err(io)?;
    }
    Ok(())
}

/// Write the descriptor of a monolithic sparse file at sector 1.
pub fn embed_descriptor(file: &dyn Storage, text: &str) -> FResult<()> {
    if text.len() > 20 * 512 {
        return Err(FormatError::Invalid(
            "the descriptor does not fit its 20 sectors".into(),
        ));
    }
    file.write_at(512, text.as_bytes())
        .map_err(|e| FormatError::io(e, "Could not write description"))
}

/// Write a separate descriptor file.
pub fn write_descriptor(file: &dyn Storage, text: &str) -> FResult<()> {
    file.write_at(0, text.as_bytes())
        .and_then(|()| file.set_len(text.len() as u64))
        .map_err(|e| FormatError::io(e, "Could not write description"))
}
