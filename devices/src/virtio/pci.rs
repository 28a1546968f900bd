//! The virtio-pci transport (virtio 1.2, section 4.1).
//!
//! One PCI function, laid out as QEMU lays out its virtio-pci devices, so
//! that firmware and drivers that know QEMU find what they expect:
//!
//! | BAR | what |
//! |---|---|
//! | 0 (I/O) | the legacy interface (section 4.1.4.10), when legacy is on |
//! | 1 (mem32, 4 KiB) | MSI-X table at 0, PBA at 0x800 |
//! | 4 (mem64, 16 KiB) | modern: common cfg 0x0, ISR 0x1000, device cfg 0x2000, notify 0x3000 |
//!
//! Modern capabilities (section 4.1.4): common, notify (multiplier 4, one
//! notify address per queue), ISR, device and PCI configuration access.
//! `legacy` + `modern` makes a transitional device (1af4:1000+n, revision
//! 0); modern only is 1af4:1040+n, revision 1 (section 4.1.2.1).
//!
//! Interrupts: MSI-X with one vector per queue plus one for configuration
//! changes, as the driver programs them; with MSI-X off, INTx and the ISR
//! status (section 4.1.4.5). A reset (status 0) stops the device, which
//! completes its in-flight requests first, and returns every register to
//! its initial value.

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    features, status, Activation, ActiveQueue, IoEventRegistrar, NotifyAddr, VirtioDevice,
    VirtioInterrupt, NO_VECTOR,
};
use crate::bus::{le_value, lock, put_le};
use crate::irq::IrqLine;
use crate::pci::config::{BarKind, COMMAND};
use crate::pci::msix::{MsiSender, Msix};
use crate::pci::{PciConfig, PciFunction};
use crate::GuestMem;

pub const VENDOR_ID: u16 = 0x1af4;

const LEGACY_BAR: usize = 0;
const MSIX_BAR: usize = 1;
const MODERN_BAR: usize = 4;
const MODERN_BAR_SIZE: u64 = 0x4000;
const COMMON_OFF: u64 = 0x0000;
const ISR_OFF: u64 = 0x1000;
const DEVICE_OFF: u64 = 0x2000;
const NOTIFY_OFF: u64 = 0x3000;
const REGION_LEN: u64 = 0x1000;

/// The PCI device ID of a transitional device of type `ty` (virtio 1.2,
/// 4.1.2.1): a fixed table, not a formula.
fn transitional_id(ty: u16) -> Result<u16, String> {
    Ok(match ty {
        1 => 0x1000, // network
        2 => 0x1001, // block
        5 => 0x1002, // memory balloon
        3 => 0x1003, // console
        8 => 0x1004, // SCSI host
        4 => 0x1005, // entropy
        9 => 0x1009, // 9P transport
        _ => {
            return Err(format!(
                "virtio device type {ty} has no transitional interface"
            ))
        }
    })
}
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_BAR_SIZE: u64 = 0x1000;
const MSIX_PBA_OFF: u64 = 0x800;

/// Capability types (section 4.1.4).
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_PCI: u8 = 5;

/// Legacy register offsets (section 4.1.4.10).
mod legacy {
    pub const HOST_FEATURES: u64 = 0x00;
    pub const GUEST_FEATURES: u64 = 0x04;
    pub const QUEUE_PFN: u64 = 0x08;
    pub const QUEUE_NUM: u64 = 0x0c;
    pub const QUEUE_SEL: u64 = 0x0e;
    pub const QUEUE_NOTIFY: u64 = 0x10;
    pub const STATUS: u64 = 0x12;
    pub const ISR: u64 = 0x13;
    pub const CONFIG_VECTOR: u64 = 0x14;
    pub const QUEUE_VECTOR: u64 = 0x16;
    /// Device config starts here, or at 0x18 when MSI-X is enabled.
    pub const CONFIG: u64 = 0x14;
    pub const CONFIG_MSIX: u64 = 0x18;
    /// Legacy ring alignment (section 2.7.2, "Legacy Interfaces").
    pub const ALIGN: u64 = 4096;
}

/// ISR bits.
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// Which interfaces the function exposes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportOptions {
    pub modern: bool,
    pub legacy: bool,
    /// MSI-X vectors; 0 disables MSI-X.
    pub msix_vectors: u16,
}

/// The interrupt side of the transport, shared with the device's handler
/// thread.
pub struct PciInterrupt {
    isr: AtomicU8,
    msix: Mutex<Msix>,
    has_msix: bool,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    msi: Arc<dyn MsiSender>,
    intx: Arc<dyn IrqLine>,
    /// `config_generation` (section 4.1.4.3): bumped on every host-side
    /// configuration change, so a driver reading a multi-field value can
    /// tell it changed under it.
    generation: AtomicU8,
    /// DRIVER_OK is set: configuration changes are signalled.
    driver_ok: std::sync::atomic::AtomicBool,
}

impl super::ConfigSignal for PciInterrupt {
    fn config_changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if self.driver_ok.load(Ordering::SeqCst) {
            self.signal_config();
        }
    }
}

impl PciInterrupt {
    fn raise(&self, vector: u16, isr_bit: u8) {
        if self.has_msix {
            let mut m = lock(&self.msix);
            if m.enabled() {
                if vector != NO_VECTOR {
                    m.notify(vector, self.msi.as_ref());
                }
                return;
            }
        }
        self.isr.fetch_or(isr_bit, Ordering::SeqCst);
        self.intx.set_level(true);
    }

    /// Reading the ISR clears it and deasserts INTx (section 4.1.4.5).
    fn read_isr(&self) -> u8 {
        let v = self.isr.swap(0, Ordering::SeqCst);
        self.intx.set_level(false);
        v
    }

    fn reset(&self) {
        self.isr.store(0, Ordering::SeqCst);
        self.intx.set_level(false);
        self.driver_ok.store(false, Ordering::SeqCst);
        self.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        for v in &self.queue_vectors {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
    }

    /// A vector the driver wrote: kept if it exists, else NO_VECTOR, which
    /// is how the driver learns that the mapping failed (4.1.5.1.2).
    fn checked_vector(&self, v: u16) -> u16 {
        let n = if self.has_msix {
            lock(&self.msix).vectors()
        } else {
            0
        };
        if v < n {
            v
        } else {
            NO_VECTOR
        }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn signal_queue(&self, queue: u16) {
        let v = self
            .queue_vectors
            .get(queue as usize)
            .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst));
        self.raise(v, ISR_QUEUE);
    }
    fn signal_config(&self) {
        // QEMU sets the queue bit with the configuration bit (ISR 0x3), and
        // drivers written against it (libqos's virtio-blk resize test waits
        // for bit 0 after a resize) rely on that; drivers that follow the
        // spec only scan their queues once more.
        self.raise(
            self.config_vector.load(Ordering::SeqCst),
            ISR_CONFIG | ISR_QUEUE,
        );
    }
}

pub struct VirtioPci {
    cfg: PciConfig,
    dev: Box<dyn VirtioDevice>,
    opts: TransportOptions,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: Vec<Queue>,
    notify: Vec<Arc<EventFd>>,
    irq: Arc<PciInterrupt>,
    ioevents: Arc<dyn IoEventRegistrar>,
    /// Notify addresses currently bound to eventfds, with their queue.
    bound: Vec<(NotifyAddr, usize)>,
    mem: GuestMem,
    active: bool,
    /// Offset of the VIRTIO_PCI_CAP_PCI_CFG capability (0 if none).
    pci_cfg_cap: u16,
}

fn cap_body(cfg_type: u8, bar: u8, offset: u32, length: u32, extra: &[u8]) -> Vec<u8> {
    // virtio_pci_cap without cap_vndr/cap_next: cap_len, cfg_type, bar,
    // id, padding[2], offset, length, then the type's extra fields.
    let mut b = vec![(16 + extra.len()) as u8, cfg_type, bar, 0, 0, 0];
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&length.to_le_bytes());
    b.extend_from_slice(extra);
    b
}

impl VirtioPci {
    /// Wraps `dev` in a PCI function. `intx` is the function's INTA line
    /// (through the PIRQ router), `msi` delivers MSI-X messages and
    /// `ioevents` binds queue notifications to eventfds.
    pub fn new(
        dev: Box<dyn VirtioDevice>,
        opts: TransportOptions,
        mem: GuestMem,
        intx: Arc<dyn IrqLine>,
        msi: Arc<dyn MsiSender>,
        ioevents: Arc<dyn IoEventRegistrar>,
    ) -> Result<Self, String> {
        if !opts.modern && !opts.legacy {
            return Err("disable-legacy=on and disable-modern=on leave no interface".into());
        }
        let ty = dev.device_type();
        let (device_id, revision) = if opts.legacy {
            (transitional_id(ty)?, 0)
        } else {
            (0x1040 + ty, 1)
        };
        let class = match ty {
            2 | 8 => 0x010000, // mass storage, SCSI
            _ => 0xff0000,
        };
        let mut cfg = PciConfig::new(VENDOR_ID, device_id, class, revision);
        // The subsystem ID is the device type for transitional devices and
        // a value >= 0x40 for modern ones (4.1.2.1); QEMU uses the type.
        cfg.set_subsystem(VENDOR_ID, ty);
        cfg.set_interrupt_pin(1);
        let nq = dev.num_queues();
        if opts.legacy {
            let need = legacy::CONFIG_MSIX + dev.config_len() as u64;
            cfg.add_bar(LEGACY_BAR, BarKind::Io, need.next_power_of_two().max(0x40));
        }
        let mut msix = Msix::new(opts.msix_vectors.max(1));
        if opts.msix_vectors > 0 {
            cfg.add_bar(MSIX_BAR, BarKind::Mem32, MSIX_BAR_SIZE);
            msix.add_capability(
                &mut cfg,
                MSIX_BAR as u8,
                0,
                MSIX_BAR as u8,
                MSIX_PBA_OFF as u32,
            );
        }
        let mut pci_cfg_cap = 0;
        if opts.modern {
            cfg.add_bar(MODERN_BAR, BarKind::Mem64, MODERN_BAR_SIZE);
            let bar = MODERN_BAR as u8;
            let r = REGION_LEN as u32;
            let body = cap_body(CFG_COMMON, bar, COMMON_OFF as u32, r, &[]);
            cfg.add_capability(CAP_VENDOR, &body);
            let body = cap_body(CFG_ISR, bar, ISR_OFF as u32, r, &[]);
            cfg.add_capability(CAP_VENDOR, &body);
            let body = cap_body(CFG_DEVICE, bar, DEVICE_OFF as u32, r, &[]);
            cfg.add_capability(CAP_VENDOR, &body);
            let notify_len = (nq as u32 * NOTIFY_MULTIPLIER).max(4);
            let body = cap_body(
                CFG_NOTIFY,
                bar,
                NOTIFY_OFF as u32,
                notify_len,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            );
            cfg.add_capability(CAP_VENDOR, &body);
            let body = cap_body(CFG_PCI, 0, 0, 0, &[0; 4]);
            pci_cfg_cap = cfg.add_capability(CAP_VENDOR, &body);
            // bar, offset, length and data are the driver's to write.
            cfg.set_writable(pci_cfg_cap + 4, 1);
            cfg.set_writable(pci_cfg_cap + 8, 12);
        }
        let max = dev.queue_max_size();
        let queues = (0..nq)
            .map(|_| Queue::new(max).map_err(|e| format!("queue-size {max}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let notify = (0..nq)
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("eventfd: {e}"))?;
        let irq = Arc::new(PciInterrupt {
            isr: AtomicU8::new(0),
            msix: Mutex::new(msix),
            has_msix: opts.msix_vectors > 0,
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..nq).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            msi,
            intx,
            generation: AtomicU8::new(0),
            driver_ok: std::sync::atomic::AtomicBool::new(false),
        });
        let mut dev = dev;
        dev.set_config_signal(irq.clone());
        Ok(VirtioPci {
            cfg,
            dev,
            opts,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues,
            notify,
            irq,
            ioevents,
            bound: Vec::new(),
            mem,
            active: false,
            pci_cfg_cap,
        })
    }

    /// Everything offered: the device's features plus VERSION_1 when the
    /// modern interface exists.
    fn device_features(&self) -> u64 {
        let mut f = self.dev.features();
        if self.opts.modern {
            f |= features::VERSION_1;
        } else {
            f &= 0xffff_ffff;
        }
        f
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn reset(&mut self) {
        if self.active {
            self.dev.reset();
            self.active = false;
        }
        self.unbind_all();
        for q in &mut self.queues {
            q.reset();
        }
        for n in &self.notify {
            let _ = n.read(); // drop stale notifications
        }
        self.irq.reset();
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
    }

    /// A status write; `legacy` says it came through the legacy interface
    /// (I/O BAR), the only one on which DRIVER_OK without FEATURES_OK
    /// activates the device (virtio 1.2 section 3.1.2).
    fn set_status(&mut self, v: u8, legacy: bool) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        if v & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            // Section 2.2.2: accept only a subset of what was offered, and
            // a modern driver must accept VERSION_1.
            let offered = self.device_features();
            let ok = self.driver_features & !offered == 0
                && (self.driver_features & features::VERSION_1 != 0 || !self.opts.modern);
            if ok {
                self.dev.ack_features(self.driver_features);
            } else {
                v &= !status::FEATURES_OK;
            }
        }
        let was_ok = self.status & status::DRIVER_OK != 0;
        self.status = v;
        self.irq
            .driver_ok
            .store(v & status::DRIVER_OK != 0, Ordering::SeqCst);
        if v & status::DRIVER_OK != 0 && !was_ok && !self.active {
            if !legacy && v & status::FEATURES_OK == 0 {
                // Section 3.1.1: a driver of the modern interface must set
                // FEATURES_OK before DRIVER_OK; without it there is no
                // feature set to run with, so the device does not operate
                // (and says so), rather than falling back to legacy.
                log::warn!("virtio: DRIVER_OK without FEATURES_OK on the modern interface");
                self.needs_reset();
                return;
            }
            self.activate();
        }
    }

    fn activate(&mut self) {
        let modern_driver = self.driver_features & features::VERSION_1 != 0;
        if modern_driver && self.status & status::FEATURES_OK == 0 {
            log::warn!("virtio: DRIVER_OK without FEATURES_OK");
            self.needs_reset();
            return;
        }
        if !modern_driver {
            // A legacy driver has no FEATURES_OK: its features write counts.
            self.dev.ack_features(self.driver_features);
        }
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for (i, q) in self.queues.iter_mut().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(&self.mem) {
                log::warn!("virtio: queue {i} is outside guest memory");
                self.needs_reset();
                return;
            }
            q.set_event_idx(event_idx);
            queues.push(ActiveQueue {
                index: i as u16,
                queue: copy_queue(q),
                notify: Arc::new(super::Notifier::Event(self.notify[i].clone())),
            });
        }
        let a = Activation {
            mem: self.mem.clone(),
            features: self.driver_features,
            queues,
            interrupt: self.irq.clone(),
        };
        match self.dev.activate(a) {
            Ok(()) => {
                self.active = true;
                self.sync_ioevents();
            }
            Err(e) => {
                log::error!("virtio: cannot start the device: {e}");
                self.needs_reset();
            }
        }
    }

    /// Section 2.1.2: the device entered an error state.
    fn needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        if self.status & status::DRIVER_OK != 0 {
            self.irq.signal_config();
        }
    }

    /// The notify addresses of enabled queues at the BARs' current
    /// addresses.
    fn wanted_ioevents(&self) -> Vec<(NotifyAddr, usize)> {
        let mut v = Vec::new();
        if !self.active {
            return v;
        }
        let cmd = self.cfg.command();
        let ready: Vec<usize> = (0..self.queues.len())
            .filter(|&i| self.queues[i].ready())
            .collect();
        if self.opts.modern && cmd & crate::pci::config::CMD_MEM != 0 {
            if let Some(bar) = self.cfg.bar_base(MODERN_BAR).filter(|b| b.base != 0) {
                for &i in &ready {
                    let a = bar.base + NOTIFY_OFF + i as u64 * NOTIFY_MULTIPLIER as u64;
                    v.push((NotifyAddr::Mmio(a), i));
                }
            }
        }
        if self.opts.legacy && cmd & crate::pci::config::CMD_IO != 0 {
            if let Some(bar) = self.cfg.bar_base(LEGACY_BAR).filter(|b| b.base != 0) {
                for &i in &ready {
                    let port = bar.base + legacy::QUEUE_NOTIFY;
                    v.push((
                        NotifyAddr::Pio {
                            port,
                            value: i as u16,
                        },
                        i,
                    ));
                }
            }
        }
        v
    }

    /// Keeps the eventfd bindings in step with the BARs (firmware or the
    /// OS may move them) and with the device's state.
    fn sync_ioevents(&mut self) {
        let wanted = self.wanted_ioevents();
        if wanted == self.bound {
            return;
        }
        self.unbind_all();
        for (addr, q) in wanted {
            match self.ioevents.register(addr, &self.notify[q]) {
                Ok(()) => self.bound.push((addr, q)),
                // Not fatal: the write then arrives as a bus access.
                Err(e) => log::warn!("virtio: ioeventfd at {addr:?}: {e}"),
            }
        }
    }

    fn unbind_all(&mut self) {
        for (addr, q) in std::mem::take(&mut self.bound) {
            self.ioevents.unregister(addr, &self.notify[q]);
        }
    }

    fn notify_queue(&self, q: u64) {
        if let Some(fd) = self.notify.get(q as usize) {
            let _ = fd.write(1);
        }
    }

    // --- modern common configuration (section 4.1.4.3) ---

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        // Build the structure and read from it: every field is small and
        // this also gives sensible results for odd access sizes.
        let mut r = [0u8; 0x38];
        let f = self.device_features();
        let sel = self.device_feature_select;
        let feat = match sel {
            0 => f as u32,
            1 => (f >> 32) as u32,
            _ => 0,
        };
        put_le(&mut r[0x00..0x04], sel as u64);
        put_le(&mut r[0x04..0x08], feat as u64);
        put_le(&mut r[0x08..0x0c], self.driver_feature_select as u64);
        let drv = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put_le(&mut r[0x0c..0x10], drv as u64);
        let cv = self.irq.config_vector.load(Ordering::SeqCst);
        put_le(&mut r[0x10..0x12], cv as u64);
        put_le(&mut r[0x12..0x14], self.queues.len() as u64);
        r[0x14] = self.status;
        r[0x15] = self.irq.generation.load(Ordering::SeqCst);
        put_le(&mut r[0x16..0x18], self.queue_select as u64);
        let qs = self.queue_select as usize;
        if let Some(q) = self.queues.get(qs) {
            put_le(&mut r[0x18..0x1a], q.size() as u64);
            let v = self.irq.queue_vectors[qs].load(Ordering::SeqCst);
            put_le(&mut r[0x1a..0x1c], v as u64);
            put_le(&mut r[0x1c..0x1e], q.ready() as u64);
            put_le(&mut r[0x1e..0x20], qs as u64);
            put_le(&mut r[0x20..0x28], q.desc_table());
            put_le(&mut r[0x28..0x30], q.avail_ring());
            put_le(&mut r[0x30..0x38], q.used_ring());
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = r.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let v = le_value(data);
        let live = self.status & status::DRIVER_OK != 0;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v as u32,
            (0x08, 4) => self.driver_feature_select = v as u32,
            (0x0c, 4) => {
                // Features are fixed once FEATURES_OK is set (2.2.2).
                if self.status & status::FEATURES_OK == 0 {
                    let v = v & 0xffff_ffff;
                    match self.driver_feature_select {
                        0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                        1 => self.driver_features = (self.driver_features & 0xffff_ffff) | v << 32,
                        _ => {}
                    }
                }
            }
            (0x10, 2) => {
                let v = self.irq.checked_vector(v as u16);
                self.irq.config_vector.store(v, Ordering::SeqCst);
            }
            (0x14, 1) => self.set_status(v as u8, false),
            (0x16, 2) => self.queue_select = v as u16,
            (0x18, 2) if !live => {
                if let Some(q) = self.queue() {
                    // An invalid size (not a power of two, too large) is
                    // ignored; the driver reads back what took effect.
                    let _ = q.try_set_size(v as u16);
                }
            }
            (0x1a, 2) => {
                let vec = self.irq.checked_vector(v as u16);
                if let Some(slot) = self.irq.queue_vectors.get(self.queue_select as usize) {
                    slot.store(vec, Ordering::SeqCst);
                }
            }
            (0x1c, 2) if !live => {
                if v == 1 {
                    if let Some(q) = self.queue() {
                        q.set_ready(true);
                    }
                }
            }
            (0x20..=0x37, 4 | 8) if !live => {
                let base = offset & !7;
                let shift = (offset & 7) * 8;
                let Some(q) = self.queue() else { return };
                let old = match base {
                    0x20 => q.desc_table(),
                    0x28 => q.avail_ring(),
                    _ => q.used_ring(),
                };
                let mask = if data.len() == 8 {
                    u64::MAX
                } else {
                    0xffff_ffffu64 << shift
                };
                let new = (old & !mask) | ((v << shift) & mask);
                let (lo, hi) = (Some(new as u32), Some((new >> 32) as u32));
                match base {
                    0x20 => q.set_desc_table_address(lo, hi),
                    0x28 => q.set_avail_ring_address(lo, hi),
                    _ => q.set_used_ring_address(lo, hi),
                }
            }
            _ => log::debug!(
                "virtio: ignored common cfg write {offset:#x}/{}",
                data.len()
            ),
        }
    }

    // --- legacy interface (section 4.1.4.10) ---

    fn legacy_config_base(&self) -> u64 {
        if self.irq.has_msix && lock(&self.irq.msix).enabled() {
            legacy::CONFIG_MSIX
        } else {
            legacy::CONFIG
        }
    }

    fn legacy_read(&mut self, offset: u64, data: &mut [u8]) {
        let cbase = self.legacy_config_base();
        if offset >= cbase {
            self.dev.read_config(offset - cbase, data);
            return;
        }
        let qs = self.queue_select as usize;
        let v: u64 = match offset {
            legacy::HOST_FEATURES => self.device_features() & 0xffff_ffff,
            legacy::GUEST_FEATURES => self.driver_features & 0xffff_ffff,
            legacy::QUEUE_PFN => self
                .queues
                .get(qs)
                .filter(|q| q.ready())
                .map_or(0, |q| q.desc_table() / legacy::ALIGN),
            legacy::QUEUE_NUM => self.queues.get(qs).map_or(0, |q| q.max_size() as u64),
            legacy::QUEUE_SEL => qs as u64,
            legacy::STATUS => self.status as u64,
            legacy::ISR => self.irq.read_isr() as u64,
            legacy::CONFIG_VECTOR => self.irq.config_vector.load(Ordering::SeqCst) as u64,
            legacy::QUEUE_VECTOR => {
                self.irq
                    .queue_vectors
                    .get(qs)
                    .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst)) as u64
            }
            _ => 0,
        };
        put_le(data, v);
    }

    fn legacy_write(&mut self, offset: u64, data: &[u8]) {
        let cbase = self.legacy_config_base();
        if offset >= cbase {
            self.dev.write_config(offset - cbase, data);
            return;
        }
        let v = le_value(data);
        match offset {
            // Features are fixed once the driver is running.
            legacy::GUEST_FEATURES if self.status & status::DRIVER_OK == 0 => {
                self.driver_features = v & self.device_features() & 0xffff_ffff;
            }
            legacy::QUEUE_PFN => self.legacy_set_pfn(v as u32),
            legacy::QUEUE_SEL => self.queue_select = v as u16,
            legacy::QUEUE_NOTIFY => self.notify_queue(v & 0xffff),
            legacy::STATUS => self.set_status(v as u8, true),
            legacy::CONFIG_VECTOR => {
                let v = self.irq.checked_vector(v as u16);
                self.irq.config_vector.store(v, Ordering::SeqCst);
            }
            legacy::QUEUE_VECTOR => {
                let vec = self.irq.checked_vector(v as u16);
                if let Some(slot) = self.irq.queue_vectors.get(self.queue_select as usize) {
                    slot.store(vec, Ordering::SeqCst);
                }
            }
            _ => {}
        }
    }

    /// A legacy queue lives in one physically contiguous area: descriptors,
    /// the available ring, then the used ring at the next 4 KiB boundary.
    fn legacy_set_pfn(&mut self, pfn: u32) {
        if self.status & status::DRIVER_OK != 0 {
            return;
        }
        let Some(q) = self.queue() else { return };
        if pfn == 0 {
            q.reset();
            return;
        }
        let n = q.max_size() as u64;
        let desc = pfn as u64 * legacy::ALIGN;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n).div_ceil(legacy::ALIGN) * legacy::ALIGN;
        let set = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (l, h) = set(desc);
        q.set_desc_table_address(l, h);
        let (l, h) = set(avail);
        q.set_avail_ring_address(l, h);
        let (l, h) = set(used);
        q.set_used_ring_address(l, h);
        q.set_ready(true);
    }

    /// VIRTIO_PCI_CAP_PCI_CFG data window (section 4.1.4.9): an access to
    /// `pci_cfg_data` goes to the BAR, offset and length the driver wrote
    /// into the capability.
    fn pci_cfg_window(&mut self, write: Option<&[u8]>, out: &mut [u8]) {
        let cap = self.pci_cfg_cap;
        let bar = self.cfg.u8(cap + 4) as usize;
        let off = self.cfg.u32(cap + 8) as u64;
        let len = self.cfg.u32(cap + 12) as usize;
        if !matches!(len, 1 | 2 | 4) || bar != MODERN_BAR {
            out.fill(0);
            return;
        }
        match write {
            Some(d) => {
                let mut buf = [0u8; 4];
                buf[..d.len().min(4)].copy_from_slice(&d[..d.len().min(4)]);
                self.region_write(bar, off, &buf[..len]);
            }
            None => {
                let mut buf = [0u8; 4];
                self.region_read(bar, off, &mut buf[..len]);
                out.fill(0);
                let n = out.len().min(len);
                out[..n].copy_from_slice(&buf[..n]);
            }
        }
    }

    fn in_pci_cfg_data(&self, offset: u16, len: usize) -> bool {
        let d = self.pci_cfg_cap + 16;
        self.pci_cfg_cap != 0 && offset >= d && offset as usize + len <= d as usize + 4
    }
}

/// A copy of a queue's driver-programmed state, handed to the device
/// (the crate's `Queue` is not `Clone`).
fn copy_queue(q: &Queue) -> Queue {
    let mut c = Queue::new(q.max_size()).expect("max size was valid for the original");
    c.set_size(q.size());
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (l, h) = split(q.desc_table());
    c.set_desc_table_address(l, h);
    let (l, h) = split(q.avail_ring());
    c.set_avail_ring_address(l, h);
    let (l, h) = split(q.used_ring());
    c.set_used_ring_address(l, h);
    c.set_event_idx(q.event_idx_enabled());
    c.set_next_avail(q.next_avail());
    c.set_next_used(q.next_used());
    c.set_ready(q.ready());
    c
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        if self.active {
            self.dev.reset();
        }
        self.unbind_all();
    }
}

impl PciFunction for VirtioPci {
    fn config(&self) -> &PciConfig {
        &self.cfg
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.cfg
    }

    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        if self.in_pci_cfg_data(offset, data.len()) {
            self.pci_cfg_window(None, data);
            return;
        }
        self.cfg.read(offset, data)
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        if self.in_pci_cfg_data(offset, data.len()) {
            self.pci_cfg_window(Some(data), &mut [0u8; 4]);
            return;
        }
        self.cfg.write(offset, data);
        if self.irq.has_msix {
            lock(&self.irq.msix).config_written(&self.cfg, self.irq.msi.as_ref());
        }
        // BARs and the command register decide where notifications land.
        let end = offset as usize + data.len();
        if (offset as usize) < 0x28 && end > COMMAND as usize {
            self.sync_ioevents();
        }
    }

    fn region_read(&mut self, region: usize, offset: u64, data: &mut [u8]) {
        match region {
            LEGACY_BAR if self.opts.legacy => self.legacy_read(offset, data),
            MSIX_BAR if self.irq.has_msix => {
                let m = lock(&self.irq.msix);
                if offset < MSIX_PBA_OFF {
                    m.table_read(offset, data)
                } else {
                    m.pba_read(offset - MSIX_PBA_OFF, data)
                }
            }
            MODERN_BAR if self.opts.modern => match offset {
                0..ISR_OFF => self.common_read(offset - COMMON_OFF, data),
                ISR_OFF..DEVICE_OFF => {
                    data.fill(0);
                    if offset == ISR_OFF {
                        data[0] = self.irq.read_isr();
                    }
                }
                DEVICE_OFF..NOTIFY_OFF => self.dev.read_config(offset - DEVICE_OFF, data),
                _ => data.fill(0),
            },
            _ => data.fill(0xff),
        }
    }

    fn region_write(&mut self, region: usize, offset: u64, data: &[u8]) {
        match region {
            LEGACY_BAR if self.opts.legacy => self.legacy_write(offset, data),
            // The PBA is read-only.
            MSIX_BAR if self.irq.has_msix && offset < MSIX_PBA_OFF => {
                let irq = self.irq.clone();
                lock(&irq.msix).table_write(offset, data, irq.msi.as_ref());
            }
            MODERN_BAR if self.opts.modern => match offset {
                0..ISR_OFF => self.common_write(offset - COMMON_OFF, data),
                DEVICE_OFF..NOTIFY_OFF => self.dev.write_config(offset - DEVICE_OFF, data),
                NOTIFY_OFF.. => {
                    let q = (offset - NOTIFY_OFF) / NOTIFY_MULTIPLIER as u64;
                    if q < self.queues.len() as u64 {
                        self.notify_queue(q);
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }
}

/// Reads guest memory at `a`, for tests of this module.
#[cfg(test)]
fn read_u16(mem: &GuestMem, a: u64) -> u16 {
    use vm_memory::{Bytes, GuestAddress};
    mem.read_obj(GuestAddress(a)).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;
    use vm_memory::GuestAddress;

    struct Dummy {
        activated: Arc<StdMutex<Option<Vec<u16>>>>,
        cfg: [u8; 8],
    }
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u16 {
            2
        }
        fn num_queues(&self) -> usize {
            2
        }
        fn queue_max_size(&self) -> u16 {
            16
        }
        fn features(&self) -> u64 {
            features::RING_EVENT_IDX | 1 << 9
        }
        fn config_len(&self) -> usize {
            8
        }
        fn read_config(&self, o: u64, d: &mut [u8]) {
            for (i, b) in d.iter_mut().enumerate() {
                *b = self.cfg.get(o as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, a: Activation) -> Result<(), String> {
            *self.activated.lock().unwrap() = Some(a.queues.iter().map(|q| q.index).collect());
            Ok(())
        }
        fn reset(&mut self) {
            *self.activated.lock().unwrap() = None;
        }
    }

    struct Level(StdMutex<bool>);
    impl IrqLine for Level {
        fn set_level(&self, l: bool) {
            *self.0.lock().unwrap() = l;
        }
    }

    type Activated = Arc<StdMutex<Option<Vec<u16>>>>;

    fn make(opts: TransportOptions) -> (VirtioPci, Activated, Arc<Level>, GuestMem) {
        let act = Arc::new(StdMutex::new(None));
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let level = Arc::new(Level(StdMutex::new(false)));
        let dev = Dummy {
            activated: act.clone(),
            cfg: [1, 2, 3, 4, 5, 6, 7, 8],
        };
        let t = VirtioPci::new(
            Box::new(dev),
            opts,
            mem.clone(),
            level.clone(),
            Arc::new(crate::pci::msix::NoMsi),
            Arc::new(super::super::NoIoEvents),
        )
        .unwrap();
        (t, act, level, mem)
    }

    #[test]
    fn modern_negotiation_and_activation() {
        let (mut t, act, level, mem) = make(TransportOptions {
            modern: true,
            legacy: false,
            msix_vectors: 3,
        });
        assert_eq!(t.cfg.u32(0), 0x1042_1af4);
        assert_eq!(t.cfg.u8(8), 1);
        let w = |t: &mut VirtioPci, o: u64, v: u64, n: usize| {
            t.region_write(MODERN_BAR, o, &v.to_le_bytes()[..n])
        };
        let r = |t: &mut VirtioPci, o: u64, n: usize| {
            let mut b = [0u8; 8];
            t.region_read(MODERN_BAR, o, &mut b[..n]);
            u64::from_le_bytes(b)
        };
        w(&mut t, 0x00, 1, 4);
        assert_eq!(r(&mut t, 0x04, 4), 1, "VERSION_1");
        assert_eq!(r(&mut t, 0x12, 2), 2);
        // Accepting something not offered fails FEATURES_OK.
        w(&mut t, 0x14, 3, 1);
        w(&mut t, 0x08, 0, 4);
        w(&mut t, 0x0c, 1 << 5, 4);
        w(&mut t, 0x14, 0xb, 1);
        assert_eq!(r(&mut t, 0x14, 1), 3);
        w(&mut t, 0x0c, 1 << 9, 4);
        w(&mut t, 0x08, 1, 4);
        w(&mut t, 0x0c, 1, 4);
        w(&mut t, 0x14, 0xb, 1);
        assert_eq!(r(&mut t, 0x14, 1), 0xb);
        // Queue 1: size 8, rings in RAM, vector 7 is refused.
        w(&mut t, 0x16, 1, 2);
        assert_eq!(r(&mut t, 0x18, 2), 16);
        w(&mut t, 0x18, 6, 2);
        assert_eq!(r(&mut t, 0x18, 2), 16, "not a power of two");
        w(&mut t, 0x18, 8, 2);
        w(&mut t, 0x1a, 7, 2);
        assert_eq!(r(&mut t, 0x1a, 2), NO_VECTOR as u64);
        w(&mut t, 0x1a, 2, 2);
        assert_eq!(r(&mut t, 0x1a, 2), 2);
        w(&mut t, 0x20, 0x1000, 4);
        w(&mut t, 0x24, 0, 4);
        w(&mut t, 0x28, 0x2000, 8);
        w(&mut t, 0x30, 0x3000, 8);
        assert_eq!(r(&mut t, 0x28, 8), 0x2000);
        w(&mut t, 0x1c, 1, 2);
        assert_eq!(r(&mut t, 0x1e, 2), 1);
        w(&mut t, 0x14, 0xf, 1);
        assert_eq!(*act.lock().unwrap(), Some(vec![1]));
        // Config space and INTx (MSI-X is off).
        assert_eq!(r(&mut t, DEVICE_OFF + 2, 2), 0x0403);
        t.irq.signal_queue(1);
        assert!(*level.0.lock().unwrap());
        assert_eq!(r(&mut t, ISR_OFF, 1), 1);
        assert!(!*level.0.lock().unwrap());
        assert_eq!(r(&mut t, ISR_OFF, 1), 0);
        w(&mut t, 0x14, 0, 1);
        assert_eq!(*act.lock().unwrap(), None);
        assert_eq!(r(&mut t, 0x14, 1), 0);
        assert_eq!(read_u16(&mem, 0), 0);
    }

    #[test]
    fn legacy_queue_layout_and_notify() {
        let (mut t, act, _level, _mem) = make(TransportOptions {
            modern: false,
            legacy: true,
            msix_vectors: 0,
        });
        assert_eq!(t.cfg.u32(0), 0x1001_1af4);
        let mut b = [0u8; 4];
        t.region_read(LEGACY_BAR, legacy::HOST_FEATURES, &mut b);
        assert_eq!(
            u32::from_le_bytes(b) as u64,
            features::RING_EVENT_IDX | 1 << 9
        );
        t.region_write(LEGACY_BAR, legacy::QUEUE_SEL, &0u16.to_le_bytes());
        t.region_read(LEGACY_BAR, legacy::QUEUE_NUM, &mut b[..2]);
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), 16);
        t.region_write(LEGACY_BAR, legacy::QUEUE_PFN, &5u32.to_le_bytes());
        let q = &t.queues[0];
        assert_eq!(q.desc_table(), 0x5000);
        assert_eq!(q.avail_ring(), 0x5100);
        assert_eq!(q.used_ring(), 0x6000);
        t.region_write(LEGACY_BAR, legacy::STATUS, &[7]);
        assert_eq!(*act.lock().unwrap(), Some(vec![0]));
        t.region_write(LEGACY_BAR, legacy::QUEUE_NOTIFY, &0u16.to_le_bytes());
        assert_eq!(t.notify[0].read().unwrap(), 1);
        // Device config at 0x14 without MSI-X.
        t.region_read(LEGACY_BAR, 0x14, &mut b);
        assert_eq!(b, [1, 2, 3, 4]);
    }

    #[test]
    fn modern_driver_ok_without_features_ok_does_not_activate() {
        let (mut t, act, _level, _mem) = make(TransportOptions {
            modern: true,
            legacy: true,
            msix_vectors: 0,
        });
        let w = |t: &mut VirtioPci, o: u64, v: u64, n: usize| {
            t.region_write(MODERN_BAR, o, &v.to_le_bytes()[..n])
        };
        let r = |t: &mut VirtioPci, o: u64, n: usize| {
            let mut b = [0u8; 8];
            t.region_read(MODERN_BAR, o, &mut b[..n]);
            u64::from_le_bytes(b)
        };
        w(&mut t, 0x14, 3, 1);
        w(&mut t, 0x16, 0, 2);
        w(&mut t, 0x20, 0x1000, 8);
        w(&mut t, 0x28, 0x2000, 8);
        w(&mut t, 0x30, 0x3000, 8);
        w(&mut t, 0x1c, 1, 2);
        w(&mut t, 0x14, 7, 1);
        assert_eq!(*act.lock().unwrap(), None, "not activated as legacy");
        assert_ne!(r(&mut t, 0x14, 1) as u8 & status::DEVICE_NEEDS_RESET, 0);
        // After a reset, the legacy interface still activates on DRIVER_OK.
        t.region_write(LEGACY_BAR, legacy::STATUS, &[0]);
        t.region_write(LEGACY_BAR, legacy::QUEUE_SEL, &0u16.to_le_bytes());
        t.region_write(LEGACY_BAR, legacy::QUEUE_PFN, &5u32.to_le_bytes());
        t.region_write(LEGACY_BAR, legacy::STATUS, &[7]);
        assert_eq!(*act.lock().unwrap(), Some(vec![0]));
    }
}
