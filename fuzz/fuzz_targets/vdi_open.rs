//! Fuzzes opening, reading, writing and (vdi) checking hostile vdi
//! images (`formats::vdi::fuzz_open_read`, on in-memory storage).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| formats::vdi::fuzz_open_read(data));
