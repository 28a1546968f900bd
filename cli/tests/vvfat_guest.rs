//! A host directory put into a Linux guest with `-hda fat:rw:DIR`: the
//! project's test guest (images/linux-kernel, vfat built in) mounts it,
//! reads a host file, writes a multi-cluster file, makes a directory with
//! a file in it, renames and deletes host files, fsyncs each (FAT's fsync
//! flushes the disk, where vvfat writes back) and unmounts
//! (images/linux-init, `vfat=`); the test then finds every change in the
//! host directory. One boot, about 20 s here.

mod support;

use std::time::Duration;
use support::{kernels, kvm_available, run_until_marker, scratch};

/// A directory with what the guest's `vfat=` step expects.
fn shared(root: &std::path::Path) -> Vec<u8> {
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root).unwrap();
    let hello: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(root.join("hello.txt"), &hello).unwrap();
    std::fs::write(root.join("rename-me.txt"), b"keep my bytes\n").unwrap();
    std::fs::write(root.join("delete-me.txt"), b"gone soon\n").unwrap();
    hello
}

/// What the guest's `vfat=` step leaves in the directory.
fn assert_changed(root: &std::path::Path, hello: &[u8]) {
    let what = root.display();
    let written = std::fs::read(root.join("from-guest.bin")).unwrap();
    let want: Vec<u8> = (0..20_000 / 8)
        .flat_map(|i| kernels::rwloop_pattern(7, i * 8).to_le_bytes())
        .collect();
    assert!(
        written == want,
        "{what}: from-guest.bin differs ({} bytes)",
        written.len()
    );
    assert_eq!(
        std::fs::read(root.join("guest dir/inner.txt")).unwrap(),
        b"inner\n"
    );
    assert_eq!(
        std::fs::read(root.join("renamed.txt")).unwrap(),
        b"keep my bytes\n"
    );
    assert_eq!(std::fs::read(root.join("hello.txt")).unwrap(), hello);
    let mut names: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["from-guest.bin", "guest dir", "hello.txt", "renamed.txt"],
        "{what}: renamed and deleted, nothing else (no staging directory left)"
    );
}

/// `-hda fat:rw:DIR`: the partition sda1 through ata_piix. (Not the
/// floppy form: `fat:rw:floppy:` is tested through the block layer in
/// img_vvfat.rs; Linux's floppy writes on the i82078 are tested on a raw
/// image in linux_lane.rs.)
#[test]
fn linux_guest_reads_and_writes_a_host_directory() {
    if !kvm_available("linux_guest_reads_and_writes_a_host_directory") {
        return;
    }
    let dir = scratch("vvfat-guest");
    let disk = dir.join("disk");
    let hello = shared(&disk);
    let log = dir.join("serial.log");
    let _ = std::fs::remove_file(&log);
    let append = format!("{} acpi=off quiet vfat=sda1", kernels::LINUX_CMDLINE);
    let mut args = kernels::linux_args("vmlinux", &log, &append);
    args.extend(["-hda".to_string(), format!("fat:rw:{}", disk.display())]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_until_marker(&args, &log, "GUEST-DONE", Duration::from_secs(180));
    assert!(!out.contains("GUEST-ERR"), "{out}");
    let read = format!(
        "GUEST-VFAT-READ {} {:016x}",
        hello.len(),
        kernels::fnv1a64(&hello)
    );
    assert!(
        out.contains(&read),
        "the guest read hello.txt wrongly:\n{out}"
    );
    assert!(out.contains("GUEST-VFAT-DONE"), "{out}");
    assert_changed(&disk, &hello);
}
