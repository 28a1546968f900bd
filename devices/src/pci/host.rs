//! PCI configuration mechanism #1 (PCI Local Bus Spec 3.0, section 3.2.2.3.2):
//! CONFIG_ADDRESS at 0xcf8 and CONFIG_DATA at 0xcfc-0xcff, as the i440FX
//! host bridge decodes them. Register it on the port bus at 0xcf8, length 8.
//!
//! As in QEMU (and unlike the spec, where bits 1:0 of CONFIG_ADDRESS read as
//! zero), a dword write to CONFIG_ADDRESS is kept whole, and the register an
//! access to port 0xcfc+n reaches is bits 7:0 of CONFIG_ADDRESS OR-ed with
//! n. So `outl 0xcf8, 0x80000902; inw 0xcfc` reads register 2 of 00:01.1,
//! which QEMU's libqtest relies on. Bits 30:24 (and the extended register
//! number some chipsets keep in 27:24) are not decoded: mechanism #1 reaches
//! the first 256 bytes of a function. An access is passed on as it comes,
//! even when it crosses a dword (QEMU does the same; real hardware cannot
//! issue one), but never past byte 0xff: the rest of it reads as all ones
//! and is not written.
//!
//! Byte accesses to 0xcf9 are not CONFIG_ADDRESS but the PIIX3 Reset Control
//! Register (PIIX3 datasheet, "Reset Control Register"): writing bit 2 (RCPU)
//! resets the system. It lives here because it shares the decode window.

use std::sync::Arc;

use super::config::CONFIG_SPACE_SIZE;
use super::PciBus;
use crate::bus::{le_value, put_le, BusDevice};
use crate::migration::DeviceState;
use crate::system::SystemControl;
use serde::{Deserialize, Serialize};

const RCR_SRST: u8 = 1 << 1;
const RCR_RCPU: u8 = 1 << 2;
const ENABLE: u32 = 1 << 31;

pub struct PciHost {
    bus: Arc<PciBus>,
    address: u32,
    rcr: u8,
    system: Arc<dyn SystemControl>,
}

impl PciHost {
    pub fn new(bus: Arc<PciBus>, system: Arc<dyn SystemControl>) -> Self {
        PciHost {
            bus,
            address: 0,
            rcr: 0,
            system,
        }
    }

    /// For an access of `len` bytes at CONFIG_DATA + `n`: the devfn, the
    /// register and how many of the bytes lie in the 256 that mechanism #1
    /// reaches. None if CONFIG_ADDRESS is disabled or not for bus 0, or the
    /// access runs past port 0xcff.
    fn target(&self, n: u64, len: usize) -> Option<(u8, u16, usize)> {
        let a = self.address;
        if a & ENABLE == 0 || (a >> 16) & 0xff != 0 || n + len as u64 > 4 {
            return None;
        }
        let reg = (a & 0xff) as u16 | n as u16;
        let inside = ((CONFIG_SPACE_SIZE - reg) as usize).min(len);
        Some((((a >> 8) & 0xff) as u8, reg, inside))
    }
}

impl BusDevice for PciHost {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0..=3 => {
                if offset == 0 && data.len() == 4 {
                    put_le(data, self.address as u64);
                } else if offset == 1 && data.len() == 1 {
                    data[0] = self.rcr;
                } else {
                    data.fill(0xff);
                }
            }
            _ => match self.target(offset - 4, data.len()) {
                Some((devfn, reg, inside)) => {
                    let (head, tail) = data.split_at_mut(inside);
                    self.bus.config_read(devfn, reg, head);
                    tail.fill(0xff);
                }
                None => data.fill(0xff),
            },
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => self.address = le_value(data) as u32,
            1 if data.len() == 1 => {
                self.rcr = data[0] & RCR_SRST;
                if data[0] & RCR_RCPU != 0 {
                    self.system.request_reset();
                }
            }
            // Other partial writes to CONFIG_ADDRESS are ignored.
            0..=3 => {}
            _ => {
                if let Some((devfn, reg, inside)) = self.target(offset - 4, data.len()) {
                    self.bus.config_write(devfn, reg, &data[..inside]);
                }
            }
        }
    }
}

/// CONFIG_ADDRESS and the reset control register: what the guest last
/// wrote (a libqtest client may sit between writing CONFIG_ADDRESS and
/// reading CONFIG_DATA when the migration happens).
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PciHostState {
    pub address: u32,
    pub rcr: u8,
}

impl DeviceState for PciHost {
    const VERSION: u32 = 1;
    type State = PciHostState;
    fn save_state(&self) -> PciHostState {
        PciHostState {
            address: self.address,
            rcr: self.rcr,
        }
    }
    fn load_state(&mut self, s: PciHostState, _version: u32) -> Result<(), String> {
        if s.rcr & !RCR_SRST != 0 {
            return Err(format!(
                "PCI host: reset control {:#x} has bits that never stay set",
                s.rcr
            ));
        }
        self.address = s.address;
        self.rcr = s.rcr;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chipset::i440fx::I440fx;
    use crate::ide::PiixIde;
    use crate::irq::NoIrq;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Resets(AtomicUsize);
    impl SystemControl for Resets {
        fn request_reset(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn request_shutdown(&self) {}
    }

    fn host() -> (PciHost, Arc<Resets>) {
        let bus = PciBus::new();
        bus.add(0, 0, Arc::new(Mutex::new(I440fx::new()))).unwrap();
        let ide = PiixIde::new(crate::GuestMem::default(), Arc::new(NoIrq), Arc::new(NoIrq));
        bus.add(1, 1, Arc::new(Mutex::new(ide))).unwrap();
        let resets = Arc::new(Resets::default());
        (PciHost::new(bus, resets.clone()), resets)
    }

    fn outl(h: &mut PciHost, port: u64, v: u32) {
        h.write(port - 0xcf8, &v.to_le_bytes());
    }
    fn outw(h: &mut PciHost, port: u64, v: u16) {
        h.write(port - 0xcf8, &v.to_le_bytes());
    }
    fn inw(h: &mut PciHost, port: u64) -> u16 {
        let mut d = [0; 2];
        h.read(port - 0xcf8, &mut d);
        u16::from_le_bytes(d)
    }
    fn inl(h: &mut PciHost, port: u64) -> u32 {
        let mut d = [0; 4];
        h.read(port - 0xcf8, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn address_bits_1_0_select_the_register() {
        let (mut h, _) = host();
        outl(&mut h, 0xcf8, 0x8000_0902);
        assert_eq!(inl(&mut h, 0xcf8), 0x8000_0902, "kept whole");
        assert_eq!(inw(&mut h, 0xcfc), 0x7010, "device ID, not vendor ID");
        outl(&mut h, 0xcf8, 0x8000_0900);
        assert_eq!(inw(&mut h, 0xcfe), 0x7010);
        assert_eq!(inl(&mut h, 0xcfc), 0x7010_8086);
        // Bits 1:0 are OR-ed with the port offset, not added to it.
        outl(&mut h, 0xcf8, 0x8000_0902);
        assert_eq!(inw(&mut h, 0xcfe), 0x7010);
        outl(&mut h, 0xcf8, 0x8000_0901);
        let mut b = [0];
        h.read(6, &mut b);
        assert_eq!(b[0], 0x70, "register 3 = 1 | 2");

        // IDETIM of the secondary channel (0x42) through either route.
        outl(&mut h, 0xcf8, 0x8000_0942);
        outw(&mut h, 0xcfc, 0x8123);
        assert_eq!(inw(&mut h, 0xcfc), 0x8123);
        outl(&mut h, 0xcf8, 0x8000_0940);
        assert_eq!(inl(&mut h, 0xcfc) >> 16, 0x8123);
        outw(&mut h, 0xcfe, 0x1234);
        outl(&mut h, 0xcf8, 0x8000_0942);
        assert_eq!(inw(&mut h, 0xcfc), 0x1234);

        // Bits 30:24 are not decoded; another bus is not there.
        outl(&mut h, 0xcf8, 0x8f00_0900);
        assert_eq!(inl(&mut h, 0xcfc), 0x7010_8086);
        outl(&mut h, 0xcf8, 0x8001_0900);
        assert_eq!(inl(&mut h, 0xcfc), 0xffff_ffff);
        outl(&mut h, 0xcf8, 0x0000_0900);
        assert_eq!(inl(&mut h, 0xcfc), 0xffff_ffff, "disabled");
    }

    #[test]
    fn accesses_stay_in_the_first_256_bytes() {
        let (mut h, _) = host();
        // A dword at register 0xfe: two bytes of config, then all ones.
        outl(&mut h, 0xcf8, 0x8000_09fe);
        assert_eq!(inl(&mut h, 0xcfc), 0xffff_0000);
        outl(&mut h, 0xcfc, 0);
        outl(&mut h, 0xcf8, 0x8000_09ff);
        assert_eq!(inl(&mut h, 0xcfc), 0xffff_ff00);
        assert_eq!(inw(&mut h, 0xcfe), 0xff00);
        // Past port 0xcff nothing is read or written.
        outl(&mut h, 0xcf8, 0x8000_0940);
        outl(&mut h, 0xcfc, 0x5678_1234);
        outl(&mut h, 0xcfe, 0);
        assert_eq!(inl(&mut h, 0xcfc), 0x5678_1234);
        let mut d = [0; 4];
        h.read(7, &mut d);
        assert_eq!(d, [0xff; 4]);
        // A crossing access reaches the bytes it names, as in QEMU.
        outl(&mut h, 0xcf8, 0x8000_0942);
        assert_eq!(inl(&mut h, 0xcfc), 0x0000_5678);
    }

    #[test]
    fn migrates_config_address_and_rcr() {
        let (mut a, _) = host();
        outl(&mut a, 0xcf8, 0x8000_0902);
        a.write(1, &[RCR_SRST]);
        let (mut b, _) = host();
        crate::migration::round_trip(&a, &mut b);
        assert_eq!(inw(&mut b, 0xcfc), 0x7010, "the address selects as on A");
        let e = crate::migration::load_edited(&a, &mut b, |v| v["rcr"] = 0xff.into());
        assert!(e.contains("reset control"), "{e}");
    }

    #[test]
    fn reset_control_register_shares_the_window() {
        let (mut h, resets) = host();
        outl(&mut h, 0xcf8, 0x8000_0900);
        h.write(1, &[RCR_SRST]);
        let mut b = [0];
        h.read(1, &mut b);
        assert_eq!(b[0], RCR_SRST);
        assert_eq!(inl(&mut h, 0xcf8), 0x8000_0900, "CONFIG_ADDRESS untouched");
        assert_eq!(resets.0.load(Ordering::SeqCst), 0);
        h.write(1, &[RCR_RCPU]);
        assert_eq!(resets.0.load(Ordering::SeqCst), 1);
    }
}
