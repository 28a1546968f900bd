//! QEMU's firmware configuration device (fw_cfg), as QEMU documents it in
//! docs/specs/fw_cfg.rst: a 16-bit selector at 0x510, a byte-wide data port
//! at 0x511, and the DMA interface whose big-endian descriptor address is
//! written to 0x514 (high half) and 0x518 (low half; the write starts the
//! transfer). Register the device at 0x510 with length [`IO_LEN`].
//!
//! Everything the guest hands in over DMA is untrusted: the descriptor and
//! the buffer are read and written through bounds-checked guest-memory
//! accessors, and a bad address ends the transfer with the error bit set.

use std::collections::BTreeMap;

use vm_memory::{Bytes, GuestAddress};

use crate::bus::{le_value, put_le, BusDevice};
use crate::migration::DeviceState;
use crate::GuestMem;
use serde::{Deserialize, Serialize};

pub const IO_BASE: u64 = 0x510;
pub const IO_LEN: u64 = 0x0c;

pub const KEY_SIGNATURE: u16 = 0x00;
pub const KEY_ID: u16 = 0x01;
pub const KEY_RAM_SIZE: u16 = 0x03;
pub const KEY_NOGRAPHIC: u16 = 0x04;
pub const KEY_NB_CPUS: u16 = 0x05;
pub const KEY_MAX_CPUS: u16 = 0x0f;
pub const KEY_FILE_DIR: u16 = 0x19;
pub const KEY_FILE_FIRST: u16 = 0x20;
/// Bit 1 of the ID item: the DMA interface is present.
pub const ID_TRADITIONAL: u32 = 1 << 0;
pub const ID_DMA: u32 = 1 << 1;
/// What a read of the DMA address register returns: "QEMU CFG".
pub const DMA_SIGNATURE: u64 = 0x5145_4d55_2043_4647;

pub const DMA_CTL_ERROR: u32 = 1 << 0;
pub const DMA_CTL_READ: u32 = 1 << 1;
pub const DMA_CTL_SKIP: u32 = 1 << 2;
pub const DMA_CTL_SELECT: u32 = 1 << 3;
pub const DMA_CTL_WRITE: u32 = 1 << 4;

const FILE_NAME_LEN: usize = 56;

pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    files: Vec<(String, u16)>,
    selector: u16,
    offset: usize,
    dma_high: u32,
    mem: Option<GuestMem>,
}

impl FwCfg {
    /// `mem` is the guest memory DMA transfers use (`None` disables DMA).
    pub fn new(mem: Option<GuestMem>) -> Self {
        let mut f = FwCfg {
            items: BTreeMap::new(),
            files: Vec::new(),
            selector: 0,
            offset: 0,
            dma_high: 0,
            mem,
        };
        f.add_item(KEY_SIGNATURE, b"QEMU".to_vec());
        let id = ID_TRADITIONAL | if f.mem.is_some() { ID_DMA } else { 0 };
        f.add_item(KEY_ID, id.to_le_bytes().to_vec());
        f.rebuild_dir();
        f
    }

    pub fn add_item(&mut self, key: u16, data: Vec<u8>) {
        self.items.insert(key, data);
    }

    /// Adds (or replaces) a named file and returns its selector.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> u16 {
        assert!(
            name.len() < FILE_NAME_LEN,
            "fw_cfg file name too long: {name}"
        );
        let key = match self.files.iter().find(|(n, _)| n == name) {
            Some(&(_, k)) => k,
            None => {
                let k = KEY_FILE_FIRST + self.files.len() as u16;
                self.files.push((name.to_string(), k));
                k
            }
        };
        self.items.insert(key, data);
        self.rebuild_dir();
        key
    }

    pub fn item(&self, key: u16) -> Option<&[u8]> {
        self.items.get(&key).map(|v| v.as_slice())
    }

    /// The directory (key 0x19): a big-endian count, then for each file its
    /// big-endian size and selector, two reserved bytes, and a 56-byte name.
    /// Sorted by name, as QEMU does, so firmware may binary-search it.
    fn rebuild_dir(&mut self) {
        let mut files = self.files.clone();
        files.sort();
        let mut dir = (files.len() as u32).to_be_bytes().to_vec();
        for (name, key) in &files {
            let size = self.items.get(key).map_or(0, |d| d.len()) as u32;
            dir.extend_from_slice(&size.to_be_bytes());
            dir.extend_from_slice(&key.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut n = [0u8; FILE_NAME_LEN];
            n[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&n);
        }
        self.items.insert(KEY_FILE_DIR, dir);
    }

    fn select(&mut self, key: u16) {
        self.selector = key;
        self.offset = 0;
    }

    fn current(&self) -> &[u8] {
        self.items.get(&self.selector).map_or(&[], |v| v.as_slice())
    }

    fn read_data_byte(&mut self) -> u8 {
        let b = self.current().get(self.offset).copied().unwrap_or(0);
        self.offset = self.offset.saturating_add(1);
        b
    }

    /// Runs the DMA descriptor at guest physical `addr`.
    pub fn dma(&mut self, addr: u64) {
        let Some(mem) = self.mem.clone() else { return };
        let mut desc = [0u8; 16];
        if mem.read_slice(&mut desc, GuestAddress(addr)).is_err() {
            return;
        }
        let control = u32::from_be_bytes(desc[0..4].try_into().unwrap());
        let mut length = u32::from_be_bytes(desc[4..8].try_into().unwrap()) as usize;
        let mut target = u64::from_be_bytes(desc[8..16].try_into().unwrap());
        if control & DMA_CTL_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let mut status = 0u32;
        if control & (DMA_CTL_READ | DMA_CTL_WRITE | DMA_CTL_SKIP) != 0 {
            // No item is guest-writable yet, so a write is an error.
            if control & DMA_CTL_READ == 0 && control & DMA_CTL_WRITE != 0 {
                status = DMA_CTL_ERROR;
            }
            while length > 0 && status == 0 {
                let data = self.current();
                let avail = data.len().saturating_sub(self.offset);
                let n = if avail == 0 {
                    length
                } else {
                    avail.min(length)
                };
                if control & DMA_CTL_READ != 0 {
                    let ok = if avail == 0 {
                        zero_fill(&mem, target, n)
                    } else {
                        let src = &data[self.offset..self.offset + n];
                        mem.write_slice(src, GuestAddress(target)).is_ok()
                    };
                    if !ok {
                        status = DMA_CTL_ERROR;
                        break;
                    }
                }
                self.offset = self.offset.saturating_add(n);
                target = target.wrapping_add(n as u64);
                length -= n;
            }
        }
        let _ = mem.write_slice(&status.to_be_bytes(), GuestAddress(addr));
    }
}

/// Where the guest is in fw_cfg: the selected item, how far into it it
/// has read, and the DMA address's high half if only that was written.
/// The items themselves are rebuilt from the command line on the
/// destination.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FwCfgState {
    pub selector: u16,
    pub offset: u64,
    pub dma_high: u32,
}

impl DeviceState for FwCfg {
    const VERSION: u32 = 1;
    type State = FwCfgState;
    fn save_state(&self) -> FwCfgState {
        FwCfgState {
            selector: self.selector,
            offset: self.offset as u64,
            dma_high: self.dma_high,
        }
    }
    fn load_state(&mut self, s: FwCfgState, _version: u32) -> Result<(), String> {
        // Past an item's end reads as zeroes, so any offset is harmless;
        // one that does not fit this host's usize saturates the same way.
        self.selector = s.selector;
        self.offset = usize::try_from(s.offset).unwrap_or(usize::MAX);
        self.dma_high = s.dma_high;
        Ok(())
    }
}

fn zero_fill(mem: &GuestMem, mut addr: u64, mut n: usize) -> bool {
    let zeros = [0u8; 4096];
    while n > 0 {
        let c = n.min(zeros.len());
        if mem.write_slice(&zeros[..c], GuestAddress(addr)).is_err() {
            return false;
        }
        addr = addr.wrapping_add(c as u64);
        n -= c;
    }
    true
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 => put_le(data, self.selector as u64),
            1 => {
                for b in data.iter_mut() {
                    *b = self.read_data_byte();
                }
            }
            4..=11 => {
                // The DMA register reads as the signature, big-endian.
                let sig = DMA_SIGNATURE.to_be_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = sig.get(offset as usize - 4 + i).copied().unwrap_or(0);
                }
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 2) => self.select(le_value(data) as u16),
            (4, 4) => self.dma_high = u32::from_be_bytes(data.try_into().unwrap()),
            (8, 4) => {
                let low = u32::from_be_bytes(data.try_into().unwrap());
                let addr = ((self.dma_high as u64) << 32) | low as u64;
                self.dma_high = 0;
                self.dma(addr);
            }
            (4, 8) => {
                let addr = u64::from_be_bytes(data.try_into().unwrap());
                self.dma(addr);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    #[test]
    fn io_signature_and_dir() {
        let mut f = FwCfg::new(None);
        f.add_file("etc/e820", vec![1, 2, 3]);
        f.write(0, &0u16.to_le_bytes());
        let mut sig = [0u8; 4];
        for b in sig.iter_mut() {
            let mut d = [0];
            f.read(1, &mut d);
            *b = d[0];
        }
        assert_eq!(&sig, b"QEMU");
        let dir = f.item(KEY_FILE_DIR).unwrap();
        assert_eq!(&dir[0..4], &[0, 0, 0, 1]);
        assert_eq!(&dir[4..8], &[0, 0, 0, 3]);
        assert_eq!(&dir[8..10], &KEY_FILE_FIRST.to_be_bytes());
        assert_eq!(&dir[12..20], b"etc/e820");
    }

    #[test]
    fn fw_cfg_migrates_the_read_position() {
        let mk = || {
            let mut f = FwCfg::new(None);
            f.add_file("etc/e820", vec![1, 2, 3, 4]);
            f
        };
        let mut a = mk();
        a.write(0, &KEY_FILE_FIRST.to_le_bytes());
        let mut d = [0u8];
        a.read(1, &mut d);
        a.write(4, &0x1234u32.to_be_bytes());
        let mut b = mk();
        crate::migration::round_trip(&a, &mut b);
        b.read(1, &mut d);
        assert_eq!(d[0], 2, "the next byte of the file");
        let e = crate::migration::load_edited(&a, &mut b, |v| v["bogus"] = 1.into());
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn dma_read_and_errors() {
        let m = mem();
        let mut f = FwCfg::new(Some(m.clone()));
        let mut desc = Vec::new();
        desc.extend_from_slice(&(DMA_CTL_SELECT | DMA_CTL_READ).to_be_bytes());
        desc.extend_from_slice(&8u32.to_be_bytes());
        desc.extend_from_slice(&0x2000u64.to_be_bytes());
        m.write_slice(&desc, GuestAddress(0x1000)).unwrap();
        f.write(4, &0u32.to_be_bytes());
        f.write(8, &0x1000u32.to_be_bytes());
        let mut out = [0u8; 8];
        m.read_slice(&mut out, GuestAddress(0x2000)).unwrap();
        assert_eq!(&out, b"QEMU\0\0\0\0", "past the end reads as zeros");
        let mut ctl = [0u8; 4];
        m.read_slice(&mut ctl, GuestAddress(0x1000)).unwrap();
        assert_eq!(u32::from_be_bytes(ctl), 0);

        // A buffer outside guest memory sets the error bit and does not panic.
        desc[8..16].copy_from_slice(&0xffff_fff0u64.to_be_bytes());
        m.write_slice(&desc, GuestAddress(0x1000)).unwrap();
        f.write(8, &0x1000u32.to_be_bytes());
        m.read_slice(&mut ctl, GuestAddress(0x1000)).unwrap();
        assert_eq!(u32::from_be_bytes(ctl), DMA_CTL_ERROR);
        // So does a descriptor outside guest memory (nothing to report into).
        f.write(8, &0xfff0_0000u32.to_be_bytes());
    }
}
