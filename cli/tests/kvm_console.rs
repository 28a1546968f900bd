//! Serial console back-ends under KVM: the `mon:stdio` multiplexer's Ctrl-A
//! keys, and a Unix-socket serial port in server mode.

mod support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{kvm_available, require_bios, scratch, strata_bin};

#[test]
fn ctrl_a_h_prints_help_and_ctrl_a_x_quits() {
    if !kvm_available("ctrl_a_h_prints_help_and_ctrl_a_x_quits") {
        return;
    }
    require_bios();
    let mut child = Command::new(strata_bin())
        .args(["-nodefaults", "-serial", "mon:stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"\x01h").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stdin.write_all(b"\x01x").unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "Ctrl-A x did not end strata"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(out.contains("C-a x    exit Strata"), "{out}");
    assert!(out.contains("Strata: Terminated"), "{out}");
}

#[test]
fn unix_socket_serial_server() {
    if !kvm_available("unix_socket_serial_server") {
        return;
    }
    require_bios();
    let dir = scratch("serial-unix");
    let sock = dir.join("com1.sock");
    let mut child = Command::new(strata_bin())
        .args([
            "-nodefaults",
            "-serial",
            &format!("unix:{},server,nowait", sock.display()),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("cannot connect to the serial socket: {e}"),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("No bootable device.") {
        let n = s.read(&mut buf).expect("serial output");
        assert!(n > 0, "socket closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let _ = child.kill();
    let _ = child.wait();
}
