//! SeaBIOS boots from a Ceph RBD image: the project's write-test disk is
//! converted into `rbd:rbd/boot` with strata-img, booted under KVM with
//! `-drive file=rbd:rbd/boot:conf=...,format=raw` (its boot sector checks
//! its data and writes 64 sectors through INT 13h), and `rbd export`
//! shows the guest's writes in the cluster.

mod support;

use std::time::Duration;
use support::ceph::Ceph;
use support::img::{s_ok, Dir};
use support::{kvm_available, require_bios, scratch};

#[test]
fn seabios_boots_and_writes_an_rbd_disk() {
    if !kvm_available("seabios_boots_and_writes_an_rbd_disk") {
        return;
    }
    require_bios();
    let src = support::image("ide-disk-write.img");
    let d = Dir::new("rbd-kvm", "boot");
    let ceph = Ceph::start(&d.0.join("ceph"));
    s_ok(&[
        "convert",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &ceph.name("boot"),
    ]);
    let before = std::fs::read(&src).unwrap();

    let dir = scratch("rbd-kvm-boot");
    let drive = format!("file={},format=raw,if=ide,index=0", ceph.name("boot"));
    let out = support::boot_until(
        &dir,
        &["-drive", &drive],
        &["STRATA-WRITE-OK", "STRATA-BOOT-FAIL"],
        Duration::from_secs(180),
    );
    assert!(out.contains("Booting from Hard Disk"), "{out}");
    assert!(out.contains("STRATA-WRITE-OK"), "{out}");

    // LBA 257-320 now hold a copy of LBA 193-256, in the cluster.
    let exported = d.p("after.raw");
    ceph.export("boot", &exported);
    let after = std::fs::read(&exported).unwrap();
    assert_eq!(after.len(), before.len());
    assert_eq!(after[257 * 512..321 * 512], before[193 * 512..257 * 512]);
    assert_eq!(after[..257 * 512], before[..257 * 512]);
}
