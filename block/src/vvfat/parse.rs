//! What the guest made of the disk: its FAT and directories, parsed into
//! a typed tree before anything reaches the host directory. The guest is
//! hostile, so everything is checked and bounded: every chain is followed
//! through a set of claimed clusters (a loop or a cluster in two chains
//! fails, and the whole walk touches each cluster once), a directory
//! holds at most 65,536 entries, nesting stops at [`MAX_DEPTH`], the tree
//! at [`MAX_ENTRIES`], and names must be names inside a directory.
//!
//! The tree is only accepted when it is consistent, which is also how a
//! half-finished change is told from a finished one (QEMU's
//! `is_consistent` has the same rules): every file's chain has exactly as
//! many clusters as its size needs (none for an empty file), every
//! directory has a chain, no two entries of a directory have the same
//! name, and every cluster the FAT marks in use belongs to some chain.
//! The last rule matters most: a guest renaming or moving a file writes
//! the new entry and removes the old one in some order, and in between
//! either two entries share the chain or none holds it; both are refused,
//! so the file is never seen deleted.
//!
//! Spec: fatgen103, "FAT Data Structure", "FAT Directory Structure", "FAT
//! 32 Byte Directory Entry Structure" (0x00 ends a directory, 0xE5 marks
//! a free entry) and "FAT Long Directory Entries".

use super::dirent::{attr, ShortEntry, DELETED, ENTRY};
use super::fat::{ClusterSet, Fat};
use super::geometry::{FatType, Geometry};
use super::image::MAX_DEPTH;
use super::names::{short_to_host, LfnReader};
use super::SECTOR;
use std::collections::HashSet;

/// The most entries (files and directories) a tree may have.
pub const MAX_ENTRIES: usize = 1 << 20;
/// The most bytes of one directory (65,536 entries).
pub const MAX_DIR_BYTES: u64 = 65_536 * ENTRY as u64;

/// One file or directory the guest's directories hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Index of the parent directory in [`Tree::entries`] (the root, 0,
    /// is its own parent).
    pub parent: u32,
    /// The host name it stands for.
    pub name: String,
    /// A directory.
    pub dir: bool,
    /// The first cluster (0: an empty file, or the FAT12/16 root).
    pub first: u32,
    /// Bytes (files).
    pub size: u32,
    /// Its clusters, in order.
    pub chain: Vec<u32>,
}

/// The guest's directory tree; `entries[0]` is the root, and parents come
/// before their children.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tree {
    /// Every entry.
    pub entries: Vec<Entry>,
}

impl Tree {
    /// The path of entry `i` below the root, for messages.
    pub fn path(&self, i: u32) -> String {
        let mut names = Vec::new();
        let mut cur = i as usize;
        while cur != 0 && names.len() <= MAX_DEPTH {
            names.push(self.entries[cur].name.as_str());
            cur = self.entries[cur].parent as usize;
        }
        names.reverse();
        format!("/{}", names.join("/"))
    }
}

/// Reads sectors of the guest's view: `read(first_sector, buf)`.
pub type ReadFn<'a> = dyn FnMut(u64, &mut [u8]) -> std::io::Result<()> + 'a;

/// Parse the guest's FAT (the first copy) and directories in the layout
/// `geo`; `Err` says why the disk is not (yet) consistent, in one line.
/// The boot sector is not read: the layout is the one the image was made
/// with, whatever the guest wrote there.
pub fn parse(geo: &Geometry, read: &mut ReadFn<'_>) -> Result<Tree, String> {
    let mut fat_bytes = vec![0u8; geo.spf as usize * SECTOR as usize];
    read(geo.fat_start(), &mut fat_bytes).map_err(|e| format!("reading the FAT: {e}"))?;
    let fat = Fat::from_bytes(geo.fat_type, fat_bytes);
    let mut used = ClusterSet::new(geo.last_cluster() + 1);
    let cb = geo.cluster_bytes();
    let max_dir_clusters = MAX_DIR_BYTES.div_ceil(cb) as usize;
    let fat32 = geo.fat_type == FatType::Fat32;
    let root_chain = if fat32 {
        fat.chain(geo, geo.root_cluster(), max_dir_clusters, &mut used)
            .map_err(|e| format!("the root directory's chain: {e}"))?
    } else {
        Vec::new()
    };
    let mut tree = Tree {
        entries: vec![Entry {
            parent: 0,
            name: String::new(),
            dir: true,
            first: geo.root_cluster(),
            size: 0,
            chain: root_chain,
        }],
    };
    let mut depth = vec![0usize];
    let mut i = 0;
    while i < tree.entries.len() {
        if !tree.entries[i].dir {
            i += 1;
            continue;
        }
        let bytes = if i == 0 && !fat32 {
            let mut b = vec![0u8; geo.root_sectors() as usize * SECTOR as usize];
            read(geo.root_start(), &mut b).map_err(|e| format!("reading the root: {e}"))?;
            b
        } else {
            let chain = &tree.entries[i].chain;
            let mut b = vec![0u8; chain.len() * cb as usize];
            for (k, &c) in chain.iter().enumerate() {
                let at = k * cb as usize;
                read(geo.cluster_sector(c), &mut b[at..at + cb as usize])
                    .map_err(|e| format!("reading a directory: {e}"))?;
            }
            b
        };
        let mut names = HashSet::new();
        let mut lfn = LfnReader::default();
        for raw in bytes.chunks_exact(ENTRY) {
            let mut e = [0u8; ENTRY];
            e.copy_from_slice(raw);
            if e[0] == 0 {
                break;
            }
            if e[0] == DELETED {
                lfn.reset();
                continue;
            }
            if e[11] & 0x3f == attr::LONG_NAME {
                lfn.push(&e);
                continue;
            }
            let se = ShortEntry::decode(&e, fat32);
            if se.attr & attr::VOLUME_ID != 0
                || se.name == *b".          "
                || se.name == *b"..         "
            {
                lfn.reset();
                continue;
            }
            let name = lfn
                .finish(&se.name)
                .or_else(|| short_to_host(&se.name, se.nt_case))
                .ok_or_else(|| format!("{}: an entry has no valid name", tree.path(i as u32)))?;
            if !names.insert(name.clone()) {
                return Err(format!(
                    "{}: two entries are named '{name}'",
                    tree.path(i as u32)
                ));
            }
            if tree.entries.len() >= MAX_ENTRIES {
                return Err(format!("more than {MAX_ENTRIES} files and directories"));
            }
            let dir = se.attr & attr::DIRECTORY != 0;
            let at = |tree: &Tree| format!("{}/{name}", tree.path(i as u32).trim_end_matches('/'));
            if dir && depth[i] + 1 > MAX_DEPTH {
                return Err(format!("{}: nested more than {MAX_DEPTH} deep", at(&tree)));
            }
            let chain = if dir {
                fat.chain(geo, se.first_cluster, max_dir_clusters, &mut used)
                    .map_err(|e| format!("{}: {e}", at(&tree)))?
            } else if se.size == 0 {
                if se.first_cluster != 0 {
                    return Err(format!("{}: empty, yet has a first cluster", at(&tree)));
                }
                Vec::new()
            } else {
                let want = u64::from(se.size).div_ceil(cb) as usize;
                let chain = fat
                    .chain(geo, se.first_cluster, want, &mut used)
                    .map_err(|e| format!("{}: {e}", at(&tree)))?;
                if chain.len() != want {
                    return Err(format!(
                        "{}: {} bytes in {} clusters",
                        at(&tree),
                        se.size,
                        chain.len()
                    ));
                }
                chain
            };
            tree.entries.push(Entry {
                parent: i as u32,
                name,
                dir,
                first: if dir || se.size > 0 {
                    se.first_cluster
                } else {
                    0
                },
                size: if dir { 0 } else { se.size },
                chain,
            });
            depth.push(depth[i] + 1);
        }
        i += 1;
    }
    let bad = geo.fat_type.eoc() - 8;
    for c in 2..=geo.last_cluster() {
        let v = fat.get(c);
        if v != 0 && v != bad && !used.contains(c) {
            return Err(format!("cluster {c} is in use but in no file or directory"));
        }
    }
    Ok(tree)
}
