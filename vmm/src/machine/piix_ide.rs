//! The PIIX3 IDE function as the `pc` board builds it: at 00:01.1 (present
//! even without drives, as on QEMU's `pc`), its legacy ports, its two
//! buses `ide.0` and `ide.1` for `ide-hd`/`ide-cd`, and what the BIOS
//! learns from CMOS.
//!
//! CMOS as QEMU's `pc` reports disks (pc_cmos_init_late): 0x12/0x19/0x1a
//! drive types for ide0's master and slave, their geometry at 0x1b and
//! 0x24, and the translation of all four positions in 0x39 (SeaBIOS reads
//! it in `get_translation`).

use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::ide::{DriveConfig, PiixIde, SharedChannel, LEGACY};
use devices::legacy::cmos::Cmos;

use super::MachineError;
use crate::device::bus::{BusKind, Buses, IdeBus, Port};

pub const IDE_SLOT: u8 = 1;
pub const IDE_FUNCTION: u8 = 1;

/// One PIIX3 channel as an IDE bus.
struct Channel {
    bus: u32,
    channel: SharedChannel,
}

impl IdeBus for Channel {
    fn attach(&self, unit: u32, cfg: DriveConfig) -> Result<(), String> {
        let drive = devices::ide::Drive::new(cfg, self.drive_index(unit), unit == 1)?;
        lock(&self.channel).attach(unit as usize, drive)
    }
    fn boot_path(&self, unit: u32) -> String {
        format!(
            "/pci@i0cf8/ide@{IDE_SLOT},{IDE_FUNCTION}/drive@{}/disk@{unit}",
            self.bus
        )
    }
    fn drive_index(&self, unit: u32) -> u32 {
        self.bus * 2 + unit
    }
}

/// Creates the controller, registers its legacy ports and its buses.
pub fn create(
    io: &mut devices::bus::Bus,
    pci: &devices::pci::PciBus,
    buses: &mut Buses,
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
        let channel = lock(&ide).channel(bus);
        buses.register(
            &format!("ide.{bus}"),
            BusKind::Ide,
            2,
            Port::Ide(Arc::new(Channel {
                bus: bus as u32,
                channel,
            })),
        );
    }
    pci.add(IDE_SLOT, IDE_FUNCTION, ide.clone())
        .map_err(MachineError::Config)?;
    buses.occupy(
        "pci.0",
        (IDE_SLOT as u32) << 3 | IDE_FUNCTION as u32,
        "piix3-ide",
    );
    Ok(ide)
}

/// Disk types, geometry and translation in CMOS, as QEMU's `pc` sets them.
pub fn fill_cmos(ide: &Arc<Mutex<PiixIde>>, cmos: &mut Cmos) {
    let info = |bus: usize, unit: usize| {
        let ch = lock(ide).channel(bus);
        let c = lock(&ch);
        c.drive(unit)
            .map(|d| d.device())
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
