//! The `iscsi` protocol driver against a real target, Debian's `tgtd`
//! (see `common/tgt.rs`): reads, writes (aligned, unaligned, FUA, many in
//! flight), flush, UNMAP and WRITE SAME checked against the LUN's backing
//! file; CHAP logins (and a wrong password's one-line error); CRC32C header
//! digests; a target killed and restarted under a running writer; and a
//! hostile hand-written target whose oversized PDUs are refused, never
//! allocated. Tests print a note and pass when tgtd cannot run (not root).

mod common;

#[path = "common/tgt.rs"]
mod tgt;

use block::backend::{BackendConfig, BlockBackend, CompletionQueue};
use block::driver::{IoRequest, Perms};
use block::graph::BlockGraph;
use block::iov::IoVecs;
use common::{pattern, TempDir};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;
use tgt::Tgt;

const SIZE: u64 = 32 << 20;

fn skip() -> bool {
    if Tgt::available() {
        return false;
    }
    eprintln!("tgtd not available (needs the tgt package and root): skipped");
    true
}

fn backend(node: Arc<block::node::Node>) -> Arc<BlockBackend> {
    BlockBackend::new(
        "d0",
        node,
        BackendConfig {
            shared: Perms::ALL,
            ..Default::default()
        },
    )
    .unwrap()
}

fn open_map(
    g: &BlockGraph,
    m: block::keyval::Map,
) -> block::error::BlockResult<Arc<block::node::Node>> {
    g.open_options(block::keyval::Options::new("file", m), None, false)
}

fn file_bytes(path: &str, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    let mut v = vec![0u8; len];
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut v).unwrap();
    v
}

fn lun_file(d: &TempDir) -> String {
    let p = d.file("lun.img", SIZE);
    let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all(&pattern(1 << 20, 0x5a)).unwrap();
    p
}

#[test]
fn read_write_flush_discard() {
    if skip() {
        return;
    }
    let d = TempDir::new("iscsi-rw");
    let img = lun_file(&d);
    let t = Tgt::start(&[&img], None, true);
    let g = BlockGraph::new();
    let node = g
        .blockdev_add_str(&t.blockdev(1))
        .expect("iscsi node opens");
    assert_eq!(node.driver_name(), "iscsi");
    assert_eq!(node.len(), SIZE);
    assert_eq!(node.limits().request_alignment, 512);
    assert_eq!(node.filename().unwrap(), t.uri(1));
    let blk = backend(node.clone());

    let mut buf = vec![0u8; 1 << 20];
    blk.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(1 << 20, 0x5a));

    // Aligned, unaligned (read-modify-write), FUA, flush.
    let p = pattern(3 * 4096, 7);
    blk.write_at(2 << 20, &p).unwrap();
    let q = pattern(1000, 9);
    blk.writev_at_fua(3 << 20 | 100, &[std::io::IoSlice::new(&q)], true)
        .unwrap();
    blk.flush().unwrap();
    assert_eq!(file_bytes(&img, 2 << 20, p.len()), p);
    assert_eq!(file_bytes(&img, (3 << 20) + 100, q.len()), q);
    let mut back = vec![0u8; 1000];
    blk.read_at(3 << 20 | 100, &mut back).unwrap();
    assert_eq!(back, q);

    // A request larger than one PDU and than FirstBurstLength (R2T).
    let big = pattern(3 << 20, 3);
    blk.write_at(8 << 20, &big).unwrap();
    assert_eq!(file_bytes(&img, 8 << 20, big.len()), big);
    let mut bb = vec![0u8; big.len()];
    blk.read_at(8 << 20, &mut bb).unwrap();
    assert_eq!(bb, big);

    // 64 asynchronous writes in flight, then reads of them.
    let cq = CompletionQueue::new().unwrap();
    for i in 0..64u64 {
        blk.submit(
            IoRequest::write(
                16 << 20 | i << 16,
                IoVecs::from_vec(pattern(65536, i as u8)),
                false,
            ),
            cq.completion(i),
        );
    }
    let mut n = 0;
    while n < 64 {
        for (_, _, r) in cq.wait() {
            r.unwrap();
            n += 1;
        }
    }
    for i in 0..64u64 {
        assert_eq!(
            file_bytes(&img, 16 << 20 | i << 16, 65536),
            pattern(65536, i as u8),
            "write {i}"
        );
    }

    // Write zeroes (WRITE SAME, or writing) and discard (UNMAP: thin
    // provisioning punches a hole in the backing file).
    blk.write_zeroes(16 << 20, 1 << 20, false).unwrap();
    assert!(file_bytes(&img, 16 << 20, 1 << 20).iter().all(|&b| b == 0));
    use std::os::unix::fs::MetadataExt;
    let before = std::fs::metadata(&img).unwrap().blocks();
    node.driver().discard(17 << 20, 1 << 20).unwrap();
    blk.flush().unwrap();
    assert!(file_bytes(&img, 17 << 20, 1 << 20).iter().all(|&b| b == 0));
    let after = std::fs::metadata(&img).unwrap().blocks();
    assert!(
        after < before,
        "UNMAP punched no hole: {before} -> {after} blocks"
    );
    // Out of range.
    assert!(blk.read_at(SIZE - 512, &mut [0u8; 1024]).is_err());
}

#[test]
fn file_name_and_header_digest() {
    if skip() {
        return;
    }
    let d = TempDir::new("iscsi-uri");
    let img = lun_file(&d);
    let t = Tgt::start(&[&img], None, false);
    let g = BlockGraph::new();
    let m = block::filename::parse(&t.uri(1)).unwrap().unwrap();
    let node = open_map(&g, m).expect("iscsi:// opens");
    assert_eq!(node.len(), SIZE);
    // Digests required, and the target only does without: refused.
    let e = g
        .blockdev_add_str(&format!("{},header-digest=crc32c", t.blockdev(1)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("HeaderDigest=None to CRC32C"), "{e}");
    t.allow_header_digest();
    let node = g
        .blockdev_add_str(&format!("{},header-digest=crc32c", t.blockdev(1)))
        .expect("header digests");
    let blk = backend(node);
    let p = pattern(65536, 1);
    blk.write_at(1 << 20, &p).unwrap();
    let mut b = vec![0u8; 65536];
    blk.read_at(1 << 20, &mut b).unwrap();
    assert_eq!(b, p);
    // LUN 0 is tgt's controller, not a disk; LUN 5 does not exist.
    let e = g.blockdev_add_str(&t.blockdev(0)).unwrap_err().to_string();
    assert!(e.contains("not a disk"), "{e}");
    let e = g.blockdev_add_str(&t.blockdev(5)).unwrap_err().to_string();
    assert!(!e.contains('\n'), "{e}");
    // A target that does not exist.
    let e = g
        .blockdev_add_str(&format!(
            "node-name={},driver=iscsi,transport=tcp,portal=127.0.0.1:{},target=iqn.2024-01.org.strata:nope,lun=1",
            tgt::node_name(),
            t.port
        ))
        .unwrap_err()
        .to_string();
    assert!(e.contains("target not found"), "{e}");
    let e = g
        .blockdev_add_str(
            "node-name=bad,driver=iscsi,transport=tcp,portal=127.0.0.1:0,target=x,lun=1",
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("portal '127.0.0.1:0'"), "{e}");
}

#[test]
fn chap_login() {
    if skip() {
        return;
    }
    let d = TempDir::new("iscsi-chap");
    let img = lun_file(&d);
    let t = Tgt::start(&[&img], Some(("alice", "s3cret-pass12")), false);
    let g = BlockGraph::new();
    // Without credentials: refused, and the message says what to set.
    let e = g.blockdev_add_str(&t.blockdev(1)).unwrap_err().to_string();
    assert!(!e.contains('\n') && e.contains("iscsi"), "{e}");
    // With a secret object.
    block::objects::add_str("--object", "secret,id=iscsi-chap-pw,data=s3cret-pass12").unwrap();
    let node = g
        .blockdev_add_str(&format!(
            "{},user=alice,password-secret=iscsi-chap-pw",
            t.blockdev(1)
        ))
        .expect("CHAP login");
    let mut b = vec![0u8; 4096];
    backend(node).read_at(0, &mut b).unwrap();
    assert_eq!(b, pattern(4096, 0x5a));
    // In the URI.
    let uri = format!(
        "iscsi://alice%s3cret-pass12@127.0.0.1:{}/{}/1",
        t.port,
        tgt::IQN
    );
    let m = block::filename::parse(&uri).unwrap().unwrap();
    open_map(&g, m).expect("CHAP from the URI");
    // A wrong password: one line that says authentication failed.
    let uri = format!("iscsi://alice%wrong@127.0.0.1:{}/{}/1", t.port, tgt::IQN);
    let m = block::filename::parse(&uri).unwrap().unwrap();
    let e = open_map(&g, m).unwrap_err().to_string();
    assert!(
        e.contains("authentication failed") && !e.contains('\n'),
        "{e}"
    );
    // A user without a password.
    let e = g
        .blockdev_add_str(&format!("{},user=alice", t.blockdev(1)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no password"), "{e}");
}

#[test]
fn target_restart_mid_io() {
    if skip() {
        return;
    }
    let d = TempDir::new("iscsi-restart");
    let img = lun_file(&d);
    let mut t = Tgt::start(&[&img], None, false);
    let g = BlockGraph::new();
    let node = g.blockdev_add_str(&t.blockdev(1)).unwrap();
    let blk = backend(node);
    const N: u64 = 400;
    let w = {
        let blk = blk.clone();
        std::thread::spawn(move || {
            // Depth 8: several commands in flight when the target dies.
            for chunk in 0..N / 8 {
                let cq = CompletionQueue::new().unwrap();
                for j in 0..8 {
                    let i = chunk * 8 + j;
                    blk.submit(
                        IoRequest::write(
                            i * 32768,
                            IoVecs::from_vec(pattern(32768, i as u8)),
                            false,
                        ),
                        cq.completion(i),
                    );
                }
                let mut n = 0;
                while n < 8 {
                    for (_, _, r) in cq.wait() {
                        r.expect("write survives the restart");
                        n += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(150));
    assert!(
        !w.is_finished(),
        "the writer ended before the target was killed"
    );
    t.kill();
    std::thread::sleep(Duration::from_millis(500));
    t.restart();
    w.join().unwrap();
    blk.flush().unwrap();
    for i in 0..N {
        assert_eq!(
            file_bytes(&img, i * 32768, 32768),
            pattern(32768, i as u8),
            "block {i}"
        );
    }
}

#[test]
fn request_timeout() {
    if skip() {
        return;
    }
    let d = TempDir::new("iscsi-timeout");
    let img = lun_file(&d);
    let t = Tgt::start(&[&img], None, false);
    let g = BlockGraph::new();
    let node = g
        .blockdev_add_str(&format!("{},timeout=1", t.blockdev(1)))
        .unwrap();
    let blk = backend(node);
    // A target that stops answering: the read fails with ETIMEDOUT
    // after `timeout` seconds (the supervisor looks twice a second).
    t.signal("STOP");
    let start = std::time::Instant::now();
    let mut b = vec![0u8; 4096];
    let e = blk.read_at(0, &mut b).unwrap_err();
    let took = start.elapsed();
    t.signal("CONT");
    assert_eq!(e.errno(), libc::ETIMEDOUT, "{e}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // The target answers again: later requests work.
    blk.read_at(0, &mut b).unwrap();
    assert_eq!(b, pattern(4096, 0x5a));
}

#[test]
fn silent_target_keepalive() {
    if skip() {
        return;
    }
    let d = TempDir::new("iscsi-nop");
    let img = lun_file(&d);
    let t = Tgt::start(&[&img], None, false);
    let g = BlockGraph::new();
    // Ping every 200 ms, give up after 800 ms of silence.
    let node = g
        .blockdev_add_str(&format!("{},x-nop-interval-ms=200", t.blockdev(1)))
        .unwrap();
    let blk = backend(node);
    // An idle session stays up: the target answers the pings.
    std::thread::sleep(Duration::from_millis(1500));
    let mut b = vec![0u8; 4096];
    blk.read_at(0, &mut b).unwrap();
    // A target that stops answering (its TCP stays open): the connection
    // is given up and the write waits for a new login, which succeeds
    // once the target runs again; the write then lands.
    t.signal("STOP");
    let w = {
        let blk = blk.clone();
        std::thread::spawn(move || blk.write_at(4 << 20, &pattern(8192, 3)))
    };
    std::thread::sleep(Duration::from_millis(2000));
    t.signal("CONT");
    w.join()
        .unwrap()
        .expect("the write survives a silent target");
    blk.flush().unwrap();
    assert_eq!(file_bytes(&img, 4 << 20, 8192), pattern(8192, 3));
}

/// A hand-written hostile target: it answers the first Login Request with
/// a header announcing `data_len` bytes (a login that ends at once when
/// 0), then sends `then`.
fn hostile(data_len: u32) -> String {
    hostile_then(data_len, Vec::new())
}

fn hostile_then(data_len: u32, then: Vec<u8>) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    l.set_nonblocking(true).unwrap();
    let h = std::thread::spawn(move || {
        let t = std::time::Instant::now();
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(_) if t.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("nobody connected: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        let mut b = [0u8; 48];
        s.read_exact(&mut b).unwrap();
        let mut r = [0u8; 48];
        r[0] = 0x23;
        r[1] = 0x87;
        r[5..8].copy_from_slice(&data_len.to_be_bytes()[1..]);
        let _ = s.write_all(&r);
        std::thread::sleep(Duration::from_millis(50));
        let _ = s.write_all(&then);
        std::thread::sleep(Duration::from_millis(200));
    });
    let g = BlockGraph::new();
    let e = g
        .blockdev_add_str(&format!(
            "node-name=hostile,driver=iscsi,transport=tcp,portal=127.0.0.1:{port},target=iqn.x:y,lun=1"
        ))
        .unwrap_err()
        .to_string();
    eprintln!("{e}");
    h.join().unwrap();
    e
}

#[test]
fn hostile_target() {
    let e = hostile(0xff_ffff);
    assert!(e.contains("data segment") && !e.contains('\n'), "{e}");
    // A short, well-formed answer with no keys and no transition: the
    // login cannot go on (the target then closes).
    let e = hostile(0);
    assert!(!e.contains('\n'), "{e}");
    // Data-In for the TEST UNIT READY (task tag 1), which reads nothing.
    let mut d = vec![0u8; 48 + 4096];
    d[0] = 0x25;
    d[1] = 0x80;
    d[6] = 0x10;
    d[19] = 1;
    let e = hostile_then(0, d);
    assert!(
        e.contains("Data-In of 4096 bytes") && !e.contains('\n'),
        "{e}"
    );
    // An R2T for it.
    let mut d = vec![0u8; 48];
    d[0] = 0x31;
    d[1] = 0x80;
    d[19] = 1;
    d[47] = 0x10;
    let e = hostile_then(0, d);
    assert!(e.contains("R2T for 16 bytes") && !e.contains('\n'), "{e}");
    // An unknown opcode.
    let mut d = vec![0u8; 48];
    d[0] = 0x3a;
    let e = hostile_then(0, d);
    assert!(e.contains("unknown opcode"), "{e}");
}
