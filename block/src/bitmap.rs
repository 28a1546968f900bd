//! Dirty bitmaps: which parts of a node were written since a point in time
//! (QEMU's `BdrvDirtyBitmap`, QMP's `block-dirty-bitmap-*`).
//!
//! A bitmap has one bit per `granularity` bytes (a power of two, 512 B to
//! 2 GiB as in QEMU). A node sets the bits of every enabled bitmap it
//! carries when a write, write-zeroes or discard *completes*, so that a job
//! which clears a bit before it copies the data sees a write that races
//! with its copy as dirty again and copies once more.
//!
//! Jobs take a bitmap for the time they use it (`busy`); QMP refuses to
//! change or remove a busy bitmap, with QEMU's wording.

use crate::error::{BlockError, BlockResult};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Smallest and largest granularity QEMU accepts.
pub const MIN_GRANULARITY: u64 = 512;
/// See [`MIN_GRANULARITY`].
pub const MAX_GRANULARITY: u64 = 1 << 31;

/// One dirty bitmap.
pub struct DirtyBitmap {
    name: String,
    granularity: u64,
    persistent: bool,
    enabled: AtomicBool,
    busy: AtomicBool,
    inner: Mutex<Bits>,
}

struct Bits {
    /// The node's size the bitmap covers.
    size: u64,
    words: Vec<u64>,
    count: u64,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("name", &self.name)
            .field("granularity", &self.granularity)
            .finish()
    }
}

impl DirtyBitmap {
    /// A clean bitmap over `size` bytes. `granularity` must be a power of
    /// two between 512 B and 2 GiB.
    pub fn new(name: &str, size: u64, granularity: u64, persistent: bool) -> BlockResult<Self> {
        if !granularity.is_power_of_two()
            || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity)
        {
            return Err(BlockError::Invalid(
                "Granularity must be power of 2 between 512 and 2147483648".into(),
            ));
        }
        let bits = size.div_ceil(granularity);
        // QEMU's bound on a stored bitmap's data; a larger one would only
        // be memory the host cannot spare.
        if bits.div_ceil(8) > 512 << 20 {
            return Err(BlockError::Invalid(format!(
                "Bitmap '{name}' would take more than 512 MiB; use a larger granularity"
            )));
        }
        Ok(DirtyBitmap {
            name: name.to_string(),
            granularity,
            persistent,
            enabled: AtomicBool::new(true),
            busy: AtomicBool::new(false),
            inner: Mutex::new(Bits {
                size,
                words: vec![0; bits.div_ceil(64) as usize],
                count: 0,
            }),
        })
    }

    /// The bitmap's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }
    /// Stored in the image (qcow2) when it is closed.
    pub fn is_persistent(&self) -> bool {
        self.persistent
    }
    /// Writes are recorded.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }
    /// `block-dirty-bitmap-enable` / `-disable`.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Release);
    }
    /// In use by a job (QMP refuses to change it).
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }
    /// Taken (true) or released by a job; false if it was already taken.
    pub fn set_busy(&self, on: bool) -> bool {
        self.busy.swap(on, Ordering::AcqRel) != on
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bits> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bit range covering `[offset, offset+len)`, clipped to the size.
    fn bit_range(&self, b: &Bits, offset: u64, len: u64) -> (u64, u64) {
        let end = offset.saturating_add(len).min(b.size);
        if offset >= end {
            return (0, 0);
        }
        (offset / self.granularity, end.div_ceil(self.granularity))
    }

    /// Mark `[offset, offset+len)` dirty (whole granules).
    pub fn set_range(&self, offset: u64, len: u64) {
        let mut b = self.lock();
        let (a, e) = self.bit_range(&b, offset, len);
        for i in a..e {
            let (w, m) = ((i / 64) as usize, 1u64 << (i % 64));
            if b.words[w] & m == 0 {
                b.words[w] |= m;
                b.count += 1;
            }
        }
    }

    /// Mark the granules inside `[offset, offset+len)` clean.
    pub fn clear_range(&self, offset: u64, len: u64) {
        let mut b = self.lock();
        let (a, e) = self.bit_range(&b, offset, len);
        for i in a..e {
            let (w, m) = ((i / 64) as usize, 1u64 << (i % 64));
            if b.words[w] & m != 0 {
                b.words[w] &= !m;
                b.count -= 1;
            }
        }
    }

    /// Clear everything (`block-dirty-bitmap-clear`).
    pub fn clear(&self) {
        let mut b = self.lock();
        b.words.iter_mut().for_each(|w| *w = 0);
        b.count = 0;
    }

    /// Mark everything dirty (a full copy's starting point).
    pub fn set_all(&self) {
        let size = self.lock().size;
        self.set_range(0, size);
    }

    /// True if any granule touching `[offset, offset+len)` is dirty.
    pub fn is_dirty(&self, offset: u64, len: u64) -> bool {
        let b = self.lock();
        let (a, e) = self.bit_range(&b, offset, len);
        (a..e).any(|i| b.words[(i / 64) as usize] & (1 << (i % 64)) != 0)
    }

    /// The first dirty byte offset at or after `from` (granule aligned),
    /// with the length of the dirty run from there, at most `max`.
    pub fn next_dirty(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let b = self.lock();
        let nbits = b.size.div_ceil(self.granularity);
        let mut i = from / self.granularity;
        while i < nbits {
            let w = b.words[(i / 64) as usize];
            if w == 0 {
                i = (i / 64 + 1) * 64;
                continue;
            }
            if w & (1 << (i % 64)) != 0 {
                let start = i;
                let limit = max.div_ceil(self.granularity).max(1);
                let mut j = i;
                while j < nbits
                    && j - start < limit
                    && b.words[(j / 64) as usize] & (1 << (j % 64)) != 0
                {
                    j += 1;
                }
                let off = start * self.granularity;
                let end = (j * self.granularity).min(b.size);
                return Some((off, end - off));
            }
            i += 1;
        }
        None
    }

    /// Dirty bytes (granules times granularity, QMP's `count`).
    pub fn count(&self) -> u64 {
        let b = self.lock();
        (b.count * self.granularity).min(b.size.div_ceil(self.granularity) * self.granularity)
    }

    /// The size covered.
    pub fn size(&self) -> u64 {
        self.lock().size
    }

    /// Follow a resize of the node: new granules start clean.
    pub fn resize(&self, size: u64) {
        let mut b = self.lock();
        let bits = size.div_ceil(self.granularity);
        b.words.resize(bits.div_ceil(64) as usize, 0);
        // Drop bits past the new end.
        let tail = bits % 64;
        if tail != 0 {
            if let Some(w) = b.words.last_mut() {
                *w &= (1u64 << tail) - 1;
            }
        }
        b.size = size;
        b.count = b.words.iter().map(|w| w.count_ones() as u64).sum();
    }

    /// Add the bits of `other` (`block-dirty-bitmap-merge`). Both must
    /// have the same granularity and size.
    pub fn merge(&self, other: &DirtyBitmap) -> BlockResult<()> {
        if std::ptr::eq(self, other) {
            return Ok(());
        }
        let src = other.lock().words.clone();
        let mut b = self.lock();
        if other.granularity != self.granularity || src.len() != b.words.len() {
            return Err(BlockError::Invalid(format!(
                "Bitmap '{}' is incompatible with bitmap '{}'",
                other.name, self.name
            )));
        }
        for (w, s) in b.words.iter_mut().zip(src) {
            *w |= s;
        }
        b.count = b.words.iter().map(|w| w.count_ones() as u64).sum();
        Ok(())
    }

    /// A copy of the bits under another name (a job's private copy).
    pub fn copy_as(&self, name: &str) -> DirtyBitmap {
        let b = self.lock();
        DirtyBitmap {
            name: name.to_string(),
            granularity: self.granularity,
            persistent: false,
            enabled: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            inner: Mutex::new(Bits {
                size: b.size,
                words: b.words.clone(),
                count: b.count,
            }),
        }
    }

    /// The raw words, one bit per granule from bit 0 of word 0 (for
    /// storing a persistent bitmap).
    pub fn words(&self) -> Vec<u64> {
        self.lock().words.clone()
    }

    /// Replace the bits (a persistent bitmap loaded from the image).
    pub fn set_words(&self, words: &[u64]) {
        let mut b = self.lock();
        for (i, w) in b.words.iter_mut().enumerate() {
            *w = words.get(i).copied().unwrap_or(0);
        }
        b.count = b.words.iter().map(|w| w.count_ones() as u64).sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_and_walk() {
        let b = DirtyBitmap::new("b", 1 << 20, 65536, false).unwrap();
        assert_eq!(b.next_dirty(0, u64::MAX), None);
        b.set_range(70000, 10);
        b.set_range(65536 * 3, 65536 * 2);
        assert_eq!(b.count(), 3 * 65536);
        assert_eq!(b.next_dirty(0, u64::MAX), Some((65536, 65536)));
        assert_eq!(b.next_dirty(131072, u64::MAX), Some((196608, 131072)));
        assert_eq!(b.next_dirty(196608, 65536), Some((196608, 65536)));
        b.clear_range(65536, 65536);
        assert!(!b.is_dirty(65536, 1));
        assert!(b.is_dirty(200000, 1));
        let c = DirtyBitmap::new("c", 1 << 20, 65536, false).unwrap();
        c.merge(&b).unwrap();
        assert_eq!(c.count(), 2 * 65536);
        b.clear();
        assert_eq!(b.count(), 0);
        assert!(DirtyBitmap::new("x", 1 << 20, 1000, false).is_err());
    }

    #[test]
    fn partial_last_granule_and_resize() {
        let b = DirtyBitmap::new("b", 100_000, 65536, false).unwrap();
        b.set_range(99_999, 100);
        assert_eq!(b.next_dirty(0, u64::MAX), Some((65536, 100_000 - 65536)));
        b.resize(65536);
        assert_eq!(b.count(), 0);
        b.resize(1 << 20);
        b.set_all();
        assert_eq!(b.count(), 1 << 20);
    }
}
