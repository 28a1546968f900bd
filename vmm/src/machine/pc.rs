//! The `pc` machine: i440FX + PIIX3, as QEMU's `pc` lays it out.
//!
//! | where | what |
//! |---|---|
//! | 00:00.0 | i440FX host bridge (8086:1237) |
//! | 00:01.0 | PIIX3 ISA bridge (8086:7000) |
//! | 00:01.1 | PIIX3 IDE (8086:7010), legacy ports 0x1f0/0x3f6 (IRQ 14) and 0x170/0x376 (IRQ 15) |
//! | 00:01.3 | PIIX4 PM (8086:7113), PMBASE set by firmware, SCI on IRQ 9 |
//! | 0x70-0x71 | RTC/CMOS, IRQ 8 |
//! | 0x60, 0x64 | i8042, IRQ 1 and 12 |
//! | 0x92 | port A (A20, reset) |
//! | 0xb2-0xb3 | APM control/status |
//! | 0x3f8, 0x2f8, 0x3e8, 0x2e8 | 16550 UARTs (COM1-4), IRQ 4/3/4/3 |
//! | 0x4d0-0x4d1 | ELCR (in-kernel under KVM) |
//! | 0x00-0x0f, 0xc0-0xdf, 0x80-0x8f | ISA DMA (two 8237A) and its page registers |
//! | 0x3f0-0x3f5, 0x3f7 | floppy controller (i82078), IRQ 6, DMA 2, bus `floppy-bus.0` |
//! | 0x510-0x51b | fw_cfg with DMA |
//! | 0xcf8-0xcff | PCI config mechanism #1, reset control at 0xcf9 |
//! | 0xe9 (or `-global isa-debugcon.iobase=`) | isa-debugcon |
//!
//! The PIC, IOAPIC, LAPICs and PIT are KVM's in-kernel ones; they are not
//! built here.
//!
//! Buses for `-device`: `pci.0`, `ide.0`/`ide.1` (two units each) and
//! `floppy-bus.0`. `-drive if=ide` becomes `ide-hd`/`ide-cd` on `ide.N`,
//! `if=floppy` a `floppy`, `if=virtio` a `virtio-blk-pci`.

use std::sync::{Arc, Mutex};

use block::drive::{DriveSpec, Interface, Media};
use devices::bootorder::BootOrder;
use devices::bus::{Bus, SharedDevice};
use devices::chipset::{
    i440fx::I440fx,
    pcihp::{PciHotplug, PCIHP_BASE, PCIHP_LEN},
    piix3::Elcr,
    piix3::Piix3,
    piix4_pm::{Piix4Pm, GPE0_BASE, GPE0_LEN},
    pirq::{self, PirqRouter},
};
use devices::irq::IrqLine;
use devices::legacy::{
    cmos::Cmos,
    debugcon::Debugcon,
    fw_cfg,
    fw_cfg::FwCfg,
    i8042::I8042,
    isa_dma::{Dma1, Dma2, DmaPages, IsaDma},
    port92::Port92,
    serial::Uart,
};
use devices::pci::msix::MsiSender;
use devices::pci::{host::PciHost, Ecam, PciBus, PciRegions, Space};
use devices::GuestMem;

use super::{piix_ide, Board, ChipsetKind, Host, Hotplug, Machine, MachineError, Memory};
use crate::boot;
use crate::config::MachineConfig;
use crate::device::{self, AttachCtx, BusKind, Buses, DeviceSpec, PciIntx, Port, PropValue};
use crate::memory::Layout;
use crate::migration::VmState;
use crate::storage::Storage;
use devices::virtio::event_loop::IoThreads;

pub const SERIAL_PORTS: [(u64, u32); 4] = [(0x3f8, 4), (0x2f8, 3), (0x3e8, 4), (0x2e8, 3)];
pub const SCI_IRQ: u32 = 9;

/// MSI messages as plain memory writes: what QEMU's qtest virtio tests
/// observe (they point the MSI-X address at RAM and poll it).
struct RamMsi(GuestMem);

impl MsiSender for RamMsi {
    fn send(&self, addr: u64, data: u32) {
        use vm_memory::{Bytes, GuestAddress};
        let _ = self.0.write_obj(data, GuestAddress(addr));
    }
}

/// Where the board's devices send MSI messages.
pub(super) fn msi_sender(host: &Host, ram: &GuestMem) -> Arc<dyn MsiSender> {
    host.msi
        .clone()
        .unwrap_or_else(|| Arc::new(RamMsi(ram.clone())))
}

pub(super) fn shared<T: devices::BusDevice + 'static>(d: T) -> Arc<Mutex<T>> {
    Arc::new(Mutex::new(d))
}

pub(super) fn add_io(
    bus: &mut Bus,
    base: u64,
    len: u64,
    dev: SharedDevice,
    what: &str,
) -> Result<(), MachineError> {
    bus.insert(base, len, dev)
        .map_err(|_| MachineError::Config(format!("{what}: I/O port {base:#x} is already in use")))
}

/// PCI INTx through the PIIX3 PIRQ router.
impl PciIntx for Arc<PirqRouter> {
    fn line(&self, slot: u8, pin: u8) -> Arc<dyn IrqLine> {
        PirqRouter::line(self, slot, pin)
    }
}

/// Whether `v` is a machine version (`7.2`): every versioned type is the
/// same board here, Strata has no compatibility properties to change
/// between them.
pub(super) fn is_version(v: &str) -> bool {
    v.split_once('.').is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && a.bytes().all(|c| c.is_ascii_digit())
            && b.bytes().all(|c| c.is_ascii_digit())
    })
}

/// QEMU's `pc` (`pc-i440fx-*`).
pub struct PcBoard;
pub static PC: PcBoard = PcBoard;

/// QEMU's newest `pc-i440fx-*` version, which `pc` stands for.
const VERSION: &str = "7.2";

impl Board for PcBoard {
    fn name(&self) -> &'static str {
        "pc"
    }
    fn desc(&self) -> &'static str {
        "Standard PC (i440FX + PIIX, 1996)"
    }
    fn matches(&self, name: &str) -> bool {
        name == "pc" || name.strip_prefix("pc-i440fx-").is_some_and(is_version)
    }
    fn help_aliases(&self) -> Vec<String> {
        vec![format!("pc-i440fx-{VERSION}")]
    }
    fn drive_device(&self, drive: &DriveSpec) -> Result<Option<DeviceSpec>, String> {
        drive_device(drive, 2)
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

/// What the device half of a `-drive` becomes on a PC board with
/// `ide_buses` IDE buses named `ide.N`: `if=ide` an `ide-hd`/`ide-cd` on
/// `ide.BUS` at `unit=UNIT`, `if=virtio` a `virtio-blk-pci`.
pub(super) fn drive_device(
    drive: &DriveSpec,
    ide_buses: u32,
) -> Result<Option<DeviceSpec>, String> {
    let Some(d) = &drive.device else {
        return Ok(None);
    };
    let mut props = vec![("drive", PropValue::Str(drive.id.clone()))];
    if let Some(s) = &d.serial {
        props.push(("serial", PropValue::Str(s.clone())));
    }
    let origin = format!("-drive {}", drive.text);
    let (ty, bus) = match (d.interface, d.media) {
        (Interface::Ide, media) => {
            if d.bus >= ide_buses {
                return Err(format!(
                    "machine type does not support if=ide,bus={},unit={}",
                    d.bus, d.unit
                ));
            }
            props.push(("unit", PropValue::Uint(d.unit as u64)));
            if media == Media::Cdrom {
                // -drive's geometry is for disks; ide-cd has none.
                ("ide-cd", Some(format!("ide.{}", d.bus)))
            } else {
                if let Some([c, h, s]) = d.chs {
                    props.push(("cyls", PropValue::Uint(c as u64)));
                    props.push(("heads", PropValue::Uint(h as u64)));
                    props.push(("secs", PropValue::Uint(s as u64)));
                }
                if let Some(t) = &d.trans {
                    let def = device::ide::IDE_HD.prop("bios-chs-trans");
                    let v = def.ok_or("bios-chs-trans")?.ty.parse("trans", t)?;
                    props.push(("bios-chs-trans", v));
                }
                ("ide-hd", Some(format!("ide.{}", d.bus)))
            }
        }
        (Interface::Floppy, _) => {
            if d.bus > 0 {
                return Err(format!(
                    "machine type does not support if=floppy,bus={},unit={}",
                    d.bus, d.unit
                ));
            }
            // A floppy drive has no serial number.
            props.retain(|(k, _)| *k != "serial");
            props.push(("unit", PropValue::Uint(d.unit as u64)));
            ("floppy", Some("floppy-bus.0".to_string()))
        }
        // An HBA (`-device lsi53c895a`, `virtio-scsi-pci`) takes the
        // drives of its bus number as it is built (QEMU's legacy SCSI
        // command line); what none took is refused afterwards.
        (Interface::Scsi, _) => return Ok(None),
        (Interface::Virtio, _) => {
            if let Some(a) = &d.addr {
                props.push(("addr", device::PropType::PciDevfn.parse("addr", a)?));
            }
            ("virtio-blk-pci", None)
        }
        (iface, _) => {
            return Err(format!(
                "machine type does not support if={},bus={},unit={}",
                iface.name(),
                d.bus,
                d.unit
            ))
        }
    };
    let spec = DeviceSpec::new(ty, bus, props, origin)?;
    Ok(Some(spec))
}

/// A PCI address property for a device the board builds itself.
fn devfn(addr: &str) -> Result<PropValue, MachineError> {
    device::PropType::PciDevfn
        .parse("addr", addr)
        .map_err(MachineError::Config)
}

/// Builds the `pc` with memory already allocated and the firmware mapped.
fn build(
    cfg: &MachineConfig,
    host: Host,
    storage: &Storage,
    mem: Memory,
) -> Result<Machine, MachineError> {
    let direct = boot::is_direct(cfg);
    let mut io = Bus::new();
    let mut buses = Buses::new();

    // PCI.
    let pci = PciBus::new();
    buses.register("pci.0", BusKind::Pci, 0, Port::Pci(pci.clone()));
    let err = MachineError::Config;
    pci.add(0, 0, Arc::new(Mutex::new(I440fx::new())))
        .map_err(err)?;
    buses.occupy("pci.0", 0, "i440FX");
    let pirq = PirqRouter::new(host.irq.clone(), 4, pirq::piix_swizzle, None);
    let mut piix3 = Piix3::with_router(pirq.clone());
    let mut pm = Piix4Pm::new(
        host.clock.clone(),
        host.irq.line(SCI_IRQ),
        host.system.clone(),
    );
    if direct {
        // No firmware will program the chipset: do what SeaBIOS does, so
        // that the ACPI and MP tables describe the machine as it is.
        boot::init_chipset(&mut piix3, &mut pm);
    }
    pci.add(1, 0, Arc::new(Mutex::new(piix3))).map_err(err)?;
    buses.occupy("pci.0", 1 << 3, "PIIX3");
    let ide = piix_ide::create(&mut io, &pci, &mut buses, &mem.ram, host.irq.as_ref())?;
    if direct {
        boot::init_ide(&mut devices::bus::lock(&ide));
    }
    add_io(&mut io, 0xb2, 2, shared(pm.apm()), "APM")?;
    add_io(
        &mut io,
        GPE0_BASE as u64,
        GPE0_LEN,
        shared(pm.gpe0()),
        "GPE0",
    )?;
    let power_button = pm.regs();
    // Every slot but the host bridge's and the chipset's can be hot-plugged.
    let pcihp = shared(PciHotplug::new(!0b11, pm.regs(), host.system.clone()));
    add_io(
        &mut io,
        PCIHP_BASE as u64,
        PCIHP_LEN,
        pcihp.clone(),
        "ACPI PCI hotplug",
    )?;
    pci.add(1, 3, Arc::new(Mutex::new(pm))).map_err(err)?;
    buses.occupy("pci.0", 1 << 3 | 3, "PIIX4_PM");
    let chipset = Chipset {
        kind: ChipsetKind::I440fx,
        pci,
        intx: Arc::new(pirq),
        power_button,
        pcihp: Some(pcihp),
        ecam: None,
        fdc: true,
        vmstate: {
            let mut v = VmState::default();
            v.block("the pc machine's chipset (i440FX, PIIX3 and its IDE, PIIX4 PM) does not save its state yet: q35 machines migrate");
            v
        },
    };
    assemble(&PC, cfg, host, storage, mem, io, buses, chipset, |cmos| {
        piix_ide::fill_cmos(&ide, cmos)
    })
}

/// The chipset half of a PC board, built by the board, as [`assemble`]
/// takes it.
pub(super) struct Chipset {
    pub kind: ChipsetKind,
    pub pci: Arc<PciBus>,
    pub intx: Arc<dyn PciIntx + Send + Sync>,
    pub power_button: Arc<Mutex<devices::chipset::acpi_pm::PmRegs>>,
    /// The ACPI PCI hotplug controller, on a board whose root bus has one.
    pub pcihp: Option<Arc<Mutex<PciHotplug>>>,
    /// The PCIe ECAM window, on a board with one.
    pub ecam: Option<Arc<Ecam>>,
    /// Whether the board has the ISA floppy controller.
    pub fdc: bool,
    /// The chipset's migration sections (or why it cannot migrate).
    pub vmstate: VmState,
}

/// What every PC board has around its chipset: PCI decoding on the I/O and
/// memory buses, the legacy ISA devices, the devices of `-drive` and
/// `-device`, fw_cfg with the firmware's tables, the CMOS and the
/// direct-boot entry. `cmos_late` fills what the board's own devices put
/// in the CMOS.
#[allow(clippy::too_many_arguments)]
pub(super) fn assemble(
    board: &dyn Board,
    cfg: &MachineConfig,
    host: Host,
    storage: &Storage,
    mem: Memory,
    mut io: Bus,
    mut buses: Buses,
    chipset: Chipset,
    cmos_late: impl FnOnce(&mut Cmos),
) -> Result<Machine, MachineError> {
    let Memory { layout, ram, rom } = mem;
    let direct = boot::is_direct(cfg);
    let msi = msi_sender(&host, &ram);
    let mut mmio = Bus::memory();
    let pci = chipset.pci.clone();
    // Every device built here is registered for migration as it is made;
    // what cannot migrate is named as a blocker.
    let mut vmstate = chipset.vmstate;
    let pci_host = shared(PciHost::new(pci.clone(), host.system.clone()));
    vmstate.register("pci-host@0xcf8", pci_host.clone());
    add_io(&mut io, 0xcf8, 8, pci_host, "PCI host")?;
    io.set_fallback(Arc::new(PciRegions {
        bus: pci.clone(),
        space: Space::Io,
        ecam: None,
    }));
    mmio.set_fallback(Arc::new(PciRegions {
        bus: pci.clone(),
        space: Space::Mem,
        ecam: chipset.ecam.clone(),
    }));

    // Legacy ISA devices.
    let elcr = shared(Elcr::default());
    vmstate.register("elcr", elcr.clone());
    add_io(&mut io, 0x4d0, 2, elcr, "ELCR")?;
    let isa_dma = Arc::new(Mutex::new(IsaDma::new(ram.clone())));
    vmstate.register("isa-dma", isa_dma.clone());
    add_io(
        &mut io,
        0x00,
        0x10,
        shared(Dma1(isa_dma.clone())),
        "ISA DMA",
    )?;
    add_io(
        &mut io,
        0x80,
        0x10,
        shared(DmaPages(isa_dma.clone())),
        "ISA DMA",
    )?;
    add_io(
        &mut io,
        0xc0,
        0x20,
        shared(Dma2(isa_dma.clone())),
        "ISA DMA",
    )?;
    let fdc = if chipset.fdc {
        let f = device::fdc::create_fdc(&mut io, &mut buses, host.irq.as_ref(), isa_dma)
            .map_err(MachineError::Config)?;
        if host.guest_code {
            // The chip's milliseconds, enough for SeaBIOS to start waiting
            // (devices::fdc::i82078::FdcPorts).
            devices::bus::lock(&f).set_irq_latency(std::time::Duration::from_millis(2));
        }
        vmstate.block("the floppy controller (isa-fdc) does not save its state yet");
        Some(f)
    } else {
        None
    };
    let cmos = shared(Cmos::new(
        host.rtc_start,
        host.clock.clone(),
        host.irq.line(8),
    ));
    vmstate.register("mc146818rtc", cmos.clone());
    add_io(&mut io, 0x70, 2, cmos.clone(), "RTC")?;
    let kbd = shared(I8042::new(
        host.irq.line(1),
        host.irq.line(12),
        host.system.clone(),
    ));
    // Port 0x64 forwards to the same controller.
    vmstate.register("i8042", kbd.clone());
    add_io(&mut io, 0x60, 1, kbd.clone(), "i8042")?;
    add_io(
        &mut io,
        0x64,
        1,
        Arc::new(Mutex::new(KbdStatusPort(kbd))),
        "i8042",
    )?;
    let port92 = shared(Port92::new(host.system.clone()));
    vmstate.register("port92", port92.clone());
    add_io(&mut io, 0x92, 1, port92, "port 92")?;
    if host.serial_out.len() > SERIAL_PORTS.len() {
        return Err(MachineError::Config(format!(
            "-serial: at most {} serial ports are supported",
            SERIAL_PORTS.len()
        )));
    }
    let mut uarts = Vec::new();
    for (out, &(base, irq)) in host.serial_out.into_iter().zip(SERIAL_PORTS.iter()) {
        let u = shared(Uart::new(host.irq.line(irq), out));
        vmstate.register(format!("serial@{base:#x}"), u.clone());
        add_io(&mut io, base, 8, u.clone(), "-serial")?;
        uarts.push(u);
    }
    if let Some(out) = host.debugcon_out {
        let iobase = device::debugcon::iobase(&cfg.globals).map_err(MachineError::Config)?;
        // Output only: nothing to carry over.
        vmstate.register(
            format!("debugcon@{iobase:#x}"),
            Arc::new(devices::migration::Stateless),
        );
        add_io(&mut io, iobase, 1, shared(Debugcon::new(out)), "-debugcon")?;
    }

    let mut boot_order = BootOrder::new();
    boot_order.set_strict(cfg.boot.strict);
    let msi = msi.clone();
    let mut iothreads = match &host.manual_loops {
        Some(into) => IoThreads::manual(&cfg.iothreads, into.clone()),
        None => IoThreads::new(&cfg.iothreads),
    };
    for (id, ns) in &cfg.iothread_poll_max_ns {
        iothreads.set_poll_max_ns(id, *ns);
    }
    let mut ctx = AttachCtx {
        io: &mut io,
        mmio: &mut mmio,
        buses: &mut buses,
        ram: &ram,
        irq: host.irq.as_ref(),
        intx: chipset.intx.as_ref(),
        boot_order: &mut boot_order,
        msi,
        ioevents: host.ioevents.clone(),
        iothreads: &mut iothreads,
        cpus: cfg.cpus,
        storage,
        globals: &cfg.globals,
        used_drives: Vec::new(),
        events: host.events.clone(),
        realized: Vec::new(),
        removable: None,
        claimed: None,
        hotplugged: false,
        detach: None,
        chardevs: &cfg.chardevs,
        timers: host.timers.clone(),
    };
    // `-usb`: the board's own USB controllers, as QEMU's boards add them:
    // the PIIX3's UHCI function (01.2) on `pc`; on q35 the ICH9's EHCI
    // (1d.7) with three UHCI companions (1d.0-1d.2) on its six ports.
    if cfg.usb {
        let specs: Vec<(&str, Vec<(&str, PropValue)>)> = match chipset.kind {
            ChipsetKind::I440fx => vec![("piix3-usb-uhci", vec![("addr", devfn("1.2")?)])],
            _ => {
                let mf = || ("multifunction", PropValue::Bool(true));
                let companion =
                    |f: &str, first: u64| -> Result<Vec<(&str, PropValue)>, MachineError> {
                        Ok(vec![
                            ("addr", devfn(f)?),
                            mf(),
                            ("masterbus", PropValue::Str("usb-bus.0".into())),
                            ("firstport", PropValue::Uint(first)),
                        ])
                    };
                vec![
                    ("ich9-usb-ehci1", vec![("addr", devfn("1d.7")?), mf()]),
                    ("ich9-usb-uhci1", companion("1d.0", 0)?),
                    ("ich9-usb-uhci2", companion("1d.1", 2)?),
                    ("ich9-usb-uhci3", companion("1d.2", 4)?),
                ]
            }
        };
        for (ty, props) in specs {
            let spec =
                DeviceSpec::new(ty, None, props, "-usb".into()).map_err(MachineError::Config)?;
            device::realize(&mut ctx, &spec).map_err(MachineError::Config)?;
        }
    }
    // The devices of `-drive if=...` first, as QEMU's board init creates
    // them before the `-device`s.
    for d in storage.drives() {
        if let Some(spec) = board
            .drive_device(d)
            .map_err(|e| MachineError::Config(format!("-drive {}: {e}", d.text)))?
        {
            device::realize(&mut ctx, &spec).map_err(MachineError::Config)?;
        }
    }
    if fdc.is_some() {
        for spec in device::fdc::global_drives(&cfg.globals).map_err(MachineError::Config)? {
            device::realize(&mut ctx, &spec).map_err(MachineError::Config)?;
        }
    }
    for spec in &cfg.devices {
        device::realize(&mut ctx, spec).map_err(MachineError::Config)?;
    }
    device::scsi::check_legacy_drives(&ctx, storage).map_err(MachineError::Config)?;
    let devices = std::mem::take(&mut ctx.realized);
    let used_drives = std::mem::take(&mut ctx.used_drives);
    let msi = ctx.msi.clone();
    let hotplug = Some(Hotplug {
        buses,
        intx: chipset.intx.clone(),
        irq: host.irq.clone(),
        msi,
        ioevents: host.ioevents.clone(),
        iothreads,
        used_drives,
        events: host.events.clone(),
        ram: ram.clone(),
        cpus: cfg.cpus,
        pci: pci.clone(),
        pcihp: chipset.pcihp,
        timers: host.timers.clone(),
    });
    let fw_cfg = shared(FwCfg::new(Some(ram.clone())));
    vmstate.register("fw_cfg", fw_cfg.clone());
    {
        let mut f = fw_cfg.lock().unwrap();
        fill_fw_cfg(&mut f, cfg, &layout, &boot_order);
        if !direct {
            // Firmware installs Strata's ACPI tables through the loader.
            let t = crate::acpi::build(&crate::acpi::AcpiConfig::new(cfg, &layout, chipset.kind));
            f.add_file(crate::acpi::RSDP_FILE, t.rsdp.clone());
            f.add_file(crate::acpi::TABLES_FILE, t.tables.clone());
            f.add_file(crate::acpi::LOADER_FILE, t.loader());
            // SeaBIOS installs these SMBIOS tables instead of its own.
            let s =
                crate::smbios::for_machine(cfg, &layout, false).map_err(MachineError::Config)?;
            f.add_file(crate::smbios::TABLES_FILE, s.tables.clone());
            f.add_file(crate::smbios::ANCHOR_FILE, s.anchor(0));
            if cfg.kernel.is_some() {
                // -kernel through the firmware: an option ROM loads it.
                let fb = boot::firmware::prepare(cfg, &layout, &ram)?;
                for (key, data) in fb.items.iter() {
                    f.add_item(*key, data.clone());
                }
                f.add_file(&fb.rom_file(), fb.rom.clone());
                let mut rest = boot_order.fw_cfg_file();
                if cfg.boot.strict && rest.is_empty() {
                    rest = b"HALT\0".to_vec();
                }
                f.add_file("bootorder", fb.bootorder_with(&rest));
            }
        }
    }
    add_io(
        &mut io,
        fw_cfg::IO_BASE,
        fw_cfg::IO_LEN,
        fw_cfg.clone(),
        "fw_cfg",
    )?;
    fill_cmos(&mut cmos.lock().unwrap(), cfg, &layout);
    cmos_late(&mut cmos.lock().unwrap());
    if let Some(f) = &fdc {
        fill_cmos_floppy(&mut cmos.lock().unwrap(), &devices::bus::lock(f));
    }
    let boot_entry = if direct {
        Some(boot::setup(cfg, &ram, &layout, chipset.kind)?)
    } else {
        None
    };

    Ok(Machine {
        io,
        mmio,
        ram,
        rom,
        layout,
        uarts,
        boot_entry,
        cpus: cfg.cpus,
        pci: Some(pci),
        power_button: Some(chipset.power_button),
        devices: Mutex::new(devices),
        hotplug: hotplug.map(Mutex::new),
        timers: host.timers.clone(),
        vmstate,
    })
}

/// Port 0x64 is the same controller as port 0x60; the bus wants one range
/// per device, so this forwards with the offset the controller expects.
struct KbdStatusPort(Arc<Mutex<I8042>>);

impl devices::BusDevice for KbdStatusPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        devices::bus::lock(&self.0).read(4, data)
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        devices::bus::lock(&self.0).write(4, data)
    }
}

fn fill_fw_cfg(f: &mut FwCfg, cfg: &MachineConfig, layout: &Layout, boot: &BootOrder) {
    f.add_item(fw_cfg::KEY_RAM_SIZE, cfg.mem_size.to_le_bytes().to_vec());
    // Strata has no display device, so firmware output must go to serial:
    // tell SeaBIOS to run its serial console whatever `-display` says.
    f.add_item(fw_cfg::KEY_NOGRAPHIC, 1u16.to_le_bytes().to_vec());
    f.add_item(
        fw_cfg::KEY_NB_CPUS,
        (cfg.cpus as u16).to_le_bytes().to_vec(),
    );
    f.add_item(
        fw_cfg::KEY_MAX_CPUS,
        (cfg.max_cpus as u16).to_le_bytes().to_vec(),
    );
    f.add_item(0x0e, (cfg.boot.menu as u16).to_le_bytes().to_vec()); // BOOT_MENU
    f.add_file("etc/e820", layout.e820_file());
    let mut b = boot.fw_cfg_file();
    if cfg.boot.strict && b.is_empty() {
        b = b"HALT\0".to_vec();
    }
    f.add_file("bootorder", b);
    f.add_file("bios-geometry", boot.bios_geometry_file());
    let fail_wait = cfg.boot.reboot_timeout.unwrap_or(u32::MAX);
    f.add_file("etc/boot-fail-wait", fail_wait.to_le_bytes().to_vec());
    f.add_file(
        "etc/show-boot-menu",
        (cfg.boot.menu as u16).to_le_bytes().to_vec(),
    );
    if let Some(ms) = cfg.boot.splash_time {
        f.add_file(
            "etc/boot-menu-wait",
            (ms.min(0xffff) as u16).to_le_bytes().to_vec(),
        );
    }
}

/// The floppy drives in CMOS (PC/AT CMOS map): their types in 0x10, and
/// the equipment byte's "diskette drives present" bit and count (bits 0
/// and 7:6).
fn fill_cmos_floppy(c: &mut Cmos, fdc: &devices::fdc::i82078::Fdc) {
    c.set(0x10, fdc.cmos_drive_types());
    let n = fdc.drive_count() as u8;
    if n > 0 {
        c.set(0x14, c.get(0x14) | 1 | (n - 1) << 6);
    }
}

/// Boot device letter to the CMOS code SeaBIOS expects.
fn boot_code(c: char) -> u8 {
    match c {
        'a' | 'b' => 1,
        'c' => 2,
        'd' => 3,
        'n' => 4,
        _ => 0,
    }
}

pub fn fill_cmos(c: &mut Cmos, cfg: &MachineConfig, layout: &Layout) {
    const KIB: u64 = 1024;
    const MIB: u64 = 1 << 20;
    let base = (layout.below_4g / KIB).min(640);
    c.set(0x15, base as u8);
    c.set(0x16, (base >> 8) as u8);
    let ext = (cfg.mem_size.saturating_sub(MIB) / KIB).min(0xffff);
    for reg in [0x17, 0x30] {
        c.set(reg, ext as u8);
        c.set(reg + 1, (ext >> 8) as u8);
    }
    let above16 = (layout.below_4g.saturating_sub(16 * MIB) / (64 * KIB)).min(0xffff);
    c.set(0x34, above16 as u8);
    c.set(0x35, (above16 >> 8) as u8);
    let above4g = layout.above_4g / (64 * KIB);
    c.set(0x5b, above4g as u8);
    c.set(0x5c, (above4g >> 8) as u8);
    c.set(0x5d, (above4g >> 16) as u8);
    c.set(0x5f, (cfg.cpus - 1) as u8);
    // Equipment byte: FPU present, PS/2 mouse.
    c.set(0x14, 0x06);
    let order: Vec<u8> = cfg
        .boot
        .once
        .as_deref()
        .unwrap_or(&cfg.boot.order)
        .chars()
        .map(boot_code)
        .collect();
    let at = |i: usize| order.get(i).copied().unwrap_or(0);
    c.set(0x3d, at(0) | (at(1) << 4));
    // Bit 0 of 0x38 disables the floppy boot-signature check.
    c.set(0x38, at(2) << 4 | 1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use block::drive::DriveTable;

    /// Device type, bus and unit a `-drive` became.
    type Placed = Option<(String, Option<String>, Option<u64>)>;

    /// What `-drive`s become on `pc` (QEMU's documentation examples).
    #[test]
    fn drives_become_pc_devices() {
        let mut t = DriveTable::with_max_devs(|i| PC.units_per_bus(i));
        let mut dev = |text: &str| -> Result<Placed, String> {
            let d = t.parse_drive(text).map_err(|e| e.to_string())?;
            Ok(PC.drive_device(&d)?.map(|s| {
                (
                    s.ty.name.to_string(),
                    s.bus.clone(),
                    match s.props.get("unit") {
                        Some(PropValue::Uint(u)) => Some(*u),
                        _ => None,
                    },
                )
            }))
        };
        let ide = |ty: &str, bus: u32, unit: u64| {
            Some((ty.to_string(), Some(format!("ide.{bus}")), Some(unit)))
        };
        assert_eq!(dev("file=a,index=0,media=disk"), Ok(ide("ide-hd", 0, 0)));
        assert_eq!(dev("file=a,index=2,media=cdrom"), Ok(ide("ide-cd", 1, 0)));
        assert_eq!(
            dev("file=a,index=3,cyls=10,heads=16,secs=63"),
            Ok(ide("ide-hd", 1, 1))
        );
        assert_eq!(
            dev("file=a,if=virtio"),
            Ok(Some(("virtio-blk-pci".to_string(), None, None)))
        );
        assert_eq!(dev("file=a,if=none"), Ok(None));
        assert_eq!(
            dev("file=a,if=ide,index=4"),
            Err("machine type does not support if=ide,bus=2,unit=0".into())
        );
        // Left for a SCSI HBA to take (device::scsi::legacy_drives).
        assert_eq!(dev("file=a,if=scsi"), Ok(None));
        assert_eq!(
            dev("file=a,if=floppy"),
            Ok(Some((
                "floppy".to_string(),
                Some("floppy-bus.0".to_string()),
                Some(0)
            )))
        );
        assert_eq!(
            dev("file=a,if=floppy,index=1"),
            Ok(Some((
                "floppy".to_string(),
                Some("floppy-bus.0".to_string()),
                Some(1)
            )))
        );
        assert_eq!(
            dev("file=a,if=ide,index=1,trans=odd"),
            Err("Parameter 'trans' does not accept value 'odd'".into())
        );
    }
}
