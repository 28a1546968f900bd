//! A 16550A UART (COM1 at 0x3f8, IRQ 4), built on vm-superio's `Serial`,
//! which implements the National Semiconductor PC16550D register set. This
//! module adapts it to the port bus and to an [`IrqLine`]: the ISA IRQ is
//! edge-triggered, so each interrupt vm-superio raises is a pulse.

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use crate::bus::BusDevice;
use crate::irq::IrqLine;

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

pub struct IrqTrigger(pub Arc<dyn IrqLine>);

impl Trigger for IrqTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.pulse();
        Ok(())
    }
}

/// Flushes after every write, so guest output appears as it is produced.
pub struct Unbuffered(pub Box<dyn Write + Send>);

impl Write for Unbuffered {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

pub struct Uart {
    inner: Serial<IrqTrigger, NoEvents, Unbuffered>,
}

impl Uart {
    pub fn new(irq: Arc<dyn IrqLine>, out: Box<dyn Write + Send>) -> Self {
        Uart {
            inner: Serial::new(IrqTrigger(irq), Unbuffered(out)),
        }
    }

    /// Queues received bytes; returns how many fit in the receive FIFO.
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        self.inner.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Room left in the receive FIFO.
    pub fn rx_room(&self) -> usize {
        self.inner.fifo_capacity()
    }
}

impl BusDevice for Uart {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.inner.read(offset as u8);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        // The only error is a failed write to the output sink (a closed
        // pipe, for example); the guest must keep running regardless.
        let _ = self.inner.write(offset as u8, data[0]);
    }
}
