//! IDE on the `pc` machine: the PIIX3 IDE function at 00:01.1 (present
//! even without drives, as on QEMU's `pc`), its legacy ports, and the
//! `ide-hd`/`ide-cd` devices with QEMU's properties:
//! `drive=`, `bus=ide.0|ide.1`, `unit=0|1`, `serial=`, `model=`, `wwn=`,
//! `ver=`, `bootindex=`, `logical_block_size=` (512 only, as in QEMU),
//! `physical_block_size=`, `cyls=`/`heads=`/`secs=` and `bios-chs-trans=`.
//!
//! The BIOS learns about disks from CMOS as QEMU's `pc` reports them
//! (pc_cmos_init_late): 0x12/0x19/0x1a drive types for ide0's master and
//! slave, their geometry at 0x1b and 0x24, and the translation of all four
//! positions in 0x39 (SeaBIOS reads it in `get_translation`).

use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::ide::geometry::{Geometry, Translation};
use devices::ide::{DriveConfig, Media, PiixIde, LEGACY};
use devices::legacy::cmos::Cmos;
use devices::scsi::{CdRom, Transport};

use crate::config::DeviceConfig;
use crate::pc::{AttachCtx, MachineError};
use crate::storage::Storage;

pub const IDE_SLOT: u8 = 1;
pub const IDE_FUNCTION: u8 = 1;

const KNOWN_PROPS: &[&str] = &[
    "drive",
    "bus",
    "unit",
    "serial",
    "model",
    "wwn",
    "ver",
    "bootindex",
    "logical_block_size",
    "physical_block_size",
    "cyls",
    "heads",
    "secs",
    "bios-chs-trans",
    "lcyls",
    "lheads",
    "lsecs",
    "id",
    "share-rw",
    "discard_granularity",
    "rotation_rate",
];

/// Creates the controller and registers its legacy ports.
pub fn create(
    io: &mut devices::bus::Bus,
    pci: &devices::pci::PciBus,
    ram: &devices::GuestMem,
    irq: &dyn devices::irq::IrqChip,
) -> Result<Arc<Mutex<PiixIde>>, MachineError> {
    let ide = Arc::new(Mutex::new(PiixIde::new(
        ram.clone(),
        irq.line(LEGACY[0].2),
        irq.line(LEGACY[1].2),
    )));
    for (bus, &(cmd, ctrl, _)) in LEGACY.iter().enumerate() {
        let (c, k) = lock(&ide).legacy_ports(bus);
        io.insert(cmd, 8, Arc::new(Mutex::new(c)))
            .and_then(|_| io.insert(ctrl, 1, Arc::new(Mutex::new(k))))
            .map_err(|_| {
                MachineError::Config(format!("IDE: I/O port {cmd:#x} is already in use"))
            })?;
    }
    pci.add(IDE_SLOT, IDE_FUNCTION, ide.clone())
        .map_err(MachineError::Config)?;
    Ok(ide)
}

fn parse_num(dev: &DeviceConfig, key: &str) -> Result<Option<u64>, MachineError> {
    let Some(v) = dev.prop(key) else {
        return Ok(None);
    };
    let r = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else {
        v.parse()
    };
    r.map(Some).map_err(|_| {
        MachineError::Config(format!(
            "{}: property '{key}' expects a number, not '{v}'",
            dev.describe()
        ))
    })
}

/// Attaches one `ide-hd` or `ide-cd`.
pub fn attach(
    ctx: &mut AttachCtx,
    dev: &DeviceConfig,
    storage: &Storage,
) -> Result<(), MachineError> {
    let err = |m: String| MachineError::Config(format!("{}: {m}", dev.describe()));
    for (k, _) in &dev.props {
        if !KNOWN_PROPS.contains(&k.as_str()) {
            return Err(err(format!("property '{k}' not found")));
        }
    }
    let is_cd = dev.driver == "ide-cd";
    let backend = ctx.claim_drive(dev, storage)?;
    if !is_cd {
        match (&backend, dev.prop("drive")) {
            (_, None) => return Err(err("drive property not set".into())),
            (None, Some(_)) => return Err(err("Device needs media, but drive is empty".into())),
            _ => {}
        }
    }
    if let Some(b) = &backend {
        if !is_cd && b.len() < 512 {
            return Err(err(format!(
                "drive '{}' is smaller than one 512-byte sector",
                b.id()
            )));
        }
    }

    let ide = ctx.ide.clone();
    let bus = match dev.prop("bus") {
        None => None,
        Some(b) => match b.strip_prefix("ide.").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) if n < 2 => Some(n),
            _ => {
                return Err(err(format!(
                    "bus '{b}' not found (the pc machine has ide.0 and ide.1)"
                )))
            }
        },
    };
    let unit = match parse_num(dev, "unit")? {
        None => None,
        Some(u) if u < 2 => Some(u as usize),
        Some(u) => return Err(err(format!("unit {u} is out of range (0 or 1)"))),
    };
    let free = |b: usize, u: usize| lock(&lock(&ide).channel(b)).drive(u).is_none();
    let (bus, unit) = match (bus, unit) {
        (Some(b), Some(u)) => (b, u),
        (Some(b), None) => match (0..2).find(|&u| free(b, u)) {
            Some(u) => (b, u),
            None => return Err(err(format!("IDE bus ide.{b} is full"))),
        },
        (None, u) => {
            let found = (0..2)
                .flat_map(|b| (0..2).map(move |x| (b, x)))
                .find(|&(b, x)| u.is_none_or(|u| u == x) && free(b, x));
            match found {
                Some(p) => p,
                None => return Err(err("no free IDE unit".into())),
            }
        }
    };
    if !free(bus, unit) {
        return Err(err(format!(
            "IDE unit ide.{bus} unit {unit} is already in use"
        )));
    }

    if let Some(lbs) = parse_num(dev, "logical_block_size")? {
        if lbs != 512 {
            return Err(err(format!(
                "logical_block_size={lbs}: IDE drives have 512-byte logical blocks"
            )));
        }
    }
    let pbs = parse_num(dev, "physical_block_size")?.unwrap_or(512);
    let geometry = match (
        parse_num(dev, "cyls")?,
        parse_num(dev, "heads")?,
        parse_num(dev, "secs")?,
    ) {
        (None, None, None) => None,
        (Some(c), Some(h), Some(s)) => {
            Some(Geometry::checked(c as u32, h as u32, s as u32).map_err(err)?)
        }
        _ => return Err(err("cyls, heads and secs must be given together".into())),
    };
    let translation = match dev.prop("bios-chs-trans") {
        None => None,
        Some(t) => Translation::parse(t).ok_or_else(|| {
            err(format!(
                "bios-chs-trans={t}: use auto, none, lba, large or rechs"
            ))
        })?,
    };
    let wwn = parse_num(dev, "wwn")?;
    let media = if is_cd {
        Media::Cd(CdRom::new(Transport::Atapi, backend))
    } else {
        Media::Disk(backend.ok_or_else(|| err("drive property not set".into()))?)
    };
    if dev.prop("serial").is_some_and(|s| s.len() > 20) {
        return Err(err("serial is longer than 20 characters".into()));
    }
    if dev.prop("model").is_some_and(|s| s.len() > 40) {
        return Err(err("model is longer than 40 characters".into()));
    }
    let cfg = DriveConfig {
        media,
        model: dev.prop("model").map(String::from),
        serial: dev.prop("serial").map(String::from),
        wwn,
        physical_block_size: pbs.min(u32::MAX as u64) as u32,
        geometry,
        translation,
    };
    let drive = devices::ide::Drive::new(cfg, (bus * 2 + unit) as u32, unit == 1).map_err(err)?;
    lock(&lock(&ide).channel(bus))
        .attach(unit, drive)
        .map_err(err)?;
    let path = format!("/pci@i0cf8/ide@{IDE_SLOT},{IDE_FUNCTION}/drive@{bus}/disk@{unit}");
    match (
        parse_num(dev, "lcyls")?,
        parse_num(dev, "lheads")?,
        parse_num(dev, "lsecs")?,
    ) {
        (None, None, None) => {}
        // The BIOS's INT 13h geometry: at most 1024 cylinders, 255 heads
        // and 63 sectors (QEMU's limits for lchs).
        (Some(c @ 1..=1024), Some(h @ 1..=255), Some(s @ 1..=63)) if !is_cd => ctx
            .boot_order
            .register_geometry(path.clone(), c as u32, h as u32, s as u32),
        _ => {
            return Err(err(
                "lcyls (1-1024), lheads (1-255) and lsecs (1-63) must be given together, on a disk"
                    .into(),
            ))
        }
    }
    if let Some(idx) = parse_num(dev, "bootindex")? {
        ctx.boot_order.register(idx as u32, path).map_err(err)?;
    }
    Ok(())
}

/// Disk types, geometry and translation in CMOS, as QEMU's `pc` sets them.
pub fn fill_cmos(ide: &Arc<Mutex<PiixIde>>, cmos: &mut Cmos) {
    let info = |bus: usize, unit: usize| {
        let ch = lock(ide).channel(bus);
        let c = lock(&ch);
        c.drive(unit)
            .filter(|d| !d.is_atapi())
            .map(|d| (d.geometry, d.translation))
    };
    let hd0 = info(0, 0);
    let hd1 = info(0, 1);
    cmos.set(
        0x12,
        if hd0.is_some() { 0xf0 } else { 0 } | if hd1.is_some() { 0x0f } else { 0 },
    );
    for (base, type_reg, hd) in [(0x1b, 0x19, hd0), (0x24, 0x1a, hd1)] {
        let Some((g, _)) = hd else { continue };
        cmos.set(type_reg, 47); // user-defined type
        let c = g.cyls.min(65535) as u16;
        let bytes = [
            c as u8,
            (c >> 8) as u8,
            g.heads as u8,
            0xff,
            0xff,
            0xc0 | if g.heads > 8 { 0x08 } else { 0 },
            c as u8,
            (c >> 8) as u8,
            g.secs as u8,
        ];
        for (i, b) in bytes.iter().enumerate() {
            cmos.set(base + i as u8, *b);
        }
    }
    let mut trans = 0u8;
    for pos in 0..4 {
        if let Some((_, t)) = info(pos / 2, pos % 2) {
            trans |= t.cmos_bits() << (2 * pos);
        }
    }
    cmos.set(0x39, trans);
}
