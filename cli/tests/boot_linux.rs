//! The project's Linux test guest (../shared/guest, see its README) booted
//! directly under KVM, with no disk: the PVH `vmlinux` and the `bzImage`,
//! each with the tiny initramfs, must reach `GUEST-DONE` on COM1. The
//! kernel has ACPI off, so it also proves the MP table: it must find it and
//! switch to the IOAPIC. The PVH `vmlinux` also boots through SeaBIOS
//! (`-bios`, QEMU's pvh.bin option ROM).

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::{kvm_available, require_bios, run_until_marker, scratch, BIOS};

/// The README's command line, without `waitdev=` (there is no disk).
const CMDLINE: &str = "console=ttyS0 lpj=1000000 tsc=reliable no_timer_check \
clearcpuid=xsave,smap,fsgsbase,rdrand,rdseed,popcnt,invpcid,pcid,rdpid,erms,fsrm \
nofreepoison rodata=off";
/// A boot takes 70-110 s alone on this kind of host (the bzImage's
/// real-mode setup and decompression run slowly under its KVM); three boots
/// share 2 cores, and other test binaries may run beside them.
const TIMEOUT: Duration = Duration::from_secs(360);

fn guest(file: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/guest")
        .join(file);
    let p = if p.exists() {
        p
    } else {
        PathBuf::from("/work/shared/guest").join(file)
    };
    assert!(
        p.exists(),
        "{} is missing (the shared Linux test guest)",
        p.display()
    );
    p.display().to_string()
}

fn boot(kernel: &str, extra: &str, name: &str) -> String {
    boot_with(&[], kernel, extra, name)
}

fn boot_with(args: &[&str], kernel: &str, extra: &str, name: &str) -> String {
    let dir = scratch(name);
    let log = dir.join("serial.log");
    let serial = format!("file:{}", log.display());
    let k = guest(kernel);
    let rd = guest("initramfs-tiny.cpio");
    let append = format!("{CMDLINE}{extra}");
    let mut all = vec![
        "-m",
        "64",
        "-nodefaults",
        "-serial",
        &serial,
        "-kernel",
        &k,
        "-initrd",
        &rd,
        "-append",
        &append,
    ];
    all.extend_from_slice(args);
    run_until_marker(&all, &log, "GUEST-DONE", TIMEOUT)
}

#[test]
fn linux_pvh_vmlinux_reaches_guest_done() {
    if !kvm_available("linux_pvh_vmlinux_reaches_guest_done") {
        return;
    }
    let out = boot("vmlinux", "", "linux-pvh");
    assert!(out.contains("GUEST-INIT"), "{out}");
    assert!(
        out.contains("found SMP MP-table at [mem 0x000f0000"),
        "{out}"
    );
    assert!(out.contains("MPTABLE: OEM ID: STRATA"), "{out}");
    assert!(
        out.contains("IOAPIC[0]: apic_id 1, version 17, address 0xfec00000, GSI 0-23"),
        "{out}"
    );
    assert!(out.contains("Switch to symmetric I/O mode"), "{out}");
    // The initramfs arrived whole: /init ran and found its command line.
    assert!(
        out.contains("Command line: console=ttyS0 lpj=1000000"),
        "{out}"
    );
}

#[test]
fn linux_bzimage_reaches_guest_done() {
    if !kvm_available("linux_bzimage_reaches_guest_done") {
        return;
    }
    let out = boot("bzImage", " quiet", "linux-bz");
    assert!(out.contains("GUEST-INIT"), "{out}");
}

#[test]
fn linux_pvh_vmlinux_through_seabios_reaches_guest_done() {
    if !kvm_available("linux_pvh_vmlinux_through_seabios_reaches_guest_done") {
        return;
    }
    require_bios();
    let out = boot_with(&["-bios", BIOS], "vmlinux", "", "linux-pvh-seabios");
    // SeaBIOS ran (its e820 map ends low RAM at its own EBDA) and pvh.bin
    // passed the command line and the initramfs.
    assert!(
        out.contains("BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved"),
        "{out}"
    );
    assert!(
        out.contains("Command line: console=ttyS0 lpj=1000000"),
        "{out}"
    );
    assert!(out.contains("GUEST-INIT"), "{out}");
}
