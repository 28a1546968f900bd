//! The vCPU run loop against project-built firmware (images/tinybios):
//! triple faults reset the machine, and an instruction the host's KVM
//! cannot emulate ends Strata with a register report, never a hang; string
//! port I/O (`rep ins/outs`) is split into one access per element.

mod support;

use std::time::Duration;

use support::{image, kvm_available, run_strata, run_until, scratch};

#[test]
fn triple_fault_with_no_reboot_exits_zero() {
    if !kvm_available("triple_fault_with_no_reboot_exits_zero") {
        return;
    }
    let bios = image("tinybios-triple.bin");
    let (code, out, err) = run_strata(
        &[
            "-bios",
            bios.to_str().unwrap(),
            "-nodefaults",
            "-serial",
            "stdio",
            "-no-reboot",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(0), "stdout {out}\nstderr {err}");
    assert_eq!(out.matches("TINYBIOS triple").count(), 1, "{out}");
}

#[test]
fn triple_fault_restarts_the_machine() {
    if !kvm_available("triple_fault_restarts_the_machine") {
        return;
    }
    let bios = image("tinybios-triple.bin");
    let log = scratch("triple").join("serial.log");
    let serial = format!("file:{}", log.display());
    run_until(
        &[
            "-bios",
            bios.to_str().unwrap(),
            "-nodefaults",
            "-serial",
            &serial,
        ],
        &log,
        "three boots",
        |t| t.matches("TINYBIOS triple").count() >= 3,
        Duration::from_secs(60),
    );
}

#[test]
fn emulation_failure_is_reported_with_registers() {
    if !kvm_available("emulation_failure_is_reported_with_registers") {
        return;
    }
    let bios = image("tinybios-fpu.bin");
    let (code, out, err) = run_strata(
        &[
            "-bios",
            bios.to_str().unwrap(),
            "-nodefaults",
            "-serial",
            "stdio",
        ],
        Duration::from_secs(60),
    );
    assert!(out.contains("TINYBIOS fpu"), "{out}");
    if out.contains("FPU-OK") {
        // A host whose KVM runs x87 code in ring 0 (hardware virtualisation).
        eprintln!(
            "note: this host's KVM emulated fwait/fninit; the failure path was not exercised"
        );
        assert_eq!(
            code, None,
            "the guest halts and strata keeps running until killed"
        );
        return;
    }
    assert_eq!(code, Some(1), "stderr: {err}");
    assert!(
        err.starts_with("strata: vCPU 0: KVM internal error (emulation failure"),
        "{err}"
    );
    assert!(
        err.contains("RIP=") && err.contains("RFLAGS=") && err.contains("RAX="),
        "{err}"
    );
    // The code bytes at RIP are the fwait; fninit that failed.
    assert!(err.contains("code at RIP: 9b db e3"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn string_port_io_is_one_access_per_element() {
    if !kvm_available("string_port_io_is_one_access_per_element") {
        return;
    }
    let bios = image("tinybios-rep.bin");
    let log = scratch("rep").join("serial.log");
    let serial = format!("file:{}", log.display());
    let out = run_until(
        &[
            "-bios",
            bios.to_str().unwrap(),
            "-nodefaults",
            "-serial",
            &serial,
        ],
        &log,
        "the REP-IN line",
        |t| {
            t.contains("REP-IN ")
                && t.trim_end().ends_with(|c: char| c.is_ascii_hexdigit())
                && t.ends_with('\n')
        },
        Duration::from_secs(60),
    );
    // `rep outsb` of 9 bytes to the UART data port sends all of them...
    assert!(out.contains("REP-OUT\r\n"), "{out:?}");
    // ...and `rep insb` of 4 bytes from CMOS register D reads it 4 times.
    assert!(out.contains("REP-IN 80808080"), "{out:?}");
}
