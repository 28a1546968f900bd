//! The synthesized image as of open (or of the last write-back): the
//! metadata sectors, generated into memory, and for every data cluster
//! where its bytes come from, so that file contents are read from the
//! host files only when the guest reads them.
//!
//! Spec: fatgen103, "FAT Data Structure" (cluster N starts at
//! FirstDataSector + (N - 2) * BPB_SecPerClus) and "FAT Directory
//! Structure".

use super::geometry::Geometry;
use std::path::PathBuf;

/// Where the bytes of a data cluster come from when the guest has not
/// written it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Src {
    /// Zeroes (a free cluster).
    Zero,
    /// Cluster `idx` of synthesized directory `dir` (in memory).
    Dir {
        /// Index into [`Base::dirs`].
        dir: u32,
        /// Cluster index within the directory.
        idx: u32,
    },
    /// Cluster `idx` of the host file of node `node`.
    File {
        /// Index into [`Base::nodes`].
        node: u32,
        /// Cluster index within the file.
        idx: u32,
    },
}

/// A file or directory as the image presents it (and, after a
/// write-back, as the host directory holds it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// The parent directory's index (the root is its own parent).
    pub parent: u32,
    /// The host name.
    pub name: String,
    /// A directory.
    pub dir: bool,
    /// The first cluster (0: an empty file, or the FAT12/16 root).
    pub first: u32,
    /// Bytes (files).
    pub size: u64,
}

/// The most directory levels an image holds (host paths stay far below
/// PATH_MAX, and walks stay short).
pub const MAX_DEPTH: usize = 64;

/// The image without the guest's writes.
#[derive(Clone, Debug)]
pub struct Base {
    /// The layout.
    pub geo: Geometry,
    /// Sectors before the first FAT: the MBR, the gap before the
    /// partition, the boot sector and FAT32's other reserved sectors.
    pub head: Vec<u8>,
    /// One FAT (both copies read from it).
    pub fat: Vec<u8>,
    /// The fixed root directory area (FAT12/16; empty on FAT32).
    pub root: Vec<u8>,
    /// Synthesized directory contents, whole clusters each.
    pub dirs: Vec<Vec<u8>>,
    /// The source of each data cluster (index: cluster number - 2).
    pub src: Vec<Src>,
    /// Every file and directory; `nodes[0]` is the root.
    pub nodes: Vec<Node>,
}

impl Base {
    /// The host path of node `n` relative to the exported directory.
    pub fn rel_path(&self, n: u32) -> PathBuf {
        let mut names = Vec::new();
        let mut cur = n as usize;
        while cur != 0 && names.len() <= MAX_DEPTH {
            let Some(node) = self.nodes.get(cur) else {
                break;
            };
            names.push(node.name.as_str());
            cur = node.parent as usize;
        }
        names.iter().rev().collect()
    }

    /// The source of data cluster `c` (zeroes outside the data area).
    pub fn src(&self, c: u32) -> Src {
        c.checked_sub(2)
            .and_then(|i| self.src.get(i as usize))
            .copied()
            .unwrap_or(Src::Zero)
    }

    /// The depth of node `n` (the root's children: 1).
    pub fn depth(&self, n: u32) -> usize {
        let mut d = 0;
        let mut cur = n as usize;
        while cur != 0 && d <= MAX_DEPTH {
            cur = self.nodes.get(cur).map_or(0, |x| x.parent as usize);
            d += 1;
        }
        d
    }
}
