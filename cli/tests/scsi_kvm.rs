//! Booting from SCSI under KVM with SeaBIOS: the project's boot program
//! (images/ide/bootsect.S, 256 sectors read through INT 13h and checked)
//! from a `scsi-hd` on virtio-scsi-pci and from `-drive if=scsi` on an
//! LSI 53C895A (SeaBIOS's virtio-scsi and lsi-scsi drivers, the shared
//! SCSI target emulation behind both), and GRUB's rescue CD from a
//! `scsi-cd` on virtio-scsi. Each test skips loudly when /dev/kvm is unusable.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{boot_until, image, kvm_available, require_bios, scratch};

const TIMEOUT: Duration = Duration::from_secs(180);
const GRUB_TIMEOUT: Duration = Duration::from_secs(400);
const GRUB_ISO: &str = "/usr/lib/grub-rescue/grub-rescue-cdrom.iso";

fn skip(name: &str) -> bool {
    if !kvm_available(name) {
        return true;
    }
    require_bios();
    false
}

/// A private copy of the project's boot disk (images in use are locked).
fn boot_disk(dir: &Path) -> String {
    let dst = dir.join("disk.img");
    std::fs::copy(image("ide-disk.img"), &dst).unwrap();
    dst.display().to_string()
}

#[test]
fn seabios_boots_a_scsi_hd_on_virtio_scsi() {
    if skip("seabios_boots_a_scsi_hd_on_virtio_scsi") {
        return;
    }
    let dir = scratch("scsi-kvm-virtio-hd");
    let drive = format!("file={},format=raw,if=none,id=d0", boot_disk(&dir));
    let out = boot_until(
        &dir,
        &[
            "-device",
            "virtio-scsi-pci,id=hba",
            "-drive",
            &drive,
            "-device",
            "scsi-hd,drive=d0,bus=hba.0,scsi-id=3,lun=0",
        ],
        &["STRATA-BOOT-OK", "STRATA-BOOT-FAIL", "No bootable device"],
        TIMEOUT,
    );
    assert!(out.contains("STRATA-BOOT-OK"), "{out}");
}

#[test]
fn grub_rescue_cdrom_boots_from_a_scsi_cd_on_virtio_scsi() {
    if skip("grub_rescue_cdrom_boots_from_a_scsi_cd_on_virtio_scsi") {
        return;
    }
    let dir = scratch("scsi-kvm-virtio-cd");
    let drive = format!("file={GRUB_ISO},format=raw,if=none,id=c0,media=cdrom,readonly=on");
    let out = boot_until(
        &dir,
        &[
            "-device",
            "virtio-scsi-pci",
            "-drive",
            &drive,
            "-device",
            "scsi-cd,drive=c0,bootindex=0",
        ],
        &["GNU GRUB", "grub>", "No bootable device"],
        GRUB_TIMEOUT,
    );
    assert!(out.contains("Welcome to GRUB"), "{out}");
}

/// QEMU 7.2's way: `-device lsi53c895a` takes the `-drive if=scsi`
/// drives of its bus (the PC board makes no HBA for them by itself).
#[test]
fn seabios_boots_drive_if_scsi_on_an_lsi53c895a() {
    if skip("seabios_boots_drive_if_scsi_on_an_lsi53c895a") {
        return;
    }
    let dir = scratch("scsi-kvm-lsi-hd");
    let drive = format!("file={},format=raw,if=scsi", boot_disk(&dir));
    let out = boot_until(
        &dir,
        &["-device", "lsi53c895a", "-drive", &drive],
        &["STRATA-BOOT-OK", "STRATA-BOOT-FAIL", "No bootable device"],
        TIMEOUT,
    );
    assert!(out.contains("STRATA-BOOT-OK"), "{out}");
}
