//! The boot disk of the virtio boot tests: a boot sector
//! (images/virtio/bootsect.S) that reads two sectors through INT 13h and
//! prints VIRTIO-BOOT-OK on COM1 when they hold its signatures.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Assembles the boot sector with GNU as into `dir`.
pub fn boot_sector(dir: &Path) -> Vec<u8> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../images/virtio/bootsect.S");
    let obj = dir.join("bootsect.o");
    let bin = dir.join("bootsect.bin");
    let ok = Command::new("as")
        .args(["--32", "-o"])
        .arg(&obj)
        .arg(&src)
        .status()
        .expect("GNU as (binutils) is needed to build the boot sector")
        .success();
    assert!(ok, "as failed on {}", src.display());
    let ok = Command::new("ld")
        .args([
            "-m",
            "elf_i386",
            "-Ttext=0x7c00",
            "--oformat",
            "binary",
            "-o",
        ])
        .arg(&bin)
        .arg(&obj)
        .status()
        .expect("ld")
        .success();
    assert!(ok, "ld failed");
    let b = std::fs::read(&bin).unwrap();
    assert_eq!(b.len(), 512);
    b
}

/// A 1 MiB disk: the boot sector, then the signatures it checks (or wrong
/// ones, so that booting it prints VIRTIO-BOOT-BAD).
pub fn disk(dir: &Path, name: &str, good: bool) -> PathBuf {
    let mut d = boot_sector(dir);
    d.resize(1 << 20, 0);
    let (s1, s2): (&[u8], &[u8]) = if good {
        (b"VIRTDATA", b"SECTOR2!")
    } else {
        (b"XXXXXXXX", b"YYYYYYYY")
    };
    d[512..520].copy_from_slice(s1);
    d[1024..1032].copy_from_slice(s2);
    let p = dir.join(name);
    std::fs::write(&p, d).unwrap();
    p
}
