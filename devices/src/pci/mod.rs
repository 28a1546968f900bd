//! Conventional PCI: configuration space, the function trait, and the bus.
//!
//! Follows the PCI Local Bus Specification 3.0, chapter 6 (configuration
//! space), with configuration mechanism #1 (ports 0xcf8/0xcfc) in
//! [`host::PciHost`]. BARs are decoded dynamically, so no re-registration is
//! needed when firmware moves a BAR: the bus keeps a decode table (the
//! enabled BARs and other decoders, such as PIIX4's PMBASE, of every
//! function) that it rebuilds on the first access after something may have
//! moved a decoder: a config write through [`PciBus::config_write`] or a
//! function added. A function's decoders must therefore follow from its
//! config space as changed by config writes; code that changes them another
//! way (such as writing to a function it holds directly once it is on the
//! bus) calls [`PciBus::invalidate_decode`].

pub mod config;
pub mod host;
pub mod msi;
pub mod msix;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::bus::{lock, Fallback};
pub use config::{BarKind, PciConfig};

/// One PCI function (bus 0 only for now).
///
/// Config accesses arrive as the guest made them: 1 to 4 bytes at any
/// offset, possibly unaligned or crossing a dword; past the function's
/// config space they must read as all ones and be dropped
/// ([`PciConfig::read`] and [`PciConfig::write`] do that).
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

    /// I/O port decoders that are not BARs: `(base, len, region id)`. The
    /// bus caches them (see the module doc): they may change only through
    /// config writes.
    fn extra_io(&self) -> Vec<(u64, u64, usize)> {
        Vec::new()
    }
}

pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

/// Bus 0 of the PCI hierarchy, keyed by devfn (device << 3 | function).
#[derive(Default)]
pub struct PciBus {
    functions: Mutex<BTreeMap<u8, SharedFunction>>,
    /// Bumped after anything that may move a decoder.
    generation: AtomicU64,
    /// The decode table of some generation. Locked only to look up or
    /// swap the table, never while taking another lock.
    decode: RwLock<Arc<DecodeTable>>,
}

/// Which address space a BAR lookup is for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Space {
    Io,
    Mem,
}

/// An address range a function decodes: `base..=last` goes to `region`.
struct Decoder {
    base: u64,
    last: u64,
    region: usize,
    /// Which decoder wins where ranges overlap (a guest may program
    /// overlapping BARs): the lowest devfn, then BARs in index order, then
    /// the function's other decoders.
    rank: usize,
    /// The highest `last` of this and every decoder sorted before it, so
    /// that a lookup knows when to stop looking back for overlaps.
    reach: u64,
    function: SharedFunction,
}

/// Every function's decoders for one generation, sorted by base.
#[derive(Default)]
struct DecodeTable {
    generation: u64,
    io: Vec<Decoder>,
    mem: Vec<Decoder>,
}

impl DecodeTable {
    fn build(generation: u64, functions: &[SharedFunction]) -> Self {
        let mut t = DecodeTable {
            generation,
            ..Default::default()
        };
        let mut rank = 0;
        for f in functions {
            let g = lock(f);
            let mut push = |space: Space, base: u64, len: u64, region: usize| {
                if len == 0 {
                    return;
                }
                let d = Decoder {
                    base,
                    last: base.saturating_add(len - 1),
                    region,
                    rank,
                    reach: 0,
                    function: f.clone(),
                };
                rank += 1;
                match space {
                    Space::Io => t.io.push(d),
                    Space::Mem => t.mem.push(d),
                }
            };
            for (i, bar) in g.config().decoded_bars() {
                push(bar.space(), bar.base, bar.size, i);
            }
            for (base, len, id) in g.extra_io() {
                push(Space::Io, base, len, id);
            }
        }
        for v in [&mut t.io, &mut t.mem] {
            v.sort_by_key(|d| (d.base, d.rank));
            let mut reach = 0;
            for d in v.iter_mut() {
                reach = reach.max(d.last);
                d.reach = reach;
            }
        }
        t
    }

    /// The decoder that holds all of `addr..=last`.
    fn find(&self, space: Space, addr: u64, last: u64) -> Option<&Decoder> {
        let v = match space {
            Space::Io => &self.io,
            Space::Mem => &self.mem,
        };
        // Decoders starting at or below `addr`, looked at from the
        // nearest back while one of them could still reach `addr`.
        let n = v.partition_point(|d| d.base <= addr);
        v[..n]
            .iter()
            .rev()
            .take_while(|d| d.reach >= addr)
            .filter(|d| d.last >= last)
            .min_by_key(|d| d.rank)
    }
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
        self.invalidate_decode();
        Ok(())
    }

    /// Removes the function at `devfn` (hot-unplug); the caller drops it.
    pub fn remove(&self, devfn: u8) -> Option<SharedFunction> {
        let f = lock(&self.functions).remove(&devfn);
        self.invalidate_decode();
        // The cached table holds the function too: rebuild it now, so the
        // function is gone when the caller drops it (an accessor racing
        // here holds it only for the access).
        let _ = self.decode_table();
        f
    }

    /// The function at `devfn`. Changing its decoders other than through
    /// [`Self::config_write`] must be followed by
    /// [`Self::invalidate_decode`].
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

    /// Config write for bus 0; it may move BARs (or a function's other
    /// decoders), so the decode table is rebuilt before the next access.
    pub fn config_write(&self, devfn: u8, offset: u16, data: &[u8]) {
        if let Some(f) = self.get(devfn) {
            let mut g = lock(&f);
            g.config_write(offset, data);
            // Still under the function's lock: a rebuild that sees the new
            // generation also sees this write.
            self.invalidate_decode();
        }
    }

    /// Makes the next access rebuild the decode table.
    pub fn invalidate_decode(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The decode table of the current generation (or a newer one).
    fn decode_table(&self) -> Arc<DecodeTable> {
        let generation = self.generation.load(Ordering::Acquire);
        {
            let t = self.decode.read().unwrap_or_else(|e| e.into_inner());
            if t.generation == generation {
                return t.clone();
            }
        }
        // Built without the table's lock: each function is locked in turn,
        // as an access would, and vCPUs racing here build the same table.
        let functions: Vec<SharedFunction> = lock(&self.functions).values().cloned().collect();
        let t = Arc::new(DecodeTable::build(generation, &functions));
        let mut cur = self.decode.write().unwrap_or_else(|e| e.into_inner());
        if cur.generation < generation {
            *cur = t.clone();
        }
        t
    }

    /// The function, region and offset an access of `len` bytes at `addr`
    /// goes to.
    fn resolve(&self, space: Space, addr: u64, len: usize) -> Option<(SharedFunction, usize, u64)> {
        let last = addr.checked_add((len as u64).max(1) - 1)?;
        let t = self.decode_table();
        let d = t.find(space, addr, last)?;
        Some((d.function.clone(), d.region, addr - d.base))
    }
}

/// A PCI Express enhanced configuration access window (ECAM, PCIe base
/// specification 7.2.2): each function's 4 KiB of config space at
/// `base + (bus << 20 | devfn << 12 | register)`. The host bridge that
/// owns it moves and sizes it ([`Ecam::set`]); only bus 0 exists here, the
/// other buses read as all ones.
#[derive(Default)]
pub struct Ecam {
    /// `(base, len)` while the window is enabled.
    window: Mutex<Option<(u64, u64)>>,
}

impl Ecam {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn set(&self, window: Option<(u64, u64)>) {
        *lock(&self.window) = window;
    }

    pub fn window(&self) -> Option<(u64, u64)> {
        *lock(&self.window)
    }

    /// The (bus, devfn, register) of an access of `len` bytes at `addr`,
    /// if the window holds it and it stays within one function's space.
    fn target(&self, addr: u64, len: usize) -> Option<(u8, u8, u16)> {
        let (base, size) = self.window()?;
        let off = addr.checked_sub(base).filter(|&o| o < size)?;
        let reg = (off & 0xfff) as u16;
        (reg as usize + len <= 0x1000).then_some(((off >> 20) as u8, (off >> 12) as u8, reg))
    }

    fn read(&self, bus: &PciBus, addr: u64, data: &mut [u8]) -> bool {
        match self.target(addr, data.len()) {
            Some((0, devfn, reg)) => bus.config_read(devfn, reg, data),
            Some(_) => data.fill(0xff),
            None => return false,
        }
        true
    }

    fn write(&self, bus: &PciBus, addr: u64, data: &[u8]) -> bool {
        match self.target(addr, data.len()) {
            Some((0, devfn, reg)) => bus.config_write(devfn, reg, data),
            Some(_) => {}
            None => return false,
        }
        true
    }
}

/// The PCI bus as the fallback of the port-I/O or MMIO bus: BARs and other
/// decoders, and on the MMIO side the ECAM window of a PCIe host bridge.
pub struct PciRegions {
    pub bus: Arc<PciBus>,
    pub space: Space,
    pub ecam: Option<Arc<Ecam>>,
}

impl Fallback for PciRegions {
    fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        if let Some(e) = &self.ecam {
            if e.read(&self.bus, addr, data) {
                return true;
            }
        }
        match self.bus.resolve(self.space, addr, data.len()) {
            Some((f, region, off)) => {
                lock(&f).region_read(region, off, data);
                true
            }
            None => false,
        }
    }
    fn write(&self, addr: u64, data: &[u8]) -> bool {
        if let Some(e) = &self.ecam {
            if e.write(&self.bus, addr, data) {
                return true;
            }
        }
        match self.bus.resolve(self.space, addr, data.len()) {
            Some((f, region, off)) => {
                lock(&f).region_write(region, off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::config::{BAR0, CMD_IO, CMD_MEM, COMMAND};
    use super::*;
    use crate::chipset::piix4_pm::{self, Piix4Pm};

    /// A function that answers region reads with its tag, the region and
    /// the offset.
    struct Fake {
        config: PciConfig,
        tag: u8,
    }

    impl PciFunction for Fake {
        fn config(&self) -> &PciConfig {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.config
        }
        fn region_read(&mut self, region: usize, offset: u64, data: &mut [u8]) {
            data.fill(0);
            data[0] = self.tag;
            data[1] = region as u8;
            data[2] = offset as u8;
        }
    }

    fn fake(tag: u8) -> Arc<Mutex<Fake>> {
        let mut config = PciConfig::new(0x1234, 0x5678, 0xff0000, 0);
        config.add_bar(0, BarKind::Io, 0x20);
        config.add_bar(1, BarKind::Mem32, 0x1000);
        config.add_bar(2, BarKind::Mem64, 0x4000);
        Arc::new(Mutex::new(Fake { config, tag }))
    }

    fn bar(bus: &PciBus, devfn: u8, i: u16, v: u32) {
        bus.config_write(devfn, BAR0 + 4 * i, &v.to_le_bytes());
    }
    fn command(bus: &PciBus, devfn: u8, v: u16) {
        bus.config_write(devfn, COMMAND, &v.to_le_bytes());
    }

    /// (tag, region, offset) of the function a 4-byte read reaches.
    fn hit(bus: &Arc<PciBus>, space: Space, addr: u64) -> Option<(u8, u8, u8)> {
        let r = PciRegions {
            bus: bus.clone(),
            space,
            ecam: None,
        };
        let mut d = [0u8; 4];
        r.read(addr, &mut d).then_some((d[0], d[1], d[2]))
    }

    #[test]
    fn bars_follow_config_writes() {
        let bus = PciBus::new();
        bus.add(3, 0, fake(3)).unwrap();
        bar(&bus, 3 << 3, 0, 0xc001);
        bar(&bus, 3 << 3, 1, 0xfebf_0000);
        bar(&bus, 3 << 3, 2, 0xfe00_0000);
        assert_eq!(hit(&bus, Space::Io, 0xc000), None, "decode is off");
        command(&bus, 3 << 3, CMD_IO | CMD_MEM);
        assert_eq!(hit(&bus, Space::Io, 0xc004), Some((3, 0, 4)));
        assert_eq!(hit(&bus, Space::Io, 0xc01c), Some((3, 0, 0x1c)));
        assert_eq!(hit(&bus, Space::Io, 0xc01e), None, "runs past the BAR");
        assert_eq!(hit(&bus, Space::Mem, 0xfebf_0010), Some((3, 1, 0x10)));
        assert_eq!(hit(&bus, Space::Mem, 0xfe00_3ffc), Some((3, 2, 0xfc)));
        assert_eq!(hit(&bus, Space::Mem, 0xc004), None, "wrong space");

        // Moved: found at the new base, not at the old one.
        bar(&bus, 3 << 3, 0, 0xd041);
        assert_eq!(hit(&bus, Space::Io, 0xc004), None);
        assert_eq!(hit(&bus, Space::Io, 0xd044), Some((3, 0, 4)));
        // The high half of a 64-bit BAR moves it too.
        bus.config_write(3 << 3, BAR0 + 12, &1u32.to_le_bytes());
        assert_eq!(hit(&bus, Space::Mem, 0xfe00_0000), None);
        assert_eq!(hit(&bus, Space::Mem, 0x1_fe00_0008), Some((3, 2, 8)));

        // COMMAND bits switch each space off and on.
        command(&bus, 3 << 3, CMD_MEM);
        assert_eq!(hit(&bus, Space::Io, 0xd044), None);
        assert_eq!(hit(&bus, Space::Mem, 0xfebf_0000), Some((3, 1, 0)));
        command(&bus, 3 << 3, 0);
        assert_eq!(hit(&bus, Space::Mem, 0xfebf_0000), None);
        command(&bus, 3 << 3, CMD_IO);
        assert_eq!(hit(&bus, Space::Io, 0xd040), Some((3, 0, 0)));

        // Sizing writes all ones; nothing overflows at the top of the space.
        command(&bus, 3 << 3, CMD_IO | CMD_MEM);
        bar(&bus, 3 << 3, 2, 0xffff_ffff);
        bus.config_write(3 << 3, BAR0 + 12, &u32::MAX.to_le_bytes());
        assert_eq!(hit(&bus, Space::Mem, u64::MAX - 3), Some((3, 2, 0xfc)));
        assert_eq!(hit(&bus, Space::Mem, u64::MAX - 2), None);
    }

    #[test]
    fn functions_added_later_and_overlapping_bars() {
        let bus = PciBus::new();
        bus.add(5, 0, fake(5)).unwrap();
        bar(&bus, 5 << 3, 0, 0xc001);
        bar(&bus, 5 << 3, 2, 0xfeb0_0000);
        command(&bus, 5 << 3, CMD_IO | CMD_MEM);
        assert_eq!(hit(&bus, Space::Io, 0xc010), Some((5, 0, 0x10)));

        // A function added after the table was built is seen.
        let f = fake(4);
        {
            let mut g = lock(&f);
            g.config_write(BAR0, &0xc001u32.to_le_bytes());
            g.config_write(BAR0 + 4, &0xfeb0_0000u32.to_le_bytes());
            g.config_write(COMMAND, &(CMD_IO | CMD_MEM).to_le_bytes());
        }
        bus.add(4, 0, f.clone()).unwrap();
        // Overlapping BARs: the lower devfn wins where both decode ...
        assert_eq!(hit(&bus, Space::Io, 0xc010), Some((4, 0, 0x10)));
        assert_eq!(hit(&bus, Space::Mem, 0xfeb0_0010), Some((4, 1, 0x10)));
        // ... and an access that only the other holds whole goes there.
        assert_eq!(hit(&bus, Space::Mem, 0xfeb0_0ffe), Some((5, 2, 0xfe)));
        assert_eq!(hit(&bus, Space::Mem, 0xfeb0_1000), Some((5, 2, 0)));

        // A change made behind the bus's back needs an invalidation.
        lock(&f).config_write(COMMAND, &0u16.to_le_bytes());
        assert_eq!(hit(&bus, Space::Io, 0xc010), Some((4, 0, 0x10)), "cached");
        bus.invalidate_decode();
        assert_eq!(hit(&bus, Space::Io, 0xc010), Some((5, 0, 0x10)));
        assert_eq!(hit(&bus, Space::Mem, 0xfeb0_0010), Some((5, 2, 0x10)));
    }

    #[test]
    fn piix4_pmbase_is_decoded_from_config() {
        let bus = PciBus::new();
        let pm = Piix4Pm::new(
            Arc::new(crate::clock::ManualClock::default()),
            Arc::new(crate::irq::NoIrq),
            Arc::new(crate::system::NoSystem),
        );
        bus.add(1, 3, Arc::new(Mutex::new(pm))).unwrap();
        let devfn = (1 << 3) | 3;
        let pm1_cnt = |bus: &Arc<PciBus>, base: u64| {
            let r = PciRegions {
                bus: bus.clone(),
                space: Space::Io,
                ecam: None,
            };
            let mut d = [0u8; 2];
            r.read(base + crate::chipset::acpi_pm::PM1_CNT, &mut d)
        };
        bus.config_write(devfn, piix4_pm::PMBASE, &0x601u32.to_le_bytes());
        assert!(!pm1_cnt(&bus, 0x600), "PMREGMISC bit 0 is clear");
        bus.config_write(devfn, piix4_pm::PMREGMISC, &[1]);
        assert!(pm1_cnt(&bus, 0x600));
        bus.config_write(devfn, piix4_pm::PMBASE, &0xb001u32.to_le_bytes());
        assert!(!pm1_cnt(&bus, 0x600));
        assert!(pm1_cnt(&bus, 0xb000));
        bus.config_write(devfn, piix4_pm::PMREGMISC, &[0]);
        assert!(!pm1_cnt(&bus, 0xb000));
    }
}
