//! Fuzzes the SCSI CDB parser, the MMC CD-ROM and SBC disk models behind a
//! target, and the request runner.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::harness::scsi_cdb(data));
