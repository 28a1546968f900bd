//! Creating VHDX images as qemu-img does (spec 2.1's layout with QEMU's
//! placement): the header section, the log (1 MiB by default) at 1 MiB,
//! the BAT and then the metadata region, each 1 MiB aligned, then the
//! payload. Dynamic disks start with no blocks (in the ZERO state with
//! `block_state_zero`, QEMU's default, else NOT_PRESENT); fixed disks
//! have every block laid out after the metadata, or, with
//! `block_state_zero` (again QEMU's default), the space reserved but
//! the blocks in the ZERO state. Differencing disks (which qemu-img
//! cannot make) name their parent in a parent locator (spec 2.6.2.6)
//! by `parent_linkage`, `relative_path` and `absolute_win32_path`.

use super::layout::*;
use super::MAX_SIZE;
use crate::error::{FResult, FormatError};
use crate::storage::Storage;

/// The parent of a new differencing disk.
#[derive(Clone, Debug)]
pub struct Parent {
    /// Its virtual size.
    pub size: u64,
    /// Its logical sector size.
    pub logical_sector: u64,
    /// Its data-write GUID (the child's `parent_linkage`).
    pub data_write_guid: Guid,
    /// Its name relative to the child's directory.
    pub relative: String,
    /// Its absolute path.
    pub absolute: String,
}

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes (ignored for differencing disks).
    pub size: u64,
    /// Bytes per block; 0 picks QEMU's default for the size.
    pub block_size: u64,
    /// Bytes of log (a multiple of 1 MiB).
    pub log_size: u64,
    /// A fixed disk.
    pub fixed: bool,
    /// Blocks start in the ZERO state.
    pub block_state_zero: bool,
    /// A differencing disk over this parent.
    pub parent: Option<Parent>,
    /// File-write, data-write and page 83 GUIDs.
    pub guids: [Guid; 3],
    /// The creator written into the file type identifier.
    pub creator: String,
}

/// QEMU's block size for a disk of `size` bytes.
pub fn default_block_size(size: u64) -> u64 {
    if size > 32 << 40 {
        64 * MIB
    } else if size > 100 << 30 {
        32 * MIB
    } else if size > 1 << 30 {
        16 * MIB
    } else {
        8 * MIB
    }
}

/// The options checked: (block size, virtual size, log size).
pub fn validate(o: &CreateOptions) -> FResult<(u64, u64, u64)> {
    // Whole logical sectors (512 bytes for a new disk), as QEMU rounds.
    let size = o
        .parent
        .as_ref()
        .map_or(o.size.div_ceil(512).saturating_mul(512), |p| p.size);
    if size > MAX_SIZE {
        return Err(FormatError::Invalid(
            "Image size too large; max of 64TB".into(),
        ));
    }
    // QEMU rounds the log and block sizes up to whole MiB, and the
    // block size down to the largest allowed.
    let log_size = o.log_size.div_ceil(MIB).saturating_mul(MIB);
    if log_size == 0 || log_size > u32::MAX as u64 {
        return Err(FormatError::Invalid(
            "Log size must be a multiple of 1 MB".into(),
        ));
    }
    let bs = if o.block_size == 0 {
        default_block_size(size)
    } else {
        o.block_size
            .div_ceil(MIB)
            .saturating_mul(MIB)
            .min(256 * MIB)
    };
    if !bs.is_power_of_two() {
        return Err(FormatError::Invalid(
            "Block size must be a power of two".into(),
        ));
    }
    if o.fixed && o.parent.is_some() {
        return Err(FormatError::Invalid(
            "A fixed VHDX cannot have a parent".into(),
        ));
    }
    Ok((bs, size, log_size))
}

/// Write a new image into the empty `file`.
pub fn create(file: &dyn Storage, o: &CreateOptions) -> FResult<()> {
    let (bs, size, log_size) = validate(o)?;
    let io = |e: std::io::Error| FormatError::io(e, "Could not write the VHDX image");
    let lss = o.parent.as_ref().map_or(512, |p| p.logical_sector);
    let diff = o.parent.is_some();
    let chunk_ratio = SECTORS_PER_BITMAP * lss / bs;
    let blocks = size.div_ceil(bs);
    let entries = if diff {
        blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
    } else if blocks == 0 {
        0
    } else {
        blocks + (blocks - 1) / chunk_ratio
    };
    let log_offset = HEADER_SECTION;
    let bat_offset = log_offset + log_size;
    let bat_len = (entries * 8).div_ceil(MIB).max(1) * MIB;
    let meta_offset = bat_offset + bat_len;
    // QEMU leaves 4 MiB after the metadata region before the payload.
    let data_offset = meta_offset + 5 * MIB;

    // Metadata: the table, then the items from 64 KiB on.
    let mut items: Vec<(Guid, Vec<u8>, bool)> = Vec::new();
    let flags = (o.fixed as u32) | (diff as u32) << 1;
    let mut fp = (bs as u32).to_le_bytes().to_vec();
    fp.extend_from_slice(&flags.to_le_bytes());
    items.push((FILE_PARAMETERS, fp, false));
    items.push((VIRTUAL_DISK_SIZE, size.to_le_bytes().to_vec(), true));
    items.push((PAGE83_DATA, o.guids[2].to_vec(), true));
    items.push((
        LOGICAL_SECTOR_SIZE,
        (lss as u32).to_le_bytes().to_vec(),
        true,
    ));
    items.push((PHYSICAL_SECTOR_SIZE, 512u32.to_le_bytes().to_vec(), true));
    if let Some(p) = &o.parent {
        let kv = vec![
            ("parent_linkage".to_string(), guid_text(&p.data_write_guid)),
            ("relative_path".to_string(), p.relative.replace('/', "\\")),
            (
                "absolute_win32_path".to_string(),
                p.absolute.replace('/', "\\"),
            ),
        ];
        items.push((PARENT_LOCATOR, locator_to_bytes(&kv), false));
    }
    let mut meta = vec![0u8; TABLE_SIZE];
    let mut entries_md = Vec::new();
    for (g, data, virtual_disk) in &items {
        let at = meta.len();
        meta.extend_from_slice(data);
        entries_md.push(MetaEntry {
            guid: *g,
            offset: at as u32,
            length: data.len() as u32,
            virtual_disk: *virtual_disk,
            required: true,
            user: false,
        });
    }
    if meta.len() as u64 > MIB {
        return Err(FormatError::Invalid("the parent's path is too long".into()));
    }
    meta[..TABLE_SIZE].copy_from_slice(&metadata_table_to_bytes(&entries_md));

    // The BAT: fixed disks without ZERO blocks get their blocks in place.
    let mut bat = vec![0u8; (entries * 8) as usize];
    let state = if o.fixed && !o.block_state_zero {
        PAYLOAD_FULLY_PRESENT
    } else if o.block_state_zero && !diff {
        PAYLOAD_ZERO
    } else {
        PAYLOAD_NOT_PRESENT
    };
    if state != PAYLOAD_NOT_PRESENT {
        for i in 0..blocks {
            let idx = (i + i / chunk_ratio) as usize;
            let v = if state == PAYLOAD_FULLY_PRESENT {
                (data_offset + i * bs) | state
            } else {
                state
            };
            bat[idx * 8..idx * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
    }
    let end = if o.fixed {
        data_offset + size
    } else {
        data_offset
    };
    file.set_len(end).map_err(io)?;
    file.write_at(meta_offset, &meta).map_err(io)?;
    file.write_at(bat_offset, &bat).map_err(io)?;
    let regions = [
        Region {
            guid: BAT_GUID,
            offset: bat_offset,
            length: bat_len as u32,
            required: true,
        },
        Region {
            guid: METADATA_GUID,
            offset: meta_offset,
            length: MIB as u32,
            required: true,
        },
    ];
    let rt = regions_to_bytes(&regions);
    for r in REGION_OFFSETS {
        file.write_at(r, &rt).map_err(io)?;
    }
    let mut h = Header {
        sequence: 0,
        file_write_guid: o.guids[0],
        data_write_guid: o.guids[1],
        log_guid: [0; 16],
        log_version: 0,
        version: 1,
        log_length: log_size as u32,
        log_offset,
    };
    for at in HEADER_OFFSETS {
        h.sequence += 1;
        file.write_at(at, &h.to_bytes()).map_err(io)?;
    }
    let mut id = FILE_SIGNATURE.to_vec();
    id.extend(
        o.creator
            .encode_utf16()
            .take(256)
            .flat_map(|c| c.to_le_bytes()),
    );
    file.write_at(0, &id).map_err(io)?;
    Ok(())
}
