//! The buses of a machine: controllers register them by name (`pci.0`,
//! `ide.0`, later `ahci0.0`, `scsi0.0`, `usb-bus.0`), with their kind and
//! unit count, and every device is placed through [`Buses::place`], which
//! checks `bus=`, `unit=` and `addr=` in one place with QEMU's errors.

use std::collections::BTreeMap;
use std::sync::Arc;

use devices::pci::PciBus;

use super::Device;

/// What plugs into a bus; `-device X,help` and `-device help` print the
/// name (`bus PCI`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusKind {
    /// Machine-internal devices with no bus of their own.
    System,
    Pci,
    Isa,
    Ide,
    Floppy,
    Scsi,
    Usb,
}

impl BusKind {
    pub fn name(self) -> &'static str {
        match self {
            BusKind::System => "System",
            BusKind::Pci => "PCI",
            BusKind::Isa => "ISA",
            BusKind::Ide => "IDE",
            BusKind::Floppy => "floppy-bus",
            BusKind::Scsi => "SCSI",
            BusKind::Usb => "usb-bus",
        }
    }

    /// The property that picks the unit on a bus of this kind.
    fn unit_prop(self) -> Option<&'static str> {
        match self {
            BusKind::Pci => Some("addr"),
            BusKind::Ide | BusKind::Floppy => Some("unit"),
            BusKind::Scsi => Some("scsi-id"),
            BusKind::Usb => Some("port"),
            BusKind::System | BusKind::Isa => None,
        }
    }
}

/// The controller side of an IDE bus (a PIIX channel, an AHCI port):
/// what an `ide-hd`/`ide-cd` needs to attach itself.
pub trait IdeBus: Send + Sync {
    /// Puts a drive on `unit`.
    fn attach(&self, unit: u32, drive: devices::ide::DriveConfig) -> Result<(), String>;
    /// The OpenFirmware path of `unit`, for `bootorder`.
    fn boot_path(&self, unit: u32) -> String;
    /// The drive's number on the controller (its default serial number).
    fn drive_index(&self, unit: u32) -> u32;
}

/// The controller behind a bus.
/// A floppy controller's drive bus: the drive's unit, its type and its
/// backend (which may hold no medium).
pub trait FloppyBus: Send + Sync {
    fn attach(
        &self,
        unit: u32,
        kind: devices::fdc::geometry::DriveType,
        backend: Arc<block::backend::BlockBackend>,
    ) -> Result<Arc<dyn devices::media::Removable>, String>;
    fn boot_path(&self, unit: u32) -> String;
}

/// An HBA's SCSI bus (LSI 53C895A, virtio-scsi): the targets units
/// attach to, and how the firmware names a unit.
pub trait ScsiPort: Send + Sync {
    fn bus(&self) -> &Arc<devices::scsi::bus::ScsiBus>;
    /// The largest LUN the HBA addresses.
    fn max_lun(&self) -> u32;
    /// The OpenFirmware path of (`id`, `lun`), for `bootorder`.
    fn boot_path(&self, id: u32, lun: u32) -> String;
    /// Whether units may come and go while the guest runs.
    fn can_hotplug(&self) -> bool {
        false
    }
    /// A unit came (`plugged`) or went at (`id`, `lun`) while the guest
    /// runs: the HBA tells the driver.
    fn hotplugged(&self, _id: u32, _lun: u32, _plugged: bool) {}
}

/// A unit number on a SCSI bus: the target id and the LUN.
pub fn scsi_unit(unit: u32) -> (u32, u32) {
    (unit >> 16, unit & 0xffff)
}

#[derive(Clone)]
pub enum Port {
    Pci(Arc<PciBus>),
    Ide(Arc<dyn IdeBus>),
    Floppy(Arc<dyn FloppyBus>),
    Scsi(Arc<dyn ScsiPort>),
    Usb(Arc<dyn UsbPort>),
    None,
}

struct Bus {
    kind: BusKind,
    /// Units the bus has (`0`: as many as the unit numbers allow).
    units: u32,
    port: Port,
    /// Occupied units and who holds them.
    used: BTreeMap<u32, String>,
}

/// A USB host controller's root ports, as `-device usb-*` sees them:
/// unit `n` is QEMU's `port=n+1`.
pub trait UsbPort: Send + Sync {
    /// Connects `dev` to root port `unit` (a hotplug while the guest runs).
    fn attach(&self, unit: u32, dev: Box<dyn devices::usb::UsbDevice>) -> Result<(), String>;
    /// Disconnects what is on root port `unit`.
    fn detach(&self, unit: u32);
    /// The OpenFirmware path of the controller, for `bootorder`.
    fn boot_path(&self) -> String;
    /// Takes a UHCI as the companion of ports `firstport..` (an EHCI's
    /// bus does; QEMU's `masterbus=`).
    fn add_companion(
        &self,
        _firstport: usize,
        _companion: devices::usb::ehci::CompanionHandle,
    ) -> Result<(), String> {
        Err("the masterbus is not an EHCI bus".into())
    }
}

/// The name a controller's child bus gets: `ID.0` for a controller with
/// an id, else the next free `PREFIX.N` (QEMU's naming).
pub fn child_bus_name(buses: &Buses, id: Option<&str>, prefix: &str) -> String {
    match id {
        Some(id) => format!("{id}.0"),
        None => (0..)
            .map(|n| format!("{prefix}.{n}"))
            .find(|n| !buses.exists(n))
            .unwrap_or_default(),
    }
}

/// Where a device was placed.
pub struct Placement {
    pub bus: String,
    pub unit: u32,
    pub port: Port,
}

impl Placement {
    /// PCI slot and function of a unit on a PCI bus (`devfn`).
    pub fn devfn(&self) -> (u8, u8) {
        ((self.unit >> 3) as u8, (self.unit & 7) as u8)
    }

    /// The OpenFirmware path SeaBIOS's `bootorder` knows a function on
    /// the root PCI bus by: `/pci@i0cf8/*@SLOT[,FN]`.
    pub fn pci_boot_path(&self) -> String {
        pci_boot_path(self.devfn())
    }
}

/// The named buses of one machine generation, in registration order.
/// The `bootorder` path of PCI function `(slot, function)` on bus 0.
pub fn pci_boot_path((slot, func): (u8, u8)) -> String {
    match func {
        0 => format!("/pci@i0cf8/*@{slot:x}"),
        _ => format!("/pci@i0cf8/*@{slot:x},{func:x}"),
    }
}

#[derive(Default)]
pub struct Buses {
    order: Vec<String>,
    buses: BTreeMap<String, Bus>,
}

/// QEMU leaves the first PCI slots to the board; a device without `addr=`
/// goes to the first free function 0 from here on.
const FIRST_AUTO_SLOT: u32 = 0;

impl Buses {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a bus; `units` is its unit count (0: unbounded).
    pub fn register(&mut self, name: &str, kind: BusKind, units: u32, port: Port) {
        if self
            .buses
            .insert(
                name.to_string(),
                Bus {
                    kind,
                    units,
                    port,
                    used: BTreeMap::new(),
                },
            )
            .is_none()
        {
            self.order.push(name.to_string());
        }
    }

    /// Marks a unit taken by a device the board built itself.
    pub fn occupy(&mut self, bus: &str, unit: u32, what: &str) {
        if let Some(b) = self.buses.get_mut(bus) {
            b.used.insert(unit, what.to_string());
        }
    }

    /// How many buses of `kind` exist.
    pub fn count(&self, kind: BusKind) -> u32 {
        self.buses.values().filter(|b| b.kind == kind).count() as u32
    }

    /// Frees `unit` of bus `name` (a device unplugged).
    pub fn release(&mut self, name: &str, unit: u32) {
        if let Some(b) = self.buses.get_mut(name) {
            b.used.remove(&unit);
        }
    }

    /// The controller behind bus `name`.
    pub fn port(&self, name: &str) -> Option<Port> {
        self.buses.get(name).map(|b| b.port.clone())
    }

    /// Whether a bus called `name` exists.
    pub fn exists(&self, name: &str) -> bool {
        self.buses.contains_key(name)
    }

    /// The name of the first bus of `kind`, for messages.
    pub fn first_of(&self, kind: BusKind) -> Option<&str> {
        self.order
            .iter()
            .find(|n| self.buses.get(*n).is_some_and(|b| b.kind == kind))
            .map(String::as_str)
    }

    /// Frees every function of `slot` on the PCI buses (hot-unplug).
    pub fn release_pci_slot(&mut self, slot: u8) {
        for b in self.buses.values_mut() {
            if b.kind == BusKind::Pci {
                b.used.retain(|&u, _| u >> 3 != slot as u32);
            }
        }
    }

    fn is_full(b: &Bus) -> bool {
        b.units != 0 && b.used.len() as u32 >= b.units
    }

    /// Places `dev` on a bus of its type's kind: `bus=` if given (it must
    /// exist and be of the right kind), else the first bus with room; the
    /// unit from the kind's unit property if given, else the first free
    /// one. The unit is marked used.
    pub fn place(&mut self, dev: &Device) -> Result<Placement, String> {
        if dev.ty.bus == BusKind::Scsi {
            return self.place_scsi(dev);
        }
        let kind = dev.ty.bus;
        let ty = dev.ty.name;
        let unit_prop = kind.unit_prop();
        let wanted: Option<u32> = match kind {
            BusKind::Pci => dev
                .props
                .devfn("addr")
                .map(|(s, f)| (s as u32) << 3 | f as u32),
            // `unit=-1` (QEMU's default) is "pick one".
            BusKind::Ide | BusKind::Floppy => dev
                .props
                .uint("unit")
                .filter(|&u| u != u32::MAX as u64)
                .map(|u| u as u32),
            // QEMU's ports count from 1; "1.2" is a port of a hub.
            BusKind::Usb => match dev.props.str("port") {
                None => None,
                Some(p) => match p.parse::<u32>() {
                    Ok(n) if n >= 1 => Some(n - 1),
                    _ => return Err(format!("usb port {p} not found (hubs are not emulated)")),
                },
            },
            _ => None,
        };
        let name = match dev.spec.bus.as_deref() {
            Some(n) => {
                let b = self
                    .buses
                    .get(n)
                    .ok_or_else(|| format!("Bus '{n}' not found"))?;
                if b.kind != kind {
                    return Err(format!("Device '{ty}' can't go on {} bus", b.kind.name()));
                }
                if wanted.is_none() && Self::is_full(b) {
                    return Err(format!("Bus '{n}' is full"));
                }
                n.to_string()
            }
            None => {
                let fits = |b: &Bus| match wanted {
                    Some(u) => !b.used.contains_key(&u) && (b.units == 0 || u < b.units),
                    None => !Self::is_full(b),
                };
                let of_kind = || {
                    self.order
                        .iter()
                        .filter(|n| self.buses.get(*n).is_some_and(|b| b.kind == kind))
                };
                // With a unit asked for, the first bus explains why it
                // does not fit; without, no bus with room is QEMU's error.
                match of_kind()
                    .find(|n| fits(&self.buses[*n]))
                    .or_else(|| of_kind().next().filter(|_| wanted.is_some()))
                {
                    Some(n) => n.clone(),
                    None => {
                        return Err(format!("No '{}' bus found for device '{ty}'", kind.name()))
                    }
                }
            }
        };
        let Some(bus) = self.buses.get_mut(&name) else {
            return Err(format!("Bus '{name}' not found"));
        };
        let unit = match wanted {
            Some(u) => {
                if bus.units != 0 && u >= bus.units {
                    return Err(match kind {
                        BusKind::Ide => format!(
                            "Can't create IDE unit {u}, bus supports only {} units",
                            bus.units
                        ),
                        BusKind::Usb => {
                            format!("usb port {} (bus {name}) not found (in use?)", u + 1)
                        }
                        _ => format!("{}: unit {u} out of range", unit_prop.unwrap_or("unit")),
                    });
                }
                if let Some(holder) = bus.used.get(&u) {
                    return Err(match kind {
                        BusKind::Pci => format!(
                            "PCI: slot {} function {} not available for {ty}, in use by {holder}",
                            u >> 3,
                            u & 7
                        ),
                        BusKind::Ide => format!("IDE unit {u} is in use"),
                        BusKind::Usb => {
                            format!("usb port {} (bus {name}) not found (in use?)", u + 1)
                        }
                        _ => format!("unit {u} on bus '{name}' is in use by {holder}"),
                    });
                }
                u
            }
            None => {
                let step = if kind == BusKind::Pci { 8 } else { 1 };
                let first = if kind == BusKind::Pci {
                    FIRST_AUTO_SLOT
                } else {
                    0
                };
                let limit = match (kind, bus.units) {
                    (BusKind::Pci, _) => 32 * 8,
                    (_, 0) => u32::MAX,
                    (_, n) => n,
                };
                (first..limit)
                    .step_by(step)
                    .find(|u| !bus.used.contains_key(u))
                    .ok_or_else(|| match kind {
                        BusKind::Pci => format!("PCI: no slot available for {ty}"),
                        _ => format!("Bus '{name}' is full"),
                    })?
            }
        };
        bus.used.insert(unit, holder(dev));
        Ok(Placement {
            bus: name,
            unit,
            port: bus.port.clone(),
        })
    }

    /// [`Buses::place`] for a SCSI unit: `scsi-id` and `lun` (either may
    /// be left for the bus to pick, as QEMU does: the first target with
    /// the LUN free, or the first free LUN of the target), on `bus=` or
    /// the first SCSI bus. The unit is `id << 16 | lun` ([`scsi_unit`]).
    fn place_scsi(&mut self, dev: &Device) -> Result<Placement, String> {
        let ty = dev.ty.name;
        let auto = |k: &str| dev.props.uint(k).filter(|&v| v != u32::MAX as u64);
        let name = match dev.spec.bus.as_deref() {
            Some(n) => {
                let b = self
                    .buses
                    .get(n)
                    .ok_or_else(|| format!("Bus '{n}' not found"))?;
                if b.kind != BusKind::Scsi {
                    return Err(format!("Device '{ty}' can't go on {} bus", b.kind.name()));
                }
                n.to_string()
            }
            None => self
                .first_of(BusKind::Scsi)
                .ok_or_else(|| format!("No 'SCSI' bus found for device '{ty}'"))?
                .to_string(),
        };
        let Some(bus) = self.buses.get_mut(&name) else {
            return Err(format!("Bus '{name}' not found"));
        };
        let Port::Scsi(port) = &bus.port else {
            return Err(format!("bus '{name}' is not a SCSI bus"));
        };
        let (max_id, max_lun) = (port.bus().max_id() as u64, port.max_lun() as u64);
        let (id, lun) = (auto("scsi-id"), auto("lun"));
        if let Some(id) = id.filter(|&i| i > max_id) {
            return Err(format!("bad scsi device id: {id}"));
        }
        if let Some(lun) = lun.filter(|&l| l > max_lun) {
            return Err(format!("bad scsi device lun: {lun}"));
        }
        let taken = |id: u64, lun: u64| bus.used.contains_key(&((id as u32) << 16 | lun as u32));
        let (id, lun) = match (id, lun) {
            (None, lun) => {
                let lun = lun.unwrap_or(0);
                let id = (0..=max_id)
                    .find(|&i| !taken(i, lun))
                    .ok_or("no free target")?;
                (id, lun)
            }
            (Some(id), None) => {
                let lun = (0..=max_lun)
                    .find(|&l| !taken(id, l))
                    .ok_or("no free lun")?;
                (id, lun)
            }
            (Some(id), Some(lun)) => {
                if let Some(h) = bus.used.get(&((id as u32) << 16 | lun as u32)) {
                    return Err(format!("lun already used by '{h}'"));
                }
                (id, lun)
            }
        };
        let unit = (id as u32) << 16 | lun as u32;
        bus.used.insert(unit, holder(dev));
        Ok(Placement {
            bus: name,
            unit,
            port: bus.port.clone(),
        })
    }
}

/// How messages name a device holding a unit.
fn holder(dev: &Device) -> String {
    match &dev.spec.id {
        Some(id) => format!("{},id={id}", dev.ty.name),
        None => dev.ty.name.to_string(),
    }
}
