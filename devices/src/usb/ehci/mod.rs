//! The ICH9 USB2 enhanced host controller (PCI 8086:293A), QEMU's
//! `ich9-usb-ehci1`: an EHCI with six root hub ports, whose full- and
//! low-speed devices go to companion UHCIs (`ich9-usb-uhci1..3`,
//! [`crate::usb::uhci::Uhci::ich9`]).
//!
//! Spec followed: Enhanced Host Controller Interface Specification for
//! Universal Serial Bus, revision 1.0: chapter 2 (registers: [`regs`]),
//! chapter 3 (data structures: [`qh`], [`qtd`]), chapter 4 (operational
//! model: 4.1 reset and power-on, 4.2 port routing and the companions,
//! 4.6-4.7 the periodic schedule, 4.8 the asynchronous schedule with
//! reclamation, 4.10 queue head and qTD processing, 4.15 interrupts:
//! [`schedule`]). QEMU's hw/usb/hcd-ehci.c and hcd-ehci-pci.c, SeaBIOS's
//! usb-ehci.c and Linux's ehci-hcd were read for what drivers rely on:
//! PORTSC line status is only ever tested for the K-state of a low-speed
//! device (QEMU leaves it 0 otherwise, and the peer test compares it);
//! a full-speed device on an EHCI port stays disabled after reset, and
//! the driver then gives the port to the companion with PORT_OWNER.
//!
//! Time: a frame (eight microframes) per millisecond while USBCMD.RS is
//! set, as [`crate::usb::uhci::Uhci`]: the vmm drives [`Ehci::poll`] from
//! the timer [`Ehci::set_frame_timer`] arms. Each frame runs the periodic
//! schedule's frame list entry once and the asynchronous schedule until a
//! pass over the ring moves nothing (the H bit's reclamation), both
//! bounded ([`MAX_VISITS`], [`FRAME_BYTES`]); a schedule pointer or
//! buffer outside guest RAM (or DMA with bus mastering off) is a Host
//! System Error, which halts the controller.

pub mod fuzz;
pub mod qh;
pub mod qtd;
pub mod regs;
mod schedule;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::control::ControlPipe;
use super::{best_speed, Endpoint, Speed, UsbDevice, Wakeup};
use crate::clock::Clock;
use crate::irq::IrqLine;
use crate::pci::{BarKind, PciConfig, PciFunction};
use crate::GuestMem;
use regs::{cmd, op, pci, port, sts, N_PORTS};

pub use regs::pci::BAR_MEM;

/// One frame.
pub const FRAME_NS: u64 = 1_000_000;
/// Frames one [`Ehci::poll`] runs to catch up before FRINDEX jumps.
pub const MAX_CATCHUP: u64 = 16;
/// Schedule structures (frame list entries, QHs, iTDs...) each schedule
/// visits at most in a frame: a looping or endless list ends it.
pub const MAX_VISITS: u32 = 4096;
/// Bytes one frame moves at most: about what 480 Mb/s carries in a
/// millisecond.
pub const FRAME_BYTES: usize = 60 * 1024 * 8;

/// A companion host controller of the EHCI (EHCI 4.2): a USB 1.1
/// controller whose root ports are some of the EHCI's ports. The EHCI
/// hands it the device of a port it owns and takes it back when the
/// owner changes. [`crate::usb::uhci::Uhci`] is one.
///
/// The EHCI calls these under its own lock: a companion must never lock
/// the EHCI.
pub trait Companion: Send {
    /// Root ports it has.
    fn ports(&self) -> usize;
    /// Takes `dev` onto its root port `port` (a connect), or gives it
    /// back with the reason it cannot.
    fn attach(
        &mut self,
        port: usize,
        dev: Box<dyn UsbDevice>,
    ) -> Result<(), (String, Box<dyn UsbDevice>)>;
    /// Gives back the device of its root port `port` (a disconnect).
    fn detach(&mut self, port: usize) -> Option<Box<dyn UsbDevice>>;
}

/// A registered companion.
pub type CompanionHandle = Arc<Mutex<dyn Companion>>;

struct Port {
    /// PE, PR and the RW and write-one-to-clear bits; CCS, PP and the
    /// line status are derived, PO is `owner_companion`.
    sc: u32,
    /// The device, while the EHCI holds it (its own port, or a
    /// companion's port with no companion to hand it to).
    dev: Option<Box<dyn UsbDevice>>,
    /// The device is on the companion's port.
    on_companion: bool,
    /// PORT_OWNER.
    owner_companion: bool,
    pipe: ControlPipe,
}

struct CompanionSlot {
    first: usize,
    count: usize,
    hc: CompanionHandle,
}

/// The ICH9 EHCI as a PCI function.
///
/// The vmm builds it with [`Ehci::new`] (guest RAM, the line of its INTx
/// pin, INTD#, from the machine's routing, the clock), puts it on the
/// PCI bus as `Arc<Mutex<Ehci>>` (QEMU: 1D.7, multifunction with the
/// UHCIs at 1D.0-2), registers each companion with
/// [`Ehci::register_companion`] (`masterbus=<ehci>.0,firstport=N`),
/// drives the frame clock like the UHCI's ([`Ehci::set_frame_timer`],
/// [`Ehci::poll`]), and places `usb-*` devices on its ports with
/// [`Ehci::attach`] / [`Ehci::detach`] (hotplug too).
pub struct Ehci {
    config: PciConfig,
    mem: Arc<GuestMem>,
    irq: Arc<dyn IrqLine>,
    clock: Arc<dyn Clock>,
    usbcmd: u32,
    /// The write-one-to-clear causes, HCHalted and Reclamation.
    usbsts: u32,
    usbintr: u32,
    frindex: u32,
    periodic_base: u32,
    async_addr: u32,
    configflag: u32,
    ports: [Port; N_PORTS],
    companions: Vec<CompanionSlot>,
    next_frame: Option<u64>,
    timer: Option<Arc<dyn Fn(u64) + Send + Sync>>,
    wakeups: Arc<AtomicU64>,
    irq_level: bool,
}

impl Ehci {
    pub fn new(mem: Arc<GuestMem>, irq: Arc<dyn IrqLine>, clock: Arc<dyn Clock>) -> Ehci {
        let mut config = PciConfig::new(pci::VENDOR_ID, pci::DEVICE_ID, pci::CLASS, pci::REVISION);
        config.add_bar(pci::BAR_MEM, BarKind::Mem32, pci::MEM_SIZE);
        // INTD#, as QEMU's EHCI functions.
        config.set_interrupt_pin(4);
        config.set_subsystem(0x1af4, 0x1100);
        config.set_u8(pci::SBRN, 0x20);
        config.set_u8(pci::FLADJ, 0x20);
        // FLADJ's six bits and PORTWAKECAP are the BIOS's to set; the
        // frame length is not emulated, only kept.
        config.set_wmask(pci::FLADJ, &[0x3f]);
        config.set_wmask(pci::PORTWAKECAP, &[0xff, 0xff]);
        // USBLEGSUP: capability 1, next 0; the BIOS and OS owned
        // semaphores (bits 16 and 24) are plain read/write: there is no
        // BIOS SMI handler to hand over from.
        config.set_u32(pci::USBLEGSUP, 0x0000_0001);
        config.set_wmask(pci::USBLEGSUP + 2, &[0x01, 0x01]);
        // USBLEGCTLSTS: the SMI enables are kept; no SMI is raised, so
        // the status bits stay zero.
        config.set_wmask(pci::USBLEGCTLSTS, &[0x3f, 0xe0]);
        let new_port = || Port {
            sc: 0,
            dev: None,
            on_companion: false,
            owner_companion: false,
            pipe: ControlPipe::new(),
        };
        let mut e = Ehci {
            config,
            mem,
            irq,
            clock,
            usbcmd: cmd::ITC_DEFAULT,
            usbsts: sts::HALTED,
            usbintr: 0,
            frindex: 0,
            periodic_base: 0,
            async_addr: 0,
            configflag: 0,
            ports: std::array::from_fn(|_| new_port()),
            companions: Vec::new(),
            next_frame: None,
            timer: None,
            wakeups: Arc::new(AtomicU64::new(0)),
            irq_level: false,
        };
        e.hc_reset();
        e
    }

    /// Registers a companion whose root ports are the EHCI's ports
    /// `firstport..firstport + companion.ports()` (QEMU's `masterbus`
    /// and `firstport` properties). Errors name QEMU's conditions: the
    /// range beyond the six ports, or a port that has a companion
    /// already.
    pub fn register_companion(
        &mut self,
        firstport: usize,
        companion: CompanionHandle,
    ) -> Result<(), String> {
        let count = lock(&companion).ports();
        let end = firstport
            .checked_add(count)
            .filter(|&e| e <= N_PORTS)
            .ok_or_else(|| {
                format!(
                    "firstport must be between 0 and {}",
                    N_PORTS.saturating_sub(count)
                )
            })?;
        if let Some(p) = (firstport..end).find(|&p| self.companion_of(p).is_some()) {
            return Err(format!("port {} has a companion assigned already", p + 1));
        }
        self.companions.push(CompanionSlot {
            first: firstport,
            count,
            hc: companion,
        });
        // With CONFIGFLAG clear the companion owns its ports now (4.2).
        for i in firstport..end {
            self.ports[i].owner_companion = self.configflag == 0;
            self.route(i);
        }
        Ok(())
    }

    /// The companion of port `i` and the port's number on it.
    fn companion_of(&self, i: usize) -> Option<(CompanionHandle, usize)> {
        self.companions
            .iter()
            .find(|c| (c.first..c.first + c.count).contains(&i))
            .map(|c| (c.hc.clone(), i - c.first))
    }

    /// Attaches `dev` to port `index` (0-5): at high speed when it can,
    /// else at full or low speed, which only a port with a companion
    /// takes (the driver hands it over after its reset). A port a
    /// companion owns gives the device straight to the companion.
    pub fn attach(&mut self, index: usize, dev: Box<dyn UsbDevice>) -> Result<(), String> {
        let Some(p) = self.ports.get(index) else {
            return Err(format!(
                "EHCI port {} does not exist (1-{N_PORTS})",
                index + 1
            ));
        };
        if p.dev.is_some() || p.on_companion {
            return Err(format!("EHCI port {} is in use", index + 1));
        }
        let high = dev.speeds().contains(&Speed::High);
        if !high && self.companion_of(index).is_none() {
            return Err(
                "the device cannot run at high speed, and this EHCI port has no companion".into(),
            );
        }
        if self.ports[index].owner_companion {
            return self
                .give_to_companion(index, dev)
                .map_err(|(e, _)| format!("EHCI port {}: {e}", index + 1));
        }
        self.connect(index, dev);
        Ok(())
    }

    /// Hands `dev` to the companion of port `i`, or gives it back.
    fn give_to_companion(
        &mut self,
        i: usize,
        mut dev: Box<dyn UsbDevice>,
    ) -> Result<(), (String, Box<dyn UsbDevice>)> {
        let Some((c, local)) = self.companion_of(i) else {
            return Err(("the port has no companion".into(), dev));
        };
        dev.set_wakeup(None);
        lock(&c).attach(local, dev)?;
        self.ports[i].on_companion = true;
        Ok(())
    }

    /// Detaches the device of port `index`, from the EHCI or from its
    /// companion (hot-unplug).
    pub fn detach(&mut self, index: usize) -> Option<Box<dyn UsbDevice>> {
        let p = self.ports.get_mut(index)?;
        if p.on_companion {
            p.on_companion = false;
            let (c, local) = self.companion_of(index)?;
            let dev = lock(&c).detach(local);
            return dev;
        }
        if p.owner_companion {
            // Held for a companion that was never registered: invisible.
            return p.dev.take();
        }
        let dev = self.disconnect(index)?;
        Some(dev)
    }

    /// An EHCI-owned connect (2.3.9): CCS and CSC, a port change.
    fn connect(&mut self, i: usize, mut dev: Box<dyn UsbDevice>) {
        let speed = best_speed(dev.speeds(), &[Speed::High])
            .or_else(|| best_speed(dev.speeds(), &[Speed::Low, Speed::Full]))
            .unwrap_or(Speed::Full);
        dev.set_speed(speed);
        dev.reset();
        let count = self.wakeups.clone();
        let wake: Wakeup = Arc::new(move |_ep: Endpoint| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        dev.set_wakeup(Some(wake));
        let p = &mut self.ports[i];
        p.dev = Some(dev);
        p.pipe.reset();
        p.sc |= port::CSC;
        self.usbsts |= sts::PCD;
        self.update_irq();
    }

    /// An EHCI-owned disconnect: CCS and PE drop, CSC (and PEC).
    fn disconnect(&mut self, i: usize) -> Option<Box<dyn UsbDevice>> {
        let p = &mut self.ports[i];
        let mut dev = p.dev.take()?;
        dev.set_wakeup(None);
        if p.sc & port::PE != 0 {
            p.sc |= port::PEC;
        }
        p.sc = (p.sc & !(port::PE | port::PR | port::SUSPEND)) | port::CSC;
        p.pipe.reset();
        self.usbsts |= sts::PCD;
        self.update_irq();
        Some(dev)
    }

    /// Puts port `i`'s device where PORT_OWNER says (4.2.2): a device on
    /// the wrong side is disconnected there and connected on the other.
    fn route(&mut self, i: usize) {
        let p = &self.ports[i];
        if p.owner_companion && p.dev.is_some() && !p.on_companion {
            if self.companion_of(i).is_none() {
                return;
            }
            let Some(dev) = self.disconnect(i) else {
                return;
            };
            if let Err((e, dev)) = self.give_to_companion(i, dev) {
                // Kept, invisible, until the port comes back to the EHCI.
                log::warn!(
                    "ehci: port {}: the companion refused the device: {e}",
                    i + 1
                );
                self.ports[i].dev = Some(dev);
            }
        } else if !p.owner_companion && p.on_companion {
            let Some((c, local)) = self.companion_of(i) else {
                return;
            };
            self.ports[i].on_companion = false;
            let dev = lock(&c).detach(local);
            if let Some(dev) = dev {
                self.connect(i, dev);
            }
        }
    }

    /// Registers the callback that arms the vmm's timer with the first
    /// frame's deadline when USBCMD.RS is set. It runs under the
    /// function's lock, so it must not lock the function.
    pub fn set_frame_timer(&mut self, arm: Arc<dyn Fn(u64) + Send + Sync>) {
        self.timer = Some(arm);
    }

    /// When the next frame is due, `None` while halted.
    pub fn next_deadline(&self) -> Option<u64> {
        self.next_frame
    }

    /// Runs the frames due by now (at most [`MAX_CATCHUP`], FRINDEX
    /// jumping over the rest) and returns the next deadline, `None` once
    /// halted.
    pub fn poll(&mut self) -> Option<u64> {
        let now = self.clock.now_ns();
        let mut n = 0;
        while let Some(due) = self.next_frame {
            if now < due {
                break;
            }
            if n == MAX_CATCHUP {
                let behind = (now - due) / FRAME_NS + 1;
                self.advance_frindex(behind);
                self.next_frame = Some(due.saturating_add(behind.saturating_mul(FRAME_NS)));
                self.update_irq();
                break;
            }
            self.run_frame();
            n += 1;
            if let Some(d) = self.next_frame.as_mut() {
                *d = d.saturating_add(FRAME_NS);
            }
        }
        self.next_frame
    }

    /// How many wakeups devices have sent (EHCI retries NAKed
    /// transactions every frame anyway).
    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }

    /// A system reset.
    pub fn reset(&mut self) {
        self.hc_reset();
    }

    /// USBCMD.HCRESET (2.3.1, 4.1): registers to their defaults,
    /// CONFIGFLAG clear, so every port with a companion goes back to it;
    /// devices on EHCI ports are reset and seen as new connects.
    fn hc_reset(&mut self) {
        self.usbcmd = cmd::ITC_DEFAULT;
        self.usbsts = sts::HALTED;
        self.usbintr = 0;
        self.frindex = 0;
        self.periodic_base = 0;
        self.async_addr = 0;
        self.configflag = 0;
        self.next_frame = None;
        for i in 0..N_PORTS {
            let has_companion = self.companion_of(i).is_some();
            let p = &mut self.ports[i];
            p.sc = 0;
            p.pipe.reset();
            if let Some(d) = p.dev.as_mut() {
                d.reset();
                p.sc |= port::CSC;
            }
            p.owner_companion = has_companion;
            self.route(i);
        }
        self.update_irq();
    }

    fn update_irq(&mut self) {
        let level = self.usbsts & self.usbintr & sts::CAUSES != 0;
        if level != self.irq_level {
            self.irq_level = level;
            self.irq.set_level(level);
        }
    }

    /// Host System Error (2.3.2): the controller halts.
    fn host_system_error(&mut self) {
        self.usbsts |= sts::HSE | sts::HALTED;
        self.usbcmd &= !cmd::RS;
        self.next_frame = None;
        self.update_irq();
    }

    /// FRINDEX by `frames` frames; Frame List Rollover each time the
    /// 1024-entry frame list wraps (FRINDEX bit 13 toggles, 2.3.2).
    fn advance_frindex(&mut self, frames: u64) {
        let old = self.frindex;
        let new = (old as u64 + frames.saturating_mul(8)) & 0x3fff;
        let wrapped = frames >= 1024 || (new as u32) >> 13 != old >> 13;
        self.frindex = new as u32;
        if wrapped {
            self.usbsts |= sts::FLR;
        }
    }

    fn portsc(&self, i: usize) -> u32 {
        let p = &self.ports[i];
        // Ports are always powered (HCSPARAMS.PPC clear).
        let mut v = p.sc | port::PP;
        if p.owner_companion {
            return (v & !(port::PE | port::PR)) | port::PO;
        }
        if let Some(d) = &p.dev {
            v |= port::CCS;
            if d.speed() == Speed::Low && v & port::PE == 0 {
                v |= port::LINE_K;
            }
        }
        v
    }

    fn read_reg(&self, off: u64) -> u32 {
        match off {
            0x00 => regs::CAPLENGTH | regs::HCIVERSION << 16,
            regs::cap::HCSPARAMS => regs::HCSPARAMS,
            regs::cap::HCCPARAMS => regs::HCCPARAMS,
            regs::cap::HCSP_PORTROUTE => 0,
            op::USBCMD => self.usbcmd,
            op::USBSTS => {
                let mut s = self.usbsts;
                if self.usbcmd & cmd::PSE != 0 {
                    s |= sts::PSS;
                }
                if self.usbcmd & cmd::ASE != 0 {
                    s |= sts::ASS;
                }
                s
            }
            op::USBINTR => self.usbintr,
            op::FRINDEX => self.frindex,
            op::CTRLDSSEGMENT => 0,
            op::PERIODICLISTBASE => self.periodic_base,
            op::ASYNCLISTADDR => self.async_addr,
            op::CONFIGFLAG => self.configflag,
            o if (op::PORTSC..op::PORTSC + 4 * N_PORTS as u64).contains(&o) => {
                self.portsc(((o - op::PORTSC) / 4) as usize)
            }
            _ => 0,
        }
    }

    fn write_reg(&mut self, off: u64, v: u32) {
        match off {
            op::USBCMD => self.write_cmd(v),
            op::USBSTS => {
                self.usbsts &= !(v & sts::CAUSES);
                self.update_irq();
            }
            op::USBINTR => {
                self.usbintr = v & sts::CAUSES;
                self.update_irq();
            }
            // Writable only while halted (2.3.4).
            op::FRINDEX if self.usbsts & sts::HALTED != 0 => self.frindex = v & 0x3fff,
            op::PERIODICLISTBASE => self.periodic_base = v & !0xfff,
            op::ASYNCLISTADDR => self.async_addr = v & !0x1f,
            op::CONFIGFLAG => self.write_configflag(v & 1),
            o if (op::PORTSC..op::PORTSC + 4 * N_PORTS as u64).contains(&o) => {
                self.write_port(((o - op::PORTSC) / 4) as usize, v)
            }
            _ => {}
        }
    }

    fn write_cmd(&mut self, v: u32) {
        if v & cmd::HCRESET != 0 {
            self.hc_reset();
            return;
        }
        let was_running = self.usbcmd & cmd::RS != 0;
        // The doorbell stays rung until the controller answers it.
        let iaad = self.usbcmd & cmd::IAAD;
        self.usbcmd = (v & cmd::WRITABLE) | iaad;
        if v & cmd::RS != 0 && !was_running {
            self.usbsts &= !sts::HALTED;
            let due = self.clock.now_ns().saturating_add(FRAME_NS);
            self.next_frame = Some(due);
            if let Some(t) = &self.timer {
                t(due);
            }
        } else if v & cmd::RS == 0 {
            self.usbsts |= sts::HALTED;
            self.next_frame = None;
        }
    }

    /// CONFIGFLAG (2.3.8, 4.2): 0 to 1 gives every port to the EHCI.
    fn write_configflag(&mut self, v: u32) {
        let rising = v == 1 && self.configflag == 0;
        self.configflag = v;
        if rising {
            for i in 0..N_PORTS {
                self.ports[i].owner_companion = false;
                self.route(i);
            }
        }
    }

    fn write_port(&mut self, i: usize, v: u32) {
        // PORT_OWNER first (4.2.2): only a port with a companion can be
        // given to one.
        let want = v & port::PO != 0 && self.companion_of(i).is_some();
        if want != self.ports[i].owner_companion {
            self.ports[i].owner_companion = want;
            self.ports[i].sc &= !(port::PE | port::PR);
            self.route(i);
        }
        let p = &mut self.ports[i];
        p.sc &= !(v & port::CHANGES);
        p.sc = (p.sc & !port::RW) | (v & port::RW);
        if p.owner_companion {
            return;
        }
        // PE: software may only disable (2.3.9).
        if v & port::PE == 0 {
            p.sc &= !port::PE;
        }
        if v & port::PR != 0 && p.sc & port::PR == 0 {
            // Port reset starts: the device sees a bus reset; the port is
            // disabled until the reset ends.
            if let Some(d) = p.dev.as_mut() {
                d.reset();
            }
            p.pipe.reset();
            p.sc = (p.sc & !port::PE) | port::PR;
        } else if v & port::PR == 0 && p.sc & port::PR != 0 {
            // The reset ends (the driver timed its 50 ms): a high-speed
            // device is enabled; anything slower stays disabled, for the
            // driver to hand to the companion (4.2.2).
            p.sc &= !port::PR;
            if p.dev.as_ref().is_some_and(|d| d.speed() == Speed::High) {
                p.sc |= port::PE;
            }
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PciFunction for Ehci {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    /// Registers are dwords; a narrower read takes its bytes from the
    /// dword (CAPLENGTH and HCIVERSION are read as a byte and a word by
    /// some drivers).
    fn region_read(&mut self, region: usize, offset: u64, data: &mut [u8]) {
        if region != pci::BAR_MEM {
            data.fill(0xff);
            return;
        }
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *b = (self.read_reg(at & !3) >> ((at & 3) * 8)) as u8;
        }
    }

    /// Writes are dwords (an 8-byte access is two); narrower writes are
    /// dropped, as QEMU's operational registers accept only dwords: a
    /// partial write would have to guess the other bytes of registers
    /// with write-one-to-clear bits.
    fn region_write(&mut self, region: usize, offset: u64, data: &[u8]) {
        if region != pci::BAR_MEM || offset & 3 != 0 || !data.len().is_multiple_of(4) {
            return;
        }
        for (i, c) in data.chunks_exact(4).enumerate() {
            let v = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            self.write_reg(offset + 4 * i as u64, v);
        }
    }
}
