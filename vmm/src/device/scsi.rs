//! `scsi-hd` and `scsi-cd`: SCSI disks (SBC) and CD/DVD-ROMs (MMC) on any
//! SCSI bus ([`super::bus::ScsiPort`]: an LSI 53C895A or a virtio-scsi
//! HBA), with QEMU's properties. The units are the shared SCSI target
//! emulation of `devices::scsi`; the HBA only carries their commands.

use std::sync::Arc;

use devices::scsi::{CdRom, Disk, DiskOptions, Transport};

use block::drive::{Interface, Media};

use super::bus::{scsi_unit, BusKind, Placement, Port};
use super::props::{self, PropDef, PropType, PropValue};
use super::{AttachCtx, Category, Device, DeviceSpec, DeviceType};

/// Properties of both units (QEMU's scsi-disk-base and the block
/// properties it carries).
macro_rules! scsi_props {
    ($($extra:expr),* $(,)?) => { &[
        PropDef::new("drive", PropType::Str, "Node name or ID of a block device to use as a backend"),
        PropDef::new("channel", PropType::U32, "").default("0"),
        PropDef::new("scsi-id", PropType::U32, "").default("4294967295"),
        PropDef::new("lun", PropType::U32, "").default("4294967295"),
        PropDef::new("serial", PropType::Str, ""),
        PropDef::new("vendor", PropType::Str, ""),
        PropDef::new("product", PropType::Str, ""),
        PropDef::new("ver", PropType::Str, ""),
        PropDef::new("wwn", PropType::U64, "").default("0"),
        PropDef::new("bootindex", PropType::I32, ""),
        PropDef::new("logical_block_size", PropType::Size, "A power of two between 512 B and 2 MiB").default("512"),
        PropDef::new("physical_block_size", PropType::Size, "A power of two between 512 B and 2 MiB").default("512"),
        PropDef::new("write-cache", PropType::OnOffAuto, "on/off/auto").default("auto"),
        PropDef::new("min_io_size", PropType::Size, "").default("0").ignored(),
        PropDef::new("opt_io_size", PropType::Size, "").default("0").ignored(),
        PropDef::new("discard_granularity", PropType::Size, "").default("4294967295").ignored(),
        PropDef::new("share-rw", PropType::Bool, "").default("false").ignored(),
        PropDef::new("account-invalid", PropType::OnOffAuto, "on/off/auto").default("auto").ignored(),
        PropDef::new("account-failed", PropType::OnOffAuto, "on/off/auto").default("auto").ignored(),
        PropDef::new("rerror", props::ON_ERROR, "").default("auto"),
        PropDef::new("werror", props::ON_ERROR, "").default("auto"),
        PropDef::new("device_id", PropType::Str, "").ignored(),
        PropDef::new("port_wwn", PropType::U64, "").default("0").ignored(),
        PropDef::new("port_index", PropType::U16, "").default("0").ignored(),
        PropDef::new("scsi_version", PropType::I32, "").default("5").ignored(),
        $($extra),*
    ] };
}

pub static SCSI_HD: DeviceType = DeviceType {
    name: "scsi-hd",
    aliases: &[],
    category: Category::Storage,
    bus: BusKind::Scsi,
    desc: "virtual SCSI disk",
    user_creatable: true,
    props: scsi_props![
        PropDef::new("removable", PropType::Bool, "on/off").default("false"),
        PropDef::new("rotation_rate", PropType::U16, "").default("0"),
        PropDef::new("dpofua", PropType::Bool, "on/off")
            .default("false")
            .ignored(),
        PropDef::new("max_unmap_size", PropType::U64, "")
            .default("1073741824")
            .ignored(),
        PropDef::new("max_io_size", PropType::U64, "")
            .default("2147483647")
            .ignored(),
    ],
    create,
};

pub static SCSI_CD: DeviceType = DeviceType {
    name: "scsi-cd",
    aliases: &[],
    category: Category::Storage,
    bus: BusKind::Scsi,
    desc: "virtual SCSI CD-ROM",
    user_creatable: true,
    props: scsi_props![],
    create,
};

/// `s` as INQUIRY's fixed-width field of `max` bytes: longer is refused
/// with the property's name, as QEMU does.
fn field(dev: &Device, key: &str, max: usize) -> Result<Option<String>, String> {
    match dev.props.str(key) {
        Some(v) if v.len() > max => Err(format!("{key} is longer than {max} characters")),
        v => Ok(v.map(str::to_string)),
    }
}

fn create(ctx: &mut AttachCtx, dev: &Device, at: Placement) -> Result<(), String> {
    let Port::Scsi(port) = &at.port else {
        return Err(format!("bus '{}' is not a SCSI bus", at.bus));
    };
    if dev.props.uint("channel").unwrap_or(0) != 0 {
        return Err("bad scsi device channel: only channel 0 exists".into());
    }
    if ctx.hotplugged && !port.can_hotplug() {
        return Err(format!("Bus '{}' does not support hotplugging", at.bus));
    }
    let (id, lun) = scsi_unit(at.unit);
    let unit = build_unit(ctx, dev, dev.ty.name == "scsi-cd")?;
    port.bus().attach(id, lun as u64, unit)?;
    if ctx.hotplugged {
        port.hotplugged(id, lun, true);
    }
    // device_del takes a unit off at once and tells the driver, as QEMU
    // does for SCSI.
    let p = port.clone();
    ctx.detach = Some(Arc::new(move || {
        p.bus().detach(id, lun as u64);
        p.hotplugged(id, lun, false);
    }));
    let path = port.boot_path(id, lun);
    ctx.boot_index(dev, path)
}

/// The SCSI logical unit `dev` describes, on the drive it names: a
/// CD-ROM (`is_cd`; an empty drive is an empty tray) or a disk, with
/// QEMU's scsi-disk properties. Shared by `scsi-hd`/`scsi-cd` and the
/// devices that carry a unit inside (`usb-storage`).
pub fn build_unit(
    ctx: &mut AttachCtx,
    dev: &Device,
    is_cd: bool,
) -> Result<Arc<dyn devices::scsi::Lun>, String> {
    let backend = ctx.claim_drive(dev)?;
    // A CD-ROM keeps an empty drive's backend: a medium can go into it.
    let backend = backend.filter(|b| is_cd || b.is_inserted());
    if let (Some(b), Some(wce)) = (&backend, dev.props.on_off_auto("write-cache")) {
        b.set_write_cache(wce);
    }
    Ok(if is_cd {
        let cd = Arc::new(CdRom::new(Transport::Scsi, backend));
        if let Some(p) = field(dev, "product", 16)? {
            cd.set_product(&p);
        }
        if let Some(v) = field(dev, "ver", 4)? {
            cd.set_revision(&v);
        }
        ctx.removable = Some(cd.clone());
        cd
    } else {
        let backend = match (backend, dev.props.str("drive")) {
            (_, None) => return Err("drive property not set".into()),
            (None, Some(_)) => return Err("Device needs media, but drive is empty".into()),
            (Some(b), _) => b,
        };
        let d = DiskOptions::default();
        let size = |k: &str, default: u32| -> Result<u32, String> {
            let v = dev.props.uint(k).unwrap_or(default as u64);
            u32::try_from(v).map_err(|_| format!("{k}={v} is too large"))
        };
        let logical_block_size = size("logical_block_size", 512)?;
        let opts = DiskOptions {
            serial: field(dev, "serial", 36)?,
            vendor: field(dev, "vendor", 8)?.unwrap_or(d.vendor),
            product: field(dev, "product", 16)?.unwrap_or(d.product),
            version: field(dev, "ver", 4)?.unwrap_or(d.version),
            wwn: dev.props.uint("wwn").filter(|&w| w != 0),
            logical_block_size,
            physical_block_size: size("physical_block_size", 512)?.max(logical_block_size),
            removable: dev.props.bool("removable"),
            rotation_rate: dev.props.uint("rotation_rate").unwrap_or(0) as u16,
            command_queuing: true,
        };
        Arc::new(Disk::new(backend, opts)?)
    })
}

/// QEMU's legacy SCSI command line: an HBA built at start-up whose bus is
/// the `busnr`-th SCSI bus takes the `-drive if=scsi,bus=BUSNR` drives,
/// each as a `scsi-hd` (or `scsi-cd` with `media=cdrom`) at
/// `scsi-id=UNIT` on its bus `bus`.
pub fn legacy_drives(ctx: &mut AttachCtx, bus: &str, busnr: u32) -> Result<(), String> {
    let mut specs = Vec::new();
    for d in ctx.storage.drives() {
        let Some(p) = &d.device else { continue };
        if p.interface != Interface::Scsi || p.bus != busnr {
            continue;
        }
        let ty = if p.media == Media::Cdrom {
            "scsi-cd"
        } else {
            "scsi-hd"
        };
        let mut props = vec![
            ("drive", PropValue::Str(d.id.clone())),
            ("scsi-id", PropValue::Uint(p.unit as u64)),
        ];
        if let Some(s) = &p.serial {
            props.push(("serial", PropValue::Str(s.clone())));
        }
        let origin = format!("-drive {}", d.text);
        specs.push(DeviceSpec::new(ty, Some(bus.to_string()), props, origin)?);
    }
    for spec in specs {
        super::realize(ctx, &spec)?;
    }
    Ok(())
}

/// After every device is built: a `-drive if=scsi` no HBA took is an
/// error, as on QEMU (whose PC boards stopped making an LSI for them).
pub fn check_legacy_drives(
    ctx: &AttachCtx,
    storage: &crate::storage::Storage,
) -> Result<(), String> {
    for d in storage.drives() {
        let Some(p) = &d.device else { continue };
        if p.interface == Interface::Scsi && !ctx.used_drives.contains(&d.id) {
            return Err(format!(
                "-drive {}: machine type does not support if=scsi,bus={},unit={}",
                d.text, p.bus, p.unit
            ));
        }
    }
    Ok(())
}
