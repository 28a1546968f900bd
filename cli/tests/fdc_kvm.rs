//! Floppy disks under KVM with SeaBIOS: `-fda` with the project's floppy
//! boot program (images/ide/bootsect.S built with FLOPPY=1), which reads
//! the whole 1.44 MB diskette back through INT 13h CHS reads (SeaBIOS's
//! floppy driver: the i82078 and ISA DMA) and checks every dword; and
//! GRUB's rescue floppy reaching its menu. Each test skips loudly when
//! /dev/kvm is unusable.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{boot_until, kvm_available, require_bios, scratch};

const TIMEOUT: Duration = Duration::from_secs(300);
const GRUB_FLOPPY: &str = "/usr/lib/grub-rescue/grub-rescue-floppy.img";

fn floppy_image() -> std::path::PathBuf {
    support::image("floppy.img")
}

fn boot(dir: &Path, args: &[&str], markers: &[&str]) -> String {
    // SeaBIOS waits for a floppy interrupt for 37 timer ticks. Here its
    // ring-0 code is emulated instruction by instruction, and on a loaded
    // host it runs slower than the 18.2 Hz tick: KVM's PIT then keeps a
    // backlog of missed ticks (QEMU's default lost_tick_policy=delay) and
    // injects them back to back, so IRQ0, which outranks IRQ6 at the PIC,
    // is always pending, the floppy interrupt is never taken and the
    // reinjected ticks run the wait out (seen in KVM's kvm_ack_irq trace:
    // IRQ6 raised, then only IRQ0 acknowledged for seconds). Dropping
    // missed ticks, as QEMU's `-global kvm-pit.lost_tick_policy=discard`
    // does, lets the guest take IRQ6 whatever the host's load. Hosts with
    // hardware-speed ring 0 never build that backlog.
    let mut all = vec!["-global", "kvm-pit.lost_tick_policy=discard"];
    all.extend_from_slice(args);
    // Markers are matched on the text without terminal controls (GRUB
    // draws "Welcome" in pieces).
    boot_until(dir, &all, markers, TIMEOUT)
}

#[test]
fn fda_boot_a_reads_the_whole_diskette_through_int13() {
    if !kvm_available("fda_boot_a_reads_the_whole_diskette_through_int13") {
        return;
    }
    require_bios();
    let img = floppy_image();
    let dir = scratch("fdc-kvm-boot");
    let copy = dir.join("floppy.img");
    std::fs::copy(&img, &copy).unwrap();
    let out = boot(
        &dir,
        &["-fda", &copy.display().to_string(), "-boot", "a"],
        &["STRATA-BOOT-OK", "STRATA-BOOT-FAIL", "No bootable device"],
    );
    assert!(out.contains("Booting from Floppy"), "{out}");
    assert!(out.contains("STRATA-BOOT-OK"), "{out}");
}

#[test]
fn grub_rescue_floppy_reaches_the_menu() {
    if !kvm_available("grub_rescue_floppy_reaches_the_menu") {
        return;
    }
    require_bios();
    assert!(
        Path::new(GRUB_FLOPPY).exists(),
        "{GRUB_FLOPPY} is missing: install the Debian package grub-rescue-pc (make test does)"
    );
    let dir = scratch("fdc-kvm-grub");
    let copy = dir.join("grub.img");
    std::fs::copy(GRUB_FLOPPY, &copy).unwrap();
    let drive = format!("file={},format=raw,if=floppy", copy.display());
    let out = boot(
        &dir,
        &["-drive", &drive, "-boot", "a"],
        &["GNU GRUB", "grub>", "No bootable device", "Boot failed"],
    );
    assert!(out.contains("Booting from Floppy"), "{out}");
    assert!(out.contains("Welcome to GRUB"), "{out}");
}
