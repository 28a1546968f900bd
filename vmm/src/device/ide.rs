//! `ide-hd` and `ide-cd`: ATA disks and ATAPI CD/DVD-ROMs on any IDE bus
//! ([`super::bus::IdeBus`]: a PIIX3 channel today), with QEMU's
//! properties. The controller side (ports, DMA, CMOS) is the bus's.

use devices::ata::geometry::{Geometry, Translation};
use devices::ide::{DriveConfig, Media};
use devices::scsi::{CdRom, Transport};

use super::bus::{BusKind, Placement, Port};
use super::props::{self, PropDef, PropType};
use super::{AttachCtx, Category, Device, DeviceType};

const TRANSLATIONS: PropType = PropType::Enum {
    name: "BiosAtaTranslation",
    values: &["auto", "none", "lba", "large", "rechs"],
};

/// Properties of both `ide-hd` and `ide-cd` (QEMU's ide-device and the
/// block properties it carries).
macro_rules! ide_props {
    ($($extra:expr),* $(,)?) => { &[
        PropDef::new("drive", PropType::Str, "Node name or ID of a block device to use as a backend"),
        PropDef::new("unit", PropType::U32, "").default("4294967295"),
        PropDef::new("serial", PropType::Str, ""),
        PropDef::new("model", PropType::Str, ""),
        PropDef::new("wwn", PropType::U64, "").default("0"),
        PropDef::new("ver", PropType::Str, ""),
        PropDef::new("bootindex", PropType::I32, ""),
        PropDef::new("logical_block_size", PropType::Size, "A power of two between 512 B and 2 MiB").default("512"),
        PropDef::new("physical_block_size", PropType::Size, "A power of two between 512 B and 2 MiB").default("512"),
        PropDef::new("min_io_size", PropType::Size, "").default("0").ignored(),
        PropDef::new("opt_io_size", PropType::Size, "").default("0").ignored(),
        PropDef::new("discard_granularity", PropType::Size, "").default("4294967295").ignored(),
        PropDef::new("write-cache", PropType::OnOffAuto, "on/off/auto").default("auto"),
        PropDef::new("share-rw", PropType::Bool, "").default("false").ignored(),
        PropDef::new("account-invalid", PropType::OnOffAuto, "on/off/auto").default("auto").ignored(),
        PropDef::new("account-failed", PropType::OnOffAuto, "on/off/auto").default("auto").ignored(),
        PropDef::new("rerror", props::ON_ERROR, "").default("auto"),
        PropDef::new("werror", props::ON_ERROR, "").default("auto"),
        $($extra),*
    ] };
}

pub static IDE_HD: DeviceType = DeviceType {
    name: "ide-hd",
    aliases: &[],
    category: Category::Storage,
    bus: BusKind::Ide,
    desc: "virtual IDE disk",
    user_creatable: true,
    props: ide_props![
        PropDef::new("cyls", PropType::U32, "").default("0"),
        PropDef::new("heads", PropType::U32, "").default("0"),
        PropDef::new("secs", PropType::U32, "").default("0"),
        PropDef::new("lcyls", PropType::U32, "").default("0"),
        PropDef::new("lheads", PropType::U32, "").default("0"),
        PropDef::new("lsecs", PropType::U32, "").default("0"),
        PropDef::new(
            "bios-chs-trans",
            TRANSLATIONS,
            "Logical CHS translation algorithm, auto/none/lba/large/rechs",
        )
        .default("auto"),
        PropDef::new("rotation_rate", PropType::U16, "")
            .default("0")
            .ignored(),
    ],
    create,
};

pub static IDE_CD: DeviceType = DeviceType {
    name: "ide-cd",
    aliases: &[],
    category: Category::Storage,
    bus: BusKind::Ide,
    desc: "virtual IDE CD-ROM",
    user_creatable: true,
    props: ide_props![],
    create,
};

/// A CHS triple where zero means "not given".
fn chs(dev: &Device, names: [&str; 3]) -> Option<[u32; 3]> {
    let v = names.map(|n| dev.props.uint(n).unwrap_or(0) as u32);
    (v != [0, 0, 0]).then_some(v)
}

fn create(ctx: &mut AttachCtx, dev: &Device, at: Placement) -> Result<(), String> {
    let Port::Ide(bus) = at.port else {
        return Err(format!("bus '{}' is not an IDE bus", at.bus));
    };
    let is_cd = dev.ty.name == "ide-cd";
    let backend = ctx.claim_drive(dev)?;
    // A CD-ROM keeps an empty drive's backend: a medium can go into it.
    let backend = backend.filter(|b| is_cd || b.is_inserted());
    if !is_cd {
        match (&backend, dev.props.str("drive")) {
            (_, None) => return Err("drive property not set".into()),
            (None, Some(_)) => return Err("Device needs media, but drive is empty".into()),
            (Some(b), _) if b.len() < 512 => {
                return Err(format!(
                    "drive '{}' is smaller than one 512-byte sector",
                    b.id()
                ))
            }
            // As QEMU: an ATA disk has no write-protect signal a guest
            // would honour, so a read-only drive is refused, not emulated.
            (Some(b), _) if b.is_read_only() => return Err("Block node is read-only".into()),
            _ => {}
        }
    }
    let lbs = dev.props.uint("logical_block_size").unwrap_or(512);
    if lbs != 512 {
        return Err(format!(
            "logical_block_size={lbs}: IDE drives have 512-byte logical blocks"
        ));
    }
    let pbs = dev.props.uint("physical_block_size").unwrap_or(512);
    let geometry = match chs(dev, ["cyls", "heads", "secs"]) {
        None => None,
        Some([c, h, s]) if c != 0 && h != 0 && s != 0 => Some(Geometry::checked(c, h, s)?),
        Some(_) => return Err("cyls, heads and secs must be given together".into()),
    };
    let translation = dev
        .props
        .str("bios-chs-trans")
        .and_then(Translation::parse)
        .flatten();
    let serial = dev.props.str("serial").map(String::from);
    if serial.as_ref().is_some_and(|s| s.len() > 20) {
        return Err("serial is longer than 20 characters".into());
    }
    let model = dev.props.str("model").map(String::from);
    if model.as_ref().is_some_and(|s| s.len() > 40) {
        return Err("model is longer than 40 characters".into());
    }
    if let (Some(b), Some(wce)) = (&backend, dev.props.on_off_auto("write-cache")) {
        b.set_write_cache(wce);
    }
    let media = match backend {
        _ if is_cd => {
            let cd = std::sync::Arc::new(CdRom::new(Transport::Atapi, backend));
            ctx.removable = Some(cd.clone());
            Media::Cd(cd)
        }
        Some(b) => Media::Disk(b),
        None => return Err("drive property not set".into()),
    };
    let cfg = DriveConfig {
        media,
        model,
        serial,
        wwn: dev.props.uint("wwn").filter(|&w| w != 0),
        version: dev.props.str("ver").map(String::from),
        physical_block_size: pbs.min(u32::MAX as u64) as u32,
        geometry,
        translation,
    };
    bus.attach(at.unit, cfg)?;
    let path = bus.boot_path(at.unit);
    match chs(dev, ["lcyls", "lheads", "lsecs"]) {
        None => {}
        // The BIOS's INT 13h geometry: at most 1024 cylinders, 255 heads
        // and 63 sectors (QEMU's limits for lchs).
        Some([c @ 1..=1024, h @ 1..=255, s @ 1..=63]) if !is_cd => {
            ctx.boot_order.register_geometry(path.clone(), c, h, s)
        }
        Some(_) => {
            return Err(
                "lcyls (1-1024), lheads (1-255) and lsecs (1-63) must be given together, on a disk"
                    .into(),
            )
        }
    }
    ctx.boot_index(dev, path)
}
