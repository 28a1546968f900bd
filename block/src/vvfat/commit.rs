//! Writing the guest's changes back to the host directory: the tree
//! [`super::parse`] read from the guest's FAT and directories is compared
//! with the image's own (what the host directory held at open or at the
//! last write-back), and the difference is applied to the host.
//!
//! Matching: a guest entry is the host file or directory whose first
//! cluster it has (QEMU's rule: same first cluster, same file, so a new
//! name or parent is a rename or a move); an empty file, which has no
//! cluster, is the host's empty file of the same name in the same
//! directory. Unmatched guest entries are new; unmatched host ones were
//! deleted.
//!
//! Order, so that no step can lose what a later one needs:
//! 1. Every cluster whose bytes the guest sees through a host file that
//!    is about to change (a cluster moved to another file or position, a
//!    cluster of a directory) is first copied into the overlay
//!    (QEMU's `copy_it`).
//! 2. Entries that are deleted, renamed or moved go into a staging
//!    directory inside the exported one (renames within one file system,
//!    so nothing is copied), deepest first; then, parents first, moved
//!    entries go to their new places and new directories and files are
//!    made; then what is left in staging (deleted) is removed. Swaps and
//!    chains of renames work, and nothing is overwritten: a name that
//!    exists on the host but not in the image is refused.
//! 3. The contents of new and changed files are written: only the clusters
//!    the guest wrote or moved, then the size is set.
//! 4. The image's tree becomes the guest's; written clusters leave the
//!    overlay (they now read from the host files).
//!
//! Safety: names come from [`super::names`] (no `/`, `.`, `..` or NUL);
//! every directory an operation happens in is checked, by its canonical
//! path, to lie inside the exported directory; new files are created
//! with O_EXCL (no symbolic link is followed); an existing file is
//! written only when its canonical path lies inside. A failed step is
//! reported (one line each) and the rest goes on; the data of a file that
//! could not be written stays in the overlay, so the guest loses nothing
//! and the next write-back tries again.

use super::image::{Node, Src};
use super::parse::Tree;
use super::volume::Volume;
use super::SECTOR;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Names starting with this are write-back's staging directories (left
/// out of images, in case one outlives a crash).
pub const STAGING_PREFIX: &str = ".vvfat-staging.";

/// What a write-back did.
#[derive(Debug, Default)]
pub struct Report {
    /// What failed, one line each.
    pub errors: Vec<String>,
    /// Host files whose contents were written.
    pub written: Vec<PathBuf>,
    /// Whether anything changed on the host.
    pub changed: bool,
}

/// Apply `tree` (the guest's, consistent) to the host directory of `vol`
/// and make it the image's own.
pub fn commit(vol: &mut Volume, tree: &Tree) -> Report {
    let mut rep = Report::default();
    let n_base = vol.base.nodes.len();
    let n_tree = tree.entries.len();
    let cb = vol.base.geo.cluster_bytes();

    // Which guest entry is which host node.
    let mut by_first = HashMap::new();
    let mut empty_by_name = HashMap::new();
    for (b, node) in vol.base.nodes.iter().enumerate().skip(1) {
        if node.first != 0 {
            by_first.insert(node.first, b as u32);
        } else if !node.dir {
            empty_by_name.insert((node.parent, node.name.as_str()), b as u32);
        }
    }
    let mut matched: Vec<Option<u32>> = vec![None; n_tree];
    let mut keep: Vec<Option<u32>> = vec![None; n_base];
    matched[0] = Some(0);
    keep[0] = Some(0);
    for (t, e) in tree.entries.iter().enumerate().skip(1) {
        let cand = if e.first != 0 {
            by_first
                .get(&e.first)
                .copied()
                .filter(|&b| vol.base.nodes[b as usize].dir == e.dir)
        } else if !e.dir {
            matched[e.parent as usize]
                .and_then(|bp| empty_by_name.get(&(bp, e.name.as_str())).copied())
        } else {
            None
        };
        if let Some(b) = cand {
            if keep[b as usize].is_none() {
                matched[t] = Some(b);
                keep[b as usize] = Some(t as u32);
            }
        }
    }
    // Kept, but under another name or in another directory.
    let moved: Vec<bool> = (0..n_base)
        .map(|b| {
            keep[b].is_some_and(|t| {
                let e = &tree.entries[t as usize];
                let node = &vol.base.nodes[b];
                b != 0 && (matched[e.parent as usize] != Some(node.parent) || e.name != node.name)
            })
        })
        .collect();

    // 1. What each file needs written; copy clusters whose host bytes
    // are about to change into the overlay first.
    let mut to_write: Vec<Vec<bool>> = vec![Vec::new(); n_tree];
    let mut changed = vec![false; n_tree];
    for (t, e) in tree.entries.iter().enumerate() {
        let own = matched[t].filter(|_| !e.dir);
        for (i, &c) in e.chain.iter().enumerate() {
            let (s, n) = vol.cluster_sectors(c);
            let src = vol.base.src(c);
            let (any, all) = match &vol.overlay {
                Some(o) => (o.any(s, n), o.all(s, n)),
                None => (false, false),
            };
            let in_place = own.is_some_and(|b| {
                src == Src::File {
                    node: b,
                    idx: i as u32,
                }
            });
            let host_backed = matches!(src, Src::File { .. });
            let copy = if e.dir {
                host_backed && !all
            } else if in_place {
                any && !all
            } else {
                host_backed && !all
            };
            if copy {
                if let Err(err) = materialize(vol, s, n) {
                    rep.errors.push(format!(
                        "cannot keep a cluster of {} aside: {err}",
                        tree.path(t as u32)
                    ));
                    // Writing back without it would lose it: stop here;
                    // nothing on the host has changed yet.
                    return rep;
                }
            }
            if !e.dir {
                to_write[t].push(!in_place || any);
            }
        }
        if !e.dir {
            let size_changed =
                own.is_none_or(|b| vol.base.nodes[b as usize].size != u64::from(e.size));
            changed[t] = own.is_none() || size_changed || to_write[t].iter().any(|&w| w);
        }
    }

    // 2. The host tree.
    let mut host = Host::new(vol.dir.clone(), vol.root_canon.clone());
    let mut staged = vec![false; n_base];
    let mut lost = vec![false; n_base];
    let mut order: Vec<usize> = (1..n_base)
        .filter(|&b| keep[b].is_none() || moved[b])
        .collect();
    order.sort_by_key(|&b| std::cmp::Reverse(vol.base.depth(b as u32)));
    for &b in &order {
        let from = cur_path(&vol.base.nodes, &staged, &host, b);
        match host.stage(&from, b) {
            Ok(()) => {
                staged[b] = true;
                rep.changed = true;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => lost[b] = true,
            Err(e) => rep
                .errors
                .push(format!("cannot move {}: {e}", rel(&vol.dir, &from))),
        }
    }
    let mut hp: Vec<Option<PathBuf>> = vec![None; n_tree];
    hp[0] = Some(vol.dir.clone());
    let mut is_new = vec![false; n_tree];
    for (t, e) in tree.entries.iter().enumerate().skip(1) {
        let Some(parent) = hp[e.parent as usize].clone() else {
            continue;
        };
        let target = parent.join(&e.name);
        let shown = rel(&vol.dir, &target);
        let r = match matched[t] {
            Some(b) if staged[b as usize] => {
                if std::fs::symlink_metadata(&target).is_ok() {
                    Err(io::Error::from_raw_os_error(libc::EEXIST))
                } else {
                    host.unstage(b as usize, &target)
                }
            }
            Some(b) if !lost[b as usize] => {
                if moved[b as usize] {
                    // Could not be staged: left where it was, with what
                    // is inside it.
                    continue;
                }
                Ok(())
            }
            _ => {
                is_new[t] = true;
                if e.dir {
                    std::fs::create_dir(&target)
                } else {
                    OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&target)
                        .map(drop)
                }
            }
        };
        if let Err(err) = r {
            rep.errors.push(format!("cannot make {shown}: {err}"));
            continue;
        }
        if matched[t].is_none_or(|b| staged[b as usize] || lost[b as usize]) {
            rep.changed = true;
        }
        if e.dir && !host.inside_dir(&target) {
            rep.errors.push(format!(
                "{shown} is not a directory inside the exported one: nothing written below it"
            ));
            continue;
        }
        hp[t] = Some(target);
    }
    for b in 1..n_base {
        if keep[b].is_none() && staged[b] {
            if let Err(e) = host.remove_staged(b, vol.base.nodes[b].dir) {
                let shown = rel(&vol.dir, &vol.dir.join(vol.base.rel_path(b as u32)));
                rep.errors.push(format!("cannot delete {shown}: {e}"));
            }
        }
    }
    if let Some(e) = host.finish() {
        rep.errors.push(e);
    }

    // 3. Contents.
    let mut written_ok = vec![false; n_tree];
    for (t, e) in tree.entries.iter().enumerate() {
        if e.dir || !changed[t] {
            continue;
        }
        let Some(path) = &hp[t] else { continue };
        let all = is_new[t];
        match write_file(vol, &host, path, e, &to_write[t], all, cb) {
            Ok(()) => {
                written_ok[t] = true;
                rep.changed = true;
                rep.written.push(path.clone());
            }
            Err(err) => rep
                .errors
                .push(format!("cannot write {}: {err}", rel(&vol.dir, path))),
        }
    }

    // 4. The guest's tree becomes the image's.
    let mut src = vol.base.src.clone();
    let mut in_chain = super::fat::ClusterSet::new(vol.base.geo.last_cluster() + 1);
    let mut dir_clusters = super::fat::ClusterSet::new(vol.base.geo.last_cluster() + 1);
    for (t, e) in tree.entries.iter().enumerate() {
        for (i, &c) in e.chain.iter().enumerate() {
            in_chain.insert(c);
            let slot = &mut src[(c - 2) as usize];
            if e.dir {
                dir_clusters.insert(c);
                if matches!(slot, Src::File { .. }) {
                    *slot = Src::Zero;
                }
                continue;
            }
            let wrote = written_ok[t] && (is_new[t] || to_write[t][i]);
            let unchanged = !to_write[t][i] && !is_new[t] && matched[t].is_some();
            if wrote || unchanged {
                *slot = Src::File {
                    node: t as u32,
                    idx: i as u32,
                };
            } else if matches!(slot, Src::File { .. }) {
                // Copied into the overlay in step 1.
                *slot = Src::Zero;
            }
            if wrote {
                let (s, n) = vol.cluster_sectors(c);
                if let Some(o) = &mut vol.overlay {
                    o.forget(s, n);
                }
            }
        }
    }
    for (i, slot) in src.iter_mut().enumerate() {
        if matches!(slot, Src::File { .. }) && !in_chain.contains(i as u32 + 2) {
            *slot = Src::Zero;
        }
    }
    vol.base.src = src;
    vol.base.nodes = tree
        .entries
        .iter()
        .map(|e| Node {
            parent: e.parent,
            name: e.name.clone(),
            dir: e.dir,
            first: e.first,
            size: u64::from(e.size),
        })
        .collect();
    vol.dir_clusters = dir_clusters;
    vol.drop_file();
    rep
}

/// Copy cluster sectors `s..s + n` as the guest sees them into the
/// overlay.
fn materialize(vol: &mut Volume, s: u64, n: u64) -> io::Result<()> {
    let mut buf = vec![0u8; (n * SECTOR) as usize];
    vol.read_sectors(s, &mut buf)?;
    vol.write_sectors(s, &buf)
}

/// Write the clusters of `e` that `to_write` marks (all of them when
/// `all`) into the host file at `path`, then set its size.
fn write_file(
    vol: &mut Volume,
    host: &Host,
    path: &Path,
    e: &super::parse::Entry,
    to_write: &[bool],
    all: bool,
    cb: u64,
) -> io::Result<()> {
    if !host.inside(path) {
        return Err(io::Error::other("it leads outside the exported directory"));
    }
    let f = OpenOptions::new().write(true).open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let size = u64::from(e.size);
    let mut buf = vec![0u8; cb as usize];
    for (i, &c) in e.chain.iter().enumerate() {
        if !all && !to_write[i] {
            continue;
        }
        let at = i as u64 * cb;
        let len = (size - at).min(cb) as usize;
        stable_cluster(vol, c, &mut buf)?;
        f.write_all_at(&buf[..len], at)?;
    }
    f.set_len(size)?;
    Ok(())
}

/// The guest's view of cluster `c` where it does not depend on a host
/// file (step 1 made sure of that for every cluster written): the
/// overlay, in-memory directory bytes or zeroes.
fn stable_cluster(vol: &mut Volume, c: u32, buf: &mut [u8]) -> io::Result<()> {
    let (s, n) = vol.cluster_sectors(c);
    let all = vol.overlay.as_ref().is_some_and(|o| o.all(s, n));
    match vol.base.src(c) {
        Src::File { .. } if !all => {
            buf.fill(0);
            Ok(())
        }
        _ => vol.read_sectors(s, buf),
    }
}

/// Where base node `b` is on the host now (staged nodes are in staging).
fn cur_path(nodes: &[Node], staged: &[bool], host: &Host, b: usize) -> PathBuf {
    let mut names = Vec::new();
    let mut cur = b;
    let mut base = host.dir.clone();
    while cur != 0 && names.len() <= super::image::MAX_DEPTH {
        if staged[cur] {
            base = host.staged_path(cur);
            break;
        }
        names.push(nodes[cur].name.as_str());
        cur = nodes[cur].parent as usize;
    }
    names.iter().rev().fold(base, |p, n| p.join(n))
}

/// `p` relative to the exported directory, for messages.
fn rel(dir: &Path, p: &Path) -> String {
    match p.strip_prefix(dir) {
        Ok(r) => r.display().to_string(),
        Err(_) => p.display().to_string(),
    }
}

/// Host operations, kept inside the exported directory.
struct Host {
    dir: PathBuf,
    canon: PathBuf,
    staging: Option<PathBuf>,
}

impl Host {
    fn new(dir: PathBuf, canon: PathBuf) -> Host {
        Host {
            dir,
            canon,
            staging: None,
        }
    }

    /// Whether `p` exists and its canonical path lies inside.
    fn inside(&self, p: &Path) -> bool {
        std::fs::canonicalize(p).is_ok_and(|c| c.starts_with(&self.canon))
    }

    /// Whether `p` is a directory inside.
    fn inside_dir(&self, p: &Path) -> bool {
        self.inside(p) && std::fs::metadata(p).is_ok_and(|m| m.is_dir())
    }

    fn staged_path(&self, b: usize) -> PathBuf {
        match &self.staging {
            Some(s) => s.join(b.to_string()),
            None => self.dir.join(STAGING_PREFIX).join(b.to_string()),
        }
    }

    /// Move `from` (whose parent must lie inside) into staging as `b`.
    fn stage(&mut self, from: &Path, b: usize) -> io::Result<()> {
        let parent = from.parent().unwrap_or(&self.dir);
        if !self.inside_dir(parent) {
            return Err(io::Error::other(
                "its directory leads outside the exported one",
            ));
        }
        std::fs::symlink_metadata(from)?;
        if self.staging.is_none() {
            self.staging = Some(make_staging(&self.dir)?);
        }
        std::fs::rename(from, self.staged_path(b))
    }

    /// Move staged `b` to `to` (whose parent was checked).
    fn unstage(&self, b: usize, to: &Path) -> io::Result<()> {
        std::fs::rename(self.staged_path(b), to)
    }

    /// Delete staged `b`.
    fn remove_staged(&self, b: usize, dir: bool) -> io::Result<()> {
        let p = self.staged_path(b);
        // remove_dir_all does not follow symbolic links.
        if dir && !std::fs::symlink_metadata(&p)?.file_type().is_symlink() {
            std::fs::remove_dir_all(p)
        } else {
            std::fs::remove_file(p)
        }
    }

    /// Remove the staging directory; an error if something is left in it.
    fn finish(&mut self) -> Option<String> {
        let s = self.staging.take()?;
        match std::fs::remove_dir(&s) {
            Ok(()) => None,
            Err(e) => Some(format!(
                "entries that could not be put back are left in {}: {e}",
                rel(&self.dir, &s)
            )),
        }
    }
}

/// A new staging directory inside `dir`.
fn make_staging(dir: &Path) -> io::Result<PathBuf> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    loop {
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = dir.join(format!("{STAGING_PREFIX}{}.{n}", std::process::id()));
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Sync the data of files a write-back wrote (a flush's promise).
pub fn sync_files(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .filter_map(|p| {
            File::open(p)
                .and_then(|f| f.sync_data())
                .err()
                .map(|e| format!("cannot sync {}: {e}", p.display()))
        })
        .collect()
}
