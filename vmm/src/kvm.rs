//! The KVM boundary: opening /dev/kvm, creating the VM with the in-kernel
//! irqchip and PIT, the GSI routing, memory slots, and interrupt lines.

use std::sync::Arc;

use devices::irq::{IrqChip, IrqLine};
use devices::pci::msix::MsiSender;
use devices::virtio::{IoEventRegistrar, NotifyAddr};
use devices::GuestMem;
use kvm_bindings::kvm_msi;
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_pit_config, kvm_userspace_memory_region, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI, KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::VmmError;

/// Where QEMU puts the identity-map page and TSS that VMX needs for real
/// mode; just below the BIOS, out of RAM.
const IDENTITY_MAP_ADDR: u64 = 0xfeff_c000;
const TSS_ADDR: usize = 0xfeff_d000;
pub const IOAPIC_PINS: u32 = 24;

/// The KVM device. `STRATA_KVM_DEVICE` overrides it, so that tests can
/// exercise the error path on machines that do have /dev/kvm.
pub fn device_path() -> String {
    std::env::var("STRATA_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".into())
}

pub fn open() -> Result<Kvm, VmmError> {
    let path = device_path();
    let cpath = std::ffi::CString::new(path.clone())
        .map_err(|_| VmmError::Kvm(format!("{path}: invalid path")))?;
    Kvm::new_with_path(&cpath).map_err(|e| {
        let hint = match e.errno() {
            libc::ENOENT => " (is the kvm module loaded?)",
            libc::EACCES | libc::EPERM => " (is your user in the kvm group?)",
            _ => "",
        };
        VmmError::Kvm(format!(
            "cannot open {path}: {}{hint}",
            std::io::Error::from_raw_os_error(e.errno())
        ))
    })
}

pub fn create_vm(kvm: &Kvm, pit_reinject: bool) -> Result<Arc<VmFd>, VmmError> {
    let ctx = |what: &str| {
        let what = what.to_string();
        move |e: kvm_ioctls::Error| VmmError::Kvm(format!("{what}: {e}"))
    };
    let vm = kvm.create_vm().map_err(ctx("cannot create a KVM VM"))?;
    if let Err(e) = vm.set_identity_map_address(IDENTITY_MAP_ADDR) {
        log::warn!("KVM_SET_IDENTITY_MAP_ADDR failed: {e}");
    }
    if let Err(e) = vm.set_tss_address(TSS_ADDR) {
        log::warn!("KVM_SET_TSS_ADDR failed: {e}");
    }
    vm.create_irq_chip()
        .map_err(ctx("cannot create the in-kernel irqchip"))?;
    // With SPEAKER_DUMMY the kernel also answers port 0x61, whose PIT
    // channel 2 output bit SeaBIOS polls to calibrate the TSC.
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(ctx("cannot create the in-kernel PIT"))?;
    if !pit_reinject {
        set_pit_reinject(&vm, false).map_err(ctx("cannot set kvm-pit.lost_tick_policy"))?;
    }
    set_routing(&vm).map_err(ctx("cannot set GSI routing"))?;
    Ok(Arc::new(vm))
}

vmm_sys_util::ioctl_io_nr!(KVM_REINJECT_CONTROL, kvm_bindings::KVMIO, 0x71);

/// KVM_REINJECT_CONTROL: whether the in-kernel PIT injects the ticks a
/// guest missed (see `device::kvm_pit`).
fn set_pit_reinject(vm: &VmFd, on: bool) -> Result<(), kvm_ioctls::Error> {
    let ctl = kvm_bindings::kvm_reinject_control {
        pit_reinject: on as u8,
        reserved: [0; 31],
    };
    // SAFETY: KVM_REINJECT_CONTROL reads one kvm_reinject_control from the
    // pointer, which refers to `ctl`, alive and of that type for the call;
    // the VM fd is open (we hold it).
    let r = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_REINJECT_CONTROL(), &ctl) };
    if r < 0 {
        return Err(kvm_ioctls::Error::last());
    }
    Ok(())
}

/// GSI routing as on QEMU's `pc`: GSIs 0-15 reach both PICs and the IOAPIC,
/// except that GSI 0 (the PIT) goes to IOAPIC pin 2, matching the interrupt
/// source override in the firmware's MADT, and GSI 2 (the cascade) goes
/// nowhere. GSIs 16-23 reach IOAPIC pins 16-23 only.
fn set_routing(vm: &VmFd) -> Result<(), kvm_ioctls::Error> {
    set_routing_with(vm, &[])
}

/// The irqchip routes of [`set_routing`] plus `extra` (MSI routes):
/// KVM_SET_GSI_ROUTING replaces the whole table.
fn set_routing_with(vm: &VmFd, extra: &[kvm_irq_routing_entry]) -> Result<(), kvm_ioctls::Error> {
    let mut entries = Vec::new();
    let route = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    for gsi in 0..16u32 {
        if gsi == 2 {
            continue;
        }
        let (chip, pin) = if gsi < 8 {
            (KVM_IRQCHIP_PIC_MASTER, gsi)
        } else {
            (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
        };
        entries.push(route(gsi, chip, pin));
    }
    for gsi in 0..IOAPIC_PINS {
        match gsi {
            0 => entries.push(route(0, KVM_IRQCHIP_IOAPIC, 2)),
            2 => {}
            _ => entries.push(route(gsi, KVM_IRQCHIP_IOAPIC, gsi)),
        }
    }
    entries.extend_from_slice(extra);
    let mut routing = KvmIrqRouting::new(0).expect("empty routing table");
    for e in entries {
        routing.push(e).expect("routing table fits");
    }
    vm.set_gsi_routing(&routing)
}

/// Registers every region of `mem` as a KVM memory slot, from `first_slot`.
pub fn map_memory(
    vm: &VmFd,
    mem: &GuestMem,
    first_slot: u32,
    read_only: bool,
) -> Result<u32, VmmError> {
    let mut slot = first_slot;
    for region in mem.iter() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| VmmError::Kvm(format!("guest memory: {e}")))?;
        let r = kvm_userspace_memory_region {
            slot,
            flags: if read_only { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is an mmap owned by `mem`, which the caller
        // keeps alive for as long as the VM exists (the machine holds both),
        // and slots never overlap because the layout's ranges do not.
        unsafe { vm.set_user_memory_region(r) }.map_err(|e| {
            VmmError::Kvm(format!(
                "cannot map guest memory at {:#x}: {e}",
                r.guest_phys_addr
            ))
        })?;
        slot += 1;
    }
    Ok(slot)
}

pub fn supports_readonly_mem(vm: &VmFd) -> bool {
    vm.check_extension(Cap::ReadonlyMem)
}

pub struct KvmIrqChip(pub Arc<VmFd>);

struct KvmIrq {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl IrqLine for KvmIrq {
    fn set_level(&self, level: bool) {
        if let Err(e) = self.vm.set_irq_line(self.gsi, level) {
            log::warn!("KVM_IRQ_LINE {} failed: {e}", self.gsi);
        }
    }
}

impl IrqChip for KvmIrqChip {
    fn line(&self, gsi: u32) -> Arc<dyn IrqLine> {
        Arc::new(KvmIrq {
            vm: self.0.clone(),
            gsi,
        })
    }
}

/// MSI delivery through KVM irqfds: each message a device sends gets a
/// GSI with an MSI route (KVM_SET_GSI_ROUTING) and an eventfd bound to it
/// (KVM_IRQFD), so sending it again is one eventfd write from the
/// iothread, which KVM turns into the interrupt without an ioctl, and
/// which coalesces with writes not yet delivered. Routes are made on the
/// first send of a message, so a vector the guest reprograms (new
/// address or data) simply gets a new route. Past [`MAX_MSI_ROUTES`]
/// messages (a guest reprogramming vectors without end) the rest go
/// through KVM_SIGNAL_MSI.
pub struct KvmMsi {
    vm: Arc<VmFd>,
    routes: std::sync::Mutex<MsiRoutes>,
}

/// Most MSI routes one VM gets; KVM allows thousands of GSIs, a PC's
/// devices use a few dozen vectors.
pub const MAX_MSI_ROUTES: usize = 256;

#[derive(Default)]
struct MsiRoutes {
    /// (address, data) of each routed message, with its eventfd; the
    /// GSI is `IOAPIC_PINS` + the position.
    msgs: Vec<((u64, u32), EventFd)>,
    entries: Vec<kvm_irq_routing_entry>,
    /// Routing failed once: KVM_SIGNAL_MSI from then on.
    broken: bool,
}

impl KvmMsi {
    pub fn new(vm: Arc<VmFd>) -> Self {
        KvmMsi {
            vm,
            routes: std::sync::Mutex::new(MsiRoutes::default()),
        }
    }

    fn signal(&self, addr: u64, data: u32) {
        let msi = kvm_msi {
            address_lo: addr as u32,
            address_hi: (addr >> 32) as u32,
            data,
            ..Default::default()
        };
        if let Err(e) = self.vm.signal_msi(msi) {
            log::warn!("KVM_SIGNAL_MSI {addr:#x}/{data:#x} failed: {e}");
        }
    }

    /// Routes message (addr, data) to a new GSI with an irqfd; its eventfd.
    fn route(&self, r: &mut MsiRoutes, addr: u64, data: u32) -> Result<usize, String> {
        let gsi = IOAPIC_PINS + r.msgs.len() as u32;
        let efd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = addr as u32;
        e.u.msi.address_hi = (addr >> 32) as u32;
        e.u.msi.data = data;
        r.entries.push(e);
        if let Err(err) = set_routing_with(&self.vm, &r.entries) {
            r.entries.pop();
            return Err(format!("KVM_SET_GSI_ROUTING: {err}"));
        }
        self.vm
            .register_irqfd(&efd, gsi)
            .map_err(|err| format!("KVM_IRQFD: {err}"))?;
        log::debug!("MSI {addr:#x}/{data:#x}: GSI {gsi}, irqfd");
        r.msgs.push(((addr, data), efd));
        Ok(r.msgs.len() - 1)
    }
}

impl MsiSender for KvmMsi {
    fn send(&self, addr: u64, data: u32) {
        let mut r = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let i = match r.msgs.iter().position(|(m, _)| *m == (addr, data)) {
            Some(i) => i,
            None if r.broken || r.msgs.len() >= MAX_MSI_ROUTES => {
                drop(r);
                return self.signal(addr, data);
            }
            None => match self.route(&mut r, addr, data) {
                Ok(i) => i,
                Err(e) => {
                    log::warn!(
                        "MSI {addr:#x}/{data:#x}: no irqfd route ({e}); using KVM_SIGNAL_MSI"
                    );
                    r.broken = true;
                    drop(r);
                    return self.signal(addr, data);
                }
            },
        };
        if let Err(e) = r.msgs[i].1.write(1) {
            log::warn!("MSI {addr:#x}/{data:#x}: irqfd write failed: {e}");
        }
    }
}

impl Drop for KvmMsi {
    fn drop(&mut self) {
        let r = self.routes.get_mut().unwrap_or_else(|e| e.into_inner());
        for (i, (_, efd)) in r.msgs.iter().enumerate() {
            let _ = self.vm.unregister_irqfd(efd, IOAPIC_PINS + i as u32);
        }
    }
}

/// Queue notifications through KVM_IOEVENTFD: the guest's notify write
/// signals the eventfd inside KVM, without an exit to the vCPU thread.
pub struct KvmIoEvents(pub Arc<VmFd>);

impl IoEventRegistrar for KvmIoEvents {
    fn register(&self, addr: NotifyAddr, fd: &EventFd) -> Result<(), String> {
        match addr {
            NotifyAddr::Mmio(a) => {
                self.0
                    .register_ioevent(fd, &IoEventAddress::Mmio(a), NoDatamatch)
            }
            NotifyAddr::Pio { port, value } => {
                self.0
                    .register_ioevent(fd, &IoEventAddress::Pio(port), value)
            }
        }
        .map_err(|e| e.to_string())
    }
    fn unregister(&self, addr: NotifyAddr, fd: &EventFd) {
        let r = match addr {
            NotifyAddr::Mmio(a) => {
                self.0
                    .unregister_ioevent(fd, &IoEventAddress::Mmio(a), NoDatamatch)
            }
            NotifyAddr::Pio { port, value } => {
                self.0
                    .unregister_ioevent(fd, &IoEventAddress::Pio(port), value)
            }
        };
        if let Err(e) = r {
            log::warn!("KVM_IOEVENTFD deassign {addr:?}: {e}");
        }
    }
}
