//! `usb-uas`: QEMU's USB Attached SCSI device (vendor 46f4h, product
//! 0003h, "USB Attached SCSI HBA"), a SCSI target behind the USB Attached
//! SCSI protocol. Specs followed: T10 UAS-2 (4.3 the pipes, 5 the
//! transport protocol, 6.2 the information units: [`iu`]) and the USB
//! "Mass Storage Class - USB Attached SCSI Protocol (UASP)" 1.0 (3 the
//! interface and its Pipe Usage descriptors, 4 the stream protocol at
//! SuperSpeed).
//!
//! - One interface (class 08h, subclass 06h SCSI, protocol 62h UAS), with
//!   alternate setting 0 being UAS, as QEMU's device has it: there is no
//!   Bulk-Only alternate. Linux's `uas` driver looks for the alternate
//!   setting with protocol 62h, which is alt 0 here, and selects it.
//! - Four bulk pipes, numbered as their pipe ids: command (1 OUT), status
//!   (2 IN), data-in (3 IN), data-out (4 OUT). Each endpoint descriptor
//!   is followed by its Pipe Usage descriptor (type 24h). The typed
//!   descriptors of [`super::desc`] hold no bytes after an endpoint, so
//!   GET_DESCRIPTOR(CONFIGURATION) is answered here: the configuration
//!   bytes with the Pipe Usage descriptors put in after each endpoint (and
//!   its SuperSpeed companion, UASP 3.2).
//! - High speed (no streams): the device queues IUs on the status pipe in
//!   order; a command with a data phase gets READ READY or WRITE READY
//!   when the data pipe of its direction is free (one task per data pipe
//!   at a time, in arrival order, as QEMU does), then its data, then its
//!   SENSE IU.
//! - SuperSpeed: the status and data pipes have 2^4 = 16 streams, and the
//!   stream id of a status or data transfer is the tag of its task
//!   (UASP 4.2); no READY IUs. A data or status transfer that comes before
//!   its command (Linux posts them first) is NAKed and woken later.
//! - At most [`MAX_TASKS`] tasks; beyond, SENSE IU with TASK SET FULL.
//!   IUs waiting for the status pipe are bounded too: the command pipe is
//!   NAKed while [`MAX_QUEUED`] wait.
//! - Errors (UAS-2 6.2.5): an IU the host may not send, too short, or with
//!   a reserved task attribute gets a RESPONSE IU with INVALID
//!   INFORMATION UNIT; a command or task management IU whose tag is in
//!   use, OVERLAPPED TAG ATTEMPTED (the task holding the tag goes on); an
//!   IU too short for a tag stalls the command pipe.
//! - Task management (UAS-2 6.2.6, SAM-5 7): ABORT TASK, ABORT TASK SET,
//!   CLEAR TASK SET, LOGICAL UNIT RESET, I_T NEXUS RESET, QUERY TASK,
//!   QUERY TASK SET, QUERY ASYNCHRONOUS EVENT; CLEAR ACA and unknown
//!   functions are not supported (no ACA here). Aborted tasks end without
//!   a SENSE IU (SAM-5 with TAS=0), as in QEMU.
//! - A bus reset, SET_CONFIGURATION and SET_INTERFACE abort every task
//!   and drop the IUs not yet sent.
//!
//! The SCSI side is a [`ScsiBus`] with target 0 and LUNs 0..=[`MAX_LUN`];
//! the vmm attaches `scsi-hd`/`scsi-cd` units to [`UsbUas::bus`]. LUN
//! fields use SAM-5 single-level peripheral or flat addressing
//! ([`iu::decode_lun`]); an absent LUN of the target answers as the target
//! answers (INQUIRY with peripheral qualifier 3, CHECK CONDITION
//! otherwise).
//!
//! Nothing blocks: a command is planned with [`ScsiBus::plan`] and its
//! medium data moves through [`request::run`] in pieces of at most
//! [`CHUNK`] bytes, at most two pieces staged per task, as `usb-storage`
//! does; a transfer that finds nothing to move is NAKed and the
//! controller's [`Wakeup`] is called for its endpoint once something
//! changed.

pub mod fuzz;
pub mod iu;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod xhci_tests;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use self::iu::{CommandIu, DeviceIu, HostIu, IuError, TaskManagementIu, Tmf};
use super::core::{Event, Handled, UsbDeviceCore};
use super::desc::{
    self, kind, ConfigDescriptor, Descriptors, DeviceDescriptor, EndpointDescriptor,
    InterfaceDescriptor, SpeedDescriptors, SsCompanion,
};
use super::setup::{Request as UsbRequest, SetupPacket, Standard};
use super::{Dir, Endpoint, PacketData, Speed, UsbDevice, UsbResult, Wakeup};
use crate::bus::lock;
use crate::scsi::bus::ScsiBus;
use crate::scsi::request::{self, Outcome, Request, Status, VecPath};
use crate::scsi::{Direction, Lun, Plan, Sense};

pub const VENDOR_ID: u16 = 0x46f4;
pub const PRODUCT_ID: u16 = 0x0003;
/// The pipes; endpoint numbers are the pipe ids of UASP table 3.
pub const EP_COMMAND: Endpoint = Endpoint::new(1, Dir::Out);
pub const EP_STATUS: Endpoint = Endpoint::new(2, Dir::In);
pub const EP_DATA_IN: Endpoint = Endpoint::new(3, Dir::In);
pub const EP_DATA_OUT: Endpoint = Endpoint::new(4, Dir::Out);
/// The largest LUN units may be attached at (QEMU's bus allows 0..=255,
/// what single-level peripheral addressing reaches).
pub const MAX_LUN: u64 = 255;
/// MaxStreams of the SuperSpeed status and data pipes: 2^4 streams, ids
/// 1..=16 (stream 0 is not a stream).
pub const STREAMS_EXP: u8 = 4;
pub const MAX_STREAMS: u16 = 1 << STREAMS_EXP;
/// Tasks in flight at once (QEMU's 16 streams; the same at high speed).
pub const MAX_TASKS: usize = 16;
/// Device IUs waiting for the status pipe before the command pipe NAKs.
pub const MAX_QUEUED: usize = 2 * MAX_TASKS + 16;
/// Medium data moves in pieces of this many bytes (a multiple of every
/// bulk max packet size and of 512-byte blocks); at most two per task are
/// staged, so all tasks together hold at most 2 MiB.
pub const CHUNK: usize = 64 << 10;
/// The Pipe Usage descriptor type (UASP 3.3).
pub const DT_PIPE_USAGE: u8 = 0x24;

/// SAM-5 status bytes the transport produces itself.
const STATUS_CHECK_CONDITION: u8 = 0x02;
const STATUS_TASK_SET_FULL: u8 = 0x28;

const STR_MANUFACTURER: u8 = 1;
const STR_PRODUCT: u8 = 2;
const STR_SERIAL: u8 = 3;
const STR_CONFIG_HIGH: u8 = 4;
const STR_CONFIG_SUPER: u8 = 5;

/// `-device usb-uas` options the device itself cares about.
#[derive(Clone, Debug, Default)]
pub struct UasOptions {
    /// The serial number string (QEMU derives one from the port path; the
    /// vmm passes it). Without one: "27842", QEMU's fixed default.
    pub serial: Option<String>,
}

/// QEMU's descriptors: high speed and SuperSpeed variants of one
/// configuration with the UAS interface and its four bulk pipes; at
/// SuperSpeed, bursts of 16 and streams on the status and data pipes.
pub fn descriptors(opts: &UasOptions) -> Descriptors {
    let at = |bcd_usb: u16, max_packet0: u8, mps: u16, ss: bool, i_config| {
        let ep = |e: Endpoint, streams: bool| EndpointDescriptor {
            companion: ss.then_some(SsCompanion {
                max_burst: 15,
                attributes: if streams { STREAMS_EXP } else { 0 },
                bytes_per_interval: 0,
            }),
            ..EndpointDescriptor::bulk(e.address(), mps)
        };
        SpeedDescriptors {
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
                    protocol: 0x62,
                    i_interface: 0,
                    endpoints: vec![
                        ep(EP_COMMAND, false),
                        ep(EP_STATUS, true),
                        ep(EP_DATA_IN, true),
                        ep(EP_DATA_OUT, true),
                    ],
                    extra: Vec::new(),
                }],
            }],
        }
    };
    let mut d = Descriptors {
        low: None,
        full: None,
        high: Some(at(0x0200, 64, 512, false, STR_CONFIG_HIGH)),
        super_speed: Some(at(0x0300, 9, 1024, true, STR_CONFIG_SUPER)),
        strings: Vec::new(),
    };
    d.set_string(STR_MANUFACTURER, "QEMU");
    d.set_string(STR_PRODUCT, "USB Attached SCSI HBA");
    d.set_string(STR_SERIAL, opts.serial.as_deref().unwrap_or("27842"));
    d.set_string(STR_CONFIG_HIGH, "High speed config (usb 2.0)");
    d.set_string(STR_CONFIG_SUPER, "Super speed config (usb 3.0)");
    d
}

/// A configuration descriptor's bytes with a Pipe Usage descriptor after
/// each endpoint descriptor (after its SuperSpeed companion, if any); the
/// pipe id is the endpoint number.
fn with_pipe_usage(cfg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(cfg.len() + 16);
    let mut at = 0;
    let mut pending: Option<u8> = None;
    while at + 2 <= cfg.len() {
        let len = (cfg[at] as usize).max(2).min(cfg.len() - at);
        let ty = cfg[at + 1];
        if ty != kind::SS_ENDPOINT_COMPANION {
            if let Some(id) = pending.take() {
                out.extend_from_slice(&[4, DT_PIPE_USAGE, id, 0]);
            }
        }
        out.extend_from_slice(&cfg[at..at + len]);
        if ty == kind::ENDPOINT && len >= 3 {
            pending = Some(cfg[at + 2] & 0x0f);
        }
        at += len;
    }
    if let Some(id) = pending {
        out.extend_from_slice(&[4, DT_PIPE_USAGE, id, 0]);
    }
    if out.len() >= 4 {
        let total = out.len().min(u16::MAX as usize) as u16;
        out[2..4].copy_from_slice(&total.to_le_bytes());
    }
    out
}

/// The USB Attached SCSI device.
pub struct UsbUas {
    core: UsbDeviceCore,
    speeds: Vec<Speed>,
    bus: Arc<ScsiBus>,
    state: Arc<Mutex<State>>,
}

impl UsbUas {
    /// A device with its own SCSI bus (target 0 only).
    pub fn new(opts: UasOptions) -> Self {
        Self::with_bus(Arc::new(ScsiBus::new(0)), opts)
    }

    /// A device whose target 0 is on `bus`.
    pub fn with_bus(bus: Arc<ScsiBus>, opts: UasOptions) -> Self {
        let descs = descriptors(&opts);
        let core = UsbDeviceCore::new(descs);
        let streams = core.speed() == Speed::Super;
        UsbUas {
            speeds: core.descriptors().speeds(),
            core,
            bus,
            state: Arc::new(Mutex::new(State::new(streams))),
        }
    }

    /// The SCSI bus behind the device: units go to target 0, LUNs
    /// 0..=[`MAX_LUN`].
    pub fn bus(&self) -> &Arc<ScsiBus> {
        &self.bus
    }

    /// Attaches `unit` (a [`crate::scsi::Disk`] or [`crate::scsi::CdRom`])
    /// as LUN `lun` of target 0.
    pub fn attach(&self, lun: u64, unit: Arc<dyn Lun>) -> Result<(), String> {
        if lun > MAX_LUN {
            return Err(format!(
                "lun={lun} is above {MAX_LUN}, the most usb-uas has"
            ));
        }
        self.bus.attach(0, lun, unit)
    }

    /// Tasks in flight (for tests and monitors).
    pub fn tasks(&self) -> usize {
        lock(&self.state).tasks.len()
    }

    /// Aborts every task and forgets the IUs not sent (a bus reset, a
    /// new configuration or alternate setting, a new speed).
    fn abort_all(&self) {
        let mut s = lock(&self.state);
        s.abort_all();
        s.streams = self.core.speed() == Speed::Super;
        s.naked.clear();
    }

    /// Runs `f` on the state, then the I/O it started (retrying once if
    /// the I/O completed inline and the answer was NAK), then the wakeups.
    fn with_state(
        &mut self,
        ep: Endpoint,
        mut f: impl FnMut(&mut State, &ScsiBus) -> (Packet, Vec<IoStart>),
    ) -> UsbResult {
        // Each retry either moves something or finds I/O in flight.
        for _ in 0..3 {
            let (r, ios, wakes) = {
                let mut s = lock(&self.state);
                let (r, ios) = f(&mut s, &self.bus);
                let wakes = s.take_wakes();
                if r == Packet::Nak && ios.is_empty() && !s.naked.contains(&ep) {
                    s.naked.push(ep);
                }
                (r, ios, wakes)
            };
            let started = !ios.is_empty();
            for io in ios {
                run_io(&self.state, io);
            }
            deliver(wakes);
            match r {
                Packet::Done(r) => return r,
                Packet::Nak if started => continue,
                Packet::Nak => return UsbResult::Nak,
                Packet::Stall => {
                    self.core.halt(ep);
                    return UsbResult::Stall;
                }
            }
        }
        let mut s = lock(&self.state);
        if !s.naked.contains(&ep) {
            s.naked.push(ep);
        }
        let wakes = s.take_wakes();
        drop(s);
        deliver(wakes);
        UsbResult::Nak
    }
}

fn deliver(w: Option<(Wakeup, Vec<Endpoint>)>) {
    if let Some((w, eps)) = w {
        for ep in eps {
            w(ep);
        }
    }
}

impl UsbDevice for UsbUas {
    fn speeds(&self) -> &[Speed] {
        &self.speeds
    }
    fn set_speed(&mut self, speed: Speed) {
        self.core.set_speed(speed);
        self.abort_all();
    }
    fn speed(&self) -> Speed {
        self.core.speed()
    }
    fn address(&self) -> u8 {
        self.core.address()
    }

    fn reset(&mut self) {
        self.core.reset();
        self.abort_all();
    }

    fn set_wakeup(&mut self, wakeup: Option<Wakeup>) {
        lock(&self.state).wakeup = wakeup;
    }

    fn handle_control(&mut self, setup: &SetupPacket, data: &mut dyn PacketData) -> UsbResult {
        // The configuration descriptor with the Pipe Usage descriptors.
        if let UsbRequest::Standard(Standard::GetDescriptor {
            kind: kind::CONFIGURATION,
            index,
            len,
            ..
        }) = UsbRequest::parse(setup)
        {
            let Some(cfg) = self
                .core
                .descriptors()
                .at(self.core.speed())
                .and_then(|d| d.configs.get(index as usize))
            else {
                return UsbResult::Stall;
            };
            let bytes = with_pipe_usage(&cfg.to_bytes(kind::CONFIGURATION));
            let n = bytes.len().min(len as usize).min(data.len());
            if data.copy_to_host(0, &bytes[..n]).is_err() {
                return UsbResult::Error;
            }
            return UsbResult::Ack(n);
        }
        match self.core.handle_control(setup, data) {
            Handled::Done(r, ev) => {
                if matches!(ev, Event::Configured(_) | Event::InterfaceSet { .. }) {
                    self.abort_all();
                }
                r
            }
            // UAS has no class requests (QEMU stalls them too).
            Handled::Class(_) | Handled::Vendor(_) => UsbResult::Stall,
        }
    }

    fn handle_data(&mut self, ep: Endpoint, stream: u32, data: &mut dyn PacketData) -> UsbResult {
        if let Err(r) = self.core.check_data(ep) {
            return r;
        }
        let streams = self.core.speed() == Speed::Super;
        let mps = self.core.max_packet(ep).max(1);
        // Stream ids: none on the command pipe, none at high speed, 1..=16
        // on the others at SuperSpeed.
        let stream = match (ep == EP_COMMAND, streams) {
            (true, _) | (false, false) if stream != 0 => return UsbResult::Stall,
            (false, true) if stream == 0 || stream > MAX_STREAMS as u32 => return UsbResult::Stall,
            _ => stream as u16,
        };
        match ep {
            EP_COMMAND => self.with_state(ep, |s, bus| s.command_pipe(bus, data)),
            EP_STATUS => self.with_state(ep, |s, _| (s.status_pipe(stream, data), Vec::new())),
            EP_DATA_IN | EP_DATA_OUT => {
                self.with_state(ep, |s, _| s.data_pipe(ep, stream, mps, data))
            }
            _ => UsbResult::Stall,
        }
    }
}

/// What a pipe transfer came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Packet {
    Done(UsbResult),
    Nak,
    /// A protocol error: halt the endpoint.
    Stall,
}

/// The transport's state, shared with the I/O completions.
struct State {
    /// SuperSpeed: status and data transfers name their task by stream.
    streams: bool,
    tasks: BTreeMap<u16, Task>,
    /// IUs for the status pipe, oldest first.
    queue: VecDeque<DeviceIu>,
    /// High speed: the task whose data phase has each data pipe.
    data_in: Option<u16>,
    data_out: Option<u16>,
    /// Numbers tasks, so that a completion finds its own task even when
    /// the tag was reused after an abort.
    seq: u64,
    wakeup: Option<Wakeup>,
    /// Endpoints that NAKed since they were last woken.
    naked: Vec<Endpoint>,
    /// Something changed that a NAKed endpoint may be waiting for.
    changed: bool,
}

/// One task (a command between its COMMAND IU and its SENSE IU).
struct Task {
    seq: u64,
    lun: u64,
    req: Request,
    dir: Direction,
    /// High speed: its READY IU went out and it has its data pipe.
    active: bool,
    work: Work,
    /// A piece of I/O is in flight.
    busy: bool,
    /// The status once known.
    status: Option<Status>,
    /// The data ended on a packet boundary before the host's buffer did:
    /// a zero-length packet ends the host's transfer.
    zlp: bool,
}

/// What the data phase carries on the device's side.
enum Work {
    /// Nothing (more).
    Nothing,
    /// Data the unit produced (INQUIRY, MODE SENSE, ...).
    Buffer { data: Vec<u8>, pos: usize },
    /// Medium data read piece by piece: `asked` of `len` bytes asked for;
    /// `stage[pos..]` not sent yet.
    Read {
        unit: Option<Arc<dyn Lun>>,
        offset: u64,
        len: u64,
        asked: u64,
        stage: Vec<u8>,
        pos: usize,
    },
    /// Data-out for the medium, sent to the unit a piece at a time.
    Write {
        unit: Option<Arc<dyn Lun>>,
        compare: bool,
        fua: bool,
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

/// I/O to start outside the lock.
struct IoStart {
    tag: u16,
    seq: u64,
    req: Request,
    unit: Option<Arc<dyn Lun>>,
    plan: Plan,
    path: VecPath,
    kind: IoKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IoKind {
    Read(usize),
    Write(usize),
    /// A plan run whole; its outcome is the task's status.
    Whole,
}

impl State {
    fn new(streams: bool) -> State {
        State {
            streams,
            tasks: BTreeMap::new(),
            queue: VecDeque::new(),
            data_in: None,
            data_out: None,
            seq: 0,
            wakeup: None,
            naked: Vec::new(),
            changed: false,
        }
    }

    fn take_wakes(&mut self) -> Option<(Wakeup, Vec<Endpoint>)> {
        if !self.changed || self.naked.is_empty() {
            self.changed = false;
            return None;
        }
        self.changed = false;
        let w = self.wakeup.clone()?;
        Some((w, std::mem::take(&mut self.naked)))
    }

    fn abort_all(&mut self) {
        for (_, t) in std::mem::take(&mut self.tasks) {
            t.req.abort();
        }
        self.queue.clear();
        self.data_in = None;
        self.data_out = None;
    }

    /// Drops a task without status (SAM-5 7.2: an aborted task sends
    /// none); its I/O stops at the next piece and its completion is
    /// ignored.
    fn abort(&mut self, tag: u16) -> Vec<IoStart> {
        if let Some(t) = self.tasks.remove(&tag) {
            t.req.abort();
        }
        self.release(tag)
    }

    /// Frees the data pipe `tag` held (high speed) and hands it on.
    fn release(&mut self, tag: u16) -> Vec<IoStart> {
        if self.data_in == Some(tag) {
            self.data_in = None;
        }
        if self.data_out == Some(tag) {
            self.data_out = None;
        }
        self.changed = true;
        self.activate()
    }

    /// Gives each free data pipe to the oldest task waiting for it
    /// (high speed; at SuperSpeed every task is active from the start):
    /// its READY IU, and the first read piece.
    fn activate(&mut self) -> Vec<IoStart> {
        let mut ios = Vec::new();
        for dir in [Direction::In, Direction::Out] {
            let busy = match dir {
                Direction::In => self.data_in.is_some(),
                _ => self.data_out.is_some(),
            };
            if busy {
                continue;
            }
            let next = self
                .tasks
                .iter()
                .filter(|(_, t)| !t.active && t.dir == dir)
                .min_by_key(|(_, t)| t.seq)
                .map(|(&tag, _)| tag);
            let Some(tag) = next else { continue };
            if dir == Direction::In {
                self.data_in = Some(tag);
                self.queue.push_back(DeviceIu::ReadReady { tag });
            } else {
                self.data_out = Some(tag);
                self.queue.push_back(DeviceIu::WriteReady { tag });
            }
            self.changed = true;
            if let Some(t) = self.tasks.get_mut(&tag) {
                t.active = true;
                ios.extend(t.next_read(tag));
            }
        }
        ios
    }

    /// Queues an IU for the status pipe. At SuperSpeed an IU whose tag is
    /// no stream could never be fetched, so it is dropped.
    fn queue_iu(&mut self, iu: DeviceIu) {
        if self.streams && !(1..=MAX_STREAMS).contains(&iu.tag()) {
            log::debug!("usb-uas: no stream for {iu:?}");
            return;
        }
        self.queue.push_back(iu);
        self.changed = true;
    }

    /// Ends `tag` if its status is known and its data phase over: the
    /// SENSE IU, and the data pipe to the next task.
    fn settle(&mut self, tag: u16) -> Vec<IoStart> {
        let Some(t) = self.tasks.get_mut(&tag) else {
            return Vec::new();
        };
        t.settle_write();
        let done = !t.busy && !t.zlp && matches!(t.work, Work::Nothing);
        let status = match t.status {
            Some(s) if done => s,
            _ => return Vec::new(),
        };
        self.tasks.remove(&tag);
        let (byte, sense) = match status {
            Status::CheckCondition(s) => (STATUS_CHECK_CONDITION, Some(s)),
            Status::DataPathFailed => (STATUS_CHECK_CONDITION, Some(Sense::TARGET_FAILURE)),
            s => (s.byte().unwrap_or(STATUS_CHECK_CONDITION), None),
        };
        self.queue_iu(DeviceIu::Sense {
            tag,
            status: byte,
            sense,
        });
        self.release(tag)
    }

    /// A transfer on the command pipe: one IU.
    fn command_pipe(&mut self, bus: &ScsiBus, data: &mut dyn PacketData) -> (Packet, Vec<IoStart>) {
        if self.queue.len() >= MAX_QUEUED {
            // The host is not reading status: no more work until it does.
            return (Packet::Nak, Vec::new());
        }
        let n = data.len().min(iu::MAX_IU_LEN);
        let mut b = vec![0u8; n];
        if data.copy_from_host(0, &mut b).is_err() {
            return (Packet::Done(UsbResult::Error), Vec::new());
        }
        let ack = Packet::Done(UsbResult::Ack(data.len()));
        let ios = match HostIu::parse(&b) {
            Err(IuError::NoHeader(n)) => {
                log::debug!("usb-uas: {n}-byte IU");
                return (Packet::Stall, Vec::new());
            }
            Err(IuError::Invalid { tag }) => {
                self.respond(tag, iu::response::INVALID_IU);
                Vec::new()
            }
            Ok(HostIu::Command(c)) => self.command(bus, c),
            Ok(HostIu::TaskManagement(t)) => self.task_management(bus, t),
        };
        (ack, ios)
    }

    fn respond(&mut self, tag: u16, code: u8) {
        self.queue_iu(DeviceIu::Response { tag, code });
    }

    fn fake_sense(&mut self, tag: u16, status: u8, sense: Option<Sense>) {
        self.queue_iu(DeviceIu::Sense { tag, status, sense });
    }

    /// Whether `tag` may name a task: any value at high speed, a stream id
    /// at SuperSpeed.
    fn valid_tag(&self, tag: u16) -> bool {
        !self.streams || (1..=MAX_STREAMS).contains(&tag)
    }

    /// A COMMAND IU: plan it on the bus and start what can start.
    fn command(&mut self, bus: &ScsiBus, c: CommandIu) -> Vec<IoStart> {
        let tag = c.tag;
        if !self.valid_tag(tag) {
            self.respond(tag, iu::response::INVALID_IU);
            return Vec::new();
        }
        if self.tasks.contains_key(&tag) {
            self.respond(tag, iu::response::OVERLAPPED_TAG);
            return Vec::new();
        }
        if self.tasks.len() >= MAX_TASKS {
            self.fake_sense(tag, STATUS_TASK_SET_FULL, None);
            return Vec::new();
        }
        let planned = iu::decode_lun(&c.lun).and_then(|l| Some((l, bus.plan(0, l, &c.cdb)?)));
        let Some((lun, (unit, plan))) = planned else {
            // No target at all, or a LUN no single target has.
            self.fake_sense(tag, STATUS_CHECK_CONDITION, Some(Sense::LUN_NOT_SUPPORTED));
            return Vec::new();
        };
        self.seq += 1;
        let mut t = Task {
            seq: self.seq,
            lun,
            req: Request::new(),
            dir: plan.direction(),
            active: self.streams,
            work: Work::Nothing,
            busy: false,
            status: None,
            zlp: false,
        };
        let mut ios = Vec::new();
        let len = plan.data_len();
        match plan {
            Plan::DataIn(v) if !v.is_empty() => {
                t.status = Some(Status::Good);
                t.work = Work::Buffer { data: v, pos: 0 };
            }
            Plan::Read { offset, len } if len > 0 => {
                t.work = Work::Read {
                    unit,
                    offset,
                    len,
                    asked: 0,
                    stage: Vec::new(),
                    pos: 0,
                }
            }
            Plan::Write { offset, len, fua } if len > 0 => {
                t.work = Work::Write {
                    unit,
                    compare: false,
                    fua,
                    offset,
                    len,
                    sent: 0,
                    stage: Vec::new(),
                }
            }
            Plan::Compare { offset, len } if len > 0 => {
                t.work = Work::Write {
                    unit,
                    compare: true,
                    fua: false,
                    offset,
                    len,
                    sent: 0,
                    stage: Vec::new(),
                }
            }
            plan @ (Plan::WriteSame { .. } | Plan::DataOut { .. })
                if t.dir == Direction::Out && len as usize <= CHUNK =>
            {
                t.work = Work::Gather {
                    unit,
                    plan,
                    buf: Vec::new(),
                    need: len as usize,
                }
            }
            // No data (or a parameter list too long to hold, which the
            // runner refuses without asking for data): run it whole.
            plan => {
                t.dir = Direction::None;
                ios.push(t.whole(tag, unit, plan, VecPath::new(0)));
            }
        }
        if t.active {
            ios.extend(t.next_read(tag));
        }
        self.tasks.insert(tag, t);
        self.changed = true;
        ios.extend(self.activate());
        ios.extend(self.settle(tag));
        ios
    }

    /// A TASK MANAGEMENT IU (UAS-2 6.2.6; SAM-5 7).
    fn task_management(&mut self, bus: &ScsiBus, t: TaskManagementIu) -> Vec<IoStart> {
        use iu::response::*;
        let tag = t.tag;
        if !self.valid_tag(tag) {
            self.respond(tag, INVALID_IU);
            return Vec::new();
        }
        if self.tasks.contains_key(&tag) {
            self.respond(tag, OVERLAPPED_TAG);
            return Vec::new();
        }
        let lun = iu::decode_lun(&t.lun);
        let unit = lun.and_then(|l| bus.lun(0, l).map(|u| (l, u)));
        let Some((lun, unit)) = unit else {
            self.respond(tag, INCORRECT_LUN);
            return Vec::new();
        };
        let on_lun: Vec<u16> = self
            .tasks
            .iter()
            .filter(|(_, x)| x.lun == lun)
            .map(|(&k, _)| k)
            .collect();
        let mut ios = Vec::new();
        let code = match t.function {
            Tmf::AbortTask => {
                if on_lun.contains(&t.task_tag) {
                    ios = self.abort(t.task_tag);
                }
                TMF_COMPLETE
            }
            Tmf::AbortTaskSet | Tmf::ClearTaskSet => {
                for k in on_lun {
                    ios.extend(self.abort(k));
                }
                TMF_COMPLETE
            }
            Tmf::LogicalUnitReset => {
                for k in on_lun {
                    ios.extend(self.abort(k));
                }
                unit.reset();
                TMF_COMPLETE
            }
            Tmf::ITNexusReset => {
                let all: Vec<u16> = self.tasks.keys().copied().collect();
                for k in all {
                    ios.extend(self.abort(k));
                }
                TMF_COMPLETE
            }
            Tmf::QueryTask if on_lun.contains(&t.task_tag) => TMF_SUCCEEDED,
            Tmf::QueryTaskSet if !on_lun.is_empty() => TMF_SUCCEEDED,
            Tmf::QueryTask | Tmf::QueryTaskSet | Tmf::QueryAsyncEvent => TMF_COMPLETE,
            Tmf::ClearAca | Tmf::Other(_) => TMF_NOT_SUPPORTED,
        };
        self.respond(tag, code);
        ios
    }

    /// A transfer on the status pipe: the oldest IU (of its stream at
    /// SuperSpeed).
    fn status_pipe(&mut self, stream: u16, data: &mut dyn PacketData) -> Packet {
        let at = if self.streams {
            self.queue.iter().position(|i| i.tag() == stream)
        } else if self.queue.is_empty() {
            None
        } else {
            Some(0)
        };
        let Some(at) = at else {
            return Packet::Nak;
        };
        let bytes = match self.queue.get(at) {
            Some(iu) => iu.to_bytes(),
            None => return Packet::Nak,
        };
        // A buffer too small for the IU gets what fits (the host's loss).
        let n = bytes.len().min(data.len());
        if data.copy_to_host(0, &bytes[..n]).is_err() {
            return Packet::Done(UsbResult::Error);
        }
        self.queue.remove(at);
        // Room in the queue for the command pipe.
        self.changed = true;
        Packet::Done(UsbResult::Ack(n))
    }

    /// A transfer on a data pipe.
    fn data_pipe(
        &mut self,
        ep: Endpoint,
        stream: u16,
        mps: usize,
        data: &mut dyn PacketData,
    ) -> (Packet, Vec<IoStart>) {
        let tag = if self.streams {
            Some(stream)
        } else if ep == EP_DATA_IN {
            self.data_in
        } else {
            self.data_out
        };
        let task = tag.and_then(|tag| Some((tag, self.tasks.get_mut(&tag)?)));
        let Some((tag, t)) = task else {
            // At SuperSpeed the command may still come; at high speed the
            // host moves data only after a READY IU (QEMU stalls too).
            return if self.streams {
                (Packet::Nak, Vec::new())
            } else {
                (Packet::Stall, Vec::new())
            };
        };
        let want = if ep == EP_DATA_IN {
            Direction::In
        } else {
            Direction::Out
        };
        if t.dir == Direction::None {
            // A command with no data phase (a READ refused with CHECK
            // CONDITION, say) whose data transfer the host posted on its
            // stream: its SENSE IU comes, and the host cancels the
            // transfer then; a stall would halt every stream.
            return (Packet::Nak, Vec::new());
        }
        if t.dir != want || !t.active {
            return (Packet::Stall, Vec::new());
        }
        let (r, io) = if ep == EP_DATA_IN {
            t.data_in(tag, mps, data)
        } else {
            t.data_out(tag, mps, data)
        };
        if matches!(r, Packet::Done(UsbResult::Ack(n)) if n > 0) {
            self.changed = true;
        }
        let mut ios: Vec<IoStart> = io.into_iter().collect();
        ios.extend(self.settle(tag));
        (r, ios)
    }

    /// A piece of I/O finished; returns what to start next.
    fn complete(
        &mut self,
        tag: u16,
        seq: u64,
        kind: IoKind,
        o: Outcome,
        path: VecPath,
    ) -> Vec<IoStart> {
        let Some(t) = self.tasks.get_mut(&tag).filter(|t| t.seq == seq) else {
            return Vec::new();
        };
        t.busy = false;
        self.changed = true;
        let ok = o.status == Status::Good;
        let mut ios = Vec::new();
        match kind {
            IoKind::Read(n) => match &mut t.work {
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
                        t.status.get_or_insert(Status::Good);
                    }
                }
                _ => t.fail(o.status),
            },
            IoKind::Write(_) => {
                if ok {
                    ios.extend(t.next_write(tag));
                } else {
                    t.fail(o.status);
                }
            }
            IoKind::Whole => {
                t.status.get_or_insert(o.status);
            }
        }
        ios.extend(self.settle(tag));
        ios
    }
}

impl Task {
    /// The data phase failed partway: the SENSE IU reports it, what is
    /// left of the data phase is dropped.
    fn fail(&mut self, s: Status) {
        self.status = Some(match s {
            Status::Good => Status::CheckCondition(Sense::TARGET_FAILURE),
            s => s,
        });
        self.work = Work::Nothing;
        self.zlp = false;
    }

    fn whole(
        &mut self,
        tag: u16,
        unit: Option<Arc<dyn Lun>>,
        plan: Plan,
        path: VecPath,
    ) -> IoStart {
        self.busy = true;
        IoStart {
            tag,
            seq: self.seq,
            req: self.req.clone(),
            unit,
            plan,
            path,
            kind: IoKind::Whole,
        }
    }

    /// A write whose last piece is on the medium is GOOD.
    fn settle_write(&mut self) {
        if let Work::Write {
            len, sent, stage, ..
        } = &self.work
        {
            if !self.busy && *sent == *len && stage.is_empty() {
                self.status.get_or_insert(Status::Good);
                self.work = Work::Nothing;
            }
        }
    }

    /// The next read piece, when there is room for it.
    fn next_read(&mut self, tag: u16) -> Option<IoStart> {
        if self.busy || !self.active {
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
            tag,
            seq: self.seq,
            req: self.req.clone(),
            unit,
            plan,
            path: VecPath::new(n),
            kind: IoKind::Read(n),
        })
    }

    /// The next write piece, once the stage holds a full piece or the
    /// last one.
    fn next_write(&mut self, tag: u16) -> Option<IoStart> {
        if self.busy {
            return None;
        }
        let Work::Write {
            unit,
            compare,
            fua,
            offset,
            len,
            sent,
            stage,
        } = &mut self.work
        else {
            return None;
        };
        let n = stage.len();
        if n == 0 || (n < CHUNK && *sent + n as u64 != *len) {
            return None;
        }
        let at = *offset + *sent;
        let plan = if *compare {
            Plan::Compare {
                offset: at,
                len: n as u64,
            }
        } else {
            Plan::Write {
                offset: at,
                len: n as u64,
                fua: *fua,
            }
        };
        *sent += n as u64;
        let unit = unit.clone();
        let buf = std::mem::take(stage);
        self.busy = true;
        Some(IoStart {
            tag,
            seq: self.seq,
            req: self.req.clone(),
            unit,
            plan,
            path: VecPath { buf },
            kind: IoKind::Write(n),
        })
    }

    /// A data-in transfer.
    fn data_in(
        &mut self,
        tag: u16,
        mps: usize,
        data: &mut dyn PacketData,
    ) -> (Packet, Option<IoStart>) {
        let want = data.len();
        if matches!(self.work, Work::Nothing) {
            // The data ended on a packet boundary: a zero-length packet.
            self.zlp = false;
            return (Packet::Done(UsbResult::Ack(0)), None);
        }
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
                    // Whole packets unless this is the end of the data: a
                    // part of a packet would end the host's transfer.
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
                    }
                    if last && *pos == stage.len() {
                        self.work = Work::Nothing;
                        break;
                    }
                    if io.is_none() {
                        io = self.next_read(tag);
                    }
                    if n == 0 || done < want {
                        break;
                    }
                }
                _ => break,
            }
        }
        if done == 0 && want > 0 {
            return (Packet::Nak, io);
        }
        if matches!(self.work, Work::Nothing) && done < want && done.is_multiple_of(mps) {
            self.zlp = true;
        }
        (Packet::Done(UsbResult::Ack(done)), io)
    }

    /// A data-out transfer.
    fn data_out(
        &mut self,
        tag: u16,
        mps: usize,
        data: &mut dyn PacketData,
    ) -> (Packet, Option<IoStart>) {
        let want = data.len();
        match &mut self.work {
            Work::Write {
                len, sent, stage, ..
            } => {
                let dev_left = (*len - *sent) as usize - stage.len();
                if dev_left == 0 {
                    // More than the command moves: discarded.
                    return (Packet::Done(UsbResult::Ack(want)), None);
                }
                let room = (CHUNK - stage.len()).min(dev_left);
                // A packet is taken whole or not at all; a transfer of
                // many packets may be taken in whole packets; the end of
                // the data may come with more than the command moves.
                let (take, ack) = if want <= room {
                    (want, want)
                } else if room == dev_left {
                    (room, want)
                } else if want > mps {
                    (room - room % mps, room - room % mps)
                } else {
                    (0, 0)
                };
                if take == 0 {
                    return (Packet::Nak, None);
                }
                let at = stage.len();
                stage.resize(at + take, 0);
                if data.copy_from_host(0, &mut stage[at..]).is_err() {
                    stage.truncate(at);
                    return (Packet::Done(UsbResult::Error), None);
                }
                (Packet::Done(UsbResult::Ack(ack)), self.next_write(tag))
            }
            Work::Gather { buf, need, .. } => {
                let take = want.min(*need - buf.len());
                let at = buf.len();
                buf.resize(at + take, 0);
                if data.copy_from_host(0, &mut buf[at..]).is_err() {
                    buf.truncate(at);
                    return (Packet::Done(UsbResult::Error), None);
                }
                if buf.len() < *need {
                    return (Packet::Done(UsbResult::Ack(want)), None);
                }
                let Work::Gather {
                    unit, plan, buf, ..
                } = std::mem::replace(&mut self.work, Work::Nothing)
                else {
                    unreachable!("matched above")
                };
                let io = self.whole(tag, unit, plan, VecPath { buf });
                (Packet::Done(UsbResult::Ack(want)), Some(io))
            }
            // Data after the end: discarded.
            _ => (Packet::Done(UsbResult::Ack(want)), None),
        }
    }
}

/// Runs a piece of I/O outside the state's lock; its completion updates
/// the task, starts what became ready and wakes the endpoints that NAKed.
fn run_io(state: &Arc<Mutex<State>>, io: IoStart) {
    let shared = state.clone();
    let (tag, seq, kind) = (io.tag, io.seq, io.kind);
    request::run(&io.req, io.unit, io.plan, io.path, move |o, path| {
        let (next, wakes) = {
            let mut s = lock(&shared);
            let next = s.complete(tag, seq, kind, o, path);
            (next, s.take_wakes())
        };
        deliver(wakes);
        for n in next {
            run_io(&shared, n);
        }
    });
}
