//! PVH direct boot (Xen's docs/misc/pvh.pandoc, "x86/HVM direct boot ABI";
//! start_info version 1 with the memory map): the ELF kernel is loaded at
//! its physical addresses by `linux-loader`, which also found the
//! XEN_ELFNOTE_PHYS32_ENTRY note. The kernel is entered in 32-bit flat
//! protected mode with paging off, EBX = the `hvm_start_info` address.
//!
//! Layout inside the boot information page: `hvm_start_info` at +0, the
//! module list at +0x100, the memory map at +0x400.

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::ByteValued;

use super::{
    e820, linux_initrd, place_high, BootContext, BootError, CpuMode, EntryState, BOOT_INFO_ADDR,
    CMDLINE_AREA, STACK_TOP,
};

pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const MODLIST_OFF: u64 = 0x100;
const MEMMAP_OFF: u64 = 0x400;
const MEMMAP_MAX: usize = (0x1000 - MEMMAP_OFF as usize) / 24;

pub fn boot(ctx: &BootContext, entry: u64, kernel_end: u64) -> Result<EntryState, BootError> {
    if entry >= 1 << 32 {
        return Err(ctx.kernel_err(format!(
            "PVH entry point {entry:#x} is not a 32-bit address"
        )));
    }
    let cmd = ctx.write_cmdline(&ctx.cfg.cmdline, CMDLINE_AREA)?;
    let mut si = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: cmd,
        rsdp_paddr: ctx.rsdp,
        ..Default::default()
    };
    if !ctx.cfg.initrd.is_empty() {
        // Linux takes the first module as its initrd; all files go into it.
        let data = linux_initrd(ctx.cfg)?;
        let size = data.len() as u64;
        let limit = ctx.low_ram_top();
        let addr = place_high(size, kernel_end, limit).ok_or_else(|| {
            BootError::File(format!(
                "-initrd {}: {size} bytes do not fit between the kernel's end ({kernel_end:#x}) and the end of RAM below 4 GiB ({limit:#x})",
                ctx.cfg.initrd.join(",")
            ))
        })?;
        ctx.write(addr, &data, "the initrd")?;
        let m = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        ctx.write(
            BOOT_INFO_ADDR + MODLIST_OFF,
            m.as_slice(),
            "the module list",
        )?;
        si.nr_modules = 1;
        si.modlist_paddr = BOOT_INFO_ADDR + MODLIST_OFF;
    }
    let map = e820(ctx.layout);
    for (i, e) in map.iter().take(MEMMAP_MAX).enumerate() {
        let m = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        ctx.write(
            BOOT_INFO_ADDR + MEMMAP_OFF + 24 * i as u64,
            m.as_slice(),
            "the memory map",
        )?;
    }
    si.memmap_paddr = BOOT_INFO_ADDR + MEMMAP_OFF;
    si.memmap_entries = map.len().min(MEMMAP_MAX) as u32;
    ctx.write(BOOT_INFO_ADDR, si.as_slice(), "hvm_start_info")?;
    Ok(EntryState {
        mode: CpuMode::Protected32,
        rip: entry,
        rsp: STACK_TOP,
        rax: 0,
        rbx: BOOT_INFO_ADDR,
        rsi: 0,
    })
}
