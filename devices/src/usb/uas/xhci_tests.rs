//! usb-uas behind the xHCI at SuperSpeed, driven as Linux's `uas` driver
//! drives it: the status and data pipes configured with streams (a linear
//! Primary Stream Context Array), per command a status TD and a data TD
//! on the stream of its tag posted before the COMMAND IU, doorbells that
//! name the stream. This checks the stream path end to end: the
//! doorbell's stream id reaching [`UsbDevice::handle_data`] as the tag,
//! NAKed stream TDs re-run by the device's wakeup.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::iu::{encode_lun, id};
use super::*;
use crate::clock::ManualClock;
use crate::irq::IrqLine;
use crate::pci::config::COMMAND;
use crate::pci::msix::MsiSender;
use crate::pci::PciFunction;
use crate::scsi::testutil::{self, TempImage};
use crate::scsi::Disk;
use crate::usb::xhci::regs::{cmd, erdp, iman, op, rt, sts, DOORBELL, OPER, RUNTIME};
use crate::usb::xhci::trb::{ctl, ty, Trb};
use crate::usb::xhci::{Xhci, XhciOptions, BAR_MMIO};
use crate::GuestMem;
use block::backend::BackendConfig;

const MIB: u64 = 1 << 20;
const DCBAA: u64 = 0x1000;
const CMD_RING: u64 = 0x2000;
const ERST: u64 = 0x3000;
const EV_RING: u64 = 0x4000;
const EV_TRBS: u64 = 128;
const IN_CTX: u64 = 0x8000;
const OUT_CTX: u64 = 0x10000;
/// Rings without streams, by DCI.
const RINGS: u64 = 0x10_0000;
/// Stream Context Arrays, by DCI.
const ARRAYS: u64 = 0x18_0000;
/// Stream rings, by DCI and stream.
const STREAM_RINGS: u64 = 0x20_0000;
const CTRL_BUF: u64 = 0x70_0000;
const IU_BUF: u64 = 0x71_0000;
const STATUS_BUF: u64 = 0x72_0000;
const DATA_BUF: u64 = 0x80_0000;
/// MaxPStreams: 2^(3+1) = 16 entries, streams 1..=15 (as Linux asks).
const PSTREAMS: u32 = 3;

/// The pipes' DCIs: OUT n is 2n, IN n is 2n+1.
const DCI_COMMAND: u8 = 2;
const DCI_STATUS: u8 = 5;
const DCI_DATA_IN: u8 = 7;
const DCI_DATA_OUT: u8 = 8;

#[derive(Default)]
struct Line(AtomicBool);
impl IrqLine for Line {
    fn set_level(&self, l: bool) {
        self.0.store(l, Ordering::SeqCst)
    }
}

#[derive(Default)]
struct Msgs;
impl MsiSender for Msgs {
    fn send(&self, _: u64, _: u32) {}
}

fn trb(param: u64, status: u32, t: u8, bits: u32) -> Trb {
    Trb {
        param,
        status,
        control: (t as u32) << 10 | bits,
    }
}

fn stream_ring(dci: u8, stream: u16) -> u64 {
    STREAM_RINGS + (dci as u64 * 16 + stream as u64) * 0x1000
}

struct Rig {
    hc: Xhci,
    mem: Arc<GuestMem>,
    kicks: Arc<AtomicU64>,
    cmd: u64,
    ev: (u64, bool),
    /// Enqueue pointers by (dci, stream); no ring here wraps.
    rings: BTreeMap<(u8, u16), u64>,
    stash: Vec<Trb>,
    slot: u8,
}

impl Rig {
    fn new() -> Rig {
        let mem = Arc::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)]).unwrap(),
        );
        let mut hc = Xhci::new(
            mem.clone(),
            Arc::new(Line::default()),
            Arc::new(Msgs),
            Arc::new(ManualClock::default()),
            XhciOptions::qemu(),
        )
        .unwrap();
        hc.config_write(COMMAND, &[0x06, 0]);
        let kicks = Arc::new(AtomicU64::new(0));
        let k = kicks.clone();
        hc.set_kick(Arc::new(move || {
            k.fetch_add(1, Ordering::SeqCst);
        }));
        let mut r = Rig {
            hc,
            mem,
            kicks,
            cmd: CMD_RING,
            ev: (EV_RING, true),
            rings: BTreeMap::new(),
            stash: Vec::new(),
            slot: 0,
        };
        r.start();
        r
    }

    fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.hc.region_read(BAR_MMIO, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(&mut self, off: u64, v: u32) {
        self.hc.region_write(BAR_MMIO, off, &v.to_le_bytes());
    }

    fn w(&self, at: u64, v: u32) {
        self.mem.write_obj(v, GuestAddress(at)).unwrap();
    }

    fn put(&self, at: u64, t: &Trb) {
        self.mem
            .write_slice(&t.to_bytes(), GuestAddress(at))
            .unwrap();
    }

    fn start(&mut self) {
        self.w32(OPER + op::USBCMD, cmd::HCRST);
        self.w32(OPER + op::CONFIG, 8);
        self.w32(OPER + op::DCBAAP_LO, DCBAA as u32);
        self.w32(OPER + op::CRCR_LO, CMD_RING as u32 | 1);
        self.mem.write_obj(EV_RING, GuestAddress(ERST)).unwrap();
        self.w(ERST + 8, EV_TRBS as u32);
        let ir = RUNTIME + rt::IR0;
        self.w32(ir + rt::ERSTSZ, 1);
        self.w32(ir + rt::ERDP_LO, EV_RING as u32);
        self.w32(ir + rt::ERSTBA_LO, ERST as u32);
        self.w32(ir + rt::IMAN, iman::IE);
        self.w32(OPER + op::USBCMD, cmd::RS | cmd::INTE);
        assert_eq!(self.r32(OPER + op::USBSTS) & sts::HCH, 0);
    }

    fn event(&mut self) -> Option<Trb> {
        let mut b = [0u8; 16];
        self.mem
            .read_slice(&mut b, GuestAddress(self.ev.0))
            .unwrap();
        let t = Trb::from_bytes(&b);
        if t.cycle() != self.ev.1 {
            return None;
        }
        self.ev.0 += 16;
        if self.ev.0 == EV_RING + EV_TRBS * 16 {
            self.ev = (EV_RING, !self.ev.1);
        }
        let ir = RUNTIME + rt::IR0;
        self.w32(ir + rt::ERDP_LO, self.ev.0 as u32 | erdp::EHB as u32);
        Some(t)
    }

    /// The next event matching `f`, running woken endpoints as the vmm's
    /// kick would.
    fn wait_for(&mut self, f: impl Fn(&Trb) -> bool) -> Trb {
        if let Some(i) = self.stash.iter().position(&f) {
            return self.stash.remove(i);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            while let Some(t) = self.event() {
                if f(&t) {
                    return t;
                }
                self.stash.push(t);
            }
            assert!(Instant::now() < deadline, "no such event");
            if self.hc.wakeups_pending() {
                self.hc.process_wakeups();
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn command(&mut self, t: Trb) -> Trb {
        let mut t = t;
        t.control |= 1;
        let at = self.cmd;
        self.put(at, &t);
        self.cmd += 16;
        self.w32(DOORBELL, 0);
        let e = self.wait_for(|e| e.ty() == ty::COMMAND_COMPLETION);
        assert_eq!(e.status >> 24, 1, "command {} succeeds", t.ty());
        e
    }

    /// Queues TRBs on the ring of (`dci`, `stream`) and rings its
    /// doorbell; returns the TRBs' addresses.
    fn queue(&mut self, dci: u8, stream: u16, trbs: &[Trb]) -> Vec<u64> {
        let base = if stream == 0 {
            RINGS + dci as u64 * 0x1000
        } else {
            stream_ring(dci, stream)
        };
        let mut at = *self.rings.entry((dci, stream)).or_insert(base);
        let mut addrs = Vec::new();
        for t in trbs {
            let mut t = *t;
            t.control |= 1;
            self.put(at, &t);
            addrs.push(at);
            at += 16;
        }
        self.rings.insert((dci, stream), at);
        let slot = self.slot as u64;
        self.w32(DOORBELL + 4 * slot, dci as u32 | (stream as u32) << 16);
        addrs
    }

    /// A control transfer on endpoint 0; returns the completion code
    /// and the IN data.
    fn control(&mut self, setup: [u8; 8]) -> (u32, Vec<u8>) {
        let len = u16::from_le_bytes([setup[6], setup[7]]) as u32;
        let input = setup[0] & 0x80 != 0;
        let trt = match (len, input) {
            (0, _) => 0,
            (_, true) => 3,
            (_, false) => 2,
        };
        let mut trbs = vec![trb(
            u64::from_le_bytes(setup),
            8,
            ty::SETUP,
            ctl::IDT | trt << 16,
        )];
        if len > 0 {
            let dir = if input { ctl::DIR_IN } else { 0 };
            trbs.push(trb(CTRL_BUF, len, ty::DATA, dir | ctl::ISP));
        }
        let dir = if len > 0 && input { 0 } else { ctl::DIR_IN };
        trbs.push(trb(0, 0, ty::STATUS, dir | ctl::IOC));
        self.queue(1, 0, &trbs);
        let mut got = len as usize;
        loop {
            let e = self.wait_for(|e| e.ty() == ty::TRANSFER_EVENT);
            let cc = e.status >> 24;
            if cc == 13 {
                got = (len - (e.status & 0xff_ffff)) as usize;
                continue;
            }
            let mut d = vec![0u8; got];
            self.mem.read_slice(&mut d, GuestAddress(CTRL_BUF)).unwrap();
            return (cc, d);
        }
    }

    /// Enable Slot, Address Device, the four pipes configured (streams
    /// on status and data), SET_CONFIGURATION(1).
    fn enumerate(&mut self, port: u8) {
        let e = self.command(trb(0, 0, ty::ENABLE_SLOT, 0));
        self.slot = (e.control >> 24) as u8;
        let slot = self.slot;
        self.mem
            .write_obj(OUT_CTX, GuestAddress(DCBAA + 8 * slot as u64))
            .unwrap();
        self.mem
            .write_slice(&[0u8; 0x420], GuestAddress(IN_CTX))
            .unwrap();
        self.w(IN_CTX + 4, 3);
        self.w(IN_CTX + 0x20, 1 << 27);
        self.w(IN_CTX + 0x24, (port as u32) << 16);
        self.w(IN_CTX + 0x44, 512 << 16 | 4 << 3 | 3 << 1);
        self.w(IN_CTX + 0x48, (RINGS + 0x1000) as u32 | 1);
        self.command(trb(IN_CTX, 0, ty::ADDRESS_DEVICE, (slot as u32) << 24));

        self.mem
            .write_slice(&[0u8; 0x420], GuestAddress(IN_CTX))
            .unwrap();
        let dcis = [DCI_COMMAND, DCI_STATUS, DCI_DATA_IN, DCI_DATA_OUT];
        self.w(IN_CTX + 4, dcis.iter().fold(1, |a, d| a | 1 << d));
        self.w(IN_CTX + 0x20, (DCI_DATA_OUT as u32) << 27);
        self.w(IN_CTX + 0x24, (port as u32) << 16);
        for dci in dcis {
            let at = IN_CTX + 0x20 * (dci as u64 + 1);
            let ep_ty = if dci & 1 == 1 { 6u32 } else { 2 };
            self.w(at + 4, 1024 << 16 | ep_ty << 3 | 3 << 1);
            if dci == DCI_COMMAND {
                self.w(at + 8, (RINGS + dci as u64 * 0x1000) as u32 | 1);
                continue;
            }
            // MaxPStreams and LSA; the dequeue field points at the
            // Stream Context Array (SCT 1: primary rings).
            self.w(at, PSTREAMS << 10 | 1 << 15);
            let array = ARRAYS + dci as u64 * 0x1000;
            self.w(at + 8, array as u32 | 1 << 1);
            for s in 1..(2u16 << PSTREAMS) {
                self.mem
                    .write_obj(
                        stream_ring(dci, s) | 1 << 1 | 1,
                        GuestAddress(array + s as u64 * 16),
                    )
                    .unwrap();
            }
        }
        self.command(trb(IN_CTX, 0, ty::CONFIGURE_EP, (slot as u32) << 24));
        let (cc, _) = self.control([0, 9, 1, 0, 0, 0, 0, 0]);
        assert_eq!(cc, 1);
    }

    /// A TD on (`dci`, `stream`) in Normal TRBs of at most 64 KiB (the
    /// TRB Transfer Length has 17 bits); returns its last TRB's address,
    /// which the event of a TD that completes names.
    fn td(&mut self, dci: u8, stream: u16, buf: u64, len: usize) -> u64 {
        let mut trbs = Vec::new();
        let mut off = 0;
        loop {
            let n = (64 << 10).min(len - off);
            let last = off + n == len;
            let bits = ctl::ISP | if last { ctl::IOC } else { ctl::CH };
            trbs.push(trb(buf + off as u64, n as u32, ty::NORMAL, bits));
            off += n;
            if last {
                break;
            }
        }
        *self.queue(dci, stream, &trbs).last().unwrap()
    }

    /// The Transfer Event of the TD at `at`: completion code and bytes
    /// moved.
    fn done(&mut self, at: u64, len: usize) -> (u32, usize) {
        let e = self.wait_for(|e| e.ty() == ty::TRANSFER_EVENT && e.param == at);
        (e.status >> 24, len - (e.status & 0xff_ffff) as usize)
    }

    /// A command as Linux runs it with streams: the status TD and the data
    /// TD on stream `tag` first, then the COMMAND IU. Returns the data TD's
    /// address (if any) and the status TD's.
    fn submit(
        &mut self,
        tag: u16,
        cdb: &[u8],
        data: Option<(u8, u64, usize)>,
    ) -> (Option<u64>, u64) {
        let status = self.td(DCI_STATUS, tag, STATUS_BUF + tag as u64 * 0x100, 0x100);
        let data = data.map(|(dci, buf, len)| self.td(dci, tag, buf, len));
        let t = tag.to_be_bytes();
        let mut iu = vec![id::COMMAND, 0, t[0], t[1], 0, 0, 0, 0];
        iu.extend_from_slice(&encode_lun(0));
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        iu.extend_from_slice(&c);
        let buf = IU_BUF + tag as u64 * 0x40;
        self.mem.write_slice(&iu, GuestAddress(buf)).unwrap();
        let at = self.td(DCI_COMMAND, 0, buf, iu.len());
        assert_eq!(self.done(at, iu.len()), (1, 32), "COMMAND IU");
        (data, status)
    }

    /// The SENSE IU of `tag` from its status TD: (status, sense key).
    fn sense(&mut self, tag: u16, at: u64) -> (u8, u8) {
        let (cc, n) = self.done(at, 0x100);
        assert_eq!(cc, 13, "a short packet ends the status TD");
        let mut b = vec![0u8; n];
        self.mem
            .read_slice(&mut b, GuestAddress(STATUS_BUF + tag as u64 * 0x100))
            .unwrap();
        assert_eq!((b[0], u16::from_be_bytes([b[2], b[3]])), (id::SENSE, tag));
        (b[6], if n > 16 { b[18] & 0xf } else { 0 })
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(29)
                .wrapping_add(seed ^ (i >> 10) as u8)
        })
        .collect()
}

fn cdb10(op: u8, lba: u32, blocks: u16) -> Vec<u8> {
    testutil::cdb10(op, 0, lba, blocks)[..10].to_vec()
}

#[test]
fn streams_through_the_xhci() {
    let img = TempImage::new(8 * MIB);
    let dev = UsbUas::new(UasOptions::default());
    let disk = Disk::new(img.backend(BackendConfig::default()), Default::default()).unwrap();
    dev.attach(0, Arc::new(disk)).unwrap();
    let mut r = Rig::new();
    let port = r.hc.attach(0, Box::new(dev)).unwrap();
    r.enumerate(port);
    let (cc, cfg) = r.control([0x80, 6, 0, 2, 0, 0, 0xff, 0]);
    assert_eq!((cc, cfg.len()), (1, 86), "SuperSpeed configuration");

    // TEST UNIT READY: the power-on UNIT ATTENTION.
    let (_, st) = r.submit(1, &[0; 6], None);
    assert_eq!(r.sense(1, st), (2, 6));

    // WRITE(10) of 1 MiB on stream 2: several pieces, the TD NAKed while
    // the stage is full and re-run by the device's wakeup.
    let kicks = r.kicks.load(Ordering::SeqCst);
    let data = pattern(MIB as usize, 5);
    r.mem.write_slice(&data, GuestAddress(DATA_BUF)).unwrap();
    let blocks = (MIB / 512) as u16;
    let (d, st) = r.submit(
        2,
        &cdb10(0x2a, 64, blocks),
        Some((DCI_DATA_OUT, DATA_BUF, data.len())),
    );
    assert_eq!(r.done(d.unwrap(), data.len()), (1, data.len()));
    assert_eq!(r.sense(2, st), (0, 0));
    let on_disk = std::fs::read(&img.path).unwrap();
    assert!(on_disk[64 * 512..64 * 512 + data.len()] == data[..]);

    // Two READ(10)s in flight on streams 3 and 4, completed out of order.
    let half = data.len() / 2;
    let b3 = DATA_BUF + 2 * MIB;
    let b4 = DATA_BUF + 3 * MIB;
    let (d3, st3) = r.submit(
        3,
        &cdb10(0x28, 64, blocks / 2),
        Some((DCI_DATA_IN, b3, half)),
    );
    let (d4, st4) = r.submit(
        4,
        &cdb10(0x28, 64 + blocks as u32 / 2, blocks / 2),
        Some((DCI_DATA_IN, b4, half)),
    );
    assert_eq!(r.done(d4.unwrap(), half), (1, half));
    assert_eq!(r.sense(4, st4), (0, 0));
    assert_eq!(r.done(d3.unwrap(), half), (1, half));
    assert_eq!(r.sense(3, st3), (0, 0));
    let mut back = vec![0u8; data.len()];
    r.mem
        .read_slice(&mut back[..half], GuestAddress(b3))
        .unwrap();
    r.mem
        .read_slice(&mut back[half..], GuestAddress(b4))
        .unwrap();
    assert!(back == data, "read back what was written");
    assert!(
        r.kicks.load(Ordering::SeqCst) > kicks,
        "the device woke the controller"
    );

    // INQUIRY: a short data TD.
    let (d, st) = r.submit(
        5,
        &[0x12, 0, 0, 0, 36, 0],
        Some((DCI_DATA_IN, DATA_BUF, 4096)),
    );
    assert_eq!(r.done(d.unwrap(), 4096), (13, 36));
    assert_eq!(r.sense(5, st), (0, 0));
}
