//! Runtime corruption through the qcow2 driver, with QEMU's tools as
//! oracles: an image made by `qemu-img`/`qemu-io` gets a hostile L2 entry
//! (COPIED, pointing at another piece of metadata). Writing there through
//! the driver (asynchronously and synchronously) must fail with one line
//! naming the file, leave the corrupt bit in the header on disk (so
//! `qemu-img info` says `corrupt: true`) and make a read-write reopen fail,
//! while read-only opens still read. The `overlap-check` option chooses
//! what is checked, as in QEMU.

mod common;

use block::driver::IoRequest;
use block::graph::BlockGraph;
use block::iov::IoVecs;
use common::TempDir;
use std::io::{IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::mpsc;

const CS: u64 = 65536;

fn run(cmd: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let (c, o) = run(cmd, args);
    assert_eq!(c, 0, "{cmd} {args:?}: {o}");
    o
}

fn be64(f: &std::fs::File, off: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).unwrap();
    u64::from_be_bytes(b)
}

/// Metadata of an image: (L1 table, L2 table of guest cluster 0, first
/// refcount block).
fn layout(path: &str) -> (u64, u64, u64) {
    let f = std::fs::File::open(path).unwrap();
    let mask = 0x00ff_ffff_ffff_fe00;
    let l1 = be64(&f, 40);
    let rt = be64(&f, 48);
    (l1, be64(&f, l1) & mask, be64(&f, rt) & mask)
}

/// A 64 MiB image with data in guest clusters 0..4, whose L2 entry for
/// guest cluster 1 points (COPIED) at `pick(layout)`.
fn hostile(t: &TempDir, name: &str, pick: fn((u64, u64, u64)) -> u64) -> String {
    let p = t.path(name);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &p, "64M"]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write -P 7 0 256k", &p]);
    let lay = layout(&p);
    let target = pick(lay);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&(target | 1 << 63).to_be_bytes(), lay.1 + 8)
        .unwrap();
    p
}

fn corrupt_bit(path: &str) -> bool {
    let f = std::fs::File::open(path).unwrap();
    be64(&f, 72) & 2 != 0
}

fn write_async(node: &std::sync::Arc<block::node::Node>, off: u64, len: usize) -> String {
    let (tx, rx) = mpsc::channel();
    node.submit(
        IoRequest::write(off, IoVecs::from_vec(vec![0xab; len]), false),
        Box::new(move |_r, res| tx.send(res).unwrap()),
    );
    match rx.recv().unwrap() {
        Ok(()) => String::new(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_write_onto_metadata_marks_the_image_corrupt() {
    let t = TempDir::new("q2corrupt");
    let p = hostile(&t, "l1.qcow2", |(l1, _, _)| l1);
    let before = std::fs::read(&p).unwrap();
    {
        let g = BlockGraph::new();
        let node = g.open_image(&p, Some("qcow2"), false, &[]).unwrap();
        // Asynchronously (the in-place path of the driver) ...
        let e = write_async(&node, CS + 4096, 4096);
        assert!(
            e.contains(&p) && e.contains("active L1 table") && e.contains("marked corrupt"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        // ... and from then on every write fails, synchronously too.
        let e = node
            .write_vectored(32 << 20, &[IoSlice::new(&[1u8; 512])], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&p) && e.contains("corrupt"), "{e}");
        assert!(!write_async(&node, 0, 512).is_empty());
        // Reads go on.
        let mut b = vec![0u8; 4096];
        node.read_vectored(0, &mut [IoSliceMut::new(&mut b)])
            .unwrap();
        assert_eq!(b, vec![7u8; 4096]);
    }
    assert!(corrupt_bit(&p), "the corrupt bit is on disk");
    let after = std::fs::read(&p).unwrap();
    // Nothing but the incompatible features field changed.
    assert_eq!(before[..72], after[..72]);
    assert_eq!(before[80..], after[80..]);
    let info = ok("qemu-img", &["info", &p]);
    assert!(info.contains("corrupt: true"), "{info}");
    // A read-write open is refused, naming the file; read-only works.
    let g = BlockGraph::new();
    let Err(e) = g.open_image(&p, Some("qcow2"), false, &[]) else {
        panic!("a read-write open of a corrupt image is refused");
    };
    let e = e.to_string();
    assert!(e.contains(&p) && e.contains("corrupt"), "{e}");
    let node = g.open_image(&p, Some("qcow2"), true, &[]).unwrap();
    let mut b = vec![0u8; 512];
    node.read_vectored(CS * 2, &mut [IoSliceMut::new(&mut b)])
        .unwrap();
    assert_eq!(b, vec![7u8; 512]);
    // QEMU agrees that the image is broken (the entry points at the L1
    // table), and refuses to write it as well.
    let (c, _) = run("qemu-img", &["check", &p]);
    assert_eq!(c, 2);
    let (c, o) = run("qemu-io", &["-f", "qcow2", "-c", "write 0 512", &p]);
    assert!(c != 0 || o.contains("failed"), "{o}");
}

#[test]
fn overlap_check_option_chooses_what_is_checked() {
    let t = TempDir::new("q2overlap");
    let rb = |(_, _, rb): (u64, u64, u64)| rb;
    for (opts, refused) in [
        (vec![], true),
        (vec![("overlap-check", "cached")], true),
        (vec![("overlap-check", "all")], true),
        (vec![("overlap-check", "constant")], false),
        (vec![("overlap-check", "none")], false),
        (vec![("overlap-check.template", "constant")], false),
        (
            vec![
                ("overlap-check.template", "constant"),
                ("overlap-check.refcount-block", "on"),
            ],
            true,
        ),
        (vec![("overlap-check.refcount-block", "off")], false),
    ] {
        let p = hostile(&t, "rb.qcow2", rb);
        let g = BlockGraph::new();
        let node = g.open_image(&p, Some("qcow2"), false, &opts).unwrap();
        let e = write_async(&node, CS + 512, 512);
        assert_eq!(!e.is_empty(), refused, "{opts:?}: {e}");
        if refused {
            assert!(e.contains("a refcount block"), "{opts:?}: {e}");
        }
        drop(node);
        drop(g);
        assert_eq!(corrupt_bit(&p), refused, "{opts:?}");
        std::fs::remove_file(&p).unwrap();
    }
    // Bad values are refused at open, naming the option.
    let p = hostile(&t, "bad.qcow2", rb);
    let g = BlockGraph::new();
    for bad in [
        ("overlap-check", "sometimes"),
        ("overlap-check.template", "most"),
        ("overlap-check.active-l3", "on"),
        ("overlap-check.active-l2", "maybe"),
    ] {
        let e = g
            .open_image(&p, Some("qcow2"), false, &[bad])
            .err()
            .unwrap_or_else(|| panic!("{bad:?} accepted"))
            .to_string();
        assert!(e.contains("overlap-check"), "{bad:?}: {e}");
    }
}
