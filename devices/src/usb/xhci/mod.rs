//! The xHCI USB host controller: QEMU's `qemu-xhci` (PCI 1b36:000d) and
//! `nec-usb-xhci` (1033:0194).
//!
//! Spec followed: eXtensible Host Controller Interface for Universal
//! Serial Bus, revision 1.2. Chapter 4 (operational model: 4.2 reset,
//! 4.3 slot and endpoint setup, 4.6 the commands, 4.9 rings, 4.10
//! transfers, 4.11 TRBs, 4.17 interrupters, 4.19 root hub ports),
//! chapter 5 (registers: [`regs`]), chapter 6 (data structures:
//! [`trb`], [`context`]) and 7.2 (Supported Protocol capability).
//! QEMU's hw/usb/hcd-xhci.c was read for what guests rely on: the BAR
//! layout, the port numbering (QEMU 7.2 puts the USB 3 ports first,
//! `superspeed-ports-first`: USB 3 ports 1..=p3, then the USB 2 ports;
//! root connector `n` is the `n`-th port of each kind), which
//! TRB of a TD gets the Transfer Event, PORTSC behaviour on attach and
//! reset, and the device address being the slot id.
//!
//! Modules, one per concept: [`regs`] the register map and capability
//! values, [`trb`] TRBs typed, [`ring`] ring and TD walking, [`event`]
//! interrupters and event rings, [`context`] the contexts.
//!
//! Everything is parse-then-execute: a command TRB becomes a
//! [`trb::Command`], a TD becomes its typed TRBs and one scatter list
//! ([`GuestSgList`]) before the device sees anything.
//!
//! # What the vmm does
//! - Builds it with [`Xhci::new`]: guest RAM, the INTA line from its INTx
//!   routing, an [`MsiSender`] (MSI-X and MSI messages: KVM's, or the
//!   qtest writer), the machine's [`Clock`] (MFINDEX), and
//!   [`XhciOptions`] (`p2=`, `p3=`, `msi=`, `msix=`, `intrs=`,
//!   `slots=`; [`XhciOptions::qemu`] and [`XhciOptions::nec`] are the
//!   two models' defaults). It goes on the PCI bus as `Arc<Mutex<Xhci>>`;
//!   BAR0 holds everything, the MSI-X table and PBA included.
//! - Registers a kick with [`Xhci::set_kick`]: devices that NAKed call
//!   their [`Wakeup`] from any thread (block I/O completions), even from
//!   inside the controller's own call into them, so the wakeup only
//!   queues the endpoint (a mutex of its own, never the controller's)
//!   and calls the kick, which must not lock the controller either: it
//!   should arm a `devices::timer` timer with zero delay (or signal an
//!   event loop) whose callback locks the function and calls
//!   [`Xhci::process_wakeups`].
//! - Attaches devices with [`Xhci::attach`] (root connector 0-based, the
//!   `port=` property minus one; SuperSpeed devices go to the USB 3 port
//!   of the connector) and [`Xhci::detach`] (hotplug: a port status
//!   change event), and calls [`Xhci::reset`] on a system reset.
//!
//! # Limits (documented, not hidden)
//! No isochronous transfers (Isoch TRBs are a TRB Error), no hubs (a
//! route string other than 0 finds no device), interrupt moderation is
//! not applied, one MSI message (the MSI capability offers one vector),
//! streams use linear Primary Stream Context Arrays only (each stream
//! keeps its own NAK state).

pub mod context;
pub mod event;
pub mod fuzz;
pub mod regs;
pub mod ring;
#[cfg(test)]
mod tests;
pub mod trb;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use vm_memory::GuestAddress;

use super::setup::SetupPacket;
use super::{
    best_speed, DataError, Dir, Endpoint, GuestData, PacketData, Speed, UsbDevice, UsbResult,
    VecData, Wakeup,
};
use crate::bus::lock;
use crate::clock::Clock;
use crate::dma::{self, GuestSgList};
use crate::irq::IrqLine;
use crate::pci::msi::Msi;
use crate::pci::msix::{MsiSender, Msix};
use crate::pci::{BarKind, PciConfig, PciFunction};
use crate::GuestMem;
use context::{slot, slot_state, EpContext, EpState, EpType, InputControl, StreamContext};
use event::{Interrupter, Posted};
use regs::*;
use ring::{Ring, RingError, TdTrb};
use trb::{Buffer, Cc, Command, Event, TransferTrb};

/// BAR0: every register, the MSI-X table and its PBA.
pub const BAR_MMIO: usize = 0;
/// Serial bus controller, USB, xHCI.
const CLASS: u32 = 0x0c_03_30;
const CMD_BUS_MASTER: u16 = 1 << 2;
const CMD_INTX_DISABLE: u16 = 1 << 10;
/// Where QEMU puts its MSI and MSI-X capabilities.
const MSI_CAP: u16 = 0x70;
const MSIX_CAP: u16 = 0x90;

/// Commands run per doorbell at most; the rest wait for the next ring.
pub const MAX_COMMANDS: u32 = 1024;
/// TDs one endpoint runs per doorbell (or wakeup) at most: a ring that
/// loops back on itself without toggling the cycle is real work for
/// ever, so the walk stops there until the next doorbell.
pub const MAX_TDS_PER_KICK: u32 = 256;
/// Calls into a device for one TD at most (each moves at least a byte).
const MAX_CALLS_PER_TD: u32 = 1 << 16;

/// Which controller QEMU models.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Model {
    /// `qemu-xhci`: Red Hat 1b36:000d, revision 1.
    Qemu,
    /// `nec-usb-xhci`: NEC 1033:0194, revision 3.
    Nec,
}

/// The device's properties.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XhciOptions {
    pub model: Model,
    /// USB 2 ports (`p2=`, at most 15).
    pub p2: usize,
    /// USB 3 ports (`p3=`, at most 15).
    pub p3: usize,
    pub msi: bool,
    pub msix: bool,
    /// Interrupters (`intrs=`, 1..=16).
    pub intrs: usize,
    /// Device slots (`slots=`, 1..=64).
    pub slots: usize,
    /// The USB 3 ports come first (`superspeed-ports-first`, QEMU 7.2's
    /// layout for both models); else the USB 2 ports do.
    pub ss_first: bool,
}

impl XhciOptions {
    /// `qemu-xhci`'s defaults: MSI off, MSI-X on.
    pub fn qemu() -> Self {
        XhciOptions {
            model: Model::Qemu,
            p2: 4,
            p3: 4,
            msi: false,
            msix: true,
            intrs: MAX_INTRS,
            slots: MAX_SLOTS,
            ss_first: true,
        }
    }

    /// `nec-usb-xhci`'s defaults: MSI and MSI-X on.
    pub fn nec() -> Self {
        XhciOptions {
            model: Model::Nec,
            msi: true,
            ..Self::qemu()
        }
    }

    /// The index of the first USB 2 port.
    pub fn usb2_base(&self) -> usize {
        if self.ss_first {
            self.p3
        } else {
            0
        }
    }

    /// The index of the first USB 3 port.
    pub fn usb3_base(&self) -> usize {
        if self.ss_first {
            0
        } else {
            self.p2
        }
    }

    fn checked(mut self) -> Result<Self, String> {
        if self.p2 > MAX_PORTS_2 || self.p3 > MAX_PORTS_3 {
            return Err(format!(
                "xhci: p2 (at most {MAX_PORTS_2}) and p3 (at most {MAX_PORTS_3}) out of range"
            ));
        }
        if self.p2 + self.p3 == 0 {
            return Err("xhci: needs at least one port".into());
        }
        if !(1..=MAX_INTRS).contains(&self.intrs) || !(1..=MAX_SLOTS).contains(&self.slots) {
            return Err(format!(
                "xhci: intrs must be 1..={MAX_INTRS} and slots 1..={MAX_SLOTS}"
            ));
        }
        self.intrs = self.intrs.clamp(1, MAX_INTRS);
        Ok(self)
    }
}

/// The kick the vmm registers ([`Xhci::set_kick`]).
pub type Kick = Arc<dyn Fn() + Send + Sync>;

/// Endpoints woken by their devices, waiting for
/// [`Xhci::process_wakeups`]: (port index, endpoint).
#[derive(Default)]
struct WakeQueue {
    pending: Mutex<Vec<(usize, Endpoint)>>,
    kick: Mutex<Option<Kick>>,
}

impl WakeQueue {
    fn wake(&self, port: usize, ep: Endpoint) {
        {
            let mut p = lock(&self.pending);
            // Bounded: one entry per (port, endpoint).
            if !p.contains(&(port, ep)) {
                p.push((port, ep));
            }
        }
        let kick = lock(&self.kick).clone();
        if let Some(k) = kick {
            k();
        }
    }
}

struct Port {
    /// PORTSC as the driver reads it.
    portsc: u32,
    usb3: bool,
    dev: Option<Box<dyn UsbDevice>>,
}

/// A transfer endpoint's state beyond its context.
struct Ep {
    state: EpState,
    ty: EpType,
    max_packet: u16,
    /// The ring (without streams).
    ring: Ring,
    /// With streams: the Primary Stream Context Array and its entries.
    streams: Option<(u64, u32)>,
    /// Bytes already moved of the TD at each stream's dequeue pointer
    /// (stream 0 without streams): a partial answer before a NAK.
    progress: BTreeMap<u16, usize>,
    /// Streams whose TD was NAKed, retried on a wakeup.
    waiting: BTreeSet<u16>,
}

impl Ep {
    fn from_ctx(c: &EpContext) -> Option<Ep> {
        let ty = c.ty?;
        let streams = if c.max_pstreams > 0 {
            Some((c.dequeue, 1u32 << (c.max_pstreams as u32 + 1)))
        } else {
            None
        };
        Some(Ep {
            state: EpState::Running,
            ty,
            max_packet: c.max_packet,
            ring: Ring::new(c.dequeue, c.dcs),
            streams,
            progress: BTreeMap::new(),
            waiting: BTreeSet::new(),
        })
    }
}

#[derive(Default)]
struct Slot {
    enabled: bool,
    state: u32,
    /// The port index (0-based) its device is on.
    port: Option<usize>,
    /// The output Device Context (from the DCBAA on Address Device).
    out: u64,
    /// By DCI (1..=31).
    eps: [Option<Box<Ep>>; 32],
}

/// How a TD ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TdEnd {
    /// The device NAKed: retried on its wakeup.
    Nak,
    /// Done: bytes moved and the completion (Success or an error).
    Done(usize, Cc),
}

/// What a TD asks for, parsed from its TRBs.
enum Plan {
    Control {
        setup: SetupPacket,
        data: GuestSgList,
    },
    Data {
        data: GuestSgList,
    },
    /// Only No Op and Event Data TRBs.
    Nothing,
}

/// A window of a [`PacketData`] from `off` on: what is left of a TD
/// after a partial answer.
struct Window<'a> {
    inner: GuestData<'a>,
    off: usize,
}

impl PacketData for Window<'_> {
    fn len(&self) -> usize {
        self.inner.len().saturating_sub(self.off)
    }
    fn copy_to_host(&mut self, offset: usize, data: &[u8]) -> Result<(), DataError> {
        let at = offset.checked_add(self.off).ok_or(DataError)?;
        self.inner.copy_to_host(at, data)
    }
    fn copy_from_host(&self, offset: usize, buf: &mut [u8]) -> Result<(), DataError> {
        let at = offset.checked_add(self.off).ok_or(DataError)?;
        self.inner.copy_from_host(at, buf)
    }
}

/// The endpoint a DCI names (1: the default control endpoint).
fn dci_endpoint(dci: u8) -> Endpoint {
    if dci <= 1 {
        Endpoint::new(0, Dir::Out)
    } else {
        let dir = if dci & 1 == 1 { Dir::In } else { Dir::Out };
        Endpoint::new(dci / 2, dir)
    }
}

/// The DCI of an endpoint.
fn endpoint_dci(ep: Endpoint) -> u8 {
    match (ep.number(), ep.dir()) {
        (0, _) => 1,
        (n, Dir::Out) => n * 2,
        (n, Dir::In) => n * 2 + 1,
    }
}

fn speed_code(s: Speed) -> u32 {
    match s {
        Speed::Low => speed::LOW,
        Speed::Full => speed::FULL,
        Speed::High => speed::HIGH,
        Speed::Super => speed::SUPER,
    }
}

/// The xHCI as a PCI function (see the module doc for the vmm's part).
pub struct Xhci {
    config: PciConfig,
    opts: XhciOptions,
    mem: Arc<GuestMem>,
    intx: Arc<dyn IrqLine>,
    msi_sender: Arc<dyn MsiSender>,
    msi: Option<Msi>,
    msix: Option<Msix>,
    clock: Arc<dyn Clock>,
    usbcmd: u32,
    usbsts: u32,
    dnctrl: u32,
    /// CRCR's RCS and the pointer as written; CRR separately.
    crcr: u64,
    crr: bool,
    cmd_ring: Ring,
    dcbaap: u64,
    config_reg: u32,
    ports: Vec<Port>,
    /// Index 0 unused: slot ids count from 1.
    slots: Vec<Slot>,
    intrs: Vec<Interrupter>,
    mfindex_start: u64,
    wake: Arc<WakeQueue>,
    intx_level: bool,
}

impl Xhci {
    pub fn new(
        mem: Arc<GuestMem>,
        intx: Arc<dyn IrqLine>,
        msi_sender: Arc<dyn MsiSender>,
        clock: Arc<dyn Clock>,
        opts: XhciOptions,
    ) -> Result<Xhci, String> {
        let opts = opts.checked()?;
        let (vendor, device, rev) = match opts.model {
            Model::Qemu => (0x1b36, 0x000d, 0x01),
            Model::Nec => (0x1033, 0x0194, 0x03),
        };
        let mut config = PciConfig::new(vendor, device, CLASS, rev);
        config.add_bar(BAR_MMIO, BarKind::Mem64, BAR_SIZE);
        config.set_interrupt_pin(1);
        config.set_subsystem(0x1af4, 0x1100);
        config.set_u8(0x0c, 0x10);
        // SBRN: USB 3.0; FLADJ: the default 60000 bit times per frame.
        config.set_u8(0x60, 0x30);
        config.set_u8(0x61, 0x20);
        let msi = if opts.msi {
            config.next_capability_at(MSI_CAP);
            Some(Msi::add_capability(&mut config))
        } else {
            None
        };
        let msix = if opts.msix {
            let mut m = Msix::new(opts.intrs as u16);
            config.next_capability_at(MSIX_CAP);
            m.add_capability(
                &mut config,
                BAR_MMIO as u8,
                MSIX_TABLE as u32,
                BAR_MMIO as u8,
                MSIX_PBA as u32,
            );
            Some(m)
        } else {
            None
        };
        let ports = (0..opts.p2 + opts.p3)
            .map(|i| Port {
                portsc: portsc::PP | pls::RX_DETECT << portsc::PLS_SHIFT,
                usb3: (opts.usb3_base()..opts.usb3_base() + opts.p3).contains(&i),
                dev: None,
            })
            .collect();
        let mut x = Xhci {
            config,
            opts,
            mem,
            intx,
            msi_sender,
            msi,
            msix,
            clock,
            usbcmd: 0,
            usbsts: sts::HCH,
            dnctrl: 0,
            crcr: 0,
            crr: false,
            cmd_ring: Ring::default(),
            dcbaap: 0,
            config_reg: 0,
            ports,
            slots: (0..=opts.slots).map(|_| Slot::default()).collect(),
            intrs: (0..opts.intrs).map(|_| Interrupter::new()).collect(),
            mfindex_start: 0,
            wake: Arc::new(WakeQueue::default()),
            intx_level: false,
        };
        x.hc_reset();
        Ok(x)
    }

    pub fn options(&self) -> &XhciOptions {
        &self.opts
    }

    /// Registers the kick that gets [`Xhci::process_wakeups`] called (see
    /// the module doc). It runs on any thread, possibly while the
    /// controller's lock is held: it must not lock the controller.
    pub fn set_kick(&mut self, kick: Kick) {
        *lock(&self.wake.kick) = Some(kick);
    }

    /// True when woken endpoints wait for [`Xhci::process_wakeups`].
    pub fn wakeups_pending(&self) -> bool {
        !lock(&self.wake.pending).is_empty()
    }

    /// Retries the endpoints whose devices called their wakeup since the
    /// last call: each one's NAKed TD runs again (and the ring on).
    pub fn process_wakeups(&mut self) {
        let woken: Vec<(usize, Endpoint)> = std::mem::take(&mut *lock(&self.wake.pending));
        for (port, ep) in woken {
            let dci = endpoint_dci(ep);
            let Some(id) = (1..self.slots.len())
                .find(|&i| self.slots[i].enabled && self.slots[i].port == Some(port))
            else {
                continue;
            };
            let streams: Vec<u16> = match self.slots[id].eps[dci as usize].as_deref() {
                Some(e) if e.state == EpState::Running => e.waiting.iter().copied().collect(),
                _ => continue,
            };
            for s in streams {
                self.run_endpoint(id, dci, s);
            }
        }
    }

    /// Attaches `dev` to root connector `index` (0-based): the USB 3
    /// port of that connector if the device runs at SuperSpeed and the
    /// connector has one, else its USB 2 port at the fastest speed both
    /// support. Returns the port number (1-based) the driver sees.
    pub fn attach(&mut self, index: usize, mut dev: Box<dyn UsbDevice>) -> Result<u8, String> {
        let (p2, p3) = (self.opts.p2, self.opts.p3);
        if index >= p2.max(p3) {
            return Err(format!("xhci has no port {} (1-{})", index + 1, p2.max(p3)));
        }
        let (b2, b3) = (self.opts.usb2_base(), self.opts.usb3_base());
        let busy = |p: Option<&Port>| p.is_some_and(|p| p.dev.is_some());
        if busy(self.ports.get(b2 + index).filter(|_| index < p2))
            || busy(self.ports.get(b3 + index).filter(|_| index < p3))
        {
            return Err(format!("xhci port {} is in use", index + 1));
        }
        let (port, speed) = if index < p3 && dev.speeds().contains(&Speed::Super) {
            (b3 + index, Speed::Super)
        } else if index < p2 {
            let s = best_speed(dev.speeds(), &[Speed::Low, Speed::Full, Speed::High])
                .ok_or("the device cannot run at a USB 2 speed")?;
            (b2 + index, s)
        } else {
            return Err(format!(
                "xhci port {} has only a USB 3 connection, which the device cannot use",
                index + 1
            ));
        };
        dev.set_speed(speed);
        dev.reset();
        let q = self.wake.clone();
        let wake: Wakeup = Arc::new(move |ep: Endpoint| q.wake(port, ep));
        dev.set_wakeup(Some(wake));
        self.ports[port].dev = Some(dev);
        self.port_update(port);
        Ok(port as u8 + 1)
    }

    /// Detaches the device on root connector `index` (hot-unplug): the
    /// port reports the disconnect, and a slot using it fails its
    /// transfers from now on.
    pub fn detach(&mut self, index: usize) -> Option<Box<dyn UsbDevice>> {
        let (p2, p3) = (self.opts.p2, self.opts.p3);
        let (b2, b3) = (self.opts.usb2_base(), self.opts.usb3_base());
        let port = [
            (index < p2).then_some(b2 + index),
            (index < p3).then_some(b3 + index),
        ]
        .into_iter()
        .flatten()
        .find(|&p| self.ports.get(p).is_some_and(|p| p.dev.is_some()))?;
        let mut dev = self.ports[port].dev.take()?;
        dev.set_wakeup(None);
        for s in self.slots.iter_mut().skip(1) {
            if s.port == Some(port) {
                s.port = None;
                for e in s.eps.iter_mut().flatten() {
                    e.progress.clear();
                    e.waiting.clear();
                }
            }
        }
        self.port_update(port);
        Some(dev)
    }

    /// A system reset: the controller, the function's MSI-X state, and
    /// the devices on the ports (a bus reset).
    pub fn reset(&mut self) {
        if let Some(m) = self.msix.as_mut() {
            m.reset();
        }
        for p in &mut self.ports {
            if let Some(d) = p.dev.as_mut() {
                d.reset();
            }
        }
        self.hc_reset();
    }

    /// USBCMD.HCRST (4.2): registers to their defaults, slots disabled,
    /// event rings forgotten; attached devices are seen as new connects.
    fn hc_reset(&mut self) {
        self.usbcmd = 0;
        self.usbsts = sts::HCH;
        self.dnctrl = 0;
        self.crcr = 0;
        self.crr = false;
        self.cmd_ring = Ring::default();
        self.dcbaap = 0;
        self.config_reg = 0;
        for s in self.slots.iter_mut() {
            *s = Slot::default();
        }
        for i in self.intrs.iter_mut() {
            *i = Interrupter::new();
        }
        lock(&self.wake.pending).clear();
        // Ports start over; a device still attached is a new connect
        // (QEMU sets CSC on every port here; only connected ones
        // changed).
        for p in 0..self.ports.len() {
            self.ports[p].portsc = portsc::PP | pls::RX_DETECT << portsc::PLS_SHIFT;
            if self.ports[p].dev.is_some() {
                self.port_update(p);
            }
        }
        self.update_intx();
    }

    fn running(&self) -> bool {
        self.usbsts & sts::HCH == 0
    }

    fn dma_enabled(&self) -> bool {
        self.config.command() & CMD_BUS_MASTER != 0
    }

    // ---- ports (4.19, 5.4.8) ----

    /// PORTSC after a connect or disconnect, as QEMU sets it: a USB 3
    /// port enables itself (U0), a USB 2 port waits for a reset (Polling).
    fn port_update(&mut self, i: usize) {
        let p = &mut self.ports[i];
        let mut v = portsc::PP | (p.portsc & (portsc::CHANGES | portsc::WAKE));
        let mut link = pls::RX_DETECT;
        if let Some(d) = &p.dev {
            v |= portsc::CCS | speed_code(d.speed()) << portsc::SPEED_SHIFT;
            if p.usb3 {
                v |= portsc::PED;
                link = pls::U0;
            } else {
                link = pls::POLLING;
            }
        }
        p.portsc = v | link << portsc::PLS_SHIFT;
        self.port_notify(i, portsc::CSC);
    }

    /// Sets change bits; a 0-to-1 change while running posts a Port
    /// Status Change Event (4.19.2) and sets USBSTS.PCD.
    fn port_notify(&mut self, i: usize, bits: u32) {
        let p = &mut self.ports[i];
        if p.portsc & bits == bits {
            return;
        }
        p.portsc |= bits;
        if !self.running() {
            return;
        }
        self.usbsts |= sts::PCD;
        self.post(0, Event::PortStatusChange { port: i as u8 + 1 }, false);
    }

    /// Port reset (4.19.5): the device sees a bus reset; the port comes
    /// out enabled in U0 with PRC (and WRC for a warm reset).
    fn port_reset(&mut self, i: usize, warm: bool) {
        let p = &mut self.ports[i];
        let Some(d) = p.dev.as_mut() else {
            return;
        };
        d.reset();
        if warm && p.usb3 {
            p.portsc |= portsc::WRC;
        }
        p.portsc = (p.portsc & !(portsc::PLS_MASK | portsc::PR))
            | portsc::PED
            | pls::U0 << portsc::PLS_SHIFT;
        // A reset device forgets what slots did with it.
        for s in self.slots.iter_mut().skip(1) {
            if s.port == Some(i) {
                for e in s.eps.iter_mut().flatten() {
                    e.progress.clear();
                    e.waiting.clear();
                }
            }
        }
        self.port_notify(i, portsc::PRC);
    }

    fn write_portsc(&mut self, i: usize, v: u32) {
        let usb3 = self.ports[i].usb3;
        if v & portsc::WPR != 0 && usb3 {
            self.port_reset(i, true);
            return;
        }
        if v & portsc::PR != 0 {
            self.port_reset(i, false);
            return;
        }
        let mut s = self.ports[i].portsc;
        s &= !(v & portsc::CHANGES);
        // PED is write-1-to-disable, for USB 2 ports (5.4.8).
        if v & portsc::PED != 0 && !usb3 {
            s &= !portsc::PED;
        }
        let mut notify = 0;
        if v & portsc::LWS != 0 {
            let old = (s & portsc::PLS_MASK) >> portsc::PLS_SHIFT;
            let new = (v & portsc::PLS_MASK) >> portsc::PLS_SHIFT;
            match new {
                pls::U0 if old != pls::U0 => {
                    s = (s & !portsc::PLS_MASK) | new << portsc::PLS_SHIFT;
                    notify = portsc::PLC;
                }
                pls::U3 if old < pls::U3 => {
                    s = (s & !portsc::PLS_MASK) | new << portsc::PLS_SHIFT;
                }
                _ => {}
            }
        }
        s = (s & !(portsc::PP | portsc::WAKE)) | (v & (portsc::PP | portsc::WAKE));
        self.ports[i].portsc = s;
        if notify != 0 {
            self.port_notify(i, notify);
        }
    }

    // ---- interrupts (4.17) ----

    /// Posts `ev` on interrupter `v` (0 if out of range) and signals it
    /// unless `bei`. An event ring the guest broke halts the controller
    /// with HSE.
    fn post(&mut self, v: usize, ev: Event, bei: bool) {
        if !self.running() {
            return;
        }
        let v = if v < self.intrs.len() { v } else { 0 };
        if !self.dma_enabled() {
            self.host_system_error();
            return;
        }
        match self.intrs[v].post(&self.mem, &ev) {
            Err(_) => {
                log::debug!("xhci: event ring {v} unusable: host system error");
                self.host_system_error();
            }
            Ok(Posted::Full) => self.interrupt(v),
            Ok(Posted::Yes) => {
                if !bei {
                    self.interrupt(v);
                }
            }
        }
    }

    /// An event for interrupter `v` wants attention: IP and EHB set, and
    /// a message or INTx if the driver allows it.
    fn interrupt(&mut self, v: usize) {
        let send = self.intrs[v].assert();
        self.usbsts |= sts::EINT;
        if send && self.usbcmd & cmd::INTE != 0 {
            self.signal(v);
        }
        self.update_intx();
    }

    /// Sends interrupter `v`'s message: MSI-X vector `v`, or the MSI
    /// message; with neither, INTx follows IP of interrupter 0.
    fn signal(&mut self, v: usize) {
        if let Some(m) = self.msix.as_mut() {
            if m.enabled() {
                m.notify(v as u16, self.msi_sender.as_ref());
                return;
            }
        }
        if let Some(msi) = &self.msi {
            if let Some((addr, data)) = msi.message(&self.config) {
                self.msi_sender.send(addr, data);
            }
        }
    }

    fn messages_enabled(&self) -> bool {
        self.msix.as_ref().is_some_and(|m| m.enabled())
            || self
                .msi
                .as_ref()
                .is_some_and(|m| m.message(&self.config).is_some())
    }

    fn update_intx(&mut self) {
        let i0 = &self.intrs[0];
        let level = !self.messages_enabled()
            && self.config.command() & CMD_INTX_DISABLE == 0
            && self.usbcmd & cmd::INTE != 0
            && i0.ip()
            && i0.ie();
        if level != self.intx_level {
            self.intx_level = level;
            self.intx.set_level(level);
        }
    }

    fn host_system_error(&mut self) {
        self.usbsts |= sts::HSE | sts::HCH;
        self.usbcmd &= !cmd::RS;
        self.crr = false;
    }

    // ---- registers (chapter 5) ----

    fn read_dword(&mut self, off: u64) -> u32 {
        match off {
            0..=0x3f => cap_read(off, &self.opts),
            o if (OPER..PORT_REGS).contains(&o) => self.read_op(o - OPER),
            o if (PORT_REGS..RUNTIME).contains(&o) => {
                let i = ((o - PORT_REGS) / PORT_REGS_LEN) as usize;
                match self.ports.get(i) {
                    Some(p) if (o - PORT_REGS).is_multiple_of(PORT_REGS_LEN) => p.portsc,
                    _ => 0,
                }
            }
            o if (RUNTIME..DOORBELL).contains(&o) => {
                let r = o - RUNTIME;
                if r == rt::MFINDEX {
                    return self.mfindex();
                }
                match r
                    .checked_sub(rt::IR0)
                    .map(|x| ((x / rt::IR_LEN) as usize, x % rt::IR_LEN))
                {
                    Some((i, reg)) if i < self.intrs.len() => self.intrs[i].read(reg),
                    _ => 0,
                }
            }
            _ => 0,
        }
    }

    fn mfindex(&self) -> u32 {
        if !self.running() {
            return 0;
        }
        let t = self.clock.now_ns().saturating_sub(self.mfindex_start);
        ((t / 125_000) & 0x3fff) as u32
    }

    fn read_op(&self, r: u64) -> u32 {
        match r {
            op::USBCMD => self.usbcmd,
            op::USBSTS => self.usbsts,
            op::PAGESIZE => 1,
            op::DNCTRL => self.dnctrl,
            // The pointer reads as 0 (5.4.5); CRR tells whether it runs.
            op::CRCR_LO if self.crr => crcr::CRR as u32,
            op::CRCR_LO => 0,
            op::DCBAAP_LO => self.dcbaap as u32,
            op::DCBAAP_HI => (self.dcbaap >> 32) as u32,
            op::CONFIG => self.config_reg,
            _ => 0,
        }
    }

    fn write_dword(&mut self, off: u64, v: u32) {
        match off {
            o if (OPER..PORT_REGS).contains(&o) => self.write_op(o - OPER, v),
            o if (PORT_REGS..RUNTIME).contains(&o) => {
                let i = ((o - PORT_REGS) / PORT_REGS_LEN) as usize;
                if (o - PORT_REGS).is_multiple_of(PORT_REGS_LEN) && i < self.ports.len() {
                    self.write_portsc(i, v);
                }
            }
            o if (RUNTIME + rt::IR0..DOORBELL).contains(&o) => {
                let x = o - RUNTIME - rt::IR0;
                let (i, reg) = ((x / rt::IR_LEN) as usize, x % rt::IR_LEN);
                if i < self.intrs.len() {
                    if self.intrs[i].write(&self.mem, reg, v) {
                        self.interrupt(i);
                    }
                    self.update_intx();
                }
            }
            o if (DOORBELL..MSIX_TABLE).contains(&o) && o.is_multiple_of(4) => {
                self.doorbell(((o - DOORBELL) / 4) as usize, v);
            }
            _ => {}
        }
    }

    fn write_op(&mut self, r: u64, v: u32) {
        match r {
            op::USBCMD => self.write_usbcmd(v),
            op::USBSTS => {
                self.usbsts &= !(v & sts::W1C);
                self.update_intx();
            }
            op::DNCTRL => self.dnctrl = v & 0xffff,
            op::CRCR_LO | op::CRCR_HI => {
                let v = v as u64;
                if self.crr {
                    // While running only CS and CA act (4.6.1.2): the
                    // ring stops after the current command, which here
                    // is already done.
                    if r == op::CRCR_LO && v & (crcr::CS | crcr::CA) != 0 {
                        self.crr = false;
                        let ptr = self.cmd_ring.dequeue;
                        self.post(
                            0,
                            Event::CommandCompletion {
                                ptr,
                                cc: Cc::CommandRingStopped,
                                slot: 0,
                            },
                            false,
                        );
                    }
                    return;
                }
                self.crcr = if r == op::CRCR_LO {
                    (self.crcr & !0xffff_ffff) | (v & (crcr::PTR_MASK | crcr::RCS) & 0xffff_ffff)
                } else {
                    (self.crcr & 0xffff_ffff) | v << 32
                };
                self.cmd_ring = Ring::new(self.crcr & crcr::PTR_MASK, self.crcr & crcr::RCS != 0);
            }
            op::DCBAAP_LO => self.dcbaap = (self.dcbaap & !0xffff_ffff) | (v as u64 & !0x3f),
            op::DCBAAP_HI => self.dcbaap = (self.dcbaap & 0xffff_ffff) | (v as u64) << 32,
            op::CONFIG => self.config_reg = v & 0x3ff,
            _ => {}
        }
    }

    fn write_usbcmd(&mut self, v: u32) {
        if v & cmd::HCRST != 0 {
            self.hc_reset();
            return;
        }
        let was = self.usbcmd & cmd::RS != 0;
        self.usbcmd = v & cmd::STORED;
        if v & cmd::RS != 0 && !was {
            self.usbsts &= !(sts::HCH | sts::HSE);
            self.mfindex_start = self.clock.now_ns();
        } else if v & cmd::RS == 0 && was {
            self.usbsts |= sts::HCH;
            self.crr = false;
        }
        // Save/restore state (4.23.2): nothing to save; a restore has
        // nothing to restore from, which SRE reports, as QEMU does.
        if v & cmd::CSS != 0 {
            self.usbsts &= !sts::SRE;
        }
        if v & cmd::CRS != 0 {
            self.usbsts |= sts::SRE;
        }
        self.update_intx();
    }

    fn doorbell(&mut self, index: usize, v: u32) {
        if !self.running() || index >= self.slots.len() {
            return;
        }
        if !self.dma_enabled() {
            self.host_system_error();
            return;
        }
        let target = (v & 0xff) as u8;
        if index == 0 {
            if target == 0 {
                self.process_commands();
            }
            return;
        }
        if !(1..=31).contains(&target) {
            return;
        }
        let stream = (v >> 16) as u16;
        let Some(ep) = self.slots[index].eps[target as usize].as_deref_mut() else {
            return;
        };
        // A doorbell restarts a stopped endpoint (4.6.9); a halted one
        // waits for Reset Endpoint.
        match ep.state {
            EpState::Running => {}
            EpState::Stopped => ep.state = EpState::Running,
            _ => return,
        }
        if self.slots[index].enabled {
            self.run_endpoint(index, target, stream);
        }
    }

    // ---- the command ring (4.6) ----

    fn process_commands(&mut self) {
        self.crr = true;
        for _ in 0..MAX_COMMANDS {
            if !self.running() || !self.crr {
                return;
            }
            match self.cmd_ring.next(&self.mem) {
                Ok(None) => return,
                Err(e) => {
                    // A broken command ring (outside RAM, a link loop):
                    // the command fails and the ring stops.
                    self.crr = false;
                    self.post(
                        0,
                        Event::CommandCompletion {
                            ptr: e.addr(),
                            cc: Cc::Trb,
                            slot: 0,
                        },
                        false,
                    );
                    return;
                }
                Ok(Some((addr, raw))) => {
                    let c = Command::parse(&raw);
                    let (cc, slot) = self.run_command(c);
                    self.post(
                        0,
                        Event::CommandCompletion {
                            ptr: addr,
                            cc,
                            slot,
                        },
                        false,
                    );
                }
            }
        }
    }

    /// Carries out one command: its completion code and the slot id its
    /// event names.
    fn run_command(&mut self, c: Command) -> (Cc, u8) {
        log::trace!("xhci: command {c:?}");
        match c {
            Command::NoOp => (Cc::Success, 0),
            Command::EnableSlot { .. } => self.enable_slot(),
            Command::DisableSlot { slot } => (self.disable_slot(slot), slot),
            Command::AddressDevice { slot, input, bsr } => {
                (self.address_device(slot, input, bsr), slot)
            }
            Command::ConfigureEndpoint {
                slot,
                input,
                deconfigure,
            } => (self.configure_endpoint(slot, input, deconfigure), slot),
            Command::EvaluateContext { slot, input } => (self.evaluate_context(slot, input), slot),
            Command::ResetEndpoint { slot, ep, .. } => (self.reset_endpoint(slot, ep), slot),
            Command::StopEndpoint { slot, ep, .. } => (self.stop_endpoint(slot, ep), slot),
            Command::SetTrDequeue {
                slot,
                ep,
                stream,
                dequeue,
                dcs,
                sct,
            } => (
                self.set_tr_dequeue(slot, ep, stream, dequeue, dcs, sct),
                slot,
            ),
            Command::ResetDevice { slot } => (self.reset_device(slot), slot),
            Command::Link { .. } | Command::Unsupported { .. } => (Cc::Trb, 0),
        }
    }

    /// The slot a command names, enabled.
    fn slot_id(&self, id: u8) -> Result<usize, Cc> {
        let i = id as usize;
        if i == 0 || i >= self.slots.len() {
            return Err(Cc::Trb);
        }
        if !self.slots[i].enabled {
            return Err(Cc::SlotNotEnabled);
        }
        Ok(i)
    }

    fn read_ctx(&self, addr: Option<u64>) -> Result<context::Raw, Cc> {
        addr.and_then(|a| context::read_ctx(&self.mem, a))
            .ok_or(Cc::Trb)
    }

    fn write_ctx(&self, addr: Option<u64>, r: &context::Raw) -> Result<(), Cc> {
        addr.and_then(|a| context::write_ctx(&self.mem, a, r))
            .ok_or(Cc::Trb)
    }

    fn out_ctx(&self, id: usize, dci: u8) -> Option<u64> {
        context::output_ctx_addr(self.slots[id].out, dci)
    }

    fn enable_slot(&mut self) -> (Cc, u8) {
        let max = ((self.config_reg & 0xff) as usize).min(self.slots.len() - 1);
        match (1..=max).find(|&i| !self.slots[i].enabled) {
            Some(i) => {
                self.slots[i] = Slot {
                    enabled: true,
                    state: slot_state::DISABLED_ENABLED,
                    ..Default::default()
                };
                (Cc::Success, i as u8)
            }
            None => (Cc::NoSlots, 0),
        }
    }

    fn disable_slot(&mut self, id: u8) -> Cc {
        match self.slot_id(id) {
            Ok(i) => {
                self.slots[i] = Slot::default();
                Cc::Success
            }
            Err(cc) => cc,
        }
    }

    fn address_device(&mut self, id: u8, input: u64, bsr: bool) -> Cc {
        match self.try_address_device(id, input, bsr) {
            Ok(()) => Cc::Success,
            Err(cc) => cc,
        }
    }

    fn try_address_device(&mut self, id: u8, input: u64, bsr: bool) -> Result<(), Cc> {
        let i = self.slot_id(id)?;
        // 4.6.5: from Enabled, or from Default without BSR.
        match self.slots[i].state {
            slot_state::DISABLED_ENABLED => {}
            slot_state::DEFAULT if !bsr => {}
            _ => return Err(Cc::ContextState),
        }
        let ictl = InputControl::parse(&self.read_ctx(Some(input))?);
        if ictl.drop != 0 || ictl.add != 0x3 {
            return Err(Cc::Trb);
        }
        let mut sctx = self.read_ctx(context::input_ctx_addr(input, 0))?;
        let mut ep0 = self.read_ctx(context::input_ctx_addr(input, 1))?;
        let e = EpContext::parse(&ep0);
        if e.ty != Some(EpType::Control) {
            return Err(Cc::Parameter);
        }
        let entry = self.dcbaap.checked_add(8 * i as u64).ok_or(Cc::Trb)?;
        let mut b = [0u8; 8];
        dma::read_ram(&self.mem, GuestAddress(entry), &mut b).map_err(|_| Cc::Trb)?;
        let out = u64::from_le_bytes(b) & !0x3f;
        // The device: on the root port the slot names (no hubs).
        let rp = slot::root_port(&sctx) as usize;
        let port = rp
            .checked_sub(1)
            .filter(|&p| p < self.ports.len() && slot::route_string(&sctx) == 0)
            .filter(|&p| self.ports[p].dev.is_some())
            .ok_or(Cc::UsbTransaction)?;
        // Another slot on the same device is a driver bug.
        if (1..self.slots.len())
            .any(|j| j != i && self.slots[j].enabled && self.slots[j].port == Some(port))
        {
            return Err(Cc::Trb);
        }
        let speed = self.ports[port]
            .dev
            .as_ref()
            .map_or(0, |d| speed_code(d.speed()));
        let (state, address) = if bsr {
            (slot_state::DEFAULT, 0)
        } else {
            let setup = SetupPacket::parse(&[0x00, 5, id, 0, 0, 0, 0, 0]);
            let dev = self.ports[port].dev.as_mut().ok_or(Cc::UsbTransaction)?;
            match dev.handle_control(&setup, &mut VecData::new(0)) {
                UsbResult::Ack(_) => {}
                _ => return Err(Cc::UsbTransaction),
            }
            (slot_state::ADDRESSED, id)
        };
        slot::set_state(&mut sctx, state, address);
        if slot::context_entries(&sctx) == 0 {
            slot::set_context_entries(&mut sctx, 1);
        }
        if speed != 0 && (sctx[0] >> 20) & 0xf == 0 {
            slot::set_speed(&mut sctx, speed);
        }
        context::set_ep_state(&mut ep0, EpState::Running);
        self.write_ctx(context::output_ctx_addr(out, 0), &sctx)?;
        self.write_ctx(context::output_ctx_addr(out, 1), &ep0)?;
        let s = &mut self.slots[i];
        s.state = state;
        s.port = Some(port);
        s.out = out;
        s.eps = Default::default();
        s.eps[1] = Ep::from_ctx(&e).map(Box::new);
        if let Some(ep) = s.eps[1].as_deref_mut() {
            ep.streams = None;
        }
        Ok(())
    }

    fn configure_endpoint(&mut self, id: u8, input: u64, deconfigure: bool) -> Cc {
        match self.try_configure_endpoint(id, input, deconfigure) {
            Ok(()) => Cc::Success,
            Err(cc) => cc,
        }
    }

    fn try_configure_endpoint(&mut self, id: u8, input: u64, deconfigure: bool) -> Result<(), Cc> {
        let i = self.slot_id(id)?;
        if !matches!(
            self.slots[i].state,
            slot_state::ADDRESSED | slot_state::CONFIGURED
        ) {
            return Err(Cc::ContextState);
        }
        let mut sctx = self.read_ctx(self.out_ctx(i, 0))?;
        if deconfigure {
            for dci in 2..=31u8 {
                if self.slots[i].eps[dci as usize].take().is_some() {
                    let at = self.out_ctx(i, dci);
                    let mut r = self.read_ctx(at)?;
                    context::set_ep_state(&mut r, EpState::Disabled);
                    self.write_ctx(at, &r)?;
                }
            }
            let addr = sctx[3] as u8;
            slot::set_state(&mut sctx, slot_state::ADDRESSED, addr);
            slot::set_context_entries(&mut sctx, 1);
            self.write_ctx(self.out_ctx(i, 0), &sctx)?;
            self.slots[i].state = slot_state::ADDRESSED;
            return Ok(());
        }
        let ictl = InputControl::parse(&self.read_ctx(Some(input))?);
        if ictl.drop & 3 != 0 || ictl.add & 3 != 1 {
            return Err(Cc::Trb);
        }
        let in_slot = self.read_ctx(context::input_ctx_addr(input, 0))?;
        // Parse every added endpoint before changing anything.
        let mut added = Vec::new();
        for dci in 2..=31u8 {
            if ictl.add & (1 << dci) == 0 {
                continue;
            }
            let raw = self.read_ctx(context::input_ctx_addr(input, dci))?;
            let c = EpContext::parse(&raw);
            let ty = c.ty.ok_or(Cc::Parameter)?;
            if ty == EpType::Control || ty.is_in() != (dci & 1 == 1) {
                return Err(Cc::Parameter);
            }
            if c.max_pstreams as u32 > MAX_PSA_SIZE || (c.max_pstreams > 0 && !c.lsa) {
                return Err(Cc::Parameter);
            }
            let ep = Ep::from_ctx(&c).ok_or(Cc::Parameter)?;
            added.push((dci, raw, ep));
        }
        for dci in 2..=31u8 {
            if ictl.drop & (1 << dci) != 0 && self.slots[i].eps[dci as usize].take().is_some() {
                let at = self.out_ctx(i, dci);
                let mut r = self.read_ctx(at)?;
                context::set_ep_state(&mut r, EpState::Disabled);
                self.write_ctx(at, &r)?;
            }
        }
        for (dci, mut raw, ep) in added {
            context::set_ep_state(&mut raw, EpState::Running);
            self.write_ctx(self.out_ctx(i, dci), &raw)?;
            self.slots[i].eps[dci as usize] = Some(Box::new(ep));
        }
        let any = self.slots[i].eps[2..].iter().any(|e| e.is_some());
        let state = if any {
            slot_state::CONFIGURED
        } else {
            slot_state::ADDRESSED
        };
        slot::set_context_entries(&mut sctx, slot::context_entries(&in_slot));
        let addr = sctx[3] as u8;
        slot::set_state(&mut sctx, state, addr);
        self.write_ctx(self.out_ctx(i, 0), &sctx)?;
        self.slots[i].state = state;
        Ok(())
    }

    fn evaluate_context(&mut self, id: u8, input: u64) -> Cc {
        match self.try_evaluate_context(id, input) {
            Ok(()) => Cc::Success,
            Err(cc) => cc,
        }
    }

    fn try_evaluate_context(&mut self, id: u8, input: u64) -> Result<(), Cc> {
        let i = self.slot_id(id)?;
        if self.slots[i].state == slot_state::DISABLED_ENABLED {
            return Err(Cc::ContextState);
        }
        let ictl = InputControl::parse(&self.read_ctx(Some(input))?);
        if ictl.drop != 0 || ictl.add & !3 != 0 {
            return Err(Cc::Trb);
        }
        if ictl.add & 1 != 0 {
            let src = self.read_ctx(context::input_ctx_addr(input, 0))?;
            let at = self.out_ctx(i, 0);
            let mut r = self.read_ctx(at)?;
            // Max Exit Latency and the Interrupter Target (6.2.2.3).
            r[1] = (r[1] & !0xffff) | (src[1] & 0xffff);
            r[2] = (r[2] & 0x003f_ffff) | (src[2] & !0x003f_ffff);
            self.write_ctx(at, &r)?;
        }
        if ictl.add & 2 != 0 {
            let src = self.read_ctx(context::input_ctx_addr(input, 1))?;
            let at = self.out_ctx(i, 1);
            let mut r = self.read_ctx(at)?;
            r[1] = (r[1] & 0xffff) | (src[1] & 0xffff_0000);
            self.write_ctx(at, &r)?;
            if let Some(ep) = self.slots[i].eps[1].as_deref_mut() {
                ep.max_packet = (src[1] >> 16) as u16;
            }
        }
        Ok(())
    }

    /// The endpoint a command names.
    fn cmd_ep(&self, id: u8, dci: u8) -> Result<usize, Cc> {
        let i = self.slot_id(id)?;
        if !(1..=31).contains(&dci) {
            return Err(Cc::Trb);
        }
        if self.slots[i].eps[dci as usize].is_none() {
            return Err(Cc::EpNotEnabled);
        }
        Ok(i)
    }

    /// Records an endpoint's state (and its dequeue pointer, without
    /// streams) in the output context.
    fn sync_ep_ctx(&mut self, i: usize, dci: u8) {
        let Some(ep) = self.slots[i].eps[dci as usize].as_deref() else {
            return;
        };
        let (state, ring, streams) = (ep.state, ep.ring, ep.streams.is_some());
        let at = self.out_ctx(i, dci);
        if let Ok(mut r) = self.read_ctx(at) {
            context::set_ep_state(&mut r, state);
            if !streams {
                context::set_ep_dequeue(&mut r, ring.dequeue, ring.cycle);
            }
            let _ = self.write_ctx(at, &r);
        }
    }

    fn reset_endpoint(&mut self, id: u8, dci: u8) -> Cc {
        let i = match self.cmd_ep(id, dci) {
            Ok(i) => i,
            Err(cc) => return cc,
        };
        let Some(ep) = self.slots[i].eps[dci as usize].as_deref_mut() else {
            return Cc::EpNotEnabled;
        };
        if ep.state != EpState::Halted {
            return Cc::ContextState;
        }
        ep.state = EpState::Stopped;
        ep.progress.clear();
        ep.waiting.clear();
        self.sync_ep_ctx(i, dci);
        Cc::Success
    }

    fn stop_endpoint(&mut self, id: u8, dci: u8) -> Cc {
        let i = match self.cmd_ep(id, dci) {
            Ok(i) => i,
            Err(cc) => return cc,
        };
        let Some(ep) = self.slots[i].eps[dci as usize].as_deref_mut() else {
            return Cc::EpNotEnabled;
        };
        if ep.state != EpState::Running {
            return Cc::ContextState;
        }
        ep.state = EpState::Stopped;
        // A TD the device NAKed is interrupted: a Stopped event for it
        // (4.6.9), at the TRB the ring stands on.
        let stopped = if ep.waiting.contains(&0) && ep.streams.is_none() {
            Some(ep.ring.dequeue)
        } else {
            None
        };
        ep.waiting.clear();
        if let Some(ptr) = stopped {
            let len = ring::read_trb(&self.mem, ptr).map_or(0, |t| t.status & 0x1_ffff);
            let intr = 0;
            self.post(
                intr,
                Event::Transfer {
                    ptr,
                    cc: Cc::Stopped,
                    len,
                    event_data: false,
                    slot: id,
                    ep: dci,
                },
                false,
            );
        }
        self.sync_ep_ctx(i, dci);
        Cc::Success
    }

    fn set_tr_dequeue(
        &mut self,
        id: u8,
        dci: u8,
        stream: u16,
        dequeue: u64,
        dcs: bool,
        sct: u8,
    ) -> Cc {
        let i = match self.cmd_ep(id, dci) {
            Ok(i) => i,
            Err(cc) => return cc,
        };
        let mem = self.mem.clone();
        let Some(ep) = self.slots[i].eps[dci as usize].as_deref_mut() else {
            return Cc::EpNotEnabled;
        };
        if !matches!(ep.state, EpState::Stopped | EpState::Error) {
            return Cc::ContextState;
        }
        match ep.streams {
            Some((array, count)) => {
                if stream == 0 || stream as u32 >= count {
                    return Cc::InvalidStreamId;
                }
                if StreamContext::write(&mem, array, stream, dequeue, dcs, sct.max(1)).is_none() {
                    return Cc::Trb;
                }
                ep.progress.remove(&stream);
                ep.waiting.remove(&stream);
            }
            None => {
                ep.ring = Ring::new(dequeue, dcs);
                ep.progress.clear();
                ep.waiting.clear();
            }
        }
        self.sync_ep_ctx(i, dci);
        Cc::Success
    }

    fn reset_device(&mut self, id: u8) -> Cc {
        let i = match self.slot_id(id) {
            Ok(i) => i,
            Err(cc) => return cc,
        };
        if !matches!(
            self.slots[i].state,
            slot_state::ADDRESSED | slot_state::CONFIGURED
        ) {
            return Cc::ContextState;
        }
        let at = self.out_ctx(i, 0);
        let Ok(mut r) = self.read_ctx(at) else {
            return Cc::Trb;
        };
        for dci in 2..=31usize {
            self.slots[i].eps[dci] = None;
        }
        slot::set_state(&mut r, slot_state::DEFAULT, 0);
        slot::set_context_entries(&mut r, 1);
        if self.write_ctx(at, &r).is_err() {
            return Cc::Trb;
        }
        self.slots[i].state = slot_state::DEFAULT;
        Cc::Success
    }

    // ---- transfers (4.10) ----

    /// Runs endpoint `dci` of slot `id` (stream `stream`): its TDs in
    /// order until the ring is empty, a TD is NAKed, the endpoint halts,
    /// or [`MAX_TDS_PER_KICK`] TDs have run.
    fn run_endpoint(&mut self, id: usize, dci: u8, stream: u16) {
        for _ in 0..MAX_TDS_PER_KICK {
            if !self.running() {
                return;
            }
            let Some(ep) = self.slots[id].eps[dci as usize].as_deref() else {
                return;
            };
            if ep.state != EpState::Running {
                return;
            }
            let streams = ep.streams;
            let ring = match streams {
                None => ep.ring,
                Some((array, count)) => {
                    if stream == 0 || stream as u32 >= count {
                        return;
                    }
                    match StreamContext::read(&self.mem, array, stream) {
                        Some(s) if s.sct == 1 => Ring::new(s.dequeue, s.dcs),
                        _ => {
                            self.halt_ep(
                                id,
                                dci,
                                array.wrapping_add(stream as u64 * 16),
                                Cc::InvalidStreamType,
                                0,
                            );
                            return;
                        }
                    }
                }
            };
            let td = if ep.ty == EpType::Control {
                ring.read_control_td(&self.mem)
            } else {
                ring.read_td(&self.mem)
            };
            let (trbs, next) = match td {
                Ok(Some(td)) => td,
                Ok(None) => {
                    if let Some(ep) = self.slots[id].eps[dci as usize].as_deref_mut() {
                        ep.waiting.remove(&stream);
                    }
                    return;
                }
                Err(e) => {
                    log::debug!("xhci: slot {id} ep {dci}: {e:?}");
                    self.halt_ep(id, dci, e.addr(), Cc::Trb, 0);
                    return;
                }
            };
            let end = match self.plan_td(id, dci, &trbs) {
                Ok(plan) => self.run_td(id, dci, stream, plan),
                Err(e) => {
                    self.halt_ep(id, dci, e.addr(), Cc::Trb, 0);
                    return;
                }
            };
            let Some(ep) = self.slots[id].eps[dci as usize].as_deref_mut() else {
                return;
            };
            match end {
                TdEnd::Nak => {
                    ep.waiting.insert(stream);
                    return;
                }
                TdEnd::Done(n, cc) => {
                    ep.progress.remove(&stream);
                    ep.waiting.remove(&stream);
                    let failed = cc != Cc::Success;
                    if !failed {
                        match streams {
                            None => ep.ring = next,
                            Some((array, _)) => {
                                if StreamContext::write(
                                    &self.mem,
                                    array,
                                    stream,
                                    next.dequeue,
                                    next.cycle,
                                    1,
                                )
                                .is_none()
                                {
                                    self.halt_ep(id, dci, array, Cc::Trb, 0);
                                    return;
                                }
                            }
                        }
                    }
                    self.report(id, dci, &trbs, n, cc);
                    if failed {
                        // The endpoint halts on the TD that failed; the
                        // driver resets it and moves the dequeue pointer.
                        if let Some(ep) = self.slots[id].eps[dci as usize].as_deref_mut() {
                            ep.state = EpState::Halted;
                        }
                        self.sync_ep_ctx(id, dci);
                        return;
                    }
                }
            }
        }
    }

    /// Halts an endpoint with a Transfer Event of `cc` at `ptr`.
    fn halt_ep(&mut self, id: usize, dci: u8, ptr: u64, cc: Cc, len: u32) {
        if let Some(ep) = self.slots[id].eps[dci as usize].as_deref_mut() {
            ep.state = EpState::Halted;
            ep.waiting.clear();
            ep.progress.clear();
        }
        self.sync_ep_ctx(id, dci);
        self.post(
            0,
            Event::Transfer {
                ptr,
                cc,
                len,
                event_data: false,
                slot: id as u8,
                ep: dci,
            },
            false,
        );
    }

    /// A TD's TRBs into what it asks the device for: a control transfer
    /// (Setup, Data stage with chained Normal TRBs, Status) on a control
    /// endpoint, a data transfer (Normal TRBs) on the others.
    fn plan_td(&self, id: usize, dci: u8, trbs: &[TdTrb]) -> Result<Plan, RingError> {
        let ty = self.slots[id].eps[dci as usize]
            .as_deref()
            .map(|e| e.ty)
            .ok_or(RingError::Unsupported(0))?;
        let mut sg = GuestSgList::new(ring::MAX_TD_TRBS, u64::MAX);
        let mut setup = None;
        let mut data_trbs = 0;
        for (n, t) in trbs.iter().enumerate() {
            match t.trb {
                TransferTrb::Setup { packet, .. } => {
                    if ty != EpType::Control || n != 0 {
                        return Err(RingError::Unsupported(t.addr));
                    }
                    setup = Some(SetupPacket::parse(&packet));
                }
                TransferTrb::Data {
                    stage, buf, len, ..
                } => {
                    // Data Stage TRBs only in control TDs, after Setup.
                    if stage.is_some() && setup.is_none() {
                        return Err(RingError::Unsupported(t.addr));
                    }
                    if ty == EpType::Control && setup.is_none() {
                        return Err(RingError::Unsupported(t.addr));
                    }
                    let addr = match buf {
                        Buffer::Pointer(a) => a,
                        // Immediate data is the TRB's parameter field.
                        Buffer::Immediate => t.addr,
                    };
                    sg.push(&self.mem, GuestAddress(addr), len as usize)
                        .map_err(|_| RingError::OutOfRam(t.addr))?;
                    data_trbs += 1;
                }
                TransferTrb::Status { .. } => {
                    if setup.is_none() {
                        return Err(RingError::Unsupported(t.addr));
                    }
                }
                TransferTrb::EventData { .. }
                | TransferTrb::NoOp { .. }
                | TransferTrb::Link { .. } => {}
                TransferTrb::Isoch { .. } | TransferTrb::Invalid { .. } => {
                    return Err(RingError::Unsupported(t.addr))
                }
            }
        }
        Ok(match setup {
            Some(setup) => Plan::Control { setup, data: sg },
            None if data_trbs > 0 => Plan::Data { data: sg },
            None => Plan::Nothing,
        })
    }

    /// Carries out a planned TD on the device.
    fn run_td(&mut self, id: usize, dci: u8, stream: u16, plan: Plan) -> TdEnd {
        let (done, mps) = match self.slots[id].eps[dci as usize].as_deref() {
            Some(ep) => (
                ep.progress.get(&stream).copied().unwrap_or(0),
                ep.max_packet as usize,
            ),
            None => return TdEnd::Done(0, Cc::Trb),
        };
        let port = self.slots[id].port;
        let mem = self.mem.clone();
        let Some(dev) = port.and_then(|p| self.ports[p].dev.as_deref_mut()) else {
            return match plan {
                Plan::Nothing => TdEnd::Done(0, Cc::Success),
                _ => TdEnd::Done(0, Cc::UsbTransaction),
            };
        };
        match plan {
            Plan::Nothing => TdEnd::Done(0, Cc::Success),
            Plan::Control { setup, data } => {
                let mut d = GuestData {
                    mem: &mem,
                    sg: &data,
                };
                let len = d.len();
                match dev.handle_control(&setup, &mut d) {
                    UsbResult::Ack(n) => TdEnd::Done(n.min(len), Cc::Success),
                    UsbResult::Nak => TdEnd::Nak,
                    r => TdEnd::Done(0, fail_cc(r)),
                }
            }
            Plan::Data { data } => {
                let ep = dci_endpoint(dci);
                let total = usize::try_from(data.len()).unwrap_or(usize::MAX);
                let mut done = done.min(total);
                for _ in 0..MAX_CALLS_PER_TD {
                    let mut w = Window {
                        inner: GuestData {
                            mem: &mem,
                            sg: &data,
                        },
                        off: done,
                    };
                    let rest = w.len();
                    match dev.handle_data(ep, stream as u32, &mut w) {
                        UsbResult::Ack(n) => {
                            let n = n.min(rest);
                            done += n;
                            // Whole max-size packets and more room: the
                            // device has more (the framework's rule).
                            let more = n < rest && n > 0 && mps > 0 && n % mps == 0;
                            if !more {
                                return TdEnd::Done(done, Cc::Success);
                            }
                        }
                        UsbResult::Nak => {
                            if let Some(e) = self.slots[id].eps[dci as usize].as_deref_mut() {
                                e.progress.insert(stream, done);
                            }
                            return TdEnd::Nak;
                        }
                        r => return TdEnd::Done(done, fail_cc(r)),
                    }
                }
                TdEnd::Done(done, Cc::Success)
            }
        }
    }

    /// The Transfer Events of a finished TD (4.10.1.1, as QEMU places
    /// them): the first TRB with IOC, or with ISP once the data ran
    /// short, or where the data ended on an error, gets the event; the
    /// status stage starts over; Event Data TRBs report the bytes moved
    /// since the last one (EDTLA).
    fn report(&mut self, id: usize, dci: u8, trbs: &[TdTrb], actual: usize, cc: Cc) {
        let mut left = actual;
        let mut edtla: u64 = 0;
        let mut reported = false;
        let mut short = false;
        for t in trbs {
            let (chunk, len) = match t.trb {
                TransferTrb::Setup { .. } => (8, 8),
                TransferTrb::Data { len, .. } => {
                    let len = len as usize;
                    let chunk = len.min(left);
                    if len > left && cc == Cc::Success {
                        short = true;
                    }
                    left -= chunk;
                    edtla += chunk as u64;
                    (chunk, len)
                }
                TransferTrb::Status { .. } => {
                    reported = false;
                    short = false;
                    (0, 0)
                }
                _ => (0, 0),
            };
            let f = t.trb.flags();
            if !reported && (f.ioc || (short && f.isp) || (cc != Cc::Success && left == 0)) {
                let code = match cc {
                    Cc::Success if short => Cc::ShortPacket,
                    c => c,
                };
                let (ptr, len, ed) = match t.trb {
                    TransferTrb::EventData { data, .. } => {
                        let l = (edtla & 0xff_ffff) as u32;
                        edtla = 0;
                        (data, l, true)
                    }
                    _ => (t.addr, (len - chunk) as u32, false),
                };
                self.post(
                    f.intr as usize,
                    Event::Transfer {
                        ptr,
                        cc: code,
                        len,
                        event_data: ed,
                        slot: id as u8,
                        ep: dci,
                    },
                    f.bei,
                );
                reported = true;
                if cc != Cc::Success {
                    return;
                }
            }
            if matches!(t.trb, TransferTrb::Setup { .. }) {
                reported = false;
                short = false;
            }
        }
    }
}

/// The completion code of a failed transaction.
fn fail_cc(r: UsbResult) -> Cc {
    match r {
        UsbResult::Stall => Cc::Stall,
        UsbResult::Babble => Cc::Babble,
        _ => Cc::UsbTransaction,
    }
}

impl PciFunction for Xhci {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        if let Some(m) = self.msix.as_mut() {
            m.config_written(&self.config, self.msi_sender.as_ref());
        }
        self.update_intx();
    }

    /// Registers are dwords: a narrower read takes bytes of its dword, a
    /// wider one is several dwords; the MSI-X table and PBA are their
    /// own.
    fn region_read(&mut self, region: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if region != BAR_MMIO {
            return;
        }
        if let Some(m) = &self.msix {
            if (MSIX_TABLE..MSIX_TABLE + m.table_len()).contains(&offset) {
                return m.table_read(offset - MSIX_TABLE, data);
            }
            if (MSIX_PBA..MSIX_PBA + m.pba_len()).contains(&offset) {
                return m.pba_read(offset - MSIX_PBA, data);
            }
        }
        let mut cached: Option<(u64, u32)> = None;
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            let dw = at & !3;
            let v = match cached {
                Some((a, v)) if a == dw => v,
                _ => {
                    let v = self.read_dword(dw);
                    cached = Some((dw, v));
                    v
                }
            };
            *b = (v >> ((at & 3) * 8)) as u8;
        }
    }

    /// A write narrower than a dword is a dword write with the other
    /// bytes zero (as QEMU's memory core widens it); wider ones are
    /// dwords, lowest first.
    fn region_write(&mut self, region: usize, offset: u64, data: &[u8]) {
        if region != BAR_MMIO {
            return;
        }
        if let Some(m) = self.msix.as_mut() {
            if (MSIX_TABLE..MSIX_TABLE + m.table_len()).contains(&offset) {
                return m.table_write(offset - MSIX_TABLE, data, self.msi_sender.as_ref());
            }
            if (MSIX_PBA..MSIX_PBA + m.pba_len()).contains(&offset) {
                return;
            }
        }
        let mut i = 0;
        while i < data.len() {
            let at = offset.saturating_add(i as u64);
            let dw = at & !3;
            let mut v = 0u32;
            let mut n = 0;
            while i + n < data.len() && (at + n as u64) & !3 == dw {
                v |= (data[i + n] as u32) << (((at + n as u64) & 3) * 8);
                n += 1;
            }
            self.write_dword(dw, v);
            i += n;
        }
    }
}
