//! Reading the host directory into an image (QEMU's `init_directories`
//! and `read_directory`): the tree is walked breadth first, entries in
//! byte order of their names, and clusters are handed out in the order
//! the walk met the files and directories, each one contiguous, so the
//! FAT is a run of simple chains. Only metadata is read here; contents
//! stay in the host files until the guest reads them.
//!
//! Spec: fatgen103, "FAT Directory Structure" (the root directory's
//! volume label entry, `.` and `..` at the start of every other
//! directory with `..` naming cluster 0 for the root, at most 65,536
//! entries in a directory) and "FAT 32 Byte Directory Entry Structure".
//!
//! What the walk leaves out: names that are not UTF-8 (a long name is
//! UTF-16), names longer than a long name holds, anything but regular
//! files and directories (a FIFO would block a read), symbolic links
//! whose target lies outside the directory (the guest must not reach
//! past it, and write-back must not write past it), a directory met a
//! second time through a link (a loop), and the write-back's own staging
//! directory ([`super::commit::STAGING_PREFIX`]). Each leaves a warning.
//! What refuses the directory, with one line naming it: a directory that
//! cannot be read, a file over FAT's 4 GiB - 1, more entries than the
//! FAT12/16 root directory or any directory holds, more than
//! [`MAX_NODES`] files, nesting deeper than [`MAX_DEPTH`], and more
//! data than the disk has clusters for.

use super::dirent::{attr, fat_datetime, ShortEntry, ENTRY};
use super::fat::Fat;
use super::geometry::{FatType, Geometry};
use super::image::{Base, Node, Src, MAX_DEPTH};
use super::names::{lfn_checksum, lfn_entries, short_name, MAX_NAME_UNITS};
use super::SECTOR;
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The most files and directories an image holds: a bound on the memory
/// the walk takes whatever the directory holds.
pub const MAX_NODES: usize = 1 << 20;
/// The most entries one directory holds (fatgen103: 2 MiB of entries).
pub const MAX_DIR_ENTRIES: usize = 65_536;

/// One host file or directory found by the walk.
struct Found {
    parent: u32,
    name: String,
    dir: bool,
    size: u64,
    /// st_mtime, st_atime, st_ctime.
    times: (i64, i64, i64),
    /// Children, in directory order.
    children: Vec<u32>,
    /// Directory entries this directory needs (dirs only).
    entries: usize,
}

/// What the walk of `dir` (named `shown` in messages, as the user wrote
/// it) makes: the image, and warnings about what it left out.
pub fn build(
    dir: &Path,
    shown: &str,
    root_canon: &Path,
    geo: Geometry,
    label: &[u8; 11],
) -> Result<(Base, Vec<String>), String> {
    let mut warnings = Vec::new();
    let meta = std::fs::metadata(dir)
        .map_err(|e| format!("Could not read directory {shown}: {}", io_text(&e)))?;
    if !meta.is_dir() {
        return Err(format!("Could not read directory {shown}: Not a directory"));
    }
    let cb = geo.cluster_bytes();
    let fixed_root = geo.fat_type != FatType::Fat32;
    let mut found = vec![Found {
        parent: 0,
        name: String::new(),
        dir: true,
        size: 0,
        times: times(&meta),
        children: Vec::new(),
        entries: 0,
    }];
    let mut visited = HashSet::new();
    visited.insert((meta.dev(), meta.ino()));
    let mut clusters_needed = 0u64;
    let mut paths = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < found.len() {
        if !found[i].dir {
            i += 1;
            continue;
        }
        let path = paths[i].clone();
        let shown_here = shown_path(shown, &path, dir);
        let depth = depth_of(&found, i as u32);
        let rd = std::fs::read_dir(&path)
            .map_err(|e| format!("Could not read directory {shown_here}: {}", io_text(&e)))?;
        let mut names = Vec::new();
        for ent in rd {
            let ent =
                ent.map_err(|e| format!("Could not read directory {shown_here}: {}", io_text(&e)))?;
            let os = ent.file_name();
            let Some(name) = os.to_str() else {
                warnings.push(format!(
                    "{}: left out (the name is not UTF-8)",
                    Path::new(&shown_here).join(&os).display()
                ));
                continue;
            };
            if name.starts_with(super::commit::STAGING_PREFIX) {
                continue;
            }
            names.push(name.to_string());
        }
        names.sort();
        // The label (root) or `.` and `..` (others).
        let mut entries = if i == 0 { 1 } else { 2 };
        let mut children = Vec::new();
        for name in names {
            let p = path.join(&name);
            let shown_p = format!("{shown_here}/{name}");
            let units = name.encode_utf16().count();
            if units > MAX_NAME_UNITS {
                warnings.push(format!(
                    "{shown_p}: left out (the name is too long for FAT)"
                ));
                continue;
            }
            let lmeta = match std::fs::symlink_metadata(&p) {
                Ok(m) => m,
                // Gone since the listing.
                Err(_) => continue,
            };
            let m = if lmeta.file_type().is_symlink() {
                match std::fs::canonicalize(&p) {
                    Ok(t) if t.starts_with(root_canon) => match std::fs::metadata(&p) {
                        Ok(m) => m,
                        Err(_) => continue,
                    },
                    _ => {
                        warnings.push(format!(
                            "{shown_p}: left out (a symbolic link leading outside {shown})"
                        ));
                        continue;
                    }
                }
            } else {
                lmeta
            };
            let is_dir = m.is_dir();
            if !is_dir && !m.is_file() {
                warnings.push(format!(
                    "{shown_p}: left out (neither a regular file nor a directory)"
                ));
                continue;
            }
            if is_dir && !visited.insert((m.dev(), m.ino())) {
                warnings.push(format!(
                    "{shown_p}: left out (a directory already in the image)"
                ));
                continue;
            }
            if is_dir && depth + 1 > MAX_DEPTH {
                return Err(format!(
                    "{shown}: directories are nested more than {MAX_DEPTH} deep ({shown_p})"
                ));
            }
            if !is_dir && m.len() > u64::from(u32::MAX) {
                return Err(format!(
                    "{shown}: {shown_p} is larger than FAT's limit of 4 GiB - 1 byte"
                ));
            }
            if found.len() >= MAX_NODES {
                return Err(format!(
                    "{shown}: more than {MAX_NODES} files and directories, too many for a vvfat image"
                ));
            }
            entries += 1 + units.div_ceil(13);
            let size = if is_dir { 0 } else { m.len() };
            clusters_needed += size.div_ceil(cb);
            let id = found.len() as u32;
            found.push(Found {
                parent: i as u32,
                name,
                dir: is_dir,
                size,
                times: times(&m),
                children: Vec::new(),
                entries: 0,
            });
            paths.push(p);
            children.push(id);
        }
        if i == 0 && fixed_root && entries > geo.root_entries as usize {
            return Err(format!(
                "{shown}: too many entries for the {} root directory ({entries} needed, {} fit; long names take more than one)",
                geo.fat_type.name(),
                geo.root_entries
            ));
        }
        if entries > MAX_DIR_ENTRIES {
            return Err(format!(
                "{shown}: directory {shown_here} needs {entries} entries, more than FAT's {MAX_DIR_ENTRIES}"
            ));
        }
        if i != 0 || !fixed_root {
            clusters_needed += ((entries * ENTRY) as u64).div_ceil(cb).max(1);
        }
        if clusters_needed > u64::from(geo.clusters) {
            return Err(fits_error(shown, &geo));
        }
        found[i].children = children;
        found[i].entries = entries;
        i += 1;
    }
    Ok((lay_out(&found, geo, label), warnings))
}

/// The one-line "does not fit" error (QEMU's words, with the capacity).
fn fits_error(shown: &str, geo: &Geometry) -> String {
    format!(
        "Directory {shown} does not fit in {} (capacity {:.2} MB)",
        geo.fat_type.name(),
        f64::from(geo.clusters) * geo.cluster_bytes() as f64 / 1e6
    )
}

/// Hands out clusters and writes the FAT, the directories and the
/// reserved sectors for the walk's result.
fn lay_out(found: &[Found], geo: Geometry, label: &[u8; 11]) -> Base {
    let cb = geo.cluster_bytes();
    let fixed_root = geo.fat_type != FatType::Fat32;
    let mut fat = Fat::new(&geo);
    let mut src = vec![Src::Zero; geo.clusters as usize];
    let mut first = vec![0u32; found.len()];
    let mut dir_index = vec![u32::MAX; found.len()];
    let mut dirs: Vec<Vec<u8>> = Vec::new();
    let mut next = 2u32;
    // Clusters in walk order, each file or directory contiguous.
    for (i, f) in found.iter().enumerate() {
        let count = if f.dir {
            if i == 0 && fixed_root {
                0
            } else {
                ((f.entries * ENTRY) as u64).div_ceil(cb).max(1) as u32
            }
        } else {
            f.size.div_ceil(cb) as u32
        };
        if f.dir && !(i == 0 && fixed_root) {
            dir_index[i] = dirs.len() as u32;
            dirs.push(Vec::new());
        }
        if count == 0 {
            continue;
        }
        first[i] = next;
        fat.link_run(next, count);
        for k in 0..count {
            src[(next + k - 2) as usize] = if f.dir {
                Src::Dir {
                    dir: dir_index[i],
                    idx: k,
                }
            } else {
                Src::File {
                    node: i as u32,
                    idx: k,
                }
            };
        }
        next += count;
    }
    let mut root = Vec::new();
    for (i, _) in found.iter().enumerate().filter(|(_, f)| f.dir) {
        let bytes = dir_bytes(found, i, &first, label);
        if i == 0 && fixed_root {
            root = bytes;
            root.resize(geo.root_sectors() as usize * SECTOR as usize, 0);
        } else {
            let d = &mut dirs[dir_index[i] as usize];
            *d = bytes;
            let len = (d.len() as u64).div_ceil(cb).max(1) * cb;
            d.resize(len as usize, 0);
        }
    }
    let mut head = vec![0u8; geo.fat_start() as usize * SECTOR as usize];
    if !geo.floppy {
        head[..512].copy_from_slice(&geo.mbr());
    }
    let boot = geo.boot_sector(label);
    let b = geo.part_start as usize * SECTOR as usize;
    head[b..b + 512].copy_from_slice(&boot);
    if geo.fat_type == FatType::Fat32 {
        let free = geo.clusters - (next - 2);
        let fsinfo = geo.fsinfo(free, next);
        head[b + 512..b + 1024].copy_from_slice(&fsinfo);
        head[b + 6 * 512..b + 7 * 512].copy_from_slice(&boot);
        head[b + 7 * 512..b + 8 * 512].copy_from_slice(&fsinfo);
    }
    let nodes = found
        .iter()
        .enumerate()
        .map(|(i, f)| Node {
            parent: f.parent,
            name: f.name.clone(),
            dir: f.dir,
            first: first[i],
            size: f.size,
        })
        .collect();
    Base {
        geo,
        head,
        fat: fat.bytes().to_vec(),
        root,
        dirs,
        src,
        nodes,
    }
}

/// The entries of directory `i`: the label or the dot entries, then each
/// child's long name entries and short entry.
fn dir_bytes(found: &[Found], i: usize, first: &[u32], label: &[u8; 11]) -> Vec<u8> {
    let f = &found[i];
    let mut out = Vec::with_capacity(f.entries * ENTRY);
    let mut taken: HashSet<[u8; 11]> = HashSet::new();
    let stamp = |t: (i64, i64, i64)| {
        let m = fat_datetime(t.0);
        (m, fat_datetime(t.1).0, fat_datetime(t.2))
    };
    if i == 0 {
        let e = ShortEntry {
            name: *label,
            attr: attr::VOLUME_ID | attr::ARCHIVE,
            ..ShortEntry::default()
        };
        out.extend_from_slice(&e.encode());
        taken.insert(*label);
    } else {
        let (m, a, c) = stamp(f.times);
        let parent_first = if f.parent == 0 {
            0
        } else {
            first[f.parent as usize]
        };
        for (name, cl) in [(*b".          ", first[i]), (*b"..         ", parent_first)] {
            let e = ShortEntry {
                name,
                attr: attr::DIRECTORY,
                nt_case: 0,
                ctime: c,
                adate: a,
                mtime: m,
                first_cluster: cl,
                size: 0,
            };
            out.extend_from_slice(&e.encode());
            taken.insert(name);
        }
    }
    for &c in &f.children {
        let child = &found[c as usize];
        // The walk checked every name's length, and a million tails
        // cannot all be taken among 65,536 entries.
        let Some(short) = short_name(&child.name, |n| taken.contains(n)) else {
            continue;
        };
        let Some(lfn) = lfn_entries(&child.name, lfn_checksum(&short)) else {
            continue;
        };
        taken.insert(short);
        for e in lfn {
            out.extend_from_slice(&e);
        }
        let (m, a, ct) = stamp(child.times);
        let e = ShortEntry {
            name: short,
            attr: if child.dir {
                attr::DIRECTORY
            } else {
                attr::ARCHIVE
            },
            nt_case: 0,
            ctime: ct,
            adate: a,
            mtime: m,
            first_cluster: first[c as usize],
            size: if child.dir { 0 } else { child.size as u32 },
        };
        out.extend_from_slice(&e.encode());
    }
    out
}

fn times(m: &std::fs::Metadata) -> (i64, i64, i64) {
    (m.mtime(), m.atime(), m.ctime())
}

fn depth_of(found: &[Found], mut i: u32) -> usize {
    let mut d = 0;
    while i != 0 && d <= MAX_DEPTH {
        i = found[i as usize].parent;
        d += 1;
    }
    d
}

/// `path` (inside `dir`) as the user would name it, starting with `shown`.
fn shown_path(shown: &str, path: &Path, dir: &Path) -> String {
    match path.strip_prefix(dir) {
        Ok(rel) if rel.as_os_str().is_empty() => shown.to_string(),
        Ok(rel) => format!("{}/{}", shown.trim_end_matches('/'), rel.display()),
        Err(_) => path.display().to_string(),
    }
}

/// An I/O error as its strerror text (no "(os error N)").
pub fn io_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => crate::error::strerror(n),
        None => e.to_string(),
    }
}

/// The canonical form of the exported directory (symbolic links are
/// checked against it).
pub fn canonical_root(dir: &Path, shown: &str) -> Result<PathBuf, String> {
    std::fs::canonicalize(dir)
        .map_err(|e| format!("Could not read directory {shown}: {}", io_text(&e)))
}
