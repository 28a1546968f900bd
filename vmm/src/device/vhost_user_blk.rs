//! `vhost-user-blk-pci`: a virtio-blk PCI function whose queues a
//! vhost-user back end runs (`devices::virtio::vhost_user_blk`), on a
//! `-chardev socket` that names the back end's socket. QEMU's properties
//! and defaults; the disk's size and limits are the back end's. SeaBIOS
//! boots from it as from any virtio-blk (`bootindex`, `/pci@i0cf8/*@SLOT`).

use devices::virtio::vhost_user_blk::VhostUserBlk;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::bus::{BusKind, Placement, Port};
use super::props::{PropDef, PropType};
use super::virtio_blk::transport_options;
use super::{AttachCtx, Category, Device, DeviceType};
use crate::config::CharDev;

const PROPS: &[PropDef] = &[
    PropDef::new(
        "chardev",
        PropType::Str,
        "ID of a chardev to use as a backend",
    ),
    PropDef::new("num-queues", PropType::U16, "").default("1"),
    PropDef::new("queue-size", PropType::U16, "").default("128"),
    PropDef::new("bootindex", PropType::I32, ""),
    PropDef::new("disable-legacy", PropType::OnOffAuto, "on/off/auto").default("auto"),
    PropDef::new("disable-modern", PropType::Bool, "on/off").default("false"),
    PropDef::new("vectors", PropType::U32, "").default("4294967295"),
    PropDef::new("config-wce", PropType::Bool, "on/off")
        .default("true")
        .ignored(),
    PropDef::new("event_idx", PropType::Bool, "on/off")
        .default("true")
        .ignored(),
    PropDef::new("indirect_desc", PropType::Bool, "on/off")
        .default("true")
        .ignored(),
    PropDef::new("seg-max-adjust", PropType::Bool, "on/off")
        .default("true")
        .ignored(),
];

pub static VHOST_USER_BLK_PCI: DeviceType = DeviceType {
    name: "vhost-user-blk-pci",
    aliases: &[],
    category: Category::Storage,
    bus: BusKind::Pci,
    desc: "",
    user_creatable: true,
    props: PROPS,
    create,
};

fn create(ctx: &mut AttachCtx, dev: &Device, at: Placement) -> Result<(), String> {
    let Port::Pci(pci) = &at.port else {
        return Err(format!("bus '{}' is not a PCI bus", at.bus));
    };
    // The back end maps guest RAM itself: it must be a shared file
    // mapping, which only a memory backend object gives.
    if ctx.ram.iter().any(|r| r.file_offset().is_none()) {
        return Err(
            "guest memory is not shared with the vhost-user back end: add -object \
             memory-backend-memfd,id=mem,size=SIZE,share=on -machine memory-backend=mem"
                .into(),
        );
    }
    let p = &dev.props;
    let id = p.str("chardev").ok_or("chardev property not set")?;
    let path = match ctx.chardevs.iter().find(|(i, _)| i == id) {
        Some((
            _,
            CharDev::Unix {
                path,
                server: false,
                ..
            },
        )) => path.clone(),
        Some(_) => {
            return Err(format!(
                "chardev '{id}': a vhost-user device needs a unix socket client \
                 (-chardev socket,id={id},path=...)"
            ))
        }
        None => return Err(format!("Property 'chardev' can't find value '{id}'")),
    };
    let num_queues = p.uint("num-queues").unwrap_or(1);
    let queue_size = p.uint("queue-size").unwrap_or(128);
    if !(1..=1024).contains(&num_queues) {
        return Err(format!("num-queues={num_queues}: must be 1..1024"));
    }
    if !queue_size.is_power_of_two() || !(4..=1024).contains(&queue_size) {
        return Err(format!(
            "queue-size={queue_size}: must be a power of two, 4..1024"
        ));
    }
    let name = dev
        .spec
        .id
        .clone()
        .unwrap_or_else(|| "vhost-user-blk".into());
    let blk = VhostUserBlk::connect(&path, &name, num_queues as u16, queue_size as u16)?;
    let topts = transport_options(dev, num_queues as u16 + 1)?;
    let (slot, func) = at.devfn();
    super::virtio_blk::add_function(ctx, pci, (slot, func), Box::new(blk), topts)?;
    let path = at.pci_boot_path();
    ctx.boot_index(dev, path)
}
