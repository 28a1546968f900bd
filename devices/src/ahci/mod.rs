//! AHCI: the Serial ATA host bus adapter of ICH9 (8086:2922), the
//! transport that carries [`crate::ata::AtaDevice`] commands as FISes.
//!
//! Specs followed: AHCI 1.3.1 (sections named in each module), Serial
//! ATA 3.2 (FIS layouts) and ATA8-ACS (NCQ commands).
//!
//! - `fis`: the command list, command tables and PRDTs a guest builds,
//!   parsed into typed [`fis::Command`]s, and the FISes the HBA posts.
//! - `regs`: the host and port register file and its access rules; a
//!   write returns the event the HBA must act on.
//! - `port`: one port's command engine: issued slots in order through
//!   the ATA device, data through the PRDT, result FISes posted.
//!
//! Still to come (issue 18): NCQ, ATAPI and TRIM in the port, the HBA
//! around the ports (host registers, interrupts, MSI), the PCI function
//! and `-device ahci`.

pub mod fis;
pub mod port;
pub mod regs;
