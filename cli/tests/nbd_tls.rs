//! NBD over TLS with real peers: `strata-nbd --tls-creds` read and written
//! by `qemu-img`/`qemu-io` over TLS, `qemu-nbd --tls-creds` read by
//! `strata-img` through Strata's client, plaintext clients refused by TLS
//! servers, a certificate from another CA refused in one line, the
//! client's reconnection redoing TLS across a server restart, and a server
//! key encrypted under a `passwordid=` secret (checked against qemu-nbd
//! with the same files).
//!
//! The certificates are made here with `openssl` (a CA, a server
//! certificate for 127.0.0.1/localhost, a client certificate), in QEMU's
//! directory layout.

mod support;

use block::backend::{BackendConfig, BlockBackend, CompletionQueue};
use block::driver::{IoRequest, Perms};
use block::graph::BlockGraph;
use block::iov::IoVecs;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::img::Dir;
use support::nbd::{free_port, wait_listening};

fn have_tools() -> bool {
    support::nbd::have_tools(
        &["qemu-img", "qemu-io", "qemu-nbd", "openssl"],
        "qemu-utils or openssl",
    )
}

fn out(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().expect(cmd)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run(cmd: &str, args: &[&str]) -> String {
    let o = out(cmd, args);
    let t = text(&o);
    assert!(o.status.success(), "{cmd} {args:?} failed: {t}");
    t
}

/// A failing command's stderr: exactly one line.
fn one_line_failure(cmd: &str, args: &[&str]) -> String {
    let o = out(cmd, args);
    assert!(!o.status.success(), "{cmd} {args:?} succeeded");
    let e = String::from_utf8_lossy(&o.stderr).trim_end().to_string();
    assert_eq!(e.lines().count(), 1, "not one line: {e}");
    e
}

fn key(path: &Path) {
    run(
        "openssl",
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            path.to_str().unwrap(),
        ],
    );
}

/// A CA named `ca_name` and, under `base`, the directories `server/` and
/// `client/` in QEMU's layout (each with `ca-cert.pem`).
fn make_pki(base: &Path, ca_name: &str) {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (ca_key, ca_cert) = (base.join("ca-key.pem"), base.join("ca-cert.pem"));
    key(&ca_key);
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            &s(&ca_key),
            "-subj",
            &format!("/CN={ca_name}"),
            "-days",
            "2",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            &s(&ca_cert),
        ],
    );
    for (who, eku) in [("server", "serverAuth"), ("client", "clientAuth")] {
        let d = base.join(who);
        std::fs::create_dir_all(&d).unwrap();
        let k = d.join(format!("{who}-key.pem"));
        key(&k);
        let csr = base.join(format!("{who}.csr"));
        run(
            "openssl",
            &[
                "req",
                "-new",
                "-key",
                &s(&k),
                "-subj",
                &format!("/CN={who}"),
                "-out",
                &s(&csr),
            ],
        );
        let ext = base.join(format!("{who}.ext"));
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage={eku}\n\
                 subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            ),
        )
        .unwrap();
        run(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &s(&csr),
                "-CA",
                &s(&ca_cert),
                "-CAkey",
                &s(&ca_key),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &s(&ext),
                "-out",
                &s(&d.join(format!("{who}-cert.pem"))),
            ],
        );
        std::fs::copy(&ca_cert, d.join("ca-cert.pem")).unwrap();
    }
}

/// A server process, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `cmd args` and wait until it listens on `port` or `sock` (the
/// probe counts as a client: every server here runs with `-t`).
fn start(cmd: &str, args: &[String], port: Option<u16>, sock: Option<&str>) -> Server {
    let mut child = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_listening(cmd, sock, port, &mut child);
    Server(child)
}

fn nbd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_strata-nbd")
}

fn img_bin() -> &'static str {
    env!("CARGO_BIN_EXE_strata-img")
}

fn creds(id: &str, dir: &str, endpoint: &str) -> String {
    format!("tls-creds-x509,id={id},dir={dir},endpoint={endpoint}")
}

fn tcp_opts(port: u16) -> String {
    format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},tls-creds=tls0")
}

#[test]
fn strata_nbd_tls_with_qemu_clients() {
    if !have_tools() {
        return;
    }
    let d = Dir::new("nbdtls", "srv");
    make_pki(&d.0, "Strata test CA");
    let img = d.p("disk.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &img, "8M"]);
    let port = free_port();
    let args: Vec<String> = [
        "-f",
        "raw",
        "-t",
        "-e",
        "0",
        "-b",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "--object",
        &creds("tls0", &d.p("server"), "server"),
        "--tls-creds=tls0",
        &img,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _srv = start(nbd_bin(), &args, Some(port), None);
    let client = creds("tls0", &d.p("client"), "client");
    let opts = tcp_opts(port);

    let info = run(
        "qemu-img",
        &["info", "--object", &client, "--image-opts", &opts],
    );
    assert!(info.contains("8 MiB"), "{info}");
    let io = run(
        "qemu-io",
        &[
            "--object",
            &client,
            "--image-opts",
            &opts,
            "-c",
            "write -P 0x5a 1M 2M",
            "-c",
            "read -P 0x5a 1M 2M",
            "-c",
            "read -P 0 0 1M",
            "-c",
            "flush",
        ],
    );
    assert!(!io.contains("fail"), "{io}");
    let copy = d.p("copy.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            "--object",
            &client,
            "--image-opts",
            &opts,
            &copy,
        ],
    );
    run("qemu-img", &["compare", "-U", "-f", "raw", &img, &copy]);

    // Strata's own client over TLS against its own server.
    let i = run(
        img_bin(),
        &["info", "--object", &client, "--image-opts", &opts],
    );
    assert!(i.contains("16777216") || i.contains("8388608"), "{i}");

    // strata: a disk on the export over TLS (qtest: the machine is built,
    // the disk opened, and strata exits 0 at the end of its stdin).
    support::require_bios();
    let blockdev = format!("{opts},node-name=n0");
    let strata = |objs: &[String]| {
        let mut a: Vec<String> = ["-machine", "pc,accel=qtest", "-qtest", "stdio"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for o in objs {
            a.extend(["-object".to_string(), o.clone()]);
        }
        a.extend([
            "-blockdev".to_string(),
            blockdev.clone(),
            "-device".to_string(),
            "ide-hd,drive=n0".to_string(),
        ]);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        support::run_strata(&refs, Duration::from_secs(30))
    };
    let (code, _, err) = strata(std::slice::from_ref(&client));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(err, "");
    let (code, _, err) = strata(&[]);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("tls-creds=tls0"), "{err}");

    // Plaintext clients are told TLS is required.
    let url = format!("nbd://127.0.0.1:{port}/");
    let o = out("qemu-img", &["info", &url]);
    assert!(!o.status.success());
    assert!(text(&o).contains("TLS"), "{}", text(&o));
    let e = one_line_failure(img_bin(), &["info", &url]);
    assert!(e.contains("requires TLS"), "{e}");

    // A client whose certificate another CA signed is refused by the
    // server (verify-peer=on); qemu-img reports the failure.
    let other = Dir::new("nbdtls", "other");
    make_pki(&other.0, "Another CA");
    let o = out(
        "qemu-img",
        &[
            "info",
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client,verify-peer=off",
                other.p("client")
            ),
            "--image-opts",
            &opts,
        ],
    );
    assert!(!o.status.success(), "{}", text(&o));
    // And Strata's client refuses the server's certificate in one line.
    let e = one_line_failure(
        img_bin(),
        &[
            "info",
            "--object",
            &creds("tls0", &other.p("client"), "client"),
            "--image-opts",
            &opts,
        ],
    );
    assert!(e.contains("not signed by the CA"), "{e}");
    // A name the certificate does not carry.
    let e = one_line_failure(
        img_bin(),
        &[
            "info",
            "--object",
            &client,
            "--image-opts",
            &format!("{opts},tls-hostname=nbd.example.com"),
        ],
    );
    assert!(e.contains("nbd.example.com"), "{e}");
}

#[test]
fn qemu_nbd_tls_with_strata_client() {
    if !have_tools() {
        return;
    }
    let d = Dir::new("nbdtls", "qn");
    make_pki(&d.0, "Strata test CA");
    let img = d.p("disk.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", &img, "8M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x33 64k 1M", &img],
    );
    let port = free_port();
    let args: Vec<String> = [
        "-f",
        "qcow2",
        "-t",
        "-e",
        "0",
        "-b",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "--object",
        &creds("tls0", &d.p("server"), "server"),
        "--tls-creds",
        "tls0",
        &img,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _srv = start("qemu-nbd", &args, Some(port), None);
    let client = creds("tls0", &d.p("client"), "client");
    let opts = tcp_opts(port);
    let info = run(
        img_bin(),
        &["info", "--object", &client, "--image-opts", &opts],
    );
    assert!(info.contains("8 MiB"), "{info}");
    // strata-img convert reads the whole export over TLS.
    let copy = d.p("copy.raw");
    let json = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"nbd","server":{{"type":"inet","host":"127.0.0.1","port":"{port}"}},"tls-creds":"tls0"}}}}"#
    );
    run(
        img_bin(),
        &["convert", "-O", "raw", "--object", &client, &json, &copy],
    );
    run(
        "qemu-img",
        &["compare", "-U", "-f", "raw", &copy, "-F", "qcow2", &img],
    );

    // Writes through Strata's client in this process.
    block::objects::add_str("--object", &creds("qn-tls", &d.p("client"), "client")).unwrap();
    let g = BlockGraph::new();
    let node = g
        .blockdev_add_str(&format!(
            r#"{{"driver":"nbd","node-name":"n","server":{{"type":"inet","host":"127.0.0.1","port":"{port}"}},"tls-creds":"qn-tls"}}"#
        ))
        .unwrap();
    let blk = BlockBackend::new(
        "c",
        node,
        BackendConfig {
            shared: Perms::ALL,
            ..Default::default()
        },
    )
    .unwrap();
    blk.write_at(4 << 20, &[0xc3; 65536]).unwrap();
    blk.flush().unwrap();
    let mut b = vec![0u8; 65536];
    blk.read_at(64 << 10, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x33));
    drop(blk);
    drop(g);
    run(
        "qemu-io",
        &["-r", "-U", "-f", "qcow2", "-c", "read -P 0xc3 4M 64k", &img],
    );

    // Plaintext: refused in one line that says TLS is needed.
    let e = one_line_failure(img_bin(), &["info", &format!("nbd://127.0.0.1:{port}/")]);
    assert!(e.contains("requires TLS"), "{e}");
    // TLS against a server that has none.
    let plain = d.p("plain.sock");
    let plain_img = d.p("plain.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &plain_img, "1M"]);
    let pargs: Vec<String> = ["-f", "raw", "-t", "-k", &plain, &plain_img]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let _p = start("qemu-nbd", &pargs, None, Some(&plain));
    let e = one_line_failure(
        img_bin(),
        &[
            "info",
            "--object",
            &client,
            "--image-opts",
            &format!(
                "driver=nbd,server.type=unix,server.path={plain},tls-creds=tls0,tls-hostname=localhost"
            ),
        ],
    );
    assert!(e.contains("does not offer TLS"), "{e}");
    // A unix socket has no host name to check the certificate against
    // (QEMU refuses the same).
    let e = one_line_failure(
        img_bin(),
        &[
            "info",
            "--object",
            &client,
            "--image-opts",
            &format!("driver=nbd,server.type=unix,server.path={plain},tls-creds=tls0"),
        ],
    );
    assert!(e.contains("tls-hostname"), "{e}");
}

#[test]
fn reconnect_redoes_tls() {
    if !have_tools() {
        return;
    }
    let d = Dir::new("nbdtls", "reconn");
    make_pki(&d.0, "Strata test CA");
    let img = d.p("disk.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &img, "8M"]);
    let sock = d.p("nbd.sock");
    let args: Vec<String> = [
        "-f",
        "raw",
        "-t",
        "-e",
        "0",
        "-k",
        &sock,
        "--object",
        &creds("tls0", &d.p("server"), "server"),
        "--tls-creds=tls0",
        &img,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut srv = start(nbd_bin(), &args, None, Some(&sock));
    // A unix socket has no host name: tls-hostname gives the one to check.
    block::objects::add_str("--object", &creds("rc-tls", &d.p("client"), "client")).unwrap();
    let g = BlockGraph::new();
    let node = g
        .open_image(
            &format!("nbd+unix:///?socket={sock}"),
            Some("raw"),
            false,
            &[
                ("file.reconnect-delay", "20"),
                ("file.tls-creds", "rc-tls"),
                ("file.tls-hostname", "localhost"),
            ],
        )
        .expect("client opens over TLS");
    let blk = BlockBackend::new(
        "c",
        node,
        BackendConfig {
            shared: Perms::ALL,
            ..Default::default()
        },
    )
    .unwrap();
    let pattern =
        |i: u64| -> Vec<u8> { (0..65536u64).map(|j| ((i * 7 + j) % 251) as u8).collect() };
    let q = CompletionQueue::new().unwrap();
    let total = 96u64;
    let (mut next, mut done) = (0u64, 0u64);
    let mut restarted = false;
    while done < total {
        while next < total && next - done < 8 {
            blk.submit(
                IoRequest::write(next * 65536, IoVecs::from_vec(pattern(next)), false),
                q.completion(next),
            );
            next += 1;
        }
        for (tag, _, r) in q.wait() {
            r.unwrap_or_else(|e| panic!("write {tag} failed: {e}"));
            done += 1;
        }
        if done >= 32 && !restarted {
            let _ = srv.0.kill();
            let _ = srv.0.wait();
            let _ = std::fs::remove_file(&sock);
            std::thread::sleep(Duration::from_millis(500));
            srv = start(nbd_bin(), &args, None, Some(&sock));
            restarted = true;
        }
    }
    blk.flush().unwrap();
    for i in 0..total {
        let mut b = vec![0u8; 65536];
        blk.read_at(i * 65536, &mut b).unwrap();
        assert!(b == pattern(i), "block {i} differs");
    }
    drop(blk);
    drop(g);
    drop(srv);
    // What the client wrote is in the image.
    let mut f = std::fs::read(&img).unwrap();
    f.truncate(65536 * 2);
    assert!(f[65536..] == pattern(1)[..]);
}

#[test]
fn tls_option_errors_are_one_line() {
    if !have_tools() {
        return;
    }
    let d = Dir::new("nbdtls", "err");
    make_pki(&d.0, "Strata test CA");
    let img = d.p("disk.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &img, "1M"]);
    let sock = d.p("s.sock");
    let server = creds("tls0", &d.p("server"), "server");
    let client = creds("tls0", &d.p("client"), "client");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--tls-creds=tls0".into()], "tls0"),
        (
            vec!["--object".into(), client.clone(), "--tls-creds=tls0".into()],
            "endpoint=server",
        ),
        (
            vec![
                "--object".into(),
                creds("tls0", &d.p("nowhere"), "server"),
                "--tls-creds=tls0".into(),
            ],
            "server-cert.pem",
        ),
        (
            vec!["--object".into(), format!("{server},verify-peer=maybe")],
            "verify-peer",
        ),
        (
            vec![
                "--object".into(),
                server.clone(),
                "--tls-creds=tls0".into(),
                "--tls-hostname=x".into(),
            ],
            "--tls-hostname",
        ),
        (
            vec!["--object".into(), "secret,id=s0".into()],
            "data= or file=",
        ),
    ];
    for (extra, want) in cases {
        let mut a: Vec<String> = vec!["-k".into(), sock.clone()];
        a.extend(extra);
        a.push(img.clone());
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let e = one_line_failure(nbd_bin(), &refs);
        assert!(e.starts_with("strata-nbd: "), "{e}");
        assert!(e.contains(want), "{a:?}: {e}");
    }

    // strata-img: tls-creds naming no object.
    let e = one_line_failure(
        img_bin(),
        &[
            "info",
            "--image-opts",
            &format!("driver=nbd,server.type=unix,server.path={sock},tls-creds=nope"),
        ],
    );
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn tls_server_and_hostile_clients() {
    use block::nbd::proto;
    use std::io::{Read, Write};
    if !have_tools() {
        return;
    }
    let d = Dir::new("nbdtls", "hostile");
    make_pki(&d.0, "Strata test CA");
    let img = d.p("disk.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &img, "1M"]);
    let port = free_port();
    let args: Vec<String> = [
        "-f",
        "raw",
        "-t",
        "-e",
        "0",
        "-b",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "--object",
        &creds("tls0", &d.p("server"), "server"),
        "--tls-creds=tls0",
        &img,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _srv = start(nbd_bin(), &args, Some(port), None);
    let greet = || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        s.write_all(&proto::FLAG_C_FIXED_NEWSTYLE.to_be_bytes())
            .unwrap();
        s
    };
    let reply = |s: &mut std::net::TcpStream, opt: u32| -> u32 {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let h = proto::parse_option_reply_header(&h, opt).unwrap();
        let mut d = vec![0u8; h.len as usize];
        s.read_exact(&mut d).unwrap();
        h.rtype
    };
    let closed = |s: &mut std::net::TcpStream| {
        let mut b = [0u8; 256];
        loop {
            match s.read(&mut b) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    // Options before STARTTLS: refused with TLS_REQD, and the session goes
    // on; EXPORT_NAME (which cannot be refused) ends it.
    let mut s = greet();
    for o in [proto::OPT_LIST, proto::OPT_EXTENDED_HEADERS, 99] {
        s.write_all(&proto::encode_option(o, &[])).unwrap();
        assert_eq!(reply(&mut s, o), proto::REP_ERR_TLS_REQD);
    }
    s.write_all(&proto::encode_option(proto::OPT_EXPORT_NAME, b""))
        .unwrap();
    closed(&mut s);
    // STARTTLS with data is invalid; then garbage instead of a TLS hello
    // ends only that connection.
    let mut s = greet();
    s.write_all(&proto::encode_option(proto::OPT_STARTTLS, b"x"))
        .unwrap();
    assert_eq!(reply(&mut s, proto::OPT_STARTTLS), proto::REP_ERR_INVALID);
    s.write_all(&proto::encode_option(proto::OPT_STARTTLS, &[]))
        .unwrap();
    assert_eq!(reply(&mut s, proto::OPT_STARTTLS), proto::REP_ACK);
    s.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff]).unwrap();
    s.write_all(&[0xab; 4096]).unwrap();
    closed(&mut s);
    // A client that stalls after STARTTLS is held up to the handshake
    // limit at most, and others are served meanwhile.
    let mut stalled = greet();
    stalled
        .write_all(&proto::encode_option(proto::OPT_STARTTLS, &[]))
        .unwrap();
    assert_eq!(reply(&mut stalled, proto::OPT_STARTTLS), proto::REP_ACK);
    let info = run(
        "qemu-img",
        &[
            "info",
            "--object",
            &creds("tls0", &d.p("client"), "client"),
            "--image-opts",
            &tcp_opts(port),
        ],
    );
    assert!(info.contains("1 MiB"), "{info}");
    let t = Instant::now();
    closed(&mut stalled);
    assert!(t.elapsed() < Duration::from_secs(15));
}

/// `dir/server/` with the CA and server certificates of `pki` and the
/// server key encrypted (PKCS#8, PBES2 with AES-256-CBC) under `password`.
fn encrypted_server_dir(pki: &Dir, dir: &Dir, password: &str) -> String {
    let srv = dir.0.join("server");
    std::fs::create_dir_all(&srv).unwrap();
    for f in ["ca-cert.pem", "server-cert.pem"] {
        std::fs::copy(pki.0.join("server").join(f), srv.join(f)).unwrap();
    }
    let out_key = srv.join("server-key.pem");
    run(
        "openssl",
        &[
            "pkcs8",
            "-topk8",
            "-v2",
            "aes-256-cbc",
            "-in",
            &pki.p("server/server-key.pem"),
            "-passout",
            &format!("pass:{password}"),
            "-out",
            out_key.to_str().unwrap(),
        ],
    );
    let pem = std::fs::read_to_string(&out_key).unwrap();
    assert!(pem.contains("BEGIN ENCRYPTED PRIVATE KEY"), "{pem}");
    srv.to_str().unwrap().to_string()
}

#[test]
fn encrypted_server_key_with_passwordid() {
    if !have_tools() {
        return;
    }
    let d = Dir::new("nbdtls", "enc");
    make_pki(&d.0, "Strata test CA");
    let enc = Dir::new("nbdtls", "enc-key");
    let srv_dir = encrypted_server_dir(&d, &enc, "hunter2");
    // The password from a file, as QEMU reads it (the bytes as they are).
    let pw = d.p("pw.txt");
    std::fs::write(&pw, "hunter2").unwrap();
    let img = d.p("disk.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &img, "2M"]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x3c 0 1M", &img]);
    let client = creds("tls0", &d.p("client"), "client");
    let server = format!("{},passwordid=sec0", creds("tls0", &srv_dir, "server"));

    // strata-nbd and, as the oracle that the key is what QEMU takes,
    // qemu-nbd, each read by qemu-img and qemu-io over TLS.
    for bin in [nbd_bin(), "qemu-nbd"] {
        let port = free_port();
        let args: Vec<String> = [
            "-f",
            "raw",
            "-t",
            "-e",
            "0",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--object",
            &format!("secret,id=sec0,file={pw}"),
            "--object",
            &server,
            "--tls-creds=tls0",
            &img,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let _srv = start(bin, &args, Some(port), None);
        let opts = tcp_opts(port);
        let info = run(
            "qemu-img",
            &["info", "--object", &client, "--image-opts", &opts],
        );
        assert!(info.contains("2 MiB"), "{bin}: {info}");
        run(
            "qemu-io",
            &[
                "--object",
                &client,
                "--image-opts",
                &opts,
                "-c",
                "read -P 0x3c 0 1M",
            ],
        );
    }

    // A wrong password, or none: one line, exit 1, before listening.
    let sock = d.p("s.sock");
    for (secret, want) in [
        ("secret,id=sec0,data=hunter3", "wrong password"),
        ("secret,id=sec0,data=", "wrong password"),
    ] {
        let e = one_line_failure(
            nbd_bin(),
            &[
                "-k",
                &sock,
                "--object",
                secret,
                "--object",
                &server,
                "--tls-creds=tls0",
                &img,
            ],
        );
        assert!(e.starts_with("strata-nbd: tls-creds-x509 'tls0': "), "{e}");
        assert!(e.contains("server-key.pem") && e.contains(want), "{e}");
    }
    let e = one_line_failure(
        nbd_bin(),
        &[
            "-k",
            &sock,
            "--object",
            &creds("tls0", &srv_dir, "server"),
            "--tls-creds=tls0",
            &img,
        ],
    );
    assert!(e.contains("no passwordid="), "{e}");
    assert!(!std::path::Path::new(&sock).exists());
}
