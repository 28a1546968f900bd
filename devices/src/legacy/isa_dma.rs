//! The PC/AT ISA DMA controllers: two Intel 8237A, DMA1 with the 8-bit
//! channels 0-3 at ports 0x00-0x0f and DMA2 with the 16-bit channels 4-7
//! at 0xc0-0xdf (one register every other port; channel 4 cascades DMA1),
//! and the page registers at 0x81-0x8f that supply address bits 23:16.
//! Follows the 8237A datasheet (register set, mode register, terminal
//! count, autoinitialize, the byte pointer flip-flop) and the PC/AT
//! technical reference (port map, page registers, 16-bit channels
//! addressing words).
//!
//! An ISA device moves its data with [`IsaDma::write_memory`] (device to
//! memory, the 8237's "write" transfer) or [`IsaDma::read_memory`]
//! (memory to device), as many bytes as the channel's count has left; the
//! channel reaches terminal count, sets its status bit and masks itself
//! unless it autoinitializes. A guest address outside RAM ends the transfer
//! there: the device sees fewer bytes than it asked for and reports its own
//! error.

use crate::bus::BusDevice;
use crate::dma;
use crate::migration::DeviceState;
use crate::GuestMem;
use serde::{Deserialize, Serialize};
use vm_memory::GuestAddress;

/// Mode register bits 3:2, the transfer type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transfer {
    Verify,
    /// I/O device to memory.
    Write,
    /// Memory to I/O device.
    Read,
    Illegal,
}

const MODE_AUTOINIT: u8 = 1 << 4;
const MODE_DECREMENT: u8 = 1 << 5;

/// Page register port (offset from 0x80) of each channel.
const PAGE_PORTS: [u8; 8] = [0x7, 0x3, 0x1, 0x2, 0xf, 0xb, 0x9, 0xa];

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// One channel's registers.
pub struct Channel {
    pub base_addr: u16,
    pub base_count: u16,
    pub addr: u16,
    pub count: u16,
    pub mode: u8,
    /// The count expired (and the channel does not autoinitialize).
    pub done: bool,
}

#[derive(Clone, Copy, Debug)]
struct Controller {
    ch: [Channel; 4],
    flip_flop: bool,
    /// Bits 3:0 terminal count reached, 7:4 requests.
    status: u8,
    command: u8,
    mask: u8,
    request: u8,
}

impl Default for Controller {
    fn default() -> Self {
        Controller {
            ch: [Channel::default(); 4],
            flip_flop: false,
            status: 0,
            command: 0,
            mask: 0xf,
            request: 0,
        }
    }
}

impl Controller {
    /// The low or high byte of a 16-bit register, per the flip-flop.
    fn byte_of(&mut self, v: u16) -> u8 {
        let hi = self.flip_flop;
        self.flip_flop = !hi;
        if hi {
            (v >> 8) as u8
        } else {
            v as u8
        }
    }

    fn set_byte(&mut self, v: &mut u16, b: u8) {
        let hi = self.flip_flop;
        self.flip_flop = !hi;
        *v = if hi {
            (*v & 0x00ff) | (b as u16) << 8
        } else {
            (*v & 0xff00) | b as u16
        };
    }

    fn read(&mut self, reg: u8) -> u8 {
        match reg {
            0..=7 => {
                let c = self.ch[(reg >> 1) as usize];
                let v = if reg & 1 == 0 { c.addr } else { c.count };
                self.byte_of(v)
            }
            8 => {
                // Reading status clears the terminal count bits.
                let s = self.status;
                self.status &= 0xf0;
                s
            }
            0xf => self.mask | 0xf0,
            _ => 0,
        }
    }

    fn write(&mut self, reg: u8, v: u8) {
        match reg {
            0..=7 => {
                let n = (reg >> 1) as usize;
                let mut c = self.ch[n];
                if reg & 1 == 0 {
                    self.set_byte(&mut c.base_addr, v);
                    c.addr = c.base_addr;
                } else {
                    self.set_byte(&mut c.base_count, v);
                    c.count = c.base_count;
                }
                c.done = false;
                self.ch[n] = c;
            }
            8 => self.command = v,
            9 => {
                let bit = 1 << (v & 3);
                if v & 4 != 0 {
                    self.request |= bit;
                } else {
                    self.request &= !bit;
                }
            }
            0xa => {
                let bit = 1 << (v & 3);
                if v & 4 != 0 {
                    self.mask |= bit;
                } else {
                    self.mask &= !bit;
                }
            }
            0xb => self.ch[(v & 3) as usize].mode = v,
            0xc => self.flip_flop = false,
            0xd => *self = Controller::default(),
            0xe => self.mask = 0,
            0xf => self.mask = v & 0xf,
            _ => {}
        }
    }
}

/// Both controllers and the page registers.
pub struct IsaDma {
    mem: GuestMem,
    ctrl: [Controller; 2],
    /// The page registers 0x80-0x8f (the unused ones read back).
    pages: [u8; 16],
}

impl IsaDma {
    pub fn new(mem: GuestMem) -> Self {
        IsaDma {
            mem,
            ctrl: [Controller::default(); 2],
            pages: [0; 16],
        }
    }

    fn channel(&self, n: usize) -> (&Controller, Channel) {
        let c = &self.ctrl[(n >> 2) & 1];
        (c, c.ch[n & 3])
    }

    /// Whether channel `n` is unmasked and has a count left.
    pub fn ready(&self, n: usize) -> bool {
        let (c, ch) = self.channel(n);
        c.mask & (1 << (n & 3)) == 0 && !ch.done
    }

    /// Channel `n`'s transfer type.
    pub fn transfer(&self, n: usize) -> Transfer {
        match (self.channel(n).1.mode >> 2) & 3 {
            0 => Transfer::Verify,
            1 => Transfer::Write,
            2 => Transfer::Read,
            _ => Transfer::Illegal,
        }
    }

    /// Bytes channel `n` may still move (0 when masked).
    pub fn remaining(&self, n: usize) -> usize {
        if !self.ready(n) {
            return 0;
        }
        let words = self.channel(n).1.count as usize + 1;
        if n >= 4 {
            words * 2
        } else {
            words
        }
    }

    /// Reads guest memory at `addr` (for tests of the devices that use
    /// DMA).
    #[cfg(test)]
    pub fn read_memory_at(&self, addr: u64, buf: &mut [u8]) {
        let _ = dma::read_ram(&self.mem, GuestAddress(addr), buf);
    }

    /// Device to memory on channel `n`; the bytes moved.
    pub fn write_memory(&mut self, n: usize, data: &[u8]) -> usize {
        let mut done = 0;
        self.run(n, data.len(), |mem, addr, range| {
            let r = &data[range];
            let ok = dma::write_ram(mem, GuestAddress(addr), r).is_ok();
            if ok {
                done += r.len();
            }
            ok
        });
        done
    }

    /// Memory to device on channel `n`; the bytes moved.
    pub fn read_memory(&mut self, n: usize, buf: &mut [u8]) -> usize {
        let mut done = 0;
        self.run(n, buf.len(), |mem, addr, range| {
            let r = &mut buf[range];
            let ok = dma::read_ram(mem, GuestAddress(addr), r).is_ok();
            if ok {
                done += r.len();
            }
            ok
        });
        done
    }

    /// Moves up to `len` bytes on channel `n` in runs of contiguous
    /// addresses: `each(mem, guest address, range of the device buffer)`
    /// moves one and says whether it could. Advances the channel, and at
    /// terminal count sets the status bit and autoinitializes or masks it.
    fn run(
        &mut self,
        n: usize,
        len: usize,
        mut each: impl FnMut(&GuestMem, u64, std::ops::Range<usize>) -> bool,
    ) {
        let wide = n >= 4;
        let unit = if wide { 2 } else { 1 };
        let page = self.pages[PAGE_PORTS[n & 7] as usize] as u64;
        let mut pos = 0;
        while pos + unit <= len && self.ready(n) {
            let ctrl = &mut self.ctrl[(n >> 2) & 1];
            let ch = &mut ctrl.ch[n & 3];
            let down = ch.mode & MODE_DECREMENT != 0;
            // Units until the count expires, or the 16-bit address wraps
            // (it does not carry into the page), or the buffer ends.
            let left = ch.count as usize + 1;
            let to_wrap = if down {
                ch.addr as usize + 1
            } else {
                0x10000 - ch.addr as usize
            };
            let units = left.min(to_wrap).min((len - pos) / unit);
            let addr = |a: u16| {
                if wide {
                    (page & 0xfe) << 16 | (a as u64) << 1
                } else {
                    page << 16 | a as u64
                }
            };
            let ok = if down {
                // Descending: one unit at a time.
                (0..units).all(|i| {
                    let a = addr(ch.addr.wrapping_sub(i as u16));
                    let at = pos + i * unit;
                    each(&self.mem, a, at..at + unit)
                })
            } else {
                each(&self.mem, addr(ch.addr), pos..pos + units * unit)
            };
            if !ok {
                return;
            }
            pos += units * unit;
            ch.addr = if down {
                ch.addr.wrapping_sub(units as u16)
            } else {
                ch.addr.wrapping_add(units as u16)
            };
            let (count, expired) = ch.count.overflowing_sub(units as u16);
            ch.count = count;
            if units == left || expired {
                ctrl.status |= 1 << (n & 3);
                if ch.mode & MODE_AUTOINIT != 0 {
                    ch.addr = ch.base_addr;
                    ch.count = ch.base_count;
                } else {
                    ch.done = true;
                    ctrl.mask |= 1 << (n & 3);
                }
            }
        }
    }
}

/// One 8237A as migration carries it.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControllerState {
    pub channels: [Channel; 4],
    pub flip_flop: bool,
    pub status: u8,
    pub command: u8,
    pub mask: u8,
    pub request: u8,
}

/// Both controllers (DMA1 first) and the page registers.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IsaDmaState {
    pub controllers: [ControllerState; 2],
    pub pages: [u8; 16],
}

impl DeviceState for IsaDma {
    const VERSION: u32 = 1;
    type State = IsaDmaState;
    fn save_state(&self) -> IsaDmaState {
        let c = |c: &Controller| ControllerState {
            channels: c.ch,
            flip_flop: c.flip_flop,
            status: c.status,
            command: c.command,
            mask: c.mask,
            request: c.request,
        };
        IsaDmaState {
            controllers: [c(&self.ctrl[0]), c(&self.ctrl[1])],
            pages: self.pages,
        }
    }
    fn load_state(&mut self, s: IsaDmaState, _version: u32) -> Result<(), String> {
        let mut ctrl = [Controller::default(); 2];
        for (i, (c, st)) in ctrl.iter_mut().zip(s.controllers).enumerate() {
            if st.mask > 0xf || st.request > 0xf {
                return Err(format!(
                    "ISA DMA{}: mask {:#x} / request {:#x} name channels that do not exist",
                    i + 1,
                    st.mask,
                    st.request
                ));
            }
            *c = Controller {
                ch: st.channels,
                flip_flop: st.flip_flop,
                status: st.status,
                command: st.command,
                mask: st.mask,
                request: st.request,
            };
        }
        self.ctrl = ctrl;
        self.pages = s.pages;
        Ok(())
    }
}

/// DMA1's registers, ports 0x00-0x0f.
pub struct Dma1(pub std::sync::Arc<std::sync::Mutex<IsaDma>>);
/// DMA2's registers, ports 0xc0-0xdf (even ports).
pub struct Dma2(pub std::sync::Arc<std::sync::Mutex<IsaDma>>);
/// The page registers, ports 0x80-0x8f.
pub struct DmaPages(pub std::sync::Arc<std::sync::Mutex<IsaDma>>);

impl BusDevice for Dma1 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut d = crate::bus::lock(&self.0);
        for (i, b) in data.iter_mut().enumerate() {
            *b = d.ctrl[0].read(((offset as usize + i) & 0xf) as u8);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut d = crate::bus::lock(&self.0);
        for (i, &b) in data.iter().enumerate() {
            d.ctrl[0].write(((offset as usize + i) & 0xf) as u8, b);
        }
    }
}

impl BusDevice for Dma2 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut d = crate::bus::lock(&self.0);
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset as usize + i;
            *b = if o & 1 == 0 {
                d.ctrl[1].read(((o >> 1) & 0xf) as u8)
            } else {
                0xff
            };
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut d = crate::bus::lock(&self.0);
        for (i, &b) in data.iter().enumerate() {
            let o = offset as usize + i;
            if o & 1 == 0 {
                d.ctrl[1].write(((o >> 1) & 0xf) as u8, b);
            }
        }
    }
}

impl BusDevice for DmaPages {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let d = crate::bus::lock(&self.0);
        for (i, b) in data.iter_mut().enumerate() {
            *b = d.pages[(offset as usize + i) & 0xf];
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut d = crate::bus::lock(&self.0);
        for (i, &b) in data.iter().enumerate() {
            d.pages[(offset as usize + i) & 0xf] = b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vm_memory::Bytes;

    fn setup() -> (Arc<Mutex<IsaDma>>, Dma1, DmaPages) {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let d = Arc::new(Mutex::new(IsaDma::new(mem)));
        (d.clone(), Dma1(d.clone()), DmaPages(d))
    }

    /// Channel 2 as a floppy driver programs it: address 0x12_3400, 1024
    /// bytes, device to memory, then unmasked.
    fn program(ch: &mut Dma1, pages: &mut DmaPages, mode: u8, addr: u32, len: u16) {
        ch.write(0xa, &[0x04 | 2]); // mask
        ch.write(0xc, &[0]); // flip-flop
        ch.write(0xb, &[mode | 2]);
        ch.write(4, &[addr as u8]);
        ch.write(4, &[(addr >> 8) as u8]);
        pages.write(1, &[(addr >> 16) as u8]);
        ch.write(5, &[(len - 1) as u8]);
        ch.write(5, &[((len - 1) >> 8) as u8]);
        ch.write(0xa, &[2]); // unmask
    }

    #[test]
    fn isa_dma_migrates_channels_and_pages() {
        let (a, mut c, mut p) = setup();
        program(&mut c, &mut p, 0x44, 0x12_3400, 1024);
        a.lock().unwrap().write_memory(2, &[1; 100]);
        c.write(0xc, &[0]);
        c.read(4, &mut [0u8]); // the flip-flop left on the high byte
        let (b, mut bc, mut bp) = setup();
        crate::migration::round_trip(&*a.lock().unwrap(), &mut b.lock().unwrap());
        assert_eq!(b.lock().unwrap().remaining(2), 924);
        let mut d = [0u8];
        bc.read(4, &mut d);
        assert_eq!(d[0], 0x34, "high byte of 0x3464");
        bp.read(1, &mut d);
        assert_eq!(d[0], 0x12);
        let e = crate::migration::load_edited(&*a.lock().unwrap(), &mut b.lock().unwrap(), |v| {
            v["controllers"][1]["mask"] = 0x10.into()
        });
        assert!(e.contains("DMA2"), "{e}");
    }

    #[test]
    fn a_write_transfer_fills_memory_then_reaches_terminal_count() {
        let (d, mut c, mut p) = setup();
        program(&mut c, &mut p, 0x44, 0x12_3400, 1024);
        let mut g = d.lock().unwrap();
        assert_eq!(g.transfer(2), Transfer::Write);
        assert_eq!(g.remaining(2), 1024);
        assert_eq!(g.write_memory(2, &[0xaa; 600]), 600);
        assert_eq!(g.remaining(2), 424);
        assert_eq!(g.write_memory(2, &[0xbb; 600]), 424, "the count ends it");
        assert!(!g.ready(2), "masked at terminal count");
        let mut m = [0u8; 1024];
        g.mem.read_slice(&mut m, GuestAddress(0x12_3400)).unwrap();
        assert!(m[..600].iter().all(|&b| b == 0xaa));
        assert!(m[600..].iter().all(|&b| b == 0xbb));
        drop(g);
        let mut st = [0u8];
        c.read(8, &mut st);
        assert_eq!(st[0] & 0x0f, 1 << 2, "TC on channel 2");
        c.read(8, &mut st);
        assert_eq!(st[0] & 0x0f, 0, "cleared by the read");
        // The current address and count read back through the flip-flop.
        let mut b = [0u8; 2];
        c.write(0xc, &[0]);
        c.read(4, &mut b[..1]);
        c.read(4, &mut b[1..]);
        assert_eq!(u16::from_le_bytes(b), 0x3800);
    }

    #[test]
    fn read_transfer_autoinit_and_addresses_outside_ram() {
        let (d, mut c, mut p) = setup();
        {
            let g = d.lock().unwrap();
            g.mem
                .write_slice(&[7u8; 512], GuestAddress(0x1000))
                .unwrap();
        }
        program(&mut c, &mut p, 0x58, 0x1000, 512); // read, autoinit
        let mut g = d.lock().unwrap();
        let mut buf = [0u8; 512];
        assert_eq!(g.read_memory(2, &mut buf), 512);
        assert!(buf.iter().all(|&b| b == 7));
        assert!(g.ready(2), "autoinitialized");
        assert_eq!(g.remaining(2), 512);
        drop(g);
        // A page past the 4 MiB of RAM: nothing moves.
        program(&mut c, &mut p, 0x44, 0xf0_0000, 512);
        assert_eq!(d.lock().unwrap().write_memory(2, &[1; 512]), 0);
        // Master clear masks every channel.
        c.write(0xd, &[0]);
        assert!(!d.lock().unwrap().ready(2));
    }
}
