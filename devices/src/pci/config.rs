//! A type-0 PCI configuration header (PCI Local Bus Spec 3.0, section 6.1),
//! with per-byte write masks so that read-only fields stay read-only, and BAR
//! sizing (section 6.2.5.1): writing all ones reads back the size mask.
//!
//! Every function stores 4 KiB, the size of a PCI Express function's
//! configuration space (PCIe Base Spec, section 7.2.2), but a conventional
//! function only has the first 256 bytes: [`PciConfig::size`] is 256 until
//! [`PciConfig::set_extended`] is called. Guest accesses past the size read
//! as all ones and writes there are dropped, whatever the offset and length.

use super::Space;
use crate::bus::{le_value, put_le};

pub const VENDOR_ID: u16 = 0x00;
pub const COMMAND: u16 = 0x04;
pub const STATUS: u16 = 0x06;
pub const HEADER_TYPE: u16 = 0x0e;
pub const CAPABILITIES_PTR: u16 = 0x34;
/// Status bit 4: the function has a capability list at 0x34.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// The first byte after the type-0 header, where capabilities may start.
pub const CAP_START: u16 = 0x40;
pub const BAR0: u16 = 0x10;
pub const INTERRUPT_LINE: u16 = 0x3c;
pub const INTERRUPT_PIN: u16 = 0x3d;

/// Configuration space of a conventional PCI function.
pub const CONFIG_SPACE_SIZE: u16 = 256;
/// Configuration space of a PCI Express function (and what is stored).
pub const EXT_CONFIG_SPACE_SIZE: u16 = 4096;

pub const CMD_IO: u16 = 1 << 0;
pub const CMD_MEM: u16 = 1 << 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32,
    Mem64,
}

#[derive(Clone, Copy, Debug)]
pub struct Bar {
    pub kind: BarKind,
    pub size: u64,
    pub base: u64,
}

impl Bar {
    pub fn space(&self) -> Space {
        match self.kind {
            BarKind::Io => Space::Io,
            _ => Space::Mem,
        }
    }
}

pub struct PciConfig {
    bytes: [u8; EXT_CONFIG_SPACE_SIZE as usize],
    wmask: [u8; EXT_CONFIG_SPACE_SIZE as usize],
    /// What the guest can reach: 256 or 4096 bytes.
    size: u16,
    bars: [Option<(BarKind, u64)>; 6],
    /// Where the next capability goes, and the last one added (to link it).
    next_cap: u16,
    last_cap: Option<u16>,
}

impl PciConfig {
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8) -> Self {
        let mut c = PciConfig {
            bytes: [0; EXT_CONFIG_SPACE_SIZE as usize],
            wmask: [0; EXT_CONFIG_SPACE_SIZE as usize],
            size: CONFIG_SPACE_SIZE,
            bars: [None; 6],
            next_cap: CAP_START,
            last_cap: None,
        };
        c.set_u16(VENDOR_ID, vendor);
        c.set_u16(0x02, device);
        c.bytes[0x08] = revision;
        c.bytes[0x09] = class as u8;
        c.bytes[0x0a] = (class >> 8) as u8;
        c.bytes[0x0b] = (class >> 16) as u8;
        // Command: I/O, memory, bus master, parity, SERR, INTx disable.
        c.set_wmask16(COMMAND, 0x0547);
        c.wmask[0x0c] = 0xff; // cache line size
        c.wmask[0x0d] = 0xff; // latency timer
        c.wmask[INTERRUPT_LINE as usize] = 0xff;
        c
    }

    /// Gives the function the 4 KiB configuration space of a PCI Express
    /// function; bytes 0x100 up read as 0 (no extended capabilities) until
    /// something is put there.
    pub fn set_extended(&mut self) {
        self.size = EXT_CONFIG_SPACE_SIZE;
    }

    /// How many bytes of configuration space the guest can reach.
    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn set_multifunction(&mut self) {
        self.bytes[HEADER_TYPE as usize] |= 0x80;
    }

    pub fn set_subsystem(&mut self, vendor: u16, id: u16) {
        self.set_u16(0x2c, vendor);
        self.set_u16(0x2e, id);
    }

    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.bytes[INTERRUPT_PIN as usize] = pin;
    }

    /// Declares BAR `i` with a power-of-two `size` (at least 4 for I/O, 16
    /// for memory). A 64-bit BAR also occupies `i + 1`.
    pub fn add_bar(&mut self, i: usize, kind: BarKind, size: u64) {
        assert!(size.is_power_of_two() && i < 6);
        self.bars[i] = Some((kind, size));
        let off = BAR0 + 4 * i as u16;
        let (flags, mask) = match kind {
            BarKind::Io => (1u64, !(size - 1) & 0xffff_fffc),
            BarKind::Mem32 => (0, !(size - 1) & 0xffff_fff0),
            BarKind::Mem64 => (4, !(size - 1) & 0xffff_ffff_ffff_fff0),
        };
        self.set_u32(off, flags as u32);
        self.set_wmask32(off, mask as u32);
        if kind == BarKind::Mem64 {
            self.set_wmask32(off + 4, (mask >> 32) as u32);
        }
    }

    /// Appends a capability (PCI 3.0, section 6.7) to the list: `body` is
    /// the capability without its ID and next-pointer bytes. Returns its
    /// offset. Capabilities are read-only unless [`Self::set_writable`]
    /// says otherwise. Panics if the list overflows config space, which
    /// only a programming error can cause.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> u16 {
        let off = self.next_cap;
        let len = 2 + body.len() as u16;
        // The list's 8-bit pointers reach only the first 256 bytes.
        assert!(
            off + len <= CONFIG_SPACE_SIZE,
            "PCI capability list overflows config space"
        );
        self.bytes[off as usize] = id;
        self.bytes[off as usize + 1] = 0;
        self.bytes[off as usize + 2..(off + len) as usize].copy_from_slice(body);
        match self.last_cap {
            Some(prev) => self.bytes[prev as usize + 1] = off as u8,
            None => self.bytes[CAPABILITIES_PTR as usize] = off as u8,
        }
        let st = self.u16(STATUS) | STATUS_CAP_LIST;
        self.set_u16(STATUS, st);
        self.last_cap = Some(off);
        // Keep capabilities dword-aligned, as the spec requires.
        self.next_cap = (off + len + 3) & !3;
        off
    }

    /// Makes the next [`Self::add_capability`] place its capability at
    /// `offset` (a device whose datasheet fixes where it is); it must not
    /// go back over the capabilities already added.
    pub fn next_capability_at(&mut self, offset: u16) {
        assert!(offset >= self.next_cap && offset.is_multiple_of(4));
        self.next_cap = offset;
    }

    /// Sets the write mask of `len` bytes at `offset` to `mask`. These and
    /// the `set_*` helpers below are for the device model and panic past
    /// 4 KiB, which only a programming error can cause.
    pub fn set_wmask(&mut self, offset: u16, mask: &[u8]) {
        for (i, &m) in mask.iter().enumerate() {
            self.wmask[offset as usize + i] = m;
        }
    }

    /// Makes `len` bytes at `offset` guest-writable (device-specific registers).
    pub fn set_writable(&mut self, offset: u16, len: u16) {
        for o in offset..offset + len {
            self.wmask[o as usize] = 0xff;
        }
    }

    /// A guest read: bytes past [`Self::size`] read as 0xff.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        let size = self.size as usize;
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset as usize + i;
            *b = if o < size { self.bytes[o] } else { 0xff };
        }
    }

    /// A guest write through the write masks: bytes past [`Self::size`]
    /// are dropped.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        let size = self.size as usize;
        for (i, &v) in data.iter().enumerate() {
            let o = offset as usize + i;
            if o < size {
                let m = self.wmask[o];
                self.bytes[o] = (self.bytes[o] & !m) | (v & m);
            }
        }
    }

    /// The base a BAR is programmed with (0 when unprogrammed), whether or
    /// not decoding is enabled.
    pub fn bar_base(&self, i: usize) -> Option<Bar> {
        let (kind, size) = (*self.bars.get(i)?)?;
        let off = BAR0 + 4 * i as u16;
        let base = match kind {
            BarKind::Io => (self.u32(off) & !3) as u64 & 0xffff,
            BarKind::Mem32 => (self.u32(off) & !0xf) as u64,
            BarKind::Mem64 => (self.u32(off) & !0xf) as u64 | ((self.u32(off + 4) as u64) << 32),
        };
        Some(Bar { kind, size, base })
    }

    /// The stored bytes at `o` (for the device model, whatever
    /// [`Self::size`] says); bytes past the 4 KiB read as 0xff.
    fn stored(&self, o: u16, len: usize) -> u64 {
        let mut b = [0xffu8; 4];
        for (i, v) in b[..len].iter_mut().enumerate() {
            if let Some(&x) = self.bytes.get(o as usize + i) {
                *v = x;
            }
        }
        le_value(&b[..len])
    }

    pub fn u8(&self, o: u16) -> u8 {
        self.stored(o, 1) as u8
    }
    pub fn u16(&self, o: u16) -> u16 {
        self.stored(o, 2) as u16
    }
    pub fn u32(&self, o: u16) -> u32 {
        self.stored(o, 4) as u32
    }
    pub fn set_u8(&mut self, o: u16, v: u8) {
        self.bytes[o as usize] = v;
    }
    pub fn set_u16(&mut self, o: u16, v: u16) {
        put_le(&mut self.bytes[o as usize..o as usize + 2], v as u64);
    }
    pub fn set_u32(&mut self, o: u16, v: u32) {
        put_le(&mut self.bytes[o as usize..o as usize + 4], v as u64);
    }
    fn set_wmask16(&mut self, o: u16, v: u16) {
        put_le(&mut self.wmask[o as usize..o as usize + 2], v as u64);
    }
    fn set_wmask32(&mut self, o: u16, v: u32) {
        put_le(&mut self.wmask[o as usize..o as usize + 4], v as u64);
    }

    pub fn command(&self) -> u16 {
        self.u16(COMMAND)
    }

    /// The guest-reachable bytes ([`Self::size`] of them), as the
    /// migration stream carries a function's config space.
    pub fn save_bytes(&self) -> Vec<u8> {
        self.bytes[..self.size as usize].to_vec()
    }

    /// Takes over `b` from [`Self::save_bytes`] of the same function on
    /// the source. The destination's function is built from the same
    /// command line, so every bit the guest cannot write (identity,
    /// capability layout, BAR types) must already be what `b` says: a
    /// difference means another device or another build, and is refused
    /// ("Bad config data", as QEMU says) with nothing changed. The caller
    /// re-derives what follows from config space (BAR decode: the bus's
    /// `PciBus::invalidate_decode`; the device's own post-load).
    pub fn load_bytes(&mut self, b: &[u8]) -> Result<(), String> {
        if b.len() != self.size as usize {
            return Err(format!(
                "Bad config data: {} bytes, this function has {}",
                b.len(),
                self.size
            ));
        }
        for (i, (&new, &own)) in b.iter().zip(self.bytes.iter()).enumerate() {
            let fixed = !self.wmask[i];
            if (new ^ own) & fixed != 0 {
                return Err(format!(
                    "Bad config data: byte {i:#x} is {new:#x} in the stream and {own:#x} \
                     here, where bits {fixed:#x} are read-only"
                ));
            }
        }
        self.bytes[..b.len()].copy_from_slice(b);
        Ok(())
    }

    /// BARs whose space is enabled in the command register and whose base is
    /// programmed (non-zero), as `(index, bar)`.
    pub fn decoded_bars(&self) -> impl Iterator<Item = (usize, Bar)> + '_ {
        let cmd = self.command();
        self.bars.iter().enumerate().filter_map(move |(i, b)| {
            let (kind, size) = (*b)?;
            let off = BAR0 + 4 * i as u16;
            let (base, enabled) = match kind {
                BarKind::Io => ((self.u32(off) & !3) as u64 & 0xffff, cmd & CMD_IO != 0),
                BarKind::Mem32 => ((self.u32(off) & !0xf) as u64, cmd & CMD_MEM != 0),
                BarKind::Mem64 => (
                    (self.u32(off) & !0xf) as u64 | ((self.u32(off + 4) as u64) << 32),
                    cmd & CMD_MEM != 0,
                ),
            };
            (enabled && base != 0).then_some((i, Bar { kind, size, base }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_fields_and_bar_sizing() {
        let mut c = PciConfig::new(0x8086, 0x7010, 0x010180, 0);
        c.add_bar(4, BarKind::Io, 16);
        c.write(0, &[0, 0, 0, 0]);
        assert_eq!(c.u32(0), 0x7010_8086);
        c.write(0x20, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.u32(0x20), 0xffff_fff1);
        c.write(0x20, &0xc001u32.to_le_bytes());
        assert_eq!(c.decoded_bars().count(), 0, "I/O decode is off");
        c.write(COMMAND, &[1, 0]);
        let (i, bar) = c.decoded_bars().next().unwrap();
        assert_eq!((i, bar.base, bar.size), (4, 0xc000, 16));
        let mut d = [0u8; 4];
        c.read(0xfe, &mut d);
        assert_eq!(d, [0, 0, 0xff, 0xff]);
    }

    #[test]
    fn conventional_and_extended_bounds() {
        let mut c = PciConfig::new(0x8086, 0x7010, 0x010180, 0);
        assert_eq!(c.size(), CONFIG_SPACE_SIZE);
        // Past 256 bytes a conventional function reads as all ones and
        // ignores writes, at any offset and length.
        for off in [0xfd, 0xff, 0x100, 0x7ff, 0xffe, 0xfff, 0x1000, u16::MAX] {
            let mut d = [0u8; 4];
            c.read(off, &mut d);
            let inside = (CONFIG_SPACE_SIZE.saturating_sub(off) as usize).min(4);
            assert!(d[inside..].iter().all(|&b| b == 0xff), "{off:#x}: {d:?}");
            c.write(off, &[0xaa; 4]);
        }
        c.write(u16::MAX, &[0; 64]);
        c.read(u16::MAX, &mut [0; 64]);

        c.set_extended();
        assert_eq!(c.size(), EXT_CONFIG_SPACE_SIZE);
        let mut d = [0u8; 4];
        c.read(0x100, &mut d);
        assert_eq!(d, [0; 4], "no extended capabilities");
        c.read(0xffe, &mut d);
        assert_eq!(d, [0, 0, 0xff, 0xff]);
        // Extended registers are read-only unless made writable.
        c.write(0x100, &[1, 2, 3, 4]);
        assert_eq!(c.u32(0x100), 0);
        c.set_writable(0xffc, 4);
        c.write(0xffe, &[1, 2, 3, 4]);
        assert_eq!(c.u32(0xffc), 0x0201_0000);
        assert_eq!(
            c.u32(0xffe),
            0xffff_0201,
            "the model's accessors stop at 4 KiB too"
        );
    }

    #[test]
    fn config_bytes_move_and_read_only_bits_must_match() {
        let mk = || {
            let mut c = PciConfig::new(0x8086, 0x2922, 0x010601, 2);
            c.add_bar(5, BarKind::Mem32, 0x1000);
            c
        };
        let mut a = mk();
        a.write(BAR0 + 20, &0xfebf_1000u32.to_le_bytes());
        a.write(COMMAND, &(CMD_MEM).to_le_bytes());
        a.write(INTERRUPT_LINE, &[10]);
        let saved = a.save_bytes();
        assert_eq!(saved.len(), CONFIG_SPACE_SIZE as usize);
        let mut b = mk();
        b.load_bytes(&saved).unwrap();
        assert_eq!(b.save_bytes(), saved);
        assert_eq!(b.decoded_bars().next().unwrap().1.base, 0xfebf_1000);

        // Another device ID, a BAR's type bits, a short stream: refused,
        // and nothing is changed.
        let mut bad = saved.clone();
        bad[2] ^= 1;
        let mut c = mk();
        let e = c.load_bytes(&bad).unwrap_err();
        assert!(e.starts_with("Bad config data"), "{e}");
        assert_eq!(c.u8(INTERRUPT_LINE), 0);
        let mut bad = saved.clone();
        bad[BAR0 as usize + 20] |= 1;
        assert!(c.load_bytes(&bad).is_err());
        assert!(c.load_bytes(&saved[..64]).is_err());
        c.set_extended();
        assert!(c.load_bytes(&saved).is_err(), "256 bytes for 4096");
    }

    #[test]
    fn capability_list_links_and_is_read_only() {
        let mut c = PciConfig::new(0x1af4, 0x1042, 0x010000, 1);
        let a = c.add_capability(0x09, &[1, 2, 3]);
        let b = c.add_capability(0x11, &[0; 10]);
        assert_eq!(a, CAP_START);
        assert_eq!(b, CAP_START + 8);
        assert_ne!(c.u16(STATUS) & STATUS_CAP_LIST, 0);
        assert_eq!(c.u8(CAPABILITIES_PTR) as u16, a);
        assert_eq!(c.u8(a + 1) as u16, b);
        assert_eq!(c.u8(b + 1), 0);
        c.write(a, &[0xff, 0xff, 0xff]);
        assert_eq!((c.u8(a), c.u8(a + 2)), (0x09, 1));
    }
}
