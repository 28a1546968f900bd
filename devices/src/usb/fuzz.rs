//! The fuzzing harness of the USB device side (`cargo fuzz` target
//! `usb_bot`, replayed by `devices/tests/fuzz_corpus.rs`): setup packets
//! and CBWs parsed, then driven through a `usb-storage` with a disk at
//! LUN 0 on a null medium (whose I/O completes inline, so a run is
//! deterministic), both whole (as xHCI would) and as packets through a
//! [`ControlPipe`] (as UHCI does).
//!
//! The property: no input panics or spins; every answer moves at most
//! the buffer's bytes.
//!
//! Input: a sequence of operations, an opcode byte (modulo 8) and its
//! operands; a truncated operation ends the run.
//! - 0 `8 bytes`: a control transfer, whole (buffer of wLength, at most
//!   4 KiB);
//! - 1 `31 bytes`: a CBW-sized bulk OUT packet;
//! - 2 `len bytes...`: a bulk OUT packet of `len` bytes;
//! - 3 `l0 l1`: a bulk IN packet of `l0 | l1 << 8` bytes (at most 16 KiB);
//! - 4 `pid len bytes...`: a packet on endpoint 0 through the control
//!   pipe (pid modulo 3: SETUP, IN, OUT);
//! - 5: a bus reset;
//! - 6 `ep`: CLEAR_FEATURE(ENDPOINT_HALT) on `ep`, and the class reset
//!   when bit 7 of `ep` is clear;
//! - 7 `cdb-len bytes...`: a well-formed CBW for the CDB that follows,
//!   direction and length from its first byte.

use std::sync::Arc;

use block::backend::{BackendConfig, BlockBackend};
use block::graph::BlockGraph;

use super::bot::Cbw;
use super::control::{ControlPipe, Pid};
use super::setup::{Request, SetupPacket};
use super::storage::{StorageOptions, UsbStorage, EP_IN, EP_OUT};
use super::{Dir, UsbDevice, UsbResult, VecData};
use crate::scsi::Disk;

fn medium() -> Option<Arc<BlockBackend>> {
    let g = BlockGraph::new();
    let node = g
        .blockdev_add_str("driver=null-co,node-name=usb0,size=1048576,read-zeroes=on")
        .ok()?;
    BlockBackend::new("usb0", node, BackendConfig::default()).ok()
}

fn check(r: UsbResult, len: usize) {
    if let UsbResult::Ack(n) = r {
        assert!(n <= len, "moved {n} bytes of a {len}-byte buffer");
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    // The parsers alone, on the raw input.
    if let Ok(b) = <[u8; 8]>::try_from(data.get(..8).unwrap_or(&[])) {
        let _ = Request::parse(&SetupPacket::parse(&b));
    }
    let _ = Cbw::parse(data.get(..31).unwrap_or(data));

    let Some(b) = medium() else { return };
    let Ok(disk) = Disk::new(b, Default::default()) else {
        return;
    };
    let mut dev = UsbStorage::new(StorageOptions::default());
    if dev.attach(0, Arc::new(disk)).is_err() {
        return;
    }
    dev.set_speed(super::Speed::Full);
    // Configured, so that the bulk endpoints answer.
    for s in [[0u8, 5, 1, 0, 0, 0, 0, 0], [0, 9, 1, 0, 0, 0, 0, 0]] {
        dev.handle_control(&SetupPacket::parse(&s), &mut VecData::new(0));
    }
    let mut pipe = ControlPipe::new();
    let mut i = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = data.get(i..i.checked_add(n)?)?;
        i += n;
        Some(s)
    };
    // Bounded: every operation consumes at least one byte.
    while let Some(&[op]) = take(1) {
        match op % 8 {
            0 => {
                let Some(b) = take(8) else { break };
                let s = SetupPacket::parse(&b.try_into().unwrap_or([0; 8]));
                let len = (s.length as usize).min(4096);
                let r = dev.handle_control(&s, &mut VecData::new(len));
                check(r, len);
            }
            1 => {
                let Some(b) = take(31) else { break };
                check(dev.handle_data(EP_OUT, 0, &mut VecData(b.to_vec())), 31);
            }
            2 => {
                let Some(&[n]) = take(1) else { break };
                let Some(b) = take(n as usize) else { break };
                check(
                    dev.handle_data(EP_OUT, 0, &mut VecData(b.to_vec())),
                    b.len(),
                );
            }
            3 => {
                let Some(&[l0, l1]) = take(2) else { break };
                let len = (l0 as usize | (l1 as usize) << 8).min(16 << 10);
                check(dev.handle_data(EP_IN, 0, &mut VecData::new(len)), len);
            }
            4 => {
                let Some(&[p, n]) = take(2) else { break };
                let Some(b) = take(n as usize % 72) else {
                    break;
                };
                let pid = [Pid::Setup, Pid::In, Pid::Out][p as usize % 3];
                let mut buf = VecData(b.to_vec());
                check(pipe.packet(&mut dev, pid, &mut buf), b.len());
            }
            5 => {
                dev.reset();
                pipe.reset();
                for s in [[0u8, 5, 1, 0, 0, 0, 0, 0], [0, 9, 1, 0, 0, 0, 0, 0]] {
                    dev.handle_control(&SetupPacket::parse(&s), &mut VecData::new(0));
                }
            }
            6 => {
                let Some(&[ep]) = take(1) else { break };
                if ep & 0x80 == 0 {
                    let s = SetupPacket::parse(&[0x21, 0xff, 0, 0, 0, 0, 0, 0]);
                    dev.handle_control(&s, &mut VecData::new(0));
                }
                for a in [0x81u8, 0x02] {
                    let s = SetupPacket::parse(&[2, 1, 0, 0, a, 0, 0, 0]);
                    dev.handle_control(&s, &mut VecData::new(0));
                }
            }
            _ => {
                let Some(&[n]) = take(1) else { break };
                let Some(cdb) = take(n as usize % 17) else {
                    break;
                };
                let first = cdb.first().copied().unwrap_or(0);
                let dir = if first & 1 != 0 { Dir::In } else { Dir::Out };
                let len = (first as u32) << 4;
                let cbw = Cbw::new(1, len, dir, 0, cdb).to_bytes();
                check(dev.handle_data(EP_OUT, 0, &mut VecData(cbw.to_vec())), 31);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds_run() {
        // READ(10) of one block, then the data and the CSW.
        let mut d = vec![7, 10, 0x28, 0, 0, 0, 0, 0, 0, 1, 0, 0];
        d.extend_from_slice(&[3, 0, 2, 3, 13, 0]);
        // An invalid CBW, then reset recovery.
        d.extend_from_slice(&[2, 3, 1, 2, 3, 6, 0, 7, 6, 0, 0, 0, 0, 0, 0, 3, 13, 0]);
        // Enumeration through the pipe.
        d.extend_from_slice(&[
            4, 0, 8, 0x80, 6, 0, 1, 0, 0, 18, 0, 4, 1, 8, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
        super::run(&d);
        super::run(&[]);
        super::run(&[0xff; 300]);
    }
}
