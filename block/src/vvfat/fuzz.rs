//! The harness behind the `vvfat_rw` fuzz target: what parses and acts
//! on guest-written data (the FAT and directory parser, the write-back
//! to the host) run on hostile writes. Each input gets a fresh scratch
//! directory in the temporary directory: `exported/` (the vvfat
//! directory: two files, one in a subdirectory, an empty one, and a
//! symbolic link to `outside/`) and `outside/`, which must stay empty;
//! nothing but those two may appear beside them. The scratch directory
//! is removed afterwards, so the harness writes nowhere else.
//!
//! Input: the first byte picks the layout (FAT12, FAT16, FAT32 disks, the
//! FAT12 floppy); then operations, at most [`MAX_OPS`]:
//! * `tag & 7 == 7`: write back now (as a flush does), at most
//!   [`MAX_COMMITS`] times;
//! * otherwise a write: `region` (1 byte: the FATs, the root directory,
//!   the first 64 data clusters, anywhere), `sector` (u16 LE, modulo the
//!   region), `offset` in the sector (u16 LE, modulo 512), `len` (u16 LE,
//!   at most 4096), then `len` bytes (fewer if the input ends).
//!
//! The input ends with a last write-back, as at close.

use super::geometry::FatType;
use super::options::Config;
use super::volume::Volume;
use super::{open_volume, try_commit, SECTOR};
use std::path::{Path, PathBuf};

/// The most operations one input runs.
pub const MAX_OPS: usize = 64;
/// The most write-backs one input asks for.
pub const MAX_COMMITS: usize = 8;

/// Run one input.
pub fn vvfat_rw(data: &[u8]) {
    run(data, &mut |_| {});
}

/// Run one input; `inspect` sees the exported directory at the end,
/// before it is checked and removed (the corpus test looks at what the
/// seeds did).
pub fn run(data: &[u8], inspect: &mut dyn FnMut(&Path)) {
    let Some((&layout, mut ops)) = data.split_first() else {
        return;
    };
    let scratch = Scratch::new();
    let (fat_type, floppy) = match layout & 3 {
        0 => (Some(FatType::Fat12), false),
        1 => (Some(FatType::Fat16), false),
        2 => (Some(FatType::Fat32), false),
        _ => (None, true),
    };
    let cfg = Config {
        dir: scratch.exported().to_str().unwrap_or_default().to_string(),
        fat_type,
        fat_type_given: 0,
        floppy,
        label: None,
        rw: true,
    };
    let Ok((mut vol, _)) = open_volume(&cfg, true) else {
        return;
    };
    let (mut n, mut commits) = (0, 0);
    while let Some((&tag, rest)) = ops.split_first() {
        if n == MAX_OPS {
            break;
        }
        n += 1;
        ops = rest;
        if tag & 7 == 7 {
            if commits < MAX_COMMITS {
                commits += 1;
                let _ = try_commit(&mut vol);
            }
            continue;
        }
        let Some((head, rest)) = ops.split_first_chunk::<7>() else {
            break;
        };
        let region = head[0];
        let sector = u64::from(u16::from_le_bytes([head[1], head[2]]));
        let offset = u64::from(u16::from_le_bytes([head[3], head[4]])) % SECTOR;
        let len = usize::from(u16::from_le_bytes([head[5], head[6]])).min(4096);
        let len = len.min(rest.len());
        let (bytes, rest) = rest.split_at(len);
        ops = rest;
        let at = place(&vol, region, sector) * SECTOR + offset;
        let end = (at + bytes.len() as u64).min(vol.disk_bytes());
        let _ = vol.write(at, &bytes[..(end - at) as usize]);
    }
    let _ = try_commit(&mut vol);
    drop(vol);
    inspect(&scratch.exported());
    scratch.check();
}

/// The sector an operation's `region` and `sector` name.
fn place(vol: &Volume, region: u8, sector: u64) -> u64 {
    let g = &vol.base.geo;
    let spc = u64::from(g.spc);
    match region & 3 {
        0 => g.fat_start() + sector % (2 * u64::from(g.spf)),
        1 if g.root_sectors() > 0 => g.root_start() + sector % g.root_sectors(),
        1 => g.data_start() + sector % spc,
        2 => g.data_start() + sector % (u64::from(g.clusters.min(64)) * spc),
        _ => sector % u64::from(g.total_sectors),
    }
}

/// The scratch directory of one input.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("strata-vvfat-fuzz-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        let ex = p.join("exported");
        let made = std::fs::create_dir_all(ex.join("dir"))
            .and_then(|_| std::fs::create_dir(p.join("outside")))
            .and_then(|_| std::fs::write(ex.join("a.txt"), b"hello"))
            .and_then(|_| std::fs::write(ex.join("dir/b.bin"), vec![0x5a; 9000]))
            .and_then(|_| std::fs::write(ex.join("empty"), b""))
            .and_then(|_| std::os::unix::fs::symlink("../outside", ex.join("escape")));
        if let Err(e) = made {
            panic!("cannot make the scratch directory {}: {e}", p.display());
        }
        Scratch(p)
    }

    fn exported(&self) -> PathBuf {
        self.0.join("exported")
    }

    /// Nothing was made outside the exported directory.
    fn check(&self) {
        let names = |p: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(p)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        };
        assert_eq!(names(&self.0), ["exported", "outside"], "beside the export");
        assert!(names(&self.0.join("outside")).is_empty(), "written outside");
        assert!(
            std::fs::symlink_metadata(self.exported().join("escape"))
                .is_ok_and(|m| m.file_type().is_symlink()),
            "the link out was replaced"
        );
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
