//! The fuzzing harness of the UHCI's frame list walk (`cargo fuzz`
//! target `usb_uhci`, replayed by `devices/tests/fuzz_corpus.rs`): the
//! input's first bytes parsed as a link pointer, a queue head and a TD,
//! then the whole input laid out as guest RAM that a UHCI walks as its
//! frame list, queue heads and TDs, with a full-speed usb-storage on
//! port 1 over a null medium (whose I/O completes inline, so a run is
//! deterministic).
//!
//! The property: no input panics or spins; every frame ends.
//!
//! Input: bytes 0..4 FLBASEADD (taken modulo the 64 KiB of RAM, 4 KiB
//! aligned, unless bit 31 is set), byte 4 the frames to run (modulo 16),
//! byte 5 USBINTR.

use std::sync::Arc;

use block::backend::{BackendConfig, BlockBackend};
use block::graph::BlockGraph;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::schedule::{Link, Qh, Td};
use super::{cmd, port, reg, Uhci, BAR_IO};
use crate::clock::ManualClock;
use crate::irq::IrqLine;
use crate::pci::PciFunction;
use crate::scsi::Disk;
use crate::usb::storage::{StorageOptions, UsbStorage};

const RAM: u32 = 0x1_0000;

struct NoIrq;
impl IrqLine for NoIrq {
    fn set_level(&self, _: bool) {}
}

fn medium() -> Option<Arc<BlockBackend>> {
    let g = BlockGraph::new();
    let node = g
        .blockdev_add_str("driver=null-co,node-name=uhci0,size=1048576,read-zeroes=on")
        .ok()?;
    BlockBackend::new("uhci0", node, BackendConfig::default()).ok()
}

/// Runs one input.
pub fn run(data: &[u8]) {
    // The parsers alone.
    let b: [u8; 16] = std::array::from_fn(|i| data.get(i).copied().unwrap_or(0));
    let _ = Link::parse(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let _ = Qh::parse(&std::array::from_fn(|i| b[i]));
    let td = Td::parse(&b);
    let _ = td.active();
    if let Ok(t) = td.token() {
        assert!(t.len <= 1280, "a TD's maximum length is 1280 bytes");
    }

    // The controller over the input as RAM.
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]) else {
        return;
    };
    let n = data.len().min(RAM as usize);
    if mem.write_slice(&data[..n], GuestAddress(0)).is_err() {
        return;
    }
    let mut hc = Uhci::new(
        Arc::new(mem),
        Arc::new(NoIrq),
        Arc::new(ManualClock::default()),
    );
    hc.config_write(crate::pci::config::COMMAND, &[0x05, 0]);
    let Some(b) = medium() else { return };
    let Ok(disk) = Disk::new(b, Default::default()) else {
        return;
    };
    let dev = UsbStorage::new(StorageOptions::default());
    if dev.attach(0, Arc::new(disk)).is_err() || hc.attach(0, Box::new(dev)).is_err() {
        return;
    }
    let mut w16 = |off: u64, v: u16| hc.region_write(BAR_IO, off, &v.to_le_bytes());
    w16(reg::PORTSC1, port::PR);
    w16(reg::PORTSC1, 0);
    w16(reg::PORTSC1, port::PE);
    w16(
        reg::USBINTR,
        data.get(5).copied().unwrap_or(0xf) as u16 & 0xf,
    );
    let base = u32::from_le_bytes(std::array::from_fn(|i| data.get(i).copied().unwrap_or(0)));
    let base = if base & 0x8000_0000 != 0 {
        base
    } else {
        (base % RAM) & !0xfff
    };
    hc.region_write(BAR_IO, reg::FLBASEADD, &base.to_le_bytes());
    hc.region_write(BAR_IO, reg::USBCMD, &(cmd::RS | cmd::MAXP).to_le_bytes());
    let frames = data.get(4).copied().unwrap_or(4) % 16;
    for _ in 0..frames {
        hc.run_frame();
    }
}
