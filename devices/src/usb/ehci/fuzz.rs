//! The fuzzing harness of the EHCI's schedule (`cargo fuzz` target
//! `usb_ehci`, replayed by `devices/tests/fuzz_corpus.rs`): the input's
//! first bytes parsed as a queue head and a qTD, then the whole input
//! laid out as guest RAM that an EHCI walks as its periodic and
//! asynchronous schedules, with a high-speed usb-storage on port 1 on a
//! null medium (whose I/O completes inline, so a run is deterministic).
//!
//! The property: no input panics or spins; every frame ends.
//!
//! Input: bytes 0..4 ASYNCLISTADDR, 4..8 PERIODICLISTBASE, 8 the
//! schedule enables (bit 0 periodic, bit 1 async, bit 2 the doorbell), 9
//! the frames to run (modulo 16); addresses are taken modulo the 64 KiB
//! of RAM unless their bit 31 is set.

use std::sync::Arc;

use block::backend::{BackendConfig, BlockBackend};
use block::graph::BlockGraph;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::qh::{Link, Qh, QH_SIZE};
use super::qtd::{Qtd, QTD_SIZE};
use super::regs::{cmd, op, port};
use super::{Ehci, BAR_MEM};
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
        .blockdev_add_str("driver=null-co,node-name=ehci0,size=1048576,read-zeroes=on")
        .ok()?;
    BlockBackend::new("ehci0", node, BackendConfig::default()).ok()
}

fn word(data: &[u8], at: usize) -> u32 {
    let b: [u8; 4] = std::array::from_fn(|i| data.get(at + i).copied().unwrap_or(0));
    u32::from_le_bytes(b)
}

/// An address from the input: inside RAM unless bit 31 asks otherwise.
fn address(v: u32) -> u32 {
    if v & 0x8000_0000 != 0 {
        v
    } else {
        v % RAM
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    // The parsers alone.
    let qh: [u8; QH_SIZE] = std::array::from_fn(|i| data.get(i).copied().unwrap_or(0));
    let q = Qh::parse(&qh);
    let _ = Link::parse(q.link);
    let td: [u8; QTD_SIZE] = std::array::from_fn(|i| qh[i]);
    for mut t in [Qtd::parse(&td), q.overlay] {
        if let Ok(x) = t.transfer() {
            assert_eq!(x.segments.iter().map(|s| s.1).sum::<usize>(), x.len);
            assert!(x.segments.len() <= 5);
        }
        t.advance(t.bytes());
        assert_eq!(t.bytes(), 0);
    }

    // The controller over the input as RAM.
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]) else {
        return;
    };
    let n = data.len().min(RAM as usize);
    if mem.write_slice(&data[..n], GuestAddress(0)).is_err() {
        return;
    }
    let mut hc = Ehci::new(
        Arc::new(mem),
        Arc::new(NoIrq),
        Arc::new(ManualClock::default()),
    );
    hc.config_write(crate::pci::config::COMMAND, &[0x06, 0]);
    let Some(b) = medium() else { return };
    let Ok(disk) = Disk::new(b, Default::default()) else {
        return;
    };
    let dev = UsbStorage::new(StorageOptions::default());
    if dev.attach(0, Arc::new(disk)).is_err() || hc.attach(0, Box::new(dev)).is_err() {
        return;
    }
    let mut w = |off: u64, v: u32| hc.region_write(BAR_MEM, off, &v.to_le_bytes());
    w(op::CONFIGFLAG, 1);
    w(op::PORTSC, port::PR);
    w(op::PORTSC, 0);
    w(op::ASYNCLISTADDR, address(word(data, 0)));
    w(op::PERIODICLISTBASE, address(word(data, 4)));
    let sel = data.get(8).copied().unwrap_or(3);
    let mut c = cmd::RS;
    for (bit, flag) in [(1, cmd::PSE), (2, cmd::ASE), (4, cmd::IAAD)] {
        if sel & bit != 0 {
            c |= flag;
        }
    }
    w(op::USBINTR, 0x3f);
    w(op::USBCMD, c);
    let frames = data.get(9).copied().unwrap_or(4) % 16;
    for _ in 0..frames {
        hc.run_frame();
    }
}
