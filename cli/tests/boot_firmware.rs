//! `-kernel` through SeaBIOS (an explicit `-bios`, or `-boot menu=on`).
//! Under qtest: the fw_cfg items 0x07-0x18 hold what the boot protocol
//! says a loader hands over, the option ROM is `genroms/...` and first in
//! `bootorder`; a PVH kernel is already in RAM (pvh.bin does not copy it).
//! Under KVM: the test kernel, as bzImage (through linuxboot_dma.bin,
//! entering its real-mode setup), as multiboot (through
//! multiboot_dma.bin) and as PVH ELF (through pvh.bin), boots and reports
//! the command line, the initrd or module, and the e820 map SeaBIOS gave
//! it.

mod support;

use std::time::Duration;

use support::qtest::Qtest;
use support::{kernels, kvm_available, require_bios, run_strata, run_until_marker, scratch, BIOS};

const TIMEOUT: Duration = Duration::from_secs(120);
const APPEND: &str = "console=ttyS0 via=seabios quoted=\"a b\"";

fn fw_cfg_u32(q: &mut Qtest, key: u16) -> u32 {
    u32::from_le_bytes(q.fw_cfg_read(key, 4).try_into().unwrap())
}

fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .map(|l| l.trim_end_matches('\r'))
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no '{prefix}' line in:\n{out}"))
}

#[test]
fn bzimage_items_follow_the_boot_protocol() {
    require_bios();
    let dir = scratch("fwboot-items");
    let rd: Vec<u8> = (0..5000u32).map(|i| (i * 31 + 7) as u8).collect();
    let rdp = dir.join("rd.bin");
    std::fs::write(&rdp, &rd).unwrap();
    let k = kernels::path("testkernel.bzImage");
    let image = std::fs::read(&k).unwrap();
    let mut q = Qtest::start(&[
        "-m",
        "128",
        "-bios",
        BIOS,
        "-kernel",
        &k,
        "-initrd",
        &rdp.display().to_string(),
        "-append",
        APPEND,
    ]);
    let setup_len = (image[0x1f1] as usize + 1) * 512;
    assert_eq!(fw_cfg_u32(&mut q, 0x16), 0x10000, "SETUP_ADDR");
    assert_eq!(fw_cfg_u32(&mut q, 0x17) as usize, setup_len, "SETUP_SIZE");
    let setup = q.fw_cfg_read(0x18, setup_len);
    assert_eq!(&setup[0x202..0x206], b"HdrS");
    assert_eq!(setup[0x210], 0xff, "type_of_loader");
    assert_eq!(setup[0x211] & 0x81, 0x81, "LOADED_HIGH | CAN_USE_HEAP");
    let cmd_ptr = u32::from_le_bytes(setup[0x228..0x22c].try_into().unwrap());
    assert_eq!(
        fw_cfg_u32(&mut q, 0x13),
        cmd_ptr,
        "cmd_line_ptr = CMDLINE_ADDR"
    );
    let heap_end = u16::from_le_bytes([setup[0x224], setup[0x225]]) as u32;
    assert_eq!(
        heap_end + 0x200 + 0x10000,
        cmd_ptr,
        "heap ends at the cmdline"
    );
    let rd_addr = u32::from_le_bytes(setup[0x218..0x21c].try_into().unwrap());
    let rd_size = u32::from_le_bytes(setup[0x21c..0x220].try_into().unwrap());
    assert_eq!(rd_size as usize, rd.len());
    assert_eq!(
        fw_cfg_u32(&mut q, 0x0a),
        rd_addr,
        "INITRD_ADDR = ramdisk_image"
    );
    assert_eq!(rd_addr % 4096, 0);
    assert!((rd_addr + rd_size) as u64 <= 128 << 20);
    assert_eq!(fw_cfg_u32(&mut q, 0x0b) as usize, rd.len());
    assert_eq!(q.fw_cfg_read(0x12, rd.len()), rd, "INITRD_DATA");
    let code32 = u32::from_le_bytes(setup[0x214..0x218].try_into().unwrap());
    assert_eq!(
        fw_cfg_u32(&mut q, 0x07),
        code32,
        "KERNEL_ADDR = code32_start"
    );
    let kernel = &image[setup_len..];
    assert_eq!(fw_cfg_u32(&mut q, 0x08) as usize, kernel.len());
    assert_eq!(q.fw_cfg_read(0x11, kernel.len()), kernel, "KERNEL_DATA");
    let mut cmd = APPEND.as_bytes().to_vec();
    cmd.push(0);
    assert_eq!(fw_cfg_u32(&mut q, 0x14) as usize, cmd.len());
    assert_eq!(q.fw_cfg_read(0x15, cmd.len()), cmd, "CMDLINE_DATA");
    let rom = q
        .fw_cfg_file("genroms/linuxboot_dma.bin")
        .expect("the option ROM");
    assert_eq!(&rom[..2], &[0x55, 0xaa], "an option ROM");
    let order = q.fw_cfg_file("bootorder").unwrap();
    assert!(
        order.starts_with(b"/rom@genroms/linuxboot_dma.bin"),
        "{}",
        String::from_utf8_lossy(&order)
    );
    assert_eq!(order.last(), Some(&0));
    // Nothing was loaded directly: low RAM at the kernel address is empty.
    assert_eq!(q.memread(0x100000, 16), [0; 16]);
}

#[test]
fn multiboot_items_hold_image_and_info() {
    require_bios();
    let k = kernels::path("testkernel-mb.elf");
    let mut q = Qtest::start(&["-boot", "menu=on", "-kernel", &k, "-append", "x=1"]);
    let rom = q
        .fw_cfg_file("genroms/multiboot_dma.bin")
        .expect("the option ROM");
    assert_eq!(&rom[..2], &[0x55, 0xaa]);
    let info_addr = fw_cfg_u32(&mut q, 0x0a);
    let size = fw_cfg_u32(&mut q, 0x0b) as usize;
    let info = q.fw_cfg_read(0x12, size);
    let at = |o: usize| u32::from_le_bytes(info[o..o + 4].try_into().unwrap());
    assert_eq!(
        at(0) & (1 << 2 | 1 << 6),
        1 << 2 | 1 << 6,
        "cmdline and mmap flags"
    );
    // Pointers inside the blob, so the ROM's one copy brings them along.
    let cmd = (at(16) - info_addr) as usize;
    let end = cmd + info[cmd..].iter().position(|&b| b == 0).unwrap();
    assert_eq!(
        std::str::from_utf8(&info[cmd..end]).unwrap(),
        format!("{k} x=1")
    );
    let mmap = at(48);
    assert!(
        mmap > info_addr && (mmap - info_addr) < 0x400,
        "mmap in the blob"
    );
    let entry = fw_cfg_u32(&mut q, 0x10);
    let load = fw_cfg_u32(&mut q, 0x07);
    let len = fw_cfg_u32(&mut q, 0x08);
    assert!(
        (load..load + len).contains(&entry),
        "entry inside the image"
    );
    assert_eq!(load, 0x100000);
}

/// The first PT_LOAD segment of an ELF64 file: (file offset, paddr, filesz).
fn first_load_segment(elf: &[u8]) -> (usize, u64, usize) {
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    let phoff = u64_at(0x20) as usize;
    let phnum = u16::from_le_bytes([elf[0x38], elf[0x39]]) as usize;
    (0..phnum)
        .map(|i| phoff + 56 * i)
        .find(|&ph| elf[ph..ph + 4] == 1u32.to_le_bytes() && u64_at(ph + 0x20) > 0)
        .map(|ph| {
            (
                u64_at(ph + 8) as usize,
                u64_at(ph + 0x18),
                u64_at(ph + 0x20) as usize,
            )
        })
        .expect("a PT_LOAD segment")
}

#[test]
fn pvh_items_for_pvh_rom() {
    require_bios();
    let dir = scratch("fwboot-pvh-items");
    let rd: Vec<u8> = (0..4099u32).map(|i| (i * 17 + 5) as u8).collect();
    let rdp = dir.join("rd.bin");
    std::fs::write(&rdp, &rd).unwrap();
    let k = kernels::path("testkernel-pvh.elf");
    let elf = std::fs::read(&k).unwrap();
    let mut q = Qtest::start(&[
        "-m",
        "128",
        "-bios",
        BIOS,
        "-kernel",
        &k,
        "-initrd",
        &rdp.display().to_string(),
        "-append",
        APPEND,
    ]);
    let rom = q.fw_cfg_file("genroms/pvh.bin").expect("the option ROM");
    assert_eq!(&rom[..2], &[0x55, 0xaa], "an option ROM");
    let order = q.fw_cfg_file("bootorder").unwrap();
    assert!(
        order.starts_with(b"/rom@genroms/pvh.bin"),
        "{}",
        String::from_utf8_lossy(&order)
    );
    // pvh.bin does not copy the kernel: its segments are in RAM already.
    let (off, paddr, filesz) = first_load_segment(&elf);
    let n = filesz.min(4096);
    assert_eq!(
        q.memread(paddr, n),
        &elf[off..off + n],
        "the segment at {paddr:#x} is loaded"
    );
    let load = fw_cfg_u32(&mut q, 0x07) as u64;
    let size = fw_cfg_u32(&mut q, 0x08) as u64;
    assert_eq!(load, 0x100000, "KERNEL_ADDR: the lowest segment");
    assert!(size >= filesz as u64, "KERNEL_SIZE covers the segments");
    let entry = fw_cfg_u32(&mut q, 0x10) as u64;
    assert!(
        (load..load + size).contains(&entry),
        "KERNEL_ENTRY {entry:#x} is inside the kernel"
    );
    // The entry is the PVH note's, not e_entry (the Linux 32-bit entry).
    let e_entry = u64::from_le_bytes(elf[0x18..0x20].try_into().unwrap());
    assert_ne!(entry, e_entry, "the PVH entry, not e_entry");
    let mut cmd = APPEND.as_bytes().to_vec();
    cmd.push(0);
    assert_eq!(fw_cfg_u32(&mut q, 0x14) as usize, cmd.len(), "CMDLINE_SIZE");
    assert_eq!(q.fw_cfg_read(0x15, cmd.len()), cmd, "CMDLINE_DATA");
    let rd_addr = fw_cfg_u32(&mut q, 0x0a) as u64;
    assert_eq!(fw_cfg_u32(&mut q, 0x0b) as usize, rd.len(), "INITRD_SIZE");
    assert_eq!(rd_addr % 4096, 0);
    assert!(rd_addr >= load + size, "the initrd is above the kernel");
    assert!(
        rd_addr + rd.len() as u64 <= (128 << 20) - (256 << 10),
        "the initrd stays clear of SeaBIOS's top-of-RAM area"
    );
    assert_eq!(q.fw_cfg_read(0x12, rd.len()), rd, "INITRD_DATA");
    // The ROM loads the initrd itself: nothing there yet.
    assert_eq!(q.memread(rd_addr, 16), [0; 16]);
}

#[test]
fn pvh_bad_input_is_one_line() {
    require_bios();
    let dir = scratch("fwboot-pvh-bad");
    // An ELF64 with one segment at 1 MiB and no PVH note.
    let mut elf = vec![0u8; 0x1010];
    elf[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    elf[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    elf[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
    elf[0x18..0x20].copy_from_slice(&0x100000u64.to_le_bytes());
    elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    elf[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
    elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
    elf[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes());
    for o in [0x10, 0x18] {
        elf[ph + o..ph + o + 8].copy_from_slice(&0x100000u64.to_le_bytes());
    }
    for o in [0x20, 0x28] {
        elf[ph + o..ph + o + 8].copy_from_slice(&16u64.to_le_bytes());
    }
    let nonote = dir.join("nonote.elf");
    std::fs::write(&nonote, &elf).unwrap();
    let nonote = nonote.display().to_string();
    let pvh = kernels::path("testkernel-pvh.elf");
    let long = "x".repeat(4096);
    for (args, want) in [
        (
            vec!["-kernel", nonote.as_str()],
            format!("-kernel {nonote}: an ELF kernel without a PVH note"),
        ),
        (
            vec!["-kernel", pvh.as_str(), "-append", long.as_str()],
            "-append: the command line is 4096 bytes".to_string(),
        ),
    ] {
        let mut all = vec![
            "-machine",
            "pc,accel=qtest",
            // The machine is built before the protocol starts: stdin is
            // never read.
            "-qtest",
            "stdio",
            "-bios",
            BIOS,
        ];
        all.extend(args);
        let (code, _, err) = run_strata(&all, TIMEOUT);
        assert_eq!(code, Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(&want), "{err}");
    }
}

fn boot_report(args: &[&str], name: &str) -> (String, String) {
    let dir = scratch(name);
    let com1 = dir.join("com1.log");
    let serial = format!("file:{}", com1.display());
    let debug = dir.join("debug.log");
    let dbg = format!("file:{}", debug.display());
    let mut all = vec![
        "-m",
        "128",
        "-nodefaults",
        "-serial",
        &serial,
        "-debugcon",
        &dbg,
        "-global",
        "isa-debugcon.iobase=0x402",
    ];
    all.extend_from_slice(args);
    let out = run_until_marker(&all, &com1, "TK DONE", TIMEOUT);
    let log = String::from_utf8_lossy(&std::fs::read(&debug).unwrap()).into_owned();
    (out, log)
}

/// The e820 lines are SeaBIOS's map: low RAM ends at the EBDA, and RAM
/// from 1 MiB runs to (below) 128 MiB, the top kept for SeaBIOS's tables.
fn check_seabios_e820(out: &str) {
    let e820: Vec<&str> = out
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter_map(|l| l.strip_prefix("TK e820 "))
        .collect();
    assert!(e820.contains(&"0x0 0x9fc00 1"), "{out}");
    assert!(
        e820.iter()
            .any(|l| l.starts_with("0x100000 0x7") && l.ends_with(" 1")),
        "{out}"
    );
}

/// Boots the test kernel `kernel` through SeaBIOS (`-bios`), which runs
/// the option ROM `rom`, with `rd` as the initrd; checks that SeaBIOS
/// looked up the ROM's boot entry and that the kernel got exactly the
/// command line (no kernel-name prefix) and the initrd. Returns its report.
fn firmware_boot_with_initrd(name: &str, kernel: &str, rom: &str, rd: &[u8]) -> String {
    let rdp = scratch(&format!("{name}-rd")).join("rd.bin");
    std::fs::write(&rdp, rd).unwrap();
    let k = kernels::path(kernel);
    let (out, log) = boot_report(
        &[
            "-bios",
            BIOS,
            "-kernel",
            &k,
            "-initrd",
            &rdp.display().to_string(),
            "-append",
            APPEND,
        ],
        name,
    );
    assert!(
        log.contains(&format!("Searching bootorder for: /rom@genroms/{rom}")),
        "{log}"
    );
    assert_eq!(line(&out, "TK cmdline="), APPEND);
    assert_eq!(
        line(&out, "TK initrd "),
        format!("size={} fnv={:#x}", rd.len(), kernels::fnv(rd))
    );
    out
}

#[test]
fn bzimage_boots_through_seabios_and_linuxboot_rom() {
    if !kvm_available("bzimage_boots_through_seabios_and_linuxboot_rom") {
        return;
    }
    require_bios();
    let rd: Vec<u8> = (0..3001u32).map(|i| (i * 7 + 3) as u8).collect();
    let out =
        firmware_boot_with_initrd("fwboot-bz", "testkernel.bzImage", "linuxboot_dma.bin", &rd);
    // The real-mode setup ran and took the 32-bit entry.
    assert_eq!(line(&out, "TK proto="), "linux32 magic=0x0");
    check_seabios_e820(&out);
    // SeaBIOS installed Strata's ACPI tables; the kernel finds the RSDP.
    assert!(!line(&out, "TK rsdp given=0x0 found=").starts_with("0x0"));
}

#[test]
fn multiboot_boots_through_seabios_with_boot_menu() {
    if !kvm_available("multiboot_boots_through_seabios_with_boot_menu") {
        return;
    }
    require_bios();
    let dir = scratch("fwboot-mb-rd");
    let m: Vec<u8> = (0..777u32).map(|i| (i * 13 + 1) as u8).collect();
    let mp = dir.join("mod.bin");
    std::fs::write(&mp, &m).unwrap();
    let module = format!("{} arg1 arg2", mp.display());
    let k = kernels::path("testkernel-mb.elf");
    let (out, log) = boot_report(
        &[
            "-boot",
            "menu=on,splash-time=0",
            "-kernel",
            &k,
            "-initrd",
            &module,
            "-append",
            APPEND,
        ],
        "fwboot-mb",
    );
    assert!(log.contains("/rom@genroms/multiboot_dma.bin"), "{log}");
    assert_eq!(line(&out, "TK proto="), "multiboot magic=0x2badb002");
    assert_eq!(line(&out, "TK cmdline="), format!("{k} {APPEND}"));
    assert_eq!(
        line(&out, "TK module "),
        format!(
            "size={} fnv={:#x} cmdline={module}",
            m.len(),
            kernels::fnv(&m)
        )
    );
    check_seabios_e820(&out);
}

#[test]
fn pvh_elf_boots_through_seabios_and_pvh_rom() {
    if !kvm_available("pvh_elf_boots_through_seabios_and_pvh_rom") {
        return;
    }
    require_bios();
    let rd: Vec<u8> = (0..2345u32).map(|i| (i * 11 + 9) as u8).collect();
    let out = firmware_boot_with_initrd("fwboot-pvh", "testkernel-pvh.elf", "pvh.bin", &rd);
    assert_eq!(line(&out, "TK proto="), "pvh magic=0x0");
    check_seabios_e820(&out);
    // pvh.bin found SeaBIOS's RSDP (Strata's tables) and passed it on.
    let rsdp = line(&out, "TK rsdp given=");
    let (given, found) = rsdp.split_once(" found=").unwrap();
    assert_ne!(given, "0x0", "{out}");
    assert_eq!(given, found, "{out}");
}
