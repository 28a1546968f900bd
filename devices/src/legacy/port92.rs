//! System Control Port A at 0x92 (PS/2 "fast A20 and reset", PIIX3
//! datasheet, port 92h): bit 1 gates A20, and a 0-to-1 transition of bit 0
//! resets the CPU.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::system::SystemControl;

pub struct Port92 {
    value: u8,
    system: Arc<dyn SystemControl>,
}

impl Port92 {
    pub fn new(system: Arc<dyn SystemControl>) -> Self {
        // A20 enabled at power-on, as on QEMU's pc.
        Port92 {
            value: 0x02,
            system,
        }
    }
}

impl BusDevice for Port92 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.value;
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let v = data[0];
        let reset = v & 1 != 0 && self.value & 1 == 0;
        self.value = v & 0x03;
        if reset {
            self.value &= !1;
            self.system.request_reset();
        }
    }
}
