//! The `nbd` protocol driver against the real `qemu-nbd` (TCP and unix
//! sockets: reads, writes, FUA, flush, block status, write-zeroes, trim,
//! the file name forms), and against a hand-written hostile server (the
//! one allowed mock): oversized replies, bad magic, unknown cookies and
//! oversized handshake replies are rejected with an error, never allocated.

mod common;

use block::backend::{BackendConfig, BlockBackend, CompletionQueue};
use block::driver::{IoRequest, Perms};
use block::graph::BlockGraph;
use block::iov::IoVecs;
use block::nbd::proto;
use common::TempDir;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A qemu-nbd process, killed on drop.
struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until(mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn qemu_nbd(args: &[&str]) -> QemuNbd {
    let c = Command::new("qemu-nbd")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-nbd");
    QemuNbd(c)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Exercise an `nbd` node whose export is a 16 MiB raw image holding
/// `0x5a` in its first MiB and nothing else.
fn exercise(blockdev: &str, img: &str) {
    let g = BlockGraph::new();
    let node = g.blockdev_add_str(blockdev).expect("nbd node opens");
    assert_eq!(node.driver_name(), "nbd");
    assert_eq!(node.len(), 16 << 20);
    let blk = BlockBackend::new(
        "d0",
        node.clone(),
        BackendConfig {
            shared: Perms::ALL,
            ..Default::default()
        },
    )
    .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    blk.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));

    // Block status: data, then a hole that reads as zeroes.
    let e = blk.block_status(0, 16 << 20).unwrap();
    assert!(
        e.data && !e.zero && e.len >= 4096 && e.len <= 1 << 20,
        "{e:?}"
    );
    let e = blk.block_status(8 << 20, 1 << 20).unwrap();
    assert!(!e.data && e.zero, "{e:?}");

    // Writes of odd sizes, FUA, a flush; read back.
    let p = pattern(3 * 4096 + 512, 7);
    blk.writev_at_fua(2 << 20, &[std::io::IoSlice::new(&p)], true)
        .unwrap();
    blk.flush().unwrap();
    let mut back = vec![0u8; p.len()];
    blk.read_at(2 << 20, &mut back).unwrap();
    assert_eq!(back, p);

    // 32 asynchronous writes in flight, then reads of them.
    let q = CompletionQueue::new().unwrap();
    for i in 0..32u64 {
        let d = pattern(65536, i as u8);
        blk.submit(
            IoRequest::write(4 << 20 | i << 16, IoVecs::from_vec(d), false),
            q.completion(i),
        );
    }
    let mut n = 0;
    while n < 32 {
        for (_, _, r) in q.wait() {
            r.unwrap();
            n += 1;
        }
    }
    for i in 0..32u64 {
        let mut b = vec![0u8; 65536];
        blk.read_at(4 << 20 | i << 16, &mut b).unwrap();
        assert_eq!(b, pattern(65536, i as u8), "write {i}");
    }
    // A request larger than one NBD request (split by the client).
    let big = pattern(40 << 20 >> 2, 3);
    blk.write_at(6 << 20, &big[..8 << 20]).unwrap();

    // Write-zeroes and trim (discard=unmap on both sides).
    blk.write_zeroes(0, 65536, false).unwrap();
    let mut z = vec![1u8; 65536];
    blk.read_at(0, &mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    blk.discard(1 << 20, 1 << 20).unwrap();
    blk.flush().unwrap();
    drop(blk);
    drop(node);
    g.remove("n0");

    // What qemu sees in the image.
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-U",
            "-r",
            "-c",
            "read -P 0 0 64k",
            "-c",
            "read -P 0x5a 64k 960k",
            img,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

fn make_image(t: &TempDir) -> String {
    let img = t.path("disk.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &img, "16M"]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 0 1M", &img]);
    img
}

#[test]
fn qemu_nbd_unix_socket() {
    if !have("qemu-nbd") {
        eprintln!("SKIPPED: qemu-nbd missing (Debian package qemu-utils)");
        return;
    }
    let t = TempDir::new("nbd-unix");
    let img = make_image(&t);
    let sock = t.path("nbd.sock");
    let _srv = qemu_nbd(&[
        "-f",
        "raw",
        "-k",
        &sock,
        "-x",
        "disk",
        "-t",
        "-e",
        "8",
        "--discard=unmap",
        &img,
    ]);
    wait_until(|| std::os::unix::net::UnixStream::connect(&sock).is_ok());
    exercise(
        &format!(
            "driver=nbd,node-name=n0,server.type=unix,server.path={sock},export=disk,discard=unmap"
        ),
        &img,
    );
    // The file name forms reach the same export.
    let g = BlockGraph::new();
    for name in [
        format!("nbd+unix:///disk?socket={sock}"),
        format!("nbd:unix:{sock}:exportname=disk"),
    ] {
        let n = g.open_image(&name, Some("raw"), true, &[]).expect(&name);
        assert_eq!(n.len(), 16 << 20);
        let n = g.open_image(&name, None, true, &[]).expect(&name);
        assert_eq!(n.driver_name(), "raw");
    }
    // `-drive file=nbd...` (with `file.reconnect-delay`) for a VM.
    let blk = block::drive::parse_drive(&format!(
        "file=nbd+unix:///disk?socket={sock},format=raw,if=none,id=n,file.reconnect-delay=5"
    ))
    .unwrap()
    .open(&g)
    .unwrap();
    assert_eq!(blk.len(), 16 << 20);
    assert_eq!(
        blk.root().unwrap().child("file").unwrap().driver_name(),
        "nbd"
    );
    let mut b = [0u8; 512];
    blk.read_at(0, &mut b).unwrap();
    assert_eq!(b, [0u8; 512]);
    // qemu-nbd offers extended headers: requests and replies use them.
    let node = block::nbd::client::NbdNode::connect(block::nbd::client::ClientConfig::new(
        block::nbd::transport::NbdAddr::Unix(sock.clone()),
        "disk",
    ))
    .unwrap();
    assert!(node.extended_headers());
    assert!(node.has_block_status());
    use block::driver::BlockDriver;
    node.write_vectored(12 << 20, &[std::io::IoSlice::new(&[0x6b; 8192])], false)
        .unwrap();
    let mut b = [0u8; 8192];
    node.read_vectored(12 << 20, &mut [std::io::IoSliceMut::new(&mut b)])
        .unwrap();
    assert_eq!(b, [0x6b; 8192]);
    node.write_zeroes(12 << 20, 4096, false, false).unwrap();
    let ext = node.block_status(12 << 20, 4 << 20).unwrap();
    assert!(ext.len > 0 && ext.len <= 4 << 20);
    node.discard(13 << 20, 1 << 20).unwrap();
    node.flush().unwrap();
    drop(node);
    // An unknown export is refused in one line naming it.
    let e = g
        .open_image(&format!("nbd+unix:///nope?socket={sock}"), None, true, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("'nope'") && !e.contains('\n'), "{e}");
}

#[test]
fn qemu_nbd_tcp() {
    if !have("qemu-nbd") {
        eprintln!("SKIPPED: qemu-nbd missing (Debian package qemu-utils)");
        return;
    }
    let t = TempDir::new("nbd-tcp");
    let img = make_image(&t);
    let port = free_port().to_string();
    let _srv = qemu_nbd(&[
        "-f",
        "raw",
        "-b",
        "127.0.0.1",
        "-p",
        &port,
        "-x",
        "disk",
        "-t",
        "-e",
        "8",
        "--discard=unmap",
        &img,
    ]);
    wait_until(|| std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_ok());
    exercise(
        &format!(
            "driver=nbd,node-name=n0,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk,discard=unmap"
        ),
        &img,
    );
    let g = BlockGraph::new();
    for name in [
        format!("nbd://127.0.0.1:{port}/disk"),
        format!("nbd:127.0.0.1:{port}:exportname=disk"),
    ] {
        let n = g.open_image(&name, Some("raw"), true, &[]).expect(&name);
        assert_eq!(n.len(), 16 << 20);
    }
}

#[test]
fn connection_refused_is_one_line() {
    let t = TempDir::new("nbd-refused");
    let g = BlockGraph::new();
    let e = g
        .open_image(
            &format!("nbd+unix:///?socket={}", t.path("none.sock")),
            None,
            true,
            &[],
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("none.sock") && !e.contains('\n'), "{e}");
}

// ---------------------------------------------------------------------------
// A hostile server.

/// What the fake server does once a request arrives.
#[derive(Clone, Copy)]
enum Evil {
    /// An OFFSET_DATA chunk claiming 4 GiB of payload.
    HugeChunk,
    /// A block status chunk of 16 MiB.
    HugeStatus,
    /// A reply with a bad magic.
    BadMagic,
    /// A reply to a cookie never sent.
    UnknownCookie,
    /// A data chunk outside the request.
    OutOfRange,
    /// An option reply claiming 1 GiB during the handshake.
    HugeOptionReply,
}

fn read_n(s: &mut impl Read, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

fn fake_server(sock: String, evil: Evil) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&proto::encode_greeting(
            proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
        ))
        .unwrap();
        read_n(&mut s, 4);
        loop {
            let h = read_n(&mut s, 16);
            let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            read_n(&mut s, len as usize);
            if matches!(evil, Evil::HugeOptionReply) {
                let mut r = proto::encode_option_reply(opt, proto::REP_ACK, &[]);
                r[16..20].copy_from_slice(&(1u32 << 30).to_be_bytes());
                let _ = s.write_all(&r);
                std::thread::sleep(Duration::from_millis(200));
                return;
            }
            match opt {
                proto::OPT_STRUCTURED_REPLY => s
                    .write_all(&proto::encode_option_reply(opt, proto::REP_ACK, &[]))
                    .unwrap(),
                proto::OPT_SET_META_CONTEXT => {
                    let mut d = 9u32.to_be_bytes().to_vec();
                    d.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
                    s.write_all(&proto::encode_option_reply(
                        opt,
                        proto::REP_META_CONTEXT,
                        &d,
                    ))
                    .unwrap();
                    s.write_all(&proto::encode_option_reply(opt, proto::REP_ACK, &[]))
                        .unwrap();
                }
                proto::OPT_GO => {
                    s.write_all(&proto::encode_option_reply(
                        opt,
                        proto::REP_INFO,
                        &proto::encode_info_export(1 << 20, proto::TF_HAS_FLAGS),
                    ))
                    .unwrap();
                    s.write_all(&proto::encode_option_reply(opt, proto::REP_ACK, &[]))
                        .unwrap();
                    break;
                }
                _ => s
                    .write_all(&proto::encode_option_reply(opt, proto::REP_ERR_UNSUP, &[]))
                    .unwrap(),
            }
        }
        // Transmission: answer the first request badly.
        let Ok(h) = (|| -> std::io::Result<[u8; 28]> {
            let mut b = [0u8; 28];
            s.read_exact(&mut b)?;
            Ok(b)
        })() else {
            return;
        };
        let h = proto::RequestHeader::decode(&h).unwrap();
        let bytes = match evil {
            Evil::HugeChunk => proto::encode_chunk_header(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_OFFSET_DATA,
                h.cookie,
                u32::MAX,
            )
            .to_vec(),
            Evil::HugeStatus => proto::encode_chunk_header(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_BLOCK_STATUS,
                h.cookie,
                16 << 20,
            )
            .to_vec(),
            Evil::BadMagic => vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            Evil::UnknownCookie => proto::encode_simple_reply(h.cookie ^ 0x5555, 0).to_vec(),
            Evil::OutOfRange => {
                let mut v = proto::encode_chunk_header(
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_OFFSET_DATA,
                    h.cookie,
                    8 + 512,
                )
                .to_vec();
                v.extend_from_slice(&(h.offset + h.len).to_be_bytes());
                v.extend_from_slice(&[0u8; 512]);
                v
            }
            Evil::HugeOptionReply => unreachable!(),
        };
        let _ = s.write_all(&bytes);
        // Then keep the socket open and send endless garbage: the client
        // must have stopped reading.
        let junk = [0xffu8; 4096];
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(2) {
            if s.write_all(&junk).is_err() {
                return;
            }
        }
    })
}

#[test]
fn hostile_server_replies_are_rejected() {
    for evil in [
        Evil::HugeChunk,
        Evil::HugeStatus,
        Evil::BadMagic,
        Evil::UnknownCookie,
        Evil::OutOfRange,
    ] {
        let t = TempDir::new("nbd-evil");
        let sock = t.path("evil.sock");
        let srv = fake_server(sock.clone(), evil);
        let g = BlockGraph::new();
        let n = g
            .blockdev_add_str(&format!(
                "driver=nbd,node-name=n0,server.type=unix,server.path={sock},read-only=on"
            ))
            .expect("handshake with the fake server");
        let start = Instant::now();
        let r = if matches!(evil, Evil::HugeStatus) {
            n.block_status(0, 4096).map(|_| ())
        } else {
            let mut b = vec![0u8; 4096];
            n.read_vectored(0, &mut [std::io::IoSliceMut::new(&mut b)])
        };
        let e = r.expect_err("a hostile reply fails the request");
        assert_eq!(e.errno(), libc::EIO, "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
        drop(n);
        g.remove("n0");
        srv.join().unwrap();
    }
}

#[test]
fn hostile_handshake_is_rejected() {
    let t = TempDir::new("nbd-evil-hs");
    let sock = t.path("evil.sock");
    let srv = fake_server(sock.clone(), Evil::HugeOptionReply);
    let g = BlockGraph::new();
    let e = g
        .blockdev_add_str(&format!(
            "driver=nbd,node-name=n0,server.type=unix,server.path={sock},read-only=on"
        ))
        .unwrap_err()
        .to_string();
    assert!(e.contains("too long"), "{e}");
    srv.join().unwrap();
}

/// A qcow2 image served raw by qemu-nbd and opened as qcow2 by Strata: the
/// qcow2 driver's completions do metadata I/O on the `nbd` node itself,
/// which must not wait on the thread that reads its replies.
#[test]
fn qcow2_format_over_nbd() {
    if !have("qemu-nbd") {
        eprintln!("SKIPPED: qemu-nbd missing (Debian package qemu-utils)");
        return;
    }
    let t = TempDir::new("nbd-qcow2");
    let img = t.path("disk.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", &img, "64M"]);
    // An NBD export cannot grow: give the qcow2 file room to allocate in.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(80 << 20)
        .unwrap();
    let sock = t.path("nbd.sock");
    let srv = qemu_nbd(&["-f", "raw", "-k", &sock, "-t", "-e", "8", &img]);
    wait_until(|| std::os::unix::net::UnixStream::connect(&sock).is_ok());
    {
        let g = BlockGraph::new();
        let node = g
            .blockdev_add_str(&format!(
                "driver=qcow2,node-name=q0,file.driver=nbd,file.server.type=unix,file.server.path={sock}"
            ))
            .expect("qcow2 over nbd");
        let blk = BlockBackend::new("d0", node, BackendConfig::default()).unwrap();
        let q = CompletionQueue::new().unwrap();
        // Allocating writes spread over many L2 tables, 32 at a time.
        for i in 0..64u64 {
            blk.submit(
                IoRequest::write(
                    i * (1 << 20),
                    IoVecs::from_vec(pattern(65536, i as u8)),
                    false,
                ),
                q.completion(i),
            );
        }
        let mut n = 0;
        let t0 = Instant::now();
        while n < 64 {
            for (_, _, r) in q.wait() {
                r.unwrap();
                n += 1;
            }
            assert!(t0.elapsed() < Duration::from_secs(60));
        }
        blk.flush().unwrap();
        for i in 0..64u64 {
            let mut b = vec![0u8; 65536];
            blk.read_at(i * (1 << 20), &mut b).unwrap();
            assert_eq!(b, pattern(65536, i as u8), "cluster {i}");
        }
    }
    drop(srv);
    run("qemu-img", &["check", "-q", &img]);
}
