//! USB as `-device` sees it: the host controllers that own USB buses
//! (`piix3-usb-uhci`, which `-usb` builds on `pc`; `ich9-usb-ehci1` with
//! its `ich9-usb-uhci1..6` companions, which `-usb` builds on `q35`;
//! `qemu-xhci` and `nec-usb-xhci`) and the devices that plug into their
//! root ports (`usb-storage`, `usb-uas` with its own SCSI bus,
//! `usb-tablet`, `usb-ccid`). A controller registers its bus as `ID.0`
//! (or `usb-bus.N` without an id) with one unit per root connector; a
//! device's `port=N` is unit N-1 ([`super::bus::UsbPort`]), and the
//! controller picks the port kind by the device's speed.

use std::sync::{Arc, Mutex};

use block::drive::Media;
use devices::pci::PciFunction;
use devices::usb::ehci::{CompanionHandle, Ehci};
use devices::usb::storage::{StorageOptions, UsbStorage};
use devices::usb::xhci::{Xhci, XhciOptions};
use devices::usb::{RootPorts, Uhci, UsbDevice};

use super::bus::{child_bus_name, pci_boot_path, BusKind, Placement, Port, UsbPort};
use super::props::{PropDef, PropType};
use super::{AttachCtx, Category, Device, DeviceType};

pub static PIIX3_USB_UHCI: DeviceType = DeviceType {
    name: "piix3-usb-uhci",
    aliases: &[],
    category: Category::Usb,
    bus: BusKind::Pci,
    desc: "",
    user_creatable: true,
    props: &[
        PropDef::new("masterbus", PropType::Str, ""),
        PropDef::new("firstport", PropType::U32, "").default("0"),
        PropDef::new("bandwidth", PropType::U32, "")
            .default("1280")
            .ignored(),
        PropDef::new("maxframes", PropType::U32, "")
            .default("128")
            .ignored(),
    ],
    create: create_uhci,
};

/// QEMU's `ich9-usb-uhci1`..`6`: the ICH9's UHCI functions, alone or as
/// companions of an `ich9-usb-ehci1` (`masterbus=EHCI.0,firstport=N`).
pub static ICH9_USB_UHCI1: DeviceType = DeviceType {
    name: "ich9-usb-uhci1",
    ..PIIX3_USB_UHCI
};
pub static ICH9_USB_UHCI2: DeviceType = DeviceType {
    name: "ich9-usb-uhci2",
    ..PIIX3_USB_UHCI
};
pub static ICH9_USB_UHCI3: DeviceType = DeviceType {
    name: "ich9-usb-uhci3",
    ..PIIX3_USB_UHCI
};
pub static ICH9_USB_UHCI4: DeviceType = DeviceType {
    name: "ich9-usb-uhci4",
    ..PIIX3_USB_UHCI
};
pub static ICH9_USB_UHCI5: DeviceType = DeviceType {
    name: "ich9-usb-uhci5",
    ..PIIX3_USB_UHCI
};
pub static ICH9_USB_UHCI6: DeviceType = DeviceType {
    name: "ich9-usb-uhci6",
    ..PIIX3_USB_UHCI
};

fn create_uhci(ctx: &mut AttachCtx, dev: &Device, at: Placement) -> Result<(), String> {
    let Port::Pci(pci) = &at.port else {
        return Err(format!("bus '{}' is not a PCI bus", at.bus));
    };
    let (slot, func) = at.devfn();
    let mem = Arc::new(ctx.ram.clone());
    let hc = match dev.ty.name.strip_prefix("ich9-usb-uhci") {
        Some(n) => {
            let n: u8 = n
                .parse()
                .map_err(|_| format!("no such device {}", dev.ty.name))?;
            // Pins INTA-INTC in turn, as the ICH9 has them.
            let pin = 1 + (n - 1) % 3;
            Uhci::ich9(n, mem, ctx.intx.line(slot, pin), ctx.timers.clock())?
        }
        // The PIIX3's UHCI interrupts on pin D.
        None => Uhci::new(mem, ctx.intx.line(slot, 4), ctx.timers.clock()),
    };
    let hc = Arc::new(Mutex::new(hc));
    // The frame clock: the controller arms it when the driver starts it,
    // and each expiry runs the frames due and re-arms for the next.
    let timer = ctx
        .timers
        .polling(Arc::downgrade(&hc), |u: &mut Uhci| u.poll());
    devices::bus::lock(&hc).set_frame_timer(Arc::new(move |at| timer.arm_at(at)));
    // A companion has no bus of its own: its devices plug into the
    // EHCI's ports, which hands them over while the companion owns them.
    if let Some(master) = dev.props.str("masterbus") {
        let Some(Port::Usb(ehci)) = ctx.buses.port(master) else {
            return Err(format!("masterbus {master} not found"));
        };
        let first = dev.props.uint("firstport").unwrap_or(0) as usize;
        let companion: CompanionHandle = hc.clone();
        ehci.add_companion(first, companion)?;
        if dev.props.bool("multifunction") {
            devices::bus::lock(&hc).config_mut().set_multifunction();
        }
        pci.add(slot, func, hc)?;
        return Ok(());
    }
    add_controller(ctx, dev, pci, (slot, func), hc, devices::usb::uhci::PORTS)
}

/// A host controller's root connectors as its USB bus: unit N is QEMU's
/// `port=N+1`; the controller picks the port kind (USB 2 or 3, its own or
/// a companion's) by the device.
struct HcPorts<T: RootPorts> {
    hc: Arc<Mutex<T>>,
    /// `bootorder`'s name for the controller.
    path: String,
}

impl<T: RootPorts + 'static> UsbPort for HcPorts<T> {
    fn attach(&self, unit: u32, dev: Box<dyn UsbDevice>) -> Result<(), String> {
        devices::bus::lock(&self.hc).plug(unit as usize, dev)
    }
    fn detach(&self, unit: u32) {
        devices::bus::lock(&self.hc).unplug(unit as usize);
    }
    fn boot_path(&self) -> String {
        self.path.clone()
    }
    fn add_companion(&self, firstport: usize, companion: CompanionHandle) -> Result<(), String> {
        devices::bus::lock(&self.hc).add_companion(firstport, companion)
    }
}

/// Puts host controller `hc` at `slot.func` and registers its USB bus
/// (`ID.0`, or the next free `usb-bus.N`) with `ports` connectors.
fn add_controller<T: RootPorts + PciFunction + 'static>(
    ctx: &mut AttachCtx,
    dev: &Device,
    pci: &devices::pci::PciBus,
    (slot, func): (u8, u8),
    hc: Arc<Mutex<T>>,
    ports: usize,
) -> Result<(), String> {
    if dev.props.bool("multifunction") {
        devices::bus::lock(&hc).config_mut().set_multifunction();
    }
    pci.add(slot, func, hc.clone())?;
    let name = child_bus_name(ctx.buses, dev.spec.id.as_deref(), "usb-bus");
    // SeaBIOS knows a USB controller's function as `usb@SLOT,FN`, not by
    // the `*@` wildcard the other PCI paths use.
    let path = pci_boot_path((slot, func)).replace("/*@", "/usb@");
    ctx.buses.register(
        &name,
        BusKind::Usb,
        ports as u32,
        Port::Usb(Arc::new(HcPorts { hc, path })),
    );
    Ok(())
}

/// QEMU's `ich9-usb-ehci1` (8086:293a): the ICH9's EHCI, six high-speed
/// ports whose slower devices go to its UHCI companions.
pub static ICH9_USB_EHCI1: DeviceType = DeviceType {
    name: "ich9-usb-ehci1",
    aliases: &[],
    category: Category::Usb,
    bus: BusKind::Pci,
    desc: "",
    user_creatable: true,
    props: &[
        PropDef::new("freq", PropType::U32, "")
            .default("800")
            .ignored(),
        PropDef::new("maxframes", PropType::U32, "")
            .default("128")
            .ignored(),
    ],
    create: create_ehci,
};

fn create_ehci(ctx: &mut AttachCtx, dev: &Device, at: Placement) -> Result<(), String> {
    let Port::Pci(pci) = &at.port else {
        return Err(format!("bus '{}' is not a PCI bus", at.bus));
    };
    let (slot, func) = at.devfn();
    // The ICH9's EHCI interrupts on pin D.
    let hc = Ehci::new(
        Arc::new(ctx.ram.clone()),
        ctx.intx.line(slot, 4),
        ctx.timers.clock(),
    );
    let hc = Arc::new(Mutex::new(hc));
    let timer = ctx
        .timers
        .polling(Arc::downgrade(&hc), |e: &mut Ehci| e.poll());
    devices::bus::lock(&hc).set_frame_timer(Arc::new(move |at| timer.arm_at(at)));
    add_controller(
        ctx,
        dev,
        pci,
        (slot, func),
        hc,
        devices::usb::ehci::regs::N_PORTS,
    )
}

/// `qemu-xhci` (1b36:000d) and `nec-usb-xhci` (1033:0194): xHCI with
/// USB 2 and USB 3 root ports, MSI-X (and MSI on the NEC) or INTx.
pub static QEMU_XHCI: DeviceType = DeviceType {
    name: "qemu-xhci",
    aliases: &[],
    category: Category::Usb,
    bus: BusKind::Pci,
    desc: "",
    user_creatable: true,
    props: &[
        PropDef::new("p2", PropType::U32, "").default("4"),
        PropDef::new("p3", PropType::U32, "").default("4"),
        PropDef::new("msi", PropType::OnOffAuto, "on/off/auto").default("auto"),
        PropDef::new("msix", PropType::OnOffAuto, "on/off/auto").default("auto"),
        PropDef::new("intrs", PropType::U32, "").default("16"),
        PropDef::new("slots", PropType::U32, "").default("64"),
        PropDef::new("streams", PropType::Bool, "on/off")
            .default("true")
            .ignored(),
        PropDef::new("superspeed-ports-first", PropType::Bool, "on/off").default("true"),
        PropDef::new("force-pcie-endcap", PropType::Bool, "on/off")
            .default("false")
            .ignored(),
    ],
    create: create_xhci,
};

pub static NEC_USB_XHCI: DeviceType = DeviceType {
    name: "nec-usb-xhci",
    ..QEMU_XHCI
};

/// An xHCI: unit N of its bus (QEMU's `port=N+1`) is the N-th USB 3 and
/// the N-th USB 2 port; the device's speed picks one.
fn create_xhci(ctx: &mut AttachCtx, dev: &Device, at: Placement) -> Result<(), String> {
    let Port::Pci(pci) = &at.port else {
        return Err(format!("bus '{}' is not a PCI bus", at.bus));
    };
    let (slot, func) = at.devfn();
    let mut opts = match dev.ty.name {
        "nec-usb-xhci" => XhciOptions::nec(),
        _ => XhciOptions::qemu(),
    };
    let count = |k: &str, default: usize| dev.props.uint(k).map_or(default, |v| v as usize);
    opts.p2 = count("p2", opts.p2);
    opts.p3 = count("p3", opts.p3);
    opts.intrs = count("intrs", opts.intrs);
    opts.slots = count("slots", opts.slots);
    // `auto` keeps the model's default; `on`/`off` force it.
    if let Some(v) = dev.props.on_off_auto("msi") {
        opts.msi = v;
    }
    if let Some(v) = dev.props.on_off_auto("msix") {
        opts.msix = v;
    }
    opts.ss_first = dev.props.bool("superspeed-ports-first");
    let hc = Xhci::new(
        Arc::new(ctx.ram.clone()),
        ctx.intx.line(slot, 1),
        ctx.msi.clone(),
        ctx.timers.clock(),
        opts,
    )?;
    let hc = Arc::new(Mutex::new(hc));
    // A device that NAKed and now has data wakes the controller from
    // any thread, even from inside the controller's own call into it:
    // the kick only arms a timer for now, whose callback takes the
    // controller's lock and re-runs the woken endpoints.
    let timer = ctx.timers.polling(Arc::downgrade(&hc), |x: &mut Xhci| {
        x.process_wakeups();
        None
    });
    devices::bus::lock(&hc).set_kick(Arc::new(move || timer.arm_in(0)));
    add_controller(ctx, dev, pci, (slot, func), hc, opts.p2.max(opts.p3))
}

/// The USB bus a device was placed on.
fn usb_port(at: &Placement) -> Result<Arc<dyn UsbPort>, String> {
    match &at.port {
        Port::Usb(p) => Ok(p.clone()),
        _ => Err(format!("bus '{}' is not a USB bus", at.bus)),
    }
}

/// Connects `dev` to its place and lets `device_del` take it off at once.
fn plug(
    ctx: &mut AttachCtx,
    port: &Arc<dyn UsbPort>,
    unit: u32,
    dev: Box<dyn UsbDevice>,
) -> Result<(), String> {
    port.attach(unit, dev)?;
    let p = port.clone();
    ctx.detach = Some(Arc::new(move || p.detach(unit)));
    Ok(())
}

pub static USB_STORAGE: DeviceType = DeviceType {
    name: "usb-storage",
    aliases: &[],
    category: Category::Storage,
    bus: BusKind::Usb,
    desc: "",
    user_creatable: true,
    props: &[
        PropDef::new(
            "drive",
            PropType::Str,
            "Node name or ID of a block device to use as a backend",
        ),
        PropDef::new("serial", PropType::Str, ""),
        PropDef::new("removable", PropType::Bool, "on/off").default("false"),
        PropDef::new("bootindex", PropType::I32, ""),
        PropDef::new(
            "logical_block_size",
            PropType::Size,
            "A power of two between 512 B and 2 MiB",
        )
        .default("512"),
        PropDef::new(
            "physical_block_size",
            PropType::Size,
            "A power of two between 512 B and 2 MiB",
        )
        .default("512"),
        PropDef::new("write-cache", PropType::OnOffAuto, "on/off/auto").default("auto"),
        PropDef::new("min_io_size", PropType::Size, "")
            .default("0")
            .ignored(),
        PropDef::new("opt_io_size", PropType::Size, "")
            .default("0")
            .ignored(),
        PropDef::new("discard_granularity", PropType::Size, "")
            .default("4294967295")
            .ignored(),
        PropDef::new("share-rw", PropType::Bool, "")
            .default("false")
            .ignored(),
        PropDef::new("account-invalid", PropType::OnOffAuto, "on/off/auto")
            .default("auto")
            .ignored(),
        PropDef::new("account-failed", PropType::OnOffAuto, "on/off/auto")
            .default("auto")
            .ignored(),
        PropDef::new("commandlog", PropType::Bool, "on/off")
            .default("false")
            .ignored(),
    ],
    create: create_storage,
};

fn create_storage(ctx: &mut AttachCtx, dev: &Device, at: Placement) -> Result<(), String> {
    let port = &usb_port(&at)?;
    if dev.props.str("drive").is_none() {
        return Err("drive property not set".into());
    }
    // QEMU's usb-storage makes a scsi-cd for a CD-ROM drive and a
    // scsi-hd otherwise, as LUN 0 of its own SCSI bus.
    let is_cd = ctx
        .storage
        .drives()
        .iter()
        .any(|d| Some(d.id.as_str()) == dev.props.str("drive") && d.media == Media::Cdrom);
    let unit = super::scsi::build_unit(ctx, dev, is_cd)?;
    let serial = dev.props.str("serial").map(str::to_string);
    let storage = UsbStorage::new(StorageOptions { serial });
    storage.attach(0, unit)?;
    plug(ctx, port, at.unit, Box::new(storage))?;
    // SeaBIOS's usb-msc driver: `storage@PORT/channel@0/disk@0,0` below
    // the controller.
    let path = format!(
        "{}/storage@{}/channel@0/disk@0,0",
        port.boot_path(),
        at.unit + 1
    );
    ctx.boot_index(dev, path)
}

pub static USB_TABLET: DeviceType = DeviceType {
    name: "usb-tablet",
    aliases: &[],
    category: Category::Input,
    bus: BusKind::Usb,
    desc: "",
    user_creatable: true,
    props: &[
        PropDef::new("usb_version", PropType::U32, "").default("2"),
        PropDef::new("serial", PropType::Str, "").ignored(),
        PropDef::new("display", PropType::Str, "").ignored(),
        PropDef::new("head", PropType::U32, "")
            .default("0")
            .ignored(),
    ],
    create: create_tablet,
};

fn create_tablet(ctx: &mut AttachCtx, dev: &Device, at: Placement) -> Result<(), String> {
    let port = &usb_port(&at)?;
    let high_speed = match dev.props.uint("usb_version").unwrap_or(2) {
        1 => false,
        2 => true,
        v => return Err(format!("usb_version {v} not supported (1 or 2)")),
    };
    let tablet = devices::usb::hid::UsbTablet::new(high_speed);
    plug(ctx, port, at.unit, Box::new(tablet))
}

/// QEMU's `usb-uas` (46f4:0003): USB Attached SCSI, an HBA on a USB
/// port with its own SCSI bus (`ID.0`, or the next free `scsi.N`) that
/// `scsi-hd`/`scsi-cd` attach to at `scsi-id=0`, LUNs 0-255.
pub static USB_UAS: DeviceType = DeviceType {
    name: "usb-uas",
    aliases: &[],
    category: Category::Storage,
    bus: BusKind::Usb,
    desc: "",
    user_creatable: true,
    props: &[
        PropDef::new("serial", PropType::Str, ""),
        PropDef::new("log-scsi-req", PropType::Bool, "on/off")
            .default("false")
            .ignored(),
    ],
    create: create_uas,
};

/// A UAS device's SCSI bus.
struct UasBus {
    bus: Arc<devices::scsi::bus::ScsiBus>,
    path: String,
}

impl super::bus::ScsiPort for UasBus {
    fn bus(&self) -> &Arc<devices::scsi::bus::ScsiBus> {
        &self.bus
    }
    fn max_lun(&self) -> u32 {
        devices::usb::uas::MAX_LUN as u32
    }
    fn boot_path(&self, _id: u32, lun: u32) -> String {
        format!("{}/channel@0/disk@0,{lun:x}", self.path)
    }
    /// Units come and go while the guest runs; UAS has no event to say
    /// so (the driver finds them with REPORT LUNS), as on QEMU.
    fn can_hotplug(&self) -> bool {
        true
    }
}

fn create_uas(ctx: &mut AttachCtx, dev: &Device, at: Placement) -> Result<(), String> {
    let port = &usb_port(&at)?;
    let serial = dev.props.str("serial").map(str::to_string);
    let uas = devices::usb::uas::UsbUas::new(devices::usb::uas::UasOptions { serial });
    let bus = uas.bus().clone();
    plug(ctx, port, at.unit, Box::new(uas))?;
    let name = child_bus_name(ctx.buses, dev.spec.id.as_deref(), "scsi");
    let path = format!("{}/storage@{}", port.boot_path(), at.unit + 1);
    // A UAS device has target 0 only.
    ctx.buses.register(
        &name,
        BusKind::Scsi,
        1,
        Port::Scsi(Arc::new(UasBus { bus, path })),
    );
    Ok(())
}

/// QEMU's `usb-ccid` (08e6:4433): a CCID smart-card reader. Strata has
/// no card emulation, so its one slot is always empty; guests enumerate
/// it and are told so.
pub static USB_CCID: DeviceType = DeviceType {
    name: "usb-ccid",
    aliases: &[],
    category: Category::Input,
    bus: BusKind::Usb,
    desc: "CCID Rev 1.1 smartcard reader",
    user_creatable: true,
    props: &[PropDef::new("debug", PropType::U8, "")
        .default("0")
        .ignored()],
    create: create_ccid,
};

fn create_ccid(ctx: &mut AttachCtx, _dev: &Device, at: Placement) -> Result<(), String> {
    let port = &usb_port(&at)?;
    plug(
        ctx,
        port,
        at.unit,
        Box::new(devices::usb::ccid::UsbCcid::new()),
    )
}
