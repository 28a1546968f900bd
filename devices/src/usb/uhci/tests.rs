//! The UHCI driven as a guest driver would: registers through the I/O
//! BAR, a frame list with queue heads and TDs in guest RAM, and a real
//! usb-storage with a real SCSI disk behind it.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestMemoryMmap};

use super::schedule::{ctrl, link, pid};
use super::*;
use crate::clock::ManualClock;
use crate::pci::config::COMMAND;
use crate::scsi::testutil::{self, TempImage};
use crate::scsi::{Disk, Lun};
use crate::usb::bot::{Cbw, Csw, CswStatus};
use crate::usb::storage::{StorageOptions, UsbStorage};
use block::backend::BackendConfig;

const MIB: u64 = 1 << 20;
const FL: u64 = 0x1000;
const QH: u64 = 0x2000;
const TDS: u64 = 0x3000;
const SETUP_BUF: u64 = 0x1_0000;
const BUF: u64 = 0x2_0000;

#[derive(Default)]
struct Line(AtomicBool);
impl IrqLine for Line {
    fn set_level(&self, l: bool) {
        self.0.store(l, Ordering::SeqCst)
    }
}

struct Rig {
    hc: Uhci,
    mem: Arc<GuestMem>,
    irq: Arc<Line>,
    clock: Arc<ManualClock>,
}

/// (PID, device address, endpoint, buffer, length)
type Xfer = (u8, u8, u8, u64, usize);

fn token(p: u8, addr: u8, ep: u8, len: usize) -> u32 {
    let max = if len == 0 { 0x7ff } else { len as u32 - 1 };
    (max << 21) | ((ep as u32) << 15) | ((addr as u32) << 8) | p as u32
}

impl Rig {
    fn new() -> Rig {
        let mem =
            Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MIB as usize)]).unwrap());
        let irq = Arc::new(Line::default());
        let clock = Arc::new(ManualClock::default());
        let mut hc = Uhci::new(mem.clone(), irq.clone(), clock.clone());
        // I/O and bus master enabled, as firmware leaves it.
        hc.config_write(COMMAND, &[0x05, 0]);
        Rig {
            hc,
            mem,
            irq,
            clock,
        }
    }

    fn r16(&mut self, off: u64) -> u16 {
        let mut b = [0u8; 2];
        self.hc.region_read(BAR_IO, off, &mut b);
        u16::from_le_bytes(b)
    }

    fn w16(&mut self, off: u64, v: u16) {
        self.hc.region_write(BAR_IO, off, &v.to_le_bytes());
    }

    fn w32(&self, addr: u64, v: u32) {
        self.mem.write_obj(v, GuestAddress(addr)).unwrap();
    }

    fn r32(&self, addr: u64) -> u32 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Every frame list entry points at one empty queue head; running.
    fn start(&mut self) {
        for i in 0..1024 {
            self.w32(FL + 4 * i, QH as u32 | link::QH);
        }
        self.w32(QH, link::TERMINATE);
        self.w32(QH + 4, link::TERMINATE);
        self.hc
            .region_write(BAR_IO, reg::FLBASEADD, &(FL as u32).to_le_bytes());
        self.w16(reg::USBINTR, intr::IOC | intr::TIMEOUT_CRC | intr::SPD);
        self.w16(reg::USBCMD, cmd::RS | cmd::CF | cmd::MAXP);
    }

    /// Port reset and enable, as SeaBIOS does it.
    fn enable_port(&mut self, i: u64) {
        let at = reg::PORTSC1 + 2 * i;
        self.w16(at, port::PR);
        self.w16(at, 0);
        self.w16(at, port::PE | port::CSC);
    }

    fn storage(&mut self, i: usize, unit: Arc<dyn Lun>) {
        let dev = UsbStorage::new(StorageOptions::default());
        dev.attach(0, unit).unwrap();
        self.hc.attach(i, Box::new(dev)).unwrap();
    }

    /// Queues `xfers` as one depth-first TD chain under the queue head
    /// and runs frames until the queue is empty or a TD stops; returns
    /// each TD's control/status word.
    fn run(&mut self, xfers: &[Xfer]) -> Vec<u32> {
        for (i, &(p, addr, ep, buf, len)) in xfers.iter().enumerate() {
            let at = TDS + 32 * i as u64;
            let next = if i + 1 == xfers.len() {
                link::TERMINATE
            } else {
                (at + 32) as u32 | link::DEPTH
            };
            self.w32(at, next);
            self.w32(at + 4, ctrl::ACTIVE | (3 << ctrl::C_ERR_SHIFT));
            self.w32(at + 8, token(p, addr, ep, len));
            self.w32(at + 12, buf as u32);
        }
        self.w32(QH + 4, TDS as u32);
        let deadline = Instant::now() + Duration::from_secs(20);
        let ctrls = |r: &Rig| -> Vec<u32> {
            (0..xfers.len())
                .map(|i| r.r32(TDS + 32 * i as u64 + 4))
                .collect()
        };
        loop {
            self.hc.run_frame();
            let c = ctrls(self);
            let stopped = c
                .iter()
                .any(|&x| x & ctrl::ACTIVE == 0 && x & ctrl::STALLED != 0);
            if self.r32(QH + 4) & link::TERMINATE != 0 || stopped {
                return c;
            }
            assert!(Instant::now() < deadline, "the transfer never finished");
            if c.iter().any(|&x| x & ctrl::NAK != 0) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// A control transfer to `addr` with 8-byte packets: SETUP, data
    /// stage, status; returns the IN data.
    fn control(&mut self, addr: u8, setup: [u8; 8]) -> Result<Vec<u8>, u32> {
        self.mem
            .write_slice(&setup, GuestAddress(SETUP_BUF))
            .unwrap();
        let len = u16::from_le_bytes([setup[6], setup[7]]) as usize;
        let input = setup[0] & 0x80 != 0;
        let mut x = vec![(pid::SETUP, addr, 0, SETUP_BUF, 8)];
        for off in (0..len).step_by(8) {
            let p = if input { pid::IN } else { pid::OUT };
            x.push((p, addr, 0, BUF + off as u64, (len - off).min(8)));
        }
        let status = if input && len > 0 { pid::OUT } else { pid::IN };
        x.push((status, addr, 0, 0, 0));
        let c = self.run(&x);
        if let Some(bad) = c.iter().find(|&&v| v & ctrl::STALLED != 0) {
            return Err(*bad);
        }
        // What each data TD received (ActLen + 1).
        let mut out = Vec::new();
        for (i, &(_, _, _, buf, _)) in x.iter().enumerate().skip(1).take(x.len() - 2) {
            let n = ((c[i] & ctrl::ACTLEN) + 1) as usize & 0x7ff;
            let mut b = vec![0u8; n];
            self.mem.read_slice(&mut b, GuestAddress(buf)).unwrap();
            out.extend(b);
        }
        Ok(out)
    }

    /// A bulk transfer in 64-byte TDs at `buf`.
    fn bulk(&mut self, addr: u8, p: u8, ep: u8, buf: u64, len: usize) -> Vec<u32> {
        let x: Vec<Xfer> = (0..len)
            .step_by(64)
            .map(|off| (p, addr, ep, buf + off as u64, (len - off).min(64)))
            .collect();
        self.run(&x)
    }

    /// A BOT command: CBW at BUF, data at BUF + 0x1000, CSW at BUF + 0x100.
    fn bot(&mut self, addr: u8, cbw: Cbw) -> Csw {
        self.mem
            .write_slice(&cbw.to_bytes(), GuestAddress(BUF))
            .unwrap();
        let c = self.bulk(addr, pid::OUT, 2, BUF, 31);
        assert_eq!(c[0] & (ctrl::ACTIVE | ctrl::STALLED), 0);
        if cbw.data_len > 0 {
            let p = if cbw.dir == Dir::In {
                pid::IN
            } else {
                pid::OUT
            };
            let ep = if cbw.dir == Dir::In { 1 } else { 2 };
            let c = self.bulk(addr, p, ep, BUF + 0x1000, cbw.data_len as usize);
            assert!(c.iter().all(|&v| v & (ctrl::ACTIVE | ctrl::STALLED) == 0));
        }
        let c = self.bulk(addr, pid::IN, 1, BUF + 0x100, 13);
        assert_eq!(c[0] & ctrl::ACTLEN, 12);
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

fn disk(b: Arc<block::backend::BlockBackend>) -> Arc<dyn Lun> {
    Arc::new(Disk::new(b, Default::default()).unwrap())
}

#[test]
fn pci_identity_and_reset_values() {
    let mut r = Rig::new();
    let cfg = |r: &mut Rig, off: u16, n: usize| {
        let mut b = [0u8; 4];
        r.hc.config_read(off, &mut b[..n]);
        u32::from_le_bytes(b)
    };
    assert_eq!(cfg(&mut r, 0, 4), 0x7020_8086);
    assert_eq!(cfg(&mut r, 8, 4) >> 8, 0x0c_03_00);
    assert_eq!(cfg(&mut r, 0x3d, 1), 4, "INTD#");
    assert_eq!(cfg(&mut r, 0x60, 1), 0x10);
    assert_eq!(cfg(&mut r, 0xc0, 2), 0x2000);
    r.hc.config_write(0xc0, &0x8f00u16.to_le_bytes());
    assert_eq!(cfg(&mut r, 0xc0, 2), 0, "SeaBIOS clears PIRQDEN");
    r.hc.config_write(0xc0, &0x2000u16.to_le_bytes());
    assert_eq!(cfg(&mut r, 0xc0, 2), 0x2000);
    // BAR4: 32 bytes of I/O.
    r.hc.config_write(0x20, &u32::MAX.to_le_bytes());
    assert_eq!(cfg(&mut r, 0x20, 4), 0xffff_ffe1);

    assert_eq!(r.r16(reg::USBCMD), 0);
    assert_eq!(r.r16(reg::USBSTS), sts::HCH);
    assert_eq!(r.r16(reg::SOFMOD) & 0xff, 64);
    assert_eq!(r.r16(reg::PORTSC1), port::ALWAYS, "no device: bit 7 only");
    // A dword read of USBCMD/USBSTS, byte access to SOFMOD.
    let mut d = [0u8; 4];
    r.hc.region_read(BAR_IO, 0, &mut d);
    assert_eq!(u32::from_le_bytes(d), (sts::HCH as u32) << 16);
    r.hc.region_write(BAR_IO, reg::SOFMOD, &[0x30]);
    assert_eq!(r.r16(reg::SOFMOD), 0x30);
    // FLBASEADD keeps 4 KiB alignment; FRNUM is writable while halted.
    r.hc.region_write(BAR_IO, reg::FLBASEADD, &0x1234_5678u32.to_le_bytes());
    r.hc.region_read(BAR_IO, reg::FLBASEADD, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x1234_5000);
    r.w16(reg::FRNUM, 0xffff);
    assert_eq!(r.r16(reg::FRNUM), 0x7ff);
    r.w16(reg::USBCMD, cmd::HCRESET);
    assert_eq!((r.r16(reg::USBCMD), r.r16(reg::FRNUM)), (0, 0));
    assert_eq!(r.r16(reg::SOFMOD), 64);
}

#[test]
fn ports_connect_reset_enable_and_detach() {
    let mut r = Rig::new();
    // PE cannot be set without a device.
    r.w16(reg::PORTSC1, port::PE);
    assert_eq!(r.r16(reg::PORTSC1) & port::PE, 0);
    r.storage(0, disk(testutil::null(MIB)));
    assert!(r
        .hc
        .attach(0, Box::new(UsbStorage::new(StorageOptions::default())))
        .is_err());
    assert!(r
        .hc
        .attach(2, Box::new(UsbStorage::new(StorageOptions::default())))
        .is_err());
    let s = r.r16(reg::PORTSC1);
    assert_eq!(
        s & (port::CCS | port::CSC | port::LSDA),
        port::CCS | port::CSC,
        "full speed"
    );
    assert_eq!(r.r16(reg::PORTSC1 + 2) & port::CCS, 0);
    r.enable_port(0);
    let s = r.r16(reg::PORTSC1);
    assert_eq!(
        s & (port::CSC | port::PE | port::PR),
        port::PE,
        "CSC cleared, enabled"
    );
    // Detach: disconnect and enable changes, disabled.
    assert!(r.hc.detach(0).is_some());
    assert!(r.hc.detach(0).is_none());
    let s = r.r16(reg::PORTSC1);
    assert_eq!(s & 0xf, port::CSC | port::PEC);
    r.w16(reg::PORTSC1, port::CSC | port::PEC);
    assert_eq!(r.r16(reg::PORTSC1), port::ALWAYS);
}

#[test]
fn enumeration_through_a_frame_list() {
    let mut r = Rig::new();
    r.storage(1, disk(testutil::null(MIB)));
    r.start();
    r.enable_port(1);
    let dev = r.control(0, [0x80, 6, 0, 1, 0, 0, 18, 0]).unwrap();
    assert_eq!(dev.len(), 18);
    assert_eq!((dev[7], &dev[8..12]), (8, &[0xf4, 0x46, 1, 0][..]));
    r.control(0, [0, 5, 5, 0, 0, 0, 0, 0]).unwrap();
    // The old address is gone: no handshake, three tries, then retired.
    let c = r.run(&[(pid::SETUP, 0, 0, SETUP_BUF, 8)]);
    assert_eq!(
        c[0] & (ctrl::ACTIVE | ctrl::STALLED | ctrl::CRC_TIMEOUT),
        ctrl::STALLED | ctrl::CRC_TIMEOUT
    );
    r.w32(QH + 4, link::TERMINATE);
    let cfg = r.control(5, [0x80, 6, 0, 2, 0, 0, 32, 0]).unwrap();
    assert_eq!(cfg.len(), 32);
    r.control(5, [0, 9, 1, 0, 0, 0, 0, 0]).unwrap();
    assert_eq!(r.control(5, [0x80, 8, 0, 0, 0, 0, 1, 0]).unwrap(), vec![1]);
    // GET MAX LUN.
    assert_eq!(
        r.control(5, [0xa1, 0xfe, 0, 0, 0, 0, 1, 0]).unwrap(),
        vec![0]
    );
    // An unknown descriptor STALLs the data stage: USB error interrupt.
    r.w16(reg::USBSTS, 0x3f);
    assert!(!r.irq());
    let bad = r.control(5, [0x80, 6, 0, 0x42, 0, 0, 8, 0]).unwrap_err();
    assert_eq!(bad & (ctrl::ACTIVE | ctrl::STALLED), ctrl::STALLED);
    assert_ne!(r.r16(reg::USBSTS) & sts::ERROR, 0);
    assert!(r.irq());
    r.w16(reg::USBSTS, sts::ERROR);
    assert!(!r.irq());
    assert_ne!(r.r16(reg::FRNUM), 0, "frames counted");
}

#[test]
fn interrupt_on_complete() {
    let mut r = Rig::new();
    r.storage(0, disk(testutil::null(MIB)));
    r.start();
    r.enable_port(0);
    r.mem
        .write_slice(&[0x80, 6, 0, 1, 0, 0, 8, 0], GuestAddress(SETUP_BUF))
        .unwrap();
    r.w32(TDS, link::TERMINATE);
    r.w32(TDS + 4, ctrl::ACTIVE | ctrl::IOC);
    r.w32(TDS + 8, token(pid::SETUP, 0, 0, 8));
    r.w32(TDS + 12, SETUP_BUF as u32);
    r.w32(QH + 4, TDS as u32);
    r.hc.run_frame();
    assert_eq!(r.r32(TDS + 4) & (ctrl::ACTIVE | ctrl::ACTLEN), 7);
    assert_eq!(r.r32(QH + 4), link::TERMINATE, "the queue advanced");
    assert_eq!(r.r16(reg::USBSTS) & sts::USBINT, sts::USBINT);
    assert!(r.irq());
    r.w16(reg::USBSTS, sts::USBINT);
    assert!(!r.irq());
    // With IOC masked, USBINT is set but the line stays low.
    r.w16(reg::USBINTR, 0);
    r.w32(TDS + 4, ctrl::ACTIVE | ctrl::IOC);
    r.w32(QH + 4, TDS as u32);
    r.hc.run_frame();
    assert_eq!(r.r16(reg::USBSTS) & sts::USBINT, sts::USBINT);
    assert!(!r.irq());
}

#[test]
fn bot_write_and_read_through_uhci() {
    let img = TempImage::new(MIB);
    let b = img.backend(BackendConfig::default());
    let mut r = Rig::new();
    r.storage(0, disk(b.clone()));
    r.start();
    r.enable_port(0);
    r.control(0, [0, 5, 1, 0, 0, 0, 0, 0]).unwrap();
    r.control(1, [0, 9, 1, 0, 0, 0, 0, 0]).unwrap();
    let tur = Cbw::new(1, 0, Dir::Out, 0, &[0; 6]);
    assert_eq!(r.bot(1, tur).status, CswStatus::Failed, "UNIT ATTENTION");
    let inq = r.bot(1, Cbw::new(2, 36, Dir::In, 0, &[0x12, 0, 0, 0, 36, 0]));
    assert_eq!((inq.tag, inq.status), (2, CswStatus::Passed));
    let mut v = [0u8; 36];
    r.mem
        .read_slice(&mut v, GuestAddress(BUF + 0x1000))
        .unwrap();
    assert_eq!(&v[16..32], b"QEMU HARDDISK   ");
    // WRITE(10) of 4 blocks from guest memory.
    let data: Vec<u8> = (0..2048u32).map(|i| (i * 13 % 251) as u8).collect();
    r.mem
        .write_slice(&data, GuestAddress(BUF + 0x1000))
        .unwrap();
    let w = testutil::cdb10(0x2a, 0, 40, 4);
    let csw = r.bot(1, Cbw::new(3, 2048, Dir::Out, 0, &w[..10]));
    assert_eq!((csw.status, csw.residue), (CswStatus::Passed, 0));
    let mut disk = vec![0u8; 2048];
    b.read_at(40 * 512, &mut disk).unwrap();
    assert!(disk == data);
    // READ(10) back into cleared guest memory.
    r.mem
        .write_slice(&[0u8; 2048], GuestAddress(BUF + 0x1000))
        .unwrap();
    let rd = testutil::cdb10(0x28, 0, 40, 4);
    let csw = r.bot(1, Cbw::new(4, 2048, Dir::In, 0, &rd[..10]));
    assert_eq!((csw.status, csw.residue), (CswStatus::Passed, 0));
    let mut back = vec![0u8; 2048];
    r.mem
        .read_slice(&mut back, GuestAddress(BUF + 0x1000))
        .unwrap();
    assert!(back == data);
}

#[test]
fn bot_reads_nak_across_frames_on_an_async_backend() {
    let b = testutil::backend("driver=null-aio,size=1048576", BackendConfig::default());
    let mut r = Rig::new();
    r.storage(0, disk(b));
    r.start();
    r.enable_port(0);
    r.control(0, [0, 5, 1, 0, 0, 0, 0, 0]).unwrap();
    r.control(1, [0, 9, 1, 0, 0, 0, 0, 0]).unwrap();
    r.bot(1, Cbw::new(1, 0, Dir::Out, 0, &[0; 6]));
    let rd = testutil::cdb10(0x28, 0, 0, 8);
    let csw = r.bot(1, Cbw::new(2, 4096, Dir::In, 0, &rd[..10]));
    assert_eq!(csw.status, CswStatus::Passed);
}

#[test]
fn looping_schedules_end_the_frame() {
    let mut r = Rig::new();
    r.start();
    // Two TDs linked to each other, both active, to nobody (C_ERR 0:
    // retried for ever); a queue head whose head links to itself.
    r.w32(TDS, (TDS + 32) as u32 | link::DEPTH);
    r.w32(TDS + 4, ctrl::ACTIVE);
    r.w32(TDS + 8, token(pid::IN, 9, 1, 8));
    r.w32(TDS + 32, TDS as u32 | link::DEPTH);
    r.w32(TDS + 36, ctrl::ACTIVE);
    r.w32(TDS + 40, token(pid::IN, 9, 1, 8));
    for i in 0..1024 {
        r.w32(FL + 4 * i, TDS as u32);
    }
    let t = Instant::now();
    for _ in 0..10 {
        r.hc.run_frame();
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(r.r16(reg::FRNUM), 10);
    assert_eq!(r.r16(reg::USBSTS) & sts::HCH, 0, "still running");
    for i in 0..1024 {
        r.w32(FL + 4 * i, QH as u32 | link::QH);
    }
    r.w32(QH, QH as u32 | link::QH);
    r.w32(QH + 4, TDS as u32);
    r.hc.run_frame();
    assert_eq!(r.r16(reg::FRNUM), 11);
    // Inactive TDs in a ring, not queued.
    r.w32(TDS + 4, 0);
    r.w32(TDS + 36, 0);
    for i in 0..1024 {
        r.w32(FL + 4 * i, TDS as u32);
    }
    r.hc.run_frame();
    assert_eq!(r.r16(reg::FRNUM), 12);
}

#[test]
fn schedule_outside_ram_is_a_host_system_error() {
    for case in 0..4 {
        let mut r = Rig::new();
        r.storage(0, disk(testutil::null(MIB)));
        r.start();
        r.enable_port(0);
        r.w16(reg::USBSTS, 0x3f);
        match case {
            // A TD pointer beyond RAM.
            0 => r.w32(QH + 4, 0xfff0_0000),
            // A queue head beyond RAM.
            1 => r.w32(QH, 0x8000_0002),
            // A data buffer beyond RAM.
            2 => {
                r.w32(TDS, link::TERMINATE);
                r.w32(TDS + 4, ctrl::ACTIVE);
                r.w32(TDS + 8, token(pid::SETUP, 0, 0, 8));
                r.w32(TDS + 12, (MIB - 4) as u32);
                r.w32(QH + 4, TDS as u32);
            }
            // The frame list beyond RAM.
            _ => {
                r.hc.region_write(BAR_IO, reg::FLBASEADD, &0x4000_0000u32.to_le_bytes())
            }
        }
        r.hc.run_frame();
        let s = r.r16(reg::USBSTS);
        assert_eq!(
            s & (sts::HSE | sts::HCH),
            sts::HSE | sts::HCH,
            "case {case}"
        );
        assert_eq!(r.r16(reg::USBCMD) & cmd::RS, 0);
        assert!(r.irq(), "HSE interrupts unmasked");
        assert_eq!(r.hc.poll(), None, "stopped");
    }
    // An invalid MaxLen is an HC process error.
    let mut r = Rig::new();
    r.start();
    r.w32(TDS, link::TERMINATE);
    r.w32(TDS + 4, ctrl::ACTIVE);
    r.w32(TDS + 8, (0x500 << 21) | pid::OUT as u32);
    r.w32(QH + 4, TDS as u32);
    r.hc.run_frame();
    assert_eq!(
        r.r16(reg::USBSTS) & (sts::HCPE | sts::HCH),
        sts::HCPE | sts::HCH
    );
    // Without bus mastering, nothing is fetched.
    let mut r = Rig::new();
    r.hc.config_write(COMMAND, &[0x01, 0]);
    r.start();
    r.hc.run_frame();
    assert_ne!(r.r16(reg::USBSTS) & sts::HSE, 0);
}

#[test]
fn error_counter_retires_a_td() {
    let mut r = Rig::new();
    r.start();
    // Nobody at address 3: three tries, then stalled with CRC/timeout.
    r.w32(TDS, link::TERMINATE);
    r.w32(TDS + 4, ctrl::ACTIVE | (3 << ctrl::C_ERR_SHIFT));
    r.w32(TDS + 8, token(pid::IN, 3, 1, 8));
    r.w32(QH + 4, TDS as u32);
    for _ in 0..2 {
        r.hc.run_frame();
        assert_ne!(r.r32(TDS + 4) & ctrl::ACTIVE, 0);
    }
    r.hc.run_frame();
    let c = r.r32(TDS + 4);
    assert_eq!(
        c & (ctrl::ACTIVE | ctrl::STALLED | ctrl::CRC_TIMEOUT),
        ctrl::STALLED | ctrl::CRC_TIMEOUT
    );
    assert_eq!(c & ctrl::C_ERR, 0);
    assert_ne!(r.r16(reg::USBSTS) & sts::ERROR, 0);
    assert_eq!(
        r.r32(QH + 4),
        TDS as u32,
        "the queue stays on the failed TD"
    );
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
    assert_eq!(r.hc.poll(), Some(6_000_000), "not due yet");
    assert_eq!(r.r16(reg::FRNUM), 0);
    r.clock.set(8_500_000);
    assert_eq!(r.hc.poll(), Some(9_000_000));
    assert_eq!(r.r16(reg::FRNUM), 3);
    // A second behind: a bounded catch-up, FRNUM still counts every frame.
    r.clock.set(1_008_500_000);
    assert_eq!(r.hc.poll(), Some(1_009_000_000));
    assert_eq!(r.r16(reg::FRNUM), (1003 & 0x7ff) as u16);
    r.w16(reg::USBCMD, 0);
    assert_eq!(r.r16(reg::USBSTS) & sts::HCH, sts::HCH);
    assert_eq!(r.hc.poll(), None);
}
