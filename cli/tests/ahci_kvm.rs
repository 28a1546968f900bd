//! AHCI under KVM with a real driver: the project's Linux test guest finds
//! `-device ahci` (Linux's `ahci`/libahci: HBA reset, COMRESET, the
//! device signature, IDENTIFY by PIO Setup, SET FEATURES, DMA reads and
//! writes), sees the disk on the port it was put on, and its /init writes
//! and reads back a pattern with O_DIRECT (`rwloop=`), compared in the
//! guest and then byte for byte in the image.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::{kernels, kvm_available, scratch};

const DISK: u64 = 16 << 20;
const ROUND_KIB: u64 = 1024;
const ROUNDS: u64 = 3;
const TIMEOUT: Duration = Duration::from_secs(240);

#[test]
fn linux_reads_and_writes_a_disk_on_an_ahci_port() {
    if !kvm_available("linux_reads_and_writes_a_disk_on_an_ahci_port") {
        return;
    }
    let dir = scratch("ahci-guest");
    let img = dir.join("disk.raw");
    std::fs::File::create(&img).unwrap().set_len(DISK).unwrap();
    let log = dir.join("serial.log");
    let append = format!(
        "{} acpi=off rwloop=sda:{ROUND_KIB}:{ROUNDS}",
        kernels::LINUX_CMDLINE
    );
    let drive = format!("if=none,id=d0,file={},format=raw", img.display());
    let mut vm = Command::new(support::strata_bin())
        .args(kernels::linux_args("vmlinux", &log, &append))
        .args(["-device", "ahci,id=sata", "-drive", &drive])
        .args(["-device", "ide-hd,bus=sata.2,drive=d0"])
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
    // The HBA as Linux reports it, the link up on the third port only.
    assert!(
        out.contains("AHCI 0001.0300 32 slots 6 ports 1.5 Gbps 0x3f impl SATA mode"),
        "{out}"
    );
    assert!(out.contains("ata3: SATA link up 1.5 Gbps"), "{out}");
    assert!(out.contains("ata1: SATA link down"), "{out}");
    assert!(out.contains("[sda] 32768 512-byte logical blocks"), "{out}");
    assert_eq!(kernels::rwloop_rounds(&out, "sda"), ROUNDS, "{out}");
    // The image holds the last round, every byte of it.
    kernels::assert_rwloop_image(&img, ROUND_KIB, ROUNDS);
}
