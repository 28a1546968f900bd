//! The `nfs` protocol driver against a real NFSv3 server on loopback:
//! NFS-Ganesha (user space, its VFS backend) exporting the test's
//! directory with a private configuration, registered with the
//! portmapper as QEMU's nfs driver (libnfs) expects. The portmapper is
//! the machine's `rpcbind` if one runs, else one the test starts.
//!
//! The portmapper holds one registration of NFS version 3, so the tests
//! take turns on a lock, each with its own server.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use support::img::{ok, Dir};

static SERIAL: Mutex<()> = Mutex::new(());

struct Ganesha {
    dir: Dir,
    ganesha: Child,
    rpcbind: Option<Child>,
    /// NFS and MOUNT ports.
    ports: [u16; 2],
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn wait(what: &str, mut f: impl FnMut() -> bool, child: &mut Child) {
    let t = Instant::now();
    while !f() {
        if let Some(s) = child.try_wait().unwrap() {
            panic!("{what}: the server exited: {s}");
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{what}: timed out");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Ganesha {
    /// `None` (with a SKIPPED line) where the server is not installed.
    fn start(tag: &str) -> Option<Ganesha> {
        for (bin, pkg) in [
            ("/usr/bin/ganesha.nfsd", "nfs-ganesha, nfs-ganesha-vfs"),
            ("/usr/sbin/rpcbind", "rpcbind"),
        ] {
            if !std::path::Path::new(bin).exists() {
                eprintln!(
                    "SKIPPED {tag}: {bin} missing (Debian packages {pkg}; make deps installs them)"
                );
                return None;
            }
        }
        let dir = Dir::new("nfs", tag);
        std::fs::create_dir_all(dir.p("export/sub/deeper")).unwrap();
        let rpcbind = if listening(111) {
            None
        } else {
            let _ = std::fs::create_dir_all("/run/rpcbind");
            let mut c = Command::new("/usr/sbin/rpcbind")
                .args(["-f", "-w"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            wait("rpcbind", || listening(111), &mut c);
            Some(c)
        };
        let ports: Vec<u16> = (0..4).map(|_| support::nbd::free_port()).collect();
        let export = dir.p("export");
        std::fs::write(
            dir.p("ganesha.conf"),
            format!(
                "NFS_CORE_PARAM {{\n NFS_Port = {};\n MNT_Port = {};\n NLM_Port = {};\n Rquota_Port = {};\n\
                 Bind_addr = 127.0.0.1;\n Protocols = 3;\n Enable_NLM = false;\n Enable_RQUOTA = false;\n\
                 Enable_UDP = false;\n}}\n\
                 NFS_KRB5 {{ Active_krb5 = false; }}\nNFSV4 {{ Graceless = true; }}\n\
                 EXPORT {{\n Export_Id = 1;\n Path = {export};\n Pseudo = {export};\n Access_Type = RW;\n\
                 Squash = No_Root_Squash;\n Protocols = 3;\n Transports = TCP;\n SecType = sys;\n\
                 FSAL {{ Name = VFS; }}\n}}\n",
                ports[0], ports[1], ports[2], ports[3]
            ),
        )
        .unwrap();
        let ganesha = spawn_ganesha(&dir, ports[0], ports[1]);
        Some(Ganesha {
            dir,
            ganesha,
            rpcbind,
            ports: [ports[0], ports[1]],
        })
    }

    /// Stop the server (cleanly) and start it again on the same ports.
    fn restart(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(self.dir.p("ganesha.log"));
        self.ganesha = spawn_ganesha(&self.dir, self.ports[0], self.ports[1]);
    }

    fn stop(&mut self) {
        // SIGTERM: ganesha unregisters from the portmapper on the way out.
        let _ = Command::new("kill")
            .args(["-TERM", &self.ganesha.id().to_string()])
            .status();
        let t = Instant::now();
        while self.ganesha.try_wait().ok().flatten().is_none() {
            if t.elapsed() > Duration::from_secs(10) {
                let _ = self.ganesha.kill();
                let _ = self.ganesha.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The `nfs://` URI of `name` in the export.
    fn uri(&self, name: &str) -> String {
        format!("nfs://127.0.0.1{}", self.dir.p(&format!("export/{name}")))
    }

    /// A file in the export.
    fn p(&self, name: &str) -> String {
        self.dir.p(&format!("export/{name}"))
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        self.stop();
        if let Some(r) = self.rpcbind.as_mut() {
            let _ = r.kill();
            let _ = r.wait();
        }
    }
}

/// Start ganesha.nfsd on the configuration in `dir`; wait until it serves
/// NFS on `nfs` and MOUNT on `mnt`.
fn spawn_ganesha(dir: &Dir, nfs: u16, mnt: u16) -> Child {
    let log = dir.p("ganesha.log");
    let mut ganesha = Command::new("/usr/bin/ganesha.nfsd")
        .args(["-F", "-f", &dir.p("ganesha.conf"), "-L", &log])
        .args(["-p", &dir.p("ganesha.pid"), "-N", "NIV_EVENT"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait(
        "ganesha",
        || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("NFS SERVER INITIALIZED"))
                && listening(nfs)
                && listening(mnt)
        },
        &mut ganesha,
    );
    ganesha
}

fn s_ok(args: &[&str]) -> String {
    support::img::s_ok(args)
}

fn s_err(args: &[&str]) -> String {
    let o = support::img::strata(args);
    assert!(!o.status.success(), "strata-img {args:?} succeeded");
    let e = String::from_utf8_lossy(&o.stderr).trim().to_string();
    assert_eq!(e.lines().count(), 1, "one line: {e}");
    e
}

fn pattern(path: &str, size: usize, seed: u8) -> Vec<u8> {
    let data: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ (i >> 13) as u8)
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn nfs_raw_read_write() {
    let _l = lock();
    let Some(g) = Ganesha::start("raw") else {
        return;
    };
    let data = pattern(&g.p("disk.raw"), 3 << 20, 1);
    let info = s_ok(&["info", "-f", "raw", &g.uri("disk.raw")]);
    assert!(
        info.contains("virtual size: 3 MiB (3145728 bytes)"),
        "{info}"
    );
    assert!(info.contains("protocol type: nfs"), "{info}");
    // Read: nfs -> local.
    let out = g.dir.p("out.raw");
    s_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &g.uri("disk.raw"),
        &out,
    ]);
    assert!(std::fs::read(&out).unwrap() == data);
    // Write: local -> nfs onto the existing file, 16 requests in flight
    // out of order (several connections), compared on disk.
    let new = pattern(&g.dir.p("new.raw"), 3 << 20, 7);
    s_ok(&[
        "convert",
        "-n",
        "-W",
        "-m",
        "16",
        "-S",
        "0",
        "-f",
        "raw",
        "-O",
        "raw",
        &g.dir.p("new.raw"),
        &g.uri("disk.raw"),
    ]);
    assert!(std::fs::read(g.p("disk.raw")).unwrap() == new);
    let c = s_ok(&["compare", &g.uri("disk.raw"), &g.dir.p("new.raw")]);
    assert!(c.contains("Images are identical"), "{c}");
    // Create, grow and shrink, in a directory below the export.
    let r = g.uri("sub/deeper/created.raw");
    s_ok(&["create", "-f", "raw", &r, "5M"]);
    let len = || {
        std::fs::metadata(g.p("sub/deeper/created.raw"))
            .unwrap()
            .len()
    };
    assert_eq!(len(), 5 << 20);
    s_ok(&["resize", "-f", "raw", &r, "7M"]);
    assert_eq!(len(), 7 << 20);
    s_ok(&["resize", "--shrink", "-f", "raw", &r, "1M"]);
    assert_eq!(len(), 1 << 20);
    // -blockdev's option names, through json:.
    let js = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"nfs","server":{{"type":"inet","host":"127.0.0.1"}},"path":"{}","user":"0","group":"0","debug":"2"}}}}"#,
        g.p("disk.raw")
    );
    let info = s_ok(&["info", &js]);
    assert!(info.contains("virtual size: 3 MiB"), "{info}");
}

#[test]
fn nfs_qcow2() {
    let _l = lock();
    let Some(g) = Ganesha::start("qcow2") else {
        return;
    };
    let q = g.uri("img.qcow2");
    let c = s_ok(&["create", "-f", "qcow2", &q, "64M"]);
    assert!(c.contains("fmt=qcow2"), "{c}");
    ok(
        &support::img::run("qemu-img", &["check", &g.p("img.qcow2")]),
        "qemu-img check",
    );
    pattern(&g.dir.p("src.raw"), 4 << 20, 3);
    s_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &g.dir.p("src.raw"),
        &q,
    ]);
    ok(
        &support::img::run("qemu-img", &["check", &g.p("img.qcow2")]),
        "qemu-img check",
    );
    let cmp = support::img::q_ok(&["compare", &g.dir.p("src.raw"), &g.p("img.qcow2")]);
    assert!(cmp.contains("identical"), "{cmp}");
    let chk = s_ok(&["check", &q]);
    assert!(chk.contains("No errors"), "{chk}");
    pattern(&g.dir.p("src2.raw"), 4 << 20, 9);
    s_ok(&[
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &g.dir.p("src2.raw"),
        &q,
    ]);
    let cmp = s_ok(&["compare", &q, &g.dir.p("src2.raw")]);
    assert!(cmp.contains("identical"), "{cmp}");
    let info = s_ok(&["info", &q]);
    assert!(info.contains("disk size: "), "{info}");
    // An overlay on NFS names its backing file relative to itself.
    let ov = g.uri("ov.qcow2");
    s_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "img.qcow2",
        "-F",
        "qcow2",
        &ov,
    ]);
    let info = s_ok(&["info", "--backing-chain", &ov]);
    assert!(info.contains(&format!("(actual path: {q})")), "{info}");
    let cmp = s_ok(&["compare", &ov, &g.dir.p("src2.raw")]);
    assert!(cmp.contains("identical"), "{cmp}");
}

#[test]
fn nfs_errors() {
    let _l = lock();
    let Some(g) = Ganesha::start("errors") else {
        return;
    };
    let e = s_err(&["info", &g.uri("missing.raw")]);
    assert!(
        e.contains("Failed to open file: NFS3ERR_NOENT: No such file or directory"),
        "{e}"
    );
    let e = s_err(&["info", "nfs://127.0.0.1/not-exported/x.raw"]);
    assert!(
        e.contains("Failed to mount nfs share '/not-exported'"),
        "{e}"
    );
    let e = s_err(&["info", &format!("{}?foo=1", g.uri("x.raw"))]);
    assert!(e.contains("Unknown NFS parameter name: foo"), "{e}");
    let e = s_err(&["info", &format!("{}?uid=me", g.uri("x.raw"))]);
    assert!(e.contains("Illegal value for NFS parameter: uid"), "{e}");
    // The port (Strata's server.port) is the NFS service's; MOUNT is found
    // through the portmapper.
    let e = s_err(&["info", &format!("nfs://127.0.0.1:1{}", g.p("x.raw"))]);
    assert!(e.contains("Failed to connect"), "{e}");
    // AUTH_SYS as another user: reading a 0644 file of root's is allowed,
    // writing it is refused when opening.
    pattern(&g.p("ro.raw"), 1 << 20, 1);
    let as_user = format!("{}?uid=1000&gid=1000", g.uri("ro.raw"));
    let info = s_ok(&["info", "-f", "raw", &as_user]);
    assert!(info.contains("virtual size: 1 MiB"), "{info}");
    let e = s_err(&[
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        &g.p("ro.raw"),
        &as_user,
    ]);
    assert!(
        e.contains("Failed to open file for writing (uid 1000, gid 1000): Permission denied"),
        "{e}"
    );
    std::fs::create_dir(g.p("adir")).unwrap();
    let e = s_err(&["info", &g.uri("adir")]);
    assert!(e.contains("is a directory"), "{e}");
}

/// qemu-img (with Debian's qemu-block-extra nfs module, libnfs) reads what
/// strata-img wrote over NFS, and the other way round.
#[test]
fn nfs_cross_qemu() {
    let _l = lock();
    let Some(g) = Ganesha::start("qemu") else {
        return;
    };
    let probe = support::img::run("qemu-img", &["info", &g.uri("none")]);
    let pe = String::from_utf8_lossy(&probe.stderr);
    if pe.contains("Unknown protocol") || pe.contains("Unknown driver") {
        eprintln!("SKIPPED nfs_cross_qemu: qemu-img has no nfs driver (qemu-block-extra): {pe}");
        return;
    }
    pattern(&g.dir.p("src.raw"), 2 << 20, 5);
    let a = g.uri("a.qcow2");
    s_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &g.dir.p("src.raw"),
        &a,
    ]);
    let c = support::img::q_ok(&["compare", &a, &g.dir.p("src.raw")]);
    assert!(c.contains("identical"), "{c}");
    let b = g.uri("b.qcow2");
    support::img::q_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &g.dir.p("src.raw"),
        &b,
    ]);
    let c = s_ok(&["compare", &b, &g.dir.p("src.raw")]);
    assert!(c.contains("identical"), "{c}");
}

/// The VMM: `-drive file=nfs://...` and `-blockdev driver=nfs` (under a
/// qcow2 node), written and read through HMP's qemu-io, checked on disk.
#[test]
fn nfs_vmm_drive_and_blockdev() {
    use serde_json::json;
    let _l = lock();
    let Some(g) = Ganesha::start("vmm") else {
        return;
    };
    std::fs::write(g.p("disk.raw"), vec![0u8; 1 << 20]).unwrap();
    support::img::q_ok(&["create", "-q", "-f", "qcow2", &g.p("disk.qcow2"), "4M"]);
    let qmp = g.dir.p("qmp.sock");
    let drive = format!("if=none,id=d0,format=raw,file={}", g.uri("disk.raw"));
    let blockdev = format!(
        "driver=qcow2,node-name=q1,file.driver=nfs,file.server.type=inet,\
         file.server.host=127.0.0.1,file.path={},file.user=0,file.group=0",
        g.p("disk.qcow2")
    );
    let qmp_arg = format!("unix:{qmp},server=on,wait=off");
    let mut qt = support::qtest::Qtest::start(&[
        "-qmp",
        &qmp_arg,
        "-drive",
        &drive,
        "-blockdev",
        &blockdev,
        "-device",
        "virtio-blk-pci,drive=q1",
    ]);
    let mut q = support::qmp::Qmp::negotiated(std::path::Path::new(&qmp));
    for (dev, pat) in [("d0", 0x5a), ("q1", 0xa5)] {
        for cmd in ["write", "read"] {
            let line = format!("qemu-io {dev} \"{cmd} -P 0x{pat:02x} 65536 131072\"");
            let r = q.ok("human-monitor-command", json!({ "command-line": line }));
            let r = r.as_str().unwrap();
            assert!(
                r.starts_with(if cmd == "write" { "wrote" } else { "read" }),
                "{line}: {r}"
            );
        }
    }
    // The server restarts under the running VM: the next requests
    // reconnect (the file handles stay valid) and go through.
    let mut g = g;
    g.restart();
    for (dev, pat) in [("d0", 0x5a), ("q1", 0xa5)] {
        let line = format!("qemu-io {dev} \"read -P 0x{pat:02x} 65536 131072\"");
        let r = q.ok("human-monitor-command", json!({ "command-line": line }));
        assert!(r.as_str().unwrap().starts_with("read"), "{line}: {r}");
    }
    q.ok("quit", json!({}));
    assert!(
        qt.wait_exit(Duration::from_secs(30)).is_some(),
        "strata did not exit"
    );
    let raw = std::fs::read(g.p("disk.raw")).unwrap();
    assert!(raw[65536..196608].iter().all(|&b| b == 0x5a));
    assert!(raw[..65536].iter().all(|&b| b == 0));
    support::img::io(&g.p("disk.qcow2"), "qcow2", &["read -P 0xa5 65536 131072"]);
    support::img::q_ok(&["check", &g.p("disk.qcow2")]);
}
