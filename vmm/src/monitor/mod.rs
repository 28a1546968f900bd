//! The monitors: QMP (`qmp.rs`, the JSON protocol management tools speak)
//! and HMP (`hmp.rs`, the human monitor: `-monitor`, `-mon
//! mode=readline`, Ctrl-A c on a `mon:` console). Both turn their input
//! into a typed [`command::Command`] and send it to the main loop, which
//! owns the machine and runs it with [`Control::run`]; events go to QMP
//! clients through [`event::Events`].
//!
//! Endpoints (`-qmp`, `-monitor`, `-mon chardev=`) are served by threads:
//! a listening socket accepts any number of clients at once, each with
//! its own session; a client that goes away mid-command costs nothing but
//! its answer.

pub mod command;
pub mod event;
mod exec;
pub(crate) mod jobs;
pub use jobs::sink as jobs_event_sink;
pub mod hmp;
pub mod nbd_export;
pub mod qmp;
mod qom;
pub mod virtio_export;

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use serde_json::Value;

use crate::config::{CharDev, MachineConfig, MonitorConfig, MonitorMode};
use crate::console::{self, Listener, Stream};
use crate::machine::Machine;
use crate::storage::Storage;
use crate::{EventSender, VmEvent, VmmError};
pub use command::{Command, ErrorClass, QmpError};
use event::{Events, Out};

pub const BANNER: &str = "Strata monitor - type 'help' for more information";
pub const PROMPT: &str = "(strata) ";

/// Why the guest is or is not running (QAPI `RunState`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    /// `-S` before the first `cont`.
    Prelaunch,
    Paused,
    /// An I/O error policy stopped the guest.
    IoError,
    /// `-incoming`: waiting for the migration stream.
    InMigrate,
    /// Stopped to send the migration stream.
    FinishMigrate,
    /// The migration completed: the guest runs on the destination now.
    PostMigrate,
}

impl RunState {
    /// HMP's `info status` words.
    pub fn describe(&self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Prelaunch => "paused (prelaunch)",
            RunState::Paused => "paused",
            RunState::IoError => "paused (io-error)",
            RunState::InMigrate => "paused (inmigrate)",
            RunState::FinishMigrate => "paused (finish-migrate)",
            RunState::PostMigrate => "paused (postmigrate)",
        }
    }

    /// QMP's name (`query-status`).
    pub fn qapi_name(&self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Prelaunch => "prelaunch",
            RunState::Paused => "paused",
            RunState::IoError => "io-error",
            RunState::InMigrate => "inmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::PostMigrate => "postmigrate",
        }
    }

    /// The state a migration stream names (the source's).
    pub fn from_qapi_name(s: &str) -> Option<RunState> {
        Some(match s {
            "running" => RunState::Running,
            "prelaunch" => RunState::Prelaunch,
            "paused" => RunState::Paused,
            "io-error" => RunState::IoError,
            _ => return None,
        })
    }
}

/// What a command asks the main loop to do to the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    /// Take the vCPUs out of the guest.
    Pause,
    /// Let them run (and retry requests an error policy stopped).
    Resume,
    /// `system_reset`: a new machine generation.
    Reset,
    /// `quit`.
    Quit,
    /// `migrate`: send the machine over the connection in
    /// [`Control::outgoing`].
    Migrate,
}

/// A command on its way to the main loop, with where its answer goes.
pub enum Request {
    Qmp {
        cmd: Command,
        id: Option<Value>,
        pretty: bool,
        /// The client's outbound queue.
        out: event::OutQueue,
        /// Dropped or answered when the response is queued.
        done: mpsc::Sender<()>,
    },
    Hmp {
        line: String,
        /// The session's outbound queue; `None` is the `mon:stdio`
        /// console, answered on standard output.
        out: Option<event::OutQueue>,
        done: Option<mpsc::Sender<()>>,
    },
}

/// What a command may look at: the running machine, owned by the main
/// loop.
pub struct Ctx<'a> {
    pub cfg: &'a MachineConfig,
    pub storage: &'a Storage,
    pub machine: &'a Machine,
    /// Host thread ids of the vCPUs (empty under qtest).
    pub vcpu_threads: &'a [i32],
}

/// The main loop's side of the monitors: the run state, and running
/// requests against the machine.
pub struct Control {
    pub state: RunState,
    pub events: Arc<Events>,
    /// Devices added with `device_add` (and not yet removed): a machine
    /// rebuilt by a reset has them too.
    pub added: Vec<crate::device::DeviceSpec>,
    /// Drives whose corruption has been reported.
    corrupt_reported: Vec<String>,
    /// Whether the guest runs once an incoming migration is loaded (not
    /// with `-S`; `cont` and `stop` during `inmigrate` change it).
    pub autostart: bool,
    /// The last (or current) migration, for `query-migrate`.
    pub migration: crate::migration::Info,
    /// A `migrate` on its way: the connection, and the state to go back
    /// to if it fails.
    pub outgoing: Option<(Box<dyn crate::migration::Conn>, RunState)>,
}

impl Control {
    pub fn new(paused: bool, events: Arc<Events>) -> Control {
        Control {
            state: if paused {
                RunState::Prelaunch
            } else {
                RunState::Running
            },
            events,
            added: Vec::new(),
            corrupt_reported: Vec::new(),
            autostart: !paused,
            migration: Default::default(),
            outgoing: None,
        }
    }

    /// A destination: `inmigrate` until the stream is loaded.
    pub fn incoming(&mut self) {
        self.state = RunState::InMigrate;
    }

    /// Runs one request, queues its answer, and returns what the main
    /// loop must do.
    pub fn run(&mut self, req: Request, ctx: &Ctx) -> Action {
        match req {
            Request::Qmp {
                cmd,
                id,
                pretty,
                out,
                done,
            } => {
                let (result, action) = match self.execute(cmd, ctx) {
                    Ok((v, a)) => (Ok(v), a),
                    Err(e) => (Err(e), Action::None),
                };
                let text = qmp::encode(&qmp::response(result, id), pretty);
                // Never blocks the main loop: a client whose queue is full
                // has stopped reading and loses the answer.
                let _ = out.try_send(Out::Line(text));
                let _ = done.send(());
                action
            }
            Request::Hmp { line, out, done } => {
                let (text, action) = hmp::run(self, &line, ctx);
                match out {
                    Some(out) => {
                        let text = text.replace('\n', "\r\n");
                        let _ = out.try_send(Out::Line(format!("{text}{PROMPT}")));
                    }
                    None => {
                        let mut o = std::io::stdout();
                        let _ = write!(o, "{}{PROMPT}", text.replace('\n', "\r\n"));
                        let _ = o.flush();
                    }
                }
                if let Some(d) = done {
                    let _ = d.send(());
                }
                action
            }
        }
    }

    /// Runs a parsed command.
    pub fn execute(&mut self, cmd: Command, ctx: &Ctx) -> Result<(Value, Action), QmpError> {
        exec::execute(self, cmd, ctx)
    }

    /// A drive's request failed: BLOCK_IO_ERROR, and for the `stop`
    /// action the io-error state (STOP). Returns whether the guest stops.
    pub fn block_error(
        &mut self,
        drive: &str,
        write: bool,
        action: block::backend::ErrorAction,
        error: &str,
        nospace: bool,
        corrupt: bool,
    ) -> bool {
        use block::backend::ErrorAction;
        // Once per drive: after the first, writes are refused because the
        // image is marked corrupt, which is the same news.
        if corrupt && !self.corrupt_reported.iter().any(|d| d == drive) {
            self.corrupt_reported.push(drive.to_string());
            self.events.emit(
                "BLOCK_IMAGE_CORRUPTED",
                Some(serde_json::json!({"device": drive, "msg": error, "fatal": true})),
            );
        }
        let stop = action == ErrorAction::Stop;
        let action = match action {
            ErrorAction::Stop => "stop",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Report | ErrorAction::Enospc => "report",
        };
        self.events.emit(
            "BLOCK_IO_ERROR",
            Some(serde_json::json!({
                "device": drive,
                "operation": if write { "write" } else { "read" },
                "action": action,
                "nospace": nospace,
                "reason": error,
            })),
        );
        if stop {
            self.stop(RunState::IoError);
        }
        stop
    }

    /// The guest ejected PCI `slot` (ACPI hotplug).
    pub fn pci_eject(&mut self, machine: &Machine, slot: u8) {
        exec::pci_eject(self, machine, slot)
    }

    /// The configuration a rebuilt machine starts from: the command line's
    /// devices and those added since.
    pub fn machine_config(&self, cfg: &MachineConfig) -> MachineConfig {
        let mut c = cfg.clone();
        c.devices.extend(self.added.iter().cloned());
        c
    }

    /// Moves to a stopped state, emitting STOP if the guest was running.
    pub fn stop(&mut self, why: RunState) {
        if self.state == RunState::Running {
            self.events.emit("STOP", None);
        }
        if self.state == RunState::Running || why == RunState::IoError {
            self.state = why;
        }
    }

    /// Moves to running, emitting RESUME if it was stopped.
    pub fn resume(&mut self) {
        if self.state != RunState::Running {
            self.state = RunState::Running;
            self.events.emit("RESUME", None);
        }
    }

    /// A machine reset: `guest` says whether the guest asked for it.
    pub fn reset(&self, guest: bool) {
        let reason = if guest {
            "guest-reset"
        } else {
            "host-qmp-system-reset"
        };
        self.events.emit(
            "RESET",
            Some(serde_json::json!({"guest": guest, "reason": reason})),
        );
    }

    /// The end of the run: SHUTDOWN, then every client's queue written.
    pub fn shutdown(&self, guest: bool, reason: &str) {
        self.events.emit(
            "SHUTDOWN",
            Some(serde_json::json!({"guest": guest, "reason": reason})),
        );
        self.events.flush(Duration::from_secs(2));
    }
}

/// Starts every `-qmp`, `-monitor` and `-mon` endpoint.
pub fn start(cfg: &MachineConfig, events: &Arc<Events>, vm: &EventSender) -> Result<(), VmmError> {
    for m in &cfg.monitors {
        start_one(m, events, vm)?;
    }
    Ok(())
}

fn start_one(m: &MonitorConfig, events: &Arc<Events>, vm: &EventSender) -> Result<(), VmmError> {
    let name = console::describe(&m.chardev);
    let what = match m.mode {
        MonitorMode::Control => "-qmp",
        MonitorMode::Readline => "-monitor",
    };
    let err = |e: std::io::Error| VmmError::Config(format!("{what} {name}: {e}"));
    let serve = {
        let (m, events, vm) = (m.clone(), events.clone(), vm.clone());
        move |s: Stream| match m.mode {
            MonitorMode::Control => qmp::serve(s, m.pretty, events.clone(), vm.clone()),
            MonitorMode::Readline => serve_hmp(s, vm.clone()),
        }
    };
    let spawn = |f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name("monitor".into())
            .spawn(f)
            .map(|_| ())
            .map_err(err)
    };
    match &m.chardev {
        CharDev::Null => Ok(()),
        CharDev::Stdio { .. } => spawn(Box::new(move || serve(Stream::stdio()))),
        CharDev::Pty => {
            let s = Stream::pty("compat_monitor0")
                .map_err(|e| VmmError::Config(format!("{what} pty: {e}")))?;
            spawn(Box::new(move || serve(s)))
        }
        CharDev::File(_) => Err(VmmError::Config(format!(
            "{what} {name}: a monitor needs a socket or stdio"
        ))),
        CharDev::Unix { server: true, .. } | CharDev::Tcp { server: true, .. } => {
            let l = Listener::bind(&m.chardev).map_err(err)?;
            // With wait=on QEMU starts the guest only once the first client
            // is connected; Strata serves that client before going on.
            let first = match &m.chardev {
                CharDev::Unix { wait: true, .. } | CharDev::Tcp { wait: true, .. } => {
                    eprintln!("strata: {what}: waiting for a connection on {name}");
                    Some(l.accept().map_err(err)?)
                }
                _ => None,
            };
            let serve = Arc::new(serve);
            spawn(Box::new(move || {
                if let Some(s) = first {
                    let sv = serve.clone();
                    std::thread::spawn(move || sv(s));
                }
                while let Ok(s) = l.accept() {
                    let sv = serve.clone();
                    std::thread::spawn(move || sv(s));
                }
            }))
        }
        CharDev::Unix { .. } | CharDev::Tcp { .. } => {
            let s = console::connect(&m.chardev).map_err(err)?;
            spawn(Box::new(move || serve(s)))
        }
    }
}

/// Serves HMP on a connection: a banner, then a prompt after each answer.
fn serve_hmp(s: Stream, vm: EventSender) {
    let Stream {
        read,
        write,
        shutdown,
    } = s;
    let (tx, rx) = event::queue();
    let writer = std::thread::spawn(move || qmp::writer_loop(write, rx));
    let _ = tx.try_send(Out::Line(format!("{BANNER}\r\n{PROMPT}")));
    let mut r = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        // Lines are bounded: a client cannot make the monitor buffer
        // without limit.
        match (&mut r).take(4096).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line).trim().to_string();
        let (dtx, drx) = mpsc::channel();
        vm.send(VmEvent::Monitor(Request::Hmp {
            line: text,
            out: Some(tx.clone()),
            done: Some(dtx),
        }));
        if drx.recv().is_err() {
            break;
        }
    }
    drop(tx);
    shutdown();
    let _ = writer.join();
}
