//! The fuzzing harness of `usb-uas` (`cargo fuzz` target `usb_uas`,
//! replayed by `devices/tests/fuzz_corpus.rs`): IUs parsed, then pipe
//! transfers driven through a configured device with a disk at LUN 0 on
//! a null medium (whose I/O completes inline, so a run is deterministic).
//!
//! The property: no input panics or spins; every answer moves at most the
//! buffer's bytes; the tasks in flight stay bounded.
//!
//! Input: a first byte whose bit 0 picks SuperSpeed (streams) over high
//! speed, then operations, an opcode byte (modulo 8) and its operands; a
//! truncated operation ends the run.
//! - 0 `8 bytes`: a control transfer (buffer of wLength, at most 4 KiB);
//! - 1 `len bytes...`: a transfer on the command pipe;
//! - 2 `tag lun n cdb...`: a well-formed COMMAND IU with `n % 17` CDB
//!   bytes;
//! - 3 `stream l0 l1`: a status pipe transfer of `l0 | l1 << 8` bytes;
//! - 4 `stream l0 l1`: a data-in transfer (at most 64 KiB);
//! - 5 `stream len bytes...`: a data-out transfer;
//! - 6: a bus reset, then the device configured again;
//! - 7 `ep`: CLEAR_FEATURE(ENDPOINT_HALT) on `ep`, or SET_INTERFACE when
//!   bit 7 is clear.

use std::sync::Arc;

use block::backend::{BackendConfig, BlockBackend};
use block::graph::BlockGraph;

use super::iu::{self, HostIu};
use super::{UasOptions, UsbUas, EP_COMMAND, EP_DATA_IN, EP_DATA_OUT, EP_STATUS, MAX_TASKS};
use crate::scsi::Disk;
use crate::usb::setup::SetupPacket;
use crate::usb::{Speed, UsbDevice, UsbResult, VecData};

fn medium() -> Option<Arc<BlockBackend>> {
    let g = BlockGraph::new();
    let node = g
        .blockdev_add_str("driver=null-co,node-name=uas0,size=1048576,read-zeroes=on")
        .ok()?;
    BlockBackend::new("uas0", node, BackendConfig::default()).ok()
}

fn check(r: UsbResult, len: usize) {
    if let UsbResult::Ack(n) = r {
        assert!(n <= len, "moved {n} bytes of a {len}-byte buffer");
    }
}

fn configure(dev: &mut UsbUas) {
    for s in [[0u8, 5, 1, 0, 0, 0, 0, 0], [0, 9, 1, 0, 0, 0, 0, 0]] {
        dev.handle_control(&SetupPacket::parse(&s), &mut VecData::new(0));
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    // The parser alone, on the raw input.
    let _ = HostIu::parse(data.get(..iu::MAX_IU_LEN).unwrap_or(data));

    let Some(b) = medium() else { return };
    let Ok(disk) = Disk::new(b, Default::default()) else {
        return;
    };
    let mut dev = UsbUas::new(UasOptions::default());
    if dev.attach(0, Arc::new(disk)).is_err() {
        return;
    }
    let ss = data.first().is_some_and(|b| b & 1 != 0);
    dev.set_speed(if ss { Speed::Super } else { Speed::High });
    configure(&mut dev);
    let mut i = 1usize;
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
                check(dev.handle_control(&s, &mut VecData::new(len)), len);
            }
            1 => {
                let Some(&[n]) = take(1) else { break };
                let Some(b) = take(n as usize) else { break };
                let r = dev.handle_data(EP_COMMAND, 0, &mut VecData(b.to_vec()));
                check(r, b.len());
            }
            2 => {
                let Some(&[tag, lun, n]) = take(3) else {
                    break;
                };
                let Some(cdb) = take(n as usize % 17) else {
                    break;
                };
                let mut b = vec![1, 0, 0, tag, 0, 0, 0, 0];
                b.extend_from_slice(&iu::encode_lun(lun as u64 % 3));
                let mut c = [0u8; 16];
                c[..cdb.len()].copy_from_slice(cdb);
                b.extend_from_slice(&c);
                check(dev.handle_data(EP_COMMAND, 0, &mut VecData(b)), 32);
            }
            3 | 4 => {
                let Some(&[stream, l0, l1]) = take(3) else {
                    break;
                };
                let len = (l0 as usize | (l1 as usize) << 8).min(64 << 10);
                let ep = if op % 8 == 3 { EP_STATUS } else { EP_DATA_IN };
                let r = dev.handle_data(ep, stream as u32, &mut VecData::new(len));
                check(r, len);
            }
            5 => {
                let Some(&[stream, n]) = take(2) else { break };
                let Some(b) = take(n as usize) else { break };
                let r = dev.handle_data(EP_DATA_OUT, stream as u32, &mut VecData(b.to_vec()));
                check(r, b.len());
            }
            6 => {
                dev.reset();
                configure(&mut dev);
            }
            _ => {
                let Some(&[ep]) = take(1) else { break };
                let s = if ep & 0x80 == 0 {
                    [1, 11, ep & 1, 0, 0, 0, 0, 0]
                } else {
                    [2, 1, 0, 0, ep & 0x8f, 0, 0, 0]
                };
                dev.handle_control(&SetupPacket::parse(&s), &mut VecData::new(0));
            }
        }
        assert!(dev.tasks() <= MAX_TASKS);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds_run() {
        for s in super::super::tests::SEEDS {
            super::run(s.1);
        }
        super::run(&[]);
        super::run(&[0xff; 300]);
        super::run(&[0x00; 300]);
    }
}
