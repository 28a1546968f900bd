//! Fuzzes the SCSI CDB parser and the MMC CD-ROM model.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::harness::scsi_cdb(data));
