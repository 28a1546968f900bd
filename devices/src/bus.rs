//! Address-range dispatch for port I/O and MMIO.
//!
//! A [`Bus`] maps non-overlapping address ranges to devices. Accesses that hit
//! no fixed range fall through to an optional dynamic resolver (the PCI bus,
//! whose BARs move when the guest programs them). Unclaimed reads float high
//! (all ones), as on a real ISA/PCI bus, and unclaimed writes are dropped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a [`Bus`]. `offset` is relative to the start of
/// the range the device was registered at; `data.len()` is 1, 2, 4 or 8.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Resolves accesses that no fixed range claims. Returns `true` if handled.
pub trait Fallback: Send + Sync {
    fn read(&self, addr: u64, data: &mut [u8]) -> bool;
    fn write(&self, addr: u64, data: &[u8]) -> bool;
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
pub struct OverlapError {
    pub base: u64,
    pub len: u64,
}

#[derive(Default)]
pub struct Bus {
    /// Keyed by range start; value is (length, device).
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
    fallback: Option<Arc<dyn Fallback>>,
    /// What an address nobody claims reads as (see [`Bus::memory`]).
    unclaimed: u8,
}

impl Bus {
    /// A port I/O bus: unclaimed ports read as all ones, as on a PC
    /// (and QEMU's unassigned I/O).
    pub fn new() -> Self {
        Bus {
            unclaimed: 0xff,
            ..Default::default()
        }
    }

    /// A memory bus: unclaimed addresses read as zeroes, as QEMU's
    /// unassigned memory does (libqos reads past a BAR and expects 0).
    pub fn memory() -> Self {
        Bus {
            unclaimed: 0,
            ..Default::default()
        }
    }

    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), OverlapError> {
        let end = base.checked_add(len).ok_or(OverlapError { base, len })?;
        if len == 0 {
            return Err(OverlapError { base, len });
        }
        if let Some((&b, &(l, _))) = self.ranges.range(..end).next_back() {
            if b + l > base {
                return Err(OverlapError { base, len });
            }
        }
        self.ranges.insert(base, (len, dev));
        Ok(())
    }

    pub fn set_fallback(&mut self, fb: Arc<dyn Fallback>) {
        self.fallback = Some(fb);
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    /// Dispatches a read; returns `false` if nothing claimed the address
    /// (`data` is then filled with the bus's unclaimed byte).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        if let Some((off, dev)) = self.find(addr) {
            lock(dev).read(off, data);
            return true;
        }
        if let Some(fb) = &self.fallback {
            if fb.read(addr, data) {
                return true;
            }
        }
        data.fill(self.unclaimed);
        false
    }

    /// Dispatches a write; returns `false` if nothing claimed the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        if let Some((off, dev)) = self.find(addr) {
            lock(dev).write(off, data);
            return true;
        }
        match &self.fallback {
            Some(fb) => fb.write(addr, data),
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned mutex: a device that panicked
/// once must not take the whole machine down on the next access.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Little-endian value of an access of 1..=8 bytes.
pub fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

/// Stores the low `data.len()` bytes of `v`, little-endian.
pub fn put_le(data: &mut [u8], v: u64) {
    let n = data.len().min(8);
    data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, off: u64, d: &mut [u8]) {
            d.fill(self.0 + off as u8);
        }
        fn write(&mut self, _: u64, d: &[u8]) {
            self.0 = d[0];
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let mut bus = Bus::new();
        bus.insert(0x10, 4, Arc::new(Mutex::new(Reg(1)))).unwrap();
        assert!(bus.insert(0x12, 4, Arc::new(Mutex::new(Reg(0)))).is_err());
        assert!(bus.insert(0x0e, 4, Arc::new(Mutex::new(Reg(0)))).is_err());
        bus.insert(0x14, 1, Arc::new(Mutex::new(Reg(9)))).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(!bus.read(0x15, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x10, &[7]));
        bus.read(0x10, &mut b);
        assert_eq!(b[0], 7);
        assert!(bus
            .insert(u64::MAX, 2, Arc::new(Mutex::new(Reg(0))))
            .is_err());
    }
}
