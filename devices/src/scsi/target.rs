//! A SCSI target: its logical units by number, the commands the target
//! answers itself, and what a command to an absent LUN gets (SAM-5 4.6,
//! SPC-4 6.29 REPORT LUNS and 6.4.2 peripheral qualifier).
//!
//! - REPORT LUNS, sent to LUN 0 or to any present LUN, lists the present
//!   LUNs, and LUN 0 even when it is absent (SAM-5 requires LUN 0 to
//!   answer, so initiators scan through it).
//! - An absent LUN 0 answers INQUIRY with peripheral qualifier 001b, device
//!   type 1Fh, and TEST UNIT READY with GOOD; any other absent LUN answers
//!   INQUIRY with qualifier 011b ("no logical unit here"), REQUEST SENSE
//!   with LOGICAL UNIT NOT SUPPORTED as data, and every other command with
//!   CHECK CONDITION, ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (what
//!   QEMU's SCSI bus does).
//!
//! LUN numbers are logical (0..=16383); [`encode_lun`] and [`decode_lun`]
//! convert to and from the 8-byte SAM-5 LUN structure (peripheral device
//! addressing below 256, flat space addressing above), which transports
//! such as virtio-scsi and UAS carry.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::cdb::{op, Command};
use super::lun::{data_in, pad, Lun, Plan};
use super::request::{self, DataPath, Outcome, Request};
use super::sense::Sense;

/// The largest LUN the single-level addressing methods can carry.
pub const MAX_LUN: u64 = 0x3fff;

/// The SAM-5 LUN structure of a logical LUN number (single level:
/// peripheral device addressing for 0..=255, flat space above).
pub fn encode_lun(lun: u64) -> Option<[u8; 8]> {
    let mut v = [0u8; 8];
    match lun {
        0..=0xff => v[1] = lun as u8,
        0x100..=MAX_LUN => {
            v[0] = 0x40 | (lun >> 8) as u8;
            v[1] = lun as u8;
        }
        _ => return None,
    }
    Some(v)
}

/// The logical LUN number of a single-level SAM-5 LUN structure
/// (peripheral device addressing with bus 0, or flat space), `None` for
/// other forms.
pub fn decode_lun(lun: &[u8; 8]) -> Option<u64> {
    if lun[2..].iter().any(|&b| b != 0) {
        return None;
    }
    match lun[0] >> 6 {
        0 if lun[0] == 0 => Some(lun[1] as u64),
        1 => Some(((lun[0] as u64 & 0x3f) << 8) | lun[1] as u64),
        _ => None,
    }
}

/// A target's logical units.
#[derive(Default)]
pub struct Target {
    luns: BTreeMap<u64, Arc<dyn Lun>>,
}

impl Target {
    pub fn new() -> Self {
        Self::default()
    }

    /// Attaches `unit` as `lun`.
    pub fn attach(&mut self, lun: u64, unit: Arc<dyn Lun>) -> Result<(), String> {
        if lun > MAX_LUN {
            return Err(format!("lun={lun} is above the largest LUN ({MAX_LUN})"));
        }
        if self.luns.contains_key(&lun) {
            return Err(format!("lun={lun} is already in use"));
        }
        self.luns.insert(lun, unit);
        Ok(())
    }

    /// Detaches `lun`.
    pub fn detach(&mut self, lun: u64) -> Option<Arc<dyn Lun>> {
        self.luns.remove(&lun)
    }

    /// The unit at `lun`.
    pub fn lun(&self, lun: u64) -> Option<&Arc<dyn Lun>> {
        self.luns.get(&lun)
    }

    /// The present LUNs, in order.
    pub fn luns(&self) -> impl Iterator<Item = u64> + '_ {
        self.luns.keys().copied()
    }

    /// Resets every unit (a target or bus reset).
    pub fn reset(&self) {
        for unit in self.luns.values() {
            unit.reset();
        }
    }

    /// Executes `cdb` addressed to `lun`: the target's own commands here,
    /// everything else by the unit, or the absent-LUN answers.
    pub fn execute(&self, lun: u64, cdb: &[u8]) -> Plan {
        let unit = self.luns.get(&lun);
        let opcode = cdb.first().copied();
        if opcode == Some(op::REPORT_LUNS) && (lun == 0 || unit.is_some()) {
            return match Command::parse(cdb) {
                Ok(Command::ReportLuns { select, alloc }) => self.report_luns(select, alloc),
                Ok(_) => Plan::Check(Sense::INVALID_OPCODE),
                Err(s) => Plan::Check(s),
            };
        }
        if let Some(unit) = unit {
            return unit.execute(cdb);
        }
        match (opcode, lun) {
            (Some(op::INQUIRY), _) => match Command::parse(cdb) {
                Ok(Command::Inquiry {
                    vpd_page: None,
                    alloc,
                }) => data_in(absent_inquiry(lun), alloc as u32),
                Ok(_) | Err(_) => Plan::Check(Sense::INVALID_FIELD),
            },
            (Some(op::REQUEST_SENSE), _) => match Command::parse(cdb) {
                Ok(Command::RequestSense { alloc }) => {
                    let s = if lun == 0 {
                        Sense::NONE
                    } else {
                        Sense::LUN_NOT_SUPPORTED
                    };
                    data_in(s.fixed().to_vec(), alloc as u32)
                }
                Ok(_) | Err(_) => Plan::Check(Sense::INVALID_FIELD),
            },
            (Some(op::TEST_UNIT_READY), 0) => Plan::Good,
            _ => Plan::Check(Sense::LUN_NOT_SUPPORTED),
        }
    }

    /// Executes `cdb` and carries the plan out ([`request::start`]);
    /// `done` gets the outcome and the data path back.
    pub fn start<P, F>(&self, lun: u64, cdb: &[u8], path: P, done: F) -> Request
    where
        P: DataPath,
        F: FnOnce(Outcome, P) + Send + 'static,
    {
        let plan = self.execute(lun, cdb);
        request::start(self.luns.get(&lun).cloned(), plan, path, done)
    }

    /// REPORT LUNS parameter data (SPC-4 6.29.2). No well-known logical
    /// units exist, so SELECT REPORT 01h gets an empty list.
    fn report_luns(&self, select: u8, alloc: u32) -> Plan {
        if alloc < 16 {
            return Plan::Check(Sense::INVALID_FIELD);
        }
        let mut list: Vec<u64> = Vec::new();
        if select != 1 {
            if !self.luns.contains_key(&0) {
                list.push(0);
            }
            list.extend(self.luns.keys());
        }
        let mut v = vec![0u8; 8];
        v[0..4].copy_from_slice(&((list.len() * 8) as u32).to_be_bytes());
        for lun in list {
            v.extend_from_slice(&encode_lun(lun).unwrap_or_default());
        }
        data_in(v, alloc)
    }
}

/// Standard INQUIRY data of an absent LUN.
fn absent_inquiry(lun: u64) -> Vec<u8> {
    let mut v = vec![0u8; 36];
    if lun != 0 {
        v[0] = 0x7f; // qualifier 011b, type 1Fh
        return v;
    }
    v[0] = 0x3f; // qualifier 001b, type 1Fh
    v[2] = 0x05;
    v[3] = 0x12;
    v[4] = 31;
    pad(&mut v[8..16], "QEMU");
    pad(&mut v[16..32], "QEMU TARGET");
    pad(&mut v[32..36], "2.5+");
    v
}

#[cfg(test)]
mod tests {
    use super::super::mmc::{CdRom, Transport};
    use super::super::request::{Status, VecPath};
    use super::super::sbc::{Disk, DiskOptions};
    use super::super::testutil::*;
    use super::*;

    fn disk() -> Arc<dyn Lun> {
        Arc::new(Disk::new(null(1 << 20), DiskOptions::default()).unwrap())
    }

    fn report_luns(select: u8, alloc: u32) -> [u8; 16] {
        let mut c = cdb(&[op::REPORT_LUNS, 0, select]);
        c[6..10].copy_from_slice(&alloc.to_be_bytes());
        c
    }

    fn data_of(p: Plan) -> Vec<u8> {
        match p {
            Plan::DataIn(v) => v,
            p => panic!("expected data, got {p:?}"),
        }
    }

    #[test]
    fn lun_structures() {
        assert_eq!(encode_lun(0), Some([0; 8]));
        assert_eq!(encode_lun(5), Some([0, 5, 0, 0, 0, 0, 0, 0]));
        assert_eq!(encode_lun(300), Some([0x41, 0x2c, 0, 0, 0, 0, 0, 0]));
        assert_eq!(encode_lun(MAX_LUN + 1), None);
        for lun in [0, 1, 255, 256, 300, MAX_LUN] {
            assert_eq!(decode_lun(&encode_lun(lun).unwrap()), Some(lun));
        }
        assert_eq!(decode_lun(&[0, 1, 0, 0, 0, 0, 0, 1]), None, "two levels");
        assert_eq!(decode_lun(&[0x01, 1, 0, 0, 0, 0, 0, 0]), None, "bus 1");
        assert_eq!(decode_lun(&[0xc1, 0, 0, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn report_luns_lists_lun_0_and_the_present_luns() {
        let mut t = Target::new();
        t.attach(2, disk()).unwrap();
        t.attach(300, disk()).unwrap();
        assert!(t.attach(2, disk()).is_err());
        assert!(t.attach(MAX_LUN + 1, disk()).is_err());
        assert_eq!(t.luns().collect::<Vec<_>>(), vec![2, 300]);
        let v = data_of(t.execute(0, &report_luns(0, 256)));
        assert_eq!(&v[..8], &[0, 0, 0, 24, 0, 0, 0, 0]);
        assert_eq!(&v[8..16], &[0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&v[16..24], &[0, 2, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&v[24..32], &[0x41, 0x2c, 0, 0, 0, 0, 0, 0]);
        // From a present LUN too, and cut to the allocation length.
        assert_eq!(data_of(t.execute(300, &report_luns(2, 16))).len(), 16);
        // Well-known logical units only: none.
        assert_eq!(
            data_of(t.execute(0, &report_luns(1, 16))),
            vec![0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            t.execute(0, &report_luns(0, 15)),
            Plan::Check(Sense::INVALID_FIELD)
        );
        assert_eq!(
            t.execute(0, &report_luns(3, 64)),
            Plan::Check(Sense::INVALID_FIELD)
        );
        // Not from an absent LUN other than 0.
        assert_eq!(
            t.execute(7, &report_luns(0, 64)),
            Plan::Check(Sense::LUN_NOT_SUPPORTED)
        );
        // LUN 0 present: listed once.
        t.attach(0, disk()).unwrap();
        let v = data_of(t.execute(0, &report_luns(0, 256)));
        assert_eq!(&v[..4], &[0, 0, 0, 24]);
    }

    #[test]
    fn absent_luns() {
        let mut t = Target::new();
        t.attach(1, disk()).unwrap();
        let inquiry = cdb(&[op::INQUIRY, 0, 0, 0, 36]);
        // LUN 0 absent: qualifier 001b, the target's identification.
        let v = data_of(t.execute(0, &inquiry));
        assert_eq!(&v[..5], &[0x3f, 0, 5, 0x12, 31]);
        assert_eq!(&v[16..27], b"QEMU TARGET");
        assert_eq!(t.execute(0, &cdb(&[op::TEST_UNIT_READY])), Plan::Good);
        // Another absent LUN: qualifier 011b, type 1Fh.
        let v = data_of(t.execute(9, &inquiry));
        assert_eq!(v.len(), 36);
        assert_eq!(v[0], 0x7f);
        assert!(v[1..].iter().all(|&b| b == 0));
        assert_eq!(
            data_of(t.execute(9, &cdb(&[op::INQUIRY, 0, 0, 0, 1]))),
            vec![0x7f]
        );
        assert_eq!(
            t.execute(9, &cdb(&[op::INQUIRY, 1, 0x83, 0, 36])),
            Plan::Check(Sense::INVALID_FIELD)
        );
        let v = data_of(t.execute(9, &cdb(&[op::REQUEST_SENSE, 0, 0, 0, 18])));
        assert_eq!((v[2], v[12], v[13]), (5, 0x25, 0));
        for c in [
            cdb(&[op::TEST_UNIT_READY]),
            cdb10(op::READ_10, 0, 0, 1),
            cdb(&[0xff]),
        ] {
            assert_eq!(t.execute(9, &c), Plan::Check(Sense::LUN_NOT_SUPPORTED));
        }
        // A present LUN answers for itself.
        let v = data_of(t.execute(1, &inquiry));
        assert_eq!(v[0], 0);
        // Through the runner.
        let (tx, rx) = std::sync::mpsc::channel();
        t.start(9, &inquiry, VecPath::new(96), move |o, p| {
            tx.send((o, p)).unwrap()
        });
        let (o, p) = rx.recv().unwrap();
        assert_eq!(
            (o.status, o.transferred, o.residual),
            (Status::Good, 36, 60)
        );
        assert_eq!(p.buf[0], 0x7f);
    }

    #[test]
    fn reset_reaches_every_unit() {
        let mut t = Target::new();
        t.attach(0, disk()).unwrap();
        let tur = cdb(&[op::TEST_UNIT_READY]);
        assert_eq!(t.execute(0, &tur), Plan::Check(Sense::POWER_ON_RESET));
        assert_eq!(t.execute(0, &tur), Plan::Good);
        t.reset();
        assert_eq!(t.execute(0, &tur), Plan::Check(Sense::POWER_ON_RESET));
        assert!(t.detach(0).is_some());
        assert!(t.lun(0).is_none());
    }

    #[test]
    fn a_cd_rom_behind_the_target() {
        let img = TempImage::new(10 * 2048);
        let b = img.backend(Default::default());
        b.write_at(2 * 2048, &[0xcd; 2048]).unwrap();
        let cd: Arc<dyn Lun> = Arc::new(CdRom::new(Transport::Scsi, Some(b)));
        let mut t = Target::new();
        t.attach(0, cd).unwrap();
        let run = |c: &[u8], len: usize| {
            let (tx, rx) = std::sync::mpsc::channel();
            t.start(0, c, VecPath::new(len), move |o, p| {
                tx.send((o, p)).unwrap()
            });
            rx.recv().unwrap()
        };
        let (o, p) = run(&cdb(&[op::INQUIRY, 0, 0, 0, 36]), 36);
        assert_eq!((o.status, p.buf[0], p.buf[2]), (Status::Good, 5, 5));
        // A SCSI unit reports its power-on once (INQUIRY is exempt).
        let (o, _) = run(&cdb(&[op::TEST_UNIT_READY]), 0);
        assert_eq!(o.status, Status::CheckCondition(Sense::POWER_ON_RESET));
        // READ(16) is accepted on a SCSI bus.
        let (o, p) = run(&cdb16(op::READ_16, 0, 2, 1), 2048);
        assert_eq!(o.status, Status::Good);
        assert!(p.buf.iter().all(|&b| b == 0xcd));
        // A write: the disc is write protected.
        let (o, _) = run(&cdb10(op::WRITE_10, 0, 0, 1), 2048);
        assert_eq!(o.status, Status::CheckCondition(Sense::WRITE_PROTECTED));
    }
}
