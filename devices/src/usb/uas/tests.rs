//! usb-uas driven as a host would, through the [`UsbDevice`] trait,
//! against real SCSI disks on real backends, at high speed (READY IUs)
//! and at SuperSpeed (streams).

use std::sync::mpsc;
use std::time::Duration;

use super::iu::{encode_lun, id, response};
use super::*;
use crate::scsi::testutil::{self, TempImage};
use crate::scsi::Disk;
use crate::usb::VecData;
use block::backend::{BackendConfig, BlockBackend};

const MIB: u64 = 1 << 20;

/// Fuzz seeds (also in fuzz/corpus/usb_uas): name and input.
pub(super) const SEEDS: &[(&str, &[u8])] = &[
    (
        "hs_inquiry",
        &[
            0, 2, 1, 0, 6, 0x12, 0, 0, 0, 36, 0, 3, 0, 0, 2, 2, 2, 0, 6, 0x12, 0, 0, 0, 36, 0, 3,
            0, 0, 2, 4, 0, 0, 2, 3, 0, 0, 2,
        ],
    ),
    (
        "ss_read10",
        &[
            1, 2, 1, 0, 0, 3, 1, 0, 2, 2, 2, 0, 10, 0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0, 4, 2, 0, 2, 3,
            2, 0, 2,
        ],
    ),
    (
        "hs_bad_iu_and_tmf",
        &[
            0, 1, 4, 9, 0, 0, 1, 1, 16, 5, 0, 0, 3, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 2,
            3, 0, 0, 2, 1, 2, 1, 0, 7, 2, 3, 0, 0, 2,
        ],
    ),
    (
        "ss_reset",
        &[
            1, 2, 5, 0, 0, 6, 4, 5, 0, 2, 7, 0x83, 0, 0, 6, 0, 2, 0, 0, 0, 0x12, 0,
        ],
    ),
];

/// Writes the seeds to fuzz/corpus/usb_uas (run by hand:
/// `cargo test -p devices usb::uas::tests::write_seeds -- --ignored`).
#[test]
#[ignore]
fn write_seeds() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/usb_uas");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, data) in SEEDS {
        std::fs::write(dir.join(name), data).unwrap();
    }
}

struct Host {
    dev: UsbUas,
    wakeups: mpsc::Receiver<Endpoint>,
}

fn disk_on(b: Arc<BlockBackend>) -> Arc<dyn Lun> {
    Arc::new(Disk::new(b, Default::default()).unwrap())
}

fn null_disk() -> Arc<dyn Lun> {
    disk_on(testutil::null(16 * MIB))
}

/// A COMMAND IU for `cdb` at `lun`.
fn command_iu(tag: u16, lun: u64, cdb: &[u8]) -> Vec<u8> {
    let t = tag.to_be_bytes();
    let mut v = vec![id::COMMAND, 0, t[0], t[1], 0, 0, 0, 0];
    v.extend_from_slice(&encode_lun(lun));
    let mut c = [0u8; 16];
    c[..cdb.len()].copy_from_slice(cdb);
    v.extend_from_slice(&c);
    v
}

fn tmf_iu(tag: u16, function: u8, task_tag: u16, lun: u64) -> Vec<u8> {
    let t = tag.to_be_bytes();
    let k = task_tag.to_be_bytes();
    let mut v = vec![id::TASK_MANAGEMENT, 0, t[0], t[1], function, 0, k[0], k[1]];
    v.extend_from_slice(&encode_lun(lun));
    v
}

fn cdb10(op: u8, lba: u32, blocks: u16) -> Vec<u8> {
    testutil::cdb10(op, 0, lba, blocks)[..10].to_vec()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(13)
                .wrapping_add(seed ^ (i >> 9) as u8)
        })
        .collect()
}

/// A status IU as the host reads it.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    ReadReady(u16),
    WriteReady(u16),
    Sense {
        tag: u16,
        status: u8,
        /// (key, ASC) when there is sense data.
        sense: Option<(u8, u8)>,
    },
    Response(u16, u8),
}

fn parse_status(b: &[u8]) -> Got {
    let tag = u16::from_be_bytes([b[2], b[3]]);
    match b[0] {
        id::READ_READY => Got::ReadReady(tag),
        id::WRITE_READY => Got::WriteReady(tag),
        id::SENSE => {
            let len = u16::from_be_bytes([b[14], b[15]]) as usize;
            assert_eq!(b.len(), 16 + len);
            Got::Sense {
                tag,
                status: b[6],
                sense: (len > 0).then(|| (b[16 + 2] & 0xf, b[16 + 12])),
            }
        }
        id::RESPONSE => {
            assert_eq!(b.len(), 8);
            Got::Response(tag, b[7])
        }
        x => panic!("IU {x:#x}"),
    }
}

fn good(tag: u16) -> Got {
    Got::Sense {
        tag,
        status: 0,
        sense: None,
    }
}

impl Host {
    /// A device at `speed` with `units` attached, addressed and
    /// configured, alt 0 selected.
    fn new(speed: Speed, units: &[(u64, Arc<dyn Lun>)]) -> Host {
        let mut dev = UsbUas::new(UasOptions::default());
        for (l, u) in units {
            dev.attach(*l, u.clone()).unwrap();
        }
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        dev.set_speed(speed);
        dev.set_wakeup(Some(Arc::new(move |ep| {
            let _ = lock(&tx).send(ep);
        })));
        let mut h = Host { dev, wakeups: rx };
        assert_eq!(h.control([0, 5, 3, 0, 0, 0, 0, 0], 0).0, UsbResult::Ack(0));
        assert_eq!(h.control([0, 9, 1, 0, 0, 0, 0, 0], 0).0, UsbResult::Ack(0));
        assert_eq!(h.control([1, 11, 0, 0, 0, 0, 0, 0], 0).0, UsbResult::Ack(0));
        h
    }

    /// A host with a disk at LUN 0 whose power-on UNIT ATTENTION is
    /// consumed.
    fn with_disk(speed: Speed, unit: Arc<dyn Lun>) -> Host {
        let mut h = Host::new(speed, &[(0, unit)]);
        let tag = 1;
        h.send(&command_iu(tag, 0, &[0; 6]));
        assert_eq!(
            h.status(tag),
            Got::Sense {
                tag,
                status: 2,
                sense: Some((6, 0x29))
            }
        );
        h
    }

    fn streams(&self) -> bool {
        self.dev.speed() == Speed::Super
    }

    fn stream(&self, tag: u16) -> u32 {
        if self.streams() {
            tag as u32
        } else {
            0
        }
    }

    fn control(&mut self, setup: [u8; 8], len: usize) -> (UsbResult, Vec<u8>) {
        let s = SetupPacket::parse(&setup);
        let mut d = VecData::new(len.max(s.length as usize));
        let r = self.dev.handle_control(&s, &mut d);
        let n = match r {
            UsbResult::Ack(n) => n,
            _ => 0,
        };
        d.0.truncate(n);
        (r, d.0)
    }

    /// One transfer, NAKs waited out on the wakeup.
    fn xfer(&mut self, ep: Endpoint, stream: u32, buf: &mut VecData) -> UsbResult {
        loop {
            match self.dev.handle_data(ep, stream, buf) {
                UsbResult::Nak => {
                    let woken = self
                        .wakeups
                        .recv_timeout(Duration::from_secs(10))
                        .expect("a NAKed endpoint is woken");
                    let _ = woken;
                }
                r => return r,
            }
        }
    }

    fn send(&mut self, iu: &[u8]) {
        let r = self
            .dev
            .handle_data(EP_COMMAND, 0, &mut VecData(iu.to_vec()));
        assert_eq!(r, UsbResult::Ack(iu.len()));
    }

    /// The next status IU (of `tag`'s stream at SuperSpeed).
    fn status(&mut self, tag: u16) -> Got {
        let mut b = VecData::new(1024);
        let s = self.stream(tag);
        match self.xfer(EP_STATUS, s, &mut b) {
            UsbResult::Ack(n) => parse_status(&b.0[..n]),
            r => panic!("status: {r:?}"),
        }
    }

    /// Reads up to `len` bytes of `tag`'s data in transfers of `pkt`.
    fn data_in(&mut self, tag: u16, len: usize, pkt: usize) -> Vec<u8> {
        let mps = if self.streams() { 1024 } else { 512 };
        let mut out = Vec::new();
        while out.len() < len {
            let n = pkt.min(len - out.len());
            let mut b = VecData::new(n);
            let s = self.stream(tag);
            match self.xfer(EP_DATA_IN, s, &mut b) {
                UsbResult::Ack(k) => {
                    out.extend_from_slice(&b.0[..k]);
                    if k < n && (k == 0 || k % mps != 0) {
                        break;
                    }
                }
                r => panic!("data in: {r:?}"),
            }
        }
        out
    }

    fn data_out(&mut self, tag: u16, data: &[u8], pkt: usize) {
        let mut at = 0;
        while at < data.len() {
            let n = pkt.min(data.len() - at);
            let mut b = VecData(data[at..at + n].to_vec());
            let s = self.stream(tag);
            match self.xfer(EP_DATA_OUT, s, &mut b) {
                UsbResult::Ack(k) if k > 0 && k <= n => at += k,
                r => panic!("data out: {r:?}"),
            }
        }
    }

    /// A whole data-in command as Linux's uas driver runs it: at high
    /// speed, the command, READ READY, the data, the SENSE IU; at
    /// SuperSpeed the data and status transfers are posted first.
    fn read_cmd(&mut self, tag: u16, lun: u64, cdb: &[u8], len: usize) -> (Vec<u8>, Got) {
        while self.wakeups.try_recv().is_ok() {}
        if self.streams() {
            // Posted before the command: NAKed, woken once it is there.
            let r = self
                .dev
                .handle_data(EP_DATA_IN, tag as u32, &mut VecData::new(len));
            assert_eq!(r, UsbResult::Nak);
            self.send(&command_iu(tag, lun, cdb));
            assert_eq!(self.wakeups.try_recv(), Ok(EP_DATA_IN));
        } else {
            self.send(&command_iu(tag, lun, cdb));
            assert_eq!(self.status(tag), Got::ReadReady(tag));
        }
        let data = self.data_in(tag, len, 64 << 10);
        (data, self.status(tag))
    }

    fn write_cmd(&mut self, tag: u16, cdb: &[u8], data: &[u8]) -> Got {
        self.send(&command_iu(tag, 0, cdb));
        if !self.streams() {
            assert_eq!(self.status(tag), Got::WriteReady(tag));
        }
        self.data_out(tag, data, 48 << 10);
        self.status(tag)
    }
}

#[test]
fn descriptors_at_high_and_super_speed() {
    let mut h = Host::new(Speed::High, &[]);
    assert_eq!(h.dev.speeds(), &[Speed::High, Speed::Super]);
    let (_, d) = h.control([0x80, 6, 0, 1, 0, 0, 18, 0], 18);
    assert_eq!(&d[8..12], &[0xf4, 0x46, 3, 0]);
    assert_eq!((d[2], d[3], d[7]), (0, 2, 64));
    let (_, c) = h.control([0x80, 6, 0, 2, 0, 0, 9, 0], 9);
    assert_eq!(u16::from_le_bytes([c[2], c[3]]), 9 + 9 + 4 * (7 + 4));
    let (_, c) = h.control([0x80, 6, 0, 2, 0, 0, 0xff, 0], 255);
    assert_eq!(c.len(), 62);
    assert_eq!(&c[9..18], &[9, 4, 0, 0, 4, 8, 6, 0x62, 0]);
    for (i, (addr, pipe)) in [(0x01u8, 1u8), (0x82, 2), (0x83, 3), (0x04, 4)]
        .into_iter()
        .enumerate()
    {
        let at = 18 + i * 11;
        assert_eq!(&c[at..at + 7], &[7, 5, addr, 2, 0, 2, 0]);
        assert_eq!(&c[at + 7..at + 11], &[4, 0x24, pipe, 0], "pipe usage");
    }
    let (_, s) = h.control([0x80, 6, 2, 3, 9, 4, 0xff, 0], 255);
    assert_eq!(s[0], 2 + 2 * "USB Attached SCSI HBA".len() as u8);
    // No full speed: no other-speed configuration.
    assert_eq!(
        h.control([0x80, 6, 0, 7, 0, 0, 0xff, 0], 255).0,
        UsbResult::Stall
    );

    let mut h = Host::new(Speed::Super, &[]);
    let (_, d) = h.control([0x80, 6, 0, 1, 0, 0, 18, 0], 18);
    assert_eq!((d[2], d[3], d[7]), (0, 3, 9));
    let (_, c) = h.control([0x80, 6, 0, 2, 0, 0, 0xff, 0], 255);
    assert_eq!(c.len(), 9 + 9 + 4 * (7 + 6 + 4));
    assert_eq!(u16::from_le_bytes([c[2], c[3]]) as usize, c.len());
    for (i, (addr, pipe, streams)) in [(0x01u8, 1u8, 0u8), (0x82, 2, 4), (0x83, 3, 4), (0x04, 4, 4)]
        .into_iter()
        .enumerate()
    {
        let at = 18 + i * 17;
        assert_eq!(&c[at..at + 7], &[7, 5, addr, 2, 0, 4, 0]);
        assert_eq!(
            &c[at + 7..at + 13],
            &[6, 48, 15, streams, 0, 0],
            "companion"
        );
        assert_eq!(&c[at + 13..at + 17], &[4, 0x24, pipe, 0], "pipe usage");
    }
    let (_, bos) = h.control([0x80, 6, 0, 15, 0, 0, 0xff, 0], 255);
    assert_eq!(bos[4], 2);
}

#[test]
fn alternate_settings() {
    let mut h = Host::new(Speed::High, &[(0, null_disk())]);
    assert_eq!(h.control([0x81, 10, 0, 0, 0, 0, 1, 0], 1).1, vec![0]);
    assert_eq!(
        h.control([1, 11, 1, 0, 0, 0, 0, 0], 0).0,
        UsbResult::Stall,
        "no alternate setting 1"
    );
    assert_eq!(h.control([1, 11, 0, 0, 0, 0, 0, 0], 0).0, UsbResult::Ack(0));
    // No class requests (no GET MAX LUN: hosts use REPORT LUNS).
    assert_eq!(
        h.control([0xa1, 0xfe, 0, 0, 0, 0, 1, 0], 1).0,
        UsbResult::Stall
    );
}

fn round_trip(speed: Speed) {
    let img = TempImage::new(4 * MIB);
    let mut h = Host::with_disk(speed, disk_on(img.backend(BackendConfig::default())));
    let (d, st) = h.read_cmd(2, 0, &[0x12, 0, 0, 0, 36, 0], 36);
    assert_eq!(st, good(2));
    assert_eq!(d.len(), 36);
    assert_eq!(&d[8..12], b"QEMU");
    // 200 KiB: several pieces.
    let data = pattern(400 * 512, 3);
    assert_eq!(h.write_cmd(3, &cdb10(0x2a, 10, 400), &data), good(3));
    let (back, st) = h.read_cmd(4, 0, &cdb10(0x28, 10, 400), data.len());
    assert_eq!(st, good(4));
    assert!(back == data, "read back what was written");
    assert_eq!(h.dev.tasks(), 0);
}

#[test]
fn read_write_round_trip_at_high_speed() {
    round_trip(Speed::High);
}

#[test]
fn read_write_round_trip_with_streams() {
    round_trip(Speed::Super);
}

#[test]
fn data_ending_on_a_packet_boundary_ends_with_a_zero_length_packet() {
    let mut h = Host::with_disk(Speed::High, null_disk());
    h.send(&command_iu(5, 0, &cdb10(0x28, 0, 1)));
    assert_eq!(h.status(5), Got::ReadReady(5));
    let mut b = VecData::new(4096);
    assert_eq!(h.xfer(EP_DATA_IN, 0, &mut b), UsbResult::Ack(512));
    assert_eq!(h.xfer(EP_DATA_IN, 0, &mut b), UsbResult::Ack(0));
    assert_eq!(h.status(5), good(5));
}

#[test]
fn two_commands_interleaved_at_high_speed() {
    let img = TempImage::new(MIB);
    let mut h = Host::with_disk(Speed::High, disk_on(img.backend(BackendConfig::default())));
    let data = pattern(8 * 512, 9);
    // A read, a write and another read in flight at once.
    h.send(&command_iu(7, 0, &cdb10(0x28, 0, 8)));
    h.send(&command_iu(8, 0, &cdb10(0x2a, 100, 8)));
    h.send(&command_iu(9, 0, &cdb10(0x28, 100, 8)));
    assert_eq!(h.dev.tasks(), 3);
    // One data pipe each way: READ READY for 7 and WRITE READY for 8.
    assert_eq!(h.status(7), Got::ReadReady(7));
    assert_eq!(h.status(8), Got::WriteReady(8));
    h.data_out(8, &data[..2048], 512);
    let first = h.data_in(7, 2048, 512);
    h.data_out(8, &data[2048..], 512);
    assert_eq!(h.status(8), good(8));
    let rest = h.data_in(7, 2048, 4096);
    assert_eq!([first, rest].concat(), vec![0; 4096]);
    assert_eq!(h.status(7), good(7));
    // The data-in pipe is free now: 9 goes, and reads what 8 wrote.
    assert_eq!(h.status(9), Got::ReadReady(9));
    assert_eq!(h.data_in(9, 4096, 4096), data);
    assert_eq!(h.status(9), good(9));
}

#[test]
fn two_commands_interleaved_on_streams() {
    let mut h = Host::with_disk(Speed::Super, null_disk());
    h.send(&command_iu(3, 0, &cdb10(0x28, 0, 8)));
    h.send(&command_iu(5, 0, &[0x12, 0, 0, 0, 36, 0]));
    // Nothing for stream 4.
    assert_eq!(
        h.dev.handle_data(EP_STATUS, 4, &mut VecData::new(64)),
        UsbResult::Nak
    );
    // Tag 5 first, on its own streams.
    assert_eq!(&h.data_in(5, 36, 1024)[8..12], b"QEMU");
    assert_eq!(h.status(5), good(5));
    assert_eq!(h.data_in(3, 4096, 1024), vec![0; 4096]);
    assert_eq!(h.status(3), good(3));
    // A data transfer for a command without data waits (for the host to
    // cancel it once the SENSE IU is there); one the wrong way stalls.
    let b = testutil::backend("driver=null-aio,size=1048576", BackendConfig::default());
    let mut h2 = Host::with_disk(Speed::Super, disk_on(b));
    h2.send(&command_iu(6, 0, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
    assert_eq!(
        h2.dev.handle_data(EP_DATA_IN, 6, &mut VecData::new(512)),
        UsbResult::Nak
    );
    assert_eq!(h2.status(6), good(6));
    h2.send(&command_iu(7, 0, &cdb10(0x28, 0, 1)));
    assert_eq!(
        h2.dev.handle_data(EP_DATA_OUT, 7, &mut VecData::new(512)),
        UsbResult::Stall
    );
    // Stream 0 and streams above 16 are not streams of this device.
    assert_eq!(
        h.dev.handle_data(EP_STATUS, 0, &mut VecData::new(64)),
        UsbResult::Stall
    );
    assert_eq!(
        h.control([2, 1, 0, 0, 0x82, 0, 0, 0], 0).0,
        UsbResult::Ack(0),
        "CLEAR_FEATURE(ENDPOINT_HALT)"
    );
    assert_eq!(
        h.dev.handle_data(EP_DATA_IN, 17, &mut VecData::new(64)),
        UsbResult::Stall
    );
}

#[test]
fn overlapped_tag() {
    let mut h = Host::with_disk(Speed::High, null_disk());
    h.send(&command_iu(4, 0, &cdb10(0x28, 0, 1)));
    h.send(&command_iu(4, 0, &[0; 6]));
    assert_eq!(h.status(4), Got::ReadReady(4));
    assert_eq!(h.status(4), Got::Response(4, response::OVERLAPPED_TAG));
    // The task holding the tag goes on.
    assert_eq!(h.data_in(4, 512, 512), vec![0; 512]);
    assert_eq!(h.status(4), good(4));
    // A task management IU with a tag in use, too.
    h.send(&command_iu(6, 0, &cdb10(0x28, 0, 1)));
    h.send(&tmf_iu(6, 0x80, 6, 0));
    assert_eq!(h.status(6), Got::ReadReady(6));
    assert_eq!(h.status(6), Got::Response(6, response::OVERLAPPED_TAG));
}

#[test]
fn task_management() {
    let mut h = Host::with_disk(Speed::Super, null_disk());
    h.send(&command_iu(4, 0, &cdb10(0x28, 0, 8)));
    h.send(&tmf_iu(6, 0x80, 4, 0));
    assert_eq!(
        h.status(6),
        Got::Response(6, response::TMF_SUCCEEDED),
        "QUERY TASK"
    );
    h.send(&tmf_iu(6, 0x01, 4, 0));
    assert_eq!(
        h.status(6),
        Got::Response(6, response::TMF_COMPLETE),
        "ABORT TASK"
    );
    assert_eq!(h.dev.tasks(), 0);
    // No status for the aborted task; its data transfer waits.
    assert_eq!(
        h.dev.handle_data(EP_STATUS, 4, &mut VecData::new(64)),
        UsbResult::Nak
    );
    h.send(&tmf_iu(6, 0x80, 4, 0));
    assert_eq!(h.status(6), Got::Response(6, response::TMF_COMPLETE));
    // The tag is free again.
    let (d, st) = h.read_cmd(4, 0, &cdb10(0x28, 0, 1), 512);
    assert_eq!((d.len(), st), (512, good(4)));
    // Unsupported and unknown functions, an absent LUN.
    h.send(&tmf_iu(7, 0x40, 0, 0));
    assert_eq!(h.status(7), Got::Response(7, response::TMF_NOT_SUPPORTED));
    h.send(&tmf_iu(7, 0x33, 0, 0));
    assert_eq!(h.status(7), Got::Response(7, response::TMF_NOT_SUPPORTED));
    h.send(&tmf_iu(7, 0x08, 0, 2));
    assert_eq!(h.status(7), Got::Response(7, response::INCORRECT_LUN));
    // LOGICAL UNIT RESET aborts the unit's tasks and raises a UNIT
    // ATTENTION.
    h.send(&command_iu(9, 0, &cdb10(0x28, 0, 8)));
    h.send(&tmf_iu(7, 0x08, 0, 0));
    assert_eq!(h.status(7), Got::Response(7, response::TMF_COMPLETE));
    assert_eq!(h.dev.tasks(), 0);
    h.send(&command_iu(9, 0, &[0; 6]));
    assert!(matches!(
        h.status(9),
        Got::Sense {
            tag: 9,
            status: 2,
            sense: Some((6, _))
        }
    ));
}

#[test]
fn aborting_the_high_speed_data_task_hands_the_pipe_on() {
    let mut h = Host::with_disk(Speed::High, null_disk());
    h.send(&command_iu(2, 0, &cdb10(0x28, 0, 8)));
    h.send(&command_iu(3, 0, &cdb10(0x28, 0, 1)));
    assert_eq!(h.status(2), Got::ReadReady(2));
    h.send(&tmf_iu(10, 0x01, 2, 0));
    assert_eq!(h.status(3), Got::ReadReady(3));
    assert_eq!(h.status(10), Got::Response(10, response::TMF_COMPLETE));
    assert_eq!(h.data_in(3, 512, 512).len(), 512);
    assert_eq!(h.status(3), good(3));
}

#[test]
fn bad_ius() {
    let mut h = Host::with_disk(Speed::High, null_disk());
    // A SENSE IU is the device's to send.
    h.send(&[id::SENSE, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(h.status(5), Got::Response(5, response::INVALID_IU));
    // A COMMAND IU cut short, and one with a reserved task attribute.
    h.send(&command_iu(6, 0, &[0x12])[..20]);
    assert_eq!(h.status(6), Got::Response(6, response::INVALID_IU));
    let mut c = command_iu(7, 0, &[0x12, 0, 0, 0, 36, 0]);
    c[4] = 5;
    h.send(&c);
    assert_eq!(h.status(7), Got::Response(7, response::INVALID_IU));
    // Too short for a tag: the command pipe stalls until the halt is
    // cleared.
    assert_eq!(
        h.dev.handle_data(EP_COMMAND, 0, &mut VecData(vec![1, 0])),
        UsbResult::Stall
    );
    assert_eq!(
        h.dev
            .handle_data(EP_COMMAND, 0, &mut VecData(command_iu(8, 0, &[0; 6]))),
        UsbResult::Stall
    );
    assert_eq!(h.control([2, 1, 0, 0, 1, 0, 0, 0], 0).0, UsbResult::Ack(0));
    h.send(&command_iu(8, 0, &[0; 6]));
    assert_eq!(h.status(8), good(8));
    // Data at high speed with no READY IU: a protocol error.
    assert_eq!(
        h.dev.handle_data(EP_DATA_IN, 0, &mut VecData::new(512)),
        UsbResult::Stall
    );
    // A stream id at high speed.
    assert_eq!(
        h.dev.handle_data(EP_STATUS, 3, &mut VecData::new(64)),
        UsbResult::Stall
    );
}

#[test]
fn absent_luns_answer_as_the_target_does() {
    let mut h = Host::with_disk(Speed::High, null_disk());
    let (d, st) = h.read_cmd(2, 3, &[0x12, 0, 0, 0, 36, 0], 36);
    assert_eq!(st, good(2));
    assert_eq!(d[0], 0x7f, "peripheral qualifier 011b");
    h.send(&command_iu(3, 3, &[0; 6]));
    assert_eq!(
        h.status(3),
        Got::Sense {
            tag: 3,
            status: 2,
            sense: Some((5, 0x25))
        }
    );
    // A LUN beyond single-level addressing.
    let mut c = command_iu(4, 0, &[0; 6]);
    c[10] = 1;
    h.send(&c);
    assert_eq!(
        h.status(4),
        Got::Sense {
            tag: 4,
            status: 2,
            sense: Some((5, 0x25))
        }
    );
    // Units at other LUNs, REPORT LUNS lists them.
    let mut h = Host::new(Speed::High, &[(0, null_disk()), (5, null_disk())]);
    assert!(h.dev.attach(256, null_disk()).is_err());
    let (d, st) = h.read_cmd(1, 0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], 64);
    assert_eq!(st, good(1));
    assert_eq!(&d[..4], &[0, 0, 0, 16]);
    assert_eq!(d[8 + 8 + 1], 5);
}

#[test]
fn task_set_full() {
    let mut h = Host::with_disk(Speed::High, null_disk());
    for tag in 1..=MAX_TASKS as u16 {
        h.send(&command_iu(tag, 0, &cdb10(0x28, 0, 1)));
    }
    h.send(&command_iu(100, 0, &[0; 6]));
    assert_eq!(h.status(1), Got::ReadReady(1));
    assert_eq!(
        h.status(100),
        Got::Sense {
            tag: 100,
            status: 0x28,
            sense: None
        }
    );
    // A bus reset aborts them all.
    h.dev.reset();
    assert_eq!(h.dev.tasks(), 0);
}

#[test]
fn reads_nak_until_the_io_completes_then_wake_the_host() {
    // null-aio completes on the worker pool: transfers find nothing yet.
    let mut naks = 0;
    for speed in [Speed::High, Speed::Super] {
        let b = testutil::backend("driver=null-aio,size=67108864", BackendConfig::default());
        let mut h = Host::with_disk(speed, disk_on(b));
        let len = 8 << 20;
        h.send(&command_iu(2, 0, &cdb10(0x28, 0, (len / 512) as u16)));
        if speed == Speed::High {
            assert_eq!(h.status(2), Got::ReadReady(2));
        }
        let mut got = 0usize;
        let mps = if speed == Speed::High { 512 } else { 1024 };
        while got < len {
            let mut buf = VecData::new(len - got);
            match h.dev.handle_data(EP_DATA_IN, h.stream(2), &mut buf) {
                UsbResult::Nak => {
                    naks += 1;
                    assert_eq!(
                        h.wakeups.recv_timeout(Duration::from_secs(10)),
                        Ok(EP_DATA_IN)
                    );
                }
                UsbResult::Ack(n) => {
                    assert!(n <= 2 * CHUNK, "at most two pieces staged");
                    assert_eq!(n % mps, 0);
                    got += n;
                }
                r => panic!("{r:?}"),
            }
        }
        assert_eq!(h.status(2), good(2));
    }
    assert!(naks > 0);
}

#[test]
fn status_before_the_command_is_woken_with_streams() {
    let b = testutil::backend("driver=null-aio,size=1048576", BackendConfig::default());
    let mut h = Host::with_disk(Speed::Super, disk_on(b));
    assert_eq!(
        h.dev.handle_data(EP_STATUS, 3, &mut VecData::new(64)),
        UsbResult::Nak
    );
    h.send(&command_iu(3, 0, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
    let ep = h.wakeups.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(ep, EP_STATUS);
    assert_eq!(h.status(3), good(3), "SYNCHRONIZE CACHE");
}
