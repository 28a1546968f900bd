//! The xHCI register map (eXtensible Host Controller Interface 1.2,
//! chapter 5): the layout of BAR0, the bits drivers use, and the
//! read-only capability registers (5.3) with the extended capabilities
//! that live right after them (7.2, Supported Protocol).
//!
//! The layout is QEMU's (hw/usb/hcd-xhci.c), which guests already know:
//! capability registers at 0 (CAPLENGTH 40h), operational registers at
//! 40h with the port register sets at 440h (5.4.8), runtime registers at
//! 1000h (5.5), doorbells at 2000h (5.6), the MSI-X table at 3000h and
//! its PBA at 3800h; 16 KiB in all.

/// BAR0's size.
pub const BAR_SIZE: u64 = 0x4000;
/// CAPLENGTH: where the operational registers start.
pub const CAP_LEN: u64 = 0x40;
pub const OPER: u64 = CAP_LEN;
/// The port register sets, 16 bytes each, from port 1 (5.4.8).
pub const PORT_REGS: u64 = OPER + 0x400;
pub const PORT_REGS_LEN: u64 = 0x10;
pub const RUNTIME: u64 = 0x1000;
pub const DOORBELL: u64 = 0x2000;
pub const MSIX_TABLE: u64 = 0x3000;
pub const MSIX_PBA: u64 = 0x3800;

/// QEMU's limits: 15 ports of each protocol, 64 slots, 16 interrupters.
pub const MAX_PORTS_2: usize = 15;
pub const MAX_PORTS_3: usize = 15;
pub const MAX_SLOTS: usize = 64;
pub const MAX_INTRS: usize = 16;

/// HCIVERSION: 1.0, as QEMU reports.
pub const HCI_VERSION: u32 = 0x0100;
/// Where the extended capabilities start, in bytes from BAR0 (HCCPARAMS1
/// xECP holds it in dwords).
pub const XECP: u64 = 0x20;
/// MaxPSASize: Primary Stream Arrays of up to 2^(7+1) entries.
pub const MAX_PSA_SIZE: u32 = 7;

/// Capability register offsets (5.3).
pub mod cap {
    pub const CAPLENGTH: u64 = 0x00;
    pub const HCSPARAMS1: u64 = 0x04;
    pub const HCSPARAMS2: u64 = 0x08;
    pub const HCSPARAMS3: u64 = 0x0c;
    pub const HCCPARAMS1: u64 = 0x10;
    pub const DBOFF: u64 = 0x14;
    pub const RTSOFF: u64 = 0x18;
    pub const HCCPARAMS2: u64 = 0x1c;
}

/// Operational register offsets from [`OPER`] (5.4).
pub mod op {
    pub const USBCMD: u64 = 0x00;
    pub const USBSTS: u64 = 0x04;
    pub const PAGESIZE: u64 = 0x08;
    pub const DNCTRL: u64 = 0x14;
    pub const CRCR_LO: u64 = 0x18;
    pub const CRCR_HI: u64 = 0x1c;
    pub const DCBAAP_LO: u64 = 0x30;
    pub const DCBAAP_HI: u64 = 0x34;
    pub const CONFIG: u64 = 0x38;
}

/// USBCMD bits (5.4.1).
pub mod cmd {
    pub const RS: u32 = 1 << 0;
    pub const HCRST: u32 = 1 << 1;
    pub const INTE: u32 = 1 << 2;
    pub const HSEE: u32 = 1 << 3;
    pub const LHCRST: u32 = 1 << 7;
    pub const CSS: u32 = 1 << 8;
    pub const CRS: u32 = 1 << 9;
    pub const EWE: u32 = 1 << 10;
    pub const EU3S: u32 = 1 << 11;
    /// The bits that read back as written.
    pub const STORED: u32 = RS | INTE | HSEE | EWE | EU3S;
}

/// USBSTS bits (5.4.2); HSE, EINT, PCD and SRE are write-1-to-clear.
pub mod sts {
    pub const HCH: u32 = 1 << 0;
    pub const HSE: u32 = 1 << 2;
    pub const EINT: u32 = 1 << 3;
    pub const PCD: u32 = 1 << 4;
    pub const SSS: u32 = 1 << 8;
    pub const RSS: u32 = 1 << 9;
    pub const SRE: u32 = 1 << 10;
    pub const CNR: u32 = 1 << 11;
    pub const HCE: u32 = 1 << 12;
    pub const W1C: u32 = HSE | EINT | PCD | SRE;
}

/// CRCR bits (5.4.5).
pub mod crcr {
    pub const RCS: u64 = 1 << 0;
    pub const CS: u64 = 1 << 1;
    pub const CA: u64 = 1 << 2;
    pub const CRR: u64 = 1 << 3;
    pub const PTR_MASK: u64 = !0x3f;
}

/// PORTSC bits (5.4.8).
pub mod portsc {
    pub const CCS: u32 = 1 << 0;
    pub const PED: u32 = 1 << 1;
    pub const OCA: u32 = 1 << 3;
    pub const PR: u32 = 1 << 4;
    pub const PLS_SHIFT: u32 = 5;
    pub const PLS_MASK: u32 = 0xf << PLS_SHIFT;
    pub const PP: u32 = 1 << 9;
    pub const SPEED_SHIFT: u32 = 10;
    pub const SPEED_MASK: u32 = 0xf << SPEED_SHIFT;
    pub const LWS: u32 = 1 << 16;
    pub const CSC: u32 = 1 << 17;
    pub const PEC: u32 = 1 << 18;
    pub const WRC: u32 = 1 << 19;
    pub const OCC: u32 = 1 << 20;
    pub const PRC: u32 = 1 << 21;
    pub const PLC: u32 = 1 << 22;
    pub const CEC: u32 = 1 << 23;
    pub const CAS: u32 = 1 << 24;
    pub const WCE: u32 = 1 << 25;
    pub const WDE: u32 = 1 << 26;
    pub const WOE: u32 = 1 << 27;
    pub const DR: u32 = 1 << 30;
    pub const WPR: u32 = 1 << 31;
    /// The change bits, write-1-to-clear.
    pub const CHANGES: u32 = CSC | PEC | WRC | OCC | PRC | PLC | CEC;
    /// The wake enables, plain read/write.
    pub const WAKE: u32 = WCE | WDE | WOE;
}

/// Port link states (PORTSC.PLS, 5.4.8 table 5-27).
pub mod pls {
    pub const U0: u32 = 0;
    pub const U3: u32 = 3;
    pub const DISABLED: u32 = 4;
    pub const RX_DETECT: u32 = 5;
    pub const POLLING: u32 = 7;
    pub const RESUME: u32 = 15;
}

/// Runtime register offsets (5.5): MFINDEX, then the interrupter
/// register sets, 32 bytes each from 20h.
pub mod rt {
    pub const MFINDEX: u64 = 0x00;
    pub const IR0: u64 = 0x20;
    pub const IR_LEN: u64 = 0x20;
    pub const IMAN: u64 = 0x00;
    pub const IMOD: u64 = 0x04;
    pub const ERSTSZ: u64 = 0x08;
    pub const ERSTBA_LO: u64 = 0x10;
    pub const ERSTBA_HI: u64 = 0x14;
    pub const ERDP_LO: u64 = 0x18;
    pub const ERDP_HI: u64 = 0x1c;
}

/// IMAN bits (5.5.2.1).
pub mod iman {
    pub const IP: u32 = 1 << 0;
    pub const IE: u32 = 1 << 1;
}

/// ERDP bits (5.5.2.3.3).
pub mod erdp {
    pub const DESI_MASK: u64 = 0x7;
    pub const EHB: u64 = 1 << 3;
    pub const PTR_MASK: u64 = !0xf;
}

/// Bus speeds as PORTSC and the slot context encode them (the default
/// Protocol Speed IDs, 7.2.2.1.1).
pub mod speed {
    pub const FULL: u32 = 1;
    pub const LOW: u32 = 2;
    pub const HIGH: u32 = 3;
    pub const SUPER: u32 = 4;
}

/// The capability registers and the two Supported Protocol capabilities
/// (7.2): USB 2 ports first (1..=p2), then USB 3 (p2+1..=p2+p3), as QEMU
/// numbers them. Unaligned and sub-dword reads take bytes of these dwords.
pub fn cap_read(off: u64, opts: &super::XhciOptions) -> u32 {
    let (ports2, ports3, slots, intrs) = (opts.p2, opts.p3, opts.slots, opts.intrs);
    let ports = (ports2 + ports3) as u32;
    match off {
        // CAPLENGTH in byte 0, HCIVERSION in bytes 2-3.
        cap::CAPLENGTH => CAP_LEN as u32 | HCI_VERSION << 16,
        cap::HCSPARAMS1 => ports << 24 | (intrs as u32) << 8 | slots as u32,
        // IST = 15 (frames), ERST Max = 0: one segment, as QEMU says
        // (more are accepted, up to event::MAX_ERST).
        cap::HCSPARAMS2 => 0x0000_000f,
        cap::HCSPARAMS3 => 0,
        // xECP, MaxPSASize, 64-bit addressing (AC64); CSZ = 0 (32-byte
        // contexts).
        cap::HCCPARAMS1 => ((XECP as u32 / 4) << 16) | (MAX_PSA_SIZE << 12) | 1,
        cap::DBOFF => DOORBELL as u32,
        cap::RTSOFF => RUNTIME as u32,
        cap::HCCPARAMS2 => 0,
        // Supported Protocol, USB 2.0: ID 2, next 4 dwords on, rev 2.0.
        0x20 => 0x0200_0402,
        0x24 => u32::from_le_bytes(*b"USB "),
        // Compatible port count and offset (1-based).
        0x28 => (ports2 as u32) << 8 | (opts.usb2_base() as u32 + 1),
        // USB 3.0, the last capability.
        0x30 => 0x0300_0002,
        0x34 => u32::from_le_bytes(*b"USB "),
        0x38 => (ports3 as u32) << 8 | (opts.usb3_base() as u32 + 1),
        _ => 0,
    }
}
