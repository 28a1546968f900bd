//! A bounded write-back cache of metadata tables (L2 slices, refcount
//! blocks), QEMU's `Qcow2Cache`: a fixed number of entries, least recently
//! used evicted first, dirty entries written by the owner before eviction
//! (the owner knows the ordering rules: refcount blocks before the L2
//! tables that point at new clusters). `cache-clean-interval` drops, every
//! interval, the clean entries not used since the previous clean (QEMU's
//! rule); the check runs when a table is loaded, since the format layer has
//! no threads of its own.

use std::collections::HashMap;
use std::time::{Duration, Instant};

struct Slot<T> {
    data: T,
    dirty: bool,
    /// Access tick of the last use.
    used: u64,
}

/// Cache keyed by the host offset of the table.
pub struct Cache<T> {
    cap: usize,
    map: HashMap<u64, Slot<T>>,
    tick: u64,
    clean_interval: Option<Duration>,
    last_clean: Instant,
    /// The tick at the last clean: entries not used since are idle.
    clean_tick: u64,
}

impl<T> Cache<T> {
    /// A cache of at most `cap` entries (at least 2).
    pub fn new(cap: usize, clean_interval: Option<Duration>) -> Self {
        Cache {
            cap: cap.max(2),
            map: HashMap::new(),
            tick: 0,
            clean_interval,
            last_clean: Instant::now(),
            clean_tick: 0,
        }
    }
    /// Capacity in entries.
    pub fn capacity(&self) -> usize {
        self.cap
    }
    /// Entries present.
    pub fn len(&self) -> usize {
        self.map.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// True when an insert needs an eviction first.
    pub fn is_full(&self) -> bool {
        self.map.len() >= self.cap
    }
    /// True if `key` is cached.
    pub fn contains(&self, key: u64) -> bool {
        self.map.contains_key(&key)
    }
    fn touch(&mut self, key: u64) -> Option<&mut Slot<T>> {
        self.tick += 1;
        let t = self.tick;
        let s = self.map.get_mut(&key)?;
        s.used = t;
        Some(s)
    }
    /// Read access.
    pub fn get(&mut self, key: u64) -> Option<&T> {
        self.touch(key).map(|s| &s.data)
    }
    /// Write access: marks the entry dirty.
    pub fn get_mut(&mut self, key: u64) -> Option<&mut T> {
        self.touch(key).map(|s| {
            s.dirty = true;
            &mut s.data
        })
    }
    /// Insert (the caller made room).
    pub fn insert(&mut self, key: u64, data: T, dirty: bool) {
        self.tick += 1;
        self.map.insert(
            key,
            Slot {
                data,
                dirty,
                used: self.tick,
            },
        );
    }
    /// The least recently used key.
    pub fn victim(&self) -> Option<u64> {
        self.map.iter().min_by_key(|(_, s)| s.used).map(|(k, _)| *k)
    }
    /// Remove an entry, returning it and whether it was dirty.
    pub fn remove(&mut self, key: u64) -> Option<(T, bool)> {
        self.map.remove(&key).map(|s| (s.data, s.dirty))
    }
    /// Is `key` dirty?
    pub fn is_dirty(&self, key: u64) -> bool {
        self.map.get(&key).is_some_and(|s| s.dirty)
    }
    /// Peek without touching.
    pub fn peek(&self, key: u64) -> Option<&T> {
        self.map.get(&key).map(|s| &s.data)
    }
    /// Dirty keys, in offset order (sequential writes).
    pub fn dirty_keys(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }
    /// Mark written.
    pub fn mark_clean(&mut self, key: u64) {
        if let Some(s) = self.map.get_mut(&key) {
            s.dirty = false;
        }
    }
    /// All keys.
    pub fn keys(&self) -> Vec<u64> {
        self.map.keys().copied().collect()
    }
    /// Drop every clean entry (after the metadata changed under us).
    pub fn drop_clean(&mut self) {
        self.map.retain(|_, s| s.dirty);
    }
    /// `cache-clean-interval`: drop clean entries idle for the interval.
    pub fn maybe_clean(&mut self) {
        let Some(iv) = self.clean_interval else {
            return;
        };
        let now = Instant::now();
        if now.duration_since(self.last_clean) < iv {
            return;
        }
        self.last_clean = now;
        let idle = self.clean_tick;
        self.map.retain(|_, s| s.dirty || s.used > idle);
        self.clean_tick = self.tick;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_and_dirty() {
        let mut c: Cache<u32> = Cache::new(2, None);
        c.insert(1, 10, false);
        c.insert(2, 20, false);
        assert!(c.is_full());
        c.get(1);
        assert_eq!(c.victim(), Some(2));
        *c.get_mut(2).unwrap() = 21;
        assert_eq!(c.dirty_keys(), vec![2]);
        c.mark_clean(2);
        assert!(c.dirty_keys().is_empty());
        assert_eq!(c.remove(2), Some((21, false)));
    }
}
