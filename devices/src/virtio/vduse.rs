//! The VDUSE back end: a [`VirtioDevice`] served to the host kernel's vDPA
//! bus, so that the host itself sees the export as a virtio device
//! (`virtio_vdpa` makes it a /dev/vdX) or hands it to a VM (`vhost_vdpa`).
//!
//! The interface is Linux's (Documentation/userspace-api/vduse.rst and
//! include/uapi/linux/vduse.h): the device's character device
//! /dev/vduse/NAME carries control messages (`struct vduse_dev_request`
//! read, `struct vduse_dev_response` written: GET_VQ_STATE, SET_STATUS,
//! UPDATE_IOTLB), the driver's memory is reached through IOTLB file
//! descriptors (VDUSE_IOTLB_GET_FD, mapped shared), each ring's setup comes
//! from VDUSE_VQ_GET_INFO, kicks arrive on an eventfd
//! (VDUSE_VQ_SETUP_KICKFD) and interrupts leave by VDUSE_VQ_INJECT_IRQ.
//!
//! The ioctls themselves are the VMM's (`vmm::vduse`, where `unsafe` is
//! allowed); here they are the [`VduseDev`] trait, so that the protocol
//! (message parsing, the device's start, stop and remapping) runs and is
//! tested without the kernel module: tests and the fuzz target drive it
//! with a kernel stand-in. As with vhost-user ([`super::vhost_user`]), the
//! device does not know its transport: the export's virtio-blk is the
//! VMM's.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

use super::{features, status, Activation, ActiveQueue, Notifier, VirtioDevice, VirtioInterrupt};
use crate::bus::lock;
use crate::GuestMem;

/// `struct vduse_dev_request` and `struct vduse_dev_response`: type (or
/// request id), request id (or result), 4 reserved words and a 128-byte
/// union.
pub const MESSAGE_LEN: usize = 24 + 128;

/// `enum vduse_req_type`.
pub mod req {
    pub const GET_VQ_STATE: u32 = 0;
    pub const SET_STATUS: u32 = 1;
    pub const UPDATE_IOTLB: u32 = 2;
}

/// VDUSE_REQ_RESULT_OK / _FAILED.
const RESULT_OK: u32 = 0;
const RESULT_FAILED: u32 = 1;

/// VDUSE_ACCESS_RW: the only regions mapped (a device writes into any
/// buffer it is given a chain for; a read-only mapping would fault).
pub const ACCESS_RW: u8 = 3;

/// VIRTIO_F_ACCESS_PLATFORM: VDUSE refuses devices without it (the
/// driver's addresses are IOVAs, translated through the IOTLB).
pub const ACCESS_PLATFORM: u64 = 1 << 33;

/// Most IOTLB regions mapped at once: bounds the walk of the IOVA space
/// (virtio_vdpa's domain has the bounce buffer and a coherent mapping or
/// a few per ring).
const MAX_REGIONS: usize = 1024;

/// A control message from the kernel, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// The ring's available index, to be answered (the vDPA bus's
    /// get_vq_state).
    GetVqState { index: u32 },
    /// The driver wrote the device status.
    SetStatus { status: u8 },
    /// The mapping of IOVAs [start, last] changed.
    UpdateIotlb { start: u64, last: u64 },
    /// A type this back end does not know: answered FAILED.
    Unknown { ty: u32 },
}

/// A request and the id its response carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: u32,
    pub req: Request,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// Parses one `struct vduse_dev_request`; None if it is short.
pub fn parse(b: &[u8]) -> Option<Message> {
    if b.len() < MESSAGE_LEN {
        return None;
    }
    // The union starts after type, request_id and reserved[4].
    const U: usize = 24;
    let id = u32_at(b, 4);
    let req = match u32_at(b, 0) {
        req::GET_VQ_STATE => Request::GetVqState {
            index: u32_at(b, U),
        },
        req::SET_STATUS => Request::SetStatus { status: b[U] },
        req::UPDATE_IOTLB => Request::UpdateIotlb {
            start: u64_at(b, U),
            last: u64_at(b, U + 8),
        },
        ty => Request::Unknown { ty },
    };
    Some(Message { id, req })
}

/// A `struct vduse_dev_response`: the id, the result, and for
/// GET_VQ_STATE the ring's index and available index.
pub fn response(id: u32, ok: bool, vq_state: Option<(u32, u16)>) -> [u8; MESSAGE_LEN] {
    let mut r = [0u8; MESSAGE_LEN];
    r[0..4].copy_from_slice(&id.to_le_bytes());
    let result = if ok { RESULT_OK } else { RESULT_FAILED };
    r[4..8].copy_from_slice(&result.to_le_bytes());
    if let Some((index, avail)) = vq_state {
        r[24..28].copy_from_slice(&index.to_le_bytes());
        r[28..30].copy_from_slice(&avail.to_le_bytes());
    }
    r
}

/// `struct vduse_vq_info`, for a split ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VqInfo {
    pub num: u32,
    pub desc_addr: u64,
    pub driver_addr: u64,
    pub device_addr: u64,
    pub avail_index: u16,
    pub ready: bool,
}

/// `struct vduse_iotlb_entry` with its file descriptor.
pub struct IotlbEntry {
    pub file: File,
    pub offset: u64,
    pub start: u64,
    pub last: u64,
    pub perm: u8,
}

/// The device's side of the kernel: /dev/vduse/NAME's messages and ioctls.
pub trait VduseDev: Send + Sync {
    /// The next control message into `buf` (its length), or None when none
    /// came within a short while (the caller checks whether to stop).
    fn read_message(&self, buf: &mut [u8; MESSAGE_LEN]) -> std::io::Result<Option<usize>>;
    fn write_response(&self, buf: &[u8; MESSAGE_LEN]) -> std::io::Result<()>;
    /// VDUSE_DEV_GET_FEATURES: what the driver accepted.
    fn features(&self) -> std::io::Result<u64>;
    /// VDUSE_VQ_GET_INFO.
    fn vq_info(&self, index: u32) -> std::io::Result<VqInfo>;
    /// VDUSE_VQ_SETUP_KICKFD (None: VDUSE_EVENTFD_DEASSIGN).
    fn set_kick(&self, index: u32, kick: Option<&Notifier>) -> std::io::Result<()>;
    /// VDUSE_VQ_INJECT_IRQ.
    fn inject_irq(&self, index: u32) -> std::io::Result<()>;
    /// VDUSE_DEV_INJECT_CONFIG_IRQ.
    fn inject_config_irq(&self) -> std::io::Result<()>;
    /// VDUSE_IOTLB_GET_FD: the first region overlapping [start, last].
    fn iotlb(&self, start: u64, last: u64) -> std::io::Result<IotlbEntry>;
}

/// Interrupts go to the kernel, which raises them in the driver.
struct Irq(Arc<dyn VduseDev>);

impl VirtioInterrupt for Irq {
    fn signal_queue(&self, queue: u16) {
        if let Err(e) = self.0.inject_irq(queue as u32) {
            log::debug!("VDUSE: cannot inject the interrupt of ring {queue}: {e}");
        }
    }
    fn signal_config(&self) {
        let _ = self.0.inject_config_irq();
    }
}

/// The device and what the kernel set up.
pub struct State {
    dev: Box<dyn VirtioDevice>,
    kernel: Arc<dyn VduseDev>,
    name: String,
    status: u8,
    mem: Option<GuestMem>,
    /// The kick eventfd of each ring, handed to the kernel at start.
    kicks: Vec<Arc<Notifier>>,
    /// The running rings and their used rings' addresses.
    running: Vec<(u16, u64)>,
    /// Where each ring resumes after a stop (its used index then).
    resume: Vec<Option<u16>>,
}

impl State {
    pub fn new(
        dev: Box<dyn VirtioDevice>,
        kernel: Arc<dyn VduseDev>,
        name: &str,
    ) -> std::io::Result<State> {
        let n = dev.num_queues();
        let kicks = (0..n)
            .map(|_| Notifier::new().map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(State {
            dev,
            kernel,
            name: name.to_string(),
            status: 0,
            mem: None,
            kicks,
            running: Vec::new(),
            resume: vec![None; n],
        })
    }

    /// Answers one control message.
    pub fn handle(&mut self, msg: &[u8]) -> Option<[u8; MESSAGE_LEN]> {
        let m = parse(msg)?;
        let (ok, vq_state) = match m.req {
            Request::GetVqState { index } => match self.avail_index(index) {
                Some(a) => (true, Some((index, a))),
                None => (false, None),
            },
            Request::SetStatus { status } => (self.set_status(status), None),
            Request::UpdateIotlb { .. } => (self.remap(), None),
            Request::Unknown { ty } => {
                log::debug!("{}: unknown VDUSE request type {ty}", self.name);
                (false, None)
            }
        };
        Some(response(m.id, ok, vq_state))
    }

    /// Where ring `index` resumes: its used index, every request the
    /// device took having been answered or being answered in order.
    fn avail_index(&self, index: u32) -> Option<u16> {
        let i = usize::try_from(index).ok()?;
        if i >= self.kicks.len() {
            return None;
        }
        if let (Some(mem), Some(&(_, used))) = (
            self.mem.as_ref(),
            self.running.iter().find(|(q, _)| *q as usize == i),
        ) {
            return mem
                .load::<u16>(GuestAddress(used.wrapping_add(2)), Ordering::Acquire)
                .ok();
        }
        Some(self.resume[i].unwrap_or(0))
    }

    fn set_status(&mut self, s: u8) -> bool {
        let was = self.status;
        self.status = s;
        if s == 0 {
            self.reset();
            return true;
        }
        if s & status::FEATURES_OK != 0 && was & status::FEATURES_OK == 0 {
            match self.kernel.features() {
                Ok(f) => self.dev.ack_features(f & !ACCESS_PLATFORM),
                Err(e) => {
                    log::warn!("{}: VDUSE_DEV_GET_FEATURES: {e}", self.name);
                    return false;
                }
            }
        }
        if s & status::DRIVER_OK != 0 && self.running.is_empty() {
            if let Err(e) = self.start() {
                log::warn!("{}: cannot start the rings: {e}", self.name);
                self.status |= status::DEVICE_NEEDS_RESET;
                return false;
            }
        }
        true
    }

    /// The driver's memory: every read-write IOTLB region, mapped shared.
    fn map(&self) -> Result<GuestMem, String> {
        let mut regions = Vec::new();
        let mut at = 0u64;
        while regions.len() < MAX_REGIONS {
            let Ok(e) = self.kernel.iotlb(at, u64::MAX) else {
                break;
            };
            // The kernel answers the first region at or after `at`; one
            // that does not move forward ends the walk.
            if e.last < e.start || e.last < at {
                break;
            }
            if e.perm == ACCESS_RW {
                let len = (e.last - e.start)
                    .checked_add(1)
                    .and_then(|l| usize::try_from(l).ok())
                    .ok_or_else(|| {
                        format!("IOTLB region {:#x}-{:#x} is too large", e.start, e.last)
                    })?;
                let m = MmapRegion::from_file(FileOffset::new(e.file, e.offset), len).map_err(
                    |err| format!("cannot map IOVAs {:#x}-{:#x}: {err}", e.start, e.last),
                )?;
                regions.push(
                    GuestRegionMmap::new(m, GuestAddress(e.start))
                        .ok_or_else(|| format!("IOVAs {:#x}-{:#x} overflow", e.start, e.last))?,
                );
            } else {
                log::debug!(
                    "{}: IOVAs {:#x}-{:#x} are not read-write: not mapped",
                    self.name,
                    e.start,
                    e.last
                );
            }
            match e.last.checked_add(1) {
                Some(n) => at = n,
                None => break,
            }
        }
        if regions.is_empty() {
            return Err("the driver has no memory mapped".into());
        }
        GuestMem::from_regions(regions).map_err(|e| format!("IOTLB regions: {e}"))
    }

    /// Maps the memory, takes the ready rings from the kernel and starts
    /// the device on them.
    fn start(&mut self) -> Result<(), String> {
        let mem = self.map()?;
        let acked = self.kernel.features().map_err(|e| e.to_string())?;
        let event_idx = acked & features::RING_EVENT_IDX != 0;
        let max = self.dev.queue_max_size();
        let mut queues = Vec::new();
        let mut running = Vec::new();
        for (i, kick) in self.kicks.iter().enumerate() {
            let info = self
                .kernel
                .vq_info(i as u32)
                .map_err(|e| format!("VDUSE_VQ_GET_INFO {i}: {e}"))?;
            if !info.ready {
                continue;
            }
            let size = u16::try_from(info.num)
                .ok()
                .filter(|&n| n > 0 && n <= max && n.is_power_of_two())
                .ok_or_else(|| format!("ring {i}: size {} (most {max})", info.num))?;
            let base = self.resume[i].unwrap_or(info.avail_index);
            let mut q = Queue::new(size).map_err(|e| format!("ring {i}: {e:?}"))?;
            q.set_size(size);
            let (d, a, u) = (info.desc_addr, info.driver_addr, info.device_addr);
            q.set_desc_table_address(Some(d as u32), Some((d >> 32) as u32));
            q.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
            q.set_used_ring_address(Some(u as u32), Some((u >> 32) as u32));
            q.set_event_idx(event_idx);
            q.set_next_avail(base);
            q.set_next_used(base);
            q.set_ready(true);
            if !q.is_valid(&mem) {
                return Err(format!("ring {i} is outside the driver's memory"));
            }
            self.kernel
                .set_kick(i as u32, Some(kick))
                .map_err(|e| format!("VDUSE_VQ_SETUP_KICKFD {i}: {e}"))?;
            queues.push(ActiveQueue {
                index: i as u16,
                queue: q,
                notify: kick.clone(),
            });
            running.push((i as u16, u));
        }
        if queues.is_empty() {
            return Ok(());
        }
        self.dev.activate(Activation {
            mem: mem.clone(),
            features: acked & !ACCESS_PLATFORM,
            queues,
            interrupt: Arc::new(Irq(self.kernel.clone())),
        })?;
        self.mem = Some(mem);
        self.running = running;
        // Requests queued before the kick eventfd was in place.
        for (q, _) in &self.running {
            let _ = self.kicks[*q as usize].write(1);
        }
        Ok(())
    }

    /// Stops the device; each running ring resumes at its used index.
    fn halt(&mut self) {
        if self.running.is_empty() {
            return;
        }
        self.dev.stop();
        for &(q, used) in &self.running {
            let idx = self.mem.as_ref().and_then(|m| {
                m.load::<u16>(GuestAddress(used.wrapping_add(2)), Ordering::Acquire)
                    .ok()
            });
            self.resume[q as usize] = idx;
        }
        self.running.clear();
    }

    /// The driver reset the device.
    fn reset(&mut self) {
        self.close();
        self.dev.reset();
        self.mem = None;
        self.resume.iter_mut().for_each(|r| *r = None);
    }

    /// UPDATE_IOTLB: running rings move to the new mapping (stopped, then
    /// started again where they stopped).
    fn remap(&mut self) -> bool {
        if self.running.is_empty() {
            self.mem = None;
            return true;
        }
        self.halt();
        self.mem = None;
        match self.start() {
            Ok(()) => true,
            Err(e) => {
                log::warn!(
                    "{}: the rings cannot move to the new mapping: {e}",
                    self.name
                );
                self.status |= status::DEVICE_NEEDS_RESET;
                false
            }
        }
    }

    /// The device stops, its requests answered, and the kernel gives the
    /// kick eventfds back (the server is going away, or a reset follows).
    fn close(&mut self) {
        self.halt();
        for i in 0..self.kicks.len() {
            let _ = self.kernel.set_kick(i as u32, None);
        }
    }
}

/// A device served through VDUSE: a thread answering the kernel's control
/// messages.
pub struct VduseServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl VduseServer {
    pub fn start(
        dev: Box<dyn VirtioDevice>,
        kernel: Arc<dyn VduseDev>,
        name: &str,
    ) -> std::io::Result<VduseServer> {
        let mut st = State::new(dev, kernel.clone(), name)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let n = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("vduse {name}"))
            .spawn(move || {
                let mut buf = [0u8; MESSAGE_LEN];
                while !s.load(Ordering::SeqCst) {
                    match kernel.read_message(&mut buf) {
                        Ok(Some(len)) => {
                            if let Some(r) = st.handle(&buf[..len]) {
                                if let Err(e) = kernel.write_response(&r) {
                                    log::warn!("{n}: VDUSE response: {e}");
                                }
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            log::warn!("{n}: VDUSE message: {e}");
                            std::thread::sleep(std::time::Duration::from_millis(100));
                        }
                    }
                }
                st.close();
            })?;
        Ok(VduseServer {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the device (requests in flight are answered first).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VduseServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The protocol without the kernel: a stand-in for /dev/vduse/NAME whose
/// driver memory is a file, for the tests and the `vduse` fuzz target.
pub mod fuzz {
    use super::*;
    use crate::virtio::block::{BlockOptions, VirtioBlock};
    use crate::virtio::event_loop::EventLoop;
    use block::backend::{BackendConfig, BlockBackend};
    use block::graph::BlockGraph;
    use std::io::Write;
    use std::sync::atomic::AtomicU32;

    /// The kernel's side: memory, rings, kicks and interrupts as a VDUSE
    /// module keeps them.
    pub struct FakeKernel {
        pub mem: File,
        pub mem_len: u64,
        pub features: Mutex<u64>,
        pub rings: Mutex<Vec<VqInfo>>,
        pub kicks: Mutex<Vec<Option<Arc<Notifier>>>>,
        pub irqs: AtomicU32,
        pub messages: Mutex<std::collections::VecDeque<Vec<u8>>>,
        pub responses: Mutex<Vec<[u8; MESSAGE_LEN]>>,
    }

    impl FakeKernel {
        pub fn new(mem_len: u64, rings: usize) -> Option<FakeKernel> {
            let p = std::env::temp_dir().join(format!(
                "strata-vduse-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&p)
                .ok()?;
            let _ = std::fs::remove_file(&p);
            f.set_len(mem_len).ok()?;
            Some(FakeKernel {
                mem: f,
                mem_len,
                features: Mutex::new(0),
                rings: Mutex::new(vec![VqInfo::default(); rings]),
                kicks: Mutex::new(vec![None; rings]),
                irqs: AtomicU32::new(0),
                messages: Default::default(),
                responses: Default::default(),
            })
        }
    }

    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    impl VduseDev for FakeKernel {
        fn read_message(&self, buf: &mut [u8; MESSAGE_LEN]) -> std::io::Result<Option<usize>> {
            match lock(&self.messages).pop_front() {
                Some(m) => {
                    let n = m.len().min(MESSAGE_LEN);
                    buf[..n].copy_from_slice(&m[..n]);
                    Ok(Some(n))
                }
                None => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    Ok(None)
                }
            }
        }
        fn write_response(&self, buf: &[u8; MESSAGE_LEN]) -> std::io::Result<()> {
            lock(&self.responses).push(*buf);
            Ok(())
        }
        fn features(&self) -> std::io::Result<u64> {
            Ok(*lock(&self.features))
        }
        fn vq_info(&self, index: u32) -> std::io::Result<VqInfo> {
            lock(&self.rings)
                .get(index as usize)
                .copied()
                .ok_or_else(|| std::io::Error::from_raw_os_error(libc_einval()))
        }
        fn set_kick(&self, index: u32, kick: Option<&Notifier>) -> std::io::Result<()> {
            let mut k = lock(&self.kicks);
            let slot = k
                .get_mut(index as usize)
                .ok_or_else(|| std::io::Error::from_raw_os_error(libc_einval()))?;
            *slot = match kick {
                Some(Notifier::Event(e)) => Some(Arc::new(Notifier::Event(e.clone()))),
                _ => None,
            };
            Ok(())
        }
        fn inject_irq(&self, _index: u32) -> std::io::Result<()> {
            self.irqs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn inject_config_irq(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn iotlb(&self, start: u64, _last: u64) -> std::io::Result<IotlbEntry> {
            // One region, IOVA 0 up, read-write.
            if start >= self.mem_len {
                return Err(std::io::Error::from_raw_os_error(libc_einval()));
            }
            Ok(IotlbEntry {
                file: self.mem.try_clone()?,
                offset: 0,
                start: 0,
                last: self.mem_len - 1,
                perm: ACCESS_RW,
            })
        }
    }

    fn libc_einval() -> i32 {
        22
    }

    /// A SET_STATUS (or other) message as the kernel writes it.
    pub fn message(ty: u32, id: u32, body: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; MESSAGE_LEN];
        m[0..4].copy_from_slice(&ty.to_le_bytes());
        m[4..8].copy_from_slice(&id.to_le_bytes());
        let n = body.len().min(128);
        m[24..24 + n].copy_from_slice(&body[..n]);
        m
    }

    /// A virtio-blk on a null-co disk (reads zeros, writes vanish).
    pub fn device(lp: &Arc<EventLoop>, queues: u16) -> Option<Box<dyn VirtioDevice>> {
        let g = BlockGraph::new();
        let node = g
            .blockdev_add_str("driver=null-co,node-name=vd0,size=1048576,read-zeroes=on")
            .ok()?;
        let b = BlockBackend::new("vd0", node, BackendConfig::default()).ok()?;
        let o = BlockOptions {
            num_queues: queues,
            queue_size: 16,
            ..Default::default()
        };
        Some(Box::new(VirtioBlock::new(b, o, lp.clone()).ok()?))
    }

    const MEM: u64 = 64 << 10;

    /// Runs one input: its bytes are the driver's memory, and 24-byte
    /// pieces of it the kernel's messages and ring setups, interleaved
    /// with kicks.
    pub fn run(data: &[u8]) {
        if data.len() < 8 {
            return;
        }
        let Ok(lp) = EventLoop::manual("vduse fuzz") else {
            return;
        };
        let Some(dev) = device(&lp, 2) else { return };
        let Some(k) = FakeKernel::new(MEM, 2) else {
            return;
        };
        let fill: Vec<u8> = data.iter().copied().cycle().take(MEM as usize).collect();
        if (&k.mem).write_all(&fill).is_err() {
            return;
        }
        let k = Arc::new(k);
        let Ok(mut st) = State::new(dev, k.clone(), "fuzz") else {
            return;
        };
        for (n, piece) in data.chunks(24).enumerate().take(64) {
            let mut c = [0u8; 24];
            c[..piece.len()].copy_from_slice(piece);
            let w = |i: usize| u64_at(&c, i);
            match c[0] % 5 {
                0 => {
                    // A ring's setup, as the driver would leave it.
                    let i = (c[1] % 2) as usize;
                    lock(&k.rings)[i] = VqInfo {
                        num: 1 << (c[2] % 6),
                        desc_addr: w(8) % MEM,
                        driver_addr: w(16) % MEM,
                        device_addr: (w(8) ^ w(16)) % MEM,
                        avail_index: c[3] as u16,
                        ready: c[4] & 1 != 0,
                    };
                }
                1 => *lock(&k.features) = w(8),
                2 => {
                    let _ = st.handle(&message(req::SET_STATUS, n as u32, &[c[1]]));
                }
                3 => {
                    let body: Vec<u8> = c[1..].to_vec();
                    let _ = st.handle(&message(c[1] as u32 % 4, n as u32, &body));
                }
                _ => {
                    for kick in lock(&k.kicks).iter().flatten() {
                        let _ = kick.write(1);
                    }
                    lp.poll();
                }
            }
            lp.poll();
        }
        st.close();
    }
}

#[cfg(test)]
mod tests {
    use super::fuzz::*;
    use super::*;
    use crate::virtio::event_loop::EventLoop;
    use std::os::unix::fs::FileExt;

    #[test]
    fn messages_parse_and_answer() {
        let m = message(req::SET_STATUS, 7, &[0x0f]);
        assert_eq!(
            parse(&m),
            Some(Message {
                id: 7,
                req: Request::SetStatus { status: 0x0f }
            })
        );
        let mut body = [0u8; 16];
        body[0..8].copy_from_slice(&0x1000u64.to_le_bytes());
        body[8..16].copy_from_slice(&0x1fffu64.to_le_bytes());
        assert_eq!(
            parse(&message(req::UPDATE_IOTLB, 1, &body)).unwrap().req,
            Request::UpdateIotlb {
                start: 0x1000,
                last: 0x1fff
            }
        );
        assert_eq!(
            parse(&message(9, 1, &[])).unwrap().req,
            Request::Unknown { ty: 9 }
        );
        assert_eq!(parse(&m[..MESSAGE_LEN - 1]), None);
        let r = response(5, true, Some((1, 0x1234)));
        assert_eq!(&r[0..8], &[5, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&r[24..30], &[1, 0, 0, 0, 0x34, 0x12]);
        assert_eq!(&response(5, false, None)[4..8], &[1, 0, 0, 0]);
    }

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const HDR: u64 = 0x4000;
    const DATA: u64 = 0x5000;
    const STATUS: u64 = 0x6000;

    fn put(k: &FakeKernel, at: u64, b: &[u8]) {
        k.mem.write_all_at(b, at).unwrap();
    }
    fn get(k: &FakeKernel, at: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        k.mem.read_exact_at(&mut b, at).unwrap();
        b
    }
    fn desc(k: &FakeKernel, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        put(k, DESC + 16 * i, &d);
    }

    /// The driver's side through the stand-in: features, a ring, DRIVER_OK,
    /// a read request kicked and answered with an interrupt, the ring's
    /// state, and a reset.
    #[test]
    fn a_read_through_the_kernel_interface() {
        let lp = EventLoop::new("vduse test").unwrap();
        let dev = device(&lp, 1).unwrap();
        let offered = dev.features();
        let k = Arc::new(FakeKernel::new(64 << 10, 1).unwrap());
        let mut st = State::new(dev, k.clone(), "t").unwrap();
        *lock(&k.features) = features::VERSION_1 | ACCESS_PLATFORM | (offered & 1 << 9);
        lock(&k.rings)[0] = VqInfo {
            num: 16,
            desc_addr: DESC,
            driver_addr: AVAIL,
            device_addr: USED,
            avail_index: 0,
            ready: true,
        };
        // A read of sector 1: header, 512 bytes in, status.
        let mut hdr = [0u8; 16];
        hdr[8..16].copy_from_slice(&1u64.to_le_bytes());
        put(&k, HDR, &hdr);
        put(&k, DATA, &[0xaa; 512]);
        put(&k, STATUS, &[0xff]);
        desc(&k, 0, HDR, 16, 1, 1);
        desc(&k, 1, DATA, 512, 1 | 2, 2);
        desc(&k, 2, STATUS, 1, 2, 0);
        put(&k, AVAIL + 4, &0u16.to_le_bytes());
        put(&k, AVAIL + 2, &1u16.to_le_bytes());
        let ok = |r: Option<[u8; MESSAGE_LEN]>| u32_at(&r.unwrap(), 4) == RESULT_OK;
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        assert!(ok(st.handle(&message(req::SET_STATUS, 1, &[s]))));
        assert!(ok(st.handle(&message(
            req::SET_STATUS,
            2,
            &[s | status::DRIVER_OK]
        ))));
        assert!(
            lock(&k.kicks)[0].is_some(),
            "the kick eventfd went to the kernel"
        );
        let t = std::time::Instant::now();
        while get(&k, USED + 2, 2) != [1, 0] {
            assert!(t.elapsed().as_secs() < 10, "no used entry");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(get(&k, STATUS, 1), [0]);
        assert_eq!(get(&k, DATA, 512), vec![0u8; 512]);
        assert!(k.irqs.load(Ordering::SeqCst) >= 1);
        // GET_VQ_STATE answers the used index.
        let r = st
            .handle(&message(req::GET_VQ_STATE, 3, &0u32.to_le_bytes()))
            .unwrap();
        assert_eq!(&r[24..30], &[0, 0, 0, 0, 1, 0]);
        // An unknown ring is FAILED; so is an unknown request.
        assert!(!ok(st.handle(&message(
            req::GET_VQ_STATE,
            4,
            &9u32.to_le_bytes()
        ))));
        assert!(!ok(st.handle(&message(7, 5, &[]))));
        // A new mapping: the ring moves and keeps its place.
        assert!(ok(st.handle(&message(req::UPDATE_IOTLB, 6, &[0; 16]))));
        assert_eq!(st.running.len(), 1);
        // Reset: the kick eventfd is taken back.
        assert!(ok(st.handle(&message(req::SET_STATUS, 7, &[0]))));
        assert!(lock(&k.kicks)[0].is_none());
        assert!(st.running.is_empty());
    }

    /// Through the server thread, as the export runs it.
    #[test]
    fn the_server_answers_and_stops() {
        let lp = EventLoop::new("vduse server").unwrap();
        let dev = device(&lp, 1).unwrap();
        let k = Arc::new(FakeKernel::new(64 << 10, 1).unwrap());
        let mut srv = VduseServer::start(dev, k.clone(), "s").unwrap();
        lock(&k.messages).push_back(message(req::SET_STATUS, 11, &[1]));
        let t = std::time::Instant::now();
        while lock(&k.responses).is_empty() {
            assert!(t.elapsed().as_secs() < 10);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(&lock(&k.responses)[0][0..8], &[11, 0, 0, 0, 0, 0, 0, 0]);
        srv.stop();
    }
}
