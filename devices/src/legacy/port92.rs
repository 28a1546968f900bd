//! System Control Port A at 0x92 (PS/2 "fast A20 and reset", PIIX3
//! datasheet, port 92h): bit 1 gates A20, and a 0-to-1 transition of bit 0
//! resets the CPU.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::migration::DeviceState;
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

impl DeviceState for Port92 {
    const VERSION: u32 = 1;
    /// The register: A20 gate (bit 1); bit 0 never stays set.
    type State = u8;
    fn save_state(&self) -> u8 {
        self.value
    }
    fn load_state(&mut self, s: u8, _version: u32) -> Result<(), String> {
        if s & !0x02 != 0 {
            return Err(format!(
                "port 92: value {s:#x} has bits that never stay set"
            ));
        }
        self.value = s;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::NoSystem;

    #[test]
    fn port92_migrates() {
        let mut a = Port92::new(Arc::new(NoSystem));
        a.write(0, &[0]);
        let mut b = Port92::new(Arc::new(NoSystem));
        crate::migration::round_trip(&a, &mut b);
        let mut d = [0xffu8];
        b.read(0, &mut d);
        assert_eq!(d[0], 0, "A20 off, as on A");
        assert!(!crate::migration::load_edited(&a, &mut b, |v| *v = 3.into()).is_empty());
    }
}
