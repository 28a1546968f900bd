//! `virtio-scsi-pci` (and its `-transitional`/`-non-transitional`
//! variants): QEMU's properties and defaults, the PCI function, the
//! iothread its queues run on, and the SCSI bus (`ID.0`, or `scsi.N`
//! without an id) that `scsi-hd`/`scsi-cd` attach to.

use std::sync::Arc;

use devices::scsi::bus::ScsiBus;
use devices::virtio::scsi::{Hotplug, ScsiOptions, VirtioScsi, MAX_LUN, MAX_TARGET};

use super::bus::{pci_boot_path, BusKind, Placement, Port, ScsiPort};
use super::props::{PropDef, PropType};
use super::{AttachCtx, Category, Device, DeviceType};

/// `num_queues`' default: as many request queues as vCPUs.
const AUTO_QUEUES: u64 = u32::MAX as u64;

const PROPS: &[PropDef] = &[
    PropDef::new("iothread", PropType::Str, "link<iothread>"),
    PropDef::new("num_queues", PropType::U32, "").default("4294967295"),
    PropDef::new("virtqueue_size", PropType::U32, "").default("256"),
    PropDef::new("max_sectors", PropType::U32, "").default("65535"),
    PropDef::new("cmd_per_lun", PropType::U32, "").default("128"),
    PropDef::new("hotplug", PropType::Bool, "on/off").default("true"),
    PropDef::new("param_change", PropType::Bool, "on/off").default("true"),
    PropDef::new("disable-legacy", PropType::OnOffAuto, "on/off/auto").default("auto"),
    PropDef::new("disable-modern", PropType::Bool, "on/off").default("false"),
    PropDef::new("vectors", PropType::U32, "").default("4294967295"),
    PropDef::new("seg_max_adjust", PropType::Bool, "on/off")
        .default("true")
        .ignored(),
    PropDef::new("ioeventfd", PropType::Bool, "on/off")
        .default("true")
        .ignored(),
    PropDef::new("event_idx", PropType::Bool, "on/off")
        .default("true")
        .ignored(),
    PropDef::new("indirect_desc", PropType::Bool, "on/off")
        .default("true")
        .ignored(),
    PropDef::new("any_layout", PropType::Bool, "on/off")
        .default("true")
        .ignored(),
];

pub static VIRTIO_SCSI_PCI: DeviceType = DeviceType {
    name: "virtio-scsi-pci",
    aliases: &["virtio-scsi"],
    category: Category::Storage,
    bus: BusKind::Pci,
    desc: "",
    user_creatable: true,
    props: PROPS,
    create,
};

pub static VIRTIO_SCSI_PCI_TRANSITIONAL: DeviceType = DeviceType {
    name: "virtio-scsi-pci-transitional",
    aliases: &[],
    ..VIRTIO_SCSI_PCI
};

pub static VIRTIO_SCSI_PCI_NON_TRANSITIONAL: DeviceType = DeviceType {
    name: "virtio-scsi-pci-non-transitional",
    aliases: &[],
    ..VIRTIO_SCSI_PCI
};

/// The bus of one virtio-scsi function.
struct Bus {
    bus: Arc<ScsiBus>,
    pci_path: String,
    hotplug: Hotplug,
}

impl ScsiPort for Bus {
    fn bus(&self) -> &Arc<ScsiBus> {
        &self.bus
    }
    fn max_lun(&self) -> u32 {
        MAX_LUN
    }
    fn boot_path(&self, id: u32, lun: u32) -> String {
        // SeaBIOS's virtio-scsi driver matches `*@0/*@ID,LUN` below the
        // function's path; QEMU names it channel@0/disk@ID,LUN.
        format!("{}/channel@0/disk@{id:x},{lun:x}", self.pci_path)
    }
    fn can_hotplug(&self) -> bool {
        true
    }
    fn hotplugged(&self, id: u32, lun: u32, plugged: bool) {
        self.hotplug.notify(id, lun, plugged);
    }
}

fn create(ctx: &mut AttachCtx, dev: &Device, at: Placement) -> Result<(), String> {
    let Port::Pci(pci) = &at.port else {
        return Err(format!("bus '{}' is not a PCI bus", at.bus));
    };
    let p = &dev.props;
    let u16_prop = |k: &str, v: u64| u16::try_from(v).map_err(|_| format!("{k}={v} is too large"));
    let num_queues = match p.uint("num_queues") {
        Some(AUTO_QUEUES) | None => ctx.cpus.clamp(1, 1022) as u16,
        Some(n) => u16_prop("num_queues", n)?,
    };
    let opts = ScsiOptions {
        num_queues,
        queue_size: u16_prop("virtqueue_size", p.uint("virtqueue_size").unwrap_or(256))?,
        max_sectors: p.uint("max_sectors").unwrap_or(0xffff) as u32,
        cmd_per_lun: p.uint("cmd_per_lun").unwrap_or(128) as u32,
        hotplug: p.bool("hotplug"),
        param_change: p.bool("param_change"),
    };
    opts.validate()?;
    // Control, event and one vector per request queue, plus configuration.
    let topts = super::virtio_blk::transport_options(dev, opts.num_queues + 3)?;
    let (slot, func) = at.devfn();
    let event_loop = ctx.iothreads.get(p.str("iothread"))?;
    let bus = Arc::new(ScsiBus::new(MAX_TARGET));
    let scsi = VirtioScsi::new(bus.clone(), opts, event_loop)?;
    let hotplug = scsi.hotplug();
    super::virtio_blk::add_function(ctx, pci, (slot, func), Box::new(scsi), topts)?;
    let name = bus_name(ctx, dev.spec.id.as_deref());
    let busnr = ctx.buses.count(BusKind::Scsi);
    ctx.buses.register(
        &name,
        BusKind::Scsi,
        0,
        Port::Scsi(Arc::new(Bus {
            bus,
            pci_path: pci_boot_path((slot, func)),
            hotplug,
        })),
    );
    if !ctx.hotplugged {
        super::scsi::legacy_drives(ctx, &name, busnr)?;
    }
    Ok(())
}

/// An HBA's SCSI bus name: `ID.0`, or the next free `scsi.N`, as QEMU
/// names SCSI buses.
pub fn bus_name(ctx: &AttachCtx, id: Option<&str>) -> String {
    super::bus::child_bus_name(ctx.buses, id, "scsi")
}
