//! The SCSI target emulation shared by every transport that carries CDBs:
//! ATAPI (PACKET on IDE and AHCI), and later the LSI 53C895A, virtio-scsi,
//! USB mass storage (BOT) and UAS.
//!
//! - [`sense`]: sense keys and codes, fixed-format sense data (SPC-4 4.5).
//! - [`cdb`]: CDB parsing into a typed [`cdb::Command`] (SPC-4, SBC-3,
//!   MMC-5 field layouts); nothing is executed while parsing.
//! - [`mmc`]: the CD/DVD-ROM logical unit (MMC-5): medium and tray state,
//!   UNIT ATTENTION, and the replies. A transport moves the data.
//!
//! Direct-access disks (SBC-3, for scsi-hd) will join as `sbc`.

pub mod cdb;
pub mod mmc;
pub mod sense;

pub use mmc::{CdRom, Reply, Transport};
pub use sense::Sense;
