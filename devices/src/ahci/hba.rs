//! The HBA: ICH9's AHCI function (8086:2922, class 01.06.01) with its
//! ports behind ABAR, and the interrupt they share.
//!
//! Specs followed: AHCI 1.3.1 section 2.1 (PCI header: ABAR in BAR5),
//! 3.1 (generic host control), 10.4.3 (HBA reset through GHC.HR) and
//! 5.3.1 (the port interrupt bits feeding IS and the INTx line); the ICH9
//! datasheet section 14.1 for the IDs and class.
//!
//! Block I/O a port needs runs outside every lock ([`run_io`]); its
//! completion, on an I/O thread, continues the port and updates the
//! interrupt.

use std::sync::{Arc, Mutex};

use super::port::{Port, PortIo};
use super::regs::{HostEvent, HostRegs, PORT_BASE, PORT_LEN};
use crate::ata::AtaDevice;
use crate::bus::lock;
use crate::irq::IrqLine;
use crate::pci::{BarKind, PciConfig, PciFunction};
use crate::GuestMem;

/// ICH9's six SATA ports.
pub const PORTS: usize = 6;
/// The BAR holding ABAR, and its size (the port registers end at
/// 0x100 + 32 * 0x80; ICH9 decodes 2 KiB, QEMU 4 KiB).
pub const ABAR: usize = 5;
const ABAR_SIZE: u64 = 0x1000;

/// What ports and host share: the host IS register, GHC.IE and the line.
struct Irq {
    /// Host IS (one bit per port) and GHC.IE.
    state: Mutex<(u32, bool)>,
    line: Arc<dyn IrqLine>,
}

impl Irq {
    /// Port `n` asks for an interrupt (or not): IS.IPS bit n is set while
    /// it does (software clears it, 3.1.3); the line is high while IE and
    /// any IS bit are (level-triggered INTx).
    fn port(&self, n: usize, pending: bool) {
        let mut s = lock(&self.state);
        if pending {
            s.0 |= 1 << n;
        }
        self.line.set_level(s.1 && s.0 != 0);
    }
    fn update(&self) {
        let s = lock(&self.state);
        self.line.set_level(s.1 && s.0 != 0);
    }
}

pub type SharedPort = Arc<Mutex<Port>>;

pub struct Ahci {
    config: PciConfig,
    host: HostRegs,
    ports: Vec<SharedPort>,
    irq: Arc<Irq>,
}

impl Ahci {
    pub fn new(mem: Arc<GuestMem>, line: Arc<dyn IrqLine>) -> Ahci {
        let mut config = PciConfig::new(0x8086, 0x2922, 0x01_06_01, 2);
        config.add_bar(ABAR, BarKind::Mem32, ABAR_SIZE);
        config.set_interrupt_pin(1);
        Ahci {
            config,
            host: HostRegs::new(PORTS as u32),
            ports: (0..PORTS)
                .map(|_| Arc::new(Mutex::new(Port::new(mem.clone()))))
                .collect(),
            irq: Arc::new(Irq {
                state: Mutex::new((0, false)),
                line,
            }),
        }
    }

    /// Attaches `dev` to port `n` (`bus=ahci.N`).
    pub fn attach(&mut self, n: usize, dev: AtaDevice) -> Result<(), String> {
        let p = self
            .ports
            .get(n)
            .ok_or_else(|| format!("AHCI has no port {n} (0..{PORTS})"))?;
        lock(p).attach(dev);
        Ok(())
    }

    fn read_abar(&mut self, off: u64) -> u32 {
        if off < PORT_BASE {
            if off == super::regs::host::IS {
                return lock(&self.irq.state).0;
            }
            return self.host.read(off);
        }
        let n = ((off - PORT_BASE) / PORT_LEN) as usize;
        match self.ports.get(n) {
            Some(p) => lock(p).regs.read((off - PORT_BASE) % PORT_LEN),
            None => 0,
        }
    }

    fn write_abar(&mut self, off: u64, v: u32) {
        if off < PORT_BASE {
            if off == super::regs::host::IS {
                // Write 1 to clear; a port still pending sets its bit again.
                lock(&self.irq.state).0 &= !v;
                for (n, p) in self.ports.iter().enumerate() {
                    let pending = lock(p).irq_pending();
                    self.irq.port(n, pending);
                }
                self.irq.update();
                return;
            }
            match self.host.write(off, v) {
                HostEvent::Reset => self.reset(),
                HostEvent::Interrupt => {
                    lock(&self.irq.state).1 = self.host.ghc & super::regs::ghc::IE != 0;
                    self.irq.update();
                }
                HostEvent::None => {}
            }
            return;
        }
        let n = ((off - PORT_BASE) / PORT_LEN) as usize;
        let Some(p) = self.ports.get(n).cloned() else {
            return;
        };
        let io = lock(&p).write((off - PORT_BASE) % PORT_LEN, v);
        let pending = lock(&p).irq_pending();
        self.irq.port(n, pending);
        if let Some(io) = io {
            run_io(&p, n, &self.irq, io);
        }
    }

    /// GHC.HR: every port back to its reset state (devices keep their
    /// media and show their signatures again), host registers too.
    fn reset(&mut self) {
        let ports = self.host.read(super::regs::host::CAP) & 0x1f;
        self.host = HostRegs::new(ports + 1);
        *lock(&self.irq.state) = (0, false);
        for p in &self.ports {
            lock(p).reset();
        }
        self.irq.update();
    }
}

/// Submits `io` for port `n`; the completion continues the port (which
/// may start the next command's I/O) and updates the interrupt.
fn run_io(p: &SharedPort, n: usize, irq: &Arc<Irq>, io: PortIo) {
    let PortIo {
        backend,
        req,
        ticket,
    } = io;
    let (p2, irq2) = (p.clone(), irq.clone());
    backend.submit(
        req,
        Box::new(move |_req, r| {
            let (next, pending) = {
                let mut g = lock(&p2);
                let next = g.complete(ticket, r.is_ok());
                (next, g.irq_pending())
            };
            irq2.port(n, pending);
            if let Some(io) = next {
                run_io(&p2, n, &irq2, io);
            }
        }),
    );
}

impl PciFunction for Ahci {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    /// ABAR: 32-bit registers; narrower accesses see (or change) their
    /// bytes of the register.
    fn region_read(&mut self, region: usize, offset: u64, data: &mut [u8]) {
        if region != ABAR {
            data.fill(0xff);
            return;
        }
        let v = self.read_abar(offset & !3).to_le_bytes();
        let at = (offset & 3) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.get(at + i).copied().unwrap_or(0);
        }
    }

    fn region_write(&mut self, region: usize, offset: u64, data: &[u8]) {
        if region != ABAR || data.is_empty() {
            return;
        }
        let reg = offset & !3;
        let at = (offset & 3) as usize;
        let v = if data.len() >= 4 && at == 0 {
            u32::from_le_bytes([data[0], data[1], data[2], data[3]])
        } else {
            // A narrow write changes only its bytes. (Write-1-to-clear
            // registers see zeroes in the other bytes: nothing cleared.)
            let mut b = [0u8; 4];
            for (i, &x) in data.iter().enumerate().take(4 - at) {
                b[at + i] = x;
            }
            u32::from_le_bytes(b)
        };
        self.write_abar(reg, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ahci::regs::{cmd, ghc, host, is, port};
    use std::sync::atomic::{AtomicBool, Ordering};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[derive(Default)]
    struct Line(AtomicBool);
    impl IrqLine for Line {
        fn set_level(&self, level: bool) {
            self.0.store(level, Ordering::SeqCst);
        }
    }

    fn rd(a: &mut Ahci, off: u64) -> u32 {
        let mut b = [0u8; 4];
        a.region_read(ABAR, off, &mut b);
        u32::from_le_bytes(b)
    }
    fn wr(a: &mut Ahci, off: u64, v: u32) {
        a.region_write(ABAR, off, &v.to_le_bytes());
    }

    #[test]
    fn pci_identity_and_host_registers() {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let mut a = Ahci::new(mem, Arc::new(Line::default()));
        assert_eq!(a.config().u16(0), 0x8086);
        assert_eq!(a.config().u16(2), 0x2922);
        assert_eq!(a.config().u32(8) >> 8, 0x01_06_01);
        assert_eq!(rd(&mut a, host::PI), 0x3f);
        assert_eq!(rd(&mut a, host::VS), 0x0001_0300);
        // A byte read sees its byte of the register.
        let mut b = [0u8; 1];
        a.region_read(ABAR, host::VS + 2, &mut b);
        assert_eq!(b[0], 0x01);
        // No device: the port shows nothing present.
        assert_eq!(rd(&mut a, PORT_BASE + port::SSTS), 0);
    }

    #[test]
    fn port_interrupts_reach_is_and_the_line() {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let line = Arc::new(Line::default());
        let mut a = Ahci::new(mem.clone(), line.clone());
        let p1 = PORT_BASE + PORT_LEN;
        wr(&mut a, p1 + port::CLB, 0x1000);
        wr(&mut a, p1 + port::IE, is::IFS);
        wr(&mut a, host::GHC, ghc::IE);
        wr(&mut a, p1 + port::CMD, cmd::ST);
        // An issued slot whose table is outside memory: IFS on port 1.
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&(5u32 | 1 << 16).to_le_bytes());
        h[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        vm_memory::Bytes::write_slice(&*mem, &h, GuestAddress(0x1000)).unwrap();
        wr(&mut a, p1 + port::CI, 1);
        assert_ne!(rd(&mut a, p1 + port::IS) & is::IFS, 0);
        assert_eq!(rd(&mut a, host::IS), 0b10);
        assert!(line.0.load(Ordering::SeqCst));
        // Clearing host IS alone does not help while the port still asks.
        wr(&mut a, host::IS, 0b10);
        assert_eq!(rd(&mut a, host::IS), 0b10);
        wr(&mut a, p1 + port::IS, is::IFS);
        wr(&mut a, host::IS, 0b10);
        assert_eq!(rd(&mut a, host::IS), 0);
        assert!(!line.0.load(Ordering::SeqCst));
        // GHC.HR resets everything, and reads back 0.
        wr(&mut a, host::GHC, ghc::HR);
        assert_eq!(rd(&mut a, host::GHC), ghc::AE);
        assert_eq!(rd(&mut a, p1 + port::CMD), 0);
    }
}
