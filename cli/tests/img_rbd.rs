//! The `rbd` protocol against a real Ceph cluster on loopback (one
//! monitor and one OSD on memstore, tests/servers/ceph-cluster.sh):
//! strata-img creates, converts into and out of, resizes and inspects RBD
//! images, checked with Ceph's own `rbd export` and with qemu-img (whose
//! rbd driver Debian's qemu-block-extra provides) as the oracle.

mod support;

use std::process::Output;
use support::ceph::Ceph;
use support::img::{io, q_ok, s_ok, strata, Dir};

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A local qcow2 with data in three places.
fn source(d: &Dir) -> String {
    let src = d.p("src.qcow2");
    q_ok(&["create", "-q", "-f", "qcow2", &src, "64M"]);
    io(
        &src,
        "qcow2",
        &[
            "write -P 0x77 1M 3M",
            "write -P 0x11 60M 64k",
            "write -P 0x3c 4095k 2k",
        ],
    );
    src
}

#[test]
fn qcow2_converts_into_rbd_and_back() {
    let d = Dir::new("rbd", "convert");
    let ceph = Ceph::start(&d.0.join("ceph"));
    let src = source(&d);
    // Into an image made by `rbd create` (-n), then checked by Ceph.
    ceph.rbd(&["create", "--size", "64M", "rbd/disk"]);
    s_ok(&["convert", "-n", "-O", "raw", &src, &ceph.name("disk")]);
    let exported = d.p("export.raw");
    ceph.export("disk", &exported);
    let o = q_ok(&["compare", "-f", "raw", "-F", "qcow2", &exported, &src]);
    assert!(o.contains("Images are identical"), "{o}");
    // Into a new image strata-img makes.
    s_ok(&["convert", "-O", "raw", &src, &ceph.name("made")]);
    assert!(ceph.rbd(&["info", "rbd/made"]).contains("size 64 MiB"));
    // And out again, compared by qemu-img through its own rbd driver.
    let back = d.p("back.qcow2");
    s_ok(&["convert", "-O", "qcow2", &ceph.name("made"), &back]);
    let o = q_ok(&["compare", &back, &src]);
    assert!(o.contains("Images are identical"), "{o}");
    let o = q_ok(&["compare", "-f", "raw", &ceph.name("made"), &src]);
    assert!(o.contains("Images are identical"), "{o}");
}

#[test]
fn create_resize_and_qcow2_on_rbd() {
    let d = Dir::new("rbd", "create");
    let ceph = Ceph::start(&d.0.join("ceph"));
    let o = s_ok(&["create", "-f", "raw", &ceph.name("r"), "32M"]);
    assert!(o.contains("fmt=raw size=33554432"), "{o}");
    assert!(ceph.rbd(&["info", "rbd/r"]).contains("size 32 MiB"));
    s_ok(&["resize", "-f", "raw", &ceph.name("r"), "+32M"]);
    assert!(ceph.rbd(&["info", "rbd/r"]).contains("size 64 MiB"));
    let info = s_ok(&["info", "--output=json", &ceph.name("r")]);
    assert!(info.contains("\"virtual-size\": 67108864"), "{info}");

    // A qcow2 laid out on an RBD image (which grows as it is written),
    // then filled from a local image; qemu-img checks it over rbd.
    s_ok(&["create", "-f", "qcow2", &ceph.name("q"), "64M"]);
    let src = source(&d);
    s_ok(&["convert", "-n", "-O", "qcow2", &src, &ceph.name("q")]);
    let o = q_ok(&["check", &ceph.name("q")]);
    assert!(o.contains("No errors were found"), "{o}");
    let o = q_ok(&["compare", &ceph.name("q"), &src]);
    assert!(o.contains("Images are identical"), "{o}");

    // An image that exists is not made again.
    let o = strata(&["create", "-f", "raw", &ceph.name("r"), "1M"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("File exists"), "{}", err(&o));
}

#[test]
fn missing_pools_images_and_conf_files_fail_in_one_line() {
    let d = Dir::new("rbd", "errors");
    let ceph = Ceph::start(&d.0.join("ceph"));
    for (name, want) in [
        (ceph.name("nope"), "No such file or directory"),
        (
            format!("rbd:nopool/x:conf={}", ceph.conf),
            "error opening pool nopool",
        ),
        (
            "rbd:rbd/x:conf=/nonexistent.conf".to_string(),
            "error reading conf file",
        ),
        ("rbd:justanimage".to_string(), "Pool name is required"),
    ] {
        let o = strata(&["info", &name]);
        assert_eq!(o.status.code(), Some(1), "{name}");
        let e = err(&o);
        assert_eq!(e.lines().count(), 1, "{name}: {e}");
        assert!(e.contains(want), "{name}: {e}");
    }
}

#[test]
fn cephx_with_a_key_secret_and_a_monitor_list_as_libvirt_writes_them() {
    let d = Dir::new("rbd", "cephx");
    let ceph = Ceph::start_cephx(&d.0.join("ceph"));
    ceph.rbd(&["create", "--size", "64M", "rbd/disk"]);
    // No ceph.conf at all: the monitor, the user and the key come from
    // the options, the key from a secret object as libvirt passes it.
    let secret = format!("secret,id=k,data={},format=base64", ceph.admin_key());
    let node = format!(
        "json:{{\"driver\":\"raw\",\"file\":{{\"driver\":\"rbd\",\"pool\":\"rbd\",\"image\":\"disk\",\"user\":\"admin\",\"key-secret\":\"k\",\"auth-client-required\":[\"cephx\"],\"server\":[{{\"host\":\"127.0.0.1\",\"port\":\"{}\"}}]}}}}",
        ceph.mon_port()
    );
    let src = source(&d);
    s_ok(&[
        "convert", "-n", "--object", &secret, "-O", "raw", &src, &node,
    ]);
    // qemu-img reads it through the same options.
    let o = q_ok(&["compare", "--object", &secret, "-F", "qcow2", &node, &src]);
    assert!(o.contains("Images are identical"), "{o}");
    let exported = d.p("export.raw");
    ceph.export("disk", &exported);
    let o = q_ok(&["compare", "-f", "raw", "-F", "qcow2", &exported, &src]);
    assert!(o.contains("Images are identical"), "{o}");
}
