//! The vvfat protocol through strata-img: a host directory converted to a
//! raw FAT image (`strata-img convert fat:DIR -O raw a.img`) is a clean
//! file system for dosfstools' `fsck.vfat` and holds every file, byte for
//! byte, for mtools; qemu-img's own vvfat (built into qemu-img) is the
//! oracle: its image lists the same files with the same contents. The
//! byte layouts differ only where documented in block/src/vvfat: Strata
//! puts a boot stub (`int 18h`) where QEMU leaves zeroes, zeroes the end
//! of a file's last cluster where QEMU leaves bytes of the previous file,
//! and sorts names where QEMU takes readdir's order; its FAT32 and FAT16
//! floppy are valid (QEMU's are not, so there is no oracle for them).
//! Then the errors: too much data or too many root entries for the FAT,
//! bad options, each one line naming the directory.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use support::img::{ok, q_ok, s_ok, strata, Dir};

/// The partition's byte offset on a hard disk image (sector 63).
const PART: u64 = 63 * 512;

/// Runs an mtools command on `img` (at byte `offset`).
fn mtool(cmd: &str, img: &str, offset: u64, args: &[&str]) -> Output {
    let spec = if offset > 0 {
        format!("{img}@@{offset}")
    } else {
        img.to_string()
    };
    Command::new(cmd)
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(&spec)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (make deps installs mtools)"))
}

/// A file's contents in brief (so that a failed comparison reads well):
/// its length and an FNV-1a hash; "dir" for a directory.
fn brief(data: Option<&[u8]>) -> String {
    match data {
        None => "dir".into(),
        Some(d) => {
            let h = d.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            format!("{} bytes, {h:016x}", d.len())
        }
    }
}

/// Every file and directory of the FAT image at `offset`, by path, with
/// the file contents in brief, as mtools reads them.
fn fat_tree(img: &str, offset: u64) -> BTreeMap<String, String> {
    let o = mtool("mdir", img, offset, &["-/", "-b", "::"]);
    let list = ok(&o, &format!("mdir {img}"));
    let mut out = BTreeMap::new();
    for line in list.lines() {
        let Some(p) = line.strip_prefix("::/") else {
            continue;
        };
        if let Some(d) = p.strip_suffix('/') {
            out.insert(d.to_string(), brief(None));
        } else {
            let o = mtool("mcopy", img, offset, &["-n", &format!("::/{p}"), "-"]);
            out.insert(p.to_string(), brief(Some(&o.stdout)));
            ok(&o, &format!("mcopy {p} from {img}"));
        }
    }
    out
}

/// The same for a host directory.
fn host_tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            if p.is_dir() {
                out.insert(rel, brief(None));
                walk(root, &p, out);
            } else {
                out.insert(rel, brief(Some(&std::fs::read(&p).unwrap())));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Deterministic bytes.
fn pattern(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A directory tree with what FAT makes hard: nested directories, long
/// and clashing names, an empty file, a multi-cluster file, a file of
/// exactly one 8 KiB cluster, non-ASCII names.
fn make_tree(root: &Path, big: usize) {
    let w = |rel: &str, data: &[u8]| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    };
    w("hello.txt", b"hello from the host\n");
    w("A long file name with spaces.txt", b"long\n");
    w("longfilename1.txt", b"one\n");
    w("longfilename2.txt", b"two\n");
    w("empty", b"");
    w("README", b"upper case fits 8.3\n");
    w("sub/big.bin", &pattern(big, 1));
    w("sub/one-cluster.bin", &pattern(8192, 2));
    w("sub/deeper/still deeper/z.dat", &pattern(3, 3));
    w("Ünïcödé näme.txt", b"utf-16 in the long name\n");
    std::fs::create_dir_all(root.join("empty dir")).unwrap();
}

/// `src` (a hard disk image) without the MBR and gap: the bare FAT
/// volume fsck.vfat checks, written sparse.
fn partition(src: &str, dst: &str) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut i = std::fs::File::open(src).unwrap();
    let len = i.metadata().unwrap().len();
    let mut o = std::fs::File::create(dst).unwrap();
    i.seek(SeekFrom::Start(PART)).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = i.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            o.seek(SeekFrom::Start(at)).unwrap();
            o.write_all(&buf[..n]).unwrap();
        }
        at += n as u64;
    }
    o.set_len(len - PART).unwrap();
}

/// fsck.vfat -n on a bare volume: clean, and of FAT type `ty`.
fn fsck_clean(vol: &str, ty: &str) {
    let o = Command::new("fsck.vfat")
        .args(["-n", "-v", vol])
        .output()
        .expect("fsck.vfat (make deps installs dosfstools)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "fsck.vfat -n {vol}:\n{text}");
    assert!(
        text.contains(&format!("{ty} bit entries")),
        "fsck.vfat saw:\n{text}"
    );
}

fn one_line_error(o: &Output, what: &str) -> String {
    assert!(!o.status.success(), "{what} succeeded");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "{what}:\n{err}");
    err
}

#[test]
fn hard_disks_hold_every_file_as_qemu_img_does() {
    let d = Dir::new("vvfat", "disk");
    let root = d.0.join("tree");
    make_tree(&root, 100_000);
    let want = host_tree(&root);
    let dir = root.to_str().unwrap();
    for (flags, bits, oracle) in [("", "16", true), ("12:", "12", true), ("32:", "32", false)] {
        let name = format!("fat:{flags}{dir}");
        let a = d.p("a.img");
        // qemu-img's argument order: options after the source.
        s_ok(&["convert", &name, "-O", "raw", &a]);
        let len = std::fs::metadata(&a).unwrap().len();
        assert_eq!(
            len,
            if bits == "12" {
                33_030_144
            } else {
                528_482_304
            },
            "{name}"
        );
        let vol = d.p("a.part");
        partition(&a, &vol);
        fsck_clean(&vol, bits);
        std::fs::remove_file(&vol).unwrap();
        assert_eq!(fat_tree(&a, PART), want, "{name}: what mtools reads");
        if oracle {
            let q = d.p("q.img");
            q_ok(&["convert", "-f", "vvfat", &name, "-O", "raw", &q]);
            assert_eq!(std::fs::metadata(&q).unwrap().len(), len);
            assert_eq!(fat_tree(&q, PART), want, "{name}: qemu-img's image");
            // Same MBR partition entry and BPB as QEMU's.
            let (sa, sq) = (std::fs::read(&a).unwrap(), std::fs::read(&q).unwrap());
            assert_eq!(sa[0x1b8..0x200], sq[0x1b8..0x200], "{name}: MBR");
            let b = PART as usize;
            assert_eq!(sa[b + 3..b + 0x3e], sq[b + 3..b + 0x3e], "{name}: BPB");
            std::fs::remove_file(&q).unwrap();
        }
        std::fs::remove_file(&a).unwrap();
    }
}

#[test]
fn floppies_hold_every_file() {
    let d = Dir::new("vvfat", "floppy");
    let root = d.0.join("tree");
    make_tree(&root, 30_000);
    let want = host_tree(&root);
    let dir = root.to_str().unwrap();
    for (flags, bits, size, oracle) in [
        ("floppy:", "12", 2_949_120, true),
        ("floppy:12:", "12", 1_474_560, true),
        ("16:floppy:", "16", 2_949_120, false),
    ] {
        let name = format!("fat:{flags}{dir}");
        let a = d.p("f.img");
        s_ok(&["convert", "-O", "raw", &name, &a]);
        assert_eq!(std::fs::metadata(&a).unwrap().len(), size, "{name}");
        fsck_clean(&a, bits);
        assert_eq!(fat_tree(&a, 0), want, "{name}");
        let img = std::fs::read(&a).unwrap();
        assert_eq!(&img[510..512], &[0x55, 0xaa]);
        assert_eq!(img[21], 0xf0, "{name}: the floppy media byte");
        if oracle {
            let q = d.p("q.img");
            q_ok(&["convert", "-f", "vvfat", &name, "-O", "raw", &q]);
            assert_eq!(fat_tree(&q, 0), want, "{name}: qemu-img's image");
            let sq = std::fs::read(&q).unwrap();
            assert_eq!(img[3..0x3e], sq[3..0x3e], "{name}: BPB");
        }
    }
}

#[test]
fn info_names_the_directory_as_qemu_does() {
    let d = Dir::new("vvfat", "info");
    let root = d.0.join("tree");
    make_tree(&root, 10);
    let dir = root.to_str().unwrap();
    let out = s_ok(&["info", &format!("fat:{dir}")]);
    assert!(
        out.contains("virtual size: 504 MiB (528482304 bytes)"),
        "{out}"
    );
    assert!(out.contains("file format: raw"), "{out}");
    let json = format!(
        "json:{{\"fat-type\": 0, \"dir\": \"{dir}\", \"driver\": \"vvfat\", \"floppy\": false, \"rw\": false}}"
    );
    assert!(out.contains(&json), "{out}");
    let out = s_ok(&[
        "info",
        "--image-opts",
        &format!("driver=vvfat,dir={dir},floppy=on,label=MYDISK"),
    ]);
    assert!(
        out.contains("virtual size: 2.81 MiB (2949120 bytes)"),
        "{out}"
    );
    // The label reaches the boot sector and the root directory.
    let a = d.p("l.img");
    let json = format!(r#"json:{{"driver":"vvfat","dir":"{dir}","floppy":true,"label":"MYDISK"}}"#);
    s_ok(&["convert", &json, "-O", "raw", &a]);
    let o = mtool("mlabel", &a, 0, &["-s", "::"]);
    assert!(ok(&o, "mlabel -s").contains("MYDISK"));
}

#[test]
fn errors_are_one_line_naming_the_directory() {
    let d = Dir::new("vvfat", "errors");
    let root = d.0.join("tree");
    std::fs::create_dir(&root).unwrap();
    let dir = root.to_str().unwrap();
    // 40 MB of (sparse) data cannot fit the 32 MB FAT12 disk or a floppy.
    let f = std::fs::File::create(root.join("big")).unwrap();
    f.set_len(40 << 20).unwrap();
    for flags in ["12:", "floppy:"] {
        let name = format!("fat:{flags}{dir}");
        let o = strata(&["info", &name]);
        let err = one_line_error(&o, &name);
        assert!(
            err.contains(&format!("Directory {dir} does not fit in FAT12")),
            "{err}"
        );
    }
    // 600 names do not fit the root directory's 512 entries.
    std::fs::remove_file(root.join("big")).unwrap();
    for i in 0..600 {
        std::fs::write(root.join(format!("f{i}")), b"").unwrap();
    }
    let o = strata(&["info", &format!("fat:{dir}")]);
    let err = one_line_error(&o, "600 root entries");
    assert!(err.contains(dir) && err.contains("root directory"), "{err}");
    // ... but they do in a subdirectory, and FAT32 has no fixed root.
    std::fs::create_dir(d.0.join("outer")).unwrap();
    std::fs::rename(&root, d.0.join("outer/tree")).unwrap();
    s_ok(&["info", &format!("fat:{}", d.p("outer"))]);
    std::fs::rename(d.0.join("outer/tree"), &root).unwrap();
    s_ok(&["info", &format!("fat:32:{dir}")]);

    let missing = d.p("missing");
    let err = one_line_error(&strata(&["info", &format!("fat:{missing}")]), "missing");
    assert!(
        err.contains(&format!("Could not read directory {missing}")),
        "{err}"
    );
    let err = one_line_error(
        &strata(&["info", &format!("fat:bogus:{dir}")]),
        "unknown flag",
    );
    assert!(err.contains("'bogus'"), "{err}");
    for (opts, want) in [
        (
            format!("driver=vvfat,dir={dir},label=123456789012"),
            "longer than 11 bytes",
        ),
        (
            format!("driver=vvfat,dir={dir},fat-type=13"),
            "12, 16 and 32",
        ),
        (
            format!("driver=vvfat,dir={dir},floppy=on,fat-type=32"),
            "cannot be FAT32",
        ),
        ("driver=vvfat".to_string(), "requires a 'dir' option"),
        (
            format!("driver=vvfat,dir={dir},rw=on"),
            "when drive is read-only",
        ),
    ] {
        let err = one_line_error(&strata(&["info", "--image-opts", &opts]), &opts);
        assert!(err.contains(want), "{opts}: {err}");
    }
}

// ---- rw: the guest's changes written back to the directory ----

use block::graph::BlockGraph;
use block::node::Node;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

/// A vvfat node over `dir` opened through the block layer, writable.
fn open_rw(g: &BlockGraph, dir: &str, extra: &str) -> Arc<Node> {
    let json = serde_json::json!({"driver": "vvfat", "node-name": "v", "dir": dir, "rw": true})
        .to_string();
    let json = if extra.is_empty() {
        json
    } else {
        format!("{},{extra}}}", &json[..json.len() - 1])
    };
    g.blockdev_add_str(&json).unwrap()
}

/// What the guest sees on `n`, as a sparse image file at `path`.
fn snapshot(n: &Node, path: &str) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < n.len() {
        let len = (n.len() - at).min(buf.len() as u64) as usize;
        n.read_vectored(at, &mut [IoSliceMut::new(&mut buf[..len])])
            .unwrap();
        if buf[..len].iter().any(|&b| b != 0) {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&buf[..len]).unwrap();
        }
        at += len as u64;
    }
    f.set_len(n.len()).unwrap();
}

/// Writes the sectors where `new` differs from `old` to `n`, in
/// ascending or descending order (a guest writes in any order), one
/// request per run of differing sectors; returns how many sectors.
fn write_differences(n: &Node, old: &str, new: &str, descending: bool) -> usize {
    let (a, b) = (std::fs::read(old).unwrap(), std::fs::read(new).unwrap());
    assert_eq!(a.len(), b.len());
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for s in 0..a.len() / 512 {
        let r = s * 512..s * 512 + 512;
        if a[r.clone()] != b[r] {
            match runs.last_mut() {
                Some((start, len)) if *start + *len == s => *len += 1,
                _ => runs.push((s, 1)),
            }
        }
    }
    if descending {
        runs.reverse();
    }
    let mut count = 0;
    for (s, len) in runs {
        let bytes = &b[s * 512..(s + len) * 512];
        n.write_vectored((s * 512) as u64, &[IoSlice::new(bytes)], false)
            .unwrap();
        count += len;
    }
    count
}

/// Runs mtools commands (each `[tool, args...]`) on the image `img` (its
/// volume at byte `offset`).
fn mtools_edit(img: &str, offset: u64, cmds: &[&[&str]]) {
    for c in cmds {
        let o = mtool(c[0], img, offset, &c[1..]);
        ok(&o, &format!("{c:?}"));
    }
}

#[test]
fn guest_changes_are_written_back() {
    rw_rounds("disk", false, 100_000);
}

/// The same on a 2.88 MB FAT12 floppy (`fat:rw:floppy:`).
#[test]
fn guest_changes_are_written_back_from_a_floppy() {
    rw_rounds("floppy", true, 30_000);
}

/// Two rounds of guest changes on a `fat:rw` node, checked on the host.
fn rw_rounds(tag: &str, floppy: bool, big: usize) {
    let d = Dir::new("vvfat", &format!("rw-{tag}"));
    let root = d.0.join("tree");
    make_tree(&root, big);
    let dir = root.to_str().unwrap();
    let g = BlockGraph::new();
    let (n, part) = if floppy {
        (open_rw(&g, dir, r#""floppy": true"#), 0)
    } else {
        (open_rw(&g, dir, ""), PART)
    };
    let files = d.0.join("files");
    std::fs::create_dir(&files).unwrap();
    let put = |name: &str, data: &[u8]| {
        let p = files.join(name);
        std::fs::write(&p, data).unwrap();
        p.to_str().unwrap().to_string()
    };
    let new_file = put("new", &pattern(50_000, 7));
    let grown = put("grown", &pattern(40_000, 8));
    let shrunk = put("shrunk", &pattern(100, 9));

    // Round 1, written in ascending order: a new file, a deletion, a new
    // directory with a file, a rename, a file grown over several
    // clusters, one truncated, a file moved into another directory.
    let (a, b) = (d.p("a.img"), d.p("b.img"));
    snapshot(&n, &a);
    std::fs::copy(&a, &b).unwrap();
    mtools_edit(
        &b,
        part,
        &[
            &["mcopy", &new_file, "::/new file from the guest.bin"],
            &["mdel", "::/longfilename1.txt"],
            &["mmd", "::/made by guest"],
            &["mcopy", &new_file, "::/made by guest/inner.bin"],
            &["mren", "::/hello.txt", "::/renamed hello.txt"],
            &["mcopy", "-o", &grown, "::/README"],
            &["mcopy", "-o", &shrunk, "::/sub/big.bin"],
            &["mmove", "::/longfilename2.txt", "::/sub/deeper/moved.txt"],
        ],
    );
    let want = fat_tree(&b, part);
    assert!(write_differences(&n, &a, &b, false) > 0);
    n.flush().unwrap();
    assert_eq!(host_tree(&root), want, "after round 1");
    assert_eq!(
        std::fs::read(root.join("made by guest/inner.bin")).unwrap(),
        pattern(50_000, 7)
    );
    assert!(!root.join("longfilename1.txt").exists());
    // The guest still reads what it wrote.
    snapshot(&n, &a);
    assert_eq!(fat_tree(&a, part), want, "the guest's view after round 1");

    // Round 2 on the same node, written in descending order: a
    // directory renamed with what is in it, another deleted with its
    // tree, two names swapped, a file overwritten in place, an empty
    // file made.
    std::fs::copy(&a, &b).unwrap();
    let same_size = put("same", &pattern(8192, 10));
    let empty = put("empty", b"");
    mtools_edit(
        &b,
        part,
        &[
            &["mren", "::/made by guest", "::/renamed dir"],
            &["mdeltree", "::/sub/deeper"],
            &["mren", "::/A long file name with spaces.txt", "::/tmp"],
            &[
                "mren",
                "::/Ünïcödé näme.txt",
                "::/A long file name with spaces.txt",
            ],
            &["mren", "::/tmp", "::/Ünïcödé näme.txt"],
            &["mcopy", "-o", &same_size, "::/sub/one-cluster.bin"],
            &["mcopy", &empty, "::/renamed dir/new empty"],
        ],
    );
    let want = fat_tree(&b, part);
    write_differences(&n, &a, &b, true);
    n.flush().unwrap();
    assert_eq!(host_tree(&root), want, "after round 2");
    assert_eq!(
        std::fs::read(root.join("A long file name with spaces.txt")).unwrap(),
        b"utf-16 in the long name\n"
    );
    assert_eq!(
        std::fs::read(root.join("Ünïcödé näme.txt")).unwrap(),
        b"long\n"
    );

    // Close; the directory reopened as a new image holds the same.
    g.close_all();
    drop(n);
    let c = d.p("c.img");
    let flags = if floppy { "floppy:" } else { "" };
    s_ok(&["convert", &format!("fat:{flags}{dir}"), "-O", "raw", &c]);
    assert_eq!(fat_tree(&c, part), want, "reopened");
    // No staging directory was left behind.
    let left: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".vvfat"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// strata takes every form QEMU users write (under the qtest
/// accelerator: the machine is built, then strata exits): `-hda fat:DIR`
/// (writable, changes kept for the run), `-drive file=fat:rw:DIR,format=raw`,
/// `-fda fat:floppy:DIR`, `-blockdev driver=vvfat,...` with a device; a
/// missing directory is one line naming it.
#[test]
fn strata_takes_every_command_line_form() {
    support::require_bios();
    let d = Dir::new("vvfat", "forms");
    let root = d.0.join("tree");
    make_tree(&root, 1000);
    let dir = root.to_str().unwrap();
    let before = host_tree(&root);
    let run = |extra: &[&str]| {
        let mut args = vec![
            "-machine",
            "pc,accel=qtest",
            "-qtest",
            "stdio",
            "-nodefaults",
        ];
        args.extend_from_slice(extra);
        support::run_strata(&args, std::time::Duration::from_secs(30))
    };
    let probed = "probing guessed raw";
    for args in [
        vec!["-hda".to_string(), format!("fat:{dir}")],
        vec!["-hda".to_string(), format!("fat:rw:{dir}")],
        vec![
            "-drive".to_string(),
            format!("file=fat:rw:{dir},format=raw"),
        ],
        vec![
            "-drive".to_string(),
            format!("file=fat:16:{dir},format=raw,if=virtio"),
        ],
        vec!["-fda".to_string(), format!("fat:floppy:{dir}")],
        vec![
            "-drive".to_string(),
            format!("file=fat:floppy:12:rw:{dir},format=raw,if=floppy"),
        ],
        vec![
            "-blockdev".to_string(),
            format!("driver=vvfat,node-name=v,dir={dir},fat-type=16,floppy=off,label=STRATA,rw=on"),
            "-device".to_string(),
            "ide-hd,drive=v".to_string(),
        ],
    ] {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = run(&a);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        let rest: Vec<&str> = err
            .lines()
            .filter(|l| !l.contains(probed) && !l.starts_with("         "))
            .collect();
        assert!(rest.is_empty(), "{args:?}: {err}");
    }
    // Nothing was written back by merely starting.
    assert_eq!(host_tree(&root), before);
    let missing = d.p("missing");
    let (code, _, err) = run(&["-hda", &format!("fat:{missing}")]);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("Could not read directory {missing}")),
        "{err}"
    );
}

/// Entries carry the host files' modification times (as UTC).
#[test]
fn stamps_are_the_host_files_times() {
    let d = Dir::new("vvfat", "stamps");
    let root = d.0.join("tree");
    make_tree(&root, 10);
    // 2001-02-03 04:05:06 UTC.
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(981_173_106);
    std::fs::File::options()
        .write(true)
        .open(root.join("hello.txt"))
        .unwrap()
        .set_modified(t)
        .unwrap();
    let a = d.p("t.img");
    s_ok(&[
        "convert",
        &format!("fat:{}", root.display()),
        "-O",
        "raw",
        &a,
    ]);
    let o = mtool("mdir", &a, PART, &["::/hello.txt"]);
    let out = ok(&o, "mdir hello.txt");
    assert!(out.contains("2001-02-03") && out.contains(" 4:05"), "{out}");
}
