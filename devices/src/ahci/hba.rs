//! The HBA: ICH9's AHCI function (8086:2922, class 01.06.01) with its
//! ports behind ABAR, and the interrupt they share.
//!
//! Specs followed: AHCI 1.3.1 section 2.1 (PCI header: ABAR in BAR5,
//! capabilities), 2.4 (SATA capability and the index/data pair),
//! 3.1 (generic host control), 10.4.3 (HBA reset through GHC.HR) and
//! 5.3.1 (the port interrupt bits feeding IS and the INTx line); the ICH9
//! datasheet section 14.1 for the IDs and class.
//!
//! Block I/O a port needs runs outside every lock ([`run_io`]); its
//! completion, on an I/O thread, continues the port and updates the
//! interrupt.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::port::{Port, PortIo, PortState};
use super::regs::{ghc, HostEvent, HostRegs, PORT_BASE, PORT_LEN};
use crate::ata::AtaDevice;
use crate::bus::lock;
use crate::irq::IrqLine;
use crate::migration::DeviceState;
use crate::pci::msi::Msi;
use crate::pci::msix::MsiSender;
use crate::pci::{BarKind, PciConfig, PciFunction};
use crate::GuestMem;
use serde::{Deserialize, Serialize};

/// ICH9's six SATA ports.
pub const PORTS: usize = 6;
/// The BAR holding ABAR, and its size (the port registers end at
/// 0x100 + 32 * 0x80; ICH9 decodes 2 KiB, QEMU 4 KiB).
pub const ABAR: usize = 5;
const ABAR_SIZE: u64 = 0x1000;
/// The index/data pair's I/O BAR (ICH9 14.1.9, 14.4), with the index at
/// 0x10 and the data at 0x14.
pub const IDP: usize = 4;
const IDP_SIZE: u64 = 0x20;
const IDP_INDEX: u64 = 0x10;
const IDP_DATA: u64 = 0x14;
/// Where ICH9 puts its MSI and SATA capabilities.
const MSI_CAP: u16 = 0x80;
const SATA_CAP: u16 = 0xa8;
const SATA_CAP_ID: u8 = 0x12;
const MAP: u16 = 0x90;
const MAP_AHCI: u8 = 1 << 6;
const PCS: u16 = 0x92;

/// What ports and host share: the host IS register, GHC.IE, and how the
/// interrupt is signalled.
struct Irq {
    state: Mutex<IrqState>,
    line: Arc<dyn IrqLine>,
    msi: Arc<dyn MsiSender>,
}

#[derive(Default)]
struct IrqState {
    /// Host IS, one bit per port.
    is: u32,
    /// GHC.IE.
    ie: bool,
    /// The MSI message while MSI is enabled (then INTx stays low).
    msi: Option<(u64, u32)>,
    /// Whether the interrupt condition held at the last evaluation: an
    /// MSI goes out when it starts to hold.
    asserted: bool,
}

impl Irq {
    /// Port `n` asks for an interrupt (or not): IS.IPS bit n is set while
    /// it does (software clears it, 3.1.3). The condition is GHC.IE and
    /// any IS bit: INTx is level-triggered and follows it; an MSI is sent
    /// when it starts to hold.
    fn port(&self, n: usize, pending: bool) {
        let mut s = lock(&self.state);
        if pending {
            s.is |= 1 << n;
        }
        self.signal(&mut s, false);
    }

    /// Re-evaluates the condition; `rearm` sends an MSI if it still holds
    /// (software cleared host IS while a port still asks: that is a new
    /// interrupt, as a new edge would be).
    fn signal(&self, s: &mut IrqState, rearm: bool) {
        let up = s.ie && s.is != 0;
        match s.msi {
            Some((addr, data)) => {
                self.line.set_level(false);
                if up && (rearm || !s.asserted) {
                    self.msi.send(addr, data);
                }
            }
            None => self.line.set_level(up),
        }
        s.asserted = up;
    }

    fn update(&self) {
        let mut s = lock(&self.state);
        self.signal(&mut s, false);
    }
}

pub type SharedPort = Arc<Mutex<Port>>;

pub struct Ahci {
    config: PciConfig,
    msi: Msi,
    host: HostRegs,
    ports: Vec<SharedPort>,
    irq: Arc<Irq>,
    /// The index of the index/data pair (BAR4): an ABAR offset.
    idp_index: u32,
}

impl Ahci {
    pub fn new(mem: Arc<GuestMem>, line: Arc<dyn IrqLine>, msi: Arc<dyn MsiSender>) -> Ahci {
        let mut config = PciConfig::new(0x8086, 0x2922, 0x01_06_01, 2);
        config.add_bar(IDP, BarKind::Io, IDP_SIZE);
        config.add_bar(ABAR, BarKind::Mem32, ABAR_SIZE);
        config.set_interrupt_pin(1);
        // ICH9 14.1.23-14.1.31: MSI first at 0x80, then SATA at 0xa8,
        // whose SATACR1 locates the index/data pair (BAR4, offset 0x10).
        config.next_capability_at(MSI_CAP);
        let msi_cap = Msi::add_capability(&mut config);
        config.next_capability_at(SATA_CAP);
        let mut sata = [0u8; 6];
        sata[0..2].copy_from_slice(&0x0010u16.to_le_bytes()); // revision 1.0
        let barloc = 4 + IDP as u32; // BAR4 is at 0x20: 8 in SATACR1's code
        sata[2..6].copy_from_slice(&(barloc | (IDP_INDEX as u32 / 4) << 4).to_le_bytes());
        config.add_capability(SATA_CAP_ID, &sata);
        // MAP (14.1.32): AHCI mode; PCS (14.1.33): the port enables.
        config.set_u8(MAP, MAP_AHCI);
        config.set_wmask(PCS, &[0x3f]);
        Ahci {
            config,
            msi: msi_cap,
            host: HostRegs::new(PORTS as u32),
            ports: (0..PORTS)
                .map(|_| Arc::new(Mutex::new(Port::new(mem.clone()))))
                .collect(),
            irq: Arc::new(Irq {
                state: Mutex::new(IrqState::default()),
                line,
                msi,
            }),
            idp_index: 0,
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
                return lock(&self.irq.state).is;
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
                let pending: Vec<bool> = self.ports.iter().map(|p| lock(p).irq_pending()).collect();
                let mut s = lock(&self.irq.state);
                s.is &= !v;
                for (n, pending) in pending.into_iter().enumerate() {
                    if pending {
                        s.is |= 1 << n;
                    }
                }
                self.irq.signal(&mut s, true);
                return;
            }
            match self.host.write(off, v) {
                HostEvent::Reset => self.reset(),
                HostEvent::Interrupt => {
                    lock(&self.irq.state).ie = self.host.ghc & super::regs::ghc::IE != 0;
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
        let ios = {
            let mut g = lock(&p);
            let ios = g.write((off - PORT_BASE) % PORT_LEN, v);
            self.irq.port(n, g.irq_pending());
            ios
        };
        for io in ios {
            run_io(&p, n, &self.irq, io);
        }
    }

    /// GHC.HR: every port back to its reset state (devices keep their
    /// media and show their signatures again), host registers too.
    fn reset(&mut self) {
        let ports = self.host.read(super::regs::host::CAP) & 0x1f;
        self.host = HostRegs::new(ports + 1);
        {
            let mut s = lock(&self.irq.state);
            s.is = 0;
            s.ie = false;
        }
        for p in &self.ports {
            lock(p).reset();
        }
        self.irq.update();
    }
}

/// The shared interrupt's state as migration carries it (the MSI message
/// follows from config space).
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AhciIrqState {
    pub is: u32,
    pub ie: bool,
    pub asserted: bool,
}

/// The HBA: PCI config space (MSI's enable, address and data are in it),
/// the host registers, the interrupt, the index/data pair's index, and
/// every port with its device.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AhciState {
    pub config: Vec<u8>,
    pub host: HostRegs,
    pub irq: AhciIrqState,
    pub idp_index: u32,
    pub ports: Vec<PortState>,
}

impl Ahci {
    /// Why this HBA cannot migrate, if it cannot: a CD-ROM's MMC state
    /// (sense, tray, medium) is not carried.
    pub fn migration_blocker(&self) -> Option<String> {
        self.ports.iter().enumerate().find_map(|(n, p)| {
            lock(p)
                .has_atapi()
                .then(|| format!("ich9-ahci: the CD-ROM on port {n} does not migrate"))
        })
    }
}

impl DeviceState for Ahci {
    const VERSION: u32 = 1;
    type State = AhciState;
    fn save_state(&self) -> AhciState {
        // One lock at a time, as the completion path takes them.
        let ports = self.ports.iter().map(|p| lock(p).save_state()).collect();
        let s = lock(&self.irq.state);
        AhciState {
            config: self.config.save_bytes(),
            host: self.host.clone(),
            irq: AhciIrqState {
                is: s.is,
                ie: s.ie,
                asserted: s.asserted,
            },
            idp_index: self.idp_index,
            ports,
        }
    }

    fn load_state(&mut self, s: AhciState, version: u32) -> Result<(), String> {
        let here = HostRegs::new(PORTS as u32);
        if s.ports.len() != self.ports.len() {
            return Err(format!(
                "AHCI: {} ports on the source, {} here",
                s.ports.len(),
                self.ports.len()
            ));
        }
        if (s.host.cap, s.host.pi) != (here.cap, here.pi)
            || s.host.ghc & !(ghc::AE | ghc::IE) != 0
            || s.host.ghc & ghc::AE == 0
            || s.irq.ie != (s.host.ghc & ghc::IE != 0)
            || s.irq.is & !here.pi != 0
            || s.idp_index & !0x7fc != 0
        {
            return Err(format!(
                "AHCI: host state does not fit this HBA: {:?} {:?} index {:#x}",
                s.host, s.irq, s.idp_index
            ));
        }
        // A refused port leaves the ports before it loaded: the
        // destination gives up on the whole stream then.
        self.config
            .load_bytes(&s.config)
            .map_err(|e| format!("AHCI: {e}"))?;
        for (n, (p, ps)) in self.ports.iter().zip(s.ports).enumerate() {
            lock(p)
                .load_state(ps, version)
                .map_err(|e| format!("AHCI port {n}: {e}"))?;
        }
        self.host = s.host;
        self.idp_index = s.idp_index;
        let mut st = lock(&self.irq.state);
        st.is = s.irq.is;
        st.ie = s.irq.ie;
        st.asserted = s.irq.asserted;
        Ok(())
    }

    /// The interrupt: MSI as config space says, the INTx line's level
    /// from IS and GHC.IE (an MSI the source sent is not sent again).
    fn post_load(&mut self) {
        let msg = self.msi.message(&self.config);
        let mut s = lock(&self.irq.state);
        s.msi = msg;
        self.irq.signal(&mut s, false);
    }

    /// The I/O each port had outstanding on the source, issued again.
    fn resume(&mut self) {
        for (n, p) in self.ports.iter().enumerate() {
            let (ios, pending) = {
                let mut g = lock(p);
                let ios = g.reissue();
                (ios, g.irq_pending())
            };
            self.irq.port(n, pending);
            for io in ios {
                run_io(p, n, &self.irq, io);
            }
        }
    }
}

/// Submits `io` for port `n`; the completion continues the port (which
/// may start the next command's I/O) and updates the interrupt.
fn run_io(p: &SharedPort, n: usize, irq: &Arc<Irq>, io: PortIo) {
    let PortIo {
        backend,
        reqs,
        ticket,
    } = io;
    // The step completes when the last of its requests does.
    let left = Arc::new(AtomicUsize::new(reqs.len()));
    let failed = Arc::new(AtomicBool::new(false));
    for req in reqs {
        let (p2, irq2) = (p.clone(), irq.clone());
        let (left, failed) = (left.clone(), failed.clone());
        backend.submit(
            req,
            Box::new(move |_req, r| {
                if r.is_err() {
                    failed.store(true, Ordering::SeqCst);
                }
                if left.fetch_sub(1, Ordering::AcqRel) != 1 {
                    return;
                }
                let ok = !failed.load(Ordering::SeqCst);
                let next = {
                    let mut g = lock(&p2);
                    let next = g.complete(ticket, ok);
                    // Posted before the port lock is released: whoever
                    // sees the slot's PxCI bit clear also finds host IS
                    // set and the MSI written (lock order: port, then
                    // interrupt; nothing takes them the other way).
                    irq2.port(n, g.irq_pending());
                    next
                };
                for io in next {
                    run_io(&p2, n, &irq2, io);
                }
            }),
        );
    }
}

impl PciFunction for Ahci {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        let msg = self.msi.message(&self.config);
        let mut s = lock(&self.irq.state);
        if s.msi != msg {
            s.msi = msg;
            self.irq.signal(&mut s, false);
        }
    }

    /// ABAR: 32-bit registers; narrower accesses see (or change) their
    /// bytes of the register. The index/data pair reaches the same
    /// registers through I/O: IDP+0x10 holds an ABAR offset, IDP+0x14 is
    /// the register there.
    fn region_read(&mut self, region: usize, offset: u64, data: &mut [u8]) {
        let v = match (region, offset & !3) {
            (ABAR, reg) => self.read_abar(reg),
            (IDP, IDP_INDEX) => self.idp_index,
            (IDP, IDP_DATA) => self.read_abar(self.idp_index as u64),
            (IDP, _) => 0,
            _ => {
                data.fill(0xff);
                return;
            }
        };
        let v = v.to_le_bytes();
        let at = (offset & 3) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.get(at + i).copied().unwrap_or(0);
        }
    }

    fn region_write(&mut self, region: usize, offset: u64, data: &[u8]) {
        if (region != ABAR && region != IDP) || data.is_empty() {
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
        match (region, reg) {
            (ABAR, _) => self.write_abar(reg, v),
            // Dword registers within ABAR's port range.
            (IDP, IDP_INDEX) => self.idp_index = v & 0x7fc,
            (IDP, IDP_DATA) => self.write_abar(self.idp_index as u64, v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ahci::regs::{cmd, ghc, host, is, port};
    use crate::pci::msix::NoMsi;
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

    /// ABAR offset of port `n`'s register `reg`.
    fn preg(n: u64, reg: u64) -> u64 {
        PORT_BASE + n * PORT_LEN + reg
    }

    const CLB: u64 = 0x1000;
    const FB: u64 = 0x2000;
    const CTBA: u64 = 0x3000;
    const BUF: u64 = 0x8000;

    /// Port `n`'s slot 0 (its list at CLB + n * 0x400): `opcode` with a
    /// 48-bit LBA and count and one PRD of `len` bytes at BUF.
    fn command(mem: &GuestMem, n: u64, opcode: u8, lba: u64, count: u16, len: u32) {
        use vm_memory::Bytes;
        let (clb, ctba) = (CLB + n * 0x400, CTBA + n * 0x100);
        let mut h = [0u8; 32];
        h[0..4].copy_from_slice(&(5u32 | 1 << 6 | 1 << 16).to_le_bytes());
        h[8..16].copy_from_slice(&ctba.to_le_bytes());
        mem.write_slice(&h, GuestAddress(clb)).unwrap();
        let mut f = [0u8; 20];
        f[0] = crate::ahci::fis::fis_type::REG_H2D;
        f[1] = 0x80;
        f[2] = opcode;
        f[4..7].copy_from_slice(&lba.to_le_bytes()[..3]);
        f[7] = 0x40;
        f[8..11].copy_from_slice(&lba.to_le_bytes()[3..6]);
        f[12..14].copy_from_slice(&count.to_le_bytes());
        mem.write_slice(&f, GuestAddress(ctba)).unwrap();
        let mut prd = [0u8; 16];
        prd[0..8].copy_from_slice(&BUF.to_le_bytes());
        prd[12..16].copy_from_slice(&(len - 1).to_le_bytes());
        mem.write_slice(&prd, GuestAddress(ctba + 0x80)).unwrap();
    }

    /// An HBA whose ports 0 and 1 have disks on `disks`, started as a
    /// driver starts them (on the source only: a destination takes this
    /// over from the stream).
    fn hba(
        mem: &Arc<GuestMem>,
        line: Arc<Line>,
        disks: [Arc<block::backend::BlockBackend>; 2],
    ) -> Ahci {
        use crate::ata::device::{DriveConfig, Media};
        let mut a = Ahci::new(mem.clone(), line, Arc::new(NoMsi));
        for (n, d) in disks.into_iter().enumerate() {
            let mut dev =
                AtaDevice::new(DriveConfig::new(Media::Disk(d)), n as u32, false).unwrap();
            dev.enable_ncq();
            a.attach(n, dev).unwrap();
        }
        a
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let t = std::time::Instant::now();
        while !f() {
            assert!(t.elapsed().as_secs() < 10, "timed out waiting for {what}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// ahci-test's halted migration cases, at the device level: on the
    /// source a WRITE DMA (port 0) and a FLUSH (port 1) fail under
    /// `werror=stop` and stay parked in the block layer; the state moves
    /// to a fresh HBA over the same guest memory and images, whose
    /// `resume` issues both again: the data reaches the image, the
    /// commands complete with their D2H FISes and the interrupt.
    #[test]
    fn halted_write_and_flush_complete_on_the_destination() {
        use crate::scsi::testutil::{backend, TempImage};
        use block::backend::{BackendConfig, ErrorAction};
        use vm_memory::Bytes;
        let imgs = [TempImage::new(1 << 20), TempImage::new(1 << 20)];
        let stop = BackendConfig {
            werror: ErrorAction::Stop,
            ..BackendConfig::default()
        };
        let src_disks = [("write_aio", &imgs[0]), ("flush_to_disk", &imgs[1])].map(|(ev, img)| {
            backend(
                &format!(
                    "driver=blkdebug,image.driver=file,image.locking=off,image.filename={},\
                     inject-error.0.event={ev}",
                    img.path.display()
                ),
                stop.clone(),
            )
        });
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let mut a = hba(&mem, Arc::new(Line::default()), src_disks.clone());
        wr(&mut a, host::GHC, ghc::IE);
        for n in 0..2 {
            wr(&mut a, preg(n, port::CLB), (CLB + n * 0x400) as u32);
            wr(&mut a, preg(n, port::FB), (FB + n * 0x100) as u32);
            wr(&mut a, preg(n, port::IE), is::DHRS | is::TFES);
            wr(&mut a, preg(n, port::CMD), cmd::FRE | cmd::ST);
            wr(&mut a, preg(n, port::IS), u32::MAX);
        }
        wr(&mut a, host::IS, u32::MAX);
        mem.write_slice(&[0x5a; 4096], GuestAddress(BUF)).unwrap();
        command(&mem, 0, crate::ata::cmd::WRITE_DMA_EXT, 100, 8, 4096);
        command(&mem, 1, crate::ata::cmd::FLUSH_CACHE_EXT, 0, 0, 512);
        wr(&mut a, preg(0, port::CI), 1);
        wr(&mut a, preg(1, port::CI), 1);
        wait_for("both requests to park", || {
            src_disks.iter().all(|d| d.is_stopped())
        });
        assert_eq!(
            (rd(&mut a, preg(0, port::CI)), rd(&mut a, preg(1, port::CI))),
            (1, 1)
        );
        assert_eq!(rd(&mut a, host::IS), 0, "nothing completed");

        let dst_disks = imgs.each_ref().map(|img| {
            backend(
                &format!("driver=file,locking=off,filename={}", img.path.display()),
                BackendConfig::default(),
            )
        });
        let line = Arc::new(Line::default());
        let mut b = hba(&mem, line.clone(), dst_disks.clone());
        crate::migration::round_trip(&a, &mut b);
        assert!(!line.0.load(Ordering::SeqCst));
        b.resume();
        wait_for("both commands to complete", || {
            rd(&mut b, preg(0, port::CI)) == 0 && rd(&mut b, preg(1, port::CI)) == 0
        });
        assert_eq!(rd(&mut b, host::IS), 0b11);
        assert!(line.0.load(Ordering::SeqCst), "INTx is up");
        for n in 0..2 {
            assert_eq!(
                rd(&mut b, preg(n, port::IS)) & (is::DHRS | is::TFES),
                is::DHRS
            );
            assert_eq!(rd(&mut b, preg(n, port::TFD)) & 0xff, 0x50);
            let mut d2h = [0u8; 4];
            mem.read_slice(&mut d2h, GuestAddress(FB + n * 0x100 + 0x40))
                .unwrap();
            assert_eq!(d2h[..3], [crate::ahci::fis::fis_type::REG_D2H, 0x40, 0x50]);
        }
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(CLB + 4)).unwrap(),
            4096,
            "PRDBC"
        );
        let mut data = vec![0u8; 4096];
        dst_disks[0].read_at(100 * 512, &mut data).unwrap();
        assert!(
            data.iter().all(|&b| b == 0x5a),
            "the write reached the image"
        );
        // The source still holds its parked requests and its busy slots:
        // it assumed nothing (the machine drops them after a migration).
        assert_eq!(rd(&mut a, preg(0, port::CI)), 1);
    }

    #[test]
    fn hostile_hba_states_are_refused() {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let a = Ahci::new(mem.clone(), Arc::new(Line::default()), Arc::new(NoMsi));
        let mut b = Ahci::new(mem, Arc::new(Line::default()), Arc::new(NoMsi));
        let load = |b: &mut Ahci, f: &dyn Fn(&mut serde_json::Value)| {
            crate::migration::load_edited(&a, b, f)
        };
        let e = load(&mut b, &|v| {
            v["ports"].as_array_mut().unwrap().pop();
        });
        assert!(e.contains("5 ports on the source, 6 here"), "{e}");
        let e = load(&mut b, &|v| v["config"][2] = 0x23.into());
        assert!(e.contains("Bad config data"), "{e}");
        let e = load(&mut b, &|v| v["host"]["cap"] = 0.into());
        assert!(e.contains("host state"), "{e}");
        let e = load(&mut b, &|v| v["irq"]["is"] = 0x40.into());
        assert!(e.contains("host state"), "{e}");
        let e = load(&mut b, &|v| v["idp_index"] = 0x801.into());
        assert!(e.contains("host state"), "{e}");
        let e = load(&mut b, &|v| v["ports"][3]["active"] = 200.into());
        assert!(e.contains("port 3") && e.contains("active slot 200"), "{e}");
        let e = load(&mut b, &|v| v["ports"][0]["device"] = serde_json::json!({}));
        assert!(e.contains("missing field"), "{e}");
        assert_eq!(a.migration_blocker(), None);
    }

    #[test]
    fn pci_identity_and_host_registers() {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let mut a = Ahci::new(mem, Arc::new(Line::default()), Arc::new(NoMsi));
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
        let mut a = Ahci::new(mem.clone(), line.clone(), Arc::new(NoMsi));
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
