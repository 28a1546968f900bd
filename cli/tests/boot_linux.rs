//! The project's Linux test guest (images/linux-kernel, built from
//! Debian's linux-source-6.1) booted directly under KVM, with no disk: the
//! PVH `vmlinux` and the `bzImage`, each with the project's tiny
//! initramfs, must reach `GUEST-DONE` on COM1. With `acpi=off` it proves
//! the MP table: the kernel must find it and switch to the IOAPIC (the
//! other boots take `acpi=off` too, for speed). With ACPI it proves the
//! tables and the PIIX4 power management: `system_powerdown` presses the
//! power button that init (standing in for logind/acpid) answers with a
//! power-off. The PVH `vmlinux` also boots through SeaBIOS (`-bios`,
//! QEMU's pvh.bin option ROM).

mod support;

use std::time::Duration;

use serde_json::json;
use support::qmp::Qmp;

use support::{kernels, kvm_available, require_bios, run_until_marker, scratch, BIOS};

const CMDLINE: &str = kernels::LINUX_CMDLINE;
/// A boot takes 70-110 s alone on this kind of host (the bzImage's
/// real-mode setup and decompression run slowly under its KVM); three boots
/// share 2 cores, and other test binaries may run beside them.
const TIMEOUT: Duration = Duration::from_secs(360);

fn boot(kernel: &str, extra: &str, name: &str) -> String {
    boot_with(&[], kernel, extra, name)
}

fn boot_with(args: &[&str], kernel: &str, extra: &str, name: &str) -> String {
    let dir = scratch(name);
    let log = dir.join("serial.log");
    let append = format!("{CMDLINE}{extra}");
    let mut all = kernels::linux_args(kernel, &log, &append);
    all.extend(args.iter().map(|a| a.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    run_until_marker(&all, &log, "GUEST-DONE", TIMEOUT)
}

#[test]
fn linux_pvh_vmlinux_reaches_guest_done() {
    if !kvm_available("linux_pvh_vmlinux_reaches_guest_done") {
        return;
    }
    let out = boot("vmlinux", " acpi=off", "linux-pvh");
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
    let out = boot("bzImage", " quiet acpi=off", "linux-bz");
    assert!(out.contains("GUEST-INIT"), "{out}");
}

#[test]
fn linux_pvh_vmlinux_through_seabios_reaches_guest_done() {
    if !kvm_available("linux_pvh_vmlinux_through_seabios_reaches_guest_done") {
        return;
    }
    require_bios();
    let out = boot_with(
        &["-bios", BIOS],
        "vmlinux",
        " acpi=off",
        "linux-pvh-seabios",
    );
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

/// The kernel's ACPI and `system_powerdown`: the kernel reads Strata's
/// tables (RSDP, FADT, MADT, DSDT); the power button is the PIIX4's fixed
/// event, which the kernel turns into a KEY_POWER input event; init (as
/// logind or acpid would) powers off, through the FADT's PM1a control
/// block with the DSDT's `\_S5` sleep type; strata ends with SHUTDOWN
/// `guest-shutdown` and exit status 0. (One boot: ACPI costs this kernel
/// about 20 s of boot here.)
#[test]
fn system_powerdown_powers_off_a_linux_guest() {
    if !kvm_available("system_powerdown_powers_off_a_linux_guest") {
        return;
    }
    let dir = scratch("linux-powerdown");
    let log = dir.join("serial.log");
    let sock = dir.join("qmp.sock");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let append = format!("{CMDLINE} powerbutton");
    let mut child = std::process::Command::new(support::strata_bin())
        .args(kernels::linux_args("vmlinux", &log, &append))
        .args(["-qmp", &qmp])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn strata");
    let mut q = Qmp::negotiated(&sock);
    let start = std::time::Instant::now();
    let out = loop {
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        if out.contains("GUEST-POWERBUTTON-READY") {
            break out;
        }
        let gone = child.try_wait().unwrap();
        if gone.is_some() || out.contains("GUEST-ERR") || start.elapsed() > TIMEOUT {
            let _ = child.kill();
            panic!("init did not get to wait for the power button ({gone:?}):\n{out}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!out.contains("GUEST-DONE"), "{out}");
    q.ok("system_powerdown", json!({}));
    q.event("POWERDOWN");
    let e = q.event("SHUTDOWN");
    assert_eq!(
        e["data"],
        json!({"guest": true, "reason": "guest-shutdown"})
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("strata did not exit after the guest powered off");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        out.lines().any(|l| l.trim() == "GUEST-POWERBUTTON"),
        "{out}"
    );
    assert!(out.contains("GUEST-DONE"), "{out}");
}
