//! AHCI: the Serial ATA host bus adapter of ICH9 (8086:2922), the
//! transport that carries [`crate::ata::AtaDevice`] commands as FISes.
//!
//! Specs followed: AHCI 1.3.1 (sections named in each module), Serial
//! ATA 3.2 (FIS layouts) and ATA8-ACS (NCQ commands).
//!
//! - `fis`: the command list, command tables and PRDTs a guest builds,
//!   parsed into typed [`fis::Command`]s, and the FISes the HBA posts.
//!
//! The HBA and port registers, the DMA engine and `-device ahci` are
//! issue 18's next steps; this module starts with the parsing layer they
//! all go through.

pub mod fis;
