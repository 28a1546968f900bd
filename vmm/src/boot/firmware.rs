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
//! PVH ELF kernels would need QEMU's `pvh.bin`; they are refused with a
//! pointer to direct boot.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

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

/// Finds option ROM `name`.
pub fn find_rom(name: &str) -> Result<(PathBuf, Vec<u8>), BootError> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("STRATA_ROM_DIR")
        .map(|d| vec![PathBuf::from(d)])
        .unwrap_or_default();
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

/// Prepares the kernel in `cfg` for the firmware route.
pub fn prepare(cfg: &MachineConfig, layout: &Layout) -> Result<FirmwareBoot, BootError> {
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
        Some(KernelKind::Elf) => Err(kerr(
            "an ELF kernel cannot boot through the firmware (only bzImage and multiboot can); drop -bios and -boot menu=on to boot it directly".into(),
        )),
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
    // SeaBIOS keeps its tables at the top of low RAM: stay 256 KiB clear
    // of it (the ROM moves the initrd under the BIOS-reported top anyway).
    let top = (initrd_max + 1).min(layout.below_4g.saturating_sub(256 << 10));
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

    let rom = find_rom(LINUX_ROM)?.1;
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
    let rom = find_rom(MULTIBOOT_ROM)?.1;
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
