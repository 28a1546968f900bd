//! Booting from USB mass storage under KVM with SeaBIOS (bios-256k.bin,
//! whose xHCI driver the plain bios.bin lacks): the project's boot
//! program (images/ide/bootsect.S, 256 sectors read through INT 13h and
//! checked) from a `usb-storage` on the PIIX3 UHCI that `-usb` adds
//! (SeaBIOS's usb-uhci and usb-msc drivers over Strata's UHCI frame
//! clock and Bulk-Only Transport) and on `qemu-xhci` and `nec-usb-xhci`
//! (SeaBIOS's usb-xhci driver: rings, slots, MSI-less interrupts by
//! polling), and GRUB's rescue USB image
//! (`grub-rescue-usb.img`) as a USB stick. Each test skips loudly when
//! /dev/kvm is unusable.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{boot_until, image, kvm_available, require_bios, scratch};

const TIMEOUT: Duration = Duration::from_secs(180);
const GRUB_TIMEOUT: Duration = Duration::from_secs(400);
const GRUB_USB: &str = "/usr/lib/grub-rescue/grub-rescue-usb.img";

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
fn seabios_boots_usb_storage_on_uhci() {
    if skip("seabios_boots_usb_storage_on_uhci") {
        return;
    }
    let dir = scratch("usb-kvm-uhci");
    let drive = format!("file={},format=raw,if=none,id=stick", boot_disk(&dir));
    let out = boot_until(
        &dir,
        &[
            "-usb",
            "-drive",
            &drive,
            "-device",
            "usb-storage,drive=stick,bootindex=0",
        ],
        &["STRATA-BOOT-OK", "STRATA-BOOT-FAIL", "No bootable device"],
        TIMEOUT,
    );
    assert!(out.contains("STRATA-BOOT-OK"), "{out}");
}

fn boot_on_xhci(name: &str, model: &str) {
    if skip(name) {
        return;
    }
    let dir = scratch(name);
    let drive = format!("file={},format=raw,if=none,id=stick", boot_disk(&dir));
    let hc = format!("{model},id=xhci");
    let out = boot_until(
        &dir,
        &[
            "-device",
            &hc,
            "-drive",
            &drive,
            "-device",
            "usb-storage,bus=xhci.0,port=2,drive=stick,bootindex=0",
        ],
        &["STRATA-BOOT-OK", "STRATA-BOOT-FAIL", "No bootable device"],
        TIMEOUT,
    );
    assert!(out.contains("STRATA-BOOT-OK"), "{out}");
}

#[test]
fn seabios_boots_usb_storage_on_qemu_xhci() {
    boot_on_xhci("seabios_boots_usb_storage_on_qemu_xhci", "qemu-xhci");
}

#[test]
fn seabios_boots_usb_storage_on_nec_xhci() {
    boot_on_xhci("seabios_boots_usb_storage_on_nec_xhci", "nec-usb-xhci");
}

/// q35's `-usb`: the ICH9 EHCI with its UHCI companions; the
/// high-speed usb-storage stays on the EHCI once SeaBIOS's usb-ehci
/// driver sets CONFIGFLAG.
#[test]
fn seabios_boots_usb_storage_on_q35_ehci() {
    if skip("seabios_boots_usb_storage_on_q35_ehci") {
        return;
    }
    let dir = scratch("usb-kvm-ehci");
    let drive = format!("file={},format=raw,if=none,id=stick", boot_disk(&dir));
    let out = boot_until(
        &dir,
        &[
            "-machine",
            "q35",
            "-usb",
            "-drive",
            &drive,
            "-device",
            "usb-storage,bus=usb-bus.0,drive=stick,bootindex=0",
        ],
        &["STRATA-BOOT-OK", "STRATA-BOOT-FAIL", "No bootable device"],
        TIMEOUT,
    );
    assert!(out.contains("STRATA-BOOT-OK"), "{out}");
}

#[test]
fn grub_rescue_usb_image_boots_from_usb_storage_on_uhci() {
    if skip("grub_rescue_usb_image_boots_from_usb_storage_on_uhci") {
        return;
    }
    let dir = scratch("usb-kvm-grub");
    let stick = dir.join("grub-usb.img");
    std::fs::copy(GRUB_USB, &stick).unwrap();
    let drive = format!("file={},format=raw,if=none,id=stick", stick.display());
    let out = boot_until(
        &dir,
        &[
            "-usb",
            "-drive",
            &drive,
            "-device",
            "usb-storage,drive=stick,bootindex=0",
        ],
        &["GNU GRUB", "grub>", "No bootable device"],
        GRUB_TIMEOUT,
    );
    assert!(out.contains("Welcome to GRUB"), "{out}");
}
