//! `vhost-user-blk-pci`'s device: a virtio-blk whose queues a vhost-user
//! back end (strata-storage-daemon, qemu-storage-daemon) runs in its own
//! process (QEMU's `docs/interop/vhost-user.rst`, the front end's side:
//! "Starting and stopping rings", "Memory access", the CONFIG protocol
//! feature).
//!
//! The virtio-pci transport stays here: the guest's register writes,
//! feature negotiation and status are this process's. At DRIVER_OK the
//! device hands the rings over: the memory table (guest RAM must be a
//! shared file mapping, `memory-backend-memfd`), each ring's size, base
//! and addresses (as this process's virtual addresses, which the back end
//! translates through the table), the transport's notify eventfd as the
//! kick (a KVM ioeventfd: the guest's notifications go straight to the
//! back end), and a call eventfd per ring, which a thread here turns into
//! the transport's interrupt. The device configuration is the back end's
//! (VHOST_USER_GET_CONFIG).
//!
//! A back end that goes away (a storage daemon restarted) is connected
//! again: a watcher sees the socket close, connects every second until the
//! daemon is back, negotiates again and restarts the rings where the guest
//! left them, each at its used index (the back end answered what it took
//! before closing; QEMU's vhost_virtqueue_stop resumes the same way). The
//! guest's notifications meanwhile wait in the kick eventfds.
//!
//! A back end that stops answering is given up the same way: a watchdog
//! shuts the socket down when one message waits for its reply longer than
//! [`ANSWER_TIMEOUT`], so neither a vCPU (reading the configuration,
//! writing DRIVER_OK) nor the watcher waits on it for ever.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use super::block::{CONFIG_LEN, DEVICE_TYPE};
use super::{Activation, Notifier, VirtioDevice, VirtioInterrupt};
use crate::bus::lock;
use crate::GuestMem;

/// The protocol features this front end uses.
fn wanted() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
}

/// How long the back end may take to answer a message.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The socket of an exchange with the back end in progress, and when it
/// began.
#[derive(Clone, Default)]
struct Deadline(Arc<Mutex<Option<(Instant, UnixStream)>>>);

/// An exchange in progress; it ends when this is dropped, and the one it
/// is part of (a stop within a failed start) is watched again.
struct Armed<'a>(&'a Deadline, Option<(Instant, UnixStream)>);

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        *lock(&self.0 .0) = self.1.take();
    }
}

impl Deadline {
    fn arm(&self, sock: Option<&UnixStream>) -> Armed<'_> {
        let now = sock
            .and_then(|s| s.try_clone().ok())
            .map(|s| (Instant::now(), s));
        let outer = std::mem::replace(&mut *lock(&self.0), now);
        Armed(self, outer)
    }

    /// Shuts the socket of an exchange that outlived ANSWER_TIMEOUT down:
    /// the read waiting for the reply then ends with an error.
    fn expire(&self, name: &str) {
        let mut g = lock(&self.0);
        if let Some((at, s)) = g.as_ref() {
            if at.elapsed() >= ANSWER_TIMEOUT {
                log::warn!(
                    "{name}: the vhost-user back end did not answer in {} s; dropping the connection",
                    ANSWER_TIMEOUT.as_secs()
                );
                let _ = s.shutdown(std::net::Shutdown::Both);
                *g = None;
            }
        }
    }
}

/// The watchdog of a device's exchanges, until `stop`.
fn watchdog(
    deadline: Deadline,
    stop: Arc<AtomicBool>,
    name: String,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("vhost-user watchdog".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                deadline.expire(&name);
            }
        })
}

/// Turns one ring's call eventfd into the transport's interrupt.
struct CallThread {
    fd: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CallThread {
    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.fd.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits on a ring's call eventfd and raises the transport's interrupt.
/// Through epoll, not a blocking read: the eventfd's open file is shared
/// with the back end, which may make it non-blocking (libvhost-user
/// does), and a read would then fail at once instead of waiting.
fn call_loop(fd: &EventFd, stop: &AtomicBool, irq: &dyn VirtioInterrupt, index: u16) {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    let Ok(ep) = Epoll::new() else { return };
    if ep
        .ctl(
            ControlOperation::Add,
            fd.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .is_err()
    {
        return;
    }
    let mut ev = [EpollEvent::default()];
    while !stop.load(Ordering::SeqCst) {
        match ep.wait(-1, &mut ev) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        if fd.read().is_ok() && !stop.load(Ordering::SeqCst) {
            irq.signal_queue(index);
        }
    }
}

/// The running rings: their indices, and the call threads.
struct Running {
    queues: Vec<u16>,
    calls: Vec<CallThread>,
}

/// A ring the driver set up, kept to start it again on a new connection.
struct SavedRing {
    index: u16,
    size: u16,
    /// Guest-physical addresses of the descriptor table, available and
    /// used rings.
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    kick: Arc<Notifier>,
}

/// What DRIVER_OK handed over.
struct Saved {
    mem: GuestMem,
    features: u64,
    rings: Vec<SavedRing>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

struct Inner {
    /// None while the back end is away.
    fe: Option<Frontend>,
    /// A clone of the connection's socket, to see it close.
    sock: Option<UnixStream>,
    path: PathBuf,
    name: String,
    num_queues: u16,
    queue_size: u16,
    /// What the back end offers (without PROTOCOL_FEATURES).
    offered: u64,
    /// The last configuration read, for when the back end cannot answer.
    config: Vec<u8>,
    running: Option<Running>,
    saved: Option<Saved>,
    deadline: Deadline,
}

pub struct VhostUserBlk {
    inner: Arc<Mutex<Inner>>,
    stop: Arc<AtomicBool>,
    watcher: Option<JoinHandle<()>>,
    watchdog: Option<JoinHandle<()>>,
}

fn vu_err(name: &str, what: &str, e: impl std::fmt::Display) -> String {
    format!("{name}: {what}: {e}")
}

/// Connects and negotiates what does not depend on the guest: the
/// front end, its socket, and the back end's virtio features.
fn handshake(
    path: &Path,
    name: &str,
    num_queues: u16,
    deadline: &Deadline,
) -> Result<(Frontend, UnixStream, u64), String> {
    let sock = UnixStream::connect(path)
        .map_err(|e| format!("{name}: cannot connect to {}: {e}", path.display()))?;
    let watch = sock.try_clone().map_err(|e| vu_err(name, "socket", e))?;
    let _armed = deadline.arm(Some(&watch));
    let mut fe = Frontend::from_stream(sock, num_queues as u64);
    fe.set_owner().map_err(|e| vu_err(name, "SET_OWNER", e))?;
    let features = fe
        .get_features()
        .map_err(|e| vu_err(name, "GET_FEATURES", e))?;
    let proto = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if features & proto == 0 {
        return Err(format!(
            "{name}: the back end has no protocol features (it cannot give its configuration)"
        ));
    }
    // The virtio features wait for the guest's choice (SET_FEATURES at
    // DRIVER_OK); a back end may refuse any set without VERSION_1.
    let pf = fe
        .get_protocol_features()
        .map_err(|e| vu_err(name, "GET_PROTOCOL_FEATURES", e))?;
    if !pf.contains(VhostUserProtocolFeatures::CONFIG) {
        return Err(format!(
            "{name}: the back end does not give its configuration (no CONFIG protocol feature)"
        ));
    }
    fe.set_protocol_features(pf & wanted())
        .map_err(|e| vu_err(name, "SET_PROTOCOL_FEATURES", e))?;
    if num_queues > 1 {
        let n = fe
            .get_queue_num()
            .map_err(|e| vu_err(name, "GET_QUEUE_NUM", e))?;
        if n < num_queues as u64 {
            return Err(format!(
                "{name}: num-queues={num_queues}, but the back end has {n} queue(s)"
            ));
        }
    }
    Ok((fe, watch, features & !proto))
}

impl Inner {
    fn fetch_config(&mut self) -> Result<(), String> {
        let name = self.name.clone();
        let deadline = self.deadline.clone();
        let _armed = deadline.arm(self.sock.as_ref());
        let fe = self
            .fe
            .as_mut()
            .ok_or_else(|| format!("{name}: the back end is away"))?;
        let buf = vec![0u8; CONFIG_LEN];
        let (_, payload) = fe
            .get_config(0, CONFIG_LEN as u32, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(|e| vu_err(&name, "GET_CONFIG", e))?;
        let n = payload.len().min(CONFIG_LEN);
        self.config[..n].copy_from_slice(&payload[..n]);
        // The front end's num-queues is what the guest gets (QEMU
        // overrides the back end's count the same way).
        self.config[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        Ok(())
    }

    /// Hands the saved rings to the back end and starts them.
    fn start(&mut self) -> Result<(), String> {
        let name = self.name.clone();
        let deadline = self.deadline.clone();
        let _armed = deadline.arm(self.sock.as_ref());
        let (Some(fe), Some(a)) = (self.fe.as_mut(), self.saved.as_ref()) else {
            return Ok(());
        };
        let fail = |what: &str, e: &dyn std::fmt::Display| format!("{name}: {what}: {e}");
        fe.set_features(a.features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            .map_err(|e| fail("SET_FEATURES", &e))?;
        let mut regions = Vec::new();
        for r in a.mem.iter() {
            let Some(fo) = r.file_offset() else {
                return Err(format!(
                    "{name}: guest memory is not shared with the back end: use -object \
                     memory-backend-memfd,id=mem,size=...,share=on -machine memory-backend=mem"
                ));
            };
            let host = r
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| format!("{name}: {e}"))?;
            regions.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: host as u64,
                mmap_offset: fo.start(),
                mmap_handle: fo.file().as_raw_fd(),
            });
        }
        fe.set_mem_table(&regions)
            .map_err(|e| fail("SET_MEM_TABLE", &e))?;
        let host = |gpa: u64| -> Result<u64, String> {
            a.mem
                .get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|e| format!("{name}: ring address {gpa:#x}: {e}"))
        };
        let mut running = Running {
            queues: Vec::new(),
            calls: Vec::new(),
        };
        let result = (|| -> Result<(), String> {
            for q in &a.rings {
                let i = q.index as usize;
                let Notifier::Event(kick) = q.kick.as_ref() else {
                    return Err(format!("{name}: ring {i}: no eventfd to kick with"));
                };
                fe.set_vring_num(i, q.size)
                    .map_err(|e| fail("SET_VRING_NUM", &e))?;
                fe.set_vring_base(i, q.next_avail)
                    .map_err(|e| fail("SET_VRING_BASE", &e))?;
                let cfg = VringConfigData {
                    queue_max_size: self.queue_size,
                    queue_size: q.size,
                    flags: 0,
                    desc_table_addr: host(q.desc)?,
                    used_ring_addr: host(q.used)?,
                    avail_ring_addr: host(q.avail)?,
                    log_addr: None,
                };
                fe.set_vring_addr(i, &cfg)
                    .map_err(|e| fail("SET_VRING_ADDR", &e))?;
                let call = Arc::new(EventFd::new(0).map_err(|e| format!("{name}: eventfd: {e}"))?);
                fe.set_vring_call(i, &call)
                    .map_err(|e| fail("SET_VRING_CALL", &e))?;
                fe.set_vring_kick(i, kick)
                    .map_err(|e| fail("SET_VRING_KICK", &e))?;
                let stop = Arc::new(AtomicBool::new(false));
                let (fd, st, irq, index) =
                    (call.clone(), stop.clone(), a.interrupt.clone(), q.index);
                let thread = std::thread::Builder::new()
                    .name(format!("vhost-user call {i}"))
                    .spawn(move || call_loop(&fd, &st, irq.as_ref(), index))
                    .map_err(|e| format!("{name}: {e}"))?;
                running.calls.push(CallThread {
                    fd: call,
                    stop,
                    thread: Some(thread),
                });
                running.queues.push(q.index);
            }
            for &i in &running.queues {
                fe.set_vring_enable(i as usize, true)
                    .map_err(|e| fail("SET_VRING_ENABLE", &e))?;
            }
            Ok(())
        })();
        self.running = Some(running);
        if let Err(e) = result {
            self.halt();
            return Err(e);
        }
        Ok(())
    }

    /// Stops the rings (the back end answers what it took first) and the
    /// call threads.
    fn halt(&mut self) {
        let Some(r) = self.running.take() else {
            return;
        };
        let deadline = self.deadline.clone();
        let _armed = deadline.arm(self.sock.as_ref());
        if let Some(fe) = self.fe.as_mut() {
            for &i in &r.queues {
                let _ = fe.set_vring_enable(i as usize, false);
                if let Err(e) = fe.get_vring_base(i as usize) {
                    log::warn!("{}: GET_VRING_BASE {i}: {e}", self.name);
                }
            }
        }
        for c in r.calls {
            c.stop();
        }
    }

    /// The back end closed the connection: forget it, and resume each
    /// saved ring at its used index.
    fn lost(&mut self) {
        log::warn!(
            "{}: the vhost-user back end went away; reconnecting",
            self.name
        );
        self.fe = None;
        self.sock = None;
        self.halt();
        if let Some(a) = self.saved.as_mut() {
            for q in &mut a.rings {
                if let Ok(idx) = a
                    .mem
                    .load::<u16>(GuestAddress(q.used + 2), Ordering::Acquire)
                {
                    q.next_avail = idx;
                }
            }
        }
    }

    /// One attempt to connect again; true once connected and restarted.
    fn reconnect(&mut self) -> bool {
        let Ok((fe, sock, offered)) =
            handshake(&self.path, &self.name, self.num_queues, &self.deadline)
        else {
            return false;
        };
        if offered != self.offered {
            log::warn!(
                "{}: the back end came back with other features ({offered:#x}, was {:#x})",
                self.name,
                self.offered
            );
        }
        self.fe = Some(fe);
        self.sock = Some(sock);
        if let Err(e) = self.start() {
            log::warn!("{e}");
            self.fe = None;
            self.sock = None;
            return false;
        }
        log::warn!("{}: the vhost-user back end is back", self.name);
        true
    }
}

/// Whether the back end closed the connection (hang-up on the socket).
fn closed(sock: &UnixStream) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::empty())];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(n) if n > 0 => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        _ => false,
    }
}

fn watch(inner: Arc<Mutex<Inner>>, stop: Arc<AtomicBool>) {
    let mut waited = 0u32;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        waited += 1;
        let mut i = lock(&inner);
        match &i.sock {
            Some(s) if closed(s) => {
                i.lost();
                waited = 0;
            }
            Some(_) => {}
            // Once a second, as QEMU's `reconnect=1`.
            None if waited >= 10 => {
                waited = 0;
                i.reconnect();
            }
            None => {}
        }
    }
}

impl VhostUserBlk {
    /// Connects to the back end at `path` and negotiates what does not
    /// depend on the guest.
    pub fn connect(
        path: &Path,
        name: &str,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<VhostUserBlk, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Deadline::default();
        let dog = watchdog(deadline.clone(), stop.clone(), name.to_string())
            .map_err(|e| format!("{name}: {e}"))?;
        let inner = (|| {
            let (fe, sock, offered) = handshake(path, name, num_queues, &deadline)?;
            let mut inner = Inner {
                fe: Some(fe),
                sock: Some(sock),
                path: path.to_path_buf(),
                name: name.to_string(),
                num_queues,
                queue_size,
                offered,
                config: vec![0; CONFIG_LEN],
                running: None,
                saved: None,
                deadline,
            };
            inner.fetch_config()?;
            Ok(inner)
        })();
        let inner = match inner {
            Ok(i) => i,
            Err(e) => {
                stop.store(true, Ordering::SeqCst);
                let _ = dog.join();
                return Err(e);
            }
        };
        let inner = Arc::new(Mutex::new(inner));
        let (i, s) = (inner.clone(), stop.clone());
        let watcher = std::thread::Builder::new()
            .name("vhost-user watch".into())
            .spawn(move || watch(i, s))
            .map_err(|e| format!("{name}: {e}"))?;
        Ok(VhostUserBlk {
            inner,
            stop,
            watcher: Some(watcher),
            watchdog: Some(dog),
        })
    }
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }
    fn num_queues(&self) -> usize {
        lock(&self.inner).num_queues as usize
    }
    fn queue_max_size(&self) -> u16 {
        lock(&self.inner).queue_size
    }
    fn features(&self) -> u64 {
        // The transport adds VERSION_1 itself. MQ follows the front end's
        // num-queues, whatever the back end has (as QEMU's device: one
        // queue is offered without MQ).
        let i = lock(&self.inner);
        let f = i.offered & !super::features::VERSION_1;
        if i.num_queues > 1 {
            f | super::block::features::MQ
        } else {
            f & !super::block::features::MQ
        }
    }
    fn config_len(&self) -> usize {
        CONFIG_LEN
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut i = lock(&self.inner);
        // Fresh at the start of a read (the capacity may have changed);
        // the last answer if the back end cannot give one.
        if offset == 0 {
            if let Err(e) = i.fetch_config() {
                log::debug!("{e}");
            }
        }
        for (k, b) in data.iter_mut().enumerate() {
            *b = i.config.get(offset as usize + k).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut i = lock(&self.inner);
        let deadline = i.deadline.clone();
        let _armed = deadline.arm(i.sock.as_ref());
        if let Some(fe) = i.fe.as_mut() {
            if let Err(e) = fe.set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data) {
                log::warn!("SET_CONFIG: {e}");
            }
        }
        for (k, b) in data.iter().enumerate() {
            if let Some(s) = i.config.get_mut(offset as usize + k) {
                *s = *b;
            }
        }
    }
    fn activate(&mut self, a: Activation) -> Result<(), String> {
        use virtio_queue::QueueT;
        let rings = a
            .queues
            .iter()
            .map(|q| SavedRing {
                index: q.index,
                size: q.queue.size(),
                desc: q.queue.desc_table(),
                avail: q.queue.avail_ring(),
                used: q.queue.used_ring(),
                next_avail: q.queue.next_avail(),
                kick: q.notify.clone(),
            })
            .collect();
        let mut i = lock(&self.inner);
        i.saved = Some(Saved {
            mem: a.mem,
            features: a.features,
            rings,
            interrupt: a.interrupt,
        });
        if i.fe.is_none() {
            // Started when the back end is back.
            return Ok(());
        }
        i.start()
    }
    fn reset(&mut self) {
        let mut i = lock(&self.inner);
        i.halt();
        i.saved = None;
    }
}

impl Drop for VhostUserBlk {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.watcher.take() {
            let _ = t.join();
        }
        lock(&self.inner).halt();
        if let Some(t) = self.watchdog.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A back end that takes the connection and never answers: connecting
    /// fails once ANSWER_TIMEOUT has passed instead of waiting for ever.
    #[test]
    fn a_silent_back_end_is_given_up() {
        let path = std::env::temp_dir().join(format!("strata-vu-silent-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let held = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            // Holds the connection open, reading nothing, until the front
            // end shuts it down.
            let mut buf = [0u8; 1];
            let _ = std::io::Read::read(&mut &s, &mut buf);
            std::thread::sleep(ANSWER_TIMEOUT * 2);
        });
        let t = Instant::now();
        let e = VhostUserBlk::connect(&path, "silent", 1, 128)
            .err()
            .expect("a silent back end cannot be connected");
        assert!(t.elapsed() >= ANSWER_TIMEOUT, "{e}");
        assert!(t.elapsed() < ANSWER_TIMEOUT * 2, "{e}");
        drop(held);
        let _ = std::fs::remove_file(&path);
    }
}
