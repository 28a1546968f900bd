//! Inactive nodes and the image handover of live migration: two graphs
//! in one process on one image stand for the source and the destination
//! (OFD locks conflict between open file descriptions, so each graph's
//! locks are another process's to the other). The destination opens
//! inactive (`set_incoming`) next to a source that holds the image
//! writable, refuses writes, and takes the image over after the source
//! inactivated it, seeing the metadata the source wrote; the source
//! writes nothing more, not even at close. Also: activation refused while
//! the source holds its locks, a failed handover (the source takes its
//! images back), migration blockers, drained sections and parked requests.

mod common;

use block::backend::{BackendConfig, BlockBackend, CompletionQueue, ErrorAction};
use block::driver::IoRequest;
use block::error::BlockError;
use block::graph::BlockGraph;
use block::iov::IoVecs;
use common::*;
use std::sync::Arc;

const MIB: u64 = 1 << 20;

fn qcow2_image(dir: &TempDir, opts: &str) -> String {
    let img = dir.path("d.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([img.as_str(), "64M"]);
    let (rc, out) = qemu("qemu-img", &args);
    assert_eq!(rc, 0, "{out}");
    img
}

/// A graph with `d0` (qcow2 on the file) and a device's backend on it.
fn open(img: &str, incoming: bool) -> (BlockGraph, Arc<BlockBackend>) {
    let g = BlockGraph::new();
    g.set_incoming(incoming);
    let n = g
        .blockdev_add_str(&format!(
            r#"{{"driver":"qcow2","node-name":"d0","file":{{"driver":"file","filename":"{img}"}}}}"#
        ))
        .unwrap();
    let blk = BlockBackend::new("disk", n, BackendConfig::default()).unwrap();
    (g, blk)
}

fn read(blk: &BlockBackend, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    blk.read_at(off, &mut b).unwrap();
    b
}

fn assert_inactive(e: BlockError) {
    assert!(
        e.to_string().contains("node 'd0' is inactive") || e.to_string().contains("is inactive"),
        "{e}"
    );
}

/// Exit: close every node, then let go of the images (and their locks).
fn finish(g: BlockGraph, blk: Arc<BlockBackend>) {
    g.close_all();
    drop(blk);
    drop(g);
}

fn check_clean(img: &str) {
    let (rc, out) = qemu("qemu-img", &["check", img]);
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("No errors were found"), "{out}");
}

#[test]
fn handover_between_two_graphs() {
    handover("");
}

/// Lazy refcounts: the source's writes leave the dirty bit on disk,
/// which the inactive destination must not repair at open.
#[test]
fn handover_between_two_graphs_lazy_refcounts() {
    handover("lazy_refcounts=on");
}

fn handover(opts: &str) {
    let dir = TempDir::new("inact-handover");
    let img = qcow2_image(&dir, opts);
    let (a, blk_a) = open(&img, false);
    blk_a.write_at(0, &pattern(64 * 1024, 1)).unwrap();
    blk_a.flush().unwrap();

    // The destination opens next to a writable source: no lock conflict,
    // and it writes nothing to the image.
    let before = std::fs::read(&img).unwrap();
    let (b, blk_b) = open(&img, true);
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "an inactive open wrote"
    );
    assert!(b.get("d0").unwrap().is_inactive());
    assert!(!b.get("d0").unwrap().is_read_only());
    assert_inactive(blk_b.write_at(0, &[1; 512]).unwrap_err());
    assert_inactive(blk_b.write_zeroes(0, 512, false).unwrap_err());
    // Reads are allowed (and fill the destination's caches with what is
    // about to be stale).
    assert_eq!(read(&blk_b, 0, 4096), pattern(64 * 1024, 1)[..4096]);
    assert_eq!(read(&blk_b, 40 * MIB, 4096), vec![0; 4096]);

    // The source goes on writing: new L2 tables far from the first.
    blk_a.write_at(40 * MIB, &pattern(128 * 1024, 2)).unwrap();
    blk_a.write_at(4096, &pattern(4096, 3)).unwrap();
    a.inactivate_all().unwrap();
    assert_inactive(blk_a.write_at(0, &[9; 512]).unwrap_err());
    // A flush of an inactive node writes nothing and succeeds.
    blk_a.flush().unwrap();

    b.activate_all().unwrap();
    assert!(!b.is_incoming());
    assert!(!b.get("d0").unwrap().is_inactive());
    assert_eq!(read(&blk_b, 0, 4096), pattern(64 * 1024, 1)[..4096]);
    assert_eq!(read(&blk_b, 4096, 4096), pattern(4096, 3));
    assert_eq!(read(&blk_b, 40 * MIB, 128 * 1024), pattern(128 * 1024, 2));
    blk_b.write_at(20 * MIB, &pattern(64 * 1024, 4)).unwrap();
    blk_b.write_at(40 * MIB, &pattern(4096, 5)).unwrap();
    blk_b.flush().unwrap();

    // The source is done: its close and drops write nothing.
    assert_inactive(blk_a.write_at(0, &[9; 512]).unwrap_err());
    let before = std::fs::read(&img).unwrap();
    a.close_all();
    drop(blk_a);
    drop(a);
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "the source wrote at close"
    );

    b.close_all();
    drop(blk_b);
    drop(b);
    check_clean(&img);
    // What both wrote, seen by a third open.
    let (c, blk_c) = open(&img, false);
    assert_eq!(read(&blk_c, 0, 4096), pattern(64 * 1024, 1)[..4096]);
    assert_eq!(read(&blk_c, 4096, 4096), pattern(4096, 3));
    assert_eq!(read(&blk_c, 20 * MIB, 64 * 1024), pattern(64 * 1024, 4));
    assert_eq!(read(&blk_c, 40 * MIB, 4096), pattern(4096, 5));
    assert_eq!(
        read(&blk_c, 40 * MIB + 4096, 4096),
        pattern(128 * 1024, 2)[4096..8192]
    );
    c.close_all();
}

#[test]
fn activate_refused_while_the_source_holds_the_image() {
    let dir = TempDir::new("inact-lock");
    let img = qcow2_image(&dir, "");
    let (a, blk_a) = open(&img, false);
    let (b, blk_b) = open(&img, true);
    blk_a.write_at(0, &[1; 4096]).unwrap();
    let e = b.activate_all().unwrap_err();
    assert!(matches!(e, BlockError::Locked(_)), "{e:?}");
    assert!(
        e.to_string().contains("is another process using the image"),
        "{e}"
    );
    // Still inactive, still refusing writes; the source is untouched.
    assert!(b.is_incoming());
    assert!(b.get("d0").unwrap().is_inactive());
    assert_inactive(blk_b.write_at(0, &[2; 512]).unwrap_err());
    blk_a.write_at(4096, &[3; 4096]).unwrap();

    a.inactivate_all().unwrap();
    b.activate_all().unwrap();
    assert_eq!(read(&blk_b, 0, 4096), vec![1; 4096]);
    assert_eq!(read(&blk_b, 4096, 4096), vec![3; 4096]);
    blk_b.write_at(8192, &[4; 4096]).unwrap();
    // Now the source cannot take the image back.
    let e = a.activate_all().unwrap_err();
    assert!(matches!(e, BlockError::Locked(_)), "{e:?}");
    finish(b, blk_b);
    finish(a, blk_a);
    check_clean(&img);
}

#[test]
fn failed_handover_source_takes_the_image_back() {
    let dir = TempDir::new("inact-failed");
    let img = qcow2_image(&dir, "");
    let (a, blk_a) = open(&img, false);
    blk_a.write_at(0, &pattern(8192, 1)).unwrap();
    a.inactivate_all().unwrap();
    assert_inactive(blk_a.write_at(0, &[1; 512]).unwrap_err());
    // The migration failed: the source goes on.
    a.activate_all().unwrap();
    blk_a.write_at(10 * MIB, &pattern(8192, 2)).unwrap();
    assert_eq!(read(&blk_a, 0, 8192), pattern(8192, 1));
    assert_eq!(read(&blk_a, 10 * MIB, 8192), pattern(8192, 2));
    // And holds its locks again: another writer is refused.
    let g = BlockGraph::new();
    let n = g
        .blockdev_add_str(&format!(
            r#"{{"driver":"qcow2","node-name":"x","file":{{"driver":"file","filename":"{img}"}}}}"#
        ))
        .unwrap();
    let e = BlockBackend::new("other", n, BackendConfig::default()).unwrap_err();
    assert!(matches!(e, BlockError::Locked(_)), "{e:?}");
    drop(g);
    // A second try succeeds.
    a.inactivate_all().unwrap();
    let (b, blk_b) = open(&img, true);
    b.activate_all().unwrap();
    assert_eq!(read(&blk_b, 10 * MIB, 8192), pattern(8192, 2));
    finish(a, blk_a);
    finish(b, blk_b);
    check_clean(&img);
}

#[test]
fn persistent_bitmaps_follow_the_image() {
    let dir = TempDir::new("inact-bitmap");
    let img = qcow2_image(&dir, "");
    let (rc, out) = qemu("qemu-img", &["bitmap", "--add", &img, "b0"]);
    assert_eq!(rc, 0, "{out}");
    let a = BlockGraph::new();
    a.set_load_bitmaps(true);
    let na = a
        .blockdev_add_str(&format!(
            r#"{{"driver":"qcow2","node-name":"d0","file":{{"driver":"file","filename":"{img}"}}}}"#
        ))
        .unwrap();
    assert!(na.bitmap("b0").is_some());
    let blk_a = BlockBackend::new("disk", na.clone(), BackendConfig::default()).unwrap();
    blk_a.write_at(MIB, &[1; 4096]).unwrap();

    let b = BlockGraph::new();
    b.set_load_bitmaps(true);
    b.set_incoming(true);
    let before = std::fs::read(&img).unwrap();
    let nb = b
        .blockdev_add_str(&format!(
            r#"{{"driver":"qcow2","node-name":"d0","file":{{"driver":"file","filename":"{img}"}}}}"#
        ))
        .unwrap();
    assert_eq!(std::fs::read(&img).unwrap(), before);
    assert!(nb.bitmap("b0").is_none(), "loaded while inactive");

    a.inactivate_all().unwrap();
    assert!(na.bitmap("b0").is_none());
    b.activate_all().unwrap();
    assert!(b.take_warnings().is_empty());
    let bm = nb.bitmap("b0").expect("loaded at activation");
    assert!(
        bm.is_dirty(MIB, 4096),
        "the source's write is in the bitmap"
    );
    drop(blk_a);
    a.close_all();
    b.close_all();
    drop((na, nb, a, b));
    check_clean(&img);
    let (rc, out) = qemu("qemu-img", &["info", &img]);
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("b0"), "{out}");
}

#[test]
fn migration_blockers_by_format() {
    let dir = TempDir::new("inact-blockers");
    let vpc = dir.path("d.vpc");
    let (rc, out) = qemu("qemu-img", &["create", "-q", "-f", "vpc", &vpc, "8M"]);
    assert_eq!(rc, 0, "{out}");
    let qcow2 = qcow2_image(&dir, "");
    let raw = dir.file("d.raw", MIB);

    let g = BlockGraph::new();
    g.blockdev_add_str(&format!(
        "driver=vpc,node-name=v0,file.driver=file,file.filename={vpc}"
    ))
    .unwrap();
    assert_eq!(
        g.migration_blockers(),
        vec!["The vpc format used by node 'v0' does not support live migration".to_string()]
    );

    let g = BlockGraph::new();
    g.blockdev_add_str(&format!(
        "driver=qcow2,node-name=q0,file.driver=file,file.filename={qcow2}"
    ))
    .unwrap();
    g.blockdev_add_str(&format!(
        "driver=raw,node-name=r0,file.driver=blkdebug,file.image.driver=file,file.image.filename={raw}"
    ))
    .unwrap();
    g.blockdev_add_str("driver=null-co,node-name=n0").unwrap();
    g.blockdev_add_str("driver=copy-on-read,node-name=c0,file=q0")
        .unwrap();
    assert!(
        g.migration_blockers().is_empty(),
        "{:?}",
        g.migration_blockers()
    );
}

#[test]
fn drain_guard_waits_and_parked_requests_stay_parked() {
    let dir = TempDir::new("inact-drain");
    let img = dir.file("d.img", MIB);
    let g = BlockGraph::new();
    let n = g
        .blockdev_add_str(&format!(
            "driver=raw,node-name=top,file.driver=blkdebug,file.image.driver=file,file.image.filename={img},file.inject-error.0.event=write_aio,file.inject-error.0.errno=5,file.inject-error.0.once=on"
        ))
        .unwrap();
    let blk = BlockBackend::new(
        "d0",
        n,
        BackendConfig {
            werror: ErrorAction::Stop,
            ..Default::default()
        },
    )
    .unwrap();
    let q = CompletionQueue::new().unwrap();
    blk.submit(
        IoRequest::write(0, IoVecs::from_vec(vec![0xab; 4096]), false),
        q.completion(1),
    );
    for _ in 0..500 {
        if blk.is_stopped() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(blk.is_stopped());
    // The parked request is not in flight: the drain does not wait for it.
    let guard = blk.drain_begin();
    assert_eq!(blk.in_flight(), 0);
    // A new request queues until the guard goes.
    blk.submit(
        IoRequest::write(8192, IoVecs::from_vec(vec![0xcd; 4096]), false),
        q.completion(2),
    );
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(q.drain().is_empty());
    drop(guard);
    let c = q.wait();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].0, 2);
    assert!(c[0].2.is_ok());
    // The parked write goes without completing.
    assert_eq!(blk.take_parked(), 1);
    assert_eq!(blk.take_parked(), 0);
    blk.resume();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(q.drain().is_empty(), "a taken request completed");
    let mut b = vec![0u8; 4096];
    blk.read_at(0, &mut b).unwrap();
    assert_eq!(b, vec![0; 4096], "the taken write reached the image");
}

/// ahci-test's source: qcow2 on blkdebug on the file, with a flush error
/// injected once (spent by the guest's FLUSH before migrating); the
/// destination has no blkdebug.
#[test]
fn handover_through_blkdebug() {
    let dir = TempDir::new("inact-blkdebug");
    let img = qcow2_image(&dir, "");
    let a = BlockGraph::new();
    let na = a
        .blockdev_add_str(&format!(
            "driver=qcow2,node-name=d0,file.driver=blkdebug,file.image.driver=file,file.image.filename={img},file.inject-error.0.event=flush_to_disk,file.inject-error.0.errno=5,file.inject-error.0.once=on"
        ))
        .unwrap();
    let blk_a = BlockBackend::new("disk", na, BackendConfig::default()).unwrap();
    let (b, blk_b) = open(&img, true);
    blk_a.write_at(MIB, &pattern(8192, 7)).unwrap();
    assert_eq!(blk_a.flush().unwrap_err().errno(), libc::EIO);
    assert!(a.migration_blockers().is_empty());
    a.inactivate_all().unwrap();
    b.activate_all().unwrap();
    assert_eq!(read(&blk_b, MIB, 8192), pattern(8192, 7));
    blk_b.write_at(2 * MIB, &pattern(8192, 8)).unwrap();
    finish(a, blk_a);
    finish(b, blk_b);
    check_clean(&img);
}
