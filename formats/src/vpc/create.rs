//! Creating VHD images as qemu-img does (fixed and dynamic disks of
//! 2 MiB blocks, sized to a geometry unless `force_size`), and
//! differencing disks (which qemu-img cannot make) naming their parent by
//! relative and absolute Windows-style locators and its Unicode name.

use super::dynamic::{self, DynHeader, Locator, HEADER_SIZE, UNALLOCATED};
use super::footer::{self, DiskType, Footer, FOOTER_SIZE, NO_DATA_OFFSET, VHD_EPOCH};
use crate::error::{FResult, FormatError};
use crate::storage::Storage;

/// The block size of new dynamic disks (what Virtual PC and QEMU use).
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;

/// The parent of a new differencing disk.
#[derive(Clone, Debug)]
pub struct Parent {
    /// Its footer (the child copies its identity and geometry).
    pub footer: Footer,
    /// Its virtual size as Strata reads it.
    pub size: u64,
    /// Its block size, when it is dynamic.
    pub block_size: Option<u32>,
    /// Its modification time, Unix seconds.
    pub mtime: u64,
    /// Its name relative to the child's directory.
    pub relative: String,
    /// Its absolute path.
    pub absolute: String,
}

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to a sector, then to a geometry
    /// unless `force_size`; ignored for differencing disks).
    pub size: u64,
    /// A fixed disk.
    pub fixed: bool,
    /// Keep `size` exactly, with the maximal geometry.
    pub force_size: bool,
    /// A differencing disk over this parent.
    pub parent: Option<Parent>,
    /// The new disk's UUID.
    pub uuid: [u8; 16],
    /// Creation time, Unix seconds.
    pub now: u64,
}

/// The virtual size `create` will give the image.
pub fn created_size(o: &CreateOptions) -> FResult<u64> {
    match &o.parent {
        Some(p) => Ok(p.size),
        None => Ok(footer::create_geometry(o.size, o.force_size)?.1),
    }
}

fn vhd_time(unix: u64) -> u32 {
    unix.saturating_sub(VHD_EPOCH).min(u32::MAX as u64) as u32
}

/// Write a new image into the empty `file`.
pub fn create(file: &dyn Storage, o: &CreateOptions) -> FResult<()> {
    let io = |e: std::io::Error| FormatError::io(e, "Unable to create or write VHD header");
    let (chs, size, app) = match &o.parent {
        Some(p) => {
            let f = &p.footer;
            let chs = (f.cylinders, f.heads, f.sectors);
            // Sized by geometry when that gives the parent's size (as QEMU
            // and Virtual PC read `qemu`), else by `current_size`.
            let app = if f.chs_sectors() * 512 == p.size && f.chs_sectors() != footer::MAX_GEOMETRY
            {
                *b"qemu"
            } else {
                *b"qem2"
            };
            (chs, p.size, app)
        }
        None => {
            let (chs, size) = footer::create_geometry(o.size, o.force_size)?;
            (chs, size, if o.force_size { *b"qem2" } else { *b"qemu" })
        }
    };
    let kind = match (&o.parent, o.fixed) {
        (Some(_), _) => DiskType::Differencing,
        (None, true) => DiskType::Fixed,
        (None, false) => DiskType::Dynamic,
    };
    let f = Footer {
        features: 2,
        version: 0x0001_0000,
        data_offset: if kind == DiskType::Fixed {
            NO_DATA_OFFSET
        } else {
            FOOTER_SIZE as u64
        },
        timestamp: vhd_time(o.now),
        creator_app: app,
        // Virtual PC 2007's version, as QEMU writes.
        creator_version: 0x0005_0003,
        creator_os: *b"Wi2k",
        original_size: size,
        current_size: size,
        cylinders: chs.0,
        heads: chs.1,
        sectors: chs.2,
        disk_type: kind.code(),
        checksum: 0,
        uuid: o.uuid,
        saved_state: 0,
    };
    if kind == DiskType::Fixed {
        file.set_len(size + FOOTER_SIZE as u64).map_err(io)?;
        return file.write_at(size, &f.to_bytes()).map_err(io);
    }
    let bs = o
        .parent
        .as_ref()
        .and_then(|p| p.block_size)
        .unwrap_or(DEFAULT_BLOCK_SIZE);
    let entries = (size / 512).div_ceil(bs as u64 / 512);
    let mut h = DynHeader {
        table_offset: 0,
        version: 0x0001_0000,
        max_table_entries: u32::try_from(entries)
            .map_err(|_| FormatError::Invalid("Too many blocks".into()))?,
        block_size: bs,
        parent_uuid: [0; 16],
        parent_timestamp: 0,
        parent_name: Vec::new(),
        locators: [Locator::default(); 8],
    };
    // Locators go between the header and the BAT, so that every
    // reader's "first free byte after the BAT" lies past them.
    let mut at = (FOOTER_SIZE + HEADER_SIZE) as u64;
    if let Some(p) = &o.parent {
        h.parent_uuid = p.footer.uuid;
        h.parent_timestamp = vhd_time(p.mtime);
        let base = p.absolute.rsplit('/').next().unwrap_or(&p.absolute);
        h.parent_name = base.encode_utf16().take(256).collect();
        for (slot, (code, path)) in [(dynamic::W2RU, &p.relative), (dynamic::W2KU, &p.absolute)]
            .into_iter()
            .enumerate()
        {
            let data = dynamic::locator_data(code, path);
            let space = (data.len() as u64).div_ceil(512).max(1) * 512;
            file.write_at(at, &data).map_err(io)?;
            h.locators[slot] = Locator {
                platform: code,
                space: space as u32,
                length: data.len() as u32,
                offset: at,
            };
            at += space;
        }
    }
    h.table_offset = at;
    let bat_bytes = (entries * 4).div_ceil(512) * 512;
    let bat = vec![0xffu8; bat_bytes as usize];
    debug_assert_eq!(UNALLOCATED, u32::MAX);
    file.write_at(at, &bat).map_err(io)?;
    let fb = f.to_bytes();
    file.write_at(at + bat_bytes, &fb).map_err(io)?;
    file.write_at(FOOTER_SIZE as u64, &h.to_bytes())
        .map_err(io)?;
    file.write_at(0, &fb).map_err(io)?;
    Ok(())
}
