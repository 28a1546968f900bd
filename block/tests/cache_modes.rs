//! Cache modes and I/O engines: data round trips, and the observed
//! behaviour of each mode (O_DIRECT in fdinfo, fdatasync on flush, none in
//! unsafe mode, durable writes in writethrough).

mod common;

use block::backend::{BlockBackend, CompletionQueue};
use block::drive::parse_drive;
use block::driver::IoRequest;
use block::graph::BlockGraph;
use block::iov::IoVecs;
use common::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const O_DIRECT: u32 = 0o40000;

struct Expect {
    direct: bool,
    wce: bool,
    flush_syncs: bool,
}

fn expect(mode: &str) -> Expect {
    match mode {
        "writeback" => Expect {
            direct: false,
            wce: true,
            flush_syncs: true,
        },
        "none" => Expect {
            direct: true,
            wce: true,
            flush_syncs: true,
        },
        "writethrough" => Expect {
            direct: false,
            wce: false,
            flush_syncs: true,
        },
        "directsync" => Expect {
            direct: true,
            wce: false,
            flush_syncs: true,
        },
        "unsafe" => Expect {
            direct: false,
            wce: true,
            flush_syncs: false,
        },
        _ => unreachable!(),
    }
}

fn file_driver(blk: &BlockBackend) -> Arc<dyn block::driver::BlockDriver> {
    blk.root()
        .unwrap()
        .child("file")
        .expect("file child")
        .driver()
        .clone()
}

fn roundtrip(mode: &str, aio: &str) {
    let dir = TempDir::new("cache");
    let img = dir.file("disk.img", 4 << 20);
    let graph = BlockGraph::new();
    let spec = parse_drive(&format!(
        "file={img},format=raw,if=none,id=d0,cache={mode},aio={aio}"
    ))
    .unwrap();
    let blk = spec.open(&graph).unwrap();
    let e = expect(mode);
    let file = file_driver(&blk);
    assert_eq!(file.aio_engine(), Some(aio), "{mode}/{aio}");
    // O_DIRECT really set (or not) on the descriptor.
    let flags = fd_flags(file.raw_fd().unwrap());
    assert_eq!(
        flags & O_DIRECT != 0,
        e.direct,
        "{mode}/{aio}: fdinfo flags {flags:o}"
    );
    assert_eq!(blk.write_cache_enabled(), e.wce, "{mode}");
    let st = file.syscall_stats().unwrap();

    // Synchronous aligned and unaligned round trips.
    let data = pattern(64 * 1024, 7);
    blk.write_at(4096, &data).unwrap();
    let odd = pattern(1000, 99);
    blk.write_at(70_001, &odd).unwrap();
    let mut back = vec![0u8; data.len()];
    blk.read_at(4096, &mut back).unwrap();
    assert_eq!(back, data, "{mode}/{aio}");
    let mut back = vec![0u8; odd.len()];
    blk.read_at(70_001, &mut back).unwrap();
    assert_eq!(back, odd, "{mode}/{aio}: unaligned RMW");
    // The bytes around the unaligned write are intact.
    let mut around = vec![0u8; 2];
    blk.read_at(70_000, &mut around[..1]).unwrap();
    blk.read_at(71_001, &mut around[1..]).unwrap();
    assert_eq!(around, [0, 0]);

    // Writethrough: every write was made durable before completing.
    let dsync = st.dsync_writes.load(Ordering::SeqCst);
    if e.wce {
        assert_eq!(dsync, 0, "{mode}: no FUA with a write cache");
    } else {
        assert!(dsync >= 2, "{mode}: each write must be FUA, saw {dsync}");
    }

    // Asynchronous, through the backend's engine.
    let q = CompletionQueue::new().unwrap();
    let buf = block::iov::AlignedBuf::new(8192, 4096);
    let mut wbuf = buf;
    wbuf.copy_from_slice(&pattern(8192, 3));
    // SAFETY: wbuf lives until the completion is drained below.
    let iov = unsafe {
        IoVecs::from_raw(&[
            (wbuf.as_mut_ptr(), 4096),
            (wbuf.as_mut_ptr().add(4096), 4096),
        ])
    };
    let before = st.dsync_writes.load(Ordering::SeqCst);
    blk.submit(IoRequest::write(1 << 20, iov, false), q.completion(1));
    let done = q.wait();
    assert_eq!(done.len(), 1);
    assert!(done[0].2.is_ok(), "{:?}", done[0].2);
    if !e.wce {
        assert!(
            st.dsync_writes.load(Ordering::SeqCst) > before,
            "{mode}: async write FUA"
        );
    }
    blk.submit(
        IoRequest::read(1 << 20, IoVecs::from_vec(vec![0; 8192])),
        q.completion(2),
    );
    let done = q.wait();
    let (tag, req, r) = done.into_iter().next().unwrap();
    assert_eq!(tag, 2);
    r.unwrap();
    assert_eq!(req.iov.into_vec().unwrap(), pattern(8192, 3));

    // Flush reaches fdatasync, except in unsafe mode.
    let before = st.fdatasync.load(Ordering::SeqCst);
    blk.flush().unwrap();
    blk.submit(IoRequest::flush(), q.completion(3));
    q.wait().into_iter().for_each(|c| c.2.unwrap());
    let syncs = st.fdatasync.load(Ordering::SeqCst) - before;
    if e.flush_syncs {
        assert_eq!(syncs, 2, "{mode}/{aio}: flush must call fdatasync");
    } else {
        assert_eq!(syncs, 0, "{mode}: unsafe must skip fdatasync");
    }
    if aio == "io_uring" && !e.direct {
        assert!(
            st.uring_ops.load(Ordering::SeqCst) >= 2,
            "async I/O went through io_uring"
        );
    }
    drop(blk);
    // The data is in the file itself.
    let raw = std::fs::read(&img).unwrap();
    assert_eq!(&raw[4096..4096 + data.len()], &data[..]);
    assert_eq!(&raw[70_001..71_001], &odd[..]);
}

#[test]
fn all_cache_modes_threads() {
    for m in ["writeback", "none", "writethrough", "directsync", "unsafe"] {
        roundtrip(m, "threads");
    }
}

#[test]
fn all_cache_modes_io_uring() {
    for m in ["writeback", "none", "writethrough", "directsync", "unsafe"] {
        roundtrip(m, "io_uring");
    }
}

#[test]
fn direct_cache_modes_native_aio() {
    // Linux AIO needs O_DIRECT, so only the direct modes.
    for m in ["none", "directsync"] {
        roundtrip(m, "native");
    }
    // And it refuses to run without it, with QEMU's message.
    let dir = TempDir::new("native");
    let img = dir.file("d.img", 1 << 20);
    let e = parse_drive(&format!("file={img},format=raw,if=none,aio=native"))
        .unwrap()
        .open(&BlockGraph::new())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "aio=native was specified, but it requires cache.direct=on, which was not specified."
    );
}

#[test]
fn runtime_wce_switch() {
    let dir = TempDir::new("wce");
    let img = dir.file("d.img", 1 << 20);
    let graph = BlockGraph::new();
    let blk = parse_drive(&format!("file={img},format=raw,if=none,aio=threads"))
        .unwrap()
        .open(&graph)
        .unwrap();
    let st_drv = file_driver(&blk);
    let st = st_drv.syscall_stats().unwrap();
    blk.write_at(0, &[1; 512]).unwrap();
    assert_eq!(st.dsync_writes.load(Ordering::SeqCst), 0);
    blk.set_write_cache(false);
    assert!(!blk.write_cache_enabled());
    blk.write_at(512, &[2; 512]).unwrap();
    blk.write_zeroes(4096, 4096, false).unwrap();
    assert!(st.dsync_writes.load(Ordering::SeqCst) + st.fdatasync.load(Ordering::SeqCst) >= 2);
    blk.set_write_cache(true);
    let before = st.dsync_writes.load(Ordering::SeqCst);
    blk.write_at(1024, &[3; 512]).unwrap();
    assert_eq!(st.dsync_writes.load(Ordering::SeqCst), before);
}

#[test]
fn cache_direct_and_no_flush_keys() {
    let dir = TempDir::new("keys");
    let img = dir.file("d.img", 1 << 20);
    let graph = BlockGraph::new();
    let node = graph
        .blockdev_add_str(&format!(
            "driver=raw,node-name=r,file.driver=file,file.filename={img},cache.direct=on,cache.no-flush=on"
        ))
        .unwrap();
    let blk = BlockBackend::new("b", node, Default::default()).unwrap();
    let f = file_driver(&blk);
    assert_ne!(
        fd_flags(f.raw_fd().unwrap()) & O_DIRECT,
        0,
        "cache.direct inherited by the inline file child"
    );
    blk.flush().unwrap();
    assert_eq!(
        f.syscall_stats().unwrap().fdatasync.load(Ordering::SeqCst),
        0
    );
}

#[test]
fn strace_sees_fdatasync_and_dsync() {
    // Run the writethrough round trip in a child process under strace and
    // look at the real syscalls.
    if std::env::var("STRATA_STRACE_CHILD").is_ok() {
        let dir = TempDir::new("strace");
        let img = dir.file("d.img", 1 << 20);
        let graph = BlockGraph::new();
        let blk = parse_drive(&format!(
            "file={img},format=raw,if=none,cache=writethrough,aio=threads"
        ))
        .unwrap()
        .open(&graph)
        .unwrap();
        blk.write_at(0, &[9; 4096]).unwrap();
        blk.flush().unwrap();
        return;
    }
    if std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_err()
    {
        eprintln!("strace not installed; skipped");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("strace")
        .args(["-f", "-e", "trace=fdatasync,pwritev2", "-o", "/dev/stderr"])
        .arg(exe)
        .args([
            "--exact",
            "strace_sees_fdatasync_and_dsync",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("STRATA_STRACE_CHILD", "1")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("pwritev2(") && l.contains("RWF_DSYNC")),
        "{log}"
    );
    assert!(log.lines().any(|l| l.contains("fdatasync(")), "{log}");
}

#[test]
fn o_direct_on_a_file_whose_size_is_not_sector_aligned() {
    for aio in ["threads", "io_uring", "native"] {
        let dir = TempDir::new("odd");
        let img = dir.path("odd.img");
        std::fs::write(&img, pattern(1636, 9)).unwrap();
        let g = BlockGraph::new();
        let blk = parse_drive(&format!(
            "file={img},format=raw,if=none,cache=none,aio={aio}"
        ))
        .unwrap()
        .open(&g)
        .unwrap();
        // Like QEMU, the length is rounded up to whole sectors.
        assert_eq!(blk.len(), 2048);
        let mut all = vec![0xffu8; 2048];
        blk.read_at(0, &mut all).unwrap();
        assert_eq!(&all[..1636], &pattern(1636, 9)[..], "{aio}");
        assert!(
            all[1636..].iter().all(|&b| b == 0),
            "{aio}: tail reads zero"
        );
        // Async, aligned buffer: short read at EOF completes with zeroes.
        let q = CompletionQueue::new().unwrap();
        let mut buf = block::iov::AlignedBuf::new(2048, 4096);
        // SAFETY: buf outlives the request (we wait below).
        let iov = unsafe { IoVecs::from_raw(&[(buf.as_mut_ptr(), 2048)]) };
        blk.submit(IoRequest::read(0, iov), q.completion(0));
        q.wait()[0].2.as_ref().unwrap();
        assert_eq!(&buf[..1636], &pattern(1636, 9)[..], "{aio}");
        assert!(buf[1636..].iter().all(|&b| b == 0), "{aio}");
        // An unaligned write across EOF grows the file only as asked.
        blk.write_at(1630, &[0xab; 10]).unwrap();
        drop(blk);
        let raw = std::fs::read(&img).unwrap();
        assert_eq!(raw.len(), 1640, "{aio}");
        assert_eq!(&raw[1630..], &[0xab; 10]);
    }
}

/// A file on tmpfs is read and written on the submitting thread: io_uring
/// would hand each request to a kernel worker (tmpfs cannot read without
/// blocking), a thread switch each way for one memcpy. Flags and FUA
/// behave as on a disk.
#[test]
fn tmpfs_requests_complete_on_the_submitting_thread() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("SKIP: no /dev/shm");
        return;
    }
    let img = shm.join(format!("strata-inline-{}.img", std::process::id()));
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let graph = BlockGraph::new();
    let spec = parse_drive(&format!(
        "file={},format=raw,if=none,id=d0,cache=directsync,aio=io_uring",
        img.display()
    ))
    .unwrap();
    let blk = spec.open(&graph).unwrap();
    let file = file_driver(&blk);
    assert_eq!(file.aio_engine(), Some("io_uring"));
    let st = file.syscall_stats().unwrap();
    let q = CompletionQueue::new().unwrap();
    let me = std::thread::current().id();
    for (tag, req) in [
        (
            1,
            IoRequest::write(8192, IoVecs::from_vec(pattern(4096, 5)), false),
        ),
        (2, IoRequest::read(8192, IoVecs::from_vec(vec![0; 4096]))),
        (3, IoRequest::flush()),
    ] {
        let on = Arc::new(std::sync::Mutex::new(None));
        let on2 = on.clone();
        let inner = q.completion(tag);
        blk.submit(
            req,
            Box::new(move |r, res| {
                *on2.lock().unwrap() = Some(std::thread::current().id());
                inner(r, res)
            }),
        );
        assert_eq!(
            *on.lock().unwrap(),
            Some(me),
            "request {tag} completed inline"
        );
        let (_, req, r) = q.wait().into_iter().next().unwrap();
        r.unwrap();
        if tag == 2 {
            assert_eq!(req.iov.into_vec().unwrap(), pattern(4096, 5));
        }
    }
    // Zeroes without FALLOC_FL_ZERO_RANGE (tmpfs has none): inside the
    // file a punched hole allocated again (still data, not a hole), past
    // its end an allocation that grows it.
    use std::os::unix::fs::MetadataExt;
    let size = 1u64 << 20;
    let blocks = std::fs::metadata(&img).unwrap().blocks();
    blk.write_zeroes(8192, 4096, false).unwrap();
    let mut back = vec![1u8; 4096];
    blk.read_at(8192, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
    assert_eq!(
        std::fs::metadata(&img).unwrap().blocks(),
        blocks,
        "zeroed in place, still allocated"
    );
    file.write_zeroes(size, 65536, false, false).unwrap();
    assert_eq!(std::fs::metadata(&img).unwrap().len(), size + 65536);
    assert_eq!(
        st.uring_ops.load(Ordering::SeqCst),
        0,
        "nothing went through the ring"
    );
    assert!(
        st.dsync_writes.load(Ordering::SeqCst) >= 1,
        "directsync: FUA write"
    );
    assert!(st.fdatasync.load(Ordering::SeqCst) >= 1, "flush: fdatasync");
    drop(blk);
    let _ = std::fs::remove_file(&img);
}

/// With O_DIRECT a write that does not cover whole sectors reads, merges
/// and writes back its sectors: an aligned write into the same sector in
/// between must not be undone by that write-back (QEMU serialises such
/// requests). One thread keeps changing byte 1 of sector 0 (each a
/// read-modify-write); the other writes the whole sector with a new value
/// and reads it back: every byte but byte 1 must be its own.
#[test]
fn an_unaligned_write_never_undoes_an_aligned_one() {
    use std::sync::atomic::AtomicBool;
    for aio in ["threads", "io_uring"] {
        let dir = TempDir::new("rmw");
        let img = dir.path("rmw.img");
        std::fs::write(&img, vec![0u8; 1 << 16]).unwrap();
        let g = BlockGraph::new();
        let blk = parse_drive(&format!(
            "file={img},format=raw,if=none,cache=none,aio={aio}"
        ))
        .unwrap()
        .open(&g)
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let rmw = {
            let (blk, stop) = (blk.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u8;
                while !stop.load(Ordering::Relaxed) {
                    blk.write_at(1, &[i]).unwrap();
                    i = i.wrapping_add(1);
                }
            })
        };
        let q = CompletionQueue::new().unwrap();
        let mut buf = block::iov::AlignedBuf::new(512, 4096);
        let mut lost = 0;
        for k in 0..2000u32 {
            let v = (k % 250 + 2) as u8;
            buf.fill(v);
            // SAFETY: buf outlives the request (we wait below).
            let iov = unsafe { IoVecs::from_raw(&[(buf.as_mut_ptr(), 512)]) };
            blk.submit(IoRequest::write(0, iov, false), q.completion(0));
            q.wait()[0].2.as_ref().unwrap();
            let mut back = [0u8; 512];
            blk.read_at(0, &mut back).unwrap();
            if back[2..].iter().any(|&b| b != v) || back[0] != v {
                lost += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        rmw.join().unwrap();
        assert_eq!(
            lost, 0,
            "{aio}: aligned writes undone by a read-modify-write"
        );
    }
}
