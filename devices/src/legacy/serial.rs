//! A 16550A UART (COM1 at 0x3f8, IRQ 4), built on vm-superio's `Serial`,
//! which implements the National Semiconductor PC16550D register set. This
//! module adapts it to the port bus and to an [`IrqLine`]: the ISA IRQ is
//! edge-triggered, so each interrupt vm-superio raises is a pulse.

use std::io::Write;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::bus::BusDevice;
use crate::irq::{IrqLine, NoIrq};
use crate::migration::DeviceState;

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

/// vm-superio's `SerialState` (which has no serde), field for field.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UartState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes the guest has not read.
    pub in_buffer: Vec<u8>,
}

/// vm-superio's receive FIFO (`Serial::from_state` refuses more).
const FIFO_SIZE: usize = 64;

impl DeviceState for Uart {
    const VERSION: u32 = 1;
    type State = UartState;
    fn save_state(&self) -> UartState {
        let s = self.inner.state();
        UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
    fn load_state(&mut self, s: UartState, _version: u32) -> Result<(), String> {
        if s.in_buffer.len() > FIFO_SIZE {
            return Err(format!(
                "UART: {} received bytes, the FIFO holds {FIFO_SIZE}",
                s.in_buffer.len()
            ));
        }
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        };
        // vm-superio builds a Serial only from a state: this one takes
        // over the interrupt line and output of the one it replaces (a
        // placeholder stands in while the two swap).
        let placeholder = Serial::new(
            IrqTrigger(Arc::new(NoIrq)),
            Unbuffered(Box::new(std::io::sink())),
        );
        let old = std::mem::replace(&mut self.inner, placeholder);
        let irq = old.interrupt_evt().0.clone();
        // It pulses the line for an interrupt the state has pending, as a
        // source that resumed would have.
        match Serial::from_state(&state, IrqTrigger(irq), NoEvents, old.into_writer()) {
            Ok(s) => {
                self.inner = s;
                Ok(())
            }
            // The FIFO was checked and the trigger cannot fail.
            Err(e) => Err(format!("UART: {e:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<Vec<u8>>>);
    impl Write for Out {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn uart_migrates_registers_and_received_bytes() {
        let mut a = Uart::new(Arc::new(NoIrq), Box::new(std::io::sink()));
        a.write(3, &[0x83]); // DLAB
        a.write(0, &[0x0c]); // 9600 baud
        a.write(3, &[0x03]);
        a.write(7, &[0x5a]);
        a.write(1, &[0x01]);
        assert_eq!(a.receive(b"hi"), 2);
        let out = Out::default();
        let mut b = Uart::new(Arc::new(NoIrq), Box::new(out.clone()));
        crate::migration::round_trip(&a, &mut b);
        let mut d = [0u8];
        b.read(7, &mut d);
        assert_eq!(d[0], 0x5a);
        b.read(0, &mut d);
        assert_eq!(d[0], b'h');
        b.write(0, b"x");
        assert_eq!(*out.0.lock().unwrap(), b"x", "B keeps its own output");
        let e = crate::migration::load_edited(&a, &mut b, |v| {
            v["in_buffer"] = serde_json::json!(vec![0; 65]);
        });
        assert!(e.contains("65 received"), "{e}");
    }
}
