//! A live CD straight from a web server: `-cdrom https://...` under KVM
//! with SeaBIOS reaches the GRUB menu of Debian's rescue CD, served by
//! tests/servers/http_range.py over TLS, the certificate checked against
//! the CA that `CURL_CA_BUNDLE` names; and the same CD as
//! `-drive driver=https,url=...,readahead=,sslverify=off,timeout=`.

mod support;

use std::path::Path;
use std::time::Duration;
use support::web::WebServer;
use support::{kvm_available, require_bios, scratch};

const GRUB_ISO: &str = "/usr/lib/grub-rescue/grub-rescue-cdrom.iso";

#[test]
fn grub_rescue_cd_boots_from_an_https_url() {
    if !kvm_available("grub_rescue_cd_boots_from_an_https_url") {
        return;
    }
    require_bios();
    assert!(
        Path::new(GRUB_ISO).exists(),
        "{GRUB_ISO} is missing: install the Debian package grub-rescue-pc (make test does)"
    );
    let dir = scratch("web-kvm-grub");
    let root = dir.join("www");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(GRUB_ISO, root.join("live.iso")).unwrap();
    let srv = WebServer::https(&root, &[]);
    let url = srv.url("live.iso");
    let ca = srv.cert.as_ref().unwrap().to_str().unwrap().to_string();
    let out = support::boot_until_env(
        &dir,
        &["-cdrom", &url, "-boot", "d"],
        &[("CURL_CA_BUNDLE", &ca)],
        &["GNU GRUB", "grub>", "No bootable device", "Boot failed"],
        Duration::from_secs(400),
    );
    assert!(out.contains("Booting from DVD/CD"), "{out}");
    assert!(out.contains("Welcome to GRUB"), "{out}");
}

#[test]
fn grub_rescue_cd_boots_from_a_drive_with_https_options() {
    if !kvm_available("grub_rescue_cd_boots_from_a_drive_with_https_options") {
        return;
    }
    require_bios();
    let dir = scratch("web-kvm-drive");
    let root = dir.join("www");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(GRUB_ISO, root.join("live.iso")).unwrap();
    let srv = WebServer::https(&root, &[]);
    let drive = format!(
        "driver=https,url={},readahead=1M,sslverify=off,timeout=10,media=cdrom,if=ide,index=2",
        srv.url("live.iso")
    );
    let out = support::boot_until(
        &dir,
        &["-drive", &drive, "-boot", "d"],
        &["GNU GRUB", "grub>", "No bootable device", "Boot failed"],
        Duration::from_secs(400),
    );
    assert!(out.contains("Booting from DVD/CD"), "{out}");
    assert!(out.contains("Welcome to GRUB"), "{out}");
}
