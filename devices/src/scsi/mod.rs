//! The SCSI target emulation shared by every transport that carries CDBs:
//! ATAPI (PACKET on IDE and AHCI), and later the LSI 53C895A, virtio-scsi,
//! USB mass storage (BOT) and UAS.
//!
//! - [`sense`]: sense keys and codes, fixed-format sense data (SPC-4 4.5).
//! - [`cdb`]: CDB parsing into a typed [`cdb::Command`] (SPC-4, SBC-3,
//!   MMC-5 field layouts); nothing is executed while parsing.
//! - [`lun`]: the [`Lun`] trait a transport drives, the [`Plan`] a command
//!   becomes, and the sense bookkeeping shared by units.
//! - [`mmc`]: the CD/DVD-ROM logical unit (MMC-5): medium and tray state,
//!   UNIT ATTENTION, and the replies. A transport moves the data.
//! - [`sbc`]: the direct-access disk (SBC-3), QEMU's scsi-hd.
//! - [`target`]: a LUN table, REPORT LUNS and the answers for absent LUNs.
//! - [`bus`]: the targets of an HBA's bus by SCSI id ([`bus::ScsiBus`]),
//!   which the VMM attaches units to.
//! - [`request`]: the one runner that carries out a plan: data to and from
//!   the initiator through a transport's [`request::DataPath`], asynchronous
//!   block I/O in bounded chunks, status and residual.

pub mod bus;
pub mod cdb;
pub mod lun;
pub mod mmc;
pub mod request;
pub mod sbc;
pub mod sense;
pub mod target;

pub use lun::{Direction, IoFailure, Lun, Plan};
pub use mmc::{CdRom, Transport};
pub use request::{DataPath, Outcome, Status};
pub use sbc::{Disk, DiskOptions};
pub use sense::Sense;
pub use target::Target;

#[cfg(test)]
pub(crate) mod testutil;
