//! Lazy refcounts: with them a flush writes L2 tables (and the L1 table)
//! but no refcount blocks, and syncs once; without them refcount blocks are
//! written and synced before the L2 tables. Counted by a storage wrapper.
//! The image left behind by a "crash" (the storage as it is after a flush,
//! before close) is dirty and its refcounts lag behind; a read-write open
//! repairs it. A clean close leaves exact refcounts and no dirty bit.

use formats::qcow2::check::Repair;
use formats::qcow2::create::{create, CreateOptions};
use formats::qcow2::header::INCOMPAT_DIRTY;
use formats::qcow2::{preview, OpenOptions, Qcow2};
use formats::storage::{MemStorage, Storage};
use std::io;
use std::sync::{Arc, Mutex};

const CS: u64 = 65536;

/// Storage that records its writes (offset, length) and counts syncs.
struct Counting {
    inner: MemStorage,
    writes: Mutex<Vec<(u64, u64)>>,
    syncs: Mutex<u64>,
}

impl Counting {
    fn new(data: Vec<u8>) -> Counting {
        Counting {
            inner: MemStorage::new(data, 1 << 32),
            writes: Mutex::new(Vec::new()),
            syncs: Mutex::new(0),
        }
    }
    /// Writes and syncs since the last call.
    fn take(&self) -> (Vec<(u64, u64)>, u64) {
        let w = std::mem::take(&mut *self.writes.lock().unwrap());
        let s = std::mem::take(&mut *self.syncs.lock().unwrap());
        (w, s)
    }
}

impl Storage for Counting {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.writes.lock().unwrap().push((offset, buf.len() as u64));
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> io::Result<()> {
        *self.syncs.lock().unwrap() += 1;
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

fn be64(b: &[u8], o: u64) -> u64 {
    u64::from_be_bytes(b[o as usize..o as usize + 8].try_into().unwrap())
}

/// Refcount block offsets of the image in `b`.
fn refblocks(b: &[u8]) -> Vec<u64> {
    let rt = be64(b, 48);
    let clusters = u32::from_be_bytes(b[56..60].try_into().unwrap()) as u64;
    (0..clusters * CS / 8)
        .map(|i| be64(b, rt + 8 * i) & !0x1ff)
        .filter(|&o| o != 0)
        .collect()
}

fn image(lazy_bit: bool) -> Vec<u8> {
    let f = Arc::new(MemStorage::new(Vec::new(), 1 << 32));
    let o = CreateOptions {
        size: 1 << 30,
        cluster_size: CS,
        lazy_refcounts: lazy_bit,
        ..Default::default()
    };
    create("lazy", f.clone(), None, &o).unwrap();
    f.contents()
}

fn dirty(b: &[u8]) -> bool {
    be64(b, 72) & INCOMPAT_DIRTY != 0
}

/// Eight rounds of allocating writes, each followed by a flush: the
/// refcount block writes and the syncs of the flushes, and the model.
fn rounds(img: &Qcow2, c: &Counting) -> (u64, u64, Vec<u8>) {
    let mut model = vec![0u8; 16 << 20];
    let (mut rb_writes, mut syncs) = (0, 0);
    for r in 0..8u64 {
        // New clusters (and in round 0 a new L2 table), partly written.
        let off = r * (2 << 20) + 4096;
        let data = vec![r as u8 + 1; 100_000];
        img.write(off, &data, false).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        c.take();
        img.flush().unwrap();
        let (w, s) = c.take();
        let rbs = refblocks(&c.inner.contents());
        rb_writes += w
            .iter()
            .filter(|(o, _)| rbs.contains(&(o - o % CS)))
            .count() as u64;
        syncs += s;
    }
    (rb_writes, syncs, model)
}

fn contents(img: &Qcow2, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    img.read(0, &mut v).unwrap();
    v
}

#[test]
fn lazy_flushes_write_no_refcount_blocks_and_sync_once() {
    let mut seen = Vec::new();
    // (compatible bit in the image, open option, lazy in effect)
    for (bit, opt, lazy) in [
        (false, None, false),
        (false, Some(true), true),
        (true, None, true),
        (true, Some(false), false),
    ] {
        let c = Arc::new(Counting::new(image(bit)));
        let o = OpenOptions {
            lazy_refcounts: opt,
            ..Default::default()
        };
        let img = Qcow2::open("lazy", c.clone(), None, None, &o).unwrap();
        let (rb_writes, syncs, model) = rounds(&img, &c);
        let what = format!("bit {bit} option {opt:?}");
        if lazy {
            assert_eq!(rb_writes, 0, "{what}: refcount blocks written by flushes");
            // The first flush also writes the dirty bit (and syncs) before
            // the L2 tables: the allocating write no longer does.
            assert!(syncs <= 8 + 2, "{what}: {syncs} syncs for 8 flushes");
        } else {
            assert!(rb_writes >= 8, "{what}: {rb_writes} refcount block writes");
            assert!(syncs >= 16, "{what}: {syncs} syncs for 8 flushes");
        }
        seen.push((lazy, rb_writes, syncs));
        let disk = c.inner.contents();
        assert_eq!(dirty(&disk), lazy, "{what}: dirty bit while open");

        // A crash now: what is on disk.
        let crashed = Arc::new(MemStorage::new(disk, 1 << 32));
        let ro = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        let r = Qcow2::open("lazy", crashed.clone(), None, None, &ro)
            .unwrap()
            .check(Repair::None)
            .unwrap();
        if lazy {
            assert!(r.corruptions > 0, "{what}: refcounts lag behind: {r:?}");
        } else {
            assert_eq!(r.corruptions, 0, "{what}: {r:?}");
        }
        // The next read-write open repairs a dirty image.
        let re = Qcow2::open("lazy", crashed.clone(), None, None, &OpenOptions::default()).unwrap();
        assert_eq!(contents(&re, model.len()), model, "{what}");
        re.close().unwrap();
        drop(re);
        let r = Qcow2::open("lazy", crashed.clone(), None, None, &ro)
            .unwrap()
            .check(Repair::None)
            .unwrap();
        assert_eq!(
            (r.corruptions, r.leaks),
            (0, 0),
            "{what}: after repair: {r:?}"
        );
        assert!(!dirty(&crashed.contents()));

        // A clean close: exact refcounts, no dirty bit; the compatible bit
        // is the image's own (the option holds for one open).
        img.close().unwrap();
        drop(img);
        let disk = c.inner.contents();
        assert!(!dirty(&disk), "{what}");
        let h = preview(&*c, "lazy").unwrap().header;
        assert_eq!(h.compatible & 1 != 0, bit, "{what}");
        let r = Qcow2::open("lazy", c.clone(), None, None, &ro)
            .unwrap()
            .check(Repair::None)
            .unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{what}: {r:?}");
    }
    // Fewer syncs and refcount block writes than the ordered flushes.
    assert!(seen[1].2 < seen[0].2 && seen[2].2 < seen[3].2, "{seen:?}");
}

#[test]
fn lazy_refcounts_need_version_3() {
    let f = Arc::new(MemStorage::new(Vec::new(), 1 << 30));
    let o = CreateOptions {
        size: 1 << 20,
        version: 2,
        ..Default::default()
    };
    create("v2", f.clone(), None, &o).unwrap();
    let oo = OpenOptions {
        lazy_refcounts: Some(true),
        ..Default::default()
    };
    let e = Qcow2::open("v2", f, None, None, &oo).err().unwrap();
    assert!(
        e.to_string().starts_with("v2: Lazy refcounts require"),
        "{e}"
    );
}
