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

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use super::block::{CONFIG_LEN, DEVICE_TYPE};
use super::{Activation, Notifier, VirtioDevice};
use crate::bus::lock;

/// The protocol features this front end uses.
fn wanted() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
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

/// The running rings: their indices, and the call threads.
struct Running {
    queues: Vec<u16>,
    calls: Vec<CallThread>,
}

pub struct VhostUserBlk {
    fe: Mutex<Frontend>,
    name: String,
    num_queues: u16,
    queue_size: u16,
    /// What the back end offers (without PROTOCOL_FEATURES).
    offered: u64,
    acked: u64,
    /// The last configuration read, for when the back end cannot answer.
    config: Mutex<Vec<u8>>,
    running: Option<Running>,
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
        let fail = |what: &str, e: &dyn std::fmt::Display| format!("{name}: {what}: {e}");
        let mut fe = Frontend::connect(path, num_queues as u64)
            .map_err(|e| format!("{name}: cannot connect to {}: {e}", path.display()))?;
        fe.set_owner().map_err(|e| fail("SET_OWNER", &e))?;
        let features = fe.get_features().map_err(|e| fail("GET_FEATURES", &e))?;
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
            .map_err(|e| fail("GET_PROTOCOL_FEATURES", &e))?;
        if !pf.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(format!(
                "{name}: the back end does not give its configuration (no CONFIG protocol feature)"
            ));
        }
        fe.set_protocol_features(pf & wanted())
            .map_err(|e| fail("SET_PROTOCOL_FEATURES", &e))?;
        if num_queues > 1 {
            let n = fe.get_queue_num().map_err(|e| fail("GET_QUEUE_NUM", &e))?;
            if n < num_queues as u64 {
                return Err(format!(
                    "{name}: num-queues={num_queues}, but the back end has {n} queue(s)"
                ));
            }
        }
        let d = VhostUserBlk {
            fe: Mutex::new(fe),
            name: name.to_string(),
            num_queues,
            queue_size,
            offered: features & !proto,
            acked: 0,
            config: Mutex::new(vec![0; CONFIG_LEN]),
            running: None,
        };
        d.fetch_config()?;
        Ok(d)
    }

    fn fetch_config(&self) -> Result<(), String> {
        let buf = vec![0u8; CONFIG_LEN];
        let (_, payload) = lock(&self.fe)
            .get_config(0, CONFIG_LEN as u32, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(|e| format!("{}: GET_CONFIG: {e}", self.name))?;
        let mut c = lock(&self.config);
        let n = payload.len().min(CONFIG_LEN);
        c[..n].copy_from_slice(&payload[..n]);
        // The front end's num-queues is what the guest gets (QEMU
        // overrides the back end's count the same way).
        c[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        Ok(())
    }

    fn start(&mut self, a: Activation) -> Result<(), String> {
        let name = self.name.clone();
        let fail = |what: &str, e: &dyn std::fmt::Display| format!("{name}: {what}: {e}");
        let fe = lock(&self.fe);
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
        // Stopped on failure half-way: the rings started so far.
        let result = (|| -> Result<(), String> {
            for q in &a.queues {
                let i = q.index as usize;
                let Notifier::Event(kick) = q.notify.as_ref() else {
                    return Err(format!("{name}: ring {i}: no eventfd to kick with"));
                };
                let qu = &q.queue;
                use virtio_queue::QueueT;
                fe.set_vring_num(i, qu.size())
                    .map_err(|e| fail("SET_VRING_NUM", &e))?;
                fe.set_vring_base(i, qu.next_avail())
                    .map_err(|e| fail("SET_VRING_BASE", &e))?;
                let cfg = VringConfigData {
                    queue_max_size: self.queue_size,
                    queue_size: qu.size(),
                    flags: 0,
                    desc_table_addr: host(qu.desc_table())?,
                    used_ring_addr: host(qu.used_ring())?,
                    avail_ring_addr: host(qu.avail_ring())?,
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
                    .spawn(move || {
                        while fd.read().is_ok() && !st.load(Ordering::SeqCst) {
                            irq.signal_queue(index);
                        }
                    })
                    .map_err(|e| format!("{name}: {e}"))?;
                running.calls.push(CallThread {
                    fd: call,
                    stop,
                    thread: Some(thread),
                });
                running.queues.push(q.index);
            }
            Ok(())
        })();
        drop(fe);
        self.running = Some(running);
        if let Err(e) = result {
            self.halt();
            return Err(e);
        }
        let mut fe = lock(&self.fe);
        for &i in &self
            .running
            .as_ref()
            .map(|r| r.queues.clone())
            .unwrap_or_default()
        {
            fe.set_vring_enable(i as usize, true)
                .map_err(|e| format!("{}: SET_VRING_ENABLE: {e}", self.name))?;
        }
        Ok(())
    }

    /// Stops the rings (the back end answers what it took first) and the
    /// call threads.
    fn halt(&mut self) {
        let Some(r) = self.running.take() else {
            return;
        };
        let mut fe = lock(&self.fe);
        for &i in &r.queues {
            let _ = fe.set_vring_enable(i as usize, false);
            if let Err(e) = fe.get_vring_base(i as usize) {
                log::warn!("{}: GET_VRING_BASE {i}: {e}", self.name);
            }
        }
        drop(fe);
        for c in r.calls {
            c.stop();
        }
    }
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }
    fn num_queues(&self) -> usize {
        self.num_queues as usize
    }
    fn queue_max_size(&self) -> u16 {
        self.queue_size
    }
    fn features(&self) -> u64 {
        // The transport adds VERSION_1 itself.
        self.offered & !super::features::VERSION_1
    }
    fn config_len(&self) -> usize {
        CONFIG_LEN
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Fresh at the start of a read (the capacity may have changed);
        // the last answer if the back end cannot give one.
        if offset == 0 {
            if let Err(e) = self.fetch_config() {
                log::warn!("{e}");
            }
        }
        let c = lock(&self.config);
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let Err(e) =
            lock(&self.fe).set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data)
        {
            log::warn!("{}: SET_CONFIG: {e}", self.name);
        }
        let mut c = lock(&self.config);
        for (i, b) in data.iter().enumerate() {
            if let Some(s) = c.get_mut(offset as usize + i) {
                *s = *b;
            }
        }
    }
    fn ack_features(&mut self, f: u64) {
        self.acked = f;
    }
    fn activate(&mut self, a: Activation) -> Result<(), String> {
        self.start(a)
    }
    fn reset(&mut self) {
        self.halt();
        self.acked = 0;
    }
}

impl Drop for VhostUserBlk {
    fn drop(&mut self) {
        self.halt();
    }
}
