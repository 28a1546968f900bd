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
//! - `hba`: the PCI function: ABAR with the host and port registers, the
//!   shared interrupt (INTx), HBA reset, block I/O outside the locks.
//!
//! Still to come (issue 18): NCQ, ATAPI and TRIM in the port, MSI, and
//! `-device ahci` in the machine.

pub mod fis;
pub mod hba;
pub mod port;
pub mod regs;
