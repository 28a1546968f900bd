//! SeaBIOS boots from virtio-blk-pci under KVM: modern
//! (`disable-legacy=on`), transitional (the `pc` default) and legacy-only
//! (`disable-modern=on`), and `bootindex` picks the disk. The boot sector
//! (images/virtio/bootsect.S) reads two sectors through INT 13h and prints
//! a marker on COM1 (SeaBIOS's serial console may interleave its own
//! output with the first character, so tests match "BOOT-OK"). Each test skips loudly when /dev/kvm is unusable.

mod support;

use std::time::Duration;

use support::bootdisk::disk;
use support::{kvm_available, require_bios, run_until, scratch};

const TIMEOUT: Duration = Duration::from_secs(120);

fn boot(test: &str, dev_opts: &str) {
    boot_device(
        test,
        &format!("virtio-blk-pci,drive=d0,bootindex=1{dev_opts}"),
    );
}

/// SeaBIOS boots from the disk of drive `d0` behind `-device dev`.
fn boot_device(test: &str, dev: &str) {
    if !kvm_available(test) {
        return;
    }
    require_bios();
    let dir = scratch(test);
    let img = disk(&dir, "disk.raw", true);
    let log = dir.join("serial.log");
    let serial = format!("file:{}", log.display());
    let drive = format!("file={},if=none,id=d0,format=raw", img.display());
    let out = run_until(
        &[
            "-m",
            "128",
            "-nodefaults",
            "-serial",
            &serial,
            "-drive",
            &drive,
            "-device",
            dev,
        ],
        &log,
        "VIRTIO-BOOT-OK or -BAD",
        |t| t.contains("BOOT-OK") || t.contains("BOOT-BAD"),
        TIMEOUT,
    );
    assert!(out.contains("BOOT-OK"), "{out}");
    assert!(out.contains("Booting from Hard Disk"), "{out}");
}

/// The line libvirt writes for a virtio disk (QEMU 7.2 era): `scsi=off`,
/// `bus=pci.0`, a hex `addr`, `id`, `bootindex`, `write-cache=off`.
#[test]
fn seabios_boots_libvirts_virtio_blk_line() {
    boot_device(
        "kvm-vblk-libvirt",
        "virtio-blk-pci,scsi=off,bus=pci.0,addr=0x5,drive=d0,id=virtio-disk0,bootindex=1,write-cache=off",
    );
}

#[test]
fn seabios_boots_modern_virtio_blk() {
    boot("kvm-vblk-modern", ",disable-legacy=on");
}

#[test]
fn seabios_boots_transitional_virtio_blk() {
    boot("kvm-vblk-transitional", "");
}

#[test]
fn seabios_boots_legacy_only_virtio_blk() {
    boot("kvm-vblk-legacy", ",disable-modern=on");
}

/// Two bootable disks: without bootindex SeaBIOS would take the lower
/// slot (the bad one); bootindex=1 on the higher slot wins.
#[test]
fn bootindex_selects_the_virtio_disk() {
    let test = "kvm-vblk-bootindex";
    if !kvm_available(test) {
        return;
    }
    require_bios();
    let dir = scratch(test);
    let bad = disk(&dir, "bad.raw", false);
    let good = disk(&dir, "good.raw", true);
    let log = dir.join("serial.log");
    let serial = format!("file:{}", log.display());
    let d0 = format!("file={},if=none,id=d0,format=raw", bad.display());
    let d1 = format!("file={},if=none,id=d1,format=raw", good.display());
    let out = run_until(
        &[
            "-m",
            "128",
            "-nodefaults",
            "-serial",
            &serial,
            "-drive",
            &d0,
            "-drive",
            &d1,
            "-device",
            "virtio-blk-pci,drive=d0,addr=4,bootindex=2",
            "-device",
            "virtio-blk-pci,drive=d1,addr=6,bootindex=1",
        ],
        &log,
        "VIRTIO-BOOT-OK or -BAD",
        |t| t.contains("BOOT-OK") || t.contains("BOOT-BAD"),
        TIMEOUT,
    );
    assert!(out.contains("BOOT-OK"), "{out}");
}
