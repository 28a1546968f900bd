//! The EHCI driven as a guest driver would: registers through the memory
//! BAR, queue heads and qTDs in guest RAM, ICH9 UHCIs as companions, and
//! a real usb-storage with a real SCSI disk behind it.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::qtd::token;
use super::regs::*;
use super::*;
use crate::clock::ManualClock;
use crate::pci::config::COMMAND;
use crate::scsi::testutil::{self, TempImage};
use crate::scsi::{Disk, Lun};
use crate::usb::bot::{Cbw, Csw, CswStatus};
use crate::usb::storage::{StorageOptions, UsbStorage};
use crate::usb::uhci::{self, Uhci};
use crate::usb::{Dir, PacketData, SetupPacket, UsbResult};
use block::backend::BackendConfig;

const MIB: u64 = 1 << 20;
const FL: u64 = 0x1000;
const QH: u64 = 0x2000;
const QH2: u64 = 0x2040;
const TDS: u64 = 0x3000;
const SETUP_BUF: u64 = 0x1_0000;
const BUF: u64 = 0x2_0000;

const PID_OUT: u32 = 0;
const PID_IN: u32 = 1;
const PID_SETUP: u32 = 2;

#[derive(Default)]
struct Line(AtomicBool);
impl IrqLine for Line {
    fn set_level(&self, l: bool) {
        self.0.store(l, Ordering::SeqCst)
    }
}

struct Rig {
    hc: Ehci,
    mem: Arc<GuestMem>,
    irq: Arc<Line>,
    clock: Arc<ManualClock>,
}

fn disk(b: Arc<block::backend::BlockBackend>) -> Arc<dyn Lun> {
    Arc::new(Disk::new(b, Default::default()).unwrap())
}

fn storage(unit: Arc<dyn Lun>) -> Box<UsbStorage> {
    let dev = UsbStorage::new(StorageOptions::default());
    dev.attach(0, unit).unwrap();
    Box::new(dev)
}

/// A full-speed-only device (QEMU's `usb-tablet,usb_version=1` in the
/// peer test): a usb-storage that cannot run at high speed.
struct FullSpeed(UsbStorage);
impl UsbDevice for FullSpeed {
    fn speeds(&self) -> &[Speed] {
        &[Speed::Full]
    }
    fn set_speed(&mut self, s: Speed) {
        self.0.set_speed(s)
    }
    fn speed(&self) -> Speed {
        self.0.speed()
    }
    fn address(&self) -> u8 {
        self.0.address()
    }
    fn reset(&mut self) {
        self.0.reset()
    }
    fn set_wakeup(&mut self, w: Option<Wakeup>) {
        self.0.set_wakeup(w)
    }
    fn handle_control(&mut self, s: &SetupPacket, d: &mut dyn PacketData) -> UsbResult {
        self.0.handle_control(s, d)
    }
    fn handle_data(&mut self, ep: Endpoint, st: u32, d: &mut dyn PacketData) -> UsbResult {
        self.0.handle_data(ep, st, d)
    }
}

fn full_speed() -> Box<FullSpeed> {
    Box::new(FullSpeed(UsbStorage::new(StorageOptions::default())))
}

fn qtd_token(pid: u32, len: usize, ioc: bool) -> u32 {
    token::ACTIVE | pid << 8 | 3 << 10 | (len as u32) << 16 | if ioc { token::IOC } else { 0 }
}

impl Rig {
    fn new() -> Rig {
        let mem =
            Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MIB as usize)]).unwrap());
        let irq = Arc::new(Line::default());
        let clock = Arc::new(ManualClock::default());
        let mut hc = Ehci::new(mem.clone(), irq.clone(), clock.clone());
        // Memory and bus master enabled, as firmware leaves it.
        hc.config_write(COMMAND, &[0x06, 0]);
        Rig {
            hc,
            mem,
            irq,
            clock,
        }
    }

    fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.hc.region_read(BAR_MEM, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(&mut self, off: u64, v: u32) {
        self.hc.region_write(BAR_MEM, off, &v.to_le_bytes());
    }

    fn m32(&self, addr: u64, v: u32) {
        self.mem.write_obj(v, GuestAddress(addr)).unwrap();
    }

    fn g32(&self, addr: u64) -> u32 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn portsc(&mut self, i: u64) -> u32 {
        self.r(op::PORTSC + 4 * i)
    }

    /// An async ring of one queue head (H set) linked to itself, idle;
    /// ports routed to the EHCI; running.
    fn start(&mut self) {
        self.qh(QH, 0, 0, 64);
        self.w(op::ASYNCLISTADDR, QH as u32);
        self.w(op::USBINTR, sts::CAUSES);
        self.w(op::CONFIGFLAG, 1);
        self.w(op::USBCMD, cmd::RS | cmd::ASE | cmd::ITC_DEFAULT);
    }

    /// (Re)writes the queue head at `at` for device `addr`, endpoint
    /// `ep`, idle (overlay next T).
    fn qh(&self, at: u64, addr: u8, ep: u8, mps: u32) {
        self.m32(at, at as u32 | 2);
        let dtc = if ep == 0 { 1 << 14 } else { 0 };
        self.m32(
            at + 4,
            addr as u32 | (ep as u32) << 8 | 2 << 12 | dtc | 1 << 15 | mps << 16,
        );
        self.m32(at + 8, 1 << 30);
        for i in 3..12 {
            self.m32(at + 4 * i, if i == 4 || i == 5 { 1 } else { 0 });
        }
    }

    /// Port reset as Linux does it: PR set, then cleared after 50 ms.
    fn reset_port(&mut self, i: u64) -> u32 {
        let at = op::PORTSC + 4 * i;
        let v = self.r(at) & !port::CHANGES;
        self.w(at, (v & !port::PE) | port::PR);
        assert_ne!(self.r(at) & port::PR, 0);
        self.w(at, v & !(port::PR | port::PE));
        self.r(at)
    }

    /// Queues `xfers` (pid, buffer, length) as a qTD chain on the queue
    /// head at QH for `addr`/`ep` and runs frames until the last is
    /// inactive or one halts; returns each qTD's token.
    fn run(&mut self, addr: u8, ep: u8, mps: u32, xfers: &[(u32, u64, usize)]) -> Vec<u32> {
        self.qh(QH, addr, ep, mps);
        for (i, &(pid, buf, len)) in xfers.iter().enumerate() {
            let at = TDS + 32 * i as u64;
            let next = if i + 1 == xfers.len() {
                1
            } else {
                (at + 32) as u32
            };
            self.m32(at, next);
            self.m32(at + 4, 1);
            self.m32(at + 8, qtd_token(pid, len, i + 1 == xfers.len()));
            for p in 0..5u64 {
                let page = if p == 0 {
                    buf
                } else {
                    (buf & !0xfff) + 0x1000 * p
                };
                self.m32(at + 12 + 4 * p, page as u32);
            }
        }
        self.m32(QH + 16, TDS as u32);
        let deadline = Instant::now() + Duration::from_secs(20);
        let toks = |r: &Rig| -> Vec<u32> {
            (0..xfers.len())
                .map(|i| r.g32(TDS + 32 * i as u64 + 8))
                .collect()
        };
        loop {
            self.hc.run_frame();
            let t = toks(self);
            if t.last().unwrap() & token::ACTIVE == 0 || t.iter().any(|&x| x & token::HALTED != 0) {
                return t;
            }
            assert!(Instant::now() < deadline, "the transfer never finished");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// A control transfer: SETUP, one data qTD, status; the IN data.
    fn control(&mut self, addr: u8, setup: [u8; 8]) -> Result<Vec<u8>, u32> {
        self.mem
            .write_slice(&setup, GuestAddress(SETUP_BUF))
            .unwrap();
        let len = u16::from_le_bytes([setup[6], setup[7]]) as usize;
        let input = setup[0] & 0x80 != 0;
        let mut x = vec![(PID_SETUP, SETUP_BUF, 8)];
        if len > 0 {
            x.push((if input { PID_IN } else { PID_OUT }, BUF, len));
        }
        x.push((if input && len > 0 { PID_OUT } else { PID_IN }, 0, 0));
        let t = self.run(addr, 0, 64, &x);
        if let Some(bad) = t.iter().find(|&&v| v & token::HALTED != 0) {
            return Err(*bad);
        }
        if len == 0 || !input {
            return Ok(vec![]);
        }
        let got = len - ((t[1] >> 16) & 0x7fff) as usize;
        let mut b = vec![0u8; got];
        self.mem.read_slice(&mut b, GuestAddress(BUF)).unwrap();
        Ok(b)
    }

    /// A BOT command: CBW at BUF, data at BUF + 0x1000, CSW at BUF + 0x100.
    fn bot(&mut self, addr: u8, cbw: Cbw) -> Csw {
        self.mem
            .write_slice(&cbw.to_bytes(), GuestAddress(BUF))
            .unwrap();
        let t = self.run(addr, 2, 512, &[(PID_OUT, BUF, 31)]);
        assert_eq!(t[0] & (token::ACTIVE | token::HALTED), 0);
        if cbw.data_len > 0 {
            let (pid, ep) = if cbw.dir == Dir::In {
                (PID_IN, 1)
            } else {
                (PID_OUT, 2)
            };
            let t = self.run(addr, ep, 512, &[(pid, BUF + 0x1000, cbw.data_len as usize)]);
            assert_eq!(t[0] & (token::ACTIVE | token::HALTED | 0x7fff << 16), 0);
        }
        let t = self.run(addr, 1, 512, &[(PID_IN, BUF + 0x100, 13)]);
        assert_eq!(t[0] & (token::ACTIVE | token::HALTED), 0);
        let mut b = [0u8; 13];
        self.mem
            .read_slice(&mut b, GuestAddress(BUF + 0x100))
            .unwrap();
        Csw::parse(&b).unwrap()
    }

    fn irq(&self) -> bool {
        self.irq.0.load(Ordering::SeqCst)
    }
}

#[test]
fn pci_identity_and_reset_values() {
    let mut r = Rig::new();
    let cfg = |r: &mut Rig, off: u16, n: usize| {
        let mut b = [0u8; 4];
        r.hc.config_read(off, &mut b[..n]);
        u32::from_le_bytes(b)
    };
    assert_eq!(cfg(&mut r, 0, 4), 0x293a_8086);
    assert_eq!(cfg(&mut r, 8, 4), 0x0c_03_20_03);
    assert_eq!(cfg(&mut r, 0x3d, 1), 4, "INTD#");
    assert_eq!(cfg(&mut r, 0x60, 1), 0x20, "SBRN");
    assert_eq!(cfg(&mut r, 0x61, 1), 0x20, "FLADJ");
    assert_eq!(cfg(&mut r, 0x68, 4), 1, "USBLEGSUP");
    // The OS takes ownership (Linux's handoff).
    r.hc.config_write(0x68, &0x0100_0001u32.to_le_bytes());
    assert_eq!(cfg(&mut r, 0x68, 4), 0x0100_0001);
    // BAR0: 4 KiB of 32-bit memory.
    r.hc.config_write(0x10, &u32::MAX.to_le_bytes());
    assert_eq!(cfg(&mut r, 0x10, 4), 0xffff_f000);

    assert_eq!(r.r(0), 0x0100_0020, "CAPLENGTH, HCIVERSION");
    let mut b = [0u8; 1];
    r.hc.region_read(BAR_MEM, 0, &mut b);
    assert_eq!(b[0], 0x20);
    assert_eq!(r.r(cap::HCSPARAMS), 0x3206);
    assert_eq!((r.r(cap::HCCPARAMS) >> 8) & 0xff, 0x68, "EECP");
    assert_eq!(r.r(cap::HCCPARAMS) & 1, 0, "32-bit");
    assert_eq!(r.r(op::USBCMD), 0x0008_0000);
    assert_eq!(r.r(op::USBSTS), sts::HALTED);
    assert_eq!(r.r(op::CONFIGFLAG), 0);
    for i in 0..6 {
        assert_eq!(r.portsc(i), port::PP, "no companion: the EHCI's");
    }
    r.w(op::FRINDEX, 0xffff_ffff);
    assert_eq!(r.r(op::FRINDEX), 0x3fff);
    r.w(op::PERIODICLISTBASE, 0x1234_5678);
    assert_eq!(r.r(op::PERIODICLISTBASE), 0x1234_5000);
    r.w(op::ASYNCLISTADDR, 0x1234_5678);
    assert_eq!(r.r(op::ASYNCLISTADDR), 0x1234_5660);
    r.w(op::USBCMD, cmd::RS | cmd::PSE);
    assert_eq!(r.r(op::USBSTS) & (sts::HALTED | sts::PSS), sts::PSS);
    r.w(op::USBCMD, cmd::HCRESET);
    assert_eq!(r.r(op::USBCMD), 0x0008_0000);
    assert_eq!(r.r(op::USBSTS), sts::HALTED);
    assert_eq!((r.r(op::FRINDEX), r.r(op::ASYNCLISTADDR)), (0, 0));
}

fn ich9_uhci(n: u8, mem: &Arc<GuestMem>) -> Arc<Mutex<Uhci>> {
    let u = Uhci::ich9(
        n,
        mem.clone(),
        Arc::new(Line::default()),
        Arc::new(ManualClock::default()),
    )
    .unwrap();
    Arc::new(Mutex::new(u))
}

fn uhci_portsc(u: &Arc<Mutex<Uhci>>, i: u64) -> u16 {
    let mut b = [0u8; 2];
    u.lock()
        .unwrap()
        .region_read(uhci::BAR_IO, uhci::reg::PORTSC1 + 2 * i, &mut b);
    // As the peer test: the change bits and bit 7 masked.
    u16::from_le_bytes(b) & !(uhci::port::CSC | uhci::port::PEC | uhci::port::ALWAYS)
}

#[test]
fn ich9_uhci_identity() {
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MIB as usize)]).unwrap());
    for (n, pin) in [(1u8, 1u8), (2, 2), (3, 3), (4, 1), (6, 3)] {
        let u = ich9_uhci(n, &mem);
        let mut b = [0u8; 4];
        u.lock().unwrap().config_read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), (0x2933 + n as u32) << 16 | 0x8086);
        u.lock().unwrap().config_read(0x3d, &mut b[..1]);
        assert_eq!(b[0], pin);
    }
    assert!(Uhci::ich9(
        7,
        mem.clone(),
        Arc::new(Line::default()),
        Arc::new(ManualClock::default())
    )
    .is_err());
}

/// QEMU's usb-hcd-ehci-test, with usb-storage devices as stand-ins: a
/// full-speed one on port 1 (the usb-tablet) and a high-speed one on
/// port 2.
#[test]
fn companion_routing_as_the_peer_test() {
    let mut r = Rig::new();
    let u: Vec<_> = (1..=3).map(|n| ich9_uhci(n, &r.mem)).collect();
    for (i, c) in u.iter().enumerate() {
        let c: CompanionHandle = c.clone();
        r.hc.register_companion(2 * i, c).unwrap();
    }
    let extra: CompanionHandle = ich9_uhci(4, &r.mem);
    assert!(r.hc.register_companion(1, extra.clone()).is_err());
    assert!(r.hc.register_companion(5, extra).is_err());
    r.hc.attach(0, full_speed()).unwrap();
    r.hc.attach(1, storage(disk(testutil::null(MIB)))).unwrap();
    assert!(r.hc.attach(1, full_speed()).is_err(), "in use");

    // CONFIGFLAG 0: every device on the companion.
    assert_eq!(uhci_portsc(&u[0], 0), uhci::port::CCS);
    assert_eq!(uhci_portsc(&u[0], 1), uhci::port::CCS);
    for c in &u[1..] {
        assert_eq!((uhci_portsc(c, 0), uhci_portsc(c, 1)), (0, 0));
    }
    let mask = 0xffff & !port::CHANGES;
    for i in 0..6 {
        assert_eq!(r.portsc(i) & mask, port::PO | port::PP, "port {i}");
    }

    // CONFIGFLAG 1: every port the EHCI's.
    r.w(op::CONFIGFLAG, 1);
    for c in &u {
        assert_eq!((uhci_portsc(c, 0), uhci_portsc(c, 1)), (0, 0));
    }
    assert_eq!(r.portsc(0) & mask, port::PP | port::CCS);
    assert_eq!(r.portsc(1) & mask, port::PP | port::CCS);
    for i in 2..6 {
        assert_eq!(r.portsc(i) & mask, port::PP);
    }
    assert_ne!(r.r(op::USBSTS) & sts::PCD, 0, "port change detect");
    assert_ne!(r.portsc(0) & port::CSC, 0);

    // Hotplug on port 3.
    r.hc.attach(2, full_speed()).unwrap();
    assert_eq!(r.portsc(2) & mask, port::PP | port::CCS);

    // What the driver does next: reset each port; the high-speed device
    // is enabled, the full-speed one is not and goes to the companion.
    assert_eq!(
        r.reset_port(1) & (port::PE | port::CCS),
        port::PE | port::CCS
    );
    assert_eq!(r.reset_port(0) & (port::PE | port::CCS), port::CCS);
    r.w(op::PORTSC, port::PO | port::CSC);
    assert_eq!(r.portsc(0) & mask, port::PO | port::PP);
    assert_eq!(uhci_portsc(&u[0], 0), uhci::port::CCS);
    // Back to the EHCI, then unplugged from wherever it is.
    r.w(op::PORTSC, 0);
    assert_eq!(uhci_portsc(&u[0], 0), 0);
    assert_eq!(r.portsc(0) & mask, port::PP | port::CCS);
    r.w(op::PORTSC, port::PO);
    assert!(r.hc.detach(0).is_some());
    assert_eq!(r.portsc(0) & mask, port::PO | port::PP);
    assert_eq!(uhci_portsc(&u[0], 0), 0);
    assert!(r.hc.detach(1).is_some());
    assert_eq!(r.portsc(1) & mask, port::PP);
    // HCRESET gives the ports back to the companions.
    r.w(op::USBCMD, cmd::HCRESET);
    assert_eq!(r.r(op::CONFIGFLAG), 0);
    assert_eq!(uhci_portsc(&u[1], 0), uhci::port::CCS, "port 3's device");
}

#[test]
fn a_full_speed_device_needs_a_companion() {
    let mut r = Rig::new();
    assert!(r.hc.attach(0, full_speed()).is_err());
    assert!(r.hc.attach(6, storage(disk(testutil::null(MIB)))).is_err());
    r.hc.attach(0, storage(disk(testutil::null(MIB)))).unwrap();
    assert_eq!(r.portsc(0) & (port::CCS | port::CSC), port::CCS | port::CSC);
    // PO cannot be set on a port without a companion.
    r.w(op::PORTSC, port::PO);
    assert_eq!(r.portsc(0) & port::PO, 0);
}

#[test]
fn port_reset_of_a_high_speed_device() {
    let mut r = Rig::new();
    r.hc.attach(3, storage(disk(testutil::null(MIB)))).unwrap();
    assert_ne!(r.r(op::USBSTS) & sts::PCD, 0);
    r.w(op::USBINTR, sts::PCD);
    assert!(r.irq(), "port change interrupt");
    r.w(op::USBSTS, sts::PCD);
    assert!(!r.irq());
    let s = r.portsc(3);
    assert_eq!(s & (port::CCS | port::PE | port::LINE), port::CCS);
    // PE cannot be set by software.
    r.w(op::PORTSC + 12, port::PE);
    assert_eq!(r.portsc(3) & port::PE, 0);
    let s = r.reset_port(3);
    assert_eq!(s & (port::CCS | port::PE | port::PR), port::CCS | port::PE);
    r.w(op::PORTSC + 12, port::CSC | port::PE);
    assert_eq!(r.portsc(3), port::PP | port::CCS | port::PE);
    // Disabled by software, then unplugged.
    r.w(op::PORTSC + 12, 0);
    assert_eq!(r.portsc(3) & port::PE, 0);
    r.hc.detach(3).unwrap();
    assert_eq!(r.portsc(3) & (port::CCS | port::CSC), port::CSC);
}

#[test]
fn enumeration_and_bot_through_the_async_schedule() {
    let img = TempImage::new(MIB);
    let b = img.backend(BackendConfig::default());
    let mut r = Rig::new();
    r.hc.attach(0, storage(disk(b.clone()))).unwrap();
    r.start();
    r.reset_port(0);
    let dev = r.control(0, [0x80, 6, 0, 1, 0, 0, 18, 0]).unwrap();
    assert_eq!(dev.len(), 18);
    assert_eq!(
        (dev[2], dev[3], dev[7]),
        (0x00, 0x02, 64),
        "USB 2.0, 64-byte ep0"
    );
    // A short IN data stage: the qTD keeps its bytes left.
    let cfg = r.control(0, [0x80, 6, 0, 2, 0, 0, 0xff, 0]).unwrap();
    assert_eq!(cfg.len(), 32);
    assert_eq!(
        u16::from_le_bytes([cfg[22], cfg[23]]),
        512,
        "high-speed bulk"
    );
    assert_ne!(r.r(op::USBSTS) & sts::USBINT, 0);
    assert!(r.irq());
    r.control(0, [0, 5, 3, 0, 0, 0, 0, 0]).unwrap();
    r.control(3, [0, 9, 1, 0, 0, 0, 0, 0]).unwrap();
    // An unknown descriptor STALLs: halted, USB error interrupt.
    r.w(op::USBSTS, sts::CAUSES);
    let bad = r.control(3, [0x80, 6, 0, 0x42, 0, 0, 8, 0]).unwrap_err();
    assert_eq!(bad & (token::ACTIVE | token::HALTED), token::HALTED);
    assert_ne!(r.r(op::USBSTS) & sts::ERRINT, 0);

    let tur = Cbw::new(1, 0, Dir::Out, 0, &[0; 6]);
    assert_eq!(r.bot(3, tur).status, CswStatus::Failed, "UNIT ATTENTION");
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 253) as u8).collect();
    r.mem
        .write_slice(&data, GuestAddress(BUF + 0x1000))
        .unwrap();
    let w = testutil::cdb10(0x2a, 0, 40, 16);
    let csw = r.bot(3, Cbw::new(2, 8192, Dir::Out, 0, &w[..10]));
    assert_eq!((csw.status, csw.residue), (CswStatus::Passed, 0));
    let mut on_disk = vec![0u8; 8192];
    b.read_at(40 * 512, &mut on_disk).unwrap();
    assert!(on_disk == data);
    r.mem
        .write_slice(&[0u8; 8192], GuestAddress(BUF + 0x1000))
        .unwrap();
    let rd = testutil::cdb10(0x28, 0, 40, 16);
    let csw = r.bot(3, Cbw::new(3, 8192, Dir::In, 0, &rd[..10]));
    assert_eq!((csw.status, csw.residue), (CswStatus::Passed, 0));
    let mut back = vec![0u8; 8192];
    r.mem
        .read_slice(&mut back, GuestAddress(BUF + 0x1000))
        .unwrap();
    assert!(back == data);
    // The doorbell is answered at the end of a frame.
    r.w(op::USBSTS, sts::CAUSES);
    r.w(op::USBCMD, cmd::RS | cmd::ASE | cmd::IAAD);
    assert_ne!(r.r(op::USBCMD) & cmd::IAAD, 0);
    r.hc.run_frame();
    assert_eq!(r.r(op::USBCMD) & cmd::IAAD, 0);
    assert_ne!(r.r(op::USBSTS) & sts::IAA, 0);
}

#[test]
fn reads_nak_then_wake_on_an_async_backend() {
    let b = testutil::backend(
        "driver=null-aio,size=1048576,latency-ns=2000000",
        BackendConfig::default(),
    );
    let mut r = Rig::new();
    r.hc.attach(0, storage(disk(b))).unwrap();
    r.start();
    r.reset_port(0);
    r.control(0, [0, 5, 1, 0, 0, 0, 0, 0]).unwrap();
    r.control(1, [0, 9, 1, 0, 0, 0, 0, 0]).unwrap();
    r.bot(1, Cbw::new(1, 0, Dir::Out, 0, &[0; 6]));
    let rd = testutil::cdb10(0x28, 0, 0, 8);
    let csw = r.bot(1, Cbw::new(2, 4096, Dir::In, 0, &rd[..10]));
    assert_eq!(csw.status, CswStatus::Passed);
    assert!(
        r.hc.wakeups() > 0,
        "the device NAKed and woke the controller"
    );
}

#[test]
fn interrupt_endpoint_on_the_periodic_schedule() {
    let mut r = Rig::new();
    r.hc.attach(0, storage(disk(testutil::null(MIB)))).unwrap();
    r.w(op::CONFIGFLAG, 1);
    r.reset_port(0);
    // Every frame list entry: an iTD (walked past) linking to an
    // interrupt queue head (S-mask 1), here running endpoint 0's
    // GET_STATUS as any queue would.
    for i in 0..1024 {
        r.m32(FL + 4 * i, 0x4000);
    }
    r.m32(0x4000, QH2 as u32 | 2);
    r.qh(QH2, 0, 0, 64);
    r.m32(QH2, 1);
    r.m32(QH2 + 8, 1 << 30 | 1);
    r.w(op::PERIODICLISTBASE, FL as u32);
    r.w(op::USBINTR, sts::CAUSES);
    r.w(op::USBCMD, cmd::RS | cmd::PSE);
    r.mem
        .write_slice(&[0x80, 0, 0, 0, 0, 0, 2, 0], GuestAddress(SETUP_BUF))
        .unwrap();
    let tds = [(PID_SETUP, SETUP_BUF, 8), (PID_IN, BUF, 2), (PID_OUT, 0, 0)];
    for (i, &(pid, buf, len)) in tds.iter().enumerate() {
        let at = TDS + 32 * i as u64;
        r.m32(at, if i == 2 { 1 } else { (at + 32) as u32 });
        r.m32(at + 4, 1);
        r.m32(at + 8, qtd_token(pid, len, i == 2));
        r.m32(at + 12, buf as u32);
    }
    r.m32(QH2 + 16, TDS as u32);
    for _ in 0..3 {
        r.hc.run_frame();
    }
    for i in 0..3 {
        assert_eq!(r.g32(TDS + 32 * i + 8) & (token::ACTIVE | token::HALTED), 0);
    }
    assert_eq!(r.r(op::FRINDEX), 24);
    assert_ne!(r.r(op::USBSTS) & sts::USBINT, 0);
}

#[test]
fn looping_lists_are_bounded() {
    let mut r = Rig::new();
    r.start();
    // An async ring of two queue heads without an H bit, for a device
    // nobody has, retried for ever (Cerr 0).
    for (at, next) in [(QH, QH2), (QH2, QH)] {
        r.qh(at, 9, 1, 512);
        r.m32(at, next as u32 | 2);
        r.m32(at + 4, 9 | 1 << 8 | 2 << 12 | 512 << 16);
        r.m32(at + 24, token::ACTIVE | PID_IN << 8 | 64 << 16);
    }
    // A periodic list whose queue head links to itself.
    for i in 0..1024 {
        r.m32(FL + 4 * i, 0x4000 | 2);
    }
    r.qh(0x4000, 9, 1, 8);
    r.m32(0x4000, 0x4000 | 2);
    r.m32(0x4000 + 8, 1);
    r.w(op::PERIODICLISTBASE, FL as u32);
    r.w(op::USBCMD, cmd::RS | cmd::ASE | cmd::PSE);
    let t = Instant::now();
    for _ in 0..20 {
        r.hc.run_frame();
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(r.r(op::FRINDEX), 160);
    assert_eq!(r.r(op::USBSTS) & sts::HALTED, 0, "still running");
    assert_ne!(r.g32(QH + 24) & token::XACT_ERR, 0);
    assert_ne!(r.g32(QH + 24) & token::ACTIVE, 0);
}

#[test]
fn errors_retire_a_qtd_after_cerr_tries() {
    let mut r = Rig::new();
    r.start();
    // Nobody at address 4: three tries (one a frame), then halted.
    r.qh(QH, 4, 1, 512);
    r.m32(QH + 16, TDS as u32);
    r.m32(TDS, 1);
    r.m32(TDS + 4, 1);
    r.m32(TDS + 8, qtd_token(PID_IN, 8, true));
    r.m32(TDS + 12, BUF as u32);
    for _ in 0..2 {
        r.hc.run_frame();
        assert_ne!(r.g32(QH + 24) & token::ACTIVE, 0);
    }
    r.hc.run_frame();
    let t = r.g32(TDS + 8);
    assert_eq!(
        t & (token::ACTIVE | token::HALTED | token::XACT_ERR | token::CERR),
        token::HALTED | token::XACT_ERR
    );
    assert_eq!(
        r.r(op::USBSTS) & (sts::ERRINT | sts::USBINT),
        sts::ERRINT | sts::USBINT
    );
    // A reserved PID halts the qTD without touching a device.
    r.qh(QH, 4, 1, 512);
    r.m32(QH + 16, TDS as u32);
    r.m32(TDS + 8, token::ACTIVE | 3 << 8);
    r.hc.run_frame();
    assert_ne!(r.g32(TDS + 8) & token::HALTED, 0);
}

#[test]
fn schedule_outside_ram_is_a_host_system_error() {
    for case in 0..5 {
        let mut r = Rig::new();
        r.hc.attach(0, storage(disk(testutil::null(MIB)))).unwrap();
        r.start();
        r.reset_port(0);
        r.qh(QH, 0, 0, 64);
        r.mem
            .write_slice(&[0x80, 6, 0, 1, 0, 0, 18, 0], GuestAddress(SETUP_BUF))
            .unwrap();
        r.m32(TDS, 1);
        r.m32(TDS + 4, 1);
        r.m32(TDS + 8, qtd_token(PID_SETUP, 8, false));
        r.m32(TDS + 12, SETUP_BUF as u32);
        r.m32(QH + 16, TDS as u32);
        match case {
            // A qTD pointer beyond RAM.
            0 => r.m32(QH + 16, 0xfff0_0000),
            // A queue head beyond RAM on the ring.
            1 => r.m32(QH, 0x8000_0002),
            // A data buffer beyond RAM.
            2 => r.m32(TDS + 12, 0x4000_0000),
            // The periodic frame list beyond RAM.
            3 => {
                r.w(op::PERIODICLISTBASE, 0x4000_0000);
                r.w(op::USBCMD, cmd::RS | cmd::ASE | cmd::PSE);
            }
            // Bus mastering off.
            _ => r.hc.config_write(COMMAND, &[0x02, 0]),
        }
        r.w(op::USBSTS, sts::CAUSES);
        r.hc.run_frame();
        let s = r.r(op::USBSTS);
        assert_eq!(
            s & (sts::HSE | sts::HALTED),
            sts::HSE | sts::HALTED,
            "case {case}"
        );
        assert_eq!(r.r(op::USBCMD) & cmd::RS, 0);
        assert!(r.irq(), "HSE enabled");
        assert_eq!(r.hc.poll(), None, "stopped");
    }
}

#[test]
fn frames_follow_the_clock() {
    let mut r = Rig::new();
    let armed = Arc::new(AtomicU64::new(0));
    let a = armed.clone();
    r.hc.set_frame_timer(Arc::new(move |t| a.store(t, Ordering::SeqCst)));
    assert_eq!(r.hc.poll(), None);
    r.clock.set(5_000_000);
    r.start();
    assert_eq!(armed.load(Ordering::SeqCst), 6_000_000);
    assert_eq!(r.hc.poll(), Some(6_000_000));
    assert_eq!(r.r(op::FRINDEX), 0);
    r.clock.set(8_500_000);
    assert_eq!(r.hc.poll(), Some(9_000_000));
    assert_eq!(r.r(op::FRINDEX), 24);
    // A second behind: bounded catch-up, FRINDEX counts every frame.
    r.clock.set(1_008_500_000);
    assert_eq!(r.hc.poll(), Some(1_009_000_000));
    assert_eq!(r.r(op::FRINDEX), (1003 * 8) & 0x3fff);
    assert_eq!(r.r(op::USBSTS) & sts::FLR, 0);
    // Past 1024 frames the frame list rolls over.
    r.clock.set(1_030_500_000);
    r.hc.poll();
    assert_ne!(r.r(op::USBSTS) & sts::FLR, 0);
    r.w(op::USBCMD, 0);
    assert_eq!(r.r(op::USBSTS) & sts::HALTED, sts::HALTED);
    assert_eq!(r.hc.poll(), None);
}
