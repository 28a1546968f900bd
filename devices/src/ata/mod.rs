//! The ATA device, shared by the transports that carry its commands: the
//! PIIX IDE channel (`crate::ide`, taskfile registers and bus-master DMA)
//! and, next, AHCI (FIS delivery and its own DMA engine), as `crate::scsi`
//! is the one SCSI target behind every SCSI transport.
//!
//! Specs followed: ATA8-ACS (commands, status and error bits, IDENTIFY,
//! SMART, power modes) and ATA/ATAPI-6 (CHS addressing).
//!
//! - `command`: the taskfile and typed command parsing.
//! - `device`: [`AtaDevice`], command execution into an [`Outcome`] the
//!   transport carries out.
//! - `identify`: IDENTIFY (PACKET) DEVICE data.
//! - `geometry`: CHS geometry and BIOS translation guessing.
//! - `smart`: SMART data and log pages.

pub mod command;
pub mod device;
pub mod geometry;
pub mod identify;
mod smart;

pub use command::{cmd, error, status, AtaCommand, DriveInfo, Power, Refusal, Taskfile, Xfer};
pub use device::{AtaDevice, DriveConfig, Media, Outcome};
