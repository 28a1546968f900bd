//! The Linux-driver lane (issues 6 and 7): the project's Linux test guest
//! (images/linux-kernel, built from Debian's linux-source-6.1) boots
//! directly under KVM, and the kernel's own drivers
//! (ata_piix + sd, ata_piix + sr, virtio_blk over virtio-pci modern and
//! legacy, floppy on the i82078) read sectors through Strata's devices and block layer. The
//! guest's /init (images/linux-init) prints an FNV-1a 64 checksum of the
//! first sectors of each device; the test wrote those bytes into the images
//! and compares.
//!
//! Each boot costs about 20-30 s here (ring 0 is emulated, PLATFORM.md), so
//! checks are grouped: one boot for IDE (disk + CD), one for virtio-blk
//! (a modern-only device and a transitional one driven through its legacy
//! interface). Boots run one at a time so the printed wall times, which go
//! into BENCHMARKS.md, are not two guests fighting over the cores.
//!
//! `LINUX_LANE_VERBOSE=1` drops `quiet`, so a failure shows the kernel log.

mod support;

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use support::qtest::Qtest;
use support::{kernels, kvm_available, run_until_marker, scratch};

/// The test guest's command line (support::kernels::LINUX_CMDLINE), with
/// `acpi=off`: interrupt routing from the MP table, because the kernel's
/// ACPI interpreter costs about 20 s of boot here (boot_linux.rs covers
/// ACPI).
fn cmdline() -> String {
    format!("{} acpi=off", kernels::LINUX_CMDLINE)
}
const TIMEOUT: Duration = Duration::from_secs(150);
/// Sectors the guest reads from each device: 128 KiB, so one read is a
/// scatter-gather list over many guest pages (PRD entries, descriptors).
const SECTORS: usize = 256;

static ONE_BOOT_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Writes a `len`-byte image whose every 4-byte word depends on its
/// position and on `seed`, so a sector read from the wrong place, or from
/// the wrong image, changes the sum. Returns the expected sum of the first
/// `SECTORS` sectors.
fn make_image(path: &Path, len: usize, seed: u32) -> u64 {
    make_image_summing(path, len, seed, SECTORS)
}

/// [`make_image`], returning the sum of the first `sectors` sectors.
fn make_image_summing(path: &Path, len: usize, seed: u32, sectors: usize) -> u64 {
    let mut data = Vec::with_capacity(len);
    let mut x = seed | 1;
    for i in 0..len / 4 {
        // xorshift32, mixed with the word index
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        data.extend_from_slice(&(x ^ i as u32).to_le_bytes());
    }
    std::fs::write(path, &data).unwrap();
    kernels::fnv1a64(&data[..sectors * 512])
}

/// Boots the guest with `devices` and `checks` (init's command line items)
/// and returns the console and the wall time from launch to GUEST-DONE.
fn boot(name: &str, devices: &[String], checks: &str) -> (String, Duration) {
    boot_kernel("vmlinux", name, devices, checks)
}

/// [`boot`] with another of the shared guest's kernels (`bzImage`).
fn boot_kernel(kernel: &str, name: &str, devices: &[String], checks: &str) -> (String, Duration) {
    let dir = scratch(name);
    let log = dir.join("serial.log");
    let quiet = if std::env::var_os("LINUX_LANE_VERBOSE").is_some() {
        ""
    } else {
        " quiet"
    };
    let append = format!("{}{quiet} {checks}", cmdline());
    let mut args = kernels::linux_args(kernel, &log, &append);
    args.extend(devices.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _one = ONE_BOOT_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let start = Instant::now();
    let out = run_until_marker(&args, &log, "GUEST-DONE", TIMEOUT);
    let took = start.elapsed();
    // Picked up by hand into BENCHMARKS.md ("Linux guest with disks").
    eprintln!(
        "linux-lane {name}: {:.1} s wall to GUEST-DONE",
        took.as_secs_f64()
    );
    (out, took)
}

/// Checks init's `GUEST-SUM <dev> <hex>` line for each (dev, expected sum).
fn assert_sums(out: &str, want: &[(&str, u64)]) {
    let mut problems = String::new();
    for &(dev, sum) in want {
        let prefix = format!("GUEST-SUM {dev} ");
        match out.lines().find_map(|l| l.trim().strip_prefix(&prefix)) {
            Some(got) if got == format!("{sum:016x}") => {}
            Some(got) => {
                let _ = writeln!(
                    problems,
                    "{dev}: the guest read different bytes: sum {got}, expected {sum:016x}"
                );
            }
            None => {
                let _ = writeln!(
                    problems,
                    "{dev}: no GUEST-SUM line: the kernel's driver never saw the device \
                     or could not read it (see GUEST-ERR; rerun with LINUX_LANE_VERBOSE=1 \
                     for the kernel log)"
                );
            }
        }
    }
    assert!(problems.is_empty(), "{problems}console output:\n{out}");
}

/// `GUEST-SHOW <path> <value>` from init.
fn shown<'a>(out: &'a str, path: &str) -> &'a str {
    let prefix = format!("GUEST-SHOW {path} ");
    out.lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no GUEST-SHOW line for {path}; console:\n{out}"))
}

fn drive(path: &Path, rest: &str) -> String {
    format!("file={},format=raw,{rest}", path.display())
}

/// The bug this lane found, checked without KVM: under direct kernel boot
/// no firmware runs, so Strata itself must set IDETIM's decode-enable bit
/// (15) for both IDE channels, as SeaBIOS and qboot do; otherwise ata_piix
/// skips both channels without a word. With firmware, the register keeps
/// its reset value 0 for SeaBIOS to program.
#[test]
fn direct_boot_enables_both_ide_channels() {
    let k = kernels::path("testkernel-pvh.elf");
    let mut q = Qtest::start(&["-m", "64", "-kernel", &k]);
    // 00:01.1 config 40h: IDETIM primary (40h-41h), secondary (42h-43h).
    assert_eq!(q.pci_read32(1, 1, 0x40), 0x8000_8000);
    let mut q = Qtest::start(&["-m", "64"]);
    assert_eq!(q.pci_read32(1, 1, 0x40), 0);
}

/// (a) ata_piix: a hard disk on the primary master (sda, through sd) and an
/// ATAPI CD-ROM on the secondary master (sr0, through sr and the shared
/// SCSI/MMC target), read in one boot.
#[test]
fn linux_ata_piix_reads_disk_and_cd() {
    if !kvm_available("linux_ata_piix_reads_disk_and_cd") {
        return;
    }
    let dir = scratch("linux-lane-ide-img");
    let disk = dir.join("disk.img");
    let cd = dir.join("cd.iso");
    let disk_sum = make_image(&disk, 4 << 20, 0x1de_d15c);
    // Any multiple of 2048 bytes is a valid CD for sr.
    let cd_sum = make_image(&cd, 1 << 20, 0xcd_0001);
    let devices = vec![
        "-drive".into(),
        drive(&disk, "if=ide,index=0,media=disk"),
        "-drive".into(),
        drive(&cd, "if=ide,index=2,media=cdrom"),
    ];
    let (out, _) = boot(
        "linux-lane-ide",
        &devices,
        &format!("check=sda:{SECTORS},sr0:{SECTORS}"),
    );
    assert_sums(&out, &[("sda", disk_sum), ("sr0", cd_sum)]);
    assert!(!out.contains("GUEST-ERR"), "{out}");
}

/// (b) and (c) virtio_blk: a modern-only device (`disable-legacy=on`, vda)
/// and a transitional one (the default, vdb). `virtio_pci.force_legacy=1`
/// makes Linux drive the transitional device through its legacy I/O BAR
/// (otherwise it would pick the modern interface and the legacy path would
/// go untested); the modern-only one has no legacy interface, so Linux
/// falls back to modern for it. The `features` attribute proves which
/// interface each got: VIRTIO_F_VERSION_1 (bit 32) is negotiated only over
/// the modern one.
#[test]
fn linux_virtio_blk_reads_modern_and_transitional() {
    if !kvm_available("linux_virtio_blk_reads_modern_and_transitional") {
        return;
    }
    let dir = scratch("linux-lane-virtio-img");
    let modern = dir.join("modern.img");
    let transitional = dir.join("transitional.img");
    let modern_sum = make_image(&modern, 4 << 20, 0x0f1e_0001);
    let transitional_sum = make_image(&transitional, 4 << 20, 0x0f1e_0002);
    let devices = vec![
        "-drive".into(),
        drive(&modern, "if=none,id=modern"),
        "-device".into(),
        "virtio-blk-pci,drive=modern,disable-legacy=on".into(),
        "-drive".into(),
        drive(&transitional, "if=none,id=transitional"),
        "-device".into(),
        "virtio-blk-pci,drive=transitional".into(),
    ];
    let (out, _) = boot(
        "linux-lane-virtio",
        &devices,
        &format!(
            "virtio_pci.force_legacy=1 check=vda:{SECTORS},vdb:{SECTORS} \
             show=/sys/block/vda/device/features show=/sys/block/vdb/device/features"
        ),
    );
    assert_sums(&out, &[("vda", modern_sum), ("vdb", transitional_sum)]);
    assert!(!out.contains("GUEST-ERR"), "{out}");
    // One '0'/'1' per feature bit, bit 0 first.
    let version_1 = |dev: &str| {
        let bits = shown(&out, &format!("/sys/block/{dev}/device/features"));
        bits.as_bytes().get(32) == Some(&b'1')
    };
    assert!(version_1("vda"), "vda should be driven as modern:\n{out}");
    assert!(
        !version_1("vdb"),
        "vdb should be driven through the legacy interface:\n{out}"
    );
}

/// The bzImage form of the guest kernel (Linux boot protocol, 64-bit
/// entry) with a transitional virtio-blk disk, which Linux drives through
/// the modern interface when it has the choice.
#[test]
fn linux_bzimage_reads_transitional_virtio_as_modern() {
    if !kvm_available("linux_bzimage_reads_transitional_virtio_as_modern") {
        return;
    }
    let dir = scratch("linux-lane-bzimage-img");
    let disk = dir.join("disk.img");
    let sum = make_image(&disk, 4 << 20, 0x0f1e_0003);
    let devices = vec![
        "-drive".into(),
        drive(&disk, "if=none,id=d0"),
        "-device".into(),
        "virtio-blk-pci,drive=d0".into(),
    ];
    let (out, _) = boot_kernel(
        "bzImage",
        "linux-lane-bzimage",
        &devices,
        &format!("check=vda:{SECTORS} show=/sys/block/vda/device/features"),
    );
    assert_sums(&out, &[("vda", sum)]);
    assert!(!out.contains("GUEST-ERR"), "{out}");
    let bits = shown(&out, "/sys/block/vda/device/features");
    assert_eq!(
        bits.as_bytes().get(32),
        Some(&b'1'),
        "vda should be driven as modern:\n{out}"
    );
}

/// The kernel's `floppy` driver (the i82078 and ISA DMA channel 2, probed
/// from CMOS register 0x10 as on a PC without ACPI) reads the whole
/// 1.44 MB diskette of `-drive if=floppy`: every track, both heads, with
/// the sum over all 2880 sectors.
#[test]
fn linux_floppy_driver_reads_the_whole_diskette() {
    if !kvm_available("linux_floppy_driver_reads_the_whole_diskette") {
        return;
    }
    const DISKETTE: usize = 2880;
    let dir = scratch("linux-lane-floppy-img");
    let img = dir.join("floppy.img");
    let sum = make_image_summing(&img, DISKETTE * 512, 0xf1_0999, DISKETTE);
    let devices = vec!["-drive".into(), drive(&img, "if=floppy")];
    let (out, _) = boot(
        "linux-lane-floppy",
        &devices,
        &format!("check=fd0:{DISKETTE}"),
    );
    assert_sums(&out, &[("fd0", sum)]);
    assert!(!out.contains("GUEST-ERR"), "{out}");
}

/// The kernel's `floppy` driver writes: init's `rwloop=` writes 64 KiB of
/// a pattern to fd0 (WRITE DATA by ISA DMA, memory to the controller),
/// reads it back and compares, and the image holds the pattern after.
#[test]
fn linux_floppy_driver_writes_and_reads_back() {
    if !kvm_available("linux_floppy_driver_writes_and_reads_back") {
        return;
    }
    let dir = scratch("linux-lane-floppy-rw-img");
    let img = dir.join("floppy.img");
    make_image(&img, 2880 * 512, 0xf1_0777);
    let devices = vec!["-drive".into(), drive(&img, "if=floppy")];
    let (out, _) = boot("linux-lane-floppy-rw", &devices, "rwloop=fd0:64:1");
    assert!(!out.contains("GUEST-ERR"), "{out}");
    assert_eq!(kernels::rwloop_rounds(&out, "fd0"), 1, "{out}");
    kernels::assert_rwloop_image(&img, 64, 1);
}

/// The kernel's `virtio_scsi` driver with `sd` and `sr`: a `scsi-hd`
/// (sda) and a `scsi-cd` (sr0) on one virtio-scsi-pci HBA, read through
/// the shared SCSI target emulation.
#[test]
fn linux_virtio_scsi_reads_disk_and_cd() {
    if !kvm_available("linux_virtio_scsi_reads_disk_and_cd") {
        return;
    }
    let dir = scratch("linux-lane-virtio-scsi-img");
    let disk = dir.join("disk.img");
    let cd = dir.join("cd.iso");
    let disk_sum = make_image(&disk, 4 << 20, 0x5c51_0001);
    let cd_sum = make_image(&cd, 1 << 20, 0x5c51_00cd);
    let devices = vec![
        "-device".into(),
        "virtio-scsi-pci,id=hba".into(),
        "-drive".into(),
        drive(&disk, "if=none,id=d0"),
        "-device".into(),
        "scsi-hd,drive=d0,bus=hba.0,scsi-id=0,lun=0".into(),
        "-drive".into(),
        drive(&cd, "if=none,id=c0,media=cdrom"),
        "-device".into(),
        "scsi-cd,drive=c0,bus=hba.0,scsi-id=1,lun=0".into(),
    ];
    let (out, _) = boot(
        "linux-lane-virtio-scsi",
        &devices,
        &format!("check=sda:{SECTORS},sr0:{SECTORS}"),
    );
    assert_sums(&out, &[("sda", disk_sum), ("sr0", cd_sum)]);
    assert!(!out.contains("GUEST-ERR"), "{out}");
}

/// The kernel's `sym53c8xx` driver on the LSI 53C895A (its own SCRIPTS
/// run by the chip's SCRIPTS processor, interrupts through the MP
/// table's PCI entries) with `sd` and `sr`: a disk from
/// `-drive if=scsi` and a CD-ROM as a `scsi-cd` at id 2.
#[test]
fn linux_sym53c8xx_reads_disk_and_cd() {
    if !kvm_available("linux_sym53c8xx_reads_disk_and_cd") {
        return;
    }
    let dir = scratch("linux-lane-lsi-img");
    let disk = dir.join("disk.img");
    let cd = dir.join("cd.iso");
    let disk_sum = make_image(&disk, 4 << 20, 0x15_1001);
    let cd_sum = make_image(&cd, 1 << 20, 0x15_10cd);
    let devices = vec![
        "-device".into(),
        "lsi53c895a,id=lsi".into(),
        "-drive".into(),
        drive(&disk, "if=scsi,index=0"),
        "-drive".into(),
        drive(&cd, "if=none,id=c0,media=cdrom"),
        "-device".into(),
        "scsi-cd,drive=c0,bus=lsi.0,scsi-id=2".into(),
    ];
    let (out, _) = boot(
        "linux-lane-lsi",
        &devices,
        &format!("check=sda:{SECTORS},sr0:{SECTORS}"),
    );
    assert_sums(&out, &[("sda", disk_sum), ("sr0", cd_sum)]);
    assert!(!out.contains("GUEST-ERR"), "{out}");
}

/// The kernel's `uhci_hcd` and `usb-storage` drivers on `-usb`'s PIIX3
/// UHCI (frames on Strata's frame clock, Bulk-Only Transport on the
/// shared SCSI target): a disk and a CD-ROM, each a `usb-storage` on its
/// own root port, read whole through `sd` and `sr` and checksummed.
#[test]
fn linux_usb_storage_on_uhci_reads_disk_and_cd() {
    if !kvm_available("linux_usb_storage_on_uhci_reads_disk_and_cd") {
        return;
    }
    let dir = scratch("linux-lane-uhci-img");
    let disk = dir.join("disk.img");
    let cd = dir.join("cd.iso");
    let disk_sum = make_image(&disk, 4 << 20, 0x0b_1001);
    let cd_sum = make_image(&cd, 1 << 20, 0x0b_10cd);
    let devices = vec![
        "-usb".into(),
        "-drive".into(),
        drive(&disk, "if=none,id=stick"),
        "-device".into(),
        "usb-storage,drive=stick,port=1".into(),
        "-drive".into(),
        drive(&cd, "if=none,id=c0,media=cdrom"),
        "-device".into(),
        "usb-storage,drive=c0,port=2".into(),
    ];
    let (out, _) = boot(
        "linux-lane-uhci",
        &devices,
        &format!("check=sda:{SECTORS},sr0:{SECTORS}"),
    );
    assert_sums(&out, &[("sda", disk_sum), ("sr0", cd_sum)]);
    assert!(!out.contains("GUEST-ERR"), "{out}");
}

/// The kernel's `xhci_hcd` (MSI-X) and `usb-storage` drivers on
/// `qemu-xhci`: a disk and a CD-ROM, each a `usb-storage` (SuperSpeed,
/// so on the USB 3 ports) read whole through `sd` and `sr` and
/// checksummed; the reads NAK while block I/O is in flight and complete
/// on the device's wakeup.
#[test]
fn linux_usb_storage_on_xhci_reads_disk_and_cd() {
    if !kvm_available("linux_usb_storage_on_xhci_reads_disk_and_cd") {
        return;
    }
    let dir = scratch("linux-lane-xhci-img");
    let disk = dir.join("disk.img");
    let cd = dir.join("cd.iso");
    let disk_sum = make_image(&disk, 4 << 20, 0x0c_1001);
    let cd_sum = make_image(&cd, 1 << 20, 0x0c_10cd);
    let devices = vec![
        "-device".into(),
        "qemu-xhci,id=xhci".into(),
        "-drive".into(),
        drive(&disk, "if=none,id=stick"),
        "-device".into(),
        "usb-storage,bus=xhci.0,drive=stick,port=1".into(),
        "-drive".into(),
        drive(&cd, "if=none,id=c0,media=cdrom"),
        "-device".into(),
        "usb-storage,bus=xhci.0,drive=c0,port=2".into(),
    ];
    let (out, _) = boot(
        "linux-lane-xhci",
        &devices,
        &format!("check=sda:{SECTORS},sr0:{SECTORS}"),
    );
    assert_sums(&out, &[("sda", disk_sum), ("sr0", cd_sum)]);
    assert!(!out.contains("GUEST-ERR"), "{out}");
}

/// The kernel's `ehci_hcd` (and `uhci_hcd` for the companions) and
/// `usb-storage` on q35's `-usb`: the ICH9 EHCI takes the high-speed
/// disk and CD-ROM once the driver sets CONFIGFLAG; both are read whole
/// and checksummed.
#[test]
fn linux_usb_storage_on_q35_ehci_reads_disk_and_cd() {
    if !kvm_available("linux_usb_storage_on_q35_ehci_reads_disk_and_cd") {
        return;
    }
    let dir = scratch("linux-lane-ehci-img");
    let disk = dir.join("disk.img");
    let cd = dir.join("cd.iso");
    let disk_sum = make_image(&disk, 4 << 20, 0x0e_1001);
    let cd_sum = make_image(&cd, 1 << 20, 0x0e_10cd);
    let devices = vec![
        "-M".into(),
        "q35".into(),
        "-usb".into(),
        "-drive".into(),
        drive(&disk, "if=none,id=stick"),
        "-device".into(),
        "usb-storage,bus=usb-bus.0,drive=stick,port=1".into(),
        "-drive".into(),
        drive(&cd, "if=none,id=c0,media=cdrom"),
        "-device".into(),
        "usb-storage,bus=usb-bus.0,drive=c0,port=2".into(),
    ];
    let (out, _) = boot(
        "linux-lane-ehci",
        &devices,
        &format!("check=sda:{SECTORS},sr0:{SECTORS}"),
    );
    assert_sums(&out, &[("sda", disk_sum), ("sr0", cd_sum)]);
    assert!(!out.contains("GUEST-ERR"), "{out}");
}

/// The kernel's `uas` driver on `qemu-xhci`: a `usb-uas` (SuperSpeed,
/// streams) with a `scsi-hd` at LUN 0 and a `scsi-cd` at LUN 1 on its
/// SCSI bus, both read whole through `sd` and `sr` and checksummed.
#[test]
fn linux_uas_on_xhci_reads_disk_and_cd() {
    if !kvm_available("linux_uas_on_xhci_reads_disk_and_cd") {
        return;
    }
    let dir = scratch("linux-lane-uas-img");
    let disk = dir.join("disk.img");
    let cd = dir.join("cd.iso");
    let disk_sum = make_image(&disk, 4 << 20, 0x0a_1001);
    let cd_sum = make_image(&cd, 1 << 20, 0x0a_10cd);
    let devices = vec![
        "-device".into(),
        "qemu-xhci,id=xhci".into(),
        "-device".into(),
        "usb-uas,id=uas,bus=xhci.0,port=1".into(),
        "-drive".into(),
        drive(&disk, "if=none,id=d0"),
        "-device".into(),
        "scsi-hd,bus=uas.0,scsi-id=0,lun=0,drive=d0".into(),
        "-drive".into(),
        drive(&cd, "if=none,id=c0,media=cdrom"),
        "-device".into(),
        "scsi-cd,bus=uas.0,scsi-id=0,lun=1,drive=c0".into(),
    ];
    let (out, _) = boot(
        "linux-lane-uas",
        &devices,
        &format!("check=sda:{SECTORS},sr0:{SECTORS}"),
    );
    // The only way to these units is the usb-uas: the sums prove the
    // uas driver read them.
    assert_sums(&out, &[("sda", disk_sum), ("sr0", cd_sum)]);
    assert!(!out.contains("GUEST-ERR"), "{out}");
}
