//! Overlap checks and runtime corruption on in-memory images: an L2 entry
//! is pointed (COPIED, so a write would go there in place) at each kind of
//! metadata in turn. With the default `cached` template every such write
//! is refused, the image is marked corrupt on disk, later writes are
//! refused and a read-write reopen is refused; `constant` catches only
//! what the header locates and `none` nothing. `check -r all` (an open
//! that allows a corrupt image, then a repairing check) makes the image
//! consistent again and clears the mark.

use formats::error::FormatError;
use formats::qcow2::check::Repair;
use formats::qcow2::create::{create, CreateOptions};
use formats::qcow2::header::INCOMPAT_CORRUPT;
use formats::qcow2::{overlap, preview, OpenOptions, Qcow2, OFLAG_COPIED};
use formats::storage::{MemStorage, Storage};
use std::sync::Arc;

const CS: u64 = 4096;
const NAME: &str = "ol.qcow2";

fn be64(b: &[u8], o: u64) -> u64 {
    u64::from_be_bytes(b[o as usize..o as usize + 8].try_into().unwrap())
}

/// An image with data in guest clusters 0..4 and at 4 MiB (a second L2
/// table), and optionally one snapshot; closed cleanly.
fn base(snapshot: bool) -> Vec<u8> {
    let f = Arc::new(MemStorage::new(Vec::new(), 1 << 30));
    let o = CreateOptions {
        size: 8 << 20,
        cluster_size: CS,
        ..Default::default()
    };
    create(NAME, f.clone(), None, &o).unwrap();
    let img = Qcow2::open(NAME, f.clone(), None, None, &OpenOptions::default()).unwrap();
    img.write(0, &[0x11; 4 * CS as usize], false).unwrap();
    img.write(4 << 20, &[0x22; CS as usize], false).unwrap();
    if snapshot {
        img.snapshot_create("s1", (0, 0)).unwrap();
        // Guest cluster 0 gets its own L2 table and data cluster again.
        img.write(0, &[0x33; 4 * CS as usize], false).unwrap();
    }
    img.close().unwrap();
    drop(img);
    f.contents()
}

/// Where things are in `img`: (active L1, L2 table of guest cluster 0,
/// L2 table of 4 MiB, first refcount block, refcount table, snapshot
/// table, first snapshot's L1 table).
struct Layout {
    l1: u64,
    l2a: u64,
    l2b: u64,
    rb: u64,
    rt: u64,
    st: u64,
    sl1: u64,
}

fn layout(img: &[u8]) -> Layout {
    let l1 = be64(img, 40);
    let rt = be64(img, 48);
    let st = be64(img, 64);
    let mask = 0x00ff_ffff_ffff_fe00;
    let sl1 = if be64(img, 60) >> 32 > 0 {
        be64(img, st)
    } else {
        0
    };
    Layout {
        l1,
        l2a: be64(img, l1) & mask,
        l2b: be64(img, l1 + 8 * 2) & mask,
        rb: be64(img, rt) & mask,
        rt,
        st,
        sl1,
    }
}

/// Point the L2 entry of guest cluster 1 at `target` (COPIED).
fn aim(img: &mut [u8], target: u64) {
    let l = layout(img);
    let at = (l.l2a + 8) as usize;
    img[at..at + 8].copy_from_slice(&(target | OFLAG_COPIED).to_be_bytes());
}

fn open(f: &Arc<MemStorage>, o: &OpenOptions) -> Result<Qcow2, FormatError> {
    Qcow2::open(NAME, f.clone() as Arc<dyn Storage>, None, None, o)
}

fn with_mask(mask: u32) -> OpenOptions {
    OpenOptions {
        overlap_check: mask,
        ..Default::default()
    }
}

fn corrupt_bit(f: &MemStorage) -> bool {
    let h = preview(f, NAME).unwrap().header;
    h.incompatible & INCOMPAT_CORRUPT != 0
}

#[test]
fn writes_onto_metadata_are_refused_and_mark_the_image() {
    let plain = base(false);
    let snap = base(true);
    let lp = layout(&plain);
    let ls = layout(&snap);
    // (image, target, kind caught by `cached`, also caught by `constant`)
    let cases: Vec<(&Vec<u8>, u64, &str, bool)> = vec![
        (&plain, lp.l1, "the active L1 table", true),
        (&plain, lp.rt, "the refcount table", true),
        (&plain, lp.rb, "a refcount block", false),
        (&plain, lp.l2b, "an active L2 table", false),
        (&plain, lp.l2a, "an active L2 table", false),
        (&snap, ls.st, "the snapshot table", true),
        (&snap, ls.sl1, "a snapshot's L1 table", false),
    ];
    for (base, target, kind, constant) in cases {
        assert!(target >= CS && target % CS == 0, "{kind}: {target:#x}");
        let mut d = base.clone();
        aim(&mut d, target);

        // cached (the default): refused, marked, and refused from then on.
        let f = Arc::new(MemStorage::new(d.clone(), 1 << 30));
        let img = open(&f, &OpenOptions::default()).unwrap();
        let e = img.write(CS + 512, &[0xee; 512], false).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, FormatError::Corrupt(_)), "{kind}: {e:?}");
        assert!(msg.starts_with(NAME) && msg.contains(kind), "{kind}: {msg}");
        assert!(
            msg.contains("marked corrupt") && !msg.contains('\n'),
            "{msg}"
        );
        assert_eq!(e.errno(), 5);
        assert!(corrupt_bit(&f), "{kind}: the corrupt bit is on disk");
        assert!(img.is_corrupt());
        // Nothing was written there.
        let now = f.contents();
        assert_eq!(
            now[target as usize..(target + CS) as usize],
            d[target as usize..(target + CS) as usize],
            "{kind}"
        );
        // Reads go on; writes anywhere, flushes and snapshots are refused.
        let mut b = vec![0u8; 4096];
        img.read(0, &mut b).unwrap();
        let e = img.write(6 << 20, &[1; 512], false).unwrap_err();
        assert!(e.to_string().contains("marked corrupt"), "{e}");
        assert!(img.write_zeroes(0, CS, true).is_err());
        assert!(img.flush().is_err());
        assert!(img.snapshot_create("x", (0, 0)).is_err());
        img.close().unwrap();
        drop(img);
        let e = open(&f, &OpenOptions::default()).err().unwrap();
        assert!(matches!(e, FormatError::ReadOnly(_)), "{e:?}");
        assert!(e.to_string().contains("corrupt"), "{e}");
        let ro = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        assert!(open(&f, &ro).is_ok());

        // The repair (what `strata-img check -r all` does) clears it.
        let rep = OpenOptions {
            allow_corrupt: true,
            ..Default::default()
        };
        let img = open(&f, &rep).unwrap();
        let r = img.check(Repair::All).unwrap();
        assert!(r.corruptions_fixed > 0, "{kind}: {r:?}");
        assert_eq!((r.corruptions_after(), r.check_errors), (0, 0), "{r:?}");
        img.close().unwrap();
        drop(img);
        assert!(!corrupt_bit(&f), "{kind}: repaired");
        // Writable again, and consistent. (A write to guest cluster 1 would
        // copy it away from the metadata, but could leave a COPIED flag
        // unset where the refcount drops back to one, which check reports;
        // QEMU does the same, so that is not tested here.)
        let img = open(&f, &OpenOptions::default()).unwrap();
        img.write(6 << 20, &[0xee; 512], false).unwrap();
        img.close().unwrap();
        drop(img);
        let img = open(&f, &ro).unwrap();
        let r = img.check(Repair::None).unwrap();
        assert_eq!(
            (r.corruptions_after(), r.leaks_after()),
            (0, 0),
            "{kind}: {r:?}"
        );
        let mut b = vec![0u8; 512];
        img.read(6 << 20, &mut b).unwrap();
        assert_eq!(b, vec![0xee; 512]);
        drop(img);

        // constant: only what the header locates.
        let f = Arc::new(MemStorage::new(d.clone(), 1 << 30));
        let img = open(&f, &with_mask(overlap::CONSTANT)).unwrap();
        let r = img.write(CS + 512, &[0xee; 512], false);
        assert_eq!(r.is_err(), constant, "{kind} with constant: {r:?}");
        assert_eq!(corrupt_bit(&f), constant, "{kind}");
        drop(img);

        // none: nothing is checked (the data lands on the metadata).
        let f = Arc::new(MemStorage::new(d.clone(), 1 << 30));
        let img = open(&f, &with_mask(0)).unwrap();
        img.write(CS + 512, &[0xee; 512], false).unwrap();
        assert!(!corrupt_bit(&f));
        std::mem::forget(img); // its flush might trip over what it broke
    }
}

#[test]
fn per_kind_switches_change_the_template() {
    let mut d = base(false);
    let l = layout(&d);
    aim(&mut d, l.rb);
    // cached without refcount blocks: the write goes through.
    let f = Arc::new(MemStorage::new(d.clone(), 1 << 30));
    let img = open(&f, &with_mask(overlap::CACHED & !overlap::REFCOUNT_BLOCK)).unwrap();
    img.write(CS, &[1; 512], false).unwrap();
    std::mem::forget(img);
    // constant plus refcount blocks: refused.
    let f = Arc::new(MemStorage::new(d, 1 << 30));
    let img = open(&f, &with_mask(overlap::CONSTANT | overlap::REFCOUNT_BLOCK)).unwrap();
    assert!(img.write(CS, &[1; 512], false).is_err());
    assert!(corrupt_bit(&f));
}

#[test]
fn all_also_checks_snapshot_l2_tables() {
    let mut d = base(true);
    // A snapshot-only L2 table: the one guest cluster 0 had before the
    // snapshot (the active L1 has its own copy now).
    let sl1 = layout(&d).sl1;
    let old_l2 = be64(&d, sl1) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(old_l2, layout(&d).l2a);
    aim(&mut d, old_l2);
    let f = Arc::new(MemStorage::new(d.clone(), 1 << 30));
    let img = open(&f, &with_mask(overlap::CACHED)).unwrap();
    img.write(CS, &[1; 512], false).unwrap();
    std::mem::forget(img);
    let f = Arc::new(MemStorage::new(d, 1 << 30));
    let img = open(&f, &with_mask(overlap::ALL)).unwrap();
    let e = img.write(CS, &[1; 512], false).unwrap_err();
    assert!(e.to_string().contains("a snapshot's L2 table"), "{e}");
    assert!(corrupt_bit(&f));
}

#[test]
fn refcount_underflow_marks_the_image() {
    // Guest cluster 1's data cluster has refcount 0 on disk: dropping its
    // reference would take the refcount below zero.
    let d = base(false);
    let l = layout(&d);
    let e1 = be64(&d, l.l2a + 8) & 0x00ff_ffff_ffff_fe00;
    let mut d = d;
    let at = (l.rb + 2 * (e1 / CS)) as usize;
    d[at..at + 2].copy_from_slice(&0u16.to_be_bytes());
    let f = Arc::new(MemStorage::new(d, 1 << 30));
    let img = open(&f, &OpenOptions::default()).unwrap();
    img.discard(CS, CS).unwrap();
    let e = img.flush().unwrap_err();
    assert!(e.to_string().contains("below zero"), "{e}");
    assert!(corrupt_bit(&f));
    assert!(img.write(0, &[1; 512], false).is_err());
}

#[test]
fn version_2_images_refuse_writes_without_a_corrupt_bit() {
    let f = Arc::new(MemStorage::new(Vec::new(), 1 << 30));
    let o = CreateOptions {
        size: 8 << 20,
        cluster_size: CS,
        version: 2,
        ..Default::default()
    };
    create(NAME, f.clone(), None, &o).unwrap();
    let img = open(&f, &OpenOptions::default()).unwrap();
    img.write(0, &[1; 2 * CS as usize], false).unwrap();
    img.close().unwrap();
    drop(img);
    let mut d = f.contents();
    let lay = layout(&d);
    aim(&mut d, lay.l1);
    let before = d[..72].to_vec();
    let f = Arc::new(MemStorage::new(d, 1 << 30));
    let img = open(&f, &OpenOptions::default()).unwrap();
    let e = img.write(CS, &[1; 512], false).unwrap_err();
    assert!(e.to_string().contains("version 2"), "{e}");
    assert!(img.write(0, &[1; 512], false).is_err());
    assert_eq!(f.contents()[..72], before[..]);
}
