//! The `q35` machine: Q35 MCH + ICH9, as QEMU's `q35` lays it out.
//!
//! | where | what |
//! |---|---|
//! | 00:00.0 | MCH host bridge (8086:29c0), PCIEXBAR (ECAM) set by firmware, at 0xb0000000 |
//! | 00:1f.0 | ICH9 LPC bridge (8086:2918): PMBASE (ACPI PM1, GPE0 at +0x20, SMI_EN at +0x30), PIRQA-H routes |
//! | 00:1f.2 | ICH9 AHCI (8086:2922), six ports as buses `ide.0`-`ide.5` |
//! | GSI 16-23 | PIRQA-H: slot 25-31 INTA-D on PIRQA-D, other slots rotate over PIRQE-H |
//!
//! The ISA devices are the `pc`'s (RTC, i8042, port 92, UARTs,
//! debugcon, fw_cfg, ELCR) and so is the memory map, except that RAM below
//! 4 GiB stops at the ECAM window ([`Layout::q35`]). The root bus is
//! `pcie.0`; it has no hotplug (QEMU's q35 hot-plugs into root ports, which
//! Strata does not have yet), so `device_add` fails on it as on QEMU.
//! The ICH9 SMBus function (00:1f.3) is not built: nothing Strata runs
//! uses it. The floppy controller exists only when floppy drives are
//! given, as on QEMU's q35.
//!
//! `-drive if=ide,index=N` becomes `ide-hd`/`ide-cd` on AHCI port `N`
//! (one unit per bus), `-hda`/`-cdrom` included, as on QEMU's q35.

use std::sync::{Arc, Mutex};

use block::drive::{DriveSpec, Interface};
use devices::bus::Bus;
use devices::chipset::{
    acpi_pm::{Apm, PmRegs},
    ich9_lpc::Ich9Lpc,
    mch::Mch,
    pirq::{self, PirqRouter},
};
use devices::pci::{Ecam, PciBus};

use super::pc::{self, add_io, shared, Chipset};
use super::{Board, ChipsetKind, Host, Machine, MachineError, Memory};
use crate::boot;
use crate::config::MachineConfig;
use crate::device::{ahci, BusKind, Buses, DeviceSpec, PciIntx, Port};
use crate::memory::Layout;
use crate::storage::Storage;

pub const LPC_SLOT: u8 = 0x1f;
pub const LPC_FUNCTION: u8 = 0;
pub const AHCI_FUNCTION: u8 = 2;
/// The ICH9 AHCI's ports, each an `ide.N` bus.
pub const IDE_BUSES: u32 = 6;

/// QEMU's `q35` (`pc-q35-*`).
pub struct Q35Board;
pub static Q35: Q35Board = Q35Board;

/// QEMU's newest `pc-q35-*` version, which `q35` stands for.
const VERSION: &str = "7.2";

impl Board for Q35Board {
    fn name(&self) -> &'static str {
        "q35"
    }
    fn desc(&self) -> &'static str {
        "Standard PC (Q35 + ICH9, 2009)"
    }
    fn matches(&self, name: &str) -> bool {
        name == "q35" || name.strip_prefix("pc-q35-").is_some_and(pc::is_version)
    }
    fn help_aliases(&self) -> Vec<String> {
        vec![format!("pc-q35-{VERSION}")]
    }
    fn units_per_bus(&self, iface: Interface) -> u32 {
        match iface {
            // Each IDE bus is one AHCI port.
            Interface::Ide => 1,
            Interface::Scsi => 7,
            _ => 0,
        }
    }
    fn layout(&self, mem_size: u64) -> Layout {
        Layout::q35(mem_size)
    }
    fn drive_device(&self, drive: &DriveSpec) -> Result<Option<DeviceSpec>, String> {
        pc::drive_device(drive, IDE_BUSES)
    }
    fn build_with(
        &self,
        cfg: &MachineConfig,
        host: Host,
        storage: &Storage,
        mem: Memory,
    ) -> Result<Machine, MachineError> {
        build(cfg, host, storage, mem)
    }
}

fn build(
    cfg: &MachineConfig,
    host: Host,
    storage: &Storage,
    mem: Memory,
) -> Result<Machine, MachineError> {
    let direct = boot::is_direct(cfg);
    let mut io = Bus::new();
    let mut buses = Buses::new();
    let err = MachineError::Config;

    let pci = PciBus::new();
    buses.register("pcie.0", BusKind::Pci, 0, Port::Pci(pci.clone()));
    let ecam = Ecam::new();
    let mut mch = Mch::new(ecam.clone());
    let pirq = PirqRouter::new(host.irq.clone(), 8, pirq::ich9_swizzle, Some(16));
    let pm = PmRegs::new(
        host.clock.clone(),
        host.irq.line(pc::SCI_IRQ),
        host.system.clone(),
    );
    let mut lpc = Ich9Lpc::new(pm.clone(), pirq.clone());
    if direct {
        // No firmware will program the chipset: do what SeaBIOS does.
        boot::init_q35(&mut mch, &mut lpc);
    }
    // Migration sections; the PIRQ routes follow from the LPC's config
    // (its post-load re-routes), the APM port forwards to the PM block.
    let mut vmstate = crate::migration::VmState::default();
    let mch = Arc::new(Mutex::new(mch));
    vmstate.register("0000:00:00.0/mch", mch.clone());
    pci.add(0, 0, mch).map_err(err)?;
    buses.occupy("pcie.0", 0, "mch");
    let lpc = Arc::new(Mutex::new(lpc));
    vmstate.register("0000:00:1f.0/ich9-lpc", lpc.clone());
    pci.add(LPC_SLOT, LPC_FUNCTION, lpc).map_err(err)?;
    buses.occupy("pcie.0", (LPC_SLOT as u32) << 3, "ICH9-LPC");
    vmstate.register("acpi-pm", pm.clone());
    add_io(&mut io, 0xb2, 2, shared(Apm::new(pm.clone())), "APM")?;
    let ahci_devfn = (LPC_SLOT, AHCI_FUNCTION);
    let hba = ahci::attach(
        &pci,
        &mut buses,
        &mem.ram,
        (pirq.line(LPC_SLOT, 1), pc::msi_sender(&host, &mem.ram)),
        ahci_devfn,
        None,
    )
    .map_err(err)?;
    // Its ports carry their ATA disks' state.
    vmstate.register("0000:00:1f.2/ich9-ahci", hba);
    buses.occupy(
        "pcie.0",
        (LPC_SLOT as u32) << 3 | AHCI_FUNCTION as u32,
        "ich9-ahci",
    );
    let intx: Arc<dyn PciIntx + Send + Sync> = Arc::new(pirq);
    let chipset = Chipset {
        kind: ChipsetKind::Q35,
        pci,
        intx,
        power_button: pm,
        pcihp: None,
        ecam: Some(ecam),
        // As QEMU's q35: a floppy controller only for floppy drives.
        fdc: storage.drives().iter().any(|d| {
            d.device
                .as_ref()
                .is_some_and(|p| p.interface == Interface::Floppy)
        }) || cfg.devices.iter().any(|d| d.ty.name == "floppy"),
        vmstate,
    };
    pc::assemble(&Q35, cfg, host, storage, mem, io, buses, chipset, |_| {})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::PropValue;
    use block::drive::DriveTable;

    /// What `-drive`s become on `q35`: one drive per AHCI port.
    #[test]
    fn drives_become_q35_devices() {
        let mut t = DriveTable::with_max_devs(|i| Q35.units_per_bus(i));
        let mut dev = |text: &str| -> Result<Option<(String, Option<String>)>, String> {
            let d = t.parse_drive(text).map_err(|e| e.to_string())?;
            Ok(Q35.drive_device(&d)?.map(|s| {
                if s.ty.name.starts_with("ide") {
                    assert_eq!(s.props.get("unit"), Some(&PropValue::Uint(0)));
                }
                (s.ty.name.to_string(), s.bus.clone())
            }))
        };
        let ide = |ty: &str, bus: u32| Some((ty.to_string(), Some(format!("ide.{bus}"))));
        assert_eq!(dev("file=a,index=0,media=disk"), Ok(ide("ide-hd", 0)));
        assert_eq!(dev("file=a,index=2,media=cdrom"), Ok(ide("ide-cd", 2)));
        assert_eq!(dev("file=a,if=ide"), Ok(ide("ide-hd", 1)));
        assert_eq!(dev("file=a,index=5"), Ok(ide("ide-hd", 5)));
        assert_eq!(
            dev("file=a,if=ide,index=6"),
            Err("machine type does not support if=ide,bus=6,unit=0".into())
        );
        assert_eq!(
            dev("file=a,if=virtio"),
            Ok(Some(("virtio-blk-pci".to_string(), None)))
        );
    }

    #[test]
    fn names() {
        assert_eq!(super::super::find("q35").unwrap().name(), "q35");
        assert_eq!(super::super::find("pc-q35-7.2").unwrap().name(), "q35");
        assert!(super::super::find("pc-q35-").is_none());
        assert_eq!(Q35.layout(3 << 30).below_4g, 0x8000_0000);
        assert_eq!(Q35.layout(2 << 30).below_4g, 2 << 30);
    }
}
