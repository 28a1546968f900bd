//! The device model: one table of device types ([`TYPES`]), their
//! properties, `-device`/`-global` parsing and help, and placing a device
//! on its bus.
//!
//! A device type is a [`DeviceType`]: its name and aliases, the kind of bus
//! it plugs into, its properties ([`props::PropDef`]) and a constructor.
//! `-device` text is parsed once, in `cli`, into a [`DeviceSpec`] with
//! typed values (unknown properties and bad values fail there, one line
//! each). When a machine generation is built, [`realize`] resolves each
//! spec's properties (the spec's own values over `-global`s over the
//! type's defaults), places it through [`bus::Buses`] and calls the
//! constructor with an [`AttachCtx`]: what a device may touch on the board.
//!
//! Adding a device: a module here with its `DeviceType`, and one line in
//! [`TYPES`]. Adding a controller with buses: it registers them in
//! `Buses` when the board (or its own constructor) builds it.

pub mod ahci;
pub mod bus;
pub mod debugcon;
pub mod fdc;
pub mod ide;
pub mod kvm_pit;
pub mod lsi;
pub mod props;
pub mod scsi;
pub mod usb;
pub mod vhost_user_blk;
pub mod virtio_blk;
pub mod virtio_scsi;

use std::collections::BTreeMap;
use std::sync::Arc;

use block::backend::BlockBackend;
use devices::bootorder::BootOrder;
use devices::irq::{IrqChip, IrqLine};
use devices::pci::msix::MsiSender;
use devices::virtio::IoEventRegistrar;
use devices::GuestMem;

use crate::storage::Storage;
pub use bus::{BusKind, Buses, Placement, Port};
use devices::virtio::event_loop::IoThreads;
pub use props::{PropDef, PropType, PropValue, Props, Use};

/// `-device help` groups types as QEMU does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Category {
    Bridge,
    Usb,
    Storage,
    Network,
    Input,
    Display,
    Sound,
    Misc,
}

impl Category {
    fn title(self) -> &'static str {
        match self {
            Category::Bridge => "Controller/Bridge/Hub devices",
            Category::Usb => "USB devices",
            Category::Storage => "Storage devices",
            Category::Network => "Network devices",
            Category::Input => "Input devices",
            Category::Display => "Display devices",
            Category::Sound => "Sound devices",
            Category::Misc => "Misc devices",
        }
    }
}

/// Builds one device on the machine, at the place [`Buses::place`] found.
pub type Constructor = fn(&mut AttachCtx, &Device, Placement) -> Result<(), String>;

/// One entry of the device-type table.
#[derive(Debug)]
pub struct DeviceType {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub category: Category,
    pub bus: BusKind,
    pub desc: &'static str,
    /// Whether `-device` may create it (the board builds the others; their
    /// properties are still set with `-global`).
    pub user_creatable: bool,
    pub props: &'static [PropDef],
    pub create: Constructor,
}

/// Every device type Strata has.
pub static TYPES: &[&DeviceType] = &[
    &ahci::ICH9_AHCI,
    &ide::IDE_HD,
    &ide::IDE_CD,
    &virtio_blk::VIRTIO_BLK_PCI,
    &virtio_blk::VIRTIO_BLK_PCI_TRANSITIONAL,
    &virtio_blk::VIRTIO_BLK_PCI_NON_TRANSITIONAL,
    &vhost_user_blk::VHOST_USER_BLK_PCI,
    &lsi::LSI53C895A,
    &lsi::LSI53C810,
    &virtio_scsi::VIRTIO_SCSI_PCI,
    &virtio_scsi::VIRTIO_SCSI_PCI_TRANSITIONAL,
    &virtio_scsi::VIRTIO_SCSI_PCI_NON_TRANSITIONAL,
    &scsi::SCSI_HD,
    &scsi::SCSI_CD,
    &usb::PIIX3_USB_UHCI,
    &usb::ICH9_USB_UHCI1,
    &usb::ICH9_USB_UHCI2,
    &usb::ICH9_USB_UHCI3,
    &usb::ICH9_USB_UHCI4,
    &usb::ICH9_USB_UHCI5,
    &usb::ICH9_USB_UHCI6,
    &usb::ICH9_USB_EHCI1,
    &usb::QEMU_XHCI,
    &usb::NEC_USB_XHCI,
    &usb::USB_STORAGE,
    &usb::USB_TABLET,
    &usb::USB_UAS,
    &usb::USB_CCID,
    &fdc::FLOPPY,
    &fdc::ISA_FDC,
    &debugcon::ISA_DEBUGCON,
    &kvm_pit::KVM_PIT,
];

/// Properties every device on a PCI bus has.
/// What every USB device has (QEMU's usb-device class).
const USB_PROPS: &[PropDef] = &[
    PropDef::new("port", PropType::Str, ""),
    PropDef::new("pcap", PropType::Str, "").ignored(),
    PropDef::new("msos-desc", PropType::Bool, "on/off")
        .default("true")
        .ignored(),
    PropDef::new("attached", PropType::Bool, "")
        .default("true")
        .ignored(),
];

const PCI_PROPS: &[PropDef] = &[
    PropDef::new(
        "addr",
        PropType::PciDevfn,
        "Slot and optional function number, example: 06.0 or 06",
    )
    .default("-1"),
    PropDef::new("romfile", PropType::Str, "").ignored(),
    PropDef::new("rombar", PropType::U32, "")
        .default("1")
        .ignored(),
    PropDef::new("multifunction", PropType::Bool, "on/off")
        .default("false")
        .ignored(),
    PropDef::new("x-pcie-lnksta-dllla", PropType::Bool, "on/off")
        .default("true")
        .ignored(),
    PropDef::new("x-pcie-extcap-init", PropType::Bool, "on/off")
        .default("true")
        .ignored(),
    PropDef::new("failover_pair_id", PropType::Str, "").ignored(),
];

impl DeviceType {
    /// The type's own properties and those of its bus kind.
    pub fn all_props(&self) -> impl Iterator<Item = &'static PropDef> {
        let bus: &'static [PropDef] = match self.bus {
            BusKind::Pci => PCI_PROPS,
            BusKind::Usb => USB_PROPS,
            _ => &[],
        };
        self.props.iter().chain(bus.iter())
    }

    pub fn prop(&self, name: &str) -> Option<&'static PropDef> {
        self.all_props().find(|p| p.name == name)
    }

    /// `-device NAME,help`.
    pub fn help(&self) -> String {
        let mut defs: Vec<&PropDef> = self.all_props().collect();
        defs.sort_by_key(|d| d.name);
        let mut s = format!("{} options:\n", self.name);
        for d in defs {
            s.push_str(&d.help_line());
            s.push('\n');
        }
        s
    }
}

/// A device type by name or alias.
pub fn find_type(name: &str) -> Option<&'static DeviceType> {
    TYPES
        .iter()
        .copied()
        .find(|t| t.name == name || t.aliases.contains(&name))
}

/// `-device help`: the user-creatable types by category.
pub fn list_help() -> String {
    let mut types: Vec<&DeviceType> = TYPES.iter().copied().filter(|t| t.user_creatable).collect();
    types.sort_by_key(|t| (t.category, t.name));
    let mut s = String::new();
    let mut cur = None;
    for t in types {
        if cur != Some(t.category) {
            if cur.is_some() {
                s.push('\n');
            }
            s.push_str(t.category.title());
            s.push_str(":\n");
            cur = Some(t.category);
        }
        s.push_str(&format!("name \"{}\", bus {}", t.name, t.bus.name()));
        for a in t.aliases {
            s.push_str(&format!(", alias \"{a}\""));
        }
        if !t.desc.is_empty() {
            s.push_str(&format!(", desc \"{}\"", t.desc));
        }
        s.push('\n');
    }
    s
}

/// One `-device`, parsed: a type and typed values, before placement.
#[derive(Clone, Debug)]
pub struct DeviceSpec {
    pub ty: &'static DeviceType,
    pub id: Option<String>,
    pub bus: Option<String>,
    pub props: BTreeMap<&'static str, PropValue>,
    /// How the user wrote it (`-device ide-hd,drive=d`), for errors.
    pub origin: String,
}

/// What a `-device` option asked for.
pub enum DeviceArg {
    Spec(DeviceSpec),
    /// `-device help` or `-device TYPE,help`: text to print before exiting.
    Help(String),
}

/// QEMU's identifier rule for `id=`: a letter, then letters, digits, `-`,
/// `.` and `_`.
fn valid_id(id: &str) -> bool {
    let mut c = id.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|x| x.is_ascii_alphanumeric() || "-._".contains(x))
}

fn lookup_creatable(name: &str) -> Result<&'static DeviceType, String> {
    match find_type(name) {
        None => Err(format!("'{name}' is not a valid device model name")),
        Some(t) if !t.user_creatable => {
            Err("Parameter 'driver' expects a pluggable device type".into())
        }
        Some(t) => Ok(t),
    }
}

impl DeviceSpec {
    /// Parses a `-device` value. Errors are one line without the option
    /// prefix (the caller adds `-device TEXT: `).
    pub fn parse(text: &str) -> Result<DeviceArg, String> {
        let pairs = block::keyval::Parser::new("-device")
            .bare_flags(true)
            .implied_key("driver")
            .parse_flat(text)
            .map_err(|e| e.to_string())?;
        let mut it = pairs.into_iter();
        let driver = match it.next() {
            Some((k, d)) if k == "driver" && !d.is_empty() => d,
            _ => return Err("Parameter 'driver' is missing".into()),
        };
        if driver == "help" || driver == "?" {
            return Ok(DeviceArg::Help(list_help()));
        }
        let ty = lookup_creatable(&driver)?;
        let mut spec = DeviceSpec {
            ty,
            id: None,
            bus: None,
            props: BTreeMap::new(),
            origin: format!("-device {text}"),
        };
        for (k, v) in it {
            match k.as_str() {
                "help" | "?" => return Ok(DeviceArg::Help(ty.help())),
                "driver" => {}
                "id" => {
                    if !valid_id(&v) {
                        return Err("Parameter 'id' expects an identifier".into());
                    }
                    spec.id = Some(v);
                }
                "bus" => spec.bus = Some(v),
                _ => {
                    let def = ty
                        .prop(&k)
                        .ok_or_else(|| format!("Property '{}.{k}' not found", ty.name))?;
                    let value = def.ty.parse(def.name, &v)?;
                    if let Use::Warn(msg) = def.usage {
                        eprintln!("strata: warning: -device {text}: {msg}");
                    }
                    spec.props.insert(def.name, value);
                }
            }
        }
        Ok(DeviceArg::Spec(spec))
    }

    /// A spec the board makes (for `-drive if=...`), with typed values.
    pub fn new(
        ty: &str,
        bus: Option<String>,
        props: Vec<(&'static str, PropValue)>,
        origin: String,
    ) -> Result<DeviceSpec, String> {
        let ty = find_type(ty).ok_or_else(|| format!("'{ty}' is not a valid device model name"))?;
        Ok(DeviceSpec {
            ty,
            id: None,
            bus,
            props: props.into_iter().collect(),
            origin,
        })
    }
}

/// One `-global DRIVER.PROP=VALUE`: the default of a property for every
/// device of a type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Global {
    pub driver: &'static str,
    pub prop: &'static str,
    pub value: PropValue,
}

/// Parses `-global DRIVER.PROP=VALUE` or
/// `-global driver=D,property=P,value=V`, checking the driver, the property
/// and the value against the type table.
pub fn parse_global(text: &str) -> Result<Global, String> {
    // As QEMU decides: `DRIVER.PROP=` (a dot before the first `=`) is the
    // short form, anything else the keyval form.
    let short = text
        .split_once('=')
        .and_then(|(lhs, v)| lhs.split_once('.').map(|(d, p)| (d, p, v)));
    let (driver, prop, value) = match short {
        Some((d, p, v)) if !d.is_empty() && !p.is_empty() => {
            (d.to_string(), p.to_string(), v.to_string())
        }
        _ => {
            let pairs = block::keyval::Parser::new("-global")
                .parse_flat(text)
                .map_err(|_| "expected DRIVER.PROPERTY=VALUE".to_string())?;
            let get = |k: &str| {
                pairs
                    .iter()
                    .rev()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.clone())
            };
            if let Some((k, _)) = pairs
                .iter()
                .find(|(k, _)| !["driver", "property", "value"].contains(&k.as_str()))
            {
                return Err(format!("Invalid parameter '{k}'"));
            }
            (
                get("driver").ok_or("expected DRIVER.PROPERTY=VALUE")?,
                get("property").ok_or("Parameter 'property' is missing")?,
                get("value").ok_or("Parameter 'value' is missing")?,
            )
        }
    };
    let ty =
        find_type(&driver).ok_or_else(|| format!("'{driver}' is not a valid device model name"))?;
    let def = ty
        .prop(&prop)
        .ok_or_else(|| format!("Property '{}.{prop}' not found", ty.name))?;
    let value = def.ty.parse(def.name, &value)?;
    Ok(Global {
        driver: ty.name,
        prop: def.name,
        value,
    })
}

/// A device being built: its type, its spec and its resolved properties.
pub struct Device<'a> {
    pub ty: &'static DeviceType,
    pub spec: &'a DeviceSpec,
    pub props: Props,
}

/// The properties of a `ty` the board builds itself (no `-device`), with
/// `-global` applied.
pub fn board_props(ty: &DeviceType, globals: &[Global]) -> Props {
    resolve(ty, globals, &BTreeMap::new())
}

fn resolve(ty: &DeviceType, globals: &[Global], own: &BTreeMap<&'static str, PropValue>) -> Props {
    let defs: Vec<PropDef> = ty.all_props().copied().collect();
    let g = globals
        .iter()
        .filter(|g| g.driver == ty.name)
        .map(|g| (g.prop, g.value.clone()));
    Props::resolve(&defs, g, own)
}

/// PCI INTx routing, as the board wires it (PIIX3 PIRQ on `pc`).
pub trait PciIntx {
    /// The line of interrupt pin `pin` (1 = INTA#) of a device in `slot`.
    fn line(&self, slot: u8, pin: u8) -> Arc<dyn IrqLine>;
}

/// What a device being attached may touch.
pub struct AttachCtx<'a> {
    pub io: &'a mut devices::bus::Bus,
    pub mmio: &'a mut devices::bus::Bus,
    pub buses: &'a mut Buses,
    pub ram: &'a GuestMem,
    pub irq: &'a dyn IrqChip,
    pub intx: &'a dyn PciIntx,
    pub boot_order: &'a mut BootOrder,
    pub msi: Arc<dyn MsiSender>,
    pub ioevents: Arc<dyn IoEventRegistrar>,
    pub iothreads: &'a mut IoThreads,
    pub cpus: u32,
    pub storage: &'a Storage,
    pub globals: &'a [Global],
    /// Drives already attached to a device: a drive serves one device.
    pub used_drives: Vec<String>,
    /// Where device events go (DEVICE_TRAY_MOVED).
    pub events: Arc<crate::monitor::event::Events>,
    /// The devices built so far, for the monitor.
    pub realized: Vec<Realized>,
    /// Set by a constructor whose device has a removable-media drive.
    pub removable: Option<Arc<dyn devices::media::Removable>>,
    /// The backend the device being built claimed (`claim_drive`).
    pub claimed: Option<Arc<BlockBackend>>,
    /// Built by `device_add` on a running machine (not at start-up):
    /// HBAs then take no `-drive if=scsi` drives.
    pub hotplugged: bool,
    /// Set by a constructor whose device `device_del` can take off at
    /// once ([`Realized::detach`]).
    pub detach: Option<Arc<dyn Fn() + Send + Sync>>,
    /// The machine's device timers.
    pub timers: Arc<devices::timer::Timers>,
    /// The `-chardev`s by id (`chardev=` of vhost-user devices).
    pub chardevs: &'a [(String, crate::config::CharDev)],
}

/// A built device, as the monitor finds it (`id=`, or the drive it uses).
pub struct Realized {
    pub id: Option<String>,
    pub ty: &'static DeviceType,
    /// `drive=` as given.
    pub drive: Option<String>,
    /// Its removable-media drive (CD-ROMs).
    pub removable: Option<Arc<dyn devices::media::Removable>>,
    /// Its PCI slot, for a device on the PCI bus (hot-unplug).
    pub pci_slot: Option<u8>,
    /// The bus it is on (`pci.0`, `ide.1`).
    pub bus: String,
    /// The backend of its `drive=`.
    pub backend: Option<Arc<block::backend::BlockBackend>>,
    /// Its properties after defaults and `-global` (for `qom-get`).
    pub props: props::Props,
    /// Its unit on `bus`.
    pub unit: u32,
    /// Takes it off its bus at once (`device_del` of a unit whose bus
    /// allows it, such as SCSI); PCI devices leave by ACPI eject instead.
    pub detach: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl Realized {
    /// QMP's name for it: the `id`, or a path for devices without one.
    pub fn qdev(&self, index: usize) -> String {
        match &self.id {
            Some(id) => id.clone(),
            None => format!("/machine/peripheral-anon/device[{index}]"),
        }
    }
}

impl AttachCtx<'_> {
    /// Claims `dev`'s `drive=` for it and returns the backend (`None` for
    /// no `drive=`; an empty drive is a backend with no medium).
    pub fn claim_drive(&mut self, dev: &Device) -> Result<Option<Arc<BlockBackend>>, String> {
        let Some(name) = dev.props.str("drive") else {
            return Ok(None);
        };
        if self.used_drives.iter().any(|d| d == name) {
            return Err(format!(
                "Drive '{name}' is already in use by another device"
            ));
        }
        self.used_drives.push(name.to_string());
        let b = self.storage.backend(name)?;
        if let Some(b) = &b {
            // The device's own error policy wins over the drive's (how
            // libvirt writes it with -blockdev).
            let action = |k: &str| {
                dev.props
                    .str(k)
                    .and_then(block::backend::ErrorAction::parse)
            };
            b.set_error_actions(action("rerror"), action("werror"));
        }
        self.claimed = b.clone();
        Ok(b)
    }

    /// Registers `dev`'s `bootindex` (if set) for `path`.
    pub fn boot_index(&mut self, dev: &Device, path: String) -> Result<(), String> {
        match dev.props.int("bootindex") {
            Some(n) if n >= 0 => self.boot_order.register(n as u32, path),
            _ => Ok(()),
        }
    }
}

/// Builds `spec` on the machine: properties resolved, placed on its bus,
/// constructed. Errors name the option as the user wrote it.
pub fn realize(ctx: &mut AttachCtx, spec: &DeviceSpec) -> Result<(), String> {
    let props = resolve(spec.ty, ctx.globals, &spec.props);
    let dev = Device {
        ty: spec.ty,
        spec,
        props,
    };
    let err = |m: String| format!("{}: {m}", spec.origin);
    let place = ctx.buses.place(&dev).map_err(err)?;
    let pci_slot = matches!(place.port, Port::Pci(_)).then(|| place.devfn().0);
    let bus = place.bus.clone();
    let unit = place.unit;
    ctx.removable = None;
    ctx.claimed = None;
    ctx.detach = None;
    (spec.ty.create)(ctx, &dev, place).map_err(err)?;
    let r = Realized {
        id: spec.id.clone(),
        ty: spec.ty,
        drive: dev.props.str("drive").map(str::to_string),
        removable: ctx.removable.take(),
        pci_slot,
        bus,
        backend: ctx.claimed.take(),
        props: dev.props.clone(),
        unit,
        detach: ctx.detach.take(),
    };
    if let Some(cd) = r.removable.as_ref().filter(|m| m.has_tray()) {
        let (events, drive, qdev) = (
            ctx.events.clone(),
            r.drive.clone().unwrap_or_default(),
            r.qdev(ctx.realized.len()),
        );
        cd.set_tray_listener(Box::new(move |open| {
            events.emit(
                "DEVICE_TRAY_MOVED",
                Some(serde_json::json!({"device": drive, "id": qdev, "tray-open": open})),
            )
        }));
    }
    ctx.realized.push(r);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_parses() {
        for t in TYPES {
            for p in t.all_props() {
                if let Some(d) = p.default {
                    // PCI's "-1" (no address) is the one default that is
                    // not a value of its type.
                    if p.ty == PropType::PciDevfn {
                        continue;
                    }
                    assert!(p.ty.parse(p.name, d).is_ok(), "{}.{}", t.name, p.name);
                }
            }
        }
    }

    #[test]
    fn names_are_unique() {
        let mut seen = Vec::new();
        for t in TYPES {
            for n in std::iter::once(&t.name).chain(t.aliases.iter()) {
                assert!(!seen.contains(n), "{n} twice");
                seen.push(*n);
            }
            let mut props: Vec<_> = t.all_props().map(|p| p.name).collect();
            props.sort();
            props.dedup();
            assert_eq!(props.len(), t.all_props().count(), "{}", t.name);
        }
    }

    fn spec(text: &str) -> Result<DeviceSpec, String> {
        match DeviceSpec::parse(text)? {
            DeviceArg::Spec(s) => Ok(s),
            DeviceArg::Help(_) => Err("help".into()),
        }
    }

    #[test]
    fn device_parse_errors_are_qemus() {
        assert_eq!(
            spec("frob").unwrap_err(),
            "'frob' is not a valid device model name"
        );
        assert_eq!(
            spec("ide-hd,frob=1").unwrap_err(),
            "Property 'ide-hd.frob' not found"
        );
        assert_eq!(
            spec("ide-hd,unit=x").unwrap_err(),
            "Parameter 'unit' expects uint32"
        );
        assert_eq!(
            spec("virtio-blk-pci,addr=33").unwrap_err(),
            "Property 'addr' doesn't take value '33'"
        );
        assert_eq!(
            spec("ide-hd,id=1x").unwrap_err(),
            "Parameter 'id' expects an identifier"
        );
        assert_eq!(
            spec("isa-debugcon").unwrap_err(),
            "Parameter 'driver' expects a pluggable device type"
        );
        let s = spec("virtio-blk,drive=d,scsi=off,bus=pci.0,addr=0x5,id=v").unwrap();
        assert_eq!(s.ty.name, "virtio-blk-pci");
        assert_eq!(s.props["addr"], PropValue::Devfn(5, 0));
        assert_eq!(s.bus.as_deref(), Some("pci.0"));
        assert_eq!(s.id.as_deref(), Some("v"));
    }

    #[test]
    fn globals_in_both_spellings() {
        let g = parse_global("ide-hd.serial=X").unwrap();
        assert_eq!((g.driver, g.prop), ("ide-hd", "serial"));
        assert_eq!(g.value, PropValue::Str("X".into()));
        let g = parse_global("driver=virtio-blk-pci,property=num-queues,value=2").unwrap();
        assert_eq!((g.driver, g.prop), ("virtio-blk-pci", "num-queues"));
        assert_eq!(g.value, PropValue::Uint(2));
        assert_eq!(
            parse_global("frob.x=1").unwrap_err(),
            "'frob' is not a valid device model name"
        );
        assert_eq!(
            parse_global("ide-hd.frob=1").unwrap_err(),
            "Property 'ide-hd.frob' not found"
        );
        assert_eq!(
            parse_global("virtio-blk-pci.num-queues=many").unwrap_err(),
            "Parameter 'num-queues' expects uint16"
        );
        assert!(parse_global("ide-hd").is_err());
        assert!(parse_global("isa-debugcon.iobase=0x402").is_ok());
    }

    #[test]
    fn help_texts() {
        let l = list_help();
        assert!(l.starts_with("USB devices:\n"), "{l}");
        assert!(l.contains("\n\nStorage devices:\n"), "{l}");
        assert!(l.contains("name \"ide-hd\", bus IDE, desc \"virtual IDE disk\""));
        assert!(l.contains("name \"virtio-blk-pci\", bus PCI, alias \"virtio-blk\""));
        assert!(!l.contains("isa-debugcon"));
        let h = find_type("ide-hd").unwrap().help();
        assert!(h.starts_with("ide-hd options:\n"));
        assert!(h.contains("  serial=<str>"));
        assert!(h.contains("  unit=<uint32>"));
    }
}
