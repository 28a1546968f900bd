//! The `ssh` protocol driver against a real OpenSSH server on loopback: a
//! private `sshd` with its own host key and authorized keys, and a private
//! `ssh-agent` holding the client key. strata-img runs with `HOME` and
//! `SSH_AUTH_SOCK` pointing into the test's directory, so nothing reads
//! or writes the user's `~/.ssh`.

mod support;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::img::{ok, Dir};

/// A private sshd and ssh-agent, stopped on drop.
struct Sshd {
    dir: Dir,
    port: u16,
    sshd: Child,
    agent: Child,
}

fn sh(cmd: &str) -> String {
    let o = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    ok(&o, cmd).trim().to_string()
}

impl Sshd {
    /// `None` (with a SKIPPED line) where OpenSSH's server is missing.
    fn start(tag: &str) -> Option<Sshd> {
        if !std::path::Path::new("/usr/sbin/sshd").exists() {
            eprintln!("SKIPPED {tag}: /usr/sbin/sshd missing (Debian package openssh-server; make deps installs it)");
            return None;
        }
        let dir = Dir::new("ssh", tag);
        let d = dir.0.to_str().unwrap().to_string();
        sh(&format!(
            "ssh-keygen -q -t ed25519 -N '' -f {d}/hostkey && \
             ssh-keygen -q -t ed25519 -N '' -f {d}/otherkey && \
             ssh-keygen -q -t ed25519 -N '' -f {d}/clientkey && \
             cp {d}/clientkey.pub {d}/authorized_keys && mkdir -p {d}/home/.ssh"
        ));
        // The privilege separation directory sshd insists on.
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = support::nbd::free_port();
        std::fs::write(
            dir.p("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/hostkey\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
                 StrictModes no\nUsePAM no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPidFile {d}/sshd.pid\n\
                 Subsystem sftp internal-sftp\n"
            ),
        )
        .unwrap();
        let mut sshd = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f", &dir.p("sshd_config")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.p("sshd.log")).unwrap())
            .spawn()
            .unwrap();
        support::nbd::wait_listening("sshd", None, Some(port), &mut sshd);
        let sock = dir.p("agent.sock");
        let agent = Command::new("ssh-agent")
            .args(["-D", "-a", &sock])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !std::path::Path::new(&sock).exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "ssh-agent never listened"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        sh(&format!("SSH_AUTH_SOCK={sock} ssh-add -q {d}/clientkey"));
        Some(Sshd {
            dir,
            port,
            sshd,
            agent,
        })
    }

    /// `ssh://` URI of `name` in the test directory, with `query`.
    fn uri(&self, name: &str, query: &str) -> String {
        format!(
            "ssh://root@127.0.0.1:{}{}{query}",
            self.port,
            self.dir.p(name)
        )
    }

    /// The host key's fingerprint in hex (`md5` or `sha256`) of `key`.
    fn fingerprint(&self, key: &str, hash: &str) -> String {
        sh(&format!(
            "awk '{{print $2}}' {} | base64 -d | {hash}sum | cut -d' ' -f1",
            self.dir.p(&format!("{key}.pub"))
        ))
    }

    /// strata-img with the private agent and home.
    fn strata(&self, args: &[&str]) -> Output {
        self.cmd(env!("CARGO_BIN_EXE_strata-img"), args)
    }

    fn cmd(&self, prog: &str, args: &[&str]) -> Output {
        Command::new(prog)
            .args(args)
            .env("SSH_AUTH_SOCK", self.dir.p("agent.sock"))
            .env("HOME", self.dir.p("home"))
            .output()
            .unwrap()
    }

    fn s_ok(&self, args: &[&str]) -> String {
        ok(&self.strata(args), &format!("strata-img {args:?}"))
    }

    /// strata-img's error line, which must fail.
    fn s_err(&self, args: &[&str]) -> String {
        let o = self.strata(args);
        assert!(!o.status.success(), "strata-img {args:?} succeeded");
        let e = String::from_utf8_lossy(&o.stderr).trim().to_string();
        assert_eq!(e.lines().count(), 1, "one line: {e}");
        e
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
        let _ = self.agent.kill();
        let _ = self.agent.wait();
    }
}

fn pattern(path: &str, size: usize, seed: u8) -> Vec<u8> {
    let data: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

#[test]
fn ssh_raw_read_write() {
    let Some(s) = Sshd::start("raw") else { return };
    let no = "?host_key_check=no";
    let data = pattern(&s.dir.p("disk.raw"), 3 << 20, 1);
    let info = s.s_ok(&["info", "-f", "raw", &s.uri("disk.raw", no)]);
    assert!(
        info.contains("virtual size: 3 MiB (3145728 bytes)"),
        "{info}"
    );
    assert!(info.contains("protocol type: ssh"), "{info}");
    // Read: ssh -> local, byte for byte.
    let out = s.dir.p("out.raw");
    s.s_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &s.uri("disk.raw", no),
        &out,
    ]);
    assert!(std::fs::read(&out).unwrap() == data);
    // Write: local -> ssh onto the existing file (-n), 16 requests in
    // flight out of order (several sessions), then compare on disk.
    let new = pattern(&s.dir.p("new.raw"), 3 << 20, 7);
    s.s_ok(&[
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
        &s.dir.p("new.raw"),
        &s.uri("disk.raw", no),
    ]);
    assert!(std::fs::read(s.dir.p("disk.raw")).unwrap() == new);
    let c = s.s_ok(&["compare", &s.uri("disk.raw", no), &s.dir.p("new.raw")]);
    assert!(c.contains("Images are identical"), "{c}");
    // Create, grow and shrink a raw file over ssh.
    let r = s.uri("created.raw", no);
    s.s_ok(&["create", "-f", "raw", &r, "5M"]);
    assert_eq!(
        std::fs::metadata(s.dir.p("created.raw")).unwrap().len(),
        5 << 20
    );
    s.s_ok(&["resize", "-f", "raw", &r, "7M"]);
    assert_eq!(
        std::fs::metadata(s.dir.p("created.raw")).unwrap().len(),
        7 << 20
    );
    s.s_ok(&["resize", "--shrink", "-f", "raw", &r, "1M"]);
    assert_eq!(
        std::fs::metadata(s.dir.p("created.raw")).unwrap().len(),
        1 << 20
    );
}

#[test]
fn ssh_qcow2() {
    let Some(s) = Sshd::start("qcow2") else {
        return;
    };
    let no = "?host_key_check=no";
    let q = s.uri("img.qcow2", no);
    let c = s.s_ok(&["create", "-f", "qcow2", &q, "64M"]);
    assert!(c.contains("fmt=qcow2"), "{c}");
    ok(
        &support::img::run("qemu-img", &["check", &s.dir.p("img.qcow2")]),
        "qemu-img check",
    );
    // Data into a new qcow2 image over ssh, then checked and compared on disk.
    pattern(&s.dir.p("src.raw"), 4 << 20, 3);
    s.s_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &s.dir.p("src.raw"),
        &q,
    ]);
    ok(
        &support::img::run("qemu-img", &["check", &s.dir.p("img.qcow2")]),
        "qemu-img check",
    );
    let cmp = support::img::q_ok(&["compare", &s.dir.p("src.raw"), &s.dir.p("img.qcow2")]);
    assert!(cmp.contains("identical"), "{cmp}");
    let chk = s.s_ok(&["check", &q]);
    assert!(chk.contains("No errors"), "{chk}");
    let info = s.s_ok(&["info", &q]);
    assert!(info.contains("file format: qcow2"), "{info}");
    // Writes through the qcow2 format on the ssh protocol, read back.
    pattern(&s.dir.p("src2.raw"), 4 << 20, 9);
    s.s_ok(&[
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &s.dir.p("src2.raw"),
        &q,
    ]);
    let cmp = s.s_ok(&["compare", &q, &s.dir.p("src2.raw")]);
    assert!(cmp.contains("identical"), "{cmp}");
    ok(
        &support::img::run("qemu-img", &["check", &s.dir.p("img.qcow2")]),
        "qemu-img check",
    );
}

#[test]
fn ssh_host_keys() {
    let Some(s) = Sshd::start("hostkey") else {
        return;
    };
    pattern(&s.dir.p("disk.raw"), 1 << 20, 1);
    let sha = s.fingerprint("hostkey", "sha256");
    let md5 = s.fingerprint("hostkey", "md5");
    let good = |q: &str| s.s_ok(&["info", "-f", "raw", &s.uri("disk.raw", q)]);
    good(&format!("?host_key_check=sha256:{sha}"));
    good(&format!("?host_key_check=md5:{md5}"));
    let sha1 = s.fingerprint("hostkey", "sha1");
    good(&format!("?host_key_check=sha1:{sha1}"));
    // The ssh-keygen -l form.
    let b64 = sh(&format!(
        "ssh-keygen -l -E sha256 -f {} | cut -d' ' -f2",
        s.dir.p("hostkey.pub")
    ));
    good(&format!("?host_key_check=sha256:{b64}"));
    // -blockdev's option names, through json:.
    let js = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"ssh","server":{{"host":"127.0.0.1","port":"{}"}},"path":"{}","host-key-check":{{"mode":"hash","type":"sha256","hash":"{sha}"}}}}}}"#,
        s.port,
        s.dir.p("disk.raw")
    );
    let info = s.s_ok(&["info", &js]);
    assert!(info.contains("virtual size: 1 MiB"), "{info}");

    // Another key's fingerprint: refused, naming both.
    let other = s.fingerprint("otherkey", "sha256");
    let e = s.s_err(&[
        "info",
        &s.uri("disk.raw", &format!("?host_key_check=sha256:{other}")),
    ]);
    assert!(
        e.contains(&format!(
            "remote host ssh-ed25519 key fingerprint 'sha256:{sha}' does not match host_key_check 'sha256:{other}'"
        )),
        "{e}"
    );
    let e = s.s_err(&["info", &s.uri("disk.raw", "?host_key_check=sha1:00")]);
    assert!(e.contains("is not a sha1 fingerprint"), "{e}");
    let e = s.s_err(&["info", &s.uri("disk.raw", "?host_key_check=maybe")]);
    assert!(e.contains("unknown host_key_check setting (maybe)"), "{e}");

    // known_hosts (the default): the private HOME's file.
    let e = s.s_err(&["info", &s.uri("disk.raw", "")]);
    assert!(e.contains("no host key was found in known_hosts"), "{e}");
    let kh = s.dir.p("home/.ssh/known_hosts");
    let line = |key: &str| {
        let pubkey = std::fs::read_to_string(s.dir.p(&format!("{key}.pub"))).unwrap();
        let mut f = pubkey.split_whitespace();
        format!(
            "[127.0.0.1]:{} {} {}\n",
            s.port,
            f.next().unwrap(),
            f.next().unwrap()
        )
    };
    std::fs::write(&kh, line("otherkey")).unwrap();
    let e = s.s_err(&["info", &s.uri("disk.raw", "?host_key_check=yes")]);
    assert!(
        e.contains("host key does not match the one in known_hosts"),
        "{e}"
    );
    // A line libssh2 cannot parse does not hide the ones after it.
    std::fs::write(&kh, format!("garbage line\n{}", line("hostkey"))).unwrap();
    good("");
    good("?host_key_check=yes");
}

#[test]
fn ssh_errors() {
    let Some(s) = Sshd::start("errors") else {
        return;
    };
    pattern(&s.dir.p("disk.raw"), 1 << 20, 1);
    let no = "?host_key_check=no";
    let e = s.s_err(&["info", &s.uri("missing.raw", no)]);
    assert!(
        e.contains(&format!(
            "failed to open remote file '{}': No such file or directory",
            s.dir.p("missing.raw")
        )),
        "{e}"
    );
    // No agent, no key files: authentication fails.
    let o = Command::new(env!("CARGO_BIN_EXE_strata-img"))
        .args(["info", &s.uri("disk.raw", no)])
        .env_remove("SSH_AUTH_SOCK")
        .env("HOME", s.dir.p("home"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("failed to authenticate as 'root' using publickey authentication"),
        "{e}"
    );
    // A key file in ~/.ssh is tried after the agent.
    std::fs::copy(s.dir.p("clientkey"), s.dir.p("home/.ssh/id_ed25519")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_strata-img"))
        .args(["info", "-f", "raw", &s.uri("disk.raw", no)])
        .env_remove("SSH_AUTH_SOCK")
        .env("HOME", s.dir.p("home"))
        .output()
        .unwrap();
    ok(&o, "info with ~/.ssh/id_ed25519");
    // Another user (the authorized keys serve every user here) may read
    // root's 0644 file but not open it for writing.
    let as_nobody = format!(
        "ssh://nobody@127.0.0.1:{}{}?host_key_check=no",
        s.port,
        s.dir.p("disk.raw")
    );
    s.s_ok(&["info", "-f", "raw", &as_nobody]);
    let e = s.s_err(&[
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        &s.dir.p("disk.raw"),
        &as_nobody,
    ]);
    assert!(
        e.contains(&format!(
            "failed to open remote file '{}': Permission denied",
            s.dir.p("disk.raw")
        )),
        "{e}"
    );
    let e = s.s_err(&["info", &s.uri("disk.raw", "?host_key_check=no&x=1")]);
    assert!(e.contains("unknown query parameter 'x'"), "{e}");
    let e = s.s_err(&["info", &format!("ssh://127.0.0.1:{}/", s.port)]);
    assert!(e.contains("missing remote path in URI"), "{e}");
    let e = s.s_err(&["info", "ssh://root@127.0.0.1:1/x?host_key_check=no"]);
    assert!(e.contains("Failed to connect"), "{e}");
}

/// qemu-img (with Debian's qemu-block-extra ssh module) reads what
/// strata-img wrote over ssh, and the other way round.
#[test]
fn ssh_cross_qemu() {
    let Some(s) = Sshd::start("qemu") else { return };
    let no = "?host_key_check=no";
    let probe = s.cmd("qemu-img", &["info", &s.uri("none", no)]);
    let pe = String::from_utf8_lossy(&probe.stderr);
    if pe.contains("Unknown protocol") || pe.contains("Unknown driver") {
        eprintln!("SKIPPED ssh_cross_qemu: qemu-img has no ssh driver (qemu-block-extra): {pe}");
        return;
    }
    pattern(&s.dir.p("src.raw"), 2 << 20, 5);
    let a = s.uri("a.qcow2", no);
    s.s_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &s.dir.p("src.raw"),
        &a,
    ]);
    let o = s.cmd("qemu-img", &["compare", &a, &s.dir.p("src.raw")]);
    assert!(ok(&o, "qemu-img compare over ssh").contains("identical"));
    let b = s.uri("b.qcow2", no);
    let o = s.cmd(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &s.dir.p("src.raw"),
            &b,
        ],
    );
    ok(&o, "qemu-img convert over ssh");
    let c = s.s_ok(&["compare", &b, &s.dir.p("src.raw")]);
    assert!(c.contains("identical"), "{c}");
}

/// The VMM: `-drive file=ssh://...` and `-blockdev driver=ssh` (under a
/// qcow2 node), written and read through HMP's qemu-io, checked on disk.
#[test]
fn ssh_vmm_drive_and_blockdev() {
    use serde_json::json;
    let Some(s) = Sshd::start("vmm") else { return };
    std::fs::write(s.dir.p("disk.raw"), vec![0u8; 1 << 20]).unwrap();
    ok(
        &support::img::run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &s.dir.p("disk.qcow2"), "4M"],
        ),
        "qemu-img create",
    );
    let sha = s.fingerprint("hostkey", "sha256");
    let qmp = s.dir.p("qmp.sock");
    let drive = format!(
        "if=none,id=d0,format=raw,file={}",
        s.uri("disk.raw", "?host_key_check=no")
    );
    let blockdev = format!(
        "driver=qcow2,node-name=q1,file.driver=ssh,file.server.host=127.0.0.1,\
         file.server.port={},file.path={},file.host-key-check.mode=hash,\
         file.host-key-check.type=sha256,file.host-key-check.hash={sha}",
        s.port,
        s.dir.p("disk.qcow2")
    );
    let qmp_arg = format!("unix:{qmp},server=on,wait=off");
    let mut qt = support::qtest::Qtest::start_env(
        &[
            "-qmp",
            &qmp_arg,
            "-drive",
            &drive,
            "-blockdev",
            &blockdev,
            "-device",
            "virtio-blk-pci,drive=q1",
        ],
        &[
            ("SSH_AUTH_SOCK", &s.dir.p("agent.sock")),
            ("HOME", &s.dir.p("home")),
        ],
    );
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
    q.ok("quit", json!({}));
    assert!(
        qt.wait_exit(Duration::from_secs(30)).is_some(),
        "strata did not exit"
    );
    let raw = std::fs::read(s.dir.p("disk.raw")).unwrap();
    assert!(raw[65536..196608].iter().all(|&b| b == 0x5a));
    assert!(raw[..65536].iter().all(|&b| b == 0));
    ok(
        &support::img::run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "read -P 0xa5 65536 131072",
                &s.dir.p("disk.qcow2"),
            ],
        ),
        "qemu-io read back",
    );
    ok(
        &support::img::run("qemu-img", &["check", &s.dir.p("disk.qcow2")]),
        "qemu-img check",
    );
}
