//! [QMP] The QMP and HMP monitors of a running strata (qtest mode), driven
//! over their sockets by a real JSON client: the handshake, errors that
//! leave the monitor up, several clients, clients that vanish, events,
//! the endpoint forms (`-qmp`, `-chardev` + `-mon`, `-monitor`, TCP), the
//! queries and blockdev-add/del.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use support::qmp::Qmp;
use support::qtest::Qtest;

fn sock(name: &str) -> PathBuf {
    support::scratch("qmp").join(name)
}

/// A strata in qtest mode with a QMP server socket.
fn start(extra: &[&str]) -> (Qtest, PathBuf) {
    let path = sock("qmp.sock");
    let qmp = format!("unix:{},server=on,wait=off", path.display());
    let mut args = vec!["-qmp", &qmp];
    args.extend_from_slice(extra);
    (Qtest::start(&args), path)
}

#[test]
fn handshake_errors_and_id_echo() {
    let (_qt, path) = start(&[]);
    let mut q = Qmp::connect(&path);
    let v = &q.greeting["QMP"]["version"];
    assert_eq!(v["qemu"], json!({"major": 7, "minor": 2, "micro": 0}));
    assert!(v["package"].as_str().unwrap().contains("Strata"));
    assert!(q.greeting["QMP"]["capabilities"].is_array());
    // Nothing but negotiation is accepted first.
    let (class, desc) = q.err("query-status", json!({}));
    assert_eq!(class, "CommandNotFound");
    assert_eq!(
        desc,
        "Expecting capabilities negotiation with 'qmp_capabilities'"
    );
    let r = q.raw(r#"{"execute": "qmp_capabilities", "id": "neg-1"}"#);
    assert_eq!(r, json!({"return": {}, "id": "neg-1"}));
    let (class, _) = q.err("qmp_capabilities", json!({}));
    assert_eq!(class, "CommandNotFound");

    // The id comes back verbatim, whatever its JSON type.
    let r = q.raw(r#"{"execute": "query-status", "id": {"n": [1, 2]}}"#);
    assert_eq!(r["id"], json!({"n": [1, 2]}));
    assert_eq!(r["return"]["status"], "running");
    assert_eq!(r["return"]["running"], true);

    // Malformed JSON, then a message split across writes.
    let r = q.raw("{\"execute\": }\n");
    assert_eq!(r["error"]["class"], "GenericError");
    assert!(r["error"]["desc"]
        .as_str()
        .unwrap()
        .starts_with("JSON parse error"));
    q.send_raw("{\"exec");
    std::thread::sleep(Duration::from_millis(50));
    let r = q.raw("ute\": \"query-name\", \"id\": 5}");
    assert_eq!(r, json!({"return": {}, "id": 5}));
    // QEMU's single-quoted strings.
    let r = q.raw("{'execute': 'query-kvm'}");
    assert_eq!(r["return"]["enabled"], false);

    // Envelope and argument errors.
    let r = q.raw("[1, 2]");
    assert_eq!(r["error"]["desc"], "QMP input must be a JSON object");
    let r = q.raw(r#"{"arguments": {}, "id": 9}"#);
    assert_eq!(r["error"]["desc"], "QMP input lacks member 'execute'");
    assert_eq!(r["id"], 9);
    assert_eq!(
        q.err("frobnicate", json!({})),
        (
            "CommandNotFound".into(),
            "The command frobnicate has not been found".into()
        )
    );
    assert_eq!(
        q.err("blockdev-del", json!({})).1,
        "Parameter 'node-name' is missing"
    );
    assert_eq!(
        q.err("blockdev-del", json!({"node-name": 42})).1,
        "Invalid parameter type for 'node-name', expected: string"
    );
    assert_eq!(
        q.err("query-status", json!({"verbose": true})).1,
        "Parameter 'verbose' is unexpected"
    );
    // A message past the size limit is refused, and the next one works.
    let big = format!("{{\"execute\": \"{}\"}}\n", "x".repeat(2 << 20));
    let r = q.raw(&big);
    assert!(r["error"]["desc"].as_str().unwrap().contains("too large"));
    // Still up.
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
}

#[test]
fn two_clients_get_events_and_vanishing_clients_do_no_harm() {
    let (_qt, path) = start(&[]);
    let mut a = Qmp::negotiated(&path);
    let mut b = Qmp::negotiated(&path);
    // A client that never negotiates gets no events but does not block.
    let mut idle = Qmp::connect(&path);

    a.ok("stop", json!({}));
    let e = a.event("STOP");
    assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
    b.event("STOP");
    assert_eq!(b.ok("query-status", json!({}))["status"], "paused");
    b.ok("cont", json!({}));
    a.event("RESUME");
    b.event("RESUME");

    // Clients that disconnect mid-command or mid-message.
    for text in [
        "{\"execute\": \"query-pci\"}",
        "{\"execute\": \"qmp_capabilities\"}{\"execute\": \"query-block\"}",
        "{\"execute\": \"query-",
    ] {
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(text.as_bytes()).unwrap();
        drop(s);
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(a.ok("query-status", json!({}))["status"], "running");
    assert_eq!(b.ok("query-name", json!({})), json!({}));
    assert!(idle.events.is_empty());
    let (class, _) = idle.err("query-status", json!({}));
    assert_eq!(class, "CommandNotFound");
}

#[test]
fn queries_answer_in_qemus_shapes() {
    let (_qt, path) = start(&["-name", "guest7", "-smp", "2"]);
    let mut q = Qmp::negotiated(&path);
    assert_eq!(q.ok("query-name", json!({})), json!({"name": "guest7"}));
    let v = q.ok("query-version", json!({}));
    assert_eq!(v["qemu"]["major"], 7);
    let cmds = q.ok("query-commands", json!({}));
    for c in [
        "query-block",
        "blockdev-add",
        "human-monitor-command",
        "quit",
    ] {
        assert!(
            cmds.as_array().unwrap().iter().any(|x| x["name"] == c),
            "{c} missing from query-commands"
        );
    }
    let schema = q.ok("query-qmp-schema", json!({}));
    assert!(schema
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "query-block" && e["meta-type"] == "command"));
    let machines = q.ok("query-machines", json!({}));
    assert!(machines
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "pc" && m["is-default"] == true));
    let cpus = q.ok("query-cpus-fast", json!({}));
    assert_eq!(cpus.as_array().unwrap().len(), 2);
    // PCI: the i440FX host bridge at 00.0 and PIIX3 IDE at 01.1.
    let pci = q.ok("query-pci", json!({}));
    let devs = pci[0]["devices"].as_array().unwrap();
    assert!(devs
        .iter()
        .any(|d| d["slot"] == 0 && d["id"]["vendor"] == 0x8086 && d["id"]["device"] == 0x1237));
    assert!(devs
        .iter()
        .any(|d| d["slot"] == 1 && d["function"] == 1 && d["class_info"]["class"] == 0x0101));
    let types = q.ok("qom-list-types", json!({"implements": "pci-device"}));
    assert!(types
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == "virtio-blk-pci"));
    // HMP through QMP.
    let text = q.ok(
        "human-monitor-command",
        json!({"command-line": "info status"}),
    );
    assert_eq!(text, "VM status: running\n");
    let text = q.ok("human-monitor-command", json!({"command-line": "info pci"}));
    assert!(text.as_str().unwrap().contains("PCI device 8086:7010"));
    q.ok(
        "human-monitor-command",
        json!({"command-line": "info chardev"}),
    );
    let text = q.ok(
        "human-monitor-command",
        json!({"command-line": "info qtree"}),
    );
    assert_eq!(text, "", "no devices on the command line");
}

/// Strata reports QEMU 7.2, and 7.2's clients read answers with a strict
/// visitor (libqos's qos-test aborts on a member it does not know), so the
/// answers hold 7.2's members and no later ones.
#[test]
fn answers_have_only_the_members_of_qemu_7_2() {
    let (_qt, path) = start(&[]);
    let mut q = Qmp::negotiated(&path);
    let machine_info = [
        "name",
        "alias",
        "is-default",
        "cpu-max",
        "hotpluggable-cpus",
        "numa-mem-supported",
        "deprecated",
        "default-cpu-type",
        "default-ram-id",
    ];
    let machines = q.ok("query-machines", json!({}));
    for m in machines.as_array().unwrap() {
        for k in m.as_object().unwrap().keys() {
            assert!(machine_info.contains(&k.as_str()), "{k} in {m}");
        }
    }
    let types = q.ok(
        "qom-list-types",
        json!({"abstract": true, "implements": "device"}),
    );
    for t in types.as_array().unwrap() {
        for k in t.as_object().unwrap().keys() {
            assert!(["name", "abstract", "parent"].contains(&k.as_str()), "{k}");
        }
    }
}

#[test]
fn query_block_and_blockdev_add_del() {
    let dir = support::scratch("qmp-block");
    let img = dir.join("a.qcow2");
    let hd = dir.join("hd.raw");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M")
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(&hd, vec![0u8; 1 << 20]).unwrap();
    let drive = format!("file={},format=raw,if=ide,id=disk0", hd.display());
    let (_qt, path) = start(&["-drive", &drive]);
    let mut q = Qmp::negotiated(&path);

    let blocks = q.ok("query-block", json!({}));
    let d = &blocks.as_array().unwrap()[0];
    assert_eq!(d["device"], "disk0");
    assert_eq!(d["removable"], false);
    assert_eq!(d["inserted"]["drv"], "raw");
    assert_eq!(d["inserted"]["file"], hd.display().to_string());
    assert_eq!(d["inserted"]["image"]["virtual-size"], 1 << 20);
    let stats = q.ok("query-blockstats", json!({}));
    assert_eq!(stats[0]["device"], "disk0");
    assert!(stats[0]["stats"]["rd_operations"].is_u64());

    // I/O limits, set and cleared at run time.
    let zero = json!({"device": "disk0", "bps": 0, "bps_rd": 0, "bps_wr": 0,
                      "iops": 0, "iops_rd": 0, "iops_wr": 0});
    let mut lim = zero.clone();
    lim["bps"] = json!(1 << 20);
    lim["iops_wr"] = json!(100);
    q.ok("block_set_io_throttle", lim);
    let b = q.ok("query-block", json!({}));
    assert_eq!(b[0]["inserted"]["bps"], 1 << 20);
    assert_eq!(b[0]["inserted"]["iops_wr"], 100);
    let mut bad = zero.clone();
    bad["bps"] = json!(1);
    bad["bps_rd"] = json!(1);
    assert_eq!(
        q.err("block_set_io_throttle", bad).1,
        "bps(iops) and bps(iops)_rd/_wr cannot be used at the same time"
    );
    let mut nope = zero.clone();
    nope["device"] = json!("nope");
    assert_eq!(q.err("block_set_io_throttle", nope).0, "DeviceNotFound");
    q.ok("block_set_io_throttle", zero);
    let b = q.ok("query-block", json!({}));
    assert_eq!(b[0]["inserted"]["bps"], 0);

    q.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "n0",
               "file": {"driver": "file", "filename": img.display().to_string()}}),
    );
    let nodes = q.ok("query-named-block-nodes", json!({}));
    let n0 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "n0")
        .expect("n0 listed");
    assert_eq!(n0["drv"], "qcow2");
    assert_eq!(n0["image"]["virtual-size"], 16 << 20);
    // A second node with the same name is refused.
    let (class, desc) = q.err(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "n0",
               "file": {"driver": "file", "filename": img.display().to_string()}}),
    );
    assert_eq!(class, "GenericError");
    assert!(!desc.is_empty());
    q.ok("blockdev-del", json!({"node-name": "n0"}));
    let nodes = q.ok("query-named-block-nodes", json!({}));
    assert!(!nodes
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["node-name"] == "n0"));
    assert_eq!(
        q.err("blockdev-del", json!({"node-name": "n0"})).1,
        "Failed to find node with node-name='n0'"
    );
    // The image is closed: qemu-img may open it for writing again.
    let st = std::process::Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn reset_and_quit_send_their_events() {
    let (mut qt, path) = start(&[]);
    let mut q = Qmp::negotiated(&path);
    q.ok("system_reset", json!({}));
    let e = q.event("RESET");
    assert_eq!(
        e["data"],
        json!({"guest": false, "reason": "host-qmp-system-reset"})
    );
    q.ok("system_powerdown", json!({}));
    q.event("POWERDOWN");
    // A guest reset (the PCI reset control register) is the guest's.
    qt.outb(0xcf9, 0x06);
    let e = q.event("RESET");
    assert_eq!(e["data"]["guest"], true);
    q.ok("quit", json!({}));
    let e = q.event("SHUTDOWN");
    assert_eq!(
        e["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    let st = qt.wait_exit(Duration::from_secs(10)).expect("strata exits");
    assert!(st.success());
}

/// libqtest's way: strata connects to the test's socket through a client
/// `-chardev socket` and a control `-mon`.
#[test]
fn chardev_client_socket_and_mon() {
    let path = sock("listen.sock");
    let l = UnixListener::bind(&path).unwrap();
    let chardev = format!("socket,path={},id=char0", path.display());
    let _qt = Qtest::start(&["-chardev", &chardev, "-mon", "chardev=char0,mode=control"]);
    let (s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut q = Qmp::over(Box::new(s.try_clone().unwrap()), Box::new(s));
    assert_eq!(q.ok("qmp_capabilities", json!({})), json!({}));
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
}

#[test]
fn hmp_on_a_socket_and_qmp_over_tcp() {
    let hmp = sock("hmp.sock");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mon = format!("unix:{},server=on,wait=off", hmp.display());
    let tcp = format!("tcp:127.0.0.1:{port},server=on,wait=off");
    let _qt = Qtest::start(&["-monitor", &mon, "-qmp", &tcp, "-S"]);

    let s = {
        let start = std::time::Instant::now();
        loop {
            match UnixStream::connect(&hmp) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < Duration::from_secs(20) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let read_until = |r: &mut BufReader<UnixStream>, what: &str| {
        let mut seen = String::new();
        while !seen.contains(what) {
            let mut buf = vec![0u8; 256];
            let n = std::io::Read::read(r, &mut buf).unwrap();
            assert!(n > 0, "HMP closed; saw {seen:?}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        seen
    };
    read_until(&mut r, "(strata) ");
    w.write_all(b"info status\n").unwrap();
    assert!(read_until(&mut r, "(strata) ").contains("VM status: paused (prelaunch)"));
    w.write_all(b"frob\n").unwrap();
    assert!(read_until(&mut r, "(strata) ").contains("unknown command: 'frob'"));

    let t = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut q = Qmp::over(Box::new(t.try_clone().unwrap()), Box::new(t));
    q.ok("qmp_capabilities", json!({}));
    assert_eq!(q.ok("query-status", json!({}))["status"], "prelaunch");
    q.ok("cont", json!({}));
    q.event("RESUME");
    w.write_all(b"info status\n").unwrap();
    assert!(read_until(&mut r, "(strata) ").contains("VM status: running"));
    let _ = r.lines();
}

#[test]
fn option_errors_are_one_line() {
    for (args, want) in [
        (
            vec!["-chardev", "socket,id=c"],
            "exactly one of 'path' and 'port'",
        ),
        (vec!["-chardev", "null"], "Parameter 'id' is missing"),
        (
            vec!["-chardev", "null,id=a", "-chardev", "null,id=a"],
            "Duplicate ID 'a' for chardev",
        ),
        (vec!["-mon", "chardev=nope"], "Chardev 'nope' not found"),
        (
            vec!["-qmp", "bogus:x"],
            "-qmp bogus:x: unsupported character device",
        ),
        (vec!["-chardev", "serial,id=p"], "not supported by Strata"),
    ] {
        let (code, _out, err) = support::run_strata(&args, Duration::from_secs(10));
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// A management tool's view: QEMU's own `qmp-shell` (the QEMU project's
/// `qemu.qmp` package, installed by `make deps`) connects and runs
/// `query-block` and `query-status`.
#[test]
fn qemu_projects_qmp_shell_runs_query_block() {
    let shell =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/qmp-venv/bin/qmp-shell");
    assert!(
        shell.exists(),
        "{} is missing: run `make deps` (it installs QEMU's qemu.qmp)",
        shell.display()
    );
    let dir = support::scratch("qmp-shell");
    let hd = dir.join("hd.raw");
    std::fs::write(&hd, vec![0u8; 1 << 20]).unwrap();
    let drive = format!("file={},format=raw,if=ide,id=disk0", hd.display());
    let (_qt, path) = start(&["-drive", &drive]);
    // Wait for the socket, then let qmp-shell speak.
    drop(Qmp::connect(&path));
    let mut child = std::process::Command::new(&shell)
        .arg(&path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"query-block\nquery-status\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Connected to QEMU 7.2.0"), "{text}");
    assert!(text.contains("\"device\": \"disk0\""), "{text}");
    assert!(text.contains("\"status\": \"running\""), "{text}");
}

/// `-chardev pty` + `-serial chardev:ID`, libvirt's serial console: the
/// pty's name is in `query-chardev`, and bytes cross it both ways.
#[test]
fn pty_serial_console() {
    let (mut qt, path) = start(&[
        "-chardev",
        "pty,id=charserial0",
        "-serial",
        "chardev:charserial0",
    ]);
    let mut q = Qmp::negotiated(&path);
    let devs = q.ok("query-chardev", json!({}));
    let name = devs
        .as_array()
        .unwrap()
        .iter()
        .find_map(|d| {
            d["filename"]
                .as_str()?
                .strip_prefix("pty:")
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no pty in {devs}"));
    let mut pty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&name)
        .unwrap();
    // The guest writes COM1's THR; the bytes come out of the pty.
    for b in b"hi!" {
        qt.outb(0x3f8, *b);
    }
    let mut buf = [0u8; 3];
    std::io::Read::read_exact(&mut pty, &mut buf).unwrap();
    assert_eq!(&buf, b"hi!");
    // Typed into the pty, read by the guest from RBR once LSR says so.
    pty.write_all(b"z").unwrap();
    let start = std::time::Instant::now();
    while qt.inb(0x3fd) & 1 == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "no data ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(qt.inb(0x3f8), b'z');
}

/// A client that stops reading while events keep coming is dropped once
/// its queue is full, instead of making strata buffer without bound; the
/// other clients and the guest go on.
#[test]
fn a_client_that_never_reads_is_dropped() {
    let (_qt, path) = start(&[]);
    let mut stuck = Qmp::negotiated(&path);
    let mut busy = Qmp::negotiated(&path);
    // Each round is two events for `stuck`, which reads none of them:
    // more than its queue and its socket's buffer hold.
    for _ in 0..4500 {
        busy.ok("stop", json!({}));
        busy.ok("cont", json!({}));
        busy.events.clear();
    }
    assert_eq!(busy.ok("query-status", json!({}))["status"], "running");
    // The stuck client's connection was closed after its queue filled:
    // what it can still read ends before all 9000 events.
    let mut n = 0;
    loop {
        let mut line = String::new();
        match std::io::BufRead::read_line(&mut stuck_reader(&mut stuck), &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => n += 1,
        }
        assert!(n < 9_000, "every event was kept for the stuck client");
    }
    assert!(n > 0);
}

fn stuck_reader(q: &mut Qmp) -> &mut dyn std::io::BufRead {
    q.reader()
}

/// `qom-list` and `qom-get`: the devices as QEMU's object tree shows them
/// to libvirt (`/machine/peripheral/ID`, `peripheral-anon/device[N]`,
/// partial paths by id), with their properties' types and values.
#[test]
fn qom_list_and_get_show_the_devices() {
    let dir = support::scratch("qom");
    let disk = dir.join("d.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let drive = format!("if=none,id=d0,file={},format=raw", disk.display());
    let disk1 = dir.join("d1.raw");
    std::fs::File::create(&disk1)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let drive1 = format!("if=none,id=d1,file={},format=raw", disk1.display());
    let (_qt, path) = start(&[
        "-drive",
        &drive,
        "-drive",
        &drive1,
        "-device",
        "virtio-blk-pci,drive=d0,id=vd0,addr=5",
        "-device",
        "virtio-blk-pci,drive=d1,addr=6",
    ]);
    let mut q = Qmp::negotiated(&path);
    let root = q.ok("qom-list", json!({"path": "/"}));
    assert!(
        root.as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "machine"),
        "{root}"
    );
    let per = q.ok("qom-list", json!({"path": "/machine/peripheral"}));
    assert!(
        per.as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "vd0" && p["type"] == "child<virtio-blk-pci>"),
        "{per}"
    );
    let anon = q.ok("qom-list", json!({"path": "/machine/peripheral-anon"}));
    assert!(anon.to_string().contains("child<virtio-blk-pci>"), "{anon}");
    let anon_dev = anon
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str().unwrap().starts_with("device["))
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    let p = format!("/machine/peripheral-anon/{anon_dev}");
    assert_eq!(
        q.ok("qom-get", json!({"path": p, "property": "drive"})),
        "d1"
    );
    let props = q.ok("qom-list", json!({"path": "/machine/peripheral/vd0"}));
    assert!(
        props
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "drive" && p["type"] == "str"),
        "{props}"
    );
    assert_eq!(
        q.ok("qom-get", json!({"path": "vd0", "property": "drive"})),
        "d0"
    );
    assert_eq!(
        q.ok(
            "qom-get",
            json!({"path": "/machine/peripheral/vd0", "property": "type"})
        ),
        "virtio-blk-pci"
    );
    assert_eq!(
        q.ok("qom-get", json!({"path": "vd0", "property": "addr"})),
        5 << 3
    );
    assert_eq!(
        q.ok("qom-get", json!({"path": "vd0", "property": "realized"})),
        true
    );
    let (class, desc) = q.err(
        "qom-get",
        json!({"path": "/machine/peripheral/nope", "property": "type"}),
    );
    assert_eq!(
        (class.as_str(), desc.as_str()),
        (
            "DeviceNotFound",
            "Device '/machine/peripheral/nope' not found"
        )
    );
    let (_, desc) = q.err("qom-get", json!({"path": "vd0", "property": "nope"}));
    assert_eq!(desc, "Property 'nope' not found");
}

/// `query-iothreads` reports each iothread's `poll-max-ns`: the one given
/// on `-object iothread`, or the default QEMU also uses.
#[test]
fn query_iothreads_reports_polling() {
    let (_qt, path) = start(&[
        "-object",
        "iothread,id=io0",
        "-object",
        "iothread,id=io1,poll-max-ns=0",
    ]);
    let mut q = Qmp::negotiated(&path);
    let v = q.ok("query-iothreads", json!({}));
    assert_eq!(v[0]["id"], "io0", "{v}");
    assert_eq!(v[0]["poll-max-ns"], 32768, "{v}");
    assert_eq!(v[1]["poll-max-ns"], 0, "{v}");
}

/// HMP `info block` in QEMU 7.2's layout (file, format and read-only on
/// the head line; attachment, tray, cache mode and backing file below;
/// a blank line between drives), and `info version`.
#[test]
fn hmp_info_block_and_version() {
    let dir = support::scratch("info-block");
    let (base, top, raw) = (
        dir.join("base.qcow2"),
        dir.join("top.qcow2"),
        dir.join("raw.img"),
    );
    let img = |args: &[&str]| {
        let st = std::process::Command::new(env!("CARGO_BIN_EXE_strata-img"))
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "{args:?}");
    };
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    img(&["create", "-f", "qcow2", b, "16M"]);
    img(&["create", "-f", "qcow2", "-b", b, "-F", "qcow2", t]);
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let r = raw.to_str().unwrap();
    let hd = format!("file={t},if=ide,id=hd0");
    let vd = format!("file={r},format=raw,if=virtio,id=vd0,cache=none,readonly=on");
    let cd = format!("file={r},format=raw,media=cdrom,id=cd0");
    let un = format!("file={r},format=raw,if=none,id=un0,cache=unsafe,readonly=on");
    let (_qt, path) = start(&[
        "-drive",
        &hd,
        "-drive",
        &vd,
        "-drive",
        &cd,
        "-drive",
        &un,
        "-drive",
        "if=none,id=empty",
    ]);
    let mut q = Qmp::negotiated(&path);
    let mut hmp = |line: &str| -> String {
        q.ok("human-monitor-command", json!({"command-line": line}))
            .as_str()
            .unwrap()
            .to_string()
    };
    let out = hmp("info block");
    let drives: Vec<&str> = out.trim_end().split("\n\n").collect();
    assert_eq!(drives.len(), 5, "{out}");
    let lines = |i: usize| -> Vec<&str> { drives[i].lines().collect() };
    let hd0 = lines(0);
    assert!(hd0[0].starts_with("hd0 (#block"), "{out}");
    assert!(hd0[0].ends_with(&format!("): {t} (qcow2)")), "{out}");
    assert!(hd0[1].starts_with("    Attached to:      "), "{out}");
    assert_eq!(hd0[2], "    Cache mode:       writeback", "{out}");
    assert_eq!(
        hd0[3],
        format!("    Backing file:     {b} (chain depth: 1)"),
        "{out}"
    );
    let vd0 = lines(1);
    assert!(
        vd0[0].ends_with(&format!(": {r} (raw, read-only)")),
        "{out}"
    );
    assert_eq!(vd0[2], "    Cache mode:       writeback, direct", "{out}");
    let cd0 = lines(2);
    assert!(
        cd0[0].ends_with(&format!(": {r} (raw, read-only)")),
        "{out}"
    );
    assert_eq!(
        cd0[2], "    Removable device: not locked, tray closed",
        "{out}"
    );
    assert_eq!(cd0[3], "    Cache mode:       writeback", "{out}");
    // A drive no device uses: removable, not attached.
    let un0 = lines(3);
    assert_eq!(
        un0[1..],
        [
            "    Removable device: not locked, tray closed",
            "    Cache mode:       writeback, ignore flushes"
        ],
        "{out}"
    );
    assert_eq!(
        lines(4),
        [
            "empty: [not inserted]",
            "    Removable device: not locked, tray closed"
        ],
        "{out}"
    );
    let v = hmp("info version");
    assert!(v.starts_with("7.2.0 (Strata "), "{v}");
    assert!(v.ends_with(")\n") && v.lines().count() == 1, "{v}");
}
