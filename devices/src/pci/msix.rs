//! MSI-X (PCI Local Bus Spec 3.0, section 6.8.2): the capability in config
//! space, the vector table and the pending bit array that live in a BAR.
//!
//! The table is guest-programmed (address, data, per-vector mask). A device
//! asks to signal a vector with [`Msix::notify`]; if the vector or the whole
//! function is masked the pending bit is set instead, and the message goes
//! out when the guest unmasks it (section 6.8.2.9). Delivery itself is the
//! VMM's business, through the [`MsiSender`] trait: KVM (or the qtest
//! accelerator, which writes the message into guest memory as QEMU's does).

use super::config::PciConfig;
use crate::bus::put_le;

/// Capability ID of MSI-X.
pub const CAP_ID: u8 = 0x11;
/// Message control bits.
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_MASK_ALL: u16 = 1 << 14;
/// Vector control bit 0: this vector is masked.
const VECTOR_MASKED: u32 = 1;
/// Size of one table entry.
pub const ENTRY_SIZE: u64 = 16;

/// Delivers a message-signalled interrupt (an MSI write of `data` to `addr`).
pub trait MsiSender: Send + Sync {
    fn send(&self, addr: u64, data: u32);
}

/// Drops every message: for devices whose machine has no MSI delivery.
pub struct NoMsi;
impl MsiSender for NoMsi {
    fn send(&self, _: u64, _: u32) {}
}

pub struct Msix {
    /// Per vector: address low, address high, data, vector control.
    table: Vec<[u32; 4]>,
    pending: Vec<bool>,
    enabled: bool,
    masked_all: bool,
    cap: u16,
}

impl Msix {
    /// `vectors` (1..=2048) entries, all masked, as at reset.
    pub fn new(vectors: u16) -> Self {
        let n = vectors.clamp(1, 2048) as usize;
        Msix {
            table: vec![[0, 0, 0, VECTOR_MASKED]; n],
            pending: vec![false; n],
            enabled: false,
            masked_all: false,
            cap: 0,
        }
    }

    pub fn vectors(&self) -> u16 {
        self.table.len() as u16
    }

    /// Adds the capability: the table at `table_off` in BAR `table_bar`,
    /// the PBA at `pba_off` in BAR `pba_bar` (offsets 8-byte aligned).
    pub fn add_capability(
        &mut self,
        cfg: &mut PciConfig,
        table_bar: u8,
        table_off: u32,
        pba_bar: u8,
        pba_off: u32,
    ) {
        let mut body = [0u8; 10];
        put_le(&mut body[0..2], (self.vectors() - 1) as u64);
        put_le(&mut body[2..6], (table_off | table_bar as u32) as u64);
        put_le(&mut body[6..10], (pba_off | pba_bar as u32) as u64);
        self.cap = cfg.add_capability(CAP_ID, &body);
        // Only Enable and Function Mask are writable in Message Control.
        cfg.set_wmask(self.cap + 2, &[0x00, 0xc0]);
    }

    /// Size of the table in bytes, and of the PBA (rounded to 8 bytes).
    pub fn table_len(&self) -> u64 {
        self.table.len() as u64 * ENTRY_SIZE
    }
    pub fn pba_len(&self) -> u64 {
        self.table.len().div_ceil(64) as u64 * 8
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Picks up Message Control after a config-space write, and sends what
    /// became unmasked.
    pub fn config_written(&mut self, cfg: &PciConfig, sender: &dyn MsiSender) {
        if self.cap == 0 {
            return;
        }
        let ctrl = cfg.u16(self.cap + 2);
        self.enabled = ctrl & CTRL_ENABLE != 0;
        self.masked_all = ctrl & CTRL_MASK_ALL != 0;
        self.flush_pending(sender);
    }

    /// The function is reset: MSI-X disabled, every vector masked.
    pub fn reset(&mut self) {
        for e in &mut self.table {
            *e = [0, 0, 0, VECTOR_MASKED];
        }
        self.pending.fill(false);
        self.enabled = false;
        self.masked_all = false;
    }

    fn masked(&self, v: usize) -> bool {
        self.masked_all || self.table[v][3] & VECTOR_MASKED != 0
    }

    fn flush_pending(&mut self, sender: &dyn MsiSender) {
        if !self.enabled || self.masked_all {
            return;
        }
        for v in 0..self.table.len() {
            if self.pending[v] && !self.masked(v) {
                self.pending[v] = false;
                self.send(v, sender);
            }
        }
    }

    fn send(&self, v: usize, sender: &dyn MsiSender) {
        let e = &self.table[v];
        sender.send(e[0] as u64 | (e[1] as u64) << 32, e[2]);
    }

    /// Signals `vector`. Returns false if MSI-X is disabled or the vector
    /// does not exist (the caller then falls back to INTx or drops it).
    pub fn notify(&mut self, vector: u16, sender: &dyn MsiSender) -> bool {
        let v = vector as usize;
        if !self.enabled || v >= self.table.len() {
            return false;
        }
        if self.masked(v) {
            self.pending[v] = true;
        } else {
            self.send(v, sender);
        }
        true
    }

    /// A read of the table; accesses are dword or qword (6.8.2), others
    /// read as zero rather than fail.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset + i as u64;
            let (v, w, byte) = ((o / 16) as usize, ((o % 16) / 4) as usize, o % 4);
            if let Some(e) = self.table.get(v) {
                *b = (e[w] >> (8 * byte)) as u8;
            }
        }
    }

    pub fn table_write(&mut self, offset: u64, data: &[u8], sender: &dyn MsiSender) {
        let mut touched = Vec::new();
        for (i, &b) in data.iter().enumerate() {
            let o = offset + i as u64;
            let (v, w, byte) = ((o / 16) as usize, ((o % 16) / 4) as usize, o % 4);
            if let Some(e) = self.table.get_mut(v) {
                let shift = 8 * byte;
                let mut val = (e[w] & !(0xff << shift)) | (b as u32) << shift;
                if w == 3 {
                    val &= VECTOR_MASKED; // other vector-control bits are reserved
                }
                e[w] = val;
                if w == 3 && !touched.contains(&v) {
                    touched.push(v);
                }
            }
        }
        // Unmasking a vector with its pending bit set sends the message now.
        for v in touched {
            if self.enabled && self.pending[v] && !self.masked(v) {
                self.pending[v] = false;
                self.send(v, sender);
            }
        }
    }

    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let bit0 = (offset + i as u64) * 8;
            let mut v = 0u8;
            for j in 0..8 {
                if self
                    .pending
                    .get((bit0 + j) as usize)
                    .copied()
                    .unwrap_or(false)
                {
                    v |= 1 << j;
                }
            }
            *b = v;
        }
    }

    /// Read-modify helper for tests and debugging.
    pub fn entry(&self, v: usize) -> Option<(u64, u32, bool)> {
        let e = self.table.get(v)?;
        Some((
            e[0] as u64 | (e[1] as u64) << 32,
            e[2],
            e[3] & VECTOR_MASKED != 0,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Rec(Mutex<Vec<(u64, u32)>>);
    impl MsiSender for Rec {
        fn send(&self, a: u64, d: u32) {
            self.0.lock().unwrap().push((a, d));
        }
    }

    #[test]
    fn mask_pending_and_unmask() {
        let mut cfg = PciConfig::new(0x1af4, 0x1042, 0, 1);
        let mut m = Msix::new(3);
        m.add_capability(&mut cfg, 1, 0, 1, 0x800);
        let cap = cfg.u8(0x34) as u16;
        assert_eq!(cfg.u8(cap), CAP_ID);
        assert_eq!(cfg.u16(cap + 2), 2, "table size - 1");
        assert_eq!(cfg.u32(cap + 8), 0x801);
        let rec = Rec::default();
        assert!(!m.notify(0, &rec), "disabled");
        cfg.write(cap + 2, &[0xff, 0xff]);
        assert_eq!(cfg.u16(cap + 2), 0xc002);
        cfg.write(cap + 2, &[0, 0x80]);
        m.config_written(&cfg, &rec);
        m.table_write(16, &0xfee0_0000u32.to_le_bytes(), &rec);
        m.table_write(24, &0x4021u32.to_le_bytes(), &rec);
        assert!(m.notify(1, &rec));
        assert!(rec.0.lock().unwrap().is_empty(), "vector is masked");
        let mut p = [0u8; 8];
        m.pba_read(0, &mut p);
        assert_eq!(p[0], 2);
        m.table_write(28, &0u32.to_le_bytes(), &rec);
        assert_eq!(*rec.0.lock().unwrap(), vec![(0xfee0_0000, 0x4021)]);
        m.pba_read(0, &mut p);
        assert_eq!(p[0], 0);
        let mut d = [0u8; 4];
        m.table_read(24, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x4021);
        assert!(!m.notify(7, &rec), "no such vector");
    }
}
