//! Machines (boards): the table `-machine` picks from, the [`Board`] trait
//! each one implements, and what a built machine generation is
//! ([`Machine`]).
//!
//! A board assembles one generation of the machine (chipset, memory map,
//! interrupt routing, firmware tables), registers its buses with the
//! device model ([`crate::device::Buses`]) and decides what a
//! `-drive if=...` becomes on it. `pc.rs` is QEMU's `pc` (i440FX + PIIX3);
//! `none` is QEMU's empty machine (RAM only, no CPU), which libqtest uses.

pub mod pc;
pub mod piix_ide;
pub mod q35;

use std::io::Write;
use std::sync::{Arc, Mutex};

use block::drive::{DriveSpec, Interface};
use devices::clock::Clock;
use devices::irq::IrqChip;
use devices::legacy::serial::Uart;
use devices::pci::msix::MsiSender;
use devices::system::SystemControl;
use devices::virtio::{IoEventRegistrar, NoIoEvents};
use devices::GuestMem;

use crate::boot::{self, EntryState};
use crate::config::MachineConfig;
use crate::device::DeviceSpec;
use crate::memory::{self, Layout};
use crate::storage::Storage;

/// What the machine is connected to outside itself.
pub struct Host {
    pub irq: Arc<dyn IrqChip>,
    pub system: Arc<dyn SystemControl>,
    pub clock: Arc<dyn Clock>,
    /// Device timers on `clock` (`Timers::new(clock)`).
    pub timers: Arc<devices::timer::Timers>,
    /// One output per `-serial`, in COM order.
    pub serial_out: Vec<Box<dyn Write + Send>>,
    pub debugcon_out: Option<Box<dyn Write + Send>>,
    /// Guest wall-clock time at start, Unix seconds.
    pub rtc_start: i64,
    /// MSI delivery; `None` writes each message into guest memory, as a
    /// bus-master write would land without an APIC (qtest).
    pub msi: Option<Arc<dyn MsiSender>>,
    /// Binds virtio notify addresses to eventfds (KVM ioeventfd).
    pub ioevents: Arc<dyn IoEventRegistrar>,
    /// QMP events the machine's devices raise.
    pub events: Arc<crate::monitor::event::Events>,
    /// When set, device event loops get no thread: they are collected
    /// here and the owner polls them (the fuzz harness, for determinism).
    pub manual_loops: Option<devices::virtio::event_loop::ManualLoops>,
    /// Whether vCPUs run guest code (KVM). Without them (qtest, the fuzz
    /// harness) nothing races a device's interrupt, and devices that model
    /// their chip's interrupt latency raise at once.
    pub guest_code: bool,
}

impl Host {
    /// The parts of a host that only KVM provides, as qtest has them.
    pub fn default_msi_io() -> (Option<Arc<dyn MsiSender>>, Arc<dyn IoEventRegistrar>) {
        (None, Arc::new(NoIoEvents))
    }
}

/// Which chipset a PC board has, for what describes it to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChipsetKind {
    /// i440FX + PIIX3/PIIX4 (`pc`).
    I440fx,
    /// Q35 MCH + ICH9 (`q35`).
    Q35,
}

/// One generation of a built machine: what vCPUs, qtest and the main loop
/// dispatch to.
pub struct Machine {
    pub io: devices::bus::Bus,
    pub mmio: devices::bus::Bus,
    pub ram: GuestMem,
    pub rom: GuestMem,
    pub layout: Layout,
    pub uarts: Vec<Arc<Mutex<Uart>>>,
    /// Where vCPU 0 starts on the direct-boot path (`None`: at the reset
    /// vector, in firmware).
    pub boot_entry: Option<EntryState>,
    /// How many vCPUs run it (0 for the empty machine).
    pub cpus: u32,
    /// PCI bus 0, for `query-pci` (`None` on a board without PCI).
    pub pci: Option<Arc<devices::pci::PciBus>>,
    /// The ACPI power button (`system_powerdown`), if the board has one.
    pub power_button: Option<Arc<Mutex<devices::chipset::acpi_pm::PmRegs>>>,
    /// The devices built from `-device` and `-drive`, and added by
    /// `device_add`, in order.
    pub devices: Mutex<Vec<crate::device::Realized>>,
    /// What `device_add` needs, on a board with PCI hotplug.
    pub hotplug: Option<Mutex<Hotplug>>,
    /// Its device timers: run by a thread under KVM, by `clock_step`
    /// under qtest.
    pub timers: Arc<devices::timer::Timers>,
    /// Its migratable parts and what blocks its migration.
    pub vmstate: crate::migration::VmState,
}

/// What it takes to add a device to a running machine (QMP `device_add`)
/// and to remove one: the parts of the board's [`crate::device::AttachCtx`]
/// that outlive its construction.
pub struct Hotplug {
    pub buses: crate::device::Buses,
    pub intx: Arc<dyn crate::device::PciIntx + Send + Sync>,
    pub irq: Arc<dyn IrqChip>,
    pub msi: Arc<dyn MsiSender>,
    pub ioevents: Arc<dyn IoEventRegistrar>,
    pub iothreads: devices::virtio::event_loop::IoThreads,
    pub used_drives: Vec<String>,
    pub events: Arc<crate::monitor::event::Events>,
    pub ram: GuestMem,
    pub cpus: u32,
    pub pci: Arc<devices::pci::PciBus>,
    /// The ACPI hotplug registers the guest's DSDT talks to.
    /// The board's PCI hotplug controller: without one (q35, which has
    /// no PCIe root ports yet) only devices on other buses (SCSI, USB)
    /// come and go.
    pub pcihp: Option<Arc<Mutex<devices::chipset::pcihp::PciHotplug>>>,
    pub timers: Arc<devices::timer::Timers>,
}

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
}

/// A machine type.
pub trait Board: Sync {
    /// The canonical name (`pc`).
    fn name(&self) -> &'static str;
    /// `-machine help`'s description.
    fn desc(&self) -> &'static str;
    /// Whether `name` (a versioned alias, say) selects this board.
    fn matches(&self, name: &str) -> bool {
        name == self.name()
    }
    /// Extra `-machine help` lines: versioned aliases.
    fn help_aliases(&self) -> Vec<String> {
        Vec::new()
    }
    /// Devices of one `if=` interface per bus (QEMU's `if_max_devs`, which
    /// a board may change: q35's IDE buses are AHCI ports of one unit).
    fn units_per_bus(&self, iface: Interface) -> u32 {
        match iface {
            Interface::Ide => 2,
            Interface::Scsi => 7,
            _ => 0,
        }
    }
    /// What the device half of a `-drive if=...` becomes on this board
    /// (`None`: no device, or the board consumes the drive itself).
    fn drive_device(&self, drive: &DriveSpec) -> Result<Option<DeviceSpec>, String>;
    /// Where `mem_size` bytes of RAM go.
    fn layout(&self, mem_size: u64) -> Layout {
        Layout::new(mem_size)
    }
    /// Whether the board runs firmware (`-bios`) at all.
    fn has_firmware(&self) -> bool {
        true
    }
    /// Builds one generation with memory allocated and firmware mapped.
    fn build_with(
        &self,
        cfg: &MachineConfig,
        host: Host,
        storage: &Storage,
        mem: Memory,
    ) -> Result<Machine, MachineError>;
    /// Allocates memory, maps firmware and builds one generation.
    fn build(
        &self,
        cfg: &MachineConfig,
        host: Host,
        storage: &Storage,
    ) -> Result<Machine, MachineError> {
        let layout = self.layout(cfg.mem_size);
        let ram = if cfg.shared_ram {
            memory::allocate_shared_ram(&layout)?
        } else {
            memory::allocate_ram(&layout)?
        };
        // Direct kernel boot runs no firmware: a page of `hlt` stands in.
        let rom = if boot::is_direct(cfg) || !self.has_firmware() {
            memory::halt_rom()?
        } else {
            memory::load_bios(&cfg.bios, &ram)?
        };
        self.build_with(cfg, host, storage, Memory { layout, ram, rom })
    }
}

/// Guest memory as a board gets it: RAM laid out, firmware mapped.
pub struct Memory {
    pub layout: Layout,
    pub ram: GuestMem,
    pub rom: GuestMem,
}

/// Every machine type, the default first.
pub static MACHINES: &[&dyn Board] = &[&pc::PC, &q35::Q35, &NONE];

/// The board `name` selects (a canonical name or a versioned alias).
pub fn find(name: &str) -> Option<&'static dyn Board> {
    MACHINES.iter().copied().find(|b| b.matches(name))
}

/// The board of a configuration.
pub fn board(cfg: &MachineConfig) -> &'static dyn Board {
    find(&cfg.machine).unwrap_or(&pc::PC)
}

/// `-machine help`.
pub fn help() -> String {
    let mut s = String::from("Supported machines are:\n");
    for (i, b) in MACHINES.iter().enumerate() {
        let default = if i == 0 { " (default)" } else { "" };
        s.push_str(&format!("{:<20} {}{default}\n", b.name(), b.desc()));
        for a in b.help_aliases() {
            s.push_str(&format!("{a:<20} {} (alias of {})\n", b.desc(), b.name()));
        }
    }
    s
}

/// QEMU's `none`: RAM and nothing else, no CPU. libqtest starts it to
/// test what needs no board.
pub struct NoneBoard;
pub static NONE: NoneBoard = NoneBoard;

impl Board for NoneBoard {
    fn name(&self) -> &'static str {
        "none"
    }
    fn desc(&self) -> &'static str {
        "empty machine"
    }
    fn drive_device(&self, drive: &DriveSpec) -> Result<Option<DeviceSpec>, String> {
        match &drive.device {
            None => Ok(None),
            Some(d) => Err(format!(
                "machine type does not support if={},bus={},unit={}",
                d.interface.name(),
                d.bus,
                d.unit
            )),
        }
    }
    fn has_firmware(&self) -> bool {
        false
    }
    fn build_with(
        &self,
        cfg: &MachineConfig,
        host: Host,
        storage: &Storage,
        mem: Memory,
    ) -> Result<Machine, MachineError> {
        for d in storage.drives() {
            self.drive_device(d)
                .map_err(|e| MachineError::Config(format!("-drive {}: {e}", d.text)))?;
        }
        if let Some(d) = cfg.devices.first() {
            return Err(MachineError::Config(format!(
                "{}: No '{}' bus found for device '{}'",
                d.origin,
                d.ty.bus.name(),
                d.ty.name
            )));
        }
        Ok(Machine {
            io: devices::bus::Bus::new(),
            mmio: devices::bus::Bus::memory(),
            ram: mem.ram,
            rom: mem.rom,
            layout: mem.layout,
            uarts: Vec::new(),
            boot_entry: None,
            cpus: 0,
            pci: None,
            power_button: None,
            devices: Mutex::new(Vec::new()),
            hotplug: None,
            timers: host.timers,
            // RAM only: nothing else to move.
            vmstate: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases() {
        assert_eq!(find("pc").unwrap().name(), "pc");
        assert_eq!(find("pc-i440fx-7.2").unwrap().name(), "pc");
        assert_eq!(find("pc-i440fx-2.12").unwrap().name(), "pc");
        assert_eq!(find("pc-i440fx").map(|b| b.name()), None);
        assert_eq!(find("none").unwrap().name(), "none");
        assert!(find("q35x").is_none());
        let h = help();
        assert!(h.starts_with("Supported machines are:\n"));
        assert!(h.contains("pc                   Standard PC (i440FX + PIIX, 1996) (default)"));
        assert!(h.contains("pc-i440fx-7.2"));
        assert!(h.contains("none                 empty machine"));
    }
}
