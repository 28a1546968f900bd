//! Metadata writeback (QEMU's writeback metadata caches): an allocating
//! write changes L2 tables and refcount blocks in the cache only and syncs
//! nothing; a flush writes them back in the crash-safe order (refcount
//! blocks, sync, L2 tables, sync, L1), and so does an eviction (refcounts
//! and a sync before the L2 slice). A storage wrapper logs every write and
//! sync; "crashes" are replayed from the log: at each point, what the last
//! sync made durable plus any one write issued since (a later write may
//! reach the disk before an earlier one). No such image may show
//! corruption (a reference to a cluster whose refcount is 0, an L1 entry
//! pointing at an unwritten table); leaks are allowed.

use formats::qcow2::check::Repair;
use formats::qcow2::create::{create, CreateOptions};
use formats::qcow2::{OpenOptions, Qcow2};
use formats::storage::{MemStorage, Storage};
use std::io;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
enum Op {
    Write(u64, Vec<u8>),
    SetLen(u64),
    Sync,
}

/// Storage that logs writes (with their data) and syncs.
struct Logging {
    inner: MemStorage,
    log: Mutex<Vec<Op>>,
}

impl Logging {
    fn new(data: Vec<u8>) -> Logging {
        Logging {
            inner: MemStorage::new(data, 1 << 32),
            log: Mutex::new(Vec::new()),
        }
    }
    fn log(&self) -> Vec<Op> {
        self.log.lock().unwrap().clone()
    }
    fn syncs(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|o| matches!(o, Op::Sync))
            .count()
    }
}

impl Storage for Logging {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.log
            .lock()
            .unwrap()
            .push(Op::Write(offset, buf.to_vec()));
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> io::Result<()> {
        self.log.lock().unwrap().push(Op::Sync);
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.log.lock().unwrap().push(Op::SetLen(len));
        self.inner.set_len(len)
    }
}

fn apply(img: &MemStorage, op: &Op) {
    match op {
        Op::Write(o, d) => img.write_at(*o, d).unwrap(),
        Op::SetLen(l) => img.set_len(*l).unwrap(),
        Op::Sync => {}
    }
}

fn base(cluster_size: u64, size: u64) -> Vec<u8> {
    let f = Arc::new(MemStorage::new(Vec::new(), 1 << 32));
    let o = CreateOptions {
        size,
        cluster_size,
        ..Default::default()
    };
    create("wb", f.clone(), None, &o).unwrap();
    f.contents()
}

/// Check the image in `data` read-only: (corruptions, leaks).
fn check(data: Vec<u8>) -> (u64, u64, Vec<String>) {
    let f = Arc::new(MemStorage::new(data, 1 << 32));
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let r = Qcow2::open("crash", f, None, None, &ro)
        .unwrap()
        .check(Repair::None)
        .unwrap();
    (r.corruptions, r.leaks, r.messages)
}

/// Every crash image the log allows (see the module doc) is free of
/// corruption. Returns how many were checked.
fn crashes_are_safe(start: &[u8], log: &[Op], what: &str) -> usize {
    let durable = MemStorage::new(start.to_vec(), 1 << 32);
    let mut since: Vec<&Op> = Vec::new();
    let mut n = 0;
    for op in log {
        if let Op::Sync = op {
            for o in since.drain(..) {
                apply(&durable, o);
            }
            continue;
        }
        since.push(op);
        // The durable state plus this one write only.
        let img = MemStorage::new(durable.contents(), 1 << 32);
        apply(&img, op);
        let (c, _, m) = check(img.contents());
        assert_eq!(c, 0, "{what}: crash image {n}: {m:?}");
        n += 1;
    }
    // And everything issued, in order.
    for o in since.drain(..) {
        apply(&durable, o);
    }
    let (c, _, m) = check(durable.contents());
    assert_eq!(c, 0, "{what}: final crash image: {m:?}");
    n
}

fn pattern(i: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (i as usize * 31 + j % 253) as u8)
        .collect()
}

/// Allocating writes (new L2 tables, new data clusters) with the caches
/// large enough: not one sync, and no metadata reaches the file before the
/// flush. The flush writes back refcounts, then L2 tables, then the L1
/// table, with syncs between; afterwards the image is exact and clean
/// (leak-free) for Strata and for `qemu-img check`.
#[test]
fn allocating_writes_do_not_sync_until_flushed() {
    let cs = 4096;
    let start = base(cs, 64 << 20);
    let f = Arc::new(Logging::new(start.clone()));
    let img = Qcow2::open("wb", f.clone(), None, None, &OpenOptions::default()).unwrap();
    let open_ops = f.log().len();
    let mut model = vec![0u8; 64 << 20];
    // 2 MiB per L2 table: eight tables, partial and whole clusters.
    for i in 0..24u64 {
        let off = (i % 8) * (2 << 20) + (i / 8) * 12288 + 512;
        let d = pattern(i, 6000);
        img.write(off, &d, false).unwrap();
        model[off as usize..off as usize + d.len()].copy_from_slice(&d);
    }
    let log = f.log();
    assert_eq!(f.syncs(), 0, "allocating writes synced the file");
    // Only data reached the file: everything written lies in clusters
    // past the end of the image as it was (new clusters).
    for op in &log[open_ops..] {
        if let Op::Write(o, _) = op {
            assert!(
                *o >= start.len() as u64,
                "metadata written at 0x{o:x} before a flush"
            );
        }
    }
    let before_flush = log.len();
    img.flush().unwrap();
    let log = f.log();
    assert!(f.syncs() >= 2, "a flush syncs");

    // Order within the flush: refcount blocks, sync, L2, sync, L1.
    let h = formats::qcow2::preview(&*f, "wb").unwrap().header;
    let rt = h.refcount_table_offset;
    let rb0 = u64::from_be_bytes(start[rt as usize..rt as usize + 8].try_into().unwrap());
    let l1 = h.l1_table_offset;
    let kind = |o: u64| {
        if o / cs == rb0 / cs {
            'r'
        } else if o / cs == l1 / cs {
            '1'
        } else {
            '2'
        }
    };
    let seq: String = log[before_flush..]
        .iter()
        .map(|op| match op {
            Op::Write(o, _) => kind(*o),
            Op::SetLen(_) => 'l',
            Op::Sync => 's',
        })
        .collect();
    let first = |c: char| seq.find(c).unwrap_or(usize::MAX);
    let (r, l2, one) = (first('r'), first('2'), first('1'));
    assert!(r < l2 && l2 < one, "flush order: {seq}");
    assert!(
        seq[r..l2].contains('s'),
        "no sync between refcounts and L2: {seq}"
    );
    assert!(
        seq[l2..one].contains('s'),
        "no sync between L2 and L1: {seq}"
    );
    assert!(!seq[one..].contains('2'), "an L2 table after the L1: {seq}");

    crashes_are_safe(&start, &log, "no eviction");

    // Exact and clean now.
    let disk = f.inner.contents();
    let (c, l, m) = check(disk.clone());
    assert_eq!((c, l), (0, 0), "after the flush: {m:?}");
    let re = Qcow2::open(
        "wb",
        Arc::new(MemStorage::new(disk.clone(), 1 << 32)),
        None,
        None,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut back = vec![0u8; model.len()];
    re.read(0, &mut back).unwrap();
    assert!(back == model, "contents after the flush");
    qemu_img_check(&disk, "after the flush");
    drop(img);
}

/// With tiny caches, evictions write L2 slices and refcount blocks while
/// the writes go on: each evicted L2 slice after a sync of the refcounts
/// it depends on. The tables are linked on disk by a first flush, so an
/// evicted slice is reachable at once. Every crash point is free of
/// corruption, and the image ends exact.
#[test]
fn evictions_keep_refcounts_before_l2() {
    let cs = 4096;
    let start = base(cs, 64 << 20);
    let f = Arc::new(Logging::new(start.clone()));
    let o = OpenOptions {
        l2_cache_size: Some(2 * cs),
        refcount_cache_size: Some(4 * cs),
        ..Default::default()
    };
    let img = Qcow2::open("wb", f.clone(), None, None, &o).unwrap();
    let mut model = vec![0u8; 64 << 20];
    for round in 0..3u64 {
        for i in 0..30u64 {
            // Tables in turn, so that slices are evicted dirty; clusters
            // far enough apart in the file to need more refcount blocks.
            let off = (i * 7 % 30) * (2 << 20) + (round * 3 + i % 3) * 4096 + 1024;
            let d = pattern(i + round, if i % 7 == 0 { 300_000 } else { 5000 });
            img.write(off, &d, false).unwrap();
            model[off as usize..off as usize + d.len()].copy_from_slice(&d);
            if i == 20 {
                img.write_zeroes(4 << 20, 2 << 20, true).unwrap();
                model[4 << 20..6 << 20].fill(0);
            }
        }
        img.flush().unwrap();
    }
    let n = crashes_are_safe(&start, &f.log(), "evictions");
    assert!(n > 90, "{n} crash points");
    let disk = f.inner.contents();
    let (c, l, m) = check(disk.clone());
    assert_eq!((c, l), (0, 0), "after the flush: {m:?}");
    let mut back = vec![0u8; model.len()];
    img.read(0, &mut back).unwrap();
    assert!(back == model, "contents");
    qemu_img_check(&disk, "evictions");
}

/// A FUA write (cache=writethrough) is durable with its metadata when it
/// returns: the state at the last sync reads it back.
#[test]
fn fua_writes_are_durable_on_return() {
    let cs = 65536;
    let start = base(cs, 1 << 30);
    let f = Arc::new(Logging::new(start.clone()));
    let img = Qcow2::open("wb", f.clone(), None, None, &OpenOptions::default()).unwrap();
    let d = pattern(7, 8192);
    img.write(600 << 20, &d, true).unwrap();
    let durable = MemStorage::new(start.clone(), 1 << 32);
    let log = f.log();
    let last_sync = log.iter().rposition(|o| matches!(o, Op::Sync)).unwrap();
    for op in &log[..last_sync] {
        apply(&durable, op);
    }
    let re = Qcow2::open(
        "wb",
        Arc::new(MemStorage::new(durable.contents(), 1 << 32)),
        None,
        None,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut back = vec![0u8; d.len()];
    re.read(600 << 20, &mut back).unwrap();
    assert!(back == d, "the FUA write is not durable");
    crashes_are_safe(&start, &log, "fua");
}

/// Lazy refcounts: allocating writes sync nothing either (the dirty bit
/// reaches the disk with the first writeback), and a flush still leaves an
/// image the next read-write open repairs.
#[test]
fn lazy_refcounts_writes_do_not_sync() {
    let cs = 65536;
    let f = Arc::new(Logging::new(base(cs, 1 << 30)));
    let o = OpenOptions {
        lazy_refcounts: Some(true),
        ..Default::default()
    };
    let img = Qcow2::open("wb", f.clone(), None, None, &o).unwrap();
    for i in 0..8u64 {
        img.write(i * (100 << 20) + 4096, &pattern(i, 70_000), false)
            .unwrap();
    }
    assert_eq!(f.syncs(), 0, "allocating writes synced the file");
    img.flush().unwrap();
    let disk = f.inner.contents();
    let hdr = u64::from_be_bytes(disk[72..80].try_into().unwrap());
    assert!(hdr & 1 != 0, "the dirty bit is on disk after a writeback");
    // Repaired by a read-write open of the crashed image.
    let crashed = Arc::new(MemStorage::new(disk, 1 << 32));
    let re = Qcow2::open("wb", crashed.clone(), None, None, &OpenOptions::default()).unwrap();
    for i in 0..8u64 {
        let mut back = vec![0u8; 70_000];
        re.read(i * (100 << 20) + 4096, &mut back).unwrap();
        assert!(back == pattern(i, 70_000), "write {i}");
    }
    re.close().unwrap();
    drop(re);
    let (c, l, m) = check(crashed.contents());
    assert_eq!((c, l), (0, 0), "{m:?}");
    img.close().unwrap();
}

/// `qemu-img check` on a copy of `data` in a file, when qemu-img is there.
fn qemu_img_check(data: &[u8], what: &str) {
    let dir = std::env::temp_dir().join(format!("strata-wb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{}.qcow2", what.replace(' ', "-")));
    std::fs::write(&p, data).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["check", p.to_str().unwrap()])
        .output();
    let _ = std::fs::remove_file(&p);
    let Ok(out) = out else {
        eprintln!("SKIP: no qemu-img");
        return;
    };
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
