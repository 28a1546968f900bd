//! Fuzzes the ATA taskfile parser and the ATA device model (disk and
//! ATAPI), the CHS geometry guess and TRIM payload decoding.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::harness::ata_taskfile(data));
