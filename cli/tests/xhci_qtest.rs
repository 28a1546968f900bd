//! `-device qemu-xhci` with `usb-storage` through the qtest protocol: the
//! test is the xHCI driver. It finds the controller on the PCI bus,
//! programs its 64-bit BAR, resets and runs it, and then does what a
//! guest driver does in guest RAM: a DCBAA, a command ring, one event
//! ring segment through the ERST, input contexts for Enable Slot,
//! Address Device and Configure Endpoint, and a transfer ring per
//! endpoint rung through the doorbells. Over those rings it moves
//! control requests and Bulk-Only Transport commands, checked against
//! the raw image file on the host.
//!
//! Interrupts stay off (MSI-X disabled, USBCMD.INTE clear): the test
//! polls the event ring by its cycle bit. A device that NAKs while its
//! block I/O is in flight wakes the controller through a device timer
//! armed for "now", which under qtest fires on the next `clock_step`;
//! so every wait steps the clock and sleeps a little.
//!
//! Which root ports are USB 3 comes from the Supported Protocol
//! capabilities, as drivers find out: a SuperSpeed `usb-storage` at
//! `port=N` shows on the Nth USB 3 port, wherever the controller numbers
//! those.
//!
//! `usb-uas` runs on streams as Linux's `uas` driver runs it: the status
//! and data pipes configured with linear Primary Stream Context Arrays,
//! each command's status and data TDs on the stream of its tag, posted
//! before its COMMAND IU, the doorbell naming the stream.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use support::qtest::Qtest;

/// Where the test maps BAR0 (16 KiB), in the PCI hole below the IOAPIC.
const BAR: u64 = 0xfe00_0000;
const OPER: u64 = BAR + 0x40;
const USBCMD: u64 = OPER;
const USBSTS: u64 = OPER + 0x04;
const CRCR_LO: u64 = OPER + 0x18;
const CRCR_HI: u64 = OPER + 0x1c;
const DCBAAP_LO: u64 = OPER + 0x30;
const DCBAAP_HI: u64 = OPER + 0x34;
const CONFIG: u64 = OPER + 0x38;
const PORTSC1: u64 = OPER + 0x400;
/// Interrupter 0's register set in the runtime registers.
const IR0: u64 = BAR + 0x1000 + 0x20;
const ERSTSZ: u64 = IR0 + 0x08;
const ERSTBA_LO: u64 = IR0 + 0x10;
const ERSTBA_HI: u64 = IR0 + 0x14;
const ERDP_LO: u64 = IR0 + 0x18;
const ERDP_HI: u64 = IR0 + 0x1c;
const DOORBELL: u64 = BAR + 0x2000;

const CMD_RS: u32 = 1 << 0;
const CMD_HCRST: u32 = 1 << 1;
const STS_HCH: u32 = 1 << 0;
const STS_PCD: u32 = 1 << 4;
const STS_CNR: u32 = 1 << 11;

const PORT_CCS: u32 = 1 << 0;
const PORT_PED: u32 = 1 << 1;
const PORT_PR: u32 = 1 << 4;
const PORT_PP: u32 = 1 << 9;
const PORT_CSC: u32 = 1 << 17;
const PORT_PRC: u32 = 1 << 21;
const SPEED_SUPER: u32 = 4;

/// Guest RAM layout (the machine has 128 MiB).
const DCBAA: u64 = 0x10_0000;
const CMD_RING: u64 = 0x10_1000;
const ERST: u64 = 0x10_2000;
const EV_RING: u64 = 0x10_3000;
const EV_TRBS: u64 = 64;
const IN_CTX: u64 = 0x10_8000;
/// Output device contexts, 0x800 apart by slot id.
const OUT_CTX: u64 = 0x11_0000;
/// Transfer rings, 4 KiB (256 TRBs) each by slot and DCI: no test
/// queues enough TRBs to need a Link TRB.
const RINGS: u64 = 0x20_0000;
const CBW_BUF: u64 = 0x30_0000;
const CSW_BUF: u64 = 0x30_1000;
const CTRL_BUF: u64 = 0x30_2000;
const BUF: u64 = 0x40_0000;
const BUF2: u64 = 0x50_0000;
const RAM_END: u64 = 128 << 20;

// TRB types (xHCI 6.4.6).
const TY_NORMAL: u8 = 1;
const TY_SETUP: u8 = 2;
const TY_DATA: u8 = 3;
const TY_STATUS: u8 = 4;
const TY_ENABLE_SLOT: u8 = 9;
const TY_ADDRESS_DEVICE: u8 = 11;
const TY_CONFIGURE_EP: u8 = 12;
const TY_RESET_EP: u8 = 14;
const TY_STOP_EP: u8 = 15;
const TY_SET_TR_DEQUEUE: u8 = 16;
const TY_NOOP_CMD: u8 = 23;
const TY_TRANSFER: u8 = 32;
const TY_COMMAND_COMPLETION: u8 = 33;
const TY_PORT_STATUS_CHANGE: u8 = 34;

// TRB control bits.
const ISP: u32 = 1 << 2;
const CH: u32 = 1 << 4;
const IOC: u32 = 1 << 5;
const IDT: u32 = 1 << 6;
const DIR_IN: u32 = 1 << 16;

// Completion codes (6.4.5).
const CC_SUCCESS: u32 = 1;
const CC_TRB: u32 = 5;
const CC_STALL: u32 = 6;
const CC_SHORT_PACKET: u32 = 13;
const CC_CONTEXT_STATE: u32 = 19;

// Endpoint states in the endpoint context.
const EP_RUNNING: u32 = 1;
const EP_HALTED: u32 = 2;
const EP_STOPPED: u32 = 3;

/// usb-storage's bulk endpoints: EP 1 IN and EP 2 OUT.
const DCI_IN: u8 = 3;
const DCI_OUT: u8 = 4;

/// A TRB as it sits in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Trb {
    param: u64,
    status: u32,
    control: u32,
}

impl Trb {
    fn new(param: u64, status: u32, ty: u8, bits: u32) -> Trb {
        Trb {
            param,
            status,
            control: (ty as u32) << 10 | bits,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = self.param.to_le_bytes().to_vec();
        b.extend_from_slice(&self.status.to_le_bytes());
        b.extend_from_slice(&self.control.to_le_bytes());
        b
    }

    fn parse(b: &[u8]) -> Trb {
        Trb {
            param: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            status: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            control: u32::from_le_bytes(b[12..16].try_into().unwrap()),
        }
    }

    fn ty(&self) -> u8 {
        (self.control >> 10 & 0x3f) as u8
    }

    fn cycle(&self) -> bool {
        self.control & 1 != 0
    }

    fn cc(&self) -> u32 {
        self.status >> 24
    }

    fn slot(&self) -> u8 {
        (self.control >> 24) as u8
    }

    /// A Transfer Event's endpoint.
    fn dci(&self) -> u8 {
        (self.control >> 16 & 0x1f) as u8
    }

    /// A Transfer Event's residual length.
    fn residual(&self) -> u32 {
        self.status & 0xff_ffff
    }
}

fn ring_base(slot: u8, dci: u8) -> u64 {
    RINGS + (slot as u64 * 32 + dci as u64) * 0x1000
}

fn out_ctx(slot: u8) -> u64 {
    OUT_CTX + slot as u64 * 0x800
}

/// An input context (control context, slot context, 31 endpoint
/// contexts: 0x420 bytes) with the given dwords set.
fn input_ctx(dwords: &[(u64, u32)]) -> Vec<u8> {
    let mut b = vec![0u8; 0x420];
    for &(at, v) in dwords {
        b[at as usize..at as usize + 4].copy_from_slice(&v.to_le_bytes());
    }
    b
}

/// A Bulk-Only Command Block Wrapper.
fn cbw(tag: u32, len: u32, dir_in: bool, cdb: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 31];
    b[0..4].copy_from_slice(&0x4342_5355u32.to_le_bytes());
    b[4..8].copy_from_slice(&tag.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12] = if dir_in { 0x80 } else { 0 };
    b[14] = cdb.len() as u8;
    b[15..15 + cdb.len()].copy_from_slice(cdb);
    b
}

fn cdb10(op: u8, lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![op, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&blocks.to_be_bytes());
    c.push(0);
    c
}

struct Xhc {
    qt: Qtest,
    /// The controller's PCI slot.
    dev: u8,
    /// The port numbers of the USB 2 and USB 3 root ports, from the
    /// Supported Protocol capabilities.
    usb2: std::ops::RangeInclusive<u8>,
    usb3: std::ops::RangeInclusive<u8>,
    /// Command ring enqueue pointer and producer cycle state.
    cmd: (u64, bool),
    /// Event ring dequeue pointer and consumer cycle state.
    ev: (u64, bool),
    /// Transfer ring enqueue pointers by (slot, dci).
    rings: BTreeMap<(u8, u8), (u64, bool)>,
    /// Events read while waiting for another kind.
    stash: Vec<Trb>,
}

impl Xhc {
    /// Starts strata with `-device qemu-xhci,id=xhci` and `extra`, finds
    /// the controller by its PCI id and maps BAR0 with memory decoding
    /// and bus mastering on.
    fn start(extra: &[&str]) -> Xhc {
        let mut args = vec!["-m", "128M", "-device", "qemu-xhci,id=xhci"];
        args.extend_from_slice(extra);
        let mut qt = Qtest::start(&args);
        let dev = (0..32u8)
            .find(|&d| qt.pci_read32(d, 0, 0) == 0x000d_1b36)
            .expect("qemu-xhci (1b36:000d) on the PCI bus");
        assert_eq!(qt.pci_read32(dev, 0, 8) >> 8, 0x0c_0330, "class: xHCI");
        // BAR0: 64-bit memory, 16 KiB (the size probe reads back the
        // address bits the BAR decodes).
        assert_eq!(qt.pci_read32(dev, 0, 0x10) & 0x7, 0x4, "64-bit memory BAR");
        qt.pci_write32(dev, 0, 0x10, 0xffff_ffff);
        assert_eq!(qt.pci_read32(dev, 0, 0x10) & !0xf, !(0x4000 - 1), "16 KiB");
        qt.pci_write32(dev, 0, 0x10, BAR as u32);
        qt.pci_write32(dev, 0, 0x14, (BAR >> 32) as u32);
        qt.pci_write32(dev, 0, 0x04, 0x06);
        // CAPLENGTH 40h, HCIVERSION 1.0; 4 USB 2 + 4 USB 3 ports.
        assert_eq!(qt.readl(BAR), 0x0100_0040);
        assert_eq!(qt.readl(BAR + 4) >> 24, 8, "HCSPARAMS1.MaxPorts");
        let (usb2, usb3) = protocol_ports(&mut qt);
        assert_eq!((usb2.len(), usb3.len()), (4, 4), "p2=4, p3=4");
        assert!(
            usb2.end() < usb3.start() || usb3.end() < usb2.start(),
            "the ranges do not overlap: {usb2:?} {usb3:?}"
        );
        assert_eq!(*usb2.end().max(usb3.end()), 8, "ports 1-8 in all");
        Xhc {
            qt,
            dev,
            usb2,
            usb3,
            cmd: (CMD_RING, true),
            ev: (EV_RING, true),
            rings: BTreeMap::new(),
            stash: Vec::new(),
        }
    }

    /// The USB 3 root port of connector `n` (`port=n`): where a
    /// SuperSpeed device plugged there shows.
    fn ss_port(&self, n: u8) -> u8 {
        self.usb3.start() + n - 1
    }

    /// The USB 2 root port of connector `n`.
    fn hs_port(&self, n: u8) -> u8 {
        self.usb2.start() + n - 1
    }

    fn r32(&mut self, at: u64) -> u32 {
        self.qt.readl(at)
    }

    fn w32(&mut self, at: u64, v: u32) {
        self.qt.writel(at, v)
    }

    fn portsc_at(port: u8) -> u64 {
        PORTSC1 + (port as u64 - 1) * 0x10
    }

    fn portsc(&mut self, port: u8) -> u32 {
        self.r32(Self::portsc_at(port))
    }

    fn set_portsc(&mut self, port: u8, v: u32) {
        self.w32(Self::portsc_at(port), v)
    }

    /// What a driver does to bring the controller up: HCRST, slots,
    /// DCBAA, command ring, one event ring segment, run. Interrupts stay
    /// off; the test polls.
    fn reset_and_run(&mut self) {
        self.w32(USBCMD, CMD_HCRST);
        assert_eq!(self.r32(USBCMD) & CMD_HCRST, 0, "HCRST self-clears");
        let sts = self.r32(USBSTS);
        assert_eq!(sts & (STS_CNR | STS_HCH), STS_HCH, "ready, halted: {sts:x}");
        // Fresh rings: zeroed, so no stale cycle bit reads as ours.
        self.qt.memwrite(CMD_RING, &[0; 0x1000]);
        self.qt.memwrite(EV_RING, &[0; EV_TRBS as usize * 16]);
        self.qt.memwrite(DCBAA, &[0; 0x800]);
        self.w32(CONFIG, 8);
        self.w32(DCBAAP_LO, DCBAA as u32);
        self.w32(DCBAAP_HI, 0);
        self.w32(CRCR_LO, CMD_RING as u32 | 1);
        self.w32(CRCR_HI, 0);
        // The ERST's one entry: segment base and size.
        self.qt.writeq(ERST, EV_RING);
        self.w32(ERST + 8, EV_TRBS as u32);
        self.w32(ERST + 12, 0);
        self.w32(ERSTSZ, 1);
        self.w32(ERDP_LO, EV_RING as u32);
        self.w32(ERDP_HI, 0);
        // ERSTBA last: writing it is what takes the ring into use.
        self.w32(ERSTBA_LO, ERST as u32);
        self.w32(ERSTBA_HI, 0);
        self.w32(USBCMD, CMD_RS);
        assert_eq!(self.r32(USBSTS) & STS_HCH, 0, "running");
        self.cmd = (CMD_RING, true);
        self.ev = (EV_RING, true);
        self.rings.clear();
        self.stash.clear();
    }

    /// The next event the controller posted, ERDP moved past it (EHB
    /// written back as a driver does).
    fn event(&mut self) -> Option<Trb> {
        let t = Trb::parse(&self.qt.memread(self.ev.0, 16));
        if t.cycle() != self.ev.1 {
            return None;
        }
        self.ev.0 += 16;
        if self.ev.0 == EV_RING + EV_TRBS * 16 {
            self.ev = (EV_RING, !self.ev.1);
        }
        self.w32(ERDP_LO, self.ev.0 as u32 | 1 << 3);
        self.w32(ERDP_HI, 0);
        Some(t)
    }

    /// Lets device timers run (a NAKed endpoint's wakeup) and asserts
    /// that no event came.
    fn assert_no_event(&mut self, why: &str) {
        for _ in 0..3 {
            self.qt.clock_step(1_000_000);
            std::thread::sleep(Duration::from_millis(2));
        }
        let e = self.event();
        assert!(e.is_none(), "{why}: unexpected event {e:x?}");
    }

    /// Waits for an event of type `want`, stepping the clock so that a
    /// woken endpoint runs again (its wakeup is a timer armed for now).
    fn wait(&mut self, want: u8) -> Trb {
        if let Some(i) = self.stash.iter().position(|t| t.ty() == want) {
            return self.stash.remove(i);
        }
        let start = Instant::now();
        loop {
            while let Some(t) = self.event() {
                if t.ty() == want {
                    return t;
                }
                self.stash.push(t);
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no event of type {want}; others: {:x?}",
                self.stash
            );
            self.qt.clock_step(1_000_000);
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Runs a command; returns its Command Completion Event.
    fn command(&mut self, t: Trb) -> Trb {
        let mut t = t;
        t.control |= self.cmd.1 as u32;
        let at = self.cmd.0;
        self.qt.memwrite(at, &t.bytes());
        self.cmd.0 += 16;
        self.w32(DOORBELL, 0);
        let e = self.wait(TY_COMMAND_COMPLETION);
        assert_eq!(e.param, at, "the completion names the command");
        e
    }

    /// Queues TRBs on a transfer ring (no doorbell); returns where they
    /// went.
    fn queue(&mut self, slot: u8, dci: u8, trbs: &[Trb]) -> Vec<u64> {
        let (mut at, cycle) = *self
            .rings
            .entry((slot, dci))
            .or_insert((ring_base(slot, dci), true));
        let mut addrs = Vec::new();
        for t in trbs {
            let mut t = *t;
            t.control |= cycle as u32;
            self.qt.memwrite(at, &t.bytes());
            addrs.push(at);
            at += 16;
        }
        // No Link TRBs: the ring must not run into its neighbour.
        assert!(
            at <= ring_base(slot, dci) + 0x1000,
            "ring {slot}.{dci} full"
        );
        self.rings.insert((slot, dci), (at, cycle));
        addrs
    }

    fn ring_doorbell(&mut self, slot: u8, dci: u8) {
        self.w32(DOORBELL + 4 * slot as u64, dci as u32);
    }

    /// Dword `dw` of context `dci` (0: the slot) of a slot's output
    /// device context.
    fn out_dword(&mut self, slot: u8, dci: u8, dw: u64) -> u32 {
        self.r32(out_ctx(slot) + dci as u64 * 32 + dw * 4)
    }

    fn ep_state(&mut self, slot: u8, dci: u8) -> u32 {
        self.out_dword(slot, dci, 0) & 7
    }

    /// Resets a USB 3 port with a device: PRC, a Port Status Change
    /// Event, the port enabled in U0 at SuperSpeed.
    fn reset_port(&mut self, port: u8) {
        // Acknowledge the connect first, as a driver does.
        self.set_portsc(port, PORT_PP | PORT_CSC);
        assert_eq!(self.portsc(port) & PORT_CSC, 0, "CSC is write-1-to-clear");
        self.set_portsc(port, PORT_PP | PORT_PR);
        let e = self.wait(TY_PORT_STATUS_CHANGE);
        assert_eq!(e.param >> 24, port as u64, "the event names the port");
        assert_eq!(e.cc(), CC_SUCCESS);
        let s = self.portsc(port);
        assert_eq!(
            s & (PORT_CCS | PORT_PED | PORT_PR | PORT_PRC),
            PORT_CCS | PORT_PED | PORT_PRC,
            "reset done, enabled: {s:x}"
        );
        assert_eq!(s >> 10 & 0xf, SPEED_SUPER, "{s:x}");
        assert_eq!(s >> 5 & 0xf, 0, "link in U0: {s:x}");
        self.set_portsc(port, PORT_PP | PORT_PRC);
        assert_eq!(self.portsc(port) & PORT_PRC, 0);
    }

    /// Enable Slot and Address Device (with SET_ADDRESS) for the device
    /// on root port `port`, ep0 max packet `mps0`.
    fn address(&mut self, port: u8, mps0: u32) -> u8 {
        let e = self.command(Trb::new(0, 0, TY_ENABLE_SLOT, 0));
        assert_eq!(e.cc(), CC_SUCCESS, "Enable Slot");
        let slot = e.slot();
        assert!((1..=8).contains(&slot), "slot {slot}");
        self.qt.writeq(DCBAA + 8 * slot as u64, out_ctx(slot));
        self.qt.memwrite(out_ctx(slot), &[0; 0x400]);
        let ctx = input_ctx(&[
            // Add the slot and ep0.
            (0x04, 3),
            // Slot: one context entry; the root port.
            (0x20, 1 << 27),
            (0x24, (port as u32) << 16),
            // ep0: Control, CErr 3, its ring with DCS 1.
            (0x44, mps0 << 16 | 4 << 3 | 3 << 1),
            (0x48, ring_base(slot, 1) as u32 | 1),
        ]);
        self.qt.memwrite(IN_CTX, &ctx);
        let e = self.command(Trb::new(IN_CTX, 0, TY_ADDRESS_DEVICE, (slot as u32) << 24));
        assert_eq!(e.cc(), CC_SUCCESS, "Address Device");
        assert_eq!(e.slot(), slot);
        // Addressed, and the device's USB address is the slot id.
        assert_eq!(self.out_dword(slot, 0, 3), 2 << 27 | slot as u32);
        assert_eq!(self.out_dword(slot, 0, 0) >> 20 & 0xf, SPEED_SUPER);
        assert_eq!(self.ep_state(slot, 1), EP_RUNNING);
        slot
    }

    /// A control transfer on ep0: Setup, Data (if any), Status. Returns
    /// the completion code and the IN data.
    fn control(&mut self, slot: u8, setup: [u8; 8], out: &[u8]) -> (u32, Vec<u8>) {
        let len = u16::from_le_bytes([setup[6], setup[7]]) as u32;
        let input = setup[0] & 0x80 != 0;
        // Transfer Type: no data, OUT data, IN data.
        let trt = match (len, input) {
            (0, _) => 0,
            (_, false) => 2,
            (_, true) => 3,
        };
        let mut trbs = vec![Trb::new(
            u64::from_le_bytes(setup),
            8,
            TY_SETUP,
            IDT | trt << 16,
        )];
        if len > 0 {
            if !input {
                self.qt.memwrite(CTRL_BUF, out);
            }
            let dir = if input { DIR_IN } else { 0 };
            trbs.push(Trb::new(CTRL_BUF, len, TY_DATA, dir | ISP));
        }
        // The status stage goes the other way from the data.
        let dir = if len > 0 && input { 0 } else { DIR_IN };
        trbs.push(Trb::new(0, 0, TY_STATUS, dir | IOC));
        let addrs = self.queue(slot, 1, &trbs);
        self.ring_doorbell(slot, 1);
        let mut got = len as usize;
        loop {
            let e = self.wait(TY_TRANSFER);
            assert_eq!((e.slot(), e.dci()), (slot, 1));
            if e.cc() == CC_SHORT_PACKET {
                // ISP on the data stage: an event for it, then the
                // status stage's.
                assert_eq!(e.param, addrs[1], "short data stage");
                got = (len - e.residual()) as usize;
                continue;
            }
            let d = if got > 0 {
                self.qt.memread(CTRL_BUF, got)
            } else {
                Vec::new()
            };
            return (e.cc(), d);
        }
    }

    /// Configure Endpoint with usb-storage's bulk pair (SuperSpeed: 1024
    /// bytes), then SET_CONFIGURATION(1).
    fn configure(&mut self, slot: u8, port: u8) {
        let mut dwords = vec![
            (0x04, 1 | 1 << DCI_IN | 1 << DCI_OUT),
            // Context entries: up to DCI 4.
            (0x20, 4 << 27),
            (0x24, (port as u32) << 16),
        ];
        // Bulk IN (type 6) and Bulk OUT (type 2), CErr 3.
        for (dci, ty) in [(DCI_IN, 6u32), (DCI_OUT, 2)] {
            let at = 0x20 * (dci as u64 + 1);
            dwords.push((at + 4, 1024 << 16 | ty << 3 | 3 << 1));
            dwords.push((at + 8, ring_base(slot, dci) as u32 | 1));
        }
        self.qt.memwrite(IN_CTX, &input_ctx(&dwords));
        let e = self.command(Trb::new(IN_CTX, 0, TY_CONFIGURE_EP, (slot as u32) << 24));
        assert_eq!(e.cc(), CC_SUCCESS, "Configure Endpoint");
        assert_eq!(self.out_dword(slot, 0, 3) >> 27, 3, "slot Configured");
        assert_eq!(self.ep_state(slot, DCI_IN), EP_RUNNING);
        assert_eq!(self.ep_state(slot, DCI_OUT), EP_RUNNING);
        let (cc, _) = self.control(slot, [0, 9, 1, 0, 0, 0, 0, 0], &[]);
        assert_eq!(cc, CC_SUCCESS, "SET_CONFIGURATION");
    }

    /// A bulk TD of `len` bytes at `buf` in chained Normal TRBs of at
    /// most `piece` bytes; returns its Transfer Event.
    fn bulk(&mut self, slot: u8, dci: u8, buf: u64, len: usize, piece: usize) -> Trb {
        let mut trbs = Vec::new();
        let mut off = 0;
        loop {
            let n = piece.min(len - off);
            let last = off + n == len;
            let bits = ISP | if last { IOC } else { CH };
            trbs.push(Trb::new(buf + off as u64, n as u32, TY_NORMAL, bits));
            off += n;
            if last {
                break;
            }
        }
        self.queue(slot, dci, &trbs);
        self.ring_doorbell(slot, dci);
        let e = self.wait(TY_TRANSFER);
        assert_eq!((e.slot(), e.dci()), (slot, dci), "{e:x?}");
        e
    }

    /// One BOT command: the CBW on the OUT endpoint, the data stage at
    /// `buf` (IN, or OUT of what is already there), the CSW on the IN
    /// endpoint. Returns the CSW status.
    fn bot(&mut self, slot: u8, tag: u32, cdb: &[u8], len: usize, dir_in: bool, buf: u64) -> u8 {
        self.qt
            .memwrite(CBW_BUF, &cbw(tag, len as u32, dir_in, cdb));
        let e = self.bulk(slot, DCI_OUT, CBW_BUF, 31, 31);
        assert_eq!(e.cc(), CC_SUCCESS, "CBW");
        if len > 0 {
            let dci = if dir_in { DCI_IN } else { DCI_OUT };
            // 16 KiB TRBs: a data stage of several chained TRBs.
            let e = self.bulk(slot, dci, buf, len, 16 << 10);
            assert_eq!((e.cc(), e.residual()), (CC_SUCCESS, 0), "data stage");
        }
        self.qt.memwrite(CSW_BUF, &[0; 13]);
        let e = self.bulk(slot, DCI_IN, CSW_BUF, 13, 13);
        assert_eq!((e.cc(), e.residual()), (CC_SUCCESS, 0), "CSW");
        let csw = self.qt.memread(CSW_BUF, 13);
        assert_eq!(&csw[0..4], &0x5342_5355u32.to_le_bytes(), "CSW signature");
        assert_eq!(&csw[4..8], &tag.to_le_bytes(), "CSW tag");
        csw[12]
    }

    /// The whole bring-up of the usb-storage on USB 3 root port `port`:
    /// port reset, slot, address, device descriptor, configuration, and
    /// the power-on UNIT ATTENTION consumed by a TEST UNIT READY.
    fn storage(&mut self, port: u8) -> u8 {
        self.reset_port(port);
        let slot = self.address(port, 512);
        let (cc, d) = self.control(slot, [0x80, 6, 0, 1, 0, 0, 18, 0], &[]);
        assert_eq!(cc, CC_SUCCESS, "GET_DESCRIPTOR(device)");
        assert_eq!(&d[0..2], &[18, 1], "a device descriptor");
        assert_eq!(u16::from_le_bytes([d[2], d[3]]), 0x0300, "bcdUSB 3.0");
        assert_eq!(d[7], 9, "bMaxPacketSize0: 2^9 at SuperSpeed");
        assert_eq!(u16::from_le_bytes([d[8], d[9]]), 0x46f4, "idVendor");
        self.configure(slot, port);
        let status = self.bot(slot, 1, &[0; 6], 0, false, BUF);
        assert_eq!(status, 1, "TEST UNIT READY: the power-on unit attention");
        assert_eq!(self.bot(slot, 2, &[0; 6], 0, false, BUF), 0, "then ready");
        slot
    }

    /// Reset Endpoint on a halted endpoint, then Set TR Dequeue Pointer
    /// past the TD that failed (the ring's next free TRB), as a driver
    /// recovers a transfer ring.
    fn recover_ring(&mut self, slot: u8, dci: u8) {
        let e = self.command(Trb::new(
            0,
            0,
            TY_RESET_EP,
            (slot as u32) << 24 | (dci as u32) << 16,
        ));
        assert_eq!(e.cc(), CC_SUCCESS, "Reset Endpoint");
        assert_eq!(self.ep_state(slot, dci), EP_STOPPED);
        let next = self.rings[&(slot, dci)].0;
        self.set_dequeue(slot, dci, next);
    }

    /// Set TR Dequeue Pointer to `to` with DCS 1; the test's ring state
    /// follows.
    fn set_dequeue(&mut self, slot: u8, dci: u8, to: u64) {
        let e = self.command(Trb::new(
            to | 1,
            0,
            TY_SET_TR_DEQUEUE,
            (slot as u32) << 24 | (dci as u32) << 16,
        ));
        assert_eq!(e.cc(), CC_SUCCESS, "Set TR Dequeue Pointer");
        let lo = self.out_dword(slot, dci, 2) as u64;
        let hi = self.out_dword(slot, dci, 3) as u64;
        assert_eq!((hi << 32 | lo) & !0xf, to, "the context's dequeue pointer");
        self.rings.insert((slot, dci), (to, true));
    }
}

/// Walks the extended capabilities (xHCI 7.2) for the two Supported
/// Protocol capabilities, as a driver learns which root ports are USB 2
/// and which USB 3 rather than assuming an order: returns the port
/// numbers of each.
fn protocol_ports(qt: &mut Qtest) -> (std::ops::RangeInclusive<u8>, std::ops::RangeInclusive<u8>) {
    let mut at = BAR + ((qt.readl(BAR + 0x10) >> 16) as u64) * 4;
    let (mut usb2, mut usb3) = (None, None);
    for _ in 0..16 {
        let head = qt.readl(at);
        if head & 0xff == 2 {
            assert_eq!(qt.readl(at + 4), u32::from_le_bytes(*b"USB "));
            let ports = qt.readl(at + 8);
            let (first, count) = (ports as u8, (ports >> 8) as u8);
            let range = first..=first + count - 1;
            match head >> 24 {
                2 => usb2 = Some(range),
                3 => usb3 = Some(range),
                v => panic!("Supported Protocol major revision {v}"),
            }
        }
        let next = (head >> 8 & 0xff) as u64;
        if next == 0 {
            break;
        }
        at += next * 4;
    }
    (
        usb2.expect("a USB 2 Supported Protocol capability"),
        usb3.expect("a USB 3 Supported Protocol capability"),
    )
}

/// A 1 MiB raw image whose every sector differs.
fn image(dir: &Path) -> PathBuf {
    let p = dir.join("stick.img");
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i / 512 + i % 251) as u8).collect();
    std::fs::write(&p, data).unwrap();
    p
}

fn drive_arg(img: &Path) -> String {
    format!("file={},format=raw,if=none,id=stick", img.display())
}

#[test]
fn controller_reset_slots_and_bot_read_write() {
    let dir = support::scratch("xhci-bot");
    let img = image(&dir);
    let drive = drive_arg(&img);
    let mut x = Xhc::start(&[
        "-drive",
        &drive,
        "-device",
        "usb-storage,bus=xhci.0,port=1,drive=stick",
    ]);
    // usb-storage is SuperSpeed: connector 1's USB 3 port, connected
    // and (a USB 3 port enables itself) enabled already.
    let port = x.ss_port(1);
    let s = x.portsc(port);
    assert_eq!(s & (PORT_CCS | PORT_PED), PORT_CCS | PORT_PED, "{s:x}");
    let hs = x.hs_port(1);
    assert_eq!(x.portsc(hs) & PORT_CCS, 0, "not on the USB 2 port");
    let next = x.ss_port(2);
    assert_eq!(x.portsc(next) & PORT_CCS, 0, "connector 2 is empty");
    x.reset_and_run();
    // HCRST makes the attached device a new connect.
    assert_ne!(x.portsc(port) & PORT_CSC, 0);
    let slot = x.storage(port);

    // WRITE(10) of 64 sectors at LBA 16 in 16 KiB TRBs.
    let pattern: Vec<u8> = (0..64 * 512u32).map(|i| (i * 7 + i / 4096) as u8).collect();
    x.qt.memwrite(BUF, &pattern);
    let write = cdb10(0x2a, 16, 64);
    assert_eq!(x.bot(slot, 3, &write, pattern.len(), false, BUF), 0);
    let sync = cdb10(0x35, 0, 0);
    assert_eq!(x.bot(slot, 4, &sync, 0, false, BUF), 0, "SYNCHRONIZE CACHE");
    let file = std::fs::read(&img).unwrap();
    assert!(
        file[16 * 512..80 * 512] == pattern[..],
        "WRITE(10) landed in the image file"
    );
    // READ(10) of LBA 8-95: what was there before, then what was
    // written, then what was there again; checked against the file.
    let read = cdb10(0x28, 8, 88);
    assert_eq!(x.bot(slot, 5, &read, 88 * 512, true, BUF2), 0);
    let back = x.qt.memread(BUF2, 88 * 512);
    assert!(back == file[8 * 512..96 * 512], "READ(10) matches the file");
    // The whole image in one command: 64 chained TRBs, long enough for
    // the device to NAK while its reads are in flight and to wake the
    // controller.
    let read = cdb10(0x28, 0, 2048);
    assert_eq!(x.bot(slot, 6, &read, 1 << 20, true, BUF2), 0);
    assert!(x.qt.memread(BUF2, 1 << 20) == file, "READ(10) of 1 MiB");
    // The doorbells rang on the slot's rings only: the command ring is
    // still running and answers.
    let e = x.command(Trb::new(0, 0, TY_NOOP_CMD, 0));
    assert_eq!(e.cc(), CC_SUCCESS);
    assert_eq!(x.r32(CRCR_LO) & 1 << 3, 1 << 3, "CRR");
}

#[test]
fn port_status_change_on_hotplug() {
    let dir = support::scratch("xhci-hotplug");
    let img = image(&dir);
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let drive = drive_arg(&img);
    let mut x = Xhc::start(&["-qmp", &qmp_arg, "-drive", &drive]);
    let mut q = support::qmp::Qmp::negotiated(&sock);
    x.reset_and_run();
    let port = x.ss_port(2);
    assert_eq!(x.portsc(port) & PORT_CCS, 0);
    x.assert_no_event("an idle controller");
    // Connector 2 takes the SuperSpeed device on its USB 3 port.
    q.ok(
        "device_add",
        json!({"driver": "usb-storage", "id": "stick0", "drive": "stick",
               "bus": "xhci.0", "port": "2"}),
    );
    let e = x.wait(TY_PORT_STATUS_CHANGE);
    assert_eq!(
        e.param >> 24,
        port as u64,
        "the event names the port: {e:x?}"
    );
    let s = x.portsc(port);
    assert_eq!(
        s & (PORT_CCS | PORT_PED | PORT_CSC),
        PORT_CCS | PORT_PED | PORT_CSC,
        "{s:x}"
    );
    assert_eq!(s >> 10 & 0xf, SPEED_SUPER);
    assert_ne!(x.r32(USBSTS) & STS_PCD, 0, "USBSTS.PCD");
    x.w32(USBSTS, STS_PCD);
    assert_eq!(x.r32(USBSTS) & STS_PCD, 0, "PCD is write-1-to-clear");
    // The new device enumerates.
    x.storage(port);
    // A port in use is refused.
    let (_, desc) = q.err(
        "device_add",
        json!({"driver": "usb-storage", "id": "x", "drive": "stick",
               "bus": "xhci.0", "port": "2"}),
    );
    assert!(desc.contains("in use"), "{desc}");

    q.ok("device_del", json!({"id": "stick0"}));
    let ev = q.event("DEVICE_DELETED");
    assert_eq!(ev["data"]["device"], "stick0", "{ev}");
    let e = x.wait(TY_PORT_STATUS_CHANGE);
    assert_eq!(e.param >> 24, port as u64, "{e:x?}");
    let s = x.portsc(port);
    assert_eq!(
        s & (PORT_CCS | PORT_PED | PORT_CSC),
        PORT_CSC,
        "disconnected: {s:x}"
    );
    // The port and the drive are free again: a new connect, a new event.
    x.set_portsc(port, PORT_PP | PORT_CSC);
    q.ok(
        "device_add",
        json!({"driver": "usb-storage", "id": "again", "drive": "stick",
               "bus": "xhci.0", "port": "2"}),
    );
    assert_eq!(x.wait(TY_PORT_STATUS_CHANGE).param >> 24, port as u64);
    assert_ne!(x.portsc(port) & PORT_CCS, 0);
}

#[test]
fn stall_and_clear_halt_recovery() {
    let dir = support::scratch("xhci-stall");
    let img = image(&dir);
    let drive = drive_arg(&img);
    let mut x = Xhc::start(&[
        "-drive",
        &drive,
        "-device",
        "usb-storage,bus=xhci.0,port=1,drive=stick",
    ]);
    x.reset_and_run();
    let port = x.ss_port(1);
    let slot = x.storage(port);
    // 30 bytes are not a CBW (BOT 6.2.1): the device stalls, the
    // endpoint halts on that TRB.
    x.qt.memwrite(CBW_BUF, &cbw(7, 0, false, &[0; 6]));
    let e = x.bulk(slot, DCI_OUT, CBW_BUF, 30, 30);
    assert_eq!(e.cc(), CC_STALL, "Stall Error: {e:x?}");
    assert_eq!(x.ep_state(slot, DCI_OUT), EP_HALTED);
    assert_eq!(
        x.out_dword(slot, DCI_OUT, 2) as u64 & !0xf,
        e.param,
        "the dequeue pointer stays on the TD that failed"
    );
    // A halted endpoint ignores its doorbell.
    x.ring_doorbell(slot, DCI_OUT);
    x.assert_no_event("a halted endpoint's doorbell");
    // Set TR Dequeue needs the endpoint stopped: Reset Endpoint first.
    let next = x.rings[&(slot, DCI_OUT)].0;
    let early = x.command(Trb::new(
        next | 1,
        0,
        TY_SET_TR_DEQUEUE,
        (slot as u32) << 24 | (DCI_OUT as u32) << 16,
    ));
    assert_eq!(early.cc(), CC_CONTEXT_STATE, "Set TR Dequeue while halted");
    let reset = Trb::new(
        0,
        0,
        TY_RESET_EP,
        (slot as u32) << 24 | (DCI_OUT as u32) << 16,
    );
    assert_eq!(x.command(reset).cc(), CC_SUCCESS, "Reset Endpoint");
    assert_eq!(x.ep_state(slot, DCI_OUT), EP_STOPPED);
    assert_eq!(x.command(reset).cc(), CC_CONTEXT_STATE, "not halted now");
    x.set_dequeue(slot, DCI_OUT, next);
    // BOT Reset Recovery (5.3.4): the class reset, then CLEAR_FEATURE
    // (ENDPOINT_HALT) on both bulk endpoints, which the device stalled.
    let (cc, _) = x.control(slot, [0x21, 0xff, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(cc, CC_SUCCESS, "Bulk-Only Mass Storage Reset");
    for ep in [0x81u8, 0x02] {
        let (cc, _) = x.control(slot, [0x02, 0x01, 0, 0, ep, 0, 0, 0], &[]);
        assert_eq!(cc, CC_SUCCESS, "CLEAR_FEATURE(ENDPOINT_HALT) {ep:#x}");
    }
    assert_eq!(x.bot(slot, 8, &[0; 6], 0, false, BUF), 0, "TEST UNIT READY");
    // And data moves again.
    let read = cdb10(0x28, 2, 4);
    assert_eq!(x.bot(slot, 9, &read, 2048, true, BUF), 0);
    let file = std::fs::read(&img).unwrap();
    assert!(x.qt.memread(BUF, 2048) == file[1024..3072]);
}

#[test]
fn hostile_trb_outside_ram_fails_the_transfer() {
    let dir = support::scratch("xhci-hostile");
    let img = image(&dir);
    let drive = drive_arg(&img);
    let mut x = Xhc::start(&[
        "-drive",
        &drive,
        "-device",
        "usb-storage,bus=xhci.0,port=1,drive=stick",
    ]);
    x.reset_and_run();
    let port = x.ss_port(1);
    let slot = x.storage(port);
    // Normal TRBs whose buffer is not guest RAM: far above it, the
    // controller's own doorbells, and one running off the end of RAM.
    // Each is refused before the device sees a byte (TRB Error, which
    // Strata's xHCI gives when a TD's buffer does not map to RAM) and
    // halts the endpoint; the driver moves the ring on.
    for (buf, len) in [
        (0xdead_0000_0000u64, 31u32),
        (DOORBELL, 31),
        (RAM_END - 16, 31),
    ] {
        let at = x.queue(slot, DCI_OUT, &[Trb::new(buf, len, TY_NORMAL, ISP | IOC)])[0];
        x.ring_doorbell(slot, DCI_OUT);
        let e = x.wait(TY_TRANSFER);
        assert_eq!(
            (e.cc(), e.param, e.slot(), e.dci()),
            (CC_TRB, at, slot, DCI_OUT),
            "buffer {buf:#x}: {e:x?}"
        );
        assert_eq!(x.ep_state(slot, DCI_OUT), EP_HALTED);
        x.recover_ring(slot, DCI_OUT);
    }
    // A transfer ring that is not in RAM at all: the TRB fetch fails.
    // The test's own ring position stays where it was, for the recovery.
    let stop = Trb::new(
        0,
        0,
        TY_STOP_EP,
        (slot as u32) << 24 | (DCI_IN as u32) << 16,
    );
    assert_eq!(x.command(stop).cc(), CC_SUCCESS, "Stop Endpoint");
    let far = 0xdead_0000_0000u64;
    let e = x.command(Trb::new(
        far | 1,
        0,
        TY_SET_TR_DEQUEUE,
        (slot as u32) << 24 | (DCI_IN as u32) << 16,
    ));
    assert_eq!(e.cc(), CC_SUCCESS);
    x.ring_doorbell(slot, DCI_IN);
    let e = x.wait(TY_TRANSFER);
    assert_eq!((e.cc(), e.param), (CC_TRB, far), "{e:x?}");
    assert_eq!(x.ep_state(slot, DCI_IN), EP_HALTED);
    x.recover_ring(slot, DCI_IN);

    // The VMM kept running: commands complete, and the device, which
    // never saw the hostile TDs, still takes a BOT command and reads
    // the image.
    let e = x.command(Trb::new(0, 0, TY_NOOP_CMD, 0));
    assert_eq!(e.cc(), CC_SUCCESS, "No Op command");
    assert_eq!(x.r32(USBSTS) & STS_HCH, 0, "still running");
    assert_eq!(
        x.bot(slot, 20, &[0; 6], 0, false, BUF),
        0,
        "TEST UNIT READY"
    );
    let read = cdb10(0x28, 100, 8);
    assert_eq!(x.bot(slot, 21, &read, 4096, true, BUF), 0);
    let file = std::fs::read(&img).unwrap();
    assert!(x.qt.memread(BUF, 4096) == file[100 * 512..108 * 512]);
    assert_eq!(
        x.qt.pci_read32(x.dev, 0, 0),
        0x000d_1b36,
        "still on the bus"
    );
}

// ---- usb-uas with streams ----

/// usb-uas's pipes (UASP table 3; the endpoint number is the pipe id) as
/// DCIs: OUT n is 2n, IN n is 2n+1.
const DCI_UAS_COMMAND: u8 = 2;
const DCI_UAS_STATUS: u8 = 5;
const DCI_UAS_DATA_IN: u8 = 7;
const DCI_UAS_DATA_OUT: u8 = 8;
/// MaxPStreams 3: a Primary Stream Context Array of 2^(3+1) = 16
/// entries, streams 1-15 (stream 0 is not a stream), as Linux sizes it
/// for usb-uas's 16 streams.
const UAS_PSTREAMS: u32 = 3;
/// Stream Context Arrays, one 4 KiB page per DCI.
const STREAM_ARRAYS: u64 = 0x60_0000;
/// Stream rings, 4 KiB each by DCI and stream id.
const STREAM_RINGS: u64 = 0x68_0000;
/// COMMAND IUs, 64 bytes apart by tag.
const IU_BUF: u64 = 0x78_0000;
/// Status TD buffers (room for a SENSE IU with sense data), by tag.
const SENSE_BUF: u64 = 0x79_0000;
const SENSE_TD: usize = 0x100;
const BUF3: u64 = 0x7a_0000;
// UAS information unit ids (UAS-2 6.2).
const IU_COMMAND: u8 = 0x01;
const IU_SENSE: u8 = 0x03;
const SCSI_GOOD: u8 = 0x00;
const SCSI_CHECK_CONDITION: u8 = 0x02;

fn stream_array(dci: u8) -> u64 {
    STREAM_ARRAYS + dci as u64 * 0x1000
}

fn stream_ring(dci: u8, stream: u16) -> u64 {
    STREAM_RINGS + (dci as u64 * 16 + stream as u64) * 0x1000
}

/// A SENSE IU's status byte and, when it carries fixed-format sense
/// data, the sense key and ASC.
#[derive(Debug, PartialEq, Eq)]
struct SenseIu {
    status: u8,
    key: u8,
    asc: u8,
}

const GOOD: SenseIu = SenseIu {
    status: SCSI_GOOD,
    key: 0,
    asc: 0,
};

/// The guest driver for a usb-uas on top of [`Xhc`]: the status and
/// data pipes on streams, the stream id of a transfer being the tag of
/// its task (UASP 4.2).
struct Uas {
    x: Xhc,
    slot: u8,
    /// Stream ring enqueue pointers by (dci, stream); none wraps.
    streams: BTreeMap<(u8, u16), u64>,
    /// Transfer Events in the order the controller posted them.
    seen: Vec<Trb>,
}

impl Uas {
    /// Queues a TD of `len` bytes at `buf` on stream `stream` of `dci`
    /// (stream 0: the endpoint's own ring) in Normal TRBs of at most 64
    /// KiB (the TRB Transfer Length has 17 bits) and rings the doorbell
    /// naming the stream. Returns the TD's last TRB, which its Transfer
    /// Event names (IOC there; a short TD stops at ISP on the TRB where
    /// it ran short, so callers keep a short TD to one TRB).
    fn td(&mut self, dci: u8, stream: u16, buf: u64, len: usize) -> u64 {
        let mut trbs = Vec::new();
        let mut off = 0;
        loop {
            let n = (64 << 10).min(len - off);
            let last = off + n == len;
            let bits = ISP | if last { IOC } else { CH };
            trbs.push(Trb::new(buf + off as u64, n as u32, TY_NORMAL, bits));
            off += n;
            if last {
                break;
            }
        }
        let slot = self.slot;
        if stream == 0 {
            let at = *self.x.queue(slot, dci, &trbs).last().unwrap();
            self.x.ring_doorbell(slot, dci);
            return at;
        }
        let base = stream_ring(dci, stream);
        let mut at = *self.streams.entry((dci, stream)).or_insert(base);
        let mut last = 0;
        for t in &trbs {
            let mut t = *t;
            t.control |= 1;
            self.x.qt.memwrite(at, &t.bytes());
            last = at;
            at += 16;
        }
        assert!(at <= base + 0x1000, "stream ring {dci}.{stream} full");
        self.streams.insert((dci, stream), at);
        // DB Stream ID in bits 31:16, the DCI in 7:0 (5.6).
        self.x.w32(
            DOORBELL + 4 * slot as u64,
            dci as u32 | (stream as u32) << 16,
        );
        last
    }

    /// Moves whatever events the controller posted into `seen`.
    fn drain(&mut self) {
        let stashed: Vec<Trb> = self.x.stash.drain(..).collect();
        for t in stashed
            .into_iter()
            .chain(std::iter::from_fn(|| self.x.event()))
        {
            assert_eq!(t.ty(), TY_TRANSFER, "only transfers now: {t:x?}");
            assert_eq!(t.slot(), self.slot, "{t:x?}");
            self.seen.push(t);
        }
    }

    /// Where in `seen` the Transfer Event naming `at` is, if it came.
    fn posted(&mut self, at: u64) -> Option<usize> {
        self.drain();
        self.seen.iter().position(|t| t.param == at)
    }

    /// Waits for the Transfer Event of the TD ending at `at` (device
    /// wakeups run at clock steps); returns its place in the order of
    /// events and the event.
    fn done(&mut self, at: u64) -> (usize, Trb) {
        let start = Instant::now();
        loop {
            if let Some(i) = self.posted(at) {
                return (i, self.seen[i]);
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no Transfer Event for {at:#x}; seen: {:x?}",
                self.seen
            );
            self.x.qt.clock_step(1_000_000);
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// A command as Linux's uas driver issues it with streams: the status
    /// TD and the data TD (if any: DCI, buffer, length) on stream `tag`
    /// first, then the COMMAND IU on the command pipe. Returns the data
    /// TD and the status TD.
    fn submit(
        &mut self,
        tag: u16,
        cdb: &[u8],
        data: Option<(u8, u64, usize)>,
    ) -> (Option<u64>, u64) {
        let status = self.td(
            DCI_UAS_STATUS,
            tag,
            SENSE_BUF + tag as u64 * 0x100,
            SENSE_TD,
        );
        let data = data.map(|(dci, buf, len)| self.td(dci, tag, buf, len));
        self.command_iu(tag, cdb);
        (data, status)
    }

    /// Sends the COMMAND IU (UAS-2 6.2.2) of `tag`: LUN 0, simple task,
    /// a CDB of up to 16 bytes.
    fn command_iu(&mut self, tag: u16, cdb: &[u8]) {
        let mut iu = vec![0u8; 32];
        iu[0] = IU_COMMAND;
        iu[2..4].copy_from_slice(&tag.to_be_bytes());
        // Bytes 8-15: LUN 0 (single-level addressing, all zero).
        iu[16..16 + cdb.len()].copy_from_slice(cdb);
        let buf = IU_BUF + tag as u64 * 0x40;
        self.x.qt.memwrite(buf, &iu);
        let at = self.td(DCI_UAS_COMMAND, 0, buf, iu.len());
        let (_, e) = self.done(at);
        assert_eq!(
            (e.cc(), e.residual(), e.dci()),
            (CC_SUCCESS, 0, DCI_UAS_COMMAND),
            "COMMAND IU, tag {tag}: {e:x?}"
        );
    }

    /// The SENSE IU (UAS-2 6.2.4) on the status TD `at` of `tag`, and
    /// where its event came.
    fn sense(&mut self, tag: u16, at: u64) -> (usize, SenseIu) {
        let (i, e) = self.done(at);
        assert_eq!(e.dci(), DCI_UAS_STATUS, "{e:x?}");
        // The IU is shorter than the TD: a short packet, and the
        // residual says how long the IU was.
        assert_eq!(e.cc(), CC_SHORT_PACKET, "tag {tag}: {e:x?}");
        let n = SENSE_TD - e.residual() as usize;
        assert!(
            n >= 16,
            "a SENSE IU has 16 bytes before its sense data: {n}"
        );
        let b = self.x.qt.memread(SENSE_BUF + tag as u64 * 0x100, n);
        assert_eq!(b[0], IU_SENSE, "IU id: {b:02x?}");
        assert_eq!(u16::from_be_bytes([b[2], b[3]]), tag, "the IU's tag");
        let len = u16::from_be_bytes([b[14], b[15]]) as usize;
        assert_eq!(n, 16 + len, "sense length: {b:02x?}");
        // Fixed-format sense data (SPC-4 4.5.3): key in byte 2, ASC in 12.
        let (key, asc) = if len >= 13 {
            (b[16 + 2] & 0xf, b[16 + 12])
        } else {
            (0, 0)
        };
        (
            i,
            SenseIu {
                status: b[6],
                key,
                asc,
            },
        )
    }

    /// The data TD `at` moved all `len` bytes on `dci`; returns where its
    /// event came.
    fn data_done(&mut self, at: u64, dci: u8, what: &str) -> usize {
        let (i, e) = self.done(at);
        assert_eq!(
            (e.cc(), e.residual(), e.dci()),
            (CC_SUCCESS, 0, dci),
            "{what}: {e:x?}"
        );
        i
    }

    /// A command with no data phase; returns its SENSE IU.
    fn no_data(&mut self, tag: u16, cdb: &[u8]) -> SenseIu {
        let (_, st) = self.submit(tag, cdb, None);
        self.sense(tag, st).1
    }
}

/// Walks a configuration descriptor of usb-uas: returns each endpoint's
/// (address, wMaxPacketSize, MaxStreams exponent of its SuperSpeed
/// companion, pipe id of the Pipe Usage descriptor after it).
fn uas_endpoints(cfg: &[u8]) -> Vec<(u8, u16, u8, u8)> {
    assert_eq!(&cfg[0..2], &[9, 2], "a configuration descriptor");
    assert_eq!(
        u16::from_le_bytes([cfg[2], cfg[3]]) as usize,
        cfg.len(),
        "wTotalLength"
    );
    assert_eq!(cfg[4], 1, "one interface");
    let mut eps: Vec<(u8, u16, u8, u8)> = Vec::new();
    let mut at = 9;
    while at < cfg.len() {
        let d = &cfg[at..at + cfg[at] as usize];
        match d[1] {
            4 => {
                assert_eq!(d.len(), 9);
                // Mass storage, SCSI, UAS; four endpoints.
                assert_eq!(&d[4..8], &[4, 0x08, 0x06, 0x62], "interface {d:02x?}");
            }
            5 => {
                assert_eq!(d.len(), 7);
                assert_eq!(d[3], 2, "bulk: {d:02x?}");
                eps.push((d[2], u16::from_le_bytes([d[4], d[5]]), 0xff, 0));
            }
            0x30 => {
                assert_eq!(d.len(), 6);
                let ep = eps.last_mut().expect("a companion after its endpoint");
                assert_eq!(ep.2, 0xff, "one companion per endpoint");
                ep.2 = d[3] & 0x1f;
            }
            0x24 => {
                assert_eq!(d.len(), 4);
                let ep = eps.last_mut().expect("a Pipe Usage after its endpoint");
                assert_eq!(ep.3, 0, "one Pipe Usage per endpoint");
                ep.3 = d[2];
            }
            t => panic!("descriptor type {t:#x} in {cfg:02x?}"),
        }
        at += d.len();
    }
    eps
}

#[test]
fn uas_command_data_and_status_on_streams() {
    let dir = support::scratch("xhci-uas");
    let img = image(&dir);
    let drive = format!("file={},format=raw,if=none,id=d0", img.display());
    let mut x = Xhc::start(&[
        "-device",
        "usb-uas,id=uas,bus=xhci.0,port=1",
        "-drive",
        &drive,
        "-device",
        "scsi-hd,bus=uas.0,scsi-id=0,lun=0,drive=d0",
    ]);
    // Streams need a Primary Stream Context Array the controller
    // supports: MaxPSASize (HCCPARAMS1 15:12) bounds MaxPStreams.
    assert!(x.r32(BAR + 0x10) >> 12 & 0xf >= UAS_PSTREAMS, "MaxPSASize");
    x.reset_and_run();
    // usb-uas is SuperSpeed: it shows on connector 1's USB 3 port.
    let port = x.ss_port(1);
    x.reset_port(port);
    let slot = x.address(port, 512);
    let (cc, d) = x.control(slot, [0x80, 6, 0, 1, 0, 0, 18, 0], &[]);
    assert_eq!(cc, CC_SUCCESS, "GET_DESCRIPTOR(device)");
    assert_eq!(u16::from_le_bytes([d[2], d[3]]), 0x0300, "bcdUSB 3.0");
    assert_eq!(d[7], 9, "bMaxPacketSize0: 2^9 at SuperSpeed");
    assert_eq!(
        (
            u16::from_le_bytes([d[8], d[9]]),
            u16::from_le_bytes([d[10], d[11]])
        ),
        (0x46f4, 0x0003),
        "QEMU's usb-uas"
    );
    // The configuration's header first for wTotalLength, then all of it,
    // as drivers read it.
    let (cc, head) = x.control(slot, [0x80, 6, 0, 2, 0, 0, 9, 0], &[]);
    assert_eq!((cc, head.len()), (CC_SUCCESS, 9));
    let total = u16::from_le_bytes([head[2], head[3]]);
    let (cc, cfg) = x.control(
        slot,
        [0x80, 6, 0, 2, 0, 0, total as u8, (total >> 8) as u8],
        &[],
    );
    assert_eq!((cc, cfg.len()), (CC_SUCCESS, total as usize));
    // Command OUT ep1, status IN ep2, data-in IN ep3, data-out OUT ep4,
    // each with its Pipe Usage; streams (2^4) on all but the command
    // pipe.
    assert_eq!(
        uas_endpoints(&cfg),
        [
            (0x01, 1024, 0, 1),
            (0x82, 1024, 4, 2),
            (0x83, 1024, 4, 3),
            (0x04, 1024, 4, 4)
        ]
    );
    let (cc, _) = x.control(slot, [0, 9, 1, 0, 0, 0, 0, 0], &[]);
    assert_eq!(cc, CC_SUCCESS, "SET_CONFIGURATION");

    // The streamed pipes' Stream Context Arrays: entry 0 reserved,
    // entries 1-15 each a primary ring (SCT 1) with DCS 1.
    let streamed = [DCI_UAS_STATUS, DCI_UAS_DATA_IN, DCI_UAS_DATA_OUT];
    for dci in streamed {
        let mut array = vec![0u8; 16 * (2 << UAS_PSTREAMS)];
        for s in 1..(2u16 << UAS_PSTREAMS) {
            let v = stream_ring(dci, s) | 1 << 1 | 1;
            array[s as usize * 16..][..8].copy_from_slice(&v.to_le_bytes());
        }
        x.qt.memwrite(stream_array(dci), &array);
    }
    // Configure Endpoint: the command pipe with a plain ring, the other
    // three with MaxPStreams, LSA and their arrays in the dequeue field.
    let mut dwords = vec![
        (
            0x04,
            1 | [
                DCI_UAS_COMMAND,
                DCI_UAS_STATUS,
                DCI_UAS_DATA_IN,
                DCI_UAS_DATA_OUT,
            ]
            .iter()
            .fold(0, |a, d| a | 1 << d),
        ),
        (0x20, (DCI_UAS_DATA_OUT as u32) << 27),
        (0x24, (port as u32) << 16),
    ];
    for dci in [
        DCI_UAS_COMMAND,
        DCI_UAS_STATUS,
        DCI_UAS_DATA_IN,
        DCI_UAS_DATA_OUT,
    ] {
        let at = 0x20 * (dci as u64 + 1);
        let ty = if dci & 1 == 1 { 6u32 } else { 2 };
        // 1024-byte packets, MaxBurst 15 as the companion says, CErr 3.
        dwords.push((at + 4, 1024 << 16 | 15 << 8 | ty << 3 | 3 << 1));
        if dci == DCI_UAS_COMMAND {
            dwords.push((at + 8, ring_base(slot, dci) as u32 | 1));
        } else {
            dwords.push((at, UAS_PSTREAMS << 10 | 1 << 15));
            dwords.push((at + 8, stream_array(dci) as u32));
        }
    }
    x.qt.memwrite(IN_CTX, &input_ctx(&dwords));
    let e = x.command(Trb::new(IN_CTX, 0, TY_CONFIGURE_EP, (slot as u32) << 24));
    assert_eq!(e.cc(), CC_SUCCESS, "Configure Endpoint");
    assert_eq!(x.out_dword(slot, 0, 3) >> 27, 3, "slot Configured");
    for dci in streamed {
        assert_eq!(x.ep_state(slot, dci), EP_RUNNING, "dci {dci}");
        assert_eq!(
            x.out_dword(slot, dci, 0) >> 10 & 0x3f,
            UAS_PSTREAMS | 1 << 5,
            "MaxPStreams and LSA in the output context"
        );
    }
    assert_eq!(x.ep_state(slot, DCI_UAS_COMMAND), EP_RUNNING);
    let mut u = Uas {
        x,
        slot,
        streams: BTreeMap::new(),
        seen: Vec::new(),
    };

    // TEST UNIT READY on tag 1: the power-on UNIT ATTENTION (sense key
    // 6, ASC 29h) once, then GOOD. The status TD on stream 1 waits,
    // NAKed, until the SENSE IU exists.
    let tur = [0u8; 6];
    assert_eq!(
        u.no_data(1, &tur),
        SenseIu {
            status: SCSI_CHECK_CONDITION,
            key: 6,
            asc: 0x29
        },
        "the power-on unit attention"
    );
    assert_eq!(u.no_data(1, &tur), GOOD, "then ready");

    // READ(10) of 4 blocks at LBA 5 on tag 1 again: stream 1's ring goes
    // on after the two status TDs.
    let file = std::fs::read(&img).unwrap();
    let (d, st) = u.submit(1, &cdb10(0x28, 5, 4), Some((DCI_UAS_DATA_IN, BUF, 2048)));
    let di = u.data_done(d.unwrap(), DCI_UAS_DATA_IN, "READ(10) data");
    let (si, s) = u.sense(1, st);
    assert_eq!(s, GOOD, "READ(10)");
    assert!(di < si, "the data moved before the SENSE IU");
    assert!(
        u.x.qt.memread(BUF, 2048) == file[5 * 512..9 * 512],
        "READ(10) matches the image"
    );

    // WRITE(10) of 256 blocks at LBA 300 on tag 2 (data-out on stream 2):
    // two 64 KiB TRBs, more than one of the device's pieces.
    let pattern: Vec<u8> = (0..256 * 512u32)
        .map(|i| (i * 13 + i / 1000) as u8)
        .collect();
    u.x.qt.memwrite(BUF2, &pattern);
    let (d, st) = u.submit(
        2,
        &cdb10(0x2a, 300, 256),
        Some((DCI_UAS_DATA_OUT, BUF2, pattern.len())),
    );
    let di = u.data_done(d.unwrap(), DCI_UAS_DATA_OUT, "WRITE(10) data");
    let (si, s) = u.sense(2, st);
    assert_eq!(s, GOOD, "WRITE(10)");
    assert!(di < si, "the data moved before the SENSE IU");
    assert_eq!(u.no_data(5, &cdb10(0x35, 0, 0)), GOOD, "SYNCHRONIZE CACHE");
    let file = std::fs::read(&img).unwrap();
    assert!(
        file[300 * 512..556 * 512] == pattern[..],
        "WRITE(10) landed in the image file"
    );

    // Two READ(10)s in flight at once. Tag 3's data TD is held back
    // after its COMMAND IU, so its task cannot finish while tag 4 (whose
    // TDs were all posted) runs to its SENSE IU: completion out of order
    // by tag, on separate streams of the same endpoints.
    let (_, st3) = u.submit(3, &cdb10(0x28, 280, 192), None);
    let (d4, st4) = u.submit(
        4,
        &cdb10(0x28, 0, 128),
        Some((DCI_UAS_DATA_IN, BUF3, 128 * 512)),
    );
    u.data_done(d4.unwrap(), DCI_UAS_DATA_IN, "tag 4 data");
    assert_eq!(u.sense(4, st4).1, GOOD, "tag 4");
    // Tag 3 is still waiting for its data TD.
    u.x.assert_no_event("tag 3 without its data TD");
    assert_eq!(u.posted(st3), None, "tag 3 has no SENSE IU yet");
    let d3 = u.td(DCI_UAS_DATA_IN, 3, BUF, 192 * 512);
    let di = u.data_done(d3, DCI_UAS_DATA_IN, "tag 3 data");
    let (si, s) = u.sense(3, st3);
    assert_eq!(s, GOOD, "tag 3");
    assert!(di < si, "the data moved before the SENSE IU");
    assert!(
        u.x.qt.memread(BUF3, 128 * 512) == file[..128 * 512],
        "tag 4 read"
    );
    assert!(
        u.x.qt.memread(BUF, 192 * 512) == file[280 * 512..472 * 512],
        "tag 3 read: before and into what tag 2 wrote"
    );
    // Every stream endpoint is still running and the command ring
    // answers.
    for dci in streamed {
        assert_eq!(u.x.ep_state(slot, dci), EP_RUNNING, "dci {dci}");
    }
    let e = u.x.command(Trb::new(0, 0, TY_NOOP_CMD, 0));
    assert_eq!(e.cc(), CC_SUCCESS, "No Op command");
}
