//! The `q35` machine under KVM with the project's Linux test guest, ACPI
//! on: the kernel routes PCI interrupts by Strata's q35 DSDT (`_PRT` to
//! GSI 16-23), finds the ECAM window by the MCFG, and its `ahci` driver
//! takes the built-in controller at 00:1f.2, where `-hda` and `-cdrom`
//! land as on QEMU's q35 (ports 0 and 2). The disk runs with NCQ (depth
//! 32): the guest reads both devices and checks what it read, then writes
//! and reads back a pattern on the disk, checked again in the image.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::{kernels, kvm_available, scratch};

const TIMEOUT: Duration = Duration::from_secs(240);
const ROUND_KIB: u64 = 512;
const ROUNDS: u64 = 2;

#[test]
fn linux_on_q35_uses_the_builtin_ahci_with_ncq() {
    if !kvm_available("linux_on_q35_uses_the_builtin_ahci_with_ncq") {
        return;
    }
    let dir = scratch("q35-guest");
    let disk = dir.join("disk.raw");
    let cd = dir.join("cd.iso");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    // A CD whose first sectors are a known pattern (any multiple of 2048
    // bytes is a medium for sr).
    let cd_data: Vec<u8> = (0..1u32 << 18)
        .flat_map(|i| (i * 7).to_le_bytes())
        .collect();
    std::fs::write(&cd, &cd_data).unwrap();
    let cd_sum = kernels::fnv1a64(&cd_data[..128 << 10]);
    let log = dir.join("serial.log");
    let append = format!(
        "{} check=sr0:256 show=/sys/block/sda/device/queue_depth \
         rwloop=sda:{ROUND_KIB}:{ROUNDS}",
        kernels::LINUX_CMDLINE
    );
    let mut vm = Command::new(support::strata_bin())
        .args(kernels::linux_args("vmlinux", &log, &append))
        .args(["-M", "q35"])
        .args([
            "-drive",
            &format!("file={},format=raw,index=0", disk.display()),
        ])
        .args(["-cdrom", &cd.display().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn strata");
    let out = kernels::wait_guest_done(&mut vm, &log, TIMEOUT, |_| {});
    let _ = vm.kill();
    let stderr = vm.wait_with_output().map(|o| o.stderr).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&stderr);
    assert!(!out.contains("GUEST-ERR"), "{out}\nstrata: {stderr}");
    assert!(out.contains("ACPI: MCFG"), "{out}");
    assert!(
        out.contains("ahci 0000:00:1f.2: AHCI 0001.0300 32 slots 6 ports"),
        "{out}"
    );
    assert!(out.contains("ata1: SATA link up 1.5 Gbps"), "{out}");
    assert!(out.contains("ata3: SATA link up 1.5 Gbps"), "{out}");
    assert!(out.contains("NCQ (depth 32)"), "{out}");
    let depth = out.lines().find_map(|l| {
        l.trim()
            .strip_prefix("GUEST-SHOW /sys/block/sda/device/queue_depth ")
    });
    assert_eq!(depth, Some("32"), "{out}");
    let sum = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("GUEST-SUM sr0 "));
    assert_eq!(sum, Some(format!("{cd_sum:016x}").as_str()), "{out}");
    assert_eq!(kernels::rwloop_rounds(&out, "sda"), ROUNDS, "{out}");
    kernels::assert_rwloop_image(&disk, ROUND_KIB, ROUNDS);
}

/// With `acpi=off` the kernel finds the IOAPIC and the PCI interrupt
/// routing in Strata's q35 MP table (PCI INTx on inputs 16-23): the AHCI's
/// interrupt reaches it, and it reads the disk.
#[test]
fn linux_on_q35_with_acpi_off_routes_by_the_mp_table() {
    if !kvm_available("linux_on_q35_with_acpi_off_routes_by_the_mp_table") {
        return;
    }
    let dir = scratch("q35-guest-mptable");
    let disk = dir.join("disk.raw");
    let data: Vec<u8> = (0..1u32 << 20)
        .flat_map(|i| (i ^ 0x5a5a).to_le_bytes())
        .collect();
    std::fs::write(&disk, &data).unwrap();
    let sum = kernels::fnv1a64(&data[..128 << 10]);
    let log = dir.join("serial.log");
    let append = format!(
        "{} acpi=off pci=nomsi check=sda:256",
        kernels::LINUX_CMDLINE
    );
    let mut vm = Command::new(support::strata_bin())
        .args(kernels::linux_args("vmlinux", &log, &append))
        .args(["-M", "q35"])
        .args([
            "-drive",
            &format!("file={},format=raw,if=ide", disk.display()),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn strata");
    let out = kernels::wait_guest_done(&mut vm, &log, TIMEOUT, |_| {});
    let _ = vm.kill();
    let _ = vm.wait();
    assert!(!out.contains("GUEST-ERR"), "{out}");
    let got = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("GUEST-SUM sda "));
    assert_eq!(got, Some(format!("{sum:016x}").as_str()), "{out}");
}
