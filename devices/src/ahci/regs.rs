//! AHCI's register file: the generic host control registers and each
//! port's registers, with their access rules, apart from what the HBA
//! does about them.
//!
//! Specs followed: AHCI 1.3.1 section 3.1 (CAP, GHC, IS, PI, VS, CAP2),
//! 3.3 (PxCLB .. PxFBS: which bits are read-only, write-1-to-clear or
//! set-only), 10.3 (what starting and stopping the command list and FIS
//! receive engines shows in CR and FR) and 10.4.2 (COMRESET through
//! PxSCTL.DET).
//!
//! A write returns what it asks of the HBA ([`PortEvent`], [`HostEvent`]);
//! the HBA carries it out. Reads never have side effects.

/// Command slots per port (CAP.NCS + 1) and the NCQ queue depth.
pub const SLOTS: u32 = 32;
/// Bytes of the generic host control block; port `n` starts at
/// `PORT_BASE + n * PORT_LEN`.
pub const PORT_BASE: u64 = 0x100;
pub const PORT_LEN: u64 = 0x80;

/// Generic host control register offsets.
pub mod host {
    pub const CAP: u64 = 0x00;
    pub const GHC: u64 = 0x04;
    pub const IS: u64 = 0x08;
    pub const PI: u64 = 0x0c;
    pub const VS: u64 = 0x10;
    pub const CAP2: u64 = 0x24;
}

/// Port register offsets.
pub mod port {
    pub const CLB: u64 = 0x00;
    pub const CLBU: u64 = 0x04;
    pub const FB: u64 = 0x08;
    pub const FBU: u64 = 0x0c;
    pub const IS: u64 = 0x10;
    pub const IE: u64 = 0x14;
    pub const CMD: u64 = 0x18;
    pub const TFD: u64 = 0x20;
    pub const SIG: u64 = 0x24;
    pub const SSTS: u64 = 0x28;
    pub const SCTL: u64 = 0x2c;
    pub const SERR: u64 = 0x30;
    pub const SACT: u64 = 0x34;
    pub const CI: u64 = 0x38;
    pub const SNTF: u64 = 0x3c;
    pub const FBS: u64 = 0x40;
}

/// CAP bits (3.1.1).
pub mod cap {
    pub const S64A: u32 = 1 << 31;
    pub const SNCQ: u32 = 1 << 30;
    pub const SAM: u32 = 1 << 18;
    /// Interface speed: Gen 1 (1.5 Gbps), in bits 23:20.
    pub const ISS_GEN1: u32 = 1 << 20;
}

/// GHC bits (3.1.2).
pub mod ghc {
    pub const HR: u32 = 1 << 0;
    pub const IE: u32 = 1 << 1;
    pub const AE: u32 = 1 << 31;
}

/// PxCMD bits (3.3.7).
pub mod cmd {
    pub const ST: u32 = 1 << 0;
    pub const SUD: u32 = 1 << 1;
    pub const POD: u32 = 1 << 2;
    pub const CLO: u32 = 1 << 3;
    pub const FRE: u32 = 1 << 4;
    pub const FR: u32 = 1 << 14;
    pub const CR: u32 = 1 << 15;
    pub const ATAPI: u32 = 1 << 24;
    /// What software may write: ST, SUD, POD, CLO, FRE, PMA, APSTE,
    /// ATAPI, DLAE, ALPE, ASP and ICC (the rest is status).
    pub const WRITABLE: u32 = ST | SUD | POD | CLO | FRE | 1 << 17 | 1 << 23 | 0xff00_0000;
}

/// PxIS bits the HBA raises (3.3.5), and which of them PxIE may enable.
pub mod is {
    /// Device to Host Register FIS received.
    pub const DHRS: u32 = 1 << 0;
    /// PIO Setup FIS received.
    pub const PSS: u32 = 1 << 1;
    /// Set Device Bits FIS received.
    pub const SDBS: u32 = 1 << 3;
    /// A PRD with I set has moved its data.
    pub const DPS: u32 = 1 << 5;
    /// Port connect change (mirrors SERR.DIAG.X).
    pub const PCS: u32 = 1 << 6;
    /// Overflow: the device sent more than the PRDT holds.
    pub const OFS: u32 = 1 << 24;
    /// Interface fatal error (e.g. a PRDT or table outside memory).
    pub const IFS: u32 = 1 << 27;
    /// Host bus fatal error.
    pub const HBFS: u32 = 1 << 29;
    /// Task file error: status ERR on a D2H or SDB FIS.
    pub const TFES: u32 = 1 << 30;
    /// Every bit defined in 3.3.5 (PxIE's writable bits).
    pub const ALL: u32 = 0xfdc0_00ff;
}

/// What a write to a port register asks of the HBA.
#[derive(Debug, PartialEq, Eq)]
pub enum PortEvent {
    /// Nothing beyond the register change.
    None,
    /// PxCI gained slots while the command list runs: fetch them.
    Issue,
    /// PxCMD.ST went 0 -> 1 (start the command list engine) or 1 -> 0
    /// (stop: PxCI and PxSACT clear, CR clears).
    Start,
    Stop,
    /// PxCMD.CLO: clear BSY and DRQ in PxTFD so a command can be issued.
    CommandListOverride,
    /// PxSCTL.DET 1: COMRESET on the link; 0 after it: the device
    /// comes back (signature FIS, PxSSTS).
    ComReset,
    ComResetDone,
    /// PxIS or PxIE changed: recompute the port's interrupt.
    Interrupt,
}

/// One port's registers.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRegs {
    pub clb: u64,
    pub fb: u64,
    pub is: u32,
    pub ie: u32,
    pub cmd: u32,
    /// PxTFD: status in bits 7:0, error in 15:8.
    pub tfd: u32,
    pub sig: u32,
    pub ssts: u32,
    pub sctl: u32,
    pub serr: u32,
    pub sact: u32,
    pub ci: u32,
}

impl PortRegs {
    /// A port after reset: the engines stopped, status BSY until the
    /// device sends its signature, the signature register all ones.
    pub fn reset() -> PortRegs {
        PortRegs {
            tfd: 0x7f,
            sig: 0xffff_ffff,
            ..PortRegs::default()
        }
    }

    pub fn read(&self, off: u64) -> u32 {
        match off {
            port::CLB => self.clb as u32,
            port::CLBU => (self.clb >> 32) as u32,
            port::FB => self.fb as u32,
            port::FBU => (self.fb >> 32) as u32,
            port::IS => self.is,
            port::IE => self.ie,
            port::CMD => self.cmd,
            port::TFD => self.tfd,
            port::SIG => self.sig,
            port::SSTS => self.ssts,
            port::SCTL => self.sctl,
            port::SERR => self.serr,
            port::SACT => self.sact,
            port::CI => self.ci,
            _ => 0,
        }
    }

    /// A 32-bit write at `off` within the port.
    pub fn write(&mut self, off: u64, v: u32) -> PortEvent {
        match off {
            // The list is 1 KiB aligned and the FIS area 256-byte
            // aligned: the low bits are read-only zero. Software may
            // only move them while the engines are stopped; a running
            // engine keeps what it started with (3.3.1, 3.3.3).
            port::CLB if self.cmd & cmd::CR == 0 => {
                self.clb = self.clb & !0xffff_ffff | (v & !0x3ff) as u64
            }
            port::CLBU if self.cmd & cmd::CR == 0 => {
                self.clb = self.clb & 0xffff_ffff | (v as u64) << 32
            }
            port::FB if self.cmd & cmd::FR == 0 => {
                self.fb = self.fb & !0xffff_ffff | (v & !0xff) as u64
            }
            port::FBU if self.cmd & cmd::FR == 0 => {
                self.fb = self.fb & 0xffff_ffff | (v as u64) << 32
            }
            port::IS => {
                self.is &= !v;
                return PortEvent::Interrupt;
            }
            port::IE => {
                self.ie = v & is::ALL;
                return PortEvent::Interrupt;
            }
            port::CMD => return self.write_cmd(v),
            port::SCTL => {
                let old = self.sctl & 0xf;
                self.sctl = v & 0xfff;
                return match (old, v & 0xf) {
                    (o, 1) if o != 1 => PortEvent::ComReset,
                    (1, 0) => PortEvent::ComResetDone,
                    _ => PortEvent::None,
                };
            }
            port::SERR => self.serr &= !v,
            // Set-only, and only while the list runs (3.3.13, 3.3.14).
            port::SACT if self.cmd & cmd::ST != 0 => self.sact |= v,
            port::CI if self.cmd & cmd::ST != 0 => {
                let new = v & !self.ci;
                self.ci |= v;
                if new != 0 {
                    return PortEvent::Issue;
                }
            }
            _ => {}
        }
        PortEvent::None
    }

    fn write_cmd(&mut self, v: u32) -> PortEvent {
        let old = self.cmd;
        // FR follows FRE and CR follows ST at once: nothing here runs
        // asynchronously long enough for software to see the lag.
        let mut new = old & !cmd::WRITABLE | v & cmd::WRITABLE;
        new = if new & cmd::FRE != 0 {
            new | cmd::FR
        } else {
            new & !cmd::FR
        };
        new = if new & cmd::ST != 0 {
            new | cmd::CR
        } else {
            new & !cmd::CR
        };
        // CLO is self-clearing: the HBA clears it once BSY/DRQ are gone.
        new &= !cmd::CLO;
        self.cmd = new;
        if v & cmd::CLO != 0 {
            self.tfd &= !0x88;
            return PortEvent::CommandListOverride;
        }
        match (old & cmd::ST != 0, new & cmd::ST != 0) {
            (false, true) => PortEvent::Start,
            (true, false) => {
                self.ci = 0;
                self.sact = 0;
                PortEvent::Stop
            }
            _ => PortEvent::None,
        }
    }
}

/// What a write to a host register asks of the HBA.
#[derive(Debug, PartialEq, Eq)]
pub enum HostEvent {
    None,
    /// GHC.HR: reset the whole HBA (ports and all), then HR reads 0.
    Reset,
    /// GHC.IE or IS changed: recompute the interrupt.
    Interrupt,
}

/// The generic host control registers.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRegs {
    pub cap: u32,
    pub ghc: u32,
    pub is: u32,
    pub pi: u32,
}

impl HostRegs {
    /// An HBA with `ports` ports (1..=32), all implemented.
    pub fn new(ports: u32) -> HostRegs {
        let ports = ports.clamp(1, 32);
        HostRegs {
            cap: cap::S64A | cap::SNCQ | cap::SAM | cap::ISS_GEN1 | (SLOTS - 1) << 8 | (ports - 1),
            // AHCI-only (CAP.SAM): AE is set and stays set.
            ghc: ghc::AE,
            is: 0,
            pi: if ports == 32 {
                u32::MAX
            } else {
                (1 << ports) - 1
            },
        }
    }

    pub fn read(&self, off: u64) -> u32 {
        match off {
            host::CAP => self.cap,
            host::GHC => self.ghc,
            host::IS => self.is,
            host::PI => self.pi,
            host::VS => 0x0001_0300,
            _ => 0,
        }
    }

    pub fn write(&mut self, off: u64, v: u32) -> HostEvent {
        match off {
            host::GHC => {
                self.ghc = ghc::AE | v & ghc::IE;
                if v & ghc::HR != 0 {
                    return HostEvent::Reset;
                }
                HostEvent::Interrupt
            }
            host::IS => {
                self.is &= !v;
                HostEvent::Interrupt
            }
            _ => HostEvent::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_registers() {
        let mut h = HostRegs::new(6);
        assert_eq!(h.read(host::PI), 0x3f);
        assert_eq!(h.read(host::CAP) & 0x1f, 5, "CAP.NP");
        assert_eq!(h.read(host::CAP) >> 8 & 0x1f, 31, "CAP.NCS");
        assert_eq!(h.read(host::VS), 0x0001_0300);
        // AE cannot be cleared on an AHCI-only HBA; IE can be set.
        assert_eq!(h.write(host::GHC, ghc::IE), HostEvent::Interrupt);
        assert_eq!(h.read(host::GHC), ghc::AE | ghc::IE);
        assert_eq!(h.write(host::GHC, ghc::HR), HostEvent::Reset);
        assert_eq!(h.read(host::GHC) & ghc::HR, 0);
        // IS is write-1-to-clear.
        h.is = 0b101;
        h.write(host::IS, 0b100);
        assert_eq!(h.read(host::IS), 0b001);
        // Read-only registers ignore writes.
        h.write(host::CAP, 0);
        h.write(host::PI, 0);
        assert_eq!((h.read(host::PI), h.read(host::CAP) & 0x1f), (0x3f, 5));
    }

    #[test]
    fn port_engines_and_issue() {
        let mut p = PortRegs::reset();
        assert_eq!(p.read(port::SIG), 0xffff_ffff);
        p.write(port::CLB, 0x1234_5fff);
        p.write(port::CLBU, 1);
        p.write(port::FB, 0x8000_01ff);
        assert_eq!(p.clb, 0x1_1234_5c00);
        assert_eq!(p.fb, 0x8000_0100);
        // CI is ignored while the list is stopped.
        assert_eq!(p.write(port::CI, 1), PortEvent::None);
        assert_eq!(p.read(port::CI), 0);
        assert_eq!(p.write(port::CMD, cmd::FRE), PortEvent::None);
        assert_eq!(p.read(port::CMD) & (cmd::FRE | cmd::FR), cmd::FRE | cmd::FR);
        assert_eq!(p.write(port::CMD, cmd::FRE | cmd::ST), PortEvent::Start);
        assert_ne!(p.read(port::CMD) & cmd::CR, 0);
        // A running engine keeps its list base.
        p.write(port::CLB, 0);
        assert_eq!(p.clb, 0x1_1234_5c00);
        assert_eq!(p.write(port::CI, 0b11), PortEvent::Issue);
        // Set-only: writing a subset issues nothing new.
        assert_eq!(p.write(port::CI, 0b01), PortEvent::None);
        assert_eq!(p.read(port::CI), 0b11);
        p.write(port::SACT, 0b10);
        assert_eq!(p.write(port::CMD, cmd::FRE), PortEvent::Stop);
        assert_eq!((p.read(port::CI), p.read(port::SACT)), (0, 0));
        assert_eq!(p.read(port::CMD) & cmd::CR, 0);
    }

    #[test]
    fn port_status_bits() {
        let mut p = PortRegs::reset();
        p.is = is::DHRS | is::TFES;
        assert_eq!(p.write(port::IS, is::TFES), PortEvent::Interrupt);
        assert_eq!(p.read(port::IS), is::DHRS);
        assert_eq!(p.write(port::IE, u32::MAX), PortEvent::Interrupt);
        assert_eq!(p.read(port::IE), is::ALL);
        p.serr = 0x0401_0000;
        p.write(port::SERR, 0x0400_0000);
        assert_eq!(p.read(port::SERR), 0x0001_0000);
        // CLO clears BSY and DRQ and reads back 0.
        p.tfd = 0x88;
        assert_eq!(p.write(port::CMD, cmd::CLO), PortEvent::CommandListOverride);
        assert_eq!((p.read(port::TFD), p.read(port::CMD) & cmd::CLO), (0, 0));
        // COMRESET: DET 1 then 0.
        assert_eq!(p.write(port::SCTL, 0x301), PortEvent::ComReset);
        assert_eq!(p.write(port::SCTL, 0x300), PortEvent::ComResetDone);
        assert_eq!(p.read(port::SCTL), 0x300);
        // TFD, SIG and SSTS are read-only.
        p.write(port::TFD, 0);
        p.write(port::SIG, 0);
        p.write(port::SSTS, 0x113);
        assert_eq!((p.read(port::SIG), p.read(port::SSTS)), (0xffff_ffff, 0));
    }
}
