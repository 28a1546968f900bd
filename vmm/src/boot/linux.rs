//! The Linux x86 boot protocol (Documentation/arch/x86/boot.rst, protocol
//! 2.02 to 2.15): the bzImage's protected-mode part is loaded at
//! `code32_start` by `linux-loader`, and the VMM fills the zero page
//! (`struct boot_params`, Documentation/arch/x86/zero-page.rst) with the
//! setup header, the e820 map, the command line, the initrd and the RSDP.
//!
//! Entry: the 64-bit entry at load address + 0x200 (protocol 2.12+ with
//! XLF_KERNEL_64) in long mode on identity page tables, or the 32-bit entry
//! at the load address in flat protected mode; either way RSI points at the
//! zero page. An ELF vmlinux without a PVH note gets the 64-bit entry at
//! its ELF entry point with a zero page built from scratch.

use std::fs::File;

use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use vm_memory::{ByteValued, GuestAddress};

use super::{
    e820, linux_initrd, place_high, BootContext, BootError, CpuMode, EntryState, BOOT_INFO_ADDR,
    HIGH_MEMORY, STACK_TOP,
};

const HDRS: u32 = 0x5372_6448;
const LOADED_HIGH: u8 = 1 << 0;
const CAN_USE_HEAP: u8 = 1 << 7;
const XLF_KERNEL_64: u16 = 1 << 0;
/// "Undefined" boot loader ID: we are not one of the registered loaders.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// initrd_addr_max for protocols before 2.03.
const OLD_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// cmdline_size for protocols before 2.06.
const OLD_CMDLINE_SIZE: u64 = 255;
const E820_MAX: usize = 128;

pub fn load_bzimage(ctx: &BootContext, f: &mut File) -> Result<EntryState, BootError> {
    let r = BzImage::load(ctx.ram, None, f, Some(GuestAddress(HIGH_MEMORY))).map_err(|e| {
        ctx.kernel_err(format!(
            "{e} (is code32_start below 1 MiB, or the kernel bigger than RAM?)"
        ))
    })?;
    let hdr = r
        .setup_header
        .ok_or_else(|| ctx.kernel_err("no setup header"))?;
    if hdr.header != HDRS || hdr.version < 0x0202 {
        let v = hdr.version;
        return Err(ctx.kernel_err(format!(
            "Linux boot protocol {}.{:02} is too old (2.02 or later needed)",
            v >> 8,
            v & 0xff
        )));
    }
    if hdr.loadflags & LOADED_HIGH == 0 {
        return Err(ctx.kernel_err("a zImage (not loaded high): not supported"));
    }
    let load = r.kernel_load.0;
    // The kernel decompresses in place and needs init_size bytes from its
    // load address (and, relocatable, from pref_address): keep the initrd
    // clear of both.
    let init_size = if hdr.version >= 0x020a {
        hdr.init_size as u64
    } else {
        0
    };
    let pref = if hdr.version >= 0x020a {
        hdr.pref_address
    } else {
        load
    };
    let end = r
        .kernel_end
        .max(load.saturating_add(init_size))
        .max(pref.saturating_add(init_size));
    let mut bp = boot_params {
        hdr,
        ..Default::default()
    };
    let initrd_max = if hdr.version >= 0x0203 {
        hdr.initrd_addr_max as u64
    } else {
        OLD_INITRD_ADDR_MAX
    };
    let cmdline_size = if hdr.version >= 0x0206 {
        hdr.cmdline_size as u64
    } else {
        OLD_CMDLINE_SIZE
    };
    fill_zero_page(ctx, &mut bp, end, initrd_max, cmdline_size)?;
    let long = hdr.version >= 0x020c && hdr.xloadflags & XLF_KERNEL_64 != 0;
    write_zero_page(ctx, &bp)?;
    Ok(EntryState {
        mode: if long {
            CpuMode::Long64
        } else {
            CpuMode::Protected32
        },
        rip: if long { load + 0x200 } else { load },
        rsp: STACK_TOP,
        rax: 0,
        rbx: 0,
        rsi: BOOT_INFO_ADDR,
    })
}

/// An ELF vmlinux without PVH: the 64-bit entry with a minimal header, as
/// a boot loader that read no setup header would write it.
pub fn boot_elf_64(ctx: &BootContext, entry: u64, end: u64) -> Result<EntryState, BootError> {
    let mut bp = boot_params::default();
    bp.hdr.boot_flag = 0xaa55;
    bp.hdr.header = HDRS;
    bp.hdr.version = 0x020f;
    bp.hdr.kernel_alignment = 0x0100_0000;
    bp.hdr.cmdline_size = super::CMDLINE_AREA as u32 - 1;
    fill_zero_page(ctx, &mut bp, end, OLD_INITRD_ADDR_MAX, super::CMDLINE_AREA)?;
    write_zero_page(ctx, &bp)?;
    Ok(EntryState {
        mode: CpuMode::Long64,
        rip: entry,
        rsp: STACK_TOP,
        rax: 0,
        rbx: 0,
        rsi: BOOT_INFO_ADDR,
    })
}

fn fill_zero_page(
    ctx: &BootContext,
    bp: &mut boot_params,
    kernel_end: u64,
    initrd_max: u64,
    cmdline_size: u64,
) -> Result<(), BootError> {
    bp.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    bp.hdr.loadflags |= CAN_USE_HEAP;
    bp.hdr.heap_end_ptr = 0xfe00;
    let cmd = ctx.write_cmdline(&ctx.cfg.cmdline, cmdline_size)?;
    bp.hdr.cmd_line_ptr = cmd as u32;
    bp.ext_cmd_line_ptr = 0;
    if !ctx.cfg.initrd.is_empty() {
        let data = linux_initrd(ctx.cfg)?;
        let size = data.len() as u64;
        // initrd_addr_max is the highest address the initrd may occupy.
        let limit = ctx.low_ram_top().min(initrd_max.saturating_add(1));
        let addr = place_high(size, kernel_end, limit).ok_or_else(|| {
            BootError::File(format!(
                "-initrd {}: {size} bytes do not fit between the kernel's end ({kernel_end:#x}) and the initrd limit ({limit:#x}; initrd_addr_max {initrd_max:#x}, RAM below 4 GiB {:#x})",
                ctx.cfg.initrd.join(","),
                ctx.low_ram_top()
            ))
        })?;
        ctx.write(addr, &data, "the initrd")?;
        bp.hdr.ramdisk_image = addr as u32;
        bp.hdr.ramdisk_size = size as u32;
        bp.ext_ramdisk_image = (addr >> 32) as u32;
        bp.ext_ramdisk_size = (size >> 32) as u32;
    }
    let map = e820(ctx.layout);
    for (slot, e) in bp.e820_table.iter_mut().zip(map.iter().take(E820_MAX)) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    bp.e820_entries = map.len().min(E820_MAX) as u8;
    bp.acpi_rsdp_addr = ctx.rsdp;
    Ok(())
}

fn write_zero_page(ctx: &BootContext, bp: &boot_params) -> Result<(), BootError> {
    ctx.write(BOOT_INFO_ADDR, bp.as_slice(), "the zero page")
}
