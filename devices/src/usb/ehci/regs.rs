//! The EHCI's registers: the PCI configuration registers (EHCI 1.0
//! section 2.1: SBRN, FLADJ, PORTWAKECAP, and the USB legacy support
//! extended capability of 5.1 at EECP), the capability registers (2.2)
//! and the operational registers (2.3), as offsets and bit names.
//!
//! The layout is QEMU's `ich9-usb-ehci1` (and the ICH9's): capability
//! registers at 00h with CAPLENGTH 20h, so the operational registers
//! start at 20h, CONFIGFLAG at 60h and the six PORTSC registers from 64h.

/// Root hub ports (HCSPARAMS.N_PORTS).
pub const N_PORTS: usize = 6;
/// Ports per companion controller (HCSPARAMS.N_PCC): the ICH9's UHCIs
/// have two each.
pub const N_PCC: u32 = 2;
/// Companion controllers (HCSPARAMS.N_CC).
pub const N_CC: u32 = 3;

/// Where the operational registers start (CAPLENGTH).
pub const CAPLENGTH: u32 = 0x20;
/// EHCI 1.0 (HCIVERSION, BCD).
pub const HCIVERSION: u32 = 0x0100;
/// HCSPARAMS (2.2.3): six ports, no port power control (ports are always
/// powered), ports routed to companions in order (no HCSP-PORTROUTE),
/// N_PCC and N_CC as the ICH9's.
pub const HCSPARAMS: u32 = N_PORTS as u32 | N_PCC << 8 | N_CC << 12;
/// The USB legacy support capability's offset in PCI config space.
pub const EECP: u16 = 0x68;
/// HCCPARAMS (2.2.4): 32-bit addressing only (so CTRLDSSEGMENT stays
/// 0 and structures have no 64-bit extensions), a fixed 1024-entry frame
/// list, no asynchronous schedule park, an isochronous scheduling
/// threshold of a whole frame (bit 7), EECP.
pub const HCCPARAMS: u32 = (EECP as u32) << 8 | 0x80;

/// Capability register offsets (2.2).
pub mod cap {
    pub const CAPLENGTH: u64 = 0x00;
    pub const HCIVERSION: u64 = 0x02;
    pub const HCSPARAMS: u64 = 0x04;
    pub const HCCPARAMS: u64 = 0x08;
    pub const HCSP_PORTROUTE: u64 = 0x0c;
}

/// Operational register offsets in the BAR (2.3; CAPLENGTH + the spec's).
pub mod op {
    pub const USBCMD: u64 = 0x20;
    pub const USBSTS: u64 = 0x24;
    pub const USBINTR: u64 = 0x28;
    pub const FRINDEX: u64 = 0x2c;
    pub const CTRLDSSEGMENT: u64 = 0x30;
    pub const PERIODICLISTBASE: u64 = 0x34;
    pub const ASYNCLISTADDR: u64 = 0x38;
    pub const CONFIGFLAG: u64 = 0x60;
    pub const PORTSC: u64 = 0x64;
}

/// USBCMD bits (2.3.1).
pub mod cmd {
    pub const RS: u32 = 1 << 0;
    pub const HCRESET: u32 = 1 << 1;
    /// Frame list size: read-only 0 (1024 entries) here.
    pub const FLS: u32 = 3 << 2;
    pub const PSE: u32 = 1 << 4;
    pub const ASE: u32 = 1 << 5;
    /// Interrupt on Async Advance Doorbell.
    pub const IAAD: u32 = 1 << 6;
    /// Light host controller reset: not supported (reads 0).
    pub const LHCR: u32 = 1 << 7;
    /// Interrupt Threshold Control.
    pub const ITC: u32 = 0xff << 16;
    /// ITC after reset: 8 microframes (1 ms).
    pub const ITC_DEFAULT: u32 = 8 << 16;
    /// What the driver may set.
    pub const WRITABLE: u32 = RS | PSE | ASE | IAAD | ITC;
}

/// USBSTS bits (2.3.2); the low six are write-one-to-clear.
pub mod sts {
    pub const USBINT: u32 = 1 << 0;
    pub const ERRINT: u32 = 1 << 1;
    /// Port Change Detect.
    pub const PCD: u32 = 1 << 2;
    /// Frame List Rollover.
    pub const FLR: u32 = 1 << 3;
    /// Host System Error.
    pub const HSE: u32 = 1 << 4;
    /// Interrupt on Async Advance.
    pub const IAA: u32 = 1 << 5;
    pub const HALTED: u32 = 1 << 12;
    pub const RECLAMATION: u32 = 1 << 13;
    /// Periodic / Asynchronous Schedule Status.
    pub const PSS: u32 = 1 << 14;
    pub const ASS: u32 = 1 << 15;
    /// The interrupt causes (and their USBINTR enables, 2.3.3).
    pub const CAUSES: u32 = 0x3f;
}

/// PORTSC bits (2.3.9).
pub mod port {
    pub const CCS: u32 = 1 << 0;
    pub const CSC: u32 = 1 << 1;
    pub const PE: u32 = 1 << 2;
    pub const PEC: u32 = 1 << 3;
    pub const OCA: u32 = 1 << 4;
    pub const OCC: u32 = 1 << 5;
    pub const FPR: u32 = 1 << 6;
    pub const SUSPEND: u32 = 1 << 7;
    pub const PR: u32 = 1 << 8;
    /// Line status (D+ in bit 11, D- in bit 10).
    pub const LINE: u32 = 3 << 10;
    /// K-state: a low-speed device (D- pulled up) before reset.
    pub const LINE_K: u32 = 1 << 10;
    pub const PP: u32 = 1 << 12;
    pub const PO: u32 = 1 << 13;
    pub const PIC: u32 = 3 << 14;
    pub const PTC: u32 = 0xf << 16;
    pub const WKCNNT: u32 = 1 << 20;
    pub const WKDSCNNT: u32 = 1 << 21;
    pub const WKOC: u32 = 1 << 22;
    /// Write-one-to-clear.
    pub const CHANGES: u32 = CSC | PEC | OCC;
    /// Plain read/write.
    pub const RW: u32 = FPR | SUSPEND | PIC | PTC | WKCNNT | WKDSCNNT | WKOC;
}

/// PCI configuration registers (2.1).
pub mod pci {
    /// Serial bus controller, USB, EHCI.
    pub const CLASS: u32 = 0x0c_03_20;
    pub const VENDOR_ID: u16 = 0x8086;
    /// ICH9 USB2 EHCI controller #1 (QEMU's `ich9-usb-ehci1`).
    pub const DEVICE_ID: u16 = 0x293a;
    pub const REVISION: u8 = 0x03;
    /// The memory BAR of the registers, 4 KiB.
    pub const BAR_MEM: usize = 0;
    pub const MEM_SIZE: u64 = 0x1000;
    /// Serial Bus Release Number: USB 2.0.
    pub const SBRN: u16 = 0x60;
    /// Frame Length Adjustment: 20h, 60000 HS bit times per microframe.
    pub const FLADJ: u16 = 0x61;
    pub const PORTWAKECAP: u16 = 0x62;
    /// USBLEGSUP (5.1): capability ID 1, no next capability, the BIOS
    /// and OS owned semaphores.
    pub const USBLEGSUP: u16 = super::EECP;
    /// USBLEGCTLSTS (5.2): SMI enables; no SMI is ever raised.
    pub const USBLEGCTLSTS: u16 = super::EECP + 4;
    pub const CMD_BUS_MASTER: u16 = 1 << 2;
}
