//! Guest time.
//!
//! Devices with a notion of time (RTC, PM timer) read it through [`Clock`] so
//! that the qtest accelerator can step time by hand (`clock_step`) while KVM
//! guests see the host's monotonic clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

pub trait Clock: Send + Sync {
    /// Nanoseconds since the machine was created.
    fn now_ns(&self) -> u64;
}

pub struct HostClock(Instant);

impl HostClock {
    pub fn new() -> Self {
        HostClock(Instant::now())
    }
}

impl Default for HostClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for HostClock {
    fn now_ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// A clock that only moves when told to (qtest's `clock_step`/`clock_set`).
#[derive(Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn step(&self, ns: u64) -> u64 {
        self.0.fetch_add(ns, Ordering::SeqCst).saturating_add(ns)
    }
    pub fn set(&self, ns: u64) {
        self.0.store(ns, Ordering::SeqCst)
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}
