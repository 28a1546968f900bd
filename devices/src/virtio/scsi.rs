//! The virtio SCSI host device (virtio 1.2, section 5.6): a SCSI bus of up
//! to 256 targets reached through virtqueues.
//!
//! - Queue 0 (control, 5.6.6.2): task management functions (abort task,
//!   abort/clear task set, logical unit reset, I_T nexus reset, query
//!   task and task set) and asynchronous notification queries and
//!   subscriptions, answered at once.
//! - Queue 1 (event, 5.6.6.3): the driver's buffers for events, each
//!   held as an in-flight request until the device has an event to
//!   report (a unit plugged or unplugged, [`Hotplug`]), never spun on.
//! - Queues 2.. (request, 5.6.6.1): each chain is parsed into a typed
//!   [`CmdRequest`] (LUN, tag, CDB, the data-out and data-in parts, the
//!   response header) before anything runs; the command then runs on the
//!   shared SCSI target ([`crate::scsi::bus::ScsiBus`]) through the one
//!   request runner, and [`respond`] is the one place that writes the
//!   response (sense, residual, status, response code).
//!
//! Nothing a driver puts in a chain can panic the device or make it
//! allocate beyond the request runner's bounded chunks: lengths come from
//! the walked chain, which checks every buffer against guest RAM.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use event_manager::SubscriberId;

use super::chain::{Chain, ChainHead};
use super::event_loop::EventLoop;
use super::queue_worker::{Completer, InFlight, QueueHandler, QueueIo, QueueWorker};
use super::{features as vf, Activation, VirtioDevice};
use crate::bus::{lock, put_le};
use crate::dma::GuestSgList;
use crate::scsi::bus::ScsiBus;
use crate::scsi::request::{DataPath, DataPathError, Outcome, Request, Status};
use crate::GuestMem;

pub const DEVICE_TYPE: u16 = 8;

/// Feature bits (section 5.6.3).
pub mod features {
    /// Requests with both data-out and data-in.
    pub const INOUT: u64 = 1 << 0;
    /// Hotplug and unplug events on the event queue.
    pub const HOTPLUG: u64 = 1 << 1;
    /// Parameter-change events (capacity, medium) on the event queue.
    pub const CHANGE: u64 = 1 << 2;
}

/// Response codes (section 5.6.6.1.1).
pub mod response {
    pub const OK: u8 = 0;
    pub const OVERRUN: u8 = 1;
    pub const ABORTED: u8 = 2;
    pub const BAD_TARGET: u8 = 3;
    pub const TRANSPORT_FAILURE: u8 = 6;
    pub const FAILURE: u8 = 9;
    pub const FUNCTION_SUCCEEDED: u8 = 10;
    pub const FUNCTION_REJECTED: u8 = 11;
    pub const INCORRECT_LUN: u8 = 12;
}

/// Control request types and task management subtypes (5.6.6.2).
mod ctrl {
    pub const TMF: u32 = 0;
    pub const AN_QUERY: u32 = 1;
    pub const AN_SUBSCRIBE: u32 = 2;
    pub const ABORT_TASK: u32 = 0;
    pub const ABORT_TASK_SET: u32 = 1;
    pub const CLEAR_ACA: u32 = 2;
    pub const CLEAR_TASK_SET: u32 = 3;
    pub const I_T_NEXUS_RESET: u32 = 4;
    pub const LOGICAL_UNIT_RESET: u32 = 5;
    pub const QUERY_TASK: u32 = 6;
    pub const QUERY_TASK_SET: u32 = 7;
}

/// The default and largest CDB and sense sizes (the driver may lower
/// them through the configuration, 5.6.4).
pub const CDB_SIZE: u32 = 32;
pub const SENSE_SIZE: u32 = 96;
/// Bytes of virtio_scsi_cmd_req before the CDB: lun, tag, task_attr,
/// prio, crn.
const REQ_HEADER: u64 = 19;
/// Bytes of virtio_scsi_cmd_resp before the sense: sense_len, resid,
/// status_qualifier, status, response.
const RESP_HEADER: u64 = 12;
/// The configuration structure (5.6.4).
const CONFIG_LEN: usize = 36;
/// Largest target id and LUN (QEMU's: the LUN's 14-bit flat space).
pub const MAX_TARGET: u32 = 255;
pub const MAX_LUN: u32 = 16383;

/// The options of one device (QEMU's `virtio-scsi-pci` properties).
#[derive(Clone, Debug)]
pub struct ScsiOptions {
    /// Request queues.
    pub num_queues: u16,
    pub queue_size: u16,
    pub max_sectors: u32,
    pub cmd_per_lun: u32,
    pub hotplug: bool,
    pub param_change: bool,
}

impl Default for ScsiOptions {
    fn default() -> Self {
        ScsiOptions {
            num_queues: 1,
            queue_size: 256,
            max_sectors: 0xffff,
            cmd_per_lun: 128,
            hotplug: true,
            param_change: true,
        }
    }
}

impl ScsiOptions {
    pub fn validate(&self) -> Result<(), String> {
        if self.num_queues == 0 || self.num_queues > 1022 {
            return Err(format!(
                "num_queues={}: must be between 1 and 1022",
                self.num_queues
            ));
        }
        if self.queue_size <= 2 || !self.queue_size.is_power_of_two() || self.queue_size > 1024 {
            return Err(format!(
                "virtqueue_size={}: must be a power of two between 4 and 1024",
                self.queue_size
            ));
        }
        Ok(())
    }
}

/// The initiator's buffer of a command: a part of the chain.
pub struct SgPath {
    mem: Arc<GuestMem>,
    sg: GuestSgList,
    /// Handed back unused: the command's target was gone.
    no_target: bool,
}

impl DataPath for SgPath {
    fn len(&self) -> u64 {
        self.sg.len()
    }
    fn copy_to_initiator(&mut self, offset: u64, data: &[u8]) -> Result<(), DataPathError> {
        self.sg
            .write_at(&self.mem, offset, data)
            .map_err(|_| DataPathError)
    }
    fn copy_from_initiator(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DataPathError> {
        self.sg
            .read_at(&self.mem, offset, buf)
            .map_err(|_| DataPathError)
    }
}

/// Where a command's target and LUN are: the 8-byte LUN field
/// (5.6.6.1: byte 0 is 1, byte 1 the target, bytes 2-3 the LUN in SAM's
/// single-level flat or peripheral form).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Address {
    pub target: u32,
    pub lun: u64,
}

impl Address {
    /// `None` for a LUN field that names no target of this bus.
    pub fn parse(f: &[u8; 8]) -> Option<Address> {
        if f[0] != 1 {
            return None;
        }
        Some(Address {
            target: f[1] as u32,
            lun: ((f[2] as u64) << 8 | f[3] as u64) & 0x3fff,
        })
    }
}

/// A parsed request-queue chain.
pub struct CmdRequest {
    /// `None`: a LUN field that names no target (BAD_TARGET).
    pub addr: Option<Address>,
    pub tag: u64,
    pub cdb: Vec<u8>,
    /// Where virtio_scsi_cmd_resp goes.
    pub resp: GuestSgList,
    /// Data-out (device-readable after the header) and data-in
    /// (device-writable after the response header).
    pub data_out: GuestSgList,
    pub data_in: GuestSgList,
}

/// Why a request chain was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// The chain itself is broken (or no room for the response header):
    /// the driver gets a used entry with nothing written.
    Unanswerable,
    /// Answerable with this response code.
    Respond(u8),
}

impl CmdRequest {
    /// Parses a walked chain: `cdb_size` and `sense_size` as the driver
    /// configured them.
    pub fn parse(
        mem: &GuestMem,
        chain: &Chain,
        cdb_size: u32,
        sense_size: u32,
    ) -> Result<(CmdRequest, GuestSgList), (ParseError, Option<GuestSgList>)> {
        let resp_len = RESP_HEADER + sense_size as u64;
        let mut wr = chain.writer(mem);
        let mut resp = GuestSgList::new(usize::MAX, u64::MAX);
        {
            let Ok((mut head, _)) = wr.clone().split_at(resp_len) else {
                return Err((ParseError::Unanswerable, None));
            };
            if head.sg_list(&mut resp).is_err() {
                return Err((ParseError::Unanswerable, None));
            }
        }
        let fail = |code| Err((ParseError::Respond(code), Some(resp.clone())));
        if chain.readable_len() < REQ_HEADER + cdb_size as u64 {
            return fail(response::FAILURE);
        }
        let mut rd = chain.reader(mem);
        let Ok(lun) = rd.read_array::<8>() else {
            return fail(response::FAILURE);
        };
        let Ok(tag) = rd.read_array::<8>() else {
            return fail(response::FAILURE);
        };
        if rd.skip(3).is_err() {
            return fail(response::FAILURE);
        }
        let mut cdb = vec![0u8; cdb_size as usize];
        if rd.read_exact(&mut cdb).is_err() {
            return fail(response::FAILURE);
        }
        let mut data_out = GuestSgList::new(usize::MAX, u64::MAX);
        let mut data_in = GuestSgList::new(usize::MAX, u64::MAX);
        if wr.skip(resp_len).is_err()
            || rd.sg_list(&mut data_out).is_err()
            || wr.sg_list(&mut data_in).is_err()
        {
            return fail(response::FAILURE);
        }
        // Bidirectional commands need VIRTIO_SCSI_F_INOUT, which is not
        // offered; no SCSI command here moves data both ways.
        if !data_out.is_empty() && !data_in.is_empty() {
            return fail(response::FAILURE);
        }
        let req = CmdRequest {
            addr: Address::parse(&lun),
            tag: u64::from_le_bytes(tag),
            cdb,
            resp: resp.clone(),
            data_out,
            data_in,
        };
        Ok((req, resp))
    }
}

/// Writes virtio_scsi_cmd_resp and returns the used length: the one
/// place a request's answer is written.
fn respond(mem: &GuestMem, resp: &GuestSgList, out: &Response, data_in: u64) -> u32 {
    let mut h = vec![0u8; resp.len() as usize];
    let sense_room = h.len().saturating_sub(RESP_HEADER as usize);
    let sense = out.sense.as_deref().unwrap_or(&[]);
    let n = sense.len().min(sense_room);
    h[0..4].copy_from_slice(&(n as u32).to_le_bytes());
    h[4..8].copy_from_slice(&(out.residual.min(u32::MAX as u64) as u32).to_le_bytes());
    h[10] = out.status;
    h[11] = out.response;
    h[RESP_HEADER as usize..RESP_HEADER as usize + n].copy_from_slice(&sense[..n]);
    if resp.write_at(mem, 0, &h).is_err() {
        return 0;
    }
    (h.len() as u64 + data_in).min(u32::MAX as u64) as u32
}

/// A request's answer.
#[derive(Debug, Default)]
struct Response {
    response: u8,
    status: u8,
    residual: u64,
    sense: Option<Vec<u8>>,
}

impl Response {
    fn code(response: u8) -> Self {
        Response {
            response,
            ..Default::default()
        }
    }

    fn of(o: &Outcome, buffer: u64) -> Self {
        let mut r = Response {
            residual: o.residual,
            ..Default::default()
        };
        match o.status {
            Status::Good => {}
            Status::CheckCondition(s) => {
                r.status = 2;
                r.sense = Some(s.fixed().to_vec());
            }
            Status::Aborted => {
                r.response = response::ABORTED;
                r.residual = buffer;
            }
            Status::DataPathFailed => {
                r.response = response::TRANSPORT_FAILURE;
                r.residual = buffer;
            }
        }
        if o.overrun && r.response == response::OK {
            r.response = response::OVERRUN;
        }
        r
    }
}

/// How a command ended, or an event buffer was used.
pub enum Done {
    Ran(Outcome),
    /// Its target went away before it could start.
    BadTarget,
    /// An event for an event-queue buffer (virtio_scsi_event).
    Event([u8; EVENT_LEN]),
    /// The device is being reset: the event buffer goes back unused.
    NoEvent,
}

/// Event types and reasons (5.6.6.3).
mod event {
    pub const TRANSPORT_RESET: u32 = 1;
    pub const EVENTS_MISSED: u32 = 0x8000_0000;
    pub const RESCAN: u32 = 0;
    pub const REMOVED: u32 = 2;
}
/// struct virtio_scsi_event: event, lun[8], reason.
const EVENT_LEN: usize = 16;
/// Events kept while the driver has no buffer; past this they are
/// dropped and the next one says EVENTS_MISSED.
const MAX_PENDING_EVENTS: usize = 64;

/// The event queue's state, shared by the device (told about hotplug by
/// the VMM) and the queue handler (which receives the driver's buffers).
/// Each buffer is an in-flight request whose [`Completer`] waits here for
/// an event, so an event from any thread reaches the worker through the
/// ordinary completion path.
#[derive(Default)]
struct EventQueue {
    /// The device runs: buffers are held (not while it resets, when the
    /// worker waits for every request).
    open: bool,
    /// The driver negotiated HOTPLUG: events are reported.
    enabled: bool,
    buffers: VecDeque<Completer<Done>>,
    pending: VecDeque<[u8; EVENT_LEN]>,
    missed: bool,
}

impl EventQueue {
    fn push(&mut self, mut ev: [u8; EVENT_LEN]) {
        if !self.enabled {
            return;
        }
        if std::mem::take(&mut self.missed) {
            let t = u32::from_le_bytes(ev[0..4].try_into().unwrap_or_default());
            ev[0..4].copy_from_slice(&(t | event::EVENTS_MISSED).to_le_bytes());
        }
        match self.buffers.pop_front() {
            Some(c) => c.complete(Done::Event(ev)),
            None if self.pending.len() < MAX_PENDING_EVENTS => self.pending.push_back(ev),
            None => self.missed = true,
        }
    }

    /// Gives every held buffer back (a reset: the worker waits for them).
    fn cancel(&mut self) {
        self.open = false;
        self.enabled = false;
        self.pending.clear();
        self.missed = false;
        for c in self.buffers.drain(..) {
            c.complete(Done::NoEvent);
        }
    }
}

/// The VMM's handle on a device's event queue: hotplug and unplug of
/// units on its bus, reported to the driver when it negotiated HOTPLUG.
#[derive(Clone)]
pub struct Hotplug(Arc<Mutex<EventQueue>>);

impl Hotplug {
    /// A unit appeared (`plugged`) or went at (`target`, `lun`):
    /// TRANSPORT_RESET with reason RESCAN or REMOVED.
    pub fn notify(&self, target: u32, lun: u32, plugged: bool) {
        let mut ev = [0u8; EVENT_LEN];
        ev[0..4].copy_from_slice(&event::TRANSPORT_RESET.to_le_bytes());
        ev[4] = 1;
        ev[5] = target as u8;
        ev[6] = 0x40 | (lun >> 8) as u8 & 0x3f;
        ev[7] = lun as u8;
        let reason = if plugged {
            event::RESCAN
        } else {
            event::REMOVED
        };
        ev[12..16].copy_from_slice(&reason.to_le_bytes());
        lock(&self.0).push(ev);
    }
}

/// What the worker keeps for a request in flight.
pub enum Token {
    Cmd(CmdToken),
    /// An event-queue buffer: where the event goes.
    Event(GuestSgList),
}

/// What the worker keeps for a command in flight.
pub struct CmdToken {
    resp: GuestSgList,
    addr: Address,
    tag: u64,
    data_in: bool,
    buffer: u64,
}

/// The request-queue and control-queue side of the device.
pub struct ScsiHandler {
    bus: Arc<ScsiBus>,
    chain: Chain,
    indirect: bool,
    cdb_size: u32,
    sense_size: u32,
    /// Commands running, for the task management functions.
    running: Vec<(Address, u64, Request)>,
    events: Arc<Mutex<EventQueue>>,
}

impl ScsiHandler {
    fn command(&mut self, io: &mut QueueIo<Done, Token>, queue: usize, at: ChainHead) {
        let head = at.head;
        if self.chain.walk(io.mem(), at, self.indirect).is_err() {
            io.finish(queue, head, 0);
            return;
        }
        let (req, resp) =
            match CmdRequest::parse(io.mem(), &self.chain, self.cdb_size, self.sense_size) {
                Ok(r) => r,
                Err((ParseError::Unanswerable, _)) => {
                    log::debug!("virtio-scsi: request chain {head} has no room for a response");
                    io.finish(queue, head, 0);
                    return;
                }
                Err((ParseError::Respond(code), Some(resp))) => {
                    let used = respond(io.mem(), &resp, &Response::code(code), 0);
                    io.finish(queue, head, used);
                    return;
                }
                Err((ParseError::Respond(_), None)) => {
                    io.finish(queue, head, 0);
                    return;
                }
            };
        let Some(addr) = req.addr.filter(|a| self.bus.has_target(a.target)) else {
            let used = respond(io.mem(), &resp, &Response::code(response::BAD_TARGET), 0);
            io.finish(queue, head, used);
            return;
        };
        let data_in = !req.data_in.is_empty();
        let sg = if data_in { req.data_in } else { req.data_out };
        let token = CmdToken {
            resp: req.resp,
            addr,
            tag: req.tag,
            data_in,
            buffer: sg.len(),
        };
        let c = io.submit(queue, head, Token::Cmd(token));
        let path = SgPath {
            mem: io.mem_arc().clone(),
            sg,
            no_target: false,
        };
        let done = move |o, p: SgPath| {
            c.complete(match p.no_target {
                true => Done::BadTarget,
                false => Done::Ran(o),
            })
        };
        match self.bus.start(addr.target, addr.lun, &req.cdb, path, done) {
            Ok(r) => self.running.push((addr, req.tag, r)),
            // Unplugged since the check: the closure (which holds the
            // completer) is told so through the path.
            Err((mut path, done)) => {
                path.no_target = true;
                let nothing = Outcome {
                    status: Status::Aborted,
                    transferred: 0,
                    residual: 0,
                    overrun: false,
                };
                done(nothing, path);
            }
        }
    }

    fn control(&mut self, io: &mut QueueIo<Done, Token>, queue: usize, at: ChainHead) {
        let head = at.head;
        if self.chain.walk(io.mem(), at, self.indirect).is_err() {
            io.finish(queue, head, 0);
            return;
        }
        let mut rd = self.chain.reader(io.mem());
        let mut wr = self.chain.writer(io.mem());
        let Ok(ty) = rd.read_array::<4>().map(u32::from_le_bytes) else {
            io.finish(queue, head, 0);
            return;
        };
        let answer: Vec<u8> = match ty {
            ctrl::TMF => {
                let req = (|| -> Result<(u32, [u8; 8], u64), super::chain::ChainError> {
                    let sub = u32::from_le_bytes(rd.read_array()?);
                    let lun = rd.read_array::<8>()?;
                    let tag = u64::from_le_bytes(rd.read_array()?);
                    Ok((sub, lun, tag))
                })();
                match req {
                    Ok((sub, lun, tag)) => vec![self.task_management(sub, &lun, tag)],
                    Err(_) => vec![response::FAILURE],
                }
            }
            // No asynchronous notifications are offered: none are
            // reported or subscribed (event_actual 0).
            ctrl::AN_QUERY | ctrl::AN_SUBSCRIBE => {
                let mut v = vec![0u8; 5];
                v[4] = response::OK;
                v
            }
            _ => vec![response::FAILURE],
        };
        let n = (answer.len() as u64).min(wr.remaining()) as usize;
        let used = match wr.write_all(&answer[..n]) {
            Ok(()) => n as u32,
            Err(_) => 0,
        };
        io.finish(queue, head, used);
    }

    /// One task management function (SAM-5 7); the response code.
    fn task_management(&self, sub: u32, lun: &[u8; 8], tag: u64) -> u8 {
        let Some(addr) = Address::parse(lun).filter(|a| self.bus.has_target(a.target)) else {
            return response::BAD_TARGET;
        };
        let same_lun = |a: &Address| *a == addr;
        match sub {
            ctrl::ABORT_TASK => {
                for (a, t, r) in &self.running {
                    if same_lun(a) && *t == tag {
                        r.abort();
                    }
                }
                response::OK
            }
            ctrl::ABORT_TASK_SET | ctrl::CLEAR_TASK_SET => {
                self.abort_where(|a| *a == addr);
                response::OK
            }
            ctrl::LOGICAL_UNIT_RESET => {
                self.abort_where(|a| *a == addr);
                match self.bus.lun(addr.target, addr.lun) {
                    Some(u) => {
                        u.reset();
                        response::OK
                    }
                    None => response::INCORRECT_LUN,
                }
            }
            ctrl::I_T_NEXUS_RESET => {
                self.abort_where(|a| a.target == addr.target);
                self.bus.reset_target(addr.target);
                response::OK
            }
            ctrl::QUERY_TASK => {
                if self
                    .running
                    .iter()
                    .any(|(a, t, _)| same_lun(a) && *t == tag)
                {
                    response::FUNCTION_SUCCEEDED
                } else {
                    response::OK
                }
            }
            ctrl::QUERY_TASK_SET => {
                if self.running.iter().any(|(a, _, _)| same_lun(a)) {
                    response::FUNCTION_SUCCEEDED
                } else {
                    response::OK
                }
            }
            // No ACA is ever established (NACA is not supported).
            ctrl::CLEAR_ACA => response::FUNCTION_REJECTED,
            _ => response::FUNCTION_REJECTED,
        }
    }

    fn abort_where(&self, f: impl Fn(&Address) -> bool) {
        for (a, _, r) in &self.running {
            if f(a) {
                r.abort();
            }
        }
    }

    fn forget(&mut self, addr: Address, tag: u64) {
        if let Some(i) = self
            .running
            .iter()
            .position(|(a, t, _)| *a == addr && *t == tag)
        {
            self.running.swap_remove(i);
        }
    }
}

impl ScsiHandler {
    /// An event-queue buffer: held (as an in-flight request) until an
    /// event comes, or used at once for one that waited.
    fn event_buffer(&mut self, io: &mut QueueIo<Done, Token>, queue: usize, at: ChainHead) {
        let head = at.head;
        let mut buf = GuestSgList::new(usize::MAX, u64::MAX);
        let ok = self.chain.walk(io.mem(), at, self.indirect).is_ok()
            && self.chain.readable_len() == 0
            && self
                .chain
                .writer(io.mem())
                .split_at(EVENT_LEN as u64)
                .is_ok_and(|(mut w, _)| w.sg_list(&mut buf).is_ok());
        if !ok {
            // Too small for an event: given back empty.
            io.finish(queue, head, 0);
            return;
        }
        let c = io.submit(queue, head, Token::Event(buf));
        let mut q = lock(&self.events);
        // Held even without HOTPLUG (as QEMU holds them): a buffer handed
        // straight back would let a driver that re-posts it keep the
        // worker busy.
        match q.pending.pop_front() {
            Some(ev) => c.complete(Done::Event(ev)),
            None if q.open => q.buffers.push_back(c),
            None => c.complete(Done::NoEvent),
        }
    }
}

impl QueueHandler for ScsiHandler {
    type Output = Done;
    type Token = Token;
    const NAME: &'static str = "virtio-scsi";

    fn start(&mut self, io: &mut QueueIo<Done, Token>, queue: usize, at: ChainHead) {
        // Positions count only the queues the driver enabled (SeaBIOS
        // enables a request queue alone); the device's index says which.
        match io.queue_index(queue) {
            Some(0) => self.control(io, queue, at),
            Some(1) => self.event_buffer(io, queue, at),
            _ => self.command(io, queue, at),
        }
    }

    fn complete(&mut self, io: &mut QueueIo<Done, Token>, req: InFlight<Token>, out: Done) {
        let t = match &req.token {
            Token::Cmd(t) => t,
            Token::Event(buf) => {
                let used = match out {
                    Done::Event(ev) if buf.write_at(io.mem(), 0, &ev).is_ok() => EVENT_LEN as u32,
                    _ => 0,
                };
                io.finish(req.queue, req.head, used);
                return;
            }
        };
        self.forget(t.addr, t.tag);
        let (r, data_in) = match out {
            Done::Ran(o) => (
                Response::of(&o, t.buffer),
                if t.data_in { o.transferred } else { 0 },
            ),
            Done::BadTarget => (Response::code(response::BAD_TARGET), 0),
            Done::Event(_) | Done::NoEvent => (Response::code(response::FAILURE), 0),
        };
        let used = respond(io.mem(), &t.resp, &r, data_in);
        io.finish(req.queue, req.head, used);
    }

    fn abandon(&mut self, mem: &GuestMem, req: InFlight<Token>, _out: Done) {
        if let Token::Cmd(t) = &req.token {
            let _ = respond(mem, &t.resp, &Response::code(response::ABORTED), 0);
        }
    }
}

/// The virtio-scsi device.
pub struct VirtioScsi {
    bus: Arc<ScsiBus>,
    opts: ScsiOptions,
    event_loop: Arc<EventLoop>,
    running: Option<SubscriberId>,
    cdb_size: u32,
    sense_size: u32,
    events: Arc<Mutex<EventQueue>>,
}

impl VirtioScsi {
    pub fn new(
        bus: Arc<ScsiBus>,
        opts: ScsiOptions,
        event_loop: Arc<EventLoop>,
    ) -> Result<Self, String> {
        opts.validate()?;
        Ok(VirtioScsi {
            bus,
            opts,
            event_loop,
            running: None,
            cdb_size: CDB_SIZE,
            sense_size: SENSE_SIZE,
            events: Arc::default(),
        })
    }

    /// The handle the VMM reports hotplug through.
    pub fn hotplug(&self) -> Hotplug {
        Hotplug(self.events.clone())
    }

    /// The bus units attach to.
    pub fn bus(&self) -> &Arc<ScsiBus> {
        &self.bus
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let o = &self.opts;
        put_le(&mut c[0..4], o.num_queues as u64);
        put_le(&mut c[4..8], (o.queue_size - 2) as u64);
        put_le(&mut c[8..12], o.max_sectors as u64);
        put_le(&mut c[12..16], o.cmd_per_lun as u64);
        put_le(&mut c[16..20], 16); // event_info_size
        put_le(&mut c[20..24], self.sense_size as u64);
        put_le(&mut c[24..28], self.cdb_size as u64);
        put_le(&mut c[28..30], 0); // max_channel
        put_le(&mut c[30..32], MAX_TARGET as u64);
        put_le(&mut c[32..36], MAX_LUN as u64);
        c
    }
}

impl VirtioDevice for VirtioScsi {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }
    fn num_queues(&self) -> usize {
        2 + self.opts.num_queues as usize
    }
    fn queue_max_size(&self) -> u16 {
        self.opts.queue_size
    }
    fn features(&self) -> u64 {
        let mut f = vf::ANY_LAYOUT | vf::RING_EVENT_IDX | vf::RING_INDIRECT_DESC;
        if self.opts.hotplug {
            f |= features::HOTPLUG;
        }
        if self.opts.param_change {
            f |= features::CHANGE;
        }
        f
    }
    fn config_len(&self) -> usize {
        CONFIG_LEN
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only sense_size and cdb_size are the driver's to write (5.6.4);
        // values above what the device supports are clamped so that a
        // request never needs more than the fixed maxima.
        let Ok(v) = <[u8; 4]>::try_from(data).map(u32::from_le_bytes) else {
            return;
        };
        match offset {
            20 => self.sense_size = v.min(SENSE_SIZE),
            24 => self.cdb_size = v.min(CDB_SIZE),
            _ => {}
        }
    }
    fn activate(&mut self, a: Activation) -> Result<(), String> {
        let h = ScsiHandler {
            bus: self.bus.clone(),
            chain: Chain::new(),
            indirect: a.features & vf::RING_INDIRECT_DESC != 0,
            cdb_size: self.cdb_size,
            sense_size: self.sense_size,
            running: Vec::new(),
            events: self.events.clone(),
        };
        {
            let mut q = lock(&self.events);
            q.open = true;
            q.enabled = a.features & features::HOTPLUG != 0;
        }
        let w = QueueWorker::with_handler(a, h)?;
        self.running = Some(self.event_loop.add(Box::new(w))?);
        Ok(())
    }
    fn reset(&mut self) {
        // Held event buffers are in-flight requests the worker would wait
        // for while it drains.
        lock(&self.events).cancel();
        if let Some(id) = self.running.take() {
            drop(self.event_loop.remove(id));
        }
        // A device reset is a bus reset for the units behind it.
        self.bus.reset();
        self.cdb_size = CDB_SIZE;
        self.sense_size = SENSE_SIZE;
    }
}

impl Drop for VirtioScsi {
    fn drop(&mut self) {
        lock(&self.events).cancel();
        if let Some(id) = self.running.take() {
            drop(self.event_loop.remove(id));
        }
    }
}
