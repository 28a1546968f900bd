//! The qtest accelerator: the whole `pc` machine without vCPUs, driven over
//! QEMU's qtest text protocol (as implemented by QEMU's system/qtest.c and
//! its libqtest client). A test plays the guest: it does port I/O, reads and
//! writes guest physical memory (RAM, ROM and MMIO), steps the clock, and
//! watches interrupt lines.
//!
//! Each request is one line; each reply is `OK [value]` or `FAIL reason`.
//! Interrupt changes arrive asynchronously as `IRQ raise N` / `IRQ lower N`
//! lines once `irq_intercept_in` (or `_out`) has been sent.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use base64::Engine;
use devices::bus::lock;
use devices::clock::{Clock, ManualClock};
use devices::irq::{IrqChip, IrqLine};
use vm_memory::{Bytes, GuestAddress};

use crate::config::{CharDev, MachineConfig};
use crate::machine::{self, Machine};
use crate::{monitor, Consoles, EventSender, VmEvent, VmmError};

type Out = Arc<Mutex<Box<dyn Write + Send>>>;

/// Interrupt lines that report their changes on the qtest channel.
pub struct QtestIrqChip {
    out: Out,
    intercept: AtomicBool,
    levels: Mutex<Vec<bool>>,
}

struct QtestIrq {
    chip: Arc<QtestIrqChip>,
    gsi: u32,
}

impl IrqLine for QtestIrq {
    fn set_level(&self, level: bool) {
        let mut levels = lock(&self.chip.levels);
        let i = self.gsi as usize;
        if levels.len() <= i {
            levels.resize(i + 1, false);
        }
        if levels[i] == level {
            return;
        }
        levels[i] = level;
        if self.chip.intercept.load(Ordering::SeqCst) {
            let what = if level { "raise" } else { "lower" };
            let _ = writeln!(lock(&self.chip.out), "IRQ {what} {}", self.gsi);
        }
    }
}

struct ChipHandle(Arc<QtestIrqChip>);

impl IrqChip for ChipHandle {
    fn line(&self, gsi: u32) -> Arc<dyn IrqLine> {
        Arc::new(QtestIrq {
            chip: self.0.clone(),
            gsi,
        })
    }
}

type Channel = (Box<dyn Read + Send>, Box<dyn Write + Send>);

fn open_channel(dev: &CharDev) -> Result<Channel, VmmError> {
    match dev {
        CharDev::Stdio { .. } => Ok((Box::new(std::io::stdin()), Box::new(std::io::stdout()))),
        CharDev::Unix {
            path,
            server: false,
            ..
        } => {
            let s = UnixStream::connect(path)
                .map_err(|e| VmmError::Config(format!("-qtest unix:{}: {e}", path.display())))?;
            let r = s
                .try_clone()
                .map_err(|e| VmmError::Config(format!("-qtest: {e}")))?;
            Ok((Box::new(r), Box::new(s)))
        }
        CharDev::Unix { path, .. } => {
            let l = std::os::unix::net::UnixListener::bind(path)
                .map_err(|e| VmmError::Config(format!("-qtest unix:{}: {e}", path.display())))?;
            let (s, _) = l
                .accept()
                .map_err(|e| VmmError::Config(format!("-qtest: {e}")))?;
            let r = s
                .try_clone()
                .map_err(|e| VmmError::Config(format!("-qtest: {e}")))?;
            Ok((Box::new(r), Box::new(s)))
        }
        _ => Err(VmmError::Config("-qtest: use unix:PATH or stdio".into())),
    }
}

pub fn run(cfg: MachineConfig, ready: impl FnOnce()) -> Result<i32, VmmError> {
    crate::validate(&cfg)?;
    let dev = cfg
        .qtest
        .clone()
        .ok_or_else(|| VmmError::Config("-accel qtest needs -qtest".into()))?;
    let (input, output) = open_channel(&dev)?;
    let out: Out = Arc::new(Mutex::new(output));
    let chip = Arc::new(QtestIrqChip {
        out: out.clone(),
        intercept: AtomicBool::new(false),
        levels: Mutex::new(Vec::new()),
    });
    let clock = Arc::new(ManualClock::default());
    let (tx, rx) = mpsc::channel();
    let events = EventSender(tx);
    crate::watch_signals(&events)?;
    let consoles = Consoles::open(&cfg, &events)?;
    let (storage, bus) = crate::open_storage(&cfg, &events)?;
    monitor::start(&cfg, &bus, &events)?;
    let mut control = monitor::Control::new(cfg.paused, bus.clone());
    let build = |gen_cfg: &MachineConfig| -> Result<Machine, VmmError> {
        let host = consoles.host(
            Arc::new(ChipHandle(chip.clone())),
            &events,
            clock.clone(),
            &bus,
        );
        let pc = machine::board(&cfg).build(gen_cfg, host, &storage)?;
        consoles.attach(&pc);
        Ok(pc)
    };
    let mut pc = build(&cfg)?;
    // A destination answers qtest and QMP while it waits for the source
    // (libqos reads fw_cfg and PCI config then): listen before `ready`.
    if let Some(uri) = &cfg.incoming {
        control.incoming();
        crate::migration::run::listen(uri, &pc, &events).map_err(VmmError::Config)?;
    }
    ready();
    let mut log: Option<std::fs::File> = match &cfg.qtest_log {
        Some(p) => Some(
            std::fs::File::create(p)
                .map_err(|e| VmmError::Config(format!("-qtest-log {}: {e}", p.display())))?,
        ),
        None => None,
    };
    // The protocol is read on its own thread and its lines join the
    // monitor requests on the main loop, which owns the machine.
    let reader_events = events.clone();
    std::thread::Builder::new()
        .name("qtest-in".into())
        .spawn(move || {
            for line in BufReader::new(input).lines() {
                let Ok(line) = line else { break };
                reader_events.send(VmEvent::Qtest(line));
            }
            reader_events.send(VmEvent::Quit);
        })
        .map_err(|e| VmmError::Config(format!("-qtest: {e}")))?;
    let mut pending = std::collections::VecDeque::new();
    loop {
        let ev = match pending.pop_front() {
            Some(ev) => ev,
            None => rx.recv().unwrap_or(VmEvent::Quit),
        };
        let end = match ev {
            VmEvent::Qtest(line) => {
                let reply = Session {
                    pc: &pc,
                    chip: &chip,
                    clock: &clock,
                }
                .handle(line.trim());
                if let Some(l) = log.as_mut() {
                    let _ = writeln!(l, "[R] {line}\n[S] {reply}");
                }
                let mut o = lock(&out);
                if writeln!(o, "{reply}").and_then(|_| o.flush()).is_err() {
                    break;
                }
                drop(o);
                // A reset the command caused takes effect before the next
                // command, as a system reset does between two vCPU
                // instructions: what it raised is already queued, so take
                // it ahead of the requests that were waiting.
                let mut end = None;
                while let Ok(ev) = rx.try_recv() {
                    match ev {
                        VmEvent::Reset | VmEvent::Shutdown | VmEvent::Error(_) if end.is_none() => {
                            end = Some(ev)
                        }
                        other => pending.push_back(other),
                    }
                }
                end
            }
            VmEvent::Monitor(req) => {
                let ctx = monitor::Ctx {
                    cfg: &cfg,
                    storage: &storage,
                    machine: &pc,
                    vcpu_threads: &[],
                };
                match control.run(req, &ctx) {
                    monitor::Action::Reset => {
                        control.reset(false);
                        pc = build(&control.machine_config(&cfg))?;
                        None
                    }
                    monitor::Action::Quit => {
                        control.shutdown(false, "host-qmp-quit");
                        return Ok(0);
                    }
                    monitor::Action::Resume => {
                        storage.resume();
                        // I/O a migration brought along halted runs again.
                        pc.vmstate.resume_all();
                        None
                    }
                    monitor::Action::Migrate => {
                        crate::migration::run::outgoing(&mut control, &pc, &storage, &clock);
                        None
                    }
                    _ => None,
                }
            }
            VmEvent::Migration(inc) => {
                let inc = *inc;
                let r = match &inc.result {
                    Ok(got) => {
                        crate::migration::run::load(&mut control, &pc, &storage, &clock, got)
                            .map(|_| ())
                    }
                    Err(e) => Err(e.clone()),
                };
                let _ = inc.reply.send(r.clone());
                if let Err(e) = r {
                    // QEMU's destination exits when a load fails.
                    eprintln!("strata: -incoming: load of migration failed: {e}");
                    return Ok(1);
                }
                None
            }
            VmEvent::BlockError {
                drive,
                write,
                action,
                error,
                nospace,
                corrupt,
            } => {
                control.block_error(&drive, write, action, &error, nospace, corrupt);
                None
            }
            VmEvent::PciEject(slot) => {
                control.pci_eject(&pc, slot);
                None
            }
            other => Some(other),
        };
        match end {
            None => {}
            Some(VmEvent::Reset) if !cfg.no_reboot => {
                control.reset(true);
                pc = build(&control.machine_config(&cfg))?;
            }
            Some(VmEvent::Reset) => {
                control.shutdown(true, "guest-reset");
                return Ok(0);
            }
            Some(VmEvent::Shutdown) => {
                control.shutdown(true, "guest-shutdown");
                return Ok(0);
            }
            Some(VmEvent::HostSignal) => {
                control.shutdown(false, "host-signal");
                return Ok(0);
            }
            Some(_) => {
                control.shutdown(false, "host-qmp-quit");
                return Ok(0);
            }
        }
    }
    Ok(0)
}

struct Session<'a> {
    pc: &'a Machine,
    chip: &'a QtestIrqChip,
    clock: &'a ManualClock,
}

/// Parses a number as C's strtoull with base 0 does: 0x hex, 0 octal, decimal.
fn num(s: Option<&&str>) -> Result<u64, String> {
    let s = s.ok_or("missing argument")?;
    let r = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8)
    } else if let Some(neg) = s.strip_prefix('-') {
        neg.parse::<u64>().map(|v| v.wrapping_neg())
    } else {
        s.parse()
    };
    r.map_err(|_| format!("invalid number '{s}'"))
}

/// Largest single memory transfer a command may ask for: bounds the
/// allocation a test (or a fuzzer on this socket) can cause.
const MAX_XFER: u64 = 64 << 20;

impl Session<'_> {
    fn handle(&mut self, line: &str) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        match self.dispatch(&words) {
            Ok(r) => r,
            Err(e) => format!("FAIL {e}"),
        }
    }

    fn mem_read(&self, addr: u64, buf: &mut [u8]) {
        let a = GuestAddress(addr);
        if self.pc.ram.read_slice(buf, a).is_ok() || self.pc.rom.read_slice(buf, a).is_ok() {
            return;
        }
        // MMIO, in naturally sized pieces.
        for (i, chunk) in buf.chunks_mut(8).enumerate() {
            self.pc.mmio.read(addr + 8 * i as u64, chunk);
        }
    }

    fn mem_write(&self, addr: u64, buf: &[u8]) {
        let a = GuestAddress(addr);
        if self.pc.ram.write_slice(buf, a).is_ok()
            || self.pc.rom.read_slice(&mut vec![0; buf.len()], a).is_ok()
        {
            return; // ROM writes are dropped.
        }
        for (i, chunk) in buf.chunks(8).enumerate() {
            self.pc.mmio.write(addr + 8 * i as u64, chunk);
        }
    }

    fn dispatch(&mut self, w: &[&str]) -> Result<String, String> {
        let Some(&cmd) = w.first() else {
            return Err("empty command".into());
        };
        let size = |c: &str| match c.chars().last() {
            Some('b') => 1,
            Some('w') => 2,
            Some('l') => 4,
            _ => 8,
        };
        match cmd {
            "outb" | "outw" | "outl" => {
                let (port, v) = (num(w.get(1))?, num(w.get(2))?);
                self.pc
                    .io
                    .write(port & 0xffff, &v.to_le_bytes()[..size(cmd)]);
                Ok("OK".into())
            }
            "inb" | "inw" | "inl" => {
                let port = num(w.get(1))?;
                let mut b = [0u8; 8];
                self.pc.io.read(port & 0xffff, &mut b[..size(cmd)]);
                Ok(format!("OK 0x{:04x}", u64::from_le_bytes(b)))
            }
            "writeb" | "writew" | "writel" | "writeq" => {
                let (addr, v) = (num(w.get(1))?, num(w.get(2))?);
                self.mem_write(addr, &v.to_le_bytes()[..size(cmd)]);
                Ok("OK".into())
            }
            "readb" | "readw" | "readl" | "readq" => {
                let addr = num(w.get(1))?;
                let mut b = [0u8; 8];
                self.mem_read(addr, &mut b[..size(cmd)]);
                Ok(format!("OK 0x{:016x}", u64::from_le_bytes(b)))
            }
            "read" | "b64read" => {
                let (addr, len) = (num(w.get(1))?, num(w.get(2))?);
                if len > MAX_XFER {
                    return Err(format!("size {len} too large"));
                }
                let mut buf = vec![0u8; len as usize];
                self.mem_read(addr, &mut buf);
                if cmd == "read" {
                    let hex: String = buf.iter().map(|b| format!("{b:02x}")).collect();
                    Ok(format!("OK 0x{hex}"))
                } else {
                    Ok(format!(
                        "OK {}",
                        base64::engine::general_purpose::STANDARD.encode(&buf)
                    ))
                }
            }
            "write" | "b64write" => {
                let (addr, len) = (num(w.get(1))?, num(w.get(2))?);
                if len > MAX_XFER {
                    return Err(format!("size {len} too large"));
                }
                let data = w.get(3).ok_or("missing data")?;
                let mut buf = if cmd == "write" {
                    let hex = data.strip_prefix("0x").ok_or("data must start with 0x")?;
                    (0..hex.len() / 2)
                        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
                        .collect::<Result<Vec<u8>, _>>()
                        .map_err(|_| "invalid hex data")?
                } else {
                    base64::engine::general_purpose::STANDARD
                        .decode(data)
                        .map_err(|_| "invalid base64 data")?
                };
                // Short data is padded with zeros, as QEMU does.
                buf.resize(len as usize, 0);
                self.mem_write(addr, &buf);
                Ok("OK".into())
            }
            "memset" => {
                let (addr, len, v) = (num(w.get(1))?, num(w.get(2))?, num(w.get(3))?);
                if len > MAX_XFER {
                    return Err(format!("size {len} too large"));
                }
                self.mem_write(addr, &vec![v as u8; len as usize]);
                Ok("OK".into())
            }
            "clock_step" => {
                // With no argument QEMU steps to the next timer deadline
                // (none armed: the clock stays).
                let now = self.clock.now_ns();
                let target = match w.get(1) {
                    Some(_) => now.saturating_add(num(w.get(1))?),
                    None => self.pc.timers.next_deadline().unwrap_or(now).max(now),
                };
                self.pc.timers.advance(target, |ns| self.clock.set(ns));
                Ok(format!("OK {}", self.clock.now_ns()))
            }
            "clock_set" => {
                let ns = num(w.get(1))?;
                let target = ns.max(self.clock.now_ns());
                self.pc.timers.advance(target, |t| self.clock.set(t));
                Ok(format!("OK {}", self.clock.now_ns()))
            }
            "irq_intercept_in" | "irq_intercept_out" => {
                w.get(1).ok_or("missing QOM path")?;
                if self.chip.intercept.swap(true, Ordering::SeqCst) {
                    return Err("Interrupts already intercepted".into());
                }
                Ok("OK".into())
            }
            "endianness" => Ok("OK little".into()),
            _ => Err(format!("Unknown command '{cmd}'")),
        }
    }
}
