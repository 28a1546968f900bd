//! `strata-nbd` against QEMU's own NBD clients (`qemu-img info`,
//! `convert`, `map`, `qemu-io` read/write/discard/map) for raw and qcow2
//! images over unix sockets and TCP; `strata-img` reading exports through
//! Strata's `nbd` client; the client's reconnect across a server restart;
//! hostile clients; clean SIGTERM; locking; one-line errors.

mod support;

use block::backend::{BackendConfig, BlockBackend, CompletionQueue};
use block::driver::{IoRequest, Perms};
use block::graph::BlockGraph;
use block::iov::IoVecs;
use block::nbd::proto;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::img::Dir;
use support::nbd::{free_port, wait_listening};

fn have_qemu() -> bool {
    support::nbd::have_tools(&["qemu-img", "qemu-io", "qemu-nbd"], "qemu-utils")
}

fn out(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().expect(cmd)
}

fn run(cmd: &str, args: &[&str]) -> String {
    let o = out(cmd, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{cmd} {args:?} failed: {text}");
    text
}

/// A strata-nbd process; killed on drop if still running.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn term(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        run("kill", &["-TERM", &pid]);
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "no exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn nbd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_strata-nbd")
}

/// Serve `img` over a unix socket in `dir` (or TCP) with extra `args`.
fn serve(dir: &Dir, img: &str, tcp: bool, args: &[&str]) -> Server {
    let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let (url, sock, port) = if tcp {
        let port = free_port();
        a.extend([
            "-b".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ]);
        (format!("nbd://127.0.0.1:{port}/"), None, Some(port))
    } else {
        let s = dir.p("nbd.sock");
        a.extend(["-k".into(), s.clone()]);
        (format!("nbd+unix:///?socket={s}"), Some(s), None)
    };
    a.push(img.to_string());
    let mut child = Command::new(nbd_bin())
        .args(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // A probe connection would count as the (only) client without -t:
    // wait for the socket file, or for the port with a quick connect only
    // when persistent.
    if let Some(s) = &sock {
        let t = Instant::now();
        while !std::path::Path::new(s).exists() {
            assert!(t.elapsed() < Duration::from_secs(10), "no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The file appears at bind(), a moment before listen(): a
        // persistent server can take a probe to be sure.
        if args.contains(&"-t") {
            wait_listening("strata-nbd", Some(s), None, &mut child);
        }
    } else {
        wait_listening("strata-nbd", None, port, &mut child);
    }
    Server { child, url }
}

fn qemu_tools_against(fmt: &str, tcp: bool) {
    let d = Dir::new("nbd", "qemu");
    let img = d.p(&format!("disk.{fmt}"));
    run("qemu-img", &["create", "-q", "-f", fmt, &img, "32M"]);
    run(
        "qemu-io",
        &[
            "-f",
            fmt,
            "-c",
            "write -P 0x33 1M 2M",
            "-c",
            "write -z 8M 1M",
            &img,
        ],
    );
    let mut srv = serve(
        &d,
        &img,
        tcp,
        &["-f", fmt, "-t", "-e", "0", "--discard=unmap", "-x", "exp"],
    );
    let url = if tcp {
        format!("{}exp", srv.url)
    } else {
        srv.url.replacen(":///", ":///exp", 1)
    };

    let info = run("qemu-img", &["info", "--output=json", &url]);
    assert!(info.contains("\"virtual-size\": 33554432"), "{info}");

    let io = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x33 1M 2M",
            "-c",
            "read -P 0 0 1M",
            "-c",
            "write -P 0x44 16M 64k",
            "-c",
            "write -f -P 0x45 16M 4k",
            "-c",
            "read -P 0x45 16M 4k",
            "-c",
            "discard 1M 1M",
            "-c",
            "read -P 0 1M 1M",
            "-c",
            "write -z 2M 64k",
            "-c",
            "flush",
            "-c",
            "map",
            &url,
        ],
    );
    assert!(!io.contains("failed") && !io.contains("error"), "{io}");

    // Block status through qemu-img map: data where written, zeroes elsewhere.
    let map = run("qemu-img", &["map", "--output=json", "-f", "raw", &url]);
    assert!(
        map.contains("\"data\": true") && map.contains("\"zero\": true"),
        "{map}"
    );

    // Convert the export to a local file and compare with the image.
    let copy = d.p("copy.raw");
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &url, &copy],
    );
    // While strata-nbd runs the image is locked against writers; compare
    // with -U.
    run(
        "qemu-img",
        &["compare", "-U", "-f", fmt, "-F", "raw", &img, &copy],
    );

    // Writes are flushed and the server exits 0 on SIGTERM.
    let st = srv.term();
    assert!(st.success(), "{st}");
    if fmt == "qcow2" {
        run("qemu-img", &["check", &img]);
    }
    run(
        "qemu-io",
        &[
            "-f",
            fmt,
            "-c",
            "read -P 0x45 16M 4k",
            "-c",
            "read -P 0x44 16781312 60k",
            &img,
        ],
    );
}

#[test]
fn qemu_tools_raw_unix() {
    if have_qemu() {
        qemu_tools_against("raw", false);
    }
}

#[test]
fn qemu_tools_qcow2_unix() {
    if have_qemu() {
        qemu_tools_against("qcow2", false);
    }
}

#[test]
fn qemu_tools_raw_tcp() {
    if have_qemu() {
        qemu_tools_against("raw", true);
    }
}

#[test]
fn qemu_tools_qcow2_tcp() {
    if have_qemu() {
        qemu_tools_against("qcow2", true);
    }
}

#[test]
fn strata_img_through_the_client() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new("nbd", "simg");
    let img = d.p("disk.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", &img, "8M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x61 0 1M", &img],
    );
    let srv = serve(&d, &img, false, &["-f", "qcow2", "-t", "-e", "0", "-r"]);
    let simg = env!("CARGO_BIN_EXE_strata-img");
    let info = run(simg, &["info", &srv.url]);
    assert!(info.contains("virtual size: 8 MiB"), "{info}");
    let copy = d.p("copy.raw");
    run(simg, &["convert", "-O", "raw", &srv.url, &copy]);
    run(
        "qemu-img",
        &["compare", "-U", "-f", "qcow2", "-F", "raw", &img, &copy],
    );
    // qemu-nbd's exports too, with the legacy file name form.
    let sock2 = d.p("q.sock");
    let mut q = Command::new("qemu-nbd")
        .args([
            "-r", "-f", "qcow2", "-k", &sock2, "-t", "-e", "0", "-x", "e", &img,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening("strata-nbd", Some(&sock2), None, &mut q);
    let info = run(simg, &["info", &format!("nbd:unix:{sock2}:exportname=e")]);
    assert!(info.contains("virtual size: 8 MiB"), "{info}");
    let _ = q.kill();
    let _ = q.wait();
    // A server that is not there: one line, exit 1.
    let o = out(
        simg,
        &["info", &format!("nbd+unix:///?socket={}", d.p("none"))],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(131).wrapping_add(seed * 7919) % 251) as u8)
        .collect()
}

fn open_client(url: &str, delay: u64) -> (BlockGraph, std::sync::Arc<BlockBackend>) {
    let g = BlockGraph::new();
    let node = g
        .open_image(
            url,
            Some("raw"),
            false,
            &[("file.reconnect-delay", &delay.to_string())],
        )
        .expect("client opens");
    let blk = BlockBackend::new(
        "c",
        node,
        BackendConfig {
            shared: Perms::ALL,
            ..Default::default()
        },
    )
    .unwrap();
    (g, blk)
}

#[test]
fn reconnect_within_delay_keeps_writes() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new("nbd", "reconn");
    let img = d.p("disk.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &img, "16M"]);
    let args = ["-f", "raw", "-t", "-e", "0"];
    let mut srv = serve(&d, &img, false, &args);
    let (_g, blk) = open_client(&srv.url, 20);

    // A stream of 256 writes, 8 in flight, the server killed and
    // restarted in the middle.
    let q = CompletionQueue::new().unwrap();
    let total = 256u64;
    let mut next = 0u64;
    let mut done = 0u64;
    let mut restarted = None;
    while done < total {
        while next < total && next - done < 8 {
            blk.submit(
                IoRequest::write(next * 65536, IoVecs::from_vec(pattern(65536, next)), false),
                q.completion(next),
            );
            next += 1;
        }
        for (tag, _, r) in q.wait() {
            r.unwrap_or_else(|e| panic!("write {tag} failed: {e}"));
            done += 1;
        }
        if done >= 64 && restarted.is_none() {
            // SIGKILL: no goodbye, requests in flight are lost by the server.
            let _ = srv.child.kill();
            let _ = srv.child.wait();
            let _ = std::fs::remove_file(d.p("nbd.sock"));
            // Writes keep being submitted while the server is away.
            for _ in 0..4 {
                if next < total {
                    blk.submit(
                        IoRequest::write(
                            next * 65536,
                            IoVecs::from_vec(pattern(65536, next)),
                            false,
                        ),
                        q.completion(next),
                    );
                    next += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(700));
            srv = serve(&d, &img, false, &args);
            restarted = Some(Instant::now());
        }
    }
    assert!(restarted.is_some());
    blk.flush().unwrap();
    for i in 0..total {
        let mut b = vec![0u8; 65536];
        blk.read_at(i * 65536, &mut b).unwrap();
        assert!(b == pattern(65536, i), "block {i} differs");
    }
    drop(blk);
}

#[test]
fn past_the_delay_eio_then_recovery() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new("nbd", "reconn-eio");
    let img = d.p("disk.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &img, "16M"]);
    let args = ["-f", "raw", "-t", "-e", "0"];
    let mut srv = serve(&d, &img, false, &args);
    let (_g, blk) = open_client(&srv.url, 1);
    blk.write_at(0, &[1u8; 4096]).unwrap();
    let _ = srv.child.kill();
    let _ = srv.child.wait();
    let _ = std::fs::remove_file(d.p("nbd.sock"));
    // A write issued now waits for the delay, then fails with EIO.
    let t = Instant::now();
    let e = blk.write_at(4096, &[2u8; 4096]).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Later requests fail at once while the server is away...
    let e = blk.write_at(8192, &[3u8; 4096]).unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    // ...and succeed once it is back.
    let _srv = serve(&d, &img, false, &args);
    let t = Instant::now();
    loop {
        match blk.write_at(8192, &[3u8; 4096]) {
            Ok(()) => break,
            Err(_) if t.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("no recovery: {e}"),
        }
    }
    let mut b = vec![0u8; 4096];
    blk.read_at(8192, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 3));
    blk.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 1));
}

/// Negotiate by hand up to transmission (structured replies off).
fn handshake(s: &mut UnixStream) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    proto::parse_greeting(&g).unwrap();
    s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    s.write_all(&proto::encode_option(
        proto::OPT_GO,
        &proto::encode_go("", &[]),
    ))
    .unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let h = proto::parse_option_reply_header(&h, proto::OPT_GO).unwrap();
        let mut d = vec![0u8; h.len as usize];
        s.read_exact(&mut d).unwrap();
        if h.rtype == proto::REP_ACK {
            return;
        }
        assert_eq!(h.rtype, proto::REP_INFO);
    }
}

fn req(cmd: u16, offset: u64, len: u32) -> [u8; 28] {
    proto::RequestHeader {
        flags: 0,
        cmd,
        cookie: 1,
        offset,
        len: len as u64,
    }
    .encode()
}

/// Read one extended reply chunk: (flags, type, cookie, payload).
fn ext_chunk(s: &mut UnixStream) -> (u16, u16, u64, Vec<u8>) {
    let mut h = [0u8; 32];
    s.read_exact(&mut h).unwrap();
    let magic = u32::from_be_bytes(h[..4].try_into().unwrap());
    assert_eq!(magic, proto::EXTENDED_REPLY_MAGIC);
    let proto::ReplyHeader::Chunk {
        flags,
        rtype,
        cookie,
        len,
    } = proto::parse_reply_header(magic, &h[4..]).unwrap()
    else {
        panic!("not a chunk")
    };
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).unwrap();
    (flags, rtype, cookie, d)
}

#[test]
fn extended_headers_with_qemu_and_raw_clients() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new("nbd", "ext");
    let img = d.p("disk.raw");
    // Larger than 4 GiB (sparse): 64-bit lengths matter.
    run("qemu-img", &["create", "-q", "-f", "raw", &img, "6G"]);
    let _srv = serve(&d, &img, false, &["-f", "raw", "-t", "-e", "0"]);
    let sock = d.p("nbd.sock");
    // qemu-nbd --list negotiates them with Strata's server.
    let l = run("qemu-nbd", &["-L", "-k", &sock]);
    assert!(l.contains("transaction size: 64-bit"), "{l}");

    let mut s = UnixStream::connect(&sock).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    let opt = |s: &mut UnixStream, o: u32, data: &[u8]| -> Vec<u32> {
        s.write_all(&proto::encode_option(o, data)).unwrap();
        let mut types = Vec::new();
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).unwrap();
            let h = proto::parse_option_reply_header(&h, o).unwrap();
            let mut d = vec![0u8; h.len as usize];
            s.read_exact(&mut d).unwrap();
            types.push(h.rtype);
            if h.rtype != proto::REP_INFO && h.rtype != proto::REP_META_CONTEXT {
                return types;
            }
        }
    };
    assert_eq!(
        opt(&mut s, proto::OPT_EXTENDED_HEADERS, &[]),
        [proto::REP_ACK]
    );
    // Structured replies come with them.
    assert_eq!(
        opt(&mut s, proto::OPT_STRUCTURED_REPLY, &[]),
        [proto::REP_ERR_EXT_HEADER_REQD]
    );
    let mc = proto::encode_meta_context("", &[proto::BASE_ALLOCATION]);
    assert!(opt(&mut s, proto::OPT_SET_META_CONTEXT, &mc).ends_with(&[proto::REP_ACK]));
    assert!(opt(&mut s, proto::OPT_GO, &proto::encode_go("", &[])).ends_with(&[proto::REP_ACK]));
    let ext = |cmd: u16, flags: u16, cookie: u64, offset: u64, len: u64| {
        proto::RequestHeader {
            flags,
            cmd,
            cookie,
            offset,
            len,
        }
        .encode_ext()
    };
    // A write and its read back near the end of the 6 GiB export.
    let off = (6u64 << 30) - 8192;
    s.write_all(&ext(proto::CMD_WRITE, 0, 1, off, 4096))
        .unwrap();
    s.write_all(&[0x42; 4096]).unwrap();
    let (f, t, c, _) = ext_chunk(&mut s);
    assert_eq!(
        (f, t, c),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, 1)
    );
    s.write_all(&ext(proto::CMD_READ, 0, 2, off, 4096)).unwrap();
    let (_, t, c, data) = ext_chunk(&mut s);
    assert_eq!((t, c), (proto::REPLY_TYPE_OFFSET_DATA, 2));
    assert_eq!(data[..8], off.to_be_bytes());
    assert!(data[8..].iter().all(|&b| b == 0x42));
    // Zeroes over 5 GiB in one request: a 64-bit length.
    s.write_all(&ext(proto::CMD_WRITE_ZEROES, 0, 3, 0, 5 << 30))
        .unwrap();
    let (_, t, c, _) = ext_chunk(&mut s);
    assert_eq!((t, c), (proto::REPLY_TYPE_NONE, 3));
    // Block status with 64-bit descriptors.
    s.write_all(&ext(proto::CMD_BLOCK_STATUS, 0, 4, 0, 6 << 30))
        .unwrap();
    let (_, t, c, bs) = ext_chunk(&mut s);
    assert_eq!((t, c), (proto::REPLY_TYPE_BLOCK_STATUS_EXT, 4));
    let proto::Chunk::BlockStatus { context, extents } = proto::parse_chunk(t, &bs).unwrap() else {
        panic!()
    };
    assert_eq!(context, 1);
    assert!(extents[0].0 > u32::MAX as u64, "{extents:?}");
    // A payload on block status (not offered): refused, payload skipped,
    // the connection goes on.
    s.write_all(&ext(
        proto::CMD_BLOCK_STATUS,
        proto::CMD_FLAG_PAYLOAD_LEN,
        5,
        0,
        16,
    ))
    .unwrap();
    s.write_all(&[0u8; 16]).unwrap();
    let (_, t, c, _) = ext_chunk(&mut s);
    assert_eq!((t, c), (proto::REPLY_TYPE_ERROR, 5));
    s.write_all(&ext(proto::CMD_FLUSH, 0, 6, 0, 0)).unwrap();
    let (_, t, c, _) = ext_chunk(&mut s);
    assert_eq!((t, c), (proto::REPLY_TYPE_NONE, 6));
    // A compact request after extended headers: the connection ends.
    s.write_all(&req(proto::CMD_FLUSH, 0, 0)).unwrap();
    s.write_all(&[0u8; 4]).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap_or(0), 0);
    // qemu-io (extended headers too) reads what was written.
    let url = format!("nbd+unix:///?socket={sock}");
    run(
        "qemu-io",
        &["-f", "raw", "-c", &format!("read -P 0x42 {off} 4096"), &url],
    );
}

#[test]
fn hostile_clients_do_not_hurt_others() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new("nbd", "hostile");
    let img = d.p("disk.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &img, "16M"]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x77 0 1M", &img]);
    let mut srv = serve(&d, &img, false, &["-f", "raw", "-t", "-e", "0"]);
    let sock = d.p("nbd.sock");
    let t0 = Instant::now();
    let mut keep = Vec::new();

    // Garbage instead of client flags.
    let mut s = UnixStream::connect(&sock).unwrap();
    let _ = s.write_all(&[0xff; 64]);
    keep.push(s);
    // An option claiming 4 GiB.
    let mut s = UnixStream::connect(&sock).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap();
    let mut o = proto::encode_option(proto::OPT_GO, &[]);
    o[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
    let _ = s.write_all(&o);
    keep.push(s);
    // A write header claiming 4 GiB of payload.
    let mut s = UnixStream::connect(&sock).unwrap();
    handshake(&mut s);
    let _ = s.write_all(&req(proto::CMD_WRITE, 0, u32::MAX));
    keep.push(s);
    // A 1 MiB write cut off in the middle of its payload.
    let mut s = UnixStream::connect(&sock).unwrap();
    handshake(&mut s);
    s.write_all(&req(proto::CMD_WRITE, 0, 1 << 20)).unwrap();
    s.write_all(&[0u8; 1000]).unwrap();
    drop(s);
    // Reads past the end and with a bad magic.
    let mut s = UnixStream::connect(&sock).unwrap();
    handshake(&mut s);
    s.write_all(&req(proto::CMD_READ, 16 << 20, 4096)).unwrap();
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(
        u32::from_be_bytes(r[4..8].try_into().unwrap()),
        proto::EINVAL
    );
    let mut bad = req(proto::CMD_READ, 0, 512);
    bad[0] = 0;
    s.write_all(&bad).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest); // The server hangs up.
                                      // A client that connects and says nothing (held open below).
    keep.push(UnixStream::connect(&sock).unwrap());
    // Many requests whose replies are never read, the socket kept open:
    // only this connection may stall.
    let mut s = UnixStream::connect(&sock).unwrap();
    handshake(&mut s);
    s.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    for _ in 0..400 {
        if s.write_all(&req(proto::CMD_READ, 0, 1 << 20)).is_err() {
            break;
        }
    }
    keep.push(s);
    // Many requests without reading replies, then vanish.
    let mut s = UnixStream::connect(&sock).unwrap();
    handshake(&mut s);
    for _ in 0..200 {
        if s.write_all(&req(proto::CMD_READ, 0, 1 << 20)).is_err() {
            break;
        }
    }
    drop(s);

    // Meanwhile a well-behaved client is served at once.
    let io = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x77 0 1M",
            "-c",
            "write -P 1 2M 4k",
            &srv.url,
        ],
    );
    assert!(!io.contains("failed"), "{io}");
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    assert!(srv.child.try_wait().unwrap().is_none(), "server died");
    drop(keep);
    assert!(srv.term().success());
}

#[test]
fn exits_after_last_client_without_t() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new("nbd", "once");
    let img = d.p("disk.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &img, "1M"]);
    let mut srv = serve(&d, &img, false, &["-f", "raw", "--pid-file", &d.p("pid")]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 9 0 4k", &srv.url]);
    let t = Instant::now();
    let st = loop {
        if let Some(s) = srv.child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "still running");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success());
    assert!(!std::path::Path::new(&d.p("nbd.sock")).exists());
    assert!(!std::path::Path::new(&d.p("pid")).exists());
    run("qemu-io", &["-f", "raw", "-c", "read -P 9 0 4k", &img]);
}

#[test]
fn locking_matches_qemu_nbd() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new("nbd", "lock");
    let img = d.p("disk.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", &img, "1M"]);
    let mut srv = serve(&d, &img, false, &["-f", "qcow2", "-t"]);
    // qemu-img refuses to read an image being written without -U.
    let o = out("qemu-img", &["info", &img]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("lock"));
    run("qemu-img", &["info", "-U", &img]);
    // A second server is refused too.
    let o = out(nbd_bin(), &["-f", "qcow2", "-k", &d.p("b.sock"), &img]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("lock") && err.trim().lines().count() == 1,
        "{err}"
    );
    assert!(srv.term().success());
    // Released on exit.
    run("qemu-img", &["info", &img]);
}

#[test]
fn user_errors_are_one_line() {
    let d = Dir::new("nbd", "errs");
    let cases: Vec<Vec<String>> = vec![
        vec!["--cache=bogus".into(), "x".into()],
        vec!["--aio=bogus".into(), "x".into()],
        vec!["--discard=bogus".into(), "x".into()],
        vec!["--detect-zeroes=unmap".into(), "x".into()],
        vec!["-p".into(), "99999".into(), "x".into()],
        vec!["-e".into(), "many".into(), "x".into()],
        vec!["--object".into(), "tls-creds-x509,id=t".into(), "x".into()],
        vec!["-k".into(), d.p("s"), d.p("missing.img")],
        vec![
            "-f".into(),
            "qcow2".into(),
            "-k".into(),
            d.p("s"),
            "/dev/null".into(),
        ],
        vec!["--frobnicate".into(), "x".into()],
        vec![],
    ];
    for c in cases {
        let o = Command::new(nbd_bin()).args(&c).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{c:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{c:?}: {err}");
        assert!(err.starts_with("strata-nbd: "), "{c:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // --fork: the parent reports the child's failure.
    let o = Command::new(nbd_bin())
        .args(["--fork", "-k", &d.p("s"), &d.p("missing.img")])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.img"));
}

#[test]
fn fork_returns_when_ready() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new("nbd", "fork");
    let img = d.p("disk.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &img, "1M"]);
    let sock = d.p("nbd.sock");
    let pid = d.p("pid");
    let o = out(
        nbd_bin(),
        &[
            "--fork",
            "-f",
            "raw",
            "-t",
            "-k",
            &sock,
            "--pid-file",
            &pid,
            &img,
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Ready means listening, right away.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0 0 4k",
            &format!("nbd+unix:///?socket={sock}"),
        ],
    );
    let p = std::fs::read_to_string(&pid).unwrap();
    run("kill", &["-TERM", p.trim()]);
    let t = Instant::now();
    while std::path::Path::new(&sock).exists() {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn export_options() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new("nbd", "opts");
    let img = d.p("disk.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &img, "4M"]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x21 0 1M", &img]);

    // -x, -D, -r as qemu-nbd -L lists them; writes refused.
    let srv = serve(
        &d,
        &img,
        false,
        &[
            "-f", "raw", "-t", "-e", "0", "-r", "-x", "foo", "-D", "my disk",
        ],
    );
    let sock = d.p("nbd.sock");
    let list = run("qemu-nbd", &["-L", "-k", &sock]);
    assert!(list.contains("export: 'foo'"), "{list}");
    assert!(list.contains("description: my disk"), "{list}");
    assert!(list.contains("readonly"), "{list}");
    let url = format!("nbd+unix:///foo?socket={sock}");
    let o = out("qemu-io", &["-f", "raw", "-c", "write 0 4k", &url]);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    // qemu-io opens read-write, and the export says read-only.
    assert!(
        !o.status.success() && text.contains("Permission denied"),
        "{text}"
    );
    run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x21 0 1M", &url],
    );
    drop(srv);
    let _ = std::fs::remove_file(&sock);

    // -s: writes go to a temporary overlay, the image stays as it was.
    let mut srv = serve(&d, &img, false, &["-f", "raw", "-t", "-s"]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x99 0 64k",
            "-c",
            "read -P 0x99 0 64k",
            &srv.url,
        ],
    );
    assert!(srv.term().success());
    run("qemu-io", &["-f", "raw", "-c", "read -P 0x21 0 64k", &img]);

    // --image-opts with cache, aio, discard and detect-zeroes.
    let opts = format!("driver=raw,file.driver=file,file.filename={img}");
    let mut srv = serve(
        &d,
        &opts,
        false,
        &[
            "--image-opts",
            "-t",
            "--cache=writethrough",
            "--discard=unmap",
            "--detect-zeroes=unmap",
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0 0 1M",
            "-c",
            "discard 1M 1M",
            &srv.url,
        ],
    );
    assert!(srv.term().success());
    let map = run("qemu-img", &["map", "--output=json", "-f", "raw", &img]);
    assert!(
        map.contains("\"start\": 0, \"length\": 4194304") && map.contains("\"data\": false"),
        "{map}"
    );
    let mut srv = serve(
        &d,
        &img,
        true,
        &[
            "-f",
            "raw",
            "-t",
            "--aio=threads",
            "--cache=none",
            "--object",
            "iothread,id=io0",
        ],
    );
    run("qemu-io", &["-f", "raw", "-c", "write -P 5 0 4k", &srv.url]);
    assert!(srv.term().success());
}

/// Start `bin` (strata-nbd or qemu-nbd) on the unix socket `sock` with
/// `args` and wait until the socket file is there (no probe: without `-t`
/// a probe would be the one client).
fn serve_on(bin: &str, sock: &str, args: &[&str]) -> Server {
    let _ = std::fs::remove_file(sock);
    let mut child = Command::new(bin)
        .args(args)
        .args(["-k", sock])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !std::path::Path::new(sock).exists() {
        if let Some(s) = child.try_wait().unwrap() {
            panic!("{bin} exited early: {s}");
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The file appears at bind(), a moment before listen().
    std::thread::sleep(Duration::from_millis(50));
    Server {
        child,
        url: format!("nbd+unix:///?socket={sock}"),
    }
}

/// `qemu-img map` of the export at `sock` read through the metadata
/// context `ctx` (QEMU's `x-dirty-bitmap`, as its iotests read
/// `qemu:allocation-depth` and bitmaps): the JSON text and its runs as
/// (start, length, zero, data).
fn map_context(sock: &str, ctx: &str) -> (String, Vec<(u64, u64, bool, bool)>) {
    let json = run(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "--image-opts",
            &format!("driver=nbd,server.type=unix,server.path={sock},x-dirty-bitmap={ctx}"),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&json).expect("map JSON");
    let runs = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["zero"].as_bool().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect();
    (json, runs)
}

/// The (zero, data) pair QEMU's client reports at `off` in `runs`.
fn at(runs: &[(u64, u64, bool, bool)], off: u64) -> (bool, bool) {
    let r = runs
        .iter()
        .find(|r| r.0 <= off && off < r.0 + r.1)
        .unwrap_or_else(|| panic!("no run at {off}: {runs:?}"));
    (r.2, r.3)
}

#[test]
fn load_snapshot_serves_it_read_only() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new("nbd", "snap");
    let img = d.p("disk.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", &img, "4M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0x5a 3M 64k",
            &img,
        ],
    );
    run("qemu-img", &["snapshot", "-c", "snap1", &img]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x22 0 512k",
            "-c",
            "write -P 0x33 2M 64k",
            "-c",
            "write -z 3M 64k",
            &img,
        ],
    );
    // The oracle: what qemu-img reads from the snapshot.
    let reference = d.p("snap1.raw");
    run(
        "qemu-img",
        &["convert", "-l", "snap1", "-O", "raw", &img, &reference],
    );
    let sock = d.p("s.sock");
    for form in [
        vec!["-l", "snap1"],
        vec!["--load-snapshot=snapshot.name=snap1"],
        vec!["-l", "snapshot.id=1"],
        vec!["-l", "1"],
        vec!["-l", "snapshot.id=1,snapshot.name=snap1"],
    ] {
        let mut a = form.clone();
        a.push(&img);
        let _srv = serve_on(nbd_bin(), &sock, &a);
        let cmp = run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                &format!("nbd+unix:///?socket={sock}"),
                &reference,
            ],
        );
        assert!(cmp.contains("identical"), "{form:?}: {cmp}");
    }
    // Read-only, as -l implies -r: qemu-io's read-write open is refused.
    let _srv = serve_on(nbd_bin(), &sock, &["-t", "-l", "snap1", &img]);
    let url = format!("nbd+unix:///?socket={sock}");
    let o = out("qemu-io", &["-f", "raw", "-c", "write 0 4k", &url]);
    assert!(!o.status.success());
    run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x11 0 1M",
            "-c",
            "read -P 0x5a 3M 64k",
            "-c",
            "read -P 0 2M 64k",
            &url,
        ],
    );
    drop(_srv);
    // The active state was not touched.
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0x22 0 512k", &img],
    );

    // A missing snapshot, a bad parameter, a format without snapshots:
    // one line that names the option as written, exit 1.
    let raw = d.p("disk.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &raw, "1M"]);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["-l", "nope", &img], "-l nope: "),
        (
            vec!["--load-snapshot=snapshot.name=1", &img],
            "--load-snapshot=snapshot.name=1: ",
        ),
        (
            vec!["-l", "snapshot.id=1,snapshot.name=other", &img],
            "-l snapshot.id=1,snapshot.name=other: ",
        ),
        (vec!["-l", "snapshot.size=1", &img], "-l snapshot.size=1: "),
        (vec!["-f", "raw", "-l", "snap1", &raw], "-l snap1: "),
    ];
    for (mut a, want) in cases {
        a.extend(["-k", &sock]);
        let o = out(nbd_bin(), &a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{a:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{a:?}: {err}");
        assert!(
            err.starts_with(&format!("strata-nbd: {want}")),
            "{a:?}: {err}"
        );
    }
}

#[test]
fn allocation_depth_matches_qemu_nbd() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new("nbd", "depth");
    // base (4M) <- mid (6M) <- top (8M): each layer shorter than the one
    // above, so the zeroes past a backing file's end count too.
    let (base, mid, top) = (d.p("base.qcow2"), d.p("mid.qcow2"), d.p("top.qcow2"));
    run("qemu-img", &["create", "-q", "-f", "qcow2", &base, "4M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -z 3M 512k",
            &base,
        ],
    );
    for (img, back, size) in [(&mid, &base, "6M"), (&top, &mid, "8M")] {
        run(
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-b", back, "-F", "qcow2", img, size,
            ],
        );
    }
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 3 1M 64k", &mid]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 2 512k 256k",
            "-c",
            "write -z 2M 256k",
            "-c",
            "write -P 4 7M 64k",
            &top,
        ],
    );
    let sock = d.p("s.sock");
    let mut maps = Vec::new();
    for bin in [nbd_bin(), "qemu-nbd"] {
        let _srv = serve_on(bin, &sock, &["-r", "-A", "-f", "qcow2", &top]);
        maps.push(map_context(&sock, "qemu:allocation-depth"));
    }
    assert_eq!(maps[0].0, maps[1].0, "strata-nbd vs qemu-nbd");
    // A filter on top (--image-opts) is no layer of its own: the depths
    // are the image's.
    // (Writable: QEMU's copy-on-read refuses a read-only node. Mapping
    // reads no data, so nothing is copied.)
    let opts = format!(
        "driver=copy-on-read,file.driver=qcow2,file.file.driver=file,file.file.filename={top}"
    );
    for bin in [nbd_bin(), "qemu-nbd"] {
        let _srv = serve_on(bin, &sock, &["-A", "--image-opts", &opts]);
        let (json, _) = map_context(&sock, "qemu:allocation-depth");
        assert_eq!(json, maps[0].0, "{bin} through a filter");
    }
    // QEMU's client folds the depth into (zero, data): 0 -> (false,
    // true), 1 -> (false, false), 2 and more -> (true, true).
    let runs = &maps[0].1;
    let (none, own, below) = ((false, true), (false, false), (true, true));
    assert_eq!(at(runs, 0), below, "base data");
    assert_eq!(at(runs, 512 << 10), own, "top data");
    assert_eq!(at(runs, 1 << 20), below, "mid data");
    assert_eq!(at(runs, (1 << 20) + (64 << 10)), none, "nowhere");
    assert_eq!(at(runs, 2 << 20), own, "top zero cluster");
    assert_eq!(at(runs, 3 << 20), below, "base zero cluster");
    assert_eq!(at(runs, 5 << 20), below, "past base's end, within mid");
    assert_eq!(at(runs, 6 << 20), below, "past mid's end");
    assert_eq!(at(runs, 7 << 20), own, "top data past mid's end");

    // A raw image is all its own layer.
    let raw = d.p("disk.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &raw, "1M"]);
    let _srv = serve_on(nbd_bin(), &sock, &["-r", "-A", "-f", "raw", &raw]);
    let (_, runs) = map_context(&sock, "qemu:allocation-depth");
    assert_eq!(runs, vec![(0, 1 << 20, false, false)]);
    drop(_srv);

    // Without -A the context is not offered, and QEMU's client says so.
    let _srv = serve_on(nbd_bin(), &sock, &["-r", "-f", "qcow2", &top]);
    let o = out(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "--image-opts",
            &format!("driver=nbd,server.type=unix,server.path={sock},x-dirty-bitmap=qemu:allocation-depth"),
        ],
    );
    assert!(!o.status.success());
}

#[test]
fn bitmap_export_matches_qemu_nbd() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new("nbd", "bitmap");
    let img = d.p("disk.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", &img, "4M"]);
    run("qemu-img", &["bitmap", "--add", &img, "b0"]);
    run(
        "qemu-img",
        &["bitmap", "--add", "--granularity", "128k", &img, "b1"],
    );
    // qemu-io on the qcow2 image marks its enabled persistent bitmaps.
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 5 64k 64k",
            "-c",
            "write -P 6 1M 300k",
            &img,
        ],
    );
    let sock = d.p("s.sock");
    let mut maps = Vec::new();
    for bin in [nbd_bin(), "qemu-nbd"] {
        let _srv = serve_on(bin, &sock, &["-r", "-B", "b0", &img]);
        maps.push(map_context(&sock, "qemu:dirty-bitmap:b0"));
    }
    assert_eq!(maps[0].0, maps[1].0, "strata-nbd vs qemu-nbd");
    // Through a filter (--image-opts): the image's bitmap all the same.
    let opts = format!(
        "driver=copy-on-read,file.driver=qcow2,file.file.driver=file,file.file.filename={img}"
    );
    // (Writable, as QEMU's copy-on-read refuses a read-only node; ended by
    // SIGTERM so that it stores the bitmaps it took.)
    let mut srv = serve_on(nbd_bin(), &sock, &["-t", "-B", "b0", "--image-opts", &opts]);
    let (json, _) = map_context(&sock, "qemu:dirty-bitmap:b0");
    assert_eq!(json, maps[0].0, "through a filter");
    assert!(srv.term().success());
    // Dirty reads back as (zero, data) = (false, false).
    let dirty = |runs: &[(u64, u64, bool, bool)]| -> Vec<(u64, u64)> {
        runs.iter()
            .filter(|r| !r.2 && !r.3)
            .map(|r| (r.0, r.1))
            .collect()
    };
    assert_eq!(
        dirty(&maps[0].1),
        vec![(64 << 10, 64 << 10), (1 << 20, 320 << 10)]
    );

    // Two bitmaps on one writable export: writes through it are tracked
    // in both, and stored in the image at SIGTERM (not left in use).
    let mut srv = serve_on(
        nbd_bin(),
        &sock,
        &["-t", "-e", "0", "-B", "b0", "--bitmap=b1", &img],
    );
    let (_, b1) = map_context(&sock, "qemu:dirty-bitmap:b1");
    assert_eq!(dirty(&b1), vec![(0, 128 << 10), (1 << 20, 384 << 10)]);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 7 3M 64k", &srv.url],
    );
    let (_, b0) = map_context(&sock, "qemu:dirty-bitmap:b0");
    assert!(dirty(&b0).contains(&(3 << 20, 64 << 10)), "{b0:?}");
    // qemu-nbd -L lists the contexts the export offers.
    let list = run("qemu-nbd", &["-L", "-k", &sock]);
    for c in [
        "base:allocation",
        "qemu:dirty-bitmap:b0",
        "qemu:dirty-bitmap:b1",
    ] {
        assert!(list.contains(&format!("   {c}\n")), "{c}: {list}");
    }
    assert!(list.contains("available meta contexts: 3"), "{list}");
    assert!(srv.term().success());
    let info = run("qemu-img", &["info", "--output=json", &img]);
    assert!(!info.contains("in-use"), "{info}");
    run("qemu-img", &["check", &img]);
    let _srv = serve_on("qemu-nbd", &sock, &["-r", "-B", "b1", &img]);
    let (_, b1) = map_context(&sock, "qemu:dirty-bitmap:b1");
    assert_eq!(
        dirty(&b1),
        vec![(0, 128 << 10), (1 << 20, 384 << 10), (3 << 20, 128 << 10)]
    );
    drop(_srv);

    // A bitmap the image does not have: one line naming the option.
    for (a, want) in [
        (
            vec!["-B", "nope"],
            "strata-nbd: -B nope: Bitmap 'nope' is not found",
        ),
        (
            vec!["--bitmap=nope"],
            "strata-nbd: --bitmap=nope: Bitmap 'nope' is not found",
        ),
        (
            vec!["--bitmap", "b0", "-B", "nope"],
            "strata-nbd: -B nope: Bitmap 'nope' is not found",
        ),
        (
            vec!["-B", "b1", "--bitmap", "nope"],
            "strata-nbd: --bitmap=nope: Bitmap 'nope' is not found",
        ),
    ] {
        let mut a = a;
        a.extend(["-k", &sock, &img]);
        let o = out(nbd_bin(), &a);
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(String::from_utf8_lossy(&o.stderr).trim(), want);
    }
    // The failed starts left the bitmaps alone.
    let info = run("qemu-img", &["info", "--output=json", &img]);
    assert!(!info.contains("in-use"), "{info}");

    // A bitmap left in use by a server that was killed is refused, as
    // qemu-nbd refuses it.
    let mut srv = serve_on("qemu-nbd", &sock, &[&img]);
    let _ = srv.child.kill();
    let _ = srv.child.wait();
    drop(srv);
    let info = run("qemu-img", &["info", "--output=json", &img]);
    assert!(info.contains("in-use"), "{info}");
    for bin in [nbd_bin(), "qemu-nbd"] {
        let o = out(bin, &["-r", "-B", "b0", "-k", &sock, &img]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{bin}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{bin}: {err}");
        assert!(
            err.contains("Bitmap 'b0' is inconsistent and cannot be used"),
            "{bin}: {err}"
        );
    }
}
