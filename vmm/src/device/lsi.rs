//! `lsi53c895a` (alias `lsi`) and `lsi53c810`: the LSI 53C895A PCI SCSI HBA, QEMU's
//! default `if=scsi` controller on `pc`. Its SCSI bus is `ID.0`, or the
//! next free `scsi.N` without an id; `scsi-hd`/`scsi-cd` attach to it
//! with ids 0-6 (7 is the HBA's own) and LUNs 0-7 (what IDENTIFY can
//! address).

use std::sync::{Arc, Mutex};

use devices::lsi::Lsi53c895a;
use devices::scsi::bus::ScsiBus;

use super::bus::{pci_boot_path, BusKind, Placement, Port, ScsiPort};
use super::virtio_scsi::bus_name;
use super::{AttachCtx, Category, Device, DeviceType};

pub static LSI53C895A: DeviceType = DeviceType {
    name: "lsi53c895a",
    aliases: &["lsi"],
    category: Category::Storage,
    bus: BusKind::Pci,
    desc: "",
    user_creatable: true,
    props: &[],
    create,
};

/// QEMU's `lsi53c810`: the same model with the 53C810's device ID.
pub static LSI53C810: DeviceType = DeviceType {
    name: "lsi53c810",
    aliases: &[],
    ..LSI53C895A
};

struct Bus {
    bus: Arc<ScsiBus>,
    pci_path: String,
}

impl ScsiPort for Bus {
    fn bus(&self) -> &Arc<ScsiBus> {
        &self.bus
    }
    fn max_lun(&self) -> u32 {
        7
    }
    fn boot_path(&self, id: u32, lun: u32) -> String {
        // SeaBIOS's lsi-scsi driver matches `*@0/*@ID,LUN` below the
        // function's path, as for virtio-scsi.
        format!("{}/channel@0/disk@{id:x},{lun:x}", self.pci_path)
    }
}

fn create(ctx: &mut AttachCtx, dev: &Device, at: Placement) -> Result<(), String> {
    let Port::Pci(pci) = &at.port else {
        return Err(format!("bus '{}' is not a PCI bus", at.bus));
    };
    let (slot, func) = at.devfn();
    let id = match dev.ty.name {
        "lsi53c810" => 0x0001,
        _ => devices::lsi::DEVICE_ID,
    };
    let lsi = Lsi53c895a::with_device_id(Arc::new(ctx.ram.clone()), ctx.intx.line(slot, 1), id);
    let bus = lsi.bus().clone();
    pci.add(slot, func, Arc::new(Mutex::new(lsi)))?;
    let name = bus_name(ctx, dev.spec.id.as_deref());
    let busnr = ctx.buses.count(BusKind::Scsi);
    ctx.buses.register(
        &name,
        BusKind::Scsi,
        0,
        Port::Scsi(Arc::new(Bus {
            bus,
            pci_path: pci_boot_path((slot, func)),
        })),
    );
    if !ctx.hotplugged {
        super::scsi::legacy_drives(ctx, &name, busnr)?;
    }
    Ok(())
}
