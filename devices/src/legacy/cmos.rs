//! MC146818 real-time clock and its 128-byte CMOS RAM, at ports 0x70/0x71
//! on IRQ 8. Follows the Motorola MC146818A datasheet (time registers 0-9,
//! registers A-D) and the PC CMOS map that SeaBIOS reads (memory size at
//! 0x15-0x18, 0x30-0x31, 0x34-0x35 and 0x5b-0x5d, CPU count at 0x5f, boot
//! order at 0x3d/0x38, floppy types at 0x10, equipment at 0x14).
//!
//! The clock is computed from [`Clock`] on every read rather than ticked by
//! a timer thread: reads are rare and this keeps qtest's stepped time exact.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::clock::Clock;
use crate::irq::IrqLine;
use crate::migration::DeviceState;
use serde::{Deserialize, Serialize};

pub const REG_A: u8 = 0x0a;
pub const REG_B: u8 = 0x0b;
pub const REG_C: u8 = 0x0c;
pub const REG_D: u8 = 0x0d;
pub const CENTURY: u8 = 0x32;

const A_UIP: u8 = 0x80;
const B_SET: u8 = 0x80;
const B_DM_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const D_VRT: u8 = 0x80;
/// The update cycle: UIP is set for this long before each second ticks.
const UIP_NS: u64 = 244_000;

pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    /// Unix time (seconds) at clock time 0.
    base: i64,
    clock: Arc<dyn Clock>,
    irq: Arc<dyn IrqLine>,
}

impl Cmos {
    /// `start` is the guest's wall-clock time at creation, in Unix seconds.
    pub fn new(start: i64, clock: Arc<dyn Clock>, irq: Arc<dyn IrqLine>) -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A as usize] = 0x26; // 32.768 kHz time base, 1024 Hz rate
        ram[REG_B as usize] = B_24H;
        ram[REG_D as usize] = D_VRT;
        let now = clock.now_ns() / 1_000_000_000;
        Cmos {
            index: 0,
            ram,
            base: start - now as i64,
            clock,
            irq,
        }
    }

    /// Sets a CMOS RAM byte from the machine (memory size, boot order, ...).
    pub fn set(&mut self, index: u8, value: u8) {
        self.ram[(index & 0x7f) as usize] = value;
    }

    pub fn get(&self, index: u8) -> u8 {
        self.ram[(index & 0x7f) as usize]
    }

    fn now(&self) -> (i64, u64) {
        let ns = self.clock.now_ns();
        (self.base + (ns / 1_000_000_000) as i64, ns % 1_000_000_000)
    }

    fn encode(&self, v: u32) -> u8 {
        if self.ram[REG_B as usize] & B_DM_BINARY != 0 {
            v as u8
        } else {
            (((v / 10) << 4) | (v % 10)) as u8
        }
    }

    fn decode(&self, r: u8) -> u32 {
        if self.ram[REG_B as usize] & B_DM_BINARY != 0 {
            r as u32
        } else {
            ((r >> 4) as u32 & 0xf) * 10 + (r & 0xf) as u32
        }
    }

    fn hour_to_reg(&self, h: u32) -> u8 {
        if self.ram[REG_B as usize] & B_24H != 0 {
            return self.encode(h);
        }
        let h12 = if h.is_multiple_of(12) { 12 } else { h % 12 };
        self.encode(h12) | if h >= 12 { 0x80 } else { 0 }
    }

    fn hour_from_reg(&self, r: u8) -> u32 {
        if self.ram[REG_B as usize] & B_24H != 0 {
            return self.decode(r);
        }
        let h = self.decode(r & 0x7f) % 12;
        if r & 0x80 != 0 {
            h + 12
        } else {
            h
        }
    }

    fn read_time_reg(&self, index: u8) -> u8 {
        let (t, _) = self.now();
        let days = t.div_euclid(86400);
        let secs = t.rem_euclid(86400) as u32;
        let (y, m, d) = civil_from_days(days);
        match index {
            0 => self.encode(secs % 60),
            2 => self.encode(secs / 60 % 60),
            4 => self.hour_to_reg(secs / 3600),
            6 => self.encode(((days + 4).rem_euclid(7) + 1) as u32),
            7 => self.encode(d),
            8 => self.encode(m),
            9 => self.encode(y.rem_euclid(100) as u32),
            CENTURY => self.encode(y.div_euclid(100) as u32),
            _ => self.ram[index as usize],
        }
    }

    /// After the guest set the time, re-derive the base from the registers.
    fn latch_time(&mut self, index: u8, value: u8) {
        let mut regs = [0u8; 10];
        for (i, r) in regs.iter_mut().enumerate() {
            *r = self.read_time_reg(i as u8);
        }
        let mut century = self.read_time_reg(CENTURY);
        match index {
            CENTURY => century = value,
            i => regs[i as usize] = value,
        }
        let year = self.decode(century) as i64 * 100 + self.decode(regs[9]) as i64;
        let month = self.decode(regs[8]).clamp(1, 12);
        let day = self.decode(regs[7]).clamp(1, 31);
        let days = days_from_civil(year, month, day);
        let t = days * 86400
            + self.hour_from_reg(regs[4]) as i64 * 3600
            + self.decode(regs[2]) as i64 * 60
            + self.decode(regs[0]) as i64;
        let now = (self.clock.now_ns() / 1_000_000_000) as i64;
        self.base = t - now;
    }

    fn read_reg(&mut self, index: u8) -> u8 {
        match index {
            0 | 2 | 4 | 6..=9 | CENTURY => self.read_time_reg(index),
            REG_A => {
                let (_, frac) = self.now();
                let uip = self.ram[REG_B as usize] & B_SET == 0 && frac >= 1_000_000_000 - UIP_NS;
                (self.ram[REG_A as usize] & !A_UIP) | if uip { A_UIP } else { 0 }
            }
            REG_C => {
                let v = self.ram[REG_C as usize];
                self.ram[REG_C as usize] = 0;
                self.irq.set_level(false);
                v
            }
            _ => self.ram[index as usize],
        }
    }

    fn write_reg(&mut self, index: u8, value: u8) {
        match index {
            0 | 2 | 4 | 6..=9 | CENTURY => self.latch_time(index, value),
            REG_A => self.ram[REG_A as usize] = value & !A_UIP,
            REG_C | REG_D => {} // read-only
            _ => self.ram[index as usize] = value,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset == 1 {
            data[0] = self.read_reg(self.index);
        } else {
            data[0] = self.index;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            // Bit 7 of the index port is the NMI mask, not part of the index.
            self.index = data[0] & 0x7f;
        } else {
            self.write_reg(self.index, data[0]);
        }
    }
}

/// The RTC and CMOS RAM. The clock is carried as the guest's wall-clock
/// time now, not as the offset from this process's clock: the
/// destination's clock need not read what the source's did.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CmosState {
    pub index: u8,
    /// All 128 bytes (the time registers in it are unused: time is
    /// computed from `time`).
    pub ram: Vec<u8>,
    /// The guest's time when saved, in Unix seconds.
    pub time: i64,
}

/// The largest guest time (either side of 1970) a stream may carry, in
/// seconds: about 35000 years.
const MAX_TIME: u64 = 1 << 40;

impl DeviceState for Cmos {
    const VERSION: u32 = 1;
    type State = CmosState;
    fn save_state(&self) -> CmosState {
        CmosState {
            index: self.index,
            ram: self.ram.to_vec(),
            time: self.now().0,
        }
    }
    fn load_state(&mut self, s: CmosState, _version: u32) -> Result<(), String> {
        let ram: [u8; 128] = s
            .ram
            .as_slice()
            .try_into()
            .map_err(|_| format!("CMOS: {} bytes of RAM, not 128", s.ram.len()))?;
        if s.index > 0x7f {
            return Err(format!("CMOS: index {:#x} past the RAM", s.index));
        }
        // Far more than the RTC's four-digit years, and far from where the
        // date arithmetic could overflow.
        if s.time.unsigned_abs() > MAX_TIME {
            return Err(format!("CMOS: time {} out of range", s.time));
        }
        let now = (self.clock.now_ns() / 1_000_000_000) as i64;
        self.base = s.time - now;
        self.index = s.index;
        self.ram = ram;
        Ok(())
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
/// The era-based method from Howard Hinnant's "chrono-compatible low-level
/// date algorithms".
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    (y, m, d)
}

/// The inverse of [`civil_from_days`].
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 } as i64;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::irq::NoIrq;

    fn rd(c: &mut Cmos, i: u8) -> u8 {
        c.write(0, &[i]);
        let mut b = [0];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn date_round_trip() {
        for days in [-1000_i64, 0, 59, 60, 10_957, 20_000, 60_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn cmos_migrates_ram_index_and_time() {
        let t = days_from_civil(2026, 11, 22) * 86400 + 3 * 3600;
        let ca = Arc::new(ManualClock::default());
        ca.set(5_000_000_000);
        let mut a = Cmos::new(t, ca.clone(), Arc::new(NoIrq));
        a.write(0, &[0x40]);
        a.write(1, &[0x5a]);
        a.write(0, &[2]);
        a.write(1, &[0x30]); // minutes: 03:30
        a.write(0, &[0x40]);
        // The destination's clock starts elsewhere; the guest's time goes on.
        let cb = Arc::new(ManualClock::default());
        cb.set(ca.now_ns());
        let mut b = Cmos::new(0, cb.clone(), Arc::new(NoIrq));
        crate::migration::round_trip(&a, &mut b);
        let mut d = [0u8];
        b.read(1, &mut d);
        assert_eq!(d[0], 0x5a, "index and RAM");
        let mut c = Cmos::new(0, Arc::new(ManualClock::default()), Arc::new(NoIrq));
        c.load_state(a.save_state(), 1).unwrap();
        assert_eq!((rd(&mut c, 4), rd(&mut c, 2)), (0x03, 0x30));
        let e = crate::migration::load_edited(&a, &mut c, |v| {
            v["ram"].as_array_mut().unwrap().pop();
        });
        assert!(e.contains("127 bytes"), "{e}");
        let e = crate::migration::load_edited(&a, &mut c, |v| v["index"] = 0x80.into());
        assert!(e.contains("index"), "{e}");
        let e = crate::migration::load_edited(&a, &mut c, |v| v["time"] = i64::MIN.into());
        assert!(e.contains("out of range"), "{e}");
    }

    #[test]
    fn time_bcd_and_set() {
        let clock = Arc::new(ManualClock::default());
        // 2026-11-22 03:46:08 UTC
        let t = days_from_civil(2026, 11, 22) * 86400 + 3 * 3600 + 46 * 60 + 8;
        let mut c = Cmos::new(t, clock.clone(), Arc::new(NoIrq));
        assert_eq!(rd(&mut c, 0), 0x08);
        assert_eq!(rd(&mut c, 2), 0x46);
        assert_eq!(rd(&mut c, 4), 0x03);
        assert_eq!(rd(&mut c, 7), 0x22);
        assert_eq!(rd(&mut c, 8), 0x11);
        assert_eq!(rd(&mut c, 9), 0x26);
        assert_eq!(rd(&mut c, CENTURY), 0x20);
        assert_eq!(rd(&mut c, 6), 1, "a Sunday");
        clock.step(62_000_000_000);
        assert_eq!(rd(&mut c, 0), 0x10);
        assert_eq!(rd(&mut c, 2), 0x47);
        // UIP in the last 244 us of a second.
        clock.set(62_999_900_000);
        assert_eq!(rd(&mut c, REG_A) & A_UIP, A_UIP);
        clock.set(62_000_000_000);
        assert_eq!(rd(&mut c, REG_A) & A_UIP, 0);
        // The guest sets the hour; the clock keeps running from there.
        c.write(0, &[4]);
        c.write(1, &[0x15]);
        assert_eq!(rd(&mut c, 4), 0x15);
        assert_eq!(rd(&mut c, 2), 0x47);
        assert_eq!(rd(&mut c, REG_D), 0x80);
    }
}
