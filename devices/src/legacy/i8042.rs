//! Intel 8042 keyboard controller at ports 0x60/0x64, with a PS/2 keyboard
//! and mouse that answer the command sets firmware and OS drivers use
//! during initialisation (IBM PS/2 Technical Reference, "Keyboard/Auxiliary
//! Device Controller"). No keys are ever typed: input reaches guests through
//! the serial console. Pulsing output-port bit 0 (command 0xfe, or 0xd1
//! with bit 0 clear) resets the machine.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::bus::BusDevice;
use crate::irq::IrqLine;
use crate::system::SystemControl;

const STAT_OBF: u8 = 0x01;
const STAT_SYS: u8 = 0x04;
const STAT_CMD: u8 = 0x08;
const STAT_UNLOCKED: u8 = 0x10;
const STAT_AUX: u8 = 0x20;

const CTR_KBD_INT: u8 = 0x01;
const CTR_AUX_INT: u8 = 0x02;
const CTR_SYS: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;

const ACK: u8 = 0xfa;
/// Bound on queued output so a guest issuing commands in a loop cannot grow it.
const QUEUE_MAX: usize = 16;

pub struct I8042 {
    status: u8,
    ctr: u8,
    outport: u8,
    queue: VecDeque<(u8, bool)>,
    /// A controller command waiting for its data byte.
    pending: Option<u8>,
    /// A keyboard or mouse command waiting for its parameter byte.
    kbd_param: Option<u8>,
    aux_param: Option<u8>,
    kbd_irq: Arc<dyn IrqLine>,
    aux_irq: Arc<dyn IrqLine>,
    system: Arc<dyn SystemControl>,
}

impl I8042 {
    pub fn new(
        kbd_irq: Arc<dyn IrqLine>,
        aux_irq: Arc<dyn IrqLine>,
        system: Arc<dyn SystemControl>,
    ) -> Self {
        I8042 {
            status: STAT_UNLOCKED,
            ctr: CTR_KBD_INT | CTR_AUX_INT,
            outport: 0x03,
            queue: VecDeque::new(),
            pending: None,
            kbd_param: None,
            aux_param: None,
            kbd_irq,
            aux_irq,
            system,
        }
    }

    fn push(&mut self, b: u8, aux: bool) {
        if self.queue.len() < QUEUE_MAX {
            self.queue.push_back((b, aux));
        }
        self.update();
    }

    fn update(&mut self) {
        self.status &= !(STAT_OBF | STAT_AUX);
        let (mut kbd, mut aux) = (false, false);
        if let Some(&(_, is_aux)) = self.queue.front() {
            self.status |= STAT_OBF;
            if is_aux {
                self.status |= STAT_AUX;
                aux = self.ctr & CTR_AUX_INT != 0;
            } else {
                kbd = self.ctr & CTR_KBD_INT != 0;
            }
        }
        self.kbd_irq.set_level(kbd);
        self.aux_irq.set_level(aux);
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            0x20 => self.push(self.ctr, false),
            0x60 | 0xd1 | 0xd2 | 0xd3 | 0xd4 => self.pending = Some(cmd),
            0xa7 => self.ctr |= CTR_AUX_DISABLE,
            0xa8 => self.ctr &= !CTR_AUX_DISABLE,
            0xa9 | 0xab => self.push(0x00, false),
            0xaa => {
                self.status |= STAT_SYS;
                self.push(0x55, false)
            }
            0xad => self.ctr |= CTR_KBD_DISABLE,
            0xae => self.ctr &= !CTR_KBD_DISABLE,
            0xc0 => self.push(0x80, false),
            0xd0 => self.push(self.outport, false),
            0xdd => self.outport &= !0x02,
            0xdf => self.outport |= 0x02,
            // Pulse output port lines; bit 0 low in the mask pulses reset.
            0xf0..=0xff if cmd & 1 == 0 => self.system.request_reset(),
            _ => {}
        }
        self.update();
    }

    fn data(&mut self, v: u8) {
        match self.pending.take() {
            Some(0x60) => {
                self.ctr = v;
                if v & CTR_SYS != 0 {
                    self.status |= STAT_SYS;
                }
                self.update();
            }
            Some(0xd1) => {
                self.outport = v;
                if v & 1 == 0 {
                    self.system.request_reset();
                }
            }
            Some(0xd2) => self.push(v, false),
            Some(0xd3) => self.push(v, true),
            Some(0xd4) => self.aux_command(v),
            _ => self.kbd_command(v),
        }
    }

    fn kbd_command(&mut self, v: u8) {
        if let Some(cmd) = self.kbd_param.take() {
            self.push(ACK, false);
            if cmd == 0xf0 && v == 0 {
                self.push(0x02, false); // current scancode set
            }
            return;
        }
        match v {
            0xff => {
                self.push(ACK, false);
                self.push(0xaa, false);
            }
            0xf2 => {
                self.push(ACK, false);
                self.push(0xab, false);
                self.push(0x83, false);
            }
            0xee => self.push(0xee, false),
            0xed | 0xf0 | 0xf3 => {
                self.kbd_param = Some(v);
                self.push(ACK, false)
            }
            _ => self.push(ACK, false),
        }
    }

    fn aux_command(&mut self, v: u8) {
        if self.aux_param.take().is_some() {
            self.push(ACK, true);
            return;
        }
        match v {
            0xff => {
                self.push(ACK, true);
                self.push(0xaa, true);
                self.push(0x00, true);
            }
            0xf2 => {
                self.push(ACK, true);
                self.push(0x00, true);
            }
            0xe9 => {
                for b in [ACK, 0, 2, 100] {
                    self.push(b, true);
                }
            }
            0xe8 | 0xf3 => {
                self.aux_param = Some(v);
                self.push(ACK, true)
            }
            _ => self.push(ACK, true),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = match offset {
            0 => {
                let v = self.queue.pop_front().map_or(0, |(b, _)| b);
                self.update();
                v
            }
            _ => self.status,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 => {
                self.status &= !STAT_CMD;
                self.data(data[0])
            }
            _ => {
                self.status |= STAT_CMD;
                self.command(data[0])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::NoIrq;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Default)]
    struct Resets(AtomicU32);
    impl SystemControl for Resets {
        fn request_reset(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn request_shutdown(&self) {}
    }

    fn rd(k: &mut I8042, port: u64) -> u8 {
        let mut b = [0];
        k.read(port, &mut b);
        b[0]
    }

    #[test]
    fn self_test_and_reset() {
        let sys = Arc::new(Resets::default());
        let mut k = I8042::new(Arc::new(NoIrq), Arc::new(NoIrq), sys.clone());
        k.write(4, &[0xaa]);
        assert_eq!(rd(&mut k, 4) & STAT_OBF, STAT_OBF);
        assert_eq!(rd(&mut k, 0), 0x55);
        assert_eq!(rd(&mut k, 4) & STAT_OBF, 0);
        k.write(0, &[0xff]);
        assert_eq!(rd(&mut k, 0), ACK);
        assert_eq!(rd(&mut k, 0), 0xaa);
        k.write(4, &[0xfe]);
        assert_eq!(sys.0.load(Ordering::SeqCst), 1);
        k.write(4, &[0xd1]);
        k.write(0, &[0x02]);
        assert_eq!(sys.0.load(Ordering::SeqCst), 2);
        for _ in 0..100 {
            k.write(0, &[0xf2]);
        }
        assert!(k.queue.len() <= QUEUE_MAX);
    }
}
