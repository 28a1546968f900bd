//! The vhost-user back end: a [`VirtioDevice`] served to a vhost-user front
//! end (QEMU's or Strata's `vhost-user-blk-pci`) over a unix socket.
//!
//! The protocol is QEMU's `docs/interop/vhost-user.rst`: "Front-end message
//! types" (the requests, parsed and answered by the `vhost` crate's
//! `BackendReqHandler`), "Memory access" (the front end's RAM arrives as
//! file descriptors and is mapped shared here), "Ring states" and
//! "Starting and stopping rings" (a ring starts once it has a kick file
//! descriptor and, with VHOST_USER_F_PROTOCOL_FEATURES, has been enabled;
//! VHOST_USER_GET_VRING_BASE stops it), "Multiple queue support" and
//! VHOST_USER_PROTOCOL_F_CONFIG (the device's configuration space).
//!
//! This is the virtio-pci transport's counterpart ([`super::pci`]): where
//! that one takes the driver's register writes, this one takes the front
//! end's messages, and both hand the same device an [`Activation`]. The
//! device does not know which transport it is behind, so the daemon's
//! virtio-blk is the VMM's virtio-blk, request parsing and all.
//!
//! The device's set of running queues is all-or-nothing
//! ([`VirtioDevice::activate`]), while vhost-user starts and stops rings one
//! by one: each change stops the device (requests in flight complete into
//! the used rings, [`VirtioDevice::stop`]) and starts it again with the
//! rings that are ready, each at the index where it stopped. A stopped
//! ring's index, the one VHOST_USER_GET_VRING_BASE answers, is then its used
//! index: every request the device took has been answered.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    BackendReqHandler, Error as VuError, GpuBackend, Result as VuResult,
    VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

use super::{features, Activation, ActiveQueue, Notifier, VirtioDevice, VirtioInterrupt};
use crate::bus::lock;
use crate::GuestMem;

/// Largest configuration read or write a front end may ask for (the
/// message's own limit is 256 bytes of payload).
const MAX_CONFIG: u32 = 256;
/// Memory regions in one table (QEMU sends at most 8 without
/// CONFIGURE_MEM_SLOTS).
const MAX_REGIONS: usize = 8;

fn refuse(why: &'static str) -> VuError {
    VuError::InvalidOperation(why)
}

/// One region of the front end's memory table: where it is in guest
/// physical memory and in the front end's address space (ring addresses
/// come as the front end's virtual addresses).
#[derive(Clone, Copy, Debug)]
struct Region {
    gpa: u64,
    size: u64,
    uaddr: u64,
}

/// A ring as the front end described it so far.
#[derive(Default)]
struct Ring {
    size: u16,
    /// Front-end virtual addresses of the descriptor table, available and
    /// used rings.
    addr: Option<(u64, u64, u64)>,
    /// Where the ring resumes: set by VHOST_USER_SET_VRING_BASE, and by a
    /// stop to the used index.
    base: u16,
    kick: Option<Arc<Notifier>>,
    enabled: bool,
    /// Part of the running device.
    running: bool,
}

/// The call file descriptors, which the front end may replace while the
/// rings run.
#[derive(Default)]
struct Calls(Mutex<Vec<Option<File>>>);

impl VirtioInterrupt for Calls {
    fn signal_queue(&self, queue: u16) {
        if let Some(Some(f)) = lock(&self.0).get(queue as usize) {
            let _ = (&*f).write_all(&1u64.to_ne_bytes());
        }
    }
    fn signal_config(&self) {
        // Without the back-end request channel there is no way to tell
        // the front end (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG).
        log::debug!("vhost-user: configuration change not signalled");
    }
}

/// One connection's state: what the front end set up.
struct Conn {
    dev: Arc<Mutex<Box<dyn VirtioDevice>>>,
    name: String,
    acked: u64,
    protocol: u64,
    regions: Vec<Region>,
    mem: Option<GuestMem>,
    rings: Vec<Ring>,
    calls: Arc<Calls>,
    running: bool,
    /// The server is stopping: the rings stay stopped whatever comes.
    closing: bool,
}

impl Conn {
    fn new(dev: Arc<Mutex<Box<dyn VirtioDevice>>>, name: String) -> Conn {
        let n = lock(&dev).num_queues();
        Conn {
            dev,
            name,
            acked: 0,
            protocol: 0,
            regions: Vec::new(),
            mem: None,
            rings: (0..n).map(|_| Ring::default()).collect(),
            calls: Arc::new(Calls(Mutex::new((0..n).map(|_| None).collect()))),
            running: false,
            closing: false,
        }
    }

    /// Stops the rings for good: the server is going away.
    fn close(&mut self) {
        self.closing = true;
        self.halt();
    }

    fn ring(&mut self, index: u32) -> VuResult<&mut Ring> {
        self.rings
            .get_mut(index as usize)
            .ok_or(VuError::InvalidParam)
    }

    /// Guest-physical address of a front-end virtual address.
    fn gpa(&self, va: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| va >= r.uaddr && va - r.uaddr < r.size)
            .map(|r| r.gpa + (va - r.uaddr))
    }

    fn protocol_features(&self) -> bool {
        self.acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Stops the device; each running ring resumes at its used index.
    fn halt(&mut self) {
        if !self.running {
            return;
        }
        lock(&self.dev).stop();
        self.running = false;
        let mem = self.mem.as_ref();
        for r in self.rings.iter_mut().filter(|r| r.running) {
            r.running = false;
            if let (Some(mem), Some((_, _, used))) = (mem, r.addr) {
                // `addr` holds guest-physical addresses once translated.
                if let Ok(idx) = mem.load::<u16>(GuestAddress(used + 2), Ordering::Acquire) {
                    r.base = idx;
                }
            }
        }
    }

    /// Starts the device with every ring that is ready, after stopping
    /// it if it ran with another set.
    fn restart(&mut self) -> VuResult<()> {
        self.halt();
        let Some(mem) = self.mem.clone().filter(|_| !self.closing) else {
            return Ok(());
        };
        let enabled_needed = self.protocol_features();
        let event_idx = self.acked & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::new();
        let mut ready = Vec::new();
        for (i, r) in self.rings.iter().enumerate() {
            let (Some(kick), Some((desc, avail, used))) = (&r.kick, r.addr) else {
                continue;
            };
            if enabled_needed && !r.enabled {
                continue;
            }
            let mut q = Queue::new(r.size.max(1)).map_err(|_| VuError::InvalidParam)?;
            q.set_size(r.size);
            q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
            q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
            q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
            q.set_event_idx(event_idx);
            q.set_next_avail(r.base);
            q.set_next_used(r.base);
            q.set_ready(true);
            if !q.is_valid(&mem) {
                log::warn!("{}: ring {i} is outside the front end's memory", self.name);
                return Err(VuError::InvalidParam);
            }
            queues.push(ActiveQueue {
                index: i as u16,
                queue: q,
                notify: kick.clone(),
            });
            ready.push(i);
        }
        if queues.is_empty() {
            return Ok(());
        }
        let a = Activation {
            mem,
            features: self.acked & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            queues,
            interrupt: self.calls.clone(),
        };
        if let Err(e) = lock(&self.dev).activate(a) {
            log::warn!("{}: cannot start the rings: {e}", self.name);
            return Err(VuError::BackendInternalError);
        }
        for i in ready {
            self.rings[i].running = true;
        }
        self.running = true;
        // Requests the driver queued while the rings were stopped: the
        // device looks at each ring once it runs only when kicked.
        for r in self.rings.iter().filter(|r| r.running) {
            if let Some(k) = &r.kick {
                let _ = k.write(1);
            }
        }
        Ok(())
    }

    /// The front end went away or reset the device: forget everything.
    fn forget(&mut self) {
        self.halt();
        lock(&self.dev).reset();
        let n = self.rings.len();
        self.rings = (0..n).map(|_| Ring::default()).collect();
        *lock(&self.calls.0) = (0..n).map(|_| None).collect();
        self.mem = None;
        self.regions.clear();
        self.acked = 0;
    }
}

impl VhostUserBackendReqHandlerMut for Conn {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }
    fn reset_owner(&mut self) -> VuResult<()> {
        self.forget();
        Ok(())
    }
    fn reset_device(&mut self) -> VuResult<()> {
        self.forget();
        Ok(())
    }
    fn get_features(&mut self) -> VuResult<u64> {
        Ok(lock(&self.dev).features()
            | features::VERSION_1
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
    }
    fn set_features(&mut self, f: u64) -> VuResult<()> {
        let offered = self.get_features()?;
        if f & !offered != 0 {
            return Err(VuError::InvalidParam);
        }
        self.acked = f;
        lock(&self.dev).ack_features(f & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if ctx.len() != files.len() || ctx.is_empty() || ctx.len() > MAX_REGIONS {
            return Err(VuError::InvalidParam);
        }
        let mut regions = Vec::new();
        let mut table = Vec::new();
        for (r, f) in ctx.iter().zip(files) {
            let size = usize::try_from(r.memory_size).map_err(|_| VuError::InvalidParam)?;
            let m =
                MmapRegion::from_file(FileOffset::new(f, r.mmap_offset), size).map_err(|e| {
                    log::warn!("{}: cannot map the front end's memory: {e}", self.name);
                    VuError::InvalidParam
                })?;
            regions.push(
                GuestRegionMmap::new(m, GuestAddress(r.guest_phys_addr))
                    .ok_or(VuError::InvalidParam)?,
            );
            table.push(Region {
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                uaddr: r.user_addr,
            });
        }
        // Overlapping regions are refused here.
        let mem = GuestMem::from_regions(regions).map_err(|_| VuError::InvalidParam)?;
        // Running rings point into the old mapping: move them over.
        let was_running = self.running;
        self.halt();
        self.mem = Some(mem);
        self.regions = table;
        if was_running {
            self.restart()?;
        }
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = lock(&self.dev).queue_max_size() as u32;
        if num == 0 || num > max || !num.is_power_of_two() {
            return Err(VuError::InvalidParam);
        }
        self.ring(index)?.size = num as u16;
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let (Some(d), Some(a), Some(u)) =
            (self.gpa(descriptor), self.gpa(available), self.gpa(used))
        else {
            return Err(VuError::InvalidParam);
        };
        let restart = self.ring(index)?.running;
        // Stopped first: its used index is read at the old address.
        if restart {
            self.halt();
        }
        self.ring(index)?.addr = Some((d, a, u));
        if restart {
            self.restart()?;
        }
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let r = self.ring(index)?;
        if r.running {
            return Err(refuse("the ring is running"));
        }
        r.base = base as u16;
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.ring(index)?;
        let i = index as usize;
        let others = self
            .rings
            .iter()
            .enumerate()
            .any(|(j, r)| j != i && r.running);
        if self.rings[index as usize].running {
            self.halt();
        }
        // The ring is stopped until it gets a kick again; the others go on.
        let r = &mut self.rings[index as usize];
        r.kick = None;
        r.enabled = false;
        let base = r.base;
        if others {
            self.restart()?;
        }
        Ok(VhostUserVringState::new(index, base as u32))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let protocol = self.protocol_features();
        self.ring(index as u32)?;
        // Polling mode (no descriptor) is not supported: a ring needs its
        // notifications.
        let fd = fd.ok_or(refuse("a ring without a kick descriptor"))?;
        let kick = Notifier::received(fd).map_err(|_| VuError::InvalidParam)?;
        let r = self.ring(index as u32)?;
        r.kick = Some(Arc::new(kick));
        if !protocol {
            r.enabled = true;
        }
        self.restart()
    }
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.ring(index as u32)?;
        // Only an eventfd: a pipe or socket could block the device's
        // completions once full (its flags are not ours to change).
        if fd.as_ref().is_some_and(|f| !is_eventfd(f)) {
            return Err(refuse("the call descriptor is not an eventfd"));
        }
        // Its flags are left alone: they belong to the open file the
        // front end shares (a front end may read it blocking), and an
        // eventfd's write does not block short of 2^64 - 2 pending counts.
        // One notification at once, as libvhost-user sends: a front end
        // that connected again may have missed the last one, and a
        // driver takes a spurious one as "look at the used ring" (QEMU's
        // vhost-user-blk-test waits for it after DRIVER_OK).
        if let Some(f) = &fd {
            let _ = (&*f).write_all(&1u64.to_ne_bytes());
        }
        lock(&self.calls.0)[index as usize] = fd;
        Ok(())
    }
    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.ring(index as u32)?;
        Ok(())
    }
    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE)
    }
    fn set_protocol_features(&mut self, f: u64) -> VuResult<()> {
        self.protocol = f;
        Ok(())
    }
    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.rings.len() as u64)
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let r = self.ring(index)?;
        if r.enabled == enable {
            return Ok(());
        }
        r.enabled = enable;
        self.restart()
    }
    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        if size > MAX_CONFIG || offset > MAX_CONFIG {
            return Err(VuError::InvalidParam);
        }
        let mut buf = vec![0u8; size as usize];
        lock(&self.dev).read_config(offset as u64, &mut buf);
        Ok(buf)
    }
    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        if offset > MAX_CONFIG {
            return Err(VuError::InvalidParam);
        }
        lock(&self.dev).write_config(offset as u64, buf);
        Ok(())
    }
    fn set_gpu_socket(&mut self, _: GpuBackend) -> VuResult<()> {
        Err(refuse("not a GPU"))
    }
    fn get_shared_object(&mut self, _: VhostUserSharedMsg) -> VuResult<File> {
        Err(refuse("no shared objects"))
    }
    fn get_inflight_fd(&mut self, _: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        Err(refuse("INFLIGHT_SHMFD is not offered"))
    }
    fn set_inflight_fd(&mut self, _: &VhostUserInflight, _: File) -> VuResult<()> {
        Err(refuse("INFLIGHT_SHMFD is not offered"))
    }
    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Err(refuse("CONFIGURE_MEM_SLOTS is not offered"))
    }
    fn add_mem_region(
        &mut self,
        _: &VhostUserSingleMemoryRegion,
        _: File,
        _: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        Err(refuse("CONFIGURE_MEM_SLOTS is not offered"))
    }
    fn remove_mem_region(&mut self, _: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        Err(refuse("CONFIGURE_MEM_SLOTS is not offered"))
    }
    fn set_device_state_fd(
        &mut self,
        _: VhostTransferStateDirection,
        _: VhostTransferStatePhase,
        _: File,
    ) -> VuResult<Option<File>> {
        Err(refuse("DEVICE_STATE is not offered"))
    }
    fn check_device_state(&mut self) -> VuResult<()> {
        Err(refuse("DEVICE_STATE is not offered"))
    }
    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(refuse("no shared memory regions"))
    }
    fn set_log_base(&mut self, _: &VhostUserLog, _: File) -> VuResult<()> {
        Err(refuse("LOG_SHMFD is not offered"))
    }
}

/// Whether `f` is an eventfd (its /proc/self/fd link names the anonymous
/// inode).
fn is_eventfd(f: &impl std::os::fd::AsRawFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .is_ok_and(|l| l.as_os_str() == "anon_inode:[eventfd]")
}

/// The connection being served and its state.
type Served = (UnixStream, Arc<Mutex<Conn>>);

/// A device served on a unix socket, to one front end at a time; a front
/// end that goes away may connect again (QEMU's `reconnect=`), and finds
/// the device as a new one.
pub struct VhostUserServer {
    /// Where the listener is, to wake its accept on [`Self::stop`].
    addr: Option<std::os::unix::net::SocketAddr>,
    /// The socket file this server made, removed on [`Self::stop`].
    made: Option<PathBuf>,
    stop: Arc<AtomicBool>,
    /// The connection being served, to shut it down on [`Self::stop`].
    conn: Arc<Mutex<Option<Served>>>,
    thread: Option<JoinHandle<()>>,
}

impl VhostUserServer {
    /// Listens on `path` (a stale socket there is replaced, as QEMU does;
    /// any other file is left alone and refused).
    pub fn bind(
        path: &Path,
        dev: Box<dyn VirtioDevice>,
        name: &str,
    ) -> std::io::Result<VhostUserServer> {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if m.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        let listener = UnixListener::bind(path)?;
        let mut s = Self::start(listener, dev, name)?;
        s.made = Some(path.to_path_buf());
        Ok(s)
    }

    /// Serves on a socket that is already listening (QEMU's
    /// `addr.type=fd`: the socket file, if any, stays its creator's).
    pub fn start(
        listener: UnixListener,
        dev: Box<dyn VirtioDevice>,
        name: &str,
    ) -> std::io::Result<VhostUserServer> {
        let addr = listener.local_addr().ok();
        let stop = Arc::new(AtomicBool::new(false));
        let conn: Arc<Mutex<Option<Served>>> = Default::default();
        let dev = Arc::new(Mutex::new(dev));
        let (s, c, n) = (stop.clone(), conn.clone(), name.to_string());
        let thread = std::thread::Builder::new()
            .name(format!("vhost-user {name}"))
            .spawn(move || serve(listener, dev, s, c, n))?;
        Ok(VhostUserServer {
            addr,
            made: None,
            stop,
            conn,
            thread: Some(thread),
        })
    }

    /// Ends the connection (its requests in flight complete first) and
    /// stops listening.
    pub fn stop(&mut self) {
        let Some(t) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        if let Some((sock, conn)) = lock(&self.conn).as_ref() {
            // The rings stop before the socket closes: a front end that
            // finds the connection gone resumes each ring at its used
            // index (QEMU's vhost_virtqueue_stop), which must then count
            // every request the device took.
            lock(conn).close();
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
        // Wakes the accept.
        if let Some(a) = &self.addr {
            let _ = UnixStream::connect_addr(a);
        }
        let _ = t.join();
        if let Some(p) = &self.made {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Whether a front end is connected.
    pub fn connected(&self) -> bool {
        lock(&self.conn).is_some()
    }
}

impl Drop for VhostUserServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(
    listener: UnixListener,
    dev: Arc<Mutex<Box<dyn VirtioDevice>>>,
    stop: Arc<AtomicBool>,
    slot: Arc<Mutex<Option<Served>>>,
    name: String,
) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, say: try again later, without
                // spinning on an error that persists.
                log::warn!("{name}: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        let conn = Arc::new(Mutex::new(Conn::new(dev.clone(), name.clone())));
        *lock(&slot) = Some((clone, conn.clone()));
        // Checked again: a stop between accept and here would otherwise
        // miss this connection.
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let mut h = BackendReqHandler::from_stream(stream, conn.clone());
        loop {
            match h.handle_request() {
                Ok(()) => {}
                Err(VuError::Disconnected) | Err(VuError::PartialMessage) => break,
                Err(e) => {
                    // The protocol leaves the connection unusable after a
                    // malformed message: end it, the front end may come
                    // back.
                    log::warn!("{name}: {e}");
                    if matches!(
                        e,
                        VuError::SocketBroken(_)
                            | VuError::SocketError(_)
                            | VuError::InvalidMessage
                    ) || stop.load(Ordering::SeqCst)
                    {
                        break;
                    }
                }
            }
        }
        lock(&conn).forget();
        *lock(&slot) = None;
        if stop.load(Ordering::SeqCst) {
            break;
        }
    }
}

/// The `vhost_user` fuzz target: a hostile front end's requests, as the
/// values the protocol's parser hands the back end (the parser is the
/// `vhost` crate's), against a virtio-blk on a null disk. Its memory table
/// maps one file whose bytes are the input, so activated rings run
/// whatever requests the input lays out.
pub mod fuzz {
    use super::*;
    use crate::virtio::block::{BlockOptions, VirtioBlock};
    use crate::virtio::event_loop::EventLoop;
    use block::backend::{BackendConfig, BlockBackend};
    use block::graph::BlockGraph;
    use std::io::{Seek, SeekFrom};

    const MEM: u64 = 64 << 10;

    fn device(lp: &Arc<EventLoop>) -> Option<Box<dyn VirtioDevice>> {
        let g = BlockGraph::new();
        let node = g
            .blockdev_add_str("driver=null-co,node-name=vu0,size=1048576,read-zeroes=on")
            .ok()?;
        let b = BlockBackend::new("vu0", node, BackendConfig::default()).ok()?;
        let o = BlockOptions {
            num_queues: 2,
            queue_size: 16,
            ..Default::default()
        };
        Some(Box::new(VirtioBlock::new(b, o, lp.clone()).ok()?))
    }

    /// A file of `MEM` bytes holding `data` over and over.
    fn memory(data: &[u8]) -> Option<File> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "strata-vu-fuzz-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .ok()?;
        let _ = std::fs::remove_file(&p);
        let fill: Vec<u8> = data.iter().copied().cycle().take(MEM as usize).collect();
        f.write_all(&fill).ok()?;
        f.set_len(MEM).ok()?;
        f.seek(SeekFrom::Start(0)).ok()?;
        Some(f)
    }

    /// Runs one input.
    pub fn run(data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let Ok(lp) = EventLoop::manual("vhost-user fuzz") else {
            return;
        };
        let Some(dev) = device(&lp) else { return };
        let mut c = Conn::new(Arc::new(Mutex::new(dev)), "fuzz".into());
        let mut kicks = Vec::new();
        let i = std::cell::Cell::new(0usize);
        let take = |n: usize| -> u64 {
            let mut v = 0u64;
            for k in 0..n {
                v |= u64::from(data.get(i.get() + k).copied().unwrap_or(0)) << (8 * k);
            }
            i.set(i.get() + n);
            v
        };
        // The front end's addresses: guest RAM at GPA `gpa`, seen by the
        // front end at 0x7000_0000_0000.
        const UADDR: u64 = 0x7000_0000_0000;
        for _ in 0..64 {
            let op = take(1);
            let idx = take(1) as u32 % 3;
            match op % 10 {
                0 => {
                    let gpa = take(1) << 16;
                    let Some(f) = memory(data) else { return };
                    let r = VhostUserMemoryRegion {
                        guest_phys_addr: gpa,
                        memory_size: MEM,
                        user_addr: UADDR,
                        mmap_offset: 0,
                    };
                    let _ = c.set_mem_table(&[r], vec![f], None);
                }
                1 => {
                    let _ = c.set_vring_num(idx, take(2) as u32);
                }
                2 => {
                    let (d, a, u) = (take(2), take(2), take(2));
                    let _ = c.set_vring_addr(
                        idx,
                        VhostUserVringAddrFlags::empty(),
                        UADDR + d,
                        UADDR + u,
                        UADDR + a,
                        0,
                    );
                }
                3 => {
                    let _ = c.set_vring_base(idx, take(2) as u32);
                }
                4 => {
                    let _ = c.get_vring_base(idx);
                }
                5 => {
                    // A socket pair, not a pipe: a write to a closed
                    // socket fails (MSG_NOSIGNAL) where a pipe's raises
                    // SIGPIPE, which libFuzzer's process does not ignore.
                    let Ok((r, w)) = UnixStream::pair() else {
                        return;
                    };
                    let _ = c
                        .set_vring_kick(idx as u8, Some(File::from(std::os::fd::OwnedFd::from(r))));
                    kicks.push(w);
                }
                6 => {
                    let _ = c.set_vring_enable(idx, take(1) & 1 != 0);
                }
                7 => {
                    let _ = c.set_features(take(8));
                }
                8 => {
                    let (off, size) = (take(1) as u32, take(2) as u32 % 300);
                    if let Ok(v) = c.get_config(off, size, VhostUserConfigFlags::empty()) {
                        assert_eq!(v.len(), size as usize);
                        let _ = c.set_config(off, &v, VhostUserConfigFlags::empty());
                    }
                }
                _ => {
                    for k in &mut kicks {
                        let _ = k.write_all(&1u64.to_ne_bytes());
                    }
                    lp.poll();
                }
            }
            if i.get() >= data.len() {
                break;
            }
        }
        lp.poll();
        c.forget();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn call_descriptors_must_be_eventfds() {
        use std::os::fd::OwnedFd;
        let (r, _w) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!super::is_eventfd(&std::fs::File::from(OwnedFd::from(r))));
        let e = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        assert!(super::is_eventfd(&e));
    }

    /// A well-formed set-up: memory, one ring at GPA 0 with its parts laid
    /// out, kicked: the device runs (and stops) without complaint.
    #[test]
    fn scripted_setup_runs() {
        // op, idx, args...: mem table at gpa 0; ring 0 num 16; addresses
        // 0x0/0x100/0x200; base 0; kick; enable; poll; stop.
        let script: Vec<u8> = vec![
            0, 0, 0, // set_mem_table gpa 0
            1, 0, 16, 0, // num 16
            2, 0, 0, 0, 0, 1, 0, 2, // addr desc 0, avail 0x100, used 0x200
            3, 0, 0, 0, // base 0
            5, 0, // kick
            6, 0, 1, // enable
            9, 0, // poll
            4, 0, // get_vring_base
        ];
        super::fuzz::run(&script);
    }
}
