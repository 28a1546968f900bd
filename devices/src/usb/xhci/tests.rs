//! The xHCI driven as a guest driver would: registers through BAR0, the
//! command ring, event ring and transfer rings in guest RAM, contexts
//! written like Linux and SeaBIOS write them, and a real usb-storage
//! with a real SCSI disk behind it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestMemoryMmap};

use super::trb::{ctl, ty, Trb};
use super::*;
use crate::clock::ManualClock;
use crate::pci::config::COMMAND;
use crate::scsi::testutil::{self, TempImage};
use crate::scsi::{Disk, Lun};
use crate::usb::bot::{Cbw, Csw, CswStatus};
use crate::usb::storage::{StorageOptions, UsbStorage};
use block::backend::{BackendConfig, BlockBackend};

const MIB: u64 = 1 << 20;
const DCBAA: u64 = 0x1000;
const CMD_RING: u64 = 0x2000;
const ERST: u64 = 0x3000;
const EV_RING: u64 = 0x4000;
const EV_TRBS: u64 = 64;
const IN_CTX: u64 = 0x8000;
const OUT_CTX: u64 = 0x10000;
const RINGS: u64 = 0x10_0000;
const CBW_BUF: u64 = 0x1f_0000;
const CSW_BUF: u64 = 0x1f_1000;
const CTRL_BUF: u64 = 0x1f_2000;
const BUF: u64 = 0x20_0000;
const BUF2: u64 = 0x60_0000;

/// Bulk endpoints of usb-storage: EP1 IN, EP2 OUT.
const DCI_IN: u8 = 3;
const DCI_OUT: u8 = 4;

#[derive(Default)]
struct Line(AtomicBool);
impl IrqLine for Line {
    fn set_level(&self, l: bool) {
        self.0.store(l, Ordering::SeqCst)
    }
}

#[derive(Default)]
struct Msgs(Mutex<Vec<(u64, u32)>>);
impl MsiSender for Msgs {
    fn send(&self, a: u64, d: u32) {
        lock(&self.0).push((a, d));
    }
}

fn trb(param: u64, status: u32, t: u8, bits: u32) -> Trb {
    Trb {
        param,
        status,
        control: (t as u32) << 10 | bits,
    }
}

struct Rig {
    hc: Xhci,
    mem: Arc<GuestMem>,
    intx: Arc<Line>,
    msgs: Arc<Msgs>,
    kicks: Arc<AtomicU64>,
    cmd: (u64, bool),
    ev: (u64, bool),
    /// Transfer ring enqueue pointers by (slot, dci).
    rings: BTreeMap<(u8, u8), (u64, bool)>,
    /// Events read while waiting for another kind.
    stash: Vec<Trb>,
}

fn ring_base(slot: u8, dci: u8) -> u64 {
    RINGS + (slot as u64 * 32 + dci as u64) * 0x1000
}

impl Rig {
    fn new(opts: XhciOptions) -> Rig {
        let mem = Arc::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)]).unwrap(),
        );
        let intx = Arc::new(Line::default());
        let msgs = Arc::new(Msgs::default());
        let mut hc = Xhci::new(
            mem.clone(),
            intx.clone(),
            msgs.clone(),
            Arc::new(ManualClock::default()),
            opts,
        )
        .unwrap();
        // Memory decoding and bus mastering, as firmware leaves them.
        hc.config_write(COMMAND, &[0x06, 0]);
        let kicks = Arc::new(AtomicU64::new(0));
        let k = kicks.clone();
        hc.set_kick(Arc::new(move || {
            k.fetch_add(1, Ordering::SeqCst);
        }));
        Rig {
            hc,
            mem,
            intx,
            msgs,
            kicks,
            cmd: (CMD_RING, true),
            ev: (EV_RING, true),
            rings: BTreeMap::new(),
            stash: Vec::new(),
        }
    }

    fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.hc.region_read(BAR_MMIO, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(&mut self, off: u64, v: u32) {
        self.hc.region_write(BAR_MMIO, off, &v.to_le_bytes());
    }

    fn put(&self, at: u64, t: &Trb) {
        self.mem
            .write_slice(&t.to_bytes(), GuestAddress(at))
            .unwrap();
    }

    fn portsc(&mut self, port: u8) -> u32 {
        self.r32(PORT_REGS + (port as u64 - 1) * PORT_REGS_LEN)
    }

    fn set_portsc(&mut self, port: u8, v: u32) {
        self.w32(PORT_REGS + (port as u64 - 1) * PORT_REGS_LEN, v)
    }

    /// What a driver does to start the controller: reset, slots, DCBAA,
    /// command ring, one event ring segment, interrupts on, run.
    fn start(&mut self) {
        self.w32(OPER + op::USBCMD, cmd::HCRST);
        assert_eq!(self.r32(OPER + op::USBSTS) & sts::CNR, 0);
        self.w32(OPER + op::CONFIG, 8);
        self.w32(OPER + op::DCBAAP_LO, DCBAA as u32);
        self.w32(OPER + op::DCBAAP_HI, 0);
        self.w32(OPER + op::CRCR_LO, CMD_RING as u32 | 1);
        self.w32(OPER + op::CRCR_HI, 0);
        self.mem.write_obj(EV_RING, GuestAddress(ERST)).unwrap();
        self.mem
            .write_obj(EV_TRBS as u32, GuestAddress(ERST + 8))
            .unwrap();
        let ir = RUNTIME + rt::IR0;
        self.w32(ir + rt::ERSTSZ, 1);
        self.w32(ir + rt::ERDP_LO, EV_RING as u32);
        self.w32(ir + rt::ERDP_HI, 0);
        self.w32(ir + rt::ERSTBA_LO, ERST as u32);
        self.w32(ir + rt::ERSTBA_HI, 0);
        self.w32(ir + rt::IMAN, iman::IE);
        self.w32(OPER + op::USBCMD, cmd::RS | cmd::INTE);
        assert_eq!(self.r32(OPER + op::USBSTS) & sts::HCH, 0);
        self.cmd = (CMD_RING, true);
        self.ev = (EV_RING, true);
    }

    /// The next event the controller posted, ERDP moved past it.
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

    /// Waits for an event of type `want`, running woken endpoints the
    /// way the vmm's kick would.
    fn wait(&mut self, want: u8) -> Trb {
        if let Some(i) = self.stash.iter().position(|t| t.ty() == want) {
            return self.stash.remove(i);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            while let Some(t) = self.event() {
                if t.ty() == want {
                    return t;
                }
                self.stash.push(t);
            }
            assert!(Instant::now() < deadline, "no event of type {want}");
            if self.hc.wakeups_pending() {
                self.hc.process_wakeups();
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Runs a command; returns its completion event.
    fn command(&mut self, t: Trb) -> Trb {
        let mut t = t;
        if self.cmd.1 {
            t.control |= 1;
        }
        let at = self.cmd.0;
        self.put(at, &t);
        self.cmd.0 += 16;
        self.w32(DOORBELL, 0);
        let e = self.wait(ty::COMMAND_COMPLETION);
        assert_eq!(e.param, at, "the completion names the command");
        e
    }

    fn cc(e: &Trb) -> u32 {
        e.status >> 24
    }

    /// Queues TRBs on a transfer ring (no doorbell).
    fn queue(&mut self, slot: u8, dci: u8, trbs: &[Trb]) -> Vec<u64> {
        let (mut at, cycle) = *self
            .rings
            .entry((slot, dci))
            .or_insert((ring_base(slot, dci), true));
        let mut addrs = Vec::new();
        for t in trbs {
            let mut t = *t;
            if cycle {
                t.control |= 1;
            }
            self.put(at, &t);
            addrs.push(at);
            at += 16;
        }
        self.rings.insert((slot, dci), (at, cycle));
        addrs
    }

    fn ring_doorbell(&mut self, slot: u8, dci: u8) {
        self.w32(DOORBELL + 4 * slot as u64, dci as u32);
    }

    /// Enable Slot and Address Device for the device on `port`.
    fn address(&mut self, port: u8, mps0: u16, bsr: bool) -> u8 {
        let e = self.command(trb(0, 0, ty::ENABLE_SLOT, 0));
        assert_eq!(Self::cc(&e), Cc::Success as u32);
        let slot = (e.control >> 24) as u8;
        let out = OUT_CTX + slot as u64 * 0x800;
        self.mem
            .write_obj(out, GuestAddress(DCBAA + 8 * slot as u64))
            .unwrap();
        self.mem
            .write_slice(&[0u8; 0x420], GuestAddress(IN_CTX))
            .unwrap();
        let w = |m: &GuestMem, at: u64, v: u32| m.write_obj(v, GuestAddress(at)).unwrap();
        w(&self.mem, IN_CTX + 4, 3);
        w(&self.mem, IN_CTX + 0x20, 1 << 27);
        w(&self.mem, IN_CTX + 0x24, (port as u32) << 16);
        w(
            &self.mem,
            IN_CTX + 0x44,
            (mps0 as u32) << 16 | 4 << 3 | 3 << 1,
        );
        w(&self.mem, IN_CTX + 0x48, ring_base(slot, 1) as u32 | 1);
        let bit = if bsr { ctl::BIT9 } else { 0 };
        let e = self.command(trb(
            IN_CTX,
            0,
            ty::ADDRESS_DEVICE,
            (slot as u32) << 24 | bit,
        ));
        assert_eq!(Self::cc(&e), Cc::Success as u32);
        slot
    }

    fn out_dword(&self, slot: u8, dci: u8, dw: u64) -> u32 {
        let out = OUT_CTX + slot as u64 * 0x800;
        self.mem
            .read_obj(GuestAddress(out + dci as u64 * 32 + dw * 4))
            .unwrap()
    }

    /// A control transfer: Setup, Data (if any), Status. Returns the
    /// completion code and the IN data.
    fn control(&mut self, slot: u8, setup: [u8; 8], out: &[u8]) -> (u32, Vec<u8>) {
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
            if !input {
                self.mem.write_slice(out, GuestAddress(CTRL_BUF)).unwrap();
            }
            let dir = if input { ctl::DIR_IN } else { 0 };
            trbs.push(trb(CTRL_BUF, len, ty::DATA, dir | ctl::ISP));
        }
        let dir = if len > 0 && input { 0 } else { ctl::DIR_IN };
        trbs.push(trb(0, 0, ty::STATUS, dir | ctl::IOC));
        let addrs = self.queue(slot, 1, &trbs);
        self.ring_doorbell(slot, 1);
        let mut got = len as usize;
        loop {
            let e = self.wait(ty::TRANSFER_EVENT);
            let cc = Self::cc(&e);
            if cc == Cc::ShortPacket as u32 {
                assert_eq!(e.param, addrs[1], "short data stage");
                got = (len - (e.status & 0xff_ffff)) as usize;
                continue;
            }
            let mut d = vec![0u8; got];
            self.mem.read_slice(&mut d, GuestAddress(CTRL_BUF)).unwrap();
            return (cc, d);
        }
    }

    /// Configure Endpoint with usb-storage's bulk pair, then
    /// SET_CONFIGURATION(1).
    fn configure(&mut self, slot: u8, port: u8, mps: u16) {
        self.mem
            .write_slice(&[0u8; 0x420], GuestAddress(IN_CTX))
            .unwrap();
        let w = |m: &GuestMem, at: u64, v: u32| m.write_obj(v, GuestAddress(at)).unwrap();
        w(&self.mem, IN_CTX + 4, 1 | 1 << DCI_IN | 1 << DCI_OUT);
        w(&self.mem, IN_CTX + 0x20, 4 << 27);
        w(&self.mem, IN_CTX + 0x24, (port as u32) << 16);
        for (dci, t) in [(DCI_IN, 6u32), (DCI_OUT, 2)] {
            let at = IN_CTX + 0x20 * (dci as u64 + 1);
            w(&self.mem, at + 4, (mps as u32) << 16 | t << 3 | 3 << 1);
            w(&self.mem, at + 8, ring_base(slot, dci) as u32 | 1);
        }
        let e = self.command(trb(IN_CTX, 0, ty::CONFIGURE_EP, (slot as u32) << 24));
        assert_eq!(Self::cc(&e), Cc::Success as u32);
        assert_eq!(self.out_dword(slot, 0, 3) >> 27, 3, "Configured");
        assert_eq!(self.out_dword(slot, DCI_IN, 0) & 7, 1, "Running");
        let (cc, _) = self.control(slot, [0, 9, 1, 0, 0, 0, 0, 0], &[]);
        assert_eq!(cc, Cc::Success as u32);
    }

    /// A bulk TD of `len` bytes at `buf` in Normal TRBs of at most
    /// `piece` bytes; returns its Transfer Event.
    fn bulk(&mut self, slot: u8, dci: u8, buf: u64, len: usize, piece: usize) -> Trb {
        let mut trbs = Vec::new();
        let mut off = 0;
        loop {
            let n = piece.min(len - off);
            let last = off + n == len;
            let bits = ctl::ISP | if last { ctl::IOC } else { ctl::CH };
            trbs.push(trb(buf + off as u64, n as u32, ty::NORMAL, bits));
            off += n;
            if last {
                break;
            }
        }
        self.queue(slot, dci, &trbs);
        self.ring_doorbell(slot, dci);
        self.wait(ty::TRANSFER_EVENT)
    }

    /// A BOT command: CBW, data at `buf`, CSW.
    fn bot(&mut self, slot: u8, cbw: Cbw, buf: u64) -> Csw {
        self.mem
            .write_slice(&cbw.to_bytes(), GuestAddress(CBW_BUF))
            .unwrap();
        let e = self.bulk(slot, DCI_OUT, CBW_BUF, 31, 31);
        assert_eq!(Self::cc(&e), Cc::Success as u32, "CBW");
        if cbw.data_len > 0 {
            let dci = if cbw.dir == Dir::In { DCI_IN } else { DCI_OUT };
            let e = self.bulk(slot, dci, buf, cbw.data_len as usize, 64 << 10);
            assert_eq!(Self::cc(&e), Cc::Success as u32, "data phase");
            assert_eq!((e.control >> 16) & 0x1f, dci as u32);
        }
        let e = self.bulk(slot, DCI_IN, CSW_BUF, 13, 13);
        assert_eq!(Self::cc(&e), Cc::Success as u32, "CSW");
        let mut b = [0u8; 13];
        self.mem.read_slice(&mut b, GuestAddress(CSW_BUF)).unwrap();
        Csw::parse(&b).unwrap()
    }

    /// A usb-storage with `unit`, attached at connector `index`,
    /// addressed, configured, its UNIT ATTENTION consumed.
    fn storage(&mut self, index: usize, unit: Arc<dyn Lun>) -> u8 {
        let dev = UsbStorage::new(StorageOptions::default());
        dev.attach(0, unit).unwrap();
        let port = self.hc.attach(index, Box::new(dev)).unwrap();
        let slot = self.address(port, 512, false);
        let (cc, d) = self.control(slot, [0x80, 6, 0, 1, 0, 0, 18, 0], &[]);
        assert_eq!(cc, Cc::Success as u32);
        assert_eq!(d.len(), 18);
        assert_eq!(u16::from_le_bytes([d[8], d[9]]), 0x46f4, "idVendor");
        self.configure(slot, port, 1024);
        let csw = self.bot(slot, Cbw::new(1, 0, Dir::Out, 0, &[0; 6]), BUF);
        assert_eq!(csw.status, CswStatus::Failed, "UNIT ATTENTION");
        slot
    }
}

fn disk(b: Arc<BlockBackend>) -> Arc<dyn Lun> {
    Arc::new(Disk::new(b, Default::default()).unwrap())
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

#[test]
fn pci_identity_and_capabilities() {
    let mut r = Rig::new(XhciOptions::qemu());
    let mut b = [0u8; 4];
    r.hc.config_read(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x000d_1b36);
    r.hc.config_read(8, &mut b);
    assert_eq!(u32::from_le_bytes(b) >> 8, 0x0c_03_30);
    let nec = Rig::new(XhciOptions::nec());
    nec.hc.config().read(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x0194_1033);
    assert_eq!(r.r32(cap::CAPLENGTH), 0x0100_0040);
    assert_eq!(r.r32(cap::HCSPARAMS1), 8 << 24 | 16 << 8 | 64);
    assert_eq!(r.r32(cap::DBOFF), 0x2000);
    assert_eq!(r.r32(cap::RTSOFF), 0x1000);
    let xecp = (r.r32(cap::HCCPARAMS1) >> 16) as u64 * 4;
    // QEMU 7.2's layout: USB 3 ports 1-4, then USB 2 ports 5-8.
    assert_eq!(r.r32(xecp) & 0xff, 2);
    assert_eq!(r.r32(xecp) >> 24, 2);
    assert_eq!(r.r32(xecp + 8) & 0xffff, 4 << 8 | 5);
    let next = xecp + ((r.r32(xecp) >> 8) & 0xff) as u64 * 4;
    assert_eq!(r.r32(next) >> 24, 3);
    assert_eq!(r.r32(next + 8) & 0xffff, 4 << 8 | 1);
    assert_eq!((r.r32(next) >> 8) & 0xff, 0, "last capability");
    // A byte read of HCIVERSION.
    let mut v = [0u8; 2];
    r.hc.region_read(BAR_MMIO, 2, &mut v);
    assert_eq!(u16::from_le_bytes(v), 0x0100);
}

#[test]
fn reset_run_and_stop() {
    let mut r = Rig::new(XhciOptions::qemu());
    assert_eq!(r.r32(OPER + op::USBSTS), sts::HCH);
    assert_eq!(r.r32(OPER + op::PAGESIZE), 1);
    r.start();
    let e = r.command(trb(0, 0, ty::NOOP_CMD, 0));
    assert_eq!(Rig::cc(&e), Cc::Success as u32);
    assert_eq!(r.r32(OPER + op::CRCR_LO), crcr::CRR as u32);
    assert!(r.r32(OPER + op::USBSTS) & sts::EINT != 0);
    r.w32(OPER + op::USBCMD, 0);
    assert_eq!(r.r32(OPER + op::USBSTS) & sts::HCH, sts::HCH);
    assert_eq!(r.r32(OPER + op::CRCR_LO), 0, "the command ring stops too");
    // Doorbells while halted do nothing.
    r.put(r.cmd.0, &trb(0, 0, ty::NOOP_CMD, 1));
    r.w32(DOORBELL, 0);
    assert!(r.event().is_none());
    r.w32(OPER + op::USBCMD, cmd::HCRST);
    assert_eq!(r.r32(OPER + op::CONFIG), 0);
    assert_eq!(r.r32(OPER + op::DCBAAP_LO), 0);
    assert_eq!(r.r32(RUNTIME + rt::IR0 + rt::ERSTSZ), 0);
}

#[test]
fn ports_connect_reset_and_hotplug() {
    // The other layout (`superspeed-ports-first=off`): USB 2 ports 1-4,
    // USB 3 ports 5-8.
    let mut r = Rig::new(XhciOptions {
        ss_first: false,
        ..XhciOptions::qemu()
    });
    let unit = disk(testutil::null(MIB));
    let dev = UsbStorage::new(StorageOptions::default());
    dev.attach(0, unit).unwrap();
    // usb-storage runs at SuperSpeed: the USB 3 port of connector 1.
    assert_eq!(r.hc.attach(0, Box::new(dev)).unwrap(), 5);
    let s = r.portsc(5);
    assert_eq!(
        s & (portsc::CCS | portsc::PED | portsc::PP | portsc::CSC),
        portsc::CCS | portsc::PED | portsc::PP | portsc::CSC
    );
    assert_eq!(
        (s & portsc::SPEED_MASK) >> portsc::SPEED_SHIFT,
        speed::SUPER
    );
    assert_eq!((s & portsc::PLS_MASK) >> portsc::PLS_SHIFT, pls::U0);
    assert_eq!(r.portsc(1) & portsc::CCS, 0);
    r.start();
    // The change bit is write-1-to-clear.
    r.set_portsc(5, portsc::PP | portsc::CSC);
    assert_eq!(r.portsc(5) & portsc::CSC, 0);
    // Port reset: PRC and a Port Status Change Event.
    r.set_portsc(5, portsc::PP | portsc::PR);
    let e = r.wait(ty::PORT_STATUS_CHANGE);
    assert_eq!(e.param >> 24, 5);
    assert!(r.portsc(5) & portsc::PRC != 0);
    assert!(r.r32(OPER + op::USBSTS) & sts::PCD != 0);
    r.set_portsc(5, portsc::PP | portsc::PRC);
    // Warm reset: WRC too.
    r.set_portsc(5, portsc::PP | portsc::WPR);
    r.wait(ty::PORT_STATUS_CHANGE);
    assert!(r.portsc(5) & portsc::WRC != 0);
    // Hotplug on connector 2, then unplug.
    let dev = UsbStorage::new(StorageOptions::default());
    assert_eq!(r.hc.attach(1, Box::new(dev)).unwrap(), 6);
    assert_eq!(r.wait(ty::PORT_STATUS_CHANGE).param >> 24, 6);
    assert!(r
        .hc
        .attach(1, Box::new(UsbStorage::new(StorageOptions::default())))
        .is_err());
    r.set_portsc(6, portsc::PP | portsc::CSC);
    assert!(r.hc.detach(1).is_some());
    assert_eq!(r.wait(ty::PORT_STATUS_CHANGE).param >> 24, 6);
    assert_eq!(
        r.portsc(6) & (portsc::CCS | portsc::PED | portsc::CSC),
        portsc::CSC
    );
    assert!(r.hc.detach(1).is_none());
    assert!(r
        .hc
        .attach(9, Box::new(UsbStorage::new(StorageOptions::default())))
        .is_err());
}

#[test]
fn usb2_port_needs_a_reset_to_enable() {
    let mut r = Rig::new(XhciOptions {
        p3: 1,
        ss_first: false,
        ..XhciOptions::qemu()
    });
    r.start();
    let dev = UsbStorage::new(StorageOptions::default());
    // Connector 3 has no USB 3 port: high speed on USB 2 port 3.
    assert_eq!(r.hc.attach(2, Box::new(dev)).unwrap(), 3);
    assert_eq!(r.wait(ty::PORT_STATUS_CHANGE).param >> 24, 3);
    let s = r.portsc(3);
    assert_eq!(s & portsc::PED, 0);
    assert_eq!((s & portsc::SPEED_MASK) >> portsc::SPEED_SHIFT, speed::HIGH);
    assert_eq!((s & portsc::PLS_MASK) >> portsc::PLS_SHIFT, pls::POLLING);
    r.set_portsc(3, portsc::PP | portsc::CSC);
    r.set_portsc(3, portsc::PP | portsc::PR);
    assert_eq!(r.wait(ty::PORT_STATUS_CHANGE).param >> 24, 3);
    let s = r.portsc(3);
    assert_eq!(
        s & (portsc::PED | portsc::PRC | portsc::CSC),
        portsc::PED | portsc::PRC
    );
    // Enumerates at high speed: ep0 max packet 64.
    let slot = r.address(3, 64, true);
    assert_eq!(r.out_dword(slot, 0, 3) >> 27, 1, "BSR: Default state");
    // A second Address Device, now with SET_ADDRESS.
    r.mem.write_obj(3u32, GuestAddress(IN_CTX + 4)).unwrap();
    let e = r.command(trb(IN_CTX, 0, ty::ADDRESS_DEVICE, (slot as u32) << 24));
    assert_eq!(Rig::cc(&e), Cc::Success as u32);
    let ctx: Vec<u32> = (0..8).map(|i| r.out_dword(slot, 0, i)).collect();
    assert_eq!(r.out_dword(slot, 0, 3), 2 << 27 | slot as u32, "{ctx:x?}");
    let (cc, d) = r.control(slot, [0x80, 6, 0, 1, 0, 0, 64, 0], &[]);
    assert_eq!(
        (cc, d.len()),
        (Cc::Success as u32, 18),
        "a short data stage"
    );
    assert_eq!(u16::from_le_bytes([d[2], d[3]]), 0x0200, "bcdUSB 2.0");
}

#[test]
fn storage_write_and_read_through_bulk_rings() {
    let img = TempImage::new(4 * MIB);
    let mut r = Rig::new(XhciOptions::qemu());
    r.start();
    let slot = r.storage(0, disk(img.backend(BackendConfig::default())));
    let data = pattern(192 << 10, 7);
    r.mem.write_slice(&data, GuestAddress(BUF)).unwrap();
    let csw = r.bot(
        slot,
        Cbw::new(2, data.len() as u32, Dir::Out, 0, &cdb10(0x2a, 16, 384)),
        BUF,
    );
    assert_eq!((csw.status, csw.residue), (CswStatus::Passed, 0));
    let on_disk = std::fs::read(&img.path).unwrap();
    assert!(
        on_disk[16 * 512..16 * 512 + data.len()] == data[..],
        "the image holds what was written"
    );
    let csw = r.bot(
        slot,
        Cbw::new(3, data.len() as u32, Dir::In, 0, &cdb10(0x28, 16, 384)),
        BUF2,
    );
    assert_eq!((csw.status, csw.residue), (CswStatus::Passed, 0));
    let mut back = vec![0u8; data.len()];
    r.mem.read_slice(&mut back, GuestAddress(BUF2)).unwrap();
    assert!(back == data, "read back what was written");
    // A short packet: the 13-byte CSW into a 512-byte TD of two TRBs.
    r.mem
        .write_slice(
            &Cbw::new(4, 0, Dir::Out, 0, &[0; 6]).to_bytes(),
            GuestAddress(CBW_BUF),
        )
        .unwrap();
    assert_eq!(
        Rig::cc(&r.bulk(slot, DCI_OUT, CBW_BUF, 31, 31)),
        Cc::Success as u32
    );
    let first = r.rings[&(slot, DCI_IN)].0;
    let e = r.bulk(slot, DCI_IN, CSW_BUF, 512, 256);
    assert_eq!(Rig::cc(&e), Cc::ShortPacket as u32);
    assert_eq!(
        e.status & 0xff_ffff,
        256 - 13,
        "residual of the TRB that ran short"
    );
    assert_eq!(e.param, first, "the event is for the TRB that ran short");
    assert!(r.event().is_none(), "one event per TD");
}

#[test]
fn stall_and_reset_recovery() {
    let mut r = Rig::new(XhciOptions::qemu());
    r.start();
    let slot = r.storage(0, disk(testutil::null(MIB)));
    // 30 bytes: not a CBW. The device stalls; the endpoint halts.
    let e = r.bulk(slot, DCI_OUT, CBW_BUF, 30, 30);
    assert_eq!(Rig::cc(&e), Cc::Stall as u32);
    assert_eq!(r.out_dword(slot, DCI_OUT, 0) & 7, 2, "Halted");
    let failed = e.param;
    assert_eq!(r.out_dword(slot, DCI_OUT, 2) as u64 & !0xf, failed);
    // Halted: a doorbell does nothing.
    r.ring_doorbell(slot, DCI_OUT);
    assert!(r.event().is_none());
    // Set TR Dequeue needs Reset Endpoint first.
    let next = r.rings[&(slot, DCI_OUT)].0;
    let set_deq = trb(
        next | 1,
        0,
        ty::SET_TR_DEQUEUE,
        (slot as u32) << 24 | (DCI_OUT as u32) << 16,
    );
    assert_eq!(Rig::cc(&r.command(set_deq)), Cc::ContextState as u32);
    let reset = trb(
        0,
        0,
        ty::RESET_EP,
        (slot as u32) << 24 | (DCI_OUT as u32) << 16,
    );
    assert_eq!(Rig::cc(&r.command(reset)), Cc::Success as u32);
    assert_eq!(r.out_dword(slot, DCI_OUT, 0) & 7, 3, "Stopped");
    assert_eq!(
        Rig::cc(&r.command(reset)),
        Cc::ContextState as u32,
        "not halted"
    );
    assert_eq!(Rig::cc(&r.command(set_deq)), Cc::Success as u32);
    // BOT Reset Recovery: the class reset, then both halts cleared.
    assert_eq!(
        r.control(slot, [0x21, 0xff, 0, 0, 0, 0, 0, 0], &[]).0,
        Cc::Success as u32
    );
    for ep in [0x81u8, 0x02] {
        assert_eq!(
            r.control(slot, [2, 1, 0, 0, ep, 0, 0, 0], &[]).0,
            Cc::Success as u32
        );
    }
    let csw = r.bot(slot, Cbw::new(9, 0, Dir::Out, 0, &[0; 6]), BUF);
    assert_eq!(csw.status, CswStatus::Passed);
    // A stalled control request halts the default endpoint too.
    let (cc, _) = r.control(slot, [0xc0, 0x42, 0, 0, 0, 0, 4, 0], &[]);
    assert_eq!(cc, Cc::Stall as u32);
    assert_eq!(r.out_dword(slot, 1, 0) & 7, 2);
}

#[test]
fn nak_then_wakeup_completes_the_td() {
    // null-aio completes on a worker pool: the first IN is NAKed, and
    // the device's wakeup gets the TD run again.
    let b = testutil::backend(
        "driver=null-aio,size=67108864,latency-ns=2000000",
        BackendConfig::default(),
    );
    let mut r = Rig::new(XhciOptions::qemu());
    r.start();
    let slot = r.storage(0, disk(b));
    let kicks = r.kicks.load(Ordering::SeqCst);
    let len = 4 << 20;
    r.mem
        .write_slice(
            &Cbw::new(5, len, Dir::In, 0, &cdb10(0x28, 0, 8192)).to_bytes(),
            GuestAddress(CBW_BUF),
        )
        .unwrap();
    assert_eq!(
        Rig::cc(&r.bulk(slot, DCI_OUT, CBW_BUF, 31, 31)),
        Cc::Success as u32
    );
    let e = r.bulk(slot, DCI_IN, BUF, len as usize, 64 << 10);
    assert_eq!((Rig::cc(&e), e.status & 0xff_ffff), (Cc::Success as u32, 0));
    assert!(
        r.kicks.load(Ordering::SeqCst) > kicks,
        "the device woke the controller"
    );
    let e = r.bulk(slot, DCI_IN, CSW_BUF, 13, 13);
    assert_eq!(Rig::cc(&e), Cc::Success as u32);
    let mut b = [0u8; 13];
    r.mem.read_slice(&mut b, GuestAddress(CSW_BUF)).unwrap();
    let csw = Csw::parse(&b).unwrap();
    assert_eq!(
        (csw.tag, csw.status, csw.residue),
        (5, CswStatus::Passed, 0)
    );
}

/// A device whose bulk IN endpoint NAKs until the test opens the gate
/// and calls the wakeup, as a device with asynchronous I/O does.
#[derive(Default)]
struct Gate {
    open: AtomicBool,
    wake: Mutex<Option<Wakeup>>,
}

struct GatedDev(Arc<Gate>, u8);

impl UsbDevice for GatedDev {
    fn speeds(&self) -> &[Speed] {
        &[Speed::High]
    }
    fn set_speed(&mut self, _: Speed) {}
    fn speed(&self) -> Speed {
        Speed::High
    }
    fn address(&self) -> u8 {
        self.1
    }
    fn reset(&mut self) {
        self.1 = 0;
    }
    fn set_wakeup(&mut self, w: Option<Wakeup>) {
        *lock(&self.0.wake) = w;
    }
    fn handle_control(&mut self, s: &SetupPacket, _: &mut dyn PacketData) -> UsbResult {
        if s.request == 5 {
            self.1 = s.value as u8;
        }
        UsbResult::Ack(0)
    }
    fn handle_data(&mut self, _: Endpoint, _: u32, data: &mut dyn PacketData) -> UsbResult {
        if !self.0.open.load(Ordering::SeqCst) {
            return UsbResult::Nak;
        }
        let n = data.len();
        data.copy_to_host(0, &vec![0xab; n]).unwrap();
        UsbResult::Ack(n)
    }
}

fn gated() -> (Rig, Arc<Gate>, u8) {
    let mut r = Rig::new(XhciOptions::qemu());
    r.start();
    let gate = Arc::new(Gate::default());
    let port = r.hc.attach(0, Box::new(GatedDev(gate.clone(), 0))).unwrap();
    assert_eq!(
        port, 5,
        "high speed: connector 1's USB 2 port, after the USB 3 ones"
    );
    let slot = r.address(port, 64, false);
    r.configure(slot, port, 512);
    (r, gate, slot)
}

#[test]
fn wakeup_from_another_thread_reruns_the_endpoint() {
    let (mut r, gate, slot) = gated();
    let addrs = r.queue(
        slot,
        DCI_IN,
        &[trb(BUF, 1000, ty::NORMAL, ctl::IOC | ctl::ISP)],
    );
    r.ring_doorbell(slot, DCI_IN);
    assert!(r.event().is_none(), "NAKed");
    assert!(!r.hc.wakeups_pending());
    let kicks = r.kicks.load(Ordering::SeqCst);
    gate.open.store(true, Ordering::SeqCst);
    let w = lock(&gate.wake).clone().unwrap();
    std::thread::spawn(move || w(Endpoint::new(1, Dir::In)))
        .join()
        .unwrap();
    assert_eq!(
        r.kicks.load(Ordering::SeqCst),
        kicks + 1,
        "the vmm was kicked"
    );
    assert!(r.hc.wakeups_pending());
    r.hc.process_wakeups();
    let e = r.event().expect("the TD completed");
    assert_eq!((Rig::cc(&e), e.param), (Cc::Success as u32, addrs[0]));
    let mut b = [0u8; 1000];
    r.mem.read_slice(&mut b, GuestAddress(BUF)).unwrap();
    assert!(b.iter().all(|&x| x == 0xab));
}

#[test]
fn stop_endpoint_reports_a_naked_td() {
    let (mut r, _gate, slot) = gated();
    let addrs = r.queue(
        slot,
        DCI_IN,
        &[trb(CSW_BUF, 13, ty::NORMAL, ctl::IOC | ctl::ISP)],
    );
    r.ring_doorbell(slot, DCI_IN);
    assert!(r.event().is_none(), "NAKed");
    let stop = trb(
        0,
        0,
        ty::STOP_EP,
        (slot as u32) << 24 | (DCI_IN as u32) << 16,
    );
    let e = r.command(stop);
    assert_eq!(Rig::cc(&e), Cc::Success as u32);
    let t = r.wait(ty::TRANSFER_EVENT);
    assert_eq!((Rig::cc(&t), t.param), (Cc::Stopped as u32, addrs[0]));
    assert_eq!(r.out_dword(slot, DCI_IN, 0) & 7, 3);
    assert_eq!(r.out_dword(slot, DCI_IN, 2) as u64 & !0xf, addrs[0]);
    assert_eq!(Rig::cc(&r.command(stop)), Cc::ContextState as u32);
    // Detached: the slot's transfers fail.
    assert!(r.hc.detach(0).is_some());
    r.ring_doorbell(slot, DCI_IN);
    let t = r.wait(ty::TRANSFER_EVENT);
    assert_eq!(Rig::cc(&t), Cc::UsbTransaction as u32);
}

#[test]
fn looping_rings_are_bounded() {
    let mut r = Rig::new(XhciOptions::qemu());
    r.start();
    let slot = r.storage(0, disk(testutil::null(MIB)));
    // A link to itself on a transfer ring: TRB Error, halted.
    let base = r.rings[&(slot, DCI_IN)].0;
    r.queue(slot, DCI_IN, &[trb(base, 0, ty::LINK, 0)]);
    r.ring_doorbell(slot, DCI_IN);
    let e = r.wait(ty::TRANSFER_EVENT);
    assert_eq!((Rig::cc(&e), e.param), (Cc::Trb as u32, base));
    assert_eq!(r.out_dword(slot, DCI_IN, 0) & 7, 2);
    // A No Op TD and a link back to it, without toggle: a ring that
    // never empties. One doorbell runs a bounded number of TDs.
    let base = r.rings[&(slot, DCI_OUT)].0;
    r.queue(
        slot,
        DCI_OUT,
        &[trb(0, 0, ty::NOOP, ctl::IOC), trb(base, 0, ty::LINK, 0)],
    );
    r.ring_doorbell(slot, DCI_OUT);
    let mut n = 0;
    while let Some(e) = r.event() {
        n += 1;
        assert!(n <= MAX_TDS_PER_KICK as usize + 1);
        if e.ty() == ty::HOST_CONTROLLER {
            assert_eq!(Rig::cc(&e), Cc::EventRingFull as u32);
        }
    }
    assert!(n > 1);
    // A command ring that links to itself: TRB Error, the ring stops.
    let at = r.cmd.0;
    r.put(at, &trb(at, 0, ty::LINK, 1));
    r.w32(DOORBELL, 0);
    let e = r.wait(ty::COMMAND_COMPLETION);
    assert_eq!((Rig::cc(&e), e.param), (Cc::Trb as u32, at));
    assert_eq!(r.r32(OPER + op::CRCR_LO), 0);
}

#[test]
fn hostile_pointers_and_ids() {
    let mut r = Rig::new(XhciOptions::qemu());
    r.start();
    let slot = r.storage(0, disk(testutil::null(MIB)));
    // A transfer ring outside RAM.
    let stop = trb(
        0,
        0,
        ty::STOP_EP,
        (slot as u32) << 24 | (DCI_IN as u32) << 16,
    );
    assert_eq!(Rig::cc(&r.command(stop)), Cc::Success as u32);
    let far = 0xdead_0000_0000u64;
    let set = trb(
        far | 1,
        0,
        ty::SET_TR_DEQUEUE,
        (slot as u32) << 24 | (DCI_IN as u32) << 16,
    );
    assert_eq!(Rig::cc(&r.command(set)), Cc::Success as u32);
    r.ring_doorbell(slot, DCI_IN);
    let e = r.wait(ty::TRANSFER_EVENT);
    assert_eq!((Rig::cc(&e), e.param), (Cc::Trb as u32, far));
    // A data buffer outside RAM.
    let reset = trb(
        0,
        0,
        ty::RESET_EP,
        (slot as u32) << 24 | (DCI_OUT as u32) << 16,
    );
    let addrs = r.queue(slot, DCI_OUT, &[trb(far, 31, ty::NORMAL, ctl::IOC)]);
    r.ring_doorbell(slot, DCI_OUT);
    let e = r.wait(ty::TRANSFER_EVENT);
    assert_eq!((Rig::cc(&e), e.param), (Cc::Trb as u32, addrs[0]));
    assert_eq!(Rig::cc(&r.command(reset)), Cc::Success as u32);
    // Slot ids out of range, not enabled; endpoint ids invalid.
    assert_eq!(
        Rig::cc(&r.command(trb(0, 0, ty::DISABLE_SLOT, 200 << 24))),
        Cc::Trb as u32
    );
    assert_eq!(
        Rig::cc(&r.command(trb(0, 0, ty::DISABLE_SLOT, 0))),
        Cc::Trb as u32
    );
    assert_eq!(
        Rig::cc(&r.command(trb(0, 0, ty::DISABLE_SLOT, 7 << 24))),
        Cc::SlotNotEnabled as u32
    );
    let bad_ep = trb(0, 0, ty::RESET_EP, (slot as u32) << 24);
    assert_eq!(Rig::cc(&r.command(bad_ep)), Cc::Trb as u32);
    let off_ep = trb(0, 0, ty::RESET_EP, (slot as u32) << 24 | 9 << 16);
    assert_eq!(Rig::cc(&r.command(off_ep)), Cc::EpNotEnabled as u32);
    // Doorbells for slots and targets that do not exist.
    r.w32(DOORBELL + 4 * 63, 3);
    r.w32(DOORBELL + 4 * 200, 3);
    r.ring_doorbell(slot, 0);
    r.ring_doorbell(slot, 200);
    assert!(r.event().is_none());
    // An input context outside RAM.
    let e = r.command(trb(0, 0, ty::ENABLE_SLOT, 0));
    let s2 = (e.control >> 24) as u8;
    let e = r.command(trb(far, 0, ty::ADDRESS_DEVICE, (s2 as u32) << 24));
    assert_eq!(Rig::cc(&e), Cc::Trb as u32);
    // Unknown commands.
    assert_eq!(Rig::cc(&r.command(trb(0, 0, 19, 0))), Cc::Trb as u32);
    // Slots run out.
    for _ in 0..6 {
        r.command(trb(0, 0, ty::ENABLE_SLOT, 0));
    }
    assert_eq!(
        Rig::cc(&r.command(trb(0, 0, ty::ENABLE_SLOT, 0))),
        Cc::NoSlots as u32
    );
    // An event ring outside RAM halts the controller with HSE.
    let ir = RUNTIME + rt::IR0;
    r.w32(ir + rt::ERSTBA_HI, 0x100);
    r.put(r.cmd.0, &trb(0, 0, ty::NOOP_CMD, 1));
    r.w32(DOORBELL, 0);
    let s = r.r32(OPER + op::USBSTS);
    assert_eq!(s & (sts::HSE | sts::HCH), sts::HSE | sts::HCH);
}

#[test]
fn deconfigure_and_reset_device() {
    let mut r = Rig::new(XhciOptions::qemu());
    r.start();
    let slot = r.storage(0, disk(testutil::null(MIB)));
    let e = r.command(trb(0, 0, ty::CONFIGURE_EP, (slot as u32) << 24 | ctl::BIT9));
    assert_eq!(Rig::cc(&e), Cc::Success as u32);
    assert_eq!(r.out_dword(slot, 0, 3) >> 27, 2, "Addressed");
    assert_eq!(r.out_dword(slot, DCI_IN, 0) & 7, 0, "Disabled");
    r.ring_doorbell(slot, DCI_IN);
    assert!(r.event().is_none());
    let e = r.command(trb(0, 0, ty::RESET_DEVICE, (slot as u32) << 24));
    assert_eq!(Rig::cc(&e), Cc::Success as u32);
    assert_eq!(r.out_dword(slot, 0, 3) >> 27, 1, "Default");
    let e = r.command(trb(0, 0, ty::RESET_DEVICE, (slot as u32) << 24));
    assert_eq!(Rig::cc(&e), Cc::ContextState as u32);
    let e = r.command(trb(0, 0, ty::DISABLE_SLOT, (slot as u32) << 24));
    assert_eq!(Rig::cc(&e), Cc::Success as u32);
}

#[test]
fn interrupts_intx_msix_and_msi() {
    let mut r = Rig::new(XhciOptions::qemu());
    r.start();
    r.command(trb(0, 0, ty::NOOP_CMD, 0));
    assert!(r.intx.0.load(Ordering::SeqCst), "INTx follows IP");
    let ir = RUNTIME + rt::IR0;
    r.w32(ir + rt::IMAN, iman::IE | iman::IP);
    assert!(!r.intx.0.load(Ordering::SeqCst));
    // MSI-X: enable in config space, program vector 0.
    let cap = MSIX_CAP;
    r.hc.config_write(cap + 2, &[0x00, 0x80]);
    assert!(!r.intx.0.load(Ordering::SeqCst));
    r.w32(MSIX_TABLE, 0xfee0_0000);
    r.w32(MSIX_TABLE + 8, 0x4041);
    r.w32(MSIX_TABLE + 12, 0);
    r.command(trb(0, 0, ty::NOOP_CMD, 0));
    assert_eq!(*lock(&r.msgs.0), vec![(0xfee0_0000, 0x4041)]);
    // INTE off: no message.
    r.w32(OPER + op::USBCMD, cmd::RS);
    r.command(trb(0, 0, ty::NOOP_CMD, 0));
    assert_eq!(lock(&r.msgs.0).len(), 1);

    // nec-usb-xhci has MSI as well.
    let mut r = Rig::new(XhciOptions::nec());
    r.start();
    r.hc.config_write(MSI_CAP + 4, &0xfee0_1000u32.to_le_bytes());
    r.hc.config_write(MSI_CAP + 12, &0x4022u16.to_le_bytes());
    r.hc.config_write(MSI_CAP + 2, &[1, 0]);
    r.command(trb(0, 0, ty::NOOP_CMD, 0));
    assert_eq!(*lock(&r.msgs.0), vec![(0xfee0_1000, 0x4022)]);
    assert!(!r.intx.0.load(Ordering::SeqCst));
}
