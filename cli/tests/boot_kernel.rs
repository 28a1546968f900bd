//! Direct kernel boot under KVM with the project's test kernel, in each of
//! its three forms (bzImage with the 64-bit entry, PVH ELF, multiboot): the
//! kernel reports on COM1 what it received, and each field is checked
//! against what was passed. Bad input (not a kernel, an initrd too big, a
//! command line too long) is checked without KVM, under qtest.

mod support;

use std::time::Duration;

use support::{kernels, kvm_available, run_strata, run_until_marker, scratch};
use vmm::boot::{e820, RSDP_ADDR};
use vmm::memory::Layout;

const TIMEOUT: Duration = Duration::from_secs(120);
const MEM: u64 = 128 << 20;
const APPEND: &str = "console=ttyS0 strata.test=1 quoted=\"a b\"";

/// Two initrd files with distinct, reproducible contents.
fn initrds(dir: &std::path::Path) -> (String, Vec<u8>, String, Vec<u8>) {
    let a: Vec<u8> = (0..3001u32).map(|i| (i * 7 + 3) as u8).collect();
    let b: Vec<u8> = (0..777u32).map(|i| (i * 13 + 1) as u8).collect();
    let pa = dir.join("initrd-a.bin");
    let pb = dir.join("initrd-b.bin");
    std::fs::write(&pa, &a).unwrap();
    std::fs::write(&pb, &b).unwrap();
    (pa.display().to_string(), a, pb.display().to_string(), b)
}

fn report(kernel: &str, name: &str) -> (String, String, Vec<u8>, Vec<u8>, String, String) {
    let dir = scratch(name);
    let (pa, a, pb, b) = initrds(&dir);
    let log = dir.join("serial.log");
    let serial = format!("file:{}", log.display());
    let k = kernels::path(kernel);
    let initrd = format!("{pa},{pb}");
    let out = run_until_marker(
        &[
            "-m",
            "128",
            "-nodefaults",
            "-serial",
            &serial,
            "-kernel",
            &k,
            "-initrd",
            &initrd,
            "-append",
            APPEND,
        ],
        &log,
        "TK DONE",
        TIMEOUT,
    );
    (out, k, a, b, pa, pb)
}

fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .map(|l| l.trim_end_matches('\r'))
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no '{prefix}' line in:\n{out}"))
}

fn expected_e820() -> Vec<String> {
    e820(&Layout::new(MEM))
        .iter()
        .map(|e| format!("TK e820 {:#x} {:#x} {}", e.addr, e.size, e.kind))
        .collect()
}

fn check_e820_and_rsdp(out: &str, given: u64) {
    let got: Vec<&str> = out
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| l.starts_with("TK e820 "))
        .collect();
    assert_eq!(got, expected_e820(), "{out}");
    assert_eq!(
        line(out, "TK rsdp given="),
        format!("{given:#x} found={RSDP_ADDR:#x}")
    );
}

/// The Linux initrd: both files, the first padded to 4 bytes.
fn concatenated(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut v = a.to_vec();
    v.resize(a.len().next_multiple_of(4), 0);
    v.extend_from_slice(b);
    v
}

#[test]
fn bzimage_64bit_entry_gets_zero_page() {
    if !kvm_available("bzimage_64bit_entry_gets_zero_page") {
        return;
    }
    let (out, _, a, b, _, _) = report("testkernel.bzImage", "boot-bz");
    assert!(out.starts_with('!'), "first instruction marker: {out}");
    assert_eq!(line(&out, "TK proto="), "linux64 magic=0x0");
    assert_eq!(line(&out, "TK cmdline="), APPEND);
    let rd = concatenated(&a, &b);
    assert_eq!(
        line(&out, "TK initrd "),
        format!("size={} fnv={:#x}", rd.len(), kernels::fnv(&rd))
    );
    check_e820_and_rsdp(&out, RSDP_ADDR);
}

#[test]
fn pvh_elf_gets_start_info() {
    if !kvm_available("pvh_elf_gets_start_info") {
        return;
    }
    let (out, _, a, b, _, _) = report("testkernel-pvh.elf", "boot-pvh");
    assert_eq!(line(&out, "TK proto="), "pvh magic=0x0");
    assert_eq!(line(&out, "TK cmdline="), APPEND);
    let rd = concatenated(&a, &b);
    assert_eq!(
        line(&out, "TK initrd "),
        format!("size={} fnv={:#x}", rd.len(), kernels::fnv(&rd))
    );
    check_e820_and_rsdp(&out, RSDP_ADDR);
}

#[test]
fn multiboot_gets_modules_and_mmap() {
    if !kvm_available("multiboot_gets_modules_and_mmap") {
        return;
    }
    let (out, k, a, b, pa, pb) = report("testkernel-mb.elf", "boot-mb");
    assert_eq!(line(&out, "TK proto="), "multiboot magic=0x2badb002");
    // As QEMU does: the kernel's file name, then -append.
    assert_eq!(line(&out, "TK cmdline="), format!("{k} {APPEND}"));
    let mods: Vec<&str> = out
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter_map(|l| l.strip_prefix("TK module "))
        .collect();
    assert_eq!(
        mods,
        vec![
            format!("size={} fnv={:#x} cmdline={pa}", a.len(), kernels::fnv(&a)),
            format!("size={} fnv={:#x} cmdline={pb}", b.len(), kernels::fnv(&b)),
        ]
    );
    // Multiboot v1 has no RSDP field: the kernel finds it by scanning.
    check_e820_and_rsdp(&out, 0);
}

/// Runs strata on the qtest accelerator (no KVM needed) and returns its
/// exit status and stderr.
fn fails(args: &[&str]) -> String {
    let mut all = vec!["-machine", "pc,accel=qtest", "-qtest", "stdio"];
    all.extend_from_slice(args);
    let (code, _, err) = run_strata(&all, Duration::from_secs(30));
    assert_eq!(code, Some(1), "{args:?} should fail; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one-line error expected: {err}");
    err
}

#[test]
fn bad_kernel_files_get_one_line_errors() {
    let dir = scratch("boot-bad");
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, vec![0x5au8; 4096]).unwrap();
    let j = junk.display().to_string();
    let e = fails(&["-kernel", &j]);
    assert!(e.contains(&format!("-kernel {j}: not a kernel")), "{e}");

    let empty = dir.join("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    let e = fails(&["-kernel", empty.to_str().unwrap()]);
    assert!(e.contains("not a kernel"), "{e}");

    // A truncated bzImage: the header is there, the payload is not whole.
    let bz = std::fs::read(kernels::path("testkernel.bzImage")).unwrap();
    let cut = dir.join("cut.bzImage");
    std::fs::write(&cut, &bz[..600]).unwrap();
    let e = fails(&["-kernel", cut.to_str().unwrap()]);
    assert!(e.contains("-kernel") && e.contains("cut.bzImage"), "{e}");

    // A multiboot header whose addresses point outside RAM.
    let mut mb = std::fs::read(kernels::path("testkernel-mb.elf")).unwrap();
    let off = (0..8192)
        .step_by(4)
        .find(|&o| mb[o..o + 4] == 0x1badb002u32.to_le_bytes())
        .unwrap();
    for (i, v) in [0xf000_0000u32, 0xf000_0000, 0, 0, 0xf000_0000]
        .iter()
        .enumerate()
    {
        mb[off + 12 + 4 * i..off + 16 + 4 * i].copy_from_slice(&v.to_le_bytes());
    }
    let bad = dir.join("bad-mb.elf");
    std::fs::write(&bad, &mb).unwrap();
    let e = fails(&["-kernel", bad.to_str().unwrap()]);
    assert!(e.contains("not in RAM"), "{e}");

    let e = fails(&["-kernel", "/nonexistent/vmlinuz"]);
    assert!(
        e.contains("-kernel /nonexistent/vmlinuz: no such file"),
        "{e}"
    );
    let e = fails(&["-initrd", &j]);
    assert!(e.contains("-initrd: only allowed with -kernel"), "{e}");
}

#[test]
fn cmdline_longer_than_cmdline_size() {
    // The test bzImage declares cmdline_size 2047.
    let long = "x".repeat(2048);
    let k = kernels::path("testkernel.bzImage");
    let e = fails(&["-kernel", &k, "-append", &long]);
    assert!(
        e.contains(
            "-append: the command line is 2048 bytes, longer than the kernel's cmdline_size (2047)"
        ),
        "{e}"
    );
}

#[test]
fn initrd_that_does_not_fit() {
    let dir = scratch("boot-bigrd");
    let big = dir.join("big.img");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(20 << 20).unwrap();
    let b = big.display().to_string();
    for k in ["testkernel.bzImage", "testkernel-pvh.elf"] {
        let k = kernels::path(k);
        let e = fails(&["-m", "16", "-kernel", &k, "-initrd", &b]);
        assert!(
            e.contains(&format!("-initrd {b}: 20971520 bytes do not fit")),
            "{e}"
        );
    }
    let e = fails(&[
        "-m",
        "16",
        "-kernel",
        &kernels::path("testkernel-mb.elf"),
        "-initrd",
        &b,
    ]);
    assert!(e.contains("does not fit in RAM"), "{e}");
    let e = fails(&[
        "-kernel",
        &kernels::path("testkernel.bzImage"),
        "-initrd",
        "/nonexistent/rd",
    ]);
    assert!(e.contains("-initrd /nonexistent/rd: No such file"), "{e}");
}

/// A tiny multiboot ELF linked with `ld -Ttext ADDR`, whose first LOAD
/// segment holds the ELF headers one page below ADDR. It prints
/// "MB-LOW-OK" on the debugcon port 0xe9 and halts.
fn tiny_multiboot(dir: &std::path::Path, text: &str) -> String {
    let src = dir.join("mb.S");
    std::fs::write(
        &src,
        "    .text\n    .align 4\n    .long 0x1badb002, 0, -0x1badb002\n\
         \x20   .globl _start\n_start:\n    mov $msg, %esi\n1:  lodsb\n\
         \x20   test %al, %al\n    jz 2f\n    out %al, $0xe9\n    jmp 1b\n\
         2:  cli\n    hlt\n    jmp 2b\n    .data\nmsg: .asciz \"MB-LOW-OK\\n\"\n",
    )
    .unwrap();
    let obj = dir.join("mb.o");
    let elf = dir.join(format!("mb-{text}.elf"));
    let run = |cmd: &str, args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(cmd).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(
        "as",
        &[
            "--32".as_ref(),
            "-o".as_ref(),
            obj.as_os_str(),
            src.as_os_str(),
        ],
    );
    run(
        "ld",
        &[
            "-m".as_ref(),
            "elf_i386".as_ref(),
            "-Ttext".as_ref(),
            text.as_ref(),
            "-e".as_ref(),
            "_start".as_ref(),
            "-o".as_ref(),
            elf.as_os_str(),
            obj.as_os_str(),
        ],
    );
    elf.display().to_string()
}

/// The first LOAD segment at 0xff000 (the ELF headers, in the BIOS area):
/// loaded as QEMU loads it, the headers' bytes skipped, the kernel runs.
#[test]
fn multiboot_elf_with_headers_below_1mib() {
    let dir = scratch("boot-mb-low");
    let elf = tiny_multiboot(&dir, "0x100000");
    let data = std::fs::read(&elf).unwrap();
    // The layout this test is about: program header 0 at 0xff000.
    let phoff = u32::from_le_bytes(data[28..32].try_into().unwrap()) as usize;
    let paddr = u32::from_le_bytes(data[phoff + 12..phoff + 16].try_into().unwrap());
    assert_eq!(paddr, 0xff000, "ld's layout changed");
    // A segment lower down, over this loader's own memory, is refused.
    let low = tiny_multiboot(&dir, "0x80000");
    let e = fails(&["-kernel", &low]);
    assert!(e.contains("not in RAM between 1 MiB"), "{e}");
    if !kvm_available("multiboot_elf_with_headers_below_1mib") {
        return;
    }
    let log = dir.join("debugcon.log");
    let dbg = format!("file:{}", log.display());
    let out = run_until_marker(
        &[
            "-nodefaults",
            "-display",
            "none",
            "-debugcon",
            &dbg,
            "-kernel",
            &elf,
        ],
        &log,
        "MB-LOW-OK",
        TIMEOUT,
    );
    assert!(out.contains("MB-LOW-OK"), "{out}");
}
