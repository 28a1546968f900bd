//! strata-storage-daemon without a guest: its NBD export read and written
//! by qemu-img and qemu-io, its QMP monitor (`block-export-add/del`,
//! `query-block-exports`, `blockdev-add`, `quit`), `--daemonize` with
//! `--pidfile`, and the one-line errors of its command line. The
//! vhost-user-blk export's data path is tested with a Linux driver in
//! `vhost_user_tcg.rs`.

mod support;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::img::{q_ok, s_ok};
use support::nbd::wait_listening;
use support::qmp::Qmp;

fn daemon_bin() -> &'static str {
    env!("CARGO_BIN_EXE_strata-storage-daemon")
}

fn spawn(args: &[String]) -> Child {
    Command::new(daemon_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn run(args: &[&str]) -> Output {
    Command::new(daemon_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn wait_exit(c: &mut Child, what: &str) -> i32 {
    let t = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s.code().unwrap_or(-1);
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{what} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A socket path short enough for sun_path, unique per test.
fn sock(name: &str) -> String {
    std::env::temp_dir()
        .join(format!("strata-sd-{name}-{}.sock", std::process::id()))
        .display()
        .to_string()
}

#[test]
fn nbd_export_read_and_written_by_qemu_img() {
    let dir = support::scratch("storage-daemon-nbd");
    let img = dir.join("disk.qcow2");
    let img_s = img.display().to_string();
    q_ok(&["create", "-f", "qcow2", &img_s, "16M"]);
    let nbd = sock("nbd");
    let qmp = sock("nbd-qmp");
    let mut d = spawn(&[
        "--blockdev".into(),
        format!("driver=file,node-name=file0,filename={img_s}"),
        // The JSON form, as libvirt writes it.
        "--blockdev".into(),
        r#"{"driver":"qcow2","node-name":"disk0","file":"file0"}"#.into(),
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path={nbd}"),
        "--export".into(),
        "type=nbd,id=exp0,node-name=disk0,name=disk,writable=on".into(),
        "--chardev".into(),
        format!("socket,id=m,path={qmp},server=on,wait=off"),
        "--monitor".into(),
        "chardev=m".into(),
    ]);
    wait_listening("strata-storage-daemon", Some(&nbd), None, &mut d);
    let uri = format!("nbd+unix:///disk?socket={nbd}");
    support::img::run("qemu-io", &["-f", "raw", "-c", "write -P 0x6b 1M 2M", &uri]);
    let out = support::img::run("qemu-io", &["-f", "raw", "-c", "read -P 0x6b 1M 2M", &uri]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("read 2097152/2097152"),
        "{out:?}"
    );
    // qemu-img converts from the export, and strata-img compares.
    let copy = dir.join("copy.raw").display().to_string();
    q_ok(&["convert", "-f", "raw", "-O", "raw", &uri, &copy]);
    let mut m = Qmp::negotiated(Path::new(&qmp));
    let r = m.ok("query-block-exports", json!({}));
    assert_eq!(
        r,
        json!([{"id": "exp0", "type": "nbd", "node-name": "disk0", "shutting-down": false}])
    );
    // A second export of the same node over QMP, read-only.
    m.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "exp1", "node-name": "disk0", "name": "ro"}),
    );
    let ro = format!("nbd+unix:///ro?socket={nbd}");
    let w = support::img::run("qemu-io", &["-f", "raw", "-c", "write 0 64k", &ro]);
    let text = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(
        !text.contains("wrote"),
        "a read-only export took a write: {text}"
    );
    let (class, desc) = m.err(
        "block-export-add",
        json!({"type": "nbd", "id": "exp1", "node-name": "disk0"}),
    );
    assert_eq!(class, "GenericError");
    assert!(desc.contains("already in use"), "{desc}");
    m.ok("block-export-del", json!({"id": "exp1"}));
    let (_, desc) = m.err("block-export-del", json!({"id": "exp1"}));
    assert!(desc.contains("not found"), "{desc}");
    m.ok("quit", json!({}));
    assert_eq!(wait_exit(&mut d, "the daemon after quit"), 0);
    // Closed cleanly: no lock left, the image consistent and holding the
    // client's write.
    q_ok(&["check", &img_s]);
    s_ok(&["compare", "-f", "qcow2", "-F", "raw", &img_s, &copy]);
    let out = support::img::run(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0x6b 1M 2M", &img_s],
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("read 2097152"),
        "{out:?}"
    );
}

#[test]
fn vhost_user_export_over_qmp() {
    let dir = support::scratch("storage-daemon-vhost-qmp");
    let img = dir.join("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let qmp = sock("vu-qmp");
    let vu = sock("vu");
    let mut d = spawn(&[
        "--blockdev".into(),
        format!("driver=file,node-name=disk0,filename={}", img.display()),
        "--chardev".into(),
        format!("socket,id=m,path={qmp},server=on,wait=off"),
        "--monitor".into(),
        "m".into(),
    ]);
    let mut m = Qmp::negotiated(Path::new(&qmp));
    m.ok(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "vu0", "node-name": "disk0",
               "addr": {"type": "unix", "path": vu}, "writable": true, "num-queues": 2}),
    );
    assert!(Path::new(&vu).exists());
    let r = m.ok("query-block-exports", json!({}));
    assert_eq!(
        r,
        json!([{"id": "vu0", "type": "vhost-user-blk", "node-name": "disk0", "shutting-down": false}])
    );
    let (_, desc) = m.err(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "vu1", "node-name": "disk0",
               "addr": {"type": "inet", "host": "127.0.0.1", "port": "1"}}),
    );
    assert!(desc.contains("unix socket"), "{desc}");
    let (_, desc) = m.err(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "vu1", "node-name": "disk0",
               "addr": {"type": "unix", "path": vu}, "num-queues": 0}),
    );
    assert!(desc.contains("num-queues"), "{desc}");
    // VDUSE: arguments are checked first; then a host without it is told
    // so (with it, the device is made: devices::virtio::vduse's tests
    // run its protocol through a kernel stand-in).
    let (_, desc) = m.err(
        "block-export-add",
        json!({"type": "vduse-blk", "id": "vd0", "node-name": "disk0", "queue-size": 3}),
    );
    assert!(desc.contains("queue-size 3"), "{desc}");
    let r = m.execute(
        "block-export-add",
        json!({"type": "vduse-blk", "id": "vd0", "node-name": "disk0"}),
    );
    if Path::new("/dev/vduse/control").exists() {
        assert!(r.get("return").is_some(), "{r}");
        m.ok("block-export-del", json!({"id": "vd0"}));
    } else {
        let desc = r["error"]["desc"].as_str().unwrap_or_default().to_string();
        assert!(desc.contains("no VDUSE"), "{desc}");
    }
    m.ok("block-export-del", json!({"id": "vu0"}));
    assert!(!Path::new(&vu).exists(), "the socket outlived its export");
    assert_eq!(m.ok("query-block-exports", json!({})), json!([]));
    m.ok("quit", json!({}));
    assert_eq!(wait_exit(&mut d, "the daemon after quit"), 0);
}

#[test]
fn daemonize_writes_the_pidfile_and_sigterm_ends_it() {
    let dir = support::scratch("storage-daemon-daemonize");
    let img = dir.join("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let pid = dir.join("daemon.pid");
    let nbd = sock("daemonize");
    let out = run(&[
        "--blockdev",
        &format!("driver=file,node-name=disk0,filename={}", img.display()),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={nbd}"),
        "--export",
        "nbd,id=e,node-name=disk0",
        "--pidfile",
        pid.to_str().unwrap(),
        "--daemonize",
    ]);
    assert!(out.status.success(), "{out:?}");
    // Ready when the parent returns: the export answers at once.
    let info = q_ok(&[
        "info",
        "-f",
        "raw",
        &format!("nbd+unix:///disk0?socket={nbd}"),
    ]);
    assert!(info.contains("1 MiB"), "{info}");
    let p = std::fs::read_to_string(&pid).unwrap().trim().to_string();
    Command::new("kill").args(["-TERM", &p]).status().unwrap();
    let t = Instant::now();
    while pid.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "the pid file stayed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn command_line_errors_are_one_line() {
    let cases: &[(&[&str], &str)] = &[
        (&["--bogus"], "--bogus: unrecognized option"),
        (&["--blockdev"], "--blockdev: requires an argument"),
        (
            &[
                "--blockdev",
                "driver=file,node-name=x,filename=/nonexistent/strata",
            ],
            "--blockdev driver=file",
        ),
        (
            &["--export", "type=nbd,id=e,node-name=nowhere"],
            "--export type=nbd,id=e,node-name=nowhere:",
        ),
        (
            &[
                "--export",
                "type=vhost-user-blk,id=e,node-name=n,num-queues=x",
            ],
            "num-queues=x: expected a number",
        ),
        (
            &["--monitor", "chardev=m,mode=readline"],
            "only QMP monitors",
        ),
        (
            &[
                "--blockdev",
                "driver=null-co,node-name=n",
                "--export",
                "type=vhost-user-blk,id=e,node-name=n,addr.type=fd,addr.str=99",
            ],
            "addr.str: file descriptor 99 was not inherited",
        ),
        (
            &[
                "--blockdev",
                "driver=null-co,node-name=n",
                "--export",
                "type=vduse-blk,id=v,node-name=n,queue-size=63",
            ],
            "queue-size 63 must be a power of two",
        ),
        (&["stray"], "stray: unexpected argument"),
    ];
    for (args, want) in cases {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("strata-storage-daemon: "), "{err}");
        assert!(err.contains(want), "{args:?}: {err} (wanted {want})");
    }
    let help = run(&["--help"]);
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--export"));
    let v = run(&["-V"]);
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("strata-storage-daemon version"));
}
