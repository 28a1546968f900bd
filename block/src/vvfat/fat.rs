//! The file allocation table: entries of 12, 16 or 32 bits, chains built
//! for the synthesized files and followed (bounded, loops refused) in
//! what the guest wrote.
//!
//! Spec: fatgen103, "FAT Data Structure" (entry packing: FAT12 entries
//! share bytes, a FAT32 entry's top 4 bits are reserved and kept as they
//! are; entries 0 and 1 hold the media byte and an end-of-chain mark;
//! 0 is free, 0x?FF7 bad, 0x?FF8 and up end a chain).

use super::geometry::{FatType, Geometry};

/// One copy of the FAT, as bytes (both on-disk copies read from it).
#[derive(Clone, Debug)]
pub struct Fat {
    ty: FatType,
    bytes: Vec<u8>,
}

/// Why a chain cannot be followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// A link names a free, reserved or bad cluster or one past the end.
    BadLink {
        /// The cluster holding the link.
        at: u32,
        /// What it links to.
        to: u32,
    },
    /// The chain reaches a cluster another chain (or itself) already
    /// holds.
    Shared(u32),
    /// The chain is longer than allowed.
    TooLong,
}

impl std::fmt::Display for ChainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainError::BadLink { at, to } => {
                write!(f, "cluster {at} links to {to}, not a cluster in use")
            }
            ChainError::Shared(c) => write!(f, "cluster {c} is in two chains (or loops)"),
            ChainError::TooLong => write!(f, "a chain is longer than its limit"),
        }
    }
}

impl Fat {
    /// An empty FAT of `g`: entry 0 holds the media byte, entry 1 an end
    /// of chain mark (QEMU's values).
    pub fn new(g: &Geometry) -> Fat {
        let mut f = Fat {
            ty: g.fat_type,
            bytes: vec![0; g.spf as usize * super::SECTOR as usize],
        };
        let eoc = g.fat_type.eoc();
        f.set(0, (eoc & !0xff) | u32::from(g.media()));
        f.set(1, eoc);
        f
    }

    /// A FAT read back from its bytes.
    pub fn from_bytes(ty: FatType, bytes: Vec<u8>) -> Fat {
        Fat { ty, bytes }
    }

    /// The bytes, one FAT copy.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// How many entries the bytes hold.
    pub fn entries(&self) -> u32 {
        (self.bytes.len() as u64 * 8 / u64::from(self.ty.bits())).min(u64::from(u32::MAX)) as u32
    }

    /// Entry `c`; 0 (free) past the end of the table.
    pub fn get(&self, c: u32) -> u32 {
        if c >= self.entries() {
            return 0;
        }
        let c = c as usize;
        match self.ty {
            FatType::Fat12 => {
                let o = c * 3 / 2;
                let v = u16::from_le_bytes([self.bytes[o], self.bytes[o + 1]]);
                u32::from(if c & 1 == 1 { v >> 4 } else { v & 0xfff })
            }
            FatType::Fat16 => u32::from(u16::from_le_bytes([
                self.bytes[2 * c],
                self.bytes[2 * c + 1],
            ])),
            FatType::Fat32 => {
                let o = 4 * c;
                let b = &self.bytes[o..o + 4];
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x0fff_ffff
            }
        }
    }

    /// Set entry `c` (ignored past the end of the table).
    pub fn set(&mut self, c: u32, v: u32) {
        if c >= self.entries() {
            return;
        }
        let c = c as usize;
        match self.ty {
            FatType::Fat12 => {
                let o = c * 3 / 2;
                let old = u16::from_le_bytes([self.bytes[o], self.bytes[o + 1]]);
                let v = (v & 0xfff) as u16;
                let new = if c & 1 == 1 {
                    (old & 0x000f) | (v << 4)
                } else {
                    (old & 0xf000) | v
                };
                self.bytes[o..o + 2].copy_from_slice(&new.to_le_bytes());
            }
            FatType::Fat16 => {
                self.bytes[2 * c..2 * c + 2].copy_from_slice(&(v as u16).to_le_bytes());
            }
            FatType::Fat32 => {
                let o = 4 * c;
                let b = &self.bytes[o..o + 4];
                let old = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                let new = (old & 0xf000_0000) | (v & 0x0fff_ffff);
                self.bytes[o..o + 4].copy_from_slice(&new.to_le_bytes());
            }
        }
    }

    /// Link `count` clusters from `first` into one chain (each to the
    /// next, the last marked end of chain): how the synthesized files,
    /// laid out contiguously, are described.
    pub fn link_run(&mut self, first: u32, count: u32) {
        for c in first..first + count {
            let next = if c + 1 == first + count {
                self.ty.eoc()
            } else {
                c + 1
            };
            self.set(c, next);
        }
    }

    /// The clusters of the chain starting at `first`, at most `max` of
    /// them, each claimed in `used` (one bit per cluster number): a link
    /// outside `g`'s data clusters, to a free or bad cluster, or to a
    /// cluster already claimed fails, so hostile tables (loops, shared
    /// tails) end here and the walk is bounded by the cluster count.
    pub fn chain(
        &self,
        g: &Geometry,
        first: u32,
        max: usize,
        used: &mut ClusterSet,
    ) -> Result<Vec<u32>, ChainError> {
        let mut out = Vec::new();
        let mut c = first;
        loop {
            if !g.valid_cluster(c) {
                let at = out.last().copied().unwrap_or(0);
                return Err(ChainError::BadLink { at, to: c });
            }
            if !used.insert(c) {
                return Err(ChainError::Shared(c));
            }
            if out.len() >= max {
                return Err(ChainError::TooLong);
            }
            out.push(c);
            let next = self.get(c);
            if self.ty.is_eoc(next) {
                return Ok(out);
            }
            if next == 0 || !g.valid_cluster(next) {
                return Err(ChainError::BadLink { at: c, to: next });
            }
            c = next;
        }
    }
}

/// A set of cluster numbers (one bit each).
#[derive(Clone, Debug)]
pub struct ClusterSet {
    bits: Vec<u64>,
}

impl ClusterSet {
    /// Room for clusters `0..n`.
    pub fn new(n: u32) -> ClusterSet {
        ClusterSet {
            bits: vec![0; (n as usize).div_ceil(64)],
        }
    }
    /// Adds `c`; false if it was there (or is out of range).
    pub fn insert(&mut self, c: u32) -> bool {
        let (w, b) = (c as usize / 64, c % 64);
        match self.bits.get_mut(w) {
            Some(word) if *word & (1 << b) == 0 => {
                *word |= 1 << b;
                true
            }
            _ => false,
        }
    }
    /// Whether `c` is in the set.
    pub fn contains(&self, c: u32) -> bool {
        self.bits
            .get(c as usize / 64)
            .is_some_and(|w| w & (1 << (c % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_pack_as_the_spec_says() {
        for ty in [FatType::Fat12, FatType::Fat16, FatType::Fat32] {
            let g = Geometry::new(Some(ty), false).unwrap();
            let mut f = Fat::new(&g);
            for c in 2..200 {
                f.set(c, (c * 7 + 3) & 0xfff);
            }
            for c in 2..200 {
                assert_eq!(f.get(c), (c * 7 + 3) & 0xfff, "{ty:?} entry {c}");
            }
            assert_eq!(f.get(1), ty.eoc());
            assert_eq!(f.get(0) & 0xff, 0xf8);
            assert_eq!(f.get(u32::MAX), 0);
            f.set(u32::MAX, 5);
        }
        // FAT12: entries 2 and 3 share byte 4 (fatgen103's packing).
        let g = Geometry::new(Some(FatType::Fat12), true).unwrap();
        let mut f = Fat::new(&g);
        f.set(2, 0xabc);
        f.set(3, 0x123);
        assert_eq!(&f.bytes()[..6], &[0xf0, 0xff, 0xff, 0xbc, 0x3a, 0x12]);
        // FAT32 keeps an entry's reserved top bits.
        let g = Geometry::new(Some(FatType::Fat32), false).unwrap();
        let mut b = vec![0u8; g.spf as usize * 512];
        b[8..12].copy_from_slice(&0xf000_0005u32.to_le_bytes());
        let mut f = Fat::from_bytes(FatType::Fat32, b);
        assert_eq!(f.get(2), 5);
        f.set(2, 0x0fff_ffff);
        assert_eq!(&f.bytes()[8..12], &[0xff; 4]);
    }

    #[test]
    fn chains_are_built_and_followed() {
        let g = Geometry::new(None, false).unwrap();
        let mut f = Fat::new(&g);
        f.link_run(2, 3);
        f.link_run(5, 1);
        assert_eq!(
            (f.get(2), f.get(3), f.get(4), f.get(5)),
            (3, 4, 0xffff, 0xffff)
        );
        let mut used = ClusterSet::new(g.last_cluster() + 1);
        assert_eq!(f.chain(&g, 2, 10, &mut used), Ok(vec![2, 3, 4]));
        assert_eq!(f.chain(&g, 5, 10, &mut used), Ok(vec![5]));
        // The same clusters again: shared.
        assert_eq!(f.chain(&g, 3, 10, &mut used), Err(ChainError::Shared(3)));
        // A loop.
        f.set(10, 11);
        f.set(11, 10);
        assert_eq!(f.chain(&g, 10, 10, &mut used), Err(ChainError::Shared(10)));
        // A link to a free cluster, to cluster 1, past the end.
        f.set(20, 21);
        let bad = |to| Err(ChainError::BadLink { at: 20, to });
        let r = f.chain(&g, 20, 10, &mut used);
        assert_eq!(r, Err(ChainError::BadLink { at: 21, to: 0 }));
        f.set(20, 1);
        assert_eq!(f.chain(&g, 20, 10, &mut ClusterSet::new(100)), bad(1));
        f.set(20, g.last_cluster() + 1);
        let r = f.chain(&g, 20, 10, &mut ClusterSet::new(100));
        assert_eq!(r, bad(g.last_cluster() + 1));
        // A start that is no cluster, a chain over its limit.
        assert!(f.chain(&g, 0, 10, &mut used).is_err());
        f.link_run(30, 5);
        let r = f.chain(&g, 30, 4, &mut ClusterSet::new(g.last_cluster() + 1));
        assert_eq!(r, Err(ChainError::TooLong));
    }
}
