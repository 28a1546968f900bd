//! Booting from IDE under KVM with SeaBIOS: the project's boot program
//! (images/ide/bootsect.S, which reads 256 sectors through INT 13h and checks
//! them) from each of hda..hdd and from an El Torito CD, the boot order
//! rules (`-boot order=`, `bootindex`), and GRUB rescue media as a live CD
//! and as `-hda live.iso`. Each test skips loudly when /dev/kvm is unusable.
//!
//! Boots are serialised within this file: the machine has two cores and a
//! GRUB boot keeps one busy for most of a minute.

mod support;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use support::{kvm_available, require_bios, run_until, scratch};

const TIMEOUT: Duration = Duration::from_secs(180);
const GRUB_TIMEOUT: Duration = Duration::from_secs(400);
const GRUB_ISO: &str = "/usr/lib/grub-rescue/grub-rescue-cdrom.iso";

static BOOTS: Mutex<()> = Mutex::new(());

/// Builds images/out/ once per test process (the script caches).
fn images() -> (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/ide/build.sh");
            let out = std::process::Command::new("sh")
                .arg(&script)
                .output()
                .expect("run images/build.sh");
            assert!(
                out.status.success(),
                "images/build.sh failed (needs binutils and perl): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let dir = script.parent().unwrap().join("../out");
            (dir.join("ide-disk.img"), dir.join("ide-cd.iso"))
        })
        .clone()
}

/// A private copy of `src` (images in use are locked, and tests run in
/// parallel).
fn copy(src: &Path, dir: &Path, name: &str) -> String {
    let dst = dir.join(name);
    std::fs::copy(src, &dst).unwrap();
    dst.display().to_string()
}

/// Boots with `args` until one of `markers` shows up on COM1.
fn boot(dir: &Path, args: &[&str], markers: &[&str], timeout: Duration) -> String {
    let _serial = BOOTS.lock().unwrap_or_else(|e| e.into_inner());
    let log = dir.join("serial.log");
    let _ = std::fs::remove_file(&log);
    let serial = format!("file:{}", log.display());
    let mut all = vec!["-nodefaults", "-m", "256", "-serial", &serial];
    all.extend_from_slice(args);
    let out = run_until(
        &all,
        &log,
        &markers.join(" or "),
        |t| {
            let t = support::plain_text(t);
            markers.iter().any(|m| t.contains(m))
        },
        timeout,
    );
    support::plain_text(&out)
}

fn skip(name: &str) -> bool {
    if !kvm_available(name) {
        return true;
    }
    require_bios();
    false
}

#[test]
fn boot_sector_from_each_of_hda_to_hdd() {
    if skip("boot_sector_from_each_of_hda_to_hdd") {
        return;
    }
    let (disk, _) = images();
    let dir = scratch("ide-kvm-hdx");
    for opt in ["-hda", "-hdb", "-hdc", "-hdd"] {
        let img = copy(&disk, &dir, "disk.img");
        let out = boot(
            &dir,
            &[opt, &img],
            &["STRATA-BOOT-OK", "STRATA-BOOT-FAIL"],
            TIMEOUT,
        );
        assert!(out.contains("STRATA-BOOT-OK"), "{opt}: {out}");
        assert!(out.contains("Booting from Hard Disk"), "{opt}: {out}");
    }
}

#[test]
fn boot_sector_from_an_el_torito_cd() {
    if skip("boot_sector_from_an_el_torito_cd") {
        return;
    }
    let (_, cd) = images();
    let dir = scratch("ide-kvm-cd");
    let iso = copy(&cd, &dir, "cd.iso");
    let out = boot(
        &dir,
        &["-cdrom", &iso, "-boot", "d"],
        &["STRATA-CD-OK", "STRATA-BOOT-FAIL"],
        TIMEOUT,
    );
    assert!(out.contains("STRATA-CD-OK"), "{out}");
}

#[test]
fn boot_order_dc_boots_the_cd_and_cd_boots_the_disk() {
    if skip("boot_order_dc_boots_the_cd_and_cd_boots_the_disk") {
        return;
    }
    let (disk, cd) = images();
    let dir = scratch("ide-kvm-order");
    let hda = copy(&disk, &dir, "disk.img");
    let iso = copy(&cd, &dir, "cd.iso");
    let markers = ["STRATA-BOOT-OK", "STRATA-CD-OK", "STRATA-BOOT-FAIL"];
    let out = boot(
        &dir,
        &["-hda", &hda, "-cdrom", &iso, "-boot", "order=dc"],
        &markers,
        TIMEOUT,
    );
    assert!(out.contains("STRATA-CD-OK"), "order=dc: {out}");
    assert!(!out.contains("Booting from Hard Disk"), "order=dc: {out}");
    let out = boot(
        &dir,
        &["-hda", &hda, "-cdrom", &iso, "-boot", "order=cd"],
        &markers,
        TIMEOUT,
    );
    assert!(out.contains("STRATA-BOOT-OK"), "order=cd: {out}");
    assert!(!out.contains("DVD/CD"), "order=cd: {out}");
}

#[test]
fn bootindex_overrides_boot_order() {
    if skip("bootindex_overrides_boot_order") {
        return;
    }
    let (disk, cd) = images();
    let dir = scratch("ide-kvm-bootindex");
    let hda = copy(&disk, &dir, "disk.img");
    let iso = copy(&cd, &dir, "cd.iso");
    let hd_drive = format!("file={hda},format=raw,if=none,id=hd");
    let cd_drive = format!("file={iso},format=raw,if=none,id=cd,media=cdrom");
    let markers = ["STRATA-BOOT-OK", "STRATA-CD-OK", "STRATA-BOOT-FAIL"];
    // order=c says disk first; the CD's bootindex wins.
    let out = boot(
        &dir,
        &[
            "-boot",
            "order=c",
            "-drive",
            &hd_drive,
            "-device",
            "ide-hd,drive=hd,bus=ide.0,unit=0,bootindex=2",
            "-drive",
            &cd_drive,
            "-device",
            "ide-cd,drive=cd,bus=ide.1,unit=1,bootindex=1",
        ],
        &markers,
        TIMEOUT,
    );
    assert!(out.contains("STRATA-CD-OK"), "{out}");
    // And the other way round: order=d, the disk's bootindex wins.
    let out = boot(
        &dir,
        &[
            "-boot",
            "order=d",
            "-drive",
            &hd_drive,
            "-device",
            "ide-hd,drive=hd,bus=ide.1,unit=0,bootindex=1",
            "-drive",
            &cd_drive,
            "-device",
            "ide-cd,drive=cd,bus=ide.0,unit=1,bootindex=3",
        ],
        &markers,
        TIMEOUT,
    );
    assert!(out.contains("STRATA-BOOT-OK"), "{out}");
}

#[test]
fn grub_rescue_cdrom_reaches_the_menu_with_boot_d() {
    if skip("grub_rescue_cdrom_reaches_the_menu_with_boot_d") {
        return;
    }
    assert!(
        Path::new(GRUB_ISO).exists(),
        "{GRUB_ISO} is missing: install the Debian package grub-rescue-pc (make test does)"
    );
    let dir = scratch("ide-kvm-grub");
    let out = boot(
        &dir,
        &["-cdrom", GRUB_ISO, "-boot", "d"],
        &["GNU GRUB", "grub>", "No bootable device"],
        GRUB_TIMEOUT,
    );
    assert!(out.contains("Booting from DVD/CD"), "{out}");
    assert!(out.contains("Welcome to GRUB"), "{out}");
    assert!(out.contains("GNU GRUB") || out.contains("grub>"), "{out}");
}

#[test]
fn grub_rescue_iso_as_hda_boots_like_a_live_stick() {
    if skip("grub_rescue_iso_as_hda_boots_like_a_live_stick") {
        return;
    }
    let dir = scratch("ide-kvm-liveiso");
    let iso = copy(Path::new(GRUB_ISO), &dir, "live.iso");
    let out = boot(
        &dir,
        &["-hda", &iso],
        &["Welcome to GRUB", "No bootable device", "Boot failed"],
        GRUB_TIMEOUT,
    );
    assert!(out.contains("Booting from Hard Disk"), "{out}");
    assert!(out.contains("Welcome to GRUB"), "{out}");
}

/// `lcyls/lheads/lsecs` reach SeaBIOS through the `bios-geometry` fw_cfg
/// file, and it uses them as the disk's INT 13h geometry.
#[test]
fn seabios_uses_the_lchs_given_to_ide_hd() {
    if skip("seabios_uses_the_lchs_given_to_ide_hd") {
        return;
    }
    let (disk, _) = images();
    let dir = scratch("ide-lchs-kvm");
    let hd = copy(&disk, &dir, "hd.img");
    let drive = format!("file={hd},if=none,id=hd,format=raw");
    let _serial = BOOTS.lock().unwrap_or_else(|e| e.into_inner());
    support::until_seabios_log(
        "ide-lchs-kvm-log",
        &[
            "-nodefaults",
            "-drive",
            &drive,
            "-device",
            "ide-hd,drive=hd,bus=ide.0,unit=0,lcyls=100,lheads=16,lsecs=63",
        ],
        "translation=host-supplied LCHS=100/16/63",
        TIMEOUT,
    );
}

/// `-snapshot` discards what the guest writes: the boot sector of
/// `ide-disk-write.img` writes 64 sectors through INT 13h (IDE PIO) after
/// checking the data; under `-snapshot` the image stays byte-identical,
/// and without it (the control) the sectors land in the file.
#[test]
fn snapshot_discards_guest_writes() {
    if skip("snapshot_discards_guest_writes") {
        return;
    }
    let (disk, _) = images();
    let src = disk.with_file_name("ide-disk-write.img");
    let dir = scratch("ide-kvm-snapshot-write");
    let img = copy(&src, &dir, "disk.img");
    let before = std::fs::read(&img).unwrap();
    let markers = ["STRATA-WRITE-OK", "STRATA-BOOT-FAIL"];
    let out = boot(&dir, &["-snapshot", "-hda", &img], &markers, TIMEOUT);
    assert!(out.contains("STRATA-WRITE-OK"), "{out}");
    assert!(
        std::fs::read(&img).unwrap() == before,
        "-snapshot let a guest write reach the image"
    );
    // Control: the same boot without -snapshot changes LBA 257-320 into a
    // copy of LBA 193-256.
    let out = boot(
        &dir,
        &["-drive", &format!("file={img},format=raw,index=0")],
        &markers,
        TIMEOUT,
    );
    assert!(out.contains("STRATA-WRITE-OK"), "{out}");
    let after = std::fs::read(&img).unwrap();
    assert_eq!(after[257 * 512..321 * 512], before[193 * 512..257 * 512]);
    assert_ne!(after, before);
}

/// `-snapshot -hda`: the guest boots from a temporary qcow2 overlay and the
/// image itself is opened read-only and left as it was.
#[test]
fn snapshot_hda_boots_and_leaves_the_image_alone() {
    if skip("snapshot_hda_boots_and_leaves_the_image_alone") {
        return;
    }
    let (disk, _) = images();
    let dir = scratch("ide-kvm-snapshot");
    let img = copy(&disk, &dir, "disk.img");
    let before = std::fs::read(&img).unwrap();
    let out = boot(
        &dir,
        &["-snapshot", "-hda", &img],
        &["STRATA-BOOT-OK", "STRATA-BOOT-FAIL"],
        TIMEOUT,
    );
    assert!(out.contains("STRATA-BOOT-OK"), "{out}");
    assert!(
        std::fs::read(&img).unwrap() == before,
        "-snapshot modified the image"
    );
}

#[test]
fn plain_text_drops_terminal_controls() {
    assert_eq!(
        support::plain_text("\u{1b}[0;30;47mW\u{1b}[04;02Helcome to GRUB\u{1b}[0m!"),
        "Welcome to GRUB!"
    );
}
