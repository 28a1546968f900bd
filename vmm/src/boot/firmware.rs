//! `-kernel` through the firmware (an explicit `-bios`, or `-boot
//! menu=on`): the VMM loads nothing into guest RAM. It hands the kernel,
//! initrd and command line to the firmware in fw_cfg items, as QEMU's
//! docs/specs/fw_cfg.rst lists them (selectors 0x07-0x18), and adds an
//! option ROM as fw_cfg file `genroms/NAME`. SeaBIOS runs every
//! `genroms/*` ROM; the ROM registers a boot entry (listed first in
//! `bootorder`, as `/rom@genroms/NAME`), which copies the items into RAM
//! over fw_cfg DMA and starts the kernel.
//!
//! The ROMs are Debian's builds of QEMU's (package `qemu-system-data`):
//! - `linuxboot_dma.bin` for a bzImage (Linux boot protocol 2.02+,
//!   Documentation/arch/x86/boot.rst): it loads the real-mode setup at
//!   SETUP_ADDR and enters it in real mode at setup segment + 0x20, as a
//!   boot sector loader would. The setup header is the kernel's, with the
//!   fields a boot loader fills ("type_of_loader", "cmd_line_ptr",
//!   "ramdisk_image/size", "heap_end_ptr" with CAN_USE_HEAP). The ROM moves
//!   the initrd below the top of RAM the BIOS reports (INT 15h E801)
//!   unless it already ends at `initrd_addr_max`.
//! - `multiboot_dma.bin` for a multiboot kernel: it copies the INITRD blob
//!   (here the multiboot information, at INITRD_ADDR) and fills its memory
//!   fields and memory map from INT 12h/15h, then copies the KERNEL blob
//!   (image, bss, modules) to KERNEL_ADDR and jumps to KERNEL_ENTRY in flat
//!   32-bit protected mode with EAX = 0x2BADB002, EBX = INITRD_ADDR.
//!
//! - `pvh.bin` for an ELF kernel with a PVH note (XEN_ELFNOTE_PHYS32_ENTRY,
//!   Xen's docs/misc/pvh.pandoc). This ROM does not copy the kernel: as
//!   QEMU does, the VMM loads the ELF segments into guest RAM at their
//!   physical addresses before the firmware runs (every generation of the
//!   machine, so a reset reloads it), and KERNEL_ADDR/KERNEL_SIZE only
//!   describe where it lies. The ROM takes the memory map from INT 15h
//!   E820 and the RSDP from a scan of 0xe0000-0xfffff, copies CMDLINE_DATA
//!   (CMDLINE_SIZE bytes, into a 4 KiB buffer of its own) and INITRD_DATA
//!   (to INITRD_ADDR), builds `hvm_start_info` (the initrd as module 0)
//!   and jumps to KERNEL_ENTRY in 32-bit flat mode with EBX pointing at it.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use devices::GuestMem;
use vm_memory::{Bytes, GuestAddress};

use super::{
    linux_initrd, multiboot, place_high, probe, BootContext, BootError, KernelKind, CMDLINE_ADDR,
    HIGH_MEMORY,
};
use crate::config::MachineConfig;
use crate::memory::Layout;

pub const KEY_KERNEL_ADDR: u16 = 0x07;
pub const KEY_KERNEL_SIZE: u16 = 0x08;
pub const KEY_INITRD_ADDR: u16 = 0x0a;
pub const KEY_INITRD_SIZE: u16 = 0x0b;
pub const KEY_KERNEL_ENTRY: u16 = 0x10;
pub const KEY_KERNEL_DATA: u16 = 0x11;
pub const KEY_INITRD_DATA: u16 = 0x12;
pub const KEY_CMDLINE_ADDR: u16 = 0x13;
pub const KEY_CMDLINE_SIZE: u16 = 0x14;
pub const KEY_CMDLINE_DATA: u16 = 0x15;
pub const KEY_SETUP_ADDR: u16 = 0x16;
pub const KEY_SETUP_SIZE: u16 = 0x17;
pub const KEY_SETUP_DATA: u16 = 0x18;

/// Where the real-mode setup goes: 64 KiB below the command line, so the
/// setup's heap and stack (up to the command line) fit in its segment.
pub const SETUP_ADDR: u64 = 0x10000;
/// The multiboot information on this route: QEMU's choice, above
/// SeaBIOS's boot stack (below 0x7c00) and below the 0x10000 area.
pub const MB_INFO_ADDR: u64 = 0x9000;
const MB_LAYOUT: multiboot::MbLayout = multiboot::MbLayout {
    info: MB_INFO_ADDR,
    strings: MB_INFO_ADDR + 0x1000,
    strings_max: SETUP_ADDR - (MB_INFO_ADDR + 0x1000),
};

const LINUX_ROM: &str = "linuxboot_dma.bin";
const MULTIBOOT_ROM: &str = "multiboot_dma.bin";
const PVH_ROM: &str = "pvh.bin";
/// pvh.bin copies the command line, NUL included, into a 4 KiB buffer.
const PVH_CMDLINE_MAX: usize = 4096 - 1;
/// SeaBIOS keeps its tables (and relocated code) at the top of low RAM:
/// what the VMM places there for the kernel stays this far clear of it.
const SEABIOS_HIGH: u64 = 256 << 10;
/// Where Debian's qemu-system-data installs the ROMs; `STRATA_ROM_DIR`
/// comes first, for other layouts.
const ROM_DIRS: &[&str] = &["/usr/share/qemu", "/usr/share/qemu-efi-x86"];

/// The fw_cfg contents of this route.
pub struct FirmwareBoot {
    pub items: Vec<(u16, Vec<u8>)>,
    pub rom_name: &'static str,
    pub rom: Vec<u8>,
}

impl FirmwareBoot {
    /// The fw_cfg file name SeaBIOS finds the ROM under.
    pub fn rom_file(&self) -> String {
        format!("genroms/{}", self.rom_name)
    }

    /// The `bootorder` line that makes the ROM's boot entry the first.
    pub fn bootorder_path(&self) -> String {
        format!("/rom@{}", self.rom_file())
    }

    /// The `bootorder` file with the ROM first, before `rest` (the file
    /// the devices' bootindex made, NUL-terminated, or empty).
    pub fn bootorder_with(&self, rest: &[u8]) -> Vec<u8> {
        let mut out = self.bootorder_path().into_bytes();
        if rest.is_empty() {
            out.push(0);
        } else {
            out.push(b'\n');
            out.extend_from_slice(rest);
        }
        out
    }
}

fn le32(v: u64) -> Vec<u8> {
    (v as u32).to_le_bytes().to_vec()
}

/// Finds option ROM `name`: in the `-L` directories, then
/// `STRATA_ROM_DIR`, then the system's directories.
pub fn find_rom(cfg: &MachineConfig, name: &str) -> Result<(PathBuf, Vec<u8>), BootError> {
    let mut dirs: Vec<PathBuf> = cfg.firmware_dirs.clone();
    dirs.extend(std::env::var_os("STRATA_ROM_DIR").map(PathBuf::from));
    dirs.extend(ROM_DIRS.iter().map(PathBuf::from));
    for d in &dirs {
        let p = d.join(name);
        if let Ok(b) = std::fs::read(&p) {
            return Ok((p, b));
        }
    }
    Err(BootError::File(format!(
        "-kernel through firmware: option ROM {name} not found in {} (install the Debian package qemu-system-data, or set STRATA_ROM_DIR)",
        ROM_DIRS.join(", ")
    )))
}

/// Prepares the kernel in `cfg` for the firmware route. Only a PVH kernel
/// is written into `ram` (pvh.bin expects it there); the others travel in
/// fw_cfg.
pub fn prepare(
    cfg: &MachineConfig,
    layout: &Layout,
    ram: &GuestMem,
) -> Result<FirmwareBoot, BootError> {
    let kcfg = cfg
        .kernel
        .as_ref()
        .ok_or_else(|| BootError::File("-kernel: missing".into()))?;
    let name = kcfg.kernel.display().to_string();
    let kerr = |m: String| BootError::File(format!("-kernel {name}: {m}"));
    let mut image = Vec::new();
    File::open(&kcfg.kernel)
        .and_then(|mut f| f.read_to_end(&mut image))
        .map_err(|e| kerr(e.to_string()))?;
    let head = &image[..image.len().min(multiboot::SEARCH_LEN)];
    match probe(head) {
        Some(KernelKind::BzImage) => linux(cfg, layout, &image, &kerr),
        Some(KernelKind::Multiboot) => multiboot_route(cfg, layout),
        Some(KernelKind::Elf) => pvh_route(cfg, layout, ram, &image, &kerr),
        None => Err(kerr(
            "not a kernel: no bzImage setup header, multiboot header or ELF header".into(),
        )),
    }
}

fn hdr16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn hdr32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

const LOADED_HIGH: u8 = 1 << 0;
const CAN_USE_HEAP: u8 = 1 << 7;

fn linux(
    cfg: &MachineConfig,
    layout: &Layout,
    image: &[u8],
    kerr: &dyn Fn(String) -> BootError,
) -> Result<FirmwareBoot, BootError> {
    let kcfg = cfg.kernel.as_ref().unwrap();
    if image.len() < 0x250 {
        return Err(kerr("the setup header is truncated".into()));
    }
    // Boot protocol: setup_sects 0 means 4 (an ancient convention).
    let sects = match image[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let setup_len = (sects + 1) * 512;
    let version = hdr16(image, 0x206);
    if version < 0x0202 {
        return Err(kerr(format!(
            "Linux boot protocol {}.{:02} is too old (2.02 or later needed)",
            version >> 8,
            version & 0xff
        )));
    }
    if image[0x211] & LOADED_HIGH == 0 {
        return Err(kerr("a zImage (not loaded high): not supported".into()));
    }
    if setup_len >= image.len() {
        return Err(kerr(format!(
            "setup_sects ({sects}) covers the whole file: no protected-mode kernel"
        )));
    }
    let mut setup = image[..setup_len].to_vec();
    let kernel = &image[setup_len..];

    let cmdline_max = if version >= 0x0206 {
        hdr32(&setup, 0x238) as usize
    } else {
        255
    };
    if kcfg.cmdline.len() > cmdline_max {
        return Err(BootError::File(format!(
            "-append: the command line is {} bytes, longer than the kernel's cmdline_size ({cmdline_max})",
            kcfg.cmdline.len()
        )));
    }
    let mut cmdline = kcfg.cmdline.as_bytes().to_vec();
    cmdline.push(0);

    let initrd = linux_initrd(kcfg)?;
    let initrd_max = if version >= 0x0203 {
        hdr32(&setup, 0x22c) as u64
    } else {
        0x37ff_ffff
    };
    // The ROM moves the initrd under the BIOS-reported top anyway.
    let top = (initrd_max + 1).min(layout.below_4g.saturating_sub(SEABIOS_HIGH));
    let kernel_end = HIGH_MEMORY + kernel.len() as u64;
    let initrd_addr = if initrd.is_empty() {
        0
    } else {
        place_high(initrd.len() as u64, kernel_end, top).ok_or_else(|| {
            BootError::File(format!(
                "-initrd: {} bytes do not fit between the kernel (ends at {kernel_end:#x}) and {top:#x} (initrd_addr_max or RAM)",
                initrd.len()
            ))
        })?
    };

    // The fields a boot loader fills in the setup header.
    setup[0x210] = 0xff; // type_of_loader: undefined
    setup[0x211] |= CAN_USE_HEAP;
    // heap_end_ptr: the heap runs to just below the command line, as an
    // offset from the setup's start less 0x200.
    setup[0x224..0x226]
        .copy_from_slice(&((CMDLINE_ADDR - SETUP_ADDR - 0x200) as u16).to_le_bytes());
    setup[0x228..0x22c].copy_from_slice(&(CMDLINE_ADDR as u32).to_le_bytes());
    setup[0x218..0x21c].copy_from_slice(&(initrd_addr as u32).to_le_bytes());
    setup[0x21c..0x220].copy_from_slice(&(initrd.len() as u32).to_le_bytes());

    let rom = find_rom(cfg, LINUX_ROM)?.1;
    Ok(FirmwareBoot {
        items: vec![
            (KEY_SETUP_ADDR, le32(SETUP_ADDR)),
            (KEY_SETUP_SIZE, le32(setup.len() as u64)),
            (KEY_SETUP_DATA, setup),
            (KEY_KERNEL_ADDR, le32(HIGH_MEMORY)),
            (KEY_KERNEL_SIZE, le32(kernel.len() as u64)),
            (KEY_KERNEL_DATA, kernel.to_vec()),
            (KEY_INITRD_ADDR, le32(initrd_addr)),
            (KEY_INITRD_SIZE, le32(initrd.len() as u64)),
            (KEY_INITRD_DATA, initrd),
            (KEY_CMDLINE_ADDR, le32(CMDLINE_ADDR)),
            (KEY_CMDLINE_SIZE, le32(cmdline.len() as u64)),
            (KEY_CMDLINE_DATA, cmdline),
        ],
        rom_name: LINUX_ROM,
        rom,
    })
}

/// Multiboot: the direct loader lays the kernel, modules and information
/// out in a scratch copy of guest RAM (anonymous memory: only what is
/// written is ever allocated), and the blobs are cut from it.
fn multiboot_route(cfg: &MachineConfig, layout: &Layout) -> Result<FirmwareBoot, BootError> {
    let kcfg = cfg.kernel.as_ref().unwrap();
    let scratch_layout = Layout::new(layout.below_4g);
    let scratch = crate::memory::allocate_ram(&scratch_layout)
        .map_err(|e| BootError::File(format!("-kernel: {e}")))?;
    let ctx = BootContext {
        ram: &scratch,
        layout: &scratch_layout,
        cfg: kcfg,
        rsdp: 0,
    };
    let mut f = File::open(&kcfg.kernel).map_err(|e| ctx.kernel_err(e))?;
    let len = f.metadata().map_err(|e| ctx.kernel_err(e))?.len();
    let l = multiboot::load_with(&ctx, &mut f, len, &MB_LAYOUT)?;
    let read = |start: u64, end: u64| -> Result<Vec<u8>, BootError> {
        let mut b = vec![0u8; (end - start) as usize];
        scratch
            .read_slice(&mut b, GuestAddress(start))
            .map_err(|e| ctx.kernel_err(e))?;
        Ok(b)
    };
    let kernel = read(l.start, l.end)?;
    let info = read(MB_LAYOUT.info, MB_LAYOUT.strings + l.strings_len)?;
    let rom = find_rom(cfg, MULTIBOOT_ROM)?.1;
    Ok(FirmwareBoot {
        items: vec![
            (KEY_KERNEL_ADDR, le32(l.start)),
            (KEY_KERNEL_SIZE, le32(kernel.len() as u64)),
            (KEY_KERNEL_DATA, kernel),
            (KEY_KERNEL_ENTRY, le32(l.entry.rip)),
            (KEY_INITRD_ADDR, le32(MB_LAYOUT.info)),
            (KEY_INITRD_SIZE, le32(info.len() as u64)),
            (KEY_INITRD_DATA, info),
        ],
        rom_name: MULTIBOOT_ROM,
        rom,
    })
}

/// The physical range `[low, high)` an ELF64 file's PT_LOAD segments
/// occupy in memory (bss included), read from its program headers.
fn elf64_load_range(image: &[u8]) -> Result<(u64, u64), String> {
    const PT_LOAD: u32 = 1;
    // Offsets come from the file: every one is checked before slicing.
    let field = |o: usize, n: usize| image.get(o..o.checked_add(n)?);
    let u16_at = |o: usize| field(o, 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| field(o, 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    let u64_at = |o: usize| field(o, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    let bad = || "the ELF program headers are truncated".to_string();
    let phoff = usize::try_from(u64_at(0x20).ok_or_else(bad)?).map_err(|_| bad())?;
    let phentsize = u16_at(0x36).ok_or_else(bad)? as usize;
    let phnum = u16_at(0x38).ok_or_else(bad)? as usize;
    let (mut low, mut high) = (u64::MAX, 0u64);
    for i in 0..phnum {
        let ph = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or_else(bad)?;
        if u32_at(ph).ok_or_else(bad)? != PT_LOAD {
            continue;
        }
        let at = |o: usize| ph.checked_add(o).and_then(u64_at).ok_or_else(bad);
        let paddr = at(0x18)?;
        let memsz = at(0x28)?;
        if memsz == 0 {
            continue;
        }
        let end = paddr
            .checked_add(memsz)
            .ok_or_else(|| format!("a segment at {paddr:#x} of {memsz:#x} bytes wraps"))?;
        low = low.min(paddr);
        high = high.max(end);
    }
    if high == 0 {
        return Err("no loadable segment".into());
    }
    Ok((low, high))
}

/// PVH: what QEMU does for an ELF kernel with its `pvh.bin` ROM. The
/// segments go into RAM now; fw_cfg carries the entry point, the command
/// line and the initrd, which the ROM copies when it boots the kernel.
fn pvh_route(
    cfg: &MachineConfig,
    layout: &Layout,
    ram: &GuestMem,
    image: &[u8],
    kerr: &dyn Fn(String) -> BootError,
) -> Result<FirmwareBoot, BootError> {
    use linux_loader::loader::{elf::Elf, elf::PvhBootCapability, KernelLoader};
    let kcfg = cfg.kernel.as_ref().unwrap();
    if image.get(4) != Some(&2) {
        return Err(kerr(
            "a 32-bit ELF file without a multiboot header: not a bootable kernel (need a 64-bit vmlinux with a PVH note or a multiboot header)".into(),
        ));
    }
    let (low, high) = elf64_load_range(image).map_err(kerr)?;
    // SeaBIOS owns the first MiB while it runs and its top-of-RAM area
    // until the kernel starts: a segment there would be overwritten.
    let top = layout.below_4g.saturating_sub(SEABIOS_HIGH);
    if low < HIGH_MEMORY || high > top {
        return Err(kerr(format!(
            "the ELF segments ({low:#x}-{high:#x}) must lie between 1 MiB and {top:#x} (the RAM below 4 GiB SeaBIOS leaves free)"
        )));
    }
    let mut f = File::open(&kcfg.kernel).map_err(|e| kerr(e.to_string()))?;
    let r = Elf::load(ram, None, &mut f, Some(GuestAddress(HIGH_MEMORY)))
        .map_err(|e| kerr(e.to_string()))?;
    let entry = match r.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(e) => e.0,
        _ => {
            return Err(kerr(
                "an ELF kernel without a PVH note (XEN_ELFNOTE_PHYS32_ENTRY) cannot boot through the firmware; drop -bios and -boot menu=on to boot it directly".into(),
            ))
        }
    };
    if entry < low || entry >= high {
        return Err(kerr(format!(
            "the PVH entry point {entry:#x} is outside the loaded segments ({low:#x}-{high:#x})"
        )));
    }

    if kcfg.cmdline.len() > PVH_CMDLINE_MAX {
        return Err(BootError::File(format!(
            "-append: the command line is {} bytes, longer than the {PVH_CMDLINE_MAX} pvh.bin can pass",
            kcfg.cmdline.len()
        )));
    }
    let mut cmdline = kcfg.cmdline.as_bytes().to_vec();
    cmdline.push(0);

    let mut items = vec![
        (KEY_KERNEL_ENTRY, le32(entry)),
        (KEY_KERNEL_ADDR, le32(low)),
        (KEY_KERNEL_SIZE, le32(high - low)),
        (KEY_CMDLINE_SIZE, le32(cmdline.len() as u64)),
        (KEY_CMDLINE_DATA, cmdline),
    ];
    // Linux takes module 0 as its initrd: all files go into it. pvh.bin
    // reads INITRD_ADDR only when INITRD_SIZE is not 0.
    let initrd = linux_initrd(kcfg)?;
    if !initrd.is_empty() {
        let addr = place_high(initrd.len() as u64, high, top).ok_or_else(|| {
            BootError::File(format!(
                "-initrd {}: {} bytes do not fit between the kernel (ends at {high:#x}) and {top:#x} (RAM below 4 GiB less SeaBIOS's area)",
                kcfg.initrd.join(","),
                initrd.len()
            ))
        })?;
        items.push((KEY_INITRD_ADDR, le32(addr)));
        items.push((KEY_INITRD_SIZE, le32(initrd.len() as u64)));
        items.push((KEY_INITRD_DATA, initrd));
    }
    let rom = find_rom(cfg, PVH_ROM)?.1;
    Ok(FirmwareBoot {
        items,
        rom_name: PVH_ROM,
        rom,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_with(segments: &[(u32, u64, u64)]) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56 * segments.len()];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        for (i, (kind, paddr, memsz)) in segments.iter().enumerate() {
            let ph = 64 + 56 * i;
            b[ph..ph + 4].copy_from_slice(&kind.to_le_bytes());
            b[ph + 0x18..ph + 0x20].copy_from_slice(&paddr.to_le_bytes());
            b[ph + 0x28..ph + 0x30].copy_from_slice(&memsz.to_le_bytes());
        }
        b
    }

    #[test]
    fn load_range_spans_the_load_segments() {
        let e = elf_with(&[(1, 0x200000, 0x1000), (4, 0, 0x10), (1, 0x100000, 0x800)]);
        assert_eq!(elf64_load_range(&e), Ok((0x100000, 0x201000)));
    }

    #[test]
    fn load_range_rejects_hostile_headers() {
        assert!(elf64_load_range(&elf_with(&[(4, 0, 0x10)])).is_err());
        assert!(elf64_load_range(&elf_with(&[(1, u64::MAX, 2)])).is_err());
        let mut e = elf_with(&[(1, 0x100000, 0x10)]);
        e[0x38..0x3a].copy_from_slice(&0xffffu16.to_le_bytes());
        assert!(elf64_load_range(&e).is_err());
        e[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(elf64_load_range(&e).is_err());
        assert!(elf64_load_range(&e[..0x30]).is_err());
    }
}
