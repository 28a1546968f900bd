//! Fuzzes the LSI53C895A: register accesses, SCRIPTS programs in guest
//! memory and in the on-chip RAM, and the SCSI targets behind the chip.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::harness::lsi(data));
