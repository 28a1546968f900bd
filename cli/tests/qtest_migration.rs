//! Live migration, Strata to Strata, of qtest machines (q35 with its
//! built-in AHCI and a qcow2 disk on both sides): guest RAM, PCI config
//! and AHCI registers arrive; the run states and events are QEMU's
//! (`STOP` on the source, `RESUME` on the destination, `postmigrate`);
//! the image changes hands (the destination can write it after, the
//! source cannot); a machine that cannot migrate says why; a destination
//! that cannot load fails the migration and the source runs on; a bad
//! stream makes the destination exit 1 in one line.

mod support;

use serde_json::json;
use std::path::Path;
use std::time::Duration;
use support::qmp::Qmp;
use support::qtest::Qtest;

fn qcow2(dir: &Path) -> String {
    let p = dir.join("disk.qcow2").display().to_string();
    let o = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", &p, "64M"])
        .output()
        .unwrap();
    assert!(o.status.success());
    p
}

/// A q35 qtest machine with a QMP socket, and `extra` arguments.
fn machine(dir: &Path, name: &str, disk: &str, extra: &[&str]) -> (Qtest, Qmp) {
    let sock = dir.join(format!("{name}.qmp"));
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let drive = format!("if=ide,file={disk},format=qcow2");
    let mut args = vec!["-m", "384", "-qmp", &qmp, "-drive", &drive];
    args.extend_from_slice(extra);
    let qt = Qtest::start_machine("q35", &args, &[]);
    let q = Qmp::negotiated(&sock);
    (qt, q)
}

const AHCI: u8 = 0x1f;
const AHCI_FN: u8 = 2;

#[test]
fn ram_pci_config_and_ahci_registers_move_and_the_image_changes_hands() {
    let dir = support::scratch("migration");
    let disk = qcow2(&dir);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let (mut dst, mut dq) = machine(&dir, "dst", &disk, &["-incoming", &uri]);
    assert_eq!(dq.ok("query-status", json!({}))["status"], "inmigrate");
    let (mut src, mut sq) = machine(&dir, "src", &disk, &[]);
    // RAM, and the AHCI function set up as a driver would: BAR5, memory
    // and bus mastering, then HBA registers (GHC.AE, a port's CLB).
    src.memwrite(0x10_0000, b"strata migrates this");
    src.writeq(0x1000_0000, 0x1122_3344_5566_7788);
    let bar5 = 0xfeb0_0000u32;
    src.pci_write32(AHCI, AHCI_FN, 0x24, bar5);
    src.pci_write32(AHCI, AHCI_FN, 0x04, 0x0006);
    src.writel(bar5 as u64 + 0x04, 0x8000_0000);
    src.writel(bar5 as u64 + 0x100, 0x0020_0000);
    let cap = src.readl(bar5 as u64);
    assert_eq!(sq.ok("query-status", json!({}))["status"], "running");
    assert_eq!(sq.ok("migrate", json!({"uri": uri})), json!({}));
    sq.event("STOP");
    dq.event("RESUME");
    let info = sq.ok("query-migrate", json!({}));
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(sq.ok("query-status", json!({}))["status"], "postmigrate");
    assert_eq!(dq.ok("query-status", json!({}))["status"], "running");
    assert_eq!(dst.memread(0x10_0000, 20), b"strata migrates this");
    assert_eq!(dst.readl(0x1000_0000), 0x5566_7788);
    assert_eq!(dst.pci_read32(AHCI, AHCI_FN, 0x24), bar5);
    assert_eq!(dst.pci_read32(AHCI, AHCI_FN, 0x04) & 0x7, 0x6);
    assert_eq!(dst.readl(bar5 as u64), cap);
    assert_eq!(dst.readl(bar5 as u64 + 0x04) & 0x8000_0000, 0x8000_0000);
    assert_eq!(dst.readl(bar5 as u64 + 0x100), 0x0020_0000);
    // The source gave the image up: `cont` there is refused.
    let (_, e) = sq.err("cont", json!({}));
    assert!(e.contains("migrated"), "{e}");
    // The destination owns it: a write through its drive goes in.
    let r = dq.ok(
        "human-monitor-command",
        json!({"command-line": "qemu-io ide0-hd0 \"write -P 0x5a 0 4k\""}),
    );
    assert!(!r.as_str().unwrap_or("").contains("rror"), "{r}");
    sq.ok("quit", json!({}));
    assert!(src.wait_exit(Duration::from_secs(30)).is_some());
    dq.ok("quit", json!({}));
    assert!(dst.wait_exit(Duration::from_secs(30)).is_some());
    let o = std::process::Command::new("qemu-img")
        .args(["check", &disk])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let o = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x5a 0 4k", &disk])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("read 4096/4096"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn a_stopped_source_stays_stopped_and_failures_are_reported() {
    let dir = support::scratch("migration-fail");
    let disk = qcow2(&dir);
    // Nobody listens: `migrate` fails at once, the source runs on.
    let (mut src, mut sq) = machine(&dir, "src", &disk, &[]);
    let missing = format!("unix:{}", dir.join("nobody.sock").display());
    let (_, e) = sq.err("migrate", json!({"uri": missing}));
    assert!(e.contains("Failed to connect"), "{e}");
    let (_, e) = sq.err("migrate", json!({"uri": "exec:cat"}));
    assert!(e.contains("unknown migration protocol: exec"), "{e}");
    assert_eq!(sq.ok("query-status", json!({}))["status"], "running");
    // A destination of another RAM size refuses the stream: the source
    // hears it, says `failed`, and runs again.
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let other = dir.join("other.qcow2").display().to_string();
    std::fs::copy(&disk, &other).unwrap();
    let sock = dir.join("dst.qmp");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let drive = format!("if=ide,file={other},format=qcow2");
    let mut dst = Qtest::start_machine(
        "q35",
        &[
            "-m",
            "256",
            "-qmp",
            &qmp,
            "-drive",
            &drive,
            "-incoming",
            &uri,
        ],
        &[],
    );
    // Its main loop answers once it listens (libqos reads fw_cfg first).
    dst.cmos(0);
    sq.ok("migrate", json!({"uri": uri}));
    let info = sq.ok("query-migrate", json!({}));
    assert_eq!(info["status"], "failed", "{info}");
    assert!(
        info["error-desc"]
            .as_str()
            .unwrap()
            .contains("RAM layout mismatch"),
        "{info}"
    );
    sq.event("RESUME");
    assert_eq!(sq.ok("query-status", json!({}))["status"], "running");
    // The destination gave up, exit code 1.
    let st = dst
        .wait_exit(Duration::from_secs(30))
        .expect("destination exits");
    assert_eq!(st.code(), Some(1));
    // The source still owns its image.
    let r = sq.ok(
        "human-monitor-command",
        json!({"command-line": "qemu-io ide0-hd0 \"write -P 0x11 0 512\""}),
    );
    assert!(!r.as_str().unwrap_or("").contains("rror"), "{r}");
    sq.ok("quit", json!({}));
    assert!(src.wait_exit(Duration::from_secs(30)).is_some());
}

#[test]
fn machines_that_cannot_migrate_say_why_and_bad_streams_end_the_destination() {
    let dir = support::scratch("migration-block");
    let disk = qcow2(&dir);
    // A device without migratable state blocks it, by name.
    let sock = dir.join("b.qmp");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let mut b = Qtest::start_machine(
        "q35",
        &[
            "-qmp",
            &qmp,
            "-device",
            "virtio-blk-pci,drive=none0,id=vd0",
            "-drive",
            "if=none,id=none0,driver=null-co",
        ],
        &[],
    );
    let mut bq = Qmp::negotiated(&sock);
    let (_, e) = bq.err("migrate", json!({"uri": "unix:/nonexistent"}));
    assert!(e.contains("virtio-blk-pci"), "{e}");
    let info = bq.ok("query-migrate", json!({}));
    assert!(
        info["blocked-reasons"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "{info}"
    );
    bq.ok("quit", json!({}));
    assert!(b.wait_exit(Duration::from_secs(30)).is_some());
    // Garbage on the incoming socket: the destination exits 1, saying so
    // in one line.
    let uri_path = dir.join("in.sock");
    let uri = format!("unix:{}", uri_path.display());
    let drive = format!("if=ide,file={disk},format=qcow2");
    let mut d = Qtest::start_machine("q35", &["-drive", &drive, "-incoming", &uri], &[]);
    d.cmos(0);
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&uri_path).unwrap();
        s.write_all(b"this is not a migration stream").unwrap();
    }
    let st = d
        .wait_exit(Duration::from_secs(30))
        .expect("destination exits");
    assert_eq!(st.code(), Some(1));
}
