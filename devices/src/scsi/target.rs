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
