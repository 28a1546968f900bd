//! The KVM side of Strata: machine assembly, memory, vCPUs, PIO/MMIO
//! dispatch, and the qtest accelerator that drives the same machine without
//! a CPU.

pub mod acpi;
pub mod boot;
pub mod config;
pub mod console;
pub mod device;
pub mod harness;
pub mod inherited_fds;
pub mod kvm;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod monitor;
pub mod mptable;
pub mod qtest;
pub mod smbios;
pub mod storage;
pub mod storage_daemon;
pub mod vcpu;
pub mod vduse;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use devices::clock::HostClock;
use devices::system::SystemControl;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use config::{Accel, CharDev, MachineConfig};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A problem with /dev/kvm or a KVM ioctl.
    #[error("{0}")]
    Kvm(String),
    /// The user asked for something that cannot be built.
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Machine(#[from] machine::MachineError),
    /// The guest did something fatal (an emulation failure, for example).
    #[error("{0}")]
    Guest(String),
}

/// The QEMU version Strata answers to (`-version`, QMP's greeting and
/// `query-version`): the release whose command line and QMP it follows.
pub const QEMU_VERSION: (u32, u32, u32) = (7, 2, 0);

/// QMP's `package` string: what this build really is.
pub fn package_version() -> String {
    format!(" (Strata {})", env!("CARGO_PKG_VERSION"))
}

/// What the main loop is told: why a machine generation ends, and the
/// requests it serves while it runs.
#[derive(Debug)]
pub enum VmEvent {
    Reset,
    Shutdown,
    /// The user quit (Ctrl-A x, or Ctrl-C on plain stdio).
    Quit,
    Error(String),
    /// A drive's request failed; with the `stop` policy (`rerror/werror`)
    /// it is parked and the guest must pause until `cont`.
    BlockError {
        drive: String,
        write: bool,
        action: block::backend::ErrorAction,
        error: String,
        nospace: bool,
        /// The image was found corrupt (BLOCK_IMAGE_CORRUPTED).
        corrupt: bool,
    },
    /// A monitor request (QMP or HMP).
    Monitor(monitor::Request),
    /// A qtest protocol line (the qtest accelerator's main loop).
    Qtest(String),
    /// The guest ejected a PCI slot (ACPI hotplug).
    PciEject(u8),
    /// SIGTERM, SIGINT or SIGHUP: end the run cleanly, as QEMU does.
    HostSignal,
    /// An `-incoming` stream arrived (or failed).
    Migration(Box<migration::run::Incoming>),
}

impl std::fmt::Debug for monitor::Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            monitor::Request::Qmp { cmd, .. } => write!(f, "Qmp({cmd:?})"),
            monitor::Request::Hmp { line, .. } => write!(f, "Hmp({line:?})"),
        }
    }
}

/// How a run loop ends a generation.
enum End {
    Reset { guest: bool },
    Shutdown,
    Quit { reason: &'static str },
    Error(String),
}

/// Holds vCPU threads at the top of their run loop while the guest is
/// paused (`-S`, `stop`, an I/O error policy).
#[derive(Default)]
pub struct VcpuGate {
    paused: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
    /// vCPUs currently held at the gate.
    parked: std::sync::atomic::AtomicUsize,
}

impl VcpuGate {
    pub fn set_paused(&self, paused: bool) {
        *devices::bus::lock(&self.paused) = paused;
        self.cv.notify_all();
    }

    /// Blocks while paused, unless the machine is being torn down.
    pub fn wait(&self, stop: &AtomicBool) {
        let mut p = devices::bus::lock(&self.paused);
        if !*p {
            return;
        }
        self.parked.fetch_add(1, Ordering::SeqCst);
        while *p && !stop.load(Ordering::Acquire) {
            p = self
                .cv
                .wait_timeout(p, Duration::from_millis(50))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }

    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
pub struct EventSender(mpsc::Sender<VmEvent>);

impl EventSender {
    pub fn send(&self, ev: VmEvent) {
        let _ = self.0.send(ev);
    }
}

impl SystemControl for EventSender {
    fn request_reset(&self) {
        log::debug!("guest requested a reset");
        self.send(VmEvent::Reset)
    }
    fn request_shutdown(&self) {
        self.send(VmEvent::Shutdown)
    }
    fn request_pci_eject(&self, slot: u8) {
        self.send(VmEvent::PciEject(slot))
    }
}

/// The opened chardevs of a run.
pub struct Consoles {
    pub serial: Vec<console::Chardev>,
    pub debugcon: Option<console::Chardev>,
    _guards: Vec<console::TerminalGuard>,
    /// `MachineConfig::rtc_offset`, applied to every generation's RTC.
    rtc_offset: i64,
}

impl Consoles {
    pub fn open(cfg: &MachineConfig, events: &EventSender) -> Result<Self, VmmError> {
        let mut guards = Vec::new();
        let mut serial = Vec::new();
        for dev in &cfg.serial {
            let (c, g) = console::open(dev, "-serial", events)?;
            guards.extend(g);
            serial.push(c);
        }
        let debugcon = match &cfg.debugcon {
            Some(d) => {
                let (c, g) = console::open(d, "-debugcon", events)?;
                guards.extend(g);
                Some(c)
            }
            None => None,
        };
        Ok(Consoles {
            serial,
            debugcon,
            _guards: guards,
            rtc_offset: cfg.rtc_offset,
        })
    }

    fn host(
        &self,
        irq: Arc<dyn devices::irq::IrqChip>,
        events: &EventSender,
        clock: Arc<dyn devices::clock::Clock>,
        qmp_events: &Arc<monitor::event::Events>,
    ) -> machine::Host {
        let (msi, ioevents) = machine::Host::default_msi_io();
        machine::Host {
            msi,
            ioevents,
            manual_loops: None,
            guest_code: false,
            irq,
            events: qmp_events.clone(),
            system: Arc::new(events.clone()),
            timers: devices::timer::Timers::new(clock.clone()),
            clock,
            serial_out: self.serial.iter().map(|c| c.writer()).collect(),
            debugcon_out: self.debugcon.as_ref().map(|c| c.writer()),
            rtc_start: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
                + self.rtc_offset,
        }
    }

    fn attach(&self, pc: &machine::Machine) {
        for (i, c) in self.serial.iter().enumerate() {
            c.attach(pc.uarts.get(i).cloned());
        }
    }
}

/// Runs the machine until it powers off or the user quits. Returns the
/// process exit status. `ready` runs once, when the first machine is built
/// and the chardevs and monitors are listening (`-daemonize` lets its
/// parent go then).
pub fn run(cfg: MachineConfig, ready: impl FnOnce()) -> Result<i32, VmmError> {
    match cfg.accel {
        Accel::Kvm => run_kvm(cfg, ready),
        Accel::Qtest => qtest::run(cfg, ready),
    }
}

/// Checks what can be checked before any guest memory is touched.
pub fn validate(cfg: &MachineConfig) -> Result<(), VmmError> {
    if cfg.incoming.is_some() && cfg.accel == config::Accel::Kvm {
        return Err(VmmError::Config(format!(
            "-incoming: {}",
            migration::KVM_BLOCKER
        )));
    }
    if cfg.mem_size < (1 << 20) {
        return Err(VmmError::Config(format!(
            "-m {}: guest memory must be at least 1 MiB",
            cfg.mem_size
        )));
    }
    let host = host_memory();
    if host > 0 && cfg.mem_size > host {
        return Err(VmmError::Config(format!(
            "-m {}M: more than the host's {} MiB of memory and swap",
            cfg.mem_size >> 20,
            host >> 20
        )));
    }
    smbios::Fields::parse(&cfg.smbios).map_err(VmmError::Config)?;
    if cfg.cpus == 0 {
        return Err(VmmError::Config(
            "-smp 0: a machine needs at least one CPU".into(),
        ));
    }
    if cfg.max_cpus < cfg.cpus {
        return Err(VmmError::Config(format!(
            "-smp: maxcpus ({}) must be at least the number of CPUs ({})",
            cfg.max_cpus, cfg.cpus
        )));
    }
    if cfg.cpus > 255 {
        return Err(VmmError::Config(format!(
            "-smp {}: the pc machine supports at most 255 CPUs",
            cfg.cpus
        )));
    }
    Ok(())
}

/// Total RAM plus swap, from /proc/meminfo (0 if unknown).
fn host_memory() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/meminfo") else {
        return 0;
    };
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    field("MemTotal:") + field("SwapTotal:")
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn run_kvm(mut cfg: MachineConfig, ready: impl FnOnce()) -> Result<i32, VmmError> {
    let mut ready = Some(ready);
    validate(&cfg)?;
    let kvm = kvm::open()?;
    let max = kvm.get_max_vcpus();
    if cfg.cpus as usize > max {
        return Err(VmmError::Config(format!(
            "-smp {}: KVM on this host allows at most {max} vCPUs",
            cfg.cpus
        )));
    }
    register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| VmmError::Kvm(format!("cannot install the vCPU kick signal: {e}")))?;
    let (tx, rx) = mpsc::channel();
    let events = EventSender(tx);
    watch_signals(&events)?;
    let consoles = Consoles::open(&cfg, &events)?;
    let (storage, bus) = open_storage(&cfg, &events)?;
    monitor::start(&cfg, &bus, &events)?;
    let mut control = monitor::Control::new(cfg.paused, bus);
    loop {
        let vm = kvm::create_vm(&kvm, device::kvm_pit::reinject(&cfg.globals))?;
        let mut host = consoles.host(
            Arc::new(kvm::KvmIrqChip(vm.clone())),
            &events,
            Arc::new(HostClock::new()),
            &control.events,
        );
        host.msi = Some(Arc::new(kvm::KvmMsi::new(vm.clone())));
        host.guest_code = true;
        host.ioevents = Arc::new(kvm::KvmIoEvents(vm.clone()));
        let gen_cfg = control.machine_config(&cfg);
        let pc = Arc::new(machine::board(&cfg).build(&gen_cfg, host, &storage)?);
        consoles.attach(&pc);
        pc.timers
            .spawn_thread("timers")
            .map_err(|e| VmmError::Kvm(format!("cannot start the device timer thread: {e}")))?;
        let next = kvm::map_memory(&vm, &pc.ram, 0, false)?;
        kvm::map_memory(&vm, &pc.rom, next, kvm::supports_readonly_mem(&vm))?;
        let vcpus = vcpu::create(&kvm, &vm, pc.cpus)?;
        if let (Some(entry), Some(v0)) = (&pc.boot_entry, vcpus.first()) {
            vcpu::set_boot_state(v0, entry)?;
        }
        if let Some(r) = ready.take() {
            r();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(VcpuGate::default());
        gate.set_paused(control.state != monitor::RunState::Running);
        let mut threads = Vec::new();
        let (tid_tx, tid_rx) = mpsc::channel();
        for (id, v) in vcpus.into_iter().enumerate() {
            let (pc, stop, ev, gate) = (pc.clone(), stop.clone(), events.clone(), gate.clone());
            let tid_tx = tid_tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let _ = tid_tx.send((id, thread_id()));
                    drop(tid_tx);
                    vcpu::run(v, id as u32, pc, stop, gate, ev)
                })
                .map_err(|e| VmmError::Kvm(format!("cannot start vCPU thread: {e}")))?;
            threads.push(t);
        }
        drop(tid_tx);
        let mut tids = vec![0; threads.len()];
        for (id, tid) in tid_rx.iter() {
            tids[id] = tid;
        }
        let end = loop {
            let ev = rx.recv().unwrap_or(VmEvent::Quit);
            let action = match ev {
                VmEvent::BlockError {
                    drive,
                    write,
                    action,
                    error,
                    nospace,
                    corrupt,
                } => {
                    let stop = control.block_error(&drive, write, action, &error, nospace, corrupt);
                    if stop {
                        eprintln!(
                            "strata: drive {drive}: {error}; guest stopped by its error policy \
                             (Ctrl-A c, then 'cont' retries)"
                        );
                        monitor::Action::Pause
                    } else {
                        monitor::Action::None
                    }
                }
                VmEvent::Monitor(req) => {
                    let ctx = monitor::Ctx {
                        cfg: &cfg,
                        storage: &storage,
                        machine: &pc,
                        vcpu_threads: &tids,
                    };
                    control.run(req, &ctx)
                }
                // Neither comes under KVM (no qtest channel; -incoming is
                // refused at start).
                VmEvent::Qtest(_) | VmEvent::Migration(_) => monitor::Action::None,
                VmEvent::PciEject(slot) => {
                    control.pci_eject(&pc, slot);
                    monitor::Action::None
                }
                VmEvent::Reset => break End::Reset { guest: true },
                VmEvent::Shutdown => break End::Shutdown,
                VmEvent::Quit => break End::Quit { reason: "host-ui" },
                VmEvent::HostSignal => {
                    break End::Quit {
                        reason: "host-signal",
                    }
                }
                VmEvent::Error(e) => break End::Error(e),
            };
            match action {
                monitor::Action::Pause => {
                    gate.set_paused(true);
                    // Take the vCPUs out of KVM_RUN; they wait at the gate.
                    // A kick that lands just before a thread enters KVM_RUN
                    // is lost, so kick until all are parked. A vCPU blocked
                    // in a stopped drive's I/O cannot park until `cont`, so
                    // give up after a while: it reaches the gate on its own.
                    let deadline = std::time::Instant::now() + Duration::from_millis(200);
                    while gate.parked() < threads.len() && std::time::Instant::now() < deadline {
                        for t in &threads {
                            let _ = t.kill(kick_signal());
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                monitor::Action::Resume => {
                    storage.resume();
                    gate.set_paused(false);
                }
                monitor::Action::Reset => break End::Reset { guest: false },
                monitor::Action::Quit => {
                    break End::Quit {
                        reason: "host-qmp-quit",
                    }
                }
                monitor::Action::None => {}
                // KVM machines are blocked from migrating: never asked.
                monitor::Action::Migrate => control.outgoing = None,
            }
        };
        stop.store(true, Ordering::Release);
        gate.set_paused(false);
        for t in threads {
            while !t.is_finished() {
                let _ = t.kill(kick_signal());
                t.thread().unpark();
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = t.join();
        }
        // Drop events raised by other vCPUs while stopping; monitor
        // requests among them are answered by the next generation.
        let mut keep = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            if let VmEvent::Monitor(_) = ev {
                keep.push(ev);
            }
        }
        match end {
            End::Reset { guest } if !cfg.no_reboot => {
                log::info!("reset: rebuilding the machine");
                control.reset(guest);
                // `-boot once=` applies to the first boot only; resets go
                // back to `order=` (QEMU's restore_boot_order).
                cfg.boot.once = None;
                for ev in keep {
                    events.send(ev);
                }
                continue;
            }
            End::Reset { guest } => {
                control.shutdown(guest, "guest-reset");
                return Ok(0);
            }
            End::Shutdown => {
                control.shutdown(true, "guest-shutdown");
                return Ok(0);
            }
            End::Quit { reason } => {
                control.shutdown(false, reason);
                return Ok(0);
            }
            End::Error(msg) => return Err(VmmError::Guest(msg)),
        }
    }
}

/// The process's storage, with its stopped requests reported to the main
/// loop and its block jobs' events on a new QMP event bus (every runner:
/// KVM, qtest, the storage daemon).
fn open_storage(
    cfg: &MachineConfig,
    events: &EventSender,
) -> Result<(storage::Storage, Arc<monitor::event::Events>), VmmError> {
    let storage = storage::Storage::open(cfg)?;
    storage.set_stop_handlers(events);
    let bus = Arc::new(monitor::event::Events::default());
    storage
        .jobs
        .set_sink(monitor::jobs_event_sink(bus.clone(), storage.graph.clone()));
    Ok((storage, bus))
}

/// SIGTERM, SIGINT and SIGHUP end the run through the main loop, so that
/// images are flushed and closed and monitors hear SHUTDOWN, instead of
/// the process dying with metadata in memory. (`strata-nbd` watches the
/// same signals the same way.)
pub fn watch_signals(events: &EventSender) -> Result<(), VmmError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| VmmError::Config(format!("cannot watch signals: {e}")))?;
    let ev = events.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for _ in signals.forever() {
                log::info!("termination signal: shutting down");
                ev.send(VmEvent::HostSignal);
            }
        })
        .map_err(|e| VmmError::Config(format!("cannot watch signals: {e}")))?;
    Ok(())
}

/// The calling thread's kernel thread id (QMP's `thread-id`).
pub fn thread_id() -> i32 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}

/// Whether a serial chardev is the process's stdio.
pub fn uses_stdio(cfg: &MachineConfig) -> bool {
    cfg.serial
        .iter()
        .chain(cfg.debugcon.iter())
        .any(|c| matches!(c, CharDev::Stdio { .. }))
}
