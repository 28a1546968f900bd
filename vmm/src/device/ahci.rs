//! `ich9-ahci` (alias `ahci`): the ICH9 AHCI function on a PCI bus, with
//! its six ports as IDE buses for `ide-hd`/`ide-cd` (`bus=ID.N`, one
//! drive each), as QEMU names them. The HBA is `devices::ahci`.

use std::sync::{Arc, Mutex};

use devices::ahci::hba::{Ahci, PORTS};
use devices::bus::lock;
use devices::ide::DriveConfig;

use devices::irq::IrqLine;
use devices::pci::msix::MsiSender;
use devices::pci::PciBus;
use devices::GuestMem;

use super::bus::{pci_boot_path, BusKind, Buses, IdeBus, Placement, Port};
use super::{AttachCtx, Category, Device, DeviceType};

pub static ICH9_AHCI: DeviceType = DeviceType {
    name: "ich9-ahci",
    aliases: &["ahci"],
    category: Category::Storage,
    bus: BusKind::Pci,
    desc: "",
    user_creatable: true,
    props: &[],
    create,
};

/// One AHCI port as an IDE bus with a single unit.
struct AhciPort {
    hba: Arc<Mutex<Ahci>>,
    port: usize,
    /// `/pci@i0cf8/*@SLOT[,FN]` of the HBA, for `bootorder`.
    pci_path: String,
}

impl IdeBus for AhciPort {
    fn attach(&self, _unit: u32, cfg: DriveConfig) -> Result<(), String> {
        let mut dev = devices::ata::AtaDevice::new(cfg, self.drive_index(0), false)?;
        dev.enable_ncq();
        lock(&self.hba).attach(self.port, dev)
    }
    fn boot_path(&self, _unit: u32) -> String {
        format!("{}/drive@{}/disk@0", self.pci_path, self.port)
    }
    fn drive_index(&self, _unit: u32) -> u32 {
        self.port as u32
    }
}

fn create(ctx: &mut AttachCtx, dev: &Device, at: Placement) -> Result<(), String> {
    let Port::Pci(pci) = &at.port else {
        return Err(format!("bus '{}' is not a PCI bus", at.bus));
    };
    let (slot, func) = at.devfn();
    let irq = ctx.intx.line(slot, 1);
    let msi = ctx.msi.clone();
    attach(
        pci,
        ctx.buses,
        ctx.ram,
        (irq, msi),
        (slot, func),
        dev.spec.id.as_deref(),
    )?;
    Ok(())
}

/// Builds an HBA at `devfn` of `pci` and registers its ports as buses:
/// `ID.N`, or without an id the next free `ide.N`, as QEMU names them.
/// Also what `q35` calls for its built-in controller at 00:1f.2.
pub fn attach(
    pci: &PciBus,
    buses: &mut Buses,
    ram: &GuestMem,
    (irq, msi): (Arc<dyn IrqLine>, Arc<dyn MsiSender>),
    devfn: (u8, u8),
    id: Option<&str>,
) -> Result<Arc<Mutex<Ahci>>, String> {
    let hba = Arc::new(Mutex::new(Ahci::new(Arc::new(ram.clone()), irq, msi)));
    pci.add(devfn.0, devfn.1, hba.clone())?;
    let pci_path = pci_boot_path(devfn);
    let mut next_anon = 0;
    for port in 0..PORTS {
        let name = match id {
            Some(id) => format!("{id}.{port}"),
            None => loop {
                let n = format!("ide.{next_anon}");
                next_anon += 1;
                if !buses.exists(&n) {
                    break n;
                }
            },
        };
        buses.register(
            &name,
            BusKind::Ide,
            1,
            Port::Ide(Arc::new(AhciPort {
                hba: hba.clone(),
                port,
                pci_path: pci_path.clone(),
            })),
        );
    }
    Ok(hba)
}
