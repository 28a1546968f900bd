//! Conventional PCI: configuration space, the function trait, and the bus.
//!
//! Follows the PCI Local Bus Specification 3.0, chapter 6 (configuration
//! space), with configuration mechanism #1 (ports 0xcf8/0xcfc) in
//! [`host::PciHost`]. BARs are decoded dynamically: the bus resolves an access
//! by asking each function which of its enabled BARs (or other decoders, such
//! as PIIX4's PMBASE) contain the address, so no re-registration is needed
//! when firmware moves a BAR.

pub mod config;
pub mod host;
pub mod msix;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::bus::{lock, Fallback};
pub use config::{BarKind, PciConfig};

/// One PCI function (bus 0 only for now).
pub trait PciFunction: Send {
    fn config(&self) -> &PciConfig;
    fn config_mut(&mut self) -> &mut PciConfig;

    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config().read(offset, data)
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config_mut().write(offset, data)
    }

    /// Access to region `region` (a BAR index, or an id from
    /// [`PciFunction::extra_io`]) at `offset`.
    fn region_read(&mut self, _region: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn region_write(&mut self, _region: usize, _offset: u64, _data: &[u8]) {}

    /// I/O port decoders that are not BARs: `(base, len, region id)`.
    fn extra_io(&self) -> Vec<(u64, u64, usize)> {
        Vec::new()
    }
}

pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

/// Bus 0 of the PCI hierarchy, keyed by devfn (device << 3 | function).
#[derive(Default)]
pub struct PciBus {
    functions: Mutex<BTreeMap<u8, SharedFunction>>,
}

/// Which address space a BAR lookup is for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Space {
    Io,
    Mem,
}

impl PciBus {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn add(&self, device: u8, function: u8, f: SharedFunction) -> Result<(), String> {
        let devfn = (device << 3) | (function & 7);
        if device >= 32 {
            return Err(format!("PCI slot {device} out of range (0-31)"));
        }
        let mut map = lock(&self.functions);
        if map.contains_key(&devfn) {
            return Err(format!(
                "PCI address {device:02x}.{function} is already in use"
            ));
        }
        map.insert(devfn, f);
        Ok(())
    }

    pub fn get(&self, devfn: u8) -> Option<SharedFunction> {
        lock(&self.functions).get(&devfn).cloned()
    }

    /// Config access for bus 0. Absent functions read as all ones.
    pub fn config_read(&self, devfn: u8, offset: u16, data: &mut [u8]) {
        match self.get(devfn) {
            Some(f) => lock(&f).config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn config_write(&self, devfn: u8, offset: u16, data: &[u8]) {
        if let Some(f) = self.get(devfn) {
            lock(&f).config_write(offset, data)
        }
    }

    fn resolve(&self, space: Space, addr: u64, len: usize) -> Option<(SharedFunction, usize, u64)> {
        let funcs: Vec<SharedFunction> = lock(&self.functions).values().cloned().collect();
        for f in funcs {
            let hit = {
                let g = lock(&f);
                let cfg = g.config();
                let mut hit = None;
                for (i, bar) in cfg.decoded_bars() {
                    if bar.space() == space
                        && addr >= bar.base
                        && addr + len as u64 <= bar.base + bar.size
                    {
                        hit = Some((i, addr - bar.base));
                        break;
                    }
                }
                if hit.is_none() && space == Space::Io {
                    for (base, l, id) in g.extra_io() {
                        if addr >= base && addr + len as u64 <= base + l {
                            hit = Some((id, addr - base));
                            break;
                        }
                    }
                }
                hit
            };
            if let Some((region, off)) = hit {
                return Some((f, region, off));
            }
        }
        None
    }
}

/// The PCI bus as the fallback of the port-I/O or MMIO bus.
pub struct PciRegions {
    pub bus: Arc<PciBus>,
    pub space: Space,
}

impl Fallback for PciRegions {
    fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.bus.resolve(self.space, addr, data.len()) {
            Some((f, region, off)) => {
                lock(&f).region_read(region, off, data);
                true
            }
            None => false,
        }
    }
    fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.bus.resolve(self.space, addr, data.len()) {
            Some((f, region, off)) => {
                lock(&f).region_write(region, off, data);
                true
            }
            None => false,
        }
    }
}
