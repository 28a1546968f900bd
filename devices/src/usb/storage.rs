//! `usb-storage`: QEMU's USB mass storage device (vendor 46f4h, product
//! 0001h, "QEMU USB HARDDRIVE"), a SCSI target behind the USB Mass Storage
//! Class Bulk-Only Transport 1.0 (BOT):
//! - 3.1 Bulk-Only Mass Storage Reset and 3.2 Get Max LUN (class requests);
//! - 5.1 CBW and 5.2 CSW ([`super::bot`]);
//! - 6.2 validity: an invalid CBW stalls both bulk endpoints, which stay
//!   stalled, even through CLEAR_FEATURE(ENDPOINT_HALT), until a Reset
//!   Recovery (6.6.1: the class reset, then the halts cleared);
//! - 6.7 the thirteen host/device cases. The host's expectation (CBW
//!   length and direction) is compared with the command's own (its
//!   [`Plan`]) before anything moves: a device that would move data the
//!   host does not expect, or in the other direction, or more than the
//!   host expects on data-out (cases 2, 3, 8, 10, 13), runs nothing and
//!   reports Phase Error; more data-in than expected (case 7) sends what
//!   the host expects, then Phase Error. When the host expects more than
//!   the command moves (cases 4, 5, 9, 11) the data phase is completed as
//!   QEMU completes it, IN with zeroes and OUT discarded, and the CSW
//!   reports the residue.
//!
//! The SCSI side is a [`ScsiBus`] with target 0 and LUNs 0..=15, the same
//! bus type and units (`scsi-hd`, `scsi-cd`) as every other HBA; the
//! vmm attaches units to [`UsbStorage::bus`].
//!
//! Nothing blocks: commands are planned with [`ScsiBus::plan`] and their
//! medium data moves through [`request::run`] in pieces of at most
//! [`CHUNK`] bytes, staged in a host buffer that never holds more than two
//! pieces. A packet that finds no data staged (or no room) is NAKed; the
//! piece's completion calls the controller's [`Wakeup`] for the endpoint
//! that NAKed. Reads are fetched one piece ahead; writes go to the medium
//! a piece at a time while the host fills the next.

use std::sync::{Arc, Mutex};

use super::bot::{self, Cbw, Csw, CswStatus};
use super::core::{Event, Handled, UsbDeviceCore};
use super::desc::{
    self, ConfigDescriptor, Descriptors, DeviceDescriptor, EndpointDescriptor, InterfaceDescriptor,
    SpeedDescriptors, SsCompanion,
};
use super::setup::SetupPacket;
use super::{Dir, Endpoint, PacketData, Speed, UsbDevice, UsbResult, Wakeup};
use crate::bus::lock;
use crate::scsi::bus::ScsiBus;
use crate::scsi::request::{self, Outcome, Request, Status, VecPath, MAX_CHUNK};
use crate::scsi::{Lun, Plan};

pub const VENDOR_ID: u16 = 0x46f4;
pub const PRODUCT_ID: u16 = 0x0001;
/// The bulk endpoints.
pub const EP_IN: Endpoint = Endpoint::new(1, Dir::In);
pub const EP_OUT: Endpoint = Endpoint::new(2, Dir::Out);
/// The largest LUN a CBW can address (4 bits).
pub const MAX_LUN: u64 = 15;
/// Medium data moves in pieces of this many bytes (a multiple of every
/// bulk max packet size and of 512-byte blocks).
pub const CHUNK: usize = 128 << 10;

const STR_MANUFACTURER: u8 = 1;
const STR_PRODUCT: u8 = 2;
const STR_SERIAL: u8 = 3;
const STR_CONFIG_FULL: u8 = 4;
const STR_CONFIG_HIGH: u8 = 5;
const STR_CONFIG_SUPER: u8 = 6;

/// `-device usb-storage` options the device itself cares about.
#[derive(Clone, Debug, Default)]
pub struct StorageOptions {
    /// The serial number string. QEMU derives its default from the
    /// controller's and the port's paths (`1-<pci path>-<port>`); the vmm
    /// passes that. Without one the string is "1".
    pub serial: Option<String>,
}

/// QEMU's descriptors: full, high and SuperSpeed variants of one
/// configuration with one interface (class 08h mass storage, subclass
/// 06h SCSI transparent, protocol 50h bulk-only) and two bulk endpoints.
pub fn descriptors(opts: &StorageOptions) -> Descriptors {
    let at = |bcd_usb: u16, max_packet0: u8, mps: u16, companion, i_config| SpeedDescriptors {
        device: DeviceDescriptor {
            bcd_usb,
            max_packet0,
            vendor: VENDOR_ID,
            product: PRODUCT_ID,
            bcd_device: 0,
            i_manufacturer: STR_MANUFACTURER,
            i_product: STR_PRODUCT,
            i_serial: STR_SERIAL,
            num_configurations: 1,
            ..Default::default()
        },
        configs: vec![ConfigDescriptor {
            value: 1,
            i_configuration: i_config,
            attributes: desc::CONFIG_SELF_POWERED,
            max_power: 0,
            interfaces: vec![InterfaceDescriptor {
                number: 0,
                alt: 0,
                class: 0x08,
                subclass: 0x06,
                protocol: 0x50,
                i_interface: 0,
                endpoints: vec![
                    EndpointDescriptor {
                        companion,
                        ..EndpointDescriptor::bulk(EP_IN.address(), mps)
                    },
                    EndpointDescriptor {
                        companion,
                        ..EndpointDescriptor::bulk(EP_OUT.address(), mps)
                    },
                ],
                extra: Vec::new(),
            }],
        }],
    };
    let ss = Some(SsCompanion {
        max_burst: 15,
        ..Default::default()
    });
    let mut d = Descriptors {
        low: None,
        full: Some(at(0x0200, 8, 64, None, STR_CONFIG_FULL)),
        high: Some(at(0x0200, 64, 512, None, STR_CONFIG_HIGH)),
        super_speed: Some(at(0x0300, 9, 1024, ss, STR_CONFIG_SUPER)),
        strings: Vec::new(),
    };
    d.set_string(STR_MANUFACTURER, "QEMU");
    d.set_string(STR_PRODUCT, "QEMU USB HARDDRIVE");
    d.set_string(STR_SERIAL, opts.serial.as_deref().unwrap_or("1"));
    d.set_string(STR_CONFIG_FULL, "Full speed config (usb 1.1)");
    d.set_string(STR_CONFIG_HIGH, "High speed config (usb 2.0)");
    d.set_string(STR_CONFIG_SUPER, "Super speed config (usb 3.0)");
    d
}

/// The USB mass storage device (Bulk-Only Transport).
pub struct UsbStorage {
    core: UsbDeviceCore,
    speeds: Vec<Speed>,
    bus: Arc<ScsiBus>,
    bot: Arc<Mutex<Bot>>,
}

impl UsbStorage {
    /// A device with its own SCSI bus (target 0 only).
    pub fn new(opts: StorageOptions) -> Self {
        Self::with_bus(Arc::new(ScsiBus::new(0)), opts)
    }

    /// A device whose target 0 is on `bus`.
    pub fn with_bus(bus: Arc<ScsiBus>, opts: StorageOptions) -> Self {
        let descs = descriptors(&opts);
        UsbStorage {
            speeds: descs.speeds(),
            core: UsbDeviceCore::new(descs),
            bus,
            bot: Arc::new(Mutex::new(Bot::default())),
        }
    }

    /// The SCSI bus behind the device: units go to target 0, LUNs
    /// 0..=[`MAX_LUN`].
    pub fn bus(&self) -> &Arc<ScsiBus> {
        &self.bus
    }

    /// Attaches `unit` (a [`crate::scsi::Disk`] or [`crate::scsi::CdRom`])
    /// as LUN `lun`.
    pub fn attach(&self, lun: u64, unit: Arc<dyn Lun>) -> Result<(), String> {
        if lun > MAX_LUN {
            return Err(format!(
                "lun={lun} is above {MAX_LUN}, the most a CBW can address"
            ));
        }
        self.bus.attach(0, lun, unit)
    }

    /// GET MAX LUN: the last LUN of the run that starts at 0, as QEMU
    /// counts.
    fn max_lun(&self) -> u8 {
        let mut n = 0;
        while n < MAX_LUN && self.bus.lun(0, n + 1).is_some() {
            n += 1;
        }
        n as u8
    }

    fn class_request(&mut self, s: &SetupPacket, data: &mut dyn PacketData) -> UsbResult {
        // Both requests address interface 0 (3.1, 3.2).
        match (s.request_type, s.request, s.value, s.index, s.length) {
            (0x21, bot::REQ_RESET, 0, 0, 0) => {
                let mut b = lock(&self.bot);
                b.abort();
                b.needs_reset = false;
                UsbResult::Ack(0)
            }
            (0xa1, bot::REQ_GET_MAX_LUN, 0, 0, 1) => {
                if data.copy_to_host(0, &[self.max_lun()]).is_err() {
                    return UsbResult::Error;
                }
                UsbResult::Ack(1)
            }
            _ => UsbResult::Stall,
        }
    }

    fn stall_both(&mut self) {
        self.core.halt(EP_IN);
        self.core.halt(EP_OUT);
    }
}

impl UsbDevice for UsbStorage {
    fn speeds(&self) -> &[Speed] {
        &self.speeds
    }
    fn set_speed(&mut self, speed: Speed) {
        self.core.set_speed(speed)
    }
    fn speed(&self) -> Speed {
        self.core.speed()
    }
    fn address(&self) -> u8 {
        self.core.address()
    }

    fn reset(&mut self) {
        self.core.reset();
        let mut b = lock(&self.bot);
        b.abort();
        b.needs_reset = false;
    }

    fn set_wakeup(&mut self, wakeup: Option<Wakeup>) {
        lock(&self.bot).wakeup = wakeup;
    }

    fn handle_control(&mut self, setup: &SetupPacket, data: &mut dyn PacketData) -> UsbResult {
        match self.core.handle_control(setup, data) {
            Handled::Done(r, ev) => {
                match ev {
                    // 6.6.1: the bulk endpoints stay stalled until the
                    // class reset.
                    Event::HaltCleared(ep)
                        if (ep == EP_IN || ep == EP_OUT) && lock(&self.bot).needs_reset =>
                    {
                        self.core.halt(ep);
                    }
                    Event::Configured(_) => {
                        let mut b = lock(&self.bot);
                        b.abort();
                        b.needs_reset = false;
                    }
                    _ => {}
                }
                r
            }
            Handled::Class(s) => self.class_request(&s, data),
            Handled::Vendor(_) => UsbResult::Stall,
        }
    }

    fn handle_data(&mut self, ep: Endpoint, stream: u32, data: &mut dyn PacketData) -> UsbResult {
        if let Err(r) = self.core.check_data(ep) {
            return r;
        }
        if stream != 0 || (ep != EP_IN && ep != EP_OUT) {
            return UsbResult::Stall;
        }
        let mps = self.core.max_packet(ep).max(1);
        // A piece of I/O that completes inside `request::run` has updated
        // the state by the time it returns, so the packet is retried at
        // once; at most twice, since each retry either moves data or
        // finds the I/O still in flight.
        for _ in 0..3 {
            let (r, io) = {
                let mut b = lock(&self.bot);
                if b.needs_reset {
                    (Packet::Stall, None)
                } else {
                    b.packet(&self.bus, ep, mps, data)
                }
            };
            let started = io.is_some();
            if let Some(io) = io {
                run_io(&self.bot, io);
            }
            match r {
                Packet::Done(r) => return r,
                Packet::Nak if started => continue,
                Packet::Nak => return UsbResult::Nak,
                Packet::Stall => {
                    self.core.halt(ep);
                    return UsbResult::Stall;
                }
                Packet::InvalidCbw => {
                    lock(&self.bot).needs_reset = true;
                    self.stall_both();
                    return UsbResult::Stall;
                }
            }
        }
        UsbResult::Nak
    }
}

/// What a bulk packet came to.
enum Packet {
    Done(UsbResult),
    Nak,
    /// A protocol error: halt the endpoint.
    Stall,
    /// 6.6.1: stall both endpoints until Reset Recovery.
    InvalidCbw,
}

/// The transport's state, shared with the I/O completions.
#[derive(Default)]
struct Bot {
    /// The command between its CBW and its CSW.
    cmd: Option<Box<Cmd>>,
    /// An invalid CBW was received: every bulk packet STALLs until the
    /// Bulk-Only Mass Storage Reset.
    needs_reset: bool,
    wakeup: Option<Wakeup>,
    /// Endpoints that NAKed since the last completion.
    naked: Vec<Endpoint>,
    /// Bumped by resets, so the completion of an abandoned command is
    /// dropped.
    gen: u64,
}

/// One command.
struct Cmd {
    tag: u32,
    /// The host's expectation: direction (`None`: no data) and length.
    host_dir: Option<Dir>,
    host_len: u64,
    /// Bytes the host moved in the data phase, padding included.
    host_moved: u64,
    /// Bytes the command processed (what the residue is computed from).
    dev_moved: u64,
    phase_error: bool,
    work: Work,
    /// The command's status once it is known.
    status: Option<CswStatus>,
    /// A piece of I/O is in flight.
    busy: bool,
    /// The CSW went out: the command is over.
    csw_sent: bool,
    req: Request,
}

/// What the data phase carries on the device's side.
enum Work {
    /// Nothing (more): IN packets get zeroes, OUT data is discarded.
    Nothing,
    /// Data the unit produced (INQUIRY, MODE SENSE, ...).
    Buffer { data: Vec<u8>, pos: usize },
    /// Medium data read piece by piece: `asked` bytes of `len` have been
    /// asked for; `stage[pos..]` has not been sent yet.
    Read {
        unit: Option<Arc<dyn Lun>>,
        offset: u64,
        len: u64,
        asked: u64,
        stage: Vec<u8>,
        pos: usize,
    },
    /// Data-out for the medium (a write, or VERIFY's compare), sent to
    /// the unit a piece at a time: `sent` bytes of `len` are gone,
    /// `stage` holds the next piece as the host fills it.
    Write {
        unit: Option<Arc<dyn Lun>>,
        kind: WriteKind,
        offset: u64,
        len: u64,
        sent: u64,
        stage: Vec<u8>,
    },
    /// Data-out gathered whole (a parameter list, WRITE SAME's block),
    /// then the plan runs on it.
    Gather {
        unit: Option<Arc<dyn Lun>>,
        plan: Plan,
        buf: Vec<u8>,
        need: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteKind {
    Write { fua: bool },
    Compare,
}

/// I/O for [`run_io`] to start outside the lock.
struct IoStart {
    gen: u64,
    req: Request,
    unit: Option<Arc<dyn Lun>>,
    plan: Plan,
    path: VecPath,
    kind: IoKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IoKind {
    /// A read piece of this many bytes.
    Read(usize),
    /// A write or compare piece of this many bytes.
    Write(usize),
    /// A plan run whole; its outcome is the command's status.
    Whole,
}

fn csw_status(s: Status) -> CswStatus {
    match s {
        Status::Good => CswStatus::Passed,
        _ => CswStatus::Failed,
    }
}

impl Bot {
    /// Drops the command in progress (class reset, bus reset,
    /// SET_CONFIGURATION): its I/O stops at the next piece, and its
    /// completion is ignored.
    fn abort(&mut self) {
        if let Some(c) = self.cmd.take() {
            c.req.abort();
        }
        self.gen = self.gen.wrapping_add(1);
        self.naked.clear();
    }

    fn nak(&mut self, ep: Endpoint) -> Packet {
        if !self.naked.contains(&ep) {
            self.naked.push(ep);
        }
        Packet::Nak
    }

    fn packet(
        &mut self,
        bus: &ScsiBus,
        ep: Endpoint,
        mps: usize,
        data: &mut dyn PacketData,
    ) -> (Packet, Option<IoStart>) {
        let gen = self.gen;
        let Some(cmd) = self.cmd.as_mut() else {
            if ep != EP_OUT {
                // An IN packet with no command: nothing to send.
                return (Packet::Stall, None);
            }
            return self.command(bus, data);
        };
        let host_left = cmd.host_len - cmd.host_moved;
        let (r, io) = match (ep.dir(), host_left) {
            (Dir::In, 0) => (cmd.status_packet(data), None),
            (Dir::In, _) if cmd.host_dir == Some(Dir::In) => cmd.data_in(gen, mps, data),
            (Dir::Out, n) if n > 0 && cmd.host_dir == Some(Dir::Out) => {
                cmd.data_out(gen, mps, data)
            }
            // Data the wrong way, or a CBW before the CSW was read.
            _ => (Packet::Stall, None),
        };
        if cmd.csw_sent {
            self.cmd = None;
        }
        match r {
            Packet::Nak => (self.nak(ep), io),
            r => (r, io),
        }
    }

    /// A CBW on the bulk-out endpoint: parse, plan, compare the host's
    /// expectation with the command's (6.7), and start what can start.
    fn command(&mut self, bus: &ScsiBus, data: &mut dyn PacketData) -> (Packet, Option<IoStart>) {
        let mut b = [0u8; bot::CBW_LEN];
        let cbw = if data.len() == bot::CBW_LEN && data.copy_from_host(0, &mut b).is_ok() {
            Cbw::parse(&b)
        } else {
            Err(bot::CbwError::Length(data.len()))
        };
        let cbw = match cbw {
            Ok(c) => c,
            Err(e) => {
                log::debug!("usb-storage: invalid CBW: {e:?}");
                return (Packet::InvalidCbw, None);
            }
        };
        let host_dir = (cbw.data_len > 0).then_some(cbw.dir);
        let host_len = cbw.data_len as u64;
        let mut cmd = Box::new(Cmd {
            tag: cbw.tag,
            host_dir,
            host_len,
            host_moved: 0,
            dev_moved: 0,
            phase_error: false,
            work: Work::Nothing,
            status: None,
            busy: false,
            csw_sent: false,
            req: Request::new(),
        });
        let io = match bus.plan(0, cbw.lun as u64, cbw.cdb()) {
            // No unit at all: the command fails, the data phase is
            // padded or discarded.
            None => {
                cmd.status = Some(CswStatus::Failed);
                None
            }
            Some((unit, plan)) => cmd.begin(self.gen, unit, plan),
        };
        self.cmd = Some(cmd);
        (Packet::Done(UsbResult::Ack(bot::CBW_LEN)), io)
    }

    /// A piece of I/O finished; returns the next piece to start, if one
    /// is ready, and the wakeups to deliver.
    fn complete(
        &mut self,
        gen: u64,
        kind: IoKind,
        o: Outcome,
        path: VecPath,
    ) -> (Option<IoStart>, Option<(Wakeup, Vec<Endpoint>)>) {
        if gen != self.gen {
            return (None, None);
        }
        let Some(cmd) = self.cmd.as_mut() else {
            return (None, None);
        };
        cmd.busy = false;
        let ok = o.status == Status::Good;
        let mut next = None;
        match kind {
            IoKind::Read(n) => match &mut cmd.work {
                Work::Read {
                    stage,
                    pos,
                    asked,
                    len,
                    ..
                } if ok && o.transferred == n as u64 => {
                    stage.drain(..*pos);
                    *pos = 0;
                    stage.extend_from_slice(&path.buf[..n]);
                    if *asked == *len {
                        cmd.status.get_or_insert(CswStatus::Passed);
                    }
                }
                _ => cmd.fail(o.status),
            },
            IoKind::Write(n) => {
                if ok {
                    cmd.dev_moved += n as u64;
                    next = cmd.next_write(gen);
                } else {
                    cmd.fail(o.status);
                }
            }
            IoKind::Whole => {
                cmd.dev_moved += o.transferred;
                cmd.status.get_or_insert(csw_status(o.status));
            }
        }
        let wake = match (&self.wakeup, self.naked.is_empty()) {
            (Some(w), false) => Some((w.clone(), std::mem::take(&mut self.naked))),
            _ => None,
        };
        (next, wake)
    }
}

impl Cmd {
    fn host_left(&self) -> u64 {
        self.host_len - self.host_moved
    }

    /// The medium plan failed partway: the CSW reports it, and the rest
    /// of the data phase is padded or discarded.
    fn fail(&mut self, s: Status) {
        self.status = Some(csw_status(s));
        if self.status == Some(CswStatus::Passed) {
            self.status = Some(CswStatus::Failed);
        }
        self.work = Work::Nothing;
    }

    fn whole(
        &mut self,
        gen: u64,
        unit: Option<Arc<dyn Lun>>,
        plan: Plan,
        path: VecPath,
    ) -> IoStart {
        self.busy = true;
        IoStart {
            gen,
            req: self.req.clone(),
            unit,
            plan,
            path,
            kind: IoKind::Whole,
        }
    }

    /// Decides the data phase from the plan and the host's expectation
    /// (6.7's thirteen cases).
    fn begin(&mut self, gen: u64, unit: Option<Arc<dyn Lun>>, plan: Plan) -> Option<IoStart> {
        let dev_dir = plan.direction();
        let dev_len = plan.data_len();
        let agree = match (self.host_dir, dev_dir) {
            // Case 1, and cases 4 and 9 (the host expects data, the
            // command has none): run it; the data phase is padded or
            // discarded.
            (_, crate::scsi::Direction::None) => {
                return Some(self.whole(gen, unit, plan, VecPath::new(0)));
            }
            (Some(Dir::In), crate::scsi::Direction::In) => true,
            // Case 13 (more data-out than the host sends) runs nothing.
            (Some(Dir::Out), crate::scsi::Direction::Out) => dev_len <= self.host_len,
            // Cases 2, 3, 8 and 10.
            _ => false,
        };
        if !agree {
            self.phase_error = true;
            self.status = Some(CswStatus::PhaseError);
            return None;
        }
        if dev_len > self.host_len {
            // Case 7: what the host expects, then Phase Error.
            self.phase_error = true;
        }
        let len = dev_len.min(self.host_len);
        self.work = match plan {
            Plan::DataIn(mut v) => {
                v.truncate(len as usize);
                self.status = Some(CswStatus::Passed);
                Work::Buffer { data: v, pos: 0 }
            }
            Plan::Read { offset, .. } => Work::Read {
                unit,
                offset,
                len,
                asked: 0,
                stage: Vec::new(),
                pos: 0,
            },
            Plan::Write { offset, fua, .. } => Work::Write {
                unit,
                kind: WriteKind::Write { fua },
                offset,
                len,
                sent: 0,
                stage: Vec::new(),
            },
            Plan::Compare { offset, .. } => Work::Write {
                unit,
                kind: WriteKind::Compare,
                offset,
                len,
                sent: 0,
                stage: Vec::new(),
            },
            plan @ (Plan::WriteSame { .. } | Plan::DataOut { .. }) if len as usize <= MAX_CHUNK => {
                Work::Gather {
                    unit,
                    plan,
                    buf: Vec::new(),
                    need: len as usize,
                }
            }
            // A parameter list too long to hold: the runner refuses it
            // without asking for data; the host's data is discarded.
            plan => return Some(self.whole(gen, unit, plan, VecPath::new(0))),
        };
        // The first read piece starts with the command, before the host
        // asks.
        self.next_read(gen)
    }

    /// The next read piece, when there is room for it.
    fn next_read(&mut self, gen: u64) -> Option<IoStart> {
        if self.busy {
            return None;
        }
        let Work::Read {
            unit,
            offset,
            len,
            asked,
            stage,
            pos,
        } = &mut self.work
        else {
            return None;
        };
        if *asked == *len || stage.len() - *pos >= CHUNK {
            return None;
        }
        let n = (*len - *asked).min(CHUNK as u64) as usize;
        let plan = Plan::Read {
            offset: *offset + *asked,
            len: n as u64,
        };
        *asked += n as u64;
        let unit = unit.clone();
        self.busy = true;
        Some(IoStart {
            gen,
            req: self.req.clone(),
            unit,
            plan,
            path: VecPath::new(n),
            kind: IoKind::Read(n),
        })
    }

    /// The next write piece, once the stage holds a full piece or the
    /// last one.
    fn next_write(&mut self, gen: u64) -> Option<IoStart> {
        if self.busy {
            return None;
        }
        let Work::Write {
            unit,
            kind,
            offset,
            len,
            sent,
            stage,
        } = &mut self.work
        else {
            return None;
        };
        let n = stage.len();
        if *sent == *len {
            self.status.get_or_insert(CswStatus::Passed);
            self.work = Work::Nothing;
            return None;
        }
        if n == 0 || (n < CHUNK && *sent + n as u64 != *len) {
            return None;
        }
        let at = *offset + *sent;
        let plan = match kind {
            WriteKind::Write { fua } => Plan::Write {
                offset: at,
                len: n as u64,
                fua: *fua,
            },
            WriteKind::Compare => Plan::Compare {
                offset: at,
                len: n as u64,
            },
        };
        *sent += n as u64;
        let unit = unit.clone();
        let buf = std::mem::take(stage);
        self.busy = true;
        Some(IoStart {
            gen,
            req: self.req.clone(),
            unit,
            plan,
            path: VecPath { buf },
            kind: IoKind::Write(n),
        })
    }

    /// A data-in packet.
    fn data_in(
        &mut self,
        gen: u64,
        mps: usize,
        data: &mut dyn PacketData,
    ) -> (Packet, Option<IoStart>) {
        let want = (data.len() as u64).min(self.host_left()) as usize;
        let mut done = 0usize;
        let mut io = None;
        while done < want {
            match &mut self.work {
                Work::Buffer { data: v, pos } => {
                    let n = (v.len() - *pos).min(want - done);
                    if data.copy_to_host(done, &v[*pos..*pos + n]).is_err() {
                        return (Packet::Done(UsbResult::Error), None);
                    }
                    *pos += n;
                    done += n;
                    self.dev_moved += n as u64;
                    if *pos == v.len() {
                        self.work = Work::Nothing;
                    }
                }
                Work::Read {
                    stage,
                    pos,
                    asked,
                    len,
                    ..
                } => {
                    let avail = stage.len() - *pos;
                    let last = *asked == *len && !self.busy;
                    let room = want - done;
                    // Only whole packets unless this is the end of the
                    // data: a part of a packet would be a short packet
                    // and end the host's transfer (USB 2.0 5.8.3).
                    let n = if avail >= room || last {
                        avail.min(room)
                    } else {
                        avail - avail % mps
                    };
                    if n > 0 {
                        if data.copy_to_host(done, &stage[*pos..*pos + n]).is_err() {
                            return (Packet::Done(UsbResult::Error), None);
                        }
                        *pos += n;
                        done += n;
                        self.dev_moved += n as u64;
                    }
                    if last && *pos == stage.len() {
                        self.work = Work::Nothing;
                        continue;
                    }
                    if io.is_none() {
                        io = self.next_read(gen);
                    }
                    if n == 0 || done < want {
                        break;
                    }
                }
                Work::Nothing => {
                    // Cases 4 and 5: complete the host's transfer with
                    // zeroes, bounded per call.
                    const ZEROES: [u8; 4096] = [0; 4096];
                    let end = want.min(done + CHUNK);
                    while done < end {
                        let n = (end - done).min(ZEROES.len());
                        if data.copy_to_host(done, &ZEROES[..n]).is_err() {
                            return (Packet::Done(UsbResult::Error), None);
                        }
                        done += n;
                    }
                    break;
                }
                Work::Write { .. } | Work::Gather { .. } => break,
            }
        }
        if done == 0 && want > 0 {
            return (Packet::Nak, io);
        }
        self.host_moved += done as u64;
        (Packet::Done(UsbResult::Ack(done)), io)
    }

    /// A data-out packet.
    fn data_out(
        &mut self,
        gen: u64,
        mps: usize,
        data: &mut dyn PacketData,
    ) -> (Packet, Option<IoStart>) {
        if data.len() as u64 > self.host_left() {
            // More than the CBW announced (QEMU stalls too).
            return (Packet::Stall, None);
        }
        let want = data.len();
        let (n, io) = match &mut self.work {
            Work::Nothing => (want, None),
            Work::Write {
                len, sent, stage, ..
            } => {
                let dev_left = *len - *sent - stage.len() as u64;
                if dev_left == 0 {
                    // Case 11: the rest of the host's data is discarded.
                    (want, None)
                } else {
                    let room = (CHUNK - stage.len()).min(dev_left as usize);
                    // A packet is taken whole or not at all; a transfer
                    // of many packets may be taken in part (whole
                    // packets).
                    let n = if want <= room {
                        want
                    } else if want > mps {
                        room - room % mps
                    } else {
                        0
                    };
                    if n == 0 {
                        return (Packet::Nak, None);
                    }
                    let at = stage.len();
                    stage.resize(at + n, 0);
                    if data.copy_from_host(0, &mut stage[at..]).is_err() {
                        stage.truncate(at);
                        return (Packet::Done(UsbResult::Error), None);
                    }
                    (n, self.next_write(gen))
                }
            }
            Work::Gather { buf, need, .. } => {
                let take = want.min(*need - buf.len());
                let at = buf.len();
                buf.resize(at + take, 0);
                if data.copy_from_host(0, &mut buf[at..]).is_err() {
                    buf.truncate(at);
                    return (Packet::Done(UsbResult::Error), None);
                }
                let io = if buf.len() == *need {
                    let Work::Gather {
                        unit, plan, buf, ..
                    } = std::mem::replace(&mut self.work, Work::Nothing)
                    else {
                        unreachable!("matched above")
                    };
                    Some(self.whole(gen, unit, plan, VecPath { buf }))
                } else {
                    None
                };
                (want, io)
            }
            Work::Buffer { .. } | Work::Read { .. } => (want, None),
        };
        self.host_moved += n as u64;
        (Packet::Done(UsbResult::Ack(n)), io)
    }

    /// An IN packet after the data phase: the CSW once the command is
    /// done, NAK before.
    fn status_packet(&mut self, data: &mut dyn PacketData) -> Packet {
        if data.len() < bot::CSW_LEN {
            return Packet::Stall;
        }
        // A write's status is known only when its last piece is on the
        // medium.
        if let Work::Write {
            len, sent, stage, ..
        } = &self.work
        {
            if !self.busy && *sent == *len && stage.is_empty() {
                self.status.get_or_insert(CswStatus::Passed);
            }
        }
        let status = match self.status {
            Some(s) if !self.busy => s,
            _ => return Packet::Nak,
        };
        let csw = Csw {
            tag: self.tag,
            residue: (self.host_len.saturating_sub(self.dev_moved)).min(u32::MAX as u64) as u32,
            status: if self.phase_error {
                CswStatus::PhaseError
            } else {
                status
            },
        };
        if data.copy_to_host(0, &csw.to_bytes()).is_err() {
            return Packet::Done(UsbResult::Error);
        }
        self.csw_sent = true;
        Packet::Done(UsbResult::Ack(bot::CSW_LEN))
    }
}

/// Runs a piece of I/O outside the transport's lock; its completion
/// updates the state, starts the next write piece if the host already
/// filled it (at most one more: the host cannot fill another before
/// that one is sent), and wakes the endpoints that NAKed.
fn run_io(bot: &Arc<Mutex<Bot>>, io: IoStart) {
    let shared = bot.clone();
    let (gen, kind) = (io.gen, io.kind);
    request::run(&io.req, io.unit, io.plan, io.path, move |o, path| {
        let (next, wake) = lock(&shared).complete(gen, kind, o, path);
        if let Some((w, eps)) = wake {
            for ep in eps {
                w(ep);
            }
        }
        if let Some(n) = next {
            run_io(&shared, n);
        }
    });
}

#[cfg(test)]
mod tests;
