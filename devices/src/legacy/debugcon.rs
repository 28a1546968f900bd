//! isa-debugcon: a write-only byte sink on one I/O port (QEMU's
//! `-debugcon`, port 0xe9 by default). Reads return the "readback" byte
//! 0xe9, which is how SeaBIOS detects it on port 0x402.

use std::io::Write;

use crate::bus::BusDevice;

pub const DEFAULT_IOBASE: u64 = 0xe9;
pub const READBACK: u8 = 0xe9;

pub struct Debugcon {
    out: Box<dyn Write + Send>,
}

impl Debugcon {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Debugcon { out }
    }
}

impl BusDevice for Debugcon {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = READBACK;
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        // A sink that fails (closed pipe, full disk) must not stop the guest.
        let _ = self
            .out
            .write_all(&data[..1])
            .and_then(|_| self.out.flush());
    }
}
