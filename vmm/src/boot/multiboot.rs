//! Multiboot 0.6.96 (the "Multiboot Specification", version 1): the
//! header (section 3.1) is found in the first 8 KiB; the kernel is loaded
//! from the a.out-kludge addresses (flag 16) or from its 32-bit ELF program
//! headers (the part of a segment in the BIOS area below 1 MiB, where
//! `ld` puts the ELF headers, is skipped); `-initrd` files become modules (3.3, page-aligned after the
//! kernel); the multiboot information (3.3) carries the memory sizes, the
//! command line, the modules, the memory map and the loader's name. Entry
//! (3.2): 32-bit flat protected mode, paging off, EAX = 0x2BADB002,
//! EBX = the information's address.
//!
//! As QEMU does, the kernel's command line is its file name followed by
//! `-append`, and each `-initrd` entry is `file [args]` with the whole entry
//! as the module's command line.

use std::fs::File;

use super::{
    e820, read_at, read_initrd, BootContext, BootError, CpuMode, EntryState, BIOS_AREA,
    BOOT_INFO_ADDR, CMDLINE_ADDR, CMDLINE_AREA, HIGH_MEMORY, STACK_TOP,
};

pub const SEARCH_LEN: usize = 8192;
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// Requirement bits this loader meets: page-aligned modules, memory
/// information, and (ignored, as QEMU ignores it) a video mode request.
const KNOWN_REQUIRED: u32 = 0b111;

const INFO_MEM: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;
const INFO_LOADER_NAME: u32 = 1 << 9;

const MMAP_OFF: u64 = 0x100;
const MODS_OFF: u64 = 0x400;
const MAX_MODS: usize = ((0x1000 - MODS_OFF) / 16) as usize;
const LOADER_NAME: &str = "Strata";

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

/// The offset of a valid multiboot header (magic + flags + checksum = 0)
/// in the first 8 KiB, 32-bit aligned.
pub fn find_header(head: &[u8]) -> Option<usize> {
    let n = head.len().min(SEARCH_LEN);
    (0..n.saturating_sub(11)).step_by(4).find(|&off| {
        le32(head, off) == HEADER_MAGIC
            && HEADER_MAGIC
                .wrapping_add(le32(head, off + 4))
                .wrapping_add(le32(head, off + 8))
                == 0
    })
}

/// A loaded image: where it lies and where it starts.
struct Image {
    start: u64,
    entry: u64,
    end: u64,
}

/// Where the information structure and the strings go. Direct boot uses
/// the low-memory map in `boot`'s module doc; the firmware route uses
/// QEMU's multiboot option ROM area (0x9000), which the ROM copies in as
/// one blob and completes with the firmware's e820 map.
pub struct MbLayout {
    pub info: u64,
    pub strings: u64,
    pub strings_max: u64,
}

pub const DIRECT: MbLayout = MbLayout {
    info: BOOT_INFO_ADDR,
    strings: CMDLINE_ADDR,
    strings_max: CMDLINE_AREA,
};

/// What was loaded where.
pub struct Loaded {
    pub entry: EntryState,
    /// The kernel image's first byte.
    pub start: u64,
    /// The end of the kernel and its modules.
    pub end: u64,
    /// Bytes of strings written at the layout's `strings`.
    pub strings_len: u64,
}

pub fn load(ctx: &BootContext, f: &mut File, len: u64) -> Result<EntryState, BootError> {
    load_with(ctx, f, len, &DIRECT).map(|l| l.entry)
}

/// Loads the kernel, its modules and the information structure as laid
/// out by `lay`.
pub fn load_with(
    ctx: &BootContext,
    f: &mut File,
    len: u64,
    lay: &MbLayout,
) -> Result<Loaded, BootError> {
    let mut head = vec![0u8; len.min(SEARCH_LEN as u64) as usize];
    read_at(f, 0, &mut head).map_err(|e| ctx.kernel_err(e))?;
    let hoff = find_header(&head).ok_or_else(|| ctx.kernel_err("no multiboot header"))?;
    let mut hdr = [0u8; 32];
    read_at(f, hoff as u64, &mut hdr).map_err(|_| ctx.kernel_err("multiboot header truncated"))?;
    let flags = le32(&hdr, 4);
    if flags & 0xffff & !KNOWN_REQUIRED != 0 {
        return Err(ctx.kernel_err(format!(
            "the multiboot header requires features this loader does not know (flags {flags:#x})"
        )));
    }
    let img = if flags & FLAG_AOUT_KLUDGE != 0 {
        load_kludge(ctx, f, len, hoff as u64, &hdr)?
    } else {
        load_elf32(ctx, f, len, &head)?
    };
    let (end, strings_len) = write_info(ctx, img.end, lay)?;
    Ok(Loaded {
        entry: EntryState {
            mode: CpuMode::Protected32,
            rip: img.entry,
            rsp: STACK_TOP,
            rax: BOOTLOADER_MAGIC as u64,
            rbx: lay.info,
            rsi: 0,
        },
        start: img.start,
        end,
        strings_len,
    })
}

/// Checks that `[addr, addr + size)` is RAM at or above 1 MiB (below it
/// are this loader's own structures) and below the PCI hole.
fn check_range(ctx: &BootContext, addr: u64, size: u64, what: &str) -> Result<u64, BootError> {
    let end = addr.checked_add(size);
    match end {
        Some(end) if addr >= HIGH_MEMORY && end <= ctx.low_ram_top() => Ok(end),
        _ => Err(ctx.kernel_err(format!(
            "{what} [{addr:#x}, +{size:#x}) is not in RAM between 1 MiB and {:#x}",
            ctx.low_ram_top()
        ))),
    }
}

fn load_kludge(
    ctx: &BootContext,
    f: &mut File,
    len: u64,
    hoff: u64,
    hdr: &[u8],
) -> Result<Image, BootError> {
    let (header_addr, load_addr, load_end, bss_end, entry) = (
        le32(hdr, 12) as u64,
        le32(hdr, 16) as u64,
        le32(hdr, 20) as u64,
        le32(hdr, 24) as u64,
        le32(hdr, 28) as u64,
    );
    let bad = |m: &str| ctx.kernel_err(format!("multiboot a.out kludge: {m}"));
    // The file offset the image starts at: the header sits at hoff in the
    // file and at header_addr in memory.
    let file_off = header_addr
        .checked_sub(load_addr)
        .and_then(|d| hoff.checked_sub(d))
        .ok_or_else(|| bad("header_addr and load_addr put the image before the file's start"))?;
    let load_end = if load_end == 0 {
        load_addr + (len - file_off)
    } else {
        load_end
    };
    let size = load_end
        .checked_sub(load_addr)
        .ok_or_else(|| bad("load_end_addr below load_addr"))?;
    if file_off + size > len {
        return Err(bad("load_end_addr beyond the end of the file"));
    }
    let bss_end = if bss_end == 0 { load_end } else { bss_end };
    let bss = bss_end
        .checked_sub(load_end)
        .ok_or_else(|| bad("bss_end_addr below load_end_addr"))?;
    let end = check_range(ctx, load_addr, size + bss, "the kernel image")?;
    let mut data = vec![0u8; size as usize];
    read_at(f, file_off, &mut data).map_err(|e| ctx.kernel_err(e))?;
    ctx.write(load_addr, &data, "the kernel image")?;
    ctx.write(load_end, &vec![0u8; bss as usize], "the kernel's bss")?;
    if !(load_addr..end).contains(&entry) {
        return Err(bad(&format!(
            "entry_addr {entry:#x} is outside the loaded image"
        )));
    }
    Ok(Image {
        start: load_addr,
        entry,
        end,
    })
}

fn load_elf32(ctx: &BootContext, f: &mut File, len: u64, head: &[u8]) -> Result<Image, BootError> {
    let bad = |m: &str| ctx.kernel_err(format!("multiboot ELF: {m}"));
    if !head.starts_with(b"\x7fELF") || head.len() < 52 {
        return Err(bad(
            "not an ELF file, and the header has no a.out kludge addresses (flag 16)",
        ));
    }
    if head[4] != 1 {
        return Err(bad(
            "a 64-bit ELF needs the a.out kludge (flag 16), as QEMU requires",
        ));
    }
    if head[5] != 1 || le16(head, 18) != 3 {
        return Err(bad("not a little-endian i386 ELF"));
    }
    let entry = le32(head, 24) as u64;
    let phoff = le32(head, 28) as u64;
    let phentsize = le16(head, 42) as u64;
    let phnum = le16(head, 44) as u64;
    if phentsize != 32 || phnum == 0 {
        return Err(bad("bad program header table"));
    }
    let mut ph = vec![0u8; (phnum * 32) as usize];
    if phoff.checked_add(phnum * 32).is_none_or(|e| e > len) {
        return Err(bad("program header table beyond the end of the file"));
    }
    read_at(f, phoff, &mut ph).map_err(|e| ctx.kernel_err(e))?;
    let mut end = 0;
    let mut start = u64::MAX;
    let mut phys_entry = None;
    for p in ph.chunks_exact(32) {
        if le32(p, 0) != 1 {
            continue; // not PT_LOAD
        }
        let (off, vaddr, paddr, filesz, memsz) = (
            le32(p, 4) as u64,
            le32(p, 8) as u64,
            le32(p, 12) as u64,
            le32(p, 16) as u64,
            le32(p, 20) as u64,
        );
        if memsz == 0 {
            continue;
        }
        if filesz > memsz || off.checked_add(filesz).is_none_or(|e| e > len) {
            return Err(bad(
                "a segment's file size exceeds its memory size or the file",
            ));
        }
        // The ELF entry is virtual; run it at its physical address.
        if (vaddr..vaddr.saturating_add(memsz)).contains(&entry) {
            phys_entry = Some(entry - vaddr + paddr);
        }
        // `ld -Ttext 0x100000` puts the ELF and program headers in a
        // segment of their own just below 1 MiB (0xff000). That is the
        // BIOS area, which on a PC is write-protected firmware shadow: QEMU
        // loads such kernels and the bytes never reach the guest. Do the
        // same: the part of a segment in the BIOS area is not loaded, the
        // rest must lie in RAM above 1 MiB as any segment.
        let skip = if (BIOS_AREA..HIGH_MEMORY).contains(&paddr) {
            (HIGH_MEMORY - paddr).min(memsz)
        } else {
            0
        };
        if skip == memsz {
            continue;
        }
        let (paddr, off) = (paddr + skip, off + skip.min(filesz));
        let (filesz, memsz) = (filesz.saturating_sub(skip), memsz - skip);
        let seg_end = check_range(ctx, paddr, memsz, "a segment")?;
        let mut data = vec![0u8; filesz as usize];
        read_at(f, off, &mut data).map_err(|e| ctx.kernel_err(e))?;
        ctx.write(paddr, &data, "a segment")?;
        ctx.write(
            paddr + filesz,
            &vec![0u8; (memsz - filesz) as usize],
            "a segment's bss",
        )?;
        end = end.max(seg_end);
        start = start.min(paddr);
    }
    if start == u64::MAX {
        return Err(bad("no loadable segment above 1 MiB"));
    }
    if phys_entry.is_some_and(|e| !(start..end).contains(&e)) {
        return Err(bad("the entry point is outside the loaded segments"));
    }
    let entry = phys_entry.ok_or_else(|| bad("the entry point is in no loadable segment"))?;
    Ok(Image { start, entry, end })
}

/// Writes the modules, strings, memory map and the information structure.
/// Returns the end of the last module (or of the kernel) and the length of
/// the strings.
fn write_info(ctx: &BootContext, kernel_end: u64, lay: &MbLayout) -> Result<(u64, u64), BootError> {
    let mut strings: Vec<u8> = Vec::new();
    let mut add_str = |s: &str| -> u64 {
        let at = lay.strings + strings.len() as u64;
        strings.extend_from_slice(s.as_bytes());
        strings.push(0);
        at
    };
    let name = ctx.kernel_name();
    let cmdline = if ctx.cfg.cmdline.is_empty() {
        name
    } else {
        format!("{name} {}", ctx.cfg.cmdline)
    };
    let cmd_at = add_str(&cmdline);
    if ctx.cfg.initrd.len() > MAX_MODS {
        return Err(BootError::File(format!(
            "-initrd: {} modules, at most {MAX_MODS} are supported",
            ctx.cfg.initrd.len()
        )));
    }
    let mut next = (kernel_end + 0xfff) & !0xfff;
    let mut end = kernel_end;
    let mut mods = Vec::new();
    for entry in &ctx.cfg.initrd {
        let file = entry.split(' ').next().unwrap_or(entry);
        let data = read_initrd(file)?;
        let size = data.len() as u64;
        if next.checked_add(size).is_none_or(|e| e > ctx.low_ram_top()) {
            return Err(BootError::File(format!(
                "-initrd {file}: module of {size} bytes does not fit in RAM below {:#x} after the kernel and previous modules (at {next:#x})",
                ctx.low_ram_top()
            )));
        }
        ctx.write(next, &data, "a module")?;
        let s = add_str(entry);
        mods.push((next, next + size, s));
        end = next + size;
        next = (next + size + 0xfff) & !0xfff;
    }
    let loader_at = add_str(LOADER_NAME);
    if strings.len() as u64 > lay.strings_max {
        return Err(BootError::File(format!(
            "-append: the command line and module names take {} bytes, more than {}",
            strings.len(),
            lay.strings_max
        )));
    }
    ctx.write(lay.strings, &strings, "the command lines")?;

    let mut mmap = Vec::new();
    for e in e820(ctx.layout) {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&e.addr.to_le_bytes());
        mmap.extend_from_slice(&e.size.to_le_bytes());
        mmap.extend_from_slice(&e.kind.to_le_bytes());
    }
    ctx.write(lay.info + MMAP_OFF, &mmap, "the memory map")?;
    let mut modtab = Vec::new();
    for (start, end, s) in &mods {
        for v in [*start as u32, *end as u32, *s as u32, 0] {
            modtab.extend_from_slice(&v.to_le_bytes());
        }
    }
    ctx.write(lay.info + MODS_OFF, &modtab, "the module list")?;

    let mut info = [0u32; 22];
    info[0] = INFO_MEM | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME;
    info[1] = (ctx.low_ram_top().min(super::EBDA_START) / 1024) as u32;
    info[2] = (ctx.low_ram_top().saturating_sub(HIGH_MEMORY) / 1024) as u32;
    info[4] = cmd_at as u32;
    info[5] = mods.len() as u32;
    info[6] = (lay.info + MODS_OFF) as u32;
    info[11] = mmap.len() as u32;
    info[12] = (lay.info + MMAP_OFF) as u32;
    info[16] = loader_at as u32;
    let bytes: Vec<u8> = info.iter().flat_map(|v| v.to_le_bytes()).collect();
    ctx.write(lay.info, &bytes, "the multiboot information")?;
    Ok((end, strings.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_search() {
        let mut b = vec![0u8; 64];
        b[8..12].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        b[12..16].copy_from_slice(&0x10003u32.to_le_bytes());
        let sum = 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(0x10003);
        b[16..20].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(find_header(&b), Some(8));
        b[16] ^= 1;
        assert_eq!(find_header(&b), None);
        assert_eq!(find_header(&b[..10]), None);
    }
}
