//! SeaBIOS on the KVM `pc` machine: banner, "No bootable device.", SMP
//! bring-up, RAM above 4 GiB in the firmware's e820 map, and `-no-reboot`.
//! Each test skips loudly when /dev/kvm is unusable.

mod support;

use std::time::Duration;

use support::{
    kvm_available, require_bios, run_strata, run_until, run_until_marker, scratch,
    until_seabios_log,
};

const TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn banner_then_no_bootable_device() {
    if !kvm_available("banner_then_no_bootable_device") {
        return;
    }
    require_bios();
    let dir = scratch("kvm-banner");
    let log = dir.join("serial.log");
    let serial = format!("file:{}", log.display());
    let out = run_until_marker(
        &["-m", "512", "-smp", "2", "-nodefaults", "-serial", &serial],
        &log,
        "No bootable device.",
        TIMEOUT,
    );
    let banner = out
        .find("SeaBIOS (version")
        .expect("SeaBIOS banner on COM1");
    assert!(banner < out.find("No bootable device.").unwrap());
}

#[test]
fn smp4_brought_up_by_seabios() {
    if !kvm_available("smp4_brought_up_by_seabios") {
        return;
    }
    require_bios();
    let out = until_seabios_log(
        "kvm-smp",
        &["-smp", "4", "-nodefaults"],
        "e820 map has",
        TIMEOUT,
    );
    assert!(
        out.contains("Found 4 cpu(s) max supported 4 cpu(s)"),
        "{out}"
    );
}

#[test]
fn ram_above_4g_in_firmware_e820() {
    if !kvm_available("ram_above_4g_in_firmware_e820") {
        return;
    }
    require_bios();
    let out = until_seabios_log(
        "kvm-6g",
        &["-m", "6G", "-nodefaults"],
        "No bootable device",
        TIMEOUT,
    );
    // SeaBIOS dumps its final e820 map; RAM from 4 GiB to 7 GiB must be in it.
    assert!(
        out.lines()
            .any(|l| l.contains("0000000100000000 - 00000001c0000000 = 1 RAM")),
        "no RAM above 4 GiB in:\n{out}"
    );
}

#[test]
fn no_reboot_exits_zero_on_guest_reset() {
    if !kvm_available("no_reboot_exits_zero_on_guest_reset") {
        return;
    }
    require_bios();
    // With reboot-timeout=0 SeaBIOS resets the machine right after
    // "No bootable device."; -no-reboot turns that reset into exit 0.
    let (code, stdout, stderr) = run_strata(
        &[
            "-nodefaults",
            "-serial",
            "stdio",
            "-no-reboot",
            "-boot",
            "reboot-timeout=0",
        ],
        TIMEOUT,
    );
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("No bootable device."), "{stdout}");
    // The reset can overtake the last bytes SeaBIOS prints.
    assert!(stdout.contains("Rebooting"), "{stdout}");
}

#[test]
fn reset_without_no_reboot_restarts_the_machine() {
    if !kvm_available("reset_without_no_reboot_restarts_the_machine") {
        return;
    }
    require_bios();
    let dir = scratch("kvm-reboot");
    let log = dir.join("serial.log");
    let serial = format!("file:{}", log.display());
    // The second life of the machine prints the banner again after the reset.
    let reborn = |t: &str| {
        t.find("Rebooting")
            .is_some_and(|i| t[i..].contains("SeaBIOS (version"))
    };
    run_until(
        &[
            "-nodefaults",
            "-serial",
            &serial,
            "-boot",
            "reboot-timeout=0",
        ],
        &log,
        "a second SeaBIOS banner after the reset",
        reborn,
        TIMEOUT,
    );
}
