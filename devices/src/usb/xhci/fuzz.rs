//! The fuzzing harness of the xHCI rings (`cargo fuzz` target
//! `xhci_ring`, replayed by `devices/tests/fuzz_corpus.rs`).
//!
//! The input is guest memory: its first [`INPUT_MAX`] bytes are copied
//! to address 0 of a 64 KiB guest, where the command ring starts at
//! [`CMD_RING`] and the DCBAA is at [`DCBAA`], so that every TRB,
//! context and pointer is the input's. The harness owns the event ring
//! above it. It parses every 16 bytes as a TRB (transfer and command),
//! walks the input as a transfer ring (TDs and control transfers) and as
//! a command ring, then runs a started controller with a usb-storage
//! (on a null medium whose I/O completes inline) on each of USB 3
//! ports 5 and 6: the command ring's doorbell, every slot's
//! first endpoints' doorbells, the commands again, woken endpoints.
//!
//! The property: nothing panics or spins, and the controller never
//! writes outside guest RAM (it cannot: every access is checked).

use std::sync::Arc;

use block::backend::{BackendConfig, BlockBackend};
use block::graph::BlockGraph;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::regs::{cmd, iman, op, rt, DOORBELL, OPER, RUNTIME};
use super::ring::Ring;
use super::trb::{Command, TransferTrb, Trb};
use super::{Xhci, XhciOptions, BAR_MMIO};
use crate::clock::ManualClock;
use crate::irq::NoIrq;
use crate::pci::msix::NoMsi;
use crate::pci::PciFunction;
use crate::scsi::Disk;
use crate::usb::storage::{StorageOptions, UsbStorage};

const RAM: usize = 0x1_0000;
/// Input bytes used at most: below the harness's event ring.
pub const INPUT_MAX: usize = 0xe000;
pub const DCBAA: u64 = 0x800;
pub const CMD_RING: u64 = 0x1000;
const EV_RING: u64 = 0xe000;
const ERST: u64 = 0xf000;

fn storage() -> Option<UsbStorage> {
    let g = BlockGraph::new();
    let node = g
        .blockdev_add_str("driver=null-co,node-name=x0,size=1048576,read-zeroes=on")
        .ok()?;
    let b = BlockBackend::new("x0", node, BackendConfig::default()).ok()?;
    let disk = Disk::new(b, Default::default()).ok()?;
    let dev = UsbStorage::new(StorageOptions::default());
    dev.attach(0, Arc::new(disk)).ok()?;
    Some(dev)
}

fn w32(x: &mut Xhci, off: u64, v: u32) {
    x.region_write(BAR_MMIO, off, &v.to_le_bytes());
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let input = &data[..data.len().min(INPUT_MAX)];
    // The parsers alone.
    for c in input.chunks_exact(16) {
        let t = Trb::from_bytes(c.try_into().unwrap_or(&[0; 16]));
        let _ = TransferTrb::parse(&t);
        let _ = Command::parse(&t);
    }
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]) else {
        return;
    };
    if mem.write_slice(input, GuestAddress(0)).is_err() {
        return;
    }
    // The walkers, bounded by themselves.
    for start in [0u64, CMD_RING, 0x2000] {
        let mut r = Ring::new(start, true);
        for _ in 0..64 {
            match r.read_control_td(&mem) {
                Ok(Some((_, next))) => r = next,
                _ => break,
            }
        }
        let mut r = Ring::new(start, true);
        for _ in 0..1024 {
            match r.next(&mem) {
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    }
    // The controller.
    let mem = Arc::new(mem);
    let Ok(mut x) = Xhci::new(
        mem.clone(),
        Arc::new(NoIrq),
        Arc::new(NoMsi),
        Arc::new(ManualClock::default()),
        XhciOptions::qemu(),
    ) else {
        return;
    };
    x.config_write(crate::pci::config::COMMAND, &[0x06, 0]);
    for (i, d) in [(0, storage()), (1, storage())] {
        let Some(d) = d else { return };
        let _ = x.attach(i, Box::new(d));
    }
    let _ = mem.write_obj(EV_RING, GuestAddress(ERST));
    let _ = mem.write_obj(256u32, GuestAddress(ERST + 8));
    w32(&mut x, OPER + op::CONFIG, 8);
    w32(&mut x, OPER + op::DCBAAP_LO, DCBAA as u32);
    w32(&mut x, OPER + op::CRCR_LO, CMD_RING as u32 | 1);
    let ir = RUNTIME + rt::IR0;
    w32(&mut x, ir + rt::ERSTSZ, 1);
    w32(&mut x, ir + rt::ERDP_LO, EV_RING as u32);
    w32(&mut x, ir + rt::ERSTBA_LO, ERST as u32);
    w32(&mut x, ir + rt::IMAN, iman::IE);
    w32(&mut x, OPER + op::USBCMD, cmd::RS | cmd::INTE);
    w32(&mut x, DOORBELL, 0);
    for slot in 1..=4u64 {
        for target in 1..=4u32 {
            w32(&mut x, DOORBELL + 4 * slot, target);
        }
    }
    // The driver consumed every event: the ring has room again.
    w32(&mut x, ir + rt::ERDP_LO, EV_RING as u32 | 8);
    w32(&mut x, DOORBELL, 0);
    for slot in 1..=4u64 {
        w32(&mut x, DOORBELL + 4 * slot, 1);
        w32(&mut x, DOORBELL + 4 * slot, 3 | 1 << 16);
    }
    x.process_wakeups();
    // Hot-unplug with slots using the ports, and a reset.
    let _ = x.detach(0);
    w32(&mut x, DOORBELL + 4, 3);
    x.reset();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seed: Enable Slot, Address Device for port 5 with its input
    /// context in the input, and a GET_DESCRIPTOR on ep0; then the
    /// same with a looping link.
    pub fn seed() -> Vec<u8> {
        let mut m = vec![0u8; 0x5000];
        let put = |m: &mut Vec<u8>, at: usize, b: &[u8]| m[at..at + b.len()].copy_from_slice(b);
        let trb = |p: u64, s: u32, c: u32| {
            let t = Trb {
                param: p,
                status: s,
                control: c | 1,
            };
            t.to_bytes()
        };
        put(&mut m, DCBAA as usize + 8, &0x3000u64.to_le_bytes());
        put(&mut m, CMD_RING as usize, &trb(0, 0, 9 << 10));
        put(
            &mut m,
            CMD_RING as usize + 16,
            &trb(0x2000, 0, 11 << 10 | 1 << 24),
        );
        put(&mut m, CMD_RING as usize + 32, &trb(CMD_RING, 0, 6 << 10));
        put(&mut m, 0x2004, &3u32.to_le_bytes());
        put(&mut m, 0x2020, &(1u32 << 27).to_le_bytes());
        put(&mut m, 0x2024, &(5u32 << 16).to_le_bytes());
        put(&mut m, 0x2044, &(512u32 << 16 | 4 << 3).to_le_bytes());
        put(&mut m, 0x2048, &0x4001u32.to_le_bytes());
        let setup = u64::from_le_bytes([0x80, 6, 0, 1, 0, 0, 18, 0]);
        put(&mut m, 0x4000, &trb(setup, 8, 2 << 10 | 1 << 6 | 3 << 16));
        put(&mut m, 0x4010, &trb(0x4800, 18, 3 << 10 | 1 << 16));
        put(&mut m, 0x4020, &trb(0, 0, 4 << 10 | 1 << 5));
        put(&mut m, 0x4030, &trb(0x4000, 0, 6 << 10));
        m
    }

    #[test]
    fn seed_runs() {
        run(&seed());
        run(&[]);
        run(&[0xff; 0x10000]);
    }
}
