//! A fuzzing harness for the `pc` machine's guest-facing registers: it
//! builds the machine as the qtest accelerator does (no vCPU, a stepped
//! clock, a 64 KiB dummy firmware) with an IDE disk and CD-ROM, a
//! virtio-blk-pci disk, an AHCI HBA with a disk on port 0 and a 1.44 MB
//! floppy on the FDC (whose DMA goes through the 8237), maps the PCI
//! BARs as firmware would, and
//! interprets the input bytes as a sequence of port and MMIO accesses,
//! guest-memory writes (fw_cfg DMA descriptors, PRD tables, virtqueues),
//! clock steps and a few structured driver actions (virtio bring-up,
//! descriptor and avail-ring writes with a notify) that a byte-level
//! fuzzer would take long to find.
//!
//! Both `fuzz/fuzz_targets/pc_io.rs` (cargo fuzz) and the corpus test in
//! `vmm/tests/fuzz_corpus.rs` call [`pc_io`], so every corpus entry is also a
//! regular test. The property checked is the one DESIGN.md asks of every
//! device: no input panics, hangs, or touches memory outside the guest.
//!
//! The watchdog: the device event loops are manual (no thread; see
//! `devices::virtio::event_loop`), and after every operation the harness
//! polls them until they are idle. A loop still dispatching events after
//! [`LOOP_LIMIT`] polls with no new input is a device spinning on its own
//! notifications, and fails the run; so does an operation after which an
//! IDE channel stays busy with nothing in flight, one after which a
//! running virtio-blk queue has a request it neither used nor refused
//! (in the log), or one that makes the devices write more than
//! [`LOG_PER_OP`] bytes of warnings (a guest must not be able to flood
//! the host's log). Block I/O goes to `null-co`
//! nodes, which complete inline, so a whole run is single-threaded and
//! replays exactly.

use std::cell::Cell;
use std::sync::{Arc, Once};

use devices::clock::{Clock, ManualClock};
use devices::irq::{IrqChip, IrqLine, NoIrq};
use devices::system::NoSystem;
use devices::virtio::event_loop::ManualLoops;
use vm_memory::{Bytes, GuestAddress};

use crate::config::MachineConfig;
use crate::device::{DeviceArg, DeviceSpec};
use crate::machine::{self, Host, Machine};
use crate::memory::{self, Layout};
use crate::storage::Storage;

struct Lines;
impl IrqChip for Lines {
    fn line(&self, _gsi: u32) -> Arc<dyn IrqLine> {
        Arc::new(NoIrq)
    }
}

/// Polls of an event loop that may still find events after an operation
/// before the harness calls it a spin. A burst of requests needs a few
/// (notify, then completions); a device re-arming itself forever needs all.
pub const LOOP_LIMIT: usize = 64;

/// Bytes of `warn!`/`error!` output one operation may cause.
pub const LOG_PER_OP: usize = 4096;

thread_local! {
    /// Log bytes written on this thread: the whole machine runs on the
    /// harness's thread, and tests run harnesses on several threads.
    static LOGGED: Cell<usize> = const { Cell::new(0) };
}

/// Counts (and discards) what the devices log at warning level and above.
struct LogMeter;
impl log::Log for LogMeter {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let n = r.target().len() + r.args().to_string().len() + 8;
            LOGGED.with(|c| c.set(c.get() + n));
        }
    }
    fn flush(&self) {}
}

fn install_log_meter() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Another logger (a test binary's) may be installed already; then
        // the log bound is not checked, everything else still is.
        if log::set_logger(&LogMeter).is_ok() {
            log::set_max_level(log::LevelFilter::Warn);
        }
    });
}

/// Ports worth aiming at: every device the `pc` machine decodes, plus the
/// PM block where firmware usually puts PMBASE.
const PORTS: [u16; 60] = [
    0x60,
    0x64,
    0x70,
    0x71,
    0x92,
    0xb2,
    0xb3,
    0x3f8,
    0x3f9,
    0x3fa,
    0x3fb,
    0x3fc,
    0x3fd,
    0x4d0,
    0x4d1,
    0x510,
    0x511,
    0x514,
    0x518,
    0xcf8,
    0xcf9,
    0xcfc,
    0xcfe,
    0x608,
    // The floppy controller and ISA DMA (channel 2 and its page, the
    // flip-flop, mode, mask and master clear),
    0x3f0,
    0x3f2,
    0x3f4,
    0x3f5,
    0x3f5,
    0x3f7,
    0x04,
    0x05,
    0x08,
    0x0a,
    0x0b,
    0x0c,
    0x0d,
    0x81,
    0xc0,
    0xd4,
    // IDE: both channels' task files and controls,
    0x1f0,
    0x1f1,
    0x1f2,
    0x1f3,
    0x1f6,
    0x1f7,
    0x3f6,
    0x170,
    0x172,
    0x176,
    0x177,
    0x376,
    // BMIDE (BAR4, mapped by the harness),
    BMIDE,
    BMIDE + 2,
    BMIDE + 4,
    BMIDE + 8,
    // and virtio-blk's legacy interface: features, PFN, notify, status.
    VIRTIO_IO + 4,
    VIRTIO_IO + 8,
    VIRTIO_IO + 0x10,
    VIRTIO_IO + 0x12,
];

const RAM: u64 = 16 << 20;

/// Where the harness maps BARs, as firmware would.
const BMIDE: u16 = 0xc000;
const VIRTIO_IO: u16 = 0xc100;
const VIRTIO_MODERN: u64 = 0xfe00_0000;
const VIRTIO_MSIX: u64 = 0xfe01_0000;
const VIRTIO_SLOT: u32 = 4;
/// The AHCI HBA's ABAR: page 17 of the MMIO window the operations reach.
const AHCI_ABAR: u64 = 0xfe01_1000;
const AHCI_SLOT: u32 = 5;
/// The virtqueue the structured operations build: descriptor table at
/// VQ_BASE, the rings after it in the legacy layout (so the same layout
/// works through the legacy PFN register), buffers from VQ_BUFS.
const VQ_BASE: u64 = 0x10_0000;
const VQ_BUFS: u64 = 0x20_0000;

fn pci_write(pc: &Machine, dev: u32, func: u32, reg: u32, v: u32) {
    let addr = 0x8000_0000 | dev << 11 | func << 8 | reg;
    pc.io.write(0xcf8, &addr.to_le_bytes());
    pc.io.write(0xcfc, &v.to_le_bytes());
}

/// Builds the machine for one run; `None` if the host cannot (out of
/// memory), which is not a finding.
fn build(loops: &ManualLoops, clock: &Arc<ManualClock>) -> Option<Machine> {
    let mut cfg = MachineConfig {
        mem_size: RAM,
        ..MachineConfig::default()
    };
    // An IDE disk and CD-ROM and a virtio-blk disk on null-co backends, so
    // that commands reach the ATA, ATAPI, DMA and virtqueue paths instead
    // of stopping at "no drive".
    let mut table = block::drive::DriveTable::new();
    for d in [
        "if=ide,index=0,driver=null-co,size=1048576,read-zeroes=on",
        "if=ide,index=2,media=cdrom,driver=null-co,size=1048576,read-zeroes=on",
        "if=none,id=vd0,driver=null-co,size=1048576,read-zeroes=on",
        "if=none,id=sd0,driver=null-co,size=1048576,read-zeroes=on",
        "if=floppy,driver=null-co,size=1474560,read-zeroes=on",
    ] {
        cfg.drives.push(table.parse_drive(d).ok()?);
    }
    for d in [
        "virtio-blk-pci,drive=vd0,addr=4,num-queues=2",
        "ahci,id=sata,addr=5",
        "ide-hd,bus=sata.0,drive=sd0",
    ] {
        match DeviceSpec::parse(d) {
            Ok(DeviceArg::Spec(spec)) => cfg.devices.push(spec),
            _ => return None,
        }
    }
    let layout = Layout::new(RAM);
    let ram = memory::allocate_ram(&layout).ok()?;
    let rom = memory::map_bios(&[0xf4; 65536], &ram).ok()?;
    let host = Host {
        irq: Arc::new(Lines),
        system: Arc::new(NoSystem),
        clock: clock.clone(),
        timers: devices::timer::Timers::new(clock.clone()),
        serial_out: vec![Box::new(std::io::sink())],
        debugcon_out: Some(Box::new(std::io::sink())),
        rtc_start: 0,
        msi: None,
        ioevents: Arc::new(devices::virtio::NoIoEvents),
        events: Default::default(),
        manual_loops: Some(loops.clone()),
        guest_code: false,
    };
    let storage = Storage::open(&cfg).ok()?;
    let pc = machine::board(&cfg)
        .build_with(&cfg, host, &storage, machine::Memory { layout, ram, rom })
        .ok()?;
    // Firmware's part: BMIDE at BMIDE with I/O and bus mastering on, and
    // the virtio function's BARs with I/O, memory and bus mastering on.
    pci_write(&pc, 1, 1, 0x20, BMIDE as u32);
    pci_write(&pc, 1, 1, 0x04, 0x5);
    pci_write(&pc, VIRTIO_SLOT, 0, 0x10, VIRTIO_IO as u32);
    pci_write(&pc, VIRTIO_SLOT, 0, 0x14, VIRTIO_MSIX as u32);
    pci_write(&pc, VIRTIO_SLOT, 0, 0x20, VIRTIO_MODERN as u32);
    pci_write(&pc, VIRTIO_SLOT, 0, 0x24, 0);
    pci_write(&pc, VIRTIO_SLOT, 0, 0x04, 0x7);
    // The AHCI function's ABAR (BAR5) with memory and bus mastering on.
    pci_write(&pc, AHCI_SLOT, 0, 0x24, AHCI_ABAR as u32);
    pci_write(&pc, AHCI_SLOT, 0, 0x04, 0x6);
    Some(pc)
}

/// Polls the event loops until none has work, failing the run if that
/// takes more than [`LOOP_LIMIT`] rounds.
fn settle(loops: &ManualLoops, what: &str) {
    let loops = loops.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for _ in 0..LOOP_LIMIT {
        if loops.iter().map(|l| l.poll()).sum::<usize>() == 0 {
            return;
        }
    }
    panic!("watchdog: an event loop is still busy {LOOP_LIMIT} polls after {what}");
}

/// The legacy split-ring layout of a queue of `size` at VQ_BASE
/// (virtio 1.2, 2.7): avail after the table, used at the next page.
fn vq_layout(size: u16) -> (u64, u64, u64) {
    let avail = VQ_BASE + 16 * size as u64;
    let used = (avail + 6 + 2 * size as u64 + 4095) & !4095;
    (VQ_BASE, avail, used)
}

/// The structured driver actions.
struct Driver {
    /// Size of the queue the last bring-up configured (0: none yet).
    size: u16,
    queue: u16,
    /// Since the last bring-up, the input changed the transport's or the
    /// function's registers itself, so the queue may no longer be where
    /// the driver put it.
    dirty: bool,
    /// [`LOGGED`] at the last bring-up: a device that refuses a broken
    /// queue says so in the log.
    log_mark: usize,
    /// A request was made available by the last operation.
    pushed: bool,
}

impl Driver {
    /// Modern bring-up of queue `queue` (0 or 1) with `features` (the low
    /// word; VERSION_1 is always offered) and a queue of `size`.
    fn modern(&mut self, pc: &Machine, features: u32, size: u16, queue: u16) {
        let w8 = |off: u64, v: u8| pc.mmio.write(VIRTIO_MODERN + off, &[v]);
        let w16 = |off: u64, v: u16| pc.mmio.write(VIRTIO_MODERN + off, &v.to_le_bytes());
        let w32 = |off: u64, v: u32| pc.mmio.write(VIRTIO_MODERN + off, &v.to_le_bytes());
        for s in [0u8, 1, 3] {
            w8(0x14, s);
        }
        w32(0x08, 0);
        w32(0x0c, features);
        w32(0x08, 1);
        w32(0x0c, 1);
        w8(0x14, 0xb);
        let (desc, avail, used) = vq_layout(size);
        w16(0x16, queue);
        w16(0x18, size);
        for (off, a) in [(0x20, desc), (0x28, avail), (0x30, used)] {
            w32(off, a as u32);
            w32(off + 4, 0);
        }
        w16(0x1c, 1);
        w8(0x14, 0xf);
        let _ = pc.ram.write_slice(&[0u8; 4], GuestAddress(avail));
        let _ = pc.ram.write_slice(&[0u8; 4], GuestAddress(used));
        self.brought_up(size, queue);
    }

    /// Legacy bring-up through the I/O BAR: the queue size is the
    /// device's maximum.
    fn legacy(&mut self, pc: &Machine, features: u32, queue: u16) {
        let io = VIRTIO_IO as u64;
        pc.io.write(io + 0x12, &[0]);
        pc.io.write(io + 0x12, &[3]);
        pc.io.write(io + 4, &features.to_le_bytes());
        pc.io.write(io + 0x0e, &queue.to_le_bytes());
        let mut b = [0u8; 2];
        pc.io.read(io + 0x0c, &mut b);
        let size = u16::from_le_bytes(b);
        pc.io.write(io + 8, &((VQ_BASE >> 12) as u32).to_le_bytes());
        let (_, avail, used) = vq_layout(size);
        let _ = pc.ram.write_slice(&[0u8; 4], GuestAddress(avail));
        let _ = pc.ram.write_slice(&[0u8; 4], GuestAddress(used));
        pc.io.write(io + 0x12, &[7]);
        self.brought_up(size, queue);
    }

    fn brought_up(&mut self, size: u16, queue: u16) {
        (self.size, self.queue) = (size, queue);
        self.dirty = false;
        self.log_mark = LOGGED.with(|c| c.get());
    }

    /// After a push: unless the input disturbed the transport or the
    /// device refused the queue (and logged it), a running device has
    /// used every request made available. null-co completes inline and
    /// the loops are settled, so anything left is a request the device
    /// swallowed without answering.
    fn check_progress(&mut self, pc: &Machine, what: &str) {
        if !std::mem::take(&mut self.pushed) || self.dirty || self.size == 0 {
            return;
        }
        if LOGGED.with(|c| c.get()) != self.log_mark {
            return;
        }
        let mut st = [0u8];
        pc.io.read(VIRTIO_IO as u64 + 0x12, &mut st);
        if st[0] & 4 == 0 || st[0] & 0x40 != 0 {
            return;
        }
        let (_, avail, used) = vq_layout(self.size);
        let a: u16 = pc.ram.read_obj(GuestAddress(avail + 2)).unwrap_or(0);
        let u: u16 = pc.ram.read_obj(GuestAddress(used + 2)).unwrap_or(0);
        assert_eq!(
            a, u,
            "watchdog: virtio-blk queue {} made no progress after {what}: {a} available, {u} used",
            self.queue
        );
    }

    /// Writes descriptor `index`: buffer `slot` (4 KiB apart) of `len`
    /// bytes, `flags` (NEXT, WRITE, INDIRECT) and `next`.
    fn desc(&self, pc: &Machine, index: u16, slot: u16, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&(VQ_BUFS + ((slot as u64 & 0xff) << 12)).to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let table = if self.size == 0 { 1 } else { self.size };
        let at = VQ_BASE + 16 * (index % table) as u64;
        let _ = pc.ram.write_slice(&d, GuestAddress(at));
    }

    /// Makes `head` available and notifies through the modern notify
    /// address (or the legacy register when `legacy`).
    fn push(&mut self, pc: &Machine, head: u16, legacy: bool) {
        if self.size == 0 {
            return;
        }
        let (_, avail, _) = vq_layout(self.size);
        let idx: u16 = pc.ram.read_obj(GuestAddress(avail + 2)).unwrap_or(0);
        let slot = avail + 4 + 2 * (idx % self.size) as u64;
        let _ = pc.ram.write_obj(head, GuestAddress(slot));
        let _ = pc
            .ram
            .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2));
        if legacy {
            pc.io
                .write(VIRTIO_IO as u64 + 0x10, &self.queue.to_le_bytes());
        } else {
            pc.mmio.write(
                VIRTIO_MODERN + 0x3000 + 4 * self.queue as u64,
                &self.queue.to_le_bytes(),
            );
        }
    }
}

/// Whether the IDE channel at `ctl` (its control port) shows BSY.
fn ide_busy(pc: &Machine, ctl: u64) -> bool {
    let mut b = [0u8];
    pc.io.read(ctl, &mut b);
    b[0] & 0x80 != 0
}

/// Runs one input. Each operation takes 8 bytes:
/// `op, port-or-address selector (2), size, value (4)`. `op % 8`: port
/// read, port write, RAM plant (4 bytes below 1 MiB), MMIO read in the
/// PCI hole, clock step, MMIO write and read in the virtio function's
/// BARs, and a structured virtio step (bits 4..2 of the size byte: modern
/// or legacy bring-up, descriptor, request header, push with a modern or
/// legacy notify).
pub fn pc_io(data: &[u8]) {
    drop(run(data));
}

/// [`pc_io`], handing back the machine for tests to inspect.
fn run(data: &[u8]) -> Option<Machine> {
    install_log_meter();
    let loops = ManualLoops::default();
    let clock = Arc::new(ManualClock::default());
    let pc = build(&loops, &clock)?;
    settle(&loops, "building the machine");
    let mut drv = Driver {
        size: 0,
        queue: 0,
        dirty: false,
        log_mark: 0,
        pushed: false,
    };
    // The last values written to the device control registers: SRST held
    // there keeps a channel busy, legitimately.
    let mut srst = [false; 2];
    for (n, op) in data.chunks_exact(8).enumerate() {
        let sel = u16::from_le_bytes([op[1], op[2]]);
        let size = [1usize, 2, 4, 8][(op[3] & 3) as usize];
        let value = u32::from_le_bytes([op[4], op[5], op[6], op[7]]) as u64;
        let port = if sel & 0x8000 != 0 {
            PORTS[(sel as usize) % PORTS.len()] as u64
        } else {
            sel as u64
        };
        // MMIO in the virtio function's BARs and the AHCI ABAR: 4 KiB
        // page (bits 4..0: common, ISR, device config, notify, ..., MSI-X
        // at page 16, ABAR at 17) and offset in it (bits 15..5).
        let mmio = VIRTIO_MODERN | (sel as u64 & 0x1f) << 12 | (sel as u64 >> 5);
        let logged = LOGGED.with(|c| c.get());
        match op[0] % 8 {
            0 => {
                let mut b = [0u8; 8];
                pc.io.read(port, &mut b[..size.min(4)]);
            }
            1 => {
                pc.io.write(port, &value.to_le_bytes()[..size.min(4)]);
                // The legacy interface or PCI configuration.
                if (VIRTIO_IO as u64..VIRTIO_IO as u64 + 0x40).contains(&port)
                    || (0xcf8..0xd00).contains(&port)
                {
                    drv.dirty = true;
                }
                if port == 0x3f6 || port == 0x376 {
                    srst[(port == 0x376) as usize] = value & 4 != 0;
                }
            }
            // Plant bytes in low RAM (DMA descriptors, tables).
            2 => {
                let addr = (sel as u64) << 4;
                let _ = pc
                    .ram
                    .write_slice(&value.to_le_bytes()[..4], GuestAddress(addr));
            }
            3 => {
                let mut b = [0u8; 8];
                pc.mmio
                    .read(0xfe00_0000 | (value & 0x01ff_fff8), &mut b[..size]);
            }
            4 => {
                // Large steps exercise the RTC's date arithmetic; the
                // machine's device timers run at each deadline passed,
                // as qtest's clock_step runs them.
                let target = clock.now_ns().saturating_add(value << 20);
                pc.timers.advance(target, |ns| clock.set(ns));
            }
            5 => {
                pc.mmio.write(mmio, &value.to_le_bytes()[..size]);
                drv.dirty = true;
            }
            6 => {
                let mut b = [0u8; 8];
                pc.mmio.read(mmio, &mut b[..size]);
            }
            _ => match op[3] >> 2 & 7 {
                0 => drv.modern(&pc, value as u32, 1 << (sel % 9), (sel >> 8) & 1),
                1 => drv.legacy(&pc, value as u32, (sel >> 8) & 1),
                2 | 3 => drv.desc(
                    &pc,
                    sel,
                    value as u16 & 0xff,
                    (value as u32 >> 8) & 0xffff,
                    (value >> 24) as u16 & 7,
                    (value >> 27) as u16,
                ),
                // A request header (type, sector) in buffer slot `sel`.
                4 | 5 => {
                    let mut h = [0u8; 16];
                    h[0] = (value & 0x0f) as u8;
                    h[8..12].copy_from_slice(&((value as u32) >> 4).to_le_bytes());
                    let at = VQ_BUFS + ((sel as u64 & 0xff) << 12);
                    let _ = pc.ram.write_slice(&h, GuestAddress(at));
                }
                6 => drv.push(&pc, sel, false),
                _ => drv.push(&pc, sel, true),
            },
        }
        let what = format!("operation {n} ({op:02x?})");
        settle(&loops, &what);
        drv.check_progress(&pc, &what);
        for (i, ctl) in [0x3f6u64, 0x376].into_iter().enumerate() {
            // null-co completes inline, so a busy channel has nothing in
            // flight: it would stay busy for ever.
            assert!(
                srst[i] || !ide_busy(&pc, ctl),
                "watchdog: IDE channel {i} busy with no I/O in flight after operation {n} ({op:02x?})"
            );
        }
        let logged = LOGGED.with(|c| c.get()) - logged;
        assert!(
            logged <= LOG_PER_OP,
            "watchdog: operation {n} ({op:02x?}) logged {logged} bytes"
        );
    }
    Some(pc)
}

/// The q35 machine a migration destination is: its AHCI with a disk on
/// port 0 (null-co), built as [`build`] builds the `pc`.
fn build_q35(loops: &ManualLoops, clock: &Arc<ManualClock>) -> Option<Machine> {
    let mut cfg = MachineConfig {
        mem_size: RAM,
        machine: "q35".into(),
        ..MachineConfig::default()
    };
    let mut table = block::drive::DriveTable::with_max_devs(|i| match i {
        block::drive::Interface::Ide => 1,
        _ => 0,
    });
    cfg.drives.push(
        table
            .parse_drive("if=ide,index=0,driver=null-co,size=1048576,read-zeroes=on")
            .ok()?,
    );
    let board = machine::board(&cfg);
    let layout = board.layout(RAM);
    let ram = memory::allocate_ram(&layout).ok()?;
    let rom = memory::map_bios(&[0xf4; 65536], &ram).ok()?;
    let host = Host {
        irq: Arc::new(Lines),
        system: Arc::new(NoSystem),
        clock: clock.clone(),
        timers: devices::timer::Timers::new(clock.clone()),
        serial_out: vec![Box::new(std::io::sink())],
        debugcon_out: None,
        rtc_start: 0,
        msi: None,
        ioevents: Arc::new(devices::virtio::NoIoEvents),
        events: Default::default(),
        manual_loops: Some(loops.clone()),
        guest_code: false,
    };
    let storage = Storage::open(&cfg).ok()?;
    board
        .build_with(&cfg, host, &storage, machine::Memory { layout, ram, rom })
        .ok()
}

/// The `migration_stream` fuzz target: the input is what a hostile
/// source sends to a q35 destination. It is received into the machine's
/// RAM and ROM and, when whole, every section is loaded, the PCI decode
/// refreshed and the devices resumed (AHCI re-issues commands from the
/// stream's RAM). Nothing may panic, hang or touch memory outside the
/// guest.
pub fn migration_stream(data: &[u8]) {
    migration_stream_loads(data);
}

/// [`migration_stream`], saying whether the whole stream loaded.
pub fn migration_stream_loads(data: &[u8]) -> bool {
    install_log_meter();
    let loops = ManualLoops::default();
    let clock = Arc::new(ManualClock::default());
    let Some(pc) = build_q35(&loops, &clock) else {
        return false;
    };
    settle(&loops, "building the machine");
    let Ok(got) = crate::migration::receive(&mut &data[..], &pc.ram, &pc.rom) else {
        return false;
    };
    if pc.vmstate.load_all(&got.sections).is_err() {
        return false;
    }
    if let Some(pci) = &pc.pci {
        pci.invalidate_decode();
    }
    pc.vmstate.resume_all();
    settle(&loops, "resuming after a load");
    true
}

/// A stream a q35 source sends: its AHCI mapped and port 0 started, a
/// command header planted, as the seed of the `migration_stream` corpus.
pub fn migration_seed() -> Option<Vec<u8>> {
    let loops = ManualLoops::default();
    let clock = Arc::new(ManualClock::default());
    let pc = build_q35(&loops, &clock)?;
    // Firmware and a driver's part: ABAR at 0xfeb00000, memory space and
    // bus mastering, AHCI enabled, port 0's lists in RAM and started.
    let cfg_addr = |reg: u32| 0x8000_0000u32 | (0x1f << 11) | (2 << 8) | reg;
    let out = |port: u64, v: u32| pc.io.write(port, &v.to_le_bytes());
    out(0xcf8, cfg_addr(0x24));
    out(0xcfc, 0xfeb0_0000);
    out(0xcf8, cfg_addr(0x04));
    out(0xcfc, 0x0006);
    let w = |off: u64, v: u32| pc.mmio.write(0xfeb0_0000 + off, &v.to_le_bytes());
    w(0x04, 0x8000_0000);
    w(0x100, 0x10_0000);
    w(0x108, 0x10_1000);
    w(0x118, 0x11);
    let _ = pc
        .ram
        .write_slice(&[0x05, 0x00, 0x01, 0x00], GuestAddress(0x10_0000));
    let config = serde_json::json!({
        "ram": crate::migration::ram_layout(&pc.ram),
        "runstate": "running",
        "clock_ns": 0,
        "sections": pc.vmstate.ids(),
    });
    crate::migration::encode(config, &pc.ram, &pc.rom, pc.vmstate.save_all().ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(code: u8, sub: u8, sel: u16, value: u32) -> [u8; 8] {
        let [s0, s1] = sel.to_le_bytes();
        let [v0, v1, v2, v3] = value.to_le_bytes();
        [code, s0, s1, sub << 2, v0, v1, v2, v3]
    }

    /// A virtio-blk read the structured operations build: header in slot
    /// 0, 512 bytes into slot 1, status in slot 2.
    fn virtio_read(legacy: bool) -> Vec<u8> {
        let (bringup, push) = if legacy { (1, 7) } else { (0, 6) };
        [
            op(7, bringup, 4, 0),
            op(7, 4, 0, 0),
            op(7, 2, 0, 16 << 8 | 1 << 24 | 1 << 27),
            op(7, 2, 1, 1 | 512 << 8 | 3 << 24 | 2 << 27),
            op(7, 2, 2, 2 | 1 << 8 | 2 << 24),
            op(7, push, 0, 0),
        ]
        .concat()
    }

    #[test]
    fn structured_operations_complete_a_virtio_request() {
        for legacy in [false, true] {
            let pc = run(&virtio_read(legacy)).unwrap();
            let size = if legacy { 256 } else { 16 };
            let (_, _, used) = vq_layout(size);
            let idx: u16 = pc.ram.read_obj(GuestAddress(used + 2)).unwrap();
            assert_eq!(idx, 1, "legacy={legacy}: request not completed");
            let status: u8 = pc.ram.read_obj(GuestAddress(VQ_BUFS + 0x2000)).unwrap();
            assert_eq!(status, 0, "legacy={legacy}");
        }
    }

    #[test]
    #[should_panic(expected = "logged")]
    fn the_log_bound_fails_a_run() {
        install_log_meter();
        LOGGED.with(|c| c.set(0));
        // Not a device: the harness's own check, fed directly.
        log::warn!("{}", "x".repeat(LOG_PER_OP));
        let n = LOGGED.with(|c| c.get());
        assert!(n <= LOG_PER_OP, "logged {n} bytes");
    }
}
