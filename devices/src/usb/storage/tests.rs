//! usb-storage driven as a host would, through the [`UsbDevice`] trait,
//! against real SCSI units on real backends.

use std::sync::mpsc;
use std::time::Duration;

use super::*;
use crate::scsi::testutil::{self, TempImage};
use crate::scsi::Disk;
use crate::usb::bot::CswStatus;
use crate::usb::VecData;
use block::backend::{BackendConfig, BlockBackend};

const MIB: u64 = 1 << 20;

/// A host: control transfers whole, bulk transfers in packets of `pkt`
/// bytes (64: what a UHCI schedule carries; large: an xHCI TD), NAKs
/// waited out on the device's wakeup.
struct Host {
    dev: UsbStorage,
    wakeups: mpsc::Receiver<Endpoint>,
    pkt: usize,
    tag: u32,
}

fn disk_on(b: Arc<BlockBackend>) -> Arc<dyn Lun> {
    Arc::new(Disk::new(b, Default::default()).unwrap())
}

impl Host {
    fn new(dev: UsbStorage, pkt: usize) -> Host {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let mut dev = dev;
        dev.set_speed(Speed::Full);
        dev.set_wakeup(Some(Arc::new(move |ep| {
            let _ = lock(&tx).send(ep);
        })));
        Host {
            dev,
            wakeups: rx,
            pkt,
            tag: 0,
        }
    }

    /// A device with `unit` at LUN 0, enumerated and configured, its
    /// power-on UNIT ATTENTION consumed.
    fn with(unit: Arc<dyn Lun>, pkt: usize) -> Host {
        let dev = UsbStorage::new(StorageOptions::default());
        dev.attach(0, unit).unwrap();
        let mut h = Host::new(dev, pkt);
        assert_eq!(h.control([0, 5, 3, 0, 0, 0, 0, 0], 0).0, UsbResult::Ack(0));
        assert_eq!(h.control([0, 9, 1, 0, 0, 0, 0, 0], 0).0, UsbResult::Ack(0));
        let (_, csw) = h.command(Dir::Out, 0, 0, &[0; 6], &[]);
        assert_eq!(csw.status, CswStatus::Failed, "UNIT ATTENTION");
        h
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

    /// One transaction, NAKs waited out.
    fn data(&mut self, ep: Endpoint, buf: &mut VecData) -> UsbResult {
        loop {
            match self.dev.handle_data(ep, 0, buf) {
                UsbResult::Nak => {
                    self.wakeups
                        .recv_timeout(Duration::from_secs(10))
                        .expect("a NAKed endpoint is woken");
                }
                r => return r,
            }
        }
    }

    fn bulk_out(&mut self, data: &[u8]) -> UsbResult {
        let mut at = 0;
        while at < data.len() {
            let n = self.pkt.min(data.len() - at);
            let mut b = VecData(data[at..at + n].to_vec());
            match self.data(EP_OUT, &mut b) {
                UsbResult::Ack(k) if k > 0 && k <= n => at += k,
                r => return r,
            }
        }
        UsbResult::Ack(data.len())
    }

    /// Reads up to `len` bytes; stops at a short packet.
    fn bulk_in(&mut self, len: usize) -> (UsbResult, Vec<u8>) {
        let mut out = Vec::new();
        while out.len() < len {
            let n = self.pkt.min(len - out.len());
            let mut b = VecData::new(n);
            match self.data(EP_IN, &mut b) {
                UsbResult::Ack(k) => {
                    out.extend_from_slice(&b.0[..k]);
                    // Fewer bytes in whole max-size packets: more to come.
                    if k < n && (k == 0 || k % 64 != 0) {
                        break;
                    }
                }
                r => return (r, out),
            }
        }
        (UsbResult::Ack(out.len()), out)
    }

    fn csw(&mut self) -> Csw {
        let mut b = VecData::new(13);
        assert_eq!(self.data(EP_IN, &mut b), UsbResult::Ack(13));
        Csw::parse(&b.0).unwrap()
    }

    /// A whole command: CBW, data phase, CSW.
    fn command(&mut self, dir: Dir, len: u32, lun: u8, cdb: &[u8], out: &[u8]) -> (Vec<u8>, Csw) {
        self.tag += 1;
        let cbw = Cbw::new(self.tag, len, dir, lun, cdb);
        assert_eq!(self.bulk_out(&cbw.to_bytes()), UsbResult::Ack(31));
        let mut data = Vec::new();
        if len > 0 {
            match dir {
                Dir::In => data = self.bulk_in(len as usize).1,
                Dir::Out => assert_eq!(self.bulk_out(out), UsbResult::Ack(out.len())),
            }
        }
        let csw = self.csw();
        assert_eq!(csw.tag, self.tag);
        (data, csw)
    }
}

fn cdb10(op: u8, lba: u32, blocks: u16) -> Vec<u8> {
    testutil::cdb10(op, 0, lba, blocks)[..10].to_vec()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(7)
                .wrapping_add(seed ^ (i >> 9) as u8)
        })
        .collect()
}

#[test]
fn descriptors_and_enumeration() {
    let dev = UsbStorage::new(StorageOptions {
        serial: Some("SN42".into()),
    });
    let mut h = Host::new(dev, 64);
    // The first 8 bytes of the device descriptor, as hosts ask first.
    let (r, d) = h.control([0x80, 6, 0, 1, 0, 0, 8, 0], 8);
    assert_eq!((r, d.len()), (UsbResult::Ack(8), 8));
    assert_eq!(d[7], 8, "bMaxPacketSize0 at full speed");
    let (_, d) = h.control([0x80, 6, 0, 1, 0, 0, 0x40, 0], 64);
    assert_eq!(d.len(), 18);
    assert_eq!(&d[8..12], &[0xf4, 0x46, 1, 0]);
    let (_, d) = h.control([0x80, 6, 0, 2, 0, 0, 9, 0], 9);
    assert_eq!(u16::from_le_bytes([d[2], d[3]]), 32);
    let (_, cfg) = h.control([0x80, 6, 0, 2, 0, 0, 0xff, 0], 255);
    assert_eq!(cfg.len(), 32);
    assert_eq!(&cfg[9..18], &[9, 4, 0, 0, 2, 8, 6, 0x50, 0]);
    assert_eq!(&cfg[18..25], &[7, 5, 0x81, 2, 64, 0, 0]);
    assert_eq!(&cfg[25..32], &[7, 5, 0x02, 2, 64, 0, 0]);
    let string = |h: &mut Host, i: u8| {
        let (_, d) = h.control([0x80, 6, i, 3, 9, 4, 0xff, 0], 255);
        String::from_utf16(
            &d[2..]
                .chunks(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect::<Vec<_>>(),
        )
        .unwrap()
    };
    assert_eq!(string(&mut h, 1), "QEMU");
    assert_eq!(string(&mut h, 2), "QEMU USB HARDDRIVE");
    assert_eq!(string(&mut h, 3), "SN42");
    assert_eq!(
        h.control([0x80, 6, 9, 3, 9, 4, 0xff, 0], 255).0,
        UsbResult::Stall
    );
    // At full speed the qualifier describes high speed.
    let (_, q) = h.control([0x80, 6, 0, 6, 0, 0, 10, 0], 10);
    assert_eq!((q.len(), q[1], q[7]), (10, 6, 64));
    let (_, o) = h.control([0x80, 6, 0, 7, 0, 0, 0xff, 0], 255);
    assert_eq!(
        (o[1], o[22], o[23]),
        (7, 0, 2),
        "other speed: 512-byte bulk"
    );
    let (_, bos) = h.control([0x80, 6, 0, 15, 0, 0, 0xff, 0], 255);
    assert_eq!((bos[1], bos[4]), (15, 2));

    // Not configured: the bulk endpoints STALL.
    let mut b = VecData::new(31);
    assert_eq!(h.dev.handle_data(EP_OUT, 0, &mut b), UsbResult::Stall);
    assert_eq!(h.control([0, 5, 9, 0, 0, 0, 0, 0], 0).0, UsbResult::Ack(0));
    assert_eq!(h.dev.address(), 9);
    assert_eq!(
        h.control([0, 9, 2, 0, 0, 0, 0, 0], 0).0,
        UsbResult::Stall,
        "no config 2"
    );
    assert_eq!(h.control([0, 9, 1, 0, 0, 0, 0, 0], 0).0, UsbResult::Ack(0));
    assert_eq!(h.control([0x80, 8, 0, 0, 0, 0, 1, 0], 1).1, vec![1]);
    assert_eq!(
        h.control([0x80, 0, 0, 0, 0, 0, 2, 0], 2).1,
        vec![1, 0],
        "self-powered"
    );
    assert_eq!(h.control([0x81, 10, 0, 0, 0, 0, 1, 0], 1).1, vec![0]);
    assert_eq!(
        h.control([0x81, 10, 0, 0, 1, 0, 1, 0], 1).0,
        UsbResult::Stall,
        "no interface 1"
    );
    assert_eq!(h.control([1, 11, 0, 0, 0, 0, 0, 0], 0).0, UsbResult::Ack(0));
    assert_eq!(
        h.control([1, 11, 1, 0, 0, 0, 0, 0], 0).0,
        UsbResult::Stall,
        "no alt 1"
    );
    // SET_FEATURE(ENDPOINT_HALT), GET_STATUS, CLEAR_FEATURE.
    assert_eq!(
        h.control([2, 3, 0, 0, 0x81, 0, 0, 0], 0).0,
        UsbResult::Ack(0)
    );
    assert_eq!(h.control([0x82, 0, 0, 0, 0x81, 0, 2, 0], 2).1, vec![1, 0]);
    let mut b = VecData::new(13);
    assert_eq!(h.dev.handle_data(EP_IN, 0, &mut b), UsbResult::Stall);
    assert_eq!(
        h.control([2, 1, 0, 0, 0x81, 0, 0, 0], 0).0,
        UsbResult::Ack(0)
    );
    assert_eq!(h.control([0x82, 0, 0, 0, 0x81, 0, 2, 0], 2).1, vec![0, 0]);
    assert_eq!(
        h.control([0x82, 0, 0, 0, 0x83, 0, 2, 0], 2).0,
        UsbResult::Stall,
        "no endpoint 3"
    );
    // Vendor requests and unknown class requests STALL.
    assert_eq!(
        h.control([0xc0, 1, 0, 0, 0, 0, 1, 0], 1).0,
        UsbResult::Stall
    );
    assert_eq!(
        h.control([0x21, 0x42, 0, 0, 0, 0, 0, 0], 0).0,
        UsbResult::Stall
    );
    // A bus reset: address 0, unconfigured.
    h.dev.reset();
    assert_eq!(
        (h.dev.address(), h.control([0x80, 8, 0, 0, 0, 0, 1, 0], 1).1),
        (0, vec![0])
    );
}

#[test]
fn high_and_super_speed_descriptors() {
    let mut dev = UsbStorage::new(StorageOptions::default());
    assert_eq!(dev.speeds(), &[Speed::Full, Speed::High, Speed::Super]);
    for (speed, mp0, mps) in [(Speed::High, 64, 512u16), (Speed::Super, 9, 1024)] {
        dev.set_speed(speed);
        let mut d = VecData::new(255);
        let s = SetupPacket::parse(&[0x80, 6, 0, 1, 0, 0, 18, 0]);
        dev.handle_control(&s, &mut d);
        assert_eq!(d.0[7], mp0);
        let s = SetupPacket::parse(&[0x80, 6, 0, 2, 0, 0, 0xff, 0]);
        let mut d = VecData::new(255);
        dev.handle_control(&s, &mut d);
        assert_eq!(u16::from_le_bytes([d.0[22], d.0[23]]), mps);
    }
    // SuperSpeed: companions follow the endpoints; no device qualifier.
    let s = SetupPacket::parse(&[0x80, 6, 0, 2, 0, 0, 0xff, 0]);
    let mut d = VecData::new(255);
    assert_eq!(dev.handle_control(&s, &mut d), UsbResult::Ack(44));
    assert_eq!(&d.0[25..31], &[6, 48, 15, 0, 0, 0]);
    let s = SetupPacket::parse(&[0x80, 6, 0, 6, 0, 0, 10, 0]);
    assert_eq!(
        dev.handle_control(&s, &mut VecData::new(10)),
        UsbResult::Stall
    );
}

fn round_trip(pkt: usize) {
    let img = TempImage::new(4 * MIB);
    let b = img.backend(BackendConfig::default());
    let mut h = Host::with(disk_on(b.clone()), pkt);
    let (inq, csw) = h.command(Dir::In, 36, 0, &[0x12, 0, 0, 0, 36, 0], &[]);
    assert_eq!((csw.status, csw.residue), (CswStatus::Passed, 0));
    assert_eq!(inq.len(), 36);
    assert_eq!(&inq[8..16], b"QEMU    ");
    // 300 blocks: three pieces of the stage each way.
    let blocks = 300u16;
    let data = pattern(blocks as usize * 512, 5);
    let (_, csw) = h.command(
        Dir::Out,
        data.len() as u32,
        0,
        &cdb10(0x2a, 17, blocks),
        &data,
    );
    assert_eq!((csw.status, csw.residue), (CswStatus::Passed, 0));
    let mut on_disk = vec![0u8; data.len()];
    b.read_at(17 * 512, &mut on_disk).unwrap();
    assert!(on_disk == data, "the medium holds what was written");
    let (back, csw) = h.command(Dir::In, data.len() as u32, 0, &cdb10(0x28, 17, blocks), &[]);
    assert_eq!((csw.status, csw.residue), (CswStatus::Passed, 0));
    assert!(back == data, "read back what was written");
    // READ CAPACITY(10).
    let (cap, _) = h.command(Dir::In, 8, 0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(cap, [0, 0, 0x1f, 0xff, 0, 0, 2, 0]);
}

#[test]
fn read_write_round_trip_in_packets() {
    round_trip(64);
}

#[test]
fn read_write_round_trip_in_large_transfers() {
    // An xHCI-style host: one buffer for the whole data phase, taken in
    // bounded parts.
    round_trip(1 << 20);
}

#[test]
fn reads_nak_until_the_io_completes_then_wake_the_host() {
    // null-aio completes on the worker pool: the first IN is NAKed.
    let b = testutil::backend(
        "driver=null-aio,size=67108864,latency-ns=2000000",
        BackendConfig::default(),
    );
    let mut h = Host::with(disk_on(b), 1 << 20);
    h.tag += 1;
    let cbw = Cbw::new(h.tag, 8 << 20, Dir::In, 0, &cdb10(0x28, 0, 16384));
    assert_eq!(h.bulk_out(&cbw.to_bytes()), UsbResult::Ack(31));
    let mut naks = 0;
    let mut got = 0usize;
    while got < 8 << 20 {
        let mut buf = VecData::new((8 << 20) - got);
        match h.dev.handle_data(EP_IN, 0, &mut buf) {
            UsbResult::Nak => {
                naks += 1;
                h.wakeups
                    .recv_timeout(Duration::from_secs(10))
                    .expect("woken");
            }
            UsbResult::Ack(n) => {
                assert!(n <= 2 * CHUNK, "at most two pieces staged");
                assert_eq!(n % 64, 0);
                got += n;
            }
            r => panic!("{r:?}"),
        }
    }
    assert!(naks > 0);
    let csw = h.csw();
    assert_eq!((csw.status, csw.residue), (CswStatus::Passed, 0));
}

#[test]
fn invalid_cbw_stalls_until_reset_recovery() {
    let mut h = Host::with(disk_on(testutil::null(MIB)), 64);
    // 30 bytes: not a valid CBW.
    assert_eq!(h.bulk_out(&[0x55; 30]), UsbResult::Stall);
    let mut b = VecData::new(13);
    assert_eq!(h.dev.handle_data(EP_IN, 0, &mut b), UsbResult::Stall);
    // Clearing the halts is not enough (6.6.1).
    for ep in [0x81u8, 0x02] {
        assert_eq!(h.control([2, 1, 0, 0, ep, 0, 0, 0], 0).0, UsbResult::Ack(0));
    }
    let cbw = Cbw::new(1, 0, Dir::Out, 0, &[0; 6]).to_bytes();
    assert_eq!(h.bulk_out(&cbw), UsbResult::Stall);
    assert_eq!(h.control([0x82, 0, 0, 0, 0x81, 0, 2, 0], 2).1, vec![1, 0]);
    // Reset Recovery: the class reset, then both halts cleared.
    assert_eq!(
        h.control([0x21, 0xff, 0, 0, 0, 0, 0, 0], 0).0,
        UsbResult::Ack(0)
    );
    assert_eq!(h.bulk_out(&cbw), UsbResult::Stall, "still halted");
    for ep in [0x81u8, 0x02] {
        assert_eq!(h.control([2, 1, 0, 0, ep, 0, 0, 0], 0).0, UsbResult::Ack(0));
    }
    let (_, csw) = h.command(Dir::Out, 0, 0, &[0; 6], &[]);
    assert_eq!(csw.status, CswStatus::Passed);
    // A bad signature, and a CB length of 0, are invalid too.
    let mut bad = Cbw::new(9, 0, Dir::Out, 0, &[0; 6]).to_bytes();
    bad[3] = 0;
    assert_eq!(h.bulk_out(&bad), UsbResult::Stall);
    assert_eq!(
        h.control([0x21, 0xff, 0, 0, 0, 0, 0, 0], 0).0,
        UsbResult::Ack(0)
    );
    for ep in [0x81u8, 0x02] {
        h.control([2, 1, 0, 0, ep, 0, 0, 0], 0);
    }
    let mut bad = Cbw::new(9, 0, Dir::Out, 0, &[0; 6]).to_bytes();
    bad[14] = 0;
    assert_eq!(h.bulk_out(&bad), UsbResult::Stall);
}

#[test]
fn reset_recovery_abandons_a_command() {
    let mut h = Host::with(disk_on(testutil::null(MIB)), 64);
    let cbw = Cbw::new(5, 4096, Dir::In, 0, &cdb10(0x28, 0, 8)).to_bytes();
    assert_eq!(h.bulk_out(&cbw), UsbResult::Ack(31));
    let (r, d) = h.bulk_in(512);
    assert_eq!((r, d.len()), (UsbResult::Ack(512), 512));
    assert_eq!(
        h.control([0x21, 0xff, 0, 0, 0, 0, 0, 0], 0).0,
        UsbResult::Ack(0)
    );
    // The next CBW starts afresh.
    let (_, csw) = h.command(Dir::Out, 0, 0, &[0; 6], &[]);
    assert_eq!(csw.status, CswStatus::Passed);
}

#[test]
fn the_thirteen_cases() {
    let img = TempImage::new(MIB);
    let b = img.backend(BackendConfig::default());
    let mut h = Host::with(disk_on(b.clone()), 64);
    let inquiry = [0x12, 0, 0, 0, 36, 0];
    let tur = [0u8; 6];
    // Case 2 (Hn < Di): Phase Error, nothing moves.
    let (_, csw) = h.command(Dir::In, 0, 0, &inquiry, &[]);
    assert_eq!(csw.status, CswStatus::PhaseError);
    // Case 3 (Hn < Do).
    let (_, csw) = h.command(Dir::Out, 0, 0, &cdb10(0x2a, 0, 1), &[]);
    assert_eq!(csw.status, CswStatus::PhaseError);
    // Case 4 (Hi > Dn): the data phase is padded, the residue is all.
    let (d, csw) = h.command(Dir::In, 512, 0, &tur, &[]);
    assert_eq!(d, vec![0; 512]);
    assert_eq!((csw.status, csw.residue), (CswStatus::Passed, 512));
    // Case 5 (Hi > Di): data, padding, residue.
    let (d, csw) = h.command(Dir::In, 100, 0, &inquiry, &[]);
    assert_eq!(d.len(), 100);
    assert_eq!(&d[8..12], b"QEMU");
    assert!(d[36..].iter().all(|&x| x == 0));
    assert_eq!((csw.status, csw.residue), (CswStatus::Passed, 64));
    // Case 7 (Hi < Di): what the host asked, then Phase Error.
    let (d, csw) = h.command(Dir::In, 512, 0, &cdb10(0x28, 0, 2), &[]);
    assert_eq!(d.len(), 512);
    assert_eq!(csw.status, CswStatus::PhaseError);
    // Case 8 (Hi <> Do): Phase Error, the medium untouched.
    let (_, csw) = h.command(Dir::In, 512, 0, &cdb10(0x2a, 0, 1), &[]);
    assert_eq!(csw.status, CswStatus::PhaseError);
    // Case 9 (Ho > Dn): the host's data is discarded.
    let (_, csw) = h.command(Dir::Out, 512, 0, &tur, &[7; 512]);
    assert_eq!((csw.status, csw.residue), (CswStatus::Passed, 512));
    // Case 10 (Ho <> Di).
    let (_, csw) = h.command(Dir::Out, 36, 0, &inquiry, &[7; 36]);
    assert_eq!(csw.status, CswStatus::PhaseError);
    // Case 11 (Ho > Do): one block written, the rest discarded.
    let (_, csw) = h.command(Dir::Out, 1024, 0, &cdb10(0x2a, 3, 1), &[9; 1024]);
    assert_eq!((csw.status, csw.residue), (CswStatus::Passed, 512));
    // Case 13 (Ho < Do): nothing written.
    let (_, csw) = h.command(Dir::Out, 512, 0, &cdb10(0x2a, 4, 2), &[8; 512]);
    assert_eq!(csw.status, CswStatus::PhaseError);
    let mut disk = vec![0u8; 3 * 512];
    b.read_at(3 * 512, &mut disk).unwrap();
    assert!(disk[..512].iter().all(|&x| x == 9));
    assert!(
        disk[512..].iter().all(|&x| x == 0),
        "cases 8 and 13 wrote nothing"
    );
    // Cases 1, 6, 12 are the ordinary ones (see the round trip).
    let (_, csw) = h.command(Dir::Out, 0, 0, &tur, &[]);
    assert_eq!(csw.status, CswStatus::Passed);
}

#[test]
fn failed_commands_report_status_1_and_keep_the_sense() {
    let mut h = Host::with(disk_on(testutil::null(MIB)), 64);
    let (d, csw) = h.command(Dir::In, 512, 0, &cdb10(0x28, 5000, 1), &[]);
    assert_eq!(d, vec![0; 512], "the data phase is padded");
    assert_eq!((csw.status, csw.residue), (CswStatus::Failed, 512));
    let (sense, csw) = h.command(Dir::In, 18, 0, &[0x03, 0, 0, 0, 18, 0], &[]);
    assert_eq!(csw.status, CswStatus::Passed);
    assert_eq!((sense[2] & 0xf, sense[12]), (5, 0x21), "LBA out of range");
    // An absent LUN: the target answers INQUIRY (peripheral qualifier 3)
    // and fails the rest.
    let (d, csw) = h.command(Dir::In, 36, 3, &[0x12, 0, 0, 0, 36, 0], &[]);
    assert_eq!((csw.status, d[0] >> 5), (CswStatus::Passed, 3));
    let (_, csw) = h.command(Dir::Out, 0, 3, &[0; 6], &[]);
    assert_eq!(csw.status, CswStatus::Failed);
}

#[test]
fn get_max_lun() {
    let dev = UsbStorage::new(StorageOptions::default());
    dev.attach(0, disk_on(testutil::null(MIB))).unwrap();
    assert!(dev.attach(16, disk_on(testutil::null(MIB))).is_err());
    let bus = dev.bus().clone();
    let mut h = Host::new(dev, 64);
    let get = [0xa1, 0xfe, 0, 0, 0, 0, 1, 0];
    assert_eq!(h.control(get, 1), (UsbResult::Ack(1), vec![0]));
    bus.attach(0, 2, disk_on(testutil::null(MIB))).unwrap();
    assert_eq!(
        h.control(get, 1).1,
        vec![0],
        "LUN 1 missing: QEMU stops at the gap"
    );
    bus.attach(0, 1, disk_on(testutil::null(MIB))).unwrap();
    assert_eq!(h.control(get, 1).1, vec![2]);
    assert_eq!(
        h.control([0xa1, 0xfe, 0, 0, 0, 0, 2, 0], 2).0,
        UsbResult::Stall,
        "wLength 2"
    );
}

#[test]
fn protocol_errors_stall() {
    let mut h = Host::with(disk_on(testutil::null(MIB)), 64);
    // An IN with no command.
    let mut b = VecData::new(13);
    assert_eq!(h.dev.handle_data(EP_IN, 0, &mut b), UsbResult::Stall);
    h.control([2, 1, 0, 0, 0x81, 0, 0, 0], 0);
    // A CSW buffer shorter than 13 bytes.
    let cbw = Cbw::new(1, 0, Dir::Out, 0, &[0; 6]).to_bytes();
    assert_eq!(h.bulk_out(&cbw), UsbResult::Ack(31));
    let mut b = VecData::new(12);
    assert_eq!(h.dev.handle_data(EP_IN, 0, &mut b), UsbResult::Stall);
    h.control([2, 1, 0, 0, 0x81, 0, 0, 0], 0);
    assert_eq!(h.csw().status, CswStatus::Passed);
    // More data-out than the CBW announced.
    let cbw = Cbw::new(2, 512, Dir::Out, 0, &cdb10(0x2a, 0, 1)).to_bytes();
    assert_eq!(h.bulk_out(&cbw), UsbResult::Ack(31));
    let mut b = VecData::new(1024);
    assert_eq!(h.dev.handle_data(EP_OUT, 0, &mut b), UsbResult::Stall);
    // Streams and other endpoints.
    let mut b = VecData::new(13);
    assert_eq!(
        h.dev.handle_data(Endpoint::new(3, Dir::In), 0, &mut b),
        UsbResult::Stall
    );
}
