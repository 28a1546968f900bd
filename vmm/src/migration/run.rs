//! The main loop's side of a migration: sending the machine when
//! `migrate` asked for it (source), and taking over what an `-incoming`
//! stream brought (destination). Both run on the main loop, which owns
//! the machine; the destination's socket is read by a thread of its own
//! so that qtest and QMP are answered while the stream comes.

use std::sync::mpsc;
use std::time::Instant;

use devices::clock::ManualClock;

use super::{Listener, Received, Uri};
use crate::machine::Machine;
use crate::monitor::{Control, RunState};
use crate::storage::Storage;
use crate::{EventSender, VmEvent};

/// What an `-incoming` socket delivered, and where the verdict goes.
pub struct Incoming {
    pub result: Result<Received, String>,
    /// The thread answers the source with what the main loop decides.
    pub reply: mpsc::Sender<Result<(), String>>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.result {
            Ok(r) => write!(f, "Incoming({} sections)", r.sections.len()),
            Err(e) => write!(f, "Incoming(error: {e})"),
        }
    }
}

/// Send the machine over the connection `migrate` opened.
pub fn outgoing(c: &mut Control, pc: &Machine, storage: &Storage, clock: &ManualClock) {
    use devices::clock::Clock;
    let Some((mut conn, was)) = c.outgoing.take() else {
        return;
    };
    let t0 = Instant::now();
    // No request in flight while the state is taken and the images
    // change hands; those the error policy parked stay parked (their
    // commands go with the devices and are issued again over there).
    let backends = storage.all_backends();
    let guards: Vec<_> = backends.iter().map(|b| b.drain_begin()).collect();
    let result = (|| {
        let sections = pc.vmstate.save_all()?;
        storage
            .graph
            .inactivate_all()
            .map_err(|e| format!("handing over the images: {e}"))?;
        let config = serde_json::json!({
            "ram": super::ram_layout(&pc.ram),
            "runstate": was.qapi_name(),
            "clock_ns": clock.now_ns(),
            "sections": pc.vmstate.ids(),
        });
        super::send(&mut *conn, config, &pc.ram, &pc.rom, sections)
    })();
    let ms = t0.elapsed().as_millis() as u64;
    let ram_total: u64 = pc.layout.below_4g + pc.layout.above_4g;
    match result {
        Ok(sent) => {
            for b in &backends {
                b.take_parked();
            }
            c.migration = super::Info {
                status: Some("completed"),
                total_ms: ms,
                downtime_ms: ms,
                sent,
                ram_total,
                ..Default::default()
            };
            c.state = RunState::PostMigrate;
        }
        Err(e) => {
            // The images come back, and the guest goes on as it was.
            let back = storage.graph.activate_all();
            c.migration = super::Info {
                status: Some("failed"),
                total_ms: ms,
                ram_total,
                error: Some(match back {
                    Ok(()) => e,
                    Err(b) => format!("{e}; taking the images back failed too: {b}"),
                }),
                ..Default::default()
            };
            c.state = was.clone();
            if was == RunState::Running {
                c.state = RunState::Paused;
                c.resume();
            }
        }
    }
    drop(guards);
}

/// Listen for the source and read its stream on a thread; the result
/// comes to the main loop as [`VmEvent::Migration`].
pub fn listen(uri: &Uri, pc: &Machine, events: &EventSender) -> Result<(), String> {
    let l = Listener::bind(uri)?;
    let (ram, rom, ev) = (pc.ram.clone(), pc.rom.clone(), events.clone());
    std::thread::Builder::new()
        .name("migration-in".into())
        .spawn(move || {
            let mut conn = match l.accept() {
                Ok(c) => c,
                Err(e) => {
                    let (tx, _rx) = mpsc::channel();
                    ev.send(VmEvent::Migration(Box::new(Incoming {
                        result: Err(format!("accepting the source: {e}")),
                        reply: tx,
                    })));
                    return;
                }
            };
            let result = super::receive(&mut *conn, &ram, &rom);
            if let Err(e) = &result {
                // Tell the source why, and take in the rest of what it
                // sends (bounded in time), so that it reads the reason
                // rather than a reset connection.
                super::answer(&mut *conn, &Err(e.clone()));
                super::drain(&mut *conn);
            }
            let ok = result.is_ok();
            let (tx, rx) = mpsc::channel();
            ev.send(VmEvent::Migration(Box::new(Incoming { result, reply: tx })));
            let verdict = rx
                .recv()
                .unwrap_or_else(|_| Err("the destination stopped".into()));
            if ok {
                super::answer(&mut *conn, &verdict);
            }
        })
        .map(|_| ())
        .map_err(|e| format!("-incoming: {e}"))
}

/// Take over what the stream brought: the images, the devices' state,
/// the clock and the run state. Returns whether the guest now runs.
pub fn load(
    c: &mut Control,
    pc: &Machine,
    storage: &Storage,
    clock: &ManualClock,
    got: &Received,
) -> Result<bool, String> {
    storage
        .graph
        .activate_all()
        .map_err(|e| format!("taking over the images: {e}"))?;
    pc.vmstate.load_all(&got.sections)?;
    // Loaded config space moved BARs and decode windows: the bus's
    // decode cache only sees config writes made through it.
    if let Some(pci) = &pc.pci {
        pci.invalidate_decode();
    }
    if let Some(ns) = got.config["clock_ns"].as_u64() {
        clock.set(ns);
    }
    let src = got.config["runstate"]
        .as_str()
        .and_then(RunState::from_qapi_name)
        .ok_or_else(|| "the stream names no run state".to_string())?;
    if src == RunState::Running && c.autostart {
        c.state = RunState::Paused;
        c.resume();
        storage.resume();
        pc.vmstate.resume_all();
        Ok(true)
    } else {
        // QEMU's destination takes the source's stopped state as it is
        // (io-error stays io-error), without an event.
        c.state = if src == RunState::Running {
            RunState::Paused
        } else {
            src
        };
        Ok(false)
    }
}
