//! The rw path against a hostile or half-finished guest, with the guest's
//! FAT changes made by hand (a tiny FAT driver below): names that try to
//! leave the directory, a symbolic link out of it, garbage over the FAT
//! and root, changes caught half done, and a node without `rw`.

use super::dirent::{attr, ShortEntry, DELETED, ENTRY};
use super::fat::Fat;
use super::names::{lfn_checksum, lfn_entries};
use super::options::Config;
use super::volume::Volume;
use super::{open_volume, try_commit, SECTOR};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A scratch directory holding `exported/` and, beside it, `outside/`.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!(
            "strata-vvfat-unit-{tag}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(p.join("exported")).unwrap();
        std::fs::create_dir_all(p.join("outside")).unwrap();
        std::fs::write(p.join("exported/file.txt"), b"the host's file\n").unwrap();
        std::fs::write(p.join("exported/big.bin"), vec![7u8; 20_000]).unwrap();
        Scratch(p)
    }
    fn exported(&self) -> PathBuf {
        self.0.join("exported")
    }
    fn volume(&self, rw: bool) -> Volume {
        let cfg = Config {
            dir: self.exported().to_str().unwrap().to_string(),
            fat_type: None,
            fat_type_given: 0,
            floppy: false,
            label: None,
            rw,
        };
        open_volume(&cfg, true).unwrap().0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every path below `root` (symbolic links not followed) with its size
/// or kind.
fn listing(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if m.file_type().is_symlink() {
                out.insert(rel, "link".into());
            } else if m.is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &p, out);
            } else {
                out.insert(rel, format!("{} bytes", m.len()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// A minimal FAT16 driver playing the guest.
struct Guest<'a>(&'a mut Volume);

impl Guest<'_> {
    fn fat(&mut self) -> Fat {
        let g = self.0.base.geo;
        let mut b = vec![0u8; g.spf as usize * SECTOR as usize];
        self.0.read_sectors(g.fat_start(), &mut b).unwrap();
        Fat::from_bytes(g.fat_type, b)
    }
    /// Both FAT copies.
    fn set_fat(&mut self, f: &Fat) {
        let g = self.0.base.geo;
        self.0.write(g.fat_start() * SECTOR, f.bytes()).unwrap();
        let second = (g.fat_start() + u64::from(g.spf)) * SECTOR;
        self.0.write(second, f.bytes()).unwrap();
    }
    fn free_cluster(&mut self, f: &Fat, after: u32) -> u32 {
        (after.max(2)..).find(|&c| f.get(c) == 0).unwrap()
    }
    fn write_cluster(&mut self, c: u32, data: &[u8]) {
        let at = self.0.base.geo.cluster_sector(c) * SECTOR;
        self.0.write(at, data).unwrap();
    }
    fn root(&mut self) -> Vec<u8> {
        let g = self.0.base.geo;
        let mut b = vec![0u8; g.root_sectors() as usize * SECTOR as usize];
        self.0.read_sectors(g.root_start(), &mut b).unwrap();
        b
    }
    fn set_root(&mut self, b: &[u8]) {
        let at = self.0.base.geo.root_start() * SECTOR;
        self.0.write(at, b).unwrap();
    }
    /// Appends `entries` to the root directory (at its first free slot).
    fn add_root(&mut self, entries: &[[u8; ENTRY]]) {
        let mut r = self.root();
        let slot = r.chunks(ENTRY).position(|e| e[0] == 0).unwrap();
        for (i, e) in entries.iter().enumerate() {
            r[(slot + i) * ENTRY..(slot + i + 1) * ENTRY].copy_from_slice(e);
        }
        self.set_root(&r);
    }
    /// Marks the root entry with short name `short`, and its long name
    /// entries, deleted.
    fn delete_root(&mut self, short: &[u8; 11]) {
        let mut r = self.root();
        let i = r
            .chunks(ENTRY)
            .position(|e| &e[..11] == short && e[11] != attr::LONG_NAME)
            .unwrap();
        let mut k = i;
        loop {
            r[k * ENTRY] = DELETED;
            if k == 0 || r[(k - 1) * ENTRY + 11] != attr::LONG_NAME {
                break;
            }
            k -= 1;
        }
        self.set_root(&r);
    }
    /// The first cluster of root entry `short`.
    fn first_of(&mut self, short: &[u8; 11]) -> u32 {
        let r = self.root();
        let e = r
            .chunks(ENTRY)
            .find(|e| &e[..11] == short && e[11] != attr::LONG_NAME)
            .unwrap();
        let mut b = [0u8; ENTRY];
        b.copy_from_slice(e);
        ShortEntry::decode(&b, false).first_cluster
    }
}

/// The entries for a file or directory named `long` (short name
/// `short`) at cluster `first` of `size` bytes.
fn entry(long: &str, short: &[u8; 11], dir: bool, first: u32, size: u32) -> Vec<[u8; ENTRY]> {
    let mut v = lfn_entries(long, lfn_checksum(short)).unwrap();
    v.push(
        ShortEntry {
            name: *short,
            attr: if dir { attr::DIRECTORY } else { attr::ARCHIVE },
            first_cluster: first,
            size,
            ..ShortEntry::default()
        }
        .encode(),
    );
    v
}

/// A directory cluster holding `.`, `..` (the root) and `entries`.
fn dir_cluster(own: u32, entries: &[[u8; ENTRY]], cb: usize) -> Vec<u8> {
    let mut b = vec![0u8; cb];
    let dot = |name: &[u8; 11], c| {
        ShortEntry {
            name: *name,
            attr: attr::DIRECTORY,
            first_cluster: c,
            ..ShortEntry::default()
        }
        .encode()
    };
    b[..ENTRY].copy_from_slice(&dot(b".          ", own));
    b[ENTRY..2 * ENTRY].copy_from_slice(&dot(b"..         ", 0));
    for (i, e) in entries.iter().enumerate() {
        b[(i + 2) * ENTRY..(i + 3) * ENTRY].copy_from_slice(e);
    }
    b
}

#[test]
fn hostile_names_never_leave_the_directory() {
    let s = Scratch::new("hostile");
    std::os::unix::fs::symlink("../outside", s.exported().join("escape")).unwrap();
    let mut vol = s.volume(true);
    let cb = vol.base.geo.cluster_bytes() as usize;
    let mut g = Guest(&mut vol);
    let mut fat = g.fat();
    // A directory named like the link left out of the image, with a
    // file in it: on the host the name is the link, so nothing is made.
    let d = g.free_cluster(&fat, 2);
    fat.set(d, 0xffff);
    let x = g.free_cluster(&fat, d + 1);
    fat.set(x, 0xffff);
    let inner = entry("x", b"X          ", false, x, 5);
    g.write_cluster(d, &dir_cluster(d, &inner, cb));
    g.write_cluster(x, b"owned");
    let mut ents = entry("escape", b"ESCAPE     ", true, d, 0);
    // Long names with a slash or dot-dot fall back to their short names,
    // whose bytes FAT forbids become '_'.
    let f1 = g.free_cluster(&fat, x + 1);
    fat.set(f1, 0xffff);
    g.write_cluster(f1, b"one");
    ents.extend(entry("../up", b"..UP    TXT", false, f1, 3));
    ents.extend(entry("..", b"DOTDOT     ", false, 0, 0));
    ents.extend(entry("a/b", b"/ETC       ", false, 0, 0));
    g.add_root(&ents);
    g.set_fat(&fat);
    let rep = try_commit(&mut vol).unwrap();
    assert!(
        rep.errors.iter().any(|e| e.contains("escape")),
        "{:?}",
        rep.errors
    );
    assert!(std::fs::read_dir(s.0.join("outside"))
        .unwrap()
        .next()
        .is_none());
    let l = listing(&s.0);
    let want: BTreeMap<String, String> = [
        ("exported", "dir"),
        ("exported/file.txt", "16 bytes"),
        ("exported/big.bin", "20000 bytes"),
        ("exported/escape", "link"),
        ("exported/__UP.TXT", "3 bytes"),
        ("exported/DOTDOT", "0 bytes"),
        ("exported/_ETC", "0 bytes"),
        ("outside", "dir"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(l, want);
    // The guest still sees its directory and file (kept in the overlay).
    let mut buf = vec![0u8; 5];
    let at = vol.base.geo.cluster_sector(x) * SECTOR;
    vol.read(at, &mut buf).unwrap();
    assert_eq!(&buf, b"owned");
}

#[test]
fn garbage_over_the_fat_and_root_changes_nothing() {
    let s = Scratch::new("garbage");
    let before = listing(&s.0);
    let mut vol = s.volume(true);
    let g = vol.base.geo;
    let mut x = 0x1234_5678u32;
    let mut junk = vec![0u8; ((g.data_start() - g.fat_start()) * SECTOR) as usize];
    for b in junk.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    vol.write(g.fat_start() * SECTOR, &junk).unwrap();
    assert!(try_commit(&mut vol).is_err());
    // The FAT alone valid again, the root still garbage.
    let fat = Fat::new(&g);
    vol.write(g.fat_start() * SECTOR, fat.bytes()).unwrap();
    let _ = try_commit(&mut vol);
    assert_eq!(listing(&s.0), before);
}

#[test]
fn half_done_changes_wait_for_the_rest() {
    let s = Scratch::new("halfdone");
    let mut vol = s.volume(true);
    let cb = vol.base.geo.cluster_bytes() as usize;
    let mut g = Guest(&mut vol);
    // A new 3-cluster file: data and entry first, the chain last.
    let mut fat = g.fat();
    let c = g.free_cluster(&fat, 2);
    let data: Vec<u8> = (0..2 * cb + 100).map(|i| (i % 251) as u8).collect();
    for k in 0..3 {
        let end = ((k + 1) * cb).min(data.len());
        g.write_cluster(c + k as u32, &data[k * cb..end]);
    }
    g.add_root(&entry(
        "new.bin",
        b"NEW     BIN",
        false,
        c,
        data.len() as u32,
    ));
    assert!(try_commit(g.0).is_err(), "a file without its chain");
    assert!(!s.exported().join("new.bin").exists());
    fat.link_run(c, 2);
    g.set_fat(&fat);
    assert!(try_commit(g.0).is_err(), "a chain shorter than the size");
    fat.link_run(c, 3);
    g.set_fat(&fat);
    let rep = try_commit(g.0).unwrap();
    assert!(rep.errors.is_empty(), "{:?}", rep.errors);
    assert_eq!(std::fs::read(s.exported().join("new.bin")).unwrap(), data);

    // A rename done as "add the new entry, then delete the old one":
    // while both exist they share the chain, and nothing happens.
    let first = g.first_of(b"FILE    TXT");
    let size = 16;
    g.add_root(&entry("renamed.txt", b"RENAMED TXT", false, first, size));
    assert!(try_commit(g.0).is_err(), "two entries, one chain");
    assert!(s.exported().join("file.txt").exists());
    g.delete_root(b"FILE    TXT");
    try_commit(g.0).unwrap();
    assert!(!s.exported().join("file.txt").exists());
    assert_eq!(
        std::fs::read(s.exported().join("renamed.txt")).unwrap(),
        b"the host's file\n"
    );
    // ... and the other way round: with the entry gone first, the chain
    // is in use by no file, and the file is not deleted.
    let first = g.first_of(b"BIG     BIN");
    g.delete_root(b"BIG     BIN");
    assert!(try_commit(g.0).is_err(), "a chain without an entry");
    assert!(s.exported().join("big.bin").exists());
    g.add_root(&entry("moved.bin", b"MOVED   BIN", false, first, 20_000));
    try_commit(g.0).unwrap();
    assert!(!s.exported().join("big.bin").exists());
    assert_eq!(
        std::fs::read(s.exported().join("moved.bin")).unwrap(),
        vec![7u8; 20_000]
    );
}

#[test]
fn without_rw_writes_stay_in_the_node() {
    let s = Scratch::new("norw");
    let before = listing(&s.0);
    let graph = crate::graph::BlockGraph::new();
    let json = serde_json::json!({
        "driver": "vvfat", "node-name": "v", "dir": s.exported().to_str().unwrap()
    });
    let n = graph.blockdev_add_str(&json.to_string()).unwrap();
    // The MBR overwritten, and a file's data.
    let mut vol = s.volume(false);
    let first = Guest(&mut vol).first_of(b"FILE    TXT");
    let at = vol.base.geo.cluster_sector(first) * SECTOR;
    let junk = vec![0xa5u8; 4096];
    n.write_vectored(0, &[std::io::IoSlice::new(&junk)], false)
        .unwrap();
    n.write_vectored(at + 3, &[std::io::IoSlice::new(b"changed")], false)
        .unwrap();
    n.flush().unwrap();
    let mut back = vec![0u8; 12];
    n.read_vectored(at, &mut [std::io::IoSliceMut::new(&mut back)])
        .unwrap();
    assert_eq!(&back, b"thechanged f");
    graph.close_all();
    assert_eq!(listing(&s.0), before);
    assert_eq!(
        std::fs::read(s.exported().join("file.txt")).unwrap(),
        b"the host's file\n"
    );
}

#[test]
fn writes_to_host_file_data_go_straight_through() {
    let s = Scratch::new("through");
    let mut vol = s.volume(true);
    let cb = vol.base.geo.cluster_bytes();
    let mut g = Guest(&mut vol);
    let first = g.first_of(b"FILE    TXT");
    let big = g.first_of(b"BIG     BIN");
    // Inside the size (the first sector of file.txt's 16 bytes is not):
    // big.bin's second cluster changes on the host at once.
    let at = g.0.base.geo.cluster_sector(big + 1) * SECTOR;
    g.0.write(at, &[0x33u8; 1024]).unwrap();
    let host = std::fs::read(s.exported().join("big.bin")).unwrap();
    assert_eq!(&host[8192..9216], &[0x33u8; 1024]);
    assert_eq!(g.0.take_written(), [s.exported().join("big.bin")]);
    // A sector reaching past the end of a file stays in the overlay.
    let at = g.0.base.geo.cluster_sector(first) * SECTOR;
    g.0.write(at, b"THE").unwrap();
    assert_eq!(
        std::fs::read(s.exported().join("file.txt")).unwrap(),
        b"the host's file\n"
    );
    let mut back = [0u8; 16];
    g.0.read(at, &mut back).unwrap();
    assert_eq!(&back, b"THE host's file\n");

    // big.bin truncated to one cluster, its third cluster given to a new
    // file whose data the guest writes first (through, into big.bin, as
    // the image still says): the new file gets it, big.bin loses it.
    let third = big + 2;
    let at = g.0.base.geo.cluster_sector(third) * SECTOR;
    g.0.write(at, &[0x44u8; 512]).unwrap();
    let mut fat = g.fat();
    fat.set(big, 0xffff);
    fat.set(big + 1, 0);
    let mut r = g.root();
    let i = r
        .chunks(ENTRY)
        .position(|e| &e[..11] == b"BIG     BIN")
        .unwrap();
    r[i * ENTRY + 28..i * ENTRY + 32].copy_from_slice(&(cb as u32).to_le_bytes());
    g.set_root(&r);
    g.add_root(&entry("n.bin", b"N       BIN", false, third, 512));
    g.set_fat(&fat);
    let rep = try_commit(g.0).unwrap();
    assert!(rep.errors.is_empty(), "{:?}", rep.errors);
    assert_eq!(
        std::fs::read(s.exported().join("n.bin")).unwrap(),
        vec![0x44u8; 512]
    );
    let host = std::fs::read(s.exported().join("big.bin")).unwrap();
    assert_eq!(host.len(), cb as usize);
    assert_eq!(&host[..8192], &[7u8; 8192][..]);
    assert_eq!(
        std::fs::read(s.exported().join("file.txt")).unwrap(),
        b"THE host's file\n"
    );
}
