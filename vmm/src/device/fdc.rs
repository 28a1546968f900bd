//! `floppy`: a floppy drive on the ISA floppy controller's bus
//! (`floppy-bus.0`, units 0 and 1), with or without a medium (`-device
//! floppy,id=fd0` is an empty drive that QMP can load); and the controller
//! itself (`isa-fdc`), which the board builds at 0x3f0 (`create`).
//! `-drive if=floppy`, `-fda` and `-fdb` become `floppy` devices. The
//! controller is `devices::fdc`.

use std::sync::{Arc, Mutex};

use block::backend::{BackendConfig, BlockBackend};
use devices::bus::lock;
use devices::fdc::drive::{Drive, FloppyMedium};
use devices::fdc::geometry::DriveType;
use devices::fdc::i82078::{Fdc, FdcPorts, IO_BASE, IRQ};
use devices::legacy::isa_dma::IsaDma;
use devices::media::Removable;

use super::bus::{BusKind, Buses, FloppyBus, Placement, Port};
use super::props::{PropDef, PropType};
use super::{AttachCtx, Category, Device, DeviceType};

const DRIVE_TYPES: PropType = PropType::Enum {
    name: "FloppyDriveType",
    values: &["144", "288", "120", "none", "auto"],
};

pub static FLOPPY: DeviceType = DeviceType {
    name: "floppy",
    aliases: &[],
    category: Category::Storage,
    bus: BusKind::Floppy,
    desc: "virtual floppy drive",
    user_creatable: true,
    props: &[
        PropDef::new("unit", PropType::U32, "").default("4294967295"),
        PropDef::new(
            "drive",
            PropType::Str,
            "Node name or ID of a block device to use as a backend",
        ),
        PropDef::new("drive-type", DRIVE_TYPES, "").default("auto"),
        PropDef::new("bootindex", PropType::I32, ""),
        PropDef::new("share-rw", PropType::Bool, "")
            .default("false")
            .ignored(),
    ],
    create,
};

fn create(ctx: &mut AttachCtx, dev: &Device, at: Placement) -> Result<(), String> {
    let Port::Floppy(bus) = &at.port else {
        return Err(format!("bus '{}' is not a floppy bus", at.bus));
    };
    let kind = dev
        .props
        .str("drive-type")
        .and_then(DriveType::parse)
        .unwrap_or(DriveType::Auto);
    // Without a drive, an empty one QMP can load (QEMU's anonymous
    // backend, whose media come in read-only unless QMP's
    // `read-only-mode` says otherwise, as QEMU's empty root state does).
    let backend = match ctx.claim_drive(dev)? {
        Some(b) => b,
        None => {
            let cfg = BackendConfig {
                read_only: true,
                ..BackendConfig::default()
            };
            let b = BlockBackend::new_empty("", cfg);
            ctx.claimed = Some(b.clone());
            b
        }
    };
    let medium = bus.attach(at.unit, kind, backend)?;
    ctx.removable = Some(medium);
    let path = bus.boot_path(at.unit);
    ctx.boot_index(dev, path)
}

/// The controller (`isa-fdc`): built by the board; its `-global`
/// properties put drives on it as QEMU's legacy ones do
/// (`-global isa-fdc.driveA=ID`, `fdtypeA=`, `bootindexA=`).
pub static ISA_FDC: DeviceType = DeviceType {
    name: "isa-fdc",
    aliases: &[],
    category: Category::Storage,
    bus: BusKind::Isa,
    desc: "virtual floppy controller",
    user_creatable: false,
    props: &[
        PropDef::new(
            "driveA",
            PropType::Str,
            "Node name or ID of a block device to use as a backend",
        ),
        PropDef::new(
            "driveB",
            PropType::Str,
            "Node name or ID of a block device to use as a backend",
        ),
        PropDef::new("fdtypeA", DRIVE_TYPES, "").default("auto"),
        PropDef::new("fdtypeB", DRIVE_TYPES, "").default("auto"),
        PropDef::new("bootindexA", PropType::I32, ""),
        PropDef::new("bootindexB", PropType::I32, ""),
        PropDef::new("iobase", PropType::U32, "")
            .default("0x3f0")
            .ignored(),
        PropDef::new("irq", PropType::U32, "")
            .default("6")
            .ignored(),
        PropDef::new("dma", PropType::U32, "")
            .default("2")
            .ignored(),
    ],
    create: create_isa_fdc,
};

fn create_isa_fdc(_: &mut AttachCtx, _: &Device, _: Placement) -> Result<(), String> {
    Err("isa-fdc is built by the machine".into())
}

/// The `floppy` devices `-global isa-fdc.driveA=`/`driveB=` ask for.
pub fn global_drives(globals: &[super::Global]) -> Result<Vec<super::DeviceSpec>, String> {
    use super::PropValue;
    let p = super::board_props(&ISA_FDC, globals);
    let mut out = Vec::new();
    for (unit, letter) in [(0u64, 'A'), (1, 'B')] {
        let Some(drive) = p.str(&format!("drive{letter}")) else {
            continue;
        };
        let mut props = vec![
            ("drive", PropValue::Str(drive.to_string())),
            ("unit", PropValue::Uint(unit)),
        ];
        if let Some(t) = p.str(&format!("fdtype{letter}")) {
            props.push(("drive-type", PropValue::Str(t.to_string())));
        }
        if let Some(i) = p.int(&format!("bootindex{letter}")) {
            props.push(("bootindex", PropValue::Int(i)));
        }
        let origin = format!("-global isa-fdc.drive{letter}={drive}");
        out.push(super::DeviceSpec::new(
            "floppy",
            Some("floppy-bus.0".into()),
            props,
            origin,
        )?);
    }
    Ok(out)
}

/// The controller's drive bus.
struct Bus {
    fdc: Arc<Mutex<Fdc>>,
}

impl FloppyBus for Bus {
    fn attach(
        &self,
        unit: u32,
        kind: DriveType,
        backend: Arc<BlockBackend>,
    ) -> Result<Arc<dyn Removable>, String> {
        let drive = Arc::new(Mutex::new(Drive::new(kind, Some(backend))?));
        lock(&self.fdc).attach(unit as usize, drive.clone())?;
        Ok(Arc::new(FloppyMedium(drive)))
    }
    fn boot_path(&self, unit: u32) -> String {
        format!("/isa/fdc@{IO_BASE:04x}/floppy@{unit}")
    }
}

/// Builds the controller at 0x3f0-0x3f5 and 0x3f7 on IRQ 6 and DMA
/// channel 2, and registers `floppy-bus.0`.
pub fn create_fdc(
    io: &mut devices::bus::Bus,
    buses: &mut Buses,
    irq: &dyn devices::irq::IrqChip,
    dma: Arc<Mutex<IsaDma>>,
) -> Result<Arc<Mutex<Fdc>>, String> {
    let fdc = Arc::new(Mutex::new(Fdc::new([None, None], dma, irq.line(IRQ))));
    let ports = |base: u8| {
        Arc::new(Mutex::new(FdcPorts {
            fdc: fdc.clone(),
            base,
        }))
    };
    io.insert(IO_BASE, 6, ports(0))
        .map_err(|_| "floppy controller: I/O ports 0x3f0-0x3f5 are in use".to_string())?;
    io.insert(IO_BASE + 7, 1, ports(7))
        .map_err(|_| "floppy controller: I/O port 0x3f7 is in use".to_string())?;
    buses.register(
        "floppy-bus.0",
        BusKind::Floppy,
        2,
        Port::Floppy(Arc::new(Bus { fdc: fdc.clone() })),
    );
    Ok(fdc)
}
