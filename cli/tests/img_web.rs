//! strata-img on the read-only web protocols (`http`, `https`, `ftp`)
//! against real servers on loopback: Python's http.server with byte
//! ranges (tests/servers/http_range.py, also over TLS) and pyftpdlib.
//! Images read through a URL must be byte for byte what qemu-img reads
//! from the local file; servers that misbehave (no ranges, dropped
//! connections, wrong ranges, untrusted certificates) give one clear line
//! or are survived by retrying.

mod support;

use std::process::Output;
use support::img::{io, q_ok, s_ok, strata, Dir};
use support::web::WebServer;

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A served directory with a qcow2 image holding two patterns and an
/// odd-sized raw file (not a multiple of 512, as an ISO may be).
fn served(tag: &str) -> (Dir, std::path::PathBuf) {
    let d = Dir::new("web", tag);
    let root = d.0.join("www");
    std::fs::create_dir_all(&root).unwrap();
    let img = root.join("img.qcow2");
    let img_s = img.to_str().unwrap();
    q_ok(&["create", "-q", "-f", "qcow2", img_s, "64M"]);
    io(
        img_s,
        "qcow2",
        &["write -P 0xab 1M 1M", "write -P 0x5c 40M 300k"],
    );
    let odd: Vec<u8> = (0..3_000_001u32).map(|i| (i * 7 + i / 511) as u8).collect();
    std::fs::write(root.join("odd.bin"), odd).unwrap();
    (d, root)
}

#[test]
fn qcow2_over_http_reads_as_qemu_img_reads_the_file() {
    let (d, root) = served("qcow2");
    let srv = WebServer::http(&root, &[]);
    let url = srv.url("img.qcow2");
    let info = s_ok(&["info", &url]);
    assert!(info.contains("file format: qcow2"), "{info}");
    assert!(info.contains("virtual size: 64 MiB"), "{info}");
    assert!(info.contains("protocol type: http"), "{info}");
    let ours = d.p("ours.raw");
    let theirs = d.p("theirs.raw");
    s_ok(&["convert", "-O", "raw", &url, &ours]);
    q_ok(&[
        "convert",
        "-O",
        "raw",
        root.join("img.qcow2").to_str().unwrap(),
        &theirs,
    ]);
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap());
    // compare reads both through the graph: the URL against the file.
    let o = s_ok(&[
        "compare",
        "-f",
        "qcow2",
        &url,
        root.join("img.qcow2").to_str().unwrap(),
    ]);
    assert!(o.contains("Images are identical"), "{o}");
}

#[test]
fn a_file_of_odd_length_reads_whole_over_http() {
    let (d, root) = served("odd");
    let srv = WebServer::http(&root, &[]);
    let out = d.p("odd.out");
    // readahead= smaller than the default: many windows, many ranges.
    let src = format!(
        "json:{{\"driver\":\"raw\",\"file\":{{\"driver\":\"http\",\"url\":\"{}\",\"readahead\":\"64k\"}}}}",
        srv.url("odd.bin")
    );
    s_ok(&["convert", "-O", "raw", &src, &out]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(root.join("odd.bin")).unwrap());
}

#[test]
fn https_checks_the_certificate_unless_sslverify_is_off() {
    let (d, root) = served("tls");
    let srv = WebServer::https(&root, &[]);
    let url = srv.url("img.qcow2");
    let o = strata(&["info", &url]);
    assert_eq!(o.status.code(), Some(1));
    let e = err(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains(&url) && e.contains("certificate"), "{e}");

    let lax = format!(
        "json:{{\"driver\":\"qcow2\",\"file\":{{\"driver\":\"https\",\"url\":\"{url}\",\"sslverify\":\"off\"}}}}"
    );
    let ours = d.p("ours.raw");
    s_ok(&["convert", "-O", "raw", &lax, &ours]);
    let theirs = d.p("theirs.raw");
    q_ok(&[
        "convert",
        "-O",
        "raw",
        root.join("img.qcow2").to_str().unwrap(),
        &theirs,
    ]);
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap());

    // The server's certificate as the CA (the curl tool's variable).
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_strata-img"))
        .args(["info", &url])
        .env("CURL_CA_BUNDLE", srv.cert.as_ref().unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", err(&o));
}

#[test]
fn a_server_without_ranges_is_refused_in_one_line() {
    let (_d, root) = served("noranges");
    let srv = WebServer::http(&root, &["--no-ranges"]);
    let url = srv.url("img.qcow2");
    let o = strata(&["info", &url]);
    assert_eq!(o.status.code(), Some(1));
    let e = err(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains(&url) && e.contains("byte ranges"), "{e}");
}

#[test]
fn dropped_connections_are_retried() {
    let (d, root) = served("flaky");
    // The first three ranged GETs close the connection unanswered.
    let srv = WebServer::http(&root, &["--drop-first", "3"]);
    let out = d.p("odd.out");
    s_ok(&["convert", "-O", "raw", &srv.url("odd.bin"), &out]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(root.join("odd.bin")).unwrap());
}

#[test]
fn a_server_answering_the_wrong_range_fails_the_read() {
    let (d, root) = served("wrong");
    let srv = WebServer::http(&root, &["--wrong-range"]);
    let o = strata(&["convert", "-O", "raw", &srv.url("odd.bin"), &d.p("x.raw")]);
    assert_eq!(o.status.code(), Some(1));
    let e = err(&o);
    assert!(e.contains("Content-Range"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn missing_files_and_writes_are_refused_in_one_line() {
    let (d, root) = served("refuse");
    let srv = WebServer::http(&root, &[]);
    let o = strata(&["info", &srv.url("nope.img")]);
    assert_eq!(o.status.code(), Some(1));
    let e = err(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("404"), "{e}");

    let src = d.p("src.raw");
    std::fs::write(&src, vec![1u8; 3_000_001]).unwrap();
    let o = strata(&["convert", "-n", "-O", "raw", &src, &srv.url("odd.bin")]);
    assert_ne!(o.status.code(), Some(0));
    let e = err(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("does not support writes"), "{e}");
}

#[test]
fn ftp_reads_with_a_password_secret_and_refuses_a_bad_login() {
    let (d, root) = served("ftp");
    let srv = support::web::FtpServer::start(&root, "alice", "s3cret");
    let img = format!("ftp://127.0.0.1:{}/img.qcow2", srv.port);
    let src = format!(
        "json:{{\"driver\":\"qcow2\",\"file\":{{\"driver\":\"ftp\",\"url\":\"{img}\",\"username\":\"alice\",\"password-secret\":\"pw\"}}}}"
    );
    let ours = d.p("ours.raw");
    s_ok(&[
        "convert",
        "--object",
        "secret,id=pw,data=s3cret",
        "-O",
        "raw",
        &src,
        &ours,
    ]);
    let theirs = d.p("theirs.raw");
    q_ok(&[
        "convert",
        "-O",
        "raw",
        root.join("img.qcow2").to_str().unwrap(),
        &theirs,
    ]);
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap());

    // The user in the URL, and an odd-sized file read whole.
    let odd = format!("ftp://alice:s3cret@127.0.0.1:{}/odd.bin", srv.port);
    let out = d.p("odd.out");
    s_ok(&["convert", "-O", "raw", &odd, &out]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(root.join("odd.bin")).unwrap());

    let bad = format!("ftp://alice:wrong@127.0.0.1:{}/img.qcow2", srv.port);
    let o = strata(&["info", &bad]);
    assert_eq!(o.status.code(), Some(1));
    let e = err(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("Login denied"), "{e}");
}

#[test]
fn ftps_reads_over_implicit_tls_and_checks_the_certificate() {
    let (d, root) = served("ftps");
    let (cert, key) = support::web::self_signed(&root);
    let srv = support::web::FtpServer::start_tls(&root, "alice", "s3cret", &cert, &key);
    let url = format!("ftps://alice:s3cret@127.0.0.1:{}/odd.bin", srv.port);
    // The server's certificate is not a system CA's: refused in one line.
    let o = strata(&["info", &url]);
    assert_eq!(o.status.code(), Some(1));
    let e = err(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("certificate"), "{e}");
    // With it as the CA, read whole.
    let out = d.p("odd.out");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_strata-img"))
        .args(["convert", "-O", "raw", &url, &out])
        .env("CURL_CA_BUNDLE", &cert)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", err(&o));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(root.join("odd.bin")).unwrap());
    // And sslverify=off, with a qcow2 on top.
    let img = format!(
        "json:{{\"driver\":\"qcow2\",\"file\":{{\"driver\":\"ftps\",\"url\":\"ftps://alice:s3cret@127.0.0.1:{}/img.qcow2\",\"sslverify\":\"off\"}}}}",
        srv.port
    );
    let (ours, theirs) = (d.p("ours.raw"), d.p("theirs.raw"));
    s_ok(&["convert", "-O", "raw", &img, &ours]);
    q_ok(&[
        "convert",
        "-O",
        "raw",
        root.join("img.qcow2").to_str().unwrap(),
        &theirs,
    ]);
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap());
}
