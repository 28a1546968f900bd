//! The fuzzing harness of the LSI53C895A (`cargo fuzz` target `lsi`,
//! replayed by `devices/tests/fuzz_corpus.rs`): register accesses, guest
//! memory and SCRIPTS RAM contents, and SCRIPTS started from anywhere, on
//! a chip with a disk at id 0, a CD-ROM at id 1 and a disk at id 2 LUN 1
//! (id 2 has no LUN 0), all on null media.
//!
//! The property: no input panics, spins or grows memory without bound;
//! every register access returns (the SCRIPTS budget ends runaway
//! programs).
//!
//! Input: a sequence of operations, each an opcode byte (taken modulo 8)
//! and its operands; a truncated operation ends the run.
//! - 0 `off val`: register write (BAR0);
//! - 1 `off`: register read;
//! - 2 `off b0 b1 b2 b3`: 32-bit register write (DSP at 0x2c starts the
//!   SCRIPTS);
//! - 3 `a0 a1 len bytes...`: write `len % 64` bytes of guest RAM at
//!   `(a0 | a1 << 8) << 4` (RAM is 1 MiB);
//! - 4 `o0 o1 len bytes...`: write SCRIPTS RAM at `(o0 | o1 << 8) % 8192`;
//! - 5 `b0 b1 b2 b3`: start the SCRIPTS at that address;
//! - 6 `off val`: PCI config write (command register and BARs only);
//! - 7: a read of every interrupt status register, as a driver's
//!   interrupt handler does.
//!
//! Guest addresses the programs use: RAM at 0..1 MiB, the register window
//! (BAR1) at [`MMIO_BASE`] and the SCRIPTS RAM (BAR2) at [`RAM_BASE`].

use std::sync::Arc;

use block::backend::{BackendConfig, BlockBackend};
use block::graph::BlockGraph;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::Lsi53c895a;
use crate::irq::NoIrq;
use crate::pci::PciFunction;
use crate::scsi::mmc::{CdRom, Transport};
use crate::scsi::{Disk, DiskOptions, Lun};

/// Guest RAM of the harness.
pub const RAM_SIZE: u64 = 1 << 20;
/// Where the harness maps BAR1 (the registers).
pub const MMIO_BASE: u32 = 0x0010_0000;
/// Where the harness maps BAR2 (the SCRIPTS RAM).
pub const RAM_BASE: u32 = 0x0010_2000;
/// BAR0.
pub const IO_BASE: u32 = 0xc000;

fn null(name: &str) -> Option<Arc<BlockBackend>> {
    let graph = BlockGraph::new();
    let node = graph
        .blockdev_add_str(&format!(
            "driver=null-co,node-name={name},size=1048576,read-zeroes=on"
        ))
        .ok()?;
    BlockBackend::new(name, node, BackendConfig::default()).ok()
}

/// A chip with its BARs mapped and bus mastering on, and its targets.
pub fn chip(mem: Arc<crate::GuestMem>) -> Option<Lsi53c895a> {
    let mut lsi = Lsi53c895a::new(mem, Arc::new(NoIrq));
    let disk = |name: &str| -> Option<Arc<dyn Lun>> {
        Some(Arc::new(
            Disk::new(null(name)?, DiskOptions::default()).ok()?,
        ))
    };
    lsi.attach(0, 0, disk("lsi-hd0")?).ok()?;
    let cd: Arc<dyn Lun> = Arc::new(CdRom::new(Transport::Scsi, Some(null("lsi-cd")?)));
    lsi.attach(1, 0, cd).ok()?;
    lsi.attach(2, 1, disk("lsi-hd2")?).ok()?;
    lsi.config_write(0x10, &IO_BASE.to_le_bytes());
    lsi.config_write(0x14, &MMIO_BASE.to_le_bytes());
    lsi.config_write(0x18, &RAM_BASE.to_le_bytes());
    lsi.config_write(0x04, &7u16.to_le_bytes());
    Some(lsi)
}

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE as usize)]) else {
        return;
    };
    let mem = Arc::new(mem);
    let Some(mut lsi) = chip(mem.clone()) else {
        return;
    };
    run_on(&mut lsi, &mem, data);
}

/// Runs `data` on a chip made by [`chip`] over `mem`.
pub fn run_on(lsi: &mut Lsi53c895a, mem: &crate::GuestMem, data: &[u8]) {
    let mut it = data.iter().copied();
    let mut next = || it.next();
    while let Some(op) = next() {
        match op % 8 {
            0 => {
                let (Some(o), Some(v)) = (next(), next()) else {
                    return;
                };
                lsi.region_write(0, o as u64, &[v]);
            }
            1 => {
                let Some(o) = next() else { return };
                let mut b = [0u8];
                lsi.region_read(0, o as u64, &mut b);
            }
            2 => {
                let Some(o) = next() else { return };
                let mut b = [0u8; 4];
                for x in &mut b {
                    let Some(v) = next() else { return };
                    *x = v;
                }
                lsi.region_write(1, o as u64, &b);
            }
            3 | 4 => {
                let (Some(a0), Some(a1), Some(len)) = (next(), next(), next()) else {
                    return;
                };
                let mut bytes = Vec::new();
                for _ in 0..len % 64 {
                    let Some(v) = next() else { return };
                    bytes.push(v);
                }
                let at = (a0 as u64 | (a1 as u64) << 8) << 4;
                if op % 8 == 3 {
                    let end = (at + bytes.len() as u64).min(RAM_SIZE);
                    let n = end.saturating_sub(at) as usize;
                    let _ = crate::dma::write_ram(mem, GuestAddress(at), &bytes[..n]);
                } else {
                    let o = (at >> 4) % super::chip::RAM_SIZE as u64;
                    lsi.region_write(2, o, &bytes);
                }
            }
            5 => {
                let mut b = [0u8; 4];
                for x in &mut b {
                    let Some(v) = next() else { return };
                    *x = v;
                }
                lsi.region_write(0, 0x2c, &b);
            }
            6 => {
                let (Some(o), Some(v)) = (next(), next()) else {
                    return;
                };
                let o = 0x04 + (o % 0x18) as u16;
                lsi.config_write(o, &[v]);
            }
            _ => {
                for o in [0x14u64, 0x0c, 0x42, 0x43] {
                    let mut b = [0u8];
                    lsi.region_read(0, o, &mut b);
                }
            }
        }
    }
}
