//! `virtio-blk-pci` (and its `-transitional`/`-non-transitional`
//! variants; `-drive if=virtio`): QEMU's properties and defaults, the PCI
//! function, its INTx line through the board's routing, the iothread its
//! queues run on, and the bootindex path SeaBIOS matches
//! (`/pci@i0cf8/*@SLOT`).

use std::sync::{Arc, Mutex};

use devices::virtio::block::{BlockOptions, VirtioBlock};
use devices::virtio::pci::{TransportOptions, VirtioPci};

use super::bus::{BusKind, Placement, Port};
use super::props::{self, PropDef, PropType};
use super::{AttachCtx, Category, Device, DeviceType};

/// `num-queues`' default: as many queues as vCPUs (QEMU's auto value).
const AUTO_QUEUES: u64 = 0xffff;
/// `vectors`' default: one per queue plus the configuration vector.
const AUTO_VECTORS: u64 = u32::MAX as u64;

const PROPS: &[PropDef] = &[
    PropDef::new(
        "drive",
        PropType::Str,
        "Node name or ID of a block device to use as a backend",
    ),
    PropDef::new("iothread", PropType::Str, "link<iothread>"),
    PropDef::new("num-queues", PropType::U16, "").default("65535"),
    PropDef::new("queue-size", PropType::U16, "").default("256"),
    PropDef::new("config-wce", PropType::Bool, "on/off").default("true"),
    PropDef::new("write-cache", PropType::OnOffAuto, "on/off/auto").default("auto"),
    PropDef::new("discard", PropType::Bool, "on/off").default("true"),
    PropDef::new("write-zeroes", PropType::Bool, "on/off").default("true"),
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
    .default("0"),
    PropDef::new("bootindex", PropType::I32, ""),
    PropDef::new("serial", PropType::Str, ""),
    PropDef::new("rerror", props::ON_ERROR, "").default("auto"),
    PropDef::new("werror", props::ON_ERROR, "").default("auto"),
    PropDef::new("disable-legacy", PropType::OnOffAuto, "on/off/auto").default("auto"),
    PropDef::new("disable-modern", PropType::Bool, "on/off").default("false"),
    PropDef::new("vectors", PropType::U32, "").default("4294967295"),
    PropDef::new("event_idx", PropType::Bool, "on/off").default("true"),
    PropDef::new("indirect_desc", PropType::Bool, "on/off").default("true"),
    PropDef::new("request-merging", PropType::Bool, "on/off").default("true"),
    PropDef::new("ioeventfd", PropType::Bool, "on/off")
        .default("true")
        .ignored(),
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
    PropDef::new("seg-max-adjust", PropType::Bool, "on/off")
        .default("true")
        .ignored(),
    PropDef::new("report-discard-granularity", PropType::Bool, "on/off")
        .default("true")
        .ignored(),
    PropDef::new("notify_on_empty", PropType::Bool, "on/off")
        .default("true")
        .ignored(),
    PropDef::new("any_layout", PropType::Bool, "on/off")
        .default("true")
        .ignored(),
    PropDef::new("x-enable-wce-if-config-wce", PropType::Bool, "on/off")
        .default("true")
        .ignored(),
    // libvirt still writes scsi=off; the SCSI passthrough it turned off is
    // gone from QEMU too.
    PropDef::new("scsi", PropType::Bool, "on/off")
        .default("false")
        .warn(
            "the 'scsi' property is ignored: virtio-blk has no SCSI passthrough (use virtio-scsi)",
        ),
];

pub static VIRTIO_BLK_PCI: DeviceType = DeviceType {
    name: "virtio-blk-pci",
    aliases: &["virtio-blk"],
    category: Category::Storage,
    bus: BusKind::Pci,
    desc: "",
    user_creatable: true,
    props: PROPS,
    create,
};

pub static VIRTIO_BLK_PCI_TRANSITIONAL: DeviceType = DeviceType {
    name: "virtio-blk-pci-transitional",
    aliases: &[],
    ..VIRTIO_BLK_PCI
};

pub static VIRTIO_BLK_PCI_NON_TRANSITIONAL: DeviceType = DeviceType {
    name: "virtio-blk-pci-non-transitional",
    aliases: &[],
    ..VIRTIO_BLK_PCI
};

fn small<T: TryFrom<u64>>(dev: &Device, key: &str) -> Result<Option<T>, String> {
    dev.props
        .uint(key)
        .map(|v| T::try_from(v).map_err(|_| format!("{key}={v} is too large")))
        .transpose()
}

fn create(ctx: &mut AttachCtx, dev: &Device, at: Placement) -> Result<(), String> {
    let Port::Pci(pci) = &at.port else {
        return Err(format!("bus '{}' is not a PCI bus", at.bus));
    };
    let backend = ctx.claim_drive(dev)?.ok_or("drive property not set")?;
    if !backend.is_inserted() {
        return Err("Device needs media, but drive is empty".into());
    }
    let p = &dev.props;
    let mut o = BlockOptions {
        num_queues: match p.uint("num-queues") {
            Some(AUTO_QUEUES) | None => ctx.cpus.clamp(1, 1024) as u16,
            Some(n) => n as u16,
        },
        ..Default::default()
    };
    o.queue_size = small(dev, "queue-size")?.unwrap_or(o.queue_size);
    o.logical_block_size = small(dev, "logical_block_size")?.unwrap_or(512);
    o.physical_block_size = match small(dev, "physical_block_size")? {
        Some(0) | None => o.logical_block_size,
        Some(n) => n,
    };
    o.config_wce = p.bool("config-wce");
    o.discard = p.bool("discard");
    o.write_zeroes = p.bool("write-zeroes");
    o.event_idx = p.bool("event_idx");
    o.indirect_desc = p.bool("indirect_desc");
    o.request_merging = p.bool("request-merging");
    o.serial = p.str("serial").map(str::to_string);
    if let Some(wce) = p.on_off_auto("write-cache") {
        backend.set_write_cache(wce);
    }
    o.validate()?;

    // One vector per queue plus the configuration vector.
    let topts = transport_options(dev, o.num_queues + 1)?;

    let (slot, func) = at.devfn();
    let event_loop = ctx.iothreads.get(p.str("iothread"))?;
    let blk = VirtioBlock::new(backend, o, event_loop)?;
    add_function(ctx, pci, (slot, func), Box::new(blk), topts)?;
    let path = at.pci_boot_path();
    ctx.boot_index(dev, path)
}

/// Puts `device` behind the virtio-pci transport at `slot.func` of `pci`,
/// wired to the machine's RAM, INTx routing, MSI and ioeventfds (every
/// `virtio-*-pci` and `vhost-user-*-pci` device).
pub fn add_function(
    ctx: &AttachCtx,
    pci: &devices::pci::PciBus,
    (slot, func): (u8, u8),
    device: Box<dyn devices::virtio::VirtioDevice>,
    topts: TransportOptions,
) -> Result<(), String> {
    let f = VirtioPci::new(
        device,
        topts,
        ctx.ram.clone(),
        ctx.intx.line(slot, 1),
        ctx.msi.clone(),
        ctx.ioevents.clone(),
    )?;
    pci.add(slot, func, Arc::new(Mutex::new(f)))
}

/// The virtio-pci transport of a `virtio-*-pci` device from its
/// `disable-legacy`, `disable-modern` and `vectors` properties, with
/// `auto_vectors` when `vectors` is not given. QEMU's `pc` (conventional
/// PCI) makes virtio-pci devices transitional unless told otherwise; the
/// `-transitional`/`-non-transitional` variants fix the choice.
pub fn transport_options(dev: &Device, auto_vectors: u16) -> Result<TransportOptions, String> {
    let p = &dev.props;
    let (mut legacy, mut modern) = (
        p.on_off_auto("disable-legacy") != Some(true),
        !p.bool("disable-modern"),
    );
    if dev.ty.name.ends_with("-non-transitional") {
        (legacy, modern) = (false, true);
    } else if dev.ty.name.ends_with("-transitional") {
        legacy = true;
    }
    let msix_vectors = match p.uint("vectors") {
        Some(AUTO_VECTORS) | None => Some(auto_vectors),
        Some(v) => u16::try_from(v).ok().filter(|&v| v <= 2048),
    }
    .ok_or("vectors must be 0..2048")?;
    Ok(TransportOptions {
        modern,
        legacy,
        msix_vectors,
    })
}
