//! The PC physical memory map (`pc`; `q35` differs in where low RAM ends): RAM below the 32-bit PCI hole, RAM above
//! 4 GiB, and the BIOS ROM just below 4 GiB with its top 128 KiB shadowed in
//! RAM at 0xe0000-0xfffff (as the i440FX PAM registers would expose it).

use std::path::Path;

use devices::GuestMem;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

pub const GIB: u64 = 1 << 30;
pub const FOUR_GIB: u64 = 4 * GIB;
/// QEMU's `pc` keeps RAM below 3 GiB when it would otherwise cross 3.5 GiB
/// ("gigabyte alignment"), leaving the rest for the PCI hole.
pub const LOWMEM_LIMIT: u64 = 0xe000_0000;
pub const LOWMEM_ALIGNED: u64 = 0xc000_0000;
/// `q35` keeps RAM below the ECAM window at 0xb0000000, and below 2 GiB
/// when it would reach it (QEMU's pc_q35_init).
pub const Q35_LOWMEM_LIMIT: u64 = 0xb000_0000;
pub const Q35_LOWMEM_ALIGNED: u64 = 0x8000_0000;
/// The isa-bios window below 1 MiB.
pub const ISA_BIOS_MAX: u64 = 128 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub below_4g: u64,
    pub above_4g: u64,
}

impl Layout {
    pub fn new(mem_size: u64) -> Self {
        let below_4g = if mem_size >= LOWMEM_LIMIT {
            LOWMEM_ALIGNED
        } else {
            mem_size
        };
        Layout {
            below_4g,
            above_4g: mem_size - below_4g,
        }
    }

    /// QEMU's `q35`: RAM below 4 GiB ends at the ECAM window
    /// (0xb0000000), or at 2 GiB when more would not fit below it.
    pub fn q35(mem_size: u64) -> Self {
        let below_4g = if mem_size >= Q35_LOWMEM_LIMIT {
            Q35_LOWMEM_ALIGNED
        } else {
            mem_size
        };
        Layout {
            below_4g,
            above_4g: mem_size - below_4g,
        }
    }

    pub fn ranges(&self) -> Vec<(GuestAddress, usize)> {
        let mut r = vec![(GuestAddress(0), self.below_4g as usize)];
        if self.above_4g > 0 {
            r.push((GuestAddress(FOUR_GIB), self.above_4g as usize));
        }
        r
    }

    /// The `etc/e820` fw_cfg file: 20-byte little-endian entries
    /// (address, length, type 1 = RAM).
    pub fn e820_file(&self) -> Vec<u8> {
        let mut v = Vec::new();
        for (addr, len) in self.ranges() {
            v.extend_from_slice(&addr.0.to_le_bytes());
            v.extend_from_slice(&(len as u64).to_le_bytes());
            v.extend_from_slice(&1u32.to_le_bytes());
        }
        v
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("-m {size}: cannot allocate guest memory: {source}")]
    Ram {
        size: String,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("memory-backend-memfd of {size}: cannot allocate shared guest memory: {msg}")]
    Shared { size: String, msg: String },
    #[error("-bios {path}: {msg}")]
    Bios { path: String, msg: String },
}

pub fn allocate_ram(layout: &Layout) -> Result<GuestMem, MemoryError> {
    allocate(layout, false)
}

/// Guest RAM another process can map (`-object memory-backend-memfd,
/// share=on` as `-machine memory-backend=`): every range is a shared
/// mapping of one memfd, at its offset in the file, so that a vhost-user
/// back end given the descriptor and offsets sees the same bytes.
pub fn allocate_shared_ram(layout: &Layout) -> Result<GuestMem, MemoryError> {
    allocate(layout, true)
}

fn allocate(layout: &Layout, shared: bool) -> Result<GuestMem, MemoryError> {
    let size = format!("{}M", (layout.below_4g + layout.above_4g) >> 20);
    let ranges = layout.ranges();
    let mem = if shared {
        let fail = |e: String| MemoryError::Shared {
            size: size.clone(),
            msg: e,
        };
        let fd =
            nix::sys::memfd::memfd_create(c"strata-ram", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .map_err(|e| fail(e.to_string()))?;
        let file = std::sync::Arc::new(std::fs::File::from(fd));
        let total: u64 = ranges.iter().map(|r| r.1 as u64).sum();
        file.set_len(total).map_err(|e| fail(e.to_string()))?;
        let mut off = 0u64;
        let with_files: Vec<_> = ranges
            .iter()
            .map(|&(a, len)| {
                let r = (
                    a,
                    len,
                    Some(vm_memory::FileOffset::from_arc(file.clone(), off)),
                );
                off += len as u64;
                r
            })
            .collect();
        GuestMem::from_ranges_with_files(&with_files)
    } else {
        GuestMem::from_ranges(&ranges)
    }
    .map_err(|source| MemoryError::Ram { size, source })?;
    // Transparent huge pages for guest RAM, as QEMU asks for its RAM
    // blocks: fewer TLB and shadow-paging misses, and a device's O_DIRECT
    // I/O into guest memory pins and maps a few huge pages instead of one
    // page per 4 KiB (64 KiB sequential reads ran at 0.6x QEMU without
    // it). Only a hint: hosts with THP off ignore it.
    for r in mem.iter() {
        if let Ok(p) = r.get_host_address(MemoryRegionAddress(0)) {
            // SAFETY: madvise only changes how the kernel backs this
            // mapping, which `mem` owns; it never changes its contents.
            unsafe { libc::madvise(p.cast(), r.len() as usize, libc::MADV_HUGEPAGE) };
        }
    }
    Ok(mem)
}

/// Loads the BIOS image file; see [`map_bios`].
pub fn load_bios(path: &Path, ram: &GuestMem) -> Result<GuestMem, MemoryError> {
    let image = std::fs::read(path).map_err(|e| MemoryError::Bios {
        path: path.display().to_string(),
        msg: e.to_string(),
    })?;
    map_bios(&image, ram).map_err(|msg| MemoryError::Bios {
        path: path.display().to_string(),
        msg,
    })
}

/// Returns the ROM holding `image` (mapped so that it ends at 4 GiB) and
/// copies its top 128 KiB into RAM below 1 MiB.
pub fn map_bios(image: &[u8], ram: &GuestMem) -> Result<GuestMem, String> {
    let size = image.len() as u64;
    if size == 0 || !size.is_multiple_of(65536) || size > 16 << 20 {
        return Err(format!(
            "not a BIOS image: size {size} is not a non-zero multiple of 64 KiB up to 16 MiB"
        ));
    }
    let rom = GuestMem::from_ranges(&[(GuestAddress(FOUR_GIB - size), size as usize)])
        .map_err(|e| e.to_string())?;
    rom.write_slice(image, GuestAddress(FOUR_GIB - size))
        .map_err(|e| e.to_string())?;
    let shadow = size.min(ISA_BIOS_MAX);
    ram.write_slice(
        &image[(size - shadow) as usize..],
        GuestAddress(0x10_0000 - shadow),
    )
    .map_err(|e| format!("cannot shadow below 1 MiB: {e}"))?;
    Ok(rom)
}

/// The ROM of a machine that boots without firmware: one page of `hlt`
/// at the top of 4 GiB, so that nothing runs if a vCPU ever reaches the
/// reset vector.
pub fn halt_rom() -> Result<GuestMem, MemoryError> {
    let err = |e: String| MemoryError::Bios {
        path: "(none: direct kernel boot)".into(),
        msg: e,
    };
    let rom = GuestMem::from_ranges(&[(GuestAddress(FOUR_GIB - 4096), 4096)])
        .map_err(|e| err(e.to_string()))?;
    rom.write_slice(&[0xf4; 4096], GuestAddress(FOUR_GIB - 4096))
        .map_err(|e| err(e.to_string()))?;
    Ok(rom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        assert_eq!(
            Layout::new(512 << 20),
            Layout {
                below_4g: 512 << 20,
                above_4g: 0
            }
        );
        let l = Layout::new(6 * GIB);
        assert_eq!(l.below_4g, 3 * GIB);
        assert_eq!(l.above_4g, 3 * GIB);
        let e = l.e820_file();
        assert_eq!(e.len(), 40);
        assert_eq!(&e[20..28], &FOUR_GIB.to_le_bytes());
        assert_eq!(Layout::new(0xdfff_0000).above_4g, 0);
    }
}
