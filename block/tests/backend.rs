//! BlockBackend: blkdebug-injected errors through the rerror/werror
//! policies (report, ignore, stop + resume, enospc), sync and async;
//! stats; discard and detect-zeroes; block status.

mod common;

use block::backend::{BackendConfig, BlockBackend, CompletionQueue, ErrorAction};
use block::driver::IoRequest;
use block::graph::BlockGraph;
use block::iov::IoVecs;
use common::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn blkdebug(img: &str, rules: &str, werror: ErrorAction, rerror: ErrorAction) -> Arc<BlockBackend> {
    let g = BlockGraph::new();
    let n = g
        .blockdev_add_str(&format!(
            "driver=raw,node-name=top,file.driver=blkdebug,file.image.driver=file,file.image.filename={img}{rules}"
        ))
        .unwrap();
    BlockBackend::new(
        "d0",
        n,
        BackendConfig {
            werror,
            rerror,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn report_policy_returns_injected_errno() {
    let dir = TempDir::new("rep");
    let img = dir.file("d.img", 1 << 20);
    // Fail the 3rd write with ENOSPC (28), once.
    let blk = blkdebug(
        &img,
        ",file.inject-error.0.event=write_aio,file.inject-error.0.errno=28,file.inject-error.0.x-skip=2,file.inject-error.0.once=on",
        ErrorAction::Report,
        ErrorAction::Report,
    );
    blk.write_at(0, &[1; 512]).unwrap();
    blk.write_at(512, &[2; 512]).unwrap();
    let e = blk.write_at(1024, &[3; 512]).unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC);
    blk.write_at(1024, &[3; 512]).unwrap();
    let st = blk.stats();
    assert_eq!(st.write.ops, 4);
    assert_eq!(st.write.failed, 1);
    assert_eq!(st.write.bytes, 3 * 512);
    drop(blk);
    // Reads on a given sector fail with EIO.
    let blk2 = blkdebug(
        &img,
        ",file.inject-error.0.event=read_aio,file.inject-error.0.sector=8",
        ErrorAction::Report,
        ErrorAction::Report,
    );
    let mut b = [0u8; 512];
    blk2.read_at(0, &mut b).unwrap();
    assert_eq!(blk2.read_at(4096, &mut b).unwrap_err().errno(), libc::EIO);
    // Async path sees it too.
    let q = CompletionQueue::new().unwrap();
    blk2.submit(block::backend::read_request(4096, 512), q.completion(9));
    let c = q.wait();
    assert_eq!(c[0].2.as_ref().unwrap_err().errno(), libc::EIO);
}

#[test]
fn ignore_policy_completes_successfully() {
    let dir = TempDir::new("ign");
    let img = dir.file("d.img", 1 << 20);
    let blk = blkdebug(
        &img,
        ",file.inject-error.0.event=write_aio,file.inject-error.0.errno=5",
        ErrorAction::Ignore,
        ErrorAction::Report,
    );
    blk.write_at(0, &[1; 512]).unwrap();
    let q = CompletionQueue::new().unwrap();
    blk.submit(
        IoRequest::write(0, IoVecs::from_vec(vec![1; 512]), false),
        q.completion(0),
    );
    assert!(q.wait()[0].2.is_ok());
    assert_eq!(blk.stats().write.failed, 2);
}

#[test]
fn stop_policy_pauses_and_resume_retries() {
    let dir = TempDir::new("stop");
    let img = dir.file("d.img", 1 << 20);
    // The first write fails once; the retry after resume succeeds.
    let blk = blkdebug(
        &img,
        ",file.inject-error.0.event=write_aio,file.inject-error.0.errno=5,file.inject-error.0.once=on",
        ErrorAction::Stop,
        ErrorAction::Report,
    );
    let stops = Arc::new(AtomicUsize::new(0));
    let s2 = stops.clone();
    blk.set_error_handler(move |_, action, e| {
        assert_eq!(e.errno(), libc::EIO);
        if action == ErrorAction::Stop {
            s2.fetch_add(1, Ordering::SeqCst);
        }
    });
    let q = CompletionQueue::new().unwrap();
    blk.submit(
        IoRequest::write(4096, IoVecs::from_vec(vec![0xab; 4096]), false),
        q.completion(1),
    );
    // Wait until the backend stopped.
    for _ in 0..500 {
        if blk.is_stopped() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(blk.is_stopped());
    assert_eq!(stops.load(Ordering::SeqCst), 1);
    assert!(q.drain().is_empty(), "the request is parked, not completed");
    blk.resume();
    let c = q.wait();
    assert!(c[0].2.is_ok());
    assert!(!blk.is_stopped());
    let mut back = vec![0u8; 4096];
    blk.read_at(4096, &mut back).unwrap();
    assert_eq!(back, vec![0xab; 4096]);

    // Synchronous caller: blocks until resume, then retries.
    drop(blk);
    let blk = blkdebug(
        &img,
        ",file.inject-error.0.event=write_aio,file.inject-error.0.errno=5,file.inject-error.0.once=on",
        ErrorAction::Stop,
        ErrorAction::Report,
    );
    let b2 = blk.clone();
    let t = std::thread::spawn(move || b2.write_at(0, &[7; 512]));
    for _ in 0..500 {
        if blk.is_stopped() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(blk.is_stopped());
    blk.resume();
    t.join().unwrap().unwrap();
}

#[test]
fn enospc_policy_stops_only_on_enospc() {
    let dir = TempDir::new("enospc");
    let img = dir.file("d.img", 1 << 20);
    let blk = blkdebug(
        &img,
        ",file.inject-error.0.event=write_aio,file.inject-error.0.errno=5,file.inject-error.0.once=on,file.inject-error.1.event=write_aio,file.inject-error.1.errno=28,file.inject-error.1.once=on",
        ErrorAction::Enospc,
        ErrorAction::Report,
    );
    assert_eq!(blk.write_at(0, &[1; 512]).unwrap_err().errno(), libc::EIO);
    assert!(!blk.is_stopped());
    let q = CompletionQueue::new().unwrap();
    blk.submit(
        IoRequest::write(0, IoVecs::from_vec(vec![1; 512]), false),
        q.completion(0),
    );
    for _ in 0..500 {
        if blk.is_stopped() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(blk.is_stopped(), "ENOSPC stops");
    blk.resume();
    assert!(q.wait()[0].2.is_ok());
}

#[test]
fn read_only_backend_and_range_checks() {
    let dir = TempDir::new("ro");
    let img = dir.file("d.img", 65536);
    let g = BlockGraph::new();
    let n = g.open_image(&img, Some("raw"), true, &[]).unwrap();
    let blk = BlockBackend::new("ro", n, BackendConfig::default()).unwrap();
    assert!(blk.is_read_only());
    assert_eq!(blk.write_at(0, &[1]).unwrap_err().errno(), libc::EROFS);
    assert_eq!(blk.discard(0, 512).unwrap_err().errno(), libc::EROFS);
    let mut b = [0u8; 16];
    assert!(blk.read_at(65536 - 8, &mut b).is_err());
    assert!(
        blk.read_at(u64::MAX - 4, &mut b).is_err(),
        "no overflow panic"
    );
}

#[test]
fn discard_detect_zeroes_and_block_status() {
    let dir = TempDir::new("dz");
    let img = dir.file("d.img", 4 << 20);
    std::fs::write(&img, vec![0xffu8; 4 << 20]).unwrap();
    let g = BlockGraph::new();
    // discard=ignore (default): nothing happens.
    let n = g
        .blockdev_add_str(&format!(
            "driver=raw,node-name=a,file.driver=file,file.filename={img}"
        ))
        .unwrap();
    let blk = BlockBackend::new("a", n, BackendConfig::default()).unwrap();
    blk.discard(0, 1 << 20).unwrap();
    let mut b = vec![0u8; 4096];
    blk.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0xff), "discard=ignore keeps data");
    let st = blk.block_status(0, 4 << 20).unwrap();
    assert!(st.data && st.len == 4 << 20);
    drop(blk);
    // discard=unmap punches a hole; block status sees it.
    let n = g
        .blockdev_add_str(&format!(
            "driver=raw,node-name=b,discard=unmap,detect-zeroes=unmap,file.driver=file,file.filename={img}"
        ))
        .unwrap();
    let blk = BlockBackend::new("b", n, BackendConfig::default()).unwrap();
    let before = blk
        .root()
        .unwrap()
        .child("file")
        .unwrap()
        .driver()
        .allocated_size()
        .unwrap();
    blk.discard(1 << 20, 1 << 20).unwrap();
    blk.read_at(1 << 20, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0), "punched hole reads zero");
    let st = blk.block_status(1 << 20, 3 << 20).unwrap();
    assert!(!st.data && st.zero && st.len == 1 << 20, "{st:?}");
    // detect-zeroes=unmap turns an all-zero write into a hole.
    blk.write_at(2 << 20, &vec![0u8; 1 << 20]).unwrap();
    let st = blk.block_status(2 << 20, 2 << 20).unwrap();
    assert!(!st.data && st.zero, "{st:?}");
    let after = blk
        .root()
        .unwrap()
        .child("file")
        .unwrap()
        .driver()
        .allocated_size()
        .unwrap();
    assert!(after + (2 << 20) <= before, "{before} -> {after}");
    // write_zeroes without unmap keeps reading zeroes.
    blk.write_zeroes(3 << 20, 65536, false).unwrap();
    blk.read_at(3 << 20, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    let s = blk.stats();
    assert_eq!(s.discard.ops, 1);
    assert_eq!(s.write_zeroes.ops, 1);
}

#[test]
fn async_vectored_into_raw_memory_many_in_flight() {
    let dir = TempDir::new("async");
    let img = dir.file("d.img", 8 << 20);
    let g = BlockGraph::new();
    for aio in ["io_uring", "threads"] {
        let n = g
            .blockdev_add_str(&format!(
                "driver=raw,node-name=n{},cache.direct=on,file.driver=file,file.filename={img},file.aio={aio}",
                aio.len()
            ))
            .unwrap();
        let blk = BlockBackend::new(aio, n, BackendConfig::default()).unwrap();
        // Fake "guest memory": one aligned region, requests point into it.
        let mut mem = block::iov::AlignedBuf::new(64 * 4096, 4096);
        for (i, c) in mem.chunks_mut(4096).enumerate() {
            c.fill(i as u8 + 1);
        }
        let q = CompletionQueue::new().unwrap();
        let base = mem.as_mut_ptr();
        for i in 0..64u64 {
            // Two segments per request: 1K + 3K (unaligned segments force
            // the bounce path under O_DIRECT for half of them).
            // SAFETY: `mem` outlives all completions (we wait below).
            let iov = unsafe {
                let p = base.add(i as usize * 4096);
                if i % 2 == 0 {
                    IoVecs::from_raw(&[(p, 4096)])
                } else {
                    IoVecs::from_raw(&[(p, 1024), (p.add(1024), 3072)])
                }
            };
            blk.submit(IoRequest::write(i * 4096, iov, false), q.completion(i));
        }
        let mut n = 0;
        while n < 64 {
            for c in q.wait() {
                c.2.unwrap();
                n += 1;
            }
        }
        let mut back = vec![0u8; 64 * 4096];
        blk.read_at(0, &mut back).unwrap();
        assert_eq!(&back[..], &mem[..], "{aio}");
    }
}

#[test]
fn removable_media_insert_and_eject() {
    let dir = TempDir::new("media");
    let iso = dir.file("disc.iso", 1 << 20);
    std::fs::write(&iso, pattern(1 << 20, 4)).unwrap();
    let g = BlockGraph::new();
    // An empty CD-ROM drive still has a backend.
    let cd = block::drive::parse_drive("if=ide,index=2,media=cdrom")
        .unwrap()
        .open(&g)
        .unwrap();
    assert_eq!(cd.id(), "ide1-cd0");
    assert!(!cd.is_inserted());
    assert!(cd.is_read_only());
    assert_eq!(cd.len(), 0);
    let mut b = [0u8; 2048];
    assert_eq!(cd.read_at(0, &mut b).unwrap_err().errno(), libc::ENOMEDIUM);
    let q = CompletionQueue::new().unwrap();
    cd.submit(block::backend::read_request(0, 2048), q.completion(0));
    assert_eq!(q.wait()[0].2.as_ref().unwrap_err().errno(), libc::ENOMEDIUM);
    assert!(cd.eject().is_err());
    // Insert a disc.
    let disc = g.open_image(&iso, Some("raw"), true, &[]).unwrap();
    cd.insert(disc.clone()).unwrap();
    assert!(cd.is_inserted());
    assert_eq!(cd.len(), 1 << 20);
    cd.read_at(2048, &mut b).unwrap();
    assert_eq!(&b[..], &pattern(1 << 20, 4)[2048..4096]);
    assert!(cd.insert(disc).is_err(), "already inserted");
    let out = cd.eject().unwrap();
    assert_eq!(out.len(), 1 << 20);
    assert!(!cd.is_inserted());

    // A writable medium's lock is released on eject.
    let disk = dir.file("d.img", 1 << 20);
    let e = block::drive::parse_drive("if=none,id=e")
        .unwrap()
        .open(&g)
        .unwrap();
    e.insert(g.open_image(&disk, Some("raw"), false, &[]).unwrap())
        .unwrap();
    e.write_at(0, &[1; 512]).unwrap();
    let g2 = BlockGraph::new();
    let other = g2.open_image(&disk, Some("raw"), false, &[]).unwrap();
    assert!(BlockBackend::new("o", other.clone(), BackendConfig::default()).is_err());
    e.eject().unwrap();
    assert!(BlockBackend::new("o", other, BackendConfig::default()).is_ok());
}

/// A device's own `rerror=`/`werror=` override the drive's; the next
/// device to take the drive starts from the drive's again.
#[test]
fn device_error_actions_override_the_drive_until_the_next_device() {
    let t = TempDir::new("erract");
    let img = t.path("a.img");
    std::fs::write(&img, vec![0u8; 65536]).unwrap();
    let b = blkdebug(&img, "", ErrorAction::Enospc, ErrorAction::Report);
    assert_eq!(
        (b.rerror(), b.werror()),
        (ErrorAction::Report, ErrorAction::Enospc)
    );
    b.set_error_actions(Some(ErrorAction::Stop), None);
    assert_eq!(
        (b.rerror(), b.werror()),
        (ErrorAction::Stop, ErrorAction::Enospc)
    );
    b.set_error_actions(None, Some(ErrorAction::Ignore));
    assert_eq!(
        (b.rerror(), b.werror()),
        (ErrorAction::Report, ErrorAction::Ignore)
    );
    b.set_error_actions(None, None);
    assert_eq!(
        (b.rerror(), b.werror()),
        (ErrorAction::Report, ErrorAction::Enospc)
    );
}
