//! The process of `strata-storage-daemon` (qemu-storage-daemon's role,
//! QEMU's `docs/tools/qemu-storage-daemon.rst`): the block graph, its
//! exports and the QMP monitors, with no guest. It is the VMM's storage
//! half run alone: the same [`Storage`](crate::storage::Storage), the same
//! monitor and command table (block jobs, `blockdev-add`, `nbd-server-*`,
//! `block-export-*`), around the empty `none` machine, which has no CPU and
//! needs no KVM. The command line's `--nbd-server` and `--export` are the
//! QMP commands they stand for, run before the monitors take requests.

use std::sync::{mpsc, Arc};

use devices::clock::HostClock;
use devices::irq::{IrqChip, IrqLine, NoIrq};
use serde_json::{Map, Value};

use crate::config::MachineConfig;
use crate::{machine, monitor, Consoles, EventSender, VmEvent, VmmError};

/// A QMP command the command line asked for (`--nbd-server`, `--export`),
/// with the option as the user wrote it, for errors.
pub struct Startup {
    pub option: String,
    pub command: &'static str,
    pub args: Map<String, Value>,
}

/// The `none` machine's interrupt controller: it has no device to raise
/// a line.
struct NoChip;
impl IrqChip for NoChip {
    fn line(&self, _gsi: u32) -> Arc<dyn IrqLine> {
        Arc::new(NoIrq)
    }
}

/// Runs until `quit` or a termination signal; `ready` runs once the
/// exports and monitors listen (`--daemonize` lets its parent go then).
pub fn run(
    mut cfg: MachineConfig,
    startup: Vec<Startup>,
    ready: impl FnOnce(),
) -> Result<i32, VmmError> {
    cfg.machine = "none".into();
    cfg.mem_size = 1 << 20;
    cfg.devices.clear();
    let (tx, rx) = mpsc::channel();
    let events = EventSender(tx);
    crate::watch_signals(&events)?;
    let consoles = Consoles::open(&cfg, &events)?;
    let (storage, bus) = crate::open_storage(&cfg, &events)?;
    let host = consoles.host(Arc::new(NoChip), &events, Arc::new(HostClock::new()), &bus);
    let none = machine::board(&cfg).build(&cfg, host, &storage)?;
    let mut control = monitor::Control::new(false, bus.clone());
    for s in startup {
        let ctx = monitor::Ctx {
            cfg: &cfg,
            storage: &storage,
            machine: &none,
            vcpu_threads: &[],
        };
        let cmd = monitor::command::Command::Block {
            name: s.command,
            args: s.args,
        };
        control
            .execute(cmd, &ctx)
            .map_err(|e| VmmError::Config(format!("{}: {}", s.option, e.desc)))?;
    }
    monitor::start(&cfg, &bus, &events)?;
    ready();
    loop {
        match rx.recv().unwrap_or(VmEvent::Quit) {
            VmEvent::Monitor(req) => {
                let ctx = monitor::Ctx {
                    cfg: &cfg,
                    storage: &storage,
                    machine: &none,
                    vcpu_threads: &[],
                };
                if control.run(req, &ctx) == monitor::Action::Quit {
                    control.shutdown(false, "host-qmp-quit");
                    return Ok(0);
                }
            }
            VmEvent::HostSignal | VmEvent::Quit => {
                control.shutdown(false, "host-signal");
                return Ok(0);
            }
            VmEvent::Error(e) => return Err(VmmError::Guest(e)),
            // Block errors are reported by the exports' own devices; the
            // rest needs a guest.
            _ => {}
        }
    }
}
