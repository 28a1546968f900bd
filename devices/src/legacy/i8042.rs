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
use crate::migration::DeviceState;
use crate::system::SystemControl;
use serde::{Deserialize, Serialize};

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

/// The controller's registers, its output queue (byte, from the mouse)
/// and the commands waiting for a parameter byte.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct I8042State {
    pub status: u8,
    pub ctr: u8,
    pub outport: u8,
    pub queue: Vec<(u8, bool)>,
    pub pending: Option<u8>,
    pub kbd_param: Option<u8>,
    pub aux_param: Option<u8>,
}

impl DeviceState for I8042 {
    const VERSION: u32 = 1;
    type State = I8042State;
    fn save_state(&self) -> I8042State {
        I8042State {
            status: self.status,
            ctr: self.ctr,
            outport: self.outport,
            queue: self.queue.iter().copied().collect(),
            pending: self.pending,
            kbd_param: self.kbd_param,
            aux_param: self.aux_param,
        }
    }
    fn load_state(&mut self, s: I8042State, _version: u32) -> Result<(), String> {
        if s.queue.len() > QUEUE_MAX {
            return Err(format!(
                "i8042: {} queued bytes, at most {QUEUE_MAX}",
                s.queue.len()
            ));
        }
        self.status = s.status;
        self.ctr = s.ctr;
        self.outport = s.outport;
        self.queue = s.queue.into();
        self.pending = s.pending;
        self.kbd_param = s.kbd_param;
        self.aux_param = s.aux_param;
        Ok(())
    }
    /// The output buffer's status bits and both IRQ lines follow the queue.
    fn post_load(&mut self) {
        self.update();
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
    fn i8042_migrates_queue_and_pending_command() {
        let mk = || {
            I8042::new(
                Arc::new(NoIrq),
                Arc::new(NoIrq),
                Arc::new(Resets::default()),
            )
        };
        let mut a = mk();
        a.write(0, &[0xf2]); // keyboard ID: ACK, 0xab, 0x83 queued
        assert_eq!(rd(&mut a, 0), ACK);
        a.write(4, &[0x60]); // waits for the CTR byte
        let mut b = mk();
        crate::migration::round_trip(&a, &mut b);
        assert_eq!(rd(&mut b, 4) & STAT_OBF, STAT_OBF);
        assert_eq!((rd(&mut b, 0), rd(&mut b, 0)), (0xab, 0x83));
        b.write(0, &[0x45]);
        b.write(4, &[0x20]);
        assert_eq!(rd(&mut b, 0), 0x45, "the pending 0x60 took its byte");
        let e = crate::migration::load_edited(&a, &mut b, |v| {
            v["queue"] = serde_json::json!(vec![(1, false); 17]);
        });
        assert!(e.contains("17 queued"), "{e}");
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
