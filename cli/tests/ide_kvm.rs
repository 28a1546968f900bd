//! Booting from IDE under KVM with SeaBIOS: the project's boot program
//! (images/ide/bootsect.S, which reads 256 sectors through INT 13h and checks
//! them) from each of hda..hdd and from an El Torito CD, the boot order
//! rules (`-boot order=`, `bootindex`), the same media on `q35`'s AHCI, and
//! GRUB rescue media as a live CD and as `-hda live.iso`. Each test skips loudly when /dev/kvm is unusable.
//!
//! Boots are serialised within this file: the machine has two cores and a
//! GRUB boot keeps one busy for most of a minute.

mod support;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use support::{kvm_available, require_bios, scratch};

const TIMEOUT: Duration = Duration::from_secs(180);
const GRUB_TIMEOUT: Duration = Duration::from_secs(400);
const GRUB_ISO: &str = "/usr/lib/grub-rescue/grub-rescue-cdrom.iso";

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
    support::boot_until(dir, args, markers, timeout)
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

/// The same media on `q35`: `-hda` and `-cdrom` land on the built-in
/// AHCI (ports 0 and 2), and SeaBIOS's AHCI driver boots each in turn.
#[test]
fn q35_boots_the_cd_and_the_disk_from_the_builtin_ahci() {
    if skip("q35_boots_the_cd_and_the_disk_from_the_builtin_ahci") {
        return;
    }
    let (disk, cd) = images();
    let dir = scratch("ide-kvm-q35");
    let hda = copy(&disk, &dir, "disk.img");
    let iso = copy(&cd, &dir, "cd.iso");
    let markers = ["STRATA-BOOT-OK", "STRATA-CD-OK", "STRATA-BOOT-FAIL"];
    for (order, want) in [("dc", "STRATA-CD-OK"), ("cd", "STRATA-BOOT-OK")] {
        let out = boot(
            &dir,
            &[
                "-M",
                "q35",
                "-hda",
                &hda,
                "-cdrom",
                &iso,
                "-boot",
                &format!("order={order}"),
            ],
            &markers,
            TIMEOUT,
        );
        assert!(out.contains(want), "order={order}: {out}");
    }
}

/// `-device ahci` on `pc`, a disk on port 0 and a CD on port 1: SeaBIOS
/// boots each as `-boot order=` says.
#[test]
fn pc_device_ahci_boots_the_cd_and_the_disk() {
    if skip("pc_device_ahci_boots_the_cd_and_the_disk") {
        return;
    }
    let (disk, cd) = images();
    let dir = scratch("ide-kvm-pc-ahci");
    let hda = copy(&disk, &dir, "disk.img");
    let iso = copy(&cd, &dir, "cd.iso");
    let hd_drive = format!("file={hda},format=raw,if=none,id=hd");
    let cd_drive = format!("file={iso},format=raw,if=none,id=cd,media=cdrom");
    let markers = ["STRATA-BOOT-OK", "STRATA-CD-OK", "STRATA-BOOT-FAIL"];
    for (order, want) in [("dc", "STRATA-CD-OK"), ("cd", "STRATA-BOOT-OK")] {
        let order = format!("order={order}");
        let out = boot(
            &dir,
            &[
                "-device",
                "ahci,id=sata",
                "-drive",
                &hd_drive,
                "-device",
                "ide-hd,drive=hd,bus=sata.0",
                "-drive",
                &cd_drive,
                "-device",
                "ide-cd,drive=cd,bus=sata.1",
                "-boot",
                &order,
            ],
            &markers,
            TIMEOUT,
        );
        assert!(out.contains(want), "{order}: {out}");
    }
}

/// GRUB's rescue CD as a live CD on q35's AHCI (`-cdrom -boot d`).
#[test]
fn grub_rescue_cdrom_on_q35_ahci_reaches_the_menu() {
    if skip("grub_rescue_cdrom_on_q35_ahci_reaches_the_menu") {
        return;
    }
    let dir = scratch("ide-kvm-grub-q35");
    let out = boot(
        &dir,
        &["-M", "q35", "-cdrom", GRUB_ISO, "-boot", "d"],
        &["GNU GRUB", "grub>", "No bootable device"],
        GRUB_TIMEOUT,
    );
    assert!(out.contains("Booting from DVD/CD"), "{out}");
    assert!(out.contains("Welcome to GRUB"), "{out}");
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
    let _serial = support::BOOTS.lock().unwrap_or_else(|e| e.into_inner());
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

/// Where the rescue CD keeps GRUB's zfs.mod (20 blocks in grub-rescue-pc
/// 2.06), as xorriso reports it.
fn zfs_mod_lba() -> u64 {
    let out = std::process::Command::new("xorriso")
        .args(["-indev", GRUB_ISO, "-find", "/boot/grub/i386-pc/zfs.mod"])
        .args(["-exec", "report_lba"])
        .output()
        .expect("run xorriso (Debian package xorriso; make test installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    // "File data lba:  0 ,     2281 ,       20 ,    40672 , '/boot/...'"
    let line = text
        .lines()
        .find(|l| l.starts_with("File data lba:"))
        .unwrap_or_else(|| panic!("xorriso did not report zfs.mod: {text}"));
    let f: Vec<&str> = line.split(',').map(str::trim).collect();
    let blocks: u64 = f[2].parse().unwrap();
    assert!(
        blocks >= 16,
        "zfs.mod is too small to hold the marker: {line}"
    );
    f[1].parse().unwrap()
}

/// COM1 as a unix socket, read into a shared buffer by a thread, and typed
/// into one character at a time (GRUB drops keys typed while it redraws).
struct Serial {
    out: std::sync::Arc<Mutex<Vec<u8>>>,
    tx: std::os::unix::net::UnixStream,
}

impl Serial {
    fn connect(path: &Path) -> Serial {
        let start = std::time::Instant::now();
        let s = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > Duration::from_secs(20) => panic!("serial: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let out = std::sync::Arc::new(Mutex::new(Vec::new()));
        let (mut rx, o) = (s.try_clone().unwrap(), out.clone());
        std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut rx, &mut b) {
                if n == 0 {
                    break;
                }
                o.lock().unwrap().extend_from_slice(&b[..n]);
            }
        });
        Serial { out, tx: s }
    }

    fn len(&self) -> usize {
        self.out.lock().unwrap().len()
    }

    /// The output from byte `from` on, once `what` appears in it.
    fn wait(&self, from: usize, what: &str, timeout: Duration) -> String {
        let start = std::time::Instant::now();
        loop {
            let text = String::from_utf8_lossy(&self.out.lock().unwrap()[from..]).into_owned();
            if text.contains(what) {
                return text;
            }
            assert!(
                start.elapsed() < timeout,
                "'{what}' did not appear within {timeout:?}:\n{}",
                support::plain_text(&text)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn type_in(&mut self, s: &str) {
        for c in s.bytes() {
            std::io::Write::write_all(&mut self.tx, &[c]).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types a GRUB command and returns what it printed up to the next
    /// prompt.
    fn grub(&mut self, cmd: &str) -> String {
        self.type_in(cmd);
        // The echo (and any redraw of the line with its prompt) first.
        std::thread::sleep(Duration::from_millis(500));
        let from = self.len();
        self.type_in("\r");
        let out = self.wait(from, "grub> ", Duration::from_secs(120));
        support::plain_text(&out)
    }
}

/// A live CD swapped under a running guest ([QMP]'s removable media):
/// GRUB from the rescue CD at its prompt, `blockdev-change-medium` puts
/// another disc in the drive (the tray opens and closes), and GRUB reads
/// the new disc through SeaBIOS's INT 13h and Strata's ATAPI, after the
/// medium-change UNIT ATTENTION. GRUB caches the sectors it has read, so
/// its `ls` of a different disc lists the old root directory from that
/// cache (QEMU 7.2 with a different ISO9660 disc prints "unknown
/// filesystem"): the new disc is the rescue CD with one block changed that
/// GRUB never read, and GRUB's `hexdump` of that block must show it.
///
/// It also bounds SeaBIOS's serial console escapes up to the GRUB menu:
/// QEMU 7.2 printed 68 with its VGA and 296 without one (as here); an
/// earlier Strata was reported at 13 times QEMU's count.
#[test]
fn grub_reads_a_cd_swapped_under_it() {
    if skip("grub_reads_a_cd_swapped_under_it") {
        return;
    }
    let dir = scratch("ide-kvm-swap");
    let first = copy(Path::new(GRUB_ISO), &dir, "first.iso");
    // The new disc is the rescue CD with one 2 KiB block changed in the
    // middle of a file GRUB does not load (zfs.mod): its directories are
    // the same, so what GRUB cached of the old disc stays true, and the
    // block can only be read from the new disc.
    let lba = zfs_mod_lba();
    let marker_at = (lba as usize + 8) * 2048;
    let mut other = std::fs::read(GRUB_ISO).unwrap();
    for (i, b) in other[marker_at..marker_at + 2048].iter_mut().enumerate() {
        *b = b"STRATA-NEW-DISC!"[i % 16];
    }
    let other_path = dir.join("other.iso");
    std::fs::write(&other_path, &other).unwrap();

    let ser_path = dir.join("serial.sock");
    let qmp_path = dir.join("qmp.sock");
    let serial = format!("unix:{},server=on,wait=off", ser_path.display());
    let qmp = format!("unix:{},server=on,wait=off", qmp_path.display());
    let _one = support::BOOTS.lock().unwrap_or_else(|e| e.into_inner());
    /// Kills strata however the test ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _vm = Kill(
        std::process::Command::new(support::strata_bin())
            .args(["-nodefaults", "-m", "256", "-cdrom", &first, "-boot", "d"])
            .args(["-serial", &serial, "-qmp", &qmp])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn strata"),
    );
    let mut q = support::qmp::Qmp::negotiated(&qmp_path);
    let mut ser = Serial::connect(&ser_path);

    let menu = ser.wait(0, "Memtest86+", GRUB_TIMEOUT);
    let escapes = menu.matches("\u{1b}[").count();
    assert!(
        escapes <= 296,
        "{escapes} escape sequences up to the GRUB menu"
    );
    // The menu's command line, then a first hexdump: it loads GRUB's
    // hexdump module from the disc that is still the rescue CD.
    // GRUB drops keys while it draws: press `c` until the prompt shows.
    let from = ser.len();
    let start = std::time::Instant::now();
    loop {
        ser.type_in("c");
        std::thread::sleep(Duration::from_secs(10));
        let seen = String::from_utf8_lossy(&ser.out.lock().unwrap()[from..]).contains("grub> ");
        if seen {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(180), "no GRUB prompt");
    }
    // A `c` typed while the prompt was coming would prefix the next command.
    ser.grub("");
    let out = ser.grub("hexdump --length=16 (cd)");
    assert!(!out.contains("error"), "{out}");

    let r = q.ok(
        "blockdev-change-medium",
        serde_json::json!({"device": "ide1-cd0", "filename": other_path, "format": "raw"}),
    );
    assert_eq!(r, serde_json::json!({}));
    let e = q.event("DEVICE_TRAY_MOVED");
    assert_eq!(e["data"]["tray-open"], true);
    let e = q.event("DEVICE_TRAY_MOVED");
    assert_eq!(e["data"]["tray-open"], false);

    // The first read after the change may fail with the UNIT ATTENTION.
    let cmd = format!("hexdump --skip={marker_at} --length=16 (cd)");
    let mut outs = Vec::new();
    for _ in 0..3 {
        let out = ser.grub(&cmd);
        let found = out.contains("|STRATA-NEW-DISC!|");
        outs.push(out);
        if found {
            break;
        }
    }
    assert!(
        outs.last().unwrap().contains("|STRATA-NEW-DISC!|"),
        "GRUB did not read the new disc:\n{}",
        outs.join("\n---\n")
    );
    // And GRUB stays usable on the new disc.
    let out = ser.grub("ls");
    assert!(out.contains("(cd)"), "{out}");
}
