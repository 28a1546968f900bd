//! A fuzzing harness for the `pc` machine's guest-facing registers: it
//! builds the machine as the qtest accelerator does (no vCPU, a stepped
//! clock, a 64 KiB dummy firmware) and interprets the input bytes as a
//! sequence of port reads and writes, guest-memory writes (so fw_cfg DMA
//! descriptors and PRD tables can be planted) and clock steps.
//!
//! Both `fuzz/fuzz_targets/pc_io.rs` (cargo fuzz) and the corpus test in
//! `vmm/tests/fuzz_corpus.rs` call [`pc_io`], so every corpus entry is also a
//! regular test. The property checked is the one DESIGN.md asks of every
//! device: no input panics, hangs, or touches memory outside the guest.

use std::sync::Arc;

use devices::clock::ManualClock;
use devices::irq::{IrqChip, IrqLine, NoIrq};
use devices::system::NoSystem;
use vm_memory::{Bytes, GuestAddress};

use crate::config::MachineConfig;
use crate::machine::{self, Host};
use crate::memory::{self, Layout};
use crate::storage::Storage;

struct Lines;
impl IrqChip for Lines {
    fn line(&self, _gsi: u32) -> Arc<dyn IrqLine> {
        Arc::new(NoIrq)
    }
}

/// Ports worth aiming at: every device the `pc` machine decodes, plus the
/// PM block where firmware usually puts PMBASE.
const PORTS: [u16; 40] = [
    0x60, 0x64, 0x70, 0x71, 0x92, 0xb2, 0xb3, 0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x4d0,
    0x4d1, 0x510, 0x511, 0x514, 0x518, 0xcf8, 0xcf9, 0xcfc, 0xcfe,
    0x608, // IDE: both channels' task files and controls,
    0x1f0, 0x1f1, 0x1f2, 0x1f3, 0x1f6, 0x1f7, 0x3f6, 0x170, 0x172, 0x176, 0x177, 0x376,
    // and BMIDE where firmware usually puts BAR4.
    0xc000, 0xc002, 0xc004, 0xc008,
];

const RAM: u64 = 16 << 20;

/// Runs one input. Each operation takes 8 bytes:
/// `op, port-or-address selector (2), size, value (4)`.
pub fn pc_io(data: &[u8]) {
    let mut cfg = MachineConfig {
        mem_size: RAM,
        ..MachineConfig::default()
    };
    // An IDE disk and CD-ROM on null-co backends, so that commands reach
    // the ATA, ATAPI and DMA paths instead of stopping at "no drive".
    let mut table = block::drive::DriveTable::new();
    for d in [
        "if=ide,index=0,driver=null-co,size=1048576,read-zeroes=on",
        "if=ide,index=2,media=cdrom,driver=null-co,size=1048576,read-zeroes=on",
    ] {
        if let Ok(spec) = table.parse_drive(d) {
            cfg.drives.push(spec);
        }
    }
    let layout = Layout::new(RAM);
    let Ok(ram) = memory::allocate_ram(&layout) else {
        return;
    };
    let Ok(rom) = memory::map_bios(&[0xf4; 65536], &ram) else {
        return;
    };
    let clock = Arc::new(ManualClock::default());
    let host = Host {
        irq: Arc::new(Lines),
        system: Arc::new(NoSystem),
        clock: clock.clone(),
        serial_out: vec![Box::new(std::io::sink())],
        debugcon_out: Some(Box::new(std::io::sink())),
        rtc_start: 0,
        msi: None,
        ioevents: Arc::new(devices::virtio::NoIoEvents),
        events: Default::default(),
    };
    let Ok(storage) = Storage::open(&cfg) else {
        return;
    };
    let Ok(pc) =
        machine::board(&cfg).build_with(&cfg, host, &storage, machine::Memory { layout, ram, rom })
    else {
        return;
    };
    for op in data.chunks_exact(8) {
        let sel = u16::from_le_bytes([op[1], op[2]]);
        let size = [1usize, 2, 4, 8][(op[3] & 3) as usize];
        let value = u32::from_le_bytes([op[4], op[5], op[6], op[7]]) as u64;
        let port = if sel & 0x8000 != 0 {
            PORTS[(sel as usize) % PORTS.len()] as u64
        } else {
            sel as u64
        };
        match op[0] % 5 {
            0 => {
                let mut b = [0u8; 8];
                pc.io.read(port, &mut b[..size.min(4)]);
            }
            1 => {
                pc.io.write(port, &value.to_le_bytes()[..size.min(4)]);
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
            _ => {
                // Large steps exercise the RTC's date arithmetic.
                clock.step(value << 20);
            }
        }
    }
}
