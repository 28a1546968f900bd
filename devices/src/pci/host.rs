//! PCI configuration mechanism #1 (PCI Local Bus Spec 3.0, section 3.2.2.3.2):
//! CONFIG_ADDRESS at 0xcf8 and CONFIG_DATA at 0xcfc-0xcff, as the i440FX
//! host bridge decodes them. Register it on the port bus at 0xcf8, length 8.
//!
//! Byte accesses to 0xcf9 are not CONFIG_ADDRESS but the PIIX3 Reset Control
//! Register (PIIX3 datasheet, "Reset Control Register"): writing bit 2 (RCPU)
//! resets the system. It lives here because it shares the decode window.

use std::sync::Arc;

use super::PciBus;
use crate::bus::{le_value, put_le, BusDevice};
use crate::system::SystemControl;

const RCR_SRST: u8 = 1 << 1;
const RCR_RCPU: u8 = 1 << 2;

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

    /// (devfn, register) of the current CONFIG_ADDRESS, if enabled and on bus 0.
    fn target(&self, data_offset: u64) -> Option<(u8, u16)> {
        let a = self.address;
        if a & 0x8000_0000 == 0 || (a >> 16) & 0xff != 0 {
            return None;
        }
        Some((
            ((a >> 8) & 0xff) as u8,
            ((a & 0xfc) as u16) + data_offset as u16,
        ))
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
            _ => match self.target(offset - 4) {
                // An access must not run past CONFIG_DATA's last byte.
                Some((devfn, reg)) if offset - 4 + data.len() as u64 <= 4 => {
                    self.bus.config_read(devfn, reg, data)
                }
                _ => data.fill(0xff),
            },
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => self.address = le_value(data) as u32 & 0x80ff_fffc,
            1 if data.len() == 1 => {
                self.rcr = data[0] & RCR_SRST;
                if data[0] & RCR_RCPU != 0 {
                    self.system.request_reset();
                }
            }
            // Other partial writes to CONFIG_ADDRESS are ignored.
            0..=3 => {}
            _ => {
                if let Some((devfn, reg)) = self.target(offset - 4) {
                    if offset - 4 + data.len() as u64 <= 4 {
                        self.bus.config_write(devfn, reg, data)
                    }
                }
            }
        }
    }
}
